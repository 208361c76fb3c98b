/* lp-cast.c: the `cast` stage, converting floating point tensors to one dtype
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-cast.h"

#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/**
 * LpCast:
 *
 * Converts the floating point tensors of a checkpoint to #LpCast:dtype,
 * rounding to nearest with ties to even (see lp_dtype_convert()). The output
 * is lazy: each tensor is converted when the sink asks for it, so memory
 * stays at a few tensors whatever the checkpoint's size.
 *
 * Tensors whose names match #LpCast:include (default: all) and none of
 * #LpCast:exclude are converted. Integer, bool and complex tensors, excluded
 * tensors and tensors already of the target dtype are passed on as they are.
 * A selected floating point tensor of a dtype lpipe cannot convert (F4, F6,
 * F8_E8M0, the FNUZ formats) is an error naming the tensor: exclude it to
 * carry it through.
 *
 * A finite value too large for the target would become ±inf (NaN for
 * F8_E4M3, which has no infinity): that is an error naming the tensor and
 * how many values, since a LoRA or model with infinities in it is broken
 * where it is loaded. With #LpCast:allow-overflow the values are written as
 * torch writes them, and each tensor where it happened is reported by a
 * warning on the `Lpipe-convert` log domain.
 */

struct _LpCast
{
  LpTransform parent_instance;

  LpDtype dtype;
  gboolean dtype_set;
  gboolean allow_overflow;
  GStrv include;
  GStrv exclude;
};

enum {
  PROP_0,
  PROP_DTYPE,
  PROP_INCLUDE,
  PROP_EXCLUDE,
  PROP_ALLOW_OVERFLOW,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpCast, lp_cast, LP_TYPE_TRANSFORM)

/* What a lazy output tensor needs to compute its bytes. */
typedef struct {
  LpTensor *source;
  LpDtype dtype;
  gboolean allow_overflow;
  char *stage;   /* "stage 2 'cast'" for warnings (errors are named by lp_tensor_dup_data ()) */
} CastData;

static void
cast_data_free (gpointer data)
{
  CastData *cast = data;

  g_object_unref (cast->source);
  g_free (cast->stage);
  g_free (cast);
}

/* Output buffers. A tensor's output is written once and dropped by the sink
 * soon after, so every buffer is memory the process has never touched. On
 * virtual machines each first touch of a 4 KiB page is a costly fault
 * (measured: ~5 ms per MiB, slower than the conversion and the write put
 * together); transparent huge pages take 512 times fewer faults. The memory
 * is unmapped when the sink drops it, so the peak stays what it was. */
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define HUGE_PAGE ((gsize) 2 << 20)

typedef struct {
  gpointer base;
  gsize length;
} MappedBuffer;

static void
mapped_buffer_free (gpointer data)
{
  MappedBuffer *buffer = data;

  munmap (buffer->base, buffer->length);
  g_free (buffer);
}

static gpointer
output_buffer_new (gsize          size,
                   GDestroyNotify *free_func,
                   gpointer       *free_data,
                   GError        **error)
{
  if (size >= 4 * HUGE_PAGE)
    {
      /* room to start at a huge page boundary */
      gsize length = size + HUGE_PAGE;
      guint8 *base = mmap (NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

      if (base != MAP_FAILED)
        {
          guint8 *start = (guint8 *) (((guintptr) base + HUGE_PAGE - 1) & ~(guintptr) (HUGE_PAGE - 1));
          MappedBuffer *buffer = g_new (MappedBuffer, 1);

          madvise (start, size, MADV_HUGEPAGE);
          buffer->base = base;
          buffer->length = length;
          *free_func = mapped_buffer_free;
          *free_data = buffer;
          return start;
        }
    }
  *free_func = g_free;
  *free_data = NULL;
  return lp_try_alloc (size, 1, "the converted data", error);
}
#else
static gpointer
output_buffer_new (gsize          size,
                   GDestroyNotify *free_func,
                   gpointer       *free_data,
                   GError        **error)
{
  *free_func = g_free;
  *free_data = NULL;
  return lp_try_alloc (size, 1, "the converted data", error);
}
#endif

static GBytes *
cast_tensor_data (LpTensor  *tensor,
                  gpointer   user_data,
                  GError   **error)
{
  CastData *cast = user_data;
  g_autoptr(GBytes) in = NULL;
  guint64 n = lp_tensor_get_n_elements (tensor);
  gsize n_bytes = lp_tensor_get_n_bytes (tensor);
  gpointer out;
  GDestroyNotify free_func;
  gpointer free_data;
  gsize overflow;

  in = lp_tensor_dup_data (cast->source, error);
  if (in == NULL)
    return NULL;

  out = output_buffer_new (n_bytes, &free_func, &free_data, error);
  if (out == NULL)
    {
      g_prefix_error (error, "tensor '%s': ", lp_tensor_get_name (tensor));
      return NULL;
    }
  overflow = lp_dtype_convert (lp_tensor_get_dtype (cast->source), g_bytes_get_data (in, NULL),
                               cast->dtype, out, n);
  if (overflow > 0 && !cast->allow_overflow)
    {
      /* bf16 has f32's range: the way to narrow values too big for f16 or
       * f8; past f32's range only f64 holds them. */
      gboolean to_bf16 = cast->dtype == LP_DTYPE_F16 || cast->dtype == LP_DTYPE_F8_E4M3
                         || cast->dtype == LP_DTYPE_F8_E5M2;

      free_func (free_data ? free_data : out);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "tensor '%s': %" G_GSIZE_FORMAT " of %" G_GUINT64_FORMAT
                   " values are too large for %s and would become %s; %s, "
                   "or set allow-overflow=true to write them so",
                   lp_tensor_get_name (tensor), overflow, n, lp_dtype_to_string (cast->dtype),
                   cast->dtype == LP_DTYPE_F8_E4M3 ? "NaN" : "inf",
                   to_bf16 ? "cast to bf16, which has f32's range"
                           : "keep them in a wider dtype (exclude the tensor)");
      return NULL;
    }
  if (overflow > 0)
    g_warning ("%s: tensor '%s': %" G_GSIZE_FORMAT " of %" G_GUINT64_FORMAT
               " values overflowed to %s in %s",
               cast->stage, lp_tensor_get_name (tensor), overflow, n,
               cast->dtype == LP_DTYPE_F8_E4M3 ? "NaN" : "inf",
               lp_dtype_to_string (cast->dtype));
  return g_bytes_new_with_free_func (out, n_bytes, free_func, free_data ? free_data : out);
}

static gboolean
lp_cast_check (LpCast  *self,
               GError **error)
{
  if (!self->dtype_set)
    {
      g_set_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_MISSING_PROPERTY,
                   "property 'dtype' is required");
      return FALSE;
    }
  return TRUE;
}

static gboolean
lp_cast_prepare (LpStage  *stage,
                 GError  **error)
{
  return lp_cast_check (LP_CAST (stage), error);
}

static LpCheckpoint *
lp_cast_transform (LpTransform   *transform,
                   LpCheckpoint  *input,
                   GError       **error)
{
  LpCast *self = LP_CAST (transform);
  g_autoptr(LpCheckpoint) output = NULL;
  g_autoptr(LpNameFilter) filter = NULL;
  guint n = lp_checkpoint_get_n_tensors (input);

  if (!lp_cast_check (self, error))
    return NULL;

  filter = lp_name_filter_new ((const char * const *) self->include,
                               (const char * const *) self->exclude);
  output = lp_checkpoint_new_like (input);

  for (guint i = 0; i < n; i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (input, i);
      const char *name = lp_tensor_get_name (tensor);
      LpDtype dtype = lp_tensor_get_dtype (tensor);
      g_autoptr(LpTensor) out = NULL;
      gboolean selected;

      selected = lp_name_filter_matches (filter, name);

      if (!selected || !lp_dtype_is_float (dtype) || dtype == self->dtype)
        out = g_object_ref (tensor);
      else if (!lp_dtype_can_convert (dtype))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "tensor '%s': cannot convert %s to %s; exclude it to pass it through unchanged",
                       name, lp_dtype_to_string (dtype), lp_dtype_to_string (self->dtype));
          return NULL;
        }
      else
        {
          CastData *cast = g_new0 (CastData, 1);
          const guint64 *shape;
          guint n_dims;

          cast->source = g_object_ref (tensor);
          cast->dtype = self->dtype;
          cast->allow_overflow = self->allow_overflow;
          cast->stage = lp_stage_describe (LP_STAGE (self));
          shape = lp_tensor_get_shape (tensor, &n_dims);
          out = lp_tensor_new_lazy (name, self->dtype, shape, n_dims,
                                    cast_tensor_data, cast, cast_data_free, error);
          if (out == NULL)
            return NULL;
        }

      if (!lp_checkpoint_add_tensor (output, out, error))
        return NULL;
    }

  return g_steal_pointer (&output);
}

static void
lp_cast_set_property (GObject      *object,
                      guint         prop_id,
                      const GValue *value,
                      GParamSpec   *pspec)
{
  LpCast *self = LP_CAST (object);

  switch (prop_id)
    {
    case PROP_DTYPE:
      self->dtype = g_value_get_enum (value);
      self->dtype_set = TRUE;
      break;
    case PROP_INCLUDE:
      g_strfreev (self->include);
      self->include = g_value_dup_boxed (value);
      break;
    case PROP_EXCLUDE:
      g_strfreev (self->exclude);
      self->exclude = g_value_dup_boxed (value);
      break;
    case PROP_ALLOW_OVERFLOW:
      self->allow_overflow = g_value_get_boolean (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_cast_get_property (GObject    *object,
                      guint       prop_id,
                      GValue     *value,
                      GParamSpec *pspec)
{
  LpCast *self = LP_CAST (object);

  switch (prop_id)
    {
    case PROP_DTYPE:
      g_value_set_enum (value, self->dtype);
      break;
    case PROP_INCLUDE:
      g_value_set_boxed (value, self->include);
      break;
    case PROP_EXCLUDE:
      g_value_set_boxed (value, self->exclude);
      break;
    case PROP_ALLOW_OVERFLOW:
      g_value_set_boolean (value, self->allow_overflow);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_cast_finalize (GObject *object)
{
  LpCast *self = LP_CAST (object);

  g_strfreev (self->include);
  g_strfreev (self->exclude);

  G_OBJECT_CLASS (lp_cast_parent_class)->finalize (object);
}

static void
lp_cast_class_init (LpCastClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);

  object_class->set_property = lp_cast_set_property;
  object_class->get_property = lp_cast_get_property;
  object_class->finalize = lp_cast_finalize;
  stage_class->prepare = lp_cast_prepare;
  transform_class->transform = lp_cast_transform;

  /**
   * LpCast:dtype:
   *
   * The dtype to convert floating point tensors to: only those lpipe
   * writes are offered. torch's and kohya's spellings (`float16`, `half`,
   * `fp16`, `bfloat16`, `float`, `fp32`, `double`) are read too.
   */
  properties[PROP_DTYPE] =
    g_param_spec_enum ("dtype", "Dtype",
                       "Target dtype (torch and kohya spellings such as float16, half, fp16, float are read too)",
                       LP_TYPE_FLOAT_DTYPE, LP_FLOAT_DTYPE_F32,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpCast:include:
   *
   * Glob patterns (`*` and `?`) of the tensor names to convert; none means all.
   */
  properties[PROP_INCLUDE] =
    g_param_spec_boxed ("include", "Include",
                        "Convert only tensors whose names match one of these globs (default: all)",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpCast:exclude:
   *
   * Glob patterns of tensor names to pass through unchanged.
   */
  properties[PROP_EXCLUDE] =
    g_param_spec_boxed ("exclude", "Exclude",
                        "Leave tensors whose names match one of these globs unchanged",
                        G_TYPE_STRV,
                        G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  /**
   * LpCast:allow-overflow:
   *
   * Write values too large for #LpCast:dtype as ±inf (NaN in f8-e4m3), as
   * torch does, with a warning, instead of failing.
   */
  properties[PROP_ALLOW_OVERFLOW] =
    g_param_spec_boolean ("allow-overflow", "Allow overflow",
                          "Write values too large for the dtype as inf (NaN in f8-e4m3) with a warning, instead of failing",
                          FALSE,
                          G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "cast", "Convert",
                               "Convert floating point tensors to another dtype, rounding to nearest even");
  lp_stage_class_set_property_required (stage_class, "dtype");
}

static void
lp_cast_init (LpCast *self)
{
  self->dtype = LP_DTYPE_F32;
}
