#!/usr/bin/python3
# Read a checkpoint's tensors as numpy arrays, and write numpy arrays as one.
#
#   python3 inspect_checkpoint.py FILE.safetensors

import sys

import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import GLib, Lpipe

import numpy as np

# Dtypes numpy holds as they are; the others (bf16, f8...) come as float32.
NUMPY_DTYPES = {
    Lpipe.Dtype.F64: np.float64, Lpipe.Dtype.F32: np.float32,
    Lpipe.Dtype.F16: np.float16, Lpipe.Dtype.I64: np.int64,
    Lpipe.Dtype.I32: np.int32, Lpipe.Dtype.I16: np.int16,
    Lpipe.Dtype.I8: np.int8, Lpipe.Dtype.U8: np.uint8,
}


def tensor_to_numpy(tensor):
    shape = tensor.get_shape()
    dtype = NUMPY_DTYPES.get(tensor.get_dtype())
    if dtype is not None:
        data = tensor.dup_data()             # a GLib.Bytes of the raw values
    else:
        dtype = np.float32
        data = tensor.dup_f32_bytes()        # converted by lpipe
    return np.frombuffer(data.get_data(), dtype=dtype).reshape(shape)


def load_arrays(path):
    checkpoint = Lpipe.safetensors_load(path)
    arrays = {t.get_name(): tensor_to_numpy(t) for t in checkpoint.get_tensors()}
    metadata = {k: checkpoint.get_metadata(k)
                for k in checkpoint.dup_metadata_keys()}
    return arrays, metadata


def save_arrays(path, arrays, metadata=None):
    checkpoint = Lpipe.Checkpoint.new()
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        dtype = next(k for k, v in NUMPY_DTYPES.items() if v == array.dtype)
        checkpoint.add_tensor(Lpipe.Tensor.new(name, dtype, list(array.shape),
                                               GLib.Bytes.new(array.tobytes())))
    for key, value in (metadata or {}).items():
        checkpoint.set_metadata(key, value)
    Lpipe.safetensors_save(checkpoint, path, None)


def main():
    if len(sys.argv) != 2:
        sys.exit(f'usage: {sys.argv[0]} FILE.safetensors')
    try:
        arrays, metadata = load_arrays(sys.argv[1])
    except GLib.Error as error:
        sys.exit(error.message)
    for name, array in arrays.items():
        print(f'{name:60} {str(array.dtype):8} {str(list(array.shape)):16} '
              f'|x|max {float(np.abs(array).max(initial=0)):.6g}')
    for key, value in metadata.items():
        print(f'{key} = {value}')


if __name__ == '__main__':
    main()
