/* fuzz-pipeline.c: libFuzzer target for the pipeline-file loader
 *
 * Loads (never runs) arbitrary pipeline text against the real stages: it
 * must load or fail with a GError, and a loaded pipeline must validate or
 * fail cleanly.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <lpipe/lpipe.h>

int LLVMFuzzerTestOneInput (const guint8 *data, size_t size);

int
LLVMFuzzerTestOneInput (const guint8 *data,
                        size_t        size)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (NULL);
  g_autoptr(GError) error = NULL;
  const char *params[] = { "rank=3", NULL };

  if (lp_pipeline_load_from_data (pipeline, (const char *) data, size, "fuzz.pipeline", params, &error))
    {
      if (!lp_pipeline_validate (pipeline, &error))
        g_assert (error != NULL);
    }
  else
    g_assert (error != NULL && error->message != NULL);
  return 0;
}
