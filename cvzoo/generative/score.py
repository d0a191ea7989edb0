"""Noise-conditional score networks (NCSN / NCSNv2, Song & Ermon 2019, 2020): score matching and annealed Langevin.

A score network s(x, sigma) estimates grad_x log p_sigma(x), the score of the data perturbed with
N(0, sigma^2 I) noise, at every level of a descending ladder sigma_1 > ... > sigma_L. It is trained by
denoising score matching (Vincent 2011) or sliced score matching (Song et al. 2019) and sampled with
annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), optionally followed by one Tweedie
denoising step (NCSNv2). Images live in the normalised space [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.layers import ConvNormAct
from cvzoo.types import Signature, cast_like_parameters

OBJECTIVES = ("denoising", "sliced")
PROJECTIONS = ("rademacher", "gaussian")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num_levels: int = 10) -> Tensor:
    """NCSN's noise ladder: (num_levels,) sigmas from sigma_max down to sigma_min with a constant ratio.

    sigma_i = sigma_max * (sigma_min / sigma_max) ** (i / (num_levels - 1)), i = 0 .. num_levels - 1,
    computed in float64 and returned in the default dtype.
    """
    if not isinstance(sigma_min, (int, float)) or not math.isfinite(sigma_min) or sigma_min <= 0:
        raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min!r}")
    if not isinstance(sigma_max, (int, float)) or not math.isfinite(sigma_max) or sigma_max <= sigma_min:
        raise ValueError(f"sigma_max must be a finite number > sigma_min ({sigma_min!r}), got {sigma_max!r}")
    if not _is_int(num_levels) or num_levels < 2:
        raise ValueError(f"num_levels must be an int >= 2, got {num_levels!r}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    return log_sigmas.exp().to(torch.get_default_dtype())


class _NoiseEmbedding(nn.Module):
    """(B,) sigmas -> (B, dim): sinusoids of log(sigma) at fixed, log-spaced frequencies, then an MLP.

    log(sigma) spans a few units (about [-5, 0] for NCSN's ladders), so the frequencies run from 1 to 64
    radians per unit: the slow ones tell the levels apart, the fast ones give the MLP fine detail.
    """

    def __init__(self, num_frequencies: int, dim: int) -> None:
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(64.0), num_frequencies))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: Tensor) -> Tensor:
        angles = sigma.float().log()[:, None] * self.freqs.float()[None]  # (B, F), float32 for any model dtype
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1).to(self.freqs.dtype))  # (B, dim)


class _ResBlock(nn.Module):
    """(B, C_in, H, W), (B, E) -> (B, C_out, H, W): conv-GroupNorm, + noise embedding, SiLU, conv-GroupNorm,
    residual, SiLU. The embedding enters as a per-channel shift after the first normalisation."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, norm_groups: int) -> None:
        super().__init__()
        norm = partial(nn.GroupNorm, norm_groups)  # GroupNorm(num_groups, num_channels); per sample, no batch mixing
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, norm_layer=norm, act_layer=None)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, norm_layer=norm, act_layer=None)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.act(self.conv1(x) + self.emb(emb)[:, :, None, None])
        return self.act(self.conv2(h) + self.skip(x))


class ScoreNetwork(nn.Module):
    """Small noise-conditional score network. (B, C, H, W), sigma (B,) -> score (B, C, H, W).

    A compact UNet: a residual block per level of `channel_mults` (widths `base_channels * m`), stride-2
    convs between levels, a middle block, and an up path that concatenates the skip of each level and
    upsamples with `interpolate(size=...)` (any H, W works). Every block receives an embedding of
    log(sigma). The output is divided by sigma (NCSNv2's scaling): the true score of the perturbed data has
    norm ~ sqrt(D) / sigma, so the network itself only has to produce unit-scale values at every level.

    GroupNorm keeps samples independent, which sliced score matching needs (its Jacobian-vector product is
    taken through the batch sum); a user-supplied network for `NCSN` must not mix samples either.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        if not _is_int(in_channels) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        if not _is_int(base_channels) or base_channels < 1:
            raise ValueError(f"base_channels must be an int >= 1, got {base_channels!r}")
        mults = tuple(channel_mults)
        if not mults or not all(_is_int(m) and m >= 1 for m in mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1, got {channel_mults!r}")
        if not _is_int(norm_groups) or norm_groups < 1:
            raise ValueError(f"norm_groups must be an int >= 1, got {norm_groups!r}")
        chans = [base_channels * m for m in mults]
        if any(c % norm_groups for c in chans):
            raise ValueError(f"norm_groups={norm_groups} must divide every width base_channels * channel_mults "
                             f"= {chans}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.channel_mults = mults
        emb_dim = 4 * base_channels
        self.embed = _NoiseEmbedding(max(base_channels // 2, 4), emb_dim)
        self.stem = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = chans[0]
        for c in chans:
            self.down.append(_ResBlock(prev, c, emb_dim, norm_groups))
            prev = c
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in chans[:-1])
        self.mid = _ResBlock(chans[-1], chans[-1], emb_dim, norm_groups)
        self.up = nn.ModuleList()
        for c in reversed(chans):
            self.up.append(_ResBlock(prev + c, c, emb_dim, norm_groups))
            prev = c
        # after the up block of level i >= 1: upsample to level i - 1's size, then a 3x3 conv
        self.upsample = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in reversed(chans[1:]))
        self.head = nn.Sequential(nn.GroupNorm(norm_groups, chans[0]), nn.SiLU(),
                                  nn.Conv2d(chans[0], in_channels, 3, padding=1))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """(B, C, H, W), sigma (B,) or () -> score (B, C, H, W) = net(x, sigma) / sigma."""
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        emb = self.embed(sigma)  # (B, 4 * base_channels)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):  # fixed number of levels
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsample):  # size= keeps odd sizes working (stride 2 rounded up on the way down)
                h = self.upsample[j](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.head(h) / sigma.to(h.dtype).view(-1, 1, 1, 1)


def _check_sigmas(sigmas: Tensor | Sequence[float]) -> Tensor:
    sigmas = torch.as_tensor(sigmas)
    if not sigmas.is_floating_point():
        sigmas = sigmas.to(torch.get_default_dtype())
    values = sigmas.tolist() if sigmas.ndim == 1 else None
    if (values is None or not values or not all(math.isfinite(s) and s > 0 for s in values)
            or any(b >= a for a, b in zip(values, values[1:]))):
        raise ValueError(f"sigmas must be a non-empty 1-D tensor of finite, positive, strictly decreasing noise "
                         f"levels (largest first), got {sigmas!r}")
    return sigmas


class NCSN(nn.Module):
    """Noise-conditional score model: trains `score_network` by score matching, samples by annealed Langevin.

    `score_network(x (B, C, S, S), sigma (B,)) -> score (B, C, S, S)` (e.g. `ScoreNetwork`) with an
    `in_channels` attribute. `sigmas` (L,) is the descending noise ladder (default `geometric_sigmas(1.0,
    0.01, 10)`), kept as a non-persistent buffer (it is constructor configuration).

    `loss(images)` draws one level per sample and perturbs x~ = x + sigma z, z ~ N(0, I). Both objectives
    weight each sample by sigma^anneal_power (NCSN's lambda(sigma) = sigma^2 makes all levels O(1)) and
    average over the batch:

    - "denoising" (Vincent 2011): 0.5 * ||s(x~, sigma) - target||^2 summed over pixels, with
      target = grad log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2 = -z / sigma.
    - "sliced" (Song et al. 2019): sliced score matching *on the perturbed data* at the sampled sigma,
      v^T (ds/dx~) v + 0.5 (v^T s)^2 with `num_projections` projections v per sample (Rademacher or
      Gaussian, E[v v^T] = I), the Jacobian-vector product by one `autograd.grad(create_graph=True)`.
      Its minimiser is the score of the perturbed data; the value is not bounded below by 0. The network
      must keep samples independent (no BatchNorm).

    Images are normalised to [-1, 1] (`signature`: mean = std = 0.5); `sample` returns [0, 1] images.
    """

    def __init__(
        self,
        score_network: nn.Module,
        *,
        image_size: int,
        sigmas: Tensor | None = None,
        objective: str = "denoising",
        num_projections: int = 1,
        projection: str = "rademacher",
        anneal_power: float = 2.0,
    ) -> None:
        super().__init__()
        in_channels = getattr(score_network, "in_channels", None)
        if not isinstance(score_network, nn.Module) or not _is_int(in_channels) or in_channels < 1:
            raise ValueError(f"score_network must be an nn.Module with an int in_channels attribute, "
                             f"got {type(score_network).__name__} with in_channels={in_channels!r}")
        if not _is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if not _is_int(num_projections) or num_projections < 1:
            raise ValueError(f"num_projections must be an int >= 1, got {num_projections!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if not isinstance(anneal_power, (int, float)) or not math.isfinite(anneal_power) or anneal_power < 0:
            raise ValueError(f"anneal_power must be a finite number >= 0, got {anneal_power!r}")
        self.score_network = score_network
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = None
        self.objective = objective
        self.num_projections = num_projections
        self.projection = projection
        self.anneal_power = float(anneal_power)
        sigmas = geometric_sigmas(1.0, 0.01, 10) if sigmas is None else _check_sigmas(sigmas)
        self.register_buffer("sigmas", sigmas.clone(), persistent=False)
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.5,) * in_channels,
                                   outputs=("score",))

    @property
    def num_levels(self) -> int:
        return self.sigmas.shape[0]

    def forward(self, images: Tensor, sigma: Tensor) -> Tensor:
        """(B, C, S, S) normalised (noisy) images, sigma (B,) -> score (B, C, S, S)."""
        return self.score_network(images, sigma)

    def _check_images(self, images: object, name: str = "images") -> Tensor:
        images = self.signature.validate(images, name)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{name} of size {images.shape[-2]}x{images.shape[-1]} do not match image_size="
                             f"{self.image_size}; expected (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size})")
        return images

    def _draw_projections(self, like: Tensor) -> Tensor:
        """(B, C, S, S) -> (num_projections, B, C, S, S) random projections with E[v v^T] = I."""
        shape = (self.num_projections, *like.shape)
        if self.projection == "gaussian":
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """(B, C, S, S) normalised images -> {"loss"}; `targets` are ignored (unconditional model)."""
        images = cast_like_parameters(self._check_images(images), self)
        level_idx = torch.randint(0, self.num_levels, (images.shape[0],), device=images.device)
        noise = torch.randn_like(images)
        projections = self._draw_projections(images) if self.objective == "sliced" else None
        return self._loss_terms(images, noise, level_idx, projections)

    def _loss_terms(self, images: Tensor, noise: Tensor, level_idx: Tensor,
                    projections: Tensor | None = None) -> dict[str, Tensor]:
        """The loss for given randomness: noise z (B, C, S, S), level indices (B,) into `sigmas`, and for the
        sliced objective projections v (M, B, C, S, S). Drawn by `loss`; tests inject them."""
        sigma = self.sigmas[level_idx].to(images.dtype)  # (B,)
        perturbed = images + sigma.view(-1, 1, 1, 1) * noise
        acc = torch.promote_types(images.dtype, torch.float32)  # float32 (float64 kept) under autocast / half
        if self.objective == "denoising":
            score = self.score_network(perturbed, sigma).to(acc)
            target = -noise.to(acc) / sigma.to(acc).view(-1, 1, 1, 1)  # -(x~ - x) / sigma^2
            per_sample = 0.5 * (score - target).pow(2).flatten(1).sum(1)  # (B,)
            weight = sigma.to(acc) ** self.anneal_power
        else:
            if projections is None:
                projections = self._draw_projections(images)
            per_sample, weight = self._sliced_terms(perturbed, sigma, projections)
        return {"loss": (weight * per_sample).mean()}

    def _sliced_terms(self, perturbed: Tensor, sigma: Tensor, projections: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) perturbed data, (B,) sigma, (M, B, C, S, S) projections -> per-(projection, sample)
        SSM values (M * B,) and their weights (M * B,)."""
        m = projections.shape[0]
        # all M projections in one network call: the batch repeated M times, rows ordered (projection, sample)
        x = perturbed.detach().unsqueeze(0).expand(m, *perturbed.shape).reshape(-1, *perturbed.shape[1:])
        x.requires_grad_(True)
        sig = sigma.repeat(m)  # (M * B,) matches the (projection, sample) order
        acc = torch.promote_types(perturbed.dtype, torch.float32)
        v = projections.reshape(x.shape).to(acc)
        with torch.enable_grad():  # the Jacobian term needs a graph even when loss is evaluated under no_grad
            score = self.score_network(x, sig).to(acc)
            v_s = (v * score).flatten(1).sum(1)  # (M * B,) v^T s
            # samples are independent, so grad of the batch sum w.r.t. x_b is J_b^T v_b (one backward for all)
            (jtv,) = torch.autograd.grad(v_s.sum(), x, create_graph=True)
        v_j_v = (v * jtv.to(acc)).flatten(1).sum(1)  # (M * B,) v^T J v
        return v_j_v + 0.5 * v_s.pow(2), sig.to(acc) ** self.anneal_power

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        steps_per_level: int = 100,
        step_lr: float = 2e-5,
        denoise: bool = True,
        init: Tensor | None = None,
        return_trajectory: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) -> (num_samples, C, S, S) in [0, 1].

        For each sigma_i (largest first), `steps_per_level` steps of
        x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) z, with alpha_i = step_lr * sigma_i^2 / sigma_L^2.
        x starts uniform in [-1, 1] (normalised space) unless `init` (num_samples, C, S, S) is given.
        `denoise=True` ends with Tweedie's step x <- x + sigma_L^2 s(x, sigma_L) (NCSNv2), which removes the
        sigma_L noise the chain leaves. `generator` (on the model's device) makes the run reproducible.
        `return_trajectory=True` also returns (L, num_samples, C, S, S): the [0, 1] images after each level.
        """
        if labels is not None:
            raise ValueError("labels were given but NCSN is unconditional (num_classes=None); pass labels=None")
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not _is_int(steps_per_level) or steps_per_level < 1:
            raise ValueError(f"steps_per_level must be an int >= 1, got {steps_per_level!r}")
        if not isinstance(step_lr, (int, float)) or not math.isfinite(step_lr) or step_lr <= 0:
            raise ValueError(f"step_lr must be a finite number > 0, got {step_lr!r}")
        device, dtype = self.sigmas.device, self.sigmas.dtype
        shape = (num_samples, self.in_channels, self.image_size, self.image_size)
        if init is None:
            x = torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
        else:
            if not isinstance(init, Tensor) or tuple(init.shape) != shape or not init.is_floating_point():
                got = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
                raise ValueError(f"init must be a floating tensor of shape {shape} (normalised images), got {got}")
            x = init.to(device=device, dtype=dtype)
        sigma_last = self.sigmas[-1]
        trajectory = []
        for i in range(self.num_levels):  # levels and steps are sequential; each step is batched over samples
            sigma = self.sigmas[i].expand(num_samples)
            alpha = step_lr * (self.sigmas[i] / sigma_last) ** 2
            for _ in range(steps_per_level):
                z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + 0.5 * alpha * self.score_network(x, sigma).to(dtype) + alpha.sqrt() * z
            if return_trajectory:
                trajectory.append(self._to_images(x))
        if denoise:
            x = x + sigma_last**2 * self.score_network(x, sigma_last.expand(num_samples)).to(dtype)
        images = self._to_images(x)
        return (images, torch.stack(trajectory)) if return_trajectory else images

    def _to_images(self, x: Tensor) -> Tensor:
        """Normalised (N, C, S, S) -> [0, 1] images (the inverse of `signature.normalize`, clamped)."""
        mean = torch.tensor(self.signature.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.signature.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)
