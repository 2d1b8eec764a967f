#!/usr/bin/env python3
"""AxLSTM's mLSTM paths through the HEAR path, interleaved with SSAST-tiny in one run (A/B).

x realtime of `timestamp_embeddings` on `--clips` x `--seconds` s of noise (random weights; speed
does not depend on them), default chunks per call, one setting per `--kernel` of AxLSTM:

  auto       the default: the fused compiled layer (`hear_msm.ops.mlstm.mlstm_layer_cpu`)
  cpu        the previous default: xlstm's layer around the exact compiled cell
  reference  xlstm's own PyTorch forward

Every variant runs once per round, rounds interleaved (order reversed every other round); reported:
the median x realtime and the median of the per-round ratios to ssast_tiny and to `cpu`.
--clock cpu times the calling thread's CPU time (one thread only), as benchmarks/throughput.py.

    python benchmarks/mlstm_kernels.py --batch 1 16 --clock cpu --rounds 7 --out benchmarks/results/mlstm_kernels.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hear_msm
from hear_msm._hear import HearModel
from _util import progress, table, write_json

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="axlstm_tiny")
    parser.add_argument("--kernels", nargs="+", default=["auto", "cpu", "reference"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", default="cpu", choices=sorted(CLOCKS))
    parser.add_argument("--out", default="benchmarks/results/mlstm_kernels.json")
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
            variants[f"{args.arch} {kernel}"] = HearModel(hear_msm.create_model(args.arch, kernel=kernel))
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
        old = speed.get(f"{args.arch} cpu")
        for name in names:
            rows.append({"batch": batch, "variant": name, "x_realtime": statistics.median(speed[name]),
                         "vs_ssast_tiny": statistics.median(a / s for a, s in zip(speed[name], speed["ssast_tiny"])),
                         "vs_old_default": statistics.median(a / o for a, o in zip(speed[name], old)) if old else None,
                         "rounds": speed[name]})
    progress(1, 1, "done")
    print(table(rows, ["batch", "variant", "x_realtime", "vs_ssast_tiny", "vs_old_default"]))
    print(f"clock: {args.clock}; one thread; medians over {args.rounds} interleaved rounds; ratios paired within rounds")
    write_json(args.out, {"arch": args.arch, "seconds": args.seconds, "clock": args.clock, "rounds": args.rounds,
                          "rows": rows})


if __name__ == "__main__":
    main()
