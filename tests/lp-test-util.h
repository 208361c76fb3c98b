/* lp-test-util.h: what the test programs share
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include "lp-private.h"

G_BEGIN_DECLS

/* The folder of real LoRA samples (../shared/lora-samples), or NULL when the
 * checkout has no ../shared beside it. */
const char *lp_test_samples_dir    (void);
/* Skips the current test (g_test_skip) when the samples are absent; returns
 * FALSE then. */
gboolean    lp_test_require_samples (void);
/* A fresh temporary folder, removed with everything in it at exit. */
char       *lp_test_make_tmpdir    (void);
/* Runs Debian's /usr/bin/python3 with @argv (script first; a relative
 * script name is looked up in tests/), asserting exit 0, and returns its
 * standard output. */
char       *lp_test_run_python     (const char * const *argv);
/* A run of the CLI ($LPIPE, which the test environment sets) with @args,
 * standard output to @stdout_path (NULL: discarded, through a null device made
 * in a temporary folder) and standard error kept
 * for lp_test_wait_lpipe(). */
typedef struct {
  GPid pid;
  int err_fd;
} LpTestRun;
LpTestRun   lp_test_spawn_lpipe    (const char * const *args,
                                    const char         *stdout_path);
/* Waits for @run, failing the test if it takes more than @timeout_s seconds
 * (the child is killed then); returns the wait status and, in @err_text,
 * what it wrote to standard error. */
int         lp_test_wait_lpipe     (LpTestRun          *run,
                                    guint               timeout_s,
                                    char              **err_text);
/* The descriptor process @pid holds on its temporary output for @base in
 * @dir, as a path stat() follows (/proc/PID/fd/N): an unnamed O_TMPFILE in
 * @dir (`#INODE (deleted)`) or a file named .@base.* there; NULL when it has
 * none open. */
char       *lp_test_find_temp_fd   (GPid                pid,
                                    const char         *dir,
                                    const char         *base);
/* The default registry, which the test environment points at the build tree. */
LpRegistry *lp_test_registry       (void);
/* A tensor of @dtype from float values. */
LpTensor   *lp_test_tensor         (const char    *name,
                                    LpDtype        dtype,
                                    const guint64 *shape,
                                    guint          n_dims,
                                    const float   *values);
/* Runs one stage by name on @inputs, with properties given as NULL-terminated
 * name, value text pairs; returns the output (NULL for sinks) or NULL with
 * @error set. */
LpCheckpoint *lp_test_run_stage    (const char    *stage_name,
                                    LpCheckpoint **inputs,
                                    guint          n_inputs,
                                    GError       **error,
                                    ...) G_GNUC_NULL_TERMINATED;

G_END_DECLS
