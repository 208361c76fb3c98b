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

/* The module @key's entry of @patterns by PEFT's `(.*\.)?(KEY)$` matching,
 * as PEFT's get_pattern_key: the first key (in file order) that matches wins.
 * diffusers' lora_adapter_metadata patterns match the same way. */
JsonNode *
lp_lora_peft_pattern_lookup (JsonObject *patterns,
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
  LpLoraPeftConfig values;
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

/**
 * lp_lora_peft_config_read:
 * @config: (out caller-allocates): what is read
 * @object: a LoraConfig as JSON: PEFT's adapter_config.json, or one
 *   component's part of diffusers' lora_adapter_metadata
 * @prefix: what the keys start with: "" for PEFT, the component and a dot
 *   ("transformer.") in diffusers' metadata, which _pack_dict_with_prefix
 *   flattened
 * @where: what to call @object in errors ("adapter_config.json")
 * @error: return location for a #GError
 *
 * Reads `r`, `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern`
 * with PEFT's LoraConfig defaults (r = 8, lora_alpha = 8, no rslora). The
 * patterns point into @object.
 *
 * Returns: %TRUE, or %FALSE with @error set
 */
gboolean
lp_lora_peft_config_read (LpLoraPeftConfig  *config,
                          JsonObject        *object,
                          const char        *prefix,
                          const char        *where,
                          GError           **error)
{
  g_autofree char *r_key = g_strconcat (prefix, "r", NULL);
  g_autofree char *alpha_key = g_strconcat (prefix, "lora_alpha", NULL);
  g_autofree char *rslora_key = g_strconcat (prefix, "use_rslora", NULL);
  JsonNode *node;

  *config = (LpLoraPeftConfig) { 8, 8, FALSE, NULL, NULL };
  node = json_object_get_member (object, r_key);
  if (node != NULL && (!lp_lora_json_get_number (node, &config->r) || config->r < 1
                       || config->r != floor (config->r)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "%s: \"%s\" must be a positive integer", where, r_key);
      return FALSE;
    }
  node = json_object_get_member (object, alpha_key);
  if (node != NULL && (!lp_lora_json_get_number (node, &config->lora_alpha)
                       || !isfinite (config->lora_alpha)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "%s: \"%s\" must be a number", where, alpha_key);
      return FALSE;
    }
  node = json_object_get_member (object, rslora_key);
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node)
      && json_node_get_value_type (node) == G_TYPE_BOOLEAN)
    config->use_rslora = json_node_get_boolean (node);

  for (guint i = 0; i < 2; i++)
    {
      g_autofree char *key = g_strconcat (prefix, i == 0 ? "rank_pattern" : "alpha_pattern", NULL);
      JsonObject **pattern = i == 0 ? &config->rank_pattern : &config->alpha_pattern;

      node = json_object_get_member (object, key);
      if (node == NULL || JSON_NODE_HOLDS_NULL (node))
        continue;
      if (!JSON_NODE_HOLDS_OBJECT (node))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "%s: \"%s\" must be an object", where, key);
          return FALSE;
        }
      *pattern = json_node_get_object (node);
    }
  return TRUE;
}

static gboolean
peft_config_parse (PeftConfig  *config,
                   const char  *json,
                   GError     **error)
{
  g_autoptr(GError) local_error = NULL;
  JsonNode *root;

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
  return lp_lora_peft_config_read (&config->values, json_node_get_object (root), "",
                                   "adapter_config.json", error);
}

/**
 * lp_lora_peft_config_lookup:
 * @config: a config read by lp_lora_peft_config_read()
 * @where: what to call the config in errors
 * @module: the module's name, for errors
 * @key: the module's name in the model, as PEFT matches the patterns
 * @r: (out): the module's rank
 * @alpha: (out): the module's alpha
 * @error: return location for a #GError
 *
 * The module's r and alpha as PEFT's LoraModel._create_and_replace takes
 * them: the pattern entries get_pattern_key picks, else `r`, `lora_alpha`.
 *
 * Returns: %TRUE, or %FALSE with @error set
 */
gboolean
lp_lora_peft_config_lookup (const LpLoraPeftConfig  *config,
                            const char              *where,
                            const char              *module,
                            const char              *key,
                            double                  *r,
                            double                  *alpha,
                            GError                 **error)
{
  JsonNode *node;

  *r = config->r;
  *alpha = config->lora_alpha;

  node = lp_lora_peft_pattern_lookup (config->rank_pattern, key);
  if (node != NULL && (!lp_lora_json_get_number (node, r) || *r < 1 || *r != floor (*r)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: %s: its rank_pattern entry is not "
                   "a positive integer", module, where);
      return FALSE;
    }
  node = lp_lora_peft_pattern_lookup (config->alpha_pattern, key);
  if (node != NULL && (!lp_lora_json_get_number (node, alpha) || !isfinite (*alpha)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: %s: its alpha_pattern entry is not "
                   "a number", module, where);
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
  g_autoptr(GPtrArray) peft = g_ptr_array_new ();
  g_autofree guint *peft_ranks = g_new0 (guint, MAX (modules->len, 1));

  g_return_val_if_fail (json != NULL, NULL);
  g_return_val_if_fail (modules != NULL, NULL);
  g_return_val_if_fail (modules->len == 0 || new_ranks != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!peft_config_parse (&config, json, error))
    return NULL;
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      if (module->family != &lp_lora_family_peft)
        continue;
      if (new_ranks[i] == 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: new rank 0", module->name);
          return NULL;
        }
      peft_ranks[peft->len] = new_ranks[i];
      g_ptr_array_add (peft, module);
    }
  lp_lora_peft_config_rewrite (json_node_get_object (json_parser_get_root (config.parser)), "",
                               &config.values, peft, peft_ranks);
  return lp_lora_json_to_text (json_parser_get_root (config.parser));
}

/**
 * lp_lora_peft_config_rewrite:
 * @object: the LoraConfig as JSON, rewritten in place
 * @prefix: what its keys start with, as for lp_lora_peft_config_read()
 * @config: what lp_lora_peft_config_read() read from @object
 * @modules: (element-type LpLoraModule): the modules @object configures,
 *   each with its peft_key (its name in the model) and alpha_value
 * @new_ranks: (array): the new rank of each of @modules
 *
 * The rule of lp_lora_update_adapter_config(), on a config already read:
 * `r` the most common new rank, `lora_alpha` scaled to it, `rank_pattern`
 * and `alpha_pattern` rebuilt with a ^-anchored key for each module that
 * differs, so that every module keeps its scale.
 */
void
lp_lora_peft_config_rewrite (JsonObject             *object,
                             const char             *prefix,
                             const LpLoraPeftConfig *config,
                             GPtrArray              *modules,
                             const guint            *new_ranks)
{
  g_autoptr(GHashTable) counts = g_hash_table_new (NULL, NULL);
  JsonObject *rank_pattern, *alpha_pattern;
  guint best_rank = 0, best_count = 0;
  double new_alpha;

  for (guint i = 0; i < modules->len; i++)
    {
      guint count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (new_ranks[i]))) + 1;

      g_hash_table_insert (counts, GUINT_TO_POINTER (new_ranks[i]), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best_count = count;
          best_rank = new_ranks[i];
        }
    }
  if (best_count == 0)
    best_rank = config->r;

  new_alpha = config->use_rslora ? config->lora_alpha * sqrt (best_rank / config->r)
                                 : config->lora_alpha * best_rank / config->r;

  rank_pattern = json_object_new ();
  alpha_pattern = json_object_new ();
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autofree char *key = NULL;
      double k, alpha;

      k = new_ranks[i];
      alpha = config->use_rslora ? module->alpha_value * sqrt (k / module->rank)
                                 : module->alpha_value * k / module->rank;
      key = lp_lora_peft_pattern_key (module->peft_key);
      if (new_ranks[i] != best_rank)
        json_object_set_int_member (rank_pattern, key, new_ranks[i]);
      if (!nearly_equal (alpha, new_alpha))
        lp_lora_json_set_number (alpha_pattern, key, alpha);
    }

  g_autofree char *r_key = g_strconcat (prefix, "r", NULL);
  g_autofree char *alpha_key = g_strconcat (prefix, "lora_alpha", NULL);
  g_autofree char *rank_pattern_key = g_strconcat (prefix, "rank_pattern", NULL);
  g_autofree char *alpha_pattern_key = g_strconcat (prefix, "alpha_pattern", NULL);

  json_object_set_int_member (object, r_key, best_rank);
  lp_lora_json_set_number (object, alpha_key, new_alpha);
  json_object_set_object_member (object, rank_pattern_key, rank_pattern);
  json_object_set_object_member (object, alpha_pattern_key, alpha_pattern);
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
  if (!lp_lora_peft_config_lookup (&peft->values, "adapter_config.json", module->name, key,
                                   &r, &alpha, error))
    return FALSE;
  if (r != module->rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json gives rank %g but the factors "
                   "have rank %u", module->name, r, module->rank);
      return FALSE;
    }
  module->alpha_value = alpha;
  module->scale = peft->values.use_rslora ? alpha / sqrt (r) : alpha / r;
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
