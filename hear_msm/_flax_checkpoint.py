"""Read the authors' Flax checkpoints (MW-MAE / MAE) with msgpack and numpy only.

No JAX, Flax, TensorFlow or pickle is imported: the file is untrusted data, decoded as msgpack
with Flax's extension types and nothing else.

Their trainer saves the whole train state with `flax.training.checkpoints`, one step per file:

    RUN/checkpoint_<step>               legacy msgpack file (Orbax switched off, as in their main.py)
    RUN/checkpoint_<step>/checkpoint    Orbax 0.3 directory: the same tree in one msgpack file
                                        (empty dicts stored as nil, tuples as lists or ext 4)

The file is one msgpack map {step, batch_stats, buffers, dynamic_scale, params, frozen_params,
aux_rng_keys, opt_state}. For MW-MAE-B it is about 1.1 GB, two thirds of it Adam's two moment
trees. The reader walks the top-level map as a stream and decodes only `step`, `params` and
`frozen_params`; every other value is skipped without being built, so memory holds the
parameters (about 370 MB for base) plus the largest single array of the file, never the
optimizer state. It still reads to the last byte, so a truncated download is an error.

Flax extension types: 1 ndarray and 3 numpy scalar (payload: msgpack [shape, dtype name, raw
C-order bytes]), 2 complex ([real, imag]), 4 tuple (Orbax: a msgpack list). Arrays above 1 GiB
are stored by Flax as {"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}. bfloat16
arrays (the authors' `mask_token` and `cls_token`) are widened to float32 exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

__all__ = ["FlaxCheckpoint", "find_flax_checkpoint", "is_flax_checkpoint", "read_flax_checkpoint",
           "flax_encoder_state", "flax_decoder_state", "decode_flax_msgpack"]

_STEP_NAME = re.compile(r"^checkpoint_(\d+)$")
ORBAX_FILE = "checkpoint"
ACCEPTED = ("pass a Flax run folder holding checkpoint_<step> files or directories, one "
            "checkpoint_<step> file (legacy msgpack), or one checkpoint_<step>/ Orbax directory")
# little-endian dtypes Flax writes for parameters, buffers, RNG keys and counters
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128")}
_READ_BYTES = 1 << 20
# one msgpack object (an array payload) may not exceed this; base's largest array is 9.4 MB
_MAX_OBJECT_BYTES = 1 << 31


@dataclass
class FlaxCheckpoint:
    """The parameters of one Flax train-state checkpoint.

    params: {"encoder_block_00/Attention_0/Dense_0/kernel": array, ...} ('/'-joined Flax paths,
        `frozen_params` merged in as their code does); floating arrays are float32 or float64.
    dtypes: the dtype each parameter had on disk ("float32", "bfloat16", ...).
    step: the training step stored in the file (None if absent).
    path: the msgpack file that was read.
    """

    params: dict[str, np.ndarray]
    dtypes: dict[str, str]
    step: int | None
    path: Path
    top_level_keys: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ finding
def _orbax_file(directory: Path) -> Path | None:
    candidate = directory / ORBAX_FILE
    return candidate if candidate.is_file() else None


def find_flax_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder, `checkpoint_<step>` file or Orbax directory to the msgpack file to read.

    A run folder resolves to its newest step (compared as integers). Temporary files that Flax
    or Orbax leave while writing (other names) are ignored.
    Raises FileNotFoundError (nothing there / no checkpoint in the folder) or ValueError (a file
    that is not named like a Flax checkpoint).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no Flax checkpoint at {path}: the path does not exist; {ACCEPTED}")
    if path.is_file():
        if _STEP_NAME.match(path.name) or (path.name == ORBAX_FILE and _STEP_NAME.match(path.parent.name)):
            return path
        raise ValueError(f"{path} is not named like a Flax checkpoint (checkpoint_<step>); {ACCEPTED}")
    if _STEP_NAME.match(path.name):
        found = _orbax_file(path)
        if found is None:
            raise FileNotFoundError(f"{path} has no '{ORBAX_FILE}' file, so it is not an Orbax checkpoint; {ACCEPTED}")
        return found
    steps = []
    for child in path.iterdir():
        match = _STEP_NAME.match(child.name)
        if match is None:
            continue
        target = child if child.is_file() else _orbax_file(child)
        if target is not None:
            steps.append((int(match.group(1)), target))
    if not steps:
        raise FileNotFoundError(f"{path} holds no checkpoint_<step> file or Orbax directory; {ACCEPTED}")
    return max(steps)[1]


def is_flax_checkpoint(path: str | Path) -> bool:
    """True when `path` resolves to a Flax checkpoint (by name; the content is checked on reading)."""
    try:
        find_flax_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------ decoding
def _decode_array(payload: bytes) -> np.ndarray:
    try:
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    except (ValueError, msgpack.UnpackException) as error:
        raise ValueError(f"malformed ndarray record: {error}") from None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"malformed ndarray record: shape {shape!r}")
    if not isinstance(dtype_name, bytes) or not isinstance(buffer, bytes):
        raise ValueError("malformed ndarray record: dtype name and data must be bytes")
    name = dtype_name.decode("ascii", "replace")
    if name == "bfloat16":
        dtype = np.dtype("<u2")
    elif name in _DTYPES:
        dtype = _DTYPES[name]
    else:
        raise ValueError(f"unsupported array dtype {name!r} (accepted: bfloat16, {', '.join(_DTYPES)})")
    count = int(np.prod(shape, dtype=np.int64))
    if len(buffer) != count * dtype.itemsize:
        raise ValueError(f"ndarray record of shape {tuple(shape)} {name} holds {len(buffer)} bytes, "
                         f"expected {count * dtype.itemsize}")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if name == "bfloat16":  # the upper 16 bits of a float32: widening is exact
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return _Decoded(array.astype(array.dtype.newbyteorder("=")), name)


class _Decoded(np.ndarray):
    """An ndarray that remembers the dtype name it had in the file (bfloat16 is widened)."""

    def __new__(cls, array: np.ndarray, stored_dtype: str):
        obj = np.asarray(array).view(cls)
        obj.stored_dtype = stored_dtype
        return obj

    def __array_finalize__(self, obj):
        self.stored_dtype = getattr(obj, "stored_dtype", None)


def _ext_hook(code: int, payload: bytes) -> Any:
    if code == 1:
        return _decode_array(payload)
    if code == 3:  # a numpy scalar, stored as a 0-d array
        return _decode_array(payload)[()]
    if code == 2:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    if code == 4:  # Orbax's tuple: a msgpack list with the same extension types
        return tuple(msgpack.unpackb(payload, raw=False, ext_hook=_ext_hook, strict_map_key=False))
    raise ValueError(f"unknown msgpack extension type {code} (Flax uses 1 ndarray, 2 complex, 3 numpy scalar, 4 tuple)")


def decode_flax_msgpack(path: str | Path, keep: set[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Stream one Flax msgpack file -> ({top-level key: decoded value} for the keys in `keep`
    (None: all keys), all top-level keys in file order); other values are skipped unbuilt. The
    whole file is read; anything that is not one complete top-level map is a ValueError."""
    path = Path(path)
    entries: dict[str, Any] = {}
    keys: list[str] = []
    with path.open("rb") as stream:
        unpacker = msgpack.Unpacker(stream, raw=False, ext_hook=_ext_hook, strict_map_key=False,
                                    read_size=_READ_BYTES, max_buffer_size=_MAX_OBJECT_BYTES)
        try:
            size = unpacker.read_map_header()
            for _ in range(size):
                key = unpacker.unpack()
                if not isinstance(key, str):
                    raise ValueError(f"top-level key {key!r} is not a string")
                keys.append(key)
                if keep is None or key in keep:
                    entries[key] = _unchunk_tree(unpacker.unpack(), key)
                else:
                    unpacker.skip()
        except msgpack.OutOfData:
            raise ValueError(f"{path}: the file ends in the middle of the checkpoint (truncated download?); "
                             "it is not a complete Flax msgpack checkpoint") from None
        except (msgpack.UnpackException, msgpack.ExtraData, ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a Flax msgpack checkpoint: {error}") from None
        if unpacker.tell() != path.stat().st_size:
            raise ValueError(f"{path}: data after the end of the checkpoint map; not a Flax msgpack checkpoint")
    return entries, keys


def _unchunk_tree(tree: Any, name: str) -> Any:
    """Replace Flax's chunked-array records by the arrays they hold."""
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__") is True:
            return _unchunk(tree, name)
        return {key: _unchunk_tree(value, f"{name}/{key}") for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unchunk_tree(value, f"{name}/{i}") for i, value in enumerate(tree)]
    return tree


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}/{key}" if prefix else str(key), out)
    elif tree is not None:  # Orbax writes empty dicts as nil
        out[prefix] = tree


def _unchunk(record: dict, name: str) -> np.ndarray:
    """Flax's form for arrays above 1 GiB: shape and chunks as {"0": ..., "1": ...} dicts."""
    try:
        shape = tuple(int(record["shape"][str(i)]) for i in range(len(record["shape"])))
        chunks = [record["chunks"][str(i)] for i in range(len(record["chunks"]))]
        stored = chunks[0].stored_dtype
        array = np.concatenate([np.asarray(c).reshape(-1) for c in chunks]).reshape(shape)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"malformed chunked array at {name!r}: {error!r}") from None
    return _Decoded(array, stored)


def read_flax_checkpoint(path: str | Path) -> FlaxCheckpoint:
    """Read the parameters of the checkpoint `path` resolves to (see `find_flax_checkpoint`)."""
    file = find_flax_checkpoint(path)
    entries, keys = decode_flax_msgpack(file, keep={"step", "params", "frozen_params"})
    if "params" not in entries or not isinstance(entries["params"], dict):
        raise ValueError(f"{file} is a msgpack map without a 'params' tree: not a Flax train-state checkpoint")
    params: dict[str, Any] = {}
    _flatten(entries["params"], "", params)
    frozen: dict[str, Any] = {}
    _flatten(entries.get("frozen_params"), "", frozen)
    clash = sorted(set(params) & set(frozen))
    if clash:
        raise ValueError(f"{file}: parameters {clash[:5]} are both trained and frozen")
    params.update(frozen)
    bad = sorted(name for name, value in params.items() if not isinstance(value, _Decoded))
    if bad:
        raise ValueError(f"{file}: parameters {bad[:5]} are not arrays stored in the file "
                         "(Orbax arrays kept outside the msgpack file are not supported)")
    step = entries.get("step")
    if step is not None:
        if not (isinstance(step, (int, np.integer)) or (isinstance(step, np.ndarray) and step.shape == ()
                                                          and step.dtype.kind in "iu")):
            raise ValueError(f"{file}: 'step' is {step!r}, not an integer: not a Flax train-state checkpoint")
        step = int(step)
    dtypes = {name: value.stored_dtype for name, value in params.items()}
    params = {name: np.asarray(value) for name, value in params.items()}
    return FlaxCheckpoint(params=params, dtypes=dtypes, step=step, path=file, top_level_keys=keys)


# ------------------------------------------------------------------------------------ mapping
_BLOCK = {  # Flax Block (encoder, and the MAE baseline's decoder) -> hear_msm TransformerBlock
    "LayerNorm_0": "norm1", "Attention_0/Dense_0": "attn.qkv_layer", "Attention_0/Dense_1": "attn.proj_layer",
    "LayerNorm_1": "norm2", "Mlp_0/Dense_0": "mlp.layer1", "Mlp_0/Dense_1": "mlp.layer2",
}
_WINDOWED_BLOCK = {  # Flax MWMHABlock -> hear_msm MultiWindowBlock (+ attn_heads_<h> bias tables)
    "LayerNorm_0": "norm1", "wmha_block/qkv": "attn.qkv_layer", "wmha_block/proj": "attn.proj_layer",
    "LayerNorm_1": "norm2", "Mlp_0/Dense_0": "mlp.layer1", "Mlp_0/Dense_1": "mlp.layer2",
}
_DECODER_TOP = ("decoder_embed", "decoder_norm", "decoder_pred")
_HEADS_TABLE = re.compile(r"^wmha_block/attn_heads_(\d+)/relative_position_bias_table$")


def _leaf(flax_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One Flax leaf -> (torch parameter suffix, value in torch layout)."""
    module, _, kind = flax_name.rpartition("/")
    if kind == "kernel" and value.ndim == 2:  # Dense: (in, out) -> Linear weight (out, in)
        return f"{module}/weight", np.ascontiguousarray(value.T)
    if kind == "kernel" and value.ndim == 4:  # Conv: (kh, kw, in, out) -> (out, in, kh, kw)
        return f"{module}/weight", np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if kind == "scale":  # LayerNorm
        return f"{module}/weight", value
    if kind == "bias":
        return f"{module}/bias", value
    raise ValueError(f"unexpected Flax parameter {flax_name!r}")


class _Mapping:
    """Collects {hear_msm key: array} from a Flax tree; `used` = {Flax path: hear_msm key}.
    With `release`, each Flax array is dropped from the tree once mapped, so a transposed copy
    never coexists with the whole original tree."""

    def __init__(self, params: dict, used: dict, release: bool):
        self.params, self.used, self.release = params, used, release
        self.names = set(params)
        self.out: dict[str, np.ndarray] = {}

    def _take(self, name: str, key: str, value: np.ndarray) -> None:
        self.out[key] = value
        self.used[name] = key
        if self.release:
            del self.params[name]

    def as_is(self, *names: str) -> None:
        for name in names:
            if name in self.params:
                self._take(name, name, self.params[name])

    def module(self, flax_module: str, torch_module: str) -> None:
        depth = flax_module.count("/") + 1
        for name in [n for n in self.params if n.startswith(flax_module + "/") and n.count("/") == depth]:
            suffix, value = _leaf(name, self.params[name])
            self._take(name, torch_module + "." + suffix.rpartition("/")[2], value)

    def leaf(self, name: str, key: str, value: np.ndarray) -> None:
        self._take(name, key, value)

    def unknown(self, other_part: set[str]) -> list[str]:
        return sorted(self.names - set(self.used) - other_part)


def _check_shapes(out: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = sorted(k for k in set(out) & set(expected) if tuple(out[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                   "shapes " + ", ".join(f"{k}: {tuple(out[k].shape)} vs {tuple(expected[k])}" for k in wrong[:5])
                   if wrong else ""]
        raise ValueError(f"{what}: " + "; ".join(d for d in details if d))


def flax_encoder_state(params: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                       sources: dict[str, str] | None = None, release: bool = False) -> dict[str, np.ndarray]:
    """The encoder of an MW-MAE / MAE `params` tree as hear_msm state-dict arrays, strictly.

    expected: {hear_msm key: shape} of the target encoder (its `state_dict()` shapes). Every
    encoder parameter of the tree must land on one of these keys with that shape and every key
    must be filled; the decoder's parameters (`decoder_*`, `mask_token`) are recognised and left
    out; any other parameter is an error. Dense kernels are transposed, the conv kernel goes from
    Flax's (time, mel, in, out) to torch's (out, in, time, mel), LayerNorm `scale` -> `weight`.
    `sources`, if given, receives {Flax path: hear_msm key}; `release` drops each mapped array
    from `params` (see `_Mapping`).
    """
    mapping = _Mapping(params, {} if sources is None else sources, release)
    mapping.as_is("pos_embed", "cls_token")
    mapping.module("patch_embed/proj", "patch_embed.proj")
    mapping.module("encoder_norm", "encoder_norm")
    for name in sorted(mapping.names):
        match = re.match(r"^encoder_block_(\d+)/(.+)$", name)
        if match is None or name in mapping.used:
            continue
        index, module = int(match.group(1)), match.group(2).rpartition("/")[0]
        if module not in _BLOCK:
            raise ValueError(f"encoder parameter {name!r} is not part of a plain ViT block "
                             "(windowed encoder blocks are not supported)")
        mapping.module(name.rsplit("/", 1)[0], f"blocks.{index}.{_BLOCK[module]}")
    decoder = {n for n in mapping.names if n.split("/", 1)[0] in _DECODER_TOP + ("decoder_pos_embed", "mask_token")
               or n.startswith("decoder_block_")}
    unknown = mapping.unknown(decoder)
    if unknown:
        raise ValueError(f"parameters {unknown[:5]} belong to neither the MW-MAE/MAE encoder nor its decoder")
    _check_shapes(mapping.out, expected, "the Flax checkpoint does not fit this encoder")
    return mapping.out


def flax_decoder_state(params: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                       sources: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The decoder of an MW-MAE / MAE `params` tree as state-dict arrays of hear_msm's
    `MaskedAutoencoderDecoder` (training only), strictly; encoder parameters are left out.
    Windowed heads' tables [(2w-1), 1] become `decoder_blocks.<i>.attn.position_bias.<head>` [2w-1].
    `sources`, if given, receives {Flax path: hear_msm key}."""
    mapping = _Mapping(params, {} if sources is None else sources, release=False)
    mapping.as_is("mask_token", "decoder_pos_embed")
    for module in _DECODER_TOP:
        mapping.module(module, module)
    for name in sorted(mapping.names):
        match = re.match(r"^decoder_block_(\d+)/(.+)$", name)
        if match is None or name in mapping.used:
            continue
        index, rest = int(match.group(1)), match.group(2)
        table = _HEADS_TABLE.match(rest)
        if table:
            key = f"decoder_blocks.{index}.attn.position_bias.{int(table.group(1))}"
            mapping.leaf(name, key, params[name].reshape(-1))
            continue
        module = rest.rpartition("/")[0]
        names = _WINDOWED_BLOCK if module.startswith("wmha_block") else _BLOCK
        if module not in names:
            raise ValueError(f"decoder parameter {name!r} is not part of a decoder block")
        mapping.module(name.rsplit("/", 1)[0], f"decoder_blocks.{index}.{names[module]}")
    encoder = {n for n in mapping.names
               if n in ("pos_embed", "cls_token") or n.startswith(("encoder_", "patch_embed/"))}
    unknown = mapping.unknown(encoder)
    if unknown:
        raise ValueError(f"parameters {unknown[:5]} belong to neither the MW-MAE/MAE decoder nor its encoder")
    _check_shapes(mapping.out, expected, "the Flax checkpoint does not fit this decoder")
    return mapping.out
