/* lp-tensor.h: a named, typed, shaped block of data, possibly computed on demand
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib-object.h>
#include <lpipe/lp-dtype.h>

G_BEGIN_DECLS

#define LP_TENSOR_MAX_DIMS 16

#define LP_TYPE_TENSOR (lp_tensor_get_type ())
G_DECLARE_FINAL_TYPE (LpTensor, lp_tensor, LP, TENSOR, GObject)

/**
 * LpTensorDataFunc:
 * @tensor: the tensor whose data is wanted
 * @user_data: the data given to lp_tensor_new_lazy()
 * @error: return location for a #GError
 *
 * Computes the bytes of a lazy tensor. It may be called from any thread, more
 * than once, and must give the same bytes every time.
 *
 * Returns: (transfer full) (nullable): exactly lp_tensor_get_n_bytes() bytes,
 *   or %NULL with @error set
 */
typedef GBytes *(*LpTensorDataFunc) (LpTensor  *tensor,
                                     gpointer   user_data,
                                     GError   **error);

LpTensor      *lp_tensor_new            (const char     *name,
                                         LpDtype         dtype,
                                         const guint64  *shape,
                                         guint           n_dims,
                                         GBytes         *data,
                                         GError        **error);
LpTensor      *lp_tensor_new_lazy       (const char       *name,
                                         LpDtype           dtype,
                                         const guint64    *shape,
                                         guint             n_dims,
                                         LpTensorDataFunc  func,
                                         gpointer          user_data,
                                         GDestroyNotify    notify,
                                         GError          **error);
void           lp_tensor_set_compute_group (LpTensor  *self,
                                            gpointer   group);
gpointer       lp_tensor_get_compute_group (LpTensor  *self);
LpTensor      *lp_tensor_new_from_f32   (const char     *name,
                                         LpDtype         dtype,
                                         const guint64  *shape,
                                         guint           n_dims,
                                         const float    *values,
                                         gsize           n_values,
                                         GError        **error);
LpTensor      *lp_tensor_new_renamed    (LpTensor       *tensor,
                                         const char     *name);

const char    *lp_tensor_get_name       (LpTensor       *self);
LpDtype        lp_tensor_get_dtype      (LpTensor       *self);
guint          lp_tensor_get_n_dims     (LpTensor       *self);
const guint64 *lp_tensor_get_shape      (LpTensor       *self,
                                         guint          *n_dims);
guint64        lp_tensor_get_dim        (LpTensor       *self,
                                         guint           axis);
guint64        lp_tensor_get_n_elements (LpTensor       *self);
guint64        lp_tensor_get_n_bytes    (LpTensor       *self);
gboolean       lp_tensor_is_lazy        (LpTensor       *self);
char          *lp_tensor_describe_shape (LpTensor       *self);

GBytes        *lp_tensor_dup_data       (LpTensor       *self,
                                         GError        **error);
float         *lp_tensor_dup_f32        (LpTensor       *self,
                                         gsize          *n_values,
                                         GError        **error);
double        *lp_tensor_dup_f64        (LpTensor       *self,
                                         gsize          *n_values,
                                         GError        **error);
GBytes        *lp_tensor_dup_f32_bytes  (LpTensor       *self,
                                         GError        **error);

G_END_DECLS
