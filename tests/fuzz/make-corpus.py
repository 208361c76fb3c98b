#!/usr/bin/python3
"""Writes the seed corpora of the libFuzzer targets in tests/fuzz/corpus/.

Every seed is made here, from nothing: small valid files of each shape the
readers accept (so the fuzzer starts from deep inside the accepting paths) and
a few near misses. Run it again after changing it; the output is
deterministic.

    /usr/bin/python3 tests/fuzz/make-corpus.py [OUTDIR]

SPDX-License-Identifier: LGPL-2.1-or-later
"""
import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def pattern(n, seed):
    return bytes((seed + 13 * i) & 0xFF for i in range(n))


def safetensors(tensors, metadata=None, pad=True, raw_header=None):
    """tensors: list of (name, dtype, shape); data is a byte pattern."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for i, (name, dtype, shape) in enumerate(tensors):
        count = 1
        for d in shape:
            count *= d
        size = count * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + size]}
        data += pattern(size, i)
    text = raw_header if raw_header is not None else \
        json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def lora(prefix, modules, rank, dtype="F16", alpha=True):
    tensors = []
    for name, (n_in, n_out) in modules:
        tensors.append((f"{prefix}{name}.lora_down.weight", dtype, [rank, n_in]))
        tensors.append((f"{prefix}{name}.lora_up.weight", dtype, [n_out, rank]))
        if alpha:
            tensors.append((f"{prefix}{name}.alpha", "F32", []))
    return tensors


def safetensors_seeds():
    seeds = {
        "empty": safetensors([]),
        "empty-unpadded": safetensors([], pad=False),
        "metadata": safetensors([], {"format": "pt", "ss_network_dim": "4",
                                     "note": "caf\u00e9 \u2603 \U0001f600"}),
        "scalar": safetensors([("alpha", "F32", [])]),
        "zero-size": safetensors([("a", "F32", [0, 3]), ("b", "U8", [0]),
                                  ("c", "F16", [2])]),
        "escapes": safetensors([], raw_header=b'{"__metadata__":{"k\\u00e9\\n":"\\"\\\\\\/\\b\\f\\t\\r\\ud83d\\ude00"}}'),
        "whitespace": safetensors([], raw_header=b' \t\r\n{ "__metadata__" : { } }\n\r\t '),
        "sub-byte": safetensors([("f4", "F4", [2, 3]), ("f6a", "F6_E2M3", [4]),
                                 ("f6b", "F6_E3M2", [8])]),
        "kohya": safetensors(lora("lora_unet_down_blocks_0_attentions_0_",
                                  [("proj_in", (8, 8)), ("proj_out", (8, 6))], 2),
                             {"ss_network_dim": "2", "ss_network_alpha": "1"}),
        "peft": safetensors([
            ("base_model.model.q_proj.lora_A.weight", "BF16", [2, 8]),
            ("base_model.model.q_proj.lora_B.weight", "BF16", [8, 2])]),
        "conv": safetensors([
            ("lora_unet_conv.lora_down.weight", "F32", [2, 3, 3, 3]),
            ("lora_unet_conv.lora_up.weight", "F32", [4, 2, 1, 1]),
            ("lora_unet_conv.alpha", "F16", [])]),
        "large-numbers": safetensors([], raw_header=b'{"t":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}'),
        # Near misses: one rule broken each.
        "bad-gap": safetensors([], raw_header=b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}') + b"xx",
        "bad-dtype": safetensors([], raw_header=b'{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}') + bytes(16),
        "bad-length": struct.pack("<Q", 1000) + b"{}",
    }
    every = [(f"t.{d.lower()}", d, [8]) for d in DTYPE_BITS]
    seeds["all-dtypes"] = safetensors(every)
    return seeds


def f32_lora(tensors, metadata=None):
    """LoRA factors in F32 with finite values (so the reductions run to the
    end, not stop at a NaN); the alpha scalars are 1."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for i, (name, shape) in enumerate(tensors):
        count = 1
        for d in shape:
            count *= d
        values = [((7 * i + 3 * k) % 17 - 8) / 8.0 for k in range(count)] if shape else [1.0]
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def stages_seeds():
    """Files for fuzz-stages: LoRAs in each naming the stages know (kohya
    sd-scripts' lora_unet_*.lora_down/lora_up/alpha, PEFT's
    base_model.model.*.lora_A/lora_B, diffusers' transformer.*.lora_A/B),
    a conv module, a rank-1 one, one with no LoRA module at all, and the
    reader's seeds."""
    def pair(prefix, down, up, rank, n_in, n_out, alpha=None):
        t = [(f"{prefix}.{down}.weight", [rank, n_in]), (f"{prefix}.{up}.weight", [n_out, rank])]
        if alpha:
            t.append((f"{prefix}.{alpha}", []))
        return t
    seeds = {
        "kohya-sd": f32_lora(pair("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down", "lora_up", 4, 8, 8, "alpha")
                             + pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_down", "lora_up", 4, 6, 6, "alpha"),
                             {"ss_network_dim": "4", "ss_network_alpha": "1"}),
        "kohya-flux": f32_lora(pair("lora_unet_double_blocks_0_img_attn_proj", "lora_down", "lora_up", 3, 8, 8, "alpha")),
        "peft": f32_lora(pair("base_model.model.model.layers.0.self_attn.q_proj", "lora_A", "lora_B", 4, 8, 8)),
        "diffusers": f32_lora(pair("transformer.transformer_blocks.0.attn.to_q", "lora_A", "lora_B", 2, 6, 8)
                              + pair("unet.down_blocks.0.attentions.0.proj_in", "lora_A", "lora_B", 2, 4, 4)),
        "conv": f32_lora([("lora_unet_conv_in.lora_down.weight", [2, 3, 3, 3]),
                          ("lora_unet_conv_in.lora_up.weight", [4, 2, 1, 1]),
                          ("lora_unet_conv_in.alpha", [])]),
        "rank-1": f32_lora(pair("lora_unet_mid_block_proj", "lora_down", "lora_up", 1, 5, 3, "alpha")),
        "no-lora": f32_lora([("model.diffusion_model.input_blocks.0.0.weight", [4, 4])]),
        "zero-rank": f32_lora(pair("lora_unet_zero", "lora_down", "lora_up", 0, 4, 4, "alpha")),
    }
    for name, data in safetensors_seeds().items():
        seeds["reader-" + name] = data
    return seeds


def pipeline(stages, params=None, description=None):
    doc = {"lpipe": 1}
    if description:
        doc["description"] = description
    if params is not None:
        doc["params"] = params
    doc["stages"] = stages
    return (json.dumps(doc, indent=1) + "\n").encode()


def pipeline_seeds():
    seeds = {
        "chain": pipeline([
            {"stage": "safetensors-source", "location": "${input}"},
            {"stage": "cast", "dtype": "bf16"},
            {"stage": "safetensors-sink", "location": "${output}"}],
            {"input": "a.safetensors", "output": "b.safetensors"}),
        "svd": pipeline([
            {"stage": "lora-synth", "preset": "sd15-unet", "rank": 8},
            {"stage": "lora-svd", "rank": "${rank}"},
            {"stage": "rank-check", "expect-rank": "${rank}"},
            {"stage": "safetensors-sink", "location": "out.safetensors"}],
            {"rank": 4}, "reduce"),
        "dynamic": pipeline([
            {"stage": "safetensors-source", "location": "in.safetensors"},
            {"stage": "lora-svd", "energy": 0.99, "max-rank": 16},
            {"stage": "safetensors-sink", "location": "out.safetensors"}]),
        "dag": pipeline([
            {"stage": "safetensors-sink", "id": "w", "location": "m.safetensors", "inputs": "m"},
            {"stage": "lora-merge", "id": "m", "inputs": ["a", "b"]},
            {"stage": "safetensors-source", "id": "a", "location": "a.safetensors"},
            {"stage": "safetensors-source", "id": "b", "location": "b.safetensors"}]),
        "params": pipeline([
            {"stage": "safetensors-source", "location": "${input}"},
            {"stage": "select", "names": ["${input}", "x"]},
            {"stage": "safetensors-sink", "location": "${input}-r${rank} $$5"}],
            {"input": "lora", "rank": 3, "exact": True, "threshold": 0.5}),
        "cycle": pipeline([
            {"stage": "cast", "id": "a", "dtype": "f16", "inputs": "b"},
            {"stage": "cast", "id": "b", "dtype": "f16", "inputs": "a"}]),
        "self-param": pipeline([{"stage": "lora-synth", "rank": "${rank}"}],
                               {"rank": "${rank}"}),
        "absurd": pipeline([
            {"stage": "lora-synth", "rank": 2147483648},
            {"stage": "lora-svd", "rank": 0, "energy": "nan"},
            {"stage": "safetensors-sink", "location": ""}]),
        "syntax": b'{"lpipe": 1, "stages": [{"stage": "cast",}]}\n',
    }
    return seeds


def launch_seeds():
    lines = [
        "safetensors-source location=a.safetensors ! cast dtype=bf16 ! safetensors-sink location=b.safetensors",
        "lora-synth preset=sd15-unet rank=8 ! lora-svd rank=4 ! safetensors-sink location=o.safetensors",
        "lora-synth preset=flux-dev rank=4 ! rank-check expect-rank=4 ! safetensors-sink location=x",
        "safetensors-source location=a ! select names=a,b ! lora-scale factor=0.5 ! safetensors-sink location=b",
        "lora-synth rank=2147483648 ! lora-svd energy=nan ! safetensors-sink location=",
        "cast dtype=f16 ! ! safetensors-sink",
    ]
    seeds = {f"launch-{i}": line.encode() for i, line in enumerate(lines)}
    # What a shell hands over can be any bytes.
    seeds["launch-bytes"] = b"safetensors-source location=\xc3\xa9\xff ! safetensors-sink location=x"
    return seeds


def main():
    for name, seeds in (("safetensors", safetensors_seeds()),
                        ("pipeline", pipeline_seeds()),
                        ("launch", launch_seeds()),
                        ("stages", stages_seeds())):
        folder = os.path.join(OUT, name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for seed, data in sorted(seeds.items()):
            with open(os.path.join(folder, seed), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
