/* lp-lora-kernels.h: the inner loops that carry a rank stage's time
 *
 * Gram matrices of a block of factor values in f32 vectors, the sums moved
 * into an f64 matrix after every block. A BLAS call per cache-sized block
 * spends more on packing the block again than on the products when r is a
 * few dozen; these read the block where it lies.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* Values a Gram kernel reads past what it was given: buffers handed to
 * lp_lora_gram_cols_f32() need this many floats of slack at their end. */
#define LP_LORA_KERNEL_SLACK 32

/* G += X Xᵀ into the upper triangle of @g (r × r, row-major, f64), for X the
 * @r rows of @x, each @w floats at a stride of @ld. @w must be a multiple
 * of 16 (pad the rows with zeros). */
void lp_lora_gram_rows_f32 (const float *x,
                            gsize        ld,
                            guint        r,
                            gsize        w,
                            double      *g);

/* G += Yᵀ Y into the upper triangle of @g, for Y the @h rows of @y, each of
 * @r floats, one after the other (stride @r). @y must be followed by
 * LP_LORA_KERNEL_SLACK readable floats. */
void lp_lora_gram_cols_f32 (const float *y,
                            guint        r,
                            gsize        h,
                            double      *g);

/* Y [k, w] (row stride @ldy) = M X for M [k, r] row-major and X the @r rows
 * of @w floats at stride @ldx: the down factor's new rows. */
void lp_lora_map_rows_f32 (const float *m,
                           guint        k,
                           guint        r,
                           const float *x,
                           gsize        ldx,
                           gsize        w,
                           float       *y,
                           gsize        ldy);

/* The same, X in bf16 (read as stored). */
void lp_lora_map_rows_bf16 (const float   *m,
                            guint          k,
                            guint          r,
                            const guint16 *x,
                            gsize          ldx,
                            gsize          w,
                            float         *y,
                            gsize          ldy);

/* Floats a row of the transposed map lp_lora_map_cols_f32() takes. */
#define LP_LORA_MAP_COLS_STRIDE(r) (((gsize) (r) + 15) / 16 * 16)

/* Y [h, k] (row-major) = X M for X the @h rows of @r floats at @x (one after
 * the other, followed by LP_LORA_KERNEL_SLACK readable floats) and M [r, k]
 * given as @mt = Mᵀ: round_up (k, 4) rows of LP_LORA_MAP_COLS_STRIDE (r)
 * floats, zero past @k and @r: the up factor's new rows. */
void lp_lora_map_cols_f32 (const float *mt,
                           guint        k,
                           guint        r,
                           const float *x,
                           gsize        h,
                           float       *y);

/* The same, X in bf16: it reads up to LP_LORA_MAP_COLS_STRIDE (r) - r
 * values past the last row, which must be readable. */
void lp_lora_map_cols_bf16 (const float   *mt,
                            guint          k,
                            guint          r,
                            const guint16 *x,
                            gsize          h,
                            float         *y);

/* TRUE iff no bf16 (f16) value is a NaN or an infinity. */
gboolean lp_lora_all_finite_bf16 (const guint16 *values,
                                  gsize          n);
gboolean lp_lora_all_finite_f16  (const guint16 *values,
                                  gsize          n);

/* LoHa's Khatri–Rao factors, a block at a time (lp-lora-math.c):
 * Y [h, r1·r2] with row o = x1[o, :] ⊗ x2[o, :] for x1 [h, r1] and
 * x2 [h, r2]; and the r1·r2 rows of w floats (row stride @ld) of Y with row
 * i·r2 + j = v1[i] ⊙ v2[j], for v1 [r1, w] and v2 [r2, w]. */
void lp_lora_face_split_rows_f32 (const float *x1,
                                  guint        r1,
                                  const float *x2,
                                  guint        r2,
                                  gsize        h,
                                  float       *y);
void lp_lora_hadamard_rows_f32   (const float *v1,
                                  guint        r1,
                                  const float *v2,
                                  guint        r2,
                                  gsize        w,
                                  float       *y,
                                  gsize        ld);

/* The same straight from bf16 factors, on machines with AVX512-BF16
 * (lp_lora_have_bf16_dot()): A [r, n] row-major, or B [n, r] with a
 * scratch buffer of lp_lora_gram_bf16_scratch_size() bytes. */
gboolean lp_lora_have_bf16_dot          (void);
gsize    lp_lora_gram_bf16_scratch_size (guint          r);
void     lp_lora_gram_rows_bf16         (const guint16 *a,
                                         guint          r,
                                         gsize          n,
                                         double        *g);
void     lp_lora_gram_cols_bf16         (const guint16 *b,
                                         guint          r,
                                         gsize          n,
                                         double        *g,
                                         gpointer       scratch);

/* The same Gram matrices, register- and cache-blocked for large r: a panel
 * of the long dimension is packed once into a scratch buffer of
 * lp_lora_gram_blocked_scratch_size() bytes (bf16 as stored, in pairs), and
 * summed over tiles of the upper triangle. They read exactly what they are
 * given (no padding, no slack), X [r, n] at a stride of @ld or Y [n, r]. At
 * and above LP_LORA_GRAM_BLOCKED_RANK they are the faster ones; the bf16
 * pair needs lp_lora_have_bf16_dot(). */
#define LP_LORA_GRAM_BLOCKED_RANK 64

gsize lp_lora_gram_blocked_scratch_size (guint          r);
void  lp_lora_gram_blocked_rows_f32     (const float   *x,
                                         gsize          ld,
                                         guint          r,
                                         gsize          n,
                                         double        *g,
                                         gpointer       scratch);
void  lp_lora_gram_blocked_cols_f32     (const float   *y,
                                         guint          r,
                                         gsize          n,
                                         double        *g,
                                         gpointer       scratch);
void  lp_lora_gram_blocked_rows_bf16    (const guint16 *a,
                                         guint          r,
                                         gsize          n,
                                         double        *g,
                                         gpointer       scratch);
void  lp_lora_gram_blocked_cols_bf16    (const guint16 *b,
                                         guint          r,
                                         gsize          n,
                                         double        *g,
                                         gpointer       scratch);

/* The Gram matrix Yᵀ Y of LoHa's Khatri–Rao factor Y [n, r1·r2], row t =
 * x1[t] ⊗ x2[t], in its symmetry, without forming Y: lp_lora_gram_khatri_rao_f32()
 * adds to C [r1(r1+1)/2, r2(r2+1)/2] (row-major f64) the sums over the pairs
 * of x1's and of x2's values (@x1 and @x2: n rows of 16 floats, the r1, r2 ≤
 * 16 values and zeros), with a scratch of lp_lora_gram_khatri_rao_scratch_size()
 * bytes; lp_lora_khatri_rao_gram_expand() adds C to G's upper triangle
 * (r1·r2 square, row-major), once for all blocks. */
gsize lp_lora_gram_khatri_rao_scratch_size (guint        r1,
                                            guint        r2);
void  lp_lora_gram_khatri_rao_f32       (const float   *x1,
                                         const float   *x2,
                                         guint          r1,
                                         guint          r2,
                                         gsize          n,
                                         double        *c,
                                         gpointer       scratch);
void  lp_lora_khatri_rao_gram_expand    (const double  *c,
                                         guint          r1,
                                         guint          r2,
                                         double        *g);

/* Y [h, k] (row-major) = X M for X [h, r1·r2] those Khatri–Rao rows
 * (@x1, @x2 as above, but round_up (h, 8) rows of them, readable) and M
 * [r1·r2, k] with rows of round_up (k, 16) floats, zero past @k: the up
 * factor's new rows, without forming X. */
void  lp_lora_map_khatri_rao_f32        (const float   *x1,
                                         const float   *x2,
                                         guint          r1,
                                         guint          r2,
                                         const float   *m,
                                         guint          k,
                                         gsize          h,
                                         float         *y);

G_END_DECLS
