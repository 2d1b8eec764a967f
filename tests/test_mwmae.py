"""MW-MAE / MAE: the authors' Flax checkpoints read without JAX, mapped strictly, and parity with their code.

Fixtures (fixtures/README.md, "MW-MAE / MAE"): real checkpoints written by the pinned flax / orbax
for tiny configs, flax's own decoding of them, and outputs of the authors' HEAR wrapper and decoder
on seeded random trees (rebuilt here by tests/flax_random_tree.py) in float32, float64 and bfloat16.

Tolerance policy (float64-anchored): hear_msm's float32 error against the authors' float64 result
must be at most FACTOR x the authors' own float32 error against it (measured when the fixture was
made, stored in its metadata) plus a small floor; both are printed.
"""
import ast
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import hear_msm
import torch.nn.functional as F
from conftest import FIXTURES, TESTS_DIR
from flax_random_tree import random_flax_params, reference_params, reference_tree
from safetensors import safe_open
from safetensors.torch import load_file

from hear_msm._flax_checkpoint import (decode_flax_msgpack, find_flax_checkpoint, flax_decoder_state,
                                       flax_encoder_state, read_flax_checkpoint)
from hear_msm._frontend import LogMelFrontend

FACTOR = 4.0
FLOOR = 1e-5
MEAN_FLOOR = 1e-6
# torch's log-mel (theirs and ours: the same code) moves by up to 1.8e-4 with ATEN_CPU_CAPABILITY=default
# on the fixture audio (4.9e-5 at the avx2 / avx512 levels), mostly through the per-clip mean and std
FEATURE_FLOOR = 3e-4
FLAX = FIXTURES / "flax"
DECODED = json.loads((FLAX / "flax_decoded.json").read_text())
ENCODER_PARAMS = {"mwmae_base": 85_297_920, "mae_base": 85_299_456}
DECODER_PARAMS = {"mwmae_base": 7_516_656, "mae_base": 7_515_328}


@pytest.fixture(scope="module")
def mwmae():
    # imported here, not at collection: importing registers the presets, and the registry tests of
    # the nine original models (test_models.py) must not see them until the family is integrated
    from hear_msm.models import mwmae
    return mwmae


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load(module, arrays) -> None:
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, strict=True)


# ------------------------------------------------------------------------------------ mapping
@pytest.fixture(scope="module")
def mapped(mwmae):
    """{model: (Flax params, encoder state arrays, the encoder on meta)} of the seeded reference trees."""
    out = {}
    for model in ENCODER_PARAMS:
        params = reference_params(model, seed=0)
        with torch.device("meta"):
            encoder = getattr(mwmae, model)()
        out[model] = params, flax_encoder_state(params, _shapes(encoder)), encoder
    return out


@pytest.mark.parametrize("model", list(ENCODER_PARAMS))
def test_reference_tree_maps_strictly_and_counts(model, mapped, mwmae):
    params, state, encoder = mapped[model]
    decoder_config = mwmae.MWMAE_DECODER if model == "mwmae_base" else mwmae.MAE_DECODER
    with torch.device("meta"):
        decoder = mwmae.MaskedAutoencoderDecoder(decoder_config, encoder.config)
    decoded = flax_decoder_state(params, _shapes(decoder))
    assert sum(v.size for v in state.values()) == sum(p.numel() for p in encoder.parameters()) == ENCODER_PARAMS[model]
    assert sum(v.size for v in decoded.values()) == DECODER_PARAMS[model]
    # every leaf of the authors' tree is used once, by the encoder or by the decoder
    assert sum(v.size for v in params.values()) == ENCODER_PARAMS[model] + DECODER_PARAMS[model]
    assert mwmae.infer_flax_arch(params) == model
    # positions are trained parameters; Dense kernels arrive transposed, the conv kernel as (out, in, t, f)
    assert encoder.pos_embed.requires_grad
    np.testing.assert_array_equal(state["blocks.3.attn.qkv_layer.weight"],
                                  params["encoder_block_03/Attention_0/Dense_0/kernel"].T)
    np.testing.assert_array_equal(state["patch_embed.proj.weight"][5, 0, 2, 7],
                                  params["patch_embed/proj/kernel"][2, 7, 0, 5])


def test_reference_tree_matches_the_shared_reference(mwmae):
    shapes, dtypes = reference_tree("mwmae_base")
    assert dtypes["mask_token"] == "bfloat16" and shapes["pos_embed"] == (1, 250, 768)
    assert reference_tree("mae_base")[0]["cls_token"] == (1, 1, 768)


def _tiny(model, mwmae):
    recipe = DECODED[model]
    params = random_flax_params(recipe["shapes"], recipe["seed"], set(recipe["bfloat16"]))
    config = mwmae.MWMAEConfig(arch=model, embed_dim=16, depth=2, num_heads=2,
                               cls_token=model == "mae_tiny")
    return params, mwmae.MWMAEEncoder(config)


def test_mapping_refuses_what_does_not_fit(mwmae):
    params, encoder = _tiny("mwmae_tiny", mwmae)
    expected = _shapes(encoder)
    flax_encoder_state(params, expected)  # fits
    with pytest.raises(ValueError, match="missing"):
        flax_encoder_state({k: v for k, v in params.items() if k != "encoder_block_01/LayerNorm_1/scale"}, expected)
    with pytest.raises(ValueError, match="neither"):
        flax_encoder_state({**params, "head/kernel": np.zeros((16, 10), np.float32)}, expected)
    with pytest.raises(ValueError, match="unexpected.*cls_token"):
        flax_encoder_state(_tiny("mae_tiny", mwmae)[0], expected)  # MAE's tree into MW-MAE's encoder
    with pytest.raises(ValueError, match="shapes"):
        kernel = params["encoder_block_00/Mlp_0/Dense_0/kernel"]
        flax_encoder_state({**params, "encoder_block_00/Mlp_0/Dense_0/kernel": kernel.T}, expected)
    with pytest.raises(ValueError, match="windowed encoder"):
        windowed = {**params, "encoder_block_00/wmha_block/qkv/kernel": np.zeros((16, 48), np.float32)}
        flax_encoder_state(windowed, expected)
    shallow = {k: v for k, v in params.items() if not k.startswith("encoder_block_01")}
    with pytest.raises(ValueError, match="missing"):
        flax_encoder_state(shallow, expected)
    assert mwmae.infer_flax_arch(params) is None  # no preset of this size
    with pytest.raises(ValueError, match="neither"):
        flax_decoder_state({**params, "decoder_head/kernel": np.zeros((16, 4), np.float32)}, {})


# ------------------------------------------------------------------------------------ reader
def _flat(tree, prefix=""):
    """Nested dicts / lists -> {path: {shape, dtype, sha256}} as the fixture maker recorded flax's decoding."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(_flat(value, f"{prefix}/{i}" if prefix else str(i)))
    elif tree is not None:
        array = np.asarray(tree)
        dtype = getattr(tree, "stored_dtype", None) or str(array.dtype)
        out[prefix] = {"shape": list(array.shape), "dtype": dtype,
                       "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    return out


@pytest.mark.parametrize("name", ["mwmae_tiny_legacy", "mwmae_tiny_orbax", "mae_tiny_legacy",
                                  "flax_ext_types.msgpack", "orbax_tuple.msgpack"])
def test_reader_decodes_like_flax(name):
    """Every leaf of the whole train state (Adam moments, RNG keys, buffers, step) equals flax's decoding."""
    path = FLAX / name
    file = path if path.is_file() else find_flax_checkpoint(path)
    entries, keys = decode_flax_msgpack(file)
    assert _flat(entries) == DECODED[name]["leaves"]
    if not path.is_file():
        assert keys == DECODED[name]["top_level"]


@pytest.mark.parametrize("name", ["mwmae_tiny_legacy", "mwmae_tiny_orbax", "mae_tiny_legacy"])
def test_reader_gives_the_saved_params_and_they_load(name, mwmae):
    model = name.rsplit("_", 1)[0]
    recipe = DECODED[model]
    checkpoint = read_flax_checkpoint(FLAX / name)
    assert checkpoint.step == recipe["step"] == 3
    expected = random_flax_params(recipe["shapes"], recipe["seed"], set(recipe["bfloat16"]))
    assert set(checkpoint.params) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(checkpoint.params[key], value, err_msg=key)
    assert {k for k, v in checkpoint.dtypes.items() if v == "bfloat16"} == set(recipe["bfloat16"])
    # strict mapping into hear_msm modules of the same reduced size
    config = mwmae.MWMAEConfig(arch=model, embed_dim=16, depth=2, num_heads=2,
                               cls_token=model == "mae_tiny")
    encoder = mwmae.MWMAEEncoder(config)
    _load(encoder, flax_encoder_state(checkpoint.params, _shapes(encoder)))
    windows = mwmae.MWMAE_DECODER.window_sizes if model == "mwmae_tiny" else (0,) * 8
    decoder_config = mwmae.MultiWindowDecoderConfig(embed_dim=16, depth=1, window_sizes=windows)
    decoder = mwmae.MaskedAutoencoderDecoder(decoder_config, config)
    _load(decoder, flax_decoder_state(checkpoint.params, _shapes(decoder)))
    tokens = encoder.forward_features(torch.randn(2, 1, 200, 80))
    assert tokens.shape == (2, 250, 16) and torch.isfinite(tokens).all()


def test_paths_resolve_to_the_newest_step(tmp_path):
    legacy = FLAX / "mwmae_tiny_legacy" / "checkpoint_3"
    orbax = FLAX / "mwmae_tiny_orbax" / "checkpoint_3"
    assert find_flax_checkpoint(legacy) == legacy
    assert find_flax_checkpoint(orbax) == orbax / "checkpoint"
    assert find_flax_checkpoint(orbax / "checkpoint") == orbax / "checkpoint"
    run = tmp_path / "run"
    run.mkdir()
    for step in (5, 12):
        shutil.copy(legacy, run / f"checkpoint_{step}")
    shutil.copytree(orbax, run / "checkpoint_9")
    (run / "checkpoint_40.orbax-checkpoint-tmp-1").mkdir()  # an interrupted save is not a step
    (run / "config.json").write_text("{}")
    assert find_flax_checkpoint(run) == run / "checkpoint_12"
    shutil.copytree(orbax, run / "checkpoint_100")
    assert find_flax_checkpoint(run) == run / "checkpoint_100" / "checkpoint"
    assert read_flax_checkpoint(run).path == run / "checkpoint_100" / "checkpoint"


def test_reader_refuses_what_is_not_a_complete_flax_checkpoint(tmp_path):
    data = (FLAX / "mwmae_tiny_legacy" / "checkpoint_3").read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "trailing": (data + b"\x00", "after the end"),
        "trailing_partial_object": (data + b"\x92", "after the end"),
        "torch_zip": (b"PK\x03\x04" + bytes(100), "not a Flax msgpack checkpoint"),
        "no_params": (bytes([0x81, 0xA4]) + b"step" + bytes([0x03]), "without a 'params' tree"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "checkpoint_1").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_flax_checkpoint(folder)
    (tmp_path / "model.msgpack").write_bytes(data)
    with pytest.raises(ValueError, match="not named like a Flax checkpoint"):
        read_flax_checkpoint(tmp_path / "model.msgpack")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint_"):
        find_flax_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_flax_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoint_7").mkdir()
    with pytest.raises(FileNotFoundError, match="not an Orbax checkpoint"):
        find_flax_checkpoint(tmp_path / "checkpoint_7")


def test_reader_imports_only_msgpack_numpy_and_the_standard_library():
    source = (TESTS_DIR.parent / "hear_msm" / "_flax_checkpoint.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "re", "dataclasses", "pathlib", "typing", "msgpack", "numpy"}, imported
    # the module alone (not through the hear_msm package, which imports torch) reads a checkpoint
    module = TESTS_DIR.parent / "hear_msm" / "_flax_checkpoint.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('reader', {str(module)!r})\n"
            "reader = importlib.util.module_from_spec(spec); sys.modules['reader'] = reader\n"
            "spec.loader.exec_module(reader)\n"
            f"assert reader.read_flax_checkpoint({str(FLAX / 'mwmae_tiny_orbax')!r}).step == 3\n"
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'orbax', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ decoder parity
def _within_policy(name, ours, reference, authors_error, quiet=False, floor=FLOOR):
    """max |ours - reference| <= FACTOR * authors_error + floor; returns (error, bound)."""
    error = (ours.double() - reference.double()).abs().max().item()
    bound = FACTOR * authors_error + floor
    if not quiet:
        print(f"{name}: hear_msm float32 {error:.3g}, authors float32 {authors_error:.3g}, bound {bound:.3g}")
    assert error <= bound, (name, error, bound)
    return error, bound


@pytest.mark.parametrize("model", ["mwmae", "mae"])
def test_decoder_matches_the_authors_outputs_and_gradients(model, mwmae):
    path = FIXTURES / "mwmae_decoder_reference.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    dims, errors = json.loads(meta["dims"]), json.loads(meta["authors_float32_error"])
    params = random_flax_params(json.loads(meta["shapes"])[model], int(meta["seed"]))
    encoder_config = mwmae.MWMAEConfig(arch="decoder_test", embed_dim=dims["embed_dim"], depth=1, num_heads=3,
                                       cls_token=model == "mae")
    windows = tuple(dims["mwmae_window_sizes"]) if model == "mwmae" else (0,) * 8
    config = mwmae.MultiWindowDecoderConfig(embed_dim=dims["decoder_embed_dim"], depth=dims["decoder_depth"],
                                            num_heads=dims["decoder_num_heads"], window_sizes=windows)
    decoder = mwmae.MaskedAutoencoderDecoder(config, encoder_config)
    sources = {}  # Flax path -> hear_msm key
    _load(decoder, flax_decoder_state(params, _shapes(decoder), sources))
    ratios = {}
    for dtype in (torch.float64, torch.float32):
        decoder = decoder.to(dtype)
        latent = tensors[f"{model}.latent"].to(dtype).requires_grad_(True)
        output = decoder(latent, tensors[f"{model}.restore_index"])
        (output * tensors[f"{model}.grad_output"].to(dtype)).sum().backward()
        ours = {"output": output.detach(), "grad.latent": latent.grad}
        ours.update({f"grad.{flax_path}": dict(decoder.named_parameters())[key].grad
                     for flax_path, key in sources.items()})
        for name, value in ours.items():
            reference = tensors[f"{model}.{name}.float64"]
            if name.endswith("/kernel"):
                value = value.T  # Flax kernels are (in, out)
            value = value.reshape(reference.shape)
            if dtype == torch.float64:  # the same math in float64 agrees to rounding...
                # ...except that their forward casts the positions to float32 (`.astype(jnp.float32)`),
                # so their float64 gradient for the positions passes through float32
                relative = 2.0 ** -23 if name == "grad.decoder_pos_embed" else 1e-10
                scale = max(1.0, reference.abs().max().item())
                assert (value - reference).abs().max().item() <= relative * scale, name
            else:
                error, _ = _within_policy(name, value, reference, errors[f"{model}.{name}"], quiet=True)
                ratios[name] = (error, errors[f"{model}.{name}"])
        decoder.zero_grad()
    worst = sorted(ratios.items(), key=lambda item: item[1][0] / item[1][1])[-3:]
    print(f"{model} decoder, {len(ratios)} tensors (output, input and parameter gradients): output hear_msm "
          f"{ratios['output'][0]:.3g} vs authors {ratios['output'][1]:.3g}; largest ratios " +
          ", ".join(f"{n} {e:.3g} vs {a:.3g}" for n, (e, a) in worst))


# ------------------------------------------------------------------------------------ whole models
@pytest.fixture(scope="module")
def audio():
    return load_file(str(FIXTURES / "official_audio.safetensors"))["audio"]  # [2, 40000], 2.5 s


@pytest.fixture(scope="module")
def encoders(mapped):
    out = {}
    for model, (_, state, meta_encoder) in mapped.items():
        encoder = meta_encoder.to_empty(device="cpu")  # storage only; every value comes from the tree
        _load(encoder, state)
        out[model] = encoder.eval()
    return out


def _reference(model, kind):
    path = str(FIXTURES / f"{model}_{kind}.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), json.loads(meta["errors_vs_float64"])


def _official_layout(encoder, features):
    """The authors' wrapper around an encoder: features [n, frames, 80] reflect-padded to whole
    200-frame chunks (a whole extra chunk at exact multiples), 50 x 5D per chunk, the padded tail's
    int(50 * pad / 200) columns trimmed -> [n, columns, 5D]."""
    n, frames, mels = features.shape
    pad = 200 - frames % 200
    padded = F.pad(features[:, None], (0, 0, 0, pad), mode="reflect")  # [n, 1, frames + pad, 80]
    chunks = (frames + pad) // 200
    tokens = encoder.forward_features(padded.reshape(n * chunks, 1, 200, mels))  # [n*chunks, 250, D]
    assert tokens.shape[1:] == (250, encoder.config.embed_dim)
    columns = tokens.reshape(n, chunks * 50, -1)  # time-major tokens: 5 frequency tokens per 40 ms
    return columns[:, : chunks * 50 - int(50 * pad / 200)]


@pytest.mark.parametrize("model", list(ENCODER_PARAMS))
def test_whole_model_matches_the_authors_wrapper_in_float64(model, encoders, audio):
    reference, authors = _reference(model, "reference")
    expected = reference["timestamp_embeddings.float64_as_float32"]
    # front end: their log-mel is hear_msm's LogMelFrontend (log(x + eps), standardised per clip, time first)
    features = LogMelFrontend()(audio)
    feature_error, _ = _within_policy(f"{model} features", features, reference["features.float64"],
                                      authors["float32.features"]["max_abs"], floor=FEATURE_FLOOR)
    with torch.no_grad():
        # the encoder on the very input their float64 run saw
        encoded = _official_layout(encoders[model], reference["features.float64"].float())
        assert encoded.shape == expected.shape == (2, 63, 3840)
        _within_policy(f"{model} encoder (float64 features as input)", encoded, expected,
                       authors["float32.timestamp_embeddings"]["max_abs"])
        mean_error = (encoded.double() - expected.double()).abs().mean().item()
        mean_authors = authors["float32.timestamp_embeddings"]["mean_abs"]
        print(f"{model} encoder, mean |error|: hear_msm float32 {mean_error:.3g}, authors float32 {mean_authors:.3g}")
        assert mean_error <= FACTOR * mean_authors + MEAN_FLOOR
        # audio to embeddings: the bound adds the front end's own deviation (below 1 after the encoder)
        embeddings = _official_layout(encoders[model], features)
    _within_policy(f"{model} timestamp embeddings from audio", embeddings, expected,
                   authors["float32.timestamp_embeddings"]["max_abs"], floor=FLOOR + feature_error)
    _within_policy(f"{model} scene embeddings from audio", embeddings.mean(1), reference["scene.float64"],
                   authors["float32.scene"]["max_abs"], floor=FLOOR + feature_error)
    # their timestamps: evenly spread from 0 over the clip, 2500 ms / 63 apart
    torch.testing.assert_close(reference["timestamps"][0], 2500 / 63 * torch.arange(63.0), rtol=0, atol=1e-3)


def test_tolerance_catches_real_mistakes(encoders):
    """Each mistake moves MW-MAE-B's first 2 s chunk far beyond the parity bounds: the max-error
    bound of the policy, and the same policy on the mean error (where a systematic mistake such as
    the GELU form shows while rounding noise averages out)."""
    reference, authors = _reference("mwmae_base", "reference")
    expected = reference["timestamp_embeddings.float64_as_float32"][:1, :50].double()  # clip 0, chunk 0
    embeddings = authors["float32.timestamp_embeddings"]
    max_bound = FACTOR * embeddings["max_abs"] + FLOOR
    mean_bound = FACTOR * embeddings["mean_abs"] + MEAN_FLOOR
    chunk = reference["features.float64"][:1, None, :200].float()
    encoder = encoders["mwmae_base"]

    def errors(tokens):
        difference = (tokens.reshape(1, 50, -1).double() - expected).abs()
        return difference.max().item() / max_bound, difference.mean().item() / mean_bound

    with torch.no_grad():
        tokens = encoder.forward_features(chunk)
        correct = errors(tokens)
        mistakes = {"frequency-major token order": errors(tokens.view(1, 50, 5, -1).transpose(1, 2))}
        for block in encoder.blocks:
            block.mlp.gelu_approximate = "none"
        mistakes["exact GELU instead of tanh"] = errors(encoder.forward_features(chunk))
        for block in encoder.blocks:
            block.mlp.gelu_approximate = "tanh"
            block.attn.proj_layer.weight.copy_(block.attn.proj_layer.weight.T.clone())
        mistakes["square Dense kernels not transposed"] = errors(encoder.forward_features(chunk))
        for block in encoder.blocks:
            block.attn.proj_layer.weight.copy_(block.attn.proj_layer.weight.T.clone())
        assert errors(encoder.forward_features(chunk)) == correct  # restored
    print(f"error / bound (max, mean): correct {correct[0]:.2g}, {correct[1]:.2g}; " +
          "; ".join(f"{k} {a:.3g}, {b:.3g}" for k, (a, b) in mistakes.items()))
    assert max(correct) <= 1
    # layout and kernel mistakes: five orders of magnitude; the GELU form, the subtlest, still > 20x
    gross = mistakes["frequency-major token order"] + mistakes["square Dense kernels not transposed"]
    assert min(gross) >= 1e4, mistakes
    assert min(mistakes["exact GELU instead of tanh"]) >= 20, mistakes


@pytest.mark.parametrize("model", list(ENCODER_PARAMS))
def test_bfloat16_effect_of_the_authors_wrapper(model):
    """Their published configs compute the encoder in bfloat16 (cast to float32 at the end); measured here."""
    reference, authors = _reference(model, "reference")
    bf16, _ = _reference(model, "bfloat16")
    embeddings = bf16["timestamp_embeddings.bfloat16"].float()
    exact = reference["timestamp_embeddings.float64_as_float32"].double()
    error = (embeddings.double() - exact).abs()
    scene_error = (bf16["scene.bfloat16"].double() - reference["scene.float64"]).abs().max().item()
    float32 = authors["float32.timestamp_embeddings"]["max_abs"]
    print(f"{model} bfloat16 vs float64: timestamp embeddings max {error.max():.3g} (mean {error.mean():.3g}, "
          f"{error.max() / exact.abs().max():.2%} of max |value|), scene max {scene_error:.3g}; float32: {float32:.3g}")
    assert error.max().item() == pytest.approx(authors["bfloat16.timestamp_embeddings"]["max_abs"], rel=1e-3)
    assert error.max().item() > 100 * float32  # bfloat16 is not a rounding detail: the lead's runtime must reproduce it


@pytest.mark.parametrize("cls_token", [False, True])
def test_masked_autoencoder_pieces_train_together(cls_token, mwmae):
    """The authors' recipe in hear_msm's pieces: random masking (their rounding), the encoder on the
    visible patches, the decoder on all positions; every parameter gets a gradient."""
    torch.manual_seed(0)
    config = mwmae.MWMAEConfig(arch="mwmae_test", embed_dim=32, depth=2, num_heads=2, cls_token=cls_token)
    encoder = mwmae.build_mwmae(config)
    windows = mwmae.MWMAE_DECODER.window_sizes if not cls_token else (0,) * 8
    decoder_config = mwmae.MultiWindowDecoderConfig(embed_dim=16, depth=1, window_sizes=windows)
    decoder = mwmae.MaskedAutoencoderDecoder(decoder_config, config)
    decoder.reset_parameters()
    keep, restore = mwmae.random_restore_index(3, 250, 0.8, generator=torch.Generator().manual_seed(1))
    assert keep.shape == (3, 50) and restore.shape == (3, 250)  # int(250 * (100 - 80) / 100) kept
    assert torch.equal(restore.argsort(1)[:, :50], keep)  # restore_index undoes the shuffle
    spectrogram = torch.randn(3, 1, 200, 80)
    prediction = decoder(encoder.forward_visible(spectrogram, keep), restore)
    assert prediction.shape == (3, 250, 64)
    target = spectrogram.reshape(3, 50, 4, 5, 16).permute(0, 1, 3, 2, 4).reshape(3, 250, 64)  # time-major patches
    masked = torch.ones(3, 250).scatter(1, keep, 0.0)
    loss = (((prediction - target) ** 2).mean(-1) * masked).sum() / masked.sum()
    loss.backward()
    for module in (encoder, decoder):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert encoder.pos_embed.grad.abs().sum() > 0  # learned positions, as the authors train them


def test_windowed_attention_needs_whole_windows(mwmae):
    attention = mwmae.MultiWindowAttention(16, 8, mwmae.MWMAE_DECODER.window_sizes)
    assert attention(torch.randn(2, 250, 16)).shape == (2, 250, 16)
    with pytest.raises(ValueError, match=r"251 is not a multiple of the attention windows \[2, 5, 10, 25, 50, 125\]"):
        attention(torch.randn(1, 251, 16))  # e.g. a CLS token left in front of 250 patches
    with pytest.raises(ValueError, match="one entry per head"):
        mwmae.MultiWindowDecoderConfig(window_sizes=(2, 5))


def _pack_flax_tree(tree) -> bytes:
    """msgpack in Flax's layout (ext 1 ndarray records) for a nested dict of float32 arrays."""
    import msgpack

    def default(value):
        payload = msgpack.packb((list(value.shape), value.dtype.name, value.tobytes()), use_bin_type=True)
        return msgpack.ExtType(1, payload)
    return msgpack.packb(tree, default=default, use_bin_type=True)


def test_flax_weights_recognises_the_preset_and_loads_it(tmp_path, mwmae):
    """A run folder with an mwmae_tiny-sized tree -> (config, state dict, step) that load strictly."""
    with torch.device("meta"):
        tiny = mwmae.mwmae_tiny()
    shapes = {"pos_embed": (1, 250, 192), "patch_embed/proj/kernel": (4, 16, 1, 192), "patch_embed/proj/bias": (192,),
              "encoder_norm/scale": (192,), "encoder_norm/bias": (192,), "mask_token": (1, 1, 384)}
    block = {"LayerNorm_0/scale": (192,), "LayerNorm_0/bias": (192,), "Attention_0/Dense_0/kernel": (192, 576),
             "Attention_0/Dense_0/bias": (576,), "Attention_0/Dense_1/kernel": (192, 192),
             "Attention_0/Dense_1/bias": (192,),
             "LayerNorm_1/scale": (192,), "LayerNorm_1/bias": (192,), "Mlp_0/Dense_0/kernel": (192, 768),
             "Mlp_0/Dense_0/bias": (768,), "Mlp_0/Dense_1/kernel": (768, 192), "Mlp_0/Dense_1/bias": (192,)}
    shapes.update({f"encoder_block_{i:02d}/{k}": v for i in range(12) for k, v in block.items()})
    params = random_flax_params(shapes, seed=5)
    nested = {}
    for path, value in params.items():
        node = nested
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    run = tmp_path / "mwmae_tiny_run"
    run.mkdir()
    (run / "checkpoint_40").write_bytes(_pack_flax_tree({"params": nested, "step": np.array(40, np.int32),
                                                         "opt_state": {"mu": nested}}))
    config, state, step = mwmae.flax_weights(run)
    assert (config, step) == (tiny.config, 40)
    encoder = mwmae.build_mwmae(config)
    encoder.load_state_dict(state, strict=True)
    torch.testing.assert_close(encoder.blocks[4].mlp.layer2.weight,
                               torch.from_numpy(params["encoder_block_04/Mlp_0/Dense_1/kernel"].T), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not an MW-MAE/MAE encoder of a known size"):
        mwmae.flax_weights(FLAX / "mwmae_tiny_legacy")  # the reduced fixture model is no preset
    # a Flax run folder is a weight source everywhere: load_model, and `hear-msm convert` to our format
    loaded = hear_msm.load_model(run)
    assert loaded.config == tiny.config and torch.equal(loaded.blocks[4].mlp.layer2.weight, encoder.blocks[4].mlp.layer2.weight)
    from hear_msm.cli import main

    assert main(["convert", str(run), str(tmp_path / "converted")]) == 0
    converted = hear_msm.load_model(tmp_path / "converted")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("model", list(ENCODER_PARAMS))
def test_hear_official_layout_is_the_authors_wrapper(model, encoders, audio):
    """HearModel(layout="official") on MW-MAE / MAE: their reflect padding, time-ordered frames,
    kept-column count and timestamps; scene embeddings within the policy of the float64 run."""
    from hear_msm._hear import HearModel

    reference, authors = _reference(model, "reference")
    runtime = HearModel(encoders[model], layout="official")
    embeddings, timestamps = runtime.timestamp_embeddings(audio)
    with torch.no_grad():
        expected = _official_layout(encoders[model], LogMelFrontend()(audio))
    assert embeddings.shape == expected.shape == (2, 63, 3840)
    assert (embeddings - expected).abs().max().item() < 1e-5  # the same computation, batched differently
    torch.testing.assert_close(timestamps, reference["timestamps"].float().expand(2, -1), rtol=0, atol=1e-3)
    feature_error = (LogMelFrontend()(audio).double() - reference["features.float64"]).abs().max().item()
    _within_policy(f"{model} HEAR scene", runtime.scene_embeddings(audio), reference["scene.float64"],
                   authors["float32.scene"]["max_abs"], floor=FLOOR + feature_error)


@pytest.mark.parametrize("samples", [8000, 32000, 31840])  # under 1.5 s; exactly 200 frames (201 -> whole chunk)
def test_official_reflect_padding_handles_pads_longer_than_the_clip(samples, encoders):
    from hear_msm._hear import HearModel, reflect_pad

    runtime = HearModel(encoders["mwmae_base"], layout="official")
    clip = 0.1 * torch.randn(1, samples, generator=torch.Generator().manual_seed(samples))
    embeddings, timestamps = runtime.timestamp_embeddings(clip)
    features = LogMelFrontend()(clip)
    frames = features.shape[1]
    padded = reflect_pad(features, frames + 200 - frames % 200)  # numpy's "reflect", repeated
    assert torch.equal(padded[0, :, 0], torch.from_numpy(np.pad(features[0, :, 0].numpy(), (0, 200 - frames % 200),
                                                                 mode="reflect")))
    chunks = padded.shape[1] // 200
    assert embeddings.shape[1] == chunks * 50 - int(50 * (200 - frames % 200) / 200) == timestamps.shape[1]
    assert torch.isfinite(embeddings).all()
