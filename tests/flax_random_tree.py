"""Deterministic random Flax parameter trees for MW-MAE / MAE parity fixtures.

The fixtures were made by saving such a tree the way the authors' trainer saves its state and
running their code on it (tests/fixtures/README.md); the tests rebuild the very same values from
the seed, so no 85M-parameter file is committed. numpy only, so a scratch environment with
another numpy can import it by path: every value comes from PCG64's 53-bit uniforms (stable
across numpy versions and CPUs) by exact arithmetic, no libm calls.

Values have realistic magnitudes for a ViT: Dense/conv kernels with unit gain (std 1/sqrt(fan_in)),
LayerNorm scales near 1, small biases, O(1) positions, tokens and relative position biases.
"""
import json
import os
import zlib

import numpy as np

TREE_FILE = os.path.join(os.path.dirname(__file__), "data", "mwmae_param_tree.json")
SQRT3 = 3.0 ** 0.5


def reference_tree(model):
    """({flax path: shape}, {flax path: dtype name}) of the whole `params` of "mwmae_base" / "mae_base"."""
    with open(TREE_FILE) as f:
        entry = json.load(f)[model]
    shapes = {path: tuple(shape) for part in ("encoder", "decoder") for path, shape in entry[part].items()}
    return shapes, dict(entry["dtypes"])


def _std(path, shape):
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
        return 1.0 / np.sqrt(float(np.prod(shape[:-1])))  # fan_in: all but the output axis
    if name == "bias":
        return 0.1
    if name == "scale":
        return 0.1  # around 1, see below
    if name == "relative_position_bias_table":
        return 1.0
    if name in ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token"):
        return 0.5
    raise ValueError(f"no value rule for Flax parameter {path!r}")


def round_to_bfloat16(values):
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def random_flax_params(shapes, seed=0, bfloat16_paths=()):
    """{flax path: float32 array} for the given shapes; paths in `bfloat16_paths` hold values
    exactly representable in bfloat16 (the authors store `mask_token` / `cls_token` that way)."""
    params = {}
    for path in sorted(shapes):
        shape = tuple(shapes[path])
        generator = np.random.Generator(np.random.PCG64([seed, zlib.crc32(path.encode())]))
        uniform = generator.random(int(np.prod(shape, dtype=np.int64)))  # [0, 1), float64
        values = (2.0 * uniform - 1.0) * (SQRT3 * _std(path, shape))  # zero mean, variance std^2
        if path.endswith("/scale"):
            values = values + 1.0
        values = values.astype(np.float32).reshape(shape)
        params[path] = round_to_bfloat16(values) if path in bfloat16_paths else values
    return params


def reference_params(model, seed=0):
    """The whole random `params` tree of "mwmae_base" / "mae_base" as their checkpoint holds it."""
    shapes, dtypes = reference_tree(model)
    return random_flax_params(shapes, seed, {p for p, d in dtypes.items() if d == "bfloat16"})
