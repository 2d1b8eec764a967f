#!/usr/bin/env python3
"""How far precision="bf16" moves HEAR embeddings from fp32, on the real recordings in examples/.

Per model and clip: timestamp embeddings in fp32 and in bf16 (`HearModel`, default settings), and

  rel_l2       ||bf16 - fp32|| / ||fp32|| over all the clip's timestamp embeddings
  cosine_mean  mean over timestamps of cos(bf16_t, fp32_t); cosine_min its minimum (the table
               prints 1 - cosine, which is what differs from 1)
  scene_rel_l2 the same relative L2 for the scene embedding (mean over timestamps)

Weights: the shipped demo weights where a model has them (`<arch>.debian_cpu_demo`), else a
random initialisation (seed 0), which is marked in the table: trained weights can amplify
rounding differently.

    python benchmarks/bf16_drift.py --out benchmarks/results/bf16_drift.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import hear_msm
from hear_msm._hear import HearModel
from hear_msm._weights import weight_tags
from hear_msm.cli import read_audio_16k_mono
from _util import progress, table, write_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NINE = [f"{family}_{size}" for family in ("ssast", "ssam", "axlstm") for size in ("tiny", "small", "base")]


def build(arch: str, precision: str) -> tuple[HearModel, str]:
    if "debian_cpu_demo" in weight_tags(arch):
        return HearModel(hear_msm.create_model(f"{arch}.debian_cpu_demo", precision=precision)), "demo"
    torch.manual_seed(0)
    return HearModel(hear_msm.create_model(arch, precision=precision)), "random"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=NINE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/bf16_drift.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clips = {path.name: torch.from_numpy(read_audio_16k_mono(path)[0])[None]
             for path in sorted(EXAMPLES.glob("*.flac"))}
    rows = []
    for i, arch in enumerate(args.models):
        progress(i, len(args.models), arch)
        (fp32, weights), (bf16, _) = build(arch, "fp32"), build(arch, "bf16")
        for name, clip in clips.items():
            high, low = fp32.timestamp_embeddings(clip)[0][0].double(), bf16.timestamp_embeddings(clip)[0][0].double()
            cosine = F.cosine_similarity(low, high, dim=-1)
            scene_high, scene_low = high.mean(0), low.mean(0)
            rows.append({"model": arch, "weights": weights, "clip": name, "seconds": clip.shape[1] / 16000,
                         "rel_l2": ((low - high).norm() / high.norm()).item(),
                         "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
                         "scene_rel_l2": ((scene_low - scene_high).norm() / scene_high.norm()).item()})
    progress(1, 1, "done")
    shown = [{**row, "1-cosine_mean": 1 - row["cosine_mean"], "1-cosine_min": 1 - row["cosine_min"]} for row in rows]
    print(table(shown, ["model", "weights", "clip", "seconds", "rel_l2", "1-cosine_mean", "1-cosine_min",
                        "scene_rel_l2"]))
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
