/* lpipe-reduce.c: `lpipe reduce`, the everyday job in one short command:
 * files, folders and globs in, one pipeline each (source ! lora-svd or
 * lora-project ! rank-check ! sink), run side by side, outputs named from a
 * template, and a table of what each became
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <errno.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <glib/gstdio.h>

#include "lpipe-cli.h"

static struct {
  gint rank;
  char *method;
  double energy, sv_ratio, sv_fro, sv_cumulative;
  gint64 budget;
  gint max_rank, min_rank;
  gboolean pad;
  gint64 seed;
  gint niter, oversample;
  char *compute_dtype;
  char *dtype;
  char *output;
  char *output_dir;
  char *name;
  char *report;
  gboolean force;
  gboolean dry_run;
  /* kohya resize_lora.py's spellings */
  gint new_rank;
  char *dynamic_method;
  double dynamic_param;
  char *model;
  char *save_to;
  char *save_precision;
  char *device;
  gint new_conv_rank;
} opt = { .rank = -1, .budget = -1, .max_rank = -1, .min_rank = -1, .seed = -1, .niter = -1,
          .oversample = -1, .new_rank = -1, .dynamic_param = NAN, .new_conv_rank = -1,
          .energy = NAN, .sv_ratio = NAN, .sv_fro = NAN, .sv_cumulative = NAN };

static const GOptionEntry reduce_options[] = {
  { "rank", 'r', 0, G_OPTION_ARG_INT, &opt.rank, "Give every module this rank", "N" },
  { "method", 'm', 0, G_OPTION_ARG_STRING, &opt.method,
    "exact (default: the best rank-N LoRA), randomized, projection or sparse-projection", "METHOD" },
  { "energy", 0, 0, G_OPTION_ARG_DOUBLE, &opt.energy,
    "Per module, the smallest rank keeping this fraction of the squared singular values (kohya's sv_fro squared)", "F" },
  { "sv-fro", 0, 0, G_OPTION_ARG_DOUBLE, &opt.sv_fro,
    "kohya sv_fro: keep this fraction of the Frobenius norm", "F" },
  { "sv-ratio", 0, 0, G_OPTION_ARG_DOUBLE, &opt.sv_ratio,
    "kohya sv_ratio: keep singular values above sigma_1 / F", "F" },
  { "sv-cumulative", 0, 0, G_OPTION_ARG_DOUBLE, &opt.sv_cumulative,
    "kohya sv_cumulative: keep this fraction of the sum of singular values", "F" },
  { "budget", 0, 0, G_OPTION_ARG_INT64, &opt.budget, "Target output size in bytes, ranks given greedily", "BYTES" },
  { "max-rank", 0, 0, G_OPTION_ARG_INT, &opt.max_rank, "Upper bound of a chosen rank", "N" },
  { "min-rank", 0, 0, G_OPTION_ARG_INT, &opt.min_rank, "Lower bound of a chosen rank", "N" },
  { "pad", 0, 0, G_OPTION_ARG_NONE, &opt.pad, "Zero-pad chosen ranks up to --max-rank (one rank for every module)", NULL },
  { "seed", 0, 0, G_OPTION_ARG_INT64, &opt.seed, "Seed of the randomized and projection methods", "N" },
  { "niter", 0, 0, G_OPTION_ARG_INT, &opt.niter, "Power iterations of the randomized method", "N" },
  { "oversample", 0, 0, G_OPTION_ARG_INT, &opt.oversample, "Extra sketch columns of the randomized method", "N" },
  { "compute-dtype", 0, 0, G_OPTION_ARG_STRING, &opt.compute_dtype, "f64, f32 or auto (lora-svd compute-dtype)", "DTYPE" },
  { "dtype", 0, 0, G_OPTION_ARG_STRING, &opt.dtype, "Cast the output to this dtype (cast dtype=)", "DTYPE" },
  { "output", 'o', 0, G_OPTION_ARG_FILENAME, &opt.output, "The output file (one input only)", "OUT" },
  { "output-dir", 'd', 0, G_OPTION_ARG_FILENAME, &opt.output_dir, "Write the outputs into this folder (made if missing)", "DIR" },
  { "name", 0, 0, G_OPTION_ARG_STRING, &opt.name,
    "Output name template: {stem} {rank} {method} {criterion} (default {stem}-r{rank}.safetensors)", "TEMPLATE" },
  { "report", 0, 0, G_OPTION_ARG_FILENAME, &opt.report,
    "Write each file's per-module report (JSON) here; a template like --name", "FILE" },
  { "force", 'f', 0, G_OPTION_ARG_NONE, &opt.force, "Overwrite existing outputs", NULL },
  { "dry-run", 'n', 0, G_OPTION_ARG_NONE, &opt.dry_run, "Print the pipeline each file would run (as lpipe launch), run nothing", NULL },
  { "new_rank", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT, &opt.new_rank, "kohya: --rank (--max-rank with --dynamic_method)", "N" },
  { "dynamic_method", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_STRING, &opt.dynamic_method, "kohya: sv_ratio|sv_fro|sv_cumulative", "M" },
  { "dynamic_param", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_DOUBLE, &opt.dynamic_param, "kohya: the criterion's value", "F" },
  { "model", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_FILENAME, &opt.model, "kohya: the input", "IN" },
  { "save_to", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_FILENAME, &opt.save_to, "kohya: --output", "OUT" },
  { "save_precision", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_STRING, &opt.save_precision, "kohya: --dtype", "P" },
  { "device", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_STRING, &opt.device, "kohya: not used", "D" },
  { "new_conv_rank", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT, &opt.new_conv_rank, "kohya: not used", "N" },
  { NULL }
};

/* --- the options, as stage properties ------------------------------------ */

typedef struct {
  const char *option;      /* --sv-fro */
  double *value;
  const char *property;    /* sv-fro= */
  const char *label;       /* in {criterion}: svfro0.9 */
} Criterion;

static Criterion criteria[] = {
  { "--energy", &opt.energy, "energy", "energy" },
  { "--sv-fro", &opt.sv_fro, "sv-fro", "svfro" },
  { "--sv-ratio", &opt.sv_ratio, "sv-ratio", "svratio" },
  { "--sv-cumulative", &opt.sv_cumulative, "sv-cumulative", "svcum" },
};

typedef struct {
  GPtrArray *stage_words;   /* the reducing stage and its properties */
  char *rank_text;          /* {rank} */
  char *criterion;          /* {criterion} */
  const char *method;       /* {method} */
} Plan;

static void
plan_clear (Plan *plan)
{
  g_clear_pointer (&plan->stage_words, g_ptr_array_unref);
  g_clear_pointer (&plan->rank_text, g_free);
  g_clear_pointer (&plan->criterion, g_free);
}

static void
add_word (GPtrArray *words, const char *format, ...) G_GNUC_PRINTF (2, 3);

static void
add_word (GPtrArray  *words,
          const char *format,
          ...)
{
  va_list args;

  va_start (args, format);
  g_ptr_array_add (words, g_strdup_vprintf (format, args));
  va_end (args);
}

static char *
format_number (double value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];
  return g_strdup (g_ascii_formatd (buf, sizeof buf, "%.10g", value));
}

/* kohya's flags become lpipe's, as resize_lora.py means them: --new_rank
 * is the rank, or the upper bound when --dynamic_method picks the ranks. */
static gboolean
map_kohya_options (GError **error)
{
  if (opt.device)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--device: lpipe computes on the CPU (exactly, on the factors); drop --device");
      return FALSE;
    }
  if (opt.new_conv_rank >= 0)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--new_conv_rank: lpipe gives conv modules the rank of the others; drop it");
      return FALSE;
    }
  if (opt.dynamic_method)
    {
      double *target = NULL;
      if (g_str_equal (opt.dynamic_method, "sv_fro"))
        target = &opt.sv_fro;
      else if (g_str_equal (opt.dynamic_method, "sv_ratio"))
        target = &opt.sv_ratio;
      else if (g_str_equal (opt.dynamic_method, "sv_cumulative"))
        target = &opt.sv_cumulative;
      else
        {
          g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                       "--dynamic_method %s: expected sv_ratio, sv_fro or sv_cumulative", opt.dynamic_method);
          return FALSE;
        }
      if (isnan (opt.dynamic_param))
        {
          g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                       "--dynamic_method needs --dynamic_param (or write --%s VALUE)", opt.dynamic_method);
          return FALSE;
        }
      *target = opt.dynamic_param;
      if (opt.new_rank >= 0)
        opt.max_rank = opt.new_rank;
    }
  else if (!isnan (opt.dynamic_param))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--dynamic_param needs --dynamic_method");
      return FALSE;
    }
  else if (opt.new_rank >= 0)
    opt.rank = opt.new_rank;
  if (opt.save_to)
    opt.output = g_strdup (opt.save_to);
  if (opt.save_precision)
    {
      /* kohya's scripts read it with str_to_dtype (float, fp16, bf16, and in
       * library/utils.py also fp32, float16, bfloat16, fp8_e4m3fn, ...):
       * the spellings lp_dtype_parse() knows */
      LpDtype dtype;
      g_autoptr (GEnumClass) dtypes = g_type_class_ref (LP_TYPE_DTYPE);

      if (!lp_dtype_parse (opt.save_precision, &dtype) || !lp_dtype_is_float (dtype))
        {
          g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                       "--save_precision %s: expected a floating point dtype such as float, fp16 or bf16 "
                       "(or write --dtype)", opt.save_precision);
          return FALSE;
        }
      opt.dtype = g_strdup (g_enum_get_value (dtypes, dtype)->value_nick);
    }
  return TRUE;
}

/* The reducing stage and its properties, from the options; the checks that
 * need several options at once, which the stage would make only later. */
static gboolean
make_plan (Plan    *plan,
           GError **error)
{
  const char *method = opt.method ? opt.method : "exact";
  gboolean projection = g_str_equal (method, "projection") || g_str_equal (method, "sparse-projection");
  Criterion *criterion = NULL;
  GPtrArray *w;

  if (!map_kohya_options (error))
    return FALSE;
  if (!projection && !g_str_equal (method, "exact") && !g_str_equal (method, "randomized"))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--method %s: expected exact, randomized, projection or sparse-projection", method);
      return FALSE;
    }
  for (guint i = 0; i < G_N_ELEMENTS (criteria); i++)
    if (!isnan (*criteria[i].value))
      {
        if (criterion)
          {
            g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                         "%s and %s are two ways to choose the ranks; give one", criterion->option,
                         criteria[i].option);
            return FALSE;
          }
        criterion = &criteria[i];
      }
  if (criterion && opt.budget >= 0)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "%s and --budget are two ways to choose the ranks; give one", criterion->option);
      return FALSE;
    }
  if ((criterion || opt.budget >= 0) && opt.rank >= 0)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--rank fixes every module's rank, so %s would choose nothing; to bound the chosen "
                   "ranks write --max-rank %d", criterion ? criterion->option : "--budget", opt.rank);
      return FALSE;
    }
  if (!criterion && opt.budget < 0 && opt.rank < 0)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "give the new rank (--rank N), or a way to choose it per module "
                   "(--energy, --sv-fro, --sv-ratio, --sv-cumulative, --budget)");
      return FALSE;
    }
  if (opt.rank >= 0 && (opt.max_rank >= 0 || opt.min_rank >= 0))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--rank fixes every module's rank; --max-rank and --min-rank bound a chosen one "
                   "(with --energy, --sv-fro, ...)");
      return FALSE;
    }
  if (projection && (criterion || opt.budget >= 0 || opt.pad || opt.niter >= 0 || opt.oversample >= 0
                     || opt.compute_dtype))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--method %s takes --rank (and --seed) only: a random projection has no singular "
                   "values to choose ranks by", method);
      return FALSE;
    }
  if (!g_str_equal (method, "randomized") && (opt.niter >= 0 || opt.oversample >= 0))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--niter and --oversample are for --method randomized");
      return FALSE;
    }
  if (g_str_equal (method, "exact") && opt.seed >= 0)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--seed is for --method randomized and the projections: the exact SVD draws nothing");
      return FALSE;
    }

  plan->method = method;
  plan->stage_words = w = g_ptr_array_new_with_free_func (g_free);
  if (projection)
    {
      add_word (w, "lora-project");
      add_word (w, "rank=%d", opt.rank);
      if (g_str_equal (method, "sparse-projection"))
        add_word (w, "projection=sparse");
    }
  else
    {
      add_word (w, "lora-svd");
      if (g_str_equal (method, "randomized"))
        add_word (w, "method=randomized");
      if (opt.rank >= 0)
        add_word (w, "rank=%d", opt.rank);
      if (criterion)
        {
          g_autofree char *v = format_number (*criterion->value);
          add_word (w, "%s=%s", criterion->property, v);
          plan->criterion = g_strdup_printf ("%s%s", criterion->label, v);
        }
      if (opt.budget >= 0)
        {
          add_word (w, "budget=%" G_GINT64_FORMAT, opt.budget);
          plan->criterion = g_strdup_printf ("budget%" G_GINT64_FORMAT, opt.budget);
        }
      if (opt.max_rank >= 0)
        add_word (w, "max-rank=%d", opt.max_rank);
      if (opt.min_rank >= 0)
        add_word (w, "min-rank=%d", opt.min_rank);
      if (opt.pad)
        add_word (w, "pad=true");
      if (opt.niter >= 0)
        add_word (w, "niter=%d", opt.niter);
      if (opt.oversample >= 0)
        add_word (w, "oversample=%d", opt.oversample);
      if (opt.compute_dtype)
        add_word (w, "compute-dtype=%s", opt.compute_dtype);
    }
  if (opt.seed >= 0)
    add_word (w, "seed=%" G_GINT64_FORMAT, opt.seed);

  if (opt.rank >= 0)
    plan->rank_text = g_strdup_printf ("%d", opt.rank);
  else if (opt.max_rank >= 0)
    plan->rank_text = g_strdup_printf ("%d", opt.max_rank);
  else
    plan->rank_text = g_strdup ("dyn");
  if (plan->criterion == NULL)
    plan->criterion = g_strdup_printf ("r%s", plan->rank_text);
  return TRUE;
}

/* --- inputs and outputs ----------------------------------------------------- */

typedef struct {
  char *input;          /* as given or found */
  char *source;         /* the safetensors file read */
  gboolean peft_dir;    /* a PEFT folder: adapter_model.safetensors + adapter_config.json */
  char *output;         /* the file or PEFT folder written */
  char *sink;           /* the safetensors file written */
  char *report;
  gboolean made_dir;
} Job;

static void
job_clear (Job *job)
{
  g_free (job->input);
  g_free (job->source);
  g_free (job->output);
  g_free (job->sink);
  g_free (job->report);
}

static gboolean
is_peft_dir (const char *dir)
{
  g_autofree char *model = g_build_filename (dir, "adapter_model.safetensors", NULL);
  g_autofree char *config = g_build_filename (dir, "adapter_config.json", NULL);
  return g_file_test (model, G_FILE_TEST_IS_REGULAR) && g_file_test (config, G_FILE_TEST_IS_REGULAR);
}

static void
add_job (GArray      *jobs,
         GHashTable  *seen,
         const char  *path)
{
  Job job = { 0, };
  g_autofree char *canonical = g_canonicalize_filename (path, NULL);

  if (!g_hash_table_add (seen, g_steal_pointer (&canonical)))
    return;
  job.input = g_strdup (path);
  job.peft_dir = g_file_test (path, G_FILE_TEST_IS_DIR);
  job.source = job.peft_dir ? g_build_filename (path, "adapter_model.safetensors", NULL) : g_strdup (path);
  g_array_append_val (jobs, job);
}

/* A folder's *.safetensors files and PEFT folders, sorted (not deeper). */
static gboolean
add_folder (GArray      *jobs,
            GHashTable  *seen,
            const char  *dir,
            GError     **error)
{
  g_autoptr(GDir) d = g_dir_open (dir, 0, error);
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func (g_free);
  const char *entry;
  guint before = jobs->len;

  if (d == NULL)
    return FALSE;
  while ((entry = g_dir_read_name (d)))
    {
      g_autofree char *path = g_build_filename (dir, entry, NULL);
      if ((g_str_has_suffix (entry, ".safetensors") && g_file_test (path, G_FILE_TEST_IS_REGULAR))
          || (g_file_test (path, G_FILE_TEST_IS_DIR) && is_peft_dir (path)))
        g_ptr_array_add (names, g_steal_pointer (&path));
    }
  lp_cli_sort_strings (names);
  for (guint i = 0; i < names->len; i++)
    add_job (jobs, seen, g_ptr_array_index (names, i));
  if (jobs->len == before)
    {
      g_autofree char *shown = lp_cli_escape (dir, FALSE);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                   "%s: a folder with no .safetensors file and no PEFT folder in it", shown);
      return FALSE;
    }
  return TRUE;
}

static gboolean
expand_input (GArray      *jobs,
              GHashTable  *seen,
              const char  *arg,
              GError     **error)
{
  g_autofree char *shown = lp_cli_escape (arg, FALSE);

  if (g_file_test (arg, G_FILE_TEST_IS_DIR))
    {
      if (is_peft_dir (arg))
        {
          add_job (jobs, seen, arg);
          return TRUE;
        }
      return add_folder (jobs, seen, arg, error);
    }
  if (g_file_test (arg, G_FILE_TEST_EXISTS))
    {
      add_job (jobs, seen, arg);
      return TRUE;
    }
  /* a pattern the shell left alone (quoted, or matching nothing there) */
  if (strpbrk (arg, "*?["))
    {
      glob_t g;
      int rc = glob (arg, 0, NULL, &g);
      if (rc == 0)
        {
          for (size_t i = 0; i < g.gl_pathc; i++)
            if (!g_file_test (g.gl_pathv[i], G_FILE_TEST_IS_DIR) || is_peft_dir (g.gl_pathv[i]))
              add_job (jobs, seen, g.gl_pathv[i]);
          globfree (&g);
          return TRUE;
        }
      globfree (&g);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT, "%s: no file matches", shown);
      return FALSE;
    }
  g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT, "%s: no such file or folder", shown);
  return FALSE;
}

static char *
input_stem (Job *job)
{
  g_autofree char *base = NULL;
  g_autofree char *trimmed = g_strdup (job->input);
  gsize len = strlen (trimmed);

  while (len > 1 && trimmed[len - 1] == G_DIR_SEPARATOR)
    trimmed[--len] = '\0';
  base = g_path_get_basename (trimmed);
  if (!job->peft_dir && g_str_has_suffix (base, ".safetensors"))
    base[strlen (base) - strlen (".safetensors")] = '\0';
  return g_steal_pointer (&base);
}

/* TEMPLATE with {stem}, {rank}, {method} and {criterion} filled in. */
static char *
expand_template (const char  *template,
                 Job         *job,
                 Plan        *plan,
                 GError     **error)
{
  GString *out = g_string_new (NULL);
  g_autofree char *stem = input_stem (job);
  const char *p = template;

  while (*p)
    {
      if (*p == '{')
        {
          const char *end = strchr (p, '}');
          g_autofree char *key = end ? g_strndup (p + 1, end - p - 1) : NULL;
          const char *value = NULL;

          if (key && g_str_equal (key, "stem"))
            value = stem;
          else if (key && g_str_equal (key, "rank"))
            value = plan->rank_text;
          else if (key && g_str_equal (key, "method"))
            value = plan->method;
          else if (key && g_str_equal (key, "criterion"))
            value = plan->criterion;
          if (value == NULL)
            {
              g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                           "name template '%s': %s; the fields are {stem}, {rank}, {method}, {criterion}",
                           template, end ? "unknown field" : "'{' without '}'");
              g_string_free (out, TRUE);
              return NULL;
            }
          g_string_append (out, value);
          p = end + 1;
        }
      else
        g_string_append_c (out, *p++);
    }
  return g_string_free (out, FALSE);
}

/* Every job's output, checked before any work: no folder where a file is
 * meant, no two jobs writing one file, nothing overwritten without --force. */
static gboolean
name_outputs (GArray   *jobs,
              Plan     *plan,
              GError  **error)
{
  const char *template = opt.name;
  g_autoptr(GHashTable) outputs = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr(GString) existing = g_string_new (NULL);
  guint n_existing = 0;

  if (template == NULL)
    template = opt.rank >= 0 || (opt.max_rank >= 0 && opt.pad) ? "{stem}-r{rank}.safetensors"
                                                               : "{stem}-{criterion}.safetensors";
  if (opt.output && jobs->len != 1)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "-o names one output, but there are %u inputs; use --output-dir DIR (and --name)", jobs->len);
      return FALSE;
    }
  if (opt.output && opt.output_dir)
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE, "give -o or --output-dir, not both");
      return FALSE;
    }
  if (opt.output_dir && g_file_test (opt.output_dir, G_FILE_TEST_EXISTS)
      && !g_file_test (opt.output_dir, G_FILE_TEST_IS_DIR))
    {
      g_autofree char *shown = lp_cli_escape (opt.output_dir, FALSE);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOTDIR, "--output-dir %s: a file, not a folder", shown);
      return FALSE;
    }
  if (opt.report && jobs->len > 1 && !strchr (opt.report, '{'))
    {
      g_set_error (error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                   "--report %s would be written by all %u files; put {stem} in it", opt.report, jobs->len);
      return FALSE;
    }

  for (guint i = 0; i < jobs->len; i++)
    {
      Job *job = &g_array_index (jobs, Job, i);
      g_autofree char *name = NULL;
      g_autofree char *canonical = NULL;

      if (opt.output)
        job->output = g_strdup (opt.output);
      else
        {
          g_autofree char *dir = NULL;

          name = expand_template (template, job, plan, error);
          if (name == NULL)
            return FALSE;
          if (job->peft_dir && g_str_has_suffix (name, ".safetensors"))
            name[strlen (name) - strlen (".safetensors")] = '\0';
          if (opt.output_dir)
            dir = g_strdup (opt.output_dir);
          else
            {
              g_autofree char *trimmed = g_strdup (job->input);
              gsize len = strlen (trimmed);
              while (len > 1 && trimmed[len - 1] == G_DIR_SEPARATOR)
                trimmed[--len] = '\0';
              dir = g_path_get_dirname (trimmed);
            }
          job->output = g_str_equal (dir, ".") ? g_strdup (name) : g_build_filename (dir, name, NULL);
        }
      if (opt.report)
        {
          job->report = expand_template (opt.report, job, plan, error);
          if (job->report == NULL)
            return FALSE;
        }

      {
        g_autofree char *shown = lp_cli_escape (job->output, FALSE);
        if (!job->peft_dir && g_file_test (job->output, G_FILE_TEST_IS_DIR))
          {
            g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_ISDIR,
                         "%s: a folder, but the output of a file is a file (for a folder of outputs "
                         "write --output-dir %s)", shown, shown);
            return FALSE;
          }
        if (job->peft_dir && g_file_test (job->output, G_FILE_TEST_EXISTS)
            && !g_file_test (job->output, G_FILE_TEST_IS_DIR))
          {
            g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOTDIR,
                         "%s: a file, but the output of a PEFT folder is a folder", shown);
            return FALSE;
          }
        job->sink = job->peft_dir ? g_build_filename (job->output, "adapter_model.safetensors", NULL)
                                  : g_strdup (job->output);
        canonical = g_canonicalize_filename (job->sink, NULL);
        {
          g_autofree char *source = g_canonicalize_filename (job->source, NULL);
          if (g_str_equal (source, canonical))
            {
              g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                           "%s: the output would replace its own input; name another (-o, --name)", shown);
              return FALSE;
            }
        }
        if (!g_hash_table_add (outputs, g_steal_pointer (&canonical)))
          {
            g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                         "%s: two inputs would write this output; put {stem} in --name", shown);
            return FALSE;
          }
        if (!opt.force && g_file_test (job->sink, G_FILE_TEST_EXISTS))
          {
            if (n_existing++ < 5)
              g_string_append_printf (existing, "%s%s", n_existing > 1 ? ", " : "", shown);
          }
      }
    }
  if (n_existing > 0)
    {
      if (n_existing > 5)
        g_string_append_printf (existing, " and %u more", n_existing - 5);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                   "%s exist%s already; --force overwrites, nothing was done", existing->str,
                   n_existing == 1 ? "s" : "");
      return FALSE;
    }
  return TRUE;
}

/* source ! reducer ! [rank-check !] [cast !] sink, as launch words */
static GPtrArray *
job_words (Job  *job,
           Plan *plan)
{
  GPtrArray *w = g_ptr_array_new_with_free_func (g_free);

  add_word (w, "safetensors-source");
  add_word (w, "location=%s", job->source);
  add_word (w, "!");
  for (guint i = 0; i < plan->stage_words->len; i++)
    add_word (w, "%s", (char *) g_ptr_array_index (plan->stage_words, i));
  add_word (w, "!");
  /* lora-svd's own record gives the summary its errors; rank-check only
   * for the per-module table or report */
  if (lp_cli.verbose || job->report)
    {
      add_word (w, "rank-check");
      if (!lp_cli.verbose)
        add_word (w, "quiet=true");   /* what lp_cli_prepare_run() sets: shown as run */
      if (job->report)
        add_word (w, "report=%s", job->report);
      add_word (w, "!");
    }
  if (opt.dtype)
    {
      add_word (w, "cast");
      add_word (w, "dtype=%s", opt.dtype);
      add_word (w, "!");
    }
  add_word (w, "safetensors-sink");
  add_word (w, "location=%s", job->sink);
  g_ptr_array_add (w, NULL);
  return w;
}

static void
print_dry_run (GPtrArray *words)
{
  g_autoptr(GString) line = g_string_new ("lpipe launch");

  for (guint i = 0; g_ptr_array_index (words, i); i++)
    {
      const char *word = g_ptr_array_index (words, i);
      g_autofree char *quoted = NULL;

      /* quote only what the shell would change */
      if (word[strspn (word, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=./,:+@%!")] == '\0')
        quoted = g_strdup (word);
      else
        quoted = g_shell_quote (word);
      g_string_append_printf (line, " %s", quoted);
    }
  g_print ("%s\n", line->str);
}

/* --- the table at the end ----------------------------------------------------- */

static void
print_table (GArray      *jobs,
             LpCliResult *results,
             double       seconds)
{
  guint width = strlen ("file"), n_ok = 0;
  guint64 in_total = 0, out_total = 0;

  for (guint i = 0; i < jobs->len; i++)
    width = MAX (width, g_utf8_strlen (g_array_index (jobs, Job, i).input, -1));
  width = MIN (width, 48);

  g_printerr ("%-*s  %-9s  %-21s  %-9s %-9s\n", (int) width, "file", "ranks", "size", "err mean", "err max");
  for (guint i = 0; i < jobs->len; i++)
    {
      Job *job = &g_array_index (jobs, Job, i);
      LpCliResult *r = &results[i];
      g_autofree char *name = lp_cli_escape (job->input, FALSE);

      if (r->failure)
        {
          g_autofree char *why = lp_cli_escape (r->failure, FALSE);
          g_printerr ("%-*s  failed: %s\n", (int) width, name, why);
          continue;
        }
      {
        g_autofree char *rin = lp_cli_describe_ranks (r->in_modules, r->in_min_rank, r->in_max_rank);
        g_autofree char *rout = lp_cli_describe_ranks (r->out_modules, r->out_min_rank, r->out_max_rank);
        g_autofree char *ranks = g_strdup_printf ("%s → %s", rin, rout);
        char sin[32], sout[32];
        g_autofree char *sizes = NULL;
        char mean[32] = "-", max[32] = "-";

        lp_cli_format_bytes (sin, sizeof sin, r->in_bytes);
        lp_cli_format_bytes (sout, sizeof sout, r->out_bytes);
        sizes = g_strdup_printf ("%s → %s", sin, sout);
        if (r->have_error)
          {
            g_snprintf (mean, sizeof mean, "%.3g", r->mean_error);
            g_snprintf (max, sizeof max, "%.3g", r->max_error);
          }
        /* "→" is one column but three bytes: pad by characters */
        g_printerr ("%-*s  %s%*s  %s%*s  %-9s %-9s\n", (int) width, name,
                 ranks, (int) MAX (0, 9 - (int) g_utf8_strlen (ranks, -1)), "",
                 sizes, (int) MAX (0, 21 - (int) g_utf8_strlen (sizes, -1)), "", mean, max);
        n_ok++;
        in_total += r->in_bytes;
        out_total += r->out_bytes;
      }
    }
  {
    char sin[32], sout[32];
    lp_cli_format_bytes (sin, sizeof sin, in_total);
    lp_cli_format_bytes (sout, sizeof sout, out_total);
    g_printerr ("%u file%s: %u reduced (%s → %s), %u failed, in %.2f s\n", jobs->len, jobs->len == 1 ? "" : "s",
             n_ok, sin, sout, jobs->len - n_ok, seconds);
  }
}

/* --- building each file's pipeline, as its turn comes ------------------------- */

typedef struct {
  GArray *jobs;
  Plan *plan;
} Build;

static LpPipeline *
build_job (guint        index,
           LpCliResult *result,
           gpointer     user_data)
{
  Build *build = user_data;
  Job *job = &g_array_index (build->jobs, Job, index);
  g_autoptr(GPtrArray) words = job_words (job, build->plan);
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (NULL);
  g_autoptr(GError) local = NULL;
  g_autofree char *origin = lp_cli_escape (job->input, FALSE);

  /* the sink writes into the folder, so it must be there */
  if (job->peft_dir && !g_file_test (job->output, G_FILE_TEST_IS_DIR))
    {
      if (g_mkdir_with_parents (job->output, 0777) != 0)
        {
          result->failure = g_strdup_printf ("cannot make the folder %s: %s", job->output, g_strerror (errno));
          lp_cli_error ("%s: %s", origin, result->failure);
          return NULL;
        }
      job->made_dir = TRUE;
    }
  if (!lp_pipeline_parse_launch (pipeline, (const char * const *) words->pdata, &local)
      || !lp_pipeline_validate (pipeline, &local))
    {
      result->failure = g_strdup (local->message);
      lp_cli_error ("%s: %s", origin, local->message);
      return NULL;
    }
  lp_cli_prepare_run (pipeline, result);
  g_free (result->input);
  result->input = g_strdup (job->input);
  return g_steal_pointer (&pipeline);
}

/* --- the command ---------------------------------------------------------------- */

static int
cmd_reduce (int argc, char **argv)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(GHashTable) seen = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  g_autoptr(GArray) jobs = g_array_new (FALSE, TRUE, sizeof (Job));
  g_autofree LpCliResult *results = NULL;
  Plan plan = { 0, };
  gint64 start = g_get_monotonic_time ();
  int status = EXIT_OK;

  g_array_set_clear_func (jobs, (GDestroyNotify) job_clear);
  if (!make_plan (&plan, &error))
    {
      lp_cli_error ("%s (see lpipe reduce --help)", error->message);
      plan_clear (&plan);
      return EXIT_USAGE;
    }
  if (opt.model && !expand_input (jobs, seen, opt.model, &error))
    goto failed;
  for (int i = 1; i < argc; i++)
    if (!expand_input (jobs, seen, argv[i], &error))
      goto failed;
  if (jobs->len == 0)
    {
      lp_cli_error ("reduce needs input files, folders or patterns (see lpipe reduce --help)");
      plan_clear (&plan);
      return EXIT_USAGE;
    }
  if (!name_outputs (jobs, &plan, &error))
    goto failed;

  if (opt.dry_run)
    {
      for (guint i = 0; i < jobs->len; i++)
        {
          g_autoptr(GPtrArray) words = job_words (&g_array_index (jobs, Job, i), &plan);
          print_dry_run (words);
        }
      plan_clear (&plan);
      return EXIT_OK;
    }

  if (opt.output_dir && g_mkdir_with_parents (opt.output_dir, 0777) != 0)
    {
      g_autofree char *shown = lp_cli_escape (opt.output_dir, FALSE);
      lp_cli_error ("cannot make the folder %s: %s", shown, g_strerror (errno));
      plan_clear (&plan);
      return EXIT_FAILED;
    }

  {
    Build build = { jobs, &plan };

    results = g_new0 (LpCliResult, jobs->len);
    status = lp_cli_run_jobs (jobs->len, build_job, &build, results);
    for (guint i = 0; i < jobs->len; i++)
      {
        Job *job = &g_array_index (jobs, Job, i);
        if (results[i].failure && results[i].seconds > 0 && status <= EXIT_FAILED)
          {
            /* failed while running (a build failure is told when it happens) */
            g_autofree char *origin = lp_cli_escape (job->input, FALSE);
            lp_cli_error ("%s: %s", origin, results[i].failure);
          }
        if (results[i].failure && job->made_dir)
          g_rmdir (job->output);   /* only if it is still empty */
      }
    if (status > EXIT_FAILED)
      lp_cli_error ("interrupted; the files not finished were not written");
  }
  for (guint i = 0; i < jobs->len; i++)
    if (results[i].failure && status == EXIT_OK)
      status = EXIT_FAILED;

  if (!lp_cli.quiet)
    {
      if (jobs->len == 1 && results[0].failure == NULL)
        {
          g_free (results[0].output);
          results[0].output = g_strdup (g_array_index (jobs, Job, 0).output);
          results[0].seconds = (g_get_monotonic_time () - start) / 1e6;
          lp_cli_print_summary (&results[0]);
        }
      else if (jobs->len > 1)
        print_table (jobs, results, (g_get_monotonic_time () - start) / 1e6);
    }

  for (guint i = 0; results && i < jobs->len; i++)
    lp_cli_result_clear (&results[i]);
  plan_clear (&plan);
  return status;

failed:
  lp_cli_error ("%s", error->message);
  plan_clear (&plan);
  return error->domain == G_OPTION_ERROR ? EXIT_USAGE : EXIT_FAILED;
}

const LpCliCommand lp_cli_reduce_command = {
  "reduce", "IN... (--rank N | --energy F | ...) [-o OUT | -d DIR]",
  "reduce LoRAs: files, folders, patterns",
  "Reduces the rank of LoRA files: each input (a .safetensors file, a folder\n"
  "of them, a PEFT folder, or a pattern) runs\n"
  "  safetensors-source ! lora-svd ! safetensors-sink\n"
  "(lora-project for the projection methods; rank-check too with --verbose\n"
  "or --report), several files side by side\n"
  "within --threads. Outputs are named from --name, beside each input or in\n"
  "--output-dir; PEFT folders stay folders. Existing outputs are kept unless\n"
  "--force. One file's failure is reported and the others finish; the exit\n"
  "status is 1 if any failed.\n"
  "\n"
  "--energy F keeps F of the squared singular values: kohya's sv_fro of\n"
  "sqrt(F). kohya's resize_lora.py spellings are understood too: --new_rank,\n"
  "--dynamic_method sv_fro --dynamic_param F (--new_rank then bounds the rank),\n"
  "--model, --save_to, --save_precision.\n"
  "\n"
  "Examples:\n"
  "  lpipe reduce lora.safetensors --rank 8\n"
  "  lpipe reduce loras/ --sv-fro 0.9 --max-rank 32 -d reduced/\n"
  "  lpipe reduce 'loras/*.safetensors' --rank 4 --name '{stem}-small.safetensors' --dry-run\n",
  reduce_options, cmd_reduce,
};
