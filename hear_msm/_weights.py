"""Where weights come from: official `.pth` runs, our safetensors format, the Hub, weight tags.

Accepted sources (`load_model(source)`, `create_model(name, pretrained=source)`):
  ""                        the default tag of the architecture in weights/registry.json
  "ssam_tiny.<tag>"         a registered weight tag: a file shipped in the package, a pinned Hub
                            file, or the authors' Google Drive checkpoint (downloaded on first use,
                            converted once, cached; see `_fetch`)
  "hf://org/repo[@rev]"     config.json + model.safetensors from the Hugging Face Hub
  "hf://org/repo/FILE[@rev]"  one file of a Hub repo: a .safetensors of ours or a .pth checkpoint
  DIR or DIR/model.safetensors   our format (config.json beside the weights)
  RUN_DIR, RUN_DIR/checkpoints/checkpoint-N.pth, a bare state-dict .pth   the authors' checkpoints

A registry tag names its source by its fields: `file` (shipped), `hub_repo` + `revision` (+
`hub_file`, default model.safetensors; `sha256`, or `size_mb` where the Hub publishes no checksum),
or `google_drive_folder` + `checkpoint` (+ `checkpoint_sha256`). A tag with both a Hub mirror and a
Drive folder is read from the Hub: adding `hub_repo`, `revision` and `sha256` to a Drive tag
(printed by `hear-msm export-hub`) moves it to the Hub without any code change.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import _checkpoint, _fetch, _flax_checkpoint, _hub
from ._cards import PAPERS, CardFacts, model_card
from .models.encoder import EncoderConfig, MaskedSpectrogramModel, config_from_dict
from .models.registry import build_from_config, list_models, model_builder
from .models.ssamba import HUB_PREFIX, SSAMBAPretrainingModel, load_hub_state_dict, strip_hub_prefix
from ._files import atomic_write, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CONFIG_METADATA_KEY = "hear_msm_config"
# names accepted for the stored dtype of exported weights (None: keep the model's float32)
EXPORT_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACCEPTED = (
    'accepted weight sources: "" (the default tag), "<arch>.<tag>" (see `hear-msm list`), '
    '"hf://org/repo[@revision]" (hear_msm weights) or "hf://org/repo/<file>[@revision]" (one file: '
    ".safetensors or .pth), a folder or .safetensors file in hear_msm format "
    "(config.json + model.safetensors), an official run folder / .pth checkpoint, or an MW-MAE / MAE "
    "Flax run folder / checkpoint_<step> file / Orbax directory"
)
# a config.json of our format is a few hundred bytes
MAX_CONFIG_BYTES = 1 << 20
# the authors' architecture names -> ours
_OFFICIAL_ARCH_PREFIXES = {"mamba_ssast_": "ssam_", "xlstm_ssast_": "axlstm_", "ssast_": "ssast_"}
_HUB_WEB = "https://huggingface.co"


@dataclass
class LoadedWeights:
    config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    source: str  # human-readable provenance
    facts: CardFacts = field(default_factory=CardFacts)  # what a model card says about them


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


def shipped_tags() -> list[str]:
    """Every "arch.tag" whose weights ship inside the package (usable offline)."""
    return [f"{arch}.{tag}" for arch, entry in load_registry().items()
            for tag, fields in entry.get("tags", {}).items() if fields.get("file")]


def manual_route(arch: str, tag: str) -> str:
    """How to get `arch.tag` by hand (what works without hear_msm downloading anything), and which
    weights work offline right now: the text every download error ends with."""
    entry = weight_tags(arch).get(tag, {})
    label = f"{arch}.{tag}"
    lines = []
    if entry.get("hub_repo") and entry.get("hub_file"):
        file, repo, revision = entry["hub_file"], entry["hub_repo"], entry.get("revision") or "main"
        lines.append(
            f"To get {label} by hand: download {file} from {_HUB_WEB}/{repo}/blob/{revision}/{file} in a browser "
            f"(or `hf download {repo} {file} --revision {revision}`), then pass the file as the weights: "
            f'hear_msm.{arch}.load_model("{file}"), `hear-msm embed --model {arch} --weights {file} ...`, or convert '
            f"it once with `hear-msm convert {file} weights_{arch}` and pass that folder."
        )
    elif entry.get("hub_repo"):
        repo, revision = entry["hub_repo"], entry.get("revision") or "main"
        lines.append(
            f"To get {label} by hand: `hf download {repo} --revision {revision} --local-dir weights_{arch}` (or "
            f"download config.json and model.safetensors from {_HUB_WEB}/{repo}/tree/{revision}), then pass the "
            f'folder as the weights: hear_msm.{arch}.load_model("weights_{arch}").'
        )
    if entry.get("google_drive_folder"):
        run, checkpoint = entry.get("run") or entry["checkpoint"].split("/")[0], entry["checkpoint"]
        lines.append(
            f"{'Or' if lines else f'To get {label} by hand'}: download the run folder {run} (at least {checkpoint}) "
            f"from the authors' Google Drive folder {entry['google_drive_folder']} in a browser, then pass it as "
            f'the weights: hear_msm.{arch}.load_model("{run}"), `hear-msm embed --model {arch} --weights {run} ...` '
            f"or `hear-validator hear_msm.{arch} -m {run}`; or convert it once with "
            f"`hear-msm convert {run} weights_{arch}` and pass that folder."
        )
    if not lines:
        lines.append(f'{label} cannot be downloaded; pass any weights of {arch} instead ("hf://org/repo", a folder).')
    lines.append(_offline_alternative(arch))
    return "\n".join(lines)


def _offline_alternative(arch: str) -> str:
    own = [t for t in shipped_tags() if t.split(".")[0] == arch]
    if own:
        return (f'To work offline now: the shipped CPU demo weights "{own[0]}" need no download '
                "(they are not the published model).")
    return (f"{arch} has no weights shipped with hear_msm; offline, only these need no download: "
            + ", ".join(f'"{t}"' for t in shipped_tags()) + " (CPU demo weights of other models).")


def _resolve_tag(arch: str, tag: str) -> LoadedWeights:
    tags = weight_tags(arch)
    if tag not in tags:
        raise ValueError(f"{arch} has no weight tag {tag!r}; registered tags: {sorted(tags) or 'none'}")
    entry = tags[tag]
    label = f"{arch}.{tag}"
    if entry.get("file"):
        return _load_shipped(label, entry)
    if entry.get("hub_repo"):  # a Hub mirror wins over the Drive folder it mirrors
        return _load_registered_hub(arch, tag, entry)
    if entry.get("google_drive_folder"):
        return _load_drive(arch, tag, entry)
    raise ValueError(f"the weights {label} name no source (file, hub_repo or google_drive_folder) in the registry")


def _tag_facts(label: str, entry: dict, *provenance: str) -> CardFacts:
    lines = [f"hear_msm weight tag `{label}`: {entry.get('description', 'no description')}", *provenance]
    return CardFacts(title=label, provenance=tuple(lines), license=entry.get("license"), paper=entry.get("paper"),
                     published_scores=entry.get("published_scores"))


def _load_shipped(label: str, entry: dict) -> LoadedWeights:
    path = Path(str(resources.files("hear_msm.weights").joinpath(entry["file"])))
    if not path.is_file():
        raise FileNotFoundError(f"{label}: the shipped weights file {path} is missing; reinstall hear_msm")
    actual = _hub.sha256_of_file(path)
    if entry.get("sha256") and actual != entry["sha256"].lower():
        raise ValueError(f"{label}: {path} has sha256 {actual}, the registry expects {entry['sha256']}; "
                         "the installation is damaged, reinstall hear_msm")
    weights = _load_ours(path, f"{label} (shipped file {entry['file']})")
    weights.facts = _tag_facts(label, entry, f"shipped with hear_msm as `weights/{entry['file']}`, SHA-256 {actual}")
    return weights


def _load_registered_hub(arch: str, tag: str, entry: dict) -> LoadedWeights:
    label = f"{arch}.{tag}"
    address = _hub.HubAddress(entry["hub_repo"], entry.get("hub_file"), entry.get("revision"))
    try:
        weights = _load_hub_address(address, entry.get("sha256"), label, arch, entry.get("size_mb"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot get the weights {label} from the Hugging Face Hub: {error}\n"
                                f"{manual_route(arch, tag)}") from None
    file = address.filename or WEIGHTS_NAME
    weights.facts = _tag_facts(label, entry, f"`{file}` of the Hub repo `{address.repo_id}` at revision "
                                             f"`{address.revision or 'main'}`")
    return weights


def _load_drive(arch: str, tag: str, entry: dict) -> LoadedWeights:
    """The authors' Drive checkpoint, downloaded and converted on first use (`_fetch`)."""
    label = f"{arch}.{tag}"

    def convert(checkpoint: Path, snapshot: Path, manifest: dict) -> None:
        weights = _load_flax(checkpoint) if entry.get("format") == "flax" else _load_official(checkpoint, arch)
        model = instantiate(weights)
        if model.config.arch != arch:
            raise ValueError(f"it holds weights of {model.config.arch}, not {arch}")
        manifest["read_as"] = weights.source
        model.weights_facts = _drive_facts(label, entry, manifest)
        card = _default_card(model)
        save_pretrained(model, snapshot, overwrite=True, model_card=card)
        write_text_atomic(snapshot / CARD_NAME, card)  # also over the card of an interrupted earlier attempt

    snapshot, manifest = _fetch.fetch_drive_tag(label, entry, manual_route(arch, tag), convert)
    weights = _load_ours(snapshot, f"{label} (Google Drive {entry['checkpoint']}, cached in {snapshot})")
    weights.facts = _drive_facts(label, entry, manifest)
    return weights


def _drive_facts(label: str, entry: dict, manifest: dict) -> CardFacts:
    return _tag_facts(
        label, entry,
        f"converted from `{entry['checkpoint']}` in the authors' Google Drive folder {entry['google_drive_folder']} "
        f"(Drive file id `{manifest.get('drive_file_id')}`, {manifest.get('checkpoint_bytes', 0):,} bytes, "
        f"SHA-256 `{manifest.get('checkpoint_sha256')}`, downloaded {manifest.get('downloaded', 'on an unknown date')})",
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
    (the strict load then names what does not fit).

    A plain state dict saved from `DataParallel` (SSAMBA's Hub files: every key starts with
    `module.`) loses that prefix here, so its keys are those of our model.
    """
    checkpoint = _checkpoint.read_official_checkpoint(path)
    state_dict = _without_dataparallel_prefix(checkpoint.state_dict)
    arch = official_arch_name(checkpoint.arch) if checkpoint.arch else None
    arch = arch or infer_arch(state_dict) or requested_arch
    if arch is None:
        raise ValueError(
            f"{checkpoint.path}: cannot tell which architecture this checkpoint is for "
            f"(known: {', '.join(list_models())})"
        )
    epoch = f", epoch {checkpoint.epoch}" if checkpoint.epoch is not None else ""
    source = f"official checkpoint {checkpoint.path}{epoch}"
    facts = CardFacts(provenance=(f"converted from the authors' checkpoint `{checkpoint.path.name}`{epoch}",),
                      paper=_family_paper(arch))
    return LoadedWeights(_preset_config(arch), state_dict, source, facts)


def _without_dataparallel_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without `module.` when every key has it; unchanged otherwise (the strict load names odd keys)."""
    if state_dict and all(key.startswith(HUB_PREFIX) for key in state_dict):
        return strip_hub_prefix(state_dict)
    return state_dict


def _family_paper(arch: str) -> str | None:
    with torch.device("meta"):
        return PAPERS.get(model_builder(arch)().config.family)


def _load_hub_address(address: _hub.HubAddress, sha256: str | None, source: str, arch: str | None = None,
                      size_mb: float | None = None) -> LoadedWeights:
    """Weights at a Hub address: a hear_msm repo (config.json + model.safetensors), or one file of
    a repo (our .safetensors, with config.json beside it or in its metadata; or a .pth checkpoint,
    read as the authors' checkpoints are)."""
    filename = address.filename or WEIGHTS_NAME
    where = f"hf://{address.repo_id}/{filename}@{address.revision or 'main'}"
    weights_file = _hub.download_file(address.repo_id, filename, revision=address.revision, sha256=sha256)
    if size_mb is not None:
        _check_listed_size(weights_file, size_mb, where)
    if filename.endswith(".safetensors"):
        config_name = str(Path(filename).with_name(CONFIG_NAME).as_posix())
        try:
            _hub.download_file(address.repo_id, config_name, revision=address.revision)
        except FileNotFoundError:
            if address.filename is None:
                raise
        weights = _load_ours(weights_file, f"{source} ({where})")
        weights.facts = CardFacts(provenance=(f"`{filename}` of the Hub repo `{address.repo_id}` at revision "
                                              f"`{address.revision or 'main'}`",))
        return weights
    weights = _load_official(weights_file, arch)
    weights.source = f"{source} ({where}, read as a PyTorch checkpoint)"
    return weights


def _check_listed_size(path: Path, size_mb: float, where: str) -> None:
    """The file's size must round to the size the Hub lists (MB = 10^6 bytes, to the digits given):
    the check that remains where the Hub publishes no checksum."""
    step = Decimal(10) ** Decimal(str(size_mb)).as_tuple().exponent  # 29.3 -> 0.1 MB, 105 -> 1 MB
    low, high = (Decimal(str(size_mb)) - step / 2) * 10**6, (Decimal(str(size_mb)) + step / 2) * 10**6
    size = path.stat().st_size
    if not low <= size <= high:
        raise ValueError(f"{path} ({where}) is {size:,} bytes, but the Hub lists {size_mb} MB for it: the cached "
                         "file is truncated or not the one registered; delete it (`hf cache rm`) and download again")


def _registered_hub_entry(address: _hub.HubAddress) -> dict:
    """The registry tag that pins this Hub file at this revision, if any ({} otherwise)."""
    for entry in load_registry().values():
        for tag in entry.get("tags", {}).values():
            if (tag.get("hub_repo") == address.repo_id and tag.get("revision") == address.revision
                    and (tag.get("hub_file") or WEIGHTS_NAME) == (address.filename or WEIGHTS_NAME)):
                return tag
    return {}


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
            routes = "\n".join(manual_route(arch, t) for t in weight_tags(arch)) or _offline_alternative(arch)
            raise ValueError(f"{arch} has no default weights. To get weights:\n{routes}")
        return _resolve_tag(arch, tag)
    if source.startswith("hf://"):
        address = _hub.parse_hf_uri(source)
        registered = _registered_hub_entry(address)
        return _load_hub_address(address, registered.get("sha256"), source, arch, registered.get("size_mb"))
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
        weights = _load_ours(path, str(path))
        weights.facts = CardFacts(provenance=(f"hear_msm weights from `{path.name}`",))
        return weights
    if _flax_checkpoint.is_flax_checkpoint(path):
        return _load_flax(path)
    return _load_official(path, arch)


def _load_flax(path: Path) -> LoadedWeights:
    """An MW-MAE / MAE run of the authors' Flax trainer (run folder, `checkpoint_<step>` file or Orbax
    directory), read with msgpack and numpy only (no JAX, no pickle), mapped strictly to our keys."""
    from .models.mwmae import flax_weights

    config, state_dict, step = flax_weights(path)
    at = f", step {step}" if step is not None else ""
    facts = CardFacts(provenance=(f"converted from the authors' Flax checkpoint `{Path(path).name}`{at}",),
                      paper=PAPERS.get(config.family))
    return LoadedWeights(config, state_dict, f"Flax checkpoint {path}{at}", facts)


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
    """The registered architecture whose keys and shapes match `state_dict` exactly, if any.

    Keys saved from `DataParallel` (`module.` in front of every key, as in SSAMBA's Hub files)
    are matched without that prefix.
    """
    state_dict = _without_dataparallel_prefix(state_dict)
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
    values = _converted_values(model, weights)
    if isinstance(model, SSAMBAPretrainingModel):
        load_hub_state_dict(model, values)  # also checks the recorded input size (p_input_fdim / tdim)
    else:
        model.load_state_dict(values, strict=True)


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
    model.weights_facts = weights.facts
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
    card = directory / CARD_NAME
    if not card.exists():
        write_text_atomic(card, model_card or _default_card(model))
    return directory


def _default_card(model: MaskedSpectrogramModel) -> str:
    facts = getattr(model, "weights_facts", None) or CardFacts(
        provenance=(f"weights from: {getattr(model, 'weights_source', 'random initialisation')}",))
    return model_card(model.config, facts, params=sum(v.numel() for v in model.state_dict().values()))


def export_for_hub(source: str, directory: str | os.PathLike, repo_id: str | None = None,
                   dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Write `directory` ready for `hf upload` (config.json, model.safetensors, README.md model card)
    from any weight source, and return what the registry needs once it is uploaded.

    The card carries the source's provenance (for a registry tag: its description, where it was
    downloaded from and that file's SHA-256), licence, paper, input settings and published scores.

    Returns:
        {"label": "arch.tag" or None, "arch": ..., "directory": Path, "entry": {"hub_repo",
        "revision" (a placeholder until the upload's commit is known), "sha256"}}.
    """
    from dataclasses import replace

    weights = load_weights(source)
    model = instantiate(weights)
    arch = model.config.arch
    label = source if source.split(".", 1)[0] == arch and source.split(".", 1)[-1] in weight_tags(arch) else None
    repo = repo_id or "<org>/<repo>"
    stored = f"stored as {dtype}".replace("torch.", "") if dtype is not None else "stored as float32"
    facts = replace(weights.facts, load_with=f"hf://{repo}", provenance=(*weights.facts.provenance, stored))
    card = model_card(model.config, facts, params=sum(v.numel() for v in model.state_dict().values()))
    directory = save_pretrained(model, directory, dtype=dtype, overwrite=overwrite, model_card=card)
    write_text_atomic(directory / CARD_NAME, card)  # the card of these weights, even over an older one
    entry = {"hub_repo": repo, "revision": "<the 40-hex commit your upload created>",
             "sha256": _hub.sha256_of_file(directory / WEIGHTS_NAME)}
    return {"label": label, "arch": arch, "directory": directory, "entry": entry}


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
