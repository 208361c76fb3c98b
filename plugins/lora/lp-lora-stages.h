/* lp-lora-stages.h: the LoRA rank stages: lora-svd, lora-project, rank-check, lora-spectrum
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/**
 * LpLoraSvdMethod:
 * @LP_LORA_SVD_METHOD_EXACT: the exact SVD of each update, through its factors
 * @LP_LORA_SVD_METHOD_RANDOMIZED: a randomized range finder with power iterations
 *
 * How lora-svd finds the leading singular vectors.
 */
typedef enum {
  LP_LORA_SVD_METHOD_EXACT,
  LP_LORA_SVD_METHOD_RANDOMIZED,
} LpLoraSvdMethod;

/**
 * LpLoraComputeDtype:
 * @LP_LORA_COMPUTE_DTYPE_F64: double precision
 * @LP_LORA_COMPUTE_DTYPE_F32: single precision sums, about twice as fast;
 *   singular values below ~1e-3 σ₁ lose accuracy
 * @LP_LORA_COMPUTE_DTYPE_AUTO: f32 for factors stored in 16 bits or fewer
 *   (bf16, f16: their products are exact in f32, and the sums round far
 *   below what the 16-bit output rounds anyway), f64 for f32 and f64 factors
 *
 * The precision of the large products.
 */
typedef enum {
  LP_LORA_COMPUTE_DTYPE_F64,
  LP_LORA_COMPUTE_DTYPE_F32,
  LP_LORA_COMPUTE_DTYPE_AUTO,
} LpLoraComputeDtype;

/**
 * LpLoraProjection:
 * @LP_LORA_PROJECTION_GAUSSIAN: entries N(0, 1/k)
 * @LP_LORA_PROJECTION_SPARSE: Achlioptas: ±√3 with probability 1/6 each, 0 with 2/3, over √k
 *
 * The distribution of lora-project's random matrix.
 */
typedef enum {
  LP_LORA_PROJECTION_GAUSSIAN,
  LP_LORA_PROJECTION_SPARSE,
} LpLoraProjection;

/**
 * LpLoraDoraPolicy:
 * @LP_LORA_DORA_REFUSE: a module with a DoRA magnitude is an error naming
 *   the module and why
 * @LP_LORA_DORA_KEEP_MAGNITUDE: the magnitude is kept as trained and the
 *   update ΔW reduced as any other; the merged weight m · (W0 + ΔW') /
 *   ‖W0 + ΔW'‖ then has exactly the trained norms m, and its direction
 *   follows the reduced update (docs/methods.md, "DoRA")
 *
 * What the rank stages do with DoRA modules (kohya/LyCORIS `.dora_scale`,
 * PEFT `lora_magnitude_vector`), whose merged weight depends on a base
 * weight the stages do not read.
 */
typedef enum {
  LP_LORA_DORA_REFUSE,
  LP_LORA_DORA_KEEP_MAGNITUDE,
} LpLoraDoraPolicy;

GType lp_lora_dora_policy_get_type (void);
#define LP_TYPE_LORA_DORA_POLICY (lp_lora_dora_policy_get_type ())
GType lp_lora_svd_method_get_type (void);
#define LP_TYPE_LORA_SVD_METHOD (lp_lora_svd_method_get_type ())
GType lp_lora_compute_dtype_get_type (void);
#define LP_TYPE_LORA_COMPUTE_DTYPE (lp_lora_compute_dtype_get_type ())
GType lp_lora_projection_get_type (void);
#define LP_TYPE_LORA_PROJECTION (lp_lora_projection_get_type ())

#define LP_TYPE_LORA_SVD (lp_lora_svd_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraSvd, lp_lora_svd, LP, LORA_SVD, LpTransform)

#define LP_TYPE_LORA_PROJECT (lp_lora_project_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraProject, lp_lora_project, LP, LORA_PROJECT, LpTransform)

#define LP_TYPE_RANK_CHECK (lp_rank_check_get_type ())
G_DECLARE_FINAL_TYPE (LpRankCheck, lp_rank_check, LP, RANK_CHECK, LpTransform)

#define LP_TYPE_LORA_SPECTRUM_STAGE (lp_lora_spectrum_stage_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraSpectrumStage, lp_lora_spectrum_stage, LP, LORA_SPECTRUM_STAGE, LpSink)

#define LP_TYPE_LORA_EXTRACT (lp_lora_extract_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraExtract, lp_lora_extract, LP, LORA_EXTRACT, LpAggregator)

#define LP_TYPE_LORA_FUSE (lp_lora_fuse_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraFuse, lp_lora_fuse, LP, LORA_FUSE, LpAggregator)

G_END_DECLS
