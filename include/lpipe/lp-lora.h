/* lp-lora.h: LoRA modules: pairing down and up factors for every key convention
 *
 * The one place that knows how LoRA files name their factors and where they
 * keep the scale. Every LoRA stage finds its modules through it.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <lpipe/lp-checkpoint.h>

G_BEGIN_DECLS

/**
 * LpLoraConvention:
 * @LP_LORA_CONVENTION_PEFT: `*.lora_A.weight` / `*.lora_B.weight`, scale from `adapter_config.json`
 * @LP_LORA_CONVENTION_DIFFUSERS: `*.lora_A.weight` / `*.lora_B.weight` with no config: scale 1
 * @LP_LORA_CONVENTION_DIFFUSERS_OLD: `*.lora.down.weight` / `*.lora.up.weight`
 * @LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR: `*.processor.to_q_lora.down.weight`
 * @LP_LORA_CONVENTION_KOHYA: `*.lora_down.weight` / `*.lora_up.weight` with optional `*.alpha`
 * @LP_LORA_CONVENTION_CLONEOFSIMO: `prefix:N:down` / `prefix:N:up`
 * @LP_LORA_CONVENTION_CUSTOM: given by a down and an up pattern
 * @LP_LORA_CONVENTION_MLX: mlx-lm `*.lora_a` `[in, r]` / `*.lora_b` `[r, out]`
 * @LP_LORA_CONVENTION_LOHA: LyCORIS LoHa `*.hada_w1_a` ... (not plain)
 * @LP_LORA_CONVENTION_LOKR: LyCORIS LoKr `*.lokr_w1` ... (not plain)
 *
 * How a LoRA file names its factors; one value per family of the table
 * (lp_lora_module_get_family() names them, and is where new families go).
 */
typedef enum {
  LP_LORA_CONVENTION_PEFT,
  LP_LORA_CONVENTION_DIFFUSERS,
  LP_LORA_CONVENTION_DIFFUSERS_OLD,
  LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR,
  LP_LORA_CONVENTION_KOHYA,
  LP_LORA_CONVENTION_CLONEOFSIMO,
  LP_LORA_CONVENTION_CUSTOM,
  LP_LORA_CONVENTION_MLX,
  LP_LORA_CONVENTION_LOHA,
  LP_LORA_CONVENTION_LOKR,
} LpLoraConvention;

/**
 * LpLoraFindFlags:
 * @LP_LORA_FIND_NONE: every module, possibly none
 * @LP_LORA_FIND_REQUIRE_MODULES: no module is an error naming the families
 *   looked for and tensors of unknown adapter families
 * @LP_LORA_FIND_PLAIN: a module that is not plain (LoHa, LoKr) is an error
 * @LP_LORA_FIND_STORED_LAYOUT: a module stored transposed (mlx-lm) is an
 *   error, for stages that replace factors by lp_lora_module_get_down()
 * @LP_LORA_FIND_REFUSE_DORA: a module with a DoRA magnitude is an error
 *   saying why
 * @LP_LORA_FIND_REQUIRED: all of the above
 *
 * Which modules a caller of lp_lora_find_modules_full() works on.
 */
typedef enum /*< flags >*/ {
  LP_LORA_FIND_NONE = 0,
  LP_LORA_FIND_REQUIRE_MODULES = 1 << 0,
  LP_LORA_FIND_PLAIN = 1 << 1,
  LP_LORA_FIND_STORED_LAYOUT = 1 << 2,
  LP_LORA_FIND_REFUSE_DORA = 1 << 3,
  LP_LORA_FIND_REQUIRED = LP_LORA_FIND_REQUIRE_MODULES | LP_LORA_FIND_PLAIN
                          | LP_LORA_FIND_STORED_LAYOUT | LP_LORA_FIND_REFUSE_DORA,
} LpLoraFindFlags;

#define LP_TYPE_LORA_MODULE (lp_lora_module_get_type ())
G_DECLARE_FINAL_TYPE (LpLoraModule, lp_lora_module, LP, LORA_MODULE, GObject)

const char       *lp_lora_module_get_name         (LpLoraModule *self);
LpLoraConvention  lp_lora_module_get_convention   (LpLoraModule *self);
const char       *lp_lora_module_get_family       (LpLoraModule *self);
LpTensor         *lp_lora_module_get_part         (LpLoraModule *self,
                                                   const char   *part);
GPtrArray        *lp_lora_module_get_tensors      (LpLoraModule *self);
gboolean          lp_lora_module_is_plain         (LpLoraModule *self);
gboolean          lp_lora_module_is_transposed    (LpLoraModule *self);
gboolean          lp_lora_module_is_dora          (LpLoraModule *self);
LpTensor         *lp_lora_module_get_dora_magnitude (LpLoraModule *self);
LpTensor         *lp_lora_module_get_down         (LpLoraModule *self);
LpTensor         *lp_lora_module_get_up           (LpLoraModule *self);
LpTensor         *lp_lora_module_get_alpha        (LpLoraModule *self);
guint             lp_lora_module_get_rank         (LpLoraModule *self);
guint64           lp_lora_module_get_in_features  (LpLoraModule *self);
guint64           lp_lora_module_get_out_features (LpLoraModule *self);
double            lp_lora_module_get_scale        (LpLoraModule *self);

GPtrArray        *lp_lora_find_modules            (LpCheckpoint  *checkpoint,
                                                   const char    *down_pattern,
                                                   const char    *up_pattern,
                                                   GPtrArray    **others,
                                                   GError       **error);
GPtrArray        *lp_lora_find_modules_full       (LpCheckpoint     *checkpoint,
                                                   const char       *down_pattern,
                                                   const char       *up_pattern,
                                                   LpLoraFindFlags   flags,
                                                   GPtrArray       **others,
                                                   GError          **error);
GPtrArray        *lp_lora_find_modules_required   (LpCheckpoint  *checkpoint,
                                                   const char    *down_pattern,
                                                   const char    *up_pattern,
                                                   GPtrArray    **others,
                                                   GError       **error);

/* Layout of the factors, for stages that write factors of another rank */
gboolean          lp_lora_module_is_conv          (LpLoraModule *self);
void              lp_lora_module_get_kernel_size  (LpLoraModule *self,
                                                   guint64      *kernel_h,
                                                   guint64      *kernel_w);
void              lp_lora_module_new_factor_shape (LpLoraModule *self,
                                                   gboolean      is_up,
                                                   guint         new_rank,
                                                   guint64      *shape_out,
                                                   guint        *n_dims);
LpTensor         *lp_lora_module_get_stored_factor (LpLoraModule *self,
                                                   gboolean      is_up);
LpTensor         *lp_lora_module_to_stored_layout (LpLoraModule *self,
                                                   gboolean      is_up,
                                                   LpTensor     *factor);

/* Scale semantics through a rank change r -> k */
double            lp_lora_module_get_alpha_value  (LpLoraModule *self);
double            lp_lora_module_get_fold_scale   (LpLoraModule *self);
LpTensor         *lp_lora_module_new_alpha        (LpLoraModule *self,
                                                   guint         new_rank);
const char       *lp_lora_module_get_peft_key     (LpLoraModule *self);

gboolean          lp_lora_rewrite_for_new_ranks   (LpCheckpoint  *input,
                                                   LpCheckpoint  *output,
                                                   GPtrArray     *modules,
                                                   const guint   *new_ranks,
                                                   GError       **error);
/* Drops the metadata a conversion to @target makes untrue */
void              lp_lora_metadata_converted      (LpCheckpoint     *output,
                                                   LpLoraConvention  target);
/* Applies a rename's rules to one tensor name; NULL if they fail */
typedef char     *(*LpLoraRenameFunc)              (const char       *name,
                                                   gpointer          data);
/* Rewrites (or drops) the metadata naming modules after a rename by rules */
gboolean          lp_lora_metadata_renamed        (LpCheckpoint     *input,
                                                   LpCheckpoint     *output,
                                                   LpLoraRenameFunc  rename,
                                                   gpointer          data,
                                                   GError          **error);
char             *lp_lora_peft_pattern_key        (const char    *module_key);
char             *lp_lora_update_adapter_config   (const char    *json,
                                                   GPtrArray     *modules,
                                                   const guint   *new_ranks,
                                                   GError       **error);

G_END_DECLS
