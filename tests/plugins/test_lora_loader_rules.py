#!/usr/bin/python3
# test_lora_loader_rules.py: lpipe's outputs loaded by the loaders' own rules
#
# The acceptance check of issue 13. diffusers, PEFT, ComfyUI and kohya
# sd-scripts cannot be installed here, so their loading rules are
# re-implemented below, function by function, each citing the function it
# follows, and applied to what lpipe writes: LoRAs reduced at a fixed and at
# dynamic ranks, padded, converted both ways between kohya (SD 1.5, SDXL's
# sgm names, Flux's BFL names) and diffusers, and merged. For every output
# and every loader that reads it, every module is loaded, no LoRA key is left
# unloaded, and each model weight gets the update lpipe meant (relative
# error below 1e-5; the files are f32): the best approximation at the
# written rank for a reduction, the input's update for a conversion, the
# sum for a merge.
#
# The models are small (hidden sizes 8 to 16) but have the real layer
# names, built by ComfyUI's own name tables (unet_to_diffusers,
# flux_to_diffusers), so the names each loader looks for are the real ones.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import atexit
import collections
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_numpy import read_st, write_st  # noqa: E402

LPIPE = os.environ["LPIPE"]
TOL = 1e-5
FAILURES = []
TMP = tempfile.mkdtemp(prefix="lpipe-loader-rules-")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def path(name):
    return os.path.join(TMP, name)


def lpipe(*stages):
    p = subprocess.run([LPIPE, "-q", "launch"] + list(stages), capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError("lpipe launch %s failed: %s" % (" ".join(stages), p.stderr))


def merge(dst, inputs, *props):
    """lora-merge of @inputs, in a pipeline file (lpipe run)"""
    stages = [{"stage": "safetensors-source", "id": "in%d" % i, "location": f} for i, f in enumerate(inputs)]
    merge = {"stage": "lora-merge", "id": "merge", "inputs": ["in%d" % i for i in range(len(inputs))]}
    for prop in props:
        k, v = prop.split("=", 1)
        merge[k] = v.split(",") if k == "weights" else v
    stages += [merge, {"stage": "safetensors-sink", "location": dst}]
    pipeline = path("merge.pipeline")
    with open(pipeline, "w") as f:
        json.dump({"lpipe": 1, "stages": stages}, f)
    p = subprocess.run([LPIPE, "-q", "run", pipeline], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError("lora-merge of %s failed: %s" % (inputs, p.stderr))
    return dst


def transform(src, dst, *stage):
    lpipe("safetensors-source", "location=" + src, "!", *stage, "!", "safetensors-sink", "location=" + dst)
    return dst


# The models: weight name -> shape [out, in(, kh, kw)]

# ComfyUI comfy/utils.py: UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS,
# UNET_MAP_RESNET (the LoRA-able .weight entries)
UNET_MAP_ATTENTIONS = ["proj_in.weight", "proj_out.weight"]
TRANSFORMER_BLOCKS = ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                      "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight",
                      "ff.net.0.proj.weight", "ff.net.2.weight"]
UNET_MAP_RESNET = {"in_layers.2.weight": "conv1.weight", "emb_layers.1.weight": "time_emb_proj.weight",
                   "out_layers.3.weight": "conv2.weight", "skip_connection.weight": "conv_shortcut.weight"}


def unet_to_diffusers(cfg):
    """ComfyUI comfy/utils.py unet_to_diffusers: diffusers UNet key -> sgm key"""
    num_res_blocks = cfg["num_res_blocks"]
    transformer_depth = list(cfg["transformer_depth"])
    transformer_depth_output = list(cfg["transformer_depth_output"])
    num_blocks = len(cfg["channel_mult"])
    m = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                m["down_blocks.%d.resnets.%d.%s" % (x, i, UNET_MAP_RESNET[b])] = "input_blocks.%d.0.%s" % (n, b)
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    m["down_blocks.%d.attentions.%d.%s" % (x, i, b)] = "input_blocks.%d.1.%s" % (n, b)
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        m["down_blocks.%d.attentions.%d.transformer_blocks.%d.%s" % (x, i, t, b)] = \
                            "input_blocks.%d.1.transformer_blocks.%d.%s" % (n, t, b)
            n += 1
        if x < num_blocks - 1:
            m["down_blocks.%d.downsamplers.0.conv.weight" % x] = "input_blocks.%d.0.op.weight" % n
    for b in UNET_MAP_ATTENTIONS:
        m["mid_block.attentions.0.%s" % b] = "middle_block.1.%s" % b
    for t in range(cfg["transformer_depth_middle"]):
        for b in TRANSFORMER_BLOCKS:
            m["mid_block.attentions.0.transformer_blocks.%d.%s" % (t, b)] = "middle_block.1.transformer_blocks.%d.%s" % (t, b)
    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            m["mid_block.resnets.%d.%s" % (i, UNET_MAP_RESNET[b])] = "middle_block.%d.%s" % (n, b)
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        l = num_res_blocks[x] + 1
        for i in range(l):
            c = 0
            for b in UNET_MAP_RESNET:
                m["up_blocks.%d.resnets.%d.%s" % (x, i, UNET_MAP_RESNET[b])] = "output_blocks.%d.0.%s" % (n, b)
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    m["up_blocks.%d.attentions.%d.%s" % (x, i, b)] = "output_blocks.%d.1.%s" % (n, b)
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        m["up_blocks.%d.attentions.%d.transformer_blocks.%d.%s" % (x, i, t, b)] = \
                            "output_blocks.%d.1.transformer_blocks.%d.%s" % (n, t, b)
            if i == l - 1 and x < num_blocks - 1:
                m["up_blocks.%d.upsamplers.0.conv.weight" % x] = "output_blocks.%d.%d.conv.weight" % (n, c)
            n += 1
    return m


# SD 1.5's and SDXL's UNet layouts (ComfyUI supported_models.py), with
# SDXL's transformer depths cut to 1 (the names follow the same rule)
SD15 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1}
SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1}


def unet_shape(diffusers_key):
    """Small shapes: 3x3 convs for the resnets and samplers, linear else"""
    c = 8
    if re.search(r"(conv1|conv2|downsamplers\.0\.conv|upsamplers\.0\.conv)\.weight$", diffusers_key):
        return (c, c, 3, 3)
    if diffusers_key.endswith("conv_shortcut.weight"):
        return (c, c, 1, 1)
    if diffusers_key.endswith("ff.net.0.proj.weight"):
        return (2 * c, c)
    if diffusers_key.endswith("ff.net.2.weight"):
        return (c, 2 * c)
    return (c, c)


class Unet:
    """A UNet both ways: diffusers module -> sgm module, shapes"""

    def __init__(self, cfg):
        m = unet_to_diffusers(cfg)
        self.sgm = {d[:-len(".weight")]: s[:-len(".weight")] for d, s in m.items()}
        self.shape = {d: unet_shape(d + ".weight") for d in self.sgm}
        self.diffusers_of = {s: d for d, s in self.sgm.items()}


H = 16   # the Flux model's hidden size
FLUX_DOUBLE = {"img_attn.qkv": 3 * H, "img_attn.proj": H, "img_mlp.0": 4 * H, "img_mlp.2": H,
               "img_mod.lin": 6 * H, "txt_attn.qkv": 3 * H, "txt_attn.proj": H, "txt_mlp.0": 4 * H,
               "txt_mlp.2": H, "txt_mod.lin": 6 * H}


def flux_model():
    """BFL weight -> shape, 2 double and 2 single blocks, hidden size H"""
    m = {}
    for i in range(2):
        for k, out in FLUX_DOUBLE.items():
            m["double_blocks.%d.%s" % (i, k)] = (out, 4 * H if k.endswith("mlp.2") else H)
        m["single_blocks.%d.linear1" % i] = (7 * H, H)
        m["single_blocks.%d.linear2" % i] = (H, 5 * H)
        m["single_blocks.%d.modulation.lin" % i] = (3 * H, H)
    m["final_layer.adaLN_modulation.1"] = (2 * H, H)
    m["final_layer.linear"] = (8, H)
    return m


def swap_scale_shift(w):
    """ComfyUI comfy/utils.py swap_scale_shift (diffusers' the same)"""
    shift, scale = np.split(w, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def flux_to_diffusers():
    """ComfyUI comfy/utils.py flux_to_diffusers: diffusers module ->
    (BFL weight, (dim, start, length) or None, function or None)"""
    km = {}
    for i in range(2):
        f, t = "transformer_blocks.%d" % i, "double_blocks.%d" % i
        for j, p in enumerate(("to_q", "to_k", "to_v")):
            km["%s.attn.%s" % (f, p)] = (t + ".img_attn.qkv", (0, j * H, H), None)
        for j, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            km["%s.attn.%s" % (f, p)] = (t + ".txt_attn.qkv", (0, j * H, H), None)
        for d, b in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                     ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                     ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            km["%s.%s" % (f, d)] = ("%s.%s" % (t, b), None, None)
    for i in range(2):
        f, t = "single_transformer_blocks.%d" % i, "single_blocks.%d" % i
        for j, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            km["%s.%s" % (f, p)] = (t + ".linear1", (0, j * H, H), None)
        km[f + ".proj_mlp"] = (t + ".linear1", (0, 3 * H, 4 * H), None)
        km[f + ".norm.linear"] = (t + ".modulation.lin", None, None)
        km[f + ".proj_out"] = (t + ".linear2", None, None)
    km["proj_out"] = ("final_layer.linear", None, None)
    km["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, swap_scale_shift)
    return km


def flux_diffusers_model():
    """diffusers' Flux modules -> shape, from the same table"""
    bfl = flux_model()
    out = {}
    for d, (b, offset, _) in flux_to_diffusers().items():
        rows = offset[2] if offset else bfl[b][0]
        out[d] = (rows, bfl[b][1])
    return out


# PEFT (peft/tuners/lora/model.py, peft/utils/other.py)

def get_pattern_key(pattern_keys, key_to_match):
    """PEFT utils/other.py get_pattern_key"""
    for key in pattern_keys:
        if re.match(r"(.*\.)?(%s)$" % key, key_to_match):
            return key
    return key_to_match


def check_target_module_exists(config, key):
    """PEFT tuners_utils.check_target_module_exists: not excluded by
    exclude_modules (a regex matching the whole name, or a list of names or
    name ends) nor under a modules_to_save module; then a string
    target_modules must match the whole name (match_target_against_key), a
    list holds the name, or its end after a dot within layers_to_transform
    (the layer index after the first name part, or after layers_pattern)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    if any(re.match(r"(^|.*\.)%s($|\..*)" % m, key) for m in config.get("modules_to_save") or []):
        return False
    target_modules = config.get("target_modules") or []
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    found = any(key.endswith("." + t) for t in target_modules)
    layer_indexes = config.get("layers_to_transform")
    if found and layer_indexes is not None and (not isinstance(layer_indexes, list) or layer_indexes):
        patterns = config.get("layers_pattern")
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(r".*?\.%s\.(\d+)\." % pattern, key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group(1))
        return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def maybe_include_all_linear_layers(config, model):
    """PEFT tuners_utils._maybe_include_all_linear_layers: `all-linear`
    becomes the full name of every linear layer (every module of these
    models is one)"""
    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        return dict(config, target_modules=sorted(model))
    return config


def peft_scale(config, name):
    """The (r, scaling) LoraModel._create_and_replace gives module @name:
    rank_pattern / alpha_pattern entries by get_pattern_key, else r and
    lora_alpha; alpha / r (alpha / sqrt(r) with use_rslora,
    LoraLayer.update_layer)"""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", 8))
    return r, alpha / (np.sqrt(r) if config.get("use_rslora") else r)


def peft_inject(config, model, state_dict):
    """PEFT inject_adapter_in_model + set_peft_model_state_dict: a LoRA layer
    on every targeted module with r and alpha from the patterns
    (LoraModel._create_and_replace), scaling alpha / r (alpha / sqrt(r)
    with use_rslora, LoraLayer.update_layer); the state dict's factors are
    copied in, a size mismatch raises as torch's load_state_dict does.
    Returns the updates and the LoRA keys no layer took."""
    layers = {}
    config = maybe_include_all_linear_layers(config, model)
    for name in model:
        if check_target_module_exists(config, name):
            layers[name] = peft_scale(config, name)
    updates, unloaded = {}, []
    for key in state_dict:
        if ".lora_A." in key or ".lora_B." in key:
            name = key.split(".lora_")[0]
            if name not in layers:
                unloaded.append(key)
    for name, (r, scaling) in layers.items():
        a = state_dict.get(name + ".lora_A.weight")
        b = state_dict.get(name + ".lora_B.weight")
        if a is None or b is None:
            continue
        if a.shape[0] != r or b.shape[1] != r:
            raise RuntimeError("size mismatch for %s.lora_A.weight: copying a param with shape %s, "
                               "the shape in current model is [%d, ...]" % (name, list(a.shape), r))
        updates[name] = scaling * b.reshape(b.shape[0], -1) @ a.reshape(r, -1)
    return updates, unloaded


# diffusers (loaders/lora_conversion_utils.py, loaders/peft.py, utils/peft_utils.py)

def get_peft_kwargs(rank_dict, network_alpha_dict, peft_state_dict, is_unet=True):
    """diffusers utils/peft_utils.py get_peft_kwargs"""
    rank_pattern, alpha_pattern = {}, {}
    r = lora_alpha = list(rank_dict.values())[0]
    has_alphas = network_alpha_dict is not None and len(network_alpha_dict) > 0
    if len(set(rank_dict.values())) > 1:
        r = collections.Counter(rank_dict.values()).most_common()[0][0]
        rank_pattern = {k.split(".lora_B.")[0]: v for k, v in rank_dict.items() if v != r}
        if not has_alphas:
            lora_alpha = r
            alpha_pattern = dict(rank_pattern)
    if has_alphas:
        if len(set(network_alpha_dict.values())) > 1:
            lora_alpha = collections.Counter(network_alpha_dict.values()).most_common()[0][0]
            alpha_pattern = {k: v for k, v in network_alpha_dict.items() if v != lora_alpha}
            if is_unet:
                alpha_pattern = {".".join(k.split(".lora_A.")[0].split(".")).replace(".alpha", ""): v
                                 for k, v in alpha_pattern.items()}
            else:
                alpha_pattern = {".".join(k.split(".down.")[0].split(".")[:-1]): v for k, v in alpha_pattern.items()}
        else:
            lora_alpha = set(network_alpha_dict.values()).pop()
    target_modules = list({name.split(".lora")[0] for name in peft_state_dict})
    return {"r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "target_modules": target_modules}


def convert_unet_lora_key(key):
    """diffusers lora_conversion_utils._convert_unet_lora_key"""
    d = key.replace("lora_unet_", "").replace("_", ".")
    d = d.replace("input.blocks.0.0", "conv_in").replace("out.2", "conv_out")
    for a, b in (("input.blocks", "down_blocks"), ("down.blocks", "down_blocks"), ("middle.block", "mid_block"),
                 ("mid.block", "mid_block"), ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"),
                 ("transformer.blocks", "transformer_blocks"), ("to.q.lora", "to_q_lora"), ("to.k.lora", "to_k_lora"),
                 ("to.v.lora", "to_v_lora"), ("to.out.0.lora", "to_out_lora"), ("proj.in", "proj_in"),
                 ("proj.out", "proj_out"), ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"),
                 ("conv.out", "conv_out"), ("time.embed.0", "time_embedding.linear_1"),
                 ("time.embed.2", "time_embedding.linear_2"), ("label.emb.0.0", "add_embedding.linear_1"),
                 ("label.emb.0.2", "add_embedding.linear_2"), ("time.embedding.linear.1", "time_embedding.linear_1"),
                 ("time.embedding.linear.2", "time_embedding.linear_2")):
        d = d.replace(a, b)
    if "emb" in d and "time.emb.proj" not in d:
        d = re.sub(r"\.\d+(?=\D*$)", "", d, count=1)
    if ".in." in d:
        d = d.replace("in.layers.2", "conv1")
    if ".out." in d:
        d = d.replace("out.layers.3", "conv2")
    if "downsamplers" in d or "upsamplers" in d:
        d = d.replace("op", "conv")
    if "skip" in d:
        d = d.replace("skip.connection", "conv_shortcut")
    if "time.emb.proj" in d:
        d = d.replace("time.emb.proj", "time_emb_proj")
    if "conv.shortcut" in d:
        d = d.replace("conv.shortcut", "conv_shortcut")
    if "transformer_blocks" in d and ("attn1" in d or "attn2" in d):
        d = d.replace("attn1", "attn1.processor").replace("attn2", "attn2.processor")
    return d


def maybe_map_sgm_blocks_to_diffusers(sd, layers_per_block=2, delimiter="_", block_slice_pos=5):
    """diffusers lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers"""
    sgm_patterns = ["input_blocks", "middle_block", "output_blocks"]
    if not any(any(p in k for p in sgm_patterns) for k in sd):
        return sd
    inner_block_map = ["resnets", "attentions", "upsamplers"]
    new = {}
    for key, v in sd.items():
        if "text" in key or not any(p in key for p in sgm_patterns) or "input_blocks_0_0" in key:
            new[key] = v
            continue
        parts = key.split(delimiter)
        layer_id = int(parts[:block_slice_pos][-1])
        if "input_blocks" in key:
            block_id = (layer_id - 1) // (layers_per_block + 1)
            layer_in_block_id = (layer_id - 1) % (layers_per_block + 1)
            inner_block_id = int(parts[block_slice_pos])
            inner_block_key = inner_block_map[inner_block_id] if "op" not in key else "downsamplers"
            inner_layers_in_block = str(layer_in_block_id) if "op" not in key else "0"
            nk = parts[:block_slice_pos - 1] + [str(block_id), inner_block_key, inner_layers_in_block] + parts[block_slice_pos + 1:]
        elif "middle_block" in key:
            key_part = [[inner_block_map[0], "0"], [inner_block_map[1], "0"], [inner_block_map[0], "1"]][layer_id]
            nk = parts[:block_slice_pos - 1] + key_part + parts[block_slice_pos:]
        else:
            block_id = layer_id // (layers_per_block + 1)
            layer_in_block_id = layer_id % (layers_per_block + 1)
            inner_block_id = int(parts[block_slice_pos])
            inner_block_key = inner_block_map[inner_block_id]
            inner_layers_in_block = str(layer_in_block_id) if inner_block_id < 2 else "0"
            nk = parts[:block_slice_pos - 1] + [str(block_id), inner_block_key, inner_layers_in_block] + parts[block_slice_pos + 1:]
        new[delimiter.join(nk)] = v
    return new


def convert_text_encoder_lora_key(key, lora_name):
    """diffusers lora_conversion_utils._convert_text_encoder_lora_key"""
    to_replace = "lora_te2_" if lora_name.startswith("lora_te2_") else \
        "lora_te_" if lora_name.startswith("lora_te_") else "lora_te1_"
    d = key.replace(to_replace, "").replace("_", ".")
    for a, b in (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj.lora", "to_q_lora"),
                 ("k.proj.lora", "to_k_lora"), ("v.proj.lora", "to_v_lora"), ("out.proj.lora", "to_out_lora"),
                 ("text.projection", "text_projection")):
        d = d.replace(a, b)
    if "self_attn" not in d and "text_projection" not in d and "mlp" in d:
        d = d.replace(".lora.", ".lora_linear_layer.")
    return d


def convert_non_diffusers_lora_to_diffusers(sd):
    """diffusers _convert_non_diffusers_lora_to_diffusers: UNet names by
    _convert_unet_lora_key, text encoders' by _convert_text_encoder_lora_key,
    alphas kept as network_alphas (_get_alpha_name); keys it does not rename
    are an error"""
    sd = dict(sd)
    out, alphas = {}, {}
    for key in list(sd):
        if not key.endswith("lora_down.weight"):
            continue
        lora_name = key.split(".")[0]
        if lora_name.startswith("lora_unet_"):
            name, prefix = convert_unet_lora_key(key), "unet."
        elif lora_name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
            name = convert_text_encoder_lora_key(key, lora_name)
            prefix = "text_encoder_2." if lora_name.startswith("lora_te2_") else "text_encoder."
        else:
            continue
        out[prefix + name] = sd.pop(key)
        out[prefix + name.replace(".down.", ".up.")] = sd.pop(lora_name + ".lora_up.weight")
        if lora_name + ".alpha" in sd:
            alphas[prefix + name.split(".lora.")[0] + ".alpha"] = sd.pop(lora_name + ".alpha").item()
    if sd:
        raise ValueError("The following keys have not been correctly renamed: %s" % ", ".join(sd))
    return out, alphas


UNET_TO_DIFFUSERS = {".to_out_lora.up": ".to_out.0.lora_B", ".to_out_lora.down": ".to_out.0.lora_A",
                     ".to_q_lora.down": ".to_q.lora_A", ".to_q_lora.up": ".to_q.lora_B",
                     ".to_k_lora.down": ".to_k.lora_A", ".to_k_lora.up": ".to_k.lora_B",
                     ".to_v_lora.down": ".to_v.lora_A", ".to_v_lora.up": ".to_v.lora_B",
                     ".lora.up": ".lora_B", ".lora.down": ".lora_A"}


def convert_unet_state_dict_to_peft(sd):
    """diffusers utils/state_dict_utils.py convert_unet_state_dict_to_peft:
    convert_state_dict with UNET_TO_DIFFUSERS"""
    return convert_state_dict(sd, UNET_TO_DIFFUSERS)


def diffusers_load(file, model, prefix):
    """diffusers load_lora_weights for a UNet or transformer: lora_state_dict
    (non-diffusers kohya files through _maybe_map_sgm_blocks_to_diffusers and
    _convert_non_diffusers_lora_to_diffusers; lora_adapter_metadata read by
    _load_sft_state_dict_metadata), then load_lora_adapter: the prefix
    stripped, the rank dict keyed `^name` from the lora_B shapes,
    _create_lora_config from the metadata or get_peft_kwargs, PEFT's inject."""
    sd, meta = read_st(file)
    metadata = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else None
    network_alphas = None
    if any(k.endswith("lora_down.weight") for k in sd):
        sd = maybe_map_sgm_blocks_to_diffusers(sd)
        sd, network_alphas = convert_non_diffusers_lora_to_diffusers(sd)
    # a pipeline loads the other components' keys into them
    outside = [k for k in sd if not k.startswith((prefix + ".", "text_encoder.", "text_encoder_2."))]
    sd = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    if network_alphas:
        network_alphas = {k: v for k, v in network_alphas.items() if k.startswith(prefix + ".")}
    if metadata is not None:
        metadata = {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    if "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    rank = {"^" + k: v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    if network_alphas:
        network_alphas = {k[len(prefix) + 1:]: v for k, v in network_alphas.items() if k.startswith(prefix + ".")}
    config = metadata if metadata is not None else get_peft_kwargs(rank, network_alphas, sd)
    updates, unloaded = peft_inject(config, model, sd)
    return updates, unloaded + outside


DIFFUSERS_OLD_TO_DIFFUSERS = {".to_q_lora.up": ".q_proj.lora_linear_layer.up", ".to_q_lora.down": ".q_proj.lora_linear_layer.down",
                              ".to_k_lora.up": ".k_proj.lora_linear_layer.up", ".to_k_lora.down": ".k_proj.lora_linear_layer.down",
                              ".to_v_lora.up": ".v_proj.lora_linear_layer.up", ".to_v_lora.down": ".v_proj.lora_linear_layer.down",
                              ".to_out_lora.up": ".out_proj.lora_linear_layer.up",
                              ".to_out_lora.down": ".out_proj.lora_linear_layer.down"}
PEFT_TO_DIFFUSERS = {".%s.lora_%s" % (p, ab): ".%s.lora_linear_layer.%s" % (p, ud)
                     for p in ("q_proj", "k_proj", "v_proj", "out_proj") for ab, ud in (("B", "up"), ("A", "down"))}
DIFFUSERS_TO_PEFT = dict([(".%s.lora_linear_layer.%s" % (p, ud), ".%s.lora_%s" % (p, ab))
                          for p in ("q_proj", "k_proj", "v_proj", "out_proj") for ab, ud in (("B", "up"), ("A", "down"))]
                         + [(".lora_linear_layer.up", ".lora_B"), (".lora_linear_layer.down", ".lora_A")])


def convert_state_dict(sd, mapping):
    """diffusers utils/state_dict_utils.py convert_state_dict: the
    KEYS_TO_ALWAYS_REPLACE (".processor." -> "."), then the first pattern of
    @mapping found in a key is replaced"""
    out = {}
    for k, v in sd.items():
        k = k.replace(".processor.", ".")
        for pattern, new in mapping.items():
            if pattern in k:
                k = k.replace(pattern, new)
                break
        out[k] = v
    return out


def diffusers_load_text_encoder(file, model, prefix="text_encoder"):
    """diffusers _load_lora_into_text_encoder (loaders/lora_base.py): the
    state dict of lora_state_dict, the prefix stripped,
    convert_state_dict_to_diffusers and convert_state_dict_to_peft (the
    format told by its keys), ranks from the lora_B of the model's
    q/k/v/out_proj and fc1/fc2, get_peft_kwargs(is_unet=False), PEFT's
    inject (transformers' load_adapter)."""
    sd, _ = read_st(file)
    network_alphas = None
    if any(k.endswith("lora_down.weight") for k in sd):
        sd, network_alphas = convert_non_diffusers_lora_to_diffusers(maybe_map_sgm_blocks_to_diffusers(sd))
    sd = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    if any("to_out_lora" in k for k in sd):
        sd = convert_state_dict(sd, DIFFUSERS_OLD_TO_DIFFUSERS)
    elif any(".lora_A.weight" in k for k in sd):
        sd = convert_state_dict(sd, PEFT_TO_DIFFUSERS)
    sd = convert_state_dict(sd, DIFFUSERS_TO_PEFT)
    rank = {}
    for name in model:
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")) \
                and name + ".lora_B.weight" in sd:
            rank[name + ".lora_B.weight"] = sd[name + ".lora_B.weight"].shape[1]
    if network_alphas:
        network_alphas = {k[len(prefix) + 1:]: v for k, v in network_alphas.items() if k.split(".")[0] == prefix}
    config = get_peft_kwargs(rank, network_alphas, sd, is_unet=False)
    return peft_inject(config, model, sd)


# ComfyUI (comfy/lora.py, comfy/weight_adapter/lora.py)

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map_clip_l(n_layers):
    """ComfyUI comfy/lora.py model_lora_keys_clip for SD 1.5's CLIP-L"""
    key_map = {}
    for b in range(n_layers):
        for c in LORA_CLIP_MAP:
            k = "clip_l.transformer.text_model.encoder.layers.%d.%s.weight" % (b, c)
            key_map["text_encoders." + k[:-len(".weight")]] = k
            key_map["lora_te_text_model_encoder_layers_%d_%s" % (b, LORA_CLIP_MAP[c])] = k
            key_map["lora_te1_text_model_encoder_layers_%d_%s" % (b, LORA_CLIP_MAP[c])] = k
            key_map["text_encoder.text_model.encoder.layers.%d.%s" % (b, c)] = k
    return key_map

def comfy_key_map_unet(unet):
    """ComfyUI comfy/lora.py model_lora_keys_unet for an SD/SDXL model (whose
    weights carry the sgm names): LoRA name -> model weight"""
    key_map = {}
    for sgm in unet.diffusers_of:
        k = "diffusion_model." + sgm + ".weight"
        key_map["lora_unet_" + sgm.replace(".", "_")] = k
        key_map["diffusion_model." + sgm] = k
    for d, sgm in unet.sgm.items():
        unet_key = "diffusion_model." + sgm + ".weight"
        key_map["lora_unet_" + d.replace(".", "_")] = unet_key
        key_map["lycoris_" + d.replace(".", "_")] = unet_key
        for p in ("", "unet."):
            dk = p + d.replace(".to_", ".processor.to_")
            if dk.endswith(".to_out.0"):
                dk = dk[:-2]
            key_map[dk] = unet_key
    return key_map


def comfy_key_map_flux():
    """model_lora_keys_unet for a Flux model: the BFL weights by their own
    names, and diffusers' through flux_to_diffusers (with an offset into
    fused weights and swap_scale_shift for norm_out)"""
    key_map = {}
    for k in flux_model():
        key_map["lora_unet_" + k.replace(".", "_")] = "diffusion_model." + k + ".weight"
        key_map["diffusion_model." + k] = "diffusion_model." + k + ".weight"
    for d, (b, offset, fn) in flux_to_diffusers().items():
        to = "diffusion_model." + b + ".weight"
        key_map["transformer." + d] = (to, offset, fn) if (offset or fn) else to
    return key_map


def comfy_load(file, key_map, model_shapes):
    """ComfyUI load_lora (LoRAAdapter.load: lora_up/lora_down, lora_B/lora_A,
    ...; alpha from `.alpha`) and calculate_weight: the patch adds
    function((alpha / rank) * up @ down) to weight.narrow(offset), rank =
    the down factor's rows, alpha / rank = 1 without an alpha. Returns the
    weight updates and the keys "not loaded"."""
    sd, _ = read_st(file)
    loaded, patches = set(), []
    for x, to in key_map.items():
        alpha = sd[x + ".alpha"].item() if x + ".alpha" in sd else None
        for up_s, down_s in ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                             (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight")):
            if x + up_s in sd:
                loaded |= {x + up_s, x + down_s} | ({x + ".alpha"} if alpha is not None else set())
                patches.append((to, sd[x + up_s], sd[x + down_s], alpha))
                break
    updates = {}
    for to, up, down, alpha in patches:
        key, offset, fn = (to, None, None) if isinstance(to, str) else to
        weight = updates.setdefault(key, np.zeros((model_shapes[key][0], int(np.prod(model_shapes[key][1:])))))
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        if fn is not None:
            diff = fn(diff)
        if offset is not None:
            weight[offset[1]:offset[1] + offset[2]] += diff
        else:
            weight += diff
    not_loaded = [k for k in sd if k not in loaded]
    return updates, not_loaded


# kohya sd-scripts (networks/lora.py, networks/lora_flux.py)

def kohya_load(file, module_names):
    """kohya create_network_from_weights: modules_dim from each lora_down's
    rows, modules_alpha from `.alpha` (the dim when missing); LoRANetwork
    makes a LoRAModule for every model module of those names (`lora_unet_`
    and the module's path with `_`), and load_weights copies the factors.
    LoRAModule: multiplier * (alpha / dim) * up(down(x)). Returns the
    updates by module name and the keys no module took."""
    sd, _ = read_st(file)
    dims, alphas = {}, {}
    for key, v in sd.items():
        lora_name = key.split(".")[0]
        if "alpha" in key:
            alphas[lora_name] = v.item()
        elif "lora_down" in key:
            dims[lora_name] = v.shape[0]
    updates, taken = {}, set()
    for name in module_names:
        if name not in dims:
            continue
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        alpha = alphas.get(name, dims[name])
        updates[name] = (alpha / dims[name]) * (up.reshape(up.shape[0], -1) @ down.reshape(dims[name], -1))
        taken |= {name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"}
    return updates, [k for k in sd if k not in taken]


# The checks

def rel_err(got, want):
    n = np.linalg.norm(want)
    return np.linalg.norm(got - want) / (n if n > 0 else 1.0)


def compare(label, got, want, unloaded, allowed_missing=()):
    """Every module of want loaded with its update, nothing else, nothing left unloaded"""
    check(not unloaded, "%s: LoRA keys left unloaded: %s" % (label, sorted(unloaded)[:4]))
    missing = sorted(set(want) - set(got) - set(allowed_missing))
    check(not missing, "%s: %d modules not loaded, e.g. %s" % (label, len(missing), missing[:3]))
    extra = sorted(set(got) - set(want))
    check(not extra, "%s: unexpected modules %s" % (label, extra[:3]))
    worst = max([rel_err(got[k], want[k]) for k in want if k in got] or [0.0])
    check(worst < TOL, "%s: worst relative error %.2e" % (label, worst))
    print("  %s: %d modules, worst relative error %.1e" % (label, len(got), worst))


def optimum(update, k):
    """The best rank-k approximation (Eckart-Young)"""
    u, s, vt = np.linalg.svd(update, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def reduced_reference(updates, ranks):
    return {m: optimum(u, ranks[m]) for m, u in updates.items()}


def factors(rng, out, inn, r, decay, kernel=None):
    """A module's factors with singular values decay^i"""
    qa, _ = np.linalg.qr(rng.standard_normal((inn * (kernel or 1) ** 2, r)))
    qb, _ = np.linalg.qr(rng.standard_normal((out, r)))
    s = decay ** np.arange(r)
    down = (qa * np.sqrt(s)).T
    up = qb * np.sqrt(s)
    if kernel:
        return down.reshape(r, inn, kernel, kernel), up.reshape(out, r, 1, 1)
    return down, up


def kohya_file(name, modules, rank, rng, alpha_of=lambda i: 2.0, fused_split=()):
    """A kohya file (f32, 0-dim alphas) as sd-scripts' save_weights writes
    it; `modules`: kohya name -> shape; every other module decays faster,
    so dynamic criteria pick different ranks. A name in fused_split is
    saved as kohya's split_qkv does (networks/lora_flux.py): each part's
    own down rows and its block of a block-diagonal up factor."""
    t = {}
    for i, (m, shape) in enumerate(sorted(modules.items())):
        decay = 0.9 if i % 2 else 0.35
        kernel = shape[2] if len(shape) == 4 and shape[2] > 1 else None
        if m in fused_split:
            widths = fused_split[m]
            r = rank // len(widths)
            down = np.zeros((0, shape[1]))
            up = np.zeros((shape[0], 0))
            row = 0
            for w in widths:
                d, u = factors(rng, w, shape[1], r, decay)
                down = np.vstack([down, d])
                block = np.zeros((shape[0], r))
                block[row:row + w] = u
                up = np.hstack([up, block])
                row += w
        else:
            down, up = factors(rng, shape[0], shape[1], rank, decay, kernel)
            if len(shape) == 4 and not kernel:
                down, up = down.reshape(rank, shape[1], 1, 1), up.reshape(shape[0], rank, 1, 1)
        t[m + ".lora_down.weight"] = down
        t[m + ".lora_up.weight"] = up
        t[m + ".alpha"] = np.array(alpha_of(i), np.float32)
    return write_st(path(name), t, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def ranks_of(file, suffix):
    sd, _ = read_st(file)
    return {k[:-len(suffix)]: v.shape[0] for k, v in sd.items() if k.endswith(suffix)}


def test_sd15_kohya():
    """kohya SD 1.5 (diffusers UNet names, and CLIP-L's text encoder):
    reduced fixed, dynamic, padded; converted to diffusers and back; merged
    with a diffusers file; each output read by kohya, ComfyUI and diffusers."""
    print("# sd15 kohya")
    unet = Unet(SD15)
    te = {"text_model.encoder.layers.%d.%s" % (b, c): (16, 8) if c == "mlp.fc1" else (8, 16) if c == "mlp.fc2" else (8, 8)
          for b in range(2) for c in LORA_CLIP_MAP}
    rng = np.random.default_rng(1)
    kohya_of = {"unet." + d: "lora_unet_" + d.replace(".", "_") for d in unet.shape}
    kohya_of.update({"text_encoder." + t: "lora_te_" + t.replace(".", "_") for t in te})
    comfy_of = {"unet." + d: "diffusion_model." + unet.sgm[d] + ".weight" for d in unet.shape}
    comfy_of.update({"text_encoder." + t: "clip_l.transformer." + t + ".weight" for t in te})
    shapes = {"unet." + d: s for d, s in unet.shape.items()}
    shapes.update({"text_encoder." + t: s for t, s in te.items()})
    kohya_names = {kohya_of[m]: s for m, s in shapes.items()}
    comfy_shapes = {comfy_of[m]: s for m, s in shapes.items()}
    key_map = dict(comfy_key_map_unet(unet), **comfy_key_map_clip_l(2))
    src = kohya_file("sd15.safetensors", kohya_names, 8, rng, alpha_of=lambda i: [4.0, 8.0, 2.5][i % 3])
    loaded, unloaded = kohya_load(src, kohya_names)
    check(not unloaded and len(loaded) == len(kohya_names), "sd15: the input loads whole in kohya")
    meant = {m: loaded[kohya_of[m]] for m in shapes}     # by the diffusers pipeline's module names

    def check_all(label, file, want, comfy=True, comfy_skip=()):
        got, unloaded = kohya_load(file, kohya_names)
        compare("sd15 %s, kohya" % label, got, {kohya_of[m]: w for m, w in want.items()}, unloaded)
        if comfy:
            got, unloaded = comfy_load(file, key_map, comfy_shapes)
            compare("sd15 %s, ComfyUI" % label, got, {comfy_of[m]: w for m, w in want.items()}, unloaded)
        check_diffusers(label, file, want)

    def check_diffusers(label, file, want):
        got, unloaded = diffusers_load(file, unet.shape, "unet")
        got_te, unloaded_te = diffusers_load_text_encoder(file, te)
        got = dict({"unet." + d: u for d, u in got.items()}, **{"text_encoder." + t: u for t, u in got_te.items()})
        compare("sd15 %s, diffusers" % label, got, want, unloaded + unloaded_te)

    for label, props in (("fixed rank 3", ["rank=3"]), ("dynamic", ["sv-fro=0.95"]),
                         ("dynamic, padded", ["sv-fro=0.95", "max-rank=6", "pad=true"])):
        dst = transform(src, path("sd15-%s.safetensors" % re.sub(r"\W", "", label)), "lora-svd", *props)
        ranks = ranks_of(dst, ".lora_down.weight")
        if label == "dynamic":
            check(len(set(ranks.values())) > 1, "sd15 dynamic: the ranks differ")
        if "pad" in label:
            check(set(ranks.values()) == {6}, "sd15 padded: every module at rank 6, not %s" % sorted(set(ranks.values())))
        reduced, _ = kohya_load(dst, kohya_names)
        want = {m: optimum(meant[m], np.linalg.matrix_rank(reduced[kohya_of[m]], tol=1e-9)) for m in shapes}
        check_all(label, dst, want)

    diff = transform(src, path("sd15-diffusers.safetensors"), "rename", "preset=sd-kohya-to-diffusers")
    check_diffusers("to diffusers", diff, meant)
    # ComfyUI's key map knows diffusers' SD attention projections only as
    # attn1.processor.to_q: the guide says so; everything else loads
    got, unloaded = comfy_load(diff, key_map, comfy_shapes)
    attention = [m for m in shapes if re.search(r"attn[12]\.to_", m)]
    check(sorted(k for k in unloaded if k.endswith(".lora_A.weight"))
          == sorted(m + ".lora_A.weight" for m in attention),
          "sd15 to diffusers, ComfyUI: exactly the UNet's attention projections stay out")
    compare("sd15 to diffusers, ComfyUI (no UNet attention projections)", got,
            {comfy_of[m]: w for m, w in meant.items() if m not in attention}, [])
    back = transform(diff, path("sd15-back.safetensors"), "rename", "preset=sd-diffusers-to-kohya")
    check(sorted(read_st(back)[0]) == sorted(read_st(src)[0]), "sd15 to diffusers and back: kohya's own names")
    check_all("to diffusers and back", back, meant)

    # merged with a diffusers file: the first input's convention (kohya)
    other = transform(kohya_file("sd15-b.safetensors", kohya_names, 4, np.random.default_rng(5)),
                      path("sd15-b-diffusers.safetensors"), "rename", "preset=sd-kohya-to-diffusers")
    other_unet, _ = diffusers_load(other, unet.shape, "unet")
    other_te, _ = diffusers_load_text_encoder(other, te)
    other_updates = dict({"unet." + d: u for d, u in other_unet.items()},
                         **{"text_encoder." + t: u for t, u in other_te.items()})
    merged = merge(path("sd15-merged.safetensors"), [src, other], "weights=0.5,2")
    check_all("merged kohya + diffusers", merged, {m: 0.5 * meant[m] + 2 * other_updates[m] for m in shapes})


def test_sdxl_sgm():
    """kohya SDXL (the sgm UNet's names): reduced, converted to diffusers
    and back with sdxl-diffusers-to-kohya."""
    print("# sdxl kohya (sgm names)")
    unet = Unet(SDXL)
    rng = np.random.default_rng(2)
    kohya_names = {"lora_unet_" + unet.sgm[d].replace(".", "_"): s for d, s in unet.shape.items()}
    src = kohya_file("sdxl.safetensors", kohya_names, 6, rng, alpha_of=lambda i: 3.0)
    sgm_shapes = {"diffusion_model." + unet.sgm[d] + ".weight": s for d, s in unet.shape.items()}
    meant, unloaded = kohya_load(src, kohya_names)
    check(not unloaded and len(meant) == len(kohya_names), "sdxl: the input loads whole in kohya")
    check(any("input_blocks_4_1_transformer_blocks_0_attn1_to_q" in k for k in kohya_names)
          and any("output_blocks_2_2_conv" in k for k in kohya_names)
          and any("input_blocks_3_0_op" in k for k in kohya_names), "sdxl: the model has sgm names")

    def kohya_of(d):
        return "lora_unet_" + unet.sgm[d].replace(".", "_")

    dst = transform(src, path("sdxl-dyn.safetensors"), "lora-svd", "sv-fro=0.95")
    rank_of = {m: np.linalg.matrix_rank(kohya_load(dst, [m])[0][m], tol=1e-9) for m in kohya_names}
    want = reduced_reference(meant, rank_of)
    got, unloaded = kohya_load(dst, kohya_names)
    compare("sdxl dynamic, kohya", got, want, unloaded)
    got, unloaded = comfy_load(dst, comfy_key_map_unet(unet), sgm_shapes)
    compare("sdxl dynamic, ComfyUI", got, {"diffusion_model." + unet.sgm[d] + ".weight": want[kohya_of(d)]
                                           for d in unet.shape}, unloaded)
    got, unloaded = diffusers_load(dst, unet.shape, "unet")
    compare("sdxl dynamic, diffusers", got, {d: want[kohya_of(d)] for d in unet.shape}, unloaded)

    diff = transform(src, path("sdxl-diffusers.safetensors"), "rename", "preset=sd-kohya-to-diffusers")
    got, unloaded = diffusers_load(diff, unet.shape, "unet")
    compare("sdxl to diffusers, diffusers", got, {d: meant[kohya_of(d)] for d in unet.shape}, unloaded)
    back = transform(diff, path("sdxl-back.safetensors"), "rename", "preset=sdxl-diffusers-to-kohya")
    check(sorted(read_st(back)[0]) == sorted(read_st(src)[0]), "sdxl to diffusers and back: kohya's own names")
    got, unloaded = kohya_load(back, kohya_names)
    compare("sdxl to diffusers and back, kohya", got, meant, unloaded)


def test_flux():
    """Flux: a kohya file (BFL names, one qkv saved with split qkv, the final
    adaLN layer) converted to diffusers and back; a reduced diffusers file
    converted to kohya; a kohya and a diffusers file merged. ComfyUI reads
    both conventions onto the same BFL weights, which is where they are
    compared; diffusers reads its own."""
    print("# flux")
    model = flux_model()
    bfl_shapes = {"diffusion_model." + k + ".weight": s for k, s in model.items()}
    kohya_names = {"lora_unet_" + k.replace(".", "_"): s for k, s in model.items()}
    rng = np.random.default_rng(3)
    src = kohya_file("flux.safetensors", kohya_names, 6, rng, alpha_of=lambda i: [3.0, 6.0, 12.0][i % 3],
                     fused_split={"lora_unet_double_blocks_0_img_attn_qkv": [H, H, H]})
    key_map = comfy_key_map_flux()
    meant, unloaded = comfy_load(src, key_map, bfl_shapes)
    check(not unloaded and len(meant) == len(model), "flux: the input loads whole in ComfyUI")

    diff = transform(src, path("flux-diffusers.safetensors"), "rename", "preset=flux-kohya-to-diffusers")
    ranks = ranks_of(diff, ".lora_A.weight")
    check(ranks["transformer.transformer_blocks.0.attn.to_q"] == 2,
          "flux split qkv: to_q at its own rank 2, not %d" % ranks["transformer.transformer_blocks.0.attn.to_q"])
    check(ranks["transformer.transformer_blocks.1.attn.to_q"] == 6, "flux dense qkv: to_q keeps rank 6")
    got, unloaded = comfy_load(diff, key_map, bfl_shapes)
    compare("flux to diffusers, ComfyUI", got, meant, unloaded)
    dmodel = flux_diffusers_model()
    got, unloaded = diffusers_load(diff, dmodel, "transformer")
    compare("flux to diffusers, diffusers", to_bfl(got), meant, unloaded)

    back = transform(diff, path("flux-back.safetensors"), "rename", "preset=flux-diffusers-to-kohya")
    got, unloaded = comfy_load(back, key_map, bfl_shapes)
    compare("flux to diffusers and back, ComfyUI", got, meant, unloaded)
    got, unloaded = kohya_load(back, kohya_names)
    bfl_of = {"lora_unet_" + k.replace(".", "_"): "diffusion_model." + k + ".weight" for k in model}
    compare("flux to diffusers and back, kohya", {bfl_of[k]: v for k, v in got.items()}, meant, unloaded)

    # a reduced diffusers file converted to kohya
    red = transform(diff, path("flux-diffusers-r2.safetensors"), "lora-svd", "rank=2")
    red_d, unloaded = diffusers_load(red, dmodel, "transformer")
    check(not unloaded, "flux reduced: loads in diffusers")
    red_k = transform(red, path("flux-r2-kohya.safetensors"), "rename", "preset=flux-diffusers-to-kohya")
    got, unloaded = comfy_load(red_k, key_map, bfl_shapes)
    compare("flux reduced, to kohya, ComfyUI", got, to_bfl(red_d), unloaded)

    # merged: a kohya file and a diffusers one, into kohya names
    merged = merge(path("flux-merged.safetensors"), [src, red])
    want = {k: meant[k] + to_bfl(red_d).get(k, 0) for k in meant}
    got, unloaded = comfy_load(merged, key_map, bfl_shapes)
    compare("flux merged kohya + diffusers, ComfyUI", got, want, unloaded)
    check(not any(k.startswith("transformer.") for k in read_st(merged)[0]), "flux merged: kohya names only")


def to_bfl(diffusers_updates):
    """diffusers-space updates placed on BFL weights as ComfyUI's
    flux_to_diffusers table places them"""
    out = {}
    shapes = flux_model()
    for d, (b, offset, fn) in flux_to_diffusers().items():
        if d not in diffusers_updates:
            continue
        key = "diffusion_model." + b + ".weight"
        w = out.setdefault(key, np.zeros(shapes[b]))
        u = fn(diffusers_updates[d]) if fn else diffusers_updates[d]
        if offset:
            w[offset[1]:offset[1] + offset[2]] += u
        else:
            w += u
    return out


def test_diffusers_metadata():
    """diffusers' lora_adapter_metadata (save_lora_weights: the LoraConfig
    per component, _pack_dict_with_prefix): its scale is read, a rank change
    rewrites it (fixed, dynamic: ^-anchored rank_pattern and alpha_pattern),
    and converting to kohya carries the scale into `.alpha`."""
    print("# diffusers lora_adapter_metadata")
    dmodel = flux_diffusers_model()
    rng = np.random.default_rng(4)
    t = {}
    for i, (m, (out, inn)) in enumerate(sorted(dmodel.items())):
        r = 6 if m == "proj_out" else 4
        down, up = factors(rng, out, inn, r, 0.9 if i % 2 else 0.3)
        t["transformer.%s.lora_A.weight" % m] = down
        t["transformer.%s.lora_B.weight" % m] = up
    # as PEFT's LoraConfig.to_dict gives them: a pattern key that is the
    # module's name also matches single_transformer_blocks.N.proj_out
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"^proj_out": 6},
              "alpha_pattern": {"^transformer_blocks.0.attn.to_q": 2}, "use_rslora": False,
              "target_modules": sorted(dmodel), "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer." + k: v for k, v in config.items()}, indent=2, sort_keys=True)}
    src = write_st(path("dmeta.safetensors"), t, meta)
    meant, unloaded = diffusers_load(src, dmodel, "transformer")
    check(not unloaded and len(meant) == len(dmodel), "metadata: the input loads whole in diffusers")
    for label, props in (("fixed rank 2", ["rank=2"]), ("dynamic", ["sv-fro=0.95"]),
                         ("dynamic, padded", ["sv-fro=0.95", "max-rank=3", "pad=true"])):
        dst = transform(src, path("dmeta-%s.safetensors" % re.sub(r"\W", "", label)), "lora-svd", *props)
        sd, meta_out = read_st(dst)
        ranks = {k.split(".", 1)[1][:-len(".lora_A.weight")]: v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
        config_out = json.loads(meta_out["lora_adapter_metadata"])
        if label == "fixed rank 2":
            # PEFT's rule, per component: r the new rank, lora_alpha scaled
            # with it, the modules whose scale differs ^-anchored
            check(config_out["transformer.r"] == 2 and config_out["transformer.lora_alpha"] == 4
                  and config_out["transformer.rank_pattern"] == {}
                  and config_out["transformer.alpha_pattern"] == {
                      "^proj_out": 8 * 2 / 6, "^transformer_blocks\\.0\\.attn\\.to_q": 1},
                  "metadata fixed: rewritten config %s" % {k: v for k, v in config_out.items() if "target" not in k})
            check(config_out["transformer.target_modules"] == sorted(dmodel) and config_out["transformer.peft_type"] == "LORA",
                  "metadata fixed: the other entries kept")
        if label == "dynamic":
            check(len(set(ranks.values())) > 1, "metadata dynamic: the ranks differ")
            config_out = json.loads(meta_out["lora_adapter_metadata"])
            check(all(k.startswith("^") for k in config_out["transformer.rank_pattern"]),
                  "metadata dynamic: rank_pattern keys ^-anchored")
        try:
            got, unloaded = diffusers_load(dst, dmodel, "transformer")
        except RuntimeError as e:
            check(False, "metadata %s: diffusers refuses it: %s" % (label, e))
            continue
        rank_of = {m: np.linalg.matrix_rank(u, tol=1e-9) for m, u in got.items()}
        compare("metadata %s, diffusers" % label, got, reduced_reference(meant, rank_of), unloaded)
    kohya = transform(src, path("dmeta-kohya.safetensors"), "rename", "preset=flux-diffusers-to-kohya")
    check("lora_adapter_metadata" not in read_st(kohya)[1], "metadata: dropped by the conversion")
    got, unloaded = comfy_load(kohya, comfy_key_map_flux(), {"diffusion_model." + k + ".weight": s
                                                             for k, s in flux_model().items()})
    compare("metadata to kohya, ComfyUI", got, to_bfl(meant), unloaded)


def main():
    for test in (test_sd15_kohya, test_sdxl_sgm, test_flux, test_diffusers_metadata):
        test()
    if FAILURES:
        print("%d failures" % len(FAILURES))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
