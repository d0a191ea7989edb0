"""SimCLR's NT-Xent and MoCo's InfoNCE against brute-force loops and pytorch-metric-learning; the SimCLR and
MoCo task models (views, momentum schedule, queue) on tiny backbones."""

import math

import pytest
import torch
from torch import nn

from cvzoo.backbones import ResNet
from cvzoo.ssl.contrastive import MoCo, SimCLR, info_nce_loss, nt_xent_loss
from cvzoo.ssl.gather import gather_with_grad, rank_and_world
from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.views import TwoViews

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(layers=(1, 1), widths=(8, 16), stem_width=8, out_indices=(0, 1))  # ~6k parameters, stride 8


def normalised_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return tiny_backbone().signature.normalize(torch.rand(n, 3, size, size, generator=g))


# ---- references written here -------------------------------------------------------------------------


def brute_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """One anchor at a time: -log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t)), mean over the 2B anchors."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n = len(z)
    losses = []
    for i in range(n):
        p = (i + n // 2) % n
        numerator = torch.exp(z[i] @ z[p] / t)
        denominator = sum(torch.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        losses.append(-torch.log(numerator / denominator))
    return torch.stack(losses).mean()


def hand_info_nce(query: torch.Tensor, keys: torch.Tensor, negatives: list[list[torch.Tensor]], t: float):
    """Cross entropy by hand: query i against its key (positive) and `negatives[i]`; mean over queries."""
    losses = []
    for i in range(len(query)):
        q = query[i] / query[i].norm()
        pos = math.exp(float(q @ (keys[i] / keys[i].norm())) / t)
        neg = sum(math.exp(float(q @ (k / k.norm())) / t) for k in negatives[i])
        losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses)


# ---- nt_xent -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d,t", [(2, 3, 0.5), (5, 8, 0.1), (4, 16, 1.0)])
def test_nt_xent_matches_brute_force_loss_and_gradients(b, d, t):
    torch.manual_seed(b)
    z1 = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    ours = nt_xent_loss(z1, z2, t)
    ref = brute_nt_xent(z1, z2, t)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    g_ref = torch.autograd.grad(ref, (z1, z2))
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(nt_xent_loss(z2, z1, t), ours)  # symmetric in the views


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_nt_xent_matches_pytorch_metric_learning(t):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    b = 6
    z1, z2 = torch.randn(b, 10, dtype=torch.float64), torch.randn(b, 10, dtype=torch.float64)
    labels = torch.cat([torch.arange(b), torch.arange(b)])  # the two views of image i share label i
    # PML: cosine similarity, one term per positive pair (both directions), mean over the 2B pairs
    ref = losses.NTXentLoss(temperature=t)(torch.cat([z1, z2]), labels)
    torch.testing.assert_close(nt_xent_loss(z1, z2, t), ref, rtol=1e-9, atol=1e-9)


def test_nt_xent_limits():
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    # identical views: positives at similarity 1, far from orthogonal negatives -> the loss tends to 0 as t -> 0
    basis = torch.eye(4, 5)
    assert nt_xent_loss(basis, basis, 0.05) < 1e-6
    # all rows equal: every logit equal -> -log(1 / (2B - 1))
    same = z[:1].expand(4, -1)
    torch.testing.assert_close(nt_xent_loss(same, same, 0.3), torch.tensor(math.log(7.0)))
    # scale invariance of the cosine similarity
    torch.testing.assert_close(nt_xent_loss(3 * z, 0.5 * z.flip(0), 0.2), nt_xent_loss(z, z.flip(0), 0.2))


def test_nt_xent_float32_under_half_inputs():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    out = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nt_xent_loss(z1.bfloat16().float(), z2.bfloat16().float(), 0.5))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(1, 4), torch.randn(1, 4)), "batch size 1"),
    ((torch.randn(3, 4), torch.randn(2, 4)), "same"),
    ((torch.randn(3, 4), torch.randn(3, 5)), "same"),
    ((torch.randn(3), torch.randn(3)), r"\(B, D\)"),
    ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)), "floating"),
    ((torch.randn(0, 4), torch.randn(0, 4)), "empty"),
])
def test_nt_xent_validation(args, match):
    with pytest.raises(ValueError, match=match):
        nt_xent_loss(*args)


@pytest.mark.parametrize("t", [0, -0.5, float("nan"), float("inf"), True])
def test_temperature_validation(t):
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z, z, t)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z, z, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        SimCLR(tiny_backbone(), temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        MoCo(tiny_backbone(), temperature=t)


def test_losses_compile_fullgraph():
    torch.manual_seed(0)
    z1, z2, queue = torch.randn(4, 6), torch.randn(4, 6), torch.randn(9, 6)
    compiled = torch.compile(nt_xent_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z1, z2, 0.5), nt_xent_loss(z1, z2, 0.5))
    compiled_nce = torch.compile(info_nce_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_nce(z1, z2, None, 0.2), info_nce_loss(z1, z2, None, 0.2))
    torch.testing.assert_close(compiled_nce(z1, z2, queue, 0.2), info_nce_loss(z1, z2, queue, 0.2))


def test_single_process_gather_is_identity():
    x = torch.randn(3, 2)
    assert rank_and_world() == (0, 1)
    assert gather_with_grad(x) is x


# ---- info_nce ----------------------------------------------------------------------------------------


def test_info_nce_with_queue_matches_hand_cross_entropy():
    torch.manual_seed(0)
    q, k, queue = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), \
        torch.randn(7, 6, dtype=torch.float64)
    expected = hand_info_nce(q, k, [list(queue)] * 4, 0.2)
    assert info_nce_loss(q, k, queue, 0.2).item() == pytest.approx(expected, rel=1e-10)
    one = info_nce_loss(q[:1], k[:1], queue, 0.2)  # a batch of one is fine: the queue holds the negatives
    assert one.item() == pytest.approx(hand_info_nce(q[:1], k[:1], [list(queue)], 0.2), rel=1e-10)


def test_info_nce_in_batch_matches_hand_cross_entropy():
    torch.manual_seed(1)
    q, k = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    negatives = [[k[j] for j in range(5) if j != i] for i in range(5)]
    assert info_nce_loss(q, k, None, 0.3).item() == pytest.approx(hand_info_nce(q, k, negatives, 0.3), rel=1e-10)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(1, 4), torch.randn(1, 4)), "batch size 1"),
    ((torch.randn(3, 4), torch.randn(3, 5)), "same"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3)), "queue"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(0, 4)), "queue"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)), "queue"),
])
def test_info_nce_validation(args, match):
    with pytest.raises(ValueError, match=match):
        info_nce_loss(*args)


# ---- SimCLR ------------------------------------------------------------------------------------------


def test_simclr_forward_is_pooled_backbone_features():
    model = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16).eval()
    x = normalised_images(3)
    feats = model(x)
    assert feats.shape == (3, 16) and model.feature_dim == 16
    torch.testing.assert_close(feats, model.backbone(x)[-1].mean((2, 3)))
    assert model.signature == model.backbone.signature


class RecordingViews(nn.Module):
    """Deterministic views for the test: two fixed brightness changes of the [0, 1] images; records its input."""

    def forward(self, images):
        self.seen = images
        return [images * 0.9, (images * 0.8 + 0.1)]


def test_simclr_loss_builds_views_in_pixel_space():
    views = RecordingViews()
    model = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16, views=views, temperature=0.3)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 16, 16, generator=g)
    sig = model.signature
    out = model.loss(sig.normalize(pixels), torch.arange(4))  # targets are ignored
    torch.testing.assert_close(views.seen, pixels, rtol=0, atol=1e-6)  # denormalised before the views
    # by hand: both normalised views through backbone + projector as one batch, NT-Xent by brute force
    z = model.projector(model.backbone(sig.normalize(torch.cat([pixels * 0.9, pixels * 0.8 + 0.1])))[-1]
                        .mean((2, 3)))
    torch.testing.assert_close(out["loss"], brute_nt_xent(z[:4], z[4:], 0.3), rtol=1e-5, atol=1e-6)


def test_simclr_default_views_follow_the_input_size():
    torch.manual_seed(0)
    model = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16)
    assert model.views is None
    probe = torch.rand(1, 3, 30, 30)
    model.loss(normalised_images(2, 16))
    views = model._auto_views[1]  # built for the input size, kept out of the module tree and the state_dict
    assert [v.shape[-2:] for v in views(probe)] == [(16, 16)] * 2
    model.loss(normalised_images(2, 24))  # a new input size rebuilds the default views
    assert [v.shape[-2:] for v in model._auto_views[1](probe)] == [(24, 24)] * 2
    assert model.views is None and not any("views" in k for k in model.state_dict())
    fixed = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16, image_size=8)
    assert isinstance(fixed.views, TwoViews) and [v.shape[-2:] for v in fixed.views(probe)] == [(8, 8)] * 2
    assert torch.isfinite(fixed.loss(normalised_images(2, 24))["loss"])


def test_simclr_trains():
    torch.manual_seed(0)
    model = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    # random-ish images: 8 smooth blobs of distinct colours (views of one image share its colour)
    base = torch.rand(8, 3, 1, 1, generator=g) * torch.rand(8, 1, 4, 4, generator=g).repeat_interleave(4, 2) \
        .repeat_interleave(4, 3)
    images = model.signature.normalize(base.clamp(0, 1))
    losses = []
    for _ in range(5):
        loss = model.loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[2:]) < losses[0], losses
    assert all(p.grad is not None for p in model.parameters())


def test_simclr_validation():
    model = SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16)
    with pytest.raises(ValueError, match="batch size 1"):
        model.loss(normalised_images(1))
    with pytest.raises(ValueError, match="channels"):
        model.loss(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="projection_dim"):
        SimCLR(tiny_backbone(), projection_dim=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        SimCLR(tiny_backbone(), hidden_dim=-1)
    with pytest.raises(ValueError, match="backbone"):
        SimCLR(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="list of 2 view batches"):
        SimCLR(tiny_backbone(), projection_dim=8, hidden_dim=16, views=nn.Identity()).loss(normalised_images(2))


# ---- MoCo --------------------------------------------------------------------------------------------


def tiny_moco(version: int, **kwargs) -> MoCo:
    args = {"projection_dim": 8, "hidden_dim": 16, "views": TwoViews(nn.Identity()), **kwargs}
    return MoCo(tiny_backbone(), version=version, **args)


def test_moco_structure():
    v2, v3 = tiny_moco(2, queue_size=10), tiny_moco(3)
    assert v2.predictor is None and v2.queue.shape == (10, 8) and int(v2.queue_ptr) == 0
    torch.testing.assert_close(v2.queue.norm(dim=1), torch.ones(10))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in v2.projector.modules())  # MoCo v2: fc-ReLU-fc
    assert v3.queue is None and isinstance(v3.predictor, MLPHead)
    assert isinstance(v3.projector.net[-1], nn.BatchNorm1d) and not v3.projector.net[-1].affine
    for model in (v2, v3):
        assert all(not p.requires_grad for p in model.target_backbone.parameters())
        assert all(not p.requires_grad for p in model.target_projector.parameters())
        for p, q in zip(model.backbone.parameters(), model.target_backbone.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        x = normalised_images(3)
        torch.testing.assert_close(model.eval()(x), model.backbone(x)[-1].mean((2, 3)))


def test_moco_v2_queue_is_a_fifo():
    model = tiny_moco(2, queue_size=5)
    slots = [row.clone() for row in model.queue]
    ptr = 0
    torch.manual_seed(0)
    for n in (3, 4, 1, 5, 7):  # wraps around, fills exactly, and overflows (7 keys into 5 slots)
        keys = torch.randn(n, 8)
        model.enqueue(keys)
        for key in keys:  # the hand FIFO: one key at a time into the slot at the pointer
            slots[ptr] = key / key.norm()
            ptr = (ptr + 1) % 5
        torch.testing.assert_close(model.queue, torch.stack(slots))
        assert int(model.queue_ptr) == ptr
    with pytest.raises(ValueError, match="version 2"):
        tiny_moco(3).enqueue(torch.randn(2, 8))


def test_moco_v2_loss_uses_the_old_queue_then_enqueues_both_views():
    model = tiny_moco(2, queue_size=12, temperature=0.2)
    images = normalised_images(4)
    queue0 = model.queue.clone()
    out = model.loss(images)
    # views are the identity, so both views are the images; the target is still the copy of the online net
    with torch.no_grad():
        x = images  # denormalise -> identity views -> normalise again
        q = model.projector(model.backbone(x)[-1].mean((2, 3)))
        k = model.target_projector(model.target_backbone(x)[-1].mean((2, 3)))
    expected = hand_info_nce(q.double(), k.double(), [list(queue0.double())] * 4, 0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    keys = torch.cat([k, k])
    torch.testing.assert_close(model.queue[:8], keys / keys.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.queue[8:], queue0[8:])
    assert int(model.queue_ptr) == 8 and int(model.step) == 1
    model.eval()
    queue1 = model.queue.clone()
    assert torch.isfinite(model.loss(images)["loss"])
    assert torch.equal(model.queue, queue1) and int(model.queue_ptr) == 8 and int(model.step) == 1  # eval: no update
    model.train()
    assert torch.isfinite(model.loss(images[:1])["loss"])  # v2: a batch of one has negatives in the queue


def test_moco_v3_loss_matches_hand_cross_entropy():
    model = tiny_moco(3, temperature=0.3).eval()  # eval: BatchNorm running statistics, no updates
    images = normalised_images(4, seed=3)
    out = model.loss(images)
    with torch.no_grad():
        q = model.predictor(model.projector(model.backbone(images)[-1].mean((2, 3))))
        k = model.target_projector(model.target_backbone(images)[-1].mean((2, 3)))
    q, k = q.double(), k.double()
    negatives = [[k[j] for j in range(4) if j != i] for i in range(4)]
    expected = hand_info_nce(q, k, negatives, 0.3)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert int(model.step) == 0
    with pytest.raises(ValueError, match="batch size 1"):
        model.loss(images[:1])


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("max_steps", [None, 4])
def test_moco_momentum_schedule_and_target_ema(version, max_steps):
    base, final = 0.9, 0.99
    model = tiny_moco(version, momentum=base, final_momentum=final, max_steps=max_steps, queue_size=16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    expected = [p.detach().clone() for p in online]
    images = normalised_images(4)
    for step in range(6):
        if max_steps is None:
            m = base
        else:  # closed form of the cosine schedule, held at `final` after max_steps
            m = final - (final - base) * (math.cos(math.pi * min(step / max_steps, 1.0)) + 1) / 2
        assert model.current_momentum().item() == pytest.approx(m, abs=1e-6)
        expected = [m * e + (1 - m) * p.detach() for e, p in zip(expected, online)]  # EMA at the start of loss
        loss = model.loss(images)["loss"]
        target = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
        for e, t in zip(expected, target):
            torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6)
        assert int(model.step) == step + 1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert not torch.equal(online[0], next(model.target_backbone.parameters()))


def test_moco_state_dict_round_trip():
    model = tiny_moco(2, queue_size=8)
    model.loss(normalised_images(3))
    fresh = tiny_moco(2, queue_size=8)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.step) == 1 and int(fresh.queue_ptr) == 6 and torch.equal(fresh.queue, model.queue)


@pytest.mark.parametrize("kwargs,match", [
    ({"version": 1}, "version"), ({"version": True}, "version"), ({"queue_size": 0}, "queue_size"),
    ({"momentum": 1.5}, "momentum"), ({"final_momentum": -0.1}, "final_momentum"), ({"max_steps": 0}, "max_steps"),
    ({"projection_dim": 0}, "projection_dim"), ({"hidden_dim": 2.5}, "hidden_dim"),
])
def test_moco_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoCo(tiny_backbone(), **kwargs)


def test_moco_default_views_train():
    torch.manual_seed(0)
    model = MoCo(tiny_backbone(), version=3, projection_dim=8, hidden_dim=16, max_steps=10)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        loss = model.loss(normalised_images(4))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.predictor.parameters())
