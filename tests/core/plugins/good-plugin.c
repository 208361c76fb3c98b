/* A well-formed plugin with the test stages. */
#include "lp-test-stages.h"

static gboolean
register_stages (LpPlugin *plugin, GError **error)
{
  return lp_plugin_register_stage (plugin, LP_TYPE_TEST_SOURCE, error) &&
         lp_plugin_register_stage (plugin, LP_TYPE_TEST_ADD, error) &&
         lp_plugin_register_stage (plugin, LP_TYPE_TEST_COLLECT, error) &&
         lp_plugin_register_stage (plugin, LP_TYPE_TEST_CONCAT, error);
}

LP_PLUGIN_DEFINE ("test-good", "Stages for the core tests", register_stages)
