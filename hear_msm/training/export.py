"""What a finished run leaves for people: RUN/final (our weights format + model card) and the loss plot."""
from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import numpy as np

from .._cards import CardFacts, model_card
from .._files import atomic_write, write_text_atomic
from .config import ADJUSTABLE_FIELDS, FINAL_DIR, LOG_NAME, TrainConfig

def export(model, out: Path, config: TrainConfig, steps: int, loss: float, seconds: float, source=None,
           resumes: list[dict] = ()) -> Path:
    """Write RUN/final in the hear_msm weights format (config.json + model.safetensors + card).

    resumes: the run marker's resume history; schedule changes made on resume are named in the card.
    """
    from .._weights import EXPORT_DTYPES, save_pretrained

    dtype = EXPORT_DTYPES[config.export_dtype]
    if dtype is not None:  # a converted copy: Module.to casts floating-point tensors only (SSAMBA keeps int64 buffers)
        model, dtype = copy.deepcopy(model).to(dtype), None
    recipe = (
        f"mask {config.mask_mode} {config.mask_ratio:g}, loss "
        f"{f'{config.generative_weight:g} x ' if config.generative_weight != 1 else ''}MSE over "
        f"{'masked' if config.masked_only_loss else 'all'} patches"
        f"{' (targets standardised per patch)' if config.patch_normalized_targets else ''}"
        f"{f' + {config.discriminative_weight:g} x InfoNCE' if config.discriminative_weight else ''}"
        f"{_decoder_text(config)}"
        f"{f', drop path {config.drop_path_rate:g}' if config.drop_path_rate else ''}, AdamW lr {config.lr:.3g} "
        f"(base {config.base_lr:g} x {config.batch_size}/256, {config.lr_schedule} after warm-up), "
        f"betas ({config.beta1:g}, {config.beta2:g}), wd {config.weight_decay:g}"
        f"{' on every parameter' if config.decay_all_parameters else ''}, seed {config.seed}"
    )
    provenance = (
        f"data: {source.describe() if source is not None else config.data}",
        f"budget: {steps} steps x batch {config.batch_size} = {steps * config.batch_size} clips of "
        f"{config.num_frames / 100:g} s; wall time {seconds / 60:.1f} min; final training loss {loss:.4f}",
        f"recipe: {recipe}",
        *_schedule_changes(list(resumes)),
    )
    card = model_card(model.config, CardFacts(title=f"{model.config.arch} pretrained with hear-msm pretrain",
                                              provenance=provenance),
                      params=sum(p.numel() for p in model.parameters()))
    target = out / FINAL_DIR
    save_pretrained(model, target, dtype=dtype, overwrite=True, model_card=card)
    write_text_atomic(target / "README.md", card)  # save_pretrained keeps an existing card: a rerun replaces its own
    return target


def _decoder_text(config: TrainConfig) -> str:
    """', through a ... training-only decoder' of the model card ('' without one)."""
    if config.decoder == "transformer":
        return f", through a {config.decoder_depth}-block training-only decoder"
    if config.decoder in ("mwmha", "mae"):
        heads = "multi-window heads (windows 2, 5, 10, 25, 50, 125, global x 2)" if config.decoder == "mwmha" \
            else "global heads"
        return (f", through a training-only {config.decoder} decoder ({config.decoder_embed_dim}-d, depth "
                f"{config.decoder_depth}, 8 {heads}) that predicts the patches")
    return ""


def _schedule_changes(resumes: list[dict]) -> list[str]:
    """'Resumed at step 3 with base_lr 0.01 -> 0.005.' for each resume that changed the schedule."""
    lines = []
    for entry in resumes:
        changed = {k: v for k, v in entry.get("changed", {}).items() if k in ADJUSTABLE_FIELDS}
        if changed:
            lines.append(f"Resumed at step {entry['step']} with "
                         + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items()) + ".")
    return lines


# ------------------------------------------------------------------------------------ plotting
def plot_loss(run: str | os.PathLike, output: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """RUN/log.csv -> PNG of the training loss (raw and smoothed) against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot-loss needs matplotlib: pip install 'hear_msm[plot]'") from None
    run = Path(run)
    log_path = run / LOG_NAME if run.is_dir() else run
    if not log_path.is_file():
        raise FileNotFoundError(f"no training log at {log_path}")
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{log_path} has no logged steps yet")
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, loss, color="0.75", linewidth=0.8, label="loss")
    if window > 1:
        axis.plot(steps[window - 1:], smooth, color="C0", linewidth=1.5, label=f"mean of {window} logs")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(title or run.name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    output = Path(output) if output else (run if run.is_dir() else run.parent) / "loss.png"
    try:
        with atomic_write(output) as handle:
            figure.savefig(handle, format=output.suffix[1:].lower() or "png")
    finally:
        plt.close(figure)
    return output
