/* lp-lora-project.c: the `lora-project` stage, the seed's random projection
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-math.h"
#include "lp-lora-blas.h"

#include <math.h>

/**
 * LpLoraProject:
 *
 * Reduces every LoRA module to rank k with a random k × r matrix R, as the
 * originating write-up does: A' = R A and B' = B Rᵀ, computed in f32. Since
 * E[Rᵀ R] = I the update is kept on average, not optimally; it is cheap and
 * needs no decomposition. R is drawn from (seed, module name), so the same
 * seed gives the same bytes on any number of threads, and each factor is
 * computed on its own. Modules of rank k or less pass through unchanged.
 */
struct _LpLoraProject
{
  LpTransform parent_instance;

  guint rank;
  LpLoraProjection projection;
  guint64 seed;
  char *down_pattern;
  char *up_pattern;
  LpLoraDoraPolicy dora;
};

enum {
  PROP_0,
  PROP_RANK,
  PROP_PROJECTION,
  PROP_SEED,
  PROP_DOWN_PATTERN,
  PROP_UP_PATTERN,
  PROP_DORA,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraProject, lp_lora_project, LP_TYPE_TRANSFORM)

G_DEFINE_ENUM_TYPE (LpLoraProjection, lp_lora_projection,
  G_DEFINE_ENUM_VALUE (LP_LORA_PROJECTION_GAUSSIAN, "gaussian"),
  G_DEFINE_ENUM_VALUE (LP_LORA_PROJECTION_SPARSE, "sparse"))

typedef struct {
  LpLoraModule *module;
  gboolean up;
  guint k;
  gboolean sparse;
  guint64 seed;
} Factor;

static void
factor_free (gpointer data)
{
  Factor *factor = data;
  g_object_unref (factor->module);
  g_free (factor);
}

static GBytes *
project_data (LpTensor  *tensor,
              gpointer   user_data,
              GError   **error)
{
  Factor *factor = user_data;
  LpLoraModule *module = factor->module;
  LpTensor *source = factor->up ? lp_lora_module_get_up (module) : lp_lora_module_get_down (module);
  guint r = lp_lora_module_get_rank (module), k = factor->k;
  guint64 in = lp_lora_module_get_in_features (module);
  guint64 out = lp_lora_module_get_out_features (module);
  double fold = lp_lora_module_get_fold_scale (module);
  LpLoraRng rng;
  gsize overflow;

  g_autoptr (GBytes) data = lp_tensor_dup_data (source, error);
  if (data == NULL)
    return NULL;

  /* the same R for both factors: the stream of (seed, module name) */
  g_autofree float *proj = lp_try_alloc ((gsize) k * r, sizeof (float), "the projection matrix", error);
  if (proj == NULL)
    {
      lp_lora_prefix_error (error, module);
      return NULL;
    }
  lp_lora_rng_init (&rng, factor->seed, lp_lora_module_get_name (module));
  lp_lora_projection_matrix (&rng, factor->sparse, k, r, proj);

  /* a kohya alpha / r is folded into both factors as √|fold|, its sign on B */
  float root = sqrt (fabs (fold));
  float alpha = factor->up && fold < 0 ? -root : root;

  /* read in the stored dtype a block at a time, written in the tensor's */
  LpDtype dtype = lp_tensor_get_dtype (tensor);
  gsize size = lp_tensor_get_n_bytes (tensor);
  gpointer result = lp_try_alloc (size, 1, "the projected factor", error);
  if (result == NULL)
    {
      lp_lora_prefix_error (error, module);
      return NULL;
    }
  if (!lp_lora_project_factor (factor->up, lp_tensor_get_dtype (source), g_bytes_get_data (data, NULL),
                               out, in, r, proj, k, alpha, dtype, result, &overflow))
    {
      g_free (result);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "module %s: NaN or infinity in the %s factor",
                   lp_lora_module_get_name (module), factor->up ? "up" : "down");
      return NULL;
    }
  if (!lp_lora_check_overflow (overflow, dtype, error))
    {
      g_free (result);
      lp_lora_prefix_error (error, module);
      return NULL;
    }
  return g_bytes_new_take (result, size);
}

static LpTensor *
new_factor (LpLoraProject *self,
            LpLoraModule  *module,
            gboolean       up,
            GError       **error)
{
  guint64 shape[LP_TENSOR_MAX_DIMS];
  guint n_dims;
  LpTensor *source = up ? lp_lora_module_get_up (module) : lp_lora_module_get_down (module);
  Factor *factor = g_new (Factor, 1);

  factor->module = g_object_ref (module);
  factor->up = up;
  factor->k = self->rank;
  factor->sparse = self->projection == LP_LORA_PROJECTION_SPARSE;
  factor->seed = self->seed;
  lp_lora_module_new_factor_shape (module, up, self->rank, shape, &n_dims);
  return lp_tensor_new_lazy (lp_tensor_get_name (source), lp_tensor_get_dtype (source),
                             shape, n_dims, project_data, factor, factor_free, error);
}

static LpCheckpoint *
lp_lora_project_transform (LpTransform   *transform,
                           LpCheckpoint  *input,
                           GError       **error)
{
  LpLoraProject *self = LP_LORA_PROJECT (transform);
  g_autoptr (GPtrArray) modules = NULL;
  LpCheckpoint *output = NULL;

  if (!lp_lora_blas_reserve (LP_STAGE (self), error))
    return NULL;

  /* mlx-lm modules are written back in their layout by lp_lora_assemble () */
  modules = lp_lora_find_modules_full (input, self->down_pattern, self->up_pattern,
                                       LP_LORA_FIND_REQUIRE_MODULES | LP_LORA_FIND_PLAIN, NULL, error);
  if (modules == NULL || !lp_lora_apply_dora_policy (LP_STAGE (self), self->dora, modules, error))
    return NULL;

  guint n = modules->len;
  g_autofree guint *new_ranks = g_new0 (guint, n);
  g_autofree char *hint = g_strdup_printf ("lora-project does not pad; lora-svd rank=%u pad=true does",
                                           self->rank);

  lp_lora_warn_rank_kept (LP_STAGE (self), modules, self->rank, hint);
  LpTensor **new_down = g_new0 (LpTensor *, n);
  LpTensor **new_up = g_new0 (LpTensor *, n);
  LpTensor **new_alpha = g_new0 (LpTensor *, n);

  for (guint m = 0; m < n; m++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, m);
      guint r = lp_lora_module_get_rank (module);

      new_ranks[m] = MIN (r, self->rank);
      if (r <= self->rank)
        continue;
      new_down[m] = new_factor (self, module, FALSE, error);
      new_up[m] = new_down[m] ? new_factor (self, module, TRUE, error) : NULL;
      if (new_up[m] == NULL)
        goto out;
      new_alpha[m] = lp_lora_module_new_alpha (module, self->rank);
    }

  output = lp_lora_assemble (input, modules, new_down, new_up, new_alpha, new_ranks, error);

out:
  for (guint m = 0; m < n; m++)
    {
      g_clear_object (&new_down[m]);
      g_clear_object (&new_up[m]);
      g_clear_object (&new_alpha[m]);
    }
  g_free (new_down);
  g_free (new_up);
  g_free (new_alpha);
  return output;
}

static void
lp_lora_project_set_property (GObject      *object,
                              guint         prop_id,
                              const GValue *value,
                              GParamSpec   *pspec)
{
  LpLoraProject *self = LP_LORA_PROJECT (object);

  switch (prop_id)
    {
    case PROP_RANK: self->rank = g_value_get_uint (value); break;
    case PROP_PROJECTION: self->projection = g_value_get_enum (value); break;
    case PROP_SEED: self->seed = g_value_get_uint64 (value); break;
    case PROP_DORA: self->dora = g_value_get_enum (value); break;
    case PROP_DOWN_PATTERN:
      g_free (self->down_pattern);
      self->down_pattern = g_value_dup_string (value);
      break;
    case PROP_UP_PATTERN:
      g_free (self->up_pattern);
      self->up_pattern = g_value_dup_string (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_project_get_property (GObject    *object,
                              guint       prop_id,
                              GValue     *value,
                              GParamSpec *pspec)
{
  LpLoraProject *self = LP_LORA_PROJECT (object);

  switch (prop_id)
    {
    case PROP_RANK: g_value_set_uint (value, self->rank); break;
    case PROP_PROJECTION: g_value_set_enum (value, self->projection); break;
    case PROP_SEED: g_value_set_uint64 (value, self->seed); break;
    case PROP_DORA: g_value_set_enum (value, self->dora); break;
    case PROP_DOWN_PATTERN: g_value_set_string (value, self->down_pattern); break;
    case PROP_UP_PATTERN: g_value_set_string (value, self->up_pattern); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_project_finalize (GObject *object)
{
  LpLoraProject *self = LP_LORA_PROJECT (object);

  g_free (self->down_pattern);
  g_free (self->up_pattern);
  G_OBJECT_CLASS (lp_lora_project_parent_class)->finalize (object);
}

static void
lp_lora_project_class_init (LpLoraProjectClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_lora_project_set_property;
  object_class->get_property = lp_lora_project_get_property;
  object_class->finalize = lp_lora_project_finalize;
  transform_class->transform = lp_lora_project_transform;

  properties[PROP_RANK] =
    g_param_spec_uint ("rank", "Rank", "The rank to project every module to",
                       1, 65536, 4, flags);
  properties[PROP_PROJECTION] =
    g_param_spec_enum ("projection", "Projection", "gaussian (N(0, 1/k)) or sparse (Achlioptas)",
                       LP_TYPE_LORA_PROJECTION, LP_LORA_PROJECTION_GAUSSIAN, flags);
  properties[PROP_SEED] =
    g_param_spec_uint64 ("seed", "Seed", "Seed of the projections (each module draws from (seed, name))",
                         0, G_MAXUINT64, 0, flags);
  properties[PROP_DOWN_PATTERN] = lp_lora_pattern_pspec (FALSE);
  properties[PROP_UP_PATTERN] = lp_lora_pattern_pspec (TRUE);
  properties[PROP_DORA] = lp_lora_dora_pspec ();
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_property_required (stage_class, "rank");
  lp_stage_class_set_metadata (stage_class, "lora-project", "LoRA",
                               "Reduce the rank of every LoRA module with a random projection");
}

static void
lp_lora_project_init (LpLoraProject *self)
{
  self->rank = 4;
  self->projection = LP_LORA_PROJECTION_GAUSSIAN;
}
