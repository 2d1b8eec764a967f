"""hear_msm: masked spectrogram models (SSAST, SSAM, AxLSTM) as HEAR embedding models.

    >>> import hear_msm
    >>> hear_msm.list_models()
    ['ssast_tiny', 'ssast_small', 'ssast_base', 'ssam_tiny', ..., 'axlstm_base']
    >>> model = hear_msm.create_model("ssam_tiny")               # random init, official key layout
    >>> model = hear_msm.load_model("path/to/run_or_weights")     # architecture read from the weights

For HEAR embeddings use the per-model modules, e.g. `hear_msm.ssam_tiny.load_model()`.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

# The family modules register their presets on import; this order is the order of list_models().
from . import models as _models  # noqa: E402,F401  registers the families
from .models.encoder import EncoderConfig, MaskedSpectrogramModel, SpectrogramEncoder  # noqa: E402
from .models.registry import list_models  # noqa: E402
from .models.mamba import MambaConfig  # noqa: E402
from .models.transformer import TransformerConfig  # noqa: E402
from .models.xlstm import XLSTMConfig  # noqa: E402
from .models.mwmae import MWMAEConfig  # noqa: E402
from .models.ssamba import SSAMBAConfig  # noqa: E402

__all__ = [
    "__version__", "list_models", "create_model", "load_model",
    "EncoderConfig", "TransformerConfig", "MambaConfig", "XLSTMConfig", "SSAMBAConfig", "MWMAEConfig",
    "MaskedSpectrogramModel", "SpectrogramEncoder",
]


def create_model(name: str, pretrained: bool | str = False, kernel: str = "auto",
                 precision: str = "fp32", compile: bool = False) -> MaskedSpectrogramModel:
    """Build a registered architecture, optionally with weights.

    name: an architecture from `list_models()`, or "arch.tag" to load that weight tag.
    pretrained: False (random init), True (the architecture's default tag: the published weights,
        downloaded into the Hugging Face cache on first use) or any weight source accepted by
        `load_model` (path, "hf://org/repo@rev", "hf://org/repo/file.pth@rev", tag). Weights must
        match the architecture exactly; a checkpoint of another family or size is an error.
    kernel: a runtime choice; each family accepts its own values and refuses others (ValueError
        naming them). SSAM, the selective scan, "auto" | "cuda" | "cpu" | "reference": "auto"
        takes mamba-ssm's fused kernel on CUDA and the compiled CPU scan on CPU, else the PyTorch
        reference; "cpu" and "cuda" demand their kernel. AxLSTM, the mLSTM layer
        (`hear_msm.models.xlstm.set_mlstm_kernel`), "auto" | "cpu" | "fused" | "reference": "auto" takes
        the compiled fused layer for inference on CPU (as accurate against float64 as xlstm's form),
        "fused" demands it, "cpu" is xlstm's layer around a compiled cell bit-identical to xlstm's,
        "reference" keeps xlstm's PyTorch form. SSAST (and MW-MAE / MAE), "auto" | "onednn" |
        "reference": "auto" runs the block's Linear layers with oneDNN epilogues (bias, residual add,
        exact GELU) for float32 inference on CPU at widths up to 192, "onednn" demands it at any
        width, "reference" is the plain PyTorch block (`hear_msm.models.transformer.resolve`).
        SSAMBA as SSAM (both scan directions).
    precision: "fp32" (default) or "bf16": inference with bfloat16 matmuls and float32 norms, scan
        state and mLSTM cell, float32 outputs; CPUs with native bfloat16 only (ValueError otherwise).
        See `hear_msm._precision`.
    compile: True compiles `forward_features` with torch.compile for inference (the first call per
        input shape compiles; the result is cached on disk per machine and architecture). For long
        evaluations; see `hear_msm._compile`.
    """
    from .models.registry import model_builder

    if not isinstance(name, str):
        raise ValueError(f"model name must be a string: one of {list_models()}, or '<arch>.<tag>' for registered "
                         f"weights; got {type(name).__name__} {name!r:.60}")
    if not (type(pretrained) is bool or isinstance(pretrained, (str, os.PathLike))):
        from ._weights import ACCEPTED

        raise ValueError(f"pretrained must be False (random initialisation), True (the default weights) or a weight "
                         f"source; got {type(pretrained).__name__} {pretrained!r:.60}. {ACCEPTED}")
    arch, _, tag = name.partition(".")
    if tag:
        if pretrained not in (False, True, ""):
            raise ValueError(f"{name!r} already names weights; do not pass pretrained={pretrained!r} as well")
        pretrained = f"{arch}.{tag}"
    _check_runtime_options(precision, compile)
    model = model_builder(arch)(kernel=kernel)
    if pretrained is not False:
        from ._weights import load_state_strict, load_weights

        weights = load_weights("" if pretrained is True else pretrained, arch=arch)
        load_state_strict(model, weights)
        model.weights_source = weights.source
        model.weights_facts = weights.facts
    return _apply_runtime_options(model, precision, compile)


def load_model(source: str | os.PathLike, kernel: str = "auto", precision: str = "fp32",
               compile: bool = False) -> MaskedSpectrogramModel:
    """Load a model from weights alone; the architecture comes from the weights.

    source: our format (folder with config.json + model.safetensors, or the .safetensors file),
        "hf://org/repo[@revision]", "hf://org/repo/file.pth[@revision]", an official run folder or
        .pth checkpoint (read without executing pickle code), or "arch.tag" (a registered tag,
        downloaded on first use if it is not shipped).
    kernel, precision, compile: as in `create_model`.
    """
    from ._weights import instantiate, load_weights

    _check_runtime_options(precision, compile)
    return _apply_runtime_options(instantiate(load_weights(source), kernel=kernel), precision, compile)


def _check_runtime_options(precision: str, compile: bool) -> None:
    """ValueError for a precision or compile value this machine cannot run, before any weights are read."""
    from ._compile import check_compile
    from ._precision import check_precision

    check_precision(precision)
    check_compile(compile, precision)


def _apply_runtime_options(model: MaskedSpectrogramModel, precision: str, compile: bool) -> MaskedSpectrogramModel:
    """`model` switched to `precision` (`hear_msm._precision`), then compiled if asked (`hear_msm._compile`)."""
    from ._compile import compile_encoder
    from ._precision import set_precision

    model = set_precision(model, precision)
    return compile_encoder(model) if compile else model
