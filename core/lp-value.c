/* lp-value.c: one conversion from text or JSON to a property's GValue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The pipeline file, `lpipe launch`, the CLI's parameters and `lpipe inspect`
 * all go through these four functions, so a property accepts the same
 * spellings everywhere and its type is described the same way everywhere.
 *
 * Rules shared by every type:
 * - text is parsed exactly: no leading or trailing junk, no silent rounding;
 * - a JSON value must already have the property's type (a JSON string is not a
 *   number: `"rank": "4"` is an error, so typos in hand-written files show);
 * - a value that g_param_value_validate() would change is an error, never
 *   clamped, and NaN is refused even where the range would let it through.
 *
 * Errors are %LP_PIPELINE_ERROR_BAD_VALUE and start with the property's name;
 * the caller prefixes the file and stage.
 */

#include "lp-private.h"

#include <math.h>
#include <string.h>

/* The bounds of an integer pspec, widened to 64 bits. */
typedef struct {
  gboolean is_unsigned;
  gint64 smin, smax;      /* the pspec's range, when signed */
  guint64 umin, umax;     /* the pspec's range, when unsigned */
  gint64 type_smin, type_smax;
  guint64 type_umax;
} IntRange;

static gboolean
int_range (GParamSpec *pspec,
           IntRange   *r)
{
  memset (r, 0, sizeof *r);

  if (G_IS_PARAM_SPEC_CHAR (pspec))
    {
      r->smin = G_PARAM_SPEC_CHAR (pspec)->minimum;
      r->smax = G_PARAM_SPEC_CHAR (pspec)->maximum;
      r->type_smin = G_MININT8;
      r->type_smax = G_MAXINT8;
    }
  else if (G_IS_PARAM_SPEC_INT (pspec))
    {
      r->smin = G_PARAM_SPEC_INT (pspec)->minimum;
      r->smax = G_PARAM_SPEC_INT (pspec)->maximum;
      r->type_smin = G_MININT;
      r->type_smax = G_MAXINT;
    }
  else if (G_IS_PARAM_SPEC_LONG (pspec))
    {
      r->smin = G_PARAM_SPEC_LONG (pspec)->minimum;
      r->smax = G_PARAM_SPEC_LONG (pspec)->maximum;
      r->type_smin = G_MINLONG;
      r->type_smax = G_MAXLONG;
    }
  else if (G_IS_PARAM_SPEC_INT64 (pspec))
    {
      r->smin = G_PARAM_SPEC_INT64 (pspec)->minimum;
      r->smax = G_PARAM_SPEC_INT64 (pspec)->maximum;
      r->type_smin = G_MININT64;
      r->type_smax = G_MAXINT64;
    }
  else if (G_IS_PARAM_SPEC_UCHAR (pspec))
    {
      r->is_unsigned = TRUE;
      r->umin = G_PARAM_SPEC_UCHAR (pspec)->minimum;
      r->umax = G_PARAM_SPEC_UCHAR (pspec)->maximum;
      r->type_umax = G_MAXUINT8;
    }
  else if (G_IS_PARAM_SPEC_UINT (pspec))
    {
      r->is_unsigned = TRUE;
      r->umin = G_PARAM_SPEC_UINT (pspec)->minimum;
      r->umax = G_PARAM_SPEC_UINT (pspec)->maximum;
      r->type_umax = G_MAXUINT;
    }
  else if (G_IS_PARAM_SPEC_ULONG (pspec))
    {
      r->is_unsigned = TRUE;
      r->umin = G_PARAM_SPEC_ULONG (pspec)->minimum;
      r->umax = G_PARAM_SPEC_ULONG (pspec)->maximum;
      r->type_umax = G_MAXULONG;
    }
  else if (G_IS_PARAM_SPEC_UINT64 (pspec))
    {
      r->is_unsigned = TRUE;
      r->umin = G_PARAM_SPEC_UINT64 (pspec)->minimum;
      r->umax = G_PARAM_SPEC_UINT64 (pspec)->maximum;
      r->type_umax = G_MAXUINT64;
    }
  else
    return FALSE;

  return TRUE;
}

static void
set_int (GValue  *value,
         gint64   s,
         guint64  u)
{
  switch (G_TYPE_FUNDAMENTAL (G_VALUE_TYPE (value)))
    {
    case G_TYPE_CHAR: g_value_set_schar (value, (gint8) s); break;
    case G_TYPE_INT: g_value_set_int (value, (int) s); break;
    case G_TYPE_LONG: g_value_set_long (value, (long) s); break;
    case G_TYPE_INT64: g_value_set_int64 (value, s); break;
    case G_TYPE_UCHAR: g_value_set_uchar (value, (guchar) u); break;
    case G_TYPE_UINT: g_value_set_uint (value, (guint) u); break;
    case G_TYPE_ULONG: g_value_set_ulong (value, (gulong) u); break;
    case G_TYPE_UINT64: g_value_set_uint64 (value, u); break;
    default: g_assert_not_reached ();
    }
}

/* Shortest text that reads back as the same double, so 0.1 shows as "0.1"
 * and not as 0.10000000000000001. */
static char *
double_to_string (double d)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  if (isnan (d))
    return g_strdup ("nan");
  if (isinf (d))
    return g_strdup (d > 0 ? "inf" : "-inf");

  for (int precision = 1; precision <= 17; precision++)
    {
      char fmt[16];

      g_snprintf (fmt, sizeof fmt, "%%.%dg", precision);
      g_ascii_formatd (buf, sizeof buf, fmt, d);
      if (g_ascii_strtod (buf, NULL) == d)
        break;
    }
  return g_strdup (buf);
}

static char *
join_enum_nicks (GEnumClass *klass)
{
  GString *s = g_string_new (NULL);

  for (guint i = 0; i < klass->n_values; i++)
    {
      if (i > 0)
        g_string_append_c (s, '|');
      g_string_append (s, klass->values[i].value_nick);
    }
  return g_string_free (s, FALSE);
}

static char *
join_flags_nicks (GFlagsClass *klass)
{
  GString *s = g_string_new (NULL);

  for (guint i = 0; i < klass->n_values; i++)
    {
      if (i > 0)
        g_string_append_c (s, '|');
      g_string_append (s, klass->values[i].value_nick);
    }
  return g_string_free (s, FALSE);
}

/**
 * lp_param_spec_describe_type:
 * @pspec: a property's #GParamSpec
 *
 * Describes what values @pspec accepts, for `lpipe inspect` and for error
 * messages: "integer [1, 4096]", "integer >= 0", "double [0, 1]",
 * "enum: exact|randomized", "flags: a|b|c", "boolean", "string",
 * "list of strings".
 *
 * Returns: (transfer full): the description
 */
char *
lp_param_spec_describe_type (GParamSpec *pspec)
{
  GType type = G_PARAM_SPEC_VALUE_TYPE (pspec);
  IntRange r;

  if (int_range (pspec, &r))
    {
      if (r.is_unsigned)
        {
          /* "integer >= 0" for an unbounded uint, but a uchar says 255 */
          if (r.umax == r.type_umax && r.type_umax >= G_MAXUINT)
            return g_strdup_printf ("integer >= %" G_GUINT64_FORMAT, r.umin);
          return g_strdup_printf ("integer [%" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT "]",
                                  r.umin, r.umax);
        }
      gboolean wide = r.type_smax >= G_MAXINT;

      if (wide && r.smin == r.type_smin && r.smax == r.type_smax)
        return g_strdup ("integer");
      if (wide && r.smax == r.type_smax)
        return g_strdup_printf ("integer >= %" G_GINT64_FORMAT, r.smin);
      if (wide && r.smin == r.type_smin)
        return g_strdup_printf ("integer <= %" G_GINT64_FORMAT, r.smax);
      return g_strdup_printf ("integer [%" G_GINT64_FORMAT ", %" G_GINT64_FORMAT "]",
                              r.smin, r.smax);
    }

  if (G_IS_PARAM_SPEC_DOUBLE (pspec) || G_IS_PARAM_SPEC_FLOAT (pspec))
    {
      gboolean is_float = G_IS_PARAM_SPEC_FLOAT (pspec);
      double lo = is_float ? G_PARAM_SPEC_FLOAT (pspec)->minimum : G_PARAM_SPEC_DOUBLE (pspec)->minimum;
      double hi = is_float ? G_PARAM_SPEC_FLOAT (pspec)->maximum : G_PARAM_SPEC_DOUBLE (pspec)->maximum;
      double type_max = is_float ? G_MAXFLOAT : G_MAXDOUBLE;
      const char *name = is_float ? "float" : "double";
      g_autofree char *los = double_to_string (lo);
      g_autofree char *his = double_to_string (hi);

      if (lo <= -type_max && hi >= type_max)
        return g_strdup (name);
      if (hi >= type_max)
        return g_strdup_printf ("%s >= %s", name, los);
      if (lo <= -type_max)
        return g_strdup_printf ("%s <= %s", name, his);
      return g_strdup_printf ("%s [%s, %s]", name, los, his);
    }

  if (type == G_TYPE_BOOLEAN)
    return g_strdup ("boolean");
  if (type == G_TYPE_STRING)
    return g_strdup ("string");
  if (type == G_TYPE_STRV)
    return g_strdup ("list of strings");

  if (G_IS_PARAM_SPEC_ENUM (pspec))
    {
      g_autofree char *nicks = join_enum_nicks (G_PARAM_SPEC_ENUM (pspec)->enum_class);
      return g_strdup_printf ("enum: %s", nicks);
    }
  if (G_IS_PARAM_SPEC_FLAGS (pspec))
    {
      g_autofree char *nicks = join_flags_nicks (G_PARAM_SPEC_FLAGS (pspec)->flags_class);
      return g_strdup_printf ("flags: %s", nicks);
    }

  return g_strdup (g_type_name (type));
}

/**
 * lp_value_to_string:
 * @value: a #GValue holding a property value
 *
 * Formats @value the way lp_value_from_string() reads it back: booleans as
 * true/false, enums by nick, flags as nicks joined by `|`, lists joined by
 * commas, doubles in their shortest exact form. A %NULL string is "".
 *
 * Returns: (transfer full): the text
 */
char *
lp_value_to_string (const GValue *value)
{
  g_return_val_if_fail (G_IS_VALUE (value), NULL);

  GType type = G_VALUE_TYPE (value);

  switch (G_TYPE_FUNDAMENTAL (type))
    {
    case G_TYPE_BOOLEAN:
      return g_strdup (g_value_get_boolean (value) ? "true" : "false");
    case G_TYPE_CHAR:
      return g_strdup_printf ("%d", (int) g_value_get_schar (value));
    case G_TYPE_UCHAR:
      return g_strdup_printf ("%u", (guint) g_value_get_uchar (value));
    case G_TYPE_INT:
      return g_strdup_printf ("%d", g_value_get_int (value));
    case G_TYPE_UINT:
      return g_strdup_printf ("%u", g_value_get_uint (value));
    case G_TYPE_LONG:
      return g_strdup_printf ("%ld", g_value_get_long (value));
    case G_TYPE_ULONG:
      return g_strdup_printf ("%lu", g_value_get_ulong (value));
    case G_TYPE_INT64:
      return g_strdup_printf ("%" G_GINT64_FORMAT, g_value_get_int64 (value));
    case G_TYPE_UINT64:
      return g_strdup_printf ("%" G_GUINT64_FORMAT, g_value_get_uint64 (value));
    case G_TYPE_DOUBLE:
      return double_to_string (g_value_get_double (value));
    case G_TYPE_FLOAT:
      return double_to_string (g_value_get_float (value));
    case G_TYPE_STRING:
      return g_strdup (g_value_get_string (value) ? g_value_get_string (value) : "");
    case G_TYPE_ENUM:
      {
        g_autoptr(GEnumClass) klass = g_type_class_ref (type);
        GEnumValue *ev = g_enum_get_value (klass, g_value_get_enum (value));
        return ev ? g_strdup (ev->value_nick) : g_strdup_printf ("%d", g_value_get_enum (value));
      }
    case G_TYPE_FLAGS:
      {
        g_autoptr(GFlagsClass) klass = g_type_class_ref (type);
        guint flags = g_value_get_flags (value);
        GString *s = g_string_new (NULL);

        for (guint i = 0; i < klass->n_values; i++)
          {
            guint v = klass->values[i].value;
            /* a zero-valued "none" nick only when nothing else is set */
            if ((v == 0 && flags == 0) || (v != 0 && (flags & v) == v))
              {
                if (s->len > 0)
                  g_string_append_c (s, '|');
                g_string_append (s, klass->values[i].value_nick);
                flags &= ~v;
              }
          }
        return g_string_free (s, FALSE);
      }
    default:
      break;
    }

  if (type == G_TYPE_STRV)
    {
      const char * const *strv = g_value_get_boxed (value);
      return strv ? g_strjoinv (",", (char **) strv) : g_strdup ("");
    }

  return g_strdup_value_contents (value);
}

/* Whether @value is one @pspec accepts as it is; an error otherwise. */
static gboolean
check_valid (GParamSpec    *pspec,
             const GValue  *value,
             const char    *shown,
             GError       **error)
{
  g_auto(GValue) copy = G_VALUE_INIT;

  if (G_VALUE_HOLDS_DOUBLE (value) || G_VALUE_HOLDS_FLOAT (value))
    {
      double d = G_VALUE_HOLDS_DOUBLE (value) ? g_value_get_double (value) : g_value_get_float (value);
      if (isnan (d))
        {
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                       "property '%s': NaN is not a number it can take", pspec->name);
          return FALSE;
        }
    }

  g_value_init (&copy, G_VALUE_TYPE (value));
  g_value_copy (value, &copy);
  if (g_param_value_validate (pspec, &copy))
    {
      g_autofree char *desc = lp_param_spec_describe_type (pspec);
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                   "property '%s': %s is out of range; expected %s",
                   pspec->name, shown, desc);
      return FALSE;
    }
  return TRUE;
}

static gboolean
bad_value (GParamSpec  *pspec,
           const char  *got,
           GError     **error)
{
  g_autofree char *desc = lp_param_spec_describe_type (pspec);

  g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
               "property '%s': expected %s, got %s", pspec->name, desc, got);
  return FALSE;
}

static gboolean
bad_text (GParamSpec  *pspec,
          const char  *text,
          GError     **error)
{
  g_autofree char *quoted = g_strdup_printf ("'%s'", text);
  return bad_value (pspec, quoted, error);
}

static gboolean
out_of_range (GParamSpec  *pspec,
              const char  *shown,
              GError     **error)
{
  g_autofree char *desc = lp_param_spec_describe_type (pspec);

  g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
               "property '%s': %s is out of range; expected %s", pspec->name, shown, desc);
  return FALSE;
}

static gboolean
int_from_text (GParamSpec  *pspec,
               const char  *text,
               GValue      *value,
               GError     **error)
{
  IntRange r;
  GError *local = NULL;

  int_range (pspec, &r);

  if (r.is_unsigned)
    {
      guint64 u;

      if (text[0] == '-')
        {
          /* a well-formed negative number is a range error, not a typo */
          gint64 s;
          if (g_ascii_string_to_signed (text, 10, G_MININT64, -1, &s, NULL))
            return out_of_range (pspec, text, error);
          return bad_text (pspec, text, error);
        }
      if (!g_ascii_string_to_unsigned (text, 10, 0, G_MAXUINT64, &u, &local))
        {
          gboolean range = g_error_matches (local, G_NUMBER_PARSER_ERROR,
                                            G_NUMBER_PARSER_ERROR_OUT_OF_BOUNDS);
          g_clear_error (&local);
          return range ? out_of_range (pspec, text, error) : bad_text (pspec, text, error);
        }
      if (u < r.umin || u > r.umax)
        return out_of_range (pspec, text, error);
      set_int (value, 0, u);
    }
  else
    {
      gint64 s;

      if (!g_ascii_string_to_signed (text, 10, G_MININT64, G_MAXINT64, &s, &local))
        {
          gboolean range = g_error_matches (local, G_NUMBER_PARSER_ERROR,
                                            G_NUMBER_PARSER_ERROR_OUT_OF_BOUNDS);
          g_clear_error (&local);
          return range ? out_of_range (pspec, text, error) : bad_text (pspec, text, error);
        }
      if (s < r.smin || s > r.smax)
        return out_of_range (pspec, text, error);
      set_int (value, s, 0);
    }
  return TRUE;
}

static gboolean
int_from_int64 (GParamSpec  *pspec,
                gint64       s,
                GValue      *value,
                GError     **error)
{
  IntRange r;
  g_autofree char *shown = g_strdup_printf ("%" G_GINT64_FORMAT, s);

  int_range (pspec, &r);
  if (r.is_unsigned)
    {
      if (s < 0 || (guint64) s < r.umin || (guint64) s > r.umax)
        return out_of_range (pspec, shown, error);
      set_int (value, 0, (guint64) s);
    }
  else
    {
      if (s < r.smin || s > r.smax)
        return out_of_range (pspec, shown, error);
      set_int (value, s, 0);
    }
  return TRUE;
}

static gboolean
double_from_double (GParamSpec  *pspec,
                    double       d,
                    GValue      *value,
                    GError     **error)
{
  g_autofree char *shown = double_to_string (d);

  if (isnan (d))
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                   "property '%s': NaN is not a number it can take", pspec->name);
      return FALSE;
    }

  if (G_VALUE_HOLDS_FLOAT (value))
    {
      GParamSpecFloat *fs = G_PARAM_SPEC_FLOAT (pspec);
      /* checked before narrowing: a double too large for a float would
       * become infinity and could pass a range that allows it */
      if (d < fs->minimum || d > fs->maximum)
        return out_of_range (pspec, shown, error);
      g_value_set_float (value, (float) d);
    }
  else
    {
      GParamSpecDouble *ds = G_PARAM_SPEC_DOUBLE (pspec);
      if (d < ds->minimum || d > ds->maximum)
        return out_of_range (pspec, shown, error);
      g_value_set_double (value, d);
    }
  return TRUE;
}

static gboolean
double_from_text (GParamSpec  *pspec,
                  const char  *text,
                  GValue      *value,
                  GError     **error)
{
  char *end = NULL;
  double d;

  /* g_ascii_strtod() skips leading blanks; the rest of lpipe does not */
  if (text[0] == '\0' || g_ascii_isspace (text[0]))
    return bad_text (pspec, text, error);
  d = g_ascii_strtod (text, &end);
  if (end == text || *end != '\0')
    return bad_text (pspec, text, error);
  return double_from_double (pspec, d, value, error);
}

static gboolean
boolean_from_text (GParamSpec  *pspec,
                   const char  *text,
                   GValue      *value,
                   GError     **error)
{
  static const char * const yes[] = { "true", "yes", "on", "1" };
  static const char * const no[] = { "false", "no", "off", "0" };

  for (guint i = 0; i < G_N_ELEMENTS (yes); i++)
    {
      if (g_ascii_strcasecmp (text, yes[i]) == 0)
        {
          g_value_set_boolean (value, TRUE);
          return TRUE;
        }
      if (g_ascii_strcasecmp (text, no[i]) == 0)
        {
          g_value_set_boolean (value, FALSE);
          return TRUE;
        }
    }
  return bad_text (pspec, text, error);
}

static GEnumValue *
find_enum_value (GEnumClass *klass,
                 const char *text)
{
  for (guint i = 0; i < klass->n_values; i++)
    {
      if (g_ascii_strcasecmp (klass->values[i].value_nick, text) == 0 ||
          g_strcmp0 (klass->values[i].value_name, text) == 0)
        return &klass->values[i];
    }
  return NULL;
}

static GFlagsValue *
find_flags_value (GFlagsClass *klass,
                  const char  *text)
{
  for (guint i = 0; i < klass->n_values; i++)
    {
      if (g_ascii_strcasecmp (klass->values[i].value_nick, text) == 0 ||
          g_strcmp0 (klass->values[i].value_name, text) == 0)
        return &klass->values[i];
    }
  return NULL;
}

static gboolean
unknown_nick (GParamSpec  *pspec,
              const char  *text,
              const char **nicks,
              GError     **error)
{
  g_autofree char *desc = lp_param_spec_describe_type (pspec);
  g_autofree char *lower = g_ascii_strdown (text, -1);
  g_autofree char *closest = lp_suggest_closest (lower, nicks);

  if (closest)
    g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                 "property '%s': unknown value '%s'; did you mean '%s'? (expected %s)",
                 pspec->name, text, closest, desc);
  else
    g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                 "property '%s': unknown value '%s'; expected %s",
                 pspec->name, text, desc);
  return FALSE;
}

static gboolean
enum_from_text (GParamSpec  *pspec,
                const char  *text,
                GValue      *value,
                GError     **error)
{
  GEnumClass *klass = G_PARAM_SPEC_ENUM (pspec)->enum_class;
  GEnumValue *ev = find_enum_value (klass, text);
  GType type = G_TYPE_FROM_CLASS (klass);
  LpDtype dtype;

  /* dtype enums also take the spellings of torch and kohya (float16, half, fp32) */
  if (ev == NULL && (type == LP_TYPE_DTYPE || type == LP_TYPE_FLOAT_DTYPE) && lp_dtype_parse (text, &dtype))
    {
      ev = g_enum_get_value (klass, dtype);
      if (ev == NULL)
        {
          g_autofree char *desc = lp_param_spec_describe_type (pspec);
          g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
                       "property '%s': '%s' is %s, which lpipe cannot convert to; expected %s",
                       pspec->name, text, lp_dtype_to_string (dtype), desc);
          return FALSE;
        }
    }
  if (ev == NULL)
    {
      g_autofree const char **nicks = g_new0 (const char *, klass->n_values + 1);
      for (guint i = 0; i < klass->n_values; i++)
        nicks[i] = klass->values[i].value_nick;
      return unknown_nick (pspec, text, nicks, error);
    }
  g_value_set_enum (value, ev->value);
  return TRUE;
}

/* Adds the flag named @text to @flags. */
static gboolean
add_flag (GParamSpec  *pspec,
          const char  *text,
          guint       *flags,
          GError     **error)
{
  GFlagsClass *klass = G_PARAM_SPEC_FLAGS (pspec)->flags_class;
  GFlagsValue *fv = find_flags_value (klass, text);

  if (fv == NULL)
    {
      g_autofree const char **nicks = g_new0 (const char *, klass->n_values + 1);
      for (guint i = 0; i < klass->n_values; i++)
        nicks[i] = klass->values[i].value_nick;
      return unknown_nick (pspec, text, nicks, error);
    }
  *flags |= fv->value;
  return TRUE;
}

static gboolean
flags_from_text (GParamSpec  *pspec,
                 const char  *text,
                 GValue      *value,
                 GError     **error)
{
  g_auto(GStrv) parts = g_strsplit (text, "|", -1);
  guint flags = 0;

  /* "" is no flag at all */
  for (guint i = 0; text[0] != '\0' && parts[i]; i++)
    {
      g_strstrip (parts[i]);
      if (!add_flag (pspec, parts[i], &flags, error))
        return FALSE;
    }
  g_value_set_flags (value, flags);
  return TRUE;
}

static gboolean
strv_from_text (GParamSpec  *pspec,
                const char  *text,
                GValue      *value,
                GError     **error)
{
  g_auto(GStrv) parts = NULL;

  if (text[0] == '\0')
    parts = g_new0 (char *, 1);
  else
    {
      parts = g_strsplit (text, ",", -1);
      for (guint i = 0; parts[i]; i++)
        g_strstrip (parts[i]);
    }
  g_value_take_boxed (value, g_steal_pointer (&parts));
  return TRUE;
}

/* Leaves @value initialised to @pspec's type and holding its default. */
static void
reset_value (GParamSpec *pspec,
             GValue     *value)
{
  if (G_IS_VALUE (value))
    g_value_unset (value);
  g_value_init (value, G_PARAM_SPEC_VALUE_TYPE (pspec));
}

static gboolean
unsupported_type (GParamSpec  *pspec,
                  GError     **error)
{
  g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE,
               "property '%s' is of type %s, which cannot be set from text",
               pspec->name, g_type_name (G_PARAM_SPEC_VALUE_TYPE (pspec)));
  return FALSE;
}

static gboolean
from_string_inner (GParamSpec  *pspec,
                   const char  *text,
                   GValue      *value,
                   GError     **error)
{
  GType type = G_PARAM_SPEC_VALUE_TYPE (pspec);

  if (type == G_TYPE_STRV)
    return strv_from_text (pspec, text, value, error);

  switch (G_TYPE_FUNDAMENTAL (type))
    {
    case G_TYPE_BOOLEAN:
      return boolean_from_text (pspec, text, value, error);
    case G_TYPE_CHAR: case G_TYPE_UCHAR:
    case G_TYPE_INT: case G_TYPE_UINT:
    case G_TYPE_LONG: case G_TYPE_ULONG:
    case G_TYPE_INT64: case G_TYPE_UINT64:
      return int_from_text (pspec, text, value, error);
    case G_TYPE_DOUBLE: case G_TYPE_FLOAT:
      return double_from_text (pspec, text, value, error);
    case G_TYPE_STRING:
      g_value_set_string (value, text);
      return TRUE;
    case G_TYPE_ENUM:
      return enum_from_text (pspec, text, value, error);
    case G_TYPE_FLAGS:
      return flags_from_text (pspec, text, value, error);
    default:
      return unsupported_type (pspec, error);
    }
}

/**
 * lp_value_from_string:
 * @pspec: the property's #GParamSpec
 * @text: the value as text, as on the command line
 * @value: (out caller-allocates): an unset #GValue (or one to reset)
 * @error: return location for a #GError
 *
 * Converts @text to a value of @pspec's type. Booleans are
 * true/false/yes/no/on/off/1/0, integers are decimal and exact, doubles
 * refuse NaN, enums are a nick (any case) or a full name, flags are nicks
 * joined by `|`, lists of strings are comma separated.
 *
 * Returns: %TRUE with @value set; %FALSE with @value unset and @error set
 *   (%LP_PIPELINE_ERROR_BAD_VALUE)
 */
gboolean
lp_value_from_string (GParamSpec  *pspec,
                      const char  *text,
                      GValue      *value,
                      GError     **error)
{
  g_return_val_if_fail (G_IS_PARAM_SPEC (pspec), FALSE);
  g_return_val_if_fail (text != NULL, FALSE);
  g_return_val_if_fail (value != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  reset_value (pspec, value);
  if (!from_string_inner (pspec, text, value, error) ||
      !check_valid (pspec, value, text, error))
    {
      g_value_unset (value);
      return FALSE;
    }
  return TRUE;
}

/* A short description of what a JSON node holds, for "got ..." */
static char *
describe_node (JsonNode *node)
{
  switch (JSON_NODE_TYPE (node))
    {
    case JSON_NODE_OBJECT:
      return g_strdup ("an object");
    case JSON_NODE_ARRAY:
      return g_strdup ("an array");
    case JSON_NODE_NULL:
      return g_strdup ("null");
    case JSON_NODE_VALUE:
    default:
      break;
    }

  switch (json_node_get_value_type (node))
    {
    case G_TYPE_INT64:
      return g_strdup_printf ("%" G_GINT64_FORMAT, json_node_get_int (node));
    case G_TYPE_DOUBLE:
      return double_to_string (json_node_get_double (node));
    case G_TYPE_BOOLEAN:
      return g_strdup (json_node_get_boolean (node) ? "true" : "false");
    case G_TYPE_STRING:
      return g_strdup_printf ("the string \"%s\"", json_node_get_string (node));
    default:
      return g_strdup ("a value of unknown type");
    }
}

static gboolean
bad_node (GParamSpec  *pspec,
          JsonNode    *node,
          GError     **error)
{
  g_autofree char *got = describe_node (node);
  return bad_value (pspec, got, error);
}

static GType
node_value_type (JsonNode *node)
{
  return JSON_NODE_HOLDS_VALUE (node) ? json_node_get_value_type (node) : G_TYPE_INVALID;
}

static gboolean
from_json_inner (GParamSpec  *pspec,
                 JsonNode    *node,
                 GValue      *value,
                 GError     **error)
{
  GType type = G_PARAM_SPEC_VALUE_TYPE (pspec);
  GType vt = node_value_type (node);

  if (type == G_TYPE_STRV)
    {
      JsonArray *array;
      guint n;
      g_auto(GStrv) strv = NULL;

      if (!JSON_NODE_HOLDS_ARRAY (node))
        return bad_node (pspec, node, error);
      array = json_node_get_array (node);
      n = json_array_get_length (array);
      strv = g_new0 (char *, n + 1);
      for (guint i = 0; i < n; i++)
        {
          JsonNode *element = json_array_get_element (array, i);
          if (node_value_type (element) != G_TYPE_STRING)
            {
              g_autofree char *got = describe_node (element);
              g_autofree char *what = g_strdup_printf ("%s at position %u", got, i + 1);
              return bad_value (pspec, what, error);
            }
          strv[i] = g_strdup (json_node_get_string (element));
        }
      g_value_take_boxed (value, g_steal_pointer (&strv));
      return TRUE;
    }

  switch (G_TYPE_FUNDAMENTAL (type))
    {
    case G_TYPE_BOOLEAN:
      if (vt != G_TYPE_BOOLEAN)
        return bad_node (pspec, node, error);
      g_value_set_boolean (value, json_node_get_boolean (node));
      return TRUE;

    case G_TYPE_CHAR: case G_TYPE_UCHAR:
    case G_TYPE_INT: case G_TYPE_UINT:
    case G_TYPE_LONG: case G_TYPE_ULONG:
    case G_TYPE_INT64: case G_TYPE_UINT64:
      /* 4.0 is refused too: a float where a count is meant is a mistake */
      if (vt != G_TYPE_INT64)
        return bad_node (pspec, node, error);
      return int_from_int64 (pspec, json_node_get_int (node), value, error);

    case G_TYPE_DOUBLE: case G_TYPE_FLOAT:
      if (vt == G_TYPE_INT64)
        return double_from_double (pspec, (double) json_node_get_int (node), value, error);
      if (vt != G_TYPE_DOUBLE)
        return bad_node (pspec, node, error);
      return double_from_double (pspec, json_node_get_double (node), value, error);

    case G_TYPE_STRING:
      if (JSON_NODE_HOLDS_NULL (node))
        {
          g_value_set_string (value, NULL);
          return TRUE;
        }
      if (vt != G_TYPE_STRING)
        return bad_node (pspec, node, error);
      g_value_set_string (value, json_node_get_string (node));
      return TRUE;

    case G_TYPE_ENUM:
      if (vt != G_TYPE_STRING)
        return bad_node (pspec, node, error);
      return enum_from_text (pspec, json_node_get_string (node), value, error);

    case G_TYPE_FLAGS:
      if (vt == G_TYPE_STRING)
        return flags_from_text (pspec, json_node_get_string (node), value, error);
      if (JSON_NODE_HOLDS_ARRAY (node))
        {
          JsonArray *array = json_node_get_array (node);
          guint flags = 0;

          for (guint i = 0; i < json_array_get_length (array); i++)
            {
              JsonNode *element = json_array_get_element (array, i);
              if (node_value_type (element) != G_TYPE_STRING)
                {
                  g_autofree char *got = describe_node (element);
                  g_autofree char *what = g_strdup_printf ("%s at position %u", got, i + 1);
                  return bad_value (pspec, what, error);
                }
              if (!add_flag (pspec, json_node_get_string (element), &flags, error))
                return FALSE;
            }
          g_value_set_flags (value, flags);
          return TRUE;
        }
      return bad_node (pspec, node, error);

    default:
      return unsupported_type (pspec, error);
    }
}

/**
 * lp_value_from_json:
 * @pspec: the property's #GParamSpec
 * @node: the value in a pipeline file
 * @value: (out caller-allocates): an unset #GValue (or one to reset)
 * @error: return location for a #GError
 *
 * Converts a JSON value to @pspec's type. The JSON type must match: booleans
 * are JSON booleans, integers JSON integers (4.5 and 4.0 are refused),
 * doubles any JSON number, strings JSON strings (or null), enums the nick as
 * a string, flags "a|b" or an array of nicks, lists of strings an array of
 * strings.
 *
 * Returns: %TRUE with @value set; %FALSE with @value unset and @error set
 *   (%LP_PIPELINE_ERROR_BAD_VALUE)
 */
gboolean
lp_value_from_json (GParamSpec  *pspec,
                    JsonNode    *node,
                    GValue      *value,
                    GError     **error)
{
  g_return_val_if_fail (G_IS_PARAM_SPEC (pspec), FALSE);
  g_return_val_if_fail (node != NULL, FALSE);
  g_return_val_if_fail (value != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  reset_value (pspec, value);
  if (!from_json_inner (pspec, node, value, error))
    {
      g_value_unset (value);
      return FALSE;
    }
  {
    g_autofree char *shown = describe_node (node);
    if (!check_valid (pspec, value, shown, error))
      {
        g_value_unset (value);
        return FALSE;
      }
  }
  return TRUE;
}

/**
 * lp_param_spec_default_to_string:
 * @pspec: a property's #GParamSpec
 *
 * Formats the property's default the way a pipeline file or `lpipe launch`
 * would write it, for `lpipe inspect` and the stage reference.
 *
 * Returns: (transfer full) (nullable): the default as text, or %NULL when
 *   there is none (an unset string or list)
 */
char *
lp_param_spec_default_to_string (GParamSpec *pspec)
{
  const GValue *def;

  g_return_val_if_fail (G_IS_PARAM_SPEC (pspec), NULL);

  def = g_param_spec_get_default_value (pspec);
  if ((G_VALUE_HOLDS_STRING (def) && g_value_get_string (def) == NULL) ||
      (G_VALUE_HOLDS_BOXED (def) && g_value_get_boxed (def) == NULL))
    return NULL;
  return lp_value_to_string (def);
}
