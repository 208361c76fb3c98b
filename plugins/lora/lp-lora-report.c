/* lp-lora-report.c: JSON, rank ladders, blocks and the SVG chart of the
 * LoRA reporting stages
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-report.h"

#include <gio/gio.h>
#include <math.h>
#include <string.h>

/* ---- JSON ---------------------------------------------------------------- */

void
lp_lora_json_string (GString    *out,
                     const char *text)
{
  g_string_append_c (out, '"');
  for (const guchar *p = (const guchar *) text; *p; p++)
    {
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
          if (*p < 0x20 || *p == 0x7f)
            g_string_append_printf (out, "\\u%04x", *p);
          else
            g_string_append_c (out, *p);   /* UTF-8 passes through */
        }
    }
  g_string_append_c (out, '"');
}

void
lp_lora_json_number (GString *out,
                     double   value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  if (!isfinite (value))
    g_string_append (out, "null");
  else
    g_string_append (out, g_ascii_formatd (buf, sizeof buf, "%.17g", value));
}

void
lp_lora_json_numbers (GString      *out,
                      const double *values,
                      gsize         n)
{
  g_string_append_c (out, '[');
  for (gsize i = 0; i < n; i++)
    {
      if (i > 0)
        g_string_append (out, ", ");
      lp_lora_json_number (out, values[i]);
    }
  g_string_append_c (out, ']');
}

gboolean
lp_lora_report_write (const char    *path,
                      const GString *text,
                      GError       **error)
{
  /* written to a temporary file and renamed over the target */
  return g_file_set_contents_full (path, text->str, text->len,
                                   G_FILE_SET_CONTENTS_CONSISTENT, 0666, error);
}

/* ---- blocks and ranks ------------------------------------------------------ */

char *
lp_lora_block_name (const char *module)
{
  const char *part = module;

  while (*part != '\0')
    {
      gsize len = strcspn (part, "._");
      gboolean digits = len > 0;

      for (gsize i = 0; i < len; i++)
        digits = digits && g_ascii_isdigit (part[i]);
      if (digits)
        return g_strndup (module, part + len - module);
      part += len;
      if (*part != '\0')
        part++;
    }
  return g_strdup (module);
}

guint
lp_lora_rank_ladder (guint  max_rank,
                     guint *ranks)
{
  guint n = 0;

  for (guint k = 1; k < max_rank && n < 31; k *= 2)
    ranks[n++] = k;
  if (max_rank > 0)
    ranks[n++] = max_rank;
  return n;
}

/* ---- the SVG chart ----------------------------------------------------------- */

static const char *const colours[] = {
  "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
};

typedef struct {
  double left, top, width, height;   /* the plot area in pixels */
  double x0, x1;                     /* the data range of x */
} Panel;

static void
svg_text (GString    *out,
          const char *text)
{
  /* XML 1.0 cannot hold most control characters, even escaped */
  g_autofree char *clean = g_utf8_make_valid (text, -1);
  for (char *p = clean; *p; p++)
    if ((guchar) *p < 0x20 || *p == 0x7f)
      *p = '?';
  g_autofree char *escaped = g_markup_escape_text (clean, -1);
  g_string_append (out, escaped);
}

static void
svg_num (GString *out,
         double   value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];
  g_string_append (out, g_ascii_formatd (buf, sizeof buf, "%.1f", value));
}

static double
panel_x (const Panel *p,
         double       x)
{
  double span = p->x1 > p->x0 ? p->x1 - p->x0 : 1;
  return p->left + (p->x1 > p->x0 ? (x - p->x0) / span : 0.5) * p->width;
}

static double
panel_y (const Panel *p,
         double       y)
{
  return p->top + (1 - CLAMP (y, 0.0, 1.0)) * p->height;
}

static void
svg_line (GString *out,
          double x1, double y1, double x2, double y2,
          const char *style)
{
  g_string_append (out, "<line x1=\"");
  svg_num (out, x1);
  g_string_append (out, "\" y1=\"");
  svg_num (out, y1);
  g_string_append (out, "\" x2=\"");
  svg_num (out, x2);
  g_string_append (out, "\" y2=\"");
  svg_num (out, y2);
  g_string_append_printf (out, "\" %s/>\n", style);
}

static void
svg_label (GString    *out,
           double      x,
           double      y,
           const char *anchor,
           const char *extra,
           const char *text)
{
  g_string_append (out, "<text x=\"");
  svg_num (out, x);
  g_string_append (out, "\" y=\"");
  svg_num (out, y);
  g_string_append_printf (out, "\" text-anchor=\"%s\" %s>", anchor, extra);
  svg_text (out, text);
  g_string_append (out, "</text>\n");
}

/* Frame, title, y grid (relative error 0 … 1) and the legend of a panel. */
static void
svg_panel (GString                 *out,
           const Panel             *p,
           const char              *title,
           const char              *x_title,
           double                   x_title_below,
           const LpLoraChartSeries *series,
           guint                    n_series)
{
  g_string_append (out, "<rect x=\"");
  svg_num (out, p->left);
  g_string_append (out, "\" y=\"");
  svg_num (out, p->top);
  g_string_append (out, "\" width=\"");
  svg_num (out, p->width);
  g_string_append (out, "\" height=\"");
  svg_num (out, p->height);
  g_string_append (out, "\" fill=\"none\" stroke=\"#333\"/>\n");
  svg_label (out, p->left, p->top - 10, "start", "font-size=\"15\" font-weight=\"bold\"", title);
  if (x_title != NULL)
    svg_label (out, p->left + p->width / 2, p->top + p->height + x_title_below,
               "middle", "font-size=\"12\"", x_title);

  for (guint i = 0; i <= 4; i++)
    {
      double y = panel_y (p, i / 4.0);
      char label[16];
      g_snprintf (label, sizeof label, "%.2f", i / 4.0);
      svg_line (out, p->left, y, p->left + p->width, y, "stroke=\"#ddd\"");
      svg_label (out, p->left - 6, y + 4, "end", "font-size=\"11\"", label);
    }
  g_string_append (out, "<text transform=\"translate(");
  svg_num (out, p->left - 48);
  g_string_append_c (out, ',');
  svg_num (out, p->top + p->height / 2);
  g_string_append (out, ") rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">relative error</text>\n");

  for (guint s = 0; s < n_series; s++)
    {
      double y = p->top + 14 + 18 * s;
      const char *colour = colours[s % G_N_ELEMENTS (colours)];
      g_autofree char *style = g_strdup_printf ("stroke=\"%s\" stroke-width=\"2\"", colour);
      svg_line (out, p->left + p->width + 14, y - 4, p->left + p->width + 36, y - 4, style);
      svg_label (out, p->left + p->width + 42, y, "start", "font-size=\"12\"", series[s].label);
    }
}

static void
svg_series (GString                 *out,
            const Panel             *p,
            const LpLoraChartSeries *series,
            guint                    index,
            gboolean                 log_x)
{
  const char *colour = colours[index % G_N_ELEMENTS (colours)];

  if (series->n == 0)
    return;
  g_string_append_printf (out, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", colour);
  for (guint i = 0; i < series->n; i++)
    {
      double x = log_x ? log2 (MAX (series->x[i], 1.0)) : series->x[i];
      if (i > 0)
        g_string_append_c (out, ' ');
      svg_num (out, panel_x (p, x));
      g_string_append_c (out, ',');
      svg_num (out, panel_y (p, series->y[i]));
    }
  g_string_append (out, "\"/>\n");
  for (guint i = 0; i < series->n && series->n <= 64; i++)
    {
      double x = log_x ? log2 (MAX (series->x[i], 1.0)) : series->x[i];
      g_string_append (out, "<circle cx=\"");
      svg_num (out, panel_x (p, x));
      g_string_append (out, "\" cy=\"");
      svg_num (out, panel_y (p, series->y[i]));
      g_string_append_printf (out, "\" r=\"3\" fill=\"%s\"/>\n", colour);
    }
}

GString *
lp_lora_chart_svg (const LpLoraChart *chart)
{
  GString *out = g_string_new (NULL);
  double max_rank = 1;
  Panel by_rank = { 80, 60, 660, 250, 0, 0 };
  Panel by_block = { 80, 400, 660, 200, 0, MAX (chart->n_blocks, 1) - 1.0 };

  for (guint s = 0; s < chart->n_by_rank; s++)
    for (guint i = 0; i < chart->by_rank[s].n; i++)
      max_rank = MAX (max_rank, chart->by_rank[s].x[i]);
  by_rank.x1 = log2 (max_rank);

  g_string_append_printf (out,
                          "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                          "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                          "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\">\n"
                          "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
                          LP_LORA_CHART_WIDTH, LP_LORA_CHART_HEIGHT,
                          LP_LORA_CHART_WIDTH, LP_LORA_CHART_HEIGHT);
  g_string_append (out, "<title>");
  svg_text (out, chart->title);
  g_string_append (out, "</title>\n");
  svg_label (out, LP_LORA_CHART_WIDTH / 2.0, 24, "middle", "font-size=\"16\"", chart->title);

  /* error against rank; x ticks at the ranks of the first curve */
  svg_panel (out, &by_rank, "Error against rank (whole file)", "rank (log scale)", 36,
             chart->by_rank, chart->n_by_rank);
  if (chart->n_by_rank > 0)
    for (guint i = 0; i < chart->by_rank[0].n; i++)
      {
        double x = panel_x (&by_rank, log2 (MAX (chart->by_rank[0].x[i], 1.0)));
        char label[16];
        g_snprintf (label, sizeof label, "%g", chart->by_rank[0].x[i]);
        svg_line (out, x, by_rank.top + by_rank.height, x, by_rank.top + by_rank.height + 5,
                  "stroke=\"#333\"");
        svg_label (out, x, by_rank.top + by_rank.height + 18, "middle", "font-size=\"11\"", label);
      }
  for (guint s = 0; s < chart->n_by_rank; s++)
    svg_series (out, &by_rank, &chart->by_rank[s], s, TRUE);

  /* error per block; at most ~40 labels, so they stay legible */
  svg_panel (out, &by_block, "Error per block along the network", NULL, 0,
             chart->by_block, chart->n_by_block);
  guint step = MAX (1, (chart->n_blocks + 39) / 40);
  for (guint b = 0; b < chart->n_blocks; b += step)
    {
      double x = panel_x (&by_block, b);
      double y = by_block.top + by_block.height + 12;
      const char *name = chart->block_names[b];
      glong len = g_utf8_validate (name, -1, NULL) ? g_utf8_strlen (name, -1) : 0;
      /* the end of a block's name is what tells blocks apart */
      g_autofree char *shown = len > 24 ? g_strconcat ("…", g_utf8_offset_to_pointer (name, len - 23), NULL)
                                        : g_strdup (name);

      svg_line (out, x, by_block.top + by_block.height, x, by_block.top + by_block.height + 5,
                "stroke=\"#333\"");
      g_string_append (out, "<text transform=\"translate(");
      svg_num (out, x + 3);
      g_string_append_c (out, ',');
      svg_num (out, y);
      g_string_append (out, ") rotate(-60)\" text-anchor=\"end\" font-size=\"9\">");
      svg_text (out, shown);
      g_string_append (out, "</text>\n");
    }
  for (guint s = 0; s < chart->n_by_block; s++)
    svg_series (out, &by_block, &chart->by_block[s], s, FALSE);

  g_string_append (out, "</svg>\n");
  return out;
}
