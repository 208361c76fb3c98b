/* test-lora-synth.c: the `lora-synth` stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-test-util.h"

#include <math.h>

/* FORMATS.md, "Flux.1-dev linear layers" */
#define FLUX_MODULES 494
#define FLUX_PARAMS_PER_RANK G_GUINT64_CONSTANT (5369856)
/* the same model as kohya's networks/lora_flux.py names it (BFL layers, q, k
 * and v fused): 19 × 10 + 38 × 3 modules, 19 × 2 × (21504 + 12288 + 6144 +
 * 15360 + 15360) + 38 × (24576 + 18432 + 12288) parameters per rank */
#define FLUX_KOHYA_MODULES 304
#define FLUX_KOHYA_PARAMS_PER_RANK G_GUINT64_CONSTANT (4786176)

static LpCheckpoint *
synth (const char *preset,
       const char *format,
       const char *rank,
       const char *dtype)
{
  g_autoptr(GError) error = NULL;
  LpCheckpoint *checkpoint;

  checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error,
                                  "preset", preset, "format", format,
                                  "rank", rank, "dtype", dtype, NULL);
  g_assert_no_error (error);
  g_assert_nonnull (checkpoint);
  return checkpoint;
}

static GPtrArray *
modules_of (LpCheckpoint *checkpoint,
            guint         expected_others)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GPtrArray) others = NULL;
  GPtrArray *modules;

  modules = lp_lora_find_modules (checkpoint, NULL, NULL, &others, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (others->len, ==, expected_others);
  return modules;
}

static void
test_flux_layout (void)
{
  g_autoptr(LpCheckpoint) checkpoint = synth ("flux-dev", "diffusers", "3", "f32");
  g_autoptr(GPtrArray) modules = modules_of (checkpoint, 0);
  guint64 per_rank = 0, elements = 0;

  g_assert_cmpuint (modules->len, ==, FLUX_MODULES);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      g_assert_cmpuint (lp_lora_module_get_rank (module), ==, 3);
      g_assert_cmpint (lp_lora_module_get_convention (module), ==, LP_LORA_CONVENTION_DIFFUSERS);
      g_assert_cmpfloat (lp_lora_module_get_scale (module), ==, 1.0);
      per_rank += lp_lora_module_get_in_features (module) + lp_lora_module_get_out_features (module);
    }
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (checkpoint); i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);

      g_assert_true (lp_tensor_is_lazy (tensor));
      g_assert_cmpint (lp_tensor_get_dtype (tensor), ==, LP_DTYPE_F32);
      elements += lp_tensor_get_n_elements (tensor);
    }
  g_assert_cmpuint (per_rank, ==, FLUX_PARAMS_PER_RANK);
  g_assert_cmpuint (elements, ==, 3 * FLUX_PARAMS_PER_RANK);
  g_assert_cmpuint (lp_checkpoint_get_n_bytes (checkpoint), ==, 4 * 3 * FLUX_PARAMS_PER_RANK);

  g_assert_cmpstr (lp_lora_module_get_name (g_ptr_array_index (modules, 0)), ==,
                   "transformer.transformer_blocks.0.attn.to_q");
  g_assert_cmpstr (lp_lora_module_get_name (g_ptr_array_index (modules, 12)), ==,
                   "transformer.transformer_blocks.0.norm1.linear");
  g_assert_cmpuint (lp_lora_module_get_out_features (g_ptr_array_index (modules, 12)), ==, 18432);
  g_assert_cmpstr (lp_lora_module_get_name (g_ptr_array_index (modules, FLUX_MODULES - 1)), ==,
                   "transformer.single_transformer_blocks.37.norm.linear");
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 0)), ==,
                   "transformer.transformer_blocks.0.attn.to_q.lora_A.weight");
  g_assert_null (lp_checkpoint_get_adapter_config (checkpoint));
}

static void
test_kohya (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(LpCheckpoint) with_alpha = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) modules2 = NULL;

  checkpoint = synth ("flux-dev", "kohya", "4", "bf16");
  modules = modules_of (checkpoint, 0);
  g_assert_cmpuint (modules->len, ==, FLUX_KOHYA_MODULES);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 3 * FLUX_KOHYA_MODULES);
  /* sd-scripts networks/lora_flux.py create_modules: "lora_unet" + the
   * module path in flux_models.py, dots made underscores */
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 0)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.alpha");
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 1)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight");
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 2)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight");
  {
    static const struct { guint index; const char *name; guint64 in, out; } expected[] = {
      { 0, "lora_unet_double_blocks_0_img_mod_lin", 3072, 18432 },
      { 1, "lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216 },
      { 2, "lora_unet_double_blocks_0_img_attn_proj", 3072, 3072 },
      { 3, "lora_unet_double_blocks_0_img_mlp_0", 3072, 12288 },
      { 4, "lora_unet_double_blocks_0_img_mlp_2", 12288, 3072 },
      { 5, "lora_unet_double_blocks_0_txt_mod_lin", 3072, 18432 },
      { 6, "lora_unet_double_blocks_0_txt_attn_qkv", 3072, 9216 },
      { 9, "lora_unet_double_blocks_0_txt_mlp_2", 12288, 3072 },
      { 189, "lora_unet_double_blocks_18_txt_mlp_2", 12288, 3072 },
      { 190, "lora_unet_single_blocks_0_linear1", 3072, 21504 },
      { 191, "lora_unet_single_blocks_0_linear2", 15360, 3072 },
      { 192, "lora_unet_single_blocks_0_modulation_lin", 3072, 9216 },
      { 303, "lora_unet_single_blocks_37_modulation_lin", 3072, 9216 },
    };
    guint64 per_rank = 0;

    for (guint i = 0; i < G_N_ELEMENTS (expected); i++)
      {
        LpLoraModule *module = g_ptr_array_index (modules, expected[i].index);

        g_assert_cmpstr (lp_lora_module_get_name (module), ==, expected[i].name);
        g_assert_cmpuint (lp_lora_module_get_in_features (module), ==, expected[i].in);
        g_assert_cmpuint (lp_lora_module_get_out_features (module), ==, expected[i].out);
      }
    for (guint i = 0; i < modules->len; i++)
      per_rank += lp_lora_module_get_in_features (g_ptr_array_index (modules, i))
                  + lp_lora_module_get_out_features (g_ptr_array_index (modules, i));
    g_assert_cmpuint (per_rank, ==, FLUX_KOHYA_PARAMS_PER_RANK);
  }
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      LpTensor *alpha = lp_lora_module_get_alpha (module);

      g_assert_cmpint (lp_lora_module_get_convention (module), ==, LP_LORA_CONVENTION_KOHYA);
      g_assert_nonnull (alpha);
      g_assert_cmpuint (lp_tensor_get_n_dims (alpha), ==, 0);
      g_assert_cmpint (lp_tensor_get_dtype (alpha), ==, LP_DTYPE_BF16);
      /* default alpha: rank / 2 */
      g_assert_cmpfloat (lp_lora_module_get_scale (module), ==, 0.5);
    }

  with_alpha = lp_test_run_stage ("lora-synth", NULL, 0, &error,
                                  "preset", "sd15-unet", "format", "kohya",
                                  "rank", "4", "alpha", "8", NULL);
  g_assert_no_error (error);
  modules2 = modules_of (with_alpha, 0);
  g_assert_cmpuint (modules2->len, ==, 128);
  g_assert_cmpstr (lp_lora_module_get_name (g_ptr_array_index (modules2, 5)), ==,
                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k");
  g_assert_cmpuint (lp_lora_module_get_in_features (g_ptr_array_index (modules2, 5)), ==, 768);
  g_assert_cmpuint (lp_lora_module_get_out_features (g_ptr_array_index (modules2, 5)), ==, 320);
  g_assert_cmpfloat (lp_lora_module_get_scale (g_ptr_array_index (modules2, 5)), ==, 2.0);
}

static void
test_peft (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(JsonParser) parser = json_parser_new ();
  JsonObject *config;
  LpLoraModule *first;

  checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error,
                                  "preset", "llama", "format", "peft",
                                  "rank", "8", "alpha", "16", NULL);
  g_assert_no_error (error);
  g_assert_nonnull (lp_checkpoint_get_adapter_config (checkpoint));
  modules = modules_of (checkpoint, 0);
  g_assert_cmpuint (modules->len, ==, 22 * 7);
  first = g_ptr_array_index (modules, 0);
  g_assert_cmpstr (lp_lora_module_get_name (first), ==, "base_model.model.model.layers.0.self_attn.q_proj");
  g_assert_cmpstr (lp_lora_module_get_peft_key (first), ==, "model.layers.0.self_attn.q_proj");
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      g_assert_cmpint (lp_lora_module_get_convention (module), ==, LP_LORA_CONVENTION_PEFT);
      g_assert_cmpfloat (lp_lora_module_get_scale (module), ==, 2.0);
    }
  /* GQA: k_proj 2048 -> 256 */
  g_assert_cmpuint (lp_lora_module_get_out_features (g_ptr_array_index (modules, 1)), ==, 256);

  json_parser_load_from_data (parser, lp_checkpoint_get_adapter_config (checkpoint), -1, &error);
  g_assert_no_error (error);
  config = json_node_get_object (json_parser_get_root (parser));
  g_assert_cmpint (json_object_get_int_member (config, "r"), ==, 8);
  g_assert_cmpfloat (json_object_get_double_member (config, "lora_alpha"), ==, 16.0);
  g_assert_cmpstr (json_object_get_string_member (config, "peft_type"), ==, "LORA");
  g_assert_cmpuint (json_array_get_length (json_object_get_array_member (config, "target_modules")), ==, 7);
}

/* The tensor @name of @checkpoint, with its shape. */
static LpTensor *
expect_tensor (LpCheckpoint *checkpoint,
               const char   *name,
               guint         n_dims,
               guint64       dim0,
               guint64       dim1)
{
  LpTensor *tensor = lp_checkpoint_lookup (checkpoint, name);

  if (tensor == NULL)
    g_error ("no tensor %s", name);
  g_assert_cmpuint (lp_tensor_get_n_dims (tensor), ==, n_dims);
  if (n_dims > 0)
    g_assert_cmpuint (lp_tensor_get_dim (tensor, 0), ==, dim0);
  if (n_dims > 1)
    g_assert_cmpuint (lp_tensor_get_dim (tensor, 1), ==, dim1);
  return tensor;
}

static double
scalar_of (LpTensor *tensor)
{
  g_autofree double *value = lp_tensor_dup_f64 (tensor, NULL, NULL);

  g_assert_nonnull (value);
  return value[0];
}

static void
test_loha (void)
{
  g_autoptr(LpCheckpoint) checkpoint = synth ("flux-dev", "loha", "6", "bf16");
  g_autoptr(GPtrArray) modules = modules_of (checkpoint, 0);
  const char *qkv = "lora_unet_double_blocks_3_txt_attn_qkv";
  g_autofree char *name = NULL;

  /* LyCORIS LohaModule: hada_w1_a [out, r], hada_w1_b [r, in], w2 the same,
   * alpha a 0-dim buffer; the kohya names of the BFL layers */
  g_assert_cmpuint (modules->len, ==, FLUX_KOHYA_MODULES);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 5 * FLUX_KOHYA_MODULES);
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 0)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.alpha");
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 1)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.hada_w1_a");
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 4)), ==,
                   "lora_unet_double_blocks_0_img_mod_lin.hada_w2_b");
  g_free (name), name = g_strconcat (qkv, ".hada_w1_a", NULL);
  expect_tensor (checkpoint, name, 2, 9216, 6);
  g_free (name), name = g_strconcat (qkv, ".hada_w1_b", NULL);
  expect_tensor (checkpoint, name, 2, 6, 3072);
  g_free (name), name = g_strconcat (qkv, ".hada_w2_a", NULL);
  expect_tensor (checkpoint, name, 2, 9216, 6);
  g_free (name), name = g_strconcat (qkv, ".hada_w2_b", NULL);
  expect_tensor (checkpoint, name, 2, 6, 3072);
  g_free (name), name = g_strconcat (qkv, ".alpha", NULL);
  g_assert_cmpfloat (scalar_of (expect_tensor (checkpoint, name, 0, 0, 0)), ==, 3.0);
  for (guint i = 0; i < modules->len; i++)
    g_assert_cmpstr (lp_lora_module_get_family (g_ptr_array_index (modules, i)), ==, "loha");
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "ss_network_module"), ==, "lycoris.kohya");
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "ss_network_dim"), ==, "6");
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "ss_network_alpha"), ==, "3.0");
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "ss_network_args"), ==, "{\"algo\": \"loha\"}");
}

static void
test_lokr (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(LpCheckpoint) whole = NULL;
  g_autoptr(LpCheckpoint) square = NULL;
  g_autoptr(GPtrArray) modules = NULL;

  /* factor 4 (LyCORIS factorization): 3072 = 4 · 768, 9216 = 4 · 2304,
   * 21504 = 4 · 5376; rank 8 is below half of W2's sides: a product */
  checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error, "preset", "flux-dev",
                                  "format", "lokr", "rank", "8", "alpha", "2",
                                  "factor", "4", NULL);
  g_assert_no_error (error);
  modules = modules_of (checkpoint, 0);
  g_assert_cmpuint (modules->len, ==, FLUX_KOHYA_MODULES);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 4 * FLUX_KOHYA_MODULES);
  expect_tensor (checkpoint, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", 2, 4, 4);
  expect_tensor (checkpoint, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a", 2, 2304, 8);
  expect_tensor (checkpoint, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b", 2, 8, 768);
  expect_tensor (checkpoint, "lora_unet_single_blocks_5_linear1.lokr_w2_a", 2, 5376, 8);
  expect_tensor (checkpoint, "lora_unet_single_blocks_5_linear2.lokr_w2_b", 2, 8, 3840);
  g_assert_cmpfloat (scalar_of (expect_tensor (checkpoint, "lora_unet_single_blocks_5_linear2.alpha",
                                               0, 0, 0)), ==, 2.0);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      g_assert_cmpstr (lp_lora_module_get_family (module), ==, "lokr");
      /* kron of a 4 × 4 W1 and a rank-8 W2 */
      g_assert_cmpuint (lp_lora_module_get_rank (module), ==, 32);
    }
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "ss_network_args"), ==,
                   "{\"algo\": \"lokr\", \"factor\": \"4\"}");

  /* the default factor (-1): the split nearest the square root, 3072 = 48 · 64
   * and 18432 = 128 · 144 (LyCORIS's docstring: 1024 -> 32, 32) */
  square = synth ("flux-dev", "lokr", "8", "f32");
  expect_tensor (square, "lora_unet_double_blocks_0_img_mod_lin.lokr_w1", 2, 128, 48);
  expect_tensor (square, "lora_unet_double_blocks_0_img_mod_lin.lokr_w2_a", 2, 144, 8);
  expect_tensor (square, "lora_unet_double_blocks_0_img_mod_lin.lokr_w2_b", 2, 8, 64);

  /* a rank of half W2's larger side or more: a whole lokr_w2, and alpha =
   * rank (LokrModule: "use scale = 1") */
  whole = lp_test_run_stage ("lora-synth", NULL, 0, &error, "preset", "sd15-unet",
                             "format", "lokr", "rank", "32", "alpha", "4", NULL);
  g_assert_no_error (error);
  /* 320 = 16 · 20: W2 is 20 × 20, 32 ≥ 10 */
  expect_tensor (whole, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1",
                 2, 16, 16);
  expect_tensor (whole, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2",
                 2, 20, 20);
  g_assert_cmpfloat (scalar_of (expect_tensor (whole,
                     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
                     0, 0, 0)), ==, 32.0);
}

static void
test_mlx (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) mlx = synth ("llama", "mlx", "4", "f32");
  g_autoptr(LpCheckpoint) diffusers = synth ("llama", "diffusers", "4", "f32");
  g_autoptr(GPtrArray) modules = modules_of (mlx, 0);
  g_autoptr(JsonParser) parser = json_parser_new ();
  JsonObject *config, *parameters;
  LpTensor *a = expect_tensor (mlx, "model.layers.0.self_attn.k_proj.lora_a", 2, 2048, 4);
  LpTensor *b = expect_tensor (mlx, "model.layers.0.self_attn.k_proj.lora_b", 2, 4, 256);
  LpTensor *down = expect_tensor (diffusers, "model.layers.0.self_attn.k_proj.lora_A.weight", 2, 4, 2048);
  LpTensor *up = expect_tensor (diffusers, "model.layers.0.self_attn.k_proj.lora_B.weight", 2, 256, 4);
  g_autofree double *va = lp_tensor_dup_f64 (a, NULL, NULL);
  g_autofree double *vb = lp_tensor_dup_f64 (b, NULL, NULL);
  g_autofree double *vdown = lp_tensor_dup_f64 (down, NULL, NULL);
  g_autofree double *vup = lp_tensor_dup_f64 (up, NULL, NULL);

  /* mlx_lm/tuner/lora.py LoRALinear: lora_a [in, r], lora_b [r, out]; the
   * same module's factors as the other formats, transposed */
  for (guint i = 0; i < 4; i++)
    for (guint j = 0; j < 2048; j++)
      g_assert_cmpfloat (va[j * 4 + i], ==, vdown[i * 2048 + j]);
  for (guint i = 0; i < 256; i++)
    for (guint j = 0; j < 4; j++)
      g_assert_cmpfloat (vb[j * 256 + i], ==, vup[i * 4 + j]);

  g_assert_cmpuint (modules->len, ==, 22 * 7);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      g_assert_cmpstr (lp_lora_module_get_family (module), ==, "mlx");
      g_assert_true (lp_lora_module_is_transposed (module));
      /* lora_parameters.scale = alpha / rank = 0.5, used as is */
      g_assert_cmpfloat (lp_lora_module_get_scale (module), ==, 0.5);
    }
  /* mlx's save_safetensors writes no metadata */
  g_assert_null (lp_checkpoint_get_metadata (mlx, "format"));

  json_parser_load_from_data (parser, lp_checkpoint_get_adapter_config (mlx), -1, &error);
  g_assert_no_error (error);
  config = json_node_get_object (json_parser_get_root (parser));
  parameters = json_object_get_object_member (config, "lora_parameters");
  g_assert_cmpint (json_object_get_int_member (parameters, "rank"), ==, 4);
  g_assert_cmpfloat (json_object_get_double_member (parameters, "scale"), ==, 0.5);
  g_assert_cmpstr (json_object_get_string_member (config, "fine_tune_type"), ==, "lora");
  g_assert_cmpint (json_object_get_int_member (config, "num_layers"), ==, 22);
}

static void
test_no_effect (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) factor = NULL;
  g_autoptr(LpCheckpoint) alpha = NULL;

  factor = lp_test_run_stage ("lora-synth", NULL, 0, &error, "format", "kohya",
                              "factor", "4", NULL);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY);
  g_assert_nonnull (strstr (error->message, "without format=lokr"));
  g_clear_error (&error);
  alpha = lp_test_run_stage ("lora-synth", NULL, 0, &error, "format", "diffusers",
                             "alpha", "4", NULL);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY);
  g_assert_nonnull (strstr (error->message, "no effect with format=diffusers"));
}

typedef struct {
  GChecksum *checksum;
  guint n;
} Digest;

static gboolean
digest_tensor (LpTensor  *tensor,
               GBytes    *data,
               gpointer   user_data,
               GError   **error)
{
  Digest *digest = user_data;
  gsize size;
  gconstpointer bytes = g_bytes_get_data (data, &size);

  g_assert_cmpuint (size, ==, lp_tensor_get_n_bytes (tensor));
  g_checksum_update (digest->checksum, (const guchar *) lp_tensor_get_name (tensor), -1);
  g_checksum_update (digest->checksum, bytes, size);
  digest->n++;
  return TRUE;
}

static char *
pull_digest (LpCheckpoint *checkpoint,
             guint         threads)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpStage) stage = NULL;
  Digest digest = { g_checksum_new (G_CHECKSUM_SHA256), 0 };
  char *result;

  stage = lp_registry_create_stage (lp_test_registry (), "lora-synth", &error);
  g_assert_no_error (error);
  lp_stage_set_threads (stage, threads);
  lp_stage_pull_tensors (stage, checkpoint, digest_tensor, &digest, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (digest.n, ==, lp_checkpoint_get_n_tensors (checkpoint));
  result = g_strdup (g_checksum_get_string (digest.checksum));
  g_checksum_free (digest.checksum);
  return result;
}

static void
test_deterministic (void)
{
  g_autoptr(LpCheckpoint) a = synth ("flux-dev", "diffusers", "2", "bf16");
  g_autoptr(LpCheckpoint) b = synth ("flux-dev", "diffusers", "2", "bf16");
  g_autoptr(LpCheckpoint) peft = synth ("flux-dev", "peft", "2", "bf16");
  g_autofree char *one = pull_digest (a, 1);
  g_autofree char *two = pull_digest (b, 2);
  guint n = lp_checkpoint_get_n_tensors (a);

  g_assert_cmpstr (one, ==, two);

  /* any order of computation gives the same bytes, and a module has the same
   * factors in every format */
  for (guint i = n; i-- > n - 6;)
    {
      g_autoptr(GBytes) last = lp_tensor_dup_data (lp_checkpoint_get_tensor (a, i), NULL);
      g_autoptr(GBytes) first = lp_tensor_dup_data (lp_checkpoint_get_tensor (b, i), NULL);
      g_autoptr(GBytes) other = lp_tensor_dup_data (lp_checkpoint_get_tensor (peft, i), NULL);

      g_assert_true (g_bytes_equal (last, first));
      g_assert_true (g_bytes_equal (last, other));
    }
}

static void
test_seed (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) a = synth ("sd15-unet", "diffusers", "2", "f32");
  g_autoptr(LpCheckpoint) b = NULL;
  g_autoptr(GBytes) da = NULL, db = NULL, da2 = NULL;

  b = lp_test_run_stage ("lora-synth", NULL, 0, &error, "preset", "sd15-unet",
                         "rank", "2", "dtype", "f32", "seed", "1", NULL);
  g_assert_no_error (error);
  da = lp_tensor_dup_data (lp_checkpoint_get_tensor (a, 0), NULL);
  db = lp_tensor_dup_data (lp_checkpoint_get_tensor (b, 0), NULL);
  da2 = lp_tensor_dup_data (lp_checkpoint_get_tensor (a, 2), NULL);
  g_assert_false (g_bytes_equal (da, db));
  /* modules of one shape differ too */
  g_assert_false (g_bytes_equal (da, da2));
}

/* A's rows are √σ_i g_i/√in and B's columns √σ_i h_i/√out, so the squared
 * norms follow σ_i = decay^i; with in = 3072 the relative noise of a squared
 * norm of unit-variance numbers is about √(2/3072) ≈ 2.6 %. */
static void
test_spectrum (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autofree float *a = NULL, *b = NULL;
  LpLoraModule *module;
  const guint rank = 8;
  guint64 in, out;
  double mean = 0, var = 0;
  gsize n;

  checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error, "preset", "flux-dev",
                                  "rank", "8", "dtype", "f32", "decay", "0.5", NULL);
  g_assert_no_error (error);
  modules = modules_of (checkpoint, 0);
  module = g_ptr_array_index (modules, 8);      /* ff.net.0.proj, 3072 -> 12288 */
  in = lp_lora_module_get_in_features (module);
  out = lp_lora_module_get_out_features (module);
  a = lp_tensor_dup_f32 (lp_lora_module_get_down (module), &n, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (n, ==, rank * in);
  b = lp_tensor_dup_f32 (lp_lora_module_get_up (module), &n, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (n, ==, out * rank);

  for (guint i = 0; i < rank; i++)
    {
      double sigma = pow (0.5, i), row = 0, col = 0, dot = 0;

      for (guint64 j = 0; j < in; j++)
        row += (double) a[i * in + j] * a[i * in + j];
      for (guint64 o = 0; o < out; o++)
        col += (double) b[o * rank + i] * b[o * rank + i];
      g_assert_cmpfloat (fabs (row / sigma - 1), <, 0.15);
      g_assert_cmpfloat (fabs (col / sigma - 1), <, 0.15);
      /* nearly orthogonal: the cosine of two rows is about 1/√in */
      if (i > 0)
        {
          double prev = 0;
          for (guint64 j = 0; j < in; j++)
            {
              dot += (double) a[i * in + j] * a[(i - 1) * in + j];
              prev += (double) a[(i - 1) * in + j] * a[(i - 1) * in + j];
            }
          g_assert_cmpfloat (fabs (dot) / sqrt (row * prev), <, 0.1);
        }
    }

  /* the numbers are centred with the variance asked for */
  for (guint64 j = 0; j < in; j++)
    mean += a[j];
  mean /= in;
  for (guint64 j = 0; j < in; j++)
    var += (a[j] - mean) * (a[j] - mean);
  var /= in;
  g_assert_cmpfloat (fabs (mean) * sqrt ((double) in), <, 0.1);
  g_assert_cmpfloat (fabs (var * in - 1), <, 0.15);
}

static void
test_bad_dtype (void)
{
  const char *dtypes[] = { "i32", "u8", "f8-e8m0", "f4", "c64" };

  for (guint i = 0; i < G_N_ELEMENTS (dtypes); i++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpCheckpoint) checkpoint = NULL;

      checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error,
                                      "dtype", dtypes[i], NULL);
      /* the property offers only the dtypes lpipe writes */
      g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
      g_assert_nonnull (strstr (error->message, "which lpipe cannot convert to"));
      g_assert_null (checkpoint);
    }
}

static void
test_bad_values (void)
{
  const char *cases[][2] = {
    { "rank", "0" },
    { "decay", "1.5" },
    { "preset", "sdxl" },
    { "format", "comfy" },
  };

  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpCheckpoint) checkpoint = NULL;

      checkpoint = lp_test_run_stage ("lora-synth", NULL, 0, &error,
                                      cases[i][0], cases[i][1], NULL);
      g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
      g_assert_null (checkpoint);
    }
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/stage/lora-synth/flux-layout", test_flux_layout);
  g_test_add_func ("/stage/lora-synth/kohya", test_kohya);
  g_test_add_func ("/stage/lora-synth/peft", test_peft);
  g_test_add_func ("/stage/lora-synth/loha", test_loha);
  g_test_add_func ("/stage/lora-synth/lokr", test_lokr);
  g_test_add_func ("/stage/lora-synth/mlx", test_mlx);
  g_test_add_func ("/stage/lora-synth/no-effect", test_no_effect);
  g_test_add_func ("/stage/lora-synth/deterministic", test_deterministic);
  g_test_add_func ("/stage/lora-synth/seed", test_seed);
  g_test_add_func ("/stage/lora-synth/spectrum", test_spectrum);
  g_test_add_func ("/stage/lora-synth/bad-dtype", test_bad_dtype);
  g_test_add_func ("/stage/lora-synth/bad-values", test_bad_values);

  return g_test_run ();
}
