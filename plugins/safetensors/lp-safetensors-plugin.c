/* lp-safetensors-plugin.c: reading and writing safetensors files as stages
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-safetensors-stages.h"

static gboolean
register_stages (LpPlugin  *plugin,
                 GError   **error)
{
  return lp_plugin_register_stage (plugin, LP_TYPE_SAFETENSORS_SOURCE, error) &&
         lp_plugin_register_stage (plugin, LP_TYPE_SAFETENSORS_SINK, error);
}

LP_PLUGIN_DEFINE ("safetensors", "Read and write safetensors checkpoints", register_stages)
