/* A plugin whose stage takes a name the good plugin registered already. */
#include "lp-test-stages.h"

#define LP_TYPE_TEST_IMPOSTOR (lp_test_impostor_get_type ())
G_DECLARE_FINAL_TYPE (LpTestImpostor, lp_test_impostor, LP, TEST_IMPOSTOR, LpSink)

struct _LpTestImpostor { LpSink parent_instance; };
G_DEFINE_FINAL_TYPE (LpTestImpostor, lp_test_impostor, LP_TYPE_SINK)

static void
lp_test_impostor_class_init (LpTestImpostorClass *klass)
{
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-collect", "Test", "Takes a used name");
}

static void
lp_test_impostor_init (LpTestImpostor *self)
{
}

static gboolean
register_stages (LpPlugin *plugin, GError **error)
{
  return lp_plugin_register_stage (plugin, LP_TYPE_TEST_IMPOSTOR, error);
}

LP_PLUGIN_DEFINE ("test-duplicate", "Registers a name that is taken", register_stages)
