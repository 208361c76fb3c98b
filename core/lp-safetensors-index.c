/* lp-safetensors-index.c: sharded checkpoints, read as one and written
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <unistd.h>

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

/* ---- writing ----------------------------------------------------------- */

#define SHARD_SUFFIX ".safetensors"

/* Where a sharded checkpoint goes: @location is `DIR/STEM.safetensors`,
 * `DIR/STEM.safetensors.index.json` or a folder (STEM "model", as Hugging
 * Face names it). */
static gboolean
split_location (const char  *location,
                char       **folder,
                char       **stem,
                GError     **error)
{
  g_autofree char *base = NULL;

  if (g_file_test (location, G_FILE_TEST_IS_DIR))
    {
      *folder = g_strdup (location);
      *stem = g_strdup ("model");
      return TRUE;
    }
  base = g_path_get_basename (location);
  if (g_str_has_suffix (base, INDEX_SUFFIX) && strlen (base) > strlen (INDEX_SUFFIX))
    base[strlen (base) - strlen (INDEX_SUFFIX)] = '\0';
  else if (g_str_has_suffix (base, SHARD_SUFFIX) && strlen (base) > strlen (SHARD_SUFFIX))
    base[strlen (base) - strlen (SHARD_SUFFIX)] = '\0';
  else
    {
      g_autofree char *display = g_filename_display_name (location);
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_FILENAME,
                   "%s: a sharded checkpoint is named by its first file's pattern "
                   "(model.safetensors), its index (model.safetensors.index.json) or its folder",
                   display);
      return FALSE;
    }
  *folder = g_path_get_dirname (location);
  *stem = g_steal_pointer (&base);
  return TRUE;
}

/* huggingface_hub's split_state_dict_into_shards_factory(): the tensors in
 * order, a shard closed when the next tensor would take it past
 * @max_shard_size. A tensor larger than @max_shard_size on its own gets a
 * shard of its own, larger than the limit (as Hugging Face allows), and that
 * shard comes before the one being filled, as there. Returns GPtrArrays of
 * LpTensor. */
static GPtrArray *
plan_shards (LpCheckpoint *checkpoint,
             guint64       max_shard_size)
{
  GPtrArray *shards = g_ptr_array_new_with_free_func ((GDestroyNotify) g_ptr_array_unref);
  g_autoptr(GPtrArray) current = g_ptr_array_new ();
  guint64 current_size = 0;

  for (guint i = 0; i < lp_checkpoint_get_n_tensors (checkpoint); i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
      guint64 size = lp_tensor_get_n_bytes (tensor);

      if (size > max_shard_size)
        {
          GPtrArray *alone = g_ptr_array_new ();
          g_ptr_array_add (alone, tensor);
          g_ptr_array_add (shards, alone);
          continue;
        }
      if (current_size + size > max_shard_size)
        {
          g_ptr_array_add (shards, g_steal_pointer (&current));
          current = g_ptr_array_new ();
          current_size = 0;
        }
      g_ptr_array_add (current, tensor);
      current_size += size;
    }
  if (current->len > 0 || shards->len == 0)
    g_ptr_array_add (shards, g_steal_pointer (&current));
  return shards;
}

/* Whether @name is `STEM-NNNNN-of-NNNNN.safetensors`: a shard of some
 * sharded write of STEM. */
static gboolean
is_shard_name (const char *name,
               const char *stem)
{
  gsize n = strlen (stem);
  const char *p = name + n;

  if (strncmp (name, stem, n) != 0 || p[0] != '-')
    return FALSE;
  p++;
  for (int part = 0; part < 2; part++)
    {
      for (int i = 0; i < 5; i++, p++)
        if (!g_ascii_isdigit (*p))
          return FALSE;
      if (part == 0)
        {
          if (strncmp (p, "-of-", 4) != 0)
            return FALSE;
          p += 4;
        }
    }
  return g_str_equal (p, SHARD_SUFFIX);
}

static gboolean
sync_folder (const char  *folder,
             GError     **error)
{
  int fd = open (folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int rc, saved_errno;

  if (fd < 0)
    return TRUE;
  rc = fsync (fd);
  saved_errno = errno;
  close (fd);
  /* Some file systems cannot sync directories. */
  if (rc != 0 && saved_errno != EINVAL && saved_errno != ENOTSUP)
    {
      g_autofree char *display = g_filename_display_name (folder);
      g_set_error (error, G_IO_ERROR, g_io_error_from_errno (saved_errno),
                   "Could not sync the folder “%s”: %s", display, g_strerror (saved_errno));
      return FALSE;
    }
  return TRUE;
}

static gboolean
remove_file (const char  *folder,
             const char  *name,
             GError     **error)
{
  g_autofree char *path = g_build_filename (folder, name, NULL);

  if (g_unlink (path) != 0 && errno != ENOENT)
    {
      int saved_errno = errno;
      g_autofree char *display = g_filename_display_name (path);
      g_set_error (error, G_IO_ERROR, g_io_error_from_errno (saved_errno),
                   "Could not remove the stale “%s” of an earlier write: %s", display,
                   g_strerror (saved_errno));
      return FALSE;
    }
  return TRUE;
}

/* The shards of an earlier write of STEM in @folder that this one does not
 * replace: other names, or another count (`-of-00004` where this write has
 * three). */
static gboolean
remove_stale_shards (const char  *folder,
                     const char  *stem,
                     GHashTable  *written,
                     GError     **error)
{
  g_autoptr(GDir) dir = g_dir_open (folder, 0, NULL);
  g_autoptr(GPtrArray) stale = g_ptr_array_new_with_free_func (g_free);
  const char *name;

  if (dir == NULL)
    return TRUE;
  while ((name = g_dir_read_name (dir)) != NULL)
    if (is_shard_name (name, stem) && !g_hash_table_contains (written, name))
      g_ptr_array_add (stale, g_strdup (name));
  for (guint i = 0; i < stale->len; i++)
    if (!remove_file (folder, g_ptr_array_index (stale, i), error))
      return FALSE;
  return stale->len == 0 || sync_folder (folder, error);
}

/* {"metadata": {"total_size": N}, "weight_map": {tensor: shard}}, as
 * transformers' save_pretrained writes it (indented by 2, the map sorted by
 * tensor name). */
static char *
build_index (GPtrArray   *shards,
             GPtrArray   *names,
             guint64      total_size)
{
  g_autoptr(JsonBuilder) builder = json_builder_new ();
  g_autoptr(JsonGenerator) generator = json_generator_new ();
  g_autoptr(JsonNode) root = NULL;
  g_autoptr(GPtrArray) entries = g_ptr_array_new_with_free_func (g_free);

  for (guint s = 0; s < shards->len; s++)
    {
      GPtrArray *shard = g_ptr_array_index (shards, s);
      for (guint i = 0; i < shard->len; i++)
        {
          /* "tensor\0shard": sorted by the tensor's name */
          const char *tensor = lp_tensor_get_name (g_ptr_array_index (shard, i));
          const char *file = g_ptr_array_index (names, s);
          gsize n = strlen (tensor);
          char *entry = g_malloc (n + 1 + strlen (file) + 1);
          memcpy (entry, tensor, n + 1);
          strcpy (entry + n + 1, file);
          g_ptr_array_add (entries, entry);
        }
    }
  g_ptr_array_sort (entries, compare_names);

  json_builder_begin_object (builder);
  json_builder_set_member_name (builder, "metadata");
  json_builder_begin_object (builder);
  json_builder_set_member_name (builder, "total_size");
  json_builder_add_int_value (builder, (gint64) total_size);
  json_builder_end_object (builder);
  json_builder_set_member_name (builder, "weight_map");
  json_builder_begin_object (builder);
  for (guint i = 0; i < entries->len; i++)
    {
      const char *entry = g_ptr_array_index (entries, i);
      json_builder_set_member_name (builder, entry);
      json_builder_add_string_value (builder, entry + strlen (entry) + 1);
    }
  json_builder_end_object (builder);
  json_builder_end_object (builder);

  root = json_builder_get_root (builder);
  json_generator_set_root (generator, root);
  json_generator_set_pretty (generator, TRUE);
  json_generator_set_indent (generator, 2);
  return json_generator_to_data (generator, NULL);
}

/**
 * lp_safetensors_save_sharded:
 * @checkpoint: the checkpoint to write
 * @location: (type filename): `DIR/STEM.safetensors`,
 *   `DIR/STEM.safetensors.index.json`, or a folder (STEM is then `model`)
 * @max_shard_size: the largest shard, in bytes of tensor data
 * @stage: (nullable): the sink doing the writing (see lp_safetensors_save())
 * @error: return location for a #GError
 *
 * Writes @checkpoint as Hugging Face writes a sharded checkpoint
 * (huggingface_hub's save_torch_state_dict()): `STEM-00001-of-00003.safetensors`
 * and on, split by huggingface_hub's rule (tensors in order, a shard closed
 * when the next tensor would take it past @max_shard_size; a tensor larger
 * than that alone gets a shard of its own, larger than the limit), and
 * `STEM.safetensors.index.json` mapping every tensor to its shard, with the
 * tensor bytes in `metadata.total_size`. Every shard carries the checkpoint's
 * metadata. A checkpoint that fits in one shard is written as
 * `STEM.safetensors` with no index, as there. Tensors are computed and written
 * a shard at a time, a tensor at a time within it.
 *
 * All the files are committed together or not at all: on error nothing in
 * the folder has changed. The shards and the index of an earlier write of
 * STEM that this one does not overwrite are removed, so that no reader mixes
 * them in.
 *
 * Returns: %TRUE on success
 */
gboolean
lp_safetensors_save_sharded (LpCheckpoint  *checkpoint,
                             const char    *location,
                             guint64        max_shard_size,
                             LpStage       *stage,
                             GError       **error)
{
  g_autofree char *folder = NULL;
  g_autofree char *stem = NULL;
  g_autofree char *index_name = NULL;
  g_autofree char *whole_name = NULL;
  g_autofree char *index_text = NULL;
  g_autoptr(GPtrArray) shards = NULL;
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func (g_free);
  g_autoptr(GPtrArray) pending = g_ptr_array_new_with_free_func ((GDestroyNotify) lp_pending_file_free);
  g_autoptr(LpPendingFile) index_file = NULL;
  g_autoptr(GHashTable) written = g_hash_table_new (g_str_hash, g_str_equal);
  guint64 total_size = 0, tensors_done = 0, bytes_done = 0;

  g_return_val_if_fail (LP_IS_CHECKPOINT (checkpoint), FALSE);
  g_return_val_if_fail (location != NULL, FALSE);
  g_return_val_if_fail (max_shard_size > 0, FALSE);
  g_return_val_if_fail (stage == NULL || LP_IS_STAGE (stage), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (!split_location (location, &folder, &stem, error))
    return FALSE;
  if (lp_checkpoint_get_adapter_config (checkpoint) != NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                   "a PEFT adapter is not written sharded (PEFT reads one adapter_model.safetensors "
                   "beside its adapter_config.json): leave max-shard-size unset");
      return FALSE;
    }
  index_name = g_strconcat (stem, INDEX_SUFFIX, NULL);
  whole_name = g_strconcat (stem, SHARD_SUFFIX, NULL);

  shards = plan_shards (checkpoint, max_shard_size);
  for (guint s = 0; s < shards->len; s++)
    {
      GPtrArray *shard = g_ptr_array_index (shards, s);
      g_autoptr(LpCheckpoint) part = lp_checkpoint_new_like (checkpoint);
      g_autofree char *path = NULL;
      char *name;
      LpPendingFile *file;

      name = shards->len == 1 ? g_strdup (whole_name)
                              : g_strdup_printf ("%s-%05u-of-%05u" SHARD_SUFFIX, stem, s + 1, shards->len);
      g_ptr_array_add (names, name);
      g_hash_table_add (written, name);
      for (guint i = 0; i < shard->len; i++)
        {
          LpTensor *tensor = g_ptr_array_index (shard, i);
          total_size += lp_tensor_get_n_bytes (tensor);
          if (!lp_checkpoint_add_tensor (part, tensor, error))
            return FALSE;
        }
      path = g_build_filename (folder, name, NULL);
      /* one progress for the whole checkpoint, and the run's count of
       * tensors and bytes written is the whole's */
      if (stage != NULL)
        lp_stage_set_progress_span (stage, tensors_done, bytes_done, lp_checkpoint_get_n_tensors (checkpoint),
                                    lp_checkpoint_get_n_bytes (checkpoint));
      file = lp_safetensors_write_pending (part, path, stage, error);
      if (stage != NULL)
        lp_stage_set_progress_span (stage, 0, 0, 0, 0);
      if (file == NULL)
        return FALSE;
      tensors_done += shard->len;
      bytes_done += lp_checkpoint_get_n_bytes (part);
      g_ptr_array_add (pending, file);
      if (lp_pending_file_is_stream (file))
        {
          g_autofree char *display = g_filename_display_name (path);
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_REGULAR_FILE,
                       "Could not write “%s”: the shards of a checkpoint are regular files", display);
          return FALSE;
        }
    }
  if (shards->len > 1)
    {
      g_autofree char *index_path = g_build_filename (folder, index_name, NULL);

      index_text = build_index (shards, names, total_size);
      index_file = lp_pending_file_new_contents (index_path, index_text, strlen (index_text), error);
      if (index_file == NULL)
        return FALSE;
    }

  /* Everything is on disk under temporary names; from here on, renames. The
   * index is the commit point. First the files that would make a reader see
   * the earlier write: its index (which may name shards about to be
   * replaced one by one), and the unsharded STEM.safetensors that
   * transformers would load before any index. A crash from here until the
   * index is in place leaves the new shards and no index: the folder reads
   * as no checkpoint, never as a mix of two writes. After it, the index
   * names exactly the new shards; stale shards of the earlier write that it
   * does not name are removed last, and are never read even if a crash
   * leaves them. */
  if (!remove_file (folder, index_name, error) ||
      (shards->len > 1 && !remove_file (folder, whole_name, error)) ||
      !sync_folder (folder, error))
    return FALSE;
  for (guint s = 0; s < pending->len; s++)
    if (!lp_pending_file_commit (g_ptr_array_index (pending, s), error))
      return FALSE;
  if (index_file != NULL && !lp_pending_file_commit (index_file, error))
    return FALSE;
  return remove_stale_shards (folder, stem, written, error);
}
