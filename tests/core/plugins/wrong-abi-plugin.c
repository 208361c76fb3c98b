/* A plugin built for a future ABI. */
#include <lpipe/lpipe-plugin.h>

static gboolean
register_stages (LpPlugin *plugin, GError **error)
{
  g_error ("a plugin of another ABI must never be asked to register");
  return FALSE;
}

G_MODULE_EXPORT const LpPluginDesc lp_plugin_desc = {
  LP_PLUGIN_ABI_VERSION + 1, "test-wrong-abi", "Built for another ABI", "0", "LGPL-2.1-or-later",
  register_stages, { NULL, }
};
