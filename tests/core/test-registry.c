/* test-registry.c: plugin loading, broken plugins, stage lookup
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <glib/gstdio.h>

#include "lp-test-util.h"

#include <unistd.h>
#include <glib/gstdio.h>

static char *
plugin_path (const char *name)
{
  return g_build_filename (g_getenv ("LPIPE_TEST_PLUGIN_DIR"), name, NULL);
}

static void
test_load_good (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *path = plugin_path ("liblptest-good.so");
  g_auto(GStrv) names = NULL;
  LpPlugin *plugin;

  plugin = lp_registry_load_plugin (registry, path, &error);
  g_assert_no_error (error);
  g_assert_nonnull (plugin);
  g_assert_cmpstr (lp_plugin_get_name (plugin), ==, "test-good");
  g_assert_cmpstr (lp_plugin_get_filename (plugin), ==, path);
  g_assert_cmpstr (lp_plugin_get_version (plugin), ==, LPIPE_VERSION);

  names = lp_registry_list_stages (registry);
  g_assert_cmpuint (g_strv_length (names), ==, 4);
  g_assert_cmpstr (names[0], ==, "test-add");   /* sorted */
  g_assert_cmpstr (names[3], ==, "test-source");
  g_assert_true (lp_registry_lookup (registry, "test-source") != G_TYPE_INVALID);
  g_assert_true (lp_registry_lookup_plugin (registry, "test-add") == plugin);
}

static void
test_load_missing (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;

  g_assert_null (lp_registry_load_plugin (registry, "/nonexistent/libnothing.so", &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_LOAD);
  g_assert_nonnull (strstr (error->message, "/nonexistent/libnothing.so"));
}

static void
test_load_garbage (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *dir = lp_test_make_tmpdir ();
  g_autofree char *path = g_build_filename (dir, "libgarbage.so", NULL);

  g_assert_true (g_file_set_contents (path, "this is not an ELF file\n", -1, NULL));
  g_assert_null (lp_registry_load_plugin (registry, path, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_LOAD);
}

static void
test_load_no_entry (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *path = plugin_path ("liblptest-no-entry.so");

  g_assert_null (lp_registry_load_plugin (registry, path, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_NO_ENTRY);
  g_assert_nonnull (strstr (error->message, "LP_PLUGIN_DEFINE"));
}

static void
test_load_wrong_abi (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *path = plugin_path ("liblptest-wrong-abi.so");

  g_assert_null (lp_registry_load_plugin (registry, path, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_ABI);
  g_assert_nonnull (strstr (error->message, "ABI"));
  { g_autoptr(GPtrArray) plugins = lp_registry_list_plugins (registry); g_assert_cmpuint (plugins->len, ==, 0); }
}

static void
test_load_duplicate (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *good = plugin_path ("liblptest-good.so");
  g_autofree char *dup = plugin_path ("liblptest-impostor.so");
  GType collect;

  g_assert_nonnull (lp_registry_load_plugin (registry, good, &error));
  g_assert_no_error (error);
  collect = lp_registry_lookup (registry, "test-collect");

  g_assert_null (lp_registry_load_plugin (registry, dup, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE);
  g_assert_nonnull (strstr (error->message, "test-collect"));
  /* The first registration stands. */
  g_assert_true (lp_registry_lookup (registry, "test-collect") == collect);
  g_clear_error (&error);

  /* The same plugin twice is refused too, not registered again. */
  g_assert_null (lp_registry_load_plugin (registry, good, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE);
}

/* Scanning a folder of good and broken plugins: each broken one is one
 * warning line, and the good one loads. Run in a subprocess to see stderr. */
static void
test_scan_broken (void)
{
  if (g_test_subprocess ())
    {
      g_autoptr(LpRegistry) registry = lp_registry_new ();
      g_autofree char *dir = lp_test_make_tmpdir ();
      g_autofree char *garbage = g_build_filename (dir, "libgarbage.so", NULL);
      guint loaded;

      /* The warnings are the point here, not failures. */
      g_log_set_always_fatal (G_LOG_FATAL_MASK);
      g_assert_true (g_file_set_contents (garbage, "\x7f" "ELF but not really", -1, NULL));
      loaded = lp_registry_scan_directory (registry, g_getenv ("LPIPE_TEST_PLUGIN_DIR"));
      loaded += lp_registry_scan_directory (registry, dir);
      g_assert_cmpuint (loaded, ==, 1);
      g_assert_true (lp_registry_lookup (registry, "test-source") != G_TYPE_INVALID);
      return;
    }
  g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_passed ();
  g_test_trap_assert_stderr ("*skipping plugin*liblptest-impostor.so*test-collect*");
  g_test_trap_assert_stderr ("*skipping plugin*liblptest-no-entry.so*not an lpipe plugin*");
  g_test_trap_assert_stderr ("*skipping plugin*liblptest-wrong-abi.so*ABI*");
  g_test_trap_assert_stderr ("*skipping plugin*libgarbage.so*cannot load*");
}

static void
copy_plugin (const char *name,
             const char *to)
{
  g_autofree char *from = plugin_path (name);
  g_autofree char *data = NULL;
  gsize len;

  g_assert_true (g_file_get_contents (from, &data, &len, NULL));
  g_assert_true (g_file_set_contents (to, data, len, NULL));
}

/* What a scan loads: the folder's plugins and one level of per-plugin
 * folders (the build tree's layout), nothing deeper; never a folder or a
 * file that anyone may write to or that another user owns, since loading
 * runs the module's constructors before anything is checked. Each refusal
 * is one warning naming the path. Subprocesses, to see stderr. */
static void
test_scan_trust (void)
{
  static const char *cases[] = { "flat", "one-level", "too-deep", "world-writable-folder",
                                 "world-writable-file", "other-owner", "other-owner-folder" };

  if (g_test_subprocess ())
    {
      const char *what = g_getenv ("LP_TEST_SCAN_CASE");
      g_autoptr(LpRegistry) registry = lp_registry_new ();
      g_autofree char *dir = lp_test_make_tmpdir ();
      g_autofree char *sub = g_build_filename (dir, "good", NULL);
      g_autofree char *deep = g_build_filename (dir, "a", "good", NULL);
      g_autofree char *target = NULL;
      guint expected = 1;

      g_log_set_always_fatal (G_LOG_FATAL_MASK);
      if (g_str_equal (what, "flat") || g_str_has_prefix (what, "world-writable-f") ||
          g_str_equal (what, "other-owner"))
        target = g_build_filename (dir, "liblptest-good.so", NULL);
      else if (g_str_equal (what, "too-deep"))
        {
          g_assert_cmpint (g_mkdir_with_parents (deep, 0755), ==, 0);
          target = g_build_filename (deep, "liblptest-good.so", NULL);
          expected = 0;
        }
      else
        {
          g_assert_cmpint (g_mkdir (sub, 0755), ==, 0);
          target = g_build_filename (sub, "liblptest-good.so", NULL);
        }
      copy_plugin ("liblptest-good.so", target);
      g_assert_cmpint (g_chmod (target, 0755), ==, 0);

      if (g_str_equal (what, "world-writable-folder"))
        { g_assert_cmpint (g_chmod (dir, 0777), ==, 0); expected = 0; }
      else if (g_str_equal (what, "world-writable-file"))
        { g_assert_cmpint (g_chmod (target, 0757), ==, 0); expected = 0; }
      else if (g_str_equal (what, "other-owner"))
        { g_assert_cmpint (chown (target, 4242, 4242), ==, 0); expected = 0; }
      else if (g_str_equal (what, "other-owner-folder"))
        { g_assert_cmpint (chown (sub, 4242, 4242), ==, 0); expected = 0; }

      g_assert_cmpuint (lp_registry_scan_directory (registry, dir), ==, expected);
      g_assert_true ((lp_registry_lookup (registry, "test-source") != G_TYPE_INVALID) == expected);
      return;
    }

  if (getuid () != 0)
    {
      g_test_skip ("chown to another user needs root");
      return;
    }
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      g_test_message ("case %s", cases[i]);
      g_setenv ("LP_TEST_SCAN_CASE", cases[i], TRUE);
      g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
      g_test_trap_assert_passed ();
      if (g_str_equal (cases[i], "world-writable-folder"))
        g_test_trap_assert_stderr ("*skipping plugin folder /*: anyone may write to it*");
      else if (g_str_equal (cases[i], "world-writable-file"))
        g_test_trap_assert_stderr ("*skipping plugin /*/liblptest-good.so: anyone may write to it*");
      else if (g_str_equal (cases[i], "other-owner"))
        g_test_trap_assert_stderr ("*skipping plugin /*/liblptest-good.so: it belongs to another user*");
      else if (g_str_equal (cases[i], "other-owner-folder"))
        g_test_trap_assert_stderr ("*skipping plugin folder /*/good: it belongs to another user*");
      else
        g_test_trap_assert_stderr_unmatched ("*skipping*");
    }
}

static void
test_create_unknown (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autofree char *good = plugin_path ("liblptest-good.so");

  g_assert_nonnull (lp_registry_load_plugin (registry, good, NULL));
  g_assert_null (lp_registry_create_stage (registry, "test-sauce", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_STAGE);
  g_assert_nonnull (strstr (error->message, "did you mean 'test-source'?"));
  g_clear_error (&error);

  g_assert_null (lp_registry_create_stage (registry, "zzzzzzzzzz", &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_STAGE);
  g_assert_null (strstr (error->message, "did you mean"));
}

static void
test_suggest (void)
{
  const char *names[] = { "lora-svd", "lora-project", "rank-check", "safetensors-sink", NULL };
  g_autofree char *a = lp_suggest_closest ("lora-svg", names);
  g_autofree char *b = lp_suggest_closest ("LORA-SVD", names);
  g_autofree char *c = lp_suggest_closest ("quantize", names);
  g_autofree char *d = lp_suggest_closest ("rank", names);

  g_assert_cmpstr (a, ==, "lora-svd");
  g_assert_cmpstr (b, ==, "lora-svd");
  g_assert_null (c);
  g_assert_cmpstr (d, ==, "rank-check");
}

/* What a language binding does: a type it made, named at registration. */
typedef struct { LpSink parent_instance; } TestBound;
typedef struct { LpSinkClass parent_class; } TestBoundClass;
static GType test_bound_get_type (void);
G_DEFINE_TYPE (TestBound, test_bound, LP_TYPE_SINK)
static void test_bound_class_init (TestBoundClass *klass) { }
static void test_bound_init (TestBound *self) { }

static void
test_register_full (void)
{
  g_autoptr(LpRegistry) registry = lp_registry_new ();
  g_autoptr(GError) error = NULL;
  g_autoptr(LpStage) stage = NULL;

  g_assert_true (lp_registry_register_stage_full (registry, test_bound_get_type (), "bound-sink",
                                                  "Test", "Registered like a binding does", &error));
  g_assert_no_error (error);
  stage = lp_registry_create_stage (registry, "bound-sink", &error);
  g_assert_no_error (error);
  g_assert_cmpstr (lp_stage_get_stage_name (stage), ==, "bound-sink");
  g_assert_cmpint (lp_stage_class_get_role (LP_STAGE_GET_CLASS (stage)), ==, LP_STAGE_ROLE_SINK);

  g_assert_false (lp_registry_register_stage_full (registry, test_bound_get_type (), "bound-sink",
                                                   NULL, NULL, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE);
  g_clear_error (&error);
  g_assert_false (lp_registry_register_stage_full (registry, LP_TYPE_SINK, "abstract", NULL, NULL, &error));
  g_assert_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_REGISTER);
}

/* The test environment points the default registry at the build tree's
 * plugins only. */
static void
test_default_path (void)
{
  LpRegistry *registry = lp_registry_get_default ();
  g_autoptr(GPtrArray) plugins = lp_registry_list_plugins (registry);

  g_assert_cmpuint (plugins->len, >=, 1);
  for (guint i = 0; i < plugins->len; i++)
    g_assert_true (g_str_has_prefix (lp_plugin_get_filename (g_ptr_array_index (plugins, i)),
                                     g_getenv ("LPIPE_PLUGIN_PATH")));
  g_assert_true (lp_registry_lookup (registry, "safetensors-source") != G_TYPE_INVALID);
  g_assert_true (lp_registry_lookup (registry, "test-source") == G_TYPE_INVALID);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/registry/load/good", test_load_good);
  g_test_add_func ("/registry/load/missing-file", test_load_missing);
  g_test_add_func ("/registry/load/not-elf", test_load_garbage);
  g_test_add_func ("/registry/load/no-entry-point", test_load_no_entry);
  g_test_add_func ("/registry/load/wrong-abi", test_load_wrong_abi);
  g_test_add_func ("/registry/load/duplicate-name", test_load_duplicate);
  g_test_add_func ("/registry/scan/broken-plugins-warn-once", test_scan_broken);
  g_test_add_func ("/registry/scan/trust", test_scan_trust);
  g_test_add_func ("/registry/create/unknown-stage", test_create_unknown);
  g_test_add_func ("/registry/suggest", test_suggest);
  g_test_add_func ("/registry/register-full", test_register_full);
  g_test_add_func ("/registry/default-path", test_default_path);

  return g_test_run ();
}
