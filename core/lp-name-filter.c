/* lp-name-filter.c: choosing tensors or modules by name globs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-private.h"

/**
 * LpNameFilter:
 *
 * The `include` and `exclude` properties that several stages share, in one
 * place: a name is chosen when it matches one of the include globs (or there
 * are none) and none of the exclude globs. Globs are those of
 * #GPatternSpec: `*` and `?`.
 */
struct _LpNameFilter
{
  gatomicrefcount ref;
  GPtrArray *include;   /* GPatternSpec */
  GPtrArray *exclude;
};

G_DEFINE_BOXED_TYPE (LpNameFilter, lp_name_filter, lp_name_filter_ref, lp_name_filter_unref)

static GPtrArray *
compile (const char * const *globs)
{
  GPtrArray *specs = g_ptr_array_new_with_free_func ((GDestroyNotify) g_pattern_spec_free);

  for (guint i = 0; globs != NULL && globs[i] != NULL; i++)
    g_ptr_array_add (specs, g_pattern_spec_new (globs[i]));
  return specs;
}

static gboolean
matches_any (GPtrArray  *specs,
             const char *name)
{
  for (guint i = 0; i < specs->len; i++)
    if (g_pattern_spec_match_string (g_ptr_array_index (specs, i), name))
      return TRUE;
  return FALSE;
}

/**
 * lp_name_filter_new:
 * @include: (nullable) (array zero-terminated=1): globs a name must match
 *   one of; %NULL or empty for every name
 * @exclude: (nullable) (array zero-terminated=1): globs that drop a name
 *
 * Returns: (transfer full): a filter
 */
LpNameFilter *
lp_name_filter_new (const char * const *include,
                    const char * const *exclude)
{
  LpNameFilter *self = g_new0 (LpNameFilter, 1);

  g_atomic_ref_count_init (&self->ref);
  self->include = compile (include);
  self->exclude = compile (exclude);
  return self;
}

/**
 * lp_name_filter_ref:
 * @self: a filter
 *
 * Returns: (transfer full): @self
 */
LpNameFilter *
lp_name_filter_ref (LpNameFilter *self)
{
  g_return_val_if_fail (self != NULL, NULL);
  g_atomic_ref_count_inc (&self->ref);
  return self;
}

/**
 * lp_name_filter_unref:
 * @self: (transfer full): a filter
 *
 * Drops a reference.
 */
void
lp_name_filter_unref (LpNameFilter *self)
{
  g_return_if_fail (self != NULL);
  if (g_atomic_ref_count_dec (&self->ref))
    {
      g_ptr_array_unref (self->include);
      g_ptr_array_unref (self->exclude);
      g_free (self);
    }
}

/**
 * lp_name_filter_matches:
 * @self: a filter
 * @name: a tensor or module name
 *
 * Returns: %TRUE if @name is chosen
 */
gboolean
lp_name_filter_matches (LpNameFilter *self,
                        const char   *name)
{
  g_return_val_if_fail (self != NULL, FALSE);
  g_return_val_if_fail (name != NULL, FALSE);

  return (self->include->len == 0 || matches_any (self->include, name)) &&
         !matches_any (self->exclude, name);
}
