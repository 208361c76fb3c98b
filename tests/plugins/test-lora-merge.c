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
                STRS ("module lora_unet_x: inputs 1 and 2", "different conventions"));
}

/* Files as lora-synth writes them for kohya sd-scripts and for diffusers:
 * merged, they would give a file holding both naming schemes (each loader
 * applies only its own half). The merge refuses, naming both conventions
 * and the rename preset that converts the second input. */
static void
test_mixed_conventions (void)
{
  g_autoptr(LpCheckpoint) kohya = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2", "dtype", "f32");
  g_autoptr(LpCheckpoint) diffusers = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "2", "dtype", "f32");
  g_autoptr(LpCheckpoint) peft = synth ("preset", "llama", "format", "peft", "rank", "2", "dtype", "f32");
  g_autoptr(LpCheckpoint) kohya_llama = run1 ("rename", peft, "preset", "peft-to-kohya");
  LpCheckpoint *kd[] = { kohya, diffusers }, *dk[] = { diffusers, kohya }, *pk[] = { peft, kohya_llama };

  expect_error ("lora-merge", kd, 2, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("inputs 1 and 2 name their modules in different conventions, kohya "
                      "(lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight) "
                      "and diffusers (unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight)",
                      "Convert input 2 to kohya first with rename preset=sd-diffusers-to-kohya or flux-diffusers-to-kohya"));
  expect_error ("lora-merge", dk, 2, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("Convert input 2 to diffusers first with rename preset=sd-kohya-to-diffusers or flux-kohya-to-diffusers"));
  expect_error ("lora-merge", pk, 2, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                STRS ("different conventions, peft", "and kohya", "Convert input 2 to peft first with rename preset=kohya-to-peft"));
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

  g_test_add_func ("/stage/lora-merge/kohya-weighted", test_kohya_weighted);
  g_test_add_func ("/stage/lora-merge/diffusers-bf16", test_diffusers_bf16);
  g_test_add_func ("/stage/lora-merge/peft", test_peft);
  g_test_add_func ("/stage/lora-merge/errors", test_errors);
  g_test_add_func ("/stage/lora-merge/overflow", test_overflow);
  g_test_add_func ("/stage/lora-merge/mixed-conventions", test_mixed_conventions);

  return g_test_run ();
}
