"""Evaluate HEAR embedding models on HEAR tasks with the stock heareval, over several seeds.

    python -m eval.run --models ssam_tiny,axlstm_tiny,hearbaseline.torchcrepe \\
        --tasks-dir TASKS --out OUT [--seeds 10] [--grid default|fast|faster] [--grid-points N] \\
        [--tasks E50,nsynth_pitch-v2.2.3-5h,...] [--weights ssam_tiny=PATH_OR_SOURCE ...] \\
        [--layout time|official] [--precision fp32|bf16] [--compile] [--workers N] [--shard I/N|auto]

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

Parallel runs: a job is one (model, task), its embeddings and then its seeds; jobs write disjoint
folders. --workers N runs N jobs at a time, each in its own subprocesses, with the cores this process
may use (os.sched_getaffinity) split evenly between them as OMP_NUM_THREADS (an OMP_NUM_THREADS set
by the caller is used as is for every job instead). A job that fails is reported; the others go on.
--shard I/N runs only jobs I, I+N, I+2N, ... of the fixed job order (tasks in run order, then
models in --models order), so N machines given the same command, a shared OUT and I = 0..N-1 split
the work without a scheduler; --shard auto takes I and N from torchrun (RANK, WORLD_SIZE) or a Slurm
job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT). A shard writes no results tables: run the
same command once more without --shard to compute whatever is missing and write them.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

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
    names = [n.strip() for n in names.split(",") if n.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--models names {', '.join(repeated)} more than once")
    for name in names:
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


@dataclass
class Job:
    """One (model, task): heareval's embeddings, then the seeds not yet predicted.

    A job writes only OUT/embeddings/<model>/<module+options>/<task>, OUT/predictions/<model>/<task>
    and its two logs, so jobs of different (model, task) never write the same folder.
    """
    spec: ModelSpec
    task: Path
    embedded: bool = False
    finished: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.spec.label} / {self.task.name}"

    def predictions_dir(self, out: Path) -> Path:
        return out / "predictions" / self.spec.label / self.task.name


def job_order(specs: list[ModelSpec], tasks: list[Path]) -> list[Job]:
    """Every (model, task) once, task-major: tasks in the order given, models in --models order.

    --shard counts in this order, so it depends only on the command line and the task folders, never
    on what is already finished; task-major spreads one task's models over the shards.
    """
    jobs = {}
    for task in tasks:
        for spec in specs:
            jobs.setdefault((spec.label, task.name), Job(spec, task))
    return list(jobs.values())


# launchers whose environment --shard auto reads: (name, rank variable, count variable)
SHARD_LAUNCHERS = (("torchrun", "RANK", "WORLD_SIZE"),
                   ("a Slurm job array", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"))


def _shard_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def parse_shard(text: str, environ: Mapping[str, str]) -> tuple[int, int]:
    """(I, N) of --shard: "I/N" with 0 <= I < N, or "auto" = the launcher's rank and count.

    auto reads RANK / WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (a Slurm
    job array; I = (ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, so --array=1-8 works too).
    ValueError if the text or the environment does not give such a pair, or gives two.
    """
    if text == "auto":
        found = [(name, rank, count) for name, rank, count in SHARD_LAUNCHERS if rank in environ or count in environ]
        wanted = " or ".join(f"{rank} and {count} ({name})" for name, rank, count in SHARD_LAUNCHERS)
        if not found:
            raise ValueError(f"--shard auto needs {wanted} in the environment, and none is set: "
                             "give --shard I/N instead")
        if len(found) > 1:
            raise ValueError(f"--shard auto found both {found[0][1]} ({found[0][0]}) and {found[1][1]} "
                             f"({found[1][0]}) in the environment: give --shard I/N instead")
        name, rank, count_name = found[0]
        if rank not in environ or count_name not in environ:
            raise ValueError(f"--shard auto: {name} sets {rank} and {count_name}, but only "
                             f"{rank if rank in environ else count_name} is set")
        index, count = _shard_int(environ[rank], rank), _shard_int(environ[count_name], count_name)
        source = f" (from {rank}={environ[rank]}, {count_name}={environ[count_name]})"
        if rank == "SLURM_ARRAY_TASK_ID":
            first = _shard_int(environ.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
            step = _shard_int(environ.get("SLURM_ARRAY_TASK_STEP", "1"), "SLURM_ARRAY_TASK_STEP")
            if step < 1 or (index - first) % step:
                raise ValueError(f"--shard auto: array task {index} is not on the range from {first} in steps "
                                 f"of {step}; give --shard I/N instead")
            index = (index - first) // step
    else:
        index_text, sep, count_text = text.partition("/")
        if not sep or not index_text.strip().isdigit() or not count_text.strip().isdigit():
            raise ValueError(f"--shard takes I/N (shard I of N, I from 0 to N-1, e.g. 0/4) or auto, got {text!r}")
        index, count, source = int(index_text), int(count_text), ""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}{source}: needs N >= 1 and I from 0 to N-1")
    return index, count


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which taskset, cgroups and Slurm narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_shares(cores: int, workers: int) -> list[int]:
    """Threads per worker: `cores` split as evenly as possible, at least one each."""
    return [max(1, cores // workers + (i < cores % workers)) for i in range(workers)]


def job_threads(workers: int, environ: Mapping[str, str]) -> list[str]:
    """OMP_NUM_THREADS of each worker's subprocesses: the caller's OMP_NUM_THREADS if set, for
    every worker; else this process's cores split between the workers."""
    if environ.get("OMP_NUM_THREADS"):
        return [environ["OMP_NUM_THREADS"]] * workers
    return [str(n) for n in thread_shares(available_cores(), workers)]


def _python_env(threads: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = threads  # torch sizes its intra-op thread pool from this at import
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # eval/ is importable from the repository root whatever the caller's directory
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class Progress:
    """The one progress bar: one unit per embeddings step and per seed; its postfix names the step
    each running job is in. Worker threads only queue their updates; the main thread applies them
    (`drain`), so tqdm's locks are only ever taken by one thread (a run stopped by SIGTERM while
    threads shared the bar has hung on them)."""

    def __init__(self, bar: tqdm):
        self.bar, self.computed = bar, 0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, str] = {}

    def stage(self, job: Job, text: str | None) -> None:
        self._events.put(("stage", job.name, None if text is None else f"{job.spec.label} {job.task.name} {text}"))

    def update(self, units: int) -> None:
        self._events.put(("update", units, None))

    def drain(self) -> None:
        """Apply the queued updates (main thread only)."""
        while True:
            try:
                kind, key, text = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "update":
                self.bar.update(key)
                self.computed += key
                continue
            if text is None:
                self._running.pop(key, None)
            else:
                self._running[key] = text
            self.bar.set_postfix_str("; ".join(self._running.values()))


def embedding_dir(out: Path, spec: ModelSpec, task: str) -> Path | None:
    """heareval's embeddings folder of (model, task), if it exists."""
    found = sorted((out / "embeddings" / spec.label).glob(f"*/{task}"))
    return found[0] if found else None


def embeddings_finished(out: Path, spec: ModelSpec, task: str) -> bool:
    """Whether heareval finished the embeddings of (model, task) (its `.done.embeddings` marker)."""
    found = embedding_dir(out, spec, task)
    return found is not None and (found / ".done.embeddings").is_file()


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


def run_embeddings(out: Path, spec: ModelSpec, task_path: Path, log: Path, threads: str,
                   stop: threading.Event) -> Path:
    cmd = [sys.executable, "-m", "heareval.embeddings.runner", spec.module, "--tasks-dir", str(task_path.parent),
           "--task", task_path.name, "--embeddings-dir", str(out / "embeddings" / spec.label),
           "--model-options", json.dumps(spec.options)]
    if spec.weights:
        cmd += ["--model", spec.weights]
    _run_logged(cmd, log, threads, stop)
    if not embeddings_finished(out, spec, task_path.name):
        raise RuntimeError(f"heareval's embeddings runner finished without .done.embeddings; see {log}")
    return embedding_dir(out, spec, task_path.name)


def run_predictions(embed_dir: Path, pred_dir: Path, seeds: list[int], grid: str, grid_points: int,
                    log: Path, threads: str, stop: threading.Event, progress: Progress) -> None:
    cmd = [sys.executable, "-m", "eval.predict", str(embed_dir), "--out-dir", str(pred_dir),
           "--seeds", ",".join(map(str, seeds)), "--grid", grid, "--grid-points", str(grid_points)]

    def advance() -> None:
        done = sum(seed_done(pred_dir, s, grid, grid_points) for s in seeds)
        progress.update(done - advance.reported)
        advance.reported = done
    advance.reported = 0
    try:
        _run_logged(cmd, log, threads, stop, poll=advance)
    finally:
        advance()


def run_job(out: Path, job: Job, seeds: list[int], grid: str, grid_points: int, threads: str,
            stop: threading.Event, progress: Progress) -> None:
    """The missing steps of one job; raises on the first step that fails."""
    logs = out / "logs" / job.spec.label
    try:
        if not job.embedded:
            progress.stage(job, "embeddings")
            run_embeddings(out, job.spec, job.task, logs / f"{job.task.name}.embeddings.log", threads, stop)
            progress.update(1)
        todo = [s for s in seeds if s not in job.finished]
        if todo:
            progress.stage(job, f"seeds {todo[0]}..{todo[-1]}")
            run_predictions(embedding_dir(out, job.spec, job.task.name), job.predictions_dir(out), todo, grid,
                            grid_points, logs / f"{job.task.name}.predictions.log", threads, stop, progress)
    finally:
        progress.stage(job, None)


def run_jobs(jobs: list[Job], threads: list[str], run, stop: threading.Event, tick=lambda: None) -> list[str]:
    """run(job, threads, stop) for every job, len(threads) at a time, each worker with its own thread
    count; returns one message per failed job. Once `stop` is set, running jobs end their
    subprocesses within a second and no further job starts."""
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for share in threads:
        slots.put(share)

    def one(job: Job) -> None:
        share = slots.get()  # a worker's thread share, free while fewer than len(threads) jobs run
        try:
            if not stop.is_set():
                run(job, share, stop)
        finally:
            slots.put(share)

    failures = []
    with ThreadPoolExecutor(max_workers=len(threads), thread_name_prefix="eval-job") as pool:
        futures = {pool.submit(one, job): job for job in jobs}
        running = set(futures)
        while running:
            # wake every second: Python runs signal handlers only in the main thread, between bytecodes
            finished, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            tick()
            for future in finished:
                error = future.exception()
                if error is not None:  # any error ends only its own job
                    job = futures[future]
                    message = str(error) if isinstance(error, (RuntimeError, ValueError)) else repr(error)
                    failures.append(f"{job.name}: {message}")
                    tqdm.write(f"FAILED {job.name}: {message}", file=sys.stderr)
    return failures


class StopOnSignal:
    """While active, SIGTERM (how torchrun and Slurm end a process) and Ctrl-C set `stop` instead of
    raising in whatever the main thread is doing (which could leave a lock of the progress bar
    held); the jobs then end their subprocesses, so none keeps writing into OUT after this process
    is gone. A second signal acts as it would without this."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.stop, self.received = threading.Event(), None
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.stop.set()
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _run_logged(cmd: list[str], log: Path, threads: str, stop: threading.Event, poll=None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ OMP_NUM_THREADS={threads} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_python_env(threads))
        while proc.poll() is None:
            if stop.wait(1.0):
                proc.terminate()
                proc.wait()
                raise RuntimeError(f"{cmd[2]} stopped (the run was interrupted)")
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
    parser.add_argument("--workers", type=int, default=1,
                        help="(model, task) jobs run at a time, the cores split between them (default 1)")
    parser.add_argument("--shard", default=None, metavar="I/N|auto",
                        help="run only jobs I, I+N, ... (auto: I and N from torchrun or a Slurm job array)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.grid_points < 1:
        parser.error("--seeds and --grid-points must be at least 1")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        shard = parse_shard(args.shard, os.environ) if args.shard is not None else (0, 1)
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
    by_label = {spec.label: spec for spec in specs}
    every = job_order(specs, valid)
    jobs = every[shard[0]::shard[1]]
    sharded = shard[1] > 1
    if sharded:
        print(f"shard {shard[0]}/{shard[1]}: {len(jobs)} of {len(every)} (model, task) jobs", file=sys.stderr)
    # one unit per embeddings step and per seed; finished ones are counted up front
    done_units = 0
    try:
        for job in jobs:
            job.embedded = embeddings_finished(out, job.spec, job.task.name)
            pred_dir = job.predictions_dir(out)
            job.finished = [s for s in seeds if seed_done(pred_dir, s, args.grid, args.grid_points)]
            done_units += job.embedded + len(job.finished)
        for label in dict.fromkeys(job.spec.label for job in jobs if not job.embedded):
            check_model_loads(by_label[label])
    except ValueError as err:
        parser.error(str(err))
    out.mkdir(parents=True, exist_ok=True)
    for label in dict.fromkeys(job.spec.label for job in jobs):
        check_model_record(out, by_label[label])
    pending = [job for job in jobs if not job.embedded or len(job.finished) < len(seeds)]
    # more workers than jobs left would leave cores idle: split them between the jobs there are
    workers = max(1, min(args.workers, len(pending)))
    threads = job_threads(workers, os.environ)
    print(f"--workers {workers}: OMP_NUM_THREADS {'/'.join(threads)} ({available_cores()} cores available)",
          file=sys.stderr)
    total = len(jobs) * (1 + len(seeds))
    start = time.time()
    tqdm.monitor_interval = 0  # no monitor thread: the main thread alone touches the bar
    with StopOnSignal() as signals, tqdm(total=total, initial=done_units, desc="eval", unit="step",
                                        dynamic_ncols=True) as bar:
        progress = Progress(bar)
        failures = run_jobs(pending, threads, lambda job, share, stop: run_job(
            out, job, seeds, args.grid, args.grid_points, share, stop, progress), signals.stop, progress.drain)
        progress.drain()
    if signals.received is not None:
        print(f"stopped by signal {signals.received} after {progress.computed} step(s); a rerun resumes",
              file=sys.stderr)
        return 128 + signals.received

    summary = (f"{progress.computed} step(s) computed, {done_units} already done, {len(failures)} failed, "
               f"{time.time() - start:.0f} s")
    if sharded:
        # every shard writing the tables into one OUT would leave whichever finished last
        print(f"shard {shard[0]}/{shard[1]}: {summary}; the results tables are written by a run of the same "
              "command without --shard once every shard has finished")
    else:
        rows = [row for row in report.collect(out / "predictions")
                if row["model"] in {s.label for s in specs} and row["task"] in {p.name for p in valid}
                and row["seed"] in seeds]
        report.write(out, rows, [s.label for s in specs])
        print()
        print((out / "results.md").read_text())
        print(f"{summary}; results in {out}/results.{{csv,md,png}}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
