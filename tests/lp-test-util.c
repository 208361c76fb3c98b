/* lp-test-util.c: what the test programs share
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "lp-test-util.h"

const char *
lp_test_samples_dir (void)
{
  static char *dir;
  static gsize once;

  if (g_once_init_enter (&once))
    {
      const char *shared = g_getenv ("LPIPE_SHARED_DIR");
      if (shared)
        {
          char *d = g_build_filename (shared, "lora-samples", NULL);
          if (g_file_test (d, G_FILE_TEST_IS_DIR))
            dir = d;
          else
            g_free (d);
        }
      g_once_init_leave (&once, 1);
    }
  return dir;
}

gboolean
lp_test_require_samples (void)
{
  if (lp_test_samples_dir () != NULL)
    return TRUE;
  g_test_skip ("../shared/lora-samples is absent");
  return FALSE;
}

static GPtrArray *tmpdirs;

static void
remove_tree (const char *path)
{
  g_autoptr(GDir) dir = g_dir_open (path, 0, NULL);
  const char *name;

  if (dir)
    while ((name = g_dir_read_name (dir)))
      {
        g_autofree char *child = g_build_filename (path, name, NULL);
        if (g_file_test (child, G_FILE_TEST_IS_DIR) && !g_file_test (child, G_FILE_TEST_IS_SYMLINK))
          remove_tree (child);
        else
          g_unlink (child);
      }
  g_rmdir (path);
}

static void
remove_tmpdirs (void)
{
  for (guint i = 0; tmpdirs && i < tmpdirs->len; i++)
    remove_tree (g_ptr_array_index (tmpdirs, i));
}

char *
lp_test_make_tmpdir (void)
{
  g_autoptr(GError) error = NULL;
  char *dir = g_dir_make_tmp ("lpipe-test-XXXXXX", &error);

  g_assert_no_error (error);
  if (tmpdirs == NULL)
    {
      tmpdirs = g_ptr_array_new_with_free_func (g_free);
      atexit (remove_tmpdirs);
    }
  g_ptr_array_add (tmpdirs, g_strdup (dir));
  return dir;
}

char *
lp_test_run_python (const char * const *argv)
{
  g_autoptr(GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *out = NULL;
  g_autofree char *err = NULL;
  g_autoptr(GError) error = NULL;
  int status = 0;

  g_ptr_array_add (args, g_strdup ("/usr/bin/python3"));
  for (guint i = 0; argv[i]; i++)
    {
      if (i == 0 && !g_path_is_absolute (argv[0]))
        g_ptr_array_add (args, g_test_build_filename (G_TEST_DIST, argv[0], NULL));
      else
        g_ptr_array_add (args, g_strdup (argv[i]));
    }
  g_ptr_array_add (args, NULL);

  g_spawn_sync (NULL, (char **) args->pdata, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                &out, &err, &status, &error);
  g_assert_no_error (error);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("python oracle %s failed:\n%s%s", argv[0], out, err);
  return g_steal_pointer (&out);
}

static void
redirect_stdout (gpointer user_data)
{
  const char *path = user_data;
  int fd;

  if (path == NULL)
    return;
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0)
    {
      dup2 (fd, STDOUT_FILENO);
      close (fd);
    }
}

/* Where a run's standard output goes when the test keeps none: a null
 * device made in a temporary folder (the suite runs as root), never the
 * real /dev/null; without the right to make one, a file there. */
static const char *
discard_path (void)
{
  static char *path;

  if (path == NULL)
    {
      g_autofree char *dir = lp_test_make_tmpdir ();
      path = g_build_filename (dir, "null", NULL);
      if (mknod (path, S_IFCHR | 0666, makedev (1, 3)) != 0)
        g_assert_true (g_file_set_contents (path, "", 0, NULL));
    }
  return path;
}

LpTestRun
lp_test_spawn_lpipe (const char * const *args,
                     const char         *stdout_path)
{
  g_autoptr(GPtrArray) argv = g_ptr_array_new ();
  g_autoptr(GError) error = NULL;
  const char *lpipe = g_getenv ("LPIPE");
  LpTestRun run = { 0, -1 };

  g_assert_nonnull (lpipe);
  if (stdout_path == NULL)
    stdout_path = discard_path ();
  g_ptr_array_add (argv, (char *) lpipe);
  for (guint i = 0; args[i]; i++)
    g_ptr_array_add (argv, (char *) args[i]);
  g_ptr_array_add (argv, NULL);
  g_spawn_async_with_pipes (NULL, (char **) argv->pdata, NULL,
                            G_SPAWN_DO_NOT_REAP_CHILD,
                            redirect_stdout, (gpointer) stdout_path, &run.pid, NULL, NULL,
                            &run.err_fd, &error);
  g_assert_no_error (error);
  return run;
}

char *
lp_test_find_temp_fd (GPid        pid,
                      const char *dir,
                      const char *base)
{
  g_autofree char *fd_dir = g_strdup_printf ("/proc/%d/fd", (int) pid);
  g_autofree char *named = g_strconcat (dir, "/.", base, ".", NULL);
  g_autofree char *unnamed = g_strconcat (dir, "/#", NULL);
  g_autoptr(GDir) d = g_dir_open (fd_dir, 0, NULL);
  const char *name;

  if (d == NULL)
    return NULL;
  while ((name = g_dir_read_name (d)))
    {
      g_autofree char *path = g_build_filename (fd_dir, name, NULL);
      g_autofree char *target = g_file_read_link (path, NULL);

      if (target && (g_str_has_prefix (target, named) || g_str_has_prefix (target, unnamed)))
        return g_steal_pointer (&path);
    }
  return NULL;
}

int
lp_test_wait_lpipe (LpTestRun  *run,
                    guint       timeout_s,
                    char      **err_text)
{
  GString *err = g_string_new (NULL);
  gint64 deadline = g_get_monotonic_time () + (gint64) timeout_s * G_USEC_PER_SEC;
  gboolean timed_out = FALSE;
  int status = 0;

  for (;;)
    {
      struct pollfd pfd = { run->err_fd, POLLIN, 0 };
      gint64 left = (deadline - g_get_monotonic_time ()) / 1000;
      char buf[4096];
      ssize_t n;

      if (left <= 0)
        {
          timed_out = TRUE;
          break;
        }
      if (poll (&pfd, 1, (int) MIN (left, 1000)) <= 0)
        continue;
      n = read (run->err_fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        break;
      g_string_append_len (err, buf, n);
    }
  close (run->err_fd);
  if (timed_out)
    kill (run->pid, SIGKILL);
  while (waitpid (run->pid, &status, 0) < 0)
    g_assert_cmpint (errno, ==, EINTR);
  g_spawn_close_pid (run->pid);
  if (timed_out)
    g_error ("lpipe did not finish within %u s (killed); its stderr: %s", timeout_s, err->str);
  if (err_text)
    *err_text = g_string_free (err, FALSE);
  else
    g_string_free (err, TRUE);
  return status;
}

LpRegistry *
lp_test_registry (void)
{
  return lp_registry_get_default ();
}

LpTensor *
lp_test_tensor (const char    *name,
                LpDtype        dtype,
                const guint64 *shape,
                guint          n_dims,
                const float   *values)
{
  g_autoptr(GError) error = NULL;
  guint64 n = 1;
  LpTensor *t;

  for (guint i = 0; i < n_dims; i++)
    n *= shape[i];
  t = lp_tensor_new_from_f32 (name, dtype, shape, n_dims, values, n, &error);
  g_assert_no_error (error);
  return t;
}

LpCheckpoint *
lp_test_run_stage (const char    *stage_name,
                   LpCheckpoint **inputs,
                   guint          n_inputs,
                   GError       **error,
                   ...)
{
  g_autoptr(LpStage) stage = NULL;
  LpCheckpoint *output = NULL;
  va_list args;
  const char *name;

  stage = lp_registry_create_stage (lp_test_registry (), stage_name, error);
  if (stage == NULL)
    return NULL;
  va_start (args, error);
  while ((name = va_arg (args, const char *)))
    {
      const char *value = va_arg (args, const char *);
      if (!lp_stage_set_property_from_string (stage, name, value, error))
        {
          va_end (args);
          return NULL;
        }
    }
  va_end (args);
  if (!lp_stage_prepare (stage, error))
    return NULL;
  if (!lp_stage_run (stage, inputs, n_inputs, &output, error))
    return NULL;
  return output;
}
