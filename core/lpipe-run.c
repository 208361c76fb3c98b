/* lpipe-run.c: running pipelines (one, or many side by side) with a
 * progress line, Ctrl-C, and a summary of what was read and written
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <glib/gstdio.h>
#include <glib-unix.h>

#include "lpipe-cli.h"

void
lp_cli_result_clear (LpCliResult *result)
{
  g_clear_object (&result->check);
  g_free (result->input);
  g_free (result->output);
  g_free (result->report);
  g_free (result->failure);
  g_clear_pointer (&result->worst, g_ptr_array_unref);
  memset (result, 0, sizeof *result);
}

/* The LoRA modules of a safetensors file and their ranks; FALSE when the
 * file cannot be read or holds none. Only the header is read. */
gboolean
lp_cli_count_ranks (const char *filename,
                    guint      *n_modules,
                    guint      *min_rank,
                    guint      *max_rank)
{
  g_autoptr(LpCheckpoint) ckpt = lp_safetensors_is_index (filename) ? lp_safetensors_load_index (filename, NULL)
                                                                    : lp_safetensors_load (filename, NULL);
  g_autoptr(GPtrArray) modules = NULL;

  *n_modules = *min_rank = *max_rank = 0;
  if (ckpt == NULL)
    return FALSE;
  modules = lp_lora_find_modules (ckpt, NULL, NULL, NULL, NULL);
  if (modules == NULL || modules->len == 0)
    return FALSE;
  *min_rank = G_MAXUINT;
  for (guint i = 0; i < modules->len; i++)
    {
      guint r = lp_lora_module_get_rank (g_ptr_array_index (modules, i));
      *min_rank = MIN (*min_rank, r);
      *max_rank = MAX (*max_rank, r);
    }
  *n_modules = modules->len;
  return TRUE;
}

char *
lp_cli_describe_ranks (guint n_modules,
                       guint min_rank,
                       guint max_rank)
{
  if (n_modules == 0)
    return g_strdup ("-");
  if (min_rank == max_rank)
    return g_strdup_printf ("%u", min_rank);
  return g_strdup_printf ("%u-%u", min_rank, max_rank);
}

/* The bytes of a file, or of a sharded checkpoint's tensors (an index or
 * its folder: the index alone says nothing of the size). */
static guint64
file_size (const char *path)
{
  GStatBuf st;

  if (path == NULL)
    return 0;
  /* a sharded checkpoint's folder or index: the bytes of its tensors */
  if (lp_safetensors_is_index (path))
    {
      g_autoptr(LpCheckpoint) sharded = lp_safetensors_load_index (path, NULL);
      if (sharded)
        return lp_checkpoint_get_n_bytes (sharded);
    }
  if (g_stat (path, &st) != 0 || !S_ISREG (st.st_mode))
    return 0;
  return st.st_size;
}

/* What safetensors-sink wrote at @location: the file, or with
 * max-shard-size the shards (their index beside STEM.safetensors, in the
 * folder, or STEM.safetensors alone when the model fit in one shard). */
static guint64
output_size (const char *location)
{
  g_autofree char *index = NULL;
  g_autofree char *whole = NULL;
  guint64 size = file_size (location);

  if (size > 0 || location == NULL)
    return size;
  if (g_str_has_suffix (location, ".safetensors.index.json"))
    {
      g_autoptr(LpCheckpoint) sharded = lp_safetensors_load_index (location, NULL);
      whole = g_strndup (location, strlen (location) - strlen (".index.json"));
      return sharded ? lp_checkpoint_get_n_bytes (sharded) : file_size (whole);
    }
  if (g_file_test (location, G_FILE_TEST_IS_DIR))
    {
      whole = g_build_filename (location, "model.safetensors", NULL);
      return file_size (whole);
    }
  index = g_strconcat (location, ".index.json", NULL);
  if (g_file_test (index, G_FILE_TEST_IS_REGULAR))
    {
      g_autoptr(LpCheckpoint) sharded = lp_safetensors_load_index (index, NULL);
      return sharded ? lp_checkpoint_get_n_bytes (sharded) : 0;
    }
  return 0;
}

static char *
stage_location (LpStage *stage)
{
  char *location = NULL;

  if (g_object_class_find_property (G_OBJECT_GET_CLASS (stage), "location") == NULL)
    return NULL;
  g_object_get (stage, "location", &location, NULL);
  return location;
}

/**
 * lp_cli_prepare_run:
 *
 * Notes what the pipeline reads and writes, and which stage's `result` (a
 * read-only property: lora-svd's record of what it kept, rank-check's
 * report) gives the errors after the run; rank-check prints its per-module
 * table only with --verbose.
 */
void
lp_cli_prepare_run (LpPipeline  *pipeline,
                    LpCliResult *result)
{
  guint n = lp_pipeline_get_n_stages (pipeline);
  LpStage *check = NULL;

  for (guint i = 0; i < n; i++)
    {
      LpStage *stage = lp_pipeline_get_stage (pipeline, i);
      LpStageRole role = lp_stage_class_get_role (LP_STAGE_GET_CLASS (stage));

      if (role == LP_STAGE_ROLE_SOURCE && result->input == NULL)
        {
          result->input = stage_location (stage);
          if (result->input == NULL)
            result->input = g_strdup_printf ("(made by %s)", lp_stage_get_stage_name (stage));
          else
            result->input_is_file = TRUE;
        }
      else if (role == LP_STAGE_ROLE_SINK)
        {
          g_free (result->output);
          result->output = stage_location (stage);
        }
      /* a stage that keeps what it measured in a read-only `result`
       * (lora-svd, rank-check): the last one has the final word */
      {
        GParamSpec *pspec = g_object_class_find_property (G_OBJECT_GET_CLASS (stage), "result");
        if (pspec && G_PARAM_SPEC_VALUE_TYPE (pspec) == G_TYPE_STRING && !(pspec->flags & G_PARAM_WRITABLE))
          check = stage;
      }
      if (g_str_equal (lp_stage_get_stage_name (stage), "rank-check"))
        {
          if (!lp_cli.verbose)
            g_object_set (stage, "quiet", TRUE, NULL);
          g_clear_pointer (&result->report, g_free);
          g_object_get (stage, "report", &result->report, NULL);
        }
    }
  if (check)
    result->check = g_object_ref (G_OBJECT (check));
}

static int
compare_error_desc (gconstpointer a,
                    gconstpointer b)
{
  double ea = json_object_get_double_member (*(JsonObject **) a, "rel_error");
  double eb = json_object_get_double_member (*(JsonObject **) b, "rel_error");
  return ea < eb ? 1 : ea > eb ? -1 : 0;
}

static void
read_report (LpCliResult *result)
{
  g_autoptr(JsonParser) parser = json_parser_new ();
  g_autoptr(GPtrArray) measured = g_ptr_array_new ();
  JsonObject *root, *summary;
  JsonArray *modules;

  g_autofree char *text = NULL;

  if (result->check == NULL)
    return;
  g_object_get (result->check, "result", &text, NULL);
  if (text == NULL || !json_parser_load_from_data (parser, text, -1, NULL))
    return;
  root = json_node_get_object (json_parser_get_root (parser));
  if (root == NULL || !json_object_has_member (root, "modules"))
    return;
  modules = json_object_get_array_member (root, "modules");
  if (json_object_has_member (root, "summary"))
    {
      /* rank-check counted the modules of what it passed on */
      summary = json_object_get_object_member (root, "summary");
      result->out_modules = json_object_get_int_member (summary, "n_modules");
      result->out_min_rank = json_object_get_int_member (summary, "min_rank");
      result->out_max_rank = json_object_get_int_member (summary, "max_rank");
      /* lora-svd also tells the ranks it read */
      if (json_object_has_member (summary, "in_min_rank"))
        {
          result->in_modules = result->out_modules;
          result->in_min_rank = json_object_get_int_member (summary, "in_min_rank");
          result->in_max_rank = json_object_get_int_member (summary, "in_max_rank");
        }
    }
  for (guint i = 0; modules && i < json_array_get_length (modules); i++)
    {
      JsonObject *m = json_array_get_object_element (modules, i);
      if (m && json_object_has_member (m, "rel_error")
          && !JSON_NODE_HOLDS_NULL (json_object_get_member (m, "rel_error")))
        {
          double e = json_object_get_double_member (m, "rel_error");
          g_ptr_array_add (measured, m);
          result->mean_error += e;
          result->max_error = MAX (result->max_error, e);
        }
    }
  if (measured->len == 0)
    return;
  result->have_error = TRUE;
  result->mean_error /= measured->len;
  g_ptr_array_sort (measured, compare_error_desc);
  result->worst = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < MIN (3, measured->len); i++)
    {
      JsonObject *m = g_ptr_array_index (measured, i);
      g_ptr_array_add (result->worst, g_strdup_printf ("%s (%.3g)", json_object_get_string_member (m, "name"),
                                                       json_object_get_double_member (m, "rel_error")));
    }
}

/* After a successful run: what was read and written, and the errors
 * rank-check measured. Runs in the worker thread of a batch. */
void
lp_cli_collect_result (LpPipeline  *pipeline,
                       LpCliResult *result)
{
  read_report (result);
  if (result->input_is_file)
    {
      result->in_bytes = file_size (result->input);
      /* the reducer counted them already when it tells (reading a file's
       * header again was a quarter of the work for small LoRAs) */
      if (result->in_modules == 0)
        lp_cli_count_ranks (result->input, &result->in_modules,
                            &result->in_min_rank, &result->in_max_rank);
    }
  if (result->output)
    {
      result->out_bytes = output_size (result->output);
      /* rank-check counted them already when the pipeline has one */
      if (result->out_modules == 0)
        lp_cli_count_ranks (result->output, &result->out_modules,
                            &result->out_min_rank, &result->out_max_rank);
    }
}

static void
describe_file (GString    *out,
               const char *label,
               const char *path,
               guint64     bytes,
               guint       n_modules,
               guint       min_rank,
               guint       max_rank)
{
  g_autofree char *name = lp_cli_escape (path, FALSE);
  char size[32];

  g_string_append_printf (out, "%-6s %s", label, name);
  if (bytes == 0 && n_modules == 0)
    {
      g_string_append_c (out, '\n');
      return;
    }
  lp_cli_format_bytes (size, sizeof size, bytes);
  g_string_append_printf (out, ": %s", size);
  if (n_modules > 0)
    {
      g_autofree char *ranks = lp_cli_describe_ranks (n_modules, min_rank, max_rank);
      g_string_append_printf (out, ", %u LoRA modules of rank %s", n_modules, ranks);
    }
  g_string_append_c (out, '\n');
}

/* The few lines a run ends with: what was read, what was written where,
 * sizes and ranks, the error and the worst modules. */
void
lp_cli_print_summary (LpCliResult *result)
{
  g_autoptr(GString) out = g_string_new (NULL);

  if (result->input)
    describe_file (out, "read", result->input, result->in_bytes,
                   result->in_modules, result->in_min_rank, result->in_max_rank);
  if (result->output)
    describe_file (out, "wrote", result->output, result->out_bytes,
                   result->out_modules, result->out_min_rank, result->out_max_rank);
  if (result->have_error)
    {
      g_string_append_printf (out, "error  relative, per module: mean %.3g, max %.3g", result->mean_error,
                              result->max_error);
      if (result->worst && result->worst->len > 0)
        {
          g_autoptr(GString) worst = g_string_new (NULL);
          for (guint i = 0; i < result->worst->len; i++)
            g_string_append_printf (worst, "%s%s", i ? ", " : "", (char *) g_ptr_array_index (result->worst, i));
          g_autofree char *escaped = lp_cli_escape (worst->str, FALSE);
          g_string_append_printf (out, "\nworst  %s", escaped);
        }
      g_string_append_c (out, '\n');
    }
  else if (result->check)
    g_string_append (out, "error  not measured: rank-check has no original to compare with (give it the "
                          "original as a second input, or put it after lora-svd)\n");
  if (result->report)
    {
      g_autofree char *escaped = lp_cli_escape (result->report, FALSE);
      g_string_append_printf (out, "report %s (every module)\n", escaped);
    }
  g_string_append_printf (out, "done in %.2f s\n", result->seconds);
  g_printerr ("%s", out->str);
}

/* --- running ------------------------------------------------------------- */

typedef struct _Batch Batch;

typedef struct {
  Batch *batch;
  guint index;
  LpPipeline *pipeline;
  gint64 start;
  guint64 bytes_done, bytes_total, tensors_done, tensors_total;
} Slot;

struct _Batch {
  LpCliBuildFunc build;
  gpointer build_data;
  LpCliResult *results;
  Slot *slots;
  guint n, next, running, finished, n_failed;
  guint threads_each, concurrency;
  GMainLoop *loop;
  GCancellable *cancellable;
  int signal_number;
  gint64 start, last_draw;
  guint64 bytes_written;
  gboolean show_progress;
};

static void start_next (Batch *batch);

static void
draw_progress (Batch    *batch,
               gboolean  force)
{
  gint64 now = g_get_monotonic_time ();
  guint64 done = 0, total = 0;
  char done_s[32], total_s[32], rate_s[32];
  g_autoptr(GString) text = g_string_new (NULL);
  g_autofree char *line = NULL;
  double elapsed = (now - batch->start) / 1e6, fraction;

  if (!batch->show_progress || (!force && now - batch->last_draw < 100000))
    return;
  batch->last_draw = now;
  for (guint i = 0; i < batch->n; i++)
    {
      done += batch->slots[i].bytes_done;
      total += batch->slots[i].bytes_total;
    }
  lp_cli_format_bytes (done_s, sizeof done_s, done);
  lp_cli_format_bytes (total_s, sizeof total_s, total);
  lp_cli_format_bytes (rate_s, sizeof rate_s, elapsed > 0 ? done / elapsed : 0);
  if (batch->n == 1)
    {
      Slot *s = &batch->slots[0];
      fraction = s->bytes_total ? (double) s->bytes_done / s->bytes_total
                 : s->tensors_total ? (double) s->tensors_done / s->tensors_total : 0;
      g_string_printf (text, "%" G_GUINT64_FORMAT "/%" G_GUINT64_FORMAT " tensors, %s/%s, %s/s",
                       s->tensors_done, s->tensors_total, done_s, total_s, rate_s);
      if (done > 0 && done < total)
        g_string_append_printf (text, ", %.0f s left", (total - done) / (done / elapsed));
    }
  else
    {
      lp_cli_format_bytes (done_s, sizeof done_s, batch->bytes_written);
      fraction = (double) batch->finished / batch->n;
      g_string_printf (text, "%u/%u files, %s written, %.1f s", batch->finished, batch->n, done_s, elapsed);
      if (batch->n_failed)
        g_string_append_printf (text, ", %u failed", batch->n_failed);
    }
  line = lp_cli_fit_bar (text->str, fraction);
  lp_cli_draw_status (line);
}

static void
on_progress (LpPipeline *pipeline,
             guint64     tensors_done,
             guint64     tensors_total,
             guint64     bytes_done,
             guint64     bytes_total,
             gpointer    user_data)
{
  Slot *slot = user_data;

  slot->tensors_done = tensors_done;
  slot->tensors_total = tensors_total;
  slot->bytes_done = bytes_done;
  slot->bytes_total = bytes_total;
  draw_progress (slot->batch, FALSE);
}

static void
finish_slot (Slot    *slot,
             GError  *error)
{
  Batch *batch = slot->batch;
  LpCliResult *result = &batch->results[slot->index];

  result->seconds = (g_get_monotonic_time () - slot->start) / 1e6;
  if (error != NULL)
    {
      result->failure = g_strdup (batch->signal_number ? "interrupted; nothing was written" : error->message);
      batch->n_failed++;
    }
  g_clear_object (&slot->pipeline);   /* its file's mapping goes with it */
  batch->running--;
  batch->finished++;
  batch->bytes_written += result->out_bytes;
  draw_progress (batch, TRUE);
  start_next (batch);
  if (batch->running == 0)
    g_main_loop_quit (batch->loop);
}

/* One pipeline: run asynchronously, its progress marshalled to this thread. */
static void
on_run_done (GObject      *source,
             GAsyncResult *res,
             gpointer      user_data)
{
  Slot *slot = user_data;
  g_autoptr(GError) error = NULL;

  g_signal_handlers_disconnect_by_data (source, slot);
  if (lp_pipeline_run_finish (LP_PIPELINE (source), res, &error))
    lp_cli_collect_result (LP_PIPELINE (source), &slot->batch->results[slot->index]);
  finish_slot (slot, error);
}

/* Many: each run and its summary (reading the files' headers, parsing the
 * report) in a worker thread, so the main thread only builds the next. */
static void
run_and_collect (GTask        *task,
                 gpointer      source_object,
                 gpointer      task_data,
                 GCancellable *cancellable)
{
  Slot *slot = task_data;
  GError *error = NULL;

  if (!lp_pipeline_run (slot->pipeline, cancellable, &error))
    {
      g_task_return_error (task, error);
      return;
    }
  lp_cli_collect_result (slot->pipeline, &slot->batch->results[slot->index]);
  g_task_return_boolean (task, TRUE);
}

static void
on_job_done (GObject      *source,
             GAsyncResult *res,
             gpointer      user_data)
{
  Slot *slot = user_data;
  g_autoptr(GError) error = NULL;

  g_task_propagate_boolean (G_TASK (res), &error);
  finish_slot (slot, error);
}

/* Builds and starts pipelines until the threads are busy. Building one
 * (reading its input's header) in the main thread overlaps the runs. */
static void
start_next (Batch *batch)
{
  while (batch->running < batch->concurrency && batch->next < batch->n
         && !g_cancellable_is_cancelled (batch->cancellable))
    {
      guint i = batch->next++;
      Slot *slot = &batch->slots[i];

      slot->pipeline = batch->build (i, &batch->results[i], batch->build_data);
      if (slot->pipeline == NULL)
        {
          if (batch->results[i].failure == NULL)
            batch->results[i].failure = g_strdup ("not built");
          batch->n_failed++;
          batch->finished++;
          continue;
        }
      slot->batch = batch;
      slot->index = i;
      slot->start = g_get_monotonic_time ();
      lp_pipeline_set_threads (slot->pipeline, batch->threads_each);
      batch->running++;
      if (batch->n == 1)
        {
          if (batch->show_progress)
            g_signal_connect (slot->pipeline, "progress", G_CALLBACK (on_progress), slot);
          lp_pipeline_run_async (slot->pipeline, batch->cancellable, on_run_done, slot);
        }
      else
        {
          g_autoptr(GTask) task = g_task_new (NULL, batch->cancellable, on_job_done, slot);
          g_task_set_task_data (task, slot, NULL);
          g_task_run_in_thread (task, run_and_collect);
        }
    }
}

/* SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal went away) cancel the
 * runs: each removes its temporary file and leaves its output as it was. */
static void
on_signal (Batch *batch,
           int    signum)
{
  batch->signal_number = signum;
  g_cancellable_cancel (batch->cancellable);
}

static gboolean
on_sigint (gpointer user_data)
{
  on_signal (user_data, SIGINT);
  return G_SOURCE_CONTINUE;
}

static gboolean
on_sigterm (gpointer user_data)
{
  on_signal (user_data, SIGTERM);
  return G_SOURCE_CONTINUE;
}

static gboolean
on_sighup (gpointer user_data)
{
  on_signal (user_data, SIGHUP);
  return G_SOURCE_CONTINUE;
}

/* see lp_cli_run_jobs() */
#define FILES_IN_FLIGHT_PER_THREAD 4

/**
 * lp_cli_run_jobs:
 * @n: how many pipelines
 * @build: makes pipeline @index (validated, prepared with
 *   lp_cli_prepare_run()), or returns %NULL with the result's failure set
 * @results: one per pipeline, filled in
 *
 * Runs the pipelines side by side within --threads: with more files than
 * threads each pipeline computes one tensor at a time on one thread and up
 * to four pipelines per thread are in flight, so that waiting for the disk
 * overlaps computing (with --verbose one at a time, so their tables do not
 * mix); one file's failure does not stop the others. Ctrl-C, SIGTERM or
 * SIGHUP cancels them all (none leaves a partial file).
 *
 * Returns: the exit status: 0 if all succeeded, 1 if any failed, 129/130/143
 *   when interrupted by SIGHUP/SIGINT/SIGTERM
 */
int
lp_cli_run_jobs (guint           n,
                 LpCliBuildFunc  build,
                 gpointer        user_data,
                 LpCliResult    *results)
{
  Batch batch = { 0, };
  guint threads = lp_cli.threads > 0 ? (guint) lp_cli.threads : g_get_num_processors ();
  guint sigint_id, sigterm_id, sighup_id;

  batch.build = build;
  batch.build_data = user_data;
  batch.results = results;
  batch.n = n;
  batch.slots = g_new0 (Slot, n);
  /* Small files spend most of their time waiting for the disk (the sink
   * syncs each before renaming it), not computing: keep a few more files in
   * flight than there are threads so one file's sync overlaps another's
   * work. Each still computes one tensor at a time, so memory stays that of
   * a handful of tensors. (200 sd15 LoRAs: 2 in flight 2.2 s, 8 in flight
   * 0.55 s on 2 cores.) */
  batch.concurrency = lp_cli.verbose ? 1 : MAX (1u, MIN (n, threads * FILES_IN_FLIGHT_PER_THREAD));
  batch.threads_each = MAX (1u, threads / batch.concurrency);
  batch.loop = g_main_loop_new (NULL, FALSE);
  batch.cancellable = g_cancellable_new ();
  batch.start = g_get_monotonic_time ();
  batch.show_progress = !lp_cli.quiet && isatty (STDERR_FILENO);
  sigint_id = g_unix_signal_add (SIGINT, on_sigint, &batch);
  sigterm_id = g_unix_signal_add (SIGTERM, on_sigterm, &batch);
  sighup_id = g_unix_signal_add (SIGHUP, on_sighup, &batch);

  start_next (&batch);
  if (batch.running > 0)
    g_main_loop_run (batch.loop);

  g_source_remove (sigint_id);
  g_source_remove (sigterm_id);
  g_source_remove (sighup_id);
  lp_cli_clear_status ();
  for (guint i = batch.next; i < n; i++)
    {
      results[i].failure = g_strdup ("interrupted before it started");
      batch.n_failed++;
    }
  g_main_loop_unref (batch.loop);
  g_object_unref (batch.cancellable);
  g_free (batch.slots);

  if (batch.signal_number)
    return batch.signal_number == SIGINT ? EXIT_SIGINT
           : batch.signal_number == SIGHUP ? EXIT_SIGHUP : EXIT_SIGTERM;
  return batch.n_failed > 0 ? EXIT_FAILED : EXIT_OK;
}

static LpPipeline *
build_from_array (guint        index,
                  LpCliResult *result,
                  gpointer     user_data)
{
  return g_object_ref (((LpPipeline **) user_data)[index]);
}

/* The same, for pipelines already built. */
int
lp_cli_run_pipelines (LpPipeline  **pipelines,
                      LpCliResult  *results,
                      guint         n)
{
  return lp_cli_run_jobs (n, build_from_array, pipelines, results);
}

/* One pipeline (run, launch): its error, or its summary. */
int
lp_cli_run_pipeline (LpPipeline *pipeline)
{
  LpCliResult result = { 0, };
  int status;

  lp_cli_prepare_run (pipeline, &result);
  status = lp_cli_run_pipelines (&pipeline, &result, 1);
  if (result.failure)
    lp_cli_error ("%s", result.failure);
  else if (!lp_cli.quiet)
    lp_cli_print_summary (&result);
  lp_cli_result_clear (&result);
  return status;
}
