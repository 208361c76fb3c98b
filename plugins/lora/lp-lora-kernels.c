/* lp-lora-kernels.c: Gram matrices of factor blocks in f32 vectors
 *
 * Written with GCC vector extensions over 16 floats. On x86-64 each kernel is
 * compiled three times, for AVX-512, for AVX2 with FMA and for the baseline,
 * and the loader picks the one the machine runs (target_clones); elsewhere
 * the compiler lowers the vectors to what the target has.
 *
 * The products of 16-bit factors are exact in f32; what rounds is the
 * accumulation, over at most one block (a few hundred terms) before the sums
 * move into f64, so the Gram matrix is good to about 1e-6 of its norm.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-kernels.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
# define LP_KERNEL __attribute__ ((target_clones ("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
# define LP_KERNEL
#endif

#define LP_INLINE static inline __attribute__ ((always_inline))

/* The helpers below take and return 64-byte vectors; they are always inlined
 * into the kernels, so the ABI GCC warns about is never used. */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float LpV16 __attribute__ ((vector_size (64)));

LP_INLINE LpV16
load16 (const float *p)
{
  LpV16 v;
  memcpy (&v, p, sizeof v);
  return v;
}

/* Halving steps of a transposing sum: fold8 (x, y) holds 8 partial sums of
 * x then 8 of y; fold4 of two such vectors holds 4 partials of each of their
 * four sources, and so on, until lane i holds the whole sum of source i. */
LP_INLINE LpV16
fold8 (LpV16 x, LpV16 y)
{
  return __builtin_shufflevector (x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
       + __builtin_shufflevector (x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

LP_INLINE LpV16
fold4 (LpV16 x, LpV16 y)
{
  return __builtin_shufflevector (x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
       + __builtin_shufflevector (x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

LP_INLINE LpV16
fold2 (LpV16 x, LpV16 y)
{
  return __builtin_shufflevector (x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
       + __builtin_shufflevector (x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}

LP_INLINE LpV16
fold1 (LpV16 x, LpV16 y)
{
  return __builtin_shufflevector (x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
       + __builtin_shufflevector (x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Lane i of the result is the sum of the lanes of v[i]. */
LP_INLINE LpV16
sum16 (const LpV16 v[16])
{
  LpV16 a[8], b[4], c[2];

  for (int i = 0; i < 8; i++)
    a[i] = fold8 (v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; i++)
    b[i] = fold4 (a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 2; i++)
    c[i] = fold2 (b[2 * i], b[2 * i + 1]);
  return fold1 (c[0], c[1]);
}

/* Dot products of 4 rows with 4 rows, 16 columns at a time: 8 loads feed
 * 16 multiply-adds. Rows past @r repeat the last one; their sums are
 * dropped. */
LP_KERNEL void
lp_lora_gram_rows_f32 (const float *x,
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
        for (int k = 0; k < 16; k++)
          acc[k] = (LpV16) { 0 };

        for (gsize t = 0; t < w; t += 16)
          {
            LpV16 u0 = load16 (xi[0] + t), u1 = load16 (xi[1] + t);
            LpV16 u2 = load16 (xi[2] + t), u3 = load16 (xi[3] + t);
            LpV16 v0 = load16 (xj[0] + t), v1 = load16 (xj[1] + t);
            LpV16 v2 = load16 (xj[2] + t), v3 = load16 (xj[3] + t);

            acc[0] += u0 * v0;  acc[1] += u0 * v1;  acc[2] += u0 * v2;  acc[3] += u0 * v3;
            acc[4] += u1 * v0;  acc[5] += u1 * v1;  acc[6] += u1 * v2;  acc[7] += u1 * v3;
            acc[8] += u2 * v0;  acc[9] += u2 * v1;  acc[10] += u2 * v2; acc[11] += u2 * v3;
            acc[12] += u3 * v0; acc[13] += u3 * v1; acc[14] += u3 * v2; acc[15] += u3 * v3;
          }

        LpV16 sums = sum16 (acc);
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
      LpV16 c0 = load16 (row + j0);
      LpV16 c1 = nv > 1 ? load16 (row + j0 + 16) : (LpV16) { 0 };

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

LP_KERNEL void
lp_lora_gram_cols_f32 (const float *y,
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
