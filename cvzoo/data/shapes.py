"""Shapes: a procedurally drawn, seeded toy dataset of circles, squares, triangles and stars.

Every image is drawn from its own generator, seeded from `(seed, split, index)` by a stable hash, so item
`i` of a split is the same on every construction and in every process, and the splits never share a seed.
Drawing is pure torch: a circle by its distance to the centre, a convex polygon by its half-planes, a star
as the union of five convex kites. Pixels are sampled at their centres `(col + 0.5, row + 0.5)`.

Coordinates are absolute pixels with the origin at the image's top-left corner and pixel `(row, col)`
covering `[col, col + 1) x [row, row + 1)`: a box `(x1, y1, x2, y2)` is the tight box of the visible mask,
`x2 = last visible column + 1`. Keypoints are pixel centres.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cvzoo.data.info import DatasetInfo

CLASSES = ("circle", "square", "triangle", "star")
SPLITS = ("train", "val", "test")
SHAPES_TASKS = ("detection", "classification", "regression", "multitask", "segmentation")
SEGMENTATION_CLASSES = ("background", *CLASSES)  # mask value 0 is background, 1 + k is CLASSES[k]
DEFAULT_NUM_IMAGES = {"train": 512, "val": 128, "test": 128}
KEYPOINT_NAMES = ("top", "right", "bottom", "left")

_STAR_INNER_RATIO = 0.45  # inner over outer radius; kites stay convex (angle at the inner vertex < 180 deg)
_MIN_COLOUR_DISTANCE = 0.45  # RGB euclidean distance of an object's colour from its local background
_COLOUR_CANDIDATES = 16  # drawn at once, so an image consumes a fixed number of draws per object
_PLACEMENT_TRIES = 20
_NOISE_STD = 0.015


@dataclass(frozen=True)
class ShapesScene:
    """One drawn image and all its annotations, whatever the task."""

    image: Tensor  # (3, H, W) float32 in [0, 1]
    boxes: Tensor  # (N, 4) float32 xyxy
    labels: Tensor  # (N,) int64
    masks: Tensor  # (N, H, W) bool, visible pixels
    keypoints: Tensor  # (N, 4, 3) float32 (x, y, visibility), order top, right, bottom, left
    price: Tensor  # (N,) float32 in [0, 1]


def item_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit generator seed for one item, stable across processes (unlike the salted `hash()`)."""
    digest = hashlib.blake2b(f"cvzoo.shapes/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shape_price(size: Tensor, colour: Tensor, min_size: float, max_size: float) -> Tensor:
    """Price of objects from their size and colour, in [0, 1]. (N,), (N, 3) -> (N,).

    `price = 0.5 * size_fraction + 0.5 * brightness`, where `size_fraction = (size - min_size) /
    (max_size - min_size)` (0.5 when the two are equal), `size` is the diameter of the object's
    circumscribed circle in pixels, and `brightness` is the mean of the RGB colour in [0, 1].
    """
    span = max_size - min_size
    frac = (size - min_size) / span if span > 0 else torch.full_like(size, 0.5)
    return (0.5 * frac + 0.5 * colour.mean(dim=-1)).clamp(0.0, 1.0)


def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _background(g: torch.Generator, size: int) -> Tensor:
    """A tinted texture: a base colour, low-frequency sinusoids and smooth noise. -> (3, size, size).

    The texture has at most 3 cycles per image, so it is drawn on a 32 x 32 grid and upsampled
    (bilinear): cheaper than evaluating it at every pixel.
    """
    coarse_size = min(size, 32)
    grid = (torch.arange(coarse_size, dtype=torch.float32) + 0.5) / coarse_size  # in (0, 1)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    tint = _uniform(g, 0.2, 0.8, 3).view(3, 1, 1)
    num_waves = 4
    freq = _uniform(g, 0.5, 3.0, num_waves).view(-1, 1, 1)  # cycles per image
    theta = _uniform(g, 0.0, math.pi, num_waves).view(-1, 1, 1)
    phase = _uniform(g, 0.0, 2 * math.pi, num_waves).view(-1, 1, 1)
    amp = _uniform(g, -0.06, 0.06, num_waves * 3).view(num_waves, 3)
    waves = torch.sin(2 * math.pi * freq * (torch.cos(theta) * xs + torch.sin(theta) * ys) + phase)  # (4, s, s)
    noise = _uniform(g, -0.08, 0.08, 3 * 6 * 6).view(1, 3, 6, 6)
    noise = F.interpolate(noise, size=(coarse_size, coarse_size), mode="bicubic", align_corners=False)[0]
    texture = tint + torch.einsum("wc,whx->chx", amp, waves) + noise  # (3, s, s)
    return F.interpolate(texture[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0.0, 1.0)


def _convex_union(pieces: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Pixels inside any of P convex polygons. pieces (P, V, 2) (x, y), vertices in a consistent order.

    A point is inside a convex polygon when it lies on the inner side of every edge's line.
    """
    v0, v1 = pieces, pieces.roll(-1, dims=1)  # (P, V, 2) edge starts and ends
    orient = torch.sign(((v0[..., 0] * v1[..., 1]) - (v1[..., 0] * v0[..., 1])).sum(dim=1))  # (P,)
    ex = (v1[..., 0] - v0[..., 0])[..., None, None]  # (P, V, 1, 1)
    ey = (v1[..., 1] - v0[..., 1])[..., None, None]
    cross = ex * (ys - v0[..., 1, None, None]) - ey * (xs - v0[..., 0, None, None])  # (P, V, S, S)
    inside = (cross * orient.view(-1, 1, 1, 1) >= 0).all(dim=1)  # (P, S, S)
    return inside.any(dim=0)


def _regular(cx: float, cy: float, radius: float, angle: float, n: int, offset: float = 0.0) -> Tensor:
    a = angle + offset + torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([cx + radius * torch.cos(a), cy + radius * torch.sin(a)], dim=-1).float()  # (n, 2)


def _draw_shape(label: int, cx: float, cy: float, radius: float, angle: float, xs: Tensor, ys: Tensor
                ) -> tuple[Tensor, Tensor]:
    """The mask of one shape on the pixel centres `xs`, `ys` (h, w) and its extreme points (4, 2).

    The extreme points are the topmost, rightmost, bottommost and leftmost points of the shape.
    """
    if label == 0:  # circle
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        extremes = torch.tensor([[cx, cy - radius], [cx + radius, cy], [cx, cy + radius], [cx - radius, cy]])
        return mask, extremes
    if label in (1, 2):  # square, equilateral triangle: circumradius `radius`
        verts = _regular(cx, cy, radius, angle, 4 if label == 1 else 3)
        mask = _convex_union(verts[None], xs, ys)
    else:  # star: five kites (centre, inner vertex, tip, next inner vertex), tips at the outer radius
        verts = _regular(cx, cy, radius, angle, 5)  # tips, (5, 2)
        inner = _regular(cx, cy, radius * _STAR_INNER_RATIO, angle, 5, offset=math.pi / 5)  # (5, 2)
        centre = torch.tensor([cx, cy]).expand(5, 2)
        kites = torch.stack([centre, inner.roll(1, dims=0), verts, inner], dim=1)  # (5, 4, 2)
        mask = _convex_union(kites, xs, ys)
    # the extreme points of a polygon in the four directions are vertices
    extremes = torch.stack([verts[verts[:, 1].argmin()], verts[verts[:, 0].argmax()],
                            verts[verts[:, 1].argmax()], verts[verts[:, 0].argmin()]])
    return mask, extremes


def _snap_to_mask(points: Tensor, mask: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Each point (K, 2) moved to the nearest pixel centre inside `mask` (S, S). -> (K, 2)."""
    px, py = xs[mask], ys[mask]  # (M,)
    d2 = (px[None] - points[:, :1]) ** 2 + (py[None] - points[:, 1:]) ** 2  # (K, M)
    j = d2.argmin(dim=1)
    return torch.stack([px[j], py[j]], dim=-1)


def cached_item(dataset, index: int):
    """Item `index` of a drawn dataset (`num_images`, `split`, `cache`, `_cache` and `_render(index)`): rendered
    on first access and kept when `cache` is on. Negative indices count from the end; a bad index raises an
    IndexError naming the dataset."""
    name = f"{type(dataset).__name__}({dataset.split!r})"
    try:
        index = operator.index(index)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        raise IndexError(f"{type(dataset).__name__} indices must be integers, got {type(index).__name__}") from None
    if not -dataset.num_images <= index < dataset.num_images:
        raise IndexError(f"index {index!r} out of range for {name} of length {dataset.num_images}")
    index %= dataset.num_images
    found = dataset._cache.get(index)
    if found is None:
        found = dataset._render(index)
        if dataset.cache:
            dataset._cache[index] = found
    return found


class Shapes(Dataset):
    """Seeded synthetic images of circles, squares, triangles and stars on textured backgrounds.

    Images are `(3, image_size, image_size)` float32 in [0, 1]. Each object has a random class, size
    (`size` in [min_size, max_size] is the diameter of its circumscribed circle), position, rotation
    (squares, triangles, stars) and a colour at least 0.45 (RGB euclidean) from the mean of what it
    covers. Later objects occlude earlier ones; a placement that would leave an earlier object less than
    `min_visibility` visible is redrawn (up to 20 tries, then that object is left out), so an image can
    hold fewer than `min_objects` objects when they do not fit.

    `task` picks the sample:

    - "detection": `(image, target)`, target `{"boxes": (N, 4) float32 xyxy pixels (tight box of the
      visible mask), "labels": (N,) int64, "masks": (N, H, W) bool visible pixels, "keypoints": (N, 4, 3)
      float32 (x, y, visibility), "price": (N,) float32}`.
    - "classification": one object, `(image, label)` with an int64 0-d label.
    - "regression": one object, `(image, price (1,) float32)`.
    - "multitask": one object, `(image, {"label": int64 0-d, "value": (1,) price, "keypoints": (4, 2)
      extreme points normalised by (W, H) to [0, 1]})`, the targets of `MultiTaskModel.loss` for
      `cvzoo.zoo.resnet_micro_multitask`.
    - "segmentation": `(image, mask)`, mask `(H, W)` int64: 0 for background, `1 + label` for the object
      whose visible mask covers the pixel (visible masks are disjoint), so its classes are
      `SEGMENTATION_CLASSES = ("background", *CLASSES)`. The scenes are the detection task's: item `i` is
      the same picture, and its mask is the union of the detection target's visible masks.

    Keypoints are the object's extreme points (topmost, rightmost, bottommost, leftmost point of the
    full shape: vertices for polygons), each snapped to the nearest pixel centre of the full shape;
    visibility is 1 when that pixel is not occluded. `price` is `shape_price(size, colour)`. The single
    object tasks (classification, regression, multitask) ignore `min_objects`/`max_objects`. Items are
    drawn on first access and cached.
    """

    def __init__(self, split: str = "train", num_images: int | None = None, image_size: int = 128,
                 min_objects: int = 1, max_objects: int = 4, min_size: int = 16, max_size: int = 48,
                 seed: int = 0, task: str = "detection", min_visibility: float = 0.4, cache: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if task not in SHAPES_TASKS:
            raise ValueError(f"task must be one of {SHAPES_TASKS}, got {task!r}")
        num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 8),
                                 ("min_objects", min_objects, 0), ("max_objects", max_objects, 0),
                                 ("min_size", min_size, 4), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_objects < min_objects:
            raise ValueError(f"max_objects must be >= min_objects ({min_objects}), got {max_objects}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or not min_size <= max_size <= image_size:
            raise ValueError(f"max_size must be an integer in [min_size, image_size] = [{min_size}, {image_size}], "
                             f"got {max_size!r}")
        if not 0.0 <= min_visibility <= 1.0:
            raise ValueError(f"min_visibility must be in [0, 1], got {min_visibility!r}")
        single = task not in ("detection", "segmentation")  # these two draw the same multi-object scenes
        self.split = split
        self.task = task
        self.num_images = num_images
        self.image_size = image_size
        self.min_objects = 1 if single else min_objects
        self.max_objects = 1 if single else max_objects
        self.min_size = min_size
        self.max_size = max_size
        self.seed = seed
        self.min_visibility = float(min_visibility)
        self.cache = cache
        self._cache: dict[int, ShapesScene] = {}
        fields = {"detection": ("boxes", "labels", "masks", "keypoints", "price"), "classification": ("label",),
                  "regression": ("value",), "multitask": ("label", "value", "keypoints"),
                  "segmentation": ("mask",)}[task]
        segmentation = task == "segmentation"
        self.info = DatasetInfo(name="shapes" if task == "detection" else f"shapes-{task}", task=task,
                                classes=SEGMENTATION_CLASSES if segmentation else CLASSES, in_channels=3,
                                image_size=(image_size, image_size), target_fields=fields,
                                # top, right, bottom, left: right and left swap; a mask has no keypoints
                                keypoint_flip=None if segmentation else (0, 3, 2, 1))
        grid = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
        self._ys, self._xs = torch.meshgrid(grid, grid, indexing="ij")  # (S, S) each

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> ShapesScene:
        """All annotations of item `index` (shared cached tensors: do not modify them in place)."""
        return cached_item(self, index)

    def __getitem__(self, index: int):
        s = self.scene(index)
        image = s.image.clone()
        if self.task == "detection":
            return image, {"boxes": s.boxes.clone(), "labels": s.labels.clone(), "masks": s.masks.clone(),
                           "keypoints": s.keypoints.clone(), "price": s.price.clone()}
        if self.task == "classification":
            return image, s.labels[0].clone()
        if self.task == "regression":
            return image, s.price[:1].clone()
        if self.task == "segmentation":
            return image, semantic_mask(s.masks, s.labels)
        wh = torch.tensor([self.image_size, self.image_size], dtype=torch.float32)
        return image, {"label": s.labels[0].clone(), "value": s.price[:1].clone(),
                       "keypoints": s.keypoints[0, :, :2] / wh}

    def _render(self, index: int) -> ShapesScene:
        g = torch.Generator().manual_seed(item_seed(self.seed, self.split, index))
        size, xs, ys = self.image_size, self._xs, self._ys
        canvas = _background(g, size)
        num = int(torch.randint(self.min_objects, self.max_objects + 1, (1,), generator=g))
        visible = torch.zeros(num, size, size, dtype=torch.bool)  # visible pixels of the objects placed so far
        full_area = torch.zeros(num)  # pixels of each whole shape
        visible_area = torch.zeros(num)  # pixels of each shape still visible
        labels, windows, shapes, extremes, sizes, colours = [], [], [], [], [], []
        for _ in range(num):
            for _ in range(_PLACEMENT_TRIES):
                label = int(torch.randint(len(CLASSES), (1,), generator=g))
                diameter, u, v, angle = _uniform(g, 0.0, 1.0, 4).tolist()
                diameter = self.min_size + (self.max_size - self.min_size) * diameter
                r = diameter / 2
                cx, cy = r + (size - 2 * r) * u, r + (size - 2 * r) * v  # the whole shape inside the image
                # draw on the window of pixels whose centres can fall inside the shape: small tensors, fast
                win = (slice(max(math.floor(cy - r), 0), min(math.ceil(cy + r), size)),
                       slice(max(math.floor(cx - r), 0), min(math.ceil(cx + r), size)))
                mask, ext = _draw_shape(label, cx, cy, r, angle * 2 * math.pi, xs[win], ys[win])
                if not bool(mask.any()):
                    continue  # too thin to cover a pixel centre (tiny stars)
                n = len(labels)
                covered = (visible[:n, win[0], win[1]] & mask).flatten(1).sum(1)  # (n,) pixels it would hide
                if bool((visible_area[:n] - covered >= self.min_visibility * full_area[:n]).all()):
                    break
            else:
                continue  # no room left for this object
            local = canvas[:, win[0], win[1]][:, mask].mean(dim=1)  # (3,) mean of what the object covers
            cand = torch.rand(_COLOUR_CANDIDATES, 3, generator=g)
            dist = (cand - local).norm(dim=1)
            ok = dist >= _MIN_COLOUR_DISTANCE
            colour = cand[int(ok.float().argmax())] if bool(ok.any()) else cand[int(dist.argmax())]
            canvas[:, win[0], win[1]] = torch.where(mask, colour[:, None, None], canvas[:, win[0], win[1]])
            visible[:n, win[0], win[1]] &= ~mask
            visible[n, win[0], win[1]] = mask
            visible_area[:n] -= covered
            full_area[n] = visible_area[n] = mask.sum()
            labels.append(label)
            windows.append(win)
            shapes.append(mask)
            extremes.append(ext)
            sizes.append(diameter)
            colours.append(colour)
        canvas = canvas.add_(torch.randn(canvas.shape, generator=g), alpha=_NOISE_STD).clamp_(0.0, 1.0)
        n = len(labels)
        masks = visible[:n].clone() if n < num else visible  # (N, S, S)
        keypoints = torch.zeros(n, 4, 3)
        for k in range(n):  # a handful of objects per image; data generation, not a model's hot path
            win = windows[k]
            pts = _snap_to_mask(extremes[k], shapes[k], xs[win], ys[win])  # (4, 2) pixel centres of the full shape
            vis = masks[k][pts[:, 1].long(), pts[:, 0].long()]
            keypoints[k] = torch.cat([pts, vis.float()[:, None]], dim=1)
        price = shape_price(torch.tensor(sizes), torch.stack(colours), self.min_size, self.max_size) if n else \
            torch.zeros(0)
        return ShapesScene(canvas, _mask_boxes(masks), torch.tensor(labels, dtype=torch.int64), masks, keypoints, price)


def semantic_mask(masks: Tensor, labels: Tensor) -> Tensor:
    """Disjoint per-object masks (N, H, W) bool and labels (N,) -> (H, W) int64: 1 + label inside, 0 elsewhere."""
    # the sum equals the label of the one object covering a pixel: visible masks never overlap
    return (masks.long() * (labels.long() + 1)[:, None, None]).sum(dim=0)  # N = 0 gives all background


def _mask_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of non-empty masks (N, H, W), x2/y2 one past the last pixel. -> (N, 4) float32."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    y1 = torch.where(rows, ar_h, h).amin(dim=1)
    y2 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x1 = torch.where(cols, ar_w, w).amin(dim=1)
    x2 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()
