/* lp-lora-synth.h: the `lora-synth` stage, model-shaped LoRAs for tests and benchmarks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/**
 * LpLoraSynthPreset:
 * @LP_LORA_SYNTH_PRESET_FLUX_DEV: the 494 linear layers of Flux.1-dev
 *   (5,369,856 parameters per unit of rank)
 * @LP_LORA_SYNTH_PRESET_SD15_UNET: the 128 attention projections of the
 *   Stable Diffusion 1.5 UNet
 * @LP_LORA_SYNTH_PRESET_LLAMA: the 154 attention and MLP projections of a
 *   1.1B llama (22 layers, width 2048, 4 key/value heads of 64, MLP 5632)
 *
 * The model whose layers a synthetic LoRA adapts.
 */
typedef enum {
  LP_LORA_SYNTH_PRESET_FLUX_DEV,
  LP_LORA_SYNTH_PRESET_SD15_UNET,
  LP_LORA_SYNTH_PRESET_LLAMA,
} LpLoraSynthPreset;

/**
 * LpLoraSynthFormat:
 * @LP_LORA_SYNTH_FORMAT_DIFFUSERS: `<root>.<module>.lora_A.weight`, no alpha
 * @LP_LORA_SYNTH_FORMAT_KOHYA: `lora_unet_<module_with_underscores>.lora_down.weight`
 *   and a 0-dim `.alpha`, kohya's module names (BFL layers for Flux)
 * @LP_LORA_SYNTH_FORMAT_PEFT: `base_model.model.<module>.lora_A.weight` and an
 *   `adapter_config.json`
 * @LP_LORA_SYNTH_FORMAT_LOHA: LyCORIS LoHa, kohya's names: `.hada_w1_a`,
 *   `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` and a 0-dim `.alpha`
 * @LP_LORA_SYNTH_FORMAT_LOKR: LyCORIS LoKr, kohya's names: `.lokr_w1` and
 *   `.lokr_w2_a`/`.lokr_w2_b` (or a whole `.lokr_w2`), a 0-dim `.alpha`
 * @LP_LORA_SYNTH_FORMAT_MLX: mlx-lm, `<module>.lora_a` [in, r] and
 *   `.lora_b` [r, out] with mlx_lm.lora's `adapter_config.json`
 *
 * How a synthetic LoRA names its tensors and keeps its scale.
 */
typedef enum {
  LP_LORA_SYNTH_FORMAT_DIFFUSERS,
  LP_LORA_SYNTH_FORMAT_KOHYA,
  LP_LORA_SYNTH_FORMAT_PEFT,
  LP_LORA_SYNTH_FORMAT_LOHA,
  LP_LORA_SYNTH_FORMAT_LOKR,
  LP_LORA_SYNTH_FORMAT_MLX,
} LpLoraSynthFormat;

GType lp_lora_synth_preset_get_type (void);
#define LP_TYPE_LORA_SYNTH_PRESET (lp_lora_synth_preset_get_type ())
GType lp_lora_synth_format_get_type (void);
#define LP_TYPE_LORA_SYNTH_FORMAT (lp_lora_synth_format_get_type ())

#define LP_TYPE_LORA_SYNTH (lp_lora_synth_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraSynth, lp_lora_synth, LP, LORA_SYNTH, LpSource)

G_END_DECLS
