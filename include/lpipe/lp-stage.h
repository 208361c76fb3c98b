/* lp-stage.h: the base class of every pipeline stage, and one base class per role
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <gio/gio.h>
#include <lpipe/lp-checkpoint.h>

G_BEGIN_DECLS

/**
 * LpStageRole:
 * @LP_STAGE_ROLE_SOURCE: no input, one output
 * @LP_STAGE_ROLE_TRANSFORM: one input (some take an optional second), one output
 * @LP_STAGE_ROLE_SINK: one input, no output
 * @LP_STAGE_ROLE_AGGREGATOR: several inputs, one output
 *
 * What a stage consumes and produces.
 */
typedef enum {
  LP_STAGE_ROLE_SOURCE,
  LP_STAGE_ROLE_TRANSFORM,
  LP_STAGE_ROLE_SINK,
  LP_STAGE_ROLE_AGGREGATOR,
} LpStageRole;

/**
 * LpStageFlags:
 * @LP_STAGE_FLAG_NONE: nothing special
 * @LP_STAGE_FLAG_REQUIRED: the property must be set in the pipeline
 * @LP_STAGE_FLAG_FILE: the property's value names a file
 *
 * Flags lpipe reads from a property's #GParamSpec qdata; see
 * lp_stage_class_set_property_required() and lp_stage_class_set_property_file().
 */
typedef enum {
  LP_STAGE_FLAG_NONE = 0,
  LP_STAGE_FLAG_REQUIRED = 1 << 0,
  LP_STAGE_FLAG_FILE = 1 << 1,
} LpStageFlags;

#define LP_TYPE_STAGE (lp_stage_get_type ())
G_DECLARE_DERIVABLE_TYPE (LpStage, lp_stage, LP, STAGE, GObject)

/**
 * LpStageClass:
 * @parent_class: the parent class
 * @prepare: checks properties that depend on each other, before anything runs
 * @run: computes the output from the inputs; role classes implement it
 *
 * The class of every stage. Stage authors derive from a role class
 * (#LpSource, #LpTransform, #LpSink, #LpAggregator) rather than from this one.
 */
struct _LpStageClass
{
  GObjectClass parent_class;

  gboolean (*prepare) (LpStage       *self,
                       GError       **error);
  gboolean (*run)     (LpStage       *self,
                       LpCheckpoint **inputs,
                       guint          n_inputs,
                       LpCheckpoint **output,
                       GError       **error);

  /*< private >*/
  char *stage_name;
  char *category;
  char *description;
  LpStageRole role;
  guint min_inputs;
  guint max_inputs;
  gpointer padding[8];
};

void          lp_stage_class_set_metadata   (LpStageClass  *klass,
                                             const char    *stage_name,
                                             const char    *category,
                                             const char    *description);
void          lp_stage_class_set_n_inputs   (LpStageClass  *klass,
                                             guint          min_inputs,
                                             guint          max_inputs);
void          lp_stage_class_set_property_required (LpStageClass *klass,
                                                    const char   *property);
void          lp_stage_class_set_property_file (LpStageClass *klass,
                                                const char   *property);
const char   *lp_stage_class_get_stage_name (LpStageClass  *klass);
const char   *lp_stage_class_get_category   (LpStageClass  *klass);
const char   *lp_stage_class_get_description (LpStageClass *klass);
LpStageRole   lp_stage_class_get_role       (LpStageClass  *klass);
guint         lp_stage_class_get_min_inputs (LpStageClass  *klass);
guint         lp_stage_class_get_max_inputs (LpStageClass  *klass);
gboolean      lp_stage_class_is_property_required (LpStageClass *klass,
                                                   const char   *property);
gboolean      lp_stage_class_is_property_file (LpStageClass *klass,
                                               const char   *property);

const char   *lp_stage_get_stage_name       (LpStage       *self);
const char   *lp_stage_get_id               (LpStage       *self);
void          lp_stage_set_id               (LpStage       *self,
                                             const char    *id);
char         *lp_stage_describe             (LpStage       *self);
guint         lp_stage_get_threads          (LpStage       *self);
void          lp_stage_set_threads          (LpStage       *self,
                                             guint          threads);
GCancellable *lp_stage_get_cancellable      (LpStage       *self);
void          lp_stage_set_cancellable      (LpStage       *self,
                                             GCancellable  *cancellable);
/**
 * LpStageParallelFunc:
 * @index: which item, 0 ≤ @index < n
 * @user_data: the data given to lp_stage_parallel_for()
 * @error: where the item's error goes
 *
 * One item of lp_stage_parallel_for().
 *
 * Returns: %FALSE with @error set when the item failed
 */
typedef gboolean (*LpStageParallelFunc) (guint     index,
                                         gpointer  user_data,
                                         GError  **error);

gboolean      lp_stage_parallel_for         (LpStage            *self,
                                             guint               n,
                                             LpStageParallelFunc func,
                                             gpointer            user_data,
                                             GError            **error);
const char   *lp_stage_get_provenance       (LpStage       *self);
void          lp_stage_set_provenance       (LpStage       *self,
                                             const char    *provenance);
char         *lp_stage_dup_provenance_after (LpStage       *self,
                                             const char    *previous);

gboolean      lp_stage_set_property_from_string (LpStage     *self,
                                                 const char  *property,
                                                 const char  *value,
                                                 GError     **error);
gboolean      lp_stage_set_property_checked (LpStage       *self,
                                             const char    *property,
                                             const GValue  *value,
                                             GError       **error);
char         *lp_param_spec_describe_type    (GParamSpec    *pspec);
char         *lp_param_spec_default_to_string (GParamSpec  *pspec);

gboolean      lp_stage_prepare              (LpStage       *self,
                                             GError       **error);
gboolean      lp_stage_run                  (LpStage       *self,
                                             LpCheckpoint **inputs,
                                             guint          n_inputs,
                                             LpCheckpoint **output,
                                             GError       **error);

void          lp_stage_report_progress      (LpStage       *self,
                                             guint64        tensors_done,
                                             guint64        tensors_total,
                                             guint64        bytes_done,
                                             guint64        bytes_total);

/**
 * LpTensorDataCallback:
 * @tensor: the tensor
 * @data: its bytes
 * @user_data: the data given to lp_stage_pull_tensors()
 * @error: return location for a #GError
 *
 * Receives the data of one tensor, in checkpoint order, on the calling thread.
 *
 * Returns: %TRUE to go on, %FALSE with @error set to stop
 */
typedef gboolean (*LpTensorDataCallback) (LpTensor  *tensor,
                                          GBytes    *data,
                                          gpointer   user_data,
                                          GError   **error);

gboolean      lp_stage_pull_tensors         (LpStage              *self,
                                             LpCheckpoint         *checkpoint,
                                             LpTensorDataCallback  callback,
                                             gpointer              user_data,
                                             GError              **error);
gboolean      lp_stage_pull_tensors_unordered (LpStage              *self,
                                               LpCheckpoint         *checkpoint,
                                               LpTensorDataCallback  callback,
                                               gpointer              user_data,
                                               GError              **error);

/* Sources: 0 inputs, 1 output */
#define LP_TYPE_SOURCE (lp_source_get_type ())
G_DECLARE_DERIVABLE_TYPE (LpSource, lp_source, LP, SOURCE, LpStage)

/**
 * LpSourceClass:
 * @parent_class: the parent class
 * @create: makes the checkpoint this source provides
 */
struct _LpSourceClass
{
  LpStageClass parent_class;
  LpCheckpoint *(*create) (LpSource  *self,
                           GError   **error);
  /*< private >*/
  gpointer padding[4];
};

/* Transforms: 1 input (optionally more, see lp_stage_class_set_n_inputs()), 1 output */
#define LP_TYPE_TRANSFORM (lp_transform_get_type ())
G_DECLARE_DERIVABLE_TYPE (LpTransform, lp_transform, LP, TRANSFORM, LpStage)

/**
 * LpTransformClass:
 * @parent_class: the parent class
 * @transform: makes the output from the input; the default calls
 *   @transform_tensor on each tensor and keeps the metadata
 * @transform_tensor: returns the tensor to put in place of @tensor (the same
 *   one to keep it), or %NULL with no error to drop it
 */
struct _LpTransformClass
{
  LpStageClass parent_class;
  LpCheckpoint *(*transform)        (LpTransform   *self,
                                     LpCheckpoint  *input,
                                     GError       **error);
  LpTensor     *(*transform_tensor) (LpTransform   *self,
                                     LpTensor      *tensor,
                                     GError       **error);
  /*< private >*/
  gpointer padding[4];
};

LpCheckpoint *lp_transform_get_extra_input (LpTransform *self,
                                            guint        index);

/* Sinks: 1 input, no output */
#define LP_TYPE_SINK (lp_sink_get_type ())
G_DECLARE_DERIVABLE_TYPE (LpSink, lp_sink, LP, SINK, LpStage)

/**
 * LpSinkClass:
 * @parent_class: the parent class
 * @consume: writes or otherwise uses the checkpoint
 */
struct _LpSinkClass
{
  LpStageClass parent_class;
  gboolean (*consume) (LpSink        *self,
                       LpCheckpoint  *input,
                       GError       **error);
  /*< private >*/
  gpointer padding[4];
};

/* Aggregators: N inputs, 1 output */
#define LP_TYPE_AGGREGATOR (lp_aggregator_get_type ())
G_DECLARE_DERIVABLE_TYPE (LpAggregator, lp_aggregator, LP, AGGREGATOR, LpStage)

/**
 * LpAggregatorClass:
 * @parent_class: the parent class
 * @aggregate: combines the inputs into one checkpoint
 */
struct _LpAggregatorClass
{
  LpStageClass parent_class;
  LpCheckpoint *(*aggregate) (LpAggregator  *self,
                              LpCheckpoint **inputs,
                              guint          n_inputs,
                              GError       **error);
  /*< private >*/
  gpointer padding[4];
};

G_END_DECLS
