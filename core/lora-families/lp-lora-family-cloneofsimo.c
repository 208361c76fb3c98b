/* lp-lora-family-cloneofsimo.c: cloneofsimo's lora (`unet:N:down` /
 * `unet:N:up`), scale 1. Its `…:N:rank` metadata is the loaders' hook.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static const LpLoraPart cloneofsimo_parts[] = {
  { ":down", LP_LORA_ROLE_DOWN, FALSE },
  { ":up", LP_LORA_ROLE_UP, FALSE },
};

const LpLoraFamily lp_lora_family_cloneofsimo = {
  .name = "cloneofsimo",
  .title = "cloneofsimo",
  .convention = LP_LORA_CONVENTION_CLONEOFSIMO,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = cloneofsimo_parts,
  .n_parts = G_N_ELEMENTS (cloneofsimo_parts),
};
