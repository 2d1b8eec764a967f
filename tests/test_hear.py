"""HEAR runtime invariants on the three tiny architectures (random weights are enough here)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TESTS_DIR

import hear_msm
import hear_msm._weights
from hear_msm._hear import HearModel, get_scene_embeddings, get_timestamp_embeddings

ARCHS = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]
SR = 16000


@pytest.fixture(scope="module", params=ARCHS)
def runtime(request):
    torch.manual_seed(0)
    return HearModel(hear_msm.create_model(request.param))


def _audio(n, seconds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(round(seconds * SR))) / SR
    tone = torch.sin(2 * torch.pi * (220 + 110 * torch.arange(n))[:, None] * t)
    return (0.3 * tone + 0.05 * torch.randn(n, t.numel(), generator=gen)).float()


def test_attributes(runtime):
    assert runtime.sample_rate == 16000
    assert isinstance(runtime.scene_embedding_size, int) and runtime.scene_embedding_size == 5 * 192
    assert isinstance(runtime.timestamp_embedding_size, int) and runtime.timestamp_embedding_size == 960


@pytest.mark.parametrize("seconds", [1.07, 1.98, 2.74, 4.0])
def test_shapes_timestamps_and_scene_is_mean(runtime, seconds):
    audio = _audio(2, seconds)
    embeddings, timestamps = get_timestamp_embeddings(audio, runtime)
    scene = get_scene_embeddings(audio, runtime)
    count = int((audio.shape[1] + 320) // 640)
    assert embeddings.shape == (2, count, 960) and embeddings.dtype == torch.float32
    assert timestamps.shape == (2, count) and timestamps.dtype == torch.float32
    steps = timestamps[0].diff()
    assert torch.allclose(steps, torch.full_like(steps, 40.0))
    assert timestamps[0, 0] == 20.0 and timestamps[0, -1] <= 1000 * seconds
    assert scene.shape == (2, 960) and scene.dtype == torch.float32
    assert torch.allclose(scene, embeddings.mean(dim=1), atol=1e-5)
    assert torch.isfinite(embeddings).all()


def test_repeatable(runtime):
    audio = _audio(2, 2.74)
    first, _ = runtime.timestamp_embeddings(audio)
    second, _ = runtime.timestamp_embeddings(audio.clone())
    assert torch.equal(first, second)


def test_clip_does_not_depend_on_its_batch(runtime):
    audio = _audio(3, 3.3)
    together, _ = runtime.timestamp_embeddings(audio)
    alone, _ = runtime.timestamp_embeddings(audio[1:2])
    assert (together[1] - alone[0]).abs().max().item() <= 1e-5
    assert (runtime.scene_embeddings(audio)[1] - runtime.scene_embeddings(audio[1:2])[0]).abs().max() <= 1e-5


def test_batched_chunks_equal_chunk_at_a_time(runtime):
    audio = _audio(2, 5.1)
    batched, _ = runtime.timestamp_embeddings(audio)
    one_by_one = HearModel(runtime.encoder, max_batch_chunks=1)
    single, _ = one_by_one.timestamp_embeddings(audio)
    assert (batched - single).abs().max().item() <= 1e-5


def test_exact_multiple_of_two_seconds_gets_no_padded_chunk(runtime, monkeypatch):
    seen = []
    forward = runtime.encoder.forward_features
    monkeypatch.setattr(runtime.encoder, "forward_features", lambda x: seen.append(x.shape[0]) or forward(x))
    embeddings, timestamps = runtime.timestamp_embeddings(_audio(1, 4.0))
    assert sum(seen) == 2 and embeddings.shape[1] == 100
    assert timestamps[0, -1] == 3980.0


def test_long_clip_65_seconds_is_bounded_by_max_batch_chunks(runtime, monkeypatch):
    seen = []
    forward = runtime.encoder.forward_features
    monkeypatch.setattr(runtime.encoder, "forward_features", lambda x: seen.append(x.shape[0]) or forward(x))
    small = HearModel(runtime.encoder, max_batch_chunks=8)
    embeddings, timestamps = small.timestamp_embeddings(_audio(1, 65.0))
    assert embeddings.shape == (1, 1625, 960)
    assert max(seen) <= 8 and sum(seen) == 33
    assert timestamps[0, -1] <= 65000.0
    seen.clear()
    scene = small.scene_embeddings(_audio(1, 65.0))
    assert torch.allclose(scene, embeddings.mean(1), atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(16000), "2-D.*unsqueeze"),
        (torch.zeros(1, 1, 16000), "2-D"),
        (torch.zeros(1, 16000, dtype=torch.int16), "floating point.*32768"),
        (torch.zeros(2, 0), "zero samples"),
        (torch.zeros(1, 600), "at least 640"),
        (torch.tensor([[0.0] * 1000 + [float("nan")]]), r"NaN or Inf.*\[0\]"),
        (torch.tensor([[0.0] * 1000, [0.0] * 999 + [float("inf")]]), r"NaN or Inf.*\[1\]"),
        ([[0.0] * 1000], "torch.Tensor"),
    ],
)
def test_bad_audio_is_a_clear_error(bad, message):
    runtime = HearModel(hear_msm.create_model("ssast_tiny"))
    with pytest.raises(ValueError, match=message):
        get_timestamp_embeddings(bad, runtime)
    with pytest.raises(ValueError, match=message):
        get_scene_embeddings(bad, runtime)


def test_numpy_and_float64_are_accepted():
    runtime = HearModel(hear_msm.create_model("ssast_tiny"))
    audio = _audio(1, 1.0)
    expected = runtime.scene_embeddings(audio)
    assert torch.allclose(runtime.scene_embeddings(audio.double().numpy()), expected, atol=1e-6)


def test_wrong_model_object():
    with pytest.raises(ValueError, match="load_model"):
        get_scene_embeddings(_audio(1, 1.0), hear_msm.create_model("ssast_tiny"))


def test_bad_options():
    with pytest.raises(ValueError, match="layout"):
        HearModel(hear_msm.create_model("ssast_tiny"), layout="freq")
    with pytest.raises(ValueError, match="max_batch_chunks"):
        HearModel(hear_msm.create_model("ssast_tiny"), max_batch_chunks=0)


class TestOfficialLayoutChunking:
    """The authors' wrapper arithmetic (NOTES §3): always a padded tail chunk, even spacing."""

    runtime = HearModel(hear_msm.create_model("ssast_tiny"), layout="official")

    def test_four_seconds_is_three_chunks_and_101_embeddings(self):
        assert self.runtime.plan(64000) == (3, 101)

    def test_timestamps_spread_over_the_clip(self):
        timestamps = self.runtime.timestamps(2, 17120)  # 1.07 s
        assert timestamps.shape == (2, 27) and timestamps[0, 0] == 0.0
        assert abs(timestamps[0, 1].item() - 39.63) < 0.01

    def test_embeddings_are_not_in_time_order(self):
        audio = _audio(1, 2.0)
        official, _ = self.runtime.timestamp_embeddings(audio)
        ordered, _ = HearModel(self.runtime.encoder).timestamp_embeddings(audio)
        # official frame 0 = band 0 of time steps 0, 10, 20, 30, 40 (sequence read as (f t))
        assert not torch.allclose(official[0, 0], ordered[0, 0])
        tokens = ordered[0, :50].reshape(250, 192)  # time-major: index t * 5 + f
        assert torch.allclose(official[0, 0], tokens[[0, 50, 100, 150, 200]].reshape(-1), atol=1e-6)


def test_cli_embeds_real_audio_files(tmp_path):
    weights = tmp_path / "weights"
    hear_msm._weights.save_pretrained(hear_msm.create_model("axlstm_tiny"), weights)
    examples = TESTS_DIR.parent / "examples"
    files = [str(examples / "ambi_piano.flac"), str(examples / "guit_em9.flac")]
    out = tmp_path / "emb.npz"
    cli = [sys.executable, "-m", "hear_msm.cli", "embed", *files, "--model", "axlstm_tiny",
           "--weights", str(weights), "--out", str(out)]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resampled 44100 Hz -> 16000 Hz" in done.stderr and "mixed 2 channels to mono" in done.stderr
    result = np.load(out)
    assert result["scene_embeddings"].shape == (2, 960)
    assert result["timestamp_embeddings_0001"].shape == (249, 960)  # 9.97 s at 40 ms
    assert np.allclose(result["timestamp_embeddings_0001"].mean(0), result["scene_embeddings"][1], atol=1e-5)
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = subprocess.run(cli[:4] + ["nope.wav"] + cli[5:] + ["--overwrite"], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.wav" in missing.stderr


# ----------------------------------------------------------------------------- SSAMBA windows
def _ssamba_runtime():
    torch.manual_seed(0)
    return HearModel(hear_msm.create_model("ssamba_tiny").eval())


def test_ssamba_columns_are_160_ms_with_frame_centred_timestamps():
    runtime = _ssamba_runtime()
    assert (runtime.hop_ms, runtime.timestamp_embedding_size, runtime.chunk_frames) == (160.0, 8 * 192, 1024)
    for samples in (2560, 17120, 64000):
        embeddings, timestamps = runtime.timestamp_embeddings(0.1 * torch.randn(1, samples))
        count = (samples - 1400) // 2560 + 1  # every column whose centre lies inside the clip
        assert embeddings.shape == (1, count, 1536)
        expected = 87.5 + 160.0 * torch.arange(count, dtype=torch.float32)
        assert torch.equal(timestamps[0], expected) and timestamps[0, -1] <= 1000 * samples / 16000


def test_ssamba_short_clip_sees_no_padding_and_long_clips_use_whole_windows():
    """A clip of whole columns is encoded from its own frames only (the padding value cannot
    matter), and an 11 s clip is one 1024-frame window plus a shorter tail window."""
    runtime = _ssamba_runtime()
    samples = 400 + 111 * 160  # exactly 112 fbank frames = 7 columns
    audio = 0.1 * torch.randn(2, samples)
    embeddings, _ = runtime.timestamp_embeddings(audio)
    features = runtime.frontend(audio)
    assert features.shape[1] == 112
    with torch.no_grad():
        direct = runtime.encoder.forward_features(features[:, None]).reshape(2, 7, -1)
    assert (embeddings - direct).abs().max().item() < 1e-5
    runtime.frontend.padding_value = lambda: 100.0  # would wreck any padded frame it reached
    again, _ = runtime.timestamp_embeddings(audio)
    assert torch.equal(again, embeddings)
    long = 0.1 * torch.randn(1, 11 * 16000)
    embeddings, timestamps = runtime.timestamp_embeddings(long)
    assert embeddings.shape[1] == 69 and timestamps[0, -1] < 11000  # 64 columns + 5 of the tail window
    features = runtime.frontend(long)
    with torch.no_grad():
        first = runtime.encoder.forward_features(features[:, None, :1024]).reshape(1, 64, -1)
    assert (embeddings[:, :64] - first).abs().max().item() < 1e-5


def test_ssamba_refuses_what_it_cannot_do():
    model = hear_msm.create_model("ssamba_tiny")
    with pytest.raises(ValueError, match="official"):
        HearModel(model, layout="official")
    with pytest.raises(ValueError, match="cannot encode a whole clip"):
        HearModel(hear_msm.create_model("ssast_tiny"), sequence="full")


def test_ssamba_full_sequence_positions_beyond_the_table():
    """sequence='full' encodes a whole clip as one sequence; up to 64 columns it is the windowed
    encoding itself, beyond them the position table is interpolated (default) or tiled."""
    torch.manual_seed(0)
    model = hear_msm.create_model("ssamba_tiny").eval()
    short = 0.1 * torch.randn(1, 400 + 111 * 160, generator=torch.Generator().manual_seed(1))  # 7 columns
    chunked, _ = HearModel(model).timestamp_embeddings(short)
    full, _ = HearModel(model, sequence="full").timestamp_embeddings(short)
    assert (full - chunked).abs().max().item() < 1e-5
    v = model.v
    table = v.pos_embed[0, 1:].view(8, 64, -1)
    tiled = v.positions(130, "tile")[0, 1:].view(8, 130, -1)
    assert torch.equal(tiled[:, 64:128], table) and torch.equal(tiled[:, 128:], table[:, :2])
    stretched = v.positions(128, "interpolate")[0, 1:].view(8, 128, -1)
    assert torch.allclose(stretched[:, 0], table[:, 0]) and torch.allclose(stretched[:, -1], table[:, -1])
    # linear, cell-centred (align_corners=False): column 2k + 1 of 128 sits at k + 0.25 of the 64
    assert torch.allclose(stretched[:, 1::2][:, :-1], 0.75 * table[:, :-1] + 0.25 * table[:, 1:], atol=1e-6)
    clip = 0.1 * torch.randn(1, 20 * 16000, generator=torch.Generator().manual_seed(2))
    runs = {p: HearModel(model, sequence="full", positions=p).timestamp_embeddings(clip)[0] for p in ("auto", "tile")}
    assert runs["auto"].shape == runs["tile"].shape == (1, 125, 1536)
    assert (runs["auto"] - runs["tile"]).abs().max().item() > 1e-3  # the policy matters beyond 10.24 s
    with pytest.raises(ValueError, match="interpolate"):
        HearModel(model, sequence="full", positions="extend").timestamp_embeddings(clip)
    with pytest.raises(ValueError, match="learned tables"):
        hear_msm.create_model("ssam_tiny").position_rows(0, 10, "interpolate")
