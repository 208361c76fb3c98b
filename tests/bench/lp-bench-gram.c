/* lp-bench-gram.c: the machine's arithmetic peak, and the Gram kernels
 * measured against it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Usage: lp-bench-gram peak [THREADS]
 *        lp-bench-gram gram R [THREADS]
 *
 * `peak` prints the GFLOP/s of f32 multiply-adds (AVX-512, AVX2) and of
 * bf16 pair dot products (VDPBF16PS) that THREADS threads (default 2) reach
 * on chains of independent register operations, the most the arithmetic
 * units give; one line "NAME GFLOPS WALL_GFLOPS" each, for what the
 * machine runs: GFLOPS from each thread's own CPU time (what its core
 * gives while it runs, whoever else shares the machine), WALL_GFLOPS from
 * the wall time.
 *
 * `gram R` computes both Gram matrices (A Aᵀ and Bᵀ B, through the same
 * entry points lora-svd uses) of bf16 factors of rank R shaped like the
 * modules of a Flux.1-dev LoRA, a module per task on THREADS threads, and
 * prints "gram R GFLOPS WALL_GFLOPS CPU_SECONDS WALL_SECONDS", counting
 * (in + out)·R·(R + 1) flops per module: the upper triangles, which is
 * all that is computed. GFLOPS is THREADS times the rate per CPU second;
 * KERNELS is "bf16" (the bf16 dot product) or "f32" (the f32 kernels, on
 * machines or builds without it). Usage line: "gram R GFLOPS WALL_GFLOPS
 * CPU_SECONDS WALL_SECONDS KERNELS".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <glib.h>

#include "lp-lora-kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
# define LP_BENCH_X86 1
# include <immintrin.h>
#endif

/* Multiply-adds per chain step: 16 independent accumulators cover the
 * latency of any current FMA unit. */
#define CHAINS 16
#define STEPS (1u << 24)

static double
clock_seconds (clockid_t clock)
{
  struct timespec ts;
  clock_gettime (clock, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double
now (void)
{
  return clock_seconds (CLOCK_MONOTONIC);
}

/* CPU seconds of the calling thread: on a shared machine the wall time
 * counts other processes' turns, the thread's own time does not. */
static double
thread_cpu (void)
{
  return clock_seconds (CLOCK_THREAD_CPUTIME_ID);
}

typedef double (*PeakFunc) (void);

#ifdef LP_BENCH_X86
/* Each returns the flops it did; the results feed a sink so that the loop
 * is not removed. */
static volatile float sink;

__attribute__ ((target ("avx512f"))) static double
peak_f32_avx512 (void)
{
  __m512 acc[CHAINS], x = _mm512_set1_ps (1.0f), y = _mm512_set1_ps (1e-7f);
  for (int c = 0; c < CHAINS; c++)
    acc[c] = _mm512_set1_ps ((float) c);
  for (guint s = 0; s < STEPS; s++)
    {
#pragma GCC unroll 16
      for (int c = 0; c < CHAINS; c++)
        acc[c] = _mm512_fmadd_ps (x, y, acc[c]);
      __asm__ ("" : "+v" (x));
    }
  __m512 total = acc[0];
  for (int c = 1; c < CHAINS; c++)
    total = _mm512_add_ps (total, acc[c]);
  sink = _mm512_reduce_add_ps (total);
  return 2.0 * 16 * CHAINS * STEPS;
}

__attribute__ ((target ("avx2,fma"))) static double
peak_f32_avx2 (void)
{
  __m256 acc[CHAINS], x = _mm256_set1_ps (1.0f), y = _mm256_set1_ps (1e-7f);
  for (int c = 0; c < CHAINS; c++)
    acc[c] = _mm256_set1_ps ((float) c);
  for (guint s = 0; s < STEPS; s++)
    {
#pragma GCC unroll 16
      for (int c = 0; c < CHAINS; c++)
        acc[c] = _mm256_fmadd_ps (x, y, acc[c]);
      __asm__ ("" : "+x" (x));
    }
  __m256 total = acc[0];
  for (int c = 1; c < CHAINS; c++)
    total = _mm256_add_ps (total, acc[c]);
  float lanes[8];
  _mm256_storeu_ps (lanes, total);
  sink = lanes[0];
  return 2.0 * 8 * CHAINS * STEPS;
}

__attribute__ ((target ("avx512f,avx512bf16"))) static double
peak_bf16_dot (void)
{
  __m512 acc[CHAINS];
  __m512i x = _mm512_set1_epi32 (0x3f803f80);   /* bf16 pairs (1, 1) */
  for (int c = 0; c < CHAINS; c++)
    acc[c] = _mm512_set1_ps ((float) c);
  for (guint s = 0; s < STEPS; s++)
    {
#pragma GCC unroll 16
      for (int c = 0; c < CHAINS; c++)
        acc[c] = _mm512_dpbf16_ps (acc[c], (__m512bh) x, (__m512bh) x);
      __asm__ ("" : "+v" (x));
    }
  __m512 total = acc[0];
  for (int c = 1; c < CHAINS; c++)
    total = _mm512_add_ps (total, acc[c]);
  sink = _mm512_reduce_add_ps (total);
  return 2.0 * 32 * CHAINS * STEPS;   /* 32 products and 32 sums */
}
#endif

typedef struct {
  PeakFunc func;
  double flops;
  double cpu;
} PeakRun;

static gpointer
peak_thread (gpointer data)
{
  PeakRun *run = data;
  double start = thread_cpu ();
  run->flops = run->func ();
  run->cpu = thread_cpu () - start;
  return NULL;
}

/* GFLOP/s of @func on @threads threads at once, the best of 3 runs: by
 * the threads' own CPU time (what the cores give while they run it), and
 * in *@wall_rate by the wall time. */
static double
peak_rate (PeakFunc func,
           guint    threads,
           double  *wall_rate)
{
  double best = 0;

  *wall_rate = 0;
  for (int rep = 0; rep < 3; rep++)
    {
      g_autofree PeakRun *runs = g_new0 (PeakRun, threads);
      g_autofree GThread **ids = g_new (GThread *, threads);
      double start = now (), flops = 0, rate = 0;

      for (guint t = 0; t < threads; t++)
        {
          runs[t].func = func;
          ids[t] = g_thread_new ("peak", peak_thread, &runs[t]);
        }
      for (guint t = 0; t < threads; t++)
        {
          g_thread_join (ids[t]);
          flops += runs[t].flops;
          rate += runs[t].flops / runs[t].cpu / 1e9;
        }
      *wall_rate = MAX (*wall_rate, flops / (now () - start) / 1e9);
      best = MAX (best, rate);
    }
  return best;
}

static int
run_peak (guint threads)
{
#ifdef LP_BENCH_X86
  const struct {
    const char *name;
    gboolean supported;
    PeakFunc func;
  } peaks[] = {
    { "f32-fma-avx512", __builtin_cpu_supports ("avx512f"), peak_f32_avx512 },
    { "f32-fma-avx2", __builtin_cpu_supports ("fma"), peak_f32_avx2 },
    { "bf16-dot", __builtin_cpu_supports ("avx512bf16"), peak_bf16_dot },
  };
  for (guint i = 0; i < G_N_ELEMENTS (peaks); i++)
    if (peaks[i].supported)
      {
        double wall_rate, rate = peak_rate (peaks[i].func, threads, &wall_rate);
        printf ("%s %.1f %.1f\n", peaks[i].name, rate, wall_rate);
      }
#else
  g_printerr ("lp-bench-gram: no peak measurement for this architecture\n");
  return 77;
#endif
  return 0;
}

/* ---- the Gram kernels on Flux-shaped modules ---------------------------- */

/* (in, out) of the modules of one Flux.1-dev double block and one single
 * block, as lora-synth's flux-dev preset lays them out: 19 and 38 of them. */
static const guint flux_double[][2] = {
  { 3072, 3072 }, { 3072, 3072 }, { 3072, 3072 }, { 3072, 3072 },
  { 3072, 3072 }, { 3072, 3072 }, { 3072, 3072 }, { 3072, 3072 },
  { 3072, 12288 }, { 12288, 3072 }, { 3072, 12288 }, { 12288, 3072 },
  { 3072, 18432 }, { 3072, 18432 },
};
static const guint flux_single[][2] = {
  { 3072, 3072 }, { 3072, 3072 }, { 3072, 3072 },
  { 3072, 12288 }, { 15360, 3072 }, { 3072, 9216 },
};

typedef struct {
  guint r;
  gboolean blocked;   /* the kernels lora-svd picks at this rank */
  GArray *sizes;      /* (in, out) pairs, one per module */
  gint next;
  const guint16 *a, *b;   /* the largest module's factors, reused */
  const float *af, *bf;   /* the same as f32, where there is no bf16 dot product */
  double cpu;             /* the threads' CPU seconds, summed */
  GMutex lock;
} GramWork;

static gpointer
gram_thread (gpointer data)
{
  GramWork *work = data;
  guint r = work->r;
  g_autofree double *ga = g_new (double, (gsize) r * r);
  g_autofree double *gb = g_new (double, (gsize) r * r);
  gboolean blocked = work->blocked;
  g_autofree gpointer scratch = g_malloc (MAX (lp_lora_gram_blocked_scratch_size (r),
                                               lp_lora_gram_bf16_scratch_size (r)));

  double start = thread_cpu ();

  for (;;)
    {
      gint i = g_atomic_int_add (&work->next, 1);
      if (i >= (gint) work->sizes->len / 2)
        break;
      const guint *size = &g_array_index (work->sizes, guint, 2 * i);
      memset (ga, 0, sizeof (double) * r * r);
      memset (gb, 0, sizeof (double) * r * r);
      if (work->af)
        {
          /* the f32 kernels lora-svd runs on 16-bit factors without the bf16
           * dot product, from blocks it has converted (not counted here) */
          lp_lora_gram_blocked_rows_f32 (work->af, size[0], r, size[0], ga, scratch);
          lp_lora_gram_blocked_cols_f32 (work->bf, r, size[1], gb, scratch);
        }
      else if (blocked)
        {
          lp_lora_gram_blocked_rows_bf16 (work->a, r, size[0], ga, scratch);
          lp_lora_gram_blocked_cols_bf16 (work->b, r, size[1], gb, scratch);
        }
      else
        {
          lp_lora_gram_rows_bf16 (work->a, r, size[0], ga);
          lp_lora_gram_cols_bf16 (work->b, r, size[1], gb, scratch);
        }
    }
  g_mutex_lock (&work->lock);
  work->cpu += thread_cpu () - start;
  g_mutex_unlock (&work->lock);
  return NULL;
}

static int
run_gram (guint r,
          guint threads)
{
  GramWork work = { r, r >= LP_LORA_GRAM_BLOCKED_RANK, g_array_new (FALSE, FALSE, sizeof (guint)), 0 };
  if (g_getenv ("LP_BENCH_GRAM_KERNELS"))   /* "blocked" or "plain", for comparisons */
    work.blocked = g_str_equal (g_getenv ("LP_BENCH_GRAM_KERNELS"), "blocked");
  double flops = 0;
  guint max_len = 0;
  for (int group = 0; group < 2; group++)
    {
      const guint (*layers)[2] = group ? flux_single : flux_double;
      guint n_layers = group ? G_N_ELEMENTS (flux_single) : G_N_ELEMENTS (flux_double);
      for (guint block = 0; block < (group ? 38u : 19u); block++)
        for (guint l = 0; l < n_layers; l++)
          {
            g_array_append_vals (work.sizes, layers[l], 2);
            flops += (double) (layers[l][0] + layers[l][1]) * r * (r + 1);
            max_len = MAX (max_len, MAX (layers[l][0], layers[l][1]));
          }
    }

  /* values of a trained factor's size; the kernels' speed does not depend
   * on them */
  gsize values = (gsize) r * max_len;
  g_autofree guint16 *a = g_new (guint16, values);
  g_autofree guint16 *b = g_new (guint16, values);
  guint64 state = 0x9e3779b97f4a7c15ull;
  for (gsize i = 0; i < values; i++)
    {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      float v = ((state >> 40) / (double) (1 << 24) - 0.5) * 0.02;
      guint32 bits;
      memcpy (&bits, &v, sizeof bits);
      a[i] = bits >> 16;

    }
  for (gsize i = 0; i < values; i++)
    b[i] = a[values - 1 - i];
  work.a = a;
  work.b = b;
  g_autofree float *af = NULL, *bf = NULL;
  if (!lp_lora_have_bf16_dot ())
    {
      af = g_new (float, values);
      bf = g_new (float, values);
      for (gsize i = 0; i < values; i++)
        {
          guint32 wa = (guint32) a[i] << 16, wb = (guint32) b[i] << 16;
          memcpy (&af[i], &wa, sizeof wa);
          memcpy (&bf[i], &wb, sizeof wb);
        }
      work.af = af;
      work.bf = bf;
    }

  double best = G_MAXDOUBLE, best_cpu = G_MAXDOUBLE;
  for (int rep = 0; rep < 3; rep++)
    {
      g_autofree GThread **ids = g_new (GThread *, threads);
      double start = now ();

      work.next = 0;
      work.cpu = 0;
      for (guint t = 0; t < threads; t++)
        ids[t] = g_thread_new ("gram", gram_thread, &work);
      for (guint t = 0; t < threads; t++)
        g_thread_join (ids[t]);
      best = MIN (best, now () - start);
      best_cpu = MIN (best_cpu, work.cpu);
    }
  /* by CPU time: the rate the threads' cores give, scaled to all of them */
  printf ("gram %u %.1f %.1f %.3f %.3f %s\n", r, flops / best_cpu * threads / 1e9, flops / best / 1e9,
          best_cpu, best, af ? "f32" : "bf16");
  g_array_unref (work.sizes);
  return 0;
}

int
main (int    argc,
      char **argv)
{
  if (argc >= 2 && strcmp (argv[1], "peak") == 0)
    return run_peak (argc > 2 ? (guint) atoi (argv[2]) : 2);
  if (argc >= 3 && strcmp (argv[1], "gram") == 0)
    return run_gram ((guint) atoi (argv[2]), argc > 3 ? (guint) atoi (argv[3]) : 2);
  g_printerr ("usage: lp-bench-gram peak [THREADS] | gram R [THREADS]\n");
  return 2;
}
