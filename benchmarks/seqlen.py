#!/usr/bin/env python3
"""(c) Time and peak memory of ONE forward against sequence length, the whole audio as one sequence.

For each family (tiny models, random weights) and each length from 2 s to 10 min, one clip's
log-mel goes through the encoder as a single token sequence (5 tokens per 40 ms + CLS):
SSAM and AxLSTM through `SpectrogramEncoder.forward_sequence` (HEAR full-sequence mode: segments of 8192
tokens with carried state), SSAST through its blocks on the whole sequence (attention over all
tokens, positions extended analytically) until a length's predicted time exceeds --max-seconds.
Each point runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to that forward alone;
`peak_mb` is the peak minus the RSS after loading the model and making the input.

    python benchmarks/seqlen.py --threads 1 --out benchmarks/results/seqlen.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

LENGTHS = [2, 10, 30, 60, 120, 300, 600]
MODELS = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]


def one_point(arch: str, seconds: float, threads: int) -> dict:
    import hear_msm
    from _util import peak_rss_mb

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = hear_msm.create_model(arch).eval()
    frames = int(seconds * 100) // 4 * 4
    spectrogram = torch.randn(1, 1, frames, 80)
    base = peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        if arch.startswith("ssast"):
            patches = encoder.patch_embed(spectrogram)
            table = encoder.position_table(frames // 4, "extend")  # SSAST: whole table (small next to attention)
            x = torch.cat([encoder.cls_token + table[:1], patches + table[1:]], dim=1)
            for block in encoder.blocks:
                x = block(x)
            tokens = encoder.encoder_norm(x)[:, 1:]
        else:
            tokens = encoder.forward_sequence(spectrogram)
    elapsed = time.perf_counter() - start
    return {"model": arch, "seconds_audio": seconds, "tokens": tokens.shape[1] + 1, "time_s": elapsed,
            "peak_mb": peak_rss_mb() - base, "threads": threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--lengths", type=float, nargs="+", default=LENGTHS, help="seconds of audio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="skip points predicted to take longer")
    parser.add_argument("--out", default="benchmarks/results/seqlen.json")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_point(args.one[0], float(args.one[1]), args.threads)))
        return
    from _util import points_in_fresh_processes, table, write_json

    jobs = [(m, s) for m in args.models for s in args.lengths]
    rows = points_in_fresh_processes(__file__, jobs, "seconds_audio", ["--threads", str(args.threads)], args.max_seconds)
    for row in rows:
        one_minute = next((r for r in rows if r["model"] == row["model"] and r["seconds_audio"] == 60 and r.get("time_s")), None)
        if one_minute and row.get("time_s"):
            row["time_vs_1min"] = row["time_s"] / one_minute["time_s"]
            row["mem_vs_1min"] = row["peak_mb"] / max(one_minute["peak_mb"], 1e-9)
            row["x_realtime"] = row["seconds_audio"] / row["time_s"]
    print(table(rows, ["model", "seconds_audio", "tokens", "time_s", "x_realtime", "peak_mb", "time_vs_1min",
                       "mem_vs_1min", "note"]))
    write_json(args.out, {"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
