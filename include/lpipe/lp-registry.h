/* lp-registry.h: stage types by name, and the plugins that provide them
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <lpipe/lp-stage.h>

G_BEGIN_DECLS

#define LP_TYPE_PLUGIN (lp_plugin_get_type ())
G_DECLARE_FINAL_TYPE (LpPlugin, lp_plugin, LP, PLUGIN, GObject)

const char   *lp_plugin_get_name        (LpPlugin    *self);
const char   *lp_plugin_get_description (LpPlugin    *self);
const char   *lp_plugin_get_version     (LpPlugin    *self);
const char   *lp_plugin_get_filename    (LpPlugin    *self);
gboolean      lp_plugin_register_stage  (LpPlugin    *self,
                                         GType        type,
                                         GError     **error);

#define LP_TYPE_REGISTRY (lp_registry_get_type ())
G_DECLARE_FINAL_TYPE (LpRegistry, lp_registry, LP, REGISTRY, GObject)

LpRegistry   *lp_registry_new             (void);
LpRegistry   *lp_registry_get_default     (void);
LpPlugin     *lp_registry_load_plugin     (LpRegistry   *self,
                                           const char   *filename,
                                           GError      **error);
guint         lp_registry_scan_directory  (LpRegistry   *self,
                                           const char   *directory);
void          lp_registry_scan_default_path (LpRegistry *self);
gboolean      lp_registry_register_stage  (LpRegistry   *self,
                                           GType         type,
                                           GError      **error);
gboolean      lp_registry_register_stage_full (LpRegistry *self,
                                               GType       type,
                                               const char *stage_name,
                                               const char *category,
                                               const char *description,
                                               GError    **error);
GType         lp_registry_lookup          (LpRegistry   *self,
                                           const char   *stage_name);
LpPlugin     *lp_registry_lookup_plugin   (LpRegistry   *self,
                                           const char   *stage_name);
GStrv         lp_registry_list_stages     (LpRegistry   *self);
GPtrArray    *lp_registry_list_plugins    (LpRegistry   *self);
LpStage      *lp_registry_create_stage    (LpRegistry   *self,
                                           const char   *stage_name,
                                           GError      **error);

char         *lp_suggest_closest          (const char         *word,
                                           const char * const *candidates);

G_END_DECLS
