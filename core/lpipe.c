/* lpipe.c: the command line: the commands, their help, and the ones that
 * run pipelines as they are written (run, validate, launch, inspect);
 * reduce and info have files of their own
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

#include "lpipe-cli.h"

/* --- finding a pipeline by name ------------------------------------------ */

/* The folders a pipeline name is looked up in: $LPIPE_PIPELINE_PATH, then
 * the installed ready pipelines. */
static GPtrArray *
pipeline_dirs (void)
{
  GPtrArray *dirs = g_ptr_array_new_with_free_func (g_free);
  const char *env = g_getenv ("LPIPE_PIPELINE_PATH");

  if (env != NULL)
    {
      g_auto(GStrv) parts = g_strsplit (env, G_SEARCHPATH_SEPARATOR_S, -1);
      for (guint i = 0; parts[i]; i++)
        if (*parts[i])
          g_ptr_array_add (dirs, g_strdup (parts[i]));
    }
  g_ptr_array_add (dirs, g_strdup (LPIPE_PIPELINE_DIR));
  return dirs;
}

/* The names of the ready pipelines, sorted, without ".pipeline". */
static GStrv
list_pipelines (void)
{
  g_autoptr(GPtrArray) dirs = pipeline_dirs ();
  g_autoptr(GHashTable) seen = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  GPtrArray *names = g_ptr_array_new ();

  for (guint i = 0; i < dirs->len; i++)
    {
      g_autoptr(GDir) dir = g_dir_open (g_ptr_array_index (dirs, i), 0, NULL);
      const char *entry;

      while (dir && (entry = g_dir_read_name (dir)))
        if (g_str_has_suffix (entry, ".pipeline"))
          {
            char *name = g_strndup (entry, strlen (entry) - strlen (".pipeline"));
            if (g_hash_table_add (seen, name))
              g_ptr_array_add (names, name);
          }
    }
  lp_cli_sort_strings (names);
  g_ptr_array_add (names, NULL);
  {
    GStrv out = g_strdupv ((char **) names->pdata);
    g_ptr_array_unref (names);
    return out;
  }
}

/* A path (it has a '/', or names a file here) is used as it is; a bare name
 * is looked up as NAME.pipeline (or NAME) in pipeline_dirs(). */
static char *
find_pipeline (const char  *name,
               GError     **error)
{
  g_autoptr(GPtrArray) dirs = NULL;
  g_auto(GStrv) known = NULL;
  g_autofree char *close = NULL;
  g_autofree char *shown = NULL;

  if (strchr (name, G_DIR_SEPARATOR) != NULL || g_file_test (name, G_FILE_TEST_EXISTS))
    return g_strdup (name);

  dirs = pipeline_dirs ();
  for (guint i = 0; i < dirs->len; i++)
    {
      g_autofree char *file = g_strconcat (name, g_str_has_suffix (name, ".pipeline") ? "" : ".pipeline", NULL);
      g_autofree char *path = g_build_filename (g_ptr_array_index (dirs, i), file, NULL);
      if (g_file_test (path, G_FILE_TEST_IS_REGULAR))
        return g_steal_pointer (&path);
    }

  known = list_pipelines ();
  close = lp_suggest_closest (name, (const char * const *) known);
  shown = lp_cli_escape (name, FALSE);
  if (close)
    g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                 "no pipeline file or ready pipeline '%s'; did you mean '%s'?", shown, close);
  else
    {
      g_autofree char *list = g_strjoinv (", ", known);
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                   "no pipeline file or ready pipeline '%s' (the ready ones: %s)", shown,
                   *list ? list : "none installed");
    }
  return NULL;
}

/* --- run, validate, launch ----------------------------------------------- */

static int
run_or_validate (int argc, char **argv, gboolean validate_only)
{
  g_autoptr(LpPipeline) pipeline = NULL;
  g_autoptr(GError) error = NULL;
  g_autofree char *path = NULL;

  if (argc < 2)
    {
      g_auto(GStrv) known = list_pipelines ();
      g_autofree char *list = g_strjoinv (", ", known);
      lp_cli_error ("%s needs a pipeline file or the name of a ready one (%s); see lpipe %s --help",
                    argv[0], *list ? list : "none installed", argv[0]);
      return EXIT_USAGE;
    }
  for (int i = 2; i < argc; i++)
    if (strchr (argv[i], '=') == NULL)
      {
        lp_cli_error ("'%s' is not a parameter; write NAME=VALUE", argv[i]);
        return EXIT_USAGE;
      }

  path = find_pipeline (argv[1], &error);
  pipeline = lp_pipeline_new (NULL);
  if (path == NULL ||
      !lp_pipeline_load_from_file (pipeline, path, (const char * const *) argv + 2, &error) ||
      !lp_pipeline_validate (pipeline, &error))
    {
      lp_cli_error ("%s", error->message);
      return EXIT_FAILED;
    }
  if (validate_only)
    {
      if (!lp_cli.quiet)
        g_print ("%s: valid, %u stages\n", path, lp_pipeline_get_n_stages (pipeline));
      return EXIT_OK;
    }
  return lp_cli_run_pipeline (pipeline);
}

static int
cmd_run (int argc, char **argv)
{
  return run_or_validate (argc, argv, FALSE);
}

static int
cmd_validate (int argc, char **argv)
{
  return run_or_validate (argc, argv, TRUE);
}

static int
cmd_launch (int argc, char **argv)
{
  g_autoptr(LpPipeline) pipeline = NULL;
  g_autoptr(GError) error = NULL;

  if (argc < 2)
    {
      lp_cli_error ("launch needs stages: lpipe launch STAGE [PROP=VALUE ...] ! STAGE ...");
      return EXIT_USAGE;
    }
  pipeline = lp_pipeline_new (NULL);
  if (!lp_pipeline_parse_launch (pipeline, (const char * const *) argv + 1, &error) ||
      !lp_pipeline_validate (pipeline, &error))
    {
      lp_cli_error ("%s", error->message);
      return EXIT_FAILED;
    }
  return lp_cli_run_pipeline (pipeline);
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
      lp_cli_error ("inspect takes at most one stage name (see lpipe inspect --help)");
      return EXIT_USAGE;
    }

  if (argc == 1)
    {
      if (lp_cli.json)
        {
          g_autoptr(JsonBuilder) b = json_builder_new ();
          json_builder_begin_array (b);
          for (guint i = 0; names[i]; i++)
            build_stage_json (b, registry, names[i], TRUE);
          json_builder_end_array (b);
          lp_cli_print_json (b);
          return EXIT_OK;
        }
      for (guint i = 0; names[i]; i++)
        {
          LpStageClass *klass = g_type_class_ref (lp_registry_lookup (registry, names[i]));
          g_print ("%-20s %-10s %-11s %s\n", names[i], role_name (lp_stage_class_get_role (klass)),
                   lp_stage_class_get_category (klass), lp_stage_class_get_description (klass));
          g_type_class_unref (klass);
        }
      if (!lp_cli.quiet)
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
          lp_cli_error ("unknown stage '%s'; did you mean '%s'?", name, close);
        else
          lp_cli_error ("unknown stage '%s' (`lpipe inspect` lists the stages)", name);
        return EXIT_FAILED;
      }
    if (lp_cli.json)
      {
        g_autoptr(JsonBuilder) b = json_builder_new ();
        build_stage_json (b, registry, name, TRUE);
        lp_cli_print_json (b);
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

/* --- the commands and their help ------------------------------------------ */

static const LpCliCommand run_command = {
  "run", "FILE.pipeline|NAME [NAME=VALUE ...]", "run a pipeline file, or a ready pipeline by name",
  "Runs a pipeline file. A NAME without a '/' is a ready pipeline, looked up as\n"
  "NAME.pipeline in $LPIPE_PIPELINE_PATH, then in the installed ones\n"
  "(" LPIPE_PIPELINE_DIR ").\n"
  "Each NAME=VALUE sets one of the file's params.\n"
  "\n"
  "Examples:\n"
  "  lpipe run demo\n"
  "  lpipe run reduce-svd input=lora.safetensors output=lora-r8.safetensors rank=8\n",
  NULL, cmd_run,
};

static const LpCliCommand validate_command = {
  "validate", "FILE.pipeline|NAME [NAME=VALUE ...]", "check a pipeline without running it",
  "Loads and checks a pipeline file (stage names, properties, values, inputs)\n"
  "without running it. NAME is looked up as for `lpipe run`.\n"
  "\n"
  "Example:\n"
  "  lpipe validate reduce-svd rank=8\n",
  NULL, cmd_validate,
};

static const LpCliCommand launch_command = {
  "launch", "STAGE [PROP=VALUE ...] ! STAGE ...", "run an inline chain of stages",
  "Runs an inline chain: a stage name, its properties as key=value words, and\n"
  "'!' between stages; each stage takes the one before it as its input.\n"
  "`lpipe inspect STAGE` lists a stage's properties.\n"
  "\n"
  "Example:\n"
  "  lpipe launch safetensors-source location=lora.safetensors ! lora-svd rank=4 \\\n"
  "      ! safetensors-sink location=lora-r4.safetensors\n",
  NULL, cmd_launch,
};

static const LpCliCommand inspect_command = {
  "inspect", "[STAGE] [--json]", "list the stages, or describe one",
  "With no stage, lists every stage with its role, category and description.\n"
  "With a stage, describes its inputs, plugin and every property.\n"
  "\n"
  "Examples:\n"
  "  lpipe inspect\n"
  "  lpipe inspect lora-svd --json\n",
  NULL, cmd_inspect,
};

static const LpCliCommand *const commands[] = {
  &lp_cli_reduce_command,
  &run_command,
  &validate_command,
  &launch_command,
  &inspect_command,
  &lp_cli_info_command,
  NULL,
};

static const char global_options_text[] =
  "Options:\n"
  "  -h, --help       show help (after a command: that command's usage)\n"
  "  --version        print the version\n"
  "  -q, --quiet      print nothing but errors\n"
  "  -v, --verbose    print per-module tables too\n"
  "  -j, --threads N  compute N tensors (or files) at once (default: all cores)\n"
  "  --json           machine-readable output (inspect, info)\n";

static void
print_usage (FILE *out)
{
  fputs ("Usage:\n", out);
  for (guint i = 0; commands[i]; i++)
    {
      g_autofree char *head = g_strdup_printf ("lpipe %s %s", commands[i]->name, commands[i]->synopsis);
      if (strlen (head) <= 44)
        fprintf (out, "  %-44s %s\n", head, commands[i]->summary);
      else
        fprintf (out, "  %s\n  %-44s %s\n", head, "", commands[i]->summary);
    }
  fprintf (out, "\n%s\n", global_options_text);
  fputs ("`lpipe COMMAND --help` shows a command's usage and an example.\n"
         "Plugins are found in $LPIPE_PLUGIN_PATH, then in the installed plugin directory.\n", out);
}

static void
print_command_usage (const LpCliCommand *command)
{
  g_print ("Usage: lpipe %s %s\n\n%s", command->name, command->synopsis, command->usage);
  if (command->options)
    {
      g_print ("\nOptions of %s:\n", command->name);
      for (const GOptionEntry *e = command->options; e->long_name; e++)
        {
          g_autofree char *head = NULL;
          if (e->flags & G_OPTION_FLAG_HIDDEN)
            continue;
          head = g_strdup_printf ("%s%c%s--%s%s%s", e->short_name ? "-" : "", e->short_name ? e->short_name : ' ',
                                  e->short_name ? ", " : "", e->long_name, e->arg_description ? " " : "",
                                  e->arg_description ? e->arg_description : "");
          g_print ("  %-24s %s\n", e->short_name ? head : head + 1, e->description);
        }
    }
  g_print ("\n%s", global_options_text);
}

static const LpCliCommand *
find_command (const char *name)
{
  for (guint i = 0; commands[i]; i++)
    if (g_str_equal (commands[i]->name, name))
      return commands[i];
  return NULL;
}

/* The command word: the first argument that is neither an option nor the
 * value of -j. */
static int
command_index (int argc, char **argv)
{
  for (int i = 1; i < argc; i++)
    {
      if (g_str_equal (argv[i], "--"))
        return i + 1 < argc ? i + 1 : -1;
      if (g_str_equal (argv[i], "-j") || g_str_equal (argv[i], "--threads"))
        i++;
      else if (argv[i][0] != '-')
        return i;
    }
  return -1;
}

int
main (int argc, char **argv)
{
  g_autoptr(GOptionContext) context = NULL;
  g_autoptr(GError) error = NULL;
  gboolean opt_version = FALSE;
  gboolean opt_help = FALSE;
  const LpCliCommand *command = NULL;
  int index;
  GOptionEntry entries[] = {
    { "quiet", 'q', 0, G_OPTION_ARG_NONE, &lp_cli.quiet, "Print nothing but errors", NULL },
    { "verbose", 'v', 0, G_OPTION_ARG_NONE, &lp_cli.verbose, "Print per-module tables too", NULL },
    { "threads", 'j', 0, G_OPTION_ARG_INT, &lp_cli.threads, "Compute N tensors at once (default: all cores)", "N" },
    { "json", 0, 0, G_OPTION_ARG_NONE, &lp_cli.json, "Machine-readable output", NULL },
    { "version", 0, 0, G_OPTION_ARG_NONE, &opt_version, "Print the version", NULL },
    { "help", 'h', 0, G_OPTION_ARG_NONE, &opt_help, "Show help", NULL },
    { NULL }
  };

  setlocale (LC_ALL, "");
  lp_cli_install_log_writer ();
  /* A full disk under `ulimit -f` must be an error we can report and clean
   * up after, not a signal that kills us with a half-written temp file. */
  signal (SIGXFSZ, SIG_IGN);
  /* Nor may a closed pipe kill a run half way (`lpipe reduce -v ... | head`):
   * writes to it fail with EPIPE instead. Where the pipe is the output
   * (safetensors-sink location=/dev/stdout), that ends the run in an error,
   * as SIGTERM would; a closed standard output or error only loses text. */
  signal (SIGPIPE, SIG_IGN);
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

  index = command_index (argc, argv);
  if (index > 0)
    command = find_command (argv[index]);

  context = g_option_context_new (NULL);
  g_option_context_set_help_enabled (context, FALSE);
  g_option_context_add_main_entries (context, entries, NULL);
  if (command && command->options)
    g_option_context_add_main_entries (context, command->options, NULL);
  /* Stage properties and parameters are NAME=VALUE words; options may stand
   * anywhere, but "--" ends them. */
  if (!g_option_context_parse (context, &argc, &argv, &error))
    {
      if (command)
        lp_cli_error ("%s (see lpipe %s --help)", error->message, command->name);
      else
        lp_cli_error ("%s (see lpipe --help)", error->message);
      return EXIT_USAGE;
    }
  if (opt_version)
    {
      g_print ("lpipe %s\n", LPIPE_VERSION);
      return EXIT_OK;
    }
  if (opt_help && command)
    {
      print_command_usage (command);
      return EXIT_OK;
    }
  if (opt_help || argc < 2)
    {
      print_usage (opt_help ? stdout : stderr);
      return opt_help ? EXIT_OK : EXIT_USAGE;
    }
  if (lp_cli.threads == 0 || lp_cli.threads < -1 || lp_cli.threads > LP_PIPELINE_MAX_THREADS)
    {
      lp_cli_error ("--threads must be from 1 to %d, not %d", LP_PIPELINE_MAX_THREADS, lp_cli.threads);
      return EXIT_USAGE;
    }
  if (lp_cli.quiet)
    lp_cli.verbose = FALSE;

  if (command == NULL)
    {
      const char *names[G_N_ELEMENTS (commands)];
      g_autofree char *close = NULL;
      g_autofree char *shown = lp_cli_escape (argv[1], FALSE);

      for (guint i = 0; i < G_N_ELEMENTS (commands); i++)
        names[i] = commands[i] ? commands[i]->name : NULL;
      close = lp_suggest_closest (argv[1], names);
      if (close)
        lp_cli_error ("unknown command '%s'; did you mean '%s'?", shown, close);
      else
        lp_cli_error ("unknown command '%s' (see lpipe --help)", shown);
      return EXIT_USAGE;
    }
  return command->run (argc - 1, argv + 1);
}
