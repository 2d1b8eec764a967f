#!/usr/bin/env python3
"""(d) Achieved FLOP rate of SSAST-tiny (the Transformer) against a plain matmul, same run.

For each thread count: the fp32 rate of a plain matmul of the shapes the model uses most
([tokens, 192] @ [192, 768], for the forward's batch -- the reference of `of_matmul` -- and for one
HEAR call of 4 chunks) and of a large square one; the rate of F.scaled_dot_product_attention
on SSAST-tiny's shapes; and SSAST-tiny's whole forward (batch of 2 s chunks, analytic FLOP count:
every Linear, the attention products and the patch projection; elementwise work not counted),
and the HEAR extraction (4 clips x 10 s, default batching) with the same count per 2 s chunk.

`--kernels reference auto` measures the model rows once per SSAST kernel (the plain PyTorch
block and the default CPU inference path, `hear_msm.models.transformer.resolve`; `compiled` is
`compile=True`, compiled in the warm-up call), so a change is
compared before/after in one run. Every measurement is timed once per round, the rounds
interleaved (order reversed every other round) so that a busy spell of a shared machine falls on
all of them; reported: the best round (noise only slows a run down), the ratio of medians
(`of_matmul_median`, steadier on a loaded machine) and, for the model rows, the median over
rounds of the ratio to the first kernel's time in the same round (`vs_first`).
`--clock cpu` times with the calling thread's CPU time (one thread only: then all compute runs on
it, and time the machine gives to other processes is not counted).

    python benchmarks/flops.py --threads 1 2 --out benchmarks/results/flops.json
    python benchmarks/flops.py --threads 1 --clock cpu --kernels reference auto --rounds 11
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import hear_msm
from hear_msm._hear import HearModel
from _util import CLOCKS, progress, table, write_json

def ssast_flops_per_chunk(config) -> float:
    tokens, dim, hidden = 1 + config.num_patches, config.embed_dim, int(config.embed_dim * 4)
    per_layer = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * 2 * tokens * tokens * dim
    return config.depth * per_layer + 2 * config.num_patches * config.patch_dim * dim


def repeated(function, times: int):
    """`function` called `times` times in a row (short kernels are timed over several calls)."""
    def run():
        for _ in range(times):
            function()
    return run


def jobs(chunks: int, kernels: list[str]) -> list[dict]:
    """What to time: label, function, FLOPs per call, seconds of audio per call (or None), kernel."""
    out = []
    # the reference first; then the shape of one HEAR call (4 chunks per call per thread) and a square one
    for m, k, n in [(chunks * 251, 192, 768), (4 * 251, 192, 768), (1024, 1024, 1024)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out.append({"what": f"matmul [{m},{k}]@[{k},{n}]", "run": repeated(lambda a=a, b=b: a @ b, 10),
                    "flops": 10 * 2 * m * k * n})
    q, k, v = (torch.randn(chunks, 3, 251, 64) for _ in range(3))
    out.append({"what": "sdpa [B,3,251,64]", "run": repeated(lambda: F.scaled_dot_product_attention(q, k, v), 10),
                "flops": 10 * 2 * 2 * chunks * 3 * 251 * 251 * 64})
    x = torch.randn(chunks, 1, 200, 80)
    audio = 0.1 * torch.randn(4, 160000, generator=torch.Generator().manual_seed(0))
    for kernel in kernels:
        torch.manual_seed(0)
        # "compiled": compile=True (torch.compile of the default block; compiled in the warm-up call)
        options = {"compile": True} if kernel == "compiled" else {"kernel": kernel}
        model = hear_msm.create_model("ssast_tiny", **options).eval()
        per_chunk = ssast_flops_per_chunk(model.config)
        out.append({"what": f"ssast_tiny forward, {chunks} chunks", "kernel": kernel, "flops": chunks * per_chunk,
                    "audio": 2.0 * chunks, "run": lambda model=model: model.forward_features(x)})
        # the HEAR extraction itself (default batching), 4 clips of 10 s = 20 chunks of 2 s
        runtime = HearModel(model)
        out.append({"what": "ssast_tiny HEAR extraction", "kernel": kernel, "flops": 20 * per_chunk,
                    "audio": 40.0, "run": lambda runtime=runtime: runtime.timestamp_embeddings(audio)})
    return out


def measure(threads: int, chunks: int, kernels: list[str], rounds: int, clock) -> list[dict]:
    torch.set_num_threads(threads)
    todo = jobs(chunks, kernels)
    seconds = [[] for _ in todo]
    with torch.no_grad():
        for job in todo:
            job["run"]()  # warm-up
        for r in range(rounds):
            order = list(enumerate(todo))
            for i, job in order if r % 2 == 0 else order[::-1]:
                progress(r, rounds, f"{threads}t round {r + 1}: {job['what']}")
                start = clock()
                job["run"]()
                seconds[i].append(clock() - start)
    reference = 0
    rows = []
    for job, times in zip(todo, seconds):
        best = min(times)
        row = {"threads": threads, "what": job["what"], "kernel": job.get("kernel", ""),
               "gflops": job["flops"] / best / 1e9, "gflops_median": job["flops"] / statistics.median(times) / 1e9,
               "seconds": times}
        if "audio" in job:
            row["x_realtime"] = job["audio"] / best
            first = next(i for i, other in enumerate(todo) if other["what"] == job["what"])
            row["vs_first"] = statistics.median(a / b for a, b in zip(seconds[first], times))
        rows.append(row)
    for row in rows:
        row["of_matmul"] = row["gflops"] / rows[reference]["gflops"]
        row["of_matmul_median"] = row["gflops_median"] / rows[reference]["gflops_median"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, default=16, help="2 s chunks per forward (batch)")
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="SSAST kernels to measure (interleaved): auto, onednn, reference, "
                        "or compiled (compile=True)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best reported)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time, or this thread's CPU time")
    parser.add_argument("--out", default="benchmarks/results/flops.json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    rows = []
    for threads in args.threads:
        rows += measure(threads, args.chunks, args.kernels, args.rounds, CLOCKS[args.clock])
    progress(1, 1, "done")
    print(table(rows, ["threads", "what", "kernel", "gflops", "of_matmul", "of_matmul_median", "x_realtime",
                       "vs_first"]))
    print(f"clock: {args.clock}; best of {args.rounds} interleaved rounds (of_matmul_median: medians); vs_first: "
          f"median over rounds of the speed ratio to kernel {args.kernels[0]!r} in the same round")
    write_json(args.out, {"chunks": args.chunks, "clock": args.clock, "rounds": args.rounds,
                          "kernels": args.kernels, "rows": rows})


if __name__ == "__main__":
    main()
