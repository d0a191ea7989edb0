"""CLIP guidance: steer a generator towards a text embedding with the gradient of a CLIP scorer's similarity.

Two uses. `clip_guided_sample` optimises a latent (a GAN's z, a decoder's code) so that the scorer's image
embedding of `generator_fn(latent)` points along the text embedding (the VQGAN-CLIP recipe, Crowson et al.
2022: random crops ("cutouts") of the image are scored, so the optimiser cannot win with adversarial
pixel noise, and a small L2 penalty keeps the latent where the generator was trained).
`clip_guided_ddim_sample` adds the scaled gradient of the similarity to the x0 that a `GaussianDiffusion`
predicts at each DDIM step (classifier guidance on x0, as in GLIDE's CLIP guidance and "universal guidance";
no gradient through the denoiser); `clip_guidance_fn` gives that gradient for other samplers.

The scorer is duck-typed: `encode_image(images (B, C, S, S) normalised with scorer.signature) -> (B, D)` and
`signature` (a `cvzoo.types.Signature`); optionally `image_size` (H, W), the one input size open_clip models
take. `cvzoo.ssl.clip.OpenCLIP` and `TinyCLIP` fit; this module imports nothing from `cvzoo.ssl`. Text
embeddings come from the scorer's own `encode_text` (D,) or (B, D); they are normalised here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.types import Signature


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (int, float, str)) or value is None else type(value).__name__


def _check_scorer(scorer: object) -> Signature:
    signature = getattr(scorer, "signature", None)
    if not callable(getattr(scorer, "encode_image", None)) or not isinstance(signature, Signature):
        raise ValueError(f"scorer must have encode_image(images) and a Signature `signature` (a CLIP model), "
                         f"got {type(scorer).__name__}")
    return signature


def _check_range(value_range: object) -> tuple[float, float]:
    ok = isinstance(value_range, (tuple, list)) and len(value_range) == 2 \
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range)
    if not ok or not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be a (low, high) pair with low < high, got {value_range!r}")
    return float(value_range[0]), float(value_range[1])


def _check_cutouts(num_cutouts: object, cutout_scale: object, allow_zero: bool) -> tuple[float, float]:
    low = 0 if allow_zero else 1
    if isinstance(num_cutouts, bool) or not isinstance(num_cutouts, int) or num_cutouts < low:
        raise ValueError(f"num_cutouts must be an int >= {low}, got {num_cutouts!r}")
    ok = isinstance(cutout_scale, (tuple, list)) and len(cutout_scale) == 2
    if not ok or not 0 < cutout_scale[0] <= cutout_scale[1] <= 1:
        raise ValueError(f"cutout_scale must be (min, max) side fractions with 0 < min <= max <= 1, "
                         f"got {cutout_scale!r}")
    return float(cutout_scale[0]), float(cutout_scale[1])


def _text_target(text_embedding: object, batch: int, device: torch.device) -> Tensor:
    """(D,), (1, D) or (B, D) -> (B, D) unit rows in float32."""
    if not isinstance(text_embedding, Tensor) or not text_embedding.is_floating_point() \
            or text_embedding.ndim not in (1, 2) or (text_embedding.ndim == 2 and text_embedding.shape[0]
                                                     not in (1, batch)):
        raise ValueError(f"text_embedding must be a floating (D,), (1, D) or ({batch}, D) tensor, "
                         f"got {_describe(text_embedding)}")
    t = text_embedding.detach().float().to(device).reshape(-1, text_embedding.shape[-1])
    return F.normalize(t, dim=-1).expand(batch, -1)


def _scorer_size(scorer: object, signature: Signature, height: int, width: int, size: int | None) -> int:
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < signature.min_size:
            raise ValueError(f"size must be an int >= the scorer's min_size={signature.min_size}, got {size!r}")
        return size
    fixed = getattr(scorer, "image_size", None)
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        return int(fixed[0])
    if isinstance(fixed, int) and not isinstance(fixed, bool):
        return fixed
    s = max(height, width, signature.min_size)
    d = max(signature.size_divisor, 1)
    return -(-s // d) * d  # rounded up to the size divisor


@contextlib.contextmanager
def _eval(*modules: object) -> Iterator[None]:
    """Modules in eval mode (no BatchNorm statistics updated, no dropout) for the block, modes restored after."""
    mods = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.eval()
        yield
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)


def _cutouts(images: Tensor, num: int, size: int, scale: tuple[float, float],
             generator: torch.Generator | None) -> Tensor:
    """Random square crops, each resized to (size, size), half of them flipped. (B, C, H, W) -> (num * B, C, S, S).

    One affine grid per crop (bilinear sampling, differentiable), all crops in one `grid_sample`; crop side is
    a fraction in `scale` of the image's shorter side, its position uniform inside the image. num = 0 gives the
    whole image resized (no augmentation).
    """
    b, c, h, w = images.shape
    if num == 0:
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size)
    n = num * b
    g_dev = generator.device if generator is not None else images.device
    u = torch.rand(n, 4, generator=generator, device=g_dev).to(images.device, images.dtype)  # (N, 4)
    side = scale[0] + (scale[1] - scale[0]) * u[:, 0]  # fraction of the shorter side
    sx, sy = side * min(h, w) / w, side * min(h, w) / h  # half-extent in normalised [-1, 1] units
    tx, ty = (2 * u[:, 1] - 1) * (1 - sx), (2 * u[:, 2] - 1) * (1 - sy)  # centre, crop inside the image
    flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0).to(images.dtype)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx * flip, zero, tx], dim=1), torch.stack([zero, sy, ty], dim=1)], dim=1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, S, S, 2)
    src = images.repeat(num, 1, 1, 1)  # (num * B, C, H, W), crop k of image i at row k * B + i
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _similarity(scorer: object, signature: Signature, images01: Tensor, target: Tensor, num_cutouts: int,
                size: int, scale: tuple[float, float], generator: torch.Generator | None) -> Tensor:
    """Mean cosine similarity over cutouts of each image with its text target. (B, C, H, W) in [0, 1] -> (B,)."""
    b = images01.shape[0]
    crops = _cutouts(images01, num_cutouts, size, scale, generator)
    param = next(scorer.parameters(), None) if isinstance(scorer, nn.Module) else None
    if param is not None:
        crops = crops.to(param.device, param.dtype)
    emb = F.normalize(scorer.encode_image(signature.normalize(crops)).float(), dim=-1)  # (K * B, D)
    sims = (emb.view(-1, b, emb.shape[-1]) * target.to(emb.device)).sum(dim=-1)  # (K, B)
    return sims.mean(dim=0).to(images01.device)


def clip_similarity(scorer: nn.Module, images: Tensor, text_embedding: Tensor, *,
                    value_range: tuple[float, float] = (0.0, 1.0), size: int | None = None) -> Tensor:
    """Cosine similarity of each image's embedding with the text embedding. (B, C, H, W) -> (B,) in [-1, 1].

    Images in `value_range` are mapped to [0, 1], resized to the scorer's size (its `image_size`, else the
    image's own size raised to `signature.min_size`) and normalised with `scorer.signature`; no crops.
    """
    signature = _check_scorer(scorer)
    lo, hi = _check_range(value_range)
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {_describe(images)}")
    target = _text_target(text_embedding, images.shape[0], images.device)
    s = _scorer_size(scorer, signature, images.shape[-2], images.shape[-1], size)
    with torch.no_grad(), _eval(scorer):
        return _similarity(scorer, signature, ((images - lo) / (hi - lo)).clamp(0, 1), target, 0, s, (1.0, 1.0), None)


def clip_guided_sample(
    generator_fn: Callable[[Tensor], Tensor],
    latent: Tensor,
    scorer: nn.Module,
    text_embedding: Tensor,
    *,
    steps: int = 100,
    lr: float = 0.05,
    num_cutouts: int = 8,
    cutout_scale: tuple[float, float] = (0.5, 1.0),
    latent_weight: float = 1e-3,
    value_range: tuple[float, float] = (-1.0, 1.0),
    size: int | None = None,
    generator: torch.Generator | None = None,
    return_latent: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Optimises `latent` so that `generator_fn(latent)` matches the text -> images (B, C, H, W) in [0, 1].

    `generator_fn(latent (B, ...)) -> images (B, C, H, W)` in `value_range` ((-1, 1): cvzoo's GAN generators
    and decoders; a conditional generator is wrapped, e.g. `lambda z: g(z, labels)`). Adam (`lr`) runs `steps`
    steps on the loss `1 - mean cosine similarity of num_cutouts random crops` (sides `cutout_scale` of the
    image, random flips, resized to the scorer's size) `+ latent_weight * mean(latent ** 2)`. `generator`
    seeds the crops (the result is deterministic given it). The scorer and the generator (when modules) run
    in eval mode, restored after; their parameters get no gradients. `latent` itself is not modified;
    `return_latent=True` also returns the optimised latent.
    """
    signature = _check_scorer(scorer)
    if not callable(generator_fn):
        raise ValueError(f"generator_fn must be a callable latent -> images, got {type(generator_fn).__name__}")
    if not isinstance(latent, Tensor) or not latent.is_floating_point() or latent.ndim < 1 or latent.shape[0] < 1:
        raise ValueError(f"latent must be a floating (B, ...) tensor, got {_describe(latent)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(latent_weight, bool) or not isinstance(latent_weight, (int, float)) or latent_weight < 0:
        raise ValueError(f"latent_weight must be a number >= 0, got {latent_weight!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    scale = _check_cutouts(num_cutouts, cutout_scale, allow_zero=False)
    lo, hi = _check_range(value_range)
    z = latent.detach().clone().requires_grad_(True)
    target = _text_target(text_embedding, z.shape[0], z.device)

    def render(x: Tensor) -> Tensor:
        images = generator_fn(x)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] != x.shape[0]:
            raise ValueError(f"generator_fn must return ({x.shape[0]}, C, H, W) images, got {_describe(images)}")
        return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)

    opt = torch.optim.Adam([z], lr=float(lr))
    with _eval(scorer, generator_fn), torch.enable_grad():
        for _ in range(steps):
            images = render(z)
            s = _scorer_size(scorer, signature, images.shape[-2], images.shape[-1], size)
            sim = _similarity(scorer, signature, images, target, num_cutouts, s, scale, generator)
            loss = (1.0 - sim).mean() + latent_weight * z.pow(2).mean()
            (z.grad,) = torch.autograd.grad(loss, [z])  # only the latent: no .grad left on the models
            opt.step()
        with torch.no_grad():
            images = render(z)
    z = z.detach()
    return (images, z) if return_latent else images


def clip_guidance_fn(scorer: nn.Module, text_embedding: Tensor, scale: float, *,
                     value_range: tuple[float, float] = (-1.0, 1.0), num_cutouts: int = 0,
                     cutout_scale: tuple[float, float] = (0.5, 1.0), size: int | None = None,
                     generator: torch.Generator | None = None) -> Callable[..., Tensor]:
    """A function `fn(x, t=None) -> scale * d sim(x) / dx` for classifier-style guidance. (B, C, H, W) -> same.

    `x` are images in `value_range` ((-1, 1): a diffusion model's predicted x0), `sim` each image's cosine
    similarity with the text embedding (the mean over `num_cutouts` random crops, or the whole image resized
    when 0). Each image's gradient is its own (the scorer runs in eval mode). A sampler adds the result to
    its predicted x0 (`clip_guided_ddim_sample`) or, times the step's variance, to its posterior mean
    (Dhariwal & Nichol's classifier guidance). `t` is accepted for sampler hooks and ignored.
    """
    signature = _check_scorer(scorer)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    crop_scale = _check_cutouts(num_cutouts, cutout_scale, allow_zero=True)
    lo, hi = _check_range(value_range)
    if not isinstance(text_embedding, Tensor):
        raise ValueError(f"text_embedding must be a floating (D,) or (B, D) tensor, got {_describe(text_embedding)}")

    def fn(x: Tensor, t: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {_describe(x)}")
        target = _text_target(text_embedding, x.shape[0], x.device)
        s = _scorer_size(scorer, signature, x.shape[-2], x.shape[-1], size)
        with _eval(scorer), torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            sim = _similarity(scorer, signature, ((xg - lo) / (hi - lo)).clamp(0.0, 1.0), target, num_cutouts, s,
                              crop_scale, generator)
            (grad,) = torch.autograd.grad(sim.sum(), [xg])  # sum over independent images: per-image gradients
        return (scale * grad).to(x.dtype)

    return fn


@torch.no_grad()
def clip_guided_ddim_sample(
    diffusion: nn.Module,
    scorer: nn.Module,
    text_embedding: Tensor,
    *,
    num_samples: int = 1,
    num_steps: int = 50,
    clip_scale: float = 100.0,
    eta: float = 0.0,
    condition: Tensor | None = None,
    guidance_scale: float = 1.0,
    num_cutouts: int = 0,
    cutout_scale: tuple[float, float] = (0.5, 1.0),
    size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM sampling of a `GaussianDiffusion` with CLIP guidance on the predicted x0 -> (n, C, S, S) in [0, 1].

    At each step t (diffusers' "leading" spacing, as `GaussianDiffusion.sample`) the model predicts x0 (with
    classifier-free `guidance_scale` and `condition`, passed to `predict_start_and_noise`: (n,) labels or
    (n, condition_dim) embeddings, None for the null condition); x0 <- x0 + clip_scale * grad sim(x0)
    (`clip_guidance_fn`), clamped to [-1, 1] when the model clips; eps is re-derived from the guided x0 so
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds, and the DDIM update (eq. 12 of Song et al., `eta`)
    follows. The initial noise is drawn as `sample` draws it, so `clip_scale=0` reproduces
    `diffusion.sample(n, sampler="ddim", num_steps=..., eta=..., generator=...)` for the same generator.
    The guidance gradient does not flow through the denoiser (cheap; see `clip_guidance_fn`).
    """
    for attr in ("alphas_cumprod", "num_timesteps", "in_channels", "image_size", "predict_start_and_noise"):
        if not hasattr(diffusion, attr):
            raise ValueError(f"diffusion must be a GaussianDiffusion (it has no {attr!r}), "
                             f"got {type(diffusion).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    total = diffusion.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be an int in [1, {total}] (num_timesteps), got {num_steps!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if condition is not None and (not isinstance(condition, Tensor) or condition.shape[:1] != (num_samples,)):
        raise ValueError(f"condition must be a tensor with num_samples={num_samples} rows, got {_describe(condition)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    guide = clip_guidance_fn(scorer, text_embedding, clip_scale, value_range=(-1.0, 1.0), num_cutouts=num_cutouts,
                             cutout_scale=cutout_scale, size=size, generator=generator)
    abar = diffusion.alphas_cumprod
    device, dtype = abar.device, abar.dtype
    shape = (num_samples, diffusion.in_channels, diffusion.image_size, diffusion.image_size)

    def randn() -> Tensor:  # as GaussianDiffusion draws: on the generator's device, then moved
        if generator is None:
            return torch.randn(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)

    clip_x0 = bool(getattr(diffusion, "clip_denoised", True))
    x = randn()
    ratio = total // num_steps
    for t in range(ratio * (num_steps - 1), -1, -ratio):  # "leading": (S-1, ..., 0) * ratio
        tb = torch.full((num_samples,), t, dtype=torch.long, device=device)
        x0, eps = diffusion.predict_start_and_noise(x, tb, condition, guidance_scale)
        a_t = abar[t]
        if clip_scale != 0:
            x0 = x0 + guide(x0)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()
        prev = t - ratio
        a_prev = abar[prev] if prev >= 0 else abar.new_ones(())
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        if eta > 0:  # drawn at every step, even the last, as GaussianDiffusion.ddim_step
            x = x + sigma * randn()
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)
