/* lp-lora-math.h: the numerics every LoRA rank stage shares
 *
 * Everything works on the thin factors of a module, delta = B @ A with B
 * [out, r] and A [r, in], both row-major; nothing here ever forms the
 * out × in update. One place for the factored SVD, the randomized range
 * finder, random projections, error norms and the per-module RNG, so the
 * stages stay small and agree with each other.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <glib.h>
#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/* A xoshiro256** stream seeded from (seed, module name): a module's draws
 * never depend on the order or the thread the modules are computed on. */
typedef struct {
  guint64 s[4];
  double spare;
  gboolean has_spare;
} LpLoraRng;

void      lp_lora_rng_init          (LpLoraRng     *rng,
                                     guint64        seed,
                                     const char    *name);
guint64   lp_lora_rng_next          (LpLoraRng     *rng);
double    lp_lora_rng_uniform       (LpLoraRng     *rng);
double    lp_lora_rng_normal        (LpLoraRng     *rng);

/* The k × r projection of the originating write-up, row-major: Gaussian
 * entries N(0, 1/k), or Achlioptas' sparse ±√3 (1/6 each), 0 (2/3), over √k. */
void      lp_lora_projection_matrix (LpLoraRng     *rng,
                                     gboolean       sparse,
                                     guint          k,
                                     guint          r,
                                     float         *matrix);

/* Machine epsilon of a stored float dtype (bf16 2^-8, f16 2^-11, ...), the
 * unit tolerances are derived from. */
double    lp_lora_dtype_eps         (LpDtype        dtype);

/* TRUE iff every value is finite. */
gboolean  lp_lora_all_finite_f64    (const double  *values,
                                     gsize          n);
gboolean  lp_lora_all_finite_f32    (const float   *values,
                                     gsize          n);
/* The same for @n values stored as @dtype (any float dtype; integers are
 * always finite). */
gboolean  lp_lora_all_finite        (LpDtype        dtype,
                                     gconstpointer  values,
                                     gsize          n);

/**
 * LpLoraSpectrum:
 * @r: the stored rank of the module
 * @n: how many directions have a non-zero singular value (≤ @r)
 * @sigma: @r singular values of B @ A, descending, zero from @n on
 * @map_b: (nullable): r × r, row-major: column i maps B to the unit left vector u_i = B map_b[:, i]
 * @map_a: (nullable): r × r, row-major: row i maps A to the unit right vector v_iᵀ = map_a[i, :] A
 * @total: Σ σ², the squared Frobenius norm of B @ A
 *
 * The SVD of one module's update, kept in factored form: @map_b and @map_a
 * are small, so a stage can choose the rank first and map back later.
 */
typedef struct {
  guint r;
  guint n;
  double *sigma;
  double *map_b;
  double *map_a;
  double total;
} LpLoraSpectrum;

void      lp_lora_spectrum_free     (LpLoraSpectrum *spectrum);
G_DEFINE_AUTOPTR_CLEANUP_FUNC (LpLoraSpectrum, lp_lora_spectrum_free)

/* LoHa's Khatri–Rao factors, given by their four parts instead of stored:
 * B [out, r1·r2] row-wise (column i·r2 + j is u1[:, i] ⊙ u2[:, j]) and
 * A [r1·r2, in] column-wise (row i·r2 + j is v1[i] ⊙ v2[j]), for u1
 * [out, r1], v1 [r1, in], u2 [out, r2], v2 [r2, in], all in @dtype. The math
 * forms them a cache-sized block at a time where it reads a block of a
 * stored factor, so the out × r1·r2 factors never exist whole. */
typedef struct {
  LpDtype dtype;
  gconstpointer u1;
  gconstpointer v1;
  gconstpointer u2;
  gconstpointer v2;
  guint r1;
  guint r2;
} LpLoraKhatriRao;

/* Factors handed to the SVD. @f32 picks the compute dtype (f32 or f64). The
 * data are in the compute dtype, or, when @stored, in @b_dtype and @a_dtype
 * (any dtype lp_dtype_can_convert() accepts, such as a tensor's mapped
 * bytes): they are then converted a cache-sized block at a time, so a
 * factor is never copied whole. */
typedef struct {
  gboolean f32;
  /* With @f32: a module whose Gram matrices are too ill-conditioned for f32
   * sums has them summed again in f64, instead of losing the directions
   * that f32 rounding cannot tell from zero. */
  gboolean f64_fallback;
  gconstpointer b;   /* out × r */
  gconstpointer a;   /* r × in */
  guint64 out;
  guint64 in;
  guint r;
  gboolean stored;
  LpDtype b_dtype;
  LpDtype a_dtype;
  /* (nullable): B and A formed from LoHa's parts (@b, @a, @stored unused,
   * @r = r1·r2). With @f32 the parts must be 16-bit or narrower, whose
   * products are exact in f32. */
  const LpLoraKhatriRao *khatri_rao;
} LpLoraFactors;

/* The exact SVD of B @ A from the factors' Gram matrices. With @top > 0
 * only the @top largest singular values (and their maps) are computed, the
 * rest of @sigma is zero and @total is still the whole Σσ²; 0 asks for all
 * of them. */
LpLoraSpectrum *lp_lora_spectrum_compute (const LpLoraFactors *factors,
                                          guint                top,
                                          gboolean             want_maps,
                                          GError             **error);

/* The @top (1 ≤ top ≤ n) largest eigenpairs of the symmetric n × n @h
 * (column-major, overwritten): eigenvalues ascending in @w, vectors in the
 * columns of @z (n × top, column-major). FALSE if LAPACK fails; the exact
 * SVD then asks dsyevr() instead. */
gboolean  lp_lora_top_eigenpairs    (double        *h,
                                     guint          n,
                                     guint          top,
                                     double        *w,
                                     double        *z);

/* Writes the best rank-k approximation, scaled by @fold, split as √σ into
 * both factors: b_new [out, k_out] and a_new [k_out, in] in the compute dtype
 * of @factors; columns/rows from min(k, n) on are zero (padding). */
void      lp_lora_spectrum_apply    (const LpLoraSpectrum *spectrum,
                                     const LpLoraFactors  *factors,
                                     guint                 k,
                                     guint                 k_out,
                                     double                fold,
                                     gpointer              b_new,
                                     gpointer              a_new);

/* The same, written in @b_dtype and @a_dtype (any convertible dtype)
 * straight from blocks of the products. Returns how many finite values
 * overflowed the output dtypes. */
gsize     lp_lora_spectrum_apply_to (const LpLoraSpectrum *spectrum,
                                     const LpLoraFactors  *factors,
                                     guint                 k,
                                     guint                 k_out,
                                     double                fold,
                                     LpDtype               b_dtype,
                                     gpointer              b_new,
                                     LpDtype               a_dtype,
                                     gpointer              a_new);

/* Random projection of one factor: A' = alpha · R A (@up FALSE) or
 * B' = alpha · B Rᵀ (@up TRUE) for R k × r (f32, row-major), computed in f32
 * a block at a time from the stored @dtype and written in @out_dtype.
 * Returns FALSE if the factor holds a NaN or an infinity; *@overflow counts
 * the finite values that overflowed @out_dtype. */
gboolean  lp_lora_project_factor    (gboolean       up,
                                     LpDtype        dtype,
                                     gconstpointer  data,
                                     guint64        out,
                                     guint64        in,
                                     guint          r,
                                     const float   *proj,
                                     guint          k,
                                     float          alpha,
                                     LpDtype        out_dtype,
                                     gpointer       result,
                                     gsize         *overflow);

/* Randomized SVD (Halko, Martinsson, Tropp) of B @ A: a range finder over
 * k + @oversample columns with @niter power iterations, run in r-space on
 * the factors' Gram matrices. Gives the leading singular values it found and
 * maps for lp_lora_spectrum_apply(); @total is exact. */
LpLoraSpectrum *lp_lora_randomized_spectrum (const LpLoraFactors *factors,
                                             guint                k,
                                             guint                oversample,
                                             guint                niter,
                                             LpLoraRng           *rng,
                                             GError             **error);

/* How many singular values exceed @rel_tol σ₁. */
guint     lp_lora_numerical_rank    (const LpLoraSpectrum *spectrum,
                                     double                rel_tol);

/* ‖X‖², ‖Y‖² and ‖X - Y‖² for X = sx·Bx Ax and Y = sy·By Ay with the same
 * out and in, from r × r products only. */
void      lp_lora_delta_norms       (const double  *bx,
                                     const double  *ax,
                                     guint          rx,
                                     double         sx,
                                     const double  *by,
                                     const double  *ay,
                                     guint          ry,
                                     double         sy,
                                     guint64        out,
                                     guint64        in,
                                     double        *norm2_x,
                                     double        *norm2_y,
                                     double        *norm2_diff);

/* Rank selection on a descending spectrum of @n values (trailing zeros
 * allowed), with kohya sd-scripts' meanings for the sv-* criteria; @full_len
 * is min(out, in), the length kohya's dense SVD would have. All return ≥ 1. */
guint     lp_lora_rank_for_energy   (const double  *sigma,
                                     guint          n,
                                     double         fraction);
guint     lp_lora_rank_sv_ratio     (const double  *sigma,
                                     guint          n,
                                     guint64        full_len,
                                     double         ratio);
guint     lp_lora_rank_sv_fro       (const double  *sigma,
                                     guint          n,
                                     guint64        full_len,
                                     double         target);
guint     lp_lora_rank_sv_cumulative (const double *sigma,
                                      guint         n,
                                      guint64       full_len,
                                      double        target);

G_END_DECLS
