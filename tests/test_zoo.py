"""Contract suite over every zoo entry: declared metadata vs real outputs, gradients, compile, weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cvzoo.detection import TwoStageDetector
from cvzoo.zoo import MODELS, TASKS, create_model, get_entry, list_models, markdown_table

NAMES = list(MODELS)
OWN = [n for n, e in MODELS.items() if not n.startswith(("timm_", "tv_"))]  # own backbones, necks and heads


def _create(name: str):
    model = create_model(name)
    if isinstance(model, TwoStageDetector):
        # forward runs the RoI heads on the top proposals: 8 of them keep ResNet-50 heads cheap on CPU
        model.raw_proposals = 8
    return model


def _is_generative(model) -> bool:
    return isinstance(getattr(model, "image_size", None), int) and callable(getattr(model, "loss", None)) \
        and not hasattr(model, "head")


def _labels(model, batch: int = 2):
    return torch.arange(batch) % model.num_classes if getattr(model, "num_classes", None) else None


def _outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """A model's outputs on `x`; for generative models, whose forward takes noise or latents, the terms of
    `loss(x, labels)` under a fixed seed (their losses draw noise levels, timesteps and latents)."""
    if not _is_generative(model):
        return _tensors(model(x))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return list(model.loss(x, _labels(model, x.shape[0])).values())


def _quick_sample(model, n: int = 2) -> torch.Tensor:
    """`sample` with the fewest steps each sampler allows (the zoo's DDPMs take hundreds by default)."""
    import inspect

    params = inspect.signature(model.sample).parameters
    kwargs = {k: v for k, v in (("num_steps", 2), ("steps_per_level", 1), ("sampler", "ddim")) if k in params}
    if "labels" in params and getattr(model, "num_classes", None):
        kwargs["labels"] = _labels(model, n)
    return model.sample(n, generator=torch.Generator().manual_seed(0), **kwargs)


def _implicit_input(model, batch: int = 2) -> torch.Tensor | None:
    """Coordinates (N, 2) in [-1, 1] for an implicit image, rays (R, 6) towards the origin for a NeRF."""
    from cvzoo.implicit import ImplicitImage, TinyNeRF

    if isinstance(model, ImplicitImage):
        return torch.rand(batch, 2) * 2 - 1
    if isinstance(model, TinyNeRF):
        origins = torch.tensor([[0.0, 0.0, 4.0]]).expand(batch, 3) + 0.1 * torch.randn(batch, 3)
        return torch.cat([origins, torch.nn.functional.normalize(-origins, dim=1)], dim=1)
    return None


def _input(model, batch: int = 2) -> torch.Tensor:
    implicit = _implicit_input(model, batch)
    if implicit is not None:
        return implicit
    if _is_generative(model):  # fixed-size models: images in [-1, 1] at their size
        size = model.image_size
        return torch.rand(batch, model.signature.in_channels, size, size) * 2 - 1
    sig = model.signature
    side = max(64, sig.min_size)
    side = math.ceil(side / sig.size_divisor) * sig.size_divisor
    return torch.randn(batch, sig.in_channels, side, side + sig.size_divisor * 2 if sig.size_divisor > 1 else side + 3)


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output: a list of maps, a NamedTuple, or a dict of NamedTuples."""
    if out is None:  # an optional output that is off (a segmenter without auxiliary head)
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    return [t for v in out for t in _tensors(v)]


def test_zoo_has_a_dozen_entries_of_every_task():
    assert len(MODELS) >= 12
    for task in TASKS:
        assert list_models(task), task
    for e in MODELS.values():
        assert e.description and e.name.isidentifier()


@pytest.mark.parametrize("name", NAMES)
def test_declared_outputs_match_real_outputs(name):
    model = _create(name).eval()
    x = _input(model)
    task = MODELS[name].task
    if task == "generation":  # samples, or reconstructions for an autoencoder without a prior to sample
        out = _quick_sample(model) if hasattr(model, "sample") else model.reconstruct(x)
        assert out.shape == (2, model.signature.in_channels, model.image_size, model.image_size)
        assert out.min() >= 0 and out.max() <= 1
        losses = model.loss(x, _labels(model))
        assert set(losses) >= {"loss"} and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        return
    with torch.no_grad():
        out = model(x)
    if task in ("backbone", "features"):
        assert isinstance(out, list) and len(out) == len(model.feature_info) == len(model.signature.outputs)
        for f, info in zip(out, model.feature_info):
            assert f.shape[:2] == (2, info.channels)
            for size, expected in zip(f.shape[-2:], x.shape[-2:]):
                assert abs(size - math.ceil(expected / info.stride)) <= 1, (name, f.shape, info)
    elif task == "classification":
        assert out.logits.shape == (2, model.num_classes)
    elif task == "regression":
        assert out.values.shape == (2, model.num_outputs)
    elif task == "detection":
        assert out._fields == model.signature.outputs
        # two-stage detectors' box head has a background column 0 besides the K classes
        background = 1 if isinstance(model, TwoStageDetector) else 0
        assert out[0].shape[0] == 2 and out[0].shape[-1] == model.num_classes + background
        assert all(t.shape[:2] == out[0].shape[:2] for t in _tensors(out))
    elif task == "segmentation":
        assert out._fields == model.signature.outputs
        assert out.logits.shape == (2, model.num_classes, *x.shape[-2:])  # upsampled to the input size
        assert out.aux_logits is None or out.aux_logits.shape == out.logits.shape
    elif task == "self_supervised":  # the pooled backbone features kept after pre-training
        assert out.shape == (2, model.backbone.feature_info[-1].channels)
    elif task == "few_shot":  # ProtoNet: embeddings (a flattened map: C x h x w); MAML/ANIL: n_way logits
        if hasattr(model, "embedding_dim"):
            maps = model.backbone(x)[-1]
            assert out.shape == (2, model.embedding_dim or maps[0].numel())
        else:
            assert out.shape == (2, model.n_way)
    elif task == "zero_shot":  # pooled image features; the joint embedding comes from encode_image/encode_text
        assert out.shape == (2, model.backbone.feature_info[-1].channels)
        assert model.encode_image(x).shape == model.encode_text(["a red circle", "a star"]).shape == (2, 64)
    elif task == "implicit":  # a colour per coordinate or per ray
        assert _tensors(out)[0].shape == (2, 3)
    elif task == "debiasing":
        assert out._fields == model.signature.outputs
        assert out.logits.shape == (2, model.num_classes) and out.adversary_logits.shape == (2, model.num_domains)
    else:
        assert set(out) == set(model.signature.outputs) == set(model.tasks)
    assert all(torch.isfinite(t).all() for t in _tensors(out))


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_trainable_parameter(name):
    model = _create(name).train()
    if _is_generative(model) or MODELS[name].task == "self_supervised":  # projectors are reached by the loss
        model.loss(_input(model), _labels(model))["loss"].backward()
    elif MODELS[name].task == "zero_shot":  # both towers and the logit scale are reached by the CLIP loss
        model.loss(_input(model), ["a red circle", "a blue star"])["loss"].backward()
    else:
        out = model(_input(model))
        # (t + 1)^2: its gradient is not zero at outputs that start at zero (the noop baselines' priors)
        sum((t.float() + 1).square().mean() for t in _tensors(out)).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("name", OWN)
def test_compiles_without_graph_breaks_and_agrees_with_eager(name):
    torch._dynamo.reset()
    model = _create(name).eval()
    x = _input(model)
    if _is_generative(model):  # the loss is the hot path (forward takes noise, not images)
        model.loss = torch.compile(model.loss, backend="eager", fullgraph=True)
        compiled, model = model, _create(name).eval()
        compiled.load_state_dict(model.state_dict())
    else:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager, comp = _outputs(model, x), _outputs(compiled, x)
    assert len(eager) == len(comp)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_round_trip_into_a_fresh_model(name, tmp_path):
    model = _create(name).eval()
    with torch.no_grad():  # moved away from any deterministic initialisation (the noop baselines have one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # the fresh model starts from different random weights
    fresh = _create(name).eval()
    x = _input(model)
    with torch.no_grad():
        before = _outputs(fresh, x)
        fresh.load_state_dict(load_file(str(path)))
        expected, got = _outputs(model, x), _outputs(fresh, x)
    assert any(not torch.equal(a, b) for a, b in zip(before, expected)), "fresh model was not freshly initialised"
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="resnet18_fpn"):
        get_entry("resnet18_fnp")
    with pytest.raises(ValueError, match="unknown model name 'zzz'"):
        create_model("zzz")
    with pytest.raises(ValueError, match="task must be one of"):
        list_models("detection-ish")


def test_markdown_table_lists_every_entry():
    table = markdown_table()
    for name in MODELS:
        assert f"| `{name}` |" in table


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if re.search(r"\d+(\.\d)?M", e.description)])
def test_parameter_counts_in_descriptions_are_true(name):
    claimed = float(re.search(r"(\d+(?:\.\d)?)M", MODELS[name].description).group(1))
    actual = sum(p.numel() for p in _create(name).parameters()) / 1e6
    assert round(actual, 1 if claimed < 10 else 0) == claimed, (name, actual)
