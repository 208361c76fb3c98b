#!/usr/bin/gjs
// List a checkpoint's tensors and metadata, with each tensor's values as a
// Float32Array.
//
//   gjs inspect_checkpoint.js FILE.safetensors

imports.gi.versions.Lpipe = '1.0';
const {GLib, Lpipe} = imports.gi;

function tensorToFloat32Array(tensor) {
    // Any dtype lpipe converts, as the bytes of native floats
    const bytes = tensor.dup_f32_bytes().toArray();
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

if (ARGV.length !== 1) {
    printerr('usage: inspect_checkpoint.js FILE.safetensors');
    imports.system.exit(2);
}
let checkpoint;
try {
    checkpoint = Lpipe.safetensors_load(ARGV[0]);
} catch (e) {
    printerr(e.message);
    imports.system.exit(1);
}
for (const tensor of checkpoint.get_tensors()) {
    const values = tensorToFloat32Array(tensor);
    const max = values.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    print(`${tensor.get_name()} ${Lpipe.dtype_to_string(tensor.get_dtype())} ` +
          `[${tensor.get_shape().join(', ')}] |x|max ${max.toPrecision(6)}`);
}
for (const key of checkpoint.dup_metadata_keys())
    print(`${key} = ${checkpoint.get_metadata(key)}`);
