/* test-crash-safety.c: what a killed, interrupted or starved `lpipe` run
 * leaves at its output path
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A tool that rewrites people's only copy of a LoRA must never lose it. Each
 * test runs the real CLI ($LPIPE) over an existing output and interferes with
 * it: SIGKILL at several points of the write, SIGINT and SIGTERM mid-write,
 * a file size limit (`ulimit -f`) standing in for a full disk, and the output
 * written over the input. Afterwards the output path must hold the old file
 * byte for byte or the complete new one; a cancelled or failed run must also
 * leave no temporary file.
 *
 * The points of interference are found by watching the sink's temporary file
 * grow, so the tests do not depend on the machine's speed. The file is found
 * through the child's open descriptors (/proc/PID/fd): an unnamed O_TMPFILE
 * in the output's folder (`#INODE (deleted)`) or a named .NAME.* beside it.
 * SIGKILL, SIGINT, SIGTERM and SIGHUP all leave no temporary file, and a run
 * removes the stale ones a killed run of the old naming scheme could leave.
 */
#include "lp-test-util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

#define OUT_NAME "lora.safetensors"


typedef struct {
  char *dir;
  char *out;          /* dir/lora.safetensors */
  char *old_ref;      /* what a finished run with seed=1 writes to out */
  char *new_ref;      /* ... with seed=2 */
  goffset new_size;
} Fixture;

static Fixture fx;

/* ---- running lpipe ------------------------------------------------------ */

typedef struct {
  GPid pid;
  int err_fd;
} Run;

static rlim_t child_fsize_limit;

static void
child_setup (gpointer user_data)
{
  if (child_fsize_limit != 0)
    {
      struct rlimit rl = { child_fsize_limit, child_fsize_limit };

      setrlimit (RLIMIT_FSIZE, &rl);
    }
}

static Run
start_lpipe (const char * const *args,
             rlim_t              fsize_limit)
{
  g_autoptr(GPtrArray) argv = g_ptr_array_new ();
  g_autoptr(GError) error = NULL;
  const char *lpipe = g_getenv ("LPIPE");
  Run run = { 0, -1 };

  g_assert_nonnull (lpipe);
  g_ptr_array_add (argv, (char *) lpipe);
  g_ptr_array_add (argv, (char *) "--quiet");
  for (guint i = 0; args[i]; i++)
    g_ptr_array_add (argv, (char *) args[i]);
  g_ptr_array_add (argv, NULL);

  child_fsize_limit = fsize_limit;
  g_spawn_async_with_pipes (NULL, (char **) argv->pdata, NULL,
                            G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDOUT_TO_DEV_NULL,
                            child_setup, NULL, &run.pid, NULL, NULL, &run.err_fd, &error);
  g_assert_no_error (error);
  return run;
}

/* Waits for @run; returns the wait status and the standard error. */
static int
finish_lpipe (Run   *run,
              char **err_text)
{
  GString *err = g_string_new (NULL);
  char buf[4096];
  ssize_t n;
  int status = 0;

  while ((n = read (run->err_fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
    if (n > 0)
      g_string_append_len (err, buf, n);
  close (run->err_fd);
  while (waitpid (run->pid, &status, 0) < 0)
    g_assert_cmpint (errno, ==, EINTR);
  g_spawn_close_pid (run->pid);
  if (err_text)
    *err_text = g_string_free (err, FALSE);
  else
    g_string_free (err, TRUE);
  return status;
}

static void
run_lpipe_ok (const char * const *args)
{
  Run run = start_lpipe (args, 0);
  g_autofree char *err = NULL;
  int status = finish_lpipe (&run, &err);

  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0)
    g_error ("lpipe failed (status %d): %s", status, err);
}

/* Big enough to be caught mid-write (86 MB), small enough to keep each test
 * within seconds; two seeds make an old and a new file of equal size:
 * lpipe launch lora-synth ... seed=@seed ! safetensors-sink location=@location */
static const char * const *
synth_args (const char *seed,
            const char *location)
{
  static char seed_arg[32];
  static char *location_arg;
  static const char *args[] = {
    "launch", "lora-synth", "preset=flux-dev", "rank=8", "dtype=bf16", NULL,
    "!", "safetensors-sink", NULL, NULL
  };

  g_snprintf (seed_arg, sizeof seed_arg, "seed=%s", seed);
  g_free (location_arg);
  location_arg = g_strconcat ("location=", location, NULL);
  args[5] = seed_arg;
  args[8] = location_arg;
  return args;
}

/* ---- looking at the output ---------------------------------------------- */

/* The sink's temporary files beside the output: .lora.safetensors.XXXXXX */
static GPtrArray *
list_temp_files (const char *dir,
                 const char *base)
{
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  g_autofree char *prefix = g_strconcat (".", base, ".", NULL);
  GPtrArray *found = g_ptr_array_new_with_free_func (g_free);
  const char *name;

  g_assert_nonnull (d);
  while ((name = g_dir_read_name (d)))
    if (g_str_has_prefix (name, prefix))
      g_ptr_array_add (found, g_build_filename (dir, name, NULL));
  return found;
}

static void
assert_no_temp_files (const char *dir,
                      const char *base)
{
  g_autoptr(GPtrArray) found = list_temp_files (dir, base);

  if (found->len > 0)
    g_error ("temporary file left behind: %s", (char *) found->pdata[0]);
}

static void
remove_temp_files (const char *dir,
                   const char *base)
{
  g_autoptr(GPtrArray) found = list_temp_files (dir, base);

  for (guint i = 0; i < found->len; i++)
    g_unlink (found->pdata[i]);
}

static gboolean
same_bytes (const char *a,
            const char *b)
{
  g_autoptr(GMappedFile) ma = g_mapped_file_new (a, FALSE, NULL);
  g_autoptr(GMappedFile) mb = g_mapped_file_new (b, FALSE, NULL);

  g_assert_nonnull (ma);
  g_assert_nonnull (mb);
  return g_mapped_file_get_length (ma) == g_mapped_file_get_length (mb) &&
         memcmp (g_mapped_file_get_contents (ma), g_mapped_file_get_contents (mb),
                 g_mapped_file_get_length (ma)) == 0;
}

/* Same tensors (names, dtypes, shapes, bytes); metadata may differ (the
 * provenance names the command line). */
static gboolean
same_tensors (const char *a,
              const char *b)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) ca = lp_safetensors_load (a, &error);
  g_autoptr(LpCheckpoint) cb = NULL;

  g_assert_no_error (error);
  cb = lp_safetensors_load (b, &error);
  g_assert_no_error (error);
  if (lp_checkpoint_get_n_tensors (ca) != lp_checkpoint_get_n_tensors (cb))
    return FALSE;
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (ca); i++)
    {
      LpTensor *x = lp_checkpoint_get_tensor (ca, i);
      LpTensor *y = lp_checkpoint_get_tensor (cb, i);
      guint nx, ny;
      const guint64 *sx = lp_tensor_get_shape (x, &nx);
      const guint64 *sy = lp_tensor_get_shape (y, &ny);
      g_autoptr(GBytes) dx = NULL;
      g_autoptr(GBytes) dy = NULL;

      if (g_strcmp0 (lp_tensor_get_name (x), lp_tensor_get_name (y)) != 0 ||
          lp_tensor_get_dtype (x) != lp_tensor_get_dtype (y) ||
          nx != ny || memcmp (sx, sy, nx * sizeof (guint64)) != 0)
        return FALSE;
      dx = lp_tensor_dup_data (x, &error);
      g_assert_no_error (error);
      dy = lp_tensor_dup_data (y, &error);
      g_assert_no_error (error);
      if (!g_bytes_equal (dx, dy))
        return FALSE;
    }
  return TRUE;
}

/* `lpipe info` accepts the file: it is a complete safetensors file. */
static void
assert_lpipe_info_ok (const char *path)
{
  const char *args[] = { "info", path, NULL };

  run_lpipe_ok (args);
}

static void
copy_file (const char *from,
           const char *to)
{
  g_autoptr(GFile) a = g_file_new_for_path (from);
  g_autoptr(GFile) b = g_file_new_for_path (to);
  g_autoptr(GError) error = NULL;

  g_file_copy (a, b, G_FILE_COPY_OVERWRITE, NULL, NULL, NULL, &error);
  g_assert_no_error (error);
}

/* Bytes written so far: the sink writes tensors in parallel at their
 * offsets, so the size alone runs ahead of a file with holes; the allocated
 * blocks do not. */
static goffset
written_bytes (const char *path)
{
  GStatBuf st;

  if (g_stat (path, &st) != 0)
    return -1;
  return MIN (st.st_size, (goffset) st.st_blocks * 512);
}

static goffset
file_size (const char *path)
{
  GStatBuf st;

  if (g_stat (path, &st) != 0)
    return -1;
  return st.st_size;
}

/* Polls until the temporary output file has reached @fraction of @final_size
 * (0: exists; < 0: don't wait), or has been renamed into place (*renamed). */
static void
wait_for_progress (Run        *run,
                   const char *dir,
                   const char *base,
                   double      fraction,
                   goffset     final_size,
                   gboolean   *renamed)
{
  gboolean seen = FALSE;
  gint64 deadline = g_get_monotonic_time () + 60 * G_USEC_PER_SEC;

  *renamed = FALSE;
  if (fraction < 0)
    return;
  while (g_get_monotonic_time () < deadline)
    {
      g_autofree char *found = lp_test_find_temp_fd (run->pid, dir, base);
      int status;

      if (found != NULL)
        {
          seen = TRUE;
          if (written_bytes (found) >= (goffset) (fraction * final_size))
            return;
        }
      else if (seen)
        {
          *renamed = TRUE;
          return;
        }
      if (waitpid (run->pid, &status, WNOHANG) == run->pid)
        {
          /* Reaped here; finish_lpipe must not wait again. */
          g_error ("lpipe exited (status %d) before the write reached %.0f%%",
                   status, fraction * 100);
        }
      g_usleep (500);
    }
  g_error ("timed out waiting for the output to reach %.0f%%", fraction * 100);
}

/* ---- the fixture: an old and a new file, made once ------------------------ */

static void
fixture_init (void)
{
  fx.dir = lp_test_make_tmpdir ();
  fx.out = g_build_filename (fx.dir, OUT_NAME, NULL);
  fx.old_ref = g_build_filename (fx.dir, "old.ref", NULL);
  fx.new_ref = g_build_filename (fx.dir, "new.ref", NULL);

  /* The same command line gives the same bytes (the provenance records it),
   * so references are written to the output path and moved aside. */
  run_lpipe_ok (synth_args ("2", fx.out));
  g_assert_cmpint (g_rename (fx.out, fx.new_ref), ==, 0);
  run_lpipe_ok (synth_args ("1", fx.out));
  g_assert_cmpint (g_rename (fx.out, fx.old_ref), ==, 0);
  fx.new_size = file_size (fx.new_ref);
  g_assert_cmpint (fx.new_size, >, 50 * 1000 * 1000);
  g_assert_false (same_bytes (fx.old_ref, fx.new_ref));
}

/* Puts the old file at the output path, as a user's existing file. */
static void
reset_output (void)
{
  remove_temp_files (fx.dir, OUT_NAME);
  copy_file (fx.old_ref, fx.out);
}

/* ---- SIGKILL at several points ------------------------------------------- */

typedef struct {
  const char *name;
  double fraction;   /* < 0: at once; 0: temp file created; 1: fully written;
                      * above 1: renamed into place */
} KillPoint;

static const KillPoint kill_points[] = {
  { "at-start", -1 },
  { "temp-created", 0.0 },
  { "written-10", 0.10 },
  { "written-50", 0.50 },
  { "written-90", 0.90 },
  { "written-all", 1.0 },      /* written, maybe syncing or renaming */
  { "renamed", 2.0 },          /* the temporary file renamed into place */
};

static void
test_sigkill (gconstpointer data)
{
  const KillPoint *point = data;
  gboolean renamed;
  int status;
  Run run;

  reset_output ();
  run = start_lpipe (synth_args ("2", fx.out), 0);
  wait_for_progress (&run, fx.dir, OUT_NAME, point->fraction, fx.new_size, &renamed);
  {
    g_autofree char *temp = lp_test_find_temp_fd (run.pid, fx.dir, OUT_NAME);
    goffset written = temp ? written_bytes (temp) : 0;

    kill (run.pid, SIGKILL);
    g_test_message ("%s: killed with %" G_GOFFSET_FORMAT " of %" G_GOFFSET_FORMAT " bytes written",
                    point->name, written, fx.new_size);
  }
  status = finish_lpipe (&run, NULL);

  /* Either it was killed, or it had finished just before. */
  g_assert_true ((WIFSIGNALED (status) && WTERMSIG (status) == SIGKILL) ||
                 (WIFEXITED (status) && WEXITSTATUS (status) == 0));
  if (same_bytes (fx.out, fx.old_ref))
    g_test_message ("killed at %s: the old file is intact", point->name);
  else if (same_bytes (fx.out, fx.new_ref))
    g_test_message ("killed at %s: the new file is complete", point->name);
  else
    g_error ("killed at %s: the output is neither the old nor the new file", point->name);
  assert_lpipe_info_ok (fx.out);
  /* Mid-write the old file cannot have been replaced yet; once renamed, the
   * new one is there. */
  if (point->fraction < 1.0 && !renamed)
    g_assert_true (same_bytes (fx.out, fx.old_ref));
  if (renamed)
    g_assert_true (same_bytes (fx.out, fx.new_ref));

  /* Nothing runs after SIGKILL, so nothing may be left to clean up: the
   * temporary file has no name until it is complete. Only in the moment
   * between naming it and the rename can a named one remain, and the next
   * run of the same output removes it. */
  if (point->fraction < 1.0 && !renamed)
    assert_no_temp_files (fx.dir, OUT_NAME);
  run_lpipe_ok (synth_args ("2", fx.out));
  g_assert_true (same_bytes (fx.out, fx.new_ref));
  assert_no_temp_files (fx.dir, OUT_NAME);
}

/* ---- stale temporary files ------------------------------------------------ */

/* What a run killed between naming its temporary file and the rename (or
 * one on a file system without O_TMPFILE) leaves: the next run of the same
 * output removes it, unless a live process holds it (locked), and touches
 * nothing that is not exactly of its naming. */
static void
test_stale_temp_files (void)
{
  static const char *kept_names[] = {
    ".lora.safetensors.lpipe-abc",       /* not 6 random letters */
    ".lora.safetensors.lpipe-abcdefg",
    ".lora.safetensors.backup",          /* not ours */
    ".other.safetensors.lpipe-abcdef",   /* another output's */
  };
  g_autofree char *stale = g_build_filename (fx.dir, ".lora.safetensors.lpipe-Stale1", NULL);
  g_autofree char *live = g_build_filename (fx.dir, ".lora.safetensors.lpipe-Live01", NULL);
  g_autofree char *link = g_build_filename (fx.dir, ".lora.safetensors.lpipe-Link01", NULL);
  int live_fd;

  reset_output ();
  g_assert_true (g_file_set_contents (stale, "partial", -1, NULL));
  g_assert_true (g_file_set_contents (live, "being written", -1, NULL));
  live_fd = open (live, O_RDONLY | O_CLOEXEC);
  g_assert_cmpint (live_fd, >=, 0);
  g_assert_cmpint (flock (live_fd, LOCK_EX), ==, 0);
  g_assert_cmpint (symlink (fx.old_ref, link), ==, 0);
  for (guint i = 0; i < G_N_ELEMENTS (kept_names); i++)
    {
      g_autofree char *path = g_build_filename (fx.dir, kept_names[i], NULL);
      g_assert_true (g_file_set_contents (path, "user's", -1, NULL));
    }

  run_lpipe_ok (synth_args ("2", fx.out));
  g_assert_true (same_bytes (fx.out, fx.new_ref));

  g_assert_false (g_file_test (stale, G_FILE_TEST_EXISTS));
  g_assert_true (g_file_test (live, G_FILE_TEST_EXISTS));
  g_assert_true (g_file_test (link, G_FILE_TEST_IS_SYMLINK));
  g_assert_true (g_file_test (fx.old_ref, G_FILE_TEST_IS_REGULAR));
  for (guint i = 0; i < G_N_ELEMENTS (kept_names); i++)
    {
      g_autofree char *path = g_build_filename (fx.dir, kept_names[i], NULL);
      g_assert_true (g_file_test (path, G_FILE_TEST_EXISTS));
      g_unlink (path);
    }
  close (live_fd);
  g_unlink (live);
  g_unlink (link);
}

/* ---- a file system without O_TMPFILE ------------------------------------ */

/* Runs lpipe with no-tmpfile.so preloaded: O_TMPFILE fails, as on NFS or
 * FUSE, so the temporary file is named (and locked) from the start. */
static Run
start_lpipe_without_tmpfile (const char * const *args)
{
  g_autofree char *shim = g_test_build_filename (G_TEST_BUILT, "reliability", "no-tmpfile.so", NULL);
  g_autofree char *asan = g_strdup (g_getenv ("ASAN_OPTIONS"));
  g_autofree char *asan_child = g_strconcat (asan ? asan : "", asan ? ":" : "",
                                             "verify_asan_link_order=0", NULL);
  Run run;

  g_assert_true (g_file_test (shim, G_FILE_TEST_IS_REGULAR));
  g_setenv ("LD_PRELOAD", shim, TRUE);
  /* A sanitizer's runtime loaded after the shim must not refuse to start. */
  g_setenv ("ASAN_OPTIONS", asan_child, TRUE);
  run = start_lpipe (args, 0);
  g_unsetenv ("LD_PRELOAD");
  if (asan)
    g_setenv ("ASAN_OPTIONS", asan, TRUE);
  else
    g_unsetenv ("ASAN_OPTIONS");
  return run;
}

/* The named temporary file is locked while its run lives; SIGKILL leaves it
 * (nothing runs then), the next run removes it; SIGTERM removes its own. */
static void
test_named_temp_fallback (void)
{
  g_autoptr(GPtrArray) temp = NULL;
  g_autoptr(GPtrArray) left = NULL;
  g_autofree char *err = NULL;
  gboolean renamed;
  int status, fd;
  Run run;

  reset_output ();
  run = start_lpipe_without_tmpfile (synth_args ("2", fx.out));
  wait_for_progress (&run, fx.dir, OUT_NAME, 0.3, fx.new_size, &renamed);
  g_assert_false (renamed);
  temp = list_temp_files (fx.dir, OUT_NAME);
  g_assert_cmpuint (temp->len, ==, 1);
  g_assert_nonnull (strstr (temp->pdata[0], "/." OUT_NAME ".lpipe-"));
  fd = open (temp->pdata[0], O_RDONLY | O_CLOEXEC);
  g_assert_cmpint (fd, >=, 0);
  g_assert_cmpint (flock (fd, LOCK_EX | LOCK_NB), ==, -1);
  g_assert_cmpint (errno, ==, EWOULDBLOCK);
  close (fd);
  kill (run.pid, SIGKILL);
  status = finish_lpipe (&run, NULL);
  g_assert_true (WIFSIGNALED (status) && WTERMSIG (status) == SIGKILL);
  g_assert_true (same_bytes (fx.out, fx.old_ref));
  left = list_temp_files (fx.dir, OUT_NAME);
  g_assert_cmpuint (left->len, ==, 1);

  /* The next run, without O_TMPFILE too, removes the stale file. */
  run = start_lpipe_without_tmpfile (synth_args ("2", fx.out));
  status = finish_lpipe (&run, &err);
  g_assert_true (WIFEXITED (status) && WEXITSTATUS (status) == 0);
  g_assert_true (same_bytes (fx.out, fx.new_ref));
  assert_no_temp_files (fx.dir, OUT_NAME);

  /* SIGTERM: the run removes its own. */
  reset_output ();
  run = start_lpipe_without_tmpfile (synth_args ("2", fx.out));
  wait_for_progress (&run, fx.dir, OUT_NAME, 0.2, fx.new_size, &renamed);
  kill (run.pid, SIGTERM);
  status = finish_lpipe (&run, NULL);
  g_assert_true (WIFEXITED (status) && WEXITSTATUS (status) == 143);
  g_assert_true (same_bytes (fx.out, fx.old_ref));
  assert_no_temp_files (fx.dir, OUT_NAME);
}

/* ---- SIGINT and SIGTERM ------------------------------------------------- */

static void
test_interrupt (gconstpointer data)
{
  int signum = GPOINTER_TO_INT (data);
  gboolean renamed;
  g_autofree char *err = NULL;
  int status;
  Run run;

  reset_output ();
  run = start_lpipe (synth_args ("2", fx.out), 0);
  wait_for_progress (&run, fx.dir, OUT_NAME, 0.2, fx.new_size, &renamed);
  g_assert_false (renamed);
  kill (run.pid, signum);
  status = finish_lpipe (&run, &err);

  g_test_message ("stderr: %s", err);
  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 128 + signum);
  g_assert_true (same_bytes (fx.out, fx.old_ref));
  assert_no_temp_files (fx.dir, OUT_NAME);
}

/* ---- a full disk -------------------------------------------------------- */

static void
test_full_disk (void)
{
  g_autofree char *err = NULL;
  int status;
  Run run;

  reset_output ();
  /* 16 MB: the header and a few tensors fit, the rest does not. The old
   * output (86 MB) is not written, so the limit does not touch it. */
  run = start_lpipe (synth_args ("2", fx.out), 16 * 1024 * 1024);
  status = finish_lpipe (&run, &err);

  g_test_message ("stderr: %s", err);
  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 1);
  /* One clear message that names the output and says what went wrong. */
  g_assert_nonnull (strstr (err, fx.out));
  g_assert_true (strstr (err, "too large") != NULL || strstr (err, "space") != NULL);
  g_assert_null (strstr (err, "CRITICAL"));
  g_assert_null (strstr (err, "WARNING"));
  g_assert_true (same_bytes (fx.out, fx.old_ref));
  assert_no_temp_files (fx.dir, OUT_NAME);

  /* With room again the same run succeeds. */
  run_lpipe_ok (synth_args ("2", fx.out));
  g_assert_true (same_bytes (fx.out, fx.new_ref));
}

/* ---- the output written over the input ---------------------------------- */

/* Cast the old file to f32, in place, optionally killed half way. */
static void
over_input (gboolean kill_mid_write)
{
  g_autofree char *src_arg = g_strconcat ("location=", fx.out, NULL);
  g_autofree char *ref_dir = g_build_filename (fx.dir, "ref", NULL);
  g_autofree char *ref = g_build_filename (ref_dir, OUT_NAME, NULL);
  g_autofree char *ref_src = g_strconcat ("location=", ref, NULL);
  const char *args[] = { "launch", "safetensors-source", src_arg, "!", "cast", "dtype=f32",
                         "!", "safetensors-sink", src_arg, NULL };
  const char *ref_args[] = { "launch", "safetensors-source", ref_src, "!", "cast", "dtype=f32",
                             "!", "safetensors-sink", ref_src, NULL };
  gboolean renamed;
  int status;
  Run run;

  /* The reference: the same in-place cast, run undisturbed elsewhere. */
  g_assert_cmpint (g_mkdir_with_parents (ref_dir, 0755), ==, 0);
  copy_file (fx.old_ref, ref);
  run_lpipe_ok (ref_args);
  g_assert_false (same_tensors (ref, fx.old_ref));

  reset_output ();
  run = start_lpipe (args, 0);
  if (kill_mid_write)
    {
      /* f32 is twice the size of the bf16 input */
      wait_for_progress (&run, fx.dir, OUT_NAME, 0.4, 2 * fx.new_size, &renamed);
      kill (run.pid, SIGKILL);
    }
  status = finish_lpipe (&run, NULL);

  if (!kill_mid_write)
    {
      g_assert_true (WIFEXITED (status) && WEXITSTATUS (status) == 0);
      assert_lpipe_info_ok (fx.out);
      g_assert_true (same_tensors (fx.out, ref));
      assert_no_temp_files (fx.dir, OUT_NAME);
    }
  else if (same_bytes (fx.out, fx.old_ref))
    g_test_message ("killed: the input is intact");
  else
    {
      g_test_message ("killed: the new file is complete");
      g_assert_true (same_tensors (fx.out, ref));
    }
  g_unlink (ref);
  g_rmdir (ref_dir);
  remove_temp_files (fx.dir, OUT_NAME);
}

static void
test_over_input (void)
{
  over_input (FALSE);
}

static void
test_over_input_killed (void)
{
  over_input (TRUE);
}

int
main (int argc, char **argv)
{
  int ret;

  g_test_init (&argc, &argv, NULL);
  if (g_getenv ("LPIPE") == NULL)
    {
      g_printerr ("LPIPE is not set: run through `meson test`\n");
      return 77;
    }

  for (guint i = 0; i < G_N_ELEMENTS (kill_points); i++)
    {
      g_autofree char *path = g_strdup_printf ("/crash-safety/sigkill/%s", kill_points[i].name);
      g_test_add_data_func (path, &kill_points[i], test_sigkill);
    }
  g_test_add_data_func ("/crash-safety/sigint", GINT_TO_POINTER (SIGINT), test_interrupt);
  g_test_add_data_func ("/crash-safety/sigterm", GINT_TO_POINTER (SIGTERM), test_interrupt);
  g_test_add_data_func ("/crash-safety/sighup", GINT_TO_POINTER (SIGHUP), test_interrupt);
  g_test_add_func ("/crash-safety/stale-temp-files", test_stale_temp_files);
  g_test_add_func ("/crash-safety/named-temp-fallback", test_named_temp_fallback);
  g_test_add_func ("/crash-safety/full-disk", test_full_disk);
  g_test_add_func ("/crash-safety/over-input", test_over_input);
  g_test_add_func ("/crash-safety/over-input-killed", test_over_input_killed);

  fixture_init ();
  ret = g_test_run ();
  return ret;
}
