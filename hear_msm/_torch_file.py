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
* ``data.pkl`` runs through a restricted pure-Python unpickler (:mod:`hear_msm._restricted_pickle`,
  extended here with torch's globals): globals come from an allow-list
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

import math
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._restricted_pickle import (BUILTIN_GLOBALS, MAX_NESTING, MAX_OBJECTS, PickledRecord, Refused, RefusedGlobal,
                                 RestrictedUnpickler, check_structure, collection_items, describe, shorten)

__all__ = ["MAX_NESTING", "MAX_OBJECTS", "MAX_PICKLE_BYTES", "PickledRecord", "load_torch_file"]

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
        payload = _TorchUnpickler(archive).load()
        check_structure(payload, forbidden=(_Storage, _StorageType),
                        why="a storage record outside a tensor is not accepted")
    except RefusedGlobal as err:
        raise ValueError(
            f"refusing to load {path}: it contains pickled code object {err.qualname!r}; only tensors "
            "and config records are accepted from checkpoints, and this file may run code if opened "
            "with plain torch.load. Do not load it unless you know where it came from."
        ) from None
    except Refused as err:
        raise ValueError(f"refusing to load {path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - see below
        # A damaged data.pkl fails wherever the stdlib unpickler first trips over it (EOFError,
        # struct.error, a KeyError for a memo index, UnicodeDecodeError, a TypeError for a call
        # with the wrong arguments, ...). Each means "not a readable checkpoint", and none may
        # escape as an exception type a caller does not expect from a loader.
        raise ValueError(
            f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {shorten(str(err))})"
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
            raise ValueError(f"{not_torch} ({type(err).__name__}: {shorten(str(err))})") from None
        try:
            prefix = _check_layout(path, archive)
        except ValueError:
            archive.close()
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a bad CRC in the byteorder record
            archive.close()
            raise ValueError(f"{not_torch} ({type(err).__name__}: {shorten(str(err))})") from None
        return cls(path, archive, prefix)

    def close(self) -> None:
        self._zip.close()

    def data_pickle(self) -> bytes:
        info = self._entries[self._prefix + "data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise Refused(f"record {info.filename} is {info.file_size} bytes; at most {MAX_PICKLE_BYTES} are read "
                          "(tensors are stored apart from it, so real checkpoints stay far below)")
        return self._zip.read(info)

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        """Record ``data/<key>`` as ``numel`` elements of ``dtype``, checked against its zip entry."""
        name = f"{self._prefix}data/{key}"
        known = self._storages.get(key)
        if known is not None:
            if (known.data.dtype, known.data.numel()) != (dtype, numel):
                raise Refused(
                    f"storage record {shorten(name)} is declared twice, as {known.data.numel()} x "
                    f"{known.data.dtype} and as {numel} x {dtype}"
                )
            return known
        info = self._entries.get(name)
        if info is None:
            raise Refused(f"storage record {shorten(name)} is missing from the archive")
        nbytes = numel * dtype.itemsize
        if nbytes > info.file_size:
            raise Refused(
                f"storage record {name} declares {numel} {dtype} elements ({nbytes} bytes), but its zip "
                f"entry holds only {info.file_size} bytes"
            )
        data = self._read(name, nbytes).view(dtype)
        if dtype == torch.bool and bool(data.view(torch.uint8).gt(1).any()):
            raise Refused(f"storage record {name} holds bool values other than 0 and 1")
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
                    raise Refused(f"storage record {name} ends after {filled} of its {nbytes} bytes")
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
            f"refusing to load {path}: zip entry {shorten(compressed[0])} is compressed; torch.save stores "
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
        raise Refused(
            f"a tensor {what} must be a tuple of at most {_MAX_DIMS} non-negative integers below 2**62, "
            f"got {describe(value)}"
        )
    return tuple(value)


def _tensor_on(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """The tensor of ``size`` whose element ``i`` is ``storage[offset + sum(i_k * stride_k)]``.

    Built only after checking that every element it can address lies inside the record.
    """
    if not isinstance(storage, _Storage):
        raise Refused(f"a tensor is built on {describe(storage)} instead of a storage record")
    size, stride = _dims(size, "size"), _dims(stride, "stride")
    if len(size) != len(stride):
        raise Refused(f"storage record {storage.name}: a tensor has size {list(size)} but stride {list(stride)}")
    if type(offset) is not int or not 0 <= offset < _MAX_INDEX:
        raise Refused(f"storage record {storage.name}: tensor offset {describe(offset)} is not a non-negative "
                      "integer")
    available = storage.data.numel()
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= available:
            raise Refused(
                f"storage record {storage.name}: a tensor of size {list(size)}, stride {list(stride)} at "
                f"offset {offset} reaches element {last}, but the record holds {available} elements"
            )
        if numel > available:
            # only overlapping strides (e.g. a saved expand()) can do this; a copy would allocate more
            # than the file holds, and no model or optimizer state is saved that way
            raise Refused(
                f"storage record {storage.name}: a tensor of {numel} elements over a record of {available} "
                "(overlapping strides) is not accepted"
            )
    elif offset > available:
        raise Refused(f"storage record {storage.name}: tensor offset {offset} is past its {available} elements")
    tensor = torch.empty(0, dtype=storage.data.dtype)
    return tensor.set_(storage.data.untyped_storage(), offset, size, stride)


def _check_grad(tensor: torch.Tensor, requires_grad: Any, backward_hooks: Any) -> None:
    if not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise Refused("tensors with backward hooks are not accepted")
    if type(requires_grad) is not bool or (requires_grad and not tensor.is_floating_point()):
        raise Refused(f"requires_grad={describe(requires_grad)} is not accepted for a {tensor.dtype} tensor")


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """Checked stand-in for ``torch._utils._rebuild_tensor_v2``, what ``Tensor.__reduce_ex__`` names."""
    if not (metadata is None or (type(metadata) is dict and not metadata)):
        raise Refused("tensor metadata (conjugate or negative bits) is not accepted")
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
        raise Refused(f"a parameter is built on {describe(data)} instead of a tensor")
    _check_grad(data, requires_grad, backward_hooks)
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and type(args[0]) is str and (len(args) == 1 or type(args[1]) in (int, type(None)))):
        raise Refused("torch.device must be built from a device string and an optional index")
    return torch.device(*args)


class _TorchUnpickler(RestrictedUnpickler):
    """The restricted unpickler with what ``torch.save`` pickles besides builtins: the tensor
    rebuilders (checked stand-ins), ``torch.Size``, ``torch.device``, dtypes, storage types, and
    storage references resolved against the archive's records."""

    callable_globals = {
        **BUILTIN_GLOBALS,
        ("torch._utils", "_rebuild_tensor"): (torch._utils._rebuild_tensor, _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): (torch._utils._rebuild_tensor_v2, _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): (torch._utils._rebuild_parameter, _rebuild_parameter),
        ("torch", "Size"): (torch.Size, lambda dims=(): torch.Size(_dims(tuple(collection_items(dims)), "size"))),
        ("torch", "device"): (torch.device, _device),
    }

    def __init__(self, archive: _TorchArchive) -> None:
        super().__init__(archive.data_pickle())
        self._archive = archive

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ("storage", <storage class>, key, location, numel) for each record
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise Refused(f"persistent id {describe(pid)} is not a torch storage reference")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise Refused(f"storage type {describe(storage_type)} is not accepted; accepted: {', '.join(_STORAGE_TYPES)}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise Refused(f"storage reference ({describe(key)}, {describe(location)}, {describe(numel)}) "
                          "is not (key, device, element count)")
        return self._archive.storage(key, storage_type.dtype, numel)

    def find_value(self, module: str, name: str) -> Any:
        # storage classes and dtypes are looked up apart from the callables: they are never called
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]  # dtypes pickle as globals, e.g. torch.float16
        if module.split(".")[0] == "torch" and name.endswith("Storage"):
            raise Refused(f"storage type {shorten(f'{module}.{name}', 120)} is not accepted; accepted: "
                          f"{', '.join(_STORAGE_TYPES)}")
        return None


_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
