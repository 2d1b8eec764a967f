#!/usr/bin/env python3
"""(g) compile=True: compile time cold and warm, and steady-state HEAR throughput eager vs compiled.

Per model, two fresh processes share one new, empty cache folder ($HEAR_MSM_CACHE):

  cold   the first process compiles into the empty cache: `compile_s` = its first HEAR call (which
         compiles every batch shape the call meets) minus a steady compiled call of the same audio,
         in wall seconds and in CPU seconds of the process and the C++ compiler runs (inductor
         compiles in-process here, TORCHINDUCTOR_COMPILE_THREADS=1: the CPU time does not depend on load).
  warm   the second process, same model and cache: the same measurement; inductor's FX graph cache
         hits (counted), so only dynamo's tracing and loading remain.

The warm process then times the HEAR path (`timestamp_embeddings` of `--clips` clips of `--seconds`
s, default batching) eagerly and compiled, interleaved round by round (A, B, A, B ...), with
`--clock cpu` (this thread's CPU time; one thread) by default, since a shared machine's wall time
varies between rounds. `--static` adds a third variant: one graph per batch size instead of one
dynamic-batch graph (the default of `compile=True`). Random weights (speed does not depend on them).

    python benchmarks/compile.py --models ssast_tiny ssam_tiny axlstm_tiny --out benchmarks/results/compile.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from _util import CLOCKS, progress, table, write_json

def one_process(arch: str, clips: int, seconds: float, rounds: int, clock: str, static: bool) -> dict:
    """Runs in a child process: compile time of the first HEAR call, then (rounds > 0) interleaved rounds."""
    import hear_msm
    from hear_msm._compile import compile_encoder
    from hear_msm._hear import HearModel

    torch.set_num_threads(1)
    audio = 0.1 * torch.randn(clips, int(16000 * seconds), generator=torch.Generator().manual_seed(0))
    def model():
        torch.manual_seed(0)  # the same weights in every variant
        return hear_msm.create_model(arch)

    eager = HearModel(model())
    compiled = HearModel(compile_encoder(model()))
    eager.timestamp_embeddings(audio)  # C kernels built, allocator warm
    start, cpu = time.perf_counter(), cpu_seconds()
    ours, _ = compiled.timestamp_embeddings(audio)
    first, first_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    start, cpu = time.perf_counter(), cpu_seconds()
    compiled.timestamp_embeddings(audio)
    steady, steady_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    counters = torch._dynamo.utils.counters
    result = {"model": arch, "compile_s": first - steady, "compile_cpu_s": first_cpu - steady_cpu, "first_call_s": first,
              "fx_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
              "fx_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
              "graphs": counters["stats"]["unique_graphs"], "failure": compiled.encoder.forward_features.failure,
              "max_abs_diff": (ours - eager.timestamp_embeddings(audio)[0]).abs().max().item()}
    if rounds:
        variants = {"eager": eager, "compiled": compiled}
        if static:
            variants["static"] = HearModel(compile_encoder(model(), dynamic_batch=False))
            variants["static"].timestamp_embeddings(audio)
        tick = CLOCKS[clock]
        times = {name: [] for name in variants}
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                start = tick()
                variants[name].timestamp_embeddings(audio)
                times[name].append(audio.numel() / 16000 / (tick() - start))
        result["rounds"] = times
    return result


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the C++ compiler runs), in seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def child(arch: str, cache: str, args, rounds: int) -> dict:
    command = [sys.executable, __file__, "--one", arch, "--clips", str(args.clips), "--seconds", str(args.seconds),
               "--rounds", str(rounds), "--clock", args.clock] + (["--static"] if args.static else [])
    # compile in this process (no worker pool), so its CPU time is counted (a load-independent measure)
    env = {**os.environ, "HEAR_MSM_CACHE": cache, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{arch}: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ssast_tiny", "ssam_tiny", "axlstm_tiny"])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved eager/compiled rounds (median reported)")
    parser.add_argument("--clock", default="cpu", choices=sorted(CLOCKS))
    parser.add_argument("--static", action="store_true", help="also time one static graph per batch size")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_process(args.one, args.clips, args.seconds, args.rounds, args.clock, args.static)))
        return
    rows = []
    for i, arch in enumerate(args.models):
        with tempfile.TemporaryDirectory(prefix="hear_msm-compile-bench-") as cache:
            progress(2 * i, 2 * len(args.models), f"{arch} cold")
            cold = child(arch, cache, args, rounds=0)
            progress(2 * i + 1, 2 * len(args.models), f"{arch} warm + {args.rounds} rounds")
            warm = child(arch, cache, args, rounds=args.rounds)
        rounds = warm.pop("rounds")
        row = {"model": arch, "compile_cold_s": cold["compile_s"], "compile_warm_s": warm["compile_s"],
               "compile_cold_cpu_s": cold["compile_cpu_s"], "compile_warm_cpu_s": warm["compile_cpu_s"],
               "graphs": warm["graphs"], "cold_fx_miss": cold["fx_cache_miss"], "warm_fx_hit": warm["fx_cache_hit"],
               "warm_fx_miss": warm["fx_cache_miss"], "max_abs_diff": warm["max_abs_diff"],
               "failure": warm["failure"] or cold["failure"], "rounds": rounds}
        for name, values in rounds.items():
            row[f"{name}_x_rt"] = statistics.median(values)
            if name != "eager":
                row[f"{name}_vs_eager"] = statistics.median(c / e for c, e in zip(values, rounds["eager"]))
        # seconds of audio after which the cold / warm compile has paid for itself
        gain = 1 / row["eager_x_rt"] - 1 / row["compiled_x_rt"]  # seconds saved per second of audio
        row["break_even_cold_audio_h"] = row["compile_cold_cpu_s"] / gain / 3600 if gain > 0 else None
        row["break_even_warm_audio_h"] = row["compile_warm_cpu_s"] / gain / 3600 if gain > 0 else None
        rows.append(row)
    progress(1, 1, "done")
    columns = ["model", "compile_cold_cpu_s", "compile_warm_cpu_s", "compile_cold_s", "compile_warm_s", "graphs", "warm_fx_hit", "eager_x_rt", "compiled_x_rt",
               "compiled_vs_eager"] + (["static_vs_eager"] if args.static else []) + \
              ["break_even_cold_audio_h", "break_even_warm_audio_h", "max_abs_diff"]
    print(table(rows, columns))
    print(f"clock {args.clock}, one thread, {args.clips} clips x {args.seconds:g} s, medians over {args.rounds} "
          "interleaved rounds, ratios paired within rounds; compile times: CPU seconds of the process and the C++ "
          "compiler (one compile thread), and wall seconds; break-even: hours of audio after which the compile "
          "CPU time is repaid")
    write_json(args.out, {"clips": args.clips, "seconds": args.seconds, "clock": args.clock, "rounds": args.rounds,
                          "rows": rows})


if __name__ == "__main__":
    main()
