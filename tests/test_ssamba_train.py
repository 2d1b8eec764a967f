"""SSAMBA pretraining: its joint objective against a direct computation, its cluster masking, its
recipe as the defaults of `hear-msm pretrain`, Kaldi fbank data, kill + resume, DDP, export.

Tiny configs (depth 2, embed_dim 64, 256-frame inputs = 128 patches) keep the file near a minute.
"""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from numerics import assert_float64_anchored
from safetensors.torch import load_file

from ddp_helpers import train_on_two_ranks
from training_helpers import kill_after_first_checkpoint, tone

import hear_msm
from hear_msm import training
from hear_msm._frontend import KaldiFbankFrontend
from hear_msm.models.ssamba import cluster_mask
from hear_msm.training import TrainConfig, loop
from hear_msm.training import data as _data
from hear_msm.training import state as run_state
from hear_msm.training.config import RECIPES

TINY = {"depth": 2, "embed_dim": 64, "num_frames": 256}
TINY_FLAGS = ["--override", "depth=2", "--override", "embed_dim=64", "--override", "num_frames=256"]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """8 clips of 1.2-4 s (wav and flac, 16 and 22.05 kHz): shorter and longer than a 2.56 s crop."""
    root = tmp_path_factory.mktemp("audio")
    for i in range(8):
        suffix, rate = [("wav", 16000), ("flac", 22050)][i % 2]
        sf.write(root / f"clip{i}.{suffix}", tone(1.2 + 0.4 * i, rate, i), rate)
    return root


def _build(seed: int, **fields):
    """A randomly initialised tiny SSAMBA pretraining model."""
    from hear_msm.models.registry import model_builder

    torch.manual_seed(seed)
    return model_builder("ssamba_tiny")(**{**TINY, **fields})


def _config(data, **changes) -> TrainConfig:
    base = dict(model_overrides=dict(TINY), data=str(data), batch_size=2, steps=4, warmup_steps=1, base_lr=0.05,
                checkpoint_every=2, log_every=1, progress=False, seed=0)
    return TrainConfig.for_model("ssamba_tiny", **{**base, **changes})


# ------------------------------------------------------------------------------------ the objective
def _freq_major_indices(mask: torch.Tensor, grid_time: int, grid_freq: int) -> list[torch.Tensor]:
    """Time-major masks [B, N] -> per clip the masked indices in SSAMBA's order (f * grid_time + t)."""
    return [m.view(grid_time, grid_freq).T.reshape(-1).nonzero()[:, 0] for m in mask]


def _direct_loss(model, spectrogram, masks, w_d=1.0, w_g=10.0, mistake=None) -> torch.Tensor:
    """SSAMBA's `pretrain_joint` written out step by step (its mpc + 10 x mpg, one clip at a time),
    with the model's own blocks and weights. `mistake` computes a plausible wrong variant."""
    v, cfg, batch = model.v, model.config, spectrogram.shape[0]
    image = spectrogram[:, 0].transpose(1, 2)[:, None]  # [B, 1, F, T], as their forward transposes
    patches = F.unfold(image, kernel_size=16, stride=16).transpose(1, 2)  # [B, N, 256], frequency-major

    def encode(indices):
        tokens = v.patch_embed.proj(image).flatten(2).transpose(1, 2)
        positions = v.pos_embed[:, 1:].expand_as(tokens)
        if mistake == "mask after positions":
            tokens = tokens + positions
        keep = torch.ones_like(tokens)
        for b, index in enumerate(indices):
            keep[b, index] = 0
        tokens = tokens * keep + (1 - keep) * model.mask_embed.expand_as(tokens)
        if mistake != "mask after positions":
            tokens = tokens + positions
        hidden = torch.cat([(v.cls_token + v.pos_embed[:, :1]).expand(batch, -1, -1), tokens], dim=1)
        residual = None
        for i in range(0, len(v.layers), 2):
            hidden_f, residual_f = v.layers[i](hidden, residual)
            hidden_b, residual_b = v.layers[i + 1](hidden.flip(1), None if residual is None else residual.flip(1))
            hidden, residual = hidden_f + hidden_b.flip(1), residual_f + residual_b.flip(1)
        out = v.norm_f(residual + hidden)
        return out if mistake == "one norm_f" else v.norm_f(out)

    index_d = _freq_major_indices(masks[:, 0], cfg.grid_time, cfg.grid_freq)
    out = encode(index_d)
    nce = 0.0
    for b, index in enumerate(index_d):
        prediction = model.cpredlayer(out[b, index + 1])
        logits = patches[b, index] @ prediction.T  # [targets, predictions]
        nce = nce + logits.log_softmax(dim=0 if mistake == "softmax over targets" else 1).diagonal().sum()
    nce = -nce / sum(len(index) for index in index_d)
    index_g = _freq_major_indices(masks[:, 1], cfg.grid_time, cfg.grid_freq)
    out = encode(index_g)
    errors = [(model.gpredlayer(out[b, index + 1]) - patches[b, index]).pow(2) for b, index in enumerate(index_g)]
    mse = torch.stack(errors).mean()
    return w_d * nce + w_g * mse


def test_objective_matches_a_direct_computation_and_catches_mistakes():
    model = _build(1)
    model.eval()  # no drop path: the same function in both computations
    with torch.no_grad():  # a trained final norm (at init, weight 1 and bias 0, a second norm_f changes little)
        model.v.norm_f.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(4))
        model.v.norm_f.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    spectrogram = torch.randn(3, 1, 256, 128, generator=torch.Generator().manual_seed(2))
    masks = model.sample_mask(3, 400 / 512, "cluster", generator=torch.Generator().manual_seed(3))
    assert masks.shape == (3, 2, 128) and masks.sum(-1).eq(100).all()
    assert not torch.equal(masks[:, 0], masks[:, 1])  # the two passes draw their own masks

    reference = _direct_loss(model.double(), spectrogram.double(), masks).detach()
    ours64 = model.reconstruction_loss(spectrogram.double(), masks)
    torch.testing.assert_close(ours64, reference, rtol=1e-12, atol=0)
    model.float()
    ours, theirs = model.reconstruction_loss(spectrogram, masks), _direct_loss(model, spectrogram, masks)
    bound = assert_float64_anchored("joint loss", ours.detach()[None], theirs.detach()[None], reference.detach()[None],
                                    floor=1e-5)
    model.double()
    for mistake in ("softmax over targets", "mask after positions", "one norm_f"):
        wrong = _direct_loss(model, spectrogram.double(), masks, mistake=mistake).detach()
        print(f"{mistake}: off by {float(wrong - reference):.3g}")
        assert abs(float(wrong - reference)) > 100 * bound, mistake

    # each weight scales its own pass; a pass weighted 0 is skipped
    model.float()
    generative = model.reconstruction_loss(spectrogram, masks, discriminative_weight=0.0, generative_weight=1.0)
    discriminative = model.reconstruction_loss(spectrogram, masks, discriminative_weight=1.0, generative_weight=0.0)
    torch.testing.assert_close(discriminative + 10 * generative, ours, rtol=1e-5, atol=0)
    direct_generative = _direct_loss(model, spectrogram, masks, w_d=0.0, w_g=1.0)
    torch.testing.assert_close(generative, direct_generative, rtol=1e-5, atol=0)


def test_objective_trains_every_used_parameter_and_only_those():
    model = _build(4)
    spectrogram = torch.randn(2, 1, 256, 128)
    masks = model.sample_mask(2, 400 / 512, "cluster", generator=torch.Generator().manual_seed(5))
    model.reconstruction_loss(spectrogram, masks).backward()
    unused = {id(p) for p in model.parameters_unused_by(discriminative_weight=1.0, generative_weight=10.0)}
    for name, param in model.named_parameters():
        if id(param) in unused:
            assert name.startswith("v.head.") and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    only_generative = model.parameters_unused_by(discriminative_weight=0.0, generative_weight=1.0)
    assert {id(p) for p in model.cpredlayer.parameters()} <= {id(p) for p in only_generative}


def test_masks_and_targets_are_time_major():
    model = _build(0)
    cfg = model.config  # grid 16 time columns x 8 frequency rows
    spectrogram = torch.randn(2, 1, 256, 128)
    targets = model.patchify(spectrogram)
    t, f = 5, 3  # the patch of frames 80..95, mel bins 48..63, inside mel-major as their Unfold
    block = spectrogram[1, 0, 16 * t:16 * t + 16, 16 * f:16 * f + 16]
    assert torch.equal(targets[1, t * cfg.grid_freq + f], block.T.reshape(-1))

    generator = torch.Generator().manual_seed(7)
    masks = model.sample_mask(1, 400 / 512, "cluster", generator=generator)
    generator = torch.Generator().manual_seed(7)
    first = cluster_mask(100, cfg.grid_freq, cfg.grid_time, generator)  # frequency-major, as drawn
    assert torch.equal(masks[0, 0].view(cfg.grid_time, cfg.grid_freq).T.reshape(-1), first)
    columns = model.sample_mask(2, 0.5, "timestep", generator=generator).view(2, 2, cfg.grid_time, cfg.grid_freq)
    assert (columns.all(-1) | ~columns.any(-1)).all()  # whole 160 ms columns
    with pytest.raises(ValueError, match=r"boolean masks \[batch, 2, patches\] = \[2, 2, 128\]"):
        model.reconstruction_loss(spectrogram, masks[:, 0].expand(2, -1))


def _ssast_cluster_mask(count: int, grid_freq: int, grid_time: int, rng: random.Random) -> set[int]:
    """The cluster masking SSAMBA's pretraining uses (SSAST's `gen_maskid_patch`), as its code
    behaves: square clusters at random starts until more than `count` indices are covered (index 0
    and indices past the end skipped), then the first `count` of the Python set, i.e. the lowest."""
    total, side, covered = grid_freq * grid_time, 3 + rng.randrange(3), set()
    while len(covered) <= count:
        start = rng.randrange(total)
        covered |= {start + grid_time * i + j for i in range(side) for j in range(side)
                    if 0 < start + grid_time * i + j < total}
    return set(list(covered)[:count])


def test_cluster_masking_draws_from_ssast_distribution():
    """Per-patch masking frequencies and the clustering (P[right neighbour masked | masked]) of ours
    against SSAST's procedure, 600 masks of 400 / 512 each, on SSAMBA's 8 x 64 grid."""
    grid_freq, grid_time, count, draws = 8, 64, 400, 600
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    theirs = torch.zeros(draws, grid_freq * grid_time, dtype=torch.bool)
    for row in theirs:
        row[list(_ssast_cluster_mask(count, grid_freq, grid_time, rng))] = True
    ours = torch.stack([cluster_mask(count, grid_freq, grid_time, generator) for _ in range(draws)])
    assert ours.sum(1).eq(count).all() and not ours[:, 0].any() and not theirs[:, 0].any()
    frequency_gap = (ours.double().mean(0) - theirs.double().mean(0)).abs()
    print(f"max per-patch frequency gap {frequency_gap.max():.3f}")
    assert frequency_gap.max() < 0.12  # about 4 standard deviations of the difference of two estimates

    def right_neighbour(masks):
        grid = masks.view(draws, grid_freq, grid_time)
        return float((grid[..., 1:] & grid[..., :-1]).sum() / grid[..., :-1].sum())

    uniform = torch.rand(draws, grid_freq * grid_time, generator=generator).argsort(1) < count
    print(f"P[right neighbour masked]: ours {right_neighbour(ours):.4f}, SSAST {right_neighbour(theirs):.4f}, "
          f"unstructured {right_neighbour(uniform):.4f}")
    assert abs(right_neighbour(ours) - right_neighbour(theirs)) < 0.01
    assert abs(right_neighbour(ours) - right_neighbour(uniform)) > 0.03  # the test tells clusters apart
    with pytest.raises(ValueError, match="cluster masking covers 1 to 510 of 512 patches, asked for 511"):
        cluster_mask(511, grid_freq, grid_time)


def test_drop_path_follows_vim_rates_and_acts_in_training_only():
    model = _build(8, depth=4)
    spectrogram = torch.randn(4, 1, 256, 128)
    masks = model.sample_mask(4, 400 / 512, "cluster", generator=torch.Generator().manual_seed(1))
    model.eval()
    plain = model.reconstruction_loss(spectrogram, masks)
    model.set_drop_path(0.1)  # Vim: layer i drops with ([0] + linspace(0, rate, depth))[i], the last add with rate
    assert [layer.drop_path_rate for layer in model.v.layers] == pytest.approx([0.0, 0.0, 0.1 / 3, 0.2 / 3])
    assert model.v.drop_path_rate == 0.1
    assert torch.equal(model.reconstruction_loss(spectrogram, masks), plain)  # eval: no drop path
    model.train()
    model.set_drop_path(0.5)
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(model.reconstruction_loss(spectrogram, masks))
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    assert not torch.equal(losses[0], plain)
    with pytest.raises(ValueError, match=r"drop path rate must be in \[0, 1\)"):
        model.set_drop_path(1.0)


def test_loss_decreases_on_a_repeated_batch():
    model = _build(6)
    spectrogram = torch.randn(2, 1, 256, 128, generator=torch.Generator().manual_seed(1)) * 0.5
    masks = model.sample_mask(2, 400 / 512, "cluster", generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.95, 0.999))
    losses = []
    for _ in range(25):
        loss = model.reconstruction_loss(spectrogram, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("losses", [round(x, 3) for x in losses[::4]])
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * losses[0]


# ------------------------------------------------------------------------------------ recipe
def test_recipe_is_the_default_of_ssamba_runs_only():
    config = TrainConfig.for_model("ssamba_tiny")
    assert (config.mask_ratio, config.mask_mode, config.masked_only_loss) == (400 / 512, "cluster", True)
    assert (config.discriminative_weight, config.generative_weight, config.drop_path_rate) == (1.0, 10.0, 0.1)
    assert (config.batch_size, config.lr, config.warmup_steps, config.epochs) == (64, pytest.approx(1e-4), 1000, 10.0)
    assert (config.beta1, config.beta2, config.weight_decay, config.lr_schedule) == (0.95, 0.999, 5e-8, "constant")
    assert config.num_frames == 1024 and config.precision == "fp32"
    given = TrainConfig.for_model("ssamba_tiny", batch_size=8, mask_mode="unstructured",
                                  model_overrides={"num_frames": 512})
    assert (given.batch_size, given.mask_mode, given.num_frames, given.base_lr) == (8, "unstructured", 512, 4e-4)
    assert TrainConfig.for_model("ssast_tiny") == TrainConfig()  # Yadav et al.'s recipe: the dataclass defaults
    assert RECIPES.keys() == {"ssamba", "mwmae", "mae"}  # no recipe for Yadav et al.'s SSAST / SSAM / AxLSTM

    with pytest.raises(ValueError, match=r"num_frames 200 is not ssamba_tiny's input length \(1024 frames\)"):
        TrainConfig(model="ssamba_tiny")
    with pytest.raises(ValueError, match=r"mask_mode must be one of \('unstructured', 'timestep'\) for ssam_tiny"):
        TrainConfig(model="ssam_tiny", mask_mode="cluster")
    with pytest.raises(ValueError, match="drop_path_rate 0.1: ssast_tiny has no stochastic depth"):
        TrainConfig(drop_path_rate=0.1)
    with pytest.raises(ValueError, match="both 0: nothing to train on"):
        TrainConfig.for_model("ssamba_tiny", discriminative_weight=0.0, generative_weight=0.0)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="linear")


def test_pretrain_help_documents_the_recipes(capsys):
    from hear_msm.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 1024; ssamba: 64)" in text and "(default 0.5; ssamba: 0.78125; mwmae: 0.8)" in text
    assert "(default unstructured; ssamba: cluster)" in text and "(default cosine; ssamba: constant)" in text
    assert "ssamba: mask_ratio=0.78125, mask_mode=cluster" in text and "generative_weight=10" in text


def test_pretrain_cli_trains_on_audio_with_the_recipe_and_exports(audio_dir, tmp_path, capsys):
    """The CLI with nothing but the model, data and a short budget: SSAMBA's recipe, Kaldi fbank
    crops, weights that load strictly and embed through the HEAR module."""
    from hear_msm.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--model", "ssamba_tiny", *TINY_FLAGS, "--data", str(audio_dir), "--out", str(run),
                 "--steps", "4", "--warmup-steps", "1", "--batch-size", "2", "--base-lr", "0.05",
                 "--log-every", "1", "--no-progress"]) == 0, capsys.readouterr().err
    assert "as kaldi_fbank features (128 bins)" in capsys.readouterr().err
    saved = json.loads((run / "train_config.json").read_text())
    recipe = {key: saved[key] for key in RECIPES["ssamba"] if key not in ("batch_size", "base_lr", "warmup_steps")}
    assert recipe == {key: value for key, value in RECIPES["ssamba"].items() if key in recipe}
    assert saved["num_frames"] == 256
    losses = [float(row.split(",")[2]) for row in (run / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    card = (run / "final" / "README.md").read_text()
    assert "mask cluster 0.78125, loss 10 x MSE over masked patches + 1 x InfoNCE, drop path 0.1" in card

    loaded = hear_msm.load_model(run / "final")
    state = run_state.load_checkpoint(run / run_state.CHECKPOINT_NAME)["model"]
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())


def test_export_of_the_preset_embeds_through_the_hear_module(audio_dir, tmp_path):
    """One step of the full ssamba_tiny, exported in float16 (its int64 entries stay int64), embeds
    through hear_msm.ssamba_tiny."""
    import hear_msm.ssamba_tiny as module

    config = _config(audio_dir, model_overrides={}, steps=1, warmup_steps=0, batch_size=1, export_dtype="float16")
    assert config.num_frames == 1024
    final = training.train(config, tmp_path / "run").export_dir
    stored = load_file(str(final / "model.safetensors"))
    assert stored["mask_embed"].dtype == torch.float16 and stored["p_input_tdim"].dtype == torch.int64
    hear = module.load_model(str(final))
    audio = torch.from_numpy(tone(3.0, 16000, 11))[None]
    embeddings, timestamps = module.get_timestamp_embeddings(audio, hear)
    assert embeddings.shape[:2] == timestamps.shape and embeddings.shape[2] == 8 * 192
    assert torch.isfinite(embeddings).all()


def test_crops_are_the_model_front_end_padded_with_its_padding_value(audio_dir):
    features = _data.Features(_build(0).config)
    source = _data.AudioFolder(audio_dir, features=features)
    short = source.files.index(audio_dir / "clip0.wav")  # 1.2 s: 118 frames, the crop is 256
    crop = _data.CropDataset(source, 256, seed=0)[(0, short)][0]
    frontend = KaldiFbankFrontend()
    audio, _ = sf.read(audio_dir / "clip0.wav", dtype="float32")
    expected = frontend(torch.from_numpy(audio)[None])[0]
    assert crop.shape == (256, 128) and expected.shape == (118, 128)
    torch.testing.assert_close(crop[:118], expected, rtol=0, atol=1e-5)
    assert crop[118:].eq(frontend.padding_value()).all() and frontend.padding_value() == pytest.approx(0.467, abs=1e-3)


def test_logmel_shards_are_refused_for_another_front_end(audio_dir, tmp_path):
    _data.write_shards(audio_dir, tmp_path / "logmel", clips_per_shard=4, progress=False)
    with pytest.raises(ValueError, match=r"stores logmel features \(80 bins\), but the model reads kaldi_fbank "
                                         r"features \(128 bins\): write audio shards for it \(hear-msm "
                                         r"prepare-shards --kind flac\)"):
        training.train(_config(tmp_path / "logmel"), tmp_path / "run")
    ssast_64_bins = loop.build_model(TrainConfig(model_overrides={"depth": 2, "num_mels": 64})).config
    with pytest.raises(ValueError, match=r"but the model reads logmel features \(64 bins\)"):
        _data.open_source(tmp_path / "logmel", features=_data.Features(ssast_64_bins))

    _data.write_shards(audio_dir, tmp_path / "flac", kind="flac", clips_per_shard=4, progress=False)
    shards = _data.open_source(tmp_path / "flac", features=_data.Features(_build(0).config))
    assert shards.load(0, np.random.default_rng(0)).shape[1] == 128
    assert np.isfinite(training.train(_config(tmp_path / "flac", steps=2), tmp_path / "flac_run").loss)


# ------------------------------------------------------------------------------------ resume, DDP
def test_sigkill_then_resume_matches_uninterrupted_run_with_drop_path(audio_dir, tmp_path, capsys):
    """A run killed after a checkpoint and resumed (CLI, recipe taken from the run) ends with the
    weights of an uninterrupted run. Drop path draws from torch's generator, seeded per step, so
    the resumed steps repeat their draws."""
    from hear_msm.cli import main

    args = ["--model", "ssamba_tiny", *TINY_FLAGS, "--data", str(audio_dir), "--steps", "20", "--batch-size", "2",
            "--warmup-steps", "3", "--base-lr", "0.05", "--checkpoint-every", "3", "--log-every", "1",
            "--drop-path-rate", "0.5", "--no-progress", "--seed", "3"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(args, killed)
    step = run_state.load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step < 20 and not (killed / "final").exists()

    assert main(["pretrain", "--out", str(killed), "--resume", "--no-progress"]) == 0
    assert f"resuming at step {step}" in capsys.readouterr().err
    assert main(["pretrain", *args, "--out", str(tmp_path / "straight")]) == 0
    a = load_file(str(killed / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max |diff| {(a[key].double() - b[key].double()).abs().max():.3g}"
    log_steps = [int(r.split(",")[0]) for r in (killed / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == list(range(1, 21))


def test_two_process_gloo_ddp_ranks_end_identical(audio_dir, tmp_path):
    ranks = train_on_two_ranks(_config(str(audio_dir), steps=3, batch_size=4, device="cpu"), tmp_path / "run",
                               tmp_path)
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    torch.manual_seed(0)  # as the run's setup seeds before building
    initial = loop.build_model(_config(audio_dir)).state_dict()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], exported[key]), key
    for trained in ("cpredlayer.2.weight", "gpredlayer.2.weight", "mask_embed", "v.layers.1.mixer.A_b_log"):
        assert not torch.equal(ranks[0][trained], initial[trained]), trained
    assert torch.equal(ranks[0]["v.head.weight"], initial["v.head.weight"])  # Vim's head: never trained, as theirs
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 4  # rank 0 alone logged
