/* lp-checkpoint.h: an ordered set of tensors with the file's string metadata
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib-object.h>
#include <lpipe/lp-tensor.h>

G_BEGIN_DECLS

#define LP_TYPE_CHECKPOINT (lp_checkpoint_get_type ())
G_DECLARE_FINAL_TYPE (LpCheckpoint, lp_checkpoint, LP, CHECKPOINT, GObject)

LpCheckpoint *lp_checkpoint_new                (void);
LpCheckpoint *lp_checkpoint_new_like           (LpCheckpoint  *other);

gboolean      lp_checkpoint_add_tensor         (LpCheckpoint  *self,
                                                LpTensor      *tensor,
                                                GError       **error);
guint         lp_checkpoint_get_n_tensors      (LpCheckpoint  *self);
LpTensor     *lp_checkpoint_get_tensor         (LpCheckpoint  *self,
                                                guint          index);
LpTensor     *lp_checkpoint_lookup             (LpCheckpoint  *self,
                                                const char    *name);
GPtrArray    *lp_checkpoint_get_tensors        (LpCheckpoint  *self);
guint64       lp_checkpoint_get_n_bytes        (LpCheckpoint  *self);

void          lp_checkpoint_set_metadata       (LpCheckpoint  *self,
                                                const char    *key,
                                                const char    *value);
const char   *lp_checkpoint_get_metadata       (LpCheckpoint  *self,
                                                const char    *key);
GStrv         lp_checkpoint_dup_metadata_keys  (LpCheckpoint  *self);
void          lp_checkpoint_copy_metadata      (LpCheckpoint  *self,
                                                LpCheckpoint  *from);

void          lp_checkpoint_set_adapter_config (LpCheckpoint  *self,
                                                const char    *json);
const char   *lp_checkpoint_get_adapter_config (LpCheckpoint  *self);

void          lp_checkpoint_set_origin         (LpCheckpoint  *self,
                                                const char    *origin);
const char   *lp_checkpoint_get_origin         (LpCheckpoint  *self);

G_END_DECLS
