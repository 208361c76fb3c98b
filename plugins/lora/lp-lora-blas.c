/* lp-lora-blas.c: OpenBLAS's work buffers, reserved before a stage computes
 *
 * Every level-3 BLAS call and OpenBLAS's own LAPACK routines (dpotrf, …)
 * take a work buffer from a table in OpenBLAS (driver/others/memory.c,
 * blas_memory_alloc). A slot's buffer is allocated the first time the slot
 * is used, BUFFER_SIZE + FIXED_PAGESIZE bytes (128 MiB + 4 KiB on x86-64),
 * and kept until exit; a call takes the first free slot, so n threads
 * calling at once use n slots. When that allocation fails, OpenBLAS retries
 * it for ever (`do { … } while (map_address == -1)`) inside the call: under
 * `ulimit -v` a run hung, ignoring SIGINT and SIGTERM, since the signal
 * handler only cancels, and the worker never comes back to look.
 *
 * So before a stage's tensors are computed, the slots its threads will use
 * are filled while nothing else runs: the memory for each buffer is mapped
 * once by us first (which may fail, and then the stage fails with a message
 * saying what to change), released, and OpenBLAS's allocation of the same
 * size made right after it. Slots filled stay filled, so the check costs
 * nothing in later stages or runs of the process. This relies on the
 * legacy allocator that Debian's OpenBLAS uses (built without USE_TLS);
 * with USE_TLS each thread has its own table and the hang can still happen.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-blas.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

/* Exported by libopenblas but declared in none of its headers. */
extern void *blas_memory_alloc (int procpos);
extern void  blas_memory_free  (void *buffer);

/* BUFFER_SIZE (32 << 22) + FIXED_PAGESIZE of OpenBLAS on x86-64 (common_x86_64.h);
 * the other architectures' buffers are no larger. */
#define OPENBLAS_BUFFER_BYTES ((gsize) (32u << 22) + 4096u)
/* What we map to see that the buffer can be had: more than the buffer, since
 * OpenBLAS may get it through malloc, whose chunk header adds a page. */
#define PROBE_BYTES (OPENBLAS_BUFFER_BYTES + (1u << 20))

/* More threads than this share buffers; OpenBLAS's table has 128 slots
 * (NUM_THREADS 64) in Debian's build, and more would print its warning. */
#define MAX_RESERVED 64

static GMutex reserve_lock;
static guint reserved;

static char *
describe_limit (guint missing)
{
  struct rlimit as;

  if (getrlimit (RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
    return g_strdup_printf ("the address-space limit (ulimit -v) is %" G_GUINT64_FORMAT
                            " KiB: raise it by %" G_GSIZE_FORMAT " MiB or more, or run with fewer --threads",
                            (guint64) as.rlim_cur / 1024, missing * (PROBE_BYTES >> 20));
  return g_strdup ("the system refused the memory (overcommit limit?): free memory, "
                   "or run with fewer --threads");
}

gboolean
lp_lora_blas_reserve (LpStage  *stage,
                      GError  **error)
{
  guint want = MIN (MAX (lp_stage_get_threads (stage), 1), MAX_RESERVED);
  void *held[MAX_RESERVED];
  guint n_held = 0;
  gboolean ok = TRUE;

  g_mutex_lock (&reserve_lock);
  while (reserved + n_held < want)
    {
      void *probe = mmap (NULL, PROBE_BYTES, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (probe == MAP_FAILED)
        {
          int saved = errno;
          g_autofree char *limit = describe_limit (want - reserved - n_held);
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                       "OpenBLAS needs a %" G_GSIZE_FORMAT " MiB work buffer for each of the %u threads "
                       "and buffer %u could not be allocated (%s); %s",
                       OPENBLAS_BUFFER_BYTES >> 20, want, reserved + n_held + 1,
                       g_strerror (saved), limit);
          ok = FALSE;
          break;
        }
      munmap (probe, PROBE_BYTES);
      /* The slots already held are in use, so this one fills the next. */
      held[n_held++] = blas_memory_alloc (1);
    }
  for (guint i = 0; i < n_held; i++)
    blas_memory_free (held[i]);
  reserved += n_held;
  g_mutex_unlock (&reserve_lock);
  return ok;
}
