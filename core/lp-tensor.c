/* lp-tensor.c: a named, typed, shaped block of data, possibly computed on demand
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

#include <string.h>

/**
 * LpTensor:
 *
 * One tensor of a checkpoint: a name, an #LpDtype, a shape and its bytes.
 *
 * A tensor never changes once made. Its bytes are either held (a #GBytes,
 * often a zero-copy slice of a mapped file) or computed on demand by an
 * #LpTensorDataFunc: a lazy tensor costs no memory until somebody asks for
 * its data, and lp_tensor_dup_data() never caches, so whoever consumes a
 * checkpoint decides how much of it is in memory at once.
 */

/* What a lazy tensor shares with the tensors renamed from it. */
typedef struct {
  gatomicrefcount ref;
  LpTensorDataFunc func;
  gpointer user_data;
  GDestroyNotify notify;
} LazySource;

struct _LpTensor
{
  GObject parent_instance;

  char *name;
  LpDtype dtype;
  guint n_dims;
  guint64 shape[LP_TENSOR_MAX_DIMS];
  guint64 n_elements;
  guint64 n_bytes;

  GBytes *data;       /* held data, or NULL when lazy */
  LazySource *lazy;
  LpTensor *origin;   /* the tensor a lazy func is asked about (renames keep it) */
  gpointer group;     /* tensors computed together, see lp_tensor_set_compute_group() */
  char *producer;     /* GRefStrings: the stage that made the tensor, see lp_tensor_set_producer(), */
  char *producer_file;  /* and the file its input came from (or NULL) */
};

G_DEFINE_FINAL_TYPE (LpTensor, lp_tensor, G_TYPE_OBJECT)

enum {
  PROP_0,
  PROP_NAME,
  PROP_DTYPE,
  PROP_N_DIMS,
  PROP_N_BYTES,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static LazySource *
lazy_source_ref (LazySource *lazy)
{
  g_atomic_ref_count_inc (&lazy->ref);
  return lazy;
}

static void
lazy_source_unref (LazySource *lazy)
{
  if (g_atomic_ref_count_dec (&lazy->ref))
    {
      if (lazy->notify)
        lazy->notify (lazy->user_data);
      g_free (lazy);
    }
}

static void
lp_tensor_dispose (GObject *object)
{
  LpTensor *self = LP_TENSOR (object);

  g_clear_pointer (&self->data, g_bytes_unref);
  g_clear_object (&self->origin);
  g_clear_pointer (&self->lazy, lazy_source_unref);

  G_OBJECT_CLASS (lp_tensor_parent_class)->dispose (object);
}

static void
lp_tensor_finalize (GObject *object)
{
  LpTensor *self = LP_TENSOR (object);

  g_free (self->name);
  g_clear_pointer (&self->producer, g_ref_string_release);
  g_clear_pointer (&self->producer_file, g_ref_string_release);

  G_OBJECT_CLASS (lp_tensor_parent_class)->finalize (object);
}

static void
lp_tensor_get_property (GObject    *object,
                        guint       prop_id,
                        GValue     *value,
                        GParamSpec *pspec)
{
  LpTensor *self = LP_TENSOR (object);

  switch (prop_id)
    {
    case PROP_NAME:
      g_value_set_string (value, self->name);
      break;
    case PROP_DTYPE:
      g_value_set_enum (value, self->dtype);
      break;
    case PROP_N_DIMS:
      g_value_set_uint (value, self->n_dims);
      break;
    case PROP_N_BYTES:
      g_value_set_uint64 (value, self->n_bytes);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_tensor_class_init (LpTensorClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->dispose = lp_tensor_dispose;
  object_class->finalize = lp_tensor_finalize;
  object_class->get_property = lp_tensor_get_property;

  /**
   * LpTensor:name:
   *
   * The tensor's name, unique within its checkpoint.
   */
  properties[PROP_NAME] =
    g_param_spec_string ("name", NULL, NULL, NULL,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpTensor:dtype:
   *
   * The element type.
   */
  properties[PROP_DTYPE] =
    g_param_spec_enum ("dtype", NULL, NULL, LP_TYPE_DTYPE, LP_DTYPE_F32,
                       G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpTensor:n-dims:
   *
   * The number of dimensions (0 for a scalar).
   */
  properties[PROP_N_DIMS] =
    g_param_spec_uint ("n-dims", NULL, NULL, 0, LP_TENSOR_MAX_DIMS, 0,
                       G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);
  /**
   * LpTensor:n-bytes:
   *
   * The size of the tensor's data in bytes.
   */
  properties[PROP_N_BYTES] =
    g_param_spec_uint64 ("n-bytes", NULL, NULL, 0, G_MAXUINT64, 0,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);
}

static void
lp_tensor_init (LpTensor *self)
{
}

/* Sizes are checked here once so that nobody downstream has to worry about
 * overflow: a shape whose element count or byte size does not fit is refused. */
static LpTensor *
tensor_new_common (const char     *name,
                   LpDtype         dtype,
                   const guint64  *shape,
                   guint           n_dims,
                   GError        **error)
{
  LpTensor *self;
  guint64 n = 1;
  guint bits;

  g_return_val_if_fail (name != NULL, NULL);
  g_return_val_if_fail (n_dims == 0 || shape != NULL, NULL);
  g_return_val_if_fail ((guint) dtype < LP_DTYPE_N_TYPES, NULL);

  if (!g_utf8_validate (name, -1, NULL))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_ENCODING,
                   "tensor name is not valid UTF-8");
      return NULL;
    }
  if (n_dims > LP_TENSOR_MAX_DIMS)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                   "tensor '%s': %u dimensions, at most %d are supported",
                   name, n_dims, LP_TENSOR_MAX_DIMS);
      return NULL;
    }
  for (guint i = 0; i < n_dims; i++)
    {
      if (shape[i] != 0 && n > G_MAXUINT64 / shape[i])
        {
          g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                       "tensor '%s': the shape's element count overflows", name);
          return NULL;
        }
      n *= shape[i];
    }
  bits = lp_dtype_get_bits (dtype);
  if (n > G_MAXUINT64 / bits)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                   "tensor '%s': the byte size overflows", name);
      return NULL;
    }
  if ((n * bits) % 8 != 0)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                   "tensor '%s': %" G_GUINT64_FORMAT " elements of %s do not fill whole bytes",
                   name, n, lp_dtype_to_string (dtype));
      return NULL;
    }

  self = g_object_new (LP_TYPE_TENSOR, NULL);
  self->name = g_strdup (name);
  self->dtype = dtype;
  self->n_dims = n_dims;
  for (guint i = 0; i < n_dims; i++)
    self->shape[i] = shape[i];
  self->n_elements = n;
  self->n_bytes = n * bits / 8;
  return self;
}

/**
 * lp_tensor_new:
 * @name: the tensor's name
 * @dtype: the element type
 * @shape: (array length=n_dims): the size of each dimension
 * @n_dims: the number of dimensions (0 for a scalar)
 * @data: the bytes, exactly as many as the shape and dtype imply
 * @error: return location for a #GError
 *
 * Makes a tensor that holds @data (a reference is taken, no copy made).
 *
 * Returns: (transfer full): the tensor, or %NULL if @data has the wrong size
 */
LpTensor *
lp_tensor_new (const char     *name,
               LpDtype         dtype,
               const guint64  *shape,
               guint           n_dims,
               GBytes         *data,
               GError        **error)
{
  LpTensor *self;

  g_return_val_if_fail (data != NULL, NULL);

  self = tensor_new_common (name, dtype, shape, n_dims, error);
  if (self == NULL)
    return NULL;
  if (g_bytes_get_size (data) != self->n_bytes)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                   "tensor '%s': %" G_GSIZE_FORMAT " bytes given, its shape needs %" G_GUINT64_FORMAT,
                   name, g_bytes_get_size (data), self->n_bytes);
      g_object_unref (self);
      return NULL;
    }
  self->data = g_bytes_ref (data);
  return self;
}

/**
 * lp_tensor_new_lazy:
 * @name: the tensor's name
 * @dtype: the element type
 * @shape: (array length=n_dims): the size of each dimension
 * @n_dims: the number of dimensions
 * @func: (scope notified) (closure user_data) (destroy notify): computes the bytes
 * @user_data: data for @func
 * @notify: (nullable): frees @user_data when the tensor and its renames are gone
 * @error: return location for a #GError
 *
 * Makes a tensor whose bytes are computed by @func when they are asked for.
 * @func may run on any thread, several times, and must give the same bytes
 * each time.
 *
 * Returns: (transfer full): the tensor, or %NULL if the shape is impossible
 */
LpTensor *
lp_tensor_new_lazy (const char       *name,
                    LpDtype           dtype,
                    const guint64    *shape,
                    guint             n_dims,
                    LpTensorDataFunc  func,
                    gpointer          user_data,
                    GDestroyNotify    notify,
                    GError          **error)
{
  LpTensor *self;

  g_return_val_if_fail (func != NULL, NULL);

  self = tensor_new_common (name, dtype, shape, n_dims, error);
  if (self == NULL)
    {
      if (notify)
        notify (user_data);
      return NULL;
    }
  self->lazy = g_new0 (LazySource, 1);
  g_atomic_ref_count_init (&self->lazy->ref);
  self->lazy->func = func;
  self->lazy->user_data = user_data;
  self->lazy->notify = notify;
  return self;
}

/**
 * lp_tensor_set_compute_group:
 * @self: a lazy tensor, not yet added to a checkpoint
 * @group: (nullable): any pointer that tensors computed together share
 *
 * Says that @self is computed by the same work as its neighbours with the
 * same @group, such as the two factors of a LoRA module that one SVD gives.
 * lp_stage_pull_tensors() then hands a whole group to one worker, so that
 * two workers never wait for the same computation. A scheduling hint only:
 * the data does not depend on it.
 */
void
lp_tensor_set_compute_group (LpTensor *self,
                             gpointer  group)
{
  g_return_if_fail (LP_IS_TENSOR (self));
  self->group = group;
}

/**
 * lp_tensor_get_compute_group:
 * @self: a tensor
 *
 * Returns: (transfer none) (nullable): the group set with
 *   lp_tensor_set_compute_group()
 */
gpointer
lp_tensor_get_compute_group (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  return self->group;
}

/**
 * lp_tensor_new_from_f32:
 * @name: the tensor's name
 * @dtype: the element type to store, one that lp_dtype_can_convert() accepts
 * @shape: (array length=n_dims): the size of each dimension
 * @n_dims: the number of dimensions
 * @values: (array length=n_values): the values, row-major
 * @n_values: how many values; must match the shape
 * @error: return location for a #GError
 *
 * Makes a tensor from float values, rounding them to @dtype (to nearest even).
 *
 * Returns: (transfer full): the tensor, or %NULL on error
 */
LpTensor *
lp_tensor_new_from_f32 (const char     *name,
                        LpDtype         dtype,
                        const guint64  *shape,
                        guint           n_dims,
                        const float    *values,
                        gsize           n_values,
                        GError        **error)
{
  g_autoptr(LpTensor) probe = NULL;
  g_autoptr(GBytes) bytes = NULL;
  gpointer buf;

  probe = tensor_new_common (name, dtype, shape, n_dims, error);
  if (probe == NULL)
    return NULL;
  if (!lp_dtype_can_convert (dtype))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_UNSUPPORTED,
                   "tensor '%s': cannot convert floats to %s", name, lp_dtype_to_string (dtype));
      return NULL;
    }
  if (probe->n_elements != n_values)
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE,
                   "tensor '%s': %" G_GSIZE_FORMAT " values given, its shape holds %" G_GUINT64_FORMAT,
                   name, n_values, probe->n_elements);
      return NULL;
    }
  buf = lp_try_alloc (probe->n_bytes, 1, "its data", error);
  if (buf == NULL)
    {
      g_prefix_error (error, "tensor '%s': ", name);
      return NULL;
    }
  lp_dtype_from_f32 (dtype, values, buf, n_values);
  bytes = g_bytes_new_take (buf, probe->n_bytes);
  return lp_tensor_new (name, dtype, shape, n_dims, bytes, error);
}

/**
 * lp_tensor_new_renamed:
 * @tensor: a tensor
 * @name: the new name
 *
 * Makes a tensor with another name and the same dtype, shape and data (shared,
 * not copied; a lazy tensor stays lazy).
 *
 * Returns: (transfer full): the renamed tensor
 */
LpTensor *
lp_tensor_new_renamed (LpTensor   *tensor,
                       const char *name)
{
  LpTensor *self;

  g_return_val_if_fail (LP_IS_TENSOR (tensor), NULL);
  g_return_val_if_fail (name != NULL, NULL);

  self = tensor_new_common (name, tensor->dtype, tensor->shape, tensor->n_dims, NULL);
  g_return_val_if_fail (self != NULL, NULL);
  if (tensor->data)
    self->data = g_bytes_ref (tensor->data);
  else
    {
      self->lazy = lazy_source_ref (tensor->lazy);
      self->group = tensor->group;
      /* The func was promised the tensor it was made for. */
      self->origin = g_object_ref (tensor->origin ? tensor->origin : tensor);
      /* and a failure is the stage's that made the func, not the renamer's */
      lp_tensor_set_producer (self, tensor->producer, tensor->producer_file);
    }
  return self;
}

/**
 * lp_tensor_get_name:
 * @self: a tensor
 *
 * Returns: the tensor's name
 */
const char *
lp_tensor_get_name (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  return self->name;
}

/**
 * lp_tensor_get_dtype:
 * @self: a tensor
 *
 * Returns: the element type
 */
LpDtype
lp_tensor_get_dtype (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), LP_DTYPE_F32);
  return self->dtype;
}

/**
 * lp_tensor_get_n_dims:
 * @self: a tensor
 *
 * Returns: the number of dimensions, 0 for a scalar
 */
guint
lp_tensor_get_n_dims (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), 0);
  return self->n_dims;
}

/**
 * lp_tensor_get_shape:
 * @self: a tensor
 * @n_dims: (out) (optional): the number of dimensions
 *
 * Returns: (array length=n_dims) (transfer none): the size of each dimension
 */
const guint64 *
lp_tensor_get_shape (LpTensor *self,
                     guint    *n_dims)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  if (n_dims)
    *n_dims = self->n_dims;
  return self->shape;
}

/**
 * lp_tensor_get_dim:
 * @self: a tensor
 * @axis: a dimension, less than lp_tensor_get_n_dims()
 *
 * Returns: the size of dimension @axis
 */
guint64
lp_tensor_get_dim (LpTensor *self,
                   guint     axis)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), 0);
  g_return_val_if_fail (axis < self->n_dims, 0);
  return self->shape[axis];
}

/**
 * lp_tensor_get_n_elements:
 * @self: a tensor
 *
 * Returns: the number of elements (1 for a scalar)
 */
guint64
lp_tensor_get_n_elements (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), 0);
  return self->n_elements;
}

/**
 * lp_tensor_get_n_bytes:
 * @self: a tensor
 *
 * Returns: the size of the tensor's data in bytes
 */
guint64
lp_tensor_get_n_bytes (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), 0);
  return self->n_bytes;
}

/**
 * lp_tensor_is_lazy:
 * @self: a tensor
 *
 * Returns: %TRUE if the bytes are computed when asked for
 */
gboolean
lp_tensor_is_lazy (LpTensor *self)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), FALSE);
  return self->data == NULL;
}

/**
 * lp_tensor_describe_shape:
 * @self: a tensor
 *
 * Returns: (transfer full): the shape as text, like `[3072, 42]`
 */
char *
lp_tensor_describe_shape (LpTensor *self)
{
  GString *s;

  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);

  s = g_string_new ("[");
  for (guint i = 0; i < self->n_dims; i++)
    g_string_append_printf (s, "%s%" G_GUINT64_FORMAT, i ? ", " : "", self->shape[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

/**
 * lp_tensor_dup_data:
 * @self: a tensor
 * @error: return location for a #GError
 *
 * Gets the tensor's bytes, computing them if the tensor is lazy. Nothing is
 * cached: drop the reference as soon as you are done to keep memory low.
 * The bytes always start at an address aligned for the dtype's elements.
 *
 * Returns: (transfer full): the bytes, or %NULL if computing them failed
 */
/* safetensors only recommends padding the header so that data starts 8-byte
 * aligned; a file that does not, or bytes handed in from a binding, may put
 * an f32 at an odd address. Every consumer (BLAS, SIMD kernels, plain loads)
 * may assume alignment, so a misaligned tensor is copied here, one tensor at
 * a time, instead of being checked for in every kernel. */
static GBytes *
ensure_aligned (LpTensor  *self,
                GBytes    *bytes,
                GError   **error)
{
  gsize size;
  gconstpointer data = g_bytes_get_data (bytes, &size);
  guint element = MAX (lp_dtype_get_bits (self->dtype) / 8, 1);
  gpointer copy;

  if (size == 0 || (guintptr) data % element == 0)
    return bytes;

  copy = lp_try_alloc (size, 1, "an aligned copy of its data", error);
  if (copy != NULL)
    memcpy (copy, data, size);
  else
    g_prefix_error (error, "tensor '%s': ", self->name);
  g_bytes_unref (bytes);
  return copy ? g_bytes_new_take (copy, size) : NULL;
}

/* Set by lp_stage_run() on the tensors a stage returns: what a failure to
 * compute them is blamed on. The data is computed when a sink pulls it, so
 * without this the error would carry the sink's name, and no file. */
void
lp_tensor_set_producer (LpTensor   *self,
                        const char *stage,
                        const char *file)
{
  if (self->producer != NULL || stage == NULL)
    return;
  self->producer = g_ref_string_acquire ((char *) stage);
  if (file != NULL)
    self->producer_file = g_ref_string_acquire ((char *) file);
}

const char *
lp_tensor_get_producer (LpTensor *self)
{
  return self->producer;
}

/* A lazy func may compute other lazy tensors (a cast's input) on the same
 * thread: the innermost failure names its producer, and the tensors around
 * it pass that error on unprefixed. */
static _Thread_local guint compute_depth;
static _Thread_local const GError *attributed_error;

GBytes *
lp_tensor_dup_data (LpTensor  *self,
                    GError   **error)
{
  GBytes *bytes;
  GError *local_error = NULL;

  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);

  if (self->data)
    return ensure_aligned (self, g_bytes_ref (self->data), error);

  compute_depth++;
  bytes = self->lazy->func (self->origin ? self->origin : self, self->lazy->user_data, &local_error);
  compute_depth--;
  if (bytes == NULL)
    {
      if (local_error == NULL)
        g_set_error (&local_error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                     "tensor '%s': computing its data failed for no stated reason", self->name);
      if (self->producer != NULL && local_error != attributed_error)
        {
          /* Stages name the module or tensor themselves, a source the
           * file: each is added when the message lacks it (the CLI
           * escapes what it prints). */
          if (strstr (local_error->message, self->name) == NULL)
            g_prefix_error (&local_error, "tensor '%s': ", self->name);
          if (self->producer_file != NULL && strstr (local_error->message, self->producer_file) == NULL)
            g_prefix_error (&local_error, "%s: ", self->producer_file);
          g_prefix_error (&local_error, "%s: ", self->producer);
          attributed_error = local_error;
        }
      if (compute_depth == 0)
        attributed_error = NULL;
      g_propagate_error (error, local_error);
      return NULL;
    }
  if (compute_depth == 0)
    attributed_error = NULL;
  if (g_bytes_get_size (bytes) != self->n_bytes)
    {
      /* A programming error in a stage, but reported, not crashed on: the
       * user's output would otherwise be corrupt. */
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED,
                   "tensor '%s': computed %" G_GSIZE_FORMAT " bytes, its shape needs %" G_GUINT64_FORMAT,
                   self->name, g_bytes_get_size (bytes), self->n_bytes);
      g_bytes_unref (bytes);
      return NULL;
    }
  return ensure_aligned (self, bytes, error);
}

static gpointer
dup_converted (LpTensor  *self,
               gboolean   to_f64,
               gsize     *n_values,
               GError   **error)
{
  g_autoptr(GBytes) bytes = NULL;
  gpointer out;

  if (!lp_dtype_can_convert (self->dtype))
    {
      g_set_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_UNSUPPORTED,
                   "tensor '%s': %s values cannot be converted to floats",
                   self->name, lp_dtype_to_string (self->dtype));
      return NULL;
    }
  bytes = lp_tensor_dup_data (self, error);
  if (bytes == NULL)
    return NULL;

  out = lp_try_alloc (self->n_elements, to_f64 ? sizeof (double) : sizeof (float),
                      to_f64 ? "its values as f64" : "its values as f32", error);
  if (out == NULL)
    {
      g_prefix_error (error, "tensor '%s': ", self->name);
      return NULL;
    }
  if (to_f64)
    {
      lp_dtype_to_f64 (self->dtype, g_bytes_get_data (bytes, NULL), out, self->n_elements);
    }
  else
    {
      lp_dtype_to_f32 (self->dtype, g_bytes_get_data (bytes, NULL), out, self->n_elements);
    }
  if (n_values)
    *n_values = self->n_elements;
  return out;
}

/**
 * lp_tensor_dup_f32:
 * @self: a tensor of a dtype that lp_dtype_can_convert() accepts
 * @n_values: (out): the number of values
 * @error: return location for a #GError
 *
 * Gets the tensor's values as floats, row-major.
 *
 * Returns: (array length=n_values) (transfer full): the values, free with g_free()
 */
float *
lp_tensor_dup_f32 (LpTensor  *self,
                   gsize     *n_values,
                   GError   **error)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  return dup_converted (self, FALSE, n_values, error);
}

/**
 * lp_tensor_dup_f64:
 * @self: a tensor of a dtype that lp_dtype_can_convert() accepts
 * @n_values: (out): the number of values
 * @error: return location for a #GError
 *
 * Gets the tensor's values as doubles, row-major.
 *
 * Returns: (array length=n_values) (transfer full): the values, free with g_free()
 */
double *
lp_tensor_dup_f64 (LpTensor  *self,
                   gsize     *n_values,
                   GError   **error)
{
  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  return dup_converted (self, TRUE, n_values, error);
}

/**
 * lp_tensor_dup_f32_bytes:
 * @self: a tensor of a dtype that lp_dtype_can_convert() accepts
 * @error: return location for a #GError
 *
 * Gets the tensor's values as native-endian floats, row-major, like
 * lp_tensor_dup_f32(), but in a #GBytes: language bindings turn an array of
 * floats into a list element by element, while bytes go straight into
 * `numpy.frombuffer()` or a JavaScript `Float32Array`.
 *
 * Returns: (transfer full): lp_tensor_get_n_elements() floats, or %NULL with
 *   @error set
 */
GBytes *
lp_tensor_dup_f32_bytes (LpTensor  *self,
                         GError   **error)
{
  gsize n_values = 0;
  float *values;

  g_return_val_if_fail (LP_IS_TENSOR (self), NULL);
  values = dup_converted (self, FALSE, &n_values, error);
  if (values == NULL)
    return NULL;
  return g_bytes_new_take (values, n_values * sizeof (float));
}
