/* lp-lora-synth.c: the `lora-synth` stage, model-shaped LoRAs for tests and benchmarks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */
#include "lp-lora-synth.h"

#include <math.h>
#include <string.h>

/**
 * LpLoraSynth:
 *
 * Makes a LoRA with the modules of a real model (#LpLoraSynth:preset), in one
 * of three naming conventions (#LpLoraSynth:format), so that pipelines can be
 * tested and timed on model-sized data without downloading any.
 *
 * Each module's update `B @ A` has singular values close to
 * `σ_i = decay^i` (i = 0 … rank-1): A's rows are `√σ_i · g_i / √in` and B's
 * columns `√σ_i · h_i / √out`, with g_i, h_i independent vectors of
 * approximately Gaussian numbers; at these sizes such vectors are nearly
 * orthogonal, so the spectrum is close to, not exactly, the one asked for.
 * The numbers are an Irwin–Hall sum of four 16-bit uniforms from one
 * xoshiro256** draw, scaled to unit variance: cheap, bounded by ±2√3, and
 * Gaussian enough for a test spectrum.
 *
 * The data is lazy and computed from (#LpLoraSynth:seed, module, factor)
 * alone, so it is the same for any thread count or order of computation, and
 * the same module has the same factors in every format. No linear algebra is
 * needed: the cost is one random draw per element.
 *
 * Scale: kohya files get an `.alpha` tensor (0-dim, in the LoRA's dtype) of
 * #LpLoraSynth:alpha, PEFT files an `adapter_config.json` with `r` and
 * `lora_alpha`; the effective update is then `alpha / rank · B @ A`.
 * Diffusers files have no alpha (scale 1).
 */

struct _LpLoraSynth
{
  LpSource parent_instance;

  LpLoraSynthPreset preset;
  LpLoraSynthFormat format;
  guint rank;
  LpDtype dtype;
  double alpha;
  double decay;
  guint64 seed;
};

enum {
  PROP_0,
  PROP_PRESET,
  PROP_FORMAT,
  PROP_RANK,
  PROP_DTYPE,
  PROP_ALPHA,
  PROP_DECAY,
  PROP_SEED,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (LpLoraSynth, lp_lora_synth, LP_TYPE_SOURCE)

G_DEFINE_ENUM_TYPE (LpLoraSynthPreset, lp_lora_synth_preset,
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_PRESET_FLUX_DEV, "flux-dev"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_PRESET_SD15_UNET, "sd15-unet"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_PRESET_LLAMA, "llama"))

G_DEFINE_ENUM_TYPE (LpLoraSynthFormat, lp_lora_synth_format,
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_DIFFUSERS, "diffusers"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_KOHYA, "kohya"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_PEFT, "peft"))

/* The model layouts */

typedef struct {
  const char *leaf;     /* the module's path below its block */
  guint64 in;
  guint64 out;
} Layer;

typedef struct {
  const char *block;    /* printf format of a block's path, one %u */
  guint n_blocks;
  const Layer *layers;
  guint n_layers;
} BlockGroup;

/* Flux.1-dev, diffusers names: width 3072, 19 double and 38 single blocks. */
static const Layer flux_double[] = {
  { "attn.to_q", 3072, 3072 },
  { "attn.to_k", 3072, 3072 },
  { "attn.to_v", 3072, 3072 },
  { "attn.to_out.0", 3072, 3072 },
  { "attn.add_q_proj", 3072, 3072 },
  { "attn.add_k_proj", 3072, 3072 },
  { "attn.add_v_proj", 3072, 3072 },
  { "attn.to_add_out", 3072, 3072 },
  { "ff.net.0.proj", 3072, 12288 },
  { "ff.net.2", 12288, 3072 },
  { "ff_context.net.0.proj", 3072, 12288 },
  { "ff_context.net.2", 12288, 3072 },
  { "norm1.linear", 3072, 18432 },
  { "norm1_context.linear", 3072, 18432 },
};

static const Layer flux_single[] = {
  { "attn.to_q", 3072, 3072 },
  { "attn.to_k", 3072, 3072 },
  { "attn.to_v", 3072, 3072 },
  { "proj_mlp", 3072, 12288 },
  { "proj_out", 15360, 3072 },
  { "norm.linear", 3072, 9216 },
};

static const BlockGroup flux_groups[] = {
  { "transformer_blocks.%u", 19, flux_double, G_N_ELEMENTS (flux_double) },
  { "single_transformer_blocks.%u", 38, flux_single, G_N_ELEMENTS (flux_single) },
};

/* SD 1.5 UNet: one transformer block per attention; self-attention attn1 and
 * cross-attention attn2 over the 768-wide CLIP text states. */
#define SD15_ATTENTION(dim) \
  { "transformer_blocks.0.attn1.to_q", dim, dim }, \
  { "transformer_blocks.0.attn1.to_k", dim, dim }, \
  { "transformer_blocks.0.attn1.to_v", dim, dim }, \
  { "transformer_blocks.0.attn1.to_out.0", dim, dim }, \
  { "transformer_blocks.0.attn2.to_q", dim, dim }, \
  { "transformer_blocks.0.attn2.to_k", 768, dim }, \
  { "transformer_blocks.0.attn2.to_v", 768, dim }, \
  { "transformer_blocks.0.attn2.to_out.0", dim, dim }

static const Layer sd15_320[] = { SD15_ATTENTION (320) };
static const Layer sd15_640[] = { SD15_ATTENTION (640) };
static const Layer sd15_1280[] = { SD15_ATTENTION (1280) };

static const BlockGroup sd15_groups[] = {
  { "down_blocks.0.attentions.%u", 2, sd15_320, G_N_ELEMENTS (sd15_320) },
  { "down_blocks.1.attentions.%u", 2, sd15_640, G_N_ELEMENTS (sd15_640) },
  { "down_blocks.2.attentions.%u", 2, sd15_1280, G_N_ELEMENTS (sd15_1280) },
  { "mid_block.attentions.%u", 1, sd15_1280, G_N_ELEMENTS (sd15_1280) },
  { "up_blocks.1.attentions.%u", 3, sd15_1280, G_N_ELEMENTS (sd15_1280) },
  { "up_blocks.2.attentions.%u", 3, sd15_640, G_N_ELEMENTS (sd15_640) },
  { "up_blocks.3.attentions.%u", 3, sd15_320, G_N_ELEMENTS (sd15_320) },
};

/* A 1.1B llama (TinyLlama's shape): grouped-query attention, 4 kv heads of 64. */
static const Layer llama_layer[] = {
  { "self_attn.q_proj", 2048, 2048 },
  { "self_attn.k_proj", 2048, 256 },
  { "self_attn.v_proj", 2048, 256 },
  { "self_attn.o_proj", 2048, 2048 },
  { "mlp.gate_proj", 2048, 5632 },
  { "mlp.up_proj", 2048, 5632 },
  { "mlp.down_proj", 5632, 2048 },
};

static const BlockGroup llama_groups[] = {
  { "model.layers.%u", 22, llama_layer, G_N_ELEMENTS (llama_layer) },
};

typedef struct {
  const BlockGroup *groups;
  guint n_groups;
  const char *diffusers_root;   /* prefix of diffusers names, with its dot */
  const char *kohya_prefix;
  const char *base_model;       /* for the PEFT adapter config */
  const char *task_type;        /* JSON */
} Preset;

static const Preset presets[] = {
  [LP_LORA_SYNTH_PRESET_FLUX_DEV] = {
    flux_groups, G_N_ELEMENTS (flux_groups), "transformer.", "lora_unet_",
    "black-forest-labs/FLUX.1-dev", "null" },
  [LP_LORA_SYNTH_PRESET_SD15_UNET] = {
    sd15_groups, G_N_ELEMENTS (sd15_groups), "unet.", "lora_unet_",
    "stable-diffusion-v1-5/stable-diffusion-v1-5", "null" },
  [LP_LORA_SYNTH_PRESET_LLAMA] = {
    llama_groups, G_N_ELEMENTS (llama_groups), "", "lora_te_",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "\"CAUSAL_LM\"" },
};

/* Random numbers: splitmix64 to seed, xoshiro256** to draw */

static inline guint64
splitmix64 (guint64 *state)
{
  guint64 z = (*state += G_GUINT64_CONSTANT (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * G_GUINT64_CONSTANT (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * G_GUINT64_CONSTANT (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

static inline guint64
rotl (guint64 x,
      int     k)
{
  return (x << k) | (x >> (64 - k));
}

static inline guint64
xoshiro_next (guint64 s[4])
{
  guint64 result = rotl (s[1] * 5, 7) * 9;
  guint64 t = s[1] << 17;

  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl (s[3], 45);
  return result;
}

/* Irwin–Hall: four 16-bit uniforms summed, centred, scaled to unit variance. */
static inline float
approx_gaussian (guint64 s[4])
{
  guint64 x = xoshiro_next (s);
  guint32 sum = (guint32) (x & 0xffff) + ((x >> 16) & 0xffff)
                + ((x >> 32) & 0xffff) + (x >> 48);

  /* (sum + 2) / 65536 is the sum of four uniforms on (0, 1): mean 2, variance 1/3 */
  return ((float) sum + 2.0f - 131072.0f) * (1.7320508f / 65536.0f);
}

static guint64
hash_string (guint64     h,
             const char *text)
{
  /* FNV-1a: stable across platforms and GLib versions, unlike g_str_hash */
  for (const guchar *p = (const guchar *) text; *p != '\0'; p++)
    h = (h ^ *p) * G_GUINT64_CONSTANT (0x100000001b3);
  return h;
}

/* Lazy factor data */

typedef struct {
  guint64 seed;         /* from the stage's seed, the module and the factor */
  double decay;
  gboolean is_up;
} Factor;

#define CHUNK 4096

static GBytes *
factor_data (LpTensor  *tensor,
             gpointer   user_data,
             GError   **error)
{
  const Factor *factor = user_data;
  LpDtype dtype = lp_tensor_get_dtype (tensor);
  guint64 rows = lp_tensor_get_dim (tensor, 0);
  guint64 cols = lp_tensor_get_dim (tensor, 1);
  guint64 rank = factor->is_up ? cols : rows;
  guint64 n = rows * cols, done = 0, row = 0, col = 0;
  gsize n_bytes = lp_tensor_get_n_bytes (tensor);
  gsize elem_bits = lp_dtype_get_bits (dtype);
  g_autofree float *mult = g_new (float, rank);
  float chunk[CHUNK];
  guint64 state = factor->seed, s[4];
  guint8 *out;
  double dim;

  for (guint i = 0; i < 4; i++)
    s[i] = splitmix64 (&state);

  /* A = diag(√σ) · G / √in;  B = H · diag(√σ) / √out */
  dim = factor->is_up ? rows : cols;
  for (guint64 i = 0; i < rank; i++)
    mult[i] = sqrt (pow (factor->decay, (double) i) / dim);

  out = g_malloc (MAX (n_bytes, 1));
  while (done < n)
    {
      guint64 m = MIN (n - done, CHUNK);

      /* (row, col) of element done + j, followed without dividing; the
       * state in locals so that it stays in registers */
      guint64 st[4] = { s[0], s[1], s[2], s[3] };

      for (guint64 j = 0; j < m; )
        {
          guint64 run = MIN (m - j, cols - col);

          if (factor->is_up)
            for (guint64 c = 0; c < run; c++)
              chunk[j + c] = approx_gaussian (st) * mult[col + c];
          else
            {
              float rm = mult[row];
              for (guint64 c = 0; c < run; c++)
                chunk[j + c] = approx_gaussian (st) * rm;
            }
          j += run;
          col += run;
          if (col == cols)
            {
              col = 0;
              row++;
            }
        }
      memcpy (s, st, sizeof st);
      lp_dtype_from_f32 (dtype, chunk, out + done * elem_bits / 8, m);
      done += m;
    }
  return g_bytes_new_take (out, n_bytes);
}

static gboolean
add_factor (LpCheckpoint  *checkpoint,
            const char    *name,
            LpDtype        dtype,
            guint64        rows,
            guint64        cols,
            guint64        seed,
            double         decay,
            gboolean       is_up,
            GError       **error)
{
  g_autoptr(LpTensor) tensor = NULL;
  guint64 shape[2] = { rows, cols };
  Factor *factor = g_new (Factor, 1);

  factor->seed = seed;
  factor->decay = decay;
  factor->is_up = is_up;
  tensor = lp_tensor_new_lazy (name, dtype, shape, 2, factor_data, factor, g_free, error);
  return tensor != NULL && lp_checkpoint_add_tensor (checkpoint, tensor, error);
}

static char *
json_number (double value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  return g_strdup (g_ascii_dtostr (buf, sizeof buf, value));
}

static char *
adapter_config (const Preset *preset,
                guint         rank,
                double        alpha)
{
  GString *json = g_string_new ("{\n");
  g_autofree char *alpha_text = json_number (alpha);
  gboolean first = TRUE;

  g_string_append_printf (json,
                          "  \"alpha_pattern\": {},\n"
                          "  \"base_model_name_or_path\": \"%s\",\n"
                          "  \"bias\": \"none\",\n"
                          "  \"fan_in_fan_out\": false,\n"
                          "  \"inference_mode\": true,\n"
                          "  \"lora_alpha\": %s,\n"
                          "  \"lora_dropout\": 0.0,\n"
                          "  \"peft_type\": \"LORA\",\n"
                          "  \"r\": %u,\n"
                          "  \"rank_pattern\": {},\n"
                          "  \"target_modules\": [",
                          preset->base_model, alpha_text, rank);
  /* Each leaf once: the same leaf recurs in groups of the same kind. */
  for (guint g = 0; g < preset->n_groups; g++)
    for (guint l = 0; l < preset->groups[g].n_layers; l++)
      {
        const char *leaf = preset->groups[g].layers[l].leaf;
        g_autofree char *quoted = g_strdup_printf ("\"%s\"", leaf);

        if (strstr (json->str, quoted) != NULL)
          continue;
        g_string_append_printf (json, "%s\n    %s", first ? "" : ",", quoted);
        first = FALSE;
      }
  g_string_append_printf (json,
                          "\n  ],\n"
                          "  \"task_type\": %s,\n"
                          "  \"use_rslora\": false\n"
                          "}\n", preset->task_type);
  return g_string_free (json, FALSE);
}

static LpCheckpoint *
lp_lora_synth_create (LpSource  *source,
                      GError   **error)
{
  LpLoraSynth *self = LP_LORA_SYNTH (source);
  const Preset *preset = &presets[self->preset];
  g_autoptr(LpCheckpoint) checkpoint = lp_checkpoint_new ();
  double alpha = self->alpha > 0 ? self->alpha : self->rank / 2.0;
  guint64 seed = hash_string (G_GUINT64_CONSTANT (0xcbf29ce484222325) ^ self->seed, "lora-synth");

  for (guint g = 0; g < preset->n_groups; g++)
    {
      const BlockGroup *group = &preset->groups[g];

      for (guint b = 0; b < group->n_blocks; b++)
        {
          g_autofree char *block = g_strdup_printf (group->block, b);

          for (guint l = 0; l < group->n_layers; l++)
            {
              const Layer *layer = &group->layers[l];
              g_autofree char *module = g_strconcat (block, ".", layer->leaf, NULL);
              g_autofree char *base = NULL;
              const char *down_suffix, *up_suffix;
              g_autofree char *down = NULL, *up = NULL;
              guint64 module_seed = hash_string (seed, module);

              switch (self->format)
                {
                case LP_LORA_SYNTH_FORMAT_KOHYA:
                  base = g_strconcat (preset->kohya_prefix, module, NULL);
                  g_strdelimit (base, ".", '_');
                  down_suffix = ".lora_down.weight";
                  up_suffix = ".lora_up.weight";
                  break;
                case LP_LORA_SYNTH_FORMAT_PEFT:
                  base = g_strconcat ("base_model.model.", module, NULL);
                  down_suffix = ".lora_A.weight";
                  up_suffix = ".lora_B.weight";
                  break;
                case LP_LORA_SYNTH_FORMAT_DIFFUSERS:
                default:
                  base = g_strconcat (preset->diffusers_root, module, NULL);
                  down_suffix = ".lora_A.weight";
                  up_suffix = ".lora_B.weight";
                  break;
                }

              /* kohya writes its keys sorted: alpha, lora_down, lora_up */
              if (self->format == LP_LORA_SYNTH_FORMAT_KOHYA)
                {
                  g_autofree char *name = g_strconcat (base, ".alpha", NULL);
                  g_autoptr(LpTensor) tensor = NULL;
                  float value = alpha;
                  guint64 scalar_shape[1] = { 1 };

                  /* 0-dim, as kohya's torch.tensor(alpha) is */
                  tensor = lp_tensor_new_from_f32 (name, self->dtype, scalar_shape, 0,
                                                   &value, 1, error);
                  if (tensor == NULL || !lp_checkpoint_add_tensor (checkpoint, tensor, error))
                    return NULL;
                }

              down = g_strconcat (base, down_suffix, NULL);
              up = g_strconcat (base, up_suffix, NULL);
              if (!add_factor (checkpoint, down, self->dtype, self->rank, layer->in,
                               hash_string (module_seed, ":down"), self->decay, FALSE, error)
                  || !add_factor (checkpoint, up, self->dtype, layer->out, self->rank,
                                  hash_string (module_seed, ":up"), self->decay, TRUE, error))
                return NULL;
            }
        }
    }

  lp_checkpoint_set_metadata (checkpoint, "format", "pt");
  if (self->format == LP_LORA_SYNTH_FORMAT_PEFT)
    {
      g_autofree char *config = adapter_config (preset, self->rank, alpha);
      lp_checkpoint_set_adapter_config (checkpoint, config);
    }
  return g_steal_pointer (&checkpoint);
}

static gboolean
lp_lora_synth_prepare (LpStage  *stage,
                       GError  **error)
{
  LpLoraSynth *self = LP_LORA_SYNTH (stage);

  if (!lp_dtype_is_float (self->dtype) || !lp_dtype_can_convert (self->dtype))
    {
      g_set_error (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                   "dtype %s: a LoRA needs a float dtype lpipe can write "
                   "(F64, F32, F16, BF16, F8_E4M3, F8_E5M2)",
                   lp_dtype_to_string (self->dtype));
      return FALSE;
    }
  return TRUE;
}

static void
lp_lora_synth_set_property (GObject      *object,
                            guint         prop_id,
                            const GValue *value,
                            GParamSpec   *pspec)
{
  LpLoraSynth *self = LP_LORA_SYNTH (object);

  switch (prop_id)
    {
    case PROP_PRESET:
      self->preset = g_value_get_enum (value);
      break;
    case PROP_FORMAT:
      self->format = g_value_get_enum (value);
      break;
    case PROP_RANK:
      self->rank = g_value_get_uint (value);
      break;
    case PROP_DTYPE:
      self->dtype = g_value_get_enum (value);
      break;
    case PROP_ALPHA:
      self->alpha = g_value_get_double (value);
      break;
    case PROP_DECAY:
      self->decay = g_value_get_double (value);
      break;
    case PROP_SEED:
      self->seed = g_value_get_uint64 (value);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_synth_get_property (GObject    *object,
                            guint       prop_id,
                            GValue     *value,
                            GParamSpec *pspec)
{
  LpLoraSynth *self = LP_LORA_SYNTH (object);

  switch (prop_id)
    {
    case PROP_PRESET:
      g_value_set_enum (value, self->preset);
      break;
    case PROP_FORMAT:
      g_value_set_enum (value, self->format);
      break;
    case PROP_RANK:
      g_value_set_uint (value, self->rank);
      break;
    case PROP_DTYPE:
      g_value_set_enum (value, self->dtype);
      break;
    case PROP_ALPHA:
      g_value_set_double (value, self->alpha);
      break;
    case PROP_DECAY:
      g_value_set_double (value, self->decay);
      break;
    case PROP_SEED:
      g_value_set_uint64 (value, self->seed);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
lp_lora_synth_class_init (LpLoraSynthClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  LpStageClass *stage_class = LP_STAGE_CLASS (klass);
  LpSourceClass *source_class = LP_SOURCE_CLASS (klass);

  object_class->set_property = lp_lora_synth_set_property;
  object_class->get_property = lp_lora_synth_get_property;
  stage_class->prepare = lp_lora_synth_prepare;
  source_class->create = lp_lora_synth_create;

  /**
   * LpLoraSynth:preset:
   *
   * The model whose linear layers the LoRA adapts.
   */
  properties[PROP_PRESET] =
    g_param_spec_enum ("preset", "Preset", "The model whose layers the LoRA adapts",
                       LP_TYPE_LORA_SYNTH_PRESET, LP_LORA_SYNTH_PRESET_FLUX_DEV,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:format:
   *
   * The key convention of the tensors, and where the scale is kept.
   */
  properties[PROP_FORMAT] =
    g_param_spec_enum ("format", "Format", "Key convention: diffusers, kohya (with .alpha) or peft (with adapter_config.json)",
                       LP_TYPE_LORA_SYNTH_FORMAT, LP_LORA_SYNTH_FORMAT_DIFFUSERS,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:rank:
   *
   * The rank of every module.
   */
  properties[PROP_RANK] =
    g_param_spec_uint ("rank", "Rank", "The rank of every module",
                       1, 4096, 16,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:dtype:
   *
   * The dtype of the factors and of the kohya alpha tensors.
   */
  properties[PROP_DTYPE] =
    g_param_spec_enum ("dtype", "Dtype", "The dtype of the tensors (a float dtype lpipe can convert)",
                       LP_TYPE_FLOAT_DTYPE, LP_FLOAT_DTYPE_BF16,
                       G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:alpha:
   *
   * The alpha of kohya and PEFT files (scale alpha / rank); 0 means rank / 2.
   * Diffusers files have none.
   */
  properties[PROP_ALPHA] =
    g_param_spec_double ("alpha", "Alpha", "kohya and PEFT alpha (scale alpha / rank); 0 means rank / 2",
                         0.0, 65536.0, 0.0,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:decay:
   *
   * The ratio of consecutive singular values of each module's `B @ A`, whose
   * largest is about 1.
   */
  properties[PROP_DECAY] =
    g_param_spec_double ("decay", "Decay", "Ratio of consecutive singular values of each update (sigma_i = decay^i)",
                         0.0, 1.0, 0.8,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);
  /**
   * LpLoraSynth:seed:
   *
   * The seed of the random factors; the same seed gives the same bytes.
   */
  properties[PROP_SEED] =
    g_param_spec_uint64 ("seed", "Seed", "Seed of the random factors",
                         0, G_MAXUINT64, 0,
                         G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);

  lp_stage_class_set_metadata (stage_class, "lora-synth", "LoRA",
                               "Make a model-shaped LoRA with a decaying spectrum, for tests and benchmarks");
}

static void
lp_lora_synth_init (LpLoraSynth *self)
{
  self->preset = LP_LORA_SYNTH_PRESET_FLUX_DEV;
  self->format = LP_LORA_SYNTH_FORMAT_DIFFUSERS;
  self->rank = 16;
  self->dtype = LP_DTYPE_BF16;
  self->alpha = 0.0;
  self->decay = 0.8;
  self->seed = 0;
}
