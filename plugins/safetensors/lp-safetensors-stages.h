/* lp-safetensors-stages.h: the stage types of the safetensors plugin
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

#define LP_TYPE_SAFETENSORS_SOURCE (lp_safetensors_source_get_type ())
G_DECLARE_FINAL_TYPE (LpSafetensorsSource, lp_safetensors_source, LP, SAFETENSORS_SOURCE, LpSource)

#define LP_TYPE_SAFETENSORS_SINK (lp_safetensors_sink_get_type ())
G_DECLARE_FINAL_TYPE (LpSafetensorsSink, lp_safetensors_sink, LP, SAFETENSORS_SINK, LpSink)

G_END_DECLS
