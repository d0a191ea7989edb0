"""An analytic scene for NeRF tests: coloured spheres, exact ray-sphere intersection, Lambertian shading.

World space has z up; the spheres sit around the origin within a radius of about 1.1. Cameras (OpenGL
convention, see `cvzoo.implicit.rendering`) stand on the upper hemisphere of radius `radius` looking at the
origin, so every sphere lies between near = radius - 2 and far = radius + 2 along each camera's axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cvzoo.implicit.rendering import _check_rays, get_rays
from cvzoo.implicit.siren import _check_positive_float, _check_positive_int

# (centre x, y, z), radius, colour (r, g, b): three spheres of distinct colours
DEFAULT_SPHERES: tuple[tuple[tuple[float, float, float], float, tuple[float, float, float]], ...] = (
    ((-0.55, -0.3, 0.0), 0.45, (0.9, 0.2, 0.2)),
    ((0.55, -0.25, -0.05), 0.4, (0.2, 0.8, 0.3)),
    ((0.0, 0.55, 0.1), 0.5, (0.25, 0.35, 0.9)),
)


def look_at(eye: Tensor, target: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
            up: Sequence[float] | Tensor = (0.0, 0.0, 1.0)) -> Tensor:
    """eye (..., 3) -> camera-to-world (..., 4, 4) of cameras at `eye` looking at `target` (OpenGL: the camera's
    -z axis points at the target, +y is as close to `up` as it can be, +x to the right)."""
    if not isinstance(eye, Tensor) or eye.shape[-1:] != (3,):
        raise ValueError(f"eye must be a tensor of shape (..., 3), got {getattr(eye, 'shape', type(eye).__name__)}")
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device).expand_as(eye)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = F.normalize(eye - target, dim=-1)  # backwards: the camera looks down -z
    x = F.normalize(torch.cross(up, z, dim=-1), dim=-1)
    y = torch.cross(z, x, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def hemisphere_poses(num_views: int, radius: float = 4.0, min_elevation: float = 15.0,
                     max_elevation: float = 60.0) -> Tensor:
    """() -> (V, 4, 4) camera-to-world matrices looking at the origin: azimuths evenly spaced (view v at
    360 v / V degrees), elevations (degrees) spread between the bounds by the golden ratio."""
    _check_positive_int("num_views", num_views)
    _check_positive_float("radius", radius)
    if not -90 <= min_elevation <= max_elevation <= 90:
        raise ValueError(f"elevations must satisfy -90 <= min_elevation <= max_elevation <= 90, got "
                         f"{min_elevation!r}, {max_elevation!r}")
    v = torch.arange(num_views, dtype=torch.float64)
    azimuth = 2 * math.pi * v / num_views
    frac = torch.remainder(v * (math.sqrt(5) - 1) / 2, 1.0)
    elevation = torch.deg2rad(min_elevation + (max_elevation - min_elevation) * frac)
    eye = radius * torch.stack([torch.cos(elevation) * torch.cos(azimuth), torch.cos(elevation) * torch.sin(azimuth),
                                torch.sin(elevation)], dim=-1)
    return look_at(eye).float()


def render_spheres(origins: Tensor, directions: Tensor, centers: Tensor, radii: Tensor, colors: Tensor, *,
                   light: Sequence[float] = (0.4, -0.5, 0.8), ambient: float = 0.25,
                   background: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[Tensor, Tensor]:
    """Rays (..., 3) -> (rgb (..., 3), t (...)): the exact render of K spheres (centers (K, 3), radii (K,),
    colors (K, 3)) with Lambertian shading `color * (ambient + (1 - ambient) max(0, n . l))` under a
    directional light (no shadows). `t` is the hit distance in units of the direction (`inf` for a miss,
    which shows `background`)."""
    _check_rays(origins, directions)
    k = centers.shape[0]
    if centers.shape != (k, 3) or radii.shape != (k,) or colors.shape != (k, 3):
        raise ValueError(f"centers, radii, colors must be (K, 3), (K,), (K, 3), got {tuple(centers.shape)}, "
                         f"{tuple(radii.shape)}, {tuple(colors.shape)}")
    oc = origins[..., None, :] - centers  # (..., K, 3)
    d = directions[..., None, :]  # (..., 1, 3)
    a = (d * d).sum(-1)  # (..., 1)
    b = 2 * (d * oc).sum(-1)  # (..., K)
    c = (oc * oc).sum(-1) - radii ** 2
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)  # the nearer root
    t = torch.where((disc >= 0) & (t > 0), t, torch.full_like(t, math.inf))
    t_hit, which = t.min(dim=-1)  # (...,)
    hit = torch.isfinite(t_hit)
    point = origins + directions * torch.where(hit, t_hit, torch.zeros_like(t_hit))[..., None]
    normal = F.normalize(point - centers[which], dim=-1)
    light_dir = F.normalize(torch.as_tensor(light, dtype=origins.dtype, device=origins.device), dim=0)
    shade = ambient + (1 - ambient) * (normal @ light_dir).clamp(min=0)  # (...,)
    bg = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
    rgb = torch.where(hit[..., None], colors[which] * shade[..., None], bg)
    return rgb, t_hit


class SceneViews(NamedTuple):
    images: Tensor  # (V, 3, H, W) in [0, 1]
    poses: Tensor  # (V, 4, 4) camera-to-world, OpenGL convention
    focal: float  # in pixels
    near: float
    far: float

    def select(self, index: Tensor | Sequence[int]) -> SceneViews:
        """The views at `index`."""
        index = torch.as_tensor(index, dtype=torch.long)
        return self._replace(images=self.images[index], poses=self.poses[index])

    def split(self, num_test: int) -> tuple[SceneViews, SceneViews]:
        """(train, test): `num_test` evenly spaced views held out (between training views' azimuths)."""
        views = self.images.shape[0]
        _check_positive_int("num_test", num_test)
        if num_test >= views:
            raise ValueError(f"num_test must be < the number of views {views}, got {num_test}")
        test = torch.linspace(0, views, num_test + 1)[:-1].long() + views // (2 * num_test)
        test = test.clamp(max=views - 1).unique()
        mask = torch.ones(views, dtype=torch.bool)
        mask[test] = False
        return self.select(mask.nonzero()[:, 0]), self.select(test)

    def rays(self) -> tuple[Tensor, Tensor]:
        """(rays (V * H * W, 6) = origin and direction, rgb (V * H * W, 3)): every pixel of every view."""
        v, _, h, w = self.images.shape
        origins, directions = get_rays(h, w, self.focal, self.poses)  # (V, H, W, 3) each
        rays = torch.cat([origins, directions], dim=-1).reshape(-1, 6)
        return rays, self.images.permute(0, 2, 3, 1).reshape(-1, 3)


def sphere_scene_dataset(num_views: int = 20, height: int = 32, width: int = 32, *, fov: float = 35.0,
                         radius: float = 4.0, spheres=DEFAULT_SPHERES, background: Sequence[float] = (0.0, 0.0, 0.0),
                         ambient: float = 0.25) -> SceneViews:
    """Renders `num_views` H x W views of the sphere scene from `hemisphere_poses(num_views, radius)` with a
    horizontal field of view of `fov` degrees; `near, far = radius -+ 2`. Split it with `.split(num_test)`."""
    _check_positive_int("num_views", num_views)
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    if not isinstance(fov, (int, float)) or not 0 < fov < 180:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov!r}")
    _check_positive_float("radius", radius)
    if radius <= 2.0:
        raise ValueError(f"radius must be > 2 (the cameras stand outside the spheres), got {radius!r}")
    focal = 0.5 * width / math.tan(math.radians(fov) / 2)
    poses = hemisphere_poses(num_views, radius)
    origins, directions = get_rays(height, width, focal, poses)
    centers = torch.tensor([s[0] for s in spheres], dtype=torch.float32)
    radii = torch.tensor([s[1] for s in spheres], dtype=torch.float32)
    colors = torch.tensor([s[2] for s in spheres], dtype=torch.float32)
    rgb, _ = render_spheres(origins, directions, centers, radii, colors, ambient=ambient, background=background)
    return SceneViews(rgb.permute(0, 3, 1, 2).contiguous(), poses, focal, radius - 2.0, radius + 2.0)
