/* test-lora-scale.c: the `lora-scale` stage, against numpy
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <string.h>

#include "transform-test-util.h"

/* diffusers: sqrt|f| into both factors, the sign on up */
static void
test_diffusers (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) input = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "3", "dtype", "f32");
  g_autoptr(LpCheckpoint) output = run1 ("lora-scale", input, "factor", "-2.5");
  g_autofree char *p_in = write_file (input, dir, "in");
  g_autofree char *p_out = write_file (output, dir, "out");

  oracle ("scale", p_out, p_in, "-2.5", NULL);
}

/* kohya: only the alpha changes; a glob limits the modules */
static void
test_kohya_alpha (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpCheckpoint) input = synth ("preset", "sd15-unet", "format", "kohya", "rank", "4", "alpha", "3", "dtype", "bf16");
  g_autoptr(LpCheckpoint) output = run1 ("lora-scale", input, "factor", "0.5");
  g_autoptr(LpCheckpoint) part = run1 ("lora-scale", input, "factor", "2", "include", "*attn1*");
  g_autofree char *p_in = write_file (input, dir, "in");
  g_autofree char *p_out = write_file (output, dir, "out");
  const char *m1 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v";
  const char *m2 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v";
  g_autofree char *down = g_strconcat (m1, ".lora_down.weight", NULL);
  g_autofree char *a1 = g_strconcat (m1, ".alpha", NULL);
  g_autofree char *a2 = g_strconcat (m2, ".alpha", NULL);
  g_autofree double *v = NULL;

  g_assert_true (lp_checkpoint_lookup (output, down) == lp_checkpoint_lookup (input, down));
  v = lp_tensor_dup_f64 (lp_checkpoint_lookup (part, a1), NULL, NULL);
  g_assert_cmpfloat (v[0], ==, 6.0);
  g_assert_true (lp_checkpoint_lookup (part, a2) == lp_checkpoint_lookup (input, a2));
  oracle ("scale", p_out, p_in, "0.5", NULL);
}

/* A kohya module without alpha gets one: rank * factor */
static void
test_kohya_no_alpha (void)
{
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) output = NULL;
  g_autofree double *v = NULL;

  add_module (input, "lora_unet_x", ".lora_down.weight", ".lora_up.weight", 4, 4, 2, 0);
  output = run1 ("lora-scale", input, "factor", "1.5");
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (output), ==, 3);
  v = lp_tensor_dup_f64 (lp_checkpoint_lookup (output, "lora_unet_x.alpha"), NULL, NULL);
  g_assert_cmpfloat (v[0], ==, 3.0);
}

static void
test_errors (void)
{
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();

  add_kohya (input, "lora_unet_x", 4, 4, 2);
  expect_error ("lora-scale", &input, 1, STRS ("factor", "2", "include", "*attn*"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("no LoRA module to scale", "1 modules"));
  expect_error ("lora-scale", &input, 1, STRS ("factor", "2", "exclude", "lora_*"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("no LoRA module to scale"));
}

/* A factor whose √ puts infinity into a bf16 factor is an error naming the
 * module and the factor when the data is computed (by the sink), and no
 * file is written; a kohya alpha times the factor past f64 fails at once. */
static void
test_overflow (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(LpCheckpoint) input = synth ("preset", "sd15-unet", "format", "diffusers", "rank", "2", "dtype", "bf16");
  g_autoptr(LpCheckpoint) output = run1 ("lora-scale", input, "factor", "1e90");
  g_autoptr(LpCheckpoint) kohya = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2", "alpha", "8", "dtype", "bf16");
  g_autoptr(GError) error = NULL;

  lp_test_run_stage ("safetensors-sink", &output, 1, &error, "location", path, NULL);
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
  g_assert_nonnull (strstr (error->message, "stage 'lora-scale': module "
                            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, factor 1e+90: "
                            "tensor 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight': "));
  g_assert_nonnull (strstr (error->message, "values would be written as infinity or NaN in BF16"));
  g_assert_false (g_file_test (path, G_FILE_TEST_EXISTS));

  expect_error ("lora-scale", &kohya, 1, STRS ("factor", "1e308"), LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                STRS ("module lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q: "
                      "alpha 8 times factor 1e+308 is too large for a number"));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/stage/lora-scale/diffusers", test_diffusers);
  g_test_add_func ("/stage/lora-scale/kohya-alpha", test_kohya_alpha);
  g_test_add_func ("/stage/lora-scale/kohya-no-alpha", test_kohya_no_alpha);
  g_test_add_func ("/stage/lora-scale/errors", test_errors);
  g_test_add_func ("/stage/lora-scale/overflow", test_overflow);

  return g_test_run ();
}
