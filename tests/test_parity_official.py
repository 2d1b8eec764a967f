"""Whole-model parity with the authors' code (fixtures made by running it; see fixtures/README.md).

Same random checkpoint (rebuilt from its seed), same audio: the "official" layout must equal the
authors' wrapper within 1e-4; the default "time" layout must hold the same per-token encoder
outputs, in time order.
"""
import pytest
import torch
from conftest import FIXTURES
from random_checkpoint import random_official_state_dict
from safetensors.torch import load_file

import hear_msm
from hear_msm._hear import HearModel

ARCHS = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def audio():
    return load_file(str(FIXTURES / "official_audio.safetensors"))["audio"]


def _model(arch):
    model = hear_msm.create_model(arch)
    model.load_state_dict(random_official_state_dict(arch, seed=0), strict=True)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_official_layout_matches_authors_wrapper(arch, audio):
    expected = load_file(str(FIXTURES / f"official_{arch}.safetensors"))
    runtime = HearModel(_model(arch), layout="official")
    features = runtime.frontend(audio)
    feature_diff = (features - expected["features"][:, 0]).abs().max().item()
    embeddings, timestamps = runtime.timestamp_embeddings(audio)
    scene = runtime.scene_embeddings(audio)
    assert embeddings.shape == expected["timestamp_embeddings"].shape
    diffs = {
        "features": feature_diff,
        "timestamp": (embeddings - expected["timestamp_embeddings"]).abs().max().item(),
        "scene": (scene - expected["scene"]).abs().max().item(),
        "timestamps_ms": (timestamps - expected["timestamps"]).abs().max().item(),
    }
    print(arch, "max |diff|", diffs)
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


@pytest.mark.parametrize("arch", ARCHS)
def test_time_layout_holds_the_same_tokens_in_time_order(arch, audio):
    expected = load_file(str(FIXTURES / f"official_{arch}.safetensors"))
    chunk_tokens = expected["chunk_tokens"]  # [clips, chunks, 250, D], time-major per chunk
    runtime = HearModel(_model(arch), layout="time")
    embeddings, timestamps = runtime.timestamp_embeddings(audio)
    clips, chunks, _, dim = chunk_tokens.shape
    in_time_order = chunk_tokens.reshape(clips, chunks * 50, 5 * dim)
    count = embeddings.shape[1]
    assert count == 63  # 2.5 s = 62.5 columns of 40 ms, rounded half up: last centre at 2500 ms
    diff = (embeddings - in_time_order[:, :count]).abs().max().item()
    print(arch, "time layout vs official tokens max |diff|", diff)
    assert diff <= TOLERANCE
    assert torch.allclose(timestamps[0], 20.0 + 40.0 * torch.arange(count, dtype=torch.float32))
