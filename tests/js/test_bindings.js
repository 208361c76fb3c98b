#!/usr/bin/gjs
// lpipe from JavaScript (gjs): checkpoints, pipelines, async runs, errors and
// a stage written in JavaScript, against the build tree.
//
// SPDX-License-Identifier: LGPL-2.1-or-later

imports.gi.versions.Lpipe = '1.0';
const {Gio, GLib, GObject, Lpipe} = imports.gi;
const System = imports.system;

const HERE = GLib.path_get_dirname(System.programInvocationName);
const EXAMPLES = GLib.build_filenamev([HERE, 'examples']);
const LPIPE = GLib.getenv('LPIPE');
const registry = Lpipe.Registry.get_default();
let tmp;

function path(name) {
    return GLib.build_filenamev([tmp, name]);
}

function assert(condition, what) {
    if (!condition)
        throw new Error(`assertion failed: ${what}`);
}

function assertEqual(a, b, what = '') {
    const sa = JSON.stringify(a), sb = JSON.stringify(b);
    if (sa !== sb)
        throw new Error(`${what}: ${sa} != ${sb}`);
}

function assertError(fn, quark, code) {
    try {
        fn();
    } catch (e) {
        assert(e instanceof GLib.Error, `a GLib.Error, not ${e}`);
        assertEqual(GLib.quark_to_string(e.domain), GLib.quark_to_string(quark), 'domain');
        assertEqual(e.code, code, `code of "${e.message}"`);
        assert(e.matches(quark, code), 'matches');
        return e;
    }
    throw new Error('no error raised');
}

function spawn(argv) {
    const [, out, err, status] = GLib.spawn_sync(null, argv, null, GLib.SpawnFlags.SEARCH_PATH, null);
    const decoder = new TextDecoder();
    return {status: status === 0 ? 0 : status >> 8,
        stdout: decoder.decode(out), stderr: decoder.decode(err)};
}

function synth(file, args = []) {
    const r = spawn([LPIPE, '-q', 'launch', 'lora-synth', 'preset=sd15-unet', 'rank=2',
        'dtype=f32', ...args, '!', 'safetensors-sink', `location=${file}`]);
    assertEqual(r.status, 0, r.stderr);
    return file;
}

// An independent reader: the header as JSON, the values with DataView.
function readSafetensors(file) {
    const [, data] = GLib.file_get_contents(file);
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    const n = Number(view.getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(data.subarray(8, 8 + n)));
    const metadata = header.__metadata__ || {};
    delete header.__metadata__;
    const tensors = {};
    for (const [name, e] of Object.entries(header)) {
        const [b, end] = e.data_offsets;
        const values = [];
        const width = {F32: 4, F16: 2, BF16: 2}[e.dtype];
        for (let off = 8 + n + b; off < 8 + n + end; off += width) {
            if (e.dtype === 'F32') {
                values.push(view.getFloat32(off, true));
            } else if (e.dtype === 'BF16') {
                const buf = new DataView(new ArrayBuffer(4));
                buf.setUint32(0, view.getUint16(off, true) << 16);
                values.push(buf.getFloat32(0));
            } else {
                throw new Error(`the test reads no ${e.dtype}`);
            }
        }
        tensors[name] = {dtype: e.dtype, shape: e.shape, values,
            raw: data.subarray(8 + n + b, 8 + n + end)};
    }
    return [tensors, metadata];
}

function floats(tensor) {
    const bytes = tensor.dup_f32_bytes().toArray();
    return Array.from(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4));
}

const Negate = GObject.registerClass(class JsNegate extends Lpipe.Transform {
    vfunc_transform_tensor(tensor) {
        if (tensor.get_name().endsWith('.alpha'))
            return null;   // dropped
        const values = new Float32Array(floats(tensor).map(v => -v));
        return Lpipe.Tensor.new(tensor.get_name(), Lpipe.Dtype.F32, tensor.get_shape(),
            new GLib.Bytes(new Uint8Array(values.buffer)));
    }
});

const Fail = GObject.registerClass(class JsFail extends Lpipe.Transform {
    vfunc_transform_tensor(tensor) {
        throw new GLib.Error(Lpipe.stage_error_quark(), Lpipe.StageError.INVALID_INPUT,
            'no tensor may pass');
    }
});

registry.register_stage_full(Negate.$gtype, 'js-negate', 'JavaScript', 'Negates');
registry.register_stage_full(Fail.$gtype, 'js-fail', null, null);

const tests = {
    readWhatCWrote() {
        for (const dtype of ['f32', 'bf16']) {
            const file = synth(path(`${dtype}.safetensors`), [`dtype=${dtype}`, 'format=kohya']);
            const [oracle, metadata] = readSafetensors(file);
            const checkpoint = Lpipe.safetensors_load(file);
            assertEqual(checkpoint.get_tensors().map(t => t.get_name()), Object.keys(oracle));
            const keys = checkpoint.dup_metadata_keys();
            assertEqual(Object.fromEntries(keys.map(k => [k, checkpoint.get_metadata(k)])), metadata);
            for (const tensor of checkpoint.get_tensors().slice(0, 12)) {
                const o = oracle[tensor.get_name()];
                assertEqual(Lpipe.dtype_to_string(tensor.get_dtype()), o.dtype);
                assertEqual(tensor.get_shape(), o.shape, 'shape');
                assertEqual(Array.from(tensor.dup_data().toArray()), Array.from(o.raw), 'bytes');
                assertEqual(floats(tensor), o.values, 'f32');
                assertEqual(tensor.dup_f32(), o.values, 'dup_f32');
            }
        }
    },

    buildAndWrite() {
        const values = new Float32Array([1.5, -2, 0.25, 8, 3, -1]);
        const checkpoint = Lpipe.Checkpoint.new();
        checkpoint.add_tensor(Lpipe.Tensor.new('a.weight', Lpipe.Dtype.F32, [2, 3],
            new GLib.Bytes(new Uint8Array(values.buffer))));
        checkpoint.add_tensor(Lpipe.Tensor.new_from_f32('b.weight', Lpipe.Dtype.BF16, [3],
            [1, -0.5, 4]));
        checkpoint.set_metadata('made.by', 'gjs');
        const file = path('built.safetensors');
        Lpipe.safetensors_save(checkpoint, file, null);
        const [tensors, metadata] = readSafetensors(file);
        assertEqual(tensors['a.weight'].shape, [2, 3]);
        assertEqual(tensors['a.weight'].values, Array.from(values));
        assertEqual(tensors['b.weight'].dtype, 'BF16');
        assertEqual(tensors['b.weight'].values, [1, -0.5, 4]);
        assertEqual(metadata, {'made.by': 'gjs'});
        assertError(() => Lpipe.Tensor.new('x', Lpipe.Dtype.F32, [2],
            new GLib.Bytes(new Uint8Array(7))), Lpipe.format_error_quark(), Lpipe.FormatError.SHAPE);
        assertError(() => Lpipe.safetensors_load(path('missing')),
            GLib.file_error_quark(), GLib.FileError.NOENT);
    },

    registry() {
        const stages = registry.list_stages();
        for (const s of ['safetensors-source', 'cast', 'lora-svd', 'js-negate'])
            assert(stages.includes(s), s);
        const cast = registry.create_stage('cast');
        assert(cast instanceof Lpipe.Transform, 'a transform');
        const props = GObject.Object.list_properties.call(cast.constructor).map(p => p.name);
        assert(props.includes('dtype'), `dtype in ${props}`);
        assertEqual(registry.lookup_plugin('cast').get_name(), 'convert');
        assertEqual(registry.lookup('js-negate'), Negate.$gtype);
    },

    fileWithParams() {
        const input = synth(path('in.safetensors'));
        const out = path('out.safetensors');
        const pipeline = Lpipe.Pipeline.new(registry);
        pipeline.load_from_file(GLib.build_filenamev([EXAMPLES, 'reduce.pipeline']),
            [`input=${input}`, `output=${out}`, 'rank=1']);
        assertEqual(pipeline.get_stage(1).rank, 1);
        pipeline.run(null);
        const [tensors] = readSafetensors(out);
        for (const [name, t] of Object.entries(tensors)) {
            if (name.endsWith('lora_A.weight'))
                assertEqual(t.shape[0], 1, name);
        }
    },

    builtInCodeWithJsStage() {
        const input = synth(path('in.safetensors'), ['format=kohya']);
        const out = path('out.safetensors');
        const pipeline = Lpipe.Pipeline.new(registry);
        const read = pipeline.add_stage('safetensors-source', null);
        read.location = input;
        const negate = pipeline.add_stage('js-negate', 'negate');
        const write = pipeline.add_stage('safetensors-sink', null);
        write.set_property_from_string('location', out);
        pipeline.link(read, negate);
        pipeline.link(negate, write);
        pipeline.set_threads(2);
        pipeline.run(null);
        const [before] = readSafetensors(input);
        const [after] = readSafetensors(out);
        let n = 0;
        for (const [name, t] of Object.entries(before)) {
            if (name.endsWith('.alpha')) {
                assert(!(name in after), `${name} dropped`);
                continue;
            }
            assertEqual(after[name].values, t.values.map(v => -v), name);
            n++;
        }
        assert(n > 0, 'tensors');
    },

    errors() {
        const pipeline = Lpipe.Pipeline.new(registry);
        const e = assertError(() => pipeline.add_stage('lora-svdd', null),
            Lpipe.pipeline_error_quark(), Lpipe.PipelineError.UNKNOWN_STAGE);
        assert(e.message.includes('lora-svd'), 'suggestion');
        assertError(() => Lpipe.Pipeline.new(registry).load_from_data(
            '{"lpipe": 1, "stages": [{"stage": "cast", "colour": 1}]}', -1, 'x', null),
        Lpipe.pipeline_error_quark(), Lpipe.PipelineError.UNKNOWN_PROPERTY);
        const input = synth(path('in.safetensors'));
        const failing = Lpipe.Pipeline.new(registry);
        failing.parse_launch(['safetensors-source', `location=${input}`, '!', 'js-fail', '!',
            'safetensors-sink', `location=${path('out.safetensors')}`]);
        const f = assertError(() => failing.run(null),
            Lpipe.stage_error_quark(), Lpipe.StageError.INVALID_INPUT);
        assert(f.message.includes('no tensor may pass'), f.message);
    },

    asyncProgressAndCancel() {
        const input = synth(path('in.safetensors'), ['preset=llama', 'rank=16']);
        for (const cancel of [false, true]) {
            const out = path('out.safetensors');
            const pipeline = Lpipe.Pipeline.new(registry);
            pipeline.parse_launch(['safetensors-source', `location=${input}`, '!',
                'cast', 'dtype=f16', '!', 'safetensors-sink', `location=${out}`]);
            pipeline.set_threads(1);
            const cancellable = new Gio.Cancellable();
            const loop = GLib.MainLoop.new(null, false);
            const seen = [];
            let ticks = 0, error = null;
            pipeline.connect('progress', (_p, done, total) => {
                seen.push([done, total]);
                if (cancel && done > 0)
                    cancellable.cancel();
            });
            const tick = GLib.timeout_add(GLib.PRIORITY_DEFAULT, 1, () => {
                ticks++;
                return GLib.SOURCE_CONTINUE;
            });
            pipeline.run_async(cancellable, (_p, result) => {
                try {
                    pipeline.run_finish(result);
                } catch (e) {
                    error = e;
                }
                loop.quit();
            });
            loop.run();
            GLib.source_remove(tick);
            assert(ticks > 0, 'the loop turned');
            if (cancel) {
                assert(error && error.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED),
                    `cancelled, not ${error}`);
                const names = [];
                const e = Gio.File.new_for_path(tmp).enumerate_children('standard::name', 0, null);
                for (let info; (info = e.next_file(null));)
                    names.push(info.get_name());
                assertEqual(names.sort(), ['in.safetensors'], 'no output');
            } else {
                assert(error === null, `${error}`);
                const [last_done, total] = seen[seen.length - 1];
                assertEqual(last_done, total);
                assertEqual(total, Lpipe.safetensors_load(out).get_n_tensors());
                GLib.unlink(out);
            }
        }
    },

    examples() {
        const input = synth(path('in.safetensors'), ['rank=4']);
        let r = spawn(['gjs', GLib.build_filenamev([EXAMPLES, 'reduce_lora.js']),
            input, path('r2.safetensors'), '2']);
        assertEqual(r.status, 0, r.stderr);
        assert(r.stdout.includes('256/256 tensors'), r.stdout);
        r = spawn(['gjs', GLib.build_filenamev([EXAMPLES, 'inspect_checkpoint.js']),
            path('r2.safetensors')]);
        assertEqual(r.status, 0, r.stderr);
        assert(r.stdout.includes('lora_A.weight F32 [2, 320]'), r.stdout);
        r = spawn(['gjs', GLib.build_filenamev([EXAMPLES, 'custom_stage.js']),
            input, path('scaled.safetensors'), '3']);
        assertEqual(r.status, 0, r.stderr);
        const [before] = readSafetensors(input);
        const [after] = readSafetensors(path('scaled.safetensors'));
        for (const [name, t] of Object.entries(before)) {
            const f = name.endsWith('lora_B.weight') ? 3 : 1;
            after[name].values.forEach((v, i) =>
                assert(Math.abs(v - Math.fround(t.values[i] * f)) <= 1e-6 * Math.abs(v), name));
        }
        r = spawn(['gjs', GLib.build_filenamev([EXAMPLES, 'reduce_lora.js']),
            path('missing'), path('x'), '2']);
        assert(r.status !== 0 && r.stderr.includes('g-file-error-quark 4'), r.stderr);
    },

    // What gjs gets of what the Python overrides add (gjs loads no override
    // module like PyGObject's gi/overrides): the C API they are built on.
    'parse_launch_string splits like a shell'() {
        const out = path('my out.safetensors');
        // new Lpipe.Pipeline(), like lp_pipeline_new(NULL), has the default registry
        const pipeline = new Lpipe.Pipeline();
        pipeline.parse_launch_string(
            `lora-synth preset=sd15-unet rank=2 ! safetensors-sink location="${out}"`);
        assertEqual(pipeline.get_n_stages(), 2);
        assertEqual(pipeline.get_stage(1).location, out);
        assert(pipeline.run(null), 'run');
        assert(GLib.file_test(out, GLib.FileTest.EXISTS), 'written');
        assertError(() => new Lpipe.Pipeline().parse_launch_string('lora-synth ! sink location="open'),
            Lpipe.pipeline_error_quark(), Lpipe.PipelineError.SYNTAX);
    },

    'set_property_checked throws out of range'() {
        const stage = registry.create_stage('lora-svd');
        stage.set_property_checked('rank', 8);
        assertEqual(stage.rank, 8);
        // a plain `stage.rank = 1e9` only warns and leaves 8; this throws
        const e = assertError(() => stage.set_property_checked('rank', 1e9),
            Lpipe.pipeline_error_quark(), Lpipe.PipelineError.BAD_VALUE);
        assert(e.message.includes("'rank'"), e.message);
        assertError(() => stage.set_property_checked('rank', '1000000000'),
            Lpipe.pipeline_error_quark(), Lpipe.PipelineError.BAD_VALUE);
        assertError(() => stage.set_property_checked('no-such', 1),
            Lpipe.pipeline_error_quark(), Lpipe.PipelineError.UNKNOWN_PROPERTY);
        assertEqual(stage.rank, 8);
        stage.set_property_checked('rank', '16');
        assertEqual(stage.rank, 16);
    },

    'run statistics'() {
        const out = path('out.safetensors');
        const pipeline = new Lpipe.Pipeline();
        pipeline.parse_launch_string(`lora-synth preset=sd15-unet rank=2 ! safetensors-sink location=${out}`);
        assertEqual(pipeline.get_last_stats(), null, 'before a run');
        pipeline.run(null);
        const stats = pipeline.get_last_stats();
        const [tensors] = readSafetensors(out);
        assertEqual(stats.tensors_written, Object.keys(tensors).length, 'tensors written');
        const bytes = Object.values(tensors).reduce((n, t) => n + t.raw.length, 0);
        assertEqual(stats.bytes_written, bytes, 'bytes written');
        assertEqual(stats.get_outputs(), [out]);
        assertEqual(stats.n_stages, 2);
        assert(stats.elapsed > 0, 'elapsed');
    },
};

let passed = 0, failed = 0;
for (const [name, fn] of Object.entries(tests)) {
    tmp = GLib.dir_make_tmp('lpipe-js-XXXXXX');
    try {
        fn();
        print(`ok ${name}`);
        passed++;
    } catch (e) {
        printerr(`FAIL ${name}: ${e}\n${e.stack || ''}`);
        failed++;
    }
    spawn(['rm', '-rf', tmp]);
}
print(`${passed} passed, ${failed} failed`);
System.exit(failed ? 1 : 0);
