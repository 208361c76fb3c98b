/* lp-lora-family-dora.c: DoRA magnitudes, attached to a plain module
 *
 * DoRA (Liu et al. 2024) applies W' = m ⊙ (W + s·B A) / ‖W + s·B A‖ row by
 * row; kohya/LyCORIS store m as `X.dora_scale`, PEFT as
 * `X.lora_magnitude_vector.weight` (older PEFT: `X.lora_magnitude_vector`).
 * m was trained against the norms of W + s·B A, so it depends on the base
 * weight and no longer matches a changed update: stages refuse such modules
 * (LP_LORA_FIND_REFUSE_DORA); no stage offers a policy for them yet.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

const LpLoraPart lp_lora_dora_parts[] = {
  { ".dora_scale", LP_LORA_ROLE_OTHER, TRUE },
  { ".lora_magnitude_vector.weight", LP_LORA_ROLE_OTHER, TRUE },
  { ".lora_magnitude_vector", LP_LORA_ROLE_OTHER, TRUE },
};

const guint lp_lora_n_dora_parts = G_N_ELEMENTS (lp_lora_dora_parts);
