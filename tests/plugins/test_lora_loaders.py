#!/usr/bin/python3
# test_lora_loaders.py: lpipe's outputs read back by the loaders' own rules
#
# torch, diffusers, kohya sd-scripts and ComfyUI cannot be installed here, so
# the rules they apply to a LoRA file are re-implemented from their code, each
# citing the function it follows, and applied to what lpipe writes:
#
# - kohya sd-scripts networks/lora.py create_network_from_weights and ComfyUI
#   comfy/lora.py load_lora / weight patching: a module's update is
#   (alpha / rank) * up @ down, alpha from its `.alpha` tensor;
# - diffusers _convert_non_diffusers_lora_to_diffusers + get_peft_kwargs
#   (utils/peft_utils.py): the kohya alphas become LoraConfig.lora_alpha when
#   they are all equal, else an alpha_pattern keyed by converted names that
#   need not match the modules: one alpha for the file is what loads right;
# - kohya networks/resize_lora.py resize(): ss_network_dim, ss_network_alpha
#   and ss_training_comment after a resize;
# - cloneofsimo lora_diffusion save_safeloras_with_embeds: `<module>:rank`;
# - lpipe's own lpipe.pipeline record, which travels with shared files.
#
# Every module's update scale * B @ A is compared in f64 with numpy against
# the best approximation at the written rank (Eckart-Young), tolerances from
# the dtype the factors are stored in.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

LPIPE = os.environ["LPIPE"]
DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
EPS = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def read_st(path):
    """name -> (dtype, f64 array); and the metadata"""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = data[8 + n + b: 8 + n + e]
        dt = info["dtype"]
        if dt == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, DTYPES[dt])
        tensors[name] = (dt, x.astype(np.float64).reshape(info["shape"]))
    return tensors, meta


def set_metadata(path, metadata):
    """Rewrites a safetensors file with @metadata, as safetensors' save_file does."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    header = dict([("__metadata__", metadata)] + list(header.items()))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data[8 + n:])


def run(*args):
    p = subprocess.run([LPIPE, "-q"] + list(args), capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError("lpipe %s failed: %s" % (" ".join(args), p.stderr))
    return p


def kohya_modules(tensors):
    """kohya create_network_from_weights: module -> (alpha, rank, up, down)"""
    out = {}
    for name, (dt, down) in tensors.items():
        if not name.endswith(".lora_down.weight"):
            continue
        stem = name[: -len(".lora_down.weight")]
        up = tensors[stem + ".lora_up.weight"][1]
        r = down.shape[0]
        alpha = tensors[stem + ".alpha"][1].item() if stem + ".alpha" in tensors else r
        out[stem] = (alpha, r, up.reshape(up.shape[0], r), down.reshape(r, -1), dt)
    return out


def update(alpha, r, up, down):
    """ComfyUI comfy/lora.py weight patching: (alpha / rank) * up @ down, kept
    factored as (B, A) so model-sized modules cost r x r products"""
    return ((alpha / r) * up, down)


def norm(f):
    """||B @ A||_F through the QR factors of B and A^T"""
    b, a = f
    return np.linalg.norm(np.linalg.qr(b)[1] @ np.linalg.qr(a.T)[1].T)


def minus(f, g):
    return (np.hstack([f[0], -g[0]]), np.vstack([f[1], g[1]]))


def optimum(f, k):
    """The best rank-k approximation of B @ A (Eckart-Young), factored"""
    qb, rb = np.linalg.qr(f[0])
    qa, ra = np.linalg.qr(f[1].T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return (qb @ (u[:, :k] * s[:k]), vt[:k] @ qa.T)


KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "16",
    "ss_network_alpha": "8.0",
    "ss_training_comment": "trained on cats",
    "ss_output_name": "cats",
    "sshs_model_hash": "0" * 64,
    "sshs_legacy_hash": "0" * 8,
}


def write_f32(path, tensors, metadata):
    """name -> array, written in order as F32 (0-dim alphas included)"""
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_kohya(tmp, name, rank=16, alpha=8):
    """lora-synth's kohya SD1.5 UNet LoRA (f32, kohya's names and 0-dim
    alphas) with kohya's training metadata; every other module's spectrum
    decays faster, so dynamic criteria choose different ranks."""
    path = os.path.join(tmp, name)
    run("launch", "lora-synth", "preset=sd15-unet", "format=kohya", "rank=%d" % rank,
        "dtype=f32", "alpha=%g" % alpha, "decay=0.7", "!",
        "safetensors-sink", "location=" + path)
    tensors = {n: t[1] for n, t in read_st(path)[0].items()}
    for i, n in enumerate(sorted(n for n in tensors if n.endswith(".lora_up.weight"))):
        if i % 2:
            tensors[n] = tensors[n] * (0.5 ** np.arange(tensors[n].shape[1]))
    write_f32(path, tensors, dict(KOHYA_METADATA))
    return path


def reduce(src, dst, *props):
    run("launch", "safetensors-source", "location=" + src, "!", "lora-svd", *props, "!",
        "safetensors-sink", "location=" + dst)


def check_updates(src, dst, label):
    """Each module of dst, read by kohya's and ComfyUI's rule, is the best
    approximation of src's at its written rank."""
    before = kohya_modules(read_st(src)[0])
    after = kohya_modules(read_st(dst)[0])
    check(set(before) == set(after), "%s: the same modules" % label)
    worst = 0.0
    for stem, (alpha, r, up, down, dt) in after.items():
        want = optimum(update(*before[stem][:4]), r)
        got = update(alpha, r, up, down)
        err = norm(minus(got, want)) / norm(want)
        worst = max(worst, err)
        check(err < 64 * EPS[dt] * np.sqrt(r), "%s: %s update off by %.2e" % (label, stem, err))
    return after


def test_dynamic_shared_alpha(tmp):
    """Dynamic ranks: one alpha for the file (diffusers' get_peft_kwargs then
    sets lora_alpha and no alpha_pattern), the rest of each scale folded."""
    src = make_kohya(tmp, "kohya.safetensors")
    dst = os.path.join(tmp, "dyn.safetensors")
    reduce(src, dst, "sv-fro=0.9")
    after = check_updates(src, dst, "dynamic")
    ranks = {m[1] for m in after.values()}
    alphas = {m[0] for m in after.values()}
    check(len(ranks) > 1, "dynamic: the ranks differ (%s)" % sorted(ranks))
    check(len(alphas) == 1, "dynamic: one alpha for every module, not %s" % sorted(alphas))
    # diffusers get_peft_kwargs: r = most common rank, lora_alpha = the alpha;
    # a module's scale lora_alpha / its rank_pattern rank equals kohya's
    alpha = alphas.pop()
    counts = {}
    for m in after.values():
        counts[m[1]] = counts.get(m[1], 0) + 1
    check(alpha == max(counts, key=lambda k: (counts[k], -k)) or counts[alpha] == max(counts.values()),
          "dynamic: the alpha %g is the most common rank" % alpha)
    _, meta = read_st(dst)
    # kohya resize_lora.py resize(): Dynamic dim, the note, the hashes gone
    check(meta.get("ss_network_dim") == "Dynamic", "dynamic: ss_network_dim %r" % meta.get("ss_network_dim"))
    check(meta.get("ss_network_alpha") == "%.1f" % alpha,
          "dynamic: ss_network_alpha %r, not the shared %g" % (meta.get("ss_network_alpha"), alpha))
    comment = meta.get("ss_training_comment", "")
    check(comment.startswith("Dynamic resize") and "from 16" in comment and comment.endswith("; trained on cats"),
          "dynamic: ss_training_comment %r" % comment)
    check("sshs_model_hash" not in meta and "sshs_legacy_hash" not in meta,
          "dynamic: the stale hashes are dropped")
    check(meta.get("ss_output_name") == "cats", "dynamic: other ss_ keys are kept")

    # per-module-alpha=true: kohya's own resize_lora.py layout, alpha = rank
    per = os.path.join(tmp, "per.safetensors")
    reduce(src, per, "sv-fro=0.9", "per-module-alpha=true")
    after = check_updates(src, per, "per-module-alpha")
    check(all(m[0] == m[1] for m in after.values()), "per-module-alpha: alpha = rank per module")
    check(read_st(per)[1].get("ss_network_alpha") == "Dynamic", "per-module-alpha: ss_network_alpha Dynamic")


def test_fixed(tmp):
    """A fixed rank: kohya resize_lora.py writes the rank and new alpha."""
    src = make_kohya(tmp, "kohya-fixed.safetensors")
    dst = os.path.join(tmp, "r4.safetensors")
    reduce(src, dst, "rank=4")
    check_updates(src, dst, "fixed")
    _, meta = read_st(dst)
    check(meta.get("ss_network_dim") == "4", "fixed: ss_network_dim %r" % meta.get("ss_network_dim"))
    check(meta.get("ss_network_alpha") == "4.0", "fixed: ss_network_alpha %r" % meta.get("ss_network_alpha"))
    check(meta.get("ss_training_comment") == "dimension is resized from 16 to 4 by lpipe; trained on cats",
          "fixed: ss_training_comment %r" % meta.get("ss_training_comment"))


def test_bf16_alpha_holds_rank(tmp):
    """A bf16 alpha cannot hold 257 (it rounds to 256): the new alpha is f32."""
    src = os.path.join(tmp, "wide.safetensors")
    rng = np.random.default_rng(1)
    down = rng.standard_normal((300, 320)).astype(np.float32)
    up = rng.standard_normal((310, 300)).astype(np.float32)

    def bf16(x):
        return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()

    blobs = [("lora_unet_mid_block_attentions_0_proj_in.alpha", "BF16", [], bf16(np.float32(300.0))),
             ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "BF16", [300, 320], bf16(down)),
             ("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", "BF16", [310, 300], bf16(up))]
    header, off = {}, 0
    for name, dt, shape, raw in blobs:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(b[3] for b in blobs))
    dst = os.path.join(tmp, "r257.safetensors")
    reduce(src, dst, "rank=257")
    tensors, _ = read_st(dst)
    dt, alpha = tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    check(dt == "F32" and alpha.item() == 257.0, "bf16 alpha: written %s %g, not F32 257" % (dt, alpha.item()))
    check_updates(src, dst, "bf16 alpha")


def test_cloneofsimo(tmp):
    """cloneofsimo's `<module>:rank` entries get the new ranks."""
    src = os.path.join(tmp, "simo.safetensors")
    rng = np.random.default_rng(2)
    header, blobs, off = {}, [], 0
    meta = {"text_encoder": '["CLIPAttention"]'}
    for i in range(3):
        for part, shape in (("down", (4, 24)), ("up", (24, 4))):
            raw = rng.standard_normal(shape).astype(np.float32).tobytes()
            header["text_encoder:%d:%s" % (i, part)] = {"dtype": "F32", "shape": list(shape),
                                                       "data_offsets": [off, off + len(raw)]}
            blobs.append(raw)
            off += len(raw)
        meta["text_encoder:%d:rank" % i] = "4"
    header = dict([("__metadata__", meta)] + list(header.items()))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    dst = os.path.join(tmp, "simo-r2.safetensors")
    reduce(src, dst, "rank=2")
    tensors, meta = read_st(dst)
    for i in range(3):
        check(meta.get("text_encoder:%d:rank" % i) == "2",
              "cloneofsimo: text_encoder:%d:rank is %r" % (i, meta.get("text_encoder:%d:rank" % i)))
        check(tensors["text_encoder:%d:down" % i][1].shape[0] == 2, "cloneofsimo: rank 2 written")
    check(meta.get("text_encoder") == '["CLIPAttention"]', "cloneofsimo: other metadata kept")


def test_converted(tmp):
    """A kohya file converted to diffusers names loses the kohya entries that
    described its network and bytes."""
    src = make_kohya(tmp, "kohya-conv.safetensors")
    dst = os.path.join(tmp, "diffusers.safetensors")
    run("launch", "safetensors-source", "location=" + src, "!", "rename", "preset=sd-kohya-to-diffusers",
        "!", "safetensors-sink", "location=" + dst)
    _, meta = read_st(dst)
    for key in ("ss_network_dim", "ss_network_alpha", "ss_network_module", "sshs_model_hash", "sshs_legacy_hash"):
        check(key not in meta, "converted: %s dropped" % key)
    check(meta.get("ss_output_name") == "cats", "converted: ss_output_name kept")


def test_provenance(tmp):
    """lpipe.pipeline: file names without their directories, the input's
    record kept in the history, and provenance=false to add none."""
    first = make_kohya(tmp, "prov.safetensors")
    second = os.path.join(tmp, "prov-r8.safetensors")
    third = os.path.join(tmp, "prov-r4.safetensors")
    reduce(first, second, "rank=8")
    reduce(second, third, "rank=4")
    meta2, meta3 = read_st(second)[1], read_st(third)[1]
    check(tmp not in meta2["lpipe.pipeline"] and tmp not in meta3["lpipe.pipeline"],
          "provenance: no directory recorded: %s" % meta3["lpipe.pipeline"])
    rec2, rec3 = json.loads(meta2["lpipe.pipeline"]), json.loads(meta3["lpipe.pipeline"])
    check("location=prov.safetensors" in rec2["stages"] and "rank=8" in rec2["stages"],
          "provenance: the stages by file name: %s" % rec2["stages"])
    check(rec3.get("history") == [rec2] and "rank=4" in rec3["stages"],
          "provenance: the input's record is the history: %s" % rec3.get("history"))
    # Only the properties that name files lose their directories
    # (lp_stage_class_set_property_file): a rename rule with '/' stays whole.
    ruled = os.path.join(tmp, "prov-ruled.safetensors")
    report = os.path.join(tmp, "prov-check.json")
    rule = r"lora_unet_(down|a/b)_blocks_=lora_unet_\1_blocks_"
    run("launch", "safetensors-source", "location=" + second, "!", "rename", "rules=" + rule, "!",
        "rank-check", "quiet=true", "report=" + report, "!", "safetensors-sink", "location=" + ruled)
    stages = json.loads(read_st(ruled)[1]["lpipe.pipeline"])["stages"]
    check(rule in stages and "b_blocks_" not in stages.replace(rule, ""),
          "provenance: a rename rule with '/' is recorded whole: %s" % stages)
    check("location=prov-r8.safetensors" in stages and "report=prov-check.json" in stages
          and tmp not in stages, "provenance: locations and reports lose their directories: %s" % stages)
    # A pipeline's parameters: the one that went into a file name is shortened,
    # the rule is not.
    pipeline = os.path.join(tmp, "prov.pipeline")
    with open(pipeline, "w") as f:
        json.dump({"lpipe": 1, "params": {"input": second, "rule": rule, "dir": tmp},
                   "stages": [{"stage": "safetensors-source", "location": "${input}"},
                              {"stage": "rename", "rules": ["${rule}"]},
                              {"stage": "safetensors-sink", "location": "${dir}/prov-run.safetensors"}]}, f)
    run("run", pipeline)
    params = json.loads(read_st(os.path.join(tmp, "prov-run.safetensors"))[1]["lpipe.pipeline"])["params"]
    check(params == {"input": "prov-r8.safetensors", "rule": rule, "dir": os.path.basename(tmp)},
          "provenance: parameters of file names shortened, the rule kept whole: %s" % params)
    off = os.path.join(tmp, "prov-off.safetensors")
    run("launch", "safetensors-source", "location=" + second, "!", "lora-svd", "rank=4", "!",
        "safetensors-sink", "location=" + off, "provenance=false")
    check(read_st(off)[1].get("lpipe.pipeline") == meta2["lpipe.pipeline"],
          "provenance=false: no new record")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for test in (test_dynamic_shared_alpha, test_fixed, test_bf16_alpha_holds_rank,
                     test_cloneofsimo, test_converted, test_provenance):
            print("#", test.__name__)
            test(tmp)
    if FAILURES:
        print("%d failures" % len(FAILURES))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
