/* lp-error.h: the error domains of lpipe
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#if !defined(LPIPE_INSIDE) && !defined(LPIPE_COMPILATION)
#error "Only <lpipe/lpipe.h> or <lpipe/lpipe-plugin.h> can be included directly."
#endif

#include <glib.h>

G_BEGIN_DECLS

/**
 * LpPipelineError:
 * @LP_PIPELINE_ERROR_SYNTAX: the file is not valid JSON
 * @LP_PIPELINE_ERROR_INVALID: the JSON is not a pipeline (wrong types, missing keys, bad version)
 * @LP_PIPELINE_ERROR_UNKNOWN_STAGE: no stage of that name is registered
 * @LP_PIPELINE_ERROR_UNKNOWN_PROPERTY: the stage has no property of that name
 * @LP_PIPELINE_ERROR_BAD_VALUE: a property value of the wrong type or out of range
 * @LP_PIPELINE_ERROR_MISSING_PROPERTY: a required property was not set
 * @LP_PIPELINE_ERROR_UNDEFINED_PARAM: a `${name}` reference with no value
 * @LP_PIPELINE_ERROR_UNKNOWN_ID: an input names an id that no stage has
 * @LP_PIPELINE_ERROR_DUPLICATE_ID: two stages share one id
 * @LP_PIPELINE_ERROR_CYCLE: the stages' inputs form a cycle
 * @LP_PIPELINE_ERROR_ARITY: a stage has too few or too many inputs
 * @LP_PIPELINE_ERROR_EMPTY: the pipeline has no stage, or nothing consumes its result
 *
 * Errors in the description of a pipeline, found before anything runs.
 */
typedef enum {
  LP_PIPELINE_ERROR_SYNTAX,
  LP_PIPELINE_ERROR_INVALID,
  LP_PIPELINE_ERROR_UNKNOWN_STAGE,
  LP_PIPELINE_ERROR_UNKNOWN_PROPERTY,
  LP_PIPELINE_ERROR_BAD_VALUE,
  LP_PIPELINE_ERROR_MISSING_PROPERTY,
  LP_PIPELINE_ERROR_UNDEFINED_PARAM,
  LP_PIPELINE_ERROR_UNKNOWN_ID,
  LP_PIPELINE_ERROR_DUPLICATE_ID,
  LP_PIPELINE_ERROR_CYCLE,
  LP_PIPELINE_ERROR_ARITY,
  LP_PIPELINE_ERROR_EMPTY,
} LpPipelineError;

/**
 * LpPluginError:
 * @LP_PLUGIN_ERROR_LOAD: the shared object could not be opened
 * @LP_PLUGIN_ERROR_NO_ENTRY: the shared object has no `lp_plugin_desc` symbol
 * @LP_PLUGIN_ERROR_ABI: the plugin was built for another ABI version
 * @LP_PLUGIN_ERROR_DUPLICATE: a plugin or stage of that name is registered already
 * @LP_PLUGIN_ERROR_REGISTER: the plugin's register function failed
 *
 * Errors loading a plugin or registering a stage type.
 */
typedef enum {
  LP_PLUGIN_ERROR_LOAD,
  LP_PLUGIN_ERROR_NO_ENTRY,
  LP_PLUGIN_ERROR_ABI,
  LP_PLUGIN_ERROR_DUPLICATE,
  LP_PLUGIN_ERROR_REGISTER,
} LpPluginError;

/**
 * LpFormatError:
 * @LP_FORMAT_ERROR_TRUNCATED: the file ends before its header or data do
 * @LP_FORMAT_ERROR_HEADER_SIZE: the header length is zero, too large or overflows
 * @LP_FORMAT_ERROR_ENCODING: the header is not strict UTF-8, or a name holds NUL
 * @LP_FORMAT_ERROR_SYNTAX: the header is not exactly one JSON object
 * @LP_FORMAT_ERROR_ENTRY: a tensor entry is malformed (keys missing, duplicated or of the wrong type)
 * @LP_FORMAT_ERROR_DTYPE: an unknown dtype name
 * @LP_FORMAT_ERROR_SHAPE: a shape is not a list of non-negative integers, or its size overflows
 * @LP_FORMAT_ERROR_OFFSETS: offsets do not tile the data section exactly
 * @LP_FORMAT_ERROR_METADATA: `__metadata__` is not a string to string object
 * @LP_FORMAT_ERROR_DUPLICATE: two tensors share one name
 * @LP_FORMAT_ERROR_TOO_DEEP: the header nests deeper than the format allows
 * @LP_FORMAT_ERROR_UNSUPPORTED: a conversion that this dtype does not support
 * @LP_FORMAT_ERROR_INDEX: a sharded checkpoint's index and its shards disagree
 * @LP_FORMAT_ERROR_CHANGED: the file was shortened or rewritten in place while
 *   it was read
 *
 * Errors in a checkpoint file's contents.
 */
typedef enum {
  LP_FORMAT_ERROR_TRUNCATED,
  LP_FORMAT_ERROR_HEADER_SIZE,
  LP_FORMAT_ERROR_ENCODING,
  LP_FORMAT_ERROR_SYNTAX,
  LP_FORMAT_ERROR_ENTRY,
  LP_FORMAT_ERROR_DTYPE,
  LP_FORMAT_ERROR_SHAPE,
  LP_FORMAT_ERROR_OFFSETS,
  LP_FORMAT_ERROR_METADATA,
  LP_FORMAT_ERROR_DUPLICATE,
  LP_FORMAT_ERROR_TOO_DEEP,
  LP_FORMAT_ERROR_UNSUPPORTED,
  LP_FORMAT_ERROR_INDEX,
  LP_FORMAT_ERROR_CHANGED,
} LpFormatError;

/**
 * LpStageError:
 * @LP_STAGE_ERROR_FAILED: the stage failed for a reason given in the message
 * @LP_STAGE_ERROR_INVALID_PROPERTY: properties that are valid one by one but not together
 * @LP_STAGE_ERROR_INVALID_INPUT: the input checkpoint does not suit the stage (shapes, names, dtypes)
 * @LP_STAGE_ERROR_NUMERIC: NaN or infinity where a finite number is needed
 * @LP_STAGE_ERROR_CHECK_FAILED: a check stage's condition does not hold
 * @LP_STAGE_ERROR_NO_MEMORY: a buffer whose size follows from the input could not
 *   be allocated (out of memory, or an address-space limit); see lp_try_alloc()
 *
 * Errors raised by stages while they run.
 */
typedef enum {
  LP_STAGE_ERROR_FAILED,
  LP_STAGE_ERROR_INVALID_PROPERTY,
  LP_STAGE_ERROR_INVALID_INPUT,
  LP_STAGE_ERROR_NUMERIC,
  LP_STAGE_ERROR_CHECK_FAILED,
  LP_STAGE_ERROR_NO_MEMORY,
} LpStageError;

#define LP_PIPELINE_ERROR (lp_pipeline_error_quark ())
#define LP_PLUGIN_ERROR (lp_plugin_error_quark ())
#define LP_FORMAT_ERROR (lp_format_error_quark ())
#define LP_STAGE_ERROR (lp_stage_error_quark ())

GQuark lp_pipeline_error_quark (void);
GQuark lp_plugin_error_quark (void);
GQuark lp_format_error_quark (void);
GQuark lp_stage_error_quark (void);

gpointer lp_try_alloc  (gsize         n_elements,
                        gsize         element_size,
                        const char   *what,
                        GError      **error);
gpointer lp_try_alloc0 (gsize         n_elements,
                        gsize         element_size,
                        const char   *what,
                        GError      **error);

G_END_DECLS
