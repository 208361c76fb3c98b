/* lp-lora-family.h: the declaration of one LoRA family (not installed)
 *
 * A family is how one tool writes its adapters: which key suffixes make a
 * module's parts, how its factors are laid out, where its scale lives and
 * what config or metadata it must rewrite when a module changes rank. Each
 * family is one LpLoraFamily in its own lp-lora-family-NAME.c, and one row of
 * the table in lp-lora-families.c; the finder of core/lp-lora.c knows
 * nothing else about them. docs/architecture.md describes how to add one.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#pragma once

#include "lp-private.h"

#include <json-glib/json-glib.h>

G_BEGIN_DECLS

typedef struct _LpLoraFamily LpLoraFamily;

/* What a part is to the module. */
typedef enum {
  LP_LORA_ROLE_DOWN,    /* the factor applied first: A of B @ A */
  LP_LORA_ROLE_UP,      /* the factor applied last: B */
  LP_LORA_ROLE_OTHER,   /* any other part (LoHa, LoKr, a Tucker core) */
} LpLoraRole;

/* One part of a family's module: the key is the module name + @suffix; the
 * part's name (lp_lora_module_get_part()) is @suffix without its first
 * character ('.' or ':'). An @attached part (kohya `.alpha`, a DoRA
 * magnitude) is looked up beside a module its other parts found; it never
 * makes a module on its own. */
typedef struct {
  const char *suffix;
  LpLoraRole role;
  gboolean attached;
} LpLoraPart;

/* How a plain module's two factors store B @ A. */
typedef enum {
  LP_LORA_LAYOUT_DOWN_UP,     /* down [r, in] (or [r, in, kh, kw]), up [out, r] */
  LP_LORA_LAYOUT_TRANSPOSED,  /* mlx-lm: down [in, r], up [r, out] */
  LP_LORA_LAYOUT_STRUCTURED,  /* no single down and up (LoHa, LoKr) */
} LpLoraLayout;

/* What the finder read once for every module: the checkpoint and the
 * adapter_config.json beside it, parsed by whichever family owns it. */
typedef struct {
  LpCheckpoint *checkpoint;
  JsonParser *config_parser;    /* NULL when the checkpoint has no config */
  JsonObject *config;           /* its root object */
  const LpLoraFamily *config_family; /* the family whose config it is (peft, mlx) */
  gpointer config_data;         /* what config_family parsed from it */
  GDestroyNotify config_data_free;
  /* diffusers' lora_adapter_metadata, parsed on first use */
  gboolean lora_metadata_read;
  JsonParser *lora_metadata_parser;
  JsonObject *lora_metadata;    /* NULL when the checkpoint has none */
} LpLoraFinder;

struct _LpLoraModule
{
  GObject parent_instance;

  char *name;
  const LpLoraFamily *family;
  LpLoraConvention convention;
  GHashTable *parts;    /* part name -> LpTensor (owned), every part the module has */
  LpTensor *down;       /* [r, in] view for every layout, NULL for structured modules */
  LpTensor *up;         /* [out, r] view, NULL for structured modules */
  LpTensor *alpha;      /* the `.alpha` part, may be NULL */
  LpTensor *magnitude;  /* a DoRA magnitude part, may be NULL */
  guint rank;
  guint64 in_features;  /* flattened: in · kh · kw */
  guint64 out_features;
  double scale;
  double alpha_value;   /* scale = alpha_value / rank (PEFT rslora: / √rank) */
  gboolean fold_alpha;  /* a rank change folds alpha / r into the factors */
  char *peft_key;       /* PEFT: the module's name in the base model */
};

struct _LpLoraFamily
{
  /* lp_lora_module_get_family(): "peft", "kohya", "mlx", "loha", ... */
  const char *name;
  /* for messages: "kohya/LoCon" */
  const char *title;
  /* lp_lora_module_get_convention(), kept for compatibility */
  LpLoraConvention convention;
  LpLoraLayout layout;
  const LpLoraPart *parts;
  guint n_parts;

  /* Claims the checkpoint's adapter_config.json if it is this family's,
   * parsing what it needs into @finder; NULL for families without one. */
  gboolean (*claim_config)   (LpLoraFinder  *finder,
                              gboolean      *claimed,
                              GError       **error);
  /* Checks a module whose parts are paired and sets what the family knows:
   * the scale and alpha, a family change (diffusers turns PEFT beside a PEFT
   * config); NULL: the plain check only. */
  gboolean (*init_module)    (LpLoraModule  *module,
                              LpLoraFinder  *finder,
                              GError       **error);
  /* After modules of this family changed rank (@new_ranks[i] for
   * @modules[i]; modules of other families are skipped), rewrites what
   * @output carries about them: PEFT's and mlx's adapter_config.json, and
   * (the loaders' hook) kohya's ss_* and diffusers' lora_adapter_metadata.
   * NULL: nothing to rewrite. */
  gboolean (*rewrite)        (const LpLoraFamily *family,
                              LpCheckpoint  *input,
                              LpCheckpoint  *output,
                              GPtrArray     *modules,
                              const guint   *new_ranks,
                              GError       **error);
};

/* The table, in the order the finder tries suffixes (lp-lora-families.c). */
const LpLoraFamily *const *lp_lora_families_get     (guint       *n_families);
const LpLoraFamily        *lp_lora_family_lookup    (const char  *name);

/* Shared by the family files */
gboolean  lp_lora_module_check_plain   (LpLoraModule  *module,
                                        GError       **error);
gboolean  lp_lora_module_read_alpha    (LpLoraModule  *module,
                                        GError       **error);
gboolean  lp_lora_json_get_number      (JsonNode      *node,
                                        double        *value);
void      lp_lora_json_set_number      (JsonObject    *object,
                                        const char    *key,
                                        double         value);
char     *lp_lora_json_to_text         (JsonNode      *root);
guint     lp_lora_most_common_rank     (GPtrArray     *modules,
                                        const LpLoraFamily *family,
                                        const guint   *new_ranks,
                                        gboolean      *uniform);

/* A LoraConfig's scale entries (PEFT's adapter_config.json, one component
 * of diffusers' lora_adapter_metadata), read and rewritten by one set of
 * rules (lp-lora-family-peft.c). */
typedef struct {
  double r;
  double lora_alpha;
  gboolean use_rslora;
  JsonObject *rank_pattern;     /* NULL when absent */
  JsonObject *alpha_pattern;
} LpLoraPeftConfig;

gboolean  lp_lora_peft_config_read     (LpLoraPeftConfig        *config,
                                        JsonObject              *object,
                                        const char              *prefix,
                                        const char              *where,
                                        GError                 **error);
gboolean  lp_lora_peft_config_lookup   (const LpLoraPeftConfig  *config,
                                        const char              *where,
                                        const char              *module,
                                        const char              *key,
                                        double                  *r,
                                        double                  *alpha,
                                        GError                 **error);
void      lp_lora_peft_config_rewrite  (JsonObject              *object,
                                        const char              *prefix,
                                        const LpLoraPeftConfig  *config,
                                        GPtrArray               *modules,
                                        const guint             *new_ranks);
JsonNode *lp_lora_peft_pattern_lookup  (JsonObject              *patterns,
                                        const char              *key);
char     *lp_lora_diffusers_metadata_to_text (JsonObject        *metadata);

/* PEFT's scale for a diffusers-named module beside a PEFT config */
gboolean  lp_lora_family_peft_init_module (LpLoraModule  *module,
                                           LpLoraFinder  *finder,
                                           GError       **error);

/* The families (one file each) */
/* kohya's hashes of the file's bytes (lp-lora-metadata.c), NULL-ended */
extern const char *const lp_lora_kohya_hash_keys[];

extern const LpLoraFamily lp_lora_family_peft;
extern const LpLoraFamily lp_lora_family_diffusers;
extern const LpLoraFamily lp_lora_family_diffusers_old;
extern const LpLoraFamily lp_lora_family_diffusers_processor;
extern const LpLoraFamily lp_lora_family_kohya;
extern const LpLoraFamily lp_lora_family_cloneofsimo;
extern const LpLoraFamily lp_lora_family_mlx;
extern const LpLoraFamily lp_lora_family_loha;
extern const LpLoraFamily lp_lora_family_lokr;
extern const LpLoraFamily lp_lora_family_custom;

/* DoRA is no family of its own but magnitude parts that kohya/LyCORIS
 * (`.dora_scale`) and PEFT (`.lora_magnitude_vector`) attach to a plain
 * module (lp-lora-family-dora.c). */
extern const LpLoraPart lp_lora_dora_parts[];
extern const guint lp_lora_n_dora_parts;

G_END_DECLS
