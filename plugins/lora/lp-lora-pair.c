/* lp-lora-pair.c: two lazy tensors made by one computation
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-pair.h"

typedef struct {
  gint ref_count;
  GMutex lock;
  LpLoraPairFunc func;
  gpointer user_data;
  GDestroyNotify destroy;
  GBytes *held[2];      /* computed, not yet handed out */
} Pair;

typedef struct {
  Pair *pair;
  guint which;
} PairRef;

static Pair *
pair_ref (Pair *pair)
{
  g_atomic_int_inc (&pair->ref_count);
  return pair;
}

static void
pair_unref (Pair *pair)
{
  if (!g_atomic_int_dec_and_test (&pair->ref_count))
    return;
  g_clear_pointer (&pair->held[0], g_bytes_unref);
  g_clear_pointer (&pair->held[1], g_bytes_unref);
  if (pair->destroy != NULL)
    pair->destroy (pair->user_data);
  g_mutex_clear (&pair->lock);
  g_free (pair);
}

static void
pair_ref_free (gpointer data)
{
  PairRef *ref = data;

  pair_unref (ref->pair);
  g_free (ref);
}

static GBytes *
pair_data (LpTensor  *tensor,
           gpointer   user_data,
           GError   **error)
{
  PairRef *ref = user_data;
  Pair *pair = ref->pair;
  GBytes *result = NULL;

  g_mutex_lock (&pair->lock);
  if (pair->held[ref->which] == NULL)
    {
      /* a second request for the same tensor computes both again */
      g_clear_pointer (&pair->held[0], g_bytes_unref);
      g_clear_pointer (&pair->held[1], g_bytes_unref);
      if (!pair->func (pair->user_data, &pair->held[0], &pair->held[1], error))
        {
          g_clear_pointer (&pair->held[0], g_bytes_unref);
          g_clear_pointer (&pair->held[1], g_bytes_unref);
        }
    }
  result = g_steal_pointer (&pair->held[ref->which]);
  g_mutex_unlock (&pair->lock);
  return result;
}

static LpTensor *
pair_tensor (Pair                 *pair,
             guint                 which,
             const LpLoraPairSpec *spec,
             GError              **error)
{
  PairRef *ref = g_new (PairRef, 1);
  LpTensor *tensor;

  ref->pair = pair_ref (pair);
  ref->which = which;
  tensor = lp_tensor_new_lazy (spec->name, spec->dtype, spec->shape, spec->n_dims,
                               pair_data, ref, pair_ref_free, error);
  if (tensor != NULL)
    lp_tensor_set_compute_group (tensor, pair);
  return tensor;
}

gboolean
lp_lora_pair_new (const LpLoraPairSpec *first_spec,
                  const LpLoraPairSpec *second_spec,
                  LpLoraPairFunc        func,
                  gpointer              user_data,
                  GDestroyNotify        destroy,
                  LpTensor            **first,
                  LpTensor            **second,
                  GError              **error)
{
  Pair *pair = g_new0 (Pair, 1);

  pair->ref_count = 1;
  g_mutex_init (&pair->lock);
  pair->func = func;
  pair->user_data = user_data;
  pair->destroy = destroy;

  *first = pair_tensor (pair, 0, first_spec, error);
  *second = *first != NULL ? pair_tensor (pair, 1, second_spec, error) : NULL;
  if (*second == NULL)
    g_clear_object (first);
  pair_unref (pair);
  return *second != NULL;
}
