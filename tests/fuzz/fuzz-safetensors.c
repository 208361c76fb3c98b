/* fuzz-safetensors.c: libFuzzer target for the safetensors reader
 *
 * Every input must be either rejected with a GError or accepted as a
 * checkpoint whose tensors' data can all be read; never a crash, a hang or
 * an out-of-bounds read (AddressSanitizer watches).
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <lpipe/lpipe.h>

int LLVMFuzzerTestOneInput (const guint8 *data, size_t size);

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
  g_assert (error == NULL);
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (ckpt); i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      g_autoptr(GBytes) d = lp_tensor_dup_data (t, NULL);
      volatile guint8 sink = 0;
      gsize len;
      const guint8 *p = g_bytes_get_data (d, &len);

      g_assert (len == lp_tensor_get_n_bytes (t));
      /* Touch the first and last byte: out of bounds would be caught. */
      if (len > 0)
        sink ^= p[0] ^ p[len - 1];
      (void) sink;
    }
  return 0;
}
