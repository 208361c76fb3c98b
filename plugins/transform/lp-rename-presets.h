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

/* The presets that rename modules of convention @from into @to, as text for
 * an error's advice ("sd-kohya-to-diffusers or flux-kohya-to-diffusers"),
 * or NULL when none does. */
const char *lp_rename_presets_between (LpLoraConvention  from,
                                       LpLoraConvention  to);

G_END_DECLS
