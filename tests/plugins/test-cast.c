/* test-cast.c: the `cast` stage, checked bit for bit against numpy
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Usage (from meson): test-cast PYTHON ORACLE
 */

#include <math.h>
#include <string.h>
#include <glib/gstdio.h>

#include <lpipe/lpipe.h>

static const char *python;
static const char *oracle;

/* Messages of the convert plugin, captured so tests can check them. */
static GMutex messages_lock;
static GPtrArray *messages;
static GArray *levels;

static GLogWriterOutput
capture_writer (GLogLevelFlags   level,
                const GLogField *fields,
                gsize            n_fields,
                gpointer         user_data)
{
  const char *domain = NULL;
  const char *message = NULL;

  for (gsize i = 0; i < n_fields; i++)
    {
      if (g_str_equal (fields[i].key, "GLIB_DOMAIN"))
        domain = fields[i].value;
      else if (g_str_equal (fields[i].key, "MESSAGE"))
        message = fields[i].value;
    }
  if (g_strcmp0 (domain, "Lpipe-convert") == 0 && message != NULL)
    {
      g_mutex_lock (&messages_lock);
      g_ptr_array_add (messages, g_strdup (message));
      g_array_append_val (levels, level);
      g_mutex_unlock (&messages_lock);
      return G_LOG_WRITER_HANDLED;
    }
  return g_log_writer_default (level, fields, n_fields, user_data);
}

static void
clear_messages (void)
{
  g_mutex_lock (&messages_lock);
  g_ptr_array_set_size (messages, 0);
  g_array_set_size (levels, 0);
  g_mutex_unlock (&messages_lock);
}

/* The overflow count the stage reported for @name, 0 without a message. */
static guint64
reported_overflow (const char *name)
{
  g_autofree char *prefix = g_strdup_printf ("stage 'cast': tensor '%s': ", name);
  guint64 count = 0;

  g_mutex_lock (&messages_lock);
  for (guint i = 0; i < messages->len; i++)
    {
      const char *m = messages->pdata[i];
      if (g_str_has_prefix (m, prefix))
        count += g_ascii_strtoull (m + strlen (prefix), NULL, 10);
    }
  g_mutex_unlock (&messages_lock);
  return count;
}

static LpStage *
make_cast (const char *dtype_nick)
{
  g_autoptr(GError) error = NULL;
  LpStage *stage = lp_registry_create_stage (lp_registry_get_default (), "cast", &error);

  g_assert_no_error (error);
  g_assert_nonnull (stage);
  if (dtype_nick)
    {
      lp_stage_set_property_from_string (stage, "dtype", dtype_nick, &error);
      g_assert_no_error (error);
    }
  return stage;
}

static LpCheckpoint *
run_cast (LpStage       *stage,
          LpCheckpoint  *input,
          GError       **error)
{
  LpCheckpoint *output = NULL;

  if (!lp_stage_prepare (stage, error))
    return NULL;
  if (!lp_stage_run (stage, &input, 1, &output, error))
    return NULL;
  return output;
}

static guint64
xorshift64 (guint64 *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

#define N_VALUES 40000

/* f32 test values: every class of bit pattern, values in every target's
 * range, exact ties for each target, and the edges. */
static float *
make_f32 (guint64 seed)
{
  static const float edges[] = {
    0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 1.0f, -1.0f,
    65504.0f, 65519.0f, 65520.0f, -65520.0f, 65536.0f, 448.0f, 464.0f, 465.0f, 480.0f,
    57344.0f, 61439.0f, 61440.0f, 0x1p-24f, 0x1p-25f, 0x3p-25f, 0x1p-14f, 0x1p-9f, 0x1p-10f,
    0x1p-16f, 0x1p-17f, 0x1p-133f, 0x1p-134f, 0x1p-149f, 0x1p-126f, 0x1.fffffep127f,
    0x1.fep127f, 0x1.ffp127f, 1.0f + 0x1p-8f, 1.0f + 0x1p-11f, 1.0f + 0x1p-4f,
  };
  /* low bits to clear and the half ulp to set: ties for f16, bf16, e4m3, e5m2 */
  static const guint32 tie_mask[] = { 0x1fff, 0xffff, 0xfffff, 0x1fffff };
  float *v = g_new (float, N_VALUES);
  guint32 *u = (guint32 *) v;

  for (gsize i = 0; i < N_VALUES; i++)
    {
      guint64 r = xorshift64 (&seed);
      guint32 bits = (guint32) r;

      switch (i % 4)
        {
        case 0:   /* anything, NaNs and subnormals included */
          u[i] = bits;
          break;
        case 1:   /* exponents 2^-30 .. 2^20, where the narrow types live */
          u[i] = (bits & 0x807fffffu) | ((97u + (guint32) ((r >> 40) % 51)) << 23);
          break;
        default:  /* exact ties (and near them) for one of the targets */
          {
            guint32 mask = tie_mask[(r >> 33) % 4];
            u[i] = (bits & 0x807fffffu) | ((97u + (guint32) ((r >> 40) % 51)) << 23);
            u[i] = (u[i] & ~mask) | ((mask + 1) >> 1);
            if (i % 4 == 3 && (r >> 50) & 1)
              u[i] += (r >> 51) & 1 ? 1 : -1;
          }
          break;
        }
    }
  memcpy (v, edges, sizeof edges);
  return v;
}

/* f64 test values: the f32 ones widened, plus values only f64 holds: ties
 * of the narrow types disturbed below f32's precision, which rounding
 * through f32 would get wrong, and magnitudes past f32's range. */
static double *
make_f64 (guint64 seed)
{
  g_autofree float *f = make_f32 (seed);
  double *d = g_new (double, N_VALUES);

  for (gsize i = 0; i < N_VALUES; i++)
    {
      guint64 r = xorshift64 (&seed);
      d[i] = f[i];
      if (i % 3 == 0 && isfinite (f[i]) && f[i] != 0)
        d[i] = f[i] * (1.0 + ((r & 1) ? 0x1p-40 : -0x1p-40));
      else if (i % 3 == 1)
        {
          guint64 u = (r & G_GUINT64_CONSTANT (0x800fffffffffffff))
                      | ((guint64) (990 + (r >> 53) % 60) << 52);
          memcpy (&d[i], &u, 8);
        }
    }
  d[N_VALUES - 1] = 1e300;
  d[N_VALUES - 2] = -1e300;
  d[N_VALUES - 3] = 1.0 + 0x1p-11 + 0x1p-40;
  return d;
}

static LpTensor *
tensor_from (const char *name,
             LpDtype     dtype,
             gconstpointer data,
             gsize       n)
{
  g_autoptr(GError) error = NULL;
  guint64 shape[2] = { n / 100, 100 };
  g_autoptr(GBytes) bytes = g_bytes_new (data, n * lp_dtype_get_bits (dtype) / 8);
  LpTensor *t = lp_tensor_new (name, dtype, shape, 2, bytes, &error);

  g_assert_no_error (error);
  return t;
}

/* Every float source cast to every target, written out with the stage's
 * output for the numpy oracle to recompute. */
static void
test_numpy (void)
{
  static const char *targets[] = { "bf16", "f16", "f8-e4m3", "f8-e5m2", "f32", "f64" };
  g_autoptr(GError) error = NULL;
  g_autofree char *dir = g_dir_make_tmp ("lpipe-cast-XXXXXX", &error);
  g_autoptr(GString) manifest = g_string_new ("[\n");
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autofree float *f32 = make_f32 (0x1234567);
  g_autofree double *f64 = make_f64 (0x7654321);
  g_autofree guint16 *bf16 = g_new (guint16, N_VALUES);
  g_autofree guint16 *f16 = g_new (guint16, N_VALUES);
  guint64 s = 42;
  guint n_cases = 0;

  g_assert_no_error (error);

  /* bf16 and f16 sources: raw codes, every one possible */
  for (gsize i = 0; i < N_VALUES; i++)
    {
      bf16[i] = (guint16) xorshift64 (&s);
      f16[i] = (guint16) xorshift64 (&s);
    }

  const struct { const char *name; LpDtype dtype; gconstpointer data; } sources[] = {
    { "w.f32", LP_DTYPE_F32, f32 },
    { "w.f64", LP_DTYPE_F64, f64 },
    { "w.bf16", LP_DTYPE_BF16, bf16 },
    { "w.f16", LP_DTYPE_F16, f16 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (sources); i++)
    {
      g_autoptr(LpTensor) t = tensor_from (sources[i].name, sources[i].dtype, sources[i].data, N_VALUES);
      g_autofree char *path = g_build_filename (dir, sources[i].name, NULL);

      g_assert_true (lp_checkpoint_add_tensor (input, t, &error));
      g_file_set_contents (path, sources[i].data, N_VALUES * lp_dtype_get_bits (sources[i].dtype) / 8, &error);
      g_assert_no_error (error);
    }

  for (guint k = 0; k < G_N_ELEMENTS (targets); k++)
    {
      g_autoptr(LpStage) stage = make_cast (targets[k]);
      g_autoptr(LpCheckpoint) output = NULL;
      LpDtype target;

      /* the oracle checks the values written where they overflow, too */
      g_object_set (stage, "allow-overflow", TRUE, NULL);
      g_object_get (stage, "dtype", &target, NULL);
      clear_messages ();
      output = run_cast (stage, input, &error);
      g_assert_no_error (error);
      g_assert_cmpuint (lp_checkpoint_get_n_tensors (output), ==, G_N_ELEMENTS (sources));

      for (guint i = 0; i < G_N_ELEMENTS (sources); i++)
        {
          LpTensor *t = lp_checkpoint_get_tensor (output, i);
          g_autoptr(GBytes) bytes = NULL;
          g_autofree char *out_name = g_strdup_printf ("%s.to-%s", sources[i].name, targets[k]);
          g_autofree char *path = g_build_filename (dir, out_name, NULL);
          gsize size;
          gconstpointer data;

          g_assert_cmpstr (lp_tensor_get_name (t), ==, sources[i].name);
          g_assert_cmpint (lp_tensor_get_dtype (t), ==, target);
          g_assert_cmpuint (lp_tensor_get_n_dims (t), ==, 2);
          g_assert_cmpuint (lp_tensor_get_dim (t, 0), ==, N_VALUES / 100);
          if (sources[i].dtype == target)
            g_assert_true (t == lp_checkpoint_get_tensor (input, i));
          else
            g_assert_true (lp_tensor_is_lazy (t));

          bytes = lp_tensor_dup_data (t, &error);
          g_assert_no_error (error);
          data = g_bytes_get_data (bytes, &size);
          g_file_set_contents (path, data, size, &error);
          g_assert_no_error (error);

          g_string_append_printf (manifest,
                                  "%s{\"name\": \"%s\", \"src\": \"%s\", \"dst\": \"%s\", \"n\": %d, "
                                  "\"input\": \"%s\", \"output\": \"%s\", \"overflow\": %" G_GUINT64_FORMAT "}\n",
                                  n_cases++ ? "," : "", out_name,
                                  lp_dtype_to_string (sources[i].dtype), lp_dtype_to_string (target),
                                  N_VALUES, sources[i].name, out_name, reported_overflow (sources[i].name));
        }
    }
  g_string_append (manifest, "]\n");

  g_autofree char *manifest_path = g_build_filename (dir, "manifest.json", NULL);
  g_file_set_contents (manifest_path, manifest->str, -1, &error);
  g_assert_no_error (error);

  const char *argv[] = { python, oracle, dir, NULL };
  g_autofree char *out = NULL;
  g_autofree char *err = NULL;
  int status = 0;
  g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL, &out, &err, &status, &error);
  g_assert_no_error (error);
  g_test_message ("oracle: %s%s", out, err);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("the numpy oracle disagrees:\n%s%s", out, err);
  g_assert_nonnull (strstr (out, "0 failures"));

  /* clean up */
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  const char *entry;
  while (d && (entry = g_dir_read_name (d)))
    {
      g_autofree char *p = g_build_filename (dir, entry, NULL);
      g_unlink (p);
    }
  g_rmdir (dir);
}

/* Integer, bool and complex tensors and ones already of the target dtype
 * come through as the very same objects; metadata is kept. */
static void
test_passthrough (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) output = NULL;
  g_autoptr(LpStage) stage = make_cast ("f16");
  const guint8 raw[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };
  const LpDtype kept[] = { LP_DTYPE_I64, LP_DTYPE_BOOL, LP_DTYPE_U8, LP_DTYPE_I32, LP_DTYPE_C64, LP_DTYPE_F16 };

  for (guint i = 0; i < G_N_ELEMENTS (kept); i++)
    {
      g_autofree char *name = g_strdup_printf ("t%u", i);
      gsize n = 16 / (lp_dtype_get_bits (kept[i]) / 8);
      guint64 shape[1] = { n };
      g_autoptr(GBytes) bytes = g_bytes_new (raw, 16);
      g_autoptr(LpTensor) t = lp_tensor_new (name, kept[i], shape, 1, bytes, &error);
      g_assert_no_error (error);
      g_assert_true (lp_checkpoint_add_tensor (input, t, &error));
    }
  lp_checkpoint_set_metadata (input, "format", "pt");
  lp_checkpoint_set_adapter_config (input, "{\"r\": 4}");

  output = run_cast (stage, input, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (output), ==, G_N_ELEMENTS (kept));
  for (guint i = 0; i < G_N_ELEMENTS (kept); i++)
    g_assert_true (lp_checkpoint_get_tensor (output, i) == lp_checkpoint_get_tensor (input, i));
  g_assert_cmpstr (lp_checkpoint_get_metadata (output, "format"), ==, "pt");
  g_assert_cmpstr (lp_checkpoint_get_adapter_config (output), ==, "{\"r\": 4}");
}

static LpCheckpoint *
named_f32_checkpoint (const char * const *names)
{
  g_autoptr(GError) error = NULL;
  LpCheckpoint *ckpt = lp_checkpoint_new ();
  const float values[4] = { 1.0f, 2.5f, -3.0f, 1e-3f };

  for (guint i = 0; names[i]; i++)
    {
      guint64 shape[1] = { 4 };
      g_autoptr(LpTensor) t = lp_tensor_new_from_f32 (names[i], LP_DTYPE_F32, shape, 1, values, 4, &error);
      g_assert_no_error (error);
      g_assert_true (lp_checkpoint_add_tensor (ckpt, t, &error));
    }
  return ckpt;
}

static void
test_include_exclude (void)
{
  const char * const names[] = {
    "transformer.blocks.0.attn.to_q.weight",
    "transformer.blocks.0.attn.to_q.bias",
    "transformer.blocks.1.mlp.weight",
    "text_encoder.embed.weight",
    NULL
  };
  const struct {
    const char *include;
    const char *exclude;
    const char *converted;   /* one letter per tensor: c converted, k kept */
  } cases[] = {
    { NULL, NULL, "cccc" },
    { "transformer.*", NULL, "ccck" },
    { "*.weight", "*.attn.*", "kkcc" },
    { "transformer.*,text_encoder.*", "*.bias", "ckcc" },
    { NULL, "*", "kkkk" },
    { "*.blocks.?.mlp.*", NULL, "kkck" },
  };

  for (guint c = 0; c < G_N_ELEMENTS (cases); c++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpCheckpoint) input = named_f32_checkpoint (names);
      g_autoptr(LpCheckpoint) output = NULL;
      g_autoptr(LpStage) stage = make_cast ("bf16");

      if (cases[c].include)
        {
          lp_stage_set_property_from_string (stage, "include", cases[c].include, &error);
          g_assert_no_error (error);
        }
      if (cases[c].exclude)
        {
          lp_stage_set_property_from_string (stage, "exclude", cases[c].exclude, &error);
          g_assert_no_error (error);
        }
      output = run_cast (stage, input, &error);
      g_assert_no_error (error);

      for (guint i = 0; names[i]; i++)
        {
          LpTensor *t = lp_checkpoint_get_tensor (output, i);
          gboolean converted = cases[c].converted[i] == 'c';

          g_assert_cmpstr (lp_tensor_get_name (t), ==, names[i]);
          g_assert_cmpint (lp_tensor_get_dtype (t), ==, converted ? LP_DTYPE_BF16 : LP_DTYPE_F32);
          g_assert_true ((t == lp_checkpoint_get_tensor (input, i)) == !converted);
          if (converted)
            {
              gsize n;
              g_autofree float *back = lp_tensor_dup_f32 (t, &n, &error);
              g_assert_no_error (error);
              g_assert_cmpuint (n, ==, 4);
              g_assert_cmpfloat (back[1], ==, 2.5f);
              g_assert_cmpfloat (back[3], ==, 0x1.06p-10f);   /* 1e-3 rounded to 8 bits */
            }
        }
    }
}

/* A float dtype lpipe cannot convert is an error naming the tensor, unless
 * excluded; then it passes through. */
static void
test_unsupported (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) output = NULL;
  g_autoptr(LpStage) stage = make_cast ("f16");
  const guint8 raw[4] = { 0x12, 0x34, 0x56, 0x78 };
  guint64 shape[1] = { 8 };
  g_autoptr(GBytes) bytes = g_bytes_new (raw, 4);
  g_autoptr(LpTensor) t = lp_tensor_new ("scales.fp4", LP_DTYPE_F4, shape, 1, bytes, &error);

  g_assert_no_error (error);
  g_assert_true (lp_checkpoint_add_tensor (input, t, &error));

  output = run_cast (stage, input, &error);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT);
  g_assert_nonnull (strstr (error->message, "scales.fp4"));
  g_assert_nonnull (strstr (error->message, "F4"));
  g_assert_null (output);
  g_clear_error (&error);

  lp_stage_set_property_from_string (stage, "exclude", "scales.*", &error);
  g_assert_no_error (error);
  output = run_cast (stage, input, &error);
  g_assert_no_error (error);
  g_assert_true (lp_checkpoint_get_tensor (output, 0) == t);
}

static void
test_bad_properties (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpStage) unset = make_cast (NULL);
  g_autoptr(LpStage) stage = make_cast (NULL);

  g_assert_false (lp_stage_prepare (unset, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_MISSING_PROPERTY);
  g_clear_error (&error);

  /* a dtype cast cannot write is refused when it is set, with the ones it can */
  g_assert_false (lp_stage_set_property_from_string (stage, "dtype", "i32", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_assert_cmpstr (error->message, ==, "property 'dtype': 'i32' is I32, which lpipe cannot convert to; "
                   "expected enum: f64|f32|f16|bf16|f8-e4m3|f8-e5m2");
  g_clear_error (&error);
  g_assert_false (lp_stage_set_property_from_string (stage, "dtype", "float8_e4m3fnuz", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_assert_nonnull (strstr (error->message, "is F8_E4M3FNUZ, which lpipe cannot convert to"));
  g_clear_error (&error);

  g_assert_false (lp_stage_set_property_from_string (stage, "dtype", "f17", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_clear_error (&error);

  g_assert_true (lp_stage_class_is_property_required (LP_STAGE_GET_CLASS (stage), "dtype"));
  g_assert_cmpstr (lp_stage_get_stage_name (stage), ==, "cast");
}

/* The dtype property offers exactly the dtypes cast writes, the ones
 * lp_dtype_can_convert() accepts, and reads them as torch and kohya users
 * type them (kohya sd-scripts' library/utils.py str_to_dtype(), torch's
 * dtype names). */
static void
test_dtype_values (void)
{
  g_autoptr(LpStage) stage = make_cast (NULL);
  GParamSpec *pspec = g_object_class_find_property (G_OBJECT_GET_CLASS (stage), "dtype");
  GEnumClass *klass = G_PARAM_SPEC_ENUM (pspec)->enum_class;
  guint n_convertible = 0;
  static const struct { const char *text; LpDtype dtype; } spellings[] = {
    { "float16", LP_DTYPE_F16 }, { "half", LP_DTYPE_F16 }, { "fp16", LP_DTYPE_F16 }, { "F16", LP_DTYPE_F16 },
    { "torch.float16", LP_DTYPE_F16 }, { "FP16", LP_DTYPE_F16 },
    { "float", LP_DTYPE_F32 }, { "float32", LP_DTYPE_F32 }, { "fp32", LP_DTYPE_F32 },
    { "bfloat16", LP_DTYPE_BF16 }, { "bf16", LP_DTYPE_BF16 }, { "torch.bfloat16", LP_DTYPE_BF16 },
    { "double", LP_DTYPE_F64 }, { "float64", LP_DTYPE_F64 },
    { "fp8", LP_DTYPE_F8_E4M3 }, { "fp8_e4m3fn", LP_DTYPE_F8_E4M3 }, { "f8_e4m3", LP_DTYPE_F8_E4M3 },
    { "float8_e5m2", LP_DTYPE_F8_E5M2 }, { "e5m2", LP_DTYPE_F8_E5M2 },
  };

  for (guint d = 0; d < LP_DTYPE_N_TYPES; d++)
    {
      g_assert_cmpint (g_enum_get_value (klass, d) != NULL, ==, lp_dtype_can_convert (d));
      n_convertible += lp_dtype_can_convert (d);
    }
  g_assert_cmpuint (klass->n_values, ==, n_convertible);
  g_assert_cmpuint (klass->n_values, ==, 6);

  for (guint i = 0; i < G_N_ELEMENTS (spellings); i++)
    {
      g_autoptr(GError) error = NULL;
      LpDtype got;

      lp_stage_set_property_from_string (stage, "dtype", spellings[i].text, &error);
      g_assert_no_error (error);
      g_object_get (stage, "dtype", &got, NULL);
      if (got != spellings[i].dtype)
        g_test_fail_printf ("dtype=%s gives %s, not %s", spellings[i].text,
                            lp_dtype_to_string (got), lp_dtype_to_string (spellings[i].dtype));
    }
}

static LpCheckpoint *
overflowing_input (void)
{
  g_autoptr(GError) error = NULL;
  LpCheckpoint *input = lp_checkpoint_new ();
  const float big[5] = { 70000.0f, -1e6f, 1.0f, INFINITY, 65519.0f };
  const float small[2] = { 1.0f, 2.0f };
  guint64 s5[1] = { 5 }, s2[1] = { 2 };
  g_autoptr(LpTensor) a = lp_tensor_new_from_f32 ("big", LP_DTYPE_F32, s5, 1, big, 5, &error);
  g_autoptr(LpTensor) b = lp_tensor_new_from_f32 ("small", LP_DTYPE_F32, s2, 1, small, 2, &error);

  g_assert_no_error (error);
  lp_checkpoint_add_tensor (input, b, NULL);
  lp_checkpoint_add_tensor (input, a, NULL);
  return input;
}

/* Values too large for the target fail by default, naming the tensor and the
 * count, and pointing at bf16 (f32's range) or at allow-overflow. The
 * infinity already in the input is not counted: it is not an overflow. */
static void
test_overflow_error (void)
{
  static const struct { const char *dtype; const char *message; } cases[] = {
    { "f16", "stage 'cast': tensor 'big': 2 of 5 values are too large for F16 and would become inf; "
             "cast to bf16, which has f32's range, or set allow-overflow=true to write them so" },
    { "f8-e4m3", "stage 'cast': tensor 'big': 3 of 5 values are too large for F8_E4M3 and would become NaN; "
                 "cast to bf16, which has f32's range, or set allow-overflow=true to write them so" },
  };
  g_autoptr(LpCheckpoint) input = overflowing_input ();

  for (guint k = 0; k < G_N_ELEMENTS (cases); k++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpStage) stage = make_cast (cases[k].dtype);
      g_autoptr(LpCheckpoint) output = run_cast (stage, input, &error);
      g_autoptr(GBytes) fine = NULL, bytes = NULL;

      g_assert_no_error (error);
      clear_messages ();
      fine = lp_tensor_dup_data (lp_checkpoint_get_tensor (output, 0), &error);
      g_assert_no_error (error);
      bytes = lp_tensor_dup_data (lp_checkpoint_get_tensor (output, 1), &error);
      g_assert_null (bytes);
      g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
      g_assert_cmpstr (error->message, ==, cases[k].message);
      g_assert_cmpuint (messages->len, ==, 0);
    }
}

/* allow-overflow=true writes them as torch does, and each tensor where it
 * happened gets one warning (level WARNING, so lpipe prints it as a
 * warning and -q silences it). */
static void
test_overflow_allowed (void)
{
  g_autoptr(LpCheckpoint) input = overflowing_input ();

  for (guint k = 0; k < 2; k++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpStage) stage = make_cast (k == 0 ? "f16" : "f8-e4m3");
      g_autoptr(LpCheckpoint) output = NULL;

      g_object_set (stage, "allow-overflow", TRUE, NULL);
      clear_messages ();
      output = run_cast (stage, input, &error);
      g_assert_no_error (error);
      /* lazy: nothing is said until the data is computed */
      g_assert_cmpuint (messages->len, ==, 0);
      for (guint i = 0; i < 2; i++)
        {
          g_autoptr(GBytes) bytes = lp_tensor_dup_data (lp_checkpoint_get_tensor (output, i), &error);
          g_assert_no_error (error);
        }
      g_assert_cmpuint (messages->len, ==, 1);
      g_assert_cmpuint (levels->len, ==, 1);
      g_assert_cmpint (g_array_index (levels, GLogLevelFlags, 0) & G_LOG_LEVEL_MASK, ==, G_LOG_LEVEL_WARNING);
      if (k == 0)
        g_assert_cmpstr (messages->pdata[0], ==, "stage 'cast': tensor 'big': 2 of 5 values overflowed to inf in F16");
      else
        g_assert_cmpstr (messages->pdata[0], ==, "stage 'cast': tensor 'big': 3 of 5 values overflowed to NaN in F8_E4M3");
    }
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  if (argc < 3)
    {
      g_printerr ("usage: %s PYTHON ORACLE\n", argv[0]);
      return 1;
    }
  python = argv[1];
  oracle = argv[2];

  messages = g_ptr_array_new_with_free_func (g_free);
  levels = g_array_new (FALSE, FALSE, sizeof (GLogLevelFlags));
  /* the convert plugin's warnings are captured and checked, not fatal */
  g_log_set_always_fatal (G_LOG_FATAL_MASK | G_LOG_LEVEL_CRITICAL);
  g_log_set_writer_func (capture_writer, NULL, NULL);

  g_test_add_func ("/stage/cast/numpy", test_numpy);
  g_test_add_func ("/stage/cast/passthrough", test_passthrough);
  g_test_add_func ("/stage/cast/include-exclude", test_include_exclude);
  g_test_add_func ("/stage/cast/unsupported", test_unsupported);
  g_test_add_func ("/stage/cast/bad-properties", test_bad_properties);
  g_test_add_func ("/stage/cast/dtype-values", test_dtype_values);
  g_test_add_func ("/stage/cast/overflow-error", test_overflow_error);
  g_test_add_func ("/stage/cast/overflow-allowed", test_overflow_allowed);

  return g_test_run ();
}
