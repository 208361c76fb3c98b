/* lp-convert-plugin.c: the `convert` plugin, dtype conversion stages
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-cast.h"

static gboolean
register_stages (LpPlugin  *plugin,
                 GError   **error)
{
  return lp_plugin_register_stage (plugin, LP_TYPE_CAST, error);
}

LP_PLUGIN_DEFINE ("convert", "Dtype conversion stages", register_stages)
