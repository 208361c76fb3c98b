/* test-lora-math.c: the shared LoRA numerics against dense LAPACK
 *
 * The oracle here is the dense SVD of B @ A (LAPACKE_dgesdd on the small
 * out × in matrix), which the code under test never forms. The stage tests
 * check the same results against numpy.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <math.h>
#include <string.h>
#include <cblas.h>
#include <lapacke.h>

#include "lp-lora-kernels.h"
#include "lp-lora-math.h"

static double *
random_matrix (LpLoraRng *rng, gsize rows, gsize cols)
{
  double *m = g_new (double, rows * cols);
  for (gsize i = 0; i < rows * cols; i++)
    m[i] = lp_lora_rng_normal (rng);
  return m;
}

static double *
dense (const double *b, const double *a, guint64 out, guint r, guint64 in)
{
  double *d = g_new0 (double, out * in);
  if (r > 0)
    cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, out, in, r, 1.0, b, r, a, in, 0.0, d, in);
  return d;
}

/* the singular values of the dense product */
static double *
dense_sigma (const double *d, guint64 out, guint64 in)
{
  guint64 n = MIN (out, in);
  double *copy = g_memdup2 (d, sizeof (double) * out * in);
  double *s = g_new (double, n);
  double *superb = g_new (double, n);
  g_assert_cmpint (LAPACKE_dgesvd (LAPACK_ROW_MAJOR, 'N', 'N', out, in, copy, in, s,
                                   NULL, 1, NULL, 1, superb), ==, 0);
  g_free (copy);
  g_free (superb);
  return s;
}

static double
fro2_diff (const double *x, const double *y, gsize n)
{
  double acc = 0;
  for (gsize i = 0; i < n; i++)
    acc += (x[i] - y[i]) * (x[i] - y[i]);
  return acc;
}

typedef struct {
  guint64 out, in;
  guint r, k;
  guint deficient;   /* make the factors of this true rank (0: full) */
  gboolean zero_b;
  gboolean f32;
  guint top;         /* ask for only this many singular values (0: all) */
  gboolean fallback; /* f32 sums, redone in f64 where too ill-conditioned */
  gboolean flat;     /* orthonormal factors, σ_j = 1 − j/500: too flat for the block iteration */
} SvdCase;

/* Orthonormalizes the columns of the row-major @rows × @cols matrix @m
 * (rows ≥ cols) in place: Householder QR. */
static void
orthonormal_columns (double *m, guint64 rows, guint cols)
{
  g_autofree double *tau = g_new (double, cols);
  g_assert_cmpint (LAPACKE_dgeqrf (LAPACK_ROW_MAJOR, rows, cols, m, cols, tau), ==, 0);
  g_assert_cmpint (LAPACKE_dorgqr (LAPACK_ROW_MAJOR, rows, cols, cols, m, cols, tau), ==, 0);
}

static void
check_exact (const SvdCase *c, guint64 seed)
{
  LpLoraRng rng;
  lp_lora_rng_init (&rng, seed, "exact");
  g_autofree double *b = random_matrix (&rng, c->out, c->r);
  g_autofree double *a = random_matrix (&rng, c->r, c->in);

  if (c->flat)
    {
      /* B = Q_B diag (σ), A = Q_Aᵀ: exactly that spectrum */
      g_autofree double *at = g_new (double, c->in * c->r);
      orthonormal_columns (b, c->out, c->r);
      for (guint j = 0; j < c->r; j++)
        for (guint64 i = 0; i < c->in; i++)
          at[i * c->r + j] = a[j * c->in + i];
      orthonormal_columns (at, c->in, c->r);
      for (guint j = 0; j < c->r; j++)
        for (guint64 i = 0; i < c->in; i++)
          a[j * c->in + i] = at[i * c->r + j];
      for (guint j = 0; j < c->r; j++)
        for (guint64 i = 0; i < c->out; i++)
          b[i * c->r + j] *= 1.0 - j / 500.0;
    }
  else
    /* spread the spectrum so truncation is meaningful */
    for (guint j = 0; j < c->r; j++)
      for (guint64 i = 0; i < c->out; i++)
        b[i * c->r + j] *= pow (0.7, j);
  if (c->deficient)
    for (guint j = c->deficient; j < c->r; j++)
      for (guint64 i = 0; i < c->out; i++)
        b[i * c->r + j] = b[i * c->r + (j % c->deficient)];   /* duplicated columns */
  if (c->zero_b)
    memset (b, 0, sizeof (double) * c->out * c->r);

  g_autofree double *d = dense (b, a, c->out, c->r, c->in);
  g_autofree double *sd = dense_sigma (d, c->out, c->in);
  guint64 nd = MIN (c->out, c->in);

  g_autofree float *bf = NULL, *af = NULL;
  LpLoraFactors f = { .f32 = c->f32, .f64_fallback = c->fallback, .b = b, .a = a,
                      .out = c->out, .in = c->in, .r = c->r };
  if (c->f32)
    {
      bf = g_new (float, c->out * c->r);
      af = g_new (float, c->r * c->in);
      for (gsize i = 0; i < c->out * c->r; i++)
        bf[i] = b[i];
      for (gsize i = 0; i < c->r * c->in; i++)
        af[i] = a[i];
      f.b = bf;
      f.a = af;
    }

  g_autoptr (GError) error = NULL;
  g_autoptr (LpLoraSpectrum) s = lp_lora_spectrum_compute (&f, c->top, TRUE, &error);
  g_assert_no_error (error);
  g_assert_nonnull (s);

  /* f32 sums without the fallback lose singular values below about
   * √(r·1e-6) σ₁ when a factor is that ill-conditioned */
  double tol = !c->f32 ? 1e-9 : c->fallback ? 1e-3 : 1e-2;
  double s0 = sd[0] > 0 ? sd[0] : 1;
  double total = 0;
  for (guint64 i = 0; i < nd; i++)
    total += sd[i] * sd[i];
  g_assert_cmpfloat (fabs (s->total - total), <=, (c->f32 ? 1e-5 : 1e-10) * MAX (total, 1e-300));
  if (c->top)
    g_assert_cmpuint (s->n, <=, c->top);
  for (guint i = 0; i < c->r; i++)
    {
      double expected = i < nd && (c->top == 0 || i < c->top) ? sd[i] : 0;
      if (fabs (s->sigma[i] - expected) > tol * s0)
        g_error ("case %u×%u r %u top %u f32 %d: sigma[%u] = %g, expected %g",
                 (guint) c->out, (guint) c->in, c->r, c->top, c->f32, i, s->sigma[i], expected);
    }

  guint k_out = c->k + 2;   /* two padded zero columns */
  gsize eb = c->f32 ? sizeof (float) : sizeof (double);
  g_autofree gpointer b_new = g_malloc (eb * c->out * k_out);
  g_autofree gpointer a_new = g_malloc (eb * k_out * c->in);
  lp_lora_spectrum_apply (s, &f, c->k, k_out, 2.0, b_new, a_new);

  g_autofree double *b64 = g_new (double, c->out * k_out);
  g_autofree double *a64 = g_new (double, k_out * c->in);
  for (gsize i = 0; i < c->out * k_out; i++)
    b64[i] = c->f32 ? ((float *) b_new)[i] : ((double *) b_new)[i];
  for (gsize i = 0; i < k_out * c->in; i++)
    a64[i] = c->f32 ? ((float *) a_new)[i] : ((double *) a_new)[i];
  g_assert_true (lp_lora_all_finite_f64 (b64, c->out * k_out));
  g_assert_true (lp_lora_all_finite_f64 (a64, k_out * c->in));

  /* padded rows and columns are exactly zero */
  for (guint64 i = 0; i < c->out; i++)
    for (guint j = c->k; j < k_out; j++)
      g_assert_cmpfloat (b64[i * k_out + j], ==, 0.0);

  /* Eckart–Young: ‖2·BA − B'A'‖² = 4 Σ_{i≥k} σ_i² */
  g_autofree double *d_new = dense (b64, a64, c->out, k_out, c->in);
  for (gsize i = 0; i < c->out * c->in; i++)
    d[i] *= 2;
  double err2 = fro2_diff (d, d_new, c->out * c->in);
  double opt2 = 0, total2 = 0;
  for (guint64 i = 0; i < nd; i++)
    {
      total2 += 4 * sd[i] * sd[i];
      if (i >= c->k)
        opt2 += 4 * sd[i] * sd[i];
    }
  if (total2 == 0)
    g_assert_cmpfloat (err2, ==, 0.0);
  else
    g_assert_cmpfloat (fabs (sqrt (err2) - sqrt (opt2)) / sqrt (total2), <=, c->f32 ? 1e-4 : 1e-9);

  /* √σ split: the columns of B' and rows of A' have equal norms */
  for (guint j = 0; j < MIN (c->k, s->n); j++)
    {
      double nb = 0, na = 0;
      for (guint64 i = 0; i < c->out; i++)
        nb += b64[i * k_out + j] * b64[i * k_out + j];
      for (guint64 i = 0; i < c->in; i++)
        na += a64[j * c->in + i] * a64[j * c->in + i];
      g_assert_cmpfloat (fabs (sqrt (nb) - sqrt (na)), <=, (c->f32 ? 1e-3 : 1e-8) * sqrt (nb + na));
    }
}

static void
test_exact (void)
{
  static const SvdCase cases[] = {
    { 40, 30, 8, 3, 0, FALSE, FALSE },
    { 30, 50, 12, 5, 0, FALSE, FALSE },
    { 6, 40, 10, 4, 0, FALSE, FALSE },      /* r > out */
    { 40, 5, 10, 4, 0, FALSE, FALSE },      /* r > in */
    { 40, 30, 8, 6, 3, FALSE, FALSE },      /* rank deficient, k above the true rank */
    { 40, 30, 8, 2, 3, FALSE, FALSE },
    { 40, 30, 8, 3, 0, TRUE, FALSE },       /* zero B */
    { 64, 48, 16, 4, 0, FALSE, TRUE },      /* f32 compute */
    { 1, 1, 1, 1, 0, FALSE, FALSE },
    /* the Cholesky route with the top singular values only, and its
     * fallback to the eigen route on rank-deficient factors */
    { 40, 30, 8, 3, 0, FALSE, FALSE, 3 },
    { 300, 200, 42, 4, 0, FALSE, TRUE, 4 },
    { 300, 200, 42, 4, 0, FALSE, TRUE, 4, TRUE },
    { 300, 200, 42, 4, 0, FALSE, TRUE },
    { 300, 200, 42, 4, 0, FALSE, TRUE, 0, TRUE },
    { 40, 30, 8, 2, 3, FALSE, FALSE, 2 },
    { 40, 30, 8, 2, 3, FALSE, TRUE, 2, TRUE },
    { 40, 30, 8, 3, 0, TRUE, TRUE, 3, TRUE },
    { 33, 70, 17, 5, 0, FALSE, TRUE, 5, TRUE },
    /* r ≥ 64 with few singular values: the block iteration (f64 and f32
     * sums, ill-conditioned B, rank-deficient, zero B, r above in), and the
     * blocked Gram kernels under every route */
    { 300, 200, 64, 4, 0, FALSE, FALSE, 4 },
    { 300, 200, 96, 4, 0, FALSE, TRUE, 4 },
    { 300, 200, 96, 4, 0, FALSE, TRUE, 4, TRUE },
    { 300, 200, 80, 6, 20, FALSE, FALSE, 6 },
    { 300, 200, 80, 6, 2, FALSE, TRUE, 6, TRUE },
    { 300, 200, 80, 3, 0, TRUE, FALSE, 3 },
    { 150, 100, 129, 4, 0, FALSE, TRUE, 4, TRUE },
    { 300, 200, 129, 5, 0, FALSE, FALSE, 5 },
    { 300, 200, 64, 4, 0, FALSE, TRUE },
    { 300, 200, 70, 4, 0, FALSE, TRUE, 0, TRUE },
    /* a spectrum on which the iteration gives up: the dense route */
    { 300, 200, 96, 4, 0, FALSE, FALSE, 4, FALSE, TRUE },
    { 300, 200, 96, 4, 0, FALSE, TRUE, 4, TRUE, TRUE },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    check_exact (&cases[i], 1000 + i);
}

/* LoHa's Khatri–Rao factors, formed by the math a block at a time from the
 * four parts as stored: the spectrum and the rank-k factors of
 * (u1 v1) ⊙ (u2 v2) against the dense SVD of that Hadamard product, for
 * every dtype route (bf16 and f16 parts summed in f32, f32 and f64 parts in
 * f64), ranks r1·r2 below, at and above the blocked kernels' 64, and sizes
 * that cross the blocks with ragged ends. */
typedef struct {
  guint64 out, in;
  guint r1, r2, k, top;
  LpDtype dtype;
} KhatriRaoCase;

static gpointer
stored_part (LpLoraRng *rng, LpDtype dtype, gsize n, double *exact)
{
  gsize size = lp_dtype_get_bits (dtype) / 8;
  gpointer bytes = g_malloc (n * size);
  for (gsize i = 0; i < n; i++)
    exact[i] = 0.5 * lp_lora_rng_normal (rng);
  lp_dtype_from_f64 (dtype, exact, bytes, n);
  lp_dtype_to_f64 (dtype, bytes, exact, n);   /* the values as stored */
  return bytes;
}

static void
check_khatri_rao (const KhatriRaoCase *c, guint64 seed)
{
  LpLoraRng rng;
  guint R = c->r1 * c->r2;
  guint64 out = c->out, in = c->in;
  g_autofree double *u1 = g_new (double, out * c->r1), *v1 = g_new (double, c->r1 * in);
  g_autofree double *u2 = g_new (double, out * c->r2), *v2 = g_new (double, c->r2 * in);

  lp_lora_rng_init (&rng, seed, "khatri-rao");
  g_autofree gpointer su1 = stored_part (&rng, c->dtype, out * c->r1, u1);
  g_autofree gpointer sv1 = stored_part (&rng, c->dtype, c->r1 * in, v1);
  g_autofree gpointer su2 = stored_part (&rng, c->dtype, out * c->r2, u2);
  g_autofree gpointer sv2 = stored_part (&rng, c->dtype, c->r2 * in, v2);

  g_autofree double *d = dense (u1, v1, out, c->r1, in);
  g_autofree double *d2 = dense (u2, v2, out, c->r2, in);
  for (gsize i = 0; i < out * in; i++)
    d[i] *= d2[i];
  g_autofree double *sd = dense_sigma (d, out, in);
  guint64 nd = MIN (out, in);

  gboolean f32 = lp_dtype_get_bits (c->dtype) <= 16;
  LpLoraKhatriRao kr = { c->dtype, su1, sv1, su2, sv2, c->r1, c->r2 };
  LpLoraFactors f = { .f32 = f32, .f64_fallback = f32, .out = out, .in = in, .r = R, .khatri_rao = &kr };
  g_autoptr (GError) error = NULL;
  g_autoptr (LpLoraSpectrum) s = lp_lora_spectrum_compute (&f, c->top, TRUE, &error);
  g_assert_no_error (error);

  double total = 0;
  for (guint64 i = 0; i < nd; i++)
    total += sd[i] * sd[i];
  g_assert_cmpfloat (fabs (s->total - total), <=, (f32 ? 1e-5 : 1e-10) * total);
  for (guint i = 0; i < MIN (R, c->top ? c->top : R); i++)
    if (fabs (s->sigma[i] - (i < nd ? sd[i] : 0)) > (f32 ? 1e-4 : 1e-9) * sd[0])
      g_error ("Khatri–Rao %u×%u r %u·%u %s: sigma[%u] = %g, expected %g", (guint) out, (guint) in,
               c->r1, c->r2, lp_dtype_to_string (c->dtype), i, s->sigma[i], sd[i]);

  /* the rank-k factors, written as f32 (as a stage writes its output
   * dtype), reach Eckart–Young's optimum */
  g_autofree float *b_new = g_new (float, out * c->k);
  g_autofree float *a_new = g_new (float, c->k * in);
  lp_lora_spectrum_apply_to (s, &f, c->k, c->k, 1.0, LP_DTYPE_F32, b_new, LP_DTYPE_F32, a_new);
  g_autofree double *b64 = g_new (double, out * c->k), *a64 = g_new (double, c->k * in);
  for (gsize i = 0; i < out * c->k; i++)
    b64[i] = b_new[i];
  for (gsize i = 0; i < c->k * in; i++)
    a64[i] = a_new[i];
  g_autofree double *d_new = dense (b64, a64, out, c->k, in);
  double opt2 = 0;
  for (guint64 i = c->k; i < nd; i++)
    opt2 += sd[i] * sd[i];
  double err = sqrt (fro2_diff (d, d_new, out * in)), opt = sqrt (opt2);
  /* f32 outputs: their own rounding, about 1e-7 of the update */
  if (fabs (err - opt) > 1e-5 * sqrt (total))
    g_error ("Khatri–Rao %u×%u r %u·%u %s k %u: error %g, optimum %g", (guint) out, (guint) in,
             c->r1, c->r2, lp_dtype_to_string (c->dtype), c->k, err, opt);
}

static void
test_khatri_rao (void)
{
  static const KhatriRaoCase cases[] = {
    { 300, 517, 8, 8, 16, 16, LP_DTYPE_BF16 },    /* Flux's dim 8: R = 64, blocked kernels */
    { 300, 517, 8, 8, 16, 0, LP_DTYPE_BF16 },
    { 700, 301, 8, 8, 20, 20, LP_DTYPE_BF16 },    /* two output vectors, the second ragged */
    { 1000, 130, 8, 9, 12, 12, LP_DTYPE_F16 },    /* R = 72: ragged groups and vectors */
    { 70, 45, 3, 5, 6, 6, LP_DTYPE_BF16 },        /* R = 15: the small kernels */
    { 70, 45, 3, 5, 6, 0, LP_DTYPE_F32 },         /* f64 sums */
    { 260, 300, 8, 8, 10, 10, LP_DTYPE_F64 },
    { 20, 300, 5, 5, 8, 8, LP_DTYPE_BF16 },       /* R above out */
    { 300, 280, 16, 16, 24, 24, LP_DTYPE_BF16 },  /* R = 256: the most the permutes pick from */
    { 200, 150, 16, 3, 8, 8, LP_DTYPE_F16 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    check_khatri_rao (&cases[i], 77 + i);
}

/* The f32 Gram kernels on small integers, whose products and sums are
 * exact in f32: the upper triangle must be exactly the f64 Gram matrix and
 * the lower one untouched, for ranks around every tile and vector width. */
static void
test_gram_kernels (void)
{
  static const guint ranks[] = { 1, 2, 3, 4, 5, 6, 7, 12, 15, 16, 17, 31, 32, 33, 42, 64, 70 };
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 11, "kernels");

  for (guint c = 0; c < G_N_ELEMENTS (ranks); c++)
    {
      guint r = ranks[c];
      /* rows of Y, and columns of X padded to 16 below; every third case
       * spans several blocks of the kernels */
      gsize n = 48 + c + (c % 3 == 0 ? 2100 : 0);
      gsize w = (n + 15) / 16 * 16;
      g_autofree float *y = g_new0 (float, n * r + LP_LORA_KERNEL_SLACK);
      g_autofree float *x = g_new0 (float, r * w);
      g_autofree double *expect = g_new0 (double, (gsize) r * r);
      g_autofree double *g_rows = g_new0 (double, (gsize) r * r);
      g_autofree double *g_cols = g_new0 (double, (gsize) r * r);

      for (gsize t = 0; t < n; t++)
        for (guint i = 0; i < r; i++)
          {
            float v = (float) (lp_lora_rng_next (&rng) % 17) - 8.f;
            y[t * r + i] = v;    /* Y [n, r] */
            x[i * w + t] = v;    /* X = Yᵀ [r, w], zero padded */
          }
      /* the slack is read but must not count */
      for (guint i = 0; i < LP_LORA_KERNEL_SLACK; i++)
        y[n * r + i] = 1e30f;
      for (guint i = 0; i < r; i++)
        for (guint j = i; j < r; j++)
          for (gsize t = 0; t < n; t++)
            expect[i * r + j] += (double) y[t * r + i] * y[t * r + j];

      /* twice: the kernels add to what is there */
      for (int pass = 0; pass < 2; pass++)
        {
          lp_lora_gram_rows_f32 (x, w, r, w, g_rows);
          lp_lora_gram_cols_f32 (y, r, n, g_cols);
        }
      for (guint i = 0; i < r; i++)
        for (guint j = 0; j < r; j++)
          {
            double e = j >= i ? 2 * expect[i * r + j] : 0;
            if (g_rows[i * r + j] != e || g_cols[i * r + j] != e)
              g_error ("r = %u, G[%u][%u]: rows kernel %g, cols kernel %g, expected %g",
                       r, i, j, g_rows[i * r + j], g_cols[i * r + j], e);
          }

      /* the bf16 kernels, on the same values stored as bf16 (exactly), in
       * buffers of exactly their size so that reading past them shows
       * under ASan */
      if (!lp_lora_have_bf16_dot ())
        continue;
      g_autofree guint16 *yb = g_new (guint16, n * r);
      g_autofree guint16 *xb = g_new (guint16, r * n);
      g_autofree gpointer scratch = g_malloc (lp_lora_gram_bf16_scratch_size (r));
      for (gsize t = 0; t < n; t++)
        for (guint i = 0; i < r; i++)
          {
            guint32 bits;
            memcpy (&bits, &y[t * r + i], 4);
            yb[t * r + i] = xb[i * n + t] = bits >> 16;
          }
      memset (g_rows, 0, sizeof (double) * r * r);
      memset (g_cols, 0, sizeof (double) * r * r);
      lp_lora_gram_rows_bf16 (xb, r, n, g_rows);
      lp_lora_gram_cols_bf16 (yb, r, n, g_cols, scratch);
      for (guint i = 0; i < r; i++)
        for (guint j = 0; j < r; j++)
          {
            double e = j >= i ? expect[i * r + j] : 0;
            if (g_rows[i * r + j] != e || g_cols[i * r + j] != e)
              g_error ("bf16, r = %u, G[%u][%u]: rows kernel %g, cols kernel %g, expected %g",
                       r, i, j, g_rows[i * r + j], g_cols[i * r + j], e);
          }
    }
}

/* bf16 as f32 (exactly) */
static float
bf16_value (guint16 bits)
{
  guint32 wide = (guint32) bits << 16;
  float f;
  memcpy (&f, &wide, sizeof f);
  return f;
}

/* The upper triangle of Yᵀ Y summed in f64, and the sums of |products|. */
static void
reference_gram (const float *y, guint r, gsize n, double *expect, double *bound)
{
  memset (expect, 0, sizeof (double) * r * r);
  if (bound)
    memset (bound, 0, sizeof (double) * r * r);
  for (guint i = 0; i < r; i++)
    for (guint j = i; j < r; j++)
      for (gsize t = 0; t < n; t++)
        {
          double p = (double) y[t * r + i] * y[t * r + j];
          expect[i * r + j] += p;
          if (bound)
            bound[i * r + j] += fabs (p);
        }
}

/* One run of each blocked kernel on Y [n, r] (and X = Yᵀ [r, n] at a
 * stride of @ld ≥ n; and both as bf16, truncated, where the machine has
 * the bf16 kernels), each into a G that holds a base value: checks that
 * they add their products to the upper triangle, to within @tol times the
 * sum of |products| of each entry (0: exactly), and leave the lower one. */
static void
check_blocked (const float *y, const float *x, gsize ld, guint r, gsize n, double tol, const char *what)
{
  gsize rr = (gsize) r * r;
  g_autofree double *expect = g_new (double, rr);
  g_autofree double *expect_bf16 = g_new (double, rr);
  g_autofree double *bound = g_new (double, rr);
  g_autofree double *got = g_new (double, rr);
  g_autofree gpointer scratch = g_malloc (lp_lora_gram_blocked_scratch_size (r));
  /* the bf16 copies in buffers of exactly their size */
  g_autofree guint16 *yb = g_new (guint16, MAX (n * r, 1));
  g_autofree guint16 *xb = g_new (guint16, MAX (r * n, 1));
  g_autofree float *yt = g_new (float, MAX (n * r, 1));   /* what bf16 holds, as f32 */
  static const char *names[4] = { "rows f32", "cols f32", "rows bf16", "cols bf16" };

  for (gsize t = 0; t < n; t++)
    for (guint i = 0; i < r; i++)
      {
        guint32 bits;
        memcpy (&bits, &y[t * r + i], 4);
        yb[t * r + i] = xb[i * n + t] = bits >> 16;
        yt[t * r + i] = bf16_value (bits >> 16);
      }
  reference_gram (y, r, n, expect, bound);
  reference_gram (yt, r, n, expect_bf16, NULL);

  for (guint k = 0; k < (lp_lora_have_bf16_dot () ? 4u : 2u); k++)
    {
      for (gsize i = 0; i < rr; i++)
        got[i] = i / r <= i % r ? 0.5 : -7.0;
      switch (k)
        {
        case 0: lp_lora_gram_blocked_rows_f32 (x, ld, r, n, got, scratch); break;
        case 1: lp_lora_gram_blocked_cols_f32 (y, r, n, got, scratch); break;
        case 2: lp_lora_gram_blocked_rows_bf16 (xb, r, n, got, scratch); break;
        default: lp_lora_gram_blocked_cols_bf16 (yb, r, n, got, scratch); break;
        }
      for (guint i = 0; i < r; i++)
        for (guint j = 0; j < r; j++)
          {
            double have = got[i * r + j];
            double want = j < i ? -7.0 : 0.5 + (k < 2 ? expect : expect_bf16)[i * r + j];
            double allowed = j < i ? 0 : tol * bound[i * r + j];
            if (!(fabs (have - want) <= allowed))
              g_error ("%s, %s, r %u n %u: G[%u][%u] = %.17g, expected %.17g (tolerance %g)",
                       what, names[k], r, (guint) n, i, j, have, want, allowed);
          }
    }
}

/* The blocked Gram kernels against a plain f64 sum, at ranks around their
 * tile (6 rows by 4 × 16 columns) and panel (128 steps, 256 bf16 values)
 * sizes and at odd lengths: small integers, whose f32 sums are exact, must
 * come out exactly; Gaussian values within the f32 rounding of one panel's
 * sums (2 × 256 × 2⁻²⁴ of the sum of |products|). */
static void
test_blocked_gram_kernels (void)
{
  static const guint ranks[] = { 1, 3, 17, 64, 129, 256, 512 };
  static const gsize lengths[] = { 1, 37, 301, 777 };
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 14, "blocked kernels");

  for (guint c = 0; c < G_N_ELEMENTS (ranks); c++)
    for (guint d = 0; d < G_N_ELEMENTS (lengths); d++)
      for (int gaussian = 0; gaussian < 2; gaussian++)
        {
          guint r = ranks[c];
          gsize n = lengths[d], ld = n + (d & 1) * 3;   /* X also at a stride past its rows */
          if (gaussian && r * n > 256 * 301)
            continue;   /* the exact cases cover the large sizes */
          g_autofree float *y = g_new (float, n * r);
          g_autofree float *x = g_new (float, r * ld);
          for (gsize t = 0; t < n; t++)
            for (guint i = 0; i < r; i++)
              {
                float v = gaussian ? (float) lp_lora_rng_normal (&rng)
                                   : (float) (lp_lora_rng_next (&rng) % 17) - 8.f;
                y[t * r + i] = v;
                x[i * ld + t] = v;
              }
          for (guint i = 0; i < r; i++)
            for (gsize t = n; t < ld; t++)
              x[i * ld + t] = 1e30f;   /* past the rows: must not count */
          check_blocked (y, x, ld, r, n, gaussian ? 2.0 * 256 * 0x1.0p-24 : 0.0,
                         gaussian ? "gaussian" : "integers");
        }
}

/* The map kernels (A' = M A, B' = B M) on small integers, exact in f32,
 * for ranks and widths around the tile and vector sizes. */
static void
test_map_kernels (void)
{
  static const guint ranks[] = { 1, 3, 4, 5, 15, 16, 17, 42, 64 };
  static const guint ks[] = { 1, 2, 3, 4, 5, 8, 9 };
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 12, "map kernels");

  for (guint c = 0; c < G_N_ELEMENTS (ranks); c++)
    for (guint d = 0; d < G_N_ELEMENTS (ks); d++)
      {
        guint r = ranks[c], k = ks[d];
        gsize n = 37 + 8 * c + d;   /* columns of A, rows of B */
        gsize stride = LP_LORA_MAP_COLS_STRIDE (r);
        g_autofree float *m = g_new (float, (gsize) k * r);          /* M [k, r] for A */
        g_autofree float *mt = g_new0 (float, stride * ((k + 3) / 4 * 4));   /* Mᵀ for B */
        g_autofree float *x = g_new (float, (gsize) r * n + LP_LORA_KERNEL_SLACK);
        g_autofree float *ya = g_new (float, (gsize) k * n);
        g_autofree float *yb = g_new (float, n * k);

        for (gsize i = 0; i < (gsize) k * r; i++)
          m[i] = (float) (lp_lora_rng_next (&rng) % 9) - 4.f;
        for (guint i = 0; i < k; i++)
          for (guint s = 0; s < r; s++)
            mt[i * stride + s] = m[i * r + s];
        for (gsize i = 0; i < (gsize) r * n; i++)
          x[i] = (float) (lp_lora_rng_next (&rng) % 17) - 8.f;
        for (gsize i = 0; i < LP_LORA_KERNEL_SLACK; i++)
          x[r * n + i] = 0.f;

        /* the same values as bf16 (exact), with the slack the kernels read */
        g_autofree guint16 *xb = g_new0 (guint16, (gsize) r * n + LP_LORA_KERNEL_SLACK);
        for (gsize i = 0; i < (gsize) r * n; i++)
          {
            guint32 bits;
            memcpy (&bits, &x[i], 4);
            xb[i] = bits >> 16;
          }

        for (int bf16 = 0; bf16 < 2; bf16++)
          {
            /* A = x as [r, n]: A' = M A; B = x as [n, r]: B' = B Mᵀ */
            if (bf16)
              {
                lp_lora_map_rows_bf16 (m, k, r, xb, n, n, ya, n);
                lp_lora_map_cols_bf16 (mt, k, r, xb, n, yb);
              }
            else
              {
                lp_lora_map_rows_f32 (m, k, r, x, n, n, ya, n);
                lp_lora_map_cols_f32 (mt, k, r, x, n, yb);
              }
            for (guint i = 0; i < k; i++)
              for (gsize t = 0; t < n; t++)
                {
                  double ea = 0, eb = 0;
                  for (guint s = 0; s < r; s++)
                    {
                      ea += (double) m[i * r + s] * x[s * n + t];
                      eb += (double) x[t * r + s] * m[i * r + s];
                    }
                  if (ya[i * n + t] != ea || yb[t * k + i] != eb)
                    g_error ("%s, r %u k %u: (%u, %u): rows %g (expected %g), cols %g (expected %g)",
                             bf16 ? "bf16" : "f32", r, k, i, (guint) t, ya[i * n + t], ea, yb[t * k + i], eb);
                }
          }

        /* the NaN scan of bf16, at every position of a vector and its tail */
        g_assert_true (lp_lora_all_finite_bf16 (xb, (gsize) r * n));
        for (gsize at = 0; at < MIN ((gsize) r * n, 70); at++)
          {
            guint16 keep = xb[at];
            xb[at] = (at & 1) ? 0x7fc0 : 0xff80;   /* NaN, -inf */
            g_assert_false (lp_lora_all_finite_bf16 (xb, (gsize) r * n));
            xb[at] = keep;
          }
      }
}

/* The top eigenpairs against LAPACK's full eigendecomposition, on matrices
 * whose tridiagonal form splits into blocks (block diagonal), with repeated
 * eigenvalues, and on a plain dense one. */
static void
test_top_eigenpairs (void)
{
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 13, "eigen");

  for (guint shape = 0; shape < 4; shape++)
    {
      guint n = shape == 3 ? 42 : 17;
      g_autofree double *h = g_new0 (double, n * n);

      if (shape == 0)   /* dense */
        {
          g_autofree double *x = random_matrix (&rng, n, n);
          cblas_dgemm (CblasColMajor, CblasTrans, CblasNoTrans, n, n, n, 1.0, x, n, x, n, 0.0, h, n);
        }
      else if (shape == 1 || shape == 3)   /* blocks of 6, 5, 4 … and a zero tail */
        {
          guint start = 0;
          for (guint size = 6; size > 0 && start + size <= n; start += size, size--)
            {
              g_autofree double *x = random_matrix (&rng, size, size);
              for (guint i = 0; i < size; i++)
                for (guint j = 0; j < size; j++)
                  {
                    double acc = 0;
                    for (guint t = 0; t < size; t++)
                      acc += x[t * size + i] * x[t * size + j];
                    h[(start + j) * n + start + i] = acc * (1 + size);
                  }
            }
        }
      else   /* repeated eigenvalues: 3·I on the first 5, 1·I on the rest */
        for (guint i = 0; i < n; i++)
          h[i * n + i] = i < 5 ? 3.0 : 1.0;

      g_autofree double *full = g_memdup2 (h, sizeof (double) * n * n);
      g_autofree double *all = g_new (double, n);
      g_assert_cmpint (LAPACKE_dsyevd (LAPACK_COL_MAJOR, 'N', 'U', n, full, n, all), ==, 0);

      for (guint top = 1; top <= 5; top++)
        {
          g_autofree double *work = g_memdup2 (h, sizeof (double) * n * n);
          g_autofree double *w = g_new (double, top);
          g_autofree double *z = g_new (double, n * top);
          g_assert_true (lp_lora_top_eigenpairs (work, n, top, w, z));

          double scale = MAX (fabs (all[n - 1]), 1e-300);
          for (guint i = 0; i < top; i++)
            {
              g_assert_cmpfloat (fabs (w[i] - all[n - top + i]), <=, 1e-12 * scale);
              /* residual ‖H z − λ z‖ and orthonormality */
              for (guint t = 0; t < n; t++)
                {
                  double acc = -w[i] * z[i * n + t];
                  for (guint j = 0; j < n; j++)
                    acc += h[j * n + t] * z[i * n + j];
                  g_assert_cmpfloat (fabs (acc), <=, 1e-10 * scale);
                }
              for (guint j = 0; j <= i; j++)
                {
                  double dot = 0;
                  for (guint t = 0; t < n; t++)
                    dot += z[i * n + t] * z[j * n + t];
                  g_assert_cmpfloat (fabs (dot - (i == j)), <=, 1e-10);
                }
            }
        }
    }
}

static void
test_randomized (void)
{
  guint64 out = 60, in = 50;
  guint r = 16, k = 4;
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 7, "randomized");
  g_autofree double *b = random_matrix (&rng, out, r);
  g_autofree double *a = random_matrix (&rng, r, in);
  for (guint j = 0; j < r; j++)
    for (guint64 i = 0; i < out; i++)
      b[i * r + j] *= pow (0.6, j);

  g_autofree double *d = dense (b, a, out, r, in);
  g_autofree double *sd = dense_sigma (d, out, in);
  g_autofree double *b_new = g_new (double, out * k);
  g_autofree double *a_new = g_new (double, k * in);
  g_autoptr (GError) error = NULL;
  LpLoraFactors f = { .b = b, .a = a, .out = out, .in = in, .r = r };

  LpLoraRng draw;
  lp_lora_rng_init (&draw, 1, "m");
  g_autoptr (LpLoraSpectrum) s = lp_lora_randomized_spectrum (&f, k, 2, 1, &draw, &error);
  g_assert_no_error (error);
  lp_lora_spectrum_apply (s, &f, k, k, 1.0, b_new, a_new);

  g_autofree double *d_new = dense (b_new, a_new, out, k, in);
  double err = sqrt (fro2_diff (d, d_new, out * in));
  double opt2 = 0, total2 = 0;
  for (guint64 i = 0; i < MIN (out, in); i++)
    {
      total2 += sd[i] * sd[i];
      if (i >= k)
        opt2 += sd[i] * sd[i];
    }
  /* close to the optimum on a decaying spectrum, with a small sketch */
  g_assert_cmpfloat (err, <=, 1.01 * sqrt (opt2));
  for (guint i = 0; i < k; i++)
    g_assert_cmpfloat (fabs (s->sigma[i] - sd[i]), <=, 1e-3 * sd[0]);
  g_assert_cmpfloat (fabs (s->total - total2), <=, 1e-10 * total2);

  /* the same seed and name give the same bytes */
  g_autofree double *b2 = g_new (double, out * k);
  g_autofree double *a2 = g_new (double, k * in);
  lp_lora_rng_init (&draw, 1, "m");
  g_autoptr (LpLoraSpectrum) s2 = lp_lora_randomized_spectrum (&f, k, 2, 1, &draw, &error);
  lp_lora_spectrum_apply (s2, &f, k, k, 1.0, b2, a2);
  g_assert_cmpmem (b_new, sizeof (double) * out * k, b2, sizeof (double) * out * k);
  g_assert_cmpmem (a_new, sizeof (double) * k * in, a2, sizeof (double) * k * in);

  /* with the sketch as wide as the rank it is exact */
  lp_lora_rng_init (&draw, 1, "m");
  g_autoptr (LpLoraSpectrum) s3 = lp_lora_randomized_spectrum (&f, k, r, 0, &draw, &error);
  lp_lora_spectrum_apply (s3, &f, k, k, 1.0, b2, a2);
  g_autofree double *d3 = dense (b2, a2, out, k, in);
  g_assert_cmpfloat (fabs (sqrt (fro2_diff (d, d3, out * in)) - sqrt (opt2)), <=, 1e-8 * sqrt (total2));

  /* a zero B gives zeros, not NaN */
  memset (b, 0, sizeof (double) * out * r);
  lp_lora_rng_init (&draw, 1, "m");
  g_autoptr (LpLoraSpectrum) s4 = lp_lora_randomized_spectrum (&f, k, 2, 1, &draw, &error);
  g_assert_no_error (error);
  lp_lora_spectrum_apply (s4, &f, k, k, 1.0, b_new, a_new);
  for (gsize i = 0; i < out * k; i++)
    g_assert_cmpfloat (b_new[i], ==, 0.0);
  for (gsize i = 0; i < k * in; i++)
    g_assert_cmpfloat (a_new[i], ==, 0.0);

  /* NaN is a numeric error */
  b[3] = NAN;
  g_assert_null (lp_lora_randomized_spectrum (&f, k, 2, 1, &draw, &error));
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
}

static void
test_nan (void)
{
  double b[6] = { 1, 2, 3, 4, 5, 6 }, a[6] = { 1, 0, INFINITY, 0, 1, 0 };
  LpLoraFactors f = { .b = b, .a = a, .out = 3, .in = 3, .r = 2 };
  g_autoptr (GError) error = NULL;
  g_assert_null (lp_lora_spectrum_compute (&f, 0, TRUE, &error));
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
}

static void
test_rng (void)
{
  LpLoraRng x, y;
  lp_lora_rng_init (&x, 42, "module.a");
  lp_lora_rng_init (&y, 42, "module.a");
  for (guint i = 0; i < 100; i++)
    g_assert_cmpuint (lp_lora_rng_next (&x), ==, lp_lora_rng_next (&y));
  lp_lora_rng_init (&y, 42, "module.b");
  g_assert_cmpuint (lp_lora_rng_next (&x), !=, lp_lora_rng_next (&y));
  lp_lora_rng_init (&y, 43, "module.a");
  lp_lora_rng_init (&x, 42, "module.a");
  g_assert_cmpuint (lp_lora_rng_next (&x), !=, lp_lora_rng_next (&y));

  /* moments of the projections: E R = 0, E R² = 1/k; sparse values */
  guint k = 4, r = 50000;
  g_autofree float *m = g_new (float, (gsize) k * r);
  for (int sparse = 0; sparse < 2; sparse++)
    {
      lp_lora_projection_matrix (&x, sparse, k, r, m);
      double sum = 0, sum2 = 0;
      guint zeros = 0;
      for (gsize i = 0; i < (gsize) k * r; i++)
        {
          sum += m[i];
          sum2 += (double) m[i] * m[i];
          zeros += m[i] == 0;
          if (sparse)
            g_assert_true (m[i] == 0 || fabs (fabs (m[i]) - sqrt (3.0 / k)) < 1e-6);
        }
      double n = (double) k * r;
      g_assert_cmpfloat (fabs (sum / n), <, 0.02);
      g_assert_cmpfloat (fabs (sum2 / n - 1.0 / k), <, 0.01);
      if (sparse)
        g_assert_cmpfloat (fabs (zeros / n - 2.0 / 3), <, 0.01);
    }
}

static void
test_rank_selection (void)
{
  double s[] = { 4, 2, 1, 0.5, 0 };
  /* energies 16, 4, 1, 0.25 of 21.25 */
  g_assert_cmpuint (lp_lora_rank_for_energy (s, 5, 0.5), ==, 1);
  g_assert_cmpuint (lp_lora_rank_for_energy (s, 5, 0.9), ==, 2);
  g_assert_cmpuint (lp_lora_rank_for_energy (s, 5, 0.99), ==, 4);
  g_assert_cmpuint (lp_lora_rank_for_energy (s, 5, 1.0), ==, 4);
  /* kohya: count(σ > σ₁/ratio) clamped to [1, len-1], plus one */
  g_assert_cmpuint (lp_lora_rank_sv_ratio (s, 5, 100, 3.0), ==, 3);
  g_assert_cmpuint (lp_lora_rank_sv_ratio (s, 5, 100, 1.0), ==, 2);
  /* sv_cumulative: searchsorted (cumsum σ / Σσ = .533 .8 .933 1, t) + 2 */
  g_assert_cmpuint (lp_lora_rank_sv_cumulative (s, 5, 100, 0.5), ==, 2);
  g_assert_cmpuint (lp_lora_rank_sv_cumulative (s, 5, 100, 0.9), ==, 4);
  /* sv_fro: searchsorted (cumsum σ² / Σσ², t²) + 2: .753 .941 .988 1 */
  g_assert_cmpuint (lp_lora_rank_sv_fro (s, 5, 100, 0.9), ==, 3);
  g_assert_cmpuint (lp_lora_rank_sv_fro (s, 5, 100, 0.5), ==, 2);
  double zero[] = { 0, 0 };
  g_assert_cmpuint (lp_lora_rank_sv_fro (zero, 2, 100, 0.5), ==, 1);
}

static void
test_delta_norms (void)
{
  guint64 out = 20, in = 15;
  LpLoraRng rng;
  lp_lora_rng_init (&rng, 3, "norms");
  g_autofree double *bx = random_matrix (&rng, out, 5);
  g_autofree double *ax = random_matrix (&rng, 5, in);
  g_autofree double *by = random_matrix (&rng, out, 3);
  g_autofree double *ay = random_matrix (&rng, 3, in);
  g_autofree double *dx = dense (bx, ax, out, 5, in);
  g_autofree double *dy = dense (by, ay, out, 3, in);
  double xx = 0, yy = 0, diff = 0;
  for (gsize i = 0; i < out * in; i++)
    {
      xx += 4 * dx[i] * dx[i];
      yy += 0.25 * dy[i] * dy[i];
      diff += (2 * dx[i] - 0.5 * dy[i]) * (2 * dx[i] - 0.5 * dy[i]);
    }
  double nx, ny, nd;
  lp_lora_delta_norms (bx, ax, 5, 2.0, by, ay, 3, 0.5, out, in, &nx, &ny, &nd);
  g_assert_cmpfloat (fabs (nx - xx), <=, 1e-10 * xx);
  g_assert_cmpfloat (fabs (ny - yy), <=, 1e-10 * yy);
  g_assert_cmpfloat (fabs (nd - diff), <=, 1e-10 * xx);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/lora-math/gram-kernels", test_gram_kernels);
  g_test_add_func ("/lora-math/blocked-gram-kernels", test_blocked_gram_kernels);
  g_test_add_func ("/lora-math/map-kernels", test_map_kernels);
  g_test_add_func ("/lora-math/top-eigenpairs", test_top_eigenpairs);
  g_test_add_func ("/lora-math/exact", test_exact);
  g_test_add_func ("/lora-math/khatri-rao", test_khatri_rao);
  g_test_add_func ("/lora-math/randomized", test_randomized);
  g_test_add_func ("/lora-math/nan", test_nan);
  g_test_add_func ("/lora-math/rng", test_rng);
  g_test_add_func ("/lora-math/rank-selection", test_rank_selection);
  g_test_add_func ("/lora-math/delta-norms", test_delta_norms);
  return g_test_run ();
}
