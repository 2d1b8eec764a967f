"""Evaluate HEAR embedding models on HEAR tasks with the stock heareval, over several seeds.

    python -m eval.run --models ssam_tiny,axlstm_tiny,hearbaseline.torchcrepe \\
        --tasks-dir TASKS --out OUT [--seeds 10] [--grid default|fast|faster] [--grid-points N] \\
        [--tasks E50,nsynth_pitch-v2.2.3-5h,...] [--weights ssam_tiny=PATH_OR_SOURCE ...] \\
        [--layout time|official] [--precision fp32|bf16] [--compile]

Per model and task: heareval's embeddings runner once (a subprocess:
`python -m heareval.embeddings.runner`), then heareval's predictions runner once per seed
(eval.predict, a subprocess per model and task that runs the missing seeds). Everything lands
in OUT:

    OUT/embeddings/<model>/<module+options>/<task>/   heareval embeddings (.done.embeddings when finished)
    OUT/predictions/<model>/<task>/seed<k>/           heareval predictions for one seed
    OUT/logs/<model>/<task>.{embeddings,predictions}.log
    OUT/results.csv, results.md, results.png          see eval.report

Finished steps are detected and skipped, so an interrupted run resumes where it stopped and a
rerun of a finished run recomputes nothing. Seeds are 42, 43, ...: seed 42 is stock heareval.
Before any task starts, every model with embeddings to compute is loaded once here with its
weights, so an unknown model or a weight source that does not resolve or fit fails at once.
OUT/embeddings/<model>/model.json pins the weights of finished embeddings; what a failed run left
unfinished does not block a rerun with corrected --weights. Tables and records are written
atomically (`hear_msm._files.atomic_write`).

Models: a hear_msm architecture name (`ssam_tiny` -> module hear_msm.ssam_tiny, default
weights unless --weights names others) or any importable HEAR module (`hearbaseline.torchcrepe`).
--layout official selects the authors' frame layout of the hear_msm modules (needed to
reproduce the published numbers; other modules ignore it); the model's name then gets a
`+official` suffix so both layouts can share one OUT. --precision bf16 likewise loads the hear_msm
modules with `precision="bf16"` (`+bf16` suffix).
--compile loads the hear_msm modules with `compile=True` (torch.compile, cached on disk per machine
and model; same embeddings up to float rounding, recorded in model.json).
Tasks: by default the papers' ten (missing ones are reported and skipped) and any other task
folder in TASKS; --tasks takes folder names or the papers' abbreviations.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from hear_msm._files import write_text_atomic

from . import report
from .predict import seed_done
from .tasks import TaskError, resolve_tasks, validate_task

SEED_BASE = 42


@dataclass(frozen=True)
class ModelSpec:
    label: str                 # row name in the tables and folder name in OUT
    module: str                # importable HEAR module
    weights: str = ""          # passed as heareval --model (a path) or as model_file_path
    options: dict = field(default_factory=dict)  # heareval --model-options (load_model kwargs)

    def record(self) -> dict:
        return {"module": self.module, "weights": self.weights, "options": self.options}


def hear_msm_archs() -> list[str]:
    from hear_msm import list_models

    return list_models()


def parse_models(names: str, weights: list[str], layout: str, precision: str = "fp32",
                 compile: bool = False) -> list[ModelSpec]:
    """ModelSpecs for --models, --weights NAME=SOURCE, --layout, --precision and --compile; ValueError on bad input."""
    archs = hear_msm_archs()
    sources = {}
    for item in weights or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--weights takes NAME=SOURCE, got {item!r}")
        sources[name] = source
    specs = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        source = sources.pop(name, "")
        if name in archs:
            module, label = f"hear_msm.{name}", name
            options = {}
            if layout != "time":
                options["layout"] = layout
                label = f"{name}+{layout}"
            if precision != "fp32":
                options["precision"] = precision
                label = f"{label}+{precision}"
            if compile:
                options["compile"] = True
        else:
            module, label, options = name, name, {}
            if importlib.util.find_spec(name.split(".")[0]) is None or importlib.util.find_spec(name) is None:
                raise ValueError(f"model {name!r} is neither a hear_msm architecture ({', '.join(archs)}) "
                                 "nor an importable HEAR module")
        if source and not Path(source).exists():
            # registry tags and hf:// sources are not paths, which heareval's --model requires
            options = {"model_file_path": source, **options}
        specs.append(ModelSpec(label, module, source if source and Path(source).exists() else "", options))
    if sources:
        raise ValueError(f"--weights given for {sorted(sources)}, which are not in --models")
    if not specs:
        raise ValueError("--models is empty")
    return specs


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # eval/ is importable from the repository root whatever the caller's directory
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def embedding_dir(out: Path, spec: ModelSpec, task: str) -> Path | None:
    """heareval's embeddings folder of (model, task), if it exists."""
    found = sorted((out / "embeddings" / spec.label).glob(f"*/{task}"))
    return found[0] if found else None


def check_model_record(out: Path, spec: ModelSpec) -> None:
    """OUT/embeddings/<model>/model.json pins module, weights and options to the model's name.

    A record of other settings refuses the run only if finished embeddings were made with them; the
    unfinished ones a failed run left are removed and the record replaced, so a corrected rerun proceeds.
    """
    folder = out / "embeddings" / spec.label
    record_file = folder / "model.json"
    if record_file.is_file():
        try:
            recorded = json.loads(record_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            recorded = None  # a damaged record pins nothing
        if recorded == spec.record():
            return
        if any(folder.rglob(".done.embeddings")):
            raise ValueError(f"{folder} holds embeddings of {recorded}, not {spec.record()}: "
                             "use another --out, or delete that folder to recompute")
        for stale in (entry for entry in folder.iterdir() if entry.is_dir()):
            shutil.rmtree(stale)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_file, json.dumps(spec.record(), indent=1))


def check_model_loads(spec: ModelSpec) -> None:
    """Load the model here, the way heareval's embeddings runner will, so that an unknown model or a
    weight source that does not resolve (or does not fit) fails before any task starts."""
    source = spec.weights or spec.options.get("model_file_path") or "its default weights"
    try:
        module = importlib.import_module(spec.module)
        if spec.weights:
            module.load_model(spec.weights, **spec.options)
        else:
            module.load_model(**spec.options)
    except Exception as error:  # noqa: BLE001 - whatever fails here would fail every task of this model
        detail = str(error).strip() or type(error).__name__
        raise ValueError(f"model {spec.label}: cannot load it with {source!r}: {detail}") from None


def run_embeddings(out: Path, spec: ModelSpec, task_path: Path, log: Path) -> Path:
    cmd = [sys.executable, "-m", "heareval.embeddings.runner", spec.module, "--tasks-dir", str(task_path.parent),
           "--task", task_path.name, "--embeddings-dir", str(out / "embeddings" / spec.label),
           "--model-options", json.dumps(spec.options)]
    if spec.weights:
        cmd += ["--model", spec.weights]
    _run_logged(cmd, log)
    found = embedding_dir(out, spec, task_path.name)
    if found is None or not (found / ".done.embeddings").is_file():
        raise RuntimeError(f"heareval's embeddings runner finished without .done.embeddings; see {log}")
    return found


def run_predictions(embed_dir: Path, pred_dir: Path, seeds: list[int], grid: str, grid_points: int,
                    log: Path, bar: tqdm) -> None:
    cmd = [sys.executable, "-m", "eval.predict", str(embed_dir), "--out-dir", str(pred_dir),
           "--seeds", ",".join(map(str, seeds)), "--grid", grid, "--grid-points", str(grid_points)]

    def advance() -> None:
        done = sum(seed_done(pred_dir, s, grid, grid_points) for s in seeds)
        bar.update(done - advance.reported)
        advance.reported = done
    advance.reported = 0
    _run_logged(cmd, log, poll=advance)
    advance()


def _run_logged(cmd: list[str], log: Path, poll=None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_python_env())
        while proc.poll() is None:
            time.sleep(1.0)
            if poll is not None:
                poll()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{cmd[2]} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", required=True, help="comma-separated hear_msm architectures or HEAR modules")
    parser.add_argument("--tasks-dir", required=True, type=Path, help="folder of HEAR task folders (16 kHz)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (42, 43, ...); default 10")
    parser.add_argument("--grid", default="default", choices=("default", "fast", "faster"),
                        help="heareval's hyperparameter grid (default: the HEAR / papers' grid)")
    parser.add_argument("--grid-points", type=int, default=8, help="grid points tried per seed (heareval default 8)")
    parser.add_argument("--tasks", default=None, help="comma-separated task folders or paper abbreviations")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL=SOURCE",
                        help="weights for a model: path, hf://org/repo@rev or arch.tag (repeatable)")
    parser.add_argument("--layout", default="time", choices=("time", "official"),
                        help="hear_msm frame layout; 'official' reproduces the published numbers")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="hear_msm models: 'bf16' computes embeddings with bfloat16 matmuls (CPUs with native "
                        "bfloat16 only); the model's name gets a +bf16 suffix")
    parser.add_argument("--compile", action="store_true",
                        help="hear_msm models: torch.compile the encoder (pays off for long evaluations)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.grid_points < 1:
        parser.error("--seeds and --grid-points must be at least 1")
    try:
        specs = parse_models(args.models, args.weights, args.layout, args.precision, args.compile)
        task_paths, missing = resolve_tasks(args.tasks_dir, args.tasks.split(",") if args.tasks else None)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if missing:
        print(f"skipping {len(missing)} task(s) with no folder in {args.tasks_dir}: {', '.join(missing)}",
              file=sys.stderr)
    valid = []
    for path in task_paths:
        try:
            validate_task(path)
            valid.append(path)
        except TaskError as err:
            print(f"skipping {err}", file=sys.stderr)
    if not valid:
        print(f"no runnable HEAR task in {args.tasks_dir}", file=sys.stderr)
        return 2
    out = args.out
    seeds = list(range(SEED_BASE, SEED_BASE + args.seeds))
    # one unit per embeddings step and per seed; finished ones are counted up front
    work, done_units = [], 0
    try:
        for spec in specs:
            for path in valid:
                found = embedding_dir(out, spec, path.name)
                embedded = found is not None and (found / ".done.embeddings").is_file()
                pred_dir = out / "predictions" / spec.label / path.name
                finished = [s for s in seeds if seed_done(pred_dir, s, args.grid, args.grid_points)]
                done_units += embedded + len(finished)
                work.append((spec, path, embedded, pred_dir, finished))
        for label in dict.fromkeys(spec.label for spec, _, embedded, _, _ in work if not embedded):
            check_model_loads(next(spec for spec in specs if spec.label == label))
    except ValueError as err:
        parser.error(str(err))
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        check_model_record(out, spec)
    total = len(work) * (1 + len(seeds))
    failures, computed = [], 0
    start = time.time()
    with tqdm(total=total, initial=done_units, desc="eval", unit="step", dynamic_ncols=True) as bar:
        for spec, path, embedded, pred_dir, finished in work:
            logs = out / "logs" / spec.label
            try:
                if not embedded:
                    bar.set_postfix_str(f"{spec.label} {path.name} embeddings")
                    run_embeddings(out, spec, path, logs / f"{path.name}.embeddings.log")
                    bar.update(1)
                    computed += 1
                todo = [s for s in seeds if s not in finished]
                if todo:
                    bar.set_postfix_str(f"{spec.label} {path.name} seeds {todo[0]}..{todo[-1]}")
                    run_predictions(embedding_dir(out, spec, path.name), pred_dir, todo, args.grid,
                                    args.grid_points, logs / f"{path.name}.predictions.log", bar)
                    computed += len(todo)
            except (RuntimeError, ValueError) as err:
                failures.append(f"{spec.label} / {path.name}: {err}")
                tqdm.write(f"FAILED {spec.label} / {path.name}: {err}", file=sys.stderr)

    rows = [row for row in report.collect(out / "predictions")
            if row["model"] in {s.label for s in specs} and row["task"] in {p.name for p in valid}
            and row["seed"] in seeds]
    report.write(out, rows, [s.label for s in specs])
    print()
    print((out / "results.md").read_text())
    print(f"{computed} step(s) computed, {done_units} already done, {len(failures)} failed, "
          f"{time.time() - start:.0f} s; results in {out}/results.{{csv,md,png}}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
