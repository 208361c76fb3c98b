/* lp-lora-family-diffusers-old.c: diffusers' LoRA attention processors
 * before PEFT (LoRALinearLayer): `X.lora.down.weight` / `X.lora.up.weight`,
 * scale 1.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static const LpLoraPart diffusers_old_parts[] = {
  { ".lora.down.weight", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora.up.weight", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_diffusers_old = {
  .name = "diffusers-old",
  .title = "old diffusers",
  .convention = LP_LORA_CONVENTION_DIFFUSERS_OLD,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = diffusers_old_parts,
  .n_parts = G_N_ELEMENTS (diffusers_old_parts),
};
