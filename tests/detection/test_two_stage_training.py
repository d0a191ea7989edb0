"""Two-stage detectors learn: tiny models overfit a few synthetic images on CPU.

Each test trains a ~0.6M-parameter two-stage detector (resnet_micro + a 32-channel FPN, small RPN and box
samplers, 128-wide heads) with a plain Adam loop on one fixed batch, then measures what the issue asks for
with the library's own metrics (DetectionEvaluator, box3d_errors) against a number computed independently
of the model: the same metric on the untrained model, or a trivial constant predictor.

Figures reached (CPU, one thread; seeds 0 / 1 / 2 of the `_run_*` helpers; the tests use seed 0):

- Mask R-CNN, 8 Shapes images (15 objects), 60 steps: segm mAP50 1.0 / 1.0 / 1.0 (untrained 0.0 / 0.0 / 0.0),
  segm mAP 0.58 / 0.60 / 0.63.
- box + attributes, 8 Shapes images, 100 steps: price MAE 0.645 -> 0.0098 / 0.392 -> 0.0169 / 0.665 -> 0.0133
  (66x / 23x / 50x), extreme points 10.0 -> 0.38 / 7.95 -> 0.47 / 13.2 -> 0.59 px (27x / 17x / 22x).
- box + 3D, 16 rendered cuboids, 100 steps: depth error 0.082 / 0.084 / 0.073 m against the constant
  predictor's 0.739 / 0.767 / 0.575 m, yaw error 0.006 / 0.006 / 0.008 rad against 1.95 / 1.68 / 1.48 rad.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchvision.ops import box_iou

from cvzoo.backbones.resnet import resnet_micro
from cvzoo.data import Shapes
from cvzoo.detection.evaluate import DetectionEvaluator, box3d_errors
from cvzoo.detection.roi import MultiLevelRoIAlign
from cvzoo.detection.roi_heads import AttributeBranch, Box3DBranch, BoxBranch, MaskBranch
from cvzoo.detection.rpn import RegionProposalNetwork, rpn_anchor_generator
from cvzoo.detection.structures import Detections
from cvzoo.detection.two_stage import MaskRCNN, TwoStageDetector
from cvzoo.heads.roi import Box3DHead, MaskHead, ObjectAttributeHead, RoIBoxHead, RPNHead
from cvzoo.necks.fpn import FPN

pytest.importorskip("torchmetrics")  # DetectionEvaluator's backend (the 'metrics' extra)

STRIDES = (4, 8, 16, 32)
CHANNELS = 32


# ---- a tiny two-stage detector ---------------------------------------------------------------------


def _tiny_parts(num_classes: int) -> tuple:
    """backbone, neck, RPN and box branch, sized for 64 x 64 images on CPU.

    Anchors of 16-128 px (torchvision's 8 x stride would start at 32 px, larger than most objects here);
    256 / 64 proposals before / after NMS and 64 sampled anchors and RoIs an image instead of 2000 / 2000,
    256 and 512: the images hold one to three objects.
    """
    backbone = resnet_micro(out_indices=(0, 1, 2, 3))
    neck = FPN(backbone.feature_info, CHANNELS)
    rpn = RegionProposalNetwork(RPNHead(CHANNELS, 3), rpn_anchor_generator(STRIDES, sizes=(16, 32, 64, 128)),
                                batch_size_per_image=64, pre_nms_top_n_train=256, post_nms_top_n_train=64,
                                pre_nms_top_n_test=256, post_nms_top_n_test=32)
    box = BoxBranch(RoIBoxHead(CHANNELS, num_classes, 7, fc_sizes=(128, 128)), _pooler(7),
                    batch_size_per_image=64, max_detections=20)
    return backbone, neck, rpn, box


def _pooler(size: int) -> MultiLevelRoIAlign:
    return MultiLevelRoIAlign(size, 2, strides=STRIDES)


def _train(model: TwoStageDetector, images: Tensor, targets: list[dict], steps: int, lr: float = 1e-3) -> None:
    """A plain loop on one fixed batch (every image every step): overfitting is the point."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        losses = model.loss(images, targets)
        assert all(bool(torch.isfinite(v)) for v in losses.values()), {k: float(v) for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()


def _predict(model: TwoStageDetector, images: Tensor) -> list[Detections]:
    model.eval()
    try:
        return model.predict(images)
    finally:
        model.train()


def _shapes(num_images: int, seed: int, fields: tuple[str, ...]) -> tuple[Tensor, list[dict]]:
    """`num_images` 64 x 64 Shapes images of 1-3 objects 12-28 px across."""
    ds = Shapes(task="detection", num_images=num_images, image_size=64, min_size=12, max_size=28, max_objects=3,
                seed=seed)
    images, targets = zip(*(ds[i] for i in range(num_images)))
    return torch.stack(images), [{k: t[k] for k in fields} for t in targets]


# ---- 1. Mask R-CNN overfits masks ------------------------------------------------------------------


def _run_mask_rcnn(seed: int, steps: int = 60) -> dict[str, float]:
    torch.manual_seed(seed)
    images, targets = _shapes(8, seed, ("boxes", "labels", "masks"))
    backbone, neck, rpn, box = _tiny_parts(4)
    mask = MaskBranch(MaskHead(CHANNELS, 4, layers=(32, 32), dim_reduced=32), _pooler(14))
    model = MaskRCNN(backbone, neck, 4, rpn=rpn, box_branch=box, mask_branch=mask)
    x = model.signature.normalize(images)

    def segm() -> dict:
        evaluator = DetectionEvaluator(iou_types=("bbox", "segm"))
        evaluator.update(_predict(model, x), targets)
        return evaluator.compute()

    before = segm()
    _train(model, x, targets, steps)
    after = segm()
    return {"segm_map_50_before": before["segm_map_50"], "segm_map_50": after["segm_map_50"],
            "segm_map": after["segm_map"], "map_50": after["map_50"]}


def test_mask_rcnn_overfits_masks():
    """Issue criterion 1: mask mAP50 >= 0.8 on the training images within 60 Adam steps (it reaches 1.0 by
    step 50 on seeds 0-2, about 0.8-0.87 at step 25). The untrained model's ~0 shows the metric is not met
    by construction."""
    r = _run_mask_rcnn(seed=0)
    assert r["segm_map_50_before"] < 0.2, r
    assert r["segm_map_50"] >= 0.8, r


# ---- 2. an ObjectAttributeHead overfits a scalar and four box points --------------------------------


def _match(dets: list[Detections], targets: list[dict], iou_thresh: float = 0.5) -> list[tuple[Tensor, Tensor]]:
    """Per image, (prediction, ground truth) index pairs: detections in descending score each take the
    unmatched ground truth of highest box IoU >= iou_thresh, whatever the class (the attribute is judged,
    not the classifier)."""
    pairs = []
    for d, t in zip(dets, targets):
        pi, gi = [], []
        if len(d.boxes) and len(t["boxes"]):
            iou = box_iou(d.boxes, t["boxes"])  # (N, M)
            taken = torch.zeros(len(t["boxes"]), dtype=torch.bool)
            for n in d.scores.argsort(descending=True).tolist():
                row = iou[n].masked_fill(taken, -1.0)
                m = int(row.argmax())
                if row[m] >= iou_thresh:
                    taken[m] = True
                    pi.append(n)
                    gi.append(m)
        pairs.append((torch.tensor(pi, dtype=torch.int64), torch.tensor(gi, dtype=torch.int64)))
    return pairs


def _attribute_errors(dets: list[Detections], targets: list[dict]) -> dict[str, float]:
    """Mean absolute error of each attribute over detections matched to ground truth (IoU >= 0.5): "price"
    in price units, "box_points" in pixels (averaged over the 4 x 2 coordinates); "matched" the fraction of
    ground truth matched."""
    price, points = [], []
    for d, t, (pi, gi) in zip(dets, targets, _match(dets, targets)):
        price.append((d.extras["price"][pi] - t["price"][gi]).abs())
        points.append((d.extras["box_points"][pi] - t["box_points"][gi]).abs().flatten(1).mean(1))
    price, points = torch.cat(price), torch.cat(points)
    num_gt = sum(len(t["boxes"]) for t in targets)
    return {"price": float(price.mean()), "box_points": float(points.mean()), "matched": len(price) / num_gt}


def _run_attributes(seed: int, steps: int = 100) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    images, targets = _shapes(8, seed, ("boxes", "labels", "keypoints", "price"))
    # the four extreme points (top, right, bottom, left) of each shape as a (4, 2) pixel attribute
    targets = [{"boxes": t["boxes"], "labels": t["labels"], "price": t["price"],
                "box_points": t["keypoints"][..., :2]} for t in targets]
    backbone, neck, rpn, box = _tiny_parts(4)
    head = ObjectAttributeHead(CHANNELS, {"price": (), "box_points": (4, 2)}, pooled_size=7, fc_sizes=(128, 128))
    branch = AttributeBranch(head, _pooler(7), codings={"box_points": "box_points"})
    model = TwoStageDetector(backbone, neck, rpn, box, {"attributes": branch})
    x = model.signature.normalize(images)
    before = _attribute_errors(_predict(model, x), targets)
    _train(model, x, targets, steps)
    return {"before": before, "after": _attribute_errors(_predict(model, x), targets)}


def test_attribute_head_overfits():
    """Issue criterion 2: the attribute errors on the training images fall at least 10x from the untrained
    model to the trained one.

    Seeds 0 / 1 / 2, 100 steps: the smallest fall is 17x (box points, seed 1; module docstring). The
    untrained errors are measured on the untrained model's own detections that match (IoU >= 0.5) some
    ground truth (6-9 of 14-15 objects); at least one must match for the "before" to mean anything.
    """
    r = _run_attributes(seed=0)
    before, after = r["before"], r["after"]
    assert before["matched"] > 0, r
    assert after["matched"] >= 0.9, r  # the trained detector finds (nearly) every object
    assert after["price"] <= before["price"] / 10, r
    assert after["box_points"] <= before["box_points"] / 10, r


# ---- 3. the Box3DHead recovers depth and yaw ----------------------------------------------------------

CAMERA = (64.0, 64.0, 32.0, 20.0)  # fx, fy, cx, cy in pixels of 64 x 64 images; the principal point high, so
# objects standing below the camera project into the image's lower half and show their top face
CUBOID = (1.2, 1.0, 2.4)  # w, h, l in metres: every object the same size, so its apparent size gives its depth
# corner order: +-x (width), +-y (height, y down), +-z (length, the heading at yaw 0)
_CORNER_SIGNS = torch.tensor([[1, -1, 1], [1, -1, -1], [1, 1, -1], [1, 1, 1],
                              [-1, -1, 1], [-1, -1, -1], [-1, 1, -1], [-1, 1, 1]], dtype=torch.float32)
# faces: corner indices (a cycle), outward normal in the object frame, colour. A distinct colour per face
# makes the heading visible: the red front and blue back tell yaw from yaw + pi.
_FACES = (
    ((0, 1, 2, 3), (1.0, 0.0, 0.0), (0.1, 0.8, 0.1)),  # right side (+x): green
    ((4, 5, 6, 7), (-1.0, 0.0, 0.0), (0.9, 0.9, 0.1)),  # left side: yellow
    ((0, 1, 5, 4), (0.0, -1.0, 0.0), (0.95, 0.95, 0.95)),  # top: white
    ((3, 2, 6, 7), (0.0, 1.0, 0.0), (0.3, 0.3, 0.3)),  # bottom (never seen from above)
    ((0, 3, 7, 4), (0.0, 0.0, 1.0), (0.9, 0.1, 0.1)),  # front (+z): red
    ((1, 2, 6, 5), (0.0, 0.0, -1.0), (0.1, 0.2, 0.9)),  # back: blue
)


def _yaw_rotation(yaw: float) -> Tensor:
    """Rotation about the camera's y axis (KITTI's rotation_y): the object's +z heading goes to
    (sin yaw, 0, cos yaw)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _render_cuboids(num_images: int, g: torch.Generator, size: int = 64) -> tuple[Tensor, list[dict]]:
    """One cuboid an image at depth z in [3.5, 7) m, lateral x in +-z/4, its centre 1.2 m below the camera,
    yaw uniform in [-pi, pi). Faces pointing away from the camera are culled; the visible faces of a convex
    body do not overlap, so each is filled (half-plane test on pixel centres) in its colour. The 2D box is
    the bounding box of the eight projected corners; views whose box leaves the image are redrawn."""
    fx, fy, cx, cy = CAMERA
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")  # (S, S) pixel centres
    images, targets = [], []
    while len(images) < num_images:
        z = 3.5 + 3.5 * float(torch.rand((), generator=g))
        x = (float(torch.rand((), generator=g)) - 0.5) * 0.5 * z
        yaw = (2 * float(torch.rand((), generator=g)) - 1) * math.pi
        centre = torch.tensor([x, 1.2, z])
        rot = _yaw_rotation(yaw)
        corners = (_CORNER_SIGNS * torch.tensor(CUBOID) / 2) @ rot.T + centre  # (8, 3) camera coordinates
        uv = torch.stack([fx * corners[:, 0] / corners[:, 2] + cx, fy * corners[:, 1] / corners[:, 2] + cy], -1)
        box = torch.cat([uv.min(0).values, uv.max(0).values])  # (4,) xyxy
        if bool((box[:2] < 1).any() or (box[2:] > size - 1).any()):
            continue
        image = 0.4 + 0.1 * torch.rand(3, 1, 1, generator=g) + 0.02 * torch.randn(3, size, size, generator=g)
        for idx, normal, colour in _FACES:
            idx = list(idx)
            if float((rot @ torch.tensor(normal)) @ corners[idx].mean(0)) >= 0:
                continue  # faces away from the camera (at the origin)
            v0 = uv[idx]
            v1 = v0.roll(-1, 0)
            cross = (v1[:, 0] - v0[:, 0])[:, None, None] * (ys - v0[:, 1, None, None]) \
                - (v1[:, 1] - v0[:, 1])[:, None, None] * (xs - v0[:, 0, None, None])  # (4, S, S)
            inside = (cross >= 0).all(0) | (cross <= 0).all(0)  # either winding of the projected quad
            image = torch.where(inside, torch.tensor(colour)[:, None, None], image)
        images.append(image.clamp(0, 1))
        targets.append({"boxes": box[None], "labels": torch.zeros(1, dtype=torch.int64),
                        "center3d": centre[None], "size3d": torch.tensor([CUBOID]), "yaw": torch.tensor([yaw])})
    return torch.stack(images), targets


def _constant_baseline(targets: list[dict]) -> dict[str, float]:
    """box3d_errors of a trivial predictor on the true 2D boxes: every object at the mean depth, yaw 0."""
    mean_z = float(torch.cat([t["center3d"][:, 2] for t in targets]).mean())
    preds = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
              "center3d": torch.cat([t["center3d"][:, :2], torch.full_like(t["center3d"][:, 2:], mean_z)], 1),
              "size3d": t["size3d"], "yaw": torch.zeros(len(t["boxes"]))} for t in targets]
    return box3d_errors(preds, targets)


def _run_box3d(seed: int, steps: int = 100, num_images: int = 16) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    images, targets = _render_cuboids(num_images, torch.Generator().manual_seed(1000 + seed))
    backbone, neck, rpn, box = _tiny_parts(1)
    head = Box3DHead(CHANNELS, 7, num_yaw_bins=12, fc_sizes=(128, 128))
    branch = Box3DBranch(head, _pooler(7), camera=CAMERA, depth_scale=5.0, reference_size=CUBOID)
    model = TwoStageDetector(backbone, neck, rpn, box, {"box3d": branch})
    x = model.signature.normalize(images)
    before = box3d_errors(_predict(model, x), targets)
    _train(model, x, targets, steps)
    return {"baseline": _constant_baseline(targets), "before": before,
            "after": box3d_errors(_predict(model, x), targets)}


@pytest.mark.slow
def test_box3d_head_recovers_depth_and_yaw():
    """Issue criterion 3, on the training views.

    Thresholds: the constant predictor's depth error is the spread of the depths (~0.6-0.8 m over
    [3.5, 7) m), its yaw error ~pi/2 (yaw uniform). Depth within 0.3x the baseline means the model explains
    most of the depth spread (reached: ~0.08 m, 0.1-0.13x, seeds 0-2); yaw under 0.15 rad (8.6 degrees,
    about half a 30-degree bin) means the bin is right and the residual refines it (reached: < 0.01 rad).

    Held-out views are not asserted: 16 views do not generalise. With 48 training views and 200 steps
    (~90 s, too slow here), on 32 held-out views yaw error is 0.36 / 0.23 rad against the constant's
    1.52 / 1.55 (seeds 0 / 1), but depth error 0.60 / 0.92 m against 0.70 / 0.92 m: depth is memorised
    rather than learnt from so few views (RoIAlign normalises scale and the head sees no box geometry, so
    apparent size, the depth cue here, reaches it only indirectly).
    """
    r = _run_box3d(seed=0)
    base, after = r["baseline"], r["after"]
    assert after["matched"] >= 0.9, r
    assert after["depth_error"] <= 0.3 * base["depth_error"], r
    assert after["yaw_error"] <= min(0.15, 0.1 * base["yaw_error"]), r
