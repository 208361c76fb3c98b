/* lp-example-plugin.c: a plugin built outside lpipe's tree, with one stage
 *
 * `example-prefix` puts a prefix in front of every tensor name. The data is
 * never touched: lp_tensor_new_renamed() shares it, lazy or not.
 *
 * Build:  cc -shared -fPIC -o libexample.so lp-example-plugin.c \
 *           $(pkg-config --cflags --libs lpipe-1.0)
 */
#include <lpipe/lpipe-plugin.h>

#define EXAMPLE_TYPE_PREFIX (example_prefix_get_type ())
G_DECLARE_FINAL_TYPE (ExamplePrefix, example_prefix, EXAMPLE, PREFIX, LpTransform)

struct _ExamplePrefix
{
  LpTransform parent_instance;
  char *prefix;
};

G_DEFINE_FINAL_TYPE (ExamplePrefix, example_prefix, LP_TYPE_TRANSFORM)

enum {
  PROP_0,
  PROP_PREFIX,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static LpTensor *
example_prefix_transform_tensor (LpTransform  *transform,
                                 LpTensor     *tensor,
                                 GError      **error)
{
  ExamplePrefix *self = EXAMPLE_PREFIX (transform);
  g_autofree char *name = g_strconcat (self->prefix, lp_tensor_get_name (tensor), NULL);

  return lp_tensor_new_renamed (tensor, name);
}

static void
example_prefix_set_property (GObject      *object,
                             guint         prop_id,
                             const GValue *value,
                             GParamSpec   *pspec)
{
  ExamplePrefix *self = EXAMPLE_PREFIX (object);

  switch (prop_id)
    {
    case PROP_PREFIX:
      g_free (self->prefix);
      self->prefix = g_value_dup_string (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
example_prefix_get_property (GObject    *object,
                             guint       prop_id,
                             GValue     *value,
                             GParamSpec *pspec)
{
  ExamplePrefix *self = EXAMPLE_PREFIX (object);

  switch (prop_id)
    {
    case PROP_PREFIX:
      g_value_set_string (value, self->prefix);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
example_prefix_finalize (GObject *object)
{
  ExamplePrefix *self = EXAMPLE_PREFIX (object);

  g_free (self->prefix);
  G_OBJECT_CLASS (example_prefix_parent_class)->finalize (object);
}

static void
example_prefix_class_init (ExamplePrefixClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpTransformClass *transform_class = LP_TRANSFORM_CLASS (klass);

  object_class->set_property = example_prefix_set_property;
  object_class->get_property = example_prefix_get_property;
  object_class->finalize = example_prefix_finalize;
  transform_class->transform_tensor = example_prefix_transform_tensor;

  properties[PROP_PREFIX] =
    g_param_spec_string ("prefix", NULL, "Text put in front of every tensor name",
                         NULL, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "example-prefix", "Example",
                               "Put a prefix in front of every tensor name");
  lp_stage_class_set_property_required (stage_class, "prefix");
}

static void
example_prefix_init (ExamplePrefix *self)
{
}

static gboolean
register_stages (LpPlugin  *plugin,
                 GError   **error)
{
  return lp_plugin_register_stage (plugin, EXAMPLE_TYPE_PREFIX, error);
}

LP_PLUGIN_DEFINE ("example", "An example of a plugin built out of tree", register_stages)
