/* lp-lora-common.c: statistics and output assembly shared by the rank stages
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-common.h"
#include "lp-lora-report.h"
#include "lp-lora-stages.h"

#include <math.h>
#include <string.h>

#define STATS_KEY "lp-lora-stats"

typedef struct {
  double kept;
  double total;
} Entry;

struct _LpLoraStats
{
  gint ref_count;
  char *method;
  GMutex lock;
  GHashTable *entries;   /* module name -> Entry */
  /* the ranks read and written, when the stage set them */
  guint n_modules, in_min, in_max, out_min, out_max;
};

static int
compare_names (gconstpointer a,
               gconstpointer b)
{
  return strcmp (*(char * const *) a, *(char * const *) b);
}

LpLoraStats *
lp_lora_stats_new (const char *method)
{
  LpLoraStats *stats = g_new0 (LpLoraStats, 1);
  stats->ref_count = 1;
  stats->method = g_strdup (method);
  g_mutex_init (&stats->lock);
  stats->entries = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  return stats;
}

LpLoraStats *
lp_lora_stats_ref (LpLoraStats *stats)
{
  g_atomic_int_inc (&stats->ref_count);
  return stats;
}

void
lp_lora_stats_unref (LpLoraStats *stats)
{
  if (stats == NULL || !g_atomic_int_dec_and_test (&stats->ref_count))
    return;
  g_hash_table_unref (stats->entries);
  g_mutex_clear (&stats->lock);
  g_free (stats->method);
  g_free (stats);
}

void
lp_lora_stats_record (LpLoraStats *stats,
                      const char  *module,
                      double       kept,
                      double       total)
{
  Entry *entry = g_new (Entry, 1);
  entry->kept = kept;
  entry->total = total;
  g_mutex_lock (&stats->lock);
  g_hash_table_replace (stats->entries, g_strdup (module), entry);
  g_mutex_unlock (&stats->lock);
}

gboolean
lp_lora_stats_lookup (LpLoraStats *stats,
                      const char  *module,
                      double      *kept,
                      double      *total)
{
  gboolean found;
  g_mutex_lock (&stats->lock);
  Entry *entry = g_hash_table_lookup (stats->entries, module);
  found = entry != NULL;
  if (found)
    {
      *kept = entry->kept;
      *total = entry->total;
    }
  g_mutex_unlock (&stats->lock);
  return found;
}

const char *
lp_lora_stats_get_method (LpLoraStats *stats)
{
  return stats->method;
}

/* The ranks of the modules read and written, for the summary: so that lpipe
 * need not read the files again to tell them. */
void
lp_lora_stats_set_ranks (LpLoraStats *stats,
                         guint        n_modules,
                         const guint *ranks_in,
                         const guint *ranks_out)
{
  g_mutex_lock (&stats->lock);
  stats->n_modules = n_modules;
  stats->in_min = stats->out_min = G_MAXUINT;
  stats->in_max = stats->out_max = 0;
  for (guint m = 0; m < n_modules; m++)
    {
      stats->in_min = MIN (stats->in_min, ranks_in[m]);
      stats->in_max = MAX (stats->in_max, ranks_in[m]);
      stats->out_min = MIN (stats->out_min, ranks_out[m]);
      stats->out_max = MAX (stats->out_max, ranks_out[m]);
    }
  g_mutex_unlock (&stats->lock);
}

/* What was kept of each module, as JSON for lpipe's summary: per module (by
 * name) the energy kept and the relative error of its update, which for an
 * SVD truncation is sqrt (1 - energy) (Eckart-Young). */
char *
lp_lora_stats_to_json (LpLoraStats *stats)
{
  g_autoptr (GString) json = g_string_new ("{\"method\": ");
  g_autoptr (GPtrArray) names = g_ptr_array_new ();
  GHashTableIter iter;
  gpointer key;

  lp_lora_json_string (json, stats->method);
  g_string_append (json, ", \"modules\": [");
  g_mutex_lock (&stats->lock);
  g_hash_table_iter_init (&iter, stats->entries);
  while (g_hash_table_iter_next (&iter, &key, NULL))
    g_ptr_array_add (names, key);
  g_ptr_array_sort (names, compare_names);
  for (guint i = 0; i < names->len; i++)
    {
      Entry *entry = g_hash_table_lookup (stats->entries, g_ptr_array_index (names, i));
      double energy = entry->total > 0 ? MIN (entry->kept / entry->total, 1.0) : 1.0;

      g_string_append (json, i ? ", {\"name\": " : "{\"name\": ");
      lp_lora_json_string (json, g_ptr_array_index (names, i));
      g_string_append (json, ", \"energy\": ");
      lp_lora_json_number (json, energy);
      g_string_append (json, ", \"rel_error\": ");
      lp_lora_json_number (json, sqrt (MAX (0.0, 1 - energy)));
      g_string_append_c (json, '}');
    }
  g_string_append_c (json, ']');
  if (stats->n_modules > 0)
    g_string_append_printf (json, ", \"summary\": {\"n_modules\": %u, \"min_rank\": %u, \"max_rank\": %u, "
                            "\"in_min_rank\": %u, \"in_max_rank\": %u}",
                            stats->n_modules, stats->out_min, stats->out_max, stats->in_min, stats->in_max);
  g_mutex_unlock (&stats->lock);
  g_string_append_c (json, '}');
  return g_string_free (g_steal_pointer (&json), FALSE);
}

void
lp_lora_stats_attach (LpLoraStats  *stats,
                      LpCheckpoint *checkpoint)
{
  g_object_set_data_full (G_OBJECT (checkpoint), STATS_KEY, lp_lora_stats_ref (stats),
                          (GDestroyNotify) lp_lora_stats_unref);
}

LpLoraStats *
lp_lora_stats_get (LpCheckpoint *checkpoint)
{
  return g_object_get_data (G_OBJECT (checkpoint), STATS_KEY);
}

GBytes *
lp_lora_bytes_from_f64 (LpDtype       dtype,
                        const double *values,
                        gsize         n,
                        gsize        *overflow)
{
  g_autoptr (GError) error = NULL;
  GBytes *bytes = lp_lora_try_bytes_from_f64 (dtype, values, n, overflow, "a factor", &error);

  /* aborts as g_malloc() would; lp_lora_try_bytes_from_f64() reports it instead */
  if (bytes == NULL)
    g_error ("%s", error->message);
  return bytes;
}

/* lp_lora_bytes_from_f64(), the buffer from lp_try_alloc(): %NULL with
 * @error set when it cannot be had. */
GBytes *
lp_lora_try_bytes_from_f64 (LpDtype        dtype,
                            const double  *values,
                            gsize          n,
                            gsize         *overflow,
                            const char    *what,
                            GError       **error)
{
  gsize size = (n * lp_dtype_get_bits (dtype) + 7) / 8;
  gpointer data = lp_try_alloc (size, 1, what, error);

  if (data == NULL)
    return NULL;
  *overflow += lp_dtype_from_f64 (dtype, values, data, n);
  return g_bytes_new_take (data, size);
}

gboolean
lp_lora_check_overflow (gsize          overflow,
                        LpDtype        dtype,
                        GError       **error)
{
  if (overflow == 0)
    return TRUE;
  /* Casting helps where a wider float holds the values; f32 and wider
   * factors this large are beyond what the stages compute in. */
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
               "%" G_GSIZE_FORMAT " values of the reduced factors overflow %s%s",
               overflow, lp_dtype_to_string (dtype),
               lp_dtype_get_bits (dtype) < 32 ? "; cast the LoRA to f32 before reducing it" : "");
  return FALSE;
}

GParamSpec *
lp_lora_pattern_pspec (gboolean up)
{
  if (up)
    return g_param_spec_string ("up-pattern", "Up pattern",
                                "Names of the up factors, with one * for the module (e.g. w_b_*)",
                                NULL, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  return g_param_spec_string ("down-pattern", "Down pattern",
                              "Names of the down factors, with one * for the module (e.g. w_a_*)",
                              NULL, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
}

void
lp_lora_prefix_error (GError      **error,
                      LpLoraModule *module)
{
  g_prefix_error (error, "module %s: ", lp_lora_module_get_name (module));
}

LpCheckpoint *
lp_lora_assemble (LpCheckpoint  *input,
                  GPtrArray     *modules,
                  LpTensor     **new_down,
                  LpTensor     **new_up,
                  LpTensor     **new_alpha,
                  const guint   *new_ranks,
                  GError       **error)
{
  g_autoptr (LpCheckpoint) output = lp_checkpoint_new_like (input);
  g_autoptr (GHashTable) replace = g_hash_table_new_full (NULL, NULL, NULL, g_object_unref);

  /* New factors go in the module's stored layout (mlx-lm's transposed),
   * in place of the checkpoint's own tensors. */
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      if (new_down[i])
        g_hash_table_insert (replace, lp_lora_module_get_stored_factor (module, FALSE),
                             lp_lora_module_to_stored_layout (module, FALSE, new_down[i]));
      if (new_up[i])
        g_hash_table_insert (replace, lp_lora_module_get_stored_factor (module, TRUE),
                             lp_lora_module_to_stored_layout (module, TRUE, new_up[i]));
      if (new_alpha[i] && lp_lora_module_get_alpha (module))
        g_hash_table_insert (replace, lp_lora_module_get_alpha (module), g_object_ref (new_alpha[i]));
    }

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      LpTensor *replacement = g_hash_table_lookup (replace, tensor);
      if (!lp_checkpoint_add_tensor (output, replacement ? replacement : tensor, error))
        return NULL;
    }

  /* PEFT's and mlx's configs, and each family's metadata */
  if (!lp_lora_rewrite_for_new_ranks (input, output, modules, new_ranks, error))
    return NULL;

  return g_steal_pointer (&output);
}

void
lp_lora_warn_rank_kept (LpStage    *stage,
                        GPtrArray  *modules,
                        guint       rank,
                        const char *hint)
{
  guint n = 0, lowest = G_MAXUINT, highest = 0;
  g_autofree char *where = NULL;
  g_autofree char *kept = NULL;

  for (guint i = 0; i < modules->len; i++)
    {
      guint r = lp_lora_module_get_rank (g_ptr_array_index (modules, i));

      if (r > rank)
        continue;
      n++;
      lowest = MIN (lowest, r);
      highest = MAX (highest, r);
    }
  if (n == 0)
    return;
  where = lp_stage_describe (stage);
  kept = lowest == highest ? g_strdup_printf ("rank %u", lowest)
                           : g_strdup_printf ("ranks %u to %u", lowest, highest);
  g_warning ("%s: %u of %u modules have %s, at or below rank=%u: kept at %s%s%s%s",
             where, n, modules->len, kept, rank, lowest == highest ? kept : "their ranks",
             lowest < rank ? " (" : "", lowest < rank ? hint : "", lowest < rank ? ")" : "");
}

gboolean
lp_lora_check_exact_options (gboolean  niter_set,
                             gboolean  oversample_set,
                             gboolean  seed_set,
                             GError  **error)
{
  if (!niter_set && !oversample_set && !seed_set)
    return TRUE;
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
               "%s would have no effect: niter, oversample and seed steer method=randomized, "
               "and the exact SVD draws nothing",
               niter_set ? "niter" : oversample_set ? "oversample" : "seed");
  return FALSE;
}

G_DEFINE_ENUM_TYPE (LpLoraDoraPolicy, lp_lora_dora_policy,
  G_DEFINE_ENUM_VALUE (LP_LORA_DORA_REFUSE, "refuse"),
  G_DEFINE_ENUM_VALUE (LP_LORA_DORA_KEEP_MAGNITUDE, "keep-magnitude"))

GParamSpec *
lp_lora_dora_pspec (void)
{
  return g_param_spec_enum ("dora", "DoRA",
                            "DoRA modules (dora_scale, lora_magnitude_vector): refuse (their merged weight "
                            "depends on the base weight), or keep-magnitude (keep the trained magnitude, "
                            "reduce the update: the merged weight keeps its norms, its direction follows "
                            "the reduced update)",
                            LP_TYPE_LORA_DORA_POLICY, LP_LORA_DORA_REFUSE,
                            G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
}

/* DoRA (Liu et al. 2024; PEFT's DoraLinearLayer, ComfyUI's weight_decompose)
 * merges W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norms taken per output row
 * (LyCORIS wd_on_out=False: per input column) and recomputed by the loader.
 * A reduced ΔW' leaves W' with the norms m exactly whatever W0 is; its
 * direction moves by at most 2 ‖ΔW − ΔW'‖ / ‖W0 + ΔW‖ per row, which needs
 * W0 to be known. */
gboolean
lp_lora_apply_dora_policy (LpStage    *stage,
                           int         policy,
                           GPtrArray  *modules,
                           GError    **error)
{
  LpLoraModule *first = NULL;
  guint n = 0;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      if (!lp_lora_module_is_dora (module))
        continue;
      if (first == NULL)
        first = module;
      n++;
    }
  if (n == 0)
    return TRUE;
  if (policy == LP_LORA_DORA_REFUSE)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: DoRA magnitude %s: the merged weight m · (W0 + ΔW) / ‖W0 + ΔW‖ "
                   "depends on the base weight W0, which this stage does not read, so no "
                   "reduction of ΔW can be made optimal for it (%u DoRA modules in all); "
                   "dora=keep-magnitude keeps each m as trained and reduces ΔW "
                   "(docs/methods.md, \"DoRA\")",
                   lp_lora_module_get_name (first),
                   lp_tensor_get_name (lp_lora_module_get_dora_magnitude (first)), n);
      return FALSE;
    }
  g_autofree char *where = lp_stage_describe (stage);
  g_warning ("%s: %u DoRA modules (the first: %s): dora=keep-magnitude keeps their trained "
             "magnitudes, so the merged weights keep their norms exactly; their directions follow "
             "the reduced update by an amount that depends on the base weight, which is not read "
             "here (the errors reported are those of the update)",
             where, n, lp_lora_module_get_name (first));
  return TRUE;
}
