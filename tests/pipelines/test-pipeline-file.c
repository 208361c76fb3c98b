/* test-pipeline-file.c: the pipeline-file loader, the launch syntax and
 * property value conversion
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The stages here are registered in-process, so these tests depend on no
 * plugin. They are real stages: running a loaded pipeline traces, in the
 * checkpoint's metadata, which stage fed which, so the wiring is checked by
 * what reaches the sink.
 */

#include "lp-private.h"

#include <math.h>
#include <string.h>
#include <glib/gstdio.h>
#include <unistd.h>

/* ---- test stages ------------------------------------------------------ */

typedef enum { TEST_MODE_EXACT, TEST_MODE_RANDOMIZED } TestMode;
typedef enum { TEST_FEATURE_FAST = 1 << 0, TEST_FEATURE_SMALL = 1 << 1 } TestFeatures;

static GType
test_mode_get_type (void)
{
  static GType type = 0;
  static const GEnumValue values[] = {
    { TEST_MODE_EXACT, "TEST_MODE_EXACT", "exact" },
    { TEST_MODE_RANDOMIZED, "TEST_MODE_RANDOMIZED", "randomized" },
    { 0, NULL, NULL },
  };
  if (type == 0)
    type = g_enum_register_static ("TestMode", values);
  return type;
}

static GType
test_features_get_type (void)
{
  static GType type = 0;
  static const GFlagsValue values[] = {
    { TEST_FEATURE_FAST, "TEST_FEATURE_FAST", "fast" },
    { TEST_FEATURE_SMALL, "TEST_FEATURE_SMALL", "small" },
    { 0, NULL, NULL },
  };
  if (type == 0)
    type = g_flags_register_static ("TestFeatures", values);
  return type;
}

/* What the last sink to run received: its "trace" metadata. */
static char *last_trace;
static char *last_location;

/* test-source: count [0, 1000] */
#define TEST_TYPE_SOURCE (test_source_get_type ())
G_DECLARE_FINAL_TYPE (TestSource, test_source, TEST, SOURCE, LpSource)
struct _TestSource { LpSource parent; guint count; };
G_DEFINE_FINAL_TYPE (TestSource, test_source, LP_TYPE_SOURCE)

enum { SRC_PROP_COUNT = 1 };

static void
test_source_set_property (GObject *object, guint id, const GValue *value, GParamSpec *pspec)
{
  TestSource *self = TEST_SOURCE (object);
  if (id == SRC_PROP_COUNT)
    self->count = g_value_get_uint (value);
  else
    G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
}

static void
test_source_get_property (GObject *object, guint id, GValue *value, GParamSpec *pspec)
{
  TestSource *self = TEST_SOURCE (object);
  if (id == SRC_PROP_COUNT)
    g_value_set_uint (value, self->count);
  else
    G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
}

static LpCheckpoint *
test_source_create (LpSource *source, GError **error)
{
  TestSource *self = TEST_SOURCE (source);
  LpCheckpoint *out = lp_checkpoint_new ();
  const char *id = lp_stage_get_id (LP_STAGE (source));
  g_autofree char *trace = g_strdup_printf ("%s%u", id ? id : "src", self->count);

  lp_checkpoint_set_metadata (out, "trace", trace);
  return out;
}

static void
test_source_class_init (TestSourceClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->set_property = test_source_set_property;
  object_class->get_property = test_source_get_property;
  LP_SOURCE_CLASS (klass)->create = test_source_create;
  g_object_class_install_property (object_class, SRC_PROP_COUNT,
    g_param_spec_uint ("count", "Count", "How many", 0, 1000, 1,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-source", "Test", "A test source");
}

static void test_source_init (TestSource *self) { self->count = 1; }

/* test-transform: rank (required), mode, threshold, verbose, names, features,
 * label, offset */
#define TEST_TYPE_TRANSFORM (test_transform_get_type ())
G_DECLARE_FINAL_TYPE (TestTransform, test_transform, TEST, TRANSFORM, LpTransform)
struct _TestTransform
{
  LpTransform parent;
  int rank;
  TestMode mode;
  double threshold;
  gboolean verbose;
  GStrv names;
  guint features;
  char *label;
  gint64 offset;
};
G_DEFINE_FINAL_TYPE (TestTransform, test_transform, LP_TYPE_TRANSFORM)

enum {
  T_PROP_RANK = 1, T_PROP_MODE, T_PROP_THRESHOLD, T_PROP_VERBOSE, T_PROP_NAMES,
  T_PROP_FEATURES, T_PROP_LABEL, T_PROP_OFFSET,
};

static void
test_transform_set_property (GObject *object, guint id, const GValue *value, GParamSpec *pspec)
{
  TestTransform *self = TEST_TRANSFORM (object);
  switch (id)
    {
    case T_PROP_RANK: self->rank = g_value_get_int (value); break;
    case T_PROP_MODE: self->mode = g_value_get_enum (value); break;
    case T_PROP_THRESHOLD: self->threshold = g_value_get_double (value); break;
    case T_PROP_VERBOSE: self->verbose = g_value_get_boolean (value); break;
    case T_PROP_NAMES: g_strfreev (self->names); self->names = g_value_dup_boxed (value); break;
    case T_PROP_FEATURES: self->features = g_value_get_flags (value); break;
    case T_PROP_LABEL: g_free (self->label); self->label = g_value_dup_string (value); break;
    case T_PROP_OFFSET: self->offset = g_value_get_int64 (value); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
    }
}

static void
test_transform_get_property (GObject *object, guint id, GValue *value, GParamSpec *pspec)
{
  TestTransform *self = TEST_TRANSFORM (object);
  switch (id)
    {
    case T_PROP_RANK: g_value_set_int (value, self->rank); break;
    case T_PROP_MODE: g_value_set_enum (value, self->mode); break;
    case T_PROP_THRESHOLD: g_value_set_double (value, self->threshold); break;
    case T_PROP_VERBOSE: g_value_set_boolean (value, self->verbose); break;
    case T_PROP_NAMES: g_value_set_boxed (value, self->names); break;
    case T_PROP_FEATURES: g_value_set_flags (value, self->features); break;
    case T_PROP_LABEL: g_value_set_string (value, self->label); break;
    case T_PROP_OFFSET: g_value_set_int64 (value, self->offset); break;
    default: G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
    }
}

static LpCheckpoint *
test_transform_transform (LpTransform *transform, LpCheckpoint *input, GError **error)
{
  TestTransform *self = TEST_TRANSFORM (transform);
  LpCheckpoint *out = lp_checkpoint_new ();
  const char *id = lp_stage_get_id (LP_STAGE (transform));
  g_autofree char *trace = g_strdup_printf ("%s%d(%s)", id ? id : "t", self->rank,
                                            lp_checkpoint_get_metadata (input, "trace"));

  lp_checkpoint_set_metadata (out, "trace", trace);
  return out;
}

static void
test_transform_finalize (GObject *object)
{
  TestTransform *self = TEST_TRANSFORM (object);
  g_strfreev (self->names);
  g_free (self->label);
  G_OBJECT_CLASS (test_transform_parent_class)->finalize (object);
}

static void
test_transform_class_init (TestTransformClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  GParamFlags rw = G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS;

  object_class->set_property = test_transform_set_property;
  object_class->get_property = test_transform_get_property;
  object_class->finalize = test_transform_finalize;
  LP_TRANSFORM_CLASS (klass)->transform = test_transform_transform;

  g_object_class_install_property (object_class, T_PROP_RANK,
    g_param_spec_int ("rank", "Rank", "Target rank", 1, 4096, 16, rw));
  g_object_class_install_property (object_class, T_PROP_MODE,
    g_param_spec_enum ("mode", "Mode", "How", test_mode_get_type (), TEST_MODE_EXACT, rw));
  g_object_class_install_property (object_class, T_PROP_THRESHOLD,
    g_param_spec_double ("threshold", "Threshold", "A fraction", 0.0, 1.0, 0.1, rw));
  g_object_class_install_property (object_class, T_PROP_VERBOSE,
    g_param_spec_boolean ("verbose", "Verbose", "Talk", FALSE, rw));
  g_object_class_install_property (object_class, T_PROP_NAMES,
    g_param_spec_boxed ("names", "Names", "Some names", G_TYPE_STRV, rw));
  g_object_class_install_property (object_class, T_PROP_FEATURES,
    g_param_spec_flags ("features", "Features", "Some flags", test_features_get_type (), 0, rw));
  g_object_class_install_property (object_class, T_PROP_LABEL,
    g_param_spec_string ("label", "Label", "A label", NULL, rw));
  g_object_class_install_property (object_class, T_PROP_OFFSET,
    g_param_spec_int64 ("offset", "Offset", "Any int64", G_MININT64, G_MAXINT64, 0, rw));
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-transform", "Test", "A test transform");
  lp_stage_class_set_property_required (LP_STAGE_CLASS (klass), "rank");
}

static void test_transform_init (TestTransform *self) { self->rank = 16; self->threshold = 0.1; }

/* test-sink: location (required) */
#define TEST_TYPE_SINK (test_sink_get_type ())
G_DECLARE_FINAL_TYPE (TestSink, test_sink, TEST, SINK, LpSink)
struct _TestSink { LpSink parent; char *location; };
G_DEFINE_FINAL_TYPE (TestSink, test_sink, LP_TYPE_SINK)

static void
test_sink_set_property (GObject *object, guint id, const GValue *value, GParamSpec *pspec)
{
  TestSink *self = TEST_SINK (object);
  if (id == 1)
    {
      g_free (self->location);
      self->location = g_value_dup_string (value);
    }
  else
    G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
}

static void
test_sink_get_property (GObject *object, guint id, GValue *value, GParamSpec *pspec)
{
  if (id == 1)
    g_value_set_string (value, TEST_SINK (object)->location);
  else
    G_OBJECT_WARN_INVALID_PROPERTY_ID (object, id, pspec);
}

static gboolean
test_sink_consume (LpSink *sink, LpCheckpoint *input, GError **error)
{
  g_free (last_trace);
  last_trace = g_strdup (lp_checkpoint_get_metadata (input, "trace"));
  g_free (last_location);
  last_location = g_strdup (TEST_SINK (sink)->location);
  return TRUE;
}

static void
test_sink_finalize (GObject *object)
{
  g_free (TEST_SINK (object)->location);
  G_OBJECT_CLASS (test_sink_parent_class)->finalize (object);
}

static void
test_sink_class_init (TestSinkClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->set_property = test_sink_set_property;
  object_class->get_property = test_sink_get_property;
  object_class->finalize = test_sink_finalize;
  LP_SINK_CLASS (klass)->consume = test_sink_consume;
  g_object_class_install_property (object_class, 1,
    g_param_spec_string ("location", "Location", "Where to write", NULL,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS));
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-sink", "Test", "A test sink");
  lp_stage_class_set_property_required (LP_STAGE_CLASS (klass), "location");
}

static void test_sink_init (TestSink *self) { }

/* test-merge: an aggregator, 2..N inputs */
#define TEST_TYPE_MERGE (test_merge_get_type ())
G_DECLARE_FINAL_TYPE (TestMerge, test_merge, TEST, MERGE, LpAggregator)
struct _TestMerge { LpAggregator parent; };
G_DEFINE_FINAL_TYPE (TestMerge, test_merge, LP_TYPE_AGGREGATOR)

static LpCheckpoint *
test_merge_aggregate (LpAggregator *aggregator, LpCheckpoint **inputs, guint n_inputs, GError **error)
{
  LpCheckpoint *out = lp_checkpoint_new ();
  GString *trace = g_string_new ("m(");

  for (guint i = 0; i < n_inputs; i++)
    g_string_append_printf (trace, "%s%s", i ? "," : "", lp_checkpoint_get_metadata (inputs[i], "trace"));
  g_string_append_c (trace, ')');
  lp_checkpoint_set_metadata (out, "trace", trace->str);
  g_string_free (trace, TRUE);
  return out;
}

static void
test_merge_class_init (TestMergeClass *klass)
{
  LP_AGGREGATOR_CLASS (klass)->aggregate = test_merge_aggregate;
  lp_stage_class_set_metadata (LP_STAGE_CLASS (klass), "test-merge", "Test", "A test aggregator");
}

static void test_merge_init (TestMerge *self) { }

static LpRegistry *registry;

static LpPipeline *
new_pipeline (void)
{
  return lp_pipeline_new (registry);
}

static char *
pipeline_path (const char *dir,
               const char *name)
{
  return g_test_build_filename (G_TEST_DIST, "pipelines", dir, name, NULL);
}

/* ---- bad files -------------------------------------------------------- */

typedef struct {
  const char *file;
  int code;
  const char *fragment;
  const char *params[3];
} BadCase;

static const BadCase bad_cases[] = {
  { "syntax.pipeline", LP_PIPELINE_ERROR_SYNTAX, "syntax.pipeline:4:31: invalid JSON: unexpected character `,'" },
  { "empty.pipeline", LP_PIPELINE_ERROR_SYNTAX, "empty.pipeline: invalid JSON: the file is empty" },
  { "not-object.pipeline", LP_PIPELINE_ERROR_INVALID, "a pipeline file is a JSON object" },
  { "unknown-key.pipeline", LP_PIPELINE_ERROR_INVALID, "unknown key 'stagse'; did you mean 'stages'?" },
  { "bad-version.pipeline", LP_PIPELINE_ERROR_INVALID, "format version 2 is not supported" },
  { "no-stages.pipeline", LP_PIPELINE_ERROR_INVALID, "no \"stages\" array" },
  { "stages-not-array.pipeline", LP_PIPELINE_ERROR_INVALID, "\"stages\" must be an array" },
  { "empty-stages.pipeline", LP_PIPELINE_ERROR_EMPTY, "\"stages\" is empty" },
  { "description-not-string.pipeline", LP_PIPELINE_ERROR_INVALID, "\"description\" must be a string" },
  { "stage-not-object.pipeline", LP_PIPELINE_ERROR_INVALID, ": stage 1: must be a JSON object" },
  { "stage-missing-name.pipeline", LP_PIPELINE_ERROR_INVALID, ": stage 2: has no \"stage\" key" },
  { "stage-name-not-string.pipeline", LP_PIPELINE_ERROR_INVALID, ": stage 1: \"stage\" must be a string" },
  { "unknown-stage.pipeline", LP_PIPELINE_ERROR_UNKNOWN_STAGE,
    ": stage 2: unknown stage 'test-transfrom'; did you mean 'test-transform'?" },
  { "unknown-property.pipeline", LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
    "unknown-property.pipeline: stage 2 'test-transform' (id reduce): unknown property 'rnak'; did you mean 'rank'?" },
  { "inputs-typo.pipeline", LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
    ": stage 2 'test-transform': unknown property 'inptus'; did you mean 'inputs'?" },
  { "rank-zero.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    ": stage 2 'test-transform': property 'rank': 0 is out of range; expected integer [1, 4096]" },
  { "rank-2p31.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'rank': 2147483648 is out of range; expected integer [1, 4096]" },
  { "rank-float.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'rank': expected integer [1, 4096], got 4.5" },
  { "rank-string.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'rank': expected integer [1, 4096], got the string \"4\"" },
  { "negative-count.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    ": stage 1 'test-source': property 'count': -1 is out of range; expected integer [0, 1000]" },
  { "threshold-range.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'threshold': 1.5 is out of range; expected double [0, 1]" },
  { "nan-threshold.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    ": stage 2 'test-transform': property 'threshold': NaN", { "threshold=nan" } },
  { "nan-threshold.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'threshold': inf is out of range", { "threshold=inf" } },
  { "nan-threshold.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'threshold': expected double [0, 1], got '0.5x'", { "threshold=0.5x" } },
  { "enum-typo.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'mode': unknown value 'exakt'; did you mean 'exact'? (expected enum: exact|randomized)" },
  { "bool-string.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'verbose': expected boolean, got the string \"yes\"" },
  { "strv-number.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'names': expected list of strings, got 1 at position 2" },
  { "flags-typo.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'features': unknown value 'smal'; did you mean 'small'?" },
  { "missing-rank.pipeline", LP_PIPELINE_ERROR_MISSING_PROPERTY,
    ": stage 2 'test-transform': required property 'rank' (integer [1, 4096]) is not set" },
  { "missing-location.pipeline", LP_PIPELINE_ERROR_MISSING_PROPERTY,
    ": stage 3 'test-sink': required property 'location' (string) is not set" },
  { "undefined-param.pipeline", LP_PIPELINE_ERROR_UNDEFINED_PARAM,
    ": stage 2 'test-transform': property 'rank': undefined parameter ${rank} (declare it in \"params\" or pass rank=VALUE)" },
  { "malformed-reference.pipeline", LP_PIPELINE_ERROR_INVALID,
    "property 'rank': malformed parameter reference in \"${rank\"" },
  { "param-typo.pipeline", LP_PIPELINE_ERROR_UNDEFINED_PARAM,
    "undefined parameter ${rnak}; did you mean 'rank'?" },
  { "self-param.pipeline", LP_PIPELINE_ERROR_INVALID,
    "self-param.pipeline: params: 'a' refers to ${a}, but parameter values cannot refer to parameters" },
  { "unknown-cli-param.pipeline", LP_PIPELINE_ERROR_INVALID,
    "unknown-cli-param.pipeline: parameter 'b' refers to ${rank}", { "b=${rank}" } },
  { "param-not-scalar.pipeline", LP_PIPELINE_ERROR_INVALID,
    "params: 'names' must be a string, number or boolean" },
  { "unknown-cli-param.pipeline", LP_PIPELINE_ERROR_UNDEFINED_PARAM,
    "unknown-cli-param.pipeline: unknown parameter 'rnak'; did you mean 'rank'?", { "rnak=8" } },
  { "unknown-cli-param.pipeline", LP_PIPELINE_ERROR_INVALID,
    "parameter 'rank' must be written name=value", { "rank" } },
  { "unknown-cli-param.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "property 'rank': 0 is out of range", { "rank=0" } },
  { "unknown-id.pipeline", LP_PIPELINE_ERROR_UNKNOWN_ID,
    ": stage 2 'test-transform': input 'sorce' is not the id of any stage; did you mean 'source'?" },
  { "duplicate-id.pipeline", LP_PIPELINE_ERROR_DUPLICATE_ID,
    ": stage 2 'test-source' (id a): id 'a' is already used by stage 1 'test-source' (id a)" },
  { "self-input.pipeline", LP_PIPELINE_ERROR_CYCLE,
    ": stage 2 'test-transform' (id t): takes its own output as input" },
  { "cycle.pipeline", LP_PIPELINE_ERROR_CYCLE,
    ": the stages' inputs form a cycle: stage 2 'test-merge' (id m) -> stage 3 'test-transform' (id b) -> stage 2 'test-merge' (id m)" },
  { "first-not-source.pipeline", LP_PIPELINE_ERROR_ARITY,
    ": stage 1 'test-transform': takes at least 1 input, but it has 0 (it is the first stage" },
  { "source-with-input.pipeline", LP_PIPELINE_ERROR_ARITY,
    ": stage 2 'test-source' (id b): a source takes no input, but it is given 1" },
  { "merge-one-input.pipeline", LP_PIPELINE_ERROR_ARITY,
    ": stage 2 'test-merge': takes at least 2 inputs, but it has 1" },
  { "transform-two-inputs.pipeline", LP_PIPELINE_ERROR_ARITY,
    ": stage 3 'test-transform': takes at most 1 input, but it has 2" },
  { "sink-as-input.pipeline", LP_PIPELINE_ERROR_ARITY,
    ": stage 3 'test-sink': its input, stage 2 'test-sink', is a sink and has no output" },
  { "inputs-not-ids.pipeline", LP_PIPELINE_ERROR_INVALID,
    ": stage 2 'test-sink': \"inputs\" must be an id or an array of ids" },
  { "empty-id.pipeline", LP_PIPELINE_ERROR_INVALID, ": stage 1 'test-source': \"id\" must be a non-empty string" },
  { "deep-nesting.pipeline", LP_PIPELINE_ERROR_INVALID, "deep-nesting.pipeline:1:" },
  { "deep-nesting.pipeline", LP_PIPELINE_ERROR_INVALID, ": nesting deeper than 64 levels" },
  /* json-glib keeps the last of two equal keys without a word; the escape
   * spells the same key */
  { "duplicate-key.pipeline", LP_PIPELINE_ERROR_INVALID,
    "duplicate-key.pipeline:7:7: key \"rank\" is given twice in one object (first on line 6)" },
  { "duplicate-top-key.pipeline", LP_PIPELINE_ERROR_INVALID,
    "duplicate-top-key.pipeline:4:3: key \"stages\" is given twice in one object (first on line 3)" },
  /* json-glib would hand over "test-source", cut at the NUL */
  { "nul-in-stage-name.pipeline", LP_PIPELINE_ERROR_INVALID,
    "nul-in-stage-name.pipeline:4:16: the string holds \\u0000 (a NUL character)" },
  /* json-glib would make it -1 */
  { "huge-integer.pipeline", LP_PIPELINE_ERROR_BAD_VALUE,
    "huge-integer.pipeline:5:42: the integer 99999999999999999999 is out of range (integers are 64-bit)" },
};

static void
test_bad_file (gconstpointer data)
{
  const BadCase *c = data;
  g_autofree char *path = pipeline_path ("bad", c->file);
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *display = g_filename_display_name (path);

  g_assert_false (lp_pipeline_load_from_file (pipeline, path, c->params[0] ? c->params : NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, c->code);
  if (strstr (error->message, c->fragment) == NULL)
    {
      g_test_fail_printf ("%s: message \"%s\" lacks \"%s\"", c->file, error->message, c->fragment);
      return;
    }
  /* every message names the file first */
  g_assert_true (g_str_has_prefix (error->message, display));
  /* and nothing is left half-built */
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 0);
}

/* Every file in bad/ is in the table, so none goes untested. */
static void
test_bad_all_listed (void)
{
  g_autofree char *dir = g_test_build_filename (G_TEST_DIST, "pipelines", "bad", NULL);
  g_autoptr(GDir) d = g_dir_open (dir, 0, NULL);
  const char *name;
  guint n = 0;

  g_assert_nonnull (d);
  while ((name = g_dir_read_name (d)))
    {
      gboolean listed = FALSE;
      if (!g_str_has_suffix (name, ".pipeline"))
        continue;
      for (guint i = 0; i < G_N_ELEMENTS (bad_cases); i++)
        listed |= strcmp (bad_cases[i].file, name) == 0;
      if (!listed)
        g_error ("bad/%s has no entry in bad_cases", name);
      n++;
    }
  g_assert_cmpuint (n, >=, 40);
}

static void
test_huge_file (void)
{
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *path = NULL;
  int fd = g_file_open_tmp ("lp-huge-XXXXXX.pipeline", &path, &error);
  g_autofree char *pad = NULL;
  g_autofree char *data = NULL;
  gsize len = 16 * 1024 * 1024 + 1;

  g_assert_no_error (error);
  g_assert_cmpint (fd, >=, 0);
  /* valid JSON, just too long: the size alone refuses it */
  pad = g_strnfill (len, ' ');
  data = g_strdup_printf ("{\"stages\": [{\"stage\": \"test-source\"}]%s}", pad);
  g_assert_true (g_file_set_contents (path, data, -1, NULL));
  close (fd);

  g_assert_false (lp_pipeline_load_from_file (pipeline, path, NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID);
  g_assert_nonnull (strstr (error->message, "limited to 16 MiB"));
  g_unlink (path);
}

static void
test_missing_file (void)
{
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;

  g_assert_false (lp_pipeline_load_from_file (pipeline, "/nonexistent/x.pipeline", NULL, &error));
  g_assert_error (error, G_FILE_ERROR, G_FILE_ERROR_NOENT);
  g_assert_nonnull (strstr (error->message, "/nonexistent/x.pipeline"));
}

static void
test_bad_bytes (void)
{
  static const char nul[] = "{\"stages\": [\n {\"stage\": \"test-\0source\"}]}";
  static const char latin1[] = "{\"description\": \"caf\xe9\", \"stages\": []}";
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;

  g_assert_false (lp_pipeline_load_from_data (pipeline, nul, sizeof nul - 1, "nul.pipeline", NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX);
  g_assert_cmpstr (error->message, ==, "nul.pipeline:2:18: invalid JSON: NUL byte");
  g_clear_error (&error);

  g_assert_false (lp_pipeline_load_from_data (pipeline, latin1, -1, "latin1.pipeline", NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_SYNTAX);
  g_assert_cmpstr (error->message, ==, "latin1.pipeline:1:21: invalid JSON: invalid UTF-8");
}

/* What the scanner must not take for a duplicate or a huge number: equal
 * keys in different objects, a value equal to a key, the int64 extremes, a
 * tiny number written out in full. */
static void
test_scanner_no_false_alarms (void)
{
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  const char *data =
    "{\"description\": \"stages\", \"params\": {\"rank\": 2, \"stage\": \"rank\"},\n"
    " \"stages\": [{\"stage\": \"test-source\"},\n"
    "  {\"stage\": \"test-transform\", \"label\": \"rank\", \"rank\": \"${rank}\",\n"
    "   \"offset\": -9223372036854775808, \"threshold\": 1e-30},\n"
    "  {\"stage\": \"test-transform\", \"rank\": 3, \"offset\": 9223372036854775807,\n"
    "   \"threshold\": 0.000000000000000000000000000001},\n"
    "  {\"stage\": \"test-sink\", \"location\": \"x\"}]}";
  gint64 offset;

  lp_pipeline_load_from_data (pipeline, data, -1, "fine", NULL, &error);
  g_assert_no_error (error);
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "offset", &offset, NULL);
  g_assert_cmpint (offset, ==, G_MININT64);
  g_object_get (lp_pipeline_get_stage (pipeline, 2), "offset", &offset, NULL);
  g_assert_cmpint (offset, ==, G_MAXINT64);
}

/* A parameter used thousands of times in a small file: the text that
 * substitution adds is bounded (16 MiB), and the error names the file, the
 * stage, the property and the parameter. Unbounded, this 70 KB file made
 * 64 KiB x 4096 = 256 MiB of one label. */
static void
test_substitution_bounded (void)
{
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *value = g_strnfill (64 * 1024, 'x');
  GString *refs = g_string_new (NULL);
  g_autofree char *data = NULL;
  g_autofree char *label = NULL;

  for (guint i = 0; i < 4096; i++)
    g_string_append (refs, "${big}");
  data = g_strdup_printf ("{\"params\": {\"big\": \"%s\"}, \"stages\": [{\"stage\": \"test-source\"},"
                          " {\"stage\": \"test-transform\", \"rank\": 2, \"label\": \"%s\"},"
                          " {\"stage\": \"test-sink\", \"location\": \"x\"}]}", value, refs->str);
  g_assert_false (lp_pipeline_load_from_data (pipeline, data, -1, "bomb.pipeline", NULL, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID);
  g_assert_true (g_str_has_prefix (error->message,
                                   "bomb.pipeline: stage 2 'test-transform': property 'label': "
                                   "substituting ${big} (65536 bytes) would take the text that "
                                   "parameters add past 16 MiB"));
  g_clear_error (&error);
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 0);

  /* the same from the command line, spread over many stages */
  g_string_truncate (refs, 0);
  g_string_append (refs, "{\"stages\": [{\"stage\": \"test-source\"}");
  for (guint i = 0; i < 300; i++)
    g_string_append (refs, ", {\"stage\": \"test-transform\", \"rank\": 2, \"label\": \"${big}\"}");
  g_string_append (refs, ", {\"stage\": \"test-sink\", \"location\": \"x\"}]}");
  {
    g_autofree char *param = g_strdup_printf ("big=%s", value);
    const char *params[] = { param, NULL };

    g_assert_false (lp_pipeline_load_from_data (pipeline, refs->str, -1, "cli.pipeline", params, &error));
    g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_INVALID);
    /* 256 substitutions of 64 KiB fill the 16 MiB; stage 1 is the source */
    g_assert_true (g_str_has_prefix (error->message,
                                     "cli.pipeline: stage 258 'test-transform': property 'label': "
                                     "substituting ${big} (65536 bytes)"));
    g_clear_error (&error);
  }
  g_string_free (refs, TRUE);

  /* under the bound, it is used as written */
  g_clear_object (&pipeline);
  pipeline = new_pipeline ();
  g_free (data);
  data = g_strdup_printf ("{\"params\": {\"big\": \"%s\"}, \"stages\": [{\"stage\": \"test-source\"},"
                          " {\"stage\": \"test-transform\", \"rank\": 2, \"label\": \"${big}${big}\"},"
                          " {\"stage\": \"test-sink\", \"location\": \"x\"}]}", value);
  g_assert_true (lp_pipeline_load_from_data (pipeline, data, -1, "fine.pipeline", NULL, &error));
  g_assert_no_error (error);
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "label", &label, NULL);
  g_assert_cmpuint (strlen (label), ==, 2 * 64 * 1024);
}

/* Nesting that is deep inside a string is text, not nesting. */
static void
test_brackets_in_strings (void)
{
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *label = g_strnfill (200, '[');
  g_autofree char *data = g_strdup_printf (
    "{\"stages\": [{\"stage\": \"test-source\"}, {\"stage\": \"test-transform\", \"rank\": 2, "
    "\"label\": \"\\\"%s\"}, {\"stage\": \"test-sink\", \"location\": \"x\"}]}", label);
  g_autofree char *got = NULL;

  g_assert_true (lp_pipeline_load_from_data (pipeline, data, -1, "strings", NULL, &error));
  g_assert_no_error (error);
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "label", &got, NULL);
  g_assert_cmpuint (strlen (got), ==, 201);
}

/* ---- good files ------------------------------------------------------- */

static void
run_and_check_trace (LpPipeline *pipeline,
                     const char *expected)
{
  g_autoptr(GError) error = NULL;

  g_clear_pointer (&last_trace, g_free);
  g_assert_true (lp_pipeline_validate (pipeline, &error));
  g_assert_no_error (error);
  g_assert_true (lp_pipeline_run (pipeline, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpstr (last_trace, ==, expected);
}

static void
test_good_chain (void)
{
  g_autofree char *path = pipeline_path ("good", "chain.pipeline");
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  LpStage *t;
  int rank;
  TestMode mode;
  double threshold;
  gboolean verbose;
  g_auto(GStrv) names = NULL;
  guint features;
  g_autofree char *label = NULL;

  g_assert_true (lp_pipeline_load_from_file (pipeline, path, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 3);
  g_assert_cmpstr (lp_pipeline_get_description (pipeline), ==, "A plain list is a chain");
  g_assert_true (g_str_has_suffix (lp_pipeline_get_origin (pipeline), "chain.pipeline"));

  t = lp_pipeline_get_stage (pipeline, 1);
  g_assert_cmpstr (lp_stage_get_stage_name (t), ==, "test-transform");
  g_object_get (t, "rank", &rank, "mode", &mode, "threshold", &threshold, "verbose", &verbose,
                "names", &names, "features", &features, "label", &label, NULL);
  g_assert_cmpint (rank, ==, 4);
  g_assert_cmpint (mode, ==, TEST_MODE_RANDOMIZED);
  g_assert_cmpfloat (threshold, ==, 0.25);
  g_assert_true (verbose);
  g_assert_cmpstrv (names, ((const char *[]) { "q", "v", NULL }));
  g_assert_cmpuint (features, ==, TEST_FEATURE_FAST | TEST_FEATURE_SMALL);
  g_assert_cmpstr (label, ==, "$HOME");

  run_and_check_trace (pipeline, "t4(src3)");
  g_assert_cmpstr (last_location, ==, "out.safetensors");
}

static void
test_good_dag (void)
{
  g_autofree char *path = pipeline_path ("good", "dag.pipeline");
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;

  g_assert_true (lp_pipeline_load_from_file (pipeline, path, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 5);
  g_assert_true (lp_pipeline_lookup_stage (pipeline, "merge") == lp_pipeline_get_stage (pipeline, 2));
  /* inputs in the order "inputs" lists them */
  run_and_check_trace (pipeline, "reduce8(m(b2,a1))");
  g_assert_cmpstr (last_location, ==, "merged.safetensors");
}

static void
test_good_params (void)
{
  g_autofree char *path = pipeline_path ("good", "params.pipeline");
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  LpStage *t;
  int rank;
  gboolean verbose;
  double threshold;
  g_autofree char *label = NULL;
  g_auto(GStrv) names = NULL;
  GHashTable *params;

  g_assert_true (lp_pipeline_load_from_file (pipeline, path, NULL, &error));
  g_assert_no_error (error);
  t = lp_pipeline_get_stage (pipeline, 1);
  g_object_get (t, "rank", &rank, "verbose", &verbose, "threshold", &threshold,
                "label", &label, "names", &names, NULL);
  /* "${rank}" alone keeps the JSON type: an integer, a boolean, a double */
  g_assert_cmpint (rank, ==, 4);
  g_assert_true (verbose);
  g_assert_cmpfloat (threshold, ==, 0.5);
  g_assert_cmpstr (label, ==, "lora-r4 costs $5");
  g_assert_cmpstrv (names, ((const char *[]) { "lora", "x", NULL }));
  params = lp_pipeline_get_params (pipeline);
  g_assert_cmpstr (g_hash_table_lookup (params, "rank"), ==, "4");
  g_assert_cmpstr (g_hash_table_lookup (params, "output"), ==, "lora-reduced.safetensors");
  run_and_check_trace (pipeline, "t4(src1)");
  g_assert_cmpstr (last_location, ==, "lora-reduced.safetensors");
}

static void
test_good_params_override (void)
{
  g_autofree char *path = pipeline_path ("good", "params.pipeline");
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  const char *params[] = { "rank=8", "output=/tmp/o.safetensors", "exact=no", "threshold=0.125",
                           "input=base", NULL };
  int rank;
  gboolean verbose;
  double threshold;
  g_autofree char *label = NULL;
  g_autofree char *location = NULL;

  g_assert_true (lp_pipeline_load_from_file (pipeline, path, params, &error));
  g_assert_no_error (error);
  /* command-line values are text, converted through each property's pspec */
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "rank", &rank, "verbose", &verbose,
                "threshold", &threshold, "label", &label, NULL);
  g_assert_cmpint (rank, ==, 8);
  g_assert_false (verbose);
  g_assert_cmpfloat (threshold, ==, 0.125);
  g_assert_cmpstr (label, ==, "base-r8 costs $5");
  g_object_get (lp_pipeline_get_stage (pipeline, 2), "location", &location, NULL);
  g_assert_cmpstr (location, ==, "/tmp/o.safetensors");
  g_assert_cmpstr (g_hash_table_lookup (lp_pipeline_get_params (pipeline), "rank"), ==, "8");
}

/* A command-line parameter the file uses but does not declare is fine. */
static void
test_params_cli_only (void)
{
  static const char data[] =
    "{\"stages\": [{\"stage\": \"test-source\"}, {\"stage\": \"test-sink\", \"location\": \"${out}\"}]}";
  const char *params[] = { "out=o.safetensors", NULL };
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *location = NULL;

  g_assert_true (lp_pipeline_load_from_data (pipeline, data, -1, "cli", params, &error));
  g_assert_no_error (error);
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "location", &location, NULL);
  g_assert_cmpstr (location, ==, "o.safetensors");
}

/* $$ is a literal $ in parameter values too, so "$${a}" is no reference. */
static void
test_params_escape (void)
{
  static const char data[] =
    "{\"params\": {\"a\": \"$${a}\"}, \"stages\": [{\"stage\": \"test-source\"}, "
    "{\"stage\": \"test-transform\", \"rank\": 1, \"label\": \"${a}\", \"names\": [\"${b}\"]}, "
    "{\"stage\": \"test-sink\", \"location\": \"${b}/x\"}]}";
  const char *params[] = { "b=$$HOME", NULL };
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  g_autofree char *label = NULL;
  g_autofree char *location = NULL;
  g_auto(GStrv) names = NULL;

  g_assert_true (lp_pipeline_load_from_data (pipeline, data, -1, "escape", params, &error));
  g_assert_no_error (error);
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "label", &label, "names", &names, NULL);
  g_assert_cmpstr (label, ==, "${a}");
  g_assert_cmpstrv (names, ((const char *[]) { "$HOME", NULL }));
  g_object_get (lp_pipeline_get_stage (pipeline, 2), "location", &location, NULL);
  g_assert_cmpstr (location, ==, "$HOME/x");
}

/* ---- launch syntax ---------------------------------------------------- */

static void
test_launch_chain (void)
{
  const char *argv[] = { "test-source", "count=2", "!", "test-transform", "rank=3",
                         "mode=RANDOMIZED", "names=a, b", "features=fast|small", "offset=-9223372036854775808",
                         "!", "test-sink", "location=b.safetensors", NULL };
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;
  int rank;
  TestMode mode;
  g_auto(GStrv) names = NULL;
  guint features;
  gint64 offset;

  g_assert_true (lp_pipeline_parse_launch (pipeline, argv, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 3);
  g_assert_cmpstr (lp_pipeline_get_origin (pipeline), ==, "launch");
  g_object_get (lp_pipeline_get_stage (pipeline, 1), "rank", &rank, "mode", &mode,
                "names", &names, "features", &features, "offset", &offset, NULL);
  g_assert_cmpint (rank, ==, 3);
  g_assert_cmpint (mode, ==, TEST_MODE_RANDOMIZED);
  g_assert_cmpstrv (names, ((const char *[]) { "a", "b", NULL }));
  g_assert_cmpuint (features, ==, TEST_FEATURE_FAST | TEST_FEATURE_SMALL);
  g_assert_cmpint (offset, ==, G_MININT64);
  run_and_check_trace (pipeline, "t3(src2)");
}

typedef struct {
  const char *argv[8];
  int code;
  const char *message;
} LaunchCase;

static const LaunchCase launch_cases[] = {
  { { NULL }, LP_PIPELINE_ERROR_EMPTY,
    "launch: no stage given; write: source key=value ! stage ... ! sink key=value" },
  { { "!", "test-source", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 1 is empty: '!' comes before any stage" },
  { { "test-source", "!", "!", "test-sink", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 2 is empty: '!' follows another '!'" },
  { { "test-source", "!", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: '!' at the end, with no stage after it" },
  { { "location=a", "test-source", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: property 'location=a' comes before any stage" },
  { { "test-source", "!", "rank=4", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 2 is empty: 'rank=4' follows '!' where a stage name is expected" },
  { { "test-source", "=4", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 1 'test-source': '=4' has no property name before '='" },
  { { "test-source", "test-sink", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 1 'test-source': 'test-sink' is not key=value (put '!' between stages)" },
  { { "test-source", "!", "test-sink", "out.safetensors", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 2 'test-sink': 'out.safetensors' is not key=value; did you mean location=out.safetensors?" },
  { { "test-source", "!", "test-sink", "location=a", "b.safetensors", NULL }, LP_PIPELINE_ERROR_INVALID,
    "launch: stage 2 'test-sink': 'b.safetensors' is not key=value (write PROPERTY=VALUE; `lpipe inspect test-sink` lists them)" },
  { { "test-source", "!", "test-transfrom", NULL }, LP_PIPELINE_ERROR_UNKNOWN_STAGE,
    "launch: stage 2: unknown stage 'test-transfrom'; did you mean 'test-transform'?" },
  { { "test-source", "!", "test-transform", "rnak=4", NULL }, LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
    "launch: stage 2 'test-transform': unknown property 'rnak'; did you mean 'rank'?" },
  { { "test-source", "!", "test-transform", "rank=0", NULL }, LP_PIPELINE_ERROR_BAD_VALUE,
    "launch: stage 2 'test-transform': property 'rank': 0 is out of range; expected integer [1, 4096]" },
  { { "test-source", "!", "test-transform", "rank=4.5", NULL }, LP_PIPELINE_ERROR_BAD_VALUE,
    "launch: stage 2 'test-transform': property 'rank': expected integer [1, 4096], got '4.5'" },
  { { "test-source", "count=-3", NULL }, LP_PIPELINE_ERROR_BAD_VALUE,
    "launch: stage 1 'test-source': property 'count': -3 is out of range; expected integer [0, 1000]" },
  { { "test-source", "!", "test-transform", "rank=4", "threshold=NaN", NULL }, LP_PIPELINE_ERROR_BAD_VALUE,
    "launch: stage 2 'test-transform': property 'threshold': NaN is not a number it can take" },
  { { "test-source", "!", "test-transform", "rank=4", "!", "test-sink", NULL }, LP_PIPELINE_ERROR_MISSING_PROPERTY,
    "launch: stage 3 'test-sink': required property 'location' (string) is not set" },
  { { "test-source", "!", "test-source", NULL }, LP_PIPELINE_ERROR_ARITY,
    "launch: stage 2 'test-source': a source takes no input, but it is given 1" },
  { { "test-source", "!", "test-merge", NULL }, LP_PIPELINE_ERROR_ARITY,
    "launch: stage 2 'test-merge': takes at least 2 inputs, but it has 1" },
};

static void
test_launch_bad (gconstpointer data)
{
  const LaunchCase *c = data;
  g_autoptr(LpPipeline) pipeline = new_pipeline ();
  g_autoptr(GError) error = NULL;

  g_assert_false (lp_pipeline_parse_launch (pipeline, c->argv, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, c->code);
  g_assert_cmpuint (lp_pipeline_get_n_stages (pipeline), ==, 0);
  if (strcmp (error->message, c->message) != 0)
    g_test_fail_printf ("got \"%s\", expected \"%s\"", error->message, c->message);
}

/* ---- lp-value --------------------------------------------------------- */

static GParamSpec *
transform_pspec (const char *name)
{
  g_autoptr(GTypeClass) klass = g_type_class_ref (TEST_TYPE_TRANSFORM);
  return g_object_class_find_property (G_OBJECT_CLASS (klass), name);
}

static void
test_value_integers (void)
{
  g_autoptr(GParamSpec) i64 = g_param_spec_int64 ("x", NULL, NULL, G_MININT64, G_MAXINT64, 0, 0);
  g_autoptr(GParamSpec) u64 = g_param_spec_uint64 ("u", NULL, NULL, 0, G_MAXUINT64, 0, 0);
  g_autoptr(GParamSpec) u8 = g_param_spec_uchar ("c", NULL, NULL, 0, 255, 0, 0);
  g_auto(GValue) v = G_VALUE_INIT;
  g_autoptr(GError) error = NULL;
  static const char *junk[] = { "", " 4", "4 ", "4x", "0x10", "4.0", "1e3", "+-1" };

  g_assert_true (lp_value_from_string (i64, "9223372036854775807", &v, &error));
  g_assert_cmpint (g_value_get_int64 (&v), ==, G_MAXINT64);
  g_assert_true (lp_value_from_string (i64, "-9223372036854775808", &v, &error));
  g_assert_cmpint (g_value_get_int64 (&v), ==, G_MININT64);
  g_assert_false (lp_value_from_string (i64, "9223372036854775808", &v, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_assert_false (G_IS_VALUE (&v));
  g_clear_error (&error);

  g_assert_true (lp_value_from_string (u64, "18446744073709551615", &v, &error));
  g_assert_cmpuint (g_value_get_uint64 (&v), ==, G_MAXUINT64);
  g_assert_false (lp_value_from_string (u64, "-1", &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'u': -1 is out of range; expected integer >= 0");
  g_clear_error (&error);
  g_assert_false (lp_value_from_string (u8, "256", &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'c': 256 is out of range; expected integer [0, 255]");
  g_clear_error (&error);

  for (guint i = 0; i < G_N_ELEMENTS (junk); i++)
    {
      g_assert_false (lp_value_from_string (i64, junk[i], &v, &error));
      g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
      g_clear_error (&error);
    }
}

static void
test_value_text (void)
{
  GParamSpec *verbose = transform_pspec ("verbose");
  GParamSpec *threshold = transform_pspec ("threshold");
  GParamSpec *mode = transform_pspec ("mode");
  GParamSpec *features = transform_pspec ("features");
  GParamSpec *names = transform_pspec ("names");
  g_auto(GValue) v = G_VALUE_INIT;
  g_autoptr(GError) error = NULL;
  static const char *yes[] = { "true", "TRUE", "yes", "on", "1" };
  static const char *no[] = { "false", "No", "off", "0" };

  for (guint i = 0; i < G_N_ELEMENTS (yes); i++)
    {
      g_assert_true (lp_value_from_string (verbose, yes[i], &v, &error));
      g_assert_true (g_value_get_boolean (&v));
    }
  for (guint i = 0; i < G_N_ELEMENTS (no); i++)
    {
      g_assert_true (lp_value_from_string (verbose, no[i], &v, &error));
      g_assert_false (g_value_get_boolean (&v));
    }
  g_assert_false (lp_value_from_string (verbose, "maybe", &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'verbose': expected boolean, got 'maybe'");
  g_clear_error (&error);

  g_assert_true (lp_value_from_string (threshold, "1e-3", &v, &error));
  g_assert_cmpfloat (g_value_get_double (&v), ==, 1e-3);
  g_assert_true (lp_value_from_string (threshold, "1", &v, &error));
  g_assert_false (lp_value_from_string (threshold, "-inf", &v, &error));
  g_assert_error (error, LP_PIPELINE_ERROR, LP_PIPELINE_ERROR_BAD_VALUE);
  g_clear_error (&error);
  g_assert_false (lp_value_from_string (threshold, "nan", &v, &error));
  g_assert_nonnull (strstr (error->message, "NaN"));
  g_clear_error (&error);
  g_assert_false (lp_value_from_string (threshold, " 0.5", &v, &error));
  g_clear_error (&error);

  g_assert_true (lp_value_from_string (mode, "Exact", &v, &error));
  g_assert_cmpint (g_value_get_enum (&v), ==, TEST_MODE_EXACT);
  g_assert_true (lp_value_from_string (mode, "TEST_MODE_RANDOMIZED", &v, &error));
  g_assert_cmpint (g_value_get_enum (&v), ==, TEST_MODE_RANDOMIZED);
  g_assert_false (lp_value_from_string (mode, "fast", &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'mode': unknown value 'fast'; expected enum: exact|randomized");
  g_clear_error (&error);

  g_assert_true (lp_value_from_string (features, "", &v, &error));
  g_assert_cmpuint (g_value_get_flags (&v), ==, 0);
  g_assert_true (lp_value_from_string (features, "small", &v, &error));
  g_assert_cmpuint (g_value_get_flags (&v), ==, TEST_FEATURE_SMALL);

  g_assert_true (lp_value_from_string (names, "", &v, &error));
  g_assert_cmpuint (g_strv_length (g_value_get_boxed (&v)), ==, 0);
  g_assert_no_error (error);
}

static void
test_value_json (void)
{
  GParamSpec *rank = transform_pspec ("rank");
  GParamSpec *threshold = transform_pspec ("threshold");
  GParamSpec *label = transform_pspec ("label");
  g_auto(GValue) v = G_VALUE_INIT;
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) n = NULL;

  n = json_from_string ("7", NULL);
  g_assert_true (lp_value_from_json (rank, n, &v, &error));
  g_assert_cmpint (g_value_get_int (&v), ==, 7);
  /* an integer is a number for a double */
  g_assert_false (lp_value_from_json (threshold, n, &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'threshold': 7 is out of range; expected double [0, 1]");
  g_clear_error (&error);
  g_assert_false (lp_value_from_json (label, n, &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'label': expected string, got 7");
  g_clear_error (&error);
  g_clear_pointer (&n, json_node_unref);

  n = json_from_string ("4.0", NULL);
  g_assert_false (lp_value_from_json (rank, n, &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'rank': expected integer [1, 4096], got 4");
  g_clear_error (&error);
  g_clear_pointer (&n, json_node_unref);

  n = json_from_string ("{\"a\": 1}", NULL);
  g_assert_false (lp_value_from_json (rank, n, &v, &error));
  g_assert_cmpstr (error->message, ==, "property 'rank': expected integer [1, 4096], got an object");
  g_clear_error (&error);
  g_clear_pointer (&n, json_node_unref);

  n = json_from_string ("null", NULL);
  g_assert_true (lp_value_from_json (label, n, &v, &error));
  g_assert_null (g_value_get_string (&v));
}

static void
test_value_describe (void)
{
  static const struct { const char *property; const char *description; } cases[] = {
    { "rank", "integer [1, 4096]" },
    { "mode", "enum: exact|randomized" },
    { "threshold", "double [0, 1]" },
    { "verbose", "boolean" },
    { "names", "list of strings" },
    { "features", "flags: fast|small" },
    { "label", "string" },
    { "offset", "integer" },
  };
  g_autoptr(GParamSpec) count = g_param_spec_uint ("count", NULL, NULL, 0, G_MAXUINT, 0, 0);
  g_autoptr(GParamSpec) d = g_param_spec_double ("d", NULL, NULL, 0, G_MAXDOUBLE, 0, 0);
  g_autofree char *count_desc = lp_param_spec_describe_type (count);
  g_autofree char *d_desc = lp_param_spec_describe_type (d);

  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      g_autofree char *got = lp_param_spec_describe_type (transform_pspec (cases[i].property));
      g_assert_cmpstr (got, ==, cases[i].description);
    }
  g_assert_cmpstr (count_desc, ==, "integer >= 0");
  g_assert_cmpstr (d_desc, ==, "double >= 0");
}

/* What lp_value_to_string writes, lp_value_from_string reads back the same. */
static void
test_value_round_trip (void)
{
  static const struct { const char *property; const char *text; const char *shown; } cases[] = {
    { "rank", "4096", "4096" },
    { "mode", "RANDOMIZED", "randomized" },
    { "threshold", "0.1", "0.1" },
    { "threshold", "0.30000000000000004", "0.30000000000000004" },
    { "verbose", "yes", "true" },
    { "names", "a,b , c", "a,b,c" },
    { "features", "small|fast", "fast|small" },
    { "features", "", "" },
    { "label", "x y", "x y" },
    { "offset", "-9223372036854775808", "-9223372036854775808" },
  };

  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      GParamSpec *pspec = transform_pspec (cases[i].property);
      g_auto(GValue) v = G_VALUE_INIT;
      g_auto(GValue) back = G_VALUE_INIT;
      g_autoptr(GError) error = NULL;
      g_autofree char *shown = NULL;
      g_autofree char *shown_back = NULL;

      g_assert_true (lp_value_from_string (pspec, cases[i].text, &v, &error));
      g_assert_no_error (error);
      shown = lp_value_to_string (&v);
      g_assert_cmpstr (shown, ==, cases[i].shown);
      g_assert_true (lp_value_from_string (pspec, shown, &back, &error));
      /* boxed values compare by pointer, so compare what they print */
      if (!G_IS_PARAM_SPEC_BOXED (pspec))
        g_assert_cmpint (g_param_values_cmp (pspec, &v, &back), ==, 0);
      shown_back = lp_value_to_string (&back);
      g_assert_cmpstr (shown_back, ==, shown);
    }
}

int
main (int argc, char *argv[])
{
  g_autoptr(GError) error = NULL;
  int status;

  g_test_init (&argc, &argv, NULL);

  registry = lp_registry_new ();
  if (!lp_registry_register_stage (registry, TEST_TYPE_SOURCE, &error) ||
      !lp_registry_register_stage (registry, TEST_TYPE_TRANSFORM, &error) ||
      !lp_registry_register_stage (registry, TEST_TYPE_SINK, &error) ||
      !lp_registry_register_stage (registry, TEST_TYPE_MERGE, &error))
    g_error ("registering the test stages: %s", error->message);

  for (guint i = 0; i < G_N_ELEMENTS (bad_cases); i++)
    {
      g_autofree char *name = g_strdup_printf ("/pipeline-file/bad/%u-%s", i, bad_cases[i].file);
      g_test_add_data_func (name, &bad_cases[i], test_bad_file);
    }
  g_test_add_func ("/pipeline-file/bad/all-listed", test_bad_all_listed);
  g_test_add_func ("/pipeline-file/bad/huge", test_huge_file);
  g_test_add_func ("/pipeline-file/bad/missing-file", test_missing_file);
  g_test_add_func ("/pipeline-file/bad/bytes", test_bad_bytes);
  g_test_add_func ("/pipeline-file/bad/substitution-bounded", test_substitution_bounded);
  g_test_add_func ("/pipeline-file/good/scanner-no-false-alarms", test_scanner_no_false_alarms);
  g_test_add_func ("/pipeline-file/good/brackets-in-strings", test_brackets_in_strings);
  g_test_add_func ("/pipeline-file/good/chain", test_good_chain);
  g_test_add_func ("/pipeline-file/good/dag", test_good_dag);
  g_test_add_func ("/pipeline-file/good/params", test_good_params);
  g_test_add_func ("/pipeline-file/good/params-override", test_good_params_override);
  g_test_add_func ("/pipeline-file/good/params-cli-only", test_params_cli_only);
  g_test_add_func ("/pipeline-file/good/params-escape", test_params_escape);
  g_test_add_func ("/launch/chain", test_launch_chain);
  for (guint i = 0; i < G_N_ELEMENTS (launch_cases); i++)
    {
      g_autofree char *name = g_strdup_printf ("/launch/bad/%u", i);
      g_test_add_data_func (name, &launch_cases[i], test_launch_bad);
    }
  g_test_add_func ("/value/integers", test_value_integers);
  g_test_add_func ("/value/text", test_value_text);
  g_test_add_func ("/value/json", test_value_json);
  g_test_add_func ("/value/describe", test_value_describe);
  g_test_add_func ("/value/round-trip", test_value_round_trip);

  status = g_test_run ();
  g_object_unref (registry);
  g_free (last_trace);
  g_free (last_location);
  return status;
}
