"""cvzoo.explain.cam: closed forms, batching, layer naming, hooks and memory, model state, wrappers, precision.

Numbers are checked against closed forms (Grad-CAM and LayerCAM of a global-average-pool + linear head,
computed here by hand) or against the same computation done another way (per image, contiguous,
unwrapped, float32); test_cam_reference.py checks them against pytorch-grad-cam.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.explain import (
    ClassifierTarget,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)

ALL = [GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, ScoreCAM, EigenCAM]
LAYER = "features.3"


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> global average pool -> linear (4 classes)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, 4)
        self.unused = nn.Conv2d(8, 8, 1)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return self.fc(feats.mean(dim=(2, 3)))


def _net(**kwargs) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(**kwargs).eval()


def _images(b: int = 3, h: int = 16, w: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _num_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _by_hand(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's convention written out: relu, x - min, / (max + 1e-7), bilinear resize, scale again."""
    m = raw.clamp(min=0)
    m = m - m.flatten(1).min(1).values[:, None, None]
    m = m / (m.flatten(1).max(1).values[:, None, None] + 1e-7)
    m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    m = m - m.flatten(1).min(1).values[:, None, None]
    return m / (m.flatten(1).max(1).values[:, None, None] + 1e-7)


# ---- closed forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [GradCAM, LayerCAM])
def test_gap_linear_head_closed_form(method):
    """Under global average pooling + linear, d logit_k / d A_c = W_kc / (h w) everywhere, so Grad-CAM is
    CAM (Zhou et al.): sum_c W_kc A_c, and LayerCAM is sum_c relu(W_kc) A_c (up to the factor 1 / (h w))."""
    model, images, classes = _net(), _images(), [2, 0, 3]
    acts = model.features(images).detach()  # (B, 8, 8, 10)
    w = model.fc.weight.detach()[classes]  # (B, 8)
    if method is LayerCAM:
        w = w.clamp(min=0)
    expected = _by_hand(torch.einsum("bc,bchw->bhw", w, acts), (16, 20))
    got = method(model, target_layers=["features"])(images, [ClassifierTarget(c) for c in classes])
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got.amax(dim=(1, 2)) > 0.99).all()


def test_several_layers_average_the_per_layer_maps():
    """Grad-CAM written out with hooks and autograd: per layer relu -> scale -> resize, then mean -> scale."""
    model, images, classes = _net(), _images(), [1, 3, 0]
    layers = [model.features[0], model.features[3]]
    acts = []
    handles = [layer.register_forward_hook(lambda m, i, o: acts.append(o)) for layer in layers]
    logits = model(images)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(logits[torch.arange(3), classes].sum(), acts)
    per_layer = []
    for a, g in zip(acts, grads):
        m = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).detach().clamp(min=0)
        m = m - m.flatten(1).min(1).values[:, None, None]
        m = m / (m.flatten(1).max(1).values[:, None, None] + 1e-7)
        per_layer.append(F.interpolate(m[:, None], size=(16, 20), mode="bilinear", align_corners=False)[:, 0])
    mean = (per_layer[0] + per_layer[1]) / 2
    mean = mean - mean.flatten(1).min(1).values[:, None, None]
    expected = mean / (mean.flatten(1).max(1).values[:, None, None] + 1e-7)
    got = GradCAM(model, target_layers=["features.0", "features.3"])(images, [ClassifierTarget(c) for c in classes])
    assert torch.allclose(got, expected, atol=1e-6)


# ---- batching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.__name__)
def test_batched_equals_per_image(method):
    model, images = _net(), _images()
    targets = [ClassifierTarget(c) for c in (3, 1, 1)]
    kwargs = {"batch_size": 5} if method is ScoreCAM else {}
    cam = method(model, target_layers=[LAYER], **kwargs)
    batched = cam(images, targets)
    single = torch.cat([cam(images[i : i + 1], [targets[i]]) for i in range(3)])
    assert batched.shape == (3, 16, 20) and batched.dtype == torch.float32
    assert torch.allclose(batched, single, atol=1e-5)
    assert float(batched.min()) >= 0 and float(batched.max()) <= 1


def test_one_target_applies_to_every_image_and_none_is_the_top_class():
    model, images = _net(), _images()
    cam = GradCAM(model, target_layers=[LAYER])
    assert torch.equal(cam(images, ClassifierTarget(2)), cam(images, [ClassifierTarget(2)] * 3))
    top = model(images).argmax(dim=1).tolist()
    assert torch.equal(cam(images), cam(images, [ClassifierTarget(c) for c in top]))


# ---- layers ------------------------------------------------------------------------------------------


def test_layers_by_name_or_module_agree_and_unknown_names_suggest():
    model, images = _net(), _images()
    by_name = GradCAM(model, target_layers=[LAYER])(images)
    by_module = GradCAM(model, target_layers=[model.features[3]])(images)
    assert torch.equal(by_name, by_module)
    assert torch.equal(by_name, GradCAM(model, target_layers=LAYER)(images))  # a single name is fine
    with pytest.raises(ValueError, match=r"target_layers\[0\] = 'features\.33'.*nearest names: \['features\.3'"):
        GradCAM(model, target_layers=["features.33"])
    with pytest.raises(ValueError, match=r"target_layers\[1\] = 'featurs'.*'features'"):
        GradCAM(model, target_layers=[LAYER, "featurs"])
    with pytest.raises(ValueError, match=r"target_layers\[0\] is a Conv2d that is not a submodule"):
        GradCAM(model, target_layers=[nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="non-empty list"):
        GradCAM(model, target_layers=[])
    with pytest.raises(ValueError, match="twice"):
        GradCAM(model, target_layers=[LAYER, model.features[3]])
    with pytest.raises(ValueError, match=r"target_layers\[0\] must be a dotted layer name or an nn.Module"):
        GradCAM(model, target_layers=[3])


def test_layers_that_cannot_be_explained_raise():
    model, images = _net(), _images()
    with pytest.raises(ValueError, match="'unused' did not run"):
        GradCAM(model, target_layers=["unused"])(images)
    with pytest.raises(ValueError, match=r"'fc' returns shape \(3, 4\); expected \(B=3, C, h, w\)"):
        GradCAM(model, target_layers=["fc"])(images)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="'conv' ran 2 times"):
        GradCAM(Twice().eval(), target_layers=["conv"])(images)

    class Branch(nn.Module):  # a layer that runs but does not reach the logits
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.side, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            f = self.conv(x)
            self.side(f)
            return self.fc(f.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="'side' does not influence the targets"):
        GradCAM(Branch().eval(), target_layers=["side"])(images)


def test_reshape_transform_reads_token_outputs():
    """A (B, N, C) token layer reshaped to (B, C, h, w) gives the map of the spatial layer it was made from
    (the tokens are a pure reshape of it: same activations, same gradients)."""

    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)

    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.tokens = nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(), Tokens()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(self.tokens(self.act(self.conv(x))).mean(dim=1))

    torch.manual_seed(0)
    model, images = TokenNet().eval(), _images()

    def to_maps(t):  # (B, 80, 5) -> (B, 5, 8, 10)
        return t.transpose(1, 2).reshape(t.shape[0], -1, 8, 10)

    for method in (GradCAM, GradCAMPlusPlus, LayerCAM, EigenCAM):
        via_tokens = method(model, target_layers=["tokens"], reshape_transform=to_maps)(images)
        spatial = method(model, target_layers=["act"])(images)
        assert via_tokens.shape == (3, 16, 20)
        assert torch.allclose(via_tokens, spatial, atol=1e-6)
    with pytest.raises(ValueError, match=r"'tokens' returns shape \(3, 80, 5\).*reshape_transform"):
        GradCAM(model, target_layers=["tokens"])(images)


# ---- hooks, memory, state ------------------------------------------------------------------------------


def test_hooks_removed_after_calls_exceptions_and_close():
    model, images = _net(), _images()
    with GradCAM(model, target_layers=[LAYER, "features.0"]) as cam:
        assert _num_hooks(model) == 0  # hooks live only during a call's forward
        cam(images)
        assert _num_hooks(model) == 0
        model.fail = True
        with pytest.raises(RuntimeError, match="on purpose"):
            cam(images)
        assert _num_hooks(model) == 0
        assert all(not got for got in cam._recorder.outputs)  # nothing from the failed forward is kept
        model.fail = False
        assert torch.equal(cam(images), GradCAM(model, target_layers=[LAYER, "features.0"])(images))
    assert _num_hooks(model) == 0
    cam.close()  # idempotent
    with pytest.raises(ValueError):
        cam(images, targets=[ClassifierTarget(9)] * 3)  # class out of range: raised after the forward
    assert _num_hooks(model) == 0


def _live_objects() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(issubclass(type(o), torch.Tensor) for o in objects)


def test_no_growth_over_a_thousand_calls():
    """Live Python objects and tensors stay constant (a leak of one object a call would show +1000)."""
    model, images = _net(), _images(b=1, h=8, w=8)
    cam = GradCAM(model, target_layers=[LAYER, "features.0"])
    for _ in range(20):
        cam(images)
    objects, tensors = _live_objects()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1000 tiny calls: intra-op threads only spin (100x slower on a busy machine)
    try:
        for _ in range(1000):
            cam(images)
    finally:
        torch.set_num_threads(threads)
    objects_after, tensors_after = _live_objects()
    # no growth; earlier tests' tensors freed meanwhile (caches released outside gc) may lower the count
    assert tensors_after <= tensors
    assert objects_after - objects < 50
    assert _num_hooks(model) == 0


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.__name__)
def test_model_state_is_left_alone(method):
    model, images = _net(), _images()
    model.features[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    model.fc.bias.grad = torch.full_like(model.fc.bias, 7.0)  # an existing gradient is not touched
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    method(model, target_layers=[LAYER])(images)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.bias")
    assert torch.equal(model.fc.bias.grad, torch.full_like(model.fc.bias, 7.0))


def test_training_mode_warns_and_stays():
    model, images = _net(), _images()
    model.features[1] = nn.Identity()  # no batch norm statistics to update
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        GradCAM(model, target_layers=[LAYER])(images)
    assert all(m.training for m in model.modules())


def test_frozen_model_gives_the_same_maps():
    """With no parameter requiring grad, the recorded layer output is made a leaf that does."""
    model, images = _net(), _images()
    expected = GradCAMPlusPlus(model, target_layers=["features.0", LAYER])(images)
    model.requires_grad_(False)
    got = GradCAMPlusPlus(model, target_layers=["features.0", LAYER])(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


# ---- calling contexts ----------------------------------------------------------------------------------


def test_works_under_no_grad_and_inference_mode():
    model, images = _net(), _images()
    cam = LayerCAM(model, target_layers=[LAYER])
    expected = cam(images)
    with torch.no_grad():
        assert torch.equal(cam(images), expected)
    with torch.inference_mode():
        assert torch.equal(cam(images.clone()), expected)


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus, ScoreCAM, EigenCAM], ids=lambda m: m.__name__)
def test_channels_last_gives_the_same_maps(method):
    model, images = _net(), _images()
    expected = method(model, target_layers=[LAYER])(images)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    got = method(model_cl, target_layers=[LAYER])(images.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous()
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM], ids=lambda m: m.__name__)
def test_bf16_autocast_maps_are_float32_and_close(method):
    model, images = _net(), _images()
    expected = method(model, target_layers=[LAYER])(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = method(model, target_layers=[LAYER])(images)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert (got - expected).abs().mean() < 0.03  # bf16 forward: ~3 significant digits in the activations


def test_compiled_model_is_explained_through_its_original_module():
    model, images = _net(), _images()
    expected = GradCAM(model, target_layers=[LAYER])(images)
    compiled = torch.compile(model, backend="eager")
    for name in (LAYER, "_orig_mod." + LAYER):
        assert torch.equal(GradCAM(compiled, target_layers=[name])(images), expected)
    assert _num_hooks(model) == 0


def test_distributed_data_parallel(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, images = _net(), _images()
        model.unused = None  # DDP training needs every parameter used
        expected = GradCAM(model, target_layers=[LAYER])(images)
        ddp = DistributedDataParallel(model)

        def no_collectives(*args, **kwargs):
            raise AssertionError("the CAM ran DDP's forward (collectives: one rank alone would block)")

        ddp.forward = no_collectives
        for name in (LAYER, "module." + LAYER):
            assert torch.equal(GradCAM(ddp, target_layers=[name])(images), expected)
        del ddp.forward
        # the wrapper still trains
        ddp.train()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            ddp(images).logsumexp(dim=1).mean().backward()
            opt.step()
    finally:
        dist.destroy_process_group()


# ---- arguments -----------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors_naming_them():
    model, images = _net(), _images()
    cam = GradCAM(model, target_layers=[LAYER])
    with pytest.raises(ValueError, match="targets must be None, a target callable"):
        cam(images, targets=3)
    with pytest.raises(ValueError, match="targets has 2 entries for a batch of 3 images"):
        cam(images, targets=[ClassifierTarget(0)] * 2)
    with pytest.raises(ValueError, match=r"targets\[1\] must be a target callable"):
        cam(images, targets=[ClassifierTarget(0), 1, ClassifierTarget(0)])
    with pytest.raises(ValueError, match=r"targets\[0\] must return one scalar tensor"):
        cam(images, targets=lambda out, i: out[i])
    with pytest.raises(ValueError, match="do not depend on the model's output"):
        cam(images, targets=lambda out, i: out[i, 0].detach())
    with pytest.raises(ValueError, match=r"images must be a non-empty floating \(B, C, H, W\) tensor"):
        cam(images[0])
    with pytest.raises(ValueError, match="images must be"):
        cam((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        GradCAM(lambda x: x, target_layers=["a"])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ScoreCAM(model, target_layers=[LAYER], batch_size=0)
    with pytest.raises(ValueError, match="reshape_transform must be callable"):
        GradCAM(model, target_layers=[LAYER], reshape_transform="tokens")


def test_user_callable_target_equals_classifier_target():
    model, images = _net(), _images()
    cam = XGradCAM(model, target_layers=[LAYER])
    assert torch.equal(cam(images, lambda out, i: out[i, 2]), cam(images, ClassifierTarget(2)))


def test_repr_and_layer_names():
    cam = GradCAM(_net(), target_layers=[LAYER, "features.0"])
    assert cam.layer_names == [LAYER, "features.0"]
    assert "GradCAM(model=TinyNet" in repr(cam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam(_images())  # eval mode: no warning
