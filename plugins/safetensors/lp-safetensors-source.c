/* lp-safetensors-source.c: the safetensors-source stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-safetensors-stages.h"

/**
 * LpSafetensorsSource:
 *
 * Reads a safetensors file, checking all of it first; tensor data stays in
 * the mapped file until somebody asks for it. A PEFT adapter config beside
 * the file comes along.
 */
struct _LpSafetensorsSource
{
  LpSource parent_instance;

  char *location;
};

G_DEFINE_FINAL_TYPE (LpSafetensorsSource, lp_safetensors_source, LP_TYPE_SOURCE)

enum {
  PROP_0,
  PROP_LOCATION,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static void
lp_safetensors_source_finalize (GObject *object)
{
  LpSafetensorsSource *self = LP_SAFETENSORS_SOURCE (object);

  g_free (self->location);

  G_OBJECT_CLASS (lp_safetensors_source_parent_class)->finalize (object);
}

static void
lp_safetensors_source_get_property (GObject    *object,
                                    guint       prop_id,
                                    GValue     *value,
                                    GParamSpec *pspec)
{
  LpSafetensorsSource *self = LP_SAFETENSORS_SOURCE (object);

  switch (prop_id)
    {
    case PROP_LOCATION:
      g_value_set_string (value, self->location);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_safetensors_source_set_property (GObject      *object,
                                    guint         prop_id,
                                    const GValue *value,
                                    GParamSpec   *pspec)
{
  LpSafetensorsSource *self = LP_SAFETENSORS_SOURCE (object);

  switch (prop_id)
    {
    case PROP_LOCATION:
      g_free (self->location);
      self->location = g_value_dup_string (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static gboolean
lp_safetensors_source_prepare (LpStage  *stage,
                               GError  **error)
{
  LpSafetensorsSource *self = LP_SAFETENSORS_SOURCE (stage);

  if (self->location == NULL || self->location[0] == '\0')
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "'location' must name a file");
      return FALSE;
    }
  return TRUE;
}

static LpCheckpoint *
lp_safetensors_source_create (LpSource  *source,
                              GError   **error)
{
  LpSafetensorsSource *self = LP_SAFETENSORS_SOURCE (source);

  /* a sharded checkpoint: its index, or the folder of it */
  if (lp_safetensors_is_index (self->location))
    return lp_safetensors_load_index (self->location, error);
  return lp_safetensors_load (self->location, error);
}

static void
lp_safetensors_source_class_init (LpSafetensorsSourceClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpSourceClass *source_class = LP_SOURCE_CLASS (klass);

  object_class->finalize = lp_safetensors_source_finalize;
  object_class->get_property = lp_safetensors_source_get_property;
  object_class->set_property = lp_safetensors_source_set_property;
  stage_class->prepare = lp_safetensors_source_prepare;
  source_class->create = lp_safetensors_source_create;

  /**
   * LpSafetensorsSource:location: (type filename)
   *
   * The safetensors file to read: a regular file (a symbolic link to one is
   * followed); a FIFO or a device is refused before it is opened for
   * reading, so that nothing blocks. A folder or a
   * `*.safetensors.index.json` is a sharded checkpoint.
   */
  properties[PROP_LOCATION] =
    g_param_spec_string ("location", "Location",
                         "The safetensors file to read (a regular file: FIFOs and devices are refused), "
                         "or a sharded checkpoint: its *.safetensors.index.json or its folder", NULL,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "safetensors-source", "Source",
                               "Reads a checkpoint from a safetensors file");
  lp_stage_class_set_property_required (stage_class, "location");
  lp_stage_class_set_property_file (stage_class, "location");
}

static void
lp_safetensors_source_init (LpSafetensorsSource *self)
{
}
