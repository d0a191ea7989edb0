"""Pictures of predictions: boxes, captions, masks and keypoints drawn on an image, grids of images, PNG files.

Drawing is torchvision's (`draw_bounding_boxes`, `draw_segmentation_masks`, `draw_keypoints`); this module
validates the inputs, filters by score, writes "class score" captions and gives every object one colour across its
box, mask and keypoints. Images are `(3, H, W)` (or `(1, H, W)`), float in [0, 1] or uint8; results are uint8.
Boxes are absolute xyxy in pixels of that image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks, make_grid

__all__ = ["PALETTE", "draw_detections", "make_grid_image", "save_image_png", "to_uint8_image"]

Color = str | tuple[int, int, int]

# Twenty well-separated colours (matplotlib's tab10 then its lighter tab20 partners): label k gets PALETTE[k % 20].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


def to_uint8_image(image: Tensor, name: str = "image") -> Tensor:
    """(C, H, W) float in [0, 1] or uint8, C in {1, 3} -> (3, H, W) uint8 on the CPU."""
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a (3, H, W) or (1, H, W) tensor, got {got}")
    image = image.detach().cpu()
    if image.dtype.is_floating_point:
        if image.numel() and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
            raise ValueError(
                f"{name} is float with values in [{image.min():.3g}, {image.max():.3g}]; expected [0, 1] "
                "(undo the normalisation first) or a uint8 image"
            )
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {image.dtype}")
    return image.expand(3, -1, -1).contiguous()


def _rgb(color: Color, name: str) -> tuple[int, int, int]:
    if isinstance(color, str):
        from PIL import ImageColor

        try:
            return ImageColor.getrgb(color)[:3]
        except ValueError as err:
            raise ValueError(f"{name}: unknown colour {color!r}") from err
    if isinstance(color, Sequence) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color):
        return tuple(color)
    raise ValueError(f"{name} must be a colour name, '#rrggbb' or an (r, g, b) tuple of 0..255 ints, got {color!r}")


def _instance_colors(
    colors: Color | Sequence[Color] | None, labels: Tensor | None, n: int
) -> list[tuple[int, int, int]]:
    """One RGB colour per object: given per object, one for all, or by label (by index without labels)."""
    if colors is None:
        ids = labels.tolist() if labels is not None else range(n)
        return [PALETTE[int(i) % len(PALETTE)] for i in ids]
    if isinstance(colors, str) or (isinstance(colors, tuple) and len(colors) == 3 and isinstance(colors[0], int)):
        return [_rgb(colors, "colors")] * n
    if len(colors) != n:
        raise ValueError(f"colors must be one colour or one per box ({n}), got {len(colors)} colours")
    return [_rgb(c, f"colors[{i}]") for i, c in enumerate(colors)]


def _check_vector(x: Tensor | None, name: str, n: int) -> Tensor | None:
    if x is None:
        return None
    x = torch.as_tensor(x).detach().cpu()
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match boxes, got {tuple(x.shape)}")
    return x


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor | None = None,
    scores: Tensor | None = None,
    *,
    classes: Sequence[str] | None = None,
    masks: Tensor | None = None,
    keypoints: Tensor | None = None,
    score_thresh: float = 0.0,
    colors: Color | Sequence[Color] | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    width: int = 2,
    mask_alpha: float = 0.5,
    keypoint_radius: int = 2,
) -> Tensor:
    """Draws N objects on `image`; returns a new (3, H, W) uint8 tensor (the input is not modified).

    image (3|1, H, W) float [0, 1] or uint8; boxes (N, 4) absolute xyxy; labels (N,) class ids; scores (N,);
    masks (N, H, W) bool (float is thresholded at 0.5); keypoints (N, K, 3) as (x, y, visibility), a keypoint with
    visibility <= 0 is not drawn, or (N, K, 2) all visible. Objects with `scores < score_thresh` are dropped.
    Captions are "class score" (`classes[label]`, else the label id; the score with two decimals), only what is
    given. Colours: one per object (`colors` per box, one colour for all, or by label by default).
    `skeleton` lists keypoint index pairs joined by lines.
    """
    img = to_uint8_image(image)
    _, h, w = img.shape
    boxes = torch.as_tensor(boxes).detach().cpu()
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {tuple(boxes.shape)}")
    boxes = boxes.float()
    n = boxes.shape[0]
    if n and not bool(((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).all()):
        raise ValueError("boxes must be xyxy with x2 >= x1 and y2 >= y1")
    labels = _check_vector(labels, "labels", n)
    scores = _check_vector(scores, "scores", n)
    if labels is not None and labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if masks is not None:
        masks = torch.as_tensor(masks).detach().cpu()
        if masks.shape != (n, h, w):
            raise ValueError(f"masks must have shape (N, H, W) = ({n}, {h}, {w}), got {tuple(masks.shape)}")
        masks = masks if masks.dtype == torch.bool else masks > 0.5
    if keypoints is not None:
        keypoints = torch.as_tensor(keypoints).detach().cpu().float()
        if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[-1] not in (2, 3):
            raise ValueError(f"keypoints must have shape (N, K, 3) with N = {n}, got {tuple(keypoints.shape)}")
    if classes is not None and isinstance(classes, str):
        raise ValueError("classes must be a sequence of class names, got a single string")
    palette = _instance_colors(colors, labels, n)

    keep = torch.ones(n, dtype=torch.bool) if scores is None else scores >= score_thresh
    if not bool(keep.any()):
        return img
    idx = keep.nonzero().flatten().tolist()  # visualisation, not a hot path: plain Python lists are fine here
    boxes = boxes[keep]
    palette = [palette[i] for i in idx]

    if masks is not None:
        img = draw_segmentation_masks(img, masks[keep], alpha=mask_alpha, colors=palette)
    captions = None
    if labels is not None or scores is not None:
        captions = []
        for i in idx:
            parts = []
            if labels is not None:
                k = int(labels[i])
                parts.append(classes[k] if classes is not None and 0 <= k < len(classes) else str(k))
            if scores is not None:
                parts.append(f"{float(scores[i]):.2f}")
            captions.append(" ".join(parts))
    img = draw_bounding_boxes(img, boxes, labels=captions, colors=palette, width=width)
    if keypoints is not None:
        kpts = keypoints[keep]
        visible = kpts[..., 2] > 0 if kpts.shape[-1] == 3 else torch.ones(kpts.shape[:2], dtype=torch.bool)
        for j in range(kpts.shape[0]):  # draw_keypoints takes one colour per call
            img = draw_keypoints(
                img,
                kpts[j : j + 1, :, :2],
                connectivity=list(skeleton) if skeleton else None,
                colors=palette[j],
                radius=keypoint_radius,
                visibility=visible[j : j + 1],
            )
    return img


def draw_segmentation(image: Tensor, labels: Tensor, num_classes: int, alpha: float = 0.5,
                      skip: Sequence[int] = (0,)) -> Tensor:
    """Colours each pixel of `image` (3|1, H, W) by its class in `labels` (H, W) (class c in PALETTE[c]);
    classes in `skip` (the background by default) and labels outside [0, num_classes) (ignored pixels) stay
    uncoloured. Returns a new (3, H, W) uint8 tensor."""
    img = to_uint8_image(image)
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.shape != img.shape[-2:]:
        raise ValueError(f"labels must be (H, W) = {tuple(img.shape[-2:])} like the image, got {tuple(labels.shape)}")
    classes = [c for c in range(num_classes) if c not in skip]
    if not classes:
        return img
    masks = labels[None] == torch.tensor(classes)[:, None, None]  # (C, H, W)
    colors = [PALETTE[c % len(PALETTE)] for c in classes]
    return draw_segmentation_masks(img, masks, alpha=alpha, colors=colors)


def make_grid_image(
    images: Sequence[Tensor] | Tensor, nrow: int = 8, *, padding: int = 2, pad_value: int = 0
) -> Tensor:
    """Several images in a grid of `nrow` per row -> (3, H', W') uint8.

    `images` is a list of (3|1, H, W) float [0, 1] or uint8 tensors, or one (B, C, H, W) tensor; images of
    different sizes are padded (bottom, right) with `pad_value` to the largest.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor or a list of (C, H, W), got {tuple(images.shape)}")
        images = list(images)
    if len(images) == 0:
        raise ValueError("images is empty: nothing to put in a grid")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    imgs = [to_uint8_image(im, f"images[{i}]") for i, im in enumerate(images)]
    h = max(im.shape[1] for im in imgs)
    w = max(im.shape[2] for im in imgs)
    imgs = [F.pad(im, (0, w - im.shape[2], 0, h - im.shape[1]), value=pad_value) for im in imgs]
    return make_grid(imgs, nrow=nrow, padding=padding, pad_value=pad_value)


def save_image_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Writes a (3|1, H, W) uint8 (or float [0, 1]) image as a PNG with PIL; creates the folder; returns the path."""
    from PIL import Image

    img = to_uint8_image(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="PNG")
    return path
