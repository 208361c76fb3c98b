/* lp-pipeline-loader.c: pipeline files and the inline `launch` syntax
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Both front ends describe the same thing, a list of stage specs (a stage
 * name, an optional id, properties, optional inputs), and share one builder
 * that creates the stages through the public graph API, wires them, and
 * checks arity, required properties and cycles. Every mistake gives one
 * error naming the origin and the stage: `reduce.pipeline: stage 2
 * 'lora-svd' (id reduce): unknown property 'rnak'; did you mean 'rank'?`.
 *
 * Parameters: `"${name}"` alone takes the parameter's value with its JSON
 * type (so `"rank": "${rank}"` with `"rank": 4` is the integer 4; a value
 * from the command line is text, converted through the property's pspec);
 * `${name}` inside a longer string is replaced textually; `$$` is a literal
 * `$`, in parameter values too. Substitution is a single pass: parameter
 * values never refer to other parameters, so nothing can expand recursively.
 */

#include "lp-private.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <glib/gstdio.h>

/* Bounds checked before json-glib sees the text: json-glib 1.6 builds the
 * whole tree recursively with no depth limit. */
#define MAX_FILE_SIZE (16 * 1024 * 1024)
#define MAX_DEPTH 64
/* What parameter substitution may add to a pipeline in all: a 100 KB file
 * that uses a long parameter thousands of times must not build gigabytes
 * of text. Substitution is a single pass, so its depth is bounded already. */
#define MAX_SUBSTITUTED_SIZE (16 * 1024 * 1024)

static const char * const top_level_keys[] = {
  "lpipe", "description", "params", "stages", NULL
};

typedef struct {
  guint index;                /* 1-based, as users count */
  char *name;                 /* stage type name as written */
  char *id;                   /* nullable */
  LpStage *stage;             /* owned by the pipeline */
  GHashTable *set;            /* property names set explicitly */
  gboolean explicit_inputs;
  GPtrArray *input_ids;       /* char *, when explicit_inputs */
  GPtrArray *inputs;          /* StageSpec *, resolved */
} StageSpec;

typedef struct {
  LpPipeline *pipeline;
  char *origin;               /* "reduce.pipeline", "launch" */
  GHashTable *file_params;    /* name (the parser's) -> JsonNode, $$ undone */
  GHashTable *cli_params;     /* name -> char * */
  GHashTable *referenced;     /* names used as ${name} in the stages */
  GPtrArray *specs;           /* StageSpec * */
  GHashTable *ids;            /* id -> StageSpec * */
  gboolean strict_chain;      /* launch: every stage takes the one before */
  gsize substituted;          /* bytes that ${name} substitution added so far */
} Loader;

static void
stage_spec_free (StageSpec *spec)
{
  g_free (spec->name);
  g_free (spec->id);
  g_hash_table_unref (spec->set);
  g_clear_pointer (&spec->input_ids, g_ptr_array_unref);
  g_ptr_array_unref (spec->inputs);
  g_free (spec);
}

static void
loader_init (Loader     *ld,
             LpPipeline *pipeline,
             const char *origin)
{
  memset (ld, 0, sizeof *ld);
  ld->pipeline = pipeline;
  ld->origin = g_strdup (origin);
  ld->file_params = g_hash_table_new_full (g_str_hash, g_str_equal, NULL,
                                           (GDestroyNotify) json_node_unref);
  ld->cli_params = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  ld->referenced = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  ld->specs = g_ptr_array_new_with_free_func ((GDestroyNotify) stage_spec_free);
  ld->ids = g_hash_table_new (g_str_hash, g_str_equal);
}

static void
loader_clear (Loader *ld)
{
  g_free (ld->origin);
  g_hash_table_unref (ld->file_params);
  g_hash_table_unref (ld->cli_params);
  g_hash_table_unref (ld->referenced);
  g_ptr_array_unref (ld->specs);
  g_hash_table_unref (ld->ids);
}

/* "stage 2 'lora-svd' (id reduce)" */
static char *
spec_label (StageSpec *spec)
{
  if (spec->name && spec->id)
    return g_strdup_printf ("stage %u '%s' (id %s)", spec->index, spec->name, spec->id);
  if (spec->name)
    return g_strdup_printf ("stage %u '%s'", spec->index, spec->name);
  return g_strdup_printf ("stage %u", spec->index);
}

/* Prefixes an error raised about @spec (by lpipe or by us) with the origin
 * and the stage, the one place that format is made. */
static void
prefix_spec_error (Loader     *ld,
                   StageSpec  *spec,
                   GError    **error)
{
  g_autofree char *label = spec_label (spec);
  g_prefix_error (error, "%s: %s: ", ld->origin, label);
}

static gboolean spec_error (Loader     *ld,
                            StageSpec  *spec,
                            GError    **error,
                            int         code,
                            const char *format,
                            ...) G_GNUC_PRINTF (5, 6);

static gboolean
spec_error (Loader     *ld,
            StageSpec  *spec,
            GError    **error,
            int         code,
            const char *format,
            ...)
{
  va_list args;
  g_autofree char *message = NULL;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error_literal (error, LP_PIPELINE_ERROR, code, message);
  prefix_spec_error (ld, spec, error);
  return FALSE;
}

static gboolean loader_error (Loader     *ld,
                              GError    **error,
                              int         code,
                              const char *format,
                              ...) G_GNUC_PRINTF (4, 5);

static gboolean
loader_error (Loader     *ld,
              GError    **error,
              int         code,
              const char *format,
              ...)
{
  va_list args;
  g_autofree char *message = NULL;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_PIPELINE_ERROR, code, "%s: %s", ld->origin, message);
  return FALSE;
}

/* "; did you mean 'rank'?" or "" */
static char *
did_you_mean (const char         *word,
              const char * const *candidates)
{
  g_autofree char *closest = lp_suggest_closest (word, candidates);
  return closest ? g_strdup_printf ("; did you mean '%s'?", closest) : g_strdup ("");
}

/* ---- parameters ------------------------------------------------------- */

static gboolean
is_param_name_char (char c)
{
  return g_ascii_isalnum (c) || c == '_' || c == '-' || c == '.';
}

/* The text a parameter stands for inside a longer string. */
static char *
param_text (Loader     *ld,
            const char *name)
{
  const char *cli = g_hash_table_lookup (ld->cli_params, name);
  JsonNode *node;
  g_auto(GValue) v = G_VALUE_INIT;

  if (cli)
    return g_strdup (cli);
  node = g_hash_table_lookup (ld->file_params, name);
  if (node == NULL)
    return NULL;
  json_node_get_value (node, &v);
  return lp_value_to_string (&v);
}

static GStrv
known_param_names (Loader *ld)
{
  g_autoptr(GHashTable) all = g_hash_table_new (g_str_hash, g_str_equal);
  GHashTableIter iter;
  gpointer key;
  GPtrArray *names = g_ptr_array_new ();

  g_hash_table_iter_init (&iter, ld->file_params);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_hash_table_add (all, key);
  g_hash_table_iter_init (&iter, ld->cli_params);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_hash_table_add (all, key);
  g_hash_table_iter_init (&iter, all);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_ptr_array_add (names, g_strdup (key));
  g_ptr_array_add (names, NULL);
  return (GStrv) g_ptr_array_free (names, FALSE);
}

/*
 * Expands `${name}` and `$$` in @text, in one pass. With @ld NULL no
 * parameter may be referred to (used for parameter values themselves); with
 * @collect set, references are only recorded in @ld->referenced, never
 * resolved. Sets *@whole to the name when @text is exactly "${name}", and
 * *@n_refs to the number of references. Errors carry no prefix.
 */
static gboolean
expand (Loader      *ld,
        const char  *text,
        gboolean     collect,
        char       **out,
        char       **whole,
        guint       *n_refs,
        GError     **error)
{
  g_autoptr(GString) s = g_string_new (NULL);
  const char *p = text;
  guint refs = 0;

  if (whole)
    *whole = NULL;

  while (*p)
    {
      const char *name_start, *name_end;
      g_autofree char *name = NULL;
      g_autofree char *value = NULL;

      if (p[0] != '$')
        {
          g_string_append_c (s, *p++);
          continue;
        }
      if (p[1] == '$')
        {
          g_string_append_c (s, '$');
          p += 2;
          continue;
        }
      if (p[1] != '{')
        {
          g_string_append_c (s, *p++);
          continue;
        }

      name_start = p + 2;
      name_end = name_start;
      while (is_param_name_char (*name_end))
        name_end++;
      if (*name_end != '}' || name_end == name_start)
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
                       "malformed parameter reference in \"%s\": write ${name} "
                       "(letters, digits, '_', '-', '.'), or $$ for a literal $", text);
          return FALSE;
        }
      name = g_strndup (name_start, name_end - name_start);
      refs++;

      if (ld == NULL)
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
                       "refers to ${%s}, but parameter values cannot refer to "
                       "parameters (write $$ for a literal $)", name);
          return FALSE;
        }

      if (collect)
        g_hash_table_add (ld->referenced, g_strdup (name));
      else
        {
          value = param_text (ld, name);
          if (value == NULL)
            {
              g_auto(GStrv) known = known_param_names (ld);
              g_autofree char *hint = did_you_mean (name, (const char * const *) known);
              g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNDEFINED_PARAM,
                           "undefined parameter ${%s}%s (declare it in \"params\" or pass %s=VALUE)",
                           name, hint, name);
              return FALSE;
            }
          if (strlen (value) > MAX_SUBSTITUTED_SIZE - ld->substituted)
            {
              g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
                           "substituting ${%s} (%" G_GSIZE_FORMAT " bytes) would take the "
                           "text that parameters add past 16 MiB; use the parameter "
                           "less often or make it shorter", name, strlen (value));
              return FALSE;
            }
          ld->substituted += strlen (value);
          g_string_append (s, value);
        }

      if (whole && p == text && name_end[1] == '\0')
        *whole = g_strdup (name);
      p = name_end + 1;
    }

  if (n_refs)
    *n_refs = refs;
  if (out)
    *out = g_string_free (g_steal_pointer (&s), FALSE);
  return TRUE;
}

/* Records the ${name} references in a property value, ignoring mistakes:
 * they are reported, with their stage, when the value is set. */
static void
collect_references (Loader   *ld,
                    JsonNode *node)
{
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING)
    expand (ld, json_node_get_string (node), TRUE, NULL, NULL, NULL, NULL);
  else if (JSON_NODE_HOLDS_ARRAY (node))
    {
      JsonArray *array = json_node_get_array (node);
      for (guint i = 0; i < json_array_get_length (array); i++)
        collect_references (ld, json_array_get_element (array, i));
    }
}

static gboolean
parse_file_params (Loader     *ld,
                   JsonObject *params,
                   GError    **error)
{
  g_autoptr(GList) members = json_object_get_members (params);

  for (GList *l = members; l; l = l->next)
    {
      const char *name = l->data;
      JsonNode *node = json_object_get_member (params, name);
      g_autoptr(GError) local = NULL;

      if (!JSON_NODE_HOLDS_VALUE (node))
        return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                             "params: '%s' must be a string, number or boolean", name);
      for (const char *c = name; *c; c++)
        if (!is_param_name_char (*c))
          return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                               "params: '%s' is not a valid parameter name "
                               "(letters, digits, '_', '-', '.')", name);
      if (json_node_get_value_type (node) == G_TYPE_STRING)
        {
          g_autofree char *text = NULL;

          if (!expand (NULL, json_node_get_string (node), FALSE, &text, NULL, NULL, &local))
            return loader_error (ld, error, local->code, "params: '%s' %s", name, local->message);
          node = json_node_init_string (json_node_alloc (), text);
        }
      else
        node = json_node_copy (node);
      g_hash_table_insert (ld->file_params, (gpointer) name, node);
    }
  return TRUE;
}

static gboolean
parse_cli_params (Loader             *ld,
                  const char * const *params,
                  GError            **error)
{
  for (guint i = 0; params && params[i]; i++)
    {
      const char *eq = strchr (params[i], '=');
      g_autofree char *name = NULL;
      g_autofree char *value = NULL;
      g_autoptr(GError) local = NULL;

      if (eq == NULL || eq == params[i])
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
                       "%s: parameter '%s' must be written name=value", ld->origin, params[i]);
          return FALSE;
        }
      name = g_strndup (params[i], eq - params[i]);
      if (!expand (NULL, eq + 1, FALSE, &value, NULL, NULL, &local))
        return loader_error (ld, error, local->code, "parameter '%s' %s", name, local->message);
      g_hash_table_replace (ld->cli_params, g_steal_pointer (&name), g_steal_pointer (&value));
    }
  return TRUE;
}

static int
compare_names (gconstpointer a,
               gconstpointer b)
{
  return strcmp (*(const char * const *) a, *(const char * const *) b);
}

/* A parameter given on the command line that the file neither declares nor
 * uses is a typo until proven otherwise. */
static gboolean
check_cli_params_known (Loader  *ld,
                        GError **error)
{
  GHashTableIter iter;
  gpointer key;
  g_autoptr(GPtrArray) sorted = g_ptr_array_new ();

  g_hash_table_iter_init (&iter, ld->cli_params);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_ptr_array_add (sorted, key);
  /* the first unknown one in a stable order, whatever the hash order */
  g_ptr_array_sort (sorted, compare_names);

  for (guint i = 0; i < sorted->len; i++)
    {
      const char *name = g_ptr_array_index (sorted, i);

      if (!g_hash_table_contains (ld->file_params, name) &&
          !g_hash_table_contains (ld->referenced, name))
        {
          g_autoptr(GPtrArray) known = g_ptr_array_new ();
          g_autofree char *hint = NULL;

          g_hash_table_iter_init (&iter, ld->file_params);
          while (g_hash_table_iter_next (&iter, &key, NULL))
            g_ptr_array_add (known, key);
          g_hash_table_iter_init (&iter, ld->referenced);
          while (g_hash_table_iter_next (&iter, &key, NULL))
            if (!g_hash_table_contains (ld->file_params, key))
              g_ptr_array_add (known, key);
          g_ptr_array_add (known, NULL);
          hint = did_you_mean (name, (const char * const *) known->pdata);
          return loader_error (ld, error, LP_PIPELINE_ERROR_UNDEFINED_PARAM,
                               "unknown parameter '%s'%s", name, hint);
        }
    }
  return TRUE;
}

static GHashTable *
resolved_params (Loader *ld)
{
  GHashTable *params = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  GHashTableIter iter;
  gpointer key, value;

  g_hash_table_iter_init (&iter, ld->file_params);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_hash_table_insert (params, g_strdup (key), param_text (ld, key));
  g_hash_table_iter_init (&iter, ld->cli_params);
  while (g_hash_table_iter_next (&iter, &key, &value))
    g_hash_table_replace (params, g_strdup (key), g_strdup (value));
  return params;
}

/* ---- stages ----------------------------------------------------------- */

static StageSpec *
add_spec (Loader *ld)
{
  StageSpec *spec = g_new0 (StageSpec, 1);

  spec->index = ld->specs->len + 1;
  spec->set = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  spec->inputs = g_ptr_array_new ();
  g_ptr_array_add (ld->specs, spec);
  return spec;
}

static gboolean
create_stage (Loader     *ld,
              StageSpec  *spec,
              GError    **error)
{
  if (spec->id)
    {
      StageSpec *other = g_hash_table_lookup (ld->ids, spec->id);
      if (other)
        {
          g_autofree char *label = spec_label (other);
          return spec_error (ld, spec, error, LP_PIPELINE_ERROR_DUPLICATE_ID,
                             "id '%s' is already used by %s", spec->id, label);
        }
    }

  spec->stage = lp_pipeline_add_stage (ld->pipeline, spec->name, spec->id, error);
  if (spec->stage == NULL)
    {
      /* the registry's message names the stage type and a close one */
      g_autofree char *name = g_steal_pointer (&spec->name);
      prefix_spec_error (ld, spec, error);
      spec->name = g_steal_pointer (&name);
      return FALSE;
    }
  if (spec->id)
    g_hash_table_insert (ld->ids, spec->id, spec);
  return TRUE;
}

static GParamSpec *
find_property (Loader             *ld,
               StageSpec          *spec,
               const char         *key,
               const char * const *reserved,
               GError            **error)
{
  GObjectClass *klass = G_OBJECT_GET_CLASS (spec->stage);
  GParamSpec *pspec = g_object_class_find_property (klass, key);
  g_autofree GParamSpec **pspecs = NULL;
  g_autoptr(GPtrArray) names = NULL;
  g_autofree char *hint = NULL;
  guint n = 0;

  if (pspec && (pspec->flags & G_PARAM_WRITABLE) && !(pspec->flags & G_PARAM_CONSTRUCT_ONLY))
    return pspec;

  names = g_ptr_array_new ();
  pspecs = g_object_class_list_properties (klass, &n);
  for (guint i = 0; i < n; i++)
    if ((pspecs[i]->flags & G_PARAM_WRITABLE) && !(pspecs[i]->flags & G_PARAM_CONSTRUCT_ONLY))
      g_ptr_array_add (names, (gpointer) pspecs[i]->name);
  for (guint i = 0; reserved && reserved[i]; i++)
    g_ptr_array_add (names, (gpointer) reserved[i]);
  g_ptr_array_add (names, NULL);
  hint = did_you_mean (key, (const char * const *) names->pdata);

  if (pspec)
    spec_error (ld, spec, error, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
                "property '%s' cannot be set", key);
  else
    spec_error (ld, spec, error, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
                "unknown property '%s'%s", key, hint);
  return NULL;
}

static gboolean
apply_value (Loader       *ld,
             StageSpec    *spec,
             GParamSpec   *pspec,
             const GValue *value)
{
  g_object_set_property (G_OBJECT (spec->stage), pspec->name, value);
  g_hash_table_add (spec->set, g_strdup (pspec->name));
  return TRUE;
}

/* Sets a property from the launch syntax: always text. */
static gboolean
set_property_text (Loader     *ld,
                   StageSpec  *spec,
                   const char *key,
                   const char *text,
                   GError    **error)
{
  GParamSpec *pspec = find_property (ld, spec, key, NULL, error);
  g_auto(GValue) value = G_VALUE_INIT;

  if (pspec == NULL)
    return FALSE;
  if (!lp_value_from_string (pspec, text, &value, error))
    {
      prefix_spec_error (ld, spec, error);
      return FALSE;
    }
  return apply_value (ld, spec, pspec, &value);
}

/* Substitutes parameters in the strings of an array, element by element. */
static JsonNode *
expand_array (Loader     *ld,
              JsonNode   *node,
              GError    **error)
{
  JsonArray *in = json_node_get_array (node);
  g_autoptr(JsonArray) out = json_array_new ();
  JsonNode *result;

  for (guint i = 0; i < json_array_get_length (in); i++)
    {
      JsonNode *element = json_array_get_element (in, i);

      if (JSON_NODE_HOLDS_VALUE (element) && json_node_get_value_type (element) == G_TYPE_STRING)
        {
          g_autofree char *text = NULL;
          if (!expand (ld, json_node_get_string (element), FALSE, &text, NULL, NULL, error))
            return NULL;
          json_array_add_string_element (out, text);
        }
      else
        json_array_add_element (out, json_node_copy (element));
    }
  result = json_node_new (JSON_NODE_ARRAY);
  json_node_set_array (result, out);
  return result;
}

static gboolean
convert_json_value (Loader      *ld,
                    GParamSpec  *pspec,
                    JsonNode    *node,
                    GValue      *value,
                    GError     **error)
{
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING)
    {
      const char *text = json_node_get_string (node);
      g_autofree char *expanded = NULL;
      g_autofree char *whole = NULL;
      guint n_refs = 0;

      if (!expand (ld, text, FALSE, &expanded, &whole, &n_refs, error))
        {
          g_prefix_error (error, "property '%s': ", pspec->name);
          return FALSE;
        }

      if (whole)
        {
          /* "${rank}" alone: the parameter's own value and type */
          const char *cli = g_hash_table_lookup (ld->cli_params, whole);
          if (cli)
            return lp_value_from_string (pspec, cli, value, error);
          return lp_value_from_json (pspec, g_hash_table_lookup (ld->file_params, whole),
                                     value, error);
        }
      if (n_refs > 0)
        return lp_value_from_string (pspec, expanded, value, error);
      if (strcmp (expanded, text) != 0)
        {
          /* only $$ escapes: still a JSON string, now unescaped */
          g_autoptr(JsonNode) unescaped = json_node_new (JSON_NODE_VALUE);
          json_node_set_string (unescaped, expanded);
          return lp_value_from_json (pspec, unescaped, value, error);
        }
      return lp_value_from_json (pspec, node, value, error);
    }

  if (JSON_NODE_HOLDS_ARRAY (node))
    {
      g_autoptr(JsonNode) expanded = expand_array (ld, node, error);
      if (expanded == NULL)
        {
          g_prefix_error (error, "property '%s': ", pspec->name);
          return FALSE;
        }
      return lp_value_from_json (pspec, expanded, value, error);
    }

  return lp_value_from_json (pspec, node, value, error);
}

static const char * const stage_reserved_keys[] = { "stage", "id", "inputs", NULL };

static gboolean
set_property_json (Loader     *ld,
                   StageSpec  *spec,
                   const char *key,
                   JsonNode   *node,
                   GError    **error)
{
  GParamSpec *pspec = find_property (ld, spec, key, stage_reserved_keys, error);
  g_auto(GValue) value = G_VALUE_INIT;

  if (pspec == NULL)
    return FALSE;
  if (!convert_json_value (ld, pspec, node, &value, error))
    {
      prefix_spec_error (ld, spec, error);
      return FALSE;
    }
  return apply_value (ld, spec, pspec, &value);
}

static gboolean
check_required (Loader     *ld,
                StageSpec  *spec,
                GError    **error)
{
  LpStageClass *klass = LP_STAGE_GET_CLASS (spec->stage);
  g_autofree GParamSpec **pspecs = NULL;
  guint n = 0;

  pspecs = g_object_class_list_properties (G_OBJECT_CLASS (klass), &n);
  for (guint i = 0; i < n; i++)
    {
      if (lp_stage_class_is_property_required (klass, pspecs[i]->name) &&
          !g_hash_table_contains (spec->set, pspecs[i]->name))
        {
          g_autofree char *desc = lp_param_spec_describe_type (pspecs[i]);
          return spec_error (ld, spec, error, LP_PIPELINE_ERROR_MISSING_PROPERTY,
                             "required property '%s' (%s) is not set",
                             pspecs[i]->name, desc);
        }
    }
  return TRUE;
}

/* Resolves every stage's inputs: the ids it names, or else the stage before
 * it (a plain list is a chain), or none for a source. In the launch syntax
 * a source after '!' is given the stage before, and so refused. */
static gboolean
resolve_inputs (Loader  *ld,
                GError **error)
{
  for (guint i = 0; i < ld->specs->len; i++)
    {
      StageSpec *spec = g_ptr_array_index (ld->specs, i);
      LpStageClass *klass = LP_STAGE_GET_CLASS (spec->stage);

      if (spec->explicit_inputs)
        {
          for (guint j = 0; j < spec->input_ids->len; j++)
            {
              const char *id = g_ptr_array_index (spec->input_ids, j);
              StageSpec *from = g_hash_table_lookup (ld->ids, id);

              if (from == NULL)
                {
                  g_autoptr(GPtrArray) ids = g_ptr_array_new ();
                  g_autofree char *hint = NULL;

                  for (guint k = 0; k < ld->specs->len; k++)
                    {
                      StageSpec *other = g_ptr_array_index (ld->specs, k);
                      if (other->id)
                        g_ptr_array_add (ids, other->id);
                    }
                  g_ptr_array_add (ids, NULL);
                  hint = did_you_mean (id, (const char * const *) ids->pdata);
                  return spec_error (ld, spec, error, LP_PIPELINE_ERROR_UNKNOWN_ID,
                                     "input '%s' is not the id of any stage%s", id, hint);
                }
              g_ptr_array_add (spec->inputs, from);
            }
        }
      else if (i > 0 && (ld->strict_chain || lp_stage_class_get_max_inputs (klass) > 0))
        g_ptr_array_add (spec->inputs, g_ptr_array_index (ld->specs, i - 1));
    }
  return TRUE;
}

static gboolean
check_arity (Loader  *ld,
             GError **error)
{
  for (guint i = 0; i < ld->specs->len; i++)
    {
      StageSpec *spec = g_ptr_array_index (ld->specs, i);
      LpStageClass *klass = LP_STAGE_GET_CLASS (spec->stage);
      guint min = lp_stage_class_get_min_inputs (klass);
      guint max = lp_stage_class_get_max_inputs (klass);
      guint n = spec->inputs->len;

      for (guint j = 0; j < n; j++)
        {
          StageSpec *from = g_ptr_array_index (spec->inputs, j);
          if (lp_stage_class_get_role (LP_STAGE_GET_CLASS (from->stage)) == LP_STAGE_ROLE_SINK)
            {
              g_autofree char *label = spec_label (from);
              return spec_error (ld, spec, error, LP_PIPELINE_ERROR_ARITY,
                                 "its input, %s, is a sink and has no output%s", label,
                                 spec->explicit_inputs ? "" : " (name the input with \"inputs\")");
            }
        }

      if (max == 0 && n > 0)
        return spec_error (ld, spec, error, LP_PIPELINE_ERROR_ARITY,
                           "a source takes no input, but it is given %u", n);
      if (n < min)
        return spec_error (ld, spec, error, LP_PIPELINE_ERROR_ARITY,
                           "takes at least %u input%s, but it has %u%s", min,
                           min == 1 ? "" : "s", n,
                           i == 0 && !spec->explicit_inputs
                             ? " (it is the first stage: start the pipeline with a source)" : "");
      if (n > max)
        return spec_error (ld, spec, error, LP_PIPELINE_ERROR_ARITY,
                           "takes at most %u input%s, but it has %u", max,
                           max == 1 ? "" : "s", n);
    }
  return TRUE;
}

/* Kahn's algorithm; what it cannot order is a cycle or downstream of one.
 * Walking back along unordered inputs from any unordered stage must come back
 * to a stage seen already: that loop is the cycle named in the error. */
static gboolean
check_cycles (Loader  *ld,
              GError **error)
{
  guint n = ld->specs->len;
  g_autofree guint *pending = g_new0 (guint, n);
  g_autofree guint *queue = g_new (guint, n);
  g_autoptr(GHashTable) index_of = g_hash_table_new (NULL, NULL);
  g_autoptr(GPtrArray) consumers = g_ptr_array_new_with_free_func ((GDestroyNotify) g_array_unref);
  guint head = 0, tail = 0;
  g_autofree guint *seen_at = NULL;
  g_autoptr(GArray) walk = NULL;
  g_autoptr(GString) path = NULL;
  guint start, at;

  for (guint i = 0; i < n; i++)
    {
      g_hash_table_insert (index_of, g_ptr_array_index (ld->specs, i), GUINT_TO_POINTER (i));
      g_ptr_array_add (consumers, g_array_new (FALSE, FALSE, sizeof (guint)));
    }
  for (guint i = 0; i < n; i++)
    {
      StageSpec *spec = g_ptr_array_index (ld->specs, i);
      pending[i] = spec->inputs->len;
      for (guint j = 0; j < spec->inputs->len; j++)
        {
          guint from = GPOINTER_TO_UINT (g_hash_table_lookup (index_of, g_ptr_array_index (spec->inputs, j)));
          g_array_append_val (g_ptr_array_index (consumers, from), i);
        }
      if (pending[i] == 0)
        queue[tail++] = i;
    }
  while (head < tail)
    {
      GArray *out = g_ptr_array_index (consumers, queue[head++]);
      for (guint j = 0; j < out->len; j++)
        {
          guint c = g_array_index (out, guint, j);
          if (--pending[c] == 0)
            queue[tail++] = c;
        }
    }
  if (tail == n)
    return TRUE;

  for (start = 0; pending[start] == 0; start++)
    ;
  seen_at = g_new (guint, n);
  for (guint i = 0; i < n; i++)
    seen_at[i] = G_MAXUINT;
  walk = g_array_new (FALSE, FALSE, sizeof (guint));
  at = start;
  while (seen_at[at] == G_MAXUINT)
    {
      StageSpec *spec = g_ptr_array_index (ld->specs, at);
      seen_at[at] = walk->len;
      g_array_append_val (walk, at);
      for (guint j = 0; j < spec->inputs->len; j++)
        {
          guint from = GPOINTER_TO_UINT (g_hash_table_lookup (index_of, g_ptr_array_index (spec->inputs, j)));
          if (pending[from] > 0)
            {
              at = from;
              break;
            }
        }
    }

  if (walk->len - seen_at[at] == 1)
    return spec_error (ld, g_ptr_array_index (ld->specs, at), error, LP_PIPELINE_ERROR_CYCLE,
                       "takes its own output as input");

  /* the walk went against the data; name the stages in the data's order,
   * starting from the one listed first in the file */
  {
    guint len = walk->len - seen_at[at];
    guint first = 0;

    g_array_remove_range (walk, 0, seen_at[at]);
    for (guint k = 0; k < len / 2; k++)
      {
        guint tmp = g_array_index (walk, guint, k);
        g_array_index (walk, guint, k) = g_array_index (walk, guint, len - 1 - k);
        g_array_index (walk, guint, len - 1 - k) = tmp;
      }
    for (guint k = 1; k < len; k++)
      if (g_array_index (walk, guint, k) < g_array_index (walk, guint, first))
        first = k;

    path = g_string_new (NULL);
    for (guint k = 0; k <= len; k++)
      {
        guint i = g_array_index (walk, guint, (first + k) % len);
        g_autofree char *label = spec_label (g_ptr_array_index (ld->specs, i));
        g_string_append_printf (path, "%s%s", k ? " -> " : "", label);
      }
  }
  return loader_error (ld, error, LP_PIPELINE_ERROR_CYCLE,
                       "the stages' inputs form a cycle: %s", path->str);
}

/* Wires, checks and hands the graph to the pipeline. */
static gboolean
finish (Loader     *ld,
        const char *description,
        GError    **error)
{
  g_autoptr(GHashTable) params = NULL;
  g_autofree char *expanded = NULL;

  if (!resolve_inputs (ld, error) ||
      !check_arity (ld, error) ||
      !check_cycles (ld, error))
    return FALSE;

  for (guint i = 0; i < ld->specs->len; i++)
    {
      StageSpec *spec = g_ptr_array_index (ld->specs, i);

      for (guint j = 0; j < spec->inputs->len; j++)
        {
          StageSpec *from = g_ptr_array_index (spec->inputs, j);
          if (!lp_pipeline_connect (ld->pipeline, from->stage, spec->stage, error))
            {
              prefix_spec_error (ld, spec, error);
              return FALSE;
            }
        }
      lp_pipeline_mark_explicit_inputs (ld->pipeline, spec->stage);
    }

  /* "Reduce to rank ${rank}" should say which rank this run used. */
  if (description && !expand (ld, description, FALSE, &expanded, NULL, NULL, error))
    {
      g_prefix_error (error, "%s: description: ", ld->origin);
      return FALSE;
    }
  params = resolved_params (ld);
  lp_pipeline_set_source_info (ld->pipeline, ld->origin, expanded, params);
  return TRUE;
}

/* ---- pipeline files --------------------------------------------------- */

static void
line_and_column (const char *data,
                 const char *at,
                 guint      *line,
                 guint      *column)
{
  *line = 1;
  *column = 1;
  for (const char *p = data; p < at; p++)
    {
      if (*p == '\n')
        {
          (*line)++;
          *column = 1;
        }
      else if (((guchar) *p & 0xc0) != 0x80)
        (*column)++;
    }
}

/* "reduce.pipeline:4:12", for messages about a place in the text. */
static char *
text_position (Loader     *ld,
               const char *data,
               const char *at)
{
  guint line, column;

  line_and_column (data, at, &line, &column);
  return g_strdup_printf ("%s:%u:%u", ld->origin, line, column);
}

/* The code point of the four hex digits at @p, or -1. */
static int
hex4 (const char *p)
{
  int c = 0;

  for (int i = 0; i < 4; i++)
    {
      int d = g_ascii_xdigit_value (p[i]);
      if (d < 0)
        return -1;
      c = c * 16 + d;
    }
  return c;
}

/* Decodes the JSON string whose text starts at @p (after the opening quote)
 * into @out, as json-glib will; returns what follows the closing quote (or
 * @end). Sets *@nul when it holds \u0000. An escape that is not JSON is
 * kept as written: json-glib reports it. */
static const char *
scan_string (const char *p,
             const char *end,
             GString    *out,
             gboolean   *nul)
{
  static const char escapes[] = "b\bf\fn\nr\rt\t\"\"\\\\//";

  g_string_truncate (out, 0);
  while (p < end && *p != '"')
    {
      const char *e;
      int c, low;

      if (*p != '\\' || p + 1 >= end)
        {
          g_string_append_c (out, *p++);
          continue;
        }
      if (p[1] != 'u')
        {
          e = strchr (escapes, p[1]);
          g_string_append_c (out, e && p[1] ? e[1] : p[1]);
          p += 2;
          continue;
        }
      if (end - p < 6 || (c = hex4 (p + 2)) < 0)
        {
          g_string_append_c (out, *p++);
          continue;
        }
      p += 6;
      if (c >= 0xd800 && c < 0xdc00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
          (low = hex4 (p + 2)) >= 0xdc00 && low < 0xe000)
        {
          c = 0x10000 + ((c - 0xd800) << 10) + (low - 0xdc00);
          p += 6;
        }
      if (c == 0)
        *nul = TRUE;
      g_string_append_unichar (out, c);
    }
  return p < end ? p + 1 : end;
}

/* Keeps the first of the scanner's findings that wait for json-glib. */
static void G_GNUC_PRINTF (3, 4)
defer_error (GError    **deferred,
             int         code,
             const char *format,
             ...)
{
  va_list args;

  if (*deferred)
    return;
  va_start (args, format);
  *deferred = g_error_new_valist (LP_PIPELINE_ERROR, code, format, args);
  va_end (args);
}

/*
 * What json-glib would accept but we must not hand it, in one pass over the
 * text. At once: more than 16 MiB, nesting deeper than 64, NUL bytes,
 * invalid UTF-8. Into @deferred, reported only if json-glib then finds the
 * text well-formed (what a broken file holds is not worth judging): a key
 * twice in one object (json-glib keeps the last without a word), a \u0000
 * in a string (it would cut a stage name or a value short), and an integer
 * outside 64 bits (json-glib makes it a wrong number).
 */
static gboolean
check_text (Loader     *ld,
            const char *data,
            gsize       length,
            GError    **error,
            GError    **deferred)
{
  const char *end = data + length;
  const char *bad = NULL;
  guint depth = 0;
  /* per level: an object's keys (name -> offset + 1), NULL for an array */
  GHashTable *keys[MAX_DEPTH + 1] = { NULL };
  gboolean expect_key[MAX_DEPTH + 1] = { FALSE };
  g_autoptr(GString) text = g_string_new (NULL);
  gboolean ok = TRUE;

  if (length > MAX_FILE_SIZE)
    return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                         "the file is %" G_GSIZE_FORMAT " bytes; pipeline files are "
                         "limited to 16 MiB", length);

  if (!g_utf8_validate_len (data, length, &bad))
    {
      g_autofree char *at = text_position (ld, data, bad);
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX,
                   "%s: invalid JSON: %s", at,
                   *bad == '\0' && bad < end ? "NUL byte" : "invalid UTF-8");
      return FALSE;
    }

  for (const char *p = data; p < end && ok; )
    {
      const char *start = p;

      if (*p == '"')
        {
          gboolean nul = FALSE;

          p = scan_string (p + 1, end, text, &nul);
          if (nul)
            {
              g_autofree char *at = text_position (ld, data, start);
              defer_error (deferred, LP_PIPELINE_ERROR_INVALID,
                           "%s: the string holds \\u0000 (a NUL character), "
                           "which no name or value may contain", at);
            }
          if (depth > 0 && keys[depth] && expect_key[depth])
            {
              gpointer first = g_hash_table_lookup (keys[depth], text->str);

              expect_key[depth] = FALSE;
              if (first)
                {
                  g_autofree char *at = text_position (ld, data, start);
                  g_autofree char *shown = g_strescape (text->str, NULL);
                  guint line, column;

                  line_and_column (data, data + GPOINTER_TO_SIZE (first) - 1, &line, &column);
                  defer_error (deferred, LP_PIPELINE_ERROR_INVALID,
                               "%s: key \"%s\" is given twice in one object "
                               "(first on line %u); keep one", at, shown, line);
                }
              else
                g_hash_table_insert (keys[depth], g_strdup (text->str),
                                     GSIZE_TO_POINTER (start - data + 1));
            }
          continue;
        }
      if (*p == '-' || g_ascii_isdigit (*p))
        {
          gboolean integer = TRUE;

          for (; p < end && *p && (g_ascii_isdigit (*p) || strchr ("+-.eE", *p)); p++)
            if (!g_ascii_isdigit (*p) && !(p == start && *p == '-'))
              integer = FALSE;
          if (integer)
            {
              g_autofree char *number = g_strndup (start, p - start);
              if (!g_ascii_string_to_signed (number, 10, G_MININT64, G_MAXINT64, NULL, NULL))
                {
                  g_autofree char *at = text_position (ld, data, start);
                  defer_error (deferred, LP_PIPELINE_ERROR_BAD_VALUE,
                               "%s: the integer %s is out of range (integers are 64-bit)",
                               at, number);
                }
            }
          continue;
        }
      if (*p == '{' || *p == '[')
        {
          if (++depth > MAX_DEPTH)
            {
              g_autofree char *at = text_position (ld, data, p);
              g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
                           "%s: nesting deeper than %d levels", at, MAX_DEPTH);
              ok = FALSE;
              break;
            }
          keys[depth] = *p == '{' ? g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL)
                                  : NULL;
          expect_key[depth] = *p == '{';
        }
      else if ((*p == '}' || *p == ']') && depth > 0)
        g_clear_pointer (&keys[depth--], g_hash_table_unref);
      else if (*p == ',' && depth > 0 && keys[depth])
        expect_key[depth] = TRUE;
      p++;
    }

  for (guint i = 1; i <= MIN (depth, MAX_DEPTH); i++)
    g_clear_pointer (&keys[i], g_hash_table_unref);
  return ok;
}

/* json-glib says "<data>:2:7: Parse error: unexpected ..."; we say
 * "reduce.pipeline:2:7: invalid JSON: unexpected ...". */
static void
convert_parse_error (Loader  *ld,
                     GError  *parse_error,
                     GError **error)
{
  const char *msg = parse_error->message;
  const char *rest = msg;
  g_autofree char *position = NULL;

  if (g_str_has_prefix (msg, "<data>:"))
    {
      const char *p = msg + strlen ("<data>:");
      const char *start = p;
      while (g_ascii_isdigit (*p) || *p == ':')
        p++;
      /* "2:7:" */
      if (p > start && p[-1] == ':')
        {
          position = g_strndup (start, p - start - 1);
          rest = p;
          while (*rest == ' ')
            rest++;
        }
    }
  if (g_str_has_prefix (rest, "Parse error: "))
    rest += strlen ("Parse error: ");

  if (position)
    g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX,
                 "%s:%s: invalid JSON: %s", ld->origin, position, rest);
  else
    g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX,
                 "%s: invalid JSON: %s", ld->origin, rest);
}

static gboolean
parse_inputs (Loader     *ld,
              StageSpec  *spec,
              JsonNode   *node,
              GError    **error)
{
  spec->explicit_inputs = TRUE;
  spec->input_ids = g_ptr_array_new_with_free_func (g_free);

  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING)
    {
      g_ptr_array_add (spec->input_ids, g_strdup (json_node_get_string (node)));
      return TRUE;
    }
  if (JSON_NODE_HOLDS_ARRAY (node))
    {
      JsonArray *array = json_node_get_array (node);
      for (guint i = 0; i < json_array_get_length (array); i++)
        {
          JsonNode *element = json_array_get_element (array, i);
          if (!JSON_NODE_HOLDS_VALUE (element) || json_node_get_value_type (element) != G_TYPE_STRING)
            return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                               "\"inputs\" must be an id or an array of ids; "
                               "element %u is not a string", i + 1);
          g_ptr_array_add (spec->input_ids, g_strdup (json_node_get_string (element)));
        }
      return TRUE;
    }
  return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                     "\"inputs\" must be an id or an array of ids");
}

static gboolean
load_stage (Loader   *ld,
            JsonNode *node,
            GError  **error)
{
  StageSpec *spec = add_spec (ld);
  JsonObject *object;
  JsonNode *member;
  g_autoptr(GList) keys = NULL;

  if (!JSON_NODE_HOLDS_OBJECT (node))
    return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                       "must be a JSON object like {\"stage\": \"name\", ...}");
  object = json_node_get_object (node);

  member = json_object_get_member (object, "stage");
  if (member == NULL)
    return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                       "has no \"stage\" key naming its stage type");
  if (!JSON_NODE_HOLDS_VALUE (member) || json_node_get_value_type (member) != G_TYPE_STRING)
    return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                       "\"stage\" must be a string naming a stage type");
  spec->name = g_strdup (json_node_get_string (member));

  member = json_object_get_member (object, "id");
  if (member)
    {
      if (!JSON_NODE_HOLDS_VALUE (member) || json_node_get_value_type (member) != G_TYPE_STRING ||
          *json_node_get_string (member) == '\0')
        return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                           "\"id\" must be a non-empty string");
      spec->id = g_strdup (json_node_get_string (member));
    }

  if (!create_stage (ld, spec, error))
    return FALSE;

  member = json_object_get_member (object, "inputs");
  if (member && !parse_inputs (ld, spec, member, error))
    return FALSE;

  keys = json_object_get_members (object);
  for (GList *l = keys; l; l = l->next)
    {
      const char *key = l->data;

      if (g_strv_contains (stage_reserved_keys, key))
        continue;
      if (!set_property_json (ld, spec, key, json_object_get_member (object, key), error))
        return FALSE;
    }

  return check_required (ld, spec, error);
}

static gboolean
load_root (Loader             *ld,
           JsonNode           *root,
           const char * const *params,
           GError            **error)
{
  JsonObject *object;
  JsonNode *member;
  JsonArray *stages;
  const char *description = NULL;
  g_autoptr(GList) keys = NULL;

  if (root == NULL)
    return loader_error (ld, error, LP_PIPELINE_ERROR_SYNTAX, "invalid JSON: the file is empty");
  if (!JSON_NODE_HOLDS_OBJECT (root))
    return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                         "a pipeline file is a JSON object with \"stages\"");
  object = json_node_get_object (root);

  keys = json_object_get_members (object);
  for (GList *l = keys; l; l = l->next)
    {
      if (!g_strv_contains (top_level_keys, l->data))
        {
          g_autofree char *hint = did_you_mean (l->data, top_level_keys);
          return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                               "unknown key '%s'%s", (const char *) l->data, hint);
        }
    }

  /* a missing version is version 1, the only one there is */
  member = json_object_get_member (object, "lpipe");
  if (member)
    {
      if (!JSON_NODE_HOLDS_VALUE (member) || json_node_get_value_type (member) != G_TYPE_INT64)
        return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                             "\"lpipe\" must be the format version, 1");
      if (json_node_get_int (member) != 1)
        return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                             "format version %" G_GINT64_FORMAT " is not supported; "
                             "this lpipe reads version 1", json_node_get_int (member));
    }

  member = json_object_get_member (object, "description");
  if (member)
    {
      if (!JSON_NODE_HOLDS_VALUE (member) || json_node_get_value_type (member) != G_TYPE_STRING)
        return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                             "\"description\" must be a string");
      description = json_node_get_string (member);
    }

  member = json_object_get_member (object, "params");
  if (member)
    {
      if (!JSON_NODE_HOLDS_OBJECT (member))
        return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                             "\"params\" must be an object of name: value");
      if (!parse_file_params (ld, json_node_get_object (member), error))
        return FALSE;
    }
  if (!parse_cli_params (ld, params, error))
    return FALSE;

  member = json_object_get_member (object, "stages");
  if (member == NULL)
    return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID, "no \"stages\" array");
  if (!JSON_NODE_HOLDS_ARRAY (member))
    return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                         "\"stages\" must be an array of stage objects");
  stages = json_node_get_array (member);
  if (json_array_get_length (stages) == 0)
    return loader_error (ld, error, LP_PIPELINE_ERROR_EMPTY, "\"stages\" is empty");
  if (json_array_get_length (stages) > LP_PIPELINE_MAX_STAGES)
    return loader_error (ld, error, LP_PIPELINE_ERROR_INVALID,
                         "\"stages\" has %u stages; a pipeline holds at most %d",
                         json_array_get_length (stages), LP_PIPELINE_MAX_STAGES);

  /* know every ${name} in use before judging the command line's names */
  for (guint i = 0; i < json_array_get_length (stages); i++)
    {
      JsonNode *node = json_array_get_element (stages, i);
      if (JSON_NODE_HOLDS_OBJECT (node))
        {
          JsonObject *stage = json_node_get_object (node);
          g_autoptr(GList) members = json_object_get_members (stage);
          for (GList *l = members; l; l = l->next)
            if (!g_strv_contains (stage_reserved_keys, l->data))
              collect_references (ld, json_object_get_member (stage, l->data));
        }
    }
  if (!check_cli_params_known (ld, error))
    return FALSE;

  for (guint i = 0; i < json_array_get_length (stages); i++)
    if (!load_stage (ld, json_array_get_element (stages, i), error))
      return FALSE;

  return finish (ld, description, error);
}

/**
 * lp_pipeline_load_from_data:
 * @self: an empty pipeline
 * @data: the text of a pipeline file
 * @length: the length of @data in bytes, or -1 if it is nul-terminated
 * @origin: (nullable): what to call the text in errors (a file name); "<data>" if %NULL
 * @params: (nullable) (array zero-terminated=1): `name=value` overrides for
 *   the file's `params`, as given on the command line
 * @error: return location for a #GError
 *
 * Builds the pipeline a pipeline file describes. See the pipeline-file
 * reference for the format. Any mistake gives one %LP_PIPELINE_ERROR naming
 * @origin and the stage; the pipeline is then left empty.
 *
 * Returns: %TRUE if the pipeline was built
 */
gboolean
lp_pipeline_load_from_data (LpPipeline          *self,
                            const char          *data,
                            gssize               length,
                            const char          *origin,
                            const char * const  *params,
                            GError             **error)
{
  Loader ld;
  g_autoptr(JsonParser) parser = NULL;
  g_autoptr(GError) parse_error = NULL;
  g_autoptr(GError) deferred = NULL;
  gsize len;
  gboolean ok;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (data != NULL || length == 0, FALSE);
  g_return_val_if_fail (lp_pipeline_get_n_stages (self) == 0, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  len = length < 0 ? strlen (data) : (gsize) length;
  loader_init (&ld, self, origin ? origin : "<data>");

  ok = check_text (&ld, data, len, error, &deferred);
  if (ok)
    {
      parser = json_parser_new_immutable ();
      if (!json_parser_load_from_data (parser, data, len, &parse_error))
        {
          convert_parse_error (&ld, parse_error, error);
          ok = FALSE;
        }
      else if (deferred)
        {
          g_propagate_error (error, g_steal_pointer (&deferred));
          ok = FALSE;
        }
    }
  if (ok)
    ok = load_root (&ld, json_parser_get_root (parser), params, error);

  loader_clear (&ld);
  if (!ok)
    lp_pipeline_clear (self);
  return ok;
}

/* Reads at most MAX_FILE_SIZE + 1 bytes, so an endless or huge file costs
 * no more than that; the size check then reports it. */
static char *
read_bounded (const char  *filename,
              const char  *display,
              gsize       *length,
              GError     **error)
{
  FILE *f = g_fopen (filename, "rb");
  g_autoptr(GByteArray) bytes = NULL;
  guint8 chunk[65536];
  size_t n;

  if (f == NULL)
    {
      int saved = errno;
      g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved),
                   "%s: %s", display, g_strerror (saved));
      return NULL;
    }

  bytes = g_byte_array_new ();
  while ((n = fread (chunk, 1, sizeof chunk, f)) > 0)
    {
      g_byte_array_append (bytes, chunk, n);
      if (bytes->len > MAX_FILE_SIZE)
        break;
    }
  if (ferror (f))
    {
      int saved = errno;
      fclose (f);
      g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved),
                   "%s: %s", display, g_strerror (saved));
      return NULL;
    }
  fclose (f);

  *length = bytes->len;
  g_byte_array_append (bytes, (const guint8 *) "", 1);
  return (char *) g_byte_array_free (g_steal_pointer (&bytes), FALSE);
}

/**
 * lp_pipeline_load_from_file:
 * @self: an empty pipeline
 * @filename: (type filename): a pipeline file (`*.pipeline`)
 * @params: (nullable) (array zero-terminated=1): `name=value` overrides for
 *   the file's `params`, as given on the command line
 * @error: return location for a #GError
 *
 * Reads @filename and builds the pipeline it describes, like
 * lp_pipeline_load_from_data(). Files over 16 MiB are refused unread.
 * Errors name the file as given.
 *
 * Returns: %TRUE if the pipeline was built
 */
gboolean
lp_pipeline_load_from_file (LpPipeline          *self,
                            const char          *filename,
                            const char * const  *params,
                            GError             **error)
{
  g_autofree char *display = NULL;
  g_autofree char *data = NULL;
  gsize length = 0;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (filename != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  display = g_filename_display_name (filename);
  data = read_bounded (filename, display, &length, error);
  if (data == NULL)
    return FALSE;
  return lp_pipeline_load_from_data (self, data, length, display, params, error);
}

/* ---- launch syntax ---------------------------------------------------- */

static gboolean
launch_error (Loader     *ld,
              GError    **error,
              const char *format,
              ...) G_GNUC_PRINTF (3, 4);

static gboolean
launch_error (Loader     *ld,
              GError    **error,
              const char *format,
              ...)
{
  va_list args;
  g_autofree char *message = NULL;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID, "%s: %s", ld->origin, message);
  return FALSE;
}

/* A word without '=' after a stage: a word shaped like a stage name
 * (lowercase, digits, dashes) means a missing '!'; any other word, a file
 * name most likely, is the value of the stage's one required property
 * (`safetensors-source lora.safetensors`), so name that fix. */
static gboolean
bare_word_error (Loader      *ld,
                 StageSpec   *spec,
                 const char  *token,
                 GError     **error)
{
  GObjectClass *klass = G_OBJECT_GET_CLASS (spec->stage);
  g_autofree GParamSpec **pspecs = NULL;
  const char *required = NULL;
  guint n = 0, n_required = 0;

  if (token[strspn (token, "abcdefghijklmnopqrstuvwxyz0123456789-")] == '\0')
    return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                       "'%s' is not key=value (put '!' between stages)", token);
  pspecs = g_object_class_list_properties (klass, &n);
  for (guint i = 0; i < n; i++)
    if (lp_stage_class_is_property_required (LP_STAGE_CLASS (klass), pspecs[i]->name))
      {
        required = pspecs[i]->name;
        n_required++;
      }
  if (n_required == 1 && !g_hash_table_contains (spec->set, required))
    return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                       "'%s' is not key=value; did you mean %s=%s?", token, required, token);
  return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                     "'%s' is not key=value (write PROPERTY=VALUE; `lpipe inspect %s` lists them)",
                     token, spec->name);
}

static gboolean
parse_launch (Loader             *ld,
              const char * const *argv,
              GError            **error)
{
  StageSpec *spec = NULL;
  gboolean expect_stage = TRUE;
  guint i;

  if (argv == NULL || argv[0] == NULL)
    return loader_error (ld, error, LP_PIPELINE_ERROR_EMPTY,
                         "no stage given; write: source key=value ! stage ... ! sink key=value");

  for (i = 0; argv[i]; i++)
    {
      const char *token = argv[i];

      if (strcmp (token, "!") == 0)
        {
          if (expect_stage)
            return launch_error (ld, error, "stage %u is empty: '!' %s",
                                 ld->specs->len + 1,
                                 i == 0 ? "comes before any stage" : "follows another '!'");
          expect_stage = TRUE;
          continue;
        }

      if (expect_stage)
        {
          if (strchr (token, '=') != NULL)
            {
              if (spec == NULL)
                return launch_error (ld, error, "property '%s' comes before any stage", token);
              return launch_error (ld, error, "stage %u is empty: '%s' follows '!' where a "
                                   "stage name is expected", ld->specs->len + 1, token);
            }
          spec = add_spec (ld);
          spec->name = g_strdup (token);
          if (!create_stage (ld, spec, error))
            return FALSE;
          expect_stage = FALSE;
          continue;
        }

      {
        const char *eq = strchr (token, '=');
        g_autofree char *key = NULL;

        if (eq == NULL)
          return bare_word_error (ld, spec, token, error);
        if (eq == token)
          return spec_error (ld, spec, error, LP_PIPELINE_ERROR_INVALID,
                             "'%s' has no property name before '='", token);
        key = g_strndup (token, eq - token);
        if (!set_property_text (ld, spec, key, eq + 1, error))
          return FALSE;
      }
    }

  if (expect_stage)
    return launch_error (ld, error, "'!' at the end, with no stage after it");

  for (i = 0; i < ld->specs->len; i++)
    if (!check_required (ld, g_ptr_array_index (ld->specs, i), error))
      return FALSE;

  return TRUE;
}

/**
 * lp_pipeline_parse_launch:
 * @self: an empty pipeline
 * @argv: (array zero-terminated=1): the words of a chain, as on the command
 *   line: `safetensors-source location=a.safetensors ! cast dtype=bf16 !
 *   safetensors-sink location=b.safetensors`
 * @error: return location for a #GError
 *
 * Builds a chain of stages from the inline `launch` syntax: a stage name,
 * then its `key=value` properties, `!` between stages. `!` is a word of its
 * own. Errors name "launch" and the stage; the pipeline is then left empty.
 *
 * Returns: %TRUE if the pipeline was built
 */
gboolean
lp_pipeline_parse_launch (LpPipeline          *self,
                          const char * const  *argv,
                          GError             **error)
{
  Loader ld;
  gboolean ok;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (lp_pipeline_get_n_stages (self) == 0, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  loader_init (&ld, self, "launch");
  ld.strict_chain = TRUE;
  ok = parse_launch (&ld, argv, error) && finish (&ld, NULL, error);
  loader_clear (&ld);
  if (!ok)
    lp_pipeline_clear (self);
  return ok;
}
