/* lp-lora-blas.h: OpenBLAS's work buffers, reserved before a stage computes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/* Makes sure OpenBLAS holds a work buffer for each of @stage's threads, so
 * that no BLAS or LAPACK call made while the stage's tensors are computed
 * needs a new one. Fails with a message naming the address-space limit
 * when the memory for them cannot be had. Call at the start of every stage
 * that computes with BLAS or LAPACK, before its lazy tensors exist. */
gboolean lp_lora_blas_reserve (LpStage  *stage,
                               GError  **error);

G_END_DECLS
