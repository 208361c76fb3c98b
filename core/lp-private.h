/* lp-private.h: what core's files share and nobody else sees
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <json-glib/json-glib.h>
#include "lpipe/lpipe.h"

G_BEGIN_DECLS

/* lp-value.c: one conversion from text or JSON to a property's GValue, used by
 * the pipeline file, `lpipe launch`, bindings and the CLI. A value that
 * g_param_value_validate() would change is an error, never clamped. */
gboolean  lp_value_from_string (GParamSpec    *pspec,
                                const char    *text,
                                GValue        *value,
                                GError       **error);
gboolean  lp_value_from_json   (GParamSpec    *pspec,
                                JsonNode      *node,
                                GValue        *value,
                                GError       **error);
char     *lp_value_to_string   (const GValue  *value);

/* lp-stage.c: set by the pipeline while it runs */
/* @provenance is a GRefString, shared rather than copied. */
void      lp_stage_share_provenance     (LpStage       *self,
                                         char          *provenance);
void      lp_stage_set_pipeline_context (LpStage       *self,
                                         gpointer       pipeline,
                                         guint          index,
                                         LpCheckpoint **extra_inputs,
                                         guint          n_extra);
guint     lp_stage_get_index            (LpStage       *self);
/* Several pulls that make one whole (the shards of a checkpoint) report
 * their progress as the whole's: @tensors_before and @bytes_before are what
 * the earlier pulls did, the totals the whole's; a total of 0 ends it. */
void      lp_stage_set_progress_span    (LpStage       *self,
                                         guint64        tensors_before,
                                         guint64        bytes_before,
                                         guint64        tensors_total,
                                         guint64        bytes_total);
gpointer  lp_stage_get_pipeline_context (LpStage       *self);

/* lp-run-stats.c: made by lp_pipeline_run(); @outputs holds strings */
LpRunStats *lp_run_stats_new            (double         elapsed,
                                         guint          n_stages,
                                         guint64        tensors_written,
                                         guint64        bytes_written,
                                         GPtrArray     *outputs);

/* lp-pipeline.c: forwarded to the "progress" signal */
void      lp_pipeline_emit_progress     (gpointer       pipeline,
                                         guint64        tensors_done,
                                         guint64        tensors_total,
                                         guint64        bytes_done,
                                         guint64        bytes_total);

/* lp-pipeline.c (for the loader) */
/* Records where the pipeline came from: @origin is the file name (or
 * "launch"), @params maps each parameter's name to the value it resolved to
 * (a string), for `lpipe inspect` and the provenance the sink records. */
void      lp_pipeline_set_source_info   (LpPipeline    *self,
                                         const char    *origin,
                                         const char    *description,
                                         GHashTable    *params);
/* Tells the pipeline that @stage's inputs were wired by lp_pipeline_connect()
 * on purpose (possibly none), so nothing is chained implicitly. */
void      lp_pipeline_mark_explicit_inputs (LpPipeline *self,
                                            LpStage    *stage);
/* Drops every stage and connection and the source info, leaving the pipeline
 * as lp_pipeline_new() made it: the loader's way to fail without leaving a
 * half-loaded pipeline behind. */
void      lp_pipeline_clear             (LpPipeline    *self);

/* lp-safetensors.c: replaces @path atomically (a temporary file in the same
 * directory, fsync, rename, fsync of the directory); on error @path is
 * untouched and no temporary file is left */
gboolean  lp_atomic_write_contents      (const char    *path,
                                         gconstpointer  data,
                                         gsize          len,
                                         GError       **error);

/* lp-safetensors.c: an input file while its tensors are read. It keeps the
 * descriptor (reads go to the file that was opened, whatever replaces its
 * name), the mapping, and what fstat() said at the open. A shortened file
 * (SIGBUS under the mapping, or a short read) or one rewritten in place
 * (size, modification or change time differ) fails the check. */
typedef struct _LpSourceFile LpSourceFile;
LpSourceFile *lp_source_file_ref        (LpSourceFile  *source);
void      lp_source_file_unref          (LpSourceFile  *source);
gboolean  lp_source_file_check          (LpSourceFile  *source,
                                         GError       **error);

/* lp-checkpoint.c: the input files a checkpoint's tensors depend on. Sources
 * add theirs, lp_checkpoint_new_like() and the transform and aggregator base
 * classes pass them on from inputs to outputs, and sinks check them before
 * they commit. */
void      lp_checkpoint_add_source      (LpCheckpoint  *self,
                                         LpSourceFile  *source);
void      lp_checkpoint_inherit_sources (LpCheckpoint  *self,
                                         LpCheckpoint  *from);
gboolean  lp_checkpoint_check_sources   (LpCheckpoint  *self,
                                         GError       **error);
/* A stage that failed while an input changed under it failed because of the
 * change (zeros read from a shortened file, EFAULT writing from its mapping):
 * replaces *@error with the change, when there is one. */
void      lp_checkpoint_explain_error   (LpCheckpoint  *self,
                                         GError       **error);

/* lp-safetensors.c: files written beside their final names, complete and
 * synced, and put in place later, so that several files (the shards of a
 * checkpoint and its index) are committed together. Freeing a pending file
 * that was not committed removes it and leaves the old file untouched. */
typedef struct _LpPendingFile LpPendingFile;

LpPendingFile *lp_safetensors_write_pending (LpCheckpoint  *checkpoint,
                                             const char    *filename,
                                             LpStage       *stage,
                                             GError       **error);
LpPendingFile *lp_pending_file_new_contents (const char    *path,
                                             gconstpointer  data,
                                             gsize          len,
                                             GError       **error);
/* Whether it is written through to a FIFO or a device (never renamed). */
gboolean       lp_pending_file_is_stream    (LpPendingFile *pending);
/* Renames it over its final name and syncs the directory. */
gboolean       lp_pending_file_commit       (LpPendingFile *pending,
                                             GError       **error);
void           lp_pending_file_free         (LpPendingFile *pending);

G_DEFINE_AUTOPTR_CLEANUP_FUNC (LpPendingFile, lp_pending_file_free)

G_END_DECLS
