/* test-tensor.c: tensors and checkpoints
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-test-util.h"

static void
test_held (void)
{
  const float values[6] = { 1, 2, 3, 4, 5, 6 };
  const guint64 shape[2] = { 2, 3 };
  g_autoptr(LpTensor) t = lp_test_tensor ("w", LP_DTYPE_F32, shape, 2, values);
  g_autoptr(GBytes) bytes = NULL;
  g_autofree float *back = NULL;
  g_autofree char *desc = NULL;
  gsize n = 0;

  g_assert_cmpstr (lp_tensor_get_name (t), ==, "w");
  g_assert_cmpuint (lp_tensor_get_n_elements (t), ==, 6);
  g_assert_cmpuint (lp_tensor_get_n_bytes (t), ==, 24);
  g_assert_cmpuint (lp_tensor_get_dim (t, 1), ==, 3);
  g_assert_false (lp_tensor_is_lazy (t));
  desc = lp_tensor_describe_shape (t);
  g_assert_cmpstr (desc, ==, "[2, 3]");
  bytes = lp_tensor_dup_data (t, NULL);
  g_assert_cmpmem (g_bytes_get_data (bytes, NULL), 24, values, 24);
  back = lp_tensor_dup_f32 (t, &n, NULL);
  g_assert_cmpmem (back, n * sizeof (float), values, sizeof values);
}

static void
test_wrong_size (void)
{
  const guint64 shape[2] = { 2, 3 };
  g_autoptr(GBytes) bytes = g_bytes_new_static ("0123456789", 10);
  g_autoptr(GError) error = NULL;

  g_assert_null (lp_tensor_new ("w", LP_DTYPE_F32, shape, 2, bytes, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE);
  g_assert_nonnull (strstr (error->message, "'w'"));
}

static void
test_overflow (void)
{
  const guint64 shape[3] = { G_MAXUINT64 / 2, 2, 2 };
  const guint64 odd[1] = { 3 };
  g_autoptr(GBytes) bytes = g_bytes_new_static ("", 0);
  g_autoptr(GError) error = NULL;

  g_assert_null (lp_tensor_new ("huge", LP_DTYPE_U8, shape, 3, bytes, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE);
  g_clear_error (&error);
  /* Three 4-bit values do not fill whole bytes. */
  g_assert_null (lp_tensor_new ("f4", LP_DTYPE_F4, odd, 1, bytes, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_SHAPE);
}

static void
test_scalar_and_empty (void)
{
  g_autoptr(GBytes) four = g_bytes_new_static ("\0\0\x80\x3f", 4);
  g_autoptr(GBytes) none = g_bytes_new_static ("", 0);
  const guint64 zero[2] = { 0, 5 };
  g_autoptr(LpTensor) scalar = lp_tensor_new ("s", LP_DTYPE_F32, NULL, 0, four, NULL);
  g_autoptr(LpTensor) empty = lp_tensor_new ("e", LP_DTYPE_BF16, zero, 2, none, NULL);

  g_assert_nonnull (scalar);
  g_assert_cmpuint (lp_tensor_get_n_elements (scalar), ==, 1);
  g_assert_nonnull (empty);
  g_assert_cmpuint (lp_tensor_get_n_bytes (empty), ==, 0);
}

static int lazy_calls;

static GBytes *
lazy_ones (LpTensor *tensor, gpointer user_data, GError **error)
{
  guint64 n = lp_tensor_get_n_elements (tensor);
  float *v = g_new (float, n);

  g_atomic_int_inc (&lazy_calls);
  g_assert_cmpstr (lp_tensor_get_name (tensor), ==, "lazy");   /* the tensor it was made for */
  for (guint64 i = 0; i < n; i++)
    v[i] = 1;
  return g_bytes_new_take (v, n * 4);
}

static GBytes *
lazy_short (LpTensor *tensor, gpointer user_data, GError **error)
{
  return g_bytes_new_static ("abc", 3);
}

static void
test_lazy (void)
{
  const guint64 shape[1] = { 16 };
  g_autoptr(LpTensor) t = lp_tensor_new_lazy ("lazy", LP_DTYPE_F32, shape, 1, lazy_ones, NULL, NULL, NULL);
  g_autoptr(LpTensor) r = lp_tensor_new_renamed (t, "renamed");
  g_autoptr(LpTensor) bad = lp_tensor_new_lazy ("bad", LP_DTYPE_F32, shape, 1, lazy_short, NULL, NULL, NULL);
  g_autoptr(GBytes) a = NULL, b = NULL;
  g_autoptr(GError) error = NULL;

  g_assert_true (lp_tensor_is_lazy (t));
  g_assert_cmpint (lazy_calls, ==, 0);
  a = lp_tensor_dup_data (t, NULL);
  b = lp_tensor_dup_data (r, NULL);
  g_assert_cmpint (lazy_calls, ==, 2);   /* never cached */
  g_assert_true (g_bytes_equal (a, b));
  g_assert_cmpstr (lp_tensor_get_name (r), ==, "renamed");

  /* A stage that computes the wrong size is caught, not written. */
  g_assert_null (lp_tensor_dup_data (bad, &error));
  g_assert_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_FAILED);
}

static void
test_checkpoint (void)
{
  const float v[2] = { 1, 2 };
  const guint64 shape[1] = { 2 };
  g_autoptr(LpCheckpoint) c = lp_checkpoint_new ();
  g_autoptr(LpCheckpoint) like = NULL;
  g_autoptr(LpTensor) a = lp_test_tensor ("a", LP_DTYPE_F32, shape, 1, v);
  g_autoptr(LpTensor) a2 = lp_test_tensor ("a", LP_DTYPE_F16, shape, 1, v);
  g_autoptr(LpTensor) meta = lp_test_tensor ("__metadata__", LP_DTYPE_F32, shape, 1, v);
  g_autoptr(GError) error = NULL;
  g_auto(GStrv) keys = NULL;

  g_assert_true (lp_checkpoint_add_tensor (c, a, &error));
  g_assert_false (lp_checkpoint_add_tensor (c, a2, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_DUPLICATE);
  g_clear_error (&error);
  g_assert_false (lp_checkpoint_add_tensor (c, meta, &error));
  g_assert_error (error, LP_FORMAT_ERROR, LP_FORMAT_ERROR_DUPLICATE);
  g_assert_true (lp_checkpoint_lookup (c, "a") == a);
  g_assert_cmpuint (lp_checkpoint_get_n_bytes (c), ==, 8);

  lp_checkpoint_set_metadata (c, "z", "1");
  lp_checkpoint_set_metadata (c, "a", "2");
  lp_checkpoint_set_metadata (c, "z", "3");   /* keeps its place */
  lp_checkpoint_set_adapter_config (c, "{\"r\": 8}");
  lp_checkpoint_set_origin (c, "x.safetensors");
  like = lp_checkpoint_new_like (c);
  keys = lp_checkpoint_dup_metadata_keys (like);
  g_assert_cmpuint (g_strv_length (keys), ==, 2);
  g_assert_cmpstr (keys[0], ==, "z");
  g_assert_cmpstr (lp_checkpoint_get_metadata (like, "z"), ==, "3");
  g_assert_cmpstr (lp_checkpoint_get_adapter_config (like), ==, "{\"r\": 8}");
  g_assert_cmpstr (lp_checkpoint_get_origin (like), ==, "x.safetensors");
  g_assert_cmpuint (lp_checkpoint_get_n_tensors (like), ==, 0);
  lp_checkpoint_set_metadata (like, "z", NULL);
  g_assert_null (lp_checkpoint_get_metadata (like, "z"));
}

static void
test_name_filter (void)
{
  const char *include[] = { "*.attn.*", "*lora_te*", NULL };
  const char *exclude[] = { "*to_k*", NULL };
  g_autoptr(LpNameFilter) all = lp_name_filter_new (NULL, NULL);
  g_autoptr(LpNameFilter) some = lp_name_filter_new (include, exclude);
  g_autoptr(LpNameFilter) none_in = lp_name_filter_new (NULL, exclude);

  g_assert_true (lp_name_filter_matches (all, "anything"));
  g_assert_true (lp_name_filter_matches (some, "blocks.0.attn.to_q"));
  g_assert_false (lp_name_filter_matches (some, "blocks.0.attn.to_k"));   /* excluded wins */
  g_assert_true (lp_name_filter_matches (some, "lora_te_text_model"));
  g_assert_false (lp_name_filter_matches (some, "blocks.0.ff.net.0"));
  g_assert_true (lp_name_filter_matches (none_in, "blocks.0.ff.net.0"));
  g_assert_false (lp_name_filter_matches (none_in, "x.to_k.y"));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/tensor/held", test_held);
  g_test_add_func ("/tensor/wrong-size", test_wrong_size);
  g_test_add_func ("/tensor/overflow", test_overflow);
  g_test_add_func ("/tensor/scalar-and-empty", test_scalar_and_empty);
  g_test_add_func ("/tensor/lazy", test_lazy);
  g_test_add_func ("/checkpoint/basics", test_checkpoint);
  g_test_add_func ("/name-filter/include-exclude", test_name_filter);

  return g_test_run ();
}
