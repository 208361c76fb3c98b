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
#define ADAPTER_CONFIG "adapter_config.json"
#define DOWN_SUFFIX ".lora_A.weight"
#define PEFT_PREFIX "base_model.model."

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

static const char *
node_string (JsonNode *node)
{
  return node != NULL && JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING
         ? json_node_get_string (node) : NULL;
}

/* The LoraConfig member @name (`target_modules`) under @prefix; NULL when
 * absent or null, as PEFT reads both. */
static JsonNode *
config_member (JsonObject *config,
               const char *prefix,
               const char *name)
{
  g_autofree char *key = g_strconcat (prefix, name, NULL);
  JsonNode *node = json_object_get_member (config, key);

  return node == NULL || JSON_NODE_HOLDS_NULL (node) ? NULL : node;
}

/* @key renamed as the module it names would be: NULL when it is not a name,
 * or the rules would move that module out of @name_prefix (the part of the
 * tensor names before the module's name in the config). */
static char *
rename_pattern_key (const char        *key,
                    const char        *name_prefix,
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
  full = g_strconcat (name_prefix, name, DOWN_SUFFIX, NULL);
  renamed = rename (full, data);
  len = renamed ? strlen (renamed) : 0;
  if (renamed == NULL || !g_str_has_prefix (renamed, name_prefix) || !g_str_has_suffix (renamed, DOWN_SUFFIX)
      || len <= strlen (name_prefix) + strlen (DOWN_SUFFIX))
    return NULL;
  middle = g_strndup (renamed + strlen (name_prefix), len - strlen (name_prefix) - strlen (DOWN_SUFFIX));
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

/* Whether the down factor @name is a module that @config describes: in
 * PEFT's adapter_config.json (@peft) every `[base_model.model.]X.lora_A.weight`,
 * its keys unprefixed; in diffusers' lora_adapter_metadata a
 * `component.X.lora_A.weight` whose component has a `component.r`. Sets the
 * prefix of the config's keys (`transformer.`, or ""), the part of the
 * tensor name before the module's name in the model, and that name. */
static gboolean
described_module (gboolean    peft,
                  JsonObject *config,
                  const char *name,
                  char      **member_prefix,
                  char      **name_prefix,
                  char      **key)
{
  gsize len = strlen (name), start;

  if (!g_str_has_suffix (name, DOWN_SUFFIX))
    return FALSE;
  if (peft)
    start = g_str_has_prefix (name, PEFT_PREFIX) ? strlen (PEFT_PREFIX) : 0;
  else
    {
      const char *dot = strchr (name, '.');
      g_autofree char *component = dot ? g_strndup (name, dot - name + 1) : NULL;
      g_autofree char *r_key = component ? g_strconcat (component, "r", NULL) : NULL;

      if (dot == NULL || !json_object_has_member (config, r_key))
        return FALSE;
      start = dot - name + 1;
    }
  if (len <= start + strlen (DOWN_SUFFIX))
    return FALSE;
  *name_prefix = g_strndup (name, start);
  *member_prefix = peft ? g_strdup ("") : g_strdup (*name_prefix);
  *key = g_strndup (name + start, len - start - strlen (DOWN_SUFFIX));
  return TRUE;
}

/* The modules one LoraConfig describes, by their names in the model
 * before and after the rules. */
typedef struct {
  char *name_prefix;
  GPtrArray *old_keys;
  GPtrArray *new_keys;
  gboolean renamed;
} Scope;

static void
scope_free (Scope *scope)
{
  g_free (scope->name_prefix);
  g_ptr_array_unref (scope->old_keys);
  g_ptr_array_unref (scope->new_keys);
  g_free (scope);
}

/* Whether the entry @entry selects the module @key: a list entry (@list)
 * by PEFT's check_target_module_exists (the name, or its end after a dot),
 * a pattern key by get_pattern_key's `(.*\.)?(KEY)$`. */
static gboolean
entry_selects (const char *entry,
               const char *key,
               gboolean    list)
{
  gsize klen = strlen (key), elen = strlen (entry);
  g_autofree char *source = NULL;
  g_autoptr(GRegex) regex = NULL;

  if (list)
    return g_str_equal (key, entry)
           || (klen > elen && g_str_has_suffix (key, entry) && key[klen - elen - 1] == '.');
  source = g_strdup_printf ("^(.*\\.)?(%s)$", entry);
  regex = g_regex_new (source, G_REGEX_DOLLAR_ENDONLY, 0, NULL);
  return regex != NULL && g_regex_match (regex, key, 0, NULL);
}

/* Whether @new_entry selects the renamed modules @old_entry selected. */
static gboolean
selects_same (const char  *old_entry,
              const char  *new_entry,
              const Scope *scope,
              gboolean     list)
{
  for (guint i = 0; i < scope->old_keys->len; i++)
    if (entry_selects (old_entry, scope->old_keys->pdata[i], list)
        != entry_selects (new_entry, scope->new_keys->pdata[i], list))
      return FALSE;
  return TRUE;
}

/* An unanchored entry names the end of the modules it selects: as renamed,
 * the same number of name parts at the end of the renamed modules it
 * selected, when they all end alike (`q_proj` of `model.layers.0.q_proj`,
 * which rules on the whole name moved to `wrapped.model.layers.0.q_proj`). */
static char *
renamed_end (const char  *entry,
             const Scope *scope,
             gboolean     list)
{
  gboolean anchored, escaped;
  g_autofree char *name = list ? g_strdup (entry) : pattern_key_to_name (entry, &anchored, &escaped);
  g_autofree char *end = NULL;
  guint n_parts = 1;

  if (name == NULL || (!list && anchored))
    return NULL;
  for (const char *p = name; *p; p++)
    n_parts += *p == '.';
  for (guint i = 0; i < scope->old_keys->len; i++)
    {
      const char *key = scope->new_keys->pdata[i];
      const char *start = key + strlen (key);
      guint parts = 0;

      if (!entry_selects (entry, scope->old_keys->pdata[i], list))
        continue;
      while (start > key && parts < n_parts)
        if (*--start == '.' && ++parts == n_parts)
          start++;
      if (end != NULL && !g_str_equal (end, start))
        return NULL;
      if (end == NULL)
        end = g_strdup (start);
    }
  if (end == NULL)
    return NULL;
  if (!list && escaped)
    return g_regex_escape_string (end, -1);
  for (const char *p = end; !list && *p; p++)
    if (*p != '.' && strchr ("^$*+?()[]{}|\\", *p) != NULL)
      return NULL;
  return g_steal_pointer (&end);
}

/* @entry renamed: by the rules, as the module name it is, or else as the
 * end of the names it selects; NULL when neither selects the renamed
 * modules it selected. */
static char *
rename_entry (const char        *entry,
              const Scope       *scope,
              gboolean           list,
              LpLoraRenameFunc   rename,
              gpointer           data)
{
  g_autofree char *by_rules = rename_pattern_key (entry, scope->name_prefix, rename, data);
  g_autofree char *by_end = NULL;

  if (by_rules != NULL && (!list || by_rules[0] != '^') && selects_same (entry, by_rules, scope, list))
    return g_steal_pointer (&by_rules);
  by_end = renamed_end (entry, scope, list);
  if (by_end != NULL && selects_same (entry, by_end, scope, list))
    return g_steal_pointer (&by_end);
  return NULL;
}

/* Renames the pattern keys and module lists of @member_prefix's LoraConfig
 * in @config; FALSE (and @config half changed) when an entry cannot be. */
static gboolean
rename_patterns (JsonObject        *config,
                 const char        *member_prefix,
                 const Scope       *scope,
                 LpLoraRenameFunc   rename,
                 gpointer           data,
                 char             **failed)
{
  static const char *const lists[] = { "target_modules", "exclude_modules" };

  for (guint i = 0; i < 2; i++)
    {
      g_autofree char *member = g_strconcat (member_prefix, i == 0 ? "rank_pattern" : "alpha_pattern", NULL);
      JsonNode *node = json_object_get_member (config, member);
      g_autoptr(JsonObject) renamed = NULL;
      g_autoptr(GList) keys = NULL;

      if (node == NULL || !JSON_NODE_HOLDS_OBJECT (node))
        continue;
      renamed = json_object_new ();
      keys = json_object_get_members (json_node_get_object (node));
      for (GList *l = keys; l != NULL; l = l->next)
        {
          g_autofree char *key = rename_entry (l->data, scope, FALSE, rename, data);

          if (key == NULL || json_object_has_member (renamed, key))
            {
              *failed = g_strdup_printf ("%s key '%s' names no module the rules can rename",
                                         member, (const char *) l->data);
              return FALSE;
            }
          json_object_set_member (renamed, key, json_node_copy (json_object_get_member (json_node_get_object (node),
                                                                                       l->data)));
        }
      json_object_set_object_member (config, member, g_steal_pointer (&renamed));
    }

  /* target_modules and exclude_modules: lists of module names (or name
   * ends); a regular expression in a string stays, and the check of
   * renamed_config() decides. */
  for (guint i = 0; i < G_N_ELEMENTS (lists); i++)
    {
      g_autofree char *member = g_strconcat (member_prefix, lists[i], NULL);
      JsonNode *node = json_object_get_member (config, member);
      g_autoptr(JsonArray) renamed = NULL;
      JsonArray *targets;

      if (node == NULL || !JSON_NODE_HOLDS_ARRAY (node))
        continue;
      targets = json_node_get_array (node);
      renamed = json_array_new ();
      for (guint j = 0; j < json_array_get_length (targets); j++)
        {
          const char *target = string_element (targets, j);
          g_autofree char *key = target ? rename_entry (target, scope, TRUE, rename, data) : NULL;

          if (key == NULL)
            {
              *failed = g_strdup_printf ("%s entry '%s' names no module the rules can rename",
                                         member, target ? target : "");
              return FALSE;
            }
          json_array_add_string_element (renamed, key);
        }
      json_object_set_array_member (config, member, g_steal_pointer (&renamed));
    }
  return TRUE;
}

/* re.match (@anchor_end FALSE) or re.fullmatch of @pattern on @key; an
 * expression GRegex cannot compile matches nothing. */
static gboolean
regex_matches (const char *pattern,
               const char *key,
               gboolean    anchor_end)
{
  g_autofree char *source = g_strdup_printf (anchor_end ? "(?:%s)$" : "%s", pattern);
  g_autoptr(GRegex) regex = g_regex_new (source, G_REGEX_ANCHORED | G_REGEX_DOLLAR_ENDONLY, 0, NULL);

  return regex != NULL && g_regex_match (regex, key, 0, NULL);
}

/* PEFT's rule for a list of names: the name itself, or (@ends) its end
 * after a dot. */
static gboolean
list_matches (JsonArray  *list,
              const char *key,
              gboolean    ends)
{
  gsize klen = strlen (key);

  for (guint j = 0; j < json_array_get_length (list); j++)
    {
      const char *target = string_element (list, j);
      gsize tlen = target ? strlen (target) : 0;

      if (target != NULL && (g_str_equal (key, target)
                             || (ends && klen > tlen && g_str_has_suffix (key, target)
                                 && key[klen - tlen - 1] == '.')))
        return TRUE;
    }
  return FALSE;
}

/* PEFT's layers_to_transform: the module's layer index, the number after
 * the first name part (or after a layers_pattern), must be one of them. */
static gboolean
layer_selected (JsonObject *config,
                const char *prefix,
                const char *key)
{
  JsonNode *layers = config_member (config, prefix, "layers_to_transform");
  JsonNode *patterns = config_member (config, prefix, "layers_pattern");
  g_autoptr(GPtrArray) sources = g_ptr_array_new_with_free_func (g_free);
  gint64 index = -1;

  if (layers == NULL || (JSON_NODE_HOLDS_ARRAY (layers) && json_array_get_length (json_node_get_array (layers)) == 0))
    return TRUE;
  if (node_string (patterns) != NULL && *node_string (patterns) != '\0')
    g_ptr_array_add (sources, g_strdup_printf (".*?\\.%s\\.(\\d+)\\.", node_string (patterns)));
  else if (patterns != NULL && JSON_NODE_HOLDS_ARRAY (patterns))
    for (guint j = 0; j < json_array_get_length (json_node_get_array (patterns)); j++)
      if (string_element (json_node_get_array (patterns), j) != NULL)
        g_ptr_array_add (sources, g_strdup_printf (".*?\\.%s\\.(\\d+)\\.",
                                                   string_element (json_node_get_array (patterns), j)));
  if (sources->len == 0)
    g_ptr_array_add (sources, g_strdup (".*?\\.[^.]*\\.(\\d+)\\."));
  for (guint i = 0; i < sources->len && index < 0; i++)
    {
      g_autoptr(GRegex) regex = g_regex_new (sources->pdata[i], G_REGEX_ANCHORED, 0, NULL);
      g_autoptr(GMatchInfo) match = NULL;

      if (regex != NULL && g_regex_match (regex, key, 0, &match))
        {
          g_autofree char *digits = g_match_info_fetch (match, 1);
          index = g_ascii_strtoll (digits, NULL, 10);
        }
    }
  if (index < 0)
    return FALSE;
  if (JSON_NODE_HOLDS_ARRAY (layers))
    {
      for (guint j = 0; j < json_array_get_length (json_node_get_array (layers)); j++)
        {
          JsonNode *element = json_array_get_element (json_node_get_array (layers), j);
          double value;

          if (lp_lora_json_get_number (element, &value) && value == (double) index)
            return TRUE;
        }
      return FALSE;
    }
  {
    double value;
    return lp_lora_json_get_number (layers, &value) && value == (double) index;
  }
}

/* PEFT's check_target_module_exists (peft/tuners/tuners_utils.py) for the
 * module @key of @prefix's LoraConfig: not in exclude_modules nor under a
 * modules_to_save module; then a string target_modules must match the whole
 * name (`all-linear`, which _maybe_include_all_linear_layers turns into
 * every linear layer's full name, takes every module), a list the name
 * itself, or its end after a dot within layers_to_transform. No
 * target_modules targets every module the factors name. */
static gboolean
targeted (JsonObject *config,
          const char *prefix,
          const char *key)
{
  JsonNode *exclude = config_member (config, prefix, "exclude_modules");
  JsonNode *save = config_member (config, prefix, "modules_to_save");
  JsonNode *node = config_member (config, prefix, "target_modules");

  if (node_string (exclude) != NULL ? regex_matches (node_string (exclude), key, TRUE)
      : exclude != NULL && JSON_NODE_HOLDS_ARRAY (exclude) && list_matches (json_node_get_array (exclude), key, TRUE))
    return FALSE;
  for (guint j = 0; save != NULL && JSON_NODE_HOLDS_ARRAY (save) && j < json_array_get_length (json_node_get_array (save)); j++)
    {
      const char *module = string_element (json_node_get_array (save), j);
      g_autofree char *source = module ? g_strdup_printf ("(?:^|.*\\.)%s(?:$|\\..*)", module) : NULL;

      if (source != NULL && regex_matches (source, key, FALSE))
        return FALSE;
    }

  if (node == NULL)
    return TRUE;
  if (node_string (node) != NULL)
    return g_ascii_strcasecmp (node_string (node), "all-linear") == 0
           || regex_matches (node_string (node), key, TRUE);
  if (!JSON_NODE_HOLDS_ARRAY (node))
    return FALSE;
  if (list_matches (json_node_get_array (node), key, FALSE))
    return TRUE;
  return list_matches (json_node_get_array (node), key, TRUE) && layer_selected (config, prefix, key);
}

/* mlx-lm's adapter_config.json has a `lora_parameters` object
 * (lp-lora-family-mlx.c); NULL is no config. */
static gboolean
is_mlx_config (const char *text)
{
  g_autoptr(JsonParser) parser = json_parser_new ();
  JsonNode *root;

  return text != NULL && json_parser_load_from_data (parser, text, -1, NULL)
         && (root = json_parser_get_root (parser)) != NULL && JSON_NODE_HOLDS_OBJECT (root)
         && json_object_get_member (json_node_get_object (root), "lora_parameters") != NULL
         && JSON_NODE_HOLDS_OBJECT (json_object_get_member (json_node_get_object (root), "lora_parameters"));
}

/* A LoraConfig after a rename: @text (diffusers' lora_adapter_metadata, or
 * PEFT's adapter_config.json when @peft) with its pattern keys and module
 * lists renamed by the rules, kept when every renamed module is then
 * targeted as before and reads the r and alpha it had; NULL with @why set
 * otherwise, and @scaled telling whether a module's scale was not 1. */
static char *
renamed_config (gboolean           peft,
                const char        *text,
                LpCheckpoint      *input,
                LpCheckpoint      *output,
                LpLoraRenameFunc   rename,
                gpointer           data,
                gboolean          *scaled,
                char             **why)
{
  const char *where = peft ? ADAPTER_CONFIG : LORA_ADAPTER_METADATA;
  g_autoptr(JsonParser) old_parser = json_parser_new ();
  g_autoptr(JsonParser) new_parser = json_parser_new ();
  g_autoptr(GHashTable) scopes = g_hash_table_new_full (g_str_hash, g_str_equal, g_free,
                                                        (GDestroyNotify) scope_free);
  GHashTableIter iter;
  gpointer prefix_key, scope_value;
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

  /* Whether dropping the config would change a module's scale. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      g_autofree char *prefix = NULL, *name_prefix = NULL, *key = NULL;
      LpLoraPeftConfig config;
      double r, alpha;

      if (!described_module (peft, old_meta, name, &prefix, &name_prefix, &key))
        continue;
      if (!lp_lora_peft_config_read (&config, old_meta, prefix, where, NULL)
          || !lp_lora_peft_config_lookup (&config, where, name, key, &r, &alpha, NULL)
          || (config.use_rslora ? alpha / sqrt (r) : alpha / r) != 1.0)
        *scaled = TRUE;
    }

  /* The configs whose modules the rules renamed get their keys renamed. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *old_name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      const char *new_name = lp_tensor_get_name (lp_checkpoint_get_tensor (output, i));
      g_autofree char *prefix = NULL, *name_prefix = NULL, *key = NULL;
      gsize new_len = strlen (new_name);
      Scope *scope;

      if (!described_module (peft, old_meta, old_name, &prefix, &name_prefix, &key))
        continue;
      if (!g_str_has_prefix (new_name, name_prefix) || !g_str_has_suffix (new_name, DOWN_SUFFIX)
          || new_len <= strlen (name_prefix) + strlen (DOWN_SUFFIX))
        {
          if (peft)
            *why = g_strdup_printf ("the rules move '%s' out of PEFT's names %sMODULE%s (to '%s')",
                                    old_name, name_prefix, DOWN_SUFFIX, new_name);
          else
            *why = g_strdup_printf ("the rules move '%s' out of its component '%.*s' (to '%s')", old_name,
                                    (int) strlen (prefix) - 1, prefix, new_name);
          return NULL;
        }
      scope = g_hash_table_lookup (scopes, prefix);
      if (scope == NULL)
        {
          scope = g_new0 (Scope, 1);
          scope->name_prefix = g_strdup (name_prefix);
          scope->old_keys = g_ptr_array_new_with_free_func (g_free);
          scope->new_keys = g_ptr_array_new_with_free_func (g_free);
          g_hash_table_insert (scopes, g_strdup (prefix), scope);
        }
      scope->renamed |= !g_str_equal (old_name, new_name);
      g_ptr_array_add (scope->old_keys, g_steal_pointer (&key));
      g_ptr_array_add (scope->new_keys, g_strndup (new_name + strlen (name_prefix),
                                                   new_len - strlen (name_prefix) - strlen (DOWN_SUFFIX)));
    }
  g_hash_table_iter_init (&iter, scopes);
  while (g_hash_table_iter_next (&iter, &prefix_key, &scope_value))
    if (((Scope *) scope_value)->renamed
        && !rename_patterns (new_meta, prefix_key, scope_value, rename, data, why))
      return NULL;

  /* Every module must be targeted as before, with the same r and alpha. */
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      const char *old_name = lp_tensor_get_name (lp_checkpoint_get_tensor (input, i));
      const char *new_name = lp_tensor_get_name (lp_checkpoint_get_tensor (output, i));
      g_autofree char *prefix = NULL, *old_key = NULL, *name_prefix = NULL;
      g_autofree char *new_prefix = NULL, *new_name_prefix = NULL, *new_key = NULL;
      LpLoraPeftConfig old_config, new_config;
      double old_r, old_alpha, new_r, new_alpha;

      if (!described_module (peft, old_meta, old_name, &prefix, &name_prefix, &old_key))
        continue;
      if (!described_module (peft, new_meta, new_name, &new_prefix, &new_name_prefix, &new_key)
          || !lp_lora_peft_config_read (&old_config, old_meta, prefix, where, NULL)
          || !lp_lora_peft_config_read (&new_config, new_meta, prefix, where, NULL)
          || !lp_lora_peft_config_lookup (&old_config, where, old_name, old_key, &old_r, &old_alpha, NULL)
          || !lp_lora_peft_config_lookup (&new_config, where, new_name, new_key, &new_r, &new_alpha, NULL))
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

  return peft ? lp_lora_json_to_text (json_parser_get_root (new_parser))
              : lp_lora_diffusers_metadata_to_text (new_meta);
}

/* The LoraConfig beside the factors (@peft: the adapter_config.json, else
 * diffusers' lora_adapter_metadata) after a rename: renamed, dropped with
 * a warning, or an error. */
static gboolean
config_renamed (gboolean           peft,
                LpCheckpoint      *input,
                LpCheckpoint      *output,
                LpLoraRenameFunc   rename,
                gpointer           data,
                GError           **error)
{
  const char *text = peft ? lp_checkpoint_get_adapter_config (input)
                          : lp_checkpoint_get_metadata (input, LORA_ADAPTER_METADATA);
  g_autofree char *why = NULL;
  g_autofree char *rewritten = NULL;
  gboolean scaled;

  if (text == NULL)
    return TRUE;
  rewritten = renamed_config (peft, text, input, output, rename, data, &scaled, &why);
  if (rewritten != NULL)
    {
      if (peft)
        lp_checkpoint_set_adapter_config (output, rewritten);
      else
        lp_checkpoint_set_metadata (output, LORA_ADAPTER_METADATA, rewritten);
      return TRUE;
    }
  if (scaled && peft)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "%s: %s, and dropping it would lose the modules' lora_alpha / r scales "
                   "(write its target_modules and patterns as the module names they select, which the "
                   "rules can follow, or add preset=peft-to-kohya, whose .alpha tensors keep the scales)",
                   ADAPTER_CONFIG, why);
      return FALSE;
    }
  if (scaled)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "metadata %s: %s, and dropping it would lose the modules' lora_alpha / r scales "
                   "(rename with a preset, which moves the scales into the factors)", LORA_ADAPTER_METADATA, why);
      return FALSE;
    }
  if (peft)
    {
      g_warning ("rename: %s not written beside the output: %s (every scale was 1: the factors alone, "
                 "read as a diffusers LoRA, give the same updates, but PEFT loads nothing without a config)",
                 ADAPTER_CONFIG, why);
      lp_checkpoint_set_adapter_config (output, NULL);
      return TRUE;
    }
  g_warning ("rename: metadata %s dropped: %s (every scale was 1: diffusers reads the ranks off the factors)",
             LORA_ADAPTER_METADATA, why);
  lp_checkpoint_set_metadata (output, LORA_ADAPTER_METADATA, NULL);
  return TRUE;
}

/**
 * lp_lora_metadata_renamed:
 * @input: a checkpoint
 * @output: @input with its tensors renamed by rules, in the same order,
 *   holding a copy of @input's metadata and adapter config
 * @rename: (scope call): applies the rules to a tensor name
 * @data: (closure rename): for @rename
 * @error: return location for a #GError
 *
 * Rewrites the metadata and config that name modules after a rename by
 * regex rules (the rename stage's `rules`). kohya's `sshs_*` hashes are
 * dropped: they hash the tensors' bytes in the order of their names. The
 * LoraConfigs, diffusers' `lora_adapter_metadata` and PEFT's
 * `adapter_config.json`, get the keys of their `rank_pattern` and
 * `alpha_pattern` and the entries of their `target_modules` and
 * `exclude_modules` lists renamed by the same rules, each read as the
 * module name it is. A config is kept when every module is then targeted
 * as before (PEFT's check_target_module_exists on its new name) and reads
 * the r and lora_alpha it read before (PEFT's get_pattern_key). Otherwise
 * it would give its loader a wrong LoraConfig: it is dropped with a warning
 * when every module's scale was 1 (the factors alone then give the same
 * updates), and the rename fails when a module had another scale, which
 * the file would lose. mlx-lm's config names no modules by their full
 * names and is kept.
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
  gboolean changed = FALSE;

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

  return config_renamed (FALSE, input, output, rename, data, error)
      && (is_mlx_config (lp_checkpoint_get_adapter_config (input))
          || config_renamed (TRUE, input, output, rename, data, error));
}
