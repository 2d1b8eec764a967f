"""Deterministic random checkpoints in the official key layout.

Parity fixtures are produced by running the authors' code on such a checkpoint in a scratch
folder; the tests rebuild the very same tensors from the seed, so only small input/output tensors
need to be committed.  Values are drawn so that every sub-layer sees realistic magnitudes
(unit-gain weights, positive step sizes, norms near one) rather than the degenerate zeros of a
fresh init.  Depends on torch only, so scratch environments can import it by path.
"""
import json
import math
import os

import torch

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "official_state_dict_keys.json")


def official_shapes(arch):
    """{key: shape} of the official checkpoint of `arch` (e.g. "ssam_tiny")."""
    with open(KEYS_FILE) as f:
        return {k: tuple(v) for k, v in json.load(f)[arch].items()}


def random_official_state_dict(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(official_shapes(arch).items()):
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        name = key.rsplit(".", 1)[-1]
        if key.endswith("mixer.A_log"):
            d_state = shape[-1]
            base = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(shape)
            value = base + 0.1 * noise
        elif key.endswith("mixer.D") or key.endswith("learnable_skip"):
            value = 1.0 + 0.1 * noise
        elif key.endswith("dt_proj.bias"):
            # inverse softplus of step sizes spread log-uniformly over [1e-3, 1e-1]
            u = torch.rand(shape, generator=gen)
            dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            value = dt + torch.log(-torch.expm1(-dt))
        elif key.endswith("fgate.bias"):
            value = torch.linspace(3.0, 6.0, shape[0]) + 0.1 * noise
        elif len(shape) == 1 and name == "weight":
            # LayerNorm gains; AxLSTM block norms and mLSTM output norms store (gain - 1)
            residual_gain = arch.startswith("axlstm") and key.startswith("blocks.")
            value = (0.0 if residual_gain else 1.0) + 0.1 * noise
        elif len(shape) == 1:
            value = 0.02 * noise
        elif key in ("cls_token", "mask_token", "pos_embed"):
            value = 0.1 * noise
        else:
            # block-diagonal q/k/v projections [heads, out, in] mix only `in` inputs each
            per_head = key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
            fan_in = shape[-1] if per_head else math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
        state[key] = value.contiguous()
    return state
