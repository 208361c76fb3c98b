/* test-hostile-lora.c: LoRA content a stranger's file can hold, through every
 * stage that computes on LoRA factors
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * NaN or infinity in a factor, all-zero modules, rank-1 and rank-0 modules,
 * factors whose shapes disagree, alpha tensors of the wrong shape, dtype or
 * value. Each stage (lora-svd, lora-project, rank-check) must either fail
 * with an error that names the module, or give a well-defined result: the
 * same update scale * B @ A where the rank allows it, and never NaN.
 */
#include "lp-test-util.h"

#include <float.h>
#include <math.h>
#include <string.h>

#define MODULE "lora_unet_block_proj"
#define DOWN MODULE ".lora_down.weight"
#define UP MODULE ".lora_up.weight"
#define ALPHA MODULE ".alpha"

/* The stages under test, each with the properties that make it reduce to
 * rank 2 (or, for rank-check, just report). */
typedef struct {
  const char *stage;
  const char *props[5];
} StageRun;

static const StageRun stage_runs[] = {
  { "lora-svd", { "rank", "2", NULL } },
  { "lora-svd", { "energy", "0.9", NULL } },
  { "lora-project", { "rank", "2", NULL } },
  { "rank-check", { "quiet", "true", NULL } },
};

/* Values from a fixed pseudo-random sequence in [-1, 1). */
static float *
fill (guint64 n,
      guint   seed)
{
  float *v = g_new (float, MAX (n, 1));
  guint32 x = 2463534242u + seed * 7919u;

  for (guint64 i = 0; i < n; i++)
    {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      v[i] = ((x >> 8) / (float) (1 << 24)) * 2.0f - 1.0f;
    }
  return v;
}

/* A kohya module: down [r, in] and up [out, up_r] (up_r == r unless the test
 * wants them to disagree), values editable before build. */
typedef struct {
  guint64 r, n_in, n_out, up_r;
  LpDtype dtype;
  float *a, *b;
} Module;

static void
module_init (Module  *m,
             guint64  r,
             guint64  n_in,
             guint64  n_out,
             guint64  up_r,
             LpDtype  dtype)
{
  *m = (Module) { r, n_in, n_out, up_r, dtype, fill (r * n_in, 1), fill (n_out * up_r, 2) };
}

static void
module_clear (Module *m)
{
  g_clear_pointer (&m->a, g_free);
  g_clear_pointer (&m->b, g_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (Module, module_clear)

static LpCheckpoint *
module_build (Module *m)
{
  LpCheckpoint *ckpt = lp_checkpoint_new ();
  g_autoptr(GError) error = NULL;
  guint64 down_shape[] = { m->r, m->n_in };
  guint64 up_shape[] = { m->n_out, m->up_r };
  g_autoptr(LpTensor) down = lp_test_tensor (DOWN, m->dtype, down_shape, 2, m->a);
  g_autoptr(LpTensor) up = lp_test_tensor (UP, m->dtype, up_shape, 2, m->b);

  g_assert_true (lp_checkpoint_add_tensor (ckpt, down, &error));
  g_assert_true (lp_checkpoint_add_tensor (ckpt, up, &error));
  g_assert_no_error (error);
  return ckpt;
}

static void
add_tensor (LpCheckpoint  *ckpt,
            const char    *name,
            LpDtype        dtype,
            const guint64 *shape,
            guint          n_dims,
            const float   *values)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpTensor) t = lp_test_tensor (name, dtype, shape, n_dims, values);

  g_assert_true (lp_checkpoint_add_tensor (ckpt, t, &error));
  g_assert_no_error (error);
}

/* The module's tensors as f64, for the product. */
static double *
tensor_f64 (LpCheckpoint *ckpt,
            const char   *name,
            guint64      *rows,
            guint64      *cols)
{
  g_autoptr(GError) error = NULL;
  LpTensor *t = lp_checkpoint_lookup (ckpt, name);
  guint n_dims;
  const guint64 *shape;
  guint64 n;
  gsize n_values;
  double *out;

  g_assert_nonnull (t);
  shape = lp_tensor_get_shape (t, &n_dims);
  n = lp_tensor_get_n_elements (t);
  *rows = n_dims > 0 ? shape[0] : 1;
  *cols = *rows ? n / *rows : 0;
  if (n == 0)
    return g_new0 (double, 1);
  out = lp_tensor_dup_f64 (t, &n_values, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (n_values, ==, n);
  return out;
}

static double
module_scale (LpCheckpoint *ckpt,
              guint64       rank)
{
  guint64 r, c;
  g_autofree double *alpha = NULL;

  LpTensor *t = lp_checkpoint_lookup (ckpt, ALPHA);

  if (t == NULL)
    return 1.0;
  /* An integer alpha, as some tools write it */
  if (!lp_dtype_can_convert (lp_tensor_get_dtype (t)))
    {
      g_autoptr(GBytes) data = lp_tensor_dup_data (t, NULL);
      g_assert_cmpint (lp_tensor_get_dtype (t), ==, LP_DTYPE_I64);
      return *(const gint64 *) g_bytes_get_data (data, NULL) / (double) rank;
    }
  alpha = tensor_f64 (ckpt, ALPHA, &r, &c);
  return alpha[0] / rank;
}

/* scale * B @ A, [out, in] */
static double *
module_update (LpCheckpoint *ckpt,
               guint64      *n_out,
               guint64      *n_in)
{
  guint64 ra, rb, in, out;
  g_autofree double *a = tensor_f64 (ckpt, DOWN, &ra, &in);
  g_autofree double *b = tensor_f64 (ckpt, UP, &out, &rb);
  double scale;
  double *w;

  g_assert_cmpuint (ra, ==, rb);
  scale = module_scale (ckpt, ra);
  w = g_new0 (double, MAX (out * in, 1));
  for (guint64 i = 0; i < out; i++)
    for (guint64 k = 0; k < ra; k++)
      for (guint64 j = 0; j < in; j++)
        w[i * in + j] += scale * b[i * ra + k] * a[k * in + j];
  *n_out = out;
  *n_in = in;
  return w;
}

/* Runs @run on @input and pulls every output tensor's data, so errors of
 * lazy tensors surface here. */
static LpCheckpoint *
run_stage_n (const StageRun *run,
             LpCheckpoint  **inputs,
             guint           n_inputs,
             GError        **error);

static LpCheckpoint *
run_stage (const StageRun *run,
           LpCheckpoint   *input,
           GError        **error)
{
  return run_stage_n (run, &input, 1, error);
}

static LpCheckpoint *
run_stage_n (const StageRun *run,
             LpCheckpoint  **inputs,
             guint           n_inputs,
             GError        **error)
{
  g_autoptr(LpStage) stage = lp_registry_create_stage (lp_test_registry (), run->stage, error);
  LpCheckpoint *output = NULL;

  if (stage == NULL)
    return NULL;
  for (guint i = 0; run->props[i]; i += 2)
    if (!lp_stage_set_property_from_string (stage, run->props[i], run->props[i + 1], error))
      return NULL;
  if (!lp_stage_prepare (stage, error) ||
      !lp_stage_run (stage, inputs, n_inputs, &output, error))
    return NULL;
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (output); i++)
    {
      g_autoptr(GBytes) data = lp_tensor_dup_data (lp_checkpoint_get_tensor (output, i), error);

      if (data == NULL)
        {
          g_object_unref (output);
          return NULL;
        }
    }
  return output;
}

static char *
describe (const StageRun *run)
{
  g_autoptr(GString) s = g_string_new (run->stage);

  for (guint i = 0; run->props[i]; i += 2)
    g_string_append_printf (s, " %s=%s", run->props[i], run->props[i + 1]);
  return g_string_free (g_steal_pointer (&s), FALSE);
}

/* Every stage fails with @code and a message naming the module. */
static void
assert_all_fail (LpCheckpoint *input,
                 int           code,
                 const char   *fragment)
{
  for (guint s = 0; s < G_N_ELEMENTS (stage_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&stage_runs[s]);
      g_autoptr(LpCheckpoint) out = run_stage (&stage_runs[s], input, &error);

      g_test_message ("%s: %s", what, error ? error->message : "(no error)");
      if (out != NULL)
        g_error ("%s accepted it", what);
      g_assert_error (error, LP_STAGE_ERROR, code);
      g_assert_nonnull (strstr (error->message, MODULE));
      if (fragment)
        g_assert_nonnull (strstr (error->message, fragment));
    }
}

/* No NaN or infinity in any output tensor. */
static gboolean
all_finite (LpCheckpoint *ckpt)
{
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (ckpt); i++)
    {
      g_autoptr(GError) error = NULL;
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      guint64 n = lp_tensor_get_n_elements (t);
      g_autofree double *v = NULL;

      if (!lp_dtype_can_convert (lp_tensor_get_dtype (t)) || n == 0)
        continue;
      v = lp_tensor_dup_f64 (t, NULL, &error);
      g_assert_no_error (error);
      for (guint64 j = 0; j < n; j++)
        if (!isfinite (v[j]))
          return FALSE;
    }
  return TRUE;
}

static void
assert_finite (LpCheckpoint *ckpt)
{
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (ckpt); i++)
    {
      g_autoptr(GError) error = NULL;
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      guint64 n = lp_tensor_get_n_elements (t);
      g_autofree double *v = NULL;

      if (!lp_dtype_can_convert (lp_tensor_get_dtype (t)) || n == 0)
        continue;
      v = lp_tensor_dup_f64 (t, NULL, &error);
      g_assert_no_error (error);
      for (guint64 j = 0; j < n; j++)
        if (!isfinite (v[j]))
          g_error ("%s[%" G_GUINT64_FORMAT "] is %g", lp_tensor_get_name (t), j, v[j]);
    }
}

static double
max_abs_diff (const double *a,
              const double *b,
              guint64       n,
              double       *norm)
{
  double d = 0;

  *norm = 0;
  for (guint64 i = 0; i < n; i++)
    {
      d = MAX (d, fabs (a[i] - b[i]));
      *norm = MAX (*norm, fabs (a[i]));
    }
  return d;
}

/* Every stage succeeds with finite factors; where the reduction keeps the
 * rank (@exact: the module's rank is at most 2), the update is unchanged. */
static void
assert_all_well_defined (LpCheckpoint *input,
                         gboolean      exact)
{
  guint64 out0, in0;
  g_autofree double *w0 = module_update (input, &out0, &in0);

  for (guint s = 0; s < G_N_ELEMENTS (stage_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&stage_runs[s]);
      g_autoptr(LpCheckpoint) out = run_stage (&stage_runs[s], input, &error);
      guint64 out1, in1;
      g_autofree double *w1 = NULL;
      double norm, diff;

      g_test_message ("%s: %s", what, error ? error->message : "ok");
      g_assert_no_error (error);
      assert_finite (out);
      w1 = module_update (out, &out1, &in1);
      g_assert_cmpuint (out1, ==, out0);
      g_assert_cmpuint (in1, ==, in0);
      diff = max_abs_diff (w0, w1, out0 * in0, &norm);
      /* A random projection is not exact even below its rank. */
      if (exact && strcmp (stage_runs[s].stage, "lora-project") != 0)
        g_assert_cmpfloat (diff, <=, 1e-5 * MAX (norm, 1e-30) + 1e-30);
    }
}

/* ---- the cases ------------------------------------------------------------ */

/* A scalar alpha of any dtype, from its raw bytes. */
static void
add_raw_scalar (LpCheckpoint  *ckpt,
                const char    *name,
                LpDtype        dtype,
                const void    *bytes,
                gsize          size)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) data = g_bytes_new (bytes, size);
  g_autoptr(LpTensor) t = lp_tensor_new (name, dtype, NULL, 0, data, &error);

  g_assert_no_error (error);
  g_assert_true (lp_checkpoint_add_tensor (ckpt, t, &error));
  g_assert_no_error (error);
}

static void
test_nan_down (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_F32);
  m.a[5] = NAN;
  ckpt = module_build (&m);
  assert_all_fail (ckpt, LP_STAGE_ERROR_NUMERIC, "down");
}

static void
test_inf_up (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_BF16);
  m.b[31] = -INFINITY;
  ckpt = module_build (&m);
  assert_all_fail (ckpt, LP_STAGE_ERROR_NUMERIC, "up");
}

/* The largest finite f16 in both factors: results must stay finite (f16
 * overflows to infinity at 65520, so the products must not be formed in f16). */
static void
test_largest_f16 (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 2, 16, 8, 2, LP_DTYPE_F16);
  m.a[0] = 65504.0f;
  m.b[0] = -65504.0f;
  ckpt = module_build (&m);
  assert_all_well_defined (ckpt, TRUE);
}

/* Every factor value at the top of @dtype's range: an error naming the
 * module, or finite factors; never infinity written silently. */
static void
assert_no_silent_overflow (LpDtype dtype,
                           float   top)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;
  g_autoptr(GString) overflowing = g_string_new (NULL);

  module_init (&m, 4, 16, 8, 4, dtype);
  for (guint i = 0; i < 4 * 16; i++)
    m.a[i] = top;
  for (guint i = 0; i < 8 * 4; i++)
    m.b[i] = top;
  ckpt = module_build (&m);
  for (guint s = 0; s < G_N_ELEMENTS (stage_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&stage_runs[s]);
      g_autoptr(LpCheckpoint) out = run_stage (&stage_runs[s], ckpt, &error);

      g_test_message ("%s: %s", what, error ? error->message : "ok");
      if (out == NULL)
        {
          g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
          g_assert_nonnull (strstr (error->message, MODULE));
        }
      else if (!all_finite (out))
        g_string_append_printf (overflowing, "%s%s", overflowing->len ? ", " : "", what);
    }
  g_assert_cmpstr (overflowing->str, ==, "");
}

/* Reduced factors that cannot be written back in f16 (balanced, each would
 * be near 2^17). */
static void
test_f16_overflow_on_write (void)
{
  assert_no_silent_overflow (LP_DTYPE_F16, 65504.0f);
}

/* f32 factors whose f32 sums overflow (the projection sums in f32) even
 * though every value read is finite. */
static void
test_f32_overflow_in_sums (void)
{
  assert_no_silent_overflow (LP_DTYPE_F32, FLT_MAX);
}

static void
test_zero_module (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_F32);
  memset (m.a, 0, 4 * 16 * sizeof (float));
  memset (m.b, 0, 8 * 4 * sizeof (float));
  ckpt = module_build (&m);
  assert_all_well_defined (ckpt, TRUE);
}

/* Only the up factor zero: the update is zero all the same. */
static void
test_zero_up (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_F32);
  memset (m.b, 0, 8 * 4 * sizeof (float));
  ckpt = module_build (&m);
  assert_all_well_defined (ckpt, TRUE);
}

static void
test_rank_one (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 1, 16, 8, 1, LP_DTYPE_F32);
  ckpt = module_build (&m);
  assert_all_well_defined (ckpt, TRUE);
}

static void
test_rank_zero (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 0, 16, 8, 0, LP_DTYPE_F32);
  ckpt = module_build (&m);
  for (guint s = 0; s < G_N_ELEMENTS (stage_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&stage_runs[s]);
      g_autoptr(LpCheckpoint) out = run_stage (&stage_runs[s], ckpt, &error);

      g_test_message ("%s: %s", what, error ? error->message : "ok");
      /* Nothing to reduce: either an error naming the module, or an empty
       * update of the module's shape. */
      if (out == NULL)
        {
          g_assert_true (error->domain == LP_STAGE_ERROR);
          g_assert_nonnull (strstr (error->message, MODULE));
        }
      else
        {
          guint64 o, i;
          g_autofree double *w = module_update (out, &o, &i);

          g_assert_cmpuint (o, ==, 8);
          g_assert_cmpuint (i, ==, 16);
          for (guint64 k = 0; k < o * i; k++)
            g_assert_cmpfloat (w[k], ==, 0.0);
        }
    }
}

static void
test_shapes_disagree (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;

  module_init (&m, 4, 16, 8, 3, LP_DTYPE_F32);
  ckpt = module_build (&m);
  assert_all_fail (ckpt, LP_STAGE_ERROR_INVALID_INPUT, NULL);
}

static void
test_factor_1d (void)
{
  g_autoptr(LpCheckpoint) ckpt = lp_checkpoint_new ();
  guint64 down_shape[] = { 64 };
  guint64 up_shape[] = { 8, 4 };
  g_autofree float *a = fill (64, 1);
  g_autofree float *b = fill (32, 2);

  add_tensor (ckpt, DOWN, LP_DTYPE_F32, down_shape, 1, a);
  add_tensor (ckpt, UP, LP_DTYPE_F32, up_shape, 2, b);
  assert_all_fail (ckpt, LP_STAGE_ERROR_INVALID_INPUT, NULL);
}

/* Factors of a dtype with no arithmetic (I32): not silently reinterpreted. */
static void
test_integer_factors (void)
{
  g_autoptr(LpCheckpoint) ckpt = lp_checkpoint_new ();
  gint32 a[4 * 16] = { 0 };
  gint32 b[8 * 4] = { 0 };
  guint64 down_shape[] = { 4, 16 };
  guint64 up_shape[] = { 8, 4 };
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) da = g_bytes_new (a, sizeof a);
  g_autoptr(GBytes) db = g_bytes_new (b, sizeof b);
  g_autoptr(LpTensor) ta = lp_tensor_new (DOWN, LP_DTYPE_I32, down_shape, 2, da, &error);
  g_autoptr(LpTensor) tb = lp_tensor_new (UP, LP_DTYPE_I32, up_shape, 2, db, &error);

  g_assert_no_error (error);
  g_assert_true (lp_checkpoint_add_tensor (ckpt, ta, &error));
  g_assert_true (lp_checkpoint_add_tensor (ckpt, tb, &error));
  assert_all_fail (ckpt, LP_STAGE_ERROR_INVALID_INPUT, NULL);
}

static LpCheckpoint *
module_with_alpha (LpDtype     dtype,
                   const void *bytes,
                   gsize       size)
{
  g_auto(Module) m;
  LpCheckpoint *ckpt;

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_F32);
  ckpt = module_build (&m);
  add_raw_scalar (ckpt, ALPHA, dtype, bytes, size);
  return ckpt;
}

static void
test_alpha_wrong_shape (void)
{
  g_auto(Module) m;
  g_autoptr(LpCheckpoint) ckpt = NULL;
  guint64 shape[] = { 2 };
  float alpha[] = { 2.0f, 2.0f };

  module_init (&m, 4, 16, 8, 4, LP_DTYPE_F32);
  ckpt = module_build (&m);
  add_tensor (ckpt, ALPHA, LP_DTYPE_F32, shape, 1, alpha);
  assert_all_fail (ckpt, LP_STAGE_ERROR_INVALID_INPUT, "alpha");
}

static void
test_alpha_nan (void)
{
  float alpha = NAN;
  g_autoptr(LpCheckpoint) ckpt = module_with_alpha (LP_DTYPE_F32, &alpha, sizeof alpha);

  assert_all_fail (ckpt, LP_STAGE_ERROR_NUMERIC, "alpha");
}

static void
test_alpha_inf (void)
{
  float alpha = INFINITY;
  g_autoptr(LpCheckpoint) ckpt = module_with_alpha (LP_DTYPE_F32, &alpha, sizeof alpha);

  assert_all_fail (ckpt, LP_STAGE_ERROR_NUMERIC, "alpha");
}

/* An alpha of a dtype that means no number here. */
static void
test_alpha_bool (void)
{
  guint8 alpha = 1;
  g_autoptr(LpCheckpoint) ckpt = module_with_alpha (LP_DTYPE_BOOL, &alpha, sizeof alpha);

  assert_all_fail (ckpt, LP_STAGE_ERROR_INVALID_INPUT, "alpha");
}

/* Alpha 0 makes the update zero: well defined, nothing to keep. */
static void
test_alpha_zero (void)
{
  float alpha = 0.0f;
  g_autoptr(LpCheckpoint) ckpt = module_with_alpha (LP_DTYPE_F32, &alpha, sizeof alpha);

  assert_all_well_defined (ckpt, FALSE);
}

/* A factor without its partner: passed through untouched, or refused with
 * the module named; never half a module reduced. */
static void
test_lone_factor (void)
{
  g_autoptr(LpCheckpoint) ckpt = lp_checkpoint_new ();
  guint64 shape[] = { 4, 16 };
  g_autofree float *a = fill (64, 1);

  add_tensor (ckpt, DOWN, LP_DTYPE_F32, shape, 2, a);
  for (guint s = 0; s < G_N_ELEMENTS (stage_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&stage_runs[s]);
      g_autoptr(LpCheckpoint) out = run_stage (&stage_runs[s], ckpt, &error);

      g_test_message ("%s: %s", what, error ? error->message : "ok");
      if (out == NULL)
        g_assert_nonnull (strstr (error->message, MODULE));
      else
        {
          g_autoptr(GBytes) x = lp_tensor_dup_data (lp_checkpoint_lookup (ckpt, DOWN), NULL);
          g_autoptr(GBytes) y = lp_tensor_dup_data (lp_checkpoint_lookup (out, DOWN), NULL);

          g_assert_true (g_bytes_equal (x, y));
        }
    }
}

/* Every LoRA stage, with the criteria that once crashed on no module
 * (lora-svd energy/budget: g_new0 (..., 0) returned NULL and the stage
 * returned NULL with no error, issue 11 item 2). */
static const StageRun no_module_runs[] = {
  { "lora-svd", { "rank", "2", NULL } },
  { "lora-svd", { "energy", "0.9", NULL } },
  { "lora-svd", { "sv-ratio", "4", NULL } },
  { "lora-svd", { "sv-fro", "0.9", NULL } },
  { "lora-svd", { "sv-cumulative", "0.9", NULL } },
  { "lora-svd", { "budget", "1000", NULL } },
  { "lora-project", { "rank", "2", NULL } },
  { "rank-check", { "quiet", "true", NULL } },
  { "rank-check", { "expect-rank", "4", "quiet", "true", NULL } },
  { "lora-scale", { "factor", "2", NULL } },
  { "lora-merge", { NULL } },
};

/* Each stage of no_module_runs fails on @input, naming the families it
 * looked for and each of @parts (NULL-terminated). */
static void
assert_no_module_error (LpCheckpoint       *input,
                        const char * const *parts)
{
  for (guint s = 0; s < G_N_ELEMENTS (no_module_runs); s++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *what = describe (&no_module_runs[s]);
      LpCheckpoint *inputs[] = { input, input };
      /* lora-merge takes two inputs or more */
      guint n_inputs = g_str_equal (no_module_runs[s].stage, "lora-merge") ? 2 : 1;
      g_autoptr(LpCheckpoint) out = run_stage_n (&no_module_runs[s], inputs, n_inputs, &error);

      g_test_message ("%s: %s", what, error ? error->message : "(no error)");
      if (out != NULL)
        g_error ("%s accepted a file with no LoRA module", what);
      g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT);
      g_assert_nonnull (strstr (error->message, "no LoRA module"));
      g_assert_nonnull (strstr (error->message, "kohya"));
      g_assert_nonnull (strstr (error->message, ".lora_down.weight"));
      g_assert_nonnull (strstr (error->message, "PEFT"));
      for (guint i = 0; parts != NULL && parts[i] != NULL; i++)
        g_assert_nonnull (strstr (error->message, parts[i]));
    }
}

/* A checkpoint that is no LoRA at all (a base model's weights). */
static void
test_no_module (void)
{
  g_autoptr(LpCheckpoint) ckpt = lp_checkpoint_new ();
  guint64 shape[] = { 4, 4 };
  g_autofree float *w = fill (16, 3);

  add_tensor (ckpt, "model.layers.0.self_attn.q_proj.weight", LP_DTYPE_F32, shape, 2, w);
  assert_no_module_error (ckpt, NULL);
}

/* Parts of adapters of families the finder does not pair (keys as LyCORIS's
 * OFT and full modules and PEFT's DoRA layer write them): named in the
 * error. */
static void
test_unknown_family (void)
{
  g_autoptr(LpCheckpoint) ckpt = lp_checkpoint_new ();
  guint64 shape[] = { 4, 4 };
  g_autofree float *w = fill (16, 3);
  const char *const parts[] = {
    "lora_unet_x.diff", "lora_unet_x.oft_blocks",
    "base_model.model.q.lora_magnitude_vector.weight", NULL,
  };

  for (guint i = 0; parts[i]; i++)
    add_tensor (ckpt, parts[i], LP_DTYPE_F32, shape, 2, w);
  assert_no_module_error (ckpt, parts);
}

/* The stages run at rank 2 on modules of rank 2 or less, and say so with a
 * warning (whose text tests/pipelines/test-nothing-silent.sh checks); any
 * other warning still goes to GLib's writer and fails the test. */
static GLogWriterOutput
rank_kept_writer (GLogLevelFlags   level,
                  const GLogField *fields,
                  gsize            n_fields,
                  gpointer         user_data)
{
  for (gsize i = 0; i < n_fields; i++)
    if ((level & G_LOG_LEVEL_WARNING) && g_str_equal (fields[i].key, "MESSAGE")
        && strstr (fields[i].value, ", at or below rank=") != NULL)
      return G_LOG_WRITER_HANDLED;
  return g_log_writer_default (level, fields, n_fields, user_data);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_log_set_writer_func (rank_kept_writer, NULL, NULL);

  g_test_add_func ("/hostile-lora/nan-in-down", test_nan_down);
  g_test_add_func ("/hostile-lora/inf-in-up", test_inf_up);
  g_test_add_func ("/hostile-lora/largest-f16", test_largest_f16);
  g_test_add_func ("/hostile-lora/f16-overflow-on-write", test_f16_overflow_on_write);
  g_test_add_func ("/hostile-lora/f32-overflow-in-sums", test_f32_overflow_in_sums);
  g_test_add_func ("/hostile-lora/all-zero-module", test_zero_module);
  g_test_add_func ("/hostile-lora/zero-up", test_zero_up);
  g_test_add_func ("/hostile-lora/rank-1-module", test_rank_one);
  g_test_add_func ("/hostile-lora/rank-0-module", test_rank_zero);
  g_test_add_func ("/hostile-lora/shapes-disagree", test_shapes_disagree);
  g_test_add_func ("/hostile-lora/factor-1d", test_factor_1d);
  g_test_add_func ("/hostile-lora/integer-factors", test_integer_factors);
  g_test_add_func ("/hostile-lora/lone-factor", test_lone_factor);
  g_test_add_func ("/hostile-lora/alpha-wrong-shape", test_alpha_wrong_shape);
  g_test_add_func ("/hostile-lora/alpha-nan", test_alpha_nan);
  g_test_add_func ("/hostile-lora/alpha-inf", test_alpha_inf);
  g_test_add_func ("/hostile-lora/alpha-bool", test_alpha_bool);
  g_test_add_func ("/hostile-lora/alpha-zero", test_alpha_zero);
  g_test_add_func ("/hostile-lora/no-module", test_no_module);
  g_test_add_func ("/hostile-lora/unknown-family", test_unknown_family);
  return g_test_run ();
}
