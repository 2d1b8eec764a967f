#!/usr/bin/env python3
"""The fused CPU defaults of issue 15 against the paths they replaced, through the HEAR path,
interleaved with SSAST-tiny in one run (A/B).

x realtime of `timestamp_embeddings` on `--batch` clips of `--seconds` s of noise (random weights;
speed does not depend on them), default chunks per call. Variants:

  axlstm_tiny auto       the default: the fused compiled layer (`hear_msm.ops.mlstm.mlstm_layer_cpu`)
  axlstm_tiny cpu        the previous default: xlstm's layer around the exact compiled cell
  axlstm_tiny reference  xlstm's own PyTorch forward
  ssam_tiny              the default: the mixer's conv + SiLU in one C pass (`causal_conv_silu_cpu`),
                         the channel-blocked scan with the output gate in its loop, in_proj on oneDNN
  ssam_tiny per-channel  the default before the blocked scan: the per-channel scan, PyTorch's
                         y * silu(z) and ATen's in_proj (note 23)
  ssam_tiny torch-conv   the default before that: oneDNN's conv and PyTorch's SiLU before the scan
                         (note 18), with today's scan

Every variant runs once per round, rounds interleaved (order reversed every other round); reported:
the median x realtime and the median of the per-round ratios to ssast_tiny and to the path each
default replaced (`axlstm_tiny cpu`, `ssam_tiny per-channel`).
--clock cpu times the calling thread's CPU time (one thread only), as benchmarks/throughput.py.

    python benchmarks/fused_defaults.py --batch 1 16 --clock cpu --rounds 7 --out benchmarks/results/fused_defaults.json
"""
from __future__ import annotations

import argparse
import statistics

import torch

import hear_msm
from hear_msm._hear import HearModel
from hear_msm.ops import onednn
from hear_msm.ops import selective_scan as scan_ops
from _util import CLOCKS, progress, table, write_json

def torch_conv_silu(x, weight, bias):
    """SSAM's conv + SiLU as before the compiled pass (mamba.py's PyTorch branch)."""
    length = x.shape[1]
    conv = torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, padding=weight.shape[-1] - 1,
                                      groups=weight.shape[0])
    return torch.nn.functional.silu(conv[..., :length]).transpose(1, 2).contiguous()


def per_channel_scan(u, delta, A, B, C, D, state=None, gate=None):
    """SSAM's scan as before the channel-blocked form: per-channel C loop, then PyTorch's gate."""
    y, state = scan_ops._forward(scan_ops.load_library(), (u, delta, A, B, C, D), state, torch.float32,
                                 channel_blocks=False)
    return (y if gate is None else y * torch.nn.functional.silu(gate.float())), state


class Patched:
    """A HEAR runtime that embeds with some module attributes replaced ((module, name) -> value)."""

    def __init__(self, runtime, patches: dict):
        self.runtime, self.patches = runtime, patches

    def timestamp_embeddings(self, audio):
        saved = {key: getattr(*key) for key in self.patches}
        for (module, name), value in self.patches.items():
            setattr(module, name, value)
        try:
            return self.runtime.timestamp_embeddings(audio)
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=["auto", "cpu", "reference"], help="AxLSTM kernels")
    parser.add_argument("--no-ssam", action="store_true", help="leave out the two SSAM variants")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", default="cpu", choices=sorted(CLOCKS))
    parser.add_argument("--out", default="benchmarks/results/fused_defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCKS[args.clock]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        audio = 0.1 * torch.randn(batch, int(16000 * args.seconds), generator=gen)
        variants = {"ssast_tiny": HearModel(hear_msm.create_model("ssast_tiny"))}
        for kernel in args.kernels:
            torch.manual_seed(0)
            variants[f"axlstm_tiny {kernel}"] = HearModel(hear_msm.create_model("axlstm_tiny", kernel=kernel))
        if not args.no_ssam:
            torch.manual_seed(0)
            variants["ssam_tiny"] = HearModel(hear_msm.create_model("ssam_tiny"))
            variants["ssam_tiny per-channel"] = Patched(variants["ssam_tiny"], {
                (scan_ops, "selective_scan_cpu"): per_channel_scan, (onednn, "takes"): lambda *args: False})
            variants["ssam_tiny torch-conv"] = Patched(variants["ssam_tiny"], {
                (scan_ops, "causal_conv_silu_cpu"): torch_conv_silu})
        for runtime in variants.values():
            runtime.timestamp_embeddings(audio)  # warm-up: kernels built, allocator primed
        names = list(variants)
        speed = {name: [] for name in names}
        for r in range(args.rounds):
            for i, name in enumerate(names if r % 2 == 0 else names[::-1]):
                progress(r * len(names) + i, args.rounds * len(names), f"b{batch} {name} round {r + 1}")
                start = clock()
                variants[name].timestamp_embeddings(audio)
                speed[name].append(audio.numel() / 16000 / (clock() - start))
        previous = {"axlstm_tiny": speed.get("axlstm_tiny cpu"), "ssam_tiny": speed.get("ssam_tiny per-channel")}
        for name in names:
            old = previous.get(name.split()[0])
            rows.append({"batch": batch, "variant": name, "x_realtime": statistics.median(speed[name]),
                         "vs_ssast_tiny": statistics.median(a / s for a, s in zip(speed[name], speed["ssast_tiny"])),
                         "vs_old_default": statistics.median(a / o for a, o in zip(speed[name], old)) if old else None,
                         "rounds": speed[name]})
    progress(1, 1, "done")
    print(table(rows, ["batch", "variant", "x_realtime", "vs_ssast_tiny", "vs_old_default"]))
    print(f"clock: {args.clock}; one thread; medians over {args.rounds} interleaved rounds; ratios paired within rounds")
    write_json(args.out, {"seconds": args.seconds, "clock": args.clock, "rounds": args.rounds,
                          "rows": rows})


if __name__ == "__main__":
    main()
