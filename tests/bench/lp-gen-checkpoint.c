/* lp-gen-checkpoint.c: writes a large random bf16 checkpoint for benchmarks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Usage: lp-gen-checkpoint OUTPUT.safetensors [MIB]
 *
 * Writes MIB mebibytes (default 2048) of bf16 tensors shaped like the
 * weights of one Flux double block (3072 wide, MLP 12288), repeated block
 * after block, with values of the size real weights have. The file is
 * written directly, in the format's canonical layout, so the benchmark does
 * not depend on the code it measures.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <glib.h>

static const struct {
  const char *suffix;
  guint64 rows, cols;   /* cols 0: a vector */
} block[] = {
  { "attn.to_q.weight", 3072, 3072 },
  { "attn.to_k.weight", 3072, 3072 },
  { "attn.to_v.weight", 3072, 3072 },
  { "attn.to_out.0.weight", 3072, 3072 },
  { "attn.to_out.0.bias", 3072, 0 },
  { "ff.net.0.proj.weight", 12288, 3072 },
  { "ff.net.0.proj.bias", 12288, 0 },
  { "ff.net.2.weight", 3072, 12288 },
  { "norm1.linear.weight", 18432, 3072 },
};

static guint64
xorshift64 (guint64 *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

int
main (int argc, char **argv)
{
  if (argc < 2)
    {
      g_printerr ("usage: %s OUTPUT.safetensors [MIB]\n", argv[0]);
      return 2;
    }
  guint64 budget = (argc > 2 ? g_ascii_strtoull (argv[2], NULL, 10) : 2048) << 20;
  GString *header = g_string_new ("{\"__metadata__\":{\"format\":\"pt\",\"generator\":\"lp-gen-checkpoint\"}");
  guint64 offset = 0;

  /* whole blocks until the budget is reached */
  for (guint b = 0; offset < budget; b++)
    {
      for (guint t = 0; t < G_N_ELEMENTS (block) && offset < budget; t++)
        {
          guint64 n = block[t].rows * (block[t].cols ? block[t].cols : 1);
          if (block[t].cols)
            g_string_append_printf (header,
                                    ",\"transformer_blocks.%u.%s\":{\"dtype\":\"BF16\",\"shape\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "],\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}",
                                    b, block[t].suffix, block[t].rows, block[t].cols, offset, offset + 2 * n);
          else
            g_string_append_printf (header,
                                    ",\"transformer_blocks.%u.%s\":{\"dtype\":\"BF16\",\"shape\":[%" G_GUINT64_FORMAT "],\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}",
                                    b, block[t].suffix, block[t].rows, offset, offset + 2 * n);
          offset += 2 * n;
        }
    }
  g_string_append_c (header, '}');
  while (header->len % 8)
    g_string_append_c (header, ' ');

  FILE *f = fopen (argv[1], "wb");
  if (f == NULL)
    {
      g_printerr ("%s: %s\n", argv[1], g_strerror (errno));
      return 1;
    }
  guint64 n_header = GUINT64_TO_LE (header->len);
  fwrite (&n_header, 8, 1, f);
  fwrite (header->str, 1, header->len, f);

  /* bf16 with |x| in [2^-12, 2^-2): sign, exponent 115..124, random mantissa */
  enum { CHUNK = 1 << 19 };
  guint16 *buf = g_new (guint16, CHUNK);
  guint64 s = 0x2545f4914f6cdd1d;
  for (guint64 left = offset / 2; left > 0;)
    {
      gsize k = MIN (left, CHUNK);
      for (gsize i = 0; i < k; i += 2)
        {
          guint64 r = xorshift64 (&s);
          guint32 e0 = 115 + (guint32) ((r >> 8) & 0xff) % 10;
          guint32 e1 = 115 + (guint32) ((r >> 40) & 0xff) % 10;
          buf[i] = (guint16) (((r & 1) << 15) | (e0 << 7) | ((r >> 16) & 0x7f));
          if (i + 1 < k)
            buf[i + 1] = (guint16) ((((r >> 1) & 1) << 15) | (e1 << 7) | ((r >> 48) & 0x7f));
        }
      if (fwrite (buf, 2, k, f) != k)
        {
          g_printerr ("%s: write failed\n", argv[1]);
          return 1;
        }
      left -= k;
    }
  if (fclose (f) != 0)
    {
      g_printerr ("%s: %s\n", argv[1], g_strerror (errno));
      return 1;
    }
  g_print ("%s: %" G_GUINT64_FORMAT " bytes of data\n", argv[1], offset);
  g_free (buf);
  g_string_free (header, TRUE);
  return 0;
}
