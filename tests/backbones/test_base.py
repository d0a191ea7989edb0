"""cvzoo/backbones/base.py: stage freezing, gradient checkpointing, memory format and compile, over own backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvzoo.backbones import ConvNeXt, ResNet, convnext_micro, resnet_micro

BUILDERS = {"resnet_micro": resnet_micro, "convnext_micro": convnext_micro}

# parameter-name prefixes of [stem, stage 0, stage 1, stage 2, stage 3], written out independently of the code
PARTS = {
    "resnet_micro": (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)),
    "convnext_micro": (("stem.",), ("stages.0.",), ("stages.1.",), ("stages.2.",), ("stages.3.",)),
}


def _part_of(builder_name: str, param_name: str) -> int:
    for i, prefixes in enumerate(PARTS[builder_name]):
        if param_name.startswith(prefixes):
            return i
    raise AssertionError(f"{param_name} belongs to no part")


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.LayerNorm)]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages_requires_grad_and_grads(name, frozen_stages):
    model = BUILDERS[name](out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages).train()
    assert model.frozen_stages == frozen_stages
    for pname, p in model.named_parameters():
        assert p.requires_grad is (_part_of(name, pname) > frozen_stages), pname
    if frozen_stages == 4:
        return  # nothing left to train
    sum(f.mean() for f in model(torch.randn(2, 3, 64, 64))).backward()
    for pname, p in model.named_parameters():
        if _part_of(name, pname) <= frozen_stages:
            assert p.grad is None, pname


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_batchnorm_stays_eval_and_keeps_statistics(frozen_stages):
    model = resnet_micro(out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages)
    model.train()
    norms = _norms(model)
    before = {n: m.running_mean.clone() for n, m in norms}
    model(torch.randn(2, 3, 64, 64))
    for n, m in norms:
        frozen = _part_of("resnet_micro", n + ".") <= frozen_stages
        assert m.training is not frozen, n
        assert torch.equal(m.running_mean, before[n]) is frozen, n
    model.eval()
    assert not any(m.training for _, m in norms)
    model.train()
    trainable = [n for n, _ in norms if _part_of("resnet_micro", n + ".") > frozen_stages]
    assert [n for n, m in norms if m.training] == trainable


def test_freeze_then_unfreeze():
    model = resnet_micro(frozen_stages=2)
    model.freeze_stages(-1)
    assert model.frozen_stages == -1
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(("out_indices", "bad"), [((1, 2, 3), 5), ((1, 2, 3), -2), ((0, 1), 3)])
def test_frozen_stages_out_of_range_raises(name, out_indices, bad):
    with pytest.raises(ValueError, match="frozen_stages"):
        BUILDERS[name](out_indices=out_indices, frozen_stages=bad)
    model = BUILDERS[name](out_indices=out_indices)
    with pytest.raises(ValueError, match=str(bad)):
        model.freeze_stages(bad)


def test_frozen_stages_up_to_the_last_built_stage():
    model = convnext_micro(out_indices=(0, 1), frozen_stages=2)  # stem + the two built stages
    assert not any(p.requires_grad for p in model.parameters())


def _counting(forward, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet_micro", {}), ("convnext_micro", {}), ("convnext_micro", {"drop_path_rate": 0.3})],
)
def test_grad_checkpointing_same_outputs_and_grads(name, kwargs):
    torch.manual_seed(0)
    model = BUILDERS[name](out_indices=(0, 1, 2, 3), **kwargs).train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad()
        torch.manual_seed(123)  # the same drop-path draws in both runs
        feats = model(x)
        sum((f * torch.linspace(-1, 1, f.shape[1]).view(1, -1, 1, 1)).square().mean() for f in feats).backward()
        return [f.detach() for f in feats], {n: p.grad.clone() for n, p in model.named_parameters()}

    stages = model.stages() if isinstance(model, ResNet) else list(model.stages)
    calls = []  # forward runs of the stages; hooks do not fire on recomputation, so wrap forward itself
    for stage in stages:
        stage.forward = _counting(stage.forward, calls)

    plain_out, plain_grad = run()
    assert len(calls) == len(stages)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    calls.clear()
    ckpt_out, ckpt_grad = run()
    assert len(calls) == 2 * len(stages)  # each stage recomputed in backward
    for a, b in zip(ckpt_out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert set(ckpt_grad) == set(plain_grad)
    for n in plain_grad:
        torch.testing.assert_close(ckpt_grad[n], plain_grad[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_grad_checkpointing_only_when_training_with_grad(name):
    model = BUILDERS[name](grad_checkpointing=True)
    assert model.grad_checkpointing and not BUILDERS[name]().grad_checkpointing
    stages = model.stages() if isinstance(model, ResNet) else list(model.stages)
    calls = []
    for stage in stages:
        stage.forward = _counting(stage.forward, calls)
    x = torch.randn(2, 3, 64, 64)
    model.eval()  # eval: no recomputation
    sum(f.sum() for f in model(x)).backward()
    assert len(calls) == len(stages)
    calls.clear()
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == len(stages)
    calls.clear()
    sum(f.sum() for f in model(x)).backward()
    assert len(calls) == 2 * len(stages)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_channels_last_same_outputs(name):
    torch.manual_seed(0)
    model = BUILDERS[name](out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_compile_fullgraph_agrees_with_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BUILDERS[name](out_indices=(1, 2, 3)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [ResNet, ConvNeXt])
@pytest.mark.parametrize("out_indices", [(4,), (-1,), (2, 1), (1, 1), (), (0, 5)])
def test_bad_out_indices_raise(cls, out_indices):
    with pytest.raises(ValueError, match="out_indices"):
        cls(out_indices=out_indices)


def test_stages_beyond_last_out_index_are_not_built():
    resnet = resnet_micro(out_indices=(0, 1))
    assert not hasattr(resnet, "layer3") and not hasattr(resnet, "layer4")
    assert not any(k.startswith(("layer3.", "layer4.")) for k in resnet.state_dict())
    assert len(resnet.frozen_stage_modules()) == 3  # stem + 2 stages

    convnext = convnext_micro(out_indices=(0, 1))
    assert len(convnext.stages) == 2
    assert not any(k.startswith(("stages.2.", "stages.3.")) for k in convnext.state_dict())
    full = sum(p.numel() for p in convnext_micro(out_indices=(0, 1, 2, 3)).parameters())
    assert sum(p.numel() for p in convnext.parameters()) < full


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    source = BUILDERS[name]().eval()
    target = BUILDERS[name]().eval()
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(target(x), source(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_backward_reaches_every_parameter(name):
    model = BUILDERS[name](out_indices=(0, 1, 2, 3)).train()
    sum(f.square().mean() for f in model(torch.randn(2, 3, 64, 64))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
