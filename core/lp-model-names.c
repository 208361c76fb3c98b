/* lp-model-names.c: the names of original-format Stable Diffusion checkpoints
 *
 * One place for how the tensors of a Stable Diffusion checkpoint in its
 * original format (CompVis ldm for SD 1.x/2.x, Stability sgm for SDXL: the
 * single `.safetensors` files people download) are named in diffusers'
 * layout, which is what LoRAs name their modules by. The rules are those of
 * diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
 * convert_diffusers_to_original_sdxl.py, kohya sd-scripts'
 * library/model_util.py (convert_ldm_unet_checkpoint) and
 * sdxl_model_util.py (convert_sdxl_text_encoder_2_checkpoint), and ComfyUI's
 * comfy/utils.py unet_to_diffusers(); the block numbering is arithmetic, so
 * one table serves SD 1.x, 2.x and SDXL.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *from;
  const char *to;
} Rename;

/* UNet tensors outside the numbered blocks. */
static const Rename unet_top[] = {
  { "time_embed.0.", "time_embedding.linear_1." },
  { "time_embed.2.", "time_embedding.linear_2." },
  { "label_emb.0.0.", "add_embedding.linear_1." },   /* SDXL */
  { "label_emb.0.2.", "add_embedding.linear_2." },
  { "input_blocks.0.0.", "conv_in." },
  { "out.0.", "conv_norm_out." },
  { "out.2.", "conv_out." },
};

/* Inside a ResBlock. */
static const Rename resnet[] = {
  { "in_layers.0.", "norm1." },
  { "in_layers.2.", "conv1." },
  { "out_layers.0.", "norm2." },
  { "out_layers.3.", "conv2." },
  { "emb_layers.1.", "time_emb_proj." },
  { "skip_connection.", "conv_shortcut." },
};

/* Inside an OpenCLIP residual block (SD 2.x's and SDXL's second text
 * encoder) against transformers' CLIPEncoderLayer; `attn.in_proj_*` is q, k
 * and v stacked and is handled apart. */
static const Rename openclip_layer[] = {
  { "attn.out_proj.", "self_attn.out_proj." },
  { "ln_1.", "layer_norm1." },
  { "ln_2.", "layer_norm2." },
  { "mlp.c_fc.", "mlp.fc1." },
  { "mlp.c_proj.", "mlp.fc2." },
};

typedef struct {
  const char *prefix;         /* in the original checkpoint */
  const char *component;      /* diffusers' */
  const char *kohya;          /* kohya's LoRA prefix for it */
  gboolean openclip;          /* OpenCLIP names below the prefix */
} Component;

static const Component components[] = {
  { "model.diffusion_model.", "unet.", "lora_unet_", FALSE },
  { "cond_stage_model.transformer.", "text_encoder.", "lora_te_", FALSE },     /* SD 1.x: CLIP-L */
  { "cond_stage_model.model.", "text_encoder.", "lora_te_", TRUE },            /* SD 2.x: OpenCLIP-H */
  { "conditioner.embedders.0.transformer.", "text_encoder.", "lora_te1_", FALSE },  /* SDXL */
  { "conditioner.embedders.1.model.", "text_encoder_2.", "lora_te2_", TRUE },
};

static const char *
apply (const Rename *table,
       gsize         n,
       const char   *name,
       const char  **to)
{
  for (gsize i = 0; i < n; i++)
    if (g_str_has_prefix (name, table[i].from))
      {
        *to = table[i].to;
        return name + strlen (table[i].from);
      }
  return NULL;
}

/* "K.M.rest": the two block numbers. */
static const char *
block_numbers (const char *p,
               guint      *k,
               guint      *m)
{
  char *end;

  if (!g_ascii_isdigit (p[0]))
    return NULL;
  *k = strtoul (p, &end, 10);
  if (*end != '.' || !g_ascii_isdigit (end[1]) || *k > 1000)
    return NULL;
  *m = strtoul (end + 1, &end, 10);
  return *end == '.' ? end + 1 : NULL;
}

static char *
resnet_name (const char *block,
             const char *rest)
{
  const char *to;
  const char *tail = apply (resnet, G_N_ELEMENTS (resnet), rest, &to);

  return tail ? g_strconcat (block, to, tail, NULL) : NULL;
}

/* A UNet name below `model.diffusion_model.` in diffusers' layout. Down
 * block i holds input_blocks 3i+1 and 3i+2 (resnet .0, attention .1) and
 * its downsampler is input_blocks 3(i+1).0.op; up block i holds
 * output_blocks 3i..3i+2, and its upsampler comes after the resnet (.1) or
 * after the attention (.2): either way it is the `conv.` of the block. */
static char *
unet_name (const char *name)
{
  const char *to, *rest;
  g_autofree char *block = NULL;
  guint k, m;

  if ((rest = apply (unet_top, G_N_ELEMENTS (unet_top), name, &to)) != NULL)
    return g_strconcat (to, rest, NULL);

  if (g_str_has_prefix (name, "input_blocks.")
      && (rest = block_numbers (name + strlen ("input_blocks."), &k, &m)) != NULL && k > 0)
    {
      guint i = (k - 1) / 3, j = (k - 1) % 3;

      if (j == 2)
        return m == 0 && g_str_has_prefix (rest, "op.")
          ? g_strdup_printf ("down_blocks.%u.downsamplers.0.conv.%s", i, rest + 3) : NULL;
      block = g_strdup_printf ("down_blocks.%u.%s.%u.", i, m == 0 ? "resnets" : "attentions", j);
      if (m == 0)
        return resnet_name (block, rest);
      return m == 1 ? g_strconcat (block, rest, NULL) : NULL;
    }
  if (g_str_has_prefix (name, "middle_block.") && g_ascii_isdigit (name[13]) && name[14] == '.')
    {
      guint n = name[13] - '0';
      rest = name + 15;
      if (n == 1)
        return g_strconcat ("mid_block.attentions.0.", rest, NULL);
      block = g_strdup_printf ("mid_block.resnets.%u.", n / 2);
      return n == 0 || n == 2 ? resnet_name (block, rest) : NULL;
    }
  if (g_str_has_prefix (name, "output_blocks.")
      && (rest = block_numbers (name + strlen ("output_blocks."), &k, &m)) != NULL)
    {
      guint i = k / 3, j = k % 3;

      if (m == 0)
        {
          block = g_strdup_printf ("up_blocks.%u.resnets.%u.", i, j);
          return resnet_name (block, rest);
        }
      if ((m == 1 || m == 2) && j == 2 && g_str_has_prefix (rest, "conv."))
        return g_strdup_printf ("up_blocks.%u.upsamplers.0.%s", i, rest);
      if (m == 1)
        return g_strdup_printf ("up_blocks.%u.attentions.%u.%s", i, j, rest);
    }
  return NULL;
}

/* "segment.N." at @p: what follows it. */
static const char *
diffusers_index (const char *p,
                 const char *segment,
                 guint      *index)
{
  gsize n = strlen (segment);
  char *end;

  if (strncmp (p, segment, n) != 0 || p[n] != '.' || !g_ascii_isdigit (p[n + 1]))
    return NULL;
  *index = strtoul (p + n + 1, &end, 10);
  return *end == '.' && *index <= 1000 ? end + 1 : NULL;
}

static char *
resnet_from_diffusers (const char *block,
                       const char *rest)
{
  for (guint i = 0; i < G_N_ELEMENTS (resnet); i++)
    if (g_str_has_prefix (rest, resnet[i].to))
      return g_strconcat (block, resnet[i].from, rest + strlen (resnet[i].to), NULL);
  return NULL;
}

/* unet_name() backwards. Each down block has two layers and each up block
 * three; an up block's upsampler follows its last layer: the attention
 * (.2), or the resnet (.1) in SD 1.x's and 2.x's first up block, the one up
 * block there with an upsampler but no attention. */
static char *
unet_from_diffusers (const char *name,
                     gboolean    sdxl)
{
  const char *rest, *tail;
  g_autofree char *block = NULL;
  guint b, l;

  for (guint i = 0; i < G_N_ELEMENTS (unet_top); i++)
    if (g_str_has_prefix (name, unet_top[i].to))
      return g_strconcat (unet_top[i].from, name + strlen (unet_top[i].to), NULL);

  if ((rest = diffusers_index (name, "down_blocks", &b)) != NULL)
    {
      if (g_str_has_prefix (rest, "downsamplers.0.conv."))
        return g_strdup_printf ("input_blocks.%u.0.op.%s", 3 * b + 3, rest + strlen ("downsamplers.0.conv."));
      if ((tail = diffusers_index (rest, "resnets", &l)) != NULL && l < 2)
        {
          block = g_strdup_printf ("input_blocks.%u.0.", 3 * b + l + 1);
          return resnet_from_diffusers (block, tail);
        }
      if ((tail = diffusers_index (rest, "attentions", &l)) != NULL && l < 2)
        return g_strdup_printf ("input_blocks.%u.1.%s", 3 * b + l + 1, tail);
    }
  else if (g_str_has_prefix (name, "mid_block."))
    {
      rest = name + strlen ("mid_block.");
      if ((tail = diffusers_index (rest, "resnets", &l)) != NULL && l < 2)
        {
          block = g_strdup_printf ("middle_block.%u.", 2 * l);
          return resnet_from_diffusers (block, tail);
        }
      if ((tail = diffusers_index (rest, "attentions", &l)) != NULL && l == 0)
        return g_strconcat ("middle_block.1.", tail, NULL);
    }
  else if ((rest = diffusers_index (name, "up_blocks", &b)) != NULL)
    {
      if (g_str_has_prefix (rest, "upsamplers.0.conv."))
        return g_strdup_printf ("output_blocks.%u.%u.%s", 3 * b + 2, !sdxl && b == 0 ? 1 : 2,
                                rest + strlen ("upsamplers.0."));
      if ((tail = diffusers_index (rest, "resnets", &l)) != NULL && l < 3)
        {
          block = g_strdup_printf ("output_blocks.%u.0.", 3 * b + l);
          return resnet_from_diffusers (block, tail);
        }
      if ((tail = diffusers_index (rest, "attentions", &l)) != NULL && l < 3)
        return g_strdup_printf ("output_blocks.%u.1.%s", 3 * b + l, tail);
    }
  return NULL;
}

/**
 * lp_model_unet_name_to_diffusers:
 * @name: a UNet tensor name below `model.diffusion_model.`, as ldm (SD 1.x,
 *   2.x) and sgm (SDXL) name them: `input_blocks.4.1.proj_in.weight`
 *
 * The same tensor's name in diffusers' UNet: `down_blocks.1.attentions.0.proj_in.weight`.
 * What follows a block's or layer's prefix is kept: below an attention
 * block the names are diffusers' already, so the block's prefix alone,
 * `input_blocks.4.1.`, gives `down_blocks.1.attentions.0.`.
 *
 * Returns: (transfer full) (nullable): the name, or %NULL for no UNet name
 */
char *
lp_model_unet_name_to_diffusers (const char *name)
{
  g_return_val_if_fail (name != NULL, NULL);
  return unet_name (name);
}

/**
 * lp_model_unet_name_from_diffusers:
 * @name: a tensor name of diffusers' UNet (below `unet.`), such as
 *   `up_blocks.0.upsamplers.0.conv.weight`
 * @sdxl: whether the UNet is SDXL's; else SD 1.x's or 2.x's, whose first up
 *   block has no attention, so its upsampler is `output_blocks.2.1.conv`
 *   where SDXL's is `output_blocks.2.2.conv`
 *
 * The reverse of lp_model_unet_name_to_diffusers().
 *
 * Returns: (transfer full) (nullable): the ldm or sgm name, or %NULL for a
 *   name of no such UNet layer
 */
char *
lp_model_unet_name_from_diffusers (const char *name,
                                   gboolean    sdxl)
{
  g_return_val_if_fail (name != NULL, NULL);
  return unet_from_diffusers (name, sdxl);
}

/* An OpenCLIP text encoder name below `model.`; q, k, v for in_proj. */
static GStrv
openclip_names (const char *name)
{
  const char *rest, *to, *tail;
  guint layer;
  char *end;

  if (!g_str_has_prefix (name, "transformer.resblocks."))
    return NULL;
  rest = name + strlen ("transformer.resblocks.");
  if (!g_ascii_isdigit (rest[0]))
    return NULL;
  layer = strtoul (rest, &end, 10);
  if (*end != '.')
    return NULL;
  rest = end + 1;
  if (g_str_equal (rest, "attn.in_proj_weight") || g_str_equal (rest, "attn.in_proj_bias"))
    {
      const char *what = g_str_has_suffix (rest, "weight") ? "weight" : "bias";
      GStrv parts = g_new0 (char *, 4);
      static const char *const qkv[] = { "q", "k", "v" };

      for (guint p = 0; p < 3; p++)
        parts[p] = g_strdup_printf ("text_model.encoder.layers.%u.self_attn.%s_proj.%s", layer, qkv[p], what);
      return parts;
    }
  if ((tail = apply (openclip_layer, G_N_ELEMENTS (openclip_layer), rest, &to)) == NULL)
    return NULL;
  {
    GStrv parts = g_new0 (char *, 2);
    parts[0] = g_strdup_printf ("text_model.encoder.layers.%u.%s%s", layer, to, tail);
    return parts;
  }
}

/**
 * lp_model_name_to_diffusers:
 * @name: a tensor name of an original-format Stable Diffusion checkpoint,
 *   such as `model.diffusion_model.input_blocks.1.1.proj_in.weight` (SD 1.x
 *   and 2.x as CompVis ldm names them, SDXL as Stability's sgm does)
 * @kohya_prefix: (out) (optional) (transfer none): where to put the prefix
 *   kohya's LoRAs give the tensor's component (`lora_unet_`, `lora_te_`,
 *   `lora_te1_`, `lora_te2_`)
 *
 * The same tensor's name in diffusers' layout with its component, as a
 * LoRA names the module it adapts: `unet.down_blocks.0.attentions.0.proj_in.weight`,
 * `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight`. An
 * OpenCLIP text encoder's `attn.in_proj_weight` is q, k and v stacked by
 * rows in equal thirds, and gives the three names in that order.
 *
 * Returns: (transfer full) (nullable): the names, one per stacked part, or
 *   %NULL for a name of no known original layout
 */
GStrv
lp_model_name_to_diffusers (const char  *name,
                            const char **kohya_prefix)
{
  g_return_val_if_fail (name != NULL, NULL);

  for (guint c = 0; c < G_N_ELEMENTS (components); c++)
    {
      const Component *component = &components[c];
      g_auto(GStrv) parts = NULL;
      const char *rest;

      if (!g_str_has_prefix (name, component->prefix))
        continue;
      rest = name + strlen (component->prefix);
      if (component->openclip)
        parts = openclip_names (rest);
      else if (g_str_equal (component->component, "unet."))
        {
          char *unet = unet_name (rest);
          if (unet != NULL)
            {
              parts = g_new0 (char *, 2);
              parts[0] = unet;
            }
        }
      else if (g_str_has_prefix (rest, "text_model."))
        {
          parts = g_new0 (char *, 2);
          parts[0] = g_strdup (rest);
        }
      if (parts == NULL)
        return NULL;
      for (guint p = 0; parts[p]; p++)
        {
          char *full = g_strconcat (component->component, parts[p], NULL);
          g_free (parts[p]);
          parts[p] = full;
        }
      if (kohya_prefix != NULL)
        *kohya_prefix = component->kohya;
      return g_steal_pointer (&parts);
    }
  return NULL;
}
