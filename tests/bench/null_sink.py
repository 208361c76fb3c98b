# null_sink.py: where the benchmarks send output they do not keep
#
# A null device made in the benchmark's own temporary folder (benchmarks run
# as root, like the suite), so that nothing writes to the real /dev. Without
# the right to make one, a plain file there takes the output.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import stat


def open_null(folder):
    path = os.path.join(folder, "null")
    if not os.path.exists(path):
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pass
    return open(path, "wb")
