/* lp-rename-presets.c: the one place for name mappings between LoRA conventions
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kohya sd-scripts names a module by its path in the model with every `.`
 * turned into `_` (`lora_unet_down_blocks_0_attentions_0_proj_in`), which
 * loses where the dots were, since path segments hold `_` themselves
 * (`down_blocks`, `to_q`). The way back is read off a table of the known
 * path segments (SD UNets, Flux, CLIP and llama text models), never
 * guessed: a name that has no reading, or more than one, is an error that
 * asks for `rules`.
 *
 * kohya's Flux LoRAs use the original (BFL) layer names, with fused
 * attention projections: `img_attn_qkv` holds diffusers' `to_q`, `to_k`,
 * `to_v`, and a single block's `linear1` holds `to_q`, `to_k`, `to_v` and
 * `proj_mlp` (widths 1:1:1:4 of the hidden size), as diffusers'
 * `_convert_kohya_flux_lora_to_diffusers` reads them.
 */
#include "lp-rename-presets.h"

#include <math.h>
#include <string.h>

/* Known module path segments */

typedef struct {
  const char *name;
  gboolean indexed;     /* followed by a number: `down_blocks.0` */
  const char *after;    /* the segment that must come before it, or NULL */
} Segment;

static const Segment segments[] = {
  /* SD 1.5 / SDXL UNet */
  { "down_blocks", TRUE, NULL },
  { "up_blocks", TRUE, NULL },
  { "mid_block", FALSE, NULL },
  { "attentions", TRUE, NULL },
  { "resnets", TRUE, NULL },
  { "downsamplers", TRUE, NULL },
  { "upsamplers", TRUE, NULL },
  { "transformer_blocks", TRUE, NULL },
  { "attn1", FALSE, NULL },
  { "attn2", FALSE, NULL },
  { "to_q", FALSE, NULL },
  { "to_k", FALSE, NULL },
  { "to_v", FALSE, NULL },
  { "to_out", TRUE, NULL },
  { "proj_in", FALSE, NULL },
  { "proj_out", FALSE, NULL },
  { "ff", FALSE, NULL },
  { "net", TRUE, NULL },
  /* `ff.net.0.proj`; anywhere else `proj_mlp` would also read `proj.mlp` */
  { "proj", FALSE, "net" },
  { "conv", FALSE, NULL },
  { "conv1", FALSE, NULL },
  { "conv2", FALSE, NULL },
  { "conv_shortcut", FALSE, NULL },
  { "conv_in", FALSE, NULL },
  { "conv_out", FALSE, NULL },
  { "time_emb_proj", FALSE, NULL },
  { "time_embedding", FALSE, NULL },
  { "add_embedding", FALSE, NULL },
  { "linear_1", FALSE, NULL },
  { "linear_2", FALSE, NULL },
  /* Flux (diffusers names) */
  { "single_transformer_blocks", TRUE, NULL },
  { "attn", FALSE, NULL },
  { "add_q_proj", FALSE, NULL },
  { "add_k_proj", FALSE, NULL },
  { "add_v_proj", FALSE, NULL },
  { "to_add_out", FALSE, NULL },
  { "ff_context", FALSE, NULL },
  { "norm1", FALSE, NULL },
  { "norm1_context", FALSE, NULL },
  { "norm", FALSE, NULL },
  { "linear", FALSE, NULL },
  { "proj_mlp", FALSE, NULL },
  { "x_embedder", FALSE, NULL },
  { "context_embedder", FALSE, NULL },
  { "time_text_embed", FALSE, NULL },
  { "timestep_embedder", FALSE, NULL },
  { "text_embedder", FALSE, NULL },
  { "guidance_embedder", FALSE, NULL },
  { "norm_out", FALSE, NULL },
  /* CLIP text encoders, llama */
  { "text_model", FALSE, NULL },
  { "encoder", FALSE, NULL },
  { "layers", TRUE, NULL },
  { "self_attn", FALSE, NULL },
  { "q_proj", FALSE, NULL },
  { "k_proj", FALSE, NULL },
  { "v_proj", FALSE, NULL },
  { "o_proj", FALSE, NULL },
  { "out_proj", FALSE, NULL },
  { "mlp", FALSE, NULL },
  { "fc1", FALSE, NULL },
  { "fc2", FALSE, NULL },
  { "gate_proj", FALSE, NULL },
  { "up_proj", FALSE, NULL },
  { "down_proj", FALSE, NULL },
  { "model", FALSE, NULL },
};

static gboolean
is_number (const char *token)
{
  if (*token == '\0')
    return FALSE;
  for (; *token; token++)
    if (!g_ascii_isdigit (*token))
      return FALSE;
  return TRUE;
}

/* How many tokens of @tokens from @pos the segment's name spans, or 0. */
static guint
segment_match (const Segment *segment,
               char         **tokens,
               guint          pos)
{
  const char *p = segment->name;
  guint n = 0;

  while (tokens[pos + n] != NULL)
    {
      gsize len = strlen (tokens[pos + n]);

      if (strncmp (p, tokens[pos + n], len) != 0)
        return 0;
      p += len;
      n++;
      if (*p == '\0')
        return n;
      if (*p != '_')
        return 0;
      p++;
    }
  return 0;
}

/* Counts the readings of tokens[pos..] (stopping at 2), after the segment
 * @prev (NULL at the start), writing the first found into @path. */
static guint
count_readings (char          **tokens,
                guint           pos,
                const Segment  *prev,
                gboolean        need_number,
                GPtrArray      *path,
                GPtrArray      *found,
                guint          *furthest)
{
  guint count = 0;

  *furthest = MAX (*furthest, pos);
  if (tokens[pos] == NULL)
    {
      if (need_number)
        return 0;
      if (found->len == 0)
        for (guint i = 0; i < path->len; i++)
          g_ptr_array_add (found, g_strdup (path->pdata[i]));
      return 1;
    }
  if (need_number)
    {
      if (!is_number (tokens[pos]))
        return 0;
      g_ptr_array_add (path, g_strdup (tokens[pos]));
      count = count_readings (tokens, pos + 1, prev, FALSE, path, found, furthest);
      g_ptr_array_set_size (path, path->len - 1);
      return count;
    }
  for (guint s = 0; s < G_N_ELEMENTS (segments) && count < 2; s++)
    {
      const Segment *segment = &segments[s];
      guint n = segment_match (segment, tokens, pos);

      if (n == 0)
        continue;
      if (segment->after != NULL && (prev == NULL || !g_str_equal (prev->name, segment->after)))
        continue;
      g_ptr_array_add (path, g_strdup (segment->name));
      count += count_readings (tokens, pos + n, segment, segment->indexed, path, found, furthest);
      g_ptr_array_set_size (path, path->len - 1);
    }
  return count;
}

char *
lp_rename_dot_path (const char  *underscored,
                    const char  *module,
                    GError     **error)
{
  g_auto(GStrv) tokens = g_strsplit (underscored, "_", -1);
  g_autoptr(GPtrArray) path = g_ptr_array_new_with_free_func (g_free);
  g_autoptr(GPtrArray) found = g_ptr_array_new_with_free_func (g_free);
  guint furthest = 0;
  guint count = count_readings (tokens, 0, NULL, FALSE, path, found, &furthest);

  if (count == 1)
    {
      g_ptr_array_add (found, NULL);
      return g_strjoinv (".", (char **) found->pdata);
    }
  if (count == 0)
    {
      g_autofree char *rest = tokens[furthest] != NULL
        ? g_strjoinv ("_", tokens + furthest) : g_strdup ("the end");

      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: cannot tell where the dots go in '%s': '%s' does not "
                   "start a known module path segment; rename it with 'rules'",
                   module, underscored, rest);
    }
  else
    g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                 "module %s: '%s' reads as more than one module path; rename it with 'rules'",
                 module, underscored);
  return NULL;
}

/* Flux: kohya (BFL) layer names against diffusers' */

typedef struct {
  const char *kohya;           /* below the block: `img_attn_qkv` */
  const char *diffusers[4];    /* below the block, the parts in fused order */
  guint widths[4];             /* each part's rows, in hidden sizes (= in features); 0: not fused */
  gboolean swap_halves;        /* the output's two halves in the other order (diffusers' swap_scale_shift) */
} FluxLayer;

static const FluxLayer flux_double[] = {
  { "img_attn_qkv", { "attn.to_q", "attn.to_k", "attn.to_v" }, { 1, 1, 1 } },
  { "img_attn_proj", { "attn.to_out.0" }, { 0 } },
  { "img_mlp_0", { "ff.net.0.proj" }, { 0 } },
  { "img_mlp_2", { "ff.net.2" }, { 0 } },
  { "img_mod_lin", { "norm1.linear" }, { 0 } },
  { "txt_attn_qkv", { "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj" }, { 1, 1, 1 } },
  { "txt_attn_proj", { "attn.to_add_out" }, { 0 } },
  { "txt_mlp_0", { "ff_context.net.0.proj" }, { 0 } },
  { "txt_mlp_2", { "ff_context.net.2" }, { 0 } },
  { "txt_mod_lin", { "norm1_context.linear" }, { 0 } },
};

static const FluxLayer flux_single[] = {
  { "linear1", { "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp" }, { 1, 1, 1, 4 } },
  { "linear2", { "proj_out" }, { 0 } },
  { "modulation_lin", { "norm.linear" }, { 0 } },
};

static const FluxLayer flux_global[] = {
  { "img_in", { "x_embedder" }, { 0 } },
  { "txt_in", { "context_embedder" }, { 0 } },
  { "final_layer_linear", { "proj_out" }, { 0 } },
  { "time_in_in_layer", { "time_text_embed.timestep_embedder.linear_1" }, { 0 } },
  { "time_in_out_layer", { "time_text_embed.timestep_embedder.linear_2" }, { 0 } },
  { "vector_in_in_layer", { "time_text_embed.text_embedder.linear_1" }, { 0 } },
  { "vector_in_out_layer", { "time_text_embed.text_embedder.linear_2" }, { 0 } },
  { "guidance_in_in_layer", { "time_text_embed.guidance_embedder.linear_1" }, { 0 } },
  { "guidance_in_out_layer", { "time_text_embed.guidance_embedder.linear_2" }, { 0 } },
  /* (shift, scale) in BFL's layer, (scale, shift) in diffusers' */
  { "final_layer_adaLN_modulation_1", { "norm_out.linear" }, { 0 }, TRUE },
};

typedef struct {
  const char *kohya_block;      /* `double_blocks_` */
  const char *diffusers_block;  /* `transformer_blocks.` */
  const FluxLayer *layers;
  guint n_layers;
} FluxGroup;

static const FluxGroup flux_groups[] = {
  { "double_blocks_", "transformer_blocks.", flux_double, G_N_ELEMENTS (flux_double) },
  { "single_blocks_", "single_transformer_blocks.", flux_single, G_N_ELEMENTS (flux_single) },
  { NULL, NULL, flux_global, G_N_ELEMENTS (flux_global) },
};

static guint
n_parts_of (const FluxLayer *layer)
{
  guint n = 0;

  while (n < G_N_ELEMENTS (layer->diffusers) && layer->diffusers[n] != NULL)
    n++;
  return n;
}

/* Prefixes of the text encoders and the UNet or transformer. */
typedef struct {
  const char *kohya;
  const char *diffusers;
} Prefix;

static const Prefix sd_prefixes[] = {
  { "lora_unet_", "unet." },
  { "lora_te_", "text_encoder." },
  { "lora_te1_", "text_encoder." },
  { "lora_te2_", "text_encoder_2." },
};

/* Plans */

void
lp_rename_target_free (LpRenameTarget *target)
{
  g_free (target->name);
  g_free (target->parts);
  g_free (target->part_rows);
  g_free (target->keep);
  g_free (target);
}

static LpRenameTarget *
target_new (const char       *name,
            LpLoraConvention  convention,
            LpLoraModule     *module)
{
  LpRenameTarget *target = g_new0 (LpRenameTarget, 1);

  target->name = g_strdup (name);
  target->convention = convention;
  target->n_parts = 1;
  target->parts = g_new0 (LpLoraModule *, 1);
  target->parts[0] = module;
  target->part_rows = g_new0 (guint64, 1);
  target->part_rows[0] = lp_lora_module_get_out_features (module);
  return target;
}

const char *
lp_rename_convention_name (LpLoraConvention convention)
{
  switch (convention)
    {
    case LP_LORA_CONVENTION_PEFT: return "PEFT";
    case LP_LORA_CONVENTION_DIFFUSERS: return "diffusers";
    case LP_LORA_CONVENTION_DIFFUSERS_OLD: return "diffusers (old)";
    case LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR: return "diffusers (attention processor)";
    case LP_LORA_CONVENTION_KOHYA: return "kohya";
    case LP_LORA_CONVENTION_CLONEOFSIMO: return "cloneofsimo";
    case LP_LORA_CONVENTION_CUSTOM:
    default: return "custom";
    }
}

static gboolean
expect_convention (LpLoraModule    *module,
                   LpRenamePreset   preset,
                   gboolean         diffusers,
                   GError         **error)
{
  LpLoraConvention convention = lp_lora_module_get_convention (module);
  gboolean ok;
  g_autoptr(GEnumClass) klass = g_type_class_ref (LP_TYPE_RENAME_PRESET);

  if (preset == LP_RENAME_PRESET_PEFT_TO_KOHYA)
    ok = convention == LP_LORA_CONVENTION_PEFT;
  else if (diffusers)
    ok = convention == LP_LORA_CONVENTION_DIFFUSERS || convention == LP_LORA_CONVENTION_DIFFUSERS_OLD;
  else
    ok = convention == LP_LORA_CONVENTION_KOHYA;
  if (!ok)
    g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                 "module %s: preset %s does not apply to a %s module",
                 lp_lora_module_get_name (module),
                 g_enum_get_value (klass, preset)->value_nick, lp_rename_convention_name (convention));
  return ok;
}

static const Prefix *
match_prefix (const char *name,
              gboolean    from_kohya)
{
  for (guint i = 0; i < G_N_ELEMENTS (sd_prefixes); i++)
    {
      const char *prefix = from_kohya ? sd_prefixes[i].kohya : sd_prefixes[i].diffusers;

      if (g_str_has_prefix (name, prefix))
        return &sd_prefixes[i];
    }
  return NULL;
}

static void
set_unknown_prefix (GError     **error,
                    const char  *name,
                    gboolean     from_kohya)
{
  GString *known = g_string_new (NULL);

  for (guint i = 0; i < G_N_ELEMENTS (sd_prefixes); i++)
    g_string_append_printf (known, "%s'%s'", i ? ", " : "",
                            from_kohya ? sd_prefixes[i].kohya : sd_prefixes[i].diffusers);
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
               "module %s: the name starts with none of %s; rename it with 'rules'",
               name, known->str);
  g_string_free (known, TRUE);
}

/* lora_unet_X / lora_te*_X -> unet.X / text_encoder*.X */
static char *
kohya_to_diffusers_name (const char  *name,
                         GError     **error)
{
  const Prefix *prefix = match_prefix (name, TRUE);
  g_autofree char *path = NULL;

  if (prefix == NULL)
    {
      set_unknown_prefix (error, name, TRUE);
      return NULL;
    }
  /* kohya SDXL: the sgm UNet's names */
  if (g_str_equal (prefix->kohya, "lora_unet_") && lp_rename_sgm_is_sgm (name + strlen (prefix->kohya)))
    path = lp_rename_sgm_to_diffusers (name + strlen (prefix->kohya), name, error);
  else
    path = lp_rename_dot_path (name + strlen (prefix->kohya), name, error);
  if (path == NULL)
    return NULL;
  return g_strconcat (prefix->diffusers, path, NULL);
}

/* unet.X -> lora_unet_X; text_encoder.X -> lora_te_X, or lora_te1_X when a
 * second text encoder (SDXL) is there too. */
static char *
diffusers_to_kohya_name (const char  *name,
                         gboolean     sdxl,
                         gboolean     sgm,
                         GError     **error)
{
  const char *kohya_prefix;
  const Prefix *prefix = match_prefix (name, FALSE);
  char *out;

  if (prefix == NULL)
    {
      set_unknown_prefix (error, name, FALSE);
      return NULL;
    }
  kohya_prefix = prefix->kohya;
  if (sgm && g_str_equal (prefix->diffusers, "unet."))
    {
      g_autofree char *path = lp_rename_diffusers_to_sgm (name + strlen (prefix->diffusers), name, error);
      return path ? g_strconcat (kohya_prefix, path, NULL) : NULL;
    }
  if (g_str_equal (prefix->diffusers, "text_encoder."))
    kohya_prefix = sdxl ? "lora_te1_" : "lora_te_";
  out = g_strconcat (kohya_prefix, name + strlen (prefix->diffusers), NULL);
  g_strdelimit (out + strlen (kohya_prefix), ".", '_');
  return out;
}

static gboolean
has_sdxl_text_encoder (GPtrArray *modules)
{
  for (guint i = 0; i < modules->len; i++)
    if (g_str_has_prefix (lp_lora_module_get_name (modules->pdata[i]), "text_encoder_2."))
      return TRUE;
  return FALSE;
}

static gboolean
plan_sd (LpRenamePreset   preset,
         GPtrArray       *modules,
         GPtrArray       *plan,
         GError         **error)
{
  gboolean to_diffusers = preset == LP_RENAME_PRESET_SD_KOHYA_TO_DIFFUSERS;
  gboolean sgm = preset == LP_RENAME_PRESET_SDXL_DIFFUSERS_TO_KOHYA;
  gboolean sdxl = sgm || has_sdxl_text_encoder (modules);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (module);
      g_autofree char *target = NULL;

      if (!expect_convention (module, preset, !to_diffusers, error))
        return FALSE;
      target = to_diffusers ? kohya_to_diffusers_name (name, error)
                            : diffusers_to_kohya_name (name, sdxl, sgm, error);
      if (target == NULL)
        return FALSE;
      g_ptr_array_add (plan, target_new (target, to_diffusers ? LP_LORA_CONVENTION_DIFFUSERS
                                                              : LP_LORA_CONVENTION_KOHYA, module));
    }
  return TRUE;
}

/* Splits `lora_unet_double_blocks_3_img_attn_qkv` into its group, block and
 * layer; FALSE when the name is no Flux layer. */
static gboolean
flux_kohya_lookup (const char       *rest,
                   const FluxGroup **group_out,
                   guint            *block_out,
                   const FluxLayer **layer_out)
{
  for (guint g = 0; g < G_N_ELEMENTS (flux_groups); g++)
    {
      const FluxGroup *group = &flux_groups[g];
      const char *leaf = rest;
      guint64 block = 0;

      if (group->kohya_block != NULL)
        {
          char *end = NULL;

          if (!g_str_has_prefix (rest, group->kohya_block))
            continue;
          leaf = rest + strlen (group->kohya_block);
          if (!g_ascii_isdigit (*leaf))
            continue;
          block = g_ascii_strtoull (leaf, &end, 10);
          if (*end != '_' || block > G_MAXUINT)
            continue;
          leaf = end + 1;
        }
      for (guint l = 0; l < group->n_layers; l++)
        if (g_str_equal (leaf, group->layers[l].kohya))
          {
            *group_out = group;
            *block_out = block;
            *layer_out = &group->layers[l];
            return TRUE;
          }
    }
  return FALSE;
}

/* A layer whose output halves change order needs an even output. */
static gboolean
set_swap_halves (LpRenameTarget   *target,
                 const FluxLayer  *layer,
                 LpLoraModule     *module,
                 GError          **error)
{
  if (!layer->swap_halves)
    return TRUE;
  if (lp_lora_module_get_out_features (module) % 2 != 0 || lp_lora_module_is_conv (module))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: its output is a shift and a scale of equal widths, "
                   "but it has %" G_GUINT64_FORMAT " output features",
                   lp_lora_module_get_name (module), lp_lora_module_get_out_features (module));
      return FALSE;
    }
  target->swap_halves = TRUE;
  return TRUE;
}

/* The ranks each part of a fused module uses: the columns of the up factor
 * that are not zero in the part's rows. A part's update is exactly its rows
 * of the up factor on those columns times those rows of the down factor;
 * kohya's split_qkv (networks/lora_flux.py) saves q, k and v that way, each
 * in its own block, and a dense up factor keeps every rank for every part.
 * A part that is zero keeps one rank (of zeros). */
static gboolean
find_part_ranks (LpLoraModule    *module,
                 LpRenameTarget **parts,
                 guint            n_parts,
                 GError         **error)
{
  LpTensor *up = lp_lora_module_get_up (module);
  guint rank = lp_lora_module_get_rank (module);
  g_autofree double *values = lp_tensor_dup_f64 (up, NULL, error);

  if (values == NULL)
    {
      g_prefix_error (error, "module %s: ", lp_lora_module_get_name (module));
      return FALSE;
    }
  for (guint p = 0; p < n_parts; p++)
    {
      LpRenameTarget *part = parts[p];
      g_autofree guint *keep = g_new (guint, rank);
      guint n_keep = 0;

      for (guint j = 0; j < rank; j++)
        {
          gboolean used = FALSE;

          for (guint64 i = part->row_start; i < part->row_start + part->n_rows && !used; i++)
            used = values[i * rank + j] != 0.0;
          if (used)
            keep[n_keep++] = j;
        }
      if (n_keep == 0)
        keep[n_keep++] = 0;
      if (n_keep < rank)
        {
          part->keep = g_steal_pointer (&keep);
          part->n_keep = n_keep;
        }
    }
  return TRUE;
}

static gboolean
plan_flux_kohya_to_diffusers (GPtrArray  *modules,
                              GPtrArray  *plan,
                              GError    **error)
{
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (module);
      const FluxGroup *group;
      const FluxLayer *layer;
      guint block, n_parts, first_part;
      guint64 in, out, total = 0, row = 0;
      g_autofree char *prefix = NULL;

      if (!expect_convention (module, LP_RENAME_PRESET_FLUX_KOHYA_TO_DIFFUSERS, FALSE, error))
        return FALSE;

      if (g_str_has_prefix (name, "lora_te"))
        {
          /* the CLIP text encoder keeps SD's names */
          g_autofree char *target = kohya_to_diffusers_name (name, error);
          if (target == NULL)
            return FALSE;
          g_ptr_array_add (plan, target_new (target, LP_LORA_CONVENTION_DIFFUSERS, module));
          continue;
        }
      if (!g_str_has_prefix (name, "lora_unet_")
          || !flux_kohya_lookup (name + strlen ("lora_unet_"), &group, &block, &layer))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: not a Flux layer kohya names "
                       "(lora_unet_double_blocks_N_..., lora_unet_single_blocks_N_...); "
                       "rename it with 'rules' or drop it with select", name);
          return FALSE;
        }

      prefix = group->diffusers_block
        ? g_strdup_printf ("transformer.%s%u.", group->diffusers_block, block)
        : g_strdup ("transformer.");
      n_parts = n_parts_of (layer);
      if (n_parts == 1)
        {
          g_autofree char *target = g_strconcat (prefix, layer->diffusers[0], NULL);
          LpRenameTarget *t = target_new (target, LP_LORA_CONVENTION_DIFFUSERS, module);

          g_ptr_array_add (plan, t);
          if (!set_swap_halves (t, layer, module, error))
            return FALSE;
          continue;
        }

      /* a fused module: each part takes its rows of the up factor and the
       * whole down factor, which is exact at the same rank */
      in = lp_lora_module_get_in_features (module);
      out = lp_lora_module_get_out_features (module);
      for (guint p = 0; p < n_parts; p++)
        total += layer->widths[p] * in;
      if (total != out || lp_lora_module_is_conv (module))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: a fused %s must have %" G_GUINT64_FORMAT " output features "
                       "for %" G_GUINT64_FORMAT " input features, but it has %" G_GUINT64_FORMAT,
                       name, layer->kohya, total, in, out);
          return FALSE;
        }
      first_part = plan->len;
      for (guint p = 0; p < n_parts; p++)
        {
          g_autofree char *target = g_strconcat (prefix, layer->diffusers[p], NULL);
          LpRenameTarget *t = target_new (target, LP_LORA_CONVENTION_DIFFUSERS, module);

          t->split = TRUE;
          t->row_start = row;
          t->n_rows = layer->widths[p] * in;
          t->part_rows[0] = t->n_rows;
          row += t->n_rows;
          g_ptr_array_add (plan, t);
        }
      if (!find_part_ranks (module, (LpRenameTarget **) plan->pdata + first_part, n_parts, error))
        return FALSE;
    }
  return TRUE;
}

static gboolean
plan_flux_diffusers_to_kohya (GPtrArray  *modules,
                              GPtrArray  *plan,
                              GError    **error)
{
  /* kohya name -> its target, which fused parts join */
  g_autoptr(GHashTable) fused = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  gboolean sdxl = has_sdxl_text_encoder (modules);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (module);
      const char *rest;
      gboolean found = FALSE;

      if (!expect_convention (module, LP_RENAME_PRESET_FLUX_DIFFUSERS_TO_KOHYA, TRUE, error))
        return FALSE;

      if (g_str_has_prefix (name, "text_encoder"))
        {
          g_autofree char *target = diffusers_to_kohya_name (name, sdxl, FALSE, error);
          if (target == NULL)
            return FALSE;
          /* kohya's Flux trainer calls CLIP-L te1 */
          if (g_str_has_prefix (target, "lora_te_"))
            {
              char *te1 = g_strconcat ("lora_te1_", target + strlen ("lora_te_"), NULL);
              g_free (target);
              target = te1;
            }
          g_ptr_array_add (plan, target_new (target, LP_LORA_CONVENTION_KOHYA, module));
          continue;
        }

      rest = g_str_has_prefix (name, "transformer.") ? name + strlen ("transformer.") : NULL;
      for (guint g = 0; rest != NULL && g < G_N_ELEMENTS (flux_groups) && !found; g++)
        {
          const FluxGroup *group = &flux_groups[g];
          const char *leaf = rest;
          guint64 block = 0;

          if (group->diffusers_block != NULL)
            {
              char *end = NULL;

              if (!g_str_has_prefix (rest, group->diffusers_block))
                continue;
              leaf = rest + strlen (group->diffusers_block);
              if (!g_ascii_isdigit (*leaf))
                continue;
              block = g_ascii_strtoull (leaf, &end, 10);
              if (*end != '.')
                continue;
              leaf = end + 1;
            }
          for (guint l = 0; l < group->n_layers && !found; l++)
            {
              const FluxLayer *layer = &group->layers[l];
              guint n_parts = n_parts_of (layer);

              for (guint p = 0; p < n_parts && !found; p++)
                {
                  g_autofree char *target_name = NULL;
                  LpRenameTarget *target;

                  if (!g_str_equal (leaf, layer->diffusers[p]))
                    continue;
                  found = TRUE;
                  target_name = group->kohya_block
                    ? g_strdup_printf ("lora_unet_%s%" G_GUINT64_FORMAT "_%s",
                                       group->kohya_block, block, layer->kohya)
                    : g_strconcat ("lora_unet_", layer->kohya, NULL);
                  if (n_parts == 1)
                    {
                      target = target_new (target_name, LP_LORA_CONVENTION_KOHYA, module);
                      g_ptr_array_add (plan, target);
                      if (!set_swap_halves (target, layer, module, error))
                        return FALSE;
                      break;
                    }
                  target = g_hash_table_lookup (fused, target_name);
                  if (target == NULL)
                    {
                      target = g_new0 (LpRenameTarget, 1);
                      target->name = g_strdup (target_name);
                      target->convention = LP_LORA_CONVENTION_KOHYA;
                      target->n_parts = n_parts;
                      target->parts = g_new0 (LpLoraModule *, n_parts);
                      target->part_rows = g_new0 (guint64, n_parts);
                      for (guint q = 0; q < n_parts; q++)
                        target->part_rows[q] = layer->widths[q];   /* in hidden sizes, for now */
                      g_hash_table_insert (fused, g_strdup (target_name), target);
                      g_ptr_array_add (plan, target);
                    }
                  target->parts[p] = module;
                }
            }
        }
      if (!found)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: not a Flux layer the kohya format names; "
                       "rename it with 'rules' or drop it with select", name);
          return FALSE;
        }
    }

  /* The fused modules' part widths, from the parts that are there. */
  for (guint t = 0; t < plan->len; t++)
    {
      LpRenameTarget *target = g_ptr_array_index (plan, t);
      guint64 in = 0;

      if (target->n_parts == 1)
        continue;
      for (guint p = 0; p < target->n_parts; p++)
        {
          LpLoraModule *part = target->parts[p];

          if (part == NULL)
            continue;
          if (in != 0 && lp_lora_module_get_in_features (part) != in)
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: the parts fused into %s have different input features",
                           lp_lora_module_get_name (part), target->name);
              return FALSE;
            }
          in = lp_lora_module_get_in_features (part);
        }
      for (guint p = 0; p < target->n_parts; p++)
        {
          LpLoraModule *part = target->parts[p];

          target->part_rows[p] *= in;
          if (part != NULL && (lp_lora_module_is_conv (part)
                               || lp_lora_module_get_out_features (part) != target->part_rows[p]))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: has %" G_GUINT64_FORMAT " output features; fused into %s "
                           "it must have %" G_GUINT64_FORMAT,
                           lp_lora_module_get_name (part),
                           lp_lora_module_get_out_features (part), target->name,
                           target->part_rows[p]);
              return FALSE;
            }
        }
    }
  return TRUE;
}

static gboolean
plan_peft (LpRenamePreset   preset,
           GPtrArray       *modules,
           GPtrArray       *plan,
           GError         **error)
{
  gboolean to_kohya = preset == LP_RENAME_PRESET_PEFT_TO_KOHYA;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (module);
      g_autofree char *target = NULL;

      if (!expect_convention (module, preset, FALSE, error))
        return FALSE;
      if (to_kohya)
        {
          target = g_strconcat ("lora_unet_", lp_lora_module_get_peft_key (module), NULL);
          g_strdelimit (target, ".", '_');
        }
      else
        {
          g_autofree char *path = NULL;

          /* Which model a lora_te_ module belongs to is not in the file. */
          if (!g_str_has_prefix (name, "lora_unet_"))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: kohya-to-peft converts lora_unet_ modules only; "
                           "drop the others with select or rename them with 'rules'", name);
              return FALSE;
            }
          path = lp_rename_dot_path (name + strlen ("lora_unet_"), name, error);
          if (path == NULL)
            return FALSE;
          target = g_strconcat ("base_model.model.", path, NULL);
        }
      g_ptr_array_add (plan, target_new (target, to_kohya ? LP_LORA_CONVENTION_KOHYA
                                                          : LP_LORA_CONVENTION_PEFT, module));
    }
  return TRUE;
}

/* The presets: what each converts, from which conventions to which, for
 * which model, and the function that plans it. */
typedef gboolean (*PlanFunc) (LpRenamePreset   preset,
                              GPtrArray       *modules,
                              GPtrArray       *plan,
                              GError         **error);

static gboolean
plan_flux_to_diffusers (LpRenamePreset preset, GPtrArray *modules, GPtrArray *plan, GError **error)
{
  return plan_flux_kohya_to_diffusers (modules, plan, error);
}

static gboolean
plan_flux_to_kohya (LpRenamePreset preset, GPtrArray *modules, GPtrArray *plan, GError **error)
{
  return plan_flux_diffusers_to_kohya (modules, plan, error);
}

typedef enum { MODEL_ANY, MODEL_SD, MODEL_SDXL, MODEL_FLUX } Model;

typedef struct {
  LpRenamePreset preset;
  LpLoraConvention from;
  gboolean from_diffusers;    /* also the older diffusers conventions */
  LpLoraConvention to;
  Model model;
  PlanFunc plan;
} PresetInfo;

static const PresetInfo preset_table[] = {
  { LP_RENAME_PRESET_SD_KOHYA_TO_DIFFUSERS, LP_LORA_CONVENTION_KOHYA, FALSE,
    LP_LORA_CONVENTION_DIFFUSERS, MODEL_SD, plan_sd },
  { LP_RENAME_PRESET_FLUX_KOHYA_TO_DIFFUSERS, LP_LORA_CONVENTION_KOHYA, FALSE,
    LP_LORA_CONVENTION_DIFFUSERS, MODEL_FLUX, plan_flux_to_diffusers },
  { LP_RENAME_PRESET_SD_DIFFUSERS_TO_KOHYA, LP_LORA_CONVENTION_DIFFUSERS, TRUE,
    LP_LORA_CONVENTION_KOHYA, MODEL_SD, plan_sd },
  { LP_RENAME_PRESET_SDXL_DIFFUSERS_TO_KOHYA, LP_LORA_CONVENTION_DIFFUSERS, TRUE,
    LP_LORA_CONVENTION_KOHYA, MODEL_SDXL, plan_sd },
  { LP_RENAME_PRESET_FLUX_DIFFUSERS_TO_KOHYA, LP_LORA_CONVENTION_DIFFUSERS, TRUE,
    LP_LORA_CONVENTION_KOHYA, MODEL_FLUX, plan_flux_to_kohya },
  { LP_RENAME_PRESET_PEFT_TO_KOHYA, LP_LORA_CONVENTION_PEFT, FALSE,
    LP_LORA_CONVENTION_KOHYA, MODEL_ANY, plan_peft },
  { LP_RENAME_PRESET_KOHYA_TO_PEFT, LP_LORA_CONVENTION_KOHYA, FALSE,
    LP_LORA_CONVENTION_PEFT, MODEL_ANY, plan_peft },
};

static const PresetInfo *
preset_info (LpRenamePreset preset)
{
  for (guint i = 0; i < G_N_ELEMENTS (preset_table); i++)
    if (preset_table[i].preset == preset)
      return &preset_table[i];
  return NULL;
}

static gboolean
converts (const PresetInfo  *info,
          LpLoraConvention   from,
          LpLoraConvention   to)
{
  gboolean any_diffusers = from == LP_LORA_CONVENTION_DIFFUSERS || from == LP_LORA_CONVENTION_DIFFUSERS_OLD
                           || from == LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR;

  return info->to == to && (info->from == from || (info->from_diffusers && any_diffusers));
}

const char *
lp_rename_preset_nick (LpRenamePreset preset)
{
  g_autoptr(GEnumClass) klass = g_type_class_ref (LP_TYPE_RENAME_PRESET);
  GEnumValue *value = g_enum_get_value (klass, preset);

  return value ? value->value_nick : "none";
}

/**
 * lp_rename_preset_plan:
 * @preset: the conversion
 * @modules: (element-type LpLoraModule): the input's modules
 * @error: return location for a #GError
 *
 * Plans the output modules of a conversion, in the input's order (a fused
 * module where its first part was).
 *
 * Returns: (transfer full) (element-type LpRenameTarget): the plan, or %NULL
 */
GPtrArray *
lp_rename_preset_plan (LpRenamePreset   preset,
                       GPtrArray       *modules,
                       GError         **error)
{
  g_autoptr(GPtrArray) plan = g_ptr_array_new_with_free_func ((GDestroyNotify) lp_rename_target_free);

  const PresetInfo *info = preset_info (preset);
  gboolean ok = info == NULL || info->plan (preset, modules, plan, error);

  return ok ? g_steal_pointer (&plan) : NULL;
}

const char *
lp_rename_presets_between (LpLoraConvention from,
                           LpLoraConvention to)
{
  static GHashTable *texts;   /* (from << 8 | to) -> the presets, made once */
  static GMutex lock;
  gpointer key = GUINT_TO_POINTER (((guint) from << 8) | (guint) to);
  const char *text;

  g_mutex_lock (&lock);
  if (texts == NULL)
    texts = g_hash_table_new_full (NULL, NULL, NULL, g_free);
  text = g_hash_table_lookup (texts, key);
  if (text == NULL)
    {
      GString *names = g_string_new (NULL);

      for (guint i = 0; i < G_N_ELEMENTS (preset_table); i++)
        if (converts (&preset_table[i], from, to))
          g_string_append_printf (names, "%s%s", names->len ? " or " : "",
                                  lp_rename_preset_nick (preset_table[i].preset));
      text = names->len ? names->str : NULL;
      g_string_free (names, names->len == 0);
      if (text != NULL)
        g_hash_table_insert (texts, key, (gpointer) text);
    }
  g_mutex_unlock (&lock);
  return text;
}

/* What model @modules' names are of (the first module that tells). */
static Model
model_of (GPtrArray *modules,
          gboolean  *sgm,
          gboolean  *sdxl)
{
  Model model = MODEL_SD;

  *sgm = *sdxl = FALSE;
  for (guint i = 0; i < (modules ? modules->len : 0); i++)
    {
      const char *name = lp_lora_module_get_name (g_ptr_array_index (modules, i));

      if (g_str_has_prefix (name, "lora_unet_double_blocks_") || g_str_has_prefix (name, "lora_unet_single_blocks_")
          || g_str_has_prefix (name, "transformer."))
        model = MODEL_FLUX;
      if (g_str_has_prefix (name, "lora_unet_") && lp_rename_sgm_is_sgm (name + strlen ("lora_unet_")))
        *sgm = TRUE;
      if (g_str_has_prefix (name, "text_encoder_2.") || g_str_has_prefix (name, "lora_te2_")
          || strstr (name, "add_embedding") != NULL)
        *sdxl = TRUE;
    }
  return model;
}

gboolean
lp_rename_preset_choose (GPtrArray         *modules,
                         GPtrArray         *others,
                         LpLoraConvention   to,
                         LpRenamePreset    *preset,
                         GError           **error)
{
  LpLoraConvention from = lp_lora_module_get_convention (g_ptr_array_index (modules, 0));
  gboolean sgm, sdxl, others_sgm, others_sdxl;
  Model model = model_of (modules, &sgm, &sdxl);
  Model want;

  model_of (others, &others_sgm, &others_sdxl);
  want = model == MODEL_FLUX ? MODEL_FLUX
         : to == LP_LORA_CONVENTION_KOHYA && (others_sgm || ((others == NULL || others->len == 0) && sdxl))
         ? MODEL_SDXL : MODEL_SD;
  for (guint pass = 0; pass < 2; pass++)
    for (guint i = 0; i < G_N_ELEMENTS (preset_table); i++)
      if (converts (&preset_table[i], from, to)
          && (preset_table[i].model == (pass == 0 ? want : MODEL_ANY)))
        {
          *preset = preset_table[i].preset;
          return TRUE;
        }
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
               "no rename preset converts %s modules (%s) to %s",
               lp_rename_convention_name (from),
               lp_lora_module_get_name (g_ptr_array_index (modules, 0)),
               lp_rename_convention_name (to));
  return FALSE;
}
