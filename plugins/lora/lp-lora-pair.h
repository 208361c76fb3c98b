/* lp-lora-pair.h: two lazy tensors made by one computation
 *
 * The two factors of a module come out of one decomposition. Whichever of
 * the pair is asked for first computes both and keeps the other until it is
 * asked for too; both share a compute group, so one worker computes them.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/* Computes the bytes of both tensors (exactly their sizes), or sets @error.
 * Called at most once at a time per pair, from any thread. */
typedef gboolean (*LpLoraPairFunc) (gpointer   user_data,
                                    GBytes   **first,
                                    GBytes   **second,
                                    GError   **error);

typedef struct {
  const char *name;
  LpDtype dtype;
  const guint64 *shape;
  guint n_dims;
} LpLoraPairSpec;

/* The pair of lazy tensors; @destroy frees @user_data when both are gone.
 * FALSE with @error set (and @user_data destroyed) if a spec is invalid. */
gboolean  lp_lora_pair_new  (const LpLoraPairSpec *first_spec,
                             const LpLoraPairSpec *second_spec,
                             LpLoraPairFunc        func,
                             gpointer              user_data,
                             GDestroyNotify        destroy,
                             LpTensor            **first,
                             LpTensor            **second,
                             GError              **error);

G_END_DECLS
