/* lp-lora-plugin.c: the `lora` plugin, LoRA rank reduction and checks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <cblas.h>
#include <lapacke.h>

#include "lp-lora-stages.h"
#include "lp-lora-synth.h"

static gboolean
register_stages (LpPlugin  *plugin,
                 GError   **error)
{
  /* The stages parallelize across modules (lp_stage_pull_tensors() runs one
   * module per worker), so OpenBLAS threads inside a module would only
   * oversubscribe the cores. */
  openblas_set_num_threads (1);
  /* The stages check for NaN and infinity themselves, once per factor;
   * LAPACKE's own check would scan every small matrix again. */
  LAPACKE_set_nancheck (0);

  return lp_plugin_register_stage (plugin, LP_TYPE_LORA_SYNTH, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_SVD, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_PROJECT, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_RANK_CHECK, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_SPECTRUM_STAGE, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_EXTRACT, error)
      && lp_plugin_register_stage (plugin, LP_TYPE_LORA_FUSE, error);
}

LP_PLUGIN_DEFINE ("lora", "LoRA rank reduction, synthetic LoRAs and rank checks", register_stages)
