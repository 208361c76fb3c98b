/* lp-lora-metadata.c: the metadata a LoRA file carries about its own ranks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lora-families/lp-lora-family.h"

/* Metadata that kohya's tools compute from the file's bytes or its network:
 * stale as soon as the factors change or the file leaves kohya's naming. */
const char *const lp_lora_kohya_hash_keys[] = { "sshs_model_hash", "sshs_legacy_hash", NULL };
static const char *const kohya_network_keys[] = {
  "ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args",
};

/**
 * lp_lora_metadata_converted:
 * @output: a checkpoint converted to another key convention, holding a copy
 *   of the input's metadata
 * @target: the convention it was converted to
 *
 * Drops the metadata that described the file in its old convention or its
 * old factors: kohya's `sshs_*` hashes (the bytes changed), its
 * `ss_network_*` when the target is not kohya, and diffusers'
 * `lora_adapter_metadata` (the LoraConfig diffusers would build instead of
 * reading the factors' shapes) whatever the target, since the modules it
 * names are split, fused or renamed. The converting stages put every
 * module's scale where the target keeps it (a kohya `.alpha`, or into the
 * factors for diffusers, which then infers the config from the shapes,
 * scale 1, as diffusers' own conversions do), so nothing the dropped
 * entries said is lost. lora-merge calls it too: its output's factors
 * carry the weighted scales.
 */
void
lp_lora_metadata_converted (LpCheckpoint     *output,
                            LpLoraConvention  target)
{
  g_return_if_fail (LP_IS_CHECKPOINT (output));

  for (guint i = 0; lp_lora_kohya_hash_keys[i] != NULL; i++)
    lp_checkpoint_set_metadata (output, lp_lora_kohya_hash_keys[i], NULL);
  if (target != LP_LORA_CONVENTION_KOHYA)
    for (guint i = 0; i < G_N_ELEMENTS (kohya_network_keys); i++)
      lp_checkpoint_set_metadata (output, kohya_network_keys[i], NULL);
  lp_checkpoint_set_metadata (output, "lora_adapter_metadata", NULL);
}
