/* lp-safetensors-index.c: sharded checkpoints, read as one
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <json-glib/json-glib.h>
#include <string.h>

/* An index is a few hundred bytes a tensor; anything far larger is not one. */
#define MAX_INDEX_BYTES (64u << 20)

#define INDEX_SUFFIX ".safetensors.index.json"

/**
 * lp_safetensors_is_index:
 * @path: (type filename): a location
 *
 * Whether @path names a sharded checkpoint for lp_safetensors_load_index():
 * a `*.safetensors.index.json` file, or a folder.
 *
 * Returns: %TRUE for an index or a folder
 */
gboolean
lp_safetensors_is_index (const char *path)
{
  g_return_val_if_fail (path != NULL, FALSE);
  return g_str_has_suffix (path, INDEX_SUFFIX) || g_file_test (path, G_FILE_TEST_IS_DIR);
}

/* The one index in @folder. */
static char *
find_index (const char  *folder,
            GError     **error)
{
  g_autoptr(GDir) dir = g_dir_open (folder, 0, error);
  g_autofree char *display = g_filename_display_name (folder);
  g_autofree char *found = NULL;
  const char *name;

  if (dir == NULL)
    return NULL;
  while ((name = g_dir_read_name (dir)) != NULL)
    {
      if (!g_str_has_suffix (name, INDEX_SUFFIX))
        continue;
      if (found != NULL)
        {
          g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_INDEX,
                       "%s: two sharded checkpoints, %s and %s; name the index to read",
                       display, found, name);
          return NULL;
        }
      found = g_strdup (name);
    }
  if (found == NULL)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_INDEX,
                   "%s: a folder without a sharded checkpoint (no *" INDEX_SUFFIX ")", display);
      return NULL;
    }
  return g_build_filename (folder, found, NULL);
}

static int
compare_names (gconstpointer a,
               gconstpointer b)
{
  return strcmp (*(const char * const *) a, *(const char * const *) b);
}

static gboolean
index_error (GError     **error,
             const char  *index,
             const char  *format,
             ...) G_GNUC_PRINTF (3, 4);

static gboolean
index_error (GError     **error,
             const char  *index,
             const char  *format,
             ...)
{
  g_autofree char *display = g_filename_display_name (index);
  g_autofree char *message = NULL;
  va_list args;

  va_start (args, format);
  message = g_strdup_vprintf (format, args);
  va_end (args);
  g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_INDEX, "%s: %s", display, message);
  return FALSE;
}

/**
 * lp_safetensors_load_index:
 * @path: (type filename): a `*.safetensors.index.json`, or a folder holding
 *   exactly one
 * @error: return location for a #GError
 *
 * Reads a sharded checkpoint, as Hugging Face transformers and diffusers
 * write one (`model.safetensors.index.json`,
 * `diffusion_pytorch_model.safetensors.index.json`: a `weight_map` from
 * each tensor's name to the shard holding it), as one checkpoint: every
 * shard is loaded with lp_safetensors_load() (so its tensors stay in the
 * mapped file until asked for) and the tensors follow shard by shard, the
 * shards in the order of their names (`model-00001-of-00003.safetensors`
 * first, the order they were written in), each shard's in file order. The
 * first shard's metadata is the checkpoint's.
 *
 * The index and the shards must agree exactly: a shard that is missing or
 * unreadable, a tensor a shard holds that the index maps elsewhere or not at
 * all, a tensor the index maps to a shard that does not hold it, and a shard
 * name with a folder in it are %LP_FORMAT_ERROR_INDEX errors naming the
 * shard and the tensor.
 *
 * Returns: (transfer full): the checkpoint, or %NULL with @error set
 */
LpCheckpoint *
lp_safetensors_load_index (const char  *path,
                           GError     **error)
{
  g_autofree char *index = NULL;
  g_autofree char *folder = NULL;
  g_autofree char *text = NULL;
  g_autoptr(JsonParser) parser = json_parser_new ();
  g_autoptr(GError) local = NULL;
  g_autoptr(GPtrArray) shards = g_ptr_array_new ();      /* file names */
  g_autoptr(GHashTable) mapped = NULL;                   /* tensor -> shard */
  g_autoptr(GHashTable) seen_shards = g_hash_table_new (g_str_hash, g_str_equal);
  g_autoptr(LpCheckpoint) checkpoint = lp_checkpoint_new ();
  g_autoptr(GList) members = NULL;
  JsonNode *root, *weight_map;
  gsize length;

  g_return_val_if_fail (path != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  index = g_file_test (path, G_FILE_TEST_IS_DIR) ? find_index (path, error) : g_strdup (path);
  if (index == NULL)
    return NULL;
  folder = g_path_get_dirname (index);

  if (!g_file_get_contents (index, &text, &length, error))
    return NULL;
  if (length > MAX_INDEX_BYTES)
    return index_error (error, index, "%" G_GSIZE_FORMAT " bytes, too large for an index", length), NULL;
  if (!json_parser_load_from_data (parser, text, length, &local))
    return index_error (error, index, "not JSON: %s", local->message), NULL;
  root = json_parser_get_root (parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    return index_error (error, index, "not a JSON object"), NULL;
  weight_map = json_object_get_member (json_node_get_object (root), "weight_map");
  if (weight_map == NULL || !JSON_NODE_HOLDS_OBJECT (weight_map))
    return index_error (error, index, "no \"weight_map\" object (the index of a sharded checkpoint "
                        "maps every tensor to its shard)"), NULL;

  mapped = g_hash_table_new (g_str_hash, g_str_equal);
  members = json_object_get_members (json_node_get_object (weight_map));
  for (GList *l = members; l != NULL; l = l->next)
    {
      const char *tensor = l->data;
      JsonNode *node = json_object_get_member (json_node_get_object (weight_map), tensor);
      const char *shard;

      if (!JSON_NODE_HOLDS_VALUE (node) || json_node_get_value_type (node) != G_TYPE_STRING)
        return index_error (error, index, "weight_map: tensor %s is not mapped to a file name", tensor), NULL;
      shard = json_node_get_string (node);
      /* shards live beside the index; a path could read any file */
      if (shard[0] == '\0' || strchr (shard, '/') != NULL || g_str_equal (shard, ".")
          || g_str_equal (shard, ".."))
        return index_error (error, index, "weight_map: tensor %s is mapped to '%s', not a file "
                            "beside the index", tensor, shard), NULL;
      g_hash_table_insert (mapped, (gpointer) tensor, (gpointer) shard);
      if (g_hash_table_add (seen_shards, (gpointer) shard))
        g_ptr_array_add (shards, (gpointer) shard);
    }
  if (shards->len == 0)
    return index_error (error, index, "the weight_map is empty"), NULL;
  /* model-00001-of-00003.safetensors first: the order they were written in */
  g_ptr_array_sort (shards, compare_names);

  for (guint s = 0; s < shards->len; s++)
    {
      const char *shard = g_ptr_array_index (shards, s);
      g_autofree char *file = g_build_filename (folder, shard, NULL);
      g_autoptr(LpCheckpoint) part = NULL;

      if (!g_file_test (file, G_FILE_TEST_EXISTS))
        return index_error (error, index, "shard %s is missing", shard), NULL;
      part = lp_safetensors_load (file, &local);
      if (part == NULL)
        return index_error (error, index, "shard %s: %s", shard, local->message), NULL;
      if (s == 0)
        lp_checkpoint_copy_metadata (checkpoint, part);
      lp_checkpoint_inherit_sources (checkpoint, part);

      for (guint i = 0; i < lp_checkpoint_get_n_tensors (part); i++)
        {
          LpTensor *tensor = lp_checkpoint_get_tensor (part, i);
          const char *name = lp_tensor_get_name (tensor);
          const char *owner = g_hash_table_lookup (mapped, name);

          if (owner == NULL)
            return index_error (error, index, "shard %s holds tensor %s, which the index does not "
                                "name", shard, name), NULL;
          if (!g_str_equal (owner, shard))
            return index_error (error, index, "shard %s holds tensor %s, which the index maps to %s",
                                shard, name, owner), NULL;
          if (!lp_checkpoint_add_tensor (checkpoint, tensor, &local))
            return index_error (error, index, "shard %s: %s", shard, local->message), NULL;
        }
    }

  for (GList *l = members; l != NULL; l = l->next)
    if (lp_checkpoint_lookup (checkpoint, l->data) == NULL)
      return index_error (error, index, "tensor %s is mapped to shard %s, which does not hold it",
                          (const char *) l->data,
                          (const char *) g_hash_table_lookup (mapped, l->data)), NULL;

  lp_checkpoint_set_origin (checkpoint, index);
  return g_steal_pointer (&checkpoint);
}
