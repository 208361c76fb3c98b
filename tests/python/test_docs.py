#!/usr/bin/python3
# The examples in docs/python.md and docs/javascript.md are the files the
# suite runs: each block after an `<!-- example: PATH -->` line must be PATH.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import re
import sys

ROOT = os.environ.get('LPIPE_SOURCE_ROOT',
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
BLOCK = re.compile(r'<!-- example: (\S+) -->\n```\w*\n(.*?)```\n', re.S)

failures = 0
for doc, expected_count in (('docs/python.md', 6), ('docs/javascript.md', 4)):
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    blocks = BLOCK.findall(text)
    if len(blocks) < expected_count:
        print(f'{doc}: {len(blocks)} examples, expected {expected_count}')
        failures += 1
    for path, code in blocks:
        with open(os.path.join(ROOT, path)) as f:
            if f.read() != code:
                print(f'{doc}: the block of {path} differs from the file')
                failures += 1
        print(f'{doc}: {path} ok')
sys.exit(1 if failures else 0)
