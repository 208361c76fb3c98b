/* test-error-origin.c: a tensor whose data fails to compute while the sink
 * pulls it is blamed on the stage that made it and the file it came from
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Stages return lazy tensors; their data is computed when the sink pulls
 * it. An error there used to carry the sink's name ("stage 3
 * 'safetensors-sink': module ...: NaN or infinity in the down factor") and
 * no file. It must name the stage that produced the tensor, the tensor and
 * the input file, and not the sink, which only pulled.
 */
#include "lp-test-util.h"

#include <math.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

static char *dir;

typedef struct {
  const char *name;
  guint64 rows, cols;   /* 0 cols: a 1-D tensor of @rows values */
  const float *values;
} Entry;

/* A safetensors file of F32 tensors, written as the format says (little
 * endian, header padded with spaces to 8 bytes). */
static char *
write_safetensors (const char  *file,
                   const Entry *entries,
                   guint        n)
{
  g_autoptr(GString) header = g_string_new ("{");
  g_autoptr(GByteArray) data = g_byte_array_new ();
  char *path = g_build_filename (dir, file, NULL);
  g_autoptr(GError) error = NULL;
  g_autoptr(GByteArray) out = g_byte_array_new ();
  guint64 len;

  for (guint i = 0; i < n; i++)
    {
      guint64 count = entries[i].rows * MAX (entries[i].cols, 1);
      if (entries[i].cols)
        g_string_append_printf (header, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%" G_GUINT64_FORMAT ",%"
                                G_GUINT64_FORMAT "],\"data_offsets\":[%u,%" G_GUINT64_FORMAT "]}",
                                i ? "," : "", entries[i].name, entries[i].rows, entries[i].cols,
                                data->len, data->len + count * 4);
      else
        g_string_append_printf (header, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%" G_GUINT64_FORMAT
                                "],\"data_offsets\":[%u,%" G_GUINT64_FORMAT "]}",
                                i ? "," : "", entries[i].name, entries[i].rows,
                                data->len, data->len + count * 4);
      g_byte_array_append (data, (const guint8 *) entries[i].values, count * 4);
    }
  g_string_append_c (header, '}');
  while (header->len % 8)
    g_string_append_c (header, ' ');
  len = GUINT64_TO_LE (header->len);
  g_byte_array_append (out, (const guint8 *) &len, 8);
  g_byte_array_append (out, (const guint8 *) header->str, header->len);
  g_byte_array_append (out, data->data, data->len);
  g_assert_true (g_file_set_contents (path, (const char *) out->data, out->len, &error));
  g_assert_no_error (error);
  return path;
}

/* A kohya LoRA module (lora_down [8, 64], lora_up [64, 8], alpha), the
 * down factor holding a NaN, as a diverged training run leaves it. */
#define MODULE "lora_unet_down_blocks_0_attentions_0_proj_in"

static char *
write_nan_lora (void)
{
  static float down[8 * 64], up[64 * 8], alpha[1] = { 4 };

  for (guint i = 0; i < G_N_ELEMENTS (down); i++)
    down[i] = up[i] = (float) ((i * 37 % 101) - 50) / 50.0f;
  down[3 * 64 + 5] = NAN;
  const Entry entries[] = {
    { MODULE ".alpha", 1, 0, alpha },
    { MODULE ".lora_down.weight", 8, 64, down },
    { MODULE ".lora_up.weight", 64, 8, up },
  };
  return write_safetensors ("nan.safetensors", entries, G_N_ELEMENTS (entries));
}

static GError *
run_failing (const char *description,
             guint       threads,
             GCallback   on_progress,
             gpointer    user_data)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (lp_test_registry ());
  GError *error = NULL;

  g_assert_true (lp_pipeline_parse_launch_string (pipeline, description, &error));
  g_assert_no_error (error);
  lp_pipeline_set_threads (pipeline, threads);
  if (on_progress)
    g_signal_connect (pipeline, "progress", on_progress, user_data);
  g_assert_false (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_nonnull (error);
  g_test_message ("%u threads: %s", threads, error->message);
  return error;
}

static void
assert_contains (const char *message,
                 const char *needle)
{
  if (strstr (message, needle) == NULL)
    g_error ("'%s' lacks '%s'", message, needle);
}

static guint
count (const char *haystack,
       const char *needle)
{
  guint n = 0;

  for (const char *p = strstr (haystack, needle); p; p = strstr (p + 1, needle))
    n++;
  return n;
}

/* lora-svd computes the factors when the sink asks for them: the NaN is
 * lora-svd's finding, in nan.safetensors, on the module's down factor. */
static void
test_nan_in_lora_svd (void)
{
  g_autofree char *in = write_nan_lora ();
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autofree char *description = g_strdup_printf (
    "safetensors-source location=%s ! lora-svd rank=2 ! safetensors-sink location=%s", in, out);

  for (guint threads = 1; threads <= 2; threads++)
    {
      g_autoptr(GError) error = run_failing (description, threads, NULL, NULL);

      g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC);
      g_assert_true (g_str_has_prefix (error->message, "launch: stage 2 'lora-svd': "));
      assert_contains (error->message, in);
      assert_contains (error->message, "tensor '" MODULE ".lora_");
      assert_contains (error->message, "NaN or infinity in the down factor");
      g_assert_null (strstr (error->message, "safetensors-sink"));
      g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
    }
}

/* Through a cast first: the cast's bf16 tensors are computed inside
 * lora-svd's, on the same worker; the failure is still lora-svd's, named
 * once, and the file is the one the chain read. */
static void
test_nan_through_cast (void)
{
  g_autofree char *in = write_nan_lora ();
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autofree char *description = g_strdup_printf (
    "safetensors-source location=%s ! cast dtype=bf16 ! lora-svd rank=2 ! safetensors-sink location=%s", in, out);
  g_autoptr(GError) error = run_failing (description, 2, NULL, NULL);

  g_assert_true (g_str_has_prefix (error->message, "launch: stage 3 'lora-svd': "));
  assert_contains (error->message, in);
  g_assert_cmpuint (count (error->message, "stage "), ==, 1);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
}

typedef struct {
  const char *path;
  goffset keep;
  gboolean done;
} Truncation;

/* The first progress report comes from the sink before it reads anything
 * (lp_stage_pull_tensors_unordered()); the file is cut there. */
static void
truncate_on_progress (LpPipeline *pipeline,
                      guint64     tensors_done,
                      guint64     tensors_total,
                      guint64     bytes_done,
                      guint64     bytes_total,
                      gpointer    user_data)
{
  Truncation *t = user_data;

  if (t->done)
    return;
  g_assert_cmpint (truncate (t->path, t->keep), ==, 0);
  t->done = TRUE;
}

/* The input is cut short after the source opened it: the read of the second
 * tensor, inside the cast's computation, fails. The read is the source's,
 * so the message names it, the file (once) and the tensor. */
static void
test_truncated_during_pull (void)
{
  static float first[256], second[256];
  const Entry entries[] = {
    { "model.layers.0.mlp.down_proj.weight", 16, 16, first },
    { "model.layers.0.mlp.up_proj.weight", 16, 16, second },
  };
  g_autofree char *in = write_safetensors ("cut.safetensors", entries, G_N_ELEMENTS (entries));
  g_autofree char *out = g_build_filename (dir, "cut-f16.safetensors", NULL);
  g_autofree char *description = g_strdup_printf (
    "safetensors-source location=%s ! cast dtype=f16 ! safetensors-sink location=%s", in, out);
  GStatBuf st;

  g_assert_cmpint (g_stat (in, &st), ==, 0);
  Truncation t = { in, st.st_size - 512, FALSE };   /* the second tensor's bytes go */
  g_autoptr(GError) error = run_failing (description, 1, G_CALLBACK (truncate_on_progress), &t);

  g_assert_true (t.done);
  g_assert_true (g_str_has_prefix (error->message, "launch: stage 1 'safetensors-source': "));
  g_assert_cmpuint (count (error->message, in), ==, 1);
  assert_contains (error->message, "model.layers.0.mlp.up_proj.weight");
  assert_contains (error->message, "the file was shortened while open");
  g_assert_null (strstr (error->message, "safetensors-sink"));
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
}

/* The same NaN through the CLI, which prints the message escaped and exits 1. */
static void
test_cli_message (void)
{
  g_autofree char *in = write_nan_lora ();
  g_autofree char *out = g_build_filename (dir, "cli.safetensors", NULL);
  g_autofree char *location_in = g_strconcat ("location=", in, NULL);
  g_autofree char *location_out = g_strconcat ("location=", out, NULL);
  const char *args[] = { "-q", "launch", "safetensors-source", location_in, "!", "lora-svd", "rank=2",
                         "!", "safetensors-sink", location_out, NULL };
  LpTestRun run = lp_test_spawn_lpipe (args, NULL);
  g_autofree char *err = NULL;
  int status = lp_test_wait_lpipe (&run, 60, &err);

  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 1);
  g_test_message ("%s", err);
  g_assert_true (g_str_has_prefix (err, "lpipe: error: launch: stage 2 'lora-svd': "));
  assert_contains (err, in);
  assert_contains (err, "tensor '" MODULE ".lora_");
  g_assert_null (strstr (err, "safetensors-sink"));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  dir = lp_test_make_tmpdir ();
  g_test_add_func ("/error-origin/nan-in-lora-svd", test_nan_in_lora_svd);
  g_test_add_func ("/error-origin/nan-through-cast", test_nan_through_cast);
  g_test_add_func ("/error-origin/truncated-during-pull", test_truncated_during_pull);
  g_test_add_func ("/error-origin/cli", test_cli_message);
  return g_test_run ();
}
