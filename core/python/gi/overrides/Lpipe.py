# Lpipe.py: lpipe's GObject API the way Python expects it, as PyGObject
# overrides (loaded by `from gi.repository import Lpipe`, like GTK's and
# GStreamer's):
#
#  - Pipeline.parse_launch('a ! b') of a string, on the class or a pipeline;
#    run() returns an Lpipe.RunStats, takes a progress callback, and Ctrl-C
#    cancels it (nothing is written) and raises KeyboardInterrupt;
#  - a Checkpoint is a mapping of tensor name -> Tensor;
#  - Tensor.to_numpy(): a read-only array over the tensor's bytes, no copy
#    where lpipe holds them (a loaded file is mapped);
#  - setting a stage property out of range raises ValueError instead of a
#    warning and a value left unchanged;
#  - GLib.Error is raised as Lpipe.NotFoundError (also a FileNotFoundError)
#    or Lpipe.InvalidError (also a ValueError) where that is its meaning.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import builtins
import collections.abc
import ctypes
import errno
import signal
import threading

from gi.repository import GLib, GObject, Gio

from ..module import get_introspection_module
from ..overrides import override

Lpipe = get_introspection_module('Lpipe')

__all__ = []


# ---- errors ------------------------------------------------------------------

class NotFoundError(GLib.Error, builtins.FileNotFoundError):
    """A GLib.Error that means a file or folder does not exist."""

    def __init__(self, message, domain, code):
        GLib.Error.__init__(self, message, domain, code)
        self.errno = errno.ENOENT
        self.strerror = message


class InvalidError(GLib.Error, builtins.ValueError):
    """A GLib.Error that means bad input: a malformed file or pipeline, an
    unknown stage or property, a value out of range."""


__all__ += ['NotFoundError', 'InvalidError']

_NOT_FOUND = {
    (GLib.quark_to_string(GLib.file_error_quark()), int(GLib.FileError.NOENT)),
    (GLib.quark_to_string(Gio.io_error_quark()), int(Gio.IOErrorEnum.NOT_FOUND)),
}
_INVALID_DOMAINS = {
    GLib.quark_to_string(Lpipe.pipeline_error_quark()),
    GLib.quark_to_string(Lpipe.format_error_quark()),
}
_INVALID = {
    (GLib.quark_to_string(Lpipe.stage_error_quark()), int(Lpipe.StageError.INVALID_PROPERTY)),
    (GLib.quark_to_string(Lpipe.stage_error_quark()), int(Lpipe.StageError.INVALID_INPUT)),
}


def _mapped(error):
    """The exception to raise for a GLib.Error: the same domain, code and
    message, of a class that also says what it means."""
    key = (error.domain, error.code)
    if key in _NOT_FOUND:
        cls = NotFoundError
    elif error.domain in _INVALID_DOMAINS or key in _INVALID:
        cls = InvalidError
    else:
        return error
    return cls(error.message, error.domain, error.code)


def _raising(func):
    """func, raising the mapped exceptions."""
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GLib.Error as error:
            mapped = _mapped(error)
            if mapped is error:
                raise
            raise mapped.with_traceback(error.__traceback__) from None
    wrapper.__name__ = getattr(func, '__name__', 'function')
    wrapper.__doc__ = getattr(func, '__doc__', None)
    return wrapper


# ---- stages: properties checked ---------------------------------------------

def _checked_value(pspec, value):
    """What lp_stage_set_property_checked() gets: numbers and booleans as
    their text, which it parses with the range check and the message a
    pipeline file gets (a GValue of a Python int would overflow first)."""
    if isinstance(value, str):
        return value
    if pspec is None:
        return str(value)   # lp_stage_set_property_checked() names the property
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (GObject.GEnum, GObject.GFlags)):
        return GObject.Value(pspec.value_type, value)
    if isinstance(value, (int, float)):
        return repr(value)
    return GObject.Value(pspec.value_type, value)


class _CheckedProps:
    """stage.props, where assignment goes through set_property()."""

    def __init__(self, stage, props):
        object.__setattr__(self, '_stage', stage)
        object.__setattr__(self, '_props', props)

    def __getattr__(self, name):
        return getattr(self._props, name)

    def __setattr__(self, name, value):
        self._stage.set_property(name.replace('_', '-'), value)

    def __dir__(self):
        return dir(self._props)


_props_descriptor = next(k.__dict__['props'] for k in Lpipe.Stage.__mro__
                         if 'props' in k.__dict__)


class _StageProps:
    def __get__(self, stage, cls):
        props = _props_descriptor.__get__(stage, cls)
        return props if stage is None else _CheckedProps(stage, props)


class Stage(Lpipe.Stage):
    props = _StageProps()

    def set_property(self, name, value):
        """Sets a property; a value out of range, of the wrong type, or an
        unknown property raises (InvalidError, a ValueError)."""
        canonical = name.replace('_', '-')
        pspec = next((p for p in self.list_properties() if p.name == canonical), None)
        self.set_property_checked(canonical, _checked_value(pspec, value))


Stage = override(Stage)
__all__.append('Stage')


# ---- tensors: numpy without a copy --------------------------------------------

class _GError(ctypes.Structure):
    _fields_ = [('domain', ctypes.c_uint32), ('code', ctypes.c_int),
                ('message', ctypes.c_char_p)]


_c = None


def _clib():
    """liblpipe's and GLib's data functions, for the one thing GObject
    Introspection cannot do: hand a GBytes' memory to numpy without copying
    it into a Python bytes."""
    global _c
    if _c is None:
        lp = ctypes.CDLL('liblpipe-1.0.so.0')
        glib = ctypes.CDLL('libglib-2.0.so.0')
        lp.lp_tensor_dup_data.restype = ctypes.c_void_p
        lp.lp_tensor_dup_data.argtypes = [ctypes.c_void_p,
                                          ctypes.POINTER(ctypes.POINTER(_GError))]
        lp.lp_dtype_to_f32.restype = None
        lp.lp_dtype_to_f32.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_size_t]
        glib.g_bytes_get_data.restype = ctypes.c_void_p
        glib.g_bytes_get_data.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        glib.g_bytes_unref.argtypes = [ctypes.c_void_p]
        glib.g_error_free.argtypes = [ctypes.c_void_p]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        _c = (lp, glib, get_pointer)
    return _c


class _BytesRef:
    """Holds a GBytes reference for as long as an array over it lives."""

    def __init__(self, glib, gbytes):
        self._unref = glib.g_bytes_unref
        self._gbytes = gbytes

    def __del__(self):
        self._unref(self._gbytes)


def _buffer(tensor):
    """A buffer over the GBytes lp_tensor_dup_data() gives:
    the file's mapped bytes for a loaded tensor, computed ones for a lazy
    one. Keeps the GBytes alive; never copies."""
    lp, glib, get_pointer = _clib()
    error = ctypes.POINTER(_GError)()
    gbytes = lp.lp_tensor_dup_data(get_pointer(tensor.__gpointer__, None), ctypes.byref(error))
    if not gbytes:
        e = error.contents
        raised = GLib.Error(e.message.decode('utf-8', 'replace'),
                            GLib.quark_to_string(e.domain), e.code)
        glib.g_error_free(error)
        raise _mapped(raised)
    size = ctypes.c_size_t()
    data = glib.g_bytes_get_data(gbytes, ctypes.byref(size))
    ref = _BytesRef(glib, gbytes)
    buf = (ctypes.c_ubyte * size.value).from_address(data) if size.value else bytearray()
    if size.value:
        buf._lpipe_bytes = ref
    return buf


# numpy dtypes of the lpipe dtypes numpy holds as they are; the others
# (bf16, f8, f6, f4) come as float32, or with raw=True as their bits.
_NUMPY_DTYPES = {
    Lpipe.Dtype.BOOL: '|b1', Lpipe.Dtype.U8: '|u1', Lpipe.Dtype.I8: '|i1',
    Lpipe.Dtype.I16: '<i2', Lpipe.Dtype.U16: '<u2', Lpipe.Dtype.F16: '<f2',
    Lpipe.Dtype.I32: '<i4', Lpipe.Dtype.U32: '<u4', Lpipe.Dtype.F32: '<f4',
    Lpipe.Dtype.C64: '<c8', Lpipe.Dtype.F64: '<f8', Lpipe.Dtype.I64: '<i8',
    Lpipe.Dtype.U64: '<u8',
}
_RAW_DTYPES = {Lpipe.Dtype.BF16: '<u2'}


class Tensor(Lpipe.Tensor):
    @property
    def shape(self):
        return tuple(self.get_shape())

    def to_numpy(self, raw=False):
        """The values as a read-only numpy array of the tensor's shape.

        dtypes numpy has (f32, f16, f64, integers, bool) are a view of the
        tensor's bytes: for a tensor of a loaded file, of the mapped file
        itself, with no copy. bf16 and the 8-, 6- and 4-bit floats come as
        float32 (converted by lpipe into the array, the one copy); with raw=True as their stored
        bits instead (bf16 as uint16, the 8-bit floats as uint8; packed
        sub-byte ones as a flat uint8 array), again without a copy.
        Raises Lpipe.InvalidError for a dtype lpipe cannot convert."""
        import numpy as np

        dtype = self.get_dtype()
        shape = self.shape
        if dtype in _NUMPY_DTYPES:
            npdtype = _NUMPY_DTYPES[dtype]
        elif raw:
            npdtype = _RAW_DTYPES.get(dtype, '|u1')
            if Lpipe.dtype_get_bits(dtype) < 8:
                shape = (-1,)
        elif Lpipe.dtype_can_convert(dtype):
            # converted straight into numpy's memory (which numpy backs with
            # huge pages), not into a GBytes first
            values = np.empty(self.get_n_elements(), dtype=np.float32)
            stored = _buffer(self)
            if values.size:
                _clib()[0].lp_dtype_to_f32(int(dtype), ctypes.addressof(stored),
                                           values.ctypes.data, values.size)
            return values.reshape(shape)
        else:
            raise InvalidError(
                f"tensor '{self.get_name()}': lpipe does not convert "
                f"{Lpipe.dtype_to_string(dtype)} to numbers; use to_numpy(raw=True)",
                GLib.quark_to_string(Lpipe.stage_error_quark()),
                int(Lpipe.StageError.INVALID_INPUT))
        array = np.frombuffer(_buffer(self), dtype=npdtype).reshape(shape)
        array.flags.writeable = False   # the bytes are shared (a read-only mapping)
        return array

    def __array__(self, dtype=None):
        array = self.to_numpy()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self):
        return (f'<Lpipe.Tensor {self.get_name()!r} '
                f'{Lpipe.dtype_to_string(self.get_dtype())} {list(self.shape)}>')


Tensor = override(Tensor)
__all__.append('Tensor')


# ---- checkpoints: a mapping of name -> tensor ----------------------------------

class Checkpoint(Lpipe.Checkpoint):
    """A mapping of tensor name -> Lpipe.Tensor, in file order."""

    def __len__(self):
        return self.get_n_tensors()

    def __iter__(self):
        return (t.get_name() for t in self.get_tensors())

    def __contains__(self, name):
        return isinstance(name, str) and self.lookup(name) is not None

    def __getitem__(self, name):
        tensor = self.lookup(name) if isinstance(name, str) else None
        if tensor is None:
            raise KeyError(name)
        return tensor

    def get(self, name, default=None):
        tensor = self.lookup(name) if isinstance(name, str) else None
        return default if tensor is None else tensor

    def keys(self):
        return collections.abc.KeysView(self)

    def values(self):
        return collections.abc.ValuesView(self)

    def items(self):
        return collections.abc.ItemsView(self)

    # A GObject is truthy even when empty; a mapping is not.
    def __bool__(self):
        return len(self) > 0

    @property
    def metadata(self):
        """The `__metadata__` entries, as a dict (a copy)."""
        return {k: self.get_metadata(k) for k in self.dup_metadata_keys()}


Checkpoint = override(Checkpoint)
collections.abc.Mapping.register(Checkpoint)
__all__.append('Checkpoint')


# ---- pipelines -----------------------------------------------------------------

class _ClassOrInstanceMethod:
    """Pipeline.parse_launch(...) makes a pipeline; pipeline.parse_launch(...)
    fills that one."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        def bound(*args, **kwargs):
            return self.func(cls, obj, *args, **kwargs)
        bound.__doc__ = self.__doc__
        return bound


def _params_list(params):
    if params is None:
        return None
    if isinstance(params, collections.abc.Mapping):
        return [f'{k}={_param_text(v)}' for k, v in params.items()]
    return list(params)


def _param_text(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


# Ctrl-C is noticed within this many ms even when the signal lands on one of
# lpipe's worker threads.
_SIGNAL_POLL_MS = 100


class Pipeline(Lpipe.Pipeline):
    def _parse_launch(cls, self, description, registry=None):
        """Builds a chain from `lpipe launch` syntax: a string, split as a
        shell would ('a location="my file" ! b'), or a list of words.
        Pipeline.parse_launch(...) returns a new pipeline; on a pipeline it
        fills that one and returns it."""
        if self is None:
            self = cls.new(registry)
        if isinstance(description, str):
            Lpipe.Pipeline.parse_launch_string(self, description)
        else:
            Lpipe.Pipeline.parse_launch(self, list(description))
        return self

    parse_launch = _ClassOrInstanceMethod(_raising(_parse_launch))

    def load_from_file(self, filename, params=None):
        """Loads a pipeline file; params is a dict (or NAME=VALUE strings)
        overriding its "params"."""
        return Lpipe.Pipeline.load_from_file(self, filename, _params_list(params))

    def load_from_data(self, data, length=-1, origin=None, params=None):
        """Loads a pipeline from its JSON text; params as for load_from_file()."""
        return Lpipe.Pipeline.load_from_data(self, data, length, origin, _params_list(params))

    def run_finish(self, result):
        """Finishes run_async(); returns the run's Lpipe.RunStats."""
        Lpipe.Pipeline.run_finish(self, result)
        return self.get_last_stats()

    def run(self, cancellable=None, progress=None):
        """Runs the pipeline and returns its Lpipe.RunStats (elapsed,
        tensors_written, bytes_written, outputs).

        progress(tensors_done, tensors_total, bytes_done, bytes_total) is
        called in this thread as the sinks write; an exception it raises
        cancels the run and is raised here. Ctrl-C (SIGINT) cancels the run
        — the outputs are written under a temporary name, so nothing is
        left — and raises KeyboardInterrupt."""
        if cancellable is None:
            cancellable = Gio.Cancellable.new()
        context = GLib.MainContext.new()
        outcome = []
        raised = []
        interrupted = []

        def on_progress(pipeline, *values):
            if raised:
                return
            try:
                progress(*values)
            except BaseException as error:   # noqa: B902 - re-raised below
                raised.append(error)
                cancellable.cancel()

        def on_sigint(signum, frame):
            interrupted.append(signum)
            cancellable.cancel()

        handler = self.connect('progress', on_progress) if progress else None
        # Python runs signal handlers in the main thread only, between
        # bytecodes: the loop below wakes up often enough for that.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
        tick = GLib.timeout_source_new(_SIGNAL_POLL_MS)
        tick.set_callback(lambda *args: GLib.SOURCE_CONTINUE)
        tick.attach(context)
        context.push_thread_default()
        try:
            Lpipe.Pipeline.run_async(self, cancellable,
                                     lambda pipeline, result: outcome.append(result))
            while not outcome:
                context.iteration(True)
        finally:
            context.pop_thread_default()
            tick.destroy()
            if in_main:
                signal.signal(signal.SIGINT, previous)
            if handler is not None:
                self.disconnect(handler)

        try:
            stats = self.run_finish(outcome[0])
        except GLib.Error as error:
            if raised:
                raise raised[0] from error
            if interrupted:
                raise KeyboardInterrupt from error
            raise
        if raised:
            raise raised[0]
        if interrupted:
            raise KeyboardInterrupt
        return stats


Pipeline = override(Pipeline)
__all__.append('Pipeline')


# ---- every other function that takes a GError: the mapped exceptions -----------

def _wrap_throwing():
    from gi._gi import Repository, FunctionInfo, ObjectInfo

    overrides = {'Stage': Stage, 'Tensor': Tensor, 'Checkpoint': Checkpoint,
                 'Pipeline': Pipeline}
    for info in Repository.get_default().get_infos('Lpipe'):
        if isinstance(info, FunctionInfo):
            if info.can_throw_gerror():
                globals()[info.get_name()] = _raising(getattr(Lpipe, info.get_name()))
                __all__.append(info.get_name())
        elif isinstance(info, ObjectInfo):
            cls = overrides.get(info.get_name(), getattr(Lpipe, info.get_name()))
            for method in info.get_methods():
                name = method.get_name()
                if not method.can_throw_gerror() or name in cls.__dict__:
                    continue
                setattr(cls, name, _raising(getattr(cls, name)))
    # the ones the overrides above call through the introspected class
    for cls in (Stage, Tensor, Checkpoint, Pipeline):
        for name, value in list(cls.__dict__.items()):
            if callable(value) and not name.startswith('_') and \
                    not isinstance(value, (type, _ClassOrInstanceMethod)):
                setattr(cls, name, _raising(value))


_wrap_throwing()
