"""The authors' official PyTorch runs: find a run folder's newest ``checkpoint-<epoch>.pth`` and
take its model state dict, epoch and config.

The file is read by :func:`hear_msm._torch_file.load_torch_file`, as untrusted input: no pickled
code runs and every record is checked (that module's docstring lists what is accepted). Config
records (``argparse.Namespace``, ``ml_collections``) arrive as inert
:class:`~hear_msm._torch_file.PickledRecord` stand-ins and are turned into plain dicts here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._torch_file import PickledRecord, load_torch_file

__all__ = ["OfficialCheckpoint", "find_official_checkpoint", "read_official_checkpoint"]

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

    Nothing in the file is executed and nothing outside its records is read: see
    :mod:`hear_msm._torch_file` for what is accepted.

    Args:
        path: anything :func:`find_official_checkpoint` accepts.  The file may be a full
            training checkpoint (``{"model": ..., "epoch": ..., "args": ...}``), a
            ``{"model": state_dict}`` dict, or a bare state dict (e.g. the ``OrderedDict`` of a
            ``DataParallel`` model, keys prefixed ``module.``).

    Returns:
        An :class:`OfficialCheckpoint` with CPU tensors.

    Raises:
        FileNotFoundError: see :func:`find_official_checkpoint`.
        ValueError: see :func:`load_torch_file`; or the file holds no state dict.
    """
    path = find_official_checkpoint(path)
    payload = load_torch_file(path)
    state_dict = _find_state_dict(payload, path)
    epoch = payload.get("epoch") if isinstance(payload, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        epoch = None
    config = _read_config(payload)
    arch = None
    if config is not None and isinstance(config.get("model"), dict):
        arch = config["model"].get("arch") if isinstance(config["model"].get("arch"), str) else None
    return OfficialCheckpoint(state_dict=state_dict, epoch=epoch, arch=arch, path=path, config=config)



def _find_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """Pick the model state dict out of the loaded object and check it holds only tensors."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        candidate = payload["model"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        candidate = payload
    else:
        keys = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
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
    args = _to_plain(payload["args"], {})
    config = args.get("config") if isinstance(args, dict) else None
    return config if isinstance(config, dict) else None


def _to_plain(obj: Any, memo: dict[int, Any]) -> Any:
    """Turn records into plain Python data: dicts, lists, tuples, scalars, tensors.

    ``ConfigDict`` records become the dict of their ``_fields``; ``FrozenConfigDict`` records
    their ``_configdict``; ``FieldReference`` records their ``_value``; ``Namespace`` records
    their attribute dict. The input passed :func:`hear_msm._restricted_pickle.check_structure` (no
    cycles, bounded depth); ``memo`` (by ``id``) converts a shared part once.
    """
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, PickledRecord):
        result = _record_to_plain(obj, memo)
    elif isinstance(obj, dict):
        result = {key: _to_plain(value, memo) for key, value in obj.items()}
    elif isinstance(obj, list):
        result = [_to_plain(value, memo) for value in obj]
    elif type(obj) is tuple:
        result = tuple(_to_plain(value, memo) for value in obj)
    else:
        return obj
    memo[id(obj)] = result
    return result


def _record_to_plain(record: PickledRecord, memo: dict[int, Any]) -> Any:
    state = record.state
    if type(state) is tuple and len(state) == 2 and all(s is None or type(s) is dict for s in state):
        state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ values)
    if not isinstance(state, dict):
        return {"__pickled_global__": record.pickled_global, "args": _to_plain(record.args, memo)}
    if "_fields" in state:
        return _to_plain(state["_fields"], memo)
    if "_configdict" in state:
        return _to_plain(state["_configdict"], memo)
    if "_value" in state and record.pickled_global.endswith("FieldReference"):
        return _to_plain(state["_value"], memo)
    return {key: _to_plain(value, memo) for key, value in state.items()}
