/* lp-stage.c: the base class of every pipeline stage, and one base class per role
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

/**
 * LpStage:
 *
 * The abstract base of every stage. A stage declares its properties once,
 * with #GParamSpec, and the pipeline file, `lpipe launch`, `lpipe inspect`,
 * the docs and the bindings all read that one declaration.
 *
 * Stage authors derive from a role class: #LpSource, #LpTransform, #LpSink
 * or #LpAggregator.
 */

typedef struct
{
  char *id;
  guint index;               /* 1-based position in the pipeline, 0 when alone */
  guint threads;
  GCancellable *cancellable;
  char *provenance;          /* a GRefString, shared by a pipeline's stages */
  gpointer pipeline;         /* weak: the pipeline outlives its run */
  GPtrArray *extra_inputs;   /* LpCheckpoint, during a run */
  /* lp_stage_set_progress_span(): what earlier pulls of one whole did, and
   * the whole's totals (tensors_total 0: none) */
  guint64 span_tensors_before, span_bytes_before, span_tensors_total, span_bytes_total;
} LpStagePrivate;

G_DEFINE_ABSTRACT_TYPE_WITH_PRIVATE (LpStage, lp_stage, G_TYPE_OBJECT)

/* Marks required properties on their GParamSpec. */
static GQuark required_quark (void);
G_DEFINE_QUARK (lp-stage-required, required)
static GQuark file_quark (void);
G_DEFINE_QUARK (lp-stage-file, file)

static void
lp_stage_dispose (GObject *object)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (LP_STAGE (object));

  g_clear_object (&priv->cancellable);
  g_clear_pointer (&priv->extra_inputs, g_ptr_array_unref);

  G_OBJECT_CLASS (lp_stage_parent_class)->dispose (object);
}

static void
lp_stage_finalize (GObject *object)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (LP_STAGE (object));

  g_free (priv->id);
  g_clear_pointer (&priv->provenance, g_ref_string_release);

  G_OBJECT_CLASS (lp_stage_parent_class)->finalize (object);
}

static gboolean
lp_stage_real_prepare (LpStage  *self,
                       GError  **error)
{
  return TRUE;
}

static void
lp_stage_class_init (LpStageClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->dispose = lp_stage_dispose;
  object_class->finalize = lp_stage_finalize;
  klass->prepare = lp_stage_real_prepare;
  klass->min_inputs = 1;
  klass->max_inputs = 1;
}

static void
lp_stage_init (LpStage *self)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);

  priv->threads = MAX (g_get_num_processors (), 1);
}

/**
 * lp_stage_class_set_metadata:
 * @klass: a stage class
 * @stage_name: the name used in pipeline files, lowercase with dashes
 * @category: a word that groups stages in `lpipe inspect`
 * @description: one line on what the stage does
 *
 * Names the stage. Call it in `class_init`.
 */
void
lp_stage_class_set_metadata (LpStageClass *klass,
                             const char   *stage_name,
                             const char   *category,
                             const char   *description)
{
  g_return_if_fail (LP_IS_STAGE_CLASS (klass));
  g_return_if_fail (stage_name != NULL);

  /* Class strings live as long as the type, which is never unloaded. */
  klass->stage_name = g_strdup (stage_name);
  klass->category = g_strdup (category ? category : "Misc");
  klass->description = g_strdup (description ? description : "");
}

/**
 * lp_stage_class_set_n_inputs:
 * @klass: a stage class
 * @min_inputs: the fewest inputs the stage takes
 * @max_inputs: the most inputs it takes (%G_MAXUINT for any number)
 *
 * Sets how many inputs the stage takes; the role class sets the usual number.
 */
void
lp_stage_class_set_n_inputs (LpStageClass *klass,
                             guint         min_inputs,
                             guint         max_inputs)
{
  g_return_if_fail (LP_IS_STAGE_CLASS (klass));
  g_return_if_fail (min_inputs <= max_inputs);

  klass->min_inputs = min_inputs;
  klass->max_inputs = max_inputs;
}

/**
 * lp_stage_class_set_property_required:
 * @klass: a stage class
 * @property: the name of one of its properties
 *
 * Marks a property that a pipeline must set.
 */
void
lp_stage_class_set_property_required (LpStageClass *klass,
                                      const char   *property)
{
  GParamSpec *pspec;

  g_return_if_fail (LP_IS_STAGE_CLASS (klass));

  pspec = g_object_class_find_property (G_OBJECT_CLASS (klass), property);
  g_return_if_fail (pspec != NULL);
  g_param_spec_set_qdata (pspec, required_quark (), GINT_TO_POINTER (1));
}

/**
 * lp_stage_class_is_property_required:
 * @klass: a stage class
 * @property: the name of one of its properties
 *
 * Returns: %TRUE if a pipeline must set @property
 */
gboolean
lp_stage_class_is_property_required (LpStageClass *klass,
                                     const char   *property)
{
  GParamSpec *pspec;

  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), FALSE);

  pspec = g_object_class_find_property (G_OBJECT_CLASS (klass), property);
  return pspec != NULL && g_param_spec_get_qdata (pspec, required_quark ()) != NULL;
}

/**
 * lp_stage_class_set_property_file:
 * @klass: a stage class
 * @property: the name of one of its string properties
 *
 * Marks a property whose value names a file (an input, an output, a report).
 * The provenance a sink records keeps only the file's name, without the
 * directories it was in; every other value is recorded as it was set, '/'
 * and all (a rename rule such as `a/b=c`).
 */
void
lp_stage_class_set_property_file (LpStageClass *klass,
                                  const char   *property)
{
  GParamSpec *pspec;

  g_return_if_fail (LP_IS_STAGE_CLASS (klass));

  pspec = g_object_class_find_property (G_OBJECT_CLASS (klass), property);
  g_return_if_fail (pspec != NULL && pspec->value_type == G_TYPE_STRING);
  g_param_spec_set_qdata (pspec, file_quark (), GINT_TO_POINTER (1));
}

/**
 * lp_stage_class_is_property_file:
 * @klass: a stage class
 * @property: the name of one of its properties
 *
 * Returns: %TRUE if @property names a file, see
 *   lp_stage_class_set_property_file()
 */
gboolean
lp_stage_class_is_property_file (LpStageClass *klass,
                                 const char   *property)
{
  GParamSpec *pspec;

  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), FALSE);

  pspec = g_object_class_find_property (G_OBJECT_CLASS (klass), property);
  return pspec != NULL && g_param_spec_get_qdata (pspec, file_quark ()) != NULL;
}

/**
 * lp_stage_class_get_stage_name:
 * @klass: a stage class
 *
 * Returns: (nullable): the stage's name in pipeline files
 */
const char *
lp_stage_class_get_stage_name (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), NULL);
  return klass->stage_name;
}

/**
 * lp_stage_class_get_category:
 * @klass: a stage class
 *
 * Returns: (nullable): the stage's category
 */
const char *
lp_stage_class_get_category (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), NULL);
  return klass->category;
}

/**
 * lp_stage_class_get_description:
 * @klass: a stage class
 *
 * Returns: (nullable): the stage's one-line description
 */
const char *
lp_stage_class_get_description (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), NULL);
  return klass->description;
}

/**
 * lp_stage_class_get_role:
 * @klass: a stage class
 *
 * Returns: what the stage consumes and produces
 */
LpStageRole
lp_stage_class_get_role (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), LP_STAGE_ROLE_TRANSFORM);
  return klass->role;
}

/**
 * lp_stage_class_get_min_inputs:
 * @klass: a stage class
 *
 * Returns: the fewest inputs the stage takes
 */
guint
lp_stage_class_get_min_inputs (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), 0);
  return klass->min_inputs;
}

/**
 * lp_stage_class_get_max_inputs:
 * @klass: a stage class
 *
 * Returns: the most inputs the stage takes
 */
guint
lp_stage_class_get_max_inputs (LpStageClass *klass)
{
  g_return_val_if_fail (LP_IS_STAGE_CLASS (klass), 0);
  return klass->max_inputs;
}

/**
 * lp_stage_get_stage_name:
 * @self: a stage
 *
 * Returns: (nullable): the name of the stage's type in pipeline files
 */
const char *
lp_stage_get_stage_name (LpStage *self)
{
  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  return LP_STAGE_GET_CLASS (self)->stage_name;
}

/**
 * lp_stage_get_id:
 * @self: a stage
 *
 * Returns: (nullable): the stage's id in its pipeline
 */
const char *
lp_stage_get_id (LpStage *self)
{
  LpStagePrivate *priv;

  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  priv = lp_stage_get_instance_private (self);
  return priv->id;
}

/**
 * lp_stage_set_id:
 * @self: a stage
 * @id: (nullable): the id that other stages name in their inputs
 *
 * Sets the stage's id.
 */
void
lp_stage_set_id (LpStage    *self,
                 const char *id)
{
  LpStagePrivate *priv;

  g_return_if_fail (LP_IS_STAGE (self));
  priv = lp_stage_get_instance_private (self);
  g_free (priv->id);
  priv->id = g_strdup (id);
}

/**
 * lp_stage_describe:
 * @self: a stage
 *
 * Describes the stage the way error messages name it: `stage 3 'lora-svd'
 * (id reduce)`.
 *
 * Returns: (transfer full): the description
 */
char *
lp_stage_describe (LpStage *self)
{
  LpStagePrivate *priv;
  GString *s;

  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  priv = lp_stage_get_instance_private (self);

  s = g_string_new ("stage");
  if (priv->index > 0)
    g_string_append_printf (s, " %u", priv->index);
  g_string_append_printf (s, " '%s'", lp_stage_get_stage_name (self) ? lp_stage_get_stage_name (self) : G_OBJECT_TYPE_NAME (self));
  if (priv->id)
    g_string_append_printf (s, " (id %s)", priv->id);
  return g_string_free (s, FALSE);
}

/**
 * lp_stage_get_threads:
 * @self: a stage
 *
 * Returns: how many threads the stage may use
 */
guint
lp_stage_get_threads (LpStage *self)
{
  LpStagePrivate *priv;

  g_return_val_if_fail (LP_IS_STAGE (self), 1);
  priv = lp_stage_get_instance_private (self);
  return priv->threads;
}

/**
 * lp_stage_set_threads:
 * @self: a stage
 * @threads: how many threads the stage may use, at least 1
 *
 * Sets the stage's thread budget; the pipeline passes its own on.
 */
void
lp_stage_set_threads (LpStage *self,
                      guint    threads)
{
  LpStagePrivate *priv;

  g_return_if_fail (LP_IS_STAGE (self));
  priv = lp_stage_get_instance_private (self);
  priv->threads = MAX (threads, 1);
}

/**
 * lp_stage_get_cancellable:
 * @self: a stage
 *
 * Returns: (transfer none) (nullable): the cancellable of the current run
 */
GCancellable *
lp_stage_get_cancellable (LpStage *self)
{
  LpStagePrivate *priv;

  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  priv = lp_stage_get_instance_private (self);
  return priv->cancellable;
}

typedef struct {
  LpStageParallelFunc func;
  gpointer user_data;
  GCancellable *cancellable;
  GError **errors;
} ParallelWork;

static void
parallel_item (gpointer data,
               gpointer user_data)
{
  ParallelWork *work = user_data;
  guint i = GPOINTER_TO_UINT (data) - 1;

  if (g_cancellable_set_error_if_cancelled (work->cancellable, &work->errors[i]))
    return;
  if (!work->func (i, work->user_data, &work->errors[i]) && work->errors[i] == NULL)
    g_set_error (&work->errors[i], LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                 "item %u failed for no stated reason", i);
}

/**
 * lp_stage_parallel_for:
 * @self: a stage, during its run
 * @n: how many items
 * @func: (scope call) (closure user_data): does one item
 * @user_data: data for @func
 * @error: return location for a #GError
 *
 * Runs @func for items 0 … @n - 1 on the stage's threads and waits for all
 * of them. Items not started when the run is cancelled fail as cancelled.
 * When several fail, the error of the first by index is returned, so the
 * message does not depend on scheduling.
 *
 * Returns: %TRUE when every item succeeded
 */
gboolean
lp_stage_parallel_for (LpStage            *self,
                       guint               n,
                       LpStageParallelFunc func,
                       gpointer            user_data,
                       GError            **error)
{
  ParallelWork work = { func, user_data, NULL, NULL };
  GThreadPool *pool;
  GError *first = NULL;
  guint threads;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  g_return_val_if_fail (func != NULL, FALSE);

  if (n == 0)
    return TRUE;
  work.cancellable = lp_stage_get_cancellable (self);
  work.errors = g_new0 (GError *, n);
  threads = MIN (MAX (lp_stage_get_threads (self), 1), n);
  if (threads == 1)
    for (guint i = 0; i < n; i++)
      parallel_item (GUINT_TO_POINTER (i + 1), &work);
  else
    {
      pool = g_thread_pool_new (parallel_item, &work, threads, FALSE, NULL);
      for (guint i = 0; i < n; i++)
        g_thread_pool_push (pool, GUINT_TO_POINTER (i + 1), NULL);
      g_thread_pool_free (pool, FALSE, TRUE);
    }
  for (guint i = 0; i < n; i++)
    if (work.errors[i] != NULL)
      {
        if (first == NULL)
          first = work.errors[i];
        else
          g_error_free (work.errors[i]);
      }
  g_free (work.errors);
  if (first != NULL)
    g_propagate_error (error, first);
  return first == NULL;
}

/**
 * lp_stage_set_cancellable:
 * @self: a stage
 * @cancellable: (nullable): a cancellable
 *
 * Sets the cancellable that long work in the stage checks.
 */
void
lp_stage_set_cancellable (LpStage      *self,
                          GCancellable *cancellable)
{
  LpStagePrivate *priv;

  g_return_if_fail (LP_IS_STAGE (self));
  priv = lp_stage_get_instance_private (self);
  g_set_object (&priv->cancellable, cancellable);
}

/**
 * lp_stage_get_provenance:
 * @self: a stage
 *
 * Returns: (nullable): what produced the data (pipeline and parameters), for
 *   sinks to record
 */
const char *
lp_stage_get_provenance (LpStage *self)
{
  LpStagePrivate *priv;

  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  priv = lp_stage_get_instance_private (self);
  return priv->provenance;
}

/**
 * lp_stage_set_provenance:
 * @self: a stage
 * @provenance: (nullable): a description of what produced the data
 *
 * Sets the provenance that sinks record in their output.
 */
void
lp_stage_set_provenance (LpStage    *self,
                         const char *provenance)
{
  LpStagePrivate *priv;

  g_return_if_fail (LP_IS_STAGE (self));
  priv = lp_stage_get_instance_private (self);
  g_clear_pointer (&priv->provenance, g_ref_string_release);
  priv->provenance = provenance ? g_ref_string_new (provenance) : NULL;
}

/**
 * lp_stage_dup_provenance_after:
 * @self: a stage
 * @previous: (nullable): the provenance recorded in the input, if any
 *
 * The provenance a sink records: the stage's own record, with @previous
 * kept as the last entry of its `history` array (the records of @previous's
 * own history before it, oldest first), so a file made from a file made by
 * lpipe tells every step. A @previous that is not a JSON object is kept as
 * a string.
 *
 * Returns: (transfer full) (nullable): the record, or %NULL when the stage
 *   has no provenance
 */
char *
lp_stage_dup_provenance_after (LpStage    *self,
                               const char *previous)
{
  LpStagePrivate *priv;
  g_autoptr(JsonParser) own = NULL, old = NULL;
  g_autoptr(JsonGenerator) gen = NULL;
  JsonObject *record;
  JsonArray *history;
  JsonNode *old_root;

  g_return_val_if_fail (LP_IS_STAGE (self), NULL);
  priv = lp_stage_get_instance_private (self);
  if (priv->provenance == NULL)
    return NULL;
  if (previous == NULL)
    return g_strdup (priv->provenance);

  own = json_parser_new ();
  if (!json_parser_load_from_data (own, priv->provenance, -1, NULL)
      || !JSON_NODE_HOLDS_OBJECT (json_parser_get_root (own)))
    return g_strdup (priv->provenance);
  record = json_node_get_object (json_parser_get_root (own));
  history = json_array_new ();

  old = json_parser_new ();
  if (json_parser_load_from_data (old, previous, -1, NULL)
      && JSON_NODE_HOLDS_OBJECT (old_root = json_parser_get_root (old)))
    {
      JsonObject *old_record = json_node_get_object (old_root);
      JsonNode *old_history = json_object_get_member (old_record, "history");

      if (old_history != NULL && JSON_NODE_HOLDS_ARRAY (old_history))
        {
          JsonArray *entries = json_node_get_array (old_history);
          for (guint i = 0; i < json_array_get_length (entries); i++)
            json_array_add_element (history, json_node_copy (json_array_get_element (entries, i)));
        }
      json_object_remove_member (old_record, "history");
      json_array_add_element (history, json_node_copy (old_root));
    }
  else
    json_array_add_string_element (history, previous);
  json_object_set_array_member (record, "history", history);

  gen = json_generator_new ();
  json_generator_set_root (gen, json_parser_get_root (own));
  return json_generator_to_data (gen, NULL);
}

/* The runner gives every stage the same provenance, which grows with the
 * number of stages: shared, not copied, or N stages cost N^2 bytes. */
void
lp_stage_share_provenance (LpStage *self,
                           char    *provenance)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);

  g_clear_pointer (&priv->provenance, g_ref_string_release);
  priv->provenance = provenance ? g_ref_string_acquire (provenance) : NULL;
}

void
lp_stage_set_pipeline_context (LpStage       *self,
                               gpointer       pipeline,
                               guint          index,
                               LpCheckpoint **extra_inputs,
                               guint          n_extra)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);

  priv->pipeline = pipeline;
  priv->index = index;
  g_clear_pointer (&priv->extra_inputs, g_ptr_array_unref);
  if (n_extra > 0)
    {
      priv->extra_inputs = g_ptr_array_new_with_free_func (g_object_unref);
      for (guint i = 0; i < n_extra; i++)
        g_ptr_array_add (priv->extra_inputs, g_object_ref (extra_inputs[i]));
    }
}

guint
lp_stage_get_index (LpStage *self)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);
  return priv->index;
}

gpointer
lp_stage_get_pipeline_context (LpStage *self)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);
  return priv->pipeline;
}

static GStrv
writable_property_names (LpStage *self)
{
  g_autofree GParamSpec **pspecs = NULL;
  guint n = 0;
  GPtrArray *names = g_ptr_array_new ();

  pspecs = g_object_class_list_properties (G_OBJECT_GET_CLASS (self), &n);
  for (guint i = 0; i < n; i++)
    if ((pspecs[i]->flags & G_PARAM_WRITABLE) && !(pspecs[i]->flags & G_PARAM_CONSTRUCT_ONLY))
      g_ptr_array_add (names, g_strdup (pspecs[i]->name));
  g_ptr_array_add (names, NULL);
  return (GStrv) g_ptr_array_free (names, FALSE);
}

static GParamSpec *
find_writable_property (LpStage     *self,
                        const char  *property,
                        GError     **error)
{
  GParamSpec *pspec;

  pspec = g_object_class_find_property (G_OBJECT_GET_CLASS (self), property);
  if (pspec == NULL || !(pspec->flags & G_PARAM_WRITABLE) || (pspec->flags & G_PARAM_CONSTRUCT_ONLY))
    {
      g_auto(GStrv) names = writable_property_names (self);
      g_autofree char *close = lp_suggest_closest (property, (const char * const *) names);

      if (close)
        g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
                     "unknown property '%s'; did you mean '%s'?", property, close);
      else
        g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
                     "unknown property '%s' (see `lpipe inspect %s`)", property,
                     lp_stage_get_stage_name (self) ? lp_stage_get_stage_name (self) : "");
      return NULL;
    }
  return pspec;
}

/**
 * lp_stage_set_property_from_string:
 * @self: a stage
 * @property: a property name
 * @value: the value as text, as in `lpipe launch` (`rank=4`, `dtype=bf16`)
 * @error: return location for a #GError
 *
 * Sets a property from text, converted through its #GParamSpec. An unknown
 * property, a value of the wrong type or out of range is an error
 * (%LP_PIPELINE_ERROR), never clamped.
 *
 * Returns: %TRUE if the property was set
 */
gboolean
lp_stage_set_property_from_string (LpStage     *self,
                                   const char  *property,
                                   const char  *value,
                                   GError     **error)
{
  GParamSpec *pspec;
  g_auto(GValue) v = G_VALUE_INIT;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  g_return_val_if_fail (property != NULL && value != NULL, FALSE);

  pspec = find_writable_property (self, property, error);
  if (pspec == NULL)
    return FALSE;
  if (!lp_value_from_string (pspec, value, &v, error))
    return FALSE;
  g_object_set_property (G_OBJECT (self), pspec->name, &v);
  return TRUE;
}

/**
 * lp_stage_set_property_checked:
 * @self: a stage
 * @property: a property name
 * @value: the value
 * @error: return location for a #GError
 *
 * Sets a property like g_object_set_property(), but reports an unknown
 * property, a value that does not convert, or one out of range as an error
 * instead of a warning, and never clamps.
 *
 * Returns: %TRUE if the property was set
 */
gboolean
lp_stage_set_property_checked (LpStage       *self,
                               const char    *property,
                               const GValue  *value,
                               GError       **error)
{
  GParamSpec *pspec;
  g_auto(GValue) v = G_VALUE_INIT;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  g_return_val_if_fail (property != NULL && G_IS_VALUE (value), FALSE);

  pspec = find_writable_property (self, property, error);
  if (pspec == NULL)
    return FALSE;

  if (G_VALUE_HOLDS_STRING (value) && !g_type_is_a (pspec->value_type, G_TYPE_STRING))
    return lp_stage_set_property_from_string (self, property, g_value_get_string (value), error);

  g_value_init (&v, pspec->value_type);
  if (!g_value_type_transformable (G_VALUE_TYPE (value), pspec->value_type) ||
      !g_value_transform (value, &v))
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                   "property '%s' takes %s, not %s", pspec->name,
                   g_type_name (pspec->value_type), G_VALUE_TYPE_NAME (value));
      return FALSE;
    }
  if (g_param_value_validate (pspec, &v))
    {
      g_autofree char *text = g_strdup_value_contents (value);
      g_autofree char *range = lp_param_spec_describe_type (pspec);
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                   "property '%s': %s is out of range (%s)", pspec->name, text, range);
      return FALSE;
    }
  g_object_set_property (G_OBJECT (self), pspec->name, &v);
  return TRUE;
}

/**
 * lp_stage_prepare:
 * @self: a stage
 * @error: return location for a #GError
 *
 * Checks the stage's properties against each other before anything runs.
 *
 * Returns: %TRUE if the stage can run
 */
gboolean
lp_stage_prepare (LpStage  *self,
                  GError  **error)
{
  LpStageClass *klass;
  g_autofree GParamSpec **pspecs = NULL;
  guint n = 0;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  klass = LP_STAGE_GET_CLASS (self);

  /* A required string property left at its default NULL or "" is missing. */
  pspecs = g_object_class_list_properties (G_OBJECT_CLASS (klass), &n);
  for (guint i = 0; i < n; i++)
    {
      if (g_param_spec_get_qdata (pspecs[i], required_quark ()) == NULL)
        continue;
      if (G_IS_PARAM_SPEC_STRING (pspecs[i]))
        {
          g_autofree char *s = NULL;
          g_object_get (self, pspecs[i]->name, &s, NULL);
          if (s == NULL || *s == '\0')
            {
              g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_MISSING_PROPERTY,
                           "property '%s' is required", pspecs[i]->name);
              return FALSE;
            }
        }
    }
  return klass->prepare (self, error);
}

/**
 * lp_stage_run:
 * @self: a stage
 * @inputs: (array length=n_inputs): the input checkpoints
 * @n_inputs: how many inputs
 * @output: (out) (optional) (nullable) (transfer full): the output checkpoint,
 *   %NULL for sinks
 * @error: return location for a #GError
 *
 * Runs the stage once on its inputs. Pipelines call this; tests and scripts
 * may too, to run one stage alone.
 *
 * Returns: %TRUE on success
 */
gboolean
lp_stage_run (LpStage       *self,
              LpCheckpoint **inputs,
              guint          n_inputs,
              LpCheckpoint **output,
              GError       **error)
{
  LpStageClass *klass;
  LpCheckpoint *out = NULL;
  gboolean ok;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  klass = LP_STAGE_GET_CLASS (self);

  if (n_inputs < klass->min_inputs || n_inputs > klass->max_inputs)
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY,
                   "takes %u to %u inputs, got %u", klass->min_inputs, klass->max_inputs, n_inputs);
      return FALSE;
    }
  ok = klass->run (self, inputs, n_inputs, &out, error);
  g_return_val_if_fail (ok == (error == NULL || *error == NULL), FALSE);
  if (output)
    *output = out;
  else
    g_clear_object (&out);
  return ok;
}

/**
 * lp_stage_report_progress:
 * @self: a stage
 * @tensors_done: tensors finished
 * @tensors_total: tensors in all
 * @bytes_done: bytes finished
 * @bytes_total: bytes in all
 *
 * Tells the pipeline how far the stage has got; it emits
 * #LpPipeline::progress. Call from the thread that runs the pipeline.
 */
void
lp_stage_report_progress (LpStage *self,
                          guint64  tensors_done,
                          guint64  tensors_total,
                          guint64  bytes_done,
                          guint64  bytes_total)
{
  LpStagePrivate *priv;

  g_return_if_fail (LP_IS_STAGE (self));
  priv = lp_stage_get_instance_private (self);
  if (priv->span_tensors_total > 0)
    {
      tensors_done += priv->span_tensors_before;
      bytes_done += priv->span_bytes_before;
      tensors_total = priv->span_tensors_total;
      bytes_total = priv->span_bytes_total;
    }
  if (priv->pipeline)
    lp_pipeline_emit_progress (priv->pipeline, tensors_done, tensors_total, bytes_done, bytes_total);
}

void
lp_stage_set_progress_span (LpStage *self,
                            guint64  tensors_before,
                            guint64  bytes_before,
                            guint64  tensors_total,
                            guint64  bytes_total)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);

  priv->span_tensors_before = tensors_before;
  priv->span_bytes_before = bytes_before;
  priv->span_tensors_total = tensors_total;
  priv->span_bytes_total = bytes_total;
}

/* lp_stage_pull_tensors(): computes tensors on a pool and hands them over in
 * order. `threads` workers compute; a few more tensors than workers may be
 * queued, because neighbours often share one computation (the two factors of
 * a LoRA module), and a new one is started only while the bytes not yet
 * handed over stay under a budget, so memory is bounded by a few tensors
 * whatever the checkpoint's size. */

#define PULL_BYTES_BUDGET (64 * 1024 * 1024)
#define PULL_QUEUE_PER_THREAD 4

typedef struct {
  LpTensor *tensor;
  GBytes *bytes;
  GError *error;
  gboolean done;
  guint run;        /* slots from this one that one worker computes in turn */
} PullSlot;

typedef struct {
  GMutex lock;
  GCond cond;
  PullSlot *slots;
} PullState;

static void
pull_worker (gpointer data,
             gpointer user_data)
{
  PullState *state = user_data;
  PullSlot *first = data;

  /* A run is a compute group: its first tensor does the shared work, and the
   * others find it done. */
  for (guint k = 0; k < MAX (first->run, 1); k++)
    {
      PullSlot *slot = first + k;
      GError *local_error = NULL;
      GBytes *bytes = lp_tensor_dup_data (slot->tensor, &local_error);

      g_mutex_lock (&state->lock);
      slot->bytes = bytes;
      slot->error = local_error;
      slot->done = TRUE;
      g_cond_broadcast (&state->cond);
      g_mutex_unlock (&state->lock);
    }
}

static gboolean
pull_tensors (LpStage              *self,
              LpCheckpoint         *checkpoint,
              LpTensorDataCallback  callback,
              gpointer              user_data,
              GError              **error)
{
  LpStagePrivate *priv;
  guint n, threads, next = 0;
  guint64 bytes_total, bytes_done = 0, in_flight = 0;
  PullState state;
  GThreadPool *pool = NULL;
  gboolean ok = TRUE;
  GError *local_error = NULL;

  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  g_return_val_if_fail (LP_IS_CHECKPOINT (checkpoint), FALSE);
  g_return_val_if_fail (callback != NULL, FALSE);

  priv = lp_stage_get_instance_private (self);
  n = lp_checkpoint_get_n_tensors (checkpoint);
  bytes_total = lp_checkpoint_get_n_bytes (checkpoint);
  threads = MAX (priv->threads, 1);

  g_mutex_init (&state.lock);
  g_cond_init (&state.cond);
  state.slots = g_new0 (PullSlot, MAX (n, 1));
  for (guint i = 0; i < n; i++)
    state.slots[i].tensor = lp_checkpoint_get_tensor (checkpoint, i);

  if (threads > 1 && n > 1)
    pool = g_thread_pool_new (pull_worker, &state, (gint) threads, FALSE, NULL);

  lp_stage_report_progress (self, 0, n, 0, bytes_total);

  for (guint i = 0; i < n && ok; i++)
    {
      PullSlot *slot = &state.slots[i];

      if (g_cancellable_set_error_if_cancelled (priv->cancellable, &local_error))
        {
          ok = FALSE;
          break;
        }

      if (pool)
        {
          /* Keep the pool busy, within the thread and byte budgets. */
          while (next < n && next - i < threads * PULL_QUEUE_PER_THREAD &&
                 (next == i || in_flight + lp_tensor_get_n_bytes (state.slots[next].tensor) <= PULL_BYTES_BUDGET))
            {
              PullSlot *start = &state.slots[next];
              gpointer group = lp_tensor_get_compute_group (start->tensor);

              start->run = 0;
              do
                {
                  in_flight += lp_tensor_get_n_bytes (state.slots[next].tensor);
                  start->run++;
                  next++;
                }
              while (group != NULL && next < n &&
                     lp_tensor_get_compute_group (state.slots[next].tensor) == group);
              g_thread_pool_push (pool, start, NULL);
            }
          g_mutex_lock (&state.lock);
          while (!slot->done)
            g_cond_wait (&state.cond, &state.lock);
          g_mutex_unlock (&state.lock);
        }
      else
        {
          slot->run = 1;
          pull_worker (slot, &state);
        }

      if (slot->error)
        {
          local_error = g_steal_pointer (&slot->error);
          ok = FALSE;
        }
      else
        {
          ok = callback (slot->tensor, slot->bytes, user_data, &local_error);
          bytes_done += lp_tensor_get_n_bytes (slot->tensor);
          if (ok)
            lp_stage_report_progress (self, i + 1, n, bytes_done, bytes_total);
        }
      g_clear_pointer (&slot->bytes, g_bytes_unref);
      if (pool)
        in_flight -= lp_tensor_get_n_bytes (slot->tensor);
    }

  if (pool)
    {
      /* Wait for what is still running; its results are dropped. */
      g_thread_pool_free (pool, FALSE, TRUE);
    }
  for (guint i = 0; i < n; i++)
    {
      g_clear_pointer (&state.slots[i].bytes, g_bytes_unref);
      g_clear_error (&state.slots[i].error);
    }
  g_free (state.slots);
  g_mutex_clear (&state.lock);
  g_cond_clear (&state.cond);

  if (!ok)
    {
      g_propagate_error (error, local_error);
      return FALSE;
    }
  return TRUE;
}

/* lp_stage_pull_tensors_unordered(): the workers claim compute groups in
 * checkpoint order themselves and hand each tensor to the callback, so no
 * thread wakes another per tensor (on a virtual machine every wakeup is an
 * interrupt between cores). The calling thread only waits, and reports
 * progress every PROGRESS_PERIOD. A worker starts a group only while the
 * bytes being computed stay within PULL_BYTES_BUDGET (or nothing else is
 * in flight), so big tensors wait for room instead of piling up. */

#define PROGRESS_PERIOD (50 * G_TIME_SPAN_MILLISECOND)

typedef struct {
  GMutex lock;
  GCond cond;
  LpCheckpoint *checkpoint;
  guint n;
  guint next;              /* the first tensor not claimed yet */
  guint64 tensors_done;
  guint64 bytes_done;
  guint64 in_flight;       /* bytes of the groups being computed */
  guint waiting;           /* workers waiting for room in the budget */
  guint running;           /* workers not finished */
  gboolean stop;
  guint error_index;       /* of @error: the earliest failed tensor */
  GError *error;
  GCancellable *cancellable;
  LpTensorDataCallback callback;
  gpointer user_data;
  LpStage *inline_stage;   /* set when the calling thread is the worker */
  guint64 bytes_total;
} UnorderedPull;

static void
unordered_worker (gpointer data,
                  gpointer user_data)
{
  UnorderedPull *u = user_data;

  g_mutex_lock (&u->lock);
  while (!u->stop && u->next < u->n && !g_cancellable_is_cancelled (u->cancellable))
    {
      guint first = u->next, last = first;
      gpointer group = lp_tensor_get_compute_group (lp_checkpoint_get_tensor (u->checkpoint, first));
      guint64 group_bytes = 0;

      /* a whole compute group: its first tensor does the shared work */
      do
        group_bytes += lp_tensor_get_n_bytes (lp_checkpoint_get_tensor (u->checkpoint, last++));
      while (group != NULL && last < u->n &&
             lp_tensor_get_compute_group (lp_checkpoint_get_tensor (u->checkpoint, last)) == group);

      /* within the byte budget, unless nothing else is in flight */
      if (u->in_flight > 0 && u->in_flight + group_bytes > PULL_BYTES_BUDGET)
        {
          u->waiting++;
          g_cond_wait (&u->cond, &u->lock);
          u->waiting--;
          continue;
        }
      u->next = last;
      u->in_flight += group_bytes;
      g_mutex_unlock (&u->lock);

      for (guint i = first; i < last; i++)
        {
          LpTensor *tensor = lp_checkpoint_get_tensor (u->checkpoint, i);
          GError *local_error = NULL;
          GBytes *bytes = lp_tensor_dup_data (tensor, &local_error);
          gboolean ok = bytes != NULL && u->callback (tensor, bytes, u->user_data, &local_error);

          g_clear_pointer (&bytes, g_bytes_unref);
          g_mutex_lock (&u->lock);
          u->in_flight -= lp_tensor_get_n_bytes (tensor);
          if (u->waiting > 0)
            g_cond_broadcast (&u->cond);   /* room for the next group, maybe */
          if (ok)
            {
              u->tensors_done++;
              u->bytes_done += lp_tensor_get_n_bytes (tensor);
              g_mutex_unlock (&u->lock);
              if (u->inline_stage)
                lp_stage_report_progress (u->inline_stage, u->tensors_done, u->n, u->bytes_done, u->bytes_total);
              continue;
            }
          g_assert (local_error != NULL);
          u->stop = TRUE;
          for (guint j = i + 1; j < last; j++)
            u->in_flight -= lp_tensor_get_n_bytes (lp_checkpoint_get_tensor (u->checkpoint, j));
          g_cond_broadcast (&u->cond);
          if (u->error == NULL || i < u->error_index)
            {
              g_clear_error (&u->error);
              u->error = local_error;
              u->error_index = i;
            }
          else
            g_error_free (local_error);
          g_mutex_unlock (&u->lock);
          break;
        }
      g_mutex_lock (&u->lock);
    }
  u->running--;
  g_cond_broadcast (&u->cond);
  g_mutex_unlock (&u->lock);
}

static gboolean
pull_tensors_unordered (LpStage              *self,
                        LpCheckpoint         *checkpoint,
                        LpTensorDataCallback  callback,
                        gpointer              user_data,
                        GError              **error)
{
  LpStagePrivate *priv = lp_stage_get_instance_private (self);
  UnorderedPull u = { 0, };
  guint threads = MAX (priv->threads, 1);
  guint64 bytes_total = lp_checkpoint_get_n_bytes (checkpoint);
  guint64 reported = 0;

  g_mutex_init (&u.lock);
  g_cond_init (&u.cond);
  u.checkpoint = checkpoint;
  u.n = lp_checkpoint_get_n_tensors (checkpoint);
  u.cancellable = priv->cancellable;
  u.callback = callback;
  u.user_data = user_data;

  lp_stage_report_progress (self, 0, u.n, 0, bytes_total);
  u.bytes_total = bytes_total;
  if (threads == 1 || u.n <= 1)
    {
      u.running = 1;
      u.inline_stage = self;
      unordered_worker (NULL, &u);
    }
  else
    {
      GThreadPool *pool = g_thread_pool_new (unordered_worker, &u, (gint) threads, FALSE, NULL);

      u.running = threads;
      for (guint i = 0; i < threads; i++)
        g_thread_pool_push (pool, GUINT_TO_POINTER (i + 1), NULL);

      g_mutex_lock (&u.lock);
      while (u.running > 0)
        {
          gint64 until = g_get_monotonic_time () + PROGRESS_PERIOD;
          if (g_cond_wait_until (&u.cond, &u.lock, until) || u.tensors_done == reported)
            continue;
          guint64 done = reported = u.tensors_done, bytes = u.bytes_done;
          g_mutex_unlock (&u.lock);
          lp_stage_report_progress (self, done, u.n, bytes, bytes_total);
          g_mutex_lock (&u.lock);
        }
      g_mutex_unlock (&u.lock);
      g_thread_pool_free (pool, FALSE, TRUE);
    }

  g_mutex_clear (&u.lock);
  g_cond_clear (&u.cond);
  if (u.error == NULL && u.tensors_done < u.n)
    g_cancellable_set_error_if_cancelled (u.cancellable, &u.error);
  if (u.error != NULL)
    {
      g_propagate_error (error, u.error);
      return FALSE;
    }
  g_assert (u.tensors_done == u.n);
  if (u.inline_stage == NULL || u.n == 0)
    lp_stage_report_progress (self, u.n, u.n, u.bytes_done, bytes_total);
  return TRUE;
}

/**
 * lp_stage_pull_tensors:
 * @self: the stage that consumes the data (its threads, cancellable and
 *   progress are used)
 * @checkpoint: the checkpoint to pull
 * @callback: (scope call) (closure user_data): receives each tensor's data, in order
 * @user_data: data for @callback
 * @error: return location for a #GError
 *
 * Computes the data of every tensor of @checkpoint, up to
 * lp_stage_get_threads() at once, and gives it to @callback in checkpoint
 * order on the calling thread, so that what a sink writes does not depend on
 * the number of threads. Checks the stage's cancellable between tensors and
 * reports progress.
 *
 * Returns: %TRUE if every tensor was handed over
 */
gboolean
lp_stage_pull_tensors (LpStage              *self,
                       LpCheckpoint         *checkpoint,
                       LpTensorDataCallback  callback,
                       gpointer              user_data,
                       GError              **error)
{
  return pull_tensors (self, checkpoint, callback, user_data, error);
}

/**
 * lp_stage_pull_tensors_unordered:
 * @self: the stage that consumes the data (its threads, cancellable and
 *   progress are used)
 * @checkpoint: the checkpoint to pull
 * @callback: (scope call) (closure user_data): receives each tensor's data
 * @user_data: data for @callback
 * @error: return location for a #GError
 *
 * Like lp_stage_pull_tensors(), but @callback runs on the worker that
 * computed the tensor, as soon as it is done, in no particular order and
 * concurrently with itself: for sinks that know where each tensor goes (a
 * safetensors file, whose header gives every offset) and can write them in
 * parallel. @callback must be thread-safe. Tensors are started in
 * checkpoint order, and when one fails the others still running finish and
 * the error of the earliest failed tensor is returned. Progress is reported
 * from the calling thread, at the start, every 50 ms and at the end.
 *
 * Returns: %TRUE if every tensor was handed over
 */
gboolean
lp_stage_pull_tensors_unordered (LpStage              *self,
                                 LpCheckpoint         *checkpoint,
                                 LpTensorDataCallback  callback,
                                 gpointer              user_data,
                                 GError              **error)
{
  g_return_val_if_fail (LP_IS_STAGE (self), FALSE);
  g_return_val_if_fail (LP_IS_CHECKPOINT (checkpoint), FALSE);
  g_return_val_if_fail (callback != NULL, FALSE);

  return pull_tensors_unordered (self, checkpoint, callback, user_data, error);
}

/**
 * LpSource:
 *
 * A stage with no input and one output: it reads or makes a checkpoint.
 */
G_DEFINE_ABSTRACT_TYPE (LpSource, lp_source, LP_TYPE_STAGE)

/**
 * LpSourceClass::create:
 * @self: the source
 * @error: return location for a #GError
 *
 * Makes the checkpoint this source provides.
 *
 * Returns: (transfer full): the checkpoint, or %NULL with @error set
 */

static gboolean
lp_source_run (LpStage       *stage,
               LpCheckpoint **inputs,
               guint          n_inputs,
               LpCheckpoint **output,
               GError       **error)
{
  LpSourceClass *klass = LP_SOURCE_GET_CLASS (stage);

  g_return_val_if_fail (klass->create != NULL, FALSE);
  *output = klass->create (LP_SOURCE (stage), error);
  return *output != NULL;
}

static void
lp_source_class_init (LpSourceClass *klass)
{
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);

  stage_class->run = lp_source_run;
  stage_class->role = LP_STAGE_ROLE_SOURCE;
  stage_class->min_inputs = 0;
  stage_class->max_inputs = 0;
}

static void
lp_source_init (LpSource *self)
{
}

/**
 * LpTransform:
 *
 * A stage with one input and one output. Override `transform` to build the
 * whole output, or just `transform_tensor` to map tensors one by one.
 */
G_DEFINE_ABSTRACT_TYPE (LpTransform, lp_transform, LP_TYPE_STAGE)

/**
 * LpTransformClass::transform:
 * @self: the transform
 * @input: (transfer none): the checkpoint to transform
 * @error: return location for a #GError
 *
 * Makes the output from the input. The default calls
 * LpTransformClass::transform_tensor on each tensor and keeps the metadata.
 *
 * Returns: (transfer full): the output, or %NULL with @error set
 */

/**
 * LpTransformClass::transform_tensor:
 * @self: the transform
 * @tensor: (transfer none): a tensor of the input
 * @error: return location for a #GError
 *
 * Maps one tensor of the input to the output.
 *
 * Returns: (transfer full) (nullable): the tensor to put in place of @tensor
 *   (@tensor itself to keep it), or %NULL with no error to drop it
 */

static LpCheckpoint *
lp_transform_real_transform (LpTransform   *self,
                             LpCheckpoint  *input,
                             GError       **error)
{
  LpTransformClass *klass = LP_TRANSFORM_GET_CLASS (self);
  g_autoptr(LpCheckpoint) output = lp_checkpoint_new_like (input);
  guint n = lp_checkpoint_get_n_tensors (input);

  if (klass->transform_tensor == NULL)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "the stage implements neither transform nor transform_tensor");
      return NULL;
    }
  for (guint i = 0; i < n; i++)
    {
      LpTensor *in = lp_checkpoint_get_tensor (input, i);
      g_autoptr(LpTensor) out = NULL;
      GError *local_error = NULL;

      out = klass->transform_tensor (self, in, &local_error);
      if (local_error)
        {
          g_propagate_prefixed_error (error, local_error, "tensor '%s': ", lp_tensor_get_name (in));
          return NULL;
        }
      if (out && !lp_checkpoint_add_tensor (output, out, error))
        return NULL;
    }
  return g_steal_pointer (&output);
}

static gboolean
lp_transform_run (LpStage       *stage,
                  LpCheckpoint **inputs,
                  guint          n_inputs,
                  LpCheckpoint **output,
                  GError       **error)
{
  LpTransformClass *klass = LP_TRANSFORM_GET_CLASS (stage);
  LpStagePrivate *priv = lp_stage_get_instance_private (stage);
  gboolean set_extra = n_inputs > 1 && priv->extra_inputs == NULL;

  /* Run alone (not by a pipeline), the extra inputs come from here. */
  if (set_extra)
    {
      priv->extra_inputs = g_ptr_array_new_with_free_func (g_object_unref);
      for (guint i = 1; i < n_inputs; i++)
        g_ptr_array_add (priv->extra_inputs, g_object_ref (inputs[i]));
    }
  *output = klass->transform (LP_TRANSFORM (stage), inputs[0], error);
  if (set_extra)
    g_clear_pointer (&priv->extra_inputs, g_ptr_array_unref);
  /* The output's bytes come from the inputs' files. */
  for (guint i = 0; *output != NULL && i < n_inputs; i++)
    lp_checkpoint_inherit_sources (*output, inputs[i]);
  if (*output != NULL && priv->extra_inputs != NULL)
    for (guint i = 0; i < priv->extra_inputs->len; i++)
      lp_checkpoint_inherit_sources (*output, g_ptr_array_index (priv->extra_inputs, i));
  return *output != NULL;
}

static void
lp_transform_class_init (LpTransformClass *klass)
{
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);

  stage_class->run = lp_transform_run;
  stage_class->role = LP_STAGE_ROLE_TRANSFORM;
  klass->transform = lp_transform_real_transform;
}

static void
lp_transform_init (LpTransform *self)
{
}

/**
 * lp_transform_get_extra_input:
 * @self: a transform
 * @index: 0 for the second input, 1 for the third...
 *
 * Gets an optional extra input, for transforms whose class allows more than
 * one (lp_stage_class_set_n_inputs()). Valid while the stage runs.
 *
 * Returns: (transfer none) (nullable): the checkpoint, or %NULL if not connected
 */
LpCheckpoint *
lp_transform_get_extra_input (LpTransform *self,
                              guint        index)
{
  LpStagePrivate *priv;

  g_return_val_if_fail (LP_IS_TRANSFORM (self), NULL);
  priv = lp_stage_get_instance_private (LP_STAGE (self));
  if (priv->extra_inputs == NULL || index >= priv->extra_inputs->len)
    return NULL;
  return g_ptr_array_index (priv->extra_inputs, index);
}

/**
 * LpSink:
 *
 * A stage with one input and no output: it writes or checks a checkpoint.
 */
G_DEFINE_ABSTRACT_TYPE (LpSink, lp_sink, LP_TYPE_STAGE)

static gboolean
lp_sink_run (LpStage       *stage,
             LpCheckpoint **inputs,
             guint          n_inputs,
             LpCheckpoint **output,
             GError       **error)
{
  LpSinkClass *klass = LP_SINK_GET_CLASS (stage);

  g_return_val_if_fail (klass->consume != NULL, FALSE);
  *output = NULL;
  return klass->consume (LP_SINK (stage), inputs[0], error);
}

static void
lp_sink_class_init (LpSinkClass *klass)
{
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);

  stage_class->run = lp_sink_run;
  stage_class->role = LP_STAGE_ROLE_SINK;
}

static void
lp_sink_init (LpSink *self)
{
}

/**
 * LpAggregator:
 *
 * A stage with several inputs and one output, such as a merge.
 */
G_DEFINE_ABSTRACT_TYPE (LpAggregator, lp_aggregator, LP_TYPE_STAGE)

/**
 * LpAggregatorClass::aggregate:
 * @self: the aggregator
 * @inputs: (array length=n_inputs) (transfer none): the input checkpoints, in
 *   the order the pipeline lists them
 * @n_inputs: the number of inputs
 * @error: return location for a #GError
 *
 * Combines the inputs into one checkpoint.
 *
 * Returns: (transfer full): the output, or %NULL with @error set
 */

static gboolean
lp_aggregator_run (LpStage       *stage,
                   LpCheckpoint **inputs,
                   guint          n_inputs,
                   LpCheckpoint **output,
                   GError       **error)
{
  LpAggregatorClass *klass = LP_AGGREGATOR_GET_CLASS (stage);

  g_return_val_if_fail (klass->aggregate != NULL, FALSE);
  *output = klass->aggregate (LP_AGGREGATOR (stage), inputs, n_inputs, error);
  for (guint i = 0; *output != NULL && i < n_inputs; i++)
    lp_checkpoint_inherit_sources (*output, inputs[i]);
  return *output != NULL;
}

static void
lp_aggregator_class_init (LpAggregatorClass *klass)
{
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);

  stage_class->run = lp_aggregator_run;
  stage_class->role = LP_STAGE_ROLE_AGGREGATOR;
  stage_class->min_inputs = 2;
  stage_class->max_inputs = G_MAXUINT;
}

static void
lp_aggregator_init (LpAggregator *self)
{
}
