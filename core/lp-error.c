/* lp-error.c: the error domains of lpipe
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

G_DEFINE_QUARK (lp-pipeline-error-quark, lp_pipeline_error)
G_DEFINE_QUARK (lp-plugin-error-quark, lp_plugin_error)
G_DEFINE_QUARK (lp-format-error-quark, lp_format_error)
G_DEFINE_QUARK (lp-stage-error-quark, lp_stage_error)
