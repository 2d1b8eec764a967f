#!/usr/bin/env python3
"""(a) HEAR embedding throughput of the models and (b) the official one-chunk procedure.

Throughput = seconds of audio embedded per second ("x realtime"), for `--clips`
clips of `--seconds` seconds (default 10 s), random weights (speed does not depend on them):

  hear      our HEAR path: `timestamp_embeddings` on the whole batch, all 2 s chunks of all
            clips through the encoder in calls of the default `max_batch_chunks`, the default kernel.
  hear1     the same HEAR path with one chunk per encoder call (`max_batch_chunks=1`): what the
            default chunks per call must never be slower than.
  official  the authors' wrapper procedure, emulated with our encoder: one clip per call, one
            2 s chunk per forward, their chunking (always a padded tail chunk: 10 s -> 6 chunks)
            and frame layout (`layout="official", max_batch_chunks=1`).
  full      SSAM/AxLSTM only: `sequence="full"`, each clip one sequence.

Every (model, mode) of one thread and batch setting is timed once per round, the rounds
interleaved (mode order reversed every other round), so that a slower or faster spell of a shared
machine falls on all of them. Reported: the median over rounds; ratios are taken within each round
and then their median (paired): `vs_ssast_tiny` divides by ssast_tiny's hear throughput, `vs_hear1`
and `vs_official` divide a model's mode by its hear1 / official throughput.

--precision fp32 bf16 times every (model, mode) in both precisions within the same rounds;
`vs_fp32` is then a row's throughput over the same model and mode in fp32 (paired per round).

--clock cpu times with the calling thread's CPU time instead of wall time. With one thread all
compute runs on that thread, so time the machine gives to other processes is not counted (on a
busy shared machine wall times vary by +-30% between rounds; CPU times by a few %). Refused with
more than one thread, where work runs on other threads too.

    python benchmarks/throughput.py --threads 1 2 --batch 1 16 --out benchmarks/results/throughput.json
    python benchmarks/throughput.py --models ssast_tiny ssam_tiny axlstm_tiny --threads 1 --modes hear hear1 official \\
        --clock cpu --rounds 5 --out benchmarks/results/chunks_per_call.json
    python benchmarks/throughput.py --threads 1 --batch 1 16 --modes hear --precision fp32 bf16 --clock cpu \
        --out benchmarks/results/bf16_throughput.json
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import hear_msm
from hear_msm._hear import HearModel
from _util import CLOCKS, progress, table, write_json

def runner(arch: str, mode: str, audio: torch.Tensor, precision: str = "fp32", **options):
    """A function that embeds `audio` once in `mode` and `precision`."""
    torch.manual_seed(0)
    encoder = hear_msm.create_model(arch, precision=precision)
    if mode == "official":
        runtime = HearModel(encoder, layout="official", max_batch_chunks=1, **options)
        return lambda: [runtime.timestamp_embeddings(clip[None]) for clip in audio]
    if mode == "hear1":
        runtime = HearModel(encoder, max_batch_chunks=1, **options)
    else:
        runtime = HearModel(encoder, sequence="full" if mode == "full" else "chunked", **options)
    return lambda: runtime.timestamp_embeddings(audio)


def wanted(arch: str, mode: str, batch: int, batches: list[int]) -> bool:
    if mode == "full" and not arch.startswith(("ssam_", "axlstm_", "ssamba_")):
        return False
    if mode == "official" and arch.startswith("ssamba_"):  # SSAMBA's authors published no HEAR wrapper
        return False
    # one clip per call: batch 16 is 16 x batch 1, measured once
    return not (mode == "official" and batch > 1 and 1 in batches)


def measure(jobs: list[tuple[str, str, str]], audio: torch.Tensor, rounds: int, clock, label: str) -> dict:
    """(arch, mode, precision) -> x realtime per round, the jobs interleaved round by round."""
    calls = {job: runner(job[0], job[1], audio, job[2]) for job in jobs}
    for call in calls.values():
        call()  # warm-up: kernels built, caches and allocator primed
    seconds_audio = audio.numel() / 16000
    results = {job: [] for job in jobs}
    for r in range(rounds):
        for i, job in enumerate(jobs if r % 2 == 0 else jobs[::-1]):
            progress(r * len(jobs) + i, rounds * len(jobs), f"{label} {' '.join(job)} round {r + 1}")
            start = clock()
            calls[job]()
            results[job].append(seconds_audio / (clock() - start))
    return results


def paired(numerator: list[float] | None, denominator: list[float] | None) -> float | None:
    if not numerator or not denominator:
        return None
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=hear_msm.list_models())
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", default=["hear", "official", "full"],
                        choices=["hear", "hear1", "official", "full"])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="precisions to time side by side (bf16: CPUs with native bfloat16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (median reported)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time, or this thread's CPU time")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    gen = torch.Generator().manual_seed(0)
    rows = []
    settings = [(t, b) for t in args.threads for b in args.batch]
    for threads, batch in settings:
        torch.set_num_threads(threads)
        audio = 0.1 * torch.randn(batch, int(16000 * args.seconds), generator=gen)
        jobs = [(arch, mode, precision) for arch in args.models for mode in args.modes for precision in args.precision
                if wanted(arch, mode, batch, args.batch)]
        results = measure(jobs, audio, args.rounds, CLOCKS[args.clock], f"{threads}t b{batch}")
        for arch, mode, precision in jobs:
            own = results[arch, mode, precision]
            rows.append({"threads": threads, "batch": batch, "model": arch, "mode": mode, "precision": precision,
                         "x_realtime": statistics.median(own), "rounds": own,
                         "vs_ssast_tiny": paired(own, results.get(("ssast_tiny", "hear", precision))),
                         "vs_hear1": paired(own, results.get((arch, "hear1", precision))) if mode != "hear1" else None,
                         "vs_fp32": paired(own, results.get((arch, mode, "fp32"))) if precision != "fp32" else None})
    progress(1, 1, "done")
    for row in rows:  # the official procedure at batch 1 stands for every batch (one clip per call)
        official = next((r for r in rows if r["threads"] == row["threads"] and r["model"] == row["model"]
                         and r["precision"] == row["precision"] and r["mode"] == "official"
                         and (r["batch"] == row["batch"] or r["batch"] == 1)), None)
        if row["mode"] != "official" and official:
            same_run = official["batch"] == row["batch"]
            row["vs_official"] = paired(row["rounds"], official["rounds"]) if same_run else \
                row["x_realtime"] / official["x_realtime"]
    print(table(rows, ["threads", "batch", "model", "mode", "precision", "x_realtime", "vs_ssast_tiny", "vs_hear1",
                       "vs_official", "vs_fp32"]))
    print(f"clock: {args.clock}; medians over {args.rounds} interleaved rounds; ratios paired within rounds "
          "(vs_official at batch > 1: ratio of medians, the official procedure measured at batch 1)")
    # settings that change which kernels run (e.g. ONEDNN_MAX_CPU_ISA=AVX512_CORE: oneDNN without bf16 units)
    environment = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "HEAR_MSM_CPU_BF16")
                   if k in os.environ}
    write_json(args.out, {"seconds": args.seconds, "clock": args.clock, "rounds": args.rounds,
                          "precisions": args.precision, "environment": environment, "rows": rows})


if __name__ == "__main__":
    main()
