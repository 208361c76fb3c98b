/* lp-lora-scale.c: the `lora-scale` stage, changing a LoRA's strength
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-transform-stages.h"
#include "lp-transform-common.h"

#include <math.h>

/**
 * LpLoraScale:
 *
 * Multiplies the update `scale · B @ A` of every LoRA module whose name
 * matches #LpLoraScale:include (all when empty) and none of
 * #LpLoraScale:exclude by #LpLoraScale:factor.
 *
 * Where the convention keeps an alpha (kohya), the factor goes into it: the
 * `.alpha` tensor becomes `alpha · factor` (a module without one gets
 * `rank · factor`), and the factors are passed on untouched. Elsewhere
 * (diffusers, PEFT, the others) √|factor| is folded into both factors, with
 * the sign on the up factor, so neither factor's magnitude grows lopsided.
 * Other tensors pass through. A factor that would put infinity in a factor
 * of the factors' dtype is an error naming the module and the factor.
 */

struct _LpLoraScale
{
  LpTransform parent_instance;

  double factor;
  GStrv include;
  GStrv exclude;
};

enum {
  PROP_0,
  PROP_FACTOR,
  PROP_INCLUDE,
  PROP_EXCLUDE,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraScale, lp_lora_scale, LP_TYPE_TRANSFORM)

static gboolean
lp_lora_scale_prepare (LpStage  *stage,
                       GError  **error)
{
  LpLoraScale *self = LP_LORA_SCALE (stage);

  if (!isfinite (self->factor))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "factor %g is not a finite number", self->factor);
      return FALSE;
    }
  return TRUE;
}

static LpTensor *
scaled_factor (LpTensor    *factor,
               double       scale,
               const char  *what,
               GError     **error)
{
  const guint64 *shape;
  guint n_dims;
  LpBlock block = { factor, 0, lp_tensor_get_dim (factor, 0), 0, 0, scale, what };

  shape = lp_tensor_get_shape (factor, &n_dims);
  return lp_block_tensor_new (lp_tensor_get_name (factor), lp_tensor_get_dtype (factor),
                              shape, n_dims, &block, 1, error);
}

static LpCheckpoint *
lp_lora_scale_transform (LpTransform   *transform,
                         LpCheckpoint  *input,
                         GError       **error)
{
  LpLoraScale *self = LP_LORA_SCALE (transform);
  g_autoptr(LpCheckpoint) output = NULL;
  g_autoptr(LpNameFilter) filter = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GHashTable) replace = NULL;   /* old tensor -> new tensor */
  g_autoptr(GHashTable) add_after = NULL; /* up factor -> new alpha */
  guint n = lp_checkpoint_get_n_tensors (input);
  guint n_scaled = 0;

  if (!lp_lora_scale_prepare (LP_STAGE (self), error))
    return NULL;

  modules = lp_lora_find_modules_required (input, NULL, NULL, NULL, error);
  if (modules == NULL)
    return NULL;

  filter = lp_name_filter_new ((const char * const *) self->include,
                               (const char * const *) self->exclude);
  replace = g_hash_table_new_full (NULL, NULL, NULL, g_object_unref);
  add_after = g_hash_table_new_full (NULL, NULL, NULL, g_object_unref);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (module);
      LpTensor *down = lp_lora_module_get_down (module);
      LpTensor *up = lp_lora_module_get_up (module);
      LpTensor *alpha = lp_lora_module_get_alpha (module);

      g_autofree char *what = NULL;

      if (!lp_name_filter_matches (filter, name))
        continue;
      n_scaled++;
      what = g_strdup_printf ("module %s, factor %g", name, self->factor);

      if (lp_lora_module_get_convention (module) == LP_LORA_CONVENTION_KOHYA)
        {
          double value = lp_lora_module_get_alpha_value (module) * self->factor;
          g_autofree char *alpha_name = g_strconcat (name, ".alpha", NULL);
          LpTensor *new_alpha;

          if (!isfinite (value))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                           "module %s: alpha %g times factor %g is too large for a number",
                           name, lp_lora_module_get_alpha_value (module), self->factor);
              return NULL;
            }
          new_alpha = lp_alpha_tensor_new (alpha_name,
                                           lp_tensor_get_dtype (alpha != NULL ? alpha : down),
                                           value, error);
          if (new_alpha == NULL)
            return NULL;
          if (alpha != NULL)
            g_hash_table_insert (replace, alpha, new_alpha);
          else
            g_hash_table_insert (add_after, up, new_alpha);
        }
      else
        {
          double root = sqrt (fabs (self->factor));
          LpTensor *new_down = scaled_factor (down, root, what, error);
          LpTensor *new_up;

          if (new_down == NULL)
            return NULL;
          g_hash_table_insert (replace, down, new_down);
          new_up = scaled_factor (up, self->factor < 0 ? -root : root, what, error);
          if (new_up == NULL)
            return NULL;
          g_hash_table_insert (replace, up, new_up);
        }
    }

  if (n_scaled == 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "no LoRA module to scale: the input has %u modules and the globs select none",
                   modules->len);
      return NULL;
    }

  output = lp_checkpoint_new_like (input);
  for (guint i = 0; i < n; i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      LpTensor *replacement = g_hash_table_lookup (replace, tensor);
      LpTensor *extra = g_hash_table_lookup (add_after, tensor);

      if (!lp_checkpoint_add_tensor (output, replacement ? replacement : tensor, error))
        return NULL;
      if (extra != NULL && !lp_checkpoint_add_tensor (output, extra, error))
        return NULL;
    }

  return g_steal_pointer (&output);
}

static void
lp_lora_scale_set_property (GObject      *object,
                            guint         prop_id,
                            const GValue *value,
                            GParamSpec   *pspec)
{
  LpLoraScale *self = LP_LORA_SCALE (object);

  switch (prop_id)
    {
    case PROP_FACTOR:
      self->factor = g_value_get_double (value);
      break;
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
lp_lora_scale_get_property (GObject    *object,
                            guint       prop_id,
                            GValue     *value,
                            GParamSpec *pspec)
{
  LpLoraScale *self = LP_LORA_SCALE (object);

  switch (prop_id)
    {
    case PROP_FACTOR:
      g_value_set_double (value, self->factor);
      break;
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
lp_lora_scale_finalize (GObject *object)
{
  LpLoraScale *self = LP_LORA_SCALE (object);

  g_strfreev (self->include);
  g_strfreev (self->exclude);

  G_OBJECT_CLASS (lp_lora_scale_parent_class)->finalize (object);
}

static void
lp_lora_scale_class_init (LpLoraScaleClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);

  object_class->set_property = lp_lora_scale_set_property;
  object_class->get_property = lp_lora_scale_get_property;
  object_class->finalize = lp_lora_scale_finalize;
  stage_class->prepare = lp_lora_scale_prepare;
  transform_class->transform = lp_lora_scale_transform;

  /**
   * LpLoraScale:factor:
   *
   * What each selected module's update is multiplied by.
   */
  properties[PROP_FACTOR] =
    g_param_spec_double ("factor", "Factor",
                         "Multiply the update of each selected module by this",
                         -G_MAXDOUBLE, G_MAXDOUBLE, 1.0,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpLoraScale:include:
   *
   * Globs of the module names to scale; none means all.
   */
  properties[PROP_INCLUDE] =
    g_param_spec_boxed ("include", "Include",
                        "Scale only modules whose names match one of these globs (default: all)",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpLoraScale:exclude:
   *
   * Globs of the module names to leave as they are.
   */
  properties[PROP_EXCLUDE] =
    g_param_spec_boxed ("exclude", "Exclude",
                        "Leave modules whose names match one of these globs unchanged",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "lora-scale", "LoRA",
                               "Change a LoRA's strength: multiply each module's update by a factor");
  lp_stage_class_set_property_required (stage_class, "factor");
}

static void
lp_lora_scale_init (LpLoraScale *self)
{
  self->factor = 1.0;
}
