"""precision="bf16": CPU bfloat16 inference with float32 islands (hear_msm._precision).

Three kinds of test, all on real models:
- where each op runs: with bf16 on, every norm, the mLSTM cell, the Mamba step projection and the
  selective scan see and return float32 while the big matmuls return bfloat16; the same check on
  plain autocast (islands removed) and on islands that cast to the wrong dtype finds the
  violations, so it catches a norm run in bfloat16 or a wrong cast, whatever its size in the output;
- how far the embeddings move: the shipped demo weights on the two real recordings in examples/,
  bf16 against a float64 run (relative L2 and cosine), bound stated below;
- the refusals (no native bfloat16, other devices, bad values) and the plumbing (HEAR modules,
  `hear-msm embed --precision`, `eval.run --precision`).
A CPU without native bfloat16 runs the first two with HEAR_MSM_CPU_BF16=1 (PyTorch emulates it).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hear_msm
import hear_msm.ssam_tiny
from hear_msm import _precision
from hear_msm._hear import HearModel, load_hear_model
from hear_msm.cli import main as cli_main, read_audio_16k_mono
from hear_msm.models.mamba import MambaMixer
from hear_msm.ops import selective_scan as scan_ops

from conftest import TESTS_DIR

EXAMPLES = TESTS_DIR.parent / "examples"
DEMO = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]  # the models with shipped weights
FAMILIES = ["ssast_tiny", "ssam_tiny", "axlstm_tiny", "ssamba_tiny", "mwmae_tiny"]


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """Run the bf16 paths on any CPU (emulated where it has no bfloat16 units)."""
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "1")


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    frames = cfg.num_frames if cfg.num_frames <= 256 else 256  # SSAMBA takes shorter inputs: keep it small
    return torch.randn(batch, 1, frames, cfg.num_mels, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ where each op runs
def _norms(model: nn.Module) -> list[nn.Module]:
    from hear_msm.models.xlstm import ResidualGainLayerNorm
    from xlstm.components.ln import LayerNorm as XLSTMLayerNorm

    return [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, ResidualGainLayerNorm,
                                                         XLSTMLayerNorm))]


def dtype_violations(model: nn.Module, spectrogram: torch.Tensor, monkeypatch) -> tuple[list[str], int]:
    """Run `model.forward_features` and list every norm that read or returned a non-float32 tensor
    and every float32 island (mLSTM cell and its gates, Mamba step projection, selective scan) that returned one
    (an island may be handed bfloat16: it computes from it in float32); also count the linear
    layers that returned bfloat16 (bf16 really in use)."""
    from hear_msm.models.xlstm import XLSTMBlock

    norms = _norms(model)
    islands = [m.dt_proj for m in model.modules() if isinstance(m, MambaMixer)]
    islands += [m.dt_proj_b for m in model.modules() if isinstance(m, MambaMixer) and hasattr(m, "dt_proj_b")]
    cells = [m.layer.mlstm_cell for m in model.modules() if isinstance(m, XLSTMBlock)]
    islands += cells + [gate for cell in cells for gate in (cell.igate, cell.fgate)]
    names = {module: name for name, module in model.named_modules()}
    violations, low = [], [0]

    def check(module, inputs, output):
        tensors = (*inputs, output) if module in norms else (output,)
        seen = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if any(d != torch.float32 for d in seen):
            violations.append(f"{names[module]} ({type(module).__name__}): {seen}")

    def count(module, inputs, output):
        low[0] += output.dtype == torch.bfloat16

    hooks = [m.register_forward_hook(check) for m in norms + islands]
    hooks += [m.register_forward_hook(count) for m in model.modules()
              if _precision._base_class(type(m)) is nn.Linear and m not in islands]
    scan = scan_ops.selective_scan_cpu

    def recorded_scan(*args, **kwargs):
        y, state = scan(*args, **kwargs)
        if y.dtype != torch.float32 or state.dtype != torch.float32:
            violations.append(f"selective scan returned {y.dtype}, state {state.dtype}")
        return y, state

    monkeypatch.setattr(scan_ops, "selective_scan_cpu", recorded_scan)
    try:
        with torch.no_grad():
            out = model.forward_features(spectrogram)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.setattr(scan_ops, "selective_scan_cpu", scan)
    if out.dtype != torch.float32:
        violations.append(f"output {out.dtype}")
    return violations, low[0]


@pytest.mark.parametrize("arch", FAMILIES)
def test_islands_compute_in_float32(arch, monkeypatch):
    # AxLSTM's default CPU path computes the cell in C (float32 only, refused otherwise); kernel="cpu"
    # runs xlstm's layer, where the cell and gate modules are the islands
    for kernel in ("auto", "cpu") if arch.startswith("axlstm") else ("auto",):
        model = hear_msm.create_model(arch, precision="bf16", kernel=kernel).eval()
        violations, bf16_linears = dtype_violations(model, _input(model), monkeypatch)
        print(f"{arch} ({kernel}): {bf16_linears} linear layers returned bfloat16; violations: {violations}")
        assert not violations
        assert bf16_linears >= model.config.depth  # the matmuls did run in bfloat16


@pytest.mark.parametrize("arch", ["ssam_tiny", "axlstm_tiny", "ssamba_tiny"])
def test_the_dtype_check_catches_missing_or_wrong_islands(arch, monkeypatch):
    """Plain autocast (no islands) leaves the mLSTM cell and the Mamba step projection in
    bfloat16; islands that cast their inputs to float32 but leave autocast on do the same; a
    LayerNorm fed bfloat16 is caught too. The check above must see each of them."""
    # AxLSTM: kernel="cpu", xlstm's layer with its cell module (the default fused layer's C passes
    # take float32 only: tests/test_fused_defaults.py)
    options = {"kernel": "cpu"} if arch.startswith("axlstm") else {}
    spectrogram = _input(hear_msm.create_model(arch))
    plain = hear_msm.create_model(arch, precision="bf16", **options).eval()
    for module in plain.modules():
        if module is not plain:
            module.__class__ = _precision._base_class(type(module))
    assert dtype_violations(plain, spectrogram, monkeypatch)[0]

    forgetful = hear_msm.create_model(arch, precision="bf16", **options).eval()  # islands that cast but keep autocast on
    for module in forgetful.modules():
        base = _precision._base_class(type(module))
        if base is not type(module) and module is not forgetful and base.__name__ != "XLSTMBlock":
            module.__class__ = type(base.__name__, (base,), {"forward": lambda self, *args, _base=base, **kwargs:
                                                              _base.forward(self, *_precision._float32(args),
                                                                            **_precision._float32(kwargs))})
    assert dtype_violations(forgetful, spectrogram, monkeypatch)[0]

    norm_in_bf16 = hear_msm.create_model(arch, precision="bf16").eval()
    norm = _norms(norm_in_bf16)[0]
    norm.register_forward_pre_hook(lambda module, inputs: tuple(t.bfloat16() for t in inputs))
    assert dtype_violations(norm_in_bf16, spectrogram, monkeypatch)[0]


def test_bf16_and_back_to_fp32():
    """Weights stay float32 and in place: switching back gives the fp32 model's bits; deepcopy keeps the mode."""
    torch.manual_seed(0)
    reference = hear_msm.create_model("axlstm_tiny").eval()
    model = copy.deepcopy(reference)
    x = _input(model)
    _precision.set_precision(model, "bf16")
    assert _precision.model_precision(model) == "bf16" and isinstance(model, type(reference))
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    with torch.no_grad():
        low = model.forward_features(x)
        assert torch.equal(copy.deepcopy(model).forward_features(x), low)
        assert low.dtype == torch.float32 and not torch.equal(low, reference.forward_features(x))
        _precision.set_precision(model, "fp32")
        assert _precision.model_precision(model) == "fp32" and type(model) is type(reference)
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
    assert all(type(a) is type(b) for a, b in zip(model.modules(), reference.modules()))


def test_bf16_weight_copies_follow_the_parameters():
    """The bfloat16 weight copies are remade when the parameters change in place (load_state_dict)."""
    torch.manual_seed(1)
    other = hear_msm.create_model("ssam_tiny").state_dict()
    torch.manual_seed(0)
    model = hear_msm.create_model("ssam_tiny", precision="bf16").eval()
    x = _input(model)
    with torch.no_grad():
        before = model.forward_features(x)
        model.load_state_dict(other)
        after = model.forward_features(x)
        fresh = hear_msm.create_model("ssam_tiny", precision="bf16").eval()
        fresh.load_state_dict(other)
        assert not torch.equal(before, after) and torch.equal(after, fresh.forward_features(x))


# ------------------------------------------------------------------------------ embedding drift
# Bound: relative L2 error (over all timestamp embeddings of a clip) <= 5e-2 and mean cosine
# >= 0.999 against a float64 run. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3);
# every matmul rounds its inputs and its output once, over 12 blocks: measured 1.3e-2 .. 2.7e-2
# here (float32: 4e-5 .. 5e-4). Gross mistakes (a wrong layer, a cast that overflows or drops a
# term) exceed it; one rounding too many does not (the demo models are robust: even a model run
# wholly in bfloat16 stays below 4e-2), which is why the dtype checks above exist.
BOUND_RELATIVE_L2, BOUND_COSINE = 5e-2, 0.999


def _clips() -> list[torch.Tensor]:
    return [torch.from_numpy(read_audio_16k_mono(EXAMPLES / name)[0])[None]
            for name in ("ambi_piano.flac", "guit_em9.flac")]


def _drift(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    relative = ((embeddings.double() - reference).norm() / reference.norm()).item()
    cosine = F.cosine_similarity(embeddings.double(), reference, dim=-1).mean().item()
    return relative, cosine


@pytest.mark.numerics
@pytest.mark.parametrize("arch", DEMO)
def test_bf16_embeddings_close_to_float64(arch):
    source = f"{arch}.debian_cpu_demo"
    reference_model = HearModel(hear_msm.create_model(source, kernel="reference").double()).double()
    fp32 = HearModel(hear_msm.create_model(source))
    bf16 = HearModel(hear_msm.create_model(source, precision="bf16"))
    for clip in _clips():
        reference = reference_model.timestamp_embeddings(clip)[0]
        low, times = bf16.timestamp_embeddings(clip)
        assert low.dtype == torch.float32 and low.shape == reference.shape and torch.isfinite(low).all()
        assert torch.equal(times, fp32.timestamp_embeddings(clip)[1])
        relative, cosine = _drift(low, reference)
        fp32_relative, _ = _drift(fp32.timestamp_embeddings(clip)[0], reference)
        print(f"{arch} {clip.shape[1] / 16000:.1f} s: bf16 relative L2 {relative:.2e}, cosine {cosine:.5f}; "
              f"fp32 relative L2 {fp32_relative:.2e}")
        assert relative <= BOUND_RELATIVE_L2 and cosine >= BOUND_COSINE
        scene = bf16.scene_embeddings(clip)
        assert scene.dtype == torch.float32
        assert _drift(scene, reference_model.scene_embeddings(clip).double())[0] <= BOUND_RELATIVE_L2


@pytest.mark.numerics
def test_the_drift_bound_catches_a_gross_mistake():
    """A wrong cast that loses the signal's scale: the patch embedding's input rounded through
    float16's narrow range after a x1e5 gain (what a cast to the wrong dtype of unnormalised
    features does) moves the embeddings far beyond the bound."""
    source = "ssam_tiny.debian_cpu_demo"
    clip = _clips()[1]
    reference = HearModel(hear_msm.create_model(source, kernel="reference").double()).double()
    reference = reference.timestamp_embeddings(clip)[0]
    model = hear_msm.create_model(source, precision="bf16")
    model.patch_embed.register_forward_pre_hook(
        lambda module, inputs: ((inputs[0] * 1e5).half().clamp(-6e4, 6e4).to(inputs[0].dtype) / 1e5,))
    relative, cosine = _drift(HearModel(model).timestamp_embeddings(clip)[0], reference)
    print(f"float16-clamped features: relative L2 {relative:.2e}, cosine {cosine:.5f}")
    assert relative > BOUND_RELATIVE_L2 or cosine < BOUND_COSINE


# ------------------------------------------------------------------------------ refusals
def test_precision_values_and_devices():
    for bad in ("bfloat16", "BF16", "fp16", None, 16):
        with pytest.raises(ValueError, match="precision must be one of"):
            _precision.check_precision(bad)
    assert _precision.check_precision("fp32", "cuda", native_bf16=False) == "fp32"
    assert _precision.check_precision("bf16", "cpu", native_bf16=True) == "bf16"
    with pytest.raises(ValueError, match="CPU inference only"):
        _precision.check_precision("bf16", "cuda", native_bf16=True)
    with pytest.raises(ValueError, match="native bfloat16"):
        _precision.check_precision("bf16", native_bf16=False)
    model = hear_msm.create_model("ssast_tiny", precision="bf16")
    with pytest.raises(ValueError, match="CPU only"):
        model.forward_features(torch.empty(1, 1, 200, 80, device="meta"))


def test_refused_without_native_bf16(monkeypatch):
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    assert not _precision.cpu_has_native_bf16()
    for load in (lambda: hear_msm.create_model("ssam_tiny.debian_cpu_demo", precision="bf16"),
                 lambda: hear_msm.load_model("ssam_tiny.debian_cpu_demo", precision="bf16"),
                 lambda: hear_msm.ssam_tiny.load_model("no/such/weights", precision="bf16")):  # before the weights
        with pytest.raises(ValueError, match="native bfloat16 arithmetic .* use precision='fp32'"):
            load()
    assert hear_msm.create_model("ssam_tiny", precision="fp32") is not None
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "maybe")
    with pytest.raises(ValueError, match="HEAR_MSM_CPU_BF16 must be 0"):
        _precision.cpu_has_native_bf16()


def test_detection_reads_this_cpu(monkeypatch):
    monkeypatch.delenv(_precision.ENV_OVERRIDE)
    flags = _precision.cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert _precision.cpu_has_native_bf16()
    elif flags and "bf16" not in flags:
        assert not _precision.cpu_has_native_bf16()


# ------------------------------------------------------------------------------ plumbing
def test_hear_module_precision():
    import hear_msm.axlstm_tiny as module

    clip = _clips()[0]
    fp32 = module.load_model("axlstm_tiny.debian_cpu_demo")
    bf16 = module.load_model("axlstm_tiny.debian_cpu_demo", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    low, times = module.get_timestamp_embeddings(clip, bf16)
    high, _ = module.get_timestamp_embeddings(clip, fp32)
    assert low.dtype == torch.float32 and low.shape == high.shape and not torch.equal(low, high)
    assert module.get_scene_embeddings(clip, bf16).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        load_hear_model("axlstm_tiny", "axlstm_tiny.debian_cpu_demo", precision="half")


def test_cli_embed_precision(tmp_path, monkeypatch, capsys):
    audio = str(EXAMPLES / "ambi_piano.flac")
    out = tmp_path / "e.npz"
    args = ["embed", audio, "--model", "ssast_tiny", "--weights", "ssast_tiny.debian_cpu_demo", "--out", str(out)]
    assert cli_main([*args, "--precision", "bf16"]) == 0
    with np.load(out) as saved:
        assert str(saved["precision"]) == "bf16" and saved["timestamp_embeddings_0000"].dtype == np.float32
    monkeypatch.setenv(_precision.ENV_OVERRIDE, "0")
    assert cli_main([*args, "--precision", "bf16", "--overwrite"]) == 2
    assert "native bfloat16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*args, "--precision", "fp16"])


def test_eval_run_precision():
    from eval.run import check_model_loads, parse_models

    (spec,) = parse_models("ssam_tiny", ["ssam_tiny=ssam_tiny.debian_cpu_demo"], "time", "bf16")
    assert spec.label == "ssam_tiny+bf16" and spec.options["precision"] == "bf16"
    check_model_loads(spec)
    (spec,) = parse_models("ssam_tiny", [], "official", "bf16")
    assert spec.label == "ssam_tiny+official+bf16" and spec.options == {"layout": "official", "precision": "bf16"}
    (spec,) = parse_models("json", [], "time", "bf16")  # other HEAR modules: hear_msm's option only
    assert spec.options == {}
