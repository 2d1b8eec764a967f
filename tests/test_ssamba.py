"""SSAMBA against the authors' code (fixtures made by running it; see fixtures/README.md).

Tolerance policy (float64-anchored): every fixture holds the authors' float32 result and their
float64 result. hear_msm's float32 error against the float64 result must be at most FACTOR times
the authors' own float32 error (recorded in the fixture metadata) plus a small floor; both are
printed. The same tolerances are shown to miss none of the mistakes below by a wide margin.
"""
import json
import math
import warnings
from functools import lru_cache

import pytest
import torch
from conftest import FIXTURES, TESTS_DIR
from random_ssamba_checkpoint import random_ssamba_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

import hear_msm
from hear_msm.models import ssamba
from hear_msm._frontend import KaldiFbankFrontend
from hear_msm.models.ssamba import (BiMambaMixer, SSAMBAConfig, SSAMBAEncoder, SSAMBAPretrainingModel,
                             load_hub_state_dict)

FACTOR = 4.0
TOKEN_FLOOR = 1e-6  # LayerNorm outputs, O(1)
MIXER_FLOOR = 1e-7  # mixer outputs O(1); gradients relative to each tensor's largest entry
FEATURE_FLOOR = 1e-6  # normalised fbank units
SIGNAL_LOG_ENERGY = math.log(1e-4)  # features are compared on bins above this fbank log energy
MISTAKE_MARGIN = 100.0  # a real mistake must exceed the tolerance by at least this factor

HUB = json.loads((TESTS_DIR / "data" / "ssamba_state_dict_keys.json").read_text())
# reference/README.md: parameters of the whole Hub file, and of the encoder (`v.*` without `v.head`)
PARAMS = {"ssamba_tiny": (7_288_296, 6_922_176), "ssamba_small": (26_224_104, 25_345_920),
          "ssamba_base": (99_042_792, 96_698_112)}


def _fixture(name):
    path = str(FIXTURES / name)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return load_file(path), json.loads(metadata["authors_float32_error"])


def _max_error(ours, reference, mask=None):
    diff = (ours.double() - reference).abs()
    return (diff[mask] if mask is not None else diff).max().item()


def _tolerance(authors_error, floor):
    return FACTOR * authors_error + floor


def _check(what, ours, authors, floor):
    tolerance = _tolerance(authors, floor)
    print(f"{what}: hear_msm float32 error {ours:.3g}, authors' float32 error {authors:.3g} "
          f"(vs float64; tolerance {tolerance:.3g})")
    assert ours <= tolerance, what


@lru_cache(maxsize=None)
def _hub_state():
    return random_ssamba_state_dict("ssamba_tiny", seed=0)


def _encoder(kernel="auto"):
    encoder = SSAMBAEncoder(SSAMBAConfig(arch="ssamba_tiny", embed_dim=192), kernel=kernel)
    load_hub_state_dict(encoder, _hub_state())
    return encoder.eval()


@pytest.fixture(scope="module")
def model_fixture():
    tensors, authors = _fixture("ssamba_tiny.safetensors")
    features = tensors["features.float32"]  # [2, 248, 128], the authors' own
    padding = KaldiFbankFrontend().padding_value()
    pad = torch.full((2, 256 - features.shape[1], 128), padding)
    tensors["input"] = torch.cat([features, pad], dim=1)[:, None]  # [2, 1, 256, 128] as their loader pads
    return tensors, authors


def _freq_major_to_time_major(tokens, columns):
    batch, _, dim = tokens.shape
    return tokens.view(batch, 8, columns, dim).transpose(1, 2).reshape(batch, -1, dim)


# ------------------------------------------------------------------------------ layout and counts
@pytest.mark.parametrize("arch", list(PARAMS))
def test_presets_load_the_hub_key_layout_strictly(arch):
    state = {key: torch.empty(shape, device="meta") for key, shape in HUB[arch].items()}
    state["module.p_input_fdim"], state["module.p_input_tdim"] = torch.tensor(128), torch.tensor(1024)
    with torch.device("meta"):
        model = hear_msm.create_model(arch)
        encoder = SSAMBAEncoder(model.config)
    assert {"module." + k: list(v.shape) for k, v in model.state_dict().items()} == HUB[arch]
    with warnings.catch_warnings():  # the two int64 entries are copied onto meta buffers: a no-op
        warnings.filterwarnings("ignore", message=".*meta")
        load_hub_state_dict(model, state)
    load_hub_state_dict(encoder, state)
    total, encoder_params = PARAMS[arch]
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in encoder.parameters()) == encoder_params
    assert model.config.embed_dim == model.v.patch_embed.proj.out_channels == HUB[arch]["module.v.cls_token"][2]


def test_loader_keeps_or_drops_pretraining_entries_by_name_and_names_what_does_not_fit():
    state = _hub_state()
    model = hear_msm.create_model("ssamba_tiny")
    assert isinstance(model, SSAMBAPretrainingModel)
    load_hub_state_dict(model, state)
    assert torch.equal(model.cpredlayer[2].weight, state["module.cpredlayer.2.weight"])
    assert int(model.p_input_tdim) == 1024 and model.p_input_tdim.dtype == torch.int64
    encoder = _encoder()
    assert not hasattr(encoder, "head")
    assert torch.equal(encoder.layers[5].mixer.A_b_log, state["module.v.layers.5.mixer.A_b_log"])
    load_hub_state_dict(encoder, {k[len("module."):]: v for k, v in state.items()})  # prefix already gone

    with pytest.raises(ValueError, match="encoder.*unexpected keys.*blocks.0.x"):
        load_hub_state_dict(encoder, {**state, "module.v.blocks.0.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing keys.*layers.3.mixer.D_b"):
        load_hub_state_dict(encoder, {k: v for k, v in state.items() if k != "module.v.layers.3.mixer.D_b"})
    with pytest.raises(ValueError, match="missing keys.*mask_embed"):
        load_hub_state_dict(model, {k: v for k, v in state.items() if k != "module.mask_embed"})
    with pytest.raises(ValueError, match="shape mismatches.*pos_embed"):
        load_hub_state_dict(encoder, {**state, "module.v.pos_embed": torch.zeros(1, 257, 192)})
    with pytest.raises(ValueError, match="p_input_tdim = 512"):
        load_hub_state_dict(encoder, {**state, "module.p_input_tdim": torch.tensor(512)})
    with pytest.raises(ValueError, match="mixes keys"):
        load_hub_state_dict(encoder, {**state, "v.norm_f.bias": torch.zeros(192)})


def test_config_is_fixed_to_what_ssamba_supports():
    config = hear_msm.create_model("ssamba_tiny", kernel="reference").config
    assert (config.family, config.depth, config.num_frames, config.num_mels, config.grid_freq, config.grid_time) == \
        ("ssamba", 24, 1024, 128, 8, 64)
    mixer = (config.d_state, config.d_conv, config.expand, config.resolved_dt_rank, config.norm_eps)
    assert mixer == (16, 4, 2, 12, 1e-5)
    assert config.frame_embedding_size == 8 * 192
    with pytest.raises(ValueError, match="token_order"):
        SSAMBAConfig(arch="x", embed_dim=192, token_order="time_major")
    with pytest.raises(ValueError, match="even"):
        SSAMBAConfig(arch="x", embed_dim=192, depth=3)
    with pytest.raises(ValueError, match="kernel"):
        hear_msm.create_model("ssamba_tiny", kernel="fast")


def test_bad_input_is_a_clear_error():
    encoder = SSAMBAEncoder(SSAMBAConfig(arch="ssamba_tiny", embed_dim=192, depth=2))
    for shape in [(1, 1, 250, 128), (1, 1, 1040, 128), (1, 1, 64, 80), (1, 64, 128), (1, 1, 0, 128)]:
        with pytest.raises(ValueError, match="multiple of 16"):
            encoder.forward_features(torch.zeros(shape))
    frontend = KaldiFbankFrontend()
    with pytest.raises(ValueError, match="at least 400 samples"):
        frontend(torch.zeros(2, 399))
    with pytest.raises(ValueError, match="clips, samples"):
        frontend(torch.zeros(16000))


def test_positions_are_the_first_columns_of_each_frequency_row():
    encoder = _encoder()
    table = encoder.pos_embed[0]
    positions = encoder.positions(3)[0]
    assert positions.shape == (1 + 8 * 3, 192)
    assert torch.equal(positions[0], table[0])
    for f in range(8):
        for t in range(3):
            assert torch.equal(positions[1 + f * 3 + t], table[1 + f * 64 + t])


# ------------------------------------------------------------------------------ parity
def test_features_match_the_authors_loader(model_fixture):
    tensors, authors = model_fixture
    audio = load_file(str(FIXTURES / "official_audio.safetensors"))["audio"]
    reference = tensors["features.float64"]
    frontend = KaldiFbankFrontend()
    ours = frontend(audio)
    assert ours.shape == reference.shape == (2, frontend.num_frames(audio.shape[1]), 128)
    log_energy = reference * (2 * frontend.std) + frontend.mean
    signal = log_energy > SIGNAL_LOG_ENERGY
    assert signal.float().mean() > 0.9
    authors_error = _max_error(tensors["features.float32"], reference, signal)
    assert authors_error <= authors["features"]  # the recorded error covers all bins
    _check("fbank features (bins above 1e-4 energy)", _max_error(ours, reference, signal), authors_error, FEATURE_FLOOR)
    assert _max_error(frontend(audio.double()), reference) < 1e-9  # float64: same function, every bin


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_whole_model_matches_authors(model_fixture, kernel):
    tensors, authors = model_fixture
    encoder = _encoder(kernel)
    with torch.no_grad():
        tokens = encoder.encode(encoder.patch_tokens(tensors["input"]))  # CLS + freq-major, as theirs
        features = encoder.forward_features(tensors["input"])
    reference = tensors["tokens.float64"]
    _check(f"encoder outputs ({kernel})", _max_error(tokens, reference), authors["tokens"], TOKEN_FLOOR)
    assert features.shape == (2, 16 * 8, 192)
    _check(f"forward_features, time-major ({kernel})",
           _max_error(features, _freq_major_to_time_major(reference[:, 1:], 16)), authors["tokens"], TOKEN_FLOOR)


def test_whole_model_in_float64_equals_authors_float64(model_fixture):
    tensors, _ = model_fixture
    encoder = _encoder("reference").double()
    with torch.no_grad():
        tokens = encoder.encode(encoder.patch_tokens(tensors["input"].double()))
    error = _max_error(tokens, tensors["tokens.float64"])
    print("float64 encoder outputs vs the authors' float64:", error)
    assert error < 1e-10


def _mistakes(encoder, spectrogram):
    """Outputs of plausible implementation mistakes, each comparable to the freq-major fixture tokens."""
    results = {}
    with torch.no_grad():
        tokens = encoder.patch_tokens(spectrogram)
        results["norm_f applied once"] = encoder.norm_f(encoder.residual_stream(tokens))
        results["time-major tokens where the model is frequency-major"] = torch.cat(
            [encoder.encode(tokens)[:, :1], encoder.forward_features(spectrogram)], dim=1)
    # the mixers' backward scan without flipping its output back
    original = BiMambaMixer.forward

    def forward_without_final_flip(mixer, hidden):
        x, gate = mixer.in_proj(hidden).chunk(2, dim=-1)
        backward = mixer.scan_direction(x.flip(1), gate.flip(1), reverse=True)
        return mixer.out_proj((mixer.scan_direction(x, gate, reverse=False) + backward) / 2)

    BiMambaMixer.forward = forward_without_final_flip
    try:
        with torch.no_grad():
            results["backward scan output not flipped back"] = encoder.encode(tokens)
    finally:
        BiMambaMixer.forward = original
    return results


def _swapped(state, pairs):
    """state with the entries whose names end in a and b exchanged, for each (a, b)."""
    swapped = dict(state)
    for a, b in pairs:
        for key in state:
            if key.endswith(a):
                partner = key[:-len(a)] + b
                swapped[key], swapped[partner] = state[partner], state[key]
    return swapped


def test_tolerance_catches_real_mistakes(model_fixture):
    tensors, authors = model_fixture
    reference = tensors["tokens.float64"]
    tolerance = _tolerance(authors["tokens"], TOKEN_FLOOR)
    encoder = _encoder()
    errors = {what: _max_error(out, reference) for what, out in _mistakes(encoder, tensors["input"]).items()}
    # scan directions swapped: each mixer's forward weights on the reversed sequence and vice versa
    directions = [("mixer.A_log", "mixer.A_b_log"), ("mixer.D", "mixer.D_b")]
    directions += [(f"mixer.{layer}.{p}", f"mixer.{layer}_b.{p}")
                   for layer, p in [("conv1d", "weight"), ("conv1d", "bias"), ("x_proj", "weight"),
                                    ("dt_proj", "weight"), ("dt_proj", "bias")]]
    state = _swapped(_hub_state(), directions)
    layer = "module.v.layers.0.mixer."
    assert torch.equal(state[layer + "D"], _hub_state()[layer + "D_b"])
    assert torch.equal(state[layer + "conv1d_b.bias"], _hub_state()[layer + "conv1d.bias"])
    swapped = SSAMBAEncoder(encoder.config)
    load_hub_state_dict(swapped, state)
    with torch.no_grad():
        tokens = swapped.eval().encode(swapped.patch_tokens(tensors["input"]))
    errors["scan directions swapped"] = _max_error(tokens, reference)
    for what, error in errors.items():
        print(f"{what}: error {error:.3g} = {error / tolerance:.3g} x tolerance")
    assert min(errors.values()) > MISTAKE_MARGIN * tolerance, errors


# ------------------------------------------------------------------------------ mixer
def _mixer(kernel, fixture=None):
    tensors = fixture or _fixture("ssamba_mixer.safetensors")[0]
    mixer = BiMambaMixer(SSAMBAConfig(arch="mixer_fixture", embed_dim=32), kernel=kernel)
    mixer.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    return mixer


def _mixer_errors(mixer, tensors, dtype=torch.float32):
    mixer = mixer.to(dtype)
    x = tensors["input"].detach().to(dtype).requires_grad_(True)
    out = mixer(x)
    (out * tensors["grad_output"].to(dtype)).sum().backward()
    errors = {"output": _max_error(out, tensors["output.float64"])}
    for name, grad in [("input", x.grad), *((n, p.grad) for n, p in mixer.named_parameters())]:
        expected = tensors[f"grad.{name}.float64"]
        errors[f"grad.{name}"] = _max_error(grad, expected) / expected.abs().max().item()
    return errors


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_mixer_outputs_and_gradients_match_authors(kernel):
    tensors, authors = _fixture("ssamba_mixer.safetensors")
    errors = _mixer_errors(_mixer(kernel, tensors), tensors)
    assert set(errors) == set(authors)  # every parameter's gradient is covered
    for what, error in errors.items():
        _check(f"mixer {what} ({kernel})", error, authors[what], MIXER_FLOOR)


def test_mixer_in_float64_equals_authors_float64():
    tensors, _ = _fixture("ssamba_mixer.safetensors")
    errors = _mixer_errors(_mixer("reference", tensors), tensors, torch.float64)
    print("float64 mixer vs the authors' float64, max:", max(errors.values()))
    assert max(errors.values()) < 1e-12


def test_compiled_cpu_scan_matches_reference_in_both_directions_with_gradients():
    """Each direction alone, compiled (float32) vs the reference in float64, against the
    reference's own float32 error; inputs and all of that direction's weights get gradients."""
    tensors, _ = _fixture("ssamba_mixer.safetensors")
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(0))
    gate = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    for reverse in (False, True):
        results = {}
        for kernel, dtype in [("cpu", torch.float32), ("reference", torch.float32), ("reference", torch.float64)]:
            mixer = _mixer(kernel, tensors).to(dtype)
            inputs = [t.detach().to(dtype).requires_grad_(True) for t in (x, gate)]
            y = mixer.scan_direction(*inputs, reverse=reverse)
            y.pow(2).sum().backward()
            weights = _direction_parameters(mixer, reverse)
            results[kernel, dtype] = [y] + [t.grad for t in inputs] + [w.grad for w in weights]
        exact = results["reference", torch.float64]
        for kernel in ("cpu", "reference"):
            errors = [_max_error(a, b) / b.abs().max().item() for a, b in zip(results[kernel, torch.float32], exact)]
            results[kernel] = max(errors)
        print(f"reverse={reverse}: compiled {results['cpu']:.3g}, reference {results['reference']:.3g} (vs float64)")
        assert results["cpu"] <= _tolerance(results["reference"], MIXER_FLOOR)


def _direction_parameters(mixer, reverse):
    conv1d, x_proj, dt_proj, A_log, D = mixer.direction_weights(reverse)
    return [conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, dt_proj.bias, A_log, D]


# ------------------------------------------------------------------------------ kernel dispatch
def test_both_directions_use_the_compiled_scan_for_inference_and_training(monkeypatch):
    from hear_msm.ops import selective_scan as scan_ops

    if scan_ops.load_library() is None:
        pytest.skip("no C compiler: the compiled CPU scan is not built here")
    calls = []
    for name in ("selective_scan_cpu", "selective_scan_cpu_autograd"):
        original = getattr(scan_ops, name)
        monkeypatch.setattr(scan_ops, name, lambda *a, _f=original, _n=name, **k: calls.append((_n, a[0].shape)) or _f(*a, **k))
    mixer = _mixer("auto")
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        mixer(x)
    assert calls == [("selective_scan_cpu", (2, 37, 64))] * 2
    calls.clear()
    mixer(x).sum().backward()
    assert calls == [("selective_scan_cpu_autograd", (2, 37, 64))] * 2
    calls.clear()
    _mixer("reference")(x)
    assert calls == []


def test_cuda_path_calls_mamba_ssm_twice_with_its_conventions(monkeypatch):
    """No GPU here: route a CPU tensor through the CUDA branch with mamba-ssm's semantics emulated."""
    from hear_msm.ops.selective_scan import selective_scan_reference

    tensors, authors = _fixture("ssamba_mixer.safetensors")
    calls = []

    def fake_selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
        calls.append(u.shape)
        # mamba-ssm layout: channels first [b, E, L], B/C [b, N, L]; bias + softplus inside
        delta = torch.nn.functional.softplus(delta + delta_bias[:, None]) if delta_softplus else delta
        y = selective_scan_reference(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                     C.transpose(1, 2), D)
        return (y * torch.nn.functional.silu(z.transpose(1, 2))).transpose(1, 2)

    monkeypatch.setattr(ssamba.scan_ops, "load_cuda_scan", lambda: fake_selective_scan_fn)
    monkeypatch.setattr(ssamba.scan_ops, "resolve", lambda kernel, tensor_is_cuda: "cuda")
    with torch.no_grad():
        out = _mixer("auto", tensors)(tensors["input"])
    assert calls == [torch.Size([2, 64, 37])] * 2
    error = _max_error(out, tensors["output.float64"])
    _check("mixer output through the CUDA branch", error, authors["output"], MIXER_FLOOR)


def test_training_reaches_every_parameter():
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(SSAMBAConfig(arch="ssamba_tiny", embed_dim=192, depth=2))
    encoder.reset_parameters()
    out = encoder.forward_features(torch.randn(2, 1, 32, 128))
    assert out.shape == (2, 16, 192)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in encoder.parameters())
