/* lp-lora-family-kohya.c: kohya sd-scripts, ComfyUI and LyCORIS LoCon LoRAs
 *
 * `X.lora_down.weight` / `X.lora_up.weight` (4-D for LoCon conv modules)
 * with an optional 0-dim or [1] `X.alpha`: scale alpha / r, 1 without an
 * alpha (sd-scripts' LoRAModule: alpha = lora_dim when missing). A rank
 * change folds alpha / r into the factors and writes alpha = k. The ss_*
 * metadata rewrite is the loaders' hook (rewrite, NULL here).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static gboolean
kohya_init_module (LpLoraModule  *module,
                   LpLoraFinder  *finder,
                   GError       **error)
{
  g_autofree char *mid_name = g_strconcat (module->name, ".lora_mid.weight", NULL);

  /* A Tucker (LoCon "cp") module is down, mid and up; pairing only down
   * and up would silently change it. */
  if (lp_checkpoint_lookup (finder->checkpoint, mid_name) != NULL)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: Tucker-decomposed modules (%s) are not supported",
                   module->name, mid_name);
      return FALSE;
    }
  return lp_lora_module_read_alpha (module, error);
}

static const LpLoraPart kohya_parts[] = {
  { ".lora_down.weight", LP_LORA_ROLE_DOWN, FALSE },
  { ".lora_up.weight", LP_LORA_ROLE_UP, FALSE },
  { ".alpha", LP_LORA_ROLE_OTHER, TRUE },
};

const LpLoraFamily lp_lora_family_kohya = {
  .name = "kohya",
  .title = "kohya/LoCon",
  .convention = LP_LORA_CONVENTION_KOHYA,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = kohya_parts,
  .n_parts = G_N_ELEMENTS (kohya_parts),
  .init_module = kohya_init_module,
};
