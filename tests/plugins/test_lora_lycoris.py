#!/usr/bin/python3
# test_lora_lycoris.py: LyCORIS LoHa and LoKr modules through lora-svd, against numpy
#
# Files are written the way LyCORIS writes them (kohya key names such as
# lora_unet_..._to_q.hada_w1_a, a 0-dim f16 .alpha, ss_network_module
# lycoris.kohya); numpy forms each module's dense update the way ComfyUI's
# loaders do and checks that lpipe's plain kohya LoRA of rank k reaches the
# Eckart-Young optimum of it, scale included, within 1e-4 plus the rounding
# of the output dtype. Files whose meaning is not defined are refused by name.
#
# Scale rules (the oracle's, read from the loaders' code):
# - LoHa: alpha / hada_w1_b.shape[0], 1 without alpha (ComfyUI
#   comfy/weight_adapter/loha.py LoHaAdapter.calculate_weight; LyCORIS
#   lycoris/modules/loha.py LohaModule.__init__, scale = alpha / lora_dim).
# - LoKr: alpha / dim with dim = lokr_w2_b.shape[0] if w2 is factored, else
#   lokr_w1_b.shape[0]; 1 when both are full matrices or there is no alpha
#   (ComfyUI weight_adapter/lokr.py LoKrAdapter.calculate_weight; LyCORIS
#   modules/lokr.py LokrModule.__init__ "use scale = 1").
# - Tucker cores: einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)
#   (ComfyUI; LyCORIS functional/general.py rebuild_tucker).
# - LoKr conv: kron(w1[:, :, None, None], w2) (ComfyUI; LyCORIS
#   functional/lokr.py make_kron).
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import atexit
import json
import os
import struct
import shutil
import subprocess
import sys
import tempfile

import numpy as np

LPIPE = os.environ["LPIPE"]
EPS = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 2.0 ** -24}
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def to_bytes(x, dt):
    x = np.ascontiguousarray(x, np.float32)
    if dt == "F32":
        return x.tobytes()
    if dt == "F16":
        return x.astype(np.float16).tobytes()
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
    return rounded.tobytes()


def stored(x, dt):
    """x as the file holds it (rounded to dt), in f64"""
    raw = to_bytes(x, dt)
    return from_bytes(raw, dt, x.shape)


def from_bytes(raw, dt, shape):
    if dt == "BF16":
        x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        x = np.frombuffer(raw, {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt])
    return x.astype(np.float64).reshape(shape)


def write_st(path, tensors, metadata):
    """tensors: name -> (dtype, array), written in sorted order as safetensors.torch does"""
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        dt, x = tensors[name]
        raw = to_bytes(x, dt)
        header[name] = {"dtype": dt, "shape": list(np.shape(x)), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], from_bytes(data[8 + n + b:8 + n + e], info["dtype"], info["shape"]))
    return out, meta


def lycoris_metadata(algo, dim, alpha, extra=None):
    """what LyCORIS's kohya wrapper (lycoris.kohya) records in a trained file"""
    args = {"algo": algo, "preset": "full", "conv_dim": str(dim), "conv_alpha": str(alpha),
            "dropout": "0.0", "use_tucker": "False"}
    args.update(extra or {})
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
            "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(args),
            "ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}


def run(*args):
    return subprocess.run([LPIPE, "-q"] + list(args), capture_output=True, text=True)


def reduce(src, dst, *props):
    return run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", *props,
               "!", "safetensors-sink", "location=" + dst)


# ---- the oracle: dense updates as ComfyUI forms them -------------------------


def tucker(t, wa, wb):
    return np.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def loha_delta(p, name):
    g = lambda s: p.get(name + "." + s)
    w1b = g("hada_w1_b")
    scale = g("alpha") / w1b.shape[0] if g("alpha") is not None else 1.0
    if g("hada_t1") is not None:
        m1 = tucker(g("hada_t1"), g("hada_w1_a"), w1b)
        m2 = tucker(g("hada_t2"), g("hada_w2_a"), g("hada_w2_b"))
    else:
        flat = lambda x: x.reshape(x.shape[0], -1)
        m1 = flat(g("hada_w1_a")) @ flat(w1b)
        m2 = flat(g("hada_w2_a")) @ flat(g("hada_w2_b"))
    d = scale * m1 * m2
    return d.reshape(d.shape[0], -1)


def lokr_delta(p, name):
    g = lambda s: p.get(name + "." + s)
    dim = None
    w1 = g("lokr_w1")
    if w1 is None:
        dim = g("lokr_w1_b").shape[0]
        w1 = g("lokr_w1_a") @ g("lokr_w1_b")
    w2 = g("lokr_w2")
    if w2 is None:
        dim = g("lokr_w2_b").shape[0]
        if g("lokr_t2") is None:
            w2 = g("lokr_w2_a") @ g("lokr_w2_b")
        else:
            w2 = tucker(g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = g("alpha") / dim if g("alpha") is not None and dim is not None else 1.0
    d = scale * np.kron(w1, w2)
    return d.reshape(d.shape[0], -1)


def parts_of(tensors):
    return {n: x for n, (dt, x) in tensors.items()}


def check_module(label, src_tensors, out_tensors, name, delta_fn, k, down_shape, up_shape):
    d = delta_fn(parts_of(src_tensors), name)
    s = np.linalg.svd(d, compute_uv=False)
    total = np.sqrt(np.sum(s ** 2))
    opt = np.sqrt(np.sum(s[k:] ** 2)) / total
    dn, up, al = name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"
    for key in (dn, up, al):
        check(key in out_tensors, "%s: %s written" % (label, key))
    if not all(key in out_tensors for key in (dn, up, al)):
        return
    ddt, down = out_tensors[dn]
    udt, upw = out_tensors[up]
    adt, alpha = out_tensors[al]
    check(list(down.shape) == down_shape, "%s: down shape %s, expected %s" % (label, list(down.shape), down_shape))
    check(list(upw.shape) == up_shape, "%s: up shape %s, expected %s" % (label, list(upw.shape), up_shape))
    # alpha: the new rank, or (modules of several ranks) lora-svd's one alpha
    # for the whole file, the rest of the scale folded into the factors; the
    # error below is measured with kohya's alpha / rank either way
    check(alpha.shape == () and alpha > 0, "%s: alpha %s is one positive number (0-dim)" % (label, alpha))
    # kohya's scale alpha / rank (sd-scripts networks/lora.py LoRAModule)
    approx = (alpha / k) * upw.reshape(upw.shape[0], -1) @ down.reshape(k, -1)
    err = np.linalg.norm(d - approx) / total
    eps = max(EPS[ddt], EPS[udt])
    tol = 1e-4 + 4 * eps
    check(abs(err - opt) <= tol, "%s: error %.6g vs optimum %.6g (tol %.3g)" % (label, err, opt, tol))
    print("%s: rank %d, error %.6g, optimum %.6g" % (label, k, err, opt))
    return ddt, udt


def rng_parts(rng, shapes, dt, scale=1.0):
    return {n: (dt, stored(rng.standard_normal(sh) * scale, dt)) for n, sh in shapes.items()}


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-lycoris-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # also when a check fails
    rng = np.random.default_rng(12)
    f = lambda n: os.path.join(tmp, n)

    # ---- LoHa: linear in bf16 and f32, different ranks, without alpha -------
    q = "lora_unet_double_blocks_0_img_attn_qkv"
    v = "lora_unet_single_blocks_3_linear2"
    c = "lora_unet_down_blocks_0_resnets_0_conv1"
    cf = "lora_unet_up_blocks_1_resnets_2_conv2"
    t = {}
    t.update(rng_parts(rng, {q + ".hada_w1_a": (96, 4), q + ".hada_w1_b": (4, 80),
                             q + ".hada_w2_a": (96, 4), q + ".hada_w2_b": (4, 80)}, "BF16", 0.3))
    t[q + ".alpha"] = ("F16", np.array(2.0))
    t.update(rng_parts(rng, {v + ".hada_w1_a": (40, 3), v + ".hada_w1_b": (3, 56),
                             v + ".hada_w2_a": (40, 5), v + ".hada_w2_b": (5, 56)}, "F32"))
    # a conv LoHa with Tucker cores (LohaModule use_tucker): w_a [r, out], w_b [r, in]
    t.update(rng_parts(rng, {c + ".hada_t1": (3, 3, 3, 3), c + ".hada_w1_a": (3, 24), c + ".hada_w1_b": (3, 8),
                             c + ".hada_t2": (3, 3, 3, 3), c + ".hada_w2_a": (3, 24), c + ".hada_w2_b": (3, 8)}, "F32"))
    t[c + ".alpha"] = ("F16", np.array(1.5))
    # a conv LoHa without Tucker: LyCORIS keeps the kernel flattened in w_b [r, in·kh·kw]
    t.update(rng_parts(rng, {cf + ".hada_w1_a": (16, 2), cf + ".hada_w1_b": (2, 8 * 9),
                             cf + ".hada_w2_a": (16, 2), cf + ".hada_w2_b": (2, 8 * 9)}, "F16", 0.5))
    t[cf + ".alpha"] = ("F16", np.array(2.0))
    # dim 8 on a layer narrower than r1·r2 = 64: the dense route (the update made a
    # block at a time, the Gram matrix of its smaller side) costs less than the
    # Khatri-Rao one and must give the same optimum
    w = "lora_unet_down_blocks_1_attentions_0_proj_in"
    t.update(rng_parts(rng, {w + ".hada_w1_a": (40, 8), w + ".hada_w1_b": (8, 56),
                             w + ".hada_w2_a": (40, 8), w + ".hada_w2_b": (8, 56)}, "BF16", 0.4))
    t[w + ".alpha"] = ("F16", np.array(4.0))
    # a plain kohya module and a bias in the same file: reduced as usual / untouched
    p = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    t.update(rng_parts(rng, {p + ".lora_down.weight": (8, 32), p + ".lora_up.weight": (48, 8)}, "F32"))
    t[p + ".alpha"] = ("F32", np.array(4.0))
    t["lora_unet_final_layer_linear.diff_b"] = ("F32", stored(rng.standard_normal(7), "F32"))
    write_st(f("loha.safetensors"), t, lycoris_metadata("loha", 4, 2))

    # a module whose update has a lower rank (r1·r2 for LoHa, rank(W1)·rank(W2)
    # for LoKr) is written exactly at that rank, and lora-svd says so
    for k in (5, 16):
        res = reduce(f("loha.safetensors"), f("loha-r%d.safetensors" % k), "rank=%d" % k)
        check(res.returncode == 0, "loha rank=%d exits 0: %s" % (k, res.stderr))
        if res.returncode != 0:
            continue
        out, meta = read_st(f("loha-r%d.safetensors" % k))
        dts = check_module("loha bf16 k=%d" % k, t, out, q, loha_delta, min(k, 16), [min(k, 16), 80], [96, min(k, 16)])
        check(dts == ("BF16", "BF16"), "loha: bf16 factors stay bf16 (%s)" % (dts,))
        check(out[q + ".alpha"][0] == "F16", "loha: alpha keeps its f16 dtype")
        check_module("loha f32 r1=3 r2=5 no alpha k=%d" % k, t, out, v, loha_delta, min(k, 15), [min(k, 15), 56], [40, min(k, 15)])
        check_module("loha tucker conv k=%d" % k, t, out, c, loha_delta, min(k, 9), [min(k, 9), 8, 3, 3], [24, min(k, 9), 1, 1])
        check_module("loha flattened conv k=%d" % k, t, out, cf, loha_delta, min(k, 4), [min(k, 4), 72], [16, min(k, 4)])
        check_module("loha dim 8 dense route k=%d" % k, t, out, w, loha_delta, k, [k, 56], [40, k])
        check(not any(".hada_" in n for n in out), "loha: no hada_ part left")
        check(out["lora_unet_final_layer_linear.diff_b"][1].tolist() == t["lora_unet_final_layer_linear.diff_b"][1].tolist(),
              "loha: other tensors untouched")
        check(out[p + ".lora_down.weight"][1].shape[0] == min(k, 8), "loha: the plain module is reduced too")
        check(meta.get("ss_network_module") == "networks.lora" and meta.get("ss_network_dim") == "Dynamic",
              "loha: metadata names a plain LoRA of several ranks (k=%d): %s" % (k, meta))

    # ---- LoKr: every layout ------------------------------------------------
    a = "lora_unet_single_blocks_0_linear1"       # w1 full, w2 factored
    b = "lora_unet_double_blocks_1_img_mlp_0"     # both full: scale 1 whatever alpha says
    d = "lora_unet_double_blocks_2_txt_attn_proj" # decompose_both: w1 and w2 factored
    e = "lora_unet_mid_block_resnets_0_conv1"     # conv, Tucker t2
    g = "lora_unet_mid_block_resnets_1_conv2"     # conv, full 4-D w2
    h = "lora_unet_mid_block_resnets_1_conv1"     # conv, w2_b flattened [r, d·kh·kw]
    t = {}
    t.update(rng_parts(rng, {a + ".lokr_w1": (4, 4), a + ".lokr_w2_a": (24, 4), a + ".lokr_w2_b": (4, 20)}, "F16", 0.5))
    t[a + ".alpha"] = ("F16", np.array(2.0))
    t.update(rng_parts(rng, {b + ".lokr_w1": (4, 6), b + ".lokr_w2": (16, 12)}, "BF16", 0.2))
    t[b + ".alpha"] = ("F16", np.array(7.0))
    t.update(rng_parts(rng, {d + ".lokr_w1_a": (8, 2), d + ".lokr_w1_b": (2, 8),
                             d + ".lokr_w2_a": (16, 2), d + ".lokr_w2_b": (2, 16)}, "F32"))
    t[d + ".alpha"] = ("F16", np.array(1.0))
    t.update(rng_parts(rng, {e + ".lokr_w1": (2, 2), e + ".lokr_t2": (3, 3, 3, 3),
                             e + ".lokr_w2_a": (3, 16), e + ".lokr_w2_b": (3, 8)}, "F32"))
    t[e + ".alpha"] = ("F16", np.array(3.0))
    t.update(rng_parts(rng, {g + ".lokr_w1": (2, 2), g + ".lokr_w2": (8, 4, 3, 3)}, "F32"))
    t.update(rng_parts(rng, {h + ".lokr_w1": (2, 4), h + ".lokr_w2_a": (8, 2), h + ".lokr_w2_b": (2, 4 * 9)}, "F32"))
    t[h + ".alpha"] = ("F16", np.array(1.0))
    write_st(f("lokr.safetensors"), t, lycoris_metadata("lokr", 4, 2, {"factor": "4", "decompose_both": "False"}))

    for k in (3, 12):
        res = reduce(f("lokr.safetensors"), f("lokr-r%d.safetensors" % k), "rank=%d" % k)
        check(res.returncode == 0, "lokr rank=%d exits 0: %s" % (k, res.stderr))
        if res.returncode != 0:
            continue
        out, meta = read_st(f("lokr-r%d.safetensors" % k))
        check_module("lokr w1 + w2_a/_b f16 k=%d" % k, t, out, a, lokr_delta, k, [k, 80], [96, k])
        check_module("lokr full w1, w2 bf16 k=%d" % k, t, out, b, lokr_delta, k, [k, 72], [64, k])
        check_module("lokr decompose_both k=%d" % k, t, out, d, lokr_delta, min(k, 4), [min(k, 4), 128], [128, min(k, 4)])
        check_module("lokr tucker conv k=%d" % k, t, out, e, lokr_delta, min(k, 6), [min(k, 6), 16, 3, 3], [32, min(k, 6), 1, 1])
        check_module("lokr full 4-D w2 conv k=%d" % k, t, out, g, lokr_delta, k, [k, 8, 3, 3], [16, k, 1, 1])
        check_module("lokr flattened conv k=%d" % k, t, out, h, lokr_delta, min(k, 4), [min(k, 4), 144], [16, min(k, 4)])
        check(not any(".lokr_" in n for n in out), "lokr: no lokr_ part left")

    # pad=true pads them to the rank asked for instead
    res = reduce(f("lokr.safetensors"), f("lokr-pad.safetensors"), "rank=12", "pad=true")
    check(res.returncode == 0, "lokr pad=true exits 0: %s" % res.stderr)
    if res.returncode == 0:
        out, _ = read_st(f("lokr-pad.safetensors"))
        check_module("lokr decompose_both padded", t, out, d, lokr_delta, 12, [12, 128], [128, 12])

    # ---- lora-synth's LoHa and LoKr files mean what the oracle reads ------------
    for fmt, extra, delta_fn, k in (("loha", [], loha_delta, 5), ("lokr", ["factor=4"], lokr_delta, 6)):
        src = f("synth-%s.safetensors" % fmt)
        res = run("launch", "lora-synth", "preset=sd15-unet", "format=" + fmt, "rank=3", "alpha=2",
                  "dtype=f32", *extra, "!", "safetensors-sink", "location=" + src)
        check(res.returncode == 0, "lora-synth format=%s: %s" % (fmt, res.stderr))
        res = reduce(src, f("synth-%s-r%d.safetensors" % (fmt, k)), "rank=%d" % k)
        check(res.returncode == 0, "synth %s rank=%d exits 0: %s" % (fmt, k, res.stderr))
        if res.returncode != 0:
            continue
        inp, _ = read_st(src)
        out, _ = read_st(f("synth-%s-r%d.safetensors" % (fmt, k)))
        for name, dn, up in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
                             ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0", 1280, 1280)):
            check_module("synth %s %s" % (fmt, name), inp, out, name, delta_fn, k, [k, dn], [up, k])

    # ---- a rank chosen per module from the whole update's spectrum -------------
    # energy: the smallest k whose sigma_1..k hold the fraction of sum sigma^2
    # (as lora-svd energy= on plain modules), within max-rank
    for src, delta_fn, names in ((f("loha.safetensors"), loha_delta, (q, v, c, cf, w)),
                                 (f("lokr.safetensors"), lokr_delta, (a, b, d, e, g, h))):
        inp, _ = read_st(src)
        for props in (("energy=0.9",), ("energy=0.99", "max-rank=5")):
            dst = src.replace(".safetensors", "-dyn.safetensors")
            res = reduce(src, dst, *props)
            check(res.returncode == 0, "%s %s exits 0: %s" % (os.path.basename(src), props, res.stderr))
            if res.returncode != 0:
                continue
            out, _ = read_st(dst)
            fraction = float(props[0].split("=")[1])
            cap = int(props[1].split("=")[1]) if len(props) > 1 else None
            for name in names:
                dd = delta_fn(parts_of(inp), name)
                sv = np.linalg.svd(dd, compute_uv=False)
                energy = np.cumsum(sv ** 2) / np.sum(sv ** 2)
                want = int(np.searchsorted(energy, fraction * (1 - 1e-9)) + 1)
                if cap:
                    want = min(want, cap)
                got = out[name + ".lora_down.weight"][1].shape[0]
                # rounding of the stored parts may move a sigma across the line
                near = abs(energy[min(got, len(energy)) - 1] - fraction) < 1e-3
                check(got == want or near, "%s %s %s: rank %d, numpy's choice %d" % (os.path.basename(src), props, name, got, want))
                check_module("%s %s %s" % (os.path.basename(src), props, name), inp, out, name, delta_fn, got,
                             list(out[name + ".lora_down.weight"][1].shape), list(out[name + ".lora_up.weight"][1].shape))

    # ---- refused by name -------------------------------------------------------
    def refused(label, tensors, needle, *props):
        path, outp = f(label + ".safetensors"), f(label + "-out.safetensors")
        write_st(path, tensors, lycoris_metadata("lokr", 4, 2))
        res = reduce(path, outp, *(props or ("rank=2",)))
        check(res.returncode != 0, "%s: refused (exit %d)" % (label, res.returncode))
        check(all(x in res.stderr for x in needle), "%s: message names %s: %s" % (label, needle, res.stderr.strip()))
        check(not os.path.exists(outp), "%s: nothing written" % label)

    base = rng_parts(rng, {a + ".lokr_w1": (4, 4), a + ".lokr_w2_a": (24, 4), a + ".lokr_w2_b": (4, 20)}, "F32")
    refused("lokr-t1", dict(base, **rng_parts(rng, {a + ".lokr_t1": (4, 4, 1, 1)}, "F32")), [a, "lokr_t1"])
    refused("lokr-dora", dict(base, **rng_parts(rng, {a + ".dora_scale": (96, 1)}, "F32")), [a, "dora_scale"])
    amb = rng_parts(rng, {d + ".lokr_w1_a": (8, 2), d + ".lokr_w1_b": (2, 8),
                          d + ".lokr_w2_a": (16, 3), d + ".lokr_w2_b": (3, 16)}, "F32")
    amb[d + ".alpha"] = ("F16", np.array(1.0))
    refused("lokr-ambiguous", amb, [d, "lokr_w1_b", "lokr_w2_b", "ambiguous"])
    half = {n: x for n, x in rng_parts(rng, {q + ".hada_w1_a": (96, 4), q + ".hada_w1_b": (4, 80),
                                             q + ".hada_w2_a": (96, 4)}, "F32").items()}
    refused("loha-missing", half, [q, "hada_w2_b", "missing"])
    # parts read as stored (bf16, f16) are checked before the Khatri–Rao factors are formed
    for dt, bad_value, part in (("BF16", np.nan, "hada_w2_a"), ("F16", np.inf, "hada_w1_b")):
        loha = rng_parts(rng, {q + ".hada_w1_a": (96, 4), q + ".hada_w1_b": (4, 80),
                               q + ".hada_w2_a": (96, 4), q + ".hada_w2_b": (4, 80)}, dt)
        bad = loha[q + "." + part][1].copy()
        bad.flat[7] = bad_value
        loha[q + "." + part] = (dt, bad)
        refused("loha-nonfinite-" + dt, loha, [q, "NaN or infinity", part])
    refused("lokr-budget", base, ["LyCORIS", "budget"], "budget=100000")
    refused("lokr-randomized", base, ["LyCORIS", "method=randomized"], "rank=2", "method=randomized", "seed=1")
    nan = dict(base)
    bad = base[a + ".lokr_w2_b"][1].copy()
    bad[1, 2] = np.nan
    nan[a + ".lokr_w2_b"] = ("F32", bad)
    refused("lokr-nan", nan, [a, "NaN", "lokr_w2_b"])

    if FAILURES:
        print("%d failure(s)" % len(FAILURES))
        sys.exit(1)
    print("all LyCORIS checks passed")


if __name__ == "__main__":
    main()
