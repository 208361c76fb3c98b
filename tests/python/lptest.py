# lptest.py: what the Python binding tests share.
#
# The oracle here reads and writes safetensors with nothing but struct, json
# and numpy, so that a test compares lpipe with an implementation it does not
# share code with.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import GLib, GObject, Lpipe  # noqa: E402

import numpy as np  # noqa: E402

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, 'examples')

# numpy dtypes of the safetensors dtypes the tests use; bf16 has none and is
# handled as the high half of a float32.
NP_DTYPES = {
    'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'BF16': '<u2',
    'I64': '<i8', 'I32': '<i4', 'I16': '<i2', 'I8': 'i1', 'U8': 'u1',
}


def read_safetensors(path):
    """Returns ({name: (dtype, shape, raw bytes)}, metadata), in file order."""
    with open(path, 'rb') as f:
        data = f.read()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop('__metadata__', {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry['data_offsets']
        tensors[name] = (entry['dtype'], entry['shape'],
                         data[8 + n + begin:8 + n + end])
    return tensors, metadata


def to_numpy(dtype, shape, raw):
    """An array of float32 for float dtypes, of the dtype itself otherwise."""
    a = np.frombuffer(raw, dtype=NP_DTYPES[dtype])
    if dtype == 'BF16':
        a = (a.astype(np.uint32) << 16).view(np.float32)
    elif dtype in ('F16', 'F64'):
        a = a.astype(np.float32)
    return a.reshape(shape)


def read_arrays(path):
    tensors, metadata = read_safetensors(path)
    return {k: to_numpy(*v) for k, v in tensors.items()}, metadata


def synth(path, preset='sd15-unet', rank=4, fmt='diffusers', dtype='f32',
          seed=0):
    """Writes a synthetic LoRA with lpipe's CLI (the C side)."""
    subprocess.run([os.environ['LPIPE'], '-q', 'launch', 'lora-synth',
                    f'preset={preset}', f'rank={rank}', f'format={fmt}',
                    f'dtype={dtype}', f'seed={seed}', '!',
                    'safetensors-sink', f'location={path}'], check=True)
    return path


def error_is(test, error, quark, code):
    """Asserts that a GLib.Error carries this domain and code."""
    test.assertIsInstance(error, GLib.Error)
    test.assertEqual(error.domain, GLib.quark_to_string(quark))
    test.assertEqual(error.code, int(code))
    test.assertTrue(error.matches(quark, code))


class TestCase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix='lpipe-py-')
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp, name)


def main():
    result = unittest.main(exit=False, verbosity=2).result
    if not result.wasSuccessful():
        sys.exit(1)
    if result.testsRun and len(result.skipped) == result.testsRun:
        sys.exit(SKIP)
    sys.exit(0)
