"""Redundancy reduction: Barlow Twins (Zbontar et al. 2021) and VICReg (Bardes et al. 2022). Two views of a
batch are embedded by one network; the loss makes the embeddings invariant across views while keeping each
dimension informative and decorrelated from the others, with no negatives, predictor or momentum network.

Both losses use statistics over the batch. Under DDP (torch.distributed initialised, world size > 1) those
statistics cover the global batch, as in the official code, and every rank computes the same global value;
the collectives are autograd-aware (their backward sums each rank's gradient), so DDP's gradient averaging
gives exactly the gradient of the single-process loss on the concatenated batch. Every rank must pass the same
batch size and call the loss at each step.
"""

from __future__ import annotations

from torch import Tensor, nn

from cvzoo.backbones.base import last_map_channels
from cvzoo.ssl.gather import gather_with_grad, rank_and_world
from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.method import _check_positive_int, _pool, _ViewsMixin
from cvzoo.ssl.views import byol_views


def _all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks with gradients (the backward all-reduces the gradient); identity in one process."""
    _, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_reduce  # autograd-aware, unlike dist.all_reduce

    return all_reduce(x)


def _check_embeddings(z1: object, z2: object, fn: str) -> None:
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.ndim != 2 or z1.shape != z2.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (z1, z2)]
        raise ValueError(f"{fn} needs two embedding batches of the same shape (B, D), got {shapes[0]} and "
                         f"{shapes[1]}")
    if z1.shape[0] < 2:
        raise ValueError(f"{fn} needs a batch of at least 2 embeddings (it uses batch statistics), got shape "
                         f"{tuple(z1.shape)}")


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _standardize(z: Tensor, n: int) -> Tensor:
    """Affine-free BatchNorm in training mode over the global batch of `n` rows: (z - mean) / sqrt(var + 1e-5),
    var biased (as BatchNorm1d normalises). (B, D) -> (B, D)."""
    mean = _all_reduce_sum(z.sum(0)) / n  # (D,)
    centred = z - mean
    var = _all_reduce_sum(centred.square().sum(0)) / n
    return centred * (var + 1e-5).rsqrt()


def _barlow_twins_terms(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """(invariance, redundancy): sum_i (1 - C_ii)^2 and sum_{i != j} C_ij^2 of the cross-correlation C."""
    _check_embeddings(z1, z2, "barlow_twins_loss")
    _, world = rank_and_world()
    n = z1.shape[0] * world
    a, b = _standardize(z1.float(), n), _standardize(z2.float(), n)
    # each rank holds a slice of the sum over the batch: all-reduce the (D, D) products, as the official code does
    # (cheaper than gathering the embeddings and multiplying the global batch on every rank)
    c = _all_reduce_sum(a.T @ b) / n  # (D, D)
    diag = c.diagonal()
    invariance = (1 - diag).square().sum()
    redundancy = c.square().sum() - diag.square().sum()
    return invariance, redundancy


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> Tensor:
    """Barlow Twins. (B, D), (B, D) -> (): sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.

    C = A^T B / N is the cross-correlation of the embeddings standardised over the batch (affine-free
    BatchNorm: mean 0, biased variance 1, eps 1e-5; the paper's final `bn`), N the batch size. Under DDP the
    statistics and the products are summed over ranks (the official code's synchronised BatchNorm and
    `all_reduce(c)`), so C is the global batch's. Float32; B >= 2.
    """
    lambd = _check_weight("lambd", lambd)
    invariance, redundancy = _barlow_twins_terms(z1, z2)
    return invariance + lambd * redundancy


def vicreg_loss(z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg. (B, D), (B, D) -> (total (), {"invariance", "variance", "covariance"} unweighted), as the official
    code computes them:

    - invariance: mean squared error between z1 and z2 (mean over B * D entries);
    - variance: (mean_d relu(1 - sqrt(Var(z1_d) + eps)) + the same for z2) / 2, unbiased variance;
    - covariance: (sum_{i != j} Cov(z1)_ij^2 + the same for z2) / D, unbiased covariance.

    total = sim_weight * invariance + var_weight * variance + cov_weight * covariance. Under DDP the invariance
    is over the local batch and the variance and covariance over the batch gathered from all ranks
    (`gather_with_grad`), as in the official code. Float32; B >= 2.
    """
    _check_embeddings(z1, z2, "vicreg_loss")
    sim_weight = _check_weight("sim_weight", sim_weight)
    var_weight = _check_weight("var_weight", var_weight)
    cov_weight = _check_weight("cov_weight", cov_weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number (it keeps the square root's gradient finite), got {eps!r}")
    z1, z2 = z1.float(), z2.float()
    invariance = (z1 - z2).square().mean()
    z1, z2 = gather_with_grad(z1), gather_with_grad(z2)  # (W * B, D)
    n, d = z1.shape
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(0)
        std = (z.square().sum(0) / (n - 1) + eps).sqrt()  # (D,)
        variance = variance + (1 - std).relu().mean() / 2
        cov = z.T @ z / (n - 1)  # (D, D)
        covariance = covariance + (cov.square().sum() - cov.diagonal().square().sum()) / d
    total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return total, {"invariance": invariance, "variance": variance, "covariance": covariance}


class _TwoViewEmbedding(_ViewsMixin, nn.Module):
    """backbone -> projector ("expander": MLPHead of 3 Linear layers with BatchNorm and ReLU between them) on
    each of two views, each view its own batch. Views: `views` or two draws of the Barlow Twins / VICReg
    augmentation at `image_size` (None: the input's size): crop scale 0.08-1, flip, colour jitter, grayscale,
    Gaussian blur p 1.0 / 0.1, solarisation p 0 / 0.2 (BYOL's pair, which both papers use)."""

    def __init__(self, backbone: nn.Module, projection_dim: int, hidden_dim: int, views: nn.Module | None,
                 image_size: int | tuple[int, int] | None) -> None:
        super().__init__()
        dim = last_map_channels(backbone, type(self).__name__)
        _check_positive_int("projection_dim", projection_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.backbone = backbone
        self.projector = MLPHead(dim, hidden_dim, projection_dim, num_layers=3)
        self._init_views(backbone, views, image_size)

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        return byol_views(size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised -> (B, D) pooled backbone features."""
        return _pool(self.backbone, images)

    def _embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        v1, v2 = self._make_views(images, min_batch=2, num_views=2)
        return self.projector(_pool(self.backbone, v1)), self.projector(_pool(self.backbone, v2))


class BarlowTwins(_TwoViewEmbedding):
    """Barlow Twins (Zbontar et al. 2021). (B, C, H, W) normalised images -> pooled features (B, D).

    backbone -> projector (D -> hidden_dim -> hidden_dim -> projection_dim); `loss(images)` returns
    {"loss": barlow_twins_loss(z1, z2, lambd), "invariance": sum_i (1 - C_ii)^2, "redundancy":
    sum_{i != j} C_ij^2 (unweighted)}. `lambd` = 5e-3 is the paper's value for 8192 dimensions; it balances a
    term over D entries against one over D^2 - D, so scale it roughly as 1 / projection_dim when changing the
    width by a lot. Needs batches of at least 2 images. See the module docstring for DDP.
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 1024, hidden_dim: int = 1024,
                 lambd: float = 5e-3, views: nn.Module | None = None,
                 image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(backbone, projection_dim, hidden_dim, views, image_size)
        self.lambd = _check_weight("lambd", lambd)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images (B >= 2); `targets` ignored -> {"loss", "invariance", "redundancy"}."""
        invariance, redundancy = _barlow_twins_terms(*self._embeddings(images))
        return {"loss": invariance + self.lambd * redundancy, "invariance": invariance, "redundancy": redundancy}


class VICReg(_TwoViewEmbedding):
    """Variance-Invariance-Covariance Regularisation (Bardes et al. 2022). (B, C, H, W) -> pooled features (B, D).

    backbone -> expander (D -> hidden_dim -> hidden_dim -> projection_dim); `loss(images)` returns
    {"loss": vicreg_loss(z1, z2, ...) total, "invariance", "variance", "covariance" (unweighted)} with the
    paper's weights 25 / 25 / 1 by default. Needs batches of at least 2 images. See the module docstring for DDP.
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 1024, hidden_dim: int = 1024,
                 sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0, eps: float = 1e-4,
                 views: nn.Module | None = None, image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(backbone, projection_dim, hidden_dim, views, image_size)
        self.sim_weight = _check_weight("sim_weight", sim_weight)
        self.var_weight = _check_weight("var_weight", var_weight)
        self.cov_weight = _check_weight("cov_weight", cov_weight)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.eps = float(eps)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images (B >= 2); `targets` ignored -> {"loss", "invariance", "variance",
        "covariance"}."""
        total, terms = vicreg_loss(*self._embeddings(images), self.sim_weight, self.var_weight, self.cov_weight,
                                   self.eps)
        return {"loss": total, **terms}
