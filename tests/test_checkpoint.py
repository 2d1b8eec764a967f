"""Reading the authors' ``.pth`` checkpoints without executing pickled code.

Checkpoints are written the way the official ``train.py`` writes them: ``torch.save`` of a dict
with the model state dict, a stepped AdamW state dict, the epoch, a GradScaler state dict and an
``argparse.Namespace`` whose ``config`` is an ``ml_collections.ConfigDict``.  ``ml_collections``
is not installed, so a minimal look-alike package (same module path and class names, and the
same pickling: default ``__reduce_ex__`` → NEWOBJ + BUILD of ``__dict__``, a ``__setstate__``
that rebuilds ``_fields``) is written to a temp folder and used only in the subprocess that
saves; the test process then loads without it being importable.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from hear_msm._checkpoint import OfficialCheckpoint, find_official_checkpoint, read_official_checkpoint

# Mirrors how ml_collections 1.x pickles: ConfigDict/FieldReference define no __reduce__, so
# protocol 2 emits NEWOBJ(cls) + BUILD(instance __dict__); ConfigDict.__setstate__ re-runs
# __init__ and re-inserts `_fields` (nested dicts were converted to ConfigDicts on assignment).
FAKE_CONFIG_DICT = '''
class FieldReference:
    def __init__(self, default, field_type=None):
        self._value = default
        self._field_type = field_type or type(default)
        self._ops = []
        self._required = False

    def __setstate__(self, state):
        self._value = state["_value"]
        self._field_type = state["_field_type"]
        self._ops = state["_ops"]
        self._required = state.get("_required", False)


class ConfigDict:
    def __init__(self, initial_dictionary=None, type_safe=True, convert_dict=True):
        object.__setattr__(self, "_fields", {})
        object.__setattr__(self, "_locked", False)
        object.__setattr__(self, "_type_safe", type_safe)
        object.__setattr__(self, "_convert_dict", convert_dict)
        object.__setattr__(self, "_allow_dotted_keys", False)
        for key, value in (initial_dictionary or {}).items():
            self[key] = value

    def __setitem__(self, key, value):
        if isinstance(value, dict) and self._convert_dict:
            value = ConfigDict(value, self._type_safe)
        self._fields[key] = value

    def __getitem__(self, key):
        value = self._fields[key]
        return value._value if isinstance(value, FieldReference) else value

    def __setattr__(self, key, value):
        self[key] = value

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(err)

    def lock(self):
        object.__setattr__(self, "_locked", True)

    def __setstate__(self, state):
        self.__init__()
        object.__setattr__(self, "_type_safe", state["_type_safe"])
        object.__setattr__(self, "_convert_dict", state.get("_convert_dict", True))
        for key in state["_fields"]:
            self[key] = state["_fields"][key]
        if state["_locked"]:
            object.__setattr__(self, "_locked", True)
'''

# Runs in a subprocess with the fake ml_collections on PYTHONPATH.  Writes a run folder with
# epochs 9, 10 and 99, plus `expected.pt` (the epoch-99 model state dict, tensors only).
SAVE_SCRIPT = '''
import argparse, sys
from pathlib import Path
import torch
import ml_collections

run = Path(sys.argv[1])
(run / "checkpoints").mkdir(parents=True)
torch.manual_seed(0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(1, 8, kernel_size=(4, 16), stride=(4, 16))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 251, 8), requires_grad=False)
        self.norm = torch.nn.LayerNorm(8, eps=1e-6)
        self.head = torch.nn.Linear(8, 64)
        self.register_buffer("half_buffer", torch.randn(3, 5).half())
        self.register_buffer("count", torch.arange(7))
        self.register_buffer("flags", torch.tensor([True, False]))
        # A view with an offset and non-trivial strides into a shared storage.
        base = torch.randn(6, 4)
        self.register_buffer("strided", base.t()[1:3])

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, 250, 8]
        return self.head(self.norm(tokens + self.pos_embed[:, 1:]))


model = Tiny()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
scaler = torch.amp.GradScaler("cpu")
model(torch.randn(2, 1, 200, 80)).square().mean().backward()
optimizer.step()

config = ml_collections.ConfigDict()
config.model = ml_collections.ConfigDict()
config.model.arch = sys.argv[2]
config.model.model_args = {"img_size": (200, 80), "patch_size": (4, 16), "mask_ratio": 0.5}
config.data = ml_collections.ConfigDict()
config.data.num_frames = ml_collections.FieldReference(200)
config.data.train_dirs = ["a", "b"]
config.lock()
args = argparse.Namespace(config=config, workdir=str(run), seed=0, precision="float16",
                          output_dir=str(run / "checkpoints"))

for epoch in (9, 10, 99):
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler.state_dict(), "args": args},
               run / "checkpoints" / f"checkpoint-{epoch}.pth")
torch.save(dict(model.state_dict()), run / "expected.pt")
'''


def _write_fake_ml_collections(root: Path) -> None:
    package = root / "ml_collections"
    (package / "config_dict").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from ml_collections.config_dict import ConfigDict, FieldReference\n"
    )
    (package / "config_dict" / "__init__.py").write_text(
        "from .config_dict import ConfigDict, FieldReference\n"
    )
    (package / "config_dict" / "config_dict.py").write_text(textwrap.dedent(FAKE_CONFIG_DICT))


@pytest.fixture(scope="module")
def official_run(tmp_path_factory) -> Path:
    """A run folder ``<run>/checkpoints/checkpoint-{9,10,99}.pth`` saved like the authors' code."""
    root = tmp_path_factory.mktemp("official")
    fake = root / "fake_site"
    _write_fake_ml_collections(fake)
    run = root / "mamba_ssast_tiny_run"
    env = {**os.environ, "PYTHONPATH": str(fake), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", SAVE_SCRIPT, str(run), "mamba_ssast_tiny"], env=env, check=True, timeout=300
    )
    return run


def test_ml_collections_is_not_importable_here():
    # The whole point: the loader must not need (or import) the config library.
    assert importlib.util.find_spec("ml_collections") is None


def test_full_training_checkpoint_round_trips(official_run):
    expected = torch.load(official_run / "expected.pt", weights_only=True)
    checkpoint = read_official_checkpoint(official_run / "checkpoints" / "checkpoint-10.pth")

    assert isinstance(checkpoint, OfficialCheckpoint)
    assert checkpoint.epoch == 10
    assert checkpoint.arch == "mamba_ssast_tiny"
    assert list(checkpoint.state_dict) == list(expected)
    for key, tensor in expected.items():
        loaded = checkpoint.state_dict[key]
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, key
        assert torch.equal(loaded, tensor), key
        assert loaded.device.type == "cpu"
    assert "ml_collections" not in sys.modules


def test_config_is_readable_without_ml_collections(official_run):
    config = read_official_checkpoint(official_run).config
    assert config["model"]["model_args"] == {"img_size": (200, 80), "patch_size": (4, 16), "mask_ratio": 0.5}
    assert config["data"]["num_frames"] == 200  # FieldReference unwrapped
    assert config["data"]["train_dirs"] == ["a", "b"]


def test_run_folder_and_checkpoints_folder_pick_newest_epoch(official_run):
    newest = official_run / "checkpoints" / "checkpoint-99.pth"
    assert find_official_checkpoint(official_run) == newest
    assert find_official_checkpoint(official_run / "checkpoints") == newest
    assert find_official_checkpoint(str(newest)) == newest
    checkpoint = read_official_checkpoint(official_run)
    assert checkpoint.epoch == 99 and checkpoint.path == newest


def test_newest_epoch_is_compared_as_integer(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("checkpoint-9.pth", "checkpoint-10.pth", "checkpoint-best.pth", "checkpoint-3.pth.tmp"):
        (folder / name).write_bytes(b"")
    assert find_official_checkpoint(tmp_path) == folder / "checkpoint-10.pth"


def test_missing_paths_raise_actionable_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_official_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-<epoch>\.pth"):
        read_official_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"last\.pth"):
        find_official_checkpoint(tmp_path)


def test_plain_state_dict_and_model_only_files(tmp_path):
    state = {"pos_embed": torch.randn(1, 251, 4), "blocks.0.mixer.A_log": torch.rand(12, 24).double()}
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state}, tmp_path / "model_only.pth")
    for name in ("plain.pth", "model_only.pth"):
        checkpoint = read_official_checkpoint(tmp_path / name)
        assert checkpoint.epoch is None and checkpoint.arch is None and checkpoint.config is None
        assert checkpoint.state_dict.keys() == state.keys()
        assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state.items())


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_official_checkpoint(text)

    archive = tmp_path / "archive.pth"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_official_checkpoint(archive)

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="no model state dict"):
        read_official_checkpoint(tmp_path / "list.pth")

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "scripted.pth"))
    with pytest.raises(ValueError, match="TorchScript"):
        read_official_checkpoint(tmp_path / "scripted.pth")


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


def test_pickled_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1, "args": _RunsShell(f"touch {marker}")}, path)

    with pytest.raises(ValueError, match=rf"refusing to load .*'{os.system.__module__}\.system'") as info:
        read_official_checkpoint(path)
    assert "only tensors and config records are accepted" in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_pickled_eval_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = _Evals(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    torch.save({"w": torch.ones(2), "x": payload}, path)
    with pytest.raises(ValueError, match="'builtins.eval'"):
        read_official_checkpoint(path)
    assert not marker.exists()


def test_code_hidden_in_optimizer_state_is_refused(tmp_path):
    # Unpickling builds the whole file, so code in an entry the reader ignores must be refused too.
    marker = tmp_path / "pwned"
    path = tmp_path / "hooks.pth"
    torch.save({"model": {"w": torch.ones(1)}, "optimizer": {"state": {0: _RunsShell(f"touch {marker}")}}}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        read_official_checkpoint(path)
    assert not marker.exists()
