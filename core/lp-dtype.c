/* lp-dtype.c: safetensors element types and conversions
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Every conversion rounds to nearest, ties to even, straight from the
 * source's exact value: f32 and f16/bf16/f8 values are all exactly
 * representable in f64, so narrowing from either f32 or f64 goes through one
 * encoder working on the f64 bits and never rounds twice. Only the hot
 * pairs (bf16 <-> f32, f16 <-> f32) have their own loops.
 *
 * Special values: ±0 and subnormals are kept as far as the target can hold
 * them; NaN stays NaN (quiet, sign kept); a finite value too large for the
 * target becomes ±inf where the target has infinities (F16, BF16, F8_E5M2)
 * and NaN where it has none (F8_E4M3, as torch's float8_e4m3fn does: it does
 * not saturate). The from_* functions count those overflows so that callers
 * can tell the user.
 */

#include <math.h>
#include <string.h>

#include "lpipe/lp-dtype.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LP_HAVE_F16C_PATH 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static const char * const dtype_names[LP_DTYPE_N_TYPES] = {
  [LP_DTYPE_BOOL] = "BOOL",
  [LP_DTYPE_U8] = "U8",
  [LP_DTYPE_I8] = "I8",
  [LP_DTYPE_F8_E5M2] = "F8_E5M2",
  [LP_DTYPE_F8_E4M3] = "F8_E4M3",
  [LP_DTYPE_F8_E8M0] = "F8_E8M0",
  [LP_DTYPE_F8_E4M3FNUZ] = "F8_E4M3FNUZ",
  [LP_DTYPE_F8_E5M2FNUZ] = "F8_E5M2FNUZ",
  [LP_DTYPE_I16] = "I16",
  [LP_DTYPE_U16] = "U16",
  [LP_DTYPE_F16] = "F16",
  [LP_DTYPE_BF16] = "BF16",
  [LP_DTYPE_I32] = "I32",
  [LP_DTYPE_U32] = "U32",
  [LP_DTYPE_F32] = "F32",
  [LP_DTYPE_C64] = "C64",
  [LP_DTYPE_F64] = "F64",
  [LP_DTYPE_I64] = "I64",
  [LP_DTYPE_U64] = "U64",
  [LP_DTYPE_F4] = "F4",
  [LP_DTYPE_F6_E2M3] = "F6_E2M3",
  [LP_DTYPE_F6_E3M2] = "F6_E3M2",
};

static const guint8 dtype_bits[LP_DTYPE_N_TYPES] = {
  [LP_DTYPE_BOOL] = 8,
  [LP_DTYPE_U8] = 8,
  [LP_DTYPE_I8] = 8,
  [LP_DTYPE_F8_E5M2] = 8,
  [LP_DTYPE_F8_E4M3] = 8,
  [LP_DTYPE_F8_E8M0] = 8,
  [LP_DTYPE_F8_E4M3FNUZ] = 8,
  [LP_DTYPE_F8_E5M2FNUZ] = 8,
  [LP_DTYPE_I16] = 16,
  [LP_DTYPE_U16] = 16,
  [LP_DTYPE_F16] = 16,
  [LP_DTYPE_BF16] = 16,
  [LP_DTYPE_I32] = 32,
  [LP_DTYPE_U32] = 32,
  [LP_DTYPE_F32] = 32,
  [LP_DTYPE_C64] = 64,
  [LP_DTYPE_F64] = 64,
  [LP_DTYPE_I64] = 64,
  [LP_DTYPE_U64] = 64,
  [LP_DTYPE_F4] = 4,
  [LP_DTYPE_F6_E2M3] = 6,
  [LP_DTYPE_F6_E3M2] = 6,
};

/**
 * lp_dtype_from_string:
 * @name: a safetensors dtype name, such as "BF16"
 * @dtype: (out): return location for the dtype
 *
 * Looks up a dtype by its name in the safetensors header. Names are
 * case-sensitive, as in the format; the command line uses the lowercase
 * nicks of the #LpDtype enum type instead.
 *
 * Returns: %TRUE if @name is one of the 22 dtype names
 */
gboolean
lp_dtype_from_string (const char *name,
                      LpDtype    *dtype)
{
  g_return_val_if_fail (name != NULL, FALSE);

  for (guint i = 0; i < LP_DTYPE_N_TYPES; i++)
    {
      if (strcmp (name, dtype_names[i]) == 0)
        {
          if (dtype != NULL)
            *dtype = (LpDtype) i;
          return TRUE;
        }
    }
  return FALSE;
}

/* What people type for a dtype, beyond the safetensors names and the enum
 * nicks: torch's names (`torch.float16`), and the spellings of kohya
 * sd-scripts' str_to_dtype() (library/utils.py) and --save_precision, which
 * ComfyUI's and diffusers' users share. */
static const struct {
  const char *spelling;
  LpDtype dtype;
} dtype_spellings[] = {
  { "float64", LP_DTYPE_F64 }, { "double", LP_DTYPE_F64 }, { "fp64", LP_DTYPE_F64 },
  { "float32", LP_DTYPE_F32 }, { "float", LP_DTYPE_F32 }, { "fp32", LP_DTYPE_F32 },
  { "single", LP_DTYPE_F32 },
  { "float16", LP_DTYPE_F16 }, { "half", LP_DTYPE_F16 }, { "fp16", LP_DTYPE_F16 },
  { "bfloat16", LP_DTYPE_BF16 },
  /* kohya: "fp8" alone means e4m3fn */
  { "fp8", LP_DTYPE_F8_E4M3 }, { "float8", LP_DTYPE_F8_E4M3 },
  { "fp8_e4m3fn", LP_DTYPE_F8_E4M3 }, { "e4m3fn", LP_DTYPE_F8_E4M3 }, { "float8_e4m3fn", LP_DTYPE_F8_E4M3 },
  { "fp8_e5m2", LP_DTYPE_F8_E5M2 }, { "e5m2", LP_DTYPE_F8_E5M2 }, { "float8_e5m2", LP_DTYPE_F8_E5M2 },
  { "fp8_e4m3fnuz", LP_DTYPE_F8_E4M3FNUZ }, { "e4m3fnuz", LP_DTYPE_F8_E4M3FNUZ },
  { "float8_e4m3fnuz", LP_DTYPE_F8_E4M3FNUZ },
  { "fp8_e5m2fnuz", LP_DTYPE_F8_E5M2FNUZ }, { "e5m2fnuz", LP_DTYPE_F8_E5M2FNUZ },
  { "float8_e5m2fnuz", LP_DTYPE_F8_E5M2FNUZ },
  { "float8_e8m0fnu", LP_DTYPE_F8_E8M0 },
  { "bool", LP_DTYPE_BOOL },
  { "uint8", LP_DTYPE_U8 }, { "int8", LP_DTYPE_I8 }, { "int16", LP_DTYPE_I16 }, { "uint16", LP_DTYPE_U16 },
  { "short", LP_DTYPE_I16 }, { "int32", LP_DTYPE_I32 }, { "int", LP_DTYPE_I32 }, { "uint32", LP_DTYPE_U32 },
  { "int64", LP_DTYPE_I64 }, { "long", LP_DTYPE_I64 }, { "uint64", LP_DTYPE_U64 },
  { "complex64", LP_DTYPE_C64 }, { "cfloat", LP_DTYPE_C64 },
};

/**
 * lp_dtype_parse:
 * @text: a dtype as a person writes it
 * @dtype: (out) (optional): return location for the dtype
 *
 * Reads a dtype the way users type it, in any case: the safetensors name
 * (`BF16`), the #LpDtype nick (`bf16`, `f8-e4m3`, or with `_`), torch's
 * name with or without `torch.` (`float16`, `half`, `bfloat16`, `float`,
 * `double`, `float8_e4m3fn`) and kohya's spellings (`fp16`, `fp32`, `fp8`).
 * Property values of dtype enums are read through it.
 *
 * Returns: %TRUE if @text names a dtype
 */
gboolean
lp_dtype_parse (const char *text,
                LpDtype    *dtype)
{
  g_autofree char *word = NULL;

  g_return_val_if_fail (text != NULL, FALSE);

  if (g_ascii_strncasecmp (text, "torch.", 6) == 0)
    text += 6;
  /* safetensors names and nicks differ only in case and '-' for '_' */
  word = g_ascii_strup (text, -1);
  g_strdelimit (word, "-", '_');
  if (lp_dtype_from_string (word, dtype))
    return TRUE;
  for (guint i = 0; i < G_N_ELEMENTS (dtype_spellings); i++)
    {
      if (g_ascii_strcasecmp (word, dtype_spellings[i].spelling) == 0)
        {
          if (dtype != NULL)
            *dtype = dtype_spellings[i].dtype;
          return TRUE;
        }
    }
  return FALSE;
}

/**
 * lp_dtype_to_string:
 * @dtype: a dtype
 *
 * Returns: (transfer none): the dtype's safetensors name, such as "BF16"
 */
const char *
lp_dtype_to_string (LpDtype dtype)
{
  g_return_val_if_fail ((guint) dtype < LP_DTYPE_N_TYPES, NULL);
  return dtype_names[dtype];
}

/**
 * lp_dtype_get_bits:
 * @dtype: a dtype
 *
 * Returns: the size of one element in bits (4 and 6 for the sub-byte floats,
 *   64 for C64, 8 for BOOL)
 */
guint
lp_dtype_get_bits (LpDtype dtype)
{
  g_return_val_if_fail ((guint) dtype < LP_DTYPE_N_TYPES, 0);
  return dtype_bits[dtype];
}

/**
 * lp_dtype_is_float:
 * @dtype: a dtype
 *
 * Tells whether @dtype holds real floating point numbers, whether or not
 * lpipe converts it. C64 is complex and counts as not a float: stages that
 * compute on floats carry it through untouched.
 *
 * Returns: %TRUE for the real floating point dtypes
 */
gboolean
lp_dtype_is_float (LpDtype dtype)
{
  switch (dtype)
    {
    case LP_DTYPE_F8_E5M2:
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E8M0:
    case LP_DTYPE_F8_E4M3FNUZ:
    case LP_DTYPE_F8_E5M2FNUZ:
    case LP_DTYPE_F16:
    case LP_DTYPE_BF16:
    case LP_DTYPE_F32:
    case LP_DTYPE_F64:
    case LP_DTYPE_F4:
    case LP_DTYPE_F6_E2M3:
    case LP_DTYPE_F6_E3M2:
      return TRUE;
    default:
      return FALSE;
    }
}

/**
 * lp_dtype_can_convert:
 * @dtype: a dtype
 *
 * Tells whether lp_dtype_to_f32(), lp_dtype_from_f32() and friends accept
 * @dtype, which holds for F64, F32, F16, BF16, F8_E4M3 and F8_E5M2.
 *
 * Returns: %TRUE if values of @dtype convert to and from f32 and f64
 */
gboolean
lp_dtype_can_convert (LpDtype dtype)
{
  switch (dtype)
    {
    case LP_DTYPE_F64:
    case LP_DTYPE_F32:
    case LP_DTYPE_F16:
    case LP_DTYPE_BF16:
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E5M2:
      return TRUE;
    default:
      return FALSE;
    }
}

/* The narrow formats, described once for the generic encoder and decoder. */
typedef struct {
  guint exp_bits;
  guint man_bits;
  gint bias;
  gboolean has_inf;     /* IEEE-like: all-ones exponent is inf/NaN */
  guint32 max_finite;   /* largest finite code, sign bit clear */
  guint32 nan;          /* the quiet NaN code, sign bit clear */
} LpFloatFormat;

static const LpFloatFormat fmt_f16 = { 5, 10, 15, TRUE, 0x7bff, 0x7e00 };
static const LpFloatFormat fmt_bf16 = { 8, 7, 127, TRUE, 0x7f7f, 0x7fc0 };
static const LpFloatFormat fmt_e5m2 = { 5, 2, 15, TRUE, 0x7b, 0x7e };
/* E4M3FN: no infinities, S.1111.111 is the only NaN, max 448. */
static const LpFloatFormat fmt_e4m3 = { 4, 3, 7, FALSE, 0x7e, 0x7f };

static const LpFloatFormat *
format_for (LpDtype dtype)
{
  switch (dtype)
    {
    case LP_DTYPE_F16:
      return &fmt_f16;
    case LP_DTYPE_BF16:
      return &fmt_bf16;
    case LP_DTYPE_F8_E5M2:
      return &fmt_e5m2;
    case LP_DTYPE_F8_E4M3:
      return &fmt_e4m3;
    default:
      g_assert_not_reached ();
    }
}

static inline guint64
f64_bits (double x)
{
  guint64 u;
  memcpy (&u, &x, sizeof u);
  return u;
}

static inline guint32
f32_bits (float x)
{
  guint32 u;
  memcpy (&u, &x, sizeof u);
  return u;
}

static inline float
f32_from_bits (guint32 u)
{
  float x;
  memcpy (&x, &u, sizeof x);
  return x;
}

/* Rounds the exact value @x to @fmt, ties to even, and sets *overflow when a
 * finite @x became inf or NaN. */
static inline guint32
encode_f64 (const LpFloatFormat *fmt,
            double               x,
            gsize               *overflow)
{
  guint64 u = f64_bits (x);
  guint32 sign = (guint32) (u >> 63) << (fmt->exp_bits + fmt->man_bits);
  guint32 biased = (u >> 52) & 0x7ff;
  guint64 frac = u & G_GUINT64_CONSTANT (0xfffffffffffff);
  guint32 inf = ((1u << fmt->exp_bits) - 1) << fmt->man_bits;

  if (biased == 0x7ff)
    {
      if (frac != 0)
        {
          /* Keep the payload's top bits like the hardware does; the
           * quiet bit makes the result a NaN even when they are zero. */
          if (fmt->has_inf)
            return sign | fmt->nan | (guint32) (frac >> (52 - fmt->man_bits));
          return sign | fmt->nan;
        }
      return sign | (fmt->has_inf ? inf : fmt->nan);
    }

  gint emin = 1 - fmt->bias;
  gint e;
  guint64 m;
  if (biased == 0)
    {
      /* f64 subnormals are far below half of any target's smallest
       * subnormal; they round to zero like the rest of the tiny values */
      e = -1022;
      m = frac;
    }
  else
    {
      e = (gint) biased - 1023;
      m = frac | (G_GUINT64_CONSTANT (1) << 52);
    }

  guint shift = 52 - fmt->man_bits + (e < emin ? (guint) (emin - e) : 0);
  guint64 q;
  if (shift > 60)
    q = 0;   /* m < 2^53 is below half an ulp of 2^61 */
  else
    {
      guint64 rem = m & ((G_GUINT64_CONSTANT (1) << shift) - 1);
      guint64 half = G_GUINT64_CONSTANT (1) << (shift - 1);
      q = m >> shift;
      if (rem > half || (rem == half && (q & 1)))
        q++;
    }

  guint64 code;
  if (e >= emin)
    /* q = 2^M + f; a carry out of the mantissa bumps the exponent */
    code = ((guint64) (e + fmt->bias - 1) << fmt->man_bits) + q;
  else
    /* subnormal; q == 2^M becomes the smallest normal by itself */
    code = q;

  if (code > fmt->max_finite)
    {
      (*overflow)++;
      return sign | (fmt->has_inf ? inf : fmt->nan);
    }
  return sign | (guint32) code;
}

static double
decode_f64 (const LpFloatFormat *fmt,
            guint32              code)
{
  guint32 sign_bit = 1u << (fmt->exp_bits + fmt->man_bits);
  guint32 mag = code & (sign_bit - 1);
  guint32 exp_all = (1u << fmt->exp_bits) - 1;
  guint32 be = mag >> fmt->man_bits;
  guint32 f = mag & ((1u << fmt->man_bits) - 1);
  double v;

  if (fmt->has_inf && be == exp_all)
    v = f == 0 ? INFINITY : NAN;
  else if (!fmt->has_inf && mag > fmt->max_finite)
    v = NAN;
  else if (be == 0)
    v = ldexp ((double) f, 1 - fmt->bias - (gint) fmt->man_bits);
  else
    v = ldexp ((double) (f | (1u << fmt->man_bits)), (gint) be - fmt->bias - (gint) fmt->man_bits);

  return (code & sign_bit) ? -v : v;
}

/* The 256 values of each 8-bit format, filled once. */
static float f8_e4m3_table[256];
static float f8_e5m2_table[256];

static void
init_f8_tables (void)
{
  static gsize done = 0;

  if (g_once_init_enter (&done))
    {
      for (guint i = 0; i < 256; i++)
        {
          f8_e4m3_table[i] = (float) decode_f64 (&fmt_e4m3, i);
          f8_e5m2_table[i] = (float) decode_f64 (&fmt_e5m2, i);
        }
      g_once_init_leave (&done, 1);
    }
}

/* f16 <-> f32, portable: the same encoder as the other formats, and an exact
 * bit decoder. */
static void
f16_to_f32_soft (const guint16 *src,
                 float         *dst,
                 gsize          n)
{
  for (gsize i = 0; i < n; i++)
    {
      guint32 h = src[i];
      guint32 sign = (h & 0x8000u) << 16;
      guint32 e = (h >> 10) & 0x1f;
      guint32 f = h & 0x3ff;
      guint32 out;

      if (e == 0x1f)
        out = sign | 0x7f800000u | (f << 13);
      else if (e != 0)
        out = sign | ((e + 112) << 23) | (f << 13);
      else if (f == 0)
        out = sign;
      else
        {
          /* subnormal: exact in f32, so plain arithmetic is fine */
          float v = (float) f * 0x1p-24f;
          out = sign | f32_bits (v);
        }
      dst[i] = f32_from_bits (out);
    }
}

static gsize
f16_from_f32_soft (const float *src,
                   guint16     *dst,
                   gsize        n)
{
  gsize overflow = 0;

  for (gsize i = 0; i < n; i++)
    dst[i] = (guint16) encode_f64 (&fmt_f16, src[i], &overflow);
  return overflow;
}

#ifdef LP_HAVE_F16C_PATH
__attribute__((target ("avx,f16c")))
static void
f16_to_f32_f16c (const guint16 *src,
                 float         *dst,
                 gsize          n)
{
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m128i h = _mm_loadu_si128 ((const __m128i *) (src + i));
      _mm256_storeu_ps (dst + i, _mm256_cvtph_ps (h));
    }
  if (i < n)
    f16_to_f32_soft (src + i, dst + i, n - i);
}

__attribute__((target ("avx,f16c")))
static gsize
f16_from_f32_f16c (const float *src,
                   guint16     *dst,
                   gsize        n)
{
  const __m256 sign_mask = _mm256_set1_ps (-0.0f);
  const __m256 limit = _mm256_set1_ps (65520.0f);   /* rounds to inf from here on */
  const __m256 inf = _mm256_set1_ps (INFINITY);
  gsize overflow = 0;
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m256 x = _mm256_loadu_ps (src + i);
      __m256 a = _mm256_andnot_ps (sign_mask, x);
      __m256 over = _mm256_and_ps (_mm256_cmp_ps (a, limit, _CMP_GE_OQ),
                                   _mm256_cmp_ps (a, inf, _CMP_LT_OQ));
      __m128i h = _mm256_cvtps_ph (x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);

      _mm_storeu_si128 ((__m128i *) (dst + i), h);
      overflow += (gsize) __builtin_popcount ((unsigned) _mm256_movemask_ps (over));
    }
  if (i < n)
    overflow += f16_from_f32_soft (src + i, dst + i, n - i);
  return overflow;
}

/* F16C straight from CPUID (leaf 1, ECX bit 29): clang has no "f16c" for
 * __builtin_cpu_supports, and "avx" there already covers the OS saving the
 * YMM registers. */
static gboolean
cpu_has_f16c_bit (void)
{
  unsigned int eax, ebx, ecx, edx;

  if (!__get_cpuid (1, &eax, &ebx, &ecx, &edx))
    return FALSE;
  return (ecx & bit_F16C) != 0;
}

static gboolean
have_f16c (void)
{
  static gsize result = 0;

  if (g_once_init_enter (&result))
    {
      __builtin_cpu_init ();
      gsize ok = (__builtin_cpu_supports ("avx") && cpu_has_f16c_bit ()) ? 2 : 1;
      /* LPIPE_NO_F16C lets the tests exercise the portable routines too */
      if (g_getenv ("LPIPE_NO_F16C") != NULL)
        ok = 1;
      g_once_init_leave (&result, ok);
    }
  return result == 2;
}

/* bf16 -> f16 is the checkpoint-shrinking cast people run on whole models:
 * widen (a shift) and round in registers, without the f32 chunk. */
__attribute__((target ("avx2,f16c")))
static gsize
bf16_to_f16_avx2 (const guint16 *src,
                  guint16       *dst,
                  gsize          n)
{
  const __m256 sign_mask = _mm256_set1_ps (-0.0f);
  const __m256 limit = _mm256_set1_ps (65520.0f);
  const __m256 inf = _mm256_set1_ps (INFINITY);
  gsize overflow = 0;
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m128i b = _mm_loadu_si128 ((const __m128i *) (src + i));
      __m256 x = _mm256_castsi256_ps (_mm256_slli_epi32 (_mm256_cvtepu16_epi32 (b), 16));
      __m256 a = _mm256_andnot_ps (sign_mask, x);
      __m256 over = _mm256_and_ps (_mm256_cmp_ps (a, limit, _CMP_GE_OQ),
                                   _mm256_cmp_ps (a, inf, _CMP_LT_OQ));

      _mm_storeu_si128 ((__m128i *) (dst + i),
                        _mm256_cvtps_ph (x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      overflow += (gsize) __builtin_popcount ((unsigned) _mm256_movemask_ps (over));
    }
  for (; i < n; i++)
    {
      float f = f32_from_bits ((guint32) src[i] << 16);
      overflow += f16_from_f32_f16c (&f, dst + i, 1);
    }
  return overflow;
}

/* bf16 is the dtype LoRA factors come in, and the rank stages widen every
 * value of a checkpoint and round their (smaller) results back: AVX2 loops
 * for those three, exact like the portable ones. */
__attribute__((target ("avx2")))
static void
bf16_to_f32_avx2 (const guint16 *src,
                  float         *dst,
                  gsize          n)
{
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m128i b = _mm_loadu_si128 ((const __m128i *) (src + i));
      _mm256_storeu_si256 ((__m256i *) (dst + i), _mm256_slli_epi32 (_mm256_cvtepu16_epi32 (b), 16));
    }
  for (; i < n; i++)
    dst[i] = f32_from_bits ((guint32) src[i] << 16);
}

__attribute__((target ("avx2")))
static void
bf16_to_f64_avx2 (const guint16 *src,
                  double        *dst,
                  gsize          n)
{
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m128i b = _mm_loadu_si128 ((const __m128i *) (src + i));
      __m256 x = _mm256_castsi256_ps (_mm256_slli_epi32 (_mm256_cvtepu16_epi32 (b), 16));
      _mm256_storeu_pd (dst + i, _mm256_cvtps_pd (_mm256_castps256_ps128 (x)));
      _mm256_storeu_pd (dst + i + 4, _mm256_cvtps_pd (_mm256_extractf128_ps (x, 1)));
    }
  for (; i < n; i++)
    dst[i] = f32_from_bits ((guint32) src[i] << 16);
}

/* f64 -> bf16 in one rounding. Zeros and values whose result is a normal
 * bf16 below 2^127 (so no overflow) are rounded on the bits: the 52-bit
 * mantissa loses 45 bits, ties to even, a carry bumps the exponent, and the
 * exponent is rebiased by 1023 - 127. Anything else (tiny, huge, inf, NaN)
 * takes encode_f64() four values at a time. */
__attribute__((target ("avx2")))
static gsize
bf16_from_f64_avx2 (const double *src,
                    guint16      *dst,
                    gsize         n)
{
  const __m256i abs_mask = _mm256_set1_epi64x (G_GINT64_CONSTANT (0x7fffffffffffffff));
  const __m256i lo = _mm256_set1_epi64x ((gint64) 897 << 52);       /* 2^-126 */
  const __m256i hi = _mm256_set1_epi64x ((gint64) 1150 << 52);      /* 2^127 */
  const __m256i round = _mm256_set1_epi64x ((G_GINT64_CONSTANT (1) << 44) - 1);
  const __m256i one = _mm256_set1_epi64x (1);
  const __m256i rebias = _mm256_set1_epi64x ((gint64) (1023 - 127) << 7);
  const __m256i zero = _mm256_setzero_si256 ();
  const __m256i pick = _mm256_setr_epi32 (0, 2, 4, 6, 0, 2, 4, 6);
  gsize overflow = 0;
  gsize i = 0;

  for (; i + 4 <= n; i += 4)
    {
      __m256i u = _mm256_loadu_si256 ((const __m256i *) (src + i));
      __m256i a = _mm256_and_si256 (u, abs_mask);
      /* lo <= a < hi, as signed compares (a has no sign bit) */
      __m256i normal = _mm256_andnot_si256 (_mm256_cmpgt_epi64 (lo, a), _mm256_cmpgt_epi64 (hi, a));
      __m256i is_zero = _mm256_cmpeq_epi64 (a, zero);

      if (_mm256_movemask_pd (_mm256_castsi256_pd (_mm256_or_si256 (normal, is_zero))) != 0xf)
        {
          for (gsize j = i; j < i + 4; j++)
            dst[j] = (guint16) encode_f64 (&fmt_bf16, src[j], &overflow);
          continue;
        }
      __m256i odd = _mm256_and_si256 (_mm256_srli_epi64 (a, 45), one);
      __m256i m = _mm256_srli_epi64 (_mm256_add_epi64 (_mm256_add_epi64 (a, round), odd), 45);
      m = _mm256_and_si256 (_mm256_sub_epi64 (m, rebias), normal);   /* zeros stay 0 */
      m = _mm256_or_si256 (m, _mm256_slli_epi64 (_mm256_srli_epi64 (u, 63), 15));
      __m128i r32 = _mm256_castsi256_si128 (_mm256_permutevar8x32_epi32 (m, pick));
      _mm_storel_epi64 ((__m128i *) (dst + i), _mm_packus_epi32 (r32, r32));
    }
  for (; i < n; i++)
    dst[i] = (guint16) encode_f64 (&fmt_bf16, src[i], &overflow);
  return overflow;
}

static gboolean
have_avx2 (void)
{
  static gsize result = 0;

  if (g_once_init_enter (&result))
    {
      __builtin_cpu_init ();
      gsize ok = __builtin_cpu_supports ("avx2") ? 2 : 1;
      /* LPIPE_NO_F16C also turns these off: one switch for the portable routines */
      if (g_getenv ("LPIPE_NO_F16C") != NULL)
        ok = 1;
      g_once_init_leave (&result, ok);
    }
  return result == 2;
}

static gboolean
have_avx2_f16c (void)
{
  static gsize result = 0;

  if (g_once_init_enter (&result))
    {
      gsize ok = (have_f16c () && __builtin_cpu_supports ("avx2")) ? 2 : 1;
      g_once_init_leave (&result, ok);
    }
  return result == 2;
}
#endif

static void
f16_to_f32 (const guint16 *src,
            float         *dst,
            gsize          n)
{
#ifdef LP_HAVE_F16C_PATH
  if (have_f16c ())
    {
      f16_to_f32_f16c (src, dst, n);
      return;
    }
#endif
  f16_to_f32_soft (src, dst, n);
}

static gsize
f16_from_f32 (const float *src,
              guint16     *dst,
              gsize        n)
{
#ifdef LP_HAVE_F16C_PATH
  if (have_f16c ())
    return f16_from_f32_f16c (src, dst, n);
#endif
  return f16_from_f32_soft (src, dst, n);
}

static void
bf16_to_f32 (const guint16 *src,
             float         *dst,
             gsize          n)
{
  guint32 *out = (guint32 *) dst;

#ifdef LP_HAVE_F16C_PATH
  if (have_avx2 ())
    {
      bf16_to_f32_avx2 (src, dst, n);
      return;
    }
#endif

  for (gsize i = 0; i < n; i++)
    out[i] = (guint32) src[i] << 16;
}

#ifdef LP_HAVE_F16C_PATH
/* bf16_from_f32() below, eight at a time. */
__attribute__((target ("avx2")))
static gsize
bf16_from_f32_avx2 (const float *src,
                    guint16     *dst,
                    gsize        n)
{
  const __m256i abs_mask = _mm256_set1_epi32 (0x7fffffff);
  const __m256i exp_mask = _mm256_set1_epi32 (0x7f800000);
  const __m256i half = _mm256_set1_epi32 (0x7fff);
  const __m256i one = _mm256_set1_epi32 (1);
  const __m256i quiet = _mm256_set1_epi32 (0x40);
  const __m256i inf16 = _mm256_set1_epi32 (0x7f80);
  gsize overflow = 0;
  gsize i = 0;

  for (; i + 8 <= n; i += 8)
    {
      __m256i u = _mm256_loadu_si256 ((const __m256i *) (src + i));
      __m256i top = _mm256_srli_epi32 (u, 16);
      __m256i nan = _mm256_cmpgt_epi32 (_mm256_and_si256 (u, abs_mask), exp_mask);
      __m256i rounded = _mm256_srli_epi32 (_mm256_add_epi32 (_mm256_add_epi32 (u, half),
                                                             _mm256_and_si256 (top, one)), 16);
      __m256i r = _mm256_blendv_epi8 (rounded, _mm256_or_si256 (top, quiet), nan);
      __m256i to_inf = _mm256_cmpeq_epi32 (_mm256_and_si256 (rounded, half), inf16);
      __m256i was_special = _mm256_cmpeq_epi32 (_mm256_and_si256 (u, exp_mask), exp_mask);
      __m256i over = _mm256_andnot_si256 (_mm256_or_si256 (nan, was_special), to_inf);
      __m256i packed = _mm256_permute4x64_epi64 (_mm256_packus_epi32 (r, r), 0xd8);

      _mm_storeu_si128 ((__m128i *) (dst + i), _mm256_castsi256_si128 (packed));
      overflow += (gsize) __builtin_popcount ((unsigned) _mm256_movemask_ps (_mm256_castsi256_ps (over)));
    }
  return overflow;
}
#endif

static gsize
bf16_from_f32 (const float *src,
               guint16     *dst,
               gsize        n)
{
  const guint32 *in = (const guint32 *) src;
  gsize overflow = 0;
  gsize start = 0;

#ifdef LP_HAVE_F16C_PATH
  if (have_avx2 ())
    {
      start = n / 8 * 8;
      overflow = bf16_from_f32_avx2 (src, dst, start);
    }
#endif
  for (gsize i = start; i < n; i++)
    {
      guint32 u = in[i];
      guint32 r;

      if ((u & 0x7fffffffu) > 0x7f800000u)
        r = (u >> 16) | 0x40;   /* quiet NaN, sign and top payload kept */
      else
        {
          /* adding 0x7fff plus the kept part's low bit rounds to nearest
           * even; a carry into the exponent is the correct result,
           * including overflow to inf */
          r = (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
          overflow += ((r & 0x7fff) == 0x7f80) & ((u & 0x7f800000u) != 0x7f800000u);
        }
      dst[i] = (guint16) r;
    }
  return overflow;
}

/**
 * lp_dtype_to_f32:
 * @dtype: a dtype for which lp_dtype_can_convert() is %TRUE
 * @src: (array) (element-type guint8): @n elements of @dtype
 * @dst: (array length=n): room for @n floats
 * @n: the number of elements
 *
 * Widens @n values to f32. Exact for every dtype but F64, which is rounded
 * to nearest even (overflowing to ±inf).
 */
void
lp_dtype_to_f32 (LpDtype        dtype,
                 gconstpointer  src,
                 float         *dst,
                 gsize          n)
{
  g_return_if_fail (lp_dtype_can_convert (dtype));
  g_return_if_fail (n == 0 || (src != NULL && dst != NULL));

  switch (dtype)
    {
    case LP_DTYPE_F32:
      memmove (dst, src, n * sizeof (float));
      break;
    case LP_DTYPE_F64:
      for (gsize i = 0; i < n; i++)
        dst[i] = (float) ((const double *) src)[i];
      break;
    case LP_DTYPE_F16:
      f16_to_f32 (src, dst, n);
      break;
    case LP_DTYPE_BF16:
      bf16_to_f32 (src, dst, n);
      break;
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E5M2:
      {
        const guint8 *in = src;
        init_f8_tables ();
        const float *table = dtype == LP_DTYPE_F8_E4M3 ? f8_e4m3_table : f8_e5m2_table;
        for (gsize i = 0; i < n; i++)
          dst[i] = table[in[i]];
      }
      break;
    default:
      g_assert_not_reached ();
    }
}

/**
 * lp_dtype_from_f32:
 * @dtype: a dtype for which lp_dtype_can_convert() is %TRUE
 * @src: (array length=n): @n floats
 * @dst: (array) (element-type guint8): room for @n elements of @dtype
 * @n: the number of elements
 *
 * Rounds @n values to @dtype, to nearest with ties to even. NaN stays NaN;
 * finite values too large for @dtype become ±inf, or NaN for F8_E4M3 which
 * has no infinity.
 *
 * Returns: how many finite values overflowed to inf or NaN
 */
gsize
lp_dtype_from_f32 (LpDtype      dtype,
                   const float *src,
                   gpointer     dst,
                   gsize        n)
{
  g_return_val_if_fail (lp_dtype_can_convert (dtype), 0);
  g_return_val_if_fail (n == 0 || (src != NULL && dst != NULL), 0);

  switch (dtype)
    {
    case LP_DTYPE_F32:
      memmove (dst, src, n * sizeof (float));
      return 0;
    case LP_DTYPE_F64:
      for (gsize i = 0; i < n; i++)
        ((double *) dst)[i] = src[i];
      return 0;
    case LP_DTYPE_F16:
      return f16_from_f32 (src, dst, n);
    case LP_DTYPE_BF16:
      return bf16_from_f32 (src, dst, n);
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E5M2:
      {
        const LpFloatFormat *fmt = format_for (dtype);
        guint8 *out = dst;
        gsize overflow = 0;
        for (gsize i = 0; i < n; i++)
          out[i] = (guint8) encode_f64 (fmt, src[i], &overflow);
        return overflow;
      }
    default:
      g_assert_not_reached ();
    }
}

/**
 * lp_dtype_to_f64:
 * @dtype: a dtype for which lp_dtype_can_convert() is %TRUE
 * @src: (array) (element-type guint8): @n elements of @dtype
 * @dst: (array length=n): room for @n doubles
 * @n: the number of elements
 *
 * Widens @n values to f64, always exactly.
 */
void
lp_dtype_to_f64 (LpDtype        dtype,
                 gconstpointer  src,
                 double        *dst,
                 gsize          n)
{
  g_return_if_fail (lp_dtype_can_convert (dtype));
  g_return_if_fail (n == 0 || (src != NULL && dst != NULL));

  if (dtype == LP_DTYPE_F64)
    {
      memmove (dst, src, n * sizeof (double));
      return;
    }
  if (dtype == LP_DTYPE_F32)
    {
      for (gsize i = 0; i < n; i++)
        dst[i] = ((const float *) src)[i];
      return;
    }

#ifdef LP_HAVE_F16C_PATH
  if (dtype == LP_DTYPE_BF16 && have_avx2 ())
    {
      bf16_to_f64_avx2 (src, dst, n);
      return;
    }
#endif

  /* the narrow types widen to f32 exactly; go through it in chunks */
  float buf[1024];
  gsize size = lp_dtype_get_bits (dtype) / 8;
  for (gsize done = 0; done < n;)
    {
      gsize k = MIN (n - done, G_N_ELEMENTS (buf));
      lp_dtype_to_f32 (dtype, (const guint8 *) src + done * size, buf, k);
      for (gsize i = 0; i < k; i++)
        dst[done + i] = buf[i];
      done += k;
    }
}

/**
 * lp_dtype_from_f64:
 * @dtype: a dtype for which lp_dtype_can_convert() is %TRUE
 * @src: (array length=n): @n doubles
 * @dst: (array) (element-type guint8): room for @n elements of @dtype
 * @n: the number of elements
 *
 * Rounds @n values to @dtype, straight from f64 (never through f32, which
 * would round twice), to nearest with ties to even. Special values as for
 * lp_dtype_from_f32().
 *
 * Returns: how many finite values overflowed to inf or NaN
 */
gsize
lp_dtype_from_f64 (LpDtype       dtype,
                   const double *src,
                   gpointer      dst,
                   gsize         n)
{
  g_return_val_if_fail (lp_dtype_can_convert (dtype), 0);
  g_return_val_if_fail (n == 0 || (src != NULL && dst != NULL), 0);

  switch (dtype)
    {
    case LP_DTYPE_F64:
      memmove (dst, src, n * sizeof (double));
      return 0;
    case LP_DTYPE_F32:
      {
        float *out = dst;
        gsize overflow = 0;
        for (gsize i = 0; i < n; i++)
          {
            /* the hardware rounds to nearest even */
            out[i] = (float) src[i];
            overflow += isinf (out[i]) && isfinite (src[i]);
          }
        return overflow;
      }
    case LP_DTYPE_F16:
    case LP_DTYPE_BF16:
      {
#ifdef LP_HAVE_F16C_PATH
        if (dtype == LP_DTYPE_BF16 && have_avx2 ())
          return bf16_from_f64_avx2 (src, dst, n);
#endif
        const LpFloatFormat *fmt = format_for (dtype);
        guint16 *out = dst;
        gsize overflow = 0;
        for (gsize i = 0; i < n; i++)
          out[i] = (guint16) encode_f64 (fmt, src[i], &overflow);
        return overflow;
      }
    case LP_DTYPE_F8_E4M3:
    case LP_DTYPE_F8_E5M2:
      {
        const LpFloatFormat *fmt = format_for (dtype);
        guint8 *out = dst;
        gsize overflow = 0;
        for (gsize i = 0; i < n; i++)
          out[i] = (guint8) encode_f64 (fmt, src[i], &overflow);
        return overflow;
      }
    default:
      g_assert_not_reached ();
    }
}

/**
 * lp_dtype_convert:
 * @src_dtype: the dtype of @src; lp_dtype_can_convert() must be %TRUE
 * @src: (array) (element-type guint8): @n elements of @src_dtype
 * @dst_dtype: the dtype of @dst; lp_dtype_can_convert() must be %TRUE
 * @dst: (array) (element-type guint8): room for @n elements of @dst_dtype
 * @n: the number of elements
 *
 * Converts @n values between any two convertible dtypes, rounding once, to
 * nearest with ties to even. Goes through f32 in chunks, or through f64 when
 * either side is F64; both hold every value of the narrower types exactly.
 * @src and @dst must not overlap.
 *
 * Returns: how many finite values overflowed to inf or NaN
 */
gsize
lp_dtype_convert (LpDtype        src_dtype,
                  gconstpointer  src,
                  LpDtype        dst_dtype,
                  gpointer       dst,
                  gsize          n)
{
  g_return_val_if_fail (lp_dtype_can_convert (src_dtype), 0);
  g_return_val_if_fail (lp_dtype_can_convert (dst_dtype), 0);
  g_return_val_if_fail (n == 0 || (src != NULL && dst != NULL), 0);

  if (src_dtype == dst_dtype)
    {
      memcpy (dst, src, n * (lp_dtype_get_bits (src_dtype) / 8));
      return 0;
    }

  gboolean wide = src_dtype == LP_DTYPE_F64 || dst_dtype == LP_DTYPE_F64;
  if (wide && src_dtype == LP_DTYPE_F64)
    return lp_dtype_from_f64 (dst_dtype, src, dst, n);
  if (wide && dst_dtype == LP_DTYPE_F64)
    {
      lp_dtype_to_f64 (src_dtype, src, dst, n);
      return 0;
    }
  if (src_dtype == LP_DTYPE_F32)
    return lp_dtype_from_f32 (dst_dtype, src, dst, n);
  if (dst_dtype == LP_DTYPE_F32)
    {
      lp_dtype_to_f32 (src_dtype, src, dst, n);
      return 0;
    }

#ifdef LP_HAVE_F16C_PATH
  if (src_dtype == LP_DTYPE_BF16 && dst_dtype == LP_DTYPE_F16 && have_avx2_f16c ())
    return bf16_to_f16_avx2 (src, dst, n);
#endif

  /* both narrow: widen a cache-sized chunk to f32 (exact), then round */
  float buf[2048];
  gsize src_size = lp_dtype_get_bits (src_dtype) / 8;
  gsize dst_size = lp_dtype_get_bits (dst_dtype) / 8;
  gsize overflow = 0;
  for (gsize done = 0; done < n;)
    {
      gsize k = MIN (n - done, G_N_ELEMENTS (buf));
      lp_dtype_to_f32 (src_dtype, (const guint8 *) src + done * src_size, buf, k);
      overflow += lp_dtype_from_f32 (dst_dtype, buf, (guint8 *) dst + done * dst_size, k);
      done += k;
    }
  return overflow;
}
