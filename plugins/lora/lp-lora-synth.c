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
 * Makes a LoRA with the modules of a real model (#LpLoraSynth:preset), in the
 * naming and layout one tool writes (#LpLoraSynth:format), so that pipelines
 * can be tested and timed on model-sized data without downloading any.
 *
 * The kohya and LyCORIS formats use the names sd-scripts gives the modules:
 * for Flux the BFL layers of its own model code (networks/lora_flux.py
 * create_modules over library/flux_models.py: `double_blocks_N_img_attn_qkv`
 * with q, k and v fused, `single_blocks_N_linear1` fusing them with the MLP
 * input), for SD 1.5 the diffusers UNet paths with underscores. PEFT,
 * diffusers and mlx-lm use the diffusers (or transformers) paths.
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
 * Diffusers files have no alpha (scale 1). mlx-lm files hold `lora_a` = Aᵀ
 * [in, r] and `lora_b` = Bᵀ [r, out] and an `adapter_config.json` whose
 * `lora_parameters.scale` is alpha / rank (mlx uses it as is), so the update
 * is the same as kohya's.
 *
 * LyCORIS files are written as LyCORIS's LohaModule and LokrModule name
 * their parameters (lycoris/modules/loha.py, lokr.py), with the `ss_network_*`
 * metadata of its kohya wrapper. LoHa: `hada_w1_a` [out, r], `hada_w1_b`
 * [r, in], `hada_w2_a`, `hada_w2_b`, `.alpha`: ΔW = alpha / r ·
 * (w1a @ w1b) ⊙ (w2a @ w2b), each product with the decaying spectrum above.
 * LoKr: out and in are split by LyCORIS's factorization() with
 * #LpLoraSynth:factor; `lokr_w1` [out₁, in₁] is a whole matrix and W2 the
 * product `lokr_w2_a` [out₂, r] @ `lokr_w2_b` [r, in₂] while r is below half
 * of out₂ and in₂ (a whole `lokr_w2` otherwise, as LokrModule decides):
 * ΔW = alpha / r · kron (W1, W2), scale 1 when both are whole.
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
  gint factor;
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
  PROP_FACTOR,
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
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_PEFT, "peft"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_LOHA, "loha"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_LOKR, "lokr"),
  G_DEFINE_ENUM_VALUE (LP_LORA_SYNTH_FORMAT_MLX, "mlx"))

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

/* The same model in BFL's own code (library/flux_models.py of sd-scripts),
 * whose module paths kohya's networks/lora_flux.py names its LoRAs after, in
 * the order named_modules() visits them: DoubleStreamBlock's img_mod.lin
 * (Modulation, 6 × 3072), img_attn.qkv (fused, 3 × 3072), img_attn.proj,
 * img_mlp.0 and img_mlp.2, then the same for txt; SingleStreamBlock's
 * linear1 (q, k, v and the MLP input fused: 3 × 3072 + 12288), linear2
 * (attention and MLP output: 3072 + 12288 → 3072) and modulation.lin. */
#define FLUX_BFL_STREAM(s) \
  { s "_mod.lin", 3072, 18432 }, \
  { s "_attn.qkv", 3072, 9216 }, \
  { s "_attn.proj", 3072, 3072 }, \
  { s "_mlp.0", 3072, 12288 }, \
  { s "_mlp.2", 12288, 3072 }

static const Layer flux_bfl_double[] = { FLUX_BFL_STREAM ("img"), FLUX_BFL_STREAM ("txt") };

static const Layer flux_bfl_single[] = {
  { "linear1", 3072, 21504 },
  { "linear2", 15360, 3072 },
  { "modulation.lin", 3072, 9216 },
};

static const BlockGroup flux_bfl_groups[] = {
  { "double_blocks.%u", 19, flux_bfl_double, G_N_ELEMENTS (flux_bfl_double) },
  { "single_blocks.%u", 38, flux_bfl_single, G_N_ELEMENTS (flux_bfl_single) },
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
  const BlockGroup *kohya_groups; /* the layers as kohya names them; NULL: @groups */
  guint n_kohya_groups;
  const char *diffusers_root;   /* prefix of diffusers names, with its dot */
  const char *kohya_prefix;
  const char *base_model;       /* for the PEFT adapter config */
  const char *task_type;        /* JSON */
} Preset;

static const Preset presets[] = {
  [LP_LORA_SYNTH_PRESET_FLUX_DEV] = {
    flux_groups, G_N_ELEMENTS (flux_groups), flux_bfl_groups, G_N_ELEMENTS (flux_bfl_groups),
    "transformer.", "lora_unet_",
    "black-forest-labs/FLUX.1-dev", "null" },
  [LP_LORA_SYNTH_PRESET_SD15_UNET] = {
    sd15_groups, G_N_ELEMENTS (sd15_groups), NULL, 0, "unet.", "lora_unet_",
    "stable-diffusion-v1-5/stable-diffusion-v1-5", "null" },
  [LP_LORA_SYNTH_PRESET_LLAMA] = {
    llama_groups, G_N_ELEMENTS (llama_groups), NULL, 0, "", "lora_te_",
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

/* What a tensor's numbers are: the rows of A = diag(√σ) · G / √in
 * (@FACTOR_DOWN, [r, in]), the columns of B = H · diag(√σ) / √out
 * (@FACTOR_UP, [out, r]), or a whole matrix of numbers of variance 1 / cols
 * (@FACTOR_DENSE, a LoKr W1). @transposed: the tensor holds the transpose
 * of that matrix (mlx-lm's lora_a = Aᵀ, lora_b = Bᵀ). */
typedef enum {
  FACTOR_DOWN,
  FACTOR_UP,
  FACTOR_DENSE,
} FactorKind;

typedef struct {
  guint64 seed;         /* from the stage's seed, the module and the factor */
  double decay;
  FactorKind kind;
  gboolean transposed;
} Factor;

#define CHUNK 4096

/* The numbers of a rows × cols factor in row-major order, drawn in turn. */
typedef struct {
  guint64 s[4];
  guint64 rows, cols, row, col;
  FactorKind kind;
  float *mult;          /* per rank index (DOWN, UP), or one value (DENSE) */
} Stream;

static void
stream_init (Stream       *stream,
             const Factor *factor,
             guint64       rows,
             guint64       cols)
{
  guint64 state = factor->seed;
  guint64 rank = factor->kind == FACTOR_UP ? cols : rows;
  double dim = factor->kind == FACTOR_UP ? rows : cols;

  for (guint i = 0; i < 4; i++)
    stream->s[i] = splitmix64 (&state);
  stream->rows = rows;
  stream->cols = cols;
  stream->row = stream->col = 0;
  stream->kind = factor->kind;
  if (factor->kind == FACTOR_DENSE)
    {
      stream->mult = g_new (float, 1);
      stream->mult[0] = sqrt (1.0 / dim);
      return;
    }
  stream->mult = g_new (float, MAX (rank, 1));
  for (guint64 i = 0; i < rank; i++)
    stream->mult[i] = sqrt (pow (factor->decay, (double) i) / dim);
}

/* The next @m numbers; (row, col) followed without dividing, the state in
 * locals so that it stays in registers. */
static void
stream_fill (Stream  *stream,
             float   *chunk,
             guint64  m)
{
  guint64 st[4] = { stream->s[0], stream->s[1], stream->s[2], stream->s[3] };
  guint64 row = stream->row, col = stream->col, cols = stream->cols;
  const float *mult = stream->mult;

  for (guint64 j = 0; j < m; )
    {
      guint64 run = MIN (m - j, cols - col);

      if (stream->kind == FACTOR_UP)
        for (guint64 c = 0; c < run; c++)
          chunk[j + c] = approx_gaussian (st) * mult[col + c];
      else
        {
          float rm = stream->kind == FACTOR_DOWN ? mult[row] : mult[0];
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
  memcpy (stream->s, st, sizeof st);
  stream->row = row;
  stream->col = col;
}

static GBytes *
factor_data (LpTensor  *tensor,
             gpointer   user_data,
             GError   **error)
{
  const Factor *factor = user_data;
  LpDtype dtype = lp_tensor_get_dtype (tensor);
  guint64 rows = lp_tensor_get_dim (tensor, 0);
  guint64 cols = lp_tensor_get_dim (tensor, 1);
  guint64 n = rows * cols;
  gsize n_bytes = lp_tensor_get_n_bytes (tensor);
  gsize elem_bits = lp_dtype_get_bits (dtype);
  guint8 *out = lp_try_alloc (n_bytes, 1, "its data", error);
  Stream stream;

  if (out == NULL)
    return NULL;
  if (factor->transposed)
    {
      /* drawn in the order of the matrix, stored transposed */
      g_autofree float *values = lp_try_alloc (n, sizeof (float), "its values", error);
      g_autofree float *stored = values ? lp_try_alloc (n, sizeof (float), "its values", error) : NULL;

      if (stored == NULL)
        {
          g_free (out);
          return NULL;
        }

      stream_init (&stream, factor, cols, rows);
      stream_fill (&stream, values, n);
      for (guint64 i = 0; i < cols; i++)
        for (guint64 j = 0; j < rows; j++)
          stored[j * cols + i] = values[i * rows + j];
      lp_dtype_from_f32 (dtype, stored, out, n);
    }
  else
    {
      float chunk[CHUNK];

      stream_init (&stream, factor, rows, cols);
      for (guint64 done = 0; done < n; )
        {
          guint64 m = MIN (n - done, CHUNK);

          stream_fill (&stream, chunk, m);
          lp_dtype_from_f32 (dtype, chunk, out + done * elem_bits / 8, m);
          done += m;
        }
    }
  g_free (stream.mult);
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
            FactorKind     kind,
            gboolean       transposed,
            GError       **error)
{
  g_autoptr(LpTensor) tensor = NULL;
  guint64 shape[2] = { transposed ? cols : rows, transposed ? rows : cols };
  Factor *factor = g_new (Factor, 1);

  factor->seed = seed;
  factor->decay = decay;
  factor->kind = kind;
  factor->transposed = transposed;
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

/* A number as Python's str() of a float writes it: "4.0", "0.5". */
static char *
python_float (double value)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  if (value == floor (value) && fabs (value) < 1e16)
    return g_strdup_printf ("%.1f", value);
  return g_strdup (g_ascii_dtostr (buf, sizeof buf, value));
}

/* The adapter_config.json mlx_lm.lora writes (lora.py, save_config:
 * vars(args) sorted by key, json.dump with indent 4), with the training
 * arguments a run of its defaults leaves, every block adapted. */
static char *
mlx_adapter_config (const Preset *preset,
                    guint         rank,
                    double        scale)
{
  g_autofree char *scale_text = python_float (scale);
  guint n_blocks = 0;

  for (guint g = 0; g < preset->n_groups; g++)
    n_blocks += preset->groups[g].n_blocks;
  return g_strdup_printf ("{\n"
                          "    \"adapter_path\": \"adapters\",\n"
                          "    \"batch_size\": 4,\n"
                          "    \"data\": \"mlx-community/WikiSQL\",\n"
                          "    \"fine_tune_type\": \"lora\",\n"
                          "    \"iters\": 1000,\n"
                          "    \"learning_rate\": 1e-05,\n"
                          "    \"lora_parameters\": {\n"
                          "        \"rank\": %u,\n"
                          "        \"dropout\": 0.0,\n"
                          "        \"scale\": %s\n"
                          "    },\n"
                          "    \"model\": \"%s\",\n"
                          "    \"num_layers\": %u,\n"
                          "    \"seed\": 0,\n"
                          "    \"train\": true\n"
                          "}", rank, scale_text, preset->base_model, n_blocks);
}

/* LyCORIS functional/general.py factorization(): dimension = m · n with
 * m ≤ n, m = factor when it divides, else the split nearest the square root
 * whose m is at most factor (any when factor < 0). */
static void
lycoris_factorization (guint64  dimension,
                       gint     factor,
                       guint64 *first,
                       guint64 *second)
{
  guint64 m = 1, n = dimension, limit;

  if (factor > 0 && dimension % factor == 0)
    {
      m = factor;
      n = dimension / factor;
      *first = MIN (m, n);
      *second = MAX (m, n);
      return;
    }
  limit = factor < 0 ? dimension : (guint64) factor;
  while (m < n)
    {
      guint64 new_m = m + 1, new_n;

      while (dimension % new_m != 0)
        new_m++;
      new_n = dimension / new_m;
      if (new_m + new_n > m + n || new_m > limit)
        break;
      m = new_m;
      n = new_n;
    }
  *first = MIN (m, n);
  *second = MAX (m, n);
}

/* A 0-dim tensor, as kohya's and LyCORIS's torch.tensor(alpha) is. */
static gboolean
add_scalar (LpCheckpoint  *checkpoint,
            const char    *name,
            LpDtype        dtype,
            float          value,
            GError       **error)
{
  g_autoptr(LpTensor) tensor = NULL;
  guint64 scalar_shape[1] = { 1 };

  tensor = lp_tensor_new_from_f32 (name, dtype, scalar_shape, 0, &value, 1, error);
  return tensor != NULL && lp_checkpoint_add_tensor (checkpoint, tensor, error);
}

/* One module of the LoRA, named @base in the format's convention. Each
 * tool's keys come sorted, as safetensors' writer leaves them. */
static gboolean
add_module (LpLoraSynth   *self,
            LpCheckpoint  *checkpoint,
            const char    *base,
            const Layer   *layer,
            guint64        module_seed,
            double         alpha,
            GError       **error)
{
  g_autofree char *alpha_name = g_strconcat (base, ".alpha", NULL);
  guint r = self->rank;
  LpDtype dtype = self->dtype;
  double decay = self->decay;

#define PART(suffix) g_autofree char *suffix = g_strconcat (base, "." #suffix, NULL)
#define SEED(text) hash_string (module_seed, text)
  switch (self->format)
    {
    case LP_LORA_SYNTH_FORMAT_KOHYA:
      {
        g_autofree char *down = g_strconcat (base, ".lora_down.weight", NULL);
        g_autofree char *up = g_strconcat (base, ".lora_up.weight", NULL);

        return add_scalar (checkpoint, alpha_name, dtype, alpha, error)
               && add_factor (checkpoint, down, dtype, r, layer->in, SEED (":down"), decay,
                              FACTOR_DOWN, FALSE, error)
               && add_factor (checkpoint, up, dtype, layer->out, r, SEED (":up"), decay,
                              FACTOR_UP, FALSE, error);
      }
    case LP_LORA_SYNTH_FORMAT_MLX:
      {
        PART (lora_a);
        PART (lora_b);

        /* the same A and B as the other formats, stored transposed */
        return add_factor (checkpoint, lora_a, dtype, r, layer->in, SEED (":down"), decay,
                           FACTOR_DOWN, TRUE, error)
               && add_factor (checkpoint, lora_b, dtype, layer->out, r, SEED (":up"), decay,
                              FACTOR_UP, TRUE, error);
      }
    case LP_LORA_SYNTH_FORMAT_LOHA:
      {
        PART (hada_w1_a);
        PART (hada_w1_b);
        PART (hada_w2_a);
        PART (hada_w2_b);

        return add_scalar (checkpoint, alpha_name, dtype, alpha, error)
               && add_factor (checkpoint, hada_w1_a, dtype, layer->out, r, SEED (":up"), decay,
                              FACTOR_UP, FALSE, error)
               && add_factor (checkpoint, hada_w1_b, dtype, r, layer->in, SEED (":down"), decay,
                              FACTOR_DOWN, FALSE, error)
               && add_factor (checkpoint, hada_w2_a, dtype, layer->out, r, SEED (":up2"), decay,
                              FACTOR_UP, FALSE, error)
               && add_factor (checkpoint, hada_w2_b, dtype, r, layer->in, SEED (":down2"), decay,
                              FACTOR_DOWN, FALSE, error);
      }
    case LP_LORA_SYNTH_FORMAT_LOKR:
      {
        guint64 out1, out2, in1, in2;
        gboolean whole_w2;
        PART (lokr_w1);
        PART (lokr_w2);
        PART (lokr_w2_a);
        PART (lokr_w2_b);

        /* LokrModule (Linear): out = out₁·out₂, in = in₁·in₂, the larger
         * halves in W2; W2 is whole unless the rank is below half of both */
        lycoris_factorization (layer->out, self->factor, &out1, &out2);
        lycoris_factorization (layer->in, self->factor, &in1, &in2);
        whole_w2 = r >= MAX (out2, in2) / 2.0;
        /* "use scale = 1" with two whole matrices: alpha = lora_dim */
        if (!add_scalar (checkpoint, alpha_name, dtype, whole_w2 ? r : alpha, error)
            || !add_factor (checkpoint, lokr_w1, dtype, out1, in1, SEED (":w1"), decay,
                            FACTOR_DENSE, FALSE, error))
          return FALSE;
        if (whole_w2)
          return add_factor (checkpoint, lokr_w2, dtype, out2, in2, SEED (":w2"), decay,
                             FACTOR_DENSE, FALSE, error);
        return add_factor (checkpoint, lokr_w2_a, dtype, out2, r, SEED (":up"), decay,
                           FACTOR_UP, FALSE, error)
               && add_factor (checkpoint, lokr_w2_b, dtype, r, in2, SEED (":down"), decay,
                              FACTOR_DOWN, FALSE, error);
      }
    case LP_LORA_SYNTH_FORMAT_PEFT:
    case LP_LORA_SYNTH_FORMAT_DIFFUSERS:
    default:
      {
        g_autofree char *down = g_strconcat (base, ".lora_A.weight", NULL);
        g_autofree char *up = g_strconcat (base, ".lora_B.weight", NULL);

        return add_factor (checkpoint, down, dtype, r, layer->in, SEED (":down"), decay,
                           FACTOR_DOWN, FALSE, error)
               && add_factor (checkpoint, up, dtype, layer->out, r, SEED (":up"), decay,
                              FACTOR_UP, FALSE, error);
      }
    }
#undef PART
#undef SEED
}

static gboolean
uses_kohya_names (LpLoraSynthFormat format)
{
  return format == LP_LORA_SYNTH_FORMAT_KOHYA || format == LP_LORA_SYNTH_FORMAT_LOHA
         || format == LP_LORA_SYNTH_FORMAT_LOKR;
}

/* What LyCORIS's kohya wrapper (network_module lycoris.kohya) records:
 * train_network.py's ss_network_* with the network_args as JSON. */
static void
set_lycoris_metadata (LpLoraSynth  *self,
                      LpCheckpoint *checkpoint,
                      double        alpha)
{
  g_autofree char *dim = g_strdup_printf ("%u", self->rank);
  g_autofree char *alpha_text = python_float (alpha);
  g_autofree char *args = NULL;

  if (self->format == LP_LORA_SYNTH_FORMAT_LOHA)
    args = g_strdup ("{\"algo\": \"loha\"}");
  else
    args = g_strdup_printf ("{\"algo\": \"lokr\", \"factor\": \"%d\"}", self->factor);
  lp_checkpoint_set_metadata (checkpoint, "ss_network_module", "lycoris.kohya");
  lp_checkpoint_set_metadata (checkpoint, "ss_network_dim", dim);
  lp_checkpoint_set_metadata (checkpoint, "ss_network_alpha", alpha_text);
  lp_checkpoint_set_metadata (checkpoint, "ss_network_args", args);
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
  gboolean kohya = uses_kohya_names (self->format);
  const BlockGroup *groups = kohya && preset->kohya_groups ? preset->kohya_groups : preset->groups;
  guint n_groups = kohya && preset->kohya_groups ? preset->n_kohya_groups : preset->n_groups;

  for (guint g = 0; g < n_groups; g++)
    {
      const BlockGroup *group = &groups[g];

      for (guint b = 0; b < group->n_blocks; b++)
        {
          g_autofree char *block = g_strdup_printf (group->block, b);

          for (guint l = 0; l < group->n_layers; l++)
            {
              const Layer *layer = &group->layers[l];
              g_autofree char *module = g_strconcat (block, ".", layer->leaf, NULL);
              g_autofree char *base = NULL;

              if (kohya)
                {
                  base = g_strconcat (preset->kohya_prefix, module, NULL);
                  g_strdelimit (base, ".", '_');
                }
              else if (self->format == LP_LORA_SYNTH_FORMAT_PEFT)
                base = g_strconcat ("base_model.model.", module, NULL);
              else
                base = g_strconcat (preset->diffusers_root, module, NULL);
              if (!add_module (self, checkpoint, base, layer, hash_string (seed, module), alpha, error))
                return NULL;
            }
        }
    }

  switch (self->format)
    {
    case LP_LORA_SYNTH_FORMAT_MLX:
      {
        /* mlx's save_safetensors writes no metadata ("__metadata__": null) */
        g_autofree char *config = mlx_adapter_config (preset, self->rank, alpha / self->rank);
        lp_checkpoint_set_adapter_config (checkpoint, config);
      }
      break;
    case LP_LORA_SYNTH_FORMAT_PEFT:
      {
        g_autofree char *config = adapter_config (preset, self->rank, alpha);
        lp_checkpoint_set_metadata (checkpoint, "format", "pt");
        lp_checkpoint_set_adapter_config (checkpoint, config);
      }
      break;
    case LP_LORA_SYNTH_FORMAT_LOHA:
    case LP_LORA_SYNTH_FORMAT_LOKR:
      set_lycoris_metadata (self, checkpoint, alpha);
      lp_checkpoint_set_metadata (checkpoint, "format", "pt");
      break;
    default:
      lp_checkpoint_set_metadata (checkpoint, "format", "pt");
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
  if (self->factor != -1 && self->format != LP_LORA_SYNTH_FORMAT_LOKR)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "factor splits LoKr modules; it has no effect without format=lokr");
      return FALSE;
    }
  if (self->factor == 0)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "factor 0 splits nothing: give the size of the W1 side, or -1");
      return FALSE;
    }
  if (self->alpha > 0 && self->format == LP_LORA_SYNTH_FORMAT_DIFFUSERS)
    {
      g_set_error_literal (error, LP_STAGE_ERROR, LP_STAGE_ERROR_INVALID_PROPERTY,
                           "diffusers files keep no alpha (their scale is 1): alpha has no "
                           "effect with format=diffusers");
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
    case PROP_FACTOR:
      self->factor = g_value_get_int (value);
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
    case PROP_FACTOR:
      g_value_set_int (value, self->factor);
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
    g_param_spec_enum ("format", "Format", "Key convention: diffusers, kohya (with .alpha), peft (with adapter_config.json), loha or lokr (LyCORIS, kohya names), mlx (mlx-lm, with adapter_config.json)",
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
  /**
   * LpLoraSynth:factor:
   *
   * LyCORIS LoKr's `factor`: each of out and in is split into a W1 side of
   * about this size and a W2 side (LyCORIS factorization(); -1: nearest the
   * square root). Only format=lokr reads it.
   */
  properties[PROP_FACTOR] =
    g_param_spec_int ("factor", "Factor", "LoKr (format=lokr): split out and in as LyCORIS factorization() does, the W1 side at most this (-1: nearest the square root)",
                      -1, 65536, -1,
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
  self->factor = -1;
}
