# safetensors_numpy.py: safetensors files read and written with numpy, for
# the Python tests (the layout safetensors.torch.save_file writes: the
# metadata first, compact JSON padded with spaces to 8 bytes, packed data)
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import struct

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_st(path):
    """name -> f64 array (any float dtype), and the metadata"""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        raw = data[8 + n + b: 8 + n + e]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, DT[info["dtype"]])
        out[name] = x.astype(np.float64).reshape(info["shape"])
    return out, meta


def write_st(path, tensors, metadata=None):
    """name -> array, written in order as F32 (0-dim alphas included)"""
    header, blobs, off = {"__metadata__": dict(metadata or {"format": "pt"})}, [], 0
    for name, x in tensors.items():
        raw = np.ascontiguousarray(x, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(x)), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return path
