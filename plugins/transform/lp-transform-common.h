/* lp-transform-common.h: what the transform stages share
 *
 * Lazy factors assembled from blocks of other factors (rename's split and fuse, lora-merge's stacking, lora-scale):
 * one place for the loop that copies scaled rows into a bigger matrix.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/**
 * LpBlock:
 * @source: a factor, seen as a 2-D matrix `[dim 0, product of the others]`
 * @row_start: the first row of @source taken
 * @n_rows: how many rows are taken
 * @dest_row: where the rows go in the output
 * @dest_col: the column of the output where the source's first column goes
 * @scale: what the values are multiplied by on the way
 * @what: (nullable): for a block whose scale the user chose, what errors
 *   call it ("stage 2 'lora-scale': module x, factor 1e+40"); such a block
 *   must not put infinity or NaN into the output, which is then an error
 *   naming it. Blocks without it are copied as they are.
 * @col_start: the first column of @source taken
 * @n_cols: how many columns are taken; 0 means all (then @col_start is 0).
 *   Only blocks without @what take part of the columns.
 *
 * One piece of an assembled factor. The output is zero where no block writes.
 */
typedef struct {
  LpTensor *source;
  guint64 row_start;
  guint64 n_rows;
  guint64 dest_row;
  guint64 dest_col;
  double scale;
  const char *what;
  guint64 col_start;
  guint64 n_cols;
} LpBlock;

LpTensor  *lp_block_tensor_new   (const char     *name,
                                  LpDtype         dtype,
                                  const guint64  *shape,
                                  guint           n_dims,
                                  const LpBlock  *blocks,
                                  guint           n_blocks,
                                  GError        **error);

/* A 0-dim alpha tensor holding @value. */
LpTensor  *lp_alpha_tensor_new   (const char     *name,
                                  LpDtype         dtype,
                                  double          value,
                                  GError        **error);

/* The dtype blocks from several factors are written in: theirs when they
 * agree, else F32. */
LpDtype    lp_common_float_dtype (LpTensor      **tensors,
                                  guint           n);

G_END_DECLS
