/* test-dtype.c: dtype names, sizes and conversions
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The expected codes below are worked out by hand from the formats'
 * definitions (sign, exponent bits, bias, mantissa bits); test-cast checks
 * the same conversions against numpy on random data.
 */

#include <math.h>
#include <string.h>

#include <lpipe/lpipe.h>

static const struct {
  const char *name;
  LpDtype dtype;
  guint bits;
  gboolean is_float;
  gboolean can_convert;
} dtypes[] = {
  { "BOOL", LP_DTYPE_BOOL, 8, FALSE, FALSE },
  { "U8", LP_DTYPE_U8, 8, FALSE, FALSE },
  { "I8", LP_DTYPE_I8, 8, FALSE, FALSE },
  { "F8_E5M2", LP_DTYPE_F8_E5M2, 8, TRUE, TRUE },
  { "F8_E4M3", LP_DTYPE_F8_E4M3, 8, TRUE, TRUE },
  { "F8_E8M0", LP_DTYPE_F8_E8M0, 8, TRUE, FALSE },
  { "F8_E4M3FNUZ", LP_DTYPE_F8_E4M3FNUZ, 8, TRUE, FALSE },
  { "F8_E5M2FNUZ", LP_DTYPE_F8_E5M2FNUZ, 8, TRUE, FALSE },
  { "I16", LP_DTYPE_I16, 16, FALSE, FALSE },
  { "U16", LP_DTYPE_U16, 16, FALSE, FALSE },
  { "F16", LP_DTYPE_F16, 16, TRUE, TRUE },
  { "BF16", LP_DTYPE_BF16, 16, TRUE, TRUE },
  { "I32", LP_DTYPE_I32, 32, FALSE, FALSE },
  { "U32", LP_DTYPE_U32, 32, FALSE, FALSE },
  { "F32", LP_DTYPE_F32, 32, TRUE, TRUE },
  { "C64", LP_DTYPE_C64, 64, FALSE, FALSE },
  { "F64", LP_DTYPE_F64, 64, TRUE, TRUE },
  { "I64", LP_DTYPE_I64, 64, FALSE, FALSE },
  { "U64", LP_DTYPE_U64, 64, FALSE, FALSE },
  { "F4", LP_DTYPE_F4, 4, TRUE, FALSE },
  { "F6_E2M3", LP_DTYPE_F6_E2M3, 6, TRUE, FALSE },
  { "F6_E3M2", LP_DTYPE_F6_E3M2, 6, TRUE, FALSE },
};

static void
test_names (void)
{
  g_assert_cmpuint (G_N_ELEMENTS (dtypes), ==, LP_DTYPE_N_TYPES);

  for (guint i = 0; i < G_N_ELEMENTS (dtypes); i++)
    {
      LpDtype dtype = LP_DTYPE_N_TYPES;

      g_assert_true (lp_dtype_from_string (dtypes[i].name, &dtype));
      g_assert_cmpint (dtype, ==, dtypes[i].dtype);
      g_assert_cmpstr (lp_dtype_to_string (dtype), ==, dtypes[i].name);
      g_assert_cmpuint (lp_dtype_get_bits (dtype), ==, dtypes[i].bits);
      g_assert_cmpint (lp_dtype_is_float (dtype), ==, dtypes[i].is_float);
      g_assert_cmpint (lp_dtype_can_convert (dtype), ==, dtypes[i].can_convert);
    }

  /* the format's names are case-sensitive; lowercase words are enum nicks */
  g_assert_false (lp_dtype_from_string ("bf16", NULL));
  g_assert_false (lp_dtype_from_string ("", NULL));
  g_assert_false (lp_dtype_from_string ("F8_E4M3FN", NULL));
  g_assert_false (lp_dtype_from_string ("F16 ", NULL));
}

/* What users type: torch's names, kohya sd-scripts' str_to_dtype()
 * spellings (library/utils.py), the safetensors names and the nicks, in any
 * case. */
static void
test_parse (void)
{
  static const struct { const char *text; LpDtype dtype; } cases[] = {
    { "float16", LP_DTYPE_F16 }, { "half", LP_DTYPE_F16 }, { "fp16", LP_DTYPE_F16 },
    { "torch.float16", LP_DTYPE_F16 }, { "Half", LP_DTYPE_F16 }, { "F16", LP_DTYPE_F16 },
    { "float", LP_DTYPE_F32 }, { "float32", LP_DTYPE_F32 }, { "fp32", LP_DTYPE_F32 }, { "f32", LP_DTYPE_F32 },
    { "bfloat16", LP_DTYPE_BF16 }, { "bf16", LP_DTYPE_BF16 }, { "BF16", LP_DTYPE_BF16 },
    { "double", LP_DTYPE_F64 }, { "float64", LP_DTYPE_F64 }, { "fp64", LP_DTYPE_F64 },
    { "fp8", LP_DTYPE_F8_E4M3 }, { "float8", LP_DTYPE_F8_E4M3 }, { "fp8_e4m3fn", LP_DTYPE_F8_E4M3 },
    { "e4m3fn", LP_DTYPE_F8_E4M3 }, { "float8_e4m3fn", LP_DTYPE_F8_E4M3 }, { "f8-e4m3", LP_DTYPE_F8_E4M3 },
    { "F8_E4M3", LP_DTYPE_F8_E4M3 },
    { "fp8_e5m2", LP_DTYPE_F8_E5M2 }, { "e5m2", LP_DTYPE_F8_E5M2 }, { "float8_e5m2", LP_DTYPE_F8_E5M2 },
    { "float8_e4m3fnuz", LP_DTYPE_F8_E4M3FNUZ }, { "fp8_e5m2fnuz", LP_DTYPE_F8_E5M2FNUZ },
    { "int8", LP_DTYPE_I8 }, { "uint8", LP_DTYPE_U8 }, { "int64", LP_DTYPE_I64 }, { "bool", LP_DTYPE_BOOL },
  };
  static const char *bad[] = { "", "f17", "float17", "torch.", "fp", "half ", " fp16", "float16x" };

  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      LpDtype dtype = LP_DTYPE_BOOL;
      if (!lp_dtype_parse (cases[i].text, &dtype) || dtype != cases[i].dtype)
        g_test_fail_printf ("'%s' read as %s, not %s", cases[i].text,
                            lp_dtype_to_string (dtype), lp_dtype_to_string (cases[i].dtype));
    }
  for (guint i = 0; i < G_N_ELEMENTS (bad); i++)
    if (lp_dtype_parse (bad[i], NULL))
      g_test_fail_printf ("'%s' read as a dtype", bad[i]);
}

static void
test_enum_nicks (void)
{
  GEnumClass *klass = g_type_class_ref (LP_TYPE_DTYPE);
  const struct { const char *nick; LpDtype dtype; } nicks[] = {
    { "bf16", LP_DTYPE_BF16 },
    { "f16", LP_DTYPE_F16 },
    { "f8-e4m3", LP_DTYPE_F8_E4M3 },
    { "f8-e5m2", LP_DTYPE_F8_E5M2 },
    { "f64", LP_DTYPE_F64 },
  };

  for (guint i = 0; i < G_N_ELEMENTS (nicks); i++)
    {
      GEnumValue *v = g_enum_get_value_by_nick (klass, nicks[i].nick);
      g_assert_nonnull (v);
      g_assert_cmpint (v->value, ==, nicks[i].dtype);
    }
  g_type_class_unref (klass);
}

typedef struct {
  double in;
  guint32 code;
  gsize overflow;
} Case;

/* Converts @in through from_f64, and through from_f32 when @in is an f32,
 * and checks the code and the overflow count. */
static void
check_cases (LpDtype     dtype,
             const Case *cases,
             gsize       n)
{
  guint32 one = 1;
  double tiny;   /* the smallest subnormal */

  lp_dtype_to_f64 (dtype, &one, &tiny, 1);
  for (gsize i = 0; i < n; i++)
    {
      guint32 got = 0;
      gsize overflow;

      overflow = lp_dtype_from_f64 (dtype, &cases[i].in, &got, 1);
      if (got != cases[i].code || overflow != cases[i].overflow)
        g_error ("%s from f64 %a: got 0x%x (overflow %zu), want 0x%x (overflow %zu)",
                 lp_dtype_to_string (dtype), cases[i].in, got, overflow,
                 cases[i].code, cases[i].overflow);

      float f = (float) cases[i].in;
      if ((double) f == cases[i].in || isnan (cases[i].in))
        {
          got = 0;
          overflow = lp_dtype_from_f32 (dtype, &f, &got, 1);
          if (got != cases[i].code || overflow != cases[i].overflow)
            g_error ("%s from f32 %a: got 0x%x (overflow %zu), want 0x%x (overflow %zu)",
                     lp_dtype_to_string (dtype), f, got, overflow,
                     cases[i].code, cases[i].overflow);
        }

      /* and back: the code widens to a value within half an ulp of the
       * input, or to what overflow and special inputs give */
      guint32 code = cases[i].code;
      double back;
      lp_dtype_to_f64 (dtype, &code, &back, 1);
      if (isnan (cases[i].in) || (dtype == LP_DTYPE_F8_E4M3 && (cases[i].overflow || isinf (cases[i].in))))
        g_assert_true (isnan (back));
      else if (cases[i].overflow || isinf (cases[i].in))
        g_assert_true (isinf (back) && signbit (back) == signbit (cases[i].in));
      else if (back == 0)
        g_assert_true (signbit (back) == signbit (cases[i].in)
                       && fabs (cases[i].in) <= tiny / 2);
      else
        g_assert_cmpfloat (fabs (back - cases[i].in), <=, fabs (cases[i].in) * 0.125 + tiny / 2);
    }
}

static void
test_f16_special (void)
{
  const Case cases[] = {
    { 0.0, 0x0000, 0 },
    { -0.0, 0x8000, 0 },
    { 1.0, 0x3c00, 0 },
    { -2.0, 0xc000, 0 },
    { 65504.0, 0x7bff, 0 },         /* max finite */
    { 65519.0, 0x7bff, 0 },         /* below the tie with 65536 */
    { 65520.0, 0x7c00, 1 },         /* tie, goes to the even code: inf */
    { -65520.0, 0xfc00, 1 },
    { 1e10, 0x7c00, 1 },
    { INFINITY, 0x7c00, 0 },        /* inf is not an overflow */
    { -INFINITY, 0xfc00, 0 },
    { 0x1p-24, 0x0001, 0 },         /* smallest subnormal */
    { -0x1p-24, 0x8001, 0 },
    { 0x1p-25, 0x0000, 0 },         /* tie with zero: even */
    { -0x1p-25, 0x8000, 0 },        /* keeps the sign of zero */
    { 0x1.000002p-25, 0x0001, 0 },  /* just above the tie */
    { 0x3p-25, 0x0002, 0 },         /* 1.5 ulp: tie to even 2 */
    { 0x5p-25, 0x0002, 0 },         /* 2.5 ulp: tie to even 2 */
    { 1023 * 0x1p-24, 0x03ff, 0 },  /* largest subnormal */
    { 0x1p-14, 0x0400, 0 },         /* smallest normal */
    { 0x1.ffcp-15, 0x0400, 0 },     /* largest subnormal + half ulp: tie, rounds up to normal */
    { 1.0 + 0x1p-11, 0x3c00, 0 },   /* tie: even */
    { 1.0 + 0x3p-11, 0x3c02, 0 },   /* tie: even */
    { 1.0 + 0x1p-11 + 0x1p-40, 0x3c01, 0 },  /* above the tie only in f64 */
    { 1e-30, 0x0000, 0 },
    { 0x1p-1074, 0x0000, 0 },       /* f64 subnormal */
  };
  check_cases (LP_DTYPE_F16, cases, G_N_ELEMENTS (cases));
}

static void
test_bf16_special (void)
{
  const Case cases[] = {
    { 0.0, 0x0000, 0 },
    { -0.0, 0x8000, 0 },
    { 1.0, 0x3f80, 0 },
    { 0x1.fep127, 0x7f7f, 0 },        /* max finite */
    { 0x1.ffp127, 0x7f80, 1 },        /* tie between max (odd) and inf (even) */
    { 0x1.fefffffep127, 0x7f7f, 0 },
    { 0x1.fffffep127, 0x7f80, 1 },    /* FLT_MAX */
    { -0x1.fffffep127, 0xff80, 1 },
    { 1e300, 0x7f80, 1 },             /* only f64 reaches here */
    { INFINITY, 0x7f80, 0 },
    { -INFINITY, 0xff80, 0 },
    { 0x1p-133, 0x0001, 0 },          /* smallest subnormal */
    { 0x1p-134, 0x0000, 0 },          /* tie with zero */
    { 0x3p-134, 0x0002, 0 },          /* tie: even */
    { 0x1p-149, 0x0000, 0 },          /* f32's smallest subnormal */
    { -0x1p-149, 0x8000, 0 },
    { 0x1p-126, 0x0080, 0 },          /* smallest normal */
    { 1.0 + 0x1p-8, 0x3f80, 0 },      /* tie: even */
    { 1.0 + 0x3p-8, 0x3f82, 0 },      /* tie: even */
    { 1.0 + 0x1p-8 + 0x1p-40, 0x3f81, 0 },  /* above the tie only in f64 */
  };
  check_cases (LP_DTYPE_BF16, cases, G_N_ELEMENTS (cases));
}

static void
test_e4m3_special (void)
{
  const Case cases[] = {
    { 0.0, 0x00, 0 },
    { -0.0, 0x80, 0 },
    { 1.0, 0x38, 0 },
    { 448.0, 0x7e, 0 },               /* max finite */
    { -448.0, 0xfe, 0 },
    { 464.0, 0x7e, 0 },               /* tie with the NaN code: even keeps 448 */
    { 465.0, 0x7f, 1 },               /* no saturation: NaN, like torch */
    { 480.0, 0x7f, 1 },
    { -1e6, 0xff, 1 },
    { INFINITY, 0x7f, 0 },            /* no infinity: NaN */
    { -INFINITY, 0xff, 0 },
    { 0x1p-9, 0x01, 0 },              /* smallest subnormal */
    { 0x1p-10, 0x00, 0 },             /* tie with zero */
    { 0x3p-10, 0x02, 0 },             /* tie: even */
    { 0x7p-9, 0x07, 0 },              /* largest subnormal */
    { 0x1p-6, 0x08, 0 },              /* smallest normal */
    { 1.0 + 0x1p-4, 0x38, 0 },        /* tie: even */
    { 1.0 + 0x3p-4, 0x3a, 0 },        /* tie: even */
    { 1.0 + 0x1p-4 + 0x1p-30, 0x39, 0 },
  };
  check_cases (LP_DTYPE_F8_E4M3, cases, G_N_ELEMENTS (cases));
}

static void
test_e5m2_special (void)
{
  const Case cases[] = {
    { 0.0, 0x00, 0 },
    { -0.0, 0x80, 0 },
    { 1.0, 0x3c, 0 },
    { 57344.0, 0x7b, 0 },             /* max finite */
    { 61439.0, 0x7b, 0 },
    { 61440.0, 0x7c, 1 },             /* tie with inf (even) */
    { -61440.0, 0xfc, 1 },
    { INFINITY, 0x7c, 0 },
    { 0x1p-16, 0x01, 0 },             /* smallest subnormal */
    { 0x1p-17, 0x00, 0 },             /* tie with zero */
    { 0x3p-17, 0x02, 0 },             /* tie: even */
    { 0x3p-16, 0x03, 0 },             /* largest subnormal */
    { 0x1p-14, 0x04, 0 },             /* smallest normal */
    { 1.0 + 0x1p-3, 0x3c, 0 },        /* tie: even */
    { 1.0 + 0x3p-3, 0x3e, 0 },        /* tie: even */
  };
  check_cases (LP_DTYPE_F8_E5M2, cases, G_N_ELEMENTS (cases));
}

static gboolean
code_is_nan (LpDtype dtype,
             guint32 code)
{
  switch (dtype)
    {
    case LP_DTYPE_F16:
      return (code & 0x7c00) == 0x7c00 && (code & 0x03ff) != 0;
    case LP_DTYPE_BF16:
      return (code & 0x7f80) == 0x7f80 && (code & 0x007f) != 0;
    case LP_DTYPE_F8_E5M2:
      return (code & 0x7c) == 0x7c && (code & 0x03) != 0;
    case LP_DTYPE_F8_E4M3:
      return (code & 0x7f) == 0x7f;
    default:
      g_assert_not_reached ();
    }
}

/* Every code widens to f32 and f64 and rounds back to itself (NaNs to a
 * NaN of the same sign), through both the f32 and the f64 paths. */
static void
test_round_trip (gconstpointer data)
{
  LpDtype dtype = GPOINTER_TO_INT (data);
  guint size = lp_dtype_get_bits (dtype) / 8;
  gsize n = (gsize) 1 << lp_dtype_get_bits (dtype);
  guint8 *codes = g_malloc (n * size);
  guint8 *back = g_malloc (n * size);
  guint8 *back64 = g_malloc (n * size);
  float *f = g_new (float, n);
  double *d = g_new (double, n);

  for (gsize i = 0; i < n; i++)
    {
      if (size == 1)
        codes[i] = (guint8) i;
      else
        ((guint16 *) codes)[i] = (guint16) i;
    }

  lp_dtype_to_f32 (dtype, codes, f, n);
  lp_dtype_to_f64 (dtype, codes, d, n);
  g_assert_cmpuint (lp_dtype_from_f32 (dtype, f, back, n), ==, 0);
  g_assert_cmpuint (lp_dtype_from_f64 (dtype, d, back64, n), ==, 0);

  for (gsize i = 0; i < n; i++)
    {
      guint32 c = size == 1 ? codes[i] : ((guint16 *) codes)[i];
      guint32 b = size == 1 ? back[i] : ((guint16 *) back)[i];
      guint32 b64 = size == 1 ? back64[i] : ((guint16 *) back64)[i];
      guint32 sign = 1u << (lp_dtype_get_bits (dtype) - 1);

      g_assert_true ((double) f[i] == d[i] || (isnan (f[i]) && isnan (d[i])));
      if (code_is_nan (dtype, c))
        {
          g_assert_true (isnan (f[i]));
          g_assert_true (code_is_nan (dtype, b));
          g_assert_true (code_is_nan (dtype, b64));
          g_assert_cmpuint (b & sign, ==, c & sign);
        }
      else
        {
          if (b != c || b64 != c)
            g_error ("%s code 0x%x -> %a -> 0x%x / 0x%x",
                     lp_dtype_to_string (dtype), c, d[i], b, b64);
        }
    }

  g_free (codes);
  g_free (back);
  g_free (back64);
  g_free (f);
  g_free (d);
}

static guint64
xorshift64 (guint64 *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* The fast f32 loops (bit tricks, F16C) agree with the generic encoder that
 * from_f64 uses, on random bit patterns: every class of f32 turns up. */
static void
test_fast_paths_agree (void)
{
  const LpDtype targets[] = { LP_DTYPE_F16, LP_DTYPE_BF16, LP_DTYPE_F8_E4M3, LP_DTYPE_F8_E5M2 };
  const gsize n = 1 << 18;
  guint32 *bits = g_new (guint32, n);
  double *d = g_new (double, n);
  guint16 *a = g_new (guint16, n);
  guint16 *b = g_new (guint16, n);
  guint64 s = 0x9e3779b97f4a7c15;

  for (gsize i = 0; i < n; i++)
    {
      bits[i] = (guint32) (xorshift64 (&s) >> 16);
      /* half of them near 1 so the rounding bits matter in range */
      if (i & 1)
        bits[i] = (bits[i] & 0x807fffffu) | ((120u + (bits[i] >> 28)) << 23);
      float f;
      memcpy (&f, &bits[i], 4);
      d[i] = f;
    }

  for (guint t = 0; t < G_N_ELEMENTS (targets); t++)
    {
      memset (a, 0, n * 2);
      memset (b, 0, n * 2);
      gsize oa = lp_dtype_from_f32 (targets[t], (float *) bits, a, n);
      gsize ob = lp_dtype_from_f64 (targets[t], d, b, n);
      g_assert_cmpuint (oa, ==, ob);
      g_assert_cmpmem (a, n * 2, b, n * 2);
    }

  g_free (bits);
  g_free (d);
  g_free (a);
  g_free (b);
}

static void
test_convert_pairs (void)
{
  /* bf16 -> f16: widen exactly, round once */
  const guint16 bf[] = { 0x3f80, 0x477f, 0x4780, 0x3f81, 0x0001, 0x8000, 0x7fc0, 0xff80 };
  /* 1, 65280, 65536 (overflows f16), 1+2^-7, tiny, -0, NaN, -inf */
  const guint16 want[] = { 0x3c00, 0x7bf8, 0x7c00, 0x3c08, 0x0000, 0x8000, 0x7e00, 0xfc00 };
  guint16 got[G_N_ELEMENTS (bf)];

  g_assert_cmpuint (lp_dtype_convert (LP_DTYPE_BF16, bf, LP_DTYPE_F16, got, G_N_ELEMENTS (bf)), ==, 1);
  g_assert_cmpmem (got, sizeof got, want, sizeof want);

  /* f64 -> f16 rounds once, straight from f64 */
  const double d[] = { 1.0 + 0x1p-11 + 0x1p-40, 70000.0 };
  guint16 h[2];
  g_assert_cmpuint (lp_dtype_convert (LP_DTYPE_F64, d, LP_DTYPE_F16, h, 2), ==, 1);
  g_assert_cmpuint (h[0], ==, 0x3c01);
  g_assert_cmpuint (h[1], ==, 0x7c00);

  /* f16 -> f64 -> f16 and f8 -> bf16 */
  double back[2];
  lp_dtype_convert (LP_DTYPE_F16, h, LP_DTYPE_F64, back, 2);
  g_assert_cmpfloat (back[0], ==, 1.0 + 0x1p-10);
  g_assert_true (isinf (back[1]));

  const guint8 e4m3[] = { 0x7e, 0x01, 0xff };
  guint16 b16[3];
  g_assert_cmpuint (lp_dtype_convert (LP_DTYPE_F8_E4M3, e4m3, LP_DTYPE_BF16, b16, 3), ==, 0);
  g_assert_cmpuint (b16[0], ==, 0x43e0);    /* 448 */
  g_assert_cmpuint (b16[1], ==, 0x3b00);    /* 2^-9 */
  g_assert_true (code_is_nan (LP_DTYPE_BF16, b16[2]) && (b16[2] & 0x8000));

  /* f32 -> f64 -> f32 is the identity; f64 overflowing f32 is counted */
  const double big[] = { 1e300, -1e300, 1.5 };
  float f[3];
  g_assert_cmpuint (lp_dtype_convert (LP_DTYPE_F64, big, LP_DTYPE_F32, f, 3), ==, 2);
  g_assert_true (isinf (f[0]) && f[0] > 0 && isinf (f[1]) && f[1] < 0);
  g_assert_cmpfloat (f[2], ==, 1.5f);

  /* every bf16 code to f16 in one go (the fused loop where there is one)
   * gives what widening to f32 and rounding does */
  {
    const gsize all = 65536 + 5;   /* and a tail shorter than a vector */
    guint16 *codes = g_new (guint16, all);
    guint16 *fused = g_new (guint16, all);
    guint16 *stepwise = g_new (guint16, all);
    float *wide = g_new (float, all);
    for (gsize i = 0; i < all; i++)
      codes[i] = (guint16) (i * 40503u);   /* odd multiplier: a permutation */
    gsize o1 = lp_dtype_convert (LP_DTYPE_BF16, codes, LP_DTYPE_F16, fused, all);
    lp_dtype_to_f32 (LP_DTYPE_BF16, codes, wide, all);
    gsize o2 = lp_dtype_from_f32 (LP_DTYPE_F16, wide, stepwise, all);
    g_assert_cmpuint (o1, ==, o2);
    g_assert_cmpuint (o1, >, 0);
    g_assert_cmpmem (fused, all * 2, stepwise, all * 2);
    g_free (codes);
    g_free (fused);
    g_free (stepwise);
    g_free (wide);
  }

  /* long runs cross the chunk boundaries of the narrow-to-narrow path */
  const gsize n = 10007;
  guint16 *src = g_new (guint16, n);
  guint8 *dst = g_new (guint8, n);
  for (gsize i = 0; i < n; i++)
    src[i] = (guint16) (0x3f80 + (i % 64));   /* 1 .. 1.49 in bf16 */
  lp_dtype_convert (LP_DTYPE_BF16, src, LP_DTYPE_F8_E5M2, dst, n);
  for (gsize i = 0; i < n; i++)
    {
      float v = 1.0f + (float) (i % 64) / 128.0f;
      guint8 expect;
      lp_dtype_from_f32 (LP_DTYPE_F8_E5M2, &v, &expect, 1);
      g_assert_cmpuint (dst[i], ==, expect);
    }
  g_free (src);
  g_free (dst);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/dtype/names", test_names);
  g_test_add_func ("/dtype/enum-nicks", test_enum_nicks);
  g_test_add_func ("/dtype/parse", test_parse);
  g_test_add_func ("/dtype/f16/special", test_f16_special);
  g_test_add_func ("/dtype/bf16/special", test_bf16_special);
  g_test_add_func ("/dtype/f8-e4m3/special", test_e4m3_special);
  g_test_add_func ("/dtype/f8-e5m2/special", test_e5m2_special);
  g_test_add_data_func ("/dtype/f16/round-trip", GINT_TO_POINTER (LP_DTYPE_F16), test_round_trip);
  g_test_add_data_func ("/dtype/bf16/round-trip", GINT_TO_POINTER (LP_DTYPE_BF16), test_round_trip);
  g_test_add_data_func ("/dtype/f8-e4m3/round-trip", GINT_TO_POINTER (LP_DTYPE_F8_E4M3), test_round_trip);
  g_test_add_data_func ("/dtype/f8-e5m2/round-trip", GINT_TO_POINTER (LP_DTYPE_F8_E5M2), test_round_trip);
  g_test_add_func ("/dtype/fast-paths-agree", test_fast_paths_agree);
  g_test_add_func ("/dtype/convert", test_convert_pairs);

  return g_test_run ();
}
