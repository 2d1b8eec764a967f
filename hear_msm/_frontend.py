"""Front ends: waveforms at 16 kHz -> the normalised features an encoder reads, time first.

An encoder's config names its front end (`EncoderConfig.frontend`, a key of `FRONTENDS`) and its
bins (`num_mels`); `build_frontend(config)` makes it. "logmel" is the 80-mel log-mel of Yadav et
al.'s SSAST / SSAM / AxLSTM, exactly as the authors compute it (torchaudio MelSpectrogram).
"""
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
    """

    def __init__(self, num_mels: int = 80):
        super().__init__()
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, win_length=400, hop_length=HOP_SAMPLES,
            f_min=50.0, f_max=8000.0, n_mels=num_mels, power=2.0,
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        logmel = torch.log(self.melspec(audio.float()) + LOG_OFFSET)  # [n, mels, frames]
        mean = logmel.mean(dim=(1, 2), keepdim=True)
        std = logmel.std(dim=(1, 2), keepdim=True)
        return ((logmel - mean) / (std + 1e-8)).transpose(1, 2)

    @staticmethod
    def num_frames(num_samples: int) -> int:
        return num_samples // HOP_SAMPLES + 1


FRONTENDS = {"logmel": LogMelFrontend}


def build_frontend(config) -> nn.Module:
    """The front end an encoder config names, with its number of bins."""
    if config.frontend not in FRONTENDS:
        raise ValueError(f"{config.arch}: front end {config.frontend!r} is unknown; known: {sorted(FRONTENDS)}")
    return FRONTENDS[config.frontend](config.num_mels)
