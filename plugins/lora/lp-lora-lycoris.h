/* lp-lora-lycoris.h: LyCORIS LoHa and LoKr modules reduced to plain LoRAs
 *
 * A LoHa update is a Hadamard product of two low-rank products, a LoKr
 * update a Kronecker product; both have exact low-rank structure that gives
 * their best rank-k approximation without the out × in update:
 *
 * - LoHa: (U1 V1) ⊙ (U2 V2) = B A with the row-wise Khatri–Rao (face-
 *   splitting) factors B[o, :] = U1[o, :] ⊗ U2[o, :] and
 *   A[:, c] = V1[:, c] ⊗ V2[:, c], of rank r1·r2, whose exact SVD the
 *   factored machinery of lp-lora-math.c takes (LpLoraKhatriRao: it forms
 *   them a block at a time, from the parts as stored).
 * - LoKr: the singular values of kron (W1, W2) are the products
 *   σ_i(W1)·σ_j(W2), with singular vectors u_i ⊗ u_j and v_i ⊗ v_j.
 *
 * The first half works on plain f64 arrays; the second takes the LoHa and
 * LoKr modules the finder of core/lp-lora.c paired (by the keys
 * core/lora-families/lp-lora-family-loha.c and -lokr.c declare) and writes
 * each one as a kohya LoRA (`lora_down`, `lora_up`, `.alpha`).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

#include "lp-lora-common.h"

G_BEGIN_DECLS

/* The matrix of a Tucker (CP) LyCORIS part, as a product: the part is
 * Σ_ij t[i, j, κ] wa[i, p] wb[j, c] at [p, c, κ] (LyCORIS rebuild_tucker,
 * ComfyUI's einsum 'i j k l, j r, i p -> p r k l'), so flattened to
 * [p, c·K] it is waᵀ @ M with M[i, c·K + κ] = Σ_j t[i, j, κ] wb[j, c].
 * t [r, r, K], wb [r, cols]; writes m [r, cols·K]. */
void      lp_lora_tucker_right    (const double *t,
                                   const double *wb,
                                   guint         r,
                                   guint64       cols,
                                   guint64       kernel,
                                   double       *m);

/* One side of a Kronecker product: a dense rows × cols matrix (@dense), or
 * the product @a [rows, r] @ @b [r, cols]. */
typedef struct {
  const double *dense;
  const double *a;
  const double *b;
  guint r;
  guint64 rows;
  guint64 cols;
  /* @dense was stored in 16 bits or fewer: its products are exact in f32,
   * so its Gram matrix is summed in f32, as lora-svd's compute-dtype=auto
   * does for plain factors */
  gboolean narrow;
} LpLoraKronPart;

/* The best rank-k approximation of scale · kron (W1, W2), written as
 * b_new [rows1·rows2, k] and a_new [k, cols1·cols2] (f64, row-major, the
 * singular values split as √σ, the sign of @scale on b_new; zero columns and
 * rows beyond the update's rank). *@kept and *@total are Σσ² of the kept
 * directions and of the whole update. */
gboolean  lp_lora_lokr_reduce     (const LpLoraKronPart *w1,
                                   const LpLoraKronPart *w2,
                                   double                scale,
                                   guint                 k,
                                   double               *b_new,
                                   double               *a_new,
                                   double               *kept,
                                   double               *total,
                                   GError              **error);

/* Every non-zero singular value of the scaled update of one LoHa or LoKr
 * @module of @input, descending, *@n of them: the spectrum lora-svd's
 * dynamic criteria read (NULL with @error when the module is refused). */
double       *lp_lora_lycoris_module_sigma (LpCheckpoint  *input,
                                            LpLoraModule  *module,
                                            guint         *n,
                                            GError       **error);

/* How many of @modules (lp_lora_find_modules_full()) are LoHa or LoKr. */
guint         lp_lora_lycoris_count   (GPtrArray     *modules);

/* A rank for a module from every non-zero singular value of its update
 * (@n, descending), @full = min (out, in). */
typedef guint (*LpLoraRankChooser) (const double *sigma,
                                    guint         n,
                                    guint64       full,
                                    gpointer      user_data);

/* @input with each LoHa and LoKr module replaced by the kohya LoRA of rank
 * @rank (or the one @choose picks from its spectrum, when not NULL; @rank is
 * then what pad pads to) nearest to its update (lazy tensors, computed when pulled, recorded
 * in @stats); a module whose update has a lower rank bound (r1·r2 for LoHa,
 * rank (W1) · rank (W2) for LoKr) is written at that bound, exactly, unless
 * @pad. A DoRA `.dora_scale` is refused, or with @keep_dora kept as it is.
 * The names of the modules it wrote are added to @converted. */
LpCheckpoint *lp_lora_lycoris_reduce  (LpCheckpoint      *input,
                                       GPtrArray         *found,
                                       guint              rank,
                                       LpLoraRankChooser  choose,
                                       gpointer           choose_data,
                                       gboolean           pad,
                                       gboolean       keep_dora,
                                       LpLoraStats   *stats,
                                       GHashTable    *converted,
                                       GError       **error);

G_END_DECLS
