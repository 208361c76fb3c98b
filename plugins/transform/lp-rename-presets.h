/* lp-rename-presets.h: the one place for name mappings between LoRA conventions
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include "lp-transform-stages.h"

G_BEGIN_DECLS

/**
 * LpRenameTarget:
 * @name: the output module's name, without the target convention's suffixes
 * @convention: %LP_LORA_CONVENTION_KOHYA, %LP_LORA_CONVENTION_DIFFUSERS or
 *   %LP_LORA_CONVENTION_PEFT
 * @n_parts: how many input modules make it: more than one when fused
 * @parts: the input modules, %NULL for a part the input does not have
 * @part_rows: the rows of the output's up factor that each part gives
 * @split: %TRUE when the output is one part of a fused input module
 * @row_start: for a split, the first row of the input's up factor taken
 * @n_rows: for a split, how many rows
 * @keep: for a split, the ranks (columns of the input's up factor, rows of
 *   its down factor) the part uses, ascending; %NULL for all of them. A
 *   kohya file trained with split qkv stores each part's factors in its own
 *   block (downs stacked, up block-diagonal), and a part takes only its own.
 * @n_keep: how many ranks @keep holds
 * @swap_halves: the two halves of the up factor's rows change places:
 *   Flux's `final_layer.adaLN_modulation.1` gives (shift, scale) where
 *   diffusers' `norm_out.linear` gives (scale, shift)
 *
 * One module of a converted checkpoint, as a preset plans it; the rename
 * stage makes its tensors.
 */
typedef struct {
  char *name;
  LpLoraConvention convention;
  guint n_parts;
  LpLoraModule **parts;
  guint64 *part_rows;
  gboolean split;
  guint64 row_start;
  guint64 n_rows;
  guint *keep;
  guint n_keep;
  gboolean swap_halves;
} LpRenameTarget;

void       lp_rename_target_free (LpRenameTarget  *target);

GPtrArray *lp_rename_preset_plan (LpRenamePreset   preset,
                                  GPtrArray       *modules,
                                  GError         **error);

/* The module path `a.b.0.c` that an underscored name `a_b_0_c` stands for,
 * by the table of known path segments; NULL with an error naming @module
 * when no reading, or more than one, exists. */
char      *lp_rename_dot_path    (const char      *underscored,
                                  const char      *module,
                                  GError         **error);

/* kohya's SDXL (sgm UNet) names, underscored, against diffusers' UNet
 * paths (lp-rename-sgm.c) */
gboolean   lp_rename_sgm_is_sgm       (const char      *underscored);
char      *lp_rename_sgm_to_diffusers (const char      *underscored,
                                       const char      *module,
                                       GError         **error);
char      *lp_rename_diffusers_to_sgm (const char      *path,
                                       const char      *module,
                                       GError         **error);

/* The preset that converts @modules to convention @to, chosen by the model
 * their names are of (Flux, SD, SDXL: sgm names where @others, modules
 * already in @to, use them, or where @modules have SDXL's second text
 * encoder or add_embedding); FALSE with an error naming both conventions
 * when no preset converts them. */
gboolean   lp_rename_preset_choose   (GPtrArray        *modules,
                                      GPtrArray        *others,
                                      LpLoraConvention  to,
                                      LpRenamePreset   *preset,
                                      GError          **error);

/* The conversion of the rename stage's #LpRename:preset: @input with its
 * modules in @preset's target convention (lp-rename.c) */
LpCheckpoint *lp_rename_convert       (LpCheckpoint     *input,
                                       LpRenamePreset    preset,
                                       GError          **error);

/* "kohya", "diffusers", "PEFT", ... for messages */
const char *lp_rename_convention_name (LpLoraConvention convention);

/* The nick of @preset ("sd-kohya-to-diffusers") */
const char *lp_rename_preset_nick    (LpRenamePreset    preset);

/* The presets that rename modules of convention @from into @to, as text for
 * an error's advice ("sd-kohya-to-diffusers or flux-kohya-to-diffusers"),
 * or NULL when none does. */
const char *lp_rename_presets_between (LpLoraConvention  from,
                                       LpLoraConvention  to);

G_END_DECLS
