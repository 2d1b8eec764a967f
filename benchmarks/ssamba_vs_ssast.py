#!/usr/bin/env python3
"""SSAMBA's own speed claim, measured on CPU: time and peak memory of one forward, ssamba_tiny vs ssast_tiny.

Shams et al. report SSAMBA-tiny ~92.7% faster and ~95.4% more memory-efficient than SSAST-tiny
at ~22k input tokens (GPU, batch 2, fp32, random 128-bin inputs). This repeats their setup on the
CPU: batch 2, fp32, random normalised 128-bin fbank of T frames, 16 x 16 patches (8 x T/16 tokens)
for both models, random weights, each model built for exactly that input size (SSAST-tiny with its
ViT blocks on the same 16 x 16 patch grid, as the SSAMBA paper compares them). Each point runs in
a fresh subprocess, so `peak_mb` (peak RSS minus the RSS after building the model and the input)
belongs to that forward alone. Points whose time, extrapolated from the previous one (quadratic for
attention, linear for Mamba), exceeds --max-seconds are skipped and say so.

    python benchmarks/ssamba_vs_ssast.py --threads 1 --out benchmarks/results/ssamba_vs_ssast.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 22528]
MODELS = ["ssast_tiny", "ssamba_tiny"]


def one_point(arch: str, tokens: int, threads: int, batch: int) -> dict:
    from _util import peak_rss_mb

    from hear_msm.models.registry import model_builder  # presets take geometry overrides

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frames = tokens // 8 * 16  # 8 frequency rows of 16 x 16 patches
    geometry = {"num_frames": frames, "num_mels": 128, "patch_frames": 16, "patch_mels": 16}
    if arch.startswith("ssamba"):
        model = model_builder(arch)(num_frames=frames).eval()
    else:  # the same patch grid for the ViT, its positions a fixed table of that size
        model = model_builder(arch)(**geometry).eval()
    spectrogram = torch.randn(batch, 1, frames, 128)
    base = peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.forward_features(spectrogram)
    elapsed = time.perf_counter() - start
    return {"model": arch, "tokens": out.shape[1], "frames": frames, "batch": batch, "time_s": elapsed,
            "peak_mb": peak_rss_mb() - base, "threads": threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="patch tokens per clip (multiples of 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="skip points predicted to take longer")
    parser.add_argument("--out", default="benchmarks/results/ssamba_vs_ssast.json")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_point(args.one[0], int(args.one[1]), args.threads, args.batch)))
        return
    from _util import points_in_fresh_processes, table, write_json

    jobs = [(m, t) for m in args.models for t in args.tokens]
    rows = points_in_fresh_processes(__file__, jobs, "tokens", ["--threads", str(args.threads), "--batch",
                                                               str(args.batch)], args.max_seconds)
    ratios = []
    for tokens in args.tokens:
        pair = {r["model"]: r for r in rows if r["tokens"] == tokens and r.get("time_s")}
        if len(pair) == 2:
            ssast, ssamba = pair[MODELS[0]], pair[MODELS[1]]
            ratios.append({"tokens": tokens, "ssamba_time_vs_ssast": ssamba["time_s"] / ssast["time_s"],
                           "ssamba_faster_pct": 100 * (1 - ssamba["time_s"] / ssast["time_s"]),
                           "ssamba_memory_vs_ssast": ssamba["peak_mb"] / max(ssast["peak_mb"], 1e-9),
                           "ssamba_less_memory_pct": 100 * (1 - ssamba["peak_mb"] / max(ssast["peak_mb"], 1e-9))})
    print(table(rows, ["model", "tokens", "frames", "time_s", "peak_mb", "note"]))
    print(table(ratios, ["tokens", "ssamba_time_vs_ssast", "ssamba_faster_pct", "ssamba_memory_vs_ssast",
                         "ssamba_less_memory_pct"]))
    write_json(args.out, {"threads": args.threads, "batch": args.batch, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
