/* lpipe-info.c: `lpipe info`, what a checkpoint holds: a summary first
 * (convention, modules, ranks, alpha and scale, dtypes, conv modules,
 * base-model hints, metadata digest), the tensor listing on demand, and all
 * of it as JSON
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <unistd.h>

#include <glib/gstdio.h>

#include "lpipe-cli.h"

static gboolean opt_tensors;
static gboolean opt_spectrum;
static char *opt_svg;

static const GOptionEntry info_options[] = {
  { "tensors", 't', 0, G_OPTION_ARG_NONE, &opt_tensors, "List every tensor (name, dtype, shape, size)", NULL },
  { "spectrum", 's', 0, G_OPTION_ARG_NONE, &opt_spectrum,
    "The error and energy kept at ranks 1, 2, 4, ... for the file and each block (the lora-spectrum stage)", NULL },
  { "svg", 0, 0, G_OPTION_ARG_FILENAME, &opt_svg, "With --spectrum: draw it as an SVG chart", "FILE" },
  { NULL }
};

/* --- the spectrum: safetensors-source ! lora-spectrum ---------------------- */

static int
show_spectrum (const char *path)
{
  g_autoptr(LpPipeline) pipeline = lp_pipeline_new (NULL);
  g_autoptr(GError) error = NULL;
  g_autoptr(GPtrArray) words = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *report = NULL;
  LpCliResult result = { 0, };
  int status;

  if (lp_cli.json)
    {
      int fd = g_file_open_tmp ("lpipe-spectrum-XXXXXX.json", &report, &error);
      if (fd < 0)
        {
          lp_cli_error ("%s", error->message);
          return EXIT_FAILED;
        }
      close (fd);
    }
  g_ptr_array_add (words, g_strdup ("safetensors-source"));
  g_ptr_array_add (words, g_strconcat ("location=", path, NULL));
  g_ptr_array_add (words, g_strdup ("!"));
  g_ptr_array_add (words, g_strdup ("lora-spectrum"));
  if (opt_svg != NULL)
    g_ptr_array_add (words, g_strconcat ("svg=", opt_svg, NULL));
  if (report != NULL)
    g_ptr_array_add (words, g_strconcat ("report=", report, NULL));
  if (lp_cli.json || lp_cli.quiet)
    g_ptr_array_add (words, g_strdup ("quiet=true"));
  g_ptr_array_add (words, NULL);

  if (!lp_pipeline_parse_launch (pipeline, (const char * const *) words->pdata, &error)
      || !lp_pipeline_validate (pipeline, &error))
    {
      lp_cli_error ("%s", error->message);
      return EXIT_FAILED;
    }
  lp_cli_prepare_run (pipeline, &result);
  status = lp_cli_run_pipelines (&pipeline, &result, 1);
  if (result.failure)
    lp_cli_error ("%s", result.failure);
  else if (report != NULL)
    {
      g_autofree char *text = NULL;
      if (g_file_get_contents (report, &text, NULL, &error))
        g_print ("%s", text);
      else
        {
          lp_cli_error ("%s", error->message);
          status = EXIT_FAILED;
        }
    }
  if (report != NULL)
    g_unlink (report);
  lp_cli_result_clear (&result);
  return status;
}

/* --- what a file is, when it is not safetensors -------------------------- */

/* The usual wrong files, named, instead of the reader's complaint about
 * their first eight bytes as a header length. Only asked once the reader
 * has refused the file, so a real safetensors file is never second-guessed. */
static char *
sniff_not_safetensors (const char *path)
{
  guchar head[16] = { 0, };
  gssize n = 0;
  FILE *f = fopen (path, "rb");

  if (f == NULL)
    return NULL;
  n = fread (head, 1, sizeof head, f);
  fclose (f);
  if (n >= 4 && memcmp (head, "PK\003\004", 4) == 0)
    return g_strdup ("a zip archive: a PyTorch checkpoint (.pt, .pth, .ckpt as torch.save writes it), not "
                     "safetensors; lpipe reads safetensors only (convert it first, e.g. with "
                     "safetensors.torch.save_file)");
  if (n >= 2 && head[0] == 0x80 && head[1] >= 2 && head[1] <= 5)
    return g_strdup ("a Python pickle: a PyTorch checkpoint in the legacy torch.save format, not "
                     "safetensors; lpipe reads safetensors only (convert it first, e.g. with "
                     "safetensors.torch.save_file)");
  {
    gssize i = 0;
    while (i < n && g_ascii_isspace (head[i]))
      i++;
    if (i < n && head[i] == '{')
      {
        g_autofree char *text = NULL;
        g_file_get_contents (path, &text, NULL, NULL);
        if (text && strstr (text, "\"stages\"") && strstr (text, "\"lpipe\""))
          return g_strdup ("a pipeline file, not a checkpoint; run it with `lpipe run FILE`, or check it "
                           "with `lpipe validate FILE`");
        return g_strdup ("a JSON file, not a safetensors checkpoint");
      }
  }
  {
    /* a safetensors file starts with a binary length; text is something else */
    gssize i = 0;
    while (i < n && (g_ascii_isprint (head[i]) || g_ascii_isspace (head[i])))
      i++;
    if (n > 0 && i == n)
      return g_strdup ("a text file, not a safetensors checkpoint");
  }
  return NULL;
}

static gboolean
folder_has_index (const char *folder)
{
  g_autoptr(GDir) dir = g_dir_open (folder, 0, NULL);
  const char *name;

  while (dir && (name = g_dir_read_name (dir)) != NULL)
    if (g_str_has_suffix (name, ".safetensors.index.json"))
      return TRUE;
  return FALSE;
}

/* A PEFT folder stands for its adapter_model.safetensors; a folder with a
 * `*.safetensors.index.json` for its sharded checkpoint. */
static char *
resolve_input (const char  *path,
               GError     **error)
{
  g_autofree char *shown = lp_cli_escape (path, FALSE);

  if (g_file_test (path, G_FILE_TEST_IS_DIR))
    {
      g_autofree char *inner = g_build_filename (path, "adapter_model.safetensors", NULL);
      if (g_file_test (inner, G_FILE_TEST_IS_REGULAR))
        return g_steal_pointer (&inner);
      if (folder_has_index (path))
        return g_strdup (path);   /* a sharded checkpoint's folder */
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_ISDIR,
                   "%s: a folder, not a safetensors file (a PEFT folder holds adapter_model.safetensors; "
                   "this one does not)", shown);
      return NULL;
    }
  return g_strdup (path);
}

static LpCheckpoint *
load_checkpoint (const char  *path,
                 GError     **error)
{
  GError *local = NULL;
  LpCheckpoint *ckpt = lp_safetensors_is_index (path) ? lp_safetensors_load_index (path, &local)
                                                      : lp_safetensors_load (path, &local);
  g_autofree char *what = NULL;

  if (ckpt != NULL)
    return ckpt;
  if (local->domain == LP_FORMAT_ERROR && (what = sniff_not_safetensors (path)) != NULL)
    {
      g_autofree char *shown = lp_cli_escape (path, FALSE);
      g_set_error (error, LP_FORMAT_ERROR, local->code, "%s: %s", shown, what);
      g_error_free (local);
      return NULL;
    }
  g_propagate_error (error, local);
  return NULL;
}

/* --- the facts, gathered once for the text and the JSON ------------------ */

static const char *
convention_name (LpLoraConvention convention)
{
  switch (convention)
    {
    case LP_LORA_CONVENTION_PEFT: return "peft";
    case LP_LORA_CONVENTION_DIFFUSERS: return "diffusers";
    case LP_LORA_CONVENTION_DIFFUSERS_OLD: return "diffusers-old";
    case LP_LORA_CONVENTION_DIFFUSERS_PROCESSOR: return "diffusers-processor";
    case LP_LORA_CONVENTION_KOHYA: return "kohya";
    case LP_LORA_CONVENTION_CLONEOFSIMO: return "cloneofsimo";
    case LP_LORA_CONVENTION_CUSTOM: return "custom";
    default: return "unknown";
    }
}

/* The module's family, from the library's table of families */
static const char *
module_family (LpLoraModule *module)
{
  return lp_lora_module_get_family (module);
}

/* What the module names say about the base model, checked in order; the
 * first match wins. The in-features of a UNet's cross-attention key tell
 * the Stable Diffusion versions apart. */
typedef struct {
  const char *needle;
  const char *hint;
} NameHint;

static const NameHint name_hints[] = {
  { "double_blocks", "Flux (double_blocks/single_blocks)" },
  { "single_transformer_blocks", "Flux (diffusers names)" },
  { "joint_blocks", "Stable Diffusion 3 (joint_blocks)" },
  { "context_block", "Stable Diffusion 3 (context_block)" },
  { "lora_te2_", "SDXL (two text encoders)" },
  { "text_encoder_2", "SDXL (two text encoders)" },
  { "self_attn.q_proj", "a decoder-only language model (Llama-style self_attn.q_proj)" },
  { "attn.c_attn", "GPT-2 (attn.c_attn)" },
  { "attention.query_key_value", "GPT-NeoX (attention.query_key_value)" },
  { "attention.q_lin", "DistilBERT (attention.q_lin)" },
};

static const char *
base_model_hint (GPtrArray *modules)
{
  guint64 cross_in = 0;

  for (guint h = 0; h < G_N_ELEMENTS (name_hints); h++)
    for (guint i = 0; i < modules->len; i++)
      if (strstr (lp_lora_module_get_name (g_ptr_array_index (modules, i)), name_hints[h].needle))
        return name_hints[h].hint;
  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *m = g_ptr_array_index (modules, i);
      const char *name = lp_lora_module_get_name (m);
      if ((strstr (name, "attn2_to_k") || strstr (name, "attn2.to_k")) && !g_str_has_prefix (name, "lora_te") && !strstr (name, "text_encoder"))
        cross_in = MAX (cross_in, lp_lora_module_get_in_features (m));
    }
  switch (cross_in)
    {
    case 768: return "Stable Diffusion 1.x UNet (768-wide cross-attention)";
    case 1024: return "Stable Diffusion 2.x UNet (1024-wide cross-attention)";
    case 2048: return "SDXL UNet (2048-wide cross-attention)";
    default: return NULL;
    }
}

typedef struct {
  guint rank;
  guint count;
} RankCount;

static int
compare_rank_count (gconstpointer a,
                    gconstpointer b)
{
  const RankCount *x = a, *y = b;
  return (int) x->rank - (int) y->rank;
}

/* rank -> number of modules, sorted by rank */
static GArray *
rank_histogram (GPtrArray *modules)
{
  GArray *hist = g_array_new (FALSE, FALSE, sizeof (RankCount));

  for (guint i = 0; i < modules->len; i++)
    {
      guint r = lp_lora_module_get_rank (g_ptr_array_index (modules, i));
      guint k;
      for (k = 0; k < hist->len; k++)
        if (g_array_index (hist, RankCount, k).rank == r)
          break;
      if (k == hist->len)
        {
          RankCount rc = { r, 0 };
          g_array_append_val (hist, rc);
        }
      g_array_index (hist, RankCount, k).count++;
    }
  g_array_sort (hist, compare_rank_count);
  return hist;
}

/* --- text ------------------------------------------------------------------ */

static void
print_range (const char *label,
             double      lo,
             double      hi)
{
  if (lo == hi)
    g_print ("  %-11s %g\n", label, lo);
  else
    g_print ("  %-11s %g to %g\n", label, lo, hi);
}

static void
print_metadata_digest (LpCheckpoint *ckpt,
                       GStrv         keys)
{
  guint n = g_strv_length (keys);
  const guint shown = 12;

  if (n == 0)
    {
      g_print ("  %-11s none\n", "metadata");
      return;
    }
  g_print ("  %-11s %u key%s\n", "metadata", n, n == 1 ? "" : "s");
  for (guint i = 0; i < MIN (n, shown); i++)
    {
      const char *value = lp_checkpoint_get_metadata (ckpt, keys[i]);
      gsize len = strlen (value);
      g_autofree char *key = lp_cli_escape (keys[i], FALSE);
      g_autofree char *text = NULL;
      char size[32];

      lp_cli_format_bytes (size, sizeof size, len);
      if (len > 0 && (value[0] == '{' || value[0] == '[') && len > 60)
        text = g_strdup_printf ("(JSON, %s)", size);
      else if (g_utf8_strlen (value, -1) > 60)
        {
          g_autofree char *cut = g_utf8_substring (value, 0, 57);
          g_autofree char *escaped = lp_cli_escape (cut, FALSE);
          text = g_strdup_printf ("%s... (%s)", escaped, size);
        }
      else
        text = lp_cli_escape (value, FALSE);
      g_print ("    %s: %s\n", key, text);
    }
  if (n > shown)
    g_print ("    ... and %u more (--json lists them all)\n", n - shown);
}

static void
print_tensors (LpCheckpoint *ckpt)
{
  guint n = lp_checkpoint_get_n_tensors (ckpt);

  g_print ("  tensors:\n");
  for (guint i = 0; i < n; i++)
    {
      LpTensor *t = lp_checkpoint_get_tensor (ckpt, i);
      g_autofree char *shape = lp_tensor_describe_shape (t);
      g_autofree char *name = lp_cli_escape (lp_tensor_get_name (t), FALSE);
      char size[32];

      lp_cli_format_bytes (size, sizeof size, lp_tensor_get_n_bytes (t));
      g_print ("    %-60s %-8s %-16s %s\n", name, lp_dtype_to_string (lp_tensor_get_dtype (t)), shape, size);
    }
}

static void
print_summary (const char   *path,
               LpCheckpoint *ckpt,
               GPtrArray    *modules,
               GPtrArray    *others)
{
  guint n = lp_checkpoint_get_n_tensors (ckpt);
  g_auto(GStrv) keys = lp_checkpoint_dup_metadata_keys (ckpt);
  g_autofree char *shown = lp_cli_escape (path, FALSE);
  g_autoptr(GHashTable) dtype_counts = g_hash_table_new (g_str_hash, g_str_equal);
  g_autoptr(GString) dtypes = g_string_new (NULL);
  char total[32];

  lp_cli_format_bytes (total, sizeof total, lp_checkpoint_get_n_bytes (ckpt));
  g_print ("%s: %u tensors, %s\n", shown, n, total);

  for (guint i = 0; i < n; i++)
    {
      const char *dt = lp_dtype_to_string (lp_tensor_get_dtype (lp_checkpoint_get_tensor (ckpt, i)));
      guint count = GPOINTER_TO_UINT (g_hash_table_lookup (dtype_counts, dt));
      if (count == 0)
        g_string_append_printf (dtypes, "%s%s", dtypes->len ? " " : "", dt);
      g_hash_table_insert (dtype_counts, (gpointer) dt, GUINT_TO_POINTER (count + 1));
    }

  if (modules && modules->len > 0)
    {
      g_autoptr(GArray) hist = rank_histogram (modules);
      g_autoptr(GString) ranks = g_string_new (NULL);
      g_autoptr(GHashTable) families = g_hash_table_new (g_str_hash, g_str_equal);
      g_autoptr(GString) family_text = g_string_new (NULL);
      double alpha_lo = INFINITY, alpha_hi = -INFINITY, scale_lo = INFINITY, scale_hi = -INFINITY;
      guint n_conv = 0, n_conv3 = 0;
      const char *hint = base_model_hint (modules);

      for (guint i = 0; i < modules->len; i++)
        {
          LpLoraModule *m = g_ptr_array_index (modules, i);
          const char *family = module_family (m);
          guint count = GPOINTER_TO_UINT (g_hash_table_lookup (families, family));
          double alpha = lp_lora_module_get_alpha_value (m), scale = lp_lora_module_get_scale (m);

          if (count == 0)
            g_string_append_printf (family_text, "%s%s", family_text->len ? ", " : "", family);
          g_hash_table_insert (families, (gpointer) family, GUINT_TO_POINTER (count + 1));
          alpha_lo = MIN (alpha_lo, alpha);
          alpha_hi = MAX (alpha_hi, alpha);
          scale_lo = MIN (scale_lo, scale);
          scale_hi = MAX (scale_hi, scale);
          if (lp_lora_module_is_conv (m))
            {
              guint64 kh, kw;
              lp_lora_module_get_kernel_size (m, &kh, &kw);
              n_conv++;
              if (kh * kw > 1)
                n_conv3++;
            }
        }
      for (guint k = 0; k < hist->len; k++)
        {
          RankCount *rc = &g_array_index (hist, RankCount, k);
          g_string_append_printf (ranks, "%s%u (%u)", k ? ", " : "", rc->rank, rc->count);
        }
      g_print ("  %-11s %u modules, %s keys\n", "LoRA", modules->len, family_text->str);
      g_print ("  %-11s %s\n", hist->len == 1 ? "rank" : "ranks", ranks->str);
      print_range ("alpha", alpha_lo, alpha_hi);
      print_range ("scale", scale_lo, scale_hi);
      if (n_conv > 0)
        g_print ("  %-11s %u modules (%u with a kernel larger than 1x1)\n", "conv", n_conv, n_conv3);
      if (hint)
        g_print ("  %-11s %s (a guess from the names)\n", "base model", hint);
      g_print ("  %-11s %u\n", "other", others ? others->len : 0);
    }
  else
    g_print ("  %-11s none recognized\n", "LoRA");
  g_print ("  %-11s", "dtypes");
  {
    g_auto(GStrv) names = g_strsplit (dtypes->str, " ", -1);
    for (guint i = 0; names[i] && *names[i]; i++)
      g_print (" %s x%u", names[i], GPOINTER_TO_UINT (g_hash_table_lookup (dtype_counts, names[i])));
  }
  g_print ("\n");
  if (lp_checkpoint_get_adapter_config (ckpt))
    {
      /* mlx-lm writes its own adapter_config.json, which the mlx family
       * claims; any other is PEFT's */
      gboolean mlx = FALSE;
      for (guint i = 0; modules && i < modules->len; i++)
        mlx |= g_strcmp0 (module_family (g_ptr_array_index (modules, i)), "mlx") == 0;
      g_print ("  %-11s %s adapter_config.json beside it\n", "config", mlx ? "mlx-lm" : "PEFT");
    }
  print_metadata_digest (ckpt, keys);
  if (opt_tensors)
    print_tensors (ckpt);
}

/* --- JSON ------------------------------------------------------------------ */

static void
add_tensor_json (JsonBuilder *b,
                 LpTensor    *t)
{
  guint nd;
  const guint64 *shape = lp_tensor_get_shape (t, &nd);

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "name");
  json_builder_add_string_value (b, lp_tensor_get_name (t));
  json_builder_set_member_name (b, "dtype");
  json_builder_add_string_value (b, lp_dtype_to_string (lp_tensor_get_dtype (t)));
  json_builder_set_member_name (b, "shape");
  json_builder_begin_array (b);
  for (guint d = 0; d < nd; d++)
    json_builder_add_int_value (b, shape[d]);
  json_builder_end_array (b);
  json_builder_set_member_name (b, "n-bytes");
  json_builder_add_int_value (b, lp_tensor_get_n_bytes (t));
  json_builder_end_object (b);
}

static void
add_module_json (JsonBuilder  *b,
                 LpLoraModule *m)
{
  json_builder_begin_object (b);
  json_builder_set_member_name (b, "name");
  json_builder_add_string_value (b, lp_lora_module_get_name (m));
  json_builder_set_member_name (b, "family");
  json_builder_add_string_value (b, module_family (m));
  json_builder_set_member_name (b, "convention");
  json_builder_add_string_value (b, convention_name (lp_lora_module_get_convention (m)));
  json_builder_set_member_name (b, "rank");
  json_builder_add_int_value (b, lp_lora_module_get_rank (m));
  json_builder_set_member_name (b, "alpha");
  json_builder_add_double_value (b, lp_lora_module_get_alpha_value (m));
  json_builder_set_member_name (b, "scale");
  json_builder_add_double_value (b, lp_lora_module_get_scale (m));
  json_builder_set_member_name (b, "in-features");
  json_builder_add_int_value (b, lp_lora_module_get_in_features (m));
  json_builder_set_member_name (b, "out-features");
  json_builder_add_int_value (b, lp_lora_module_get_out_features (m));
  json_builder_set_member_name (b, "conv");
  json_builder_add_boolean_value (b, lp_lora_module_is_conv (m));
  if (lp_lora_module_is_conv (m))
    {
      guint64 kh, kw;
      lp_lora_module_get_kernel_size (m, &kh, &kw);
      json_builder_set_member_name (b, "kernel");
      json_builder_begin_array (b);
      json_builder_add_int_value (b, kh);
      json_builder_add_int_value (b, kw);
      json_builder_end_array (b);
    }
  /* LoHa and LoKr modules have parts, no single down and up */
  if (lp_lora_module_is_plain (m))
    {
      json_builder_set_member_name (b, "down");
      add_tensor_json (b, lp_lora_module_get_stored_factor (m, FALSE));
      json_builder_set_member_name (b, "up");
      add_tensor_json (b, lp_lora_module_get_stored_factor (m, TRUE));
    }
  if (lp_lora_module_get_alpha (m))
    {
      json_builder_set_member_name (b, "alpha-tensor");
      json_builder_add_string_value (b, lp_tensor_get_name (lp_lora_module_get_alpha (m)));
    }
  json_builder_end_object (b);
}

static void
add_file_json (JsonBuilder  *b,
               const char   *path,
               LpCheckpoint *ckpt,
               GPtrArray    *modules,
               GPtrArray    *others)
{
  guint n = lp_checkpoint_get_n_tensors (ckpt);
  g_auto(GStrv) keys = lp_checkpoint_dup_metadata_keys (ckpt);
  const char *hint = modules ? base_model_hint (modules) : NULL;

  json_builder_begin_object (b);
  json_builder_set_member_name (b, "file");
  json_builder_add_string_value (b, path);
  json_builder_set_member_name (b, "n-bytes");
  json_builder_add_int_value (b, lp_checkpoint_get_n_bytes (ckpt));
  json_builder_set_member_name (b, "tensors");
  json_builder_begin_array (b);
  for (guint i = 0; i < n; i++)
    add_tensor_json (b, lp_checkpoint_get_tensor (ckpt, i));
  json_builder_end_array (b);
  json_builder_set_member_name (b, "metadata");
  json_builder_begin_object (b);
  for (guint i = 0; keys[i]; i++)
    {
      json_builder_set_member_name (b, keys[i]);
      json_builder_add_string_value (b, lp_checkpoint_get_metadata (ckpt, keys[i]));
    }
  json_builder_end_object (b);
  json_builder_set_member_name (b, "adapter-config");
  if (lp_checkpoint_get_adapter_config (ckpt))
    {
      g_autoptr(JsonNode) config = json_from_string (lp_checkpoint_get_adapter_config (ckpt), NULL);
      json_builder_add_value (b, config ? g_steal_pointer (&config) : json_node_new (JSON_NODE_NULL));
    }
  else
    json_builder_add_null_value (b);
  json_builder_set_member_name (b, "lora-modules");
  json_builder_add_int_value (b, modules ? modules->len : 0);
  json_builder_set_member_name (b, "modules");
  json_builder_begin_array (b);
  for (guint i = 0; modules && i < modules->len; i++)
    add_module_json (b, g_ptr_array_index (modules, i));
  json_builder_end_array (b);
  json_builder_set_member_name (b, "rank-histogram");
  json_builder_begin_object (b);
  if (modules)
    {
      g_autoptr(GArray) hist = rank_histogram (modules);
      for (guint k = 0; k < hist->len; k++)
        {
          g_autofree char *rank = g_strdup_printf ("%u", g_array_index (hist, RankCount, k).rank);
          json_builder_set_member_name (b, rank);
          json_builder_add_int_value (b, g_array_index (hist, RankCount, k).count);
        }
    }
  json_builder_end_object (b);
  json_builder_set_member_name (b, "other-tensors");
  json_builder_begin_array (b);
  for (guint i = 0; others && i < others->len; i++)
    json_builder_add_string_value (b, lp_tensor_get_name (g_ptr_array_index (others, i)));
  json_builder_end_array (b);
  json_builder_set_member_name (b, "base-model-hint");
  if (hint)
    json_builder_add_string_value (b, hint);
  else
    json_builder_add_null_value (b);
  json_builder_end_object (b);
}

/* --- the command ------------------------------------------------------------ */

static int
cmd_info (int argc, char **argv)
{
  g_autoptr(JsonBuilder) b = lp_cli.json ? json_builder_new () : NULL;
  int status = EXIT_OK;
  guint n_shown = 0;

  if (argc < 2)
    {
      lp_cli_error ("info needs one or more safetensors files (see lpipe info --help)");
      return EXIT_USAGE;
    }
  if (opt_svg != NULL && !opt_spectrum)
    {
      lp_cli_error ("--svg draws the spectrum: add --spectrum");
      return EXIT_USAGE;
    }
  if (opt_spectrum)
    {
      if (argc > 2 && (opt_svg != NULL || lp_cli.json))
        {
          lp_cli_error ("--spectrum with --svg or --json takes one file");
          return EXIT_USAGE;
        }
      for (int i = 1; i < argc; i++)
        {
          g_autoptr(GError) error = NULL;
          g_autofree char *path = resolve_input (argv[i], &error);
          if (path == NULL)
            {
              lp_cli_error ("%s", error->message);
              status = MAX (status, EXIT_FAILED);
              continue;
            }
          int shown = show_spectrum (path);   /* not inside MAX: it would run twice */
          status = MAX (status, shown);
        }
      return status;
    }
  if (b && argc > 2)
    json_builder_begin_array (b);

  for (int i = 1; i < argc; i++)
    {
      g_autoptr(GError) error = NULL;
      g_autofree char *path = resolve_input (argv[i], &error);
      g_autoptr(LpCheckpoint) ckpt = path ? load_checkpoint (path, &error) : NULL;
      g_autoptr(GPtrArray) modules = NULL;
      g_autoptr(GPtrArray) others = NULL;
      g_autoptr(GError) lora_error = NULL;

      if (ckpt == NULL)
        {
          lp_cli_error ("%s", error->message);
          status = EXIT_FAILED;
          continue;
        }
      modules = lp_lora_find_modules (ckpt, NULL, NULL, &others, &lora_error);
      if (modules == NULL)
        {
          /* what the file holds is still worth showing; say why its
           * modules are not */
          g_autofree char *shown = lp_cli_escape (path, FALSE);
          lp_cli_warning ("%s: %s", shown, lora_error->message);
        }
      n_shown++;
      if (b)
        add_file_json (b, path, ckpt, modules, others);
      else
        {
          if (i > 1)
            g_print ("\n");
          print_summary (path, ckpt, modules, others);
        }
    }

  if (b)
    {
      if (argc > 2)
        json_builder_end_array (b);
      if (argc > 2 || n_shown > 0)
        lp_cli_print_json (b);
    }
  return status;
}

const LpCliCommand lp_cli_info_command = {
  "info", "FILE.safetensors... [--tensors] [--json]", "what checkpoints hold: LoRA modules, ranks, metadata",
  "Shows each file's LoRA modules (key convention, rank histogram, alpha and\n"
  "scale, conv modules, a guess at the base model from the names), its dtypes\n"
  "and a digest of its metadata. A PEFT folder stands for the\n"
  "adapter_model.safetensors in it. --tensors adds the listing of every tensor;\n"
  "--json prints everything, per module too (one object per file, an array\n"
  "for several). --spectrum shows instead, from every module's singular\n"
  "values, the error and energy a reduction to rank 1, 2, 4, ... would leave,\n"
  "for the whole file and each block (kohya's \"fro retained\" is the square\n"
  "root of the energy); --svg FILE draws it, --json gives every singular value.\n"
  "\n"
  "Examples:\n"
  "  lpipe info lora.safetensors\n"
  "  lpipe info --json loras/*.safetensors\n"
  "  lpipe info --spectrum --svg lora-spectrum.svg lora.safetensors\n",
  info_options, cmd_info,
};
