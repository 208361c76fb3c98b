#!/usr/bin/python3
# test_lora_rank.py: lora-svd, lora-project and rank-check against numpy
#
# Runs the lpipe CLI ($LPIPE) on synthetic and real LoRA files and checks the
# outputs with an independent numpy reader and numpy's dense SVD: the exact
# SVD reaches the Eckart-Young optimum, the randomized one gets close, the
# projection is A' = R A, B' = B R^T for the R it drew, scales survive.
# Tolerances follow from the dtype the factors are stored in.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import re
import struct
import subprocess
import sys
import atexit
import shutil
import tempfile

import numpy as np

LPIPE = os.environ["LPIPE"]
SAMPLES = os.path.join(os.environ.get("LPIPE_SHARED_DIR", "/nonexistent"), "lora-samples")
PIPELINES = os.path.join(os.environ["LPIPE_SOURCE_ROOT"], "pipelines")
EPS = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}

# ---- safetensors, by hand ---------------------------------------------------


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = data[base + b: base + e]
        dt = info["dtype"]
        if dt == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt])
        tensors[name] = (dt, x.astype(np.float64).reshape(info["shape"]), raw)
    return tensors, meta


def write_st(path, tensors):
    """tensors: name -> float32 array"""
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


SUFFIXES = [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
            ("_lora.down.weight", "_lora.up.weight"), (".lora_down.weight", ".lora_up.weight"),
            (":down", ":up")]


def modules(tensors, custom=None):
    """module name -> (down name, up name, alpha name or None)"""
    pairs = SUFFIXES if custom is None else [custom]
    out = {}
    for name in tensors:
        for down, up in pairs:
            if custom is not None:
                m = re.fullmatch(down.replace("*", "(.*)"), name)
                if m:
                    out[m.group(1)] = (name, up.replace("*", m.group(1)), None)
            elif name.endswith(down):
                stem = name[: -len(down)]
                alpha = stem + ".alpha" if down == ".lora_down.weight" and stem + ".alpha" in tensors else None
                out[stem] = (name, stem + up, alpha)
    return out


def peft_scales(config, mods):
    cfg = json.loads(config)
    scales = {}
    for stem in mods:
        key = stem[len("base_model.model."):] if stem.startswith("base_model.model.") else stem
        r, alpha = cfg["r"], cfg["lora_alpha"]
        for pat, val in (cfg.get("rank_pattern") or {}).items():
            if re.fullmatch(r"(.*\.)?(%s)" % pat, key):
                r = val
                break
        for pat, val in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(r"(.*\.)?(%s)" % pat, key):
                alpha = val
                break
        scales[stem] = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
    return scales


def deltas(path, custom=None):
    """module -> (scale * B @ A, dtype, rank); and the non-LoRA tensors"""
    tensors, _ = read_st(path)
    mods = modules(tensors, custom)
    config = path[: -len(".safetensors")] + ".adapter_config.json"
    peft = peft_scales(open(config).read(), mods) if os.path.exists(config) else {}
    out, used = {}, set()
    for stem, (dn, un, an) in mods.items():
        dt, a, _ = tensors[dn]
        _, b, _ = tensors[un]
        r = a.shape[0]
        scale = peft.get(stem, 1.0)
        if an is not None:
            scale = float(tensors[an][1].reshape(())) / r
        out[stem] = (Factored(scale * b.reshape(b.shape[0], r), a.reshape(r, -1)), dt, r)
        used |= {dn, un, an}
    others = {n: t[2] for n, t in tensors.items() if n not in used}
    return out, others


def run(*args, expect_ok=True):
    p = subprocess.run([LPIPE, "-q"] + list(args), capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError("lpipe %s failed: %s" % (" ".join(args), p.stderr))
    return p


FAILURES = []


class Factored:
    """B @ A kept as factors; numpy's QR and SVD of the small core give its
    singular values without forming the product (dense SVDs of every module
    of every file would take minutes)."""

    def __init__(self, b, a):
        self.b, self.a = b, a

    def sigma(self):
        if self.b.shape[1] == 0:
            return np.zeros(1)
        qb, rb = np.linalg.qr(self.b)
        qa, ra = np.linalg.qr(self.a.T)
        return np.linalg.svd(rb @ ra.T, compute_uv=False)

    def __sub__(self, other):
        return Factored(np.hstack([self.b, -other.b]), np.vstack([self.a, other.a]))

    def norm(self):
        return np.sqrt(np.sum(self.sigma() ** 2))

    def dense(self):
        return self.b @ self.a


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def optimum(d, k):
    s = d.sigma()
    total = np.sqrt(np.sum(s ** 2))
    return (np.sqrt(np.sum(s[k:] ** 2)) / total if total > 0 else 0.0), s


def compare(src, dst, k, tol_factor, label, custom=None, slack=0.0):
    """every module of dst is within tolerance of the rank-k optimum of src"""
    a, others_a = deltas(src, custom)
    b, others_b = deltas(dst, custom)
    check(a.keys() == b.keys(), "%s: same modules" % label)
    check(others_a == others_b, "%s: other tensors untouched" % label)
    worst = 0.0
    for stem, (d, dt, r) in a.items():
        d2, dt2, r2 = b[stem]
        check(dt == dt2, "%s: %s keeps dtype %s" % (label, stem, dt))
        check(r2 == min(k, r), "%s: %s rank %d, expected %d" % (label, stem, r2, min(k, r)))
        opt, s = optimum(d, k)
        norm = d.norm()
        err = (d - d2).norm() / norm if norm > 0 else d2.norm()
        check(np.all(np.isfinite(d2.b)) and np.all(np.isfinite(d2.a)), "%s: %s finite" % (label, stem))
        tol = 1e-4 + tol_factor * EPS[dt] + slack * opt
        worst = max(worst, err - opt)
        check(abs(err - opt) <= tol or (slack and err <= opt + tol),
              "%s: %s error %.6g vs optimum %.6g (tol %.3g)" % (label, stem, err, opt, tol))
    print("%s: %d modules, worst excess error %.3g" % (label, len(a), worst))


def same_tensors(x, y):
    """the same tensors, byte for byte (the provenance names the output file)"""
    tx, ty = read_st(x)[0], read_st(y)[0]
    return tx.keys() == ty.keys() and all(tx[n][2] == ty[n][2] and tx[n][0] == ty[n][0] for n in tx)


def sample_files():
    if not os.path.isdir(SAMPLES):
        return []
    return sorted(f for f in os.listdir(SAMPLES) if f.endswith(".safetensors"))


def sample_rank(path, custom):
    d, _ = deltas(path, custom)
    return max(r for _, _, r in d.values())


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-lora-rank-")
    atexit.register(shutil.rmtree, tmp, True)   # also when a check fails

    # ---- synthetic kohya (alpha != r), peft and diffusers: scale preserved --
    for fmt, alpha in (("kohya", 3.0), ("peft", 12.0), ("diffusers", 0.0)):
        src = os.path.join(tmp, "synth-%s.safetensors" % fmt)
        run("launch", "lora-synth", "preset=sd15-unet", "format=" + fmt, "rank=8", "dtype=f32",
            "alpha=%g" % alpha, "decay=0.7", "seed=3", "!", "safetensors-sink", "location=" + src)
        for method, slack in (("exact", 0.0), ("randomized", 0.02)):
            dst = os.path.join(tmp, "synth-%s-%s.safetensors" % (fmt, method))
            run("run", os.path.join(PIPELINES, "reduce-svd.pipeline" if method == "exact" else "reduce-rsvd.pipeline"),
                "input=" + src, "output=" + dst, "rank=3")
            compare(src, dst, 3, 4, "synth %s %s" % (fmt, method), slack=slack)
            if fmt == "kohya":
                t, _ = read_st(dst)
                alphas = [float(v[1].reshape(())) for n, v in t.items() if n.endswith(".alpha")]
                check(alphas and all(x == 3.0 for x in alphas), "kohya alpha becomes the new rank")

    # 16-bit factors take f32 sums (compute-dtype=auto): still the optimum,
    # at a rank that spans several kernel tiles and blocks; and the same with
    # f64 sums, for comparison
    for dtype in ("bf16", "f16"):
        src = os.path.join(tmp, "synth-%s.safetensors" % dtype)
        run("launch", "lora-synth", "preset=sd15-unet", "rank=24", "dtype=" + dtype, "decay=0.85",
            "seed=5", "!", "safetensors-sink", "location=" + src)
        for compute in ("auto", "f64"):
            dst = os.path.join(tmp, "synth-%s-%s.safetensors" % (dtype, compute))
            run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", "rank=5",
                "compute-dtype=" + compute, "!", "safetensors-sink", "location=" + dst)
            compare(src, dst, 5, 4, "synth %s, compute-dtype=%s" % (dtype, compute))

    # a sketch much narrower than the rank: close to the optimum, not at it
    src = os.path.join(tmp, "synth-r16.safetensors")
    run("launch", "lora-synth", "preset=sd15-unet", "rank=16", "dtype=f32", "decay=0.7", "seed=4",
        "!", "safetensors-sink", "location=" + src)
    dst = os.path.join(tmp, "synth-r16-rsvd.safetensors")
    run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", "rank=3", "method=randomized",
        "oversample=2", "niter=2", "seed=9", "!", "safetensors-sink", "location=" + dst)
    compare(src, dst, 3, 4, "synth r16 randomized, sketch 5", slack=0.02)

    # ---- the samples: exact SVD reaches the optimum -------------------------
    files = sample_files()
    for f in files:
        path = os.path.join(SAMPLES, f)
        custom = ("w_a_*", "w_b_*") if f.startswith("samlora") else None
        r = sample_rank(path, custom)
        k = max(1, r // 2)
        for method, slack in (("exact", 0.0), ("randomized", 0.05)):
            dst = os.path.join(tmp, "%s-%s" % (method, f))
            args = ["launch", "safetensors-source", "location=" + path, "!", "lora-svd", "rank=%d" % k,
                    "method=" + method]
            if custom:
                args += ["down-pattern=w_a_*", "up-pattern=w_b_*"]
            run(*(args + ["!", "safetensors-sink", "location=" + dst]))
            compare(path, dst, k, 4, "%s %s" % (f, method), custom, slack=slack)

    # ---- projection: A' = R A, B' = B R^T for one R per module --------------
    src = os.path.join(tmp, "synth-diffusers.safetensors")
    for proj in ("gaussian", "sparse"):
        dst = os.path.join(tmp, "proj-%s.safetensors" % proj)
        pipeline = "reduce-proj.pipeline" if proj == "gaussian" else "reduce-proj-sparse.pipeline"
        run("run", os.path.join(PIPELINES, pipeline), "input=" + src, "output=" + dst, "rank=4", "seed=5")
        t0, _ = read_st(src)
        t1, _ = read_st(dst)
        for stem, (dn, un, _) in modules(t0).items():
            a, b = t0[dn][1], t0[un][1]
            a2, b2 = t1[dn][1], t1[un][1]
            # R from A' = R A by least squares (A has full row rank)
            rt, *_ = np.linalg.lstsq(a.T, a2.T, rcond=None)
            rmat = rt.T
            check(np.allclose(rmat @ a, a2, atol=1e-5 * np.abs(a2).max()), "proj %s %s: A' = R A" % (proj, stem))
            check(np.allclose(b @ rmat.T, b2, atol=1e-5 * np.abs(b2).max() + 1e-30), "proj %s %s: B' = B R^T" % (proj, stem))
            if proj == "sparse":
                v = np.sqrt(3.0 / 4)
                check(np.all(np.min(np.abs(np.abs(rmat)[..., None] - np.array([0, v])), axis=-1) < 1e-4),
                      "proj sparse %s: entries in {0, +-sqrt(3/k)}" % stem)
        # same seed, any thread count: same bytes
        dst2 = os.path.join(tmp, "proj-%s-j1.safetensors" % proj)
        run("-j", "1", "run", os.path.join(PIPELINES, pipeline), "input=" + src, "output=" + dst2, "rank=4", "seed=5")
        check(same_tensors(dst, dst2), "proj %s: -j 1 gives the same bytes" % proj)

    # randomized SVD: same bytes on any thread count
    r1, r2 = os.path.join(tmp, "rs1.safetensors"), os.path.join(tmp, "rs2.safetensors")
    run("-j", "1", "run", os.path.join(PIPELINES, "reduce-rsvd.pipeline"), "input=" + src, "output=" + r1, "rank=3")
    run("-j", "2", "run", os.path.join(PIPELINES, "reduce-rsvd.pipeline"), "input=" + src, "output=" + r2, "rank=3")
    check(same_tensors(r1, r2), "randomized: same bytes on 1 and 2 threads")

    # ---- LoCon round trip, zero B, passthrough, padding ----------------------
    rng = np.random.default_rng(0)
    locon = os.path.join(tmp, "locon.safetensors")
    write_st(locon, {
        "lora_unet_conv.lora_down.weight": rng.standard_normal((6, 5, 3, 3)),
        "lora_unet_conv.lora_up.weight": rng.standard_normal((7, 6, 1, 1)) * (0.6 ** np.arange(6))[None, :, None, None],
        "lora_unet_conv.alpha": np.array(2.0),
        "lora_unet_zero.lora_down.weight": rng.standard_normal((6, 9)),
        "lora_unet_zero.lora_up.weight": np.zeros((8, 6)),
        "lora_unet_small.lora_down.weight": rng.standard_normal((2, 9)),
        "lora_unet_small.lora_up.weight": rng.standard_normal((8, 2)),
        "norm.weight": rng.standard_normal(8),
    })
    out = os.path.join(tmp, "locon-r3.safetensors")
    run("run", os.path.join(PIPELINES, "reduce-svd.pipeline"), "input=" + locon, "output=" + out, "rank=3")
    t, _ = read_st(out)
    check(t["lora_unet_conv.lora_down.weight"][1].shape == (3, 5, 3, 3), "LoCon down keeps 4-D")
    check(t["lora_unet_conv.lora_up.weight"][1].shape == (7, 3, 1, 1), "LoCon up keeps 4-D")
    check(np.all(t["lora_unet_zero.lora_up.weight"][1] == 0) and np.all(t["lora_unet_zero.lora_down.weight"][1] == 0),
          "zero B gives zero factors")
    check(t["lora_unet_zero.lora_up.weight"][1].shape == (8, 3), "zero B module has the new rank")
    check(t["lora_unet_small.lora_down.weight"][2] == read_st(locon)[0]["lora_unet_small.lora_down.weight"][2],
          "a module at or below the rank passes through")
    compare(locon, out, 3, 4, "locon")

    out = os.path.join(tmp, "locon-u4.safetensors")
    run("run", os.path.join(PIPELINES, "make-uniform.pipeline"), "input=" + locon, "output=" + out, "rank=4")
    t, _ = read_st(out)
    ranks = {s: t[d][1].shape[0] for s, (d, u, a) in modules(t).items()}
    check(set(ranks.values()) == {4}, "make-uniform: every module rank 4 (%s)" % ranks)
    d0, _ = deltas(locon)
    d1, _ = deltas(out)
    check(np.allclose(d0["lora_unet_small"][0].dense(), d1["lora_unet_small"][0].dense(), atol=1e-6), "padding keeps the update")

    # ---- NaN: a numeric error naming the module ------------------------------
    bad = os.path.join(tmp, "nan.safetensors")
    x = rng.standard_normal((4, 6))
    x[1, 2] = np.nan
    write_st(bad, {"m.lora_A.weight": x, "m.lora_B.weight": rng.standard_normal((5, 4))})
    for pipeline in ("reduce-svd.pipeline", "reduce-rsvd.pipeline", "reduce-proj.pipeline"):
        p = run("run", os.path.join(PIPELINES, pipeline), "input=" + bad,
                "output=" + os.path.join(tmp, "nan-out.safetensors"), "rank=2", expect_ok=False)
        check(p.returncode != 0 and "module m" in p.stderr and "NaN" in p.stderr,
              "%s: NaN is an error naming the module (%r)" % (pipeline, p.stderr.strip()))

    # ---- dynamic rank: the smallest rank keeping the energy ------------------
    src = os.path.join(tmp, "synth-diffusers.safetensors")
    dst = os.path.join(tmp, "dynamic.safetensors")
    run("run", os.path.join(PIPELINES, "reduce-dynamic.pipeline"), "input=" + src, "output=" + dst,
        "rank=6", "energy=0.9")
    a, _ = deltas(src)
    b, _ = deltas(dst)
    for stem, (d, dt, r) in a.items():
        s = d.sigma()
        e = np.cumsum(s ** 2) / np.sum(s ** 2)
        want = min(int(np.searchsorted(e, 0.9 * (1 - 1e-12))) + 1, 6)
        check(b[stem][2] == want, "dynamic %s: rank %d, numpy says %d" % (stem, b[stem][2], want))

    # ---- rank-check: report, second input, failures -------------------------
    report = os.path.join(tmp, "report.json")
    red = os.path.join(tmp, "synth-diffusers-exact.safetensors")
    pipe = os.path.join(tmp, "check.pipeline")
    with open(pipe, "w") as f:
        json.dump({"lpipe": 1, "stages": [
            {"stage": "safetensors-source", "id": "orig", "location": src},
            {"stage": "safetensors-source", "id": "red", "location": red},
            {"stage": "rank-check", "id": "check", "inputs": ["red", "orig"], "report": report, "quiet": True},
            {"stage": "safetensors-sink", "inputs": "check", "location": os.path.join(tmp, "checked.safetensors")}]}, f)
    run("run", pipe)
    rep = json.load(open(report))
    a, _ = deltas(src)
    for m in rep["modules"]:
        opt, s = optimum(a[m["name"]][0], 3)
        check(abs(m["rel_error"] - opt) < 1e-4, "rank-check %s: rel_error %.6g vs %.6g" % (m["name"], m["rel_error"], opt))
        check(m["rank"] == 3 and m["numerical_rank"] == 3, "rank-check %s: ranks" % m["name"])
    check(rep["summary"]["uniform"] is True, "rank-check: uniform")

    # the same numbers from lora-svd's own record, without the original
    report2 = os.path.join(tmp, "report2.json")
    run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", "rank=3", "!", "rank-check",
        "quiet=true", "report=" + report2, "!", "safetensors-sink", "location=" + os.path.join(tmp, "c2.safetensors"))
    rep2 = json.load(open(report2))
    for m1, m2 in zip(rep["modules"], rep2["modules"]):
        check(abs(m1["rel_error"] - m2["rel_error"]) < 1e-4, "rank-check: stats agree for %s" % m1["name"])

    p = run("launch", "safetensors-source", "location=" + locon, "!", "rank-check", "expect-rank=6", "quiet=true",
            "!", "safetensors-sink", "location=" + os.path.join(tmp, "c3.safetensors"), expect_ok=False)
    check(p.returncode != 0 and "lora_unet_small" in p.stderr and "lora_unet_conv" not in p.stderr,
          "expect-rank names the offending modules (%r)" % p.stderr.strip())
    p = run("launch", "safetensors-source", "location=" + locon, "!", "rank-check", "require-uniform=true",
            "quiet=true", "!", "safetensors-sink", "location=" + os.path.join(tmp, "c4.safetensors"), expect_ok=False)
    check(p.returncode != 0 and "lora_unet_small" in p.stderr, "require-uniform fails (%r)" % p.stderr.strip())

    mlx_checks(tmp)

    if FAILURES:
        print("%d failures" % len(FAILURES))
        sys.exit(1)
    if not files:
        print("lora-samples absent: real files skipped")
    print("all checks passed")


def mlx_checks(tmp):
    """mlx-lm adapters: mlx_lm/tuner/lora.py LoRALinear stores lora_a [in, r]
    and lora_b [r, out] and adds scale * (x @ lora_a) @ lora_b, so the update
    is scale * (lora_a @ lora_b)^T, scale from adapter_config.json
    lora_parameters (linear_to_lora_layers; some versions: scale * alpha / rank).
    mlx's save_safetensors writes "__metadata__": null."""
    rng = np.random.default_rng(11)
    shapes = {"model.layers.0.self_attn.q_proj": (24, 24), "model.layers.0.mlp.down_proj": (40, 16)}
    for variant, params in (("plain", {"rank": 8, "scale": 20.0, "dropout": 0.0}),
                            ("alpha", {"rank": 8, "alpha": 16, "scale": 10.0, "dropout": 0.0})):
        d = os.path.join(tmp, "mlx-" + variant)
        os.makedirs(d)
        src = os.path.join(d, "adapters.safetensors")
        tensors = {}
        for name, (n_in, n_out) in shapes.items():
            s = 0.6 ** np.arange(8)
            tensors[name + ".lora_a"] = rng.standard_normal((n_in, 8)) * s
            tensors[name + ".lora_b"] = rng.standard_normal((8, n_out))
        write_st(src, tensors)
        # mlx's own header: __metadata__ null, first
        raw = open(src, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header = dict([("__metadata__", None)] + list(header.items()))
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        open(src, "wb").write(struct.pack("<Q", len(h)) + h + raw[8 + n:])
        config = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": params}
        json.dump(config, open(os.path.join(d, "adapter_config.json"), "w"))
        scale = params["scale"] * params.get("alpha", params["rank"]) / params["rank"]

        info = run("info", src).stdout
        check("mlx" in info, "mlx %s: lpipe info names the family" % variant)

        out_dir = os.path.join(tmp, "mlx-%s-out" % variant)
        os.makedirs(out_dir)
        dst = os.path.join(out_dir, "adapters.safetensors")
        run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", "rank=3",
            "!", "safetensors-sink", "location=" + dst)
        got, meta = read_st(dst)
        new_cfg = json.load(open(os.path.join(out_dir, "adapter_config.json")))
        lp = new_cfg["lora_parameters"]
        check(lp["rank"] == 3, "mlx %s: config rank 3, got %r" % (variant, lp["rank"]))
        check(lp["scale"] == params["scale"], "mlx %s: config scale kept" % variant)
        check(new_cfg["fine_tune_type"] == "lora" and new_cfg["num_layers"] == 16,
              "mlx %s: other config members kept" % variant)
        new_scale = lp["scale"] * lp.get("alpha", lp["rank"]) / lp["rank"]
        check(abs(new_scale - scale) <= 1e-12 * scale, "mlx %s: scale %g kept (%g)" % (variant, scale, new_scale))
        for name, (n_in, n_out) in shapes.items():
            a2, b2 = got[name + ".lora_a"][1], got[name + ".lora_b"][1]
            check(a2.shape == (n_in, 3) and b2.shape == (3, n_out),
                  "mlx %s: %s written in mlx layout, got %s %s" % (variant, name, a2.shape, b2.shape))
            w = scale * (tensors[name + ".lora_a"] @ tensors[name + ".lora_b"]).T
            w2 = new_scale * (a2 @ b2).T
            sv = np.linalg.svd(w, compute_uv=False)
            opt = np.sqrt(np.sum(sv[3:] ** 2)) / np.linalg.norm(w)
            err = np.linalg.norm(w - w2) / np.linalg.norm(w)
            check(abs(err - opt) <= 1e-4 + 4 * EPS["F32"],
                  "mlx %s: %s error %.6g vs optimum %.6g" % (variant, name, err, opt))

        # the obvious custom patterns read lora_a [in, r] as a down [r, in]:
        # on the square q_proj that would pass unnoticed
        p = run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", "rank=3",
                "down-pattern=*.lora_a", "up-pattern=*.lora_b", "!", "safetensors-sink",
                "location=" + os.path.join(tmp, "never.safetensors"), expect_ok=False)
        check(p.returncode != 0 and "model.layers.0.self_attn.q_proj" in p.stderr
              and "transposed" in p.stderr, "mlx %s: custom patterns refused: %s" % (variant, p.stderr))
        check(not os.path.exists(os.path.join(tmp, "never.safetensors")), "mlx: nothing written")
        print("mlx %s: %d modules at the optimum, config rank 3, scale %g kept" % (variant, len(shapes), scale))


def demo():
    """pipelines/demo.pipeline, the README's default: flux-dev rank 42 -> 4"""
    tmp = tempfile.mkdtemp(prefix="lpipe-lora-demo-")
    atexit.register(shutil.rmtree, tmp, True)   # also when a check fails
    out, report = os.path.join(tmp, "demo.safetensors"), os.path.join(tmp, "demo.json")
    run("run", os.path.join(PIPELINES, "demo.pipeline"), "output=" + out, "report=" + report)
    rep = json.load(open(report))
    check(rep["summary"]["n_modules"] == 494, "demo: 494 modules")
    check(rep["summary"]["uniform"] and rep["summary"]["max_rank"] == 4, "demo: rank 4 everywhere")
    check(all(m["numerical_rank"] == 4 for m in rep["modules"]), "demo: numerical rank 4")
    # a bf16 file of 494 modules at rank 4: 5,369,856 parameters per rank
    check(abs(os.path.getsize(out) - 4 * 5369856 * 2) < 200000, "demo: 43 MB output")
    # the synth spectrum decays as 0.8^i: the optimum is known in closed form
    s2 = 0.64 ** np.arange(42)
    opt = np.sqrt(s2[4:].sum() / s2.sum())
    check(all(abs(m["rel_error"] - opt) < 0.05 for m in rep["modules"]),
          "demo: errors near the spectrum's optimum %.3f" % opt)
    if FAILURES:
        sys.exit(1)
    print("demo: all checks passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["demo"]:
        demo()
    else:
        main()
