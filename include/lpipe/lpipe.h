/* lpipe.h: the one header users of liblpipe include
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#define LPIPE_INSIDE
#include <lpipe/lp-error.h>
#include <lpipe/lp-dtype.h>
#include <lpipe/lp-enum-types.h>
#include <lpipe/lp-version.h>
#include <lpipe/lp-tensor.h>
#include <lpipe/lp-checkpoint.h>
#include <lpipe/lp-name-filter.h>
#include <lpipe/lp-model-names.h>
#include <lpipe/lp-stage.h>
#include <lpipe/lp-registry.h>
#include <lpipe/lp-run-stats.h>
#include <lpipe/lp-pipeline.h>
#include <lpipe/lp-safetensors.h>
#include <lpipe/lp-lora.h>
#undef LPIPE_INSIDE
