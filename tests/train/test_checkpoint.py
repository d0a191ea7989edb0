import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_toys import TinyNet

from cvzoo.train.checkpoint import (
    FORMAT,
    LAST,
    PREVIOUS,
    VERSION,
    CheckpointError,
    capture_rng_state,
    export_safetensors,
    find_resumable,
    load_checkpoint,
    load_model_state,
    load_safetensors,
    restore_rng_state,
    save_checkpoint,
    save_rotating,
    strip_wrapper_prefixes,
)


def _state(step: int = 3) -> dict:
    model = TinyNet()
    return {"model": model.state_dict(), "step": step, "rng": [capture_rng_state()], "history": [{"step": 1.0}]}


def test_round_trip_and_format_tag(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "a.pt")
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == VERSION and loaded["step"] == 3
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert torch.load(path, weights_only=True)["step"] == 3  # a plain weights-only torch.load reads it
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = save_checkpoint(_state(step=1), tmp_path / "a.pt")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(step=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_truncated_file_raises_naming_it(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "a.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.pt.*truncated"):
        load_checkpoint(path)


def test_bit_flip_in_tensor_data_raises(tmp_path):
    path = save_checkpoint({"model": {"w": torch.randn(10_000)}}, tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor record: torch.load alone would read it silently
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.pt.*corrupted: CRC mismatch"):
        load_checkpoint(path)


def test_plain_state_dict_is_foreign(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt.*not a cvzoo training checkpoint.*plain state_dict"):
        load_checkpoint(path)


def test_other_pickle_and_other_checkpoints_are_foreign(tmp_path):
    pkl = tmp_path / "other.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"cls": nn.Linear}, f)
    with pytest.raises(CheckpointError, match=r"other\.pkl.*(truncated|cannot be loaded)"):
        load_checkpoint(pkl)
    needs_pickle = tmp_path / "unsafe.pt"
    torch.save({"format": FORMAT, "version": 1, "model": {}, "obj": nn.Linear(2, 2)}, needs_pickle)
    with pytest.raises(CheckpointError, match=r"unsafe\.pt.*cannot be loaded with weights_only=True"):
        load_checkpoint(needs_pickle)
    lightning_like = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, lightning_like)
    with pytest.raises(CheckpointError, match=r"without the 'cvzoo.train.checkpoint' format tag"):
        load_checkpoint(lightning_like)
    newer = tmp_path / "newer.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1, "model": {}}, newer)
    with pytest.raises(CheckpointError, match="format version 2"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rotation_keeps_the_last_two(tmp_path):
    for step in (1, 2, 3):
        save_rotating(_state(step), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREVIOUS]
    assert load_checkpoint(tmp_path / LAST)["step"] == 3
    assert load_checkpoint(tmp_path / PREVIOUS)["step"] == 2


def test_find_resumable_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    assert find_resumable(tmp_path) is None
    save_rotating(_state(1), tmp_path)
    save_rotating(_state(2), tmp_path)
    path, state = find_resumable(tmp_path)
    assert path.name == LAST and state["step"] == 2
    (tmp_path / LAST).write_bytes((tmp_path / LAST).read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="cvzoo.train"):
        path, state = find_resumable(tmp_path)
    assert path.name == PREVIOUS and state["step"] == 1
    assert "previous checkpoint" in caplog.text and "truncated" in caplog.text
    (tmp_path / LAST).unlink()  # killed between the two renames of a rotation
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvzoo.train"):
        assert find_resumable(tmp_path)[1]["step"] == 1
    assert "is missing" in caplog.text
    (tmp_path / PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(tmp_path)


def test_prefixes_of_compiled_and_ddp_models_are_stripped():
    model = TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    data_parallel = nn.DataParallel(compiled)  # CPU DataParallel: a plain wrapper with DDP's "module." keys
    keys = list(data_parallel.state_dict())
    assert all(k.startswith("module._orig_mod.") for k in keys)
    plain = TinyNet().eval()
    load_model_state(plain, data_parallel.state_dict())
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    assert strip_wrapper_prefixes({"backbone._orig_mod.w": 1, "module.x": 2}) == {"backbone.w": 1, "module.x": 2}


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in the NumPy state
    save_checkpoint({"model": {}, "rng": capture_rng_state()}, tmp_path / "a.pt")
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "a.pt")["rng"])
    got = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4, bias=False)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight  # tied
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.second(self.first(x)) * self.scale


def test_export_and_load_safetensors(tmp_path):
    model = TinyNet().eval()
    path = export_safetensors(torch.compile(model, backend="eager"), tmp_path / "w" / "model.safetensors")
    tensors = load_file(path)
    assert set(tensors) == set(model.state_dict())  # plain keys, buffers included
    fresh = load_safetensors(TinyNet().eval(), path)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    tied = _Tied()
    with torch.no_grad():
        tied.scale.fill_(3.0)
    export_safetensors(tied, tmp_path / "tied.safetensors")
    back = load_safetensors(_Tied(), tmp_path / "tied.safetensors")
    assert back.second.weight is back.first.weight
    y = torch.randn(2, 4)
    torch.testing.assert_close(back(y), tied(y), rtol=0, atol=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_load_safetensors_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*does not exist"):
        load_safetensors(TinyNet(), tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*cannot be read"):
        load_safetensors(TinyNet(), bad)
