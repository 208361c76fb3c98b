/* A shared object that is not an lpipe plugin: no lp_plugin_desc. */
#include <gmodule.h>

G_MODULE_EXPORT int lp_not_a_plugin (void);

G_MODULE_EXPORT int
lp_not_a_plugin (void)
{
  return 42;
}
