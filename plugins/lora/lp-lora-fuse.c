/* lp-lora-fuse.c: the `lora-fuse` stage, LoRAs fused into a model's weights
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-math.h"
#include "lp-lora-blas.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/**
 * LpLoraFuse:
 *
 * Takes a model (first input) and one or more LoRAs (the other inputs) and
 * writes the model with `W + Σ strength · scale · B @ A` in every weight a
 * LoRA module adapts, summed in f64 and rounded once, to nearest even, to
 * the weight's own dtype. Every other tensor passes through untouched.
 *
 * A module finds its weight by the LoRA's naming:
 *
 * - PEFT `base_model.model.X`: the weight `X.weight`;
 * - diffusers `X` (or `unet.X`, `transformer.X`, `text_encoder.X`, …):
 *   `X.weight`, with or without the component's prefix;
 * - kohya `lora_unet_a_b_c` (and `lora_te_`, `lora_te1_`, `lora_te2_`,
 *   `lora_transformer_`): the weight whose name, with every `.` an `_`, is
 *   `a_b_c` (kohya's networks/lora.py names modules so), which is how kohya
 *   Flux LoRAs meet BFL checkpoints and diffusers-named LoRAs meet diffusers
 *   checkpoints;
 * - onto an original-format Stable Diffusion checkpoint (SD 1.x/2.x ldm,
 *   SDXL sgm: `model.diffusion_model.input_blocks.1.1.proj_in.weight`,
 *   `cond_stage_model.transformer.text_model.…`, `conditioner.embedders.0/1.…`),
 *   kohya and diffusers LoRAs name the modules by diffusers' layout
 *   (`lora_unet_down_blocks_0_attentions_0_proj_in`,
 *   `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`,
 *   `unet.down_blocks.0.…`), which lp_model_name_to_diffusers() maps, as
 *   ComfyUI's model_lora_keys_unet() and model_lora_keys_clip() do; kohya's
 *   SDXL LoRAs name them by the checkpoint's own layout
 *   (`lora_unet_input_blocks_4_1_…`). A q, k or v module of SDXL's OpenCLIP
 *   text encoder goes into its third of the fused `attn.in_proj_weight`.
 *
 * A module that finds no weight, or one of another shape, fails the run with
 * the list of them, unless `allow-unmatched` is set (then they are named in a
 * warning and left out).
 */
struct _LpLoraFuse
{
  LpAggregator parent_instance;

  GStrv strengths;
  gboolean allow_unmatched;
};

enum {
  PROP_0,
  PROP_STRENGTHS,
  PROP_ALLOW_UNMATCHED,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraFuse, lp_lora_fuse, LP_TYPE_AGGREGATOR)

static const char *const kohya_prefixes[] = {
  "lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_",
};

static const char *const diffusers_components[] = {
  "unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "prior.",
};

static gboolean
parse_strengths (LpLoraFuse  *self,
                 guint        n,
                 double     **out,
                 GError     **error)
{
  guint given = self->strengths ? g_strv_length (self->strengths) : 0;
  g_autofree double *values = g_new (double, MAX (MAX (n, given), 1));

  for (guint i = 0; i < given; i++)
    {
      const char *text = self->strengths[i];
      char *end = NULL;

      values[i] = g_ascii_strtod (text, &end);
      if (end == text || *end != '\0' || !isfinite (values[i]))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "strengths: '%s' (strength %u) is not a finite number", text, i + 1);
          return FALSE;
        }
    }
  if (n > 0 && given > 0 && given != n)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "strengths: %u given for %u LoRAs", given, n);
      return FALSE;
    }
  for (guint i = given; i < n; i++)
    values[i] = 1.0;
  if (out != NULL)
    *out = g_steal_pointer (&values);
  return TRUE;
}

/* ---- matching modules to weights ---------------------------------------------- */

/* Where a module's update goes: rows [row, row + n_rows) of a weight (all
 * of them but for a stacked q/k/v). */
typedef struct {
  LpTensor *weight;
  guint64 row;
  guint64 n_rows;
} Target;

/* The model's weights by name, and by their kohya form (every '.' an '_',
 * without `.weight`); a kohya form two weights share maps to NULL. An
 * original-format Stable Diffusion checkpoint adds `aliases`: the module
 * names LoRAs give its weights (see add_original_names()). */
typedef struct {
  LpCheckpoint *model;
  GHashTable *kohya;
  GHashTable *aliases;      /* module name -> Target */
} Targets;

static void
add_alias (Targets    *targets,
           char       *name,
           LpTensor   *weight,
           guint       part,
           guint       n_parts)
{
  Target *target = g_new (Target, 1);

  target->n_rows = lp_tensor_get_dim (weight, 0) / n_parts;
  target->row = part * target->n_rows;
  target->weight = weight;
  g_hash_table_replace (targets->aliases, name, target);
}

/* The names LoRAs give a weight of an original-format SD checkpoint, as
 * ComfyUI's comfy/lora.py model_lora_keys_unet() and model_lora_keys_clip()
 * list them: diffusers' (`unet.down_blocks.0.attentions.0.proj_in`), kohya's
 * form of it (`lora_unet_down_blocks_0_attentions_0_proj_in`), and for the
 * UNet kohya's form of the checkpoint's own name
 * (`lora_unet_input_blocks_1_1_proj_in`, how kohya's SDXL LoRAs name it). */
static void
add_original_names (Targets    *targets,
                    LpTensor   *weight)
{
  const char *name = lp_tensor_get_name (weight);
  const char *kohya_prefix = NULL;
  g_auto(GStrv) parts = NULL;
  guint n_parts;

  if (lp_tensor_get_n_dims (weight) == 0)
    return;
  if (g_str_has_prefix (name, "model.diffusion_model.") && g_str_has_suffix (name, ".weight"))
    {
      const char *rest = name + strlen ("model.diffusion_model.");
      char *kohya = g_strconcat ("lora_unet_", rest, NULL);

      kohya[strlen (kohya) - strlen (".weight")] = '\0';
      g_strdelimit (kohya + strlen ("lora_unet_"), ".", '_');
      add_alias (targets, kohya, weight, 0, 1);
    }
  parts = lp_model_name_to_diffusers (name, &kohya_prefix);
  if (parts == NULL)
    return;
  n_parts = g_strv_length (parts);
  if (lp_tensor_get_dim (weight, 0) % n_parts != 0)
    return;
  for (guint p = 0; p < n_parts; p++)
    {
      const char *dot;
      char *kohya;

      if (!g_str_has_suffix (parts[p], ".weight"))
        continue;
      parts[p][strlen (parts[p]) - strlen (".weight")] = '\0';
      dot = strchr (parts[p], '.');
      kohya = g_strconcat (kohya_prefix, dot + 1, NULL);
      g_strdelimit (kohya + strlen (kohya_prefix), ".", '_');
      add_alias (targets, g_strdup (parts[p]), weight, p, n_parts);
      add_alias (targets, kohya, weight, p, n_parts);
    }
}

static void
targets_init (Targets      *targets,
              LpCheckpoint *model)
{
  targets->model = model;
  targets->aliases = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  targets->kohya = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (model); i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (model, i);
      const char *name = lp_tensor_get_name (t);
      char *key;

      add_original_names (targets, t);
      if (!g_str_has_suffix (name, ".weight"))
        continue;
      key = g_strndup (name, strlen (name) - strlen (".weight"));
      g_strdelimit (key, ".", '_');
      if (g_hash_table_contains (targets->kohya, key))
        g_hash_table_replace (targets->kohya, key, NULL);
      else
        g_hash_table_insert (targets->kohya, key, t);
    }
}

static void
targets_clear (Targets *targets)
{
  g_clear_pointer (&targets->kohya, g_hash_table_unref);
  g_clear_pointer (&targets->aliases, g_hash_table_unref);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (Targets, targets_clear)

static LpTensor *
lookup_weight (Targets    *targets,
               const char *stem)
{
  g_autofree char *name = g_strconcat (stem, ".weight", NULL);
  return lp_checkpoint_lookup (targets->model, name);
}

static LpTensor *
find_weight (Targets      *targets,
             LpLoraModule *module)
{
  const char *name = lp_lora_module_get_name (module);
  LpTensor *found;

  if (lp_lora_module_get_convention (module) == LP_LORA_CONVENTION_KOHYA)
    {
      for (guint i = 0; i < G_N_ELEMENTS (kohya_prefixes); i++)
        if (g_str_has_prefix (name, kohya_prefixes[i]))
          {
            found = g_hash_table_lookup (targets->kohya, name + strlen (kohya_prefixes[i]));
            if (found != NULL)
              return found;
          }
      return g_hash_table_lookup (targets->kohya, name);
    }

  if (g_str_has_prefix (name, "base_model.model.")
      && (found = lookup_weight (targets, name + strlen ("base_model.model."))) != NULL)
    return found;
  if ((found = lookup_weight (targets, name)) != NULL)
    return found;
  for (guint i = 0; i < G_N_ELEMENTS (diffusers_components); i++)
    if (g_str_has_prefix (name, diffusers_components[i])
        && (found = lookup_weight (targets, name + strlen (diffusers_components[i]))) != NULL)
      return found;
  return NULL;
}

/* The weight @module adapts and its rows; FALSE when there is none. */
static gboolean
find_target (Targets      *targets,
             LpLoraModule *module,
             Target       *target)
{
  const char *name = lp_lora_module_get_name (module);
  const Target *alias = g_hash_table_lookup (targets->aliases, name);
  g_autofree char *in_unet = NULL;

  if (alias == NULL && lp_lora_module_get_convention (module) != LP_LORA_CONVENTION_KOHYA)
    {
      /* a diffusers UNet LoRA without its component's prefix */
      in_unet = g_strconcat ("unet.", name, NULL);
      alias = g_hash_table_lookup (targets->aliases, in_unet);
    }
  if (alias != NULL)
    {
      *target = *alias;
      return TRUE;
    }
  target->weight = find_weight (targets, module);
  target->row = 0;
  /* a scalar named like a weight takes no update: it is of another shape */
  target->n_rows = target->weight && lp_tensor_get_n_dims (target->weight) > 0
    ? lp_tensor_get_dim (target->weight, 0) : 0;
  return target->weight != NULL;
}

/* ---- one fused weight --------------------------------------------------------------- */

typedef struct {
  LpLoraModule *module;
  double factor;          /* strength · scale */
  guint64 row;            /* the weight's rows it updates */
  guint64 n_rows;
} Part;

typedef struct {
  LpTensor *weight;
  GArray *parts;          /* of Part */
} Fused;

static void
fused_free (gpointer data)
{
  Fused *fused = data;

  g_clear_object (&fused->weight);
  for (guint i = 0; fused->parts && i < fused->parts->len; i++)
    g_object_unref (g_array_index (fused->parts, Part, i).module);
  g_clear_pointer (&fused->parts, g_array_unref);
  g_free (fused);
}

static GBytes *
fused_data (LpTensor  *tensor,
            gpointer   user_data,
            GError   **error)
{
  Fused *fused = user_data;
  LpTensor *weight = fused->weight;
  LpDtype dtype = lp_tensor_get_dtype (weight);
  guint64 out = lp_tensor_get_dim (weight, 0);
  guint64 in = lp_tensor_get_n_elements (weight) / MAX (out, 1);
  gsize esize = lp_dtype_get_bits (dtype) / 8;
  guint n_parts = fused->parts->len;
  g_autofree double **a = g_new0 (double *, n_parts);
  g_autofree double **b = g_new0 (double *, n_parts);
  g_autoptr (GBytes) stored = NULL;
  GBytes *result = NULL;
  guint64 rows = MAX (1, (1u << 20) / MAX (in, 1));   /* 8 MiB of f64 a block */
  g_autofree double *block = NULL;
  guint8 *data = NULL;
  gsize overflow = 0;

  for (guint p = 0; p < n_parts; p++)
    {
      LpLoraModule *module = g_array_index (fused->parts, Part, p).module;
      LpTensor *down = lp_lora_module_get_down (module), *up = lp_lora_module_get_up (module);

      a[p] = lp_tensor_dup_f64 (down, NULL, error);
      b[p] = a[p] ? lp_tensor_dup_f64 (up, NULL, error) : NULL;
      if (b[p] == NULL)
        goto out;
      if (!lp_lora_all_finite_f64 (a[p], lp_tensor_get_n_elements (down))
          || !lp_lora_all_finite_f64 (b[p], lp_tensor_get_n_elements (up)))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "module %s: NaN or infinity in its factors", lp_lora_module_get_name (module));
          goto out;
        }
    }

  stored = lp_tensor_dup_data (weight, error);
  if (stored == NULL)
    goto out;
  data = lp_try_alloc (out * in, esize, "the fused weight", error);
  block = data ? lp_try_alloc (MIN (rows, out) * in, sizeof (double), "a block of the fused weight", error) : NULL;
  if (block == NULL)
    goto out;
  for (guint64 r0 = 0; r0 < out; r0 += rows)
    {
      guint64 n = MIN (rows, out - r0);

      lp_dtype_to_f64 (dtype, (const guint8 *) g_bytes_get_data (stored, NULL) + r0 * in * esize,
                       block, n * in);
      for (guint p = 0; p < n_parts; p++)
        {
          const Part *part = &g_array_index (fused->parts, Part, p);
          guint r = lp_lora_module_get_rank (part->module);
          guint64 lo = MAX (r0, part->row), hi = MIN (r0 + n, part->row + part->n_rows);

          if (lo >= hi)
            continue;
          /* block[lo..hi) += factor · B[lo - row..hi - row) @ A */
          cblas_dgemm (CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, in, r, part->factor,
                       b[p] + (lo - part->row) * r, r, a[p], in, 1.0, block + (lo - r0) * in, in);
        }
      if (!lp_lora_all_finite_f64 (block, n * in))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "NaN or infinity in the weight or its fused update");
          goto out;
        }
      overflow += lp_dtype_from_f64 (dtype, block, data + r0 * in * esize, n * in);
    }
  if (overflow > 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "%" G_GSIZE_FORMAT " fused values overflow %s", overflow, lp_dtype_to_string (dtype));
      goto out;
    }
  result = g_bytes_new_take (g_steal_pointer (&data), out * in * esize);

out:
  g_free (data);
  for (guint p = 0; p < n_parts; p++)
    {
      g_free (a[p]);
      g_free (b[p]);
    }
  if (result == NULL)
    g_prefix_error (error, "tensor %s: ", lp_tensor_get_name (weight));
  return result;
}

/* ---- the stage ------------------------------------------------------------------------- */

static LpCheckpoint *
lp_lora_fuse_aggregate (LpAggregator  *aggregator,
                        LpCheckpoint **inputs,
                        guint          n_inputs,
                        GError       **error)
{
  LpLoraFuse *self = LP_LORA_FUSE (aggregator);
  LpCheckpoint *model = inputs[0];
  g_auto (Targets) targets = { NULL, };
  g_autoptr (GHashTable) fused = g_hash_table_new_full (NULL, NULL, NULL, fused_free);
  g_autoptr (GString) unmatched = g_string_new (NULL);
  g_autofree double *strengths = NULL;
  guint n_unmatched = 0, n_modules = 0;

  if (!lp_lora_blas_reserve (LP_STAGE (self), error))
    return NULL;

  if (!parse_strengths (self, n_inputs - 1, &strengths, error))
    return NULL;
  targets_init (&targets, model);

  for (guint i = 1; i < n_inputs; i++)
    {
      g_autoptr (GPtrArray) modules = lp_lora_find_modules_required (inputs[i], NULL, NULL, NULL, error);

      if (modules == NULL)
        {
          g_prefix_error (error, "LoRA %u (input %u): ", i, i + 1);
          return NULL;
        }
      for (guint m = 0; m < modules->len; m++)
        {
          LpLoraModule *module = g_ptr_array_index (modules, m);
          Target target = { NULL, };
          LpTensor *weight = find_target (&targets, module, &target) ? target.weight : NULL;
          guint64 out = weight && lp_tensor_get_n_dims (weight) > 0 ? lp_tensor_get_dim (weight, 0) : 0;
          Fused *entry;
          Part part;

          if (weight == NULL
              || lp_tensor_get_n_dims (weight) != lp_tensor_get_n_dims (lp_lora_module_get_down (module))
              || target.n_rows != lp_lora_module_get_out_features (module)
              || lp_tensor_get_n_elements (weight) / MAX (out, 1) != lp_lora_module_get_in_features (module))
            {
              if (n_unmatched < 8)
                {
                  g_autofree char *shape = weight ? lp_tensor_describe_shape (weight) : NULL;
                  g_string_append_printf (unmatched, "%s%s%s%s%s", n_unmatched ? ", " : "",
                                          lp_lora_module_get_name (module),
                                          weight ? " (weight " : "", weight ? shape : "",
                                          weight ? " has another shape)" : "");
                }
              n_unmatched++;
              continue;
            }
          if (!lp_dtype_is_float (lp_tensor_get_dtype (weight))
              || !lp_dtype_can_convert (lp_tensor_get_dtype (weight)))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "tensor %s: dtype %s cannot take a LoRA update", lp_tensor_get_name (weight),
                           lp_dtype_to_string (lp_tensor_get_dtype (weight)));
              return NULL;
            }
          entry = g_hash_table_lookup (fused, weight);
          if (entry == NULL)
            {
              entry = g_new0 (Fused, 1);
              entry->weight = g_object_ref (weight);
              entry->parts = g_array_new (FALSE, FALSE, sizeof (Part));
              g_hash_table_insert (fused, weight, entry);
            }
          part.module = g_object_ref (module);
          part.factor = strengths[i - 1] * lp_lora_module_get_scale (module);
          part.row = target.row;
          part.n_rows = target.n_rows;
          g_array_append_val (entry->parts, part);
          n_modules++;
        }
    }

  if (n_unmatched > 0 && !self->allow_unmatched)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "%u LoRA modules find no weight of their shape in the model: %s%s "
                   "(allow-unmatched=true leaves them out)", n_unmatched, unmatched->str,
                   n_unmatched > 8 ? " and more" : "");
      return NULL;
    }
  if (n_modules == 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "no LoRA module matches a weight of the model: %s", unmatched->str);
      return NULL;
    }

  g_autoptr (LpCheckpoint) output = lp_checkpoint_new_like (model);
  guint n_weights = g_hash_table_size (fused);
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (model); i++)
    {
      LpTensor *weight = lp_checkpoint_get_tensor (model, i);
      Fused *entry = g_hash_table_lookup (fused, weight);
      g_autoptr (LpTensor) tensor = NULL;
      guint n_dims;
      const guint64 *shape = lp_tensor_get_shape (weight, &n_dims);

      if (entry == NULL)
        {
          if (!lp_checkpoint_add_tensor (output, weight, error))
            return NULL;
          continue;
        }
      g_hash_table_steal (fused, weight);
      tensor = lp_tensor_new_lazy (lp_tensor_get_name (weight), lp_tensor_get_dtype (weight),
                                   shape, n_dims, fused_data, entry, fused_free, error);
      if (tensor == NULL || !lp_checkpoint_add_tensor (output, tensor, error))
        return NULL;
    }

  g_message ("lora-fuse: %u modules of %u LoRA%s fused into %u weights",
             n_modules, n_inputs - 1, n_inputs > 2 ? "s" : "", n_weights);
  if (n_unmatched > 0)
    g_warning ("lora-fuse: %u LoRA modules matched no weight and are left out: %s%s",
               n_unmatched, unmatched->str, n_unmatched > 8 ? " and more" : "");
  return g_steal_pointer (&output);
}

static gboolean
lp_lora_fuse_prepare (LpStage  *stage,
                      GError  **error)
{
  return parse_strengths (LP_LORA_FUSE (stage), 0, NULL, error);
}

static void
lp_lora_fuse_set_property (GObject      *object,
                           guint         prop_id,
                           const GValue *value,
                           GParamSpec   *pspec)
{
  LpLoraFuse *self = LP_LORA_FUSE (object);

  switch (prop_id)
    {
    case PROP_STRENGTHS:
      g_strfreev (self->strengths);
      self->strengths = g_value_dup_boxed (value);
      break;
    case PROP_ALLOW_UNMATCHED: self->allow_unmatched = g_value_get_boolean (value); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_fuse_get_property (GObject    *object,
                           guint       prop_id,
                           GValue     *value,
                           GParamSpec *pspec)
{
  LpLoraFuse *self = LP_LORA_FUSE (object);

  switch (prop_id)
    {
    case PROP_STRENGTHS: g_value_set_boxed (value, self->strengths); break;
    case PROP_ALLOW_UNMATCHED: g_value_set_boolean (value, self->allow_unmatched); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_fuse_finalize (GObject *object)
{
  LpLoraFuse *self = LP_LORA_FUSE (object);

  g_strfreev (self->strengths);
  G_OBJECT_CLASS (lp_lora_fuse_parent_class)->finalize (object);
}

static void
lp_lora_fuse_class_init (LpLoraFuseClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpAggregatorClass *aggregator_class = LP_AGGREGATOR_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_lora_fuse_set_property;
  object_class->get_property = lp_lora_fuse_get_property;
  object_class->finalize = lp_lora_fuse_finalize;
  stage_class->prepare = lp_lora_fuse_prepare;
  aggregator_class->aggregate = lp_lora_fuse_aggregate;

  properties[PROP_STRENGTHS] =
    g_param_spec_boxed ("strengths", "Strengths",
                        "The strength of each LoRA's update, one number per LoRA (default: 1 each)",
                        G_TYPE_STRV, flags);
  properties[PROP_ALLOW_UNMATCHED] =
    g_param_spec_boolean ("allow-unmatched", "Allow unmatched",
                          "Leave out, with a warning, LoRA modules that match no weight (default: an error)",
                          FALSE, flags);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_n_inputs (stage_class, 2, 17);
  lp_stage_class_set_metadata (stage_class, "lora-fuse", "LoRA",
                               "Fuse LoRAs (the inputs after the first) into a model (the first input): "
                               "W + strength · scale · B @ A, rounded once");
}

static void
lp_lora_fuse_init (LpLoraFuse *self)
{
}
