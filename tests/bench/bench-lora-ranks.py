#!/usr/bin/python3
# bench-lora-ranks.py: lora-svd from low to high rank against the floor
#
# Per rank (16, 42, 128, 256; LPIPE_BENCH_RANKS to change), generates the
# flux-dev preset in bf16 (0.2 / 0.45 / 1.37 / 2.7 GB) into a temporary
# folder and reduces it to rank 4 with the exact and the randomized SVD,
# taking turns with `cp` and `cat` of the same file, RUNS rounds (medians),
# so that a busy spell of a shared machine falls on all of them alike. It
# prints wall and CPU times, the ratios to cp, and the Gram matrices'
# arithmetic ((in + out)·r·(r + 1) flops per module, the upper triangles)
# as GFLOP/s of the whole exact run and of the Gram kernels alone
# (lp-bench-gram, the same module shapes on 2 threads), against the peak
# that lp-bench-gram measures on this machine in the same run. The load
# average is printed with every rank.
#
# Requirements (exit 1 when one is not met): exact at rank 128 within 1x cp,
# at rank 256 within 1.5x cp; the Gram kernels at rank 256 at least half of
# the peak; the randomized method at or under the exact one (5% allowed for
# the noise of the medians).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import open_null, timed  # noqa: E402

LPIPE = os.environ["LPIPE"]
BENCH_GRAM = sys.argv[1]
RUNS = int(os.environ.get("LPIPE_BENCH_RUNS", "3"))
RANKS = [int(r) for r in os.environ.get("LPIPE_BENCH_RANKS", "16,42,128,256").split(",")]
LIMITS = {128: 1.0, 256: 1.5}   # exact SVD, x cp


def load():
    return "load %.2f %.2f %.2f" % os.getloadavg()


NULL = None   # output not kept (open_null, in main)


def gram_flops(path):
    """(in + out)·r·(r + 1) over the file's modules, from its header"""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    flops = 0
    for key, info in header.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_down.weight"):
            r, n = info["shape"][0], info["shape"][1]
            flops += n * r * (r + 1)
        elif key.endswith(".lora_B.weight") or key.endswith(".lora_up.weight"):
            n, r = info["shape"][0], info["shape"][1]
            flops += n * r * (r + 1)
    return flops


def peak():
    """{name: (GFLOP/s on 2 threads by their CPU time, by wall time)}"""
    proc = subprocess.run([BENCH_GRAM, "peak", "2"], capture_output=True, text=True)
    if proc.returncode == 77:
        return {}
    proc.check_returncode()
    out = proc.stdout
    rates = {}
    for line in out.splitlines():
        name, cpu_rate, wall_rate = line.split()
        rates[name] = (float(cpu_rate), float(wall_rate))
    return rates


def main():
    failures = []
    rates = peak()
    print("peak on 2 threads, GFLOP/s by the threads' CPU time (by wall time): "
          + (", ".join("%s %.0f (%.0f)" % (n, c, w) for n, (c, w) in rates.items()) or "not measured here")
          + "; " + load())

    global NULL
    tmp = tempfile.mkdtemp(prefix="lpipe-bench-ranks-", dir=os.environ.get("LPIPE_BENCH_DIR"))
    NULL = open_null(tmp)
    try:
        for rank in RANKS:
            src = os.path.join(tmp, "flux-r%d.safetensors" % rank)
            copy = os.path.join(tmp, "copy.safetensors")
            out = os.path.join(tmp, "out.safetensors")
            subprocess.run([LPIPE, "-q", "launch", "lora-synth", "preset=flux-dev", "rank=%d" % rank,
                            "dtype=bf16", "!", "safetensors-sink", "location=" + src], check=True)
            size = os.path.getsize(src)
            flops = gram_flops(src)
            commands = {
                "cp": (["cp", src, copy], copy),
                "cat": (["cat", src], None),
            }
            for method in ("exact", "randomized"):
                commands[method] = ([LPIPE, "-q", "launch", "safetensors-source", "location=" + src, "!",
                                     "lora-svd", "rank=4", "method=" + method, "!",
                                     "safetensors-sink", "location=" + out], out)
            print("\nrank %d: %.2f GB, Gram %.1f GFLOP, %s" % (rank, size / 1e9, flops / 1e9, load()))
            runs = {name: [] for name in commands}
            for _ in range(RUNS):
                for name, (argv, result) in commands.items():
                    wall, _, cpu = timed(argv, NULL)
                    runs[name].append((wall, cpu))
                    if result:
                        os.unlink(result)
            wall = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
            cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
            kernel = subprocess.run([BENCH_GRAM, "gram", str(rank), "2"], check=True,
                                    capture_output=True, text=True).stdout.split()
            kernel_rate, kernel_wall_rate = float(kernel[2]), float(kernel[3])
            # the peak of the arithmetic the kernels use: the bf16 dot product,
            # or the widest f32 multiply-add
            f32_peaks = [n for n in rates if n.startswith("f32")]
            peak_name = "bf16-dot" if kernel[6] == "bf16" else (f32_peaks[0] if f32_peaks else None)
            peak_rate = rates[peak_name][0] if peak_name in rates else float("nan")

            print("%-11s %8s %8s %8s %8s" % ("", "wall s", "min s", "CPU s", "x cp"))
            for name in commands:
                print("%-11s %8.3f %8.3f %8.3f %8.2f" % (name, wall[name], min(w for w, _ in runs[name]),
                                                         cpu[name], wall[name] / wall["cp"]))
            print("Gram: kernels %.0f GFLOP/s by CPU time (%.0f by wall) = %.2f of the %s peak %.0f; "
                  "the whole exact run %.0f GFLOP/s of wall time; %s"
                  % (kernel_rate, kernel_wall_rate, kernel_rate / peak_rate, peak_name, peak_rate,
                     flops / wall["exact"] / 1e9, load()))

            if rank in LIMITS and wall["exact"] > LIMITS[rank] * wall["cp"]:
                failures.append("rank %d: exact SVD %.2fx cp > %.1fx" % (rank, wall["exact"] / wall["cp"],
                                                                        LIMITS[rank]))
            if wall["randomized"] > 1.05 * wall["exact"]:
                failures.append("rank %d: randomized %.2fx exact > 1" % (rank, wall["randomized"] / wall["exact"]))
            if rank == 256 and peak_name in rates and kernel_rate < 0.5 * peak_rate:
                failures.append("rank 256: Gram kernels %.2f of peak < 0.5" % (kernel_rate / peak_rate))
            os.unlink(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        sys.exit("requirements not met: " + "; ".join(failures))


if __name__ == "__main__":
    main()
