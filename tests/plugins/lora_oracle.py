#!/usr/bin/python3
"""Independent numpy checks of LoRA files written by the transform stages.

Every module is read back into its update delta = scale * B @ A and compared in
factored form (Gram matrices of the thin factors), so model-sized modules cost
r x r products, not out x in ones. Modules are matched across conventions by a
canonical key: the module path with the convention's prefix dropped and dots
turned into underscores; kohya's fused Flux modules are split into their parts
by row blocks, which is what fusing means.

  same A B                   every module's update is the same in A and B
  scale OUT IN FACTOR        OUT's updates are FACTOR times IN's
  merge OUT W1 IN1 W2 IN2..  OUT's updates are sum_i W_i * IN_i's (missing = 0)
  svd OUT K W1 IN1 [W2 IN2..] OUT has rank <= K and reaches the SVD optimum of
                             sum_i W_i * IN_i

Tolerances follow from the dtypes of the factors (their machine epsilon).
"""
import json
import os
import re
import struct
import sys

import numpy as np

EPS = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    tensors, dtypes = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        b, e = entry["data_offsets"]
        raw = data[base + b:base + e]
        dt = entry["dtype"]
        if dt == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4")
        else:
            arr = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dt])
        tensors[name] = arr.astype(np.float64).reshape(entry["shape"])
        dtypes[name] = dt
    config = None
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    if os.path.exists(stem + ".adapter_config.json"):
        with open(stem + ".adapter_config.json") as f:
            config = json.load(f)
    return tensors, dtypes, config


# kohya Flux (BFL) layers: key below the block -> (diffusers parts, widths in hidden sizes)
FLUX_DOUBLE = {
    "img_attn_qkv": (["attn_to_q", "attn_to_k", "attn_to_v"], [1, 1, 1]),
    "img_attn_proj": (["attn_to_out_0"], None),
    "img_mlp_0": (["ff_net_0_proj"], None),
    "img_mlp_2": (["ff_net_2"], None),
    "img_mod_lin": (["norm1_linear"], None),
    "txt_attn_qkv": (["attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"], [1, 1, 1]),
    "txt_attn_proj": (["attn_to_add_out"], None),
    "txt_mlp_0": (["ff_context_net_0_proj"], None),
    "txt_mlp_2": (["ff_context_net_2"], None),
    "txt_mod_lin": (["norm1_context_linear"], None),
}
FLUX_SINGLE = {
    "linear1": (["attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp"], [1, 1, 1, 4]),
    "linear2": (["proj_out"], None),
    "modulation_lin": (["norm_linear"], None),
}

PREFIXES = [("base_model.model.", ""), ("unet.", ""), ("transformer.", ""),
            ("text_encoder_2.", "te2:"), ("text_encoder.", "te:"),
            ("lora_unet_", ""), ("lora_te2_", "te2:"), ("lora_te1_", "te:"), ("lora_te_", "te:")]


def get_pattern_key(pattern_keys, key_to_match):
    """PEFT utils/other.py get_pattern_key: the first key K for which
    (.*\\.)?(K)$ matches the module's name"""
    for key in pattern_keys:
        if re.match(r"(.*\.)?(%s)$" % key, key_to_match):
            return key
    return key_to_match


def canonical(name):
    for prefix, tag in PREFIXES:
        if name.startswith(prefix):
            return tag + name[len(prefix):].replace(".", "_")
    return name.replace(".", "_")


def modules(path):
    tensors, dtypes, config = load(path)
    found = {}
    for name in tensors:
        for down_s, up_s, conv in ((".lora_A.weight", ".lora_B.weight", "ab"),
                                   (".lora_down.weight", ".lora_up.weight", "kohya")):
            if name.endswith(down_s):
                mod = name[:-len(down_s)]
                a = tensors[name]
                b = tensors[mod + up_s]
                a = a.reshape(a.shape[0], -1)
                b = b.reshape(b.shape[0], -1)
                r = a.shape[0]
                if conv == "kohya":
                    alpha = tensors.get(mod + ".alpha")
                    scale = float(alpha.reshape(-1)[0]) / r if alpha is not None else 1.0
                elif config is not None:
                    key = mod[len("base_model.model."):]
                    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
                    lr = rp.get(get_pattern_key(rp, key), config["r"])
                    la = ap.get(get_pattern_key(ap, key), config["lora_alpha"])
                    assert lr == r, (mod, lr, r)
                    scale = la / r
                else:
                    scale = 1.0
                eps = max(EPS[dtypes[name]], EPS[dtypes[mod + up_s]])
                found[mod] = (b, a, scale, eps)
    out = {}
    for mod, (b, a, scale, eps) in found.items():
        key = canonical(mod)
        parts = None
        for table, block in ((FLUX_DOUBLE, "double_blocks_"), (FLUX_SINGLE, "single_blocks_")):
            if key.startswith(block):
                idx, leaf = key[len(block):].split("_", 1)
                if leaf in table:
                    names, widths = table[leaf]
                    group = "transformer_blocks_" if block == "double_blocks_" else "single_transformer_blocks_"
                    parts = [(group + idx + "_" + n, w) for n, w in zip(names, widths or [None])]
        if parts is None:
            assert key not in out, key
            out[key] = (b, a, scale, eps)
            continue
        hidden = a.shape[1]
        row = 0
        for part, width in parts:
            rows = b.shape[0] if width is None else width * hidden
            assert part not in out, part
            out[part] = (b[row:row + rows], a, scale, eps)
            row += rows
        assert row == b.shape[0], (mod, row, b.shape)
    return out


def inner(x, y):
    """<sx Bx Ax, sy By Ay>_F from r x r products."""
    bx, ax, sx = x[0], x[1], x[2]
    by, ay, sy = y[0], y[1], y[2]
    return sx * sy * np.sum((bx.T @ by) * (ax @ ay.T))


def diff_norm2(xs, ys):
    """||sum xs - sum ys||^2 for lists of factored updates."""
    total = 0.0
    terms = [(t, 1.0) for t in xs] + [(t, -1.0) for t in ys]
    for t, c in terms:
        for u, d in terms:
            total += c * d * inner(t, u)
    return max(total, 0.0)


def norm2(xs):
    return diff_norm2(xs, [])


def check_close(key, got, want, eps, factor=8.0):
    err = np.sqrt(diff_norm2(got, want))
    ref = np.sqrt(max(norm2(want), norm2(got)))
    tol = factor * eps * ref + 1e-30
    if not err <= tol:
        sys.exit("module %s: |got - want| = %.3e > %.3e (|want| = %.3e)" % (key, err, tol, ref))
    return err / ref if ref > 0 else 0.0


def cmd_same(a_path, b_path):
    a, b = modules(a_path), modules(b_path)
    if set(a) != set(b):
        sys.exit("module sets differ: only in A %s, only in B %s"
                 % (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]))
    worst = 0.0
    for key in a:
        worst = max(worst, check_close(key, [b[key]], [a[key]], max(a[key][3], b[key][3])))
    print("%d modules, worst relative error %.3e" % (len(a), worst))


def scaled(t, c):
    return (t[0], t[1], t[2] * c, t[3])


def cmd_scale(out_path, in_path, factor):
    out, inp = modules(out_path), modules(in_path)
    assert set(out) == set(inp)
    for key in out:
        check_close(key, [out[key]], [scaled(inp[key], factor)], max(out[key][3], inp[key][3]))
    print("%d modules scaled by %g" % (len(out), factor))


def cmd_merge(out_path, pairs):
    out = modules(out_path)
    inputs = [(w, modules(p)) for w, p in pairs]
    keys = set()
    for _, m in inputs:
        keys |= set(m)
    if keys != set(out):
        sys.exit("merged module set differs from the union of the inputs")
    for key in keys:
        want = [scaled(m[key], w) for w, m in inputs if key in m]
        eps = max([out[key][3]] + [t[3] for t in want])
        check_close(key, [out[key]], want, eps, factor=8.0 * len(want))
    print("%d modules merged" % len(keys))


def cmd_svd(out_path, k, pairs):
    out = modules(out_path)
    inputs = [(w, modules(p)) for w, p in pairs]
    keys = set()
    for _, m in inputs:
        keys |= set(m)
    if keys != set(out):
        sys.exit("reduced module set differs from the union of the inputs")
    for key in keys:
        parts = [(w, m[key]) for w, m in inputs if key in m]
        # the weighted sum, stacked: B = [w_i s_i B_i], A = [A_i]
        b = np.hstack([w * t[2] * t[0] for w, t in parts])
        a = np.vstack([t[1] for _, t in parts])
        eps = max([t[3] for _, t in parts])
        qb, rb = np.linalg.qr(b)
        qa, ra = np.linalg.qr(a.T)
        sigma = np.linalg.svd(rb @ ra.T, compute_uv=False)
        optimum = np.sqrt(np.sum(sigma[k:] ** 2))
        got = out[key]
        if got[1].shape[0] > k:
            sys.exit("module %s: rank %d > %d" % (key, got[1].shape[0], k))
        err = np.sqrt(diff_norm2([got], [(b, a, 1.0, eps)]))
        tol = 8.0 * max(eps, got[3]) * np.sqrt(np.sum(sigma ** 2))
        if not abs(err - optimum) <= tol:
            sys.exit("module %s: error %.6e, SVD optimum %.6e (tol %.1e)" % (key, err, optimum, tol))
    print("%d modules at the rank-%d SVD optimum" % (len(keys), k))


def main(argv):
    cmd = argv[1]
    if cmd == "same":
        cmd_same(argv[2], argv[3])
    elif cmd == "scale":
        cmd_scale(argv[2], argv[3], float(argv[4]))
    elif cmd == "merge":
        rest = argv[3:]
        cmd_merge(argv[2], [(float(rest[i]), rest[i + 1]) for i in range(0, len(rest), 2)])
    elif cmd == "svd":
        rest = argv[4:]
        cmd_svd(argv[2], int(argv[3]), [(float(rest[i]), rest[i + 1]) for i in range(0, len(rest), 2)])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main(sys.argv)
