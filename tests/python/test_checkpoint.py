#!/usr/bin/python3
# Checkpoints and tensors from Python: what the C side wrote reads back into
# numpy as the file holds it, and what Python builds is written as it says.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import subprocess
import sys

from lptest import EXAMPLES, GLib, Lpipe, TestCase, error_is, main, np, read_arrays, \
    read_safetensors, synth, to_numpy


class CheckpointTest(TestCase):
    def test_read_what_c_wrote(self):
        # lora-synth in bf16 has values that only a real conversion gets right.
        for dtype in ('f32', 'f16', 'bf16'):
            path = synth(self.path(f'{dtype}.safetensors'), rank=2, fmt='kohya',
                         dtype=dtype)
            oracle, metadata = read_safetensors(path)
            checkpoint = Lpipe.safetensors_load(path)

            self.assertEqual([t.get_name() for t in checkpoint.get_tensors()],
                             list(oracle))
            self.assertEqual({k: checkpoint.get_metadata(k)
                              for k in checkpoint.dup_metadata_keys()}, metadata)
            for i in range(checkpoint.get_n_tensors()):
                tensor = checkpoint.get_tensor(i)
                fdtype, shape, raw = oracle[tensor.get_name()]
                self.assertEqual(Lpipe.dtype_to_string(tensor.get_dtype()), fdtype)
                self.assertEqual(tensor.get_shape(), shape)
                self.assertEqual(tensor.props.n_dims, len(shape))
                self.assertEqual(tensor.get_n_bytes(), len(raw))
                # The bytes themselves, as a GLib.Bytes
                data = tensor.dup_data()
                self.assertIsInstance(data, GLib.Bytes)
                self.assertEqual(data.get_data(), raw)
                # ...and converted to f32, as bytes and as a list
                values = np.frombuffer(tensor.dup_f32_bytes().get_data(),
                                       dtype=np.float32).reshape(shape)
                expected = to_numpy(fdtype, shape, raw)
                np.testing.assert_array_equal(values, expected)
                if i < 4:
                    np.testing.assert_array_equal(
                        np.array(tensor.dup_f32(), dtype=np.float32).reshape(shape),
                        expected)
            self.assertIsNotNone(checkpoint.lookup(tensor.get_name()))
            self.assertIsNone(checkpoint.lookup('no such tensor'))

    def test_build_and_write(self):
        rng = np.random.default_rng(7)
        arrays = {
            'a.weight': rng.standard_normal((3, 5)).astype(np.float32),
            'b.weight': rng.standard_normal((4,)).astype(np.float16),
            'steps': np.array([1, -2, 3], dtype=np.int64),
            'scalar': np.array(2.5, dtype=np.float64),
        }
        dtypes = {np.float32: Lpipe.Dtype.F32, np.float16: Lpipe.Dtype.F16,
                  np.int64: Lpipe.Dtype.I64, np.float64: Lpipe.Dtype.F64}
        checkpoint = Lpipe.Checkpoint.new()
        for name, array in arrays.items():
            tensor = Lpipe.Tensor.new(name, dtypes[array.dtype.type],
                                      list(array.shape),
                                      GLib.Bytes.new(array.tobytes()))
            self.assertFalse(tensor.is_lazy())
            checkpoint.add_tensor(tensor)
        # A bf16 tensor made from floats: lpipe rounds them.
        checkpoint.add_tensor(Lpipe.Tensor.new_from_f32(
            'c.bf16', Lpipe.Dtype.BF16, [2, 2], [1.0, -2.0, 0.5, 3.0]))
        checkpoint.set_metadata('format', 'pt')
        checkpoint.set_metadata('made.by', 'python')

        path = self.path('built.safetensors')
        Lpipe.safetensors_save(checkpoint, path, None)
        out, metadata = read_arrays(path)
        self.assertEqual(list(out), list(arrays) + ['c.bf16'])
        for name, array in arrays.items():
            np.testing.assert_array_equal(out[name], array.astype(out[name].dtype)
                                          if array.dtype != np.int64 else array)
            self.assertEqual(out[name].shape, array.shape)
        np.testing.assert_array_equal(out['c.bf16'],
                                      np.array([[1, -2], [0.5, 3]], np.float32))
        self.assertEqual(metadata, {'format': 'pt', 'made.by': 'python'})

        # Read back through lpipe too: the same tensors, a copy of the same bytes
        back = Lpipe.safetensors_load(path)
        for tensor in checkpoint.get_tensors():
            self.assertEqual(back.lookup(tensor.get_name()).dup_data().get_data(),
                             tensor.dup_data().get_data())

    def test_errors(self):
        with self.assertRaises(GLib.Error) as caught:
            Lpipe.Tensor.new('x', Lpipe.Dtype.F32, [2, 2], GLib.Bytes.new(b'\0' * 15))
        error_is(self, caught.exception, Lpipe.format_error_quark(),
                 Lpipe.FormatError.SHAPE)

        checkpoint = Lpipe.Checkpoint.new()
        t = Lpipe.Tensor.new_from_f32('x', Lpipe.Dtype.F32, [1], [1.0])
        checkpoint.add_tensor(t)
        with self.assertRaises(GLib.Error) as caught:
            checkpoint.add_tensor(Lpipe.Tensor.new_renamed(t, 'x'))
        error_is(self, caught.exception, Lpipe.format_error_quark(),
                 Lpipe.FormatError.DUPLICATE)

        path = synth(self.path('whole.safetensors'), rank=1)
        with open(path, 'rb') as f:
            data = f.read()
        truncated = self.path('truncated.safetensors')
        with open(truncated, 'wb') as f:
            f.write(data[:len(data) - 10])
        with self.assertRaises(GLib.Error) as caught:
            Lpipe.safetensors_load(truncated)
        error_is(self, caught.exception, Lpipe.format_error_quark(),
                 Lpipe.FormatError.TRUNCATED)

        with self.assertRaises(GLib.Error) as caught:
            Lpipe.safetensors_load(self.path('missing.safetensors'))
        error_is(self, caught.exception, GLib.file_error_quark(), GLib.FileError.NOENT)

    def test_example_inspect_checkpoint(self):
        sys.path.insert(0, EXAMPLES)
        import inspect_checkpoint

        # numpy arrays in and out, through lpipe, checked against the oracle
        rng = np.random.default_rng(3)
        arrays = {'w': rng.standard_normal((4, 3)).astype(np.float16),
                  'n': np.arange(5, dtype=np.int32)}
        path = self.path('np.safetensors')
        inspect_checkpoint.save_arrays(path, arrays, {'k': 'v'})
        oracle, metadata = read_safetensors(path)
        self.assertEqual(metadata, {'k': 'v'})
        self.assertEqual(oracle['w'][:2], ('F16', [4, 3]))
        self.assertEqual(oracle['n'][2], arrays['n'].tobytes())
        back, _ = inspect_checkpoint.load_arrays(path)
        for name, array in arrays.items():
            self.assertEqual(back[name].dtype, array.dtype)
            np.testing.assert_array_equal(back[name], array)

        # bf16 comes as float32; the script prints every tensor
        source = synth(self.path('bf16.safetensors'), rank=2, dtype='bf16')
        back, _ = inspect_checkpoint.load_arrays(source)
        for name, (dtype, shape, raw) in read_safetensors(source)[0].items():
            np.testing.assert_array_equal(back[name], to_numpy(dtype, shape, raw))
        run = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'inspect_checkpoint.py'),
                              source], capture_output=True, text=True, check=True)
        self.assertEqual(len([l for l in run.stdout.splitlines() if 'float32' in l]),
                         len(back))

    def test_shared_sample(self):
        shared = os.environ.get('LPIPE_SHARED_DIR', '')
        path = os.path.join(shared, 'lora-samples', 'peft-gpt2-r8-f32.safetensors')
        if not os.path.exists(path):
            self.skipTest('no shared LoRA samples')
        arrays, metadata = read_arrays(path)
        checkpoint = Lpipe.safetensors_load(path)
        self.assertEqual(checkpoint.get_n_tensors(), len(arrays))
        for tensor in checkpoint.get_tensors():
            values = np.frombuffer(tensor.dup_data().get_data(), np.float32)
            np.testing.assert_array_equal(values.reshape(tensor.get_shape()),
                                          arrays[tensor.get_name()])


if __name__ == '__main__':
    main()
