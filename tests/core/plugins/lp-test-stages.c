/* lp-test-stages.c: tiny stages the core tests run pipelines with
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-test-stages.h"

/* --- test-source --- */

struct _LpTestSource
{
  LpSource parent_instance;
  guint count;
  guint size;
};

G_DEFINE_FINAL_TYPE (LpTestSource, lp_test_source, LP_TYPE_SOURCE)

enum { SRC_PROP_0, SRC_PROP_COUNT, SRC_PROP_SIZE };

static GBytes *
source_data (LpTensor *tensor, gpointer user_data, GError **error)
{
  guint index = GPOINTER_TO_UINT (user_data);
  guint64 n = lp_tensor_get_n_elements (tensor);
  float *v = g_new (float, n);

  for (guint64 i = 0; i < n; i++)
    v[i] = index;
  /* Finish out of order, so ordered output is really tested. */
  g_usleep ((index % 3) * 1000);
  return g_bytes_new_take (v, n * sizeof (float));
}

static LpCheckpoint *
lp_test_source_create (LpSource *source, GError **error)
{
  LpTestSource *self = LP_TEST_SOURCE (source);
  g_autoptr(LpCheckpoint) out = lp_checkpoint_new ();
  guint64 shape[1] = { self->size };

  for (guint i = 0; i < self->count; i++)
    {
      g_autofree char *name = g_strdup_printf ("t%u", i);
      g_autoptr(LpTensor) t = lp_tensor_new_lazy (name, LP_DTYPE_F32, shape, 1, source_data,
                                                  GUINT_TO_POINTER (i), NULL, error);
      if (t == NULL || !lp_checkpoint_add_tensor (out, t, error))
        return NULL;
    }
  lp_checkpoint_set_metadata (out, "made-by", "test-source");
  return g_steal_pointer (&out);
}

static void
lp_test_source_set_property (GObject *object, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  LpTestSource *self = LP_TEST_SOURCE (object);
  switch (prop_id)
    {
    case SRC_PROP_COUNT: self->count = g_value_get_uint (value); break;
    case SRC_PROP_SIZE: self->size = g_value_get_uint (value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_test_source_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  LpTestSource *self = LP_TEST_SOURCE (object);
  switch (prop_id)
    {
    case SRC_PROP_COUNT: g_value_set_uint (value, self->count); break;
    case SRC_PROP_SIZE: g_value_set_uint (value, self->size); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_test_source_class_init (LpTestSourceClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->set_property = lp_test_source_set_property;
  object_class->get_property = lp_test_source_get_property;
  LP_SOURCE_CLASS (klass)->create = lp_test_source_create;
  g_object_class_install_property (object_class, SRC_PROP_COUNT,
    g_param_spec_uint ("count", NULL, "How many tensors", 0, 10000, 4,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  g_object_class_install_property (object_class, SRC_PROP_SIZE,
    g_param_spec_uint ("size", NULL, "Values per tensor", 1, 1 << 24, 8,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-source", "Test", "Makes numbered tensors");
}

static void
lp_test_source_init (LpTestSource *self)
{
  self->count = 4;
  self->size = 8;
}

/* --- test-add --- */

struct _LpTestAdd
{
  LpTransform parent_instance;
  double amount;
  char *fail_on;
};

G_DEFINE_FINAL_TYPE (LpTestAdd, lp_test_add, LP_TYPE_TRANSFORM)

enum { ADD_PROP_0, ADD_PROP_AMOUNT, ADD_PROP_FAIL_ON };

typedef struct {
  LpTensor *input;
  double amount;
  gboolean fail;
} AddJob;

static void
add_job_free (gpointer data)
{
  AddJob *job = data;
  g_object_unref (job->input);
  g_free (job);
}

static GBytes *
add_data (LpTensor *tensor, gpointer user_data, GError **error)
{
  AddJob *job = user_data;
  gsize n;
  float *v;

  if (job->fail)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "tensor '%s': asked to fail", lp_tensor_get_name (tensor));
      return NULL;
    }
  v = lp_tensor_dup_f32 (job->input, &n, error);
  if (v == NULL)
    return NULL;
  for (gsize i = 0; i < n; i++)
    v[i] += job->amount;
  return g_bytes_new_take (v, n * sizeof (float));
}

static LpTensor *
lp_test_add_transform_tensor (LpTransform *transform, LpTensor *tensor, GError **error)
{
  LpTestAdd *self = LP_TEST_ADD (transform);
  AddJob *job = g_new0 (AddJob, 1);

  job->input = g_object_ref (tensor);
  job->amount = self->amount;
  job->fail = g_strcmp0 (self->fail_on, lp_tensor_get_name (tensor)) == 0;
  return lp_tensor_new_lazy (lp_tensor_get_name (tensor), LP_DTYPE_F32,
                             lp_tensor_get_shape (tensor, NULL), lp_tensor_get_n_dims (tensor),
                             add_data, job, add_job_free, error);
}

static void
lp_test_add_set_property (GObject *object, guint prop_id, const GValue *value, GParamSpec *pspec)
{
  LpTestAdd *self = LP_TEST_ADD (object);
  switch (prop_id)
    {
    case ADD_PROP_AMOUNT: self->amount = g_value_get_double (value); break;
    case ADD_PROP_FAIL_ON: g_free (self->fail_on); self->fail_on = g_value_dup_string (value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_test_add_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  LpTestAdd *self = LP_TEST_ADD (object);
  switch (prop_id)
    {
    case ADD_PROP_AMOUNT: g_value_set_double (value, self->amount); break;
    case ADD_PROP_FAIL_ON: g_value_set_string (value, self->fail_on); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_test_add_finalize (GObject *object)
{
  g_free (LP_TEST_ADD (object)->fail_on);
  G_OBJECT_CLASS (lp_test_add_parent_class)->finalize (object);
}

static void
lp_test_add_class_init (LpTestAddClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->set_property = lp_test_add_set_property;
  object_class->get_property = lp_test_add_get_property;
  object_class->finalize = lp_test_add_finalize;
  LP_TRANSFORM_CLASS (klass)->transform_tensor = lp_test_add_transform_tensor;
  g_object_class_install_property (object_class, ADD_PROP_AMOUNT,
    g_param_spec_double ("amount", NULL, "What to add", -1e6, 1e6, 1.0,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  g_object_class_install_property (object_class, ADD_PROP_FAIL_ON,
    g_param_spec_string ("fail-on", NULL, "A tensor whose computation fails", NULL,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-add", "Test", "Adds a number");
}

static void
lp_test_add_init (LpTestAdd *self)
{
  self->amount = 1.0;
}

/* --- test-collect --- */

struct _LpTestCollect
{
  LpSink parent_instance;
  double sum;
  guint n;
  GPtrArray *order;
};

G_DEFINE_FINAL_TYPE (LpTestCollect, lp_test_collect, LP_TYPE_SINK)

static gboolean
collect_one (LpTensor *tensor, GBytes *data, gpointer user_data, GError **error)
{
  LpTestCollect *self = user_data;
  gsize len;
  const float *v = g_bytes_get_data (data, &len);

  for (gsize i = 0; i < len / sizeof (float); i++)
    self->sum += v[i];
  self->n++;
  g_ptr_array_add (self->order, g_strdup (lp_tensor_get_name (tensor)));
  return TRUE;
}

static gboolean
lp_test_collect_consume (LpSink *sink, LpCheckpoint *input, GError **error)
{
  LpTestCollect *self = LP_TEST_COLLECT (sink);

  self->sum = 0;
  self->n = 0;
  g_ptr_array_set_size (self->order, 0);
  return lp_stage_pull_tensors (LP_STAGE (self), input, collect_one, self, error);
}

static void
lp_test_collect_finalize (GObject *object)
{
  g_ptr_array_unref (LP_TEST_COLLECT (object)->order);
  G_OBJECT_CLASS (lp_test_collect_parent_class)->finalize (object);
}

enum { COL_PROP_0, COL_PROP_SUM, COL_PROP_N, COL_PROP_ORDER };

static gpointer
copy_string (gconstpointer src, gpointer data)
{
  return g_strdup (src);
}

static void
lp_test_collect_get_property (GObject *object, guint prop_id, GValue *value, GParamSpec *pspec)
{
  LpTestCollect *self = LP_TEST_COLLECT (object);
  switch (prop_id)
    {
    case COL_PROP_SUM: g_value_set_double (value, self->sum); break;
    case COL_PROP_N: g_value_set_uint (value, self->n); break;
    case COL_PROP_ORDER:
      {
        g_autoptr(GPtrArray) copy = g_ptr_array_copy (self->order, copy_string, NULL);
        g_ptr_array_add (copy, NULL);
        g_value_take_boxed (value, g_ptr_array_free (g_steal_pointer (&copy), FALSE));
      }
      break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_test_collect_class_init (LpTestCollectClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->get_property = lp_test_collect_get_property;
  g_object_class_install_property (object_class, COL_PROP_SUM,
    g_param_spec_double ("sum", NULL, NULL, -G_MAXDOUBLE, G_MAXDOUBLE, 0, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS));
  g_object_class_install_property (object_class, COL_PROP_N,
    g_param_spec_uint ("n-tensors", NULL, NULL, 0, G_MAXUINT, 0, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS));
  g_object_class_install_property (object_class, COL_PROP_ORDER,
    g_param_spec_boxed ("order", NULL, NULL, G_TYPE_STRV, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS));
  G_OBJECT_CLASS (klass)->finalize = lp_test_collect_finalize;
  LP_SINK_CLASS (klass)->consume = lp_test_collect_consume;
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-collect", "Test", "Sums everything");
}

static void
lp_test_collect_init (LpTestCollect *self)
{
  self->order = g_ptr_array_new_with_free_func (g_free);
}

/* --- test-concat --- */

struct _LpTestConcat
{
  LpAggregator parent_instance;
};

G_DEFINE_FINAL_TYPE (LpTestConcat, lp_test_concat, LP_TYPE_AGGREGATOR)

static LpCheckpoint *
lp_test_concat_aggregate (LpAggregator *agg, LpCheckpoint **inputs, guint n_inputs, GError **error)
{
  g_autoptr(LpCheckpoint) out = lp_checkpoint_new ();

  for (guint i = 0; i < n_inputs; i++)
    for (guint j = 0; j < lp_checkpoint_get_n_tensors (inputs[i]); j++)
      {
        LpTensor *t = lp_checkpoint_get_tensor (inputs[i], j);
        g_autofree char *name = g_strdup_printf ("in%u.%s", i, lp_tensor_get_name (t));
        g_autoptr(LpTensor) renamed = lp_tensor_new_renamed (t, name);
        if (!lp_checkpoint_add_tensor (out, renamed, error))
          return NULL;
      }
  return g_steal_pointer (&out);
}

static void
lp_test_concat_class_init (LpTestConcatClass *klass)
{
  LP_AGGREGATOR_CLASS (klass)->aggregate = lp_test_concat_aggregate;
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-concat", "Test", "Puts inputs side by side");
}

static void
lp_test_concat_init (LpTestConcat *self)
{
}
