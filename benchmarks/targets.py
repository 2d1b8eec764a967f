#!/usr/bin/env python3
"""The CPU speed targets of the second round (issue 15), measured side by side in one run.

One thread, timed by the calling thread's CPU time (time the machine gives to other processes is
not counted), 10 s clips, random weights (speed does not depend on them). In one process, every
variant below is timed once per round, the rounds interleaved (order reversed every other round),
and ratios are taken within a round, then their median over rounds:

  throughput   ssast_tiny, ssam_tiny, axlstm_tiny through the HEAR path at batch 1 and 16: the
               defaults (`default`), one chunk per encoder call (`hear1`), the authors' procedure
               (`official`: one clip per call, one 2 s chunk per forward), `precision="bf16"` (on
               CPUs with native bfloat16) and `compile=True` (compiled and cached before timing).
  flop rate    SSAST-tiny's HEAR extraction at batch 16 (80 chunks: FLOPs counted analytically, as in
               flops.py) against a plain matmul of one HEAR call's shape ([1004, 192] @ [192, 768]),
               timed in the same rounds.
  compile      the compile time of each tiny model in a fresh process with an empty cache (cold) and
               in a second one with the same cache (warm), from `compile.py`'s child processes.

Measurements too long to repeat here are read from their own result files and named as such in the
table: the bf16 linear-probe accuracy on the General-MIDI dev tasks and the `eval.run --workers`
timing.

    python benchmarks/targets.py --out benchmarks/results/targets.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hear_msm
from hear_msm._hear import HearModel
from hear_msm._precision import cpu_has_native_bf16
from _util import machine, progress, table, write_json
from flops import ssast_flops_per_chunk

MODELS = ("ssast_tiny", "ssam_tiny", "axlstm_tiny")
RESULTS = Path(__file__).with_name("results")
MATMUL = (4 * 251, 192, 768)  # one HEAR call of ssast_tiny: 4 chunks of 251 tokens, width 192 -> MLP 768


def variants(arch: str, bf16: bool) -> dict[str, HearModel]:
    """name -> HEAR runtime; every variant of one model has the same random weights."""
    def encoder(**options):
        torch.manual_seed(0)
        return hear_msm.create_model(arch, **options)

    default = encoder()
    out = {"default": HearModel(default), "hear1": HearModel(default, max_batch_chunks=1),
           "official": HearModel(default, layout="official", max_batch_chunks=1),
           "compiled": HearModel(encoder(compile=True))}
    if bf16:
        out["bf16"] = HearModel(encoder(precision="bf16"))
    return out


def call(runtime: HearModel, name: str, audio: torch.Tensor):
    if name == "official":  # one clip per call
        return lambda: [runtime.timestamp_embeddings(clip[None]) for clip in audio]
    return lambda: runtime.timestamp_embeddings(audio)


def matmul_job():
    m, k, n = MATMUL
    a, b = torch.randn(m, k), torch.randn(k, n)

    def run():
        for _ in range(20):
            a @ b
    return run, 20 * 2 * m * k * n


def timed_rounds(batch: int, rounds: int, bf16: bool) -> dict:
    """(model, variant) -> CPU seconds per round, plus ("matmul", "") for the FLOP-rate reference."""
    audio = 0.1 * torch.randn(batch, 160000, generator=torch.Generator().manual_seed(batch))
    jobs = {}
    for arch in MODELS:
        for name, runtime in variants(arch, bf16).items():
            if name == "official" and batch > 1:
                continue  # one clip per call: batch 16 is 16 x batch 1, measured there
            jobs[arch, name] = call(runtime, name, audio)
    jobs["matmul", ""], flops = matmul_job()
    with torch.no_grad():
        for i, run in enumerate(jobs.values()):  # warm-up: C kernels built, graphs compiled, caches primed
            progress(i, len(jobs), f"batch {batch} warm-up")
            run()
        seconds = {job: [] for job in jobs}
        order = list(jobs)
        for r in range(rounds):
            for i, job in enumerate(order if r % 2 == 0 else order[::-1]):
                progress(r * len(order) + i, rounds * len(order), f"batch {batch} round {r + 1}: {' '.join(job)}")
                start = time.thread_time()
                jobs[job]()
                seconds[job].append(time.thread_time() - start)
    return {"seconds": seconds, "matmul_flops": flops, "audio_seconds": audio.numel() / 16000}


def paired(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the speed ratio numerator / denominator (inputs are seconds)."""
    return statistics.median(d / n for n, d in zip(numerator, denominator))


def compile_times(models) -> dict:
    """arch -> compile time of the first HEAR call, cold (fresh process, empty cache) and warm (second
    process, same cache), from compile.py's child processes: CPU seconds (process + C++ compiler runs,
    load-independent) and wall seconds."""
    import compile as compile_benchmark

    settings = argparse.Namespace(clips=4, seconds=10.0, clock="cpu", static=False)
    out = {}
    for i, arch in enumerate(models):
        progress(i, len(models), f"compile {arch}, cold and warm")
        with tempfile.TemporaryDirectory(prefix="hear_msm-targets-") as cache:
            cold, warm = (compile_benchmark.child(arch, cache, settings, rounds=0) for _ in range(2))
        out[arch] = {"cold_cpu_s": cold["compile_cpu_s"], "warm_cpu_s": warm["compile_cpu_s"],
                     "cold_s": cold["compile_s"], "warm_s": warm["compile_s"], "warm_fx_hit": warm["fx_cache_hit"],
                     "warm_fx_miss": warm["fx_cache_miss"], "failure": cold["failure"] or warm["failure"]}
    return out


def from_file(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size (median reported)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", default="benchmarks/results/targets.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bf16 = cpu_has_native_bf16()
    runs = {batch: timed_rounds(batch, args.rounds, bf16) for batch in args.batch}
    compiles = compile_times(MODELS)
    progress(1, 1, "done")

    rows = []

    def add(target: str, setting: str, value: float | str, bar: float | None = None, note: str = ""):
        met = "" if bar is None or isinstance(value, str) else ("yes" if value >= bar else "no")
        rows.append({"target": target, "setting": setting, "measured": value, "met": met, "note": note})

    for batch, run in runs.items():
        s = run["seconds"]
        for arch, bar in (("axlstm_tiny", 0.75), ("ssam_tiny", 0.6)):
            add(f"{arch} >= {bar}x ssast_tiny", f"batch {batch}", paired(s[arch, "default"], s["ssast_tiny", "default"]),
                bar)
    for batch, run in runs.items():
        s = run["seconds"]
        matmul_rate = run["matmul_flops"] / min(s["matmul", ""])
        chunks = batch * 5  # 10 s clips: five 2 s chunks each
        model_flops = chunks * ssast_flops_per_chunk(hear_msm.create_model("ssast_tiny").config)
        for name in ("default", "compiled"):
            add("ssast_tiny HEAR extraction >= 75% of matmul rate", f"batch {batch}, {name}",
                model_flops / min(s["ssast_tiny", name]) / matmul_rate, 0.75,
                f"best rounds; matmul {matmul_rate / 1e9:.1f} GFLOP/s")
    for batch, run in runs.items():
        s = run["seconds"]
        for arch in MODELS:
            add("default HEAR path vs one chunk per call (>= 1)", f"{arch}, batch {batch}",
                paired(s[arch, "default"], s[arch, "hear1"]), 1.0)
            official = runs[1]["seconds"][arch, "official"] if 1 in runs else None
            if official is not None:
                # the official procedure is one clip per call: its time per clip scales with the batch
                per_clip = [t * batch for t in official] if batch > 1 else official
                value = paired(s[arch, "default"], per_clip) if batch == 1 else \
                    statistics.median(per_clip) / statistics.median(s[arch, "default"])
                add("default HEAR path vs official procedure (>= 1)", f"{arch}, batch {batch}", value, 1.0)
    for batch, run in runs.items():
        s = run["seconds"]
        for arch in MODELS:
            if bf16:
                add("bf16 throughput vs fp32", f"{arch}, batch {batch}", paired(s[arch, "bf16"], s[arch, "default"]))
            add("compile=True steady throughput vs eager", f"{arch}, batch {batch}",
                paired(s[arch, "compiled"], s[arch, "default"]))
    if not bf16:
        add("bf16 throughput vs fp32", "all", "not measured: this CPU has no native bfloat16 (refused)")
    for arch, times in compiles.items():
        add("compile=True compile time, cold / warm cache", arch,
            f"{times['cold_cpu_s']:.0f} / {times['warm_cpu_s']:.0f} CPU s ({times['cold_s']:.0f} / {times['warm_s']:.0f} s wall)",
            note=f"warm: {times['warm_fx_hit']} FX-graph cache hits, {times['warm_fx_miss']} misses"
                 + (f"; FAILED: {times['failure']}" if times["failure"] else ""))
    probe = from_file("bf16_linear_probe.json")
    if probe:
        for row in probe["summary"]:
            add("bf16 linear probe, fp32 -> bf16 (bf16_linear_probe.json)", f"{row['model']}, {row['task']}",
                f"{row['fp32_mean']:.3f} -> {row['bf16_mean']:.3f}",
                note=f"fp32 seed spread {row['fp32_seed_spread']:.3f}, largest paired difference "
                     f"{row['paired_max_abs_diff']:.3f}")
    workers = from_file("eval_workers_quiet.json")
    if workers:
        for row in workers["rows"]:
            add("eval.run, 3 models x 2 dev tasks (eval_workers_quiet.json)", f"--workers {row['workers']}",
                f"{row['wall_s']:.0f} s wall", note=f"{row['speedup']:.2f}x the one-worker run")

    print(table(rows, ["target", "setting", "measured", "met", "note"]))
    info = machine()
    print(f"CPU: {info.get('cpu_vendor')} {info.get('cpu_model')} (family {info.get('cpu_family')}), "
          f"flags {' '.join(info.get('cpu_flags', []))}; one thread, thread CPU time, medians of {args.rounds} "
          "interleaved rounds (ratios paired per round; FLOP rates from the best round)")
    write_json(args.out, {"rounds": args.rounds, "rows": rows, "compile": compiles,
                          "seconds": {str(batch): {" ".join(job): t for job, t in run["seconds"].items()}
                                      for batch, run in runs.items()}})


if __name__ == "__main__":
    main()
