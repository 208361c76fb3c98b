/* test-input-changes.c: an input file that is shortened or rewritten in
 * place while lpipe reads it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Tensors above 16 MiB are read straight from the file's mapping. Reading a
 * page past the end of a file that was truncated under the mapping raises
 * SIGBUS, which used to kill lpipe on the spot (exit 135, no message, the
 * temporary output left behind). A file rewritten in place during a run gave
 * an output that mixed old and new data, and the run succeeded. Both must
 * end in an error naming the file (and, for the truncation, the tensor),
 * with a non-zero exit, the old output untouched and no temporary file.
 *
 * The library tests truncate or rewrite the file between the load and the
 * save, in this process (its SIGBUS is the one handled). The CLI tests do it
 * from here while a run of `lpipe` casts the file, at a point found by
 * watching the run's temporary output grow (lp_test_find_temp_fd()).
 */
#include "lp-test-util.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

/* Above the 16 MiB up to which tensors are read with pread(). */
#define BIG_ELEMENTS ((17u << 20) / 2)          /* bf16 */

static char *dir;

/* A safetensors file of @n_big bf16 tensors big0, big1... of @elements
 * each, after a small f32 tensor 'small'. Every bf16 element is 1.0. */
static char *
write_input_sized (const char *name,
                   guint       n_big,
                   guint       elements)
{
  g_autofree char *path = g_build_filename (dir, name, NULL);
  g_autoptr(GString) header = g_string_new ("{\"small\":{\"dtype\":\"F32\",\"shape\":[4],"
                                            "\"data_offsets\":[0,16]}");
  guint64 at = 16, n;
  guchar prefix[8];
  const float small[4] = { 1, 2, 3, 4 };
  g_autofree guint16 *big = g_new (guint16, elements);
  FILE *f;

  for (guint i = 0; i < n_big; i++)
    {
      g_string_append_printf (header, ",\"big%u\":{\"dtype\":\"BF16\",\"shape\":[%u],"
                              "\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}",
                              i, elements, at, at + 2 * (guint64) elements);
      at += 2 * (guint64) elements;
    }
  g_string_append_c (header, '}');
  while (header->len % 8)
    g_string_append_c (header, ' ');
  n = header->len;
  for (int i = 0; i < 8; i++)
    prefix[i] = (n >> (8 * i)) & 0xff;
  for (guint i = 0; i < elements; i++)
    big[i] = 0x3f80;       /* 1.0 in bf16 */

  f = fopen (path, "wb");
  g_assert_nonnull (f);
  g_assert_cmpuint (fwrite (prefix, 1, 8, f), ==, 8);
  g_assert_cmpuint (fwrite (header->str, 1, header->len, f), ==, header->len);
  g_assert_cmpuint (fwrite (small, 1, sizeof small, f), ==, sizeof small);
  for (guint i = 0; i < n_big; i++)
    g_assert_cmpuint (fwrite (big, 2, elements, f), ==, elements);
  g_assert_cmpint (fclose (f), ==, 0);
  return g_steal_pointer (&path);
}

static char *
write_input (const char *name,
             guint       n_big)
{
  return write_input_sized (name, n_big, BIG_ELEMENTS);
}

/* The folder holds exactly @names: no temporary file, nothing else. */
static void
assert_folder_holds (const char * const *names)
{
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  const char *name;
  guint n = 0, expected = g_strv_length ((char **) names);

  g_assert_nonnull (d);
  while ((name = g_dir_read_name (d)))
    {
      if (!g_strv_contains (names, name))
        g_error ("left in the folder: %s", name);
      n++;
    }
  g_assert_cmpuint (n, ==, expected);
}

static void
remove_files (const char * const *names)
{
  for (guint i = 0; names[i]; i++)
    {
      g_autofree char *path = g_build_filename (dir, names[i], NULL);
      g_unlink (path);
    }
}

static void
write_old_output (const char *path)
{
  g_assert_true (g_file_set_contents (path, "the user's old file", -1, NULL));
}

static void
assert_old_output (const char *path)
{
  g_autofree char *contents = NULL;

  g_assert_true (g_file_get_contents (path, &contents, NULL, NULL));
  g_assert_cmpstr (contents, ==, "the user's old file");
}

static guint64
data_start (const char *path)
{
  g_autoptr(GMappedFile) m = g_mapped_file_new (path, FALSE, NULL);
  const guchar *p;
  guint64 n = 0;

  g_assert_nonnull (m);
  p = (const guchar *) g_mapped_file_get_contents (m);
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | p[i];
  return 8 + n;
}

/* ---- through the library ------------------------------------------------- */

/* The file is cut while a big tensor's view is held: reading it faults. The
 * bytes read as zeros, and the save fails before it commits, naming the
 * file and the tensor. */
static void
test_truncated_under_mapping (void)
{
  static const char *names[] = { "in.safetensors", "out.safetensors", NULL };
  g_autofree char *in = write_input ("in.safetensors", 1);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GBytes) data = NULL;
  const guint16 *p;
  gsize size;
  guint64 ones = 0;

  write_old_output (out);
  checkpoint = lp_safetensors_load (in, &error);
  g_assert_no_error (error);
  data = lp_tensor_dup_data (lp_checkpoint_lookup (checkpoint, "big0"), &error);
  g_assert_no_error (error);

  g_assert_cmpint (truncate (in, data_start (in) + 16 + 4096), ==, 0);
  p = g_bytes_get_data (data, &size);
  for (gsize i = 0; i < size / 2; i++)
    ones += p[i] == 0x3f80;
  /* What is left of the file reads as it was; the rest as zeros. */
  g_assert_cmpuint (ones, <, BIG_ELEMENTS);
  g_clear_pointer (&data, g_bytes_unref);

  g_assert_false (lp_safetensors_save (checkpoint, out, NULL, &error));
  g_assert_nonnull (error);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "in.safetensors"));
  g_assert_nonnull (strstr (error->message, "shortened while open"));
  g_assert_nonnull (strstr (error->message, "'big0'"));
  assert_old_output (out);
  assert_folder_holds (names);
  remove_files (names);
}

/* Cut before the read: the read itself fails. */
static void
test_truncated_before_read (void)
{
  static const char *names[] = { "in.safetensors", NULL };
  g_autofree char *in = write_input ("in.safetensors", 1);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GBytes) data = NULL;

  checkpoint = lp_safetensors_load (in, &error);
  g_assert_no_error (error);
  g_assert_cmpint (truncate (in, data_start (in) + 16), ==, 0);
  data = lp_tensor_dup_data (lp_checkpoint_lookup (checkpoint, "big0"), &error);
  if (data != NULL)
    {
      /* The old code handed out the view: reading it was SIGBUS. */
      volatile guint16 first = ((const guint16 *) g_bytes_get_data (data, NULL))[0];
      (void) first;
    }
  g_assert_null (data);
  g_assert_nonnull (error);
  g_assert_nonnull (strstr (error->message, "in.safetensors"));
  g_assert_nonnull (strstr (error->message, "shortened while open"));
  assert_folder_holds (names);
  remove_files (names);
}

/* The same file rewritten in place (same size, other bytes) after it was
 * read from: the save fails, naming the file. */
static void
test_rewritten_in_place (void)
{
  static const char *names[] = { "in.safetensors", "out.safetensors", NULL };
  g_autofree char *in = write_input ("in.safetensors", 1);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GBytes) small = NULL;
  const float other[4] = { 5, 6, 7, 8 };
  int fd;

  write_old_output (out);
  checkpoint = lp_safetensors_load (in, &error);
  g_assert_no_error (error);
  small = lp_tensor_dup_data (lp_checkpoint_lookup (checkpoint, "small"), &error);
  g_assert_no_error (error);

  fd = open (in, O_WRONLY | O_CLOEXEC);
  g_assert_cmpint (fd, >=, 0);
  g_assert_cmpint (pwrite (fd, other, sizeof other, data_start (in)), ==, sizeof other);
  g_assert_cmpint (close (fd), ==, 0);

  g_assert_false (lp_safetensors_save (checkpoint, out, NULL, &error));
  g_assert_nonnull (error);
  g_test_message ("%s", error->message);
  g_assert_nonnull (strstr (error->message, "in.safetensors"));
  g_assert_nonnull (strstr (error->message, "changed while it was read"));
  assert_old_output (out);
  assert_folder_holds (names);
  remove_files (names);
}

/* Replaced rather than rewritten (a new file renamed over the name): the
 * open descriptor still reads the old file whole, so the output is
 * consistent and the save succeeds. */
static void
test_replaced_is_consistent (void)
{
  static const char *names[] = { "in.safetensors", "out.safetensors", NULL };
  g_autofree char *in = write_input ("in.safetensors", 1);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(LpCheckpoint) written = NULL;
  g_autoptr(GBytes) small = NULL;

  checkpoint = lp_safetensors_load (in, &error);
  g_assert_no_error (error);
  g_assert_true (g_file_set_contents (in, "not a safetensors file", -1, NULL));
  g_assert_true (lp_safetensors_save (checkpoint, out, NULL, &error));
  g_assert_no_error (error);
  written = lp_safetensors_load (out, &error);
  g_assert_no_error (error);
  small = lp_tensor_dup_data (lp_checkpoint_lookup (written, "small"), &error);
  g_assert_no_error (error);
  g_assert_cmpfloat (((const float *) g_bytes_get_data (small, NULL))[3], ==, 4);
  g_clear_object (&written);
  assert_folder_holds (names);
  remove_files (names);
}

/* ---- through the CLI, changed while lpipe runs --------------------------- */

typedef enum {
  TRUNCATE,           /* between two tensors' reads */
  TRUNCATE_MID_READ,  /* while a tensor's pages are being read */
  REWRITE,
} Change;

/* Where @pid maps @file (its /proc/PID/maps line), or 0. */
static guintptr
mapping_start (GPid        pid,
               const char *file)
{
  g_autofree char *maps_path = g_strdup_printf ("/proc/%d/maps", (int) pid);
  g_autofree char *text = NULL;
  g_auto(GStrv) lines = NULL;

  if (!g_file_get_contents (maps_path, &text, NULL, NULL))
    return 0;
  lines = g_strsplit (text, "\n", -1);
  for (guint i = 0; lines[i]; i++)
    if (g_str_has_suffix (lines[i], file))
      return g_ascii_strtoull (lines[i], NULL, 16);
  return 0;
}

/* How many of the first @n_pages pages of @pid's mapping at @start are
 * present in its page table (/proc/PID/pagemap, bit 63): they appear as a
 * stage reads the tensor through the mapping. Cheaper than smaps, which
 * walks every mapping (and a sanitizer's shadow memory is huge). */
static guint
pages_present (GPid     pid,
               guintptr start,
               guint    n_pages)
{
  g_autofree char *path = g_strdup_printf ("/proc/%d/pagemap", (int) pid);
  g_autofree guint64 *entries = g_new0 (guint64, n_pages);
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  ssize_t n;
  guint present = 0;

  if (fd < 0)
    return 0;
  n = pread (fd, entries, n_pages * sizeof (guint64), (start / 4096) * sizeof (guint64));
  close (fd);
  for (ssize_t i = 0; i < n / (ssize_t) sizeof (guint64); i++)
    present += (entries[i] >> 63) & 1;
  return present;
}

static void
test_cli_changed_during_run (gconstpointer data)
{
  Change change = GPOINTER_TO_INT (data);
  static const char *names[] = { "in.safetensors", "out.safetensors", NULL };
  /* One big tensor (68 MiB) read while it is cut, or four read one after
   * the other. */
  g_autofree char *in = change == TRUNCATE_MID_READ
                        ? write_input_sized ("in.safetensors", 1, 4 * BIG_ELEMENTS)
                        : write_input ("in.safetensors", 4);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autofree char *in_arg = g_strconcat ("location=", in, NULL);
  g_autofree char *out_arg = g_strconcat ("location=", out, NULL);
  /* One thread: the tensors are read one after the other, so when the
   * first is being written the others are still to be read. */
  const char *args[] = { "--quiet", "--threads", "1", "launch", "safetensors-source", in_arg,
                         "!", "cast", "dtype=f32", "!", "safetensors-sink", out_arg, NULL };
  g_autofree char *err = NULL;
  gint64 deadline = g_get_monotonic_time () + 60 * G_USEC_PER_SEC;
  guint64 start = data_start (in);
  guintptr map_start = 0;
  LpTestRun run;
  int status;

  write_old_output (out);
  run = lp_test_spawn_lpipe (args, NULL);
  /* Until the first big tensor is being written (f32: 2 × 17 MiB), or, for
   * the cut mid-read, until 8 MiB of the 68 have been read through the
   * mapping. */
  for (;;)
    {
      g_autofree char *temp = lp_test_find_temp_fd (run.pid, dir, "out.safetensors");
      GStatBuf st;

      if (change == TRUNCATE_MID_READ && map_start == 0)
        map_start = mapping_start (run.pid, "/in.safetensors");
      if (change == TRUNCATE_MID_READ && map_start != 0
          && pages_present (run.pid, map_start, 8 * BIG_ELEMENTS / 4096) >= 2048)
        break;
      if (change != TRUNCATE_MID_READ && temp && g_stat (temp, &st) == 0
          && (goffset) st.st_blocks * 512 >= (1 << 20))
        break;
      g_assert_cmpint (waitpid (run.pid, &status, WNOHANG), ==, 0);
      g_assert_cmpint (g_get_monotonic_time (), <, deadline);
      g_usleep (200);
    }
  if (change != REWRITE)
    g_assert_cmpint (truncate (in, start + 16), ==, 0);
  else
    {
      /* The last tensor's first MiB, rewritten with other values. */
      g_autofree guchar *junk = g_malloc (1 << 20);
      int fd = open (in, O_WRONLY | O_CLOEXEC);

      memset (junk, 0x55, 1 << 20);
      g_assert_cmpint (fd, >=, 0);
      g_assert_cmpint (pwrite (fd, junk, 1 << 20, start + 16 + 3 * 2 * (guint64) BIG_ELEMENTS),
                       ==, 1 << 20);
      g_assert_cmpint (close (fd), ==, 0);
    }
  status = lp_test_wait_lpipe (&run, 120, &err);

  g_test_message ("status %d, stderr: %s", status, err);
  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 1);
  g_assert_nonnull (strstr (err, "in.safetensors"));
  if (change != REWRITE)
    {
      g_assert_nonnull (strstr (err, "shortened while open"));
      g_assert_nonnull (strstr (err, "tensor 'big"));
    }
  else
    g_assert_nonnull (strstr (err, "changed while it was read"));
  g_assert_null (strstr (err, "CRITICAL"));
  assert_old_output (out);
  assert_folder_holds (names);
  remove_files (names);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  dir = lp_test_make_tmpdir ();

  g_test_add_func ("/input-changes/truncated-under-mapping", test_truncated_under_mapping);
  g_test_add_func ("/input-changes/truncated-before-read", test_truncated_before_read);
  g_test_add_func ("/input-changes/rewritten-in-place", test_rewritten_in_place);
  g_test_add_func ("/input-changes/replaced-is-consistent", test_replaced_is_consistent);
  if (g_getenv ("LPIPE") != NULL)
    {
      g_test_add_data_func ("/input-changes/cli/truncated-during-run", GINT_TO_POINTER (TRUNCATE),
                            test_cli_changed_during_run);
      g_test_add_data_func ("/input-changes/cli/truncated-mid-read",
                            GINT_TO_POINTER (TRUNCATE_MID_READ), test_cli_changed_during_run);
      g_test_add_data_func ("/input-changes/cli/rewritten-during-run", GINT_TO_POINTER (REWRITE),
                            test_cli_changed_during_run);
    }
  return g_test_run ();
}
