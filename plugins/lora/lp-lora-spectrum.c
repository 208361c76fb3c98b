/* lp-lora-spectrum.c: the `lora-spectrum` stage, the error at every rank
 * before any reduction is written
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-math.h"
#include "lp-lora-report.h"
#include "lp-lora-blas.h"
#include "lp-lora-lycoris.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraSpectrumStage:
 *
 * A sink that computes the singular values of every LoRA module's update
 * `scale · B @ A` (exactly, from the factors) and reports, for the whole file
 * and for each block along the network, the error a reduction to rank 1, 2,
 * 4, … would leave and the energy it would keep, so that a rank can be
 * chosen before anything is written. The relative error of a module at rank
 * k is `‖ΔW − ΔW_k‖ / ‖ΔW‖ = √(Σ_{i≥k} σᵢ² / Σ σᵢ²)`; the energy kept is
 * `1 − error²`, and kohya sd-scripts' "fro retained" (`resize_lora.py`) is
 * `√energy`.
 *
 * It prints a table (unless `quiet`), writes every singular value and the
 * tables as JSON (`report`) and draws them as an SVG chart (`svg`): the error
 * against the rank, and the error of each block at a few ranks.
 */
struct _LpLoraSpectrumStage
{
  LpSink parent_instance;

  char *report;
  char *svg;
  gboolean quiet;
  char *down_pattern;
  char *up_pattern;
};

enum {
  PROP_0,
  PROP_REPORT,
  PROP_SVG,
  PROP_QUIET,
  PROP_DOWN_PATTERN,
  PROP_UP_PATTERN,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraSpectrumStage, lp_lora_spectrum_stage, LP_TYPE_SINK)

/* One module's singular values, of the update with its scale. */
typedef struct {
  LpLoraModule *module;
  guint r;
  double *sigma;      /* r values, descending, zero-padded */
  double total;       /* Σ σ² */
  guint block;        /* index into the blocks */
  guint64 bytes_per_rank;  /* (out + in) · element size of its factors */
} ModuleSpectrum;

typedef struct {
  LpCheckpoint *input;
  GPtrArray *modules;
  ModuleSpectrum *spectra;
} Work;

/* A LyCORIS LoHa or LoKr module: the spectrum of its whole update
 * (lp-lora-lycoris.c), sized as the plain LoRA lora-svd would write, in
 * the dtype of its largest part. */
static gboolean
lycoris_spectrum (LpCheckpoint    *input,
                  LpLoraModule    *module,
                  ModuleSpectrum  *out,
                  GError         **error)
{
  g_autoptr (GPtrArray) parts = lp_lora_module_get_tensors (module);
  guint n = 0;
  double *sigma = lp_lora_lycoris_module_sigma (input, module, &n, error);
  LpTensor *largest = NULL;

  if (sigma == NULL)
    return FALSE;
  for (guint i = 0; i < parts->len; i++)
    if (largest == NULL || lp_tensor_get_n_bytes (parts->pdata[i]) > lp_tensor_get_n_bytes (largest))
      largest = parts->pdata[i];
  out->module = module;
  out->r = n;
  out->sigma = sigma;
  out->total = 0;
  for (guint i = 0; i < n; i++)
    out->total += sigma[i] * sigma[i];
  out->bytes_per_rank = (lp_lora_module_get_out_features (module) + lp_lora_module_get_in_features (module))
                        * (lp_dtype_get_bits (lp_tensor_get_dtype (largest)) / 8);
  return TRUE;
}

static gboolean
module_spectrum (LpLoraModule    *module,
                 ModuleSpectrum  *out,
                 GError         **error)
{
  LpTensor *down = lp_lora_module_get_down (module);
  LpTensor *up = lp_lora_module_get_up (module);
  LpLoraFactors f = {
    .out = lp_lora_module_get_out_features (module),
    .in = lp_lora_module_get_in_features (module),
    .r = lp_lora_module_get_rank (module),
  };
  double scale = fabs (lp_lora_module_get_scale (module));

  g_autofree double *a = lp_tensor_dup_f64 (down, NULL, error);
  g_autofree double *b = a ? lp_tensor_dup_f64 (up, NULL, error) : NULL;
  if (b == NULL)
    return FALSE;
  if (!lp_lora_all_finite_f64 (a, lp_tensor_get_n_elements (down))
      || !lp_lora_all_finite_f64 (b, lp_tensor_get_n_elements (up)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "NaN or infinity in the factors %s, %s",
                   lp_tensor_get_name (down), lp_tensor_get_name (up));
      return FALSE;
    }
  f.a = a;
  f.b = b;

  g_autoptr (LpLoraSpectrum) spectrum = lp_lora_spectrum_compute (&f, 0, FALSE, error);
  if (spectrum == NULL)
    return FALSE;

  out->module = module;
  out->r = f.r;
  out->sigma = g_new (double, f.r);
  for (guint i = 0; i < f.r; i++)
    out->sigma[i] = spectrum->sigma[i] * scale;
  out->total = spectrum->total * scale * scale;
  out->bytes_per_rank = f.out * (lp_dtype_get_bits (lp_tensor_get_dtype (up)) / 8)
                        + f.in * (lp_dtype_get_bits (lp_tensor_get_dtype (down)) / 8);
  return TRUE;
}

static gboolean
spectrum_task (guint     i,
               gpointer  user_data,
               GError  **error)
{
  Work *work = user_data;
  LpLoraModule *module = g_ptr_array_index (work->modules, i);

  if (lp_lora_module_is_plain (module) ? module_spectrum (module, &work->spectra[i], error)
                                       : lycoris_spectrum (work->input, module, &work->spectra[i], error))
    return TRUE;
  lp_lora_prefix_error (error, module);
  return FALSE;
}

/* Every module's spectrum on the stage's threads. */
static ModuleSpectrum *
compute_spectra (LpLoraSpectrumStage  *self,
                 LpCheckpoint         *input,
                 GPtrArray            *modules,
                 GError              **error)
{
  guint n = modules->len;
  Work work = { input, modules, g_new0 (ModuleSpectrum, n) };

  if (!lp_stage_parallel_for (LP_STAGE (self), n, spectrum_task, &work, error))
    {
      for (guint i = 0; i < n; i++)
        g_free (work.spectra[i].sigma);
      g_free (work.spectra);
      return NULL;
    }
  return work.spectra;
}

/* Σ σ² of the k largest. */
static double
kept_at (const ModuleSpectrum *m,
         guint                 k)
{
  double kept = 0;

  /* nothing is cut: exactly no error, whatever the rounding of the sums */
  if (k >= m->r)
    return m->total;
  for (guint i = 0; i < k; i++)
    kept += m->sigma[i] * m->sigma[i];
  return MIN (kept, m->total);
}

static double
error_from (double kept,
            double total)
{
  return total > 0 ? sqrt (MAX (0.0, 1 - kept / total)) : 0;
}

/* The whole file at one rank of the ladder. */
typedef struct {
  guint rank;
  guint64 n_bytes;       /* of the factors at this rank */
  double energy;         /* Σ kept / Σ total over the modules */
  double error;          /* √(1 − energy) */
  double mean_error;     /* of the modules' own errors */
  double max_error;
  guint worst;           /* the module with max_error */
} Step;

typedef struct {
  char *name;
  guint n_modules;
  guint min_rank, max_rank;
  double total;
  double *error;         /* per step of the ladder */
} Block;

static void
block_clear (Block *block)
{
  g_free (block->name);
  g_free (block->error);
}

/* A few ranks for the per-block curves: every rank below the top one when
 * there are at most four, else 1, 4, 16, 64. */
static guint
block_curve_ranks (const guint *ladder,
                   guint        n_ladder,
                   guint       *picked)
{
  guint n = 0;

  for (guint s = 0; s + 1 < n_ladder && n < 4; s++)
    {
      guint k = ladder[s];
      if (n_ladder <= 5 || __builtin_ctz (k) % 2 == 0)
        picked[n++] = s;
    }
  if (n == 0 && n_ladder > 0)
    picked[n++] = 0;
  return n;
}

static void
print_tables (LpCheckpoint         *input,
              const ModuleSpectrum *spectra,
              guint                 n_modules,
              const Step           *steps,
              guint                 n_steps,
              const Block          *blocks,
              guint                 n_blocks)
{
  const char *origin = lp_checkpoint_get_origin (input);
  guint max_rank = n_steps > 0 ? steps[n_steps - 1].rank : 0;
  g_autofree char *size = g_format_size (steps[n_steps - 1].n_bytes);
  gsize width = strlen ("block");

  g_print ("%s: %u LoRA modules, rank up to %u, %s of factors\n",
           origin ? origin : "input", n_modules, max_rank, size);
  g_print ("error = |dW - dW_k| / |dW| at rank k; energy kept = 1 - error^2; "
           "kohya's \"fro retained\" = sqrt(energy)\n\n");
  g_print ("%6s %10s %8s %9s %10s %10s  %s\n", "rank", "size", "energy", "fro-kept",
           "mean-error", "max-error", "worst module");
  for (guint s = 0; s < n_steps; s++)
    {
      g_autofree char *bytes = g_format_size (steps[s].n_bytes);
      g_print ("%6u %10s %8.4f %9.4f %10.3e %10.3e  %s\n", steps[s].rank, bytes,
               steps[s].energy, sqrt (steps[s].energy), steps[s].mean_error, steps[s].max_error,
               steps[s].max_error > 0 ? lp_lora_module_get_name (spectra[steps[s].worst].module) : "-");
    }

  for (guint b = 0; b < n_blocks; b++)
    width = MAX (width, strlen (blocks[b].name));
  width = MIN (width, 48);
  g_print ("\nerror per block (its modules together) at rank\n%-*s %7s %5s", (int) width, "block",
           "modules", "rank");
  for (guint s = 0; s + 1 < n_steps; s++)
    g_print (" %8u", steps[s].rank);
  g_print ("\n");
  for (guint b = 0; b < n_blocks; b++)
    {
      g_autofree char *ranks = blocks[b].min_rank == blocks[b].max_rank
        ? g_strdup_printf ("%u", blocks[b].max_rank)
        : g_strdup_printf ("%u-%u", blocks[b].min_rank, blocks[b].max_rank);
      g_print ("%-*.*s %7u %5s", (int) width, (int) width, blocks[b].name, blocks[b].n_modules, ranks);
      for (guint s = 0; s + 1 < n_steps; s++)
        g_print (" %8.2e", blocks[b].error[s]);
      g_print ("\n");
    }
}

static GString *
report_json (const ModuleSpectrum *spectra,
             guint                 n_modules,
             const Step           *steps,
             guint                 n_steps,
             const Block          *blocks,
             guint                 n_blocks)
{
  GString *json = g_string_new ("{\n  \"whole\": [\n");

  for (guint s = 0; s < n_steps; s++)
    {
      g_string_append_printf (json, "    {\"rank\": %u, \"n_bytes\": %" G_GUINT64_FORMAT ", \"energy\": ",
                              steps[s].rank, steps[s].n_bytes);
      lp_lora_json_number (json, steps[s].energy);
      g_string_append (json, ", \"fro_retained\": ");
      lp_lora_json_number (json, sqrt (steps[s].energy));
      g_string_append (json, ", \"rel_error\": ");
      lp_lora_json_number (json, steps[s].error);
      g_string_append (json, ", \"mean_module_rel_error\": ");
      lp_lora_json_number (json, steps[s].mean_error);
      g_string_append (json, ", \"max_module_rel_error\": ");
      lp_lora_json_number (json, steps[s].max_error);
      g_string_append (json, ", \"worst_module\": ");
      if (steps[s].max_error > 0)
        lp_lora_json_string (json, lp_lora_module_get_name (spectra[steps[s].worst].module));
      else
        g_string_append (json, "null");
      g_string_append (json, s + 1 < n_steps ? "},\n" : "}\n");
    }

  g_string_append (json, "  ],\n  \"blocks\": [\n");
  for (guint b = 0; b < n_blocks; b++)
    {
      g_string_append (json, "    {\"name\": ");
      lp_lora_json_string (json, blocks[b].name);
      g_string_append_printf (json, ", \"n_modules\": %u, \"rel_error\": ", blocks[b].n_modules);
      lp_lora_json_numbers (json, blocks[b].error, n_steps);
      g_string_append (json, b + 1 < n_blocks ? "},\n" : "}\n");
    }

  g_string_append (json, "  ],\n  \"modules\": [\n");
  for (guint m = 0; m < n_modules; m++)
    {
      LpLoraModule *module = spectra[m].module;

      g_string_append (json, "    {\"name\": ");
      lp_lora_json_string (json, lp_lora_module_get_name (module));
      g_string_append (json, ", \"block\": ");
      lp_lora_json_string (json, blocks[spectra[m].block].name);
      g_string_append_printf (json, ", \"rank\": %u, \"out_features\": %" G_GUINT64_FORMAT
                              ", \"in_features\": %" G_GUINT64_FORMAT ", \"scale\": ",
                              spectra[m].r, lp_lora_module_get_out_features (module),
                              lp_lora_module_get_in_features (module));
      lp_lora_json_number (json, lp_lora_module_get_scale (module));
      g_string_append (json, ", \"singular_values\": ");
      lp_lora_json_numbers (json, spectra[m].sigma, spectra[m].r);
      g_string_append (json, m + 1 < n_modules ? "},\n" : "}\n");
    }
  g_string_append_printf (json, "  ],\n  \"ranks\": [");
  for (guint s = 0; s < n_steps; s++)
    g_string_append_printf (json, "%s%u", s ? ", " : "", steps[s].rank);
  g_string_append (json, "]\n}\n");
  return json;
}

static GString *
report_svg (LpCheckpoint *input,
            const Step   *steps,
            guint         n_steps,
            const Block  *blocks,
            guint         n_blocks)
{
  g_autofree double *x = g_new (double, n_steps);
  g_autofree double *whole = g_new (double, n_steps);
  g_autofree double *mean = g_new (double, n_steps);
  g_autofree double *worst = g_new (double, n_steps);
  g_autofree double *index = g_new (double, MAX (n_blocks, 1));
  g_autofree double *per_block = g_new (double, 4 * MAX (n_blocks, 1));
  g_autofree const char **names = g_new (const char *, MAX (n_blocks, 1));
  g_autofree char **labels = g_new0 (char *, 5);
  LpLoraChartSeries by_rank[3], by_block[4];
  guint ladder[32], picked[4], n_picked;
  const char *origin = lp_checkpoint_get_origin (input);
  g_autofree char *base = origin ? g_path_get_basename (origin) : g_strdup ("LoRA");
  g_autofree char *title = g_strdup_printf ("%s: error of a reduction to each rank", base);

  for (guint s = 0; s < n_steps; s++)
    ladder[s] = steps[s].rank;
  n_picked = block_curve_ranks (ladder, n_steps, picked);

  for (guint s = 0; s < n_steps; s++)
    {
      x[s] = steps[s].rank;
      whole[s] = steps[s].error;
      mean[s] = steps[s].mean_error;
      worst[s] = steps[s].max_error;
    }
  by_rank[0] = (LpLoraChartSeries) { "whole file", x, whole, n_steps };
  by_rank[1] = (LpLoraChartSeries) { "mean of modules", x, mean, n_steps };
  by_rank[2] = (LpLoraChartSeries) { "worst module", x, worst, n_steps };

  for (guint b = 0; b < n_blocks; b++)
    {
      index[b] = b;
      names[b] = blocks[b].name;
    }
  for (guint c = 0; c < n_picked; c++)
    {
      double *y = per_block + c * MAX (n_blocks, 1);
      for (guint b = 0; b < n_blocks; b++)
        y[b] = blocks[b].error[picked[c]];
      labels[c] = g_strdup_printf ("rank %u", steps[picked[c]].rank);
      by_block[c] = (LpLoraChartSeries) { labels[c], index, y, n_blocks };
    }

  LpLoraChart chart = {
    title, by_rank, G_N_ELEMENTS (by_rank), by_block, n_picked, names, n_blocks,
  };
  GString *svg = lp_lora_chart_svg (&chart);
  g_strfreev (g_steal_pointer (&labels));
  return svg;
}

static gboolean
lp_lora_spectrum_stage_consume (LpSink        *sink,
                                LpCheckpoint  *input,
                                GError       **error)
{
  LpLoraSpectrumStage *self = LP_LORA_SPECTRUM_STAGE (sink);
  g_autoptr (GPtrArray) modules = NULL;
  g_autoptr (GHashTable) block_index = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr (GArray) blocks = g_array_new (FALSE, TRUE, sizeof (Block));
  ModuleSpectrum *spectra;
  guint ladder[32], n_steps, max_rank = 0;
  gboolean ok = TRUE;

  g_array_set_clear_func (blocks, (GDestroyNotify) block_clear);
  if (!lp_lora_blas_reserve (LP_STAGE (self), error))
    return FALSE;

  /* the spectrum reads mlx-lm factors through their views, and a LyCORIS
   * module's whole update; a DoRA magnitude does not change it */
  modules = lp_lora_find_modules_full (input, self->down_pattern, self->up_pattern,
                                       LP_LORA_FIND_REQUIRE_MODULES, NULL, error);
  if (modules == NULL)
    return FALSE;

  spectra = compute_spectra (self, input, modules, error);
  if (spectra == NULL)
    return FALSE;

  guint n = modules->len;
  for (guint m = 0; m < n; m++)
    {
      g_autofree char *name = lp_lora_block_name (lp_lora_module_get_name (spectra[m].module));
      gpointer found;
      Block *block;

      max_rank = MAX (max_rank, spectra[m].r);
      if (g_hash_table_lookup_extended (block_index, name, NULL, &found))
        spectra[m].block = GPOINTER_TO_UINT (found);
      else
        {
          Block fresh = { g_strdup (name), 0, G_MAXUINT, 0, 0, NULL };
          spectra[m].block = blocks->len;
          g_array_append_val (blocks, fresh);
          g_hash_table_insert (block_index, g_steal_pointer (&name), GUINT_TO_POINTER (spectra[m].block));
        }
      block = &g_array_index (blocks, Block, spectra[m].block);
      block->n_modules++;
      block->min_rank = MIN (block->min_rank, spectra[m].r);
      block->max_rank = MAX (block->max_rank, spectra[m].r);
      block->total += spectra[m].total;
    }

  n_steps = lp_lora_rank_ladder (max_rank, ladder);
  g_autofree Step *steps = g_new0 (Step, n_steps);
  g_autofree double *block_kept = g_new (double, blocks->len);
  double total = 0;

  for (guint m = 0; m < n; m++)
    total += spectra[m].total;
  for (guint b = 0; b < blocks->len; b++)
    g_array_index (blocks, Block, b).error = g_new (double, n_steps);

  for (guint s = 0; s < n_steps; s++)
    {
      Step *step = &steps[s];
      double kept = 0, sum_error = 0;

      step->rank = ladder[s];
      step->max_error = -1;
      memset (block_kept, 0, blocks->len * sizeof (double));
      for (guint m = 0; m < n; m++)
        {
          double k = kept_at (&spectra[m], step->rank);
          double e = error_from (k, spectra[m].total);

          kept += k;
          block_kept[spectra[m].block] += k;
          sum_error += e;
          if (e > step->max_error)
            {
              step->max_error = e;
              step->worst = m;
            }
          step->n_bytes += spectra[m].bytes_per_rank * MIN (step->rank, spectra[m].r);
        }
      step->energy = total > 0 ? MIN (kept / total, 1.0) : 1;
      step->error = error_from (kept, total);
      step->mean_error = sum_error / n;
      for (guint b = 0; b < blocks->len; b++)
        {
          Block *block = &g_array_index (blocks, Block, b);
          block->error[s] = error_from (block_kept[b], block->total);
        }
    }

  if (!self->quiet)
    print_tables (input, spectra, n, steps, n_steps, (Block *) blocks->data, blocks->len);

  if (self->report != NULL)
    {
      g_autoptr (GString) json = report_json (spectra, n, steps, n_steps,
                                              (Block *) blocks->data, blocks->len);
      ok = lp_lora_report_write (self->report, json, error);
    }
  if (ok && self->svg != NULL)
    {
      g_autoptr (GString) svg = report_svg (input, steps, n_steps, (Block *) blocks->data, blocks->len);
      ok = lp_lora_report_write (self->svg, svg, error);
    }

  for (guint m = 0; m < n; m++)
    g_free (spectra[m].sigma);
  g_free (spectra);
  return ok;
}

static void
lp_lora_spectrum_stage_set_property (GObject      *object,
                                     guint         prop_id,
                                     const GValue *value,
                                     GParamSpec   *pspec)
{
  LpLoraSpectrumStage *self = LP_LORA_SPECTRUM_STAGE (object);

  switch (prop_id)
    {
    case PROP_REPORT:
      g_free (self->report);
      self->report = g_value_dup_string (value);
      break;
    case PROP_SVG:
      g_free (self->svg);
      self->svg = g_value_dup_string (value);
      break;
    case PROP_QUIET: self->quiet = g_value_get_boolean (value); break;
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
lp_lora_spectrum_stage_get_property (GObject    *object,
                                     guint       prop_id,
                                     GValue     *value,
                                     GParamSpec *pspec)
{
  LpLoraSpectrumStage *self = LP_LORA_SPECTRUM_STAGE (object);

  switch (prop_id)
    {
    case PROP_REPORT: g_value_set_string (value, self->report); break;
    case PROP_SVG: g_value_set_string (value, self->svg); break;
    case PROP_QUIET: g_value_set_boolean (value, self->quiet); break;
    case PROP_DOWN_PATTERN: g_value_set_string (value, self->down_pattern); break;
    case PROP_UP_PATTERN: g_value_set_string (value, self->up_pattern); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_spectrum_stage_finalize (GObject *object)
{
  LpLoraSpectrumStage *self = LP_LORA_SPECTRUM_STAGE (object);

  g_free (self->report);
  g_free (self->svg);
  g_free (self->down_pattern);
  g_free (self->up_pattern);
  G_OBJECT_CLASS (lp_lora_spectrum_stage_parent_class)->finalize (object);
}

static void
lp_lora_spectrum_stage_class_init (LpLoraSpectrumStageClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpSinkClass *sink_class = LP_SINK_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_lora_spectrum_stage_set_property;
  object_class->get_property = lp_lora_spectrum_stage_get_property;
  object_class->finalize = lp_lora_spectrum_stage_finalize;
  sink_class->consume = lp_lora_spectrum_stage_consume;

  properties[PROP_REPORT] =
    g_param_spec_string ("report", "Report",
                         "Write every singular value and the tables as JSON to this file",
                         NULL, flags);
  properties[PROP_SVG] =
    g_param_spec_string ("svg", "SVG chart",
                         "Draw the error against rank, and per block along the network, as an SVG file",
                         NULL, flags);
  properties[PROP_QUIET] =
    g_param_spec_boolean ("quiet", "Quiet", "Print no table", FALSE, flags);
  properties[PROP_DOWN_PATTERN] = lp_lora_pattern_pspec (FALSE);
  properties[PROP_UP_PATTERN] = lp_lora_pattern_pspec (TRUE);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "lora-spectrum", "LoRA",
                               "Show the error and energy kept at ranks 1, 2, 4, ... for the file and each block, "
                               "without reducing");
  lp_stage_class_set_property_file (stage_class, "report");
  lp_stage_class_set_property_file (stage_class, "svg");
}

static void
lp_lora_spectrum_stage_init (LpLoraSpectrumStage *self)
{
}
