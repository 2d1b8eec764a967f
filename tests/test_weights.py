"""Every weight source end to end: official .pth runs, our format, the Hub (loopback), tags."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
from random_checkpoint import random_official_state_dict
from safetensors.torch import load_file

import hear_msm
import hear_msm.axlstm_small
import hear_msm.ssast_base
from hear_msm import _weights
from hear_msm._hub import sha256_of_file
from hear_msm._weights import load_weights, save_pretrained


def _official_run(tmp_path, arch, epochs=(9, 10), name="run"):
    """A run folder as the authors' training writes it (newest epoch holds the real weights)."""
    run = tmp_path / name / "checkpoints"
    run.mkdir(parents=True)
    state = random_official_state_dict(arch, seed=0)
    for epoch in epochs:
        weights = state if epoch == max(epochs) else {k: torch.zeros_like(v) for k, v in state.items()}
        torch.save({"model": weights, "epoch": epoch, "args": argparse.Namespace(seed=0)},
                   run / f"checkpoint-{epoch}.pth")
    return run.parent, state


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_official_run_folder_loads_strictly_newest_epoch(tmp_path):
    run, state = _official_run(tmp_path, "axlstm_tiny", epochs=(9, 10))
    model = hear_msm.load_model(run)
    assert model.config.arch == "axlstm_tiny"  # inferred from the tensors (no arch in these args)
    _assert_same_weights(model, state)
    assert "checkpoint-10.pth" in model.weights_source
    _assert_same_weights(hear_msm.create_model("axlstm_tiny", pretrained=str(run)), state)


def test_convert_cli_round_trip_and_no_overwrite(tmp_path):
    run, state = _official_run(tmp_path, "ssast_tiny")
    out = tmp_path / "converted"
    cli = [sys.executable, "-m", "hear_msm.cli", "convert", str(run), str(out)]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["arch"] == "ssast_tiny"
    _assert_same_weights(hear_msm.load_model(out), state)
    _assert_same_weights(hear_msm.load_model(out / "model.safetensors"), state)
    card = out / "README.md"
    card.write_text("my notes")
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert subprocess.run(cli + ["--overwrite"], capture_output=True).returncode == 0
    assert card.read_text() == "my notes"  # a user's model card is never replaced


def test_lone_safetensors_file_carries_its_config(tmp_path):
    model = hear_msm.create_model("ssam_tiny")
    save_pretrained(model, tmp_path / "w", dtype=torch.float16)
    lone = tmp_path / "elsewhere.safetensors"
    (tmp_path / "w" / "model.safetensors").rename(lone)
    loaded = hear_msm.load_model(lone)
    assert loaded.config == model.config
    half = {k: v.half().float() for k, v in model.state_dict().items()}
    _assert_same_weights(loaded, half)


def test_weights_of_another_size_or_family_are_named(tmp_path):
    run, _ = _official_run(tmp_path, "ssam_small")
    with pytest.raises(ValueError, match=r"for ssam_small .*but the model is ssam_tiny"):
        hear_msm.create_model("ssam_tiny", pretrained=str(run))
    with pytest.raises(ValueError, match=r"for ssam_small .*but the model is axlstm_small"):
        hear_msm.axlstm_small.load_model(str(run))


def test_checkpoint_for_no_known_architecture(tmp_path):
    state = random_official_state_dict("ssast_tiny")
    state.pop("pred.2.bias")
    torch.save({"model": state}, tmp_path / "checkpoint-1.pth")
    with pytest.raises(ValueError, match="cannot tell which architecture"):
        hear_msm.load_model(tmp_path / "checkpoint-1.pth")
    with pytest.raises(ValueError, match=r"missing keys \['pred.2.bias'\]"):
        hear_msm.create_model("ssast_tiny", pretrained=str(tmp_path / "checkpoint-1.pth"))


def test_missing_sources_and_bad_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a weight tag"):
        hear_msm.load_model(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="unsupported weight source"):
        hear_msm.load_model("s3://bucket/model")
    with pytest.raises(ValueError, match="no weight tag 'nope'"):
        hear_msm.create_model("ssam_tiny.nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        hear_msm.load_model(empty)


def test_defaults_are_the_published_weights_and_the_demo_tags_stay():
    published = {"ssamba": "as_ls_400", "mwmae": "audioset_r1"}  # others: audioset_as2m_r1
    for arch in hear_msm.list_models():
        if arch.startswith("mwmae_") and arch != "mwmae_base":
            assert _weights.default_tag(arch) is None, arch  # training presets: no published weights
            continue
        with torch.device("meta"):
            family = hear_msm.create_model(arch).config.family
        expected = published.get(family, "audioset_as2m_r1")
        assert _weights.default_tag(arch) == expected, arch
        assert expected in _weights.weight_tags(arch)
    assert _weights.shipped_tags() == ["ssast_tiny.debian_cpu_demo", "ssam_tiny.debian_cpu_demo",
                                       "axlstm_tiny.debian_cpu_demo"]
    for label in _weights.shipped_tags():  # explicit tags, offline, checksummed
        assert hear_msm.create_model(label).weights_source.startswith(label)


def test_official_tag_explains_how_to_get_the_weights():
    # conftest points HTTPS at a closed loopback port: the download fails at once, with the manual route
    with pytest.raises(FileNotFoundError, match=r"(?s)Google Drive.*ssam_base_200_16x4_4x256_fp16_r1.*hear-msm convert"):
        hear_msm.create_model("ssam_base.audioset_as2m_r1")
    with pytest.raises(FileNotFoundError, match=r"(?s)could not be reached.*hear-msm convert.*ssast_tiny\.debian_cpu_demo"):
        hear_msm.ssast_base.load_model("")


@pytest.fixture
def hub_repo(fake_hub, tmp_path, monkeypatch):
    """A hear_msm weights repo on the loopback hub; HF_ENDPOINT / HF_HUB_CACHE redirected."""
    model = hear_msm.create_model("axlstm_tiny")
    folder = save_pretrained(model, tmp_path / "upload")
    files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    fake_hub.add("msm/axlstm-demo", "v1", files)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    return model, fake_hub, sha256_of_file(folder / "model.safetensors")


def test_hub_uri_downloads_over_http(hub_repo):
    model, hub, _ = hub_repo
    loaded = hear_msm.load_model("hf://msm/axlstm-demo@v1")
    _assert_same_weights(loaded, model.state_dict())
    assert any(method == "GET" for method, _ in hub.requests)
    with pytest.raises(FileNotFoundError, match="msm/missing"):
        hear_msm.load_model("hf://msm/missing")
    with pytest.raises(FileNotFoundError, match="v9"):
        hear_msm.load_model("hf://msm/axlstm-demo@v9")


def test_registry_tag_on_the_hub_is_checksummed(hub_repo, monkeypatch):
    model, hub, digest = hub_repo
    registry = json.loads(json.dumps(_weights.load_registry()))
    tags = registry["axlstm_tiny"]["tags"]
    tags["hubdemo"] = {"source": "hub", "hub_repo": "msm/axlstm-demo", "revision": "v1", "sha256": digest}
    tags["tampered"] = {"source": "hub", "hub_repo": "msm/axlstm-demo", "revision": "v1", "sha256": "0" * 64}
    monkeypatch.setattr(_weights, "load_registry", lambda: registry)
    _assert_same_weights(hear_msm.create_model("axlstm_tiny.hubdemo"), model.state_dict())
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        hear_msm.create_model("axlstm_tiny.tampered")
    # the hf:// form of a registered repo + revision is checked against the registry too
    assert load_weights("hf://msm/axlstm-demo@v1").state_dict.keys() == model.state_dict().keys()


def test_save_refuses_to_overwrite(tmp_path):
    model = hear_msm.create_model("ssast_tiny")
    save_pretrained(model, tmp_path)
    with pytest.raises(FileExistsError):
        save_pretrained(model, tmp_path)
    assert load_file(str(tmp_path / "model.safetensors")).keys() == model.state_dict().keys()
