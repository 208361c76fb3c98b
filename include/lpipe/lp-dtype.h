/* lp-dtype.h: safetensors element types and conversions
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
 * LpDtype:
 * @LP_DTYPE_BOOL: boolean, one byte
 * @LP_DTYPE_U8: unsigned 8-bit integer
 * @LP_DTYPE_I8: signed 8-bit integer
 * @LP_DTYPE_F8_E5M2: 8-bit float, 5 exponent bits, 2 mantissa bits, with infinities
 * @LP_DTYPE_F8_E4M3: 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (OCP E4M3FN)
 * @LP_DTYPE_F8_E8M0: 8-bit power of two scale (OCP MX)
 * @LP_DTYPE_F8_E4M3FNUZ: E4M3 with no negative zero, bias 8
 * @LP_DTYPE_F8_E5M2FNUZ: E5M2 with no negative zero, bias 16
 * @LP_DTYPE_I16: signed 16-bit integer
 * @LP_DTYPE_U16: unsigned 16-bit integer
 * @LP_DTYPE_F16: IEEE half precision
 * @LP_DTYPE_BF16: bfloat16
 * @LP_DTYPE_I32: signed 32-bit integer
 * @LP_DTYPE_U32: unsigned 32-bit integer
 * @LP_DTYPE_F32: IEEE single precision
 * @LP_DTYPE_C64: complex of two single precision floats
 * @LP_DTYPE_F64: IEEE double precision
 * @LP_DTYPE_I64: signed 64-bit integer
 * @LP_DTYPE_U64: unsigned 64-bit integer
 * @LP_DTYPE_F4: 4-bit float (E2M1)
 * @LP_DTYPE_F6_E2M3: 6-bit float, 2 exponent bits, 3 mantissa bits
 * @LP_DTYPE_F6_E3M2: 6-bit float, 3 exponent bits, 2 mantissa bits
 *
 * The element types of the safetensors format. Every one is carried through
 * untouched; lp_dtype_can_convert() tells which ones convert to and from
 * f32 and f64.
 */
typedef enum {
  LP_DTYPE_BOOL,
  LP_DTYPE_U8,
  LP_DTYPE_I8,
  LP_DTYPE_F8_E5M2,
  LP_DTYPE_F8_E4M3,
  LP_DTYPE_F8_E8M0,
  LP_DTYPE_F8_E4M3FNUZ,
  LP_DTYPE_F8_E5M2FNUZ,
  LP_DTYPE_I16,
  LP_DTYPE_U16,
  LP_DTYPE_F16,
  LP_DTYPE_BF16,
  LP_DTYPE_I32,
  LP_DTYPE_U32,
  LP_DTYPE_F32,
  LP_DTYPE_C64,
  LP_DTYPE_F64,
  LP_DTYPE_I64,
  LP_DTYPE_U64,
  LP_DTYPE_F4,
  LP_DTYPE_F6_E2M3,
  LP_DTYPE_F6_E3M2,
} LpDtype;

#define LP_DTYPE_N_TYPES (LP_DTYPE_F6_E3M2 + 1)

/**
 * LpFloatDtype:
 * @LP_FLOAT_DTYPE_F64: IEEE double precision
 * @LP_FLOAT_DTYPE_F32: IEEE single precision
 * @LP_FLOAT_DTYPE_F16: IEEE half precision
 * @LP_FLOAT_DTYPE_BF16: bfloat16
 * @LP_FLOAT_DTYPE_F8_E4M3: 8-bit float, no infinities (OCP E4M3FN)
 * @LP_FLOAT_DTYPE_F8_E5M2: 8-bit float with infinities
 *
 * The float dtypes lpipe converts to and from (lp_dtype_can_convert()):
 * the type of properties that choose a dtype to write, so that they offer
 * only those. Each value is the #LpDtype of the same name.
 */
typedef enum {
  LP_FLOAT_DTYPE_F64 = LP_DTYPE_F64,
  LP_FLOAT_DTYPE_F32 = LP_DTYPE_F32,
  LP_FLOAT_DTYPE_F16 = LP_DTYPE_F16,
  LP_FLOAT_DTYPE_BF16 = LP_DTYPE_BF16,
  LP_FLOAT_DTYPE_F8_E4M3 = LP_DTYPE_F8_E4M3,
  LP_FLOAT_DTYPE_F8_E5M2 = LP_DTYPE_F8_E5M2,
} LpFloatDtype;

gboolean     lp_dtype_from_string (const char *name,
                                   LpDtype    *dtype);
gboolean     lp_dtype_parse       (const char *text,
                                   LpDtype    *dtype);
const char  *lp_dtype_to_string   (LpDtype     dtype);
guint        lp_dtype_get_bits    (LpDtype     dtype);
gboolean     lp_dtype_is_float    (LpDtype     dtype);
gboolean     lp_dtype_can_convert (LpDtype     dtype);

void         lp_dtype_to_f32      (LpDtype        dtype,
                                   gconstpointer  src,
                                   float         *dst,
                                   gsize          n);
gsize        lp_dtype_from_f32    (LpDtype        dtype,
                                   const float   *src,
                                   gpointer       dst,
                                   gsize          n);
void         lp_dtype_to_f64      (LpDtype        dtype,
                                   gconstpointer  src,
                                   double        *dst,
                                   gsize          n);
gsize        lp_dtype_from_f64    (LpDtype        dtype,
                                   const double  *src,
                                   gpointer       dst,
                                   gsize          n);
gsize        lp_dtype_convert     (LpDtype        src_dtype,
                                   gconstpointer  src,
                                   LpDtype        dst_dtype,
                                   gpointer       dst,
                                   gsize          n);

G_END_DECLS
