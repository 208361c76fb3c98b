/* lp-model-names.h: the tensor names of original-format checkpoints
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib.h>

G_BEGIN_DECLS

GStrv lp_model_name_to_diffusers (const char  *name,
                                  const char **kohya_prefix);
char  *lp_model_unet_name_to_diffusers   (const char *name);
char  *lp_model_unet_name_from_diffusers (const char *name,
                                          gboolean    sdxl);

G_END_DECLS
