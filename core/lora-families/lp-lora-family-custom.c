/* lp-lora-family-custom.c: factors named by the down-pattern and up-pattern
 * properties, down [r, in] and up [out, r], scale 1. The finder matches the
 * patterns itself (they are no fixed suffixes) and refuses patterns that
 * pair the factors of a family stored in another layout.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

const LpLoraFamily lp_lora_family_custom = {
  .name = "custom",
  .title = "custom patterns",
  .convention = LP_LORA_CONVENTION_CUSTOM,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
};
