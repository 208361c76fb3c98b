#!/usr/bin/python3
# bench-lora.py: the measured requirements for the rank stages
#
# Generates the flux-dev preset at rank 42 in bf16 (451 MB) to a file, then
# reduces it to rank 4 with the exact SVD, the randomized SVD and the random
# projection, and compares their wall time with `cp` of the same file in the
# same run: exact <= 1.5x cp, randomized <= 1.5x exact, projection <= 1.5x cp,
# peak RSS < 160 MiB for each. The commands take turns, RUNS rounds of them,
# so that a busy spell of a shared machine falls on all of them alike, and
# each figure is the median of its runs.
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


NULL = None   # output not kept (open_null, in main)


def main():
    global NULL
    tmp = tempfile.mkdtemp(prefix="lpipe-bench-lora-", dir=os.environ.get("LPIPE_BENCH_DIR"))
    NULL = open_null(tmp)
    try:
        src = os.path.join(tmp, "flux-r42.safetensors")
        subprocess.run([LPIPE, "-q", "launch", "lora-synth", "preset=flux-dev", "rank=42", "dtype=bf16",
                        "!", "safetensors-sink", "location=" + src], check=True)
        size = os.path.getsize(src)
        copy = os.path.join(tmp, "copy.safetensors")
        out = os.path.join(tmp, "out.safetensors")
        # lpipe syncs its output before the rename (the file is durable when
        # it says done); cp does not, so cp followed by a sync of the copy is
        # shown too, for information. The requirements are against plain cp.
        commands = {"cp": (["cp", src, copy], copy),
                    "cp + sync": (["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, copy], copy)}
        stages = {
            "exact": ["lora-svd", "rank=4"],
            "randomized": ["lora-svd", "rank=4", "method=randomized"],
            "projection": ["lora-project", "rank=4"],
        }
        for name, stage in stages.items():
            commands[name] = ([LPIPE, "-q", "launch", "safetensors-source", "location=" + src, "!"]
                              + stage + ["!", "safetensors-sink", "location=" + out], out)

        runs = {name: [] for name in commands}
        for _ in range(RUNS):
            for name, (argv, result) in commands.items():
                runs[name].append(timed(argv, NULL))
                os.unlink(result)
        figures = {name: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r))
                   for name, r in runs.items()}
        cp = figures["cp"][0]
        cp_sync = figures["cp + sync"][0]

        print("input %.0f MB, median of %d interleaved runs" % (size / 1e6, RUNS))
        print("%-11s %8s %8s %8s %8s %12s %10s"
              % ("", "wall s", "min s", "CPU s", "x cp", "x cp + sync", "peak MiB"))
        for name, (wall, rss) in figures.items():
            print("%-11s %8.3f %8.3f %8.3f %8.2f %12.2f %10.1f"
                  % (name, wall, min(w for w, _, _ in runs[name]),
                     statistics.median(c for _, _, c in runs[name]), wall / cp, wall / cp_sync, rss))
        figures.pop("cp")
        figures.pop("cp + sync")

        failures = []
        if figures["exact"][0] > 1.5 * cp:
            failures.append("exact SVD %.2fx cp > 1.5x" % (figures["exact"][0] / cp))
        if figures["randomized"][0] > 1.5 * figures["exact"][0]:
            failures.append("randomized %.2fx exact > 1.5x" % (figures["randomized"][0] / figures["exact"][0]))
        if figures["projection"][0] > 1.5 * cp:
            failures.append("projection %.2fx cp > 1.5x" % (figures["projection"][0] / cp))
        for name, (_, rss) in figures.items():
            if rss >= 160:
                failures.append("%s peak RSS %.1f MiB >= 160" % (name, rss))
        if failures:
            sys.exit("requirements not met: " + "; ".join(failures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
