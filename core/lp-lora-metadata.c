/* lp-lora-metadata.c: the metadata a LoRA file carries about its own ranks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lora-families/lp-lora-family.h"

#include <math.h>
#include <string.h>

/* Metadata that kohya's tools compute from the file's bytes or its network:
 * stale as soon as the factors change or the file leaves kohya's naming. */
const char *const lp_lora_kohya_hash_keys[] = { "sshs_model_hash", "sshs_legacy_hash", NULL };
static const char *const kohya_network_keys[] = {
  "ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args",
};

/**
 * lp_lora_metadata_converted:
 * @output: a checkpoint converted to another key convention, holding a copy
 *   of the input's metadata
 * @target: the convention it was converted to
 *
 * Drops the metadata that described the file in its old convention or its
 * old factors: kohya's `sshs_*` hashes (the bytes changed), its
 * `ss_network_*` when the target is not kohya, and diffusers'
 * `lora_adapter_metadata` (the LoraConfig diffusers would build instead of
 * reading the factors' shapes) whatever the target, since the modules it
 * names are split, fused or renamed. The converting stages put every
 * module's scale where the target keeps it (a kohya `.alpha`, or into the
 * factors for diffusers, which then infers the config from the shapes,
 * scale 1, as diffusers' own conversions do), so nothing the dropped
 * entries said is lost. lora-merge calls it too: its output's factors
 * carry the weighted scales.
 */
void
lp_lora_metadata_converted (LpCheckpoint     *output,
                            LpLoraConvention  target)
{
  g_return_if_fail (LP_IS_CHECKPOINT (output));

  for (guint i = 0; lp_lora_kohya_hash_keys[i] != NULL; i++)
    lp_checkpoint_set_metadata (output, lp_lora_kohya_hash_keys[i], NULL);
  if (target != LP_LORA_CONVENTION_KOHYA)
    for (guint i = 0; i < G_N_ELEMENTS (kohya_network_keys); i++)
      lp_checkpoint_set_metadata (output, kohya_network_keys[i], NULL);
  lp_checkpoint_set_metadata (output, "lora_adapter_metadata", NULL);
}

#define LORA_ADAPTER_METADATA "lora_adapter_metadata"
#define DOWN_SUFFIX ".lora_A.weight"

/* A rank_pattern / alpha_pattern key as a module name: PEFT's keys are
 * regular expressions, but the ones diffusers writes (module names) and
 * lpipe writes (`^` and the escaped name) are names. NULL for any other
 * expression, which no rule can be applied to. */
static char *
pattern_key_to_name (const char *key,
                     gboolean   *anchored,
                     gboolean   *escaped)
{
  g_autoptr(GString) name = g_string_new (NULL);

  *anchored = key[0] == '^';
  *escaped = FALSE;
  for (const char *p = key + (*anchored ? 1 : 0); *p != '\0'; p++)
    {
      if (*p == '\\' && p[1] != '\0' && strchr (".^$*+?()[]{}|\\-", p[1]) != NULL)
        {
          *escaped = TRUE;
          g_string_append_c (name, *++p);
        }
      else if (*p != '.' && strchr ("^$*+?()[]{}|\\", *p) != NULL)
        return NULL;
      else
        g_string_append_c (name, *p);
    }
  return g_string_free (g_steal_pointer (&name), FALSE);
}

/* A JSON array's string element, NULL for anything else. */
static const char *
string_element (JsonArray *array,
                guint      index)
{
  JsonNode *node = json_array_get_element (array, index);

  return JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING
         ? json_node_get_string (node) : NULL;
}

/* @key renamed as the module it names would be: NULL when it is not a name,
 * or the rules would move that module out of @prefix. */
static char *
rename_pattern_key (const char        *key,
                    const char        *prefix,
                    LpLoraRenameFunc   rename,
                    gpointer           data)
{
  gboolean anchored, escaped;
  g_autofree char *name = pattern_key_to_name (key, &anchored, &escaped);
  g_autofree char *full = NULL;
  g_autofree char *renamed = NULL;
  g_autofree char *middle = NULL;
  gsize len;

  if (name == NULL)
    return NULL;
  full = g_strconcat (prefix, name, DOWN_SUFFIX, NULL);
  renamed = rename (full, data);
  len = renamed ? strlen (renamed) : 0;
  if (renamed == NULL || !g_str_has_prefix (renamed, prefix) || !g_str_has_suffix (renamed, DOWN_SUFFIX)
      || len <= strlen (prefix) + strlen (DOWN_SUFFIX))
    return NULL;
  middle = g_strndup (renamed + strlen (prefix), len - strlen (prefix) - strlen (DOWN_SUFFIX));
  if (escaped)
    {
      g_autofree char *quoted = g_regex_escape_string (middle, -1);
      return g_strconcat (anchored ? "^" : "", quoted, NULL);
    }
  for (const char *p = middle; *p; p++)
    if (*p != '.' && strchr ("^$*+?()[]{}|\\", *p) != NULL)
      return NULL;
  return g_strconcat (anchored ? "^" : "", middle, NULL);
}

/* The component (`transformer.`) of the down factor @name that @metadata
 * describes, and the module's key inside it; FALSE when none does. */
static gboolean
described_module (JsonObject *metadata,
                  const char *name,
                  char      **prefix,
                  char      **key)
{
  const char *dot = strchr (name, '.');
  g_autofree char *r_key = NULL;

  if (dot == NULL || !g_str_has_suffix (name, DOWN_SUFFIX) || dot + 1 > name + strlen (name) - strlen (DOWN_SUFFIX))
    return FALSE;
  *prefix = g_strndup (name, dot - name + 1);
  r_key = g_strconcat (*prefix, "r", NULL);
  if (!json_object_has_member (metadata, r_key))
    {
      g_clear_pointer (prefix, g_free);
      return FALSE;
    }
  *key = g_strndup (dot + 1, strlen (dot + 1) - strlen (DOWN_SUFFIX));
  return TRUE;
}

/* Renames the pattern keys of @prefix's LoraConfig in @metadata through
 * @rename; FALSE (and @metadata half changed) when a key is no name. */
static gboolean
rename_patterns (JsonObject        *metadata,
                 const char        *prefix,
                 LpLoraRenameFunc   rename,
                 gpointer           data,
                 char             **failed)
{
  for (guint i = 0; i < 2; i++)
    {
      g_autofree char *member = g_strconcat (prefix, i == 0 ? "rank_pattern" : "alpha_pattern", NULL);
      JsonNode *node = json_object_get_member (metadata, member);
      g_autoptr(JsonObject) renamed = NULL;
      g_autoptr(GList) keys = NULL;

      if (node == NULL || !JSON_NODE_HOLDS_OBJECT (node))
        continue;
      renamed = json_object_new ();
      keys = json_object_get_members (json_node_get_object (node));
      for (GList *l = keys; l != NULL; l = l->next)
        {
          g_autofree char *key = rename_pattern_key (l->data, prefix, rename, data);

          if (key == NULL || json_object_has_member (renamed, key))
            {
              *failed = g_strdup_printf ("%s key '%s' names no module the rules can rename",
                                         member, (const char *) l->data);
              return FALSE;
            }
          json_object_set_member (renamed, key, json_node_copy (json_object_get_member (json_node_get_object (node),
                                                                                       l->data)));
        }
      json_object_set_object_member (metadata, member, g_steal_pointer (&renamed));
    }

  /* target_modules: a list of module names (or name ends); a regular
   * expression in a string stays, and the check below decides. */
  {
    g_autofree char *member = g_strconcat (prefix, "target_modules", NULL);
    JsonNode *node = json_object_get_member (metadata, member);
    g_autoptr(JsonArray) renamed = NULL;
    JsonArray *targets;

    if (node == NULL || !JSON_NODE_HOLDS_ARRAY (node))
      return TRUE;
    targets = json_node_get_array (node);
    renamed = json_array_new ();
    for (guint j = 0; j < json_array_get_length (targets); j++)
      {
        const char *target = string_element (targets, j);
        g_autofree char *key = target ? rename_pattern_key (target, prefix, rename, data) : NULL;

        if (key == NULL || key[0] == '^')
          {
            *failed = g_strdup_printf ("%s entry '%s' names no module the rules can rename",
                                       member, target ? target : "");
            return FALSE;
          }
        json_array_add_string_element (renamed, key);
      }
    json_object_set_array_member (metadata, member, g_steal_pointer (&renamed));
  }
  return TRUE;
}

/* PEFT's check_target_module_exists for @key: a list matches the name or
 * its end after a dot, a string must match the whole name; no
 * target_modules targets every module the factors name. */
static gboolean
targeted (JsonObject *metadata,
          const char *prefix,
          const char *key)
{
  g_autofree char *member = g_strconcat (prefix, "target_modules", NULL);
  JsonNode *node = json_object_get_member (metadata, member);

  if (node == NULL || JSON_NODE_HOLDS_NULL (node))
    return TRUE;
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING)
    {
      g_autofree char *source = g_strdup_printf ("^(?:%s)$", json_node_get_string (node));
      g_autoptr(GRegex) regex = g_regex_new (source, G_REGEX_DOLLAR_ENDONLY, 0, NULL);
      return regex != NULL && g_regex_match (regex, key, 0, NULL);
    }
  if (!JSON_NODE_HOLDS_ARRAY (node))
    return FALSE;
  for (guint j = 0; j < json_array_get_length (json_node_get_array (node)); j++)
    {
      const char *target = string_element (json_node_get_array (node), j);
      gsize klen = strlen (key), tlen = target ? strlen (target) : 0;

      if (target != NULL && (g_str_equal (key, target)
                             || (klen > tlen && g_str_has_suffix (key, target) && key[klen - tlen - 1] == '.')))
        return TRUE;
    }
  return FALSE;
}

/* diffusers' lora_adapter_metadata after a rename: the pattern keys renamed
 * by the rules, kept when every renamed module then reads the r and alpha
 * it had; NULL with @why set otherwise. */
static char *
renamed_adapter_metadata (const char        *text,
                          LpCheckpoint      *input,
                          LpCheckpoint      *output,
                          LpLoraRenameFunc   rename,
                          gpointer           data,
                          gboolean          *scaled,
                          char             **why)
{
  g_autoptr(JsonParser) old_parser = json_parser_new ();
  g_autoptr(JsonParser) new_parser = json_parser_new ();
  g_autoptr(GHashTable) renamed = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  JsonObject *old_meta, *new_meta;
  JsonNode *root;

  *scaled = FALSE;
  if (!json_parser_load_from_data (old_parser, text, -1, NULL)
      || !json_parser_load_from_data (new_parser, text, -1, NULL)
      || (root = json_parser_get_root (old_parser)) == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      *why = g_strdup ("it is not a JSON object");
      return NULL;
    }
  old_meta = json_node_get_object (root);
  new_meta = json_node_get_object (json_parser_get_root (new_parser));

  /* Whether dropping the entry would change a module's scale. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      g_autofree char *prefix = NULL, *key = NULL;
      LpLoraPeftConfig config;
      double r, alpha;

      if (!described_module (old_meta, name, &prefix, &key))
        continue;
      if (!lp_lora_peft_config_read (&config, old_meta, prefix, LORA_ADAPTER_METADATA, NULL)
          || !lp_lora_peft_config_lookup (&config, LORA_ADAPTER_METADATA, name, key, &r, &alpha, NULL)
          || (config.use_rslora ? alpha / sqrt (r) : alpha / r) != 1.0)
        *scaled = TRUE;
    }

  /* The components whose modules the rules renamed get their keys renamed. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *old_name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      const char *new_name = lp_tensor_get_name (lp_checkpoint_get_tensor (output, i));
      g_autofree char *prefix = NULL;
      g_autofree char *key = NULL;

      if (g_str_equal (old_name, new_name) || !described_module (old_meta, old_name, &prefix, &key))
        continue;
      if (!g_str_has_prefix (new_name, prefix) || !g_str_has_suffix (new_name, DOWN_SUFFIX))
        {
          *why = g_strdup_printf ("the rules move '%s' out of its component '%.*s' (to '%s')", old_name,
                                  (int) strlen (prefix) - 1, prefix, new_name);
          return NULL;
        }
      if (!g_hash_table_contains (renamed, prefix)
          && !rename_patterns (new_meta, prefix, rename, data, why))
        return NULL;
      g_hash_table_add (renamed, g_steal_pointer (&prefix));
    }

  /* Every module must read the same r and alpha as before. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *old_name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      const char *new_name = lp_tensor_get_name (lp_checkpoint_get_tensor (output, i));
      g_autofree char *prefix = NULL, *old_key = NULL, *new_prefix = NULL, *new_key = NULL;
      LpLoraPeftConfig old_config, new_config;
      double old_r, old_alpha, new_r, new_alpha;

      if (!described_module (old_meta, old_name, &prefix, &old_key))
        continue;
      if (!described_module (new_meta, new_name, &new_prefix, &new_key)
          || !lp_lora_peft_config_read (&old_config, old_meta, prefix, LORA_ADAPTER_METADATA, NULL)
          || !lp_lora_peft_config_read (&new_config, new_meta, prefix, LORA_ADAPTER_METADATA, NULL)
          || !lp_lora_peft_config_lookup (&old_config, LORA_ADAPTER_METADATA, old_name, old_key,
                                          &old_r, &old_alpha, NULL)
          || !lp_lora_peft_config_lookup (&new_config, LORA_ADAPTER_METADATA, new_name, new_key,
                                          &new_r, &new_alpha, NULL))
        {
          *why = g_strdup_printf ("module '%s' cannot be read in it", old_name);
          return NULL;
        }
      if (targeted (old_meta, prefix, old_key) != targeted (new_meta, prefix, new_key))
        {
          *why = g_strdup_printf ("its target_modules would %s the renamed module '%s'",
                                  targeted (old_meta, prefix, old_key) ? "leave out" : "take in", new_name);
          return NULL;
        }
      if (old_r != new_r || old_alpha != new_alpha)
        {
          *why = g_strdup_printf ("its patterns would give the renamed module '%s' r %g and lora_alpha %g "
                                  "instead of %g and %g", new_name, new_r, new_alpha, old_r, old_alpha);
          return NULL;
        }
    }

  return lp_lora_diffusers_metadata_to_text (new_meta);
}

/**
 * lp_lora_metadata_renamed:
 * @input: a checkpoint
 * @output: @input with its tensors renamed by rules, in the same order,
 *   holding a copy of @input's metadata
 * @rename: (scope call): applies the rules to a tensor name
 * @data: (closure rename): for @rename
 * @error: return location for a #GError
 *
 * Rewrites the metadata that names modules after a rename by regex rules
 * (the rename stage's `rules`). kohya's `sshs_*` hashes are dropped: they
 * hash the tensors' bytes in the order of their names. diffusers'
 * `lora_adapter_metadata` gets the keys of its `rank_pattern` and
 * `alpha_pattern` renamed by the same rules, each key read as the module
 * name it is; it is kept when every module then reads the r and lora_alpha
 * it read before (PEFT's get_pattern_key on its new name). Otherwise the
 * patterns would give diffusers a wrong LoraConfig: the entry is dropped
 * with a warning when every module's scale was 1 (diffusers then reads the
 * ranks off the factors, as for a file without it), and the rename fails
 * when a module had another scale, which the file would lose.
 *
 * Returns: %TRUE, or %FALSE with @error set
 */
gboolean
lp_lora_metadata_renamed (LpCheckpoint      *input,
                          LpCheckpoint      *output,
                          LpLoraRenameFunc   rename,
                          gpointer           data,
                          GError           **error)
{
  const char *text;
  gboolean changed = FALSE;
  gboolean scaled;
  g_autofree char *why = NULL;
  g_autofree char *rewritten = NULL;

  g_return_val_if_fail (LP_IS_CHECKPOINT (input), FALSE);
  g_return_val_if_fail (LP_IS_CHECKPOINT (output), FALSE);
  g_return_val_if_fail (lp_checkpoint_get_n_tensors (input) == lp_checkpoint_get_n_tensors (output), FALSE);

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input) && !changed; i++)
    changed = !g_str_equal (lp_tensor_get_name (lp_checkpoint_get_tensor (input, i)),
                            lp_tensor_get_name (lp_checkpoint_get_tensor (output, i)));
  if (!changed)
    return TRUE;
  for (guint i = 0; lp_lora_kohya_hash_keys[i] != NULL; i++)
    lp_checkpoint_set_metadata (output, lp_lora_kohya_hash_keys[i], NULL);

  text = lp_checkpoint_get_metadata (input, LORA_ADAPTER_METADATA);
  if (text == NULL)
    return TRUE;
  rewritten = renamed_adapter_metadata (text, input, output, rename, data, &scaled, &why);
  if (rewritten != NULL)
    {
      lp_checkpoint_set_metadata (output, LORA_ADAPTER_METADATA, rewritten);
      return TRUE;
    }
  if (scaled)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "metadata %s: %s, and dropping it would lose the modules' lora_alpha / r scales "
                   "(rename with a preset, which moves the scales into the factors)", LORA_ADAPTER_METADATA, why);
      return FALSE;
    }
  g_warning ("rename: metadata %s dropped: %s (every scale was 1: diffusers reads the ranks off the factors)",
             LORA_ADAPTER_METADATA, why);
  lp_checkpoint_set_metadata (output, LORA_ADAPTER_METADATA, NULL);
  return TRUE;
}
