/* test-safetensors.c: the safetensors reader's checks, the writer, atomic output
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib/gstdio.h>

/* ---- helpers ----------------------------------------------------------- */

/* A file made of an 8-byte length (the header's, or @fake_len), the header
 * and @data_len bytes of a pattern. */
static GBytes *
make_file_full (const char *header,
                gsize       header_len,
                gboolean    use_fake_len,
                guint64     fake_len,
                gsize       data_len)
{
  GByteArray *a = g_byte_array_new ();
  guint64 n = use_fake_len ? fake_len : header_len;

  for (int i = 0; i < 8; i++)
    {
      guint8 b = (n >> (8 * i)) & 0xff;
      g_byte_array_append (a, &b, 1);
    }
  g_byte_array_append (a, (const guint8 *) header, header_len);
  for (gsize i = 0; i < data_len; i++)
    {
      guint8 b = (i * 7 + 1) & 0xff;
      g_byte_array_append (a, &b, 1);
    }
  return g_byte_array_free_to_bytes (a);
}

static GBytes *
make_file (const char *header,
           gsize       data_len)
{
  return make_file_full (header, strlen (header), FALSE, 0, data_len);
}

static char *
make_tmpdir (void)
{
  g_autoptr(GError) error = NULL;
  char *dir = g_dir_make_tmp ("lpipe-test-safetensors-XXXXXX", &error);

  g_assert_no_error (error);
  return dir;
}

static void
remove_tree (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  const char *name;

  if (d == NULL)
    return;
  while ((name = g_dir_read_name (d)) != NULL)
    {
      g_autofree char *path = g_build_filename (dir, name, NULL);
      g_unlink (path);
    }
  g_dir_close (d);
  g_rmdir (dir);
}

static guint
count_entries (const char *dir)
{
  GDir *d = g_dir_open (dir, 0, NULL);
  guint n = 0;

  g_assert_nonnull (d);
  while (g_dir_read_name (d) != NULL)
    n++;
  g_dir_close (d);
  return n;
}

static GBytes *
read_file (const char *path)
{
  g_autoptr(GError) error = NULL;
  char *contents;
  gsize len;

  g_file_get_contents (path, &contents, &len, &error);
  g_assert_no_error (error);
  return g_bytes_new_take (contents, len);
}

static void
write_file (const char    *path,
            GBytes        *bytes)
{
  g_autoptr(GError) error = NULL;
  gsize len;
  const char *p = g_bytes_get_data (bytes, &len);

  g_file_set_contents (path, p, len, &error);
  g_assert_no_error (error);
}

static LpTensor *
make_tensor (const char    *name,
             LpDtype        dtype,
             const guint64 *shape,
             guint          n_dims,
             guint8         seed)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = NULL;
  guint64 n = lp_dtype_get_bits (dtype);
  guint8 *buf;
  LpTensor *tensor;

  for (guint i = 0; i < n_dims; i++)
    n *= shape[i];
  n /= 8;
  buf = g_malloc (n + 1);
  for (guint64 i = 0; i < n; i++)
    buf[i] = (guint8) (seed + i * 13);
  bytes = g_bytes_new_take (buf, n);
  tensor = lp_tensor_new (name, dtype, shape, n_dims, bytes, &error);
  g_assert_no_error (error);
  return tensor;
}

static GBytes *
zeros (LpTensor *tensor,
       gpointer  user_data,
       GError  **error)
{
  gsize n = lp_tensor_get_n_bytes (tensor);

  return g_bytes_new_take (g_malloc0 (n), n);
}

static void
assert_same_checkpoint (LpCheckpoint *a,
                        LpCheckpoint *b)
{
  g_auto(GStrv) keys_a = lp_checkpoint_dup_metadata_keys (a);
  g_auto(GStrv) keys_b = lp_checkpoint_dup_metadata_keys (b);

  g_assert_cmpuint (lp_checkpoint_get_n_tensors (a), ==, lp_checkpoint_get_n_tensors (b));
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (a); i++)
    {
      g_autoptr(GError) error = NULL;
      LpTensor *x = lp_checkpoint_get_tensor (a, i);
      LpTensor *y = lp_checkpoint_get_tensor (b, i);
      guint nx, ny;
      const guint64 *sx = lp_tensor_get_shape (x, &nx);
      const guint64 *sy = lp_tensor_get_shape (y, &ny);
      g_autoptr(GBytes) dx = lp_tensor_dup_data (x, &error);
      g_autoptr(GBytes) dy = NULL;

      g_assert_no_error (error);
      dy = lp_tensor_dup_data (y, &error);
      g_assert_no_error (error);
      g_assert_cmpstr (lp_tensor_get_name (x), ==, lp_tensor_get_name (y));
      g_assert_cmpint (lp_tensor_get_dtype (x), ==, lp_tensor_get_dtype (y));
      g_assert_cmpmem (sx, nx * sizeof (guint64), sy, ny * sizeof (guint64));
      g_assert_true (g_bytes_equal (dx, dy));
    }
  g_assert_cmpstrv (keys_a, keys_b);
  for (guint i = 0; keys_a[i]; i++)
    g_assert_cmpstr (lp_checkpoint_get_metadata (a, keys_a[i]), ==,
                     lp_checkpoint_get_metadata (b, keys_a[i]));
}

/* ---- the bad-file table ------------------------------------------------ */

#define T(dtype, shape, offsets) "{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offsets "}"
#define ONE(entry) "{\"t\":" entry "}"

typedef struct {
  const char *name;
  const char *header;
  gssize header_len;            /* -1: strlen */
  gsize data_len;
  int code;
  gboolean use_fake_len;
  guint64 fake_len;
  char *(*generate) (gsize *len);
  gboolean raw;                 /* the header is the whole file */
} BadCase;

static char *
generate_array_bomb (gsize *len)
{
  *len = 100000;
  return g_strnfill (*len, '[');
}

static char *
generate_object_bomb (gsize *len)
{
  GString *s = g_string_new ("{\"__metadata__\":");
  for (guint i = 0; i < 100000; i++)
    g_string_append (s, "{\"a\":");
  *len = s->len;
  return g_string_free (s, FALSE);
}

static char *
generate_too_many_dims (gsize *len)
{
  char *s = g_strdup (ONE (T ("U8", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]", "[0,1]")));
  *len = strlen (s);
  return s;
}

static const BadCase bad_cases[] = {
  /* 1. the length prefix */
  { "empty-file", "", 0, 0, LP_FORMAT_ERROR_TRUNCATED, .raw = TRUE },
  { "too-short", "\x02\0\0\0\0\0\0", 7, 0, LP_FORMAT_ERROR_TRUNCATED, .raw = TRUE },
  { "header-length-zero", "{}", -1, 0, LP_FORMAT_ERROR_HEADER_SIZE, TRUE, 0 },
  { "header-too-large", "{}", -1, 0, LP_FORMAT_ERROR_HEADER_SIZE, TRUE, 100000001 },
  { "header-length-overflow", "{}", -1, 0, LP_FORMAT_ERROR_HEADER_SIZE, TRUE, G_MAXUINT64 },
  { "header-length-overflow-8", "{}", -1, 0, LP_FORMAT_ERROR_HEADER_SIZE, TRUE, G_MAXUINT64 - 7 },
  { "header-length-past-eof", "{}", -1, 0, LP_FORMAT_ERROR_TRUNCATED, TRUE, 10 },
  { "header-length-at-limit-past-eof", "{}", -1, 0, LP_FORMAT_ERROR_TRUNCATED, TRUE, 100000000 },
  { "header-length-short", ONE (T ("U8", "[1]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX, TRUE,
    sizeof (ONE (T ("U8", "[1]", "[0,1]"))) - 2 },

  /* 2. encoding */
  { "utf8-overlong-2", "{\"__metadata__\":{\"k\":\"\xc0\xaf\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-overlong-3", "{\"__metadata__\":{\"k\":\"\xe0\x80\xaf\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-overlong-4", "{\"__metadata__\":{\"k\":\"\xf0\x80\x80\xaf\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-surrogate", "{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-above-max", "{\"__metadata__\":{\"k\":\"\xf4\x90\x80\x80\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-f5", "{\"__metadata__\":{\"k\":\"\xf5\x80\x80\x80\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-lone-continuation", "{\"__metadata__\":{\"k\":\"\x80\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-truncated", "{\"__metadata__\":{\"k\":\"\xe2\x82\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "utf8-cut-at-end", "{}\xe2\x82", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "escaped-lone-high-surrogate", "{\"__metadata__\":{\"k\":\"\\ud800\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "escaped-lone-low-surrogate", "{\"__metadata__\":{\"k\":\"\\udc00\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "escaped-reversed-surrogates", "{\"__metadata__\":{\"k\":\"\\udc00\\ud800\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "name-with-nul", "{\"a\\u0000b\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "metadata-value-with-nul", "{\"__metadata__\":{\"k\":\"a\\u0000\"}}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "dtype-with-nul", ONE (T ("F32\\u0000", "[1]", "[0,4]")), -1, 4, LP_FORMAT_ERROR_ENCODING },

  /* 3. syntax */
  { "empty-header", "        ", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "trailing-comma", "{\"__metadata__\":{\"a\":\"b\"},}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "trailing-comma-metadata", "{\"__metadata__\":{\"a\":\"b\",}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "trailing-comma-shape", ONE (T ("U8", "[1,]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "trailing-comma-entry", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],}}", -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "comment-block", "{/* x */}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "comment-line", "{}// x\n", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "comment-hash", "{}# x\n", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "nan", ONE (T ("U8", "[NaN]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "infinity", ONE (T ("U8", "[Infinity]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "leading-zero", ONE (T ("U8", "[01]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "leading-zero-offsets", ONE (T ("U8", "[1]", "[00,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "leading-plus", ONE (T ("U8", "[+1]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "hex-number", ONE (T ("U8", "[0x1]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "bare-minus", ONE (T ("U8", "[-]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "dot-without-digits", ONE (T ("U8", "[1.]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "exponent-without-digits", ONE (T ("U8", "[1e]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SYNTAX },
  { "control-char-newline", "{\"__metadata__\":{\"a\":\"b\nc\"}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "control-char-tab", "{\"__metadata__\":{\"a\":\"b\tc\"}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "control-char-in-name", "{\"a\x01\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "bad-escape", "{\"__metadata__\":{\"a\":\"\\x41\"}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "bad-unicode-escape", "{\"__metadata__\":{\"a\":\"\\u12G4\"}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "unterminated-string", "{\"__metadata__\":{\"a\":\"b}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "unterminated-object", "{\"__metadata__\":{\"a\":\"b\"}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "second-object", "{}{}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "second-value", "{} 1", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "bom", "\xef\xbb\xbf{}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "nul-padding", "{}\0\0\0\0\0\0", 8, 0, LP_FORMAT_ERROR_SYNTAX },
  { "nul-before", "\0{}", 3, 0, LP_FORMAT_ERROR_SYNTAX },
  { "formfeed-padding", "{}\f", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "vertical-tab-padding", "{}\v", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "nbsp-padding", "{}\xc2\xa0", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "single-quotes", "{'__metadata__':{}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "unquoted-key", "{__metadata__:{}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "missing-colon", "{\"__metadata__\" {}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "missing-comma", "{\"__metadata__\":{\"a\":\"b\" \"c\":\"d\"}}", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "top-level-array", "[]", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "top-level-string", "\"{}\"", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "top-level-null", "null", -1, 0, LP_FORMAT_ERROR_SYNTAX },
  { "depth-bomb-array", NULL, 0, 0, LP_FORMAT_ERROR_TOO_DEEP, FALSE, 0, generate_array_bomb },
  { "depth-bomb-object", NULL, 0, 0, LP_FORMAT_ERROR_TOO_DEEP, FALSE, 0, generate_object_bomb },

  /* 4. entries */
  { "entry-array", "{\"t\":[1,2]}", -1, 0, LP_FORMAT_ERROR_ENTRY },
  { "entry-string", "{\"t\":\"F32\"}", -1, 0, LP_FORMAT_ERROR_ENTRY },
  { "entry-null", "{\"t\":null}", -1, 0, LP_FORMAT_ERROR_ENTRY },
  { "entry-number", "{\"t\":1}", -1, 0, LP_FORMAT_ERROR_ENTRY },
  { "entry-empty", "{\"t\":{}}", -1, 0, LP_FORMAT_ERROR_ENTRY },
  { "missing-dtype", "{\"t\":{\"shape\":[1],\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "missing-shape", "{\"t\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "missing-offsets", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "duplicate-dtype", "{\"t\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "duplicate-shape", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"shape\":[1],\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "duplicate-offsets", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "unknown-key", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"strides\":[1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "dtype-number", "{\"t\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}}", -1, 1, LP_FORMAT_ERROR_ENTRY },
  { "unknown-dtype", ONE (T ("F128", "[1]", "[0,16]")), -1, 16, LP_FORMAT_ERROR_DTYPE },
  { "lowercase-dtype", ONE (T ("f32", "[1]", "[0,4]")), -1, 4, LP_FORMAT_ERROR_DTYPE },
  { "empty-dtype", ONE (T ("", "[1]", "[0,4]")), -1, 4, LP_FORMAT_ERROR_DTYPE },
  { "dtype-with-space", ONE (T ("F32 ", "[1]", "[0,4]")), -1, 4, LP_FORMAT_ERROR_DTYPE },
  { "shape-float", ONE (T ("U8", "[1.0]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-exponent", ONE (T ("U8", "[1e0]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-string", ONE (T ("U8", "[\"1\"]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-nested", ONE (T ("U8", "[[1]]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-negative", ONE (T ("U8", "[-1]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-negative-zero", ONE (T ("U8", "[-0]", "[0,0]")), -1, 0, LP_FORMAT_ERROR_SHAPE },
  { "shape-bool", ONE (T ("U8", "[true]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-null", ONE (T ("U8", "null", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-number", ONE (T ("U8", "1", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-above-u64", ONE (T ("U8", "[18446744073709551616]", "[0,1]")), -1, 1, LP_FORMAT_ERROR_SHAPE },
  { "shape-too-many-dims", NULL, 0, 1, LP_FORMAT_ERROR_SHAPE, FALSE, 0, generate_too_many_dims },
  { "offsets-one", ONE (T ("U8", "[1]", "[0]")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-three", ONE (T ("U8", "[1]", "[0,1,1]")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-empty", ONE (T ("U8", "[0]", "[]")), -1, 0, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-negative", ONE (T ("U8", "[1]", "[-1,0]")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-float", ONE (T ("U8", "[1]", "[0,1.0]")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-string", ONE (T ("U8", "[1]", "[0,\"1\"]")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-object", ONE (T ("U8", "[1]", "{\"begin\":0,\"end\":1}")), -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-above-u64", ONE (T ("U8", "[0]", "[18446744073709551616,18446744073709551616]")), -1, 0, LP_FORMAT_ERROR_OFFSETS },

  /* 5. tiling */
  { "first-begin-not-zero", ONE (T ("U8", "[4]", "[4,8]")), -1, 8, LP_FORMAT_ERROR_OFFSETS },
  { "gap", "{\"a\":" T ("U8", "[4]", "[0,4]") ",\"b\":" T ("U8", "[4]", "[8,12]") "}", -1, 12, LP_FORMAT_ERROR_OFFSETS },
  { "overlap", "{\"a\":" T ("U8", "[8]", "[0,8]") ",\"b\":" T ("U8", "[8]", "[4,12]") "}", -1, 12, LP_FORMAT_ERROR_OFFSETS },
  { "same-range", "{\"a\":" T ("U8", "[8]", "[0,8]") ",\"b\":" T ("U8", "[8]", "[0,8]") "}", -1, 8, LP_FORMAT_ERROR_OFFSETS },
  { "zero-size-inside-other", "{\"a\":" T ("U8", "[8]", "[0,8]") ",\"b\":" T ("U8", "[0]", "[4,4]") "}", -1, 8, LP_FORMAT_ERROR_OFFSETS },
  { "end-before-begin", "{\"a\":" T ("U8", "[4]", "[0,4]") ",\"b\":" T ("U8", "[0]", "[8,4]") "}", -1, 8, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-above-2^63", ONE (T ("U8", "[0]", "[9223372036854775816,9223372036854775816]")), -1, 0, LP_FORMAT_ERROR_OFFSETS },
  { "offsets-2^63-sized", ONE (T ("U8", "[9223372036854775816]", "[0,9223372036854775816]")), -1, 16, LP_FORMAT_ERROR_TRUNCATED },
  { "offsets-u64-max", ONE (T ("U8", "[18446744073709551615]", "[0,18446744073709551615]")), -1, 16, LP_FORMAT_ERROR_TRUNCATED },

  /* 6. sizes */
  { "shape-product-overflow", ONE (T ("U8", "[4294967296,4294967296]", "[0,0]")), -1, 0, LP_FORMAT_ERROR_SHAPE },
  { "shape-product-overflow-with-zero-later", ONE (T ("U8", "[4294967296,4294967296,2,0]", "[0,0]")), -1, 0, LP_FORMAT_ERROR_SHAPE },
  { "byte-size-overflow", ONE (T ("F64", "[4611686018427387904]", "[0,0]")), -1, 0, LP_FORMAT_ERROR_SHAPE },
  { "f4-odd-count", ONE (T ("F4", "[3]", "[0,2]")), -1, 2, LP_FORMAT_ERROR_SHAPE },
  { "f6-e2m3-partial-byte", ONE (T ("F6_E2M3", "[2]", "[0,2]")), -1, 2, LP_FORMAT_ERROR_SHAPE },
  { "f6-e3m2-partial-byte", ONE (T ("F6_E3M2", "[6]", "[0,5]")), -1, 5, LP_FORMAT_ERROR_SHAPE },
  { "size-mismatch", ONE (T ("F32", "[2,3]", "[0,12]")), -1, 12, LP_FORMAT_ERROR_OFFSETS },
  { "size-mismatch-bigger", ONE (T ("F16", "[2]", "[0,8]")), -1, 8, LP_FORMAT_ERROR_OFFSETS },
  { "scalar-wrong-size", ONE (T ("F32", "[]", "[0,8]")), -1, 8, LP_FORMAT_ERROR_OFFSETS },

  /* 7. coverage of the data section */
  { "trailing-bytes", ONE (T ("U8", "[4]", "[0,4]")), -1, 5, LP_FORMAT_ERROR_OFFSETS },
  { "trailing-bytes-empty", "{}", -1, 1, LP_FORMAT_ERROR_OFFSETS },
  { "missing-bytes", ONE (T ("U8", "[4]", "[0,4]")), -1, 3, LP_FORMAT_ERROR_TRUNCATED },

  /* 8. metadata */
  { "metadata-number", "{\"__metadata__\":{\"a\":1}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-null", "{\"__metadata__\":{\"a\":null}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-bool", "{\"__metadata__\":{\"a\":true}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-object", "{\"__metadata__\":{\"a\":{}}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-array", "{\"__metadata__\":{\"a\":[\"b\"]}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-not-object", "{\"__metadata__\":\"a\"}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-is-array", "{\"__metadata__\":[]}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-duplicate-key", "{\"__metadata__\":{\"a\":\"b\",\"a\":\"b\"}}", -1, 0, LP_FORMAT_ERROR_METADATA },
  { "metadata-twice", "{\"__metadata__\":{},\"__metadata__\":{}}", -1, 0, LP_FORMAT_ERROR_METADATA },

  /* lax in the reference, strict here */
  { "duplicate-name", "{\"a\":" T ("U8", "[0]", "[0,0]") ",\"a\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_DUPLICATE },
  { "duplicate-name-escaped", "{\"a\":" T ("U8", "[0]", "[0,0]") ",\"\\u0061\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_DUPLICATE },

  /* hostile files (tests/reliability covers their cost through the CLI) */
  { "name-invalid-utf8", "{\"a\xff\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "name-overlong-nul", "{\"a\xc0\x80\":" T ("U8", "[0]", "[0,0]") "}", -1, 0, LP_FORMAT_ERROR_ENCODING },
  { "alloc-bomb-2^40", ONE (T ("F32", "[1099511627776]", "[0,4398046511104]")), -1, 100, LP_FORMAT_ERROR_TRUNCATED },
  { "alloc-bomb-many-gib", "{\"a\":" T ("U8", "[1073741824]", "[0,1073741824]") ",\"b\":" T ("U8", "[1073741824]", "[1073741824,2147483648]") "}", -1, 16, LP_FORMAT_ERROR_TRUNCATED },
};

static void
test_reject (gconstpointer data)
{
  const BadCase *c = data;
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autofree char *generated = NULL;
  g_autofree char *origin = g_strdup_printf ("%s.safetensors", c->name);
  gsize len;

  if (c->raw)
    bytes = g_bytes_new (c->header, c->header_len);
  else if (c->generate)
    {
      generated = c->generate (&len);
      bytes = make_file_full (generated, len, FALSE, 0, c->data_len);
    }
  else
    {
      len = c->header_len >= 0 ? (gsize) c->header_len : strlen (c->header);
      bytes = make_file_full (c->header, len, c->use_fake_len, c->fake_len, c->data_len);
    }

  checkpoint = lp_safetensors_load_from_bytes (bytes, origin, &error);
  g_test_message ("%s", error ? error->message : "(no error)");
  g_assert_error (error, LP_FORMAT_ERROR, c->code);
  g_assert_null (checkpoint);
  /* Every message names the file. */
  g_assert_true (g_str_has_prefix (error->message, origin));
}

static void
test_reject_misspelled_literal (void)
{
  const char *headers[] = {
    ONE (T ("U8", "[tru]", "[0,1]")),
    ONE (T ("U8", "[nul]", "[0,1]")),
    "{\"__metadata__\":{\"a\":fals}}",
  };

  for (guint i = 0; i < G_N_ELEMENTS (headers); i++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(GBytes) bytes = make_file (headers[i], 1);
      g_autoptr(LpCheckpoint) checkpoint = lp_safetensors_load_from_bytes (bytes, "x", &error);

      g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SYNTAX);
      g_assert_null (checkpoint);
    }
}

/* Messages name the tensor and give exact numbers, even above 2^53. */
static void
test_reject_messages (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = make_file ("{\"x.weight\":" T ("F32", "[2,3]", "[0,12]") "}", 12);
  g_autoptr(LpCheckpoint) checkpoint = lp_safetensors_load_from_bytes (bytes, "lora.safetensors", &error);
  g_autoptr(GBytes) big = make_file (ONE (T ("U8", "[0]", "[9223372036854775817,9223372036854775817]")), 0);

  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_OFFSETS);
  g_assert_cmpstr (error->message, ==,
                   "lora.safetensors: tensor 'x.weight': data_offsets [0, 12] hold 12 bytes "
                   "but shape [2, 3] of F32 needs 24");
  g_clear_error (&error);

  checkpoint = lp_safetensors_load_from_bytes (big, "big.safetensors", &error);
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_OFFSETS);
  g_assert_nonnull (strstr (error->message, "9223372036854775817"));
}

/* ---- valid edge cases -------------------------------------------------- */

static LpCheckpoint *
load_ok (const char *header,
         gsize       data_len)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = make_file (header, data_len);
  LpCheckpoint *checkpoint = lp_safetensors_load_from_bytes (bytes, "ok.safetensors", &error);

  g_assert_no_error (error);
  g_assert_nonnull (checkpoint);
  return checkpoint;
}

/* Brackets and escaped quotes inside strings are text: they count toward no
 * nesting depth and end no string. */
static void
test_accept_brackets_in_strings (void)
{
  GString *h = g_string_new ("{\"__metadata__\":{\"k\":\"");
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;

  for (guint i = 0; i < 5000; i++)
    g_string_append (h, "[{");
  g_string_append (h, "\\\"[[\\\\\"},\"t[{\":" T ("U8", "[1]", "[0,1]") "}");
  bytes = make_file (h->str, 1);
  checkpoint = lp_safetensors_load_from_bytes (bytes, "brackets.safetensors", &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 1);
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 0)), ==, "t[{");
  g_assert_true (g_str_has_suffix (lp_checkpoint_get_metadata (checkpoint, "k"), "[{\"[[\\"));
  g_string_free (h, TRUE);
}

static void
test_accept_empty (void)
{
  const char *headers[] = { "{}", " \t\r\n{ }\n\r\t ", "{\"__metadata__\":{}}" };

  for (guint i = 0; i < G_N_ELEMENTS (headers); i++)
    {
      g_autoptr(LpCheckpoint) checkpoint = load_ok (headers[i], 0);
      g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 0);
    }
}

static void
test_accept_zero_size (void)
{
  g_autoptr(LpCheckpoint) checkpoint =
    load_ok ("{\"c\":" T ("F16", "[0,5]", "[8,8]") ",\"a\":" T ("F32", "[0]", "[0,0]")
             ",\"b\":" T ("F32", "[2]", "[0,8]") ",\"d\":" T ("I8", "[3,0]", "[8,8]")
             ",\"e\":" T ("U8", "[0]", "[0,0]") "}", 8);
  const char *order[] = { "a", "e", "b", "c", "d" };

  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 5);
  for (guint i = 0; i < 5; i++)
    g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, i)), ==, order[i]);
  g_assert_cmpuint (lp_tensor_get_n_bytes (lp_checkpoint_lookup (checkpoint, "c")), ==, 0);
}

static void
test_accept_scalar (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = load_ok (ONE (T ("F32", "[]", "[0,4]")), 4);
  LpTensor *t = lp_checkpoint_get_tensor (checkpoint, 0);
  g_autoptr(GBytes) data = lp_tensor_dup_data (t, &error);
  const guint8 expected[] = { 1, 8, 15, 22 };

  g_assert_no_error (error);
  g_assert_cmpuint (lp_tensor_get_n_dims (t), ==, 0);
  g_assert_cmpuint (lp_tensor_get_n_elements (t), ==, 1);
  g_assert_cmpmem (g_bytes_get_data (data, NULL), 4, expected, 4);
}

/* The spec only recommends padding the header to 8 bytes; a file whose
 * header is not padded puts its f32/f64 data at odd addresses. The bytes a
 * tensor hands out must still be aligned (UBSan found the f32 -> f8 cast
 * loading floats from such an address), and equal to the file's. */
static void
test_accept_unaligned (void)
{
  const char *header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                       "\"b\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[12,20]},"
                       "\"c\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[20,22]}} ";
  g_autoptr(GBytes) file = make_file (header, 22);
  const guint8 *raw = (const guint8 *) g_bytes_get_data (file, NULL) + 8 + strlen (header);
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = lp_safetensors_load_from_bytes (file, "odd.safetensors", &error);
  const gsize offsets[] = { 0, 12, 20 }, sizes[] = { 12, 8, 2 }, align[] = { 4, 8, 2 };

  g_assert_no_error (error);
  g_assert_cmpuint ((guintptr) raw % 2, ==, 1);   /* the test means what it says */
  for (guint i = 0; i < 3; i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (checkpoint, i);
      g_autoptr(GBytes) data = lp_tensor_dup_data (t, &error);
      gsize size;
      const guint8 *p;

      g_assert_no_error (error);
      p = g_bytes_get_data (data, &size);
      g_assert_cmpuint ((guintptr) p % align[i], ==, 0);
      g_assert_cmpmem (p, size, raw + offsets[i], sizes[i]);
    }

  /* and a conversion through it is clean (UBSan is the judge) */
  gsize n = 0;
  g_autofree float *f = lp_tensor_dup_f32 (lp_checkpoint_get_tensor (checkpoint, 0), &n, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (n, ==, 3);
  g_assert_cmpmem (f, 12, raw, 12);
}

/* Every dtype, in file order different from header order, each with data
 * that must come back exactly. */
static void
test_accept_all_dtypes (void)
{
  g_autoptr(GString) header = g_string_new ("{");
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  guint64 offsets[LP_DTYPE_N_TYPES + 1] = { 0, };

  for (int d = 0; d < LP_DTYPE_N_TYPES; d++)
    offsets[d + 1] = offsets[d] + 8 * lp_dtype_get_bits (d) / 8;
  for (int d = LP_DTYPE_N_TYPES - 1; d >= 0; d--)
    g_string_append_printf (header, "%s\"t%d\":{\"dtype\":\"%s\",\"shape\":[2,4],\"data_offsets\":[%"
                            G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}",
                            d == LP_DTYPE_N_TYPES - 1 ? "" : ",", d, lp_dtype_to_string (d),
                            offsets[d], offsets[d + 1]);
  g_string_append_c (header, '}');
  checkpoint = load_ok (header->str, offsets[LP_DTYPE_N_TYPES]);

  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, LP_DTYPE_N_TYPES);
  for (int d = 0; d < LP_DTYPE_N_TYPES; d++)
    {
      g_autoptr(GError) error = NULL;
      LpTensor *t = lp_checkpoint_get_tensor (checkpoint, d);
      g_autofree char *name = g_strdup_printf ("t%d", d);
      g_autoptr(GBytes) data = lp_tensor_dup_data (t, &error);
      const guint8 *p = g_bytes_get_data (data, NULL);

      g_assert_no_error (error);
      g_assert_cmpstr (lp_tensor_get_name (t), ==, name);
      g_assert_cmpint (lp_tensor_get_dtype (t), ==, d);
      g_assert_cmpuint (g_bytes_get_size (data), ==, offsets[d + 1] - offsets[d]);
      for (guint64 i = 0; i < g_bytes_get_size (data); i++)
        g_assert_cmpuint (p[i], ==, ((offsets[d] + i) * 7 + 1) & 0xff);
    }
}

static void
test_accept_escapes (void)
{
  g_autoptr(LpCheckpoint) checkpoint =
    load_ok ("{\"__metadata__\":{\"k\\n\\\"\":\"\\u00e9\\ud83d\\ude00\\/\\\\\\t\"},"
             "\"a\\\"b\\\\c\\u00e9\\ud83d\\ude00\xc3\xa9\":" T ("U8", "[1]", "[0,1]") "}", 1);

  g_assert_nonnull (lp_checkpoint_lookup (checkpoint, "a\"b\\c\xc3\xa9\xf0\x9f\x98\x80\xc3\xa9"));
  g_assert_cmpstr (lp_checkpoint_get_metadata (checkpoint, "k\n\""), ==,
                   "\xc3\xa9\xf0\x9f\x98\x80/\\\t");
}

static void
test_accept_large_numbers (void)
{
  /* Zero-size tensors with dims above 2^53 are valid; their values must
   * survive exactly. */
  g_autoptr(LpCheckpoint) checkpoint =
    load_ok (ONE (T ("U8", "[0,18446744073709551615]", "[0,0]")), 0);
  LpTensor *t = lp_checkpoint_get_tensor (checkpoint, 0);

  g_assert_cmpuint (lp_tensor_get_dim (t, 1), ==, G_MAXUINT64);
}

/* ---- writing ----------------------------------------------------------- */

static LpCheckpoint *
make_checkpoint (void)
{
  LpCheckpoint *checkpoint = lp_checkpoint_new ();
  const guint64 s23[] = { 2, 3 }, s4[] = { 4 }, s0[] = { 0 }, s7x8[] = { 7, 8 };
  struct { const char *name; LpDtype dtype; const guint64 *shape; guint n_dims; } specs[] = {
    { "z.weight", LP_DTYPE_F32, s23, 2 },
    { "a.weight", LP_DTYPE_BF16, s7x8, 2 },
    { "scalar", LP_DTYPE_F64, NULL, 0 },
    { "empty", LP_DTYPE_F16, s0, 1 },
    { "nibbles", LP_DTYPE_F4, s4, 1 },
    { "six", LP_DTYPE_F6_E3M2, s4, 1 },
    { "flags", LP_DTYPE_BOOL, s23, 2 },
    { "name \"quoted\"\n\xc3\xa9", LP_DTYPE_I64, s4, 1 },
    { "u64", LP_DTYPE_U64, s23, 2 },
  };

  for (guint i = 0; i < G_N_ELEMENTS (specs); i++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpTensor) t = make_tensor (specs[i].name, specs[i].dtype, specs[i].shape,
                                           specs[i].n_dims, i * 31);
      lp_checkpoint_add_tensor (checkpoint, t, &error);
      g_assert_no_error (error);
    }
  lp_checkpoint_set_metadata (checkpoint, "format", "pt");
  lp_checkpoint_set_metadata (checkpoint, "quote\"back\\slash", "line\nbreak\ttab \x01 \xc3\xa9");
  lp_checkpoint_set_metadata (checkpoint, "a", "");
  return checkpoint;
}

static void
test_round_trip (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "out.safetensors", NULL);
  g_autofree char *path2 = g_build_filename (dir, "again.safetensors", NULL);
  g_autoptr(LpCheckpoint) original = make_checkpoint ();
  g_autoptr(LpCheckpoint) loaded = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) file = NULL, file2 = NULL;
  const guint8 *p;
  guint64 n = 0;
  gsize size;

  g_assert_true (lp_safetensors_save (original, path, NULL, &error));
  g_assert_no_error (error);
  loaded = lp_safetensors_load (path, &error);
  g_assert_no_error (error);
  assert_same_checkpoint (original, loaded);
  g_assert_cmpstr (lp_checkpoint_get_origin (loaded), ==, path);
  g_assert_null (lp_checkpoint_get_adapter_config (loaded));

  /* The layout the writer promises. */
  file = read_file (path);
  p = g_bytes_get_data (file, &size);
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | p[i];
  g_assert_cmpuint (n % 8, ==, 0);
  g_assert_cmpuint (8 + n, <=, size);
  g_assert_true (g_str_has_prefix ((const char *) p + 8, "{\"__metadata__\":{\"format\":\"pt\","));
  g_assert_null (memchr (p + 8, '\n', n));
  g_assert_true (p[8 + n - 1] == '}' || p[8 + n - 1] == ' ');
  g_assert_nonnull (g_strstr_len ((const char *) p + 8, n,
                                  "\"z.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}"));

  /* Saving what was loaded gives the same bytes: the writer is deterministic
   * and the loader keeps order and metadata. */
  g_assert_true (lp_safetensors_save (loaded, path2, NULL, &error));
  g_assert_no_error (error);
  file2 = read_file (path2);
  g_assert_true (g_bytes_equal (file, file2));
  g_assert_cmpuint (count_entries (dir), ==, 2);

  remove_tree (dir);
}

static void
test_round_trip_empty (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "empty.safetensors", NULL);
  g_autoptr(LpCheckpoint) original = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) loaded = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) file = NULL;

  g_assert_true (lp_safetensors_save (original, path, NULL, &error));
  g_assert_no_error (error);
  file = read_file (path);
  g_assert_cmpmem (g_bytes_get_data (file, NULL), g_bytes_get_size (file),
                   "\x08\0\0\0\0\0\0\0{}      ", 16);
  loaded = lp_safetensors_load (path, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (loaded), ==, 0);
  remove_tree (dir);
}

/* A header above the reader's limit is refused before anything is written;
 * control characters take 6 bytes each once escaped, so a 17 MB name does. */
static void
test_header_too_large (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "huge.safetensors", NULL);
  g_autofree char *name = g_strnfill (LP_SAFETENSORS_MAX_HEADER / 6 + 1, '\x01');
  g_autoptr(LpCheckpoint) checkpoint = lp_checkpoint_new ();
  g_autoptr(LpTensor) tensor = NULL;
  g_autoptr(GError) error = NULL;
  const guint64 shape[] = { 1 };

  tensor = make_tensor (name, LP_DTYPE_U8, shape, 1, 0);
  g_assert_true (lp_checkpoint_add_tensor (checkpoint, tensor, &error));
  g_assert_false (lp_safetensors_save (checkpoint, path, NULL, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_HEADER_SIZE);
  g_assert_cmpuint (count_entries (dir), ==, 0);
  remove_tree (dir);
}

static void
test_adapter_config (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *in = g_build_filename (dir, "x.safetensors", NULL);
  g_autofree char *in_config = g_build_filename (dir, "x.adapter_config.json", NULL);
  g_autofree char *out = g_build_filename (dir, "y.safetensors", NULL);
  g_autofree char *out_config = g_build_filename (dir, "y.adapter_config.json", NULL);
  g_autofree char *peft = g_build_filename (dir, "adapter_model.safetensors", NULL);
  g_autofree char *peft_config = g_build_filename (dir, "adapter_config.json", NULL);
  const char *config = "{\"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"q\", \"v\"]}\n";
  g_autoptr(LpCheckpoint) original = make_checkpoint ();
  g_autoptr(LpCheckpoint) loaded = NULL, loaded2 = NULL, loaded3 = NULL;
  g_autoptr(GError) error = NULL;
  g_autofree char *text = NULL;

  g_assert_true (lp_safetensors_save (original, in, NULL, &error));
  g_assert_true (g_file_set_contents (in_config, config, -1, &error));
  loaded = lp_safetensors_load (in, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (lp_checkpoint_get_adapter_config (loaded), ==, config);

  /* Written beside the output, under the output's name. */
  g_assert_true (lp_safetensors_save (loaded, out, NULL, &error));
  g_assert_true (g_file_get_contents (out_config, &text, NULL, &error));
  g_assert_cmpstr (text, ==, config);
  g_clear_pointer (&text, g_free);

  /* PEFT's own naming. */
  g_assert_true (lp_safetensors_save (loaded, peft, NULL, &error));
  g_assert_true (g_file_get_contents (peft_config, &text, NULL, &error));
  g_assert_cmpstr (text, ==, config);
  loaded2 = lp_safetensors_load (peft, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (lp_checkpoint_get_adapter_config (loaded2), ==, config);

  /* adapter_config.json belongs to adapter_model.safetensors only. */
  g_unlink (out_config);
  loaded3 = lp_safetensors_load (out, &error);
  g_assert_no_error (error);
  g_assert_null (lp_checkpoint_get_adapter_config (loaded3));
  g_clear_object (&loaded3);

  /* A config that is not a JSON object is an error. */
  g_assert_true (g_file_set_contents (in_config, "[1, 2]", -1, &error));
  loaded3 = lp_safetensors_load (in, &error);
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SYNTAX);
  g_assert_nonnull (strstr (error->message, "x.adapter_config.json"));
  g_clear_error (&error);
  g_assert_true (g_file_set_contents (in_config, "{\"r\": 8,", -1, &error));
  loaded3 = lp_safetensors_load (in, &error);
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SYNTAX);
  g_clear_error (&error);
  {
    g_autofree char *bomb = g_strnfill (100000, '[');
    g_assert_true (g_file_set_contents (in_config, bomb, -1, &error));
  }
  loaded3 = lp_safetensors_load (in, &error);
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_TOO_DEEP);
  g_assert_null (loaded3);

  remove_tree (dir);
}

static void
test_file_errors (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) checkpoint = lp_safetensors_load ("/nonexistent/x.safetensors", &error);
  g_autoptr(LpCheckpoint) original = make_checkpoint ();
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "bad.safetensors", NULL);
  g_autoptr(GBytes) bad = make_file (ONE (T ("F32", "[2,3]", "[0,12]")), 12);

  g_assert_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT);
  g_clear_error (&error);

  /* A directory that does not exist: the error names the output. */
  g_assert_false (lp_safetensors_save (original, "/nonexistent/out.safetensors", NULL, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND);
  g_assert_nonnull (strstr (error->message, "out.safetensors"));
  g_clear_error (&error);

  /* Errors from a file on disk name the file. */
  write_file (path, bad);
  checkpoint = lp_safetensors_load (path, &error);
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_OFFSETS);
  g_assert_true (g_str_has_prefix (error->message, path));
  remove_tree (dir);
}

/* ---- lora-samples ------------------------------------------------------ */

/* An independent reader (Python's json and struct) compares each written file
 * with its original: the same tensors, dtypes, shapes, bytes and metadata,
 * and a header padded to a multiple of 8 with __metadata__ first. */
static const char oracle_script[] =
  "import json, os, struct, sys\n"
  "def read(path):\n"
  "    b = open(path, 'rb').read()\n"
  "    n = struct.unpack('<Q', b[:8])[0]\n"
  "    text = b[8:8 + n].decode('utf-8')\n"
  "    h = json.loads(text)\n"
  "    meta = h.pop('__metadata__', None)\n"
  "    t = {k: (v['dtype'], v['shape'], b[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]])\n"
  "         for k, v in h.items()}\n"
  "    return n, text, meta, t\n"
  "count = 0\n"
  "for name in sorted(os.listdir(sys.argv[2])):\n"
  "    if not name.endswith('.safetensors'):\n"
  "        continue\n"
  "    _, _, meta_a, a = read(os.path.join(sys.argv[1], name))\n"
  "    n, text, meta_b, b = read(os.path.join(sys.argv[2], name))\n"
  "    assert meta_a == meta_b, name\n"
  "    assert a == b, name\n"
  "    assert n % 8 == 0, name\n"
  "    assert meta_b is None or text.startswith('{\"__metadata__\":'), name\n"
  "    count += 1\n"
  "assert count > 0\n"
  "print(count, 'files agree')\n";

static void
test_lora_samples (void)
{
  const char *shared = g_getenv ("LPIPE_SHARED_DIR");
  g_autofree char *samples = shared ? g_build_filename (shared, "lora-samples", NULL) : NULL;
  g_autofree char *dir = NULL;
  GDir *d;
  const char *name;
  guint n_files = 0;

  if (samples == NULL || !g_file_test (samples, G_FILE_TEST_IS_DIR))
    {
      g_test_skip ("LPIPE_SHARED_DIR/lora-samples is absent");
      return;
    }
  dir = make_tmpdir ();
  d = g_dir_open (samples, 0, NULL);
  g_assert_nonnull (d);
  while ((name = g_dir_read_name (d)) != NULL)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *in = g_build_filename (samples, name, NULL);
      g_autofree char *out = g_build_filename (dir, name, NULL);
      g_autoptr(LpCheckpoint) a = NULL, b = NULL;

      if (!g_str_has_suffix (name, ".safetensors"))
        continue;
      g_test_message ("%s", name);
      a = lp_safetensors_load (in, &error);
      g_assert_no_error (error);
      g_assert_cmpuint (lp_checkpoint_get_n_tensors (a), >, 0);
      g_assert_true (lp_safetensors_save (a, out, NULL, &error));
      g_assert_no_error (error);
      b = lp_safetensors_load (out, &error);
      g_assert_no_error (error);
      assert_same_checkpoint (a, b);
      g_assert_cmpstr (lp_checkpoint_get_adapter_config (a), ==, lp_checkpoint_get_adapter_config (b));
      if (g_str_has_prefix (name, "peft-"))
        g_assert_nonnull (lp_checkpoint_get_adapter_config (a));
      n_files++;
    }
  g_dir_close (d);
  g_assert_cmpuint (n_files, >, 0);

  {
    g_autoptr(GError) error = NULL;
    g_autofree char *out = NULL, *err = NULL;
    const char *argv[] = { LP_TEST_PYTHON, "-c", oracle_script, samples, dir, NULL };
    int status;

    g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL, &out, &err, &status, &error);
    g_assert_no_error (error);
    g_test_message ("oracle: %s%s", out, err);
    g_assert_true (g_spawn_check_wait_status (status, &error));
    g_assert_no_error (error);
  }
  remove_tree (dir);
}

/* ---- atomic output ----------------------------------------------------- */

/* 4 tensors of 3 MiB, so that data reaches the disk before the last one. */
static LpCheckpoint *
make_big_checkpoint (LpTensorDataFunc func)
{
  LpCheckpoint *checkpoint = lp_checkpoint_new ();
  const guint64 shape[] = { 3 * 1024 * 1024 };

  for (guint i = 0; i < 4; i++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *name = g_strdup_printf ("t%u", i);
      g_autoptr(LpTensor) t = NULL;

      if (func)
        t = lp_tensor_new_lazy (name, LP_DTYPE_U8, shape, 1, func, GUINT_TO_POINTER (i), NULL, &error);
      else
        t = make_tensor (name, LP_DTYPE_U8, shape, 1, i);
      g_assert_no_error (error);
      lp_checkpoint_add_tensor (checkpoint, t, &error);
      g_assert_no_error (error);
    }
  return checkpoint;
}

static void
write_old_output (const char *path,
                  GBytes    **old)
{
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint ();
  g_autoptr(GError) error = NULL;

  g_assert_true (lp_safetensors_save (checkpoint, path, NULL, &error));
  g_assert_no_error (error);
  *old = read_file (path);
}

static void
test_atomic_full_disk (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(GBytes) old = NULL, now = NULL;
  int status;
  pid_t pid;

  write_old_output (path, &old);
  pid = fork ();
  g_assert_cmpint (pid, >=, 0);
  if (pid == 0)
    {
      struct rlimit limit = { 1024 * 1024, 1024 * 1024 };
      g_autoptr(LpCheckpoint) checkpoint = make_big_checkpoint (NULL);
      g_autoptr(GError) error = NULL;
      gboolean ok;

      signal (SIGXFSZ, SIG_IGN);
      setrlimit (RLIMIT_FSIZE, &limit);
      ok = lp_safetensors_save (checkpoint, path, NULL, &error);
      _exit (!ok && error->domain == G_IO_ERROR && strstr (error->message, "out.safetensors") ? 0 : 1);
    }
  g_assert_cmpint (waitpid (pid, &status, 0), ==, pid);
  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 0);

  /* The old output is intact and no temporary file is left. */
  now = read_file (path);
  g_assert_true (g_bytes_equal (old, now));
  g_assert_cmpuint (count_entries (dir), ==, 1);
  remove_tree (dir);
}

static GBytes *
kill_at_third_tensor (LpTensor *tensor,
                      gpointer  user_data,
                      GError  **error)
{
  guint i = GPOINTER_TO_UINT (user_data);
  if (i == 2)
    raise (SIGKILL);
  return zeros (tensor, NULL, error);
}

static void
test_atomic_killed (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(GBytes) old = NULL, now = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(LpCheckpoint) check = NULL;
  int status;
  pid_t pid;

  write_old_output (path, &old);
  pid = fork ();
  g_assert_cmpint (pid, >=, 0);
  if (pid == 0)
    {
      g_autoptr(LpCheckpoint) checkpoint = make_big_checkpoint (kill_at_third_tensor);
      lp_safetensors_save (checkpoint, path, NULL, NULL);
      _exit (1);
    }
  g_assert_cmpint (waitpid (pid, &status, 0), ==, pid);
  g_assert_true (WIFSIGNALED (status));
  g_assert_cmpint (WTERMSIG (status), ==, SIGKILL);

  now = read_file (path);
  g_assert_true (g_bytes_equal (old, now));
  check = lp_safetensors_load (path, &error);
  g_assert_no_error (error);
  /* The killed writer's temporary file is all that may be left. */
  g_assert_cmpuint (count_entries (dir), <=, 2);
  remove_tree (dir);
}

static void
test_atomic_over_input (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "model.safetensors", NULL);
  g_autoptr(LpCheckpoint) original = make_checkpoint ();
  g_autoptr(LpCheckpoint) loaded = NULL, reversed = NULL, again = NULL;
  g_autoptr(GError) error = NULL;
  guint n;

  g_assert_true (lp_safetensors_save (original, path, NULL, &error));
  loaded = lp_safetensors_load (path, &error);
  g_assert_no_error (error);

  /* Write the mapped input back over itself, reordered, with a new key. */
  reversed = lp_checkpoint_new ();
  n = lp_checkpoint_get_n_tensors (loaded);
  for (guint i = 0; i < n; i++)
    {
      lp_checkpoint_add_tensor (reversed, lp_checkpoint_get_tensor (loaded, n - 1 - i), &error);
      g_assert_no_error (error);
    }
  lp_checkpoint_copy_metadata (reversed, loaded);
  lp_checkpoint_set_metadata (reversed, "extra", "yes");
  g_assert_true (lp_safetensors_save (reversed, path, NULL, &error));
  g_assert_no_error (error);

  again = lp_safetensors_load (path, &error);
  g_assert_no_error (error);
  assert_same_checkpoint (reversed, again);
  /* And the data is the original's. */
  for (guint i = 0; i < n; i++)
    {
      LpTensor *a = lp_checkpoint_get_tensor (original, i);
      LpTensor *b = lp_checkpoint_lookup (again, lp_tensor_get_name (a));
      g_autoptr(GBytes) da = lp_tensor_dup_data (a, NULL);
      g_autoptr(GBytes) db = lp_tensor_dup_data (b, NULL);
      g_assert_true (g_bytes_equal (da, db));
    }
  g_assert_cmpuint (count_entries (dir), ==, 1);
  remove_tree (dir);
}

static void
test_atomic_write_contents (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "f.json", NULL);
  g_autoptr(GError) error = NULL;
  g_autofree char *text = NULL;

  g_assert_true (lp_atomic_write_contents (path, "one", 3, &error));
  g_assert_true (lp_atomic_write_contents (path, "{}", 2, &error));
  g_assert_no_error (error);
  g_assert_true (g_file_get_contents (path, &text, NULL, &error));
  g_assert_cmpstr (text, ==, "{}");
  g_assert_cmpuint (count_entries (dir), ==, 1);
  remove_tree (dir);
}

/* The PEFT config and the weights are committed together: when the config
 * cannot be written (its name is taken by a folder), the old weights stay
 * and no temporary file is left. */
static void
test_atomic_config_with_weights (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "lora.safetensors", NULL);
  g_autofree char *config = g_build_filename (dir, "lora.adapter_config.json", NULL);
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint ();
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) old = NULL;
  g_autoptr(GBytes) now = NULL;

  write_old_output (path, &old);
  g_assert_cmpint (g_mkdir (config, 0755), ==, 0);
  lp_checkpoint_set_metadata (checkpoint, "new", "yes");
  lp_checkpoint_set_adapter_config (checkpoint, "{\"r\": 4}");
  g_assert_false (lp_safetensors_save (checkpoint, path, NULL, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_IS_DIRECTORY);
  g_assert_nonnull (strstr (error->message, config));
  now = read_file (path);
  g_assert_true (g_bytes_equal (old, now));
  g_assert_cmpuint (count_entries (dir), ==, 2);

  /* With the folder gone both are written. */
  g_clear_error (&error);
  g_rmdir (config);
  g_assert_true (lp_safetensors_save (checkpoint, path, NULL, &error));
  g_assert_no_error (error);
  g_assert_true (g_file_test (config, G_FILE_TEST_IS_REGULAR));
  g_assert_cmpuint (count_entries (dir), ==, 2);
  remove_tree (dir);
}

/* A valid name of 248 to 255 bytes: the temporary name beside it must fit
 * NAME_MAX too. */
static void
test_atomic_long_name (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autoptr(LpCheckpoint) checkpoint = make_checkpoint ();

  for (guint len = 248; len <= 255; len++)
    {
      g_autoptr(GError) error = NULL;
      g_autoptr(LpCheckpoint) back = NULL;
      g_autofree char *name = g_strnfill (len - strlen (".safetensors"), 'x');
      g_autofree char *base = g_strconcat (name, ".safetensors", NULL);
      g_autofree char *path = g_build_filename (dir, base, NULL);

      g_assert_cmpuint (strlen (base), ==, len);
      g_assert_true (lp_safetensors_save (checkpoint, path, NULL, &error));
      g_assert_no_error (error);
      back = lp_safetensors_load (path, &error);
      g_assert_no_error (error);
      g_assert_cmpuint (count_entries (dir), ==, 1);
      g_unlink (path);
    }
  remove_tree (dir);
}

/* ---- memory ------------------------------------------------------------ */

static gsize
rss_kib (void)
{
  g_autofree char *status = NULL;
  const char *line;

  if (!g_file_get_contents ("/proc/self/status", &status, NULL, NULL))
    return 0;
  line = strstr (status, "VmRSS:");
  return line ? g_ascii_strtoull (line + 6, NULL, 10) : 0;
}

/* Reading every tensor of a mapped file and dropping the data must not keep
 * the file's pages in the process. The tensors are larger than those the
 * reader copies with pread() (16 MiB), so they are views of the mapping. */
static void
test_mapped_pages_released (void)
{
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "big.safetensors", NULL);
  g_autoptr(LpCheckpoint) checkpoint = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) loaded = NULL;
  g_autoptr(GError) error = NULL;
  const guint64 shape[] = { 20 * 1024 * 1024 };
  gsize before, after;
  guint64 sum = 0;

  if (rss_kib () == 0)
    {
      g_test_skip ("no /proc/self/status");
      return;
    }
  for (guint i = 0; i < 4; i++)
    {
      g_autofree char *name = g_strdup_printf ("t%u", i);
      g_autoptr(LpTensor) t = lp_tensor_new_lazy (name, LP_DTYPE_U8, shape, 1,
                                                  zeros, NULL, NULL, &error);
      lp_checkpoint_add_tensor (checkpoint, t, &error);
      g_assert_no_error (error);
    }
  g_assert_true (lp_safetensors_save (checkpoint, path, NULL, &error));
  loaded = lp_safetensors_load (path, &error);
  g_assert_no_error (error);

  before = rss_kib ();
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (loaded); i++)
    {
      g_autoptr(GBytes) data = lp_tensor_dup_data (lp_checkpoint_get_tensor (loaded, i), &error);
      gsize size;
      const guint8 *p = g_bytes_get_data (data, &size);

      g_assert_no_error (error);
      for (gsize k = 0; k < size; k += 4096)
        sum += p[k];
    }
  after = rss_kib ();
  g_test_message ("RSS before %zu KiB, after reading 80 MiB: %zu KiB", before, after);
  g_assert_cmpuint (sum, ==, 0);
  g_assert_cmpuint (after, <, before + 16 * 1024);
  remove_tree (dir);
}

/* ---- the plugin -------------------------------------------------------- */

static LpStage *
create_stage (LpRegistry *registry,
              const char *stage_name,
              const char *location)
{
  g_autoptr(GError) error = NULL;
  LpStage *stage = lp_registry_create_stage (registry, stage_name, &error);

  g_assert_no_error (error);
  g_assert_true (lp_stage_set_property_from_string (stage, "location", location, &error));
  g_assert_no_error (error);
  g_assert_true (lp_stage_prepare (stage, &error));
  g_assert_no_error (error);
  return stage;
}

static void
test_plugin (void)
{
  const char *build_root = g_getenv ("LPIPE_BUILD_ROOT");
  g_autofree char *plugins = NULL;
  g_autofree char *dir = make_tmpdir ();
  g_autofree char *in = g_build_filename (dir, "in.safetensors", NULL);
  g_autofree char *out = g_build_filename (dir, "out.safetensors", NULL);
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(LpCheckpoint) original = make_checkpoint ();
  g_autoptr(LpCheckpoint) read = NULL, written = NULL;
  g_autoptr(LpStage) source = NULL, sink = NULL, empty = NULL;
  g_autoptr(GCancellable) cancellable = g_cancellable_new ();
  g_autoptr(GBytes) before = NULL, after = NULL;
  g_autoptr(GError) error = NULL;
  g_auto(GStrv) keys = NULL;

  if (build_root == NULL)
    {
      g_test_skip ("LPIPE_BUILD_ROOT is not set");
      return;
    }
  plugins = g_build_filename (build_root, "plugins", "safetensors", NULL);
  g_assert_cmpuint (lp_registry_scan_directory (registry, plugins), ==, 1);
  g_assert_true (lp_safetensors_save (original, in, NULL, &error));

  source = create_stage (registry, "safetensors-source", in);
  g_assert_true (lp_stage_run (source, NULL, 0, &read, &error));
  g_assert_no_error (error);
  assert_same_checkpoint (original, read);

  /* The sink keeps the metadata and adds the provenance, on its own copy. */
  sink = create_stage (registry, "safetensors-sink", out);
  lp_stage_set_threads (sink, 2);
  lp_stage_set_provenance (sink, "{\"stages\":[\"safetensors-source\",\"safetensors-sink\"]}");
  g_assert_true (lp_stage_run (sink, &read, 1, NULL, &error));
  g_assert_no_error (error);
  g_assert_null (lp_checkpoint_get_metadata (read, "lpipe.pipeline"));
  written = lp_safetensors_load (out, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (lp_checkpoint_get_metadata (written, "lpipe.pipeline"), ==,
                   "{\"stages\":[\"safetensors-source\",\"safetensors-sink\"]}");
  g_assert_cmpstr (lp_checkpoint_get_metadata (written, "format"), ==, "pt");
  keys = lp_checkpoint_dup_metadata_keys (written);
  g_assert_cmpuint (g_strv_length (keys), ==, 4);
  lp_checkpoint_set_metadata (read, "lpipe.pipeline", lp_checkpoint_get_metadata (written, "lpipe.pipeline"));
  assert_same_checkpoint (read, written);

  /* Cancelled: the old output stays and no temporary file is left. */
  before = read_file (out);
  g_cancellable_cancel (cancellable);
  lp_stage_set_cancellable (sink, cancellable);
  g_assert_false (lp_stage_run (sink, &original, 1, NULL, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  after = read_file (out);
  g_assert_true (g_bytes_equal (before, after));
  g_assert_cmpuint (count_entries (dir), ==, 2);
  g_clear_error (&error);

  /* An empty location is refused before anything runs (by the stage or by
   * the required-property check before it). */
  empty = lp_registry_create_stage (registry, "safetensors-sink", &error);
  g_assert_true (lp_stage_set_property_from_string (empty, "location", "", &error));
  g_assert_false (lp_stage_prepare (empty, &error));
  g_assert_nonnull (error);

  remove_tree (dir);
}

/* ---- a large header ---------------------------------------------------- */

static void
test_many_tensors (void)
{
  g_autoptr(GString) header = g_string_new ("{\"__metadata__\":{\"format\":\"pt\"}");
  g_autoptr(GBytes) bytes = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(GTimer) timer = NULL;
  const guint n = 10000;

  for (guint i = 0; i < n; i++)
    g_string_append_printf (header, ",\"transformer.blocks.%u.attn.to_q.lora_A.weight\":"
                            "{\"dtype\":\"BF16\",\"shape\":[4,2],\"data_offsets\":[%u,%u]}",
                            i, i * 16, i * 16 + 16);
  g_string_append_c (header, '}');
  bytes = make_file_full (header->str, header->len, FALSE, 0, n * 16);

  timer = g_timer_new ();
  checkpoint = lp_safetensors_load_from_bytes (bytes, "many.safetensors", &error);
  g_timer_stop (timer);
  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, n);
  g_test_message ("loaded and validated %u tensors (%zu-byte header) in %.1f ms",
                  n, header->len, g_timer_elapsed (timer, NULL) * 1000);
  if (g_test_verbose ())
    g_printerr ("loaded and validated %u tensors (%zu-byte header) in %.1f ms\n",
                n, header->len, g_timer_elapsed (timer, NULL) * 1000);
}

/* mlx-lm's save_safetensors writes "__metadata__": null; the reference
 * reader (safetensors' Metadata with serde's Option) reads null as no
 * metadata, and so must lpipe. */
static void
test_metadata_null (void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GBytes) bytes = make_file ("{\"__metadata__\":null,\"m.lora_a\":"
                                       "{\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[0,4]}}", 4);
  g_autoptr(LpCheckpoint) checkpoint = lp_safetensors_load_from_bytes (bytes, "adapters.safetensors", &error);

  g_assert_no_error (error);
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (checkpoint), ==, 1);
  g_assert_cmpstr (lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, 0)), ==, "m.lora_a");
  g_assert_null (lp_checkpoint_get_metadata (checkpoint, "format"));
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  for (guint i = 0; i < G_N_ELEMENTS (bad_cases); i++)
    {
      g_autofree char *path = g_strdup_printf ("/safetensors/reject/%s", bad_cases[i].name);
      g_test_add_data_func (path, &bad_cases[i], test_reject);
    }
  g_test_add_func ("/safetensors/reject/misspelled-literal", test_reject_misspelled_literal);
  g_test_add_func ("/safetensors/metadata-null", test_metadata_null);
  g_test_add_func ("/safetensors/reject/messages", test_reject_messages);
  g_test_add_func ("/safetensors/reject/file-errors", test_file_errors);
  g_test_add_func ("/safetensors/accept/empty", test_accept_empty);
  g_test_add_func ("/safetensors/accept/brackets-in-strings", test_accept_brackets_in_strings);
  g_test_add_func ("/safetensors/accept/zero-size", test_accept_zero_size);
  g_test_add_func ("/safetensors/accept/scalar", test_accept_scalar);
  g_test_add_func ("/safetensors/accept/all-dtypes", test_accept_all_dtypes);
  g_test_add_func ("/safetensors/accept/unaligned", test_accept_unaligned);
  g_test_add_func ("/safetensors/accept/escapes", test_accept_escapes);
  g_test_add_func ("/safetensors/accept/large-numbers", test_accept_large_numbers);
  g_test_add_func ("/safetensors/write/round-trip", test_round_trip);
  g_test_add_func ("/safetensors/write/round-trip-empty", test_round_trip_empty);
  g_test_add_func ("/safetensors/write/adapter-config", test_adapter_config);
  g_test_add_func ("/safetensors/write/header-too-large", test_header_too_large);
  g_test_add_func ("/safetensors/write/lora-samples", test_lora_samples);
  g_test_add_func ("/safetensors/atomic/full-disk", test_atomic_full_disk);
  g_test_add_func ("/safetensors/atomic/killed", test_atomic_killed);
  g_test_add_func ("/safetensors/atomic/config-with-weights", test_atomic_config_with_weights);
  g_test_add_func ("/safetensors/atomic/long-name", test_atomic_long_name);
  g_test_add_func ("/safetensors/atomic/over-input", test_atomic_over_input);
  g_test_add_func ("/safetensors/atomic/write-contents", test_atomic_write_contents);
  g_test_add_func ("/safetensors/memory/mapped-pages-released", test_mapped_pages_released);
  g_test_add_func ("/safetensors/plugin/source-sink", test_plugin);
  g_test_add_func ("/safetensors/perf/many-tensors", test_many_tensors);

  return g_test_run ();
}
