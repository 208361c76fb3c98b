/* lp-lora-dense.c: the SVD of the difference of two weights, a block of rows
 * at a time
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-dense.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <string.h>

/* A block of D is about this many bytes, so it stays in the caches while a
 * product reads it. */
#define BLOCK_BYTES (4u << 20)

void
lp_lora_dense_svd_free (LpLoraDenseSvd *svd)
{
  if (svd == NULL)
    return;
  g_free (svd->sigma);
  g_free (svd->u);
  g_free (svd->v);
  g_free (svd);
}

static gsize
element_size (LpDtype dtype)
{
  return lp_dtype_get_bits (dtype) / 8;
}

/* One side of a LoHa update, u [r0 …, :] @ v [:, c0 …] (n × m) in f64. */
static void
hadamard_side (LpDtype        dtype,
               gconstpointer  u,
               gconstpointer  v,
               guint          r,
               guint64        in,
               guint64        r0,
               guint64        n,
               guint64        c0,
               guint64        m,
               double        *out)
{
  gsize size = element_size (dtype);
  g_autofree double *ub = g_new (double, MAX (n * r, 1));
  g_autofree double *vb = g_new (double, MAX (r * m, 1));

  lp_dtype_to_f64 (dtype, (const guint8 *) u + r0 * r * size, ub, n * r);
  for (guint p = 0; p < r; p++)
    lp_dtype_to_f64 (dtype, (const guint8 *) v + (p * in + c0) * size, vb + p * m, m);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, n, m, r, 1.0, ub, r, vb, m, 0.0, out, m);
}

/* Rows [r0, r0 + n) of D, columns [c0, c0 + m), into @out (n × m, row-major)
 * in f64; @scratch holds m values, or n · m for a LoHa update. */
static void
rows_f64 (const LpLoraDifference *d,
          guint64                 r0,
          guint64                 n,
          guint64                 c0,
          guint64                 m,
          double                 *out,
          double                 *scratch)
{
  gsize eb = element_size (d->base_dtype), et = element_size (d->tuned_dtype);

  if (d->hadamard != NULL)
    {
      const LpLoraKhatriRao *h = d->hadamard;
      hadamard_side (h->dtype, h->u1, h->v1, h->r1, d->in, r0, n, c0, m, out);
      hadamard_side (h->dtype, h->u2, h->v2, h->r2, d->in, r0, n, c0, m, scratch);
      for (gsize i = 0; i < n * m; i++)
        out[i] *= scratch[i];
      return;
    }
  for (guint64 i = 0; i < n; i++)
    {
      guint64 at = (r0 + i) * d->in + c0;
      double *row = out + i * m;

      lp_dtype_to_f64 (d->tuned_dtype, (const guint8 *) d->tuned + at * et, row, m);
      lp_dtype_to_f64 (d->base_dtype, (const guint8 *) d->base + at * eb, scratch, m);
      for (guint64 c = 0; c < m; c++)
        row[c] -= scratch[c];
    }
}

/* The same in f32: the difference of two 16-bit values is exact in f32 unless
 * their exponents are far apart, and the randomized method's products are f32. */
static void
rows_f32 (const LpLoraDifference *d,
          guint64                 r0,
          guint64                 n,
          float                  *out,
          float                  *scratch)
{
  gsize eb = element_size (d->base_dtype), et = element_size (d->tuned_dtype);

  for (guint64 i = 0; i < n; i++)
    {
      guint64 at = (r0 + i) * d->in;
      float *row = out + i * d->in;

      lp_dtype_to_f32 (d->tuned_dtype, (const guint8 *) d->tuned + at * et, row, d->in);
      lp_dtype_to_f32 (d->base_dtype, (const guint8 *) d->base + at * eb, scratch, d->in);
      for (guint64 c = 0; c < d->in; c++)
        row[c] -= scratch[c];
    }
}

static guint64
rows_per_block (guint64 width,
                gsize   value_size)
{
  return MAX (1, BLOCK_BYTES / (width * value_size));
}

static gboolean
not_finite (GError **error)
{
  g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "NaN or infinity in the difference of the two weights");
  return FALSE;
}

static gboolean
lapack_failed (const char  *routine,
               lapack_int   info,
               GError     **error)
{
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
               "LAPACK %s failed (info %d)", routine, (int) info);
  return FALSE;
}

/* Eigenpairs of the symmetric s × s @g (row-major, overwritten), descending,
 * as σ = √λ and column-major vectors. */
static gboolean
eigen_descending (double   *g,
                  guint     s,
                  double   *sigma,
                  double   *vectors,
                  GError  **error)
{
  g_autofree double *w = g_new (double, s);
  lapack_int info = LAPACKE_dsyevd (LAPACK_ROW_MAJOR, 'V', 'U', s, g, s, w);

  if (info != 0)
    return lapack_failed ("dsyevd", info, error);
  for (guint j = 0; j < s; j++)
    {
      guint src = s - 1 - j;
      sigma[j] = sqrt (MAX (w[src], 0.0));
      for (guint i = 0; i < s; i++)
        vectors[(gsize) j * s + i] = g[(gsize) i * s + src];
    }
  return TRUE;
}

LpLoraDenseSvd *
lp_lora_difference_svd (const LpLoraDifference  *d,
                        GError                 **error)
{
  return lp_lora_difference_svd_top (d, 0, error);
}

LpLoraDenseSvd *
lp_lora_difference_svd_top (const LpLoraDifference  *d,
                            guint                    top,
                            GError                 **error)
{
  gboolean tall = d->out > d->in;
  guint s = MIN (d->out, d->in);
  g_autofree double *g = lp_try_alloc0 ((gsize) s * s, sizeof (double), "the Gram matrix", error);
  g_autoptr (LpLoraDenseSvd) svd = g_new0 (LpLoraDenseSvd, 1);

  if (g == NULL)
    return NULL;
  if (tall)
    {
      /* G = Dᵀ D over blocks of rows */
      guint64 rb = MIN (rows_per_block (d->in, sizeof (double)), d->out);
      g_autofree double *block = g_new (double, rb * d->in);
      g_autofree double *scratch = g_new (double, rb * d->in);

      for (guint64 r0 = 0; r0 < d->out; r0 += rb)
        {
          guint64 n = MIN (rb, d->out - r0);
          rows_f64 (d, r0, n, 0, d->in, block, scratch);
          if (!lp_lora_all_finite_f64 (block, n * d->in))
            return not_finite (error), NULL;
          cblas_dsyrk (CblasRowMajor, CblasUpper, CblasTrans, s, n, 1.0, block, d->in, 1.0, g, s);
        }
    }
  else
    {
      /* G = D Dᵀ over blocks of columns */
      guint64 cb = rows_per_block (d->out, sizeof (double));
      g_autofree double *block = g_new (double, d->out * MIN (cb, d->in));
      g_autofree double *scratch = g_new (double, d->out * MIN (cb, d->in));

      for (guint64 c0 = 0; c0 < d->in; c0 += cb)
        {
          guint64 m = MIN (cb, d->in - c0);
          rows_f64 (d, 0, d->out, c0, m, block, scratch);
          if (!lp_lora_all_finite_f64 (block, d->out * m))
            return not_finite (error), NULL;
          cblas_dsyrk (CblasRowMajor, CblasUpper, CblasNoTrans, s, m, 1.0, block, m, 1.0, g, s);
        }
    }

  for (guint i = 0; i < s; i++)
    svd->total += g[(gsize) i * s + i];
  if (top > 0 && top < s)
    {
      /* the top eigenpairs alone: the tridiagonal form, then only those
       * (lp_lora_top_eigenpairs reads the upper triangle column-major,
       * which is the row-major lower one: symmetrize first) */
      g_autofree double *w = g_new (double, top);
      g_autofree double *z = g_new (double, (gsize) s * top);
      for (guint i = 0; i < s; i++)
        for (guint j = 0; j < i; j++)
          g[(gsize) i * s + j] = g[(gsize) j * s + i];
      if (!lp_lora_top_eigenpairs (g, s, top, w, z))
        return lapack_failed ("the top eigenpairs (dsytrd, dstein)", 0, error), NULL;
      svd->n = top;
      svd->sigma = g_new (double, top);
      double *vectors = g_new (double, (gsize) s * top);
      for (guint j = 0; j < top; j++)
        {
          svd->sigma[j] = sqrt (MAX (w[top - 1 - j], 0.0));
          memcpy (vectors + (gsize) j * s, z + (gsize) (top - 1 - j) * s, sizeof (double) * s);
        }
      if (tall)
        svd->v = vectors;
      else
        svd->u = vectors;
      return g_steal_pointer (&svd);
    }
  svd->n = s;
  svd->sigma = g_new (double, s);
  if (tall)
    svd->v = lp_try_alloc ((gsize) s * s, sizeof (double), "the singular vectors", error);
  else
    svd->u = lp_try_alloc ((gsize) s * s, sizeof (double), "the singular vectors", error);
  if ((tall ? svd->v : svd->u) == NULL)
    return NULL;
  if (!eigen_descending (g, s, svd->sigma, tall ? svd->v : svd->u, error))
    return NULL;
  return g_steal_pointer (&svd);
}

/* Orthonormal columns for the row-major rows × l @m, in place. */
static gboolean
orthonormalize (float   *m,
                guint64  rows,
                guint    l,
                GError **error)
{
  g_autofree float *tau = g_new (float, l);
  lapack_int info = LAPACKE_sgeqrf (LAPACK_ROW_MAJOR, rows, l, m, l, tau);

  if (info == 0)
    info = LAPACKE_sorgqr (LAPACK_ROW_MAJOR, rows, l, l, m, l, tau);
  return info == 0 || lapack_failed ("sgeqrf/sorgqr", info, error);
}

/* One pass over D: @y (out × l) = D @x (in × l), or with @transposed
 * @y (in × l) = Dᵀ @x (out × l); all row-major f32. On the first pass
 * (@total not NULL) the blocks are checked and ‖D‖² summed. */
static gboolean
pass (const LpLoraDifference *d,
      gboolean                transposed,
      const float            *x,
      guint                   l,
      float                  *y,
      double                 *total,
      float                  *block,
      float                  *scratch,
      GError                **error)
{
  guint64 rb = rows_per_block (d->in, sizeof (float));

  if (transposed)
    memset (y, 0, d->in * l * sizeof (float));
  for (guint64 r0 = 0; r0 < d->out; r0 += rb)
    {
      guint64 n = MIN (rb, d->out - r0);

      rows_f32 (d, r0, n, block, scratch);
      if (total != NULL)
        {
          double sum = 0;
          if (!lp_lora_all_finite_f32 (block, n * d->in))
            return not_finite (error);
          for (guint64 i = 0; i < n * d->in; i++)
            sum += (double) block[i] * block[i];
          *total += sum;
        }
      if (transposed)
        cblas_sgemm (CblasRowMajor, CblasTrans, CblasNoTrans, d->in, l, n,
                     1.0f, block, d->in, x + r0 * l, l, 1.0f, y, l);
      else
        cblas_sgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, n, l, d->in,
                     1.0f, block, d->in, x, l, 0.0f, y + r0 * l, l);
    }
  return TRUE;
}

LpLoraDenseSvd *
lp_lora_difference_randomized (const LpLoraDifference  *d,
                               guint                    l,
                               guint                    niter,
                               LpLoraRng               *rng,
                               GError                 **error)
{
  g_return_val_if_fail (d->hadamard == NULL, NULL);

  guint64 rb = rows_per_block (d->in, sizeof (float));
  g_autofree float *block = g_new (float, MIN (rb, d->out) * d->in);
  g_autofree float *scratch = g_new (float, d->in);
  g_autofree float *omega = NULL;
  g_autofree float *y = NULL;
  g_autofree float *z = NULL;
  g_autofree double *bt = NULL;
  g_autofree double *m = NULL;
  g_autofree double *ub = NULL;
  g_autofree double *sigma = NULL;
  g_autoptr (LpLoraDenseSvd) svd = g_new0 (LpLoraDenseSvd, 1);

  l = MIN (l, MIN (d->out, d->in));
  omega = lp_try_alloc (d->in * l, sizeof (float), "the random test matrix", error);
  y = omega ? lp_try_alloc (d->out * l, sizeof (float), "the range sketch", error) : NULL;
  z = y ? lp_try_alloc (d->in * l, sizeof (float), "the co-range sketch", error) : NULL;
  if (z == NULL)
    return NULL;
  for (guint64 i = 0; i < d->in * l; i++)
    omega[i] = lp_lora_rng_normal (rng);

  /* Y = D Ω, then (Dᵀ Q, D Q') niter times, re-orthonormalized each time so
   * that the small directions are not lost to f32 rounding */
  if (!pass (d, FALSE, omega, l, y, &svd->total, block, scratch, error))
    return NULL;
  for (guint it = 0; it < niter; it++)
    {
      if (!orthonormalize (y, d->out, l, error)
          || !pass (d, TRUE, y, l, z, NULL, block, scratch, error)
          || !orthonormalize (z, d->in, l, error)
          || !pass (d, FALSE, z, l, y, NULL, block, scratch, error))
        return NULL;
    }
  if (!orthonormalize (y, d->out, l, error)
      || !pass (d, TRUE, y, l, z, NULL, block, scratch, error))
    return NULL;

  /* B = Qᵀ D = (Dᵀ Q)ᵀ is l × in: its SVD from B Bᵀ = Zᵀ Z in f64 */
  bt = lp_try_alloc (d->in * l, sizeof (double), "the projected matrix", error);
  if (bt == NULL)
    return NULL;
  for (guint64 i = 0; i < d->in * l; i++)
    bt[i] = z[i];
  m = g_new0 (double, (gsize) l * l);
  cblas_dsyrk (CblasRowMajor, CblasUpper, CblasTrans, l, d->in, 1.0, bt, l, 0.0, m, l);
  ub = g_new (double, (gsize) l * l);
  sigma = g_new (double, l);
  if (!eigen_descending (m, l, sigma, ub, error))
    return NULL;

  /* U = Q Ub, V = Bᵀ Ub / σ, both column-major */
  svd->n = l;
  svd->u = lp_try_alloc0 (d->out * l, sizeof (double), "the singular vectors", error);
  svd->v = svd->u ? lp_try_alloc0 (d->in * l, sizeof (double), "the singular vectors", error) : NULL;
  if (svd->v == NULL)
    return NULL;
  for (guint j = 0; j < l; j++)
    {
      const double *col = ub + (gsize) j * l;
      double *u = svd->u + j * d->out;
      double *v = svd->v + j * d->in;

      for (guint64 i = 0; i < d->out; i++)
        {
          double sum = 0;
          for (guint t = 0; t < l; t++)
            sum += (double) y[i * l + t] * col[t];
          u[i] = sum;
        }
      if (sigma[j] > 0)
        for (guint64 i = 0; i < d->in; i++)
          {
            double sum = 0;
            for (guint t = 0; t < l; t++)
              sum += bt[i * l + t] * col[t];
            v[i] = sum / sigma[j];
          }
    }
  svd->sigma = g_steal_pointer (&sigma);
  return g_steal_pointer (&svd);
}

void
lp_lora_dense_svd_factors (const LpLoraDenseSvd   *svd,
                           const LpLoraDifference *d,
                           guint                   k,
                           float                  *up,
                           float                  *down)
{
  guint kk = MIN (k, svd->n);
  g_autofree double *root = g_new0 (double, MAX (k, 1));

  memset (up, 0, d->out * k * sizeof (float));
  memset (down, 0, k * d->in * sizeof (float));
  for (guint j = 0; j < kk; j++)
    root[j] = sqrt (svd->sigma[j]);

  if (svd->u != NULL)
    for (guint j = 0; j < kk; j++)
      for (guint64 i = 0; i < d->out; i++)
        up[i * k + j] = svd->u[j * d->out + i] * root[j];
  if (svd->v != NULL)
    for (guint j = 0; j < kk; j++)
      for (guint64 c = 0; c < d->in; c++)
        down[j * d->in + c] = root[j] * svd->v[j * d->in + c];
  if (kk == 0 || (svd->u != NULL && svd->v != NULL))
    return;

  /* The side the Gram matrix did not give, in one more pass over D:
   * down = Ukᵀ D / √σ, or up = D Vk / √σ. */
  guint64 rb = rows_per_block (d->in, sizeof (double));
  g_autofree double *block = g_new (double, MIN (rb, d->out) * d->in);
  g_autofree double *scratch = g_new (double, MIN (rb, d->out) * d->in);
  g_autofree double *known = g_new (double, (svd->u ? d->out : d->in) * kk);
  g_autofree double *acc = g_new0 (double, (svd->u ? d->in : MIN (rb, d->out)) * kk);

  /* the known vectors, row-major: (out or in) × kk */
  for (guint j = 0; j < kk; j++)
    {
      const double *vec = svd->u ? svd->u + j * d->out : svd->v + j * d->in;
      guint64 len = svd->u ? d->out : d->in;
      for (guint64 i = 0; i < len; i++)
        known[i * kk + j] = vec[i];
    }

  for (guint64 r0 = 0; r0 < d->out; r0 += rb)
    {
      guint64 n = MIN (rb, d->out - r0);

      rows_f64 (d, r0, n, 0, d->in, block, scratch);
      if (svd->u != NULL)
        /* acc (kk × in) += U[rows]ᵀ (kk × n) · block (n × in) */
        cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, kk, d->in, n,
                     1.0, known + r0 * kk, kk, block, d->in, 1.0, acc, d->in);
      else
        {
          /* up[rows] = block (n × in) · V (in × kk) / √σ */
          cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, n, kk, d->in,
                       1.0, block, d->in, known, kk, 0.0, acc, kk);
          for (guint64 i = 0; i < n; i++)
            for (guint j = 0; j < kk; j++)
              up[(r0 + i) * k + j] = root[j] > 0 ? acc[i * kk + j] / root[j] : 0;
        }
    }
  if (svd->u != NULL)
    for (guint j = 0; j < kk; j++)
      for (guint64 c = 0; c < d->in; c++)
        down[j * d->in + c] = root[j] > 0 ? acc[j * d->in + c] / root[j] : 0;
}
