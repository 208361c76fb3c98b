# benchutil.py: what the benchmarks share
#
# - open_null(): where output not kept goes, a null device made in the
#   benchmark's own temporary folder (benchmarks run as root, like the
#   suite), so that nothing writes to the real /dev; without the right to
#   make one, a plain file there;
# - timed(): one child's wall time, peak RSS and CPU time.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import stat
import subprocess
import sys
import time


def open_null(folder):
    path = os.path.join(folder, "null")
    if not os.path.exists(path):
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pass
    return open(path, "wb")


def timed(argv, stdout):
    """wall seconds, peak RSS (MiB) and CPU seconds (user + system) of one child"""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("failed: %s" % " ".join(argv))
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime
