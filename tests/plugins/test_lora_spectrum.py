#!/usr/bin/python3
# test_lora_spectrum.py: lora-spectrum and rank-check's singular values
# against numpy, and the SVG chart rendered by librsvg
#
# The oracle reads the safetensors file itself, pairs kohya modules
# (`.lora_down.weight`, `.lora_up.weight`, `.alpha`: scale alpha / rank, as
# kohya sd-scripts' networks/lora.py LoRAModule applies it) and takes the
# singular values of scale · B @ A from QR factors of B and Aᵀ and an SVD of
# the small core, in f64. Every number of the report is recomputed from
# those: the energy kept at rank k (Σ_{i<k} σᵢ² / Σ σᵢ², summed over the
# modules for the whole file and per block), the relative error √(1 − energy)
# and kohya's "fro retained" (networks/resize_lora.py, rank_resize():
# fro_percent = √(Σ S²[:k]) / √(Σ S²)), which is √energy.
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
import xml.etree.ElementTree as ET

import numpy as np

LPIPE = os.environ["LPIPE"]
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def run(*args, expect_ok=True):
    p = subprocess.run([LPIPE, "-q"] + list(args), capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError("lpipe %s failed: %s" % (" ".join(args), p.stderr))
    return p


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = data[8 + n + b: 8 + n + e]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[info["dtype"]])
        tensors[name] = (info["dtype"], x.astype(np.float64).reshape(info["shape"]))
    return tensors


def write_f32(path, tensors):
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def kohya_modules(tensors):
    """module -> (singular values of scale * B @ A, out, in, element bytes)"""
    out = {}
    for name, (dtype, down) in tensors.items():
        if not name.endswith(".lora_down.weight"):
            continue
        stem = name[: -len(".lora_down.weight")]
        up = tensors[stem + ".lora_up.weight"][1]
        r = down.shape[0]
        a = down.reshape(r, -1)
        b = up.reshape(up.shape[0], r)
        scale = float(tensors[stem + ".alpha"][1].reshape(())) / r if stem + ".alpha" in tensors else 1.0
        _, rb = np.linalg.qr(b)
        _, ra = np.linalg.qr(a.T)
        sigma = np.linalg.svd(rb @ ra.T, compute_uv=False) * abs(scale)
        out[stem] = (sigma, b.shape[0], a.shape[1], {"BF16": 2, "F16": 2, "F32": 4}[dtype])
    return out


def block_of(name):
    """The documented rule: the name up to its first all-digit part."""
    m = re.match(r"^(.*?(?:^|[._])\d+)(?=[._]|$)", name)
    return m.group(1) if m else name


def energy(sigmas, k):
    kept = sum((s[:k] ** 2).sum() for s in sigmas)
    total = sum((s ** 2).sum() for s in sigmas)
    return kept / total


def check_spectrum(tmp):
    lora = os.path.join(tmp, "sd15-kohya-r8.safetensors")
    report = os.path.join(tmp, "spectrum.json")
    svg = os.path.join(tmp, "spectrum.svg")
    # alpha 4 on rank 8: scale 0.5, which the singular values must carry
    run("launch", "lora-synth", "preset=sd15-unet", "format=kohya", "rank=8", "alpha=4",
        "dtype=bf16", "!", "safetensors-sink", "location=" + lora)
    p = subprocess.run([LPIPE, "launch", "safetensors-source", "location=" + lora, "!",
                        "lora-spectrum", "report=" + report, "svg=" + svg],
                       capture_output=True, text=True, check=True)
    rep = json.load(open(report))
    mods = kohya_modules(read_st(lora))

    check(len(rep["modules"]) == len(mods) == 128, "spectrum: every module reported")
    check(rep["ranks"] == [1, 2, 4, 8], "spectrum: the ladder 1, 2, 4, 8")
    worst_sv = 0.0
    for m in rep["modules"]:
        sigma = mods[m["name"]][0]
        got = np.array(m["singular_values"])
        worst_sv = max(worst_sv, np.abs(got - sigma).max() / sigma[0])
        check(m["block"] == block_of(m["name"]), "spectrum: block of %s" % m["name"])
        check(abs(m["scale"] - 0.5) < 1e-12, "spectrum: scale alpha / rank of %s" % m["name"])
    # bf16 values are exact in f64: the two f64 computations agree to rounding
    check(worst_sv < 1e-9, "spectrum: singular values within 1e-9 sigma_1 of numpy (%.2e)" % worst_sv)

    sigmas = {name: v[0] for name, v in mods.items()}
    for step in rep["whole"]:
        k = step["rank"]
        e = energy(sigmas.values(), k)
        errors = [np.sqrt(max(0.0, 1 - energy([s], k))) for s in sigmas.values()]
        size = sum((o + i) * min(k, len(s)) * eb for s, o, i, eb in mods.values())
        check(abs(step["energy"] - e) < 1e-10, "spectrum: energy at rank %d" % k)
        check(abs(step["rel_error"] - np.sqrt(max(0.0, 1 - e))) < 1e-6, "spectrum: error at rank %d" % k)
        check(abs(step["fro_retained"] - np.sqrt(e)) < 1e-10, "spectrum: kohya fro retained at rank %d" % k)
        check(abs(step["mean_module_rel_error"] - np.mean(errors)) < 1e-6, "spectrum: mean error at %d" % k)
        check(abs(step["max_module_rel_error"] - max(errors)) < 1e-6, "spectrum: max error at %d" % k)
        check(step["n_bytes"] == size, "spectrum: size at rank %d" % k)
    check(rep["whole"][-1]["rel_error"] == 0 and rep["whole"][-1]["worst_module"] is None,
          "spectrum: nothing lost at the stored rank")

    blocks = {}
    for name, s in sigmas.items():
        blocks.setdefault(block_of(name), []).append(s)
    check([b["name"] for b in rep["blocks"]] == list(dict.fromkeys(block_of(n) for n in sigmas)),
          "spectrum: blocks in network order")
    for b in rep["blocks"]:
        want = [np.sqrt(max(0.0, 1 - energy(blocks[b["name"]], k))) for k in rep["ranks"]]
        check(b["n_modules"] == len(blocks[b["name"]]), "spectrum: modules of block %s" % b["name"])
        check(np.allclose(b["rel_error"], want, atol=1e-6), "spectrum: errors of block %s" % b["name"])

    # the table says what the report says, and what kohya calls it
    check("fro retained" in p.stdout and "error per block" in p.stdout,
          "spectrum: the table names kohya's measure and shows the blocks")

    check_svg(svg, len(rep["blocks"]), tmp)
    return lora


def check_svg(svg, n_blocks, tmp):
    root = ET.parse(svg).getroot()       # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    check(root.tag == ns + "svg" and root.get("width") == "960" and root.get("height") == "720",
          "svg: a 960 x 720 SVG document")
    lines = root.findall(ns + "polyline")
    # 3 curves against rank (whole, mean, worst), 3 per block (ranks 1, 2, 4)
    check(len(lines) == 6, "svg: six curves (%d)" % len(lines))
    per_block = [l for l in lines if len(l.get("points").split()) == n_blocks]
    check(len(per_block) >= 3, "svg: per-block curves have a point per block")

    rsvg = shutil.which("rsvg-convert")
    if rsvg is None:
        check(False, "svg: rsvg-convert (librsvg2-bin) is not installed")
        return
    png = os.path.join(tmp, "spectrum.png")
    subprocess.run([rsvg, "-o", png, svg], check=True)
    with open(png, "rb") as f:
        head = f.read(33)
    check(head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "svg: renders to a PNG")
    w, h = struct.unpack(">II", head[16:24])
    check((w, h) == (960, 720), "svg: the PNG is 960 x 720 (%d x %d)" % (w, h))
    # not a blank page: the curves put colour in it
    data = subprocess.run([rsvg, "-f", "png", svg], capture_output=True, check=True).stdout
    check(len(data) > 10000, "svg: the picture has content")


def check_rank_check(tmp, lora):
    report = os.path.join(tmp, "rank-check.json")
    out = os.path.join(tmp, "r2.safetensors")
    # the original alone: singular values, and a word instead of '-' columns
    # (the per-module table is printed with --verbose only)
    p = subprocess.run([LPIPE, "--verbose", "launch", "safetensors-source", "location=" + lora, "!",
                        "rank-check", "report=" + report, "!", "safetensors-sink",
                        "location=" + os.path.join(tmp, "same.safetensors")],
                       capture_output=True, text=True)
    check(p.returncode == 0, "rank-check: runs on an original alone")
    check(" - " not in p.stdout and "no original to measure an error against" in p.stdout,
          "rank-check: says what to compare with instead of printing '-'")
    rep = json.load(open(report))
    mods = kohya_modules(read_st(lora))
    worst = max(np.abs(np.array(m["singular_values"]) - mods[m["name"]][0]).max() / mods[m["name"]][0][0]
                for m in rep["modules"])
    check(worst < 1e-9, "rank-check: singular values of the original (%.2e)" % worst)

    # after a reduction: the reduced module's singular values, the top of the original's
    run("launch", "safetensors-source", "location=" + lora, "!", "lora-svd", "rank=2", "!",
        "rank-check", "report=" + report, "quiet=true", "!", "safetensors-sink", "location=" + out)
    rep = json.load(open(report))
    reduced = kohya_modules(read_st(out))
    worst = 0.0
    for m in rep["modules"]:
        want = mods[m["name"]][0][:2]
        got = np.array(m["singular_values"])
        worst = max(worst, np.abs(got - want).max() / want[0],
                    np.abs(got - reduced[m["name"]][0]).max() / want[0])
    # bf16 factors: the reduced file's singular values round at 2^-8
    check(worst < 4 * 2.0 ** -8, "rank-check: reduced singular values (%.2e)" % worst)


def check_lycoris(tmp):
    """LyCORIS LoHa and LoKr files: each module's spectrum is that of its whole
    scaled update, which numpy forms densely with the LyCORIS/ComfyUI scale
    rules of test_lora_lycoris.py (loha_delta, lokr_delta)"""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_lora_lycoris as ly
    # dim 3 on sd15: the factored route; dim 24 is r1·r2 = 576 above the
    # 320-wide layers: the dense route (lp-lora-lycoris.c loha_dense_is_cheaper)
    for fmt, extra, delta_fn in (("loha", ["rank=3"], ly.loha_delta), ("loha", ["rank=24"], ly.loha_delta),
                                 ("lokr", ["rank=3", "factor=4"], ly.lokr_delta)):
        src = os.path.join(tmp, "%s-%s.safetensors" % (fmt, extra[0]))
        report = os.path.join(tmp, "%s-%s.json" % (fmt, extra[0]))
        run("launch", "lora-synth", "preset=sd15-unet", "format=" + fmt, "alpha=2", "dtype=f32", *extra,
            "!", "select", "include=lora_unet_down_blocks_0_*", "!", "safetensors-sink", "location=" + src)
        run("launch", "safetensors-source", "location=" + src, "!", "lora-spectrum", "quiet=true",
            "report=" + report)
        rep = json.load(open(report))
        tensors, _ = ly.read_st(src)
        parts = ly.parts_of(tensors)
        check(len(rep["modules"]) == 16, "%s %s: every module reported (%d)" % (fmt, extra[0], len(rep["modules"])))
        worst = 0.0
        for m in rep["modules"]:
            sv = np.linalg.svd(delta_fn(parts, m["name"]), compute_uv=False)
            got = np.array(m["singular_values"])
            n = int(np.sum(sv > 1e-7 * sv[0]))
            check(len(got) == n, "%s %s %s: %d singular values, numpy's rank %d" % (fmt, extra[0], m["name"], len(got), n))
            worst = max(worst, np.abs(got[:n] - sv[:len(got)][:n]).max() / sv[0])
        # f32 parts are summed in f64 (lp-lora-lycoris.c loha_factors)
        check(worst < 1e-6, "%s %s: singular values within 1e-6 sigma_1 of numpy (%.2e)" % (fmt, extra[0], worst))


def check_errors(tmp):
    # a checkpoint without a LoRA module (a model's weights): an error, not an empty report
    plain = os.path.join(tmp, "plain.safetensors")
    write_f32(plain, {"model.layers.0.mlp.down_proj.weight": np.ones((4, 6), np.float32)})
    p = run("launch", "safetensors-source", "location=" + plain, "!", "lora-spectrum",
            "report=" + os.path.join(tmp, "none.json"), expect_ok=False)
    check(p.returncode == 1 and "lora-spectrum" in p.stderr and "no LoRA module" in p.stderr,
          "errors: no module is an error naming the stage (%r)" % p.stderr)
    check(not os.path.exists(os.path.join(tmp, "none.json")), "errors: no report written")

    # NaN in a factor: named
    nan = os.path.join(tmp, "nan.safetensors")
    down = np.ones((2, 4), np.float32)
    down[1, 2] = np.nan
    write_f32(nan, {"m.lora_down.weight": down, "m.lora_up.weight": np.ones((3, 2), np.float32)})
    p = run("launch", "safetensors-source", "location=" + nan, "!", "lora-spectrum", expect_ok=False)
    check(p.returncode == 1 and "module m" in p.stderr and "NaN" in p.stderr,
          "errors: NaN named with its module (%r)" % p.stderr)

    # hostile names: the chart stays well-formed XML
    odd = os.path.join(tmp, "odd.safetensors")
    stem = "a<b>&\"c\x1b[31m.0"
    write_f32(odd, {stem + ".lora_down.weight": np.arange(8, dtype=np.float32).reshape(2, 4),
                    stem + ".lora_up.weight": np.arange(6, dtype=np.float32).reshape(3, 2)})
    svg = os.path.join(tmp, "odd.svg")
    run("launch", "safetensors-source", "location=" + odd, "!", "lora-spectrum", "quiet=true", "svg=" + svg)
    try:
        ET.parse(svg)
        check(True, "")
    except ET.ParseError as e:
        check(False, "errors: hostile names break the SVG (%s)" % e)


def check_info(tmp, lora):
    """`lpipe info --spectrum` runs the stage on a file"""
    svg = os.path.join(tmp, "info.svg")
    p = subprocess.run([LPIPE, "info", "--spectrum", "--svg", svg, lora], capture_output=True, text=True)
    check(p.returncode == 0 and "fro retained" in p.stdout and os.path.exists(svg),
          "info --spectrum: the table and the chart (%r)" % p.stderr)
    check(p.stdout.count("LoRA modules") == 1, "info --spectrum: one table a file")
    p = subprocess.run([LPIPE, "info", "--spectrum", "--json", lora], capture_output=True, text=True)
    rep = json.loads(p.stdout)
    check(p.returncode == 0 and len(rep["modules"]) == 128 and rep["ranks"] == [1, 2, 4, 8],
          "info --spectrum --json: the report")
    p = subprocess.run([LPIPE, "info", "--svg", svg, lora], capture_output=True, text=True)
    check(p.returncode == 2 and "--spectrum" in p.stderr, "info --svg alone is a usage error naming --spectrum")


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-spectrum-")
    try:
        lora = check_spectrum(tmp)
        check_rank_check(tmp, lora)
        check_info(tmp, lora)
        check_lycoris(tmp)
        check_errors(tmp)
    finally:
        shutil.rmtree(tmp)
    if FAILURES:
        print("%d checks failed" % len(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
