/* lp-error.c: the error domains of lpipe
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <sys/resource.h>

G_DEFINE_QUARK (lp-pipeline-error-quark, lp_pipeline_error)
G_DEFINE_QUARK (lp-plugin-error-quark, lp_plugin_error)
G_DEFINE_QUARK (lp-format-error-quark, lp_format_error)
G_DEFINE_QUARK (lp-stage-error-quark, lp_stage_error)

/* Buffers whose size follows from the input (a tensor's data, its
 * conversion to floats, a module's factors and scratch) are allocated here,
 * not with g_malloc(), which aborts the process when the memory cannot be
 * had: a checkpoint too big for the memory or the address-space limit
 * (`ulimit -v`) is bad input, and ends in an error that says what could not
 * be allocated and what to change. Small buffers of a fixed size stay
 * g_new(). */
static gpointer
try_alloc (gsize        n_elements,
           gsize        element_size,
           gboolean     zero,
           const char  *what,
           GError     **error)
{
  gpointer data = NULL;
  struct rlimit as;
  g_autofree char *size = NULL;
  g_autofree char *limit = NULL;

  /* g_try_malloc0_n() gives NULL for 0 bytes; one byte keeps NULL for failures */
  if (n_elements == 0 || element_size == 0)
    n_elements = element_size = 1;
  if (n_elements <= G_MAXSIZE / element_size)
    data = zero ? g_try_malloc0_n (n_elements, element_size) : g_try_malloc_n (n_elements, element_size);
  if (data != NULL)
    return data;

  if (n_elements > G_MAXSIZE / element_size)
    size = g_strdup_printf ("%" G_GSIZE_FORMAT " × %" G_GSIZE_FORMAT " bytes", n_elements, element_size);
  else
    size = g_format_size_full ((guint64) n_elements * element_size, G_FORMAT_SIZE_IEC_UNITS);
  if (getrlimit (RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
    limit = g_strdup_printf ("the address-space limit (ulimit -v) is %" G_GUINT64_FORMAT " KiB; "
                             "raise it, or run with fewer --threads",
                             (guint64) as.rlim_cur / 1024);
  else
    limit = g_strdup ("out of memory; free memory, or run with fewer --threads");
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NO_MEMORY,
               "could not allocate %s for %s: %s", size, what, limit);
  return NULL;
}

/**
 * lp_try_alloc: (skip)
 * @n_elements: the number of elements
 * @element_size: the size of one, in bytes
 * @what: what the buffer is for, for the message: "tensor 'x'",
 *   "the Gram matrix of module 'y'"
 * @error: return location for a #GError
 *
 * Allocates a buffer whose size follows from the input, like
 * g_try_malloc_n(), but a failure (out of memory, an address-space limit,
 * a size that overflows) is a %LP_STAGE_ERROR_NO_MEMORY error naming @what,
 * the size and what to change, where g_malloc() would abort the process.
 * Zero elements give a valid one-byte buffer. Free it with g_free().
 *
 * Returns: (transfer full) (nullable): the buffer, or %NULL with @error set
 */
gpointer
lp_try_alloc (gsize        n_elements,
              gsize        element_size,
              const char  *what,
              GError     **error)
{
  g_return_val_if_fail (what != NULL, NULL);
  return try_alloc (n_elements, element_size, FALSE, what, error);
}

/**
 * lp_try_alloc0: (skip)
 * @n_elements: the number of elements
 * @element_size: the size of one, in bytes
 * @what: what the buffer is for, for the message
 * @error: return location for a #GError
 *
 * Like lp_try_alloc(), with the buffer zeroed.
 *
 * Returns: (transfer full) (nullable): the buffer, or %NULL with @error set
 */
gpointer
lp_try_alloc0 (gsize        n_elements,
               gsize        element_size,
               const char  *what,
               GError     **error)
{
  g_return_val_if_fail (what != NULL, NULL);
  return try_alloc (n_elements, element_size, TRUE, what, error);
}
