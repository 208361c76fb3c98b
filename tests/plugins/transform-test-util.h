/* transform-test-util.h: what the transform stages' tests share
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include "lp-test-util.h"

/* lora-synth with name, value pairs, asserting success */
#define synth(...) run_ok ("lora-synth", NULL, 0, __VA_ARGS__, NULL)

static inline LpCheckpoint *
run_ok_v (const char    *stage,
          LpCheckpoint **inputs,
          guint          n_inputs,
          const char    *first,
          va_list        args)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpStage) s = lp_registry_create_stage (lp_test_registry (), stage, &error);
  const char *name = first;
  LpCheckpoint *output = NULL;

  g_assert_no_error (error);
  while (name != NULL)
    {
      const char *value = va_arg (args, const char *);
      lp_stage_set_property_from_string (s, name, value, &error);
      g_assert_no_error (error);
      name = va_arg (args, const char *);
    }
  lp_stage_prepare (s, &error);
  g_assert_no_error (error);
  lp_stage_run (s, inputs, n_inputs, &output, &error);
  g_assert_no_error (error);
  return output;
}

static inline G_GNUC_NULL_TERMINATED LpCheckpoint *
run_ok (const char    *stage,
        LpCheckpoint **inputs,
        guint          n_inputs,
        const char    *first,
        ...)
{
  va_list args;
  LpCheckpoint *output;

  va_start (args, first);
  output = run_ok_v (stage, inputs, n_inputs, first, args);
  va_end (args);
  return output;
}

/* One input through a stage */
#define run1(stage, input, ...) run_ok (stage, (LpCheckpoint *[]) { input }, 1, __VA_ARGS__, NULL)

/* The transform plugin's warnings go through GLib's structured log, which
 * g_test_expect_message() does not see: a test that expects one sets
 * expected_warning (a g_pattern_match_simple() pattern) around the stage,
 * and the writer counts the warnings it matches. Any other warning stays
 * fatal, as g_test_init() makes it. Call capture_warnings() after
 * g_test_init(). */
static const char *expected_warning;
static guint n_expected_warnings;

static inline GLogWriterOutput
expected_warning_writer (GLogLevelFlags   level,
                         const GLogField *fields,
                         gsize            n_fields,
                         gpointer         user_data)
{
  const char *message = NULL;

  for (gsize i = 0; i < n_fields; i++)
    if (g_str_equal (fields[i].key, "MESSAGE"))
      message = fields[i].value;
  if ((level & G_LOG_LEVEL_WARNING) && expected_warning != NULL && message != NULL
      && g_pattern_match_simple (expected_warning, message))
    {
      g_atomic_int_inc (&n_expected_warnings);
      return G_LOG_WRITER_HANDLED;
    }
  g_log_writer_default (level, fields, n_fields, user_data);
  if (level & (G_LOG_LEVEL_WARNING | G_LOG_LEVEL_CRITICAL))
    g_error ("unexpected warning");
  return G_LOG_WRITER_HANDLED;
}

static inline void
capture_warnings (void)
{
  g_log_set_always_fatal (G_LOG_FATAL_MASK);
  g_log_set_writer_func (expected_warning_writer, NULL, NULL);
}

/* rename preset=peft-to-kohya, which warns that the PEFT adapter config is
 * not carried to the kohya names (the .alpha tensors keep the scales). */
static inline LpCheckpoint *
peft_to_kohya (LpCheckpoint *peft)
{
  LpCheckpoint *kohya;

  expected_warning = "rename preset=peft-to-kohya: the input's adapter_config.json is not written "
                     "beside the output, whose kohya names keep every module's scale in its .alpha tensor";
  n_expected_warnings = 0;
  kohya = run1 ("rename", peft, "preset", "peft-to-kohya");
  g_assert_cmpuint (n_expected_warnings, ==, 1);
  expected_warning = NULL;
  return kohya;
}

/* Writes @checkpoint to DIR/NAME.safetensors; returns the path. */
static inline char *
write_file (LpCheckpoint *checkpoint,
            const char   *dir,
            const char   *name)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *file = g_strconcat (name, ".safetensors", NULL);
  char *path = g_build_filename (dir, file, NULL);

  lp_test_run_stage ("safetensors-sink", &checkpoint, 1, &error, "location", path, NULL);
  g_assert_no_error (error);
  return path;
}

/* Runs the numpy oracle with its arguments (NULL-terminated), asserting it passes. */
static inline G_GNUC_NULL_TERMINATED void
oracle (const char *first,
        ...)
{
  g_autoptr(GPtrArray) argv = g_ptr_array_new ();
  g_autofree char *out = NULL;
  va_list args;

  g_ptr_array_add (argv, "plugins/lora_oracle.py");
  va_start (args, first);
  for (const char *a = first; a != NULL; a = va_arg (args, const char *))
    g_ptr_array_add (argv, (char *) a);
  va_end (args);
  g_ptr_array_add (argv, NULL);
  out = lp_test_run_python ((const char * const *) argv->pdata);
  g_test_message ("oracle: %s", out);
}

/* A kohya-style linear module with deterministic values (alpha when > 0). */
static inline void
add_module (LpCheckpoint *checkpoint,
            const char   *name,
            const char   *down_suffix,
            const char   *up_suffix,
            guint64       in,
            guint64       out,
            guint64       rank,
            double        alpha)
{
  g_autoptr(GError) error = NULL;
  g_autofree float *values = g_new (float, MAX (in, out) * rank);
  g_autofree char *down_name = g_strconcat (name, down_suffix, NULL);
  g_autofree char *up_name = g_strconcat (name, up_suffix, NULL);
  guint64 down_shape[2] = { rank, in }, up_shape[2] = { out, rank };
  g_autoptr(LpTensor) down = NULL, up = NULL;

  for (guint64 i = 0; i < MAX (in, out) * rank; i++)
    values[i] = 0.01f * (float) ((i * 7 + strlen (name)) % 13) - 0.05f;
  if (alpha > 0)
    {
      g_autofree char *alpha_name = g_strconcat (name, ".alpha", NULL);
      float a = alpha;
      g_autoptr(LpTensor) t = lp_test_tensor (alpha_name, LP_DTYPE_F32, NULL, 0, &a);
      lp_checkpoint_add_tensor (checkpoint, t, &error);
      g_assert_no_error (error);
    }
  down = lp_test_tensor (down_name, LP_DTYPE_F32, down_shape, 2, values);
  up = lp_test_tensor (up_name, LP_DTYPE_F32, up_shape, 2, values);
  lp_checkpoint_add_tensor (checkpoint, down, &error);
  g_assert_no_error (error);
  lp_checkpoint_add_tensor (checkpoint, up, &error);
  g_assert_no_error (error);
}

#define add_kohya(c, name, in, out, rank) \
  add_module (c, name, ".lora_down.weight", ".lora_up.weight", in, out, rank, rank)
#define add_diffusers(c, name, in, out, rank) \
  add_module (c, name, ".lora_A.weight", ".lora_B.weight", in, out, rank, 0)

/* Runs @stage expecting an error of @domain and @code whose message holds
 * each of the NULL-terminated @needles. */
static inline void
expect_error (const char    *stage,
              LpCheckpoint **inputs,
              guint          n_inputs,
              const char   **props,
              GQuark         domain,
              int            code,
              const char   **needles)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpStage) s = lp_registry_create_stage (lp_test_registry (), stage, &error);
  g_autoptr(LpCheckpoint) output = NULL;
  gboolean ok;

  g_assert_no_error (error);
  for (guint i = 0; props && props[i]; i += 2)
    {
      lp_stage_set_property_from_string (s, props[i], props[i + 1], &error);
      g_assert_no_error (error);
    }
  ok = lp_stage_prepare (s, &error) && lp_stage_run (s, inputs, n_inputs, &output, &error);
  g_assert_false (ok);
  g_assert_error (error, domain, code);
  for (guint i = 0; needles && needles[i]; i++)
    if (strstr (error->message, needles[i]) == NULL)
      g_error ("error '%s' does not mention '%s'", error->message, needles[i]);
  g_test_message ("%s: %s", stage, error->message);
}

#define STRS(...) ((const char *[]) { __VA_ARGS__, NULL })
