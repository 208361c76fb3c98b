/* lp-lora-family-loha.c: LyCORIS LoHa modules (lycoris/modules/loha.py)
 *
 * ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r, parts `X.hada_w1_a` [out, r],
 * `X.hada_w1_b` [r, in], `X.hada_w2_a`, `X.hada_w2_b`, with Tucker cores
 * `X.hada_t1`/`X.hada_t2` for conv modules and an `X.alpha` (r when
 * missing). Not plain: no single down and up; the stages that know the
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
  LpTensor *w1a, *w1b;

  for (guint i = 0; i < G_N_ELEMENTS (required); i++)
    if (lp_lora_module_get_part (module, required[i]) == NULL)
      {
        g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                     "module %s: LoHa module without its %s.%s part",
                     module->name, module->name, required[i]);
        return FALSE;
      }
  w1a = lp_lora_module_get_part (module, "hada_w1_a");
  w1b = lp_lora_module_get_part (module, "hada_w1_b");
  if (lp_tensor_get_n_dims (w1a) != 2 || lp_tensor_get_n_dims (w1b) < 2
      || lp_tensor_get_dim (w1a, 1) != lp_tensor_get_dim (w1b, 0)
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
  module->out_features = lp_tensor_get_dim (w1a, 0);
  module->in_features = lp_tensor_get_n_elements (w1b) / module->rank;
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
