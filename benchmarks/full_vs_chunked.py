#!/usr/bin/env python3
"""Scene embeddings of the full-sequence mode against the chunked mode on HEAR-format scene tasks.

For each task folder (e.g. the GM pitch / family development tasks of scripts/build_dev_tasks.py)
and each recurrent model, scene embeddings in three settings: `chunked` (2 s chunks, default),
`full` (one sequence, positions "auto") and `full-tile` (positions tiled every 2 s). A linear
probe (standardised features, logistic regression, C picked on the valid split) scores the test
split: top-1 accuracy (and chroma accuracy for pitch tasks). Without --weights the models are
randomly initialised (seed 0).

Clips of 1 s cannot tell the modes apart (SSAM is causal, so the first 2 s of a chunk are the
same sequence either way); `--concat K` makes K-times-longer clips by appending K - 1 other
clips of the same label from the same split (fixed seed), so chunked mode cuts them into chunks
and full mode reads them as one sequence.

    python benchmarks/full_vs_chunked.py --tasks dev_tasks/gm_pitch-v1-dev dev_tasks/gm_family-v1-dev
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import hear_msm
from hear_msm._hear import HearModel
from _util import progress, table, write_json

SETTINGS = {"chunked": {}, "full": {"sequence": "full"}, "full-tile": {"sequence": "full", "positions": "tile"}}


def load_split(task: Path, split: str, concat: int = 1):
    labels = json.loads((task / f"{split}.json").read_text())
    names = sorted(labels)
    audio = np.stack([sf.read(task / "16000" / split / name, dtype="float32")[0] for name in names])
    targets = [labels[n][0] for n in names]
    if concat > 1:
        rng = np.random.default_rng(0)
        same = {label: [i for i, t in enumerate(targets) if t == label] for label in set(targets)}
        audio = np.stack([np.concatenate([audio[i]] + [audio[j] for j in rng.choice(same[t], concat - 1)])
                          for i, t in enumerate(targets)])
    return torch.from_numpy(audio), targets


def probe(train, valid, test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0])
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train[0]), train[1])
        score = model.score(scaler.transform(valid[0]), valid[1])
        if best is None or score > best[0]:
            best = (score, model)
    return best[1].predict(scaler.transform(test[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--models", nargs="+", default=["ssam_tiny", "axlstm_tiny"])
    parser.add_argument("--weights", nargs="*", default=[], help="MODEL=SOURCE pairs")
    parser.add_argument("--concat", type=int, default=1, help="clips per example (see above)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results/full_vs_chunked.json")
    args = parser.parse_args()
    weights = dict(w.split("=", 1) for w in args.weights)
    rows, jobs = [], [(Path(t), m, s) for t in args.tasks for m in args.models for s in args.settings]
    data = {}
    for i, (task, arch, setting) in enumerate(jobs):
        progress(i, len(jobs), f"{task.name} {arch} {setting}")
        if task not in data:
            data[task] = {split: load_split(task, split, args.concat) for split in ("train", "valid", "test")}
        torch.manual_seed(0)
        encoder = hear_msm.create_model(arch, pretrained=weights.get(arch, False))
        runtime = HearModel(encoder, **SETTINGS[setting])
        embedded = {split: (runtime.scene_embeddings(audio).numpy(), labels) for split, (audio, labels) in data[task].items()}
        predicted = probe(embedded["train"], embedded["valid"], embedded["test"])
        truth = np.array(embedded["test"][1])
        row = {"task": task.name, "seconds": data[task]["test"][0].shape[1] / 16000, "model": arch, "setting": setting, "top1": float((predicted == truth).mean())}
        if "pitch" in task.name:
            row["chroma"] = float((predicted.astype(int) % 12 == truth.astype(int) % 12).mean())
        rows.append(row)
    progress(len(jobs), len(jobs), "done")
    print(table(rows, ["task", "seconds", "model", "setting", "top1", "chroma"]))
    write_json(args.out, {"weights": weights or "random init (seed 0)", "concat": args.concat, "rows": rows})


if __name__ == "__main__":
    main()
