"""Mask and keypoint targets and decoding of Mask/Keypoint R-CNN heads, for many RoIs at once.

Boxes are absolute xyxy in input-image pixels. The numbers are those of torchvision's `roi_heads`
(`project_masks_on_boxes`, `paste_masks_in_image`, `keypoints_to_heatmap`, `heatmaps_to_keypoints`), which
loop over images or RoIs; here nothing loops over boxes. Resizing one map to a per-RoI size is done as two
matrix products: `interpolate(mode="bilinear" | "bicubic", align_corners=False)` is separable, so resizing
an (h_in, w_in) map to (h, w) is `Wy (h, h_in) @ map @ Wx (w, w_in)^T` with 1-D weight matrices built from
torch's own source-index rules. Per-RoI output sizes become rows of one padded weight matrix.

`mask_targets`, `keypoint_targets` and `paste_masks` have shapes fixed by their arguments' shapes (loss
side, compile-clean). `heatmaps_to_keypoints` resizes each RoI's heatmap to the RoI's size in pixels, a
data-dependent size, so it reads the largest one on the host (post-processing, as torchvision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# Upper bound on the elements of the largest intermediate of `paste_masks` / `heatmaps_to_keypoints`
# (128 MiB in float32): RoIs are processed in chunks so that many masks in a large image fit in memory.
CHUNK_ELEMENTS = 2**25

CUBIC_A = -0.75  # torch's bicubic kernel (Keys' cubic convolution with a = -0.75)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _linear_weights(in_size: int, out_sizes: Tensor, dst: Tensor, dtype: torch.dtype) -> Tensor:
    """1-D weights of `interpolate(mode="bilinear", align_corners=False)` from `in_size` samples to
    `out_sizes` samples. out_sizes (N,) int64 >= 1, dst (N, L) int64 destination indices -> (N, L, in_size),
    row (n, l) holding the weights of output sample dst[n, l] of RoI n (any dst: out-of-range rows get the
    clamped edge weights, the caller masks them).

    torch's rules (ATen/native/UpSample.h): scale = in / out in the op's float type;
    src = scale * (dst + 0.5) - 0.5, clamped at 0; i0 = min(floor(src), in - 1), i1 = i0 + 1 unless i0 is the
    last sample; lambda = src - i0 clamped to [0, 1]; weights (1 - lambda, lambda).
    """
    # a true division in the op's type, as torch's `(float)input_size / output_size` (python `int / tensor`
    # would multiply by a rounded reciprocal)
    scale = torch.full_like(out_sizes, in_size, dtype=dtype) / out_sizes.to(dtype)  # (N,)
    src = (scale[:, None] * (dst.to(dtype) + 0.5) - 0.5).clamp(min=0)  # (N, L)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    lam = (src - i0).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    index = torch.stack([i0, i1], dim=-1)  # (N, L, 2)
    value = torch.stack([1 - lam, lam], dim=-1)  # (N, L, 2)
    weights = torch.zeros(*dst.shape, in_size, dtype=dtype, device=dst.device)  # (N, L, in)
    # scatter_add: at the last sample i0 == i1 and both weights land on it, as torch's kernel sums them
    return weights.scatter_add_(2, index, value)


def _cubic_weights(in_size: int, out_sizes: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """1-D weights of `interpolate(mode="bicubic", align_corners=False)` from `in_size` samples to
    `out_sizes` samples. out_sizes (N,) int64 >= 1 -> (N, length, in_size); rows at or past out_sizes[n]
    hold extrapolated weights, the caller masks them.

    torch's rules (ATen/native/UpSample.h): scale = in / out; src = scale * (dst + 0.5) - 0.5, not clamped
    (cubic); i0 = min(floor(src), in - 1), t = src - i0 clamped to [0, 1]; taps i0 - 1 .. i0 + 2, each index
    clamped into [0, in - 1] (edge replication), weights of Keys' cubic convolution with a = -0.75.
    """
    scale = torch.full_like(out_sizes, in_size, dtype=dtype) / out_sizes.to(dtype)  # (N,)
    dst = torch.arange(length, device=out_sizes.device, dtype=dtype)  # (L,)
    src = scale[:, None] * (dst + 0.5) - 0.5  # (N, L)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    t = (src - i0).clamp(0, 1)
    a = CUBIC_A

    def near(x: Tensor) -> Tensor:  # kernel for |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # kernel for 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    value = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # (N, L, 4)
    taps = torch.arange(-1, 3, device=out_sizes.device)  # (4,)
    index = (i0[..., None] + taps).clamp(0, in_size - 1)  # (N, L, 4)
    weights = torch.zeros(*src.shape, in_size, dtype=dtype, device=out_sizes.device)  # (N, L, in)
    # scatter_add: clamped taps that hit the same edge sample add up, as torch reads that sample repeatedly
    return weights.scatter_add_(2, index, value)


def mask_targets(gt_masks: Tensor, matched: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Mask R-CNN mask targets: each RoI's matched ground-truth mask cropped to the RoI and resized by RoIAlign.

    gt_masks (B, M, H, W) float or bool instance masks, matched (B, S) int64 index into M of each RoI's
    ground truth, boxes (B, S, 4) xyxy RoIs in pixels -> (B, S, h, w) in boxes' float dtype, (h, w) = size.

    Same numbers as torchvision's `project_masks_on_boxes` per image (RoIAlign, spatial scale 1, adaptive
    sampling, aligned=False). `matched` is clamped into [0, M - 1]: rows the caller masks out later may hold
    anything. M == 0 (no objects in the batch) gives zeros.
    """
    out_size = (size, size) if _is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(out_size) != 2 or not all(_is_int(s) and s > 0 for s in out_size):
        raise ValueError(f"size must be a positive int or a pair (height, width) of positive ints, got {size!r}")
    if gt_masks.ndim != 4:
        raise ValueError(f"gt_masks must be (B, M, H, W), got shape {tuple(gt_masks.shape)}")
    b, m, h, w = gt_masks.shape
    if matched.ndim != 2 or matched.shape[0] != b or matched.is_floating_point() or matched.is_complex() \
            or matched.dtype == torch.bool:
        raise ValueError(f"matched must be a ({b}, S) integer tensor (B of gt_masks), got shape "
                         f"{tuple(matched.shape)} and dtype {matched.dtype}")
    s = matched.shape[1]
    if boxes.shape != (b, s, 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes must be ({b}, {s}, 4) float xyxy (B, S of matched), got shape {tuple(boxes.shape)} "
                         f"and dtype {boxes.dtype}")
    if m == 0:  # no ground truth anywhere in the batch: nothing to crop (a static shape, not data)
        return boxes.new_zeros((b, s, *out_size))
    masks = gt_masks.reshape(b * m, 1, h, w).to(boxes.dtype)  # (BM, 1, H, W): one stack for one roi_align call
    image = torch.arange(b, device=boxes.device)[:, None] * m  # (B, 1) first row of each image in the stack
    index = (image + matched.to(torch.int64).clamp(0, m - 1)).to(boxes.dtype)  # (B, S)
    rois = torch.cat([index[..., None], boxes], dim=-1).reshape(b * s, 5)  # (BS, 5): (stack row, x1, y1, x2, y2)
    out = roi_align(masks, rois, out_size, spatial_scale=1.0)  # (BS, 1, h, w)
    return out.reshape(b, s, *out_size)


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """(N, 4) xyxy -> (N, 4) scaled about their centres; torchvision's `expand_boxes`, op for op, so that the
    integer box truncated from it is bit-identical."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def _paste_weights(lo: Tensor, hi: Tensor, in_size: int, length: int, dtype: torch.dtype) -> Tensor:
    """lo, hi (N,) int64 first and last image pixel of each integer box along one axis -> (N, length, in_size)
    weights taking `in_size` mask samples to the `length` image pixels; zero rows outside [lo, hi] and
    outside the image."""
    # torchvision's paste_mask_in_image: the integer box [lo, hi] covers hi - lo + 1 pixels (TO_REMOVE = 1),
    # at least 1 for the interpolation size
    out_sizes = (hi - lo + 1).clamp(min=1)  # (N,)
    pixel = torch.arange(length, device=lo.device)  # (L,)
    weights = _linear_weights(in_size, out_sizes, pixel - lo[:, None], dtype)  # (N, L, in)
    # pixels torchvision writes: [max(lo, 0), min(hi + 1, length)); a degenerate box (hi < lo) writes none
    inside = (pixel >= lo[:, None]) & (pixel <= hi[:, None])  # (N, L)
    return weights * inside[..., None]


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste each RoI's predicted mask into the image at its box.

    masks (N, Mh, Mw) float probabilities, boxes (N, 4) xyxy in pixels, image_size (H, W)
    -> (N, H, W) in masks' float dtype (at least float32), zero outside each box.

    Same numbers as torchvision's `paste_masks_in_image(masks[:, None], boxes, image_size, padding)[:, 0]`:
    the mask is zero-padded by `padding` on every side and the box grown by (Mw + 2 padding) / Mw (torchvision
    takes the ratio from the mask width for both axes), truncated to integers, then the mask resized bilinearly
    to the integer box's size and clipped to the image. Boxes wholly outside the image give zero masks (where
    torchvision's slicing raises for some of them).
    """
    if masks.ndim != 3 or not masks.is_floating_point():
        raise ValueError(f"masks must be (N, Mh, Mw) float, got shape {tuple(masks.shape)} and dtype {masks.dtype}")
    n, mh, mw = masks.shape
    if boxes.shape != (n, 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes must be ({n}, 4) float xyxy (N of masks), got shape {tuple(boxes.shape)} and "
                         f"dtype {boxes.dtype}")
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
        raise ValueError(f"image_size must be a pair (H, W) of positive ints, got {image_size!r}")
    if not _is_int(padding) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if mh == 0 or mw == 0:
        raise ValueError(f"masks must have a non-empty (Mh, Mw), got shape {tuple(masks.shape)}")
    im_h, im_w = size
    dtype = torch.promote_types(masks.dtype, torch.float32)
    out = torch.zeros(n, im_h, im_w, dtype=dtype, device=masks.device)  # (N, H, W)
    if n == 0:
        return out
    scale = float(mw + 2 * padding) / mw
    # `.to(int64)` truncates toward zero (not floor), as torchvision's cast: keep it for the same pixels
    ibox = _expand_boxes(boxes, scale).to(torch.int64)  # (N, 4)
    ph, pw = mh + 2 * padding, mw + 2 * padding
    # the largest intermediates per RoI: the (H, W) result and the (H, Mw') left product
    chunk = max(1, CHUNK_ELEMENTS // (im_h * (im_w + pw)))
    for start in range(0, n, chunk):  # fixed-size chunks bound memory; the count depends on shapes only
        stop = min(start + chunk, n)
        m = F.pad(masks[start:stop].to(dtype), (padding,) * 4)  # (c, Mh', Mw')
        bx = ibox[start:stop]
        wy = _paste_weights(bx[:, 1], bx[:, 3], ph, im_h, dtype)  # (c, H, Mh')
        wx = _paste_weights(bx[:, 0], bx[:, 2], pw, im_w, dtype)  # (c, W, Mw')
        out[start:stop] = wy @ m @ wx.transpose(1, 2)  # (c, H, Mh') @ (c, Mh', Mw') @ (c, Mw', W) -> (c, H, W)
    return out


def keypoint_targets(keypoints: Tensor, boxes: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """Keypoint R-CNN targets: each keypoint's cell in its RoI's heatmap_size x heatmap_size heatmap.

    keypoints (B, S, K, 3) x, y, visibility in pixels (each RoI's matched ground truth), boxes (B, S, 4) xyxy
    RoIs -> indices (B, S, K) int64 flat cell `y * heatmap_size + x` (0 where not valid), valid (B, S, K) bool.

    Same numbers as torchvision's `keypoints_to_heatmap` on the flattened rows: cell = floor((p - x1) *
    heatmap_size / (x2 - x1)), a point exactly on the box's right/bottom edge goes to the last cell, and a
    keypoint is valid when visible (v > 0) and its cell lies inside the heatmap.
    """
    if not _is_int(heatmap_size) or heatmap_size < 1:
        raise ValueError(f"heatmap_size must be a positive int, got {heatmap_size!r}")
    if keypoints.ndim != 4 or keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be (B, S, K, 3) (x, y, visibility), got shape {tuple(keypoints.shape)}")
    b, s = keypoints.shape[:2]
    if boxes.shape != (b, s, 4):
        raise ValueError(f"boxes must be ({b}, {s}, 4) xyxy (B, S of keypoints), got shape {tuple(boxes.shape)}")
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # (B, S, 1) each, broadcast over K
    # torchvision's expressions op for op (`int / tensor` included): the floor is sensitive to the last bit
    scale_x = heatmap_size / (x2 - x1)
    scale_y = heatmap_size / (y2 - y1)
    px, py, vis = keypoints.unbind(-1)  # (B, S, K) each
    # keypoints on the far edge would floor to heatmap_size, one past the end: they belong to the last cell
    last = heatmap_size - 1
    x = torch.where(px == x2, last, ((px - x1) * scale_x).floor().long())
    y = torch.where(py == y2, last, ((py - y1) * scale_y).floor().long())
    valid = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size) & (vis > 0)
    indices = torch.where(valid, y * heatmap_size + x, 0)
    return indices, valid


def heatmaps_to_keypoints(maps: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Keypoint R-CNN decoding: the argmax of each heatmap resized to its RoI's size, in image pixels.

    maps (N, K, Hm, Wm) heatmap logits, boxes (N, 4) xyxy RoIs
    -> keypoints (N, K, 3) float32 (x, y, 1) in image pixels, scores (N, K) float32 logit at the argmax.

    Same numbers as torchvision's `heatmaps_to_keypoints`: each RoI's maps are resized bicubically
    (align_corners=False) to (ceil(h), ceil(w)) with (w, h) the box size clamped at 1 pixel; cell (x_int, y_int)
    of the argmax maps to x = (x_int + 0.5) * w / ceil(w) + x1 (y alike). RoIs of a chunk share one padded
    grid, cells outside an RoI's own size set to -inf. Ties go to the first cell in row-major order (as
    torchvision's argmax over the unpadded map).
    """
    if maps.ndim != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be (N, K, Hm, Wm) float, got shape {tuple(maps.shape)} and dtype {maps.dtype}")
    n, k, hm, wm = maps.shape
    if boxes.shape != (n, 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes must be ({n}, 4) float xyxy (N of maps), got shape {tuple(boxes.shape)} and "
                         f"dtype {boxes.dtype}")
    if hm == 0 or wm == 0:
        raise ValueError(f"maps must have a non-empty (Hm, Wm), got shape {tuple(maps.shape)}")
    device = maps.device
    keypoints = torch.ones(n, k, 3, dtype=torch.float32, device=device)  # visibility column stays 1
    scores = torch.zeros(n, k, dtype=torch.float32, device=device)
    if n == 0 or k == 0:
        return keypoints, scores
    dtype = torch.promote_types(maps.dtype, torch.float32)  # torch interpolates in float32 (double for double)
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)  # (N,)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    widths_ceil = widths.ceil()
    heights_ceil = heights.ceil()
    out_w = widths_ceil.to(torch.int64)  # (N,) resized map size of each RoI
    out_h = heights_ceil.to(torch.int64)
    # the one host read: the padded grid's size is data-dependent (each RoI's size in pixels)
    sizes_h, sizes_w = out_h.tolist(), out_w.tolist()
    max_h, max_w = max(sizes_h), max(sizes_w)
    chunk = max(1, CHUNK_ELEMENTS // (k * max_h * max(max_w, wm)))
    for start in range(0, n, chunk):  # chunks bound the (c, K, h, w) grid
        stop = min(start + chunk, n)
        ch, cw = max(sizes_h[start:stop]), max(sizes_w[start:stop])  # this chunk's padded grid
        wy = _cubic_weights(hm, out_h[start:stop], ch, dtype)  # (c, ch, Hm)
        wx = _cubic_weights(wm, out_w[start:stop], cw, dtype)  # (c, cw, Wm)
        grid = wy[:, None] @ maps[start:stop].to(dtype) @ wx[:, None].transpose(-1, -2)  # (c, K, ch, cw)
        rows = torch.arange(ch, device=device) < out_h[start:stop, None]  # (c, ch)
        cols = torch.arange(cw, device=device) < out_w[start:stop, None]  # (c, cw)
        inside = rows[:, :, None] & cols[:, None, :]  # (c, ch, cw)
        grid = grid.masked_fill(~inside[:, None], float("-inf"))
        best, pos = grid.flatten(2).max(dim=2)  # (c, K): the first maximum in row-major order, as argmax
        x_int = pos % cw
        y_int = torch.div(pos, cw, rounding_mode="floor")
        # torchvision's formula, op for op: cell centre, rescaled from the ceil'd grid to the box, offset
        width_correction = (widths[start:stop] / widths_ceil[start:stop])[:, None]  # (c, 1)
        height_correction = (heights[start:stop] / heights_ceil[start:stop])[:, None]
        keypoints[start:stop, :, 0] = (x_int.float() + 0.5) * width_correction + boxes[start:stop, 0, None]
        keypoints[start:stop, :, 1] = (y_int.float() + 0.5) * height_correction + boxes[start:stop, 1, None]
        scores[start:stop] = best.to(torch.float32)
    return keypoints, scores
