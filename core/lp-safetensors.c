/* lp-safetensors.c: reading and writing the safetensors file format
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#define _GNU_SOURCE   /* madvise, O_CLOEXEC, fdatasync */
#include "lp-private.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <dirent.h>
#include <unistd.h>
#include <glib/gstdio.h>

/* The format needs depth 3 (header, entry, shape); anything much deeper is an
 * attack on the parser's stack, or on json-glib's, which has no limit. */
#define HEADER_MAX_DEPTH 8
#define CONFIG_MAX_DEPTH 64

/* Writes smaller than this are gathered so that a file of many small tensors
 * still goes out in large write() calls. */
#define WRITE_BUFFER_SIZE (4 * 1024 * 1024)

static void set_format_error (GError     **error,
                              int          code,
                              const char  *origin,
                              const char  *format,
                              ...) G_GNUC_PRINTF (4, 5);

static void
set_format_error (GError     **error,
                  int          code,
                  const char  *origin,
                  const char  *format,
                  ...)
{
  g_autofree char *message = NULL;
  va_list args;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_FORMAT_ERROR, code, "%s: %s", origin, message);
}

/* ---- validation that needs no parser ---------------------------------- */

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
 * U+10FFFF. NUL is valid UTF-8; the JSON grammar refuses it later, so that
 * NUL padding is reported as what it is. */
static gboolean
utf8_validate_strict (const guchar *p,
                      gsize         len,
                      gsize        *bad_pos)
{
  gsize i = 0;

  while (i < len)
    {
      guchar c = p[i];
      guchar lo = 0x80, hi = 0xbf;
      guint n;

      if (c < 0x80)
        {
          i++;
          continue;
        }
      if (c >= 0xc2 && c <= 0xdf)
        n = 1;
      else if (c >= 0xe0 && c <= 0xef)
        {
          n = 2;
          if (c == 0xe0)
            lo = 0xa0;          /* overlong */
          else if (c == 0xed)
            hi = 0x9f;          /* surrogates */
        }
      else if (c >= 0xf0 && c <= 0xf4)
        {
          n = 3;
          if (c == 0xf0)
            lo = 0x90;          /* overlong */
          else if (c == 0xf4)
            hi = 0x8f;          /* above U+10FFFF */
        }
      else
        {
          *bad_pos = i;
          return FALSE;
        }
      if (len - i <= n || p[i + 1] < lo || p[i + 1] > hi)
        {
          *bad_pos = i;
          return FALSE;
        }
      for (guint k = 2; k <= n; k++)
        if (p[i + k] < 0x80 || p[i + k] > 0xbf)
          {
            *bad_pos = i;
            return FALSE;
          }
      i += n + 1;
    }
  return TRUE;
}

/* Counts brackets outside strings. It runs before any parser so that no
 * parser ever recurses deeper than @max_depth, whatever the input. */
static gboolean
check_depth (const guchar *p,
             gsize         len,
             guint         max_depth,
             gsize        *bad_pos)
{
  gboolean in_string = FALSE;
  guint depth = 0;

  for (gsize i = 0; i < len; i++)
    {
      guchar c = p[i];

      if (in_string)
        {
          if (c == '\\')
            i++;
          else if (c == '"')
            in_string = FALSE;
        }
      else if (c == '"')
        in_string = TRUE;
      else if (c == '[' || c == '{')
        {
          if (++depth > max_depth)
            {
              *bad_pos = i;
              return FALSE;
            }
        }
      else if ((c == ']' || c == '}') && depth > 0)
        depth--;
    }
  return TRUE;
}

/* ---- a strict JSON scanner for the header ------------------------------ */

/* json-glib reads numbers as double or gint64 (offsets above 2^53 or 2^63
 * get mangled), keeps one of two duplicate keys silently and accepts some
 * non-JSON; the header is small enough in grammar to read by hand, and every
 * value is checked against the one schema the format has. */

typedef struct {
  const char *origin;
  const guchar *p;
  gsize len;
  gsize pos;
  GString *str;                 /* the last string read, unescaped */
} Scanner;

typedef enum {
  NUMBER_UINT,
  NUMBER_NEGATIVE,
  NUMBER_FRACTION,
  NUMBER_TOO_LARGE,
} NumberKind;

static void scanner_error (Scanner     *s,
                           GError     **error,
                           int          code,
                           const char  *format,
                           ...) G_GNUC_PRINTF (4, 5);

static void
scanner_error (Scanner     *s,
               GError     **error,
               int          code,
               const char  *format,
               ...)
{
  g_autofree char *message = NULL;
  va_list args;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_FORMAT_ERROR, code, "%s: header byte %" G_GSIZE_FORMAT ": %s",
               s->origin, s->pos, message);
}

static void
skip_ws (Scanner *s)
{
  while (s->pos < s->len)
    {
      guchar c = s->p[s->pos];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
        break;
      s->pos++;
    }
}

static int
peek (Scanner *s)
{
  return s->pos < s->len ? s->p[s->pos] : -1;
}

static const char *
describe_char (int c,
               char buf[16])
{
  if (c < 0)
    return "the end of the header";
  if (c >= 0x21 && c < 0x7f)
    g_snprintf (buf, 16, "'%c'", c);
  else
    g_snprintf (buf, 16, "byte 0x%02x", c);
  return buf;
}

/* What the value at the cursor is, without reading it; anything that cannot
 * start a JSON value is a syntax error. */
static const char *
peek_value_kind (Scanner  *s,
                 GError  **error)
{
  static const struct { const char *word; const char *kind; } literals[] = {
    { "true", "a boolean" }, { "false", "a boolean" }, { "null", "null" },
  };
  int c = peek (s);
  char buf[16];

  switch (c)
    {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case '-': case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
      return "a number";
    default:
      break;
    }
  for (guint i = 0; i < G_N_ELEMENTS (literals); i++)
    {
      gsize n = strlen (literals[i].word);
      if (s->len - s->pos >= n && memcmp (s->p + s->pos, literals[i].word, n) == 0)
        return literals[i].kind;
    }
  scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected a JSON value, found %s",
                 describe_char (c, buf));
  return NULL;
}

static gboolean
expect_char (Scanner     *s,
             char         expected,
             GError     **error)
{
  char buf[16];

  skip_ws (s);
  if (peek (s) != expected)
    {
      scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected '%c', found %s",
                     expected, describe_char (peek (s), buf));
      return FALSE;
    }
  s->pos++;
  return TRUE;
}

/* After a member or an element: TRUE in *more if a ',' came (and another
 * member must follow), FALSE if the closing bracket did. */
static gboolean
next_member (Scanner   *s,
             char       close,
             gboolean  *more,
             GError   **error)
{
  char buf[16];

  skip_ws (s);
  if (peek (s) == ',')
    {
      s->pos++;
      skip_ws (s);
      if (peek (s) == close)
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "trailing comma before '%c'", close);
          return FALSE;
        }
      *more = TRUE;
      return TRUE;
    }
  if (peek (s) == close)
    {
      s->pos++;
      *more = FALSE;
      return TRUE;
    }
  scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected ',' or '%c', found %s",
                 close, describe_char (peek (s), buf));
  return FALSE;
}

static int
hex_value (int c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static gboolean
read_hex4 (Scanner  *s,
           gunichar *out,
           GError  **error)
{
  gunichar v = 0;

  if (s->len - s->pos < 4)
    {
      scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "truncated \\u escape");
      return FALSE;
    }
  for (guint i = 0; i < 4; i++)
    {
      int h = hex_value (s->p[s->pos + i]);
      if (h < 0)
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "bad \\u escape");
          return FALSE;
        }
      v = v * 16 + h;
    }
  s->pos += 4;
  *out = v;
  return TRUE;
}

/* Reads a string at the cursor into s->str. The header is valid UTF-8
 * already; escapes must not produce lone surrogates or NUL (names are C
 * strings: "a\u0000b" would become "a"). */
static gboolean
read_string (Scanner  *s,
             GError  **error)
{
  g_string_truncate (s->str, 0);
  s->pos++;                     /* the opening quote */

  for (;;)
    {
      gsize run = s->pos;
      guchar c;

      while (run < s->len && s->p[run] != '"' && s->p[run] != '\\' && s->p[run] >= 0x20)
        run++;
      g_string_append_len (s->str, (const char *) s->p + s->pos, run - s->pos);
      s->pos = run;
      if (s->pos >= s->len)
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "unterminated string");
          return FALSE;
        }
      c = s->p[s->pos];
      if (c == '"')
        {
          s->pos++;
          return TRUE;
        }
      if (c < 0x20)
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX,
                         "control character 0x%02x in a string (it must be escaped)", c);
          return FALSE;
        }

      /* a backslash */
      s->pos++;
      c = s->pos < s->len ? s->p[s->pos] : 0;
      s->pos++;
      switch (c)
        {
        case '"': g_string_append_c (s->str, '"'); break;
        case '\\': g_string_append_c (s->str, '\\'); break;
        case '/': g_string_append_c (s->str, '/'); break;
        case 'b': g_string_append_c (s->str, '\b'); break;
        case 'f': g_string_append_c (s->str, '\f'); break;
        case 'n': g_string_append_c (s->str, '\n'); break;
        case 'r': g_string_append_c (s->str, '\r'); break;
        case 't': g_string_append_c (s->str, '\t'); break;
        case 'u':
          {
            gunichar cp, low;

            if (!read_hex4 (s, &cp, error))
              return FALSE;
            if (cp >= 0xdc00 && cp <= 0xdfff)
              {
                scanner_error (s, error, LP_FORMAT_ERROR_ENCODING,
                               "lone low surrogate \\u%04X in a string", cp);
                return FALSE;
              }
            if (cp >= 0xd800 && cp <= 0xdbff)
              {
                if (s->len - s->pos < 2 || s->p[s->pos] != '\\' || s->p[s->pos + 1] != 'u')
                  {
                    scanner_error (s, error, LP_FORMAT_ERROR_ENCODING,
                                   "lone high surrogate \\u%04X in a string", cp);
                    return FALSE;
                  }
                s->pos += 2;
                if (!read_hex4 (s, &low, error))
                  return FALSE;
                if (low < 0xdc00 || low > 0xdfff)
                  {
                    scanner_error (s, error, LP_FORMAT_ERROR_ENCODING,
                                   "high surrogate \\u%04X not followed by a low one", cp);
                    return FALSE;
                  }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
              }
            if (cp == 0)
              {
                scanner_error (s, error, LP_FORMAT_ERROR_ENCODING, "\\u0000 in a string");
                return FALSE;
              }
            g_string_append_unichar (s->str, cp);
          }
          break;
        default:
          s->pos--;
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "bad escape sequence in a string");
          return FALSE;
        }
    }
}

/* Reads a number at the cursor, checking the JSON grammar; integers are
 * parsed exactly as 64-bit unsigned values. */
static gboolean
read_number (Scanner     *s,
             NumberKind  *kind,
             guint64     *value,
             GError     **error)
{
  gboolean negative = FALSE, fraction = FALSE, too_large = FALSE;
  guint64 v = 0;

  if (peek (s) == '-')
    {
      negative = TRUE;
      s->pos++;
    }
  if (peek (s) < '0' || peek (s) > '9')
    {
      scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "a number needs digits");
      return FALSE;
    }
  if (peek (s) == '0')
    {
      s->pos++;
      if (peek (s) >= '0' && peek (s) <= '9')
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "a number with a leading zero");
          return FALSE;
        }
    }
  else
    while (peek (s) >= '0' && peek (s) <= '9')
      {
        guint d = s->p[s->pos++] - '0';
        if (v > (G_MAXUINT64 - d) / 10)
          too_large = TRUE;
        else
          v = v * 10 + d;
      }
  if (peek (s) == '.')
    {
      fraction = TRUE;
      s->pos++;
      if (peek (s) < '0' || peek (s) > '9')
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "a fraction needs digits");
          return FALSE;
        }
      while (peek (s) >= '0' && peek (s) <= '9')
        s->pos++;
    }
  if (peek (s) == 'e' || peek (s) == 'E')
    {
      fraction = TRUE;
      s->pos++;
      if (peek (s) == '+' || peek (s) == '-')
        s->pos++;
      if (peek (s) < '0' || peek (s) > '9')
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "an exponent needs digits");
          return FALSE;
        }
      while (peek (s) >= '0' && peek (s) <= '9')
        s->pos++;
    }

  if (negative)
    *kind = NUMBER_NEGATIVE;
  else if (fraction)
    *kind = NUMBER_FRACTION;
  else if (too_large)
    *kind = NUMBER_TOO_LARGE;
  else
    *kind = NUMBER_UINT;
  *value = v;
  return TRUE;
}

/* ---- the header's schema ----------------------------------------------- */

typedef struct {
  char *name;
  LpDtype dtype;
  guint n_dims;
  guint shape_start;            /* into Header.dims */
  guint64 begin;
  guint64 end;
  guint index;                  /* header order, to keep sorting stable */
} Entry;

typedef struct {
  GArray *entries;              /* Entry */
  GArray *dims;                 /* guint64 */
  GHashTable *names;            /* set of tensor names */
  GPtrArray *metadata;          /* key, value, key, value... */
  gboolean has_metadata;
} Header;

static void
header_clear (Header *h)
{
  if (h->entries)
    for (guint i = 0; i < h->entries->len; i++)
      g_free (g_array_index (h->entries, Entry, i).name);
  g_clear_pointer (&h->entries, g_array_unref);
  g_clear_pointer (&h->dims, g_array_unref);
  g_clear_pointer (&h->names, g_hash_table_unref);
  g_clear_pointer (&h->metadata, g_ptr_array_unref);
}

static char *
describe_shape (const guint64 *dims,
                guint          n_dims)
{
  GString *s = g_string_new ("[");

  for (guint i = 0; i < n_dims; i++)
    g_string_append_printf (s, "%s%" G_GUINT64_FORMAT, i ? ", " : "", dims[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

/* A list of unsigned integers: a shape or data_offsets. Element errors carry
 * @code, so that a bad shape is a shape error and bad offsets an offset error. */
static gboolean
read_uint_list (Scanner     *s,
                const char  *tensor,
                const char  *what,
                int          code,
                GArray      *out,
                GError     **error)
{
  const char *kind;
  gboolean more = TRUE;

  skip_ws (s);
  kind = peek_value_kind (s, error);
  if (kind == NULL)
    return FALSE;
  if (peek (s) != '[')
    {
      scanner_error (s, error, code, "tensor '%s': %s is %s, not an array", tensor, what, kind);
      return FALSE;
    }
  s->pos++;
  skip_ws (s);
  if (peek (s) == ']')
    {
      s->pos++;
      return TRUE;
    }
  while (more)
    {
      NumberKind nk;
      guint64 v;

      skip_ws (s);
      kind = peek_value_kind (s, error);
      if (kind == NULL)
        return FALSE;
      if (peek (s) != '-' && (peek (s) < '0' || peek (s) > '9'))
        {
          scanner_error (s, error, code, "tensor '%s': %s holds %s, not an integer",
                         tensor, what, kind);
          return FALSE;
        }
      if (!read_number (s, &nk, &v, error))
        return FALSE;
      switch (nk)
        {
        case NUMBER_NEGATIVE:
          scanner_error (s, error, code, "tensor '%s': %s holds a negative number", tensor, what);
          return FALSE;
        case NUMBER_FRACTION:
          scanner_error (s, error, code, "tensor '%s': %s holds a number that is not an integer",
                         tensor, what);
          return FALSE;
        case NUMBER_TOO_LARGE:
          scanner_error (s, error, code, "tensor '%s': %s holds a number above 2^64 - 1",
                         tensor, what);
          return FALSE;
        case NUMBER_UINT:
          break;
        }
      g_array_append_val (out, v);
      if (!next_member (s, ']', &more, error))
        return FALSE;
    }
  return TRUE;
}

/* Bytes taken by @n elements of @dtype; FALSE if they overflow or do not
 * fill whole bytes (sub-byte dtypes). */
static gboolean
byte_size (LpDtype   dtype,
           guint64   n,
           guint64  *bytes,
           GError  **error,
           const char *origin,
           const char *tensor)
{
  guint bits = lp_dtype_get_bits (dtype);
  guint g = bits % 8 == 0 ? 8 : (bits % 4 == 0 ? 4 : 2);   /* gcd (bits, 8) */
  guint64 unit = 8 / g;         /* elements per whole number of bytes */
  guint64 per_unit = bits / g;  /* bytes in that many elements */

  if (n % unit != 0)
    {
      set_format_error (error, LP_FORMAT_ERROR_SHAPE, origin,
                        "tensor '%s': %" G_GUINT64_FORMAT " elements of %s (%u bits each) "
                        "do not fill whole bytes", tensor, n, lp_dtype_to_string (dtype), bits);
      return FALSE;
    }
  if (n / unit > G_MAXUINT64 / per_unit)
    {
      set_format_error (error, LP_FORMAT_ERROR_SHAPE, origin,
                        "tensor '%s': the byte size of the shape overflows", tensor);
      return FALSE;
    }
  *bytes = n / unit * per_unit;
  return TRUE;
}

static gboolean
read_entry (Scanner     *s,
            Header      *h,
            const char  *name,
            GError     **error)
{
  g_autoptr(GArray) shape = g_array_new (FALSE, FALSE, sizeof (guint64));
  g_autoptr(GArray) offsets = g_array_new (FALSE, FALSE, sizeof (guint64));
  gboolean have_dtype = FALSE, have_shape = FALSE, have_offsets = FALSE;
  gboolean more = TRUE;
  const char *kind;
  Entry e = { 0, };
  guint64 n = 1, bytes;
  g_autofree char *shape_str = NULL;

  kind = peek_value_kind (s, error);
  if (kind == NULL)
    return FALSE;
  if (peek (s) != '{')
    {
      scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': the entry is %s, not an object",
                     name, kind);
      return FALSE;
    }
  s->pos++;
  skip_ws (s);
  if (peek (s) == '}')
    {
      s->pos++;
      more = FALSE;
    }
  while (more)
    {
      skip_ws (s);
      if (peek (s) != '"')
        {
          char buf[16];
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected a key, found %s",
                         describe_char (peek (s), buf));
          return FALSE;
        }
      if (!read_string (s, error) || !expect_char (s, ':', error))
        return FALSE;
      skip_ws (s);

      if (strcmp (s->str->str, "dtype") == 0)
        {
          if (have_dtype)
            {
              scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': 'dtype' given twice", name);
              return FALSE;
            }
          have_dtype = TRUE;
          kind = peek_value_kind (s, error);
          if (kind == NULL)
            return FALSE;
          if (peek (s) != '"')
            {
              scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': dtype is %s, not a string",
                             name, kind);
              return FALSE;
            }
          if (!read_string (s, error))
            return FALSE;
          if (strlen (s->str->str) != s->str->len || !lp_dtype_from_string (s->str->str, &e.dtype))
            {
              g_autofree char *shown = g_strescape (s->str->str, NULL);
              scanner_error (s, error, LP_FORMAT_ERROR_DTYPE, "tensor '%s': unknown dtype '%s'",
                             name, shown);
              return FALSE;
            }
        }
      else if (strcmp (s->str->str, "shape") == 0)
        {
          if (have_shape)
            {
              scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': 'shape' given twice", name);
              return FALSE;
            }
          have_shape = TRUE;
          if (!read_uint_list (s, name, "shape", LP_FORMAT_ERROR_SHAPE, shape, error))
            return FALSE;
          if (shape->len > LP_TENSOR_MAX_DIMS)
            {
              scanner_error (s, error, LP_FORMAT_ERROR_SHAPE,
                             "tensor '%s': %u dimensions, at most %d are supported",
                             name, shape->len, LP_TENSOR_MAX_DIMS);
              return FALSE;
            }
        }
      else if (strcmp (s->str->str, "data_offsets") == 0)
        {
          if (have_offsets)
            {
              scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': 'data_offsets' given twice",
                             name);
              return FALSE;
            }
          have_offsets = TRUE;
          if (!read_uint_list (s, name, "data_offsets", LP_FORMAT_ERROR_OFFSETS, offsets, error))
            return FALSE;
          if (offsets->len != 2)
            {
              scanner_error (s, error, LP_FORMAT_ERROR_OFFSETS,
                             "tensor '%s': data_offsets must hold 2 numbers (begin and end), not %u",
                             name, offsets->len);
              return FALSE;
            }
        }
      else
        {
          /* The reference ignores unknown keys; carrying them would need a
           * place to keep them, dropping them silently would lose data. */
          g_autofree char *shown = g_strescape (s->str->str, NULL);
          scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': unknown key '%s'", name, shown);
          return FALSE;
        }
      if (!next_member (s, '}', &more, error))
        return FALSE;
    }

  if (!have_dtype || !have_shape || !have_offsets)
    {
      scanner_error (s, error, LP_FORMAT_ERROR_ENTRY, "tensor '%s': the entry has no '%s'", name,
                     !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
      return FALSE;
    }

  for (guint i = 0; i < shape->len; i++)
    {
      guint64 d = g_array_index (shape, guint64, i);
      if (d != 0 && n > G_MAXUINT64 / d)
        {
          set_format_error (error, LP_FORMAT_ERROR_SHAPE, s->origin,
                            "tensor '%s': the element count of the shape overflows", name);
          return FALSE;
        }
      n *= d;
    }
  if (!byte_size (e.dtype, n, &bytes, error, s->origin, name))
    return FALSE;

  e.begin = g_array_index (offsets, guint64, 0);
  e.end = g_array_index (offsets, guint64, 1);
  if (e.end < e.begin)
    {
      set_format_error (error, LP_FORMAT_ERROR_OFFSETS, s->origin,
                        "tensor '%s': data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                        "] end before they begin", name, e.begin, e.end);
      return FALSE;
    }
  if (e.end - e.begin != bytes)
    {
      shape_str = describe_shape ((const guint64 *) shape->data, shape->len);
      set_format_error (error, LP_FORMAT_ERROR_OFFSETS, s->origin,
                        "tensor '%s': data_offsets [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                        "] hold %" G_GUINT64_FORMAT " bytes but shape %s of %s needs %" G_GUINT64_FORMAT,
                        name, e.begin, e.end, e.end - e.begin, shape_str,
                        lp_dtype_to_string (e.dtype), bytes);
      return FALSE;
    }

  e.name = g_strdup (name);
  e.n_dims = shape->len;
  e.shape_start = h->dims->len;
  e.index = h->entries->len;
  g_array_append_vals (h->dims, shape->data, shape->len);
  g_array_append_val (h->entries, e);
  return TRUE;
}

static gboolean
read_metadata (Scanner  *s,
               Header   *h,
               GError  **error)
{
  g_autoptr(GHashTable) keys = g_hash_table_new (g_str_hash, g_str_equal);
  gboolean more = TRUE;
  const char *kind;

  if (h->has_metadata)
    {
      scanner_error (s, error, LP_FORMAT_ERROR_METADATA, "__metadata__ given twice");
      return FALSE;
    }
  h->has_metadata = TRUE;

  kind = peek_value_kind (s, error);
  if (kind == NULL)
    return FALSE;
  /* mlx-lm writes null; the reference reader (serde's Option) reads it as
   * no metadata. */
  if (g_str_equal (kind, "null"))
    {
      s->pos += strlen ("null");
      return TRUE;
    }
  if (peek (s) != '{')
    {
      scanner_error (s, error, LP_FORMAT_ERROR_METADATA, "__metadata__ is %s, not an object", kind);
      return FALSE;
    }
  s->pos++;
  skip_ws (s);
  if (peek (s) == '}')
    {
      s->pos++;
      return TRUE;
    }
  while (more)
    {
      char *key;

      skip_ws (s);
      if (peek (s) != '"')
        {
          char buf[16];
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected a key, found %s",
                         describe_char (peek (s), buf));
          return FALSE;
        }
      if (!read_string (s, error))
        return FALSE;
      key = g_strdup (s->str->str);
      g_ptr_array_add (h->metadata, key);
      if (!g_hash_table_add (keys, key))
        {
          scanner_error (s, error, LP_FORMAT_ERROR_METADATA, "__metadata__ key '%s' given twice", key);
          return FALSE;
        }
      if (!expect_char (s, ':', error))
        return FALSE;
      skip_ws (s);
      kind = peek_value_kind (s, error);
      if (kind == NULL)
        return FALSE;
      if (peek (s) != '"')
        {
          scanner_error (s, error, LP_FORMAT_ERROR_METADATA,
                         "__metadata__ value of '%s' is %s, not a string", key, kind);
          return FALSE;
        }
      if (!read_string (s, error))
        return FALSE;
      g_ptr_array_add (h->metadata, g_strdup (s->str->str));
      if (!next_member (s, '}', &more, error))
        return FALSE;
    }
  return TRUE;
}

static gboolean
read_header (Scanner  *s,
             Header   *h,
             GError  **error)
{
  gboolean more = TRUE;
  char buf[16];

  skip_ws (s);
  if (peek (s) != '{')
    {
      const char *kind = peek_value_kind (s, error);
      if (kind != NULL)
        scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "the header is %s, not a JSON object", kind);
      return FALSE;
    }
  s->pos++;
  skip_ws (s);
  if (peek (s) == '}')
    {
      s->pos++;
      more = FALSE;
    }
  while (more)
    {
      g_autofree char *name = NULL;

      skip_ws (s);
      if (peek (s) != '"')
        {
          scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX, "expected a tensor name, found %s",
                         describe_char (peek (s), buf));
          return FALSE;
        }
      if (!read_string (s, error) || !expect_char (s, ':', error))
        return FALSE;
      skip_ws (s);
      name = g_strdup (s->str->str);

      if (strcmp (name, "__metadata__") == 0)
        {
          if (!read_metadata (s, h, error))
            return FALSE;
        }
      else
        {
          if (g_hash_table_contains (h->names, name))
            {
              scanner_error (s, error, LP_FORMAT_ERROR_DUPLICATE, "tensor '%s' appears twice", name);
              return FALSE;
            }
          if (!read_entry (s, h, name, error))
            return FALSE;
          g_hash_table_add (h->names, g_steal_pointer (&name));
        }
      if (!next_member (s, '}', &more, error))
        return FALSE;
    }

  skip_ws (s);
  if (s->pos != s->len)
    {
      scanner_error (s, error, LP_FORMAT_ERROR_SYNTAX,
                     "%s after the header object (only spaces, tabs, CR and LF may pad it)",
                     describe_char (peek (s), buf));
      return FALSE;
    }
  return TRUE;
}

static int
compare_entries (gconstpointer a,
                 gconstpointer b)
{
  const Entry *x = a, *y = b;

  if (x->begin != y->begin)
    return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end)
    return x->end < y->end ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index;
}

/* After sorting by offset, the tensors must tile the data section exactly. */
static gboolean
check_tiling (Header      *h,
              guint64      data_size,
              const char  *origin,
              GError     **error)
{
  guint64 expected = 0;

  g_array_sort (h->entries, compare_entries);
  for (guint i = 0; i < h->entries->len; i++)
    {
      Entry *e = &g_array_index (h->entries, Entry, i);

      if (e->begin != expected)
        {
          if (i == 0)
            set_format_error (error, LP_FORMAT_ERROR_OFFSETS, origin,
                              "tensor '%s': the first tensor's data begins at %" G_GUINT64_FORMAT
                              ", not 0", e->name, e->begin);
          else if (e->begin > expected)
            set_format_error (error, LP_FORMAT_ERROR_OFFSETS, origin,
                              "tensor '%s': a gap of %" G_GUINT64_FORMAT " bytes before its data "
                              "(begins at %" G_GUINT64_FORMAT ", the previous tensor ends at %"
                              G_GUINT64_FORMAT ")", e->name, e->begin - expected, e->begin, expected);
          else
            set_format_error (error, LP_FORMAT_ERROR_OFFSETS, origin,
                              "tensor '%s': its data [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                              "] overlaps tensor '%s'", e->name, e->begin, e->end,
                              g_array_index (h->entries, Entry, i - 1).name);
          return FALSE;
        }
      expected = e->end;
    }

  if (expected > data_size)
    {
      set_format_error (error, LP_FORMAT_ERROR_TRUNCATED, origin,
                        "the tensors need %" G_GUINT64_FORMAT " bytes of data but the file holds %"
                        G_GUINT64_FORMAT " after the header", expected, data_size);
      return FALSE;
    }
  if (expected < data_size)
    {
      set_format_error (error, LP_FORMAT_ERROR_OFFSETS, origin,
                        "the data section holds %" G_GUINT64_FORMAT " bytes but the tensors "
                        "cover only the first %" G_GUINT64_FORMAT, data_size, expected);
      return FALSE;
    }
  return TRUE;
}

/* ---- tensors over the file --------------------------------------------- */

/* Loaded tensors are lazy: each lp_tensor_dup_data() hands out a fresh
 * zero-copy slice of the file, and when a slice from a mapping is dropped its
 * pages are given back. A tensor holding one slice for its whole life would
 * keep every page it was ever read through resident, and a 2 GiB checkpoint
 * would end with 2 GiB of RSS. */
/* An input file while its tensors are read (LpSourceFile, lp-private.h),
 * shared by its tensors and by every checkpoint made from them. Small
 * tensors are read with pread() into memory the allocator reuses, which on
 * virtual machines costs far less than faulting in the mapping's pages one
 * by one; bigger ones are views of the mapping. The descriptor keeps reading
 * the file it opened even when the output replaces its name (writing over
 * the input), so a file replaced by another is read whole and consistently,
 * and is no error; what can mix old and new data is the same file changed in
 * place, which the check below sees in fstat(). */
struct _LpSourceFile {
  gatomicrefcount ref;
  int fd;
  char *display;
  guchar *map;          /* the whole file, or NULL when empty */
  gsize map_size;
  int slot;             /* in the registry of mappings below, or -1 */
  struct stat opened;   /* fstat() at the open */
  gint shortened;       /* set by the SIGBUS handler, read atomically */
  gint64 fault_offset;  /* the first page read as zeros, or -1 (atomic) */
  GMutex lock;
  char *fault_tensor;   /* the tensor that read it, once known */
};

/* ---- reading a mapping that shrinks under it --------------------------- */

/* A page of a mapping past the end of its file raises SIGBUS, which kills
 * the process where it stands, temporary file and all. Reading big tensors
 * with pread() instead would cost a copy of every byte; checking the size
 * before each read would still race with a truncation during the read. So
 * the mappings lpipe reads are registered here, and a SIGBUS inside one puts
 * a page of zeros over the faulting page (the read goes on, on zeros) and
 * marks the file as shortened; lp_source_file_check() then fails the run,
 * before any sink commits, naming the file and the tensor. A SIGBUS anywhere
 * else goes to the handler that was there before, or kills as it would
 * have. The registry is a fixed table read by the handler without locks:
 * a slot is claimed with a compare-and-swap, and published by storing its
 * start address last. */
#define MAX_MAPPINGS 1024

typedef struct {
  gint used;
  guintptr start;       /* 0: not published */
  gsize size;
  LpSourceFile *source;
} MappingSlot;

static MappingSlot mappings[MAX_MAPPINGS];
static struct sigaction previous_sigbus;
static gsize sigbus_page_size;

static void
on_sigbus (int        signum,
           siginfo_t *info,
           void      *context)
{
  guintptr addr = (guintptr) info->si_addr;

  for (guint i = 0; info->si_code == BUS_ADRERR && i < MAX_MAPPINGS; i++)
    {
      guintptr start = __atomic_load_n (&mappings[i].start, __ATOMIC_ACQUIRE);

      if (start != 0 && addr >= start && addr - start < mappings[i].size)
        {
          LpSourceFile *source = mappings[i].source;
          guintptr page = addr & ~(guintptr) (sigbus_page_size - 1);
          gint64 none = -1;
          int saved_errno = errno;
          void *p = mmap ((void *) page, sigbus_page_size, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);

          errno = saved_errno;
          if (p == MAP_FAILED)
            break;
          __atomic_compare_exchange_n (&source->fault_offset, &none, (gint64) (page - start), FALSE,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED);
          __atomic_store_n (&source->shortened, 1, __ATOMIC_RELEASE);
          return;
        }
    }

  /* Not ours. */
  if (previous_sigbus.sa_flags & SA_SIGINFO)
    previous_sigbus.sa_sigaction (signum, info, context);
  else if (previous_sigbus.sa_handler != SIG_DFL && previous_sigbus.sa_handler != SIG_IGN)
    previous_sigbus.sa_handler (signum);
  else
    {
      /* A fault comes again when the handler returns, and now kills; a
       * SIGBUS that was sent is sent again (blocked until then). */
      signal (SIGBUS, SIG_DFL);
      if (info->si_code <= 0)
        raise (SIGBUS);
    }
}

static void
install_sigbus_handler (void)
{
  static gsize once = 0;

  if (g_once_init_enter (&once))
    {
      struct sigaction sa = { 0, };

      sigbus_page_size = sysconf (_SC_PAGESIZE);
      sa.sa_sigaction = on_sigbus;
      sa.sa_flags = SA_SIGINFO | SA_RESTART;
      sigemptyset (&sa.sa_mask);
      sigaction (SIGBUS, &sa, &previous_sigbus);
      g_once_init_leave (&once, 1);
    }
}

static int
register_mapping (LpSourceFile *source)
{
  install_sigbus_handler ();
  for (int i = 0; i < MAX_MAPPINGS; i++)
    {
      gint free_slot = 0;

      if (__atomic_compare_exchange_n (&mappings[i].used, &free_slot, 1, FALSE,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        {
          mappings[i].size = source->map_size;
          mappings[i].source = source;
          __atomic_store_n (&mappings[i].start, (guintptr) source->map, __ATOMIC_RELEASE);
          return i;
        }
    }
  /* More than MAX_MAPPINGS files open at once: this one is read unguarded,
   * as before there was a guard. */
  return -1;
}

static void
unregister_mapping (int slot)
{
  if (slot < 0)
    return;
  __atomic_store_n (&mappings[slot].start, 0, __ATOMIC_RELEASE);
  __atomic_store_n (&mappings[slot].used, 0, __ATOMIC_RELEASE);
}

LpSourceFile *
lp_source_file_ref (LpSourceFile *f)
{
  g_atomic_ref_count_inc (&f->ref);
  return f;
}

void
lp_source_file_unref (LpSourceFile *f)
{
  if (f && g_atomic_ref_count_dec (&f->ref))
    {
      if (f->map != NULL)
        {
          unregister_mapping (f->slot);
          munmap (f->map, f->map_size);
        }
      close (f->fd);
      g_mutex_clear (&f->lock);
      g_free (f->fault_tensor);
      g_free (f->display);
      g_free (f);
    }
}

static gboolean
same_time (const struct timespec *a,
           const struct timespec *b)
{
  return a->tv_sec == b->tv_sec && a->tv_nsec == b->tv_nsec;
}

static void
set_shortened_error (LpSourceFile  *f,
                     const char    *tensor,
                     GError       **error)
{
  g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_CHANGED,
               "Could not read “%s”: the file was shortened while open%s%s%s; nothing was written",
               f->display, tensor ? " (tensor '" : "", tensor ? tensor : "", tensor ? "')" : "");
}

/* Remembers which tensor read the zeros, for the message: called when a
 * view of [offset, offset + size) is dropped. */
static void
note_fault (LpSourceFile *f,
            gsize         offset,
            gsize         size,
            const char   *tensor)
{
  gint64 at;

  if (!__atomic_load_n (&f->shortened, __ATOMIC_ACQUIRE))
    return;
  at = __atomic_load_n (&f->fault_offset, __ATOMIC_RELAXED);
  /* The faulting page may begin before the tensor's first byte. */
  if (at < 0 || (guint64) at >= offset + size || (guint64) at + sigbus_page_size <= offset)
    return;
  g_mutex_lock (&f->lock);
  if (f->fault_tensor == NULL)
    f->fault_tensor = g_strdup (tensor);
  g_mutex_unlock (&f->lock);
}

/* @tensor, when given, is the one being read, for the message. */
static gboolean
source_file_check (LpSourceFile  *f,
                   const char    *tensor,
                   GError       **error)
{
  struct stat st;

  if (__atomic_load_n (&f->shortened, __ATOMIC_ACQUIRE))
    {
      g_autofree char *faulted = NULL;

      g_mutex_lock (&f->lock);
      faulted = g_strdup (f->fault_tensor);
      g_mutex_unlock (&f->lock);
      set_shortened_error (f, faulted ? faulted : tensor, error);
      return FALSE;
    }
  if (fstat (f->fd, &st) != 0)
    {
      int saved_errno = errno;
      g_set_error (error, G_IO_ERROR, g_io_error_from_errno (saved_errno),
                   "Could not look at “%s”: %s", f->display, g_strerror (saved_errno));
      return FALSE;
    }
  if (st.st_size < f->opened.st_size)
    {
      set_shortened_error (f, tensor, error);
      return FALSE;
    }
  /* The kernel sets both times on every write (and, since Linux 6.13, finely
   * enough once they were looked at). The change time also catches a writer
   * that puts the modification time back (rsync --inplace, touch -r); it
   * changes with chmod too, which fails a run that could have gone on but
   * never lets a mixed one pass. It changes as well when the name is taken
   * away (a file renamed over it, the sink writing over its input), which
   * leaves the bytes alone: with the link count changed, only the size and
   * the modification time count. */
  if (st.st_size != f->opened.st_size || !same_time (&st.st_mtim, &f->opened.st_mtim) ||
      (st.st_nlink == f->opened.st_nlink && !same_time (&st.st_ctim, &f->opened.st_ctim)))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_CHANGED,
                   "“%s” was changed while it was read (its %s differs from when it was "
                   "opened); the output would mix old and new data, so nothing was written",
                   f->display, st.st_size != f->opened.st_size ? "size"
                   : !same_time (&st.st_mtim, &f->opened.st_mtim) ? "modification time"
                   : "change time");
      return FALSE;
    }
  return TRUE;
}

gboolean
lp_source_file_check (LpSourceFile  *f,
                      GError       **error)
{
  return source_file_check (f, NULL, error);
}

static void
source_file_unref_notify (gpointer data)
{
  lp_source_file_unref (data);
}

/* Opens and maps @filename for reading, refusing anything but a regular
 * file: a FIFO would block open() until a writer came (for ever, past
 * Ctrl-C), and a device or a directory is not a file of tensors. The type is
 * checked on the open descriptor (opened non-blocking so that a FIFO returns
 * at once), so the file looked at is the file read. */
static LpSourceFile *
source_file_open (const char  *filename,
                  const char  *display,
                  GError     **error)
{
  LpSourceFile *source;
  struct stat st;
  const char *kind = NULL;
  int fd;

  do
    fd = open (filename, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0)
    {
      int saved_errno = errno;
      g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved_errno),
                   "Could not open “%s”: %s", display, g_strerror (saved_errno));
      return NULL;
    }
  if (fstat (fd, &st) != 0)
    {
      int saved_errno = errno;
      close (fd);
      g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved_errno),
                   "Could not look at “%s”: %s", display, g_strerror (saved_errno));
      return NULL;
    }
  if (S_ISDIR (st.st_mode))
    kind = "a directory";
  else if (S_ISFIFO (st.st_mode))
    kind = "a FIFO";
  else if (S_ISCHR (st.st_mode))
    kind = "a character device";
  else if (S_ISBLK (st.st_mode))
    kind = "a block device";
  else if (S_ISSOCK (st.st_mode))
    kind = "a socket";
  else if (!S_ISREG (st.st_mode))
    kind = "not a regular file";
  if (kind != NULL)
    {
      close (fd);
      g_set_error (error, G_FILE_ERROR, S_ISDIR (st.st_mode) ? G_FILE_ERROR_ISDIR : G_FILE_ERROR_INVAL,
                   "“%s” is %s, not a safetensors file", display, kind);
      return NULL;
    }
  if ((guint64) st.st_size > G_MAXSIZE)
    {
      close (fd);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "“%s” is too large to map", display);
      return NULL;
    }
  /* Reads of a regular file never block; pread() should not see O_NONBLOCK
   * all the same. */
  (void) fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);

  source = g_new0 (LpSourceFile, 1);
  g_atomic_ref_count_init (&source->ref);
  g_mutex_init (&source->lock);
  source->fd = fd;
  source->display = g_strdup (display);
  source->opened = st;
  source->slot = -1;
  source->fault_offset = -1;
  if (st.st_size > 0)
    {
      void *map = mmap (NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);

      if (map == MAP_FAILED)
        {
          int saved_errno = errno;
          g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved_errno),
                       "Could not map “%s”: %s", display, g_strerror (saved_errno));
          lp_source_file_unref (source);
          return NULL;
        }
      source->map = map;
      source->map_size = st.st_size;
      source->slot = register_mapping (source);
    }
  return source;
}

/* Bigger tensors stay zero-copy views of the mapping (see below). */
#define PREAD_MAX (16 * 1024 * 1024)

typedef struct {
  GBytes *file;
  LpSourceFile *source;   /* NULL when not read from a file */
  gsize offset;
  gsize size;
  gboolean mapped;
} Slice;

static void
slice_free (gpointer data)
{
  Slice *slice = data;

  g_bytes_unref (slice->file);
  if (slice->source)
    lp_source_file_unref (slice->source);
  g_free (slice);
}

static GBytes *
slice_pread (Slice     *slice,
             LpTensor  *tensor,
             GError   **error)
{
  guchar *buf = lp_try_alloc (slice->size, 1, "the read buffer", error);
  gsize done = 0;

  if (buf == NULL)
    {
      g_prefix_error (error, "tensor '%s': ", lp_tensor_get_name (tensor));
      return NULL;
    }

  while (done < slice->size)
    {
      ssize_t n = pread (slice->source->fd, buf + done, slice->size - done, slice->offset + done);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        {
          int saved_errno = n < 0 ? errno : EIO;
          g_free (buf);
          if (n == 0)
            set_shortened_error (slice->source, lp_tensor_get_name (tensor), error);
          else
            g_set_error (error, G_IO_ERROR, g_io_error_from_errno (saved_errno),
                         "Could not read “%s”: %s", slice->source->display, g_strerror (saved_errno));
          return NULL;
        }
      done += n;
    }
  return g_bytes_new_take (buf, slice->size);
}

typedef struct {
  GBytes *file;
  LpSourceFile *source;
  const guchar *start;
  gsize size;
  char *tensor;
} MappedView;

static void
mapped_view_release (gpointer data)
{
  MappedView *view = data;
  gsize page = sysconf (_SC_PAGESIZE);
  guintptr lo = ((guintptr) view->start + page - 1) & ~(guintptr) (page - 1);
  guintptr hi = ((guintptr) view->start + view->size) & ~(guintptr) (page - 1);

  if (view->source)
    note_fault (view->source, view->start - view->source->map, view->size, view->tensor);
  /* Only whole pages inside the range: neighbours keep theirs. The mapping is
   * private, read-only and never written, so dropped pages are re-read from
   * the file if anybody asks again. */
  if (hi > lo)
    madvise ((void *) lo, hi - lo, MADV_DONTNEED);
  g_bytes_unref (view->file);
  g_free (view->tensor);
  g_free (view);
}

static GBytes *
slice_get_data (LpTensor  *tensor,
                gpointer   user_data,
                GError   **error)
{
  Slice *slice = user_data;
  const guchar *base = g_bytes_get_data (slice->file, NULL);
  MappedView *view;

  if (!slice->mapped)
    return g_bytes_new_from_bytes (slice->file, slice->offset, slice->size);
  if (slice->source && slice->size <= PREAD_MAX)
    return slice_pread (slice, tensor, error);

  /* One fstat() per big tensor: a file that has already shrunk or changed
   * fails here, before its pages are read (a change during the read is
   * caught before the sink commits). */
  if (slice->source && !source_file_check (slice->source, lp_tensor_get_name (tensor), error))
    return NULL;
  view = g_new (MappedView, 1);
  view->file = g_bytes_ref (slice->file);
  view->source = slice->source;   /* alive while view->file is */
  view->start = base + slice->offset;
  view->size = slice->size;
  view->tensor = g_strdup (lp_tensor_get_name (tensor));
  return g_bytes_new_with_free_func (view->start, view->size, mapped_view_release, view);
}

static LpCheckpoint *
load_bytes (GBytes      *bytes,
            gboolean     mapped,
            LpSourceFile *source,
            const char  *origin,
            GError     **error)
{
  gsize size;
  const guchar *p = g_bytes_get_data (bytes, &size);
  guint64 n = 0;
  gsize bad_pos;
  Header h = { 0, };
  Scanner s = { 0, };
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  gboolean ok;

  if (size < 8)
    {
      set_format_error (error, LP_FORMAT_ERROR_TRUNCATED, origin,
                        "%" G_GSIZE_FORMAT " bytes, too short for the 8-byte header length", size);
      return NULL;
    }
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | p[i];
  if (n == 0 || n > LP_SAFETENSORS_MAX_HEADER)
    {
      set_format_error (error, LP_FORMAT_ERROR_HEADER_SIZE, origin,
                        "the header length is %" G_GUINT64_FORMAT "%s", n,
                        n == 0 ? "" : ", above the limit of 100000000 bytes");
      return NULL;
    }
  if (n > size - 8)
    {
      set_format_error (error, LP_FORMAT_ERROR_TRUNCATED, origin,
                        "the header length %" G_GUINT64_FORMAT " runs past the end of the file "
                        "(%" G_GSIZE_FORMAT " bytes)", n, size);
      return NULL;
    }

  if (!utf8_validate_strict (p + 8, n, &bad_pos))
    {
      set_format_error (error, LP_FORMAT_ERROR_ENCODING, origin,
                        "header byte %" G_GSIZE_FORMAT ": the header is not valid UTF-8", bad_pos);
      return NULL;
    }
  if (!check_depth (p + 8, n, HEADER_MAX_DEPTH, &bad_pos))
    {
      set_format_error (error, LP_FORMAT_ERROR_TOO_DEEP, origin,
                        "header byte %" G_GSIZE_FORMAT ": the header nests deeper than %d levels",
                        bad_pos, HEADER_MAX_DEPTH);
      return NULL;
    }

  s.origin = origin;
  s.p = p + 8;
  s.len = n;
  s.str = g_string_new (NULL);
  h.entries = g_array_new (FALSE, FALSE, sizeof (Entry));
  h.dims = g_array_new (FALSE, FALSE, sizeof (guint64));
  h.names = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  h.metadata = g_ptr_array_new_with_free_func (g_free);

  ok = read_header (&s, &h, error) && check_tiling (&h, size - 8 - n, origin, error);
  g_string_free (s.str, TRUE);
  if (!ok)
    {
      header_clear (&h);
      return NULL;
    }

  checkpoint = lp_checkpoint_new ();
  for (guint i = 0; i < h.entries->len; i++)
    {
      Entry *e = &g_array_index (h.entries, Entry, i);
      Slice *slice = g_new (Slice, 1);
      g_autoptr(LpTensor) tensor = NULL;

      slice->file = g_bytes_ref (bytes);
      slice->offset = 8 + n + e->begin;
      slice->size = e->end - e->begin;
      slice->mapped = mapped;
      slice->source = source ? lp_source_file_ref (source) : NULL;
      /* A scalar has no dims, and h.dims may have no storage at all: no
       * pointer arithmetic on it then (undefined behaviour on NULL). */
      tensor = lp_tensor_new_lazy (e->name, e->dtype,
                                   e->n_dims > 0 ? &g_array_index (h.dims, guint64, e->shape_start) : NULL,
                                   e->n_dims, slice_get_data, slice, slice_free, error);
      if (tensor == NULL || !lp_checkpoint_add_tensor (checkpoint, tensor, error))
        {
          g_prefix_error (error, "%s: ", origin);
          header_clear (&h);
          return NULL;
        }
    }
  for (guint i = 0; i + 1 < h.metadata->len; i += 2)
    lp_checkpoint_set_metadata (checkpoint, h.metadata->pdata[i], h.metadata->pdata[i + 1]);
  lp_checkpoint_set_origin (checkpoint, origin);

  header_clear (&h);
  return g_steal_pointer (&checkpoint);
}

/**
 * lp_safetensors_load_from_bytes:
 * @bytes: the whole content of a safetensors file
 * @origin: (nullable): a name for error messages, such as the file's name
 * @error: return location for a #GError
 *
 * Reads a checkpoint from memory, with the same checks as
 * lp_safetensors_load(). The tensors share @bytes; nothing is copied.
 *
 * Returns: (transfer full): the checkpoint, or %NULL with an
 *   %LP_FORMAT_ERROR if @bytes is not a valid safetensors file
 */
LpCheckpoint *
lp_safetensors_load_from_bytes (GBytes      *bytes,
                                const char  *origin,
                                GError     **error)
{
  g_return_val_if_fail (bytes != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  return load_bytes (bytes, FALSE, NULL, origin ? origin : "safetensors data", error);
}

/* For `X.safetensors` the PEFT config is `X.adapter_config.json` (how the
 * files of lora-samples are named), for PEFT's own `adapter_model.safetensors`
 * it is `adapter_config.json` beside it. */
static char *
adapter_config_path (const char *filename,
                     gboolean    for_writing)
{
  g_autofree char *dir = g_path_get_dirname (filename);
  g_autofree char *base = g_path_get_basename (filename);
  g_autofree char *stem = NULL;
  g_autofree char *named = NULL;

  if (g_str_has_suffix (base, ".safetensors"))
    stem = g_strndup (base, strlen (base) - strlen (".safetensors"));
  else
    stem = g_strdup (base);

  /* mlx_lm.lora saves adapters.safetensors beside its adapter_config.json */
  if (strcmp (base, "adapter_model.safetensors") == 0 || strcmp (base, "adapters.safetensors") == 0)
    {
      g_autofree char *own = g_strconcat (stem, ".adapter_config.json", NULL);
      named = g_build_filename (dir, own, NULL);
      if (for_writing || !g_file_test (named, G_FILE_TEST_EXISTS))
        return g_build_filename (dir, "adapter_config.json", NULL);
      return g_steal_pointer (&named);
    }
  named = g_strconcat (stem, ".adapter_config.json", NULL);
  return g_build_filename (dir, named, NULL);
}

/* A PEFT adapter_config.json is a few kB; mlx-lm's too. */
#define CONFIG_MAX_BYTES (1u << 20)

/* The config beside an input, read only if it is a regular file (a link is
 * followed, as Hugging Face's cache links every file of a snapshot, but
 * only to a regular file): a FIFO would block the open, a device never
 * end. *@contents stays NULL when there is no config. */
static gboolean
read_config_file (const char  *path,
                  const char  *display,
                  char       **contents,
                  gsize       *len,
                  GError     **error)
{
  struct stat st;
  char *buf;
  gsize done = 0;
  int fd;

  *contents = NULL;
  fd = g_open (path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY, 0);
  if (fd < 0 && (errno == ENOENT || errno == ENAMETOOLONG))
    return TRUE;   /* none (a 250-byte input name leaves no room for one) */
  if (fd < 0)
    {
      int saved_errno = errno;
      g_set_error (error, G_FILE_ERROR, g_file_error_from_errno (saved_errno),
                   "Could not read “%s”: %s", display, g_strerror (saved_errno));
      return FALSE;
    }
  if (fstat (fd, &st) != 0 || !S_ISREG (st.st_mode))
    {
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                   "“%s”: not a regular file (a folder, FIFO or device): an adapter config must be "
                   "a plain JSON file", display);
      close (fd);
      return FALSE;
    }
  if ((guint64) st.st_size > CONFIG_MAX_BYTES)
    {
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                   "“%s”: %" G_GUINT64_FORMAT " bytes, more than any adapter config (at most %u)",
                   display, (guint64) st.st_size, CONFIG_MAX_BYTES);
      close (fd);
      return FALSE;
    }
  buf = g_malloc (st.st_size + 1);
  while (done < (gsize) st.st_size)
    {
      ssize_t n = read (fd, buf + done, st.st_size - done);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        break;
      done += n;
    }
  close (fd);
  buf[done] = '\0';
  *contents = buf;
  *len = done;
  return TRUE;
}

/* Whether a JSON object is an adapter's config: PEFT always writes
 * peft_type (PeftConfigMixin.to_dict), hand-written ones at least r or
 * target_modules, mlx-lm its lora_parameters. */
static gboolean
is_adapter_config (JsonObject *config)
{
  static const char *const keys[] = { "peft_type", "r", "lora_alpha", "target_modules", "lora_parameters" };

  for (guint i = 0; i < G_N_ELEMENTS (keys); i++)
    if (json_object_has_member (config, keys[i]))
      return TRUE;
  return FALSE;
}

static gboolean
read_adapter_config (LpCheckpoint  *checkpoint,
                     const char    *filename,
                     GError       **error)
{
  g_autofree char *path = adapter_config_path (filename, FALSE);
  g_autofree char *display = g_filename_display_name (path);
  g_autofree char *contents = NULL;
  g_autoptr(JsonParser) parser = NULL;
  g_autoptr(GError) local_error = NULL;
  JsonNode *root;
  gsize len, bad_pos;

  if (!read_config_file (path, display, &contents, &len, error))
    return FALSE;
  if (contents == NULL)
    return TRUE;   /* there is none */
  if (!g_utf8_validate_len (contents, len, NULL))
    {
      set_format_error (error, LP_FORMAT_ERROR_ENCODING, display, "not valid UTF-8");
      return FALSE;
    }
  if (!check_depth ((const guchar *) contents, len, CONFIG_MAX_DEPTH, &bad_pos))
    {
      set_format_error (error, LP_FORMAT_ERROR_TOO_DEEP, display,
                        "byte %" G_GSIZE_FORMAT ": nests deeper than %d levels", bad_pos,
                        CONFIG_MAX_DEPTH);
      return FALSE;
    }
  parser = json_parser_new ();
  if (!json_parser_load_from_data (parser, contents, len, &local_error))
    {
      set_format_error (error, LP_FORMAT_ERROR_SYNTAX, display, "%s", local_error->message);
      return FALSE;
    }
  root = json_parser_get_root (parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      set_format_error (error, LP_FORMAT_ERROR_SYNTAX, display, "not a JSON object");
      return FALSE;
    }
  if (!is_adapter_config (json_node_get_object (root)))
    {
      /* its text would be copied beside the output: never a JSON file of
       * some other kind that a link or a mistake put here */
      set_format_error (error, LP_FORMAT_ERROR_SYNTAX, display,
                        "not an adapter config (none of PEFT's peft_type, r, lora_alpha, target_modules "
                        "or mlx-lm's lora_parameters); move it away to read the weights alone");
      return FALSE;
    }
  lp_checkpoint_set_adapter_config (checkpoint, contents);
  return TRUE;
}

/**
 * lp_safetensors_load:
 * @filename: (type filename): the file to read
 * @error: return location for a #GError
 *
 * Maps a safetensors file and checks all of it (header syntax and encoding,
 * every entry, offsets tiling the data section exactly to the end of the
 * file) before handing out any tensor. Tensors are ordered as their data is
 * in the file, and their bytes are zero-copy views of the mapping.
 *
 * A PEFT `adapter_config.json` beside the file (`X.adapter_config.json` for
 * `X.safetensors`, or `adapter_config.json` for `adapter_model.safetensors`)
 * is read into lp_checkpoint_get_adapter_config().
 *
 * Returns: (transfer full): the checkpoint, or %NULL with a #GFileError or an
 *   %LP_FORMAT_ERROR naming the file and the problem
 */
LpCheckpoint *
lp_safetensors_load (const char  *filename,
                     GError     **error)
{
  g_autoptr(GBytes) bytes = NULL;
  g_autoptr(LpCheckpoint) checkpoint = NULL;
  g_autofree char *display = NULL;
  LpSourceFile *source;

  g_return_val_if_fail (filename != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  display = g_filename_display_name (filename);
  source = source_file_open (filename, display, error);
  if (source == NULL)
    return NULL;
  if (source->map != NULL)
    bytes = g_bytes_new_with_free_func (source->map, source->map_size, source_file_unref_notify,
                                        lp_source_file_ref (source));
  else
    bytes = g_bytes_new_static ("", 0);
  checkpoint = load_bytes (bytes, source->map != NULL, source, display, error);
  if (checkpoint != NULL)
    {
      lp_checkpoint_add_source (checkpoint, source);
      /* The header itself may have been cut off under the parser. */
      if (!lp_checkpoint_check_sources (checkpoint, error))
        g_clear_object (&checkpoint);
    }
  else
    {
      g_autoptr(GError) cause = NULL;
      if (!lp_source_file_check (source, &cause))
        {
          g_clear_error (error);
          g_propagate_error (error, g_steal_pointer (&cause));
        }
    }
  lp_source_file_unref (source);
  if (checkpoint == NULL)
    return NULL;
  if (!read_adapter_config (checkpoint, filename, error))
    return NULL;
  lp_checkpoint_set_origin (checkpoint, filename);
  return g_steal_pointer (&checkpoint);
}

/* ---- output files ------------------------------------------------------ */

/* Where the sink's bytes go. A regular file (or a name not yet taken) is
 * written under a temporary name in its directory and renamed over once
 * complete and on disk: readers see the old file or the new one, never a
 * part, and a file that is mapped (the input itself, perhaps) is never
 * truncated under its reader. A symlink is followed, as cp and shells do,
 * and its target replaced the same way, so the link stays a link.
 *
 * A FIFO or a character device (/dev/null, a terminal) cannot be replaced
 * and must not be: renaming over /dev/null would turn it into a file that
 * everything else then fills. Those are written through as a stream, in
 * order, with no atomicity (a failed run leaves part of a file in the
 * stream), which is what cp and shell redirections do. So is a file reached
 * through /proc (/dev/stdout, /dev/fd/N): the link names another process's
 * view of a descriptor, and replacing the file behind it would leave that
 * descriptor on the old one. Block devices, sockets and directories are
 * refused. */
typedef struct {
  char *path;           /* the file to replace: the end of any symlinks */
  char *tmp_path;       /* the temporary file's name; NULL while it has none */
  char *display;        /* as the user named it */
  int fd;
  gboolean stream;      /* written through, never renamed */
  gboolean unnamed;     /* an O_TMPFILE, linked in by atomic_file_rename() */
  GCancellable *cancellable;
  guchar *buffer;
  gsize buffered;
} AtomicFile;

static void
set_io_error (GError     **error,
              int          saved_errno,
              const char  *what,
              const char  *display)
{
  g_set_error (error, G_IO_ERROR, g_io_error_from_errno (saved_errno),
               "%s “%s”: %s", what, display, g_strerror (saved_errno));
}

/* What a file that is not a regular file is, for messages; NULL for the
 * kinds that are written through. */
static const char *
describe_refused_type (mode_t mode)
{
  if (S_ISDIR (mode))
    return "a directory";
  if (S_ISBLK (mode))
    return "a block device";
  if (S_ISSOCK (mode))
    return "a socket";
  if (S_ISREG (mode) || S_ISFIFO (mode) || S_ISCHR (mode))
    return NULL;
  return "not a regular file";
}

/* Follows @path's symlinks to what is to be written: *target (a regular
 * file or a free name, replaced atomically; or, with *stream, something
 * written through). */
static gboolean
resolve_output (const char  *path,
                const char  *display,
                char       **target,
                gboolean    *stream,
                GError     **error)
{
  g_autofree char *current = g_strdup (path);

  /* The kernel's own limit on links in a path (MAXSYMLINKS). */
  for (guint links = 0; ; links++)
    {
      struct stat st;
      const char *refused;
      char *next;

      if (lstat (current, &st) != 0)
        {
          if (errno != ENOENT)
            {
              set_io_error (error, errno, "Could not look at", display);
              return FALSE;
            }
          *target = g_steal_pointer (&current);
          *stream = FALSE;
          return TRUE;
        }
      if (S_ISLNK (st.st_mode) && g_str_has_prefix (current, "/proc/"))
        {
          /* /proc/self/fd/1 and friends: not a name to put a file under. */
          if (stat (current, &st) != 0)
            {
              set_io_error (error, errno, "Could not look at", display);
              return FALSE;
            }
          refused = describe_refused_type (st.st_mode);
          if (refused != NULL)
            goto refuse;
          *target = g_steal_pointer (&current);
          *stream = TRUE;
          return TRUE;
        }
      if (S_ISLNK (st.st_mode))
        {
          g_autofree char *link = NULL;
          GError *local_error = NULL;

          if (links >= 40)
            {
              set_io_error (error, ELOOP, "Could not follow the symbolic links of", display);
              return FALSE;
            }
          link = g_file_read_link (current, &local_error);
          if (link == NULL)
            {
              g_propagate_error (error, local_error);
              return FALSE;
            }
          if (g_path_is_absolute (link))
            next = g_steal_pointer (&link);
          else
            {
              g_autofree char *dir = g_path_get_dirname (current);
              next = g_build_filename (dir, link, NULL);
            }
          g_free (current);
          current = next;
          continue;
        }
      refused = describe_refused_type (st.st_mode);
      if (refused != NULL)
        goto refuse;
      *stream = !S_ISREG (st.st_mode);
      *target = g_steal_pointer (&current);
      return TRUE;

    refuse:
      g_set_error (error, G_IO_ERROR,
                   S_ISDIR (st.st_mode) ? G_IO_ERROR_IS_DIRECTORY : G_IO_ERROR_NOT_REGULAR_FILE,
                   "Could not write “%s”: it is %s (lpipe writes regular files, replacing them "
                   "atomically, and writes through to FIFOs and character devices)",
                   display, refused);
      return FALSE;
    }
}

static void
atomic_file_free (AtomicFile *f)
{
  /* Unlinked while still locked, so no cleaner of another run races us. */
  if (f->tmp_path)
    g_unlink (f->tmp_path);
  if (f->fd >= 0)
    close (f->fd);
  g_free (f->path);
  g_free (f->tmp_path);
  g_free (f->display);
  g_clear_object (&f->cancellable);
  g_free (f->buffer);
  g_free (f);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC (AtomicFile, atomic_file_free)

/* Waits up to 100 ms for @fd to take more bytes; FALSE with an error once
 * @f's run is cancelled. A stream is written non-blocking so that a reader
 * that stops reading cannot hold the run past Ctrl-C. */
static gboolean
wait_writable (AtomicFile  *f,
               GError     **error)
{
  struct pollfd pfd = { f->fd, POLLOUT, 0 };

  if (g_cancellable_set_error_if_cancelled (f->cancellable, error))
    return FALSE;
  (void) poll (&pfd, 1, 100);
  return TRUE;
}

/* Opens a stream output for writing. A FIFO opened for writing waits for a
 * reader (as a shell redirection does), but here the wait is a loop that
 * ends when the run is cancelled. */
static gboolean
open_stream (AtomicFile  *f,
             GError     **error)
{
  struct stat st;
  int flags;

  for (;;)
    {
      f->fd = open (f->path, O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
      if (f->fd >= 0)
        break;
      if (errno == EINTR)
        continue;
      if (errno != ENXIO)
        {
          set_io_error (error, errno, "Could not open", f->display);
          return FALSE;
        }
      /* ENXIO: a FIFO with no reader yet. */
      if (g_cancellable_set_error_if_cancelled (f->cancellable, error))
        return FALSE;
      g_usleep (20 * 1000);
    }
  /* It may have been replaced since it was looked at. */
  if (fstat (f->fd, &st) != 0)
    {
      set_io_error (error, errno, "Could not look at", f->display);
      return FALSE;
    }
  if (S_ISREG (st.st_mode))
    {
      /* A file behind /proc/self/fd/N: written from its start, as `cp x
       * /dev/stdout` does. */
      if (ftruncate (f->fd, 0) != 0 && errno != EINVAL)
        {
          set_io_error (error, errno, "Could not write", f->display);
          return FALSE;
        }
      flags = fcntl (f->fd, F_GETFL);
      (void) fcntl (f->fd, F_SETFL, flags & ~O_NONBLOCK);
    }
  else if (describe_refused_type (st.st_mode) != NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_REGULAR_FILE,
                   "Could not write “%s”: it is %s", f->display, describe_refused_type (st.st_mode));
      return FALSE;
    }
  return TRUE;
}

/* The temporary file. Where the file system allows it is an unnamed
 * O_TMPFILE in the output's directory: a run killed by anything, SIGKILL
 * included, leaves nothing behind, since nothing but the open descriptor
 * holds it. Once complete it is linked in under a temporary name and renamed
 * over the output (linkat() cannot replace a file, rename() can, atomically).
 * Elsewhere (file systems without O_TMPFILE) it is named from the start. A
 * named temporary file is locked (flock) for as long as its writer lives, so
 * that a later run can tell a stale one, left by a killed run, from one that
 * a live run is writing, and remove it: TEMP_MARK in the name says it is
 * lpipe's, and nothing else of that name is touched. */
#define TEMP_MARK ".lpipe-"
#define TEMP_RANDOM 6

/* ".NAME.lpipe-XXXXXX" must fit NAME_MAX (255 bytes) when NAME does: a long
 * name is cut, at a character boundary. */
static char *
temp_prefix (const char *base)
{
  gsize room = 255 - 1 - strlen (TEMP_MARK) - TEMP_RANDOM;
  gsize n = strlen (base);

  if (n > room)
    {
      n = room;
      while (n > 0 && ((guchar) base[n] & 0xc0) == 0x80)
        n--;
    }
  return g_strdup_printf (".%.*s" TEMP_MARK, (int) n, base);
}

/* Removes the temporary files of earlier runs writing @prefix's output that
 * no process holds any more (a run killed where no handler runs). Only
 * regular files of ours, of exactly our naming; one a live run holds is
 * locked and kept. Failures are not errors: this is tidying. */
static void
remove_stale_temp_files (const char *dir,
                         const char *prefix)
{
  gsize prefix_len = strlen (prefix);
  DIR *d = opendir (dir);
  struct dirent *entry;

  if (d == NULL)
    return;
  while ((entry = readdir (d)) != NULL)
    {
      const char *name = entry->d_name;
      struct stat st, now;
      int fd;

      if (strncmp (name, prefix, prefix_len) != 0 || strlen (name + prefix_len) != TEMP_RANDOM)
        continue;
      fd = openat (dirfd (d), name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
      if (fd < 0)
        continue;
      if (fstat (fd, &st) == 0 && S_ISREG (st.st_mode) && st.st_uid == geteuid ()
          && flock (fd, LOCK_EX | LOCK_NB) == 0
          /* Still the file we locked under that name. */
          && fstatat (dirfd (d), name, &now, AT_SYMLINK_NOFOLLOW) == 0
          && now.st_dev == st.st_dev && now.st_ino == st.st_ino)
        (void) unlinkat (dirfd (d), name, 0);
      close (fd);
    }
  closedir (d);
}

static char *
random_temp_name (const char *dir,
                  const char *prefix)
{
  static const char letters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  char suffix[TEMP_RANDOM + 1];
  g_autofree char *name = NULL;

  for (guint i = 0; i < TEMP_RANDOM; i++)
    suffix[i] = letters[g_random_int_range (0, sizeof letters - 1)];
  suffix[TEMP_RANDOM] = '\0';
  name = g_strconcat (prefix, suffix, NULL);
  return g_build_filename (dir, name, NULL);
}

/* A named temporary file, locked. A cleaner of another run may remove it
 * between its creation and the lock: then it is made again. */
static gboolean
create_named_temp (AtomicFile  *f,
                   const char  *dir,
                   const char  *prefix,
                   GError     **error)
{
  for (guint attempt = 0; attempt < 100; attempt++)
    {
      char *tmpl = g_strconcat (dir, G_DIR_SEPARATOR_S, prefix, "XXXXXX", NULL);
      struct stat st;

      /* 0666 less the umask, as for any new file. */
      f->fd = g_mkstemp_full (tmpl, O_WRONLY | O_CLOEXEC, 0666);
      if (f->fd < 0)
        {
          int saved_errno = errno;
          g_free (tmpl);
          set_io_error (error, saved_errno, "Could not create a temporary file beside", f->display);
          return FALSE;
        }
      if (flock (f->fd, LOCK_EX) == 0 && fstat (f->fd, &st) == 0 && st.st_nlink > 0)
        {
          f->tmp_path = tmpl;
          return TRUE;
        }
      close (f->fd);
      f->fd = -1;
      g_free (tmpl);
    }
  set_io_error (error, EAGAIN, "Could not create a temporary file beside", f->display);
  return FALSE;
}

static AtomicFile *
atomic_file_new (const char    *path,
                 GCancellable  *cancellable,
                 GError       **error)
{
  g_autoptr(AtomicFile) f = g_new0 (AtomicFile, 1);
  g_autofree char *dir = NULL;
  g_autofree char *base = NULL;
  g_autofree char *prefix = NULL;
  struct stat st;

  f->fd = -1;
  f->display = g_filename_display_name (path);
  f->cancellable = cancellable ? g_object_ref (cancellable) : NULL;
  if (!resolve_output (path, f->display, &f->path, &f->stream, error))
    return NULL;
  if (f->stream)
    return open_stream (f, error) ? g_steal_pointer (&f) : NULL;

  dir = g_path_get_dirname (f->path);
  base = g_path_get_basename (f->path);
  prefix = temp_prefix (base);
  remove_stale_temp_files (dir, prefix);

  /* 0666 less the umask, as for any new file. */
  f->fd = open (dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
  if (f->fd >= 0)
    {
      f->unnamed = TRUE;
      /* Locked before it has a name, so it is never seen unlocked. */
      (void) flock (f->fd, LOCK_EX);
    }
  else if (!create_named_temp (f, dir, prefix, error))
    return NULL;
  /* Replacing a file keeps its permissions. */
  if (g_stat (f->path, &st) == 0 && S_ISREG (st.st_mode))
    (void) fchmod (f->fd, st.st_mode & 07777);
  return g_steal_pointer (&f);
}

static gboolean
write_all (AtomicFile    *f,
           const guchar  *data,
           gsize          len,
           GError       **error)
{
  gboolean ok = TRUE;
  sigset_t pipe_set, old_set;

  /* A stream whose reader went away would kill the process with SIGPIPE;
   * blocked for this thread, write() fails with EPIPE instead and the run
   * ends in an error like any other. */
  if (f->stream)
    {
      sigemptyset (&pipe_set);
      sigaddset (&pipe_set, SIGPIPE);
      pthread_sigmask (SIG_BLOCK, &pipe_set, &old_set);
    }
  while (len > 0)
    {
      /* Linux writes at most ~2 GiB per call. */
      ssize_t n = write (f->fd, data, MIN (len, (gsize) 1 << 30));
      if (n < 0)
        {
          int saved_errno = errno;
          if (saved_errno == EINTR)
            continue;
          if (saved_errno == EAGAIN && f->stream)
            {
              if (!(ok = wait_writable (f, error)))
                break;
              continue;
            }
          if (saved_errno == EPIPE && f->stream && !sigismember (&old_set, SIGPIPE))
            {
              /* The SIGPIPE is pending now: take it back. */
              const struct timespec zero = { 0, 0 };
              (void) sigtimedwait (&pipe_set, NULL, &zero);
            }
          set_io_error (error, saved_errno, "Could not write", f->display);
          ok = FALSE;
          break;
        }
      data += n;
      len -= n;
    }
  if (f->stream)
    pthread_sigmask (SIG_SETMASK, &old_set, NULL);
  return ok;
}

static gboolean
atomic_file_flush (AtomicFile  *f,
                   GError     **error)
{
  gsize n = f->buffered;

  f->buffered = 0;
  return write_all (f, f->buffer, n, error);
}

static gboolean
atomic_file_write (AtomicFile     *f,
                   gconstpointer   data,
                   gsize           len,
                   GError        **error)
{
  if (f->buffered + len <= WRITE_BUFFER_SIZE)
    {
      if (f->buffer == NULL)
        f->buffer = g_malloc (WRITE_BUFFER_SIZE);
      memcpy (f->buffer + f->buffered, data, len);
      f->buffered += len;
      return TRUE;
    }
  if (!atomic_file_flush (f, error))
    return FALSE;
  if (len < WRITE_BUFFER_SIZE / 2)
    return atomic_file_write (f, data, len, error);
  return write_all (f, data, len, error);
}

/* Puts the data on disk; atomic_file_rename() then puts it in place. Two
 * files committed together (the weights and their PEFT config) are both
 * finished before either is renamed. A file keeps its descriptor (and its
 * lock, and an unnamed file its existence) until it is renamed. */
static gboolean
atomic_file_finish (AtomicFile  *f,
                    GError     **error)
{
  if (!atomic_file_flush (f, error))
    return FALSE;
  /* A FIFO or a device has nothing to make durable (fsync fails on most). */
  if (!f->stream && fsync (f->fd) != 0)
    {
      set_io_error (error, errno, "Could not write", f->display);
      return FALSE;
    }
  if (f->stream)
    {
      int fd = f->fd;

      f->fd = -1;
      if (close (fd) != 0)
        {
          set_io_error (error, errno, "Could not write", f->display);
          return FALSE;
        }
    }
  return TRUE;
}

/* Gives the unnamed temporary file a name beside the output. linkat() of
 * /proc/self/fd/N needs no privilege; AT_EMPTY_PATH is the way without
 * /proc (it needs CAP_DAC_READ_SEARCH). */
static gboolean
link_unnamed (AtomicFile  *f,
              GError     **error)
{
  g_autofree char *dir = g_path_get_dirname (f->path);
  g_autofree char *base = g_path_get_basename (f->path);
  g_autofree char *prefix = temp_prefix (base);
  char proc[64];

  g_snprintf (proc, sizeof proc, "/proc/self/fd/%d", f->fd);
  for (guint attempt = 0; attempt < 100; attempt++)
    {
      char *name = random_temp_name (dir, prefix);
      int rc = linkat (AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW);

      if (rc != 0 && errno == ENOENT)
        rc = linkat (f->fd, "", AT_FDCWD, name, AT_EMPTY_PATH);
      if (rc == 0)
        {
          f->tmp_path = name;
          f->unnamed = FALSE;
          return TRUE;
        }
      g_free (name);
      if (errno != EEXIST)
        {
          set_io_error (error, errno, "Could not replace", f->display);
          return FALSE;
        }
    }
  set_io_error (error, EEXIST, "Could not replace", f->display);
  return FALSE;
}

static gboolean
atomic_file_rename (AtomicFile  *f,
                    GError     **error)
{
  g_autofree char *dir = NULL;
  int dir_fd, fd;

  if (f->stream)
    return TRUE;
  if (f->unnamed && !link_unnamed (f, error))
    return FALSE;
  if (g_rename (f->tmp_path, f->path) != 0)
    {
      set_io_error (error, errno, "Could not replace", f->display);
      return FALSE;
    }
  g_clear_pointer (&f->tmp_path, g_free);
  /* In place and synced: the lock has done its work. */
  fd = f->fd;
  f->fd = -1;
  close (fd);

  /* The rename is durable only once the directory is. */
  dir = g_path_get_dirname (f->path);
  dir_fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0)
    {
      int rc = fsync (dir_fd);
      int saved_errno = errno;
      close (dir_fd);
      /* Some file systems cannot sync directories; the file is in place. */
      if (rc != 0 && saved_errno != EINVAL && saved_errno != ENOTSUP)
        {
          set_io_error (error, saved_errno, "Could not sync the directory of", f->display);
          return FALSE;
        }
    }
  return TRUE;
}

static gboolean
atomic_file_commit (AtomicFile  *f,
                    GError     **error)
{
  return atomic_file_finish (f, error) && atomic_file_rename (f, error);
}

/**
 * lp_atomic_write_contents:
 * @path: the file to replace or create
 * @data: (array length=len): the new contents
 * @len: their length
 * @error: return location for a #GError
 *
 * Replaces @path with @data atomically: written to a temporary file in the
 * same directory, synced and renamed over @path. On error the old file is
 * untouched and no temporary file is left.
 *
 * Returns: %TRUE on success
 */
gboolean
lp_atomic_write_contents (const char     *path,
                          gconstpointer   data,
                          gsize           len,
                          GError        **error)
{
  g_autoptr(AtomicFile) f = atomic_file_new (path, NULL, error);

  return f != NULL && write_all (f, data, len, error) && atomic_file_commit (f, error);
}

/* ---- writing ----------------------------------------------------------- */

static gboolean
append_json_string (GString     *out,
                    const char  *s,
                    const char  *what,
                    const char  *display,
                    GError     **error)
{
  if (!g_utf8_validate (s, -1, NULL))
    {
      set_format_error (error, LP_FORMAT_ERROR_ENCODING, display, "%s is not valid UTF-8", what);
      return FALSE;
    }
  g_string_append_c (out, '"');
  for (const guchar *p = (const guchar *) s; *p; p++)
    {
      const guchar *run = p;

      while (*p >= 0x20 && *p != '"' && *p != '\\')
        p++;
      g_string_append_len (out, (const char *) run, p - run);
      if (*p == '\0')
        break;
      switch (*p)
        {
        case '"': g_string_append (out, "\\\""); break;
        case '\\': g_string_append (out, "\\\\"); break;
        case '\n': g_string_append (out, "\\n"); break;
        case '\r': g_string_append (out, "\\r"); break;
        case '\t': g_string_append (out, "\\t"); break;
        case '\b': g_string_append (out, "\\b"); break;
        case '\f': g_string_append (out, "\\f"); break;
        default:
          {
            char esc[7] = { '\\', 'u', '0', '0', "0123456789abcdef"[*p >> 4],
                            "0123456789abcdef"[*p & 15], 0 };
            g_string_append_len (out, esc, 6);
          }
        }
    }
  g_string_append_c (out, '"');
  return TRUE;
}

/* Compact JSON, __metadata__ first, offsets contiguous in checkpoint order,
 * padded with spaces so that the data starts 8-byte aligned. */
static GString *
build_header (LpCheckpoint  *checkpoint,
              const char    *display,
              GError       **error)
{
  g_autoptr(GString) out = g_string_new ("{");
  g_auto(GStrv) keys = lp_checkpoint_dup_metadata_keys (checkpoint);
  guint n_tensors = lp_checkpoint_get_n_tensors (checkpoint);
  guint64 offset = 0;
  gboolean first = TRUE;

  if (keys != NULL && keys[0] != NULL)
    {
      g_string_append (out, "\"__metadata__\":{");
      for (guint i = 0; keys[i]; i++)
        {
          g_autofree char *what = g_strdup_printf ("metadata key '%s'", keys[i]);
          if (i > 0)
            g_string_append_c (out, ',');
          if (!append_json_string (out, keys[i], what, display, error))
            return NULL;
          g_string_append_c (out, ':');
          if (!append_json_string (out, lp_checkpoint_get_metadata (checkpoint, keys[i]),
                                   what, display, error))
            return NULL;
        }
      g_string_append_c (out, '}');
      first = FALSE;
    }

  for (guint i = 0; i < n_tensors; i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
      const char *name = lp_tensor_get_name (tensor);
      guint n_dims;
      const guint64 *shape = lp_tensor_get_shape (tensor, &n_dims);
      guint64 n_bytes = lp_tensor_get_n_bytes (tensor);
      g_autofree char *what = g_strdup_printf ("tensor name '%s'", name);

      if (strcmp (name, "__metadata__") == 0)
        {
          set_format_error (error, LP_FORMAT_ERROR_ENTRY, display,
                            "a tensor may not be named __metadata__");
          return NULL;
        }
      if (!first)
        g_string_append_c (out, ',');
      first = FALSE;
      if (!append_json_string (out, name, what, display, error))
        return NULL;
      g_string_append_printf (out, ":{\"dtype\":\"%s\",\"shape\":[",
                              lp_dtype_to_string (lp_tensor_get_dtype (tensor)));
      for (guint d = 0; d < n_dims; d++)
        g_string_append_printf (out, "%s%" G_GUINT64_FORMAT, d ? "," : "", shape[d]);
      g_string_append_printf (out, "],\"data_offsets\":[%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT "]}",
                              offset, offset + n_bytes);
      offset += n_bytes;
      if (out->len > LP_SAFETENSORS_MAX_HEADER)
        break;
    }
  g_string_append_c (out, '}');
  while (out->len % 8 != 0)
    g_string_append_c (out, ' ');

  if (out->len > LP_SAFETENSORS_MAX_HEADER)
    {
      set_format_error (error, LP_FORMAT_ERROR_HEADER_SIZE, display,
                        "the header would exceed the limit of %d bytes", LP_SAFETENSORS_MAX_HEADER);
      return NULL;
    }
  return g_steal_pointer (&out);
}

/* Durability as the file is written. fsync() of a freshly written file on a
 * virtual disk costs about a millisecond per MB, most of it the host
 * flushing its own cache, and at the end it is all waiting. A thread of the
 * sink syncs the data every SYNC_EVERY bytes instead, while the stages
 * compute, so the final fsync() has little left. Its errors are kept for
 * the commit: the kernel reports a write-back error to one sync only. */
#define SYNC_EVERY (8 << 20)

typedef struct {
  int fd;
  GThread *thread;
  GMutex lock;
  GCond cond;
  guint requested;
  guint done;
  gboolean stop;
  int error;        /* the first errno of a sync, or 0 */
} Syncer;

static gpointer
syncer_thread (gpointer data)
{
  Syncer *syncer = data;

  g_mutex_lock (&syncer->lock);
  for (;;)
    {
      while (!syncer->stop && syncer->done == syncer->requested)
        g_cond_wait (&syncer->cond, &syncer->lock);
      if (syncer->done == syncer->requested)
        break;
      syncer->done = syncer->requested;
      g_mutex_unlock (&syncer->lock);

      int rc = fdatasync (syncer->fd);
      int saved_errno = errno;

      g_mutex_lock (&syncer->lock);
      if (rc != 0 && syncer->error == 0)
        syncer->error = saved_errno;
    }
  g_mutex_unlock (&syncer->lock);
  return NULL;
}

static Syncer *
syncer_start (int fd)
{
  Syncer *syncer = g_new0 (Syncer, 1);

  syncer->fd = fd;
  g_mutex_init (&syncer->lock);
  g_cond_init (&syncer->cond);
  syncer->thread = g_thread_new ("lpipe-sync", syncer_thread, syncer);
  return syncer;
}

static void
syncer_request (Syncer *syncer)
{
  g_mutex_lock (&syncer->lock);
  syncer->requested++;
  g_cond_signal (&syncer->cond);
  g_mutex_unlock (&syncer->lock);
}

/* Waits for the thread; returns the errno of a failed sync, or 0. */
static int
syncer_finish (Syncer *syncer)
{
  int error;

  g_mutex_lock (&syncer->lock);
  syncer->stop = TRUE;
  g_cond_signal (&syncer->cond);
  g_mutex_unlock (&syncer->lock);
  g_thread_join (syncer->thread);
  error = syncer->error;
  g_mutex_clear (&syncer->lock);
  g_cond_clear (&syncer->cond);
  g_free (syncer);
  return error;
}

typedef struct {
  AtomicFile *file;
  LpCheckpoint *checkpoint;
  guint next;
  /* For writing in parallel: where each tensor goes in the file. */
  GHashTable *offsets;      /* LpTensor* -> guint64* (absolute offset) */
  gint written;
  guint64 bytes_written;
  Syncer *syncer;
} WriteContext;

/* Writes a tensor at its place from a worker thread, and asks for the data
 * to be synced as it goes (see Syncer). */
static gboolean
write_tensor_at (LpTensor  *tensor,
                 GBytes    *data,
                 gpointer   user_data,
                 GError   **error)
{
  WriteContext *ctx = user_data;
  gsize size;
  const guchar *p = g_bytes_get_data (data, &size);
  const guint64 *offset = g_hash_table_lookup (ctx->offsets, tensor);
  guint64 at;

  if (offset == NULL || size != lp_tensor_get_n_bytes (tensor))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "tensor '%s': got %" G_GSIZE_FORMAT " bytes, not in the header or of the wrong size "
                   "(expected %" G_GUINT64_FORMAT ")", lp_tensor_get_name (tensor), size,
                   lp_tensor_get_n_bytes (tensor));
      return FALSE;
    }
  at = *offset;
  while (size > 0)
    {
      ssize_t n = pwrite (ctx->file->fd, p, MIN (size, (gsize) 1 << 30), at);
      if (n < 0)
        {
          if (errno == EINTR)
            continue;
          set_io_error (error, errno, "Could not write", ctx->file->display);
          return FALSE;
        }
      p += n;
      at += n;
      size -= n;
    }
  {
    /* Whichever worker crosses a multiple of SYNC_EVERY asks for a sync;
     * a LoRA has hundreds of small tensors, so it is counted in bytes. */
    guint64 before = __atomic_fetch_add (&ctx->bytes_written, lp_tensor_get_n_bytes (tensor), __ATOMIC_RELAXED);
    if ((before + lp_tensor_get_n_bytes (tensor)) / SYNC_EVERY != before / SYNC_EVERY)
      syncer_request (ctx->syncer);
  }
  g_atomic_int_inc (&ctx->written);
  return TRUE;
}

static gboolean
write_tensor_data (LpTensor  *tensor,
                   GBytes    *data,
                   gpointer   user_data,
                   GError   **error)
{
  WriteContext *ctx = user_data;
  gsize size;
  gconstpointer p = g_bytes_get_data (data, &size);

  /* The header promised this tensor, this size, at this place. */
  if (ctx->next >= lp_checkpoint_get_n_tensors (ctx->checkpoint) ||
      lp_checkpoint_get_tensor (ctx->checkpoint, ctx->next) != tensor ||
      size != lp_tensor_get_n_bytes (tensor))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "tensor '%s': got %" G_GSIZE_FORMAT " bytes out of order or of the wrong size "
                   "(expected %" G_GUINT64_FORMAT ")", lp_tensor_get_name (tensor), size,
                   lp_tensor_get_n_bytes (tensor));
      return FALSE;
    }
  ctx->next++;
  return atomic_file_write (ctx->file, p, size, error);
}

/* Writes @checkpoint to a temporary file beside @filename (or through to a
 * stream), complete and on disk, but not yet in place: the caller renames
 * it with atomic_file_rename(), or drops it and nothing was replaced. */
static AtomicFile *
write_checkpoint (LpCheckpoint  *checkpoint,
                  const char    *filename,
                  LpStage       *stage,
                  GError       **error)
{
  g_autoptr(AtomicFile) file = NULL;
  g_autoptr(GString) header = NULL;
  g_autofree char *display = NULL;
  WriteContext ctx;
  guchar prefix[8];
  guint64 n;

  display = g_filename_display_name (filename);
  header = build_header (checkpoint, display, error);
  if (header == NULL)
    return NULL;

  file = atomic_file_new (filename, stage ? lp_stage_get_cancellable (stage) : NULL, error);
  if (file == NULL)
    return NULL;

  n = header->len;
  for (int i = 0; i < 8; i++)
    prefix[i] = (n >> (8 * i)) & 0xff;
  if (!atomic_file_write (file, prefix, 8, error) ||
      !atomic_file_write (file, header->str, header->len, error))
    return NULL;

  ctx.file = file;
  ctx.checkpoint = checkpoint;
  ctx.next = 0;
  ctx.written = 0;
  ctx.bytes_written = 0;
  ctx.syncer = NULL;
  ctx.offsets = NULL;
  if (stage != NULL && file->stream)
    {
      /* A stream takes its bytes in order. */
      if (!lp_stage_pull_tensors (stage, checkpoint, write_tensor_data, &ctx, error))
        {
          lp_checkpoint_explain_error (checkpoint, error);
          return NULL;
        }
    }
  else if (stage != NULL)
    {
      g_autofree guint64 *offsets = g_new (guint64, MAX (lp_checkpoint_get_n_tensors (checkpoint), 1));
      guint64 at = 8 + header->len;
      gboolean ok;
      int sync_error;

      /* The header fixed every tensor's place, so the workers write them in
       * parallel and the file is the same for any number of threads. */
      if (!atomic_file_flush (file, error))
        return NULL;
      ctx.offsets = g_hash_table_new (NULL, NULL);
      for (guint i = 0; i < lp_checkpoint_get_n_tensors (checkpoint); i++)
        {
          LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
          offsets[i] = at;
          at += lp_tensor_get_n_bytes (tensor);
          g_hash_table_insert (ctx.offsets, tensor, &offsets[i]);
        }
      ctx.syncer = syncer_start (file->fd);
      ok = lp_stage_pull_tensors_unordered (stage, checkpoint, write_tensor_at, &ctx, error);
      sync_error = syncer_finish (ctx.syncer);
      g_hash_table_unref (ctx.offsets);
      if (!ok)
        {
          lp_checkpoint_explain_error (checkpoint, error);
          return NULL;
        }
      if (sync_error != 0)
        {
          set_io_error (error, sync_error, "Could not write", file->display);
          return NULL;
        }
      ctx.next = g_atomic_int_get (&ctx.written);
    }
  else
    for (guint i = 0; i < lp_checkpoint_get_n_tensors (checkpoint); i++)
      {
        LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
        g_autoptr(GBytes) data = lp_tensor_dup_data (tensor, error);

        if (data == NULL || !write_tensor_data (tensor, data, &ctx, error))
          {
            lp_checkpoint_explain_error (checkpoint, error);
            return NULL;
          }
      }
  if (ctx.next != lp_checkpoint_get_n_tensors (checkpoint))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "%s: only %u of %u tensors were written", display, ctx.next,
                   lp_checkpoint_get_n_tensors (checkpoint));
      return NULL;
    }
  /* Every byte came from input files that still hold what they held when
   * opened: none was shortened (read as zeros) or rewritten in place. */
  if (!lp_checkpoint_check_sources (checkpoint, error))
    return NULL;
  if (!atomic_file_finish (file, error))
    return NULL;
  return g_steal_pointer (&file);
}

/**
 * lp_safetensors_save:
 * @checkpoint: the checkpoint to write
 * @filename: (type filename): where to write it
 * @stage: (nullable): the sink doing the writing, to compute tensors in
 *   parallel, report progress and honour cancellation; %NULL to compute
 *   them one by one
 * @error: return location for a #GError
 *
 * Writes @checkpoint as a safetensors file: `__metadata__` first, compact
 * JSON padded to a multiple of 8 bytes, tensors in checkpoint order. The file
 * is written beside @filename under a temporary name and renamed over it when
 * complete, so @filename is never seen half written and may be the file the
 * checkpoint was read from. A PEFT adapter config is written beside it the
 * same way (see lp_safetensors_load() for its name). A symbolic link is
 * followed and its target replaced. A FIFO or a character device is written
 * through, in order and with no atomicity, and gets no adapter config;
 * directories, block devices and sockets are refused.
 *
 * Returns: %TRUE on success; on error @filename is untouched
 */
gboolean
lp_safetensors_save (LpCheckpoint  *checkpoint,
                     const char    *filename,
                     LpStage       *stage,
                     GError       **error)
{
  g_autoptr(AtomicFile) file = NULL;
  g_autoptr(AtomicFile) config_file = NULL;
  const char *config;

  g_return_val_if_fail (LP_IS_CHECKPOINT (checkpoint), FALSE);
  g_return_val_if_fail (filename != NULL, FALSE);
  g_return_val_if_fail (stage == NULL || LP_IS_STAGE (stage), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  file = write_checkpoint (checkpoint, filename, stage, error);
  if (file == NULL)
    return FALSE;
  /* The PEFT config and the weights belong together: both are complete and
   * on disk before either replaces its old file, so a config that cannot be
   * written leaves the old weights in place. Nothing is written beside a
   * FIFO or a device (that would be /dev). */
  config = lp_checkpoint_get_adapter_config (checkpoint);
  if (config != NULL && !file->stream)
    {
      g_autofree char *config_path = adapter_config_path (filename, TRUE);

      config_file = atomic_file_new (config_path, stage ? lp_stage_get_cancellable (stage) : NULL,
                                     error);
      if (config_file == NULL || !write_all (config_file, (const guchar *) config, strlen (config), error))
        return FALSE;
      if (!atomic_file_finish (config_file, error))
        return FALSE;
    }
  if (!atomic_file_rename (file, error))
    return FALSE;
  return config_file == NULL || atomic_file_rename (config_file, error);
}

/* ---- files committed together (lp-private.h) ---------------------------- */

struct _LpPendingFile
{
  AtomicFile *file;
};

static LpPendingFile *
pending_file_new (AtomicFile *file)
{
  LpPendingFile *pending = g_new0 (LpPendingFile, 1);

  pending->file = file;
  return pending;
}

LpPendingFile *
lp_safetensors_write_pending (LpCheckpoint  *checkpoint,
                              const char    *filename,
                              LpStage       *stage,
                              GError       **error)
{
  AtomicFile *file = write_checkpoint (checkpoint, filename, stage, error);

  return file != NULL ? pending_file_new (file) : NULL;
}

LpPendingFile *
lp_pending_file_new_contents (const char     *path,
                              gconstpointer   data,
                              gsize           len,
                              GError        **error)
{
  g_autoptr(AtomicFile) f = atomic_file_new (path, NULL, error);

  if (f == NULL || !write_all (f, data, len, error) || !atomic_file_finish (f, error))
    return NULL;
  return pending_file_new (g_steal_pointer (&f));
}

gboolean
lp_pending_file_is_stream (LpPendingFile *pending)
{
  return pending->file->stream;
}

gboolean
lp_pending_file_commit (LpPendingFile  *pending,
                        GError        **error)
{
  return atomic_file_rename (pending->file, error);
}

void
lp_pending_file_free (LpPendingFile *pending)
{
  if (pending == NULL)
    return;
  atomic_file_free (pending->file);
  g_free (pending);
}
