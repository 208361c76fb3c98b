/* lp-lora-common.h: what the LoRA rank stages share besides the numerics
 *
 * The per-module statistics a reduction leaves for rank-check, and the
 * assembly of a reduced checkpoint (tensor order, alpha tensors, the PEFT
 * adapter config).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/* A thread-safe table filled by the lazy tensors of a reduction as they are
 * computed: per module the energy (Σσ²) kept and the total. A negative total
 * means the method does not know it (randomized, projection). */
typedef struct _LpLoraStats LpLoraStats;

LpLoraStats  *lp_lora_stats_new      (const char   *method);
LpLoraStats  *lp_lora_stats_ref      (LpLoraStats  *stats);
void          lp_lora_stats_unref    (LpLoraStats  *stats);
void          lp_lora_stats_record   (LpLoraStats  *stats,
                                      const char   *module,
                                      double        kept,
                                      double        total);
gboolean      lp_lora_stats_lookup   (LpLoraStats  *stats,
                                      const char   *module,
                                      double       *kept,
                                      double       *total);
const char   *lp_lora_stats_get_method (LpLoraStats *stats);
void          lp_lora_stats_set_ranks (LpLoraStats *stats,
                                       guint        n_modules,
                                       const guint *ranks_in,
                                       const guint *ranks_out);
char         *lp_lora_stats_to_json  (LpLoraStats  *stats);
void          lp_lora_stats_attach   (LpLoraStats  *stats,
                                      LpCheckpoint *checkpoint);
LpLoraStats  *lp_lora_stats_get      (LpCheckpoint *checkpoint);

G_DEFINE_AUTOPTR_CLEANUP_FUNC (LpLoraStats, lp_lora_stats_unref)

/* Data of n values in @dtype, converted from f64; adds to *@overflow the
 * finite values that became infinite (or NaN) in @dtype. */
GBytes       *lp_lora_bytes_from_f64 (LpDtype       dtype,
                                      const double *values,
                                      gsize         n,
                                      gsize        *overflow);
GBytes       *lp_lora_try_bytes_from_f64 (LpDtype        dtype,
                                          const double  *values,
                                          gsize          n,
                                          gsize         *overflow,
                                          const char    *what,
                                          GError       **error);
/* Reduced factors are never written with values that overflowed their
 * dtype: an error (the caller names the module) when @overflow > 0. */
gboolean      lp_lora_check_overflow (gsize         overflow,
                                      LpDtype       dtype,
                                      GError      **error);

/* The output of a reduction: the input's tensors in their order, each
 * module's factors (and kohya alpha) replaced by the ones given (a NULL entry
 * keeps the input's), and the PEFT adapter config rewritten for @new_ranks. */
LpCheckpoint *lp_lora_assemble       (LpCheckpoint  *input,
                                      GPtrArray     *modules,
                                      LpTensor     **new_down,
                                      LpTensor     **new_up,
                                      LpTensor     **new_alpha,
                                      const guint   *new_ranks,
                                      GError       **error);

/* The `down-pattern` / `up-pattern` properties every LoRA rank stage takes,
 * handed to lp_lora_find_modules() for custom key conventions. */
GParamSpec   *lp_lora_pattern_pspec  (gboolean      up);

/* A fixed rank @rank at or above some modules' own: tells once, as a
 * `lpipe: warning:` line naming @stage, how many modules keep their rank and
 * which, and @hint (what would pad them) when some are below @rank.
 * Nothing when there is none. */
void          lp_lora_warn_rank_kept (LpStage      *stage,
                                      GPtrArray    *modules,
                                      guint         rank,
                                      const char   *hint);

/* The randomized method's options, set with method=exact where they would
 * change nothing: an error naming the first. */
gboolean      lp_lora_check_exact_options (gboolean  niter_set,
                                           gboolean  oversample_set,
                                           gboolean  seed_set,
                                           GError  **error);

/* The `dora` property of the rank stages (an LpLoraDoraPolicy). */
GParamSpec   *lp_lora_dora_pspec     (void);

/* Applies the stage's DoRA policy (an LpLoraDoraPolicy) to @modules, found
 * without LP_LORA_FIND_REFUSE_DORA: refuse, naming the first DoRA module and
 * why, or keep the magnitudes, saying once how many and what that keeps. */
gboolean      lp_lora_apply_dora_policy (LpStage    *stage,
                                         int         policy,
                                         GPtrArray  *modules,
                                         GError    **error);

/* Prefixes an error with the module's name. */
void          lp_lora_prefix_error   (GError      **error,
                                      LpLoraModule *module);

G_END_DECLS
