"""Where weights come from: official `.pth` runs, our safetensors format, the Hub, weight tags.

Accepted sources (`load_model(source)`, `create_model(name, pretrained=source)`):
  ""                        the default tag of the architecture in weights/registry.json
  "ssam_tiny.<tag>"         a registered weight tag (shipped file or pinned Hub revision)
  "hf://org/repo[@rev]"     config.json + model.safetensors from the Hugging Face Hub
  DIR or DIR/model.safetensors   our format (config.json beside the weights)
  RUN_DIR, RUN_DIR/checkpoints/checkpoint-N.pth   the authors' original checkpoints
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import _checkpoint, _hub
from .models.encoder import EncoderConfig, MaskedSpectrogramModel, config_from_dict
from .models.registry import build_from_config, list_models, model_builder
from ._files import atomic_write, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_METADATA_KEY = "hear_msm_config"
# names accepted for the stored dtype of exported weights (None: keep the model's float32)
EXPORT_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACCEPTED = (
    'accepted weight sources: "" (the default tag), "<arch>.<tag>" (see `hear-msm list`), '
    '"hf://org/repo[@revision]", a folder or .safetensors file in hear_msm format '
    "(config.json + model.safetensors), or an official run folder / .pth checkpoint"
)
# a config.json of our format is a few hundred bytes
MAX_CONFIG_BYTES = 1 << 20
# the authors' architecture names -> ours
_OFFICIAL_ARCH_PREFIXES = {"mamba_ssast_": "ssam_", "xlstm_ssast_": "axlstm_", "ssast_": "ssast_"}


@dataclass
class LoadedWeights:
    config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    source: str  # human-readable provenance


# ------------------------------------------------------------------------------------ registry
@lru_cache(maxsize=None)
def load_registry() -> dict:
    """weights/registry.json: per architecture its default tag and its weight tags."""
    text = resources.files("hear_msm.weights").joinpath("registry.json").read_text()
    return json.loads(text)["models"]


def weight_tags(arch: str) -> dict[str, dict]:
    return load_registry().get(arch, {}).get("tags", {})


def default_tag(arch: str) -> str | None:
    return load_registry().get(arch, {}).get("default_tag")


def _how_to_get_weights(arch: str) -> str:
    lines = []
    for tag, entry in weight_tags(arch).items():
        if entry.get("source") == "official":
            lines.append(
                f"  {arch}.{tag}: download the run folder {entry['run']!r} from the authors' Google Drive "
                f"({entry['google_drive_folder']}), then `hear-msm convert <run folder> <out dir>` "
                "and pass the folder (or the run folder itself) as the weights"
            )
    lines.append('  or any "hf://org/repo[@revision]" holding hear_msm weights (config.json + model.safetensors)')
    return "\n".join(lines)


def _resolve_tag(arch: str, tag: str) -> LoadedWeights:
    tags = weight_tags(arch)
    if tag not in tags:
        raise ValueError(f"{arch} has no weight tag {tag!r}; registered tags: {sorted(tags) or 'none'}")
    entry = tags[tag]
    if entry.get("file"):
        path = Path(str(resources.files("hear_msm.weights").joinpath(entry["file"])))
        if not path.is_file():
            raise FileNotFoundError(f"{arch}.{tag}: the shipped weights file {path} is missing; reinstall hear_msm")
        actual = _hub.sha256_of_file(path)
        if entry.get("sha256") and actual != entry["sha256"].lower():
            raise ValueError(f"{arch}.{tag}: {path} has sha256 {actual}, the registry expects {entry['sha256']}; "
                             "the installation is damaged, reinstall hear_msm")
        return _load_ours(path, f"{arch}.{tag} (shipped file {entry['file']})")
    if entry.get("hub_repo"):
        return _load_hub(entry["hub_repo"], entry.get("revision"), entry.get("sha256"), f"{arch}.{tag}")
    raise ValueError(
        f"the weights {arch}.{tag} are not downloadable automatically (the authors publish them on "
        f"Google Drive only). To use them:\n{_how_to_get_weights(arch)}"
    )


# ------------------------------------------------------------------------------------ formats
def _load_ours(path: Path, source: str) -> LoadedWeights:
    """A folder with config.json + model.safetensors, or a .safetensors file (config beside or inside).

    The config is read and validated first, so a bad one is refused before the weights are read.
    """
    weights_file = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} found; {ACCEPTED}")
    config_file = weights_file.with_name(CONFIG_NAME)
    config = _read_config_file(config_file) if config_file.is_file() else _embedded_config(weights_file)
    try:
        state_dict = load_file(str(weights_file))
    except SafetensorError as error:
        raise ValueError(f"{weights_file}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    return LoadedWeights(config, state_dict, source)


def _read_config_file(config_file: Path) -> EncoderConfig:
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_file}: {size} bytes is not a hear_msm config (at most {MAX_CONFIG_BYTES} bytes)")
    try:
        text = config_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_file}: not UTF-8 text ({error})") from None
    return _parse_config(text, str(config_file))


def _embedded_config(weights_file: Path) -> EncoderConfig:
    """The copy of config.json that `save_pretrained` puts in the safetensors metadata."""
    try:
        with safe_open(str(weights_file), "pt") as handle:
            embedded = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    except SafetensorError as error:
        raise ValueError(f"{weights_file}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    if embedded is None:
        raise FileNotFoundError(f"{weights_file}: no {CONFIG_NAME} beside it and no config in its metadata")
    return _parse_config(embedded, f"{weights_file} (the config in its metadata)")


def _parse_config(text: str, where: str) -> EncoderConfig:
    """JSON text -> a validated config; ValueError naming `where` and the field at fault."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to be a hear_msm config") from None
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: invalid config: {error}") from None


def _load_official(path: Path, requested_arch: str | None) -> LoadedWeights:
    """The checkpoint's own architecture (from its saved config or its tensors), else the requested one
    (the strict load then names what does not fit)."""
    checkpoint = _checkpoint.read_official_checkpoint(path)
    arch = official_arch_name(checkpoint.arch) if checkpoint.arch else None
    arch = arch or infer_arch(checkpoint.state_dict) or requested_arch
    if arch is None:
        raise ValueError(
            f"{checkpoint.path}: cannot tell which architecture this checkpoint is for "
            f"(known: {', '.join(list_models())})"
        )
    epoch = f", epoch {checkpoint.epoch}" if checkpoint.epoch is not None else ""
    return LoadedWeights(_preset_config(arch), checkpoint.state_dict, f"official checkpoint {checkpoint.path}{epoch}")


def _load_hub(repo_id: str, revision: str | None, sha256: str | None, source: str) -> LoadedWeights:
    # read at call time (huggingface_hub reads them once at import) so a session can redirect them
    where = {"endpoint": os.environ.get("HF_ENDPOINT"), "cache_dir": os.environ.get("HF_HUB_CACHE")}
    weights_file = _hub.download_file(repo_id, WEIGHTS_NAME, revision=revision, sha256=sha256, **where)
    _hub.download_file(repo_id, CONFIG_NAME, revision=revision, **where)
    return _load_ours(weights_file, f"{source} (hf://{repo_id}@{revision or 'main'})")


def _registered_sha256(repo_id: str, revision: str | None) -> str | None:
    for entry in load_registry().values():
        for tag in entry.get("tags", {}).values():
            if tag.get("hub_repo") == repo_id and tag.get("revision") == revision:
                return tag.get("sha256")
    return None


def load_weights(source: str | os.PathLike, arch: str | None = None) -> LoadedWeights:
    """Resolve any accepted source (see module docstring) to a config and a state dict."""
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a weight source must be a string or a path, got {type(source).__name__} {source!r:.60}; "
                         + ACCEPTED)
    source = os.fspath(source)
    if not isinstance(source, str):  # a PathLike of bytes
        raise ValueError(f"a weight source must be a string or a path, got bytes {source!r:.60}; " + ACCEPTED)
    if source == "":
        if arch is None:
            raise ValueError("an architecture name is needed to pick default weights; " + ACCEPTED)
        tag = default_tag(arch)
        if tag is None:
            raise ValueError(f"{arch} has no default weights shipped with hear_msm. To get weights:\n{_how_to_get_weights(arch)}")
        return _resolve_tag(arch, tag)
    if source.startswith("hf://"):
        repo_id, revision = _hub.parse_hf_uri(source)
        return _load_hub(repo_id, revision, _registered_sha256(repo_id, revision), source)
    if "://" in source:
        raise ValueError(f"unsupported weight source {source!r}; {ACCEPTED}")
    path = Path(source).expanduser()
    if not path.exists():
        tagged = source.split(".", 1)
        if len(tagged) == 2 and tagged[0] in list_models() and "/" not in source:
            return _resolve_tag(*tagged)
        if arch is not None and source in weight_tags(arch):
            return _resolve_tag(arch, source)
        raise FileNotFoundError(f"weights not found: {source!r} is neither an existing path nor a weight tag; {ACCEPTED}")
    if path.is_dir() and (path / WEIGHTS_NAME).is_file() or path.suffix == ".safetensors":
        return _load_ours(path, str(path))
    return _load_official(path, arch)


# ------------------------------------------------------------------------------------ building
def _preset_config(arch: str) -> EncoderConfig:
    with torch.device("meta"):
        return model_builder(arch)().config


@lru_cache(maxsize=None)
def _preset_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_builder(arch)().state_dict().items()}


def official_arch_name(name: str) -> str | None:
    """The authors' `config.model.arch` (e.g. "mamba_ssast_tiny") -> ours ("ssam_tiny")."""
    for prefix, ours in _OFFICIAL_ARCH_PREFIXES.items():
        if name.startswith(prefix) and ours + name[len(prefix):] in list_models():
            return ours + name[len(prefix):]
    return None


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered architecture whose keys and shapes match `state_dict` exactly, if any."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for arch in list_models():
        if _preset_shapes(arch) == shapes:
            return arch
    return None


def _describe(config: EncoderConfig) -> str:
    return f"{config.arch} (family {config.family}, embed_dim {config.embed_dim}, depth {config.depth})"


def _check_fits(model: MaskedSpectrogramModel, weights: LoadedWeights) -> None:
    """Same keys and shapes (`model` may live on the meta device); the error names the architecture
    the weights are really for."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    if expected == found:
        return
    actual = infer_arch(weights.state_dict)
    if actual is not None and actual != model.config.arch:
        raise ValueError(
            f"{weights.source}: these weights are for {_describe(_preset_config(actual))}, "
            f"but the model is {_describe(model.config)}"
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    details = [f"missing keys {missing[:5]}" if missing else "", f"unexpected keys {unexpected[:5]}" if unexpected else "",
               "shape mismatches " + ", ".join(f"{k}: {found[k]} vs {expected[k]}" for k in wrong[:5]) if wrong else ""]
    raise ValueError(f"{weights.source}: weights do not fit {model.config.arch}: " + "; ".join(d for d in details if d))


def _converted_values(model: MaskedSpectrogramModel, weights: LoadedWeights) -> dict[str, torch.Tensor]:
    """The weights in the model's dtype, after refusing integer tensors for floating-point parameters
    and any NaN or infinity (before or after the conversion): either would make every embedding NaN
    or garbage without an error."""
    expected = model.state_dict()
    wrong = [f"{k} ({v.dtype})" for k, v in weights.state_dict.items()
             if (v.dtype != expected[k].dtype and not (v.is_floating_point() and expected[k].is_floating_point()))]
    if wrong:
        raise ValueError(
            f"{weights.source}: weights of the wrong dtype: {', '.join(wrong[:5])}"
            f"{f' and {len(wrong) - 5} more' if len(wrong) > 5 else ''}; floating-point parameters accept "
            "float16, bfloat16, float32 or float64 tensors"
        )
    converted = {k: v.to(expected[k].dtype) for k, v in weights.state_dict.items()}
    bad = [k for k, v in converted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{weights.source}: {len(bad)} weight tensor(s) hold NaN or infinite values "
            f"(in {expected[bad[0]].dtype}), e.g. {bad[:5]}; refusing to load them"
        )
    return converted


def load_state_strict(model: MaskedSpectrogramModel, weights: LoadedWeights) -> None:
    """Strict load: keys, shapes, dtypes and finite values are checked first (ValueError naming the source)."""
    _check_fits(model, weights)
    model.load_state_dict(_converted_values(model, weights), strict=True)


def instantiate(weights: LoadedWeights, kernel: str = "auto") -> MaskedSpectrogramModel:
    """Build the model `weights.config` describes and load the weights into it.

    The config is first built on the meta device (no memory) and checked against the weights, so a
    config.json that asks for a model larger than its weights is refused before anything is allocated.
    """
    with torch.device("meta"):
        try:
            skeleton = build_from_config(weights.config, kernel=kernel)
        except ValueError as error:
            raise ValueError(f"{weights.source}: {error}") from None
        except (TypeError, AssertionError, RuntimeError) as error:
            raise ValueError(f"{weights.source}: hear_msm cannot build a model from this config "
                             f"({type(error).__name__}: {error})") from None
    _check_fits(skeleton, weights)
    model = build_from_config(weights.config, kernel=kernel)
    load_state_strict(model, weights)
    model.weights_source = weights.source
    return model


# ------------------------------------------------------------------------------------ saving
def save_pretrained(model: MaskedSpectrogramModel, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                    overwrite: bool = False, model_card: str | None = None) -> Path:
    """Write config.json + model.safetensors (+ a README.md model card if none exists).

    Refuses to replace existing weights unless `overwrite`; never replaces a README.md. Each file
    is written atomically with the permissions the umask allows (`_files.atomic_write`), and both
    weights and config are on disk before either is renamed into place: a failed write (disk full,
    quota) leaves the previous pair as it was.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; weights are saved into a folder")
    directory.mkdir(parents=True, exist_ok=True)
    weights_file, config_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not overwrite and (weights_file.exists() or config_file.exists()):
        raise FileExistsError(f"{directory} already holds hear_msm weights; pass overwrite=True (--overwrite) to replace them")
    config_json = json.dumps(model.config.to_dict(), indent=2)
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = safetensors_bytes(tensors, metadata={CONFIG_METADATA_KEY: config_json, "format": "pt"})
    with atomic_write(weights_file) as weights, atomic_write(config_file, "w", encoding="utf-8") as config:
        weights.write(payload)
        config.write(config_json + "\n")
        for handle in (weights, config):  # both on disk here, so neither rename follows a failed write
            handle.flush()
            os.fsync(handle.fileno())
    card = directory / "README.md"
    if not card.exists():
        write_text_atomic(card, model_card or _default_card(model))
    return directory


def _default_card(model: MaskedSpectrogramModel) -> str:
    cfg = model.config
    source = getattr(model, "weights_source", "random initialisation")
    return (
        f"---\nlibrary_name: hear_msm\ntags: [audio, hear, self-supervised, {cfg.family}]\n---\n\n"
        f"# {cfg.arch}\n\nA hear_msm masked spectrogram model ({cfg.family}, embed_dim {cfg.embed_dim}, "
        f"depth {cfg.depth}), weights from: {source}.\n\n"
        "```python\nimport hear_msm\nmodel = hear_msm.load_model(\"hf://<this repo>\")\n```\n"
    )


def push_to_hub(model: MaskedSpectrogramModel, repo_id: str, revision: str | None = None,
                private: bool = False, token: str | None = None, commit_message: str = "Upload hear_msm weights") -> str:
    """Upload config.json + model.safetensors + model card; returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
    return str(info)
