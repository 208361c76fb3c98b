/* lp-rename-sgm.c: kohya's SDXL UNet names (the sgm UNet) against diffusers'
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kohya sd-scripts trains SDXL on its own copy of the original (sgm/LDM)
 * UNet, so its SDXL LoRAs name the blocks `input_blocks.N.M`,
 * `middle_block.M`, `output_blocks.N.M` and the resnet layers
 * `in_layers.2`, `emb_layers.1`, `out_layers.3`, `skip_connection`.
 * diffusers reads them with _maybe_map_sgm_blocks_to_diffusers and
 * _convert_unet_lora_key (loaders/lora_conversion_utils.py), ComfyUI with
 * unet_to_diffusers (comfy/utils.py); both place the layers of SDXL's UNet
 * (two resnets a block, three blocks, attention in all but the first):
 *
 *   input_blocks.(3b + l + 1).0   down_blocks.b.resnets.l
 *   input_blocks.(3b + l + 1).1   down_blocks.b.attentions.l
 *   input_blocks.(3b + 3).0.op    down_blocks.b.downsamplers.0.conv
 *   middle_block.0 / .1 / .2      mid_block.resnets.0 / attentions.0 / resnets.1
 *   output_blocks.(3b + l).0      up_blocks.b.resnets.l
 *   output_blocks.(3b + l).1      up_blocks.b.attentions.l
 *   output_blocks.(3b + 2).2.conv up_blocks.b.upsamplers.0.conv
 *   input_blocks.0.0, out.2       conv_in, conv_out
 *   time_embed.0 / .2             time_embedding.linear_1 / linear_2
 *   label_emb.0.0 / .0.2          add_embedding.linear_1 / linear_2
 *
 * Inside an attention block the names are diffusers' (`proj_in`,
 * `transformer_blocks.0.attn1.to_q`), read by the segment table of
 * lp-rename-presets.c.
 */
#include "lp-rename-presets.h"

#include <string.h>

#define LAYERS_PER_BLOCK 2

/* The resnet layers: sgm (underscored) and diffusers */
static const struct {
  const char *sgm;
  const char *diffusers;
} resnet_layers[] = {
  { "in_layers_2", "conv1" },
  { "emb_layers_1", "time_emb_proj" },
  { "out_layers_3", "conv2" },
  { "skip_connection", "conv_shortcut" },
};

/* The layers outside the blocks */
static const struct {
  const char *sgm;
  const char *diffusers;
} basic_layers[] = {
  { "input_blocks_0_0", "conv_in" },
  { "out_2", "conv_out" },
  { "time_embed_0", "time_embedding.linear_1" },
  { "time_embed_2", "time_embedding.linear_2" },
  { "label_emb_0_0", "add_embedding.linear_1" },
  { "label_emb_0_2", "add_embedding.linear_2" },
};

static const char *const sgm_blocks[] = { "input_blocks_", "middle_block_", "output_blocks_" };

gboolean
lp_rename_sgm_is_sgm (const char *underscored)
{
  for (guint i = 0; i < G_N_ELEMENTS (sgm_blocks); i++)
    if (g_str_has_prefix (underscored, sgm_blocks[i]))
      return TRUE;
  for (guint i = 0; i < G_N_ELEMENTS (basic_layers); i++)
    if (g_str_equal (underscored, basic_layers[i].sgm))
      return TRUE;
  return FALSE;
}

/* Reads "N_" at *p, moving past it. */
static gboolean
read_index (const char **p,
            guint       *value)
{
  char *end = NULL;
  guint64 v;

  if (!g_ascii_isdigit (**p))
    return FALSE;
  v = g_ascii_strtoull (*p, &end, 10);
  if (v > 1000 || *end != '_')
    return FALSE;
  *value = v;
  *p = end + 1;
  return TRUE;
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

/* A resnet's layer (`in_layers_2`) or an attention block's path below
 * @block (`down_blocks.1.attentions.0`). */
static char *
inner_to_diffusers (const char  *block,
                    gboolean     resnet,
                    const char  *rest,
                    const char  *module,
                    GError     **error)
{
  g_autofree char *path = NULL;

  if (resnet)
    {
      for (guint i = 0; i < G_N_ELEMENTS (resnet_layers); i++)
        if (g_str_equal (rest, resnet_layers[i].sgm))
          return g_strconcat (block, ".", resnet_layers[i].diffusers, NULL);
      set_unknown (error, module, rest);
      return NULL;
    }
  path = lp_rename_dot_path (rest, module, error);
  return path ? g_strconcat (block, ".", path, NULL) : NULL;
}

char *
lp_rename_sgm_to_diffusers (const char  *underscored,
                            const char  *module,
                            GError     **error)
{
  const char *p = underscored;
  g_autofree char *block = NULL;
  guint n, m;
  gboolean resnet;

  for (guint i = 0; i < G_N_ELEMENTS (basic_layers); i++)
    if (g_str_equal (underscored, basic_layers[i].sgm))
      return g_strdup (basic_layers[i].diffusers);

  if (g_str_has_prefix (p, "input_blocks_"))
    {
      p += strlen ("input_blocks_");
      if (!read_index (&p, &n) || !read_index (&p, &m) || n == 0)
        goto unknown;
      if (m == 0 && g_str_equal (p, "op") && n % (LAYERS_PER_BLOCK + 1) == 0)
        return g_strdup_printf ("down_blocks.%u.downsamplers.0.conv", (n - 1) / (LAYERS_PER_BLOCK + 1));
      if (m > 1 || (n - 1) % (LAYERS_PER_BLOCK + 1) == LAYERS_PER_BLOCK)
        goto unknown;
      resnet = m == 0;
      block = g_strdup_printf ("down_blocks.%u.%s.%u", (n - 1) / (LAYERS_PER_BLOCK + 1),
                               resnet ? "resnets" : "attentions", (n - 1) % (LAYERS_PER_BLOCK + 1));
    }
  else if (g_str_has_prefix (p, "middle_block_"))
    {
      p += strlen ("middle_block_");
      if (!read_index (&p, &m) || m > 2)
        goto unknown;
      resnet = m != 1;
      block = g_strdup (m == 0 ? "mid_block.resnets.0" : m == 1 ? "mid_block.attentions.0"
                                                                 : "mid_block.resnets.1");
    }
  else if (g_str_has_prefix (p, "output_blocks_"))
    {
      p += strlen ("output_blocks_");
      if (!read_index (&p, &n) || !read_index (&p, &m) || m > 2)
        goto unknown;
      if (m == 2)
        {
          if (!g_str_equal (p, "conv") || n % (LAYERS_PER_BLOCK + 1) != LAYERS_PER_BLOCK)
            goto unknown;
          return g_strdup_printf ("up_blocks.%u.upsamplers.0.conv", n / (LAYERS_PER_BLOCK + 1));
        }
      resnet = m == 0;
      block = g_strdup_printf ("up_blocks.%u.%s.%u", n / (LAYERS_PER_BLOCK + 1),
                               resnet ? "resnets" : "attentions", n % (LAYERS_PER_BLOCK + 1));
    }
  else
    goto unknown;
  return inner_to_diffusers (block, resnet, p, module, error);

unknown:
  set_unknown (error, module, underscored);
  return NULL;
}

/* Reads "name.N." at *p, moving past it. */
static gboolean
read_segment (const char **p,
              const char  *name,
              guint       *index)
{
  const char *q = *p;
  char *end = NULL;
  guint64 v;

  if (!g_str_has_prefix (q, name) || q[strlen (name)] != '.')
    return FALSE;
  q += strlen (name) + 1;
  if (!g_ascii_isdigit (*q))
    return FALSE;
  v = g_ascii_strtoull (q, &end, 10);
  if (v > 1000 || *end != '.')
    return FALSE;
  *index = v;
  *p = end + 1;
  return TRUE;
}

/* The sgm name of a resnet layer or an attention block's path, underscored */
static char *
inner_to_sgm (const char *block,
              gboolean    resnet,
              const char *rest)
{
  g_autofree char *inner = NULL;

  if (resnet)
    {
      for (guint i = 0; i < G_N_ELEMENTS (resnet_layers); i++)
        if (g_str_equal (rest, resnet_layers[i].diffusers))
          return g_strconcat (block, "_", resnet_layers[i].sgm, NULL);
      return NULL;
    }
  inner = g_strdup (rest);
  g_strdelimit (inner, ".", '_');
  return g_strconcat (block, "_", inner, NULL);
}

char *
lp_rename_diffusers_to_sgm (const char  *path,
                            const char  *module,
                            GError     **error)
{
  const char *p = path;
  g_autofree char *block = NULL;
  char *out = NULL;
  guint b, l;
  gboolean resnet = FALSE;

  for (guint i = 0; i < G_N_ELEMENTS (basic_layers); i++)
    if (g_str_equal (path, basic_layers[i].diffusers))
      return g_strdup (basic_layers[i].sgm);

  if (read_segment (&p, "down_blocks", &b))
    {
      if (g_str_equal (p, "downsamplers.0.conv"))
        return g_strdup_printf ("input_blocks_%u_0_op", (LAYERS_PER_BLOCK + 1) * b + LAYERS_PER_BLOCK + 1);
      resnet = read_segment (&p, "resnets", &l);
      if ((resnet || read_segment (&p, "attentions", &l)) && l < LAYERS_PER_BLOCK)
        block = g_strdup_printf ("input_blocks_%u_%u", (LAYERS_PER_BLOCK + 1) * b + l + 1, resnet ? 0 : 1);
    }
  else if (g_str_has_prefix (p, "mid_block."))
    {
      p += strlen ("mid_block.");
      resnet = read_segment (&p, "resnets", &l);
      if (resnet && l < 2)
        block = g_strdup_printf ("middle_block_%u", 2 * l);
      else if (!resnet && read_segment (&p, "attentions", &l) && l == 0)
        block = g_strdup ("middle_block_1");
    }
  else if (read_segment (&p, "up_blocks", &b))
    {
      if (g_str_equal (p, "upsamplers.0.conv"))
        return g_strdup_printf ("output_blocks_%u_2_conv", (LAYERS_PER_BLOCK + 1) * b + LAYERS_PER_BLOCK);
      resnet = read_segment (&p, "resnets", &l);
      if ((resnet || read_segment (&p, "attentions", &l)) && l <= LAYERS_PER_BLOCK)
        block = g_strdup_printf ("output_blocks_%u_%u", (LAYERS_PER_BLOCK + 1) * b + l, resnet ? 0 : 1);
    }
  if (block != NULL)
    out = inner_to_sgm (block, resnet, p);
  if (out == NULL)
    set_unknown (error, module, path);
  return out;
}
