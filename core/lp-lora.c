/* lp-lora.c: LoRA modules: pairing down and up factors for every key convention
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

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

struct _LpLoraModule
{
  GObject parent_instance;

  char *name;
  LpLoraConvention convention;
  LpTensor *down;
  LpTensor *up;
  LpTensor *alpha;      /* kohya only, may be NULL */
  guint rank;
  guint64 in_features;  /* flattened: in · kh · kw */
  guint64 out_features;
  double scale;
  double alpha_value;   /* scale = alpha_value / rank (PEFT rslora: / √rank) */
  char *peft_key;       /* PEFT: the module's name in the base model */
};

G_DEFINE_FINAL_TYPE (LpLoraModule, lp_lora_module, G_TYPE_OBJECT)

static void
lp_lora_module_dispose (GObject *object)
{
  LpLoraModule *self = LP_LORA_MODULE (object);

  g_clear_object (&self->down);
  g_clear_object (&self->up);
  g_clear_object (&self->alpha);

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
 * lp_lora_module_get_down:
 * @self: a module
 *
 * Returns: (transfer none): the down factor A, `[r, in]` or `[r, in, kh, kw]`
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
 * Returns: (transfer none): the up factor B, `[out, r]` or `[out, r, 1, 1]`
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
  return self->alpha != NULL ? self->scale : 1.0;
}

/**
 * lp_lora_module_new_alpha:
 * @self: a module
 * @new_rank: the rank the module is reduced to
 *
 * Makes the `.alpha` tensor a reduced module writes in place of its old one:
 * same name, dtype and shape, value @new_rank, so that its scale is 1 once
 * lp_lora_module_get_fold_scale() has been folded into the new factors.
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
  float value = new_rank;
  LpTensor *alpha;

  g_return_val_if_fail (LP_IS_LORA_MODULE (self), NULL);
  g_return_val_if_fail (new_rank > 0, NULL);

  if (self->alpha == NULL)
    return NULL;

  shape = lp_tensor_get_shape (self->alpha, &n_dims);
  alpha = lp_tensor_new_from_f32 (lp_tensor_get_name (self->alpha),
                                  lp_tensor_get_dtype (self->alpha),
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
  return lp_tensor_get_n_dims (self->down) == 4;
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

typedef struct {
  const char *family;
  const char *down_suffix;
  const char *up_suffix;
  LpLoraConvention convention;
} Suffixes;

/* Checked in order; no suffix of one ends another, so the order only matters
 * for readability. lora_A/lora_B turns PEFT when the checkpoint has a config. */
static const Suffixes builtin_suffixes[] = {
  { "PEFT or diffusers", ".lora_A.weight", ".lora_B.weight", LP_LORA_CONVENTION_DIFFUSERS },
  { "old diffusers", ".lora.down.weight", ".lora.up.weight", LP_LORA_CONVENTION_DIFFUSERS_OLD },
  { "diffusers attention processor", "_lora.down.weight", "_lora.up.weight",
    LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR },
  { "kohya/LoCon", ".lora_down.weight", ".lora_up.weight", LP_LORA_CONVENTION_KOHYA },
  { "cloneofsimo", ":down", ":up", LP_LORA_CONVENTION_CLONEOFSIMO },
};

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

/* The module @name's PEFT `(.*\.)?(KEY)$` matching, as PEFT's get_pattern_key:
 * the first key of @patterns (in file order) that matches wins. */
static JsonNode *
peft_pattern_lookup (JsonObject *patterns,
                     const char *key)
{
  g_autoptr(GList) members = NULL;

  if (patterns == NULL)
    return NULL;

  members = json_object_get_members (patterns);
  for (GList *l = members; l != NULL; l = l->next)
    {
      const char *pattern_key = l->data;
      g_autofree char *source = g_strdup_printf ("^(.*\\.)?(%s)$", pattern_key);
      g_autoptr(GRegex) regex = g_regex_new (source, G_REGEX_DOLLAR_ENDONLY, 0, NULL);
      gboolean hit;

      if (regex != NULL)
        hit = g_regex_match (regex, key, 0, NULL);
      else
        {
          /* Not a regular expression: match it as literal text. */
          gsize klen = strlen (key), plen = strlen (pattern_key);
          hit = g_str_equal (key, pattern_key)
                || (klen > plen && g_str_has_suffix (key, pattern_key)
                    && key[klen - plen - 1] == '.');
        }
      if (hit)
        return json_object_get_member (patterns, pattern_key);
    }
  return NULL;
}

typedef struct {
  JsonParser *parser;
  double r;
  double lora_alpha;
  gboolean use_rslora;
  JsonObject *rank_pattern;
  JsonObject *alpha_pattern;
} PeftConfig;

static void
peft_config_clear (PeftConfig *config)
{
  g_clear_object (&config->parser);
}

static gboolean
json_get_number (JsonNode *node,
                 double   *value)
{
  GType type;

  if (node == NULL || !JSON_NODE_HOLDS_VALUE (node))
    return FALSE;
  type = json_node_get_value_type (node);
  if (type == G_TYPE_INT64)
    *value = json_node_get_int (node);
  else if (type == G_TYPE_DOUBLE)
    *value = json_node_get_double (node);
  else
    return FALSE;
  return TRUE;
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC (PeftConfig, peft_config_clear)

/* PEFT's LoraConfig defaults: r = 8, lora_alpha = 8, use_rslora = false. */
static gboolean
peft_config_parse (PeftConfig  *config,
                   const char  *json,
                   GError     **error)
{
  g_autoptr(GError) local_error = NULL;
  JsonNode *root, *node;
  JsonObject *object;

  config->r = 8;
  config->lora_alpha = 8;
  config->parser = json_parser_new ();
  if (!json_parser_load_from_data (config->parser, json, -1, &local_error))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "adapter_config.json: %s", local_error->message);
      return FALSE;
    }
  root = json_parser_get_root (config->parser);
  if (root == NULL || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: not a JSON object");
      return FALSE;
    }
  object = json_node_get_object (root);

  node = json_object_get_member (object, "r");
  if (node != NULL && (!json_get_number (node, &config->r) || config->r < 1
                       || config->r != floor (config->r)))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: \"r\" must be a positive integer");
      return FALSE;
    }
  node = json_object_get_member (object, "lora_alpha");
  if (node != NULL && (!json_get_number (node, &config->lora_alpha)
                       || !isfinite (config->lora_alpha)))
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "adapter_config.json: \"lora_alpha\" must be a number");
      return FALSE;
    }
  node = json_object_get_member (object, "use_rslora");
  if (node != NULL && JSON_NODE_HOLDS_VALUE (node)
      && json_node_get_value_type (node) == G_TYPE_BOOLEAN)
    config->use_rslora = json_node_get_boolean (node);

  for (guint i = 0; i < 2; i++)
    {
      const char *key = i == 0 ? "rank_pattern" : "alpha_pattern";
      JsonObject **pattern = i == 0 ? &config->rank_pattern : &config->alpha_pattern;

      node = json_object_get_member (object, key);
      if (node == NULL || JSON_NODE_HOLDS_NULL (node))
        continue;
      if (!JSON_NODE_HOLDS_OBJECT (node))
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "adapter_config.json: \"%s\" must be an object", key);
          return FALSE;
        }
      *pattern = json_node_get_object (node);
    }
  return TRUE;
}

/* The module's r and alpha in @config. */
static gboolean
peft_config_lookup (PeftConfig  *config,
                    const char  *module,
                    const char  *key,
                    double      *r,
                    double      *alpha,
                    GError     **error)
{
  JsonNode *node;

  *r = config->r;
  *alpha = config->lora_alpha;

  node = peft_pattern_lookup (config->rank_pattern, key);
  if (node != NULL && (!json_get_number (node, r) || *r < 1 || *r != floor (*r)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json: its rank_pattern entry is not "
                   "a positive integer", module);
      return FALSE;
    }
  node = peft_pattern_lookup (config->alpha_pattern, key);
  if (node != NULL && (!json_get_number (node, alpha) || !isfinite (*alpha)))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: adapter_config.json: its alpha_pattern entry is not "
                   "a number", module);
      return FALSE;
    }
  return TRUE;
}

typedef struct {
  char *name;
  LpLoraConvention convention;
  LpTensor *down;
  LpTensor *up;
} Pending;

static void
pending_free (Pending *pending)
{
  g_free (pending->name);
  g_free (pending);
}

/* Which factor of which module @name is, if any. */
static gboolean
classify (const char            *name,
          const CustomPatterns  *custom,
          char                 **module,
          gboolean              *is_up,
          LpLoraConvention      *convention)
{
  if (custom != NULL)
    {
      for (guint i = 0; i < 2; i++)
        {
          g_autofree char *key = pattern_match (i == 0 ? &custom->down : &custom->up, name);

          if (key != NULL)
            {
              *module = g_strconcat (custom->name_prefix, key, custom->name_suffix, NULL);
              *is_up = i == 1;
              *convention = LP_LORA_CONVENTION_CUSTOM;
              return TRUE;
            }
        }
    }

  for (guint i = 0; i < G_N_ELEMENTS (builtin_suffixes); i++)
    {
      for (guint j = 0; j < 2; j++)
        {
          const char *suffix = j == 0 ? builtin_suffixes[i].down_suffix
                                      : builtin_suffixes[i].up_suffix;
          gsize len = strlen (name), slen = strlen (suffix);

          if (len > slen && g_str_has_suffix (name, suffix))
            {
              *module = g_strndup (name, len - slen);
              *is_up = j == 1;
              *convention = builtin_suffixes[i].convention;
              return TRUE;
            }
        }
    }
  return FALSE;
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

static LpLoraModule *
module_new (Pending       *pending,
            LpCheckpoint  *checkpoint,
            PeftConfig    *peft,
            GError       **error)
{
  g_autoptr(LpLoraModule) module = NULL;
  const char *name = pending->name;
  LpTensor *down = pending->down, *up = pending->up;
  guint64 rank, up_rank;

  if (down == NULL || up == NULL)
    {
      LpTensor *have = down != NULL ? down : up;
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: %s factor %s has no matching %s factor",
                   name, down != NULL ? "down" : "up", lp_tensor_get_name (have),
                   down != NULL ? "up" : "down");
      return NULL;
    }
  if (!check_factor (name, down, error) || !check_factor (name, up, error))
    return NULL;
  if (lp_tensor_get_n_dims (down) != lp_tensor_get_n_dims (up))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: down factor %s is %u-D but up factor %s is %u-D",
                   name, lp_tensor_get_name (down), lp_tensor_get_n_dims (down),
                   lp_tensor_get_name (up), lp_tensor_get_n_dims (up));
      return NULL;
    }
  if (lp_tensor_get_n_dims (up) == 4
      && (lp_tensor_get_dim (up, 2) != 1 || lp_tensor_get_dim (up, 3) != 1))
    {
      g_autofree char *shape = lp_tensor_describe_shape (up);
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: up factor %s has shape %s; a conv up factor must "
                   "have a 1x1 kernel", name, lp_tensor_get_name (up), shape);
      return NULL;
    }

  rank = lp_tensor_get_dim (down, 0);
  up_rank = lp_tensor_get_dim (up, 1);
  if (rank != up_rank)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: inconsistent ranks: down factor %s has %" G_GUINT64_FORMAT
                   " rows but up factor %s has %" G_GUINT64_FORMAT " columns",
                   name, lp_tensor_get_name (down), rank, lp_tensor_get_name (up), up_rank);
      return NULL;
    }
  if (rank == 0 || rank > G_MAXUINT)
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                   "module %s: rank %" G_GUINT64_FORMAT " is not a usable rank",
                   name, rank);
      return NULL;
    }

  module = g_object_new (LP_TYPE_LORA_MODULE, NULL);
  module->name = g_strdup (name);
  module->convention = pending->convention;
  module->down = g_object_ref (down);
  module->up = g_object_ref (up);
  module->rank = rank;
  module->in_features = lp_tensor_get_n_elements (down) / rank;
  module->out_features = lp_tensor_get_dim (up, 0);
  module->alpha_value = rank;
  module->scale = 1.0;

  if (module->convention == LP_LORA_CONVENTION_DIFFUSERS && peft != NULL)
    {
      const char *key = name;
      double r, alpha;

      if (g_str_has_prefix (key, "base_model.model."))
        key += strlen ("base_model.model.");
      module->convention = LP_LORA_CONVENTION_PEFT;
      module->peft_key = g_strdup (key);
      if (!peft_config_lookup (peft, name, key, &r, &alpha, error))
        return NULL;
      if (r != rank)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: adapter_config.json gives rank %g but the factors "
                       "have rank %" G_GUINT64_FORMAT, name, r, rank);
          return NULL;
        }
      module->alpha_value = alpha;
      module->scale = peft->use_rslora ? alpha / sqrt (r) : alpha / r;
    }
  else if (module->convention == LP_LORA_CONVENTION_KOHYA)
    {
      g_autofree char *alpha_name = g_strconcat (name, ".alpha", NULL);
      g_autofree char *mid_name = g_strconcat (name, ".lora_mid.weight", NULL);
      LpTensor *alpha = lp_checkpoint_lookup (checkpoint, alpha_name);

      /* A Tucker (LoCon "cp") module is down, mid and up; pairing only down
       * and up would silently change it. */
      if (lp_checkpoint_lookup (checkpoint, mid_name) != NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: Tucker-decomposed modules (%s) are not supported",
                       name, mid_name);
          return NULL;
        }
      if (alpha != NULL)
        {
          g_autofree double *value = NULL;
          gsize n_values = 0;

          if (lp_tensor_get_n_elements (alpha) != 1 || lp_tensor_get_n_dims (alpha) > 1)
            {
              g_autofree char *shape = lp_tensor_describe_shape (alpha);
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: alpha %s has shape %s; it must hold one number "
                           "(shape [] or [1])", name, alpha_name, shape);
              return NULL;
            }
          if (!lp_dtype_is_float (lp_tensor_get_dtype (alpha))
              || !lp_dtype_can_convert (lp_tensor_get_dtype (alpha)))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                           "module %s: alpha %s has dtype %s; it must be a float "
                           "(F32, F16, BF16 or F64)", name, alpha_name,
                           lp_dtype_to_string (lp_tensor_get_dtype (alpha)));
              return NULL;
            }
          value = lp_tensor_dup_f64 (alpha, &n_values, error);
          if (value == NULL)
            return NULL;
          if (!isfinite (value[0]))
            {
              g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_NUMERIC,
                           "module %s: alpha %s is %g", name, alpha_name, value[0]);
              return NULL;
            }
          module->alpha = g_object_ref (alpha);
          module->alpha_value = value[0];
          module->scale = value[0] / rank;
        }
    }

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

/**
 * lp_lora_find_modules:
 * @checkpoint: a LoRA checkpoint
 * @down_pattern: (nullable): a custom down factor key with one `*`, e.g. `w_a_*`
 * @up_pattern: (nullable): the matching up factor key, e.g. `w_b_*`
 * @others: (out) (optional) (transfer container) (element-type LpTensor): the
 *   tensors that are neither factors nor the `.alpha` of a kohya module, in
 *   checkpoint order
 * @error: return location for a #GError
 *
 * Pairs the down and up factors of every LoRA module of @checkpoint. The
 * conventions (see #LpLoraConvention):
 *
 * - `X.lora_A.weight`/`X.lora_B.weight`: PEFT when the checkpoint has an
 *   adapter config (scale `lora_alpha / r`, `use_rslora`, `rank_pattern` and
 *   `alpha_pattern` as PEFT reads them), else diffusers (scale 1);
 * - `X.lora.down.weight`/`X.lora.up.weight` and `X_lora.down.weight`/
 *   `X_lora.up.weight` (old diffusers and attention processors): scale 1;
 * - `X.lora_down.weight`/`X.lora_up.weight` with an optional 0-dim or `[1]`
 *   `X.alpha` (kohya, ComfyUI, LoCon): scale `alpha / r`, 1 without alpha;
 * - `P:N:down`/`P:N:up` (cloneofsimo): scale 1;
 * - @down_pattern/@up_pattern, each with one `*` standing for the module key,
 *   tried before the others: scale 1.
 *
 * 4-D factors (LoCon: down `[r, in, kh, kw]`, up `[out, r, 1, 1]`) are
 * flattened: lp_lora_module_get_in_features() is `in · kh · kw`.
 *
 * Errors (%LP_STAGE_ERROR_INVALID_INPUT, naming the module): a factor without
 * its partner, down rows that differ from up columns, factors that are not
 * 2-D or 4-D or of a dtype lpipe cannot compute on, an alpha that is not one
 * float, a PEFT rank that differs from the adapter config's. Patterns without
 * exactly one `*`, or only one of them, give %LP_STAGE_ERROR_INVALID_PROPERTY.
 * NaN and infinities in the factors are left for the stages to find when they
 * read the data.
 *
 * Returns: (transfer container) (element-type LpLoraModule): the modules, in the
 *   order of their first factor in @checkpoint (possibly none)
 */
GPtrArray *
lp_lora_find_modules (LpCheckpoint  *checkpoint,
                      const char    *down_pattern,
                      const char    *up_pattern,
                      GPtrArray    **others,
                      GError       **error)
{
  g_auto(CustomPatterns) custom = { { NULL, }, };
  g_auto(PeftConfig) peft = { NULL, };
  g_autoptr(GPtrArray) pendings = NULL;
  g_autoptr(GHashTable) by_name = NULL;
  g_autoptr(GHashTable) used = NULL;
  g_autoptr(GPtrArray) modules = NULL;
  gboolean have_custom = down_pattern != NULL || up_pattern != NULL;
  const char *adapter_config;
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

  adapter_config = lp_checkpoint_get_adapter_config (checkpoint);
  if (adapter_config != NULL && !peft_config_parse (&peft, adapter_config, error))
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
      LpLoraConvention convention;
      gboolean is_up;
      Pending *pending;
      LpTensor **slot;

      if (!classify (tname, have_custom ? &custom : NULL, &name, &is_up, &convention))
        continue;

      pending = g_hash_table_lookup (by_name, name);
      if (pending == NULL)
        {
          pending = g_new0 (Pending, 1);
          pending->name = g_steal_pointer (&name);
          pending->convention = convention;
          g_ptr_array_add (pendings, pending);
          g_hash_table_insert (by_name, pending->name, pending);
        }
      else if (pending->convention != convention)
        {
          LpTensor *first = pending->down != NULL ? pending->down : pending->up;
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: factors %s and %s follow different conventions",
                       pending->name, lp_tensor_get_name (first), tname);
          return NULL;
        }

      slot = is_up ? &pending->up : &pending->down;
      if (*slot != NULL)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: two %s factors, %s and %s", pending->name,
                       is_up ? "up" : "down", lp_tensor_get_name (*slot), tname);
          return NULL;
        }
      *slot = tensor;
    }

  modules = g_ptr_array_new_full (pendings->len, g_object_unref);
  for (guint i = 0; i < pendings->len; i++)
    {
      LpLoraModule *module = module_new (g_ptr_array_index (pendings, i), checkpoint,
                                         adapter_config != NULL ? &peft : NULL, error);
      if (module == NULL)
        return NULL;
      g_hash_table_add (used, module->down);
      g_hash_table_add (used, module->up);
      if (module->alpha != NULL)
        g_hash_table_add (used, module->alpha);
      g_ptr_array_add (modules, module);
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

/* Parts of adapters lpipe does not reduce, by a piece of their key: LyCORIS
 * (LoHa `.hada_w1_a`, LoKr `.lokr_w1`, OFT/BOFT `.oft_blocks`, full `.diff`,
 * norm `.w_norm`/`.b_norm`, GLoRA `.a1.weight`), DoRA (kohya `dora_scale`,
 * PEFT `lora_magnitude_vector`), mlx-lm (`.lora_a`), PEFT's embedding LoRA,
 * IA3 and VeRA. A file holding them and no module is an adapter lpipe would
 * otherwise pass through untouched. */
static const char *const foreign_adapter_parts[] = {
  ".hada_", ".lokr_", ".oft_", ".diff", ".w_norm", ".b_norm", ".a1.weight",
  "dora_scale", "lora_magnitude_vector", ".lora_a", ".lora_b", "lora_embedding_",
  ".ia3_", "vera_lambda",
};

static gboolean
looks_like_adapter_part (const char *name)
{
  for (guint i = 0; i < G_N_ELEMENTS (foreign_adapter_parts); i++)
    if (strstr (name, foreign_adapter_parts[i]) != NULL)
      return TRUE;
  return FALSE;
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
 * lp_lora_find_modules() for a stage that works on LoRA modules and has
 * nothing to do without one: a checkpoint with no module is an error
 * (%LP_STAGE_ERROR_INVALID_INPUT) that names the conventions looked for and,
 * when some tensors look like parts of an adapter lpipe does not know
 * (LyCORIS, DoRA, mlx-lm, ...), the first few of them, so that such a file
 * is never passed through as if it had been worked on.
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
  g_autoptr(GPtrArray) modules = NULL;
  g_autoptr(GString) message = NULL;
  guint n_tensors, n_foreign = 0;

  modules = lp_lora_find_modules (checkpoint, down_pattern, up_pattern, others, error);
  if (modules == NULL || modules->len > 0)
    return g_steal_pointer (&modules);

  if (others != NULL)
    g_clear_pointer (others, g_ptr_array_unref);

  n_tensors = lp_checkpoint_get_n_tensors (checkpoint);
  message = g_string_new (NULL);
  g_string_append_printf (message, "no LoRA module among the %u tensors; looked for ", n_tensors);
  if (down_pattern != NULL && up_pattern != NULL)
    g_string_append_printf (message, "custom (%s / %s), ", down_pattern, up_pattern);
  for (guint i = 0; i < G_N_ELEMENTS (builtin_suffixes); i++)
    g_string_append_printf (message, "%s%s (*%s / *%s)",
                            i == 0 ? "" : i + 1 == G_N_ELEMENTS (builtin_suffixes) ? " and " : ", ",
                            builtin_suffixes[i].family, builtin_suffixes[i].down_suffix,
                            builtin_suffixes[i].up_suffix);

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
  return NULL;
}

/* The adapter config of a reduced PEFT checkpoint */

static gboolean
nearly_equal (double a,
              double b)
{
  return fabs (a - b) <= 1e-12 * MAX (fabs (a), fabs (b));
}

/* lora_alpha is an int in PEFT's LoraConfig; write one when it is whole. */
static void
set_number (JsonObject *object,
            const char *key,
            double      value)
{
  if (value == floor (value) && fabs (value) < 1e15)
    json_object_set_int_member (object, key, (gint64) value);
  else
    json_object_set_double_member (object, key, value);
}

/**
 * lp_lora_peft_pattern_key:
 * @module_key: a module's name in the base model, as
 *   lp_lora_module_get_peft_key() gives it
 *
 * The `rank_pattern` / `alpha_pattern` key that selects exactly this module.
 * PEFT's `get_pattern_key` (peft/utils/other.py) matches a key K against a
 * module name with `re.match(r"(.*\.)?(K)$", name)`: the escaped name alone
 * would also select every module whose name ends with `.` and it
 * (`proj_out` selects `blocks.0.proj_out`). A leading `^` inside the group
 * only matches at the start of the name, so `(.*\.)?` must match nothing and
 * the key matches the one module of that exact name.
 *
 * Returns: (transfer full): `^` and the module name, regex-escaped
 */
char *
lp_lora_peft_pattern_key (const char *module_key)
{
  g_autofree char *escaped = NULL;

  g_return_val_if_fail (module_key != NULL, NULL);
  escaped = g_regex_escape_string (module_key, -1);
  return g_strconcat ("^", escaped, NULL);
}

/**
 * lp_lora_update_adapter_config:
 * @json: the text of the input's `adapter_config.json`
 * @modules: (element-type LpLoraModule): the modules, as lp_lora_find_modules()
 *   found them with this config
 * @new_ranks: (array): the new rank of each of @modules
 * @error: return location for a #GError
 *
 * Rewrites a PEFT adapter config for factors of new ranks so that every
 * module's scale stays what it was: module m, reduced from rank r_m to k_m,
 * gets alpha `alpha_m · k_m / r_m` (`alpha_m · √(k_m / r_m)` with
 * `use_rslora`). The factors are written without folding any scale into them.
 *
 * `r` becomes the most common new rank (ties go to the one reached first in
 * @modules), `lora_alpha` the old `lora_alpha` scaled the same way, and
 * `rank_pattern` and `alpha_pattern` are rebuilt to hold exactly the modules
 * that differ from those, keyed by lp_lora_peft_pattern_key() (PEFT matches
 * `(.*\.)?(key)$` and takes the first key that matches, so old, broader keys
 * are not kept, and each new key selects exactly one module). Modules of other
 * conventions are skipped. Other members are kept, in their order.
 *
 * Returns: (transfer full): the new JSON text, or %NULL with @error set
 */
char *
lp_lora_update_adapter_config (const char  *json,
                               GPtrArray   *modules,
                               const guint *new_ranks,
                               GError     **error)
{
  g_auto(PeftConfig) config = { NULL, };
  g_autoptr(GHashTable) counts = NULL;
  g_autoptr(JsonGenerator) generator = NULL;
  JsonObject *root, *rank_pattern, *alpha_pattern;
  guint best_rank = 0, best_count = 0;
  double new_alpha;

  g_return_val_if_fail (json != NULL, NULL);
  g_return_val_if_fail (modules != NULL, NULL);
  g_return_val_if_fail (modules->len == 0 || new_ranks != NULL, NULL);
  g_return_val_if_fail (error == NULL || *error == NULL, NULL);

  if (!peft_config_parse (&config, json, error))
    return NULL;
  root = json_node_get_object (json_parser_get_root (config.parser));

  counts = g_hash_table_new (NULL, NULL);
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      guint count;

      if (module->convention != LP_LORA_CONVENTION_PEFT)
        continue;
      if (new_ranks[i] == 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: new rank 0", module->name);
          return NULL;
        }
      count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (new_ranks[i]))) + 1;
      g_hash_table_insert (counts, GUINT_TO_POINTER (new_ranks[i]), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best_count = count;
          best_rank = new_ranks[i];
        }
    }
  if (best_count == 0)
    best_rank = config.r;

  new_alpha = config.use_rslora ? config.lora_alpha * sqrt (best_rank / config.r)
                                : config.lora_alpha * best_rank / config.r;

  rank_pattern = json_object_new ();
  alpha_pattern = json_object_new ();
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      g_autofree char *key = NULL;
      double k, alpha;

      if (module->convention != LP_LORA_CONVENTION_PEFT)
        continue;
      k = new_ranks[i];
      alpha = config.use_rslora ? module->alpha_value * sqrt (k / module->rank)
                                : module->alpha_value * k / module->rank;
      key = lp_lora_peft_pattern_key (module->peft_key);
      if (new_ranks[i] != best_rank)
        json_object_set_int_member (rank_pattern, key, new_ranks[i]);
      if (!nearly_equal (alpha, new_alpha))
        set_number (alpha_pattern, key, alpha);
    }

  json_object_set_int_member (root, "r", best_rank);
  set_number (root, "lora_alpha", new_alpha);
  json_object_set_object_member (root, "rank_pattern", rank_pattern);
  json_object_set_object_member (root, "alpha_pattern", alpha_pattern);

  generator = json_generator_new ();
  json_generator_set_pretty (generator, TRUE);
  json_generator_set_indent (generator, 2);
  json_generator_set_root (generator, json_parser_get_root (config.parser));
  return json_generator_to_data (generator, NULL);
}
