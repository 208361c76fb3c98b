/* lp-transform-plugin.c: the `transform` plugin, renaming, selecting, merging and scaling
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-transform-stages.h"

static gboolean
register_stages (LpPlugin  *plugin,
                 GError   **error)
{
  return lp_plugin_register_stage (plugin, LP_TYPE_RENAME, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_SELECT, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_MERGE, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_SCALE, error);
}

LP_PLUGIN_DEFINE ("transform", "Checkpoint transforms: rename and convert, select, merge, scale",
                  register_stages)
