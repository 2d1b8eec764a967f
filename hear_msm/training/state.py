"""A run's saved state: checkpoint.pt written atomically and read as untrusted input, RNG states, restore."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from .config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"

_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "config", "rng")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one step on one rank."""
    # SeedSequence, not hash(): Python's string hashing differs between processes
    return int(np.random.SeedSequence((seed, step, rank, stream)).generate_state(1, np.uint64)[0] >> 1)


def mask_generator(seed: int, step: int, rank: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(step_seed(seed, step, rank, 0x3A5C))
    return generator


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save through `atomic_write`: a failed save leaves the previous checkpoint as it was."""
    with atomic_write(path) as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    from .._torch_file import load_torch_file

    # untrusted like any .pth: no pickle code runs and every tensor record is checked against its
    # zip entry before a tensor is built on it (torch.load trusts the sizes a file declares)
    return load_torch_file(path)


def read_run_checkpoint(path: Path) -> dict:
    """`load_checkpoint`, with errors a user can act on, and a check that it is a checkpoint of this trainer."""
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint to resume from: {path} (a run that stopped before its first "
                                "checkpoint starts again without --resume)") from None
    except Exception as error:  # noqa: BLE001 - any reader failure means the same to the user
        # torch's own messages suggest weights_only=False, which would run the file's pickle code: never pass that on
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = type(error).__name__ if not detail or "weights_only" in str(error) else detail
        raise ValueError(f"{path} is not a readable hear-msm pretrain checkpoint ({detail}); it is damaged or was "
                         "written by another program. Restore it from a copy, or start a new run in another --out"
                         ) from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: it has no {', '.join(missing)}")
    if not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["config"], dict):
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: its step or config is invalid")
    if not all(isinstance(state.get(key, 0.0), (int, float)) for key in ("loss", "elapsed_s")):
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: loss or elapsed_s is not a number")
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the training config saved in it is invalid: {error}") from None
    return state


def restore(state: dict, path: Path, model, decoder, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint's states; ValueError if its tensors do not fit the run's model."""
    try:
        model.load_state_dict(state["model"])
        if decoder is not None:
            decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run used no GradScaler (any precision but fp16)
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot restore the run from it ({first})") from None


def non_finite(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of parameters, buffers or optimizer moments holding NaN or Inf."""
    bad = [name for module in modules for name, value in module.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    for index, moments in enumerate(optimizer.state.values()):
        bad += [f"optimizer state {index}.{key}" for key, value in moments.items()
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    return bad
