/* fuzz-stages.c: libFuzzer target for the stage chains on fuzzed files
 *
 * Each input is read as a safetensors file; whatever the reader accepts
 * goes through every chain below, the way a sink would pull it: each
 * tensor's data is computed. Every chain must end in its output or in a
 * GError with a message; never a crash, a NULL without an error, a hang or
 * an out-of-bounds access (AddressSanitizer watches). The chains cover the
 * reduction methods and criteria, projection, cast, the rename presets,
 * merging and the rank check.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <lpipe/lpipe.h>

#include <string.h>

int LLVMFuzzerTestOneInput (const guint8 *data, size_t size);

/* One stage: its name and NAME=VALUE properties; an aggregator (n_inputs
 * 2) is given the stage's input twice, rank-check the input and itself. */
typedef struct {
  const char *name;
  guint n_inputs;
  const char *props[6];
} Step;

typedef struct {
  Step steps[3];
} Chain;

static const Chain chains[] = {
  { { { "lora-svd", 1, { "rank=2" } } } },
  { { { "lora-svd", 1, { "rank=3", "method=randomized", "niter=1", "oversample=2" } } } },
  { { { "lora-svd", 1, { "energy=0.9" } } } },
  { { { "lora-svd", 1, { "sv-ratio=10" } } } },
  { { { "lora-svd", 1, { "sv-fro=0.9" } } } },
  { { { "lora-svd", 1, { "sv-cumulative=0.9" } } } },
  { { { "lora-svd", 1, { "budget=8" } } } },
  { { { "lora-svd", 1, { "budget=8", "method=randomized" } } } },
  { { { "lora-project", 1, { "rank=2" } } } },
  { { { "lora-project", 1, { "rank=2", "projection=sparse" } } } },
  { { { "cast", 1, { "dtype=bf16" } } } },
  { { { "cast", 1, { "dtype=f8-e4m3", "allow-overflow=true" } } } },
  { { { "cast", 1, { "dtype=f64" } } } },
  { { { "rename", 1, { "preset=flux-kohya-to-diffusers" } } } },
  { { { "rename", 1, { "preset=sd-kohya-to-diffusers" } } } },
  { { { "rename", 1, { "preset=sd-diffusers-to-kohya" } } } },
  { { { "rename", 1, { "preset=peft-to-kohya" } } } },
  { { { "rename", 1, { "preset=kohya-to-peft" } } } },
  { { { "lora-merge", 2, { "weights=0.5,2" } } } },
  { { { "rank-check", 1, { "quiet=true" } } } },
  { { { "lora-svd", 1, { "rank=1" } }, { "rank-check", 2, { "quiet=true", "expect-rank=1" } } } },
};

static LpRegistry *
registry (void)
{
  static LpRegistry *r;

  if (r == NULL)
    r = lp_registry_get_default ();
  return r;
}

/* Computes every tensor of @ckpt, as a sink would. */
static gboolean
pull_all (LpCheckpoint  *ckpt,
          GError       **error)
{
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (ckpt); i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      g_autoptr(GBytes) d = lp_tensor_dup_data (t, error);

      if (d == NULL)
        return FALSE;
      g_assert (g_bytes_get_size (d) == lp_tensor_get_n_bytes (t));
    }
  return TRUE;
}

static void
run_chain (const Chain  *chain,
           LpCheckpoint *input)
{
  g_autoptr(LpCheckpoint) current = g_object_ref (input);

  for (guint s = 0; s < G_N_ELEMENTS (chain->steps) && chain->steps[s].name; s++)
    {
      const Step *step = &chain->steps[s];
      g_autoptr(LpStage) stage = lp_registry_create_stage (registry (), step->name, NULL);
      g_autoptr(GError) error = NULL;
      LpCheckpoint *inputs[2] = { current, step->n_inputs == 2 && s > 0 ? input : current };
      LpCheckpoint *output = NULL;
      gboolean ok;

      g_assert (stage != NULL);
      lp_stage_set_threads (stage, 1);
      for (guint p = 0; p < G_N_ELEMENTS (step->props) && step->props[p]; p++)
        {
          const char *eq = strchr (step->props[p], '=');
          g_autofree char *name = g_strndup (step->props[p], eq - step->props[p]);
          g_assert (lp_stage_set_property_from_string (stage, name, eq + 1, NULL));
        }
      if (step->n_inputs == 2 && s > 0)
        {
          /* rank-check: the original first, the reduced second */
          inputs[0] = input;
          inputs[1] = current;
        }
      ok = lp_stage_prepare (stage, &error) &&
           lp_stage_run (stage, inputs, step->n_inputs, &output, &error);
      if (!ok)
        {
          g_assert (error != NULL && error->message != NULL && output == NULL);
          return;
        }
      g_assert (error == NULL);
      if (output == NULL)
        return;   /* a stage that only reports */
      g_clear_object (&current);
      current = output;
      if (!pull_all (current, &error))
        {
          g_assert (error != NULL && error->message != NULL);
          return;
        }
    }
}

int
LLVMFuzzerTestOneInput (const guint8 *data,
                        size_t        size)
{
  g_autoptr(GBytes) bytes = g_bytes_new (data, size);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) ckpt = lp_safetensors_load_from_bytes (bytes, "fuzz.safetensors", &error);

  if (ckpt == NULL)
    {
      g_assert (error != NULL && error->message != NULL);
      return 0;
    }
  for (guint i = 0; i < G_N_ELEMENTS (chains); i++)
    run_chain (&chains[i], ckpt);
  return 0;
}
