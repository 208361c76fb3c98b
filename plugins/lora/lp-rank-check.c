/* lp-rank-check.c: the `rank-check` stage, ranks and errors of a LoRA's modules
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-math.h"
#include "lp-lora-report.h"

#include <math.h>
#include <string.h>

/**
 * LpRankCheck:
 *
 * Reports, per LoRA module, the stored rank, the numerical rank (singular
 * values of the update above a tolerance that follows from the dtype), the
 * energy kept and the relative Frobenius error of the update against the
 * original. The original is either a second input, or known to the reduction
 * stage upstream (lora-svd records what it kept and discarded). With
 * `expect-rank` or `require-uniform` it fails the pipeline and names the
 * modules that break the rule; `report` writes everything as JSON.
 *
 * The stage hands on its input with the data computed once, so a sink after
 * it does not compute the reduction a second time.
 */
struct _LpRankCheck
{
  LpTransform parent_instance;

  guint expect_rank;
  gboolean require_uniform;
  char *report;
  char *result;        /* the report of the last run, as JSON */
  gboolean quiet;
  double tolerance;
  char *down_pattern;
  char *up_pattern;
};

enum {
  PROP_0,
  PROP_EXPECT_RANK,
  PROP_REQUIRE_UNIFORM,
  PROP_REPORT,
  PROP_QUIET,
  PROP_TOLERANCE,
  PROP_DOWN_PATTERN,
  PROP_UP_PATTERN,
  PROP_RESULT,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpRankCheck, lp_rank_check, LP_TYPE_TRANSFORM)

typedef struct {
  const char *name;
  guint rank;
  guint numerical_rank;
  guint64 out, in;
  double energy;      /* NAN when unknown */
  double rel_error;   /* NAN when unknown */
  double *sigma;      /* rank singular values of scale · B @ A */
} Row;

/* ---- materializing the input -------------------------------------------- */

typedef struct {
  LpCheckpoint *output;
} Collect;

static gboolean
collect_tensor (LpTensor  *tensor,
                GBytes    *data,
                gpointer   user_data,
                GError   **error)
{
  Collect *collect = user_data;
  const guint64 *shape;
  guint n_dims;

  if (!lp_tensor_is_lazy (tensor))
    return lp_checkpoint_add_tensor (collect->output, tensor, error);

  shape = lp_tensor_get_shape (tensor, &n_dims);
  g_autoptr (LpTensor) held = lp_tensor_new (lp_tensor_get_name (tensor), lp_tensor_get_dtype (tensor),
                                             shape, n_dims, data, error);
  return held != NULL && lp_checkpoint_add_tensor (collect->output, held, error);
}

/* ---- the transform ------------------------------------------------------ */

static gboolean
module_row (LpRankCheck   *self,
            LpCheckpoint  *data,
            LpLoraModule  *module,
            LpLoraModule  *original,
            LpLoraStats   *stats,
            Row           *row,
            GError       **error)
{
  LpTensor *down = lp_checkpoint_lookup (data, lp_tensor_get_name (lp_lora_module_get_down (module)));
  LpTensor *up = lp_checkpoint_lookup (data, lp_tensor_get_name (lp_lora_module_get_up (module)));
  LpLoraFactors f = {
    .out = lp_lora_module_get_out_features (module),
    .in = lp_lora_module_get_in_features (module),
    .r = lp_lora_module_get_rank (module),
  };

  row->name = lp_lora_module_get_name (module);
  row->rank = f.r;
  row->out = f.out;
  row->in = f.in;
  row->energy = row->rel_error = NAN;

  g_autofree double *a = lp_tensor_dup_f64 (down, NULL, error);
  g_autofree double *b = a ? lp_tensor_dup_f64 (up, NULL, error) : NULL;
  if (b == NULL)
    return FALSE;
  f.a = a;
  f.b = b;

  g_autoptr (LpLoraSpectrum) spectrum = lp_lora_spectrum_compute (&f, 0, FALSE, error);
  if (spectrum == NULL)
    return FALSE;
  double tol = self->tolerance;
  if (tol <= 0)
    tol = MAX (MAX (lp_lora_dtype_eps (lp_tensor_get_dtype (down)),
                    lp_lora_dtype_eps (lp_tensor_get_dtype (up))), 1e-7);
  row->numerical_rank = lp_lora_numerical_rank (spectrum, tol);

  double kept, total;
  if (original != NULL)
    {
      g_autofree double *oa = lp_tensor_dup_f64 (lp_lora_module_get_down (original), NULL, error);
      g_autofree double *ob = oa ? lp_tensor_dup_f64 (lp_lora_module_get_up (original), NULL, error) : NULL;
      if (ob == NULL)
        return FALSE;
      if (!lp_lora_all_finite_f64 (oa, lp_tensor_get_n_elements (lp_lora_module_get_down (original)))
          || !lp_lora_all_finite_f64 (ob, lp_tensor_get_n_elements (lp_lora_module_get_up (original))))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                       "NaN or infinity in the original's factors");
          return FALSE;
        }
      double xx, yy, diff;
      lp_lora_delta_norms (ob, oa, lp_lora_module_get_rank (original), lp_lora_module_get_scale (original),
                           b, a, f.r, lp_lora_module_get_scale (module),
                           f.out, f.in, &xx, &yy, &diff);
      row->rel_error = xx > 0 ? sqrt (diff / xx) : (yy > 0 ? INFINITY : 0);
      row->energy = xx > 0 ? MAX (0.0, 1 - diff / xx) : 1;
    }
  else if (stats && lp_lora_stats_lookup (stats, row->name, &kept, &total) && total >= 0)
    {
      row->energy = total > 0 ? MIN (kept / total, 1.0) : 1;
      row->rel_error = sqrt (MAX (0.0, 1 - row->energy));
    }

  row->sigma = g_new (double, f.r);
  for (guint i = 0; i < f.r; i++)
    row->sigma[i] = spectrum->sigma[i] * fabs (lp_lora_module_get_scale (module));
  return TRUE;
}

static char *
format_value (double value, const char *format)
{
  return isfinite (value) ? g_strdup_printf (format, value) : g_strdup ("-");
}

static void
print_table (Row *rows, guint n, GString *summary)
{
  gboolean compared = FALSE;
  gsize width = strlen ("module");

  for (guint i = 0; i < n; i++)
    {
      width = MAX (width, strlen (rows[i].name));
      compared = compared || isfinite (rows[i].energy);
    }
  width = MIN (width, 72);

  if (!compared)
    {
      /* Nothing to measure an error against: the spectrum is what helps. */
      g_print ("%-*s %6s %8s %12s\n", (int) width, "module", "rank", "num-rank", "sigma-1");
      for (guint i = 0; i < n; i++)
        g_print ("%-*s %6u %8u %12.4e\n", (int) width, rows[i].name, rows[i].rank,
                 rows[i].numerical_rank, rows[i].rank > 0 ? rows[i].sigma[0] : 0.0);
      g_print ("%s", summary->str);
      g_print ("no original to measure an error against: give rank-check the original as a second "
               "input, or run it after a reduction; lora-spectrum (lpipe info --spectrum) shows "
               "the error each rank would leave\n");
      return;
    }

  g_print ("%-*s %6s %8s %10s %10s\n", (int) width, "module", "rank", "num-rank", "energy", "rel-error");
  for (guint i = 0; i < n; i++)
    {
      g_autofree char *energy = format_value (rows[i].energy, "%.6f");
      g_autofree char *error = format_value (rows[i].rel_error, "%.3e");
      g_print ("%-*s %6u %8u %10s %10s\n", (int) width, rows[i].name, rows[i].rank,
               rows[i].numerical_rank, energy, error);
    }
  g_print ("%s", summary->str);
}

static GString *
format_report (Row         *rows,
              guint        n,
              guint        min_rank,
              guint        max_rank,
              double       mean_error,
              double       max_error,
              double       min_energy,
              guint64      n_bytes,
              GPtrArray   *failures)
{
  GString *json = g_string_new ("{\n  \"modules\": [\n");
  for (guint i = 0; i < n; i++)
    {
      g_string_append (json, "    {\"name\": ");
      lp_lora_json_string (json, rows[i].name);
      g_string_append_printf (json, ", \"rank\": %u, \"numerical_rank\": %u, \"out_features\": %"
                              G_GUINT64_FORMAT ", \"in_features\": %" G_GUINT64_FORMAT ", \"energy\": ",
                              rows[i].rank, rows[i].numerical_rank, rows[i].out, rows[i].in);
      lp_lora_json_number (json, rows[i].energy);
      g_string_append (json, ", \"rel_error\": ");
      lp_lora_json_number (json, rows[i].rel_error);
      g_string_append (json, ", \"singular_values\": ");
      lp_lora_json_numbers (json, rows[i].sigma, rows[i].sigma ? rows[i].rank : 0);
      g_string_append (json, i + 1 < n ? "},\n" : "}\n");
    }
  g_string_append_printf (json, "  ],\n  \"summary\": {\"n_modules\": %u, \"min_rank\": %u, "
                          "\"max_rank\": %u, \"uniform\": %s, \"n_bytes\": %" G_GUINT64_FORMAT
                          ", \"mean_rel_error\": ",
                          n, min_rank, max_rank, min_rank == max_rank ? "true" : "false", n_bytes);
  lp_lora_json_number (json, mean_error);
  g_string_append (json, ", \"max_rel_error\": ");
  lp_lora_json_number (json, max_error);
  g_string_append (json, ", \"min_energy\": ");
  lp_lora_json_number (json, min_energy);
  g_string_append (json, "},\n  \"failures\": [");
  for (guint i = 0; i < failures->len; i++)
    {
      if (i > 0)
        g_string_append (json, ", ");
      lp_lora_json_string (json, g_ptr_array_index (failures, i));
    }
  g_string_append (json, "]\n}\n");
  return json;
}

static LpCheckpoint *
lp_rank_check_transform (LpTransform   *transform,
                         LpCheckpoint  *input,
                         GError       **error)
{
  LpRankCheck *self = LP_RANK_CHECK (transform);
  LpCheckpoint *original = lp_transform_get_extra_input (transform, 0);
  LpLoraStats *stats = lp_lora_stats_get (input);
  g_autoptr (GPtrArray) modules = NULL;
  g_autoptr (GPtrArray) original_modules = NULL;
  g_autoptr (GHashTable) by_name = g_hash_table_new (g_str_hash, g_str_equal);

  /* a DoRA magnitude does not change the factors' rank */
  modules = lp_lora_find_modules_full (input, self->down_pattern, self->up_pattern,
                                       LP_LORA_FIND_REQUIRED & ~LP_LORA_FIND_REFUSE_DORA, NULL, error);
  if (modules == NULL)
    return NULL;
  if (original != NULL)
    {
      original_modules = lp_lora_find_modules_full (original, self->down_pattern, self->up_pattern,
                                                    LP_LORA_FIND_REQUIRED & ~LP_LORA_FIND_REFUSE_DORA,
                                                    NULL, error);
      if (original_modules == NULL)
        {
          g_prefix_error (error, "the original (second input): ");
          return NULL;
        }
      for (guint i = 0; i < original_modules->len; i++)
        {
          LpLoraModule *m = g_ptr_array_index (original_modules, i);
          g_hash_table_insert (by_name, (gpointer) lp_lora_module_get_name (m), m);
        }
    }

  /* compute the input once (this also fills the reduction's stats) */
  g_autoptr (LpCheckpoint) output = lp_checkpoint_new_like (input);
  Collect collect = { output };
  if (!lp_stage_pull_tensors (LP_STAGE (self), input, collect_tensor, &collect, error))
    return NULL;

  guint n = modules->len;
  g_autofree Row *rows = g_new0 (Row, n);
  g_autoptr (GPtrArray) sigmas = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GHashTable) rank_count = g_hash_table_new (NULL, NULL);
  guint min_rank = G_MAXUINT, max_rank = 0, common_rank = 0, common_count = 0;
  double sum_error = 0, max_error = NAN, min_energy = NAN;
  guint n_error = 0;

  for (guint i = 0; i < n; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      LpLoraModule *orig = original ? g_hash_table_lookup (by_name, lp_lora_module_get_name (module)) : NULL;
      if (original != NULL && orig == NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: not in the original (second input)", lp_lora_module_get_name (module));
          return NULL;
        }
      if (orig != NULL && (lp_lora_module_get_in_features (orig) != lp_lora_module_get_in_features (module)
                           || lp_lora_module_get_out_features (orig) != lp_lora_module_get_out_features (module)))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: %" G_GUINT64_FORMAT " → %" G_GUINT64_FORMAT
                       " features, but %" G_GUINT64_FORMAT " → %" G_GUINT64_FORMAT " in the original",
                       lp_lora_module_get_name (module),
                       lp_lora_module_get_in_features (module), lp_lora_module_get_out_features (module),
                       lp_lora_module_get_in_features (orig), lp_lora_module_get_out_features (orig));
          return NULL;
        }
      if (!module_row (self, output, module, orig, stats, &rows[i], error))
        {
          lp_lora_prefix_error (error, module);
          return NULL;
        }
      g_ptr_array_add (sigmas, rows[i].sigma);

      guint rank = rows[i].rank;
      guint count = GPOINTER_TO_UINT (g_hash_table_lookup (rank_count, GUINT_TO_POINTER (rank))) + 1;
      g_hash_table_insert (rank_count, GUINT_TO_POINTER (rank), GUINT_TO_POINTER (count));
      if (count > common_count)
        {
          common_count = count;
          common_rank = rank;
        }
      min_rank = MIN (min_rank, rank);
      max_rank = MAX (max_rank, rank);
      if (isfinite (rows[i].rel_error))
        {
          sum_error += rows[i].rel_error;
          n_error++;
          max_error = isnan (max_error) ? rows[i].rel_error : MAX (max_error, rows[i].rel_error);
        }
      if (isfinite (rows[i].energy))
        min_energy = isnan (min_energy) ? rows[i].energy : MIN (min_energy, rows[i].energy);
    }
  if (n == 0)
    min_rank = 0;
  double mean_error = n_error > 0 ? sum_error / n_error : NAN;

  g_autoptr (GPtrArray) failures = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < n; i++)
    {
      if (self->expect_rank > 0 && rows[i].rank != self->expect_rank)
        g_ptr_array_add (failures, g_strdup_printf ("%s (rank %u, expected %u)", rows[i].name,
                                                    rows[i].rank, self->expect_rank));
      else if (self->require_uniform && rows[i].rank != common_rank)
        g_ptr_array_add (failures, g_strdup_printf ("%s (rank %u, most modules have %u)", rows[i].name,
                                                    rows[i].rank, common_rank));
    }

  guint64 n_bytes = lp_checkpoint_get_n_bytes (output);
  g_autoptr (GString) summary = g_string_new (NULL);
  g_autofree char *mean_text = format_value (mean_error, "%.3e");
  g_autofree char *max_text = format_value (max_error, "%.3e");
  g_autofree char *energy_text = format_value (min_energy, "%.6f");
  g_string_append_printf (summary, "%u modules, rank %u..%u%s, %" G_GUINT64_FORMAT " bytes of tensors",
                          n, min_rank, max_rank, min_rank == max_rank ? " (uniform)" : "", n_bytes);
  if (n_error > 0)
    g_string_append_printf (summary, "; rel-error mean %s max %s; energy min %s",
                            mean_text, max_text, energy_text);
  g_string_append_c (summary, '\n');

  if (!self->quiet)
    print_table (rows, n, summary);

  /* kept for the `result` property (what lpipe's summary reads), and
   * written where `report` says */
  g_autoptr (GString) json = format_report (rows, n, min_rank, max_rank, mean_error, max_error,
                                            min_energy, n_bytes, failures);
  g_free (self->result);
  self->result = g_strdup (json->str);
  if (self->report != NULL && !lp_lora_report_write (self->report, json, error))
    return NULL;

  if (failures->len > 0)
    {
      g_autoptr (GString) list = g_string_new (NULL);
      for (guint i = 0; i < MIN (failures->len, 20); i++)
        g_string_append_printf (list, "%s%s", i ? ", " : "", (char *) g_ptr_array_index (failures, i));
      if (failures->len > 20)
        g_string_append_printf (list, " and %u more", failures->len - 20);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_CHECK_FAILED,
                   "%u of %u modules %s: %s", failures->len, n,
                   self->expect_rank > 0 ? "do not have the expected rank" : "break the uniform rank",
                   list->str);
      return NULL;
    }

  if (stats)
    lp_lora_stats_attach (stats, output);
  return g_steal_pointer (&output);
}

static void
lp_rank_check_set_property (GObject      *object,
                            guint         prop_id,
                            const GValue *value,
                            GParamSpec   *pspec)
{
  LpRankCheck *self = LP_RANK_CHECK (object);

  switch (prop_id)
    {
    case PROP_EXPECT_RANK: self->expect_rank = g_value_get_uint (value); break;
    case PROP_REQUIRE_UNIFORM: self->require_uniform = g_value_get_boolean (value); break;
    case PROP_REPORT:
      g_free (self->report);
      self->report = g_value_dup_string (value);
      break;
    case PROP_QUIET: self->quiet = g_value_get_boolean (value); break;
    case PROP_TOLERANCE: self->tolerance = g_value_get_double (value); break;
    case PROP_DOWN_PATTERN:
      g_free (self->down_pattern);
      self->down_pattern = g_value_dup_string (value);
      break;
    case PROP_UP_PATTERN:
      g_free (self->up_pattern);
      self->up_pattern = g_value_dup_string (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_rank_check_get_property (GObject    *object,
                            guint       prop_id,
                            GValue     *value,
                            GParamSpec *pspec)
{
  LpRankCheck *self = LP_RANK_CHECK (object);

  switch (prop_id)
    {
    case PROP_EXPECT_RANK: g_value_set_uint (value, self->expect_rank); break;
    case PROP_REQUIRE_UNIFORM: g_value_set_boolean (value, self->require_uniform); break;
    case PROP_REPORT: g_value_set_string (value, self->report); break;
    case PROP_QUIET: g_value_set_boolean (value, self->quiet); break;
    case PROP_TOLERANCE: g_value_set_double (value, self->tolerance); break;
    case PROP_DOWN_PATTERN: g_value_set_string (value, self->down_pattern); break;
    case PROP_UP_PATTERN: g_value_set_string (value, self->up_pattern); break;
    case PROP_RESULT: g_value_set_string (value, self->result); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_rank_check_finalize (GObject *object)
{
  LpRankCheck *self = LP_RANK_CHECK (object);

  g_free (self->report);
  g_free (self->result);
  g_free (self->down_pattern);
  g_free (self->up_pattern);
  G_OBJECT_CLASS (lp_rank_check_parent_class)->finalize (object);
}

/* Options that would change nothing are refused rather than ignored. */
static gboolean
lp_rank_check_prepare (LpStage  *stage,
                       GError  **error)
{
  LpRankCheck *self = LP_RANK_CHECK (stage);

  if (self->expect_rank > 0 && self->require_uniform)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "require-uniform would have no effect: expect-rank=%u already requires "
                   "every module to have that one rank", self->expect_rank);
      return FALSE;
    }
  return TRUE;
}

static void
lp_rank_check_class_init (LpRankCheckClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_rank_check_set_property;
  object_class->get_property = lp_rank_check_get_property;
  object_class->finalize = lp_rank_check_finalize;
  stage_class->prepare = lp_rank_check_prepare;
  transform_class->transform = lp_rank_check_transform;

  properties[PROP_EXPECT_RANK] =
    g_param_spec_uint ("expect-rank", "Expected rank", "Fail unless every module has this rank (0: no check)",
                       0, 65536, 0, flags);
  properties[PROP_REQUIRE_UNIFORM] =
    g_param_spec_boolean ("require-uniform", "Require uniform", "Fail unless every module has the same rank",
                          FALSE, flags);
  properties[PROP_REPORT] =
    g_param_spec_string ("report", "Report", "Write the whole report as JSON to this file",
                         NULL, flags);
  properties[PROP_QUIET] =
    g_param_spec_boolean ("quiet", "Quiet", "Print no table",
                          FALSE, flags);
  properties[PROP_RESULT] =
    g_param_spec_string ("result", "Result",
                         "After a run, the report as JSON (read only: what `report` writes)",
                         NULL, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  properties[PROP_TOLERANCE] =
    g_param_spec_double ("tolerance", "Tolerance", "Singular values below this times the largest do not count to the numerical rank (0: the factors' dtype epsilon)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_DOWN_PATTERN] = lp_lora_pattern_pspec (FALSE);
  properties[PROP_UP_PATTERN] = lp_lora_pattern_pspec (TRUE);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_n_inputs (stage_class, 1, 2);
  lp_stage_class_set_metadata (stage_class, "rank-check", "LoRA",
                               "Report ranks, energy kept and error of every LoRA module; check the ranks");
  lp_stage_class_set_property_file (stage_class, "report");
}

static void
lp_rank_check_init (LpRankCheck *self)
{
}
