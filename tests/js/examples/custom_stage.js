#!/usr/bin/gjs
// A stage written in JavaScript: scales the up factor of every LoRA module,
// used from scale-up.pipeline.
//
//   gjs custom_stage.js INPUT.safetensors OUTPUT.safetensors FACTOR
//
// JavaScript runs on the main thread only, so the stage computes its tensors
// at once (Lpipe.Tensor.new, not new_lazy) and the pipeline runs with run(),
// not run_async().

imports.gi.versions.Lpipe = '1.0';
const {GLib, GObject, Lpipe} = imports.gi;

const HERE = GLib.path_get_dirname(imports.system.programInvocationName);

var ScaleUp = GObject.registerClass({
    Properties: {
        // Properties are what a pipeline file sets, by name.
        'factor': GObject.ParamSpec.double('factor', 'factor',
            'Multiply every up factor by this', GObject.ParamFlags.READWRITE,
            -1e9, 1e9, 1.0),
    },
}, class ScaleUp extends Lpipe.Transform {
    vfunc_transform(checkpoint) {
        const [modules] = Lpipe.lora_find_modules(checkpoint, null, null);
        const ups = new Set(modules.map(m => m.get_up().get_name()));
        const output = checkpoint.new_like();  // metadata and all
        for (let tensor of checkpoint.get_tensors()) {
            if (ups.has(tensor.get_name())) {
                const bytes = tensor.dup_f32_bytes().toArray();
                const values = new Float32Array(bytes.buffer, bytes.byteOffset,
                    bytes.byteLength / 4).map(v => v * this.factor);
                tensor = Lpipe.Tensor.new(tensor.get_name(), Lpipe.Dtype.F32,
                    tensor.get_shape(), new GLib.Bytes(new Uint8Array(values.buffer)));
            }
            output.add_tensor(tensor);
        }
        return output;
    }
});

function main(input, output, factor) {
    const registry = Lpipe.Registry.get_default();
    registry.register_stage_full(ScaleUp.$gtype, 'scale-up', 'LoRA',
        'Scale the up factor of every LoRA module');
    const pipeline = Lpipe.Pipeline.new(registry);
    pipeline.load_from_file(GLib.build_filenamev([HERE, 'scale-up.pipeline']),
        [`input=${input}`, `output=${output}`, `factor=${factor}`]);
    pipeline.run(null);
}

if (ARGV.length === 3) {
    try {
        main(...ARGV);
    } catch (e) {
        printerr(`${GLib.quark_to_string(e.domain)} ${e.code}: ${e.message}`);
        imports.system.exit(1);
    }
}
