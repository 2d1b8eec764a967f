"""Registry-driven checks: every architecture has the official keys, shapes and parameter counts,
runs forward and backward without NaN, and round-trips its config."""
import json
import math

import pytest
import torch
from conftest import TESTS_DIR

import hear_msm
from hear_msm.models.encoder import config_from_dict, sincos_2d_position_table

OFFICIAL = json.loads((TESTS_DIR / "data" / "official_state_dict_keys.json").read_text())
# NOTES §1, full checkpoint parameter counts
PARAMS = {
    "ssast_tiny": 5_449_216, "ssast_small": 21_588_928, "ssast_base": 85_940_032,
    "ssam_tiny": 4_808_704, "ssam_small": 17_985_472, "ssam_base": 69_443_392,
    "axlstm_tiny": 2_965_600, "axlstm_small": 11_313_184, "axlstm_base": 44_154_784,
}


def test_list_models_names_every_preset():
    ssamba = ["ssamba_tiny", "ssamba_small", "ssamba_base"]  # keys and counts: tests/test_ssamba.py
    mwmae = [f"mwmae_{size}" for size in ("tiny", "small", "medium", "base", "large", "huge")] + ["mae_base"]
    assert hear_msm.list_models() == list(PARAMS) + ssamba + mwmae  # MW-MAE counts: tests/test_mwmae.py
    assert hear_msm.list_models("ssam_*") == ["ssam_tiny", "ssam_small", "ssam_base"]
    assert hear_msm.list_models("ssamba_*") == ssamba


@pytest.mark.parametrize("arch", list(PARAMS))
def test_state_dict_matches_official_keys_shapes_and_counts(arch):
    with torch.device("meta"):
        model = hear_msm.create_model(arch)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == OFFICIAL[arch]
    assert sum(math.prod(s) for s in shapes.values()) == PARAMS[arch]
    assert model.config.arch == arch


@pytest.mark.parametrize("arch", ["ssast_tiny", "ssam_tiny", "axlstm_tiny"])
def test_forward_backward_finite(arch):
    torch.manual_seed(0)
    model = hear_msm.create_model(arch)
    spec = torch.randn(2, 1, 200, 80)
    mask = model.sample_mask(2, 0.5)
    loss = model.reconstruction_loss(spec, mask)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None  # fixed positions stay frozen
    tokens = model.forward_features(spec)
    assert tokens.shape == (2, 250, 192) and torch.isfinite(tokens).all()


def test_masking_modes():
    model = hear_msm.create_model("ssast_tiny")
    gen = torch.Generator().manual_seed(0)
    mask = model.sample_mask(3, 0.5, "unstructured", generator=gen)
    assert mask.shape == (3, 250) and (mask.sum(1) == 125).all()
    columns = model.sample_mask(3, 0.5, "timestep", generator=gen).view(3, 50, 5)
    assert (columns.all(-1) | ~columns.any(-1)).all()  # whole 40 ms columns
    assert (columns[..., 0].sum(1) == 25).all()
    with pytest.raises(ValueError, match="masking mode"):
        model.sample_mask(1, 0.5, "random")


def test_patchify_is_time_major_and_matches_patch_grid():
    model = hear_msm.create_model("ssast_tiny")
    spec = torch.arange(200 * 80, dtype=torch.float32).view(1, 1, 200, 80)
    patches = model.patchify(spec)
    # token t*5+f holds frames 4t..4t+3 x mels 16f..16f+15, flattened (time, mel)
    t, f = 7, 3
    expected = spec[0, 0, 4 * t:4 * t + 4, 16 * f:16 * f + 16].reshape(-1)
    assert torch.equal(patches[0, t * 5 + f], expected)


def test_sincos_positions_layout():
    table = sincos_2d_position_table(192, 50, 5)
    assert table.shape == (251, 192)
    assert torch.equal(table[0], torch.zeros(192))
    # first half encodes the frequency index, second half the time index
    row = lambda t, f: table[1 + t * 5 + f]  # noqa: E731
    assert torch.allclose(row(3, 2)[:96], row(9, 2)[:96]) and not torch.allclose(row(3, 2)[96:], row(9, 2)[96:])
    assert torch.allclose(row(3, 1)[96:], row(3, 4)[96:]) and not torch.allclose(row(3, 1)[:96], row(3, 4)[:96])


@pytest.mark.parametrize("arch", hear_msm.list_models())
def test_config_round_trip(arch):
    with torch.device("meta"):
        config = hear_msm.create_model(arch).config
    data = json.loads(json.dumps(config.to_dict()))
    assert config_from_dict(data) == config


def test_config_rejects_unknown_fields_and_versions():
    config = hear_msm.create_model("ssast_tiny").config.to_dict()
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({**config, "dropout": 0.1})
    with pytest.raises(ValueError, match="format_version"):
        config_from_dict({**config, "format_version": 99})
    with pytest.raises(ValueError, match="family"):
        config_from_dict({**config, "family": "rnn"})


def test_unknown_model_name():
    with pytest.raises(ValueError, match="available"):
        hear_msm.create_model("ssam_huge")


def test_axlstm_blocks_alternate_direction():
    model = hear_msm.create_model("axlstm_tiny")
    assert [block.reverse for block in model.blocks] == [i % 2 == 1 for i in range(12)]


def test_patch_normalized_targets_and_infonce_match_direct_computations():
    """The two non-official objectives, checked against straightforward per-clip computations."""
    from hear_msm.models.encoder import masked_patch_infonce

    torch.manual_seed(0)
    from hear_msm.models.transformer import ssast_tiny
    model = ssast_tiny(depth=1)
    spec = torch.randn(3, 1, 200, 80) * 2 + 1
    mask = model.sample_mask(3, 0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prediction = model(spec, mask)
        target = model.patchify(spec)
        standardised = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True)
        loss = model.reconstruction_loss(spec, mask, patch_normalized_targets=True)
        torch.testing.assert_close(loss, (prediction - standardised).pow(2).mean(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loss, model.reconstruction_loss(spec, mask))

        # InfoNCE: for every clip, each masked prediction classifies its target among the masked targets
        expected = []
        for b in range(3):
            idx = mask[b].nonzero().squeeze(1)
            logits = prediction[b, idx] @ target[b, idx].T
            expected.append(torch.nn.functional.cross_entropy(logits, torch.arange(len(idx)), reduction="none"))
        torch.testing.assert_close(masked_patch_infonce(prediction, target, mask), torch.cat(expected).mean())
        # predictions equal to (scaled) targets make the right patch win: the loss goes to ~0
        assert masked_patch_infonce(10 * target, target, mask) < 1e-3
        assert masked_patch_infonce(10 * target.flip(1), target, mask) > 5
        joint = model.reconstruction_loss(spec, mask, discriminative_weight=0.1)
        torch.testing.assert_close(joint, model.reconstruction_loss(spec, mask)
                                   + 0.1 * masked_patch_infonce(prediction, target, mask), rtol=1e-5, atol=1e-5)
    # timestep masking (whole columns) goes through the same path
    column_mask = model.sample_mask(3, 0.5, mode="timestep")
    assert torch.isfinite(model.reconstruction_loss(spec, column_mask, discriminative_weight=0.1, masked_only=True))


def test_shell_options_cls_positions_and_token_order():
    """The config's CLS, position and token-order options: a CLS-free, learned-position,
    frequency-major copy of an attention encoder (whose output does not depend on token order
    once positions move with the tokens) gives the same time-major outputs."""
    import dataclasses

    from hear_msm.models.transformer import build_transformer

    base = hear_msm.create_model("ssast_tiny").eval()
    cfg = dataclasses.replace(base.config, cls_token=False, positions="learned", token_order="freq_major")
    variant = build_transformer(cfg).eval()
    state = {k: v for k, v in base.state_dict().items() if k != "cls_token"}
    grid = base.pos_embed[:, 1:].reshape(1, 50, 5, -1)  # time-major rows -> frequency-major
    state["pos_embed"] = grid.transpose(1, 2).reshape(1, 250, -1)
    variant.load_state_dict(state, strict=True)
    assert "cls_token" not in variant.state_dict() and variant.pos_embed.requires_grad
    x = torch.randn(2, 1, 200, 80)
    with torch.no_grad():
        tokens = base.patch_embed(x) + base.pos_embed[:, 1:]
        for block in base.blocks:
            tokens = block(tokens)
        expected = base.encoder_norm(tokens)  # the base encoder run without its CLS token
        actual = variant.forward_features(x)
    assert actual.shape == (2, 250, 192)
    assert (actual - expected).abs().max().item() < 1e-4
    wrong = variant.from_time_major(actual)  # the frequency-major order is a real permutation
    assert (wrong - expected).abs().max().item() > 0.1
    with pytest.raises(ValueError, match="sin-cos"):
        dataclasses.replace(base.config, token_order="freq_major")
    with pytest.raises(ValueError, match="token_order"):
        dataclasses.replace(base.config, token_order="diagonal")
