#!/usr/bin/python3
# Reduce a LoRA to a lower rank, running reduce.pipeline without blocking the
# event loop.
#
#   python3 reduce_lora.py INPUT.safetensors OUTPUT.safetensors RANK

import os
import sys

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import GLib, Lpipe

HERE = os.path.dirname(os.path.abspath(__file__))


def reduce_lora(input_path, output_path, rank):
    pipeline = Lpipe.Pipeline.new(Lpipe.Registry.get_default())
    # Parameters override the "params" of the file, like `lpipe run` does.
    pipeline.load_from_file(os.path.join(HERE, 'reduce.pipeline'),
                            [f'input={input_path}', f'output={output_path}',
                             f'rank={rank}'])

    loop = GLib.MainLoop()
    outcome = {}

    def on_progress(pipeline, tensors_done, tensors_total, bytes_done, bytes_total):
        # Emitted in this thread, between other events of the loop.
        print(f'\r{tensors_done}/{tensors_total} tensors', end='', flush=True)

    def on_done(pipeline, result):
        try:
            outcome['ok'] = pipeline.run_finish(result)
        except GLib.Error as error:
            outcome['error'] = error
        loop.quit()

    pipeline.connect('progress', on_progress)
    pipeline.run_async(None, on_done)
    loop.run()
    print()
    if 'error' in outcome:
        raise outcome['error']


def main():
    if len(sys.argv) != 4:
        sys.exit(f'usage: {sys.argv[0]} INPUT OUTPUT RANK')
    try:
        reduce_lora(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    except GLib.Error as error:
        # error.domain is e.g. 'lp-stage-error-quark', error.code an LpStageError
        sys.exit(f'{error.domain} {error.code}: {error.message}')


if __name__ == '__main__':
    main()
