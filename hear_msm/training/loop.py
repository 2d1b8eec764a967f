"""The training loop: `train()` reads top to bottom; `setup` builds the run, `train_step` does one step.

One function per stage, as in nanoGPT's train.py: setup (model, optimizer, schedule, data, restored
state) -> loop (step -> log -> checkpoint) -> export. The same code runs on one device or under
torchrun (DDP detected from the environment; only rank 0 logs and writes).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .._files import write_bytes_atomic, write_text_atomic
from . import run_folder
from .config import (ADJUSTABLE_FIELDS, CONFIG_NAME, LOG_NAME, TrainConfig, check_data_path, lr_factor,
                     resume_changes, schedule_steps)
from .export import export
from .state import (CHECKPOINT_NAME, mask_generator, non_finite, read_run_checkpoint, restore, rng_state,
                    save_checkpoint, step_seed)

LOG_FIELDS = ["step", "epoch", "loss", "lr", "clips_per_s", "elapsed_s"]


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False) -> TrainResult:
    """Run (or resume) pretraining into the run folder `out` (written by rank 0 only).

    `out` must be new, empty or a run folder of this trainer (`run_folder`); rank 0 holds its lock
    until it returns. On resume the schedule (ADJUSTABLE_FIELDS) may differ from the run's; the
    changes are logged, recorded in the run's marker and named in the model card.
    Raises TrainingDiverged on a NaN/Inf loss, or on non-finite weights when a checkpoint is due;
    the last checkpoint stays as it was, and it is finite.
    """
    out = Path(out)
    check_data_path(config.data)
    info, device = init_distributed(config.device)
    claim = run_folder.claim(out, resume) if info.main else contextlib.nullcontext()
    with claim as folder:
        run = setup(config, out, resume, info, device, folder)
        progress = Progress(run)
        batches = iter(run.loader)
        try:
            while run.step < run.total:
                loss = train_step(run, next(batches).to(device, non_blocking=True))
                progress.update(loss)
                if run.step % config.checkpoint_every == 0 or run.step == run.total:
                    save_run(run)
        finally:
            progress.close()
            if info.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
        if not info.main:
            return TrainResult(run.model, run.step, run.last_loss, None)
        seconds = run.elapsed()
        final = export(run.model, out, config, run.total, run.last_loss, seconds, run.source,
                       folder.marker.get("resumes", []))
        log(f"done: {run.total} steps, final loss {run.last_loss:.4f}, {seconds / 60:.1f} min; weights in {final}")
        return TrainResult(run.model, run.step, run.last_loss, final)


@dataclass
class Run:
    """Everything a run holds between steps."""

    config: TrainConfig
    out: Path
    info: "Dist"
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (config.precision with "auto" resolved)
    source: object  # the data source (AudioFolder | TarShards)
    model: nn.Module
    objective: "Objective"  # model + training-only decoder, what the optimizer covers
    loss_module: nn.Module  # the objective, DDP-wrapped on several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total: int
    step: int
    last_loss: float
    last_checkpoint: int | None  # step of the newest finite checkpoint on disk
    elapsed_before: float  # seconds spent before this process (resumed runs)
    started: float = 0.0
    lr_used: float = 0.0  # the lr of the last step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def setup(config: TrainConfig, out: Path, resume: bool, info: "Dist", device: torch.device,
          folder: run_folder.RunFolder | None) -> Run:
    """Model, objective, optimizer, schedule and data of a run; its saved state restored on resume."""
    from .data import Features, make_loader, open_source

    checkpoint_path = out / CHECKPOINT_NAME
    state, changes = None, {}
    if resume:
        state = read_run_checkpoint(checkpoint_path)
        changes = resume_changes(TrainConfig.from_dict(state["config"]), config)
    elif checkpoint_path.exists():
        raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it "
                              "or choose another --out")
    precision = config.precision if config.precision != "auto" else "fp16" if device.type == "cuda" else "fp32"
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {info.world_size} ranks")
    local_batch = config.batch_size // info.world_size

    torch.manual_seed(config.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    try:
        model = build_model(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config.model} with overrides {config.model_overrides}: {error}") from None
    source = open_source(config.data, config.min_seconds, config.max_clip_seconds, Features(model.config))
    objective = Objective(model, config).to(device)  # the decoder (if any) is drawn after the model
    objective.train()
    loss_module = objective
    if info.world_size > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    start_step = int(state["step"]) if state else 0
    loader, sampler = make_loader(source, local_batch, config.num_frames, config.seed, info.rank,
                                  info.world_size, start_step, config.num_workers)
    total, warmup = schedule_steps(config, sampler.batches_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(objective, config.weight_decay, config.decay_all_parameters),
                                  lr=config.lr, betas=(config.beta1, config.beta2))
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, min_ratio, config.lr_schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run = Run(config, out, info, device, precision, source, model, objective, loss_module, optimizer, scheduler,
              scaler, loader, sampler.batches_per_epoch, total, start_step, float("nan"),
              start_step if resume else None, 0.0)
    if state:
        restore(state, checkpoint_path, model, objective.decoder, optimizer, scheduler, scaler)
        if changes.keys() & set(ADJUSTABLE_FIELDS):
            # the restored optimizer and scheduler carry the run's old peak lr; the new schedule takes over here
            scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"] = config.lr
                group["lr"] = config.lr * lr_factor(start_step, warmup, total, min_ratio, config.lr_schedule)
        run.elapsed_before = float(state.get("elapsed_s", 0.0))
        run.last_loss = float(state.get("loss", float("nan")))  # a finished run resumed takes no step
    if info.main:
        write_text_atomic(out / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
        start_log(out / LOG_NAME, start_step if resume else None)
        if resume:
            folder.record_resume(start_step, changes)
        else:
            folder.start_new_run()  # no resume history of an earlier run that never checkpointed
        log(source.describe())
        log(f"{config.model} on {device} x{info.world_size} ({precision}); batch {config.batch_size} "
            f"({local_batch}/rank), {run.steps_per_epoch} steps/epoch, {total} steps "
            f"({total / run.steps_per_epoch:.2f} epochs), warm-up {warmup}, lr {config.lr:.3g}"
            + (f"; resuming at step {start_step}" if resume else ""))
        if changes:
            log("changed on resume: " + ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()))
    run.started = time.perf_counter()
    return run


def train_step(run: Run, spectrogram: torch.Tensor) -> float:
    """One optimizer step on a batch [B, 1, T, F]; returns the loss (averaged over ranks)."""
    config = run.config
    mask = run.model.sample_mask(spectrogram.shape[0], config.mask_ratio, config.mask_mode,
                                 generator=mask_generator(config.seed, run.step, run.info.rank)).to(run.device)
    with step_random_state(config.seed, run.step, run.info.rank, run.device), autocast(run.device, run.precision):
        loss = run.loss_module(spectrogram, mask)  # draws (drop path) from torch's generator, seeded per step
    value = loss.detach().float().clone()
    if run.info.world_size > 1:
        dist.all_reduce(value)
        value /= run.info.world_size
    value = value.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {run.step}: training stopped. "
                               + divergence_advice(config, run.out, run.last_checkpoint, run.precision))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.objective.parameters(), config.grad_clip)
    run.lr_used = run.optimizer.param_groups[0]["lr"]  # this step's lr, for the log
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    run.last_loss = value
    return value


def save_run(run: Run) -> None:
    """checkpoint.pt of the run (rank 0); refuses to save non-finite weights (TrainingDiverged)."""
    decoder = run.objective.decoder
    bad = non_finite([run.model] + ([decoder] if decoder is not None else []), run.optimizer)
    if bad:  # the weights are identical on every rank, so every rank stops here
        raise TrainingDiverged(
            f"weights became non-finite by step {run.step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
            f"loss {run.last_loss:.4g}): training stopped without saving them. "
            + divergence_advice(run.config, run.out, run.last_checkpoint, run.precision))
    if not run.info.main:
        return
    epoch, batch = divmod(run.step, run.steps_per_epoch)
    save_checkpoint(run.out / CHECKPOINT_NAME, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
        "total_steps": run.total, "config": run.config.to_dict(), "rng": rng_state(),
        "sampler": {"epoch": epoch, "batch": batch, "steps_per_epoch": run.steps_per_epoch},
        "world_size": run.info.world_size, "elapsed_s": run.elapsed(), "loss": run.last_loss,
        # kept apart from "model" so that "model" stays in the export (authors') format
        **({"decoder": decoder.state_dict()} if decoder is not None else {}),
    })
    run.last_checkpoint = run.step


class Progress:
    """log.csv rows every `log_every` steps and the tqdm bar, on rank 0 (a no-op elsewhere)."""

    def __init__(self, run: Run):
        self.run = run
        self.file = self.writer = self.bar = None
        if run.info.main:
            self.file = open(run.out / LOG_NAME, "a", newline="")  # start_log wrote the header
            self.writer = csv.DictWriter(self.file, LOG_FIELDS)
            if run.config.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=run.total, initial=run.step, desc=f"pretrain {run.config.model}", unit="step",
                                dynamic_ncols=True, file=sys.stderr)
        self.window_start, self.window_clips = time.perf_counter(), 0

    def update(self, loss: float) -> None:
        run = self.run
        self.window_clips += run.config.batch_size
        if self.writer is not None and (run.step % run.config.log_every == 0 or run.step == run.total):
            now = time.perf_counter()
            rate = self.window_clips / max(now - self.window_start, 1e-9)
            self.writer.writerow({"step": run.step, "epoch": f"{run.step / run.steps_per_epoch:.4f}",
                                  "loss": f"{loss:.6f}", "lr": f"{run.lr_used:.6g}", "clips_per_s": f"{rate:.2f}",
                                  "elapsed_s": f"{run.elapsed():.1f}"})
            self.file.flush()
            self.window_start, self.window_clips = now, 0
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", clips_s=f"{rate:.1f}", refresh=False)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    model: nn.Module  # the trained (unwrapped) model, on every rank
    step: int
    loss: float
    export_dir: Path | None  # RUN/final on rank 0, None elsewhere


# ------------------------------------------------------------------------------------ pieces
def build_model(config: TrainConfig):
    from ..models.registry import model_builder

    model = model_builder(config.model)(kernel=config.kernel, **config.model_overrides)
    if config.drop_path_rate > 0:  # TrainConfig checked that the family has stochastic depth
        model.set_drop_path(config.drop_path_rate)
    return model


def parameter_groups(model: nn.Module, weight_decay: float, every_parameter: bool = False) -> list[dict]:
    """Decay matrices only: biases, norm scales, 1-D params (Mamba's D, xLSTM gates/skips),
    positions, cls/mask tokens and Mamba's A_log (mamba-ssm's `_no_weight_decay`) are exempt.
    `every_parameter`: decay them all (MW-MAE's `optax.adamw` without a mask); frozen ones never."""
    exempt_names = ("pos_embed", "cls_token", "mask_token", "mask_embed", "A_log", "A_b_log")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt_names \
            or getattr(param, "_no_weight_decay", False)
        (no_decay if exempt and not every_parameter else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Objective(nn.Module):
    """Model plus the training-only decoder (if any), so that DDP's forward, its gradient hooks and
    the optimizer cover both; only `model` is exported."""

    def __init__(self, model, config: "TrainConfig"):
        super().__init__()
        self.model = model
        self.decoder = build_decoder(model, config)
        self.options = dict(masked_only=config.masked_only_loss,
                            patch_normalized_targets=config.patch_normalized_targets,
                            discriminative_weight=config.discriminative_weight,
                            generative_weight=config.generative_weight)
        # parameters this objective never reaches (SSAMBA: Vim's classification head, a head weighted 0;
        # a head replaced by a decoder that predicts the patches) are frozen: no optimizer state for
        # them, and DDP does not wait for their gradients
        for param in getattr(model, "parameters_unused_by", lambda **_: [])(**self.options, decoder=self.decoder):
            param.requires_grad_(False)

    def forward(self, spectrogram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruction_loss(spectrogram, mask, decoder=self.decoder, **self.options)


def build_decoder(model, config: "TrainConfig") -> nn.Module | None:
    """The training-only decoder `config.decoder` names (TrainConfig checked that the model takes it):
    None, `decoder_depth` Transformer blocks of the encoder's width, or MW-MAE's decoder built by the model
    (`build_decoder`: on the visible patches for MW-MAE / MAE encoders, on all patch tokens otherwise)."""
    if config.decoder == "none":
        return None
    if config.decoder == "transformer":
        from ..models.transformer import build_training_decoder

        return build_training_decoder(model.config.embed_dim, config.decoder_depth, model.config.norm_eps)
    from ..models.mwmae import decoder_config

    return model.build_decoder(decoder_config(config.decoder, config.decoder_embed_dim, config.decoder_depth))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Rank and device from the torchrun environment; process group nccl (GPU) or gloo (CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device_name = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:index], got {device_name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device_name!r}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


@contextlib.contextmanager
def step_random_state(seed: int, step: int, rank: int, device: torch.device):
    """Torch's global generator (CPU, and the GPU in use) seeded from (seed, step, rank) for one
    forward, then restored: random draws inside the model (drop path) are a function of the step,
    as masks and crops are, so a resumed run repeats them exactly."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(step_seed(seed, step, rank, 0xD809))
        yield


def autocast(device: torch.device, precision: str):
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def start_log(path: Path, keep_until: int | None) -> None:
    """Rewrite the log (atomically) keeping the rows up to step `keep_until`: on resume the rows after
    the checkpoint (the killed tail) go; a new run (None) starts an empty log, whatever an earlier
    run that stopped before its first checkpoint left."""
    rows, damaged = [], 0
    if keep_until is not None and path.is_file():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    keep = int(row["step"]) <= keep_until
                except (KeyError, TypeError, ValueError):
                    damaged += 1
                    continue
                if keep:
                    rows.append({name: row.get(name, "") for name in LOG_FIELDS})
    if damaged:
        log(f"{path}: dropped {damaged} unreadable row(s)")
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, text.getvalue().encode("utf-8"))


def log(message: str) -> None:
    print(f"[hear-msm pretrain] {message}", file=sys.stderr, flush=True)


def divergence_advice(config: TrainConfig, out: Path, checkpoint_step: int | None, precision: str) -> str:
    """What to do after a divergence, as flags that --resume (or a new run) accepts."""
    import shlex

    flags = f"--base-lr {config.base_lr / 2:g} --grad-clip {config.grad_clip / 2 if config.grad_clip else 1.0:g}"
    also = "; a longer --warmup-steps" + (" or --precision fp32" if precision != "fp32" else "") + " also help"
    if checkpoint_step is None:
        return f"No checkpoint was written yet: run the same command again (same --out) with {flags}{also}."
    return (f"Last good checkpoint: {out / CHECKPOINT_NAME} (step {checkpoint_step}, finite). Continue from it with: "
            f"hear-msm pretrain --out {shlex.quote(str(out))} --resume {flags}{also}.")
