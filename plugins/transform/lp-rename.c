/* lp-rename.c: the `rename` stage, regex rules and conversions between LoRA conventions
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-rename-presets.h"
#include "lp-transform-common.h"

#include <math.h>
#include <string.h>

/**
 * LpRename:
 *
 * Renames tensors, in two steps:
 *
 * 1. #LpRename:preset converts a LoRA between the key conventions of
 *    FORMATS.md (see #LpRenamePreset and lp-rename-presets.c for the name
 *    tables). The scale moves to where the target keeps it, with every
 *    module's update `scale · B @ A` unchanged: to a kohya `.alpha` tensor
 *    (`scale · rank`), to a generated `adapter_config.json` for PEFT, or into
 *    the factors for diffusers, which has no alpha (a power of two into the
 *    up factor, the rest into the down one, so a scale of 1 or 2^n is
 *    exact). Flux's fused kohya modules are split (each part gets its rows
 *    of the up factor and the ranks they use: all of them for a dense up
 *    factor, its own block for a file trained with split qkv; exact) or
 *    fused (downs stacked, ups block-diagonal: exact, the ranks add up, so
 *    a following lora-svd can bring the rank back). Flux's final
 *    `adaLN_modulation.1` and diffusers' `norm_out.linear` give shift and
 *    scale in the other order: the up factor's halves change places.
 *    Tensors that belong to no module pass through with their names.
 * 2. #LpRename:rules, a list of `pattern=replacement` (GRegex syntax, `\1`
 *    for groups; write `\=` for a `=` in the pattern), rewrite every
 *    tensor's name, each rule in order on the result of the one before.
 *
 * Two tensors that would get the same name are an error naming both.
 */

struct _LpRename
{
  LpTransform parent_instance;

  GStrv rules;
  LpRenamePreset preset;
  GPtrArray *regexes;       /* GRegex *, compiled in prepare */
  GPtrArray *replacements;  /* char * */
};

enum {
  PROP_0,
  PROP_RULES,
  PROP_PRESET,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpRename, lp_rename, LP_TYPE_TRANSFORM)

G_DEFINE_ENUM_TYPE (LpRenamePreset, lp_rename_preset,
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_NONE, "none"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_FLUX_KOHYA_TO_DIFFUSERS, "flux-kohya-to-diffusers"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_FLUX_DIFFUSERS_TO_KOHYA, "flux-diffusers-to-kohya"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_SD_KOHYA_TO_DIFFUSERS, "sd-kohya-to-diffusers"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_SD_DIFFUSERS_TO_KOHYA, "sd-diffusers-to-kohya"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_PEFT_TO_KOHYA, "peft-to-kohya"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_KOHYA_TO_PEFT, "kohya-to-peft"),
  G_DEFINE_ENUM_VALUE (LP_RENAME_PRESET_SDXL_DIFFUSERS_TO_KOHYA, "sdxl-diffusers-to-kohya"))

static gboolean
lp_rename_prepare (LpStage  *stage,
                   GError  **error)
{
  LpRename *self = LP_RENAME (stage);
  guint n_rules = self->rules ? g_strv_length (self->rules) : 0;

  g_clear_pointer (&self->regexes, g_ptr_array_unref);
  g_clear_pointer (&self->replacements, g_ptr_array_unref);

  if (n_rules == 0 && self->preset == LP_RENAME_PRESET_NONE)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "set 'rules' or 'preset': with neither the stage renames nothing");
      return FALSE;
    }

  self->regexes = g_ptr_array_new_with_free_func ((GDestroyNotify) g_regex_unref);
  self->replacements = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < n_rules; i++)
    {
      const char *rule = self->rules[i];
      const char *eq = rule;
      g_autofree char *pattern = NULL;
      g_autoptr(GError) local = NULL;
      GRegex *regex;

      /* the first '=' not escaped with a backslash ends the pattern */
      while ((eq = strchr (eq, '=')) != NULL && eq > rule && eq[-1] == '\\')
        eq++;
      if (eq == NULL || eq == rule)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "rule %u '%s': write it pattern=replacement", i + 1, rule);
          return FALSE;
        }
      pattern = g_strndup (rule, eq - rule);
      regex = g_regex_new (pattern, G_REGEX_OPTIMIZE, 0, &local);
      if (regex == NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "rule %u '%s': %s", i + 1, rule, local->message);
          return FALSE;
        }
      g_ptr_array_add (self->regexes, regex);
      if (!g_regex_check_replacement (eq + 1, NULL, &local))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "rule %u '%s': replacement: %s", i + 1, rule, local->message);
          return FALSE;
        }
      g_ptr_array_add (self->replacements, g_strdup (eq + 1));
    }
  return TRUE;
}

/* Output tensors with the input tensor each came from, for messages. */
typedef struct {
  LpCheckpoint *output;
  GHashTable *sources;   /* output name -> input name */
} Output;

static gboolean
output_add (Output     *out,
            LpTensor   *tensor,
            const char *source,
            GError    **error)
{
  const char *name = lp_tensor_get_name (tensor);
  const char *other = g_hash_table_lookup (out->sources, name);

  if (other != NULL)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "tensors '%s' and '%s' would both be named '%s'", other, source, name);
      return FALSE;
    }
  g_hash_table_insert (out->sources, g_strdup (name), g_strdup (source));
  return lp_checkpoint_add_tensor (out->output, tensor, error);
}

/* Writes scale s into two factors: a power of two into the up factor (exact)
 * and the rest into the down one, so s = 1 and s = 2^n change nothing but
 * exponents. */
static void
split_scale (double  s,
             double *s_down,
             double *s_up)
{
  if (s > 0 && isfinite (s))
    *s_up = ldexp (1.0, (int) lround (log2 (s) / 2));
  else
    *s_up = 1.0;
  *s_down = s / *s_up;
}

static LpTensor *
factor_block (const char *name,
              LpTensor   *source,
              guint64     row_start,
              guint64     n_rows,
              double      scale,
              GError    **error)
{
  LpBlock block = { source, row_start, n_rows, 0, 0, scale };
  guint64 shape[LP_TENSOR_MAX_DIMS];
  const guint64 *in_shape;
  guint n_dims;

  if (row_start == 0 && n_rows == lp_tensor_get_dim (source, 0) && scale == 1.0)
    return lp_tensor_new_renamed (source, name);
  in_shape = lp_tensor_get_shape (source, &n_dims);
  memcpy (shape, in_shape, n_dims * sizeof (guint64));
  shape[0] = n_rows;
  return lp_block_tensor_new (name, lp_tensor_get_dtype (source), shape, n_dims, &block, 1, error);
}

/* The up factor with the two halves of its rows in the other order. */
static LpTensor *
swapped_halves (const char *name,
                LpTensor   *up,
                double      scale,
                GError    **error)
{
  guint64 half = lp_tensor_get_dim (up, 0) / 2;
  guint64 shape[2] = { 2 * half, lp_tensor_get_dim (up, 1) };
  LpBlock blocks[2] = {
    { up, half, half, 0, 0, scale },
    { up, 0, half, half, 0, scale },
  };

  return lp_block_tensor_new (name, lp_tensor_get_dtype (up), shape, 2, blocks, 2, error);
}

/* A part of a fused module with the ranks it uses (target->keep): those
 * rows of the down factor, those columns of its rows of the up factor, a
 * block for each run of consecutive ranks. */
static gboolean
kept_ranks (LpRenameTarget  *target,
            const char      *down_name,
            const char      *up_name,
            LpTensor        *in_down,
            LpTensor        *in_up,
            double           s_down,
            double           s_up,
            LpTensor       **down,
            LpTensor       **up,
            GError         **error)
{
  g_autofree LpBlock *down_blocks = g_new0 (LpBlock, target->n_keep);
  g_autofree LpBlock *up_blocks = g_new0 (LpBlock, target->n_keep);
  guint64 shape[LP_TENSOR_MAX_DIMS];
  const guint64 *in_shape;
  guint n_dims, n = 0;

  for (guint i = 0; i < target->n_keep; )
    {
      guint start = target->keep[i], len = 1;

      while (i + len < target->n_keep && target->keep[i + len] == start + len)
        len++;
      down_blocks[n] = (LpBlock) { in_down, start, len, i, 0, s_down };
      up_blocks[n] = (LpBlock) { in_up, target->row_start, target->n_rows, 0, i, s_up, NULL, start, len };
      n++;
      i += len;
    }
  in_shape = lp_tensor_get_shape (in_down, &n_dims);
  memcpy (shape, in_shape, n_dims * sizeof (guint64));
  shape[0] = target->n_keep;
  *down = lp_block_tensor_new (down_name, lp_tensor_get_dtype (in_down), shape, n_dims,
                               down_blocks, n, error);
  shape[0] = target->n_rows;
  shape[1] = target->n_keep;
  *up = *down ? lp_block_tensor_new (up_name, lp_tensor_get_dtype (in_up), shape, 2, up_blocks, n, error)
              : NULL;
  return *up != NULL;
}

static const char *
suffix (LpLoraConvention convention,
        gboolean         is_up)
{
  if (convention == LP_LORA_CONVENTION_KOHYA)
    return is_up ? ".lora_up.weight" : ".lora_down.weight";
  return is_up ? ".lora_B.weight" : ".lora_A.weight";
}

/* A PEFT module of the generated adapter config. */
typedef struct {
  char *key;
  guint rank;
  double alpha;
} PeftEntry;

static void
peft_entry_free (PeftEntry *entry)
{
  g_free (entry->key);
  g_free (entry);
}

/* Makes the tensors of one planned module. */
static gboolean
build_target (LpRenameTarget *target,
              Output         *out,
              GPtrArray      *peft,
              GError        **error)
{
  g_autofree char *down_name = g_strconcat (target->name, suffix (target->convention, FALSE), NULL);
  g_autofree char *up_name = g_strconcat (target->name, suffix (target->convention, TRUE), NULL);
  g_autofree char *alpha_name = g_strconcat (target->name, ".alpha", NULL);
  g_autoptr(LpTensor) down = NULL, up = NULL, alpha = NULL;
  LpLoraModule *first = NULL;
  const char *source_name;
  double alpha_value = 0;
  guint rank = 0;

  for (guint p = 0; p < target->n_parts && first == NULL; p++)
    first = target->parts[p];
  source_name = lp_tensor_get_name (lp_lora_module_get_down (first));

  if (target->n_parts > 1)
    {
      g_autofree LpBlock *down_blocks = g_new0 (LpBlock, target->n_parts);
      g_autofree LpBlock *up_blocks = g_new0 (LpBlock, target->n_parts);
      g_autofree LpTensor **factors = g_new0 (LpTensor *, 2 * target->n_parts);
      guint n = 0;
      guint64 row = 0, in = lp_lora_module_get_in_features (first);
      gboolean same_scale = TRUE;
      guint64 shape[2];
      LpDtype dtype;

      for (guint p = 0; p < target->n_parts; p++)
        if (target->parts[p] != NULL
            && lp_lora_module_get_scale (target->parts[p]) != lp_lora_module_get_scale (first))
          same_scale = FALSE;

      /* downs stacked, ups block-diagonal; a part the input lacks is zero */
      for (guint p = 0; p < target->n_parts; p++)
        {
          LpLoraModule *part = target->parts[p];

          if (part != NULL)
            {
              guint r = lp_lora_module_get_rank (part);
              double s = same_scale ? 1.0 : lp_lora_module_get_scale (part);

              down_blocks[n] = (LpBlock) { lp_lora_module_get_down (part), 0, r, rank, 0, 1.0 };
              up_blocks[n] = (LpBlock) { lp_lora_module_get_up (part), 0, target->part_rows[p],
                                         row, rank, s };
              factors[2 * n] = lp_lora_module_get_down (part);
              factors[2 * n + 1] = lp_lora_module_get_up (part);
              n++;
              rank += r;
            }
          row += target->part_rows[p];
        }
      dtype = lp_common_float_dtype (factors, 2 * n);
      shape[0] = rank;
      shape[1] = in;
      down = lp_block_tensor_new (down_name, dtype, shape, 2, down_blocks, n, error);
      shape[0] = row;
      shape[1] = rank;
      up = down ? lp_block_tensor_new (up_name, dtype, shape, 2, up_blocks, n, error) : NULL;
      if (up == NULL)
        return FALSE;
      alpha_value = same_scale ? lp_lora_module_get_scale (first) * rank : rank;
    }
  else
    {
      LpTensor *in_down = lp_lora_module_get_down (first);
      LpTensor *in_up = lp_lora_module_get_up (first);
      double scale = lp_lora_module_get_scale (first);
      double s_down = 1.0, s_up = 1.0;
      guint64 row_start = target->split ? target->row_start : 0;
      guint64 n_rows = target->split ? target->n_rows : lp_tensor_get_dim (in_up, 0);

      rank = target->keep != NULL ? target->n_keep : lp_lora_module_get_rank (first);
      if (target->convention == LP_LORA_CONVENTION_DIFFUSERS)
        split_scale (scale, &s_down, &s_up);
      else
        alpha_value = scale * lp_lora_module_get_rank (first);
      if (target->keep != NULL)
        {
          if (!kept_ranks (target, down_name, up_name, in_down, in_up, s_down, s_up, &down, &up, error))
            return FALSE;
        }
      else
        {
          down = factor_block (down_name, in_down, 0, lp_tensor_get_dim (in_down, 0), s_down, error);
          if (down != NULL)
            up = target->swap_halves ? swapped_halves (up_name, in_up, s_up, error)
                                     : factor_block (up_name, in_up, row_start, n_rows, s_up, error);
          if (up == NULL)
            return FALSE;
        }
    }

  if (target->convention == LP_LORA_CONVENTION_KOHYA)
    {
      LpTensor *old = lp_lora_module_get_alpha (first);

      alpha = lp_alpha_tensor_new (alpha_name,
                                   lp_tensor_get_dtype (old ? old : lp_lora_module_get_down (first)),
                                   alpha_value, error);
      if (alpha == NULL || !output_add (out, alpha, source_name, error))
        return FALSE;
    }
  else if (target->convention == LP_LORA_CONVENTION_PEFT)
    {
      PeftEntry *entry = g_new0 (PeftEntry, 1);

      entry->key = g_strdup (target->name + strlen ("base_model.model."));
      entry->rank = rank;
      entry->alpha = alpha_value;
      g_ptr_array_add (peft, entry);
    }

  return output_add (out, down, source_name, error)
      && output_add (out, up, lp_tensor_get_name (lp_lora_module_get_up (first)), error);
}

static void
json_string (GString    *json,
             const char *text)
{
  g_string_append_c (json, '"');
  for (const char *p = text; *p; p++)
    {
      if (*p == '"' || *p == '\\')
        g_string_append_printf (json, "\\%c", *p);
      else if ((guchar) *p < 0x20)
        g_string_append_printf (json, "\\u%04x", (guchar) *p);
      else
        g_string_append_c (json, *p);
    }
  g_string_append_c (json, '"');
}

static void
json_number (GString *json,
             double   value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  /* PEFT's lora_alpha is an int when it can be */
  if (value == floor (value) && fabs (value) < 1e15)
    g_string_append_printf (json, "%" G_GINT64_FORMAT, (gint64) value);
  else
    g_string_append (json, g_ascii_dtostr (buf, sizeof buf, value));
}

/* The value most entries have (ties: the first reached). */
static double
most_common (GPtrArray *entries,
             gboolean   ranks)
{
  double best = 0;
  guint best_count = 0;

  for (guint i = 0; i < entries->len; i++)
    {
      PeftEntry *a = entries->pdata[i];
      double v = ranks ? a->rank : a->alpha;
      guint count = 0;

      for (guint j = 0; j < entries->len; j++)
        {
          PeftEntry *b = entries->pdata[j];
          count += (ranks ? b->rank : b->alpha) == v;
        }
      if (count > best_count)
        {
          best = v;
          best_count = count;
        }
    }
  return best;
}

/* An adapter_config.json for the converted modules: `r` and `lora_alpha`
 * the most common, `rank_pattern` and `alpha_pattern` the modules that
 * differ, keyed by lp_lora_peft_pattern_key() (one module each). */
static char *
peft_config (GPtrArray *entries)
{
  GString *json = g_string_new ("{\n  \"alpha_pattern\": {");
  double r = most_common (entries, TRUE);
  double alpha = most_common (entries, FALSE);
  gboolean first = TRUE;

  for (guint i = 0; i < entries->len; i++)
    {
      PeftEntry *entry = entries->pdata[i];
      g_autofree char *key = lp_lora_peft_pattern_key (entry->key);

      if (entry->alpha == alpha)
        continue;
      g_string_append (json, first ? "\n    " : ",\n    ");
      json_string (json, key);
      g_string_append (json, ": ");
      json_number (json, entry->alpha);
      first = FALSE;
    }
  g_string_append (json, first ? "},\n" : "\n  },\n");
  g_string_append (json, "  \"bias\": \"none\",\n  \"lora_alpha\": ");
  json_number (json, alpha);
  g_string_append (json, ",\n  \"lora_dropout\": 0.0,\n  \"peft_type\": \"LORA\",\n  \"r\": ");
  json_number (json, r);
  g_string_append (json, ",\n  \"rank_pattern\": {");
  first = TRUE;
  for (guint i = 0; i < entries->len; i++)
    {
      PeftEntry *entry = entries->pdata[i];
      g_autofree char *key = lp_lora_peft_pattern_key (entry->key);

      if (entry->rank == r)
        continue;
      g_string_append (json, first ? "\n    " : ",\n    ");
      json_string (json, key);
      g_string_append_printf (json, ": %u", entry->rank);
      first = FALSE;
    }
  g_string_append (json, first ? "},\n" : "\n  },\n");
  g_string_append (json, "  \"target_modules\": [");
  for (guint i = 0; i < entries->len; i++)
    {
      g_string_append (json, i ? ",\n    " : "\n    ");
      json_string (json, ((PeftEntry *) entries->pdata[i])->key);
    }
  g_string_append (json, "\n  ],\n  \"use_rslora\": false\n}\n");
  return g_string_free (json, FALSE);
}

/**
 * lp_rename_convert:
 * @input: a LoRA
 * @preset: the conversion
 * @error: return location for a #GError
 *
 * Step 1 of the rename stage, also how lora-merge converts its inputs to one
 * convention: the preset's conversion, in the input's order.
 *
 * Returns: (transfer full): the converted checkpoint, or %NULL
 */
LpCheckpoint *
lp_rename_convert (LpCheckpoint    *input,
                   LpRenamePreset   preset,
                   GError         **error)
{
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) plan = NULL;
  g_autoptr(GHashTable) owner = g_hash_table_new (NULL, NULL);          /* tensor -> module */
  g_autoptr(GHashTable) targets_of = g_hash_table_new_full (NULL, NULL, NULL,
                                                             (GDestroyNotify) g_ptr_array_unref);
  g_autoptr(GHashTable) built = g_hash_table_new (NULL, NULL);
  g_autoptr(GHashTable) sources = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  g_autoptr(GPtrArray) peft = g_ptr_array_new_with_free_func ((GDestroyNotify) peft_entry_free);
  g_autoptr(LpCheckpoint) output = lp_checkpoint_new_like (input);
  Output out = { output, sources };

  modules = lp_lora_find_modules_full (input, NULL, NULL, LP_LORA_FIND_PLAIN | LP_LORA_FIND_STORED_LAYOUT,
                                       NULL, error);
  if (modules == NULL)
    return NULL;
  plan = lp_rename_preset_plan (preset, modules, error);
  if (plan == NULL)
    return NULL;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = modules->pdata[i];

      g_hash_table_insert (owner, lp_lora_module_get_down (module), module);
      g_hash_table_insert (owner, lp_lora_module_get_up (module), module);
      if (lp_lora_module_get_alpha (module))
        g_hash_table_insert (owner, lp_lora_module_get_alpha (module), module);
    }
  for (guint t = 0; t < plan->len; t++)
    {
      LpRenameTarget *target = plan->pdata[t];

      for (guint p = 0; p < target->n_parts; p++)
        {
          GPtrArray *list;

          if (target->parts[p] == NULL)
            continue;
          list = g_hash_table_lookup (targets_of, target->parts[p]);
          if (list == NULL)
            {
              list = g_ptr_array_new ();
              g_hash_table_insert (targets_of, target->parts[p], list);
            }
          g_ptr_array_add (list, target);
        }
    }

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      LpLoraModule *module = g_hash_table_lookup (owner, tensor);
      GPtrArray *list;

      if (module == NULL)
        {
          if (!output_add (&out, tensor, lp_tensor_get_name (tensor), error))
            return NULL;
          continue;
        }
      list = g_hash_table_lookup (targets_of, module);
      for (guint t = 0; list != NULL && t < list->len; t++)
        {
          LpRenameTarget *target = list->pdata[t];

          if (!g_hash_table_add (built, target))
            continue;
          if (!build_target (target, &out, peft, error))
            return NULL;
        }
    }

  if (plan->len > 0)
    lp_lora_metadata_converted (output, ((LpRenameTarget *) plan->pdata[0])->convention);

  /* The adapter config describes PEFT's names, the scale where kohya and
   * diffusers names keep it beside no config. */
  if (preset == LP_RENAME_PRESET_KOHYA_TO_PEFT)
    {
      g_autofree char *config = peft_config (peft);
      lp_checkpoint_set_adapter_config (output, config);
    }
  else if (lp_checkpoint_get_adapter_config (output) != NULL)
    {
      LpLoraConvention target = plan->len > 0 ? ((LpRenameTarget *) plan->pdata[0])->convention
                                              : LP_LORA_CONVENTION_KOHYA;

      g_warning ("rename preset=%s: the input's adapter_config.json is not written beside the output, "
                 "whose %s names keep every module's scale %s", lp_rename_preset_nick (preset),
                 lp_rename_convention_name (target),
                 target == LP_LORA_CONVENTION_KOHYA ? "in its .alpha tensor" : "in its factors");
      lp_checkpoint_set_adapter_config (output, NULL);
    }
  return g_steal_pointer (&output);
}

/* The rules, in order, on one name. */
static char *
rules_apply (LpRename    *self,
             const char  *old_name,
             GError     **error)
{
  g_autofree char *name = g_strdup (old_name);

  for (guint r = 0; r < self->regexes->len; r++)
    {
      char *next = g_regex_replace (self->regexes->pdata[r], name, -1, 0,
                                    self->replacements->pdata[r], 0, error);
      if (next == NULL)
        return NULL;
      g_free (name);
      name = next;
    }
  return g_steal_pointer (&name);
}

static char *
rules_rename (const char *name,
              gpointer    data)
{
  return rules_apply (data, name, NULL);
}

/* Step 2: the rules, on every name; the metadata that names modules
 * follows them (lp_lora_metadata_renamed()). */
static LpCheckpoint *
apply_rules (LpRename      *self,
             LpCheckpoint  *input,
             GError       **error)
{
  g_autoptr(LpCheckpoint) output = lp_checkpoint_new_like (input);
  g_autoptr(GHashTable) sources = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  Output out = { output, sources };

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      const char *old_name = lp_tensor_get_name (tensor);
      g_autofree char *name = rules_apply (self, old_name, error);
      g_autoptr(LpTensor) renamed = NULL;

      if (name == NULL)
        return NULL;
      if (*name == '\0')
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor '%s': the rules leave an empty name", old_name);
          return NULL;
        }
      renamed = g_str_equal (name, old_name) ? g_object_ref (tensor)
                                             : lp_tensor_new_renamed (tensor, name);
      if (!output_add (&out, renamed, old_name, error))
        return NULL;
    }
  if (!lp_lora_metadata_renamed (input, output, rules_rename, self, error))
    return NULL;
  return g_steal_pointer (&output);
}

static LpCheckpoint *
lp_rename_transform (LpTransform   *transform,
                     LpCheckpoint  *input,
                     GError       **error)
{
  LpRename *self = LP_RENAME (transform);
  g_autoptr(LpCheckpoint) converted = NULL;

  if (self->regexes == NULL && !lp_rename_prepare (LP_STAGE (self), error))
    return NULL;

  converted = self->preset != LP_RENAME_PRESET_NONE ? lp_rename_convert (input, self->preset, error)
                                                    : g_object_ref (input);
  if (converted == NULL)
    return NULL;
  if (self->regexes->len == 0)
    return g_steal_pointer (&converted);
  return apply_rules (self, converted, error);
}

static void
lp_rename_set_property (GObject      *object,
                        guint         prop_id,
                        const GValue *value,
                        GParamSpec   *pspec)
{
  LpRename *self = LP_RENAME (object);

  switch (prop_id)
    {
    case PROP_RULES:
      g_strfreev (self->rules);
      self->rules = g_value_dup_boxed (value);
      g_clear_pointer (&self->regexes, g_ptr_array_unref);
      break;
    case PROP_PRESET:
      self->preset = g_value_get_enum (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_rename_get_property (GObject    *object,
                        guint       prop_id,
                        GValue     *value,
                        GParamSpec *pspec)
{
  LpRename *self = LP_RENAME (object);

  switch (prop_id)
    {
    case PROP_RULES:
      g_value_set_boxed (value, self->rules);
      break;
    case PROP_PRESET:
      g_value_set_enum (value, self->preset);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_rename_finalize (GObject *object)
{
  LpRename *self = LP_RENAME (object);

  g_strfreev (self->rules);
  g_clear_pointer (&self->regexes, g_ptr_array_unref);
  g_clear_pointer (&self->replacements, g_ptr_array_unref);

  G_OBJECT_CLASS (lp_rename_parent_class)->finalize (object);
}

static void
lp_rename_class_init (LpRenameClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);

  object_class->set_property = lp_rename_set_property;
  object_class->get_property = lp_rename_get_property;
  object_class->finalize = lp_rename_finalize;
  stage_class->prepare = lp_rename_prepare;
  transform_class->transform = lp_rename_transform;

  /**
   * LpRename:rules:
   *
   * Ordered `pattern=replacement` regex rules applied to every tensor name.
   */
  properties[PROP_RULES] =
    g_param_spec_boxed ("rules", "Rules",
                        "Ordered pattern=replacement regex rules applied to every tensor name, after the preset",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpRename:preset:
   *
   * A conversion between LoRA key conventions, applied before the rules.
   */
  properties[PROP_PRESET] =
    g_param_spec_enum ("preset", "Preset",
                       "Convert between LoRA key conventions: flux-kohya-to-diffusers, flux-diffusers-to-kohya, "
                       "sd-kohya-to-diffusers (SD 1.5 or SDXL), sd-diffusers-to-kohya, sdxl-diffusers-to-kohya, "
                       "peft-to-kohya, kohya-to-peft",
                       LP_TYPE_RENAME_PRESET, LP_RENAME_PRESET_NONE,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "rename", "Transform",
                               "Rename tensors by regex rules, or convert a LoRA between key conventions");
}

static void
lp_rename_init (LpRename *self)
{
}
