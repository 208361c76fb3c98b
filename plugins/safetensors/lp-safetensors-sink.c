/* lp-safetensors-sink.c: the safetensors-sink stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-safetensors-stages.h"

/* The one metadata key the sink adds: how the file was made. */
#define PROVENANCE_KEY "lpipe.pipeline"

/**
 * LpSafetensorsSink:
 *
 * Writes its input as a safetensors file, replacing the file atomically only
 * once it is complete. The input's metadata is kept, and the pipeline that
 * made the file is recorded under the `lpipe.pipeline` metadata key, with
 * file names but not their directories; a record the input already had is
 * kept in its `history` (see lp_stage_dup_provenance_after()).
 * `provenance=false` adds no record.
 */
struct _LpSafetensorsSink
{
  LpSink parent_instance;

  char *location;
  gboolean provenance;
};

G_DEFINE_FINAL_TYPE (LpSafetensorsSink, lp_safetensors_sink, LP_TYPE_SINK)

enum {
  PROP_0,
  PROP_LOCATION,
  PROP_PROVENANCE,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static void
lp_safetensors_sink_finalize (GObject *object)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (object);

  g_free (self->location);

  G_OBJECT_CLASS (lp_safetensors_sink_parent_class)->finalize (object);
}

static void
lp_safetensors_sink_get_property (GObject    *object,
                                  guint       prop_id,
                                  GValue     *value,
                                  GParamSpec *pspec)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (object);

  switch (prop_id)
    {
    case PROP_LOCATION:
      g_value_set_string (value, self->location);
      break;
    case PROP_PROVENANCE:
      g_value_set_boolean (value, self->provenance);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_safetensors_sink_set_property (GObject      *object,
                                  guint         prop_id,
                                  const GValue *value,
                                  GParamSpec   *pspec)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (object);

  switch (prop_id)
    {
    case PROP_LOCATION:
      g_free (self->location);
      self->location = g_value_dup_string (value);
      break;
    case PROP_PROVENANCE:
      self->provenance = g_value_get_boolean (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static gboolean
lp_safetensors_sink_prepare (LpStage  *stage,
                             GError  **error)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (stage);

  if (self->location == NULL || self->location[0] == '\0')
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "'location' must name a file");
      return FALSE;
    }
  return TRUE;
}

static gboolean
lp_safetensors_sink_consume (LpSink        *sink,
                             LpCheckpoint  *input,
                             GError       **error)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (sink);
  g_autofree char *provenance = NULL;
  g_autoptr(LpCheckpoint) output = NULL;

  if (self->provenance)
    provenance = lp_stage_dup_provenance_after (LP_STAGE (sink),
                                                lp_checkpoint_get_metadata (input, PROVENANCE_KEY));

  if (provenance == NULL)
    return lp_safetensors_save (input, self->location, LP_STAGE (sink), error);

  /* The input may be shared with other stages: the provenance goes on a
   * checkpoint of our own that shares its tensors. */
  output = lp_checkpoint_new_like (input);
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    if (!lp_checkpoint_add_tensor (output, lp_checkpoint_get_tensor (input, i), error))
      return FALSE;
  lp_checkpoint_set_metadata (output, PROVENANCE_KEY, provenance);

  return lp_safetensors_save (output, self->location, LP_STAGE (sink), error);
}

static void
lp_safetensors_sink_class_init (LpSafetensorsSinkClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpSinkClass *sink_class = LP_SINK_CLASS (klass);

  object_class->finalize = lp_safetensors_sink_finalize;
  object_class->get_property = lp_safetensors_sink_get_property;
  object_class->set_property = lp_safetensors_sink_set_property;
  stage_class->prepare = lp_safetensors_sink_prepare;
  sink_class->consume = lp_safetensors_sink_consume;

  /**
   * LpSafetensorsSink:location: (type filename)
   *
   * The safetensors file to write; it is replaced only once complete. A
   * symbolic link is followed and its target replaced; a FIFO or a
   * character device (`/dev/null`, `/dev/stdout`) is written through, with
   * no atomicity and no adapter config beside it; block devices, sockets
   * and directories are refused.
   */
  properties[PROP_LOCATION] =
    g_param_spec_string ("location", "Location",
                         "The safetensors file to write, replaced atomically once complete "
                         "(a symlink's target is replaced; a FIFO or character device is written through)",
                         NULL,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  properties[PROP_PROVENANCE] =
    g_param_spec_boolean ("provenance", "Provenance",
                          "Record how the file was made under lpipe.pipeline (file names without directories; an earlier record is kept in its history)",
                          TRUE, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "safetensors-sink", "Sink",
                               "Writes a checkpoint to a safetensors file, atomically");
  lp_stage_class_set_property_required (stage_class, "location");
}

static void
lp_safetensors_sink_init (LpSafetensorsSink *self)
{
  self->provenance = TRUE;
}
