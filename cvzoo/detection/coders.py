"""Box coders: boxes <-> regression targets relative to priors. Pure functions of tensors, any leading dims.

Boxes are absolute xyxy. Inverse pairs: decode(encode(b, p), p) == b.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_EXP_CLAMP = math.log(1000.0 / 16)  # the largest dw/dh decoded, as torchvision/detectron2


class BoxCoder:
    """Delta-xywh coding (R-CNN): (dx, dy, dw, dh) = (wx (gx - px) / pw, wy (gy - py) / ph, ww log(gw / pw),
    wh log(gh / ph)) with prior/box centres and sizes; decode clamps dw, dh at `exp_clamp`.

    Same arithmetic as torchvision's `det_utils.BoxCoder`. priors (..., 4), boxes (..., 4) -> (..., 4).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), exp_clamp: float = DEFAULT_EXP_CLAMP) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be four positive numbers, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.exp_clamp = exp_clamp

    def encode(self, boxes: Tensor, priors: Tensor) -> Tensor:
        # on (x, y) / (w, h) pairs: the same arithmetic as torchvision in a third of the operations
        pwh = priors[..., 2:] - priors[..., :2]
        pxy = priors[..., :2] + 0.5 * pwh
        gwh = boxes[..., 2:] - boxes[..., :2]
        gxy = boxes[..., :2] + 0.5 * gwh
        wxy, wwh = self._pair(self.weights[:2], priors), self._pair(self.weights[2:], priors)
        return torch.cat([wxy * (gxy - pxy) / pwh, wwh * torch.log(gwh / pwh)], dim=-1)

    @staticmethod
    def _pair(values: tuple[float, float], like: Tensor) -> Tensor | float:
        return values[0] if values[0] == values[1] else torch.tensor(values, dtype=like.dtype, device=like.device)

    def decode(self, deltas: Tensor, priors: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        priors = priors.to(deltas.dtype)
        pw, ph = priors[..., 2] - priors[..., 0], priors[..., 3] - priors[..., 1]
        px, py = priors[..., 0] + 0.5 * pw, priors[..., 1] + 0.5 * ph
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.exp_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.exp_clamp)
        cx, cy = dx * pw + px, dy * ph + py
        w, h = torch.exp(dw) * pw, torch.exp(dh) * ph
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


class DistanceCoder:
    """ltrb coding for points (FCOS): distances from a point to the box's left, top, right, bottom edges,
    divided by the point's stride when `normalize` (torchvision's BoxLinearCoder(normalize_by_size=True)).

    points (..., 2) xy, strides (...) -> boxes (..., 4) <-> distances (..., 4).
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def encode(self, boxes: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)  # (..., 4) l, t, r, b
        return d / strides[..., None] if self.normalize else d

    def decode(self, distances: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        points = points.to(distances.dtype)
        d = distances * strides[..., None].to(distances.dtype) if self.normalize else distances
        return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def centerness(ltrb: Tensor) -> Tensor:
    """FCOS centre-ness of ltrb distances: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)). (..., 4) -> (...)."""
    lt, rb = ltrb[..., :2], ltrb[..., 2:]  # (l, t) against (r, b): min / max of each pair at once
    ratio = torch.minimum(lt, rb) / torch.maximum(lt, rb)  # (..., 2)
    return torch.sqrt((ratio[..., 0] * ratio[..., 1]).clamp(min=0))
