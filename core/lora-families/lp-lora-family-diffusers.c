/* lp-lora-family-diffusers.c: diffusers LoRAs saved by save_lora_weights
 *
 * `X.lora_A.weight` / `X.lora_B.weight`, the PEFT names without a config
 * beside them. Beside a PEFT adapter_config.json the same keys are a PEFT
 * adapter (lp-lora-family-peft.c).
 *
 * diffusers' save_lora_weights stores each component's LoraConfig in the
 * safetensors metadata: `lora_adapter_metadata` is the JSON of
 * LoraConfig.to_dict() per component, flattened by _pack_dict_with_prefix
 * (`transformer.r`, `transformer.lora_alpha`, `transformer.rank_pattern`,
 * ...). load_lora_adapter strips the component's prefix and builds the
 * LoraConfig from it (_create_lora_config) instead of reading ranks off the
 * factors' shapes, so a module's scale is PEFT's `lora_alpha / r` with the
 * patterns matched against its name inside the component, and a rank the
 * config does not give fails to load. A module of a component the metadata
 * does not describe has scale 1. After a rank change the metadata is
 * rewritten by PEFT's rule (lp_lora_peft_config_rewrite()), nothing folded.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

#include <math.h>
#include <string.h>

#define LORA_ADAPTER_METADATA "lora_adapter_metadata"

/* The parsed metadata of @checkpoint, NULL when it has none; the text not
 * being a JSON object is an error, as json.loads fails diffusers' load. */
static JsonObject *
parse_metadata (LpCheckpoint  *checkpoint,
                JsonParser   **parser_out,
                GError       **error)
{
  const char *text = lp_checkpoint_get_metadata (checkpoint, LORA_ADAPTER_METADATA);
  g_autoptr(JsonParser) parser = NULL;
  g_autoptr(GError) local_error = NULL;
  JsonNode *root;

  *parser_out = NULL;
  if (text == NULL)
    return NULL;
  parser = json_parser_new ();
  if (!json_parser_load_from_data (parser, text, -1, &local_error))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "metadata %s: %s", LORA_ADAPTER_METADATA, local_error->message);
      return NULL;
    }
  root = json_parser_get_root (parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "metadata %s: not a JSON object", LORA_ADAPTER_METADATA);
      return NULL;
    }
  *parser_out = g_steal_pointer (&parser);
  return json_node_get_object (root);
}

/* "transformer." for `transformer.blocks.0.attn.to_q`, NULL for a name
 * without a component, or whose component the metadata does not describe
 * (no `<component>.r`: diffusers saved no LoraConfig for it). */
static char *
component_prefix (JsonObject *metadata,
                  const char *name)
{
  const char *dot = strchr (name, '.');
  g_autofree char *prefix = NULL;
  g_autofree char *r_key = NULL;

  if (dot == NULL)
    return NULL;
  prefix = g_strndup (name, dot - name + 1);
  r_key = g_strconcat (prefix, "r", NULL);
  return json_object_has_member (metadata, r_key) ? g_steal_pointer (&prefix) : NULL;
}

static gboolean
diffusers_init_module (LpLoraModule  *module,
                       LpLoraFinder  *finder,
                       GError       **error)
{
  g_autofree char *prefix = NULL;
  g_autofree char *where = NULL;
  LpLoraPeftConfig config;
  double r, alpha;

  if (finder->config_family == &lp_lora_family_peft)
    return lp_lora_family_peft_init_module (module, finder, error);

  if (!finder->lora_metadata_read)
    {
      g_autoptr(GError) local_error = NULL;

      finder->lora_metadata_read = TRUE;
      finder->lora_metadata = parse_metadata (finder->checkpoint, &finder->lora_metadata_parser,
                                              &local_error);
      if (local_error != NULL)
        {
          g_propagate_error (error, g_steal_pointer (&local_error));
          return FALSE;
        }
    }
  if (finder->lora_metadata == NULL
      || (prefix = component_prefix (finder->lora_metadata, module->name)) == NULL)
    return TRUE;

  where = g_strdup_printf ("metadata %s (%.*s)", LORA_ADAPTER_METADATA,
                           (int) strlen (prefix) - 1, prefix);
  g_free (module->peft_key);
  module->peft_key = g_strdup (module->name + strlen (prefix));
  if (!lp_lora_peft_config_read (&config, finder->lora_metadata, prefix, where, error)
      || !lp_lora_peft_config_lookup (&config, where, module->name, module->peft_key,
                                      &r, &alpha, error))
    return FALSE;
  if (r != module->rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: %s gives rank %g but the factors have rank %u "
                   "(diffusers would not load it)", module->name, where, r, module->rank);
      return FALSE;
    }
  module->alpha_value = alpha;
  module->scale = config.use_rslora ? alpha / sqrt (r) : alpha / r;
  return TRUE;
}

/* The components of @modules that @metadata describes, in module order. */
static GPtrArray *
components_of (JsonObject *metadata,
               GPtrArray  *modules)
{
  GPtrArray *prefixes = g_ptr_array_new_with_free_func (g_free);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autofree char *prefix = NULL;

      if (module->family != &lp_lora_family_diffusers
          || (prefix = component_prefix (metadata, module->name)) == NULL)
        continue;
      if (!g_ptr_array_find_with_equal_func (prefixes, prefix, g_str_equal, NULL))
        g_ptr_array_add (prefixes, g_steal_pointer (&prefix));
    }
  return prefixes;
}

/* diffusers' write_lora_layers: json.dumps(indent=2, sort_keys=True);
 * also the text lp_lora_metadata_renamed() writes. */
char *
lp_lora_diffusers_metadata_to_text (JsonObject *metadata)
{
  g_autoptr(JsonNode) sorted = json_node_new (JSON_NODE_OBJECT);
  g_autoptr(JsonObject) object = json_object_new ();
  g_autoptr(GList) members = json_object_get_members (metadata);

  members = g_list_sort (members, (GCompareFunc) strcmp);
  for (GList *l = members; l != NULL; l = l->next)
    json_object_set_member (object, l->data, json_node_copy (json_object_get_member (metadata, l->data)));
  json_node_set_object (sorted, object);
  return lp_lora_json_to_text (sorted);
}

static gboolean
diffusers_rewrite (const LpLoraFamily  *family,
                   LpCheckpoint        *input,
                   LpCheckpoint        *output,
                   GPtrArray           *modules,
                   const guint         *new_ranks,
                   GError             **error)
{
  g_autoptr(JsonParser) parser = NULL;
  g_autoptr(GPtrArray) prefixes = NULL;
  g_autofree char *text = NULL;
  JsonObject *metadata;

  if (lp_checkpoint_get_metadata (output, LORA_ADAPTER_METADATA) == NULL)
    return TRUE;
  metadata = parse_metadata (output, &parser, error);
  if (metadata == NULL)
    return FALSE;

  prefixes = components_of (metadata, modules);
  for (guint c = 0; c < prefixes->len; c++)
    {
      const char *prefix = g_ptr_array_index (prefixes, c);
      g_autoptr(GPtrArray) component = g_ptr_array_new ();
      g_autofree guint *ranks = g_new0 (guint, MAX (modules->len, 1));
      g_autofree char *where = g_strdup_printf ("metadata %s", LORA_ADAPTER_METADATA);
      LpLoraPeftConfig config;

      for (guint i = 0; i < modules->len; i++)
        {
          LpLoraModule *module = g_ptr_array_index (modules, i);

          if (module->family != family || !g_str_has_prefix (module->name, prefix)
              || module->peft_key == NULL)
            continue;
          ranks[component->len] = new_ranks[i];
          g_ptr_array_add (component, module);
        }
      if (!lp_lora_peft_config_read (&config, metadata, prefix, where, error))
        return FALSE;
      lp_lora_peft_config_rewrite (metadata, prefix, &config, component, ranks);
    }
  text = lp_lora_diffusers_metadata_to_text (metadata);
  lp_checkpoint_set_metadata (output, LORA_ADAPTER_METADATA, text);
  return TRUE;
}

static const LpLoraPart diffusers_parts[] = {
  { ".lora_A.weight", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora_B.weight", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_diffusers = {
  .name = "diffusers",
  .title = "PEFT or diffusers",
  .convention = LP_LORA_CONVENTION_DIFFUSERS,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = diffusers_parts,
  .n_parts = G_N_ELEMENTS (diffusers_parts),
  .init_module = diffusers_init_module,
  .rewrite = diffusers_rewrite,
};
