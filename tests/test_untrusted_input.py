"""Hostile and careless input: crafted .pth files, broken config.json / model.safetensors, bad arguments.

Every case must end in a ValueError or FileNotFoundError that names what is wrong: never a crash, a
hang, another exception type, or a silently wrong result. Crafted checkpoints are assembled here
from their parts (a protocol-2 pickle with chosen persistent ids, or raw opcodes; zip entries
written one by one), so that every field torch.save writes can be given a hostile value.
"""
import argparse
import collections
import io
import json
import math
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import hear_msm
from hear_msm import _torch_file, _weights
from hear_msm import training
from hear_msm.training import state as run_state
from hear_msm._checkpoint import read_official_checkpoint
from hear_msm._torch_file import load_torch_file
from hear_msm.models.encoder import FIELD_BOUNDS
from hear_msm.models.registry import config_classes

# ------------------------------------------------------------------------------------ crafting


class Storage:
    """Pickles as the persistent id torch.save writes for a storage record."""

    def __init__(self, key="0", storage_type=torch.FloatStorage, numel=4):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class Tensor:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset=0, size=(4,), stride=(1,), requires_grad=False, hooks=None):
        self.args = (storage, offset, size, stride, requires_grad,
                     collections.OrderedDict() if hooks is None else hooks)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Call:
    """Pickles as a call of `func` with `args` (REDUCE), optionally followed by BUILD(state)."""

    def __init__(self, func, args=(), state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda o: o.pid if isinstance(o, Storage) else None
    pickler.dump(obj)
    return buffer.getvalue()


def write_archive(path: Path, data_pkl: bytes, records=None, extra=None) -> Path:
    """A zip laid out as torch.save lays it out (entries stored, under one folder)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
        archive.writestr("archive/version", "3\n")
    return path


FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def crafted(tmp_path, obj, records=None, name="crafted.pth") -> Path:
    return write_archive(tmp_path / name, pickle_bytes(obj), {"0": FOUR_FLOATS} if records is None else records)


def refused(path, match=None, reader=load_torch_file):
    """Run `reader(path)`; it must raise ValueError naming the file (and matching `match`)."""
    with pytest.raises(ValueError) as info:
        reader(path)
    assert str(path) in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------ records


def test_record_declaring_more_elements_than_its_entry_is_refused_everywhere(tmp_path):
    # Today's torch.load reads past the 16-byte entry: leftover memory for a small overrun, a
    # segfault for a large one. Both must be refused before a tensor exists, by every reader.
    for numel in (5, 2**40):
        path = crafted(tmp_path, {"model": {"w": Tensor(Storage(numel=numel), size=(numel,))}}, name=f"o{numel}.pth")
        message = refused(path, "storage record archive/data/0 declares")
        assert f"{numel} torch.float32 elements ({4 * numel} bytes)" in message and "holds only 16 bytes" in message
        refused(path, "archive/data/0", reader=read_official_checkpoint)
        refused(path, "archive/data/0", reader=run_state.load_checkpoint)
        refused(path, "archive/data/0", reader=hear_msm.load_model)


def test_convert_cli_refuses_an_overrunning_record_and_writes_nothing(tmp_path):
    path = crafted(tmp_path, {"model": {"w": Tensor(Storage(numel=64), size=(64,))}})
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "hear_msm.cli", "convert", str(path), str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "archive/data/0 declares 64 torch.float32 elements" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("offset, size, stride, match", [
    (1, (4,), (1,), "reaches element 4, but the record holds 4 elements"),
    (0, (2, 2), (1, 3), "reaches element 4"),
    (0, (2,), (-1,), "non-negative integers"),
    (-1, (2,), (1,), "tensor offset -1"),
    (0, (2.0,), (1,), "non-negative integers"),
    (0, (2, 2), (1,), "size [2, 2] but stride [1]"),
    (0, (2**63,), (0,), "below 2**62"),
    (0, (8,), (0,), "overlapping strides"),
    (5, (0,), (1,), "offset 5 is past"),
    (0, [4], (1,), "must be a tuple"),
    ("0", (4,), (1,), "is not a non-negative integer"),
])
def test_tensor_views_must_stay_inside_their_record(tmp_path, offset, size, stride, match):
    path = crafted(tmp_path, {"w": Tensor(Storage(), offset, size, stride)})
    refused(path, match)


def test_views_inside_a_shared_record_load_as_saved(tmp_path):
    storage = Storage(numel=4)
    path = crafted(tmp_path, {"a": Tensor(storage, 1, (2, 2), (1, 1)), "b": Tensor(storage, 0, (4,), (1,)),
                              "empty": Tensor(storage, 4, (0,), (1,))})
    loaded = load_torch_file(path)
    assert torch.equal(loaded["a"], torch.tensor([[2.0, 3.0], [3.0, 4.0]]))
    assert loaded["a"].stride() == (1, 1) and loaded["empty"].shape == (0,)
    loaded["b"][1] = 9.0  # one record, one memory, as torch.load gives
    assert loaded["a"][0, 0] == 9.0


@pytest.mark.parametrize("storage_type, match", [
    ("FloatStorage", "storage type 'FloatStorage' is not accepted"),
    (torch.ComplexFloatStorage, "storage type torch.ComplexFloatStorage is not accepted"),
    (torch.UntypedStorage, "storage type torch.storage.UntypedStorage is not accepted"),
])
def test_storage_types_outside_the_allow_list(tmp_path, storage_type, match):
    path = crafted(tmp_path, {"w": Tensor(Storage(storage_type=storage_type))})
    refused(path, match)


def test_bad_storage_references(tmp_path):
    cases = {
        "missing.pth": ({"w": Tensor(Storage(key="7"))}, "archive/data/7 is missing"),
        "bare.pth": ({"s": Storage()}, "storage record outside a tensor"),
        "twice.pth": ({"a": Tensor(Storage()), "b": Tensor(Storage(storage_type=torch.IntStorage))},
                      "declared twice"),
        "negative.pth": ({"w": Tensor(Storage(numel=-1))}, "is not (key, device, element count)"),
        "grad.pth": ({"w": Tensor(Storage(storage_type=torch.LongStorage, numel=2), size=(2,), requires_grad=True)},
                     "requires_grad=True is not accepted for a torch.int64"),
        "hooks.pth": ({"w": Tensor(Storage(), hooks={1: 2})}, "backward hooks"),
    }
    for name, (obj, match) in cases.items():
        refused(crafted(tmp_path, obj, name=name), match)
    short = Storage()
    short.pid = ("storage", torch.FloatStorage, "0")
    refused(crafted(tmp_path, {"w": Tensor(short)}, name="short.pth"), "is not a torch storage reference")
    bools = crafted(tmp_path, {"w": Tensor(Storage(storage_type=torch.BoolStorage, numel=2), size=(2,))},
                    records={"0": b"\x01\x02"}, name="bool.pth")
    refused(bools, "bool values other than 0 and 1")


def test_compressed_overlapping_or_big_endian_archives(tmp_path):
    body = pickle_bytes({"w": Tensor(Storage())})
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/data/0", FOUR_FLOATS)
    refused(deflated, "is compressed")
    refused(write_archive(tmp_path / "two.pth", body, {"0": FOUR_FLOATS}, {"other/data.pkl": body}),
            "several data.pkl")
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(big, "w") as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", FOUR_FLOATS)
    refused(big, "only little-endian")
    # a central directory whose entry sizes add up to more than the file (overlapping entries)
    data = bytearray(crafted(tmp_path, {"w": Tensor(Storage())}, name="sizes.pth").read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last central directory header
    struct.pack_into("<I", data, at + 24, 10**8)  # its uncompressed size
    (tmp_path / "sizes.pth").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sizes.pth"):
        load_torch_file(tmp_path / "sizes.pth")


# ------------------------------------------------------------------------------------ pickle structure


def _opcodes(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _deep_tuple_key(depth: int) -> bytes:
    # {((((...)))): 1}: hashing the key recurses in C once per level
    return _opcodes(b"}", b")" + b"\x85" * depth, b"K\x01s")


def _deep_lists(depth: int) -> bytes:
    # {"args": [[[...]]]}
    return _opcodes(b"}X\x04\x00\x00\x00args", b"]" * depth + b"a" * (depth - 1), b"s")


def _shared_lists(levels: int) -> bytes:
    # x0 = []; x(i+1) = [x(i), x(i)]: 2**levels paths to the innermost list from 2 * levels opcodes
    body = b"]q\x000"  # EMPTY_LIST, BINPUT 0, POP: only the memo keeps each level
    for level in range(levels):
        body += b"(h%ch%clq%c0" % (level, level, level + 1)
    return _opcodes(body + b"h%c" % levels)


class _SelfReference:
    """A config record whose `_fields` contain the record itself."""

    def __reduce__(self):
        return argparse.Namespace, (), {"_fields": (self,)}


class _StateOfATensor:
    """BUILD on a rebuilt tensor: Tensor.__setstate__ would set_() it onto any storage and size."""

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, Tensor(Storage()).args, (Storage(), 0, (10**6,), (1,))


HOSTILE_PICKLES = {
    "deep tuple key": (_deep_tuple_key(300_000), "a dictionary key of type tuple"),
    "deep lists": (_deep_lists(100_000), f"nested more than {_torch_file.MAX_NESTING} levels"),
    "shared lists": (_shared_lists(60), f"more than {_torch_file.MAX_OBJECTS} objects"),
    "str of shared lists": (_opcodes(b"c__builtin__\nstr\n", _shared_lists(40)[2:-1], b"\x85R"),
                            "only scalar arguments"),
    "bytes of a huge size": (_opcodes(b"c__builtin__\nbytes\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R"),
                             "bytes(...) with arguments"),
    "bytearray8 of a huge size": (_opcodes(b"\x96" + struct.pack("<Q", 2**40)), "protocol-5 bytearrays"),
    "set of a tensor": (pickle_bytes(Call(set, ([Tensor(Storage())],))), "a set element of type Tensor"),
    "setitem on a tensor": (_opcodes(pickle_bytes(Tensor(Storage()))[2:-1], b"K\x00K\x01s"),
                            "adding items to a Tensor"),
    "state of a tensor": (pickle_bytes(_StateOfATensor()), "setting the state of a Tensor"),
    "self reference": (pickle_bytes({"args": _SelfReference()}), "refers to itself"),
    "constructing a dict": (_opcodes(b"c__builtin__\ndict\n)\x81"), "constructing builtins.dict"),
    "calling a dtype": (_opcodes(b"ctorch\nfloat32\n)R"), "calling"),
    "posix.system": (_opcodes(b"cposix\nsystem\nX\x04\x00\x00\x00true\x85R"), "'posix.system'"),
    "protocol-0 persistent id": (b"P0\n.", "is not a torch storage reference"),
    "memo miss": (_opcodes(b"h\x07"), "Memo value not found"),
    "empty": (b"", "EOFError"),
}


@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_quickly(tmp_path, name):
    data_pkl, match = HOSTILE_PICKLES[name]
    path = write_archive(tmp_path / "hostile.pth", data_pkl, {"0": FOUR_FLOATS})
    start = time.perf_counter()
    refused(path, match)
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------ fuzzing


def _valid_checkpoint(path: Path) -> Path:
    """An official-style checkpoint: tensors of several dtypes (one a strided view), AdamW state, a
    Namespace config, a set, bytes."""
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    model = collections.OrderedDict(weight=torch.randn(3, 4), half=torch.randn(5).half(),
                                    count=torch.arange(3), flags=torch.tensor([True, False]), strided=base.t()[1:3])
    params = [torch.nn.Parameter(torch.randn(2, 2))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones(2, 2)
    optimizer.step()
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "epoch": 3, "tags": {"a", "b"}, "raw": b"xy",
                "args": argparse.Namespace(seed=0, dims=(200, 80))}, path)
    return path


def _rezip(source: Path, target: Path, replace: dict) -> Path:
    """A copy of `source` with some entries' bytes replaced (and fresh CRCs, so the reader sees them)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, replace.get(info.filename, old.read(info)))
    return target


def _outcome(path: Path) -> str:
    try:
        load_torch_file(path)
    except (ValueError, FileNotFoundError) as error:
        assert str(path) in str(error) or isinstance(error, FileNotFoundError), error
        return "refused"
    return "loaded"


def test_fuzzed_checkpoints_load_or_fail_with_value_error(tmp_path):
    """Truncations, bit flips (of the file, and of data.pkl behind a valid CRC), changed integer
    fields (element counts, sizes, strides, offsets) and changed zip size fields: every mutant
    either loads or raises ValueError naming the file; nothing else, and nothing slow."""
    original = _valid_checkpoint(tmp_path / "valid.pth")
    assert _outcome(original) == "loaded"
    data = original.read_bytes()
    with zipfile.ZipFile(original) as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        data_pkl = archive.read(pickle_name)
    rng = random.Random(0)
    mutants = []
    for cut in sorted({*range(0, 64), *rng.sample(range(len(data)), 80)}):
        mutants.append(("truncated file", data[:cut]))
    for _ in range(150):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        mutants.append(("bit flip in the file", bytes(flipped)))
    for _ in range(150):
        flipped = bytearray(data_pkl)
        flipped[rng.randrange(len(data_pkl))] ^= 1 << rng.randrange(8)
        mutants.append(("bit flip in data.pkl", {pickle_name: bytes(flipped)}))
    for cut in rng.sample(range(len(data_pkl)), 40):
        mutants.append(("truncated data.pkl", {pickle_name: data_pkl[:cut]}))
    # every integer the pickle holds (numel, sizes, strides, offsets, epoch, step) set to hostile values
    for opcode, value, position in pickletools.genops(data_pkl):
        if opcode.name in ("BININT1", "BININT2", "BININT"):
            width = {"BININT1": 1, "BININT2": 2, "BININT": 4}[opcode.name]
            for new in (0, value + 1, max(value - 1, 0), 2 ** (8 * width - 1) - 1):
                changed = bytearray(data_pkl)
                changed[position + 1: position + 1 + width] = (new % 2 ** (8 * width)).to_bytes(width, "little")
                mutants.append(("integer field", {pickle_name: bytes(changed)}))
    # zip size fields (local and central headers) enlarged and shrunk
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (at := data.find(signature, start)) != -1:
            for new in (0, 1, 2**31 - 1, 2**32 - 1):
                changed = bytearray(data)
                struct.pack_into("<I", changed, at + field, new)
                mutants.append(("zip size field", bytes(changed)))
            start = at + 4

    outcomes = collections.Counter()
    slowest = 0.0
    for index, (kind, mutant) in enumerate(mutants):
        path = tmp_path / f"mutant{index}.pth"
        if isinstance(mutant, dict):
            _rezip(original, path, mutant)
        else:
            path.write_bytes(mutant)
        start = time.perf_counter()
        outcomes[kind, _outcome(path)] += 1
        slowest = max(slowest, time.perf_counter() - start)
        path.unlink()
    print(f"\n{len(mutants)} mutants, slowest {slowest:.3f} s:", dict(sorted(outcomes.items())))
    assert slowest < 2.0
    assert outcomes["truncated file", "loaded"] == 0
    assert sum(n for (kind, result), n in outcomes.items() if result == "refused") > len(mutants) // 2


def test_files_that_are_not_torch_archives(tmp_path):
    cases = {
        "empty.pth": b"",
        "text.pth": b"not a checkpoint at all\n",
        "random.pth": bytes(random.Random(1).randrange(256) for _ in range(4096)),
        "gzip.pth": b"\x1f\x8b\x08\x00" + bytes(100),
        "raw_pickle.pth": pickle.dumps({"w": 1}),
        "zip_without_pickle.pth": None,
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is None:
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("readme.txt", "hello")
        else:
            path.write_bytes(data)
        refused(path, "not a PyTorch checkpoint")
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    refused(legacy, "not a PyTorch checkpoint")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path)


# ------------------------------------------------------------------------------------ legitimate files


def test_dataparallel_state_dict_with_long_scalars_reads_like_torch_load(tmp_path):
    # the SSAMBA Hub files: a bare OrderedDict, keys prefixed `module.`, FloatStorage and 0-dim LongStorage
    state = collections.OrderedDict()
    state["module.cls_token"] = torch.randn(1, 1, 8)
    state["module.p_input_fdim"] = torch.tensor(128)
    state["module.p_input_tdim"] = torch.tensor(1024)
    state["module.blocks.0.mixer.A_b_log"] = torch.randn(16, 4)
    path = tmp_path / "ssamba_tiny_400.pth"
    torch.save(state, path)
    checkpoint = read_official_checkpoint(path)
    reference = torch.load(path, weights_only=True)
    assert list(checkpoint.state_dict) == list(reference)
    for key, tensor in reference.items():
        assert checkpoint.state_dict[key].dtype == tensor.dtype and torch.equal(checkpoint.state_dict[key], tensor)
    assert checkpoint.state_dict["module.p_input_tdim"].shape == () and checkpoint.state_dict["module.p_input_tdim"] == 1024


def _assert_identical(ours, reference, where="payload"):
    """Same types, keys in the same order, tensors of the same dtype, shape, strides and bits."""
    assert type(ours) is type(reference), where
    if isinstance(reference, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.requires_grad) == \
            (reference.dtype, reference.shape, reference.stride(), reference.requires_grad), where
        assert torch.equal(ours, reference), where
    elif isinstance(reference, dict):
        assert list(ours) == list(reference), where
        for key in reference:
            _assert_identical(ours[key], reference[key], f"{where}[{key!r}]")
        assert getattr(ours, "_metadata", None) == getattr(reference, "_metadata", None), where
    elif isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            _assert_identical(a, b, f"{where}[{i}]")
    else:
        assert ours == reference or (isinstance(ours, float) and math.isnan(ours) and math.isnan(reference)), where


def test_training_checkpoint_reads_exactly_as_saved(tmp_path):
    """A real pretraining run's checkpoint.pt (model, AdamW, schedule, scaler, Python / NumPy / torch
    RNG states, config) reads back identical to torch.load(weights_only=True) of the same file."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(4):
        t = np.arange(40000) / 16000
        sf.write(audio / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
    config = training.TrainConfig(model="ssast_tiny", model_overrides={"depth": 1}, data=str(audio), batch_size=2,
                                  steps=2, warmup_steps=1, checkpoint_every=1, log_every=1, progress=False, seed=0,
                                  decoder_depth=1)
    training.train(config, tmp_path / "run")
    path = tmp_path / "run" / run_state.CHECKPOINT_NAME
    ours = run_state.load_checkpoint(path)
    _assert_identical(ours, torch.load(path, map_location="cpu", weights_only=True))
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "decoder"} <= set(ours)
    # the RNG states restore: the next draws equal those after restoring torch.load's copy
    run_state.set_rng_state(ours["rng"])
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    run_state.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())


# ------------------------------------------------------------------------------------ config.json


@pytest.fixture
def weights_folder(tmp_path):
    model = hear_msm.create_model("ssast_tiny")
    return _weights.save_pretrained(model, tmp_path / "weights"), model


CONFIG_CASES = {
    "invalid JSON": ('{"arch": "ssast_tiny", ', "not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "deeply nested JSON": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "embed_dim 192.0": ({"embed_dim": 192.0}, "'embed_dim' must be an integer, got 192.0"),
    "norm_eps 'nan'": ({"norm_eps": "nan"}, "'norm_eps' must be a finite number, got 'nan'"),
    "norm_eps NaN": ('NaN', "'norm_eps' must be a finite number, got nan"),
    "depth a list": ({"depth": [12]}, "'depth' must be an integer, got [12]"),
    "depth true": ({"depth": True}, "'depth' must be an integer, got True"),
    "depth 400": ({"depth": 400}, "'depth' = 400 is outside the accepted range [1, 48]"),
    "embed_dim huge": ({"embed_dim": 10**9}, "'embed_dim' = 1000000000 is outside the accepted range [4, 2048]"),
    "norm_eps negative": ({"norm_eps": -1e-6}, "'norm_eps' = -1e-06 is outside the accepted range"),
    "mlp_ratio infinite": ('Infinity', "'mlp_ratio' must be a finite number, got inf"),
    "patch_frames 0": ({"patch_frames": 0}, "'patch_frames' = 0 is outside the accepted range [1, 64]"),
    "too many tokens": ({"num_frames": 4096, "num_mels": 512}, "at most 24576 are accepted"),
    "arch with a path": ({"arch": "../../etc"}, "'arch' must be up to 64 letters"),
    "missing field": ({"num_heads": None}, "lacks the fields ['num_heads']"),
    "unknown field": ({"bogus": 1}, "unknown fields ['bogus']"),
    "unknown family": ({"family": "lstm"}, "config family 'lstm' (str) is unknown"),
    "format version": ({"format_version": 2}, "format_version 2 (int) is not supported"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_json_is_refused_before_a_model_is_built(weights_folder, monkeypatch, name):
    folder, _ = weights_folder
    change, match = CONFIG_CASES[name]
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if isinstance(change, dict):
        config.update(change)
        config = {k: v for k, v in config.items() if v is not None}
        config_file.write_text(json.dumps(config))
    elif change in ("NaN", "Infinity"):
        field = "norm_eps" if change == "NaN" else "mlp_ratio"
        config_file.write_text(json.dumps(config).replace(f'"{field}": {json.dumps(config[field])}', f'"{field}": {change}'))
    else:
        config_file.write_text(change)
    monkeypatch.setattr(_weights, "build_from_config", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(_weights, "load_file", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(ValueError) as info:
        hear_msm.load_model(folder)
    assert str(config_file) in str(info.value) and match in str(info.value), str(info.value)


def test_config_larger_than_its_weights_is_refused_on_the_meta_device(weights_folder, monkeypatch):
    # within every bound, but 48 x 2048: its weights do not match, and nothing of it is allocated
    folder, _ = weights_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": 48, "embed_dim": 2048, "num_heads": 16}))
    devices = []
    build = _weights.build_from_config

    def recording_build(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return build(*args, **kwargs)

    monkeypatch.setattr(_weights, "build_from_config", recording_build)
    with pytest.raises(ValueError, match="weights do not fit ssast_tiny"):
        hear_msm.load_model(folder)
    assert devices == ["meta"]


def test_every_numeric_config_field_has_bounds_and_presets_fit_them():
    for family, cls in config_classes().items():
        for name, kind in typing.get_type_hints(cls).items():
            if kind in (int, float):
                assert name in FIELD_BOUNDS, f"{family}.{name} has no entry in FIELD_BOUNDS"
    for arch in hear_msm.list_models():
        with torch.device("meta"):
            hear_msm.create_model(arch).config.validate()
    with pytest.raises(ValueError, match="'depth' = 0 is outside"):
        hear_msm.MambaConfig(arch="ssam_tiny", embed_dim=192, depth=0)


# ------------------------------------------------------------------------------------ model.safetensors


def test_truncated_or_corrupt_safetensors_names_the_file(weights_folder):
    folder, _ = weights_folder
    weights_file = folder / "model.safetensors"
    data = weights_file.read_bytes()
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        weights_file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file") as info:
            hear_msm.load_model(folder)
        assert str(weights_file) in str(info.value)
    weights_file.write_bytes(struct.pack("<Q", 20) + b'{"a": not json}    ' + bytes(64))
    with pytest.raises(ValueError, match=str(weights_file)):
        hear_msm.load_model(folder)
    lone = folder / "lone.safetensors"
    lone.write_bytes(data[:50])
    with pytest.raises(ValueError, match=str(lone)):
        hear_msm.load_model(lone)


@pytest.mark.parametrize("change, match", [
    ("nan", "hold NaN or infinite values"),
    ("inf", "hold NaN or infinite values"),
    ("float64 overflow", "hold NaN or infinite values (in torch.float32)"),
    ("int64", "weights of the wrong dtype: encoder_norm.weight (torch.int64)"),
    ("bool", "weights of the wrong dtype: encoder_norm.weight (torch.bool)"),
])
def test_non_finite_or_wrong_dtype_weights_are_refused(weights_folder, change, match):
    folder, model = weights_folder
    weights_file = folder / "model.safetensors"
    tensors = load_file(str(weights_file))
    key = "encoder_norm.weight"
    if change in ("nan", "inf"):
        tensors[key] = tensors[key].clone()
        tensors[key][3] = float(change)
    elif change == "float64 overflow":
        tensors[key] = tensors[key].double()
        tensors[key][0] = 1e300
    else:
        tensors[key] = tensors[key].to(getattr(torch, change))
    save_file(tensors, str(weights_file))
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        hear_msm.load_model(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(ValueError, match=re.escape(match)):
        hear_msm.create_model("ssast_tiny", pretrained=str(folder))


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("call, match", [
    (lambda: hear_msm.create_model(None), "model name must be a string"),
    (lambda: hear_msm.create_model(123), "model name must be a string"),
    (lambda: hear_msm.create_model("ssast_tiny", pretrained=None), "pretrained must be False"),
    (lambda: hear_msm.create_model("ssast_tiny", pretrained=0), "pretrained must be False"),
    (lambda: hear_msm.create_model("ssast_tiny", pretrained=1.5), "pretrained must be False"),
    (lambda: hear_msm.create_model("ssast_tiny.debian_cpu_demo", pretrained=0), "pretrained must be False"),
    (lambda: hear_msm.load_model(None), "a weight source must be a string or a path"),
    (lambda: hear_msm.load_model(0), "a weight source must be a string or a path"),
    (lambda: hear_msm.load_model(b"ssast_tiny.debian_cpu_demo"), "a weight source must be a string or a path"),
])
def test_bad_model_arguments_say_what_is_accepted(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "accepted" in str(info.value) or "one of" in str(info.value)

