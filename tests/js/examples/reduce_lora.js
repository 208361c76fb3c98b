#!/usr/bin/gjs
// Reduce a LoRA to a lower rank, running reduce.pipeline without blocking the
// main loop.
//
//   gjs reduce_lora.js INPUT.safetensors OUTPUT.safetensors RANK

imports.gi.versions.Lpipe = '1.0';
const {GLib, Lpipe} = imports.gi;

const HERE = GLib.path_get_dirname(imports.system.programInvocationName);

function reduceLora(input, output, rank) {
    const pipeline = Lpipe.Pipeline.new(Lpipe.Registry.get_default());
    // Parameters override the "params" of the file, like `lpipe run` does.
    pipeline.load_from_file(GLib.build_filenamev([HERE, 'reduce.pipeline']),
        [`input=${input}`, `output=${output}`, `rank=${rank}`]);

    const loop = GLib.MainLoop.new(null, false);
    let error = null;
    pipeline.connect('progress', (_pipeline, done, total) => {
        // Emitted on the main thread, between other events of the loop.
        print(`${done}/${total} tensors`);
    });
    pipeline.run_async(null, (_pipeline, result) => {
        try {
            pipeline.run_finish(result);
        } catch (e) {
            error = e;
        }
        loop.quit();
    });
    loop.run();
    if (error)
        throw error;
}

if (ARGV.length !== 3) {
    printerr('usage: reduce_lora.js INPUT OUTPUT RANK');
    imports.system.exit(2);
}
try {
    reduceLora(ARGV[0], ARGV[1], Number(ARGV[2]));
} catch (e) {
    // e.domain is the error domain's quark, e.code its code, as in C
    printerr(`${GLib.quark_to_string(e.domain)} ${e.code}: ${e.message}`);
    imports.system.exit(1);
}
