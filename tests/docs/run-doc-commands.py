#!/usr/bin/python3
# run-doc-commands.py: runs every command a document shows
#
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Usage: run-doc-commands.py DOC.md            run the document's blocks
#        run-doc-commands.py --man MAN DOC.md  check MAN's EXAMPLES against DOC
#
# A document's fenced blocks are taken in order, in a fresh empty folder:
#   ```sh      run with bash -e -o pipefail; must exit 0
#   <!-- file: NAME -->             the next block is written to NAME
#   <!-- file: NAME same-as: PATH -->  ... and must equal PATH in the source tree
#   <!-- exit: N -->                the next sh block must exit N
#   <!-- stderr: TEXT -->           ... and print TEXT on stderr
#   <!-- not-run: REASON -->        the next sh block is not run (a reason is required)
# Other blocks (```text, ```json without file:, ...) are not commands.
#
# The commands see lpipe as it would be installed: the build tree's lpipe first
# on PATH, the build tree's plugins as the installed ones
# (LPIPE_PLUGIN_SYSTEM_PATH), LPIPE_PLUGIN_PATH unset so the document can set
# it, pkg-config finding the uninstalled lpipe-1.0, python3 being Debian's.

import os
import re
import subprocess
import sys
import tempfile

DIRECTIVE = re.compile(r"^<!--\s*([a-z-]+):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


def parse(path):
    """Yields (line number, info, text, directives) for each fenced block."""
    pending = {}
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = DIRECTIVE.match(line)
        if m:
            pending[m.group(1)] = m.group(2)
            i += 1
            continue
        m = FENCE.match(line)
        if m:
            start = i + 1
            body = []
            i += 1
            while i < len(lines) and lines[i] != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise SystemExit(f"{path}:{start}: unterminated code block")
            yield start, m.group(1), "\n".join(body) + "\n", pending
            pending = {}
        elif line.strip():
            if pending:
                raise SystemExit(f"{path}:{i + 1}: directive {sorted(pending)} is not "
                                 "followed by a code block")
        i += 1


def environment(bindir):
    build = os.environ["LPIPE_BUILD_ROOT"]
    env = dict(os.environ)
    env.pop("LPIPE_PLUGIN_PATH", None)
    env["LPIPE_PLUGIN_SYSTEM_PATH"] = os.path.join(build, "plugins")
    env["PATH"] = os.pathsep.join([bindir, os.path.join(build, "core"), env.get("PATH", "")])
    env["PKG_CONFIG_PATH"] = os.pathsep.join(
        p for p in [os.path.join(build, "meson-uninstalled"), env.get("PKG_CONFIG_PATH")] if p)
    # a finished command's output must not wait for a terminal
    env.pop("TERM", None)
    return env


def run_document(doc):
    source = os.environ["LPIPE_SOURCE_ROOT"]
    failures = 0
    n_run = 0
    with tempfile.TemporaryDirectory(prefix="lpipe-doc-") as tmp:
        bindir = os.path.join(tmp, ".bin")
        os.mkdir(bindir)
        os.symlink("/usr/bin/python3", os.path.join(bindir, "python3"))
        workdir = os.path.join(tmp, "work")
        os.mkdir(workdir)
        env = environment(bindir)

        for line, info, text, directives in parse(doc):
            where = f"{os.path.basename(doc)}:{line}"
            if "file" in directives:
                spec = directives["file"].split()
                name = spec[0]
                if len(spec) == 3 and spec[1] == "same-as:":
                    with open(os.path.join(source, spec[2]), encoding="utf-8") as f:
                        if f.read() != text:
                            print(f"FAIL {where}: the block for {name} differs from {spec[2]}")
                            failures += 1
                elif len(spec) != 1:
                    raise SystemExit(f"{where}: write <!-- file: NAME [same-as: PATH] -->")
                with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                    f.write(text)
                print(f"# {where}: wrote {name}")
                continue
            if info != "sh":
                if set(directives) - {"file"}:
                    raise SystemExit(f"{where}: directives {sorted(directives)} on a {info} block")
                continue
            if "not-run" in directives:
                if not directives["not-run"]:
                    raise SystemExit(f"{where}: not-run needs a reason")
                print(f"# {where}: not run ({directives['not-run']})")
                continue

            expect = int(directives.get("exit", "0"))
            print(f"# {where}:\n{text.rstrip()}")
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text],
                                  cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
            n_run += 1
            sys.stdout.write(proc.stdout[-4000:])
            sys.stdout.write(proc.stderr[-4000:])
            if proc.returncode != expect:
                print(f"FAIL {where}: exit status {proc.returncode}, expected {expect}")
                failures += 1
            if "stderr" in directives and directives["stderr"] not in proc.stderr:
                print(f"FAIL {where}: stderr lacks: {directives['stderr']}")
                failures += 1

    print(f"{doc}: {n_run} blocks run, {failures} failures")
    return failures == 0 and n_run > 0


def sh_lines(doc):
    lines = set()
    for _, info, text, directives in parse(doc):
        if info == "sh" and "not-run" not in directives:
            lines.update(l.strip() for l in text.split("\n") if l.strip())
    return lines


def check_man(man, doc):
    """Every EXAMPLES command of the man page is one the document runs."""
    text = open(man, encoding="utf-8").read()
    section = text.split(".SH EXAMPLES", 1)
    if len(section) != 2:
        raise SystemExit(f"{man}: no EXAMPLES section")
    section = section[1].split("\n.SH ", 1)[0]
    commands = []
    for block in re.findall(r"^\.EX\n(.*?)^\.EE$", section, re.S | re.M):
        commands += [l.strip() for l in block.split("\n") if l.strip()]
    known = sh_lines(doc)
    missing = [c for c in commands if c.replace("\\-", "-") not in known]
    for c in missing:
        print(f"FAIL {man}: example not run by {doc}: {c}")
    print(f"{man}: {len(commands)} examples, {len(missing)} not in {doc}")
    return commands and not missing


def main(argv):
    if len(argv) == 4 and argv[1] == "--man":
        return 0 if check_man(argv[2], argv[3]) else 1
    if len(argv) == 2:
        return 0 if run_document(argv[1]) else 1
    sys.stderr.write("usage: run-doc-commands.py DOC.md | --man MAN DOC.md\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
