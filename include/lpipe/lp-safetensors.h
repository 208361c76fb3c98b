/* lp-safetensors.h: reading and writing the safetensors file format
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <lpipe/lp-stage.h>

G_BEGIN_DECLS

/* The reference implementation's limit on the header's length. */
#define LP_SAFETENSORS_MAX_HEADER 100000000

LpCheckpoint *lp_safetensors_load            (const char    *filename,
                                              GError       **error);
LpCheckpoint *lp_safetensors_load_from_bytes (GBytes        *bytes,
                                              const char    *origin,
                                              GError       **error);
gboolean      lp_safetensors_is_index        (const char    *path);
LpCheckpoint *lp_safetensors_load_index      (const char    *path,
                                              GError       **error);
gboolean      lp_safetensors_save            (LpCheckpoint  *checkpoint,
                                              const char    *filename,
                                              LpStage       *stage,
                                              GError       **error);
gboolean      lp_safetensors_save_sharded    (LpCheckpoint  *checkpoint,
                                              const char    *location,
                                              guint64        max_shard_size,
                                              LpStage       *stage,
                                              GError       **error);

G_END_DECLS
