/* lpipe-plugin.h: what a stage author includes to write a plugin
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <gmodule.h>
#include <lpipe/lpipe.h>

G_BEGIN_DECLS

/* Bumped whenever a change to the stage classes breaks built plugins. */
#define LP_PLUGIN_ABI_VERSION 1

/**
 * LpPluginDesc:
 * @abi_version: %LP_PLUGIN_ABI_VERSION when the plugin was built
 * @name: the plugin's name (the folder it comes from)
 * @description: one line on what its stages are for
 * @version: the plugin's version
 * @license: its licence (an SPDX identifier)
 * @register_stages: registers the plugin's stage types with lp_plugin_register_stage()
 *
 * What a plugin's `.so` exports as `lp_plugin_desc`; declared with
 * LP_PLUGIN_DEFINE(), never by hand.
 */
typedef struct {
  guint abi_version;
  const char *name;
  const char *description;
  const char *version;
  const char *license;
  gboolean (*register_stages) (LpPlugin *plugin, GError **error);
  /*< private >*/
  gpointer padding[4];
} LpPluginDesc;

/**
 * LP_PLUGIN_DEFINE:
 * @name: the plugin's name, a string literal
 * @description: one line on what its stages are for
 * @register_stages: a `gboolean (*)(LpPlugin *, GError **)` that registers the stages
 *
 * Declares the plugin's entry point. Use it once per plugin, in the plugin's
 * own `lp-<name>-plugin.c`.
 */
#define LP_PLUGIN_DEFINE(name, description, register_stages)            \
  G_MODULE_EXPORT const LpPluginDesc lp_plugin_desc = {                  \
    LP_PLUGIN_ABI_VERSION, name, description, LPIPE_VERSION,             \
    "LGPL-2.1-or-later", register_stages, { NULL, }                      \
  };

G_END_DECLS
