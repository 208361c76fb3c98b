/* test-rename.c: the `rename` stage: rules, presets, round trips against numpy
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <string.h>

#include "transform-test-util.h"

static double
scalar (LpCheckpoint *checkpoint,
        const char   *name)
{
  g_autoptr(GError) error = NULL;
  LpTensor *tensor = lp_checkpoint_lookup (checkpoint, name);
  g_autofree double *value = NULL;
  double v;

  g_assert_nonnull (tensor);
  g_assert_cmpuint (lp_tensor_get_n_elements (tensor), ==, 1);
  value = lp_tensor_dup_f64 (tensor, NULL, &error);
  g_assert_no_error (error);
  v = value[0];
  return v;
}

static guint64
dim (LpCheckpoint *checkpoint,
     const char   *name,
     guint         axis)
{
  LpTensor *tensor = lp_checkpoint_lookup (checkpoint, name);

  if (tensor == NULL)
    g_error ("no tensor %s", name);
  return lp_tensor_get_dim (tensor, axis);
}

/* diffusers -> kohya -> diffusers on SD 1.5: same names, same updates */
static void
test_sd_round_trip (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) orig = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "3", "dtype", "f32");
  g_autoptr(LpCheckpoint) kohya = run1 ("rename", orig, "preset", "sd-diffusers-to-kohya");
  g_autoptr(LpCheckpoint) back = run1 ("rename", kohya, "preset", "sd-kohya-to-diffusers");
  g_autofree char *p_orig = write_file (orig, dir, "orig");
  g_autofree char *p_kohya = write_file (kohya, dir, "kohya");
  g_autofree char *p_back = write_file (back, dir, "back");
  const char *k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0";
  g_autofree char *alpha = g_strconcat (k, ".alpha", NULL);
  g_autofree char *down = g_strconcat (k, ".lora_down.weight", NULL);

  /* kohya: every module gets alpha = rank (scale 1), factors untouched */
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (kohya), ==, 3 * lp_checkpoint_get_n_tensors (orig) / 2);
  g_assert_cmpfloat (scalar (kohya, alpha), ==, 3.0);
  g_assert_cmpuint (dim (kohya, down, 0), ==, 3);

  g_assert_cmpuint (lp_checkpoint_get_n_tensors (back), ==, lp_checkpoint_get_n_tensors (orig));
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (orig); i++)
    g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (back, i)), ==,
                     lp_tensor_get_name (lp_checkpoint_get_tensor (orig, i)));

  oracle ("same", p_orig, p_kohya, NULL);
  oracle ("same", p_orig, p_back, NULL);
}

/* kohya alpha != rank -> diffusers: the scale is folded into the factors */
static void
test_sd_alpha_fold (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) kohya = synth ("preset", "sd15-unet", "format", "kohya", "rank", "4",
                                         "alpha", "3", "dtype", "bf16");
  g_autoptr(LpCheckpoint) diffusers = run1 ("rename", kohya, "preset", "sd-kohya-to-diffusers");
  g_autofree char *p_kohya = write_file (kohya, dir, "kohya");
  g_autofree char *p_diffusers = write_file (diffusers, dir, "diffusers");

  g_assert_null (lp_checkpoint_lookup (diffusers, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.alpha"));
  g_assert_nonnull (lp_checkpoint_lookup (diffusers, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"));
  oracle ("same", p_kohya, p_diffusers, NULL);
}

/* Flux: q, k, v (and proj_mlp) fuse into kohya's qkv (linear1) and split back */
static void
test_flux_fuse_split (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) all = synth ("preset", "flux-dev", "format", "diffusers", "rank", "2", "dtype", "f32");
  g_autoptr(LpCheckpoint) orig = run1 ("select", all, "include", "transformer.*blocks.1.*");
  g_autoptr(LpCheckpoint) kohya = run1 ("rename", orig, "preset", "flux-diffusers-to-kohya");
  g_autoptr(LpCheckpoint) back = run1 ("rename", kohya, "preset", "flux-kohya-to-diffusers");
  g_autofree char *p_orig = write_file (orig, dir, "orig");
  g_autofree char *p_kohya = write_file (kohya, dir, "kohya");
  g_autofree char *p_back = write_file (back, dir, "back");

  /* 14 + 6 diffusers modules make 10 + 3 kohya ones */
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (orig), ==, 40);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (kohya), ==, 39);
  g_assert_cmpuint (dim (kohya, "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight", 0), ==, 6);
  g_assert_cmpuint (dim (kohya, "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight", 0), ==, 9216);
  g_assert_cmpuint (dim (kohya, "lora_unet_single_blocks_1_linear1.lora_up.weight", 0), ==, 21504);
  g_assert_cmpuint (dim (kohya, "lora_unet_single_blocks_1_linear1.lora_up.weight", 1), ==, 8);
  g_assert_cmpuint (dim (kohya, "lora_unet_single_blocks_1_linear2.lora_down.weight", 1), ==, 15360);
  g_assert_cmpfloat (scalar (kohya, "lora_unet_single_blocks_1_linear1.alpha"), ==, 8.0);
  g_assert_nonnull (lp_checkpoint_lookup (kohya, "lora_unet_double_blocks_1_txt_mod_lin.alpha"));
  /* the fused up factor is block-diagonal (as kohya's split_qkv saves
   * it): each part splits back to its own rank, not the fused one */
  g_assert_cmpuint (dim (back, "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight", 0), ==, 2);
  g_assert_cmpuint (dim (back, "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight", 0), ==, 12288);
  g_assert_cmpuint (dim (back, "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight", 1), ==, 2);
  g_assert_cmpuint (dim (back, "transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight", 0), ==, 2);

  oracle ("same", p_orig, p_kohya, NULL);
  oracle ("same", p_orig, p_back, NULL);
}

/* A part the input lacks fuses as zero rows; a non-unit kohya scale folds
 * into the split factors. */
static void
test_flux_missing_part_and_scale (void)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) all = synth ("preset", "flux-dev", "format", "diffusers", "rank", "2", "dtype", "f32");
  g_autoptr(LpCheckpoint) orig = run1 ("select", all, "include", "transformer.transformer_blocks.0.attn.*",
                                       "exclude", "*.to_k");
  g_autoptr(LpCheckpoint) kohya = run1 ("rename", orig, "preset", "flux-diffusers-to-kohya");
  g_autoptr(LpCheckpoint) scaled = run1 ("lora-scale", kohya, "factor", "0.375");
  g_autoptr(LpCheckpoint) back = run1 ("rename", scaled, "preset", "flux-kohya-to-diffusers");
  g_autoptr(LpCheckpoint) back_sel = run1 ("select", back, "exclude", "*.to_k");
  g_autofree float *up = NULL;
  gsize n = 0;
  g_autofree char *p_orig = write_file (orig, dir, "orig");
  g_autofree char *p_back = write_file (back_sel, dir, "back");

  up = lp_tensor_dup_f32 (lp_checkpoint_lookup (kohya, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"),
                          &n, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (n, ==, 9216 * 4);
  for (gsize i = 3072 * 4; i < 6144 * 4; i++)
    g_assert_cmpfloat (up[i], ==, 0.0f);
  g_assert_nonnull (lp_checkpoint_lookup (back, "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"));

  oracle ("scale", p_back, p_orig, "0.375", NULL);
}

/* PEFT -> kohya -> PEFT, with the alpha and the adapter config */
static void
test_peft_kohya (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) all = synth ("preset", "llama", "format", "peft", "rank", "4", "alpha", "6", "dtype", "f32");
  g_autoptr(LpCheckpoint) orig = run1 ("select", all, "include", "*layers.3.*");
  g_autoptr(LpCheckpoint) kohya = peft_to_kohya (orig);
  g_autoptr(LpCheckpoint) back = run1 ("rename", kohya, "preset", "kohya-to-peft");
  g_autofree char *p_orig = write_file (orig, dir, "orig");
  g_autofree char *p_kohya = write_file (kohya, dir, "kohya");
  g_autofree char *p_back = write_file (back, dir, "back");
  const char *config;

  g_assert_null (lp_checkpoint_get_adapter_config (kohya));
  g_assert_cmpfloat (scalar (kohya, "lora_unet_model_layers_3_mlp_down_proj.alpha"), ==, 6.0);
  g_assert_nonnull (lp_checkpoint_lookup (back, "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"));
  config = lp_checkpoint_get_adapter_config (back);
  g_assert_nonnull (config);
  g_assert_nonnull (strstr (config, "\"r\": 4"));
  g_assert_nonnull (strstr (config, "\"lora_alpha\": 6"));
  g_assert_nonnull (strstr (config, "\"model.layers.3.mlp.gate_proj\""));

  oracle ("same", p_orig, p_kohya, NULL);
  oracle ("same", p_orig, p_back, NULL);
}

static void
test_rules (void)
{
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) output = NULL;
  float v[2] = { 1, 2 };
  guint64 shape[1] = { 2 };
  const char *names[] = { "a.x.weight", "a.y.weight", "b=c" };
  const char *expected[] = { "first.ex.weight", "first.y.weight", "b:c" };

  for (guint i = 0; i < G_N_ELEMENTS (names); i++)
    {
      g_autoptr(LpTensor) t = lp_test_tensor (names[i], LP_DTYPE_F32, shape, 1, v);
      lp_checkpoint_add_tensor (input, t, NULL);
    }
  output = run1 ("rename", input, "rules", "^a\\.(\\w)=first.\\1, first\\.x=first.ex, \\==:");
  for (guint i = 0; i < G_N_ELEMENTS (names); i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (output, i);

      g_assert_cmpstr (lp_tensor_get_name (t), ==, expected[i]);
      g_assert_cmpuint (lp_tensor_get_n_bytes (t), ==, 8);
    }
}

static LpCheckpoint *
kohya_with (const char *name,
            guint64     in,
            guint64     out)
{
  LpCheckpoint *c = lp_checkpoint_new ();

  add_kohya (c, name, in, out, 2);
  return c;
}

static void
test_errors (void)
{
  g_autoptr(LpCheckpoint) diffusers = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) two_te = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) unknown = kohya_with ("lora_unet_down_blocks_0_foo_bar", 4, 4);
  g_autoptr(LpCheckpoint) prefix = kohya_with ("lora_foo_down_blocks_0", 4, 4);
  g_autoptr(LpCheckpoint) qkv = kohya_with ("lora_unet_double_blocks_0_img_attn_qkv", 4, 10);
  g_autoptr(LpCheckpoint) not_flux = kohya_with ("lora_unet_double_blocks_0_img_attn_foo", 4, 4);
  g_autoptr(LpCheckpoint) te = kohya_with ("lora_te_text_model_encoder_layers_0_mlp_fc1", 4, 4);

  add_diffusers (diffusers, "unet.down_blocks.0.attentions.0.proj_in", 4, 4, 2);
  add_kohya (two_te, "lora_te_text_model_encoder_layers_0_mlp_fc1", 4, 4, 2);
  add_kohya (two_te, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 4, 4, 2);

  expect_error ("rename", &diffusers, 1, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                STRS ("'rules' or 'preset'"));
  expect_error ("rename", &diffusers, 1, STRS ("rules", "abc"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_PROPERTY, STRS ("rule 1 'abc'", "pattern=replacement"));
  expect_error ("rename", &diffusers, 1, STRS ("rules", "a(=b"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_PROPERTY, STRS ("rule 1 'a(=b'"));
  expect_error ("rename", &diffusers, 1, STRS ("rules", "x=\\g<"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_PROPERTY, STRS ("replacement"));
  expect_error ("rename", &diffusers, 1, STRS ("rules", "lora_[AB]=lora"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("proj_in.lora_A.weight' and 'unet.down_blocks.0.attentions.0.proj_in.lora_B.weight'",
                      "both be named 'unet.down_blocks.0.attentions.0.proj_in.lora.weight'"));
  expect_error ("rename", &diffusers, 1, STRS ("rules", ".*="), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("empty name"));
  expect_error ("rename", &diffusers, 1, STRS ("preset", "sd-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("module unet.down_blocks.0.attentions.0.proj_in", "does not apply to a diffusers module"));
  expect_error ("rename", &two_te, 1, STRS ("preset", "sd-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("lora_te_text_model_encoder_layers_0_mlp_fc1.", "lora_te1_text_model_encoder_layers_0_mlp_fc1.",
                      "text_encoder.text_model.encoder.layers.0.mlp.fc1."));
  expect_error ("rename", &unknown, 1, STRS ("preset", "sd-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("module lora_unet_down_blocks_0_foo_bar", "'foo_bar' does not start a known"));
  expect_error ("rename", &prefix, 1, STRS ("preset", "sd-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("module lora_foo_down_blocks_0", "'lora_unet_'"));
  expect_error ("rename", &qkv, 1, STRS ("preset", "flux-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("module lora_unet_double_blocks_0_img_attn_qkv", "must have 12 output features"));
  expect_error ("rename", &not_flux, 1, STRS ("preset", "flux-kohya-to-diffusers"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("module lora_unet_double_blocks_0_img_attn_foo", "not a Flux layer"));
  expect_error ("rename", &diffusers, 1, STRS ("preset", "flux-diffusers-to-kohya"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("module unet.down_blocks.0.attentions.0.proj_in", "not a Flux layer"));
  expect_error ("rename", &te, 1, STRS ("preset", "kohya-to-peft"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("module lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_ modules only"));
  expect_error ("rename", &diffusers, 1, STRS ("preset", "peft-to-kohya"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("does not apply to a diffusers module"));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  capture_warnings ();

  g_test_add_func ("/stage/rename/sd-round-trip", test_sd_round_trip);
  g_test_add_func ("/stage/rename/sd-alpha-fold", test_sd_alpha_fold);
  g_test_add_func ("/stage/rename/flux-fuse-split", test_flux_fuse_split);
  g_test_add_func ("/stage/rename/flux-missing-part-and-scale", test_flux_missing_part_and_scale);
  g_test_add_func ("/stage/rename/peft-kohya", test_peft_kohya);
  g_test_add_func ("/stage/rename/rules", test_rules);
  g_test_add_func ("/stage/rename/errors", test_errors);

  return g_test_run ();
}
