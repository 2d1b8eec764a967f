#!/usr/bin/env python3
"""Linear probes on the GM development tasks: did pretraining teach the encoders anything?

    python scripts/build_dev_tasks.py --out dev_tasks
    python scripts/probe_dev_tasks.py --tasks dev_tasks --models ssast_tiny ssam_tiny axlstm_tiny \
        --out probe.json [--cache emb_cache]

For every model and weight choice (`shipped` = the shipped CPU demo tag `<arch>.debian_cpu_demo`,
`random` = the same architecture freshly initialised with --seed, or any weight source) the HEAR
scene embeddings of every clip are computed, a logistic regression (standardised features,
scikit-learn, L2, C=1) is fitted on the `train` split (one soundfont) and scored on `valid` and
`test` (two other soundfonts). A log-mel baseline (per-band mean and std over time of the
un-normalised 80-band log-mel, 160 values) is probed the same way. Prints a table and writes JSON.
Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def read_split(task: Path, split: str) -> tuple[list[Path], list[str]]:
    labels = json.loads((task / f"{split}.json").read_text())
    files = sorted(labels)
    return [task / "16000" / split / f for f in files], [labels[f][0] for f in files]


def load_audio(paths: list[Path]) -> torch.Tensor:
    clips = [sf.read(str(p), dtype="float32")[0] for p in paths]
    return torch.from_numpy(np.stack(clips))


def logmel_stats(audio: torch.Tensor) -> np.ndarray:
    """[n, samples] -> [n, 160]: per-band mean and std over time of log(mel + eps), not normalised."""
    from hear_msm._frontend import LogMelFrontend

    frontend = LogMelFrontend()
    logmel = torch.log(frontend.melspec(audio) + 1.1920929e-07)  # [n, 80, frames]
    return torch.cat([logmel.mean(-1), logmel.std(-1)], dim=1).numpy()


def hear_model(arch: str, weights: str, seed: int):
    import hear_msm
    from hear_msm._hear import HearModel

    if weights == "random":
        torch.manual_seed(seed)
        return HearModel(hear_msm.create_model(arch), weights=f"random init (seed {seed})")
    module = __import__(f"hear_msm.{arch}", fromlist=["load_model"])
    return module.load_model(f"{arch}.debian_cpu_demo" if weights == "shipped" else weights)


def embed(name: str, make, audio: dict[str, torch.Tensor], cache: Path | None) -> dict[str, np.ndarray]:
    """Scene embeddings per split, cached as cache/<name>.npz."""
    path = cache / f"{name}.npz" if cache else None
    if path and path.is_file():
        return dict(np.load(path))
    model = make()
    start = time.perf_counter()
    out = {split: (model.scene_embeddings(x).numpy() if hasattr(model, "scene_embeddings") else model(x))
           for split, x in audio.items()}
    print(f"  {name}: embedded in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def probe(features: dict[str, np.ndarray], labels: dict[str, list[str]],
          c_grid: tuple[float, ...] = (1.0,)) -> dict[str, float]:
    """Fit on train for every C of `c_grid`, keep the C with the best valid accuracy, score test.

    With a grid, `valid` is the selected (optimistic) score and `test` the honest one."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in c_grid:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        classifier.fit(features["train"], labels["train"])
        valid = float(classifier.score(features["valid"], labels["valid"]))
        if best is None or valid > best[0]:
            best = (valid, c, classifier)
    valid, c, classifier = best
    return {"valid": valid, "test": float(classifier.score(features["test"], labels["test"])), "C": c}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, type=Path, help="folder from scripts/build_dev_tasks.py")
    parser.add_argument("--task-names", nargs="+", default=["gm_pitch-v1-dev", "gm_family-v1-dev"])
    parser.add_argument("--models", nargs="+", default=["ssast_tiny", "ssam_tiny", "axlstm_tiny"])
    parser.add_argument("--weights", nargs="+", default=["shipped", "random"],
                        help="shipped | random | any weight source (applied to every model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init models")
    parser.add_argument("--cache", type=Path, help="cache embeddings here (reruns skip finished models)")
    parser.add_argument("--c-grid", type=float, nargs="+", default=[1.0],
                        help="inverse L2 strengths tried; the best on valid is scored on test (default: C=1 only)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results = []
    for task_name in args.task_names:
        task = args.tasks / task_name
        audio, labels = {}, {}
        for split in ("train", "valid", "test"):
            paths, labels[split] = read_split(task, split)
            audio[split] = load_audio(paths)
        print(f"{task_name}: " + ", ".join(f"{s} {len(v)}" for s, v in labels.items()), file=sys.stderr)
        runs = [("logmel_mean_std", "-", lambda: logmel_stats)]
        for arch in args.models:
            for weights in args.weights:
                runs.append((arch, weights, lambda a=arch, w=weights: hear_model(a, w, args.seed)))
        for arch, weights, make in runs:
            label = arch if weights == "-" else f"{arch}.{Path(weights).name or weights}"
            if weights == "random" and args.seed != 0:
                label += f"{args.seed}"
            features = embed(f"{task_name}__{label}", make, audio, args.cache)
            scores = probe(features, labels, tuple(args.c_grid))
            results.append({"task": task_name, "model": arch, "weights": weights,
                            "seed": args.seed if weights == "random" else None, **scores,
                            **{f"n_{split}": len(labels[split]) for split in ("train", "valid", "test")},
                            "dim": int(features["train"].shape[1])})
            print(f"  {label:<28} valid {scores['valid']:.3f}  test {scores['test']:.3f}  (C={scores['C']:g})",
                  file=sys.stderr, flush=True)

    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'task':<18} {'model':<16} {'weights':<10} {'valid':>6} {'test':>6}")
    for r in results:
        print(f"{r['task']:<18} {r['model']:<16} {str(r['weights'])[:10]:<10} {r['valid']:6.3f} {r['test']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
