#!/usr/bin/env python3
"""Total time of `python -m eval.run` at several --workers values, each into a fresh OUT.

    python benchmarks/eval_workers.py --tasks-dir /work/dev_tasks [--workers 1,2] [--rounds 1] \\
        [--models ssast_tiny,ssam_tiny,axlstm_tiny] [--weights-tag debian_cpu_demo] [--seeds 1] \\
        [--clips-per-split N] [--omp-threads N]

Every run does the same (model, task) jobs: embeddings of every task for every model, then `--seeds`
seeds of heareval's `faster` grid at one grid point. OMP_NUM_THREADS is removed from the runs'
environment so that eval.run splits this process's cores between the workers (its default;
--omp-threads N sets it instead). Rounds are interleaved (1, 2, 1, 2, ...). Reported per run: wall time, CPU time of all its processes
(user + system, from getrusage of the waited-for children, so it counts every subprocess), the
thread split eval.run chose, and the 1-minute load average before and after: on a shared machine
the wall-time gain of a second worker is bounded by the cores the other tenants leave free.
--clips-per-split N runs on a copy of every task holding N clips per split, every k-th one (the audio
linked, not copied), to fit a loaded machine's time. Writes benchmarks/results/eval_workers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import table, write_json

REPO = Path(__file__).resolve().parent.parent


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def subset_tasks(tasks_dir: Path, clips: int, root: Path) -> Path:
    """A copy of every task folder in tasks_dir with `clips` clips per split (every k-th), audio linked."""
    for task in sorted(p for p in tasks_dir.iterdir() if (p / "task_metadata.json").is_file()):
        target = root / task.name
        target.mkdir(parents=True)
        metadata = json.loads((task / "task_metadata.json").read_text())
        for name in ("task_metadata.json", "labelvocabulary.csv"):
            (target / name).write_bytes((task / name).read_bytes())
        for split in metadata["splits"]:
            labels = json.loads((task / f"{split}.json").read_text())
            step = max(1, len(labels) // clips)
            kept = dict(list(labels.items())[::step][:clips])
            (target / f"{split}.json").write_text(json.dumps(kept))
            (target / "16000" / split).mkdir(parents=True)
            for file in kept:
                (target / "16000" / split / file).symlink_to((task / "16000" / split / file).resolve())
    return root


def warm_up(models: list[str], tag: str) -> None:
    """Resolve the weights and build the CPU kernels once, so that no timed run pays for either."""
    code = ("import importlib, sys, torch\n"
            "for arch in sys.argv[2:]:\n"
            "    module = importlib.import_module('hear_msm.' + arch)\n"
            "    model = module.load_model(f'{arch}.{sys.argv[1]}') if sys.argv[1] else module.load_model()\n"
            "    module.get_scene_embeddings(torch.zeros(1, 16000), model)\n")
    subprocess.run([sys.executable, "-c", code, tag, *models], cwd=REPO, check=True)


def run_once(args, workers: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "eval.run", "--models", args.models, "--tasks-dir", str(args.tasks_dir),
           "--out", str(out), "--seeds", str(args.seeds), "--grid", "faster", "--grid-points", "1",
           "--workers", str(workers)]
    if args.weights_tag:
        for arch in args.models.split(","):
            cmd += ["--weights", f"{arch}={arch}.{args.weights_tag}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    load_before = os.getloadavg()[0]
    cpu_before, start = children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_before
    if proc.returncode:
        raise SystemExit(f"eval.run --workers {workers} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    threads = re.search(r"OMP_NUM_THREADS (\S+) \(", proc.stderr).group(1)
    jobs = len(list((out / "embeddings").rglob(".done.embeddings")))
    return {"workers": workers, "threads_per_worker": threads, "jobs": jobs, "wall_s": wall, "cpu_s": cpu,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks-dir", type=Path, required=True)
    parser.add_argument("--models", default="ssast_tiny,ssam_tiny,axlstm_tiny")
    parser.add_argument("--weights-tag", default="debian_cpu_demo", help="weight tag of every model ('' = default)")
    parser.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--omp-threads", type=int, default=0,
                        help="OMP_NUM_THREADS of every job (0: eval.run splits the cores between the workers)")
    parser.add_argument("--clips-per-split", type=int, default=0, help="run on N clips per split (0: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_workers.json")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    warm_up(args.models.split(","), args.weights_tag)
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_workers-") as tmp:
        source = args.tasks_dir
        if args.clips_per_split:
            args.tasks_dir = subset_tasks(args.tasks_dir, args.clips_per_split, Path(tmp) / "tasks")
        for round_ in range(args.rounds):
            for workers in counts:
                print(f"round {round_ + 1}/{args.rounds}: --workers {workers}", file=sys.stderr, flush=True)
                rows.append({"round": round_ + 1, **run_once(args, workers, Path(tmp) / f"r{round_}w{workers}")})
                print(table(rows[-1:], list(rows[-1])), file=sys.stderr, flush=True)
    for row in rows:
        base = next(r for r in rows if r["round"] == row["round"] and r["workers"] == counts[0])
        row["speedup"] = base["wall_s"] / row["wall_s"]
    columns = ["round", "workers", "threads_per_worker", "jobs", "wall_s", "cpu_s", "speedup", "load_before",
               "load_after"]
    print(table(rows, columns))
    write_json(args.out, {"models": args.models, "tasks_dir": str(source), "seeds": args.seeds,
                          "clips_per_split": args.clips_per_split or "all",
                          "omp_threads": args.omp_threads or "split by eval.run",
                          "grid": "faster, 1 grid point", "weights_tag": args.weights_tag, "rows": rows})


if __name__ == "__main__":
    main()
