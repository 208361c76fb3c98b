/* lp-lora-merge.c: the `lora-merge` stage, a weighted sum of LoRAs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-transform-stages.h"
#include "lp-transform-common.h"
#include "lp-rename-presets.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraMerge:
 *
 * Combines N LoRAs into one whose every module's update is the weighted sum
 * `Σ w_i · scale_i · B_i @ A_i` of the inputs' updates (#LpLoraMerge:weights,
 * default 1 each).
 *
 * With `method=concat`, the only method, the factors are stacked: the down
 * factors one under the other, the up factors side by side, each input's
 * `w_i · scale_i` folded into its block of the up factor. That is exact, and
 * the merged rank is the sum of the inputs' ranks, so `lora-merge !
 * lora-svd rank=k` is the best rank-k approximation of the weighted sum
 * (the SVD merge).
 *
 * Modules present in only some inputs are kept (with their weight). The
 * output keeps each module's convention: a kohya module gets `.alpha` = the
 * merged rank (scale 1) when any input had one; a PEFT module keeps the
 * first input's adapter config, rewritten for the merged ranks so its scale
 * is the first input's, and the others' scales are folded relative to it.
 * Other tensors and the metadata come from the first input that has them.
 *
 * The output names its modules in one convention (#LpLoraMerge:convention,
 * the first input's by default): merging a kohya file with a diffusers one
 * as they are would write both naming schemes, each loader applying only
 * its half. An input in another convention is converted first by the
 * `rename` preset that converts it (chosen by the model its names are of:
 * Flux, SD 1.5, or SDXL's sgm names when the kohya inputs use them), so a
 * diffusers Flux module `to_q` meets a kohya `img_attn_qkv` as its part.
 * An input no preset converts is an error naming both conventions.
 *
 * Errors name the module: a module whose shapes or conventions differ
 * between inputs, a PEFT module absent from the first input, a weight that
 * would put infinity into an up factor of the factors' dtype.
 */

struct _LpLoraMerge
{
  LpAggregator parent_instance;

  LpLoraMergeMethod method;
  LpLoraMergeConvention convention;
  GStrv weights;
};

enum {
  PROP_0,
  PROP_METHOD,
  PROP_WEIGHTS,
  PROP_CONVENTION,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraMerge, lp_lora_merge, LP_TYPE_AGGREGATOR)

G_DEFINE_ENUM_TYPE (LpLoraMergeMethod, lp_lora_merge_method,
  G_DEFINE_ENUM_VALUE (LP_LORA_MERGE_METHOD_CONCAT, "concat"))

G_DEFINE_ENUM_TYPE (LpLoraMergeConvention, lp_lora_merge_convention,
  G_DEFINE_ENUM_VALUE (LP_LORA_MERGE_CONVENTION_FIRST, "first"),
  G_DEFINE_ENUM_VALUE (LP_LORA_MERGE_CONVENTION_KOHYA, "kohya"),
  G_DEFINE_ENUM_VALUE (LP_LORA_MERGE_CONVENTION_DIFFUSERS, "diffusers"),
  G_DEFINE_ENUM_VALUE (LP_LORA_MERGE_CONVENTION_PEFT, "peft"))

/* Parses #LpLoraMerge:weights, or gives n ones when unset. */
static gboolean
parse_weights (LpLoraMerge  *self,
               guint         n,
               double      **weights_out,
               GError      **error)
{
  guint n_given = self->weights ? g_strv_length (self->weights) : 0;
  g_autofree double *weights = g_new (double, MAX (n, MAX (n_given, 1)));

  for (guint i = 0; i < n_given; i++)
    {
      const char *text = self->weights[i];
      char *end = NULL;

      weights[i] = g_ascii_strtod (text, &end);
      if (end == text || *end != '\0' || !isfinite (weights[i]))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "weights: '%s' (weight %u) is not a finite number", text, i + 1);
          return FALSE;
        }
    }
  if (n > 0 && n_given > 0 && n_given != n)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "weights: %u weights given for %u inputs", n_given, n);
      return FALSE;
    }
  if (n_given == 0)
    for (guint i = 0; i < n; i++)
      weights[i] = 1.0;
  if (weights_out)
    *weights_out = g_steal_pointer (&weights);
  return TRUE;
}

static gboolean
lp_lora_merge_prepare (LpStage  *stage,
                       GError  **error)
{
  return parse_weights (LP_LORA_MERGE (stage), 0, NULL, error);
}

/* One module of the output: the inputs' modules of that name. */
typedef struct {
  const char *name;
  LpLoraModule **parts;   /* one per input, NULL where absent */
  LpLoraModule *first;
} Merged;

static gboolean
check_compatible (Merged        *merged,
                  guint          first_input,
                  guint          input,
                  LpLoraModule  *module,
                  GError       **error)
{
  LpLoraModule *first = merged->first;
  guint64 kh0, kw0, kh, kw;

  if (lp_lora_module_get_convention (module) != lp_lora_module_get_convention (first))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: inputs %u and %u name its factors in different conventions "
                   "(%s and %s); convert one with rename first",
                   merged->name, first_input + 1, input + 1,
                   lp_tensor_get_name (lp_lora_module_get_down (first)),
                   lp_tensor_get_name (lp_lora_module_get_down (module)));
      return FALSE;
    }
  lp_lora_module_get_kernel_size (first, &kh0, &kw0);
  lp_lora_module_get_kernel_size (module, &kh, &kw);
  if (lp_lora_module_get_in_features (module) != lp_lora_module_get_in_features (first)
      || lp_lora_module_get_out_features (module) != lp_lora_module_get_out_features (first)
      || lp_lora_module_is_conv (module) != lp_lora_module_is_conv (first)
      || kh != kh0 || kw != kw0)
    {
      g_autofree char *s0 = lp_tensor_describe_shape (lp_lora_module_get_down (first));
      g_autofree char *u0 = lp_tensor_describe_shape (lp_lora_module_get_up (first));
      g_autofree char *s1 = lp_tensor_describe_shape (lp_lora_module_get_down (module));
      g_autofree char *u1 = lp_tensor_describe_shape (lp_lora_module_get_up (module));

      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: shapes differ between inputs: input %u has down %s, up %s; "
                   "input %u has down %s, up %s",
                   merged->name, first_input + 1, s0, u0, input + 1, s1, u1);
      return FALSE;
    }
  return TRUE;
}

static const char *
convention_nick (LpLoraConvention convention)
{
  g_autoptr(GEnumClass) klass = g_type_class_ref (LP_TYPE_LORA_CONVENTION);
  GEnumValue *value = g_enum_get_value (klass, convention);

  return value ? value->value_nick : "unknown";
}

/* Inputs that name their modules in different conventions would merge into
 * a file holding both naming schemes, which no loader applies whole: each
 * input's modules must be in the first input's convention. */
static gboolean
check_same_convention (GPtrArray  *all_modules,
                       GError    **error)
{
  LpLoraModule *first = NULL;
  guint first_input = 0;

  for (guint i = 0; i < all_modules->len; i++)
    {
      GPtrArray *modules = g_ptr_array_index (all_modules, i);
      LpLoraModule *module;
      LpLoraConvention want, have;
      const char *presets;

      if (modules->len == 0)
        continue;
      module = g_ptr_array_index (modules, 0);
      if (first == NULL)
        {
          first = module;
          first_input = i;
          continue;
        }
      want = lp_lora_module_get_convention (first);
      have = lp_lora_module_get_convention (module);
      if (have == want)
        continue;
      presets = lp_rename_presets_between (have, want);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "inputs %u and %u name their modules in different conventions, %s (%s) and %s (%s): "
                   "merged, the file would hold both naming schemes. Convert input %u to %s first%s%s%s",
                   first_input + 1, i + 1,
                   convention_nick (want), lp_tensor_get_name (lp_lora_module_get_down (first)),
                   convention_nick (have), lp_tensor_get_name (lp_lora_module_get_down (module)),
                   i + 1, convention_nick (want),
                   presets ? " with rename preset=" : " with rename rules", presets ? presets : "",
                   presets ? "" : "");
      return FALSE;
    }
  return TRUE;
}

/* The inputs, each in the output's convention: those in another one
 * converted by the rename preset that converts them. */
static GPtrArray *
convert_inputs (LpLoraMerge   *self,
                LpCheckpoint **inputs,
                guint          n_inputs,
                GError       **error)
{
  static const LpLoraConvention conventions[] = {
    [LP_LORA_MERGE_CONVENTION_KOHYA] = LP_LORA_CONVENTION_KOHYA,
    [LP_LORA_MERGE_CONVENTION_DIFFUSERS] = LP_LORA_CONVENTION_DIFFUSERS,
    [LP_LORA_MERGE_CONVENTION_PEFT] = LP_LORA_CONVENTION_PEFT,
  };
  g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func (g_object_unref);
  g_autoptr(GPtrArray) found = g_ptr_array_new_with_free_func ((GDestroyNotify) g_ptr_array_unref);
  g_autoptr(GPtrArray) in_target = g_ptr_array_new ();
  LpLoraConvention target;

  for (guint i = 0; i < n_inputs; i++)
    {
      GPtrArray *modules = lp_lora_find_modules_required (inputs[i], NULL, NULL, NULL, error);

      if (modules == NULL)
        {
          g_prefix_error (error, "input %u: ", i + 1);
          return NULL;
        }
      g_ptr_array_add (found, modules);
    }
  target = self->convention == LP_LORA_MERGE_CONVENTION_FIRST
    ? lp_lora_module_get_convention (g_ptr_array_index ((GPtrArray *) g_ptr_array_index (found, 0), 0))
    : conventions[self->convention];
  for (guint i = 0; i < n_inputs; i++)
    {
      GPtrArray *modules = g_ptr_array_index (found, i);

      if (lp_lora_module_get_convention (g_ptr_array_index (modules, 0)) == target)
        g_ptr_array_extend (in_target, modules, NULL, NULL);
    }

  for (guint i = 0; i < n_inputs; i++)
    {
      GPtrArray *modules = g_ptr_array_index (found, i);
      LpRenamePreset preset;
      LpCheckpoint *converted;

      if (lp_lora_module_get_convention (g_ptr_array_index (modules, 0)) == target)
        {
          g_ptr_array_add (out, g_object_ref (inputs[i]));
          continue;
        }
      if (!lp_rename_preset_choose (modules, in_target, target, &preset, error))
        {
          g_prefix_error (error, "input %u: ", i + 1);
          return NULL;
        }
      converted = lp_rename_convert (inputs[i], preset, error);
      if (converted == NULL)
        {
          g_prefix_error (error, "input %u, converted to %s by rename preset=%s: ", i + 1,
                          lp_rename_convention_name (target), lp_rename_preset_nick (preset));
          return NULL;
        }
      g_ptr_array_add (out, converted);
    }
  return g_steal_pointer (&out);
}

static LpCheckpoint *
lp_lora_merge_aggregate (LpAggregator  *aggregator,
                         LpCheckpoint **given_inputs,
                         guint          n_inputs,
                         GError       **error)
{
  LpLoraMerge *self = LP_LORA_MERGE (aggregator);
  g_autoptr(GPtrArray) converted = NULL;
  LpCheckpoint **inputs;
  g_autofree double *weights = NULL;
  g_autoptr(GPtrArray) all_modules = g_ptr_array_new_with_free_func ((GDestroyNotify) g_ptr_array_unref);
  g_autoptr(GPtrArray) all_others = g_ptr_array_new_with_free_func ((GDestroyNotify) g_ptr_array_unref);
  g_autoptr(GHashTable) by_name = g_hash_table_new (g_str_hash, g_str_equal);
  g_autoptr(GPtrArray) order = g_ptr_array_new ();
  g_autoptr(GPtrArray) first_modules = NULL;
  g_autoptr(LpCheckpoint) output = NULL;
  g_autofree guint *first_ranks = NULL;
  g_autofree guint *merged_ranks = NULL;
  const char *config = NULL;
  g_autofree char *stage = lp_stage_describe (LP_STAGE (aggregator));

  if (!parse_weights (self, n_inputs, &weights, error))
    return NULL;
  converted = convert_inputs (self, given_inputs, n_inputs, error);
  if (converted == NULL)
    return NULL;
  inputs = (LpCheckpoint **) converted->pdata;

  for (guint i = 0; i < n_inputs; i++)
    {
      GPtrArray *others = NULL;
      GPtrArray *modules = lp_lora_find_modules_required (inputs[i], NULL, NULL, &others, error);

      if (modules == NULL)
        {
          g_prefix_error (error, "input %u: ", i + 1);
          return NULL;
        }
      g_ptr_array_add (all_modules, modules);
      g_ptr_array_add (all_others, others);

      for (guint m = 0; m < modules->len; m++)
        {
          LpLoraModule *module = g_ptr_array_index (modules, m);
          const char *name = lp_lora_module_get_name (module);
          Merged *merged = g_hash_table_lookup (by_name, name);

          if (merged == NULL)
            {
              merged = g_new0 (Merged, 1);
              merged->name = name;
              merged->parts = g_new0 (LpLoraModule *, n_inputs);
              merged->first = module;
              g_hash_table_insert (by_name, (gpointer) name, merged);
              g_ptr_array_add (order, merged);
            }
          else
            {
              guint first_input = 0;

              while (merged->parts[first_input] == NULL)
                first_input++;
              if (!check_compatible (merged, first_input, i, module, error))
                goto fail;
            }
          merged->parts[i] = module;
        }
    }

  if (!check_same_convention (all_modules, error))
    goto fail;

  /* A PEFT module's scale lives in the adapter config, which can only be
   * the first input's, rewritten for the merged ranks. */
  first_modules = g_ptr_array_ref (g_ptr_array_index (all_modules, 0));
  first_ranks = g_new0 (guint, MAX (first_modules->len, 1));
  merged_ranks = g_new0 (guint, MAX (order->len, 1));
  config = lp_checkpoint_get_adapter_config (inputs[0]);
  for (guint m = 0; m < order->len; m++)
    {
      Merged *merged = g_ptr_array_index (order, m);
      guint rank = 0;

      for (guint i = 0; i < n_inputs; i++)
        if (merged->parts[i] != NULL)
          rank += lp_lora_module_get_rank (merged->parts[i]);
      if (lp_lora_module_get_convention (merged->first) == LP_LORA_CONVENTION_PEFT
          && merged->parts[0] == NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: a PEFT module must be in the first input, whose "
                       "adapter_config.json the output keeps", merged->name);
          goto fail;
        }
      if (merged->parts[0] != NULL)
        {
          guint idx;

          g_ptr_array_find (first_modules, merged->parts[0], &idx);
          first_ranks[idx] = rank;
        }
      merged_ranks[m] = rank;
    }

  output = lp_checkpoint_new_like (inputs[0]);
  for (guint m = 0; m < order->len; m++)
    {
      Merged *merged = g_ptr_array_index (order, m);
      LpLoraModule *first = merged->first;
      guint rank = merged_ranks[m];
      g_autofree LpBlock *down_blocks = g_new0 (LpBlock, n_inputs);
      g_autofree LpBlock *up_blocks = g_new0 (LpBlock, n_inputs);
      g_autofree LpTensor **factors = g_new0 (LpTensor *, 2 * n_inputs);
      g_autoptr(GPtrArray) whats = g_ptr_array_new_with_free_func (g_free);
      g_autoptr(LpTensor) down = NULL, up = NULL, alpha = NULL;
      LpTensor *first_alpha = NULL;
      guint n_blocks = 0, offset = 0;
      guint64 shape[LP_TENSOR_MAX_DIMS];
      guint n_dims;
      double base_scale = 1.0;
      LpDtype dtype;

      if (lp_lora_module_get_convention (first) == LP_LORA_CONVENTION_PEFT)
        base_scale = lp_lora_module_get_scale (merged->parts[0]);

      for (guint i = 0; i < n_inputs; i++)
        {
          LpLoraModule *part = merged->parts[i];
          guint r;

          double scale;
          char *what;

          if (part == NULL)
            continue;
          r = lp_lora_module_get_rank (part);
          scale = weights[i] * lp_lora_module_get_scale (part) / base_scale;
          what = g_strdup_printf ("%s: module %s, weight %g of input %u", stage, merged->name, weights[i], i + 1);
          g_ptr_array_add (whats, what);
          if (!isfinite (scale))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                           "%s: the weight times the module's scale %g is too large for a number",
                           what, lp_lora_module_get_scale (part));
              goto fail;
            }
          if (first_alpha == NULL)
            first_alpha = lp_lora_module_get_alpha (part);
          down_blocks[n_blocks] = (LpBlock) { lp_lora_module_get_down (part), 0, r, offset, 0, 1.0 };
          up_blocks[n_blocks] = (LpBlock) {
            lp_lora_module_get_up (part), 0, lp_lora_module_get_out_features (part), 0, offset,
            scale, what };
          factors[2 * n_blocks] = lp_lora_module_get_down (part);
          factors[2 * n_blocks + 1] = lp_lora_module_get_up (part);
          n_blocks++;
          offset += r;
        }

      dtype = lp_common_float_dtype (factors, 2 * n_blocks);
      if (first_alpha != NULL)
        {
          g_autofree char *alpha_name = g_strconcat (merged->name, ".alpha", NULL);

          alpha = lp_alpha_tensor_new (alpha_name, lp_tensor_get_dtype (first_alpha), rank, error);
          if (alpha == NULL || !lp_checkpoint_add_tensor (output, alpha, error))
            goto fail;
        }
      lp_lora_module_new_factor_shape (first, FALSE, rank, shape, &n_dims);
      down = lp_block_tensor_new (lp_tensor_get_name (lp_lora_module_get_down (first)), dtype,
                                  shape, n_dims, down_blocks, n_blocks, error);
      if (down == NULL || !lp_checkpoint_add_tensor (output, down, error))
        goto fail;
      lp_lora_module_new_factor_shape (first, TRUE, rank, shape, &n_dims);
      up = lp_block_tensor_new (lp_tensor_get_name (lp_lora_module_get_up (first)), dtype,
                                shape, n_dims, up_blocks, n_blocks, error);
      if (up == NULL || !lp_checkpoint_add_tensor (output, up, error))
        goto fail;
    }

  /* Other tensors: the first input that has a name gives it. */
  for (guint i = 0; i < n_inputs; i++)
    {
      GPtrArray *others = g_ptr_array_index (all_others, i);

      for (guint t = 0; t < others->len; t++)
        {
          LpTensor *tensor = g_ptr_array_index (others, t);

          if (lp_checkpoint_lookup (output, lp_tensor_get_name (tensor)) != NULL)
            continue;
          if (!lp_checkpoint_add_tensor (output, tensor, error))
            goto fail;
        }
    }

  /* kohya's hashes and diffusers' LoraConfig described one input's factors;
   * the merged ones carry their scales themselves */
  lp_lora_metadata_converted (output, lp_lora_module_get_convention (
                                ((Merged *) g_ptr_array_index (order, 0))->first));

  if (config != NULL)
    {
      g_autofree char *updated = lp_lora_update_adapter_config (config, first_modules,
                                                                first_ranks, error);
      if (updated == NULL)
        goto fail;
      lp_checkpoint_set_adapter_config (output, updated);
    }

  for (guint m = 0; m < order->len; m++)
    {
      Merged *merged = g_ptr_array_index (order, m);
      g_free (merged->parts);
      g_free (merged);
    }
  return g_steal_pointer (&output);

fail:
  for (guint m = 0; m < order->len; m++)
    {
      Merged *merged = g_ptr_array_index (order, m);
      g_free (merged->parts);
      g_free (merged);
    }
  return NULL;
}

static void
lp_lora_merge_set_property (GObject      *object,
                            guint         prop_id,
                            const GValue *value,
                            GParamSpec   *pspec)
{
  LpLoraMerge *self = LP_LORA_MERGE (object);

  switch (prop_id)
    {
    case PROP_METHOD:
      self->method = g_value_get_enum (value);
      break;
    case PROP_WEIGHTS:
      g_strfreev (self->weights);
      self->weights = g_value_dup_boxed (value);
      break;
    case PROP_CONVENTION:
      self->convention = g_value_get_enum (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_merge_get_property (GObject    *object,
                            guint       prop_id,
                            GValue     *value,
                            GParamSpec *pspec)
{
  LpLoraMerge *self = LP_LORA_MERGE (object);

  switch (prop_id)
    {
    case PROP_METHOD:
      g_value_set_enum (value, self->method);
      break;
    case PROP_WEIGHTS:
      g_value_set_boxed (value, self->weights);
      break;
    case PROP_CONVENTION:
      g_value_set_enum (value, self->convention);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_merge_finalize (GObject *object)
{
  LpLoraMerge *self = LP_LORA_MERGE (object);

  g_strfreev (self->weights);

  G_OBJECT_CLASS (lp_lora_merge_parent_class)->finalize (object);
}

static void
lp_lora_merge_class_init (LpLoraMergeClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpAggregatorClass *aggregator_class = LP_AGGREGATOR_CLASS (klass);

  object_class->set_property = lp_lora_merge_set_property;
  object_class->get_property = lp_lora_merge_get_property;
  object_class->finalize = lp_lora_merge_finalize;
  stage_class->prepare = lp_lora_merge_prepare;
  aggregator_class->aggregate = lp_lora_merge_aggregate;

  /**
   * LpLoraMerge:method:
   *
   * How modules are combined; `concat` stacks their factors.
   */
  properties[PROP_METHOD] =
    g_param_spec_enum ("method", "Method",
                       "How modules are combined: concat (stack the factors; exact, ranks add up)",
                       LP_TYPE_LORA_MERGE_METHOD, LP_LORA_MERGE_METHOD_CONCAT,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpLoraMerge:weights:
   *
   * One number per input, written as text (`["0.7", "0.3"]`); unset means 1 each.
   */
  properties[PROP_WEIGHTS] =
    g_param_spec_boxed ("weights", "Weights",
                        "The weight of each input's update, one number per input (default: 1 each)",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpLoraMerge:convention:
   *
   * The key convention of the output; inputs in another are converted to it.
   */
  properties[PROP_CONVENTION] =
    g_param_spec_enum ("convention", "Convention",
                       "The key convention written: first (the first input's), kohya, diffusers or peft; "
                       "inputs in another are converted by the rename preset that converts them",
                       LP_TYPE_LORA_MERGE_CONVENTION, LP_LORA_MERGE_CONVENTION_FIRST,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "lora-merge", "LoRA",
                               "Merge LoRAs into their weighted sum by stacking factors (exact; ranks add up)");
}

static void
lp_lora_merge_init (LpLoraMerge *self)
{
}
