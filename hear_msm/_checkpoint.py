"""Read the authors' original ``.pth`` checkpoints without running pickled code.

The official training script saves, once per epoch, ``<run>/checkpoints/checkpoint-<epoch>.pth``::

    torch.save({"model": state_dict, "optimizer": ..., "epoch": int, "scaler": ...,
                "args": argparse.Namespace(config=ml_collections.ConfigDict(...), ...)}, path)

``torch.load(weights_only=True)`` refuses such a file (it holds a ``Namespace`` and a
``ConfigDict``), and ``weights_only=False`` would import ``ml_collections`` and execute whatever
the pickle asks for.  This module loads it through a restricted unpickler instead:

* tensors are rebuilt through an explicit allow-list of torch functions;
* ``argparse.Namespace`` and every ``ml_collections.*`` class become inert :class:`PickledRecord`
  stand-ins that only store the state they are given, so the config can still be read
  (``config.model.arch``) without ``ml_collections`` installed;
* any other global (``posix.system``, ``builtins.eval``, ``builtins.getattr``, ...) is refused
  before it is looked up, and the load fails with a :class:`ValueError`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["OfficialCheckpoint", "PickledRecord", "find_official_checkpoint", "read_official_checkpoint"]

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pth$")


@dataclass
class OfficialCheckpoint:
    """What we keep of an official checkpoint.

    Attributes:
        state_dict: parameter and buffer tensors by the authors' key names (e.g.
            ``"patch_embed.proj.weight"`` of shape ``[D, 1, 4, 16]``), on CPU, dtypes as saved.
        epoch: the training epoch stored in the file (0-based as the authors count), if any.
        arch: the authors' ``config.model.arch`` (e.g. ``"mamba_ssast_tiny"``,
            ``"xlstm_ssast_base"``, ``"ssast_small"``) when the file carries a config.
        path: the file that was read.
        config: the authors' config as plain nested dicts/lists (``ConfigDict`` fields and
            ``FieldReference`` values unwrapped), or ``None`` when the file has none.
    """

    state_dict: dict[str, torch.Tensor]
    epoch: int | None
    arch: str | None
    path: Path
    config: dict[str, Any] | None = field(default=None, repr=False)


def find_official_checkpoint(path: str | Path) -> Path:
    """Resolve ``path`` to one checkpoint file.

    Args:
        path: a checkpoint file; a run folder holding ``checkpoints/checkpoint-<epoch>.pth``;
            or that ``checkpoints/`` folder itself.

    Returns:
        The file itself, or the ``checkpoint-<epoch>.pth`` with the largest epoch compared as an
        integer (``checkpoint-10`` is newer than ``checkpoint-9``).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without ``checkpoint-<epoch>.pth``.
    """
    path = Path(path).expanduser()
    accepted = (
        "pass a .pth file, a run folder containing checkpoints/checkpoint-<epoch>.pth, "
        "or that checkpoints/ folder"
    )
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist; {accepted}")
    if path.is_file():
        return path

    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    by_epoch: dict[int, Path] = {}
    for candidate in folder.iterdir():
        match = _CHECKPOINT_NAME.match(candidate.name)
        if match and candidate.is_file():
            by_epoch[int(match.group(1))] = candidate
    if by_epoch:
        # Integer order: "checkpoint-9" < "checkpoint-10", which string order gets wrong.
        return by_epoch[max(by_epoch)]

    others = sorted(p.name for p in folder.glob("*.pth"))
    hint = f" It holds other .pth files ({', '.join(others)}): pass one of them directly." if others else ""
    raise FileNotFoundError(
        f"no checkpoint found in {path}: looked for files named checkpoint-<epoch>.pth in {folder}.{hint} "
        f"({accepted})"
    )


def read_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Load the model weights, epoch and architecture name of an official checkpoint.

    Nothing in the file is executed: see the module docstring for what the unpickler accepts.

    Args:
        path: anything :func:`find_official_checkpoint` accepts.  The file may be a full
            training checkpoint (``{"model": ..., "epoch": ..., "args": ...}``), a
            ``{"model": state_dict}`` dict, or a bare state dict.

    Returns:
        An :class:`OfficialCheckpoint` with CPU tensors.

    Raises:
        FileNotFoundError: see :func:`find_official_checkpoint`.
        ValueError: the file is not a torch checkpoint, holds no state dict, or contains a
            pickled reference to anything other than tensors and config records.
    """
    path = find_official_checkpoint(path)
    _check_torch_zip(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except _RefusedGlobal as err:
        raise ValueError(
            f"refusing to load {path}: it contains pickled code object {err.qualname!r}; only tensors "
            "and config records are accepted from official checkpoints, and this file may run code "
            "if opened with plain torch.load. Do not load it unless you know where it came from."
        ) from None
    except RuntimeError as err:
        if "pickle_module" in str(err):
            # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch reject any custom pickle module.
            raise ValueError(
                f"cannot read {path}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which forbids the restricted "
                "unpickler this reader uses; unset it for this call"
            ) from err
        raise ValueError(f"cannot read {path} as a torch checkpoint: {err}") from err
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {err})") from err

    state_dict = _find_state_dict(payload, path)
    epoch = payload.get("epoch") if isinstance(payload, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        epoch = None
    config = _read_config(payload)
    arch = None
    if config is not None and isinstance(config.get("model"), dict):
        arch = config["model"].get("arch") if isinstance(config["model"].get("arch"), str) else None
    return OfficialCheckpoint(state_dict=state_dict, epoch=epoch, arch=arch, path=path, config=config)


# --------------------------------------------------------------------------- file format checks


def _check_torch_zip(path: Path) -> None:
    """Accept only the zip format ``torch.save`` writes since PyTorch 1.6.

    The legacy (tar / raw pickle) formats are not produced by the authors' code, and a
    TorchScript archive would be handed to ``torch.jit.load`` by ``torch.load``: refuse both.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch checkpoint: expected the zip format written by torch.save "
            "(PyTorch >= 1.6)"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (it has no data.pkl record)")
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise ValueError(f"{path} is a TorchScript archive, not a checkpoint; it is not loaded")


def _find_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """Pick the model state dict out of the loaded object and check it holds only tensors."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        candidate = payload["model"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        candidate = payload
    else:
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} holds no model state dict: expected a dict of tensors or a dict with a 'model' "
            f"entry, found {keys}"
        )
    bad = [str(k) for k, v in candidate.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"{path}: the model state dict has non-tensor entries {bad[:5]}")
    # A plain dict: drops the OrderedDict `_metadata` attribute, keeps the saved key order.
    return dict(candidate)


def _read_config(payload: Any) -> dict[str, Any] | None:
    """The authors' ``args.config`` as nested plain dicts, or ``None`` if the file has none."""
    if not isinstance(payload, dict) or "args" not in payload:
        return None
    args = _to_plain(payload["args"])
    config = args.get("config") if isinstance(args, dict) else None
    return config if isinstance(config, dict) else None


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


def _to_plain(obj: Any, _memo: dict[int, Any] | None = None) -> Any:
    """Turn records into plain Python data: dicts, lists, tuples, scalars, tensors.

    ``ConfigDict`` records become the dict of their ``_fields``; ``FrozenConfigDict`` records
    their ``_configdict``; ``FieldReference`` records their ``_value``; ``Namespace`` records
    their attribute dict.  Shared or cyclic references are visited once.
    """
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, PickledRecord):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            # (__dict__, __slots__ values) as pickled for classes with slots.
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            if "_fields" in state:
                state = state["_fields"]
            elif "_configdict" in state:
                return _to_plain(state["_configdict"], memo)
            elif "_value" in state and obj.pickled_global.endswith("FieldReference"):
                return _to_plain(state["_value"], memo)
            return _to_plain(state, memo)
        return {"__pickled_global__": obj.pickled_global, "args": _to_plain(obj.args, memo)}
    if isinstance(obj, dict):
        result: dict[Any, Any] = {}
        memo[id(obj)] = result
        result.update((key, _to_plain(value, memo)) for key, value in obj.items())
        return result
    if isinstance(obj, list):
        items: list[Any] = []
        memo[id(obj)] = items
        items.extend(_to_plain(value, memo) for value in obj)
        return items
    if isinstance(obj, tuple):
        return tuple(_to_plain(value, memo) for value in obj)
    return obj


# --------------------------------------------------------------------------- restricted unpickler


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, qualname: str) -> None:
        super().__init__(f"refused pickled global {qualname!r}")
        self.qualname = qualname


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as (str, 'latin1')."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Functions and types that only build data.  Storage classes ("FloatStorage", ...) never reach
# this table: torch's own wrapper around our Unpickler resolves them first.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
    **{
        ("builtins", t.__name__): t
        for t in (set, frozenset, slice, complex, bytes, int, float, str, bool, tuple, list, dict)
    },
}

# Classes whose instances are config records: replaced by PickledRecord subclasses.
_RECORD_MODULES = ("ml_collections",)
_RECORD_GLOBALS = {("argparse", "Namespace")}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only allow-listed names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records: dict[tuple[str, str], type[PickledRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class skips the stdlib's Python-2 name mapping ("__builtin__.set"
        # in protocol-2 pickles, which torch.save writes), so apply it here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)

        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _RECORD_GLOBALS or module.split(".")[0] in _RECORD_MODULES:
            return self._record_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes pickle as globals, e.g. torch.float16
        raise _RefusedGlobal(f"{module}.{name}")

    def _record_class(self, module: str, name: str) -> type[PickledRecord]:
        key = (module, name)
        if key not in self._records:
            self._records[key] = type(name, (PickledRecord,), {"pickled_global": f"{module}.{name}"})
        return self._records[key]


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``: only ``Unpickler`` and ``load`` are used."""

    __name__ = "hear_msm._checkpoint.restricted_pickle"
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


_restricted_pickle = _RestrictedPickleModule()
