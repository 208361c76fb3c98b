/* lp-cast.h: the `cast` stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

#define LP_TYPE_CAST (lp_cast_get_type ())
G_DECLARE_FINAL_TYPE (LpCast, lp_cast, LP, CAST, LpTransform)

G_END_DECLS
