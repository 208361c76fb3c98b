/* lp-lora-family-lokr.c: LyCORIS LoKr modules (lycoris/modules/lokr.py)
 *
 * ΔW = kron (W1, W2) · scale, each side stored whole (`X.lokr_w1`,
 * `X.lokr_w2`) or as a product (`X.lokr_w1_a` @ `X.lokr_w1_b`,
 * `X.lokr_w2_a` @ `X.lokr_w2_b`, with a Tucker core `X.lokr_t2` for conv);
 * LokrModule's scale is alpha / lora_dim when a side is a product (lora_dim
 * the rows of its _b part) and 1 when both sides are whole. Not plain; the
 * module's rank is the Kronecker product's bound rank(W1) · rank(W2).
 * These declarations are the only list of LoKr's keys:
 * plugins/lora/lp-lora-lycoris.c reads the parts of the modules the finder
 * made from them.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

/* One side's shape [rows, cols·kernel] and rank bound; FALSE if missing. */
static gboolean
lokr_side (LpLoraModule *module,
           guint         side,
           guint64      *rows,
           guint64      *cols,
           guint64      *rank,
           guint64      *lora_dim)
{
  g_autofree char *whole = g_strdup_printf ("lokr_w%u", side);
  g_autofree char *a_name = g_strdup_printf ("lokr_w%u_a", side);
  g_autofree char *b_name = g_strdup_printf ("lokr_w%u_b", side);
  LpTensor *w = lp_lora_module_get_part (module, whole);
  LpTensor *a = lp_lora_module_get_part (module, a_name);
  LpTensor *b = lp_lora_module_get_part (module, b_name);
  LpTensor *t = lp_lora_module_get_part (module, "lokr_t2");

  if (w != NULL && lp_tensor_get_n_dims (w) >= 2)
    {
      *rows = lp_tensor_get_dim (w, 0);
      *cols = lp_tensor_get_n_elements (w) / MAX (*rows, 1);
      *rank = MIN (*rows, *cols);
      return TRUE;
    }
  if (a != NULL && b != NULL && lp_tensor_get_n_dims (a) == 2 && lp_tensor_get_n_dims (b) >= 2
      && lp_tensor_get_dim (a, 1) == lp_tensor_get_dim (b, 0) && lp_tensor_get_dim (b, 0) > 0)
    {
      *rows = lp_tensor_get_dim (a, 0);
      *lora_dim = lp_tensor_get_dim (b, 0);
      *cols = lp_tensor_get_n_elements (b) / *lora_dim;
      *rank = MIN (MIN (*rows, *cols), *lora_dim);
      return TRUE;
    }
  /* a Tucker W2 (LokrModule use_tucker): t2 [r, r, *kernel], w2_a [r, out],
   * w2_b [r, in] */
  if (side == 2 && a != NULL && b != NULL && t != NULL && lp_tensor_get_n_dims (a) == 2
      && lp_tensor_get_n_dims (b) == 2 && lp_tensor_get_n_dims (t) >= 3
      && lp_tensor_get_dim (a, 0) == lp_tensor_get_dim (b, 0) && lp_tensor_get_dim (b, 0) > 0)
    {
      *lora_dim = lp_tensor_get_dim (b, 0);
      *rows = lp_tensor_get_dim (a, 1);
      *cols = lp_tensor_get_dim (b, 1) * (lp_tensor_get_n_elements (t) / (*lora_dim * *lora_dim));
      *rank = MIN (MIN (*rows, *cols), *lora_dim);
      return TRUE;
    }
  return FALSE;
}

static gboolean
lokr_init_module (LpLoraModule  *module,
                  LpLoraFinder  *finder,
                  GError       **error)
{
  guint64 rows[2], cols[2], rank[2], lora_dim = 0;

  for (guint side = 1; side <= 2; side++)
    if (!lokr_side (module, side, &rows[side - 1], &cols[side - 1], &rank[side - 1], &lora_dim))
      {
        g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                     "module %s: LoKr module whose W%u is neither a whole lokr_w%u "
                     "(2-D or 4-D) nor a product lokr_w%u_a @ lokr_w%u_b",
                     module->name, side, side, side, side);
        return FALSE;
      }
  if (rank[0] * rank[1] == 0 || rank[0] * rank[1] > G_MAXUINT)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: LoKr module of rank %" G_GUINT64_FORMAT, module->name,
                   rank[0] * rank[1]);
      return FALSE;
    }
  module->rank = rank[0] * rank[1];
  module->out_features = rows[0] * rows[1];
  module->in_features = cols[0] * cols[1];
  module->scale = 1.0;
  module->alpha_value = module->rank;
  if (lora_dim > 0)
    {
      guint rank_bound = module->rank;

      /* read_alpha divides by the rank: LokrModule divides by lora_dim */
      module->rank = lora_dim;
      if (!lp_lora_module_read_alpha (module, error))
        return FALSE;
      module->rank = rank_bound;
    }
  return TRUE;
}

static const LpLoraPart lokr_parts[] = {
  { ".lokr_w1", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_w1_a", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_w1_b", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_w2", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_w2_a", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_w2_b", LP_LORA_ROLE_OTHER, FALSE },
  /* a Tucker core of W1, which neither LyCORIS nor ComfyUI reads: found,
   * so that the stages refuse it by name */
  { ".lokr_t1", LP_LORA_ROLE_OTHER, FALSE },
  { ".lokr_t2", LP_LORA_ROLE_OTHER, FALSE },
  { ".alpha", LP_LORA_ROLE_OTHER, TRUE },
};

const LpLoraFamily lp_lora_family_lokr = {
  .name = "lokr",
  .title = "LyCORIS LoKr",
  .convention = LP_LORA_CONVENTION_LOKR,
  .layout = LP_LORA_LAYOUT_STRUCTURED,
  .parts = lokr_parts,
  .n_parts = G_N_ELEMENTS (lokr_parts),
  .init_module = lokr_init_module,
};
