"""Model cards (README.md beside config.json + model.safetensors): one writer for every folder of weights.

`model_card(config, facts)` writes the card of any hear_msm weights folder: `save_pretrained`
(and so `hear-msm convert` and the weights converted on first download), `hear-msm export-hub`,
the training export (`hear-msm pretrain`'s RUN/final) and the shipped demo weights
(scripts/ship_demo_weights.py). What is the same for every card (front matter, the architecture,
the input settings and embedding sizes derived from the config, the usage example) is written
here; what differs (provenance, licence, paper, published scores, a training report) comes in
`CardFacts`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models.encoder import EncoderConfig

__all__ = ["CardFacts", "FAMILY_NAMES", "PAPERS", "model_card"]

FAMILY_NAMES = {
    "transformer": "SSAST (Transformer)",
    "mamba": "SSAM (Audio Mamba)",
    "xlstm": "AxLSTM (Audio xLSTM)",
    "ssamba": "SSAMBA (self-supervised bidirectional Mamba)",
    "mwmae": "MW-MAE / MAE (ViT encoder of a masked autoencoder)",
}
PAPERS = {
    "transformer": "Gong et al., SSAST (AAAI 2022), as trained by Yadav & Tan, arXiv:2406.02178",
    "mamba": "Yadav & Tan, Audio Mamba (Interspeech 2024), arXiv:2406.02178",
    "xlstm": "Yadav, Theodoridis & Tan, Audio xLSTMs, arXiv:2408.16568",
    "ssamba": "Shams, Dindar, Jiang & Mesgarani, SSAMBA (SLT 2024), arXiv:2405.11831",
    "mwmae": "Yadav, Theodoridis, Hansen & Tan, Masked Autoencoders with Multi-Window Local-Global Attention "
             "Are Better Audio Learners (ICLR 2024)",
}
_FRONTENDS = {
    "logmel": ("log-mel as the authors compute it: torchaudio MelSpectrogram (25 ms window, 10 ms hop, "
               "50-8000 Hz, power 2), log(x + 1.19e-7), standardised per clip over time and bins"),
    "kaldi_fbank": ("Kaldi fbank as SSAMBA's data loader computes it: waveform mean removed, "
                    "torchaudio.compliance.kaldi.fbank (25 ms hanning frames, 10 ms shift, no dither, "
                    "htk_compat), normalised (x + 4.2677393) / (2 x 4.5689974)"),
}


@dataclass(frozen=True)
class CardFacts:
    """What a card says beyond the architecture.

    title: the heading (default: the architecture name).
    summary: the paragraph under it (default: one sentence naming family, size and parameters).
    provenance: bullet lines saying where the weights come from (tag, files, checksums, run).
    license / paper: free text; None prints "not stated" / the family's paper.
    published_scores: {"source": "where they were published", "scores": {task: score}}.
    load_with: the weight source shown in the usage example.
    sections: extra (heading, markdown) sections, placed before the usage example.
    """

    title: str | None = None
    summary: str | None = None
    provenance: tuple[str, ...] = ()
    license: str | None = None
    paper: str | None = None
    published_scores: dict | None = None
    load_with: str = "path/to/this/folder"
    sections: tuple[tuple[str, str], ...] = ()


def model_card(config: EncoderConfig, facts: CardFacts = CardFacts(), params: int | None = None) -> str:
    """The README.md text for weights of `config` (markdown with Hub front matter)."""
    parts = [
        _front_matter(config),
        f"# {facts.title or config.arch}\n",
        (facts.summary or _default_summary(config, params)) + "\n",
        _section("Provenance", "\n".join(f"- {line}" for line in facts.provenance) or "- not recorded"),
        _section("Input and embeddings", _input_settings(config)),
        _section("Licence", facts.license or "Not stated: ask whoever trained these weights before redistributing them."),
        _section("Paper", facts.paper or PAPERS.get(config.family, "not stated")),
    ]
    if facts.published_scores:
        parts.append(_section("Published scores", _scores_table(facts.published_scores)))
    parts += [_section(heading, body) for heading, body in facts.sections]
    parts.append(_section("Use", _usage(config, facts.load_with)))
    return "\n".join(parts)


def _front_matter(config: EncoderConfig) -> str:
    return ("---\nlibrary_name: hear_msm\nlicense: other\npipeline_tag: feature-extraction\n"
            f"tags: [audio, hear, self-supervised, {config.family}]\n---\n")


def _default_summary(config: EncoderConfig, params: int | None) -> str:
    counted = f", {params:,} parameters" if params else ""
    return (f"A hear_msm masked spectrogram model: {FAMILY_NAMES.get(config.family, config.family)}, "
            f"embed_dim {config.embed_dim}, depth {config.depth}{counted}.")


def _section(heading: str, body: str) -> str:
    return f"## {heading}\n\n{body.rstrip()}\n"


def _input_settings(config: EncoderConfig) -> str:
    hop_ms = 10 * config.patch_frames
    order = ("time-major (t x grid_freq + f)" if config.token_order == "time_major"
             else "frequency-major (f x grid_time + t)")
    cls = "a CLS token prepended (its output dropped)" if config.cls_token else "no CLS token"
    positions = "fixed 2-D sin-cos positions" if config.positions == "sincos" else "learned positions"
    frontend = _FRONTENDS.get(config.frontend, config.frontend)
    return "\n".join([
        "- Audio: mono float waveforms at 16 kHz (other rates and channel counts: resample and mix down first).",
        f"- Features: {config.num_mels}-bin {frontend}.",
        f"- Encoder input: windows of {config.num_frames} frames ({config.num_frames / 100:g} s) x "
        f"{config.num_mels} bins, cut into {config.patch_frames} x {config.patch_mels} (time x frequency) patches: "
        f"{config.grid_time} x {config.grid_freq} = {config.num_patches} tokens, {order}, {cls}, {positions}.",
        f"- HEAR timestamp embeddings: one {config.frame_embedding_size}-d vector every {hop_ms} ms "
        f"(the {config.grid_freq} tokens of one {hop_ms} ms column side by side), timestamps at column centres.",
        f"- HEAR scene embedding: the mean over time of the timestamp embeddings ({config.frame_embedding_size}-d).",
    ])


def _scores_table(published: dict) -> str:
    rows = "\n".join(f"| {task} | {score} |" for task, score in published.get("scores", {}).items())
    return f"As published in {published.get('source', 'the paper')}:\n\n| task | score |\n|---|---|\n{rows}"


def _usage(config: EncoderConfig, load_with: str) -> str:
    return (
        "```python\n"
        "import hear_msm\n"
        f'model = hear_msm.load_model("{load_with}")   # {config.arch}, loaded strictly\n\n'
        f"import hear_msm.{config.arch} as hear_module   # the HEAR API\n"
        f'm = hear_module.load_model("{load_with}")\n'
        f"scene = hear_module.get_scene_embeddings(audio_16k, m)   # [n, {config.frame_embedding_size}]\n"
        "```"
    )
