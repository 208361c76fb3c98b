#!/usr/bin/python3
# test_sharded.py: sharded checkpoints read as one (safetensors-source on a
# *.safetensors.index.json or its folder) and written (safetensors-sink
# max-shard-size)
#
# The shards are written the way Hugging Face writes them
# (huggingface_hub's split_torch_state_dict_into_shards and
# save_torch_state_dict: model-00001-of-00003.safetensors, ...,
# model.safetensors.index.json = {"metadata": {"total_size": N},
# "weight_map": {tensor: shard}}, tensors in state-dict order, a shard
# closed when the next tensor would pass max_shard_size).
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
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def st_bytes(tensors, meta=None):
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def read_tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]])
            for k, v in header.items()}, meta


def save_sharded(folder, tensors, max_shard_bytes, prefix="model"):
    """huggingface_hub's rule: tensors in order, a new shard when the next one
    would make the current one larger than max_shard_bytes"""
    os.makedirs(folder, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, x in tensors.items():
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "%s-%05d-of-%05d.safetensors" % (prefix, i + 1, len(shards))
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(st_bytes(shard, {"format": "pt"}))
        weight_map.update({name: fname for name in shard})
    index = os.path.join(folder, prefix + ".safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return index, len(shards)


def run(*args):
    return subprocess.run([LPIPE] + list(args), capture_output=True, text=True)


def model(seed):
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(3):
        for proj, shape in (("q_proj", (32, 32)), ("k_proj", (16, 32)), ("v_proj", (16, 32)),
                            ("o_proj", (32, 32))):
            out["model.layers.%d.self_attn.%s.weight" % (layer, proj)] = rng.normal(size=shape).astype(np.float32)
        out["model.layers.%d.input_layernorm.weight" % layer] = np.ones(32, np.float32)
    return out


def check_read(tmp):
    tensors = model(1)
    folder = os.path.join(tmp, "sharded")
    index, n = save_sharded(folder, tensors, 10000)
    check(n >= 3, "the model is split into %d shards" % n)
    for location in (index, folder):
        out = os.path.join(tmp, "whole.safetensors")
        p = run("-q", "launch", "safetensors-source", "location=" + location, "!",
                "safetensors-sink", "location=" + out)
        check(p.returncode == 0, "read %s: %s" % (location, p.stderr))
        got, meta = read_tensors(out)
        check(list(got) == list(tensors), "read %s: every tensor, in the shards' order" % location)
        check(all(got[k][2] == tensors[k].tobytes() for k in tensors), "read %s: the bytes" % location)
        check(meta.get("format") == "pt", "read %s: the first shard's metadata" % location)
        os.unlink(out)

    # a fused output of the sharded model is the fused output of the whole one
    whole = os.path.join(tmp, "model.safetensors")
    with open(whole, "wb") as f:
        f.write(st_bytes(tensors, {"format": "pt"}))
    rng = np.random.default_rng(2)
    lora = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": rng.normal(size=(4, 32)),
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": rng.normal(size=(32, 4))}
    lora_path = os.path.join(tmp, "lora.safetensors")
    with open(lora_path, "wb") as f:
        f.write(st_bytes(lora))
    outs = []
    for i, src in enumerate((index, whole)):
        out = os.path.join(tmp, "fused-%d.safetensors" % i)
        pipeline = os.path.join(tmp, "fuse-%d.pipeline" % i)
        json.dump({"lpipe": 1, "stages": [
            {"id": "m", "stage": "safetensors-source", "location": src},
            {"id": "l", "stage": "safetensors-source", "location": lora_path},
            {"stage": "lora-fuse", "inputs": ["m", "l"]},
            {"stage": "safetensors-sink", "location": out}]}, open(pipeline, "w"))
        p = run("-q", "run", pipeline)
        check(p.returncode == 0, "fuse %s: %s" % (src, p.stderr))
        outs.append(read_tensors(out)[0])
    check(outs[0] == outs[1], "fused outputs of the sharded and the whole model are the same")


def check_errors(tmp):
    tensors = model(3)
    cases = []

    _, n = save_sharded(os.path.join(tmp, "count"), tensors, 10000)
    first, second = "model-00001-of-%05d.safetensors" % n, "model-00002-of-%05d.safetensors" % n

    def case(name, edit, expect):
        folder = os.path.join(tmp, name)
        index, _ = save_sharded(folder, tensors, 10000)
        edit(folder, index)
        cases.append((name, index, expect))

    def missing_shard(folder, index):
        os.unlink(os.path.join(folder, second))

    def extra_tensor(folder, index):
        shard = os.path.join(folder, first)
        got, _ = read_tensors(shard)
        names = list(got)
        extra = {n: np.frombuffer(got[n][2], np.float32).reshape(got[n][1]) for n in names}
        extra["model.extra.weight"] = np.zeros(3, np.float32)
        with open(shard, "wb") as f:
            f.write(st_bytes(extra))

    def unmapped(folder, index):
        data = json.load(open(index))
        data["weight_map"]["model.layers.9.mlp.weight"] = first
        json.dump(data, open(index, "w"))

    def duplicated(folder, index):
        # the same tensor in two shards: the index can map it to only one
        a, _ = read_tensors(os.path.join(folder, first))
        b, _ = read_tensors(os.path.join(folder, second))
        both = {n: np.frombuffer(v[2], np.float32).reshape(v[1]) for n, v in b.items()}
        name = list(a)[0]
        both[name] = np.frombuffer(a[name][2], np.float32).reshape(a[name][1])
        with open(os.path.join(folder, second), "wb") as f:
            f.write(st_bytes(both))

    def escaping(folder, index):
        data = json.load(open(index))
        name = list(data["weight_map"])[0]
        data["weight_map"][name] = "../" + first
        json.dump(data, open(index, "w"))

    def no_map(folder, index):
        json.dump({"metadata": {}}, open(index, "w"))

    case("missing-shard", missing_shard, "shard %s is missing" % second)
    case("extra-tensor", extra_tensor, "holds tensor model.extra.weight, which the index does not name")
    case("unmapped", unmapped, "tensor model.layers.9.mlp.weight is mapped to shard %s, which does not hold it" % first)
    case("duplicated", duplicated, "which the index maps to %s" % first)
    case("escaping", escaping, "not a file beside the index")
    case("no-map", no_map, "no \"weight_map\"")

    for name, index, expect in cases:
        out = os.path.join(tmp, name + ".safetensors")
        p = run("launch", "safetensors-source", "location=" + index, "!", "safetensors-sink",
                "location=" + out)
        check(p.returncode == 1 and expect in p.stderr and "index.json" in p.stderr,
              "%s: an error naming the index and %r (%r)" % (name, expect, p.stderr))
        check(not os.path.exists(out), "%s: nothing written" % name)

    empty = os.path.join(tmp, "empty-folder")
    os.makedirs(empty)
    p = run("launch", "safetensors-source", "location=" + empty, "!", "safetensors-sink",
            "location=" + os.path.join(tmp, "e.safetensors"))
    check(p.returncode == 1 and "without a sharded checkpoint" in p.stderr, "an empty folder (%r)" % p.stderr)
    two = os.path.join(tmp, "two")
    save_sharded(two, tensors, 10000, "model")
    save_sharded(two, tensors, 10000, "other")
    p = run("launch", "safetensors-source", "location=" + two, "!", "safetensors-sink",
            "location=" + os.path.join(tmp, "t.safetensors"))
    check(p.returncode == 1 and "two sharded checkpoints" in p.stderr, "a folder with two indexes (%r)" % p.stderr)


def hf_split(sizes, max_shard_size):
    """huggingface_hub serialization/_base.py, split_state_dict_into_shards_factory:
    tensors in order; a tensor larger than max_shard_size goes alone into a
    shard appended at once (before the one being filled); otherwise a shard is
    closed when the next tensor would take it past max_shard_size."""
    shards, current, size = [], [], 0
    for name, n in sizes:
        if n > max_shard_size:
            shards.append([name])
            continue
        if size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def hf_names(n, stem="model"):
    # filename_pattern.format(suffix=f"-{idx + 1:05d}-of-{nb_shards:05d}")
    return ["%s-%05d-of-%05d.safetensors" % (stem, i + 1, n) for i in range(n)] if n > 1 else \
        ["%s.safetensors" % stem]


def write_model(path, tensors, meta):
    with open(path, "wb") as f:
        f.write(st_bytes(tensors, meta))


def sink(src, dest, *props, extra=()):
    return run("-q", "launch", "safetensors-source", "location=" + src, *extra, "!", "safetensors-sink",
               "location=" + dest, "provenance=false", *props)


def folder_state(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def check_write(tmp):
    rng = np.random.default_rng(7)
    tensors = model(5)
    # one tensor larger than the limit on its own, in the middle
    names = list(tensors)
    big = "model.embed_tokens.weight"
    tensors = dict([(n, tensors[n]) for n in names[:4]] + [(big, rng.normal(size=(64, 80)).astype(np.float32))]
                   + [(n, tensors[n]) for n in names[4:]])
    meta = {"format": "pt", "note": "sharded round trip"}
    whole = os.path.join(tmp, "w-model.safetensors")
    write_model(whole, tensors, meta)
    limit = 10000
    expect = hf_split([(n, x.nbytes) for n, x in tensors.items()], limit)
    files = hf_names(len(expect))
    check(len(expect) >= 4 and any(big in shard and len(shard) == 1 for shard in expect),
          "the test model has %d shards, the big tensor alone in one" % len(expect))

    for location in ("out/model.safetensors", "out/model.safetensors.index.json", "out"):
        folder = os.path.join(tmp, "write-" + location.replace("/", "-").replace(".", "-"))
        os.makedirs(os.path.join(folder, "out"))
        p = sink(whole, os.path.join(folder, location), "max-shard-size=%d" % limit)
        out = os.path.join(folder, "out")
        check(p.returncode == 0, "write to %s: %s" % (location, p.stderr))
        check(sorted(os.listdir(out)) == sorted(files + ["model.safetensors.index.json"]),
              "%s: exactly the shards and the index, no temporary file (%s)" % (location, os.listdir(out)))
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        check(index["metadata"] == {"total_size": sum(x.nbytes for x in tensors.values())},
              "%s: metadata.total_size is the tensor bytes" % location)
        check(index["weight_map"] == {n: files[i] for i, shard in enumerate(expect) for n in shard},
              "%s: the weight_map is huggingface_hub's split" % location)
        for i, shard in enumerate(expect):
            got, got_meta = read_tensors(os.path.join(out, files[i]))
            check(list(got) == shard, "%s: shard %d holds %s in order" % (location, i + 1, shard))
            check(all(got[n][2] == tensors[n].tobytes() and got[n][1] == list(tensors[n].shape) for n in shard),
                  "%s: shard %d's bytes" % (location, i + 1))
            check(got_meta == meta, "%s: shard %d carries the metadata" % (location, i + 1))
            size = sum(tensors[n].nbytes for n in shard)
            check(size <= limit or shard == [big],
                  "%s: shard %d is within max-shard-size unless it is one larger tensor" % (location, i + 1))
    out = os.path.join(tmp, "write-out-model-safetensors", "out")
    check(os.path.getsize(os.path.join(out, files[[big] in expect and expect.index([big])])) > limit,
          "the big tensor's shard is larger than max-shard-size, as Hugging Face allows")

    # byte for byte: the sharded read of the sharded write is the original,
    # and writing it sharded again gives the same files
    back = os.path.join(tmp, "back.safetensors")
    p = sink(out, back)
    check(p.returncode == 0, "read the sharded write: %s" % p.stderr)
    got, got_meta = read_tensors(back)
    check(sorted(got) == sorted(tensors) and got_meta == meta, "the sharded read has every tensor and the metadata")
    check(all(got[n][2] == tensors[n].tobytes() and got[n][1] == list(tensors[n].shape) for n in tensors),
          "the sharded read's bytes are the original's")
    # (the big tensor's shard comes before the one it interrupted, so the
    # shards' order differs from the model's: the copy is checked without it)
    plain = os.path.join(tmp, "plain")
    os.makedirs(plain)
    del tensors[big]
    write_model(whole, tensors, meta)
    p = sink(whole, plain, "max-shard-size=%d" % limit)
    again = os.path.join(tmp, "again")
    os.makedirs(again)
    p2 = sink(os.path.join(plain, "model.safetensors.index.json"), again, "max-shard-size=10KB")
    a, b = folder_state(again), folder_state(plain)
    check(p.returncode == 0 and p2.returncode == 0 and len(a) > 3 and a == b,
          "a sharded copy of a sharded write is byte for byte the same (%s)"
          % [n for n in set(a) | set(b) if a.get(n) != b.get(n)])

    # units as huggingface_hub's parse_size_to_int reads them (powers of 10)
    for text, n in (("0.01MB", 10000), ("10kb", 10000), ("10 KB", 10000), ("9.765625KiB", 10000)):
        folder = os.path.join(tmp, "unit-" + text.replace(" ", "_"))
        os.makedirs(folder)
        p = sink(whole, folder, "max-shard-size=" + text)
        check(p.returncode == 0 and folder_state(folder) == folder_state(plain),
              "max-shard-size=%s is %d bytes (%s)" % (text, n, p.stderr))
    for text in ("5XB", "0", "-1", "GB", "0.1", "1e30GB"):
        folder = os.path.join(tmp, "bad-unit")
        os.makedirs(folder, exist_ok=True)
        p = sink(whole, folder, "max-shard-size=" + text)
        check(p.returncode == 1 and "'max-shard-size' is '%s'" % text in p.stderr and os.listdir(folder) == [],
              "max-shard-size=%s is refused, naming it (%r)" % (text, p.stderr))
    p = sink(whole, os.path.join(tmp, "model.bin"), "max-shard-size=1GB")
    check(p.returncode == 1 and "model.bin" in p.stderr and "model.safetensors" in p.stderr,
          "a location that names no safetensors pattern is refused (%r)" % p.stderr)

    # a model that fits in one shard is one model.safetensors and no index, as
    # Hugging Face writes it
    one = os.path.join(tmp, "one")
    os.makedirs(one)
    p = sink(whole, one, "max-shard-size=5GB")
    unsharded = os.path.join(tmp, "unsharded.safetensors")
    sink(whole, unsharded)
    check(p.returncode == 0 and sorted(os.listdir(one)) == ["model.safetensors"]
          and open(os.path.join(one, "model.safetensors"), "rb").read() == open(unsharded, "rb").read(),
          "one shard: model.safetensors alone, the same bytes as unsharded (%s)" % os.listdir(one))
    # a location naming an index is sharded at huggingface_hub's MAX_SHARD_SIZE (5GB)
    named = os.path.join(tmp, "named")
    os.makedirs(named)
    p = sink(whole, os.path.join(named, "diffusion_pytorch_model.safetensors.index.json"))
    check(p.returncode == 0 and os.listdir(named) == ["diffusion_pytorch_model.safetensors"],
          "an index location with no max-shard-size: one shard at 5GB (%s)" % os.listdir(named))


def check_stale(tmp):
    """A write replaces the earlier one whole: no shard of a differently
    sized earlier write, no stale index or unsharded file is left to be read."""
    tensors = model(11)
    whole = os.path.join(tmp, "s-model.safetensors")
    write_model(whole, tensors, {"format": "pt"})
    total = sum(x.nbytes for x in tensors.values())
    folder = os.path.join(tmp, "stale")
    os.makedirs(folder)
    write_model(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    open(os.path.join(folder, "README.md"), "w").write("kept")
    seen = []
    for limit in (5000, 12000, 5000, total):
        p = sink(whole, folder, "max-shard-size=%d" % limit)
        n = len(hf_split([(k, x.nbytes) for k, x in tensors.items()], limit))
        want = sorted(hf_names(n) + (["model.safetensors.index.json"] if n > 1 else []) + ["README.md"])
        check(p.returncode == 0 and sorted(os.listdir(folder)) == want,
              "max-shard-size=%d after %s: exactly %s (%s)" % (limit, seen, want, sorted(os.listdir(folder))))
        seen.append(n)
        p = sink(folder if n > 1 else os.path.join(folder, "model.safetensors"), os.path.join(tmp, "s-back.safetensors"))
        got, _ = read_tensors(os.path.join(tmp, "s-back.safetensors"))
        check(p.returncode == 0 and all(got[k][2] == tensors[k].tobytes() for k in tensors) and len(got) == len(tensors),
              "max-shard-size=%d: reads back as the model" % limit)
    check(seen[0] != seen[1] and seen[-1] == 1, "the writes have different shard counts (%s)" % seen)

    # a failed write (a tensor of the last shard cannot be cast) changes nothing
    p = sink(whole, folder, "max-shard-size=5000")
    before = folder_state(folder)
    hot = dict(tensors)
    last = list(hot)[-1]
    hot[last] = np.full(hot[last].shape, 1e30, np.float32)
    bad = os.path.join(tmp, "s-bad.safetensors")
    write_model(bad, hot, {"format": "pt"})
    p = sink(bad, folder, "max-shard-size=2000", extra=("!", "cast", "dtype=f16"))
    check(p.returncode == 1 and last in p.stderr, "the failing write fails naming the tensor (%r)" % p.stderr)
    check(folder_state(folder) == before, "a failed sharded write leaves the folder as it was, no temporary file")


def check_pipelines(tmp):
    """fused and extracted outputs of a sharded input equal the unsharded
    ones, and a sharded output of a fuse reads back as the unsharded output"""
    tensors = model(21)
    whole = os.path.join(tmp, "p-model.safetensors")
    write_model(whole, tensors, {"format": "pt"})
    folder = os.path.join(tmp, "p-sharded")
    os.makedirs(folder)
    p = sink(whole, folder, "max-shard-size=9000")
    check(p.returncode == 0 and len(os.listdir(folder)) > 3, "the model written sharded: %s" % p.stderr)
    rng = np.random.default_rng(22)
    tuned = {k: (x + 0.1 * (rng.normal(size=(x.shape[0], 2)) @ rng.normal(size=(2, x.shape[1]))).astype(np.float32)
                 if x.ndim == 2 else x) for k, x in tensors.items()}
    tuned_path = os.path.join(tmp, "p-tuned.safetensors")
    write_model(tuned_path, tuned, {"format": "pt"})

    def run_pipeline(name, stages):
        pipeline = os.path.join(tmp, name + ".pipeline")
        json.dump({"lpipe": 1, "stages": stages}, open(pipeline, "w"))
        return run("-q", "run", pipeline)

    outs = []
    for i, base in enumerate((whole, folder)):
        out = os.path.join(tmp, "p-extract-%d.safetensors" % i)
        p = run_pipeline("extract-%d" % i, [
            {"id": "b", "stage": "safetensors-source", "location": base},
            {"id": "t", "stage": "safetensors-source", "location": tuned_path},
            {"stage": "lora-extract", "inputs": ["b", "t"], "rank": 2, "format": "diffusers"},
            {"stage": "safetensors-sink", "location": out, "provenance": False}])
        check(p.returncode == 0, "extract from %s: %s" % (base, p.stderr))
        outs.append(open(out, "rb").read() if p.returncode == 0 else None)
    check(outs[0] is not None and outs[0] == outs[1], "the extract of the sharded base is the extract of the whole one")

    lora = os.path.join(tmp, "p-extract-0.safetensors")
    fused = []
    for i, (src, dest, props) in enumerate(((whole, os.path.join(tmp, "p-fused.safetensors"), {}),
                                            (folder, os.path.join(tmp, "p-fused"), {"max-shard-size": "9KB"}))):
        if i:
            os.makedirs(dest)
        p = run_pipeline("fuse-%d" % i, [
            {"id": "m", "stage": "safetensors-source", "location": src},
            {"id": "l", "stage": "safetensors-source", "location": lora},
            {"stage": "lora-fuse", "inputs": ["m", "l"]},
            dict({"stage": "safetensors-sink", "location": dest, "provenance": False}, **props)])
        check(p.returncode == 0, "fuse %s into %s: %s" % (src, dest, p.stderr))
        fused.append(dest)
    back = os.path.join(tmp, "p-fused-back.safetensors")
    p = sink(fused[1], back)
    check(p.returncode == 0 and read_tensors(back) == read_tensors(fused[0]),
          "the sharded fuse of the sharded model reads back as the fuse of the whole model")


def check_progress(tmp):
    """a sharded write reports one progress for the whole checkpoint, and the
    run counts every shard's tensors and bytes"""
    import gi
    gi.require_version("Lpipe", "1.0")
    from gi.repository import Lpipe
    tensors = model(31)
    whole = os.path.join(tmp, "g-model.safetensors")
    write_model(whole, tensors, {"format": "pt"})
    folder = os.path.join(tmp, "g-sharded")
    os.makedirs(folder)
    pipeline = Lpipe.Pipeline.parse_launch(
        "safetensors-source location=%s ! safetensors-sink max-shard-size=5000 location=%s" % (whole, folder))
    seen = []
    stats = pipeline.run(progress=lambda *values: seen.append(values))
    n, total = len(tensors), sum(x.nbytes for x in tensors.values())
    shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    check(len(shards) > 3, "progress: the model is written in %d shards" % len(shards))
    check(stats.props.tensors_written == n and stats.props.bytes_written == total,
          "progress: the run counts every shard (%d of %d tensors, %d of %d bytes)"
          % (stats.props.tensors_written, n, stats.props.bytes_written, total))
    check(seen and seen[-1] == (n, n, total, total) and all(v[1] == n and v[3] == total for v in seen)
          and all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(seen, seen[1:])),
          "progress: one count over all the shards, never going back (%s)" % seen[-3:])


def check_summary(tmp):
    """the CLI's summary gives a sharded checkpoint's size (its tensors'
    bytes), read or written, not the size of a folder or of a name with no
    file behind it"""
    def fmt(n):  # lpipe-output.c lp_cli_format_bytes
        return "%.1f kB" % (n / 1e3) if n >= 1e3 else "%d B" % n
    tensors = model(41)
    total = sum(x.nbytes for x in tensors.values())
    whole = os.path.join(tmp, "c-model.safetensors")
    write_model(whole, tensors, {"format": "pt"})
    folder = os.path.join(tmp, "c-sharded")
    os.makedirs(folder)
    location = os.path.join(folder, "model.safetensors")
    p = run("launch", "safetensors-source", "location=" + whole, "!", "safetensors-sink",
            "location=" + location, "max-shard-size=5000")
    check(p.returncode == 0 and "wrote  %s: %s\n" % (location, fmt(total)) in p.stderr,
          "summary: a sharded write's size (%r)" % p.stderr)
    p = run("launch", "safetensors-source", "location=" + folder, "!", "safetensors-sink",
            "location=" + os.path.join(tmp, "c-back.safetensors"))
    check(p.returncode == 0 and "read   %s: %s\n" % (folder, fmt(total)) in p.stderr,
          "summary: a sharded read's size (%r)" % p.stderr)


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-sharded-")
    try:
        if sys.argv[1:] == ["--progress"]:
            # needs the typelib: a test of its own, which a build without
            # introspection does not have
            check_progress(tmp)
        else:
            check_read(tmp)
            check_errors(tmp)
            check_write(tmp)
            check_stale(tmp)
            check_pipelines(tmp)
            check_summary(tmp)
    finally:
        shutil.rmtree(tmp)
    if FAILURES:
        print("%d checks failed" % len(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
