"""The `hear-msm pretrain`, `prepare-shards` and `plot-loss` commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._files import write_text_atomic
from . import run_folder
from .config import RECIPES, TrainConfig
from .export import plot_loss
from .loop import TrainingDiverged, train
from .state import CHECKPOINT_NAME, read_run_checkpoint

# ------------------------------------------------------------------------------------ CLI
def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--override expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# CLI flag -> TrainConfig field; every flag defaults to None so --resume can tell what was given
_FLAGS = {
    "model": str, "data": str, "batch_size": int, "epochs": float, "steps": int, "warmup_epochs": float,
    "warmup_steps": int, "base_lr": float, "min_lr": float, "lr_schedule": str, "weight_decay": float,
    "grad_clip": float, "mask_ratio": float, "mask_mode": str, "seed": int, "precision": str, "device": str,
    "num_workers": int, "checkpoint_every": int, "log_every": int, "kernel": str, "export_dtype": str,
    "min_seconds": float, "max_clip_seconds": float, "discriminative_weight": float,
    "generative_weight": float, "decoder": str, "decoder_depth": int, "decoder_embed_dim": int,
    "drop_path_rate": float,
}
# on/off flags (--x / --no-x); None when not given, so that the recipe decides
_SWITCHES = ("masked_only_loss", "patch_normalized_targets", "decay_all_parameters")


def _cmd_pretrain(args) -> int:
    given = {name: getattr(args, name) for name in (*_FLAGS, *_SWITCHES) if getattr(args, name) is not None}
    if args.no_progress:
        given["progress"] = False
    if args.override:
        given["model_overrides"] = dict(_parse_override(o) for o in args.override)
    out = Path(args.out)
    if args.resume:
        run_folder.check(out, resume=True)
        saved = read_run_checkpoint(out / CHECKPOINT_NAME)["config"]
        config = TrainConfig.from_dict({**saved, **given})
    else:
        missing = [flag for flag in ("model", "data") if flag not in given]
        if missing:
            raise ValueError(f"a new run needs {' and '.join('--' + m for m in missing)} (or --resume)")
        config = TrainConfig.for_model(given.pop("model"), **given)
    try:
        train(config, out, resume=args.resume)
    except TrainingDiverged as error:
        print(f"hear-msm pretrain: stopped: {error}", file=sys.stderr)
        return 3
    return 0


# the declared default of fields that TrainConfig resolves on construction
_DECLARED = {"decoder": "auto"}


def _default_help(name: str, defaults: TrainConfig) -> str:
    """'default 1024; ssamba: 64' -- the dataclass default and every recipe that differs from it."""
    default = _DECLARED[name] if name in _DECLARED else getattr(defaults, name)  # "auto", not what it resolves to
    if default is None:  # steps, warmup_steps: derived from the epoch counts
        default = "from --" + name.replace("steps", "epochs").replace("_", "-")
    recipes = [f"{family}: {recipe[name]:g}" if isinstance(recipe[name], float) else f"{family}: {recipe[name]}"
               for family, recipe in RECIPES.items() if name in recipe and recipe[name] != getattr(defaults, name)]
    return "; ".join([f"default {default}"] + recipes)


def _recipes_help() -> str:
    """The epilog of `pretrain --help`: which defaults each family's recipe changes."""
    import textwrap

    lines = ["recipes: a new run takes the defaults of its model's family; those shown first are Yadav et al.'s",
             "(ssast, ssam, axlstm). The mae_* presets take the mwmae recipe with the mae entries on top.",
             "Crops always have the model's input length (200 frames; ssamba: 1024), changed with",
             "--override num_frames=N. --decoder mwmha or mae also brings --masked-only-loss unless it is given."]
    for family, recipe in RECIPES.items():
        settings = ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                             for name, value in recipe.items())
        lines += textwrap.wrap(f"{family}: {settings}", width=100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _cmd_prepare_shards(args) -> int:
    from .data import write_shards

    if args.whole_files and args.segment_seconds is not None:
        raise ValueError("--whole-files keeps files unsplit; it cannot be combined with --segment-seconds")
    segment_seconds = None if args.whole_files else 10.0 if args.segment_seconds is None else args.segment_seconds
    summary = write_shards(args.audio_dir, args.out_dir, kind=args.kind, clips_per_shard=args.clips_per_shard,
                           min_seconds=args.min_seconds, segment_seconds=segment_seconds)
    write_text_atomic(Path(args.out_dir) / "shards.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {summary['shards']} shard(s) of {summary['kind']} to {args.out_dir}: {summary['clips']} clips, "
          f"{summary['hours']} h; skipped {summary['skipped']['unreadable']} unreadable, "
          f"{summary['skipped']['too_short']} too short", file=sys.stderr)
    return 0


def _cmd_plot_loss(args) -> int:
    print(plot_loss(args.run_dir, args.out, args.title))
    return 0


def register_commands(subparsers) -> None:
    """Add `pretrain`, `prepare-shards` and `plot-loss` to the `hear-msm` parser."""
    import hear_msm
    from . import __doc__ as training_doc

    p = subparsers.add_parser("pretrain", help="masked spectrogram pretraining (one CPU, or torchrun for DDP)",
                              description=training_doc, epilog=_recipes_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.csv, final/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--model", choices=hear_msm.list_models())
    p.add_argument("--data", help="folder of audio files (wav/flac/ogg) or of .tar shards, or one .tar shard "
                                  "(not a single audio file: cut a long recording into clips with prepare-shards)")
    defaults = TrainConfig()
    helps = {
        "batch_size": "global batch (split over ranks)", "steps": "optimizer steps (wins over --epochs)",
        "epochs": "epochs over the data",
        "warmup_steps": "warm-up steps (wins over --warmup-epochs; fewer than the run's)",
        "min_lr": "end of the cosine decay (at most the peak lr)",
        "base_lr": "lr = base_lr * batch / 256", "mask_mode": "unstructured | timestep | cluster (SSAMBA)",
        "lr_schedule": "after the warm-up: cosine (decay to --min-lr) | constant",
        "precision": "auto (fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16", "device": "auto | cpu | cuda[:i]",
        "kernel": "per family: SSAST auto|reference; SSAM, SSAMBA auto|cuda|cpu|reference; AxLSTM auto|cpu|fused|reference",
        "export_dtype": "dtype of final/model.safetensors",
        "min_seconds": "skip shorter files", "max_clip_seconds": "read longer files as a random segment this long",
        "discriminative_weight": "w x InfoNCE over masked patches (SSAST's joint objective)",
        "generative_weight": "weight of the MSE term",
        "drop_path_rate": "stochastic depth in training (SSAMBA)",
        "decoder": "training-only decoder, never exported: none | transformer (--decoder-depth blocks of the "
                   "encoder's width before its head) | mwmha (MW-MAE's decoder on the patch tokens: 8 heads with "
                   "windows 2, 5, 10, 25, 50, 125 tokens and 2 global; loss over the masked patches unless "
                   "--no-masked-only-loss) | mae (the same with 8 global heads) | auto (transformer if "
                   "--decoder-depth > 0, else none)",
        "decoder_depth": "blocks of the training-only decoder (transformer: required; mwmha, mae: 0 = 4)",
        "decoder_embed_dim": "width of the mwmha / mae decoder (0 = 384)",
    }
    for name, kind in _FLAGS.items():
        if name in ("model", "data"):
            continue
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{helps.get(name, '')} ({_default_help(name, defaults)})".strip())
    p.add_argument("--masked-only-loss", action=argparse.BooleanOptionalAction, default=None,
                   help=f"MSE over masked patches only ({_default_help('masked_only_loss', defaults)})")
    p.add_argument("--patch-normalized-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise each target patch by its own mean and std (MAE-style; "
                        f"{_default_help('patch_normalized_targets', defaults)})")
    p.add_argument("--decay-all-parameters", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on every parameter, biases, norms, positions and tokens included (MW-MAE's "
                        f"optax.adamw; {_default_help('decay_all_parameters', defaults)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is still written)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="architecture field for the model builder, e.g. depth=2 (repeatable)")
    p.set_defaults(run=_cmd_pretrain)

    p = subparsers.add_parser("prepare-shards", help="audio folder -> webdataset-style tar shards")
    p.add_argument("audio_dir")
    p.add_argument("out_dir")
    p.add_argument("--kind", default="logmel", choices=["logmel", "flac"],
                   help="logmel: normalised float16 log-mels (fast to train on); flac: 16 kHz mono audio")
    p.add_argument("--clips-per-shard", type=int, default=1000)
    p.add_argument("--min-seconds", type=float, default=0.5, help="skip clips shorter than this")
    p.add_argument("--segment-seconds", type=float, default=None,
                   help="split longer files into clips this long (default 10; must be > 0)")
    p.add_argument("--whole-files", action="store_true", help="never split files: one clip per file")
    p.set_defaults(run=_cmd_prepare_shards)

    p = subparsers.add_parser("plot-loss", help="draw RUN/log.csv to a PNG (needs hear_msm[plot])")
    p.add_argument("run_dir", metavar="RUN", help="run folder or its log.csv")
    p.add_argument("--out", help="PNG path (default RUN/loss.png)")
    p.add_argument("--title")
    p.set_defaults(run=_cmd_plot_loss)
