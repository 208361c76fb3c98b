/* lp-registry.c: stage types by name, and the plugins that provide them
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib/gstdio.h>

#include "lp-private.h"
#include "lpipe/lpipe-plugin.h"

/**
 * LpPlugin:
 *
 * A loaded plugin: one shared object that registered stage types.
 */
struct _LpPlugin
{
  GObject parent_instance;

  char *name;
  char *description;
  char *version;
  char *filename;
  LpRegistry *registry;   /* weak; set only while the plugin registers */
  GArray *pending;        /* GType registered during registration */
};

G_DEFINE_FINAL_TYPE (LpPlugin, lp_plugin, G_TYPE_OBJECT)

/**
 * LpRegistry:
 *
 * Knows every stage type by its name. The default registry loads the plugins
 * in `LPIPE_PLUGIN_PATH` (colon separated folders, each with its plugins
 * and folders of one plugin each; nothing deeper), then those
 * in the installed plugin directory (or `LPIPE_PLUGIN_SYSTEM_PATH` when set;
 * empty means none). A plugin that fails to load is reported in one warning
 * line and skipped.
 */
struct _LpRegistry
{
  GObject parent_instance;

  GHashTable *stages;     /* stage name -> StageEntry */
  GPtrArray *plugins;     /* LpPlugin */
  GMutex lock;
};

typedef struct {
  GType type;
  LpPlugin *plugin;       /* borrowed from plugins; NULL for stages registered in code */
} StageEntry;

G_DEFINE_FINAL_TYPE (LpRegistry, lp_registry, G_TYPE_OBJECT)

static void
lp_plugin_finalize (GObject *object)
{
  LpPlugin *self = LP_PLUGIN (object);

  g_free (self->name);
  g_free (self->description);
  g_free (self->version);
  g_free (self->filename);
  g_clear_pointer (&self->pending, g_array_unref);

  G_OBJECT_CLASS (lp_plugin_parent_class)->finalize (object);
}

static void
lp_plugin_class_init (LpPluginClass *klass)
{
  G_OBJECT_CLASS (klass)->finalize = lp_plugin_finalize;
}

static void
lp_plugin_init (LpPlugin *self)
{
}

/**
 * lp_plugin_get_name:
 * @self: a plugin
 *
 * Returns: the plugin's name
 */
const char *
lp_plugin_get_name (LpPlugin *self)
{
  g_return_val_if_fail (LP_IS_PLUGIN (self), NULL);
  return self->name;
}

/**
 * lp_plugin_get_description:
 * @self: a plugin
 *
 * Returns: what the plugin's stages are for
 */
const char *
lp_plugin_get_description (LpPlugin *self)
{
  g_return_val_if_fail (LP_IS_PLUGIN (self), NULL);
  return self->description;
}

/**
 * lp_plugin_get_version:
 * @self: a plugin
 *
 * Returns: the plugin's version
 */
const char *
lp_plugin_get_version (LpPlugin *self)
{
  g_return_val_if_fail (LP_IS_PLUGIN (self), NULL);
  return self->version;
}

/**
 * lp_plugin_get_filename:
 * @self: a plugin
 *
 * Returns: (type filename): the shared object the plugin came from
 */
const char *
lp_plugin_get_filename (LpPlugin *self)
{
  g_return_val_if_fail (LP_IS_PLUGIN (self), NULL);
  return self->filename;
}

static gboolean
check_stage_type (LpRegistry  *registry,
                  GType        type,
                  GError     **error)
{
  LpStageClass *klass;
  const char *name;

  if (!g_type_is_a (type, LP_TYPE_STAGE) || G_TYPE_IS_ABSTRACT (type))
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_REGISTER,
                   "%s is not a concrete LpStage type", g_type_name (type));
      return FALSE;
    }
  klass = g_type_class_ref (type);   /* kept: stage types live forever */
  name = klass->stage_name;
  if (name == NULL || *name == '\0')
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_REGISTER,
                   "%s has no stage name (lp_stage_class_set_metadata)", g_type_name (type));
      return FALSE;
    }
  if (g_hash_table_contains (registry->stages, name))
    {
      StageEntry *other = g_hash_table_lookup (registry->stages, name);
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE,
                   "stage '%s' is registered already%s%s", name,
                   other->plugin ? " by plugin " : "",
                   other->plugin ? other->plugin->name : "");
      return FALSE;
    }
  return TRUE;
}

/**
 * lp_plugin_register_stage:
 * @self: the plugin being loaded
 * @type: a concrete #LpStage type whose class set its metadata
 * @error: return location for a #GError
 *
 * Registers one stage type. Call it from the plugin's register function.
 * The plugin's stages become visible only if every one of them registers.
 *
 * Returns: %TRUE if the stage can be registered
 */
gboolean
lp_plugin_register_stage (LpPlugin  *self,
                          GType      type,
                          GError   **error)
{
  g_return_val_if_fail (LP_IS_PLUGIN (self), FALSE);
  g_return_val_if_fail (self->registry != NULL, FALSE);

  if (!check_stage_type (self->registry, type, error))
    return FALSE;
  for (guint i = 0; i < self->pending->len; i++)
    {
      GType other = g_array_index (self->pending, GType, i);
      if (g_str_equal (LP_STAGE_CLASS (g_type_class_peek (other))->stage_name,
                       LP_STAGE_CLASS (g_type_class_peek (type))->stage_name))
        {
          g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE,
                       "the plugin registers stage '%s' twice",
                       LP_STAGE_CLASS (g_type_class_peek (type))->stage_name);
          return FALSE;
        }
    }
  g_array_append_val (self->pending, type);
  return TRUE;
}

static void
lp_registry_finalize (GObject *object)
{
  LpRegistry *self = LP_REGISTRY (object);

  g_hash_table_unref (self->stages);
  g_ptr_array_unref (self->plugins);
  g_mutex_clear (&self->lock);

  G_OBJECT_CLASS (lp_registry_parent_class)->finalize (object);
}

static void
lp_registry_class_init (LpRegistryClass *klass)
{
  G_OBJECT_CLASS (klass)->finalize = lp_registry_finalize;
}

static void
lp_registry_init (LpRegistry *self)
{
  self->stages = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  self->plugins = g_ptr_array_new_with_free_func (g_object_unref);
  g_mutex_init (&self->lock);
}

/**
 * lp_registry_new:
 *
 * Makes an empty registry, with no plugins loaded: for tests and programs
 * that choose their plugins themselves.
 *
 * Returns: (transfer full): a registry
 */
LpRegistry *
lp_registry_new (void)
{
  return g_object_new (LP_TYPE_REGISTRY, NULL);
}

/**
 * lp_registry_get_default:
 *
 * Gets the registry that has loaded the plugins from `LPIPE_PLUGIN_PATH` and
 * the installed plugin directory; they are loaded on the first call.
 *
 * Returns: (transfer none): the default registry
 */
LpRegistry *
lp_registry_get_default (void)
{
  static gsize initialized;
  static LpRegistry *registry;

  if (g_once_init_enter (&initialized))
    {
      registry = lp_registry_new ();
      lp_registry_scan_default_path (registry);
      g_once_init_leave (&initialized, 1);
    }
  return registry;
}

static LpPlugin *
find_plugin (LpRegistry *self,
             const char *name)
{
  for (guint i = 0; i < self->plugins->len; i++)
    {
      LpPlugin *p = g_ptr_array_index (self->plugins, i);
      if (g_str_equal (p->name, name))
        return p;
    }
  return NULL;
}

/**
 * lp_registry_load_plugin:
 * @self: a registry
 * @filename: (type filename): a plugin's shared object
 * @error: return location for a #GError
 *
 * Loads one plugin and registers its stages. A file that does not load, has
 * no `lp_plugin_desc`, was built for another ABI, or registers a name that is
 * taken is an error (%LP_PLUGIN_ERROR) and registers nothing.
 *
 * Returns: (transfer none): the plugin, or %NULL on error
 */
LpPlugin *
lp_registry_load_plugin (LpRegistry  *self,
                         const char  *filename,
                         GError     **error)
{
  GModule *module;
  const LpPluginDesc *desc = NULL;
  g_autoptr(LpPlugin) plugin = NULL;
  GError *local_error = NULL;

  g_return_val_if_fail (LP_IS_REGISTRY (self), NULL);
  g_return_val_if_fail (filename != NULL, NULL);

  /* Lazy, as GStreamer loads its plugins: binding every function of a
   * plugin's libraries up front (OpenBLAS and LAPACK export thousands) is
   * half of lpipe's start-up, for functions a run mostly never calls. */
  module = g_module_open (filename, G_MODULE_BIND_LAZY | G_MODULE_BIND_LOCAL);
  if (module == NULL)
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_LOAD,
                   "%s: cannot load: %s", filename, g_module_error ());
      return NULL;
    }
  if (!g_module_symbol (module, "lp_plugin_desc", (gpointer *) &desc) || desc == NULL)
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_NO_ENTRY,
                   "%s: not an lpipe plugin (no lp_plugin_desc; declare it with LP_PLUGIN_DEFINE)",
                   filename);
      g_module_close (module);
      return NULL;
    }
  if (desc->abi_version != LP_PLUGIN_ABI_VERSION)
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_ABI,
                   "%s: built for plugin ABI %u, this lpipe has ABI %u; rebuild the plugin",
                   filename, desc->abi_version, LP_PLUGIN_ABI_VERSION);
      g_module_close (module);
      return NULL;
    }
  if (desc->name == NULL || desc->register_stages == NULL)
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_NO_ENTRY,
                   "%s: lp_plugin_desc has no name or no register function", filename);
      g_module_close (module);
      return NULL;
    }

  g_mutex_lock (&self->lock);
  if (find_plugin (self, desc->name))
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE,
                   "%s: a plugin named '%s' is loaded already from %s", filename, desc->name,
                   find_plugin (self, desc->name)->filename);
      g_mutex_unlock (&self->lock);
      g_module_close (module);
      return NULL;
    }

  plugin = g_object_new (LP_TYPE_PLUGIN, NULL);
  plugin->name = g_strdup (desc->name);
  plugin->description = g_strdup (desc->description ? desc->description : "");
  plugin->version = g_strdup (desc->version ? desc->version : "");
  plugin->filename = g_strdup (filename);
  plugin->registry = self;
  plugin->pending = g_array_new (FALSE, FALSE, sizeof (GType));

  /* The plugin may have registered GTypes by now even if it fails, and those
   * cannot be unregistered: the module stays in memory for good. */
  g_module_make_resident (module);

  if (!desc->register_stages (plugin, &local_error))
    {
      if (local_error == NULL)
        g_set_error (&local_error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_REGISTER,
                     "its register function failed without saying why");
      g_set_error (error, local_error->domain, local_error->code,
                   "%s: plugin '%s': %s", filename, desc->name, local_error->message);
      g_clear_error (&local_error);
      g_mutex_unlock (&self->lock);
      return NULL;
    }

  for (guint i = 0; i < plugin->pending->len; i++)
    {
      GType type = g_array_index (plugin->pending, GType, i);
      StageEntry *entry = g_new0 (StageEntry, 1);
      entry->type = type;
      entry->plugin = plugin;
      g_hash_table_insert (self->stages,
                           g_strdup (LP_STAGE_CLASS (g_type_class_peek (type))->stage_name), entry);
    }
  plugin->registry = NULL;
  g_ptr_array_add (self->plugins, g_object_ref (plugin));
  g_mutex_unlock (&self->lock);
  return plugin;
}

static int
compare_strings (gconstpointer a,
                 gconstpointer b)
{
  return strcmp (*(const char * const *) a, *(const char * const *) b);
}

/* Whether code at @path may be trusted as much as the user running lpipe:
 * nobody else can have written it. Loading a module runs its constructors
 * before lpipe can check that it is a plugin, so this is checked first, on
 * the folders as well as the files. NULL if trusted, else why not. */
static const char *
untrusted_reason (const char *path,
                  gboolean    want_dir)
{
  GStatBuf st;

  if (g_stat (path, &st) != 0)
    return "it cannot be read";
  if (want_dir ? !S_ISDIR (st.st_mode) : !S_ISREG (st.st_mode))
    return want_dir ? "it is not a folder" : "it is not a regular file";
  if (st.st_mode & S_IWOTH)
    return "anyone may write to it";
  if (st.st_uid != 0 && st.st_uid != getuid ())
    return "it belongs to another user";
  return NULL;
}

/* A plugin folder holds plugins, or folders of one plugin each (a build
 * tree: build/plugins/<name>/lib<name>.so beside its <name>.so.p object
 * folder). Nothing deeper is searched. */
#define MAX_SCAN_DEPTH 1

static guint
scan_directory (LpRegistry *self,
                const char *directory,
                guint       depth)
{
  g_autoptr(GDir) dir = NULL;
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func (g_free);
  const char *name;
  const char *why;
  guint loaded = 0;

  dir = g_dir_open (directory, 0, NULL);
  if (dir == NULL)
    return 0;
  if ((why = untrusted_reason (directory, TRUE)))
    {
      g_warning ("skipping plugin folder %s: %s", directory, why);
      return 0;
    }
  while ((name = g_dir_read_name (dir)))
    g_ptr_array_add (names, g_strdup (name));
  /* Load in a fixed order, so which of two clashing plugins wins does not
   * depend on the file system. */
  g_ptr_array_sort (names, compare_strings);

  for (guint i = 0; i < names->len; i++)
    {
      g_autofree char *path = g_build_filename (directory, g_ptr_array_index (names, i), NULL);

      if (g_file_test (path, G_FILE_TEST_IS_DIR))
        {
          /* A build tree holds object folders beside the plugins. */
          if (depth < MAX_SCAN_DEPTH && !g_str_has_suffix (path, ".p"))
            loaded += scan_directory (self, path, depth + 1);
        }
      else if (g_str_has_suffix (path, "." G_MODULE_SUFFIX))
        {
          g_autoptr(GError) error = NULL;

          if ((why = untrusted_reason (path, FALSE)))
            g_warning ("skipping plugin %s: %s", path, why);
          else if (lp_registry_load_plugin (self, path, &error))
            loaded++;
          else
            g_warning ("skipping plugin %s", error->message);
        }
    }
  return loaded;
}

/**
 * lp_registry_scan_directory:
 * @self: a registry
 * @directory: (type filename): a folder holding plugins
 *
 * Loads every plugin in @directory and in its subfolders (one level: a
 * folder per plugin, as in a build tree). A plugin that fails is reported
 * in one warning line and skipped. So are folders and files that anyone may
 * write to or that belong to a user other than the one running lpipe or
 * root: loading a module runs its code.
 *
 * Returns: how many plugins were loaded
 */
guint
lp_registry_scan_directory (LpRegistry *self,
                            const char *directory)
{
  g_return_val_if_fail (LP_IS_REGISTRY (self), 0);
  g_return_val_if_fail (directory != NULL, 0);
  return scan_directory (self, directory, 0);
}

/**
 * lp_registry_scan_default_path:
 * @self: a registry
 *
 * Loads the plugins of `LPIPE_PLUGIN_PATH`, then those of the installed
 * plugin directory (or of `LPIPE_PLUGIN_SYSTEM_PATH` when it is set).
 */
void
lp_registry_scan_default_path (LpRegistry *self)
{
  const char *env;
  const char *system;

  g_return_if_fail (LP_IS_REGISTRY (self));

  env = g_getenv ("LPIPE_PLUGIN_PATH");
  if (env && *env)
    {
      g_auto(GStrv) dirs = g_strsplit (env, G_SEARCHPATH_SEPARATOR_S, -1);
      for (guint i = 0; dirs[i]; i++)
        if (*dirs[i])
          scan_directory (self, dirs[i], 0);
    }
  system = g_getenv ("LPIPE_PLUGIN_SYSTEM_PATH");
  if (system == NULL)
    system = LPIPE_PLUGIN_DIR;
  if (*system)
    {
      g_auto(GStrv) dirs = g_strsplit (system, G_SEARCHPATH_SEPARATOR_S, -1);
      for (guint i = 0; dirs[i]; i++)
        if (*dirs[i])
          scan_directory (self, dirs[i], 0);
    }
}

/**
 * lp_registry_register_stage:
 * @self: a registry
 * @type: a concrete #LpStage type whose class set its metadata
 * @error: return location for a #GError
 *
 * Registers a stage type defined by the program itself rather than a plugin.
 *
 * Returns: %TRUE if the stage was registered
 */
gboolean
lp_registry_register_stage (LpRegistry  *self,
                            GType        type,
                            GError     **error)
{
  StageEntry *entry;

  g_return_val_if_fail (LP_IS_REGISTRY (self), FALSE);

  g_mutex_lock (&self->lock);
  if (!check_stage_type (self, type, error))
    {
      g_mutex_unlock (&self->lock);
      return FALSE;
    }
  entry = g_new0 (StageEntry, 1);
  entry->type = type;
  g_hash_table_insert (self->stages,
                       g_strdup (LP_STAGE_CLASS (g_type_class_peek (type))->stage_name), entry);
  g_mutex_unlock (&self->lock);
  return TRUE;
}

/**
 * lp_registry_register_stage_full:
 * @self: a registry
 * @type: a concrete #LpStage type
 * @stage_name: its name in pipeline files
 * @category: (nullable): a word that groups stages
 * @description: (nullable): one line on what it does
 * @error: return location for a #GError
 *
 * Names a stage type and registers it: for stages written in a language
 * binding, whose class cannot call lp_stage_class_set_metadata().
 *
 * Returns: %TRUE if the stage was registered
 */
gboolean
lp_registry_register_stage_full (LpRegistry  *self,
                                 GType        type,
                                 const char  *stage_name,
                                 const char  *category,
                                 const char  *description,
                                 GError     **error)
{
  LpStageClass *klass;

  g_return_val_if_fail (LP_IS_REGISTRY (self), FALSE);
  g_return_val_if_fail (stage_name != NULL, FALSE);

  if (!g_type_is_a (type, LP_TYPE_STAGE) || G_TYPE_IS_ABSTRACT (type))
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_REGISTER,
                   "%s is not a concrete LpStage type", g_type_name (type));
      return FALSE;
    }
  if (lp_registry_lookup (self, stage_name) != G_TYPE_INVALID)
    {
      g_set_error (error, LP_PLUGIN_ERROR, LP_PLUGIN_ERROR_DUPLICATE,
                   "stage '%s' is registered already", stage_name);
      return FALSE;
    }
  klass = g_type_class_ref (type);
  lp_stage_class_set_metadata (klass, stage_name, category, description);
  return lp_registry_register_stage (self, type, error);
}

/**
 * lp_registry_lookup:
 * @self: a registry
 * @stage_name: a stage name
 *
 * Returns: the stage's type, or %G_TYPE_INVALID if no stage has that name
 */
GType
lp_registry_lookup (LpRegistry *self,
                    const char *stage_name)
{
  StageEntry *entry;
  GType type;

  g_return_val_if_fail (LP_IS_REGISTRY (self), G_TYPE_INVALID);
  g_return_val_if_fail (stage_name != NULL, G_TYPE_INVALID);

  g_mutex_lock (&self->lock);
  entry = g_hash_table_lookup (self->stages, stage_name);
  type = entry ? entry->type : G_TYPE_INVALID;
  g_mutex_unlock (&self->lock);
  return type;
}

/**
 * lp_registry_lookup_plugin:
 * @self: a registry
 * @stage_name: a stage name
 *
 * Returns: (transfer none) (nullable): the plugin that provides the stage,
 *   %NULL for stages registered in code or unknown ones
 */
LpPlugin *
lp_registry_lookup_plugin (LpRegistry *self,
                           const char *stage_name)
{
  StageEntry *entry;

  g_return_val_if_fail (LP_IS_REGISTRY (self), NULL);

  g_mutex_lock (&self->lock);
  entry = g_hash_table_lookup (self->stages, stage_name);
  g_mutex_unlock (&self->lock);
  return entry ? entry->plugin : NULL;
}

/**
 * lp_registry_list_stages:
 * @self: a registry
 *
 * Returns: (transfer full): the names of every stage, sorted
 */
GStrv
lp_registry_list_stages (LpRegistry *self)
{
  GStrv names;
  guint n;

  g_return_val_if_fail (LP_IS_REGISTRY (self), NULL);

  g_mutex_lock (&self->lock);
  names = (GStrv) g_hash_table_get_keys_as_array (self->stages, &n);
  for (guint i = 0; i < n; i++)
    names[i] = g_strdup (names[i]);
  g_mutex_unlock (&self->lock);
  qsort (names, n, sizeof (char *), compare_strings);
  return names;
}

/**
 * lp_registry_list_plugins:
 * @self: a registry
 *
 * Returns: (transfer container) (element-type LpPlugin): the loaded plugins
 */
GPtrArray *
lp_registry_list_plugins (LpRegistry *self)
{
  GPtrArray *out;

  g_return_val_if_fail (LP_IS_REGISTRY (self), NULL);

  g_mutex_lock (&self->lock);
  out = g_ptr_array_new_with_free_func (g_object_unref);
  for (guint i = 0; i < self->plugins->len; i++)
    g_ptr_array_add (out, g_object_ref (g_ptr_array_index (self->plugins, i)));
  g_mutex_unlock (&self->lock);
  return out;
}

/**
 * lp_registry_create_stage:
 * @self: a registry
 * @stage_name: a stage name
 * @error: return location for a #GError
 *
 * Makes a new stage of the named type, with its properties at their defaults.
 * An unknown name is %LP_PIPELINE_ERROR_UNKNOWN_STAGE, with the closest
 * known name suggested.
 *
 * Returns: (transfer full): the stage, or %NULL on error
 */
LpStage *
lp_registry_create_stage (LpRegistry  *self,
                          const char  *stage_name,
                          GError     **error)
{
  GType type;

  g_return_val_if_fail (LP_IS_REGISTRY (self), NULL);
  g_return_val_if_fail (stage_name != NULL, NULL);

  type = lp_registry_lookup (self, stage_name);
  if (type == G_TYPE_INVALID)
    {
      g_auto(GStrv) names = lp_registry_list_stages (self);
      g_autofree char *close = lp_suggest_closest (stage_name, (const char * const *) names);

      if (close)
        g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_STAGE,
                     "unknown stage '%s'; did you mean '%s'?", stage_name, close);
      else
        g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_UNKNOWN_STAGE,
                     "unknown stage '%s' (`lpipe inspect` lists the stages)", stage_name);
      return NULL;
    }
  return g_object_new (type, NULL);
}

static guint
edit_distance (const char *a,
               const char *b)
{
  gsize la = strlen (a), lb = strlen (b);
  g_autofree guint *row = g_new (guint, lb + 1);

  for (gsize j = 0; j <= lb; j++)
    row[j] = j;
  for (gsize i = 1; i <= la; i++)
    {
      guint diag = row[0];
      row[0] = i;
      for (gsize j = 1; j <= lb; j++)
        {
          guint up = row[j];
          guint cost = g_ascii_tolower (a[i - 1]) == g_ascii_tolower (b[j - 1]) ? 0 : 1;
          row[j] = MIN (MIN (row[j] + 1, row[j - 1] + 1), diag + cost);
          diag = up;
        }
    }
  return row[lb];
}

/**
 * lp_suggest_closest:
 * @word: a misspelt name
 * @candidates: (array zero-terminated=1): the valid names
 *
 * Finds the valid name a user most likely meant, for "did you mean" hints.
 *
 * Returns: (transfer full) (nullable): the closest candidate, or %NULL if
 *   none is close
 */
char *
lp_suggest_closest (const char         *word,
                    const char * const *candidates)
{
  const char *best = NULL;
  guint best_distance = G_MAXUINT;
  guint limit;

  g_return_val_if_fail (word != NULL, NULL);
  if (candidates == NULL)
    return NULL;

  /* Long names tolerate more typos; a short one only one or two. */
  limit = MAX (2, strlen (word) / 3);
  for (guint i = 0; candidates[i]; i++)
    {
      guint d = edit_distance (word, candidates[i]);
      if (d < best_distance)
        {
          best_distance = d;
          best = candidates[i];
        }
    }
  if (best && best_distance <= limit)
    return g_strdup (best);
  /* A prefix ("lora" for "lora-svd") is a hint too, when it is unambiguous. */
  for (guint i = 0; candidates[i]; i++)
    if (strlen (word) >= 3 && g_str_has_prefix (candidates[i], word))
      return g_strdup (candidates[i]);
  return NULL;
}
