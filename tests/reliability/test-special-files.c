/* test-special-files.c: the CLI on outputs and inputs that are not regular
 * files
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Run as root, `safetensors-sink location=/dev/null` once replaced the
 * device node with a regular file (everything writing to /dev/null then
 * filled a file), and a FIFO as `safetensors-source location` blocked in
 * open() for ever. The rule now (see docs/guide.md, "Where the output
 * goes"): a FIFO or a character device is written through as a stream, a
 * symlink is followed and its target replaced atomically, a block device,
 * a socket or a directory is refused; an input must be a regular file.
 *
 * Every node here is made in a temporary folder (mknod, mkfifo, bind),
 * never in the real /dev.
 */
#include "lp-test-util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

/* No run here takes more than a few seconds; a hang fails the test. */
#define TIMEOUT_S 60

static char *dir;

/* A small PEFT LoRA: 2 MB of tensors and an adapter config, which a stream
 * output must not lead to a file beside the device. */
static const char *synth_args[] = {
  "-q", "launch", "lora-synth", "preset=sd15-unet", "rank=4", "format=peft",
  "!", "safetensors-sink", NULL /* location=... */, NULL
};

static int
run_synth (const char  *location,
           char       **err_text)
{
  g_autofree char *arg = g_strconcat ("location=", location, NULL);
  LpTestRun run;

  synth_args[G_N_ELEMENTS (synth_args) - 2] = arg;
  run = lp_test_spawn_lpipe (synth_args, NULL);
  return lp_test_wait_lpipe (&run, TIMEOUT_S, err_text);
}

static char *
make_node (const char *name,
           mode_t      mode,
           dev_t       dev)
{
  char *path = g_build_filename (dir, name, NULL);

  g_unlink (path);
  if (mknod (path, mode | 0666, dev) != 0)
    g_error ("mknod %s: %s", path, g_strerror (errno));
  return path;
}

static void
assert_node (const char *path,
             mode_t      type,
             dev_t       dev)
{
  struct stat st;

  g_assert_cmpint (lstat (path, &st), ==, 0);
  g_assert_cmpuint (st.st_mode & S_IFMT, ==, type);
  if (type == S_IFCHR || type == S_IFBLK)
    g_assert_cmpuint (st.st_rdev, ==, dev);
}

/* Nothing but the names given in the folder: no temporary file, no
 * adapter config beside a device. */
static void
assert_dir_holds (const char * const *names)
{
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  const char *name;

  while ((name = g_dir_read_name (d)))
    if (!g_strv_contains (names, name))
      g_error ("unexpected file left in the folder: %s", name);
}

static void
clear_dir (void)
{
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  const char *name;

  while ((name = g_dir_read_name (d)))
    {
      g_autofree char *path = g_build_filename (dir, name, NULL);
      if (g_unlink (path) != 0)
        g_rmdir (path);
    }
}

static void
assert_exit (int status,
             int code,
             const char *err)
{
  if (!WIFEXITED (status) || WEXITSTATUS (status) != code)
    g_error ("expected exit %d, got wait status 0x%x; stderr: %s", code, status, err);
}

/* ---- outputs ------------------------------------------------------------ */

static void
test_output_null_device (void)
{
  g_autofree char *null = make_node ("null", S_IFCHR, makedev (1, 3));
  g_autofree char *err = NULL;
  const char *left[] = { "null", NULL };
  int status = run_synth (null, &err);

  assert_exit (status, 0, err);
  assert_node (null, S_IFCHR, makedev (1, 3));
  assert_dir_holds (left);
  clear_dir ();
}

static void
test_output_full_device (void)
{
  g_autofree char *full = make_node ("full", S_IFCHR, makedev (1, 7));
  g_autofree char *err = NULL;
  const char *left[] = { "full", NULL };
  int status = run_synth (full, &err);

  assert_exit (status, 1, err);
  g_assert_nonnull (strstr (err, full));
  g_assert_nonnull (strstr (err, g_strerror (ENOSPC)));
  assert_node (full, S_IFCHR, makedev (1, 7));
  assert_dir_holds (left);
  clear_dir ();
}

typedef struct {
  char *path;
  gsize stop_after;     /* 0: read to the end */
  GByteArray *got;
} FifoReader;

static gpointer
read_fifo (gpointer data)
{
  FifoReader *r = data;
  int fd = open (r->path, O_RDONLY);
  guchar buf[65536];
  ssize_t n;

  g_assert_cmpint (fd, >=, 0);
  while ((n = read (fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
    {
      if (n > 0)
        g_byte_array_append (r->got, buf, n);
      if (r->stop_after && r->got->len >= r->stop_after)
        break;
    }
  close (fd);
  return NULL;
}

static void
test_output_fifo (void)
{
  g_autofree char *fifo = g_build_filename (dir, "fifo", NULL);
  g_autofree char *err = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = NULL;
  g_autoptr(LpCheckpoint) ckpt = NULL;
  FifoReader r = { fifo, 0, g_byte_array_new () };
  const char *left[] = { "fifo", NULL };
  GThread *reader;
  int status;

  g_assert_cmpint (mkfifo (fifo, 0644), ==, 0);
  reader = g_thread_new ("reader", read_fifo, &r);
  status = run_synth (fifo, &err);
  g_thread_join (reader);

  assert_exit (status, 0, err);
  assert_node (fifo, S_IFIFO, 0);
  assert_dir_holds (left);
  /* What came through the FIFO is the whole file. */
  bytes = g_byte_array_free_to_bytes (r.got);
  ckpt = lp_safetensors_load_from_bytes (bytes, "the FIFO's bytes", &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (ckpt), ==, 256);
  clear_dir ();
}

/* The reader goes away after 100 bytes: an error, not death by SIGPIPE. */
static void
test_output_fifo_reader_closes (void)
{
  g_autofree char *fifo = g_build_filename (dir, "fifo", NULL);
  g_autofree char *err = NULL;
  FifoReader r = { fifo, 100, g_byte_array_new () };
  GThread *reader;
  int status;

  g_assert_cmpint (mkfifo (fifo, 0644), ==, 0);
  reader = g_thread_new ("reader", read_fifo, &r);
  status = run_synth (fifo, &err);
  g_thread_join (reader);
  g_byte_array_unref (r.got);

  assert_exit (status, 1, err);
  g_assert_nonnull (strstr (err, fifo));
  g_assert_nonnull (strstr (err, g_strerror (EPIPE)));
  assert_node (fifo, S_IFIFO, 0);
  clear_dir ();
}

/* Nobody reads: the run waits for a reader, as a shell would, but SIGTERM
 * ends the wait. */
static void
test_output_fifo_no_reader (void)
{
  g_autofree char *fifo = g_build_filename (dir, "fifo", NULL);
  g_autofree char *arg = g_strconcat ("location=", fifo, NULL);
  g_autofree char *err = NULL;
  LpTestRun run;
  int status;

  g_assert_cmpint (mkfifo (fifo, 0644), ==, 0);
  synth_args[G_N_ELEMENTS (synth_args) - 2] = arg;
  run = lp_test_spawn_lpipe (synth_args, NULL);
  g_usleep (G_USEC_PER_SEC / 2);
  kill (run.pid, SIGTERM);
  status = lp_test_wait_lpipe (&run, 10, &err);

  assert_exit (status, 143, err);
  assert_node (fifo, S_IFIFO, 0);
  clear_dir ();
}

static void
test_output_refused (gconstpointer data)
{
  const char *kind = data;
  g_autofree char *path = g_build_filename (dir, "out", NULL);
  g_autofree char *err = NULL;
  g_autofree char *expected = g_strdup_printf ("it is %s", kind);
  mode_t type;
  int status;

  if (strcmp (kind, "a block device") == 0)
    {
      g_free (make_node ("out", S_IFBLK, makedev (7, 0)));
      type = S_IFBLK;
    }
  else if (strcmp (kind, "a socket") == 0)
    {
      struct sockaddr_un addr = { .sun_family = AF_UNIX };
      int fd = socket (AF_UNIX, SOCK_STREAM, 0);

      g_assert_cmpuint (strlen (path), <, sizeof addr.sun_path);
      strcpy (addr.sun_path, path);
      g_assert_cmpint (bind (fd, (struct sockaddr *) &addr, sizeof addr), ==, 0);
      close (fd);
      type = S_IFSOCK;
    }
  else
    {
      g_assert_cmpint (g_mkdir (path, 0755), ==, 0);
      type = S_IFDIR;
    }

  status = run_synth (path, &err);
  assert_exit (status, 1, err);
  g_assert_nonnull (strstr (err, path));
  g_assert_nonnull (strstr (err, expected));
  assert_node (path, type, makedev (7, 0));
  clear_dir ();
}

/* A symlinked output is written through to its target, atomically: the
 * link stays, the target holds the new file, nothing else is left. */
static void
test_output_symlink (void)
{
  g_autofree char *link = g_build_filename (dir, "link.safetensors", NULL);
  g_autofree char *sub = g_build_filename (dir, "sub", NULL);
  g_autofree char *target = g_build_filename (sub, "real.safetensors", NULL);
  g_autofree char *dangling = g_build_filename (dir, "dangling.safetensors", NULL);
  g_autofree char *new_target = g_build_filename (sub, "new.safetensors", NULL);
  g_autofree char *err = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) ckpt = NULL;
  g_autofree char *got = NULL;
  int status;

  g_assert_cmpint (g_mkdir (sub, 0755), ==, 0);
  g_file_set_contents (target, "old", 3, &error);
  g_assert_no_error (error);
  g_assert_cmpint (symlink ("sub/real.safetensors", link), ==, 0);

  status = run_synth (link, &err);
  assert_exit (status, 0, err);
  g_assert_true (g_file_test (link, G_FILE_TEST_IS_SYMLINK));
  got = g_file_read_link (link, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (got, ==, "sub/real.safetensors");
  ckpt = lp_safetensors_load (target, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (ckpt), ==, 256);
  /* The PEFT config goes where a reader of link.safetensors looks for it:
   * beside the name given (as in a Hugging Face cache, where both names are
   * links into blobs/ and each is followed). */
  {
    g_autofree char *config = g_build_filename (dir, "link.adapter_config.json", NULL);
    const char *left_dir[] = { "link.safetensors", "link.adapter_config.json", "sub",
                               "dangling.safetensors", NULL };
    g_assert_true (g_file_test (config, G_FILE_TEST_IS_REGULAR));
    assert_dir_holds (left_dir);
  }

  /* A dangling link: its target is created. */
  g_assert_cmpint (symlink (new_target, dangling), ==, 0);
  g_clear_pointer (&err, g_free);
  status = run_synth (dangling, &err);
  assert_exit (status, 0, err);
  g_assert_true (g_file_test (dangling, G_FILE_TEST_IS_SYMLINK));
  g_assert_true (g_file_test (new_target, G_FILE_TEST_IS_REGULAR));

  g_unlink (target);
  g_unlink (new_target);
  {
    g_autoptr(GDir) d = g_dir_open (sub, 0, NULL);
    const char *name;
    while ((name = g_dir_read_name (d)))
      {
        g_autofree char *path = g_build_filename (sub, name, NULL);
        g_unlink (path);
      }
  }
  clear_dir ();
}

/* /dev/stdout is a link into /proc: the file behind the descriptor is
 * written, not replaced by another under the same name. */
static void
test_output_proc_fd (void)
{
  g_autofree char *out = g_build_filename (dir, "stdout.safetensors", NULL);
  g_autofree char *err = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) ckpt = NULL;
  const char *args[] = { "-q", "launch", "lora-synth", "preset=sd15-unet", "rank=4",
                         "!", "safetensors-sink", "location=/proc/self/fd/1", NULL };
  LpTestRun run = lp_test_spawn_lpipe (args, out);
  int status = lp_test_wait_lpipe (&run, TIMEOUT_S, &err);
  const char *left[] = { "stdout.safetensors", NULL };

  assert_exit (status, 0, err);
  ckpt = lp_safetensors_load (out, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (ckpt), ==, 256);
  assert_dir_holds (left);
  clear_dir ();
}

/* ---- inputs ------------------------------------------------------------- */

static void
test_input_refused (gconstpointer data)
{
  const char *kind = data;
  g_autofree char *path = g_build_filename (dir, "in.safetensors", NULL);
  g_autofree char *src = g_strconcat ("location=", path, NULL);
  g_autofree char *dst = g_strconcat ("location=", dir, "/out.safetensors", NULL);
  g_autofree char *expected = g_strdup_printf ("“%s” is %s, not a safetensors file", path, kind);
  g_autofree char *err = NULL;
  g_autofree char *info_err = NULL;
  const char *args[] = { "-q", "launch", "safetensors-source", src, "!", "safetensors-sink", dst, NULL };
  const char *info_args[] = { "info", path, NULL };
  gboolean is_dir = strcmp (kind, "a directory") == 0;
  LpTestRun run;
  int status;

  if (strcmp (kind, "a FIFO") == 0)
    g_assert_cmpint (mkfifo (path, 0644), ==, 0);
  else if (strcmp (kind, "a character device") == 0)
    g_free (make_node ("in.safetensors", S_IFCHR, makedev (1, 3)));
  else
    g_assert_cmpint (g_mkdir (path, 0755), ==, 0);

  /* A FIFO with no writer: open() would block for ever. */
  run = lp_test_spawn_lpipe (args, NULL);
  status = lp_test_wait_lpipe (&run, TIMEOUT_S, &err);
  assert_exit (status, 1, err);
  g_assert_nonnull (strstr (err, "stage 1 'safetensors-source'"));
  /* (A folder is a sharded checkpoint to the source, and this one has no
   * index.) */
  g_assert_nonnull (strstr (err, is_dir ? path : expected));

  run = lp_test_spawn_lpipe (info_args, NULL);
  status = lp_test_wait_lpipe (&run, TIMEOUT_S, &info_err);
  assert_exit (status, 1, info_err);
  /* (`lpipe info` takes a folder for a PEFT folder, and says so.) */
  g_assert_nonnull (strstr (info_err, path));
  g_assert_nonnull (strstr (info_err, "not a safetensors file"));
  clear_dir ();
}

/* The adapter config beside an input (issue #11 item 9): once any file a
 * link pointed to was read and its text copied beside the output. Now a
 * link is followed only to a regular file (Hugging Face's cache links every
 * file), and the text must be an adapter's config; a FIFO, a device, a
 * folder or a huge file is refused by name, and nothing blocks. */
static void
run_with_config (const char *expected)
{
  g_autofree char *src = g_strconcat ("location=", dir, "/in/lora.safetensors", NULL);
  g_autofree char *dst = g_strconcat ("location=", dir, "/out.safetensors", NULL);
  g_autofree char *out_config = g_build_filename (dir, "out.adapter_config.json", NULL);
  const char *args[] = { "-q", "launch", "safetensors-source", src, "!", "safetensors-sink", dst, NULL };
  g_autofree char *err = NULL;
  LpTestRun run = lp_test_spawn_lpipe (args, NULL);
  int status = lp_test_wait_lpipe (&run, TIMEOUT_S, &err);

  if (expected == NULL)
    {
      assert_exit (status, 0, err);
      g_assert_true (g_file_test (out_config, G_FILE_TEST_IS_REGULAR));
    }
  else
    {
      assert_exit (status, 1, err);
      g_assert_nonnull (strstr (err, "lora.adapter_config.json"));
      g_assert_nonnull (strstr (err, expected));
      g_assert_false (g_file_test (out_config, G_FILE_TEST_EXISTS));
    }
  g_unlink (out_config);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_unlink (out);
}

static void
test_input_config (void)
{
  g_autofree char *in = g_build_filename (dir, "in", NULL);
  g_autofree char *lora = g_build_filename (in, "lora.safetensors", NULL);
  g_autofree char *config = g_build_filename (in, "lora.adapter_config.json", NULL);
  g_autofree char *blob = g_build_filename (dir, "blob.json", NULL);
  g_autofree char *secret = g_build_filename (dir, "secret.json", NULL);
  g_autofree char *huge = NULL;
  g_autofree char *err = NULL;

  g_assert_cmpint (g_mkdir (in, 0755), ==, 0);
  g_assert_cmpint (run_synth (lora, &err), ==, 0);
  /* as PEFT writes it, moved into a cache blob the config links to */
  g_assert_cmpint (g_rename (config, blob), ==, 0);
  g_assert_cmpint (symlink (blob, config), ==, 0);
  run_with_config (NULL);

  g_assert_true (g_file_set_contents (secret, "{\"password\": \"hunter2\"}", -1, NULL));
  g_unlink (config);
  g_assert_cmpint (symlink (secret, config), ==, 0);
  run_with_config ("not an adapter config");

  g_unlink (config);
  g_assert_cmpint (mkfifo (config, 0644), ==, 0);
  run_with_config ("not a regular file");

  g_unlink (config);
  g_free (make_node ("in/lora.adapter_config.json", S_IFCHR, makedev (1, 5)));   /* a /dev/zero */
  run_with_config ("not a regular file");

  g_unlink (config);
  g_assert_cmpint (g_mkdir (config, 0755), ==, 0);
  run_with_config ("not a regular file");

  g_rmdir (config);
  huge = g_strnfill (2 << 20, ' ');
  huge[0] = '{';
  huge[(2 << 20) - 1] = '}';
  g_assert_true (g_file_set_contents (config, huge, -1, NULL));
  run_with_config ("more than any adapter config");
  g_unlink (config);
  g_unlink (lora);
  g_rmdir (in);
  clear_dir ();
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  if (g_getenv ("LPIPE") == NULL)
    {
      g_printerr ("LPIPE is not set: run through `meson test`\n");
      return 77;
    }
  if (geteuid () != 0)
    {
      g_printerr ("making device nodes needs root\n");
      return 77;
    }
  dir = lp_test_make_tmpdir ();

  g_test_add_func ("/special-files/output/null-device", test_output_null_device);
  g_test_add_func ("/special-files/output/full-device", test_output_full_device);
  g_test_add_func ("/special-files/output/fifo", test_output_fifo);
  g_test_add_func ("/special-files/output/fifo-reader-closes", test_output_fifo_reader_closes);
  g_test_add_func ("/special-files/output/fifo-no-reader", test_output_fifo_no_reader);
  g_test_add_data_func ("/special-files/output/block-device", "a block device", test_output_refused);
  g_test_add_data_func ("/special-files/output/socket", "a socket", test_output_refused);
  g_test_add_data_func ("/special-files/output/directory", "a directory", test_output_refused);
  g_test_add_func ("/special-files/output/symlink", test_output_symlink);
  g_test_add_func ("/special-files/output/proc-fd", test_output_proc_fd);
  g_test_add_data_func ("/special-files/input/fifo", "a FIFO", test_input_refused);
  g_test_add_data_func ("/special-files/input/char-device", "a character device", test_input_refused);
  g_test_add_data_func ("/special-files/input/directory", "a directory", test_input_refused);
  g_test_add_func ("/special-files/input/adapter-config", test_input_config);
  return g_test_run ();
}
