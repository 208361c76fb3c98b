/* lpipe-output.c: how the command line prints: escaped text, errors and
 * warnings in one format, byte sizes, a status line that fits the terminal
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "lpipe-cli.h"

LpCliOptions lp_cli = { .threads = -1 };

/**
 * lp_cli_escape:
 * @text: UTF-8 text from a file (a tensor name, metadata) or a message
 *   quoting one
 * @keep_newlines: leave '\n' as it is (multi-line messages)
 *
 * Tensor names and metadata come from files anyone can write; printed raw, a
 * name holding ESC sequences would drive the user's terminal (retitle it,
 * hide text, move the cursor). Every C0 and C1 control and DEL is written as
 * a visible escape instead, and bytes that are not UTF-8 as \xNN.
 *
 * Returns: (transfer full): the printable text
 */
char *
lp_cli_escape (const char *text,
               gboolean    keep_newlines)
{
  GString *out = g_string_sized_new (strlen (text) + 8);
  const char *p = text;

  while (*p)
    {
      gunichar c = g_utf8_get_char_validated (p, -1);

      if (c == (gunichar) -1 || c == (gunichar) -2)
        {
          g_string_append_printf (out, "\\x%02x", (guchar) *p);
          p++;
          continue;
        }
      if (c == '\n' && keep_newlines)
        g_string_append_c (out, '\n');
      else if (c == '\n')
        g_string_append (out, "\\n");
      else if (c == '\t')
        g_string_append (out, "\\t");
      else if (c == '\r')
        g_string_append (out, "\\r");
      else if (c == 0x1b)
        g_string_append (out, "\\e");
      else if (c < 0x20 || c == 0x7f)
        g_string_append_printf (out, "\\x%02x", c);
      else if (c >= 0x80 && c < 0xa0)
        g_string_append_printf (out, "\\u%04x", c);
      else
        g_string_append_len (out, p, g_utf8_next_char (p) - p);
      p = g_utf8_next_char (p);
    }
  return g_string_free (out, FALSE);
}

static void
print_line (const char *prefix,
            const char *format,
            va_list     args)
{
  g_autofree char *message = g_strdup_vprintf (format, args);
  g_autofree char *escaped = lp_cli_escape (message, TRUE);

  lp_cli_clear_status ();
  g_printerr ("lpipe: %s%s\n", prefix, escaped);
}

/* Errors name what failed; their text may quote a tensor name, so it is
 * escaped like any other. */
void
lp_cli_error (const char *format,
              ...)
{
  va_list args;

  va_start (args, format);
  print_line ("error: ", format, args);
  va_end (args);
}

void
lp_cli_warning (const char *format,
                ...)
{
  va_list args;

  if (lp_cli.quiet)
    return;
  va_start (args, format);
  print_line ("warning: ", format, args);
  va_end (args);
}

/* Stages report warnings with g_warning() (or g_message()) in their plugin's
 * log domain; GLib would print "(lpipe:123): Lpipe-lora-WARNING **: ...".
 * Users see one format, `lpipe: warning: ...`, and -q silences it. */
static GLogWriterOutput
log_writer (GLogLevelFlags   level,
            const GLogField *fields,
            gsize            n_fields,
            gpointer         user_data)
{
  const char *message = NULL;
  const char *domain = NULL;

  if (g_log_writer_default_would_drop (level, NULL))
    return G_LOG_WRITER_HANDLED;
  for (gsize i = 0; i < n_fields; i++)
    {
      if (g_str_equal (fields[i].key, "MESSAGE"))
        message = fields[i].value;
      else if (g_str_equal (fields[i].key, "GLIB_DOMAIN"))
        domain = fields[i].value;
    }
  if (message == NULL)
    return G_LOG_WRITER_UNHANDLED;

  if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL))
    {
      /* A programmer's error, not the user's: say where, for the report. */
      lp_cli_error ("internal: %s%s%s", domain ? domain : "", domain ? ": " : "", message);
      return G_LOG_WRITER_HANDLED;
    }
  if (level & G_LOG_LEVEL_WARNING)
    lp_cli_warning ("%s", message);
  else if (level & (G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO))
    {
      if (!lp_cli.quiet)
        {
          g_autofree char *escaped = lp_cli_escape (message, TRUE);
          lp_cli_clear_status ();
          g_printerr ("lpipe: %s\n", escaped);
        }
    }
  else
    {
      g_autofree char *escaped = lp_cli_escape (message, TRUE);
      lp_cli_clear_status ();
      g_printerr ("lpipe: debug: %s%s%s\n", domain ? domain : "", domain ? ": " : "", escaped);
    }
  return G_LOG_WRITER_HANDLED;
}

void
lp_cli_install_log_writer (void)
{
  g_log_set_writer_func (log_writer, NULL, NULL);
}

void
lp_cli_format_bytes (char   *buf,
                     gsize   len,
                     double  bytes)
{
  if (bytes >= 1e9)
    g_snprintf (buf, len, "%.2f GB", bytes / 1e9);
  else if (bytes >= 1e6)
    g_snprintf (buf, len, "%.1f MB", bytes / 1e6);
  else if (bytes >= 1e3)
    g_snprintf (buf, len, "%.1f kB", bytes / 1e3);
  else
    g_snprintf (buf, len, "%.0f B", bytes);
}

/* The width of the terminal on stderr, else $COLUMNS, else 80. */
guint
lp_cli_terminal_width (void)
{
  struct winsize ws;
  const char *columns = g_getenv ("COLUMNS");

  if (ioctl (STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
    return ws.ws_col;
  if (columns != NULL && atoi (columns) > 0)
    return atoi (columns);
  return 80;
}

/* "[#####.....] TEXT" in at most the terminal's width less one column (a
 * line as wide as the terminal wraps on some terminals, and \r then returns
 * only to the start of the last line: one line per redraw). The bar gets
 * what the text leaves, at most 30 columns; on a very narrow terminal the
 * text alone, cut. */
char *
lp_cli_fit_bar (const char *text,
                double      fraction)
{
  guint width = lp_cli_terminal_width () - 1;
  glong text_len = g_utf8_strlen (text, -1);
  GString *line = g_string_new (NULL);
  int bar;

  bar = MIN (30, (int) width - (int) text_len - 3);
  if (bar >= 8)
    {
      int filled = (int) (CLAMP (fraction, 0.0, 1.0) * bar + 0.5);
      g_string_append_c (line, '[');
      for (int i = 0; i < bar; i++)
        g_string_append_c (line, i < filled ? '#' : '.');
      g_string_append (line, "] ");
    }
  if ((glong) width > (glong) line->len)
    {
      glong room = width - line->len;
      const char *end = text_len <= room ? text + strlen (text) : g_utf8_offset_to_pointer (text, room);
      g_string_append_len (line, text, end - text);
    }
  return g_string_free (line, FALSE);
}

static gboolean status_drawn;

/* Redraws the one status line in place: back to column 0, the line, and
 * the rest of the old one erased. */
void
lp_cli_draw_status (const char *line)
{
  fprintf (stderr, "\r%s\033[K", line);
  fflush (stderr);
  status_drawn = TRUE;
}

/* Ends the status line, so what is printed next starts on a line of its own. */
void
lp_cli_clear_status (void)
{
  if (!status_drawn)
    return;
  fputs ("\r\033[K", stderr);
  fflush (stderr);
  status_drawn = FALSE;
}

void
lp_cli_print_json (JsonBuilder *builder)
{
  g_autoptr(JsonGenerator) gen = json_generator_new ();
  g_autoptr(JsonNode) root = json_builder_get_root (builder);
  g_autofree char *text = NULL;

  json_generator_set_pretty (gen, TRUE);
  json_generator_set_root (gen, root);
  text = json_generator_to_data (gen, NULL);
  /* json-glib escapes C0 controls in strings but passes DEL and the C1
   * controls through; those drive terminals too. Only strings hold them. */
  {
    GString *safe = g_string_sized_new (strlen (text));
    for (const char *p = text; *p; p = g_utf8_next_char (p))
      {
        gunichar c = g_utf8_get_char (p);
        if (c >= 0x7f && c < 0xa0)
          g_string_append_printf (safe, "\\u%04x", c);
        else
          g_string_append_len (safe, p, g_utf8_next_char (p) - p);
      }
    g_print ("%s\n", safe->str);
    g_string_free (safe, TRUE);
  }
}

static int
compare_strings (gconstpointer a,
                 gconstpointer b)
{
  return strcmp (*(char * const *) a, *(char * const *) b);
}

/* Sorts an array of strings bytewise (file names: no locale). */
void
lp_cli_sort_strings (GPtrArray *strings)
{
  g_ptr_array_sort (strings, compare_strings);
}
