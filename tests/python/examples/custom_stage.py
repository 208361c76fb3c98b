#!/usr/bin/python3
# A stage written in Python: scales the up factor of every LoRA module (which
# scales each module's update by the same factor), used from scale-up.pipeline.
#
#   python3 custom_stage.py INPUT.safetensors OUTPUT.safetensors FACTOR

import os
import sys

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import GLib, GObject, Lpipe

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


class ScaleUp(Lpipe.Transform):
    # Properties are what a pipeline file sets, by name.
    factor = GObject.Property(type=float, default=1.0, nick='factor',
                              blurb='Multiply every up factor by this')

    def do_transform(self, checkpoint):
        modules, others = Lpipe.lora_find_modules(checkpoint, None, None)
        ups = {m.get_up().get_name() for m in modules}
        output = Lpipe.Checkpoint.new_like(checkpoint)   # metadata and all
        for tensor in checkpoint.get_tensors():
            if tensor.get_name() in ups:
                values = np.frombuffer(tensor.dup_f32_bytes().get_data(),
                                       dtype=np.float32) * self.factor
                tensor = Lpipe.Tensor.new(tensor.get_name(), Lpipe.Dtype.F32,
                                          tensor.get_shape(),
                                          GLib.Bytes.new(values.tobytes()))
            output.add_tensor(tensor)
        return output


def main():
    if len(sys.argv) != 4:
        sys.exit(f'usage: {sys.argv[0]} INPUT OUTPUT FACTOR')
    registry = Lpipe.Registry.get_default()
    registry.register_stage_full(ScaleUp, 'scale-up', 'LoRA',
                                 'Scale the up factor of every LoRA module')
    pipeline = Lpipe.Pipeline.new(registry)
    try:
        pipeline.load_from_file(os.path.join(HERE, 'scale-up.pipeline'),
                                [f'input={sys.argv[1]}', f'output={sys.argv[2]}',
                                 f'factor={sys.argv[3]}'])
        pipeline.run(None)
    except GLib.Error as error:
        sys.exit(f'{error.domain} {error.code}: {error.message}')


if __name__ == '__main__':
    main()
