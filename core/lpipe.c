/* lpipe.c: the command line: run, validate, launch, inspect, info
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <errno.h>
#include <locale.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <glib-unix.h>
#include <json-glib/json-glib.h>
#include <lpipe/lpipe.h>

/* Exit codes: 0 success, 1 failure (bad input, failed run), 2 misuse. */
enum {
  EXIT_OK = 0,
  EXIT_FAILED = 1,
  EXIT_USAGE = 2,
  EXIT_SIGINT = 130,
  EXIT_SIGTERM = 143,
};

static gboolean opt_quiet;
static gboolean opt_json;
static gint opt_threads = -1;   /* -1: not given, all cores */

static const char usage_text[] =
  "Usage:\n"
  "  lpipe run FILE.pipeline [NAME=VALUE ...]   run a pipeline file\n"
  "  lpipe validate FILE.pipeline [NAME=VALUE ...]\n"
  "                                             check a pipeline file without running it\n"
  "  lpipe launch STAGE [PROP=VALUE ...] ! STAGE ...\n"
  "                                             run an inline chain of stages\n"
  "  lpipe inspect [STAGE] [--json]            list stages, or describe one\n"
  "  lpipe info FILE.safetensors [--json]      show a checkpoint's tensors and metadata\n"
  "\n"
  "Options:\n"
  "  -h, --help       show help (also after a command)\n"
  "  --version        print the version\n"
  "  -q, --quiet      print nothing but errors\n"
  "  -j, --threads N  compute N tensors at once (default: all cores)\n"
  "  --json           machine-readable output (inspect, info)\n"
  "\n"
  "Plugins are found in $LPIPE_PLUGIN_PATH, then in the installed plugin directory.\n";

static void
print_error (const char *fmt, ...) G_GNUC_PRINTF (1, 2);

static void
print_error (const char *fmt,
             ...)
{
  va_list args;
  g_autofree char *msg = NULL;

  va_start (args, fmt);
  msg = g_strdup_vprintf (fmt, args);
  va_end (args);
  g_printerr ("lpipe: error: %s\n", msg);
}

/* --- progress --------------------------------------------------------- */

typedef struct {
  gint64 start;
  gint64 last_draw;
  gboolean drawn;
} Progress;

static void
format_bytes (char *buf, gsize len, double bytes)
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

static void
on_progress (LpPipeline *pipeline,
             guint64     tensors_done,
             guint64     tensors_total,
             guint64     bytes_done,
             guint64     bytes_total,
             gpointer    user_data)
{
  Progress *p = user_data;
  gint64 now = g_get_monotonic_time ();
  double elapsed, rate, frac;
  char done_s[32], total_s[32], rate_s[32], eta_s[32] = "";
  int width = 24, filled;
  GString *bar;

  if (p->start == 0 || tensors_done == 0)
    p->start = now;
  /* Redraw at most ten times a second, and always at the end. */
  if (now - p->last_draw < 100000 && tensors_done < tensors_total)
    return;
  p->last_draw = now;

  elapsed = (now - p->start) / 1e6;
  frac = bytes_total ? (double) bytes_done / bytes_total : (tensors_total ? (double) tensors_done / tensors_total : 1.0);
  rate = elapsed > 0 ? bytes_done / elapsed : 0;
  format_bytes (done_s, sizeof done_s, bytes_done);
  format_bytes (total_s, sizeof total_s, bytes_total);
  format_bytes (rate_s, sizeof rate_s, rate);
  if (rate > 0 && bytes_done < bytes_total)
    g_snprintf (eta_s, sizeof eta_s, ", %.0f s left", (bytes_total - bytes_done) / rate);

  filled = (int) (frac * width + 0.5);
  bar = g_string_new ("\r[");
  for (int i = 0; i < width; i++)
    g_string_append_c (bar, i < filled ? '#' : '.');
  g_string_append_printf (bar, "] %" G_GUINT64_FORMAT "/%" G_GUINT64_FORMAT " tensors, %s/%s, %s/s%s\033[K",
                          tensors_done, tensors_total, done_s, total_s, rate_s, eta_s);
  fputs (bar->str, stderr);
  fflush (stderr);
  g_string_free (bar, TRUE);
  p->drawn = TRUE;
}

/* --- running ---------------------------------------------------------- */

typedef struct {
  GMainLoop *loop;
  GCancellable *cancellable;
  GError *error;
  gboolean ok;
  int signal_number;
} RunState;

static gboolean
on_signal (gpointer user_data)
{
  RunState *state = user_data;
  g_cancellable_cancel (state->cancellable);
  return G_SOURCE_CONTINUE;
}

static gboolean
on_sigint (gpointer user_data)
{
  ((RunState *) user_data)->signal_number = SIGINT;
  return on_signal (user_data);
}

static gboolean
on_sigterm (gpointer user_data)
{
  ((RunState *) user_data)->signal_number = SIGTERM;
  return on_signal (user_data);
}

static void
on_run_done (GObject      *source,
             GAsyncResult *result,
             gpointer      user_data)
{
  RunState *state = user_data;

  state->ok = lp_pipeline_run_finish (LP_PIPELINE (source), result, &state->error);
  g_main_loop_quit (state->loop);
}

static int
run_pipeline (LpPipeline *pipeline)
{
  RunState state = { 0, };
  Progress progress = { 0, };
  guint sigint_id, sigterm_id;
  gint64 start = g_get_monotonic_time ();
  gulong handler = 0;

  if (opt_threads > 0)
    lp_pipeline_set_threads (pipeline, opt_threads);
  if (!opt_quiet && isatty (STDERR_FILENO))
    handler = g_signal_connect (pipeline, "progress", G_CALLBACK (on_progress), &progress);

  state.loop = g_main_loop_new (NULL, FALSE);
  state.cancellable = g_cancellable_new ();
  sigint_id = g_unix_signal_add (SIGINT, on_sigint, &state);
  sigterm_id = g_unix_signal_add (SIGTERM, on_sigterm, &state);

  lp_pipeline_run_async (pipeline, state.cancellable, on_run_done, &state);
  g_main_loop_run (state.loop);

  g_source_remove (sigint_id);
  g_source_remove (sigterm_id);
  if (handler)
    g_signal_handler_disconnect (pipeline, handler);
  if (progress.drawn)
    fputs ("\n", stderr);
  g_main_loop_unref (state.loop);
  g_object_unref (state.cancellable);

  if (!state.ok)
    {
      if (state.signal_number)
        {
          print_error ("interrupted; nothing was written");
          g_clear_error (&state.error);
          return state.signal_number == SIGINT ? EXIT_SIGINT : EXIT_SIGTERM;
        }
      print_error ("%s", state.error->message);
      g_clear_error (&state.error);
      return EXIT_FAILED;
    }
  if (!opt_quiet)
    g_printerr ("lpipe: done in %.2f s\n", (g_get_monotonic_time () - start) / 1e6);
  return EXIT_OK;
}

static int
cmd_run (int argc, char **argv, gboolean validate_only)
{
  g_autoptr(LpPipeline) pipeline = NULL;
  g_autoptr(GError) error = NULL;

  if (argc < 2)
    {
      print_error ("%s needs a pipeline file (lpipe %s FILE.pipeline [NAME=VALUE ...])", argv[0], argv[0]);
      return EXIT_USAGE;
    }
  for (int i = 2; i < argc; i++)
    if (strchr (argv[i], '=') == NULL)
      {
        print_error ("'%s' is not a parameter; write NAME=VALUE", argv[i]);
        return EXIT_USAGE;
      }

  pipeline = lp_pipeline_new (NULL);
  if (!lp_pipeline_load_from_file (pipeline, argv[1], (const char * const *) argv + 2, &error) ||
      !lp_pipeline_validate (pipeline, &error))
    {
      print_error ("%s", error->message);
      return EXIT_FAILED;
    }
  if (validate_only)
    {
      if (!opt_quiet)
        g_print ("%s: valid, %u stages\n", argv[1], lp_pipeline_get_n_stages (pipeline));
      return EXIT_OK;
    }
  return run_pipeline (pipeline);
}

static int
cmd_launch (int argc, char **argv)
{
  g_autoptr(LpPipeline) pipeline = NULL;
  g_autoptr(GError) error = NULL;

  if (argc < 2)
    {
      print_error ("launch needs stages: lpipe launch STAGE [PROP=VALUE ...] ! STAGE ...");
      return EXIT_USAGE;
    }
  pipeline = lp_pipeline_new (NULL);
  if (!lp_pipeline_parse_launch (pipeline, (const char * const *) argv + 1, &error) ||
      !lp_pipeline_validate (pipeline, &error))
    {
      print_error ("%s", error->message);
      return EXIT_FAILED;
    }
  return run_pipeline (pipeline);
}

/* --- inspect ---------------------------------------------------------- */

static const char *
role_name (LpStageRole role)
{
  switch (role)
    {
    case LP_STAGE_ROLE_SOURCE: return "source";
    case LP_STAGE_ROLE_TRANSFORM: return "transform";
    case LP_STAGE_ROLE_SINK: return "sink";
    case LP_STAGE_ROLE_AGGREGATOR: return "aggregator";
    default: return "?";
    }
}

static GParamSpec **
stage_properties (GType type, guint *n)
{
  GObjectClass *klass = g_type_class_ref (type);
  GParamSpec **all = g_object_class_list_properties (klass, n);
  guint k = 0;

  /* Only what a pipeline can set: the stage's own writable properties. */
  for (guint i = 0; i < *n; i++)
    if ((all[i]->flags & G_PARAM_WRITABLE) && g_type_is_a (all[i]->owner_type, LP_TYPE_STAGE))
      all[k++] = all[i];
  *n = k;
  g_type_class_unref (klass);
  return all;
}

static void
print_json (JsonBuilder *b)
{
  g_autoptr(JsonGenerator) gen = json_generator_new ();
  g_autoptr(JsonNode) root = json_builder_get_root (b);
  g_autofree char *text = NULL;

  json_generator_set_pretty (gen, TRUE);
  json_generator_set_root (gen, root);
  text = json_generator_to_data (gen, NULL);
  g_print ("%s\n", text);
}

static void
build_stage_json (JsonBuilder *b, LpRegistry *registry, const char *name, gboolean with_properties)
{
  GType type = lp_registry_lookup (registry, name);
  LpStageClass *klass = g_type_class_ref (type);
  LpPlugin *plugin = lp_registry_lookup_plugin (registry, name);

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "name");
  json_builder_add_string_value (b, name);
  json_builder_set_member_name (b, "category");
  json_builder_add_string_value (b, lp_stage_class_get_category (klass));
  json_builder_set_member_name (b, "description");
  json_builder_add_string_value (b, lp_stage_class_get_description (klass));
  json_builder_set_member_name (b, "role");
  json_builder_add_string_value (b, role_name (lp_stage_class_get_role (klass)));
  json_builder_set_member_name (b, "min-inputs");
  json_builder_add_int_value (b, lp_stage_class_get_min_inputs (klass));
  json_builder_set_member_name (b, "max-inputs");
  json_builder_add_int_value (b, MIN (lp_stage_class_get_max_inputs (klass), G_MAXINT32));
  json_builder_set_member_name (b, "plugin");
  json_builder_add_string_value (b, plugin ? lp_plugin_get_name (plugin) : NULL);
  if (with_properties)
    {
      guint n = 0;
      g_autofree GParamSpec **pspecs = stage_properties (type, &n);

      json_builder_set_member_name (b, "properties");
      json_builder_begin_array (b);
      for (guint i = 0; i < n; i++)
        {
          g_autofree char *t = lp_param_spec_describe_type (pspecs[i]);
          g_autofree char *d = lp_param_spec_default_to_string (pspecs[i]);

          json_builder_begin_object (b);
          json_builder_set_member_name (b, "name");
          json_builder_add_string_value (b, pspecs[i]->name);
          json_builder_set_member_name (b, "type");
          json_builder_add_string_value (b, t);
          json_builder_set_member_name (b, "default");
          json_builder_add_string_value (b, d);
          json_builder_set_member_name (b, "required");
          json_builder_add_boolean_value (b, lp_stage_class_is_property_required (klass, pspecs[i]->name));
          json_builder_set_member_name (b, "blurb");
          json_builder_add_string_value (b, g_param_spec_get_blurb (pspecs[i]));
          json_builder_end_object (b);
        }
      json_builder_end_array (b);
    }
  json_builder_end_object (b);
  g_type_class_unref (klass);
}

static int
cmd_inspect (int argc, char **argv)
{
  LpRegistry *registry = lp_registry_get_default ();
  g_auto(GStrv) names = lp_registry_list_stages (registry);

  if (argc > 2)
    {
      print_error ("inspect takes at most one stage name");
      return EXIT_USAGE;
    }

  if (argc == 1)
    {
      if (opt_json)
        {
          g_autoptr(JsonBuilder) b = json_builder_new ();
          json_builder_begin_array (b);
          for (guint i = 0; names[i]; i++)
            build_stage_json (b, registry, names[i], TRUE);
          json_builder_end_array (b);
          print_json (b);
          return EXIT_OK;
        }
      for (guint i = 0; names[i]; i++)
        {
          LpStageClass *klass = g_type_class_ref (lp_registry_lookup (registry, names[i]));
          g_print ("%-20s %-10s %-11s %s\n", names[i], role_name (lp_stage_class_get_role (klass)),
                   lp_stage_class_get_category (klass), lp_stage_class_get_description (klass));
          g_type_class_unref (klass);
        }
      if (!opt_quiet)
        g_print ("\n%u stages. `lpipe inspect STAGE` describes one.\n", g_strv_length (names));
      return EXIT_OK;
    }

  {
    const char *name = argv[1];
    GType type = lp_registry_lookup (registry, name);
    LpStageClass *klass;
    LpPlugin *plugin;
    g_autofree GParamSpec **pspecs = NULL;
    guint n = 0;
    guint max_in;

    if (type == G_TYPE_INVALID)
      {
        g_autofree char *close = lp_suggest_closest (name, (const char * const *) names);
        if (close)
          print_error ("unknown stage '%s'; did you mean '%s'?", name, close);
        else
          print_error ("unknown stage '%s' (`lpipe inspect` lists the stages)", name);
        return EXIT_FAILED;
      }
    if (opt_json)
      {
        g_autoptr(JsonBuilder) b = json_builder_new ();
        build_stage_json (b, registry, name, TRUE);
        print_json (b);
        return EXIT_OK;
      }

    klass = g_type_class_ref (type);
    plugin = lp_registry_lookup_plugin (registry, name);
    max_in = lp_stage_class_get_max_inputs (klass);
    g_print ("%s: %s\n\n", name, lp_stage_class_get_description (klass));
    g_print ("  category   %s\n", lp_stage_class_get_category (klass));
    g_print ("  role       %s\n", role_name (lp_stage_class_get_role (klass)));
    if (max_in == G_MAXUINT)
      g_print ("  inputs     %u or more\n", lp_stage_class_get_min_inputs (klass));
    else
      g_print ("  inputs     %u to %u\n", lp_stage_class_get_min_inputs (klass), max_in);
    if (plugin)
      g_print ("  plugin     %s (%s)\n", lp_plugin_get_name (plugin), lp_plugin_get_filename (plugin));
    g_print ("\nProperties:\n");
    pspecs = stage_properties (type, &n);
    if (n == 0)
      g_print ("  (none)\n");
    for (guint i = 0; i < n; i++)
      {
        g_autofree char *t = lp_param_spec_describe_type (pspecs[i]);
        g_autofree char *d = lp_param_spec_default_to_string (pspecs[i]);
        gboolean required = lp_stage_class_is_property_required (klass, pspecs[i]->name);

        g_print ("  %-16s %s%s%s%s\n", pspecs[i]->name, t,
                 required ? ", required" : "",
                 !required && d ? ", default " : "", !required && d ? d : "");
        if (g_param_spec_get_blurb (pspecs[i]))
          g_print ("  %-16s %s\n", "", g_param_spec_get_blurb (pspecs[i]));
      }
    g_type_class_unref (klass);
    return EXIT_OK;
  }
}

/* --- info ------------------------------------------------------------- */

static int
cmd_info (int argc, char **argv)
{
  g_autoptr(LpCheckpoint) ckpt = NULL;
  g_autoptr(GError) error = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GPtrArray) others = NULL;
  g_auto(GStrv) keys = NULL;
  guint n;
  GHashTable *dtype_counts;

  if (argc != 2)
    {
      print_error ("info takes one safetensors file");
      return EXIT_USAGE;
    }
  ckpt = lp_safetensors_load (argv[1], &error);
  if (ckpt == NULL)
    {
      print_error ("%s", error->message);
      return EXIT_FAILED;
    }
  n = lp_checkpoint_get_n_tensors (ckpt);
  keys = lp_checkpoint_dup_metadata_keys (ckpt);
  modules = lp_lora_find_modules (ckpt, NULL, NULL, &others, NULL);

  if (opt_json)
    {
      g_autoptr(JsonBuilder) b = json_builder_new ();

      json_builder_begin_object (b);
      json_builder_set_member_name (b, "file");
      json_builder_add_string_value (b, argv[1]);
      json_builder_set_member_name (b, "n-bytes");
      json_builder_add_int_value (b, lp_checkpoint_get_n_bytes (ckpt));
      json_builder_set_member_name (b, "tensors");
      json_builder_begin_array (b);
      for (guint i = 0; i < n; i++)
        {
          LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
          guint nd;
          const guint64 *shape = lp_tensor_get_shape (t, &nd);

          json_builder_begin_object (b);
          json_builder_set_member_name (b, "name");
          json_builder_add_string_value (b, lp_tensor_get_name (t));
          json_builder_set_member_name (b, "dtype");
          json_builder_add_string_value (b, lp_dtype_to_string (lp_tensor_get_dtype (t)));
          json_builder_set_member_name (b, "shape");
          json_builder_begin_array (b);
          for (guint d = 0; d < nd; d++)
            json_builder_add_int_value (b, shape[d]);
          json_builder_end_array (b);
          json_builder_set_member_name (b, "n-bytes");
          json_builder_add_int_value (b, lp_tensor_get_n_bytes (t));
          json_builder_end_object (b);
        }
      json_builder_end_array (b);
      json_builder_set_member_name (b, "metadata");
      json_builder_begin_object (b);
      for (guint i = 0; keys[i]; i++)
        {
          json_builder_set_member_name (b, keys[i]);
          json_builder_add_string_value (b, lp_checkpoint_get_metadata (ckpt, keys[i]));
        }
      json_builder_end_object (b);
      json_builder_set_member_name (b, "lora-modules");
      json_builder_add_int_value (b, modules ? modules->len : 0);
      json_builder_end_object (b);
      print_json (b);
      return EXIT_OK;
    }

  {
    char total[32];
    format_bytes (total, sizeof total, lp_checkpoint_get_n_bytes (ckpt));
    g_print ("%s: %u tensors, %s\n", argv[1], n, total);
  }
  dtype_counts = g_hash_table_new (g_str_hash, g_str_equal);
  for (guint i = 0; i < n; i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      g_autofree char *shape = lp_tensor_describe_shape (t);
      const char *dt = lp_dtype_to_string (lp_tensor_get_dtype (t));
      char size[32];

      format_bytes (size, sizeof size, lp_tensor_get_n_bytes (t));
      if (!opt_quiet)
        g_print ("  %-60s %-8s %-16s %s\n", lp_tensor_get_name (t), dt, shape, size);
      g_hash_table_insert (dtype_counts, (gpointer) dt,
                           GUINT_TO_POINTER (GPOINTER_TO_UINT (g_hash_table_lookup (dtype_counts, dt)) + 1));
    }
  {
    GHashTableIter iter;
    gpointer k, v;
    g_print ("dtypes:");
    g_hash_table_iter_init (&iter, dtype_counts);
    while (g_hash_table_iter_next (&iter, &k, &v))
      g_print (" %s x%u", (char *) k, GPOINTER_TO_UINT (v));
    g_print ("\n");
  }
  g_hash_table_unref (dtype_counts);
  if (modules && modules->len > 0)
    {
      guint min_r = G_MAXUINT, max_r = 0;
      for (guint i = 0; i < modules->len; i++)
        {
          guint r = lp_lora_module_get_rank (g_ptr_array_index (modules, i));
          min_r = MIN (min_r, r);
          max_r = MAX (max_r, r);
        }
      if (min_r == max_r)
        g_print ("LoRA: %u modules of rank %u, %u other tensors\n", modules->len, min_r, others ? others->len : 0);
      else
        g_print ("LoRA: %u modules of rank %u to %u, %u other tensors\n", modules->len, min_r, max_r,
                 others ? others->len : 0);
    }
  if (lp_checkpoint_get_adapter_config (ckpt))
    g_print ("PEFT adapter config: present\n");
  if (keys[0])
    {
      g_print ("metadata:\n");
      for (guint i = 0; keys[i]; i++)
        {
          const char *value = lp_checkpoint_get_metadata (ckpt, keys[i]);
          if (strlen (value) > 200)
            g_print ("  %s: %.200s... (%zu bytes)\n", keys[i], value, strlen (value));
          else
            g_print ("  %s: %s\n", keys[i], value);
        }
    }
  return EXIT_OK;
}

/* --- main ------------------------------------------------------------- */

int
main (int argc, char **argv)
{
  g_autoptr(GOptionContext) context = NULL;
  g_autoptr(GError) error = NULL;
  gboolean opt_version = FALSE;
  gboolean opt_help = FALSE;
  const char *command;
  GOptionEntry entries[] = {
    { "quiet", 'q', 0, G_OPTION_ARG_NONE, &opt_quiet, "Print nothing but errors", NULL },
    { "threads", 'j', 0, G_OPTION_ARG_INT, &opt_threads, "Compute N tensors at once (default: all cores)", "N" },
    { "json", 0, 0, G_OPTION_ARG_NONE, &opt_json, "Machine-readable output", NULL },
    { "version", 0, 0, G_OPTION_ARG_NONE, &opt_version, "Print the version", NULL },
    { "help", 'h', 0, G_OPTION_ARG_NONE, &opt_help, "Show help", NULL },
    { NULL }
  };

  setlocale (LC_ALL, "");
  /* A full disk under `ulimit -f` must be an error we can report and clean
   * up after, not a signal that kills us with a half-written temp file. */
  signal (SIGXFSZ, SIG_IGN);
  /* lpipe computes tensors in parallel itself. A BLAS library that a plugin
   * links starts its own threads when it is loaded, and OpenBLAS's spin on
   * sched_yield for a while: on 2 cores that takes one away from the work.
   * Only a process can set this, before its plugins are loaded; a user's
   * own setting wins. */
  g_setenv ("OPENBLAS_NUM_THREADS", "1", FALSE);
  /* Tensors are read into buffers of up to 16 MiB that come and go by the
   * hundred. glibc would map each big one afresh, or trim the heap under
   * them, and every page is then faulted in again (costly on virtual
   * machines); keep up to the pull budget (64 MiB) of freed memory instead. */
  mallopt (M_MMAP_THRESHOLD, 32 << 20);
  mallopt (M_TRIM_THRESHOLD, 64 << 20);

  context = g_option_context_new (NULL);
  g_option_context_set_help_enabled (context, FALSE);
  g_option_context_add_main_entries (context, entries, NULL);
  /* Stage properties and parameters are NAME=VALUE words; options may stand
   * anywhere, but "--" ends them. */
  if (!g_option_context_parse (context, &argc, &argv, &error))
    {
      print_error ("%s (see lpipe --help)", error->message);
      return EXIT_USAGE;
    }
  if (opt_version)
    {
      g_print ("lpipe %s\n", LPIPE_VERSION);
      return EXIT_OK;
    }
  if (opt_help || argc < 2)
    {
      fputs (usage_text, opt_help ? stdout : stderr);
      return opt_help ? EXIT_OK : EXIT_USAGE;
    }
  if (opt_threads == 0 || opt_threads < -1 || opt_threads > LP_PIPELINE_MAX_THREADS)
    {
      print_error ("--threads must be from 1 to %d, not %d", LP_PIPELINE_MAX_THREADS, opt_threads);
      return EXIT_USAGE;
    }

  command = argv[1];
  if (g_str_equal (command, "run"))
    return cmd_run (argc - 1, argv + 1, FALSE);
  if (g_str_equal (command, "validate"))
    return cmd_run (argc - 1, argv + 1, TRUE);
  if (g_str_equal (command, "launch"))
    return cmd_launch (argc - 1, argv + 1);
  if (g_str_equal (command, "inspect"))
    return cmd_inspect (argc - 1, argv + 1);
  if (g_str_equal (command, "info"))
    return cmd_info (argc - 1, argv + 1);

  {
    const char *commands[] = { "run", "validate", "launch", "inspect", "info", NULL };
    g_autofree char *close = lp_suggest_closest (command, commands);
    if (close)
      print_error ("unknown command '%s'; did you mean '%s'?", command, close);
    else
      print_error ("unknown command '%s' (see lpipe --help)", command);
  }
  return EXIT_USAGE;
}
