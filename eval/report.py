"""Collect heareval scores into results.csv, results.md (mean ± 95% t-interval) and results.png.

    python -m eval.report OUT        # rebuild the tables from OUT/predictions without running anything

Scores are heareval's test scores of the task's main metric (tasks.PAPER_TASKS; the first
`evaluation` entry for other tasks), averaged over folds for k-fold tasks, in percent in the
tables. The interval is the 95% Student-t interval of the mean over seeds,
mean ± t(0.975, n-1) · sd / sqrt(n). Columns: the papers' ten tasks in their order and
abbreviations (only those that were run), then other tasks, then
  Overall  the mean over the model's tasks, with a t-interval over seeds of the per-seed mean
           (shown only for models that have every task of the table),
  s(m)     the papers' normalised score when two or more models are compared:
           100 · mean over tasks of (x − min) / (max − min), min and max over the table's models.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hear_msm._files import atomic_write, write_bytes_atomic, write_text_atomic

from .predict import SCORES
from .tasks import BY_FOLDER, order_key

CSV_FIELDS = ("model", "task", "seed", "metric", "score")


def read_scores(scores_file: Path, metric: str) -> float:
    """The test score of `metric` from heareval's test.predicted-scores.json (mean over folds)."""
    results = json.loads(Path(scores_file).read_text())
    values = [fold[f"test_{metric}"] for name, fold in results.items()
              if isinstance(fold, dict) and f"test_{metric}" in fold and name != "aggregated_scores"]
    if not values:
        raise ValueError(f"{scores_file} has no test_{metric} score")
    return float(np.mean(values))


def collect(predictions_dir: Path, metrics: dict[str, str] | None = None) -> list[dict]:
    """Rows (model, task, seed, metric, score) for every finished seed under predictions_dir.

    Layout: predictions_dir/<model>/<task>/seed<k>/test.predicted-scores.json. metrics maps a
    task folder to its metric; by default the paper metric or the task's first evaluation.
    """
    rows = []
    for scores_file in sorted(Path(predictions_dir).glob(f"*/*/seed*/{SCORES}")):
        seed_folder = scores_file.parent
        task, model = seed_folder.parent.name, seed_folder.parent.parent.name
        metric = (metrics or {}).get(task) or _default_metric(seed_folder, task)
        rows.append({"model": model, "task": task, "seed": int(seed_folder.name[4:]),
                     "metric": metric, "score": read_scores(scores_file, metric)})
    return rows


def _default_metric(seed_folder: Path, task: str) -> str:
    if task in BY_FOLDER:
        return BY_FOLDER[task].metric
    return json.loads((seed_folder / "task_metadata.json").read_text())["evaluation"][0]


def t_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, float(half)


def _fmt(mean: float, half: float) -> str:
    text = f"{100 * mean:.1f}"
    return text if math.isnan(half) else f"{text} ± {100 * half:.1f}"


def summarise(rows: list[dict], models: list[str] | None = None) -> dict:
    """Per (model, task) mean and interval, plus overall and s(m); the basis of table and plot."""
    by_cell: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        by_cell[(row["model"], row["task"])][row["seed"]] = row["score"]
    models = models or sorted({row["model"] for row in rows})
    models = [m for m in models if any(key[0] == m for key in by_cell)]
    tasks = sorted({row["task"] for row in rows}, key=order_key)
    cells = {key: t_interval(list(seeds.values())) for key, seeds in by_cell.items()}
    overall = {}
    for model in models:
        if all((model, task) in by_cell for task in tasks):
            seed_sets = [set(by_cell[(model, task)]) for task in tasks]
            common = sorted(set.intersection(*seed_sets))
            if common and all(len(s) == len(common) for s in seed_sets):
                per_seed = [np.mean([by_cell[(model, task)][seed] for task in tasks]) for seed in common]
                overall[model] = t_interval(per_seed)
            else:
                overall[model] = (float(np.mean([cells[(model, task)][0] for task in tasks])), math.nan)
    normalised = {}
    if len(models) >= 2:
        for model in overall:
            parts = []
            for task in tasks:
                column = [cells[(m, task)][0] for m in models if (m, task) in cells]
                low, high = min(column), max(column)
                parts.append(0.5 if high == low else (cells[(model, task)][0] - low) / (high - low))
            normalised[model] = 100 * float(np.mean(parts))
    metrics = {row["task"]: row["metric"] for row in rows}
    return {"models": models, "tasks": tasks, "cells": cells, "overall": overall, "normalised": normalised,
            "seeds": {key: len(v) for key, v in by_cell.items()}, "metrics": metrics,
            "scores": {key: list(v.values()) for key, v in by_cell.items()}}


def markdown(summary: dict) -> str:
    tasks, models = summary["tasks"], summary["models"]
    heads = [BY_FOLDER[t].abbr if t in BY_FOLDER else t for t in tasks] + ["Overall"]
    if summary["normalised"]:
        heads.append("s(m)")
    lines = ["| Model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for model in models:
        cells = [_fmt(*summary["cells"][(model, t)]) if (model, t) in summary["cells"] else "–" for t in tasks]
        cells.append(_fmt(*summary["overall"][model]) if model in summary["overall"] else "–")
        if summary["normalised"]:
            value = summary["normalised"].get(model)
            cells.append("–" if value is None else f"{value:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    seeds = sorted(set(summary["seeds"].values()))
    legend = [
        "",
        f"Test scores in %, mean ± 95% t-interval over {'/'.join(map(str, seeds))} seed(s) of heareval's "
        "MLP probe on frozen embeddings.",
        "Tasks and metrics: " + ", ".join(
            f"{BY_FOLDER[t].abbr} = {t} ({summary['metrics'][t]})" if t in BY_FOLDER else f"{t} ({summary['metrics'][t]})"
            for t in tasks) + ".",
        "Overall: mean over the tasks of the table (interval over seeds of the per-seed mean). "
        "s(m): 100 × mean over tasks of (score − min) / (max − min) across the models shown.",
    ]
    return "\n".join(lines + legend) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, models = summary["tasks"], summary["models"]
    labels = [BY_FOLDER[t].abbr if t in BY_FOLDER else t for t in tasks] + ["Overall"]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(models)) ** 0.5 + 2), 4.2))
    x = np.arange(len(labels))
    for i, model in enumerate(models):
        values = [summary["cells"].get((model, t), (math.nan, math.nan)) for t in tasks]
        values.append(summary["overall"].get(model, (math.nan, math.nan)))
        means = np.array([100 * v[0] for v in values])
        errors = np.array([0.0 if math.isnan(v[1]) else 100 * v[1] for v in values])
        centre = x - 0.4 + width * (i + 0.5)
        ax.bar(centre, means, width, yerr=errors, capsize=2, label=model, alpha=0.85)
        for j, task in enumerate(tasks):  # the individual seeds
            points = 100 * np.asarray(summary["scores"].get((model, task), []))
            ax.scatter(np.full(len(points), centre[j]), points, s=6, color="black", zorder=3,
                       edgecolors="none", alpha=0.6)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0)
    ax.set_ylabel("test score (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(4, len(models)))
    ax.set_title("HEAR tasks: mean ± 95% t-interval over seeds")
    fig.tight_layout()
    try:
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png", dpi=130)
    finally:
        plt.close(fig)


def write(out: Path, rows: list[dict], models: list[str] | None = None) -> dict:
    """Write OUT/results.csv, results.md, results.png; return the summary."""
    out = Path(out)
    rows = sorted(rows, key=lambda r: ((models or []).index(r["model"]) if r["model"] in (models or []) else 0,
                                       r["model"], order_key(r["task"]), r["seed"]))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows({**row, "score": f"{row['score']:.6f}"} for row in rows)
    write_bytes_atomic(out / "results.csv", table.getvalue().encode("utf-8"))
    summary = summarise(rows, models)
    write_text_atomic(out / "results.md", markdown(summary))
    if rows:
        plot(summary, out / "results.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    rows = collect(out / "predictions")
    write(out, rows)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
