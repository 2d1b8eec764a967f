#!/usr/bin/env python3
"""(a) HEAR embedding throughput of the models and (b) the official one-chunk procedure.

Throughput = seconds of audio embedded per wall-clock second ("x realtime"), for `--clips`
clips of `--seconds` seconds (default 10 s), random weights (speed does not depend on them):

  hear      our HEAR path: `timestamp_embeddings` on the whole batch, all 2 s chunks of all
            clips through the encoder together (max_batch_chunks=32), the default kernel.
  official  the authors' wrapper procedure, emulated with our encoder: one clip per call, one
            2 s chunk per forward, their chunking (always a padded tail chunk: 10 s -> 6 chunks)
            and frame layout (`layout="official", max_batch_chunks=1`).
  full      SSAM/AxLSTM only: `sequence="full"`, each clip one sequence.

Ratios are within one run and one thread setting: `vs_ssast_tiny` divides by ssast_tiny's hear
throughput at the same batch, `vs_official` divides hear by official.

    python benchmarks/throughput.py --threads 1 2 --batch 1 16 --out benchmarks/results/throughput.json
"""
from __future__ import annotations

import argparse

import torch

import hear_msm
from hear_msm._hear import HearModel
from _util import best_time, progress, table, write_json


def run(arch: str, mode: str, audio: torch.Tensor, repeats: int) -> float:
    torch.manual_seed(0)
    encoder = hear_msm.create_model(arch)
    if mode == "official":
        runtime = HearModel(encoder, layout="official", max_batch_chunks=1)
        call = lambda: [runtime.timestamp_embeddings(clip[None]) for clip in audio]
    else:
        runtime = HearModel(encoder, sequence="full" if mode == "full" else "chunked")
        call = lambda: runtime.timestamp_embeddings(audio)
    seconds = best_time(call, repeats=repeats)
    return audio.numel() / 16000 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=hear_msm.list_models())
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", default=["hear", "official", "full"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    jobs = [(t, b, arch, mode) for t in args.threads for b in args.batch for arch in args.models for mode in args.modes
            if not (mode == "full" and arch.startswith(("ssast", "mwmae", "mae")))
            and not (mode == "official" and (b > 1 and 1 in args.batch or arch.startswith("ssamba")))]
    rows = []
    for i, (threads, batch, arch, mode) in enumerate(jobs):
        progress(i, len(jobs), f"{threads}t b{batch} {arch} {mode}")
        torch.set_num_threads(threads)
        audio = 0.1 * torch.randn(batch, int(16000 * args.seconds), generator=gen)
        rows.append({"threads": threads, "batch": batch, "model": arch, "mode": mode,
                     "x_realtime": run(arch, mode, audio, args.repeats)})
    progress(len(jobs), len(jobs), "done")
    for row in rows:
        same = lambda **kw: next((r["x_realtime"] for r in rows if all(r[k] == v for k, v in
                                  {"threads": row["threads"], **kw}.items())), None)
        tiny = same(batch=row["batch"], model="ssast_tiny", mode="hear")
        official = same(model=row["model"], mode="official")
        row["vs_ssast_tiny"] = row["x_realtime"] / tiny if tiny else None
        if row["mode"] != "official" and official:
            row["vs_official"] = row["x_realtime"] / official
    print(table(rows, ["threads", "batch", "model", "mode", "x_realtime", "vs_ssast_tiny", "vs_official"]))
    write_json(args.out, {"seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
