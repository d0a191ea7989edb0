"""COCO-style evaluation of detectors: box and mask mAP through torchmetrics' MeanAveragePrecision, keypoint
OKS AP through pycocotools' COCOeval, and matched-pair errors of 3D outputs.

Boxes are absolute xyxy in image pixels throughout; class labels are 0-based and used as COCO category ids.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cvzoo._optional import require
from cvzoo.detection.structures import Detections

IOU_TYPES = ("bbox", "segm", "keypoints")
# COCO's OKS sigmas of its 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles),
# the values pycocotools' keypoint Params use
COCO_KEYPOINT_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
                        0.087, 0.087, 0.089, 0.089)
DEFAULT_KEYPOINT_SIGMA = 0.05  # per keypoint when K != 17
_AP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
# COCOeval(iouType="keypoints").stats: AP, AP50, AP75, AP medium, AP large, AR (20 detections), ...
_KEYPOINT_KEYS = ("keypoints_map", "keypoints_map_50", "keypoints_map_75", "keypoints_map_medium",
                  "keypoints_map_large", "keypoints_mar_20")


class DetectionEvaluator:
    """Accumulates per-image detections and torchvision-style targets, then computes COCO APs.

    `update(predictions, targets)` takes one entry per image: predictions are `Detections` or dicts
    {"boxes" (N, 4) xyxy pixels, "scores" (N,), "labels" (N,) int, plus what `iou_types` needs: "masks" (N, H, W)
    (or (N, 1, H, W)) probabilities, binarised at > 0.5, and "keypoints" (N, K, 3) (x, y, visibility; visibility is
    not used by OKS)}; targets are {"boxes" (M, 4), "labels" (M,), "masks" (M, H, W) bool/uint8 (nonzero = object),
    "keypoints" (M, K, 3) with visibility > 0 on labelled points}. `compute()` returns, per requested iou type:

    - "bbox": "map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "per_class" {name: AP}
      (torchmetrics' MeanAveragePrecision, box areas for the size buckets).
    - "segm": the same keys prefixed "segm_" (mask IoU; mask areas for the size buckets).
    - "keypoints": "keypoints_map", "keypoints_map_50", "keypoints_map_75", "keypoints_map_medium",
      "keypoints_map_large", "keypoints_mar_20" (pycocotools' COCOeval(iouType="keypoints"): at most 20 detections
      per image, OKS thresholds 0.5:0.95). A predicted object's score is its detection score. The OKS scale s^2 of
      a ground-truth object is its mask area when the target has "masks" (its box area where the mask is empty),
      else its box area. Unlabelled keypoints (visibility 0) are left out of the OKS; objects without a labelled
      keypoint are ignored, as in COCO. `keypoint_sigmas` (K,) defaults to COCO's 17 sigmas when K == 17, else
      0.05 for every keypoint.

    APs are -1 where there is no ground truth (for a class, a size bucket or at all). Needs
    `pip install 'cvzoo[metrics]'`.
    """

    def __init__(self, iou_types: Sequence[str] = ("bbox",), class_names: Sequence[str] | None = None,
                 keypoint_sigmas: Sequence[float] | Tensor | None = None) -> None:
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        if not isinstance(iou_types, Sequence) or len(iou_types) == 0:
            raise ValueError(f"iou_types must be a non-empty sequence of {IOU_TYPES}, got {iou_types!r}")
        for t in iou_types:
            if t not in IOU_TYPES:
                raise ValueError(f"iou_types holds {t!r}; expected each one of {IOU_TYPES}")
        self.iou_types = tuple(dict.fromkeys(iou_types))
        self.class_names = list(class_names) if class_names is not None else None
        self.keypoint_sigmas = None
        if keypoint_sigmas is not None:
            sigmas = torch.as_tensor(keypoint_sigmas, dtype=torch.float64)
            if sigmas.ndim != 1 or sigmas.numel() == 0 or not bool((sigmas > 0).all() & sigmas.isfinite().all()):
                raise ValueError(f"keypoint_sigmas must be a (K,) sequence of positive finite floats, got "
                                 f"{keypoint_sigmas!r:.80}")
            self.keypoint_sigmas = tuple(sigmas.tolist())
        self._box_metric = self._mask_metric = None
        if "bbox" in self.iou_types or "segm" in self.iou_types:
            metrics = require("torchmetrics.detection", "metrics", "detection evaluation")
            if "bbox" in self.iou_types:
                self._box_metric = metrics.MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                                                class_metrics=True)
            if "segm" in self.iou_types:
                # Masks go through a ("bbox", "segm") metric of their own, of which only the segm results are read:
                # torchmetrics 1.9's tuple mode gives box size buckets the ground truth's *mask* areas (it
                # switches only the predictions' areas per iou type), and its segm-only mode reports -1 instead
                # of 0 when no image has a predicted mask. The box keys come from the box-only metric above.
                self._mask_metric = metrics.MeanAveragePrecision(box_format="xyxy", iou_type=("bbox", "segm"),
                                                                 class_metrics=True)
        if "keypoints" in self.iou_types:
            require("pycocotools.cocoeval", "metrics", "keypoint evaluation")
        self.reset()

    def reset(self) -> None:
        """Forgets every update."""
        for metric in (self._box_metric, self._mask_metric):
            if metric is not None:
                metric.reset()
        self._num_images = 0
        self._num_keypoints: int | None = None
        self._kp_gt: list[dict] = []  # COCO annotations without ids; ids are given at compute
        self._kp_dt: list[dict] = []  # COCO keypoint results

    def update(self, predictions: Sequence[Detections | Mapping[str, Tensor]],
               targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Adds one batch: `predictions[i]` and `targets[i]` belong to the same image (formats in the class doc)."""
        if isinstance(predictions, Mapping | Detections) or not isinstance(predictions, Sequence):
            raise ValueError(f"predictions must be a list with one Detections or dict per image, got "
                             f"{type(predictions).__name__}")
        if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
            raise ValueError(f"targets must be a list with one dict per image, got {type(targets).__name__}")
        if len(predictions) != len(targets):
            raise ValueError(f"len(predictions) is {len(predictions)} but len(targets) is {len(targets)}; expected "
                             "one of each per image")
        preds = [_as_dict(p, f"predictions[{i}]", ("boxes", "scores", "labels")) for i, p in enumerate(predictions)]
        gts = [_as_dict(t, f"targets[{i}]", ("boxes", "labels")) for i, t in enumerate(targets)]
        box_preds = [{"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"].long()}
                     for p in preds]
        box_gts = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in gts]
        if self._box_metric is not None:
            self._box_metric.update(box_preds, box_gts)
        if self._mask_metric is not None:
            pred_masks, gt_masks = zip(*(_masks_of(p, t, i) for i, (p, t) in enumerate(zip(preds, gts))))
            self._mask_metric.update([{**b, "masks": m} for b, m in zip(box_preds, pred_masks)],
                                     [{**b, "masks": m} for b, m in zip(box_gts, gt_masks)])
        if "keypoints" in self.iou_types:
            for i, (p, t) in enumerate(zip(preds, gts)):
                self._add_keypoints(p, t, i)
        self._num_images += len(preds)

    def compute(self) -> dict[str, float | dict[str, float]]:
        """The keys of the requested iou types (class doc), Python floats."""
        out: dict[str, float | dict[str, float]] = {}
        if self._box_metric is not None:
            out.update(self._torchmetrics_results(self._box_metric.compute(), "", ""))
        if self._mask_metric is not None:
            out.update(self._torchmetrics_results(self._mask_metric.compute(), "segm_", "segm_"))
        if "keypoints" in self.iou_types:
            out.update(self._keypoint_results())
        return out

    def _torchmetrics_results(self, result: Mapping[str, Tensor], src: str, dst: str) -> dict:
        out: dict[str, float | dict[str, float]] = {dst + k: float(result[src + k]) for k in _AP_KEYS}
        classes = result["classes"].reshape(-1).tolist()
        aps = result[src + "map_per_class"].reshape(-1).tolist()
        out[dst + "per_class"] = {self._name(c): ap for c, ap in zip(classes, aps)}
        return out

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else str(c)

    def _add_keypoints(self, p: Mapping[str, Tensor], t: Mapping[str, Tensor], i: int) -> None:
        """Appends image i's ground truth and predictions in COCO's keypoint format (image ids from 1)."""
        image_id = self._num_images + i + 1
        gt_kp = _keypoints_of(t, f"targets[{i}]", len(t["boxes"]), need_visibility=True)
        dt_kp = _keypoints_of(p, f"predictions[{i}]", len(p["boxes"]), need_visibility=False)
        for name, kp in ((f"targets[{i}]['keypoints']", gt_kp), (f"predictions[{i}]['keypoints']", dt_kp)):
            if kp.shape[0] == 0:
                continue
            if self._num_keypoints is None:
                self._num_keypoints = kp.shape[1]
            if kp.shape[1] != self._num_keypoints:
                raise ValueError(f"{name} has K={kp.shape[1]} keypoints but earlier ones have "
                                 f"K={self._num_keypoints}; expected the same K everywhere")
        boxes = t["boxes"].double()
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
        area = wh.prod(-1)  # (M,) box area
        if "masks" in t:
            masks = t["masks"]
            if masks.ndim != 3 or masks.shape[0] != len(boxes):
                raise ValueError(f"targets[{i}]['masks'] must be ({len(boxes)}, H, W), got {tuple(masks.shape)}")
            mask_area = (masks != 0).flatten(1).sum(-1).double()
            area = torch.where(mask_area > 0, mask_area, area)  # COCO's scale is the segment area
        labelled = gt_kp[..., 2] > 0  # (M, K)
        flat = torch.cat([gt_kp[..., :2].double(), torch.where(labelled, 2.0, 0.0)[..., None]], -1).flatten(1)
        for m in range(len(boxes)):
            self._kp_gt.append({
                "image_id": image_id, "category_id": int(t["labels"][m]), "iscrowd": 0,
                "keypoints": flat[m].tolist(), "num_keypoints": int(labelled[m].sum()), "area": float(area[m]),
                "bbox": [*boxes[m, :2].tolist(), *wh[m].tolist()],
            })
        scores = p["scores"].double()
        dt_flat = torch.cat([dt_kp[..., :2].double(), torch.ones_like(dt_kp[..., :1], dtype=torch.float64)],
                            -1).flatten(1)  # visibility 1: COCO's OKS does not read a prediction's visibility
        for n in range(len(scores)):
            self._kp_dt.append({"image_id": image_id, "category_id": int(p["labels"][n]),
                                "keypoints": dt_flat[n].tolist(), "score": float(scores[n])})

    def _keypoint_results(self) -> dict[str, float]:
        if not self._kp_gt or self._num_keypoints is None:
            return dict.fromkeys(_KEYPOINT_KEYS, -1.0)
        import numpy as np

        coco_mod = require("pycocotools.coco", "metrics", "keypoint evaluation")
        eval_mod = require("pycocotools.cocoeval", "metrics", "keypoint evaluation")
        k = self._num_keypoints
        sigmas = self.keypoint_sigmas
        if sigmas is None:
            sigmas = COCO_KEYPOINT_SIGMAS if k == len(COCO_KEYPOINT_SIGMAS) else (DEFAULT_KEYPOINT_SIGMA,) * k
        elif len(sigmas) != k:
            raise ValueError(f"keypoint_sigmas has {len(sigmas)} values but the keypoints have K={k}; expected one "
                             "sigma per keypoint")
        categories = sorted({a["category_id"] for a in self._kp_gt} | {a["category_id"] for a in self._kp_dt})
        dataset = {
            "images": [{"id": j + 1} for j in range(self._num_images)],
            "categories": [{"id": c, "name": self._name(c)} for c in categories],
            # annotation ids start at 1: COCOeval marks an unmatched detection with gt id 0
            "annotations": [{**a, "id": j + 1} for j, a in enumerate(self._kp_gt)],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress and the summary table
            gt = coco_mod.COCO()
            gt.dataset = dataset
            gt.createIndex()
            if self._kp_dt:
                dt = gt.loadRes([dict(a) for a in self._kp_dt])  # loadRes adds id, area, bbox in place
            else:  # loadRes cannot take an empty list; no detection at all gives AP 0
                dt = coco_mod.COCO()
                dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
                dt.createIndex()
            coco_eval = eval_mod.COCOeval(gt, dt, iouType="keypoints")
            coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return {key: float(coco_eval.stats[j]) for j, key in enumerate(_KEYPOINT_KEYS)}


def _as_dict(item: Detections | Mapping[str, Tensor], name: str, required: Sequence[str]) -> dict[str, Tensor]:
    """A Detections or dict as a dict of CPU tensors; ValueError naming `name` when a key is missing."""
    if isinstance(item, Detections):
        item = item.to_dict()
    if not isinstance(item, Mapping):
        raise ValueError(f"{name} must be a Detections or a dict of tensors, got {type(item).__name__}")
    missing = [k for k in required if k not in item]
    if missing:
        raise ValueError(f"{name} has no {missing}; expected keys {list(required)}")
    out = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in item.items()}
    for k in required:
        if not isinstance(out[k], Tensor):
            raise ValueError(f"{name}[{k!r}] must be a tensor, got {type(out[k]).__name__}")
    n = out[required[0]].shape[0]
    if out[required[0]].ndim != 2 or out[required[0]].shape[-1] != 4:
        raise ValueError(f"{name}['boxes'] must be (N, 4) xyxy, got {tuple(out[required[0]].shape)}")
    for k in required[1:]:
        if out[k].shape[:1] != (n,):
            raise ValueError(f"{name}[{k!r}] must have {n} rows, one per box, got shape {tuple(out[k].shape)}")
    return out


def _masks_of(p: Mapping[str, Tensor], t: Mapping[str, Tensor], i: int) -> tuple[Tensor, Tensor]:
    """(N, H, W) predicted masks binarised at > 0.5 and (M, H, W) bool target masks of image i."""
    if "masks" not in t:
        raise ValueError(f"targets[{i}] has no 'masks'; iou_types with 'segm' needs (M, H, W) instance masks")
    gt = t["masks"]
    n, m = len(p["boxes"]), len(t["boxes"])
    if gt.ndim != 3 or gt.shape[0] != m:
        raise ValueError(f"targets[{i}]['masks'] must be ({m}, H, W), one mask per box, got {tuple(gt.shape)}")
    pred = p.get("masks")
    if pred is None and n == 0:
        pred = torch.zeros(0, *gt.shape[1:])
    if pred is None:
        raise ValueError(f"predictions[{i}] has no 'masks'; iou_types with 'segm' needs (N, H, W) mask "
                         "probabilities")
    if pred.ndim == 4 and pred.shape[1] == 1:  # torchvision's Mask R-CNN gives (N, 1, H, W)
        pred = pred[:, 0]
    if pred.ndim != 3 or pred.shape[0] != n:
        raise ValueError(f"predictions[{i}]['masks'] must be ({n}, H, W), one mask per box, got "
                         f"{tuple(pred.shape)}")
    if n and m and pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"predictions[{i}]['masks'] are {tuple(pred.shape[1:])} but targets[{i}]['masks'] are "
                         f"{tuple(gt.shape[1:])}; expected masks pasted into the same image size")
    pred = pred if pred.dtype == torch.bool else pred > 0.5
    return pred, gt != 0


def _keypoints_of(item: Mapping[str, Tensor], name: str, n: int, need_visibility: bool) -> Tensor:
    """(n, K, 3) keypoints of a prediction or target; (0, 0, 3) when n == 0 and they are missing."""
    kp = item.get("keypoints")
    if kp is None:
        if n == 0:
            return torch.zeros(0, 0, 3)
        raise ValueError(f"{name} has no 'keypoints'; iou_types with 'keypoints' needs ({n}, K, 3) keypoints")
    dims = (3,) if need_visibility else (2, 3)
    if kp.ndim != 3 or kp.shape[0] != n or kp.shape[-1] not in dims:
        raise ValueError(f"{name}['keypoints'] must be ({n}, K, 3) (x, y, visibility), one row per box, got "
                         f"{tuple(kp.shape)}")
    return kp


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Sequence[Tensor] | Tensor, Sequence[Mapping[str, Tensor]]]],
             device: torch.device | str | None = None, class_names: Sequence[str] | None = None,
             iou_types: Sequence[str] = ("bbox",), keypoint_sigmas: Sequence[float] | Tensor | None = None,
             **predict_kwargs) -> dict[str, float | dict[str, float]]:
    """Runs `model.predict` over `loader` batches of (images (B, C, H, W) or a list of (C, H, W), torchvision-style
    targets) and returns the COCO APs of `iou_types` (any of "bbox", "segm", "keypoints"; see DetectionEvaluator):
    for "bbox", {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "per_class": {name:
    AP}}; for "segm" the same keys prefixed "segm_"; for "keypoints" "keypoints_map", "keypoints_map_50",
    "keypoints_map_75", ... (OKS sigmas: `keypoint_sigmas`, default COCO's when K == 17, else 0.05 each).

    APs are COCO's (IoU 0.5:0.95), -1 where a class has no ground truth. The model is put in eval mode and its
    training flag restored. Needs `pip install 'cvzoo[metrics]'`.
    """
    evaluator = DetectionEvaluator(iou_types=iou_types, class_names=class_names, keypoint_sigmas=keypoint_sigmas)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        for images, targets in loader:
            images = images.to(device) if isinstance(images, Tensor) else [im.to(device) for im in images]
            evaluator.update(model.predict(images, **predict_kwargs), targets)
        return evaluator.compute()
    finally:
        model.train(was_training)


def box3d_errors(predictions: Sequence[Detections | Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                 iou_thresh: float = 0.5) -> dict[str, float]:
    """Errors of 3D outputs over predictions matched to ground truth by 2D box IoU.

    Per image, predictions in descending score each take the unmatched ground truth of the same class with the
    highest box IoU >= `iou_thresh` (one prediction per ground truth). Predictions need "boxes" (N, 4) xyxy,
    "scores" (N,), "labels" (N,), "center3d" (N, 3) camera (x, y, z), "size3d" (N, 3), "yaw" (N,) radians, and
    optionally "depth" (N,); targets "boxes" (M, 4), "labels" (M,), "center3d" (M, 3), "size3d" (M, 3), "yaw" (M,),
    optionally "depth" (M,). Over all matched pairs of all images:

    - "center_error": mean Euclidean distance between the center3d;
    - "depth_error": mean |depth_pred - depth_gt|, each side's "depth" if given, else its center3d z;
    - "size_error": mean absolute size3d error, averaged over the three dimensions;
    - "yaw_error": mean absolute yaw difference wrapped to [0, pi] (radians);
    - "matched": matched ground truth / all ground truth.

    Errors are NaN when nothing matched, "matched" is NaN when there is no ground truth.
    """
    if not isinstance(iou_thresh, int | float) or not 0 < iou_thresh <= 1:
        raise ValueError(f"iou_thresh must be in (0, 1], got {iou_thresh!r}")
    if isinstance(predictions, Mapping | Detections) or not isinstance(predictions, Sequence):
        raise ValueError(f"predictions must be a list with one Detections or dict per image, got "
                         f"{type(predictions).__name__}")
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence) or len(targets) != len(predictions):
        got = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
        raise ValueError(f"targets must be a list with one dict per image ({len(predictions)}), got {got}")
    keys = ("boxes", "scores", "labels", "center3d", "size3d", "yaw")
    center, depth, size, yaw = [], [], [], []
    num_gt = 0
    for i, (p, t) in enumerate(zip(predictions, targets)):
        p = {k: v.double() for k, v in _as_dict(p, f"predictions[{i}]", keys).items() if isinstance(v, Tensor)}
        t = {k: v.double() for k, v in _as_dict(t, f"targets[{i}]", ("boxes", *keys[2:])).items()
             if isinstance(v, Tensor)}
        pi, gi = _greedy_match(p["boxes"], p["scores"], p["labels"], t["boxes"], t["labels"], iou_thresh)
        num_gt += len(t["boxes"])
        center.append((p["center3d"][pi] - t["center3d"][gi]).norm(dim=-1))  # (P,)
        p_depth = p["depth"] if "depth" in p else p["center3d"][:, 2]
        t_depth = t["depth"] if "depth" in t else t["center3d"][:, 2]
        depth.append((p_depth[pi] - t_depth[gi]).abs())
        size.append((p["size3d"][pi] - t["size3d"][gi]).abs().mean(-1))
        yaw.append(_wrapped_angle(p["yaw"][pi] - t["yaw"][gi]))
    num_matched = sum(len(c) for c in center)

    def mean(values: list[Tensor]) -> float:
        return float(torch.cat(values).mean()) if num_matched else math.nan

    return {"center_error": mean(center), "depth_error": mean(depth), "size_error": mean(size),
            "yaw_error": mean(yaw), "matched": num_matched / num_gt if num_gt else math.nan}


def _wrapped_angle(delta: Tensor) -> Tensor:
    """|delta| wrapped to [0, pi]: the smallest rotation between two angles."""
    return (torch.remainder(delta + math.pi, 2 * math.pi) - math.pi).abs()


def _greedy_match(pred_boxes: Tensor, scores: Tensor, pred_labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                  iou_thresh: float) -> tuple[Tensor, Tensor]:
    """(P,) prediction and (P,) ground-truth indices of matched pairs: (N, 4) predictions in descending score each
    take the unmatched same-class ground truth (M, 4) of highest IoU >= iou_thresh."""
    from torchvision.ops import box_iou

    empty = torch.zeros(0, dtype=torch.int64)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return empty, empty
    iou = box_iou(pred_boxes, gt_boxes)  # (N, M)
    iou = iou.masked_fill(pred_labels[:, None] != gt_labels[None, :], -1.0)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    pred_idx, gt_idx = [], []
    for n in scores.argsort(descending=True, stable=True).tolist():  # greedy: a loop over boxes, off the hot path
        row = iou[n].masked_fill(taken, -1.0)
        m = int(row.argmax())
        if row[m] >= iou_thresh:
            taken[m] = True
            pred_idx.append(n)
            gt_idx.append(m)
    return torch.tensor(pred_idx, dtype=torch.int64), torch.tensor(gt_idx, dtype=torch.int64)
