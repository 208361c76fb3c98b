/* lp-lora-family-cloneofsimo.c: cloneofsimo's lora (`unet:N:down` /
 * `unet:N:up`), scale 1; a rank change rewrites its `…:N:rank` metadata.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static const LpLoraPart cloneofsimo_parts[] = {
  { ":down", LP_LORA_ROLE_DOWN, FALSE },
  { ":up", LP_LORA_ROLE_UP, FALSE },
};

/* cloneofsimo's lora_diffusion save_safeloras_with_embeds: one
 * `<module>:rank` entry per module (`text_encoder:0:rank`). */
static gboolean
cloneofsimo_rewrite (const LpLoraFamily  *family,
                     LpCheckpoint        *input,
                     LpCheckpoint        *output,
                     GPtrArray           *modules,
                     const guint         *new_ranks,
                     GError             **error)
{
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autofree char *key = NULL;

      if (lp_lora_module_get_convention (module) != LP_LORA_CONVENTION_CLONEOFSIMO)
        continue;
      key = g_strconcat (lp_lora_module_get_name (module), ":rank", NULL);
      if (lp_checkpoint_get_metadata (output, key) != NULL)
        {
          g_autofree char *value = g_strdup_printf ("%u", new_ranks[i]);
          lp_checkpoint_set_metadata (output, key, value);
        }
    }
  return TRUE;
}

const LpLoraFamily lp_lora_family_cloneofsimo = {
  .name = "cloneofsimo",
  .title = "cloneofsimo",
  .convention = LP_LORA_CONVENTION_CLONEOFSIMO,
  .layout = LP_LORA_LAYOUT_DOWN_UP,
  .parts = cloneofsimo_parts,
  .n_parts = G_N_ELEMENTS (cloneofsimo_parts),
  .rewrite = cloneofsimo_rewrite,
};
