/* lp-lora-family-peft.c: PEFT LoRA adapters (`adapter_config.json` beside them)
 *
 * Keys as PEFT's get_peft_model_state_dict writes them,
 * `base_model.model.X.lora_A.weight` / `.lora_B.weight`; the scale lives in
 * the config: `lora_alpha / r` (`/ √r` with `use_rslora`), with
 * `rank_pattern` and `alpha_pattern` overriding per module as PEFT's
 * get_pattern_key matches them. The keys are diffusers' too: a diffusers
 * module turns PEFT when the checkpoint carries a PEFT config
 * (lp-lora-family-diffusers.c). After a rank change the config is rewritten
 * so that every module keeps its scale and nothing is folded into factors.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

#include <math.h>
#include <string.h>

/* The module @name's PEFT `(.*\.)?(KEY)$` matching, as PEFT's get_pattern_key:
 * the first key of @patterns (in file order) that matches wins. */
static JsonNode *
peft_pattern_lookup (JsonObject *patterns,
                     const char *key)
{
  g_autoptr(GList) members = NULL;

  if (patterns == NULL)
    return NULL;

  members = json_object_get_members (patterns);
  for (GList *l = members; l != NULL; l = l->next)
    {
      const char *pattern_key = l->data;
      g_autofree char *source = g_strdup_printf ("^(.*\\.)?(%s)$", pattern_key);
      g_autoptr(GRegex) regex = g_regex_new (source, G_REGEX_DOLLAR_ENDONLY, 0, NULL);
      gboolean hit;

      if (regex != NULL)
        hit = g_regex_match (regex, key, 0, NULL);
      else
        {
          /* Not a regular expression: match it as literal text. */
          gsize klen = strlen (key), plen = strlen (pattern_key);
          hit = g_str_equal (key, pattern_key)
                || (klen > plen && g_str_has_suffix (key, pattern_key)
                    && key[klen - plen - 1] == '.');
        }
      if (hit)
        return json_object_get_member (patterns, pattern_key);
    }
  return NULL;
}

typedef struct {
  JsonParser *parser;
  double r;
  double lora_alpha;
  gboolean use_rslora;
  JsonObject *rank_pattern;
  JsonObject *alpha_pattern;
} PeftConfig;

static void
peft_config_clear (PeftConfig *config)
{
  g_clear_object (&config->parser);
}

static void
lp_lora_family_peft_config_free (gpointer config)
{
  peft_config_clear (config);
  g_free (config);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (PeftConfig, peft_config_clear)

/* PEFT's LoraConfig defaults: r = 8, lora_alpha = 8, use_rslora = false. */
static gboolean
peft_config_parse (PeftConfig  *config,
                   const char  *json,
                   GError     **error)
{
  g_autoptr(GError) local_error = NULL;
  JsonNode *root, *node;
  JsonObject *object;

  config->r = 8;
  config->lora_alpha = 8;
  config->parser = json_parser_new ();
  if (!json_parser_load_from_data (config->parser, json, -1, &local_error))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "adapter_config.json: %s", local_error->message);
      return FALSE;
    }
  root = json_parser_get_root (config->parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: not a JSON object");
      return FALSE;
    }
  object = json_node_get_object (root);

  node = json_object_get_member (object, "r");
  if (node != NULL && (!lp_lora_json_get_number (node, &config->r) || config->r < 1
                       || config->r != floor (config->r)))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: \"r\" must be a positive integer");
      return FALSE;
    }
  node = json_object_get_member (object, "lora_alpha");
  if (node != NULL && (!lp_lora_json_get_number (node, &config->lora_alpha)
                       || !isfinite (config->lora_alpha)))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: \"lora_alpha\" must be a number");
      return FALSE;
    }
  node = json_object_get_member (object, "use_rslora");
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node)
      && json_node_get_value_type (node) == G_TYPE_BOOLEAN)
    config->use_rslora = json_node_get_boolean (node);

  for (guint i = 0; i < 2; i++)
    {
      const char *key = i == 0 ? "rank_pattern" : "alpha_pattern";
      JsonObject **pattern = i == 0 ? &config->rank_pattern : &config->alpha_pattern;

      node = json_object_get_member (object, key);
      if (node == NULL || JSON_NODE_HOLDS_NULL (node))
        continue;
      if (!JSON_NODE_HOLDS_OBJECT (node))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "adapter_config.json: \"%s\" must be an object", key);
          return FALSE;
        }
      *pattern = json_node_get_object (node);
    }
  return TRUE;
}

/* The module's r and alpha in @config. */
static gboolean
peft_config_lookup (PeftConfig  *config,
                    const char  *module,
                    const char  *key,
                    double      *r,
                    double      *alpha,
                    GError     **error)
{
  JsonNode *node;

  *r = config->r;
  *alpha = config->lora_alpha;

  node = peft_pattern_lookup (config->rank_pattern, key);
  if (node != NULL && (!lp_lora_json_get_number (node, r) || *r < 1 || *r != floor (*r)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json: its rank_pattern entry is not "
                   "a positive integer", module);
      return FALSE;
    }
  node = peft_pattern_lookup (config->alpha_pattern, key);
  if (node != NULL && (!lp_lora_json_get_number (node, alpha) || !isfinite (*alpha)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json: its alpha_pattern entry is not "
                   "a number", module);
      return FALSE;
    }
  return TRUE;
}

static gboolean
nearly_equal (double a,
              double b)
{
  return fabs (a - b) <= 1e-12 * MAX (fabs (a), fabs (b));
}

/**
 * lp_lora_peft_pattern_key:
 * @module_key: a module's name in the base model, as
 *   lp_lora_module_get_peft_key() gives it
 *
 * The `rank_pattern` / `alpha_pattern` key that selects exactly this module.
 * PEFT's `get_pattern_key` (peft/utils/other.py) matches a key K against a
 * module name with `re.match(r"(.*\.)?(K)$", name)`: the escaped name alone
 * would also select every module whose name ends with `.` and it
 * (`proj_out` selects `blocks.0.proj_out`). A leading `^` inside the group
 * only matches at the start of the name, so `(.*\.)?` must match nothing and
 * the key matches the one module of that exact name.
 *
 * Returns: (transfer full): `^` and the module name, regex-escaped
 */
char *
lp_lora_peft_pattern_key (const char *module_key)
{
  g_autofree char *escaped = NULL;

  g_return_val_if_fail (module_key != NULL, NULL);
  escaped = g_regex_escape_string (module_key, -1);
  return g_strconcat ("^", escaped, NULL);
}

/**
 * lp_lora_update_adapter_config:
 * @json: the text of the input's `adapter_config.json`
 * @modules: (element-type LpLoraModule): the modules, as lp_lora_find_modules()
 *   found them with this config
 * @new_ranks: (array): the new rank of each of @modules
 * @error: return location for a #GError
 *
 * Rewrites a PEFT adapter config for factors of new ranks so that every
 * module's scale stays what it was: module m, reduced from rank r_m to k_m,
 * gets alpha `alpha_m · k_m / r_m` (`alpha_m · √(k_m / r_m)` with
 * `use_rslora`). The factors are written without folding any scale into them.
 *
 * `r` becomes the most common new rank (ties go to the one reached first in
 * @modules), `lora_alpha` the old `lora_alpha` scaled the same way, and
 * `rank_pattern` and `alpha_pattern` are rebuilt to hold exactly the modules
 * that differ from those, keyed by lp_lora_peft_pattern_key() (PEFT matches
 * `(.*\.)?(key)$` and takes the first key that matches, so old, broader keys
 * are not kept, and each new key selects exactly one module). Modules of other
 * conventions are skipped. Other members are kept, in their order.
 *
 * Returns: (transfer full): the new JSON text, or %NULL with @error set
 */
char *
lp_lora_update_adapter_config (const char  *json,
                               GPtrArray   *modules,
                               const guint *new_ranks,
                               GError     **error)
{
  g_auto(PeftConfig) config = { NULL, };
  g_autoptr(GHashTable) counts = NULL;
  JsonObject *root, *rank_pattern, *alpha_pattern;
  guint best_rank = 0, best_count = 0;
  double new_alpha;

  g_return_val_if_fail (json != NULL, NULL);
  g_return_val_if_fail (modules != NULL, NULL);
  g_return_val_if_fail (modules->len == 0 || new_ranks != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!peft_config_parse (&config, json, error))
    return NULL;
  root = json_node_get_object (json_parser_get_root (config.parser));

  counts = g_hash_table_new (NULL, NULL);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      guint count;

      if (module->family != &lp_lora_family_peft)
        continue;
      if (new_ranks[i] == 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: new rank 0", module->name);
          return NULL;
        }
      count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (new_ranks[i]))) + 1;
      g_hash_table_insert (counts, GUINT_TO_POINTER (new_ranks[i]), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best_count = count;
          best_rank = new_ranks[i];
        }
    }
  if (best_count == 0)
    best_rank = config.r;

  new_alpha = config.use_rslora ? config.lora_alpha * sqrt (best_rank / config.r)
                                : config.lora_alpha * best_rank / config.r;

  rank_pattern = json_object_new ();
  alpha_pattern = json_object_new ();
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autofree char *key = NULL;
      double k, alpha;

      if (module->family != &lp_lora_family_peft)
        continue;
      k = new_ranks[i];
      alpha = config.use_rslora ? module->alpha_value * sqrt (k / module->rank)
                                : module->alpha_value * k / module->rank;
      key = lp_lora_peft_pattern_key (module->peft_key);
      if (new_ranks[i] != best_rank)
        json_object_set_int_member (rank_pattern, key, new_ranks[i]);
      if (!nearly_equal (alpha, new_alpha))
        lp_lora_json_set_number (alpha_pattern, key, alpha);
    }

  json_object_set_int_member (root, "r", best_rank);
  lp_lora_json_set_number (root, "lora_alpha", new_alpha);
  json_object_set_object_member (root, "rank_pattern", rank_pattern);
  json_object_set_object_member (root, "alpha_pattern", alpha_pattern);

  return lp_lora_json_to_text (json_parser_get_root (config.parser));
}

/* Any adapter config that is not another family's is PEFT's (PEFT's own
 * have `peft_type`; older tools left it out). */
static gboolean
peft_claim_config (LpLoraFinder  *finder,
                   gboolean      *claimed,
                   GError       **error)
{
  g_autofree PeftConfig *config = g_new0 (PeftConfig, 1);
  const char *json = lp_checkpoint_get_adapter_config (finder->checkpoint);

  if (!peft_config_parse (config, json, error))
    {
      peft_config_clear (config);
      return FALSE;
    }
  finder->config_data = g_steal_pointer (&config);
  finder->config_data_free = lp_lora_family_peft_config_free;
  *claimed = TRUE;
  return TRUE;
}

/* Called by the diffusers family for its modules beside a PEFT config. */
gboolean
lp_lora_family_peft_init_module (LpLoraModule  *module,
                                 LpLoraFinder  *finder,
                                 GError       **error)
{
  PeftConfig *peft = finder->config_data;
  const char *key = module->name;
  double r, alpha;

  if (g_str_has_prefix (key, "base_model.model."))
    key += strlen ("base_model.model.");
  module->family = &lp_lora_family_peft;
  module->convention = LP_LORA_CONVENTION_PEFT;
  module->peft_key = g_strdup (key);
  if (!peft_config_lookup (peft, module->name, key, &r, &alpha, error))
    return FALSE;
  if (r != module->rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json gives rank %g but the factors "
                   "have rank %u", module->name, r, module->rank);
      return FALSE;
    }
  module->alpha_value = alpha;
  module->scale = peft->use_rslora ? alpha / sqrt (r) : alpha / r;
  return TRUE;
}

static gboolean
peft_rewrite (const LpLoraFamily *family,
              LpCheckpoint       *input,
              LpCheckpoint       *output,
              GPtrArray          *modules,
              const guint        *new_ranks,
              GError            **error)
{
  const char *config = lp_checkpoint_get_adapter_config (input);
  g_autofree char *updated = NULL;

  if (config == NULL)
    return TRUE;
  updated = lp_lora_update_adapter_config (config, modules, new_ranks, error);
  if (updated == NULL)
    return FALSE;
  lp_checkpoint_set_adapter_config (output, updated);
  return TRUE;
}

static const LpLoraPart peft_parts[] = {
  { ".lora_A.weight", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora_B.weight", LP_LORA_ROLE_UP, FALSE },
};

/* No suffixes of its own to find modules by: they are diffusers' keys,
 * turned PEFT by the config. */
const LpLoraFamily lp_lora_family_peft = {
  .name = "peft",
  .title = "PEFT",
  .convention = LP_LORA_CONVENTION_PEFT,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = peft_parts,
  .n_parts = 0,
  .claim_config = peft_claim_config,
  .rewrite = peft_rewrite,
};
