/* lp-lora-family-diffusers-processor.c: diffusers' LoRAAttnProcessor
 * layers, `X.processor.to_q_lora.down.weight` / `..._lora.up.weight`,
 * scale 1.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static const LpLoraPart diffusers_processor_parts[] = {
  { "_lora.down.weight", LP_LORA_ROLE_DOWN, FALSE },
  { "_lora.up.weight", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_diffusers_processor = {
  .name = "diffusers-processor",
  .title = "diffusers attention processor",
  .convention = LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = diffusers_processor_parts,
  .n_parts = G_N_ELEMENTS (diffusers_processor_parts),
};
