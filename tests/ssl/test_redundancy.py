"""Barlow Twins and VICReg: the losses against explicit sums and the papers' formulas, lightly's losses, a
two-process Gloo run against the single-process loss on the whole batch, and the task models training."""

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

from cvzoo.ssl.redundancy import BarlowTwins, VICReg, barlow_twins_loss, vicreg_loss
from cvzoo.types import FeatureInfo, Signature

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBackbone(nn.Module):
    """(B, 3, H, W) -> [(B, width, H / 4, W / 4)], with BatchNorm: a few hundred parameters."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 2, 1))
        self.feature_info = (FeatureInfo(width, 4),)
        self.signature = Signature(min_size=4, outputs=("c2",))

    def forward(self, x):
        return [self.body(x)]


# ------------------------------------------------------------------------------------------------- Barlow Twins


def barlow_by_hand(z1, z2, lambd):
    """The paper's definition with explicit sums: standardise each dimension over the batch (biased variance,
    BatchNorm's eps 1e-5), C_ij = sum_b a_bi b_bj / N, loss = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2."""
    n, d = z1.shape
    z1, z2 = z1.double(), z2.double()

    def standardise(z):
        out = torch.empty_like(z)
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b, j] = (z[b, j] - mean) / math.sqrt(var + 1e-5)
        return out

    a, b_ = standardise(z1), standardise(z2)
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[b, i] * b_[b, j] for b in range(n)) / n
            if i == j:
                on += (1 - c) ** 2
            else:
                off += c ** 2
    return float(on + lambd * off), float(on), float(off)


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_loss_against_explicit_sums(lambd):
    z1, z2 = torch.randn(6, 4) * 3 + 1, torch.randn(6, 4)
    expected, _, _ = barlow_by_hand(z1, z2, lambd)
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_loss_of_identical_decorrelated_views_is_zero():
    # the columns of a scaled Hadamard basis are orthogonal with zero mean: C is the identity
    h = torch.tensor([[1., 1., 1., 1.], [1., -1., 1., -1.], [1., 1., -1., -1.], [1., -1., -1., 1.]])
    z = h[:, 1:] * 7 + 3  # (4, 3): zero-mean after centring, orthogonal, variance 1 once standardised
    assert barlow_twins_loss(z, z).item() == pytest.approx(3 * (1 - 1 / (1 + 1e-5 / 49)) ** 2, abs=1e-6)


def test_barlow_twins_loss_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    for lambd in (5e-3, 0.1):
        ref = lightly_loss.BarlowTwinsLoss(lambda_param=lambd)(z1, z2)
        assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(ref.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------ VICReg


def vicreg_by_hand(z1, z2, sim_weight=25.0, var_weight=25.0, cov_weight=1.0, eps=1e-4):
    """VICReg's terms from the paper (Bardes et al. 2022, eq. 1-5) with torch.var and explicit covariances:
    v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + eps)), C(Z) = 1/(n-1) sum_i (z_i - mean)(z_i - mean)^T,
    c(Z) = 1/d sum_{i != j} C(Z)_ij^2, s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2.

    The official code (and cvzoo, and lightly) differ from the paper's equations in two normalisations: the
    invariance is F.mse_loss (also divided by d: s / d) and the variance term averages the two branches
    ((v(Z) + v(Z')) / 2 instead of the sum). Returned in that convention."""
    n, d = z1.shape
    z1, z2 = z1.double(), z2.double()
    s = sum(((z1[i] - z2[i]) ** 2).sum() for i in range(n)) / n

    def v(z):
        return sum(max(0.0, 1 - math.sqrt(torch.var(z[:, j]).item() + eps)) for j in range(d)) / d

    def c(z):
        m = z.mean(0)
        cov = sum(torch.outer(z[i] - m, z[i] - m) for i in range(n)) / (n - 1)
        return sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    inv, var, cov = float(s / d), (v(z1) + v(z2)) / 2, float(c(z1) + c(z2))
    return sim_weight * inv + var_weight * var + cov_weight * cov, inv, var, cov


@pytest.mark.parametrize("scale", [0.3, 3.0])  # below and above unit variance: the hinge off and on
def test_vicreg_loss_against_paper_formulas(scale):
    z1, z2 = torch.randn(7, 5) * scale, torch.randn(7, 5) * scale + 0.5
    total, terms = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=0.5)
    e_total, e_inv, e_var, e_cov = vicreg_by_hand(z1, z2, 2.0, 3.0, 0.5)
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert terms["invariance"].item() == pytest.approx(e_inv, rel=1e-5)
    assert terms["variance"].item() == pytest.approx(e_var, rel=1e-5, abs=1e-7)
    assert terms["covariance"].item() == pytest.approx(e_cov, rel=1e-5)
    assert total.item() == pytest.approx(e_total, rel=1e-5)


def test_vicreg_loss_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    z1, z2 = torch.randn(16, 8) * 0.5, torch.randn(16, 8)
    ref = lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)(z1, z2)
    assert vicreg_loss(z1, z2)[0].item() == pytest.approx(ref.item(), rel=1e-5)


def test_losses_compile_fullgraph_and_run_in_float32():
    z1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, dtype=torch.float64)
    bt = torch.compile(barlow_twins_loss, backend="eager", fullgraph=True)(z1, z2)
    total, terms = torch.compile(vicreg_loss, backend="eager", fullgraph=True)(z1, z2)
    assert bt.dtype == total.dtype == torch.float32
    assert bt.item() == pytest.approx(barlow_twins_loss(z1, z2).item(), rel=1e-6)
    assert total.item() == pytest.approx(vicreg_loss(z1, z2)[0].item(), rel=1e-6)
    (bt + total).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [barlow_twins_loss, vicreg_loss])
def test_losses_reject_bad_input(fn):
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4), torch.randn(4))


def test_loss_weights_are_validated():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="lambd"):
        barlow_twins_loss(z, z, lambd=-1.0)
    with pytest.raises(ValueError, match="var_weight"):
        vicreg_loss(z, z, var_weight=-1.0)
    with pytest.raises(ValueError, match="eps"):
        vicreg_loss(z, z, eps=0.0)


# ------------------------------------------------------------------------------------------- under DDP (Gloo)

WORKER = """
import sys
import torch
import torch.distributed as dist
from cvzoo.ssl.redundancy import barlow_twins_loss, vicreg_loss

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
z1, z2 = torch.randn(8, 5), torch.randn(8, 5) * 2
result = {}
for name, fn in (("barlow", lambda a, b: barlow_twins_loss(a, b)), ("vicreg", lambda a, b: vicreg_loss(a, b)[0])):
    a = z1[4 * rank:4 * rank + 4].clone().requires_grad_(True)
    b = z2[4 * rank:4 * rank + 4].clone().requires_grad_(True)
    loss = fn(a, b)
    loss.backward()
    result[name] = (loss.detach(), a.grad, b.grad)
torch.save(result, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_losses_under_two_gloo_ranks_match_the_whole_batch(tmp_path):
    """Each rank holds half the batch. DDP averages parameter gradients over ranks, so the distributed losses are
    right when mean over ranks of the rank losses == the loss on the whole batch, and (rank r's gradient) / 2 ==
    the whole-batch gradient of rank r's rows."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5).requires_grad_(True), (torch.randn(8, 5) * 2).requires_grad_(True)
    for name, fn in (("barlow", barlow_twins_loss), ("vicreg", lambda a, b: vicreg_loss(a, b)[0])):
        z1.grad = z2.grad = None
        whole = fn(z1, z2)
        whole.backward()
        assert (ranks[0][name][0] + ranks[1][name][0]).item() / 2 == pytest.approx(whole.item(), rel=1e-5)
        for r in range(2):
            rows = slice(4 * r, 4 * r + 4)
            torch.testing.assert_close(ranks[r][name][1] / 2, z1.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ranks[r][name][2] / 2, z2.grad[rows], rtol=1e-4, atol=1e-6)
    # Barlow Twins' loss is the global one on every rank
    assert ranks[0]["barlow"][0].item() == pytest.approx(ranks[1]["barlow"][0].item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------- task models


def _images(b=4, size=16):
    return Signature().normalize(torch.rand(b, 3, size, size))


@pytest.mark.parametrize("cls", [BarlowTwins, VICReg])
@pytest.mark.parametrize("image_size", [None, 12])
def test_task_model_trains(cls, image_size):
    backbone = TinyBackbone()
    model = cls(backbone, projection_dim=16, hidden_dim=16, image_size=image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    keys = set(model.state_dict())
    for _ in range(3):
        opt.zero_grad()
        losses = model.loss(_images(), torch.arange(4))
        assert torch.isfinite(losses["loss"])
        losses["loss"].backward()
        grads = [p.grad for p in backbone.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        opt.step()
    expected = {"loss", "invariance", "redundancy"} if cls is BarlowTwins else \
        {"loss", "invariance", "variance", "covariance"}
    assert set(losses) == expected
    if cls is BarlowTwins:
        assert losses["loss"].item() == pytest.approx(
            (losses["invariance"] + model.lambd * losses["redundancy"]).item(), rel=1e-6)
    else:
        assert losses["loss"].item() == pytest.approx(
            (25 * losses["invariance"] + 25 * losses["variance"] + losses["covariance"]).item(), rel=1e-6)
    # the views built for the input's size stay out of the state_dict: checkpoints do not depend on it
    assert set(model.state_dict()) == keys
    x = _images(3)
    torch.testing.assert_close(model(x), backbone(x)[-1].sum((2, 3)) / 16)
    assert model.signature == backbone.signature


class FixedViews(nn.Module):
    """Two deterministic views: the batch and its horizontal flip."""

    def forward(self, x):
        return [x, x.flip(-1)]


def test_task_model_loss_is_the_loss_of_its_embeddings():
    backbone = TinyBackbone()
    model = VICReg(backbone, projection_dim=8, hidden_dim=8, views=FixedViews()).eval()
    x = _images(5)
    z1 = model.projector(backbone(x)[-1].mean((2, 3)))
    z2 = model.projector(backbone(x.flip(-1))[-1].mean((2, 3)))
    # the views are built in [0, 1] and normalised back: the round trip is exact up to rounding
    assert model.loss(x)["loss"].item() == pytest.approx(vicreg_by_hand(z1.detach(), z2.detach())[0], rel=1e-4)
    bt = BarlowTwins(backbone, projection_dim=8, hidden_dim=8, views=FixedViews()).eval()
    z1 = bt.projector(backbone(x)[-1].mean((2, 3)))
    z2 = bt.projector(backbone(x.flip(-1))[-1].mean((2, 3)))
    assert bt.loss(x)["loss"].item() == pytest.approx(barlow_by_hand(z1.detach(), z2.detach(), 5e-3)[0], rel=1e-4)


@pytest.mark.parametrize("cls", [BarlowTwins, VICReg])
def test_task_model_validation(cls):
    backbone = TinyBackbone()
    with pytest.raises(ValueError, match="projection_dim"):
        cls(backbone, projection_dim=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        cls(backbone, hidden_dim=-3)
    with pytest.raises(ValueError, match="image_size"):
        cls(backbone, image_size=(4, 4, 4))
    with pytest.raises(ValueError, match="backbone"):
        cls(nn.Conv2d(3, 3, 1))
    model = cls(backbone, projection_dim=8, hidden_dim=8, views=FixedViews())
    with pytest.raises(ValueError, match="at least 2"):
        model.loss(_images(1))
    with pytest.raises(ValueError, match="channels"):
        model.loss(torch.rand(4, 1, 16, 16))
    bad = cls(backbone, projection_dim=8, hidden_dim=8, views=nn.Identity())
    with pytest.raises(ValueError, match="views"):
        bad.loss(_images())
