#!/usr/bin/python3
# Reduce a LoRA with an inline chain, show progress, then compare each
# module's update before and after with numpy.
#
#   python3 reduce_and_compare.py INPUT.safetensors OUTPUT.safetensors RANK

import sys

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import Lpipe

import numpy as np


def reduce(input_path, output_path, rank):
    pipeline = Lpipe.Pipeline.parse_launch(
        f'safetensors-source location="{input_path}" ! lora-svd rank={rank} '
        f'! safetensors-sink location="{output_path}"')

    def progress(tensors_done, tensors_total, bytes_done, bytes_total):
        print(f'\r{tensors_done}/{tensors_total} tensors', end='', flush=True)

    # Ctrl-C here cancels the run, leaves no output and raises KeyboardInterrupt
    stats = pipeline.run(progress=progress)
    print(f'\nwrote {stats.props.tensors_written} tensors, '
          f'{stats.props.bytes_written / 1e6:.1f} MB, to {", ".join(stats.get_outputs())} '
          f'in {stats.props.elapsed:.2f} s')


def factors(checkpoint):
    """{module: (B, A)} of a diffusers/PEFT-named LoRA, in float64."""
    result = {}
    for name in checkpoint:                     # a checkpoint is a mapping
        if name.endswith('.lora_A.weight'):
            module = name[:-len('.lora_A.weight')]
            down = checkpoint[name].to_numpy()  # a view of the file where it can be
            up = checkpoint[module + '.lora_B.weight'].to_numpy()
            result[module] = (up.astype(np.float64), down.astype(np.float64))
    return result


def norm_of_product(up, down):
    """||up @ down||_F without forming the product: from the QR factors."""
    return np.linalg.norm(np.linalg.qr(up, mode='r') @ np.linalg.qr(down.T, mode='r').T)


def relative_error(before, after):
    """||B A - B' A'|| / ||B A||; the difference is [B, -B'] @ [A; A']."""
    (b, a), (b2, a2) = before, after
    return (norm_of_product(np.hstack([b, -b2]), np.vstack([a, a2]))
            / norm_of_product(b, a))


def main():
    if len(sys.argv) != 4:
        sys.exit(f'usage: {sys.argv[0]} INPUT OUTPUT RANK')
    try:
        reduce(sys.argv[1], sys.argv[2], int(sys.argv[3]))
        before = factors(Lpipe.safetensors_load(sys.argv[1]))
        after = factors(Lpipe.safetensors_load(sys.argv[2]))
    except FileNotFoundError as error:          # also a GLib.Error
        sys.exit(f'not found: {error.message}')
    except ValueError as error:                 # a bad file, pipeline or value
        sys.exit(f'invalid: {error.message}')
    worst = max(relative_error(before[m], after[m]) for m in before)
    print(f'{len(before)} modules, worst relative error {worst:.4f}')


if __name__ == '__main__':
    main()
