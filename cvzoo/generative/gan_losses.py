"""GAN losses on discriminator logits, and the gradient penalties (WGAN-GP, R1).

Logits are raw discriminator outputs, any shape (usually (B,)); every loss is a batch mean and runs in
at least float32 under autocast (half-precision inputs are cast first). Loss kinds:

- "non_saturating" (Goodfellow et al. 2014, the -log D trick): D: softplus(-real) + softplus(fake), i.e.
  BCE with logits against ones for real and zeros for fake; G: softplus(-fake), i.e. BCE against ones.
- "hinge" (Lim & Ye 2017, Miyato et al. 2018): D: relu(1 - real) + relu(1 + fake); G: -fake.
- "wasserstein" (Arjovsky et al. 2017): D: fake - real; G: -fake. Needs a Lipschitz critic: pair it with
  `gradient_penalty` (WGAN-GP) or spectral norm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS = ("non_saturating", "hinge", "wasserstein")


def _wide(t: Tensor) -> Tensor:
    # half-precision autocast outputs -> float32; float32 and float64 stay as they are
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_kind(kind: object) -> str:
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    return kind  # type: ignore[return-value]


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Discriminator (critic) loss: logits on real images (B_r,) and on generated ones (B_f,) -> scalar.

    Each side is averaged over its own batch, then the two means are added.
    """
    kind = _check_kind(kind)
    real, fake = _wide(real_logits), _wide(fake_logits)
    if kind == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return fake.mean() - real.mean()


def generator_loss(fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Generator loss: discriminator logits on generated images (B,) -> scalar."""
    kind = _check_kind(kind)
    fake = _wide(fake_logits)
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    return -fake.mean()  # hinge and wasserstein share the generator loss


def gradient_penalty(discriminator_fn: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = a * real + (1 - a) * fake.

    real, fake (B, ...) -> scalar. `a ~ U[0, 1)` is drawn per sample (from `generator` when given, which must
    live on real's device). Both inputs are detached: the penalty trains the critic only. The gradient is
    taken with `create_graph=True`, so the penalty's own backward reaches the critic's parameters.
    Gradients are enabled inside, so it also works under `torch.no_grad()`. The critic must treat samples
    independently (no BatchNorm in train mode): the penalty is a per-sample gradient norm.
    `torch.autograd.grad` with `create_graph=True` is not traced by `torch.compile(fullgraph=True)`.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    alpha = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype,
                       generator=generator)  # (B, 1, ..., 1): one mixing weight per sample
    with torch.enable_grad():
        x_hat = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
        out = discriminator_fn(x_hat)
        (grad,) = torch.autograd.grad(_wide(out).sum(), x_hat, create_graph=True)
        norm = _wide(grad).flatten(1).norm(dim=1)  # (B,)
        return (norm - 1.0).pow(2).mean()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): 0.5 * E[||grad_x D(x)||_2^2] over real images -> scalar.

    `real_logits` (B,) must have been computed from `real_images` (B, ...) with `real_images.requires_grad`.
    The 0.5 is part of the penalty, so a weight gamma gives StyleGAN2's gamma / 2 * E||grad||^2
    (`GAN(r1_gamma=gamma)` multiplies this by gamma). Taken with `create_graph=True` (the penalty trains
    the discriminator), with gradients enabled inside (`real_logits` must still carry their graph); not
    traced by `torch.compile(fullgraph=True)`.
    """
    if not real_images.requires_grad:
        raise ValueError("real_images must require grad (call real_images.requires_grad_() before the "
                         "discriminator computes real_logits from them)")
    with torch.enable_grad():  # the sum, and the penalty's graph, also under an outer torch.no_grad()
        (grad,) = torch.autograd.grad(_wide(real_logits).sum(), real_images, create_graph=True)
        return 0.5 * _wide(grad).flatten(1).pow(2).sum(dim=1).mean()
