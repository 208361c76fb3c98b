#!/usr/bin/python3
# The PyGObject overrides (core/python/gi/overrides/Lpipe.py): what Python
# gets beyond the bare introspected C API, each checked against the file
# itself (lptest's struct+json+numpy reader) or the behaviour it replaces.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import collections.abc
import gc
import os
import re
import signal
import subprocess
import sys

import gi.overrides  # noqa: F401 - what the overrides are loaded as
from gi.repository import Gio

from lptest import EXAMPLES, GLib, Lpipe, TestCase, error_is, main, np, read_arrays, \
    read_safetensors, synth, to_numpy


def mapped_ranges(path):
    """The address ranges of this process that map path."""
    real = os.path.realpath(path)
    ranges = []
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split('-'))
                ranges.append((lo, hi))
    return ranges


class OverridesTest(TestCase):
    def test_loaded_from_gi_overrides(self):
        # gi found gi/overrides/Lpipe.py on sys.path, as it finds Gtk's
        self.assertEqual(Lpipe.Pipeline.__module__, 'gi.overrides.Lpipe')
        self.assertTrue(issubclass(Lpipe.Transform, Lpipe.Stage))
        self.assertEqual(Lpipe.Stage.__module__, 'gi.overrides.Lpipe')

    # ---- parse_launch -------------------------------------------------------

    def test_parse_launch_of_a_string(self):
        out = self.path('my out.safetensors')
        # one string, split as a shell would: the quoted location is one word
        pipeline = Lpipe.Pipeline.parse_launch(
            f'lora-synth preset=sd15-unet rank=2 ! safetensors-sink location="{out}"')
        self.assertIsInstance(pipeline, Lpipe.Pipeline)
        self.assertEqual(pipeline.get_n_stages(), 2)
        self.assertEqual(pipeline.get_stage(1).props.location, out)
        pipeline.run()
        self.assertTrue(os.path.exists(out))
        # on a pipeline: fills that one; a list of words still works
        other = Lpipe.Pipeline()
        self.assertIs(other.parse_launch(['lora-synth', '!', 'safetensors-sink',
                                          f'location={out}']), other)
        self.assertEqual(other.get_n_stages(), 2)

    def test_parse_launch_errors(self):
        with self.assertRaises(ValueError) as raised:
            Lpipe.Pipeline.parse_launch('lora-synth ! no-such-stage')
        error_is(self, raised.exception, Lpipe.pipeline_error_quark(),
                 Lpipe.PipelineError.UNKNOWN_STAGE)
        with self.assertRaises(ValueError) as raised:
            Lpipe.Pipeline.parse_launch('lora-synth ! safetensors-sink location="open')
        error_is(self, raised.exception, Lpipe.pipeline_error_quark(),
                 Lpipe.PipelineError.SYNTAX)

    # ---- checkpoints as mappings ---------------------------------------------

    def test_checkpoint_is_a_mapping(self):
        path = synth(self.path('lora.safetensors'), rank=2, fmt='kohya', dtype='f16')
        oracle, metadata = read_safetensors(path)
        checkpoint = Lpipe.safetensors_load(path)

        self.assertIsInstance(checkpoint, collections.abc.Mapping)
        self.assertEqual(len(checkpoint), len(oracle))
        self.assertEqual(list(checkpoint), list(oracle))          # file order
        self.assertEqual(list(checkpoint.keys()), list(oracle))
        name = next(iter(oracle))
        self.assertIn(name, checkpoint)
        self.assertNotIn('no.such.tensor', checkpoint)
        self.assertNotIn(0, checkpoint)
        self.assertEqual(checkpoint[name].get_name(), name)
        self.assertEqual(checkpoint[name].shape, tuple(oracle[name][1]))
        with self.assertRaises(KeyError):
            checkpoint['no.such.tensor']
        self.assertIsNone(checkpoint.get('no.such.tensor'))
        self.assertEqual([t.get_name() for t in checkpoint.values()], list(oracle))
        self.assertEqual([(k, v.get_name()) for k, v in checkpoint.items()],
                         [(k, k) for k in oracle])
        self.assertEqual(checkpoint.metadata, metadata)
        self.assertFalse(Lpipe.Checkpoint.new())     # empty is falsy, like a dict

    # ---- to_numpy -----------------------------------------------------------

    def test_to_numpy_values(self):
        # every dtype lora-synth writes, against the file's own bytes
        for dtype in ('f32', 'f16', 'bf16'):
            path = synth(self.path(f'{dtype}.safetensors'), rank=2, dtype=dtype)
            oracle, _ = read_safetensors(path)
            checkpoint = Lpipe.safetensors_load(path)
            for name, (fdtype, shape, raw) in oracle.items():
                array = checkpoint[name].to_numpy()
                self.assertEqual(array.shape, tuple(shape))
                expected = to_numpy(fdtype, shape, raw)
                if fdtype == 'F16':
                    self.assertEqual(array.dtype, np.float16)   # as stored
                    expected = np.frombuffer(raw, '<f2').reshape(shape)
                else:
                    self.assertEqual(array.dtype, np.float32)   # bf16 converted
                np.testing.assert_array_equal(array, expected)
                if fdtype == 'BF16':
                    bits = checkpoint[name].to_numpy(raw=True)
                    self.assertEqual(bits.dtype, np.uint16)
                    self.assertEqual(bits.tobytes(), raw)
                np.testing.assert_array_equal(np.asarray(checkpoint[name]), array)

    def test_to_numpy_is_a_view_of_the_mapped_file(self):
        # lpipe reads tensors up to 16 MiB with pread() (one read, as
        # np.fromfile does) and hands out bigger ones as views of the mapping
        path = self.path('big.safetensors')
        big = np.random.default_rng(3).standard_normal((1536, 3072)).astype(np.float32)
        written = Lpipe.Checkpoint.new()
        written.add_tensor(Lpipe.Tensor.new('big.weight', Lpipe.Dtype.F32, list(big.shape),
                                            GLib.Bytes.new(big.tobytes())))
        Lpipe.safetensors_save(written, path, None)
        del written
        checkpoint = Lpipe.safetensors_load(path)
        name = 'big.weight'
        array = checkpoint[name].to_numpy()
        del checkpoint        # the array keeps the mapping alive by itself
        gc.collect()

        address = array.__array_interface__['data'][0]
        ranges = mapped_ranges(path)
        self.assertTrue(ranges, 'the file is not mapped')
        self.assertTrue(any(lo <= address and address + array.nbytes <= hi
                            for lo, hi in ranges),
                        'the array is not inside the mapped file: it was copied')
        oracle, _ = read_safetensors(path)
        np.testing.assert_array_equal(array, to_numpy(*oracle[name]))
        # read-only: the mapping is, and a write would change the file's bytes
        self.assertFalse(array.flags.writeable)
        with self.assertRaises(ValueError):
            array[0] = 1
        # the mapping goes once the last array over it does
        del array
        gc.collect()
        self.assertEqual(mapped_ranges(path), [])

    def test_to_numpy_of_a_lazy_tensor(self):
        # a tensor whose bytes are computed: the array holds the computed ones
        values = np.arange(6, dtype=np.float32).reshape(2, 3)
        tensor = Lpipe.Tensor.new_lazy('lazy', Lpipe.Dtype.F32, [2, 3],
                                       lambda t: GLib.Bytes.new(values.tobytes()))
        np.testing.assert_array_equal(tensor.to_numpy(), values)

    # ---- properties ---------------------------------------------------------

    def test_property_out_of_range_raises(self):
        stage = Lpipe.Registry.get_default().create_stage('lora-svd')
        stage.props.rank = 8
        with self.assertRaises(ValueError) as raised:
            stage.props.rank = 10 ** 9           # was: a warning, rank left at 8
        error_is(self, raised.exception, Lpipe.pipeline_error_quark(),
                 Lpipe.PipelineError.BAD_VALUE)
        self.assertIn("'rank'", raised.exception.message)
        self.assertEqual(stage.props.rank, 8)
        with self.assertRaises(ValueError):
            stage.set_property('rank', -1)
        with self.assertRaises(ValueError):
            stage.props.rank = 2.5
        with self.assertRaises(ValueError):
            stage.props.no_such_property = 1
        stage.props.rank = '16'                   # text, as a pipeline file says it
        self.assertEqual(stage.props.rank, 16)

    # ---- errors -------------------------------------------------------------

    def test_errors_mean_what_they_say(self):
        with self.assertRaises(FileNotFoundError) as raised:
            Lpipe.safetensors_load(self.path('missing.safetensors'))
        self.assertIsInstance(raised.exception, GLib.Error)
        self.assertIsInstance(raised.exception, Lpipe.NotFoundError)
        self.assertTrue(raised.exception.matches(GLib.file_error_quark(), GLib.FileError.NOENT))

        bad = self.path('bad.safetensors')
        with open(bad, 'wb') as f:
            f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
        with self.assertRaises(ValueError) as raised:
            Lpipe.safetensors_load(bad)
        self.assertEqual(raised.exception.domain,
                         GLib.quark_to_string(Lpipe.format_error_quark()))

        pipeline = Lpipe.Pipeline()
        with self.assertRaises(FileNotFoundError):
            pipeline.load_from_file(self.path('missing.pipeline'))

    # ---- running ------------------------------------------------------------

    def launch(self, out, preset='flux-dev', rank=4):
        return Lpipe.Pipeline.parse_launch(
            f'lora-synth preset={preset} rank={rank} ! safetensors-sink location={out}')

    def test_run_returns_stats(self):
        out = self.path('out.safetensors')
        stats = self.launch(out, 'sd15-unet').run()
        self.assertIsInstance(stats, Lpipe.RunStats)
        oracle, _ = read_safetensors(out)
        self.assertEqual(stats.props.tensors_written, len(oracle))
        self.assertEqual(stats.props.bytes_written, sum(len(v[2]) for v in oracle.values()))
        self.assertEqual(stats.get_outputs(), [out])
        self.assertEqual(stats.props.n_stages, 2)
        self.assertGreater(stats.props.elapsed, 0)

    def test_progress_callback(self):
        out = self.path('out.safetensors')
        seen = []
        self.launch(out, 'sd15-unet').run(progress=lambda *values: seen.append(values))
        n = len(read_safetensors(out)[0])
        self.assertTrue(seen)
        self.assertEqual(seen[-1][0], n)
        self.assertEqual(seen[-1][0], seen[-1][1])
        self.assertEqual([v[0] for v in seen], sorted(v[0] for v in seen))

    def test_progress_exception_cancels(self):
        out = self.path('out.safetensors')

        def progress(done, total, bytes_done, bytes_total):
            if done > 0:
                raise RuntimeError('stop here')
        # a run of many progress periods (50 ms each) even on a fast machine:
        # a rank-4 file can be written before the first report
        with self.assertRaisesRegex(RuntimeError, 'stop here'):
            self.launch(out, rank=64).run(progress=progress)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_ctrl_c_cancels_with_nothing_written(self):
        out = self.path('out.safetensors')
        calls = []

        def progress(done, total, bytes_done, bytes_total):
            calls.append(done)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C, mid-run
        with self.assertRaises(KeyboardInterrupt) as raised:
            self.launch(out, rank=64).run(progress=progress)
        cause = raised.exception.__cause__
        self.assertIsInstance(cause, GLib.Error)
        self.assertTrue(cause.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED),
                        cause.message)
        self.assertLess(calls[-1], 988, 'the run went on to the end')
        self.assertEqual(os.listdir(self.tmp), [])   # no output, no temporary file
        # and Python's own Ctrl-C handling is back
        self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

    # ---- the docs' example ----------------------------------------------------

    def test_reduce_and_compare_example(self):
        src = synth(self.path('in.safetensors'), rank=4, fmt='diffusers', dtype='f32')
        out = self.path('out.safetensors')
        result = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'reduce_and_compare.py'),
                                 src, out, '2'], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        written = read_safetensors(out)[0]
        self.assertIn(f'wrote {len(written)} tensors', result.stdout)
        self.assertIn(f'to {out} in ', result.stdout)
        # the oracle: Eckart-Young, the best rank-2 error of each B @ A from
        # its singular values (numpy's SVD of the r x r core R_B R_A^T)
        arrays, _ = read_arrays(src)
        worst = 0.0
        for name in arrays:
            if name.endswith('.lora_A.weight'):
                module = name[:-len('.lora_A.weight')]
                r_up = np.linalg.qr(arrays[module + '.lora_B.weight'].astype(np.float64), mode='r')
                r_down = np.linalg.qr(arrays[name].astype(np.float64).T, mode='r')
                sv = np.linalg.svd(r_up @ r_down.T, compute_uv=False)
                worst = max(worst, np.sqrt(np.sum(sv[2:] ** 2) / np.sum(sv ** 2)))
        printed = float(re.search(r'worst relative error ([0-9.]+)', result.stdout).group(1))
        # f32 factors: the error is good to ~1e-6 relative; printed to 4 digits
        self.assertAlmostEqual(printed, worst, delta=1e-4)
        missing = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'reduce_and_compare.py'),
                                  self.path('missing.safetensors'), out, '2'],
                                 capture_output=True, text=True)
        self.assertEqual(missing.returncode, 1)
        self.assertIn('not found: ', missing.stderr)


if __name__ == '__main__':
    main()
