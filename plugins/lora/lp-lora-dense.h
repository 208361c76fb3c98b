/* lp-lora-dense.h: the SVD of the difference of two weights, a block of rows
 * at a time
 *
 * lp-lora-math.c works on thin factors; this works on whole weights, as
 * extracting a LoRA from a base and a tuned model needs: D = tuned − base is
 * never formed whole, only a block of its rows (a few MiB) at a time, read
 * from the stored bytes of the two weights.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <glib.h>
#include <lpipe/lpipe-plugin.h>

#include "lp-lora-math.h"

G_BEGIN_DECLS

/* D = tuned − base, both row-major out × in as stored (any convertible
 * dtypes, possibly different); or, with @hadamard, D = (u1 v1) ⊙ (u2 v2),
 * a LoHa update whose Khatri–Rao rank r1·r2 is too high for the factored
 * route, each block of it made from the parts. */
typedef struct {
  gconstpointer base;
  gconstpointer tuned;
  LpDtype base_dtype;
  LpDtype tuned_dtype;
  guint64 out;
  guint64 in;
  const LpLoraKhatriRao *hadamard;
} LpLoraDifference;

/**
 * LpLoraDenseSvd:
 * @n: how many singular triplets are known
 * @sigma: @n singular values, descending
 * @u: (nullable): out × n, column-major: the left vectors, when known
 * @v: (nullable): in × n, column-major: the right vectors, when known
 * @total: ‖D‖², the squared Frobenius norm
 *
 * The leading part of the SVD of a difference. At least one of @u and @v is
 * set; lp_lora_dense_svd_factors() computes the other side for the
 * directions it keeps.
 */
typedef struct {
  guint n;
  double *sigma;
  double *u;
  double *v;
  double total;
} LpLoraDenseSvd;

void            lp_lora_dense_svd_free        (LpLoraDenseSvd *svd);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (LpLoraDenseSvd, lp_lora_dense_svd_free)

/* The whole SVD (every singular value, vectors of the smaller side), from
 * the Gram matrix of the smaller side summed in f64. FALSE with @error set
 * on NaN or infinity in D or when LAPACK fails. */
LpLoraDenseSvd *lp_lora_difference_svd        (const LpLoraDifference *d,
                                               GError                **error);
/* The same for the @top largest singular values and their vectors only
 * (all of them for 0 or @top ≥ min (out, in)); @total is still ‖D‖². */
LpLoraDenseSvd *lp_lora_difference_svd_top    (const LpLoraDifference *d,
                                               guint                   top,
                                               GError                **error);

/* The leading @l singular triplets by a randomized range finder (Halko,
 * Martinsson, Tropp: Gaussian sketch, @niter power iterations with
 * re-orthonormalization) with products in f32; @total is exact. */
LpLoraDenseSvd *lp_lora_difference_randomized (const LpLoraDifference *d,
                                               guint                   l,
                                               guint                   niter,
                                               LpLoraRng              *rng,
                                               GError                **error);

/* The factors of the best rank-k approximation within @svd, split as √σ:
 * up [out, k] and down [k, in], row-major f32. Directions with σ = 0 (or
 * beyond svd->n) are zero. */
void            lp_lora_dense_svd_factors     (const LpLoraDenseSvd   *svd,
                                               const LpLoraDifference *d,
                                               guint                   k,
                                               float                  *up,
                                               float                  *down);

G_END_DECLS
