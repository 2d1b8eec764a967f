"""MW-MAE / MAE pretraining: the MAE objective against a direct computation, the recipe as the
defaults of `hear-msm pretrain`, `--decoder mwmha | mae` behind SSAM and AxLSTM, kill + resume
(decoder included), DDP, export in the encoder format through the HEAR runtime.

Tiny configs (depth 2, embed_dim 64, a 32-d decoder of depth 1) on clips shorter than one crop:
every step of a run sees the same batch (crops of short clips are the whole clip, padded).
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from ddp_helpers import train_on_two_ranks
from training_helpers import kill_after_first_checkpoint, tone
from numerics import assert_float64_anchored
from safetensors.torch import load_file

import hear_msm
from hear_msm import training
from hear_msm.models import mwmae
from hear_msm.models.registry import model_builder
from hear_msm.training import TrainConfig, loop
from hear_msm.training import state as run_state
from hear_msm.training.config import RECIPES

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_DECODER = {"decoder_embed_dim": 32, "decoder_depth": 1}
TINY_FLAGS = ["--override", "depth=2", "--override", "embed_dim=64", "--override", "num_heads=2",
              "--decoder-embed-dim", "32", "--decoder-depth", "1"]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """4 clips of 1.2-1.8 s (wav and flac, 16 and 22.05 kHz): each shorter than a 2 s crop."""
    root = tmp_path_factory.mktemp("audio")
    for i in range(4):
        suffix, rate = [("wav", 16000), ("flac", 22050)][i % 2]
        sf.write(root / f"clip{i}.{suffix}", tone(1.2 + 0.2 * i, rate, i), rate)
    return root


def _config(data, model="mwmae_tiny", **changes) -> TrainConfig:
    base = dict(model_overrides=dict(TINY), data=str(data), batch_size=4, steps=4, warmup_steps=1,
                base_lr=0.05, checkpoint_every=2, log_every=1, progress=False, seed=0, **TINY_DECODER)
    return TrainConfig.for_model(model, **{**base, **changes})


def _encoder_and_decoder(cls_token: bool, seed: int = 0):
    torch.manual_seed(seed)
    encoder = model_builder("mae_base" if cls_token else "mwmae_tiny")(**TINY)
    kind = "mae" if cls_token else "mwmha"
    decoder = encoder.build_decoder(mwmae.decoder_config(kind, **{"embed_dim": 32, "depth": 1}))
    with torch.no_grad():  # trained-looking norms, so that a skipped or doubled one would show
        for norm in (encoder.encoder_norm, decoder.decoder_norm):
            norm.weight.normal_(1.0, 0.5)
            norm.bias.normal_(0.0, 0.3)
    return encoder, decoder


# ------------------------------------------------------------------------------------ the objective
def _direct_mae_loss(encoder, decoder, spectrogram, mask, mistake=None) -> torch.Tensor:
    """The authors' forward_mae + mae_loss written out one clip at a time with the model's own blocks:
    the visible patches in a random order (as their shuffle leaves them), mask tokens scattered into
    the masked places, targets cut from the spectrogram patch by patch. `mistake`: a plausible wrong variant."""
    cfg, prefix = encoder.config, encoder.config.num_prefix_tokens
    generator = torch.Generator().manual_seed(5)
    errors = []
    for b in range(spectrogram.shape[0]):
        grid = encoder.patch_embed.proj(spectrogram[b:b + 1])[0]  # [D, 50, 5]
        tokens = grid.permute(1, 2, 0).reshape(cfg.num_patches, -1) + encoder.pos_embed[0, prefix:]
        visible = (~mask[b]).nonzero()[:, 0]
        order = visible[torch.randperm(len(visible), generator=generator)]
        x = tokens[order][None]
        if prefix:
            x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]), x], dim=1)
        for block in encoder.blocks:
            x = block(x)
        y = decoder.decoder_embed(encoder.encoder_norm(x))[0]
        sequence = decoder.mask_token[0].expand(cfg.num_patches, -1).clone()
        if mistake == "mask tokens appended, order not restored":
            sequence[:len(order)] = y[prefix:]
        else:
            sequence[order] = y[prefix:]
        sequence = torch.cat([y[:prefix], sequence]) + decoder.decoder_pos_embed[0]
        for block in decoder.decoder_blocks:
            sequence = block(sequence[None])[0]
        prediction = decoder.decoder_pred(decoder.decoder_norm(sequence))[prefix:]
        scored = range(cfg.num_patches) if mistake == "loss over all patches" else mask[b].nonzero()[:, 0].tolist()
        for index in scored:
            t, f = divmod(index, cfg.grid_freq)
            block = spectrogram[b, 0, 4 * t:4 * t + 4, 16 * f:16 * f + 16]  # 4 frames x 16 mel bins
            target = block.T.reshape(-1) if mistake == "mel-major values in a patch" else block.reshape(-1)
            errors.append((prediction[index] - target).pow(2).mean())
    return torch.stack(errors).mean()


@pytest.mark.parametrize("cls_token", [False, True], ids=["mwmae", "mae"])
def test_mae_objective_matches_a_direct_computation_and_catches_mistakes(cls_token):
    encoder, decoder = _encoder_and_decoder(cls_token, seed=1)
    spectrogram = torch.randn(3, 1, 200, 80, generator=torch.Generator().manual_seed(2))
    mask = encoder.sample_mask(3, 0.8, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (3, 250) and (~mask).sum(1).eq(50).all()  # their rounding: int(250 * (1 - 0.8)) is 49
    assert not torch.equal(mask[0], mask[1])

    reference = _direct_mae_loss(encoder.double(), decoder.double(), spectrogram.double(), mask).detach()
    ours64 = encoder.reconstruction_loss(spectrogram.double(), mask, decoder=decoder)
    torch.testing.assert_close(ours64, reference, rtol=1e-12, atol=0)
    encoder.float(), decoder.float()
    ours = encoder.reconstruction_loss(spectrogram, mask, decoder=decoder).detach()
    theirs = _direct_mae_loss(encoder, decoder, spectrogram, mask).detach()
    bound = assert_float64_anchored("MAE loss", ours[None], theirs[None], reference[None], floor=1e-6)
    encoder.double(), decoder.double()
    for mistake in ("loss over all patches", "mel-major values in a patch", "mask tokens appended, order not restored"):
        wrong = _direct_mae_loss(encoder, decoder, spectrogram.double(), mask, mistake=mistake).detach()
        print(f"{mistake}: off by {float(wrong - reference):.3g}")
        assert abs(float(wrong - reference)) > 100 * bound, mistake

    # generative_weight scales the MSE; all patches when not masked_only
    encoder.float(), decoder.float()
    doubled = encoder.reconstruction_loss(spectrogram, mask, decoder=decoder, generative_weight=2.0)
    torch.testing.assert_close(doubled, 2 * ours, rtol=1e-6, atol=0)
    everywhere = encoder.reconstruction_loss(spectrogram, mask, masked_only=False, decoder=decoder)
    direct_everywhere = _direct_mae_loss(encoder, decoder, spectrogram, mask, mistake="loss over all patches")
    torch.testing.assert_close(everywhere, direct_everywhere, rtol=1e-5, atol=0)


def test_mae_objective_trains_every_parameter_and_refuses_what_does_not_fit():
    encoder, decoder = _encoder_and_decoder(cls_token=True, seed=2)
    spectrogram = torch.randn(2, 1, 200, 80)
    mask = encoder.sample_mask(2, 0.8, generator=torch.Generator().manual_seed(1))
    encoder.reconstruction_loss(spectrogram, mask, decoder=decoder).backward()
    for module in (encoder, decoder):
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name

    columns = encoder.sample_mask(2, 0.8, "timestep", generator=torch.Generator().manual_seed(2)).view(2, 50, 5)
    assert (columns.all(-1) | ~columns.any(-1)).all() and (~columns[..., 0]).sum(1).eq(10).all()
    with pytest.raises(ValueError, match="keeps none of the 250 patches"):
        encoder.sample_mask(1, 0.999)
    with pytest.raises(ValueError, match="needs its decoder"):
        encoder.reconstruction_loss(spectrogram, mask)
    uneven = mask.clone()
    uneven[0, (~mask[0]).nonzero()[0, 0]] = True
    with pytest.raises(ValueError, match=r"same number \(>= 1\) of visible patches, got \[49, 50\]"):
        encoder.reconstruction_loss(spectrogram, uneven, decoder=decoder)
    with pytest.raises(ValueError, match=r"boolean mask \[batch, 250\]"):
        encoder.reconstruction_loss(spectrogram, mask.float(), decoder=decoder)


@pytest.mark.parametrize("model", ["ssam_tiny", "axlstm_tiny"])
def test_multiwindow_decoder_reads_the_patch_tokens_of_a_masked_spectrogram_model(model):
    """`--decoder mwmha`: the encoder sees all tokens with the mask token in place, the decoder reads
    its 250 patch outputs (CLS dropped) and predicts the patches, the loss is over the masked ones;
    the model's own head is frozen (unused)."""
    config = TrainConfig.for_model(model, model_overrides={"depth": 1, "embed_dim": 64}, decoder="mwmha",
                                   kernel="reference", **TINY_DECODER)
    assert config.masked_only_loss and config.mask_ratio == 0.5  # the decoder's loss, the family's own masking
    torch.manual_seed(0)
    objective = loop.Objective(loop.build_model(config), config).double()
    model_, decoder = objective.model, objective.decoder
    assert isinstance(decoder, mwmae.MultiWindowDecoder) and not hasattr(decoder, "mask_token")
    assert not any(p.requires_grad for p in model_.pred.parameters())
    spectrogram = torch.randn(2, 1, 200, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = model_.sample_mask(2, 0.5, generator=torch.Generator().manual_seed(2))

    tokens = model_.embed_patches(spectrogram)
    tokens = torch.where(mask[..., None], model_.mask_token, tokens)
    encoded = model_.encode_tokens(tokens)  # [B, 251, D], CLS first
    seen = []
    decoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    prediction = decoder(encoded[:, 1:])
    error = (prediction - model_.patchify(spectrogram)).pow(2).mean(-1)
    direct = error[mask].mean()
    loss = objective(spectrogram, mask)
    torch.testing.assert_close(loss, direct, rtol=1e-12, atol=0)
    assert seen[-1].shape == (2, 250, 64) and torch.equal(seen[-1], encoded[:, 1:])
    loss.backward()
    trained = [name for name, p in objective.named_parameters() if p.requires_grad]
    assert all(objective.get_parameter(name).grad is not None for name in trained)
    assert any(name.startswith("decoder.decoder_blocks.0.attn.position_bias") for name in trained)


# ------------------------------------------------------------------------------------ recipe
def test_recipe_is_the_default_of_mwmae_and_mae_runs():
    config = TrainConfig.for_model("mwmae_base")
    assert (config.mask_ratio, config.mask_mode, config.masked_only_loss, config.patch_normalized_targets) == \
        (0.8, "unstructured", True, False)
    assert (config.decoder, config.decoder_embed_dim, config.decoder_depth) == ("mwmha", 384, 4)
    assert (config.batch_size, config.base_lr, config.lr, config.epochs, config.warmup_epochs, config.lr_schedule) \
        == (1024, 1.5e-5, pytest.approx(6e-5), 100.0, 10.0, "cosine")
    assert (config.beta1, config.beta2, config.weight_decay, config.decay_all_parameters) == (0.9, 0.999, 0.05, True)
    mae = TrainConfig.for_model("mae_base")
    assert mae.decoder == "mae" and mae.to_dict() == {**config.to_dict(), "model": "mae_base", "decoder": "mae"}
    assert TrainConfig.for_model("ssast_tiny") == TrainConfig()  # Yadav et al.'s recipe untouched
    assert TrainConfig().decoder == "none" and TrainConfig(decoder_depth=2).decoder == "transformer"
    assert RECIPES["mwmae"]["decoder"] == "mwmha" and RECIPES["mae"] == {"decoder": "mae"}

    # every parameter is decayed, frozen ones (none here) excepted
    model = loop.build_model(_config("unused"))
    decay, no_decay = loop.parameter_groups(model, 0.05, every_parameter=True)
    assert len(decay["params"]) == len(list(model.parameters())) and not no_decay["params"]


@pytest.mark.parametrize("changes, message", [
    ({"decoder": "none"}, r"decoder 'none': mwmae_tiny trains with the decoders \('mwmha', 'mae'\)"),
    ({"decoder": "transformer"}, r"decoder 'transformer': mwmae_tiny trains with the decoders"),
    ({"decoder": "bogus"}, r"decoder must be one of \('auto', 'none', 'transformer', 'mwmha', 'mae'\)"),
    ({"decoder_embed_dim": 36}, r"embed_dim 36 divisible by 8 heads"),
    ({"decoder_depth": 49}, r"decoder_depth 49 is outside \[1, 48\]"),
    ({"model": "mae_base", "decoder": "mwmha"},
     r"attends over 251 tokens \(250 patches \+ 1 CLS\).*windows \[2, 5, 10"),
    ({"model": "ssamba_tiny", "decoder": "mwmha", "model_overrides": {"depth": 2}},
     r"ssamba_tiny trains with the decoders \('none', 'transformer'\)"),
    ({"model": "ssam_tiny", "decoder": "mwmha", "model_overrides": {"num_frames": 208}},
     r"attends over 260 tokens \(260 patches\), which is not a multiple of its windows \[25, 50, 125\]"),
    ({"model": "ssast_tiny", "decoder": "transformer", "decoder_depth": 0, "decoder_embed_dim": 0},
     r"decoder 'transformer' needs its number of blocks: --decoder-depth N"),
    ({"model": "ssast_tiny", "decoder": "none", "decoder_depth": 2, "decoder_embed_dim": 0},
     r"decoder 'none' with decoder_depth 2"),
    ({"model": "ssast_tiny", "decoder_depth": 2, "decoder_embed_dim": 32},
     r"decoder_embed_dim 32 sizes the mwmha / mae decoders"),
])
def test_decoder_choices_are_checked_before_training(audio_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        _config(audio_dir, **changes)


def test_pretrain_help_documents_the_recipe_and_decoders(capsys):
    from hear_msm.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mwmae: mask_ratio=0.8, masked_only_loss=True, decoder=mwmha, base_lr=1.5e-05, beta2=0.999" in text
    assert "mae: decoder=mae" in text and "(default auto; mwmae: mwmha; mae: mae)" in text
    assert "--decay-all-parameters" in text and "windows 2, 5, 10, 25, 50, 125 tokens and 2 global" in text


# ------------------------------------------------------------------------------------ runs
def _losses(run: Path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(open(run / "log.csv", newline=""))]


def test_pretrain_run_learns_the_repeated_batch_and_exports_the_encoder(audio_dir, tmp_path):
    """A run on an audio folder of 4 short clips at batch 4 (the same batch every step, new masks):
    the loss falls; RUN/final holds the encoder alone, loads strictly and embeds through the HEAR runtime."""
    from hear_msm._hear import HearModel

    run = tmp_path / "run"
    result = training.train(_config(audio_dir, steps=40, warmup_steps=4, base_lr=0.1, checkpoint_every=40), run)
    losses = _losses(run)
    print("losses", [round(x, 3) for x in losses[::5]])
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])

    stored = load_file(str(result.export_dir / "model.safetensors"))
    encoder_keys = set(model_builder("mwmae_tiny")(**TINY).state_dict())
    assert stored.keys() == encoder_keys and not any("decoder" in key or "mask_token" in key for key in stored)
    checkpoint = run_state.load_checkpoint(run / run_state.CHECKPOINT_NAME)
    assert checkpoint["model"].keys() == encoder_keys
    assert "decoder_blocks.0.attn.position_bias.5" in checkpoint["decoder"]  # the 125-token window's table
    card = (result.export_dir / "README.md").read_text()
    assert "mask unstructured 0.8, loss MSE over masked patches, through a training-only mwmha decoder (32-d, depth 1" \
        in card and "wd 0.05 on every parameter" in card

    loaded = hear_msm.load_model(result.export_dir)  # strict
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in stored.items())
    hear = HearModel(loaded)
    audio = torch.from_numpy(tone(3.0, 16000, 11))[None]
    embeddings, timestamps = hear.timestamp_embeddings(audio)
    assert embeddings.shape == (1, timestamps.shape[1], 5 * 64) and torch.isfinite(embeddings).all()


def test_full_size_mae_export_embeds_through_hear_msm_mae_base(audio_dir, tmp_path):
    """One step of the full mae_base (CLS token, the all-global decoder of its recipe) through the CLI,
    exported in float16: hear_msm.mae_base loads it and embeds."""
    import hear_msm.mae_base as module
    from hear_msm.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--model", "mae_base", "--data", str(audio_dir), "--out", str(run), "--steps", "1",
                 "--warmup-steps", "0", "--batch-size", "1", "--no-progress", "--export-dtype", "float16"]) == 0
    assert json.loads((run / "train_config.json").read_text())["decoder"] == "mae"
    hear = module.load_model(str(run / "final"))
    scenes = module.get_scene_embeddings(torch.from_numpy(tone(2.5, 16000, 3))[None], hear)
    assert scenes.shape == (1, 3840) and torch.isfinite(scenes).all()


@pytest.mark.parametrize("model", ["ssam_tiny", "axlstm_tiny"])
def test_multiwindow_decoder_trains_other_encoders_and_exports_their_format(audio_dir, tmp_path, model):
    overrides = {"depth": 1, "embed_dim": 64}
    plain = loop.build_model(TrainConfig.for_model(model, model_overrides=overrides)).state_dict()
    config = _config(audio_dir, model=model, model_overrides=overrides, decoder="mwmha", batch_size=2, steps=3)
    result = training.train(config, tmp_path / "run")
    stored = load_file(str(result.export_dir / "model.safetensors"))
    assert stored.keys() == plain.keys()  # the authors' checkpoint format: encoder, mask token and head
    torch.manual_seed(config.seed)  # as setup seeds before building
    initial = loop.build_model(config).state_dict()
    assert torch.equal(stored["pred.2.weight"], initial["pred.2.weight"])  # the head: replaced by the decoder, frozen
    assert not torch.equal(stored["mask_token"], initial["mask_token"])
    assert not torch.equal(stored["blocks.0.norm.weight"], initial["blocks.0.norm.weight"])
    decoder = run_state.load_checkpoint(tmp_path / "run" / run_state.CHECKPOINT_NAME)["decoder"]
    assert decoder["decoder_pos_embed"].shape == (1, 250, 32) and "mask_token" not in decoder
    assert "through a training-only mwmha decoder" in (result.export_dir / "README.md").read_text()
    hear_msm.load_model(result.export_dir)  # strict


# ------------------------------------------------------------------------------------ resume, DDP
def test_runs_saved_before_the_decoder_choice_resume_as_they_were(audio_dir, tmp_path, monkeypatch):
    """A checkpoint whose config predates `decoder` / `decoder_embed_dim` / `decay_all_parameters`
    (--decoder-depth alone chose the Transformer decoder) resumes into the same run."""
    config = TrainConfig(model="ssast_tiny", model_overrides={"depth": 2}, data=str(audio_dir), batch_size=2,
                         steps=4, warmup_steps=1, base_lr=0.05, checkpoint_every=2, progress=False, decoder_depth=1)
    assert config.decoder == "transformer"
    straight = training.train(config, tmp_path / "straight")
    save = run_state.save_checkpoint

    def save_old_format_then_stop(path, payload):
        payload["config"] = {k: v for k, v in payload["config"].items()
                             if k not in ("decoder", "decoder_embed_dim", "decay_all_parameters")}
        save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_old_format_then_stop)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "old")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert "decoder" not in run_state.load_checkpoint(tmp_path / "old" / run_state.CHECKPOINT_NAME)["config"]
    resumed = training.train(config, tmp_path / "old", resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_sigkill_then_resume_matches_uninterrupted_run_decoder_included(audio_dir, tmp_path, capsys):
    """A run killed after a checkpoint and resumed (CLI, recipe taken from the run) ends with the
    encoder, decoder and optimizer state of an uninterrupted run, bit for bit."""
    from hear_msm.cli import main

    args = ["--model", "mwmae_tiny", *TINY_FLAGS, "--data", str(audio_dir), "--steps", "30", "--batch-size", "2",
            "--warmup-steps", "3", "--base-lr", "0.05", "--checkpoint-every", "3", "--log-every", "1",
            "--no-progress", "--seed", "3"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(args, killed)
    step = run_state.load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step < 30 and not (killed / "final").exists()

    assert main(["pretrain", "--out", str(killed), "--resume", "--no-progress"]) == 0
    assert f"resuming at step {step}" in capsys.readouterr().err
    assert main(["pretrain", *args, "--out", str(tmp_path / "straight")]) == 0
    a, b = (run_state.load_checkpoint(run / "checkpoint.pt") for run in (killed, tmp_path / "straight"))
    assert a["step"] == b["step"] == 30
    for part in ("model", "decoder"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key}"
    for index, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][index][name], value) for name, value in moments.items())
    exported = load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(exported[key], value) for key, value in b["model"].items())
    assert [int(r["step"]) for r in csv.DictReader(open(killed / "log.csv", newline=""))] == list(range(1, 31))


def test_two_process_gloo_ddp_ranks_end_identical(audio_dir, tmp_path):
    ranks = train_on_two_ranks(_config(str(audio_dir), steps=3, batch_size=4, device="cpu"), tmp_path / "run",
                               tmp_path)
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    config = _config(audio_dir)
    torch.manual_seed(config.seed)  # as the run's setup seeds before building the model, then the decoder
    model = loop.build_model(config)
    initial, initial_decoder = model.state_dict(), loop.build_decoder(model, config).state_dict()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], exported[key]), key
        assert not torch.equal(ranks[0][key], initial[key]), key  # every encoder parameter trained, positions too
    decoder = run_state.load_checkpoint(tmp_path / "run" / run_state.CHECKPOINT_NAME)["decoder"]
    assert decoder.keys() == initial_decoder.keys()
    assert not torch.equal(decoder["mask_token"], initial_decoder["mask_token"])
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 4  # rank 0 alone logged
