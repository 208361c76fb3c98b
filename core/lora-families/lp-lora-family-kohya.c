/* lp-lora-family-kohya.c: kohya sd-scripts, ComfyUI and LyCORIS LoCon LoRAs
 *
 * `X.lora_down.weight` / `X.lora_up.weight` (4-D for LoCon conv modules)
 * with an optional 0-dim or [1] `X.alpha`: scale alpha / r, 1 without an
 * alpha (sd-scripts' LoRAModule: alpha = lora_dim when missing). A rank
 * change folds alpha / r into the factors and writes alpha = k. After a
 * rank change the ss_* metadata says so, as kohya's resize_lora.py writes it.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

#include <math.h>

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
/* The alpha @output holds for @module, NaN without one. */
static double
written_alpha (LpCheckpoint *output,
               LpLoraModule *module)
{
  g_autofree char *name = g_strconcat (lp_lora_module_get_name (module), ".alpha", NULL);
  LpTensor *alpha = lp_checkpoint_lookup (output, name);
  g_autofree double *value = alpha ? lp_tensor_dup_f64 (alpha, NULL, NULL) : NULL;

  return value ? value[0] : NAN;
}

static gboolean
kohya_rewrite (const LpLoraFamily  *family,
               LpCheckpoint        *input,
               LpCheckpoint        *output,
               GPtrArray           *modules,
               const guint         *new_ranks,
               GError             **error)
{
  guint old_dim = 0, rank = 0, n_kohya = 0;
  gboolean same_rank = TRUE, same_alpha = TRUE, changed = FALSE;
  double alpha = NAN;
  const char *comment;
  g_autofree char *note = NULL;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      double module_alpha;

      if (lp_lora_module_get_convention (module) != LP_LORA_CONVENTION_KOHYA)
        continue;
      old_dim = MAX (old_dim, lp_lora_module_get_rank (module));
      changed |= new_ranks[i] != lp_lora_module_get_rank (module);
      if (n_kohya == 0)
        rank = new_ranks[i];
      same_rank &= new_ranks[i] == rank;
      module_alpha = written_alpha (output, module);
      if (!isnan (module_alpha))
        {
          if (isnan (alpha))
            alpha = module_alpha;
          same_alpha &= module_alpha == alpha;
        }
      n_kohya++;
    }
  if (n_kohya == 0 || !has_kohya_metadata (output))
    return TRUE;

  /* the bytes change: kohya's hashes of them no longer hold */
  for (guint i = 0; lp_lora_kohya_hash_keys[i] != NULL; i++)
    lp_checkpoint_set_metadata (output, lp_lora_kohya_hash_keys[i], NULL);
  if (!changed)
    return TRUE;

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
  return TRUE;
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
  .rewrite = kohya_rewrite,
};
