/* test-model-names.c: the UNet block numbering of ldm (SD 1.x) and sgm
 * (SDXL) checkpoints against diffusers', both ways
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The oracle is the prefix table of diffusers'
 * scripts/convert_diffusers_to_original_stable_diffusion.py
 * (unet_conversion_map_layer, SD 1.x: four blocks, attention in up blocks
 * 1-3, the upsampler at `output_blocks.{3i+2}.{1 if i == 0 else 2}.`) and of
 * convert_diffusers_to_original_sdxl.py (three blocks, attention in up
 * blocks 0-1, and `output_blocks.2.2.conv.` for the first upsampler).
 */
#include <lpipe/lpipe.h>

typedef struct {
  char *ldm;
  char *diffusers;
} Pair;

static void
add (GArray *pairs, char *ldm, char *diffusers)
{
  Pair pair = { ldm, diffusers };
  g_array_append_val (pairs, pair);
}

/* unet_conversion_map_layer of the two scripts, one resnet or attention
 * layer below each prefix */
static GArray *
conversion_map (gboolean sdxl)
{
  GArray *pairs = g_array_new (FALSE, FALSE, sizeof (Pair));
  guint n_blocks = sdxl ? 3 : 4;

  for (guint i = 0; i < n_blocks; i++)
    {
      gboolean down_attention = sdxl ? i > 0 : i < 3;
      gboolean up_attention = sdxl ? i < 2 : i > 0;

      for (guint j = 0; j < 2; j++)
        {
          add (pairs, g_strdup_printf ("input_blocks.%u.0.in_layers.2.weight", 3 * i + j + 1),
               g_strdup_printf ("down_blocks.%u.resnets.%u.conv1.weight", i, j));
          if (down_attention)
            add (pairs, g_strdup_printf ("input_blocks.%u.1.proj_in.weight", 3 * i + j + 1),
                 g_strdup_printf ("down_blocks.%u.attentions.%u.proj_in.weight", i, j));
        }
      for (guint j = 0; j < 3; j++)
        {
          add (pairs, g_strdup_printf ("output_blocks.%u.0.skip_connection.weight", 3 * i + j),
               g_strdup_printf ("up_blocks.%u.resnets.%u.conv_shortcut.weight", i, j));
          if (up_attention)
            add (pairs, g_strdup_printf ("output_blocks.%u.1.transformer_blocks.0.attn1.to_q.weight", 3 * i + j),
                 g_strdup_printf ("up_blocks.%u.attentions.%u.transformer_blocks.0.attn1.to_q.weight", i, j));
        }
      if (i < n_blocks - 1)
        {
          add (pairs, g_strdup_printf ("input_blocks.%u.0.op.weight", 3 * (i + 1)),
               g_strdup_printf ("down_blocks.%u.downsamplers.0.conv.weight", i));
          add (pairs, g_strdup_printf ("output_blocks.%u.%u.conv.weight", 3 * i + 2, !sdxl && i == 0 ? 1 : 2),
               g_strdup_printf ("up_blocks.%u.upsamplers.0.conv.weight", i));
        }
    }
  add (pairs, g_strdup ("middle_block.1.proj_out.weight"), g_strdup ("mid_block.attentions.0.proj_out.weight"));
  add (pairs, g_strdup ("middle_block.2.emb_layers.1.weight"), g_strdup ("mid_block.resnets.1.time_emb_proj.weight"));
  add (pairs, g_strdup ("input_blocks.0.0.weight"), g_strdup ("conv_in.weight"));
  add (pairs, g_strdup ("time_embed.2.bias"), g_strdup ("time_embedding.linear_2.bias"));
  return pairs;
}

static void
test_both_ways (gconstpointer data)
{
  gboolean sdxl = GPOINTER_TO_INT (data);
  GArray *pairs = conversion_map (sdxl);

  for (guint i = 0; i < pairs->len; i++)
    {
      Pair *pair = &g_array_index (pairs, Pair, i);
      g_autofree char *diffusers = lp_model_unet_name_to_diffusers (pair->ldm);
      g_autofree char *ldm = lp_model_unet_name_from_diffusers (pair->diffusers, sdxl);

      g_assert_cmpstr (diffusers, ==, pair->diffusers);
      g_assert_cmpstr (ldm, ==, pair->ldm);
      g_free (pair->ldm);
      g_free (pair->diffusers);
    }
  g_array_unref (pairs);
}

static void
test_unknown (void)
{
  static const char *const ldm[] = { "input_blocks.3.1.proj_in.weight", "output_blocks.3.2.conv.weight",
                                     "middle_block.3.in_layers.2.weight", "input_blocks.1.0.in_layers.1.weight" };
  static const char *const diffusers[] = { "down_blocks.0.resnets.2.conv1.weight", "up_blocks.0.resnets.3.conv1.weight",
                                           "mid_block.attentions.1.proj_in.weight", "down_blocks.0.resnets.0.conv9.weight" };

  for (guint i = 0; i < G_N_ELEMENTS (ldm); i++)
    g_assert_null (lp_model_unet_name_to_diffusers (ldm[i]));
  for (guint i = 0; i < G_N_ELEMENTS (diffusers); i++)
    g_assert_null (lp_model_unet_name_from_diffusers (diffusers[i], TRUE));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_data_func ("/model-names/unet/sd15", GINT_TO_POINTER (FALSE), test_both_ways);
  g_test_add_data_func ("/model-names/unet/sdxl", GINT_TO_POINTER (TRUE), test_both_ways);
  g_test_add_func ("/model-names/unet/unknown", test_unknown);
  return g_test_run ();
}
