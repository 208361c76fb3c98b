#!/usr/bin/python3
# bench-lycoris.py: LyCORIS LoHa and LoKr files of Flux's size, reduced to a
# plain rank-16 kohya LoRA, against cp of the same file in the same run
#
# The files are lora-synth's, written as LyCORIS writes them for Flux
# (kohya's BFL layer names, 304 modules, bf16):
# - LoHa of dim 8 (hada_w1_a/_b, hada_w2_a/_b; a Hadamard product of rank 64
#   per module), 153 MB;
# - LoKr with factor 16 and both sides whole matrices, as SimpleTuner's and
#   ai-toolkit's LoKr presets train Flux (linear_dim 10000, factor 16: lokr_w1
#   16 × 16, lokr_w2 up to 1344 × 960), 93 MB.
# Each is reduced with lora-svd rank=16 (exactly: Khatri–Rao factors for
# LoHa, Kronecker singular vectors for LoKr; lp-lora-lycoris.c). Requirement:
# wall time within 3x cp of the input, peak RSS < 160 MiB. The commands take
# turns, RUNS rounds, and each figure is the median of its runs, so that a
# busy spell of a shared machine falls on all of them alike.
#
# Two more rows say where the floor is: "cp+sync" is cp with the copy's data
# made durable (sync --data), which lpipe's sink does for every output
# before it renames it into place; "lpipe copy" is the same file through
# safetensors-source ! safetensors-sink with no stage between, lpipe's own
# I/O for that many bytes (reduce writes as many bytes as the LoHa input has
# and more than the LoKr one, all of them new).
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import open_null, timed  # noqa: E402

LPIPE = os.environ["LPIPE"]
RUNS = int(os.environ.get("LPIPE_BENCH_RUNS", "5"))
FILES = {
    "loha": ["format=loha", "rank=8"],
    "lokr": ["format=lokr", "factor=16", "rank=4096"],
}


NULL = None   # output not kept (open_null, in main)


def main():
    global NULL
    tmp = tempfile.mkdtemp(prefix="lpipe-bench-lycoris-", dir=os.environ.get("LPIPE_BENCH_DIR"))
    NULL = open_null(tmp)
    try:
        commands = {}
        sizes = {}
        for name, props in FILES.items():
            src = os.path.join(tmp, name + ".safetensors")
            subprocess.run([LPIPE, "-q", "launch", "lora-synth", "preset=flux-dev", "dtype=bf16"] + props
                           + ["!", "safetensors-sink", "location=" + src], check=True)
            sizes[name] = os.path.getsize(src)
            copy = os.path.join(tmp, name + "-copy.safetensors")
            out = os.path.join(tmp, name + "-r16.safetensors")
            commands["cp " + name] = (["cp", src, copy], copy)
            commands["cp+sync " + name] = (["sh", "-c", 'cp "$1" "$2" && sync --data "$2"', "sh", src, copy], copy)
            commands["lpipe copy " + name] = ([LPIPE, "-q", "launch", "safetensors-source", "location=" + src,
                                              "!", "safetensors-sink", "location=" + copy], copy)
            commands[name + " -> r16"] = ([LPIPE, "-q", "launch", "safetensors-source", "location=" + src,
                                           "!", "lora-svd", "rank=16", "!", "safetensors-sink",
                                           "location=" + out], out)

        runs = {name: [] for name in commands}
        for _ in range(RUNS):
            for name, (argv, result) in commands.items():
                runs[name].append(timed(argv, NULL))
                os.unlink(result)
        figures = {name: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r),
                          statistics.median(c for _, _, c in r)) for name, r in runs.items()}

        print("inputs: %s; median of %d interleaved runs; load average %s"
              % (", ".join("%s %.0f MB" % (n, s / 1e6) for n, s in sizes.items()), RUNS,
                 " ".join("%.2f" % x for x in os.getloadavg())))
        print("%-16s %8s %8s %8s %8s %10s" % ("", "wall s", "min s", "CPU s", "x cp", "peak MiB"))
        failures = []
        for name in FILES:
            cp = figures["cp " + name][0]
            for label in ("cp " + name, "cp+sync " + name, "lpipe copy " + name, name + " -> r16"):
                wall, rss, cpu = figures[label]
                print("%-16s %8.3f %8.3f %8.3f %8.2f %10.1f"
                      % (label, wall, min(w for w, _, _ in runs[label]), cpu, wall / cp, rss))
            wall, rss, _ = figures[name + " -> r16"]
            if wall > 3 * cp:
                failures.append("%s %.2fx cp > 3x" % (name, wall / cp))
            if rss >= 160:
                failures.append("%s peak RSS %.1f MiB >= 160" % (name, rss))
        if failures:
            sys.exit("requirements not met: " + "; ".join(failures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
