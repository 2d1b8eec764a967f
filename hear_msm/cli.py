"""`hear-msm` command line: list models, embed audio files, convert official checkpoints, export for the Hub."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _cmd_list(args) -> int:
    import torch

    import hear_msm
    from hear_msm._weights import default_tag, weight_tags

    print(f"{'model':<14} {'family':<12} {'params':>12}  {'default weights':<28} tags")
    for arch in hear_msm.list_models(args.pattern):
        with torch.device("meta"):
            model = hear_msm.create_model(arch)
        params = sum(p.numel() for p in model.state_dict().values())
        tags = ", ".join(f"{arch}.{t}" for t in weight_tags(arch)) or "-"
        default = f"{arch}.{default_tag(arch)}" if default_tag(arch) else "none (see README)"
        print(f"{arch:<14} {model.config.family:<12} {params:>12,}  {default:<28} {tags}")
    return 0


def read_audio_16k_mono(path: Path) -> tuple[np.ndarray, list[str]]:
    """Read any soundfile-readable file -> float32 mono at 16 kHz, plus notes on what changed."""
    import soundfile as sf

    from hear_msm._frontend import to_16k_mono

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    except (RuntimeError, sf.LibsndfileError) as error:
        raise ValueError(f"{path}: cannot read audio ({error}); soundfile reads wav, flac, ogg, mp3 and more") from None
    notes = [f"mixed {data.shape[1]} channels to mono"] if data.shape[1] > 1 else []
    if rate != 16000:
        notes.append(f"resampled {rate} Hz -> 16000 Hz")
    return to_16k_mono(data, rate).numpy(), notes


def check_output_file(out: Path, overwrite: bool, suffix: str) -> None:
    """Refuse, before any work, an output path that could not be written at the end."""
    if out.suffix != suffix:
        raise ValueError(f"--out must end in {suffix}, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name ending in {suffix}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} exists and is not a regular file")
    folder = out.parent.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        raise ValueError(f"--out {out}: cannot create its folder, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to write in {existing}")


def _write_failed(path: Path, error: OSError, existed: bool) -> OSError:
    """A failed atomic write, said in words: what failed, why, and that nothing was damaged."""
    kept = "the previous file is unchanged" if existed else "nothing was written"
    return OSError(f"cannot write {path}: {error.strerror or error}; {kept}")


def _cmd_embed(args) -> int:
    import torch
    from tqdm import tqdm

    from hear_msm._files import atomic_write
    from hear_msm._hear import load_hear_model

    out = Path(args.out)
    check_output_file(out, args.overwrite, ".npz")
    files = [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no such audio file(s): {', '.join(missing)}")
    model = load_hear_model(args.model, args.weights, layout=args.layout,
                            max_batch_chunks=args.max_batch_chunks, device=args.device, precision=args.precision,
                            compile=args.compile)
    print(f"model {args.model}, weights: {model.weights}, layout {args.layout}, precision {args.precision}",
          file=sys.stderr)
    result: dict[str, np.ndarray] = {}
    scenes = []
    for index, path in enumerate(tqdm(files, desc="embedding", unit="file")):
        audio, notes = read_audio_16k_mono(path)
        if notes:
            tqdm.write(f"{path}: {'; '.join(notes)}", file=sys.stderr)
        batch = torch.from_numpy(audio)[None]
        try:
            embeddings, timestamps = model.timestamp_embeddings(batch)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        result[f"timestamp_embeddings_{index:04d}"] = embeddings[0].cpu().numpy()
        result[f"timestamps_{index:04d}"] = timestamps[0].cpu().numpy()
        scenes.append(embeddings[0].mean(0).cpu().numpy())
    out.parent.mkdir(parents=True, exist_ok=True)
    existed = out.exists()
    try:
        with atomic_write(out) as handle:  # a failed write leaves an existing --out as it was
            np.savez(
                handle, files=np.array([str(f) for f in files]), scene_embeddings=np.stack(scenes),
                model=np.array(args.model), weights=np.array(model.weights), layout=np.array(args.layout),
                precision=np.array(args.precision), **result,
            )
    except OSError as error:
        raise _write_failed(out, error, existed) from None
    print(f"wrote {out}: {len(files)} file(s), scene embeddings {np.stack(scenes).shape}, "
          f"timestamp embeddings every {model.hop_ms:.0f} ms", file=sys.stderr)
    return 0


def _cmd_convert(args) -> int:
    from hear_msm._weights import EXPORT_DTYPES, WEIGHTS_NAME, instantiate, load_weights, save_pretrained

    weights = load_weights(args.checkpoint)
    model = instantiate(weights)
    existed = (Path(args.out_dir) / WEIGHTS_NAME).exists()
    try:
        out = save_pretrained(model, args.out_dir, dtype=EXPORT_DTYPES[args.dtype], overwrite=args.overwrite)
    except OSError as error:
        if isinstance(error, FileExistsError):  # our refusal to overwrite, already explained
            raise
        raise _write_failed(Path(args.out_dir) / WEIGHTS_NAME, error, existed) from None
    print(f"converted {weights.source} ({model.config.arch}) -> {out}")
    return 0


def _cmd_export_hub(args) -> int:
    import json

    from hear_msm._weights import EXPORT_DTYPES, export_for_hub, weight_tags

    if args.repo is not None:  # refused now rather than written into the card and the entry
        from hear_msm._hub import parse_hf_uri

        try:
            address = parse_hf_uri(f"hf://{args.repo}")
        except ValueError:
            address = None
        if address is None or address.filename or address.revision:
            raise ValueError(f"--repo must be a Hub repo id, <org>/<name>; got {args.repo!r}")
    done = export_for_hub(args.weights, args.out_dir, repo_id=args.repo, dtype=EXPORT_DTYPES[args.dtype],
                          overwrite=args.overwrite)
    repo, folder = done["entry"]["hub_repo"], done["directory"]
    where = (f'weights/registry.json, models -> "{done["arch"]}" -> tags -> "{done["label"].split(".", 1)[1]}"'
             if done["label"] else f'weights/registry.json, models -> "{done["arch"]}" -> tags, as a new tag')
    print(f"wrote {folder}: config.json, model.safetensors (sha256 {done['entry']['sha256']}), README.md")
    print(f"1. upload it:  hf upload {repo} {folder} . --repo-type model")
    print("2. add these fields to " + where + ", with the commit hash that ends the URL the upload printed:")
    print(json.dumps(done["entry"], indent=1))
    arch, tag = done["arch"], (done["label"] or ".").split(".", 1)[1]
    entry = weight_tags(arch).get(tag, {})
    if entry.get("file"):
        print("   (a shipped tag keeps loading the file in the package; the upload serves hf:// users)")
    else:
        print("   From then on the tag loads from the Hub (that revision, SHA-256 checked)"
              + (" instead of Google Drive." if entry.get("google_drive_folder") else "."))
    return 0


def build_parser() -> argparse.ArgumentParser:
    import hear_msm

    parser = argparse.ArgumentParser(prog="hear-msm", description=__doc__)
    parser.add_argument("--version", action="version", version=hear_msm.__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list architectures and their weight tags")
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'ssam_*'")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("embed", help="embed audio files into an .npz (scene + timestamp embeddings)")
    p.add_argument("files", nargs="+", help="audio files (any rate / channel count soundfile reads)")
    p.add_argument("--model", required=True, choices=hear_msm.list_models())
    p.add_argument("--weights", default="", help="weight source; default: the model's default tag (the published "
                   "weights, downloaded once on first use; e.g. ssam_tiny.debian_cpu_demo works offline)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--layout", default="time", choices=["time", "official"],
                   help="'official' reproduces the authors' scrambled frame layout (published numbers)")
    p.add_argument("--max-batch-chunks", type=int, default=None,
                   help="2 s chunks per encoder batch (default: 4 on CPU, 32 on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="'bf16': bfloat16 matmuls on CPUs with native bfloat16 (AVX512-BF16, AMX), faster, "
                   "embeddings float32 (README: when to use it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder: pays off for many or long "
                   "files (compiled once per machine and model, cached in $HEAR_MSM_CACHE)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_cmd_embed)

    p = sub.add_parser("convert", help="official .pth run folder -> hear_msm weights folder")
    p.add_argument("checkpoint", help="official run folder or checkpoint-<epoch>.pth")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace weights already in out_dir")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("export-hub", help="write a folder ready for `hf upload` and print its registry entry")
    p.add_argument("weights", help='any weight source: a tag ("ssam_base.audioset_as2m_r1"), a folder, a run '
                   "folder, a .pth, hf://...")
    p.add_argument("out_dir")
    p.add_argument("--repo", default=None, help="the Hub repo it will be uploaded to (org/name), for the card and entry")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace weights already in out_dir")
    p.set_defaults(run=_cmd_export_hub)

    from .training.commands import register_commands

    register_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # OSError: missing or existing files, a full disk, permissions
        print(f"hear-msm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
