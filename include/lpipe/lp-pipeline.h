/* lp-pipeline.h: a graph of stages, loaded from a pipeline file or built in code
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <lpipe/lp-registry.h>
#include <lpipe/lp-run-stats.h>

G_BEGIN_DECLS

/**
 * LP_PIPELINE_MAX_THREADS:
 *
 * The largest thread budget a pipeline takes (lp_pipeline_set_threads(),
 * `lpipe --threads`): far more than the cores of any machine, few enough
 * that a typo cannot make a run start a million threads.
 */
#define LP_PIPELINE_MAX_THREADS 1024

/**
 * LP_PIPELINE_MAX_STAGES:
 *
 * The most stages a pipeline holds: far more than any real pipeline needs
 * (merging a few hundred LoRAs), few enough that a generated file cannot
 * make validation and the recorded provenance huge.
 */
#define LP_PIPELINE_MAX_STAGES 4096

#define LP_TYPE_PIPELINE (lp_pipeline_get_type ())
G_DECLARE_FINAL_TYPE (LpPipeline, lp_pipeline, LP, PIPELINE, GObject)

LpPipeline   *lp_pipeline_new               (LpRegistry    *registry);
gboolean      lp_pipeline_load_from_file    (LpPipeline    *self,
                                             const char    *filename,
                                             const char * const *params,
                                             GError       **error);
gboolean      lp_pipeline_load_from_data    (LpPipeline    *self,
                                             const char    *data,
                                             gssize         length,
                                             const char    *origin,
                                             const char * const *params,
                                             GError       **error);
gboolean      lp_pipeline_parse_launch      (LpPipeline    *self,
                                             const char * const *argv,
                                             GError       **error);
gboolean      lp_pipeline_parse_launch_string (LpPipeline  *self,
                                               const char  *description,
                                               GError     **error);

LpStage      *lp_pipeline_add_stage         (LpPipeline    *self,
                                             const char    *stage_name,
                                             const char    *id,
                                             GError       **error);
void          lp_pipeline_append            (LpPipeline    *self,
                                             LpStage       *stage);
gboolean      lp_pipeline_connect           (LpPipeline    *self,
                                             LpStage       *from,
                                             LpStage       *to,
                                             GError       **error);
gboolean      lp_pipeline_link              (LpPipeline    *self,
                                             LpStage       *from,
                                             LpStage       *to,
                                             GError       **error);
guint         lp_pipeline_get_n_stages      (LpPipeline    *self);
LpStage      *lp_pipeline_get_stage         (LpPipeline    *self,
                                             guint          index);
LpStage      *lp_pipeline_lookup_stage      (LpPipeline    *self,
                                             const char    *id);
const char   *lp_pipeline_get_description   (LpPipeline    *self);
const char   *lp_pipeline_get_origin        (LpPipeline    *self);
GHashTable   *lp_pipeline_get_params        (LpPipeline    *self);

void          lp_pipeline_set_threads       (LpPipeline    *self,
                                             guint          threads);
guint         lp_pipeline_get_threads       (LpPipeline    *self);

gboolean      lp_pipeline_validate          (LpPipeline    *self,
                                             GError       **error);
gboolean      lp_pipeline_run               (LpPipeline    *self,
                                             GCancellable  *cancellable,
                                             GError       **error);
void          lp_pipeline_run_async         (LpPipeline          *self,
                                             GCancellable        *cancellable,
                                             GAsyncReadyCallback  callback,
                                             gpointer             user_data);
gboolean      lp_pipeline_run_finish        (LpPipeline    *self,
                                             GAsyncResult  *result,
                                             GError       **error);
LpRunStats   *lp_pipeline_get_last_stats    (LpPipeline    *self);

G_END_DECLS
