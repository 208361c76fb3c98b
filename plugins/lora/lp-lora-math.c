/* lp-lora-math.c: factored SVD, randomized SVD, projections and norms
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-math.h"
#include "lp-lora-kernels.h"

#include <float.h>
#include <math.h>
#include <string.h>
#include <cblas.h>
#include <lapacke.h>

/* ---- RNG --------------------------------------------------------------- */

static guint64
splitmix64 (guint64 *state)
{
  guint64 z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void
lp_lora_rng_init (LpLoraRng  *rng,
                  guint64     seed,
                  const char *name)
{
  /* FNV-1a of the name, mixed with the seed: the stream depends on which
   * module it is for, never on when it is drawn. */
  guint64 h = 0xcbf29ce484222325ull;
  for (const guchar *p = (const guchar *) (name ? name : ""); *p; p++)
    h = (h ^ *p) * 0x100000001b3ull;

  guint64 state = seed ^ splitmix64 (&h);
  for (guint i = 0; i < 4; i++)
    rng->s[i] = splitmix64 (&state);
  rng->has_spare = FALSE;
  rng->spare = 0;
}

static inline guint64
rotl (guint64 x, int k)
{
  return (x << k) | (x >> (64 - k));
}

guint64
lp_lora_rng_next (LpLoraRng *rng)
{
  guint64 *s = rng->s;
  guint64 result = rotl (s[1] * 5, 7) * 9;
  guint64 t = s[1] << 17;

  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl (s[3], 45);
  return result;
}

double
lp_lora_rng_uniform (LpLoraRng *rng)
{
  return (lp_lora_rng_next (rng) >> 11) * 0x1.0p-53;
}

double
lp_lora_rng_normal (LpLoraRng *rng)
{
  if (rng->has_spare)
    {
      rng->has_spare = FALSE;
      return rng->spare;
    }

  /* Box–Muller; 1 - u keeps the logarithm finite. */
  double u1 = 1.0 - lp_lora_rng_uniform (rng);
  double u2 = lp_lora_rng_uniform (rng);
  double radius = sqrt (-2.0 * log (u1));
  rng->spare = radius * sin (2.0 * G_PI * u2);
  rng->has_spare = TRUE;
  return radius * cos (2.0 * G_PI * u2);
}

void
lp_lora_projection_matrix (LpLoraRng *rng,
                           gboolean   sparse,
                           guint      k,
                           guint      r,
                           float     *matrix)
{
  double inv_sqrt_k = 1.0 / sqrt ((double) k);
  double sparse_value = sqrt (3.0) * inv_sqrt_k;

  for (gsize i = 0; i < (gsize) k * r; i++)
    {
      if (sparse)
        {
          guint64 draw = lp_lora_rng_next (rng) % 6;
          matrix[i] = draw == 0 ? sparse_value : draw == 1 ? -sparse_value : 0.f;
        }
      else
        matrix[i] = lp_lora_rng_normal (rng) * inv_sqrt_k;
    }
}

/* ---- helpers ----------------------------------------------------------- */

double
lp_lora_dtype_eps (LpDtype dtype)
{
  switch (dtype)
    {
    case LP_DTYPE_BF16: return 0x1.0p-8;
    case LP_DTYPE_F16: return 0x1.0p-11;
    case LP_DTYPE_F32: return 0x1.0p-24;
    case LP_DTYPE_F64: return 0x1.0p-53;
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E4M3FNUZ: return 0x1.0p-4;
    case LP_DTYPE_F8_E5M2:
    case LP_DTYPE_F8_E5M2FNUZ: return 0x1.0p-3;
    default: return 0x1.0p-8;
    }
}

void
lp_lora_spectrum_free (LpLoraSpectrum *spectrum)
{
  if (spectrum == NULL)
    return;
  g_free (spectrum->sigma);
  g_free (spectrum->map_b);
  g_free (spectrum->map_a);
  g_free (spectrum);
}

gboolean
lp_lora_all_finite (LpDtype       dtype,
                    gconstpointer values,
                    gsize         n)
{
  switch (dtype)
    {
    case LP_DTYPE_BF16:
      return lp_lora_all_finite_bf16 (values, n);
    case LP_DTYPE_F32:
      return lp_lora_all_finite_f32 (values, n);
    case LP_DTYPE_F64:
      return lp_lora_all_finite_f64 (values, n);
    case LP_DTYPE_F16:
      return lp_lora_all_finite_f16 (values, n);
    default:
      if (!lp_dtype_is_float (dtype))
        return TRUE;
      /* the 8-bit floats and the rest: widened a block at a time */
      {
        double block[1024];
        gsize size = lp_dtype_get_bits (dtype) / 8;
        for (gsize i = 0; i < n; i += G_N_ELEMENTS (block))
          {
            gsize len = MIN (G_N_ELEMENTS (block), n - i);
            lp_dtype_to_f64 (dtype, (const guchar *) values + i * size, block, len);
            if (!lp_lora_all_finite_f64 (block, len))
              return FALSE;
          }
        return TRUE;
      }
    }
}

/* ---- factors a block at a time ---------------------------------------- */

/* Stored factors (bf16, usually) are converted a block at a time into a
 * buffer that stays in cache, and each block goes straight into the BLAS
 * call: a whole f64 copy of a factor would cost more in page faults and
 * memory traffic than the arithmetic. A block holds about this many values. */
#define BLOCK_VALUES 16384
/* Steps of LoHa's parts per block of the Khatri–Rao kernels (16 floats
 * each, both sides: 64 KiB); a multiple of 8. */
#define GRAM_KHATRI_RAO_LEN 512

/* One scratch buffer per thread, kept for the thread's life: fresh large
 * allocations are mmap'd and faulted in every time, which dominates on
 * virtual machines. */
typedef enum {
  SCRATCH_BLOCK,    /* the block a kernel or BLAS call reads */
  SCRATCH_PARTS,    /* the parts a Khatri–Rao block is formed from */
  N_SCRATCH
} ScratchSlot;

typedef struct {
  gpointer data[N_SCRATCH];
  gsize size[N_SCRATCH];
} Scratch;

static void
scratch_free (gpointer data)
{
  Scratch *scratch = data;
  for (guint i = 0; i < N_SCRATCH; i++)
    g_free (scratch->data[i]);
  g_free (scratch);
}

static GPrivate scratch_key = G_PRIVATE_INIT (scratch_free);

static gpointer
scratch_get_slot (ScratchSlot slot,
                  gsize       size)
{
  Scratch *scratch = g_private_get (&scratch_key);

  if (scratch == NULL)
    {
      scratch = g_new0 (Scratch, 1);
      g_private_set (&scratch_key, scratch);
    }
  if (scratch->size[slot] < size)
    {
      g_free (scratch->data[slot]);
      scratch->data[slot] = g_malloc (size);
      scratch->size[slot] = size;
    }
  return scratch->data[slot];
}

static gpointer
scratch_get (gsize size)
{
  return scratch_get_slot (SCRATCH_BLOCK, size);
}

#define ALIGN_UP(n) (((n) + 63) & ~(gsize) 63)

static LpDtype
compute_dtype (const LpLoraFactors *f)
{
  return f->f32 ? LP_DTYPE_F32 : LP_DTYPE_F64;
}

static LpDtype
stored_dtype (const LpLoraFactors *f,
              gboolean             up)
{
  if (!f->stored)
    return compute_dtype (f);
  return up ? f->b_dtype : f->a_dtype;
}

static gsize
dtype_size (LpDtype dtype)
{
  return lp_dtype_get_bits (dtype) / 8;
}

/* Columns of A [r, n] (or rows of B [n, r]) per block. */
static gsize
block_len (guint r)
{
  return CLAMP (BLOCK_VALUES / MAX (r, 1), 16, 4096);
}

/* ---- Khatri–Rao factors, formed a block at a time ---------------------- */

/* Rows o0 … o0 + h of B = u1 • u2 (row-wise), h × r1·r2, in f32 or, with
 * @wide, f64; row o is u1[o, :] ⊗ u2[o, :]. */
static void
khatri_rao_rows (const LpLoraKhatriRao *kr,
                 guint64                o0,
                 gsize                  h,
                 gboolean               wide,
                 gpointer               buf)
{
  guint r1 = kr->r1, r2 = kr->r2, R = r1 * r2;
  gsize vsize = wide ? sizeof (double) : sizeof (float);
  gsize ssize = lp_dtype_get_bits (kr->dtype) / 8;
  guchar *parts = scratch_get_slot (SCRATCH_PARTS, vsize * h * (r1 + r2));
  guchar *p1 = parts, *p2 = parts + vsize * h * r1;
  const guchar *u1 = (const guchar *) kr->u1 + o0 * r1 * ssize;
  const guchar *u2 = (const guchar *) kr->u2 + o0 * r2 * ssize;

  if (wide)
    {
      double *x1 = (double *) p1, *x2 = (double *) p2, *y = buf;
      lp_dtype_to_f64 (kr->dtype, u1, x1, h * r1);
      lp_dtype_to_f64 (kr->dtype, u2, x2, h * r2);
      for (gsize o = 0; o < h; o++)
        for (guint i = 0; i < r1; i++)
          {
            double a = x1[o * r1 + i];
            double *row = y + o * R + (gsize) i * r2;
            for (guint j = 0; j < r2; j++)
              row[j] = a * x2[o * r2 + j];
          }
      return;
    }
  lp_dtype_to_f32 (kr->dtype, u1, (float *) p1, h * r1);
  lp_dtype_to_f32 (kr->dtype, u2, (float *) p2, h * r2);
  lp_lora_face_split_rows_f32 ((float *) p1, r1, (float *) p2, r2, h, buf);
}

/* Columns c0 … c0 + w of A = v1 • v2 (column-wise), r1·r2 rows of w values
 * at a row stride of @ld, in f32 or, with @wide, f64; row i·r2 + j is
 * v1[i, c0 …] ⊙ v2[j, c0 …]. */
static void
khatri_rao_cols (const LpLoraKhatriRao *kr,
                 guint64                in,
                 guint64                c0,
                 gsize                  w,
                 gboolean               wide,
                 gpointer               buf,
                 gsize                  ld)
{
  guint r1 = kr->r1, r2 = kr->r2;
  gsize vsize = wide ? sizeof (double) : sizeof (float);
  gsize ssize = lp_dtype_get_bits (kr->dtype) / 8;
  guchar *parts = scratch_get_slot (SCRATCH_PARTS, vsize * w * (r1 + r2));

  for (guint i = 0; i < r1; i++)
    {
      gconstpointer src = (const guchar *) kr->v1 + (i * in + c0) * ssize;
      if (wide)
        lp_dtype_to_f64 (kr->dtype, src, (double *) parts + (gsize) i * w, w);
      else
        lp_dtype_to_f32 (kr->dtype, src, (float *) parts + (gsize) i * w, w);
    }
  for (guint j = 0; j < r2; j++)
    {
      gconstpointer src = (const guchar *) kr->v2 + (j * in + c0) * ssize;
      if (wide)
        lp_dtype_to_f64 (kr->dtype, src, (double *) parts + (gsize) (r1 + j) * w, w);
      else
        lp_dtype_to_f32 (kr->dtype, src, (float *) parts + (gsize) (r1 + j) * w, w);
    }
  if (!wide)
    {
      lp_lora_hadamard_rows_f32 ((float *) parts, r1, (float *) parts + (gsize) r1 * w, r2, w, buf, ld);
      return;
    }
  for (guint i = 0; i < r1; i++)
    for (guint j = 0; j < r2; j++)
      {
        const double *a = (const double *) parts + (gsize) i * w, *b = (const double *) parts + (gsize) (r1 + j) * w;
        double *y = (double *) buf + ((gsize) i * r2 + j) * ld;
        for (gsize c = 0; c < w; c++)
          y[c] = a[c] * b[c];
      }
}

/* For lp_lora_gram_khatri_rao_f32(): steps t0 … t0 + w of the up side (rows
 * of u1, u2) or of the down side (columns of v1, v2), each step's r1 and r2
 * values in a row of 16 floats (zero after) of @x1 and @x2. */
static void
khatri_rao_steps (const LpLoraKhatriRao *kr,
                  gboolean               up,
                  guint64                n,
                  guint64                t0,
                  gsize                  w,
                  float                 *x1,
                  float                 *x2)
{
  gsize ssize = lp_dtype_get_bits (kr->dtype) / 8;
  float *tmp = scratch_get_slot (SCRATCH_PARTS, sizeof (float) * w * MAX (kr->r1, kr->r2));

  /* rows up to a multiple of 8 are zero: lp_lora_map_khatri_rao_f32()
   * reads them */
  gsize rows = (w + 7) / 8 * 8;

  g_assert (w <= GRAM_KHATRI_RAO_LEN);
  memset (x1, 0, sizeof (float) * rows * 16);
  memset (x2, 0, sizeof (float) * rows * 16);
  for (guint side = 0; side < 2; side++)
    {
      guint r = side ? kr->r2 : kr->r1;
      float *x = side ? x2 : x1;
      const guchar *data = side ? (up ? kr->u2 : kr->v2) : (up ? kr->u1 : kr->v1);

      if (up)
        {
          lp_dtype_to_f32 (kr->dtype, data + t0 * r * ssize, tmp, w * r);
          for (gsize t = 0; t < w; t++)
            memcpy (x + t * 16, tmp + t * r, sizeof (float) * r);
        }
      else
        for (guint i = 0; i < r; i++)
          {
            lp_dtype_to_f32 (kr->dtype, data + (i * n + t0) * ssize, tmp, w);
            for (gsize t = 0; t < w; t++)
              x[t * 16 + i] = tmp[t];
          }
    }
}

/* Rows i0 … i0 + h of the up factor B [n, r] (h × r, row-major), or columns
 * j0 … j0 + w of the down factor A [r, n] (r rows at a stride of @ld), in
 * f32 or (@wide) f64: converted from the stored dtype, or formed from
 * Khatri–Rao parts. */
static void
load_up_rows (const LpLoraFactors *f,
              guint64              i0,
              gsize                h,
              gboolean             wide,
              gpointer             buf)
{
  if (f->khatri_rao)
    {
      khatri_rao_rows (f->khatri_rao, i0, h, wide, buf);
      return;
    }
  LpDtype src = stored_dtype (f, TRUE);
  const guchar *data = (const guchar *) f->b + i0 * f->r * dtype_size (src);
  if (wide)
    lp_dtype_to_f64 (src, data, buf, h * f->r);
  else
    lp_dtype_to_f32 (src, data, buf, h * f->r);
}

static void
load_down_cols (const LpLoraFactors *f,
                guint64              j0,
                gsize                w,
                gboolean             wide,
                gpointer             buf,
                gsize                ld)
{
  if (f->khatri_rao)
    {
      khatri_rao_cols (f->khatri_rao, f->in, j0, w, wide, buf, ld);
      return;
    }
  LpDtype src = stored_dtype (f, FALSE);
  gsize ssize = dtype_size (src);
  for (guint t = 0; t < f->r; t++)
    {
      const guchar *data = (const guchar *) f->a + (t * f->in + j0) * ssize;
      if (wide)
        lp_dtype_to_f64 (src, data, (double *) buf + (gsize) t * ld, w);
      else
        lp_dtype_to_f32 (src, data, (float *) buf + (gsize) t * ld, w);
    }
}

/* Columns of A (rows of B) per block of the f32 Gram kernels: a block of
 * a rank-64 factor stays within L2, and each tile of it within L1. */
#define GRAM_ROWS_BLOCK 512
#define GRAM_COLS_BLOCK 128
/* The same for the blocked kernels (r ≥ LP_LORA_GRAM_BLOCKED_RANK): a
 * block of a rank-256 factor and its packed panel stay within L2 together. */
#define GRAM_BLOCKED_LEN 128

/* The f32 Gram matrix (see lp-lora-kernels.c), a block at a time; bf16
 * read in place where the machine has the bf16 dot product, the blocked
 * kernels from LP_LORA_GRAM_BLOCKED_RANK on. */
static void
gram_f32 (const LpLoraFactors *f,
          gboolean             up,
          double              *g)
{
  guint r = f->r;
  guint64 n = up ? f->out : f->in;
  const guchar *data = up ? f->b : f->a;
  LpDtype src = stored_dtype (f, up);

  memset (g, 0, sizeof (double) * r * r);
  if (src == LP_DTYPE_BF16 && f->khatri_rao == NULL && lp_lora_have_bf16_dot ())
    {
      if (r >= LP_LORA_GRAM_BLOCKED_RANK)
        {
          gpointer scratch = scratch_get (lp_lora_gram_blocked_scratch_size (r));
          if (up)
            lp_lora_gram_blocked_cols_bf16 ((const guint16 *) data, r, n, g, scratch);
          else
            lp_lora_gram_blocked_rows_bf16 ((const guint16 *) data, r, n, g, scratch);
        }
      else if (up)
        lp_lora_gram_cols_bf16 ((const guint16 *) data, r, n, g,
                                scratch_get (lp_lora_gram_bf16_scratch_size (r)));
      else
        lp_lora_gram_rows_bf16 ((const guint16 *) data, r, n, g);
      return;
    }
  if (r >= LP_LORA_GRAM_BLOCKED_RANK && f->khatri_rao && f->khatri_rao->r1 <= 16 && f->khatri_rao->r2 <= 16)
    {
      /* LoHa: the kernel sums the Gram matrix in its symmetry, from the
       * parts' values a step at a time */
      guint r1 = f->khatri_rao->r1, r2 = f->khatri_rao->r2;
      gsize block = ALIGN_UP (sizeof (float) * 16 * GRAM_KHATRI_RAO_LEN);
      gsize pairs = (gsize) r1 * (r1 + 1) / 2 * r2 * (r2 + 1) / 2;
      guchar *buf = scratch_get (2 * block + ALIGN_UP (sizeof (double) * pairs)
                                 + lp_lora_gram_khatri_rao_scratch_size (r1, r2));
      float *x1 = (float *) buf, *x2 = (float *) (buf + block);
      double *c = (double *) (buf + 2 * block);
      memset (c, 0, sizeof (double) * pairs);
      for (guint64 t0 = 0; t0 < n; t0 += GRAM_KHATRI_RAO_LEN)
        {
          gsize w = MIN (GRAM_KHATRI_RAO_LEN, n - t0);
          khatri_rao_steps (f->khatri_rao, up, n, t0, w, x1, x2);
          lp_lora_gram_khatri_rao_f32 (x1, x2, r1, r2, w, c, buf + 2 * block + ALIGN_UP (sizeof (double) * pairs));
        }
      lp_lora_khatri_rao_gram_expand (c, r1, r2, g);
      return;
    }
  if (r >= LP_LORA_GRAM_BLOCKED_RANK)
    {
      /* blocks of GRAM_BLOCKED_LEN along the factor's long side, converted,
       * then packed by the kernel into the panel after them */
      gsize block = ALIGN_UP ((gsize) r * GRAM_BLOCKED_LEN);
      float *buf = scratch_get (sizeof (float) * block + lp_lora_gram_blocked_scratch_size (r));
      gpointer panel = buf + block;
      for (guint64 j0 = 0; j0 < n; j0 += GRAM_BLOCKED_LEN)
        {
          gsize w = MIN (GRAM_BLOCKED_LEN, n - j0);
          if (up)
            {
              load_up_rows (f, j0, w, FALSE, buf);
              lp_lora_gram_blocked_cols_f32 (buf, r, w, g, panel);
            }
          else
            {
              load_down_cols (f, j0, w, FALSE, buf, w);
              lp_lora_gram_blocked_rows_f32 (buf, w, r, w, g, panel);
            }
        }
      return;
    }
  if (up)
    {
      float *buf = scratch_get (sizeof (float) * ((gsize) r * GRAM_COLS_BLOCK + LP_LORA_KERNEL_SLACK));
      memset (buf + (gsize) r * GRAM_COLS_BLOCK, 0, sizeof (float) * LP_LORA_KERNEL_SLACK);
      for (guint64 i0 = 0; i0 < n; i0 += GRAM_COLS_BLOCK)
        {
          gsize h = MIN (GRAM_COLS_BLOCK, n - i0);
          load_up_rows (f, i0, h, FALSE, buf);
          lp_lora_gram_cols_f32 (buf, r, h, g);
        }
      return;
    }

  float *buf = scratch_get (sizeof (float) * r * GRAM_ROWS_BLOCK);
  for (guint64 j0 = 0; j0 < n; j0 += GRAM_ROWS_BLOCK)
    {
      gsize w = MIN (GRAM_ROWS_BLOCK, n - j0);
      gsize padded = (w + 15) / 16 * 16;
      load_down_cols (f, j0, w, FALSE, buf, padded);
      for (guint t = 0; t < r; t++)
        memset (buf + (gsize) t * padded + w, 0, sizeof (float) * (padded - w));
      lp_lora_gram_rows_f32 (buf, padded, r, padded, g);
    }
}

/* G = A Aᵀ (r × r, upper triangle) of the down factor, or G = Bᵀ B of the up
 * factor when @up: in f32 blocks (gram_f32), or in f64 with dsyrk, widened a
 * block at a time unless the factor is f64 already. */
static void
gram (const LpLoraFactors *f,
      gboolean             up,
      double              *g)
{
  if (f->f32)
    {
      gram_f32 (f, up, g);
      return;
    }

  guint r = f->r;
  guint64 n = up ? f->out : f->in;
  const guchar *data = up ? f->b : f->a;
  LpDtype src = stored_dtype (f, up);
  CBLAS_TRANSPOSE trans = up ? CblasTrans : CblasNoTrans;

  memset (g, 0, sizeof (double) * r * r);
  /* A factor with no columns (in or out 0): G is 0. BLAS would be handed
   * lda = 0, an illegal argument it reports on stderr. */
  if (n == 0)
    return;
  if (src == LP_DTYPE_F64 && f->khatri_rao == NULL)
    {
      /* one call over the whole factor */
      cblas_dsyrk (CblasRowMajor, CblasUpper, trans, r, n, 1.0, (const double *) data, up ? r : n, 0.0, g, r);
      return;
    }

  gsize bl = block_len (r);
  double *buf = scratch_get (sizeof (double) * r * bl);
  for (guint64 j0 = 0; j0 < n; j0 += bl)
    {
      gsize w = MIN (bl, n - j0);

      if (up)   /* rows j0 … j0 + w of B are contiguous */
        load_up_rows (f, j0, w, TRUE, buf);
      else
        load_down_cols (f, j0, w, TRUE, buf, w);
      cblas_dsyrk (CblasRowMajor, CblasUpper, trans, r, w, 1.0, buf, up ? r : w, 1.0, g, r);
    }
}

/* Fills the lower triangle of an r × r Gram matrix from its upper one. */
static void
symmetrize (double *g, guint r)
{
  for (guint i = 0; i < r; i++)
    for (guint j = 0; j < i; j++)
      g[i * r + j] = g[j * r + i];
}

/* Relative size below which an eigenvalue of a Gram matrix is rounding:
 * about r·1e-14 of the largest for f64 sums, r·1e-6 for f32 ones. */
static double
gram_floor (guint r, gboolean f32)
{
  return r * (f32 ? 1e-6 : 1e-14);
}

/* Eigen-decomposes the Gram matrix in place (eigenvectors in columns,
 * ascending) and returns how many eigenvalues count as non-zero: those above
 * a relative floor set by rounding in the Gram product (f64: about
 * r·1e-14 of the largest, so singular values down to ~1e-7 σ₁ survive). */
static gboolean
eigen (double   *g,
       guint     r,
       double   *w,
       gboolean  f32,
       guint    *n_kept,
       GError  **error)
{
  lapack_int info = LAPACKE_dsyevd (LAPACK_ROW_MAJOR, 'V', 'U', r, g, r, w);
  if (info != 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "eigendecomposition of a %u × %u Gram matrix failed (LAPACK info %d)",
                   r, r, (int) info);
      return FALSE;
    }

  double top = w[r - 1];
  double floor = top * gram_floor (r, f32);
  guint kept = 0;
  if (top > 0)
    for (guint i = 0; i < r; i++)
      if (w[i] > floor)
        kept++;
  *n_kept = kept;
  return TRUE;
}

/* G = Uᵀ U in place (U upper, the strict lower triangle zeroed). FALSE when
 * G is not positive definite or so close to singular (by its pivots) that
 * rounding would decide directions: the eigen route drops those. */
static gboolean
cholesky (double   *g,
          guint     r,
          gboolean  f32)
{
  if (LAPACKE_dpotrf (LAPACK_ROW_MAJOR, 'U', r, g, r) != 0)
    return FALSE;

  double lo = G_MAXDOUBLE, hi = 0;
  for (guint i = 0; i < r; i++)
    {
      double d = g[i * r + i] * g[i * r + i];
      lo = MIN (lo, d);
      hi = MAX (hi, d);
      for (guint j = 0; j < i; j++)
        g[i * r + j] = 0;
    }
  return hi > 0 && lo > gram_floor (r, f32) * hi;
}

typedef struct {
  double value;
  lapack_int block;   /* 1-based, as dstein() and sstein() number them */
} BlockEigenvalue;

static int
block_eigenvalue_compare (gconstpointer a,
                          gconstpointer b)
{
  const BlockEigenvalue *x = a, *y = b;
  if (x->block != y->block)
    return x->block < y->block ? -1 : 1;
  return x->value < y->value ? -1 : x->value > y->value;
}

static int
double_compare (gconstpointer a,
                gconstpointer b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

/* The @top largest eigenpairs of the symmetric @h (n × n, column-major,
 * overwritten): eigenvalues ascending in @w, their vectors in the columns
 * of @z (n × top, column-major). The route of dsyevr() for a few
 * eigenpairs, except that the eigenvalues come from the root-free QR
 * iteration (dsterf) on each unreduced block of the tridiagonal form: for n
 * of a few dozen that is several times cheaper than bisection for even a
 * few of them, and dsyevr()'s bisection was most of a module's time. Then
 * inverse iteration (dstein) and the back-transformation (dormtr). FALSE
 * when LAPACK reports a failure. */
gboolean
lp_lora_top_eigenpairs (double *h,
                        guint   n,
                        guint   top,
                        double *w,
                        double *z)
{
  g_autofree double *d = g_new (double, n);
  g_autofree double *e = g_new0 (double, n);
  g_autofree double *tau = g_new0 (double, n);
  g_autofree double *dd = g_new (double, n);
  g_autofree double *ee = g_new0 (double, n);
  g_autofree lapack_int *split = g_new (lapack_int, n);
  g_autofree BlockEigenvalue *all = g_new (BlockEigenvalue, n);
  g_autofree lapack_int *block = g_new (lapack_int, top);
  g_autofree lapack_int *fail = g_new (lapack_int, top);
  /* LAPACKE_dstein checks n values of w for NaN, not just the m it uses */
  g_autofree double *chosen = g_new0 (double, n);
  const double ulp = DBL_EPSILON, safe_min = DBL_MIN;
  guint n_split = 0;

  if (LAPACKE_dsytrd (LAPACK_COL_MAJOR, 'U', n, h, n, d, e, tau) != 0)
    return FALSE;

  /* unreduced blocks, split as dstebz() splits them */
  for (guint j = 1; j < n; j++)
    if (fabs (d[j] * d[j - 1]) * ulp * ulp + safe_min > e[j - 1] * e[j - 1])
      split[n_split++] = j;   /* a block ends at j (1-based: rows … j) */
  split[n_split++] = n;

  for (guint b = 0, start = 0; b < n_split; start = split[b++])
    {
      guint len = split[b] - start;
      memcpy (dd, d + start, sizeof (double) * len);
      if (len > 1)
        memcpy (ee, e + start, sizeof (double) * (len - 1));
      if (LAPACKE_dsterf (len, dd, ee) != 0)
        return FALSE;
      for (guint i = 0; i < len; i++)
        all[start + i] = (BlockEigenvalue) { dd[i], b + 1 };
    }

  /* the largest @top, grouped by block and ascending within one, as
   * dstein() wants them */
  g_autofree double *values = g_new (double, n);
  for (guint i = 0; i < n; i++)
    values[i] = all[i].value;
  qsort (values, n, sizeof (double), double_compare);
  double threshold = values[n - top];
  g_autofree BlockEigenvalue *picked = g_new (BlockEigenvalue, top);
  guint m = 0;
  for (guint i = 0; i < n && m < top; i++)
    if (all[i].value > threshold)
      picked[m++] = all[i];
  for (guint i = 0; i < n && m < top; i++)
    if (all[i].value == threshold)
      picked[m++] = all[i];
  qsort (picked, top, sizeof (BlockEigenvalue), block_eigenvalue_compare);
  for (guint i = 0; i < top; i++)
    {
      chosen[i] = picked[i].value;
      block[i] = picked[i].block;
    }

  if (LAPACKE_dstein (LAPACK_COL_MAJOR, n, d, e, top, chosen, block, split, z, n, fail) != 0 ||
      LAPACKE_dormtr (LAPACK_COL_MAJOR, 'L', 'U', 'N', n, top, h, n, tau, z, n) != 0)
    return FALSE;

  /* ascending overall: a selection sort of the columns (top is small) */
  for (guint i = 0; i < top; i++)
    {
      guint best = i;
      for (guint j = i + 1; j < top; j++)
        if (chosen[j] < chosen[best])
          best = j;
      if (best != i)
        {
          double tmp = chosen[i];
          chosen[i] = chosen[best];
          chosen[best] = tmp;
          for (guint t = 0; t < n; t++)
            {
              tmp = z[(gsize) i * n + t];
              z[(gsize) i * n + t] = z[(gsize) best * n + t];
              z[(gsize) best * n + t] = tmp;
            }
        }
      w[i] = chosen[i];
    }
  return TRUE;
}

/* Largest first, for the f32 route's candidates of all blocks. */
static int
block_eigenvalue_descending (gconstpointer a,
                             gconstpointer b)
{
  const BlockEigenvalue *x = a, *y = b;
  return x->value > y->value ? -1 : x->value < y->value;
}

gboolean
lp_lora_top_eigenpairs_f32 (float *h,
                            guint  n,
                            guint  top,
                            float *w,
                            float *z)
{
  g_autofree float *d = g_new (float, n);
  g_autofree float *e = g_new0 (float, n);
  g_autofree float *tau = g_new0 (float, n);
  g_autofree double *dd = g_new (double, n);
  g_autofree double *ee = g_new0 (double, n);
  g_autofree double *values = g_new (double, MIN (top, n));
  g_autofree lapack_int *split = g_new (lapack_int, n);
  g_autofree BlockEigenvalue *found = g_new (BlockEigenvalue, n);
  g_autofree lapack_int *block = g_new (lapack_int, top);
  g_autofree lapack_int *fail = g_new (lapack_int, top);
  /* n, not top: LAPACKE_sstein() checks n values of w for NaN */
  g_autofree float *chosen = g_new0 (float, n);
  const double ulp = FLT_EPSILON, safe_min = FLT_MIN;
  guint n_split = 0, n_found = 0;

  g_return_val_if_fail (top >= 1 && top <= n, FALSE);
  if (LAPACKE_ssytrd (LAPACK_COL_MAJOR, 'U', n, h, n, d, e, tau) != 0)
    return FALSE;

  /* unreduced blocks, split as sstebz() splits them */
  for (guint j = 0; j < n; j++)
    {
      dd[j] = d[j];
      ee[j] = e[j];
    }
  for (guint j = 1; j < n; j++)
    if (fabs (dd[j] * dd[j - 1]) * ulp * ulp + safe_min > ee[j - 1] * ee[j - 1])
      split[n_split++] = j;
  split[n_split++] = n;

  /* the top (up to @top) of each block: no other can be among the top overall */
  for (guint b = 0, start = 0; b < n_split; start = split[b++])
    {
      guint len = split[b] - start, m = MIN (top, len);
      lp_lora_tridiagonal_eigenvalues (dd + start, ee + start, len, len - m, m, values);
      for (guint i = 0; i < m; i++)
        found[n_found++] = (BlockEigenvalue) { values[i], b + 1 };
    }
  qsort (found, n_found, sizeof (BlockEigenvalue), block_eigenvalue_descending);
  /* grouped by block and ascending within one, as sstein() wants them */
  qsort (found, top, sizeof (BlockEigenvalue), block_eigenvalue_compare);
  for (guint i = 0; i < top; i++)
    {
      chosen[i] = found[i].value;
      block[i] = found[i].block;
    }

  if (LAPACKE_sstein (LAPACK_COL_MAJOR, n, d, e, top, chosen, block, split, z, n, fail) != 0 ||
      LAPACKE_sormtr (LAPACK_COL_MAJOR, 'L', 'U', 'N', n, top, h, n, tau, z, n) != 0)
    return FALSE;

  /* ascending overall: a selection sort of the columns (top is small) */
  for (guint i = 0; i < top; i++)
    {
      guint best = i;
      for (guint j = i + 1; j < top; j++)
        if (chosen[j] < chosen[best])
          best = j;
      if (best != i)
        {
          float tmp = chosen[i];
          chosen[i] = chosen[best];
          chosen[best] = tmp;
          for (guint t = 0; t < n; t++)
            {
              tmp = z[(gsize) i * n + t];
              z[(gsize) i * n + t] = z[(gsize) best * n + t];
              z[(gsize) best * n + t] = tmp;
            }
        }
      w[i] = chosen[i];
    }
  return TRUE;
}

/* The Cholesky route, when both Gram matrices are well conditioned: with
 * G_A = U_Aᵀ U_A and G_B = U_Bᵀ U_B, A = U_Aᵀ Q_A and B = Q_B U_B for
 * orthonormal Q, so B A = Q_B C Q_A with the r × r core C = U_B U_Aᵀ. Two
 * Cholesky factorizations cost a thirtieth of two eigendecompositions; for
 * the @top largest singular values alone, the eigenvectors of Cᵀ C are
 * asked for only those. Returns FALSE, with @s untouched, to leave the
 * module to the eigen route. */
static gboolean
spectrum_by_cholesky (LpLoraSpectrum *s,
                      const double   *ga,
                      const double   *gb,
                      guint           r,
                      gboolean        f32,
                      guint           top,
                      gboolean        want_maps,
                      GError        **error)
{
  gsize rr = (gsize) r * r;
  g_autofree double *ua = g_memdup2 (ga, sizeof (double) * rr);
  g_autofree double *ub = g_memdup2 (gb, sizeof (double) * rr);

  if (!cholesky (ua, r, f32) || !cholesky (ub, r, f32))
    return FALSE;

  g_autofree double *c = g_new (double, rr);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasTrans, r, r, r, 1.0, ub, r, ua, r, 0.0, c, r);

  /* u (r × r): columns are the left singular vectors of C; vt: rows are
   * the right ones; only the first `n_vec` are filled. */
  g_autofree double *u = g_new0 (double, rr);
  g_autofree double *vt = g_new0 (double, rr);
  guint n_vec;
  double total = 0;
  for (gsize i = 0; i < rr; i++)
    total += c[i] * c[i];

  if (top > 0 && top < r)
    {
      /* the top eigenpairs of H = Cᵀ C (column-major is its transpose,
       * and H is symmetric) */
      g_autofree double *h = g_new (double, rr);
      g_autofree double *w = g_new (double, r);
      g_autofree double *z = g_new (double, (gsize) r * top);
      g_autofree lapack_int *support = g_new (lapack_int, 2 * top);
      lapack_int found = 0;

      cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, r, r, r, 1.0, c, r, c, r, 0.0, h, r);
      g_autofree double *h_copy = g_memdup2 (h, sizeof (double) * rr);
      lapack_int info = 0;
      if (lp_lora_top_eigenpairs (h_copy, r, top, w, z))
        found = top;
      else
        info = LAPACKE_dsyevr (LAPACK_COL_MAJOR, 'V', 'I', 'U', r, h, r, 0, 0, r - top + 1, r,
                               0, &found, w, z, r, support);
      if (info != 0 || found != (lapack_int) top)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                       "eigendecomposition of the %u × %u core failed (LAPACK info %d)", r, r, (int) info);
          return FALSE;
        }
      /* ascending: the largest is the last; σ² at rounding level (of the
       * largest) is a zero singular value */
      double w_max = MAX (w[top - 1], 0);
      for (guint i = 0; i < top; i++)
        {
          guint col = top - 1 - i;
          double sigma2 = w[col];
          if (!(sigma2 > r * 1e-15 * w_max))
            break;
          s->sigma[i] = sqrt (sigma2);
          for (guint t = 0; t < r; t++)
            vt[i * r + t] = z[(gsize) col * r + t];
        }
      n_vec = 0;
      while (n_vec < top && s->sigma[n_vec] > 0)
        n_vec++;
      /* u_i = C v_i / σ_i */
      for (guint i = 0; i < n_vec; i++)
        for (guint t = 0; t < r; t++)
          {
            double acc = 0;
            for (guint j = 0; j < r; j++)
              acc += c[t * r + j] * vt[i * r + j];
            u[t * r + i] = acc / s->sigma[i];
          }
    }
  else
    {
      g_autofree double *sv = g_new (double, r);
      lapack_int info = LAPACKE_dgesdd (LAPACK_ROW_MAJOR, 'A', r, r, c, r, sv, u, r, vt, r);
      if (info != 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                       "SVD of the %u × %u core did not converge (LAPACK info %d)", r, r, (int) info);
          return FALSE;
        }
      n_vec = 0;
      for (guint i = 0; i < r; i++)
        {
          s->sigma[i] = sv[i];
          if (sv[i] > 0)
            n_vec = i + 1;
        }
    }

  s->n = n_vec;
  s->total = total;
  if (want_maps)
    {
      /* map_b = U_B⁻¹ u (columns), map_a = vt U_A⁻ᵀ (rows); unused columns
       * and rows stay zero */
      memcpy (s->map_b, u, sizeof (double) * rr);
      memcpy (s->map_a, vt, sizeof (double) * rr);
      cblas_dtrsm (CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, r, r, 1.0, ub, r, s->map_b, r);
      cblas_dtrsm (CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit, r, r, 1.0, ua, r, s->map_a, r);
      for (guint t = 0; t < r; t++)
        for (guint i = n_vec; i < r; i++)
          {
            s->map_b[t * r + i] = 0;
            s->map_a[i * r + t] = 0;
          }
    }
  return TRUE;
}

/* Given t [r, l], returns t V Λ^-½ [r, l'] over the eigenpairs of tᵀ m t
 * above a rounding floor, so that (B t')ᵀ (B t') = I when m = Bᵀ B: an
 * orthonormalization in r-space that drops dependent columns instead of
 * failing on them. */
static double *
orthonormalize_metric (const double *t,
                       guint         r,
                       guint         l,
                       const double *m,
                       guint        *l_out,
                       double      **m_out,
                       GError      **error)
{
  g_autofree double *mt = g_new (double, (gsize) r * l);
  g_autofree double *h = g_new (double, (gsize) l * l);
  g_autofree double *w = g_new (double, l);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, l, r, 1.0, m, r, t, l, 0.0, mt, l);
  cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, l, l, r, 1.0, t, l, mt, l, 0.0, h, l);

  guint kept;
  if (!eigen (h, l, w, FALSE, &kept, error))
    return NULL;

  /* the kept eigenvectors are the last columns; take them largest first */
  double *out = g_new0 (double, (gsize) r * MAX (kept, 1));
  g_autofree double *v = g_new0 (double, (gsize) l * MAX (kept, 1));
  for (guint j = 0; j < kept; j++)
    {
      guint col = l - 1 - j;
      double inv = 1.0 / sqrt (w[col]);
      for (guint i = 0; i < l; i++)
        v[i * kept + j] = h[i * l + col] * inv;
    }
  if (kept > 0)
    cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, l, 1.0, t, l, v, kept, 0.0, out, kept);
  if (m_out)
    {
      /* m t' from m t, for free */
      *m_out = g_new0 (double, (gsize) r * MAX (kept, 1));
      if (kept > 0)
        cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, l, 1.0, mt, l, v, kept, 0.0, *m_out, kept);
    }
  *l_out = kept;
  return out;
}

/* The exact top singular triplets by block iteration in r-space, for large
 * r and few of them: every dense r × r factorization (Cholesky, the core's
 * tridiagonal form) costs r³ flops, which at r = 256 is more than the Gram
 * matrices' share of a module. With K = B A and x = Aᵀ y, KᵀK x =
 * Aᵀ (G_B G_A y), so subspace iteration on KᵀK runs on r × l blocks Y with
 * the inner product ⟨y, y'⟩ = yᵀ G_A y' and two r × r × l products a step
 * (4 r² l flops). Each step orthonormalizes Y in that inner product (dropping
 * directions at rounding level, so rank-deficient factors need no special
 * route), takes the Rayleigh–Ritz pairs (θ, Q c) of T = Qᵀ G_A G_B G_A Q,
 * and stops when every wanted pair's residual ‖KᵀK x − θ x‖ (= dᵀ G_A d for
 * d = G_B G_A q − θ q) is below @tol θ₁: each θ is then that close to an
 * eigenvalue of KᵀK (and, for a gap g around it, within ‖ρ‖²/g). @ga and
 * @gb are whole (both triangles). *@converged is FALSE, with @s untouched,
 * when it has not converged within ITERATION_STEPS: the caller then takes
 * a dense route. FALSE when LAPACK fails. */
#define ITERATION_STEPS 40
/* Used from this rank on, for top ≤ r / ITERATION_MAX_SHARE; below, the
 * dense routes cost less. */
#define ITERATION_MIN_RANK 64
#define ITERATION_MAX_SHARE 4
/* Residuals ‖ρ‖ ≤ this · θ₁: σ good to ~1e-10 σ₁ even without a gap. */
#define ITERATION_TOLERANCE 1e-10

static gboolean
spectrum_by_iteration (LpLoraSpectrum *s,
                       const double   *ga,
                       const double   *gb,
                       guint           r,
                       guint           top,
                       double          tol,
                       gboolean       *converged_out,
                       GError        **error)
{
  guint l = MIN (r, 2 * top + 8);
  gsize rl = (gsize) r * l;
  g_autofree double *y = g_new (double, rl);
  g_autofree double *w = g_new (double, rl);
  g_autofree double *qc = g_new (double, rl);
  g_autofree double *wc = g_new (double, rl);
  g_autofree double *zc = g_new (double, rl);
  g_autofree double *h = g_new (double, (gsize) l * l);
  g_autofree double *v = g_new (double, (gsize) l * l);
  g_autofree double *lambda = g_new (double, l);
  g_autofree double *d = g_new (double, (gsize) r * top);
  g_autofree double *gd = g_new (double, (gsize) r * top);
  LpLoraRng rng;

  /* the start depends on r alone: the same module gives the same bytes */
  double last_excess = G_MAXDOUBLE;

  *converged_out = FALSE;
  lp_lora_rng_init (&rng, r, "exact top singular vectors");
  for (gsize i = 0; i < rl; i++)
    y[i] = lp_lora_rng_normal (&rng);

  for (guint step = 0; step < ITERATION_STEPS; step++)
    {
      guint kept, m;
      g_autofree double *zq = NULL;

      /* Q (G_A-orthonormal, largest directions first) and G_A Q */
      g_autofree double *q = orthonormalize_metric (y, r, l, ga, &kept, &zq, error);
      if (q == NULL)
        return FALSE;
      if (kept == 0)
        {
          s->n = 0;   /* A = 0: a zero update */
          *converged_out = TRUE;
          return TRUE;
        }

      /* W = G_B G_A Q; T = (G_A Q)ᵀ W and its eigenpairs (ascending) */
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, r, 1.0, gb, r, zq, kept, 0.0, w, kept);
      cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, kept, kept, r, 1.0, zq, kept, w, kept, 0.0, h, kept);
      guint nonzero;
      if (!eigen (h, kept, lambda, FALSE, &nonzero, error))
        return FALSE;
      /* the Ritz vectors largest first: Q C, W C = G_B G_A Q C, G_A Q C */
      for (guint i = 0; i < kept; i++)
        for (guint j = 0; j < kept; j++)
          v[i * kept + j] = h[i * kept + kept - 1 - j];
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, kept, 1.0, q, kept, v, kept, 0.0, qc, kept);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, kept, 1.0, w, kept, v, kept, 0.0, wc, kept);

      double theta_max = MAX (lambda[kept - 1], 0);
      m = MIN (top, kept);
      for (guint t = 0; t < r; t++)
        for (guint j = 0; j < m; j++)
          d[t * m + j] = wc[t * kept + j] - lambda[kept - 1 - j] * qc[t * kept + j];
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, m, r, 1.0, ga, r, d, m, 0.0, gd, m);
      /* the largest residual, in units of the tolerance */
      double excess = 0;
      for (guint j = 0; j < m; j++)
        {
          double rho2 = 0;
          for (guint t = 0; t < r; t++)
            rho2 += d[t * m + j] * gd[t * m + j];
          excess = MAX (excess, sqrt (MAX (rho2, 0)) / MAX (tol * theta_max, DBL_MIN));
        }
      gboolean converged = excess <= 1;
      /* A spectrum too flat past the block converges slowly: where the
       * last step's rate would not get there in the steps left, stop now
       * and leave the module to a dense route. */
      if (!converged && step >= 3 &&
          (excess >= last_excess ||
           log (excess) / -log (excess / last_excess) > ITERATION_STEPS - 1 - step))
        return TRUE;
      last_excess = excess;

      if (converged)
        {
          cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, kept, kept, 1.0, zq, kept, v, kept, 0.0, zc, kept);
          s->n = 0;
          for (guint j = 0; j < m; j++)
            {
              double theta = lambda[kept - 1 - j];
              /* σ² at rounding level (of the largest) is a zero singular value */
              if (!(theta > r * 1e-15 * theta_max))
                break;
              s->sigma[j] = sqrt (theta);
              s->n = j + 1;
            }
          if (s->map_a)
            {
              /* v_jᵀ = (Q c_j)ᵀ A is a unit vector; u_j = K v_j / σ_j = B (G_A Q c_j) / σ_j;
               * the other columns and rows stay as allocated, zero */
              for (guint j = 0; j < s->n; j++)
                for (guint t = 0; t < r; t++)
                  {
                    s->map_a[j * r + t] = qc[t * kept + j];
                    s->map_b[t * r + j] = zc[t * kept + j] / s->sigma[j];
                  }
            }
          *converged_out = TRUE;
          return TRUE;
        }

      /* the next block: W C, column j scaled by 1/θ_j (≈ Q c_j plus the
       * residual, so the block stays well conditioned), or Q c_j where θ_j
       * is at rounding level; columns past a rank-deficient A's rank stay 0
       * and are dropped again */
      memset (y, 0, sizeof (double) * rl);
      for (guint t = 0; t < r; t++)
        for (guint j = 0; j < kept; j++)
          {
            double theta = lambda[kept - 1 - j];
            y[t * l + j] = theta > r * 1e-15 * theta_max ? wc[t * kept + j] / theta : qc[t * kept + j];
          }
    }
  return FALSE;
}

/* Both Gram matrices of the factors again, read as stored and summed in
 * f64: for modules whose f32 sums are not accurate enough. */
static void
gram_f64 (const LpLoraFactors *f,
          double              *ga,
          double              *gb)
{
  LpLoraFactors wide = *f;

  wide.f32 = FALSE;
  if (!wide.stored)
    {
      wide.stored = TRUE;
      wide.a_dtype = wide.b_dtype = LP_DTYPE_F32;
    }
  gram (&wide, FALSE, ga);
  gram (&wide, TRUE, gb);
}

/* Whether Gram matrices summed in f32 give the @top singular values of
 * @s to 1e-3 of σ²: their sums are good to about F32_GRAM_ERROR of each
 * entry's scale, which moves an eigenvalue of G_B G_A by up to about
 * F32_GRAM_ERROR · tr (G_A) · tr (G_B). For factors that share the
 * spectrum between them that is far below σ_k²; a direction that one
 * factor shrinks and the other blows up is lost in the rounding, and the
 * module is summed again in f64. */
#define F32_GRAM_ERROR 1e-6

static gboolean
f32_sums_suffice (const double         *ga,
                  const double         *gb,
                  guint                 r,
                  const LpLoraSpectrum *s,
                  guint                 top)
{
  double trace_a = 0, trace_b = 0;

  for (guint i = 0; i < r; i++)
    {
      trace_a += ga[i * r + i];
      trace_b += gb[i * r + i];
    }
  if (s->n == 0)
    return TRUE;   /* a zero update */
  guint last = MIN (s->n, top) - 1;
  return F32_GRAM_ERROR * trace_a * trace_b <= 1e-3 * s->sigma[last] * s->sigma[last];
}

LpLoraSpectrum *
lp_lora_spectrum_compute (const LpLoraFactors *f,
                          guint                top,
                          gboolean             want_maps,
                          GError             **error)
{
  guint r = f->r;
  g_autoptr (LpLoraSpectrum) s = g_new0 (LpLoraSpectrum, 1);
  s->r = r;
  s->sigma = g_new0 (double, r);
  if (want_maps)
    {
      s->map_b = g_new0 (double, (gsize) r * r);
      s->map_a = g_new0 (double, (gsize) r * r);
    }
  if (r == 0)
    return g_steal_pointer (&s);

  g_autofree double *ga = g_new (double, (gsize) r * r);
  g_autofree double *gb = g_new (double, (gsize) r * r);
  g_autofree double *wa = g_new (double, r);
  g_autofree double *wb = g_new (double, r);

  gram (f, FALSE, ga);
  gram (f, TRUE, gb);

  /* A NaN or infinity anywhere in a factor reaches its Gram diagonal (a sum
   * of squares), so checking r numbers covers the whole factor. */
  for (guint i = 0; i < r; i++)
    if (!isfinite (ga[i * r + i]) || !isfinite (gb[i * r + i]))
      {
        g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                     "NaN or infinity in the %s factor",
                     isfinite (ga[i * r + i]) ? "up" : "down");
        return NULL;
      }

  /* ‖B A‖² = trace (G_A G_B), over the upper triangles; the eigen route
   * below may drop directions at rounding level, but the total is whole. */
  double total = 0;
  for (guint i = 0; i < r; i++)
    for (guint j = i; j < r; j++)
      total += (j == i ? 1 : 2) * ga[i * r + j] * gb[i * r + j];
  total = MAX (total, 0);

  gboolean converged = FALSE;
  GError *local_error = NULL;
  gboolean f32 = f->f32;
  s->total = total;
  /* The iteration is for spectra that fall off past the block; LoHa's
   * Khatri–Rao factors have a flat one (a Hadamard product of two rank-r
   * updates spreads its weight over all r² directions), on which it stops
   * short after several steps and the module paid twice. */
  if (top > 0 && r >= ITERATION_MIN_RANK && ITERATION_MAX_SHARE * top <= r && f->khatri_rao == NULL)
    {
      symmetrize (ga, r);
      symmetrize (gb, r);
      if (!spectrum_by_iteration (s, ga, gb, r, top, ITERATION_TOLERANCE, &converged, error))
        return NULL;
      /* f32 sums too coarse for the iteration: the Cholesky route below
       * judges f32 sums itself and re-sums in f64 only when it must (for
       * LoHa's Khatri-Rao factors, whose spectrum is flat, re-summing here
       * made lora-svd 4x slower) */
      if (converged && f32 && f->f64_fallback && !f32_sums_suffice (ga, gb, r, s, top))
        converged = FALSE;
      if (converged)
        return g_steal_pointer (&s);
    }
  if (spectrum_by_cholesky (s, ga, gb, r, f32, top, want_maps, &local_error))
    return g_steal_pointer (&s);

  if (local_error == NULL && f32 && f->f64_fallback)
    {
      f32 = FALSE;
      gram_f64 (f, ga, gb);
      if (spectrum_by_cholesky (s, ga, gb, r, f32, top, want_maps, &local_error))
        return g_steal_pointer (&s);
    }
  if (local_error)
    {
      g_propagate_error (error, local_error);
      return NULL;
    }

  guint pa, pb;
  if (!eigen (ga, r, wa, f32, &pa, error) || !eigen (gb, r, wb, f32, &pb, error))
    return NULL;
  if (pa == 0 || pb == 0)
    return g_steal_pointer (&s);   /* a zero factor: zero update, zero spectrum */

  /* Kept eigenpairs are the last pa (pb) columns. With A = V_A Λ_A^½ Q_Aᵀ and
   * B = Q_B Λ_B^½ V_Bᵀ the update is Q_B C Q_Aᵀ, C = Λ_B^½ V_Bᵀ V_A Λ_A^½.
   * x* hold V Λ^½ and y* hold V Λ^-½, both r × p, row-major. */
  guint oa = r - pa, ob = r - pb;
  g_autofree double *xa = g_new (double, (gsize) r * pa);
  g_autofree double *ya = g_new (double, (gsize) r * pa);
  g_autofree double *xb = g_new (double, (gsize) r * pb);
  g_autofree double *yb = g_new (double, (gsize) r * pb);
  for (guint j = 0; j < pa; j++)
    {
      double root = sqrt (wa[oa + j]);
      for (guint t = 0; t < r; t++)
        {
          xa[t * pa + j] = ga[t * r + oa + j] * root;
          ya[t * pa + j] = ga[t * r + oa + j] / root;
        }
    }
  for (guint j = 0; j < pb; j++)
    {
      double root = sqrt (wb[ob + j]);
      for (guint t = 0; t < r; t++)
        {
          xb[t * pb + j] = gb[t * r + ob + j] * root;
          yb[t * pb + j] = gb[t * r + ob + j] / root;
        }
    }

  g_autofree double *core = g_new (double, (gsize) pb * pa);
  cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, pb, pa, r, 1.0, xb, pb, xa, pa, 0.0, core, pa);

  /* LAPACK is column-major: the row-major core is its transpose there, and
   * the SVD of Cᵀ = W S Uᵀ hands back U and Wᵀ in row-major order for free. */
  guint n = MIN (pa, pb);
  g_autofree double *u = g_new (double, (gsize) pb * pb);
  g_autofree double *vt = g_new (double, (gsize) pa * pa);
  g_autofree double *sv = g_new (double, n);
  lapack_int info = LAPACKE_dgesdd (LAPACK_COL_MAJOR, 'A', pa, pb, core, pa, sv, vt, pa, u, pb);
  if (info != 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "SVD of the %u × %u core did not converge (LAPACK info %d)",
                   pb, pa, (int) info);
      return NULL;
    }

  s->n = 0;
  s->total = total;
  if (top > 0)
    n = MIN (n, top);   /* as the Cholesky route would give */
  for (guint i = 0; i < n; i++)
    {
      s->sigma[i] = sv[i];
      if (sv[i] > 0)
        s->n = i + 1;
    }

  if (want_maps)
    {
      /* map_b[:, :n] = V_B Λ_B^-½ U[:, :n];  map_a[:n, :] = Wᵀ[:n, :] (V_A Λ_A^-½)ᵀ */
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, n, pb, 1.0, yb, pb, u, pb, 0.0, s->map_b, r);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasTrans, n, r, pa, 1.0, vt, pa, ya, pa, 0.0, s->map_a, r);
    }

  return g_steal_pointer (&s);
}

/* ---- small maps applied to a factor, in f32 ----------------------------- */

/* Rows of an up factor [n, r] that lp_lora_map_cols_bf16() may read in
 * place: its reads past a row's end stay inside the factor. */
static guint64
rows_readable_in_place (guint   r,
                        guint64 n)
{
  guint64 stride = LP_LORA_MAP_COLS_STRIDE (r), total = n * r;
  return total >= stride ? (total - stride) / r + 1 : 0;
}

/* Y [k, w] (row stride @ldy) = M X for columns j0 … j0 + w of the down
 * factor [r, n] stored as @src at @data; bf16 and f32 are read in place,
 * other dtypes widened into @buf (r·w floats) first. */
static void
apply_rows (const float         *m,
            guint                k,
            const LpLoraFactors *f,
            guint64              j0,
            gsize                w,
            float               *buf,
            float               *y,
            gsize                ldy)
{
  guint r = f->r;
  guint64 n = f->in;
  LpDtype src = stored_dtype (f, FALSE);

  if (src == LP_DTYPE_BF16 && f->khatri_rao == NULL)
    lp_lora_map_rows_bf16 (m, k, r, (const guint16 *) f->a + j0, n, w, y, ldy);
  else if (src == LP_DTYPE_F32 && f->khatri_rao == NULL)
    lp_lora_map_rows_f32 (m, k, r, (const float *) f->a + j0, n, w, y, ldy);
  else
    {
      load_down_cols (f, j0, w, FALSE, buf, w);
      lp_lora_map_rows_f32 (m, k, r, buf, w, w, y, ldy);
    }
}

/* Y [h, k] = X M for rows i0 … i0 + h of the up factor [n, r] stored as
 * @src at @data, with @mt from map_cols_matrix(); bf16 is read in place
 * where the kernel may, the rest widened into @buf (r·h floats and the
 * kernel's slack). */
static void
apply_cols (const float         *mt,
            guint                k,
            const LpLoraFactors *f,
            guint64              i0,
            gsize                h,
            float               *buf,
            float               *y)
{
  guint r = f->r;

  if (stored_dtype (f, TRUE) == LP_DTYPE_BF16 && f->khatri_rao == NULL &&
      i0 + h <= rows_readable_in_place (r, f->out))
    {
      lp_lora_map_cols_bf16 (mt, k, r, (const guint16 *) f->b + i0 * r, h, y);
      return;
    }
  load_up_rows (f, i0, h, FALSE, buf);
  memset (buf + h * r, 0, sizeof (float) * LP_LORA_KERNEL_SLACK);
  lp_lora_map_cols_f32 (mt, k, r, buf, h, y);
}

/* Mᵀ for lp_lora_map_cols_f32(), times @alpha, from M [r, k] (or, with
 * @transposed, from Mᵀ [k, r] itself). */
static float *
map_cols_matrix (const float *m,
                 guint        r,
                 guint        k,
                 gboolean     transposed,
                 float        alpha)
{
  gsize stride = LP_LORA_MAP_COLS_STRIDE (r);
  float *mt = g_new0 (float, stride * ((k + 3) / 4 * 4));

  for (guint i = 0; i < k; i++)
    for (guint s = 0; s < r; s++)
      mt[i * stride + s] = alpha * (transposed ? m[i * r + s] : m[s * k + i]);
  return mt;
}

/* The thread's scratch for the apply_*() calls on blocks of @bl columns
 * (or rows): the widened block with the kernel's slack, and in *@result
 * room for the block's k × bl results. */
static float *
apply_scratch (guint   r,
               guint   k,
               gsize   bl,
               float **result)
{
  gsize block = ALIGN_UP (r * bl + LP_LORA_KERNEL_SLACK);
  float *buf = scratch_get (sizeof (float) * (block + k * bl));

  *result = buf + block;
  return buf;
}

/* A' = M A in f32 a block of columns at a time, written in @out_dtype. */
static gsize
map_down_f32 (const LpLoraFactors *f,
              const float         *m,
              guint                k,
              LpDtype              out_dtype,
              gpointer             result)
{
  guint r = f->r;
  guint64 n = f->in;
  gsize osize = dtype_size (out_dtype);
  gsize bl = block_len (r);
  float *obuf;
  float *buf = apply_scratch (r, k, bl, &obuf);
  gsize overflow = 0;

  for (guint64 j0 = 0; j0 < n; j0 += bl)
    {
      gsize w = MIN (bl, n - j0);
      gboolean direct = out_dtype == LP_DTYPE_F32;

      apply_rows (m, k, f, j0, w, buf, direct ? (float *) result + j0 : obuf, direct ? n : w);
      if (!direct)
        for (guint i = 0; i < k; i++)
          overflow += lp_dtype_from_f32 (out_dtype, obuf + i * w, (guchar *) result + (i * n + j0) * osize, w);
    }
  return overflow;
}

/* A' = M A in f64, for M [k, r]: in place when A is f64, else widened a
 * block of columns at a time; written in @out_dtype. */
static gsize
map_down_f64 (const LpLoraFactors *f,
              const double        *m,
              guint                k,
              LpDtype              out_dtype,
              gpointer             result)
{
  guint r = f->r;
  guint64 n = f->in;
  gboolean in_place = stored_dtype (f, FALSE) == LP_DTYPE_F64 && f->khatri_rao == NULL;
  gsize osize = dtype_size (out_dtype);
  gboolean direct = in_place && out_dtype == LP_DTYPE_F64;
  gsize bl = direct ? n : block_len (r);
  double *buf = direct ? NULL : scratch_get (sizeof (double) * (r + k) * bl);
  double *obuf = direct ? NULL : buf + r * bl;
  gsize overflow = 0;

  for (guint64 j0 = 0; j0 < n; j0 += bl)
    {
      gsize w = MIN (bl, n - j0);
      const double *x = (const double *) f->a + j0;
      gsize ld = n;

      if (!in_place)
        {
          load_down_cols (f, j0, w, TRUE, buf, w);
          x = buf;
          ld = w;
        }
      if (out_dtype == LP_DTYPE_F64)
        cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, k, w, r,
                     1.0, m, r, x, ld, 0.0, (double *) result + j0, n);
      else
        {
          cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, k, w, r,
                       1.0, m, r, x, ld, 0.0, obuf, w);
          for (guint i = 0; i < k; i++)
            overflow += lp_dtype_from_f64 (out_dtype, obuf + i * w, (guchar *) result + (i * n + j0) * osize, w);
        }
    }
  return overflow;
}

/* B' = B M for LoHa's Khatri–Rao B, by lp_lora_map_khatri_rao_f32() on
 * blocks of the parts' rows. */
static gsize
map_up_khatri_rao (const LpLoraFactors *f,
                   const float         *m,
                   guint                k,
                   LpDtype              out_dtype,
                   gpointer             result)
{
  const LpLoraKhatriRao *kr = f->khatri_rao;
  guint r = f->r;
  guint64 n = f->out;
  gsize kp = (k + 15) / 16 * 16, osize = dtype_size (out_dtype);
  gsize bl = GRAM_KHATRI_RAO_LEN;
  g_autofree float *mp = g_new0 (float, (gsize) r * kp);
  gsize overflow = 0;

  for (guint c = 0; c < r; c++)
    memcpy (mp + c * kp, m + (gsize) c * k, sizeof (float) * k);
  /* bl is a multiple of 8: the kernel reads whole groups of 8 rows */
  float *buf = scratch_get (sizeof (float) * (bl * 32 + bl * k));
  float *x1 = buf, *x2 = buf + bl * 16, *y = buf + bl * 32;
  for (guint64 i0 = 0; i0 < n; i0 += bl)
    {
      gsize h = MIN (bl, n - i0);
      float *dst = out_dtype == LP_DTYPE_F32 ? (float *) result + i0 * k : y;

      khatri_rao_steps (kr, TRUE, n, i0, h, x1, x2);
      lp_lora_map_khatri_rao_f32 (x1, x2, kr->r1, kr->r2, mp, k, h, dst);
      if (out_dtype != LP_DTYPE_F32)
        overflow += lp_dtype_from_f32 (out_dtype, y, (guchar *) result + i0 * k * osize, h * k);
    }
  return overflow;
}

/* B' = B M in f32 a block of rows at a time, written in @out_dtype. */
static gsize
map_up_f32 (const LpLoraFactors *f,
            const float         *m,
            guint                k,
            LpDtype              out_dtype,
            gpointer             result)
{
  guint r = f->r;
  guint64 n = f->out;
  gsize osize = dtype_size (out_dtype);
  gsize bl = block_len (r);

  if (f->khatri_rao && f->khatri_rao->r1 <= 16 && f->khatri_rao->r2 <= 16)
    return map_up_khatri_rao (f, m, k, out_dtype, result);

  g_autofree float *mt = map_cols_matrix (m, r, k, FALSE, 1.f);
  float *obuf;
  float *buf = apply_scratch (r, k, bl, &obuf);
  gsize overflow = 0;

  for (guint64 i0 = 0; i0 < n; i0 += bl)
    {
      gsize h = MIN (bl, n - i0);
      float *y = out_dtype == LP_DTYPE_F32 ? (float *) result + i0 * k : obuf;

      apply_cols (mt, k, f, i0, h, buf, y);
      if (out_dtype != LP_DTYPE_F32)
        overflow += lp_dtype_from_f32 (out_dtype, obuf, (guchar *) result + i0 * k * osize, h * k);
    }
  return overflow;
}

/* B' = B M in f64, for M [r, k]: in place when B is f64, else widened a
 * block of rows at a time; written in @out_dtype. */
static gsize
map_up_f64 (const LpLoraFactors *f,
            const double        *m,
            guint                k,
            LpDtype              out_dtype,
            gpointer             result)
{
  guint r = f->r;
  guint64 n = f->out;
  gboolean in_place = stored_dtype (f, TRUE) == LP_DTYPE_F64 && f->khatri_rao == NULL;
  gsize osize = dtype_size (out_dtype);
  gboolean direct = in_place && out_dtype == LP_DTYPE_F64;
  gsize bl = direct ? n : block_len (r);
  double *buf = direct ? NULL : scratch_get (sizeof (double) * (r + k) * bl);
  double *obuf = direct ? NULL : buf + r * bl;
  gsize overflow = 0;

  for (guint64 i0 = 0; i0 < n; i0 += bl)
    {
      gsize h = MIN (bl, n - i0);
      const double *x = (const double *) f->b + i0 * r;
      double *y = out_dtype == LP_DTYPE_F64 ? (double *) result + i0 * k : obuf;

      if (!in_place)
        {
          load_up_rows (f, i0, h, TRUE, buf);
          x = buf;
        }
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, h, k, r, 1.0, x, r, m, k, 0.0, y, k);
      if (out_dtype != LP_DTYPE_F64)
        overflow += lp_dtype_from_f64 (out_dtype, obuf, (guchar *) result + i0 * k * osize, h * k);
    }
  return overflow;
}

gsize
lp_lora_spectrum_apply_to (const LpLoraSpectrum *s,
                           const LpLoraFactors  *f,
                           guint                 k,
                           guint                 k_out,
                           double                fold,
                           LpDtype               b_dtype,
                           gpointer              b_new,
                           LpDtype               a_dtype,
                           gpointer              a_new)
{
  guint r = f->r;
  guint used = MIN (MIN (k, k_out), s->n);
  double sign = fold < 0 ? -1.0 : 1.0;

  if (k_out == 0)
    return 0;

  /* The small maps absorb √(|fold|·σ): B' = B·Mb, A' = Ma·A. */
  g_autofree double *mb = g_new0 (double, (gsize) r * k_out);
  g_autofree double *ma = g_new0 (double, (gsize) k_out * r);
  for (guint i = 0; i < used; i++)
    {
      double root = sqrt (fabs (fold) * s->sigma[i]);
      for (guint t = 0; t < r; t++)
        {
          mb[t * k_out + i] = sign * root * s->map_b[t * r + i];
          ma[i * r + t] = root * s->map_a[i * r + t];
        }
    }

  if (f->f32)
    {
      g_autofree float *mbf = g_new (float, (gsize) r * k_out);
      g_autofree float *maf = g_new (float, (gsize) k_out * r);
      for (gsize i = 0; i < (gsize) r * k_out; i++)
        {
          mbf[i] = mb[i];
          maf[i] = ma[i];
        }
      return map_up_f32 (f, mbf, k_out, b_dtype, b_new) + map_down_f32 (f, maf, k_out, a_dtype, a_new);
    }
  return map_up_f64 (f, mb, k_out, b_dtype, b_new) + map_down_f64 (f, ma, k_out, a_dtype, a_new);
}

void
lp_lora_spectrum_apply (const LpLoraSpectrum *s,
                        const LpLoraFactors  *f,
                        guint                 k,
                        guint                 k_out,
                        double                fold,
                        gpointer              b_new,
                        gpointer              a_new)
{
  lp_lora_spectrum_apply_to (s, f, k, k_out, fold, compute_dtype (f), b_new,
                             compute_dtype (f), a_new);
}

gboolean
lp_lora_project_factor (gboolean       up,
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
                        gsize         *overflow)
{
  guint64 n = up ? out : in;
  gsize osize = dtype_size (out_dtype);
  gsize bl = block_len (r);
  float *obuf;
  float *buf = apply_scratch (r, k, bl, &obuf);
  /* alpha goes into the small matrix: (α R) A for A, B (α R)ᵀ for B */
  g_autofree float *mt = up ? map_cols_matrix (proj, r, k, TRUE, alpha) : NULL;
  g_autofree float *scaled = up ? NULL : g_new (float, (gsize) k * r);

  /* the one factor as the apply_*() helpers read it */
  LpLoraFactors f = { 0, };
  f.f32 = TRUE;
  f.stored = TRUE;
  f.b = f.a = data;
  f.b_dtype = f.a_dtype = dtype;
  f.out = out;
  f.in = in;
  f.r = r;

  if (!up)
    for (gsize i = 0; i < (gsize) k * r; i++)
      scaled[i] = alpha * proj[i];
  *overflow = 0;
  for (guint64 j0 = 0; j0 < n; j0 += bl)
    {
      gsize w = MIN (bl, n - j0);

      if (up)
        apply_cols (mt, k, &f, j0, w, buf, obuf);   /* B' rows j0 … j0 + w */
      else
        apply_rows (scaled, k, &f, j0, w, buf, obuf, w);

      /* Every output of a block takes in every value of its rows (or
       * columns), times a weight that may be zero: a NaN or an infinity
       * there makes a NaN here. Checking the k/r times smaller output
       * finds it; the input tells it apart from f32 overflow. */
      if (!lp_lora_all_finite_f32 (obuf, (gsize) k * w))
        {
          gsize size = dtype_size (dtype);
          for (gsize t = 0; t < (up ? w : r); t++)
            {
              gsize count = up ? r : w;
              gsize at = up ? (j0 + t) * r : t * n + j0;
              lp_dtype_to_f32 (dtype, (const guchar *) data + at * size, buf, count);
              if (!lp_lora_all_finite_f32 (buf, count))
                return FALSE;
            }
          for (gsize i = 0; i < (gsize) k * w; i++)
            *overflow += !isfinite (obuf[i]);
        }

      if (up)
        *overflow += lp_dtype_from_f32 (out_dtype, obuf, (guchar *) result + j0 * k * osize, w * k);
      else
        for (guint i = 0; i < k; i++)
          *overflow += lp_dtype_from_f32 (out_dtype, obuf + i * w,
                                          (guchar *) result + (i * n + j0) * osize, w);
    }
  return TRUE;
}

/* ---- randomized SVD ---------------------------------------------------- */

LpLoraSpectrum *
lp_lora_randomized_spectrum (const LpLoraFactors *f,
                             guint                k,
                             guint                oversample,
                             guint                niter,
                             LpLoraRng           *rng,
                             GError             **error)
{
  guint r = f->r;
  guint l = MIN (MIN ((guint64) k + oversample, (guint64) r), MIN (f->out, f->in));
  g_autoptr (LpLoraSpectrum) s = g_new0 (LpLoraSpectrum, 1);
  s->r = r;
  s->sigma = g_new0 (double, r);
  s->map_b = g_new0 (double, (gsize) r * r);
  s->map_a = g_new0 (double, (gsize) r * r);
  if (l == 0)
    return g_steal_pointer (&s);

  g_autofree double *ga = g_new (double, (gsize) r * r);
  g_autofree double *gb = g_new (double, (gsize) r * r);
  gram (f, FALSE, ga);
  gram (f, TRUE, gb);
  for (guint i = 0; i < r; i++)
    if (!isfinite (ga[i * r + i]) || !isfinite (gb[i * r + i]))
      {
        g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                     "NaN or infinity in the %s factor",
                     isfinite (ga[i * r + i]) ? "up" : "down");
        return NULL;
      }
  symmetrize (ga, r);
  symmetrize (gb, r);

  /* Halko–Martinsson–Tropp on M = B A, with every sketch kept as Y = B T:
   * M Mᵀ Y = B (G_A G_B T), so the power iterations run on r × l matrices
   * and the factors are read once, for their Gram matrices, as in the exact
   * method. The test matrix is Ω = Aᵀ Ω_r (Ω_r Gaussian, r × l), whose
   * sketch is A Ω = G_A Ω_r. */
  g_autofree double *omega = g_new (double, (gsize) r * l);
  for (gsize i = 0; i < (gsize) r * l; i++)
    omega[i] = lp_lora_rng_normal (rng);
  /* G_A G_B is applied as two products (4 r² l flops), never formed (2 r³) */
  g_autofree double *gbq = g_new (double, (gsize) r * l);

  g_autofree double *t = g_new (double, (gsize) r * l);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, l, r, 1.0, ga, r, omega, l, 0.0, t, l);

  for (guint it = 0; it <= niter; it++)
    {
      guint l2;
      g_autofree double *q = orthonormalize_metric (t, r, l, gb, &l2, NULL, error);
      if (q == NULL)
        return NULL;
      l = l2;
      g_clear_pointer (&t, g_free);
      if (l == 0)
        return g_steal_pointer (&s);   /* B A = 0 */
      if (it == niter)
        {
          t = g_steal_pointer (&q);
          break;
        }
      t = g_new (double, (gsize) r * l);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, l, r, 1.0, gb, r, q, l, 0.0, gbq, l);
      cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, r, l, r, 1.0, ga, r, gbq, l, 0.0, t, l);
    }

  /* Q = B T has orthonormal columns. Z = Qᵀ B A = C A with C = Tᵀ G_B;
   * Z Zᵀ = C G_A Cᵀ = U S² Uᵀ, and Vᵀ = S⁻¹ Uᵀ C A. */
  g_autofree double *c = g_new (double, (gsize) l * r);
  g_autofree double *cga = g_new (double, (gsize) l * r);
  g_autofree double *h = g_new (double, (gsize) l * l);
  g_autofree double *w = g_new (double, l);
  cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, l, r, r, 1.0, t, l, gb, r, 0.0, c, r);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, l, r, r, 1.0, c, r, ga, r, 0.0, cga, r);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasTrans, l, l, r, 1.0, cga, r, c, r, 0.0, h, l);
  guint kept;
  if (!eigen (h, l, w, FALSE, &kept, error))
    return NULL;

  for (guint i = 0; i < r; i++)
    for (guint j = 0; j < r; j++)
      s->total += ga[i * r + j] * gb[j * r + i];   /* ‖B A‖² = trace (G_A G_B) */

  /* map_b[:, i] = T u_i / 1 (B T u_i is a unit vector already);
   * map_a[i, :] = u_iᵀ C / σ_i */
  for (guint i = 0; i < kept; i++)
    {
      guint col = l - 1 - i;
      double sigma = sqrt (w[col]);
      s->sigma[i] = sigma;
      for (guint t_ = 0; t_ < r; t_++)
        {
          double mb = 0, ma = 0;
          for (guint j = 0; j < l; j++)
            {
              mb += t[t_ * l + j] * h[j * l + col];
              ma += h[j * l + col] * c[j * r + t_];
            }
          s->map_b[t_ * r + i] = mb;
          s->map_a[i * r + t_] = ma / sigma;
        }
    }
  s->n = kept;
  return g_steal_pointer (&s);
}

/* ---- norms and rank selection ------------------------------------------ */

guint
lp_lora_numerical_rank (const LpLoraSpectrum *s,
                        double                rel_tol)
{
  if (s->r == 0 || s->sigma[0] <= 0)
    return 0;
  guint n = 0;
  for (guint i = 0; i < s->r; i++)
    if (s->sigma[i] > rel_tol * s->sigma[0])
      n++;
  return n;
}

/* ⟨Bx Ax, By Ay⟩ from the rx × ry and ry × rx products of the factors */
static double
cross (const double *bx, guint rx, const double *by, guint ry, guint64 out,
       const double *ax, const double *ay, guint64 in)
{
  if (rx == 0 || ry == 0)
    return 0;
  g_autofree double *p = g_new (double, (gsize) rx * ry);
  g_autofree double *q = g_new (double, (gsize) ry * rx);
  /* P = Bxᵀ By (rx × ry), Q = Ay Axᵀ (ry × rx); ⟨Bx Ax, By Ay⟩ = trace (P Q) */
  cblas_dgemm (CblasRowMajor, CblasTrans, CblasNoTrans, rx, ry, out, 1.0, bx, rx, by, ry, 0.0, p, ry);
  cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasTrans, ry, rx, in, 1.0, ay, in, ax, in, 0.0, q, rx);
  double trace = 0;
  for (guint i = 0; i < rx; i++)
    for (guint j = 0; j < ry; j++)
      trace += p[i * ry + j] * q[j * rx + i];
  return trace;
}

void
lp_lora_delta_norms (const double *bx,
                     const double *ax,
                     guint         rx,
                     double        sx,
                     const double *by,
                     const double *ay,
                     guint         ry,
                     double        sy,
                     guint64       out,
                     guint64       in,
                     double       *norm2_x,
                     double       *norm2_y,
                     double       *norm2_diff)
{
  double xx = sx * sx * cross (bx, rx, bx, rx, out, ax, ax, in);
  double yy = sy * sy * cross (by, ry, by, ry, out, ay, ay, in);
  double xy = sx * sy * cross (bx, rx, by, ry, out, ax, ay, in);
  *norm2_x = xx;
  *norm2_y = yy;
  *norm2_diff = MAX (0.0, xx + yy - 2 * xy);
}

guint
lp_lora_rank_for_energy (const double *sigma,
                         guint         n,
                         double        fraction)
{
  double total = 0, acc = 0;
  for (guint i = 0; i < n; i++)
    total += sigma[i] * sigma[i];
  if (total <= 0)
    return 1;
  for (guint i = 0; i < n; i++)
    {
      acc += sigma[i] * sigma[i];
      /* a relative slack so that fraction = 1 stops at the last non-zero σ
       * despite rounding in the sums */
      if (acc >= fraction * total * (1 - 1e-12))
        return i + 1;
    }
  return MAX (n, 1);
}

/* kohya: index = clamp (i, 1, len - 1) and new rank = index + 1 */
static guint
kohya_rank (guint64 index, guint64 full_len)
{
  if (full_len >= 2)
    index = CLAMP (index, 1, full_len - 1);
  else
    index = 1;
  return MIN (index + 1, (guint64) G_MAXUINT);
}

/* numpy/torch searchsorted (left): the first i with cum[i] ≥ target, or len */
static guint64
search_cumulative (const double *sigma, guint n, guint64 full_len, double target, gboolean squared)
{
  double total = 0, acc = 0;
  for (guint i = 0; i < n; i++)
    total += squared ? sigma[i] * sigma[i] : sigma[i];
  if (total <= 0)
    return 0;
  for (guint i = 0; i < n; i++)
    {
      acc += squared ? sigma[i] * sigma[i] : sigma[i];
      if (acc / total >= target)
        return i;
    }
  /* the dense SVD's trailing zeros keep the sum at its total: it reaches the
   * target (≤ 1) right after our last value, or never */
  return target <= 1.0 && full_len > n ? n : full_len;
}

guint
lp_lora_rank_sv_ratio (const double *sigma,
                       guint         n,
                       guint64       full_len,
                       double        ratio)
{
  if (n == 0 || sigma[0] <= 0)
    return 1;
  double min_sv = sigma[0] / ratio;
  guint64 count = 0;
  for (guint i = 0; i < n; i++)
    if (sigma[i] > min_sv)
      count++;
  return kohya_rank (count, full_len);
}

guint
lp_lora_rank_sv_fro (const double *sigma,
                     guint         n,
                     guint64       full_len,
                     double        target)
{
  if (n == 0 || sigma[0] <= 0)
    return 1;
  return kohya_rank (search_cumulative (sigma, n, full_len, target * target, TRUE) + 1, full_len);
}

guint
lp_lora_rank_sv_cumulative (const double *sigma,
                            guint         n,
                            guint64       full_len,
                            double        target)
{
  if (n == 0 || sigma[0] <= 0)
    return 1;
  return kohya_rank (search_cumulative (sigma, n, full_len, target, FALSE) + 1, full_len);
}
