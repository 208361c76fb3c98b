/* test-hostile-files.c: bombs in safetensors files, through the real CLI
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The reader's rules are checked one by one on bytes in memory by
 * tests/core/test-safetensors.c. Here the question is the cost of a
 * rejection: a small file on disk that claims terabytes of tensors or a
 * 100 MB header must be refused from what the file holds, before anything
 * of the claimed size is allocated. Each file is given to `lpipe info` and to
 * a `lpipe launch` that would copy it; the child's peak RSS (from wait4) and
 * time are compared with those of the same command on an empty file.
 */
#include "lp-test-util.h"

#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

/* Peak RSS a rejection may add over reading an empty file: far below every
 * size claimed here (the smallest is 100 MB). */
#define RSS_ALLOWANCE_KB (24 * 1024)

static char *dir;

typedef struct {
  int exit_status;
  char *err;
  long max_rss_kb;
  double seconds;
} Result;

static void
result_clear (Result *r)
{
  g_clear_pointer (&r->err, g_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (Result, result_clear)

static void
run_lpipe (const char * const *args,
           Result             *result)
{
  g_autoptr(GPtrArray) argv = g_ptr_array_new ();
  g_autoptr(GError) error = NULL;
  GString *err = g_string_new (NULL);
  gint64 start = g_get_monotonic_time ();
  struct rusage ru;
  char buf[4096];
  ssize_t n;
  int status;
  int err_fd;
  GPid pid;

  g_ptr_array_add (argv, (char *) g_getenv ("LPIPE"));
  for (guint i = 0; args[i]; i++)
    g_ptr_array_add (argv, (char *) args[i]);
  g_ptr_array_add (argv, NULL);
  g_spawn_async_with_pipes (NULL, (char **) argv->pdata, NULL,
                            G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDOUT_TO_DEV_NULL,
                            NULL, NULL, &pid, NULL, NULL, &err_fd, &error);
  g_assert_no_error (error);
  while ((n = read (err_fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
    if (n > 0)
      g_string_append_len (err, buf, n);
  close (err_fd);
  while (wait4 (pid, &status, 0, &ru) < 0)
    g_assert_cmpint (errno, ==, EINTR);
  g_spawn_close_pid (pid);

  g_assert_true (WIFEXITED (status));
  result->exit_status = WEXITSTATUS (status);
  result->err = g_string_free (err, FALSE);
  result->max_rss_kb = ru.ru_maxrss;
  result->seconds = (g_get_monotonic_time () - start) / (double) G_USEC_PER_SEC;
}

static char *
write_file (const char *name,
            const char *header,
            guint64     claimed_len,
            gsize       data_len)
{
  g_autoptr(GError) error = NULL;
  char *path = g_build_filename (dir, name, NULL);
  GString *s = g_string_new (NULL);
  guint64 n = claimed_len ? claimed_len : strlen (header);

  for (int i = 0; i < 8; i++)
    g_string_append_c (s, (char) ((n >> (8 * i)) & 0xff));
  g_string_append (s, header);
  for (gsize i = 0; i < data_len; i++)
    g_string_append_c (s, (char) i);
  g_file_set_contents (path, s->str, s->len, &error);
  g_assert_no_error (error);
  g_string_free (s, TRUE);
  return path;
}

/* The cost of reading a valid, empty file: the baseline. */
static Result baseline_info, baseline_copy;

static void
measure_baseline (void)
{
  g_autofree char *empty = write_file ("empty.safetensors", "{}      ", 0, 0);
  g_autofree char *src = g_strconcat ("location=", empty, NULL);
  g_autofree char *out = g_build_filename (dir, "baseline-out.safetensors", NULL);
  g_autofree char *dst = g_strconcat ("location=", out, NULL);
  const char *info[] = { "info", empty, NULL };
  const char *copy[] = { "-q", "launch", "safetensors-source", src, "!", "safetensors-sink", dst, NULL };

  run_lpipe (info, &baseline_info);
  g_assert_cmpint (baseline_info.exit_status, ==, 0);
  run_lpipe (copy, &baseline_copy);
  g_assert_cmpint (baseline_copy.exit_status, ==, 0);
  g_test_message ("baseline: info %ld kB, copy %ld kB", baseline_info.max_rss_kb,
                  baseline_copy.max_rss_kb);
}

typedef struct {
  const char *name;
  const char *header;
  guint64 claimed_len;     /* 0: the header's length */
  gsize data_len;
  const char *fragment;    /* in the error message */
} Bomb;

static const Bomb bombs[] = {
  /* A tensor of 2^40 F32 (4 TiB) with offsets to match, in a 100-byte file. */
  { "shape-2^40", "{\"t\":{\"dtype\":\"F32\",\"shape\":[1099511627776],"
    "\"data_offsets\":[0,4398046511104]}}", 0, 100, "4398046511104" },
  /* The same spread over dimensions, each small. */
  { "dims-2^60", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1024,1024,1024,1024,1024,1024],"
    "\"data_offsets\":[0,1152921504606846976]}}", 0, 64, "1152921504606846976" },
  /* Many tensors claiming 1 GiB each. */
  { "many-gib", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1073741824],\"data_offsets\":[0,1073741824]},"
    "\"b\":{\"dtype\":\"U8\",\"shape\":[1073741824],\"data_offsets\":[1073741824,2147483648]},"
    "\"c\":{\"dtype\":\"U8\",\"shape\":[1073741824],\"data_offsets\":[2147483648,3221225472]}}",
    0, 16, "3221225472" },
  /* The largest header length allowed, in a 16-byte file. */
  { "header-length-1e8", "{}      ", 100000000, 0, "100000000" },
  /* Just above it. */
  { "header-length-1e8+1", "{}      ", 100000001, 0, "100000001" },
  /* A length whose 8 + N wraps around. */
  { "header-length-wraps", "{}      ", G_MAXUINT64 - 3, 0, "18446744073709551612" },
  /* A shape whose byte size overflows 64 bits only once multiplied by the
   * dtype's size. */
  { "bytes-overflow", "{\"t\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],"
    "\"data_offsets\":[0,0]}}", 0, 0, "overflow" },
};

static void
assert_cheap_rejection (const Result *r,
                        const Result *baseline,
                        const char   *path,
                        const char   *fragment)
{
  g_test_message ("exit %d, %ld kB (baseline %ld kB), %.3f s: %s", r->exit_status,
                  r->max_rss_kb, baseline->max_rss_kb, r->seconds, r->err);
  g_assert_cmpint (r->exit_status, ==, 1);
  g_assert_nonnull (strstr (r->err, path));
  g_assert_nonnull (strstr (r->err, fragment));
  g_assert_cmpint (r->max_rss_kb, <=, baseline->max_rss_kb + RSS_ALLOWANCE_KB);
  /* Rejection reads a few bytes: generous for a loaded CI machine. */
  g_assert_cmpfloat (r->seconds, <, baseline->seconds + 5.0);
}

static void
test_bomb (gconstpointer data)
{
  const Bomb *b = data;
  g_autofree char *file = g_strconcat (b->name, ".safetensors", NULL);
  g_autofree char *path = write_file (file, b->header, b->claimed_len, b->data_len);
  g_autofree char *src = g_strconcat ("location=", path, NULL);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autofree char *dst = g_strconcat ("location=", out, NULL);
  const char *info[] = { "info", path, NULL };
  const char *copy[] = { "-q", "launch", "safetensors-source", src, "!", "safetensors-sink", dst, NULL };
  g_auto(Result) r1 = { 0 };
  g_auto(Result) r2 = { 0 };

  run_lpipe (info, &r1);
  assert_cheap_rejection (&r1, &baseline_info, path, b->fragment);
  run_lpipe (copy, &r2);
  assert_cheap_rejection (&r2, &baseline_copy, path, b->fragment);
  /* Nothing was written. */
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
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
  dir = lp_test_make_tmpdir ();
  measure_baseline ();
  for (guint i = 0; i < G_N_ELEMENTS (bombs); i++)
    {
      g_autofree char *path = g_strdup_printf ("/hostile-files/%s", bombs[i].name);
      g_test_add_data_func (path, &bombs[i], test_bomb);
    }
  return g_test_run ();
}
