"""A tiny NeRF (Mildenhall et al., 2020): a radiance-field MLP, coarse + fine volume rendering, training and
evaluation on posed views (see `cvzoo.implicit.rendering` for the camera convention).

Rays travel as one (R, 6) tensor, `[origin, direction]`, so a loader of `(rays, rgb)` batches trains a
`TinyNeRF` through `cvzoo.train.Trainer` like any other model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.implicit.encodings import PositionalEncoding
from cvzoo.implicit.image_fit import psnr
from cvzoo.implicit.rendering import _check_near_far, get_rays, sample_hierarchical, sample_stratified, volume_render
from cvzoo.implicit.siren import _check_positive_float, _check_positive_int


class NeRFMLP(nn.Module):
    """points (..., 3), view directions (..., 3) -> (rgb (..., 3) in (0, 1), sigma (...) >= 0).

    `PositionalEncoding(pos_frequencies)` of the point, a ReLU MLP of `hidden_layers + 1` layers with the
    encoded input concatenated again after layer `skip` (NeRF's skip connection; None for none), then a density
    head and a colour head. With `dir_frequencies` the colour head also sees the encoded (normalised) view
    direction, as NeRF's; None ignores it (tiny-nerf's view-independent field). The defaults are the paper's
    network (8 layers of 256, skip after the 5th, 10 and 4 frequencies); `nerf_tiny` builds a small one. Density is
    `softplus(raw - 1)` (mip-NeRF's: ReLU, NeRF's, can leave a whole ray with zero gradient).
    """

    def __init__(self, pos_frequencies: int = 10, dir_frequencies: int | None = 4, hidden_features: int = 256,
                 hidden_layers: int = 7, skip: int | None = 4) -> None:
        super().__init__()
        _check_positive_int("hidden_features", hidden_features)
        _check_positive_int("hidden_layers", hidden_layers, minimum=0)
        if skip is not None and not (isinstance(skip, int) and 0 <= skip < hidden_layers):
            raise ValueError(f"skip must be None or an int in [0, hidden_layers={hidden_layers}), got {skip!r}")
        self.pos_encoding = PositionalEncoding(pos_frequencies, in_features=3)
        self.dir_encoding = PositionalEncoding(dir_frequencies, in_features=3) if dir_frequencies is not None \
            else None
        self.skip = skip
        width = self.pos_encoding.out_features
        self.layers = nn.ModuleList([nn.Linear(width, hidden_features)])
        for i in range(hidden_layers):
            extra = width if skip is not None and i == skip else 0
            self.layers.append(nn.Linear(hidden_features + extra, hidden_features))
        self.sigma_head = nn.Linear(hidden_features, 1)
        dir_width = self.dir_encoding.out_features if self.dir_encoding is not None else 0
        self.rgb_head = nn.Sequential(nn.Linear(hidden_features + dir_width, hidden_features // 2), nn.ReLU(),
                                      nn.Linear(hidden_features // 2, 3))
        # Glorot-uniform weights and zero biases (Keras' default, the original NeRF's and tiny-nerf's): nn.Linear's
        # default shrinks the activations about 3x a layer, and the field then starts (and stays long) constant
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, points: Tensor, view_dirs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        enc = self.pos_encoding(points)
        h = F.relu(self.layers[0](enc))
        for i, layer in enumerate(self.layers[1:]):  # static structure
            if self.skip is not None and i == self.skip:
                h = torch.cat([h, enc], dim=-1)
            h = F.relu(layer(h))
        sigma = F.softplus(self.sigma_head(h)[..., 0] - 1.0)
        if self.dir_encoding is not None:
            if view_dirs is None:
                raise ValueError("view_dirs is None but this NeRFMLP has dir_frequencies: pass the ray directions")
            h = torch.cat([h, self.dir_encoding(F.normalize(view_dirs, dim=-1))], dim=-1)
        return torch.sigmoid(self.rgb_head(h)), sigma


class NeRFOutput(NamedTuple):
    rgb: Tensor  # (R, 3) the fine pass's colour (the coarse one's without a fine network)
    depth: Tensor  # (R,) expected z of the final pass
    acc: Tensor  # (R,) accumulated opacity of the final pass
    rgb_coarse: Tensor  # (R, 3)


class RenderedImage(NamedTuple):
    rgb: Tensor  # (3, H, W), clamped to [0, 1]
    depth: Tensor  # (H, W) expected depth along the camera axis
    acc: Tensor  # (H, W) opacity


def _check_rays_tensor(rays: object) -> Tensor:
    if not isinstance(rays, Tensor) or rays.ndim != 2 or rays.shape[-1] != 6:
        got = tuple(rays.shape) if isinstance(rays, Tensor) else type(rays).__name__
        raise ValueError(f"rays must be a tensor of shape (R, 6) = [origin, direction], got {got}")
    return rays


class TinyNeRF(nn.Module):
    """rays (R, 6) -> `NeRFOutput`: NeRF's coarse-to-fine volume rendering with two radiance-field networks.

    `num_coarse` stratified samples between `near` and `far` go through `coarse`; `num_fine` more, drawn from the
    coarse weights (`sample_hierarchical`), join them for `fine` (None: coarse only). Samples are perturbed
    (`perturb`) only in training mode. Networks map (points (..., 3), view_dirs (..., 3)) to (rgb, sigma).
    """

    def __init__(self, coarse: nn.Module, fine: nn.Module | None = None, *, num_coarse: int = 32,
                 num_fine: int = 32, near: float = 2.0, far: float = 6.0, perturb: bool = True,
                 white_background: bool = False, chunk: int = 4096) -> None:
        super().__init__()
        _check_positive_int("num_coarse", num_coarse, minimum=3 if fine is not None else 1)
        if fine is not None:
            _check_positive_int("num_fine", num_fine)
        _check_near_far(near, far)
        _check_positive_int("chunk", chunk)
        self.coarse, self.fine = coarse, fine
        self.num_coarse, self.num_fine = num_coarse, num_fine if fine is not None else 0
        self.near, self.far = float(near), float(far)
        self.perturb, self.white_background, self.chunk = perturb, white_background, chunk

    def _render(self, network: nn.Module, origins: Tensor, directions: Tensor, z_vals: Tensor):
        points = origins[:, None, :] + directions[:, None, :] * z_vals[..., None]  # (R, S, 3)
        rgb, sigma = network(points, directions[:, None, :].expand_as(points))
        return volume_render(rgb, sigma, z_vals, directions, self.white_background)

    def forward(self, rays: Tensor) -> NeRFOutput:
        """(R, 6) -> NeRFOutput (all rays at once; `render_rays` splits them into chunks)."""
        rays = _check_rays_tensor(rays)
        origins, directions = rays[:, :3], rays[:, 3:]
        perturb = self.perturb and self.training
        _, z_coarse = sample_stratified(origins, directions, self.near, self.far, self.num_coarse, perturb)
        coarse = self._render(self.coarse, origins, directions, z_coarse)
        if self.fine is None:
            return NeRFOutput(coarse.rgb, coarse.depth, coarse.acc, coarse.rgb)
        z_fine = sample_hierarchical(z_coarse, coarse.weights, self.num_fine, perturb)
        fine = self._render(self.fine, origins, directions, z_fine)
        return NeRFOutput(fine.rgb, fine.depth, fine.acc, coarse.rgb)

    def loss(self, rays: Tensor, target_rgb: Tensor) -> dict[str, Tensor]:
        """rays (R, 6), target_rgb (R, 3) -> {"loss": coarse + fine MSE, "mse_coarse", "mse_fine", "psnr"}
        (PSNR of the final pass)."""
        out = self(rays)
        if not isinstance(target_rgb, Tensor) or target_rgb.shape != out.rgb.shape:
            got = tuple(target_rgb.shape) if isinstance(target_rgb, Tensor) else type(target_rgb).__name__
            raise ValueError(f"target_rgb must have shape {tuple(out.rgb.shape)}, got {got}")
        target = target_rgb.float()
        mse_coarse = F.mse_loss(out.rgb_coarse.float(), target)
        terms = {"mse_coarse": mse_coarse}
        if self.fine is not None:
            mse_fine = F.mse_loss(out.rgb.float(), target)
            terms["mse_fine"] = mse_fine
            total = mse_coarse + mse_fine
        else:
            mse_fine, total = mse_coarse, mse_coarse
        return {"loss": total, **terms, "psnr": 10.0 * torch.log10(1.0 / mse_fine.detach().clamp(min=1e-10))}

    def render_rays(self, rays: Tensor, chunk: int | None = None) -> NeRFOutput:
        """(R, 6) -> NeRFOutput, `chunk` rays at a time (default `self.chunk`) to bound memory."""
        rays = _check_rays_tensor(rays)
        chunk = self.chunk if chunk is None else chunk
        _check_positive_int("chunk", chunk)
        parts = [self(r) for r in rays.split(chunk)]
        return NeRFOutput(*(torch.cat(p) for p in zip(*parts)))

    @torch.no_grad()
    def render_image(self, camera_to_world: Tensor, height: int, width: int, focal: float) -> RenderedImage:
        """(3|4, 4) camera-to-world -> RenderedImage (rgb (3, H, W), depth (H, W), acc (H, W))."""
        if not isinstance(camera_to_world, Tensor) or camera_to_world.ndim != 2:
            got = tuple(camera_to_world.shape) if isinstance(camera_to_world, Tensor) \
                else type(camera_to_world).__name__
            raise ValueError(f"camera_to_world must be one (3, 4) or (4, 4) matrix, got {got}")
        device = next(self.parameters()).device
        origins, directions = get_rays(height, width, focal, camera_to_world.to(device))
        out = self.render_rays(torch.cat([origins, directions], dim=-1).reshape(-1, 6))
        return RenderedImage(out.rgb.clamp(0, 1).T.reshape(3, height, width), out.depth.reshape(height, width),
                             out.acc.reshape(height, width))


class RayBatches:
    """Random batches `(rays (B, 6), rgb (B, 3))` of all the rays, a new permutation each epoch (seeded by
    `seed` and the epoch, so the order is reproducible); the last partial batch is dropped."""

    def __init__(self, rays: Tensor, rgb: Tensor, batch_size: int = 1024, seed: int = 0) -> None:
        _check_rays_tensor(rays)
        if rgb.shape != (rays.shape[0], 3):
            raise ValueError(f"rgb must have shape ({rays.shape[0]}, 3), got {tuple(rgb.shape)}")
        _check_positive_int("batch_size", batch_size)
        if batch_size > rays.shape[0]:
            raise ValueError(f"batch_size must be <= the number of rays {rays.shape[0]}, got {batch_size}")
        self.rays, self.rgb, self.batch_size, self.seed = rays, rgb, batch_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.rays.shape[0] // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.rays.shape[0], generator=g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.rays[idx], self.rgb[idx]


@torch.no_grad()
def evaluate_views(model: TinyNeRF, views) -> dict[str, float]:
    """{"psnr": mean over views of each rendered view's PSNR, "psnr_pooled": PSNR of all pixels at once} of
    `model` (in eval mode, no perturbation) on `SceneViews`-like `views` (images, poses, focal)."""
    was_training = model.training
    model.eval()
    values, errors = [], []
    _, _, h, w = views.images.shape
    for image, pose in zip(views.images, views.poses):
        rendered = model.render_image(pose, h, w, views.focal).rgb.cpu()
        values.append(float(psnr(rendered, image)))
        errors.append(F.mse_loss(rendered, image))
    model.train(was_training)
    pooled = 10 * math.log10(1.0 / max(float(torch.stack(errors).mean()), 1e-10))
    return {"psnr": sum(values) / len(values), "psnr_pooled": pooled}


def mean_colour_psnr(train_views, test_views) -> float:
    """The baseline that knows no geometry: each held-out view predicted as the mean training colour; the mean
    PSNR over views."""
    mean = train_views.images.mean(dim=(0, 2, 3))[:, None, None]
    return sum(float(psnr(mean.expand_as(img), img)) for img in test_views.images) / len(test_views.images)


def train_nerf(model: TinyNeRF, views, *, steps: int = 1000, batch_rays: int = 1024, lr: float = 1e-3,
               device: str | torch.device = "cpu", progress: bool = False, seed: int = 0, log_every: int = 50):
    """Trains `model` on every pixel of `views` (`SceneViews`: images, poses, focal) with Adam through
    `cvzoo.train.Trainer` (cosine schedule, `steps` steps of `batch_rays` random rays); returns the trainer."""
    from cvzoo.train import Trainer  # the trainer sits above the parts; imported only to train

    _check_positive_int("steps", steps)
    _check_positive_float("lr", lr)
    v, _, h, w = views.images.shape
    origins, directions = get_rays(h, w, views.focal, views.poses)
    rays = torch.cat([origins, directions], dim=-1).reshape(-1, 6)
    rgb = views.images.permute(0, 2, 3, 1).reshape(-1, 3)
    loader = RayBatches(rays, rgb, batch_size=min(batch_rays, rays.shape[0]), seed=seed)
    trainer = Trainer(model, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr), lr=lr, max_steps=steps,
                      device=device, progress=progress, log_every=log_every, seed=seed, weight_decay=0.0)
    trainer.fit(loader)
    return trainer
