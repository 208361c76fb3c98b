/* lp-select.c: the `select` stage, keeping the modules and tensors whose names match
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-transform-stages.h"
#include "lp-transform-common.h"

/**
 * LpSelect:
 *
 * Keeps the parts of a checkpoint whose names match one of #LpSelect:include
 * (all when it is empty) and none of #LpSelect:exclude: `exclude=lora_te*`
 * drops a text encoder, `include=*attn*` keeps attention only.
 *
 * A LoRA module is kept or dropped whole, by its module name (the factors'
 * keys without their suffix: `lora_unet_..._to_q`,
 * `transformer.single_transformer_blocks.0.attn.to_q`), so its down and up
 * factors and its kohya `.alpha` never part; so do a LyCORIS module's
 * `hada_*`/`lokr_*` parts, an mlx-lm module's `lora_a`/`lora_b` and a DoRA
 * magnitude (lp_lora_module_get_tensors()). Other tensors are judged by
 * their own names. The metadata and a PEFT adapter config are kept.
 *
 * Selecting nothing is an error: an empty LoRA is almost always a glob that
 * did not say what was meant.
 */

struct _LpSelect
{
  LpTransform parent_instance;

  GStrv include;
  GStrv exclude;
};

enum {
  PROP_0,
  PROP_INCLUDE,
  PROP_EXCLUDE,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpSelect, lp_select, LP_TYPE_TRANSFORM)

static gboolean
lp_select_prepare (LpStage  *stage,
                   GError  **error)
{
  LpSelect *self = LP_SELECT (stage);

  if ((self->include == NULL || self->include[0] == NULL)
      && (self->exclude == NULL || self->exclude[0] == NULL))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "set 'include' or 'exclude' (or both): with neither the stage "
                           "would keep everything");
      return FALSE;
    }
  return TRUE;
}

static LpCheckpoint *
lp_select_transform (LpTransform   *transform,
                     LpCheckpoint  *input,
                     GError       **error)
{
  LpSelect *self = LP_SELECT (transform);
  g_autoptr(LpCheckpoint) output = NULL;
  g_autoptr(LpNameFilter) filter = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GHashTable) keep = NULL;   /* LpTensor * of kept modules */
  g_autoptr(GHashTable) in_module = NULL;
  guint n = lp_checkpoint_get_n_tensors (input);

  if (!lp_select_prepare (LP_STAGE (self), error))
    return NULL;

  /* any family: a module is kept or dropped by name, whatever its parts */
  modules = lp_lora_find_modules_full (input, NULL, NULL, LP_LORA_FIND_NONE, NULL, error);
  if (modules == NULL)
    return NULL;

  filter = lp_name_filter_new ((const char * const *) self->include,
                               (const char * const *) self->exclude);
  keep = g_hash_table_new (NULL, NULL);
  in_module = g_hash_table_new (NULL, NULL);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autoptr(GPtrArray) parts = lp_lora_module_get_tensors (module);
      gboolean kept = lp_name_filter_matches (filter, lp_lora_module_get_name (module));

      for (guint p = 0; p < parts->len; p++)
        {
          g_hash_table_add (in_module, parts->pdata[p]);
          if (kept)
            g_hash_table_add (keep, parts->pdata[p]);
        }
    }

  output = lp_checkpoint_new_like (input);
  for (guint i = 0; i < n; i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      gboolean kept;

      if (g_hash_table_contains (in_module, tensor))
        kept = g_hash_table_contains (keep, tensor);
      else
        kept = lp_name_filter_matches (filter, lp_tensor_get_name (tensor));
      if (kept && !lp_checkpoint_add_tensor (output, tensor, error))
        return NULL;
    }

  if (lp_checkpoint_get_n_tensors (output) == 0 && n > 0)
    {
      g_autofree char *in_text = self->include ? g_strjoinv (",", self->include) : g_strdup ("");
      g_autofree char *ex_text = self->exclude ? g_strjoinv (",", self->exclude) : g_strdup ("");

      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "nothing selected: none of the %u tensors (%u LoRA modules) matches "
                   "include '%s' without matching exclude '%s'",
                   n, modules->len, in_text, ex_text);
      return NULL;
    }

  return g_steal_pointer (&output);
}

static void
lp_select_set_property (GObject      *object,
                        guint         prop_id,
                        const GValue *value,
                        GParamSpec   *pspec)
{
  LpSelect *self = LP_SELECT (object);

  switch (prop_id)
    {
    case PROP_INCLUDE:
      g_strfreev (self->include);
      self->include = g_value_dup_boxed (value);
      break;
    case PROP_EXCLUDE:
      g_strfreev (self->exclude);
      self->exclude = g_value_dup_boxed (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_select_get_property (GObject    *object,
                        guint       prop_id,
                        GValue     *value,
                        GParamSpec *pspec)
{
  LpSelect *self = LP_SELECT (object);

  switch (prop_id)
    {
    case PROP_INCLUDE:
      g_value_set_boxed (value, self->include);
      break;
    case PROP_EXCLUDE:
      g_value_set_boxed (value, self->exclude);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_select_finalize (GObject *object)
{
  LpSelect *self = LP_SELECT (object);

  g_strfreev (self->include);
  g_strfreev (self->exclude);

  G_OBJECT_CLASS (lp_select_parent_class)->finalize (object);
}

static void
lp_select_class_init (LpSelectClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);

  object_class->set_property = lp_select_set_property;
  object_class->get_property = lp_select_get_property;
  object_class->finalize = lp_select_finalize;
  stage_class->prepare = lp_select_prepare;
  transform_class->transform = lp_select_transform;

  /**
   * LpSelect:include:
   *
   * Globs (`*`, `?`) of the module and tensor names to keep; none means all.
   */
  properties[PROP_INCLUDE] =
    g_param_spec_boxed ("include", "Include",
                        "Keep only LoRA modules and tensors whose names match one of these globs (default: all)",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpSelect:exclude:
   *
   * Globs of the module and tensor names to drop.
   */
  properties[PROP_EXCLUDE] =
    g_param_spec_boxed ("exclude", "Exclude",
                        "Drop LoRA modules and tensors whose names match one of these globs",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "select", "Transform",
                               "Keep the LoRA modules and tensors whose names match globs");
}

static void
lp_select_init (LpSelect *self)
{
}
