/* lp-lora-svd.c: the `lora-svd` stage, best rank-k approximation of each module
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-stages.h"
#include "lp-lora-common.h"
#include "lp-lora-math.h"
#include "lp-lora-lycoris.h"
#include "lp-lora-blas.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraSvd:
 *
 * Replaces each LoRA module's factors by the best approximation of its update
 * `scale · B @ A` at a lower rank (Eckart–Young), without ever forming the
 * out × in update: the SVD is taken of a small r × r core built from the
 * factors' Gram matrices. The rank is fixed (`rank`), chosen per module
 * (`energy`, `sv-ratio`, `sv-fro`, `sv-cumulative`, bounded by `min-rank` and
 * `max-rank`), or spread over the modules to meet a size (`budget`).
 *
 * The singular values are split as √σ into both factors. A kohya module's
 * `alpha / r` is folded into the factors and its `.alpha` becomes the new
 * rank; a PEFT adapter config gets the new ranks and alphas that keep each
 * module's scale. Factors are written in their input dtype; other tensors pass
 * through untouched.
 */
struct _LpLoraSvd
{
  LpTransform parent_instance;

  guint rank;
  LpLoraSvdMethod method;
  guint niter;
  guint oversample;
  guint64 seed;
  double energy;
  double sv_ratio;
  double sv_fro;
  double sv_cumulative;
  guint64 budget;
  guint max_rank;
  guint min_rank;
  gboolean pad;
  gboolean per_module_alpha;
  LpLoraDoraPolicy dora;
  LpLoraComputeDtype compute_dtype;
  char *down_pattern;
  char *up_pattern;
  LpLoraStats *last_stats;   /* what the last run kept, for `result` */
  /* which of the properties with a default that means something were set,
   * so that prepare can refuse those that would have no effect */
  gboolean min_rank_set;
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
  PROP_ENERGY,
  PROP_SV_RATIO,
  PROP_SV_FRO,
  PROP_SV_CUMULATIVE,
  PROP_BUDGET,
  PROP_MAX_RANK,
  PROP_MIN_RANK,
  PROP_PAD,
  PROP_PER_MODULE_ALPHA,
  PROP_COMPUTE_DTYPE,
  PROP_DOWN_PATTERN,
  PROP_UP_PATTERN,
  PROP_DORA,
  PROP_RESULT,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraSvd, lp_lora_svd, LP_TYPE_TRANSFORM)

G_DEFINE_ENUM_TYPE (LpLoraSvdMethod, lp_lora_svd_method,
  G_DEFINE_ENUM_VALUE (LP_LORA_SVD_METHOD_EXACT, "exact"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SVD_METHOD_RANDOMIZED, "randomized"))

G_DEFINE_ENUM_TYPE (LpLoraComputeDtype, lp_lora_compute_dtype,
  G_DEFINE_ENUM_VALUE (LP_LORA_COMPUTE_DTYPE_F64, "f64"),
  G_DEFINE_ENUM_VALUE (LP_LORA_COMPUTE_DTYPE_F32, "f32"),
  G_DEFINE_ENUM_VALUE (LP_LORA_COMPUTE_DTYPE_AUTO, "auto"))

/* Whether @module's products are summed in f32 (see LpLoraComputeDtype). */
static gboolean
module_uses_f32 (LpLoraComputeDtype  compute_dtype,
                 LpLoraModule       *module)
{
  if (compute_dtype != LP_LORA_COMPUTE_DTYPE_AUTO)
    return compute_dtype == LP_LORA_COMPUTE_DTYPE_F32;
  return lp_dtype_get_bits (lp_tensor_get_dtype (lp_lora_module_get_down (module))) <= 16 &&
         lp_dtype_get_bits (lp_tensor_get_dtype (lp_lora_module_get_up (module))) <= 16;
}

/* ---- one module's computation, shared by its two lazy factors ----------- */

typedef struct {
  gint ref_count;
  GMutex lock;
  LpLoraModule *module;
  guint k;              /* singular directions kept */
  guint k_out;          /* rank written: k, or the padding target */
  gboolean copy;        /* k ≥ r: the factors themselves, folded and padded */
  double fold;
  LpLoraSvdMethod method;
  LpLoraComputeDtype compute_dtype;
  guint niter;
  guint oversample;
  guint64 seed;
  LpLoraSpectrum *spectrum;   /* known already when the rank was chosen from it */
  LpLoraStats *stats;
  GBytes *held[2];            /* computed, not yet handed out: down, up */
} Job;

typedef struct {
  Job *job;
  gboolean up;
} FactorRef;

static Job *
job_ref (Job *job)
{
  g_atomic_int_inc (&job->ref_count);
  return job;
}

static void
job_unref (Job *job)
{
  if (!g_atomic_int_dec_and_test (&job->ref_count))
    return;
  g_clear_pointer (&job->held[0], g_bytes_unref);
  g_clear_pointer (&job->held[1], g_bytes_unref);
  g_clear_pointer (&job->spectrum, lp_lora_spectrum_free);
  g_clear_pointer (&job->stats, lp_lora_stats_unref);
  g_clear_object (&job->module);
  g_mutex_clear (&job->lock);
  g_free (job);
}

static void
factor_ref_free (gpointer data)
{
  FactorRef *ref = data;
  job_unref (ref->job);
  g_free (ref);
}

/* The module's factors as f64, B [out, r] and A [r, in·kh·kw]. */
static gboolean
load_factors (LpLoraModule  *module,
              LpLoraFactors *f,
              GError       **error)
{
  LpTensor *down = lp_lora_module_get_down (module);
  LpTensor *up = lp_lora_module_get_up (module);

  f->f32 = FALSE;
  f->r = lp_lora_module_get_rank (module);
  f->in = lp_lora_module_get_in_features (module);
  f->out = lp_lora_module_get_out_features (module);
  f->a = lp_tensor_dup_f64 (down, NULL, error);
  if (f->a == NULL)
    return FALSE;
  f->b = lp_tensor_dup_f64 (up, NULL, error);
  if (f->b == NULL)
    {
      g_clear_pointer ((gpointer *) &f->a, g_free);
      return FALSE;
    }
  return TRUE;
}

static void
free_factors (LpLoraFactors *f)
{
  g_clear_pointer ((gpointer *) &f->a, g_free);
  g_clear_pointer ((gpointer *) &f->b, g_free);
}

/* The module's factors as stored (mapped pages, usually): the math converts
 * them a block at a time. @data[0] and @data[1] hold down's and up's bytes. */
static gboolean
load_stored (LpLoraModule        *module,
             LpLoraComputeDtype   compute_dtype,
             LpLoraFactors       *f,
             GBytes             **data,
             GError             **error)
{
  LpTensor *down = lp_lora_module_get_down (module);
  LpTensor *up = lp_lora_module_get_up (module);

  f->f32 = module_uses_f32 (compute_dtype, module);
  f->f64_fallback = compute_dtype == LP_LORA_COMPUTE_DTYPE_AUTO;
  f->stored = TRUE;
  f->r = lp_lora_module_get_rank (module);
  f->in = lp_lora_module_get_in_features (module);
  f->out = lp_lora_module_get_out_features (module);
  f->a_dtype = lp_tensor_get_dtype (down);
  f->b_dtype = lp_tensor_get_dtype (up);
  data[0] = lp_tensor_dup_data (down, error);
  data[1] = data[0] ? lp_tensor_dup_data (up, error) : NULL;
  if (data[1] == NULL)
    {
      g_clear_pointer (&data[0], g_bytes_unref);
      return FALSE;
    }
  f->a = g_bytes_get_data (data[0], NULL);
  f->b = g_bytes_get_data (data[1], NULL);
  return TRUE;
}

/* k ≥ r: B·√|fold| and A·√|fold| (the sign on B), padded with zeros. */
static gboolean
job_copy (Job *job, LpLoraFactors *f, double *b_new, double *a_new, GError **error)
{
  const double *b = f->b, *a = f->a;
  guint r = f->r, k = job->k_out;
  double root = sqrt (fabs (job->fold));
  double sign = job->fold < 0 ? -1.0 : 1.0;

  if (!lp_lora_all_finite_f64 (b, f->out * r) || !lp_lora_all_finite_f64 (a, r * f->in))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "NaN or infinity in the %s factor",
                   lp_lora_all_finite_f64 (a, r * f->in) ? "up" : "down");
      return FALSE;
    }
  memset (b_new, 0, sizeof (double) * f->out * k);
  memset (a_new, 0, sizeof (double) * k * f->in);
  for (guint64 i = 0; i < f->out; i++)
    for (guint j = 0; j < r; j++)
      b_new[i * k + j] = sign * root * b[i * r + j];
  for (gsize i = 0; i < (gsize) r * f->in; i++)
    a_new[i] = root * a[i];
  return TRUE;
}

/* k ≥ r: the factors folded and padded, through f64. */
static gboolean
job_compute_copy (Job     *job,
                  GError **error)
{
  LpLoraModule *module = job->module;
  LpLoraFactors f = { 0, };

  if (!load_factors (module, &f, error))
    return FALSE;

  g_autofree double *b_new = lp_try_alloc (f.out * job->k_out, sizeof (double), "the up factor", error);
  g_autofree double *a_new = b_new ? lp_try_alloc (job->k_out * f.in, sizeof (double), "the down factor", error) : NULL;
  gboolean ok = a_new != NULL && job_copy (job, &f, b_new, a_new, error);

  if (ok)
    {
      LpDtype a_dtype = lp_tensor_get_dtype (lp_lora_module_get_down (module));
      LpDtype b_dtype = lp_tensor_get_dtype (lp_lora_module_get_up (module));
      gsize overflow_a = 0, overflow_b = 0;
      g_autoptr(GBytes) a_bytes = lp_lora_try_bytes_from_f64 (a_dtype, a_new, job->k_out * f.in, &overflow_a,
                                                              "the down factor", error);
      g_autoptr(GBytes) b_bytes = a_bytes ? lp_lora_try_bytes_from_f64 (b_dtype, b_new, f.out * job->k_out,
                                                                        &overflow_b, "the up factor", error) : NULL;

      ok = b_bytes != NULL &&
           lp_lora_check_overflow (overflow_a, a_dtype, error) &&
           lp_lora_check_overflow (overflow_b, b_dtype, error);
      if (ok)
        {
          g_clear_pointer (&job->held[0], g_bytes_unref);
          g_clear_pointer (&job->held[1], g_bytes_unref);
          job->held[0] = g_steal_pointer (&a_bytes);
          job->held[1] = g_steal_pointer (&b_bytes);
          lp_lora_stats_record (job->stats, lp_lora_module_get_name (module), 1, 1);   /* nothing discarded */
        }
    }
  if (!ok)
    lp_lora_prefix_error (error, module);

  free_factors (&f);
  return ok;
}

static gboolean
job_compute (Job     *job,
             GError **error)
{
  LpLoraModule *module = job->module;
  LpLoraFactors f = { 0, };
  GBytes *data[2] = { NULL, NULL };
  g_autoptr (LpLoraSpectrum) own = NULL;
  const LpLoraSpectrum *spectrum = job->spectrum;
  double kept = 0;

  if (job->copy)
    return job_compute_copy (job, error);

  if (!load_stored (module, job->compute_dtype, &f, data, error))
    return FALSE;

  if (spectrum == NULL && job->method == LP_LORA_SVD_METHOD_RANDOMIZED)
    {
      LpLoraRng rng;
      lp_lora_rng_init (&rng, job->seed, lp_lora_module_get_name (module));
      spectrum = own = lp_lora_randomized_spectrum (&f, job->k, job->oversample,
                                                    job->niter, &rng, error);
    }
  else if (spectrum == NULL)
    spectrum = own = lp_lora_spectrum_compute (&f, job->k, TRUE, error);

  if (spectrum != NULL)
    {
      /* written straight in the factors' dtypes, block by block */
      gsize a_size = job->k_out * f.in * (lp_dtype_get_bits (f.a_dtype) / 8);
      gsize b_size = f.out * job->k_out * (lp_dtype_get_bits (f.b_dtype) / 8);
      gpointer a_new = lp_try_alloc (a_size, 1, "the down factor", error);
      gpointer b_new = a_new ? lp_try_alloc (b_size, 1, "the up factor", error) : NULL;

      if (b_new == NULL)
        {
          g_free (a_new);
          lp_lora_prefix_error (error, module);
          g_bytes_unref (data[0]);
          g_bytes_unref (data[1]);
          return FALSE;
        }

      gsize overflow = lp_lora_spectrum_apply_to (spectrum, &f, job->k, job->k_out, job->fold,
                                                  f.b_dtype, b_new, f.a_dtype, a_new);

      /* one count for both factors: name the narrower dtype */
      LpDtype narrow = lp_dtype_get_bits (f.b_dtype) <= lp_dtype_get_bits (f.a_dtype) ? f.b_dtype : f.a_dtype;

      if (!lp_lora_check_overflow (overflow, narrow, error))
        {
          g_free (a_new);
          g_free (b_new);
          lp_lora_prefix_error (error, module);
          g_bytes_unref (data[0]);
          g_bytes_unref (data[1]);
          return FALSE;
        }
      for (guint i = 0; i < MIN (job->k, spectrum->r); i++)
        kept += spectrum->sigma[i] * spectrum->sigma[i];
      g_clear_pointer (&job->held[0], g_bytes_unref);
      g_clear_pointer (&job->held[1], g_bytes_unref);
      job->held[0] = g_bytes_new_take (a_new, a_size);
      job->held[1] = g_bytes_new_take (b_new, b_size);
      lp_lora_stats_record (job->stats, lp_lora_module_get_name (module), kept, spectrum->total);
    }
  else
    lp_lora_prefix_error (error, module);

  g_bytes_unref (data[0]);
  g_bytes_unref (data[1]);
  return spectrum != NULL;
}

/* Both factors come from one computation: whichever is asked for first
 * computes both and keeps the other until it is asked for too. */
static GBytes *
factor_data (LpTensor  *tensor,
             gpointer   user_data,
             GError   **error)
{
  FactorRef *ref = user_data;
  Job *job = ref->job;
  GBytes *result = NULL;

  g_mutex_lock (&job->lock);
  if (job->held[ref->up] != NULL || job_compute (job, error))
    result = g_steal_pointer (&job->held[ref->up]);
  g_mutex_unlock (&job->lock);
  return result;
}

/* ---- rank selection ----------------------------------------------------- */

typedef struct {
  LpLoraSvd *self;
  GPtrArray *modules;
  GHashTable *skip;     /* LyCORIS modules, whose rank is chosen already */
  LpLoraSpectrum **spectra;
} SpectraWork;

static gboolean
spectrum_task (guint     i,
               gpointer  user_data,
               GError  **error)
{
  SpectraWork *work = user_data;
  LpLoraModule *module = g_ptr_array_index (work->modules, i);
  LpLoraFactors f = { 0, };
  GBytes *bytes[2];

  if (g_hash_table_contains (work->skip, lp_lora_module_get_name (module)))
    return TRUE;
  if (load_stored (module, work->self->compute_dtype, &f, bytes, error))
    {
      work->spectra[i] = lp_lora_spectrum_compute (&f, 0, TRUE, error);
      g_bytes_unref (bytes[0]);
      g_bytes_unref (bytes[1]);
    }
  if (work->spectra[i] != NULL)
    return TRUE;
  lp_lora_prefix_error (error, module);
  return FALSE;
}

/* Every module's spectrum, on the stage's threads. */
static LpLoraSpectrum **
compute_spectra (LpLoraSvd  *self,
                 GPtrArray  *modules,
                 GHashTable *skip,
                 GError    **error)
{
  guint n = modules->len;
  SpectraWork work = { self, modules, skip, g_new0 (LpLoraSpectrum *, n) };

  if (!lp_stage_parallel_for (LP_STAGE (self), n, spectrum_task, &work, error))
    {
      for (guint i = 0; i < n; i++)
        lp_lora_spectrum_free (work.spectra[i]);
      g_free (work.spectra);
      return NULL;
    }
  return work.spectra;
}

static gboolean
is_dynamic (LpLoraSvd *self)
{
  return self->energy > 0 || self->sv_ratio > 0 || self->sv_fro > 0 || self->sv_cumulative > 0;
}

/* The rank the dynamic criterion picks from @r singular values (descending;
 * zeros at the end are fine), within max-rank and min-rank. */
static guint
choose_rank (LpLoraSvd    *self,
             const double *sigma,
             guint         r,
             guint64       full)
{
  guint k;

  if (self->energy > 0)
    k = lp_lora_rank_for_energy (sigma, r, self->energy);
  else if (self->sv_ratio > 0)
    k = lp_lora_rank_sv_ratio (sigma, r, full, self->sv_ratio);
  else if (self->sv_fro > 0)
    k = lp_lora_rank_sv_fro (sigma, r, full, self->sv_fro);
  else
    k = lp_lora_rank_sv_cumulative (sigma, r, full, self->sv_cumulative);

  if (self->max_rank > 0)
    k = MIN (k, self->max_rank);
  return MAX (k, self->min_rank);
}

static guint
dynamic_rank (LpLoraSvd            *self,
              LpLoraModule         *module,
              const LpLoraSpectrum *s)
{
  return choose_rank (self, s->sigma, s->r, MIN (lp_lora_module_get_in_features (module),
                                                 lp_lora_module_get_out_features (module)));
}

/* The same for a LyCORIS module, from its update's whole spectrum. */
static guint
lycoris_rank (const double *sigma,
              guint         n,
              guint64       full,
              gpointer      user_data)
{
  return choose_rank (user_data, sigma, n, full);
}

typedef struct {
  double value;
  guint module;
  guint index;
} Candidate;

static int
candidate_compare (gconstpointer a, gconstpointer b)
{
  const Candidate *x = a, *y = b;
  if (x->value != y->value)
    return x->value > y->value ? -1 : 1;
  if (x->module != y->module)
    return x->module < y->module ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index;
}

/* Greedy: every module starts at min-rank; then ranks go, one at a time, to
 * the module whose next singular value (of the scaled update) is largest, as
 * long as the output stays within the budget. */
static gboolean
budget_ranks (LpLoraSvd       *self,
              LpCheckpoint    *input,
              GPtrArray       *modules,
              LpLoraSpectrum **spectra,
              guint           *ranks,
              GError         **error)
{
  guint n = modules->len;
  guint64 size = lp_checkpoint_get_n_bytes (input);
  g_autofree guint64 *unit = g_new (guint64, n);
  g_autoptr (GArray) candidates = g_array_new (FALSE, FALSE, sizeof (Candidate));

  for (guint m = 0; m < n; m++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, m);
      LpTensor *down = lp_lora_module_get_down (module), *up = lp_lora_module_get_up (module);
      guint r = lp_lora_module_get_rank (module);
      guint cap = MIN (r, self->max_rank > 0 ? self->max_rank : r);
      double scale = fabs (lp_lora_module_get_scale (module));

      unit[m] = (lp_lora_module_get_in_features (module) * lp_dtype_get_bits (lp_tensor_get_dtype (down))
                 + lp_lora_module_get_out_features (module) * lp_dtype_get_bits (lp_tensor_get_dtype (up))) / 8;
      size -= lp_tensor_get_n_bytes (down) + lp_tensor_get_n_bytes (up);
      ranks[m] = MIN (self->min_rank, r);
      size += unit[m] * ranks[m];
      for (guint i = ranks[m]; i < cap; i++)
        {
          Candidate c = { scale * spectra[m]->sigma[i], m, i };
          g_array_append_val (candidates, c);
        }
    }

  if (size > self->budget)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "a budget of %" G_GUINT64_FORMAT " bytes is below the %" G_GUINT64_FORMAT
                   " bytes of the output at min-rank %u", self->budget, size, self->min_rank);
      return FALSE;
    }

  g_array_sort (candidates, candidate_compare);
  for (guint c = 0; c < candidates->len; c++)
    {
      Candidate *cand = &g_array_index (candidates, Candidate, c);
      if (cand->index != ranks[cand->module] || size + unit[cand->module] > self->budget)
        continue;
      ranks[cand->module]++;
      size += unit[cand->module];
    }
  return TRUE;
}

/* ---- the transform ------------------------------------------------------ */

/* The rank a module is written at (see the loop in the transform). */
static guint
written_rank (LpLoraSvd    *self,
              LpLoraModule *module,
              guint         rank)
{
  guint k = MIN (rank, lp_lora_module_get_rank (module));
  guint target = self->rank > 0 ? self->rank : self->max_rank;

  return self->pad ? MAX (target, k) : k;
}

/* One alpha for every kohya module with an `.alpha`, or 0 when they already
 * share one: the most common rank written (ties: the first reached). With
 * alpha = each module's own rank, diffusers' kohya conversion
 * (_convert_non_diffusers_lora_to_diffusers, then get_peft_kwargs) turns the
 * differing alphas into alpha_pattern keys that miss the attention modules;
 * one alpha becomes LoraConfig.lora_alpha and every module gets
 * lora_alpha / its rank, as kohya and ComfyUI read it. */
static guint
shared_kohya_alpha (LpLoraSvd  *self,
                    GPtrArray  *modules,
                    const guint *ranks)
{
  g_autoptr(GHashTable) counts = g_hash_table_new (NULL, NULL);
  guint best = 0, best_count = 0, n_alphas = 0;
  gboolean differ = FALSE;
  double first_alpha = 0;

  for (guint m = 0; m < modules->len; m++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, m);
      guint k_out, count;
      double alpha;

      if (lp_lora_module_get_alpha (module) == NULL)
        continue;
      k_out = written_rank (self, module, ranks[m]);
      /* a module that keeps its rank keeps its alpha unless it differs */
      alpha = k_out == lp_lora_module_get_rank (module) && ranks[m] >= k_out
              ? lp_lora_module_get_alpha_value (module) : k_out;
      if (n_alphas++ == 0)
        first_alpha = alpha;
      differ |= alpha != first_alpha;
      count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (k_out))) + 1;
      g_hash_table_insert (counts, GUINT_TO_POINTER (k_out), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best = k_out;
          best_count = count;
        }
    }
  return differ ? best : 0;
}

static LpTensor *
new_factor (LpLoraModule *module,
            gboolean      up,
            guint         k_out,
            Job          *job,
            GError      **error)
{
  guint64 shape[LP_TENSOR_MAX_DIMS];
  guint n_dims;
  LpTensor *factor = up ? lp_lora_module_get_up (module) : lp_lora_module_get_down (module);
  FactorRef *ref = g_new (FactorRef, 1);
  LpTensor *tensor;

  ref->job = job_ref (job);
  ref->up = up;

  lp_lora_module_new_factor_shape (module, up, k_out, shape, &n_dims);
  tensor = lp_tensor_new_lazy (lp_tensor_get_name (factor), lp_tensor_get_dtype (factor),
                               shape, n_dims, factor_data, ref, factor_ref_free, error);
  /* Both factors come out of one SVD: one worker should compute them. */
  if (tensor)
    lp_tensor_set_compute_group (tensor, job);
  return tensor;
}

static LpCheckpoint *
lp_lora_svd_transform (LpTransform   *transform,
                       LpCheckpoint  *input,
                       GError       **error)
{
  LpLoraSvd *self = LP_LORA_SVD (transform);
  g_autoptr (GPtrArray) modules = NULL;
  g_autoptr (LpLoraStats) stats = NULL;
  LpLoraSpectrum **spectra = NULL;
  LpCheckpoint *output = NULL;
  g_autoptr (LpCheckpoint) plain = NULL;
  g_autoptr (GHashTable) lycoris = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);

  if (!lp_lora_blas_reserve (LP_STAGE (self), error))
    return NULL;

  stats = lp_lora_stats_new (self->method == LP_LORA_SVD_METHOD_EXACT ? "svd" : "randomized-svd");

  /* LyCORIS LoHa and LoKr modules become plain LoRAs of the rank first (exactly,
   * see lp-lora-lycoris.c); the modules written pass through below. */
  g_autoptr (GPtrArray) found = lp_lora_find_modules_full (input, self->down_pattern, self->up_pattern,
                                                           LP_LORA_FIND_NONE, NULL, error);
  if (found == NULL)
    return NULL;
  if (lp_lora_lycoris_count (found) > 0)
    {
      if (self->budget > 0 || self->method != LP_LORA_SVD_METHOD_EXACT)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "LyCORIS LoHa and LoKr modules are reduced exactly, to a rank set "
                       "(rank) or chosen per module (energy, sv-*); budget and "
                       "method=randomized are for plain LoRAs");
          return NULL;
        }
      plain = lp_lora_lycoris_reduce (input, found, self->rank > 0 ? self->rank : self->max_rank,
                                      is_dynamic (self) ? lycoris_rank : NULL, self, self->pad,
                                      self->dora == LP_LORA_DORA_KEEP_MAGNITUDE, stats, lycoris, error);
      if (plain == NULL)
        return NULL;
      input = plain;
    }
  guint shared_alpha;

  /* mlx-lm modules are written back in their layout by lp_lora_assemble () */
  modules = lp_lora_find_modules_full (input, self->down_pattern, self->up_pattern,
                                       LP_LORA_FIND_REQUIRE_MODULES | LP_LORA_FIND_PLAIN, NULL, error);
  if (modules == NULL || !lp_lora_apply_dora_policy (LP_STAGE (self), self->dora, modules, error))
    return NULL;

  guint n = modules->len;
  g_autofree guint *ranks = g_new0 (guint, n);       /* k per module */
  g_autofree guint *new_ranks = g_new0 (guint, n);   /* rank written */
  LpTensor **new_down = g_new0 (LpTensor *, n);
  LpTensor **new_up = g_new0 (LpTensor *, n);
  LpTensor **new_alpha = g_new0 (LpTensor *, n);

  if (is_dynamic (self) || self->budget > 0)
    {
      spectra = compute_spectra (self, modules, lycoris, error);
      if (spectra == NULL)
        goto out;
      if (self->budget > 0)
        {
          if (!budget_ranks (self, input, modules, spectra, ranks, error))
            goto out;
        }
      else
        for (guint m = 0; m < n; m++)
          {
            LpLoraModule *module = g_ptr_array_index (modules, m);

            /* a converted LyCORIS module has the rank chosen for it */
            ranks[m] = spectra[m] != NULL ? dynamic_rank (self, module, spectra[m])
                                          : lp_lora_module_get_rank (module);
          }
    }
  else
    for (guint m = 0; m < n; m++)
      ranks[m] = self->rank;

  shared_alpha = self->per_module_alpha ? 0 : shared_kohya_alpha (self, modules, ranks);
  if (self->rank > 0 && !self->pad)
    {
      g_autofree char *hint = g_strdup_printf ("pad=true pads them to rank %u", self->rank);
      lp_lora_warn_rank_kept (LP_STAGE (self), modules, self->rank, hint);
    }

  for (guint m = 0; m < n; m++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, m);
      guint r = lp_lora_module_get_rank (module);
      guint k = MIN (ranks[m], r);
      guint k_out = written_rank (self, module, ranks[m]);
      gboolean shared = lp_lora_module_get_alpha (module) != NULL && shared_alpha > 0;
      guint alpha_out = shared ? shared_alpha : k_out;

      new_ranks[m] = k_out;
      if (k_out == r && k == r
          && (!shared || lp_lora_module_get_alpha_value (module) == alpha_out))
        {
          /* nothing to reduce or pad: the module passes through unchanged
           * (a LyCORIS module's record comes when its factors are computed) */
          if (!g_hash_table_contains (lycoris, lp_lora_module_get_name (module)))
            lp_lora_stats_record (stats, lp_lora_module_get_name (module), 1, 1);
          continue;
        }

      Job *job = g_new0 (Job, 1);
      job->ref_count = 1;
      g_mutex_init (&job->lock);
      job->module = g_object_ref (module);
      job->k = k;
      job->k_out = k_out;
      job->copy = k == r;
      /* written with alpha_out, the scale is alpha_out / k_out: the rest
       * of the module's scale goes into the factors */
      job->fold = lp_lora_module_get_fold_scale (module) * (shared ? (double) k_out / alpha_out : 1.0);
      job->method = self->method;
      job->compute_dtype = self->compute_dtype;
      job->niter = self->niter;
      job->oversample = self->oversample;
      job->seed = self->seed;
      job->stats = lp_lora_stats_ref (stats);
      if (spectra)
        job->spectrum = g_steal_pointer (&spectra[m]);

      new_down[m] = new_factor (module, FALSE, k_out, job, error);
      new_up[m] = new_down[m] ? new_factor (module, TRUE, k_out, job, error) : NULL;
      job_unref (job);
      if (new_up[m] == NULL)
        goto out;
      new_alpha[m] = lp_lora_module_new_alpha (module, alpha_out);
    }

  output = lp_lora_assemble (input, modules, new_down, new_up, new_alpha, new_ranks, error);
  if (output && g_hash_table_size (lycoris) == 0)
    {
      g_autofree guint *old_ranks = g_new (guint, n);
      for (guint m = 0; m < n; m++)
        old_ranks[m] = lp_lora_module_get_rank (g_ptr_array_index (modules, m));
      lp_lora_stats_set_ranks (stats, n, old_ranks, new_ranks);
    }
  if (output)
    {
      lp_lora_stats_attach (stats, output);
      g_clear_pointer (&self->last_stats, lp_lora_stats_unref);
      self->last_stats = lp_lora_stats_ref (stats);
    }

out:
  for (guint m = 0; m < n; m++)
    {
      g_clear_object (&new_down[m]);
      g_clear_object (&new_up[m]);
      g_clear_object (&new_alpha[m]);
      if (spectra)
        lp_lora_spectrum_free (spectra[m]);
    }
  g_free (new_down);
  g_free (new_up);
  g_free (new_alpha);
  g_free (spectra);
  return output;
}

static gboolean
lp_lora_svd_prepare (LpStage  *stage,
                     GError  **error)
{
  LpLoraSvd *self = LP_LORA_SVD (stage);
  guint n_criteria = (self->rank > 0) + (self->energy > 0) + (self->sv_ratio > 0)
                   + (self->sv_fro > 0) + (self->sv_cumulative > 0) + (self->budget > 0);

  if (n_criteria != 1)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "set exactly one of rank, energy, sv-ratio, sv-fro, sv-cumulative "
                   "and budget (%u are set)", n_criteria);
      return FALSE;
    }
  if (self->rank == 0 && self->method != LP_LORA_SVD_METHOD_EXACT)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "choosing the rank from the spectrum (energy, sv-*, budget) needs method=exact");
      return FALSE;
    }
  if (self->max_rank > 0 && self->min_rank > self->max_rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "min-rank %u is above max-rank %u", self->min_rank, self->max_rank);
      return FALSE;
    }
  if (self->pad && self->rank == 0 && (self->budget > 0 || self->max_rank == 0))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "pad needs a rank to pad to: set rank, or max-rank with a dynamic criterion");
      return FALSE;
    }
  /* options that would change nothing: refused rather than ignored */
  if (self->rank > 0 && (self->min_rank_set || self->max_rank > 0))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "rank=%u fixes every module's rank, so %s would have no effect; min-rank "
                   "and max-rank bound a rank chosen by energy, sv-ratio, sv-fro, sv-cumulative "
                   "or budget", self->rank,
                   self->min_rank_set && self->max_rank > 0 ? "min-rank and max-rank"
                   : self->min_rank_set ? "min-rank" : "max-rank");
      return FALSE;
    }
  if (self->method == LP_LORA_SVD_METHOD_EXACT
      && !lp_lora_check_exact_options (self->niter_set, self->oversample_set, self->seed_set, error))
    return FALSE;
  return TRUE;
}

static void
lp_lora_svd_set_property (GObject      *object,
                          guint         prop_id,
                          const GValue *value,
                          GParamSpec   *pspec)
{
  LpLoraSvd *self = LP_LORA_SVD (object);

  switch (prop_id)
    {
    case PROP_RANK: self->rank = g_value_get_uint (value); break;
    case PROP_METHOD: self->method = g_value_get_enum (value); break;
    case PROP_NITER: self->niter = g_value_get_uint (value); self->niter_set = TRUE; break;
    case PROP_OVERSAMPLE: self->oversample = g_value_get_uint (value); self->oversample_set = TRUE; break;
    case PROP_SEED: self->seed = g_value_get_uint64 (value); self->seed_set = TRUE; break;
    case PROP_ENERGY: self->energy = g_value_get_double (value); break;
    case PROP_SV_RATIO: self->sv_ratio = g_value_get_double (value); break;
    case PROP_SV_FRO: self->sv_fro = g_value_get_double (value); break;
    case PROP_SV_CUMULATIVE: self->sv_cumulative = g_value_get_double (value); break;
    case PROP_BUDGET: self->budget = g_value_get_uint64 (value); break;
    case PROP_MAX_RANK: self->max_rank = g_value_get_uint (value); break;
    case PROP_MIN_RANK: self->min_rank = g_value_get_uint (value); self->min_rank_set = TRUE; break;
    case PROP_PAD: self->pad = g_value_get_boolean (value); break;
    case PROP_PER_MODULE_ALPHA: self->per_module_alpha = g_value_get_boolean (value); break;
    case PROP_DORA: self->dora = g_value_get_enum (value); break;
    case PROP_COMPUTE_DTYPE: self->compute_dtype = g_value_get_enum (value); break;
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
lp_lora_svd_get_property (GObject    *object,
                          guint       prop_id,
                          GValue     *value,
                          GParamSpec *pspec)
{
  LpLoraSvd *self = LP_LORA_SVD (object);

  switch (prop_id)
    {
    case PROP_RANK: g_value_set_uint (value, self->rank); break;
    case PROP_METHOD: g_value_set_enum (value, self->method); break;
    case PROP_NITER: g_value_set_uint (value, self->niter); break;
    case PROP_OVERSAMPLE: g_value_set_uint (value, self->oversample); break;
    case PROP_SEED: g_value_set_uint64 (value, self->seed); break;
    case PROP_ENERGY: g_value_set_double (value, self->energy); break;
    case PROP_SV_RATIO: g_value_set_double (value, self->sv_ratio); break;
    case PROP_SV_FRO: g_value_set_double (value, self->sv_fro); break;
    case PROP_SV_CUMULATIVE: g_value_set_double (value, self->sv_cumulative); break;
    case PROP_BUDGET: g_value_set_uint64 (value, self->budget); break;
    case PROP_MAX_RANK: g_value_set_uint (value, self->max_rank); break;
    case PROP_MIN_RANK: g_value_set_uint (value, self->min_rank); break;
    case PROP_PAD: g_value_set_boolean (value, self->pad); break;
    case PROP_PER_MODULE_ALPHA: g_value_set_boolean (value, self->per_module_alpha); break;
    case PROP_DORA: g_value_set_enum (value, self->dora); break;
    case PROP_COMPUTE_DTYPE: g_value_set_enum (value, self->compute_dtype); break;
    case PROP_DOWN_PATTERN: g_value_set_string (value, self->down_pattern); break;
    case PROP_UP_PATTERN: g_value_set_string (value, self->up_pattern); break;
    case PROP_RESULT:
      g_value_take_string (value, self->last_stats ? lp_lora_stats_to_json (self->last_stats) : NULL);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_svd_finalize (GObject *object)
{
  LpLoraSvd *self = LP_LORA_SVD (object);

  g_free (self->down_pattern);
  g_free (self->up_pattern);
  g_clear_pointer (&self->last_stats, lp_lora_stats_unref);
  G_OBJECT_CLASS (lp_lora_svd_parent_class)->finalize (object);
}

static void
lp_lora_svd_class_init (LpLoraSvdClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);
  GParamFlags flags = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = lp_lora_svd_set_property;
  object_class->get_property = lp_lora_svd_get_property;
  object_class->finalize = lp_lora_svd_finalize;
  stage_class->prepare = lp_lora_svd_prepare;
  transform_class->transform = lp_lora_svd_transform;

  properties[PROP_RANK] =
    g_param_spec_uint ("rank", "Rank", "The rank of every module (0: chosen by another criterion)",
                       0, 65536, 0, flags);
  properties[PROP_METHOD] =
    g_param_spec_enum ("method", "Method", "exact (through the factors) or randomized (range finder)",
                       LP_TYPE_LORA_SVD_METHOD, LP_LORA_SVD_METHOD_EXACT, flags);
  properties[PROP_NITER] =
    g_param_spec_uint ("niter", "Power iterations", "Power iterations of the randomized method",
                       0, 100, 2, flags);
  properties[PROP_OVERSAMPLE] =
    g_param_spec_uint ("oversample", "Oversampling", "Extra sketch columns of the randomized method",
                       0, 1024, 8, flags);
  properties[PROP_SEED] =
    g_param_spec_uint64 ("seed", "Seed", "Seed of the randomized method (each module draws from (seed, name))",
                         0, G_MAXUINT64, 0, flags);
  properties[PROP_ENERGY] =
    g_param_spec_double ("energy", "Energy", "Per module, keep this fraction of the sum of squared singular values (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_SV_RATIO] =
    g_param_spec_double ("sv-ratio", "SV ratio", "kohya sv_ratio: keep singular values above sigma_1 / ratio (0: unset)",
                         0.0, G_MAXDOUBLE, 0.0, flags);
  properties[PROP_SV_FRO] =
    g_param_spec_double ("sv-fro", "SV Frobenius", "kohya sv_fro: keep this fraction of the Frobenius norm (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_SV_CUMULATIVE] =
    g_param_spec_double ("sv-cumulative", "SV cumulative", "kohya sv_cumulative: keep this fraction of the sum of singular values (0: unset)",
                         0.0, 1.0, 0.0, flags);
  properties[PROP_BUDGET] =
    g_param_spec_uint64 ("budget", "Budget", "Target size of the output in bytes, ranks given greedily to the largest singular values (0: unset)",
                         0, G_MAXUINT64, 0, flags);
  properties[PROP_MAX_RANK] =
    g_param_spec_uint ("max-rank", "Max rank", "Upper bound of a chosen rank (0: the module's rank)",
                       0, 65536, 0, flags);
  properties[PROP_MIN_RANK] =
    g_param_spec_uint ("min-rank", "Min rank", "Lower bound of a chosen rank",
                       1, 65536, 1, flags);
  properties[PROP_PAD] =
    g_param_spec_boolean ("pad", "Pad", "Zero-pad modules below the rank (or max-rank) up to it, so that every module has one rank",
                          FALSE, flags);
  properties[PROP_PER_MODULE_ALPHA] =
    g_param_spec_boolean ("per-module-alpha", "Per-module alpha",
                          "kohya modules of different ranks each get alpha = their rank; by default they share one alpha and the rest of the scale goes into the factors, as diffusers needs",
                          FALSE, flags);
  properties[PROP_COMPUTE_DTYPE] =
    g_param_spec_enum ("compute-dtype", "Compute dtype",
                       "Precision of the large products: f64, f32, or auto (f32 for factors stored in 16 bits, f64 for wider ones)",
                       LP_TYPE_LORA_COMPUTE_DTYPE, LP_LORA_COMPUTE_DTYPE_AUTO, flags);
  properties[PROP_DOWN_PATTERN] = lp_lora_pattern_pspec (FALSE);
  properties[PROP_UP_PATTERN] = lp_lora_pattern_pspec (TRUE);
  properties[PROP_DORA] = lp_lora_dora_pspec ();
  properties[PROP_RESULT] =
    g_param_spec_string ("result", "Result",
                         "After a run, per module the energy kept and the relative error, as JSON (read only)",
                         NULL, G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "lora-svd", "LoRA",
                               "Reduce the rank of every LoRA module to its best approximation (SVD)");
}

static void
lp_lora_svd_init (LpLoraSvd *self)
{
  self->method = LP_LORA_SVD_METHOD_EXACT;
  self->niter = 2;
  self->oversample = 8;
  self->min_rank = 1;
  self->compute_dtype = LP_LORA_COMPUTE_DTYPE_AUTO;
}
