/* test-lora.c: LoRA module pairing, scales and the adapter config of reduced files
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <json-glib/json-glib.h>
#include <lpipe/lpipe.h>
#include <math.h>
#include <string.h>

/* A tensor of @n_dims dims (shape given as varargs-free array) filled with
 * 0.5, 1.5, ... so that every tensor holds real data. */
static LpTensor *
make_tensor (const char    *name,
             LpDtype        dtype,
             const guint64 *shape,
             guint          n_dims)
{
  g_autoptr(GError) error = NULL;
  g_autofree float *values = NULL;
  guint64 n = 1;
  LpTensor *tensor;

  for (guint i = 0; i < n_dims; i++)
    n *= shape[i];
  values = g_new (float, MAX (n, 1));
  for (guint64 i = 0; i < n; i++)
    values[i] = i + 0.5f;
  tensor = lp_tensor_new_from_f32 (name, dtype, shape, n_dims, values, n, &error);
  g_assert_no_error (error);
  return tensor;
}

typedef struct {
  const char *name;
  guint n_dims;
  guint64 shape[4];
  LpDtype dtype;      /* 0 (BOOL) means F32 here: no test uses BOOL factors */
  double value;       /* for 1-element tensors: the value, when nonzero */
} Spec;

#define F32 LP_DTYPE_BOOL

static LpCheckpoint *
make_checkpoint (const Spec *specs,
                 guint       n_specs,
                 const char *adapter_config)
{
  LpCheckpoint *checkpoint = lp_checkpoint_new ();

  for (guint i = 0; i < n_specs; i++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpTensor) tensor = NULL;
      LpDtype dtype = specs[i].dtype == F32 ? LP_DTYPE_F32 : specs[i].dtype;

      if (specs[i].value != 0)
        {
          float v = specs[i].value;
          tensor = lp_tensor_new_from_f32 (specs[i].name, dtype, specs[i].shape,
                                           specs[i].n_dims, &v, 1, &error);
          g_assert_no_error (error);
        }
      else if (!lp_dtype_can_convert (dtype))
        {
          guint64 n = 1;
          gsize n_bytes;

          for (guint d = 0; d < specs[i].n_dims; d++)
            n *= specs[i].shape[d];
          n_bytes = (n * lp_dtype_get_bits (dtype) + 7) / 8;
          tensor = lp_tensor_new (specs[i].name, dtype, specs[i].shape, specs[i].n_dims,
                                  g_bytes_new_take (g_malloc0 (MAX (n_bytes, 1)), n_bytes),
                                  &error);
          g_assert_no_error (error);
        }
      else
        tensor = make_tensor (specs[i].name, dtype, specs[i].shape, specs[i].n_dims);
      lp_checkpoint_add_tensor (checkpoint, tensor, &error);
      g_assert_no_error (error);
    }
  if (adapter_config != NULL)
    lp_checkpoint_set_adapter_config (checkpoint, adapter_config);
  return checkpoint;
}

static GPtrArray *
find (const Spec  *specs,
      guint        n_specs,
      const char  *adapter_config,
      GPtrArray  **others)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint (specs, n_specs, adapter_config);
  GPtrArray *modules;

  modules = lp_lora_find_modules (checkpoint, NULL, NULL, others, &error);
  g_assert_no_error (error);
  g_assert_nonnull (modules);
  return modules;
}

static void
assert_module (GPtrArray        *modules,
               guint             index,
               const char       *name,
               LpLoraConvention  convention,
               guint             rank,
               guint64           in,
               guint64           out,
               double            scale)
{
  LpLoraModule *module;

  g_assert_cmpuint (index, <, modules->len);
  module = g_ptr_array_index (modules, index);
  g_assert_cmpstr (lp_lora_module_get_name (module), ==, name);
  g_assert_cmpint (lp_lora_module_get_convention (module), ==, convention);
  g_assert_cmpuint (lp_lora_module_get_rank (module), ==, rank);
  g_assert_cmpuint (lp_lora_module_get_in_features (module), ==, in);
  g_assert_cmpuint (lp_lora_module_get_out_features (module), ==, out);
  g_assert_cmpfloat_with_epsilon (lp_lora_module_get_scale (module), scale, 1e-12);
}

static void
assert_others (GPtrArray          *others,
               const char * const *names)
{
  guint n = g_strv_length ((GStrv) names);

  g_assert_cmpuint (others->len, ==, n);
  for (guint i = 0; i < n; i++)
    g_assert_cmpstr (lp_tensor_get_name (g_ptr_array_index (others, i)), ==, names[i]);
}

static void
test_peft (void)
{
  const Spec specs[] = {
    { "base_model.model.classifier.weight", 2, { 2, 8 } },
    { "base_model.model.m.layers.0.q.lora_A.weight", 2, { 4, 16 } },
    { "base_model.model.m.layers.0.q.lora_B.weight", 2, { 8, 4 } },
    { "base_model.model.m.layers.0.q.lora_magnitude_vector", 1, { 8 } },
    { "base_model.model.m.layers.0.v.lora_B.weight", 2, { 6, 4 } },
    { "base_model.model.m.layers.0.v.lora_A.weight", 2, { 4, 16 } },
    { "base_model.model.classifier.bias", 1, { 2 } },
  };
  /* the magnitude (PEFT's lora_magnitude_vector, as PEFT 0.10's
   * ParameterDict saved it) is part of module q */
  const char *expected_others[] = {
    "base_model.model.classifier.weight",
    "base_model.model.classifier.bias", NULL
  };
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  LpLoraModule *module;

  modules = find (specs, G_N_ELEMENTS (specs), "{\"r\": 4, \"lora_alpha\": 8}", &others);
  g_assert_cmpuint (modules->len, ==, 2);
  assert_module (modules, 0, "base_model.model.m.layers.0.q", LP_LORA_CONVENTION_PEFT, 4, 16, 8, 2.0);
  assert_module (modules, 1, "base_model.model.m.layers.0.v", LP_LORA_CONVENTION_PEFT, 4, 16, 6, 2.0);
  assert_others (others, expected_others);

  module = g_ptr_array_index (modules, 0);
  g_assert_true (lp_lora_module_is_dora (module));
  g_assert_cmpstr (lp_lora_module_get_family (module), ==, "peft");
  g_assert_false (lp_lora_module_is_dora (g_ptr_array_index (modules, 1)));
  g_assert_cmpstr (lp_lora_module_get_peft_key (module), ==, "m.layers.0.q");
  g_assert_cmpstr (lp_tensor_get_name (lp_lora_module_get_down (module)), ==,
                   "base_model.model.m.layers.0.q.lora_A.weight");
  g_assert_cmpstr (lp_tensor_get_name (lp_lora_module_get_up (module)), ==,
                   "base_model.model.m.layers.0.q.lora_B.weight");
  g_assert_null (lp_lora_module_get_alpha (module));
  /* PEFT keeps its scale in the config: nothing to fold, no alpha tensor */
  g_assert_cmpfloat (lp_lora_module_get_fold_scale (module), ==, 1.0);
  g_assert_null (lp_lora_module_new_alpha (module, 2));
  g_assert_false (lp_lora_module_is_conv (module));
}

static void
test_peft_defaults_and_rslora (void)
{
  const Spec specs[] = {
    { "base_model.model.q.lora_A.weight", 2, { 8, 3 } },
    { "base_model.model.q.lora_B.weight", 2, { 5, 8 } },
  };
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) rs = NULL;

  /* PEFT's defaults: r = 8, lora_alpha = 8 */
  modules = find (specs, G_N_ELEMENTS (specs), "{}", NULL);
  assert_module (modules, 0, "base_model.model.q", LP_LORA_CONVENTION_PEFT, 8, 3, 5, 1.0);

  rs = find (specs, G_N_ELEMENTS (specs),
             "{\"r\": 8, \"lora_alpha\": 16, \"use_rslora\": true}", NULL);
  assert_module (rs, 0, "base_model.model.q", LP_LORA_CONVENTION_PEFT, 8, 3, 5, 16 / sqrt (8));
}

static void
test_peft_patterns (void)
{
  const Spec specs[] = {
    { "base_model.model.layers.0.q.lora_A.weight", 2, { 2, 4 } },
    { "base_model.model.layers.0.q.lora_B.weight", 2, { 4, 2 } },
    { "base_model.model.layers.0.v.lora_A.weight", 2, { 4, 4 } },
    { "base_model.model.layers.0.v.lora_B.weight", 2, { 4, 4 } },
    { "base_model.model.layers.1.q.lora_A.weight", 2, { 2, 4 } },
    { "base_model.model.layers.1.q.lora_B.weight", 2, { 4, 2 } },
    /* "q" must not match "xq": PEFT matches whole dotted components */
    { "base_model.model.layers.1.xq.lora_A.weight", 2, { 4, 4 } },
    { "base_model.model.layers.1.xq.lora_B.weight", 2, { 4, 4 } },
  };
  g_autoptr(GPtrArray) modules = NULL;

  modules = find (specs, G_N_ELEMENTS (specs),
                  "{\"r\": 4, \"lora_alpha\": 8,"
                  " \"rank_pattern\": {\"q\": 2},"
                  " \"alpha_pattern\": {\"layers.1.q\": 6, \"q\": 7}}", NULL);
  g_assert_cmpuint (modules->len, ==, 4);
  /* the first matching key wins: layers.0.q gets alpha 7, layers.1.q alpha 6 */
  assert_module (modules, 0, "base_model.model.layers.0.q", LP_LORA_CONVENTION_PEFT, 2, 4, 4, 3.5);
  assert_module (modules, 1, "base_model.model.layers.0.v", LP_LORA_CONVENTION_PEFT, 4, 4, 4, 2.0);
  assert_module (modules, 2, "base_model.model.layers.1.q", LP_LORA_CONVENTION_PEFT, 2, 4, 4, 3.0);
  assert_module (modules, 3, "base_model.model.layers.1.xq", LP_LORA_CONVENTION_PEFT, 4, 4, 4, 2.0);
}

static void
test_diffusers (void)
{
  const Spec specs[] = {
    { "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", 2, { 3, 12 } },
    { "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight", 2, { 12, 3 } },
    { "unet.down_blocks.0.attn1.to_k.lora.down.weight", 2, { 2, 6 } },
    { "unet.down_blocks.0.attn1.to_k.lora.up.weight", 2, { 7, 2 } },
    { "unet.mid.attn1.processor.to_q_lora.down.weight", 2, { 1, 5 } },
    { "unet.mid.attn1.processor.to_q_lora.up.weight", 2, { 5, 1 } },
  };
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = NULL;

  modules = find (specs, G_N_ELEMENTS (specs), NULL, &others);
  g_assert_cmpuint (modules->len, ==, 3);
  assert_module (modules, 0, "transformer.single_transformer_blocks.0.attn.to_q",
                 LP_LORA_CONVENTION_DIFFUSERS, 3, 12, 12, 1.0);
  assert_module (modules, 1, "unet.down_blocks.0.attn1.to_k",
                 LP_LORA_CONVENTION_DIFFUSERS_OLD, 2, 6, 7, 1.0);
  assert_module (modules, 2, "unet.mid.attn1.processor.to_q",
                 LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR, 1, 5, 5, 1.0);
  g_assert_cmpuint (others->len, ==, 0);
  g_assert_null (lp_lora_module_get_peft_key (g_ptr_array_index (modules, 0)));
}

/* LyCORIS Tucker modules (LohaModule / LokrModule with use_tucker): the
 * out side of each product is stored [r, out], the in side [r, in] with a
 * core [r, r, kh, kw]; the finder read them as products of [r, out] by
 * [r, in] and found no module. */
static void
test_lycoris_tucker (void)
{
  const Spec specs[] = {
    { "lora_unet_c.alpha", 0, { 0 }, LP_DTYPE_F16, 1.5 },
    { "lora_unet_c.hada_t1", 4, { 3, 3, 3, 3 } },
    { "lora_unet_c.hada_t2", 4, { 3, 3, 3, 3 } },
    { "lora_unet_c.hada_w1_a", 2, { 3, 24 } },
    { "lora_unet_c.hada_w1_b", 2, { 3, 8 } },
    { "lora_unet_c.hada_w2_a", 2, { 3, 24 } },
    { "lora_unet_c.hada_w2_b", 2, { 3, 8 } },
    { "lora_unet_e.alpha", 0, { 0 }, LP_DTYPE_F16, 3.0 },
    { "lora_unet_e.lokr_t2", 4, { 3, 3, 3, 3 } },
    { "lora_unet_e.lokr_w1", 2, { 2, 2 } },
    { "lora_unet_e.lokr_w2_a", 2, { 3, 16 } },
    { "lora_unet_e.lokr_w2_b", 2, { 3, 8 } },
  };
  g_autoptr(GPtrArray) modules = find (specs, G_N_ELEMENTS (specs), NULL, NULL);

  g_assert_cmpuint (modules->len, ==, 2);
  /* LoHa: out 24, in 8 · 3 · 3, scale alpha / r */
  assert_module (modules, 0, "lora_unet_c", LP_LORA_CONVENTION_LOHA, 3, 72, 24, 0.5);
  /* LoKr: kron ([2, 2], [16, 8 · 9]), rank bound 2 · 3, scale alpha / lora_dim */
  assert_module (modules, 1, "lora_unet_e", LP_LORA_CONVENTION_LOKR, 6, 144, 32, 1.0);
}

static void
test_kohya (void)
{
  const Spec specs[] = {
    /* kohya sorts its keys: the alpha comes before the factors */
    { "lora_unet_a.alpha", 0, { 0 }, LP_DTYPE_F16, 2.0 },
    { "lora_unet_a.lora_down.weight", 2, { 4, 6 }, LP_DTYPE_F16 },
    { "lora_unet_a.lora_up.weight", 2, { 5, 4 }, LP_DTYPE_F16 },
    { "lora_unet_b.lora_down.weight", 2, { 4, 6 } },
    { "lora_unet_b.lora_up.weight", 2, { 5, 4 } },
    { "lora_unet_b.dora_scale", 2, { 1, 6 } },
    { "diffusion_model.x.lora_up.weight", 2, { 3, 2 }, LP_DTYPE_BF16 },
    { "diffusion_model.x.lora_down.weight", 2, { 2, 3 }, LP_DTYPE_BF16 },
    { "diffusion_model.x.alpha", 1, { 1 }, LP_DTYPE_F32, 8.0 },
    { "lora_te_emb.alpha", 0, { 0 }, LP_DTYPE_F32, 3.0 },   /* no module: passes through */
    { "emb_params", 2, { 2, 4 } },
  };
  /* the DoRA magnitude is part of its module (lp-lora-family-dora.c) */
  const char *expected_others[] = {
    "lora_te_emb.alpha", "emb_params", NULL
  };
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(LpTensor) alpha = NULL;
  g_autofree float *value = NULL;
  LpLoraModule *a, *b, *x;
  gsize n = 0;

  modules = find (specs, G_N_ELEMENTS (specs), NULL, &others);
  g_assert_cmpuint (modules->len, ==, 3);
  assert_module (modules, 0, "lora_unet_a", LP_LORA_CONVENTION_KOHYA, 4, 6, 5, 0.5);
  assert_module (modules, 1, "lora_unet_b", LP_LORA_CONVENTION_KOHYA, 4, 6, 5, 1.0);
  /* ComfyUI: the up factor first, a [1]-shaped alpha after */
  assert_module (modules, 2, "diffusion_model.x", LP_LORA_CONVENTION_KOHYA, 2, 3, 3, 4.0);
  assert_others (others, expected_others);

  a = g_ptr_array_index (modules, 0);
  b = g_ptr_array_index (modules, 1);
  x = g_ptr_array_index (modules, 2);
  g_assert_cmpstr (lp_tensor_get_name (lp_lora_module_get_alpha (a)), ==, "lora_unet_a.alpha");
  g_assert_null (lp_lora_module_get_alpha (b));
  g_assert_false (lp_lora_module_is_dora (a));
  g_assert_true (lp_lora_module_is_dora (b));
  g_assert_cmpstr (lp_tensor_get_name (lp_lora_module_get_part (b, "dora_scale")), ==,
                   "lora_unet_b.dora_scale");
  g_assert_cmpstr (lp_lora_module_get_family (b), ==, "kohya");
  g_assert_true (lp_lora_module_get_part (a, "alpha") == lp_lora_module_get_alpha (a));
  g_assert_nonnull (lp_lora_module_get_part (a, "lora_down.weight"));
  g_assert_cmpfloat (lp_lora_module_get_alpha_value (a), ==, 2.0);
  g_assert_cmpfloat (lp_lora_module_get_alpha_value (b), ==, 4.0);

  /* the old alpha / r is folded into the product; the new alpha is k */
  g_assert_cmpfloat (lp_lora_module_get_fold_scale (a), ==, 0.5);
  g_assert_cmpfloat (lp_lora_module_get_fold_scale (b), ==, 1.0);
  g_assert_cmpfloat (lp_lora_module_get_fold_scale (x), ==, 4.0);
  g_assert_null (lp_lora_module_new_alpha (b, 2));

  alpha = lp_lora_module_new_alpha (a, 3);
  g_assert_nonnull (alpha);
  g_assert_cmpstr (lp_tensor_get_name (alpha), ==, "lora_unet_a.alpha");
  g_assert_cmpint (lp_tensor_get_dtype (alpha), ==, LP_DTYPE_F16);
  g_assert_cmpuint (lp_tensor_get_n_dims (alpha), ==, 0);
  value = lp_tensor_dup_f32 (alpha, &n, NULL);
  g_assert_cmpuint (n, ==, 1);
  g_assert_cmpfloat (value[0], ==, 3.0f);
  g_clear_object (&alpha);

  alpha = lp_lora_module_new_alpha (x, 1);
  g_assert_cmpuint (lp_tensor_get_n_dims (alpha), ==, 1);
  g_assert_cmpuint (lp_tensor_get_dim (alpha, 0), ==, 1);
}

static void
test_locon (void)
{
  const Spec specs[] = {
    { "lora_unet_conv.alpha", 0, { 0 }, LP_DTYPE_F32, 1.0 },
    { "lora_unet_conv.lora_down.weight", 4, { 4, 3, 3, 3 } },
    { "lora_unet_conv.lora_up.weight", 4, { 5, 4, 1, 1 } },
  };
  g_autoptr(GPtrArray) modules = NULL;
  guint64 shape[LP_TENSOR_MAX_DIMS], kh = 0, kw = 0;
  LpLoraModule *module;
  guint n_dims = 0;

  modules = find (specs, G_N_ELEMENTS (specs), NULL, NULL);
  assert_module (modules, 0, "lora_unet_conv", LP_LORA_CONVENTION_KOHYA, 4, 27, 5, 0.25);
  module = g_ptr_array_index (modules, 0);
  g_assert_true (lp_lora_module_is_conv (module));
  lp_lora_module_get_kernel_size (module, &kh, &kw);
  g_assert_cmpuint (kh, ==, 3);
  g_assert_cmpuint (kw, ==, 3);

  lp_lora_module_new_factor_shape (module, FALSE, 2, shape, &n_dims);
  g_assert_cmpuint (n_dims, ==, 4);
  g_assert_cmpuint (shape[0], ==, 2);
  g_assert_cmpuint (shape[1], ==, 3);
  g_assert_cmpuint (shape[2], ==, 3);
  g_assert_cmpuint (shape[3], ==, 3);
  lp_lora_module_new_factor_shape (module, TRUE, 2, shape, &n_dims);
  g_assert_cmpuint (n_dims, ==, 4);
  g_assert_cmpuint (shape[0], ==, 5);
  g_assert_cmpuint (shape[1], ==, 2);
  g_assert_cmpuint (shape[2], ==, 1);
  g_assert_cmpuint (shape[3], ==, 1);
}

static void
test_factor_shape_linear (void)
{
  const Spec specs[] = {
    { "m.lora_A.weight", 2, { 6, 10 } },
    { "m.lora_B.weight", 2, { 7, 6 } },
  };
  g_autoptr(GPtrArray) modules = find (specs, G_N_ELEMENTS (specs), NULL, NULL);
  LpLoraModule *module = g_ptr_array_index (modules, 0);
  guint64 shape[LP_TENSOR_MAX_DIMS], kh = 0, kw = 0;
  guint n_dims = 0;

  lp_lora_module_get_kernel_size (module, &kh, &kw);
  g_assert_cmpuint (kh, ==, 1);
  g_assert_cmpuint (kw, ==, 1);
  lp_lora_module_new_factor_shape (module, FALSE, 3, shape, &n_dims);
  g_assert_cmpuint (n_dims, ==, 2);
  g_assert_cmpuint (shape[0], ==, 3);
  g_assert_cmpuint (shape[1], ==, 10);
  lp_lora_module_new_factor_shape (module, TRUE, 3, shape, &n_dims);
  g_assert_cmpuint (shape[0], ==, 7);
  g_assert_cmpuint (shape[1], ==, 3);
}

static void
test_cloneofsimo (void)
{
  const Spec specs[] = {
    { "<s1>", 1, { 8 } },
    { "unet:0:up", 2, { 6, 1 } },
    { "unet:0:down", 2, { 1, 4 } },
    { "text_encoder:10:down", 2, { 1, 8 } },
    { "text_encoder:10:up", 2, { 8, 1 } },
  };
  const char *expected_others[] = { "<s1>", NULL };
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = find (specs, G_N_ELEMENTS (specs), NULL, &others);

  g_assert_cmpuint (modules->len, ==, 2);
  assert_module (modules, 0, "unet:0", LP_LORA_CONVENTION_CLONEOFSIMO, 1, 4, 6, 1.0);
  assert_module (modules, 1, "text_encoder:10", LP_LORA_CONVENTION_CLONEOFSIMO, 1, 8, 8, 1.0);
  assert_others (others, expected_others);
}

static void
test_custom (void)
{
  const Spec specs[] = {
    { "w_a_000", 2, { 2, 8 } },
    { "w_b_000", 2, { 8, 2 } },
    { "w_b_001", 2, { 3, 2 } },
    { "w_a_001", 2, { 2, 8 } },
    { "head.weight", 2, { 3, 8 } },
  };
  const char *expected_others[] = { "head.weight", NULL };
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint (specs, G_N_ELEMENTS (specs), NULL);
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) none = NULL;
  g_autoptr(GError) error = NULL;

  modules = lp_lora_find_modules (checkpoint, "w_a_*", "w_b_*", &others, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (modules->len, ==, 2);
  assert_module (modules, 0, "w_000", LP_LORA_CONVENTION_CUSTOM, 2, 8, 8, 1.0);
  assert_module (modules, 1, "w_001", LP_LORA_CONVENTION_CUSTOM, 2, 8, 3, 1.0);
  assert_others (others, expected_others);

  /* without the patterns nothing is a LoRA factor */
  none = lp_lora_find_modules (checkpoint, NULL, NULL, NULL, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (none->len, ==, 0);
}

/* Bad inputs: each with the error it must give and the module it must name. */
typedef struct {
  const char *path;
  Spec specs[4];
  guint n_specs;
  const char *adapter_config;
  const char *down_pattern;
  const char *up_pattern;
  gint code;
  const char *message_part;
} BadCase;

static const BadCase bad_cases[] = {
  { "/lora/find/error/up-without-down",
    { { "m.lora_B.weight", 2, { 4, 2 } } }, 1, NULL, NULL, NULL,
    LP_STAGE_ERROR_INVALID_INPUT, "module m: up factor m.lora_B.weight has no matching down" },
  { "/lora/find/error/down-without-up",
    { { "lora_unet_x.lora_down.weight", 2, { 2, 4 } } }, 1, NULL, NULL, NULL,
    LP_STAGE_ERROR_INVALID_INPUT, "module lora_unet_x: down factor" },
  { "/lora/find/error/rank-mismatch",
    { { "m.lora_A.weight", 2, { 2, 4 } }, { "m.lora_B.weight", 2, { 4, 3 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: inconsistent ranks" },
  { "/lora/find/error/3d-factor",
    { { "m.lora_A.weight", 3, { 2, 4, 3 } }, { "m.lora_B.weight", 2, { 4, 2 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: factor m.lora_A.weight has shape" },
  { "/lora/find/error/1d-factor",
    { { "m.lora_A.weight", 2, { 2, 4 } }, { "m.lora_B.weight", 1, { 4 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: factor m.lora_B.weight" },
  { "/lora/find/error/mixed-dims",
    { { "c.lora_down.weight", 4, { 2, 4, 3, 3 } }, { "c.lora_up.weight", 2, { 4, 2 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module c: down factor" },
  { "/lora/find/error/conv-up-kernel",
    { { "c.lora_down.weight", 4, { 2, 4, 3, 3 } }, { "c.lora_up.weight", 4, { 4, 2, 3, 3 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module c: up factor" },
  { "/lora/find/error/int-factor",
    { { "m.lora_A.weight", 2, { 2, 4 }, LP_DTYPE_I32 }, { "m.lora_B.weight", 2, { 4, 2 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: factor m.lora_A.weight has dtype I32" },
  { "/lora/find/error/f8e8m0-factor",
    { { "m.lora_A.weight", 2, { 2, 4 } }, { "m.lora_B.weight", 2, { 4, 2 }, LP_DTYPE_F8_E8M0 } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: factor m.lora_B.weight has dtype" },
  { "/lora/find/error/alpha-shape",
    { { "k.alpha", 1, { 2 } }, { "k.lora_down.weight", 2, { 2, 4 } }, { "k.lora_up.weight", 2, { 4, 2 } } }, 3,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module k: alpha k.alpha has shape [2]" },
  { "/lora/find/error/alpha-matrix",
    { { "k.alpha", 2, { 1, 1 } }, { "k.lora_down.weight", 2, { 2, 4 } }, { "k.lora_up.weight", 2, { 4, 2 } } }, 3,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module k: alpha k.alpha has shape" },
  { "/lora/find/error/alpha-int",
    { { "k.alpha", 0, { 0 }, LP_DTYPE_I64 }, { "k.lora_down.weight", 2, { 2, 4 } }, { "k.lora_up.weight", 2, { 4, 2 } } }, 3,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module k: alpha k.alpha has dtype I64" },
  { "/lora/find/error/mixed-conventions",
    { { "m.lora_A.weight", 2, { 2, 4 } }, { "m.lora.up.weight", 2, { 4, 2 } } }, 2,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module m: factors m.lora_A.weight and m.lora.up.weight" },
  { "/lora/find/error/tucker",
    { { "t.lora_down.weight", 4, { 2, 4, 1, 1 } }, { "t.lora_mid.weight", 4, { 2, 2, 3, 3 } },
      { "t.lora_up.weight", 4, { 4, 2, 1, 1 } } }, 3,
    NULL, NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "module t: Tucker" },
  { "/lora/find/error/peft-rank-differs",
    { { "base_model.model.q.lora_A.weight", 2, { 2, 4 } }, { "base_model.model.q.lora_B.weight", 2, { 4, 2 } } }, 2,
    "{\"r\": 4, \"lora_alpha\": 8}", NULL, NULL,
    LP_STAGE_ERROR_INVALID_INPUT, "module base_model.model.q: adapter_config.json gives rank 4" },
  { "/lora/find/error/peft-config-syntax",
    { { "base_model.model.q.lora_A.weight", 2, { 2, 4 } }, { "base_model.model.q.lora_B.weight", 2, { 4, 2 } } }, 2,
    "{\"r\": 4,", NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "adapter_config.json" },
  { "/lora/find/error/peft-config-r",
    { { "base_model.model.q.lora_A.weight", 2, { 2, 4 } }, { "base_model.model.q.lora_B.weight", 2, { 4, 2 } } }, 2,
    "{\"r\": \"two\"}", NULL, NULL, LP_STAGE_ERROR_INVALID_INPUT, "\"r\" must be a positive integer" },
  { "/lora/find/error/pattern-no-star",
    { { "w_a_0", 2, { 2, 4 } } }, 1, NULL, "w_a_", "w_b_*",
    LP_STAGE_ERROR_INVALID_PROPERTY, "exactly one '*'" },
  { "/lora/find/error/pattern-two-stars",
    { { "w_a_0", 2, { 2, 4 } } }, 1, NULL, "w_a_*", "*w_b_*",
    LP_STAGE_ERROR_INVALID_PROPERTY, "exactly one '*'" },
  { "/lora/find/error/pattern-alone",
    { { "w_a_0", 2, { 2, 4 } } }, 1, NULL, "w_a_*", NULL,
    LP_STAGE_ERROR_INVALID_PROPERTY, "both a down and an up pattern" },
  { "/lora/find/error/custom-rank-mismatch",
    { { "w_a_7", 2, { 2, 4 } }, { "w_b_7", 2, { 4, 3 } } }, 2, NULL, "w_a_*", "w_b_*",
    LP_STAGE_ERROR_INVALID_INPUT, "module w_7: inconsistent ranks" },
};

static void
test_bad_case (gconstpointer data)
{
  const BadCase *bad = data;
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint (bad->specs, bad->n_specs, bad->adapter_config);
  g_autoptr(GPtrArray) others = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GError) error = NULL;

  modules = lp_lora_find_modules (checkpoint, bad->down_pattern, bad->up_pattern, &others, &error);
  g_assert_error (error, LP_STAGE_ERROR, bad->code);
  g_assert_null (modules);
  g_assert_null (others);
  if (strstr (error->message, bad->message_part) == NULL)
    g_error ("message \"%s\" lacks \"%s\"", error->message, bad->message_part);
}

static void
test_alpha_nan (void)
{
  const Spec specs[] = {
    { "k.alpha", 0, { 0 }, LP_DTYPE_F32, NAN },
    { "k.lora_down.weight", 2, { 2, 4 } },
    { "k.lora_up.weight", 2, { 4, 2 } },
  };
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint (specs, G_N_ELEMENTS (specs), NULL);
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GError) error = NULL;

  modules = lp_lora_find_modules (checkpoint, NULL, NULL, NULL, &error);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
  g_assert_nonnull (strstr (error->message, "module k:"));
  g_assert_null (modules);
}

/* Adapter config of reduced files: reduce the factors' shapes, rewrite the
 * config, find the modules again and check that every scale is unchanged. */
static void
check_config_round_trip (const char  *config,
                         const Spec  *specs,
                         guint        n_specs,
                         const guint *new_ranks,
                         JsonObject **result)
{
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint (specs, n_specs, config);
  g_autoptr(LpCheckpoint) reduced = lp_checkpoint_new ();
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) again = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonParser) parser = json_parser_new ();
  g_autofree char *new_config = NULL;

  modules = lp_lora_find_modules (checkpoint, NULL, NULL, NULL, &error);
  g_assert_no_error (error);

  new_config = lp_lora_update_adapter_config (config, modules, new_ranks, &error);
  g_assert_no_error (error);
  g_assert_nonnull (new_config);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      guint64 shape[LP_TENSOR_MAX_DIMS];
      guint n_dims;

      for (guint up = 0; up < 2; up++)
        {
          LpTensor *old = up ? lp_lora_module_get_up (module) : lp_lora_module_get_down (module);
          g_autoptr(LpTensor) tensor = NULL;

          lp_lora_module_new_factor_shape (module, up, new_ranks[i], shape, &n_dims);
          tensor = make_tensor (lp_tensor_get_name (old), LP_DTYPE_F32, shape, n_dims);
          lp_checkpoint_add_tensor (reduced, tensor, &error);
          g_assert_no_error (error);
        }
    }
  lp_checkpoint_set_adapter_config (reduced, new_config);
  again = lp_lora_find_modules (reduced, NULL, NULL, NULL, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (again->len, ==, modules->len);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *before = g_ptr_array_index (modules, i);
      LpLoraModule *after = g_ptr_array_index (again, i);

      g_assert_cmpstr (lp_lora_module_get_name (before), ==, lp_lora_module_get_name (after));
      g_assert_cmpuint (lp_lora_module_get_rank (after), ==, new_ranks[i]);
      g_assert_cmpfloat_with_epsilon (lp_lora_module_get_scale (after),
                                      lp_lora_module_get_scale (before),
                                      1e-12 * lp_lora_module_get_scale (before));
    }

  json_parser_load_from_data (parser, new_config, -1, &error);
  g_assert_no_error (error);
  *result = json_object_ref (json_node_get_object (json_parser_get_root (parser)));
}

static const Spec three_modules[] = {
  { "base_model.model.layers.0.q.lora_A.weight", 2, { 8, 6 } },
  { "base_model.model.layers.0.q.lora_B.weight", 2, { 6, 8 } },
  { "base_model.model.layers.0.v.lora_A.weight", 2, { 8, 6 } },
  { "base_model.model.layers.0.v.lora_B.weight", 2, { 6, 8 } },
  { "base_model.model.layers.1.q.lora_A.weight", 2, { 8, 6 } },
  { "base_model.model.layers.1.q.lora_B.weight", 2, { 6, 8 } },
};

static void
test_config_uniform (void)
{
  const guint ranks[] = { 4, 4, 4 };
  g_autoptr(JsonObject) out = NULL;
  g_autoptr(GList) members = NULL;

  check_config_round_trip ("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16,"
                           " \"target_modules\": [\"q\", \"v\"]}",
                           three_modules, G_N_ELEMENTS (three_modules), ranks, &out);
  g_assert_cmpint (json_object_get_int_member (out, "r"), ==, 4);
  g_assert_cmpfloat (json_object_get_double_member (out, "lora_alpha"), ==, 8.0);
  g_assert_cmpuint (json_object_get_size (json_object_get_object_member (out, "rank_pattern")), ==, 0);
  g_assert_cmpuint (json_object_get_size (json_object_get_object_member (out, "alpha_pattern")), ==, 0);
  /* other members are kept, in their order */
  members = json_object_get_members (out);
  g_assert_cmpstr (members->data, ==, "peft_type");
  g_assert_cmpstr (json_object_get_string_member (out, "peft_type"), ==, "LORA");
  g_assert_true (json_object_has_member (out, "target_modules"));
}

static void
test_config_dynamic (void)
{
  const guint ranks[] = { 3, 5, 3 };
  g_autoptr(JsonObject) out = NULL;
  JsonObject *rank_pattern, *alpha_pattern;

  check_config_round_trip ("{\"r\": 8, \"lora_alpha\": 8}",
                           three_modules, G_N_ELEMENTS (three_modules), ranks, &out);
  /* the most common rank is r; the other module is an exception */
  g_assert_cmpint (json_object_get_int_member (out, "r"), ==, 3);
  g_assert_cmpfloat (json_object_get_double_member (out, "lora_alpha"), ==, 3.0);
  rank_pattern = json_object_get_object_member (out, "rank_pattern");
  alpha_pattern = json_object_get_object_member (out, "alpha_pattern");
  g_assert_cmpuint (json_object_get_size (rank_pattern), ==, 1);
  g_assert_cmpint (json_object_get_int_member (rank_pattern, "^layers\\.0\\.v"), ==, 5);
  g_assert_cmpuint (json_object_get_size (alpha_pattern), ==, 1);
  g_assert_cmpfloat (json_object_get_double_member (alpha_pattern, "^layers\\.0\\.v"), ==, 5.0);
}

static void
test_config_patterns_rslora (void)
{
  const Spec specs[] = {
    { "base_model.model.layers.0.q.lora_A.weight", 2, { 4, 6 } },
    { "base_model.model.layers.0.q.lora_B.weight", 2, { 6, 4 } },
    { "base_model.model.layers.0.v.lora_A.weight", 2, { 8, 6 } },
    { "base_model.model.layers.0.v.lora_B.weight", 2, { 6, 8 } },
    { "base_model.model.layers.1.q.lora_A.weight", 2, { 4, 6 } },
    { "base_model.model.layers.1.q.lora_B.weight", 2, { 6, 4 } },
  };
  const guint ranks[] = { 2, 2, 1 };
  g_autoptr(JsonObject) out = NULL;

  /* broad old keys ("q") must not shadow the new exact ones */
  check_config_round_trip ("{\"r\": 8, \"lora_alpha\": 16, \"use_rslora\": true,"
                           " \"rank_pattern\": {\"q\": 4},"
                           " \"alpha_pattern\": {\"layers.1.q\": 3}}",
                           specs, G_N_ELEMENTS (specs), ranks, &out);
  g_assert_cmpint (json_object_get_int_member (out, "r"), ==, 2);
  g_assert_true (json_object_get_boolean_member (out, "use_rslora"));
}

/* A module whose name is the tail of another's: PEFT's get_pattern_key
 * (peft/utils/other.py) matches a key K by `(.*\.)?(K)$`, so the key of
 * `proj_out` written as its escaped name alone also selects
 * `blocks.0.proj_out`, which PEFT would then build at the wrong rank. The
 * round trip reads the config back by that rule: each module must get its
 * own rank and scale. */
static void
test_config_anchored (void)
{
  const Spec specs[] = {
    { "base_model.model.proj_out.lora_A.weight", 2, { 8, 6 } },
    { "base_model.model.proj_out.lora_B.weight", 2, { 6, 8 } },
    { "base_model.model.blocks.0.proj_out.lora_A.weight", 2, { 8, 6 } },
    { "base_model.model.blocks.0.proj_out.lora_B.weight", 2, { 6, 8 } },
    { "base_model.model.blocks.1.proj_out.lora_A.weight", 2, { 8, 6 } },
    { "base_model.model.blocks.1.proj_out.lora_B.weight", 2, { 6, 8 } },
  };
  const guint ranks[] = { 5, 3, 3 };
  g_autoptr(JsonObject) out = NULL;
  JsonObject *rank_pattern;

  check_config_round_trip ("{\"r\": 8, \"lora_alpha\": 16}",
                           specs, G_N_ELEMENTS (specs), ranks, &out);
  rank_pattern = json_object_get_object_member (out, "rank_pattern");
  g_assert_cmpuint (json_object_get_size (rank_pattern), ==, 1);
  g_assert_cmpint (json_object_get_int_member (rank_pattern, "^proj_out"), ==, 5);
}

static void
test_config_uniform_same_rank (void)
{
  const guint ranks[] = { 8, 8, 8 };
  g_autoptr(JsonObject) out = NULL;

  check_config_round_trip ("{\"r\": 8, \"lora_alpha\": 16}",
                           three_modules, G_N_ELEMENTS (three_modules), ranks, &out);
  g_assert_cmpint (json_object_get_int_member (out, "r"), ==, 8);
  g_assert_cmpint (json_object_get_int_member (out, "lora_alpha"), ==, 16);
}

/* The trained files of lora-samples: pair counts as SOURCES.md lists them. */
typedef struct {
  const char *file;
  guint n_pairs;
  guint rank;
  guint n_others;
  double scale;         /* of every module */
  const char *down_pattern;
  const char *up_pattern;
} Sample;

static const Sample samples[] = {
  { "peft-distilbert-r8-f32", 12, 8, 4, 2.0 },
  { "peft-gpt2-r8-f32", 36, 8, 0, 4.0 },
  { "peft-t5small-r8-f32", 36, 8, 0, 4.0 },
  { "peft-whisperbase-r8-f32", 36, 8, 0, 2.0 },
  { "peft-qwen2.5-0.5b-r8-f32", 48, 8, 0, 2.0 },
  { "peft-sdxl-clip-te-r8-f32-2zero", 24, 8, 0, 1.0 },
  { "peft-gptneox-r1-f16", 24, 1, 0, 32.0 },
  { "diffusers-sd2-unet-r4-bf16", 128, 4, 0, 1.0 },
  { "cloneofsimo-sd15-r4-f16-meta", 192, 4, 0, 1.0 },
  { "cloneofsimo-sd15-r1-f32-meta-ti", 192, 1, 2, 1.0 },
  { "samlora-vitb-r4-f32", 24, 4, 0, 1.0, "w_a_*", "w_b_*" },
  { "samlora-vitb-r2-f32", 24, 2, 0, 1.0, "w_a_*", "w_b_*" },
};

static void
test_samples (void)
{
  const char *shared = g_getenv ("LPIPE_SHARED_DIR");
  g_autofree char *dir = NULL;

  if (shared == NULL)
    {
      g_test_skip ("LPIPE_SHARED_DIR is not set");
      return;
    }
  dir = g_build_filename (shared, "lora-samples", NULL);
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    {
      g_test_skip ("no lora-samples");
      return;
    }

  for (guint i = 0; i < G_N_ELEMENTS (samples); i++)
    {
      const Sample *sample = &samples[i];
      g_autofree char *base = g_build_filename (dir, sample->file, NULL);
      g_autofree char *path = g_strconcat (base, ".safetensors", NULL);
      g_autofree char *config_path = g_strconcat (base, ".adapter_config.json", NULL);
      g_autofree char *config = NULL;
      g_autoptr(LpCheckpoint) checkpoint = NULL;
      g_autoptr(GPtrArray) modules = NULL;
      g_autoptr(GPtrArray) others = NULL;
      g_autoptr(GError) error = NULL;

      g_test_message ("%s", sample->file);
      checkpoint = lp_safetensors_load (path, &error);
      g_assert_no_error (error);
      if (g_file_get_contents (config_path, &config, NULL, NULL))
        lp_checkpoint_set_adapter_config (checkpoint, config);

      modules = lp_lora_find_modules (checkpoint, sample->down_pattern, sample->up_pattern,
                                      &others, &error);
      g_assert_no_error (error);
      g_assert_cmpuint (modules->len, ==, sample->n_pairs);
      g_assert_cmpuint (others->len, ==, sample->n_others);
      g_assert_cmpuint (modules->len * 2 + others->len, ==, lp_checkpoint_get_n_tensors (checkpoint));
      for (guint m = 0; m < modules->len; m++)
        {
          LpLoraModule *module = g_ptr_array_index (modules, m);

          g_assert_cmpuint (lp_lora_module_get_rank (module), ==, sample->rank);
          g_assert_cmpfloat (lp_lora_module_get_scale (module), ==, sample->scale);
          g_assert_cmpint (lp_lora_module_get_convention (module), ==,
                           config != NULL ? LP_LORA_CONVENTION_PEFT
                           : sample->down_pattern ? LP_LORA_CONVENTION_CUSTOM
                           : lp_lora_module_get_convention (module));
        }
    }
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/lora/find/peft", test_peft);
  g_test_add_func ("/lora/find/peft-defaults-rslora", test_peft_defaults_and_rslora);
  g_test_add_func ("/lora/find/peft-patterns", test_peft_patterns);
  g_test_add_func ("/lora/find/diffusers", test_diffusers);
  g_test_add_func ("/lora/find/kohya", test_kohya);
  g_test_add_func ("/lora/find/locon", test_locon);
  g_test_add_func ("/lora/find/lycoris-tucker", test_lycoris_tucker);
  g_test_add_func ("/lora/find/factor-shape", test_factor_shape_linear);
  g_test_add_func ("/lora/find/cloneofsimo", test_cloneofsimo);
  g_test_add_func ("/lora/find/custom", test_custom);
  g_test_add_func ("/lora/find/error/alpha-nan", test_alpha_nan);
  for (guint i = 0; i < G_N_ELEMENTS (bad_cases); i++)
    g_test_add_data_func (bad_cases[i].path, &bad_cases[i], test_bad_case);
  g_test_add_func ("/lora/adapter-config/uniform", test_config_uniform);
  g_test_add_func ("/lora/adapter-config/same-rank", test_config_uniform_same_rank);
  g_test_add_func ("/lora/adapter-config/dynamic", test_config_dynamic);
  g_test_add_func ("/lora/adapter-config/patterns-rslora", test_config_patterns_rslora);
  g_test_add_func ("/lora/adapter-config/anchored", test_config_anchored);
  g_test_add_func ("/lora/samples", test_samples);

  return g_test_run ();
}
