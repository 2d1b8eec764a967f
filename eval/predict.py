"""Run heareval's predictions runner once per seed on one model's embeddings of one task.

    python -m eval.predict EMBED_TASK_DIR --out-dir DIR --seeds 42,43 [--grid faster] [--grid-points 1]

Each seed gets its own folder DIR/seed<k>/ holding relative symlinks to the embedding files
(heareval reads and writes everything in the folder it is given), heareval's outputs
(`test.predicted-scores.json`, `prediction-done.json`, `prediction.log`, ...) and our
`eval-settings.json`. A seed whose folder has `prediction-done.json` is skipped; a seed folder
left by an interrupted run is rebuilt. eval.run starts this in a subprocess per (model, task),
so heareval's imports (tensorflow, lightning) are paid once for all seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from hear_msm._files import write_text_atomic

from . import compat

SETTINGS = "eval-settings.json"
DONE = "prediction-done.json"
SCORES = "test.predicted-scores.json"
# files heareval's embeddings runner leaves in a task folder that predictions do not read
_NOT_LINKED = {".done.embeddings", "profile.embeddings.json"}


def seed_dir(out_dir: Path, seed: int) -> Path:
    return Path(out_dir) / f"seed{seed}"


def settings(seed: int, grid: str, grid_points: int) -> dict:
    return {"seed": seed, "grid": grid, "grid_points": grid_points}


def seed_done(out_dir: Path, seed: int, grid: str, grid_points: int) -> bool:
    """True if this seed finished with these settings; ValueError if it finished with others."""
    folder = seed_dir(out_dir, seed)
    if not (folder / DONE).is_file() or not (folder / SCORES).is_file():
        return False
    recorded = json.loads((folder / SETTINGS).read_text()) if (folder / SETTINGS).is_file() else None
    if recorded != settings(seed, grid, grid_points):
        raise ValueError(f"{folder} holds predictions made with {recorded}, not "
                         f"{settings(seed, grid, grid_points)}: use another --out or delete that folder")
    return True


def prepare(embed_dir: Path, folder: Path, seed: int, grid: str, grid_points: int) -> None:
    """A fresh seed folder whose files link to the embeddings (which are never modified)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for item in sorted(Path(embed_dir).iterdir()):
        if item.is_file() and item.name not in _NOT_LINKED:
            (folder / item.name).symlink_to(os.path.relpath(item.resolve(), folder.resolve()))
    write_text_atomic(folder / SETTINGS, json.dumps(settings(seed, grid, grid_points)))


def run_seed(embed_dir: Path, out_dir: Path, seed: int, grid: str, grid_points: int) -> Path:
    """heareval predictions for one seed; returns the seed folder."""
    import heareval.predictions.runner as runner

    folder = seed_dir(out_dir, seed)
    prepare(embed_dir, folder, seed, grid, grid_points)
    compat.use_seed(seed)
    with compat.predictions_workdir(folder) as relative:
        try:
            runner.runner.main(
                args=[relative, "--grid", grid, "--grid-points", str(grid_points), "--deterministic", "True"],
                standalone_mode=False,
            )
        finally:
            compat.reset_task_loggers()
    if not (folder / SCORES).is_file():
        raise RuntimeError(f"heareval finished without writing {folder / SCORES}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("embed_dir", type=Path, help="heareval embeddings folder of one task")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 42,43")
    parser.add_argument("--grid", default="default", choices=("default", "fast", "faster"))
    parser.add_argument("--grid-points", type=int, default=8)
    args = parser.parse_args(argv)
    if not (args.embed_dir / ".done.embeddings").is_file():
        parser.error(f"{args.embed_dir} has no finished embeddings (.done.embeddings)")
    compat.apply()
    for seed in (int(s) for s in args.seeds.split(",") if s):
        if seed_done(args.out_dir, seed, args.grid, args.grid_points):
            continue
        run_seed(args.embed_dir, args.out_dir, seed, args.grid, args.grid_points)
        print(f"seed {seed} done: {seed_dir(args.out_dir, seed) / SCORES}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
