"""Bad input to the HEAR runtime, the model builders and `hear-msm embed` / `convert` (issue 11):
each case gives either a correct result or a ValueError saying what is accepted, never a silent
NaN, a truncated option or a lost file."""
import errno
import os
import re
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import TESTS_DIR

import hear_msm
import hear_msm.ssast_tiny
from hear_msm import _weights, cli
from hear_msm._frontend import LOG_OFFSET, LogMelFrontend, standardise_log_power
from hear_msm._hear import HearModel, load_hear_model

ARCHS = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]
SR = 16000
REPO = TESTS_DIR.parent


def _clip(seconds=1.0, seed=0):
    """A tone plus noise at a normal level, [1, samples] float32."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    return (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(t.numel(), generator=gen))[None].float()


@pytest.fixture(scope="module", params=ARCHS)
def runtime(request):
    torch.manual_seed(0)
    return HearModel(hear_msm.create_model(request.param))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    _weights.save_pretrained(hear_msm.create_model("ssast_tiny"), folder)
    return folder


def _wav(path, audio: torch.Tensor):
    sf.write(str(path), audio[0].numpy(), SR, subtype="FLOAT")  # float WAV keeps any amplitude
    return path


def _embed(args, capsys):
    """`hear-msm embed ...` in this process -> (exit code, stderr)."""
    code = cli.main(["embed", *map(str, args)])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------ audio level (item 2)
def _authors_features(audio):
    """The authors' feature formula, written out (float32 throughout)."""
    melspec = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=400, win_length=400, hop_length=160,
                                                   f_min=50.0, f_max=8000.0, n_mels=80, power=2.0)
    logmel = torch.log(melspec(audio) + LOG_OFFSET)
    mean, std = logmel.mean(dim=(1, 2), keepdim=True), logmel.std(dim=(1, 2), keepdim=True)
    return ((logmel - mean) / (std + 1e-8)).transpose(1, 2)


def test_normal_audio_features_are_unchanged():
    """The float64 fallback and the silence rule never touch audio at a normal level."""
    audio = torch.cat([_clip(2.5, seed) for seed in range(3)])
    assert torch.equal(LogMelFrontend()(audio), _authors_features(audio))


@pytest.mark.parametrize("level", [1e-3, 1.0, 1e6])
def test_float32_features_match_the_float64_computation(level):
    """The float64 path (used where float32 overflows) computes the same features: checked where
    both are defined, against each other."""
    frontend = LogMelFrontend()
    audio = _clip(2.5) * level
    reference = standardise_log_power(frontend.power_float64(audio.double())).transpose(1, 2)
    difference = (frontend(audio).double() - reference).abs().max().item()
    print(f"level {level:g}: float32 vs float64 features, max |diff| {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("peak", [1e18, 1e30, 3e38])
def test_loud_audio_gives_the_features_of_the_same_clip_at_a_normal_level(peak):
    frontend = LogMelFrontend()
    audio = _clip(2.5)
    loud = audio / audio.abs().max() * peak
    assert torch.isfinite(loud).all()
    # at 1e6 the float32 path runs and the log offset is negligible, as it is for the loud clip
    expected = frontend(audio / audio.abs().max() * 1e6)
    difference = (frontend(loud) - expected).abs().max().item()
    print(f"peak {peak:g}: max |diff| {difference:.2e} to the clip at peak 1e6")
    assert difference < 1e-4


@pytest.mark.parametrize("peak", [1e18, 1e30, 3e38])
def test_loud_audio_embeddings_are_finite_and_level_independent(runtime, peak):
    audio = torch.cat([_clip(2.5, seed=1), _clip(2.5, seed=2)])
    loud = audio.clone()
    loud[1] = audio[1] / audio[1].abs().max() * peak  # one loud clip in a batch with a normal one
    normal = audio[1:] / audio[1].abs().max() * 1e6
    embeddings, _ = runtime.timestamp_embeddings(loud)
    assert torch.isfinite(embeddings).all()
    expected, _ = runtime.timestamp_embeddings(torch.cat([audio[:1], normal]))
    difference = (embeddings - expected).abs().max().item()
    print(f"{runtime.arch} peak {peak:g}: max |diff| {difference:.2e}")
    assert difference < 1e-4
    scene = runtime.scene_embeddings(loud)
    assert torch.isfinite(scene).all() and torch.allclose(scene, embeddings.mean(1), atol=1e-5)


@pytest.mark.parametrize("samples", [640, 16000, 40000, 112000])
def test_silent_and_underflowing_clips_get_zero_features(samples):
    """Digital silence and audio whose power underflows float32 (1e-30) are constant log-mels:
    defined as all-zero features (before: the mean's rounding error / 1e-8, up to +-300)."""
    frontend = LogMelFrontend()
    silent = torch.zeros(1, samples)
    signs = torch.randn(1, samples, generator=torch.Generator().manual_seed(0)).sign()
    tiny = 1e-30 * signs
    assert torch.equal(frontend(silent), torch.zeros(1, samples // 160 + 1, 80))
    assert torch.equal(frontend(tiny), torch.zeros(1, samples // 160 + 1, 80))


def test_silent_clip_embedding_is_the_encoding_of_zero_features(runtime):
    silent, tiny = torch.zeros(1, 40000), torch.full((1, 40000), 1e-30)
    embeddings, _ = runtime.timestamp_embeddings(torch.cat([silent, tiny]))
    assert torch.isfinite(embeddings).all() and torch.equal(embeddings[0], embeddings[1])
    tokens = runtime.encoder.forward_features(torch.zeros(2, 1, 200, 80))  # 2.5 s = two chunks
    expected = tokens.reshape(2, 50, -1).reshape(100, -1)[:63]  # 63 columns of 40 ms
    assert torch.allclose(embeddings[0], expected, atol=1e-5)


def test_float64_audio_beyond_the_float32_range_is_refused():
    runtime = HearModel(hear_msm.create_model("ssast_tiny"))
    audio = _clip(1.0).double()
    audio[0, 100] = 1e39
    with pytest.raises(ValueError, match=r"clip\(s\) \[0\] exceed the float32 range"):
        runtime.timestamp_embeddings(audio)
    with pytest.raises(ValueError, match="float32 range"):
        runtime.scene_embeddings(audio)
    assert torch.isfinite(runtime.scene_embeddings(audio.clamp(-3e38, 3e38))).all()


def _overflowing(encoder):
    """Finite weights that overflow inside the encoder (the patch projection scaled by 1e38)."""
    with torch.no_grad():
        encoder.patch_embed.proj.weight.mul_(1e38)
    return encoder


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_that_give_non_finite_embeddings_are_refused(arch):
    torch.manual_seed(0)
    runtime = HearModel(_overflowing(hear_msm.create_model(arch)), weights="overflowing test weights")
    with pytest.raises(ValueError, match=r"non-finite timestamp embeddings for clip\(s\) \[0, 1\].*overflowing"):
        runtime.timestamp_embeddings(torch.cat([_clip(1.0), _clip(1.0, 1)]))
    with pytest.raises(ValueError, match="non-finite scene embeddings"):
        runtime.scene_embeddings(_clip(1.0))


def test_cli_embeds_loud_files_and_refuses_overflowing_weights(tmp_path, weights_dir, capsys):
    audio = _clip(1.0)
    files = [_wav(tmp_path / "normal.wav", audio / audio.abs().max() * 1e6),
             _wav(tmp_path / "loud.wav", audio / audio.abs().max() * 1e30)]
    out = tmp_path / "emb.npz"
    code, err = _embed([*files, "--model", "ssast_tiny", "--weights", weights_dir, "--out", out], capsys)
    assert code == 0, err
    result = np.load(out)
    assert np.isfinite(result["scene_embeddings"]).all()
    assert np.abs(result["timestamp_embeddings_0000"] - result["timestamp_embeddings_0001"]).max() < 1e-3
    bad = tmp_path / "overflowing"
    _weights.save_pretrained(_overflowing(hear_msm.load_model(weights_dir)), bad)
    code, err = _embed([files[0], "--model", "ssast_tiny", "--weights", bad, "--out", tmp_path / "bad.npz"], capsys)
    assert code == 2 and "non-finite" in err and "normal.wav" in err
    assert not (tmp_path / "bad.npz").exists()


# ------------------------------------------------------------------ atomic writes (item 3)
def _disk_full(monkeypatch):
    """Make the rename that publishes a finished temporary fail as a full disk would."""
    def replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", replace)


def _no_temporaries(folder):
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_embed_overwrite_keeps_the_old_file_when_the_write_fails(tmp_path, weights_dir, capsys, monkeypatch):
    wav = _wav(tmp_path / "a.wav", _clip(1.0))
    out = tmp_path / "emb.npz"
    out.write_bytes(b"previous result")
    _disk_full(monkeypatch)
    code, err = _embed([wav, "--model", "ssast_tiny", "--weights", weights_dir, "--out", out, "--overwrite"], capsys)
    assert code == 2 and f"cannot write {out}: No space left on device; the previous file is unchanged" in err
    assert out.read_bytes() == b"previous result" and _no_temporaries(tmp_path)


def _file_size_limit(limit):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (a quota, for real), not SIGXFSZ."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_embed_overwrite_over_quota_in_a_real_process(tmp_path, weights_dir):
    wav = _wav(tmp_path / "a.wav", _clip(3.0))  # 75 x 960 float32 embeddings: far above 64 KiB
    out = tmp_path / "emb.npz"
    out.write_bytes(b"previous result")
    command = [sys.executable, "-m", "hear_msm.cli", "embed", str(wav), "--model", "ssast_tiny",
               "--weights", str(weights_dir), "--out", str(out), "--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, preexec_fn=_file_size_limit(65536))
    assert done.returncode == 2 and "File too large; the previous file is unchanged" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert out.read_bytes() == b"previous result" and _no_temporaries(tmp_path)


def test_save_pretrained_overwrite_keeps_the_old_pair_when_the_write_fails(tmp_path, monkeypatch):
    torch.manual_seed(0)
    _weights.save_pretrained(hear_msm.create_model("ssast_tiny"), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "config.json", "README.md")}
    other = hear_msm.create_model("axlstm_tiny")
    _disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        _weights.save_pretrained(other, tmp_path, overwrite=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert _no_temporaries(tmp_path) and hear_msm.load_model(tmp_path).config.arch == "ssast_tiny"


def test_convert_overwrite_over_quota_keeps_the_old_weights(tmp_path):
    torch.manual_seed(0)
    model = hear_msm.create_model("ssast_tiny")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 3}, run / "checkpoint-3.pth")
    out = tmp_path / "converted"
    command = [sys.executable, "-m", "hear_msm.cli", "convert", str(run.parent), str(out)]
    assert subprocess.run(command, capture_output=True, cwd=REPO).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    done = subprocess.run(command + ["--overwrite", "--dtype", "float16"], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=_file_size_limit(1 << 20))  # 5.4 M parameters do not fit in 1 MiB
    assert done.returncode == 2 and "File too large; the previous file is unchanged" in done.stderr, done.stderr
    assert (out / "model.safetensors").read_bytes() == before and _no_temporaries(out)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_are_readable_as_the_umask_allows(tmp_path, weights_dir, capsys, umask, mode):
    previous = os.umask(umask)
    try:
        _weights.save_pretrained(hear_msm.create_model("ssast_tiny"), tmp_path / "w")
        wav = _wav(tmp_path / "a.wav", _clip(1.0))
        out = tmp_path / "e.npz"
        code, err = _embed([wav, "--model", "ssast_tiny", "--weights", weights_dir, "--out", out], capsys)
    finally:
        os.umask(previous)
    assert code == 0, err
    for path in (tmp_path / "w" / "model.safetensors", tmp_path / "w" / "config.json", tmp_path / "w" / "README.md",
                 tmp_path / "e.npz"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# ------------------------------------------------------------------------- kernels
ACCEPTED_KERNELS = {
    "ssast_tiny": ("auto", "onednn", "reference"),
    "ssam_tiny": ("auto", "cuda", "cpu", "reference"),
    "axlstm_tiny": ("auto", "cpu", "fused", "reference"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_accepts_exactly_its_kernels(arch):
    accepted = ACCEPTED_KERNELS[arch]
    with torch.device("meta"):
        for kernel in accepted:
            hear_msm.create_model(arch, kernel=kernel)
        every_family_kernel = {kernel for kernels in ACCEPTED_KERNELS.values() for kernel in kernels}
        for kernel in sorted({"bogus", "", "AUTO", *every_family_kernel} - set(accepted)):
            with pytest.raises(ValueError, match=re.escape(f"kernel must be one of {accepted}") + f".*got {kernel!r}"):
                hear_msm.create_model(arch, kernel=kernel)


def test_kernel_is_checked_by_every_loader(weights_dir, tmp_path):
    with pytest.raises(ValueError, match=r"SSAST.*got 'bogus'"):
        hear_msm.load_model(weights_dir, kernel="bogus")
    with pytest.raises(ValueError, match=r"SSAST.*got 'cpu'"):
        hear_msm.ssast_tiny.load_model(str(weights_dir), kernel="cpu")
    axlstm = tmp_path / "axlstm"
    _weights.save_pretrained(hear_msm.create_model("axlstm_tiny"), axlstm)
    with pytest.raises(ValueError, match=r"'auto', 'cpu', 'fused', 'reference'.*got 'cuda'"):
        load_hear_model("axlstm_tiny", str(axlstm), kernel="cuda")


def test_pretrain_with_a_bogus_kernel_fails_before_training(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "hear_msm.cli", "pretrain", "--model", "ssast_tiny", "--data",
               str(REPO / "examples"), "--out", str(out), "--kernel", "bogus", "--steps", "2", "--batch-size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "kernel must be one of ('auto', 'onednn', 'reference') for SSAST" in done.stderr and "bogus" in done.stderr
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------- devices and dtypes
@pytest.mark.parametrize("device, message", [
    ("bogus", "device must be 'cpu', 'cuda'"),
    ("meta", "device must be 'cpu', 'cuda'"),
    ("cuda", "no CUDA GPU"),
    ("cuda:7", "CUDA"),
])
def test_unusable_devices_are_refused_before_loading(device, message, monkeypatch):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(hear_msm, "create_model", lambda *a, **k: pytest.fail("weights loaded before the device check"))
    with pytest.raises(ValueError, match=message):
        load_hear_model("ssast_tiny", "", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device, message", [("bogus", "device must be"), ("cuda", "no CUDA GPU")])
def test_embed_cli_refuses_unusable_devices(tmp_path, weights_dir, capsys, device, message):
    wav = _wav(tmp_path / "a.wav", _clip(1.0))
    out = tmp_path / "e.npz"
    arguments = [wav, "--model", "ssast_tiny", "--weights", weights_dir, "--out", out, "--device", device]
    code, err = _embed(arguments, capsys)
    assert code == 2 and message in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_accepted_dtypes(runtime, dtype):
    model = HearModel(hear_msm.create_model(runtime.arch)).to(dtype)
    for embed in (model.timestamp_embeddings, model.scene_embeddings):
        with pytest.raises(ValueError, match=rf"float32 \(or float64\).*{dtype}.*model.float\(\)"):
            embed(_clip(1.0))
    assert torch.isfinite(model.float().scene_embeddings(_clip(1.0))).all()  # the advice works


def test_float64_models_compute_the_same_embeddings(runtime):
    model = HearModel(hear_msm.create_model(runtime.arch))
    model.encoder.load_state_dict(runtime.encoder.state_dict())
    expected, _ = runtime.timestamp_embeddings(_clip(2.5))
    embeddings, _ = model.double().timestamp_embeddings(_clip(2.5))
    assert embeddings.dtype == torch.float32 and (embeddings - expected).abs().max() < 1e-4


# -------------------------------------------------------------------- embed --out (item 5)
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    monkeypatch.setattr("hear_msm._hear.load_hear_model", lambda *a, **k: pytest.fail("computed before refusing --out"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_embed_out_that_is_a_directory_is_refused_first(tmp_path, capsys, no_model, overwrite):
    wav = _wav(tmp_path / "a.wav", _clip(1.0))
    (tmp_path / "emb.npz").mkdir()
    code, err = _embed([wav, "--model", "ssast_tiny", "--out", tmp_path / "emb.npz", *overwrite], capsys)
    assert code == 2 and "is a directory" in err


def test_embed_out_under_a_file_is_refused_first(tmp_path, capsys, no_model):
    wav = _wav(tmp_path / "a.wav", _clip(1.0))
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    code, err = _embed([wav, "--model", "ssast_tiny", "--out", tmp_path / "notes.txt" / "sub" / "e.npz"], capsys)
    assert code == 2 and "notes.txt is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_embed_out_in_a_read_only_folder_is_refused_first(tmp_path, capsys, no_model):
    wav = _wav(tmp_path / "a.wav", _clip(1.0))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = _embed([wav, "--model", "ssast_tiny", "--out", locked / "e.npz"], capsys)
    assert code == 2 and "no permission to write" in err


# ----------------------------------------------------------------- runtime options (item 6)
@pytest.mark.parametrize("value", [1.7, 4.0, "4", True, 0, -2, "auto"])
def test_max_batch_chunks_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="max_batch_chunks must be a positive integer.*got " + re.escape(repr(value))):
        HearModel(hear_msm.create_model("ssast_tiny"), max_batch_chunks=value)


def test_numpy_ints_and_none_are_accepted_for_max_batch_chunks():
    encoder = hear_msm.create_model("ssast_tiny")
    assert HearModel(encoder, max_batch_chunks=np.int64(3)).max_batch_chunks == 3
    assert HearModel(encoder, max_batch_chunks=None).max_batch_chunks >= 1


@pytest.mark.parametrize("value", [2.5, "64", False])
def test_segment_tokens_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="segment_tokens must be a positive integer"):
        HearModel(hear_msm.create_model("ssam_tiny"), sequence="full", segment_tokens=value)


@pytest.mark.parametrize("positions", ["extend", "tile"])
def test_positions_only_apply_to_full_sequences(positions):
    encoder = hear_msm.create_model("ssam_tiny")
    with pytest.raises(ValueError, match=rf"positions='{positions}' applies to sequence='full' only"):
        HearModel(encoder, positions=positions)
    assert HearModel(encoder, sequence="full", positions=positions).positions == positions
