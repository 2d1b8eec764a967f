"""Deterministic random SSAMBA checkpoints in the exact layout of the Hugging Face Hub files.

`random_ssamba_state_dict("ssamba_tiny")` has the 451 keys of `ssamba_tiny_400.pth`
(`torch.save(DataParallel(AMBAModel).state_dict())`: every key starts with `module.`,
`p_input_fdim` / `p_input_tdim` are int64 0-dim tensors), with shapes from
`data/ssamba_state_dict_keys.json`. Parity fixtures are made by running the authors' code on it in
a scratch folder; the tests rebuild the same tensors from the seed.

The values are bit-identical on every CPU: the noise is built from integers (torch.randint, then a
sum of four uniforms, scaled in float64), and the few transcendental values come from Python's
`math`, so no vectorised float kernel whose last bit depends on the instruction set is involved.
Magnitudes are realistic for every sub-layer (unit-gain weights, S4D-like A, positive step sizes,
norms near one) rather than the degenerate zeros of a fresh init. Depends on torch only, so
scratch environments can import it by path.
"""
import json
import math
import os

import torch

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "ssamba_state_dict_keys.json")
PREFIX = "module."
INT_ENTRIES = {"p_input_fdim": 128, "p_input_tdim": 1024}  # the pretraining input size, mel x frames


def hub_shapes(arch):
    """{key: shape} of the Hub file of `arch` ("ssamba_tiny" | "ssamba_small" | "ssamba_base")."""
    with open(KEYS_FILE) as f:
        return {k: tuple(v) for k, v in json.load(f)[arch].items()}


def _noise(shape, gen):
    """Approximately standard normal float64 (Irwin-Hall sum of 4 uniforms, within +-3.46)."""
    count = math.prod(shape)
    draws = torch.randint(0, 1 << 22, (4, count), generator=gen, dtype=torch.int64).sum(0)
    return ((draws - (1 << 23)).to(torch.float64) * (math.sqrt(3.0) / (1 << 22))).reshape(shape)


def _uniform(shape, gen):
    """Uniform in (0, 1), float64, exact from integers."""
    draws = torch.randint(0, 1 << 24, shape, generator=gen, dtype=torch.int64)
    return (draws.to(torch.float64) + 0.5) / (1 << 24)


def _inverse_softplus_steps(shape, gen):
    """dt_proj biases whose softplus is a step size spread log-uniformly over [1e-3, 1e-1]."""
    low, high = math.log(1e-3), math.log(1e-1)
    values = [math.exp(low + u * (high - low)) for u in _uniform(shape, gen).flatten().tolist()]
    return torch.tensor([dt + math.log(-math.expm1(-dt)) for dt in values], dtype=torch.float64).reshape(shape)


def random_value(name, shape, gen):
    """One float32 tensor with a realistic magnitude for the parameter `name` (no `module.`)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("A_log", "A_b_log"):
        s4d = torch.tensor([math.log(n) for n in range(1, shape[-1] + 1)], dtype=torch.float64)
        value = s4d.expand(shape) + 0.1 * _noise(shape, gen)
    elif leaf in ("D", "D_b"):
        value = 1.0 + 0.1 * _noise(shape, gen)
    elif name.endswith(("dt_proj.bias", "dt_proj_b.bias")):
        value = _inverse_softplus_steps(shape, gen)
    elif len(shape) == 1 and leaf == "weight":  # LayerNorm gains
        value = 1.0 + 0.1 * _noise(shape, gen)
    elif len(shape) == 1:  # biases
        value = 0.02 * _noise(shape, gen)
    elif leaf in ("cls_token", "mask_embed", "pos_embed"):
        value = 0.1 * _noise(shape, gen)
    else:  # weights [out, in, ...]: unit gain
        value = _noise(shape, gen) / math.sqrt(math.prod(shape[1:]))
    return value.to(torch.float32).contiguous()


def random_ssamba_state_dict(arch="ssamba_tiny", seed=0):
    """The Hub layout of `arch` (keys with `module.`), filled deterministically from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(hub_shapes(arch).items()):
        name = key[len(PREFIX):]
        if name in INT_ENTRIES:
            state[key] = torch.tensor(INT_ENTRIES[name], dtype=torch.int64)
        else:
            state[key] = random_value(name, shape, gen)
    return state
