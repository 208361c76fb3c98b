#!/usr/bin/python3
# Stages written in Python, registered by name and used from pipeline files:
# a transform (the custom_stage.py example), a source with lazy tensors, a
# sink that pulls them, and an error raised in Python.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import subprocess
import sys
import threading

from lptest import EXAMPLES, GLib, GObject, Lpipe, TestCase, error_is, main, \
    np, read_arrays, synth

sys.path.insert(0, EXAMPLES)
import custom_stage  # noqa: E402


class Arange(Lpipe.Source):
    """n tensors of 6 floats each, computed lazily, possibly on lpipe's threads."""
    count = GObject.Property(type=int, default=3, minimum=0, maximum=100,
                             nick='count', blurb='how many tensors')

    def do_create(self):
        checkpoint = Lpipe.Checkpoint.new()
        checkpoint.set_metadata('source', 'python')
        for i in range(self.count):
            def compute(tensor, i=i):
                Arange.threads.add(threading.get_ident())
                return GLib.Bytes.new(np.arange(6, dtype=np.float32).tobytes()
                                      if i == 0 else
                                      (np.arange(6, dtype=np.float32) + i).tobytes())
            checkpoint.add_tensor(Lpipe.Tensor.new_lazy(f't{i}', Lpipe.Dtype.F32,
                                                        [2, 3], compute))
        return checkpoint


Arange.threads = set()


class Collect(Lpipe.Sink):
    """Keeps what it pulls, in order."""
    got = []

    def do_consume(self, checkpoint):
        def take(tensor, data):
            Collect.got.append((tensor.get_name(),
                                np.frombuffer(data.get_data(), np.float32).copy()))
            return True
        return self.pull_tensors(checkpoint, take)


class Negate(Lpipe.Transform):
    """Only transform_tensor: the base class builds the checkpoint."""
    def do_transform_tensor(self, tensor):
        if tensor.get_name() == 't2':
            return None                    # dropped
        values = -np.frombuffer(tensor.dup_f32_bytes().get_data(), np.float32)
        return Lpipe.Tensor.new(tensor.get_name(), Lpipe.Dtype.F32, tensor.get_shape(),
                                GLib.Bytes.new(values.tobytes()))


class Fail(Lpipe.Transform):
    def do_transform_tensor(self, tensor):
        raise GLib.Error.new_literal(Lpipe.stage_error_quark(),
                                     'no tensor may pass',
                                     Lpipe.StageError.INVALID_INPUT)


registry = Lpipe.Registry.get_default()
for cls, name in ((Arange, 'py-arange'), (Collect, 'py-collect'),
                  (Negate, 'py-negate'), (Fail, 'py-fail'),
                  (custom_stage.ScaleUp, 'scale-up')):
    registry.register_stage_full(cls, name, 'Python', cls.__doc__)


def run(text, threads=2):
    pipeline = Lpipe.Pipeline.new(registry)
    pipeline.load_from_data(text, -1, 'test.pipeline', None)
    pipeline.set_threads(threads)
    Collect.got = []
    pipeline.run(None)
    return Collect.got


class StageTest(TestCase):
    def test_registered(self):
        self.assertIn('py-arange', registry.list_stages())
        self.assertEqual(registry.lookup('py-negate'), Negate.__gtype__)
        self.assertIsNone(registry.lookup_plugin('py-negate'))
        self.assertEqual(Lpipe.StageClass.get_category(Negate), 'Python')
        self.assertEqual(Lpipe.StageClass.get_role(Arange), Lpipe.StageRole.SOURCE)
        with self.assertRaises(GLib.Error) as caught:
            registry.register_stage_full(Negate, 'cast', None, None)
        error_is(self, caught.exception, Lpipe.plugin_error_quark(),
                 Lpipe.PluginError.DUPLICATE)

    def test_source_transform_sink(self):
        for threads in (1, 2):
            got = run('{"lpipe": 1, "stages": [{"stage": "py-arange", "count": 4},'
                      ' {"stage": "py-negate"}, {"stage": "py-collect"}]}', threads)
            self.assertEqual([n for n, _ in got], ['t0', 't1', 't3'])
            for name, values in got:
                i = int(name[1:])
                np.testing.assert_array_equal(values, -(np.arange(6) + i))
        # Lazy data was computed on lpipe's threads too, not only this one
        self.assertTrue(Arange.threads)

    def test_python_stage_with_c_stages(self):
        out = self.path('out.safetensors')
        run('{"lpipe": 1, "stages": [{"stage": "py-arange", "count": 2},'
            ' {"stage": "cast", "dtype": "f16"},'
            f' {{"stage": "safetensors-sink", "location": "{out}"}}]}}')
        arrays, metadata = read_arrays(out)
        np.testing.assert_array_equal(arrays['t1'], (np.arange(6) + 1).reshape(2, 3))
        self.assertEqual(metadata['source'], 'python')

    def test_error_from_python(self):
        with self.assertRaises(GLib.Error) as caught:
            run('{"lpipe": 1, "stages": [{"stage": "py-arange"}, {"stage": "py-fail"},'
                ' {"stage": "py-collect"}]}')
        error_is(self, caught.exception, Lpipe.stage_error_quark(),
                 Lpipe.StageError.INVALID_INPUT)
        self.assertIn('no tensor may pass', caught.exception.message)
        self.assertIn("'py-fail'", caught.exception.message)
        with self.assertRaises(GLib.Error) as caught:
            run('{"lpipe": 1, "stages": [{"stage": "py-arange", "count": 1000},'
                ' {"stage": "py-collect"}]}')
        error_is(self, caught.exception, Lpipe.pipeline_error_quark(),
                 Lpipe.PipelineError.BAD_VALUE)

    def test_scale_up_in_process(self):
        source = synth(self.path('in.safetensors'), rank=2, fmt='kohya', dtype='f16')
        out = self.path('out.safetensors')
        pipeline = Lpipe.Pipeline.new(registry)
        pipeline.load_from_file(os.path.join(EXAMPLES, 'scale-up.pipeline'),
                                [f'input={source}', f'output={out}', 'factor=0.5'])
        self.assertEqual(pipeline.get_stage(1).props.factor, 0.5)
        pipeline.run(None)
        self.check_scaled(source, out, 0.5)

    def test_example_custom_stage(self):
        source = synth(self.path('in.safetensors'), rank=4, seed=2)
        out = self.path('out.safetensors')
        run = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'custom_stage.py'),
                              source, out, '3'], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.check_scaled(source, out, 3.0)

    def check_scaled(self, source, out, factor):
        before, metadata_before = read_arrays(source)
        after, metadata = read_arrays(out)
        self.assertEqual(list(before), list(after))
        ups = 0
        for name, array in before.items():
            if name.endswith(('lora_B.weight', 'lora_up.weight')):
                ups += 1
                np.testing.assert_allclose(after[name], array * np.float32(factor),
                                           rtol=1e-6)
            else:
                np.testing.assert_array_equal(after[name], array)
        self.assertGreater(ups, 0)
        self.assertEqual(metadata['format'], metadata_before['format'])
        self.assertIn('scale-up', metadata['lpipe.pipeline'])


if __name__ == '__main__':
    main()
