/* lp-lora-metadata.c: the metadata a LoRA file carries about its own ranks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <math.h>
#include <string.h>

/* Metadata that kohya's tools compute from the file's bytes or its network:
 * stale as soon as the factors change or the file leaves kohya's naming. */
static const char *const kohya_hash_keys[] = { "sshs_model_hash", "sshs_legacy_hash" };
static const char *const kohya_network_keys[] = {
  "ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args",
};

static gboolean
has_kohya_metadata (LpCheckpoint *checkpoint)
{
  g_auto(GStrv) keys = lp_checkpoint_dup_metadata_keys (checkpoint);

  for (guint i = 0; keys[i] != NULL; i++)
    if (g_str_has_prefix (keys[i], "ss_") || g_str_has_prefix (keys[i], "sshs_"))
      return TRUE;
  return FALSE;
}

/* An alpha as kohya's resize_lora.py writes it: str() of a Python float. */
static char *
python_float (double value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  if (value == floor (value) && fabs (value) < 1e16)
    return g_strdup_printf ("%.1f", value);
  return g_strdup (g_ascii_dtostr (buf, sizeof buf, value));
}

/* kohya networks/resize_lora.py, resize(): ss_network_dim and
 * ss_network_alpha become the new rank and alpha, or "Dynamic" when the
 * modules differ; the comment starts with a note of the resize. */
static void
update_kohya (LpCheckpoint *output,
              GPtrArray    *modules,
              const guint  *new_ranks,
              const double *new_alphas)
{
  guint old_dim = 0, rank = 0, n_kohya = 0;
  gboolean same_rank = TRUE, same_alpha = TRUE, changed = FALSE;
  double alpha = NAN;
  const char *comment;
  g_autofree char *note = NULL;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      if (lp_lora_module_get_convention (module) != LP_LORA_CONVENTION_KOHYA)
        continue;
      old_dim = MAX (old_dim, lp_lora_module_get_rank (module));
      changed |= new_ranks[i] != lp_lora_module_get_rank (module);
      if (n_kohya == 0)
        rank = new_ranks[i];
      same_rank &= new_ranks[i] == rank;
      if (!isnan (new_alphas[i]))
        {
          if (isnan (alpha))
            alpha = new_alphas[i];
          same_alpha &= new_alphas[i] == alpha;
        }
      n_kohya++;
    }
  if (n_kohya == 0 || !has_kohya_metadata (output))
    return;

  /* the bytes change: kohya's hashes of them no longer hold */
  for (guint i = 0; i < G_N_ELEMENTS (kohya_hash_keys); i++)
    lp_checkpoint_set_metadata (output, kohya_hash_keys[i], NULL);
  if (!changed)
    return;

  comment = lp_checkpoint_get_metadata (output, "ss_training_comment");
  if (same_rank)
    {
      g_autofree char *dim = g_strdup_printf ("%u", rank);
      g_autofree char *alpha_text = isnan (alpha) ? g_strdup (dim)
                                    : same_alpha ? python_float (alpha) : g_strdup ("Dynamic");

      note = g_strdup_printf ("dimension is resized from %u to %u by lpipe; %s",
                              old_dim, rank, comment ? comment : "");
      lp_checkpoint_set_metadata (output, "ss_network_dim", dim);
      lp_checkpoint_set_metadata (output, "ss_network_alpha", alpha_text);
    }
  else
    {
      note = g_strdup_printf ("Dynamic resize with lpipe from %u; %s",
                              old_dim, comment ? comment : "");
      lp_checkpoint_set_metadata (output, "ss_network_dim", "Dynamic");
      if (same_alpha && !isnan (alpha))
        {
          g_autofree char *alpha_text = python_float (alpha);
          lp_checkpoint_set_metadata (output, "ss_network_alpha", alpha_text);
        }
      else
        lp_checkpoint_set_metadata (output, "ss_network_alpha", "Dynamic");
    }
  lp_checkpoint_set_metadata (output, "ss_training_comment", note);
}

/* cloneofsimo's lora_diffusion save_safeloras_with_embeds: one
 * `<module>:rank` entry per module (`text_encoder:0:rank`). */
static void
update_cloneofsimo (LpCheckpoint *output,
                    GPtrArray    *modules,
                    const guint  *new_ranks)
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
}

/**
 * lp_lora_update_metadata:
 * @output: the checkpoint with the new factors, holding a copy of the input's
 *   metadata
 * @modules: (element-type LpLoraModule): the input's modules
 * @new_ranks: (array): the rank written for each of @modules
 * @new_alphas: (array): the kohya alpha written for each of @modules (NaN
 *   for a module without an `.alpha` tensor)
 *
 * Rewrites the metadata that describes the factors' ranks, as the tools that
 * write it would after a resize:
 *
 * - kohya (`ss_*` keys; sd-scripts `networks/resize_lora.py`, `resize()`):
 *   `ss_network_dim` and `ss_network_alpha` become the new rank and alpha, or
 *   `Dynamic` when the modules differ; `ss_training_comment` starts with a
 *   note of the resize; `sshs_model_hash` and `sshs_legacy_hash`, which hash
 *   the file's bytes, are dropped;
 * - cloneofsimo: every `<module>:rank` entry gets the module's new rank.
 */
void
lp_lora_update_metadata (LpCheckpoint *output,
                         GPtrArray    *modules,
                         const guint  *new_ranks,
                         const double *new_alphas)
{
  g_return_if_fail (LP_IS_CHECKPOINT (output));
  g_return_if_fail (modules != NULL);

  if (modules->len == 0)
    return;
  update_kohya (output, modules, new_ranks, new_alphas);
  update_cloneofsimo (output, modules, new_ranks);
}

/**
 * lp_lora_metadata_converted:
 * @output: a checkpoint converted to another key convention, holding a copy
 *   of the input's metadata
 * @target: the convention it was converted to
 *
 * Drops the metadata that described the file in its old convention: kohya's
 * `ss_network_*` and `sshs_*` hashes when the target is not kohya, and
 * diffusers' `lora_adapter_metadata` (the LoraConfig diffusers would build
 * instead of reading the factors' shapes) whatever the target, since the
 * modules it names are split, fused or renamed.
 */
void
lp_lora_metadata_converted (LpCheckpoint     *output,
                            LpLoraConvention  target)
{
  g_return_if_fail (LP_IS_CHECKPOINT (output));

  for (guint i = 0; i < G_N_ELEMENTS (kohya_hash_keys); i++)
    lp_checkpoint_set_metadata (output, kohya_hash_keys[i], NULL);
  if (target != LP_LORA_CONVENTION_KOHYA)
    for (guint i = 0; i < G_N_ELEMENTS (kohya_network_keys); i++)
      lp_checkpoint_set_metadata (output, kohya_network_keys[i], NULL);
  lp_checkpoint_set_metadata (output, "lora_adapter_metadata", NULL);
}
