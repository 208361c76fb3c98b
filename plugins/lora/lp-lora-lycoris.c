/* lp-lora-lycoris.c: LyCORIS LoHa and LoKr modules reduced to plain LoRAs
 *
 * Scale rules, from the code that loads these files:
 * - LoHa: alpha / rows of hada_w1_b, 1 without alpha (ComfyUI
 *   comfy/weight_adapter/loha.py LoHaAdapter.calculate_weight; LyCORIS
 *   lycoris/modules/loha.py LohaModule: scale = alpha / lora_dim).
 * - LoKr: alpha / dim, dim the rows of lokr_w2_b when w2 is factored, else
 *   of lokr_w1_b when w1 is; 1 when neither is factored or without alpha
 *   (ComfyUI weight_adapter/lokr.py LoKrAdapter.calculate_weight; LyCORIS
 *   modules/lokr.py LokrModule.__init__: "use scale = 1" for two full
 *   matrices). LyCORIS takes the rank from w1 first, ComfyUI from w2 last:
 *   a file where the two differ is refused rather than guessed.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-lycoris.h"
#include "lp-lora-dense.h"
#include "lp-lora-math.h"
#include "lp-lora-pair.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <string.h>

/* ---- the mathematics, on plain arrays ----------------------------------- */

void
lp_lora_tucker_right (const double *t,
                      const double *wb,
                      guint         r,
                      guint64       cols,
                      guint64       kernel,
                      double       *m)
{
  memset (m, 0, sizeof (double) * r * cols * kernel);
  for (guint i = 0; i < r; i++)
    for (guint j = 0; j < r; j++)
      {
        const double *tk = t + ((gsize) i * r + j) * kernel;
        for (guint64 c = 0; c < cols; c++)
          {
            double w = wb[j * cols + c];
            double *row = m + ((gsize) i * cols + c) * kernel;
            for (guint64 k = 0; k < kernel; k++)
              row[k] += tk[k] * w;
          }
      }
}

/* The SVD of one Kronecker side, or its top part: @n singular values,
 * U [rows, stride] and Vᵀ [n, cols], row-major. */
typedef struct {
  guint n;
  guint stride;         /* columns of u */
  double *sigma;
  double *u;
  double *vt;
  double total;
} PartSvd;

static void
part_svd_clear (PartSvd *s)
{
  g_clear_pointer (&s->sigma, g_free);
  g_clear_pointer (&s->u, g_free);
  g_clear_pointer (&s->vt, g_free);
}

/* The @top largest singular triplets of a dense rows × cols side, from the
 * Gram matrix of its smaller side: only the top k products σ_i(W1)·σ_j(W2)
 * are kept, and none of them uses a direction beyond the k-th of its side,
 * so the full SVD (dgesdd, a few hundred MFLOP for a 1344 × 192 side of a
 * Flux LoKr with factor 16) is not needed. The kept part σ_i u_i v_iᵀ =
 * u_i u_iᵀ W is the projection onto accurate eigenvectors even where a
 * small σ_i is not accurate to full precision. */
static gboolean
dense_top_svd (const LpLoraKronPart *p,
               guint                 top,
               PartSvd              *s,
               GError              **error)
{
  gboolean tall = p->rows >= p->cols;    /* the Gram of the columns is the smaller */
  guint64 side = tall ? p->cols : p->rows, other = tall ? p->rows : p->cols;
  g_autofree double *gram = g_new0 (double, MAX (side * side, 1));
  g_autofree double *w = g_new (double, MAX (top, 1));
  g_autofree double *z = g_new (double, MAX (side * top, 1));

  for (gsize i = 0; i < p->rows * p->cols; i++)
    s->total += p->dense[i] * p->dense[i];
  s->sigma = g_new0 (double, MAX (top, 1));
  s->u = g_new0 (double, MAX (p->rows * top, 1));
  s->vt = g_new0 (double, MAX (top * p->cols, 1));
  if (top == 0 || s->total == 0)
    return TRUE;

  /* Wᵀ W or W Wᵀ; its row-major lower triangle is the column-major upper
   * one lp_lora_top_eigenpairs() reads */
  if (p->narrow)
    {
      gsize n = p->rows * p->cols;
      g_autofree float *dense = g_new (float, MAX (n, 1));
      g_autofree float *gram32 = g_new0 (float, MAX (side * side, 1));

      for (gsize i = 0; i < n; i++)
        dense[i] = p->dense[i];
      cblas_ssyrk (CblasRowMajor, CblasLower, tall ? CblasTrans : CblasNoTrans, side, other,
                   1.0f, dense, p->cols, 0.0f, gram32, side);
      for (gsize i = 0; i < side * side; i++)
        gram[i] = gram32[i];
    }
  else
    cblas_dsyrk (CblasRowMajor, CblasLower, tall ? CblasTrans : CblasNoTrans, side, other,
                 1.0, p->dense, p->cols, 0.0, gram, side);
  if (!lp_lora_top_eigenpairs (gram, side, top, w, z))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "eigendecomposition of the Gram matrix of a %" G_GUINT64_FORMAT " × %"
                   G_GUINT64_FORMAT " Kronecker factor failed", p->rows, p->cols);
      return FALSE;
    }
  /* ascending: the largest is the last; σ² at rounding level is zero */
  double w_max = MAX (w[top - 1], 0);
  g_autofree double *vecs = g_new (double, MAX (side * top, 1));   /* [n, side], descending */
  for (guint i = 0; i < top; i++)
    {
      double sigma2 = w[top - 1 - i];

      if (!(sigma2 > side * 1e-15 * w_max))
        break;
      s->sigma[i] = sqrt (sigma2);
      s->n = i + 1;
      memcpy (vecs + (gsize) i * side, z + (gsize) (top - 1 - i) * side, sizeof (double) * side);
    }
  if (s->n == 0)
    return TRUE;
  /* the small side's vectors as they are, the other side's W v / σ (or Wᵀ u / σ) */
  if (tall)
    {
      memcpy (s->vt, vecs, sizeof (double) * s->n * side);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasTrans, p->rows, s->n, p->cols,
                   1.0, p->dense, p->cols, vecs, side, 0.0, s->u, top);
      for (guint64 o = 0; o < p->rows; o++)
        for (guint i = 0; i < s->n; i++)
          s->u[o * top + i] /= s->sigma[i];
    }
  else
    {
      for (guint64 t = 0; t < side; t++)
        for (guint i = 0; i < s->n; i++)
          s->u[t * top + i] = vecs[(gsize) i * side + t];
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, s->n, p->cols, p->rows,
                   1.0, vecs, side, p->dense, p->cols, 0.0, s->vt, p->cols);
      for (guint i = 0; i < s->n; i++)
        for (guint64 c = 0; c < p->cols; c++)
          s->vt[i * p->cols + c] /= s->sigma[i];
    }
  /* u is [rows, top]: its stride is top, however many are non-zero */
  return TRUE;
}

static gboolean
part_svd (const LpLoraKronPart *p,
          guint                 top,
          PartSvd              *s,
          GError              **error)
{
  memset (s, 0, sizeof *s);
  if (p->dense != NULL)
    {
      top = MIN (top, MIN (p->rows, p->cols));
      if (!dense_top_svd (p, top, s, error))
        {
          part_svd_clear (s);
          return FALSE;
        }
      s->stride = top;
      return TRUE;
    }

  /* a product: the exact factored SVD, vectors mapped back to full length */
  LpLoraFactors f = { 0, };
  f.b = p->a;
  f.a = p->b;
  f.out = p->rows;
  f.in = p->cols;
  f.r = p->r;
  g_autoptr (LpLoraSpectrum) spectrum = lp_lora_spectrum_compute (&f, 0, TRUE, error);
  if (spectrum == NULL)
    return FALSE;

  guint r = p->r, n = spectrum->n;
  s->n = n;
  s->stride = n;
  s->total = spectrum->total;
  s->sigma = g_memdup2 (spectrum->sigma, sizeof (double) * MAX (r, 1));
  s->u = g_new0 (double, MAX (p->rows * n, 1));
  s->vt = g_new0 (double, MAX (n * p->cols, 1));
  if (n > 0)
    {
      /* u_i = a map_b[:, i];  v_iᵀ = map_a[i, :] b */
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, p->rows, n, r,
                   1.0, p->a, r, spectrum->map_b, r, 0.0, s->u, n);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, n, p->cols, r,
                   1.0, spectrum->map_a, r, p->b, p->cols, 0.0, s->vt, p->cols);
    }
  return TRUE;
}

typedef struct {
  double value;
  guint i;
  guint j;
} KronPair;

static int
compare_doubles (gconstpointer a,
                 gconstpointer b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

static int
kron_pair_compare (gconstpointer a,
                   gconstpointer b)
{
  const KronPair *x = a, *y = b;
  if (x->value != y->value)
    return x->value > y->value ? -1 : 1;
  if (x->i != y->i)
    return x->i < y->i ? -1 : 1;
  return x->j < y->j ? -1 : x->j > y->j;
}

gboolean
lp_lora_lokr_reduce (const LpLoraKronPart *w1,
                     const LpLoraKronPart *w2,
                     double                scale,
                     guint                 k,
                     double               *b_new,
                     double               *a_new,
                     double               *kept,
                     double               *total,
                     GError              **error)
{
  PartSvd s1, s2;
  guint64 rows = w1->rows * w2->rows, cols = w1->cols * w2->cols;

  if (!part_svd (w1, k, &s1, error))
    return FALSE;
  if (!part_svd (w2, k, &s2, error))
    {
      part_svd_clear (&s1);
      return FALSE;
    }

  /* every product σ_i σ_j, largest first */
  gsize n_pairs = (gsize) s1.n * s2.n;
  g_autofree KronPair *pairs = g_new (KronPair, MAX (n_pairs, 1));
  for (guint i = 0; i < s1.n; i++)
    for (guint j = 0; j < s2.n; j++)
      pairs[(gsize) i * s2.n + j] = (KronPair) { s1.sigma[i] * s2.sigma[j], i, j };
  qsort (pairs, n_pairs, sizeof (KronPair), kron_pair_compare);

  memset (b_new, 0, sizeof (double) * rows * k);
  memset (a_new, 0, sizeof (double) * k * cols);
  *kept = 0;
  *total = scale * scale * s1.total * s2.total;
  for (guint t = 0; t < k && t < n_pairs && pairs[t].value > 0; t++)
    {
      guint i = pairs[t].i, j = pairs[t].j;
      double sigma = fabs (scale) * pairs[t].value;
      double root = sqrt (sigma), sign = scale < 0 ? -1.0 : 1.0;

      *kept += sigma * sigma;
      for (guint64 p = 0; p < w1->rows; p++)
        {
          double x = sign * root * s1.u[p * s1.stride + i];
          for (guint64 q = 0; q < w2->rows; q++)
            b_new[(p * w2->rows + q) * k + t] = x * s2.u[q * s2.stride + j];
        }
      for (guint64 c = 0; c < w1->cols; c++)
        {
          double x = root * s1.vt[(gsize) i * w1->cols + c];
          double *row = a_new + (gsize) t * cols + c * w2->cols;
          for (guint64 d = 0; d < w2->cols; d++)
            row[d] = x * s2.vt[(gsize) j * w2->cols + d];
        }
    }
  part_svd_clear (&s1);
  part_svd_clear (&s2);
  return TRUE;
}

/* ---- modules of a checkpoint -------------------------------------------- */

typedef enum {
  PART_HADA_W1_A,
  PART_HADA_W1_B,
  PART_HADA_W2_A,
  PART_HADA_W2_B,
  PART_HADA_T1,
  PART_HADA_T2,
  PART_LOKR_W1,
  PART_LOKR_W1_A,
  PART_LOKR_W1_B,
  PART_LOKR_W2,
  PART_LOKR_W2_A,
  PART_LOKR_W2_B,
  PART_LOKR_T1,
  PART_LOKR_T2,
  PART_ALPHA,
  PART_DORA_SCALE,
  N_PARTS
} Part;

/* the key suffixes, as LyCORIS's weight_list names them */
static const char *const part_names[N_PARTS] = {
  "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
  "alpha", "dora_scale",
};

typedef struct {
  char *name;
  gboolean lokr;
  LpTensor *parts[N_PARTS];
  guint first;            /* index of its first tensor in the input */
  LpDtype up_dtype;       /* the dtypes written: the input's */
  LpDtype down_dtype;
  guint64 out;
  guint64 in;             /* flattened: in channels × kernel */
  guint64 in_channels;
  guint64 kernel[LP_TENSOR_MAX_DIMS];
  guint n_kernel;         /* 0: the kernel (if any) is not known, 2-D factors */
  double scale;
  guint64 bound;          /* the update's rank is at most this */
} Module;

static void
module_free (gpointer data)
{
  Module *m = data;
  if (m == NULL)
    return;
  for (guint i = 0; i < N_PARTS; i++)
    g_clear_object (&m->parts[i]);
  g_free (m->name);
  g_free (m);
}

guint
lp_lora_lycoris_count (GPtrArray *modules)
{
  guint n = 0;

  for (guint i = 0; i < modules->len; i++)
    {
      const char *family = lp_lora_module_get_family (g_ptr_array_index (modules, i));
      n += g_str_equal (family, "loha") || g_str_equal (family, "lokr");
    }
  return n;
}

#define HAS(m, p) ((m)->parts[p] != NULL)
#define DIM(m, p, i) lp_tensor_get_dim ((m)->parts[p], i)
#define NDIMS(m, p) lp_tensor_get_n_dims ((m)->parts[p])

static gboolean G_GNUC_PRINTF (3, 4)
refuse (GError    **error,
        Module     *m,
        const char *format,
        ...)
{
  va_list args;
  va_start (args, format);
  g_autofree char *text = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
               "module %s (LyCORIS %s): %s", m->name, m->lokr ? "LoKr" : "LoHa", text);
  return FALSE;
}

/* Product of the dims of @p from @from on. */
static guint64
trailing (Module *m, Part p, guint from)
{
  guint64 n = 1;
  for (guint i = from; i < NDIMS (m, p); i++)
    n *= DIM (m, p, i);
  return n;
}

static void
set_kernel (Module *m, Part p, guint from)
{
  m->n_kernel = NDIMS (m, p) - from;
  for (guint i = 0; i < m->n_kernel; i++)
    m->kernel[i] = DIM (m, p, from + i);
}

static gboolean
alpha_value (Module *m, double *alpha, GError **error)
{
  if (!HAS (m, PART_ALPHA))
    return FALSE;
  if (lp_tensor_get_n_elements (m->parts[PART_ALPHA]) != 1)
    return refuse (error, m, "alpha has %" G_GUINT64_FORMAT " values, not one",
                   lp_tensor_get_n_elements (m->parts[PART_ALPHA]));
  g_autofree double *v = lp_tensor_dup_f64 (m->parts[PART_ALPHA], NULL, error);
  if (v == NULL)
    return FALSE;
  if (!isfinite (v[0]))
    return refuse (error, m, "alpha is %g", v[0]);
  *alpha = v[0];
  return TRUE;
}

/* A 2-D part's shape is [rows, cols] (4-D ones keep a kernel after cols). */
static gboolean
expect_2d (Module *m, Part p, GError **error)
{
  if (NDIMS (m, p) != 2)
    return refuse (error, m, "%s has %u dimensions, expected 2", part_names[p], NDIMS (m, p));
  return TRUE;
}

static gboolean
check_loha (Module *m, GError **error)
{
  for (Part p = PART_HADA_W1_A; p <= PART_HADA_W2_B; p++)
    if (!HAS (m, p))
      return refuse (error, m, "%s is missing", part_names[p]);
  if (HAS (m, PART_HADA_T1) != HAS (m, PART_HADA_T2))
    return refuse (error, m, "a Tucker core needs both hada_t1 and hada_t2, the file has only %s",
                   HAS (m, PART_HADA_T1) ? "hada_t1" : "hada_t2");
  if (HAS (m, PART_HADA_T1))
    {
      /* LyCORIS LohaModule with use_tucker: t [r, r, *k], w_a [r, out], w_b [r, in] */
      guint r = DIM (m, PART_HADA_W1_B, 0);
      for (Part p = PART_HADA_W1_A; p <= PART_HADA_W2_B; p++)
        if (!expect_2d (m, p, error))
          return FALSE;
      for (Part p = PART_HADA_T1; p <= PART_HADA_T2; p++)
        {
          guint pr = (p == PART_HADA_T1) ? r : DIM (m, PART_HADA_W2_B, 0);
          if (NDIMS (m, p) < 3 || DIM (m, p, 0) != pr || DIM (m, p, 1) != pr)
            return refuse (error, m, "%s is not a [%u, %u, kernel...] Tucker core", part_names[p], pr, pr);
        }
      if (DIM (m, PART_HADA_W1_A, 0) != r || DIM (m, PART_HADA_W2_A, 0) != DIM (m, PART_HADA_W2_B, 0) ||
          DIM (m, PART_HADA_W1_A, 1) != DIM (m, PART_HADA_W2_A, 1) ||
          DIM (m, PART_HADA_W1_B, 1) != DIM (m, PART_HADA_W2_B, 1) ||
          NDIMS (m, PART_HADA_T1) != NDIMS (m, PART_HADA_T2) ||
          trailing (m, PART_HADA_T1, 2) != trailing (m, PART_HADA_T2, 2))
        return refuse (error, m, "the shapes of the Tucker parts disagree");
      m->out = DIM (m, PART_HADA_W1_A, 1);
      m->in_channels = DIM (m, PART_HADA_W1_B, 1);
      m->in = m->in_channels * trailing (m, PART_HADA_T1, 2);
      set_kernel (m, PART_HADA_T1, 2);
    }
  else
    {
      /* w_a [out, r] (or [out, r, 1, 1]), w_b [r, in] or [r, in, *k] (LyCORIS
       * functional/loha.py diff_weight flattens both) */
      for (Part p = PART_HADA_W1_A; p <= PART_HADA_W2_A; p += 2)
        if (NDIMS (m, p) < 2 || trailing (m, p, 2) != 1)
          return refuse (error, m, "%s is not [out, rank]", part_names[p]);
      for (Part p = PART_HADA_W1_B; p <= PART_HADA_W2_B; p += 2)
        if (NDIMS (m, p) < 2)
          return refuse (error, m, "%s is not [rank, in]", part_names[p]);
      if (DIM (m, PART_HADA_W1_A, 1) != DIM (m, PART_HADA_W1_B, 0) ||
          DIM (m, PART_HADA_W2_A, 1) != DIM (m, PART_HADA_W2_B, 0) ||
          DIM (m, PART_HADA_W1_A, 0) != DIM (m, PART_HADA_W2_A, 0) ||
          trailing (m, PART_HADA_W1_B, 1) != trailing (m, PART_HADA_W2_B, 1) ||
          NDIMS (m, PART_HADA_W1_B) != NDIMS (m, PART_HADA_W2_B))
        return refuse (error, m, "the shapes of hada_w1_a/_b and hada_w2_a/_b disagree");
      m->out = DIM (m, PART_HADA_W1_A, 0);
      m->in_channels = DIM (m, PART_HADA_W1_B, 1);
      m->in = trailing (m, PART_HADA_W1_B, 1);
      if (NDIMS (m, PART_HADA_W1_B) > 2)
        set_kernel (m, PART_HADA_W1_B, 2);
    }
  double alpha;
  GError *local = NULL;
  if (alpha_value (m, &alpha, &local))
    m->scale = alpha / DIM (m, PART_HADA_W1_B, 0);
  else if (local)
    {
      g_propagate_error (error, local);
      return FALSE;
    }
  else
    m->scale = 1.0;
  m->up_dtype = lp_tensor_get_dtype (m->parts[PART_HADA_W1_A]);
  m->down_dtype = lp_tensor_get_dtype (m->parts[PART_HADA_W1_B]);
  /* a Hadamard product of ranks r1 and r2 has rank at most r1·r2 */
  m->bound = MIN ((guint64) DIM (m, PART_HADA_W1_B, 0) * DIM (m, PART_HADA_W2_B, 0), MIN (m->out, m->in));
  return TRUE;
}

static gboolean
check_lokr (Module *m, GError **error)
{
  gboolean w1_full = HAS (m, PART_LOKR_W1), w2_full = HAS (m, PART_LOKR_W2);
  guint64 o1, i1, o2, i2;

  if (HAS (m, PART_LOKR_T1))
    return refuse (error, m, "lokr_t1 (a Tucker core of w1) is read by neither LyCORIS nor ComfyUI; "
                   "its meaning is not defined, so the module cannot be reduced");
  if (w1_full == (HAS (m, PART_LOKR_W1_A) || HAS (m, PART_LOKR_W1_B)) ||
      (!w1_full && !(HAS (m, PART_LOKR_W1_A) && HAS (m, PART_LOKR_W1_B))))
    return refuse (error, m, "w1 needs lokr_w1, or both lokr_w1_a and lokr_w1_b");
  if (w2_full == (HAS (m, PART_LOKR_W2_A) || HAS (m, PART_LOKR_W2_B)) ||
      (!w2_full && !(HAS (m, PART_LOKR_W2_A) && HAS (m, PART_LOKR_W2_B))))
    return refuse (error, m, "w2 needs lokr_w2, or both lokr_w2_a and lokr_w2_b");
  if (HAS (m, PART_LOKR_T2) && w2_full)
    return refuse (error, m, "lokr_t2 comes with lokr_w2_a/_b, not with a full lokr_w2");

  if (w1_full)
    {
      if (!expect_2d (m, PART_LOKR_W1, error))
        return FALSE;
      o1 = DIM (m, PART_LOKR_W1, 0);
      i1 = DIM (m, PART_LOKR_W1, 1);
    }
  else
    {
      if (!expect_2d (m, PART_LOKR_W1_A, error) || !expect_2d (m, PART_LOKR_W1_B, error))
        return FALSE;
      if (DIM (m, PART_LOKR_W1_A, 1) != DIM (m, PART_LOKR_W1_B, 0))
        return refuse (error, m, "lokr_w1_a and lokr_w1_b disagree on the rank");
      o1 = DIM (m, PART_LOKR_W1_A, 0);
      i1 = DIM (m, PART_LOKR_W1_B, 1);
    }

  if (w2_full)
    {
      /* [b, d] or a conv [b, d, *k]: kron with w1 unsqueezed (ComfyUI), the
       * same as kron (w1, w2 flattened to [b, d·K]) */
      if (NDIMS (m, PART_LOKR_W2) < 2)
        return refuse (error, m, "lokr_w2 has %u dimensions", NDIMS (m, PART_LOKR_W2));
      o2 = DIM (m, PART_LOKR_W2, 0);
      i2 = DIM (m, PART_LOKR_W2, 1);
      if (NDIMS (m, PART_LOKR_W2) > 2)
        set_kernel (m, PART_LOKR_W2, 2);
    }
  else if (HAS (m, PART_LOKR_T2))
    {
      /* t2 [r, r, *k], w2_a [r, b], w2_b [r, d] (LyCORIS rebuild_tucker) */
      guint r = DIM (m, PART_LOKR_W2_B, 0);
      if (!expect_2d (m, PART_LOKR_W2_A, error) || !expect_2d (m, PART_LOKR_W2_B, error))
        return FALSE;
      if (DIM (m, PART_LOKR_W2_A, 0) != r || NDIMS (m, PART_LOKR_T2) < 3 ||
          DIM (m, PART_LOKR_T2, 0) != r || DIM (m, PART_LOKR_T2, 1) != r)
        return refuse (error, m, "lokr_t2, lokr_w2_a and lokr_w2_b are not a [%u, %u, kernel...] "
                       "core with [%u, out] and [%u, in] factors", r, r, r, r);
      o2 = DIM (m, PART_LOKR_W2_A, 1);
      i2 = DIM (m, PART_LOKR_W2_B, 1);
      set_kernel (m, PART_LOKR_T2, 2);
    }
  else
    {
      /* w2_a [b, r], w2_b [r, d] or [r, d, *k] (LyCORIS functional/lokr.py) */
      if (!expect_2d (m, PART_LOKR_W2_A, error) || NDIMS (m, PART_LOKR_W2_B) < 2)
        return refuse (error, m, "lokr_w2_a must be [out, rank] and lokr_w2_b [rank, in, ...]");
      if (DIM (m, PART_LOKR_W2_A, 1) != DIM (m, PART_LOKR_W2_B, 0))
        return refuse (error, m, "lokr_w2_a and lokr_w2_b disagree on the rank");
      o2 = DIM (m, PART_LOKR_W2_A, 0);
      i2 = DIM (m, PART_LOKR_W2_B, 1);
      if (NDIMS (m, PART_LOKR_W2_B) > 2)
        set_kernel (m, PART_LOKR_W2_B, 2);
    }

  guint64 kernel = 1;
  for (guint i = 0; i < m->n_kernel; i++)
    kernel *= m->kernel[i];
  m->out = o1 * o2;
  m->in_channels = i1 * i2;
  m->in = m->in_channels * kernel;

  /* the scale (see the top of the file) */
  double alpha;
  GError *local = NULL;
  gboolean has_alpha = alpha_value (m, &alpha, &local);
  if (local)
    {
      g_propagate_error (error, local);
      return FALSE;
    }
  guint dim = 0;
  if (!w1_full)
    dim = DIM (m, PART_LOKR_W1_B, 0);
  if (!w2_full)
    {
      guint dim2 = DIM (m, PART_LOKR_W2_B, 0);
      if (dim != 0 && dim != dim2)
        return refuse (error, m, "lokr_w1_b has %u rows and lokr_w2_b %u: LyCORIS divides alpha by the "
                       "first, ComfyUI by the second; the scale is ambiguous", dim, dim2);
      dim = dim2;
    }
  m->scale = has_alpha && dim > 0 ? alpha / dim : 1.0;

  Part up = w1_full ? PART_LOKR_W1 : PART_LOKR_W1_A;
  Part down = w2_full ? PART_LOKR_W2 : PART_LOKR_W2_B;
  m->up_dtype = lp_tensor_get_dtype (m->parts[up]);
  m->down_dtype = lp_tensor_get_dtype (m->parts[down]);
  /* rank (kron (W1, W2)) = rank (W1) · rank (W2) */
  guint64 rank1 = MIN (o1, i1), rank2 = MIN (o2, i2 * kernel);
  if (!w1_full)
    rank1 = MIN (rank1, DIM (m, PART_LOKR_W1_B, 0));
  if (!w2_full)
    rank2 = MIN (rank2, DIM (m, PART_LOKR_W2_B, 0));
  m->bound = rank1 * rank2;
  return TRUE;
}

/* The LyCORIS modules among @found (lp_lora_find_modules_full() of @input,
 * which pairs their parts by the keys the loha and lokr family files
 * declare), in the order of their first tensor, with what computing them
 * needs. */
static GPtrArray *
find_modules (LpCheckpoint  *input,
              GPtrArray     *found,
              gboolean       keep_dora,
              GError       **error)
{
  g_autoptr (GPtrArray) modules = g_ptr_array_new_with_free_func (module_free);
  g_autoptr (GHashTable) index = g_hash_table_new (NULL, NULL);   /* tensor -> its index + 1 */

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    g_hash_table_insert (index, lp_checkpoint_get_tensor (input, i), GUINT_TO_POINTER (i + 1));

  for (guint i = 0; i < found->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (found, i);
      const char *family = lp_lora_module_get_family (module);
      gboolean hada = g_str_equal (family, "loha"), lokr = g_str_equal (family, "lokr");
      Module *m;

      if (!hada && !lokr)
        continue;
      m = g_new0 (Module, 1);
      g_ptr_array_add (modules, m);
      m->name = g_strdup (lp_lora_module_get_name (module));
      m->lokr = lokr;
      m->first = G_MAXUINT;
      for (Part p = 0; p < N_PARTS; p++)
        {
          LpTensor *t = p == PART_DORA_SCALE ? lp_lora_module_get_dora_magnitude (module)
                                             : lp_lora_module_get_part (module, part_names[p]);
          if (t == NULL)
            continue;
          m->parts[p] = g_object_ref (t);
          if (p != PART_ALPHA && p != PART_DORA_SCALE)
            m->first = MIN (m->first, GPOINTER_TO_UINT (g_hash_table_lookup (index, t)) - 1);
        }
    }

  for (guint i = 0; i < modules->len; i++)
    {
      Module *m = g_ptr_array_index (modules, i);
      gboolean hada = !m->lokr, lokr = m->lokr;

      if (hada && lokr)
        {
          refuse (error, m, "the module has both hada_* (LoHa) and lokr_* (LoKr) parts");
          return NULL;
        }
      if (HAS (m, PART_DORA_SCALE) && !keep_dora)
        {
          refuse (error, m, "DoRA magnitude %s: the merged weight m · (W0 + ΔW) / "
                  "‖W0 + ΔW‖ depends on the base weight W0, which this stage does not read, so "
                  "no reduction of ΔW can be made optimal for it; dora=keep-magnitude keeps m as "
                  "trained and reduces ΔW (docs/methods.md, \"DoRA\")",
                  lp_tensor_get_name (m->parts[PART_DORA_SCALE]));
          return NULL;
        }
      if (!(lokr ? check_lokr (m, error) : check_loha (m, error)))
        return NULL;
      for (Part p = 0; p < N_PARTS; p++)
        if (HAS (m, p) && !lp_dtype_is_float (lp_tensor_get_dtype (m->parts[p])))
          {
            refuse (error, m, "%s is %s, not a float dtype", part_names[p],
                    lp_dtype_to_string (lp_tensor_get_dtype (m->parts[p])));
            return NULL;
          }
    }
  return g_steal_pointer (&modules);
}

/* ---- one module's computation, shared by its two lazy factors ----------- */

typedef struct {
  Module *module;
  guint k;
  LpLoraStats *stats;
  GBytes *held[2];        /* down, up: what the computation hands over */
} Job;

static void
job_free (gpointer data)
{
  Job *job = data;
  g_clear_pointer (&job->held[0], g_bytes_unref);
  g_clear_pointer (&job->held[1], g_bytes_unref);
  g_clear_pointer (&job->stats, lp_lora_stats_unref);
  module_free (job->module);
  g_free (job);
}

static double *
dup_part (Module *m, Part p, GError **error)
{
  double *v = lp_tensor_dup_f64 (m->parts[p], NULL, error);
  if (v && !lp_lora_all_finite_f64 (v, lp_tensor_get_n_elements (m->parts[p])))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC, "NaN or infinity in %s", part_names[p]);
      g_clear_pointer (&v, g_free);
    }
  return v;
}

/* w_aᵀ: the Tucker layout keeps the out factor as [r, out]. */
static double *
transposed (const double *x, guint64 rows, guint64 cols)
{
  double *t = g_new (double, MAX (rows * cols, 1));
  for (guint64 i = 0; i < rows; i++)
    for (guint64 j = 0; j < cols; j++)
      t[j * rows + i] = x[i * cols + j];
  return t;
}

/* One LoHa product w_a @ w_b as factors u [out, r], v [r, in]. */
static gboolean
loha_side (Module *m, gboolean second, double **u, double **v, guint *r, GError **error)
{
  Part pa = second ? PART_HADA_W2_A : PART_HADA_W1_A;
  Part pb = second ? PART_HADA_W2_B : PART_HADA_W1_B;
  Part pt = second ? PART_HADA_T2 : PART_HADA_T1;
  g_autofree double *a = dup_part (m, pa, error);
  g_autofree double *b = a ? dup_part (m, pb, error) : NULL;

  if (b == NULL)
    return FALSE;
  *r = DIM (m, pb, 0);
  if (HAS (m, pt))
    {
      g_autofree double *t = dup_part (m, pt, error);
      if (t == NULL)
        return FALSE;
      *u = transposed (a, *r, m->out);
      *v = g_new (double, (gsize) *r * m->in);
      lp_lora_tucker_right (t, b, *r, m->in_channels, m->in / m->in_channels, *v);
    }
  else
    {
      *u = g_steal_pointer (&a);
      *v = g_steal_pointer (&b);
    }
  return TRUE;
}

/* A LoHa module's update as the product B A of its Khatri–Rao factors,
 * [out, r1·r2] and [r1·r2, in], which lp-lora-math.c forms a block at a
 * time from the four parts: as stored (mapped pages) when they share a
 * dtype and have no Tucker core, else as f64 copies. */
typedef struct {
  LpLoraKhatriRao kr;
  GBytes *stored[4];
  double *copies[4];
} LohaParts;

static void
loha_parts_clear (LohaParts *lp)
{
  for (guint i = 0; i < 4; i++)
    {
      g_clear_pointer (&lp->stored[i], g_bytes_unref);
      g_clear_pointer (&lp->copies[i], g_free);
    }
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (LohaParts, loha_parts_clear)

static gboolean
loha_factors (Module        *m,
              LpLoraFactors *f,
              LohaParts     *lp,
              GError       **error)
{
  static const Part order[4] = { PART_HADA_W1_A, PART_HADA_W1_B, PART_HADA_W2_A, PART_HADA_W2_B };
  LpDtype dtype = lp_tensor_get_dtype (m->parts[PART_HADA_W1_A]);
  gboolean as_stored = !HAS (m, PART_HADA_T1) && !HAS (m, PART_HADA_T2) && lp_dtype_can_convert (dtype);
  gconstpointer data[4];
  guint r1, r2;

  for (guint i = 0; i < 4; i++)
    if (lp_tensor_get_dtype (m->parts[order[i]]) != dtype)
      as_stored = FALSE;
  if (as_stored)
    {
      for (guint i = 0; i < 4; i++)
        {
          LpTensor *t = m->parts[order[i]];
          if ((lp->stored[i] = lp_tensor_dup_data (t, error)) == NULL)
            return FALSE;
          data[i] = g_bytes_get_data (lp->stored[i], NULL);
          if (!lp_lora_all_finite (dtype, data[i], lp_tensor_get_n_elements (t)))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC, "NaN or infinity in %s",
                           part_names[order[i]]);
              return FALSE;
            }
        }
      r1 = DIM (m, PART_HADA_W1_B, 0);
      r2 = DIM (m, PART_HADA_W2_B, 0);
    }
  else
    {
      dtype = LP_DTYPE_F64;
      if (!loha_side (m, FALSE, &lp->copies[0], &lp->copies[1], &r1, error) ||
          !loha_side (m, TRUE, &lp->copies[2], &lp->copies[3], &r2, error))
        return FALSE;
      for (guint i = 0; i < 4; i++)
        data[i] = lp->copies[i];
    }

  /* Products of two 16-bit numbers are exact in f32: those factors are
   * summed in f32 (f64 where ill-conditioned), as lora-svd's auto does. */
  gboolean f32 = TRUE;
  for (Part p = PART_HADA_W1_A; p <= PART_HADA_T2; p++)
    if (HAS (m, p) && lp_dtype_get_bits (lp_tensor_get_dtype (m->parts[p])) > 16)
      f32 = FALSE;
  if (HAS (m, PART_HADA_T1))
    f32 = FALSE;   /* the Tucker contraction is a sum, not a product */

  lp->kr = (LpLoraKhatriRao) { dtype, data[0], data[1], data[2], data[3], r1, r2 };
  memset (f, 0, sizeof *f);
  f->f32 = f32;
  f->f64_fallback = f32;
  f->khatri_rao = &lp->kr;
  f->out = m->out;
  f->in = m->in;
  f->r = r1 * r2;
  return TRUE;
}

/* Whether a LoHa module costs less as its dense update than through its
 * Khatri–Rao factors. The factored route sums two Gram matrices of rank
 * R = r1·r2, 2·(out + in)·R² flops in the kernels, then works on R × R
 * matrices, about 8·R³ flops in LAPACK calls several times slower a flop;
 * the dense one makes D = (u1 v1) ⊙ (u2 v2) a block at a time, twice
 * (2·out·in·(r1 + r2) each), sums the Gram matrix of its smaller side s
 * (out·in·s) and decomposes it (about 9·s³ in LAPACK, 4/3·s³ for the
 * tridiagonal form alone when only the top k are asked for). At dim 8 on Flux
 * (R = 64, 3072-wide) the factored route is some hundred times cheaper; at
 * dim 32 on SD 1.5's 320-wide layers (R = 1024) the dense one is. */
#define LAPACK_FLOP_COST 4.0

static gboolean
loha_dense_is_cheaper (guint64 out, guint64 in, guint r1, guint r2, guint top)
{
  double R = (double) r1 * r2, s = MIN (out, in);
  double factored = 2.0 * (out + in) * R * R + LAPACK_FLOP_COST * 8.0 * R * R * R;
  double dense = 4.0 * out * in * (r1 + r2) + (double) out * in * s
                 + LAPACK_FLOP_COST * (top > 0 && top < s ? 4.0 / 3 : 9.0) * s * s * s;
  return dense < factored;
}

/* The dense SVD of a LoHa update (lp-lora-dense.c, its Gram matrix on the
 * smaller side), the kept part written as kohya factors. */
static gboolean
compute_loha_dense (Job *job, LohaParts *parts, double *kept, double *total, GError **error)
{
  Module *m = job->module;
  LpLoraDifference d = { .out = m->out, .in = m->in, .hadamard = &parts->kr };
  guint k = job->k;
  g_autoptr (LpLoraDenseSvd) svd = lp_lora_difference_svd_top (&d, k, error);

  if (svd == NULL)
    return FALSE;
  g_autofree float *up = g_new (float, MAX (m->out * k, 1));
  g_autofree float *down = g_new (float, MAX ((gsize) k * m->in, 1));
  lp_lora_dense_svd_factors (svd, &d, k, up, down);

  /* the scale, split as √|scale| on both sides, its sign on up */
  float root = sqrt (fabs (m->scale)), sign = m->scale < 0 ? -1.f : 1.f;
  for (gsize i = 0; i < m->out * k; i++)
    up[i] *= sign * root;
  for (gsize i = 0; i < (gsize) k * m->in; i++)
    down[i] *= root;

  gsize down_size = (gsize) k * m->in * (lp_dtype_get_bits (m->down_dtype) / 8);
  gsize up_size = (gsize) m->out * k * (lp_dtype_get_bits (m->up_dtype) / 8);
  gpointer down_out = g_malloc (MAX (down_size, 1)), up_out = g_malloc (MAX (up_size, 1));
  gsize overflow_down = lp_dtype_from_f32 (m->down_dtype, down, down_out, (gsize) k * m->in);
  gsize overflow_up = lp_dtype_from_f32 (m->up_dtype, up, up_out, m->out * k);
  job->held[0] = g_bytes_new_take (down_out, down_size);
  job->held[1] = g_bytes_new_take (up_out, up_size);
  if (!lp_lora_check_overflow (overflow_down, m->down_dtype, error) ||
      !lp_lora_check_overflow (overflow_up, m->up_dtype, error))
    return FALSE;

  double s2 = m->scale * m->scale;
  *kept = 0;
  for (guint i = 0; i < MIN (k, svd->n); i++)
    *kept += svd->sigma[i] * svd->sigma[i] * s2;
  *total = svd->total * s2;
  *kept = MIN (*kept, *total);
  return TRUE;
}

static gboolean
compute_loha (Job *job, double *kept, double *total, GError **error)
{
  Module *m = job->module;
  g_auto (LohaParts) parts = { { 0, }, };
  LpLoraFactors f;

  if (!loha_factors (m, &f, &parts, error))
    return FALSE;
  if (loha_dense_is_cheaper (m->out, m->in, parts.kr.r1, parts.kr.r2, job->k))
    return compute_loha_dense (job, &parts, kept, total, error);
  guint R = f.r;
  g_autoptr (LpLoraSpectrum) spectrum = lp_lora_spectrum_compute (&f, MIN (job->k, R), TRUE, error);
  if (spectrum == NULL)
    return FALSE;

  guint k = job->k;
  gsize down_size = (gsize) k * m->in * (lp_dtype_get_bits (m->down_dtype) / 8);
  gsize up_size = (gsize) m->out * k * (lp_dtype_get_bits (m->up_dtype) / 8);
  gpointer down = g_malloc (MAX (down_size, 1)), up = g_malloc (MAX (up_size, 1));
  gsize overflow = lp_lora_spectrum_apply_to (spectrum, &f, MIN (k, R), k, m->scale,
                                              m->up_dtype, up, m->down_dtype, down);
  job->held[0] = g_bytes_new_take (down, down_size);
  job->held[1] = g_bytes_new_take (up, up_size);
  if (!lp_lora_check_overflow (overflow, lp_dtype_get_bits (m->up_dtype) <= lp_dtype_get_bits (m->down_dtype)
                               ? m->up_dtype : m->down_dtype, error))
    return FALSE;
  *kept = 0;
  for (guint i = 0; i < MIN (k, R); i++)
    *kept += spectrum->sigma[i] * spectrum->sigma[i];
  *total = spectrum->total;
  return TRUE;
}

/* A LoKr module's two Kronecker sides, their data in @buffers (freed by
 * kron_sides_clear()). */
typedef struct {
  LpLoraKronPart w1;
  LpLoraKronPart w2;
  double *buffers[6];
} KronSides;

static void
kron_sides_clear (KronSides *ks)
{
  for (guint i = 0; i < G_N_ELEMENTS (ks->buffers); i++)
    g_clear_pointer (&ks->buffers[i], g_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (KronSides, kron_sides_clear)

static gboolean
lokr_sides (Module     *m,
            KronSides  *ks,
            GError    **error)
{
  double **d1 = &ks->buffers[0], **a1 = &ks->buffers[1], **b1 = &ks->buffers[2];
  double **d2 = &ks->buffers[3], **a2 = &ks->buffers[4], **b2 = &ks->buffers[5];

  if (HAS (m, PART_LOKR_W1))
    {
      if ((*d1 = dup_part (m, PART_LOKR_W1, error)) == NULL)
        return FALSE;
      ks->w1 = (LpLoraKronPart) { *d1, NULL, NULL, 0, DIM (m, PART_LOKR_W1, 0), DIM (m, PART_LOKR_W1, 1),
                                  lp_dtype_get_bits (lp_tensor_get_dtype (m->parts[PART_LOKR_W1])) <= 16 };
    }
  else
    {
      if ((*a1 = dup_part (m, PART_LOKR_W1_A, error)) == NULL ||
          (*b1 = dup_part (m, PART_LOKR_W1_B, error)) == NULL)
        return FALSE;
      ks->w1 = (LpLoraKronPart) { NULL, *a1, *b1, DIM (m, PART_LOKR_W1_B, 0),
                                  DIM (m, PART_LOKR_W1_A, 0), DIM (m, PART_LOKR_W1_B, 1) };
    }

  guint64 kernel = m->in / m->in_channels;
  guint64 o2 = m->out / ks->w1.rows, i2 = m->in_channels / ks->w1.cols;
  if (HAS (m, PART_LOKR_W2))
    {
      if ((*d2 = dup_part (m, PART_LOKR_W2, error)) == NULL)
        return FALSE;
      ks->w2 = (LpLoraKronPart) { *d2, NULL, NULL, 0, o2, i2 * kernel,
                                  lp_dtype_get_bits (lp_tensor_get_dtype (m->parts[PART_LOKR_W2])) <= 16 };
    }
  else
    {
      guint r = DIM (m, PART_LOKR_W2_B, 0);
      g_autofree double *wa = dup_part (m, PART_LOKR_W2_A, error);
      g_autofree double *wb = wa ? dup_part (m, PART_LOKR_W2_B, error) : NULL;
      if (wb == NULL)
        return FALSE;
      if (HAS (m, PART_LOKR_T2))
        {
          g_autofree double *t = dup_part (m, PART_LOKR_T2, error);
          if (t == NULL)
            return FALSE;
          *a2 = transposed (wa, r, o2);
          *b2 = g_new (double, (gsize) r * i2 * kernel);
          lp_lora_tucker_right (t, wb, r, i2, kernel, *b2);
        }
      else
        {
          *a2 = g_steal_pointer (&wa);
          *b2 = g_steal_pointer (&wb);
        }
      ks->w2 = (LpLoraKronPart) { NULL, *a2, *b2, r, o2, i2 * kernel };
    }
  return TRUE;
}

static gboolean
compute_lokr (Job *job, double *kept, double *total, GError **error)
{
  Module *m = job->module;
  g_auto (KronSides) ks = { { 0, }, };
  guint k = job->k;

  if (!lokr_sides (m, &ks, error))
    return FALSE;
  g_autofree double *b_new = g_new (double, MAX (m->out * k, 1));
  g_autofree double *a_new = g_new (double, MAX ((gsize) k * m->in, 1));
  if (!lp_lora_lokr_reduce (&ks.w1, &ks.w2, m->scale, k, b_new, a_new, kept, total, error))
    return FALSE;

  gsize overflow_up = 0, overflow_down = 0;
  job->held[0] = lp_lora_bytes_from_f64 (m->down_dtype, a_new, (gsize) k * m->in, &overflow_down);
  job->held[1] = lp_lora_bytes_from_f64 (m->up_dtype, b_new, m->out * k, &overflow_up);
  return lp_lora_check_overflow (overflow_down, m->down_dtype, error) &&
         lp_lora_check_overflow (overflow_up, m->up_dtype, error);
}

static gboolean
job_compute (gpointer   user_data,
             GBytes   **down,
             GBytes   **up,
             GError   **error)
{
  Job *job = user_data;
  double kept = 0, total = 0;
  gboolean ok = job->module->lokr ? compute_lokr (job, &kept, &total, error)
                                  : compute_loha (job, &kept, &total, error);
  if (!ok)
    {
      g_clear_pointer (&job->held[0], g_bytes_unref);
      g_clear_pointer (&job->held[1], g_bytes_unref);
      g_prefix_error (error, "module %s (LyCORIS %s): ", job->module->name,
                      job->module->lokr ? "LoKr" : "LoHa");
      return FALSE;
    }
  lp_lora_stats_record (job->stats, job->module->name, kept, total);
  *down = g_steal_pointer (&job->held[0]);
  *up = g_steal_pointer (&job->held[1]);
  return TRUE;
}

/* Every non-zero singular value of the module's scaled update, descending,
 * for choosing its rank: the factored SVD of LoHa's Khatri–Rao factors, or
 * LoKr's products σ_i(W1)·σ_j(W2) of both sides' whole spectra. */
static double *
module_sigma (Module  *m,
              guint   *n,
              GError **error)
{
  double *sigma = NULL;

  if (!m->lokr)
    {
      g_auto (LohaParts) parts = { { 0, }, };
      LpLoraFactors f;

      if (!loha_factors (m, &f, &parts, error))
        return NULL;
      if (loha_dense_is_cheaper (m->out, m->in, parts.kr.r1, parts.kr.r2, 0))
        {
          LpLoraDifference d = { .out = m->out, .in = m->in, .hadamard = &parts.kr };
          g_autoptr (LpLoraDenseSvd) svd = lp_lora_difference_svd (&d, error);
          if (svd == NULL)
            return NULL;
          /* the update's rank is at most r1·r2; below rounding of the
           * Gram's eigenvalues (f64 sums) a singular value is zero */
          *n = 0;
          while (*n < MIN (svd->n, f.r) && svd->sigma[*n] > 1e-7 * svd->sigma[0])
            (*n)++;
          sigma = g_new (double, MAX (*n, 1));
          for (guint i = 0; i < *n; i++)
            sigma[i] = fabs (m->scale) * svd->sigma[i];
          return sigma;
        }
      g_autoptr (LpLoraSpectrum) spectrum = lp_lora_spectrum_compute (&f, 0, FALSE, error);
      if (spectrum == NULL)
        return NULL;
      *n = spectrum->n;
      sigma = g_new (double, MAX (*n, 1));
      for (guint i = 0; i < *n; i++)
        sigma[i] = fabs (m->scale) * spectrum->sigma[i];
      return sigma;
    }

  g_auto (KronSides) ks = { { 0, }, };
  PartSvd s1, s2;

  if (!lokr_sides (m, &ks, error) || !part_svd (&ks.w1, G_MAXUINT, &s1, error))
    return NULL;
  if (!part_svd (&ks.w2, G_MAXUINT, &s2, error))
    {
      part_svd_clear (&s1);
      return NULL;
    }
  *n = s1.n * s2.n;
  sigma = g_new (double, MAX (*n, 1));
  for (guint i = 0; i < s1.n; i++)
    for (guint j = 0; j < s2.n; j++)
      sigma[(gsize) i * s2.n + j] = fabs (m->scale) * s1.sigma[i] * s2.sigma[j];
  part_svd_clear (&s1);
  part_svd_clear (&s2);
  /* descending */
  for (guint i = 0; i < *n; i++)
    sigma[i] = -sigma[i];
  qsort (sigma, *n, sizeof (double), compare_doubles);
  for (guint i = 0; i < *n; i++)
    sigma[i] = -sigma[i];
  return sigma;
}

double *
lp_lora_lycoris_module_sigma (LpCheckpoint  *input,
                              LpLoraModule  *module,
                              guint         *n,
                              GError       **error)
{
  g_autoptr (GPtrArray) found = g_ptr_array_new ();
  g_autoptr (GPtrArray) modules = NULL;

  g_ptr_array_add (found, module);
  /* a DoRA magnitude does not change ΔW's spectrum */
  modules = find_modules (input, found, TRUE, error);
  if (modules == NULL)
    return NULL;
  g_return_val_if_fail (modules->len == 1, NULL);
  return module_sigma (g_ptr_array_index (modules, 0), n, error);
}

/* kohya's layout: down [k, in] or a conv's [k, in, *kernel]; up [out, k] or
 * [out, k, 1, ...] (LoCon). Where the input keeps a conv kernel flattened
 * into its 2-D factors, so does the output: the matrix is the same, and
 * ComfyUI's LoRA loader (comfy/weight_adapter/lora.py) flattens both factors
 * and reshapes their product to the weight. */
static guint
factor_shape (Module *m, guint k, gboolean up, guint64 *shape)
{
  guint n = 0;

  if (up)
    {
      shape[n++] = m->out;
      shape[n++] = k;
      for (guint i = 0; i < m->n_kernel; i++)
        shape[n++] = 1;
    }
  else
    {
      shape[n++] = k;
      if (m->n_kernel > 0)
        {
          shape[n++] = m->in_channels;
          for (guint i = 0; i < m->n_kernel; i++)
            shape[n++] = m->kernel[i];
        }
      else
        shape[n++] = m->in;
    }
  return n;
}

/* kohya's metadata names the network; a file now holding plain LoRAs says
 * so: of rank @k (alpha = k), or "Dynamic" (0) when the modules were written
 * at different ranks, as kohya's resize_lora.py writes a dynamic resize. */
static void
rewrite_metadata (LpCheckpoint *output,
                  guint         k)
{
  const char *network = lp_checkpoint_get_metadata (output, "ss_network_module");
  g_autofree char *rank = k > 0 ? g_strdup_printf ("%u", k) : g_strdup ("Dynamic");

  if (network == NULL)
    return;
  lp_checkpoint_set_metadata (output, "ss_network_module", "networks.lora");
  lp_checkpoint_set_metadata (output, "ss_network_dim", rank);
  lp_checkpoint_set_metadata (output, "ss_network_alpha", rank);
  if (lp_checkpoint_get_metadata (output, "ss_network_args") != NULL)
    lp_checkpoint_set_metadata (output, "ss_network_args", "{}");
}

LpCheckpoint *
lp_lora_lycoris_reduce (LpCheckpoint      *input,
                        GPtrArray         *found,
                        guint              rank,
                        LpLoraRankChooser  choose,
                        gpointer           choose_data,
                        gboolean           pad,
                        gboolean           keep_dora,
                        LpLoraStats   *stats,
                        GHashTable    *converted,
                        GError       **error)
{
  g_autoptr (GPtrArray) modules = find_modules (input, found, keep_dora, error);
  if (modules == NULL)
    return NULL;

  g_autoptr (GPtrArray) tensors = lp_checkpoint_get_tensors (input);
  g_autoptr (GHashTable) used = g_hash_table_new (NULL, NULL);     /* input tensors replaced */
  g_autoptr (GHashTable) at = g_hash_table_new (NULL, NULL);       /* first index + 1 -> module index + 1 */
  g_autoptr (LpCheckpoint) output = lp_checkpoint_new_like (input);
  guint written_rank = G_MAXUINT;   /* the one rank written, 0 for several */

  for (guint i = 0; i < modules->len; i++)
    {
      Module *m = g_ptr_array_index (modules, i);
      /* a kept DoRA magnitude stays beside the plain module of the same name */
      for (Part p = 0; p < N_PARTS; p++)
        if (HAS (m, p) && p != PART_DORA_SCALE)
          g_hash_table_add (used, m->parts[p]);
      g_hash_table_insert (at, GUINT_TO_POINTER (m->first + 1), GUINT_TO_POINTER (i + 1));
      for (guint s = 0; s < 2; s++)
        {
          g_autofree char *key = g_strconcat (m->name, s ? ".lora_up.weight" : ".lora_down.weight", NULL);
          if (lp_checkpoint_lookup (input, key) != NULL)
            {
              refuse (error, m, "the file also holds %s; a module cannot be both", key);
              return NULL;
            }
        }
    }

  for (guint i = 0; i < tensors->len; i++)
    {
      LpTensor *tensor = g_ptr_array_index (tensors, i);
      guint index = GPOINTER_TO_UINT (g_hash_table_lookup (at, GUINT_TO_POINTER (i + 1)));

      if (index > 0)
        {
          Module *m = g_ptr_array_index (modules, index - 1);
          /* written at the rank asked for, or the update's own when that is
           * lower and pad is not set (lora-svd then says so) */
          guint k;

          if (choose != NULL)
            {
              /* a rank chosen from the update's whole spectrum */
              guint n_sigma = 0;
              g_autofree double *sigma = module_sigma (m, &n_sigma, error);

              if (sigma == NULL)
                {
                  g_prefix_error (error, "module %s (LyCORIS %s): ", m->name, m->lokr ? "LoKr" : "LoHa");
                  return NULL;
                }
              k = MIN (choose (sigma, n_sigma, MIN (m->out, m->in), choose_data), m->bound);
              k = MAX (k, 1);
              if (pad)
                k = MAX (k, rank);
            }
          else
            k = pad ? rank : (guint) MIN (rank, m->bound);

          if (written_rank == G_MAXUINT)
            written_rank = k;
          else if (written_rank != k)
            written_rank = 0;
          LpDtype alpha_dtype = HAS (m, PART_ALPHA) ? lp_tensor_get_dtype (m->parts[PART_ALPHA]) : m->up_dtype;
          g_autofree char *alpha_name = g_strconcat (m->name, ".alpha", NULL);
          float alpha = k;
          guint64 scalar_shape[1] = { 1 };
          /* 0-dim, as kohya's torch.tensor(alpha) is */
          g_autoptr (LpTensor) alpha_tensor = lp_tensor_new_from_f32 (alpha_name, alpha_dtype, scalar_shape, 0,
                                                                      &alpha, 1, error);
          if (alpha_tensor == NULL)
            return NULL;

          /* the job owns the module from here */
          Job *job = g_new0 (Job, 1);
          job->k = k;
          job->stats = lp_lora_stats_ref (stats);
          job->module = m;
          g_ptr_array_index (modules, index - 1) = NULL;
          g_hash_table_add (converted, g_strdup (m->name));

          guint64 down_shape[LP_TENSOR_MAX_DIMS], up_shape[LP_TENSOR_MAX_DIMS];
          g_autofree char *down_name = g_strconcat (m->name, ".lora_down.weight", NULL);
          g_autofree char *up_name = g_strconcat (m->name, ".lora_up.weight", NULL);
          LpLoraPairSpec down_spec = { down_name, m->down_dtype, down_shape, factor_shape (m, k, FALSE, down_shape) };
          LpLoraPairSpec up_spec = { up_name, m->up_dtype, up_shape, factor_shape (m, k, TRUE, up_shape) };
          g_autoptr (LpTensor) down = NULL;
          g_autoptr (LpTensor) up = NULL;

          /* kohya writes its keys sorted: alpha, lora_down, lora_up */
          if (!lp_lora_pair_new (&down_spec, &up_spec, job_compute, job, job_free, &down, &up, error) ||
              !lp_checkpoint_add_tensor (output, alpha_tensor, error) ||
              !lp_checkpoint_add_tensor (output, down, error) ||
              !lp_checkpoint_add_tensor (output, up, error))
            return NULL;
        }
      if (!g_hash_table_contains (used, tensor) && !lp_checkpoint_add_tensor (output, tensor, error))
        return NULL;
    }
  rewrite_metadata (output, written_rank == G_MAXUINT ? rank : written_rank);
  return g_steal_pointer (&output);
}
