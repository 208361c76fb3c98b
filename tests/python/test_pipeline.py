#!/usr/bin/python3
# Pipelines from Python: the registry, files with parameter overrides,
# pipelines built in code, and errors as exceptions with domain and code.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import subprocess
import sys

from lptest import EXAMPLES, GLib, GObject, Lpipe, TestCase, error_is, main, \
    np, read_arrays, synth

CAST_PIPELINE = {
    'lpipe': 1,
    'params': {'input': 'in.safetensors', 'output': 'out.safetensors', 'dtype': 'bf16'},
    'stages': [
        {'stage': 'safetensors-source', 'location': '${input}'},
        {'stage': 'cast', 'dtype': '${dtype}'},
        {'stage': 'safetensors-sink', 'location': '${output}'},
    ],
}


def best_rank_k(down, up, k):
    """B A truncated to its k largest singular values, by numpy (through QR
    of the factors, so that the SVD is of an r x r matrix)."""
    qb, rb = np.linalg.qr(up.astype(np.float64))
    qa, ra = np.linalg.qr(down.astype(np.float64).T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return (qb @ u[:, :k] * s[:k]) @ (vt[:k] @ qa.T)


class PipelineTest(TestCase):
    def test_registry(self):
        registry = Lpipe.Registry.get_default()
        stages = registry.list_stages()
        for name in ('safetensors-source', 'safetensors-sink', 'cast', 'lora-svd'):
            self.assertIn(name, stages)
        gtype = registry.lookup('cast')
        self.assertTrue(gtype.is_a(Lpipe.Transform))
        self.assertEqual(registry.lookup('no-such-stage'), GObject.TYPE_INVALID)
        props = {p.name: p for p in GObject.list_properties(gtype)}
        self.assertIn('dtype', props)
        self.assertEqual(props['dtype'].value_type, Lpipe.FloatDtype.__gtype__)

        stage = registry.create_stage('cast')
        klass = type(stage)
        self.assertEqual(Lpipe.StageClass.get_stage_name(klass), 'cast')
        self.assertEqual(Lpipe.StageClass.get_role(klass), Lpipe.StageRole.TRANSFORM)
        self.assertTrue(Lpipe.StageClass.is_property_required(klass, 'dtype'))
        self.assertTrue(Lpipe.StageClass.get_description(klass))
        self.assertEqual(registry.lookup_plugin('cast').get_name(), 'convert')
        self.assertIn('convert', [p.get_name() for p in registry.list_plugins()])

    def test_file_with_params(self):
        source = synth(self.path('in.safetensors'), rank=2)
        path = self.path('cast.pipeline')
        with open(path, 'w') as f:
            json.dump(CAST_PIPELINE, f)
        pipeline = Lpipe.Pipeline.new(Lpipe.Registry.get_default())
        out = self.path('out.safetensors')
        pipeline.load_from_file(path, [f'input={source}', f'output={out}', 'dtype=f16'])
        self.assertEqual(pipeline.get_n_stages(), 3)
        self.assertEqual(pipeline.get_params()['dtype'], 'f16')
        cast = pipeline.get_stage(1)
        self.assertEqual(cast.props.dtype, Lpipe.Dtype.F16)
        pipeline.run(None)

        before, _ = read_arrays(source)
        after, metadata = read_arrays(out)
        self.assertEqual(list(before), list(after))
        for name, array in before.items():
            np.testing.assert_array_equal(after[name], array.astype(np.float16)
                                          .astype(np.float32))
        self.assertIn('cast', json.loads(metadata['lpipe.pipeline'])['stages'])

    def test_built_in_code(self):
        source = synth(self.path('in.safetensors'), rank=4, seed=3)
        out = self.path('out.safetensors')
        pipeline = Lpipe.Pipeline.new(Lpipe.Registry.get_default())
        read = pipeline.add_stage('safetensors-source', 'read')
        read.props.location = source
        reduce = pipeline.add_stage('lora-svd', 'reduce')
        reduce.set_property_from_string('rank', '2')
        write = pipeline.add_stage('safetensors-sink', None)
        write.props.location = out
        pipeline.link(read, reduce)
        pipeline.link(reduce, write)
        pipeline.set_threads(2)
        pipeline.validate()
        self.assertIs(pipeline.lookup_stage('reduce'), reduce)
        pipeline.run(None)

        before, _ = read_arrays(source)
        after, _ = read_arrays(out)
        downs = [n for n in before if n.endswith('lora_A.weight')]
        self.assertTrue(downs)
        for down in downs:
            up = down.replace('lora_A', 'lora_B')
            self.assertEqual(after[down].shape[0], 2)
            self.assertEqual(after[up].shape[1], 2)
            expected = best_rank_k(before[down], before[up], 2)
            got = after[up].astype(np.float64) @ after[down].astype(np.float64)
            self.assertLess(np.abs(got - expected).max(), 1e-5 * np.abs(expected).max(), up)

    def test_errors(self):
        registry = Lpipe.Registry.get_default()
        pipeline = Lpipe.Pipeline.new(registry)
        with self.assertRaises(GLib.Error) as caught:
            pipeline.add_stage('lora-svdd', None)
        error_is(self, caught.exception, Lpipe.pipeline_error_quark(),
                 Lpipe.PipelineError.UNKNOWN_STAGE)
        self.assertIn('lora-svd', caught.exception.message)  # the suggestion

        cases = [
            ('{"lpipe": 1, "stages": [', Lpipe.PipelineError.SYNTAX),
            ('{"lpipe": 1, "stages": [{"stage": "cast", "colour": "red"}]}',
             Lpipe.PipelineError.UNKNOWN_PROPERTY),
            ('{"lpipe": 1, "stages": [{"stage": "safetensors-source"},'
             ' {"stage": "safetensors-sink", "location": "x"}]}',
             Lpipe.PipelineError.MISSING_PROPERTY),
            ('{"lpipe": 1, "stages": [{"stage": "safetensors-source", "location": "${nope}"},'
             ' {"stage": "safetensors-sink", "location": "x"}]}',
             Lpipe.PipelineError.UNDEFINED_PARAM),
        ]
        for text, code in cases:
            with self.subTest(text=text):
                pipeline = Lpipe.Pipeline.new(registry)
                with self.assertRaises(GLib.Error) as caught:
                    pipeline.load_from_data(text, -1, 'test.pipeline', None)
                    pipeline.validate()
                error_is(self, caught.exception, Lpipe.pipeline_error_quark(), code)

        # Raised while running: the file error passes through, named
        pipeline = Lpipe.Pipeline.new(registry)
        pipeline.load_from_data(json.dumps(CAST_PIPELINE), -1, 'cast.pipeline',
                                [f'input={self.path("missing")}',
                                 f'output={self.path("out")}'])
        with self.assertRaises(GLib.Error) as caught:
            pipeline.run(None)
        error_is(self, caught.exception, GLib.file_error_quark(), GLib.FileError.NOENT)
        self.assertFalse(os.path.exists(self.path('out')))

    def test_example_reduce_lora(self):
        source = synth(self.path('in.safetensors'), rank=4, seed=5)
        out = self.path('out.safetensors')
        run = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'reduce_lora.py'),
                              source, out, '3'], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn('256/256 tensors', run.stdout)
        before, _ = read_arrays(source)
        after, metadata = read_arrays(out)
        for down in (n for n in before if n.endswith('lora_A.weight')):
            up = down.replace('lora_A', 'lora_B')
            expected = best_rank_k(before[down], before[up], 3)
            got = after[up].astype(np.float64) @ after[down]
            self.assertLess(np.abs(got - expected).max(), 1e-5 * np.abs(expected).max(), up)
        self.assertIn('reduce.pipeline', metadata['lpipe.pipeline'])

        # An error leaves with its domain and code on stderr
        run = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'reduce_lora.py'),
                              self.path('missing'), out, '3'], capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn('g-file-error-quark 4', run.stderr)


if __name__ == '__main__':
    main()
