/* lp-pipeline.c: a graph of stages, loaded from a pipeline file or built in code
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

/**
 * LpPipeline:
 *
 * Stages connected into a graph: each stage takes the outputs of its inputs.
 * A pipeline is loaded from a `*.pipeline` file
 * (lp_pipeline_load_from_file()), from the inline syntax of `lpipe launch`
 * (lp_pipeline_parse_launch()), or built in code with
 * lp_pipeline_add_stage() and lp_pipeline_connect(). A stage that was given
 * no inputs takes the stage added before it, so stages added in order form
 * a chain.
 *
 * Running it (lp_pipeline_run()) runs every stage once in dependency order.
 * Stages hand lazy checkpoints to each other, so the work happens when the
 * sinks pull the data, a few tensors at a time.
 */

typedef struct {
  LpStage *stage;
  GPtrArray *inputs;        /* Node*, borrowed */
  gboolean explicit_inputs;
  guint index;              /* 1-based, in order of addition */
} Node;

struct _LpPipeline
{
  GObject parent_instance;

  LpRegistry *registry;
  GPtrArray *nodes;         /* Node*, owned, in order of addition */
  GHashTable *node_of;      /* LpStage* -> Node*, so lookups cost nothing per stage */
  GHashTable *id_of;        /* id when added -> Node* */
  char *origin;
  char *description;
  GHashTable *params;       /* name -> value text */
  guint threads;

  GMainContext *progress_context;   /* set during an async run */

  /* What the stage that is running last reported, for the run statistics */
  guint64 progress_tensors;
  guint64 progress_bytes;
  LpRunStats *last_stats;           /* of the last successful run */
};

G_DEFINE_FINAL_TYPE (LpPipeline, lp_pipeline, G_TYPE_OBJECT)

enum {
  PROP_0,
  PROP_THREADS,
  PROP_DESCRIPTION,
  PROP_ORIGIN,
  N_PROPS
};

enum {
  SIGNAL_PROGRESS,
  N_SIGNALS
};

static GParamSpec *properties[N_PROPS];
static guint signals[N_SIGNALS];

static void
node_free (gpointer data)
{
  Node *node = data;

  g_object_unref (node->stage);
  g_ptr_array_unref (node->inputs);
  g_free (node);
}

static void
lp_pipeline_dispose (GObject *object)
{
  LpPipeline *self = LP_PIPELINE (object);

  g_clear_pointer (&self->node_of, g_hash_table_unref);
  g_clear_pointer (&self->id_of, g_hash_table_unref);
  g_clear_pointer (&self->nodes, g_ptr_array_unref);
  g_clear_object (&self->registry);
  g_clear_object (&self->last_stats);

  G_OBJECT_CLASS (lp_pipeline_parent_class)->dispose (object);
}

static void
lp_pipeline_finalize (GObject *object)
{
  LpPipeline *self = LP_PIPELINE (object);

  g_free (self->origin);
  g_free (self->description);
  g_clear_pointer (&self->params, g_hash_table_unref);
  g_clear_pointer (&self->progress_context, g_main_context_unref);

  G_OBJECT_CLASS (lp_pipeline_parent_class)->finalize (object);
}

static void
lp_pipeline_get_property (GObject    *object,
                          guint       prop_id,
                          GValue     *value,
                          GParamSpec *pspec)
{
  LpPipeline *self = LP_PIPELINE (object);

  switch (prop_id)
    {
    case PROP_THREADS:
      g_value_set_uint (value, self->threads);
      break;
    case PROP_DESCRIPTION:
      g_value_set_string (value, self->description);
      break;
    case PROP_ORIGIN:
      g_value_set_string (value, self->origin);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_pipeline_set_property (GObject      *object,
                          guint         prop_id,
                          const GValue *value,
                          GParamSpec   *pspec)
{
  LpPipeline *self = LP_PIPELINE (object);

  switch (prop_id)
    {
    case PROP_THREADS:
      lp_pipeline_set_threads (self, g_value_get_uint (value));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

/* g_object_new() alone, as bindings construct (`Lpipe.Pipeline()`), gets
 * the default registry like lp_pipeline_new (NULL). */
static void
lp_pipeline_constructed (GObject *object)
{
  LpPipeline *self = LP_PIPELINE (object);

  G_OBJECT_CLASS (lp_pipeline_parent_class)->constructed (object);
  if (self->registry == NULL)
    self->registry = g_object_ref (lp_registry_get_default ());
}

static void
lp_pipeline_class_init (LpPipelineClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->constructed = lp_pipeline_constructed;
  object_class->dispose = lp_pipeline_dispose;
  object_class->finalize = lp_pipeline_finalize;
  object_class->get_property = lp_pipeline_get_property;
  object_class->set_property = lp_pipeline_set_property;

  /**
   * LpPipeline:threads:
   *
   * How many tensors or modules are computed at once; defaults to the
   * number of processors.
   */
  properties[PROP_THREADS] =
    g_param_spec_uint ("threads", NULL, NULL, 1, LP_PIPELINE_MAX_THREADS, 1,
                       G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);
  /**
   * LpPipeline:description:
   *
   * The pipeline file's description.
   */
  properties[PROP_DESCRIPTION] =
    g_param_spec_string ("description", NULL, NULL, NULL,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpPipeline:origin:
   *
   * Where the pipeline came from: a file name, `launch`, or %NULL when built
   * in code.
   */
  properties[PROP_ORIGIN] =
    g_param_spec_string ("origin", NULL, NULL, NULL,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  /**
   * LpPipeline::progress:
   * @self: the pipeline
   * @tensors_done: tensors written so far
   * @tensors_total: tensors to write
   * @bytes_done: bytes written so far
   * @bytes_total: bytes to write
   *
   * Tells how far the sink that is running has got. Emitted in the thread
   * that runs the pipeline, or for lp_pipeline_run_async(), in the thread
   * default main context of the caller.
   */
  signals[SIGNAL_PROGRESS] =
    g_signal_new ("progress", G_TYPE_FROM_CLASS (klass), G_SIGNAL_RUN_LAST,
                  0, NULL, NULL, NULL, G_TYPE_NONE, 4,
                  G_TYPE_UINT64, G_TYPE_UINT64, G_TYPE_UINT64, G_TYPE_UINT64);
}

static void
lp_pipeline_init (LpPipeline *self)
{
  self->nodes = g_ptr_array_new_with_free_func (node_free);
  self->node_of = g_hash_table_new (NULL, NULL);
  self->id_of = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  self->threads = MAX (g_get_num_processors (), 1);
  self->params = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
}

/**
 * lp_pipeline_new:
 * @registry: (nullable): where to find stages; %NULL for the default registry
 *
 * Returns: (transfer full): an empty pipeline
 */
LpPipeline *
lp_pipeline_new (LpRegistry *registry)
{
  LpPipeline *self = g_object_new (LP_TYPE_PIPELINE, NULL);

  if (registry)
    g_set_object (&self->registry, registry);
  return self;
}

/**
 * lp_pipeline_parse_launch_string:
 * @self: an empty pipeline
 * @description: a chain in the inline `launch` syntax, as one string:
 *   `safetensors-source location=a.safetensors ! cast dtype=bf16 !
 *   safetensors-sink location=b.safetensors`
 * @error: return location for a #GError
 *
 * Like lp_pipeline_parse_launch(), after splitting @description into words
 * as a shell would (quotes keep a value with spaces in one word), so that
 * scripts pass the string they would type after `lpipe launch`.
 *
 * Returns: %TRUE if the pipeline was built
 */
gboolean
lp_pipeline_parse_launch_string (LpPipeline  *self,
                                 const char  *description,
                                 GError     **error)
{
  g_auto(GStrv) argv = NULL;
  g_autoptr(GError) local_error = NULL;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (description != NULL, FALSE);

  if (!g_shell_parse_argv (description, NULL, &argv, &local_error))
    {
      /* an empty string is the launch parser's "no stage" error */
      if (!g_error_matches (local_error, G_SHELL_ERROR, G_SHELL_ERROR_EMPTY_STRING))
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX,
                       "launch: %s", local_error->message);
          return FALSE;
        }
      argv = g_new0 (char *, 1);
    }
  return lp_pipeline_parse_launch (self, (const char * const *) argv, error);
}

static Node *
find_node (LpPipeline *self,
           LpStage    *stage)
{
  return g_hash_table_lookup (self->node_of, stage);
}

/* The stage added with @id, if it still has that id. */
static Node *
find_id (LpPipeline *self,
         const char *id)
{
  Node *node = g_hash_table_lookup (self->id_of, id);

  return node && g_strcmp0 (lp_stage_get_id (node->stage), id) == 0 ? node : NULL;
}

static gboolean
check_n_stages (LpPipeline  *self,
                guint        n,
                GError     **error)
{
  if (n <= LP_PIPELINE_MAX_STAGES)
    return TRUE;
  g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID,
               "a pipeline holds at most %d stages", LP_PIPELINE_MAX_STAGES);
  return FALSE;
}

/**
 * lp_pipeline_append:
 * @self: a pipeline
 * @stage: a stage not yet in any pipeline
 *
 * Adds a stage made elsewhere (for example by a language binding).
 */
void
lp_pipeline_append (LpPipeline *self,
                    LpStage    *stage)
{
  Node *node;

  g_return_if_fail (LP_IS_PIPELINE (self));
  g_return_if_fail (LP_IS_STAGE (stage));
  g_return_if_fail (find_node (self, stage) == NULL);

  node = g_new0 (Node, 1);
  node->stage = g_object_ref (stage);
  node->inputs = g_ptr_array_new ();
  node->index = self->nodes->len + 1;
  g_ptr_array_add (self->nodes, node);
  g_hash_table_insert (self->node_of, stage, node);
  if (lp_stage_get_id (stage) && !find_id (self, lp_stage_get_id (stage)))
    g_hash_table_replace (self->id_of, g_strdup (lp_stage_get_id (stage)), node);
  lp_stage_set_pipeline_context (stage, NULL, node->index, NULL, 0);
}

/**
 * lp_pipeline_add_stage:
 * @self: a pipeline
 * @stage_name: a registered stage name
 * @id: (nullable): an id for lp_pipeline_lookup_stage() and inputs
 * @error: return location for a #GError
 *
 * Makes a stage by name and adds it to the pipeline.
 *
 * Returns: (transfer none): the new stage, or %NULL if the name is unknown or
 *   the id taken
 */
LpStage *
lp_pipeline_add_stage (LpPipeline  *self,
                       const char  *stage_name,
                       const char  *id,
                       GError     **error)
{
  g_autoptr(LpStage) stage = NULL;

  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  g_return_val_if_fail (stage_name != NULL, NULL);

  if (!check_n_stages (self, self->nodes->len + 1, error))
    return NULL;
  if (id && find_id (self, id))
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_DUPLICATE_ID,
                   "two stages have the id '%s'", id);
      return NULL;
    }
  stage = lp_registry_create_stage (self->registry, stage_name, error);
  if (stage == NULL)
    return NULL;
  lp_stage_set_id (stage, id);
  lp_pipeline_append (self, stage);
  return stage;
}

/**
 * lp_pipeline_connect: (skip)
 * @self: a pipeline
 * @from: the stage whose output is used
 * @to: the stage that takes it as its next input
 * @error: return location for a #GError
 *
 * Connects two stages of the pipeline. Bindings call it lp_pipeline_link().
 *
 * Returns: %TRUE if connected; %FALSE if @from has no output or @to takes
 *   no more inputs
 */
gboolean
lp_pipeline_connect (LpPipeline  *self,
                     LpStage     *from,
                     LpStage     *to,
                     GError     **error)
{
  Node *a, *b;
  LpStageClass *to_class;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);
  a = find_node (self, from);
  b = find_node (self, to);
  g_return_val_if_fail (a != NULL && b != NULL, FALSE);

  to_class = LP_STAGE_GET_CLASS (to);
  if (lp_stage_class_get_role (LP_STAGE_GET_CLASS (from)) == LP_STAGE_ROLE_SINK)
    {
      g_autofree char *d = lp_stage_describe (from);
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY,
                   "%s is a sink and has no output to connect", d);
      return FALSE;
    }
  if (b->inputs->len >= to_class->max_inputs)
    {
      g_autofree char *d = lp_stage_describe (to);
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY,
                   "%s takes at most %u input%s", d, to_class->max_inputs,
                   to_class->max_inputs == 1 ? "" : "s");
      return FALSE;
    }
  g_ptr_array_add (b->inputs, a);
  b->explicit_inputs = TRUE;
  return TRUE;
}

/**
 * lp_pipeline_link:
 * @self: a pipeline
 * @from: the stage whose output is used
 * @to: the stage that takes it as its next input
 * @error: return location for a #GError
 *
 * Connects two stages of the pipeline, as lp_pipeline_connect() does. In
 * language bindings a method named `connect` would hide the one that
 * connects to signals, so they see this one instead.
 *
 * Returns: %TRUE if connected; %FALSE if @from has no output or @to takes
 *   no more inputs
 */
gboolean
lp_pipeline_link (LpPipeline  *self,
                  LpStage     *from,
                  LpStage     *to,
                  GError     **error)
{
  return lp_pipeline_connect (self, from, to, error);
}

void
lp_pipeline_mark_explicit_inputs (LpPipeline *self,
                                  LpStage    *stage)
{
  Node *node = find_node (self, stage);

  g_return_if_fail (node != NULL);
  node->explicit_inputs = TRUE;
}

void
lp_pipeline_set_source_info (LpPipeline *self,
                             const char *origin,
                             const char *description,
                             GHashTable *params)
{
  g_return_if_fail (LP_IS_PIPELINE (self));

  g_free (self->origin);
  self->origin = g_strdup (origin);
  g_free (self->description);
  self->description = g_strdup (description);
  g_hash_table_remove_all (self->params);
  if (params)
    {
      GHashTableIter iter;
      gpointer k, v;
      g_hash_table_iter_init (&iter, params);
      while (g_hash_table_iter_next (&iter, &k, &v))
        g_hash_table_insert (self->params, g_strdup (k), g_strdup (v));
    }
}

void
lp_pipeline_clear (LpPipeline *self)
{
  g_return_if_fail (LP_IS_PIPELINE (self));

  g_hash_table_remove_all (self->node_of);
  g_hash_table_remove_all (self->id_of);
  g_ptr_array_set_size (self->nodes, 0);
  lp_pipeline_set_source_info (self, NULL, NULL, NULL);
}

/**
 * lp_pipeline_get_n_stages:
 * @self: a pipeline
 *
 * Returns: the number of stages
 */
guint
lp_pipeline_get_n_stages (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), 0);
  return self->nodes->len;
}

/**
 * lp_pipeline_get_stage:
 * @self: a pipeline
 * @index: 0-based, less than lp_pipeline_get_n_stages()
 *
 * Returns: (transfer none): the stage added @index-th
 */
LpStage *
lp_pipeline_get_stage (LpPipeline *self,
                       guint       index)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  g_return_val_if_fail (index < self->nodes->len, NULL);
  return ((Node *) g_ptr_array_index (self->nodes, index))->stage;
}

/**
 * lp_pipeline_lookup_stage:
 * @self: a pipeline
 * @id: a stage id
 *
 * Returns: (transfer none) (nullable): the stage with that id, or %NULL
 */
LpStage *
lp_pipeline_lookup_stage (LpPipeline *self,
                          const char *id)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  g_return_val_if_fail (id != NULL, NULL);

  if (find_id (self, id))
    return find_id (self, id)->stage;
  /* an id set after the stage was added */
  for (guint i = 0; i < self->nodes->len; i++)
    {
      Node *node = g_ptr_array_index (self->nodes, i);
      if (g_strcmp0 (lp_stage_get_id (node->stage), id) == 0)
        return node->stage;
    }
  return NULL;
}

/**
 * lp_pipeline_get_description:
 * @self: a pipeline
 *
 * Returns: (nullable): the pipeline file's description
 */
const char *
lp_pipeline_get_description (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  return self->description;
}

/**
 * lp_pipeline_get_origin:
 * @self: a pipeline
 *
 * Returns: (nullable) (type filename): the file the pipeline was loaded from
 */
const char *
lp_pipeline_get_origin (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  return self->origin;
}

/**
 * lp_pipeline_get_params:
 * @self: a pipeline
 *
 * Returns: (transfer none) (element-type utf8 utf8): each parameter's name and
 *   the value it resolved to
 */
GHashTable *
lp_pipeline_get_params (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  return self->params;
}

/**
 * lp_pipeline_set_threads:
 * @self: a pipeline
 * @threads: how many tensors or modules to compute at once, from 1 to
 *   %LP_PIPELINE_MAX_THREADS
 *
 * Sets the thread budget the stages share. The output is the same whatever
 * the number. A number outside the range is taken as the nearest end.
 */
void
lp_pipeline_set_threads (LpPipeline *self,
                         guint       threads)
{
  g_return_if_fail (LP_IS_PIPELINE (self));

  threads = CLAMP (threads, 1, LP_PIPELINE_MAX_THREADS);
  if (threads != self->threads)
    {
      self->threads = threads;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_THREADS]);
    }
}

/**
 * lp_pipeline_get_threads:
 * @self: a pipeline
 *
 * Returns: the thread budget
 */
guint
lp_pipeline_get_threads (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), 1);
  return self->threads;
}

static void
prefix_error (LpPipeline  *self,
              LpStage     *stage,
              GError     **error)
{
  g_autofree char *d = stage ? lp_stage_describe (stage) : NULL;

  if (error == NULL || *error == NULL)
    return;
  if (d)
    g_prefix_error (error, "%s: ", d);
  if (self->origin)
    g_prefix_error (error, "%s: ", self->origin);
}

static void
heap_push (guint *heap,
           guint *n,
           guint  value)
{
  guint i = (*n)++;

  for (; i > 0 && heap[(i - 1) / 2] > value; i = (i - 1) / 2)
    heap[i] = heap[(i - 1) / 2];
  heap[i] = value;
}

static guint
heap_pop (guint *heap,
          guint *n)
{
  guint top = heap[0];
  guint last = heap[--(*n)];
  guint i = 0;

  for (;;)
    {
      guint child = 2 * i + 1;
      if (child >= *n)
        break;
      if (child + 1 < *n && heap[child + 1] < heap[child])
        child++;
      if (heap[child] >= last)
        break;
      heap[i] = heap[child];
      i = child;
    }
  if (*n > 0)
    heap[i] = last;
  return top;
}

/* Chains stages that were given no inputs, then orders the graph so every
 * stage comes after its inputs (Kahn's algorithm). Returns NULL on a cycle. */
static GPtrArray *
resolve (LpPipeline  *self,
         GError     **error)
{
  g_autoptr(GPtrArray) order = g_ptr_array_new ();
  g_autofree guint *pending = NULL;    /* by node index - 1: inputs not yet ordered */
  g_autofree GPtrArray **consumers = NULL;
  g_autofree guint *heap = NULL;
  guint n, n_heap = 0;
  Node *prev = NULL;

  if (!check_n_stages (self, self->nodes->len, error))
    {
      if (self->origin)
        g_prefix_error (error, "%s: ", self->origin);
      return NULL;
    }

  for (guint i = 0; i < self->nodes->len; i++)
    {
      Node *node = g_ptr_array_index (self->nodes, i);
      LpStageClass *klass = LP_STAGE_GET_CLASS (node->stage);

      if (!node->explicit_inputs && node->inputs->len == 0 && klass->min_inputs > 0 && prev)
        g_ptr_array_add (node->inputs, prev);
      node->explicit_inputs = TRUE;
      if (node->inputs->len < klass->min_inputs || node->inputs->len > klass->max_inputs)
        {
          g_autofree char *d = lp_stage_describe (node->stage);
          if (klass->min_inputs == klass->max_inputs)
            g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY,
                         "%s takes %u input%s, it has %u", d, klass->min_inputs,
                         klass->min_inputs == 1 ? "" : "s", node->inputs->len);
          else
            g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY,
                         "%s takes %u to %u inputs, it has %u", d, klass->min_inputs,
                         klass->max_inputs, node->inputs->len);
          if (self->origin)
            g_prefix_error (error, "%s: ", self->origin);
          return NULL;
        }
      prev = klass->role == LP_STAGE_ROLE_SINK ? prev : node;
    }

  /* Kahn's algorithm, taking among the ready stages the one added first
   * (a binary heap of their indices), so the order is the same as always:
   * linear in the stages and connections, not quadratic. */
  n = self->nodes->len;
  pending = g_new0 (guint, n);
  consumers = g_new0 (GPtrArray *, n);
  heap = g_new (guint, n);
  for (guint i = 0; i < n; i++)
    {
      Node *node = g_ptr_array_index (self->nodes, i);

      pending[i] = node->inputs->len;
      for (guint j = 0; j < node->inputs->len; j++)
        {
          Node *from = g_ptr_array_index (node->inputs, j);
          if (consumers[from->index - 1] == NULL)
            consumers[from->index - 1] = g_ptr_array_new ();
          g_ptr_array_add (consumers[from->index - 1], node);
        }
      if (pending[i] == 0)
        heap_push (heap, &n_heap, i);
    }
  while (n_heap > 0)
    {
      guint at = heap_pop (heap, &n_heap);
      GPtrArray *out = consumers[at];

      g_ptr_array_add (order, g_ptr_array_index (self->nodes, at));
      for (guint j = 0; out && j < out->len; j++)
        {
          Node *next = g_ptr_array_index (out, j);
          if (--pending[next->index - 1] == 0)
            heap_push (heap, &n_heap, next->index - 1);
        }
    }
  for (guint i = 0; i < n; i++)
    g_clear_pointer (&consumers[i], g_ptr_array_unref);

  if (order->len < n)
    {
      GString *names = g_string_new (NULL);
      for (guint i = 0; i < n; i++)
        {
          Node *node = g_ptr_array_index (self->nodes, i);
          if (pending[i] > 0)
            {
              g_autofree char *d = lp_stage_describe (node->stage);
              g_string_append_printf (names, "%s%s", names->len ? ", " : "", d);
            }
        }
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_CYCLE,
                   "the inputs form a cycle through %s", names->str);
      g_string_free (names, TRUE);
      if (self->origin)
        g_prefix_error (error, "%s: ", self->origin);
      return NULL;
    }
  return g_steal_pointer (&order);
}

/* A run whose result reaches no sink computes and writes nothing, yet would
 * end as a success: refuse it, and a branch whose output nothing reads. */
static gboolean
check_consumed (LpPipeline  *self,
                GError     **error)
{
  g_autoptr(GHashTable) read = g_hash_table_new (NULL, NULL);
  gboolean has_sink = FALSE;

  for (guint i = 0; i < self->nodes->len; i++)
    {
      Node *node = g_ptr_array_index (self->nodes, i);
      has_sink |= LP_STAGE_GET_CLASS (node->stage)->role == LP_STAGE_ROLE_SINK;
      for (guint j = 0; j < node->inputs->len; j++)
        g_hash_table_add (read, g_ptr_array_index (node->inputs, j));
    }
  if (!has_sink)
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY,
                   "the pipeline has no sink, so nothing would be written: end it with one, "
                   "e.g. '! safetensors-sink location=OUT.safetensors'");
      prefix_error (self, NULL, error);
      return FALSE;
    }
  for (guint i = 0; i < self->nodes->len; i++)
    {
      Node *node = g_ptr_array_index (self->nodes, i);
      if (LP_STAGE_GET_CLASS (node->stage)->role != LP_STAGE_ROLE_SINK &&
          !g_hash_table_contains (read, node))
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY,
                       "its output reaches no sink: make it an input of a later stage, or remove it");
          prefix_error (self, node->stage, error);
          return FALSE;
        }
    }
  return TRUE;
}

/**
 * lp_pipeline_validate:
 * @self: a pipeline
 * @error: return location for a #GError
 *
 * Checks the pipeline without running it: every stage has the inputs it
 * needs, there is no cycle, and each stage's properties fit together.
 *
 * Returns: %TRUE if the pipeline can run
 */
gboolean
lp_pipeline_validate (LpPipeline  *self,
                      GError     **error)
{
  g_autoptr(GPtrArray) order = NULL;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);

  if (self->nodes->len == 0)
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY, "the pipeline has no stages");
      if (self->origin)
        g_prefix_error (error, "%s: ", self->origin);
      return FALSE;
    }
  order = resolve (self, error);
  if (order == NULL)
    return FALSE;
  if (!check_consumed (self, error))
    return FALSE;
  for (guint i = 0; i < order->len; i++)
    {
      Node *node = g_ptr_array_index (order, i);
      if (!lp_stage_prepare (node->stage, error))
        {
          prefix_error (self, node->stage, error);
          return FALSE;
        }
    }
  return TRUE;
}

/* A recorded value that names a file keeps only its name: the file goes
 * where others read it, the directories it came from are private. */
static char *
without_directories (char *text)
{
  char *base;

  if (text == NULL || strchr (text, G_DIR_SEPARATOR) == NULL || text[strlen (text) - 1] == G_DIR_SEPARATOR)
    return text;
  base = g_path_get_basename (text);
  g_free (text);
  return base;
}

/* Whether a pipeline parameter went into a file name: its value is part of
 * some stage's file property (`"location": "${dir}/out.safetensors"`). */
static gboolean
names_file (const char *value,
            GPtrArray  *file_values)
{
  if (value == NULL || *value == '\0')
    return FALSE;
  for (guint i = 0; i < file_values->len; i++)
    if (strstr (g_ptr_array_index (file_values, i), value) != NULL)
      return TRUE;
  return FALSE;
}

/* What the sink records in the file: which tool, pipeline and parameters
 * made it, and the stages as `lpipe launch` would spell them. Only the
 * properties marked with lp_stage_class_set_property_file() (and the
 * parameters that went into them) lose their directories. */
static char *
build_provenance (LpPipeline *self,
                  GPtrArray  *order)
{
  g_autoptr(JsonBuilder) b = json_builder_new ();
  g_autoptr(JsonGenerator) gen = json_generator_new ();
  g_autoptr(JsonNode) root = NULL;
  g_autoptr(GString) chain = g_string_new (NULL);
  g_autoptr(GList) keys = NULL;
  g_autoptr(GPtrArray) file_values = g_ptr_array_new_with_free_func (g_free);

  for (guint i = 0; i < order->len; i++)
    {
      Node *node = g_ptr_array_index (order, i);
      LpStageClass *klass = LP_STAGE_GET_CLASS (node->stage);
      g_autofree GParamSpec **pspecs = NULL;
      guint n = 0;

      if (chain->len)
        g_string_append (chain, " ! ");
      g_string_append (chain, lp_stage_get_stage_name (node->stage));
      pspecs = g_object_class_list_properties (G_OBJECT_CLASS (klass), &n);
      for (guint j = 0; j < n; j++)
        {
          g_auto(GValue) v = G_VALUE_INIT;
          g_autofree char *text = NULL;

          if (!(pspecs[j]->flags & G_PARAM_READABLE) || !(pspecs[j]->flags & G_PARAM_WRITABLE))
            continue;
          g_value_init (&v, pspecs[j]->value_type);
          g_object_get_property (G_OBJECT (node->stage), pspecs[j]->name, &v);
          if (g_param_value_defaults (pspecs[j], &v))
            continue;
          text = lp_value_to_string (&v);
          if (text && lp_stage_class_is_property_file (klass, pspecs[j]->name))
            {
              g_ptr_array_add (file_values, g_strdup (text));
              text = without_directories (text);
            }
          g_string_append_printf (chain, " %s=%s", pspecs[j]->name, text ? text : "");
        }
    }

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "tool");
  json_builder_add_string_value (b, "lpipe " LPIPE_VERSION);
  if (self->origin)
    {
      g_autofree char *base = g_path_get_basename (self->origin);
      json_builder_set_member_name (b, "pipeline");
      json_builder_add_string_value (b, base);
    }
  if (self->description)
    {
      json_builder_set_member_name (b, "description");
      json_builder_add_string_value (b, self->description);
    }
  json_builder_set_member_name (b, "params");
  json_builder_begin_object (b);
  keys = g_list_sort (g_hash_table_get_keys (self->params), (GCompareFunc) g_strcmp0);
  for (GList *l = keys; l; l = l->next)
    {
      const char *set = g_hash_table_lookup (self->params, l->data);
      g_autofree char *value = names_file (set, file_values) ? without_directories (g_strdup (set)) : g_strdup (set);
      json_builder_set_member_name (b, l->data);
      json_builder_add_string_value (b, value);
    }
  json_builder_end_object (b);
  json_builder_set_member_name (b, "stages");
  json_builder_add_string_value (b, chain->str);
  json_builder_end_object (b);

  root = json_builder_get_root (b);
  json_generator_set_root (gen, root);
  return json_generator_to_data (gen, NULL);
}

/* The file a sink wrote, for the run statistics. */
static void
add_location (LpStage   *stage,
              GPtrArray *locations)
{
  char *location = NULL;

  if (g_object_class_find_property (G_OBJECT_GET_CLASS (stage), "location") == NULL)
    return;
  g_object_get (stage, "location", &location, NULL);
  if (location)
    g_ptr_array_add (locations, location);
}

/**
 * lp_pipeline_run:
 * @self: a pipeline
 * @cancellable: (nullable): a #GCancellable
 * @error: return location for a #GError
 *
 * Validates the pipeline and runs every stage once. Errors name the file, the
 * stage and, where the stage knows it, the tensor or module. A failed or
 * cancelled run leaves no partial output behind.
 *
 * Returns: %TRUE if every stage succeeded
 */
gboolean
lp_pipeline_run (LpPipeline    *self,
                 GCancellable  *cancellable,
                 GError       **error)
{
  g_autoptr(GPtrArray) order = NULL;
  g_autoptr(GHashTable) outputs = NULL;   /* Node* -> LpCheckpoint */
  g_autoptr(GHashTable) uses = NULL;      /* Node* -> consumers left */
  g_autoptr(GRefString) provenance = NULL;
  g_autoptr(GPtrArray) locations = g_ptr_array_new_with_free_func (g_free);
  gint64 start = g_get_monotonic_time ();
  guint64 tensors_written = 0, bytes_written = 0;
  gboolean ok = TRUE;

  g_return_val_if_fail (LP_IS_PIPELINE (self), FALSE);

  g_clear_object (&self->last_stats);
  if (!lp_pipeline_validate (self, error))
    return FALSE;
  order = resolve (self, error);
  if (order == NULL)
    return FALSE;
  {
    g_autofree char *text = build_provenance (self, order);
    provenance = g_ref_string_new (text);
  }

  outputs = g_hash_table_new_full (NULL, NULL, NULL, g_object_unref);
  uses = g_hash_table_new (NULL, NULL);
  for (guint i = 0; i < order->len; i++)
    {
      Node *node = g_ptr_array_index (order, i);
      for (guint j = 0; j < node->inputs->len; j++)
        {
          gpointer input = g_ptr_array_index (node->inputs, j);
          guint n = GPOINTER_TO_UINT (g_hash_table_lookup (uses, input));
          g_hash_table_insert (uses, input, GUINT_TO_POINTER (n + 1));
        }
    }

  for (guint i = 0; i < order->len && ok; i++)
    {
      Node *node = g_ptr_array_index (order, i);
      g_autoptr(GPtrArray) inputs = g_ptr_array_new ();
      g_autoptr(LpCheckpoint) output = NULL;

      if (g_cancellable_set_error_if_cancelled (cancellable, error))
        {
          ok = FALSE;
          break;
        }
      for (guint j = 0; j < node->inputs->len; j++)
        g_ptr_array_add (inputs, g_hash_table_lookup (outputs, g_ptr_array_index (node->inputs, j)));

      lp_stage_set_pipeline_context (node->stage, self, node->index,
                                     inputs->len > 1 ? (LpCheckpoint **) inputs->pdata + 1 : NULL,
                                     inputs->len > 1 ? inputs->len - 1 : 0);
      lp_stage_set_threads (node->stage, self->threads);
      lp_stage_set_cancellable (node->stage, cancellable);
      lp_stage_share_provenance (node->stage, provenance);

      self->progress_tensors = self->progress_bytes = 0;
      ok = lp_stage_run (node->stage, (LpCheckpoint **) inputs->pdata, inputs->len, &output, error);
      lp_stage_set_pipeline_context (node->stage, NULL, node->index, NULL, 0);
      lp_stage_set_cancellable (node->stage, NULL);
      if (!ok)
        {
          for (guint j = 0; j < inputs->len; j++)
            lp_checkpoint_explain_error (g_ptr_array_index (inputs, j), error);
          prefix_error (self, node->stage, error);
          break;
        }
      if (output)
        g_hash_table_insert (outputs, node, g_steal_pointer (&output));
      if (lp_stage_class_get_role (LP_STAGE_GET_CLASS (node->stage)) == LP_STAGE_ROLE_SINK)
        {
          tensors_written += self->progress_tensors;
          bytes_written += self->progress_bytes;
          add_location (node->stage, locations);
        }

      /* Drop each output once its last consumer has run, so a long pipeline
       * holds no more than it needs. */
      for (guint j = 0; j < node->inputs->len; j++)
        {
          gpointer input = g_ptr_array_index (node->inputs, j);
          guint n = GPOINTER_TO_UINT (g_hash_table_lookup (uses, input));
          g_hash_table_insert (uses, input, GUINT_TO_POINTER (n - 1));
          if (n == 1)
            g_hash_table_remove (outputs, input);
        }
    }
  if (ok)
    self->last_stats = lp_run_stats_new ((g_get_monotonic_time () - start) / 1e6, order->len,
                                         tensors_written, bytes_written, locations);
  return ok;
}

/**
 * lp_pipeline_get_last_stats:
 * @self: a pipeline
 *
 * What the last run did: its time, the tensors and bytes its sinks wrote and
 * where. Call after lp_pipeline_run() or lp_pipeline_run_finish() returned
 * %TRUE; a failed or cancelled run leaves none.
 *
 * Returns: (transfer none) (nullable): the statistics of the last run, or
 *   %NULL if it failed or there was none
 */
LpRunStats *
lp_pipeline_get_last_stats (LpPipeline *self)
{
  g_return_val_if_fail (LP_IS_PIPELINE (self), NULL);
  return self->last_stats;
}

typedef struct {
  GWeakRef pipeline;
  guint64 values[4];
} ProgressIdle;

static gboolean
progress_idle (gpointer data)
{
  ProgressIdle *p = data;
  g_autoptr(LpPipeline) self = g_weak_ref_get (&p->pipeline);

  if (self)
    g_signal_emit (self, signals[SIGNAL_PROGRESS], 0,
                   p->values[0], p->values[1], p->values[2], p->values[3]);
  return G_SOURCE_REMOVE;
}

static void
progress_idle_free (gpointer data)
{
  ProgressIdle *p = data;
  g_weak_ref_clear (&p->pipeline);
  g_free (p);
}

void
lp_pipeline_emit_progress (gpointer pipeline,
                           guint64  tensors_done,
                           guint64  tensors_total,
                           guint64  bytes_done,
                           guint64  bytes_total)
{
  LpPipeline *self = pipeline;

  self->progress_tensors = MAX (self->progress_tensors, tensors_done);
  self->progress_bytes = MAX (self->progress_bytes, bytes_done);

  /* During an async run each report is a main-loop wakeup; with nobody
   * listening (lpipe -q, or no progress bar) it would cost a context switch
   * per tensor for nothing. */
  if (!g_signal_has_handler_pending (self, signals[SIGNAL_PROGRESS], 0, TRUE))
    return;

  if (self->progress_context)
    {
      ProgressIdle *p = g_new0 (ProgressIdle, 1);
      GSource *source = g_idle_source_new ();

      g_weak_ref_init (&p->pipeline, self);
      p->values[0] = tensors_done;
      p->values[1] = tensors_total;
      p->values[2] = bytes_done;
      p->values[3] = bytes_total;
      g_source_set_callback (source, progress_idle, p, progress_idle_free);
      /* At the priority of the run's completion, which is then dispatched
       * after the reports made before it: at the idle priority the last
       * report could come after the run had finished (and a caller that
       * stops its loop there never saw it; flaky under load). */
      g_source_set_priority (source, G_PRIORITY_DEFAULT);
      g_source_attach (source, self->progress_context);
      g_source_unref (source);
    }
  else
    g_signal_emit (self, signals[SIGNAL_PROGRESS], 0,
                   tensors_done, tensors_total, bytes_done, bytes_total);
}

static void
run_thread (GTask        *task,
            gpointer      source_object,
            gpointer      task_data,
            GCancellable *cancellable)
{
  LpPipeline *self = source_object;
  GError *error = NULL;

  if (lp_pipeline_run (self, cancellable, &error))
    g_task_return_boolean (task, TRUE);
  else
    g_task_return_error (task, error);
}

/**
 * lp_pipeline_run_async:
 * @self: a pipeline
 * @cancellable: (nullable): a #GCancellable
 * @callback: (scope async): called when the run is over
 * @user_data: data for @callback
 *
 * Runs the pipeline in a worker thread, so that the caller's main loop keeps
 * turning. #LpPipeline::progress is emitted in the caller's thread-default
 * main context. Cancelling removes any partial output.
 */
void
lp_pipeline_run_async (LpPipeline          *self,
                       GCancellable        *cancellable,
                       GAsyncReadyCallback  callback,
                       gpointer             user_data)
{
  g_autoptr(GTask) task = NULL;

  g_return_if_fail (LP_IS_PIPELINE (self));

  task = g_task_new (self, cancellable, callback, user_data);
  g_task_set_source_tag (task, lp_pipeline_run_async);
  g_clear_pointer (&self->progress_context, g_main_context_unref);
  self->progress_context = g_main_context_ref_thread_default ();
  g_task_run_in_thread (task, run_thread);
}

/**
 * lp_pipeline_run_finish:
 * @self: a pipeline
 * @result: the result given to the callback
 * @error: return location for a #GError
 *
 * Finishes lp_pipeline_run_async().
 *
 * Returns: %TRUE if every stage succeeded
 */
gboolean
lp_pipeline_run_finish (LpPipeline    *self,
                        GAsyncResult  *result,
                        GError       **error)
{
  g_return_val_if_fail (g_task_is_valid (result, self), FALSE);

  g_clear_pointer (&self->progress_context, g_main_context_unref);
  return g_task_propagate_boolean (G_TASK (result), error);
}
