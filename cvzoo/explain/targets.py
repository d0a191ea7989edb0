"""What a CAM explains: one scalar per image taken from the model's output, and how to run the model for it.

A target is any callable `target(output, index) -> scalar tensor`, where `output` is what the model
returned for the whole batch and `index` is the image's position in it (a plain function works). A
`CAMTarget` may also say
- how to run the model: `model_output(model, images)`, by default `model(images)`; `DetectionTarget`
  runs `model.predict` (to pick a detection) and `model.dense_predictions` (the differentiable scores);
- which choices depend on the explained image: `resolve(output, index)` returns a target with them
  fixed (`ClassifierTarget()` -> the top class; `DetectionTarget` -> a `BoxScoreTarget` on the chosen
  box). Score-CAM scores masked copies of the image with the resolved target, so the class or box it
  explains stays the one chosen on the clean image.

All targets of one batch must run the model the same way (one forward for the batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn


class DetectorOutput(NamedTuple):
    """What `DetectionTarget.model_output` returns for a dense detector (boxes are xyxy input pixels)."""

    scores: Tensor  # (B, R, K) in [0, 1], every prior before selection and NMS
    boxes: Tensor  # (B, R, 4) xyxy, every prior's decoded box
    detections: list | None  # model.predict(images): [Detections(boxes (N, 4), scores (N,), labels (N,))] per image


def _check_index(value: object, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        expected = "a non-negative int or None" if allow_none else "a non-negative int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _describe(output: object) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {list(output)}"
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return f"a {type(output).__name__} with fields {list(output._fields)}"
    return f"a {type(output).__name__}"


def _by_key(output: object, key: str | None, owner: str) -> object:
    """output[key] for a dict output, getattr for a NamedTuple; the output itself when key is None."""
    if key is None:
        return output
    if isinstance(output, Mapping) and key in output:
        return output[key]
    if isinstance(output, tuple) and key in getattr(output, "_fields", ()):
        return getattr(output, key)
    raise ValueError(f"{owner}: key={key!r} is not in the model's output, which is {_describe(output)}")


class CAMTarget:
    """Base class of the built-in targets: `__call__(output, index)` -> the scalar explained for image `index`."""

    def model_output(self, model: nn.Module, images: Tensor) -> object:
        """Runs the model on the (B, C, H, W) batch; the CAM records its target layers during this call."""
        return model(images)

    def resolve(self, output: object, index: int) -> CAMTarget:
        """This target with its image-dependent choices fixed for image `index` of `output`."""
        return self

    def __call__(self, output: object, index: int) -> Tensor:
        raise NotImplementedError


class ClassifierTarget(CAMTarget):
    """The logit of class `class_index` (None: the image's top predicted class).

    Finds the logits in a (B, K) tensor output, a NamedTuple with a `logits` field (cvzoo's
    `ClassificationOutput`), a dict with a "logits" entry, or the one dict entry holding logits; `key`
    picks a dict entry by name (e.g. "label" of a `MultiTaskModel`).
    """

    def __init__(self, class_index: int | None = None, key: str | None = None) -> None:
        self.class_index = _check_index(class_index, "class_index")
        if key is not None and not isinstance(key, str):
            raise ValueError(f"key must be a str or None, got {key!r}")
        self.key = key

    def __repr__(self) -> str:
        return f"ClassifierTarget(class_index={self.class_index}, key={self.key!r})"

    def logits(self, output: object) -> Tensor:
        """The (B, K) logits inside the model's output."""
        out = _by_key(output, self.key, "ClassifierTarget")
        if isinstance(out, Mapping):
            if "logits" in out:
                out = out["logits"]
            else:
                found = [k for k, v in out.items() if isinstance(getattr(v, "logits", None), Tensor)]
                if len(found) != 1:
                    raise ValueError(f"ClassifierTarget: cannot tell which entry of the model's output holds the "
                                     f"logits ({_describe(out)}); pass key=...")
                out = out[found[0]]
        if not isinstance(out, Tensor):
            out = getattr(out, "logits", None)
        if not isinstance(out, Tensor) or out.ndim != 2:
            raise ValueError(f"ClassifierTarget needs (B, num_classes) logits: a tensor, a NamedTuple with a logits "
                             f"field or a dict; the model's output is {_describe(output)}")
        return out

    def resolve(self, output: object, index: int) -> ClassifierTarget:
        if self.class_index is not None:
            return self
        return ClassifierTarget(int(self.logits(output)[index].argmax()), self.key)

    def __call__(self, output: object, index: int) -> Tensor:
        logits = self.logits(output)
        target = self.resolve(output, index)
        if target.class_index >= logits.shape[1]:
            raise ValueError(f"class_index={target.class_index} is out of range for {logits.shape[1]} classes")
        return logits[index, target.class_index]


class RegressionTarget(CAMTarget):
    """One regressed value: element `output_index` of the image's flattened prediction.

    The prediction is the output tensor, the single tensor of a NamedTuple output (cvzoo's
    `RegressionOutput(values)`, `KeypointOutput(points)`), or a dict entry named by `key` (e.g. the
    "value" head of a `MultiTaskModel`, which returns a dict of NamedTuples). For keypoints (B, K, 2)
    the flattened index 2k is x and 2k + 1 is y of point k.
    """

    def __init__(self, output_index: int = 0, key: str | None = None) -> None:
        self.output_index = _check_index(output_index, "output_index", allow_none=False)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"key must be a str or None, got {key!r}")
        self.key = key

    def __repr__(self) -> str:
        return f"RegressionTarget(output_index={self.output_index}, key={self.key!r})"

    def __call__(self, output: object, index: int) -> Tensor:
        out = _by_key(output, self.key, "RegressionTarget")
        if isinstance(out, Mapping) and len(out) == 1:
            out = next(iter(out.values()))
        if isinstance(out, tuple) and len(out) == 1:
            out = out[0]
        if not isinstance(out, Tensor) or out.ndim < 1:
            raise ValueError(f"RegressionTarget needs a (B, ...) tensor of predictions; the model's output is "
                             f"{_describe(output)}" + ("" if self.key else " (pass key=... for a dict output)"))
        values = out[index].reshape(-1)
        if self.output_index >= values.numel():
            raise ValueError(f"output_index={self.output_index} is out of range for {values.numel()} values per image")
        return values[self.output_index]


def _dense(output: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(output, tuple) and len(output) >= 2 and all(isinstance(t, Tensor) for t in output[:2])
            and output[0].ndim == 3 and output[1].ndim == 3 and output[1].shape[-1] == 4):
        raise ValueError(f"a detection target needs (scores (B, R, K), boxes (B, R, 4)) from dense_predictions; "
                         f"got {_describe(output)}")
    return output[0], output[1]


def _check_detector(model: nn.Module) -> None:
    if not (callable(getattr(model, "dense_predictions", None)) and callable(getattr(model, "predict", None))):
        raise ValueError(f"targets: a detection target needs a model with dense_predictions(images) and "
                         f"predict(images) (cvzoo's dense detectors); got {type(model).__name__}")


class BoxScoreTarget(CAMTarget):
    """Sum of the class-`label` scores of every prior whose box overlaps `box` with IoU > `iou_threshold`.

    `box` is xyxy in input pixels, the same for every image it is applied to. Runs the model through
    `dense_predictions` (scores (B, R, K) in [0, 1], boxes (B, R, 4)); the overlap mask uses the priors'
    boxes without gradient, so the gradient flows through the scores only. Priors that no longer overlap
    (on a masked image, for Score-CAM) add nothing, as in pytorch-grad-cam's FasterRCNNBoxScoreTarget.
    A zero-area box (an untrained detector predicts some) overlaps no prior: its target and map are zero.
    """

    def __init__(self, box: Tensor | Sequence[float], label: int, iou_threshold: float = 0.5) -> None:
        self.box = _check_box(box, "box")
        self.label = _check_index(label, "label", allow_none=False)
        self.iou_threshold = _check_iou(iou_threshold)

    def __repr__(self) -> str:
        return f"BoxScoreTarget(box={self.box.tolist()}, label={self.label}, iou_threshold={self.iou_threshold})"

    def model_output(self, model: nn.Module, images: Tensor) -> DetectorOutput:
        _check_detector(model)
        scores, boxes = model.dense_predictions(images)
        return DetectorOutput(scores, boxes, None)

    def __call__(self, output: object, index: int) -> Tensor:
        from torchvision.ops import box_iou

        scores, boxes = _dense(output)
        if self.label >= scores.shape[-1]:
            raise ValueError(f"label={self.label} is out of range for {scores.shape[-1]} classes")
        prior_boxes = boxes[index].detach().float()  # (R, 4)
        iou = box_iou(self.box.to(prior_boxes.device)[None], prior_boxes)[0]  # (R,)
        return (scores[index, :, self.label].float() * (iou > self.iou_threshold)).sum()


def _check_box(box: object, name: str) -> Tensor:
    t = torch.as_tensor(box, dtype=torch.float32).detach().cpu() if isinstance(box, (Tensor, Sequence)) else None
    if t is None or t.shape != (4,) or not bool(torch.isfinite(t).all()) or not (t[2] >= t[0] and t[3] >= t[1]):
        raise ValueError(f"{name} must be 4 finite numbers x1, y1, x2, y2 with x2 >= x1 and y2 >= y1, got {box!r}")
    return t


def _check_iou(iou_threshold: object) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must lie in [0, 1), got {iou_threshold!r}")
    return float(iou_threshold)


class DetectionTarget(CAMTarget):
    """One detection of a cvzoo dense detector, explained through the scores of the priors that found it.

    Covers any model with `dense_predictions(images) -> (scores (B, R, K), boxes (B, R, 4))` and
    `predict(images) -> [Detections]`: the dense detectors (RetinaNet, ATSS, FCOS, CenterNet), whose priors
    are every anchor or point, and the two-stage ones (Faster/Mask/Keypoint R-CNN), whose priors are the
    top `raw_proposals` RPN proposals by objectness (before NMS). The detection is picked from `predict`'s
    per-image list (best first), among those of class `label` when it is given:
    - `reference_box` (xyxy pixels): the candidate with the highest IoU with it;
    - else `box_index`: the candidate at that position (None: the first, i.e. the top-scoring one).
    The explained scalar is then `BoxScoreTarget(chosen box, its label, iou_threshold)`: the sum of the
    class scores of the priors whose boxes overlap the detection with IoU > `iou_threshold`.
    `score_thresh` is passed to `predict` (None: the model's own), e.g. to reach weak detections.
    An image without a matching detection raises a ValueError.
    """

    def __init__(self, box_index: int | None = None, label: int | None = None,
                 reference_box: Tensor | Sequence[float] | None = None, iou_threshold: float = 0.5,
                 score_thresh: float | None = None) -> None:
        self.box_index = _check_index(box_index, "box_index")
        self.label = _check_index(label, "label")
        self.reference_box = None if reference_box is None else _check_box(reference_box, "reference_box")
        if self.box_index is not None and self.reference_box is not None:
            raise ValueError(f"pass box_index or reference_box, not both; got box_index={box_index} and "
                             f"reference_box={self.reference_box.tolist()}")
        self.iou_threshold = _check_iou(iou_threshold)
        if score_thresh is not None and (isinstance(score_thresh, bool) or not isinstance(score_thresh, (int, float))
                                         or not 0 <= score_thresh < 1):
            raise ValueError(f"score_thresh must lie in [0, 1) or be None, got {score_thresh!r}")
        self.score_thresh = score_thresh

    def __repr__(self) -> str:
        ref = None if self.reference_box is None else self.reference_box.tolist()
        return (f"DetectionTarget(box_index={self.box_index}, label={self.label}, reference_box={ref}, "
                f"iou_threshold={self.iou_threshold}, score_thresh={self.score_thresh})")

    def model_output(self, model: nn.Module, images: Tensor) -> DetectorOutput:
        """predict (no grad, not recorded) to pick detections, then dense_predictions (the explained pass)."""
        _check_detector(model)
        kwargs = {} if self.score_thresh is None else {"score_thresh": self.score_thresh}
        detections = model.predict(images, **kwargs)
        scores, boxes = model.dense_predictions(images)
        return DetectorOutput(scores, boxes, list(detections))

    def resolve(self, output: object, index: int) -> BoxScoreTarget:
        detections = getattr(output, "detections", None)
        if detections is None:
            raise ValueError("DetectionTarget needs the detections of DetectionTarget.model_output; got "
                             f"{_describe(output)}")
        det = detections[index]
        keep = torch.arange(det.labels.shape[0], device=det.labels.device)
        if self.label is not None:
            keep = keep[det.labels == self.label]
        what = "detections" if self.label is None else f"detections of class label={self.label}"
        if keep.numel() == 0:
            raise ValueError(f"image {index} has no {what} (score_thresh={self.score_thresh}: None is the model's "
                             "own); lower score_thresh or pick another label")
        if self.reference_box is not None:
            from torchvision.ops import box_iou

            iou = box_iou(self.reference_box.to(det.boxes.device)[None], det.boxes[keep].float())[0]
            chosen = int(keep[iou.argmax()])
        else:
            position = self.box_index or 0
            if position >= keep.numel():
                raise ValueError(f"box_index={position} but image {index} has {keep.numel()} {what}")
            chosen = int(keep[position])
        return BoxScoreTarget(det.boxes[chosen], int(det.labels[chosen]), self.iou_threshold)

    def __call__(self, output: object, index: int) -> Tensor:
        return self.resolve(output, index)(output, index)
