#!/usr/bin/python3
# Running a pipeline without blocking the event loop: progress arrives as a
# signal in the loop's thread, and a cancelled run leaves no output behind.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import threading

from gi.repository import Gio

from lptest import GLib, Lpipe, TestCase, error_is, main, np, read_arrays, synth


class Gate(Lpipe.Transform):
    """Hands on each tensor lazily; the third one waits until the run is
    cancelled, so the sink is caught in the middle of writing."""
    def do_transform_tensor(self, tensor):
        cancellable = self.get_cancellable()
        index = Gate.seen
        Gate.seen += 1

        def compute(lazy):
            if index == 2:
                Gate.reached.set()
                Gate.release.wait(10)
            return tensor.dup_data()
        return Lpipe.Tensor.new_lazy(tensor.get_name(), tensor.get_dtype(),
                                     tensor.get_shape(), compute)


registry = Lpipe.Registry.get_default()
registry.register_stage_full(Gate, 'py-gate', None, None)


def run_async(pipeline, cancellable=None, on_progress=None):
    loop = GLib.MainLoop()
    outcome = {'ticks': 0}

    def tick():
        outcome['ticks'] += 1
        return GLib.SOURCE_CONTINUE

    def done(pipeline, result):
        try:
            outcome['ok'] = pipeline.run_finish(result)
        except GLib.Error as error:
            outcome['error'] = error
        loop.quit()

    if on_progress:
        pipeline.connect('progress', on_progress)
    tick_id = GLib.timeout_add(1, tick)
    pipeline.run_async(cancellable, done)
    loop.run()
    GLib.source_remove(tick_id)
    return outcome


class AsyncTest(TestCase):
    def test_progress(self):
        source = synth(self.path('in.safetensors'), preset='llama', rank=8)
        out = self.path('out.safetensors')
        pipeline = Lpipe.Pipeline.new(registry)
        pipeline.parse_launch(['safetensors-source', f'location={source}', '!',
                               'cast', 'dtype=bf16', '!',
                               'safetensors-sink', f'location={out}'])
        main_thread = threading.get_ident()
        seen = []

        def on_progress(pipeline, done, total, bytes_done, bytes_total):
            self.assertEqual(threading.get_ident(), main_thread)
            seen.append((done, total, bytes_done, bytes_total))

        outcome = run_async(pipeline, None, on_progress)
        self.assertNotIn('error', outcome)
        self.assertTrue(outcome['ok'])
        self.assertGreater(outcome['ticks'], 0)      # the loop kept turning
        n = Lpipe.safetensors_load(source).get_n_tensors()
        self.assertEqual(seen[-1][:2], (n, n))
        self.assertEqual(seen[-1][2], seen[-1][3])
        self.assertEqual([s[0] for s in seen], sorted(s[0] for s in seen))
        arrays, _ = read_arrays(out)
        self.assertEqual(len(arrays), n)

    def test_cancel_leaves_no_output(self):
        source = synth(self.path('in.safetensors'), rank=2)
        out = self.path('out.safetensors')
        pipeline = Lpipe.Pipeline.new(registry)
        pipeline.parse_launch(['safetensors-source', f'location={source}', '!',
                               'py-gate', '!', 'safetensors-sink', f'location={out}'])
        pipeline.set_threads(1)
        Gate.seen = 0
        Gate.reached = threading.Event()
        Gate.release = threading.Event()

        cancellable = Gio.Cancellable()

        def cancel_when_reached():
            if not Gate.reached.is_set():
                return GLib.SOURCE_CONTINUE
            cancellable.cancel()
            Gate.release.set()
            return GLib.SOURCE_REMOVE

        GLib.timeout_add(5, cancel_when_reached)
        outcome = run_async(pipeline, cancellable)
        self.assertIn('error', outcome)
        error_is(self, outcome['error'], Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED)
        self.assertEqual(sorted(os.listdir(self.tmp)), ['in.safetensors'])

        # The same pipeline, not cancelled, writes the file
        Gate.seen = 0
        Gate.release.set()
        outcome = run_async(pipeline, Gio.Cancellable())
        self.assertTrue(outcome.get('ok'), outcome.get('error'))
        before, _ = read_arrays(source)
        after, _ = read_arrays(out)
        for name, array in before.items():
            np.testing.assert_array_equal(after[name], array)


if __name__ == '__main__':
    main()
