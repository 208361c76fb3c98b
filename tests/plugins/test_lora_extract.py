#!/usr/bin/python3
# test_lora_extract.py: lora-extract against numpy
#
# The test makes its own base/tuned pairs: a base with Hugging Face llama
# and diffusers UNet names and shapes (scaled down), and a tuned copy =
# base + a known low-rank update + small noise, so the optimum is known.
# numpy's dense SVD of D = tuned - base is the oracle: the exact method must
# reach the Eckart-Young error (within 1e-4 relative for f32 weights; within
# the output dtype's rounding for bf16 ones), the randomized one the error of
# numpy's own randomized SVD with the same sketch size and power iterations.
# The names follow PEFT (base_model.model.<module>.lora_A.weight, an
# adapter_config.json whose target_modules PEFT's check_target_module_exists
# matches) and kohya (networks/lora.py: lora_unet_<path with '_'>.lora_down
# .weight with an .alpha; extract_lora_from_models.py's ss_network_* keys).
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

LPIPE = os.environ["LPIPE"]
PIPELINE = os.path.join(os.environ["LPIPE_SOURCE_ROOT"], "pipelines", "extract-lora.pipeline")
FAILURES = []
EPS = {"BF16": 2.0 ** -8, "F32": 2.0 ** -24}


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def bf16_bits(x):
    """round to nearest even, as a uint16 array"""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_st(path, tensors, dtype="F32"):
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        raw = (bf16_bits(x) if dtype == "BF16" else np.ascontiguousarray(x, np.float32)).tobytes()
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
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
        raw = data[8 + n + b: 8 + n + e]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, np.float32)
        out[name] = (info["dtype"], x.astype(np.float64).reshape(info["shape"]))
    return out, meta


def as_stored(x, dtype):
    """x as the file holds it, in f64"""
    if dtype == "BF16":
        return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(x, np.float32).astype(np.float64)


LLAMA = {  # a llama layer's projections, width 256, MLP 512
    "model.layers.0.self_attn.q_proj.weight": (256, 256),
    "model.layers.0.self_attn.v_proj.weight": (64, 256),
    "model.layers.0.mlp.up_proj.weight": (512, 256),
    "model.layers.0.mlp.down_proj.weight": (256, 512),
}
UNET = {  # a diffusers UNet attention and a conv
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "down_blocks.0.resnets.0.conv1.weight": (64, 32, 3, 3),
}


def make_pair(tmp, layout, dtype, seed, delta_rank=6, noise=1e-3):
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for name, shape in layout.items():
        w = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
        o, i = shape[0], int(np.prod(shape[1:]))
        s = 0.05 * 0.6 ** np.arange(delta_rank)
        u = np.linalg.qr(rng.normal(size=(o, delta_rank)))[0]
        v = np.linalg.qr(rng.normal(size=(i, delta_rank)))[0]
        d = (u * s) @ v.T + noise * 0.05 * rng.normal(size=(o, i)) / np.sqrt(i)
        base[name] = w.astype(np.float32)
        tuned[name] = (w + d.reshape(shape)).astype(np.float32)
    # a norm that changed (1-D: no LoRA form) and one that did not
    base["model.norm.weight"] = np.ones(256, np.float32)
    tuned["model.norm.weight"] = np.ones(256, np.float32) * 1.01
    base["model.embed_tokens.weight"] = tuned["model.embed_tokens.weight"] = \
        rng.normal(size=(100, 256)).astype(np.float32)
    bp, tp = os.path.join(tmp, "base-%d.safetensors" % seed), os.path.join(tmp, "tuned-%d.safetensors" % seed)
    write_st(bp, base, dtype)
    write_st(tp, tuned, dtype)
    diffs = {n: (as_stored(tuned[n], dtype) - as_stored(base[n], dtype)).reshape(layout[n][0], -1)
             for n in layout}
    return bp, tp, diffs


def run(*args, expect_ok=True):
    p = subprocess.run([LPIPE] + list(args), capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError("lpipe %s failed: %s" % (" ".join(args), p.stderr))
    return p


def extract(base, tuned, out, *props, expect_ok=True):
    return run("run", PIPELINE, "base=" + base, "tuned=" + tuned, "output=" + out, *props,
               expect_ok=expect_ok)


def optimum(d, k):
    s = np.linalg.svd(d, compute_uv=False)
    return np.sqrt((s[k:] ** 2).sum() / (s ** 2).sum())


def numpy_randomized(d, l, niter, k, seed):
    """Halko et al. with re-orthonormalization, as lpipe's documentation says"""
    rng = np.random.default_rng(seed)
    y = d @ rng.normal(size=(d.shape[1], l))
    for _ in range(niter):
        q = np.linalg.qr(y)[0]
        z = np.linalg.qr(d.T @ q)[0]
        y = d @ z
    q = np.linalg.qr(y)[0]
    ub, s, vt = np.linalg.svd(q.T @ d, full_matrices=False)
    approx = (q @ ub[:, :k] * s[:k]) @ vt[:k]
    return np.linalg.norm(d - approx) / np.linalg.norm(d)


def peft_update(tensors, module):
    a = tensors["base_model.model.%s.lora_A.weight" % module][1]
    b = tensors["base_model.model.%s.lora_B.weight" % module][1]
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1), a.shape[0]


def check_exact(tmp):
    base, tuned, diffs = make_pair(tmp, LLAMA, "F32", 1)
    out = os.path.join(tmp, "exact.safetensors")
    p = extract(base, tuned, out, "rank=4", "method=exact")
    tensors, meta = read_st(out)
    config = json.load(open(out[: -len(".safetensors")] + ".adapter_config.json"))
    check(config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA",
          "exact: PEFT config r = lora_alpha = 4 (scale 1)")
    modules = sorted(n[: -len(".weight")] for n in LLAMA)
    check(sorted(config["target_modules"]) == modules, "exact: target_modules name the extracted modules")
    check(len(tensors) == 2 * len(LLAMA), "exact: two factors per changed 2-D weight, nothing else")
    for name, d in diffs.items():
        module = name[: -len(".weight")]
        delta, r = peft_update(tensors, module)
        err = np.linalg.norm(d - delta) / np.linalg.norm(d)
        opt = optimum(d, 4)
        check(r == 4, "exact: rank 4 for %s" % module)
        check(err <= opt * (1 + 1e-4), "exact: %s error %.6e within 1e-4 of optimal %.6e" % (module, err, opt))
    check("1 unchanged" in p.stderr and "not 2-D or 4-D" in p.stderr and "model.norm.weight" in p.stderr,
          "exact: the unchanged and the dropped 1-D tensor are reported (%r)" % p.stderr)


def check_randomized(tmp):
    base, tuned, diffs = make_pair(tmp, LLAMA, "F32", 2)
    out = os.path.join(tmp, "rand.safetensors")
    extract(base, tuned, out, "rank=4", "method=randomized")  # niter 2, oversample 8 by default
    tensors, _ = read_st(out)
    for name, d in diffs.items():
        delta, _ = peft_update(tensors, name[: -len(".weight")])
        err = np.linalg.norm(d - delta) / np.linalg.norm(d)
        # numpy's randomized SVD with the same sketch (4 + 8) and niter, the
        # worst of three draws, and the optimum it cannot beat
        ref = max(numpy_randomized(d, 12, 2, 4, seed) for seed in range(3))
        check(optimum(d, 4) * (1 - 1e-9) <= err <= ref * (1 + 1e-3),
              "randomized: %s error %.6e within numpy's %.6e" % (name, err, ref))

    # the same bytes on one thread and on two
    one, two = os.path.join(tmp, "t1.safetensors"), os.path.join(tmp, "t2.safetensors")
    run("--threads", "1", "run", PIPELINE, "base=" + base, "tuned=" + tuned, "output=" + one, "rank=4")
    run("--threads", "2", "run", PIPELINE, "base=" + base, "tuned=" + tuned, "output=" + two, "rank=4")
    # (the files differ only in the provenance, which names the output)
    a, b = read_st(one)[0], read_st(two)[0]
    check(a.keys() == b.keys() and all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a),
          "randomized: the same tensors, bit for bit, on 1 and 2 threads")


def check_kohya_bf16(tmp):
    base, tuned, diffs = make_pair(tmp, UNET, "BF16", 3)
    out = os.path.join(tmp, "kohya.safetensors")
    extract(base, tuned, out, "rank=4", "method=exact", "format=kohya")
    tensors, meta = read_st(out)
    check(meta.get("ss_network_module") == "networks.lora" and meta.get("ss_network_dim") == "4"
          and meta.get("ss_network_alpha") == "4", "kohya: ss_network_* metadata (%r)" % meta)
    for name, d in diffs.items():
        stem = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        down = tensors[stem + ".lora_down.weight"]
        up = tensors[stem + ".lora_up.weight"]
        alpha = tensors[stem + ".alpha"]
        check(down[0] == "BF16" and up[0] == "BF16", "kohya: factors in the model's dtype")
        check(alpha[0] == "F32" and float(alpha[1]) == 4.0, "kohya: alpha 4 in f32")
        shape = UNET[name]
        want_down = [4] + list(shape[1:])
        want_up = [shape[0], 4] + ([1, 1] if len(shape) == 4 else [])
        check(list(down[1].shape) == want_down and list(up[1].shape) == want_up,
              "kohya: LoCon layout for %s" % stem)
        r = down[1].shape[0]
        delta = float(alpha[1]) / r * up[1].reshape(up[1].shape[0], r) @ down[1].reshape(r, -1)
        err = np.linalg.norm(d - delta) / np.linalg.norm(d)
        opt = optimum(d, 4)
        # bf16 factors round each value at 2^-8: the update moves by about that much of itself
        slack = 4 * EPS["BF16"] * np.sqrt(1 - opt ** 2)
        check(err <= opt + slack, "kohya: %s error %.4e within bf16 rounding of optimal %.4e" % (stem, err, opt))


def check_dynamic(tmp):
    base, tuned, diffs = make_pair(tmp, LLAMA, "F32", 4)
    out = os.path.join(tmp, "dynamic.safetensors")
    pipeline = os.path.join(tmp, "dynamic.pipeline")
    json.dump({"lpipe": 1, "stages": [
        {"id": "b", "stage": "safetensors-source", "location": base},
        {"id": "t", "stage": "safetensors-source", "location": tuned},
        {"stage": "lora-extract", "inputs": ["b", "t"], "method": "exact", "energy": 0.99,
         "max-rank": 8, "exclude": ["*v_proj*"]},
        {"stage": "safetensors-sink", "location": out}]}, open(pipeline, "w"))
    p = run("run", pipeline)
    tensors, _ = read_st(out)
    config = json.load(open(out[: -len(".safetensors")] + ".adapter_config.json"))
    check("1 excluded" in p.stderr, "dynamic: the excluded weight is reported")
    check(not any("v_proj" in n for n in tensors), "dynamic: exclude is honoured")
    ranks = {}
    for name, d in diffs.items():
        if "v_proj" in name:
            continue
        module = name[: -len(".weight")]
        _, r = peft_update(tensors, module)
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        want = min(int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.99) + 1), 8)
        check(r == want, "dynamic: %s rank %d, energy 0.99 needs %d" % (module, r, want))
        ranks[module] = r
    # PEFT reads each module's rank from r or its ^-anchored rank_pattern key
    # (peft/tuners/tuners_utils.py get_pattern_key: re.match(rf"(.*\.)?({key})$", name))
    for module, r in ranks.items():
        got = config["r"]
        for key, value in config["rank_pattern"].items():
            if re.match(r"(.*\.)?(%s)$" % key, module):
                got = value
                break
        check(got == r, "dynamic: PEFT sees rank %d for %s (config gives %d)" % (r, module, got))


def check_errors(tmp):
    base, tuned, _ = make_pair(tmp, {"model.layers.0.mlp.up_proj.weight": (512, 256)}, "F32", 5)
    out = os.path.join(tmp, "bad.safetensors")

    p = extract(base, base, out, expect_ok=False)
    check(p.returncode == 1 and "nothing to extract" in p.stderr and not os.path.exists(out),
          "errors: identical models are an error, nothing written (%r)" % p.stderr)

    other = os.path.join(tmp, "other.safetensors")
    write_st(other, {"model.layers.0.mlp.up_proj.weight": np.zeros((256, 512), np.float32),
                     "model.norm.weight": np.ones(256, np.float32),
                     "model.embed_tokens.weight": np.zeros((100, 256), np.float32)})
    p = extract(base, other, out, expect_ok=False)
    check(p.returncode == 1 and "model.layers.0.mlp.up_proj.weight" in p.stderr and "shape" in p.stderr,
          "errors: a shape mismatch names the tensor (%r)" % p.stderr)

    fewer = os.path.join(tmp, "fewer.safetensors")
    write_st(fewer, {"model.layers.0.mlp.up_proj.weight": np.zeros((512, 256), np.float32)})
    p = extract(base, fewer, out, expect_ok=False)
    check(p.returncode == 1 and "model.norm.weight" in p.stderr and "not in the tuned" in p.stderr,
          "errors: a tensor missing from the tuned model is named (%r)" % p.stderr)

    tensors, _ = read_st(tuned)
    nan = {n: t[1].astype(np.float32) for n, t in tensors.items()}
    nan["model.layers.0.mlp.up_proj.weight"][3, 7] = np.nan
    nan_path = os.path.join(tmp, "nan.safetensors")
    write_st(nan_path, nan)
    p = extract(base, nan_path, out, "method=exact", expect_ok=False)
    check(p.returncode == 1 and "model.layers.0.mlp.up_proj.weight" in p.stderr and "NaN" in p.stderr,
          "errors: NaN is named with its tensor (%r)" % p.stderr)
    check(not os.path.exists(out), "errors: nothing written")

    pipeline = os.path.join(tmp, "bad.pipeline")
    json.dump({"lpipe": 1, "stages": [
        {"id": "b", "stage": "safetensors-source", "location": base},
        {"id": "t", "stage": "safetensors-source", "location": tuned},
        {"stage": "lora-extract", "inputs": ["b", "t"], "energy": 0.9},
        {"stage": "safetensors-sink", "location": out}]}, open(pipeline, "w"))
    p = run("run", pipeline, expect_ok=False)
    check(p.returncode != 0 and "method=exact" in p.stderr, "errors: dynamic ranks need method=exact")

    # options that would have no effect together are refused, nothing written
    def custom(props, quiet=True):
        json.dump({"lpipe": 1, "stages": [
            {"id": "b", "stage": "safetensors-source", "location": base},
            {"id": "t", "stage": "safetensors-source", "location": tuned},
            dict({"stage": "lora-extract", "inputs": ["b", "t"]}, **props),
            {"stage": "safetensors-sink", "location": out}]}, open(pipeline, "w"))
        return run(*(["-q"] if quiet else []), "run", pipeline, expect_ok=False)
    for props, needle in (({"method": "exact", "energy": 0.9, "rank": 8},
                           "stage 3 'lora-extract': rank=8 would have no effect: energy and sv-* choose "
                           "each weight's rank; bound it with max-rank=8 instead"),
                          ({"method": "exact", "rank": 8, "seed": 3},
                           "stage 3 'lora-extract': seed would have no effect: niter, oversample and seed "
                           "steer method=randomized"),
                          ({"method": "exact", "rank": 8, "niter": 1}, "niter would have no effect")):
        p = custom(props)
        check(p.returncode == 1 and needle in p.stderr and not os.path.exists(out),
              "errors: %s refused, nothing written (%r)" % (props, p.stderr))
    # a rank beyond a weight's smaller side: told once, extracted at full rank
    p = custom({"method": "exact", "rank": 300}, quiet=False)
    needle = ("lpipe: warning: stage 3 'lora-extract': 1 of 1 weights have a side shorter than rank=300: "
              "extracted at their full rank (256), which no rank can exceed")
    check(p.returncode == 0 and p.stderr.count(needle) == 1, "errors: rank 300 > 256 is told once (%r)" % p.stderr)
    tensors, _ = read_st(out)
    check(tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"][1].shape[0] == 256,
          "errors: written at rank 256")
    p = custom({"method": "exact", "rank": 300})
    check(p.returncode == 0 and p.stderr == "", "errors: -q silences the warning (%r)" % p.stderr)
    os.unlink(out)


def check_mixed_dtypes(tmp):
    """a bf16 base and an f32 tuned model (a fine-tune saved in full
    precision): the difference of the stored values, factors in the tuned
    model's dtype"""
    rng = np.random.default_rng(7)
    shape = (128, 96)
    w = rng.normal(size=shape) / np.sqrt(96)
    d = (rng.normal(size=(128, 3)) * [0.3, 0.2, 0.1]) @ rng.normal(size=(3, 96)) / 10
    base, tuned = os.path.join(tmp, "mixed-base.safetensors"), os.path.join(tmp, "mixed-tuned.safetensors")
    write_st(base, {"model.layers.0.mlp.gate_proj.weight": w}, "BF16")
    write_st(tuned, {"model.layers.0.mlp.gate_proj.weight": w + d}, "F32")
    diff = as_stored(w + d, "F32") - as_stored(w, "BF16")
    out = os.path.join(tmp, "mixed.safetensors")
    extract(base, tuned, out, "rank=3", "method=exact")
    tensors, _ = read_st(out)
    delta, r = peft_update(tensors, "model.layers.0.mlp.gate_proj")
    check(tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"][0] == "F32",
          "mixed: factors in the tuned model's f32")
    err = np.linalg.norm(diff - delta) / np.linalg.norm(diff)
    check(err <= optimum(diff, 3) * (1 + 1e-4), "mixed: the optimum of the stored difference")


def check_chain(tmp):
    """pipelines/extract-reduce-check.pipeline: extract at rank 64, keep 0.99
    of each module's energy, report"""
    base, tuned, diffs = make_pair(tmp, LLAMA, "F32", 6)
    out, report = os.path.join(tmp, "chain.safetensors"), os.path.join(tmp, "chain.json")
    run("run", os.path.join(os.path.dirname(PIPELINE), "extract-reduce-check.pipeline"),
        "base=" + base, "tuned=" + tuned, "output=" + out, "report=" + report)
    tensors, _ = read_st(out)
    rep = json.load(open(report))
    check(rep["summary"]["n_modules"] == len(diffs), "chain: every changed weight reported")
    for name, d in diffs.items():
        stem = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        down = tensors[stem + ".lora_down.weight"][1]
        up = tensors[stem + ".lora_up.weight"][1]
        alpha = float(tensors[stem + ".alpha"][1])
        r = down.shape[0]
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        want = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.99) + 1)
        check(r == want, "chain: %s keeps rank %d for 0.99 of its energy (%d)" % (stem, want, r))
        delta = alpha / r * up @ down
        err = np.linalg.norm(d - delta) / np.linalg.norm(d)
        check(err <= optimum(d, r) * (1 + 1e-3), "chain: %s at its rank's optimum" % stem)
        # rank-check measures the reduction against its input, the rank-64 extraction
        row = [m for m in rep["modules"] if m["name"] == stem][0]
        want_err = np.sqrt(s2[r:64].sum() / s2[:64].sum())
        check(abs(row["rel_error"] - want_err) <= 0.01 * want_err + 1e-6,
              "chain: rank-check reports %s's error %.4e against the extraction (%.4e)"
              % (stem, row["rel_error"], want_err))


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-extract-")
    try:
        check_exact(tmp)
        check_randomized(tmp)
        check_kohya_bf16(tmp)
        check_dynamic(tmp)
        check_errors(tmp)
        check_chain(tmp)
        check_mixed_dtypes(tmp)
    finally:
        shutil.rmtree(tmp)
    if FAILURES:
        print("%d checks failed" % len(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
