#!/usr/bin/python3
"""The progress line on a terminal: lpipe runs on a pseudo-terminal of a set
width (TIOCSWINSZ; and with COLUMNS when the terminal says nothing), and
every redraw must fit in that width and return to column 0 (no line per
redraw), the summary starting on a clean line after it."""
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import atexit
import shutil
import tempfile
import termios

LPIPE = os.environ["LPIPE"]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


TMP = None   # the test's temporary folder


def run_on_pty(args, cols, env=None):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    # the summary goes to stderr (the pty); stdout, unused, to a file beside the test's own
    with open(os.path.join(TMP, "stdout"), "wb") as out:
        proc = subprocess.Popen([LPIPE, *args], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=slave, env=env)
    os.close(slave)
    data = b""
    while True:
        r, _, _ = select.select([master], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    proc.wait()
    os.close(master)
    return proc.returncode, data.decode("utf-8", "replace")


def check_width(text, cols, label):
    # the terminal driver turns \n into \r\n
    text = text.replace("\r\n", "\n")
    head, sep, tail = text.partition("read ")
    check(sep != "", label + ": the summary follows")
    check("\n" not in head, label + ": the progress line is redrawn in place, no line per redraw")
    segments = [re.sub(r"\x1b\[K", "", s) for s in head.split("\r")]
    draws = [s for s in segments if "[" in s or "tensors" in s]
    check(len(draws) >= 2, label + ": redrawn (%d draws)" % len(draws))
    widest = max((len(s) for s in segments), default=0)
    check(widest < cols, label + ": every draw fits in %d columns (widest %d)" % (cols, widest))


def main():
    global TMP
    tmp = TMP = tempfile.mkdtemp(prefix="lpipe-progress-")
    atexit.register(shutil.rmtree, tmp, True)   # also when a check fails
    lora = os.path.join(tmp, "flux.safetensors")
    subprocess.run([LPIPE, "-q", "launch", "lora-synth", "preset=flux-dev", "rank=32", "!",
                    "safetensors-sink", "location=" + lora], check=True)
    for cols in (40, 100):
        rc, text = run_on_pty(["-j", "1", "reduce", lora, "--rank", "4", "--force"], cols)
        check(rc == 0, "reduce on a terminal of %d columns: exit 0" % cols)
        check_width(text, cols, "%d columns" % cols)
    # the bar itself: present when there is room, as wide as what is left
    rc, text = run_on_pty(["-j", "1", "reduce", lora, "--rank", "4", "--force"], 100)
    check(re.search(r"\[[#.]{8,30}\] ", text) is not None, "100 columns: a bar is drawn")

    if failures:
        sys.exit(1)
    print("progress line checks pass")


main()
