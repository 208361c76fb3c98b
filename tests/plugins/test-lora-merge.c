/* test-lora-merge.c: the `lora-merge` stage, against numpy
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <math.h>
#include <string.h>

#include "transform-test-util.h"

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

/* kohya, different alphas and ranks, a module set that differs: the merge
 * is the weighted sum, and merge ! lora-svd reaches the SVD optimum */
static void
test_kohya_weighted (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) a = synth ("preset", "sd15-unet", "format", "kohya", "rank", "4", "alpha", "3", "dtype", "f32");
  g_autoptr(LpCheckpoint) b_all = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2", "alpha", "1",
                                         "seed", "9", "dtype", "f32");
  g_autoptr(LpCheckpoint) b = run1 ("select", b_all, "exclude", "*attn2*");
  LpCheckpoint *inputs[] = { a, b };
  g_autoptr(LpCheckpoint) merged = run_ok ("lora-merge", inputs, 2, "weights", "0.7,-0.3", NULL);
  g_autoptr(LpCheckpoint) reduced = run1 ("lora-svd", merged, "rank", "3");
  g_autofree char *p_a = write_file (a, dir, "a");
  g_autofree char *p_b = write_file (b, dir, "b");
  g_autofree char *p_merged = write_file (merged, dir, "merged");
  g_autofree char *p_reduced = write_file (reduced, dir, "reduced");

  g_assert_cmpuint (dim (merged, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", 0), ==, 6);
  g_assert_cmpuint (dim (merged, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight", 0), ==, 4);
  oracle ("merge", p_merged, "0.7", p_a, "-0.3", p_b, NULL);
  oracle ("svd", p_reduced, "3", "0.7", p_a, "-0.3", p_b, NULL);
}

/* diffusers in bf16, three inputs, default weights */
static void
test_diffusers_bf16 (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) a = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "2", "dtype", "bf16");
  g_autoptr(LpCheckpoint) b = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "3", "seed", "2", "dtype", "bf16");
  g_autoptr(LpCheckpoint) c = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "1", "seed", "3", "dtype", "f16");
  LpCheckpoint *inputs[] = { a, b, c };
  g_autoptr(LpCheckpoint) merged = run_ok ("lora-merge", inputs, 3, "method", "concat", NULL);
  g_autofree char *p_a = write_file (a, dir, "a");
  g_autofree char *p_b = write_file (b, dir, "b");
  g_autofree char *p_c = write_file (c, dir, "c");
  g_autofree char *p_merged = write_file (merged, dir, "merged");

  oracle ("merge", p_merged, "1", p_a, "1", p_b, "1", p_c, NULL);
}

/* PEFT: the first input's adapter config, rewritten for the merged rank */
static void
test_peft (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) a_all = synth ("preset", "llama", "format", "peft", "rank", "4", "alpha", "8", "dtype", "f32");
  g_autoptr(LpCheckpoint) b_all = synth ("preset", "llama", "format", "peft", "rank", "2", "alpha", "1", "seed", "5", "dtype", "f32");
  g_autoptr(LpCheckpoint) a = run1 ("select", a_all, "include", "*layers.1.*");
  g_autoptr(LpCheckpoint) b = run1 ("select", b_all, "include", "*layers.1.*");
  LpCheckpoint *inputs[] = { a, b };
  g_autoptr(LpCheckpoint) merged = run_ok ("lora-merge", inputs, 2, "weights", "1,2", NULL);
  g_autofree char *p_a = write_file (a, dir, "a");
  g_autofree char *p_b = write_file (b, dir, "b");
  g_autofree char *p_merged = write_file (merged, dir, "merged");

  g_assert_nonnull (strstr (lp_checkpoint_get_adapter_config (merged), "\"r\" : 6"));
  oracle ("merge", p_merged, "1", p_a, "2", p_b, NULL);
}

/* PEFT inputs covering different modules: the merged ranks differ, so the
 * rewritten config has ^-anchored rank_pattern and alpha_pattern entries,
 * which the oracle reads by PEFT's get_pattern_key */
static void
test_peft_patterns (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) a_all = synth ("preset", "llama", "format", "peft", "rank", "4", "alpha", "8", "dtype", "f32");
  g_autoptr(LpCheckpoint) b_all = synth ("preset", "llama", "format", "peft", "rank", "2", "alpha", "1", "seed", "5", "dtype", "f32");
  g_autoptr(LpCheckpoint) a = run1 ("select", a_all, "include", "*layers.1.*");
  g_autoptr(LpCheckpoint) b = run1 ("select", b_all, "include", "*layers.1.self_attn.*");
  LpCheckpoint *inputs[] = { a, b };
  g_autoptr(LpCheckpoint) merged = run_ok ("lora-merge", inputs, 2, "weights", "1,3", NULL);
  g_autofree char *p_a = write_file (a, dir, "a");
  g_autofree char *p_b = write_file (b, dir, "b");
  g_autofree char *p_merged = write_file (merged, dir, "merged");
  const char *config = lp_checkpoint_get_adapter_config (merged);

  g_assert_nonnull (strstr (config, "\"r\" : 6"));
  g_assert_nonnull (strstr (config, "\"^model\\\\.layers\\\\.1\\\\.mlp\\\\.up_proj\" : 4"));
  oracle ("merge", p_merged, "1", p_a, "3", p_b, NULL);
}

static void
test_errors (void)
{
  g_autoptr(LpCheckpoint) a = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) b = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) c = lp_checkpoint_new ();
  LpCheckpoint *ab[] = { a, b }, *ac[] = { a, c };

  add_kohya (a, "lora_unet_x", 4, 6, 2);
  add_kohya (b, "lora_unet_x", 5, 6, 2);
  add_diffusers (c, "lora_unet_x", 4, 6, 2);

  expect_error ("lora-merge", ab, 2, STRS ("weights", "1,abc"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_PROPERTY, STRS ("'abc' (weight 2)"));
  expect_error ("lora-merge", ab, 2, STRS ("weights", "1,2,3"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_PROPERTY, STRS ("3 weights given for 2 inputs"));
  expect_error ("lora-merge", ab, 2, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("module lora_unet_x: shapes differ", "[2, 4]", "[2, 5]"));
  expect_error ("lora-merge", ac, 2, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("input 2, converted to kohya by rename preset=sd-diffusers-to-kohya: module lora_unet_x"));
}

/* Files as lora-synth writes them for kohya sd-scripts and for diffusers:
 * merged as they are, they would give a file holding both naming schemes
 * (each loader applies only its own half). The merge converts every input
 * to the first input's convention, or the one `convention` names, through
 * the rename presets; the update is the sum whatever the names. An input
 * no preset converts is an error naming both conventions. */
static void
test_mixed_conventions (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) kohya = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2", "alpha", "1",
                                         "dtype", "f32");
  g_autoptr(LpCheckpoint) diffusers = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "3",
                                             "seed", "4", "dtype", "f32");
  g_autoptr(LpCheckpoint) peft = synth ("preset", "llama", "format", "peft", "rank", "2", "alpha", "8", "dtype", "f32");
  g_autoptr(LpCheckpoint) other_peft = synth ("preset", "llama", "format", "peft", "rank", "2", "seed", "7", "dtype", "f32");
  g_autoptr(LpCheckpoint) kohya_llama = peft_to_kohya (other_peft);
  LpCheckpoint *kd[] = { kohya, diffusers }, *dk[] = { diffusers, kohya }, *pk[] = { peft, kohya_llama };
  g_autoptr(LpCheckpoint) as_kohya = run_ok ("lora-merge", kd, 2, NULL, NULL);
  g_autoptr(LpCheckpoint) as_diffusers = run_ok ("lora-merge", dk, 2, "weights", "2,-1", NULL);
  g_autoptr(LpCheckpoint) chosen = run_ok ("lora-merge", dk, 2, "convention", "kohya", NULL);
  g_autoptr(LpCheckpoint) as_peft = run_ok ("lora-merge", pk, 2, NULL, NULL);
  g_autofree char *p_kohya = write_file (kohya, dir, "kohya");
  g_autofree char *p_diffusers = write_file (diffusers, dir, "diffusers");
  g_autofree char *p_peft = write_file (peft, dir, "peft");
  g_autofree char *p_other = write_file (other_peft, dir, "other");
  g_autofree char *p_as_kohya = write_file (as_kohya, dir, "as-kohya");
  g_autofree char *p_as_diffusers = write_file (as_diffusers, dir, "as-diffusers");
  g_autofree char *p_chosen = write_file (chosen, dir, "chosen");
  g_autofree char *p_as_peft = write_file (as_peft, dir, "as-peft");

  g_assert_cmpuint (dim (as_kohya, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", 0), ==, 5);
  g_assert_null (lp_checkpoint_lookup (as_kohya, "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"));
  g_assert_cmpuint (dim (as_diffusers, "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", 0), ==, 5);
  g_assert_null (lp_checkpoint_lookup (as_diffusers, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"));
  g_assert_nonnull (lp_checkpoint_lookup (chosen, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"));
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (as_kohya), ==, lp_checkpoint_get_n_tensors (kohya));
  g_assert_nonnull (lp_checkpoint_get_adapter_config (as_peft));
  oracle ("merge", p_as_kohya, "1", p_kohya, "1", p_diffusers, NULL);
  oracle ("merge", p_as_diffusers, "2", p_diffusers, "-1", p_kohya, NULL);
  oracle ("merge", p_chosen, "1", p_diffusers, "1", p_kohya, NULL);
  oracle ("merge", p_as_peft, "1", p_peft, "1", p_other, NULL);

  expect_error ("lora-merge", pk, 2, STRS ("convention", "diffusers"), LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("input 1: no rename preset converts PEFT modules (base_model.model.", ") to diffusers"));
}

/* Weights that put infinity into the merged up factor are an error naming
 * the module, the weight and the input, and nothing is written; a weight
 * times a module's scale past f64 fails at once; an input already holding
 * NaN is named as such. */
static void
test_overflow (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(LpCheckpoint) a = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "2", "dtype", "bf16");
  g_autoptr(LpCheckpoint) b = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "2", "seed", "2", "dtype", "bf16");
  g_autoptr(LpCheckpoint) k = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2", "alpha", "8", "dtype", "f32");
  g_autoptr(LpCheckpoint) nan = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) finite = lp_checkpoint_new ();
  LpCheckpoint *ab[] = { a, b }, *kk[] = { k, k }, *nf[] = { finite, nan };
  g_autoptr(LpCheckpoint) merged = run_ok ("lora-merge", ab, 2, "weights", "1,1e80", NULL);
  g_autoptr(LpCheckpoint) with_nan = NULL;
  g_autoptr(GError) error = NULL;
  const float bad[6] = { 1.0f, NAN, 0.5f, 0.25f, 0.5f, 0.25f };
  guint64 shape[2] = { 2, 2 };
  g_autoptr(LpTensor) t = NULL;

  lp_test_run_stage ("safetensors-sink", &merged, 1, &error, "location", path, NULL);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
  g_assert_nonnull (strstr (error->message, "stage 'lora-merge': module "
                            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, weight 1e+80 of input 2: "
                            "tensor 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight': "));
  g_assert_nonnull (strstr (error->message, "values would be written as infinity or NaN in BF16"));
  g_assert_false (g_file_test (path, G_FILE_TEST_EXISTS));
  g_clear_error (&error);

  /* kohya scale alpha / rank = 4: 1e308 * 4 is no number */
  expect_error ("lora-merge", kk, 2, STRS ("weights", "1,1e308"), LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                STRS ("weight 1e+308 of input 2: the weight times the module's scale 4 is too large for a number"));

  add_kohya (finite, "lora_unet_x", 2, 2, 2);
  t = lp_test_tensor ("lora_unet_x.lora_down.weight", LP_DTYPE_F32, shape, 2, bad + 2);
  g_assert_true (lp_checkpoint_add_tensor (nan, t, &error));
  g_clear_object (&t);
  t = lp_test_tensor ("lora_unet_x.lora_up.weight", LP_DTYPE_F32, shape, 2, bad);
  g_assert_true (lp_checkpoint_add_tensor (nan, t, &error));
  with_nan = run_ok ("lora-merge", nf, 2, "method", "concat", NULL);
  lp_test_run_stage ("safetensors-sink", &with_nan, 1, &error, "location", path, NULL);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
  g_assert_nonnull (strstr (error->message, "module lora_unet_x, weight 1 of input 2: tensor "
                            "'lora_unet_x.lora_up.weight': its input 'lora_unet_x.lora_up.weight' holds 1 infinite or NaN values"));
  g_assert_false (g_file_test (path, G_FILE_TEST_EXISTS));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  capture_warnings ();

  g_test_add_func ("/stage/lora-merge/kohya-weighted", test_kohya_weighted);
  g_test_add_func ("/stage/lora-merge/diffusers-bf16", test_diffusers_bf16);
  g_test_add_func ("/stage/lora-merge/peft", test_peft);
  g_test_add_func ("/stage/lora-merge/errors", test_errors);
  g_test_add_func ("/stage/lora-merge/overflow", test_overflow);
  g_test_add_func ("/stage/lora-merge/mixed-conventions", test_mixed_conventions);
  g_test_add_func ("/stage/lora-merge/peft-patterns", test_peft_patterns);

  return g_test_run ();
}
