"""Small compatibility layer that runs the stock heareval 2021.1.3 on today's stack.

heareval 2021.1.3 was written for torch 1.x and pytorch-lightning 1.4/1.5. On torch >= 2.6 with
pytorch-lightning 1.9.5 its predictions runner breaks in three known places, and it cannot run
several seeds. Nothing here copies heareval code: each fix changes the environment heareval runs
in, and names the heareval line it works around (heareval/predictions/task_predictions.py).

1. `torch.load` defaults to weights_only=True since torch 2.6. heareval line 1050
   (`torch.load(checkpoint_callback.best_model_path)["epoch"]`) and Lightning's
   `trainer.test(ckpt_path=...)` (heareval line 1105) read checkpoints whose hyperparameters hold
   torch classes and functions (BatchNorm1d, xavier_uniform_), which weights-only unpickling
   rejects. `allow_full_checkpoint_load` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: these are
   checkpoints the same process has just written, never downloaded files.
2. heareval line 1102 (`trainer.fit_loop.current_epoch = grid_point.epoch`) relies on a setter
   that pytorch-lightning removed; on 1.9.5 the assignment silently creates an unused attribute,
   so event tasks pick their post-processing for the wrong epoch. `restore_fit_loop_epoch_setter`
   puts the property back, writing the value where 1.9.5 keeps the epoch.
3. heareval line 1009 (`CSVLogger(Path("logs").joinpath(embedding_path))`) writes Lightning logs
   and every grid point's checkpoint under ./logs of the current directory. `predictions_workdir`
   runs it in a temporary directory, with the embeddings reached through a relative symlink so
   that the logs (and checkpoints, ~16 MB per grid point) land in that temporary directory.
4. Seeds: heareval line 1294 (`seed_everything(42, workers=False)`) fixes the seed, which also
   fixes the shuffled order of grid points (line 1341). The papers report 10 seeds, so
   `use_seed` makes that call seed with the seed we ask for (42 stays 42: seed 42 reproduces
   stock heareval exactly).
5. heareval/predictions/runner.py line 32 adds log handlers to the logger named after the task
   for every (task, log path); running several seeds in one process would then write each
   seed's log into all earlier seeds' prediction.log. `reset_task_loggers` clears them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator


def allow_full_checkpoint_load() -> None:
    """Fix 1: let torch.load read Lightning checkpoints written by this process (torch >= 2.6)."""
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"


def restore_fit_loop_epoch_setter() -> None:
    """Fix 2: `FitLoop.current_epoch` as a read/write property (pytorch-lightning 1.9.x)."""
    from pytorch_lightning.loops.fit_loop import FitLoop

    if isinstance(getattr(FitLoop, "current_epoch", None), property) and FitLoop.current_epoch.fset:
        return

    def get_epoch(loop) -> int:
        return loop.epoch_progress.current.completed

    def set_epoch(loop, value: int) -> None:
        # Trainer.current_epoch (and LightningModule.current_epoch) read this counter in 1.9.5
        loop.epoch_progress.current.completed = value

    FitLoop.current_epoch = property(get_epoch, set_epoch)


@contextlib.contextmanager
def predictions_workdir(embedding_path: Path) -> Iterator[str]:
    """Fix 3: chdir into a temporary directory; yield the relative path to pass to heareval."""
    embedding_path = Path(embedding_path).resolve()
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="heareval-") as tmp:
        link = Path(tmp) / "task"
        link.symlink_to(embedding_path, target_is_directory=True)
        os.chdir(tmp)
        try:
            yield "task"
        finally:
            os.chdir(previous)


def use_seed(seed: int) -> None:
    """Fix 4: make heareval's hard-coded `seed_everything(42, ...)` seed with `seed`."""
    import heareval.predictions.task_predictions as task_predictions
    from pytorch_lightning import seed_everything

    def seeded(_ignored_seed=None, workers: bool = False):
        return seed_everything(seed, workers=workers)

    task_predictions.seed_everything = seeded


def reset_task_loggers() -> None:
    """Fix 5: forget heareval's cached per-task loggers and their handlers."""
    import heareval.predictions.runner as runner

    for (task_name, _), logger in list(runner._task_path_to_logger.items()):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    runner._task_path_to_logger.clear()


def apply() -> None:
    """Fixes 1 and 2, which are process-wide; call before running heareval's predictions."""
    allow_full_checkpoint_load()
    restore_fit_loop_epoch_setter()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
