/* fuzz-launch.c: libFuzzer target for the inline `lpipe launch` syntax
 *
 * The input is split into words at whitespace, as a shell would hand them
 * over, and parsed; it must parse or fail with a GError.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <string.h>

#include <lpipe/lpipe.h>

int LLVMFuzzerTestOneInput (const guint8 *data, size_t size);

int
LLVMFuzzerTestOneInput (const guint8 *data,
                        size_t        size)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (NULL);
  g_autoptr(GError) error = NULL;
  g_autofree char *text = g_strndup ((const char *) data, size);
  g_auto(GStrv) words = NULL;

  /* Words with invalid UTF-8 are what a shell can pass too. */
  words = g_strsplit_set (text, " \t\n", -1);
  if (lp_pipeline_parse_launch (pipeline, (const char * const *) words, &error))
    {
      if (!lp_pipeline_validate (pipeline, &error))
        g_assert (error != NULL);
    }
  else
    g_assert (error != NULL && error->message != NULL);
  return 0;
}
