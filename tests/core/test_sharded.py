#!/usr/bin/python3
# test_sharded.py: sharded checkpoints read as one (safetensors-source on a
# *.safetensors.index.json or its folder)
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


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-sharded-")
    try:
        check_read(tmp)
        check_errors(tmp)
    finally:
        shutil.rmtree(tmp)
    if FAILURES:
        print("%d checks failed" % len(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
