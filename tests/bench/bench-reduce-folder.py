#!/usr/bin/python3
# bench-reduce-folder.py: a folder of LoRAs in one `lpipe reduce` against a
# shell loop of single runs
#
# Generates N (default 200) small LoRAs of real shapes with lora-synth
# (Stable Diffusion 1.5's UNet attention, rank 8, kohya keys, bf16: 128
# modules, 3.2 MB each, distinct seeds), then reduces them to rank 4 two ways:
#   one command:  lpipe reduce DIR --rank 4 --output-dir A
#   a shell loop: for f in DIR/*.safetensors; do lpipe reduce "$f" --rank 4 --output-dir B; done
# The one command must be at least 3x faster (the requirement), and
# both must write the same tensors. The two take turns, RUNS rounds, and each
# figure is the median of its rounds.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

LPIPE = os.environ["LPIPE"]
N = int(os.environ.get("LPIPE_BENCH_FILES", "200"))
RUNS = int(os.environ.get("LPIPE_BENCH_RUNS", "3"))


def timed(argv):
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)   # -q: nothing much to keep
    return time.monotonic() - start


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header, data[8 + n:]


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-bench-folder-", dir=os.environ.get("LPIPE_BENCH_DIR"))
    try:
        src = os.path.join(tmp, "loras")
        os.mkdir(src)
        # one generating pipeline per file: lora-synth seeds them apart
        gen = " ; ".join('"$0" -q launch lora-synth preset=sd15-unet rank=8 format=kohya seed=%d '
                         '! safetensors-sink location="$1/lora-%03d.safetensors"' % (i + 1, i)
                         for i in range(N))
        subprocess.run(["sh", "-c", gen, LPIPE, src], check=True)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))

        one_dir, loop_dir = os.path.join(tmp, "one"), os.path.join(tmp, "loop")
        one = [LPIPE, "-q", "reduce", src, "--rank", "4", "--output-dir", one_dir, "--force"]
        loop = ["sh", "-c", 'for f in "$1"/*.safetensors; do "$0" -q reduce "$f" --rank 4 '
                '--output-dir "$2" --force || exit 1; done', LPIPE, src, loop_dir]
        times = {"one command": [], "shell loop": []}
        for _ in range(RUNS):
            times["one command"].append(timed(one))
            times["shell loop"].append(timed(loop))

        names = sorted(os.listdir(one_dir))
        if len(names) != N or names != sorted(os.listdir(loop_dir)):
            sys.exit("FAIL: the two ways wrote different files")
        for name in names:
            if tensors(os.path.join(one_dir, name)) != tensors(os.path.join(loop_dir, name)):
                sys.exit("FAIL: %s differs between the one command and the loop" % name)

        t_one = statistics.median(times["one command"])
        t_loop = statistics.median(times["shell loop"])
        print("%d LoRAs (sd15-unet rank 8 kohya bf16, %.1f MB in all) reduced to rank 4, median of %d rounds:"
              % (N, size / 1e6, RUNS))
        print("  one command  %6.2f s  (%.1f ms a file)" % (t_one, 1000 * t_one / N))
        print("  shell loop   %6.2f s  (%.1f ms a file)" % (t_loop, 1000 * t_loop / N))
        print("  speed-up     %6.1fx  (required: 3x)" % (t_loop / t_one))
        if t_loop < 3 * t_one:
            sys.exit("FAIL: the one command is only %.1fx faster than the loop" % (t_loop / t_one))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


main()
