/* lp-lora-family-loha.c: LyCORIS LoHa modules (lycoris/modules/loha.py)
 *
 * ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r, parts `X.hada_w1_a` [out, r],
 * `X.hada_w1_b` [r, in], `X.hada_w2_a`, `X.hada_w2_b`, with Tucker cores
 * `X.hada_t1`/`X.hada_t2` [r, r, *kernel] for conv modules (w_a then
 * [r, out]) and an `X.alpha` (r when missing). These declarations are the
 * only list of LoHa's keys: plugins/lora/lp-lora-lycoris.c reads the parts
 * of the modules the finder made from them. Not plain: no single down and up; the stages that know the
 * structure read the parts (lp_lora_module_get_part()).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

static gboolean
loha_init_module (LpLoraModule  *module,
                  LpLoraFinder  *finder,
                  GError       **error)
{
  static const char *const required[] = { "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b" };
  LpTensor *w1a, *w1b, *t1;
  gboolean tucker;

  for (guint i = 0; i < G_N_ELEMENTS (required); i++)
    if (lp_lora_module_get_part (module, required[i]) == NULL)
      {
        g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                     "module %s: LoHa part %s.%s is missing",
                     module->name, module->name, required[i]);
        return FALSE;
      }
  w1a = lp_lora_module_get_part (module, "hada_w1_a");
  w1b = lp_lora_module_get_part (module, "hada_w1_b");
  t1 = lp_lora_module_get_part (module, "hada_t1");
  /* LohaModule with use_tucker: t1 [r, r, *kernel], w1a [r, out], w1b [r, in];
   * else w1a [out, r], w1b [r, in] or [r, in, *kernel] */
  tucker = t1 != NULL && lp_tensor_get_n_dims (t1) >= 3;
  if (lp_tensor_get_n_dims (w1a) != 2 || lp_tensor_get_n_dims (w1b) < 2
      || lp_tensor_get_dim (w1a, tucker ? 0 : 1) != lp_tensor_get_dim (w1b, 0)
      || lp_tensor_get_dim (w1b, 0) == 0 || lp_tensor_get_dim (w1b, 0) > G_MAXUINT)
    {
      g_autofree char *sa = lp_tensor_describe_shape (w1a);
      g_autofree char *sb = lp_tensor_describe_shape (w1b);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: LoHa parts hada_w1_a %s and hada_w1_b %s do not make "
                   "a product", module->name, sa, sb);
      return FALSE;
    }
  module->rank = lp_tensor_get_dim (w1b, 0);
  module->out_features = lp_tensor_get_dim (w1a, tucker ? 1 : 0);
  module->in_features = lp_tensor_get_n_elements (w1b) / module->rank;
  if (tucker)
    module->in_features *= lp_tensor_get_n_elements (t1) / ((guint64) module->rank * module->rank);
  module->alpha_value = module->rank;
  module->scale = 1.0;
  return lp_lora_module_read_alpha (module, error);
}

static const LpLoraPart loha_parts[] = {
  { ".hada_w1_a", LP_LORA_ROLE_OTHER, FALSE },
  { ".hada_w1_b", LP_LORA_ROLE_OTHER, FALSE },
  { ".hada_w2_a", LP_LORA_ROLE_OTHER, FALSE },
  { ".hada_w2_b", LP_LORA_ROLE_OTHER, FALSE },
  { ".hada_t1", LP_LORA_ROLE_OTHER, FALSE },
  { ".hada_t2", LP_LORA_ROLE_OTHER, FALSE },
  { ".alpha", LP_LORA_ROLE_OTHER, TRUE },
};

const LpLoraFamily lp_lora_family_loha = {
  .name = "loha",
  .title = "LyCORIS LoHa",
  .convention = LP_LORA_CONVENTION_LOHA,
  .layout = LP_LORA_LAYOUT_STRUCTURED,
  .parts = loha_parts,
  .n_parts = G_N_ELEMENTS (loha_parts),
  .init_module = loha_init_module,
};
