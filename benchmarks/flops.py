#!/usr/bin/env python3
"""(d) Achieved FLOP rate of SSAST-tiny (the Transformer) against a plain matmul, same run.

For each thread count: the fp32 rate of a plain matmul of the shapes the model uses most
([tokens, 192] @ [192, 768]) and of a large square one; the rate of F.scaled_dot_product_attention
on SSAST-tiny's shapes; and SSAST-tiny's whole forward (batch of 2 s chunks, analytic FLOP count:
every Linear, the attention products and the patch projection; elementwise work not counted),
and the HEAR extraction (4 clips x 10 s, default batching) with the same count per 2 s chunk.
--compile adds both again with `compile=True` (torch.compile; compiled before timing).

    python benchmarks/flops.py --threads 1 2 --out benchmarks/results/flops.json
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

import hear_msm
from hear_msm._hear import HearModel
from _util import best_time as best_time_of, progress, table, write_json


def ssast_flops_per_chunk(config) -> float:
    tokens, dim, hidden = 1 + config.num_patches, config.embed_dim, int(config.embed_dim * 4)
    per_layer = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * 2 * tokens * tokens * dim
    return config.depth * per_layer + 2 * config.num_patches * config.patch_dim * dim


def measure(threads: int, chunks: int, compiled: bool = False, clock=time.perf_counter) -> list[dict]:
    torch.set_num_threads(threads)
    best_time = functools.partial(best_time_of, clock=clock)
    rows = []
    for m, k, n in [(chunks * 251, 192, 768), (1024, 1024, 1024)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = best_time(lambda: a @ b, repeats=5, min_seconds=0.5)
        rows.append({"what": f"matmul [{m},{k}]@[{k},{n}]", "gflops": 2 * m * k * n / seconds / 1e9})
    q, k, v = (torch.randn(chunks, 3, 251, 64) for _ in range(3))
    seconds = best_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats=5, min_seconds=0.5)
    rows.append({"what": "sdpa [B,3,251,64]", "gflops": 2 * 2 * chunks * 3 * 251 * 251 * 64 / seconds / 1e9})
    for use_compile in (False, True) if compiled else (False,):
        model = hear_msm.create_model("ssast_tiny", compile=use_compile).eval()
        name = "ssast_tiny compiled" if use_compile else "ssast_tiny"
        x = torch.randn(chunks, 1, 200, 80)
        with torch.no_grad():  # best_time's warm-up call compiles
            seconds = best_time(lambda: model.forward_features(x), repeats=3, min_seconds=1.0)
        flops = chunks * ssast_flops_per_chunk(model.config)
        rows.append({"what": f"{name} forward, {chunks} chunks", "gflops": flops / seconds / 1e9,
                     "x_realtime": 2.0 * chunks / seconds})
        # the HEAR extraction itself (default batching), 4 clips of 10 s = 20 chunks of 2 s
        runtime = HearModel(model)
        audio = 0.1 * torch.randn(4, 160000, generator=torch.Generator().manual_seed(0))
        seconds = best_time(lambda: runtime.timestamp_embeddings(audio), repeats=2)
        flops = 20 * ssast_flops_per_chunk(model.config)
        rows.append({"what": f"{name} HEAR extraction", "gflops": flops / seconds / 1e9, "x_realtime": 40.0 / seconds})
    reference = rows[0]["gflops"]
    for row in rows:
        row["threads"] = threads
        row["of_matmul"] = row["gflops"] / reference
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, default=16, help="2 s chunks per forward (batch)")
    parser.add_argument("--compile", action="store_true", help="also measure SSAST-tiny with compile=True")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or this thread's CPU time (one thread only; for a loaded machine)")
    parser.add_argument("--out", default="benchmarks/results/flops.json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for i, threads in enumerate(args.threads):
        progress(i, len(args.threads), f"{threads} thread(s)")
        rows += measure(threads, args.chunks, args.compile, clock)
    progress(len(args.threads), len(args.threads), "done")
    print(table(rows, ["threads", "what", "gflops", "of_matmul", "x_realtime"]))
    write_json(args.out, {"chunks": args.chunks, "clock": args.clock, "rows": rows})


if __name__ == "__main__":
    main()
