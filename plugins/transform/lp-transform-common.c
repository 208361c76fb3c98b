/* lp-transform-common.c: assembled factors for the transform stages
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-transform-common.h"

#include <math.h>
#include <string.h>

/* The columns of a factor seen as 2-D: every dimension but the first. */
static guint64
n_columns (LpTensor *tensor)
{
  guint n_dims = lp_tensor_get_n_dims (tensor);
  guint64 columns = 1;

  for (guint i = 1; i < n_dims; i++)
    columns *= lp_tensor_get_dim (tensor, i);
  return columns;
}

typedef struct {
  LpBlock *blocks;
  guint n_blocks;
} Assembly;

static void
assembly_free (gpointer data)
{
  Assembly *assembly = data;

  for (guint i = 0; i < assembly->n_blocks; i++)
    {
      g_object_unref (assembly->blocks[i].source);
      g_free ((char *) assembly->blocks[i].what);
    }
  g_free (assembly->blocks);
  g_free (assembly);
}

static gboolean
all_finite (const double *values,
            guint64       n,
            gsize         overflow)
{
  if (overflow > 0)
    return FALSE;
  for (guint64 i = 0; i < n; i++)
    if (!isfinite (values[i]))
      return FALSE;
  return TRUE;
}

/* The output would hold infinity or NaN: find the checked block that puts
 * them there (the error path only, so each block is converted again). */
static GBytes *
blame_block (Assembly  *assembly,
             LpTensor  *tensor,
             GError   **error)
{
  LpDtype dtype = lp_tensor_get_dtype (tensor);

  for (guint b = 0; b < assembly->n_blocks; b++)
    {
      const LpBlock *block = &assembly->blocks[b];
      guint64 n = block->n_rows * n_columns (block->source);
      guint64 first = block->row_start * n_columns (block->source);
      g_autofree double *src = NULL;
      g_autofree guint8 *scratch = NULL;
      gsize bad = 0;

      if (block->what == NULL)
        continue;
      src = lp_tensor_dup_f64 (block->source, NULL, error);
      if (src == NULL)
        return NULL;
      for (guint64 i = 0; i < n; i++)
        bad += !isfinite (src[first + i]);
      if (bad > 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "%s: tensor '%s': its input '%s' holds %" G_GSIZE_FORMAT " infinite or NaN values",
                       block->what, lp_tensor_get_name (tensor), lp_tensor_get_name (block->source), bad);
          return NULL;
        }
      scratch = lp_try_alloc (n, 8, "the converted values", error);
      if (scratch == NULL)
        return NULL;
      for (guint64 i = 0; i < n; i++)
        src[first + i] *= block->scale;
      bad = lp_dtype_from_f64 (dtype, src + first, scratch, n);
      for (guint64 i = 0; i < n; i++)
        bad += !isfinite (src[first + i]);
      if (bad > 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "%s: tensor '%s': %" G_GSIZE_FORMAT " of %" G_GUINT64_FORMAT
                       " values would be written as infinity or NaN in %s; "
                       "make it smaller (or cast the input to a wider dtype first)",
                       block->what, lp_tensor_get_name (tensor), bad, n, lp_dtype_to_string (dtype));
          return NULL;
        }
    }
  /* blocks copied as they are brought them: not ours to judge */
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
               "tensor '%s': the input's values are infinity or NaN", lp_tensor_get_name (tensor));
  return NULL;
}

static GBytes *
assembly_data (LpTensor  *tensor,
               gpointer   user_data,
               GError   **error)
{
  Assembly *assembly = user_data;
  guint64 columns = n_columns (tensor);
  guint64 n = lp_tensor_get_n_elements (tensor);
  gsize n_bytes = lp_tensor_get_n_bytes (tensor);
  g_autofree double *out = lp_try_alloc0 (n, sizeof (double), "its values as f64", error);
  gpointer bytes;
  gboolean checked = FALSE;
  gsize overflow;

  if (out == NULL)
    return NULL;
  for (guint b = 0; b < assembly->n_blocks; b++)
    checked |= assembly->blocks[b].what != NULL;

  /* f64 holds every value of the float dtypes exactly, so a block with
   * scale 1 is copied bit for bit and a scaled one is rounded once. */
  for (guint b = 0; b < assembly->n_blocks; b++)
    {
      const LpBlock *block = &assembly->blocks[b];
      guint64 src_columns = n_columns (block->source);
      g_autofree double *src = lp_tensor_dup_f64 (block->source, NULL, error);

      if (src == NULL)
        return NULL;
      guint64 taken = block->n_cols ? block->n_cols : src_columns;

      for (guint64 i = 0; i < block->n_rows; i++)
        {
          const double *from = src + (block->row_start + i) * src_columns + block->col_start;
          double *to = out + (block->dest_row + i) * columns + block->dest_col;

          for (guint64 j = 0; j < taken; j++)
            to[j] = block->scale * from[j];
        }
    }

  bytes = lp_try_alloc (n_bytes, 1, "its data", error);
  if (bytes == NULL)
    return NULL;
  overflow = lp_dtype_from_f64 (lp_tensor_get_dtype (tensor), out, bytes, n);
  if (checked && !all_finite (out, n, overflow))
    {
      g_free (bytes);
      return blame_block (assembly, tensor, error);
    }
  return g_bytes_new_take (bytes, n_bytes);
}

/*
 * lp_block_tensor_new:
 *
 * A lazy tensor of @shape assembled from @blocks, which must fit in it (the
 * callers compute the layout from the shapes, so a block that does not fit
 * is a programming error).
 */
LpTensor *
lp_block_tensor_new (const char     *name,
                     LpDtype         dtype,
                     const guint64  *shape,
                     guint           n_dims,
                     const LpBlock  *blocks,
                     guint           n_blocks,
                     GError        **error)
{
  Assembly *assembly;
  guint64 columns = 1;

  for (guint i = 1; i < n_dims; i++)
    columns *= shape[i];
  for (guint b = 0; b < n_blocks; b++)
    {
      g_return_val_if_fail (blocks[b].row_start + blocks[b].n_rows
                            <= lp_tensor_get_dim (blocks[b].source, 0), NULL);
      g_return_val_if_fail (blocks[b].dest_row + blocks[b].n_rows <= shape[0], NULL);
      guint64 taken = blocks[b].n_cols ? blocks[b].n_cols : n_columns (blocks[b].source);

      g_return_val_if_fail (blocks[b].n_cols == 0 || blocks[b].what == NULL, NULL);
      g_return_val_if_fail (blocks[b].col_start + taken <= n_columns (blocks[b].source), NULL);
      g_return_val_if_fail (blocks[b].dest_col + taken <= columns, NULL);
    }

  assembly = g_new0 (Assembly, 1);
  assembly->blocks = g_memdup2 (blocks, n_blocks * sizeof (LpBlock));
  assembly->n_blocks = n_blocks;
  for (guint b = 0; b < n_blocks; b++)
    {
      g_object_ref (assembly->blocks[b].source);
      assembly->blocks[b].what = g_strdup (blocks[b].what);
    }

  return lp_tensor_new_lazy (name, dtype, shape, n_dims, assembly_data, assembly,
                             assembly_free, error);
}

/* A value that @dtype cannot hold exactly would change the module's scale:
 * such an alpha is written in the narrowest of F32 and F64 that holds it. */
static gboolean
holds_exactly (LpDtype dtype,
               double  value)
{
  guint8 bytes[8];
  double back;

  lp_dtype_from_f64 (dtype, &value, bytes, 1);
  lp_dtype_to_f64 (dtype, bytes, &back, 1);
  return back == value;
}

LpTensor *
lp_alpha_tensor_new (const char  *name,
                     LpDtype      dtype,
                     double       value,
                     GError     **error)
{
  gsize size;
  gpointer bytes;
  g_autoptr(GBytes) data = NULL;

  if (!lp_dtype_is_float (dtype) || !lp_dtype_can_convert (dtype) || !holds_exactly (dtype, value))
    dtype = holds_exactly (LP_DTYPE_F32, value) ? LP_DTYPE_F32 : LP_DTYPE_F64;
  size = lp_dtype_get_bits (dtype) / 8;
  bytes = g_malloc (size);
  lp_dtype_from_f64 (dtype, &value, bytes, 1);
  data = g_bytes_new_take (bytes, size);
  /* kohya writes torch.tensor(alpha): 0-dim */
  return lp_tensor_new (name, dtype, NULL, 0, data, error);
}

LpDtype
lp_common_float_dtype (LpTensor **tensors,
                       guint      n)
{
  LpDtype dtype = lp_tensor_get_dtype (tensors[0]);

  for (guint i = 1; i < n; i++)
    {
      if (lp_tensor_get_dtype (tensors[i]) != dtype)
        return LP_DTYPE_F32;
    }
  return dtype;
}
