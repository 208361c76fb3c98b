/* lp-lora-kernels.c: Gram matrices of factor blocks in f32 vectors
 *
 * Written with GCC vector extensions over 16 floats, which the compiler
 * lowers to what each target has (see LP_DEFINE_KERNEL).
 *
 * The products of 16-bit factors are exact in f32; what rounds is the
 * accumulation, over at most one block (a few hundred terms) before the sums
 * move into f64, so the Gram matrix is good to about 1e-6 of its norm.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-kernels.h"
#include "lp-lora-math.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* Each kernel is a body, inlined into one function per x86-64 level (v4:
 * AVX-512, v3: AVX2 and FMA, and the baseline); the first call picks the
 * level the machine runs, or the one LPIPE_KERNELS names ("avx512", "avx2",
 * "baseline"), so the tests can run every variant on one machine. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
# define LP_X86_LEVELS 1
#endif

static int
kernel_level (void)
{
#ifdef LP_X86_LEVELS
  static gsize level = 0;

  if (g_once_init_enter (&level))
    {
      int found = __builtin_cpu_supports ("x86-64-v4") ? 4 : __builtin_cpu_supports ("x86-64-v3") ? 3 : 2;
      const char *wanted = g_getenv ("LPIPE_KERNELS");

      if (g_strcmp0 (wanted, "avx2") == 0)
        found = MIN (found, 3);
      else if (g_strcmp0 (wanted, "baseline") == 0)
        found = 2;
      g_once_init_leave (&level, found);
    }
  return level;
#else
  return 2;
#endif
}

#ifdef LP_X86_LEVELS
# define LP_DEFINE_KERNEL(type, name, params, args) \
  __attribute__ ((target ("arch=x86-64-v4"))) static type name##_v4 params { return name##_body args; } \
  __attribute__ ((target ("arch=x86-64-v3"))) static type name##_v3 params { return name##_body args; } \
  static type name##_base params { return name##_body args; } \
  type name params \
  { \
    switch (kernel_level ()) \
      { \
      case 4: return name##_v4 args; \
      case 3: return name##_v3 args; \
      default: return name##_base args; \
      } \
  }
# define LP_DEFINE_VOID_KERNEL(name, params, args) \
  __attribute__ ((target ("arch=x86-64-v4"))) static void name##_v4 params { name##_body args; } \
  __attribute__ ((target ("arch=x86-64-v3"))) static void name##_v3 params { name##_body args; } \
  static void name##_base params { name##_body args; } \
  void name params \
  { \
    switch (kernel_level ()) \
      { \
      case 4: name##_v4 args; break; \
      case 3: name##_v3 args; break; \
      default: name##_base args; break; \
      } \
  }
#else
# define LP_DEFINE_KERNEL(type, name, params, args) type name params { return name##_body args; }
# define LP_DEFINE_VOID_KERNEL(name, params, args) void name params { name##_body args; }
#endif

#define LP_INLINE static inline __attribute__ ((always_inline))


typedef float LpV16 __attribute__ ((vector_size (64)));

#define LOAD16(v, p) memcpy (&(v), (p), sizeof (LpV16))

/* Halving steps of a transposing sum: FOLD8 (x, y) holds 8 partial sums of
 * x then 8 of y; FOLD4 of two such vectors holds 4 partials of each of their
 * four sources, and so on, until lane i holds the whole sum of source i.
 * (Macros: GCC notes an ABI change for 64-byte vector arguments otherwise.) */
#define FOLD8(x, y) \
  (__builtin_shufflevector (x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) \
   + __builtin_shufflevector (x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#define FOLD4(x, y) \
  (__builtin_shufflevector (x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) \
   + __builtin_shufflevector (x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31))
#define FOLD2(x, y) \
  (__builtin_shufflevector (x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) \
   + __builtin_shufflevector (x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31))
#define FOLD1(x, y) \
  (__builtin_shufflevector (x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) \
   + __builtin_shufflevector (x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31))

/* Lane i of the result is the sum of the lanes of v[i]. */
LP_INLINE void
sum16 (const LpV16 v[16],
       LpV16      *out)
{
  LpV16 a[8], b[4], c[2];

  /* unrolled, so that the arrays live in registers */
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    a[i] = FOLD8 (v[2 * i], v[2 * i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    b[i] = FOLD4 (a[2 * i], a[2 * i + 1]);
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)
    c[i] = FOLD2 (b[2 * i], b[2 * i + 1]);
  *out = FOLD1 (c[0], c[1]);
}

/* Dot products of 4 rows with 4 rows, 16 columns at a time: 8 loads feed
 * 16 multiply-adds. Rows past @r repeat the last one; their sums are
 * dropped. */
LP_INLINE void
lp_lora_gram_rows_f32_body (const float *x,
                            gsize        ld,
                            guint        r,
                            gsize        w,
                            double      *g)
{
  for (guint i0 = 0; i0 < r; i0 += 4)
    for (guint j0 = i0; j0 < r; j0 += 4)
      {
        const float *xi[4], *xj[4];
        LpV16 acc[16];

        for (guint a = 0; a < 4; a++)
          {
            xi[a] = x + MIN (i0 + a, r - 1) * ld;
            xj[a] = x + MIN (j0 + a, r - 1) * ld;
          }
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++)
          acc[k] = (LpV16) { 0 };

        for (gsize t = 0; t < w; t += 16)
          {
            LpV16 u0, u1, u2, u3, v0, v1, v2, v3;
            LOAD16 (u0, xi[0] + t); LOAD16 (u1, xi[1] + t); LOAD16 (u2, xi[2] + t); LOAD16 (u3, xi[3] + t);
            LOAD16 (v0, xj[0] + t); LOAD16 (v1, xj[1] + t); LOAD16 (v2, xj[2] + t); LOAD16 (v3, xj[3] + t);

            acc[0] += u0 * v0;  acc[1] += u0 * v1;  acc[2] += u0 * v2;  acc[3] += u0 * v3;
            acc[4] += u1 * v0;  acc[5] += u1 * v1;  acc[6] += u1 * v2;  acc[7] += u1 * v3;
            acc[8] += u2 * v0;  acc[9] += u2 * v1;  acc[10] += u2 * v2; acc[11] += u2 * v3;
            acc[12] += u3 * v0; acc[13] += u3 * v1; acc[14] += u3 * v2; acc[15] += u3 * v3;
          }

        LpV16 sums;
        sum16 (acc, &sums);
        for (guint a = 0; a < 4; a++)
          for (guint b = 0; b < 4; b++)
            {
              guint i = i0 + a, j = j0 + b;
              if (i < r && j < r && j >= i)
                g[i * r + j] += sums[4 * a + b];
            }
      }
}

/* Outer products of rows: 6 values of a row (broadcast) times NV vectors of
 * 16 of its values, over all @h rows. Columns past @r read the next row or
 * the slack and are dropped, as are rows past @r. */
LP_INLINE void
cols_tile (const float *y,
           guint        r,
           gsize        h,
           guint        i0,
           guint        j0,
           const int    nv,
           double      *g)
{
  guint idx[6];
  LpV16 acc[6][2];

  for (guint a = 0; a < 6; a++)
    {
      idx[a] = MIN (i0 + a, r - 1);
      acc[a][0] = acc[a][1] = (LpV16) { 0 };
    }

  for (gsize t = 0; t < h; t++)
    {
      const float *row = y + t * r;
      LpV16 c0, c1 = { 0 };
      LOAD16 (c0, row + j0);
      if (nv > 1)
        LOAD16 (c1, row + j0 + 16);

#pragma GCC unroll 6
      for (guint a = 0; a < 6; a++)
        {
          LpV16 s = (LpV16) { 0 } + row[idx[a]];
          acc[a][0] += s * c0;
          if (nv > 1)
            acc[a][1] += s * c1;
        }
    }

  for (guint a = 0; a < 6; a++)
    for (int v = 0; v < nv; v++)
      for (guint lane = 0; lane < 16; lane++)
        {
          guint i = i0 + a, j = j0 + 16 * v + lane;
          if (i < r && j < r && j >= i)
            g[i * r + j] += acc[a][v][lane];
        }
}

LP_INLINE void
lp_lora_gram_cols_f32_body (const float *y,
                            guint        r,
                            gsize        h,
                            double      *g)
{
  for (guint i0 = 0; i0 < r; i0 += 6)
    {
      /* the upper triangle: columns from the vector holding column i0 */
      guint j0 = i0 / 16 * 16;
      for (; j0 + 16 < r; j0 += 32)
        cols_tile (y, r, h, i0, j0, 2, g);
      if (j0 < r)
        cols_tile (y, r, h, i0, j0, 1, g);
    }
}

LP_DEFINE_VOID_KERNEL (lp_lora_gram_rows_f32,
                       (const float *x, gsize ld, guint r, gsize w, double *g),
                       (x, ld, r, w, g))
LP_DEFINE_VOID_KERNEL (lp_lora_gram_cols_f32,
                       (const float *y, guint r, gsize h, double *g),
                       (y, r, h, g))

/* ---- blocked Gram kernels, for large r ----------------------------------- */

/* At large r the kernels above re-read their blocks once per tile, and the
 * tiles are small: the cost grows past the arithmetic. These work like a
 * GEMM: a panel of GRAM_PANEL steps of the long dimension is packed once
 * (converted if need be) into groups of 16 Gram columns, panel[g][t][lane]
 * = value t of column 16 g + lane (zero past r), which stays in L2; a tile
 * of 6 Gram rows (broadcast) by up to 4 vectors of 16 columns is summed
 * over the panel in registers, and only tiles that reach the upper triangle
 * are computed. Each j block of 4 vectors stays in L1 while the row tiles
 * pass over it. The f32 sums go to f64 after every panel: GRAM_PANEL
 * products per lane (bf16: twice that, in pairs). */
#define GRAM_PANEL 128
/* Floats from one group of a panel to the next: a cache line more than the
 * group holds, so that the lines of one step of all groups fall in
 * different sets of the L1 cache (at 8 KiB apart they would all share
 * one, and a j block's lines evict each other). */
#define GRAM_GROUP ((gsize) GRAM_PANEL * 16 + 16)
#define GRAM_TILE_ROWS 6

typedef double LpD16 __attribute__ ((vector_size (128)));

/* G[i][j … j + 15] += the lanes of @acc that are on or above the diagonal
 * and inside the matrix. */
LP_INLINE void
add_tile_row (double      *g,
              guint        r,
              guint        i,
              guint        j,
              const LpV16 *acc)
{
  if (i >= r)
    return;
  if (i <= j && j + 16 <= r)
    {
      LpD16 sum, wide = __builtin_convertvector (*acc, LpD16);
      memcpy (&sum, g + (gsize) i * r + j, sizeof sum);
      sum += wide;
      memcpy (g + (gsize) i * r + j, &sum, sizeof sum);
      return;
    }
  for (guint lane = i > j ? i - j : 0; lane < 16 && j + lane < r; lane++)
    g[(gsize) i * r + j + lane] += (*acc)[lane];
}

/* Rows i0 … i0 + 5 by the columns of groups g0 … g0 + nv - 1, over @len
 * steps of the panel. Rows past r repeat the last one and are dropped. */
LP_INLINE void
blocked_tile_f32 (const float *panel,
                  gsize        len,
                  guint        r,
                  guint        i0,
                  guint        g0,
                  const int    nv,
                  double      *g)
{
  const float *bi[GRAM_TILE_ROWS];
  const float *bj = panel + g0 * GRAM_GROUP;
  LpV16 acc[GRAM_TILE_ROWS][4];

  for (guint a = 0; a < GRAM_TILE_ROWS; a++)
    {
      guint i = MIN (i0 + a, r - 1);
      bi[a] = panel + (i / 16) * GRAM_GROUP + i % 16;
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        acc[a][v] = (LpV16) { 0 };
    }
  for (gsize t = 0; t < len; t++)
    {
      LpV16 c[4];
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        LOAD16 (c[v], bj + v * GRAM_GROUP + t * 16);
#pragma GCC unroll 6
      for (guint a = 0; a < GRAM_TILE_ROWS; a++)
        {
          float s = bi[a][t * 16];
#pragma GCC unroll 4
          for (int v = 0; v < nv; v++)
            acc[a][v] += s * c[v];
        }
    }
  for (guint a = 0; a < GRAM_TILE_ROWS; a++)
    for (int v = 0; v < nv; v++)
      add_tile_row (g, r, i0 + a, 16 * (g0 + v), &acc[a][v]);
}

/* Runs TILE (i0, g0, nv) over the tiles of the upper triangle, j blocks of
 * @max_nv vectors (what the level's registers hold) outermost, and AFTER
 * once after each tile. A tile starts at the group holding column i0, so
 * no tile lies wholly below the diagonal. */
#define FOR_EACH_TILE(r, max_nv, TILE, AFTER) \
  do { \
    guint groups_ = ((r) + 15) / 16; \
    for (guint gb_ = 0; gb_ < groups_; gb_ += (max_nv)) \
      { \
        guint gend_ = MIN (gb_ + (max_nv), groups_); \
        for (guint i0_ = 0; i0_ < MIN ((r), 16 * gend_); i0_ += GRAM_TILE_ROWS) \
          { \
            guint g0_ = MAX (gb_, i0_ / 16); \
            switch (gend_ - g0_) \
              { \
              case 4: TILE (i0_, g0_, 4); break; \
              case 3: TILE (i0_, g0_, 3); break; \
              case 2: TILE (i0_, g0_, 2); break; \
              default: TILE (i0_, g0_, 1); break; \
              } \
            AFTER; \
          } \
      } \
  } while (0)

/* G += Pᵀ P over the upper triangle for the packed panel P (@len ≤
 * GRAM_PANEL steps), with j blocks of @max_nv vectors: AVX-512 holds 24
 * accumulators in its 32 registers, AVX2 and below 6 in their 16. */
LP_INLINE void
blocked_panel_f32 (const float *panel,
                   gsize        len,
                   guint        r,
                   double      *g,
                   const guint  max_nv)
{
#define F32_TILE(i0, g0, nv) blocked_tile_f32 (panel, len, r, i0, g0, nv, g)
  FOR_EACH_TILE (r, max_nv, F32_TILE, (void) 0);
#undef F32_TILE
}

/* Transposes 16 vectors of 16 (lane c of row i to lane i of row c) in four
 * steps, each swapping one bit of the row index with the same bit of the
 * lane index: rows i and i + m trade their lanes c + m and c. */
#define SWAP_STEP(x, m, lo, hi) \
  do { \
    _Pragma ("GCC unroll 16") \
    for (int i_ = 0; i_ < 16; i_++) \
      if (!(i_ & (m))) \
        { \
          LpV16 a_ = (x)[i_], b_ = (x)[i_ + (m)]; \
          (x)[i_] = __builtin_shufflevector (a_, b_, lo); \
          (x)[i_ + (m)] = __builtin_shufflevector (a_, b_, hi); \
        } \
  } while (0)
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31

LP_INLINE void
transpose16 (LpV16 x[16])
{
  SWAP_STEP (x, 1, LO1, HI1);
  SWAP_STEP (x, 2, LO2, HI2);
  SWAP_STEP (x, 4, LO4, HI4);
  SWAP_STEP (x, 8, LO8, HI8);
}

/* Packs columns t0 … t0 + len of the @r rows of X (stride @ld): group g,
 * step t, lane l = X[16 g + l][t0 + t]. Whole 16 × 16 blocks are
 * transposed in registers; the edges go value by value. */
LP_INLINE void
pack_rows_f32 (const float *x,
               gsize        ld,
               guint        r,
               gsize        t0,
               gsize        len,
               float       *panel)
{
  guint groups = (r + 15) / 16;

  for (guint gi = 0; gi < groups; gi++)
    {
      float *dst = panel + gi * GRAM_GROUP;
      guint rows = MIN (16, r - 16 * gi);
      gsize t = 0;

      if (rows == 16)
        for (; t + 16 <= len; t += 16)
          {
            LpV16 block[16];
            for (int i = 0; i < 16; i++)
              LOAD16 (block[i], x + (16 * gi + i) * ld + t0 + t);
            transpose16 (block);
            memcpy (dst + t * 16, block, sizeof block);
          }
      for (; t < len; t++)
        for (guint l = 0; l < 16; l++)
          dst[t * 16 + l] = l < rows ? x[(16 * gi + l) * ld + t0 + t] : 0.f;
    }
}

/* Packs rows t0 … t0 + len of Y [n, r] (rows one after the other). */
LP_INLINE void
pack_cols_f32 (const float *y,
               guint        r,
               gsize        t0,
               gsize        len,
               float       *panel)
{
  guint groups = (r + 15) / 16;

  for (gsize t = 0; t < len; t++)
    {
      const float *row = y + (t0 + t) * r;
      for (guint gi = 0; gi < groups; gi++)
        {
          float *dst = panel + gi * GRAM_GROUP + t * 16;
          guint cols = MIN (16, r - 16 * gi);
          memcpy (dst, row + 16 * gi, sizeof (float) * cols);
          if (cols < 16)
            memset (dst + cols, 0, sizeof (float) * (16 - cols));
        }
    }
}

LP_INLINE void
gram_blocked_f32_body (const float *x,
                       gsize        ld,
                       guint        r,
                       gsize        n,
                       gboolean     up,
                       double      *g,
                       float       *panel,
                       const guint  max_nv)
{
  for (gsize t0 = 0; t0 < n; t0 += GRAM_PANEL)
    {
      gsize len = MIN (GRAM_PANEL, n - t0);
      if (up)
        pack_cols_f32 (x, r, t0, len, panel);
      else
        pack_rows_f32 (x, ld, r, t0, len, panel);
      blocked_panel_f32 (panel, len, r, g, max_nv);
    }
}

#ifdef LP_X86_LEVELS
__attribute__ ((target ("arch=x86-64-v4"))) static void
gram_blocked_f32_v4 (const float *x, gsize ld, guint r, gsize n, gboolean up, double *g, float *panel)
{
  gram_blocked_f32_body (x, ld, r, n, up, g, panel, 4);
}

__attribute__ ((target ("arch=x86-64-v3"))) static void
gram_blocked_f32_v3 (const float *x, gsize ld, guint r, gsize n, gboolean up, double *g, float *panel)
{
  gram_blocked_f32_body (x, ld, r, n, up, g, panel, 1);
}
#endif

static void
gram_blocked_f32 (const float *x, gsize ld, guint r, gsize n, gboolean up, double *g, float *panel)
{
#ifdef LP_X86_LEVELS
  switch (kernel_level ())
    {
    case 4: gram_blocked_f32_v4 (x, ld, r, n, up, g, panel); return;
    case 3: gram_blocked_f32_v3 (x, ld, r, n, up, g, panel); return;
    default: break;
    }
#endif
  gram_blocked_f32_body (x, ld, r, n, up, g, panel, 1);
}

gsize
lp_lora_gram_blocked_scratch_size (guint r)
{
  return sizeof (float) * GRAM_GROUP * ((r + 15) / 16) + 64;
}

/* The panel at a 64-byte boundary of the scratch (it is read in vectors). */
static float *
panel_of (gpointer scratch)
{
  return (float *) (((guintptr) scratch + 63) & ~(guintptr) 63);
}

void
lp_lora_gram_blocked_rows_f32 (const float *x,
                               gsize        ld,
                               guint        r,
                               gsize        n,
                               double      *g,
                               gpointer     scratch)
{
  if (r > 0)
    gram_blocked_f32 (x, ld, r, n, FALSE, g, panel_of (scratch));
}

void
lp_lora_gram_blocked_cols_f32 (const float *y,
                               guint        r,
                               gsize        n,
                               double      *g,
                               gpointer     scratch)
{
  if (r > 0)
    gram_blocked_f32 (y, r, r, n, TRUE, g, panel_of (scratch));
}

/* The Gram matrix of LoHa's Khatri–Rao factor, row t = x1[t] ⊗ x2[t], in
 * its symmetry: G[(i,j), (i',j')] = Σ_t x1[t][i] x1[t][i'] · x2[t][j] x2[t][j']
 * depends only on the pairs {i, i'} and {j, j'}, so it is C = Pᵀ Q for P
 * [n, r1(r1+1)/2] the products of x1's pairs and Q likewise of x2's: for
 * r1 = r2 = 8, 36 × 36 sums instead of the 64 · 65 / 2 of Bᵀ B, and the
 * r1·r2 products are never formed. P and Q are packed into panels as the
 * blocked kernel packs (lanes picked from each step's row by permutes),
 * and C is summed over tiles of 6 rows of P by up to 4 vectors of Q, then
 * spread into G's upper triangle. */
typedef gint32 LpI32x16 __attribute__ ((vector_size (64)));

/* Lanes of @v picked by the indices of @pick: one vpermps where GCC's
 * __builtin_shuffle takes a variable mask; clang (the fuzzing build) has
 * none, and picks lane by lane. (A macro: GCC notes an ABI change for
 * 64-byte vector results otherwise.) */
#if defined(__clang__)
# define PERMUTE16(v, pick) \
  ({ LpV16 out_; for (int l_ = 0; l_ < 16; l_++) out_[l_] = (v)[(pick)[l_] & 15]; out_; })
#else
# define PERMUTE16(v, pick) __builtin_shuffle ((v), (pick))
#endif

/* Index of the pair i ≤ j among r values, pairs ordered by i then j. */
static inline guint
pair_index (guint i, guint j, guint r)
{
  if (i > j)
    {
      guint t = i;
      i = j;
      j = t;
    }
  return i * (2 * r - i + 1) / 2 + (j - i);
}

LP_INLINE void
pack_pairs_f32 (const float *x,
                guint        r,
                gsize        len,
                float       *panel)
{
  guint s = r * (r + 1) / 2, groups = (s + 15) / 16;
  LpI32x16 pick1[9], pick2[9];
  LpV16 mask[9];
  guint c = 0;

  for (guint gi = 0; gi < groups; gi++)
    for (guint l = 0; l < 16; l++)
      {
        pick1[gi][l] = pick2[gi][l] = 0;
        mask[gi][l] = 0.f;
      }
  for (guint i = 0; i < r; i++)
    for (guint j = i; j < r; j++, c++)
      {
        pick1[c / 16][c % 16] = i;
        pick2[c / 16][c % 16] = j;
        mask[c / 16][c % 16] = 1.f;
      }
  for (gsize t = 0; t < len; t++)
    {
      LpV16 a;
      LOAD16 (a, x + t * 16);
      for (guint gi = 0; gi < groups; gi++)
        {
          LpV16 v = PERMUTE16 (a, pick1[gi]) * PERMUTE16 (a, pick2[gi]) * mask[gi];
          memcpy (panel + gi * GRAM_GROUP + t * 16, &v, sizeof v);
        }
    }
}

/* C[i0 … i0 + 5][16 g0 …] += the products of those rows of the P panel and
 * @nv groups of the Q panel over @len steps; rows past s1 repeat the last
 * one and are dropped, lanes past s2 too. */
LP_INLINE void
gemm_tile_f32 (const float *pp,
               const float *qp,
               gsize        len,
               guint        s1,
               guint        s2,
               guint        i0,
               guint        g0,
               const int    nv,
               double      *c)
{
  const float *bi[GRAM_TILE_ROWS];
  const float *bj = qp + g0 * GRAM_GROUP;
  LpV16 acc[GRAM_TILE_ROWS][4];

  for (guint a = 0; a < GRAM_TILE_ROWS; a++)
    {
      guint i = MIN (i0 + a, s1 - 1);
      bi[a] = pp + (i / 16) * GRAM_GROUP + i % 16;
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        acc[a][v] = (LpV16) { 0 };
    }
  for (gsize t = 0; t < len; t++)
    {
      LpV16 q[4];
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        LOAD16 (q[v], bj + v * GRAM_GROUP + t * 16);
#pragma GCC unroll 6
      for (guint a = 0; a < GRAM_TILE_ROWS; a++)
        {
          float x = bi[a][t * 16];
#pragma GCC unroll 4
          for (int v = 0; v < nv; v++)
            acc[a][v] += x * q[v];
        }
    }
  for (guint a = 0; a < GRAM_TILE_ROWS && i0 + a < s1; a++)
    for (int v = 0; v < nv; v++)
      {
        double *dst = c + (gsize) (i0 + a) * s2 + 16 * (g0 + v);
        if (16 * (g0 + v) + 16 <= s2)
          {
            LpD16 sum, wide = __builtin_convertvector (acc[a][v], LpD16);
            memcpy (&sum, dst, sizeof sum);
            sum += wide;
            memcpy (dst, &sum, sizeof sum);
          }
        else
          for (guint l = 0; 16 * (g0 + v) + l < s2; l++)
            dst[l] += acc[a][v][l];
      }
}

LP_INLINE void
gram_khatri_rao_f32_body (const float *x1,
                          const float *x2,
                          guint        r1,
                          guint        r2,
                          gsize        n,
                          double      *c,
                          float       *panel,
                          const guint  max_nv)
{
  guint s1 = r1 * (r1 + 1) / 2, s2 = r2 * (r2 + 1) / 2;
  guint g1 = (s1 + 15) / 16, g2 = (s2 + 15) / 16;
  float *pp = panel, *qp = panel + g1 * GRAM_GROUP;

  for (gsize t0 = 0; t0 < n; t0 += GRAM_PANEL)
    {
      gsize len = MIN (GRAM_PANEL, n - t0);
      pack_pairs_f32 (x1 + t0 * 16, r1, len, pp);
      pack_pairs_f32 (x2 + t0 * 16, r2, len, qp);
      for (guint gb = 0; gb < g2; gb += max_nv)
        for (guint i0 = 0; i0 < s1; i0 += GRAM_TILE_ROWS)
          switch (MIN (max_nv, g2 - gb))
            {
            case 4: gemm_tile_f32 (pp, qp, len, s1, s2, i0, gb, 4, c); break;
            case 3: gemm_tile_f32 (pp, qp, len, s1, s2, i0, gb, 3, c); break;
            case 2: gemm_tile_f32 (pp, qp, len, s1, s2, i0, gb, 2, c); break;
            default: gemm_tile_f32 (pp, qp, len, s1, s2, i0, gb, 1, c); break;
            }
    }
}

void
lp_lora_khatri_rao_gram_expand (const double *c,
                                guint         r1,
                                guint         r2,
                                double       *g)
{
  guint s2 = r2 * (r2 + 1) / 2, R = r1 * r2;

  /* G[(i,j), (i',j')] = C[{i,i'}, {j,j'}] over the upper triangle */
  for (guint i = 0; i < r1; i++)
    for (guint j = 0; j < r2; j++)
      {
        guint row = i * r2 + j;
        for (guint i2 = i; i2 < r1; i2++)
          {
            const double *crow = c + (gsize) pair_index (i, i2, r1) * s2;
            for (guint j2 = i2 == i ? j : 0; j2 < r2; j2++)
              g[(gsize) row * R + i2 * r2 + j2] += crow[pair_index (j, j2, r2)];
          }
      }
}

#ifdef LP_X86_LEVELS
__attribute__ ((target ("arch=x86-64-v4"))) static void
gram_khatri_rao_f32_v4 (const float *x1, const float *x2, guint r1, guint r2, gsize n, double *c, float *panel)
{
  gram_khatri_rao_f32_body (x1, x2, r1, r2, n, c, panel, 4);
}

__attribute__ ((target ("arch=x86-64-v3"))) static void
gram_khatri_rao_f32_v3 (const float *x1, const float *x2, guint r1, guint r2, gsize n, double *c, float *panel)
{
  gram_khatri_rao_f32_body (x1, x2, r1, r2, n, c, panel, 1);
}
#endif

gsize
lp_lora_gram_khatri_rao_scratch_size (guint r1,
                                      guint r2)
{
  guint s1 = r1 * (r1 + 1) / 2, s2 = r2 * (r2 + 1) / 2;
  return sizeof (float) * GRAM_GROUP * ((s1 + 15) / 16 + (s2 + 15) / 16) + 64;
}

void
lp_lora_gram_khatri_rao_f32 (const float *x1,
                             const float *x2,
                             guint        r1,
                             guint        r2,
                             gsize        n,
                             double      *c,
                             gpointer     scratch)
{
  float *panel = panel_of (scratch);

  g_return_if_fail (r1 <= 16 && r2 <= 16);
  if (r1 == 0 || r2 == 0)
    return;
#ifdef LP_X86_LEVELS
  switch (kernel_level ())
    {
    case 4: gram_khatri_rao_f32_v4 (x1, x2, r1, r2, n, c, panel); return;
    case 3: gram_khatri_rao_f32_v3 (x1, x2, r1, r2, n, c, panel); return;
    default: break;
    }
#endif
  gram_khatri_rao_f32_body (x1, x2, r1, r2, n, c, panel, 1);
}

/* ---- applying a small map to a factor ------------------------------------ */

/* Y = M X, 4 rows of M at a time against 16 columns of X: k × r small, X a
 * block of a factor's rows. Rows of M past @k repeat its last one and are
 * not stored. */
typedef guint16 LpU16x16 __attribute__ ((vector_size (32)));
typedef guint32 LpU32x16 __attribute__ ((vector_size (64)));

/* 16 values from @p: floats, or bf16 widened (exactly) on the way. (Not
 * returned: GCC notes an ABI change for 64-byte vector results.) */
LP_INLINE void
load_values (LpV16         *v,
             gconstpointer  p,
             gsize          index,
             gboolean       bf16)
{
  if (bf16)
    {
      LpU16x16 h;
      memcpy (&h, (const guint16 *) p + index, sizeof h);
      LpU32x16 wide = __builtin_convertvector (h, LpU32x16) << 16;
      memcpy (v, &wide, sizeof *v);
    }
  else
    memcpy (v, (const float *) p + index, sizeof *v);
}

LP_INLINE float
load_value (gconstpointer p,
            gsize         index,
            gboolean      bf16)
{
  if (bf16)
    {
      guint32 u = (guint32) ((const guint16 *) p)[index] << 16;
      float f;
      memcpy (&f, &u, sizeof f);
      return f;
    }
  return ((const float *) p)[index];
}

LP_INLINE void
map_rows_body (const float   *m,
               guint          k,
               guint          r,
               gconstpointer  x,
               gsize          ldx,
               gsize          w,
               float         *y,
               gsize          ldy,
               const gboolean bf16)
{
  gsize w16 = w / 16 * 16, w32 = w / 32 * 32;

  for (guint i0 = 0; i0 < k; i0 += 4)
    {
      const float *mi[4];
      guint rows = MIN (4, k - i0);

      for (guint a = 0; a < 4; a++)
        mi[a] = m + MIN (i0 + a, k - 1) * r;

      /* 32 columns at a time: each broadcast of M feeds two products */
      for (gsize t = 0; t < w32; t += 32)
        {
          LpV16 acc[8] = { { 0 } };
          for (guint s = 0; s < r; s++)
            {
              LpV16 x0, x1;
              load_values (&x0, x, s * ldx + t, bf16);
              load_values (&x1, x, s * ldx + t + 16, bf16);
#pragma GCC unroll 4
              for (guint a = 0; a < 4; a++)
                {
                  LpV16 b = (LpV16) { 0 } + mi[a][s];
                  acc[2 * a] += b * x0;
                  acc[2 * a + 1] += b * x1;
                }
            }
          for (guint a = 0; a < rows; a++)
            memcpy (y + (i0 + a) * ldy + t, &acc[2 * a], 2 * sizeof (LpV16));
        }
      for (gsize t = w32; t < w16; t += 16)
        {
          LpV16 acc0 = { 0 }, acc1 = { 0 }, acc2 = { 0 }, acc3 = { 0 };
          for (guint s = 0; s < r; s++)
            {
              LpV16 xs;
              load_values (&xs, x, s * ldx + t, bf16);
              acc0 += mi[0][s] * xs;
              acc1 += mi[1][s] * xs;
              acc2 += mi[2][s] * xs;
              acc3 += mi[3][s] * xs;
            }
          LpV16 accs[4] = { acc0, acc1, acc2, acc3 };
          for (guint a = 0; a < rows; a++)
            memcpy (y + (i0 + a) * ldy + t, &accs[a], sizeof (LpV16));
        }
      for (gsize t = w16; t < w; t++)
        for (guint a = 0; a < rows; a++)
          {
            float acc = 0;
            for (guint s = 0; s < r; s++)
              acc += mi[a][s] * load_value (x, s * ldx + t, bf16);
            y[(i0 + a) * ldy + t] = acc;
          }
    }
}

/* Y = X M for the @h rows of X (r floats each, one after the other), with
 * @mt = Mᵀ stored as LP_LORA_MAP_COLS_STRIDE (r) floats a row, zero past
 * @r, and round_up (k, 4) rows, zero past @k: 4 rows of X against 4
 * columns of M at a time, their 16 dot products summed across lanes at
 * once. Columns of X past @r read the next row or the slack, times zero. */
LP_INLINE void
map_cols_body (const float    *mt,
               guint           k,
               guint           r,
               gconstpointer   x,
               gsize           h,
               float          *y,
               const gboolean  bf16)
{
  gsize stride = LP_LORA_MAP_COLS_STRIDE (r);

  for (gsize t0 = 0; t0 < h; t0 += 4)
    {
      gsize xt[4];
      guint rows = MIN (4, h - t0);

      for (guint a = 0; a < 4; a++)
        xt[a] = MIN (t0 + a, h - 1) * r;

      for (guint i0 = 0; i0 < k; i0 += 4)
        {
          LpV16 acc[16];
#pragma GCC unroll 16
          for (int q = 0; q < 16; q++)
            acc[q] = (LpV16) { 0 };

          for (gsize c = 0; c < stride; c += 16)
            {
              LpV16 x0, x1, x2, x3, m0, m1, m2, m3;
              load_values (&x0, x, xt[0] + c, bf16);
              load_values (&x1, x, xt[1] + c, bf16);
              load_values (&x2, x, xt[2] + c, bf16);
              load_values (&x3, x, xt[3] + c, bf16);
              LOAD16 (m0, mt + (i0 + 0) * stride + c); LOAD16 (m1, mt + (i0 + 1) * stride + c);
              LOAD16 (m2, mt + (i0 + 2) * stride + c); LOAD16 (m3, mt + (i0 + 3) * stride + c);
              acc[0] += x0 * m0;  acc[1] += x0 * m1;  acc[2] += x0 * m2;  acc[3] += x0 * m3;
              acc[4] += x1 * m0;  acc[5] += x1 * m1;  acc[6] += x1 * m2;  acc[7] += x1 * m3;
              acc[8] += x2 * m0;  acc[9] += x2 * m1;  acc[10] += x2 * m2; acc[11] += x2 * m3;
              acc[12] += x3 * m0; acc[13] += x3 * m1; acc[14] += x3 * m2; acc[15] += x3 * m3;
            }

          LpV16 sums;
          sum16 (acc, &sums);
          for (guint a = 0; a < rows; a++)
            for (guint b = 0; b < 4 && i0 + b < k; b++)
              y[(t0 + a) * k + i0 + b] = sums[4 * a + b];
        }
    }
}

#define lp_lora_map_rows_f32_body(m, k, r, x, ldx, w, y, ldy) map_rows_body (m, k, r, x, ldx, w, y, ldy, FALSE)
#define lp_lora_map_rows_bf16_body(m, k, r, x, ldx, w, y, ldy) map_rows_body (m, k, r, x, ldx, w, y, ldy, TRUE)
#define lp_lora_map_cols_f32_body(mt, k, r, x, h, y) map_cols_body (mt, k, r, x, h, y, FALSE)
#define lp_lora_map_cols_bf16_body(mt, k, r, x, h, y) map_cols_body (mt, k, r, x, h, y, TRUE)

LP_DEFINE_VOID_KERNEL (lp_lora_map_rows_f32,
                       (const float *m, guint k, guint r, const float *x, gsize ldx, gsize w, float *y, gsize ldy),
                       (m, k, r, x, ldx, w, y, ldy))
LP_DEFINE_VOID_KERNEL (lp_lora_map_rows_bf16,
                       (const float *m, guint k, guint r, const guint16 *x, gsize ldx, gsize w, float *y, gsize ldy),
                       (m, k, r, x, ldx, w, y, ldy))
LP_DEFINE_VOID_KERNEL (lp_lora_map_cols_f32,
                       (const float *mt, guint k, guint r, const float *x, gsize h, float *y),
                       (mt, k, r, x, h, y))
LP_DEFINE_VOID_KERNEL (lp_lora_map_cols_bf16,
                       (const float *mt, guint k, guint r, const guint16 *x, gsize h, float *y),
                       (mt, k, r, x, h, y))

/* ---- bf16 straight from the file (AVX512-BF16) --------------------------- */

/* VDPBF16PS multiplies pairs of bf16 and adds both products to an f32 lane:
 * the factor is read as stored, with no conversion, at twice the products
 * per instruction of f32. Its products are exact and its sums round like
 * the f32 kernels' (it flushes subnormals, which bf16 factors of a LoRA,
 * at 1e-38, do not have). */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
# define LP_HAVE_BF16_DOT 1
# include <immintrin.h>
#endif

/* Columns of A per pass over a tile: a chunk of a rank-64 factor stays in L2,
 * and its f32 sums go to f64 after at most 64 products per lane. */
#define BF16_ROWS_CHUNK 2048
/* Rows of B per panel: 128 products per lane before the sums go to f64. */
#define BF16_COLS_BLOCK 256

#ifdef LP_HAVE_BF16_DOT
#define LP_BF16_TARGET __attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16")))

LP_BF16_TARGET static inline __m512
dot_bf16 (__m512 acc, __m512i x, __m512i y)
{
  return _mm512_dpbf16_ps (acc, (__m512bh) x, (__m512bh) y);
}

LP_BF16_TARGET static void
gram_rows_bf16_avx512 (const guint16 *a,
                       gsize          ld,
                       guint          r,
                       gsize          n,
                       double        *g)
{
  for (gsize t0 = 0; t0 < n; t0 += BF16_ROWS_CHUNK)
    {
      gsize t1 = MIN (t0 + BF16_ROWS_CHUNK, n);

      for (guint i0 = 0; i0 < r; i0 += 4)
        for (guint j0 = i0; j0 < r; j0 += 4)
          {
            const guint16 *xi[4], *xj[4];
            __m512 acc[16];

            for (guint q = 0; q < 4; q++)
              {
                xi[q] = a + MIN (i0 + q, r - 1) * ld;
                xj[q] = a + MIN (j0 + q, r - 1) * ld;
              }
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++)
              acc[q] = _mm512_setzero_ps ();

            for (gsize t = t0; t < t1; t += 32)
              {
                /* the last step of a row reads only what is left of it */
                __mmask32 m = t + 32 <= t1 ? (__mmask32) ~0u : (__mmask32) ((1u << (t1 - t)) - 1);
                __m512i u0 = _mm512_maskz_loadu_epi16 (m, xi[0] + t);
                __m512i u1 = _mm512_maskz_loadu_epi16 (m, xi[1] + t);
                __m512i u2 = _mm512_maskz_loadu_epi16 (m, xi[2] + t);
                __m512i u3 = _mm512_maskz_loadu_epi16 (m, xi[3] + t);
                __m512i v0 = _mm512_maskz_loadu_epi16 (m, xj[0] + t);
                __m512i v1 = _mm512_maskz_loadu_epi16 (m, xj[1] + t);
                __m512i v2 = _mm512_maskz_loadu_epi16 (m, xj[2] + t);
                __m512i v3 = _mm512_maskz_loadu_epi16 (m, xj[3] + t);

                acc[0] = dot_bf16 (acc[0], u0, v0);   acc[1] = dot_bf16 (acc[1], u0, v1);
                acc[2] = dot_bf16 (acc[2], u0, v2);   acc[3] = dot_bf16 (acc[3], u0, v3);
                acc[4] = dot_bf16 (acc[4], u1, v0);   acc[5] = dot_bf16 (acc[5], u1, v1);
                acc[6] = dot_bf16 (acc[6], u1, v2);   acc[7] = dot_bf16 (acc[7], u1, v3);
                acc[8] = dot_bf16 (acc[8], u2, v0);   acc[9] = dot_bf16 (acc[9], u2, v1);
                acc[10] = dot_bf16 (acc[10], u2, v2); acc[11] = dot_bf16 (acc[11], u2, v3);
                acc[12] = dot_bf16 (acc[12], u3, v0); acc[13] = dot_bf16 (acc[13], u3, v1);
                acc[14] = dot_bf16 (acc[14], u3, v2); acc[15] = dot_bf16 (acc[15], u3, v3);
              }

            LpV16 lanes[16];
            memcpy (lanes, acc, sizeof lanes);
            LpV16 sums;
            sum16 (lanes, &sums);
            for (guint p = 0; p < 4; p++)
              for (guint q = 0; q < 4; q++)
                {
                  guint i = i0 + p, j = j0 + q;
                  if (i < r && j < r && j >= i)
                    g[i * r + j] += sums[4 * p + q];
                }
          }
    }
}

/* Pairs of rows interleaved: the panel's element c of pair p holds
 * B[2p][c] in its low half and B[2p + 1][c] in its high half, so one
 * VDPBF16PS adds the products of two rows. Rows are @stride elements apart
 * in the panel, zero past @r. */
LP_BF16_TARGET static void
pair_rows_bf16 (const guint16 *b,
                guint          r,
                gsize          h,
                gsize          stride,
                guint32       *panel)
{
  /* word k of the result: row 0's column k/2 (k even) or row 1's (k odd),
   * for the first 16 columns of the two rows, then for the next 16 */
  static const guint16 order[2][32] = {
    { 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47 },
    { 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63 },
  };
  const __m512i first = _mm512_loadu_si512 (order[0]);
  const __m512i second = _mm512_loadu_si512 (order[1]);

  for (gsize p = 0; p < (h + 1) / 2; p++)
    {
      const guint16 *row0 = b + 2 * p * r;
      gboolean odd = 2 * p + 1 < h;

      for (gsize c = 0; c < stride; c += 32)
        {
          __mmask32 m = c + 32 <= r ? (__mmask32) ~0u : c < r ? (__mmask32) ((1u << (r - c)) - 1) : 0;
          __m512i x0 = _mm512_maskz_loadu_epi16 (m, row0 + c);
          __m512i x1 = _mm512_maskz_loadu_epi16 (odd ? m : 0, row0 + r + c);
          _mm512_storeu_si512 (panel + p * stride + c, _mm512_permutex2var_epi16 (x0, first, x1));
          _mm512_storeu_si512 (panel + p * stride + c + 16, _mm512_permutex2var_epi16 (x0, second, x1));
        }
    }
}

LP_BF16_TARGET static inline void
cols_tile_bf16 (const guint32 *panel,
                gsize          stride,
                gsize          pairs,
                guint          r,
                guint          i0,
                guint          j0,
                const int      nv,
                double        *g)
{
  guint idx[6];
  __m512 acc[6][2];

  for (guint q = 0; q < 6; q++)
    {
      idx[q] = MIN (i0 + q, r - 1);
      acc[q][0] = acc[q][1] = _mm512_setzero_ps ();
    }
  for (gsize p = 0; p < pairs; p++)
    {
      const guint32 *row = panel + p * stride;
      __m512i c0 = _mm512_loadu_si512 (row + j0);
      __m512i c1 = nv > 1 ? _mm512_loadu_si512 (row + j0 + 16) : _mm512_setzero_si512 ();
#pragma GCC unroll 6
      for (guint q = 0; q < 6; q++)
        {
          __m512i s = _mm512_set1_epi32 ((int) row[idx[q]]);
          acc[q][0] = dot_bf16 (acc[q][0], s, c0);
          if (nv > 1)
            acc[q][1] = dot_bf16 (acc[q][1], s, c1);
        }
    }
  /* into G's row i, columns j … j + 15, where i ≤ j < r: widened to f64 and
   * added under a mask, eight at a time */
  for (guint q = 0; q < 6 && i0 + q < r; q++)
    for (int v = 0; v < nv; v++)
      {
        guint i = i0 + q, j = j0 + 16 * v;
        guint lo = i > j ? i - j : 0, hi = MIN (16, r - j);
        __mmask16 m = (__mmask16) (((1u << hi) - 1) & ~((1u << lo) - 1));
        __m512 a = acc[q][v];
        __m512d a_lo = _mm512_cvtps_pd (_mm512_castps512_ps256 (a));
        __m512d a_hi = _mm512_cvtps_pd (_mm256_castsi256_ps (_mm512_extracti64x4_epi64 (_mm512_castps_si512 (a), 1)));
        double *row = g + (gsize) i * r + j;

        _mm512_mask_storeu_pd (row, (__mmask8) m,
                               _mm512_add_pd (_mm512_maskz_loadu_pd ((__mmask8) m, row), a_lo));
        _mm512_mask_storeu_pd (row + 8, (__mmask8) (m >> 8),
                               _mm512_add_pd (_mm512_maskz_loadu_pd ((__mmask8) (m >> 8), row + 8), a_hi));
      }
}

LP_BF16_TARGET static void
gram_cols_bf16_avx512 (const guint16 *b,
                       guint          r,
                       gsize          n,
                       double        *g,
                       guint32       *panel)
{
  /* a row of the panel, with a spare vector for the second load of a tile,
   * in steps of 32 columns for pair_rows_bf16() */
  gsize stride = (r + 16 + 31) / 32 * 32;

  for (gsize t0 = 0; t0 < n; t0 += BF16_COLS_BLOCK)
    {
      gsize h = MIN (BF16_COLS_BLOCK, n - t0);
      gsize pairs = (h + 1) / 2;

      pair_rows_bf16 (b + t0 * r, r, h, stride, panel);
      for (guint i0 = 0; i0 < r; i0 += 6)
        {
          guint j0 = i0 / 16 * 16;
          for (; j0 + 16 < r; j0 += 32)
            cols_tile_bf16 (panel, stride, pairs, r, i0, j0, 2, g);
          if (j0 < r)
            cols_tile_bf16 (panel, stride, pairs, r, i0, j0, 1, g);
        }
    }
}

/* The blocked kernel (see blocked_panel_f32) on bf16 pairs: step p of a
 * column in the panel holds its values 2p and 2p + 1 (low and high half),
 * and one VDPBF16PS adds both products. */
LP_BF16_TARGET LP_INLINE void
blocked_tile_bf16 (const guint32 *panel,
                   gsize          pairs,
                   guint          r,
                   guint          i0,
                   guint          g0,
                   const int      nv,
                   double        *g)
{
  const guint32 *bi[GRAM_TILE_ROWS];
  const guint32 *bj = panel + g0 * GRAM_GROUP;
  __m512 acc[GRAM_TILE_ROWS][4];

  for (guint q = 0; q < GRAM_TILE_ROWS; q++)
    {
      guint i = MIN (i0 + q, r - 1);
      bi[q] = panel + (i / 16) * GRAM_GROUP + i % 16;
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        acc[q][v] = _mm512_setzero_ps ();
    }
  for (gsize p = 0; p < pairs; p++)
    {
      __m512i c[4];
#pragma GCC unroll 4
      for (int v = 0; v < nv; v++)
        c[v] = _mm512_loadu_si512 (bj + v * GRAM_GROUP + p * 16);
#pragma GCC unroll 6
      for (guint q = 0; q < GRAM_TILE_ROWS; q++)
        {
          __m512i s = _mm512_set1_epi32 ((int) bi[q][p * 16]);
#pragma GCC unroll 4
          for (int v = 0; v < nv; v++)
            acc[q][v] = dot_bf16 (acc[q][v], s, c[v]);
        }
    }
  for (guint q = 0; q < GRAM_TILE_ROWS; q++)
    for (int v = 0; v < nv; v++)
      {
        LpV16 lanes;
        memcpy (&lanes, &acc[q][v], sizeof lanes);
        add_tile_row (g, r, i0 + q, 16 * (g0 + v), &lanes);
      }
}

/* What the next panel will pack: @rows runs of @bytes, @stride apart. The
 * source comes from memory once; fetching it while the current panel is
 * summed hides that, where packing it cold would wait on every line. */
typedef struct {
  const char *base;
  gsize stride;
  gsize bytes;
  guint rows;
} NextPanel;

LP_BF16_TARGET static void
blocked_panel_bf16 (const guint32   *panel,
                    gsize            pairs,
                    guint            r,
                    double          *g,
                    const NextPanel *next)
{
  /* the next panel's lines, spread evenly over this panel's tiles */
  gsize lines_per_row = (next->bytes + 63) / 64, lines = lines_per_row * next->rows, line = 0;
  gsize tiles = 0;

#define COUNT_TILE(i0, g0, nv) tiles++
  FOR_EACH_TILE (r, 4, COUNT_TILE, (void) 0);
#undef COUNT_TILE
  gsize quota = (lines + tiles - 1) / MAX (tiles, 1);

#define BF16_TILE(i0, g0, nv) blocked_tile_bf16 (panel, pairs, r, i0, g0, nv, g)
#define PREFETCH_SOME \
  for (gsize q = 0; q < quota && line < lines; q++, line++) \
    _mm_prefetch (next->base + (line / lines_per_row) * next->stride + (line % lines_per_row) * 64, _MM_HINT_T1)
  FOR_EACH_TILE (r, 4, BF16_TILE, PREFETCH_SOME);
#undef BF16_TILE
#undef PREFETCH_SOME
}

/* Packs values t0 … t0 + h of the @r rows of A (stride @ld) as pairs:
 * 16 rows by 16 pairs are loaded (each pair a 32-bit word) and transposed
 * in registers. Values past a row's end and rows past r are zero. */
LP_BF16_TARGET static void
pack_rows_bf16 (const guint16 *a,
                gsize          ld,
                guint          r,
                gsize          t0,
                gsize          h,
                guint32       *panel)
{
  guint groups = (r + 15) / 16;
  gsize pairs = (h + 1) / 2;

  for (guint gi = 0; gi < groups; gi++)
    {
      guint rows = MIN (16, r - 16 * gi);
      guint32 *dst = panel + gi * GRAM_GROUP;

      for (gsize q0 = 0; q0 < pairs; q0 += 16)
        {
          gsize count = MIN (32, h - 2 * q0);
          __mmask32 m = count == 32 ? (__mmask32) ~0u : (__mmask32) ((1u << count) - 1);
          LpV16 block[16];

          for (guint i = 0; i < 16; i++)
            {
              __m512i v = _mm512_maskz_loadu_epi16 (i < rows ? m : 0,
                                                    a + (16 * gi + MIN (i, rows - 1)) * ld + t0 + 2 * q0);
              memcpy (&block[i], &v, sizeof v);
            }
          transpose16 (block);   /* moves bits, whatever the lanes hold */
          memcpy (dst + q0 * 16, block, sizeof (guint32) * 16 * MIN (16, pairs - q0));
        }
    }
}

/* Packs rows t0 … t0 + h of B [n, r] as pairs of rows: word c of pair p
 * holds B[t0 + 2p][c] in its low half and B[t0 + 2p + 1][c] in its high
 * half (zero past the panel). */
LP_BF16_TARGET static void
pack_cols_bf16 (const guint16 *b,
                guint          r,
                gsize          t0,
                gsize          h,
                guint32       *panel)
{
  /* word k of the result: row 0's column k/2 (k even) or row 1's (k odd),
   * for the first 16 columns of the two rows, then for the next 16 */
  static const guint16 order[2][32] = {
    { 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47 },
    { 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63 },
  };
  const __m512i first = _mm512_loadu_si512 (order[0]);
  const __m512i second = _mm512_loadu_si512 (order[1]);
  guint groups = (r + 15) / 16;

  for (gsize p = 0; p < (h + 1) / 2; p++)
    {
      const guint16 *row0 = b + (t0 + 2 * p) * r;
      gboolean odd = 2 * p + 1 < h;

      for (guint c = 0; c < r; c += 32)
        {
          __mmask32 m = c + 32 <= r ? (__mmask32) ~0u : (__mmask32) ((1u << (r - c)) - 1);
          __m512i x0 = _mm512_maskz_loadu_epi16 (m, row0 + c);
          __m512i x1 = _mm512_maskz_loadu_epi16 (odd ? m : 0, row0 + r + c);
          guint gi = c / 16;
          _mm512_storeu_si512 (panel + gi * GRAM_GROUP + p * 16, _mm512_permutex2var_epi16 (x0, first, x1));
          if (gi + 1 < groups)
            _mm512_storeu_si512 (panel + (gi + 1) * GRAM_GROUP + p * 16,
                                 _mm512_permutex2var_epi16 (x0, second, x1));
        }
    }
}

LP_BF16_TARGET static void
gram_blocked_bf16 (const guint16 *x,
                   guint          r,
                   gsize          n,
                   gboolean       up,
                   double        *g,
                   guint32       *panel)
{
  const gsize step = 2 * GRAM_PANEL;

  for (gsize t0 = 0; t0 < n; t0 += step)
    {
      gsize h = MIN (step, n - t0);
      gsize next_h = t0 + step < n ? MIN (step, n - t0 - step) : 0;
      NextPanel next;

      if (up)
        {
          pack_cols_bf16 (x, r, t0, h, panel);
          /* rows of B, one after the other */
          next = (NextPanel) { (const char *) (x + (t0 + step) * r), 0, next_h * r * 2, next_h ? 1 : 0 };
        }
      else
        {
          pack_rows_bf16 (x, n, r, t0, h, panel);
          next = (NextPanel) { (const char *) (x + t0 + step), n * 2, next_h * 2, next_h ? r : 0 };
        }
      blocked_panel_bf16 (panel, (h + 1) / 2, r, g, &next);
    }
}
#endif

gboolean
lp_lora_have_bf16_dot (void)
{
#ifdef LP_HAVE_BF16_DOT
  static gsize result = 0;

  if (g_once_init_enter (&result))
    {
      /* LPIPE_NO_BF16_DOT lets the tests run the f32 kernels on bf16 too */
      gboolean ok = g_getenv ("LPIPE_NO_BF16_DOT") == NULL &&
                    __builtin_cpu_supports ("avx512bw") && __builtin_cpu_supports ("avx512vl") &&
                    __builtin_cpu_supports ("avx512bf16");
      g_once_init_leave (&result, ok ? 2 : 1);
    }
  return result == 2;
#else
  return FALSE;
#endif
}

gsize
lp_lora_gram_bf16_scratch_size (guint r)
{
  return sizeof (guint32) * ((r + 16 + 31) / 32 * 32) * ((BF16_COLS_BLOCK + 1) / 2);
}

void
lp_lora_gram_rows_bf16 (const guint16 *a,
                        guint          r,
                        gsize          n,
                        double        *g)
{
#ifdef LP_HAVE_BF16_DOT
  g_return_if_fail (lp_lora_have_bf16_dot ());
  gram_rows_bf16_avx512 (a, n, r, n, g);
#else
  g_return_if_reached ();
#endif
}

void
lp_lora_gram_cols_bf16 (const guint16 *b,
                        guint          r,
                        gsize          n,
                        double        *g,
                        gpointer       scratch)
{
#ifdef LP_HAVE_BF16_DOT
  g_return_if_fail (lp_lora_have_bf16_dot ());
  gram_cols_bf16_avx512 (b, r, n, g, scratch);
#else
  g_return_if_reached ();
#endif
}

void
lp_lora_gram_blocked_rows_bf16 (const guint16 *a,
                                guint          r,
                                gsize          n,
                                double        *g,
                                gpointer       scratch)
{
#ifdef LP_HAVE_BF16_DOT
  g_return_if_fail (lp_lora_have_bf16_dot ());
  if (r > 0)
    gram_blocked_bf16 (a, r, n, FALSE, g, (guint32 *) panel_of (scratch));
#else
  g_return_if_reached ();
#endif
}

void
lp_lora_gram_blocked_cols_bf16 (const guint16 *b,
                                guint          r,
                                gsize          n,
                                double        *g,
                                gpointer       scratch)
{
#ifdef LP_HAVE_BF16_DOT
  g_return_if_fail (lp_lora_have_bf16_dot ());
  if (r > 0)
    gram_blocked_bf16 (b, r, n, TRUE, g, (guint32 *) panel_of (scratch));
#else
  g_return_if_reached ();
#endif
}

/* ---- LoHa's Khatri–Rao factors ----------------------------------------- */

typedef float LpV8 __attribute__ ((vector_size (32)));

/* y = a · x over @n floats, 16 and 8 at a time. */
LP_INLINE void
scaled_copy (float a, const float *x, gsize n, float *y)
{
  gsize j = 0;

  for (; j + 16 <= n; j += 16)
    {
      LpV16 v;
      LOAD16 (v, x + j);
      v *= a;
      memcpy (y + j, &v, sizeof v);
    }
  for (; j + 8 <= n; j += 8)
    {
      LpV8 v;
      memcpy (&v, x + j, sizeof v);
      v *= a;
      memcpy (y + j, &v, sizeof v);
    }
  for (; j < n; j++)
    y[j] = a * x[j];
}

LP_INLINE void
lp_lora_face_split_rows_f32_body (const float *x1,
                                  guint        r1,
                                  const float *x2,
                                  guint        r2,
                                  gsize        h,
                                  float       *y)
{
  gsize R = (gsize) r1 * r2;

  for (gsize o = 0; o < h; o++)
    for (guint i = 0; i < r1; i++)
      scaled_copy (x1[o * r1 + i], x2 + o * r2, r2, y + o * R + (gsize) i * r2);
}

LP_INLINE void
lp_lora_hadamard_rows_f32_body (const float *v1,
                                guint        r1,
                                const float *v2,
                                guint        r2,
                                gsize        w,
                                float       *y,
                                gsize        ld)
{
  for (guint i = 0; i < r1; i++)
    for (guint j = 0; j < r2; j++)
      {
        const float *a = v1 + (gsize) i * w, *b = v2 + (gsize) j * w;
        float *row = y + ((gsize) i * r2 + j) * ld;
        gsize c = 0;

        for (; c + 16 <= w; c += 16)
          {
            LpV16 x, z;
            LOAD16 (x, a + c);
            LOAD16 (z, b + c);
            x *= z;
            memcpy (row + c, &x, sizeof x);
          }
        for (; c < w; c++)
          row[c] = a[c] * b[c];
      }
}

LP_DEFINE_VOID_KERNEL (lp_lora_face_split_rows_f32,
                       (const float *x1, guint r1, const float *x2, guint r2, gsize h, float *y),
                       (x1, r1, x2, r2, h, y))
LP_DEFINE_VOID_KERNEL (lp_lora_hadamard_rows_f32,
                       (const float *v1, guint r1, const float *v2, guint r2, gsize w, float *y, gsize ld),
                       (v1, r1, v2, r2, w, y, ld))

/* Y [h, k] = X M for X's rows the Khatri–Rao products x1[o] ⊗ x2[o], in
 * their structure: y[o] = Σ_i x1[o][i] · (Σ_j x2[o][j] · M[i·r2 + j]), so
 * the r1·r2 products are never formed. Eight rows at a time share each row
 * of M; per output vector that is r1·(r2 + 1) multiply-adds a row. */
LP_INLINE void
lp_lora_map_khatri_rao_f32_body (const float *x1,
                                 const float *x2,
                                 guint        r1,
                                 guint        r2,
                                 const float *m,
                                 guint        k,
                                 gsize        h,
                                 float       *y)
{
  gsize kp = (k + 15) / 16 * 16;

  for (gsize o0 = 0; o0 < h; o0 += 8)
    {
      guint rows = MIN (8, h - o0);
      /* one pointer for the eight rows: the compiler keeps the 16
       * accumulators in registers instead of spilling them for pointers */
      const float *b1 = x1 + o0 * 16, *b2 = x2 + o0 * 16;

      for (gsize v = 0; v < kp; v += 16)
        {
          LpV16 acc[8];
#pragma GCC unroll 8
          for (guint a = 0; a < 8; a++)
            acc[a] = (LpV16) { 0 };
          for (guint i = 0; i < r1; i++)
            {
              LpV16 z[8];
#pragma GCC unroll 8
              for (guint a = 0; a < 8; a++)
                z[a] = (LpV16) { 0 };
              for (guint j = 0; j < r2; j++)
                {
                  LpV16 mv;
                  LOAD16 (mv, m + ((gsize) i * r2 + j) * kp + v);
#pragma GCC unroll 8
                  for (guint a = 0; a < 8; a++)
                    z[a] += b2[a * 16 + j] * mv;
                }
#pragma GCC unroll 8
              for (guint a = 0; a < 8; a++)
                acc[a] += b1[a * 16 + i] * z[a];
            }
          guint cols = MIN (16, k - v);
          for (guint a = 0; a < rows; a++)
            memcpy (y + (o0 + a) * k + v, &acc[a], sizeof (float) * cols);
        }
    }
}

LP_DEFINE_VOID_KERNEL (lp_lora_map_khatri_rao_f32,
                       (const float *x1, const float *x2, guint r1, guint r2, const float *m, guint k, gsize h, float *y),
                       (x1, x2, r1, r2, m, k, h, y))

/* ---- NaN and infinity --------------------------------------------------- */

/* Tests the exponent bits (all ones: NaN or infinity) 64 bytes at a time:
 * the projection checks every value it reads, and a scalar or floating-point
 * test would cost as much as the projection itself. One body per width. */
#define ALL_FINITE_BODY(name, value_type, bits_type, exp_bits)                  \
LP_INLINE gboolean                                                              \
name##_body (const value_type *values,                                           \
             gsize             n)                                                \
{                                                                               \
  typedef bits_type Bits __attribute__ ((vector_size (64)));                    \
  const bits_type exp = (bits_type) (exp_bits);                                 \
  const gsize lanes = 64 / sizeof (bits_type);                                  \
  Bits acc = { 0 };                                                             \
  gsize i = 0;                                                                  \
                                                                                \
  for (; i + lanes <= n; i += lanes)                                            \
    {                                                                           \
      Bits u;                                                                   \
      memcpy (&u, values + i, sizeof u);                                        \
      acc |= (Bits) ((u & exp) == exp);                                         \
    }                                                                           \
  for (gsize j = 0; j < lanes; j++)                                             \
    if (acc[j])                                                                 \
      return FALSE;                                                             \
  for (; i < n; i++)                                                            \
    {                                                                           \
      bits_type u;                                                              \
      memcpy (&u, values + i, sizeof u);                                        \
      if ((u & exp) == exp)                                                     \
        return FALSE;                                                           \
    }                                                                           \
  return TRUE;                                                                  \
}

ALL_FINITE_BODY (lp_lora_all_finite_f32, float, guint32, 0x7f800000u)
ALL_FINITE_BODY (lp_lora_all_finite_f64, double, guint64, G_GUINT64_CONSTANT (0x7ff0000000000000))
ALL_FINITE_BODY (lp_lora_all_finite_bf16, guint16, guint16, 0x7f80u)
ALL_FINITE_BODY (lp_lora_all_finite_f16, guint16, guint16, 0x7c00u)

LP_DEFINE_KERNEL (gboolean, lp_lora_all_finite_f32, (const float *values, gsize n), (values, n))
LP_DEFINE_KERNEL (gboolean, lp_lora_all_finite_f64, (const double *values, gsize n), (values, n))

LP_DEFINE_KERNEL (gboolean, lp_lora_all_finite_bf16, (const guint16 *values, gsize n), (values, n))
LP_DEFINE_KERNEL (gboolean, lp_lora_all_finite_f16, (const guint16 *values, gsize n), (values, n))

/* ---- eigenvalues of a symmetric tridiagonal matrix, by bisection -------- */

typedef double LpV8d __attribute__ ((vector_size (64)));
typedef long long LpV8l __attribute__ ((vector_size (64)));

#define SELECT8(mask, a, b) ((LpV8d) (((LpV8l) (a) & (mask)) | ((LpV8l) (b) & ~(mask))))

/* Sturm counts of T − x for the 8 shifts of *x0 and of *x1, into *c0 and
 * *c1: the count of negative pivots of the LDLᵀ factorization is the
 * number of eigenvalues below x (dstebz's count, with its pivot floor: a
 * pivot smaller than pivmin in magnitude is taken as −pivmin). Each pivot
 * divides by the one before, so one chain of shifts waits on the divider;
 * two chains keep it busy. One function per x86-64 level, each compiled
 * for it: a vector comparison inlined from a baseline body into an AVX-512
 * function is split into scalar ones. */
typedef void (*SturmCounts) (const double *d, const double *e2, guint n, const LpV8d *x0,
                             const LpV8d *x1, double pivmin, LpV8l *c0, LpV8l *c1);

#define DEFINE_STURM_COUNTS(name, attributes) \
  attributes static void \
  name (const double *d, const double *e2, guint n, const LpV8d *x0, const LpV8d *x1, \
        double pivmin, LpV8l *c0, LpV8l *c1) \
  { \
    LpV8d pm = (LpV8d) { 0 } + pivmin, npm = -pm; \
    LpV8d q0 = d[0] - *x0, q1 = d[0] - *x1; \
    LpV8l n0 = { 0 }, n1 = { 0 }; \
    for (guint i = 0; ; ) \
      { \
        LpV8l s0 = (q0 < pm) & (q0 > npm), s1 = (q1 < pm) & (q1 > npm); \
        q0 = SELECT8 (s0, npm, q0); \
        q1 = SELECT8 (s1, npm, q1); \
        n0 -= (q0 < 0); \
        n1 -= (q1 < 0); \
        if (++i >= n) \
          break; \
        q0 = (d[i] - *x0) - e2[i - 1] / q0; \
        q1 = (d[i] - *x1) - e2[i - 1] / q1; \
      } \
    *c0 = n0; \
    *c1 = n1; \
  }

DEFINE_STURM_COUNTS (sturm_counts_base, )
#ifdef LP_X86_LEVELS
DEFINE_STURM_COUNTS (sturm_counts_v3, __attribute__ ((target ("arch=x86-64-v3"))))
DEFINE_STURM_COUNTS (sturm_counts_v4, __attribute__ ((target ("arch=x86-64-v4"))))
#endif

void
lp_lora_tridiagonal_eigenvalues (const double *d,
                                 const double *e,
                                 guint         n,
                                 guint         first,
                                 guint         m,
                                 double       *w)
{
  SturmCounts sturm_counts = sturm_counts_base;
  g_autofree double *e2 = NULL;
  double pivmin = 1, lo = G_MAXDOUBLE, hi = -G_MAXDOUBLE;

#ifdef LP_X86_LEVELS
  switch (kernel_level ())
    {
    case 4: sturm_counts = sturm_counts_v4; break;
    case 3: sturm_counts = sturm_counts_v3; break;
    default: break;
    }
#endif
  if (n == 0 || m == 0)
    return;
  e2 = g_new (double, n);
  for (guint i = 0; i + 1 < n; i++)
    {
      e2[i] = e[i] * e[i];
      pivmin = MAX (pivmin, e2[i]);
    }
  pivmin *= DBL_MIN;
  /* Gershgorin's interval, widened as dstebz widens it */
  for (guint i = 0; i < n; i++)
    {
      double radius = (i > 0 ? fabs (e[i - 1]) : 0) + (i + 1 < n ? fabs (e[i]) : 0);
      lo = MIN (lo, d[i] - radius);
      hi = MAX (hi, d[i] + radius);
    }
  double norm = MAX (fabs (lo), fabs (hi)), margin = 2 * norm * DBL_EPSILON * n + 4 * pivmin;
  double atol = DBL_EPSILON * norm;
  lo -= margin;
  hi += margin;

  for (guint b = 0; b < m; b += 16)
    {
      /* lane l looks for eigenvalue first + b + l (lanes past m repeat the
       * last): count (low) <= index < count (high) throughout */
      LpV8d low[2], high[2];
      LpV8l index[2];

      for (guint v = 0; v < 2; v++)
        for (guint l = 0; l < 8; l++)
          {
            low[v][l] = lo;
            high[v][l] = hi;
            index[v][l] = first + MIN (b + 8 * v + l, m - 1);
          }
      /* each step halves the intervals: from Gershgorin's width to the
       * tolerance below takes about 53, well under 200 */
      for (guint step = 0; step < 200; step++)
        {
          LpV8d mid0 = (low[0] + high[0]) * 0.5, mid1 = (low[1] + high[1]) * 0.5;
          LpV8l c0, c1;
          gboolean done = TRUE;

          sturm_counts (d, e2, n, &mid0, &mid1, pivmin, &c0, &c1);
          LpV8l below0 = c0 > index[0], below1 = c1 > index[1];
          high[0] = SELECT8 (below0, mid0, high[0]);
          low[0] = SELECT8 (below0, low[0], mid0);
          high[1] = SELECT8 (below1, mid1, high[1]);
          low[1] = SELECT8 (below1, low[1], mid1);
          /* converged as dstebz with abstol = 0 converges: narrower than
           * 2 ulp of the ends, ulp · ‖T‖ or the pivot floor, or no double
           * left between the ends */
          for (guint v = 0; v < 2 && done; v++)
            for (guint l = 0; l < 8; l++)
              {
                double a = low[v][l], z = high[v][l], c = 0.5 * (a + z);
                if (!(z - a <= MAX (MAX (2 * DBL_EPSILON * MAX (fabs (a), fabs (z)), atol), pivmin) ||
                      c == a || c == z))
                  {
                    done = FALSE;
                    break;
                  }
              }
          if (done)
            break;
        }
      for (guint l = 0; l < 16 && b + l < m; l++)
        w[b + l] = 0.5 * (low[l / 8][l % 8] + high[l / 8][l % 8]);
    }
}
