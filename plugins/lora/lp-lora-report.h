/* lp-lora-report.h: what the LoRA reporting stages write: JSON, the spectrum
 * at a ladder of ranks, blocks along the network, and the SVG chart
 *
 * rank-check and lora-spectrum both write reports; the plugins do not link
 * json-glib, so the little JSON they need is written here, once.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* JSON text: a string (escaped, UTF-8 passed through) and a number (%.17g,
 * `null` for NaN and infinities). */
void      lp_lora_json_string       (GString       *out,
                                     const char    *text);
void      lp_lora_json_number       (GString       *out,
                                     double         value);
/* A JSON array of @n numbers. */
void      lp_lora_json_numbers      (GString       *out,
                                     const double  *values,
                                     gsize          n);

/* Writes @text to @path atomically (temporary file, renamed over it). */
gboolean  lp_lora_report_write      (const char    *path,
                                     const GString *text,
                                     GError       **error);

/* The block a module belongs to, for "error along the network": its name up
 * to and including the first all-digit part, where parts are separated by
 * '.' or '_' (`transformer.transformer_blocks.7`, `lora_unet_double_blocks_3`,
 * `base_model.model.model.layers.11`, `lora_unet_down_blocks_1`); a name with
 * no number is its own block. */
char     *lp_lora_block_name        (const char    *module);

/* The ladder of ranks a spectrum is shown at: 1, 2, 4, … below @max_rank,
 * then @max_rank itself. Returns how many (at most 32) were written. */
guint     lp_lora_rank_ladder       (guint          max_rank,
                                     guint         *ranks);

/* One curve of the chart: a label and n (x, y) points. */
typedef struct {
  const char *label;
  const double *x;
  const double *y;
  guint n;
} LpLoraChartSeries;

/**
 * LpLoraChart:
 *
 * The two panels of the spectrum chart: the error against the rank (x on a
 * log₂ scale), and the error of each block along the network at a few ranks
 * (x: the block's index, labelled with @block_names).
 */
typedef struct {
  const char *title;
  const LpLoraChartSeries *by_rank;
  guint n_by_rank;
  const LpLoraChartSeries *by_block;
  guint n_by_block;
  const char *const *block_names;
  guint n_blocks;
} LpLoraChart;

#define LP_LORA_CHART_WIDTH  960
#define LP_LORA_CHART_HEIGHT 720

/* The chart as an SVG document of LP_LORA_CHART_WIDTH × LP_LORA_CHART_HEIGHT
 * pixels. */
GString  *lp_lora_chart_svg         (const LpLoraChart *chart);

G_END_DECLS
