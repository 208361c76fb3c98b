#!/usr/bin/python3
# bench-to-numpy.py: a 1.37 GB bf16 checkpoint into numpy, through the Python
# overrides' Tensor.to_numpy() against numpy reading the file itself
#
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Usage: bench-to-numpy.py GENERATOR [MIB]
#
# Generates the checkpoint with lp-gen-checkpoint (1307 MiB = 1.37 GB by
# default), warms the page cache, then times, best of 3 each:
#
#  raw      every tensor's stored bits as an array, then one pass over them
#           (max): lpipe's Lpipe.safetensors_load + to_numpy(raw=True) against
#           np.fromfile of each tensor's range (the read is the copy);
#  values   every tensor as float32, one at a time: to_numpy() (lpipe
#           converts bf16) against np.fromfile + numpy's own bf16 -> f32.
#
# Checks that both give the same numbers, prints the figures and exits 1
# unless each lpipe time is within 2x numpy's. The file goes to
# $LPIPE_BENCH_DIR or $TMPDIR and is deleted at the end.

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import Lpipe  # noqa: E402

import numpy as np  # noqa: E402

MAX_RATIO = 2.0
REPEATS = 3


def read_header(path):
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop('__metadata__', None)
    return header, 8 + n


def numpy_raw(path, header, base):
    arrays = []
    for name, entry in header.items():
        begin, end = entry['data_offsets']
        arrays.append(np.fromfile(path, dtype='<u2', count=(end - begin) // 2,
                                  offset=base + begin).reshape(entry['shape']))
    return arrays


def lpipe_raw(path):
    checkpoint = Lpipe.safetensors_load(path)
    return [t.to_numpy(raw=True) for t in checkpoint.values()]


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def numpy_values(path, header, base):
    checksum = 0.0
    for name, entry in header.items():
        begin, end = entry['data_offsets']
        bits = np.fromfile(path, dtype='<u2', count=(end - begin) // 2, offset=base + begin)
        checksum += float(bf16_to_f32(bits).max())
    return checksum


def lpipe_values(path):
    checksum = 0.0
    for tensor in Lpipe.safetensors_load(path).values():
        checksum += float(tensor.to_numpy().max())
    return checksum


def best(func, *args):
    times, result = [], None
    for _ in range(REPEATS):
        start = time.monotonic()
        result = func(*args)
        times.append(time.monotonic() - start)
    return min(times), result


def touch(arrays):
    return [int(a.max()) for a in arrays]


def main():
    gen = sys.argv[1]
    mib = sys.argv[2] if len(sys.argv) > 2 else '1307'
    parent = os.environ.get('LPIPE_BENCH_DIR') or tempfile.gettempdir()
    workdir = tempfile.mkdtemp(prefix='lpipe-bench-', dir=parent)
    try:
        path = os.path.join(workdir, 'big.safetensors')
        subprocess.run([gen, path, mib], check=True)
        size = os.path.getsize(path)
        with open(path, 'rb') as f:          # warm the page cache for both
            while f.read(1 << 24):
                pass
        header, base = read_header(path)

        t_np_raw, np_max = best(lambda: touch(numpy_raw(path, header, base)))
        t_lp_raw, lp_max = best(lambda: touch(lpipe_raw(path)))
        assert lp_max == np_max, 'to_numpy(raw=True) differs from the file'
        # the arrays are views of the mapping, not copies
        arrays = lpipe_raw(path)
        assert all(not a.flags.owndata for a in arrays)
        sample = numpy_raw(path, header, base)
        assert all(np.array_equal(a, b) for a, b in zip(arrays[:4], sample[:4]))
        del arrays, sample

        t_np_val, np_sum = best(numpy_values, path, header, base)
        t_lp_val, lp_sum = best(lpipe_values, path)
        assert lp_sum == np_sum, f'to_numpy() values differ: {lp_sum} != {np_sum}'
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gb = size / 1e9
    ok = True
    print(f'{gb:.2f} GB bf16, {len(header)} tensors, best of {REPEATS}, page cache warm')
    for label, lp, ref in (('raw bits + max', t_lp_raw, t_np_raw),
                           ('float32 + max', t_lp_val, t_np_val)):
        ratio = lp / ref
        good = ratio <= MAX_RATIO
        ok = ok and good
        print(f'{label:16} to_numpy {lp:6.2f} s ({gb / lp:5.2f} GB/s)   numpy fromfile '
              f'{ref:6.2f} s ({gb / ref:5.2f} GB/s)   ratio {ratio:4.2f} '
              f'{"ok" if good else f"FAIL (> {MAX_RATIO}x)"}')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
