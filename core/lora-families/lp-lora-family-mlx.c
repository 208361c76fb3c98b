/* lp-lora-family-mlx.c: mlx-lm LoRA adapters (adapters.safetensors and the
 * adapter_config.json mlx_lm.lora writes beside it)
 *
 * mlx_lm/tuner/lora.py LoRALinear keeps `lora_a` [in, r] and `lora_b`
 * [r, out] and computes y + scale · (x @ lora_a) @ lora_b, so the update of
 * the weight [out, in] is scale · (lora_a @ lora_b)ᵀ: transposed against
 * PEFT. mlx_lm/tuner/utils.py linear_to_lora_layers builds each layer from
 * the config's `lora_parameters` (`rank`, `scale`, and in some versions an
 * `alpha`, whose LoRALinear sets scale · alpha / rank); mlx_lm.lora's
 * defaults are rank 8 and scale 20. mlx writes `"__metadata__": null`.
 *
 * The scale lives in the config, so a rank change folds nothing into the
 * factors and rewrites `lora_parameters.rank` (and `alpha`, to keep
 * alpha / rank) instead.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

#include <math.h>

/* mlx_lm.lora's CONFIG_DEFAULTS lora_parameters */
#define MLX_DEFAULT_RANK 8
#define MLX_DEFAULT_SCALE 20.0

typedef struct {
  double rank;
  double scale;
  double alpha;
  gboolean has_alpha;
} MlxConfig;

static gboolean
mlx_read_number (JsonObject  *parameters,
                 const char  *key,
                 double      *value,
                 gboolean    *present,
                 GError     **error)
{
  JsonNode *node = json_object_get_member (parameters, key);

  if (node == NULL)
    return TRUE;
  if (!lp_lora_json_get_number (node, value) || !isfinite (*value)
      || (g_str_equal (key, "rank") && (*value < 1 || *value != floor (*value))))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "adapter_config.json (mlx-lm): lora_parameters.%s must be a %s", key,
                   g_str_equal (key, "rank") ? "positive integer" : "number");
      return FALSE;
    }
  if (present != NULL)
    *present = TRUE;
  return TRUE;
}

/* mlx-lm's config has a `lora_parameters` object; PEFT's never does. */
static gboolean
mlx_claim_config (LpLoraFinder  *finder,
                  gboolean      *claimed,
                  GError       **error)
{
  g_autofree MlxConfig *config = NULL;
  JsonNode *node = json_object_get_member (finder->config, "lora_parameters");
  JsonObject *parameters;

  if (node == NULL)
    return TRUE;
  if (!JSON_NODE_HOLDS_OBJECT (node))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json (mlx-lm): lora_parameters must be an object");
      return FALSE;
    }
  parameters = json_node_get_object (node);
  config = g_new0 (MlxConfig, 1);
  config->rank = MLX_DEFAULT_RANK;
  config->scale = MLX_DEFAULT_SCALE;
  if (!mlx_read_number (parameters, "rank", &config->rank, NULL, error)
      || !mlx_read_number (parameters, "scale", &config->scale, NULL, error)
      || !mlx_read_number (parameters, "alpha", &config->alpha, &config->has_alpha, error))
    return FALSE;
  finder->config_data = g_steal_pointer (&config);
  finder->config_data_free = g_free;
  *claimed = TRUE;
  return TRUE;
}

static gboolean
mlx_init_module (LpLoraModule  *module,
                 LpLoraFinder  *finder,
                 GError       **error)
{
  MlxConfig defaults = { MLX_DEFAULT_RANK, MLX_DEFAULT_SCALE, 0, FALSE };
  const MlxConfig *config = finder->config_family == &lp_lora_family_mlx
                            ? finder->config_data : &defaults;

  /* LoRALinear's scale: scale, or scale · alpha / r with an alpha, r the
   * config's rank (the one the layer was built with). */
  module->scale = config->has_alpha ? config->scale * config->alpha / config->rank
                                    : config->scale;
  module->alpha_value = module->scale * module->rank;
  return TRUE;
}

static gboolean
mlx_rewrite (const LpLoraFamily *family,
             LpCheckpoint       *input,
             LpCheckpoint       *output,
             GPtrArray          *modules,
             const guint        *new_ranks,
             GError            **error)
{
  const char *json = lp_checkpoint_get_adapter_config (input);
  g_autoptr(JsonParser) parser = json_parser_new ();
  g_autofree char *text = NULL;
  JsonObject *parameters;
  gboolean uniform;
  guint rank = lp_lora_most_common_rank (modules, family, new_ranks, &uniform);
  double old_rank = MLX_DEFAULT_RANK, alpha = 0;
  gboolean has_alpha = FALSE;

  if (json == NULL || rank == 0)
    return TRUE;
  if (!json_parser_load_from_data (parser, json, -1, error))
    return FALSE;
  /* the finder parsed and claimed this same text */
  parameters = json_object_get_object_member (json_node_get_object (json_parser_get_root (parser)),
                                              "lora_parameters");
  if (!mlx_read_number (parameters, "rank", &old_rank, NULL, error)
      || !mlx_read_number (parameters, "alpha", &alpha, &has_alpha, error))
    return FALSE;
  if (has_alpha && !uniform)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "adapter_config.json (mlx-lm): its lora_parameters.alpha makes the "
                   "scale alpha / rank with one rank for every layer, so modules of "
                   "different new ranks would change scale; reduce to one rank (rank=K, "
                   "or pad=true)");
      return FALSE;
    }
  json_object_set_int_member (parameters, "rank", rank);
  if (has_alpha)
    lp_lora_json_set_number (parameters, "alpha", alpha * rank / old_rank);
  text = lp_lora_json_to_text (json_parser_get_root (parser));
  lp_checkpoint_set_adapter_config (output, text);
  return TRUE;
}

static const LpLoraPart mlx_parts[] = {
  { ".lora_a", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora_b", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_mlx = {
  .name = "mlx",
  .title = "mlx-lm",
  .convention = LP_LORA_CONVENTION_MLX,
  .layout = LP_LORA_LAYOUT_TRANSPOSED,
  .parts = mlx_parts,
  .n_parts = G_N_ELEMENTS (mlx_parts),
  .claim_config = mlx_claim_config,
  .init_module = mlx_init_module,
  .rewrite = mlx_rewrite,
};
