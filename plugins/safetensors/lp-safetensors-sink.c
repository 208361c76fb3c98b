/* lp-safetensors-sink.c: the safetensors-sink stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-safetensors-stages.h"

/* The one metadata key the sink adds: how the file was made. */
#define PROVENANCE_KEY "lpipe.pipeline"

/* huggingface_hub's MAX_SHARD_SIZE, for a location that names a sharded
 * checkpoint with no max-shard-size. */
#define DEFAULT_SHARD_SIZE G_GUINT64_CONSTANT (5000000000)

/**
 * LpSafetensorsSink:
 *
 * Writes its input as a safetensors file, replacing the file atomically only
 * once it is complete. The input's metadata is kept, and the pipeline that
 * made the file is recorded under the `lpipe.pipeline` metadata key, with
 * file names but not their directories; a record the input already had is
 * kept in its `history` (see lp_stage_dup_provenance_after()).
 * `provenance=false` adds no record. With `max-shard-size` (or a location
 * naming an index) it writes a sharded checkpoint and its index
 * (see lp_safetensors_save_sharded()).
 */
struct _LpSafetensorsSink
{
  LpSink parent_instance;

  char *location;
  gboolean provenance;
  char *max_shard_size;
  guint64 shard_bytes;      /* 0: one file */
};

G_DEFINE_FINAL_TYPE (LpSafetensorsSink, lp_safetensors_sink, LP_TYPE_SINK)

enum {
  PROP_0,
  PROP_LOCATION,
  PROP_PROVENANCE,
  PROP_MAX_SHARD_SIZE,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static void
lp_safetensors_sink_finalize (GObject *object)
{
  LpSafetensorsSink *self = LP_SAFETENSORS_SINK (object);

  g_free (self->location);
  g_free (self->max_shard_size);

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
    case PROP_MAX_SHARD_SIZE:
      g_value_set_string (value, self->max_shard_size);
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
    case PROP_MAX_SHARD_SIZE:
      g_free (self->max_shard_size);
      self->max_shard_size = g_value_dup_string (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

/* A size as huggingface_hub's parse_size_to_int() reads one: a number
 * and one of KB, MB, GB, TB (powers of 10, any case: "5GB" is 5e9 bytes);
 * also transformers' KiB, MiB, GiB, TiB (powers of 2) and a plain count of
 * bytes. */
static gboolean
parse_size (const char  *text,
            guint64     *bytes,
            GError     **error)
{
  static const struct { const char *unit; double factor; } units[] = {
    { "KIB", 1024.0 }, { "MIB", 1048576.0 }, { "GIB", 1073741824.0 }, { "TIB", 1099511627776.0 },
    { "KB", 1e3 }, { "MB", 1e6 }, { "GB", 1e9 }, { "TB", 1e12 },
  };
  g_autofree char *upper = g_ascii_strup (text, -1);
  double factor = 1.0, value;
  char *end;

  g_strstrip (upper);
  for (guint i = 0; i < G_N_ELEMENTS (units); i++)
    if (g_str_has_suffix (upper, units[i].unit))
      {
        upper[strlen (upper) - strlen (units[i].unit)] = '\0';
        factor = units[i].factor;
        break;
      }
  g_strchomp (upper);
  if (factor == 1.0)
    {
      guint64 n;
      if (upper[0] != '\0' && g_ascii_string_to_unsigned (upper, 10, 1, G_MAXUINT64, &n, NULL))
        {
          *bytes = n;
          return TRUE;
        }
    }
  else
    {
      value = g_ascii_strtod (upper, &end);
      if (upper[0] != '\0' && *end == '\0' && value * factor >= 1.0 && value * factor < 1.8e19)
        {
          *bytes = (guint64) (value * factor);
          return TRUE;
        }
    }
  g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
               "'max-shard-size' is '%s': give a size of at least one byte such as 5GB, 500MB "
               "(KB, MB, GB, TB: powers of 10, as Hugging Face reads them; KiB, MiB, GiB: of 2) "
               "or a number of bytes", text);
  return FALSE;
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
  self->shard_bytes = 0;
  if (self->max_shard_size != NULL && self->max_shard_size[0] != '\0')
    return parse_size (self->max_shard_size, &self->shard_bytes, error);
  /* a location that names an index gets Hugging Face's default (a folder
   * is refused, as a location, unless max-shard-size is set) */
  if (g_str_has_suffix (self->location, ".safetensors.index.json"))
    self->shard_bytes = DEFAULT_SHARD_SIZE;
  return TRUE;
}

static gboolean
save (LpSafetensorsSink  *self,
      LpCheckpoint       *checkpoint,
      GError            **error)
{
  if (self->shard_bytes > 0)
    return lp_safetensors_save_sharded (checkpoint, self->location, self->shard_bytes,
                                        LP_STAGE (self), error);
  return lp_safetensors_save (checkpoint, self->location, LP_STAGE (self), error);
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
    return save (self, input, error);

  /* The input may be shared with other stages: the provenance goes on a
   * checkpoint of our own that shares its tensors. */
  output = lp_checkpoint_new_like (input);
  for (guint i = 0; i < lp_checkpoint_get_n_tensors (input); i++)
    if (!lp_checkpoint_add_tensor (output, lp_checkpoint_get_tensor (input, i), error))
      return FALSE;
  lp_checkpoint_set_metadata (output, PROVENANCE_KEY, provenance);

  return save (self, output, error);
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
  /**
   * LpSafetensorsSink:max-shard-size:
   *
   * Writes a sharded checkpoint as Hugging Face does: `location`
   * (`DIR/model.safetensors`, `DIR/model.safetensors.index.json` or a folder)
   * becomes `model-00001-of-0000N.safetensors`, … and
   * `model.safetensors.index.json`, each shard at most this many bytes of
   * tensor data (`5GB`, `500MB`, `2GiB` or bytes; a tensor larger than that
   * gets a shard of its own). All files are committed together, the index
   * last. A location naming an index is sharded at 5GB when this is unset.
   */
  properties[PROP_MAX_SHARD_SIZE] =
    g_param_spec_string ("max-shard-size", "Maximum shard size",
                         "Write a sharded checkpoint with an index, each shard at most this much tensor data "
                         "(5GB, 500MB as Hugging Face reads them, 2GiB, or bytes; a larger tensor gets a shard "
                         "of its own); unset: one file, or 5GB for a location naming an index",
                         NULL, G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "safetensors-sink", "Sink",
                               "Writes a checkpoint to a safetensors file, atomically");
  lp_stage_class_set_property_required (stage_class, "location");
  lp_stage_class_set_property_file (stage_class, "location");
}

static void
lp_safetensors_sink_init (LpSafetensorsSink *self)
{
  self->provenance = TRUE;
}
