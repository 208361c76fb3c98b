/* lp-transform-stages.h: the checkpoint transforms: rename, select, lora-merge, lora-scale
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/**
 * LpRenamePreset:
 * @LP_RENAME_PRESET_NONE: no conversion, only the rules
 * @LP_RENAME_PRESET_FLUX_KOHYA_TO_DIFFUSERS: kohya sd-scripts Flux (`lora_unet_double_blocks_0_img_attn_qkv`) to diffusers (`transformer.transformer_blocks.0.attn.to_q`), splitting fused modules
 * @LP_RENAME_PRESET_FLUX_DIFFUSERS_TO_KOHYA: the reverse, fusing q, k, v (and proj_mlp) into one module
 * @LP_RENAME_PRESET_SD_KOHYA_TO_DIFFUSERS: kohya SD 1.5 (`lora_unet_down_blocks_0_..._to_q`) or SDXL (sgm UNet names, `lora_unet_input_blocks_4_1_..._to_q`) to diffusers (`unet.down_blocks.0....to_q`)
 * @LP_RENAME_PRESET_SD_DIFFUSERS_TO_KOHYA: the reverse, with the diffusers UNet names kohya SD 1.5 uses
 * @LP_RENAME_PRESET_SDXL_DIFFUSERS_TO_KOHYA: the reverse, with the sgm UNet names kohya SDXL uses
 * @LP_RENAME_PRESET_PEFT_TO_KOHYA: PEFT (`base_model.model.X.lora_A.weight` + adapter config) to kohya (`lora_unet_X.lora_down.weight` + `.alpha`)
 * @LP_RENAME_PRESET_KOHYA_TO_PEFT: the reverse, writing an adapter config
 *
 * A conversion between the key conventions of LoRA files.
 */
typedef enum {
  LP_RENAME_PRESET_NONE,
  LP_RENAME_PRESET_FLUX_KOHYA_TO_DIFFUSERS,
  LP_RENAME_PRESET_FLUX_DIFFUSERS_TO_KOHYA,
  LP_RENAME_PRESET_SD_KOHYA_TO_DIFFUSERS,
  LP_RENAME_PRESET_SD_DIFFUSERS_TO_KOHYA,
  LP_RENAME_PRESET_PEFT_TO_KOHYA,
  LP_RENAME_PRESET_KOHYA_TO_PEFT,
  LP_RENAME_PRESET_SDXL_DIFFUSERS_TO_KOHYA,
} LpRenamePreset;

/**
 * LpLoraMergeMethod:
 * @LP_LORA_MERGE_METHOD_CONCAT: stack the factors: exact, the rank is the sum
 *
 * How lora-merge combines the modules of its inputs.
 */
typedef enum {
  LP_LORA_MERGE_METHOD_CONCAT,
} LpLoraMergeMethod;

/**
 * LpLoraMergeConvention:
 * @LP_LORA_MERGE_CONVENTION_FIRST: the first input's
 * @LP_LORA_MERGE_CONVENTION_KOHYA: kohya's (`lora_unet_..._to_q.lora_down.weight` + `.alpha`)
 * @LP_LORA_MERGE_CONVENTION_DIFFUSERS: diffusers' (`unet....to_q.lora_A.weight`)
 * @LP_LORA_MERGE_CONVENTION_PEFT: PEFT's (with `adapter_config.json`)
 *
 * The key convention lora-merge writes; inputs in another convention are
 * converted to it by the rename preset that converts them.
 */
typedef enum {
  LP_LORA_MERGE_CONVENTION_FIRST,
  LP_LORA_MERGE_CONVENTION_KOHYA,
  LP_LORA_MERGE_CONVENTION_DIFFUSERS,
  LP_LORA_MERGE_CONVENTION_PEFT,
} LpLoraMergeConvention;

GType lp_lora_merge_convention_get_type (void);
#define LP_TYPE_LORA_MERGE_CONVENTION (lp_lora_merge_convention_get_type ())
GType lp_rename_preset_get_type (void);
#define LP_TYPE_RENAME_PRESET (lp_rename_preset_get_type ())
GType lp_lora_merge_method_get_type (void);
#define LP_TYPE_LORA_MERGE_METHOD (lp_lora_merge_method_get_type ())

#define LP_TYPE_RENAME (lp_rename_get_type ())
G_DECLARE_FINAL_TYPE (LpRename, lp_rename, LP, RENAME, LpTransform)

#define LP_TYPE_SELECT (lp_select_get_type ())
G_DECLARE_FINAL_TYPE (LpSelect, lp_select, LP, SELECT, LpTransform)

#define LP_TYPE_LORA_MERGE (lp_lora_merge_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraMerge, lp_lora_merge, LP, LORA_MERGE, LpAggregator)

#define LP_TYPE_LORA_SCALE (lp_lora_scale_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraScale, lp_lora_scale, LP, LORA_SCALE, LpTransform)

G_END_DECLS
