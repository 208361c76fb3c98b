/* lp-lora-families.c: the table of LoRA families, and what their files share
 *
 * Adding a family: write lp-lora-family-NAME.c with one LpLoraFamily (see
 * lp-lora-family.h and docs/architecture.md), declare it in lp-lora-family.h,
 * add a row here and the file to core/meson.build.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-family.h"

#include <math.h>
#include <string.h>

/* The order the finder tries the families' suffixes in and offers the
 * adapter config to them (mlx-lm's config before PEFT's, which takes any
 * other). No suffix of one family ends another's. */
static const LpLoraFamily *const families[] = {
  &lp_lora_family_mlx,
  &lp_lora_family_peft,
  &lp_lora_family_diffusers,
  &lp_lora_family_diffusers_old,
  &lp_lora_family_diffusers_processor,
  &lp_lora_family_kohya,
  &lp_lora_family_cloneofsimo,
  &lp_lora_family_loha,
  &lp_lora_family_lokr,
};

const LpLoraFamily *const *
lp_lora_families_get (guint *n_families)
{
  *n_families = G_N_ELEMENTS (families);
  return families;
}

const LpLoraFamily *
lp_lora_family_lookup (const char *name)
{
  for (guint i = 0; i < G_N_ELEMENTS (families); i++)
    if (g_str_equal (families[i]->name, name))
      return families[i];
  if (g_str_equal (name, lp_lora_family_custom.name))
    return &lp_lora_family_custom;
  return NULL;
}

gboolean
lp_lora_json_get_number (JsonNode *node,
                         double   *value)
{
  GType type;

  if (node == NULL || !JSON_NODE_HOLDS_VALUE (node))
    return FALSE;
  type = json_node_get_value_type (node);
  if (type == G_TYPE_INT64)
    *value = json_node_get_int (node);
  else if (type == G_TYPE_DOUBLE)
    *value = json_node_get_double (node);
  else
    return FALSE;
  return TRUE;
}

/* Configs hold ints where the tools' own dataclasses have ints (PEFT's
 * lora_alpha, mlx's rank): write one when the value is whole. */
void
lp_lora_json_set_number (JsonObject *object,
                         const char *key,
                         double      value)
{
  if (value == floor (value) && fabs (value) < 1e15)
    json_object_set_int_member (object, key, (gint64) value);
  else
    json_object_set_double_member (object, key, value);
}

char *
lp_lora_json_to_text (JsonNode *root)
{
  g_autoptr(JsonGenerator) generator = json_generator_new ();

  json_generator_set_pretty (generator, TRUE);
  json_generator_set_indent (generator, 2);
  json_generator_set_root (generator, root);
  return json_generator_to_data (generator, NULL);
}

/* The most common new rank of @family's modules (ties: the first reached),
 * 0 when it has none; *@uniform tells whether all have it. */
guint
lp_lora_most_common_rank (GPtrArray          *modules,
                          const LpLoraFamily *family,
                          const guint        *new_ranks,
                          gboolean           *uniform)
{
  g_autoptr(GHashTable) counts = g_hash_table_new (NULL, NULL);
  guint best_rank = 0, best_count = 0, n = 0;

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      guint count;

      if (module->family != family)
        continue;
      n++;
      count = GPOINTER_TO_UINT (g_hash_table_lookup (counts, GUINT_TO_POINTER (new_ranks[i]))) + 1;
      g_hash_table_insert (counts, GUINT_TO_POINTER (new_ranks[i]), GUINT_TO_POINTER (count));
      if (count > best_count)
        {
          best_count = count;
          best_rank = new_ranks[i];
        }
    }
  if (uniform != NULL)
    *uniform = best_count == n;
  return best_rank;
}

/**
 * lp_lora_rewrite_for_new_ranks:
 * @input: the checkpoint the modules were found in
 * @output: the checkpoint with their new factors
 * @modules: (element-type LpLoraModule): the modules, as lp_lora_find_modules()
 *   found them in @input
 * @new_ranks: (array): the rank each of @modules has in @output
 * @error: return location for a #GError
 *
 * Has each family present among @modules rewrite what @output carries about
 * its modules after a rank change: PEFT's and mlx-lm's
 * `adapter_config.json` (so every module keeps its scale), and each
 * family's metadata where it has a rewrite hook. Stages that change ranks
 * call it once, after the factors are in @output.
 *
 * Returns: %TRUE, or %FALSE with @error set
 */
gboolean
lp_lora_rewrite_for_new_ranks (LpCheckpoint  *input,
                               LpCheckpoint  *output,
                               GPtrArray     *modules,
                               const guint   *new_ranks,
                               GError       **error)
{
  g_autoptr(GPtrArray) done = g_ptr_array_new ();

  g_return_val_if_fail (LP_IS_CHECKPOINT (input), FALSE);
  g_return_val_if_fail (LP_IS_CHECKPOINT (output), FALSE);
  g_return_val_if_fail (modules != NULL, FALSE);
  g_return_val_if_fail (modules->len == 0 || new_ranks != NULL, FALSE);

  for (guint i = 0; i < modules->len; i++)
    {
      LpLoraModule *module = g_ptr_array_index (modules, i);
      const LpLoraFamily *family = module->family;

      if (new_ranks[i] == 0)
        {
          g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_INPUT,
                       "module %s: new rank 0", module->name);
          return FALSE;
        }
      if (family->rewrite == NULL || g_ptr_array_find (done, family, NULL))
        continue;
      g_ptr_array_add (done, (gpointer) family);
      if (!family->rewrite (family, input, output, modules, new_ranks, error))
        return FALSE;
    }
  return TRUE;
}
