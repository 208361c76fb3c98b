#!/usr/bin/python3
"""The command line as a user meets it: `lpipe reduce` (inputs, outputs,
templates, --force, --dry-run, parallel failures, kohya spellings), ready
pipelines by name, what a run prints (summary, --verbose, -q), `lpipe info`
(summary, --tensors, --json, several files, what a wrong file is), escaped
names, per-command help, the launch hint, and the warning format.

Numbers in the summaries are checked against numpy: the relative error of a
rank-k truncation is sqrt(sum_{i>k} s_i^2 / sum s_i^2) over the singular
values of the module's update, computed here from the factors by QR
(Eckart-Young), independently of lpipe.
"""
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import atexit
import shutil
import tempfile
import zipfile

import numpy as np

LPIPE = os.environ["LPIPE"]
SOURCE = os.environ["LPIPE_SOURCE_ROOT"]
ORACLE = os.path.join(SOURCE, "tests", "plugins", "lora_oracle.py")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def lpipe(*args, env=None, cwd=None):
    return subprocess.run([LPIPE, *args], capture_output=True, text=True, env=env, cwd=cwd)


def synth(path, preset="sd15-unet", rank=8, fmt="kohya", seed=0, extra=()):
    p = lpipe("-q", "launch", "lora-synth", "preset=" + preset, "rank=%d" % rank, "format=" + fmt,
              "seed=%d" % seed, *extra, "!", "safetensors-sink", "location=" + path)
    assert p.returncode == 0, p.stderr


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: float32 array}; written the way safetensors does."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_tensor(path, name):
    header = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        data = f.read()[n:]
    e = header[name]
    b, end = e["data_offsets"]
    raw = data[b:end]
    if e["dtype"] == "BF16":
        arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4")
    else:
        arr = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4"}[e["dtype"]])
    return arr.astype(np.float64).reshape(e["shape"])


def same_tensors(a, b):
    """The same tensors, names, dtypes, shapes and bytes (the metadata records
    where the file was written, so it may differ)."""
    ha, hb = read_header(a), read_header(b)
    ha.pop("__metadata__", None)
    hb.pop("__metadata__", None)
    if ha != hb:
        return False
    da, db = open(a, "rb").read(), open(b, "rb").read()
    return da[8 + struct.unpack("<Q", da[:8])[0]:] == db[8 + struct.unpack("<Q", db[:8])[0]:]


def truncation_errors(path, k):
    """{module: relative error of its best rank-k approximation} for a kohya file."""
    header = read_header(path)
    out = {}
    for name in header:
        if not name.endswith(".lora_down.weight"):
            continue
        mod = name[:-len(".lora_down.weight")]
        a = read_tensor(path, name).reshape(read_header(path)[name]["shape"][0], -1)
        b = read_tensor(path, mod + ".lora_up.weight")
        b = b.reshape(b.shape[0], -1)
        s = np.linalg.svd(np.linalg.qr(b)[1] @ np.linalg.qr(a.T)[1].T, compute_uv=False)
        out[mod[len("lora_unet_"):] if False else mod] = float(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)))
    return out


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-cli-")
    atexit.register(shutil.rmtree, tmp, True)   # also when a check fails
    lora = os.path.join(tmp, "lora.safetensors")
    synth(lora)

    # ---- reduce one file --------------------------------------------------
    p = lpipe("reduce", lora, "--rank", "4")
    out = os.path.join(tmp, "lora-r4.safetensors")
    check(p.returncode == 0 and os.path.exists(out), "reduce: exit 0, output named {stem}-r{rank}.safetensors")
    subprocess.run(["/usr/bin/python3", ORACLE, "svd", out, "4", "1", lora], check=True)
    check("read   %s: " % lora in p.stderr and "128 LoRA modules of rank 8" in p.stderr,
          "reduce: the summary says what was read, with modules and ranks")
    check(re.search(r"wrote  %s: [0-9.]+ [kM]?B, 128 LoRA modules of rank 4" % re.escape(out), p.stderr),
          "reduce: the summary says what was written where, its size and ranks")
    check(len(p.stderr.splitlines()) <= 8 and "rank num-rank" not in p.stdout,
          "reduce: a short summary, no per-module table by default")
    errors = truncation_errors(lora, 4)
    m = re.search(r"mean ([0-9.e+-]+), max ([0-9.e+-]+)", p.stderr)
    want_mean, want_max = np.mean(list(errors.values())), max(errors.values())
    # printed with 3 significant digits; the factors are bf16
    check(m and abs(float(m.group(1)) - want_mean) < 2e-3 + 5e-3 * want_mean
          and abs(float(m.group(2)) - want_max) < 2e-3 + 5e-3 * want_max,
          "reduce: mean and max error match numpy's truncation error (%s vs %.4g, %.4g)"
          % (m.groups() if m else None, want_mean, want_max))
    worst = max(errors, key=errors.get)
    worst_line = [l for l in p.stderr.splitlines() if l.startswith("worst")]
    check(worst_line and worst in worst_line[0], "reduce: the worst module is named (%s)" % worst)

    # ---- existing outputs, --force -------------------------------------------
    before = open(out, "rb").read()
    os.utime(out, (1, 1))
    p = lpipe("reduce", lora, "--rank", "4")
    check(p.returncode == 1 and "exists already; --force overwrites" in p.stderr
          and os.stat(out).st_mtime == 1 and open(out, "rb").read() == before,
          "reduce: an existing output is not touched without --force, exit 1")
    p = lpipe("reduce", lora, "--rank", "4", "--force")
    check(p.returncode == 0 and os.stat(out).st_mtime != 1 and open(out, "rb").read() == before,
          "reduce --force: overwritten, the same bytes")

    # ---- -o and folders as outputs ------------------------------------------
    folder_out = os.path.join(tmp, "a-folder")
    os.mkdir(folder_out)
    p = lpipe("reduce", lora, "--rank", "2", "-o", folder_out)
    check(p.returncode == 1 and "a folder" in p.stderr and "--output-dir" in p.stderr
          and os.listdir(folder_out) == [] and "read " not in p.stderr,
          "reduce -o FOLDER: an error before any work, naming --output-dir")
    p = lpipe("reduce", lora, "--rank", "2", "-o", os.path.join(tmp, "named.safetensors"))
    check(p.returncode == 0 and os.path.exists(os.path.join(tmp, "named.safetensors")), "reduce -o FILE")
    p = lpipe("reduce", lora, out, "--rank", "2", "-o", os.path.join(tmp, "x.safetensors"))
    check(p.returncode == 2 and "-o names one output" in p.stderr, "reduce -o with two inputs: misuse")

    # ---- a folder, one bad file, parallel ------------------------------------
    many = os.path.join(tmp, "many")
    os.mkdir(many)
    for i in range(4):
        synth(os.path.join(many, "l%d.safetensors" % i), seed=i + 1)
    with open(os.path.join(many, "broken.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    red = os.path.join(tmp, "reduced")
    p = lpipe("-j", "2", "reduce", many, "--rank", "2", "--output-dir", red)
    check(p.returncode == 1, "reduce folder: exit 1 when one file failed")
    check(sorted(os.listdir(red)) == ["l%d-r2.safetensors" % i for i in range(4)],
          "reduce folder: the other files are all written (%s)" % sorted(os.listdir(red)))
    table = p.stderr
    check(re.search(r"broken\.safetensors +failed: ", table) and "lpipe: error: " + os.path.join(many, "broken.safetensors") in table,
          "reduce folder: the failed file is reported, in the table and as an error")
    rows = [l for l in table.splitlines() if re.match(r".*l[0-3]\.safetensors +8 → 2 +[0-9.]+ [kM]?B → [0-9.]+ [kM]?B +[0-9.]", l)]
    check(len(rows) == 4, "reduce folder: a row per file: ranks in → out, size in → out, errors")
    check(re.search(r"5 files: 4 reduced \(.* → .*\), 1 failed", table), "reduce folder: a total line")
    for i in range(4):
        e = truncation_errors(os.path.join(many, "l%d.safetensors" % i), 2)
        row = [l for l in rows if "l%d.safetensors" % i in l][0]
        mean, mx = [float(x) for x in row.split()[-2:]]
        check(abs(mean - np.mean(list(e.values()))) < 2e-3 and abs(mx - max(e.values())) < 2e-3,
              "reduce folder: l%d's errors match numpy" % i)
    # the same bytes one file at a time
    seq = os.path.join(tmp, "sequential")
    p = lpipe("-j", "1", "reduce", os.path.join(many, "l0.safetensors"), os.path.join(many, "l3.safetensors"),
              "--rank", "2", "-d", seq)
    check(p.returncode == 0 and all(same_tensors(os.path.join(seq, n), os.path.join(red, n))
                                    for n in ("l0-r2.safetensors", "l3-r2.safetensors")),
          "reduce: files reduced side by side equal those reduced one at a time")

    # ---- globs, templates, dynamic names --------------------------------------
    p = lpipe("reduce", os.path.join(many, "l[12].safetensors"), "--rank", "3", "-d", os.path.join(tmp, "glob"),
              "--name", "{stem}.{method}.k{rank}.safetensors")
    check(p.returncode == 0 and sorted(os.listdir(os.path.join(tmp, "glob"))) ==
          ["l1.exact.k3.safetensors", "l2.exact.k3.safetensors"], "reduce: a quoted glob, and --name's fields")
    p = lpipe("reduce", lora, "--sv-fro", "0.9", "--max-rank", "6", "-d", os.path.join(tmp, "dyn"))
    check(p.returncode == 0 and os.listdir(os.path.join(tmp, "dyn")) == ["lora-svfro0.9.safetensors"],
          "reduce: a dynamic criterion names the output {stem}-{criterion}")
    p = lpipe("reduce", lora, "--rank", "3", "--name", "{stem}-{size}.safetensors", "-d", tmp)
    check(p.returncode == 2 and "unknown field" in p.stderr, "reduce --name: an unknown field is misuse")
    p = lpipe("reduce", many, "--rank", "3", "--name", "same.safetensors", "-d", os.path.join(tmp, "same"))
    check(p.returncode == 2 or (p.returncode == 1 and "two inputs would write" in p.stderr),
          "reduce --name without {stem} for many files: refused")
    check(not os.path.exists(os.path.join(tmp, "same", "same.safetensors")), "reduce: ... and nothing written")

    # ---- kohya's spellings -------------------------------------------------------
    k_out = os.path.join(tmp, "kohya.safetensors")
    p = lpipe("reduce", "--model", lora, "--save_to", k_out, "--dynamic_method", "sv_fro",
              "--dynamic_param", "0.9", "--new_rank", "6")
    check(p.returncode == 0 and same_tensors(k_out, os.path.join(tmp, "dyn", "lora-svfro0.9.safetensors")),
          "reduce: kohya's --dynamic_method sv_fro --new_rank 6 is --sv-fro with --max-rank 6")
    # --save_precision is read as kohya's str_to_dtype reads it (library/utils.py:
    # "fp32"/"float32"/"float", "fp16"/"float16", "bf16"/"bfloat16", "fp8_e4m3fn", ...)
    for spelling, nick, st in (("float", "f32", "F32"), ("fp32", "f32", "F32"), ("float16", "f16", "F16"),
                               ("bfloat16", "bf16", "BF16"), ("fp8_e4m3fn", "f8-e4m3", "F8_E4M3")):
        p = lpipe("reduce", lora, "--new_rank", "2", "--save_precision", spelling, "--dry-run")
        words = shlex.split(p.stdout.strip().splitlines()[0]) if p.returncode == 0 and p.stdout.strip() else []
        check("dtype=" + nick in words, "reduce: kohya's --save_precision %s is cast dtype=%s" % (spelling, nick))
    prec_out = os.path.join(tmp, "prec.safetensors")
    p = lpipe("reduce", lora, "--new_rank", "2", "--save_precision", "float16", "-o", prec_out)
    check(p.returncode == 0 and {v["dtype"] for k, v in read_header(prec_out).items() if k != "__metadata__"}
          == {"F16"}, "reduce: --save_precision float16 writes F16 tensors")
    for bad in ("fp17", "int8"):
        p = lpipe("reduce", lora, "--new_rank", "2", "--save_precision", bad, "-o", prec_out + ".bad")
        check(p.returncode == 2 and "--save_precision " + bad in p.stderr and not os.path.exists(prec_out + ".bad"),
              "reduce: --save_precision %s (not a float dtype) is refused by name" % bad)
    p = lpipe("reduce", lora, "--sv-fro", "0.9", "--rank", "16")
    check(p.returncode == 2 and "--max-rank 16" in p.stderr, "reduce: --sv-fro with --rank points at --max-rank")
    p = lpipe("reduce", lora, "--new_rank", "4", "--device", "cuda")
    check(p.returncode == 2 and "--device" in p.stderr, "reduce: kohya's --device is refused by name")
    p = lpipe("reduce", lora)
    check(p.returncode == 2 and "--rank N" in p.stderr, "reduce without a rank: says how to give one")

    # ---- --dry-run: prints what it would run, and that runs -----------------------
    dry_dir = os.path.join(tmp, "dry")
    p = lpipe("reduce", os.path.join(many, "l1.safetensors"), "--rank", "2", "-d", dry_dir, "--dry-run")
    lines = p.stdout.strip().splitlines()
    check(p.returncode == 0 and len(lines) == 1 and lines[0].startswith("lpipe launch safetensors-source")
          and not os.path.exists(os.path.join(dry_dir, "l1-r2.safetensors")),
          "reduce --dry-run: one lpipe launch line per file, nothing written")
    os.makedirs(dry_dir, exist_ok=True)
    words = shlex.split(lines[0])
    q = subprocess.run([LPIPE, "-q", *words[1:]], capture_output=True, text=True)
    check(q.returncode == 0 and same_tensors(os.path.join(dry_dir, "l1-r2.safetensors"),
                                             os.path.join(red, "l1-r2.safetensors")),
          "reduce --dry-run: the printed pipeline runs and writes what reduce writes")
    dry_line = lpipe("reduce", lora, "--rank", "4", "--force", "--dry-run").stdout.strip()
    before_meta = open(out, "rb").read()
    path_env = dict(os.environ, PATH=os.path.dirname(LPIPE) + os.pathsep + os.environ["PATH"])
    q = subprocess.run(["bash", "-c", dry_line], capture_output=True, text=True, env=path_env)
    check(q.returncode == 0 and open(out, "rb").read() == before_meta,
          "reduce --dry-run: run in place, byte for byte what reduce wrote (metadata too)")

    # the default pipeline has no rank-check (lora-svd's record gives the
    # errors); --report adds one, and writes each file's report by template
    check(" rank-check " not in lines[0] and " ! lora-svd rank=2 ! safetensors-sink " in lines[0],
          "reduce --dry-run: source ! lora-svd ! sink by default")
    rep_dir = os.path.join(tmp, "rep")
    p = lpipe("reduce", os.path.join(many, "l1.safetensors"), os.path.join(many, "l2.safetensors"), "--rank", "2",
              "-d", rep_dir, "--report", os.path.join(rep_dir, "{stem}.json"))
    reports = sorted(f for f in os.listdir(rep_dir) if f.endswith(".json")) if os.path.isdir(rep_dir) else []
    check(p.returncode == 0 and reports == ["l1.json", "l2.json"], "reduce --report: one report per file, by template")
    if reports:
        rep = json.load(open(os.path.join(rep_dir, "l1.json")))
        e = truncation_errors(os.path.join(many, "l1.safetensors"), 2)
        got = {m["name"]: m["rel_error"] for m in rep["modules"]}
        check(len(got) == 128 and all(abs(got[k] - e[k]) < 2e-3 for k in e),
              "reduce --report: every module's error, as numpy computes it")
    p = lpipe("reduce", many, "--rank", "2", "-d", rep_dir, "--report", "same.json", "--force")
    check(p.returncode == 2 and "{stem}" in p.stderr, "reduce --report without {stem} for many files: misuse")

    # ---- PEFT folders stay folders ---------------------------------------------------
    peft = os.path.join(tmp, "my-adapter")
    os.mkdir(peft)
    synth(os.path.join(peft, "adapter_model.safetensors"), preset="sd15-unet", fmt="peft", rank=8)
    with open(os.path.join(peft, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                   "task_type": None}, f)
    p = lpipe("reduce", peft, "--rank", "4")
    outdir = os.path.join(tmp, "my-adapter-r4")
    check(p.returncode == 0 and os.path.isdir(outdir)
          and sorted(os.listdir(outdir)) == ["adapter_config.json", "adapter_model.safetensors"],
          "reduce PEFT folder: written as a folder {stem}-r{rank}/ (%s)" % p.stderr.strip()[-200:])
    if os.path.isdir(outdir):
        config = json.load(open(os.path.join(outdir, "adapter_config.json")))
        check(config["r"] == 4, "reduce PEFT folder: its adapter_config.json has r = 4")

    # ---- -q and --verbose --------------------------------------------------------------
    p = lpipe("-q", "reduce", lora, "--rank", "4", "--force")
    check(p.returncode == 0 and p.stdout == "" and p.stderr == "", "reduce -q: prints nothing on success")
    p = lpipe("-v", "reduce", lora, "--rank", "4", "--force")
    check(p.returncode == 0 and len([l for l in p.stdout.splitlines() if l.startswith("lora_unet_")]) == 128,
          "reduce --verbose: the per-module table")

    # ---- ready pipelines by name, and the demo's summary -------------------------------
    r2 = os.path.join(tmp, "r2.safetensors")
    p = lpipe("run", "reduce-svd", "input=" + lora, "output=" + r2, "rank=2")
    check(p.returncode == 0 and os.path.exists(r2), "run NAME: a ready pipeline found by name")
    p = lpipe("run", "reduce-svdd")
    check(p.returncode == 1 and "did you mean 'reduce-svd'?" in p.stderr, "run NAME: a close name is suggested")
    mine = os.path.join(tmp, "mine")
    os.mkdir(mine)
    with open(os.path.join(mine, "reduce-svd.pipeline"), "w") as f:
        json.dump({"lpipe": 1, "params": {"input": "x", "output": "y", "rank": 1},
                   "stages": [{"stage": "safetensors-source", "location": "${input}"},
                              {"stage": "lora-svd", "rank": 1},
                              {"stage": "safetensors-sink", "location": "${output}"}]}, f)
    env = dict(os.environ, LPIPE_PIPELINE_PATH=mine + ":" + os.environ.get("LPIPE_PIPELINE_PATH", ""))
    r1 = os.path.join(tmp, "r1.safetensors")
    p = lpipe("run", "reduce-svd", "input=" + lora, "output=" + r1, "rank=3", env=env)
    check(p.returncode == 0 and "of rank 1" in p.stderr, "run NAME: LPIPE_PIPELINE_PATH comes first")
    p = lpipe("run", "demo", "output=" + os.path.join(tmp, "demo.safetensors"), "report=" + os.path.join(tmp, "d.json"))
    check(p.returncode == 0 and len(p.stdout.splitlines()) + len(p.stderr.splitlines()) <= 8
          and "wrote  %s" % os.path.join(tmp, "demo.safetensors") in p.stderr and "494 LoRA modules of rank 4" in p.stderr,
          "run demo: a readable summary naming what it wrote, not 494 rows")
    p = lpipe("-q", "run", "demo", "output=" + os.path.join(tmp, "demo.safetensors"), "report=" + os.path.join(tmp, "d.json"))
    check(p.returncode == 0 and p.stdout == "" and p.stderr == "", "run demo -q: nothing printed")

    # ---- help ----------------------------------------------------------------------------
    for cmd in ("reduce", "run", "validate", "launch", "inspect", "info"):
        p = lpipe(cmd, "--help")
        check(p.returncode == 0 and p.stdout.startswith("Usage: lpipe " + cmd) and "Example" in p.stdout
              and ("lpipe %s " % cmd) in p.stdout.split("Example", 1)[1],
              "%s --help: the command's usage with an example" % cmd)
    p = lpipe("--help")
    check(p.returncode == 0 and all(("  lpipe %s " % c) in p.stdout for c in ("reduce", "run", "info")),
          "--help: every command")

    # ---- the launch hint -------------------------------------------------------------------
    p = lpipe("launch", "safetensors-source", "lora.safetensors", "!", "safetensors-sink", "location=x.safetensors")
    check(p.returncode == 1 and "did you mean location=lora.safetensors?" in p.stderr and "'!'" not in p.stderr,
          "launch: a bare file name after a source names location=")

    # ---- info ------------------------------------------------------------------------------
    p = lpipe("info", lora)
    lines = p.stdout.splitlines()
    check(p.returncode == 0 and lines[0].startswith(lora + ": 384 tensors"), "info: the summary comes first")
    check(any(re.match(r"  LoRA +128 modules, kohya keys", l) for l in lines)
          and any(re.match(r"  rank +8 \(128\)", l) for l in lines)
          and any(re.match(r"  alpha +", l) for l in lines) and any(re.match(r"  scale +", l) for l in lines)
          and any("Stable Diffusion 1.x" in l for l in lines),
          "info: convention, rank histogram, alpha, scale, base-model hint")
    check(len(lines) < 20 and "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" not in p.stdout,
          "info: no tensor listing by default")
    p = lpipe("info", "--tensors", lora)
    check(p.stdout.count(".lora_down.weight") == 128, "info --tensors: every tensor listed")
    p = lpipe("info", "--json", lora)
    info = json.loads(p.stdout)
    header = read_header(lora)
    mods = {m["name"]: m for m in info["modules"]}
    ok = len(mods) == 128
    for name, m in list(mods.items())[:20]:
        down = header[name + ".lora_down.weight"]
        up = header[name + ".lora_up.weight"]
        ok = ok and m["rank"] == down["shape"][0] and m["down"]["shape"] == down["shape"] \
            and m["up"]["shape"] == up["shape"] and m["convention"] == "kohya" and "family" in m
        alpha = read_tensor(lora, name + ".alpha").reshape(-1)[0]
        ok = ok and abs(m["alpha"] - alpha) < 1e-6 and abs(m["scale"] - alpha / m["rank"]) < 1e-9
    check(ok and info["rank-histogram"] == {"8": 128}, "info --json: per-module rank, alpha, scale, family, shapes")
    p = lpipe("info", "--json", lora, out)
    both = json.loads(p.stdout)
    check(isinstance(both, list) and [b["file"] for b in both] == [lora, out], "info --json: several files, an array")

    # what a wrong file is
    pt = os.path.join(tmp, "model.pt")
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    legacy = os.path.join(tmp, "legacy.ckpt")
    with open(legacy, "wb") as f:
        f.write(pickle.dumps({"state_dict": {}}, protocol=2))
    plain = os.path.join(tmp, "plain")
    os.mkdir(plain)
    pipeline = os.path.join(SOURCE, "pipelines", "reduce-svd.pipeline")
    p = lpipe("info", lora, pt, legacy, plain, pipeline)
    err = p.stderr
    check(p.returncode == 1 and p.stdout.startswith(lora + ":"), "info: several files; the good one shown, exit 1")
    check("model.pt: a zip archive: a PyTorch checkpoint" in err, "info: a .pt zip is named a PyTorch checkpoint")
    check("legacy.ckpt: a Python pickle" in err, "info: a pickle is named")
    check("plain: a folder, not a safetensors file" in err, "info: a folder is named")
    check("reduce-svd.pipeline: a pipeline file" in err and "lpipe run" in err, "info: a pipeline file is named")
    check("header length" not in err, "info: no 'header length' for files that are not safetensors")
    p = lpipe("info", peft)
    check(p.returncode == 0 and "adapter_model.safetensors" in p.stdout.splitlines()[0]
          and "PEFT adapter_config.json" in p.stdout, "info: a PEFT folder stands for its adapter_model.safetensors")
    # mlx-lm writes an adapter_config.json of its own (mlx_lm.tuner.utils), claimed by the mlx family
    os.mkdir(os.path.join(tmp, "mlx"))
    mlx = os.path.join(tmp, "mlx", "adapters.safetensors")
    synth(mlx, preset="llama", fmt="mlx")
    p = lpipe("info", mlx)
    check(p.returncode == 0 and "mlx-lm adapter_config.json beside it" in p.stdout and "PEFT" not in p.stdout,
          "info: mlx-lm's adapter_config.json is named mlx-lm's, not PEFT's")
    # a sharded checkpoint (as huggingface_hub's split_state_dict_into_shards_factory writes it):
    # its folder or its index is one checkpoint, for info and for the run's summary
    shards, shards4 = os.path.join(tmp, "sharded"), os.path.join(tmp, "sharded-r4")
    os.mkdir(shards)
    os.mkdir(shards4)
    p = lpipe("-q", "launch", "lora-synth", "preset=sd15-unet", "rank=8", "format=kohya", "!", "safetensors-sink",
              "location=" + os.path.join(shards, "model.safetensors.index.json"), "max-shard-size=1MB")
    check(p.returncode == 0, "a sharded input is written")
    check(len([f for f in os.listdir(shards) if f.endswith(".safetensors")]) > 1, "the sharded input has several shards")
    for where in (shards, os.path.join(shards, "model.safetensors.index.json")):
        p = lpipe("info", where)
        check(p.returncode == 0 and p.stdout.startswith(where + ": 384 tensors, 3.2 MB")
              and "128 modules" in p.stdout, "info: a sharded checkpoint's %s is one checkpoint"
              % ("folder" if where == shards else "index"))
    p = lpipe("launch", "safetensors-source", "location=" + shards, "!", "lora-svd", "rank=4", "!",
              "safetensors-sink", "location=" + shards4, "max-shard-size=1MB")
    check(p.returncode == 0 and "read   %s: 3.2 MB, 128 LoRA modules of rank 8" % shards in p.stderr
          and "wrote  %s: 1.6 MB, 128 LoRA modules of rank 4" % shards4 in p.stderr,
          "a run's summary gives a sharded input's and output's sizes and ranks")

    # ---- control characters are escaped ------------------------------------------------
    evil = os.path.join(tmp, "evil.safetensors")
    esc_name = "lora_unet_x\x1b]0;pwned\x07\x1b[2J"
    write_safetensors(evil, {esc_name + ".lora_down.weight": np.ones((2, 4)),
                             esc_name + ".lora_up.weight": np.ones((4, 2)),
                             "plain\x9b31m": np.ones(1)},
                      metadata={"ss_note\x1b[31m": "red\x1b[0m\nline two", "format": "pt"})
    outs = []
    for args in (("info", evil), ("info", "--tensors", evil), ("info", "--json", evil)):
        p = lpipe(*args)
        outs.append(p.stdout + p.stderr)
    check(all("\x1b" not in o and "\x07" not in o and "\x9b" not in o for o in outs),
          "info: no raw control character reaches the terminal (text, --tensors; JSON escapes them)")
    check("\\e]0;pwned\\x07" in outs[1] and "red\\e[0m\\nline two" in outs[0],
          "info: control characters shown as visible escapes")
    bad = os.path.join(tmp, "bad-name.safetensors")
    text = json.dumps({"x\u001b[2Jy": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    text += b" " * (-len(text) % 8)
    with open(bad, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"\0\0\0\0")
    p = lpipe("info", bad)
    check(p.returncode == 1 and "lpipe: error:" in p.stderr and "\x1b" not in p.stderr,
          "errors: a tensor name in an error message is escaped (%r)" % p.stderr[:200])

    # ---- warnings: one format, -q silences them ------------------------------------------
    fake = os.path.join(tmp, "fake-plugins")
    os.mkdir(fake)
    os.chmod(fake, 0o755)
    with open(os.path.join(fake, "libnotaplugin.so"), "wb") as f:
        f.write(b"\x7fELF this is not a shared object")
    env = dict(os.environ, LPIPE_PLUGIN_PATH=fake + ":" + os.environ["LPIPE_PLUGIN_PATH"])
    p = lpipe("inspect", env=env)
    check(p.returncode == 0 and "lpipe: warning: " in p.stderr and "WARNING **" not in p.stderr
          and all(l.startswith("lpipe: ") for l in p.stderr.splitlines()),
          "warnings: printed as 'lpipe: warning:' lines, not GLib's format (%r)" % p.stderr[:200])
    p = lpipe("-q", "inspect", env=env)
    check(p.stderr == "", "warnings: -q silences them")

    if failures:
        print("%d failures" % len(failures))
        sys.exit(1)
    print("all CLI checks pass")


main()
