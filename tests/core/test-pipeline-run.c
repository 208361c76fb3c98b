/* test-pipeline-run.c: running graphs of stages: order, threads, errors,
 * progress, cancellation
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-test-util.h"

#include <string.h>
#include <sys/wait.h>

/* The test stages live in a plugin; the sink is read through its properties. */
static double
collected_sum (LpStage *sink)
{
  double sum;
  g_object_get (sink, "sum", &sum, NULL);
  return sum;
}

static guint
collected_n (LpStage *sink)
{
  guint n;
  g_object_get (sink, "n-tensors", &n, NULL);
  return n;
}

static char *
collected_name (LpStage *sink, guint i)
{
  g_auto(GStrv) order = NULL;
  g_object_get (sink, "order", &order, NULL);
  g_assert_cmpuint (i, <, g_strv_length (order));
  return g_strdup (order[i]);
}

static LpRegistry *
test_registry (void)
{
  static LpRegistry *registry;

  if (registry == NULL)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *path = g_build_filename (g_getenv ("LPIPE_TEST_PLUGIN_DIR"), "liblptest-good.so", NULL);
      registry = lp_registry_new ();
      g_assert_nonnull (lp_registry_load_plugin (registry, path, &error));
      g_assert_no_error (error);
    }
  return registry;
}

static LpPipeline *
make_chain (guint count, const char *fail_on, LpStage **sink_out)
{
  LpPipeline *pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *source, *add, *sink;

  source = lp_pipeline_add_stage (pipeline, "test-source", "src", &error);
  g_assert_no_error (error);
  g_object_set (source, "count", count, "size", 1000, NULL);
  add = lp_pipeline_add_stage (pipeline, "test-add", NULL, &error);
  g_assert_no_error (error);
  g_object_set (add, "amount", 0.5, "fail-on", fail_on, NULL);
  sink = lp_pipeline_add_stage (pipeline, "test-collect", "out", &error);
  g_assert_no_error (error);
  *sink_out = sink;
  return pipeline;
}

/* Stages added in order with no inputs form a chain; the sink sees every
 * tensor in checkpoint order whatever the number of threads. */
static void
test_chain_threads (void)
{
  for (guint threads = 1; threads <= 4; threads++)
    {
      LpStage *sink;
      g_autoptr(LpPipeline) pipeline = make_chain (20, NULL, &sink);
      g_autoptr(GError) error = NULL;

      lp_pipeline_set_threads (pipeline, threads);
      g_assert_true (lp_pipeline_run (pipeline, NULL, &error));
      g_assert_no_error (error);
      g_assert_cmpuint (collected_n (sink), ==, 20);
      /* sum over i < 20 of 1000 * (i + 0.5) */
      g_assert_cmpfloat (collected_sum (sink), ==, 1000.0 * (190 + 10));
      for (guint i = 0; i < 20; i++)
        {
          g_autofree char *name = g_strdup_printf ("t%u", i);
          g_autofree char *got = collected_name (sink, i);
          g_assert_cmpstr (got, ==, name);
        }
    }
}

/* A lazy tensor that fails: the error names the file-less origin, the stage
 * that made the tensor is not known to the sink, but the tensor is. */
static void
test_lazy_error (void)
{
  LpStage *sink;
  g_autoptr(LpPipeline) pipeline = make_chain (6, "t3", &sink);
  g_autoptr(GError) error = NULL;

  lp_pipeline_set_threads (pipeline, 2);
  g_assert_false (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
  g_assert_nonnull (strstr (error->message, "stage 3 'test-collect' (id out)"));
  g_assert_nonnull (strstr (error->message, "tensor 't3'"));
}

static void
test_dag (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *a, *b, *concat, *sink;

  a = lp_pipeline_add_stage (pipeline, "test-source", "a", &error);
  b = lp_pipeline_add_stage (pipeline, "test-source", "b", &error);
  g_object_set (b, "count", 2, NULL);
  concat = lp_pipeline_add_stage (pipeline, "test-concat", NULL, &error);
  sink = lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error);
  g_assert_no_error (error);
  g_assert_true (lp_pipeline_connect (pipeline, a, concat, &error));
  g_assert_true (lp_pipeline_connect (pipeline, b, concat, &error));
  g_assert_true (lp_pipeline_connect (pipeline, concat, sink, &error));
  g_assert_true (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (collected_n (sink), ==, 4 + 2);
  {
    g_autofree char *fifth = collected_name (sink, 4);
    g_assert_cmpstr (fifth, ==, "in1.t0");
  }
}

static void
test_cycle (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *x, *y, *sink;

  x = lp_pipeline_add_stage (pipeline, "test-add", "x", &error);
  y = lp_pipeline_add_stage (pipeline, "test-add", "y", &error);
  sink = lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error);
  g_assert_true (lp_pipeline_connect (pipeline, x, y, &error));
  g_assert_true (lp_pipeline_connect (pipeline, y, x, &error));
  g_assert_true (lp_pipeline_connect (pipeline, y, sink, &error));
  g_assert_false (lp_pipeline_validate (pipeline, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_CYCLE);
  g_assert_nonnull (strstr (error->message, "'test-add' (id x)"));
}

static void
test_arity (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *a, *b, *sink;

  /* A transform first in line has nothing to take. */
  lp_pipeline_add_stage (pipeline, "test-add", NULL, &error);
  g_assert_false (lp_pipeline_validate (pipeline, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY);
  g_clear_error (&error);
  g_clear_object (&pipeline);

  /* A sink takes one input, not two; a sink has no output. */
  pipeline = lp_pipeline_new (test_registry ());
  a = lp_pipeline_add_stage (pipeline, "test-source", NULL, &error);
  b = lp_pipeline_add_stage (pipeline, "test-source", NULL, &error);
  sink = lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error);
  g_assert_true (lp_pipeline_connect (pipeline, a, sink, &error));
  g_assert_false (lp_pipeline_connect (pipeline, b, sink, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY);
  g_clear_error (&error);
  g_assert_false (lp_pipeline_connect (pipeline, sink, a, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY);
  g_clear_error (&error);

  /* An aggregator needs two. */
  g_clear_object (&pipeline);
  pipeline = lp_pipeline_new (test_registry ());
  lp_pipeline_add_stage (pipeline, "test-source", NULL, &error);
  lp_pipeline_add_stage (pipeline, "test-concat", NULL, &error);
  g_assert_false (lp_pipeline_validate (pipeline, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_ARITY);
  g_assert_nonnull (strstr (error->message, "stage 2 'test-concat'"));
}

static void
test_empty (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;

  g_assert_false (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY);
}

/* A pipeline whose result reaches no sink would compute nothing and write
 * nothing, then report success: validation refuses it, and a branch that no
 * stage reads, before any stage prepares or runs. */
static void
test_no_sink (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *source, *add, *sink;

  lp_pipeline_add_stage (pipeline, "test-source", NULL, &error);
  lp_pipeline_add_stage (pipeline, "test-add", NULL, &error);
  g_assert_no_error (error);
  g_assert_false (lp_pipeline_validate (pipeline, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY);
  g_assert_cmpstr (error->message, ==, "the pipeline has no sink, so nothing would be written: "
                   "end it with one, e.g. '! safetensors-sink location=OUT.safetensors'");
  g_clear_error (&error);
  g_assert_false (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY);
  g_clear_error (&error);
  g_clear_object (&pipeline);

  /* a sink on one branch does not excuse the other */
  pipeline = lp_pipeline_new (test_registry ());
  source = lp_pipeline_add_stage (pipeline, "test-source", "src", &error);
  add = lp_pipeline_add_stage (pipeline, "test-add", "lost", &error);
  sink = lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error);
  g_assert_no_error (error);
  g_assert_true (lp_pipeline_connect (pipeline, source, add, &error));
  g_assert_true (lp_pipeline_connect (pipeline, source, sink, &error));
  g_assert_false (lp_pipeline_validate (pipeline, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_EMPTY);
  g_assert_cmpstr (error->message, ==, "stage 2 'test-add' (id lost): its output reaches no sink: "
                   "make it an input of a later stage, or remove it");
  g_assert_cmpuint (collected_n (sink), ==, 0);
}

typedef struct {
  guint calls;
  guint64 last[4];
  GThread *thread;
} ProgressLog;

static void
on_progress (LpPipeline *p, guint64 a, guint64 b, guint64 c, guint64 d, gpointer user_data)
{
  ProgressLog *log = user_data;
  log->calls++;
  log->last[0] = a; log->last[1] = b; log->last[2] = c; log->last[3] = d;
  log->thread = g_thread_self ();
}

static void
test_progress (void)
{
  LpStage *sink;
  g_autoptr(LpPipeline) pipeline = make_chain (5, NULL, &sink);
  g_autoptr(GError) error = NULL;
  ProgressLog log = { 0, };

  g_signal_connect (pipeline, "progress", G_CALLBACK (on_progress), &log);
  g_assert_true (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_cmpuint (log.calls, ==, 6);   /* the start, then each tensor */
  g_assert_cmpuint (log.last[0], ==, 5);
  g_assert_cmpuint (log.last[1], ==, 5);
  g_assert_cmpuint (log.last[2], ==, 5 * 1000 * sizeof (float));
  g_assert_cmpuint (log.last[3], ==, 5 * 1000 * sizeof (float));
}

static void
test_cancelled (void)
{
  LpStage *sink;
  g_autoptr(LpPipeline) pipeline = make_chain (5, NULL, &sink);
  g_autoptr(GError) error = NULL;
  g_autoptr(GCancellable) cancellable = g_cancellable_new ();

  g_cancellable_cancel (cancellable);
  g_assert_false (lp_pipeline_run (pipeline, cancellable, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_assert_cmpuint (collected_n (sink), ==, 0);
}

typedef struct {
  GMainLoop *loop;
  gboolean ok;
  GError *error;
} AsyncResult;

static void
on_done (GObject *source, GAsyncResult *result, gpointer user_data)
{
  AsyncResult *r = user_data;
  r->ok = lp_pipeline_run_finish (LP_PIPELINE (source), result, &r->error);
  g_main_loop_quit (r->loop);
}

/* An async run keeps the main loop turning; progress arrives in the caller's
 * thread. */
static void
test_async (void)
{
  LpStage *sink;
  g_autoptr(LpPipeline) pipeline = make_chain (8, NULL, &sink);
  AsyncResult r = { 0, };
  ProgressLog log = { 0, };

  r.loop = g_main_loop_new (NULL, FALSE);
  g_signal_connect (pipeline, "progress", G_CALLBACK (on_progress), &log);
  lp_pipeline_run_async (pipeline, NULL, on_done, &r);
  g_main_loop_run (r.loop);
  /* Progress idles queued before the result may still be pending. */
  while (g_main_context_iteration (NULL, FALSE))
    ;
  g_assert_no_error (r.error);
  g_assert_true (r.ok);
  g_assert_cmpuint (log.calls, ==, 9);
  g_assert_true (log.thread == g_thread_self ());
  g_assert_cmpuint (collected_n (sink), ==, 8);
  g_main_loop_unref (r.loop);
}

/* Properties are never clamped: out of range is an error. */
static void
test_property_checked (void)
{
  g_autoptr(LpStage) add = lp_registry_create_stage (test_registry (), "test-add", NULL);
  g_autoptr(GError) error = NULL;
  g_auto(GValue) v = G_VALUE_INIT;
  double amount;

  g_assert_false (lp_stage_set_property_from_string (add, "amount", "1e9", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_clear_error (&error);
  g_assert_false (lp_stage_set_property_from_string (add, "amout", "1", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY);
  g_assert_nonnull (strstr (error->message, "did you mean 'amount'?"));
  g_clear_error (&error);

  g_value_init (&v, G_TYPE_INT);
  g_value_set_int (&v, 7);
  g_assert_true (lp_stage_set_property_checked (add, "amount", &v, &error));
  g_assert_no_error (error);
  g_object_get (add, "amount", &amount, NULL);
  g_assert_cmpfloat (amount, ==, 7.0);
  g_value_set_int (&v, 2000000);
  g_assert_false (lp_stage_set_property_checked (add, "amount", &v, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_object_get (add, "amount", &amount, NULL);
  g_assert_cmpfloat (amount, ==, 7.0);
}

/* A sink that writes in parallel gives the same file for any thread count,
 * and the order of tensors in it is the checkpoint's. */
static void
test_save_any_threads (void)
{
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autoptr(LpStage) source = lp_registry_create_stage (test_registry (), "test-source", NULL);
  g_autoptr(LpStage) sink = lp_registry_create_stage (test_registry (), "test-collect", NULL);
  g_autoptr(LpCheckpoint) ckpt = NULL;
  g_autoptr(GBytes) first = NULL;
  g_autoptr(GError) error = NULL;

  g_object_set (source, "count", 40, "size", 30000, NULL);
  g_assert_true (lp_stage_run (source, NULL, 0, &ckpt, &error));
  g_assert_no_error (error);
  for (guint threads = 1; threads <= 4; threads++)
    {
      g_autofree char *path = g_strdup_printf ("%s/out-%u.safetensors", dir, threads);
      g_autofree char *contents = NULL;
      gsize len;
      g_autoptr(GBytes) bytes = NULL;
      g_autoptr(LpCheckpoint) back = NULL;

      lp_stage_set_threads (sink, threads);
      g_assert_true (lp_safetensors_save (ckpt, path, sink, &error));
      g_assert_no_error (error);
      g_assert_true (g_file_get_contents (path, &contents, &len, NULL));
      bytes = g_bytes_new_take (g_steal_pointer (&contents), len);
      if (first == NULL)
        first = g_bytes_ref (bytes);
      else
        g_assert_true (g_bytes_equal (first, bytes));
      back = lp_safetensors_load (path, &error);
      g_assert_no_error (error);
      for (guint i = 0; i < 40; i++)
        {
          g_autoptr(GBytes) data = lp_tensor_dup_data (lp_checkpoint_get_tensor (back, i), NULL);
          const float *v = g_bytes_get_data (data, NULL);
          g_assert_cmpfloat (v[0], ==, i);
          g_assert_cmpfloat (v[29999], ==, i);
        }
    }
}

/* lp_stage_pull_tensors_unordered(): tensors of 33 MiB, so that two do not
 * fit in the 64 MiB budget, are never computed two at a time however many
 * threads there are; small ones are all handed over, and when two fail the
 * earlier one's error is returned. */
typedef struct {
  gint live;        /* tensors computed and not yet freed */
  gint max_live;
  gint fail_from;   /* tensors at this index and after fail (or -1) */
} PullWatch;

typedef struct {
  PullWatch *watch;
  guint index;
} PullItem;

typedef struct {
  PullWatch *watch;
  gpointer data;
} PullBytes;

static void
pull_item_bytes_free (gpointer user_data)
{
  PullBytes *b = user_data;
  g_atomic_int_add (&b->watch->live, -1);
  g_free (b->data);
  g_free (b);
}

static GBytes *
pull_item_data (LpTensor  *tensor,
                gpointer   user_data,
                GError   **error)
{
  PullItem *item = user_data;
  PullWatch *watch = item->watch;
  gint live;

  if (watch->fail_from >= 0 && item->index >= (guint) watch->fail_from && item->index % 2 == 1)
    {
      g_usleep ((20 - item->index) * 1000);   /* later failures finish first */
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED, "tensor %u failed", item->index);
      return NULL;
    }
  live = g_atomic_int_add (&watch->live, 1) + 1;
  for (gint max = g_atomic_int_get (&watch->max_live);
       live > max && !g_atomic_int_compare_and_exchange (&watch->max_live, max, live);
       max = g_atomic_int_get (&watch->max_live))
    ;
  g_usleep (2000);   /* long enough for other workers to try */
  PullBytes *b = g_new (PullBytes, 1);
  b->watch = watch;
  b->data = g_malloc0 (lp_tensor_get_n_bytes (tensor));
  return g_bytes_new_with_free_func (b->data, lp_tensor_get_n_bytes (tensor), pull_item_bytes_free, b);
}

static gboolean
pull_count (LpTensor *tensor, GBytes *bytes, gpointer user_data, GError **error)
{
  g_assert_cmpuint (g_bytes_get_size (bytes), ==, lp_tensor_get_n_bytes (tensor));
  g_atomic_int_inc ((gint *) user_data);
  return TRUE;
}

static LpCheckpoint *
pull_checkpoint (PullWatch *watch, guint n, guint64 elements)
{
  LpCheckpoint *ckpt = lp_checkpoint_new ();

  for (guint i = 0; i < n; i++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *name = g_strdup_printf ("t%02u", i);
      PullItem *item = g_new0 (PullItem, 1);
      g_autoptr(LpTensor) t = NULL;

      item->watch = watch;
      item->index = i;
      t = lp_tensor_new_lazy (name, LP_DTYPE_F32, &elements, 1, pull_item_data, item, g_free, &error);
      g_assert_no_error (error);
      g_assert_true (lp_checkpoint_add_tensor (ckpt, t, &error));
      g_assert_no_error (error);
    }
  return ckpt;
}

static void
test_pull_unordered (void)
{
  g_autoptr(LpStage) sink = lp_registry_create_stage (test_registry (), "test-collect", NULL);
  g_autoptr(GError) error = NULL;

  lp_stage_set_threads (sink, 4);

  /* big tensors: one at a time */
  {
    PullWatch watch = { 0, 0, -1 };
    g_autoptr(LpCheckpoint) ckpt = pull_checkpoint (&watch, 5, 33 * 1024 * 1024 / 4);
    gint handed = 0;

    g_assert_true (lp_stage_pull_tensors_unordered (sink, ckpt, pull_count, &handed, &error));
    g_assert_no_error (error);
    g_assert_cmpint (handed, ==, 5);
    g_assert_cmpint (watch.max_live, ==, 1);
    g_assert_cmpint (watch.live, ==, 0);
  }

  /* small tensors: all of them, several at once */
  {
    PullWatch watch = { 0, 0, -1 };
    g_autoptr(LpCheckpoint) ckpt = pull_checkpoint (&watch, 40, 1000);
    gint handed = 0;

    g_assert_true (lp_stage_pull_tensors_unordered (sink, ckpt, pull_count, &handed, &error));
    g_assert_no_error (error);
    g_assert_cmpint (handed, ==, 40);
    g_assert_cmpint (watch.max_live, >, 1);
    g_assert_cmpint (watch.live, ==, 0);
  }

  /* failures at 5, 7, 9 …: the error is tensor 5's, and nothing leaks */
  {
    PullWatch watch = { 0, 0, 5 };
    g_autoptr(LpCheckpoint) ckpt = pull_checkpoint (&watch, 20, 1000);
    gint handed = 0;

    g_assert_false (lp_stage_pull_tensors_unordered (sink, ckpt, pull_count, &handed, &error));
    g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED);
    g_assert_cmpstr (error->message, ==, "tensor 5 failed");
    g_assert_cmpint (watch.live, ==, 0);
  }
}

/* A thread budget is bounded: the API takes the nearest end of
 * [1, LP_PIPELINE_MAX_THREADS], and `lpipe --threads` refuses anything else
 * with a usage error (exit 2) instead of starting that many threads. */
static void
test_threads_bounded (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  const char *values[] = { "1025", "100000000", "0", "-5" };

  lp_pipeline_set_threads (pipeline, 100000000);
  g_assert_cmpuint (lp_pipeline_get_threads (pipeline), ==, LP_PIPELINE_MAX_THREADS);
  lp_pipeline_set_threads (pipeline, 0);
  g_assert_cmpuint (lp_pipeline_get_threads (pipeline), ==, 1);

  for (guint i = 0; i < G_N_ELEMENTS (values); i++)
    {
      const char *argv[] = { g_getenv ("LPIPE"), "--threads", values[i], "inspect", NULL };
      g_autofree char *out = NULL;
      g_autofree char *err = NULL;
      g_autofree char *expected = g_strdup_printf ("--threads must be from 1 to %d, not %s",
                                                   LP_PIPELINE_MAX_THREADS, values[i]);
      g_autoptr(GError) error = NULL;
      int status;

      g_assert_true (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                                   &out, &err, &status, &error));
      g_assert_no_error (error);
      g_assert_true (WIFEXITED (status));
      g_assert_cmpint (WEXITSTATUS (status), ==, 2);
      g_assert_nonnull (strstr (err, expected));
    }
}

static long
peak_rss_kb (void)
{
  g_autofree char *status = NULL;
  const char *hwm;

  g_assert_true (g_file_get_contents ("/proc/self/status", &status, NULL, NULL));
  hwm = strstr (status, "VmHWM:");
  g_assert_nonnull (hwm);
  return strtol (hwm + strlen ("VmHWM:"), NULL, 10);
}

/* Builds, validates and runs source ! N x test-add ! test-collect; returns
 * what the run added to the peak RSS, in KiB, and the CPU seconds of the
 * validation. */
static long
run_long_chain (guint n, double *validate_seconds)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  LpStage *stage;
  long before;
  gint64 t0;

  stage = lp_pipeline_add_stage (pipeline, "test-source", NULL, &error);
  g_assert_no_error (error);
  g_object_set (stage, "count", 1, "size", 4, NULL);
  for (guint i = 0; i < n; i++)
    {
      stage = lp_pipeline_add_stage (pipeline, "test-add", NULL, &error);
      g_assert_no_error (error);
      g_object_set (stage, "amount", 0.25, NULL);
    }
  stage = lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error);
  g_assert_no_error (error);
  lp_pipeline_set_threads (pipeline, 1);

  before = peak_rss_kb ();
  t0 = g_get_monotonic_time ();
  g_assert_true (lp_pipeline_validate (pipeline, &error));
  g_assert_no_error (error);
  *validate_seconds = (g_get_monotonic_time () - t0) / (double) G_USEC_PER_SEC;
  g_assert_true (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpfloat (collected_sum (stage), ==, n);   /* 4 values of 0 + n x 0.25, exact in f32 */
  return peak_rss_kb () - before;
}

/* The cost of a stage does not grow with the number of stages: each stage
 * once held its own copy of the whole pipeline's provenance (10,000 stages:
 * 1.2 GB) and ordering the stages was quadratic. Unshared, 4000 stages added
 * ~330 MB to the peak; shared, the chain's own objects are a few MB. The
 * larger chain runs second, so its peak starts where the first one's was. */
static void
test_many_stages (void)
{
  double t_small, t_large;
  long small = run_long_chain (1000, &t_small);
  long large = run_long_chain (4000, &t_large);

  g_test_message ("peak RSS added: 1000 stages %ld KiB, 4000 stages %ld KiB; "
                  "validation %.3f s, %.3f s", small, large, t_small, t_large);
  g_assert_cmpint (large, <, 32 * 1024);
  /* linear would be 4x; allow for noise, not for 16x */
  g_assert_cmpfloat (t_large, <, 8 * t_small + 0.05);
}

/* More than LP_PIPELINE_MAX_STAGES: a clear error from the API, and from a
 * pipeline file before any stage is made. */
static void
test_stage_limit (void)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (test_registry ());
  g_autoptr(GError) error = NULL;
  GString *file = g_string_new ("{\"stages\": [{\"stage\": \"test-source\"}");

  for (guint i = 0; i < LP_PIPELINE_MAX_STAGES; i++)
    {
      g_assert_nonnull (lp_pipeline_add_stage (pipeline, "test-add", NULL, &error));
      g_assert_no_error (error);
    }
  g_assert_null (lp_pipeline_add_stage (pipeline, "test-collect", NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID);
  g_assert_cmpstr (error->message, ==, "a pipeline holds at most 4096 stages");
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, LP_PIPELINE_MAX_STAGES);
  g_clear_error (&error);
  g_clear_object (&pipeline);

  for (guint i = 0; i < LP_PIPELINE_MAX_STAGES; i++)
    g_string_append (file, ", {\"stage\": \"test-add\"}");
  g_string_append (file, "]}");
  pipeline = lp_pipeline_new (test_registry ());
  g_assert_false (lp_pipeline_load_from_data (pipeline, file->str, -1, "long.pipeline", NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID);
  g_assert_cmpstr (error->message, ==,
                   "long.pipeline: \"stages\" has 4097 stages; a pipeline holds at most 4096");
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 0);
  g_string_free (file, TRUE);
}

/* rank-check on a module whose factors have a zero-size dimension (shape
 * [2, 0] and [0, 2]): its Gram matrix is 0, computed without handing BLAS
 * lda = 0 (OpenBLAS printed "On entry to DSYRK parameter number 7 had an
 * illegal value"). A subprocess, to see stderr. */
static void
test_rank_check_zero_size (void)
{
  static const char header[] =
    "{\"m.lora_down.weight\":{\"dtype\":\"F32\",\"shape\":[2,0],\"data_offsets\":[0,0]},"
    "\"m.lora_up.weight\":{\"dtype\":\"F32\",\"shape\":[0,2],\"data_offsets\":[0,0]}}";
  guint64 len = sizeof header - 1;
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autofree char *in = g_build_filename (dir, "zero.safetensors", NULL);
  g_autofree char *src = g_strconcat ("location=", in, NULL);
  g_autofree char *dst = g_strconcat ("location=", dir, "/out.safetensors", NULL);
  g_autoptr(GByteArray) file = g_byte_array_new ();
  const char *argv[] = { g_getenv ("LPIPE"), "launch", "safetensors-source", src, "!",
                         "rank-check", "!", "safetensors-sink", dst, NULL };
  g_autofree char *out = NULL;
  g_autofree char *err = NULL;
  g_autoptr(GError) error = NULL;
  int status;

  for (int i = 0; i < 8; i++)
    g_byte_array_append (file, (guint8[]) { (len >> (8 * i)) & 0xff }, 1);
  g_byte_array_append (file, (const guint8 *) header, len);
  g_assert_true (g_file_set_contents (in, (const char *) file->data, file->len, NULL));
  g_assert_true (g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                               &out, &err, &status, &error));
  g_assert_no_error (error);
  /* OpenBLAS prints its complaint on stdout */
  g_assert_null (strstr (out, "illegal value"));
  g_assert_null (strstr (err, "illegal value"));
}

/* lp_stage_parallel_for(): every item runs once, on the stage's threads; of
 * several failures the first by index is reported whatever the scheduling;
 * a cancelled run fails as cancelled. */
typedef struct {
  gint ran[500];
  GThread *threads[500];
} ParallelCount;

static gboolean
parallel_item (guint     i,
               gpointer  user_data,
               GError  **error)
{
  ParallelCount *count = user_data;

  g_atomic_int_inc (&count->ran[i]);
  count->threads[i] = g_thread_self ();
  if (i % 97 == 41)   /* 41, 138, 235, 332, 429 fail; the later ones first, often */
    {
      g_usleep (i == 41 ? 2000 : 0);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED, "item %u failed", i);
      return FALSE;
    }
  return TRUE;
}

static void
test_parallel_for (void)
{
  g_autoptr(LpStage) stage = lp_registry_create_stage (lp_registry_get_default (), "rank-check", NULL);
  g_autoptr(GCancellable) cancellable = g_cancellable_new ();
  g_autoptr(GError) error = NULL;
  ParallelCount *count = g_new0 (ParallelCount, 1);
  gboolean several_threads = FALSE;

  g_assert_nonnull (stage);
  lp_stage_set_threads (stage, 2);
  for (int round = 0; round < 20; round++)
    {
      memset (count, 0, sizeof *count);
      g_assert_false (lp_stage_parallel_for (stage, 500, parallel_item, count, &error));
      g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED);
      g_assert_cmpstr (error->message, ==, "item 41 failed");
      g_clear_error (&error);
      for (guint i = 0; i < 500; i++)
        {
          g_assert_cmpint (count->ran[i], ==, 1);
          several_threads |= count->threads[i] != count->threads[0];
        }
    }
  g_assert_true (several_threads);
  g_assert_true (lp_stage_parallel_for (stage, 0, parallel_item, count, &error));
  g_assert_no_error (error);

  g_cancellable_cancel (cancellable);
  lp_stage_set_cancellable (stage, cancellable);
  memset (count, 0, sizeof *count);
  g_assert_false (lp_stage_parallel_for (stage, 500, parallel_item, count, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_assert_cmpint (count->ran[0], ==, 0);
  lp_stage_set_cancellable (stage, NULL);
  g_free (count);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/pipeline/run/chain-any-threads", test_chain_threads);
  g_test_add_func ("/pipeline/run/threads-bounded", test_threads_bounded);
  g_test_add_func ("/pipeline/run/many-stages", test_many_stages);
  g_test_add_func ("/pipeline/run/stage-limit", test_stage_limit);
  g_test_add_func ("/stage/rank-check/zero-size-factors", test_rank_check_zero_size);
  g_test_add_func ("/pipeline/run/lazy-error-named", test_lazy_error);
  g_test_add_func ("/pipeline/run/dag", test_dag);
  g_test_add_func ("/pipeline/run/cycle", test_cycle);
  g_test_add_func ("/pipeline/run/arity", test_arity);
  g_test_add_func ("/pipeline/run/empty", test_empty);
  g_test_add_func ("/pipeline/run/no-sink", test_no_sink);
  g_test_add_func ("/pipeline/run/progress", test_progress);
  g_test_add_func ("/pipeline/run/cancelled", test_cancelled);
  g_test_add_func ("/pipeline/run/async", test_async);
  g_test_add_func ("/stage/property/never-clamped", test_property_checked);
  g_test_add_func ("/pipeline/save/same-file-any-threads", test_save_any_threads);
  g_test_add_func ("/stage/pull-unordered", test_pull_unordered);
  g_test_add_func ("/stage/parallel-for", test_parallel_for);

  return g_test_run ();
}
