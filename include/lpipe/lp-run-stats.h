/* lp-run-stats.h: what a pipeline run did, for scripts
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib-object.h>

G_BEGIN_DECLS

#define LP_TYPE_RUN_STATS (lp_run_stats_get_type ())
G_DECLARE_FINAL_TYPE (LpRunStats, lp_run_stats, LP, RUN_STATS, GObject)

double        lp_run_stats_get_elapsed         (LpRunStats *self);
guint         lp_run_stats_get_n_stages        (LpRunStats *self);
guint64       lp_run_stats_get_tensors_written (LpRunStats *self);
guint64       lp_run_stats_get_bytes_written   (LpRunStats *self);
const char * const *lp_run_stats_get_outputs   (LpRunStats *self);

G_END_DECLS
