"""cvzoo/backbones/weights.py: reading state dicts from files and loading them with full coverage."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cvzoo.backbones import load_pretrained, read_state_dict


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_read_state_dict_pth_and_unwraps_checkpoints(tmp_path, wrapper):
    state = _small_net().state_dict()
    path = tmp_path / "w.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    _assert_same_state(read_state_dict(path), state)
    _assert_same_state(read_state_dict(str(path)), state)


def test_read_state_dict_safetensors(tmp_path):
    state = {k: v.contiguous() for k, v in _small_net().state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    _assert_same_state(read_state_dict(path), state)


def test_read_state_dict_missing_file_names_the_path(tmp_path):
    path = tmp_path / "does_not_exist.pth"
    with pytest.raises(ValueError, match="does_not_exist.pth"):
        read_state_dict(path)


def test_read_state_dict_rejects_non_mapping(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(path)


def test_load_pretrained_false_is_a_no_op():
    net = _small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert load_pretrained(net, False, None) is net
    _assert_same_state(net.state_dict(), before)


def test_load_pretrained_true_without_url_raises():
    with pytest.raises(ValueError, match="pretrained=True"):
        load_pretrained(_small_net(), True, None)


def test_load_pretrained_loads_and_ignores_extra_keys(tmp_path):
    source = _small_net()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = dict(source.state_dict())
    state["classifier.weight"] = torch.randn(10, 2)  # keys the module lacks are ignored
    path = tmp_path / "w.pth"
    torch.save(state, path)
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    load_pretrained(target, str(path), None)
    _assert_same_state(target.state_dict(), source.state_dict())


def test_load_pretrained_missing_keys_raise(tmp_path):
    state = dict(_small_net().state_dict())
    del state["1.running_var"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1\.running_var"):
        load_pretrained(_small_net(), path, None)


def test_load_pretrained_wrong_shapes_raise(tmp_path):
    state = dict(_small_net().state_dict())
    state["3.weight"] = torch.zeros(5, 4, 1, 1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"3\.weight"):
        load_pretrained(_small_net(), path, None)


def test_load_pretrained_applies_convert(tmp_path):
    source = _small_net()
    path = tmp_path / "w.pth"
    torch.save({"prefix." + k: v for k, v in source.state_dict().items()}, path)
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    load_pretrained(target, path, None, convert=lambda s: {k.removeprefix("prefix."): v for k, v in s.items()})
    _assert_same_state(target.state_dict(), source.state_dict())
