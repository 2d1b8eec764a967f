"""Whole-model parity with the authors' code (fixtures made by running it; see fixtures/README.md).

Same random checkpoint (rebuilt from its seed), same audio. Each fixture holds the authors' wrapper
run in float32 and in float64; hear_msm's float32 results must be as close to the float64 run as
the authors' own float32 run is (tests/numerics.py), on whatever CPU this runs. The last test shows
that the bounds are tight enough to catch the mistakes a port can make, by orders of magnitude.
"""
import copy

import pytest
import torch
from conftest import FIXTURES
from numerics import FACTOR, assert_float64_anchored, max_abs_error
from random_checkpoint import random_official_state_dict
from safetensors.torch import load_file
from torch import nn

import hear_msm
from hear_msm._hear import HearModel

pytestmark = pytest.mark.numerics

ARCHS = ["ssast_tiny", "ssam_tiny", "axlstm_tiny"]
# Absolute allowance on embeddings (LayerNorm outputs, O(1)) for a machine where the authors'
# float32 run happens to be exact; every real mistake below moves them by > 1e-2.
EMBEDDING_FLOOR = 1e-5
# Mel bands whose float64 power is below this fraction of the clip's loudest band carry no signal:
# their log amplifies FFT rounding (the filters of the lowest bands catch almost no FFT bins).
SIGNAL_FLOOR = 1e-6


@pytest.fixture(scope="module")
def audio():
    return load_file(str(FIXTURES / "official_audio.safetensors"))["audio"]


def _fixture(arch):
    return load_file(str(FIXTURES / f"official_{arch}.safetensors"))


def _model(arch):
    model = hear_msm.create_model(arch)
    model.load_state_dict(random_official_state_dict(arch, seed=0), strict=True)
    return model.eval()


def _signal_bands(mel_power64: torch.Tensor) -> torch.Tensor:
    """[clips, mels, frames] -> bool mask of time-frequency bins that carry signal."""
    loudest = mel_power64.amax(dim=(1, 2), keepdim=True)
    return mel_power64 >= SIGNAL_FLOOR * loudest


def test_features_match_the_authors_where_they_carry_signal(audio):
    expected = _fixture("ssast_tiny")  # the features are the same for the three models
    frontend = HearModel(_model("ssast_tiny")).frontend
    signal = _signal_bands(expected["mel_power64"])
    print("bins carrying signal:", int(signal.sum()), "of", signal.numel())
    assert signal.float().mean() > 0.9  # the comparison covers nearly all of the spectrogram
    # power: relative error per bin, where the power is above the floor
    power = frontend.melspec(audio)
    assert_float64_anchored(
        "mel power, relative", power[signal] / expected["mel_power64"][signal],
        expected["mel_power"][signal] / expected["mel_power64"][signal],
        torch.ones(int(signal.sum()), dtype=torch.float64), floor=1e-6)
    # normalised log-mel (time first), on the same bins
    ours = frontend(audio).transpose(1, 2)[signal]
    theirs = expected["features"][:, 0].transpose(1, 2)[signal]
    assert_float64_anchored("log-mel features", ours, theirs, expected["features64"][:, 0].transpose(1, 2)[signal],
                            floor=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_official_layout_matches_authors_wrapper(arch, audio):
    expected = _fixture(arch)
    runtime = HearModel(_model(arch), layout="official")
    embeddings, timestamps = runtime.timestamp_embeddings(audio)
    scene = runtime.scene_embeddings(audio)
    assert_float64_anchored(f"{arch} timestamp embeddings", embeddings, expected["timestamp_embeddings"],
                            expected["timestamp_embeddings64"], floor=EMBEDDING_FLOOR)
    assert_float64_anchored(f"{arch} scene embeddings", scene, expected["scene"], expected["scene64"],
                            floor=EMBEDDING_FLOOR)
    # timestamps are arithmetic on the clip length: float32 rounding of ms values only
    assert max_abs_error(timestamps, expected["timestamps64"]) <= 1e-3


def _in_time_order(chunk_tokens: torch.Tensor) -> torch.Tensor:
    clips, chunks, _, dim = chunk_tokens.shape  # [clips, chunks, 250, D], time-major per chunk
    return chunk_tokens.reshape(clips, chunks * 50, 5 * dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_time_layout_holds_the_same_tokens_in_time_order(arch, audio):
    expected = _fixture(arch)
    runtime = HearModel(_model(arch), layout="time")
    embeddings, timestamps = runtime.timestamp_embeddings(audio)
    count = embeddings.shape[1]
    assert count == 63  # 2.5 s = 62.5 columns of 40 ms, rounded half up: last centre at 2500 ms
    assert_float64_anchored(f"{arch} time layout", embeddings, _in_time_order(expected["chunk_tokens"])[:, :count],
                            _in_time_order(expected["chunk_tokens64"])[:, :count], floor=EMBEDDING_FLOOR)
    assert torch.allclose(timestamps[0], 20.0 + 40.0 * torch.arange(count, dtype=torch.float32))


# ----------------------------------------------------------------------------- the bounds catch mistakes
class _DropFirstFrame(nn.Module):
    """A front end whose chunks start one 10 ms frame late (an off-by-one in chunking)."""

    def __init__(self, frontend):
        super().__init__()
        self.frontend = frontend

    def forward(self, audio):
        return self.frontend(audio)[:, 1:]

    def num_frames(self, num_samples):
        return self.frontend.num_frames(num_samples)  # the runtime still plans the correct chunks

    def padding_value(self):
        return self.frontend.padding_value()


class _Reversed(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        return self.mixer(x.flip(1)).flip(1)


def _mistakes(arch):
    """name -> function(runtime) that plants one mistake a port could make."""

    def wrong_token_layout(runtime):
        runtime.layout = "time"  # (t f) where the authors read (f t)

    def missing_block(runtime):
        del runtime.encoder.blocks[len(runtime.encoder.blocks) // 2]

    def chunking_off_by_one_frame(runtime):
        runtime.frontend = _DropFirstFrame(runtime.frontend)

    def swapped_scan_direction(runtime):
        for block in runtime.encoder.blocks:
            if arch.startswith("ssam"):
                block.mixer = _Reversed(block.mixer)
            else:
                block.reverse = not block.reverse

    mistakes = {"wrong token layout": wrong_token_layout, "missing block": missing_block,
                "chunking off by one frame": chunking_off_by_one_frame}
    if not arch.startswith("ssast"):  # attention reads both ways: no direction to swap
        mistakes["swapped scan direction"] = swapped_scan_direction
    return mistakes


@pytest.mark.parametrize("arch", ARCHS)
def test_the_bounds_catch_real_mistakes_by_orders_of_magnitude(arch, audio):
    expected = _fixture(arch)
    reference, theirs = expected["timestamp_embeddings64"], expected["timestamp_embeddings"]
    bound = FACTOR * max_abs_error(theirs, reference) + EMBEDDING_FLOOR  # as in the parity test above
    correct = HearModel(_model(arch), layout="official")
    for name, plant in _mistakes(arch).items():
        runtime = copy.deepcopy(correct)
        plant(runtime)
        embeddings, _ = runtime.timestamp_embeddings(audio)
        error = max_abs_error(embeddings, reference)
        print(f"{arch} {name}: error {error:.3g} = {error / bound:.0f} x the bound {bound:.3g}")
        assert error > 100 * bound, f"{arch}: '{name}' stays within 100x the parity bound"
