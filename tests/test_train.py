"""Pretraining: data sources, recipe pieces, DDP, kill + resume, NaN stop, atomic checkpoints, export.

Tiny configs (depth 2, batch 2-4) keep the whole file to about a minute of one CPU thread.
"""
import csv
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from ddp_helpers import train_on_two_ranks
from training_helpers import cli_env, kill_after_first_checkpoint, pretrain_cli, tone

import hear_msm
from hear_msm import training
from hear_msm.training import commands, export, loop
from hear_msm.training import state as run_state
from hear_msm.training import config as run_config
from hear_msm.training import data as _data
from hear_msm.training import TrainConfig, TrainingDiverged

TINY = {"depth": 2}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """12 usable files (wav/flac/ogg, 8-44.1 kHz, mono/stereo, 0.8-12 s) + 1 corrupt + 1 too short."""
    root = tmp_path_factory.mktemp("audio")
    (root / "sub").mkdir()
    formats = [("wav", 16000, 1), ("flac", 44100, 2), ("ogg", 22050, 1), ("wav", 8000, 2)]
    for i in range(12):
        suffix, rate, channels = formats[i % 4]
        seconds = 12.0 if i == 0 else 0.8 + 0.4 * i
        folder = root / "sub" if i % 2 else root
        sf.write(folder / f"clip{i:02d}.{suffix}", tone(seconds, rate, i, channels=channels), rate)
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(root / "blip.wav", tone(0.1, 16000, 99, channels=1), 16000)
    return root


def _config(data, **changes) -> TrainConfig:
    base = dict(model="ssast_tiny", model_overrides=dict(TINY), data=str(data), batch_size=4, steps=6,
                warmup_steps=2, base_lr=0.01, checkpoint_every=3, log_every=1, progress=False, seed=0)
    return TrainConfig(**{**base, **changes})


# ------------------------------------------------------------------------------------ data
def test_audio_folder_skips_bad_files_and_crops(audio_dir):
    source = _data.AudioFolder(audio_dir, min_seconds=0.5)
    assert source.num_items == 12
    assert source.skipped == {"unreadable": 1, "too_short": 1}
    assert "skipped 1 unreadable and 1 too short" in source.describe()
    dataset = _data.CropDataset(source, 200, seed=0)
    for index in range(source.num_items):
        crop = dataset[(0, index)]
        assert crop.shape == (1, 200, 80) and torch.isfinite(crop).all()
    assert torch.equal(dataset[(0, 0)], dataset[(0, 0)])  # a pure function of (seed, epoch, index)
    assert not torch.equal(dataset[(0, 0)], dataset[(1, 0)])  # a new random crop each epoch


def test_long_files_are_read_as_a_random_segment(audio_dir):
    rng = np.random.default_rng(0)
    audio = _data.read_segment(audio_dir / "clip00.wav", 3.0, rng)
    assert audio.shape == (48000,)


def test_shards_round_trip_and_split_by_shard(audio_dir, tmp_path):
    summary = _data.write_shards(audio_dir, tmp_path / "shards", clips_per_shard=4, segment_seconds=5.0, progress=False)
    # clip00 (12 s) -> 5 + 5 + 2 s segments; 11 other files; corrupt and too-short skipped
    assert summary["clips"] == 14 and summary["shards"] == 4
    assert summary["skipped"] == {"unreadable": 1, "too_short": 1}
    shards = _data.open_source(tmp_path / "shards")
    assert isinstance(shards, _data.TarShards) and shards.num_items == 14
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as archive:
        assert all(m.name.endswith(".logmel.npy") for m in archive.getmembers())
    logmel = shards.load(0, np.random.default_rng(0))
    assert logmel.shape[1] == 80 and abs(float(logmel.mean())) < 0.01  # per-clip normalised
    # two ranks: disjoint shards, equal numbers of batches
    ranks = [_data.EpochSampler(shards.groups, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    batches = [s.batches(epoch=0) for s in ranks]
    assert len(batches[0]) == len(batches[1]) > 0
    owner = {i: g for g, group in enumerate(shards.groups) for i in group}
    used = [{owner[i] for b in rank_batches for i in b} for rank_batches in batches]
    assert not used[0] & used[1]
    flac = _data.write_shards(audio_dir, tmp_path / "flac", kind="flac", clips_per_shard=100, progress=False)
    audio_shards = _data.TarShards(tmp_path / "flac")
    assert flac["clips"] == 13 and audio_shards.load(0, np.random.default_rng(0)).shape[1] == 80


# ------------------------------------------------------------------------------------ recipe
def test_depth_override_reaches_the_builder():
    model = loop.build_model(TrainConfig(model="ssam_tiny", model_overrides={"depth": 2}))
    assert model.config.depth == 2 and len(model.blocks) == 2


def test_weight_decay_groups_and_schedule():
    model = loop.build_model(TrainConfig(model="ssam_tiny", model_overrides=TINY))
    decay, no_decay = loop.parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.norm.weight",
            "blocks.0.norm.bias", "pred.0.bias"} <= exempt
    assert "pos_embed" not in exempt and "pos_embed" not in {names[id(p)] for p in decay["params"]}  # frozen
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.mixer.in_proj.weight", "pred.2.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    factors = [run_config.lr_factor(s, 10, 100, 0.0) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[99] < 0.001
    assert TrainConfig(batch_size=1024).lr == pytest.approx(6e-4)


def test_train_exports_weights_loadable_by_load_model(audio_dir, tmp_path):
    result = training.train(_config(audio_dir, steps=4), tmp_path / "run")
    final = result.export_dir
    assert (final / "config.json").is_file() and (final / "README.md").is_file()
    loaded = hear_msm.load_model(final)
    assert loaded.config.depth == 2
    for key, value in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0] == ",".join(loop.LOG_FIELDS) and len(rows) == 5
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(_config(audio_dir, steps=4), tmp_path / "run")


def test_export_loads_through_the_hear_module(audio_dir, tmp_path):
    import hear_msm.ssast_tiny as module

    config = _config(audio_dir, model_overrides={}, steps=1, warmup_steps=0, batch_size=2, export_dtype="float16")
    final = training.train(config, tmp_path / "run").export_dir
    assert load_file(str(final / "model.safetensors"))["mask_token"].dtype == torch.float16
    model = module.load_model(str(final))
    scenes = module.get_scene_embeddings(torch.randn(2, 16000) * 0.1, model)
    assert scenes.shape == (2, model.scene_embedding_size) and torch.isfinite(scenes).all()


def test_masked_only_and_timestep_masking_train(audio_dir, tmp_path):
    config = _config(audio_dir, steps=2, warmup_steps=1, mask_mode="timestep", masked_only_loss=True)
    assert np.isfinite(training.train(config, tmp_path / "run").loss)


def test_joint_objective_options_train_and_are_validated(audio_dir, tmp_path):
    config = _config(audio_dir, steps=2, warmup_steps=1, patch_normalized_targets=True, discriminative_weight=0.1)
    assert np.isfinite(training.train(config, tmp_path / "run").loss)
    with pytest.raises(ValueError, match="discriminative_weight"):
        TrainConfig(discriminative_weight=-1.0)


def test_training_decoder_is_checkpointed_resumed_and_never_exported(audio_dir, tmp_path, monkeypatch):
    """The training-only decoder changes the objective, is saved and restored with the run, and the
    exported weights have exactly the keys of a plain model (the authors' checkpoint format)."""
    plain = training.train(_config(audio_dir, steps=4), tmp_path / "plain")
    config = _config(audio_dir, steps=4, checkpoint_every=2, decoder_depth=1)
    straight = training.train(config, tmp_path / "straight")
    assert straight.loss != plain.loss
    state = run_state.load_checkpoint(tmp_path / "straight" / run_state.CHECKPOINT_NAME)
    assert state["decoder"] and not any(name.startswith("decoder") for name in state["model"])
    exported = load_file(str(straight.export_dir / "model.safetensors"))
    assert exported.keys() == load_file(str(plain.export_dir / "model.safetensors")).keys()
    assert "decoder" in (straight.export_dir / "README.md").read_text()

    # interrupt right after the step-2 checkpoint, resume: the same weights as the straight run
    save = run_state.save_checkpoint

    def save_then_stop(path, payload):
        save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "interrupted")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = training.train(config, tmp_path / "interrupted", resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="decoder_depth"):
        TrainConfig(decoder_depth=-1)


def test_plot_loss(audio_dir, tmp_path):
    pytest.importorskip("matplotlib")
    training.train(_config(audio_dir, steps=3), tmp_path / "run")
    png = export.plot_loss(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ robustness

def _nan_loss_at_call(call: int, monkeypatch) -> None:
    """Make the `call`-th reconstruction loss NaN (a diverging step), every other one as computed."""
    real = hear_msm.MaskedSpectrogramModel.reconstruction_loss
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(hear_msm.MaskedSpectrogramModel, "reconstruction_loss", flaky)


def test_nan_loss_stops_with_last_good_checkpoint_intact(audio_dir, tmp_path, monkeypatch):
    _nan_loss_at_call(5, monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*checkpoint.pt \(step 3, finite\)"):
        training.train(_config(audio_dir, steps=8), run)
    checkpoint = run_state.load_checkpoint(run / run_state.CHECKPOINT_NAME)
    assert checkpoint["step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert not (run / "final").exists()
    assert sorted(p.name for p in run.iterdir()) == [".hear_msm_run.json", ".hear_msm_run.lock", "checkpoint.pt",
                                                     "log.csv", "train_config.json"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    run_state.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(payload, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run_state.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert run_state.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_sigkill_then_resume_matches_uninterrupted_run(audio_dir, tmp_path):
    args = ["--model", "ssast_tiny", "--override", "depth=2", "--data", str(audio_dir), "--steps", "40",
            "--batch-size", "2", "--warmup-steps", "5", "--base-lr", "0.01", "--checkpoint-every", "4",
            "--log-every", "1", "--no-progress", "--seed", "3"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(args, killed)
    step = run_state.load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step < 40 and not (killed / "final").exists()

    resumed = subprocess.run(pretrain_cli("--out", str(killed), "--resume", "--no-progress"), env=cli_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stderr
    straight = subprocess.run(pretrain_cli(*args, "--out", str(tmp_path / "straight")), env=cli_env(),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    a = load_file(str(killed / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max |diff| {(a[key] - b[key]).abs().max():.3g}"
    log_steps = [int(r.split(",")[0]) for r in (killed / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == list(range(1, 41))  # the killed tail was dropped, no duplicates

    with_other_recipe = subprocess.run(pretrain_cli("--out", str(killed), "--resume", "--mask-ratio", "0.3"), env=cli_env(),
                                       capture_output=True, text=True)
    assert with_other_recipe.returncode == 2 and "mask_ratio" in with_other_recipe.stderr


def test_two_process_gloo_ddp_ranks_end_identical(audio_dir, tmp_path):
    ranks = train_on_two_ranks(_config(str(audio_dir), steps=4, batch_size=4, device="cpu"), tmp_path / "run",
                               tmp_path)
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    torch.manual_seed(0)  # as the run's setup seeds before building: the check below can then fail
    initial = loop.build_model(_config(audio_dir)).state_dict()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], exported[key]), key
    assert not torch.equal(ranks[0]["pred.2.weight"], initial["pred.2.weight"])  # it did train
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 5  # rank 0 alone logged


def test_cli_registers_the_training_commands():
    from hear_msm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--out", "x", "--model", "ssam_tiny", "--data", "d", "--override", "depth=2"])
    assert args.run is commands._cmd_pretrain and args.override == ["depth=2"]
    assert parser.parse_args(["prepare-shards", "a", "b"]).kind == "logmel"
    assert parser.parse_args(["plot-loss", "run"]).run is commands._cmd_plot_loss


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("changes, message", [
    ({"min_lr": 0.5}, r"min_lr 0.5 is above the peak learning rate 0.00015625 \(= base_lr 0.01 x batch_size 4"),
    ({"steps": 0}, r"steps must be >= 1, got 0"),
    ({"steps": -3}, r"steps must be >= 1, got -3"),
    ({"epochs": 0.0, "steps": None}, r"epochs must be > 0, got 0.0"),
    ({"epochs": -1.0}, r"epochs must be > 0"),
    ({"warmup_steps": -1}, r"warmup_steps must be >= 0, got -1"),
    ({"warmup_epochs": -0.5}, r"warmup_epochs must be >= 0"),
    ({"warmup_steps": 6}, r"warm-up \(6 steps\) must be shorter than the run \(6 steps\).*below 6"),
    ({"base_lr": float("nan")}, r"base_lr must be a finite number, got nan"),
    ({"batch_size": 2.5}, r"batch_size must be an integer, got 2.5"),
    ({"mask_ratio": 1.0}, r"mask_ratio must be below 1"),
    ({"beta2": 1.5}, r"beta2 must be below 1"),
    ({"model": "ssast_huge"}, r"unknown model 'ssast_huge'; available: ssast_tiny"),
    ({"model_overrides": {"depth": 2, "bogus": 1}}, r"--override bogus: not a field of ssast_tiny's config; "
                                                    r"accepted: embed_dim, depth, .*num_heads"),
])
def test_schedule_and_recipe_arguments_are_validated(audio_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        _config(audio_dir, **changes)


def test_warmup_derived_from_epochs_must_end_before_the_run():
    config = TrainConfig(steps=20, warmup_epochs=10.0)
    with pytest.raises(ValueError, match=r"warm-up \(30 steps = warmup_epochs 10 x 3 steps per epoch\) must be "
                                         r"shorter than the run \(20 steps\)"):
        run_config.schedule_steps(config, steps_per_epoch=3)
    assert run_config.schedule_steps(TrainConfig(epochs=4.0, warmup_epochs=1.0), steps_per_epoch=3) == (12, 3)


def test_cli_refuses_bad_schedule_and_data_before_writing(audio_dir, tmp_path, capsys):
    from hear_msm.cli import main

    base = ["pretrain", "--model", "ssast_tiny", "--override", "depth=2", "--data", str(audio_dir),
            "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "run")]
    cases = [(["--steps", "0"], "steps must be >= 1, got 0"),
             (["--epochs", "-1"], "epochs must be > 0"),
             (["--steps", "4", "--warmup-steps", "-2"], "warmup_steps must be >= 0"),
             (["--steps", "4", "--base-lr", "0.001", "--min-lr", "0.01"],
              "min_lr 0.01 is above the peak learning rate 1.5625e-05"),
             (["--steps", "4", "--override", "bogus=1"], "--override bogus: not a field of ssast_tiny's config"),
             (["--steps", "4", "--device", "bogus"], "device must be auto, cpu or cuda[:index], got 'bogus'"),
             (["--steps", "4", "--data", str(audio_dir / "clip00.wav")],
              "is a single audio file; pretraining draws batches"),
             (["--steps", "4", "--override", "embed_dim=abc"],
              "--override embed_dim='abc': ssast_tiny's embed_dim is an integer"),
             (["--steps", "4", "--override", "depth=true"], "--override depth=True: ssast_tiny's depth is an integer")]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "run" / run_state.CHECKPOINT_NAME).exists()
    assert not (tmp_path / "run" / run_config.LOG_NAME).exists()


def test_resume_refuses_garbage_and_foreign_checkpoints_without_unsafe_advice(audio_dir, tmp_path, capsys):
    import argparse

    from hear_msm.cli import main

    run = tmp_path / "run"
    training.train(_config(audio_dir, steps=2, warmup_steps=1), run)
    checkpoint = run / run_state.CHECKPOINT_NAME
    foreign = {
        "garbage": lambda path: path.write_bytes(b"\x80\x02not a checkpoint at all" * 10),
        "truncated": lambda path: path.write_bytes(path.read_bytes()[:5000]),
        "plain state dict": lambda path: torch.save({"weight": torch.ones(3)}, path),
        "pickled object": lambda path: torch.save({"args": argparse.Namespace(lr=1)}, path),
        "empty": lambda path: path.write_bytes(b""),
    }
    original = checkpoint.read_bytes()
    for name, write in foreign.items():
        checkpoint.write_bytes(original)
        write(checkpoint)
        assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert str(checkpoint) in err and "hear-msm pretrain checkpoint" in err, (name, err)
        assert "weights_only" not in err and "Traceback" not in err, (name, err)


def test_divergence_advice_is_accepted_by_resume_and_recorded(audio_dir, tmp_path, monkeypatch, capsys):
    """A NaN at step 4 stops the run; the printed command resumes it from the finite step-3 checkpoint
    with a lower lr and clipping; the change is in the marker and the card; log rows are unique."""
    import shlex

    from hear_msm.cli import main

    _nan_loss_at_call(5, monkeypatch)
    run = tmp_path / "run"
    args = ["pretrain", "--model", "ssast_tiny", "--override", "depth=2", "--data", str(audio_dir), "--steps", "6",
            "--batch-size", "4", "--warmup-steps", "2", "--base-lr", "0.01", "--checkpoint-every", "3",
            "--log-every", "1", "--no-progress", "--out", str(run)]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "loss is nan at step 4" in err and "(step 3, finite)" in err
    command = shlex.split(err.split("Continue from it with: ")[1].split(";")[0])
    assert command[:2] == ["hear-msm", "pretrain"] and "--resume" in command
    assert main(command[1:]) == 0, capsys.readouterr().err
    assert "changed on resume: base_lr 0.01 -> 0.005, grad_clip 0.0 -> 1.0" in capsys.readouterr().err

    marker = json.loads((run / ".hear_msm_run.json").read_text())
    assert marker["resumes"][0]["step"] == 3
    assert marker["resumes"][0]["changed"] == {"base_lr": [0.01, 0.005], "grad_clip": [0.0, 1.0]}
    rows = list(csv.DictReader(open(run / run_config.LOG_NAME, newline="")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    peak = 0.005 * 4 / 256  # the new peak: step 3 (index 3) is the first after the 2-step warm-up
    assert float(rows[3]["lr"]) == pytest.approx(peak * run_config.lr_factor(3, 2, 6, 0.0), rel=1e-5)
    card = (run / "final" / "README.md").read_text()
    assert "Resumed at step 3 with base_lr 0.01 -> 0.005, grad_clip 0.0 -> 1.0." in card and "loss nan" not in card

    # a finished run resumed takes no step and keeps its loss in the card
    before = load_file(str(run / "final" / "model.safetensors"))
    assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "loss nan" not in (run / "final" / "README.md").read_text()
    after = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_accepts_schedule_and_precision_changes_only():
    saved = TrainConfig(steps=100, warmup_steps=10)
    changed = TrainConfig(steps=100, warmup_steps=20, base_lr=1e-4, min_lr=1e-6, grad_clip=1.0, precision="bf16",
                          num_workers=2)
    assert run_config.resume_changes(saved, changed) == {
        "warmup_steps": (10, 20), "base_lr": (1.5e-4, 1e-4), "min_lr": (0.0, 1e-6), "grad_clip": (0.0, 1.0),
        "precision": ("auto", "bf16"), "num_workers": (0, 2)}
    with pytest.raises(ValueError, match=r"steps=200 \(run has 100\).*only the schedule \(base_lr, min_lr"):
        run_config.resume_changes(saved, TrainConfig(steps=200, warmup_steps=10))


def test_non_finite_weights_are_never_checkpointed(audio_dir, tmp_path, monkeypatch):
    """NaN gradients under a finite loss (fp32 has no GradScaler to skip them) poison the weights in the
    second update: the checkpoint due then is not written, the step-1 one stays the last good one."""
    build, backward_calls = loop.build_model, []

    def poison_second_gradient(grad):
        backward_calls.append(1)
        return grad * float("nan") if len(backward_calls) == 2 else grad

    def build_with_hook(config):
        model = build(config)
        model.pred[2].bias.register_hook(poison_second_gradient)
        return model

    monkeypatch.setattr(loop, "build_model", build_with_hook)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"weights became non-finite by step 2 \(pred.2.bias.*"
                                               r"Last good checkpoint: .*checkpoint.pt \(step 1, finite\)"):
        training.train(_config(audio_dir, steps=4, warmup_steps=0, checkpoint_every=1), run)
    state = run_state.load_checkpoint(run / run_state.CHECKPOINT_NAME)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "final").exists()


def test_new_run_after_an_early_stop_starts_a_fresh_log(audio_dir, tmp_path, monkeypatch):
    _nan_loss_at_call(3, monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="No checkpoint was written yet: run the same command again"):
        training.train(_config(audio_dir, steps=4, checkpoint_every=100), run)
    assert len((run / run_config.LOG_NAME).read_text().splitlines()) == 3  # header + steps 1, 2
    training.train(_config(audio_dir, steps=4, checkpoint_every=100), run)
    steps = [int(r["step"]) for r in csv.DictReader(open(run / run_config.LOG_NAME, newline=""))]
    assert steps == [1, 2, 3, 4]


def test_prepare_shards_refuses_bad_sizes_and_writes_whole_shards(audio_dir, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    for kwargs, message in [({"clips_per_shard": 0}, "clips_per_shard must be an integer >= 1, got 0"),
                            ({"clips_per_shard": -5}, "clips_per_shard must be an integer >= 1"),
                            ({"segment_seconds": 0.0}, "segment_seconds must be a finite number > 0"),
                            ({"segment_seconds": -2.0}, "segment_seconds must be a finite number > 0"),
                            ({"segment_seconds": float("nan")}, "segment_seconds must be a finite number > 0"),
                            ({"segment_seconds": 0.2}, "segment_seconds 0.2 is shorter than min_seconds 0.5")]:
        with pytest.raises(ValueError, match=message):
            _data.write_shards(audio_dir, out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="is a file; prepare-shards reads a folder"):
        _data.write_shards(audio_dir / "clip00.wav", out, progress=False)
    assert not out.exists() or not any(out.iterdir())

    # a failure while writing the second shard leaves the first whole and nothing else
    real, calls = _data._Features.logmel, []

    def failing(audio):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        return real(audio)

    monkeypatch.setattr(_data._Features, "logmel", failing)
    with pytest.raises(OSError, match="disk full"):
        _data.write_shards(audio_dir, out, clips_per_shard=3, progress=False)
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"]
    assert _data.TarShards(out).num_items == 3


def test_prepare_shards_cli_segment_options(audio_dir, tmp_path, capsys):
    from hear_msm.cli import main

    assert main(["prepare-shards", str(audio_dir), str(tmp_path / "a"), "--segment-seconds", "0"]) == 2
    assert "segment_seconds must be a finite number > 0" in capsys.readouterr().err
    assert main(["prepare-shards", str(audio_dir), str(tmp_path / "b"), "--kind", "flac", "--whole-files",
                 "--clips-per-shard", "100"]) == 0
    summary = json.loads((tmp_path / "b" / "shards.json").read_text())
    assert summary["clips"] == 12 and summary["shards"] == 1  # clip00 (12 s) kept whole
