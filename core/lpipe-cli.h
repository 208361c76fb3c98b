/* lpipe-cli.h: what the command line's files share (not installed)
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <json-glib/json-glib.h>
#include <lpipe/lpipe.h>

G_BEGIN_DECLS

/* Exit codes: 0 success, 1 failure (bad input, failed run), 2 misuse. */
enum {
  EXIT_OK = 0,
  EXIT_FAILED = 1,
  EXIT_USAGE = 2,
  EXIT_SIGHUP = 129,
  EXIT_SIGINT = 130,
  EXIT_SIGTERM = 143,
};

/* The options every command takes. */
typedef struct {
  gboolean quiet;     /* errors only */
  gboolean verbose;   /* per-module tables too */
  gboolean json;
  gint threads;       /* -1: not given, all cores */
} LpCliOptions;

extern LpCliOptions lp_cli;

/* --- lpipe-output.c: everything printed goes through here --------------- */

char     *lp_cli_escape            (const char *text,
                                    gboolean    keep_newlines);
void      lp_cli_error             (const char *format,
                                    ...) G_GNUC_PRINTF (1, 2);
void      lp_cli_warning           (const char *format,
                                    ...) G_GNUC_PRINTF (1, 2);
void      lp_cli_install_log_writer (void);
void      lp_cli_format_bytes      (char       *buf,
                                    gsize       len,
                                    double      bytes);
guint     lp_cli_terminal_width    (void);
char     *lp_cli_fit_bar           (const char *text,
                                    double      fraction);
void      lp_cli_draw_status       (const char *line);
void      lp_cli_clear_status      (void);
void      lp_cli_print_json        (JsonBuilder *builder);
void      lp_cli_sort_strings      (GPtrArray  *strings);

/* --- lpipe-run.c: running a pipeline, and what a run says ---------------- */

/* What one run read and wrote, for the summary. */
typedef struct {
  char *input;          /* location, or "(made by lora-synth)" */
  gboolean input_is_file;
  guint64 in_bytes;
  guint in_modules, in_min_rank, in_max_rank;
  char *output;         /* the last sink's location, or NULL */
  guint64 out_bytes;
  guint out_modules, out_min_rank, out_max_rank;
  gboolean have_error;  /* a rank-check measured the error */
  double mean_error, max_error;
  GPtrArray *worst;     /* char *: "module (error)", worst first */
  char *report;         /* where the pipeline's rank-check writes its report */
  GObject *check;       /* the pipeline's last rank-check */
  char *failure;        /* the error message, when the run failed */
  double seconds;
} LpCliResult;

void      lp_cli_result_clear      (LpCliResult *result);
void      lp_cli_prepare_run       (LpPipeline  *pipeline,
                                    LpCliResult *result);
void      lp_cli_collect_result    (LpPipeline  *pipeline,
                                    LpCliResult *result);
void      lp_cli_print_summary     (LpCliResult *result);
char     *lp_cli_describe_ranks    (guint        n_modules,
                                    guint        min_rank,
                                    guint        max_rank);
gboolean  lp_cli_count_ranks       (const char  *filename,
                                    guint       *n_modules,
                                    guint       *min_rank,
                                    guint       *max_rank);
int       lp_cli_run_pipeline      (LpPipeline  *pipeline);
typedef LpPipeline *(*LpCliBuildFunc) (guint        index,
                                       LpCliResult *result,
                                       gpointer     user_data);
int       lp_cli_run_jobs          (guint           n,
                                    LpCliBuildFunc  build,
                                    gpointer        user_data,
                                    LpCliResult    *results);
int       lp_cli_run_pipelines     (LpPipeline **pipelines,
                                    LpCliResult *results,
                                    guint        n);

/* --- the commands ---------------------------------------------------------- */

typedef struct {
  const char *name;
  const char *synopsis;      /* the words after `lpipe NAME` */
  const char *summary;       /* one line, for `lpipe --help` */
  const char *usage;         /* `lpipe NAME --help`, with an example */
  const GOptionEntry *options;
  int (*run) (int argc, char **argv);
} LpCliCommand;

extern const LpCliCommand lp_cli_reduce_command;
extern const LpCliCommand lp_cli_info_command;

G_END_DECLS
