/* lp-lora.c: LoRA modules: pairing down and up factors for every key convention
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lora-families/lp-lora-family.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraModule:
 *
 * One LoRA module of a checkpoint: a down factor A (`[r, in]`, or
 * `[r, in, kh, kw]` for a LoCon conv module), an up factor B (`[out, r]` or
 * `[out, r, 1, 1]`), an optional kohya `.alpha` tensor and the scale, so that
 * the module's update is `delta W = scale · B @ A` with A flattened to
 * `[r, in·kh·kw]`.
 *
 * Modules are found by lp_lora_find_modules(), the one place that knows how
 * LoRA files name their factors and where they keep the scale. A module never
 * changes once made.
 *
 * ## Scale through a rank change
 *
 * A stage that reduces a module from rank r to rank k must keep
 * `scale · B @ A` unchanged. The rule, the same for every convention:
 *
 * 1. multiply `B @ A` by lp_lora_module_get_fold_scale() before reducing
 *    (that is `alpha / r` for a kohya module that stores an `.alpha` tensor,
 *    and 1 for every other module);
 * 2. write the new factors; for a kohya module that had an `.alpha` tensor,
 *    write lp_lora_module_new_alpha() (alpha = k, so the new scale is 1)
 *    in its place; a kohya module without one keeps having none (missing
 *    alpha means alpha = rank, scale 1);
 * 3. for PEFT, fold nothing: the scale lives in `adapter_config.json`, which
 *    lp_lora_update_adapter_config() rewrites with the new ranks and a
 *    `lora_alpha` that keeps each module's scale `lora_alpha / r`
 *    (`lora_alpha / √r` with `use_rslora`) unchanged.
 *
 * Scaling both factors by the old scale would square it, a known bug of
 * published reduction scripts; fold it into the product once.
 */

G_DEFINE_FINAL_TYPE (LpLoraModule, lp_lora_module, G_TYPE_OBJECT)

static void
lp_lora_module_dispose (GObject *object)
{
  LpLoraModule *self = LP_LORA_MODULE (object);

  g_clear_object (&self->down);
  g_clear_object (&self->up);
  g_clear_object (&self->alpha);
  g_clear_object (&self->magnitude);
  g_clear_pointer (&self->parts, g_hash_table_unref);

  G_OBJECT_CLASS (lp_lora_module_parent_class)->dispose (object);
}

static void
lp_lora_module_finalize (GObject *object)
{
  LpLoraModule *self = LP_LORA_MODULE (object);

  g_free (self->name);
  g_free (self->peft_key);

  G_OBJECT_CLASS (lp_lora_module_parent_class)->finalize (object);
}

static void
lp_lora_module_class_init (LpLoraModuleClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->dispose = lp_lora_module_dispose;
  object_class->finalize = lp_lora_module_finalize;
}

static void
lp_lora_module_init (LpLoraModule *self)
{
  self->scale = 1.0;
}

/**
 * lp_lora_module_get_name:
 * @self: a module
 *
 * The module's name: the factors' keys without the convention's suffix, e.g.
 * `transformer.single_transformer_blocks.0.attn.to_q`, `lora_unet_..._to_q`,
 * `unet:0` or, for custom patterns `w_a_*`/`w_b_*`, `w_000` (the patterns'
 * common prefix, the `*` part and their common suffix).
 *
 * Returns: (transfer none): the name, used in every message about the module
 */
const char *
lp_lora_module_get_name (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->name;
}

/**
 * lp_lora_module_get_convention:
 * @self: a module
 *
 * Returns: how the module's factors are named
 */
LpLoraConvention
lp_lora_module_get_convention (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), LP_LORA_CONVENTION_CUSTOM);
  return self->convention;
}

/**
 * lp_lora_module_get_family:
 * @self: a module
 *
 * The family the module's keys belong to, one of the table of
 * docs/architecture.md: `peft`, `diffusers`, `diffusers-old`,
 * `diffusers-processor`, `kohya`, `cloneofsimo`, `mlx`, `loha`, `lokr` or
 * `custom`. A module with a DoRA magnitude keeps its family; see
 * lp_lora_module_is_dora().
 *
 * Returns: (transfer none): the family's name
 */
const char *
lp_lora_module_get_family (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->family->name;
}

/**
 * lp_lora_module_get_part:
 * @self: a module
 * @part: a part name: the family's key suffix without its leading `.` or
 *   `:`, e.g. `lora_down.weight`, `alpha`, `lora_a`, `hada_w1_a`,
 *   `lokr_w2_b`, `dora_scale`
 *
 * The tensor the checkpoint stores for one part of the module, in the
 * family's own layout (an mlx `lora_a` is `[in, r]`, unlike
 * lp_lora_module_get_down()).
 *
 * Returns: (transfer none) (nullable): the part, or %NULL when the module
 *   has none of that name
 */
LpTensor *
lp_lora_module_get_part (LpLoraModule *self,
                         const char   *part)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  g_return_val_if_fail (part != NULL, NULL);
  return g_hash_table_lookup (self->parts, part);
}

static int
tensor_name_compare (gconstpointer a,
                     gconstpointer b)
{
  return strcmp (lp_tensor_get_name (*(LpTensor **) a), lp_tensor_get_name (*(LpTensor **) b));
}

/**
 * lp_lora_module_get_tensors:
 * @self: a module
 *
 * Every tensor the checkpoint stores for the module, of any family: its
 * factors or LyCORIS parts as stored (not the views of
 * lp_lora_module_get_down()), its alpha and a DoRA magnitude, sorted by
 * name. What a stage keeps or drops with the module.
 *
 * Returns: (transfer container) (element-type LpTensor): the tensors
 */
GPtrArray *
lp_lora_module_get_tensors (LpLoraModule *self)
{
  GPtrArray *tensors;
  GHashTableIter iter;
  gpointer value;

  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  tensors = g_ptr_array_new_with_free_func (g_object_unref);
  g_hash_table_iter_init (&iter, self->parts);
  while (g_hash_table_iter_next (&iter, NULL, &value))
    g_ptr_array_add (tensors, g_object_ref (value));
  if (self->alpha != NULL && !g_ptr_array_find (tensors, self->alpha, NULL))
    g_ptr_array_add (tensors, g_object_ref (self->alpha));
  if (self->magnitude != NULL && !g_ptr_array_find (tensors, self->magnitude, NULL))
    g_ptr_array_add (tensors, g_object_ref (self->magnitude));
  g_ptr_array_sort (tensors, tensor_name_compare);
  return tensors;
}

/**
 * lp_lora_module_is_plain:
 * @self: a module
 *
 * Whether the module's update is one product `scale · B @ A`. LyCORIS LoHa
 * and LoKr modules are not: they have no single down and up factor
 * (lp_lora_module_get_down() and lp_lora_module_get_up() return %NULL, the
 * rank is that of their parts, see lp_lora_module_get_part()), and only the
 * stages that know their structure accept them.
 *
 * Returns: %TRUE for a plain LoRA module
 */
gboolean
lp_lora_module_is_plain (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), FALSE);
  return self->family->layout != LP_LORA_LAYOUT_STRUCTURED;
}

/**
 * lp_lora_module_is_transposed:
 * @self: a module
 *
 * Whether the file stores the factors transposed against
 * lp_lora_module_get_down() and lp_lora_module_get_up(): mlx-lm's `lora_a`
 * `[in, r]` and `lora_b` `[r, out]`, whose update is
 * `scale · (lora_a @ lora_b)ᵀ`. The module's down and up are then
 * transposing views; a stage writes new factors through
 * lp_lora_module_to_stored_layout().
 *
 * Returns: %TRUE for a transposed module
 */
gboolean
lp_lora_module_is_transposed (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), FALSE);
  return self->family->layout == LP_LORA_LAYOUT_TRANSPOSED;
}

/**
 * lp_lora_module_is_dora:
 * @self: a module
 *
 * Whether the module carries a DoRA magnitude (kohya/LyCORIS `dora_scale`,
 * PEFT `lora_magnitude_vector`). The magnitude rescales each output row of
 * `W + scale · B @ A` to a learned norm, so it depends on the base weight:
 * a stage that changes B @ A cannot keep the module's effect without it.
 *
 * Returns: %TRUE for a DoRA module
 */
gboolean
lp_lora_module_is_dora (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), FALSE);
  return self->magnitude != NULL;
}

/**
 * lp_lora_module_get_dora_magnitude:
 * @self: a module
 *
 * The module's DoRA magnitude tensor (`.dora_scale`,
 * `.lora_magnitude_vector[.weight]`), if it has one.
 *
 * Returns: (transfer none) (nullable): the magnitude, or %NULL
 */
LpTensor *
lp_lora_module_get_dora_magnitude (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->magnitude;
}

/**
 * lp_lora_module_get_down:
 * @self: a module
 *
 * Returns: (transfer none) (nullable): the down factor A, `[r, in]` or
 *   `[r, in, kh, kw]` (for an mlx module a view of `lora_a` transposed), or
 *   %NULL for a module that is not plain (lp_lora_module_is_plain())
 */
LpTensor *
lp_lora_module_get_down (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->down;
}

/**
 * lp_lora_module_get_up:
 * @self: a module
 *
 * Returns: (transfer none) (nullable): the up factor B, `[out, r]` or
 *   `[out, r, 1, 1]` (for an mlx module a view of `lora_b` transposed), or
 *   %NULL for a module that is not plain
 */
LpTensor *
lp_lora_module_get_up (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->up;
}

/**
 * lp_lora_module_get_alpha:
 * @self: a module
 *
 * The kohya `<name>.alpha` tensor (0-dim or `[1]`), which is part of the
 * module and not of the "others" list of lp_lora_find_modules().
 *
 * Returns: (transfer none) (nullable): the alpha tensor, or %NULL when the
 *   module has none
 */
LpTensor *
lp_lora_module_get_alpha (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->alpha;
}

/**
 * lp_lora_module_get_rank:
 * @self: a module
 *
 * Returns: the rank r: rows of the down factor, columns of the up factor
 */
guint
lp_lora_module_get_rank (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 0);
  return self->rank;
}

/**
 * lp_lora_module_get_in_features:
 * @self: a module
 *
 * Returns: the columns of the down factor flattened to 2-D: `in`, or
 *   `in · kh · kw` for a conv module
 */
guint64
lp_lora_module_get_in_features (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 0);
  return self->in_features;
}

/**
 * lp_lora_module_get_out_features:
 * @self: a module
 *
 * Returns: the rows of the up factor
 */
guint64
lp_lora_module_get_out_features (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 0);
  return self->out_features;
}

/**
 * lp_lora_module_get_scale:
 * @self: a module
 *
 * The factor of the module's update `scale · B @ A`: `alpha / r` for kohya
 * (1 when the `.alpha` tensor is missing), `lora_alpha / r` for PEFT with
 * `rank_pattern`, `alpha_pattern` and `use_rslora` (`alpha / √r`) applied,
 * and 1 for the other conventions.
 *
 * Returns: the scale
 */
double
lp_lora_module_get_scale (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 1.0);
  return self->scale;
}

/**
 * lp_lora_module_get_alpha_value:
 * @self: a module
 *
 * The module's alpha: the kohya `.alpha` value, the PEFT `lora_alpha` (after
 * `alpha_pattern`), or the rank for a module whose convention has no alpha
 * (so that the scale is always this over the rank, or over √rank for rslora).
 *
 * Returns: the alpha
 */
double
lp_lora_module_get_alpha_value (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 0.0);
  return self->alpha_value;
}

/**
 * lp_lora_module_get_fold_scale:
 * @self: a module
 *
 * The factor a reducing stage multiplies `B @ A` by before it reduces the
 * rank, so that the factors it writes carry the scale that the old `.alpha`
 * tensor carried: `alpha / r` for a kohya module with an `.alpha` tensor
 * (which the stage replaces by lp_lora_module_new_alpha(), alpha = k, scale
 * 1), and 1 for every other module. PEFT modules keep their scale through
 * lp_lora_update_adapter_config() instead. See #LpLoraModule for the rule.
 *
 * Fold it into the product once; scaling both factors by it squares it.
 *
 * Returns: the factor to fold into `B @ A`
 */
double
lp_lora_module_get_fold_scale (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), 1.0);
  return self->fold_alpha ? self->scale : 1.0;
}

/**
 * lp_lora_module_new_alpha:
 * @self: a module
 * @new_rank: the rank the module is reduced to
 *
 * Makes the `.alpha` tensor a reduced module writes in place of its old one:
 * same name, dtype (f32 when that dtype cannot hold @new_rank exactly: a
 * bf16 alpha cannot hold 257) and shape, value @new_rank, so that its scale
 * is 1 once lp_lora_module_get_fold_scale() has been folded into the new
 * factors.
 *
 * Returns: (transfer full) (nullable): the new alpha tensor, or %NULL when the
 *   module had no alpha tensor (and must not get one)
 */
LpTensor *
lp_lora_module_new_alpha (LpLoraModule *self,
                          guint         new_rank)
{
  g_autoptr(GError) error = NULL;
  const guint64 *shape;
  guint n_dims;
  float value = new_rank, back = 0;
  guint8 stored[8];
  LpDtype dtype;
  LpTensor *alpha;

  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  g_return_val_if_fail (new_rank > 0, NULL);

  if (self->alpha == NULL)
    return NULL;

  /* The alpha's dtype must hold the rank exactly (a bf16 alpha holds
   * integers only up to 256, f16 up to 2048): else it is written in f32. */
  dtype = lp_tensor_get_dtype (self->alpha);
  lp_dtype_from_f32 (dtype, &value, stored, 1);
  lp_dtype_to_f32 (dtype, stored, &back, 1);
  if (back != value)
    dtype = LP_DTYPE_F32;

  shape = lp_tensor_get_shape (self->alpha, &n_dims);
  alpha = lp_tensor_new_from_f32 (lp_tensor_get_name (self->alpha), dtype,
                                  shape, n_dims, &value, 1, &error);
  /* The dtype and shape were checked when the module was found. */
  if (alpha == NULL)
    g_critical ("module %s: %s", self->name, error->message);
  return alpha;
}

/**
 * lp_lora_module_get_peft_key:
 * @self: a module
 *
 * The module's name in the base model, as PEFT's `rank_pattern` and
 * `alpha_pattern` match it: the name without `base_model.model.`.
 *
 * Returns: (transfer none) (nullable): the key, or %NULL when the module is
 *   not a PEFT one
 */
const char *
lp_lora_module_get_peft_key (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  return self->peft_key;
}

/**
 * lp_lora_module_is_conv:
 * @self: a module
 *
 * Returns: %TRUE if the factors are 4-D (a LoCon conv module)
 */
gboolean
lp_lora_module_is_conv (LpLoraModule *self)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), FALSE);
  return self->down != NULL && lp_tensor_get_n_dims (self->down) == 4;
}

/**
 * lp_lora_module_get_kernel_size:
 * @self: a module
 * @kernel_h: (out) (optional): the kernel height, 1 for a linear module
 * @kernel_w: (out) (optional): the kernel width, 1 for a linear module
 *
 * The kernel of a conv module's down factor `[r, in, kh, kw]`.
 */
void
lp_lora_module_get_kernel_size (LpLoraModule *self,
                                guint64      *kernel_h,
                                guint64      *kernel_w)
{
  gboolean conv;

  g_return_if_fail (LP_IS_LORA_MODULE (self));

  conv = lp_lora_module_is_conv (self);
  if (kernel_h)
    *kernel_h = conv ? lp_tensor_get_dim (self->down, 2) : 1;
  if (kernel_w)
    *kernel_w = conv ? lp_tensor_get_dim (self->down, 3) : 1;
}

/**
 * lp_lora_module_new_factor_shape:
 * @self: a module
 * @is_up: %TRUE for the up factor, %FALSE for the down factor
 * @new_rank: the rank of the new factor
 * @shape_out: (out caller-allocates) (array fixed-size=16): room for
 *   %LP_TENSOR_MAX_DIMS dimensions
 * @n_dims: (out): the number of dimensions written
 *
 * The shape of a factor with the layout of the module's own and another rank:
 * `[k, in]` or `[k, in, kh, kw]` for down, `[out, k]` or `[out, k, 1, 1]` for
 * up. A stage computes on the flattened `[k, in·kh·kw]` and writes the bytes
 * under this shape, which has the same row-major order.
 */
void
lp_lora_module_new_factor_shape (LpLoraModule *self,
                                 gboolean      is_up,
                                 guint         new_rank,
                                 guint64      *shape_out,
                                 guint        *n_dims)
{
  LpTensor *factor;
  const guint64 *shape;
  guint n;

  g_return_if_fail (LP_IS_LORA_MODULE (self));
  g_return_if_fail (shape_out != NULL);
  g_return_if_fail (n_dims != NULL);

  factor = is_up ? self->up : self->down;
  shape = lp_tensor_get_shape (factor, &n);
  memcpy (shape_out, shape, n * sizeof (guint64));
  shape_out[is_up ? 1 : 0] = new_rank;
  *n_dims = n;
}

/* Finding modules */

/* mlx-lm factors as the [r, in] and [out, r] views every stage computes on */

static GBytes *
transpose_data (LpTensor  *view,
                gpointer   user_data,
                GError   **error)
{
  LpTensor *stored = user_data;
  g_autoptr(GBytes) data = lp_tensor_dup_data (stored, error);
  guint64 rows = lp_tensor_get_dim (stored, 0), cols = lp_tensor_get_dim (stored, 1);
  gsize width = lp_dtype_get_bits (lp_tensor_get_dtype (stored)) / 8;
  const guint8 *in;
  guint8 *out;

  if (data == NULL)
    return NULL;
  out = lp_try_alloc (rows * cols, width, "its transpose", error);
  if (out == NULL)
    {
      g_prefix_error (error, "tensor '%s': ", lp_tensor_get_name (view));
      return NULL;
    }
  in = g_bytes_get_data (data, NULL);
  for (guint64 i = 0; i < rows; i++)
    for (guint64 j = 0; j < cols; j++)
      memcpy (out + (j * rows + i) * width, in + (i * cols + j) * width, width);
  return g_bytes_new_take (out, rows * cols * width);
}

/* A 2-D tensor's transpose, computed when read, under @name. */
static LpTensor *
transposed_view (const char  *name,
                 LpTensor    *tensor,
                 GError     **error)
{
  guint64 shape[2] = { lp_tensor_get_dim (tensor, 1), lp_tensor_get_dim (tensor, 0) };

  return lp_tensor_new_lazy (name, lp_tensor_get_dtype (tensor), shape, 2,
                             transpose_data, g_object_ref (tensor), g_object_unref, error);
}

/**
 * lp_lora_module_to_stored_layout:
 * @self: a plain module
 * @is_up: %TRUE for the up factor
 * @factor: a new factor in the `[k, in]` / `[out, k]` layout of
 *   lp_lora_module_get_down() and lp_lora_module_get_up()
 *
 * The tensor a stage writes for @factor: @factor itself for every family but
 * the transposed ones (mlx-lm), whose files get `lora_a` `[in, k]` and
 * `lora_b` `[k, out]`, computed when read.
 *
 * Returns: (transfer full): the factor in the module's stored layout
 */
LpTensor *
lp_lora_module_to_stored_layout (LpLoraModule *self,
                                 gboolean      is_up,
                                 LpTensor     *factor)
{
  g_autoptr(GError) error = NULL;
  LpTensor *stored;

  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  g_return_val_if_fail (LP_IS_TENSOR (factor), NULL);

  if (!lp_lora_module_is_transposed (self))
    return g_object_ref (factor);
  stored = transposed_view (lp_tensor_get_name (factor), factor, &error);
  /* a 2-D shape that was possible is possible transposed */
  if (stored == NULL)
    g_critical ("module %s: %s", self->name, error->message);
  return stored;
}

/**
 * lp_lora_module_get_stored_factor:
 * @self: a plain module
 * @is_up: %TRUE for the up factor
 *
 * Returns: (transfer none) (nullable): the checkpoint's own tensor for the
 *   down or up factor (for mlx `lora_a` `[in, r]` or `lora_b` `[r, out]`),
 *   the one a stage replaces; %NULL for a module that is not plain
 */
LpTensor *
lp_lora_module_get_stored_factor (LpLoraModule *self,
                                  gboolean      is_up)
{
  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);

  if (!lp_lora_module_is_plain (self))
    return NULL;
  for (guint i = 0; i < self->family->n_parts; i++)
    {
      const LpLoraPart *part = &self->family->parts[i];

      if (part->role == (is_up ? LP_LORA_ROLE_UP : LP_LORA_ROLE_DOWN))
        return g_hash_table_lookup (self->parts, part->suffix + 1);
    }
  /* custom patterns: the views are the stored tensors */
  return is_up ? self->up : self->down;
}

typedef struct {
  char *prefix;
  char *suffix;
} Pattern;

typedef struct {
  Pattern down;
  Pattern up;
  char *name_prefix;  /* common prefix of the two patterns' prefixes */
  char *name_suffix;  /* common suffix of their suffixes */
} CustomPatterns;

static gboolean
pattern_parse (const char  *text,
               const char  *property,
               Pattern     *pattern,
               GError     **error)
{
  const char *star = strchr (text, '*');

  if (star == NULL || strchr (star + 1, '*') != NULL)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "%s '%s' must hold exactly one '*' (the module key)",
                   property, text);
      return FALSE;
    }
  pattern->prefix = g_strndup (text, star - text);
  pattern->suffix = g_strdup (star + 1);
  return TRUE;
}

static void
custom_patterns_clear (CustomPatterns *custom)
{
  g_free (custom->down.prefix);
  g_free (custom->down.suffix);
  g_free (custom->up.prefix);
  g_free (custom->up.suffix);
  g_free (custom->name_prefix);
  g_free (custom->name_suffix);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (CustomPatterns, custom_patterns_clear)

/* The `*` part of @name, or NULL if @name does not match. */
static char *
pattern_match (const Pattern *pattern,
               const char    *name)
{
  gsize len = strlen (name);
  gsize pre = strlen (pattern->prefix);
  gsize suf = strlen (pattern->suffix);

  if (len <= pre + suf
      || strncmp (name, pattern->prefix, pre) != 0
      || strcmp (name + len - suf, pattern->suffix) != 0)
    return NULL;
  return g_strndup (name + pre, len - pre - suf);
}

typedef struct {
  char *name;
  const LpLoraFamily *family;
  LpTensor *first;
  GHashTable *parts;     /* part name -> LpTensor (borrowed) */
} Pending;

static void
pending_free (Pending *pending)
{
  g_free (pending->name);
  g_hash_table_unref (pending->parts);
  g_free (pending);
}

/* Which part of which module of which built-in family @name is, if any. */
static gboolean
classify_builtin (const char          *name,
                  char               **module,
                  const LpLoraFamily **family,
                  const LpLoraPart   **part)
{
  guint n_families;
  const LpLoraFamily *const *families = lp_lora_families_get (&n_families);
  gsize len = strlen (name);

  for (guint f = 0; f < n_families; f++)
    for (guint p = 0; p < families[f]->n_parts; p++)
      {
        const LpLoraPart *candidate = &families[f]->parts[p];
        gsize slen = strlen (candidate->suffix);

        if (candidate->attached || len <= slen || !g_str_has_suffix (name, candidate->suffix))
          continue;
        *module = g_strndup (name, len - slen);
        *family = families[f];
        *part = candidate;
        return TRUE;
      }
  return FALSE;
}

/* The custom patterns' down and up parts */
static const LpLoraPart custom_down = { "*down", LP_LORA_ROLE_DOWN, FALSE };
static const LpLoraPart custom_up = { "*up", LP_LORA_ROLE_UP, FALSE };

static gboolean
classify (const char            *name,
          const CustomPatterns  *custom,
          char                 **module,
          const LpLoraFamily   **family,
          const LpLoraPart     **part)
{
  if (custom != NULL)
    {
      for (guint i = 0; i < 2; i++)
        {
          g_autofree char *key = pattern_match (i == 0 ? &custom->down : &custom->up, name);

          if (key != NULL)
            {
              *module = g_strconcat (custom->name_prefix, key, custom->name_suffix, NULL);
              *family = &lp_lora_family_custom;
              *part = i == 0 ? &custom_down : &custom_up;
              return TRUE;
            }
        }
    }
  return classify_builtin (name, module, family, part);
}

static gboolean
check_factor (const char  *module,
              LpTensor    *factor,
              GError     **error)
{
  guint n_dims = lp_tensor_get_n_dims (factor);
  LpDtype dtype = lp_tensor_get_dtype (factor);

  if (n_dims != 2 && n_dims != 4)
    {
      g_autofree char *shape = lp_tensor_describe_shape (factor);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: factor %s has shape %s; LoRA factors are 2-D or 4-D",
                   module, lp_tensor_get_name (factor), shape);
      return FALSE;
    }
  if (!lp_dtype_can_convert (dtype))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: factor %s has dtype %s, which lpipe cannot compute on",
                   module, lp_tensor_get_name (factor), lp_dtype_to_string (dtype));
      return FALSE;
    }
  return TRUE;
}

/* The plain module's down and up (set from its parts by the finder, as
 * views for a transposed family): shapes that make one product B @ A. */
gboolean
lp_lora_module_check_plain (LpLoraModule  *module,
                            GError       **error)
{
  const char *name = module->name;
  LpTensor *down = module->down, *up = module->up;
  guint64 rank, up_rank;

  if (!check_factor (name, down, error) || !check_factor (name, up, error))
    return FALSE;
  if (lp_tensor_get_n_dims (down) != lp_tensor_get_n_dims (up))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: down factor %s is %u-D but up factor %s is %u-D",
                   name, lp_tensor_get_name (down), lp_tensor_get_n_dims (down),
                   lp_tensor_get_name (up), lp_tensor_get_n_dims (up));
      return FALSE;
    }
  if (lp_tensor_get_n_dims (up) == 4
      && (lp_tensor_get_dim (up, 2) != 1 || lp_tensor_get_dim (up, 3) != 1))
    {
      g_autofree char *shape = lp_tensor_describe_shape (up);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: up factor %s has shape %s; a conv up factor must "
                   "have a 1x1 kernel", name, lp_tensor_get_name (up), shape);
      return FALSE;
    }

  rank = lp_tensor_get_dim (down, 0);
  up_rank = lp_tensor_get_dim (up, 1);
  if (rank != up_rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: inconsistent ranks: down factor %s has %" G_GUINT64_FORMAT
                   " %s but up factor %s has %" G_GUINT64_FORMAT " %s",
                   name, lp_tensor_get_name (down), rank,
                   lp_lora_module_is_transposed (module) ? "columns" : "rows",
                   lp_tensor_get_name (up), up_rank,
                   lp_lora_module_is_transposed (module) ? "rows" : "columns");
      return FALSE;
    }
  if (rank == 0 || rank > G_MAXUINT)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: rank %" G_GUINT64_FORMAT " is not a usable rank",
                   name, rank);
      return FALSE;
    }

  module->rank = rank;
  module->in_features = lp_tensor_get_n_elements (down) / rank;
  module->out_features = lp_tensor_get_dim (up, 0);
  module->alpha_value = rank;
  module->scale = 1.0;
  return TRUE;
}

/* The module's `.alpha` part, if it has one: alpha and scale alpha / r,
 * folded into the factors through a rank change (kohya, LyCORIS). */
gboolean
lp_lora_module_read_alpha (LpLoraModule  *module,
                           GError       **error)
{
  LpTensor *alpha = lp_lora_module_get_part (module, "alpha");
  const char *name = module->name, *alpha_name;
  g_autofree double *value = NULL;
  gsize n_values = 0;

  if (alpha == NULL)
    return TRUE;
  alpha_name = lp_tensor_get_name (alpha);
  if (lp_tensor_get_n_elements (alpha) != 1 || lp_tensor_get_n_dims (alpha) > 1)
    {
      g_autofree char *shape = lp_tensor_describe_shape (alpha);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: alpha %s has shape %s; it must hold one number "
                   "(shape [] or [1])", name, alpha_name, shape);
      return FALSE;
    }
  if (!lp_dtype_is_float (lp_tensor_get_dtype (alpha))
      || !lp_dtype_can_convert (lp_tensor_get_dtype (alpha)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: alpha %s has dtype %s; it must be a float "
                   "(F32, F16, BF16 or F64)", name, alpha_name,
                   lp_dtype_to_string (lp_tensor_get_dtype (alpha)));
      return FALSE;
    }
  value = lp_tensor_dup_f64 (alpha, &n_values, error);
  if (value == NULL)
    return FALSE;
  if (!isfinite (value[0]))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                   "module %s: alpha %s is %g", name, alpha_name, value[0]);
      return FALSE;
    }
  module->alpha = g_object_ref (alpha);
  module->alpha_value = value[0];
  module->scale = value[0] / module->rank;
  module->fold_alpha = TRUE;
  return TRUE;
}

/* Adds @suffix's tensor beside the module, if the checkpoint has one. */
static LpTensor *
attach_part (LpLoraModule *module,
             LpCheckpoint *checkpoint,
             const char   *suffix)
{
  g_autofree char *key = g_strconcat (module->name, suffix, NULL);
  LpTensor *tensor = lp_checkpoint_lookup (checkpoint, key);

  if (tensor != NULL)
    g_hash_table_insert (module->parts, g_strdup (suffix + 1), g_object_ref (tensor));
  return tensor;
}

static LpLoraModule *
module_new (Pending       *pending,
            LpLoraFinder  *finder,
            GError       **error)
{
  g_autoptr(LpLoraModule) module = NULL;
  const LpLoraFamily *family = pending->family;
  GHashTableIter iter;
  gpointer key, value;

  module = g_object_new (LP_TYPE_LORA_MODULE, NULL);
  module->name = g_strdup (pending->name);
  module->family = family;
  module->convention = family->convention;
  module->parts = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_object_unref);
  g_hash_table_iter_init (&iter, pending->parts);
  while (g_hash_table_iter_next (&iter, &key, &value))
    g_hash_table_insert (module->parts, g_strdup (key), g_object_ref (value));

  for (guint i = 0; i < family->n_parts; i++)
    if (family->parts[i].attached)
      attach_part (module, finder->checkpoint, family->parts[i].suffix);
  for (guint i = 0; i < lp_lora_n_dora_parts && module->magnitude == NULL; i++)
    {
      LpTensor *magnitude = attach_part (module, finder->checkpoint, lp_lora_dora_parts[i].suffix);
      if (magnitude != NULL)
        module->magnitude = g_object_ref (magnitude);
    }

  if (family->layout != LP_LORA_LAYOUT_STRUCTURED)
    {
      LpTensor *down = NULL, *up = NULL;

      for (guint i = 0; i < family->n_parts; i++)
        if (family->parts[i].role != LP_LORA_ROLE_OTHER)
          {
            LpTensor *t = g_hash_table_lookup (pending->parts, family->parts[i].suffix + 1);
            if (family->parts[i].role == LP_LORA_ROLE_DOWN)
              down = t;
            else
              up = t;
          }
      if (family == &lp_lora_family_custom)
        {
          down = g_hash_table_lookup (pending->parts, custom_down.suffix + 1);
          up = g_hash_table_lookup (pending->parts, custom_up.suffix + 1);
        }
      if (down == NULL || up == NULL)
        {
          LpTensor *have = down != NULL ? down : up;
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: %s factor %s has no matching %s factor",
                       module->name, down != NULL ? "down" : "up", lp_tensor_get_name (have),
                       down != NULL ? "up" : "down");
          return NULL;
        }
      if (family->layout == LP_LORA_LAYOUT_TRANSPOSED)
        {
          if (lp_tensor_get_n_dims (down) != 2 || lp_tensor_get_n_dims (up) != 2)
            {
              LpTensor *bad = lp_tensor_get_n_dims (down) != 2 ? down : up;
              g_autofree char *shape = lp_tensor_describe_shape (bad);
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: factor %s has shape %s; %s factors are 2-D",
                           module->name, lp_tensor_get_name (bad), shape, family->title);
              return NULL;
            }
          module->down = transposed_view (lp_tensor_get_name (down), down, error);
          module->up = module->down ? transposed_view (lp_tensor_get_name (up), up, error) : NULL;
          if (module->up == NULL)
            return NULL;
        }
      else
        {
          module->down = g_object_ref (down);
          module->up = g_object_ref (up);
        }
      if (!lp_lora_module_check_plain (module, error))
        return NULL;
    }

  if (family->init_module != NULL && !family->init_module (module, finder, error))
    return NULL;
  return g_steal_pointer (&module);
}

static char *
common_prefix (const char *a,
               const char *b)
{
  gsize n = 0;

  while (a[n] != '\0' && a[n] == b[n])
    n++;
  return g_strndup (a, n);
}

static char *
common_suffix (const char *a,
               const char *b)
{
  gsize la = strlen (a), lb = strlen (b), n = 0;

  while (n < la && n < lb && a[la - 1 - n] == b[lb - 1 - n])
    n++;
  return g_strdup (a + la - n);
}

/* Custom patterns that pair the factors of a family with another layout
 * (`*.lora_a`/`*.lora_b` on an mlx-lm file) would compute on the wrong
 * shapes, silently so on square modules. */
static gboolean
check_custom_layout (LpLoraModule  *module,
                     GError       **error)
{
  for (guint i = 0; i < 2; i++)
    {
      LpTensor *factor = i == 0 ? module->down : module->up;
      g_autofree char *name = NULL;
      const LpLoraFamily *family;
      const LpLoraPart *part;

      if (classify_builtin (lp_tensor_get_name (factor), &name, &family, &part)
          && family->layout == LP_LORA_LAYOUT_TRANSPOSED)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "module %s: the down and up patterns pair %s factors (%s) as "
                       "down [r, in] and up [out, r], but %s stores them transposed; "
                       "drop down-pattern and up-pattern, lpipe recognises %s files",
                       module->name, family->title, lp_tensor_get_name (factor),
                       family->title, family->title);
          return FALSE;
        }
    }
  return TRUE;
}

static void
lp_lora_finder_clear (LpLoraFinder *finder)
{
  g_clear_object (&finder->config_parser);
  g_clear_object (&finder->lora_metadata_parser);
  if (finder->config_data != NULL)
    finder->config_data_free (finder->config_data);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (LpLoraFinder, lp_lora_finder_clear)

/* Reads the checkpoint's adapter_config.json and lets the family it belongs
 * to (mlx-lm's has `lora_parameters`, PEFT's the rest) parse it. */
static gboolean
lp_lora_finder_init (LpLoraFinder  *finder,
                     LpCheckpoint  *checkpoint,
                     GError       **error)
{
  g_autoptr(GError) local_error = NULL;
  const char *json = lp_checkpoint_get_adapter_config (checkpoint);
  guint n_families;
  const LpLoraFamily *const *families = lp_lora_families_get (&n_families);
  JsonNode *root;

  finder->checkpoint = checkpoint;
  if (json == NULL)
    return TRUE;

  finder->config_parser = json_parser_new ();
  if (!json_parser_load_from_data (finder->config_parser, json, -1, &local_error))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "adapter_config.json: %s", local_error->message);
      return FALSE;
    }
  root = json_parser_get_root (finder->config_parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: not a JSON object");
      return FALSE;
    }
  finder->config = json_node_get_object (root);

  for (guint i = 0; i < n_families; i++)
    {
      gboolean claimed = FALSE;

      if (families[i]->claim_config == NULL)
        continue;
      if (!families[i]->claim_config (finder, &claimed, error))
        return FALSE;
      if (claimed)
        {
          finder->config_family = families[i];
          break;
        }
    }
  return TRUE;
}

/* Parts of adapters no family of the table pairs, by a piece of their key:
 * LyCORIS OFT/BOFT `.oft_blocks`, full `.diff`, norm `.w_norm`/`.b_norm`,
 * GLoRA `.a1.weight`, PEFT's embedding LoRA, IA3 and VeRA, and DoRA
 * magnitudes with no module. A file holding them and no module is an
 * adapter lpipe would otherwise pass through untouched. */
static const char *const foreign_adapter_parts[] = {
  ".hada_", ".lokr_", ".oft_", ".diff", ".w_norm", ".b_norm", ".a1.weight",
  "dora_scale", "lora_magnitude_vector", "lora_embedding_", ".ia3_", "vera_lambda",
  ".lora_mid",
};

static gboolean
looks_like_adapter_part (const char *name)
{
  for (guint i = 0; i < G_N_ELEMENTS (foreign_adapter_parts); i++)
    if (strstr (name, foreign_adapter_parts[i]) != NULL)
      return TRUE;
  return FALSE;
}

/* "no LoRA module", the families looked for (from the table) and the first
 * few tensors that look like parts of adapters of other families. */
static void
set_no_module_error (LpCheckpoint          *checkpoint,
                     const CustomPatterns  *custom,
                     const char            *down_pattern,
                     const char            *up_pattern,
                     GError               **error)
{
  g_autoptr(GString) message = g_string_new (NULL);
  guint n_families, n_tensors = lp_checkpoint_get_n_tensors (checkpoint), n_foreign = 0;
  const LpLoraFamily *const *families = lp_lora_families_get (&n_families);
  gboolean first = TRUE;

  g_string_append_printf (message, "no LoRA module among the %u tensors; looked for ", n_tensors);
  if (custom != NULL)
    {
      g_string_append_printf (message, "custom (%s / %s)", down_pattern, up_pattern);
      first = FALSE;
    }
  for (guint f = 0; f < n_families; f++)
    {
      gboolean any = FALSE;

      for (guint p = 0; p < families[f]->n_parts; p++)
        {
          if (families[f]->parts[p].attached)
            continue;
          if (!any)
            g_string_append_printf (message, "%s%s (", first ? "" : ", ", families[f]->title);
          g_string_append_printf (message, "%s*%s", any ? " " : "", families[f]->parts[p].suffix);
          any = TRUE;
          first = FALSE;
        }
      if (any)
        g_string_append_c (message, ')');
    }

  for (guint i = 0; i < n_tensors; i++)
    {
      const char *name = lp_tensor_get_name (lp_checkpoint_get_tensor (checkpoint, i));

      if (!looks_like_adapter_part (name))
        continue;
      if (n_foreign < 3)
        g_string_append_printf (message, "%s%s", n_foreign == 0
                                ? "; these look like parts of an adapter family lpipe does not know: "
                                : ", ", name);
      n_foreign++;
    }
  if (n_foreign > 3)
    g_string_append_printf (message, " (%u such tensors in all)", n_foreign);

  g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT, message->str);
}

/* Refuses the modules @flags exclude, naming the first. */
static gboolean
check_flags (GPtrArray         *modules,
             LpLoraFindFlags    flags,
             GError           **error)
{
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);

      if ((flags & LP_LORA_FIND_PLAIN) && !lp_lora_module_is_plain (module))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: a %s module has no single down and up factor, and "
                       "this stage works on plain LoRA modules only",
                       module->name, module->family->title);
          return FALSE;
        }
      if ((flags & LP_LORA_FIND_STORED_LAYOUT) && lp_lora_module_is_transposed (module))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: %s stores its factors transposed (lora_a [in, r], "
                       "lora_b [r, out]), which this stage does not handle yet; "
                       "lora-svd and lora-project do", module->name, module->family->title);
          return FALSE;
        }
      if ((flags & LP_LORA_FIND_REFUSE_DORA) && module->magnitude != NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: DoRA magnitude %s: it rescales each row of the base "
                       "weight plus the update to a learned norm, so the module's effect "
                       "depends on the base weight, which this stage does not read; it is "
                       "refused rather than changed (lora-svd and lora-project take a "
                       "dora policy)",
                       module->name, lp_tensor_get_name (module->magnitude));
          return FALSE;
        }
    }
  return TRUE;
}

/**
 * lp_lora_find_modules_full:
 * @checkpoint: a LoRA checkpoint
 * @down_pattern: (nullable): a custom down factor key with one `*`, e.g. `w_a_*`
 * @up_pattern: (nullable): the matching up factor key, e.g. `w_b_*`
 * @flags: which modules the caller can work on, and whether it needs one
 * @others: (out) (optional) (transfer container) (element-type LpTensor): the
 *   tensors that are no part of a module (factors, `.alpha`, DoRA
 *   magnitudes, LoHa and LoKr parts), in checkpoint order
 * @error: return location for a #GError
 *
 * Finds every LoRA module of @checkpoint by the table of families (see
 * lp_lora_module_get_family() and docs/architecture.md):
 *
 * - `X.lora_A.weight`/`X.lora_B.weight`: PEFT when the checkpoint has a PEFT
 *   adapter config (scale `lora_alpha / r`, `use_rslora`, `rank_pattern` and
 *   `alpha_pattern` as PEFT reads them), else diffusers (scale 1);
 * - `X.lora.down.weight`/`X.lora.up.weight` and `X_lora.down.weight`/
 *   `X_lora.up.weight` (old diffusers and attention processors): scale 1;
 * - `X.lora_down.weight`/`X.lora_up.weight` with an optional 0-dim or `[1]`
 *   `X.alpha` (kohya, ComfyUI, LoCon): scale `alpha / r`, 1 without alpha;
 * - `P:N:down`/`P:N:up` (cloneofsimo): scale 1;
 * - `X.lora_a` `[in, r]`/`X.lora_b` `[r, out]` (mlx-lm): scale from its
 *   adapter_config.json `lora_parameters`;
 * - LyCORIS LoHa (`X.hada_w1_a` ...) and LoKr (`X.lokr_w1` ...), which are
 *   not plain (lp_lora_module_is_plain());
 * - @down_pattern/@up_pattern, each with one `*` standing for the module key,
 *   tried before the others: scale 1.
 *
 * 4-D factors (LoCon: down `[r, in, kh, kw]`, up `[out, r, 1, 1]`) are
 * flattened: lp_lora_module_get_in_features() is `in · kh · kw`.
 *
 * Errors (%LP_STAGE_ERROR_INVALID_INPUT, naming the module): a factor without
 * its partner, down rows that differ from up columns, factors that are not
 * 2-D or 4-D or of a dtype lpipe cannot compute on, an alpha that is not one
 * float, a PEFT rank that differs from the adapter config's, and the modules
 * @flags exclude; with %LP_LORA_FIND_REQUIRE_MODULES, no module at all (the
 * message names the families looked for and tensors that look like parts of
 * adapters of other families). Patterns without exactly one `*`, only one of
 * them, or patterns that pair factors of a transposed family give
 * %LP_STAGE_ERROR_INVALID_PROPERTY. NaN and infinities in the factors are
 * left for the stages to find when they read the data.
 *
 * Returns: (transfer container) (element-type LpLoraModule): the modules, in the
 *   order of their first part in @checkpoint, or %NULL with @error set
 */
GPtrArray *
lp_lora_find_modules_full (LpCheckpoint     *checkpoint,
                           const char       *down_pattern,
                           const char       *up_pattern,
                           LpLoraFindFlags   flags,
                           GPtrArray       **others,
                           GError          **error)
{
  g_auto(CustomPatterns) custom = { { NULL, }, };
  g_auto(LpLoraFinder) finder = { NULL, };
  g_autoptr(GPtrArray) pendings = NULL;
  g_autoptr(GHashTable) by_name = NULL;
  g_autoptr(GHashTable) used = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  gboolean have_custom = down_pattern != NULL || up_pattern != NULL;
  guint n_tensors;

  g_return_val_if_fail (LP_IS_CHECKPOINT (checkpoint), NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (have_custom)
    {
      if (down_pattern == NULL || up_pattern == NULL)
        {
          g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                               "a custom convention needs both a down and an up pattern");
          return NULL;
        }
      if (!pattern_parse (down_pattern, "down pattern", &custom.down, error)
          || !pattern_parse (up_pattern, "up pattern", &custom.up, error))
        return NULL;
      if (g_str_equal (down_pattern, up_pattern))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                       "the down and up patterns are both '%s'", down_pattern);
          return NULL;
        }
      custom.name_prefix = common_prefix (custom.down.prefix, custom.up.prefix);
      custom.name_suffix = common_suffix (custom.down.suffix, custom.up.suffix);
    }

  if (!lp_lora_finder_init (&finder, checkpoint, error))
    return NULL;

  pendings = g_ptr_array_new_with_free_func ((GDestroyNotify) pending_free);
  by_name = g_hash_table_new (g_str_hash, g_str_equal);
  used = g_hash_table_new (NULL, NULL);
  n_tensors = lp_checkpoint_get_n_tensors (checkpoint);

  for (guint i = 0; i < n_tensors; i++)
    {
      LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
      const char *tname = lp_tensor_get_name (tensor);
      g_autofree char *name = NULL;
      const LpLoraFamily *family;
      const LpLoraPart *part;
      LpTensor *previous;
      Pending *pending;

      if (!classify (tname, have_custom ? &custom : NULL, &name, &family, &part))
        continue;

      pending = g_hash_table_lookup (by_name, name);
      if (pending == NULL)
        {
          pending = g_new0 (Pending, 1);
          pending->name = g_steal_pointer (&name);
          pending->family = family;
          pending->first = tensor;
          pending->parts = g_hash_table_new (g_str_hash, g_str_equal);
          g_ptr_array_add (pendings, pending);
          g_hash_table_insert (by_name, pending->name, pending);
        }
      else if (pending->family != family)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: factors %s and %s follow different conventions (%s, %s)",
                       pending->name, lp_tensor_get_name (pending->first), tname,
                       pending->family->title, family->title);
          return NULL;
        }

      previous = g_hash_table_lookup (pending->parts, part->suffix + 1);
      if (previous != NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: two %s parts, %s and %s", pending->name,
                       part->role == LP_LORA_ROLE_DOWN ? "down"
                       : part->role == LP_LORA_ROLE_UP ? "up" : part->suffix + 1,
                       lp_tensor_get_name (previous), tname);
          return NULL;
        }
      g_hash_table_insert (pending->parts, (gpointer) (part->suffix + 1), tensor);
    }

  modules = g_ptr_array_new_full (pendings->len, g_object_unref);
  for (guint i = 0; i < pendings->len; i++)
    {
      LpLoraModule *module = module_new (g_ptr_array_index (pendings, i), &finder, error);
      GHashTableIter iter;
      gpointer part;

      if (module == NULL)
        return NULL;
      g_ptr_array_add (modules, module);
      if (module->family == &lp_lora_family_custom && !check_custom_layout (module, error))
        return NULL;
      g_hash_table_iter_init (&iter, module->parts);
      while (g_hash_table_iter_next (&iter, NULL, &part))
        g_hash_table_add (used, part);
    }

  if (!check_flags (modules, flags, error))
    return NULL;
  if ((flags & LP_LORA_FIND_REQUIRE_MODULES) && modules->len == 0)
    {
      set_no_module_error (checkpoint, have_custom ? &custom : NULL, down_pattern, up_pattern, error);
      return NULL;
    }

  if (others != NULL)
    {
      *others = g_ptr_array_new_with_free_func (g_object_unref);
      for (guint i = 0; i < n_tensors; i++)
        {
          LpTensor *tensor = lp_checkpoint_get_tensor (checkpoint, i);
          if (!g_hash_table_contains (used, tensor))
            g_ptr_array_add (*others, g_object_ref (tensor));
        }
    }

  return g_steal_pointer (&modules);
}

/**
 * lp_lora_find_modules:
 * @checkpoint: a LoRA checkpoint
 * @down_pattern: (nullable): a custom down factor key with one `*`, e.g. `w_a_*`
 * @up_pattern: (nullable): the matching up factor key, e.g. `w_b_*`
 * @others: (out) (optional) (transfer container) (element-type LpTensor): the
 *   tensors that are no part of a module, in checkpoint order
 * @error: return location for a #GError
 *
 * lp_lora_find_modules_full() with no flags: every module of every family,
 * possibly none.
 *
 * Returns: (transfer container) (element-type LpLoraModule): the modules, or
 *   %NULL with @error set
 */
GPtrArray *
lp_lora_find_modules (LpCheckpoint  *checkpoint,
                      const char    *down_pattern,
                      const char    *up_pattern,
                      GPtrArray    **others,
                      GError       **error)
{
  return lp_lora_find_modules_full (checkpoint, down_pattern, up_pattern,
                                    LP_LORA_FIND_NONE, others, error);
}

/**
 * lp_lora_find_modules_required:
 * @checkpoint: a LoRA checkpoint
 * @down_pattern: (nullable): a custom down factor key with one `*`
 * @up_pattern: (nullable): the matching up factor key
 * @others: (out) (optional) (transfer container) (element-type LpTensor): as
 *   for lp_lora_find_modules()
 * @error: return location for a #GError
 *
 * lp_lora_find_modules_full() for a stage that replaces plain factors by
 * their keys and has nothing to do without a module: at least one module, all
 * plain, in the stored layout and without a DoRA magnitude
 * (%LP_LORA_FIND_REQUIRED), so that no file is passed through as if it had
 * been worked on.
 *
 * Returns: (transfer container) (element-type LpLoraModule): the modules, at
 *   least one, or %NULL with @error set
 */
GPtrArray *
lp_lora_find_modules_required (LpCheckpoint  *checkpoint,
                               const char    *down_pattern,
                               const char    *up_pattern,
                               GPtrArray    **others,
                               GError       **error)
{
  return lp_lora_find_modules_full (checkpoint, down_pattern, up_pattern,
                                    LP_LORA_FIND_REQUIRED, others, error);
}
