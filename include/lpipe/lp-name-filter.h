/* lp-name-filter.h: choosing tensors or modules by name globs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib-object.h>

G_BEGIN_DECLS

#define LP_TYPE_NAME_FILTER (lp_name_filter_get_type ())

typedef struct _LpNameFilter LpNameFilter;

GType         lp_name_filter_get_type (void) G_GNUC_CONST;
LpNameFilter *lp_name_filter_new      (const char * const *include,
                                       const char * const *exclude);
LpNameFilter *lp_name_filter_ref      (LpNameFilter       *self);
void          lp_name_filter_unref    (LpNameFilter       *self);
gboolean      lp_name_filter_matches  (LpNameFilter       *self,
                                       const char         *name);

G_DEFINE_AUTOPTR_CLEANUP_FUNC (LpNameFilter, lp_name_filter_unref)

G_END_DECLS
