/* lp-rename-sgm.c: kohya's SDXL UNet names (the sgm UNet) against diffusers'
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kohya sd-scripts trains SDXL on its own copy of the original (sgm/LDM)
 * UNet, so its SDXL LoRAs name the blocks `input_blocks.N.M`,
 * `middle_block.M`, `output_blocks.N.M` and the resnet layers
 * `in_layers.2`, `emb_layers.1`, `out_layers.3`, `skip_connection`, with
 * every dot an underscore. diffusers reads them with
 * _maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key
 * (loaders/lora_conversion_utils.py), ComfyUI with unet_to_diffusers
 * (comfy/utils.py). The block numbering itself is core's
 * (lp_model_unet_name_to_diffusers() and its reverse, lp-model-names.c);
 * here are only the dots. Inside an attention block the names are
 * diffusers' (`proj_in`, `transformer_blocks.0.attn1.to_q`), read by the
 * segment table of lp-rename-presets.c.
 */
#include "lp-rename-presets.h"

#include <string.h>

static const char *const sgm_blocks[] = { "input_blocks_", "middle_block_", "output_blocks_" };

/* In the sgm UNet's own names (the blocks, a resnet's layers, `op`, `conv`,
 * `time_embed`, `label_emb`, `out`) a dot stands only next to a number, so
 * this puts back all of their dots; below an attention block it puts some
 * of them. Ends with a dot, as a prefix of the module's tensor names. */
static char *
sgm_dots (const char *underscored)
{
  g_auto(GStrv) tokens = g_strsplit (underscored, "_", -1);
  GString *out = g_string_new (tokens[0]);

  for (guint i = 1; tokens[0] != NULL && tokens[i] != NULL; i++)
    {
      gboolean number = g_ascii_isdigit (tokens[i][0]) || g_ascii_isdigit (tokens[i - 1][0]);
      g_string_append_c (out, number ? '.' : '_');
      g_string_append (out, tokens[i]);
    }
  g_string_append_c (out, '.');
  return g_string_free (out, FALSE);
}

/* The shortest prefix of @dotted, ending at a dot, that names a layer or
 * block of the UNet: diffusers' name for it, and in *@rest what follows. */
static char *
map_prefix (char        *dotted,
            const char **rest)
{
  for (char *dot = strchr (dotted, '.'); dot != NULL; dot = strchr (dot + 1, '.'))
    {
      char saved = dot[1];
      char *mapped;

      dot[1] = '\0';
      mapped = lp_model_unet_name_to_diffusers (dotted);
      dot[1] = saved;
      if (mapped != NULL)
        {
          *rest = dot + 1;
          return mapped;
        }
    }
  return NULL;
}

/* `down_blocks.1.attentions.0.`: below it, the names are diffusers' own */
static gboolean
is_attention_block (const char *dotted)
{
  return g_regex_match_simple ("(^|\\.)attentions\\.[0-9]+\\.$", dotted, 0, 0);
}

static void
set_unknown (GError    **error,
             const char *module,
             const char *what)
{
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
               "module %s: '%s' is no layer of SDXL's UNet; rename it with 'rules'",
               module, what);
}

gboolean
lp_rename_sgm_is_sgm (const char *underscored)
{
  g_autofree char *dotted = NULL;
  g_autofree char *mapped = NULL;
  const char *rest;

  for (guint i = 0; i < G_N_ELEMENTS (sgm_blocks); i++)
    if (g_str_has_prefix (underscored, sgm_blocks[i]))
      return TRUE;
  dotted = sgm_dots (underscored);
  mapped = map_prefix (dotted, &rest);
  return mapped != NULL && *rest == '\0';
}

char *
lp_rename_sgm_to_diffusers (const char  *underscored,
                            const char  *module,
                            GError     **error)
{
  g_autofree char *dotted = sgm_dots (underscored);
  g_autofree char *mapped = NULL;
  g_autofree char *inner = NULL;
  g_autofree char *path = NULL;
  const char *rest;

  /* A module is an attention block's layer, or a layer of ldm's own */
  mapped = map_prefix (dotted, &rest);
  if (mapped == NULL || is_attention_block (mapped) != (*rest != '\0'))
    {
      set_unknown (error, module, underscored);
      return NULL;
    }
  if (*rest == '\0')
    {
      mapped[strlen (mapped) - 1] = '\0';
      return g_steal_pointer (&mapped);
    }
  /* Below an attention block: diffusers' names, underscored */
  inner = g_strndup (rest, strlen (rest) - 1);
  g_strdelimit (inner, ".", '_');
  path = lp_rename_dot_path (inner, module, error);
  return path ? g_strconcat (mapped, path, NULL) : NULL;
}

char *
lp_rename_diffusers_to_sgm (const char  *path,
                            const char  *module,
                            GError     **error)
{
  g_autofree char *dotted = g_strconcat (path, ".", NULL);
  char *sgm = is_attention_block (dotted) ? NULL : lp_model_unet_name_from_diffusers (dotted, TRUE);

  if (sgm == NULL)
    {
      set_unknown (error, module, path);
      return NULL;
    }
  sgm[strlen (sgm) - 1] = '\0';
  g_strdelimit (sgm, ".", '_');
  return sgm;
}
