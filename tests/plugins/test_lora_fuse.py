#!/usr/bin/python3
# test_lora_fuse.py: lora-fuse against numpy
#
# Models and LoRAs are written here the way the tools name them: a Hugging
# Face llama (model.layers.N.self_attn.q_proj.weight) with a PEFT LoRA
# (base_model.model.<module>.lora_A.weight and an adapter_config.json: scale
# lora_alpha / r, peft/tuners/lora/layer.py LoraLayer.update_layer), a BFL
# Flux checkpoint (double_blocks.N.img_attn.qkv.weight) with a kohya LoRA
# (lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight with .alpha:
# scale alpha / r, sd-scripts networks/lora.py LoRAModule), and a diffusers
# UNet with a diffusers LoRA (unet.<module>.lora_A.weight, scale 1) including
# a conv; kohya SD 1.5 and SDXL LoRAs onto the original CompVis (ldm) and
# Stability (sgm) checkpoints, real SD 1.5 UNet names and shapes. The oracle forms W + strength * scale * B @ A in f64 and rounds once
# to the model's dtype, to nearest even: lpipe's bytes must equal it.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

LPIPE = os.environ["LPIPE"]
PIPELINE = os.path.join(os.environ["LPIPE_SOURCE_ROOT"], "pipelines", "fuse-lora.pipeline")
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def to_bf16(x64):
    """f64 -> bf16 bits, one rounding to nearest even (via the exact f64 value)"""
    x64 = np.asarray(x64, np.float64)
    # round f64 to bf16 directly: f64 has 52 fraction bits, bf16 7
    u = x64.view(np.uint64)
    drop = 52 - 7
    half = np.uint64(1) << np.uint64(drop - 1)
    lsb = (u >> np.uint64(drop)) & np.uint64(1)
    r = (u + half - np.uint64(1) + lsb) >> np.uint64(drop)
    # r holds sign, 11-bit exponent, 7 fraction bits; re-bias to 8-bit exponent
    sign = (r >> np.uint64(18)) & np.uint64(1)
    exp = ((r >> np.uint64(7)) & np.uint64(0x7FF)).astype(np.int64) - 1023 + 127
    frac = r & np.uint64(0x7F)
    carry_ok = (exp > 0) & (exp < 255)
    assert carry_ok.all(), "test values stay normal in bf16"
    return ((sign << np.uint64(15)) | (exp.astype(np.uint64) << np.uint64(7)) | frac).astype(np.uint16)


def encode(x, dtype):
    if dtype == "BF16":
        return to_bf16(x).tobytes()
    if dtype == "F16":
        return np.asarray(x, np.float16).tobytes()
    return np.asarray(x, np.float32).tobytes()


def decode(raw, dtype, shape):
    if dtype == "BF16":
        x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        x = np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[dtype])
    return x.astype(np.float64).reshape(shape)


def write_st(path, tensors, meta=None):
    """tensors: name -> (dtype, f64 array of values exactly representable or to round)"""
    header, blobs, off = {}, [], 0
    for name, (dtype, x) in tensors.items():
        raw = encode(x, dtype)
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {name: (info["dtype"], data[8 + n + info["data_offsets"][0]: 8 + n + info["data_offsets"][1]],
                   info["shape"]) for name, info in header.items()}


def stored(dtype, x):
    return decode(encode(x, dtype), dtype, x.shape)


def run(*args, expect_ok=True):
    p = subprocess.run([LPIPE] + list(args), capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError("lpipe %s failed: %s" % (" ".join(args), p.stderr))
    return p


def fuse_pipeline(tmp, model, loras, strengths, out, **props):
    stages = [{"id": "model", "stage": "safetensors-source", "location": model}]
    for i, lora in enumerate(loras):
        stages.append({"id": "lora%d" % i, "stage": "safetensors-source", "location": lora})
    fuse = {"stage": "lora-fuse", "inputs": ["model"] + ["lora%d" % i for i in range(len(loras))],
            "strengths": [str(s) for s in strengths]}
    fuse.update(props)
    stages += [fuse, {"stage": "safetensors-sink", "location": out}]
    path = os.path.join(tmp, "fuse-%d.pipeline" % len(os.listdir(tmp)))
    json.dump({"lpipe": 1, "stages": stages}, open(path, "w"))
    return path


def check_fused(out, model, updates, what):
    """updates: weight name -> f64 delta; every other tensor byte-identical"""
    got = read_st(out)
    for name, (dtype, x) in model.items():
        raw = got[name][1]
        if name in updates:
            want = encode(stored(dtype, x) + updates[name], dtype)
            check(raw == want, "%s: %s is W + update rounded once to %s" % (what, name, dtype))
        else:
            check(raw == encode(x, dtype), "%s: %s passes through untouched" % (what, name))


def lora_factors(rng, out, inn, r, kernel=None):
    a = rng.normal(size=(r, inn) if kernel is None else (r, inn) + kernel) * 0.05
    b = rng.normal(size=(out, r) if kernel is None else (out, r, 1, 1)) * 0.05
    return a, b


def check_peft(tmp):
    rng = np.random.default_rng(1)
    model = {
        "model.embed_tokens.weight": ("BF16", rng.normal(size=(64, 32))),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", rng.normal(size=(32, 32))),
        "model.layers.0.self_attn.v_proj.weight": ("BF16", rng.normal(size=(16, 32))),
        "model.layers.0.mlp.up_proj.weight": ("BF16", rng.normal(size=(48, 32))),
        "model.norm.weight": ("BF16", np.ones(32)),
    }
    mp = os.path.join(tmp, "llama.safetensors")
    write_st(mp, model, {"format": "pt"})
    lora, updates = {}, {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        out, inn = model[name + ".weight"][1].shape
        a, b = lora_factors(rng, out, inn, 4)
        a, b = stored("F32", a), stored("F32", b)
        lora["base_model.model.%s.lora_A.weight" % name] = ("F32", a)
        lora["base_model.model.%s.lora_B.weight" % name] = ("F32", b)
        updates[name + ".weight"] = 0.5 * (8 / 4) * (b @ a)   # strength 0.5, scale lora_alpha / r = 2
    lp = os.path.join(tmp, "peft-lora.safetensors")
    write_st(lp, lora)
    with open(os.path.join(tmp, "peft-lora.adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                   "target_modules": ["q_proj", "v_proj"]}, f)
    out = os.path.join(tmp, "llama-fused.safetensors")
    p = run("run", PIPELINE, "model=" + mp, "lora=" + lp, "strength=0.5", "output=" + out)
    check_fused(out, model, updates, "peft")
    check("2 modules of 1 LoRA fused into 2 weights" in p.stderr, "peft: the run says what it fused")


def check_kohya_flux_and_two_loras(tmp):
    rng = np.random.default_rng(2)
    model = {
        "double_blocks.0.img_attn.qkv.weight": ("BF16", rng.normal(size=(96, 32))),
        "double_blocks.0.img_mlp.0.weight": ("BF16", rng.normal(size=(64, 32))),
        "single_blocks.0.linear1.weight": ("BF16", rng.normal(size=(112, 32))),
        "final_layer.linear.weight": ("BF16", rng.normal(size=(16, 32))),
    }
    mp = os.path.join(tmp, "flux.safetensors")
    write_st(mp, model)
    loras, updates = [], {}
    strengths = [1.0, -0.75]
    for i, names in enumerate((["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"],
                               ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"])):
        lora = {}
        for name in names:
            out, inn = model[name + ".weight"][1].shape
            stem = "lora_unet_" + name.replace(".", "_")
            a, b = lora_factors(rng, out, inn, 8)
            a, b = stored("BF16", a), stored("BF16", b)
            lora[stem + ".lora_down.weight"] = ("BF16", a)
            lora[stem + ".lora_up.weight"] = ("BF16", b)
            lora[stem + ".alpha"] = ("BF16", np.array(4.0))
            updates[name + ".weight"] = updates.get(name + ".weight", 0) + strengths[i] * (4 / 8) * (b @ a)
        path = os.path.join(tmp, "kohya-%d.safetensors" % i)
        write_st(path, lora, {"ss_network_module": "networks.lora", "ss_network_dim": "8",
                              "ss_network_alpha": "4"})
        loras.append(path)
    out = os.path.join(tmp, "flux-fused.safetensors")
    run("run", fuse_pipeline(tmp, mp, loras, strengths, out))
    check_fused(out, model, updates, "kohya flux, two LoRAs")


def check_diffusers_flux_onto_bfl(tmp):
    """A diffusers Flux LoRA (separate to_q, to_k, to_v) onto a BFL checkpoint
    (fused img_attn.qkv): rename preset=flux-diffusers-to-kohya fuses the
    three modules into one kohya qkv module (diffusers'
    _convert_bfl_flux_control_lora_to_diffusers / sd-scripts'
    convert_flux_lora.py split and join them the same way), which lora-fuse
    then matches to the BFL weight."""
    rng = np.random.default_rng(5)
    model = {"double_blocks.0.img_attn.qkv.weight": ("BF16", rng.normal(size=(96, 32))),
             "double_blocks.0.img_attn.proj.weight": ("BF16", rng.normal(size=(32, 32)))}
    mp = os.path.join(tmp, "flux-bfl.safetensors")
    write_st(mp, model)
    lora, parts = {}, []
    for proj in ("to_q", "to_k", "to_v"):
        a, b = lora_factors(rng, 32, 32, 4)
        a, b = stored("F32", a), stored("F32", b)
        lora["transformer.transformer_blocks.0.attn.%s.lora_A.weight" % proj] = ("F32", a)
        lora["transformer.transformer_blocks.0.attn.%s.lora_B.weight" % proj] = ("F32", b)
        parts.append(b @ a)
    lp = os.path.join(tmp, "flux-diffusers-lora.safetensors")
    write_st(lp, lora)
    out = os.path.join(tmp, "flux-bfl-fused.safetensors")
    pipeline = os.path.join(tmp, "flux-onto-bfl.pipeline")
    json.dump({"lpipe": 1, "stages": [
        {"id": "model", "stage": "safetensors-source", "location": mp},
        {"id": "lora", "stage": "safetensors-source", "location": lp},
        {"id": "kohya", "stage": "rename", "inputs": ["lora"], "preset": "flux-diffusers-to-kohya"},
        {"stage": "lora-fuse", "inputs": ["model", "kohya"]},
        {"stage": "safetensors-sink", "location": out}]}, open(pipeline, "w"))
    run("run", pipeline)
    check_fused(out, model, {"double_blocks.0.img_attn.qkv.weight": np.concatenate(parts)},
                "diffusers Flux onto BFL")


def check_diffusers_conv(tmp):
    rng = np.random.default_rng(3)
    model = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": ("F16", rng.normal(size=(32, 32))),
        "down_blocks.0.resnets.0.conv1.weight": ("F16", rng.normal(size=(16, 8, 3, 3))),
        "down_blocks.0.resnets.0.conv1.bias": ("F16", rng.normal(size=(16,))),
    }
    mp = os.path.join(tmp, "unet.safetensors")
    write_st(mp, model)
    lora, updates = {}, {}
    a, b = lora_factors(rng, 32, 32, 4)
    lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = ("F32", a)
    lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = ("F32", b)
    updates["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = \
        stored("F32", b) @ stored("F32", a)
    a, b = lora_factors(rng, 16, 8, 4, kernel=(3, 3))
    lora["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"] = ("F32", a)
    lora["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"] = ("F32", b)
    updates["down_blocks.0.resnets.0.conv1.weight"] = \
        (stored("F32", b).reshape(16, 4) @ stored("F32", a).reshape(4, -1)).reshape(16, 8, 3, 3)
    lp = os.path.join(tmp, "diffusers-lora.safetensors")
    write_st(lp, lora)
    out = os.path.join(tmp, "unet-fused.safetensors")
    run("run", PIPELINE, "model=" + mp, "lora=" + lp, "output=" + out)
    # f16 rounding of the f64 sum: numpy's f64 -> f16 cast rounds once, to nearest even
    check_fused(out, model, updates, "diffusers conv")


def sd15_diffusers_to_ldm():
    """diffusers scripts/convert_diffusers_to_original_stable_diffusion.py,
    convert_unet_state_dict: (stable-diffusion, diffusers) prefix pairs,
    written out as there (the direction lpipe's table does not take)."""
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append(("input_blocks.%d.0." % (3 * i + j + 1), "down_blocks.%d.resnets.%d." % (i, j)))
            if i < 3:
                layer.append(("input_blocks.%d.1." % (3 * i + j + 1), "down_blocks.%d.attentions.%d." % (i, j)))
        for j in range(3):
            layer.append(("output_blocks.%d.0." % (3 * i + j), "up_blocks.%d.resnets.%d." % (i, j)))
            if i > 0:
                layer.append(("output_blocks.%d.1." % (3 * i + j), "up_blocks.%d.attentions.%d." % (i, j)))
        if i < 3:
            layer.append(("input_blocks.%d.0.op." % (3 * (i + 1)), "down_blocks.%d.downsamplers.0.conv." % i))
            layer.append(("output_blocks.%d.%d." % (3 * i + 2, 1 if i == 0 else 2), "up_blocks.%d.upsamplers.0." % i))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append(("middle_block.%d." % (2 * j), "mid_block.resnets.%d." % j))

    def convert(name):
        for sd, hf in top:
            if name.startswith(hf):
                return sd + name[len(hf):]
        if "resnets" in name:
            for sd, hf in resnet:
                name = name.replace(hf, sd)
        for sd, hf in layer:
            name = name.replace(hf, sd)
        return name
    return convert


def kohya_module(lora, rng, stem, shape, r, alpha, updates, target, strength=1.0, rows=None):
    """a kohya LoRA module (sd-scripts networks/lora.py LoRAModule: lora_down,
    lora_up, alpha; scale alpha / r; a conv's lora_down has the kernel, its
    lora_up is 1x1) and its update of the target's rows"""
    out, inn = shape[0], shape[1]
    kernel = tuple(shape[2:]) or None
    a, b = lora_factors(rng, out if rows is None else rows[1] - rows[0], inn, r, kernel)
    a, b = stored("F16", a), stored("F16", b)
    lora[stem + ".lora_down.weight"] = ("F16", a)
    lora[stem + ".lora_up.weight"] = ("F16", b)
    lora[stem + ".alpha"] = ("F16", np.array(float(alpha)))
    delta = strength * (alpha / r) * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
    full = np.zeros((out, int(np.prod(shape[1:]))))
    lo, hi = rows if rows is not None else (0, out)
    full[lo:hi] = delta
    updates[target] = updates.get(target, 0) + full.reshape(shape)


def check_kohya_sd15_onto_ldm(tmp):
    """A kohya SD 1.5 LoRA (diffusers module names: lora_unet_down_blocks_...,
    lora_te_text_model_...) onto the original CompVis checkpoint
    (model.diffusion_model.input_blocks..., cond_stage_model.transformer...),
    the names and shapes of the real SD 1.5 UNet (tests/bench/sd15_unet.py),
    a subset, as ComfyUI matches them (comfy/lora.py model_lora_keys_unet
    through comfy/utils.py unet_to_diffusers; model_lora_keys_clip)."""
    sys.path.insert(0, os.path.join(os.environ["LPIPE_SOURCE_ROOT"], "tests", "bench"))
    import sd15_unet
    shapes = dict(sd15_unet.layout())
    convert = sd15_diffusers_to_ldm()
    rng = np.random.default_rng(15)
    targets = [
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.1.resnets.0.conv1.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight",
        "down_blocks.2.resnets.1.time_emb_proj.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "mid_block.resnets.1.conv2.weight",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight",
        "up_blocks.2.upsamplers.0.conv.weight",
        "up_blocks.3.resnets.2.conv_shortcut.weight",
        "up_blocks.3.attentions.2.proj_out.weight",
        "time_embedding.linear_1.weight",
    ]
    model = {}
    for name in targets + ["down_blocks.0.attentions.0.norm.weight", "mid_block.resnets.1.conv2.bias",
                           "conv_in.weight", "conv_out.weight"]:
        model["model.diffusion_model." + convert(name)] = ("F16", rng.normal(size=shapes[name]))
    te = "cond_stage_model.transformer.text_model.encoder.layers.%d.%s.weight"
    model[te % (0, "self_attn.q_proj")] = ("F16", rng.normal(size=(768, 768)))
    model[te % (11, "mlp.fc1")] = ("F16", rng.normal(size=(3072, 768)))
    model[te % (0, "layer_norm1")] = ("F16", np.ones(768))
    check("model.diffusion_model.input_blocks.1.1.proj_in.weight" in model
          and "model.diffusion_model.output_blocks.8.2.conv.weight" in model
          and "model.diffusion_model.middle_block.2.out_layers.3.weight" in model,
          "sd15: the model has the original names")
    mp = os.path.join(tmp, "sd15-ldm.safetensors")
    write_st(mp, model)

    lora, updates = {}, {}
    strength = 0.8
    for name in targets:
        kohya_module(lora, rng, "lora_unet_" + name[:-len(".weight")].replace(".", "_"), shapes[name], 4, 2,
                     updates, "model.diffusion_model." + convert(name), strength)
    kohya_module(lora, rng, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768), 4, 4, updates,
                 te % (0, "self_attn.q_proj"), strength)
    kohya_module(lora, rng, "lora_te_text_model_encoder_layers_11_mlp_fc1", (3072, 768), 4, 1, updates,
                 te % (11, "mlp.fc1"), strength)
    lp = os.path.join(tmp, "sd15-kohya.safetensors")
    write_st(lp, lora, {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_base_model_version": "sd_v1"})
    out = os.path.join(tmp, "sd15-fused.safetensors")
    p = run("run", PIPELINE, "model=" + mp, "lora=" + lp, "strength=%g" % strength, "output=" + out)
    check_fused(out, model, updates, "kohya sd15 onto ldm")
    check("%d modules of 1 LoRA fused into %d weights" % (len(targets) + 2, len(targets) + 2) in p.stderr,
          "sd15: every module fused (%r)" % p.stderr)

    # a diffusers LoRA (unet.<module>.lora_A/B, scale 1) onto the same checkpoint
    name = targets[1]
    a, b = lora_factors(rng, 320, 320, 2)
    a, b = stored("F32", a), stored("F32", b)
    dl = os.path.join(tmp, "sd15-diffusers.safetensors")
    write_st(dl, {"unet.%s.lora_A.weight" % name[:-7]: ("F32", a), "unet.%s.lora_B.weight" % name[:-7]: ("F32", b)})
    out = os.path.join(tmp, "sd15-fused-diffusers.safetensors")
    run("run", PIPELINE, "model=" + mp, "lora=" + dl, "output=" + out)
    check_fused(out, model, {"model.diffusion_model." + convert(name): b @ a}, "diffusers sd15 onto ldm")

    # a module of a block SD 1.5 does not have fails the run, naming it
    bad = dict(lora)
    kohya_module(bad, rng, "lora_unet_down_blocks_3_attentions_0_proj_in", (1280, 1280, 1, 1), 4, 2, {}, "none")
    bp = os.path.join(tmp, "sd15-bad.safetensors")
    write_st(bp, bad)
    p = run("run", PIPELINE, "model=" + mp, "lora=" + bp, "output=" + out + "x", expect_ok=False)
    check(p.returncode == 1 and "lora_unet_down_blocks_3_attentions_0_proj_in" in p.stderr
          and not os.path.exists(out + "x"), "sd15: an unmatched module is named (%r)" % p.stderr)


def check_kohya_sdxl_onto_sgm(tmp):
    """A kohya SDXL LoRA onto the original Stability checkpoint (sgm): the
    UNet by the checkpoint's own names (sd-scripts trains SDXL on
    library/sdxl_original_unet.py, so lora_unet_input_blocks_4_1_...) and by
    diffusers' (lora_unet_down_blocks_1_attentions_0_..., which
    convert_diffusers_to_original_sdxl.py maps to input_blocks.4.1); te1
    (conditioner.embedders.0.transformer.text_model...) as lora_te1_; te2,
    OpenCLIP bigG (conditioner.embedders.1.model.transformer.resblocks.N...),
    as lora_te2_ with transformers' names: q, k and v are the thirds of
    attn.in_proj_weight, mlp_fc1 is mlp.c_fc, self_attn_out_proj attn.out_proj
    (sdxl_model_util.py convert_sdxl_text_encoder_2_checkpoint)."""
    rng = np.random.default_rng(16)
    unet = "model.diffusion_model."
    te2 = "conditioner.embedders.1.model.transformer.resblocks.%d."
    model = {
        unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": ("F16", rng.normal(size=(640, 640))),
        unet + "input_blocks.4.1.proj_in.weight": ("F16", rng.normal(size=(640, 640))),
        unet + "output_blocks.2.2.conv.weight": ("F16", rng.normal(size=(64, 64, 3, 3))),
        unet + "label_emb.0.0.weight": ("F16", rng.normal(size=(1280, 2816))),
        unet + "middle_block.1.transformer_blocks.9.attn2.to_k.weight": ("F16", rng.normal(size=(1280, 2048))),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.k_proj.weight":
            ("F16", rng.normal(size=(768, 768))),
        te2 % 0 + "attn.in_proj_weight": ("F16", rng.normal(size=(3840, 1280))),
        te2 % 0 + "attn.in_proj_bias": ("F16", rng.normal(size=(3840,))),
        te2 % 0 + "attn.out_proj.weight": ("F16", rng.normal(size=(1280, 1280))),
        te2 % 31 + "mlp.c_fc.weight": ("F16", rng.normal(size=(5120, 1280))),
    }
    mp = os.path.join(tmp, "sdxl-sgm.safetensors")
    write_st(mp, model)
    lora, updates = {}, {}
    for stem, target in (
            ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
            ("lora_unet_down_blocks_1_attentions_0_proj_in", unet + "input_blocks.4.1.proj_in.weight"),
            ("lora_unet_up_blocks_0_upsamplers_0_conv", unet + "output_blocks.2.2.conv.weight"),
            ("lora_unet_add_embedding_linear_1", unet + "label_emb.0.0.weight"),
            ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
             unet + "middle_block.1.transformer_blocks.9.attn2.to_k.weight"),
            ("lora_te1_text_model_encoder_layers_3_self_attn_k_proj",
             "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.k_proj.weight"),
            ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", te2 % 0 + "attn.out_proj.weight"),
            ("lora_te2_text_model_encoder_layers_31_mlp_fc1", te2 % 31 + "mlp.c_fc.weight")):
        kohya_module(lora, rng, stem, model[target][1].shape, 8, 4, updates, target)
    for part, proj in ((0, "q"), (2, "v")):
        kohya_module(lora, rng, "lora_te2_text_model_encoder_layers_0_self_attn_%s_proj" % proj, (3840, 1280),
                     8, 4, updates, te2 % 0 + "attn.in_proj_weight", rows=(1280 * part, 1280 * (part + 1)))
    lp = os.path.join(tmp, "sdxl-kohya.safetensors")
    write_st(lp, lora, {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    out = os.path.join(tmp, "sdxl-fused.safetensors")
    p = run("run", PIPELINE, "model=" + mp, "lora=" + lp, "output=" + out)
    check_fused(out, model, updates, "kohya sdxl onto sgm")
    check("10 modules of 1 LoRA fused into 9 weights" in p.stderr, "sdxl: every module fused (%r)" % p.stderr)

    # a scalar named like a weight matches by name but takes no update: an
    # error naming the module, not a crash
    odd = dict(model)
    odd[unet + "logit_scale.weight"] = ("F16", np.array(2.0))
    op = os.path.join(tmp, "sdxl-scalar.safetensors")
    write_st(op, odd)
    scalar = {}
    kohya_module(scalar, rng, "lora_unet_logit_scale", (4, 4), 2, 2, {}, "none")
    sp = os.path.join(tmp, "sdxl-scalar-lora.safetensors")
    write_st(sp, scalar)
    p = run("run", PIPELINE, "model=" + op, "lora=" + sp, "output=" + out + "x", expect_ok=False)
    check(p.returncode == 1 and "find no weight of their shape in the model: lora_unet_logit_scale" in p.stderr,
          "sdxl: a module onto a scalar fails naming it (%r)" % p.stderr)


def check_errors(tmp):
    rng = np.random.default_rng(4)
    model = {"model.layers.0.self_attn.q_proj.weight": ("F16", rng.normal(size=(8, 8)))}
    mp = os.path.join(tmp, "small.safetensors")
    write_st(mp, model)
    out = os.path.join(tmp, "bad-out.safetensors")

    lora = {"lora_unet_q_proj_missing.lora_down.weight": ("F32", np.ones((2, 8))),
            "lora_unet_q_proj_missing.lora_up.weight": ("F32", np.ones((8, 2))),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", np.ones((2, 8)) * 0.1),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", np.ones((8, 2)) * 0.1)}
    lp = os.path.join(tmp, "unmatched.safetensors")
    write_st(lp, lora)
    p = run("run", PIPELINE, "model=" + mp, "lora=" + lp, "output=" + out, expect_ok=False)
    check(p.returncode == 1 and "lora_unet_q_proj_missing" in p.stderr and "allow-unmatched" in p.stderr
          and not os.path.exists(out), "errors: an unmatched module fails the run, naming it (%r)" % p.stderr)
    p = run("run", fuse_pipeline(tmp, mp, [lp], [1], out, **{"allow-unmatched": True}))
    check("lora_unet_q_proj_missing" in p.stderr and os.path.exists(out),
          "errors: allow-unmatched fuses the rest and names the others")

    shape = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", np.ones((2, 6))),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", np.ones((8, 2)))}
    sp = os.path.join(tmp, "shape.safetensors")
    write_st(sp, shape)
    p = run("run", PIPELINE, "model=" + mp, "lora=" + sp, "output=" + out + "2", expect_ok=False)
    check(p.returncode == 1 and "another shape" in p.stderr, "errors: a shape mismatch is named (%r)" % p.stderr)

    nan = dict(lora)
    del nan["lora_unet_q_proj_missing.lora_down.weight"], nan["lora_unet_q_proj_missing.lora_up.weight"]
    a = np.ones((2, 8))
    a[1, 3] = np.nan
    nan["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = ("F32", a)
    np_ = os.path.join(tmp, "nan.safetensors")
    write_st(np_, nan)
    p = run("run", PIPELINE, "model=" + mp, "lora=" + np_, "output=" + out + "3", expect_ok=False)
    check(p.returncode == 1 and "NaN" in p.stderr and "q_proj" in p.stderr and not os.path.exists(out + "3"),
          "errors: NaN in a LoRA is named (%r)" % p.stderr)

    big = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", np.full((2, 8), 300.0)),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", np.full((8, 2), 300.0))}
    bp = os.path.join(tmp, "big.safetensors")
    write_st(bp, big)
    p = run("run", PIPELINE, "model=" + mp, "lora=" + bp, "output=" + out + "4", expect_ok=False)
    check(p.returncode == 1 and "overflow" in p.stderr and "q_proj.weight" in p.stderr,
          "errors: an f16 overflow is an error naming the weight (%r)" % p.stderr)

    p = run("run", fuse_pipeline(tmp, mp, [lp], [1, 2], out + "5"), expect_ok=False)
    check(p.returncode != 0 and "strengths" in p.stderr, "errors: strengths must match the LoRAs")


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-fuse-")
    try:
        check_peft(tmp)
        check_kohya_flux_and_two_loras(tmp)
        check_diffusers_conv(tmp)
        check_diffusers_flux_onto_bfl(tmp)
        check_kohya_sd15_onto_ldm(tmp)
        check_kohya_sdxl_onto_sgm(tmp)
        check_errors(tmp)
    finally:
        shutil.rmtree(tmp)
    if FAILURES:
        print("%d checks failed" % len(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
