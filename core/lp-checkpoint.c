/* lp-checkpoint.c: an ordered set of tensors with the file's string metadata
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

/**
 * LpCheckpoint:
 *
 * What flows between stages: an ordered list of #LpTensor with unique names,
 * the string metadata of a safetensors file (in order), the text of a PEFT
 * `adapter_config.json` when there is one, and the file it came from.
 *
 * Stages do not change the checkpoints they are given: they make new ones,
 * usually with lp_checkpoint_new_like() and tensors that share the input's
 * data.
 */
struct _LpCheckpoint
{
  GObject parent_instance;

  GPtrArray *tensors;     /* LpTensor, in order */
  GHashTable *by_name;    /* name -> LpTensor (borrowed from tensors) */
  GPtrArray *meta_keys;   /* in order */
  GHashTable *metadata;   /* key -> value */
  char *adapter_config;
  char *origin;
  /* The files the tensors' bytes come from, directly or through the stages
   * that made them (LpSourceFile): a sink checks them before it commits. */
  GPtrArray *sources;
};

G_DEFINE_FINAL_TYPE (LpCheckpoint, lp_checkpoint, G_TYPE_OBJECT)

static void
lp_checkpoint_dispose (GObject *object)
{
  LpCheckpoint *self = LP_CHECKPOINT (object);

  g_clear_pointer (&self->by_name, g_hash_table_unref);
  g_clear_pointer (&self->tensors, g_ptr_array_unref);
  g_clear_pointer (&self->sources, g_ptr_array_unref);

  G_OBJECT_CLASS (lp_checkpoint_parent_class)->dispose (object);
}

static void
lp_checkpoint_finalize (GObject *object)
{
  LpCheckpoint *self = LP_CHECKPOINT (object);

  g_ptr_array_unref (self->meta_keys);
  g_hash_table_unref (self->metadata);
  g_free (self->adapter_config);
  g_free (self->origin);

  G_OBJECT_CLASS (lp_checkpoint_parent_class)->finalize (object);
}

static void
lp_checkpoint_class_init (LpCheckpointClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->dispose = lp_checkpoint_dispose;
  object_class->finalize = lp_checkpoint_finalize;
}

static void
lp_checkpoint_init (LpCheckpoint *self)
{
  self->tensors = g_ptr_array_new_with_free_func (g_object_unref);
  self->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  self->meta_keys = g_ptr_array_new_with_free_func (g_free);
  self->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, g_free);
}

/**
 * lp_checkpoint_new:
 *
 * Returns: (transfer full): an empty checkpoint
 */
LpCheckpoint *
lp_checkpoint_new (void)
{
  return g_object_new (LP_TYPE_CHECKPOINT, NULL);
}

/**
 * lp_checkpoint_new_like:
 * @other: a checkpoint
 *
 * Makes an empty checkpoint with the metadata, adapter config and origin of
 * @other, which is what a transform starts its output from.
 *
 * Returns: (transfer full): a checkpoint with no tensors
 */
LpCheckpoint *
lp_checkpoint_new_like (LpCheckpoint *other)
{
  LpCheckpoint *self;

  g_return_val_if_fail (LP_IS_CHECKPOINT (other), NULL);

  self = lp_checkpoint_new ();
  lp_checkpoint_copy_metadata (self, other);
  lp_checkpoint_set_adapter_config (self, other->adapter_config);
  lp_checkpoint_set_origin (self, other->origin);
  lp_checkpoint_inherit_sources (self, other);
  return self;
}

/**
 * lp_checkpoint_add_tensor:
 * @self: a checkpoint
 * @tensor: the tensor to append
 * @error: return location for a #GError
 *
 * Appends @tensor. Names are unique: a second tensor of the same name is an
 * error (%LP_FORMAT_ERROR_DUPLICATE), and so is the reserved `__metadata__`.
 *
 * Returns: %TRUE if the tensor was added
 */
gboolean
lp_checkpoint_add_tensor (LpCheckpoint  *self,
                          LpTensor      *tensor,
                          GError       **error)
{
  const char *name;

  g_return_val_if_fail (LP_IS_CHECKPOINT (self), FALSE);
  g_return_val_if_fail (LP_IS_TENSOR (tensor), FALSE);

  name = lp_tensor_get_name (tensor);
  if (g_hash_table_contains (self->by_name, name))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_DUPLICATE,
                   "two tensors are named '%s'", name);
      return FALSE;
    }
  if (g_str_equal (name, "__metadata__"))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_DUPLICATE,
                   "a tensor may not be named '__metadata__'");
      return FALSE;
    }
  g_ptr_array_add (self->tensors, g_object_ref (tensor));
  g_hash_table_insert (self->by_name, (gpointer) name, tensor);
  return TRUE;
}

/**
 * lp_checkpoint_get_n_tensors:
 * @self: a checkpoint
 *
 * Returns: the number of tensors
 */
guint
lp_checkpoint_get_n_tensors (LpCheckpoint *self)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), 0);
  return self->tensors->len;
}

/**
 * lp_checkpoint_get_tensor:
 * @self: a checkpoint
 * @index: a position, less than lp_checkpoint_get_n_tensors()
 *
 * Returns: (transfer none): the tensor at @index
 */
LpTensor *
lp_checkpoint_get_tensor (LpCheckpoint *self,
                          guint         index)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);
  g_return_val_if_fail (index < self->tensors->len, NULL);
  return g_ptr_array_index (self->tensors, index);
}

/**
 * lp_checkpoint_lookup:
 * @self: a checkpoint
 * @name: a tensor name
 *
 * Returns: (transfer none) (nullable): the tensor called @name, or %NULL
 */
LpTensor *
lp_checkpoint_lookup (LpCheckpoint *self,
                      const char   *name)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);
  g_return_val_if_fail (name != NULL, NULL);
  return g_hash_table_lookup (self->by_name, name);
}

/**
 * lp_checkpoint_get_tensors:
 * @self: a checkpoint
 *
 * Returns: (transfer container) (element-type LpTensor): the tensors, in order
 */
GPtrArray *
lp_checkpoint_get_tensors (LpCheckpoint *self)
{
  GPtrArray *out;

  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);

  out = g_ptr_array_new_full (self->tensors->len, g_object_unref);
  for (guint i = 0; i < self->tensors->len; i++)
    g_ptr_array_add (out, g_object_ref (g_ptr_array_index (self->tensors, i)));
  return out;
}

/**
 * lp_checkpoint_get_n_bytes:
 * @self: a checkpoint
 *
 * Returns: the total size of the tensors' data
 */
guint64
lp_checkpoint_get_n_bytes (LpCheckpoint *self)
{
  guint64 total = 0;

  g_return_val_if_fail (LP_IS_CHECKPOINT (self), 0);

  for (guint i = 0; i < self->tensors->len; i++)
    total += lp_tensor_get_n_bytes (g_ptr_array_index (self->tensors, i));
  return total;
}

/**
 * lp_checkpoint_set_metadata:
 * @self: a checkpoint
 * @key: a metadata key
 * @value: (nullable): its value, or %NULL to remove the key
 *
 * Sets one string of the file's `__metadata__`. A new key goes last.
 */
void
lp_checkpoint_set_metadata (LpCheckpoint *self,
                            const char   *key,
                            const char   *value)
{
  g_return_if_fail (LP_IS_CHECKPOINT (self));
  g_return_if_fail (key != NULL);

  if (value == NULL)
    {
      for (guint i = 0; i < self->meta_keys->len; i++)
        if (g_str_equal (g_ptr_array_index (self->meta_keys, i), key))
          {
            g_hash_table_remove (self->metadata, key);
            g_ptr_array_remove_index (self->meta_keys, i);
            break;
          }
      return;
    }

  if (!g_hash_table_contains (self->metadata, key))
    {
      char *k = g_strdup (key);
      g_ptr_array_add (self->meta_keys, k);
      g_hash_table_insert (self->metadata, k, g_strdup (value));
    }
  else
    {
      char *k = NULL;
      g_hash_table_lookup_extended (self->metadata, key, (gpointer *) &k, NULL);
      g_hash_table_insert (self->metadata, k, g_strdup (value));
    }
}

/**
 * lp_checkpoint_get_metadata:
 * @self: a checkpoint
 * @key: a metadata key
 *
 * Returns: (nullable): the value of @key, or %NULL
 */
const char *
lp_checkpoint_get_metadata (LpCheckpoint *self,
                            const char   *key)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);
  g_return_val_if_fail (key != NULL, NULL);
  return g_hash_table_lookup (self->metadata, key);
}

/**
 * lp_checkpoint_dup_metadata_keys:
 * @self: a checkpoint
 *
 * Returns: (transfer full): the metadata keys, in order
 */
GStrv
lp_checkpoint_dup_metadata_keys (LpCheckpoint *self)
{
  GStrv keys;

  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);

  keys = g_new0 (char *, self->meta_keys->len + 1);
  for (guint i = 0; i < self->meta_keys->len; i++)
    keys[i] = g_strdup (g_ptr_array_index (self->meta_keys, i));
  return keys;
}

/**
 * lp_checkpoint_copy_metadata:
 * @self: a checkpoint
 * @from: the checkpoint to copy from
 *
 * Sets every metadata key of @from on @self, in @from's order.
 */
void
lp_checkpoint_copy_metadata (LpCheckpoint *self,
                             LpCheckpoint *from)
{
  g_return_if_fail (LP_IS_CHECKPOINT (self));
  g_return_if_fail (LP_IS_CHECKPOINT (from));

  for (guint i = 0; i < from->meta_keys->len; i++)
    {
      const char *key = g_ptr_array_index (from->meta_keys, i);
      lp_checkpoint_set_metadata (self, key, g_hash_table_lookup (from->metadata, key));
    }
}

/**
 * lp_checkpoint_set_adapter_config:
 * @self: a checkpoint
 * @json: (nullable): the text of a PEFT `adapter_config.json`, or %NULL
 *
 * Attaches the PEFT adapter configuration that travels beside the file.
 */
void
lp_checkpoint_set_adapter_config (LpCheckpoint *self,
                                  const char   *json)
{
  g_return_if_fail (LP_IS_CHECKPOINT (self));

  g_free (self->adapter_config);
  self->adapter_config = g_strdup (json);
}

/**
 * lp_checkpoint_get_adapter_config:
 * @self: a checkpoint
 *
 * Returns: (nullable): the text of the PEFT adapter configuration, or %NULL
 */
const char *
lp_checkpoint_get_adapter_config (LpCheckpoint *self)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);
  return self->adapter_config;
}

/**
 * lp_checkpoint_set_origin:
 * @self: a checkpoint
 * @origin: (nullable) (type filename): where the checkpoint came from
 *
 * Records the file (or stage) the checkpoint came from, for error messages.
 */
void
lp_checkpoint_set_origin (LpCheckpoint *self,
                          const char   *origin)
{
  g_return_if_fail (LP_IS_CHECKPOINT (self));

  g_free (self->origin);
  self->origin = g_strdup (origin);
}

/**
 * lp_checkpoint_get_origin:
 * @self: a checkpoint
 *
 * Returns: (nullable) (type filename): where the checkpoint came from
 */
const char *
lp_checkpoint_get_origin (LpCheckpoint *self)
{
  g_return_val_if_fail (LP_IS_CHECKPOINT (self), NULL);
  return self->origin;
}

/* ---- the input files behind the tensors (lp-private.h) ----------------- */

void
lp_checkpoint_add_source (LpCheckpoint *self,
                          LpSourceFile *source)
{
  if (self->sources == NULL)
    self->sources = g_ptr_array_new_with_free_func ((GDestroyNotify) lp_source_file_unref);
  /* A handful at most (a file, its shards, a merge's inputs). */
  for (guint i = 0; i < self->sources->len; i++)
    if (g_ptr_array_index (self->sources, i) == source)
      return;
  g_ptr_array_add (self->sources, lp_source_file_ref (source));
}

void
lp_checkpoint_inherit_sources (LpCheckpoint *self,
                               LpCheckpoint *from)
{
  if (from == NULL || from == self || from->sources == NULL)
    return;
  for (guint i = 0; i < from->sources->len; i++)
    lp_checkpoint_add_source (self, g_ptr_array_index (from->sources, i));
}

gboolean
lp_checkpoint_check_sources (LpCheckpoint  *self,
                             GError       **error)
{
  if (self->sources == NULL)
    return TRUE;
  for (guint i = 0; i < self->sources->len; i++)
    if (!lp_source_file_check (g_ptr_array_index (self->sources, i), error))
      return FALSE;
  return TRUE;
}

void
lp_checkpoint_explain_error (LpCheckpoint  *self,
                             GError       **error)
{
  g_autoptr(GError) cause = NULL;

  /* A cancelled run stays cancelled, and the check's own error (which may
   * name the tensor) stays as it is. */
  if (error == NULL || *error == NULL || g_error_matches (*error, G_IO_ERROR, G_IO_ERROR_CANCELLED)
      || g_error_matches (*error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_CHANGED))
    return;
  if (!lp_checkpoint_check_sources (self, &cause))
    {
      g_clear_error (error);
      g_propagate_error (error, g_steal_pointer (&cause));
    }
}
