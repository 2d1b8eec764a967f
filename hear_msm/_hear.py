"""HEAR runtime: clips of any length -> timestamp embeddings (one per token column) and scene embeddings.

A chunk is one encoder input window: `config.num_frames` feature frames (2 s of log-mel for
SSAST / SSAM / AxLSTM, 10.24 s of Kaldi fbank for SSAMBA). A clip's features (the front end the
config names) are cut into chunks; every chunk of every clip goes through the encoder in batches
of at most `max_batch_chunks`; each chunk yields `grid_time` token columns whose `grid_freq`
frequency tokens are concatenated into one grid_freq * D embedding per column (40 ms for the
80-mel families, 160 ms for SSAMBA). The last chunk is padded with the front end's padding value:
to a whole chunk for encoders trained on fixed windows (as the authors' wrappers do), or only to
a whole column for encoders that take shorter inputs (SSAMBA: the padding never reaches the
positions or tokens of the audio before it).

Layouts:
  "time"      (default) column j holds the frequency tokens of time step j, in time order, one
              embedding per column; timestamps at column centres (`first_column_centre_ms` of the
              front end + hop * j: 20 + 40 j ms for log-mel, 87.5 + 160 j ms for Kaldi fbank); a
              last column whose centre lies past the end of the clip is dropped.
  "official"  reproduces the authors' HEAR wrapper of the family (`OfficialWrapper`, declared by
              the encoder class; SSAST / SSAM / AxLSTM by default): their chunking (always a padded
              tail chunk, padded with zeros or reflected), evenly spread timestamps from 0, and their
              frame layout. The SSAST / SSAM / AxLSTM wrapper reads the time-major tokens as
              frequency-major ('b (f t) d -> b t (f d)'): each output frame then mixes 5 time steps
              of one band, so time order is scrambled; MW-MAE's wrapper keeps time order but
              reflect-pads. Use it only to reproduce the published numbers. (Two kinds of clip
              differ from their code, in both layouts: digitally silent clips, which get zero
              features instead of a float-rounding artefact, and clips loud enough to overflow
              float32, which get finite features instead of NaN; see `LogMelFrontend`.)

Sequence modes (recurrent encoders, SSAM and AxLSTM, with the "time" layout):
  "chunked"   (default) every 2 s chunk is encoded on its own, as in pretraining and the authors'
              wrapper.
  "full"      the whole clip is ONE token sequence (CLS first, then 5 tokens per 40 ms), so every
              token sees all the audio before it (SSAM) or all of it (AxLSTM). It runs layer by
              layer over segments of `segment_tokens` tokens, carrying each block's recurrent
              state (conv inputs + SSM state; conv inputs + mLSTM memory, the reversed blocks
              walking the segments back to front): time and memory grow linearly with the clip,
              and peak memory is two [tokens, D] activations plus one segment's intermediates
              (about 1.2 GB for an hour with a tiny model).
              Positions: the checkpoints store a 2-D sin-cos table for 50 time steps. When it
              equals the analytic formula (`sincos_2d_position_table`, true for every checkpoint
              trained by hear_msm or the authors' code, where it is computed, never learned) the
              table is computed for any number of time steps, so positions keep the meaning
              they had in training (t * 40 ms); otherwise (or with positions="tile") the stored
              50 columns repeat every 2 s, which is what chunked mode sees. The encoder owns this
              (`SpectrogramEncoder.forward_sequence`, `position_rows`); the runtime only cuts clips.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .models.encoder import POSITION_MODES, SpectrogramEncoder
from ._frontend import HOP_SAMPLES, SAMPLE_RATE, build_frontend

LAYOUTS = ("time", "official")


@dataclass(frozen=True)
class OfficialWrapper:
    """How the authors' HEAR wrapper of a family pads and lays out chunks (layout="official").

    padding: "zeros" (constant, in normalised feature space) or "reflect" (numpy's reflection,
        repeated when the padding is longer than the clip);
    columns: "scrambled" (tokens read as frequency-major) or "time" (time order)."""

    padding: str = "zeros"
    columns: str = "scrambled"

    def __post_init__(self):
        if self.padding not in ("zeros", "reflect") or self.columns not in ("scrambled", "time"):
            raise ValueError(f"unknown official wrapper {self}")


def reflect_pad(features: torch.Tensor, length: int) -> torch.Tensor:
    """[n, frames, bins] -> [n, length, bins] extended by numpy-style reflection (jnp.pad "reflect",
    which reflects again when the padding is longer than the clip, unlike torch's reflect pad)."""
    frames = features.shape[1]
    if frames == 1:
        return features.expand(-1, length, -1)
    period = 2 * (frames - 1)
    position = torch.arange(length, device=features.device) % period
    return features[:, torch.where(position < frames, position, period - position)]
SEQUENCES = ("chunked", "full")
DEVICE_TYPES = ("cpu", "cuda", "mps")
COMPUTE_DTYPES = (torch.float32, torch.float64)


class HearModel(nn.Module):
    """A hear_msm encoder with the attributes and methods the HEAR API expects."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: SpectrogramEncoder, layout: str = "time", max_batch_chunks: int | None = None,
                 weights: str = "", sequence: str = "chunked", segment_tokens: int = 8192,
                 positions: str = "auto"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if sequence not in SEQUENCES:
            raise ValueError(f"sequence must be one of {SEQUENCES}, got {sequence!r}")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if layout == "official" and encoder.config.frontend != "logmel":
            raise ValueError(f"layout='official' reproduces the HEAR wrapper of the 80-mel families; "
                             f"{encoder.config.arch} has none, use layout='time'")
        if sequence == "full":
            if layout != "time":
                raise ValueError("sequence='full' needs layout='time' (the official layout is defined per 2 s chunk)")
            if not getattr(encoder, "supports_full_sequence", False):
                raise ValueError(
                    f"sequence='full' is for the recurrent encoders (ssam_*, axlstm_*, ssamba_*); "
                    f"{encoder.config.arch} cannot encode a whole clip as one sequence, use sequence='chunked'"
                )
        elif positions != "auto":
            raise ValueError(f"positions={positions!r} applies to sequence='full' only; with sequence='chunked' "
                             "every 2 s chunk uses the checkpoint's own 50-column table (leave positions='auto')")
        _check_positive_int("segment_tokens", segment_tokens)
        if max_batch_chunks is not None:
            _check_positive_int("max_batch_chunks", max_batch_chunks, "or None (the default for the device)")
        self.encoder = encoder.eval()
        self.frontend = build_frontend(encoder.config)
        self.layout = layout
        self._max_batch_chunks = None if max_batch_chunks is None else int(max_batch_chunks)
        self.sequence = sequence
        self.segment_tokens = int(segment_tokens)
        self.positions = positions
        self.weights = weights  # where the weights came from, for provenance
        cfg = encoder.config
        self.scene_embedding_size = int(cfg.frame_embedding_size)
        self.timestamp_embedding_size = int(cfg.frame_embedding_size)
        self.chunk_frames = cfg.num_frames
        self.column_frames = cfg.patch_frames
        self.columns_per_chunk = cfg.grid_time
        # frames the last chunk is padded to a multiple of: a whole chunk, or one column
        self.pad_multiple = self.column_frames if getattr(encoder, "takes_shorter_inputs", False) else self.chunk_frames
        self.column_samples = self.column_frames * HOP_SAMPLES  # 640 (40 ms) or 2560 (160 ms)
        self.hop_ms = 1000.0 * self.column_samples / SAMPLE_RATE
        self.first_centre_ms = self.frontend.first_column_centre_ms(self.column_frames)
        # the family's own wrapper, declared on its encoder class as a dict of OfficialWrapper fields
        self.official_wrapper = OfficialWrapper(**getattr(encoder, "official_wrapper", {}))

    @property
    def max_batch_chunks(self) -> int:
        """Chunks per encoder call. Default (None): 32 on GPU; on CPU 4 per thread for the tiny models,
        halved for each doubling of the width (small, base) or of the tokens per chunk, at least 1 and
        at most 32 in all. A rule, not a per-machine measurement: it must never be slower than one
        chunk per call, and 4 per thread is the count that held on the Intel and AMD CPUs measured,
        where 8 or 16 lose on some (benchmarks/README.md, notes 6, 13 and 16). More threads need
        bigger batches to share out. Batching changes results only by float rounding (tests)."""
        if self._max_batch_chunks is not None:
            return self._max_batch_chunks
        if next(self.encoder.parameters()).is_cuda:
            return 32
        config = self.encoder.config
        # the tiny model's 2 s chunk (251 tokens of width 192) is the unit
        per_thread = max(1, 4 * 192 // config.embed_dim * 251 // (1 + config.num_patches))
        return min(32, per_thread * max(1, torch.get_num_threads()))

    @property
    def arch(self) -> str:
        return self.encoder.config.arch

    @property
    def precision(self) -> str:
        """"fp32" or "bf16" (`hear_msm._precision.set_precision` on the encoder)."""
        from ._precision import model_precision

        return model_precision(self.encoder)

    # ----------------------------------------------------------------------------- geometry
    def plan(self, num_samples: int) -> tuple[int, int]:
        """(chunks, embeddings) per clip of `num_samples` samples for this layout."""
        if self.layout == "official":
            frames = self.frontend.num_frames(num_samples)
            padding = self.chunk_frames - frames % self.chunk_frames  # 1..200: always pads
            chunks = (frames + padding) // self.chunk_frames
            trimmed = int(self.columns_per_chunk * padding / self.chunk_frames)
            return chunks, chunks * self.columns_per_chunk - trimmed
        # one column per hop, every timestamp inside the clip (for log-mel: rounding to 40 ms)
        first_centre = round(self.first_centre_ms * SAMPLE_RATE / 1000)
        columns = max(0, (num_samples - first_centre) // self.column_samples + 1)
        if self.sequence == "full":
            return 1, columns
        return math.ceil(columns / self.columns_per_chunk), columns

    def timestamps(self, num_clips: int, num_samples: int) -> torch.Tensor:
        """Centre of each embedding's audio in ms, [num_clips, embeddings], float32."""
        _, count = self.plan(num_samples)
        if self.layout == "official":
            # the authors spread the embeddings evenly over the clip, starting at 0
            step = num_samples / SAMPLE_RATE / count * 1000.0
            times = step * torch.arange(count, dtype=torch.float64)
        else:
            times = self.first_centre_ms + self.hop_ms * torch.arange(count, dtype=torch.float64)
        return times.float().expand(num_clips, count).contiguous()

    # ----------------------------------------------------------------------------- encoding
    def _chunk_embeddings(self, audio: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (clip_index [k], chunk_embeddings [k, 50, 5*D]) over all chunks in batches
        (full-sequence mode: one item per clip group, [k, columns, 5*D])."""
        if self.sequence == "full":
            yield from self._full_embeddings(audio)
            return
        num_clips, num_samples = audio.shape
        chunks, columns = self.plan(num_samples)
        wrapper = self.official_wrapper
        if self.layout == "official":
            region = chunks * self.chunk_frames
        else:  # whole columns, padded up to the multiple the encoder needs
            region = math.ceil(columns * self.column_frames / self.pad_multiple) * self.pad_multiple
        full_chunks, tail_frames = divmod(region, self.chunk_frames)
        device = next(self.encoder.parameters()).device
        clips_per_call = max(1, self.max_batch_chunks // chunks)
        for clip_start in range(0, num_clips, clips_per_call):
            clips = audio[clip_start:clip_start + clips_per_call].to(device)
            features = self.frontend.to(device)(clips)  # [c, frames, bins]
            if features.shape[1] < region and self.layout == "official" and wrapper.padding == "reflect":
                features = reflect_pad(features, region)
            elif features.shape[1] < region:
                padding = (0, 0, 0, region - features.shape[1])
                features = torch.nn.functional.pad(features, padding, value=self.frontend.padding_value())
            # frames past the last column (e.g. a lone frame at an exact multiple of 40 ms) are dropped
            features = features[:, :region]
            index = torch.arange(clip_start, clip_start + clips.shape[0])
            whole = features[:, :full_chunks * self.chunk_frames].reshape(-1, 1, self.chunk_frames, features.shape[-1])
            yield from self._encode(whole, index.repeat_interleave(full_chunks))
            if tail_frames:  # a shorter last chunk (encoders that take shorter inputs)
                yield from self._encode(features[:, None, full_chunks * self.chunk_frames:], index)

    def _encode(self, chunk_batch: torch.Tensor, clip_index: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """chunks [k, 1, frames, bins] -> (clip_index, column embeddings) in calls of max_batch_chunks."""
        for start in range(0, chunk_batch.shape[0], self.max_batch_chunks):
            tokens = self.encoder.forward_features(chunk_batch[start:start + self.max_batch_chunks])  # [k, N, D]
            yield clip_index[start:start + self.max_batch_chunks], self._columns(tokens)

    def _full_embeddings(self, audio: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Whole clips as one sequence each; clips grouped while their tokens fit the chunk budget."""
        num_clips, num_samples = audio.shape
        _, columns = self.plan(num_samples)
        grid_freq = self.encoder.config.grid_freq
        group = max(1, self.max_batch_chunks * self.encoder.config.num_patches // (columns * grid_freq))
        device = next(self.encoder.parameters()).device
        for clip_start in range(0, num_clips, group):
            clips = audio[clip_start:clip_start + group].to(device)
            features = self.frontend.to(device)(clips)  # [c, frames, mels]
            region = columns * self.column_frames
            if features.shape[1] < region:
                padding = (0, 0, 0, region - features.shape[1])
                features = torch.nn.functional.pad(features, padding, value=self.frontend.padding_value())
            tokens = self.encoder.forward_sequence(features[:, None, :region], self.segment_tokens,
                                                   self.positions)  # [c, columns * 5, D]
            yield torch.arange(clip_start, clip_start + clips.shape[0]), tokens.reshape(clips.shape[0], columns, -1)

    def _columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [k, T*F, D] (time-major) -> frame embeddings [k, T, F*D]."""
        k, _, dim = tokens.shape
        f = self.encoder.config.grid_freq
        t = tokens.shape[1] // f
        if self.layout == "official" and self.official_wrapper.columns == "scrambled":
            return tokens.reshape(k, f, t, dim).transpose(1, 2).reshape(k, t, f * dim)
        return tokens.reshape(k, t, f * dim)

    def _check_dtype(self) -> None:
        """The runtime computes in the dtype of the model's tensors: float32 (or float64) only."""
        dtypes = {t.dtype for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()}
        if len(dtypes) > 1 or not dtypes <= set(COMPUTE_DTYPES):
            found = ", ".join(sorted(str(d) for d in dtypes))
            raise ValueError(
                f"HEAR embeddings are computed in float32 (or float64); this model holds {found} tensors "
                "(after model.half() or .to(dtype)?): call model.float() before embedding"
            )

    def _require_finite(self, embeddings: torch.Tensor, what: str) -> torch.Tensor:
        """Last guard: finite audio must never come back as a non-finite embedding."""
        finite = torch.isfinite(embeddings).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"the encoder returned non-finite {what} for clip(s) {bad[:10]} although the audio is finite: "
                f"the weights ({self.weights or 'this model'}) hold NaN/Inf or overflow; they cannot be used"
            )
        return embeddings

    @torch.no_grad()
    def timestamp_embeddings(self, audio) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [n, samples] float at 16 kHz -> (embeddings [n, T, 5*D], timestamps [n, T] ms).

        Raises ValueError for invalid audio (see `validate_audio`), a model not in float32/float64,
        or weights that turn finite audio into non-finite embeddings.
        """
        audio = validate_audio(audio, self.column_samples)
        self._check_dtype()
        num_clips, num_samples = audio.shape
        _, count = self.plan(num_samples)
        pieces: list[list[torch.Tensor]] = [[] for _ in range(num_clips)]
        for clip_index, frames in self._chunk_embeddings(audio):
            for i, clip_frames in zip(clip_index.tolist(), frames):
                pieces[i].append(clip_frames)
        if num_clips:
            embeddings = torch.stack([torch.cat(p)[:count] for p in pieces]).float()
        else:
            embeddings = torch.zeros(0, count, self.timestamp_embedding_size)
        self._require_finite(embeddings, "timestamp embeddings")
        return embeddings, self.timestamps(num_clips, num_samples).to(embeddings.device)

    @torch.no_grad()
    def scene_embeddings(self, audio) -> torch.Tensor:
        """audio [n, samples] float at 16 kHz -> mean of the timestamp embeddings [n, 5*D].

        Accumulated chunk by chunk, so hour-long clips never hold all frame embeddings at once.
        Raises ValueError as `timestamp_embeddings` does.
        """
        audio = validate_audio(audio, self.column_samples)
        self._check_dtype()
        num_clips, num_samples = audio.shape
        _, count = self.plan(num_samples)
        sums = torch.zeros(num_clips, self.scene_embedding_size, dtype=torch.float64)
        seen = [0] * num_clips
        for clip_index, frames in self._chunk_embeddings(audio):
            for i, clip_frames in zip(clip_index.tolist(), frames):
                kept = clip_frames[: max(0, count - seen[i])]
                sums[i] += kept.double().sum(0).cpu()
                seen[i] += clip_frames.shape[0]
        device = next(self.encoder.parameters()).device
        return self._require_finite((sums / count).float(), "scene embeddings").to(device)


def _check_positive_int(name: str, value, alternative: str = "") -> None:
    """A positive int (numpy ints too); floats, numeric strings and bools are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' ' + alternative if alternative else ''}, "
                         f"got {value!r} ({type(value).__name__})")


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine; ValueError naming what is accepted."""
    accepted = "'cpu', 'cuda', 'cuda:<index>' or 'mps'"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be {accepted}, got {device!r}") from None
    if resolved.type not in DEVICE_TYPES:
        raise ValueError(f"device must be {accepted}, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                             "use device 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple MPS is not available here; use device 'cpu'")
    return resolved


def validate_audio(audio, min_samples: int) -> torch.Tensor:
    """Check HEAR input and return it as a float32 tensor [n, samples]; ValueError otherwise.

    Accepted: finite values within the float32 range (|x| <= 3.4e38); nominally [-1, 1], but the
    features are standardised per clip, so the level does not matter (see `LogMelFrontend`).
    """
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(audio)
    if not isinstance(audio, torch.Tensor):
        raise ValueError(f"audio must be a torch.Tensor [n_clips, n_samples], got {type(audio).__name__}")
    if audio.ndim != 2:
        hint = " (a single clip: pass audio.unsqueeze(0))" if audio.ndim == 1 else ""
        raise ValueError(f"audio must be 2-D [n_clips, n_samples] at 16 kHz, got shape {tuple(audio.shape)}{hint}")
    if not audio.is_floating_point():
        raise ValueError(
            f"audio must be floating point in [-1, 1], got dtype {audio.dtype} "
            "(for int16 PCM divide by 32768)"
        )
    if audio.shape[1] == 0:
        raise ValueError("audio has zero samples per clip; need at least one 40 ms token (640 samples at 16 kHz)")
    if audio.shape[1] < min_samples:
        raise ValueError(
            f"audio clips have {audio.shape[1]} samples; need at least {min_samples} "
            f"({1000 * min_samples / SAMPLE_RATE:.0f} ms at 16 kHz, one token column)"
        )
    if audio.numel():
        finite = torch.isfinite(audio).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"audio contains NaN or Inf values in clip(s) {bad[:10]}")
    converted = audio.float()
    if audio.dtype != torch.float32 and converted.numel():
        in_range = torch.isfinite(converted).all(dim=1)
        if not bool(in_range.all()):
            bad = torch.nonzero(~in_range).flatten().tolist()
            raise ValueError(f"audio values in clip(s) {bad[:10]} exceed the float32 range (|x| <= 3.4e38) the "
                             "features are computed in; audio is nominally within [-1, 1]")
    return converted


# ------------------------------------------------------------------------------------ HEAR API
def load_hear_model(arch: str, model_file_path: str = "", layout: str = "time", max_batch_chunks: int | None = None,
                    kernel: str = "auto", device: str | torch.device | None = None,
                    sequence: str = "chunked", segment_tokens: int = 8192, positions: str = "auto",
                    precision: str = "fp32", compile: bool = False) -> HearModel:
    """The HEAR `load_model` of every `hear_msm.<arch>` module.

    model_file_path: "" for the architecture's default weights, or any weight source
        `hear_msm.load_model` accepts (official run folder / .pth, our folder or .safetensors,
        "hf://org/repo@rev", "arch.tag"). The weights must be for `arch`.
    layout: "time" (correct time order, default) or "official" (the authors' scrambled frame
        layout, only to reproduce published numbers); see this module's docstring.
    max_batch_chunks: how many 2 s chunks go through the encoder at once (bounds memory; in full
        mode, clips are grouped while their tokens fit this many chunks); None = the device's default
        (`HearModel.max_batch_chunks`).
    sequence: "chunked" (default, 2 s chunks as in pretraining) or "full" (SSAM/AxLSTM only: the
        whole clip as one sequence, linear time and memory); see this module's docstring.
    segment_tokens: full mode only, tokens per segment (5 per 40 ms); bounds working memory.
    positions: full mode only, "auto" | "extend" | "tile" (see `SpectrogramEncoder.position_rows`);
        with sequence="chunked" only "auto" is accepted.
    kernel: the family's kernel choice (see `hear_msm.create_model`); each family names its values.
    device: None (CPU), "cpu", "cuda[:index]" or "mps"; refused when absent on this machine.
    precision: "fp32" (default) or "bf16" (CPU with native bfloat16 only; see `hear_msm._precision`);
        embeddings are float32 either way.
    compile: True compiles the chunk encoder with torch.compile (`hear_msm._compile`): worth it for
        long evaluations (compiled once per machine and architecture, then cached on disk).
    """
    from . import create_model
    from ._precision import check_precision

    device = check_device(device) if device is not None else None  # before any weights are read
    check_precision(precision, device)
    model = create_model(arch, pretrained=os.fspath(model_file_path) or True, kernel=kernel, precision=precision,
                         compile=compile)
    runtime = HearModel(model, layout=layout, max_batch_chunks=max_batch_chunks, weights=model.weights_source,
                        sequence=sequence, segment_tokens=segment_tokens, positions=positions)
    return runtime.to(device) if device is not None else runtime


def _check_model(model) -> HearModel:
    if not isinstance(model, HearModel):
        raise ValueError(f"model must come from this module's load_model(), got {type(model).__name__}")
    return model


def get_scene_embeddings(audio, model: HearModel) -> torch.Tensor:
    """audio [n, samples] float at 16 kHz -> [n, scene_embedding_size] float32."""
    return _check_model(model).scene_embeddings(audio)


def get_timestamp_embeddings(audio, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """audio [n, samples] float at 16 kHz -> ([n, T, timestamp_embedding_size], [n, T] ms)."""
    return _check_model(model).timestamp_embeddings(audio)
