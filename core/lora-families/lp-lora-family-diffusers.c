/* lp-lora-family-diffusers.c: diffusers LoRAs saved by save_lora_weights
 *
 * `X.lora_A.weight` / `X.lora_B.weight`, the PEFT names without a config
 * beside them: scale 1 (diffusers' own lora_adapter_metadata is the loaders'
 * hook, left NULL here). Beside a PEFT adapter_config.json the same keys are
 * a PEFT adapter (lp-lora-family-peft.c).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static gboolean
diffusers_init_module (LpLoraModule  *module,
                       LpLoraFinder  *finder,
                       GError       **error)
{
  if (finder->config_family == &lp_lora_family_peft)
    return lp_lora_family_peft_init_module (module, finder, error);
  return TRUE;
}

static const LpLoraPart diffusers_parts[] = {
  { ".lora_A.weight", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora_B.weight", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_diffusers = {
  .name = "diffusers",
  .title = "PEFT or diffusers",
  .convention = LP_LORA_CONVENTION_DIFFUSERS,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = diffusers_parts,
  .n_parts = G_N_ELEMENTS (diffusers_parts),
  .init_module = diffusers_init_module,
};
