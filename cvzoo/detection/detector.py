"""What every dense detector shares: input batching and validation, the forward/loss/predict contract."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.types import Signature, cast_like_parameters, check_increasing_strides

ImagesArg = Tensor | Sequence[Tensor]
_UNSET: float = float("nan")  # predict()'s "use the model's nms_thresh" (None already means "no NMS")
TargetsArg = Sequence[Mapping[str, Tensor]] | TargetBatch


class DetectorBase(nn.Module):
    """What every detector shares at its public boundary: batching images of different sizes (zero-padded
    at the bottom/right to a size divisible by `pad_divisor`) and validating targets into a TargetBatch."""

    signature: Signature
    num_classes: int

    def __init__(self, pad_divisor: int = 32) -> None:
        super().__init__()
        if isinstance(pad_divisor, bool) or not isinstance(pad_divisor, int) or pad_divisor < 1:
            raise ValueError(f"pad_divisor must be a positive int, got {pad_divisor!r}")
        self.pad_divisor = pad_divisor

    def target_fields(self) -> dict:
        """Extra per-object fields the targets must carry (`TargetBatch.from_list` keywords)."""
        return {}

    def batch_images(self, images: ImagesArg) -> tuple[Tensor, Tensor]:
        """A batch tensor or a list of differently sized images -> (B, C, H, W) batch, (B, 2) (H, W) sizes."""
        if isinstance(images, Tensor):
            images = cast_like_parameters(self.signature.validate(images), self)
            b, _, h, w = images.shape
            return images, torch.tensor([[h, w]], device=images.device).expand(b, 2)
        if not isinstance(images, Sequence) or not images:
            raise ValueError(f"images must be a (B, C, H, W) tensor or a non-empty list of (C, H, W) tensors, "
                             f"got {type(images).__name__}" + (" of length 0" if isinstance(images, Sequence) else ""))
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.ndim != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got {shape}")
        h = max(img.shape[1] for img in images)
        w = max(img.shape[2] for img in images)
        d = self.pad_divisor
        ph, pw = math.ceil(h / d) * d, math.ceil(w / d) * d
        for i, img in enumerate(images):  # per-image checks name the index, before stacking can fail
            self.signature.replace(min_size=1).validate(img[None], name=f"images[{i}]")
        batch = torch.stack([F.pad(img, (0, pw - img.shape[2], 0, ph - img.shape[1])) for img in images])
        sizes = torch.tensor([list(img.shape[1:]) for img in images], device=batch.device)
        return cast_like_parameters(self.signature.validate(batch), self), sizes

    def target_batch(self, targets: TargetsArg, num_images: int, device: torch.device) -> TargetBatch:
        if isinstance(targets, TargetBatch):
            if targets.boxes.shape[0] != num_images:
                raise ValueError(f"targets hold {targets.boxes.shape[0]} images but there are {num_images} images")
            return targets
        return TargetBatch.from_list(targets, num_images, self.num_classes, device, **self.target_fields())


class DenseDetector(DetectorBase):
    """backbone -> neck -> dense head, plus priors, assignment, losses and post-processing (subclasses).

    Images are normalised with `signature.mean`/`std` (cvzoo models do not normalise internally;
    `signature.normalize` maps [0, 1] images). `images` is a (B, C, H, W) batch or a list of (C, H_i, W_i)
    images, which are zero-padded at the bottom/right to a common size divisible by `pad_divisor`.
    Boxes in targets and detections are absolute xyxy pixels of the input images.

    - `forward(images: Tensor)` -> the head's raw NamedTuple (pure tensor code, same in train and eval);
    - `loss(images, targets)` -> {"loss": total, term: value}; targets are torchvision-style dicts
      (validated) or a `TargetBatch` (trusted, the compile-friendly path);
    - `predict(images, score_thresh=..., nms_thresh=..., max_detections=...)` -> [Detections] per image.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, pad_divisor: int = 32,
                 score_thresh: float = 0.05, nms_thresh: float | None = 0.5, max_detections: int = 100,
                 topk_candidates: int = 1000) -> None:
        super().__init__(pad_divisor)
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes = head.num_classes
        feature_info = (neck if neck is not None else backbone).feature_info
        check_increasing_strides(feature_info, "the detector's pyramid", type(self).__name__)
        self.strides = tuple(f.stride for f in feature_info)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.topk_candidates = topk_candidates
        self.signature = backbone.signature.replace(outputs=tuple(type(self).output_names()))

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return ()

    # ---- composition ---------------------------------------------------------------------------

    def features(self, images: Tensor) -> list[Tensor]:
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    def forward(self, images: Tensor) -> tuple:
        return self.head(self.features(images))

    # ---- public boundary -----------------------------------------------------------------------

    def loss(self, images: ImagesArg, targets: TargetsArg) -> dict[str, Tensor]:
        batch, sizes = self.batch_images(images)
        target_batch = self.target_batch(targets, batch.shape[0], batch.device)
        feats = self.features(batch)
        return self.compute_loss(self.head(feats), [tuple(f.shape[-2:]) for f in feats], target_batch, sizes)

    @torch.no_grad()
    def predict(self, images: ImagesArg, score_thresh: float | None = None, nms_thresh: float | None = _UNSET,
                max_detections: int | None = None, topk_candidates: int | None = None) -> list[Detections]:
        """Detections per image, best first. Arguments left out take the model's defaults (`nms_thresh=None`
        turns NMS off)."""
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.nms_thresh if nms_thresh is _UNSET else nms_thresh
        max_detections = self.max_detections if max_detections is None else max_detections
        topk_candidates = self.topk_candidates if topk_candidates is None else topk_candidates
        if not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"score_thresh must lie in [0, 1), got {score_thresh}")
        if nms_thresh is not None and not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must lie in (0, 1] or be None, got {nms_thresh}")
        if max_detections < 1 or topk_candidates < 1:
            raise ValueError(f"max_detections and topk_candidates must be positive, got {max_detections}, "
                             f"{topk_candidates}")
        batch, sizes = self.batch_images(images)
        feats = self.features(batch)
        return self.postprocess(self.head(feats), [tuple(f.shape[-2:]) for f in feats], sizes, score_thresh,
                                nms_thresh, max_detections, topk_candidates)

    def dense_predictions(self, images: ImagesArg) -> tuple[Tensor, Tensor]:
        """Every prior's class scores and box, before selection and NMS, differentiable (for explanations,
        e.g. the score of one detection as a Grad-CAM target): scores (B, R, K) in [0, 1] as `predict`
        ranks them, boxes (B, R, 4) xyxy in input pixels (not clipped)."""
        batch, _ = self.batch_images(images)
        feats = self.features(batch)
        return self.decode_dense(self.head(feats), [tuple(f.shape[-2:]) for f in feats])

    # ---- subclass hooks ------------------------------------------------------------------------

    def decode_dense(self, out: tuple, sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Raw head outputs -> (scores (B, R, K), boxes (B, R, 4)) for every prior (see dense_predictions)."""
        raise NotImplementedError

    def compute_loss(self, out: tuple, sizes: list[tuple[int, int]], targets: TargetBatch,
                     image_sizes: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def postprocess(self, out: tuple, sizes: list[tuple[int, int]], image_sizes: Tensor, score_thresh: float,
                    nms_thresh: float | None, max_detections: int, topk_candidates: int) -> list[Detections]:
        raise NotImplementedError
