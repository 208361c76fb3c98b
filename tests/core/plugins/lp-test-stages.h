/* lp-test-stages.h: tiny stages the core tests run pipelines with
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include <lpipe/lpipe-plugin.h>

G_BEGIN_DECLS

/* test-source: `count` tensors named t0, t1... of `size` f32 values, lazily
 * computed; each value is the tensor's index. */
#define LP_TYPE_TEST_SOURCE (lp_test_source_get_type ())
G_DECLARE_FINAL_TYPE (LpTestSource, lp_test_source, LP, TEST_SOURCE, LpSource)

/* test-add: adds `amount` to every value (lazily); `fail-on` names a tensor
 * whose computation fails. */
#define LP_TYPE_TEST_ADD (lp_test_add_get_type ())
G_DECLARE_FINAL_TYPE (LpTestAdd, lp_test_add, LP, TEST_ADD, LpTransform)

/* test-collect: a sink that pulls everything; read-only properties `sum`,
 * `n-tensors` and `order` (the names, in the order received). */
#define LP_TYPE_TEST_COLLECT (lp_test_collect_get_type ())
G_DECLARE_FINAL_TYPE (LpTestCollect, lp_test_collect, LP, TEST_COLLECT, LpSink)

/* test-concat: an aggregator that puts the inputs' tensors side by side,
 * prefixing names with the input's position. */
#define LP_TYPE_TEST_CONCAT (lp_test_concat_get_type ())
G_DECLARE_FINAL_TYPE (LpTestConcat, lp_test_concat, LP, TEST_CONCAT, LpAggregator)


G_END_DECLS
