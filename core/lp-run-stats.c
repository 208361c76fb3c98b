/* lp-run-stats.c: what a pipeline run did, for scripts
 *
 * The CLI prints its summary from files; a script gets the same facts as an
 * object from lp_pipeline_get_last_stats(), without parsing anything.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

struct _LpRunStats
{
  GObject parent_instance;

  double elapsed;
  guint n_stages;
  guint64 tensors_written;
  guint64 bytes_written;
  GStrv outputs;
};

G_DEFINE_FINAL_TYPE (LpRunStats, lp_run_stats, G_TYPE_OBJECT)

enum {
  PROP_0,
  PROP_ELAPSED,
  PROP_N_STAGES,
  PROP_TENSORS_WRITTEN,
  PROP_BYTES_WRITTEN,
  PROP_OUTPUTS,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static void
lp_run_stats_finalize (GObject *object)
{
  LpRunStats *self = LP_RUN_STATS (object);

  g_strfreev (self->outputs);

  G_OBJECT_CLASS (lp_run_stats_parent_class)->finalize (object);
}

static void
lp_run_stats_get_property (GObject    *object,
                           guint       prop_id,
                           GValue     *value,
                           GParamSpec *pspec)
{
  LpRunStats *self = LP_RUN_STATS (object);

  switch (prop_id)
    {
    case PROP_ELAPSED:
      g_value_set_double (value, self->elapsed);
      break;
    case PROP_N_STAGES:
      g_value_set_uint (value, self->n_stages);
      break;
    case PROP_TENSORS_WRITTEN:
      g_value_set_uint64 (value, self->tensors_written);
      break;
    case PROP_BYTES_WRITTEN:
      g_value_set_uint64 (value, self->bytes_written);
      break;
    case PROP_OUTPUTS:
      g_value_set_boxed (value, self->outputs);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_run_stats_class_init (LpRunStatsClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->finalize = lp_run_stats_finalize;
  object_class->get_property = lp_run_stats_get_property;

  /**
   * LpRunStats:elapsed:
   *
   * Wall-clock seconds the run took.
   */
  properties[PROP_ELAPSED] =
    g_param_spec_double ("elapsed", NULL, NULL, 0, G_MAXDOUBLE, 0,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpRunStats:n-stages:
   *
   * Stages that ran.
   */
  properties[PROP_N_STAGES] =
    g_param_spec_uint ("n-stages", NULL, NULL, 0, G_MAXUINT, 0,
                       G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpRunStats:tensors-written:
   *
   * Tensors the sinks wrote, over all sinks.
   */
  properties[PROP_TENSORS_WRITTEN] =
    g_param_spec_uint64 ("tensors-written", NULL, NULL, 0, G_MAXUINT64, 0,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpRunStats:bytes-written:
   *
   * Tensor bytes the sinks wrote, over all sinks (headers not counted).
   */
  properties[PROP_BYTES_WRITTEN] =
    g_param_spec_uint64 ("bytes-written", NULL, NULL, 0, G_MAXUINT64, 0,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpRunStats:outputs:
   *
   * The `location` of every sink that has one, in the order they ran.
   */
  properties[PROP_OUTPUTS] =
    g_param_spec_boxed ("outputs", NULL, NULL, G_TYPE_STRV,
                        G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);
}

static void
lp_run_stats_init (LpRunStats *self)
{
}

LpRunStats *
lp_run_stats_new (double       elapsed,
                  guint        n_stages,
                  guint64      tensors_written,
                  guint64      bytes_written,
                  GPtrArray   *outputs)
{
  LpRunStats *self = g_object_new (LP_TYPE_RUN_STATS, NULL);

  self->elapsed = elapsed;
  self->n_stages = n_stages;
  self->tensors_written = tensors_written;
  self->bytes_written = bytes_written;
  self->outputs = g_new0 (char *, outputs->len + 1);
  for (guint i = 0; i < outputs->len; i++)
    self->outputs[i] = g_strdup (g_ptr_array_index (outputs, i));
  return self;
}

/**
 * lp_run_stats_get_elapsed:
 * @self: run statistics
 *
 * Returns: the wall-clock seconds the run took
 */
double
lp_run_stats_get_elapsed (LpRunStats *self)
{
  g_return_val_if_fail (LP_IS_RUN_STATS (self), 0);
  return self->elapsed;
}

/**
 * lp_run_stats_get_n_stages:
 * @self: run statistics
 *
 * Returns: the number of stages that ran
 */
guint
lp_run_stats_get_n_stages (LpRunStats *self)
{
  g_return_val_if_fail (LP_IS_RUN_STATS (self), 0);
  return self->n_stages;
}

/**
 * lp_run_stats_get_tensors_written:
 * @self: run statistics
 *
 * Returns: the tensors the sinks wrote, over all sinks
 */
guint64
lp_run_stats_get_tensors_written (LpRunStats *self)
{
  g_return_val_if_fail (LP_IS_RUN_STATS (self), 0);
  return self->tensors_written;
}

/**
 * lp_run_stats_get_bytes_written:
 * @self: run statistics
 *
 * Returns: the tensor bytes the sinks wrote, over all sinks
 */
guint64
lp_run_stats_get_bytes_written (LpRunStats *self)
{
  g_return_val_if_fail (LP_IS_RUN_STATS (self), 0);
  return self->bytes_written;
}

/**
 * lp_run_stats_get_outputs:
 * @self: run statistics
 *
 * Returns: (transfer none) (array zero-terminated=1): the `location` of every
 *   sink that has one, in the order they ran
 */
const char * const *
lp_run_stats_get_outputs (LpRunStats *self)
{
  g_return_val_if_fail (LP_IS_RUN_STATS (self), NULL);
  return (const char * const *) self->outputs;
}
