"""Log-mel features exactly as the authors compute them (torchaudio MelSpectrogram)."""
from __future__ import annotations

import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000
HOP_SAMPLES = 160  # 10 ms frames
LOG_OFFSET = 1.1920929e-07  # float32 machine epsilon, added before the log


class LogMelFrontend(nn.Module):
    """Waveforms [n, samples] at 16 kHz -> per-clip normalised log-mel [n, frames, 80].

    frames = samples // 160 + 1 (centred STFT, 25 ms window, 10 ms hop, 50-8000 Hz, power 2).
    Each clip is standardised over all its frames and mel bins (unbiased std), then
    transposed to time-first as the encoders expect.

    Every finite float32 amplitude gives finite features:
      - the mel power is computed in float32, as the authors do; a clip whose power overflows
        float32 (peaks above about 1e16) is recomputed in float64, which cannot overflow for
        float32 audio. Where the log offset is negligible against the power (any audible clip),
        log-mels of a clip scaled by s only shift by 2 log s, which the standardisation removes:
        a loud clip gets the features of the same clip at a normal level.
      - a clip whose log-mel is constant (digital silence, or audio so quiet that its power
        rounds to zero, peaks below about 1e-19) gets all-zero features. Its std is 0, and
        (x - mean) / (std + 1e-8) would be the float rounding of the mean divided by 1e-8: a
        constant of about +-100 to +-300 that depends on the clip length and the CPU.
    """

    def __init__(self, num_mels: int = 80):
        super().__init__()
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, win_length=400, hop_length=HOP_SAMPLES,
            f_min=50.0, f_max=8000.0, n_mels=num_mels, power=2.0,
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        audio = audio.float()
        power = self.melspec(audio)  # [n, mels, frames]
        features = standardise_log_power(power)
        overflowed = ~torch.isfinite(power).flatten(1).all(dim=1)
        if overflowed.any():
            features[overflowed] = standardise_log_power(self.power_float64(audio[overflowed])).to(features.dtype)
        return features.transpose(1, 2)

    def power_float64(self, audio: torch.Tensor) -> torch.Tensor:
        """The mel power [n, mels, frames] in float64 (same module, its window and filterbank in float64)."""
        buffers = {name: buffer.double() for name, buffer in self.melspec.named_buffers()}
        return torch.func.functional_call(self.melspec, buffers, (audio.double(),))

    @staticmethod
    def num_frames(num_samples: int) -> int:
        return num_samples // HOP_SAMPLES + 1


def standardise_log_power(power: torch.Tensor) -> torch.Tensor:
    """Mel power [n, mels, frames] -> log, standardised per clip; constant clips -> zeros."""
    logmel = torch.log(power + LOG_OFFSET)
    mean = logmel.mean(dim=(1, 2), keepdim=True)
    std = logmel.std(dim=(1, 2), keepdim=True)
    features = (logmel - mean) / (std + 1e-8)
    constant = logmel.amax(dim=(1, 2)) == logmel.amin(dim=(1, 2))
    return features.masked_fill(constant[:, None, None], 0.0)
