"""BYOL, SimSiam and DINO: the losses against closed forms, explicit loops and lightly, the stop-gradients, the
momentum and center updates against hand computations, and the task models training."""

import copy
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cvzoo.ssl.self_distillation import BYOL, DINO, DINOHead, SimSiam, byol_loss, dino_loss, simsiam_loss
from cvzoo.types import FeatureInfo, Signature

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBackbone(nn.Module):
    """(B, 3, H, W) -> [(B, width, H / 4, W / 4)], a few hundred parameters; BatchNorm optional (without it the
    networks are deterministic functions of each image, which the hand computations need)."""

    def __init__(self, width: int = 8, norm: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width) if norm else nn.Identity(),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1))
        self.feature_info = (FeatureInfo(width, 4),)
        self.signature = Signature(min_size=4, outputs=("c2",))

    def forward(self, x):
        return [self.body(x)]


def _images(b=4, size=16):
    return Signature().normalize(torch.rand(b, 3, size, size))


def _pool(backbone, x):
    return backbone(x)[-1].mean((2, 3))


# ------------------------------------------------------------------------------------------------------ losses


def test_byol_loss_is_normalised_mse():
    p, z = torch.randn(5, 7), torch.randn(5, 7) * 3
    expected = 0.0
    for i in range(5):
        pn, zn = p[i] / math.sqrt(sum(v * v for v in p[i])), z[i] / math.sqrt(sum(v * v for v in z[i]))
        expected += float(((pn - zn) ** 2).sum()) / 5
    assert byol_loss(p, z).item() == pytest.approx(expected, rel=1e-5)
    cos = (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))
    assert byol_loss(p, z).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert byol_loss(p, 4 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, rel=1e-6)


def test_simsiam_loss_is_negative_cosine_with_stop_gradient():
    p = torch.randn(6, 5, requires_grad=True)
    z = torch.randn(6, 5, requires_grad=True)
    loss = simsiam_loss(p, z)
    pd, zd = p.detach(), z.detach()
    expected = -sum(float(pd[i] @ zd[i]) / (float(pd[i].norm()) * float(zd[i].norm())) for i in range(6)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z.grad is None  # the stop-gradient on the target branch
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert simsiam_loss(z, z).item() == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("fn", [byol_loss, simsiam_loss])
def test_pair_losses_reject_bad_shapes(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 3), torch.randn(4, 2))


def dino_by_hand(student, teacher, center, ts, tt):
    """The official double loop, with the softmax written out."""
    def softmax(x):
        e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        q = softmax((t.double() - center.double()) / tt)
        for v, s in enumerate(student):
            if v == iq:
                continue
            log_p = torch.log(softmax(s.double() / ts))
            total += float((-(q * log_p).sum(-1)).mean())
            terms += 1
    return total / terms


@pytest.mark.parametrize("n_student,n_teacher", [(2, 2), (6, 2), (3, 1)])
def test_dino_loss_against_double_loop(n_student, n_teacher):
    student = [torch.randn(4, 9) for _ in range(n_student)]
    teacher = [torch.randn(4, 9) for _ in range(n_teacher)]
    center = torch.randn(9) * 0.3
    for ts, tt in ((0.1, 0.04), (0.5, 0.2)):
        got = dino_loss(student, teacher, center, student_temp=ts, teacher_temp=tt)
        assert got.item() == pytest.approx(dino_by_hand(student, teacher, center, ts, tt), rel=1e-5)


def test_dino_loss_matches_lightly_and_sends_no_gradient_to_the_teacher():
    lightly_loss = pytest.importorskip("lightly.loss")
    student = [torch.randn(4, 10, requires_grad=True) for _ in range(5)]
    teacher = [torch.randn(4, 10, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 10) * 0.2
    ref = lightly_loss.DINOLoss(output_dim=10, teacher_temp=0.04, student_temp=0.1)
    ref.center.copy_(center.view(1, 1, 10))  # lightly keeps the center as (1, 1, K)
    expected = ref([t.detach() for t in teacher], [s.detach() for s in student]).item()  # its argument order
    loss = dino_loss(student, teacher, center)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_dino_loss_compiles_fullgraph():
    student = [torch.randn(3, 6) for _ in range(4)]
    teacher = student[:2]
    center = torch.zeros(6)
    compiled = torch.compile(dino_loss, backend="eager", fullgraph=True)
    assert compiled(student, teacher, center).item() == pytest.approx(
        dino_by_hand(student, teacher, center, 0.1, 0.04), rel=1e-5)


def test_dino_loss_validation():
    s = [torch.randn(2, 5) for _ in range(3)]
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(s, s[:2], torch.zeros(5), teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(s, s[:2], torch.zeros(5), student_temp=-1.0)
    with pytest.raises(ValueError, match="two views"):
        dino_loss(s[:1], s[:1], torch.zeros(5))
    with pytest.raises(ValueError, match="teacher"):
        dino_loss(s[:1], s[:2], torch.zeros(5))
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, s[:2], torch.zeros(4))
    with pytest.raises(ValueError, match="one shape"):
        dino_loss(s + [torch.randn(2, 4)], s[:2], torch.zeros(5))


def test_dino_head_logits_are_cosines_to_unit_prototypes():
    head = DINOHead(6, 11, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 6)
    h = x
    for layer in head.mlp:  # Linear, GELU, Linear, GELU, Linear
        h = layer(h)
    expected = torch.empty(3, 11)
    for b in range(3):
        for k in range(11):
            v = head.prototypes[k]
            expected[b, k] = (h[b] @ v) / (h[b].norm() * v.norm())
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)
    assert head.scale is None  # the norm of the last layer is fixed at 1 (norm_last_layer=True)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    free = DINOHead(6, 11, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    with torch.no_grad():
        free.scale.mul_(2.5)
        free.load_state_dict({**head.state_dict(), "scale": free.scale.clone()})
    torch.testing.assert_close(free(x), 2.5 * expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        DINOHead(6, 11, bottleneck_dim=0)


# ------------------------------------------------------------------------------------------------- task models


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_byol_momentum_update_once_per_training_loss_and_cosine_schedule():
    torch.manual_seed(0)
    model = BYOL(TinyBackbone(), projection_dim=8, hidden_dim=8, momentum=0.9, max_steps=10, image_size=12)
    online, target = nn.ModuleList([model.backbone, model.projector]), \
        nn.ModuleList([model.target_backbone, model.target_projector])
    torch.testing.assert_close(_params(online), _params(target))
    expected_m = [1 - 0.1 * (math.cos(math.pi * k / 10) + 1) / 2 for k in range(3)]  # BYOL's schedule by hand
    for k in range(3):
        with torch.no_grad():  # stands in for the optimizer step of the previous iteration
            for p in online.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        before_t, before_o = _params(target), _params(online)
        out = model.loss(_images())
        assert out["momentum"].item() == pytest.approx(expected_m[k], rel=1e-6)
        assert int(model.step) == k + 1
        for t_new, t_old, o in zip(_params(target), before_t, before_o):
            torch.testing.assert_close(t_new, expected_m[k] * t_old + (1 - expected_m[k]) * o)
    # eval mode: no update, no step
    model.eval()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = _params(target)
    model.loss(_images())
    torch.testing.assert_close(_params(target), before)
    assert int(model.step) == 3


def test_byol_constant_momentum_and_stop_gradient():
    model = BYOL(TinyBackbone(), projection_dim=8, hidden_dim=8, momentum=0.5)
    assert model.current_momentum().item() == 0.5
    out = model.loss(_images())
    out["loss"].backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters()) > 0
    assert 0.0 <= out["loss"].item() <= 8.0  # two terms of 2 - 2 cos


def test_byol_loss_equals_hand_computation():
    model = BYOL(TinyBackbone(norm=False), projection_dim=6, hidden_dim=6, views=FixedViews()).eval()
    x = _images(5)
    v1, v2 = x, x.flip(-1)
    p1, p2 = (model.predictor(model.projector(_pool(model.backbone, v))) for v in (v1, v2))
    z1, z2 = (model.target_projector(_pool(model.target_backbone, v)) for v in (v1, v2))
    cos = nn.functional.cosine_similarity
    expected = (2 - 2 * cos(p1, z2)).mean() + (2 - 2 * cos(p2, z1)).mean()
    assert model.loss(x)["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_simsiam_gradient_reaches_each_projection_only_through_its_predictor():
    model = SimSiam(TinyBackbone(), projection_dim=6, hidden_dim=8, prediction_hidden_dim=4, views=FixedViews())
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    model.projector.register_forward_hook(keep)
    out = model.loss(_images(5))
    out["loss"].backward()
    z1, z2 = captured
    # by hand: with the stop-gradient, dL/dz1 is the gradient of 0.5 * D(predictor(z1), z2) alone; the term
    # D(p2, z1) would add a second path without it
    z1_leaf = z1.detach().requires_grad_(True)
    cos = nn.functional.cosine_similarity(model.predictor(z1_leaf), z2.detach(), dim=-1)
    (expected,) = torch.autograd.grad(-0.5 * cos.mean(), z1_leaf)
    torch.testing.assert_close(z1.grad, expected, rtol=1e-4, atol=1e-7)
    assert set(out) == {"loss", "z_std"} and -1.0 <= out["loss"].item() <= 1.0
    assert 0.0 < out["z_std"].item() <= 1.0


class FixedViews(nn.Module):
    """Deterministic views: the batch, its horizontal flip, then (for DINO) 8x8 corner crops."""

    def __init__(self, num_local: int = 0) -> None:
        super().__init__()
        self.num_local = num_local

    def forward(self, x):
        local = [x[..., :8, :8], x[..., 8:, 8:], x[..., :8, 8:]][: self.num_local]
        return [x, x.flip(-1)] + local


def test_dino_center_is_the_hand_ema_of_the_teacher_mean_and_the_loss_uses_the_old_center():
    torch.manual_seed(0)
    model = DINO(TinyBackbone(norm=False), out_dim=12, hidden_dim=8, bottleneck_dim=4, num_local=2,
                 views=FixedViews(2), center_momentum=0.8)
    x = _images(3)
    views = [x, x.flip(-1), x[..., :8, :8], x[..., 8:, 8:]]
    center = torch.zeros(12)
    for k in range(2):
        t_backbone, t_head = copy.deepcopy(model.teacher_backbone), copy.deepcopy(model.teacher_head)
        if k == 1:  # stands in for an optimizer step: the teacher then moves 0.4% of the way to the student
            with torch.no_grad():
                for p in [*model.backbone.parameters(), *model.head.parameters()]:
                    p.add_(torch.randn_like(p) * 0.5)
        with torch.no_grad():
            for t, s in zip([*t_backbone.parameters(), *t_head.parameters()],
                            [*model.backbone.parameters(), *model.head.parameters()]):
                t.copy_(0.996 * t + 0.004 * s)
            teacher = [t_head(_pool(t_backbone, v)) for v in views[:2]]
            student = [model.head(_pool(model.backbone, v)) for v in views]
        expected_loss = dino_by_hand(student, teacher, center, 0.1, 0.04)
        mean = sum(t.sum(0) for t in teacher) / (2 * 3)
        center = 0.8 * center + 0.2 * mean
        out = model.loss(x)
        assert out["loss"].item() == pytest.approx(expected_loss, rel=1e-4)
        torch.testing.assert_close(model.center, center.view(1, 12), rtol=1e-5, atol=1e-7)
    assert int(model.step) == 2
    model.eval()
    model.loss(x)
    torch.testing.assert_close(model.center, center.view(1, 12), rtol=1e-5, atol=1e-7)
    assert int(model.step) == 2


def test_dino_teacher_update_and_stop_gradient():
    model = DINO(TinyBackbone(), out_dim=12, hidden_dim=8, bottleneck_dim=4, num_local=1, momentum=0.7,
                 max_steps=4, global_size=12, local_size=6)
    student = nn.ModuleList([model.backbone, model.head])
    teacher = nn.ModuleList([model.teacher_backbone, model.teacher_head])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    t_old, s_old = _params(teacher), _params(student)
    out = model.loss(_images())
    assert out["momentum"].item() == pytest.approx(0.7)  # cosine schedule at step 0: the base momentum
    for t_new, t, s in zip(_params(teacher), t_old, s_old):
        torch.testing.assert_close(t_new, 0.7 * t + 0.3 * s)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters()) > 0
    assert model.current_momentum().item() == pytest.approx(1 - 0.3 * (math.cos(math.pi / 4) + 1) / 2)


@pytest.mark.parametrize("cls", ["byol", "simsiam", "dino"])
@pytest.mark.parametrize("sized", [False, True])
def test_task_model_trains_three_steps(cls, sized):
    backbone = TinyBackbone()
    if cls == "byol":
        model = BYOL(backbone, projection_dim=8, hidden_dim=8, max_steps=3, image_size=12 if sized else None)
    elif cls == "simsiam":
        model = SimSiam(backbone, projection_dim=8, hidden_dim=8, prediction_hidden_dim=4,
                        image_size=12 if sized else None)
    else:
        model = DINO(backbone, out_dim=16, hidden_dim=8, bottleneck_dim=4, num_local=2,
                     global_size=12 if sized else None)
    keys = set(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        losses = model.loss(_images(), torch.arange(4))
        assert torch.isfinite(losses["loss"])
        losses["loss"].backward()
        grads = [p.grad for p in backbone.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        opt.step()
    assert set(model.state_dict()) == keys  # views built for the input's size are not part of the checkpoint
    size = {"global_size" if cls == "dino" else "image_size": 12 if sized else None}
    fresh = type(model)(TinyBackbone(), **({"projection_dim": 8, "hidden_dim": 8} if cls != "dino" else
                                           {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4, "num_local": 2}),
                        **({"prediction_hidden_dim": 4} if cls == "simsiam" else {}), **size)
    fresh.load_state_dict(model.state_dict())
    x = _images(3)
    torch.testing.assert_close(model(x), backbone(x)[-1].sum((2, 3)) / 16)
    assert model.signature == backbone.signature


def test_dino_default_local_crops_follow_the_paper_ratio():
    model = DINO(TinyBackbone(), out_dim=8, hidden_dim=8, bottleneck_dim=4, num_local=3, global_size=28)
    views = model.views(torch.rand(2, 3, 32, 32))
    assert [tuple(v.shape[-2:]) for v in views] == [(28, 28)] * 2 + [(12, 12)] * 3


def test_task_model_validation():
    b = TinyBackbone()
    with pytest.raises(ValueError, match="momentum"):
        BYOL(b, momentum=1.5)
    with pytest.raises(ValueError, match="final_momentum"):
        BYOL(b, final_momentum=-0.1)
    with pytest.raises(ValueError, match="max_steps"):
        BYOL(b, max_steps=0)
    with pytest.raises(ValueError, match="projection_dim"):
        BYOL(b, projection_dim=0)
    with pytest.raises(ValueError, match="prediction_hidden_dim"):
        SimSiam(b, prediction_hidden_dim=0)
    with pytest.raises(ValueError, match="teacher_temp"):
        DINO(b, teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp"):
        DINO(b, student_temp=-0.1)
    with pytest.raises(ValueError, match="center_momentum"):
        DINO(b, center_momentum=2.0)
    with pytest.raises(ValueError, match="momentum"):
        DINO(b, momentum=-0.5)
    with pytest.raises(ValueError, match="out_dim"):
        DINO(b, out_dim=0)
    with pytest.raises(ValueError, match="two views"):
        DINO(b, num_global=1, num_local=0)
    with pytest.raises(ValueError, match="local_size"):
        DINO(b, local_size=0)
    with pytest.raises(ValueError, match="backbone"):
        SimSiam(nn.Linear(3, 3))
    for model in (BYOL(b, projection_dim=4, hidden_dim=4), SimSiam(b, projection_dim=4, hidden_dim=4)):
        with pytest.raises(ValueError, match="at least 2"):
            model.loss(_images(1))
    dino = DINO(b, out_dim=8, hidden_dim=8, bottleneck_dim=4, num_local=2, views=FixedViews(1))
    with pytest.raises(ValueError, match="views"):
        dino.loss(_images())
    step = int(dino.step)
    with pytest.raises(ValueError, match="channels"):
        dino.loss(torch.rand(2, 1, 16, 16))
    assert int(dino.step) == step  # a rejected batch does not advance the schedule


# ------------------------------------------------------------------------------------------- under DDP (Gloo)

WORKER = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from cvzoo.ssl.self_distillation import DINO
from cvzoo.types import FeatureInfo, Signature

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, 2, 1)
        self.feature_info = (FeatureInfo(4, 2),)
        self.signature = Signature(min_size=2)

    def forward(self, x):
        return [self.body(x)]

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
model = DINO(Tiny(), out_dim=5, hidden_dim=4, bottleneck_dim=3)
torch.manual_seed(0)
logits = [torch.randn(6, 5), torch.randn(6, 5)]  # the teacher's two global views on the whole batch
model._update_center([t[3 * rank:3 * rank + 3] for t in logits])
torch.save(model.center, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_dino_center_under_two_gloo_ranks_is_the_global_batch_mean(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    torch.manual_seed(0)
    logits = [torch.randn(6, 5), torch.randn(6, 5)]
    expected = (0.1 * (logits[0].sum(0) + logits[1].sum(0)) / 12).view(1, 5)
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), expected)
