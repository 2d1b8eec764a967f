"""MW-MAE and MAE: ViT encoders of masked autoencoders over log-mel patches, and the multi-window decoder.

Yadav, Theodoridis, Hansen & Tan, "Masked Autoencoders with Multi-Window Local-Global Attention
Are Better Audio Learners" (ICLR 2024); the authors' JAX/Flax code is SarthakYadav/mwmae-jax-official.
MW-MAE-B-4x16-4l and the MAE-B-4x16-4l baseline share the encoder, a plain pre-norm ViT:

    log-mel [B, 1, T=200, F=80] (time first, standardised per clip)
      --Conv2d(k=s=(4, 16))-->  [B, 250, D] time-major tokens (index = t * 5 + f)
      + learned positions (a `params` variable, initialised 2-D sin-cos, trained with AdamW)
      [MAE only: CLS + its position prepended]
      --> depth x (x + MHA(LN(x)), x + MLP(LN(x))), LayerNorm eps 1e-6, tanh-approximated GELU
      --> LayerNorm --> [MAE only: CLS dropped] --> [B, 250, D]

MW-MAE's multi-window attention is in its decoder only (training): every head attends inside
non-overlapping windows of w tokens with a learned relative position bias (w = 2, 5, 10, 25, 50,
125 for heads 0-5 of the released model), the remaining heads attend globally.

Pretraining (`hear-msm pretrain`, the training loop's interface on `MWMAEEncoder`): `sample_mask`
masks 80% of the patches with the authors' rounding, `reconstruction_loss` encodes the visible
patches only and hands them to a `MaskedAutoencoderDecoder` (training only, `build_decoder`), which
restores the sequence with mask tokens and predicts every patch; MSE over the masked patches.
`MultiWindowDecoder` is the same decoder for encoders that see every token (SSAST, SSAM, AxLSTM
with `--decoder mwmha | mae`).

Parameter names follow hear_msm's Transformer family (`blocks.<i>.attn.qkv_layer`, ...); the
authors' Flax trees map onto them in `hear_msm._flax_checkpoint` (kernels transposed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import MASKING_MODES, PatchEmbed, masked_patch_infonce, sincos_2d_position_table
from .registry import register_family, register_model
from .transformer import TransformerBlock, TransformerConfig, check_kernel, set_kernel

GELUS = {"tanh": "tanh", "exact": "none"}  # config value -> torch's `approximate`


@dataclass(frozen=True, kw_only=True)
class MWMAEConfig(TransformerConfig):
    """Encoder of MW-MAE (no CLS token) or MAE (cls_token=True: a CLS token is prepended, attends
    with the patches, and is dropped from the output, as the shell drops every CLS output).

    gelu: "tanh" (Flax's default `nn.gelu`, the authors') or "exact".
    positions: "learned" (trained, as the authors do) or "sincos" (the initial 2-D sin-cos table
        kept frozen in hear_msm pretraining); checkpoints always carry the table.
    """

    cls_token: bool = False
    positions: str = "learned"
    gelu: str = "tanh"

    family = "mwmae"

    def validate(self) -> None:
        super().validate()
        if self.gelu not in GELUS:
            raise ValueError(f"{self.arch}: gelu must be one of {tuple(GELUS)}, got {self.gelu!r}")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token)


class MWMAEEncoder(nn.Module):
    """The authors' ViT encoder. `forward_features(logmel [B, 1, 200, 80]) -> [B, 250, D]` time-major."""

    # their HEAR wrapper: chunks reflect-padded, frames in time order ('b (t f) d -> b t (f d)')
    official_wrapper = {"padding": "reflect", "columns": "time"}  # see hear_msm._hear.OfficialWrapper

    def __init__(self, config: MWMAEConfig):
        super().__init__()
        self.config = config
        dim, prefix = config.embed_dim, config.num_prefix_tokens
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + config.num_patches, dim),
                                      requires_grad=config.positions == "learned")
        self.blocks = nn.ModuleList(TransformerBlock(config, GELUS[config.gelu]) for _ in range(config.depth))
        self.encoder_norm = nn.LayerNorm(dim, eps=config.norm_eps)

    def embed_patches(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> patch tokens with their positions [B, N, D] (no CLS)."""
        cfg = self.config
        expected = (1, cfg.num_frames, cfg.num_mels)
        if spectrogram.ndim != 4 or tuple(spectrogram.shape[1:]) != expected:
            raise ValueError(f"{cfg.arch} expects log-mel input of shape [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] (time first), got {tuple(spectrogram.shape)}")
        return self.patch_embed(spectrogram) + self.pos_embed[:, cfg.num_prefix_tokens:]

    def encode_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Positioned patch tokens [B, n, D] (all N, or the visible subset when pretraining)
        -> normalised outputs [B, prefix + n, D], CLS first for MAE."""
        x = patch_tokens
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] normalised log-mel -> patch token embeddings [B, N, D], time-major, CLS dropped."""
        return self.encode_tokens(self.embed_patches(spectrogram))[:, self.config.num_prefix_tokens:]

    def forward_visible(self, spectrogram: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """MAE pretraining: encode only the patches `keep_index` [B, n] (indices into the N
        time-major patches, in the order given) -> [B, prefix + n, D] for `MaskedAutoencoderDecoder`."""
        tokens = self.embed_patches(spectrogram)
        visible = tokens.gather(1, keep_index[..., None].expand(-1, -1, tokens.shape[-1]))
        return self.encode_tokens(visible)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.forward_features(spectrogram)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation: sin-cos positions, Xavier-uniform conv and Dense kernels
        (fan over the whole conv kernel, as Flax computes it), CLS ~ N(0, 0.02), zero biases."""
        cfg = self.config
        table = sincos_2d_position_table(cfg.embed_dim, cfg.grid_time, cfg.grid_freq)  # CLS row first
        self.pos_embed.copy_(table[1 - cfg.num_prefix_tokens:][None])
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for block in self.blocks:
            block.reset_parameters()
        nn.init.ones_(self.encoder_norm.weight)
        nn.init.zeros_(self.encoder_norm.bias)

    # ------------------------------------------------------------------ pretraining (the training loop's interface)
    masking_modes = MASKING_MODES  # the `mode`s `sample_mask` accepts
    decoders = ("mwmha", "mae")  # MAE needs a decoder to restore the sequence: MW-MAE's, or all-global heads

    def sample_mask(self, batch: int, ratio: float, mode: str = "unstructured",
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Boolean mask [batch, N], True = masked, time-major: the authors' random masking, the same
        number of patches kept in every clip, int(N * (100 - 100 * ratio) / 100) (their rounding: 50
        of 250 at ratio 0.8, where int(250 * (1 - 0.8)) would give 49); "timestep" keeps whole token
        columns, counted the same way over the time steps."""
        if mode not in self.masking_modes:
            raise ValueError(f"masking mode {mode!r} is unknown; expected one of {self.masking_modes}")
        cfg = self.config
        units = cfg.num_patches if mode == "unstructured" else cfg.grid_time
        keep_index, _ = random_restore_index(batch, units, ratio, generator)
        if keep_index.shape[1] == 0:
            what = "patches" if mode == "unstructured" else "time steps"
            raise ValueError(f"mask ratio {ratio} keeps none of the {units} {what}: the encoder needs a visible patch")
        mask = torch.ones(batch, units, dtype=torch.bool).scatter_(1, keep_index, False)
        if mode == "timestep":
            mask = mask.repeat_interleave(cfg.grid_freq, dim=1)
        return mask.to(device)

    def patchify(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> reconstruction targets [B, N, pt * pf]: time-major patches, the values of a
        patch frame by frame (index frame * pf + mel), as the authors' `patchify` orders them."""
        cfg = self.config
        b = spectrogram.shape[0]
        x = spectrogram.reshape(b, cfg.grid_time, cfg.patch_frames, cfg.grid_freq, cfg.patch_mels)
        return x.permute(0, 1, 3, 2, 4).reshape(b, cfg.num_patches, cfg.patch_dim)

    def build_decoder(self, config: MultiWindowDecoderConfig) -> MaskedAutoencoderDecoder:
        """The training-only decoder of `--decoder mwmha | mae` for this encoder, initialised."""
        decoder = MaskedAutoencoderDecoder(config, self.config)
        decoder.reset_parameters()
        return decoder

    def reconstruction_loss(self, spectrogram: torch.Tensor, mask: torch.Tensor, masked_only: bool = True,
                            patch_normalized_targets: bool = False, discriminative_weight: float = 0.0,
                            generative_weight: float = 1.0, decoder: nn.Module | None = None) -> torch.Tensor:
        """MAE's objective on [B, 1, T, F] with a mask [B, N] from `sample_mask` (True = masked):
        the encoder sees the visible patches only (`forward_visible`), `decoder` (a
        `MaskedAutoencoderDecoder`, training only) puts mask tokens in the masked places and predicts
        every patch, and the loss is generative_weight x the MSE against `patchify`'s targets over
        the masked patches (`masked_only`, theirs: `mae_loss` with the mask) or over all.

        `patch_normalized_targets`: their `norm_pix_loss` (off in their recipe), each target patch
        standardised by its mean and population variance (+ 1e-6). `discriminative_weight` w > 0
        adds w x `masked_patch_infonce` (not theirs). The loss keeps float64 inputs in float64.
        """
        if not isinstance(decoder, MaskedAutoencoderDecoder):
            raise ValueError(f"{self.config.arch} pretrains as a masked autoencoder and needs its decoder "
                             f"(MaskedAutoencoderDecoder, `--decoder mwmha` or `mae`), got {type(decoder).__name__}")
        keep_index, restore_index = visible_and_restore_index(mask, self.config.num_patches)
        compute = torch.promote_types(spectrogram.dtype, torch.float32)  # float32 under autocast, float64 kept
        prediction = decoder(self.forward_visible(spectrogram, keep_index), restore_index).to(compute)
        target = self.patchify(spectrogram).to(compute)
        if patch_normalized_targets:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6).sqrt()
        error = (prediction - target).pow(2).mean(dim=-1)  # [B, N]
        loss = generative_weight * ((error * mask).sum() / mask.sum() if masked_only else error.mean())
        if discriminative_weight > 0:
            loss = loss + discriminative_weight * masked_patch_infonce(prediction, target, mask)
        return loss


def visible_and_restore_index(mask: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean mask [B, N] (True = masked, the same count in every row) -> (keep_index [B, n]: the
    visible patches in ascending order, restore_index [B, N]: each patch's place in [visible, masked]).

    The authors keep the visible patches in their random draw order; the encoder (no causal or
    windowed attention) and the restored decoder input do not depend on that order.
    """
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != num_patches:
        raise ValueError(f"the MAE objective takes a boolean mask [batch, {num_patches}] (from sample_mask), "
                         f"got {mask.dtype} {list(mask.shape)}")
    visible = (~mask).sum(dim=1)
    if not bool((visible == visible[0]).all()) or int(visible[0]) == 0:
        raise ValueError(f"every clip needs the same number (>= 1) of visible patches, got {visible.tolist()}")
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # visible (0) first, each group ascending
    return order[:, :int(visible[0])], order.argsort(dim=1)


def build_mwmae(config: MWMAEConfig, kernel: str = "auto") -> MWMAEEncoder:
    """`kernel`: as SSAST's (`hear_msm.models.transformer.KERNELS`, the same blocks)."""
    check_kernel(kernel)
    encoder = MWMAEEncoder(config)
    set_kernel(encoder, kernel)
    encoder.reset_parameters()
    return encoder


register_family(MWMAEConfig, build_mwmae)


# ------------------------------------------------------------------------------------ decoder
@dataclass(frozen=True, kw_only=True)
class MultiWindowDecoderConfig:
    """The pretraining decoder; window_sizes[h] = w > 0: head h attends in windows of w tokens,
    0: globally. All zeros gives the MAE baseline's plain decoder."""

    embed_dim: int = 384
    depth: int = 4
    num_heads: int = 8
    window_sizes: tuple[int, ...] = (2, 5, 10, 25, 50, 125, 0, 0)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    gelu: str = "tanh"

    def __post_init__(self):
        if len(self.window_sizes) != self.num_heads:
            raise ValueError(f"window_sizes needs one entry per head ({self.num_heads}), got {self.window_sizes}")
        if any(w < 0 for w in self.window_sizes) or self.embed_dim % self.num_heads:
            raise ValueError(f"window sizes must be >= 0 and embed_dim {self.embed_dim} divisible by "
                             f"{self.num_heads} heads")


MWMAE_DECODER = MultiWindowDecoderConfig()
MAE_DECODER = MultiWindowDecoderConfig(window_sizes=(0,) * 8)
# `hear-msm pretrain --decoder` -> the heads' windows of the released decoders
DECODER_WINDOWS = {"mwmha": MWMAE_DECODER.window_sizes, "mae": MAE_DECODER.window_sizes}


def decoder_config(kind: str, embed_dim: int = MWMAE_DECODER.embed_dim,
                   depth: int = MWMAE_DECODER.depth) -> MultiWindowDecoderConfig:
    """The decoder of `--decoder mwmha` (MW-MAE's windows) or `mae` (8 global heads), 8 heads of
    `embed_dim` / 8 channels; ValueError for another kind or a width that 8 heads do not divide."""
    if kind not in DECODER_WINDOWS:
        raise ValueError(f"multi-window decoder kind must be one of {tuple(DECODER_WINDOWS)}, got {kind!r}")
    return MultiWindowDecoderConfig(embed_dim=embed_dim, depth=depth, window_sizes=DECODER_WINDOWS[kind])


class MultiWindowAttention(nn.Module):
    """Multi-window multi-head self-attention, [B, L, D] -> [B, L, D].

    Head h with window w splits the sequence into L / w consecutive windows and attends inside
    each, adding a learned bias b_h[i - j + w - 1] for query i and key j of a window; w = 0 is
    ordinary global attention. L must be a multiple of every window.
    """

    def __init__(self, dim: int, num_heads: int, window_sizes: tuple[int, ...]):
        super().__init__()
        self.num_heads = num_heads
        self.window_sizes = tuple(int(w) for w in window_sizes)
        self.qkv_layer = nn.Linear(dim, 3 * dim)
        self.proj_layer = nn.Linear(dim, dim)
        self.position_bias = nn.ParameterDict(
            {str(h): nn.Parameter(torch.zeros(2 * w - 1)) for h, w in enumerate(self.window_sizes) if w})

    def _window_bias(self, head: int, window: int) -> torch.Tensor:
        """[w, w] bias table of one head: entry (i, j) = b[i - j + w - 1]."""
        index = torch.arange(window, device=self.qkv_layer.weight.device)
        return self.position_bias[str(head)][index[:, None] - index[None, :] + window - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        bad = [w for w in self.window_sizes if w and length % w]
        if bad:
            raise ValueError(f"sequence length {length} is not a multiple of the attention windows {bad}")
        head_dim = dim // self.num_heads
        q, k, v = self.qkv_layer(x).view(b, length, 3, self.num_heads, head_dim).permute(2, 3, 0, 1, 4)
        heads = []  # each [B, L, head_dim]
        for h, w in enumerate(self.window_sizes):
            if w == 0:
                heads.append(F.scaled_dot_product_attention(q[h], k[h], v[h]))
                continue
            windows = [t.reshape(b, length // w, w, head_dim) for t in (q[h], k[h], v[h])]
            out = F.scaled_dot_product_attention(*windows, attn_mask=self._window_bias(h, w).to(x.dtype))
            heads.append(out.reshape(b, length, head_dim))
        return self.proj_layer(torch.stack(heads, dim=2).reshape(b, length, dim))


class MultiWindowBlock(TransformerBlock):
    """Pre-norm block whose attention is `MultiWindowAttention` (same parameter names otherwise)."""

    def __init__(self, config: MultiWindowDecoderConfig):
        block_config = TransformerConfig(arch="mwmae_decoder", embed_dim=config.embed_dim, depth=config.depth,
                                         num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                                         norm_eps=config.norm_eps)
        # the oneDNN block path is written for `Attention` (training-only decoder: reference always)
        super().__init__(block_config, GELUS[config.gelu], kernel="reference")
        self.attn = MultiWindowAttention(config.embed_dim, config.num_heads, config.window_sizes)


def sincos_1d_position_table(embed_dim: int, length: int) -> torch.Tensor:
    """[length, embed_dim]: [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (D/2)) (MAE's decoder)."""
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class MultiWindowDecoder(nn.Module):
    """MW-MAE's decoder over a whole token sequence (training only; never part of exported weights).

    forward(tokens [B, N, D_enc], the encoder's patch tokens, time-major) -> predictions
    [B, N, patch_dim] of the patch values (`patchify`'s layout):

        decoder_embed (D_enc -> d) --> + decoder_pos_embed (1-D sin-cos over the sequence, trained)
          --> depth x MultiWindowBlock --> decoder_norm --> decoder_pred (d -> patch values)

    This is the decoder of `--decoder mwmha | mae` behind encoders that see every token with the
    mask token in place (SSAST, SSAM, AxLSTM); `MaskedAutoencoderDecoder` adds MAE's mask tokens and
    restore order for the MW-MAE / MAE encoders, which see the visible patches only. Every windowed
    head needs a sequence of whole windows (250 patches: windows 2, 5, 10, 25, 50, 125).
    """

    predicts_patches = True  # MaskedSpectrogramModel: its output replaces the model's own head

    def __init__(self, config: MultiWindowDecoderConfig, encoder_dim: int, num_patches: int, patch_dim: int,
                 num_prefix_tokens: int = 0):
        super().__init__()
        length = num_prefix_tokens + num_patches
        bad = [w for w in config.window_sizes if w and length % w]
        if bad:
            raise ValueError(
                f"the multi-window decoder attends over {length} tokens ({num_patches} patches"
                f"{f' + {num_prefix_tokens} CLS' if num_prefix_tokens else ''}), which is not a multiple of its "
                f"windows {bad}; windowed heads need whole windows (a CLS token in front calls for all-global "
                "heads, the MAE decoder; other input sizes for windows that divide the patch count)")
        self.config = config
        self.num_prefix_tokens = num_prefix_tokens
        dim = config.embed_dim
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        self.decoder_blocks = nn.ModuleList(MultiWindowBlock(config) for _ in range(config.depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.decoder_pred = nn.Linear(dim, patch_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(self.decoder_embed(tokens))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded sequence [B, prefix + N, d] in patch order -> predictions [B, N, patch_dim]."""
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, self.num_prefix_tokens:]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation: LeCun-normal `decoder_embed`/`decoder_pred` (Flax's Dense
        default), Xavier-uniform block kernels, 1-D sin-cos positions (CLS row zero), relative
        position biases ~ truncated normal with variance 0.02 / (2w - 1)."""
        dim, prefix = self.config.embed_dim, self.num_prefix_tokens
        self.decoder_pos_embed.zero_()
        self.decoder_pos_embed[0, prefix:] = sincos_1d_position_table(dim, self.decoder_pos_embed.shape[1] - prefix)
        for linear in (self.decoder_embed, self.decoder_pred):
            std = 1.0 / math.sqrt(linear.in_features) / 0.87962566
            nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(linear.bias)
        for block in self.decoder_blocks:
            block.reset_parameters()
            for bias in block.attn.position_bias.values():
                std = math.sqrt(0.02 / bias.numel()) / 0.87962566
                nn.init.trunc_normal_(bias, std=std, a=-2 * std, b=2 * std)
        nn.init.ones_(self.decoder_norm.weight)
        nn.init.zeros_(self.decoder_norm.bias)


class MaskedAutoencoderDecoder(MultiWindowDecoder):
    """MAE decoder (training only; never part of exported weights).

    forward(latent [B, prefix + n, D_enc] from `MWMAEEncoder.forward_visible`, restore_index [B, N])
        -> predictions [B, N, patch_dim] for all N patches, time-major.
    restore_index[b, i] is the position of patch i in the sequence [n visible tokens in the
    order encoded, N - n mask tokens] (the authors' `ids_restore`); the CLS token (MAE) stays in front.
    """

    def __init__(self, config: MultiWindowDecoderConfig, encoder: MWMAEConfig):
        super().__init__(config, encoder.embed_dim, encoder.num_patches, encoder.patch_dim, encoder.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))

    def forward(self, latent: torch.Tensor, restore_index: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        b, total = restore_index.shape
        masked = self.mask_token.to(x.dtype).expand(b, total - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1).gather(1, restore_index[..., None].expand(-1, -1, x.shape[-1]))
        return self.decode(torch.cat([prefix, x], dim=1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As `MultiWindowDecoder`'s, and the mask token ~ N(0, 0.02)."""
        super().reset_parameters()
        nn.init.normal_(self.mask_token, std=0.02)


def random_restore_index(batch: int, num_patches: int, mask_ratio: float,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' random masking: (keep_index [B, n], restore_index [B, N]) with
    n = int(N * (100 - 100 * ratio) / 100) patches kept (their rounding)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (100 - mask_ratio * 100) / 100)
    shuffle = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    return shuffle[:, :keep], shuffle.argsort(dim=1)


# ------------------------------------------------------------------------------------ weights
def flax_weights(path) -> tuple[MWMAEConfig, dict[str, torch.Tensor], int | None]:
    """(config, encoder state dict, step) from an authors' Flax checkpoint (run folder,
    `checkpoint_<step>` file or Orbax directory), read without JAX; the preset is recognised
    from the tree (embed_dim, depth, CLS) among the authors' sizes (`mae_tiny` ... `mwmae_huge`, not all
    registered). ValueError when it fits none of them or does not map strictly."""
    from .._flax_checkpoint import flax_encoder_state, read_flax_checkpoint

    checkpoint = read_flax_checkpoint(path)
    step = checkpoint.step
    arch = infer_flax_arch(checkpoint.params)
    if arch is None:
        raise ValueError(f"{checkpoint.path}: the parameter tree is not an MW-MAE/MAE encoder of a known "
                         f"size ({', '.join(_PRESETS)} presets)")
    with torch.device("meta"):
        encoder = _create(arch)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    arrays = flax_encoder_state(checkpoint.params, expected, release=True)
    del checkpoint  # the decoder's parameters
    state = {key: torch.from_numpy(np.ascontiguousarray(arrays.pop(key))).float() for key in sorted(arrays)}
    return encoder.config, state, step


def infer_flax_arch(params: dict) -> str | None:
    """The authors' size an MW-MAE / MAE Flax `params` tree has ("mwmae_base", "mae_base", ...), or None."""
    pos = params.get("pos_embed")
    if pos is None or getattr(pos, "ndim", 0) != 3:
        return None
    depth = len({name.split("/", 1)[0] for name in params if name.startswith("encoder_block_")})
    for size, (embed_dim, size_depth, _) in _PRESETS.items():
        if pos.shape[-1] == embed_dim and depth == size_depth:
            return ("mae_" if "cls_token" in params else "mwmae_") + size
    return None


# ------------------------------------------------------------------------------------ presets
# the authors' encoder table (src/modules/mae.py): size -> (embed_dim, depth, heads)
_PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "medium": (512, 12, 8), "base": (768, 12, 12),
            "large": (1024, 24, 16), "huge": (1280, 32, 16)}


def _create(arch: str, kernel: str = "auto", **overrides) -> MWMAEEncoder:
    family, size = arch.split("_", 1)
    embed_dim, depth, heads = _PRESETS[size]
    fields = {"embed_dim": embed_dim, "depth": depth, "num_heads": heads,
              "cls_token": family == "mae", **overrides}
    return build_mwmae(MWMAEConfig(arch=arch, **fields), kernel=kernel)


@register_model
def mwmae_tiny(**overrides) -> MWMAEEncoder:
    return _create("mwmae_tiny", **overrides)


@register_model
def mwmae_small(**overrides) -> MWMAEEncoder:
    return _create("mwmae_small", **overrides)


@register_model
def mwmae_medium(**overrides) -> MWMAEEncoder:
    return _create("mwmae_medium", **overrides)


@register_model
def mwmae_base(**overrides) -> MWMAEEncoder:
    """MW-MAE-B-4x16-4l's encoder (85,297,920 parameters)."""
    return _create("mwmae_base", **overrides)


@register_model
def mwmae_large(**overrides) -> MWMAEEncoder:
    return _create("mwmae_large", **overrides)


@register_model
def mwmae_huge(**overrides) -> MWMAEEncoder:
    return _create("mwmae_huge", **overrides)


@register_model
def mae_base(**overrides) -> MWMAEEncoder:
    """The MAE-B-4x16-4l baseline's encoder (85,299,456 parameters, CLS dropped from the output)."""
    return _create("mae_base", **overrides)
