"""Read ``.pth`` files written by ``torch.save`` without running pickled code or trusting their sizes.

Every ``.pth`` file reaching hear_msm is untrusted input: the authors' original checkpoints
(official runs, and plain state dicts such as the SSAMBA files on the Hub) as much as our own
training ``checkpoint.pt``. :func:`load_torch_file` reads them all, and does not call
``torch.load``, whose loaders trust the sizes a file declares (a record declaring more elements
than its zip entry holds hands out memory past the entry) and hash whatever dictionary keys the
pickle builds (a deeply nested tuple key overflows the C stack). Instead:

* the zip container must be what ``torch.save`` writes: one ``data.pkl`` (at most
  :data:`MAX_PICKLE_BYTES`), entries stored uncompressed, their sizes adding up to no more than
  the file, little-endian data;
* ``data.pkl`` runs through a restricted pure-Python unpickler: globals come from an allow-list
  (tensor rebuilders, ``OrderedDict``, ``set``, dtypes, ...); calling, constructing and filling
  objects is allowed only for those types; dictionary keys and set elements must be scalars or
  flat tuples of scalars;
* ``argparse.Namespace`` and every ``ml_collections.*`` class become inert :class:`PickledRecord`
  stand-ins, so the authors' config can be read (``config.model.arch``) without that library;
* every storage record is checked against its zip entry before a tensor is built on it: a known
  dtype, ``numel x element size`` within the entry, and each tensor's offset, sizes and strides
  inside the record; the bytes are copied out of the entry;
* the unpickled objects may not refer to themselves, nest deeper than :data:`MAX_NESTING` or
  unfold into more than :data:`MAX_OBJECTS` objects (a shared part counted once per reference).

Anything else is a :class:`ValueError` naming the file (and the record, where one is at fault).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import itertools
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["MAX_NESTING", "MAX_OBJECTS", "MAX_PICKLE_BYTES", "PickledRecord", "load_torch_file"]

# A training checkpoint nests about ten levels deep and holds a few thousand objects. The limits
# leave wide room above that while keeping every recursive reader of the result (ours, torch's
# optimizer loader) far from Python's recursion limit and from walks that a shared sub-structure
# referenced twice per level would make exponential.
MAX_NESTING = 100
MAX_OBJECTS = 10_000_000
# The pickle of a base-size model with its optimizer state and config is about 60 kB (the tensors
# are separate records); the pure-Python unpickler reads about 1 MB/s of crafted opcodes.
MAX_PICKLE_BYTES = 16 * 2**20


def load_torch_file(path: str | Path) -> Any:
    """Everything ``torch.save`` wrote to ``path``, rebuilt without running pickled code.

    Tensors come back on CPU with their saved dtype, shape, strides and ``requires_grad``; tensors
    that shared a storage when saved share memory again. ``argparse.Namespace`` and
    ``ml_collections`` objects come back as :class:`PickledRecord`. The module docstring lists
    what is checked.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a ``torch.save`` zip archive, asks for a global outside the
            allow-list, or fails a check on a record or on its structure; the message names the
            file and, where one is at fault, the record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    archive = _TorchArchive.open(path)
    try:
        payload = _RestrictedUnpickler(archive).load()
        _check_structure(payload)
    except _RefusedGlobal as err:
        raise ValueError(
            f"refusing to load {path}: it contains pickled code object {err.qualname!r}; only tensors "
            "and config records are accepted from checkpoints, and this file may run code if opened "
            "with plain torch.load. Do not load it unless you know where it came from."
        ) from None
    except _Refused as err:
        raise ValueError(f"refusing to load {path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - see below
        # A damaged data.pkl fails wherever the stdlib unpickler first trips over it (EOFError,
        # struct.error, a KeyError for a memo index, UnicodeDecodeError, a TypeError for a call
        # with the wrong arguments, ...). Each means "not a readable checkpoint", and none may
        # escape as an exception type a caller does not expect from a loader.
        raise ValueError(
            f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {_shorten(str(err))})"
        ) from err
    finally:
        archive.close()
    return payload


# --------------------------------------------------------------------------- the zip container


class _TorchArchive:
    """The zip container of a ``torch.save`` file; hands out its ``data.pkl`` and storage records."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, prefix: str):
        self.path = path
        self._zip = archive
        self._prefix = prefix  # "<archive name>/", the folder torch.save puts every record in
        self._entries = {info.filename: info for info in archive.infolist()}
        self._storages: dict[str, _Storage] = {}

    @classmethod
    def open(cls, path: Path) -> _TorchArchive:
        """Open ``path`` and check its layout; raises ValueError for anything torch.save does not write."""
        not_torch = (f"{path} is not a PyTorch checkpoint: expected the zip format written by torch.save "
                     "(PyTorch >= 1.6)")
        if not zipfile.is_zipfile(path):
            raise ValueError(not_torch)
        try:
            archive = zipfile.ZipFile(path)
        except Exception as err:  # noqa: BLE001 - a damaged central directory fails in many ways
            raise ValueError(f"{not_torch} ({type(err).__name__}: {_shorten(str(err))})") from None
        try:
            prefix = _check_layout(path, archive)
        except ValueError:
            archive.close()
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a bad CRC in the byteorder record
            archive.close()
            raise ValueError(f"{not_torch} ({type(err).__name__}: {_shorten(str(err))})") from None
        return cls(path, archive, prefix)

    def close(self) -> None:
        self._zip.close()

    def data_pickle(self) -> bytes:
        info = self._entries[self._prefix + "data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise _Refused(f"record {info.filename} is {info.file_size} bytes; at most {MAX_PICKLE_BYTES} are read "
                           "(tensors are stored apart from it, so real checkpoints stay far below)")
        return self._zip.read(info)

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        """Record ``data/<key>`` as ``numel`` elements of ``dtype``, checked against its zip entry."""
        name = f"{self._prefix}data/{key}"
        known = self._storages.get(key)
        if known is not None:
            if (known.data.dtype, known.data.numel()) != (dtype, numel):
                raise _Refused(
                    f"storage record {_shorten(name)} is declared twice, as {known.data.numel()} x "
                    f"{known.data.dtype} and as {numel} x {dtype}"
                )
            return known
        info = self._entries.get(name)
        if info is None:
            raise _Refused(f"storage record {_shorten(name)} is missing from the archive")
        nbytes = numel * dtype.itemsize
        if nbytes > info.file_size:
            raise _Refused(
                f"storage record {name} declares {numel} {dtype} elements ({nbytes} bytes), but its zip "
                f"entry holds only {info.file_size} bytes"
            )
        data = self._read(name, nbytes).view(dtype)
        if dtype == torch.bool and bool(data.view(torch.uint8).gt(1).any()):
            raise _Refused(f"storage record {name} holds bool values other than 0 and 1")
        storage = self._storages[key] = _Storage(name, data)
        return storage

    def _read(self, name: str, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` bytes of entry ``name``, copied into a new uint8 tensor."""
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        filled = 0
        with self._zip.open(self._entries[name]) as handle:
            while filled < nbytes:
                count = handle.readinto(view[filled:])
                if not count:
                    raise _Refused(f"storage record {name} ends after {filled} of its {nbytes} bytes")
                filled += count
        return buffer


def _check_layout(path: Path, archive: zipfile.ZipFile) -> str:
    """The folder prefix of ``data.pkl`` after checking the container; ValueError otherwise.

    The legacy (tar / raw pickle) formats are not produced by the authors' code or ours, and a
    TorchScript archive would be handed to ``torch.jit.load`` by ``torch.load``: refuse both.
    """
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise ValueError(f"{path} is a TorchScript archive, not a checkpoint; it is not loaded")
    pickles = [name for name in names if name == "data.pkl" or (name.endswith("/data.pkl") and name.count("/") == 1)]
    if not pickles:
        raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (it has no data.pkl record)")
    if len(pickles) > 1 or len(set(names)) != len(names):
        what = "several data.pkl records" if len(pickles) > 1 else "two entries of the same name"
        raise ValueError(f"refusing to load {path}: its zip archive holds {what}, which torch.save never writes")
    compressed = [info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise ValueError(
            f"refusing to load {path}: zip entry {_shorten(compressed[0])} is compressed; torch.save stores "
            "every entry uncompressed"
        )
    # Crafted entries could overlap and so be read many times over; bounding their total by the file
    # size bounds everything this reader reads (and allocates for records) by the file size.
    declared, actual = sum(info.file_size for info in infos), path.stat().st_size
    if declared > actual:
        raise ValueError(
            f"refusing to load {path}: its zip entries declare {declared} bytes in all, more than the "
            f"{actual} bytes of the file (truncated or crafted)"
        )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = archive.read(prefix + "byteorder")[:16] if prefix + "byteorder" in names else b"little"
    if byteorder != b"little":
        raise ValueError(
            f"refusing to load {path}: its {prefix}byteorder record says {byteorder!r}; only little-endian "
            "checkpoints are read"
        )
    return prefix


class _Storage:
    """One storage record: its zip entry name and its elements as a flat CPU tensor."""

    __slots__ = ("name", "data")

    def __init__(self, name: str, data: torch.Tensor):
        self.name = name
        self.data = data


class _StorageType:
    """What a ``torch.<Name>Storage`` global stands for in a record's persistent id: its dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# The storage classes torch.save names in persistent ids; any other dtype is refused.
_STORAGE_TYPES = {
    name: _StorageType(dtype)
    for name, dtype in {
        "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
        "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
        "BoolStorage": torch.bool,
    }.items()
}


# --------------------------------------------------------------------------- tensors

_MAX_DIMS = 64
_MAX_INDEX = 2**62  # sizes, strides and offsets stay far inside int64 arithmetic


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and len(value) <= _MAX_DIMS
            and all(type(v) is int and 0 <= v < _MAX_INDEX for v in value)):
        raise _Refused(
            f"a tensor {what} must be a tuple of at most {_MAX_DIMS} non-negative integers below 2**62, "
            f"got {_describe(value)}"
        )
    return tuple(value)


def _tensor_on(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """The tensor of ``size`` whose element ``i`` is ``storage[offset + sum(i_k * stride_k)]``.

    Built only after checking that every element it can address lies inside the record.
    """
    if not isinstance(storage, _Storage):
        raise _Refused(f"a tensor is built on {_describe(storage)} instead of a storage record")
    size, stride = _dims(size, "size"), _dims(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"storage record {storage.name}: a tensor has size {list(size)} but stride {list(stride)}")
    if type(offset) is not int or not 0 <= offset < _MAX_INDEX:
        raise _Refused(f"storage record {storage.name}: tensor offset {_describe(offset)} is not a non-negative "
                       "integer")
    available = storage.data.numel()
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= available:
            raise _Refused(
                f"storage record {storage.name}: a tensor of size {list(size)}, stride {list(stride)} at "
                f"offset {offset} reaches element {last}, but the record holds {available} elements"
            )
        if numel > available:
            # only overlapping strides (e.g. a saved expand()) can do this; a copy would allocate more
            # than the file holds, and no model or optimizer state is saved that way
            raise _Refused(
                f"storage record {storage.name}: a tensor of {numel} elements over a record of {available} "
                "(overlapping strides) is not accepted"
            )
    elif offset > available:
        raise _Refused(f"storage record {storage.name}: tensor offset {offset} is past its {available} elements")
    tensor = torch.empty(0, dtype=storage.data.dtype)
    return tensor.set_(storage.data.untyped_storage(), offset, size, stride)


def _check_grad(tensor: torch.Tensor, requires_grad: Any, backward_hooks: Any) -> None:
    if not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise _Refused("tensors with backward hooks are not accepted")
    if type(requires_grad) is not bool or (requires_grad and not tensor.is_floating_point()):
        raise _Refused(f"requires_grad={_describe(requires_grad)} is not accepted for a {tensor.dtype} tensor")


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """Checked stand-in for ``torch._utils._rebuild_tensor_v2``, what ``Tensor.__reduce_ex__`` names."""
    if not (metadata is None or (type(metadata) is dict and not metadata)):
        raise _Refused("tensor metadata (conjugate or negative bits) is not accepted")
    tensor = _tensor_on(storage, storage_offset, size, stride)
    _check_grad(tensor, requires_grad, backward_hooks)
    tensor.requires_grad = requires_grad
    return tensor


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """Checked stand-in for ``torch._utils._rebuild_tensor`` (older files)."""
    return _tensor_on(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.nn.Parameter:
    """Checked stand-in for ``torch._utils._rebuild_parameter``."""
    if not isinstance(data, torch.Tensor):
        raise _Refused(f"a parameter is built on {_describe(data)} instead of a tensor")
    _check_grad(data, requires_grad, backward_hooks)
    return torch.nn.Parameter(data, requires_grad=requires_grad)


# --------------------------------------------------------------------------- inert records


class PickledRecord:
    """Inert stand-in for an instance of a class we do not import (Namespace, ConfigDict, ...).

    Unpickling calls ``cls.__new__(cls, *args)`` (NEWOBJ), ``cls(*args)`` (REDUCE) and
    ``obj.__setstate__(state)`` (BUILD); each only stores its arguments.  Subclasses are made
    per pickled global and carry its name in ``pickled_global``.
    """

    pickled_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledRecord:
        record = object.__new__(cls)
        record.args = args
        record.kwargs = kwargs
        record.state = None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments were stored by __new__; nothing to run.
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledRecord({self.pickled_global}, args={self.args!r}, state={self.state!r})"


# --------------------------------------------------------------------------- restricted unpickler


class _Refused(pickle.UnpicklingError):
    """The file asks for something this reader does not accept; the message says what."""


class _RefusedGlobal(_Refused):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, qualname: str) -> None:
        super().__init__(f"refused pickled global {qualname!r}")
        self.qualname = qualname


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None), bytes})


def _check_hashable(keys: Any, what: str) -> None:
    """Dictionary keys and set elements: scalars, or flat tuples of at most 64 scalars.

    Anything else is refused before it is hashed: hashing a tuple nested a million deep recurses
    in C until the process crashes, and comparing crafted keys can take exponential time.
    """
    for key in keys:
        if type(key) in _SCALAR_TYPES:
            continue
        if type(key) is tuple and len(key) <= 64 and all(type(k) in _SCALAR_TYPES for k in key):
            continue
        raise _Refused(f"a {what} of type {type(key).__name__} is not accepted (only strings, numbers, "
                       "bytes, None and flat tuples of them)")


def _check_scalars(args: tuple) -> tuple:
    if not all(type(a) in _SCALAR_TYPES for a in args):
        raise _Refused(f"only scalar arguments are accepted here, got {', '.join(type(a).__name__ for a in args)}")
    return args


def _pairs(items: Any = ()) -> list[tuple[Any, Any]]:
    if type(items) in (dict, collections.OrderedDict):
        return list(items.items())  # keys were checked when that dict was built
    if type(items) not in (list, tuple) or not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise _Refused("a dict must be built from a list of (key, value) pairs")
    _check_hashable((p[0] for p in items), "dictionary key")
    return [tuple(p) for p in items]


def _items(items: Any = ()) -> list:
    if type(items) not in (list, tuple, set, frozenset):
        raise _Refused(f"a collection must be built from a list or tuple, got {type(items).__name__}")
    return list(items)


def _hashable_items(items: Any = ()) -> list:
    items = _items(items)
    _check_hashable(items, "set element")
    return items


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as (str, 'latin1')."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with encoding {_describe(encoding)}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise _Refused("bytes(...) with arguments is not accepted (protocol 2 writes only bytes())")
    return b""


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and type(args[0]) is str and (len(args) == 1 or type(args[1]) in (int, type(None)))):
        raise _Refused("torch.device must be built from a device string and an optional index")
    return torch.device(*args)


# Functions and types the pickle may name: value -> what calling it (REDUCE, or INST/OBJ in old
# protocols) does instead. Storage classes and dtypes are looked up apart (they are never called).
_CALLABLE_GLOBALS: dict[tuple[str, str], tuple[Any, Callable]] = {
    ("torch._utils", "_rebuild_tensor"): (torch._utils._rebuild_tensor, _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): (torch._utils._rebuild_tensor_v2, _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): (torch._utils._rebuild_parameter, _rebuild_parameter),
    ("torch", "Size"): (torch.Size, lambda dims=(): torch.Size(_dims(tuple(_items(dims)), "size"))),
    ("torch", "device"): (torch.device, _device),
    ("collections", "OrderedDict"): (collections.OrderedDict, lambda items=(): collections.OrderedDict(_pairs(items))),
    ("_codecs", "encode"): (_latin1_bytes, _latin1_bytes),
    ("builtins", "set"): (set, lambda items=(): set(_hashable_items(items))),
    ("builtins", "frozenset"): (frozenset, lambda items=(): frozenset(_hashable_items(items))),
    ("builtins", "list"): (list, lambda items=(): list(_items(items))),
    ("builtins", "tuple"): (tuple, lambda items=(): tuple(_items(items))),
    ("builtins", "dict"): (dict, lambda items=(): dict(_pairs(items))),
    ("builtins", "bytes"): (bytes, _empty_bytes),
    # types a config stores as values (ml_collections' FieldReference keeps its field type);
    # called, they take scalars only (str() of a crafted shared structure would take forever)
    **{("builtins", t.__name__): (t, lambda *args, t=t: t(*_check_scalars(args)))
       for t in (int, float, str, bool, complex, slice)},
}
_CALL_BY_ID = {id(value): call for value, call in _CALLABLE_GLOBALS.values()}
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}

# Classes whose instances are config records: replaced by PickledRecord subclasses.
_RECORD_MODULES = ("ml_collections",)
_RECORD_GLOBALS = {("argparse", "Namespace")}


def _call(func: Any, args: Any) -> Any:
    if type(args) is not tuple:
        raise _Refused(f"call arguments must be a tuple, got {type(args).__name__}")
    if isinstance(func, type) and issubclass(func, PickledRecord):
        return func(*args)
    call = _CALL_BY_ID.get(id(func))
    if call is None:
        raise _Refused(f"calling {_describe(func)} is not accepted")
    return call(*args)


class _RestrictedUnpickler(pickle._Unpickler):
    """The stdlib's pure-Python unpickler with every opcode that calls, builds or fills an object
    restricted to the allow-listed types; ``find_class`` resolves only allow-listed names.

    The C unpickler cannot be used: it lets a subclass override only ``find_class`` and
    ``persistent_load``, not how it fills dicts and sets or calls ``__setstate__``.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, archive: _TorchArchive) -> None:
        super().__init__(io.BytesIO(archive.data_pickle()), encoding="utf-8")
        self._archive = archive
        self._records: dict[tuple[str, str], type[PickledRecord]] = {}

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ("storage", <storage class>, key, location, numel) for each record
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise _Refused(f"persistent id {_describe(pid)} is not a torch storage reference")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"storage type {_describe(storage_type)} is not accepted; accepted: {', '.join(_STORAGE_TYPES)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise _Refused(f"storage reference ({_describe(key)}, {_describe(location)}, {_describe(numel)}) "
                           "is not (key, device, element count)")
        return self._archive.storage(key, storage_type.dtype, numel)

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class skips the stdlib's Python-2 name mapping ("__builtin__.set"
        # in protocol-2 pickles, which torch.save writes), so apply it here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)

        if (module, name) in _CALLABLE_GLOBALS:
            return _CALLABLE_GLOBALS[(module, name)][0]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]  # dtypes pickle as globals, e.g. torch.float16
        if module.split(".")[0] == "torch" and name.endswith("Storage"):
            raise _Refused(f"storage type {_shorten(f'{module}.{name}', 120)} is not accepted; accepted: "
                           f"{', '.join(_STORAGE_TYPES)}")
        if (module, name) in _RECORD_GLOBALS or module.split(".")[0] in _RECORD_MODULES:
            return self._record_class(module, name)
        raise _RefusedGlobal(_shorten(f"{module}.{name}", 120))

    def _record_class(self, module: str, name: str) -> type[PickledRecord]:
        key = (module, name)
        if key not in self._records:
            self._records[key] = type(name, (PickledRecord,), {"pickled_global": f"{module}.{name}"})
        return self._records[key]

    # -- opcodes that call a global (REDUCE; INST and OBJ of protocols 0/1) or construct one (NEWOBJ)
    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(_call(klass, tuple(args)))

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_record(cls, args, {}))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_record(cls, args, kwargs))

    # -- opcodes that fill an object: only lists, dicts and sets, with checked keys
    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, PickledRecord):
            target.__setstate__(state)
        elif type(target) is collections.OrderedDict and type(state) is dict and all(type(k) is str for k in state):
            target.__dict__.update(state)  # a state dict's `_metadata`
        else:
            raise _Refused(f"setting the state of {_describe(target)} is not accepted")

    def _load_append(self) -> None:
        value = self.stack.pop()
        _target(self.stack, list).append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        _target(self.stack, list).extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _check_hashable((key,), "dictionary key")
        _target(self.stack, dict, collections.OrderedDict)[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        _check_hashable(items[0::2], "dictionary key")
        target = _target(self.stack, dict, collections.OrderedDict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        _check_hashable(items[0::2], "dictionary key")
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _load_additems(self) -> None:
        items = self.pop_mark()
        _check_hashable(items, "set element")
        _target(self.stack, set).update(items)

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        _check_hashable(items, "set element")
        self.append(frozenset(items))

    def _load_bytearray8(self) -> None:
        # the stdlib allocates the declared length before reading; torch.save (protocol 2) never writes it
        raise _Refused("protocol-5 bytearrays are not accepted")

    for _opcode, _method in (
        (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.BUILD, _load_build), (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends),
        (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems), (pickle.DICT, _load_dict),
        (pickle.ADDITEMS, _load_additems), (pickle.FROZENSET, _load_frozenset),
        (pickle.BYTEARRAY8, _load_bytearray8),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _new_record(cls: Any, args: Any, kwargs: Any) -> PickledRecord:
    if not (isinstance(cls, type) and issubclass(cls, PickledRecord)):
        raise _Refused(f"constructing {_describe(cls)} is not accepted")
    if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise _Refused("constructor arguments must be a tuple and a dict with string keys")
    return cls.__new__(cls, *args, **kwargs)


def _target(stack: list, *types: type) -> Any:
    target = stack[-1]
    if type(target) not in types:
        raise _Refused(f"adding items to {_describe(target)} is not accepted")
    return target


# --------------------------------------------------------------------------- structure checks

_END = object()


def _children(obj: Any) -> Iterator[Any] | None:
    """What a container refers to, or None for a leaf (scalar, tensor, dtype, type, ...)."""
    if isinstance(obj, dict):
        attributes = obj.__dict__.values() if type(obj) is collections.OrderedDict else ()
        return itertools.chain(obj.keys(), obj.values(), attributes)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    if isinstance(obj, PickledRecord):
        return iter((obj.args, obj.kwargs, obj.state))
    if isinstance(obj, (_Storage, _StorageType)):
        raise _Refused("a storage record outside a tensor is not accepted")
    return None


def _check_structure(root: Any) -> None:
    """Refuse reference cycles, nesting deeper than MAX_NESTING, and more than MAX_OBJECTS objects
    counted once per path (a part referenced twice counts twice: that is what a recursive reader
    visits). One pass, iterative, each container visited once."""
    finished: dict[int, tuple[int, int]] = {}  # id -> (height, objects per path)
    on_path: set[int] = set()
    children = _children(root)
    if children is None:
        return
    stack = [[root, children, 0, 1]]  # container, children left, height below it, objects per path
    on_path.add(id(root))
    while stack:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(frame[0]))
            finished[id(frame[0])] = (frame[2] + 1, frame[3])
            if stack:
                _add_below(stack[-1], frame[2] + 1, frame[3])
            continue
        if id(child) in finished:
            _add_below(frame, *finished[id(child)])
            continue
        grandchildren = _children(child)
        if grandchildren is None:
            _add_below(frame, 0, 1)
        elif id(child) in on_path:
            raise _Refused("the pickled data refers to itself (a reference cycle); checkpoints hold "
                           "trees of tensors and plain values")
        elif len(stack) >= MAX_NESTING:
            raise _Refused(f"the pickled data is nested more than {MAX_NESTING} levels deep")
        else:
            on_path.add(id(child))
            stack.append([child, grandchildren, 0, 1])
    if finished[id(root)][0] > MAX_NESTING:
        raise _Refused(f"the pickled data is nested more than {MAX_NESTING} levels deep")


def _add_below(frame: list, height: int, objects: int) -> None:
    frame[2] = max(frame[2], height)
    frame[3] += objects
    if frame[3] > MAX_OBJECTS:
        raise _Refused(f"the pickled data unfolds into more than {MAX_OBJECTS} objects "
                       "(a shared part counted once per reference)")


# --------------------------------------------------------------------------- messages


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """A short name for a value from an untrusted file (never its full repr)."""
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None) or "?"
        return _shorten(f"{module}.{getattr(value, '__qualname__', type(value).__name__)}", 120)
    if type(value) in _SCALAR_TYPES:
        return _shorten(repr(value), 80)
    return f"a {type(value).__name__}"
