/* test-select.c: the `select` stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <string.h>

#include "transform-test-util.h"

static guint
n_modules (LpCheckpoint *checkpoint)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GPtrArray) modules = lp_lora_find_modules (checkpoint, NULL, NULL, NULL, &error);

  g_assert_no_error (error);
  return modules->len;
}

/* Modules go whole, by module name; other tensors by their own name. */
static void
test_modules_whole (void)
{
  g_autoptr(LpCheckpoint) input = synth ("preset", "sd15-unet", "format", "kohya", "rank", "2");
  g_autoptr(LpCheckpoint) no_cross = run1 ("select", input, "exclude", "*attn2*");
  g_autoptr(LpCheckpoint) q_only = run1 ("select", input, "include", "*attn1_to_q");

  g_assert_cmpuint (n_modules (input), ==, 128);
  g_assert_cmpuint (n_modules (no_cross), ==, 64);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (no_cross), ==, 3 * 64);
  g_assert_cmpuint (n_modules (q_only), ==, 16);
  /* the alpha travels with its module, although it matches no glob itself */
  g_assert_nonnull (lp_checkpoint_lookup (q_only, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"));
  g_assert_null (lp_checkpoint_lookup (q_only, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.alpha"));
  /* tensors are passed on, not copied */
  g_assert_true (lp_checkpoint_get_tensor (q_only, 0)
                 == lp_checkpoint_lookup (input, lp_tensor_get_name (lp_checkpoint_get_tensor (q_only, 0))));
}

/* Any family goes whole, by module name: LyCORIS parts, mlx-lm's
 * transposed factors (all written by lora-synth as those tools write them). */
static void
test_every_family (void)
{
  static const struct { const char *format; guint per_module; } formats[] = {
    { "loha", 5 },    /* hada_w1_a/_b, hada_w2_a/_b, alpha */
    { "lokr", 4 },    /* lokr_w1, lokr_w2_a/_b, alpha */
    { "mlx", 2 },     /* lora_a, lora_b */
  };

  for (guint i = 0; i < G_N_ELEMENTS (formats); i++)
    {
      g_autoptr(LpCheckpoint) input = synth ("preset", "sd15-unet", "format", formats[i].format, "rank", "2");
      g_autoptr(LpCheckpoint) no_cross = run1 ("select", input, "exclude", "*attn2*");
      g_autoptr(GError) error = NULL;
      g_autoptr(GPtrArray) kept = lp_lora_find_modules (no_cross, NULL, NULL, NULL, &error);

      g_assert_no_error (error);
      g_assert_cmpuint (n_modules (input), ==, 128);
      g_assert_cmpuint (kept->len, ==, 64);
      g_assert_cmpuint (lp_checkpoint_get_n_tensors (no_cross), ==, formats[i].per_module * 64);
      for (guint m = 0; m < kept->len; m++)
        {
          LpLoraModule *module = g_ptr_array_index (kept, m);
          g_autoptr(GPtrArray) parts = lp_lora_module_get_tensors (module);
          g_assert_null (strstr (lp_lora_module_get_name (module), "attn2"));
          g_assert_cmpuint (parts->len, ==, formats[i].per_module);
          g_assert_cmpstr (lp_lora_module_get_family (module), ==, formats[i].format);
        }
    }
}

static void
test_others (void)
{
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) te = NULL, unet = NULL;
  float v = 1;
  guint64 shape[1] = { 1 };
  g_autoptr(LpTensor) emb = lp_test_tensor ("emb.token", LP_DTYPE_F32, shape, 1, &v);

  add_kohya (input, "lora_te_text_model_encoder_layers_0_mlp_fc1", 4, 4, 2);
  add_kohya (input, "lora_unet_mid_block_attentions_0_proj_in", 4, 4, 2);
  lp_checkpoint_add_tensor (input, emb, NULL);
  lp_checkpoint_set_metadata (input, "ss_network_dim", "2");

  te = run1 ("select", input, "exclude", "lora_te*");
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (te), ==, 4);
  g_assert_nonnull (lp_checkpoint_lookup (te, "emb.token"));
  g_assert_cmpstr (lp_checkpoint_get_metadata (te, "ss_network_dim"), ==, "2");
  unet = run1 ("select", input, "include", "lora_unet_*,emb.*", "exclude", "*proj_in");
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (unet), ==, 1);
}

static void
test_errors (void)
{
  g_autoptr(LpCheckpoint) input = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) unpaired = lp_checkpoint_new ();
  float v[4] = { 0 };
  guint64 shape[2] = { 2, 2 };
  g_autoptr(LpTensor) down = lp_test_tensor ("x.lora_down.weight", LP_DTYPE_F32, shape, 2, v);

  add_kohya (input, "lora_unet_mid_block_attentions_0_proj_in", 4, 4, 2);
  lp_checkpoint_add_tensor (unpaired, down, NULL);

  expect_error ("select", &input, 1, NULL, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                STRS ("'include' or 'exclude'"));
  expect_error ("select", &input, 1, STRS ("include", "*attn2*"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("nothing selected", "include '*attn2*'"));
  expect_error ("select", &unpaired, 1, STRS ("include", "*"), LP_STAGE_ERROR,
                LP_STAGE_ERROR_INVALID_INPUT, STRS ("module x"));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/stage/select/modules-whole", test_modules_whole);
  g_test_add_func ("/stage/select/every-family", test_every_family);
  g_test_add_func ("/stage/select/others", test_others);
  g_test_add_func ("/stage/select/errors", test_errors);

  return g_test_run ();
}
