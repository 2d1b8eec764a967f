"""Front ends: waveforms at 16 kHz -> the normalised features an encoder reads, time first.

An encoder's config names its front end (`EncoderConfig.frontend`, a key of `FRONTENDS`) and its
bins (`num_mels`); `build_frontend(config)` makes it. "logmel" is the 80-mel log-mel of Yadav et
al.'s SSAST / SSAM / AxLSTM, exactly as the authors compute it (torchaudio MelSpectrogram);
"kaldi_fbank" the 128-bin Kaldi fbank of SSAMBA (torchaudio.compliance.kaldi), as its data loader computes it.
"""
from __future__ import annotations

import numpy as np
import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000
HOP_SAMPLES = 160  # 10 ms frames
LOG_OFFSET = 1.1920929e-07  # float32 machine epsilon, added before the log


def to_16k_mono(data: np.ndarray, rate: int) -> torch.Tensor:
    """[samples, channels] float at `rate` -> float32 [samples'] mono at 16 kHz."""
    import torchaudio.functional as AF

    audio = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1), dtype=np.float32))
    if rate != SAMPLE_RATE:
        audio = AF.resample(audio, rate, SAMPLE_RATE)
    return audio


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

    @staticmethod
    def padding_value() -> float:
        """What chunks are padded with (normalised space), as the authors' wrapper pads."""
        return 0.0

    @staticmethod
    def first_column_centre_ms(column_frames: int) -> float:
        """Timestamp of the first token column: the centre of the hops it spans (frames are centred
        on multiples of 10 ms): 20 ms for 4-frame columns."""
        return 1000.0 * column_frames * HOP_SAMPLES / SAMPLE_RATE / 2


WINDOW_SAMPLES = 400  # 25 ms Kaldi frames
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974  # SSAMBA's AudioSet + LibriSpeech fbank statistics


class KaldiFbankFrontend(nn.Module):
    """Waveforms [n, samples] at 16 kHz -> normalised Kaldi fbank [n, frames, num_mels] (SSAMBA).

    As SSAMBA's data loader: per clip the waveform mean is removed, then
    `torchaudio.compliance.kaldi.fbank` (htk_compat, hanning window, 10 ms shift, no dither, no
    energy term; 25 ms frames without centring, so frames = 1 + (samples - 400) // 160), then
    (fbank - mean) / (2 * std) with the dataset statistics. Float64 input is kept in float64.
    """

    def __init__(self, num_mels: int = 128, mean: float = FBANK_MEAN, std: float = FBANK_STD):
        super().__init__()
        self.num_mels, self.mean, self.std = num_mels, mean, std

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.ndim != 2 or audio.shape[1] < WINDOW_SAMPLES:
            raise ValueError(f"expected waveforms [clips, samples] with at least {WINDOW_SAMPLES} samples "
                             f"(25 ms at {SAMPLE_RATE} Hz), got shape {tuple(audio.shape)}")
        audio = audio.to(torch.promote_types(audio.dtype, torch.float32))
        return torch.stack([self.normalise(self._fbank(clip)) for clip in audio])

    def _fbank(self, clip: torch.Tensor) -> torch.Tensor:
        """[samples] -> log mel filterbank energies [frames, num_mels]."""
        waveform = (clip - clip.mean())[None]
        return torchaudio.compliance.kaldi.fbank(
            waveform, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False, window_type="hanning",
            num_mel_bins=self.num_mels, dither=0.0, frame_shift=1000 * HOP_SAMPLES / SAMPLE_RATE,
        )

    def normalise(self, fbank: torch.Tensor) -> torch.Tensor:
        return (fbank - self.mean) / (self.std * 2)

    def padding_value(self, dtype: torch.dtype = torch.float32) -> float:
        """The normalised value of an all-zero fbank frame: what SSAMBA's loader pads short clips with."""
        return self.normalise(torch.zeros(1, dtype=dtype)).item()

    @staticmethod
    def num_frames(num_samples: int) -> int:
        return 1 + (num_samples - WINDOW_SAMPLES) // HOP_SAMPLES if num_samples >= WINDOW_SAMPLES else 0

    @staticmethod
    def first_column_centre_ms(column_frames: int) -> float:
        """Timestamp of the first token column: the mean centre of its frames (frame i covers
        10 i .. 10 i + 25 ms, uncentred): 87.5 ms for 16-frame columns."""
        hop_ms = 1000.0 * HOP_SAMPLES / SAMPLE_RATE
        return hop_ms * (column_frames - 1) / 2 + 500.0 * WINDOW_SAMPLES / SAMPLE_RATE


FRONTENDS = {"logmel": LogMelFrontend, "kaldi_fbank": KaldiFbankFrontend}


def build_frontend(config) -> nn.Module:
    """The front end an encoder config names, with its number of bins."""
    if config.frontend not in FRONTENDS:
        raise ValueError(f"{config.arch}: front end {config.frontend!r} is unknown; known: {sorted(FRONTENDS)}")
    return FRONTENDS[config.frontend](config.num_mels)


def standardise_log_power(power: torch.Tensor) -> torch.Tensor:
    """Mel power [n, mels, frames] -> log, standardised per clip; constant clips -> zeros."""
    logmel = torch.log(power + LOG_OFFSET)
    mean = logmel.mean(dim=(1, 2), keepdim=True)
    std = logmel.std(dim=(1, 2), keepdim=True)
    features = (logmel - mean) / (std + 1e-8)
    constant = logmel.amax(dim=(1, 2)) == logmel.amin(dim=(1, 2))
    return features.masked_fill(constant[:, None, None], 0.0)
