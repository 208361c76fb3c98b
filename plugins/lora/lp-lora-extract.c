/* lp-lora-extract.c: the `lora-extract` stage, a LoRA from the difference of
 * two models
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-dense.h"
#include "lp-lora-pair.h"
#include "lp-lora-report.h"
#include "lp-lora-blas.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraExtract:
 *
 * Takes a base model (first input) and a tuned model (second input) and
 * writes, for every 2-D weight (and 4-D conv weight, flattened to
 * `[out, in·kh·kw]`) whose bytes differ, the best rank-k approximation of
 * the difference `D = tuned − base` as LoRA factors, in the naming of
 * #LpLoraExtract:format. The factors carry the whole update (alpha = rank,
 * scale 1), split as √σ into both.
 *
 * The default method is a randomized SVD (a Gaussian sketch of k +
 * `oversample` columns, `niter` power iterations, seeded per tensor name, so
 * the output is the same on any thread count); `method=exact` takes the
 * exact SVD from the Gram matrix of the smaller side in f64. Either way D is
 * read a block of rows at a time and never formed whole. The dynamic
 * criteria of lora-svd (`energy`, `sv-ratio`, `sv-fro`, `sv-cumulative`,
 * with `max-rank` and `min-rank`) choose each weight's rank from its exact
 * spectrum (so they need `method=exact`, and the spectrum is computed once to
 * plan and once to write).
 *
 * Unchanged weights, 1-D tensors and names outside `include`/`exclude` are
 * skipped and counted in one message; tensors that exist in only one model,
 * or differ in shape, are errors naming them, and so are NaN and infinities.
 */
typedef enum {
  LP_LORA_EXTRACT_FORMAT_PEFT,
  LP_LORA_EXTRACT_FORMAT_DIFFUSERS,
  LP_LORA_EXTRACT_FORMAT_KOHYA,
} LpLoraExtractFormat;

struct _LpLoraExtract
{
  LpAggregator parent_instance;

  guint rank;
  LpLoraSvdMethod method;
  guint niter;
  guint oversample;
  guint64 seed;
  LpLoraExtractFormat format;
  char *prefix;
  GStrv include;
  GStrv exclude;
  double energy;
  double sv_ratio;
  double sv_fro;
  double sv_cumulative;
  guint max_rank;
  guint min_rank;
  /* set by the user (their defaults mean something): prepare refuses the
   * ones that would have no effect */
  gboolean rank_set;
  gboolean niter_set;
  gboolean oversample_set;
  gboolean seed_set;
};

enum {
  PROP_0,
  PROP_RANK,
  PROP_METHOD,
  PROP_NITER,
  PROP_OVERSAMPLE,
  PROP_SEED,
  PROP_FORMAT,
  PROP_PREFIX,
  PROP_INCLUDE,
  PROP_EXCLUDE,
  PROP_ENERGY,
  PROP_SV_RATIO,
  PROP_SV_FRO,
  PROP_SV_CUMULATIVE,
  PROP_MAX_RANK,
  PROP_MIN_RANK,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraExtract, lp_lora_extract, LP_TYPE_AGGREGATOR)

GType lp_lora_extract_format_get_type (void);
G_DEFINE_ENUM_TYPE (LpLoraExtractFormat, lp_lora_extract_format,
  G_DEFINE_ENUM_VALUE (LP_LORA_EXTRACT_FORMAT_PEFT, "peft"),
  G_DEFINE_ENUM_VALUE (LP_LORA_EXTRACT_FORMAT_DIFFUSERS, "diffusers"),
  G_DEFINE_ENUM_VALUE (LP_LORA_EXTRACT_FORMAT_KOHYA, "kohya"))

static const char *const default_prefix[] = {
  [LP_LORA_EXTRACT_FORMAT_PEFT] = "base_model.model.",
  [LP_LORA_EXTRACT_FORMAT_DIFFUSERS] = "",
  [LP_LORA_EXTRACT_FORMAT_KOHYA] = "lora_unet_",
};

static gboolean
is_dynamic (LpLoraExtract *self)
{
  return self->energy > 0 || self->sv_ratio > 0 || self->sv_fro > 0 || self->sv_cumulative > 0;
}

/* ---- one weight ------------------------------------------------------------- */

typedef struct {
  LpTensor *base;
  LpTensor *tuned;
  char *module;          /* the LoRA module's name, as the format writes it */
  guint64 out, in;
  guint k;
  LpDtype dtype;         /* of the factors: the tuned weight's */
  LpLoraSvdMethod method;
  guint niter, oversample;
  guint64 seed;
  LpLoraStats *stats;
} Job;

static void
job_free (gpointer data)
{
  Job *job = data;

  g_clear_object (&job->base);
  g_clear_object (&job->tuned);
  g_free (job->module);
  g_clear_pointer (&job->stats, lp_lora_stats_unref);
  g_free (job);
}

/* The stored bytes of both weights, as a difference. */
static gboolean
job_load (Job               *job,
          LpLoraDifference  *d,
          GBytes           **data,
          GError           **error)
{
  data[0] = lp_tensor_dup_data (job->base, error);
  data[1] = data[0] ? lp_tensor_dup_data (job->tuned, error) : NULL;
  if (data[1] == NULL)
    {
      g_clear_pointer (&data[0], g_bytes_unref);
      return FALSE;
    }
  d->base = g_bytes_get_data (data[0], NULL);
  d->tuned = g_bytes_get_data (data[1], NULL);
  d->base_dtype = lp_tensor_get_dtype (job->base);
  d->tuned_dtype = lp_tensor_get_dtype (job->tuned);
  d->out = job->out;
  d->in = job->in;
  return TRUE;
}

static LpLoraDenseSvd *
job_svd (Job                    *job,
         const LpLoraDifference *d,
         guint                   l,
         GError                **error)
{
  LpLoraRng rng;

  if (job->method == LP_LORA_SVD_METHOD_EXACT)
    return lp_lora_difference_svd (d, error);
  lp_lora_rng_init (&rng, job->seed, lp_tensor_get_name (job->tuned));
  return lp_lora_difference_randomized (d, l, job->niter, &rng, error);
}

static gboolean
job_compute (gpointer   user_data,
             GBytes   **down,
             GBytes   **up,
             GError   **error)
{
  Job *job = user_data;
  LpLoraDifference d = { 0, };
  GBytes *data[2];
  g_autoptr (LpLoraDenseSvd) svd = NULL;
  gsize overflow = 0;
  double kept = 0;

  if (!job_load (job, &d, data, error))
    return FALSE;
  svd = job_svd (job, &d, job->k + job->oversample, error);
  gsize bits = lp_dtype_get_bits (job->dtype) / 8;
  g_autofree float *b = svd ? lp_try_alloc (job->out * job->k, sizeof (float), "the up factor", error) : NULL;
  g_autofree float *a = b ? lp_try_alloc (job->k * job->in, sizeof (float), "the down factor", error) : NULL;
  g_autofree guint8 *b_out = a ? lp_try_alloc (job->out * job->k, bits, "the up factor", error) : NULL;
  g_autofree guint8 *a_out = b_out ? lp_try_alloc (job->k * job->in, bits, "the down factor", error) : NULL;

  if (a_out == NULL)
    g_clear_pointer (&svd, lp_lora_dense_svd_free);
  if (svd != NULL)
    {
      lp_lora_dense_svd_factors (svd, &d, job->k, b, a);
      overflow += lp_dtype_from_f32 (job->dtype, b, b_out, job->out * job->k);
      overflow += lp_dtype_from_f32 (job->dtype, a, a_out, job->k * job->in);
      *up = g_bytes_new_take (g_steal_pointer (&b_out), job->out * job->k * bits);
      *down = g_bytes_new_take (g_steal_pointer (&a_out), job->k * job->in * bits);
      for (guint j = 0; j < MIN (job->k, svd->n); j++)
        kept += svd->sigma[j] * svd->sigma[j];
      lp_lora_stats_record (job->stats, job->module, MIN (kept, svd->total), svd->total);
    }
  g_bytes_unref (data[0]);
  g_bytes_unref (data[1]);

  if (svd != NULL && overflow > 0)
    {
      g_clear_pointer (up, g_bytes_unref);
      g_clear_pointer (down, g_bytes_unref);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "%" G_GSIZE_FORMAT " factor values overflow %s", overflow,
                   lp_dtype_to_string (job->dtype));
    }
  if (svd == NULL || overflow > 0)
    g_prefix_error (error, "tensor %s: ", lp_tensor_get_name (job->tuned));
  return svd != NULL && overflow == 0;
}

/* ---- planning ------------------------------------------------------------------ */

static guint
dynamic_rank (LpLoraExtract        *self,
              const LpLoraDenseSvd *svd,
              guint64               full)
{
  guint k;

  if (self->energy > 0)
    k = lp_lora_rank_for_energy (svd->sigma, svd->n, self->energy);
  else if (self->sv_ratio > 0)
    k = lp_lora_rank_sv_ratio (svd->sigma, svd->n, full, self->sv_ratio);
  else if (self->sv_fro > 0)
    k = lp_lora_rank_sv_fro (svd->sigma, svd->n, full, self->sv_fro);
  else
    k = lp_lora_rank_sv_cumulative (svd->sigma, svd->n, full, self->sv_cumulative);
  if (self->max_rank > 0)
    k = MIN (k, self->max_rank);
  return MAX (k, MAX (self->min_rank, 1));
}

typedef struct {
  LpLoraExtract *self;
  GPtrArray *jobs;
} PlanWork;

static gboolean
plan_task (guint     i,
           gpointer  user_data,
           GError  **error)
{
  PlanWork *work = user_data;
  Job *job = g_ptr_array_index (work->jobs, i);
  LpLoraDifference d = { 0, };
  GBytes *bytes[2];

  if (!job_load (job, &d, bytes, error))
    return FALSE;
  g_autoptr (LpLoraDenseSvd) svd = lp_lora_difference_svd (&d, error);
  if (svd != NULL)
    job->k = dynamic_rank (work->self, svd, MIN (job->out, job->in));
  else
    g_prefix_error (error, "tensor %s: ", lp_tensor_get_name (job->tuned));
  g_bytes_unref (bytes[0]);
  g_bytes_unref (bytes[1]);
  return svd != NULL;
}

/* Every job's rank from its spectrum, on the stage's threads. */
static gboolean
plan_ranks (LpLoraExtract  *self,
            GPtrArray      *jobs,
            GError        **error)
{
  PlanWork work = { self, jobs };

  return lp_stage_parallel_for (LP_STAGE (self), jobs->len, plan_task, &work, error);
}

/* ---- the output ------------------------------------------------------------------ */

static char *
module_name (LpLoraExtract *self,
             const char    *tensor)
{
  const char *prefix = self->prefix != NULL ? self->prefix : default_prefix[self->format];
  g_autofree char *stem = g_str_has_suffix (tensor, ".weight")
    ? g_strndup (tensor, strlen (tensor) - strlen (".weight")) : g_strdup (tensor);

  /* kohya names are the module path with every '.' an '_' (networks/lora.py,
   * LoRANetwork.create_modules: lora_name.replace(".", "_")) */
  if (self->format == LP_LORA_EXTRACT_FORMAT_KOHYA)
    g_strdelimit (stem, ".", '_');
  return g_strconcat (prefix, stem, NULL);
}

static const char *
down_suffix (LpLoraExtractFormat format)
{
  return format == LP_LORA_EXTRACT_FORMAT_KOHYA ? ".lora_down.weight" : ".lora_A.weight";
}

static const char *
up_suffix (LpLoraExtractFormat format)
{
  return format == LP_LORA_EXTRACT_FORMAT_KOHYA ? ".lora_up.weight" : ".lora_B.weight";
}

/* PEFT's adapter_config.json for the extracted modules: alpha = r (scale 1),
 * every module named in full in target_modules (PEFT's
 * check_target_module_exists matches a name or a '.'-suffix of it), and the
 * ranks that differ from `r` in rank_pattern and alpha_pattern under
 * `^`-anchored keys, so that each matches its own module only. */
static char *
peft_config (GPtrArray *jobs,
             guint      common_rank)
{
  g_autoptr (GString) json = g_string_new ("{\n  \"peft_type\": \"LORA\",\n");
  gboolean first;

  g_string_append_printf (json, "  \"r\": %u,\n  \"lora_alpha\": %u,\n", common_rank, common_rank);
  g_string_append (json, "  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n"
                         "  \"use_rslora\": false,\n  \"fan_in_fan_out\": false,\n"
                         "  \"base_model_name_or_path\": null,\n  \"task_type\": null,\n"
                         "  \"target_modules\": [");
  for (guint i = 0; i < jobs->len; i++)
    {
      Job *job = g_ptr_array_index (jobs, i);
      g_string_append (json, i ? ", " : "");
      lp_lora_json_string (json, job->module + strlen ("base_model.model."));
    }
  for (guint pattern = 0; pattern < 2; pattern++)
    {
      g_string_append (json, pattern == 0 ? "],\n  \"rank_pattern\": {" : "},\n  \"alpha_pattern\": {");
      first = TRUE;
      for (guint i = 0; i < jobs->len; i++)
        {
          Job *job = g_ptr_array_index (jobs, i);
          if (job->k == common_rank)
            continue;
          g_autofree char *key = lp_lora_peft_pattern_key (job->module + strlen ("base_model.model."));
          g_string_append (json, first ? "" : ", ");
          lp_lora_json_string (json, key);
          g_string_append_printf (json, ": %u", job->k);
          first = FALSE;
        }
    }
  g_string_append (json, "}\n}\n");
  return g_string_free (g_steal_pointer (&json), FALSE);
}

static guint
most_common_rank (GPtrArray *jobs)
{
  g_autoptr (GHashTable) counts = g_hash_table_new (NULL, NULL);
  guint best = 0, best_count = 0;

  for (guint i = 0; i < jobs->len; i++)
    {
      Job *job = g_ptr_array_index (jobs, i);
      guint count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (job->k))) + 1;
      g_hash_table_insert (counts, GUINT_TO_POINTER (job->k), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best_count = count;
          best = job->k;
        }
    }
  return best;
}

static gboolean
add_factors (LpLoraExtract *self,
             LpCheckpoint  *output,
             Job           *job,
             GError       **error)
{
  LpTensor *tuned = job->tuned;
  guint n_dims = lp_tensor_get_n_dims (tuned);
  const guint64 *shape = lp_tensor_get_shape (tuned, NULL);
  guint64 down_shape[4] = { job->k, shape[1], n_dims == 4 ? shape[2] : 0, n_dims == 4 ? shape[3] : 0 };
  guint64 up_shape[4] = { shape[0], job->k, 1, 1 };
  g_autofree char *down_name = g_strconcat (job->module, down_suffix (self->format), NULL);
  g_autofree char *up_name = g_strconcat (job->module, up_suffix (self->format), NULL);
  LpLoraPairSpec down_spec = { down_name, job->dtype, down_shape, n_dims };
  LpLoraPairSpec up_spec = { up_name, job->dtype, up_shape, n_dims };
  g_autoptr (LpTensor) down = NULL;
  g_autoptr (LpTensor) up = NULL;

  /* the pair owns the job from here */
  if (!lp_lora_pair_new (&down_spec, &up_spec, job_compute, job, job_free, &down, &up, error))
    return FALSE;
  if (!lp_checkpoint_add_tensor (output, down, error)
      || !lp_checkpoint_add_tensor (output, up, error))
    return FALSE;

  if (self->format == LP_LORA_EXTRACT_FORMAT_KOHYA)
    {
      /* alpha = rank: scale 1. f32 holds any rank exactly (bf16 does not
       * hold 257). */
      g_autofree char *alpha_name = g_strconcat (job->module, ".alpha", NULL);
      float value = job->k;
      g_autoptr (LpTensor) alpha = lp_tensor_new_from_f32 (alpha_name, LP_DTYPE_F32, NULL, 0,
                                                            &value, 1, error);
      if (alpha == NULL || !lp_checkpoint_add_tensor (output, alpha, error))
        return FALSE;
    }
  return TRUE;
}

static gboolean
same_bytes (LpTensor  *a,
            LpTensor  *b,
            gboolean  *same,
            GError   **error)
{
  g_autoptr (GBytes) x = NULL;
  g_autoptr (GBytes) y = NULL;

  *same = FALSE;
  if (lp_tensor_get_dtype (a) != lp_tensor_get_dtype (b))
    return TRUE;
  x = lp_tensor_dup_data (a, error);
  y = x ? lp_tensor_dup_data (b, error) : NULL;
  if (y == NULL)
    return FALSE;
  *same = g_bytes_equal (x, y);
  return TRUE;
}

static LpCheckpoint *
lp_lora_extract_aggregate (LpAggregator  *aggregator,
                           LpCheckpoint **inputs,
                           guint          n_inputs,
                           GError       **error)
{
  LpLoraExtract *self = LP_LORA_EXTRACT (aggregator);
  LpCheckpoint *base = inputs[0], *tuned = inputs[1];
  g_autoptr (LpNameFilter) filter = lp_name_filter_new ((const char * const *) self->include,
                                                        (const char * const *) self->exclude);
  g_autoptr (GPtrArray) jobs = g_ptr_array_new_with_free_func (job_free);
  g_autoptr (GHashTable) modules = g_hash_table_new (g_str_hash, g_str_equal);   /* names taken */
  g_autoptr (LpLoraStats) stats = lp_lora_stats_new (self->method == LP_LORA_SVD_METHOD_EXACT
                                                     ? "svd" : "randomized-svd");
  g_autoptr (GPtrArray) dropped = g_ptr_array_new ();
  guint n_unchanged = 0, n_excluded = 0;

  if (!lp_lora_blas_reserve (LP_STAGE (self), error))
    return NULL;

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (base); i++)
    {
      const char *name = lp_tensor_get_name (lp_checkpoint_get_tensor (base, i));
      if (lp_checkpoint_lookup (tuned, name) == NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor %s is in the base model (first input) but not in the tuned one",
                       name);
          return NULL;
        }
    }

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (tuned); i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (tuned, i);
      const char *name = lp_tensor_get_name (t);
      LpTensor *b = lp_checkpoint_lookup (base, name);
      guint n_dims = lp_tensor_get_n_dims (t);
      gboolean same;

      if (b == NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor %s is in the tuned model (second input) but not in the base", name);
          return NULL;
        }
      if (n_dims != lp_tensor_get_n_dims (b)
          || memcmp (lp_tensor_get_shape (t, NULL), lp_tensor_get_shape (b, NULL),
                     n_dims * sizeof (guint64)) != 0)
        {
          g_autofree char *ts = lp_tensor_describe_shape (t);
          g_autofree char *bs = lp_tensor_describe_shape (b);
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor %s has shape %s in the tuned model but %s in the base", name, ts, bs);
          return NULL;
        }
      if (!lp_name_filter_matches (filter, name))
        {
          n_excluded++;
          continue;
        }
      if (!same_bytes (b, t, &same, error))
        return NULL;
      if (same)
        {
          n_unchanged++;
          continue;
        }
      if ((n_dims != 2 && n_dims != 4)
          || !lp_dtype_is_float (lp_tensor_get_dtype (t)) || !lp_dtype_can_convert (lp_tensor_get_dtype (t))
          || !lp_dtype_is_float (lp_tensor_get_dtype (b)) || !lp_dtype_can_convert (lp_tensor_get_dtype (b)))
        {
          g_ptr_array_add (dropped, (gpointer) name);
          continue;
        }

      Job *job = g_new0 (Job, 1);
      job->base = g_object_ref (b);
      job->tuned = g_object_ref (t);
      job->module = module_name (self, name);
      job->out = lp_tensor_get_dim (t, 0);
      job->in = lp_tensor_get_n_elements (t) / MAX (job->out, 1);
      job->dtype = lp_tensor_get_dtype (t);
      job->method = self->method;
      job->niter = self->niter;
      job->oversample = self->oversample;
      job->seed = self->seed;
      job->k = MIN (self->rank, MIN (job->out, job->in));
      job->stats = lp_lora_stats_ref (stats);
      g_ptr_array_add (jobs, job);
      if (!g_hash_table_add (modules, job->module))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor %s: its LoRA module name %s is taken by another tensor",
                       name, job->module);
          return NULL;
        }
    }

  if (jobs->len == 0)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "nothing to extract: of %u tensors, %u are unchanged, %u excluded and %u "
                   "not 2-D or 4-D float weights",
                   lp_checkpoint_get_n_tensors (tuned), n_unchanged, n_excluded, dropped->len);
      return NULL;
    }
  if (is_dynamic (self) && !plan_ranks (self, jobs, error))
    return NULL;
  if (!is_dynamic (self))
    {
      guint n_small = 0;
      guint64 smallest = G_MAXUINT64, largest = 0;

      for (guint i = 0; i < jobs->len; i++)
        {
          Job *job = g_ptr_array_index (jobs, i);

          if (job->k == self->rank)
            continue;
          n_small++;
          smallest = MIN (smallest, job->k);
          largest = MAX (largest, job->k);
        }
      if (n_small > 0)
        {
          g_autofree char *where = lp_stage_describe (LP_STAGE (self));
          g_autofree char *kept = largest > smallest
            ? g_strdup_printf ("%" G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT, smallest, largest)
            : g_strdup_printf ("%" G_GUINT64_FORMAT, smallest);

          g_warning ("%s: %u of %u weights have a side shorter than rank=%u: extracted at their "
                     "full rank (%s), which no rank can exceed", where, n_small, jobs->len,
                     self->rank, kept);
        }
    }

  /* what the metadata and the config say, while the jobs are ours */
  g_autoptr (LpCheckpoint) output = lp_checkpoint_new ();
  guint common = most_common_rank (jobs);
  g_autofree char *rank_text = g_strdup_printf ("%u", common);
  g_autofree char *config = NULL;
  guint n_modules = jobs->len;
  gboolean uniform = TRUE;

  for (guint i = 0; i < jobs->len; i++)
    uniform = uniform && ((Job *) g_ptr_array_index (jobs, i))->k == common;
  if (self->format == LP_LORA_EXTRACT_FORMAT_KOHYA)
    {
      /* as kohya's networks/extract_lora_from_models.py writes them */
      lp_checkpoint_set_metadata (output, "ss_network_module", "networks.lora");
      lp_checkpoint_set_metadata (output, "ss_network_dim", uniform ? rank_text : "Dynamic");
      lp_checkpoint_set_metadata (output, "ss_network_alpha", uniform ? rank_text : "Dynamic");
    }
  else if (self->format == LP_LORA_EXTRACT_FORMAT_PEFT)
    config = peft_config (jobs, common);

  /* each pair of factors owns its job from here */
  while (jobs->len > 0)
    if (!add_factors (self, output, g_ptr_array_steal_index (jobs, 0), error))
      return NULL;
  if (config != NULL)
    lp_checkpoint_set_adapter_config (output, config);
  lp_checkpoint_set_metadata (output, "format", "pt");

  g_message ("lora-extract: %u weights extracted (rank %s%s); %u unchanged, %u excluded",
             n_modules, uniform ? "" : "by weight, most often ", rank_text, n_unchanged, n_excluded);
  if (dropped->len > 0)
    g_warning ("lora-extract: %u changed tensors are not 2-D or 4-D float weights and have no LoRA "
               "form; they are left out (the first: %s)", dropped->len,
               (const char *) g_ptr_array_index (dropped, 0));

  lp_lora_stats_attach (stats, output);
  return g_steal_pointer (&output);
}

/* ---- properties ------------------------------------------------------------------ */

static gboolean
lp_lora_extract_prepare (LpStage  *stage,
                         GError  **error)
{
  LpLoraExtract *self = LP_LORA_EXTRACT (stage);
  guint n_criteria = (self->energy > 0) + (self->sv_ratio > 0) + (self->sv_fro > 0)
                     + (self->sv_cumulative > 0);

  if (n_criteria > 1)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "set one of energy, sv-ratio, sv-fro and sv-cumulative");
      return FALSE;
    }
  if (n_criteria == 1 && self->method != LP_LORA_SVD_METHOD_EXACT)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "choosing the rank from the spectrum (energy, sv-*) needs method=exact");
      return FALSE;
    }
  if (n_criteria == 0 && (self->max_rank > 0 || self->min_rank > 0))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "max-rank and min-rank bound a rank chosen by energy or sv-*; "
                           "for one rank everywhere, set rank");
      return FALSE;
    }
  if (self->max_rank > 0 && self->min_rank > self->max_rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "min-rank %u is above max-rank %u", self->min_rank, self->max_rank);
      return FALSE;
    }
  /* options that would change nothing: refused rather than ignored */
  if (n_criteria == 1 && self->rank_set)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "rank=%u would have no effect: energy and sv-* choose each weight's rank; "
                   "bound it with max-rank=%u instead", self->rank, self->rank);
      return FALSE;
    }
  if (self->method == LP_LORA_SVD_METHOD_EXACT
      && !lp_lora_check_exact_options (self->niter_set, self->oversample_set, self->seed_set, error))
    return FALSE;
  return TRUE;
}

static void
lp_lora_extract_set_property (GObject      *object,
                              guint         prop_id,
                              const GValue *value,
                              GParamSpec   *pspec)
{
  LpLoraExtract *self = LP_LORA_EXTRACT (object);

  switch (prop_id)
    {
    case PROP_RANK: self->rank = g_value_get_uint (value); self->rank_set = TRUE; break;
    case PROP_METHOD: self->method = g_value_get_enum (value); break;
    case PROP_NITER: self->niter = g_value_get_uint (value); self->niter_set = TRUE; break;
    case PROP_OVERSAMPLE: self->oversample = g_value_get_uint (value); self->oversample_set = TRUE; break;
    case PROP_SEED: self->seed = g_value_get_uint64 (value); self->seed_set = TRUE; break;
    case PROP_FORMAT: self->format = g_value_get_enum (value); break;
    case PROP_PREFIX:
      g_free (self->prefix);
      self->prefix = g_value_dup_string (value);
      break;
    case PROP_INCLUDE:
      g_strfreev (self->include);
      self->include = g_value_dup_boxed (value);
      break;
    case PROP_EXCLUDE:
      g_strfreev (self->exclude);
      self->exclude = g_value_dup_boxed (value);
      break;
    case PROP_ENERGY: self->energy = g_value_get_double (value); break;
    case PROP_SV_RATIO: self->sv_ratio = g_value_get_double (value); break;
    case PROP_SV_FRO: self->sv_fro = g_value_get_double (value); break;
    case PROP_SV_CUMULATIVE: self->sv_cumulative = g_value_get_double (value); break;
    case PROP_MAX_RANK: self->max_rank = g_value_get_uint (value); break;
    case PROP_MIN_RANK: self->min_rank = g_value_get_uint (value); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_extract_get_property (GObject    *object,
                              guint       prop_id,
                              GValue     *value,
                              GParamSpec *pspec)
{
  LpLoraExtract *self = LP_LORA_EXTRACT (object);

  switch (prop_id)
    {
    case PROP_RANK: g_value_set_uint (value, self->rank); break;
    case PROP_METHOD: g_value_set_enum (value, self->method); break;
    case PROP_NITER: g_value_set_uint (value, self->niter); break;
    case PROP_OVERSAMPLE: g_value_set_uint (value, self->oversample); break;
    case PROP_SEED: g_value_set_uint64 (value, self->seed); break;
    case PROP_FORMAT: g_value_set_enum (value, self->format); break;
    case PROP_PREFIX: g_value_set_string (value, self->prefix); break;
    case PROP_INCLUDE: g_value_set_boxed (value, self->include); break;
    case PROP_EXCLUDE: g_value_set_boxed (value, self->exclude); break;
    case PROP_ENERGY: g_value_set_double (value, self->energy); break;
    case PROP_SV_RATIO: g_value_set_double (value, self->sv_ratio); break;
    case PROP_SV_FRO: g_value_set_double (value, self->sv_fro); break;
    case PROP_SV_CUMULATIVE: g_value_set_double (value, self->sv_cumulative); break;
    case PROP_MAX_RANK: g_value_set_uint (value, self->max_rank); break;
    case PROP_MIN_RANK: g_value_set_uint (value, self->min_rank); break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_extract_finalize (GObject *object)
{
  LpLoraExtract *self = LP_LORA_EXTRACT (object);

  g_free (self->prefix);
  g_strfreev (self->include);
  g_strfreev (self->exclude);
  G_OBJECT_CLASS (lp_lora_extract_parent_class)->finalize (object);
}

static void
lp_lora_extract_class_init (LpLoraExtractClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpAggregatorClass *aggregator_class = LP_AGGREGATOR_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_lora_extract_set_property;
  object_class->get_property = lp_lora_extract_get_property;
  object_class->finalize = lp_lora_extract_finalize;
  stage_class->prepare = lp_lora_extract_prepare;
  aggregator_class->aggregate = lp_lora_extract_aggregate;

  properties[PROP_RANK] =
    g_param_spec_uint ("rank", "Rank", "The rank of every extracted module (capped at the weight's smaller side)",
                       1, 65536, 16, flags);
  properties[PROP_METHOD] =
    g_param_spec_enum ("method", "Method",
                       "randomized: a range finder with power iterations; exact: the exact SVD",
                       LP_TYPE_LORA_SVD_METHOD, LP_LORA_SVD_METHOD_RANDOMIZED, flags);
  properties[PROP_NITER] =
    g_param_spec_uint ("niter", "Power iterations", "Power iterations of the randomized method",
                       0, 64, 2, flags);
  properties[PROP_OVERSAMPLE] =
    g_param_spec_uint ("oversample", "Oversampling", "Extra directions the randomized method samples",
                       0, 1024, 8, flags);
  properties[PROP_SEED] =
    g_param_spec_uint64 ("seed", "Seed", "Seed of the randomized method (drawn per tensor name)",
                         0, G_MAXUINT64, 0, flags);
  properties[PROP_FORMAT] =
    g_param_spec_enum ("format", "Format",
                       "peft (with adapter_config.json), diffusers (lora_A/lora_B) or kohya (lora_down/lora_up/alpha)",
                       lp_lora_extract_format_get_type (), LP_LORA_EXTRACT_FORMAT_PEFT, flags);
  properties[PROP_PREFIX] =
    g_param_spec_string ("prefix", "Prefix",
                         "Put before every module name (default: base_model.model. for peft, none for "
                         "diffusers, lora_unet_ for kohya)",
                         NULL, flags);
  properties[PROP_INCLUDE] =
    g_param_spec_boxed ("include", "Include", "Extract only weights matching one of these globs (default: all)",
                        G_TYPE_STRV, flags);
  properties[PROP_EXCLUDE] =
    g_param_spec_boxed ("exclude", "Exclude", "Skip weights matching one of these globs",
                        G_TYPE_STRV, flags);
  properties[PROP_ENERGY] =
    g_param_spec_double ("energy", "Energy", "Per weight, the smallest rank keeping this fraction of Σσ² (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_SV_RATIO] =
    g_param_spec_double ("sv-ratio", "σ ratio", "kohya sv_ratio: keep σ ≥ σ₁ / this (0: unset)",
                         0.0, G_MAXDOUBLE, 0.0, flags);
  properties[PROP_SV_FRO] =
    g_param_spec_double ("sv-fro", "Frobenius kept", "kohya sv_fro: keep this fraction of the Frobenius norm (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_SV_CUMULATIVE] =
    g_param_spec_double ("sv-cumulative", "Cumulative σ", "kohya sv_cumulative: keep this fraction of Σσ (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_MAX_RANK] =
    g_param_spec_uint ("max-rank", "Maximum rank", "With a dynamic criterion, never above this (0: unset)",
                       0, 65536, 0, flags);
  properties[PROP_MIN_RANK] =
    g_param_spec_uint ("min-rank", "Minimum rank", "With a dynamic criterion, never below this (0: unset)",
                       0, 65536, 0, flags);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_n_inputs (stage_class, 2, 2);
  lp_stage_class_set_metadata (stage_class, "lora-extract", "LoRA",
                               "Extract a LoRA from a base model (first input) and a tuned one (second): "
                               "the best rank-k approximation of each changed weight");
}

static void
lp_lora_extract_init (LpLoraExtract *self)
{
  self->rank = 16;
  self->method = LP_LORA_SVD_METHOD_RANDOMIZED;
  self->niter = 2;
  self->oversample = 8;
}
