"""cvzoo.detection.rpn, roi_heads and two_stage on tiny models.

References: torchvision's RegionProposalNetwork (proposals and losses, same head weights and anchors),
torchvision's BoxCoder (dense_predictions' boxes), and closed forms (pinhole projection for the 3D box
codes, box-relative point coordinates, scaled values, yaw bins). Empty targets must give finite losses
and gradients; bad per-object targets ValueErrors naming the image and the field.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import clip_boxes_to_image

from cvzoo.backbones.resnet import resnet_micro
from cvzoo.detection.roi import MultiLevelRoIAlign
from cvzoo.detection.roi_heads import (
    AttributeBranch,
    Box3DBranch,
    BoxBranch,
    KeypointBranch,
    MaskBranch,
    SampledRoIs,
)
from cvzoo.detection.rpn import RegionProposalNetwork, pad_rows, rpn_anchor_generator
from cvzoo.detection.structures import Detections, TargetBatch
from cvzoo.detection.two_stage import TwoStageDetector, TwoStageOutput
from cvzoo.heads.roi import Box3DHead, Box3DOutput, KeypointHead, MaskHead, ObjectAttributeHead, RoIBoxHead, RPNHead
from cvzoo.necks.fpn import FPN

C = 32
NUM_CLASSES = 3
NUM_KEYPOINTS = 5
CAMERA = (100.0, 100.0, 64.0, 64.0)
ROI_STRIDES = (4, 8, 16, 32)
H, W = 64, 96


# ---------------------------------------------------------------- RegionProposalNetwork vs torchvision

RPN_STRIDES = (4, 8, 16, 32, 64)
RPN_C = 8


def _rpn_pair(pre_train: int, post_train: int, pre_test: int, post_test: int):
    g = torch.Generator().manual_seed(0)
    tv_head = TVRPNHead(RPN_C, 3)
    with torch.no_grad():  # varied objectness and deltas (the default init is nearly constant)
        for p in tv_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tv_anchors = TVAnchorGenerator(tuple((8 * s,) for s in RPN_STRIDES), ((0.5, 1.0, 2.0),) * len(RPN_STRIDES))
    # sampler: every anchor is sampled (batch >= anchors, all positives allowed), so losses are deterministic
    tv = TVRegionProposalNetwork(tv_anchors, tv_head, 0.7, 0.3, 100_000, 1.0,
                                 {"training": pre_train, "testing": pre_test},
                                 {"training": post_train, "testing": post_test}, 0.7)
    head = RPNHead(RPN_C, 3)
    head.conv[0][0].load_state_dict(tv_head.conv[0][0].state_dict())
    head.objectness.load_state_dict(tv_head.cls_logits.state_dict())
    head.box_deltas.load_state_dict(tv_head.bbox_pred.state_dict())
    rpn = RegionProposalNetwork(head, rpn_anchor_generator(RPN_STRIDES), batch_size_per_image=100_000,
                                positive_fraction=1.0, pre_nms_top_n_train=pre_train, post_nms_top_n_train=post_train,
                                pre_nms_top_n_test=pre_test, post_nms_top_n_test=post_test)
    return tv, rpn


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rpn_proposals_and_losses_equal_torchvision(mode):
    # training counts: the post-NMS cap binds (no padding); eval counts: fewer survivors than the cap (padding)
    tv, rpn = _rpn_pair(pre_train=200, post_train=30, pre_test=1000, post_test=2000)
    tv.train(mode == "train")
    rpn.train(mode == "train")
    g = torch.Generator().manual_seed(1)
    ph, pw = 64, 96  # padded batch; strides 4 ... 64 divide it, so torchvision infers the same strides
    feats = [torch.randn(2, RPN_C, ph // s, pw // s, generator=g) for s in RPN_STRIDES]
    sizes = [(64, 96), (56, 72)]  # the second image is smaller than the batch: proposals clipped to its size
    boxes = [torch.tensor([[5.0, 6, 40, 50], [30, 10, 90, 60]]), torch.tensor([[10.0, 10, 30, 40]])]
    tv_targets = [{"boxes": b} for b in boxes] if mode == "train" else None
    targets = TargetBatch.from_list([{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes],
                                    2, 1) if mode == "train" else None
    with torch.no_grad():
        ref, ref_losses = tv(ImageList(torch.zeros(2, 3, ph, pw), sizes), OrderedDict(enumerate(feats)), tv_targets)
        proposals, valid, losses = rpn(feats, torch.tensor(sizes), targets)
    # padded to the most proposals an image kept (the post-NMS cap 30 binds in training, not in eval)
    cap = 30 if mode == "train" else max(len(r) for r in ref)
    assert cap < 2000 or mode == "train"
    assert proposals.shape == (2, cap, 4) and valid.shape == (2, cap) and valid.dtype == torch.bool
    for i in range(2):
        n = len(ref[i])
        assert int(valid[i].sum()) == n
        assert valid[i, :n].all() and not valid[i, n:].any()  # real rows lead, best first
        torch.testing.assert_close(proposals[i, :n], ref[i], rtol=0, atol=1e-4)  # same boxes in the same order
        assert (proposals[i, n:] == 0).all()
        assert (proposals[i, :n, 2] <= sizes[i][1]).all() and (proposals[i, :n, 3] <= sizes[i][0]).all()
    if mode == "train":
        assert (valid.sum(dim=1) == 30).all()  # the cap binds: no padding
        assert set(losses) == {"rpn_objectness", "rpn_box_regression"}
        torch.testing.assert_close(losses["rpn_objectness"], ref_losses["loss_objectness"], rtol=1e-4, atol=0)
        torch.testing.assert_close(losses["rpn_box_regression"], ref_losses["loss_rpn_box_reg"], rtol=1e-4, atol=0)
        assert losses["rpn_box_regression"] > 0
    else:
        assert (valid.sum(dim=1) < 2000).all()  # padded rows exist
        assert losses == {}


def test_pad_rows():
    rows = [torch.tensor([[1.0, 2], [3, 4]]), torch.zeros(0, 2), torch.tensor([[5.0, 6]])]
    out, valid = pad_rows(rows, 3, torch.zeros(1))
    assert out.tolist() == [[[1, 2], [3, 4], [0, 0]], [[0, 0]] * 3, [[5, 6], [0, 0], [0, 0]]]
    assert valid.tolist() == [[True, True, False], [False] * 3, [True, False, False]]


def test_rpn_validation():
    head = RPNHead(RPN_C, 3)
    with pytest.raises(ValueError, match="anchor"):
        RegionProposalNetwork(RPNHead(RPN_C, 2), rpn_anchor_generator(RPN_STRIDES))
    with pytest.raises(ValueError, match="post_nms_top_n_test must be a positive int, got 0"):
        RegionProposalNetwork(head, rpn_anchor_generator(RPN_STRIDES), post_nms_top_n_test=0)
    with pytest.raises(ValueError, match="nms_thresh"):
        RegionProposalNetwork(head, rpn_anchor_generator(RPN_STRIDES), nms_thresh=0.0)
    rpn = RegionProposalNetwork(head, rpn_anchor_generator(RPN_STRIDES))
    feats = [torch.randn(1, RPN_C, 64 // s, 64 // s) for s in RPN_STRIDES[:4]]
    with pytest.raises(ValueError, match="5 levels .* 4 feature maps"):
        rpn(feats, torch.tensor([[64, 64]]))


# ---------------------------------------------------------------- a tiny detector with every branch


def _tiny_model(seed: int = 0) -> TwoStageDetector:
    torch.manual_seed(seed)
    backbone = resnet_micro(out_indices=(0, 1, 2, 3))
    neck = FPN(backbone.feature_info, C, extra_levels=1, extra_mode="maxpool")
    strides = tuple(f.stride for f in neck.feature_info)
    rpn = RegionProposalNetwork(RPNHead(C, 3), rpn_anchor_generator(strides), pre_nms_top_n_train=200,
                                post_nms_top_n_train=60, pre_nms_top_n_test=200, post_nms_top_n_test=60)
    box = BoxBranch(RoIBoxHead(C, NUM_CLASSES, 7, fc_sizes=(32, 32)), MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES),
                    batch_size_per_image=32, max_detections=20)
    pooler = MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES)
    branches = {
        "mask": MaskBranch(MaskHead(C, NUM_CLASSES, (16, 16), 16), MultiLevelRoIAlign(14, 2, strides=ROI_STRIDES)),
        "keypoint": KeypointBranch(KeypointHead(C, NUM_KEYPOINTS, (16, 16)),
                                   MultiLevelRoIAlign(14, 2, strides=ROI_STRIDES)),
        "box3d": Box3DBranch(Box3DHead(C), MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES), camera=CAMERA),
        "attr": AttributeBranch(ObjectAttributeHead(C, {"price": (), "corners": (4, 2)}), pooler,
                                codings={"corners": "box_points"}),
    }
    model = TwoStageDetector(backbone, neck, rpn, box, branches=branches, raw_proposals=50)
    with torch.no_grad():  # the box head's default init gives near-uniform scores: vary them
        for p in box.head.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def _object_fields(boxes: torch.Tensor, h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    """Masks, keypoints (visible, inside their boxes), 3D boxes and attributes for the given boxes."""
    g = torch.Generator().manual_seed(seed)
    n = boxes.shape[0]
    lo, wh = boxes[:, None, :2], boxes[:, None, 2:] - boxes[:, None, :2]
    kp = torch.cat([lo + (0.1 + 0.8 * torch.rand(n, NUM_KEYPOINTS, 2, generator=g)) * wh,
                    torch.ones(n, NUM_KEYPOINTS, 1)], dim=-1)
    return {
        "masks": torch.rand(n, h, w, generator=g) > 0.5,
        "keypoints": kp,
        "center3d": torch.cat([torch.randn(n, 2, generator=g), 5 + 10 * torch.rand(n, 1, generator=g)], dim=1),
        "size3d": 1 + torch.rand(n, 3, generator=g),
        "yaw": (torch.rand(n, generator=g) * 2 - 1) * math.pi,
        "price": 100 * torch.rand(n, generator=g),
        "corners": lo + torch.rand(n, 4, 2, generator=g) * wh,
    }


def _targets(h: int = H, w: int = W, empty: tuple[int, ...] = (1,)) -> list[dict[str, torch.Tensor]]:
    boxes = [torch.tensor([[8.0, 10, 50, 60], [40, 20, 90, 62]]), torch.tensor([[4.0, 4, 30, 44]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    out = []
    for i in range(2):
        b, lab = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)) if i in empty else (boxes[i], labels[i])
        out.append({"boxes": b, "labels": lab, **_object_fields(b, h, w, seed=i)})
    return out


def _images(b: int = 2, h: int = H, w: int = W, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


BRANCH_LOSSES = {"mask", "keypoint", "box3d_depth", "box3d_size", "box3d_yaw_bin", "box3d_yaw_residual",
                 "box3d_center", "attribute_price", "attribute_corners"}
ALL_LOSSES = BRANCH_LOSSES | {"rpn_objectness", "rpn_box_regression", "roi_classification", "roi_box_regression",
                              "loss"}


def _loss_and_grads(model: TwoStageDetector, targets) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    losses = model.loss(_images(), targets)
    losses["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("empty", [(1,), (0, 1)], ids=["one-image-without-boxes", "only-padding"])
def test_losses_and_gradients_finite_without_boxes(tiny, empty):
    losses, grads = _loss_and_grads(tiny, _targets(empty=empty))
    assert set(losses) == ALL_LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    assert losses["rpn_objectness"] > 0 and losses["roi_classification"] > 0  # background is still learnt
    if empty == (0, 1):  # no object anywhere: every regression and per-object term is exactly 0
        for k in BRANCH_LOSSES | {"rpn_box_regression", "roi_box_regression"}:
            assert losses[k] == 0, k
    else:  # the other image's objects give every term something
        for k in BRANCH_LOSSES | {"rpn_box_regression", "roi_box_regression"}:
            assert losses[k] > 0, k
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reaches {missing}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients in {bad}"
    for branch in ("mask", "keypoint", "box3d", "attr"):  # each branch's head takes part in the graph
        assert any(n.startswith(f"branches.{branch}.head.") for n in grads)


def test_losses_accept_a_target_batch(tiny):
    """The trusted path: a TargetBatch built once gives the same losses as the list it came from."""
    targets = _targets()
    batch = TargetBatch.from_list(targets, 2, NUM_CLASSES, masks=True, num_keypoints=NUM_KEYPOINTS,
                                  attributes={"center3d": (3,), "size3d": (3,), "yaw": (), "price": (),
                                              "corners": (4, 2)})
    tiny.train()
    for model_part in (tiny.rpn, tiny.box_branch):
        model_part.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = tiny.loss(_images(), targets)
    for model_part in (tiny.rpn, tiny.box_branch):
        model_part.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        b = tiny.loss(_images(), batch)
    for model_part in (tiny.rpn, tiny.box_branch):
        model_part.generator = None
    assert set(a) == set(b) == ALL_LOSSES
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0, msg=k)


# ---------------------------------------------------------------- validation


def _without(t: dict, key: str) -> dict:
    return {k: v for k, v in t.items() if k != key}


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda t: {**t, "masks": t["masks"][:1]}, "targets[0]['masks'] must be (2, H, W)"),
    (lambda t: {**t, "keypoints": t["keypoints"][:, :4]}, "targets[0]['keypoints'] must be (2, 5, 3)"),
    (lambda t: _without(t, "keypoints"), "targets[0] has no 'keypoints'"),
    (lambda t: _without(t, "masks"), "targets[0] has no 'masks'"),
    (lambda t: _without(t, "price"), "targets[0] has no 'price'"),
    (lambda t: _without(t, "yaw"), "targets[0] has no 'yaw'"),
    (lambda t: {**t, "corners": t["corners"][..., 0]}, "targets[0]['corners'] must be (2, 4, 2)"),
    (lambda t: {**t, "center3d": t["center3d"][:1]}, "targets[0]['center3d'] must be (2, 3)"),
    (lambda t: {**t, "price": torch.full((2,), math.nan)}, "targets[0]['price'] holds non-finite values"),
])
def test_bad_object_fields_name_the_image_and_field(tiny, edit, pattern):
    targets = _targets(empty=())
    targets[0] = edit(targets[0])
    with pytest.raises(ValueError, match=re.escape(pattern)):
        tiny.loss(_images(), targets)


def test_bad_fields_of_a_later_image(tiny):
    targets = _targets(empty=())
    targets[1] = {**targets[1], "masks": torch.zeros(3, H, W)}
    with pytest.raises(ValueError, match=re.escape("targets[1]['masks'] must be (1, H, W)")):
        tiny.loss(_images(), targets)
    targets = _targets(empty=())
    targets[1] = _without(targets[1], "corners")
    with pytest.raises(ValueError, match=re.escape("targets[1] has no 'corners'")):
        tiny.loss(_images(), targets)


def test_branch_losses_name_missing_fields_of_a_target_batch(tiny):
    batch = TargetBatch.from_list(_targets(), 2, NUM_CLASSES)  # no masks, keypoints or attributes
    tiny.train()
    with pytest.raises(ValueError, match="MaskBranch needs instance masks"):
        tiny.loss(_images(), batch)


def test_constructor_validation(tiny):
    pooler = MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES)
    with pytest.raises(ValueError, match="camera"):
        Box3DBranch(Box3DHead(C), pooler, camera=(0.0, 100, 64, 64))
    with pytest.raises(ValueError, match="camera"):
        Box3DBranch(Box3DHead(C), pooler, camera=(100.0, 100, 64))
    head = ObjectAttributeHead(C, {"price": (), "corners": (4, 2)})
    with pytest.raises(ValueError, match="codings names 'weight'"):
        AttributeBranch(head, pooler, codings={"weight": "value"})
    with pytest.raises(ValueError, match="codings\\['price'\\] = 'box_points' needs a \\(..., 2\\) output"):
        AttributeBranch(head, pooler, codings={"price": "box_points"})
    with pytest.raises(ValueError, match="codings\\['corners'\\] must be one of"):
        AttributeBranch(head, pooler, codings={"corners": "polar"})
    with pytest.raises(ValueError, match="scales"):
        AttributeBranch(head, pooler, scales={"price": 0.0})
    with pytest.raises(ValueError, match="pooler must be a MultiLevelRoIAlign"):
        MaskBranch(MaskHead(C, 2), nn.Identity())
    far = MultiLevelRoIAlign(7, 2, strides=(64, 128))
    with pytest.raises(ValueError, match=re.escape("branches['x'] reads strides (64, 128)")):
        TwoStageDetector(tiny.backbone, tiny.neck, tiny.rpn, tiny.box_branch,
                         branches={"x": MaskBranch(MaskHead(C, 2), far)})
    with pytest.raises(ValueError, match="raw_proposals"):
        TwoStageDetector(tiny.backbone, tiny.neck, tiny.rpn, tiny.box_branch, raw_proposals=0)


# ---------------------------------------------------------------- predict


EXTRA_SHAPES = {"keypoints": (NUM_KEYPOINTS, 3), "keypoint_scores": (NUM_KEYPOINTS,), "center3d": (3,), "depth": (),
                "size3d": (3,), "yaw": (), "price": (), "corners": (4, 2)}


def _check_detections(dets: Detections, h: int, w: int) -> None:
    n = dets.boxes.shape[0]
    assert n > 0  # the perturbed box head gives detections to check
    assert set(dets.extras) == {"masks", *EXTRA_SHAPES}
    assert dets.extras["masks"].shape == (n, h, w)
    for k, shape in EXTRA_SHAPES.items():
        assert dets.extras[k].shape == (n, *shape), k
    assert (dets.boxes >= 0).all() and (dets.boxes[:, 2] <= w).all() and (dets.boxes[:, 3] <= h).all()
    masks = dets.extras["masks"]
    assert masks.min() >= 0 and masks.max() <= 1
    # a pasted mask is zero outside its box grown by one mask cell (28 x 28 + padding 1) on each side
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
    for m, box in zip(masks, dets.boxes):
        grow = (box[2:] - box[:2]) / 28 + 1
        outside = (xs < box[0] - grow[0]) | (xs > box[2] + grow[0]) | (ys < box[1] - grow[1]) | (ys > box[3] + grow[1])
        assert (m[outside] == 0).all()
    kp = dets.extras["keypoints"]  # each keypoint lies in its box (torchvision's heatmap decoding), visibility 1
    assert (kp[..., 0] >= dets.boxes[:, None, 0] - 1e-4).all() and (kp[..., 0] <= dets.boxes[:, None, 2] + 1).all()
    assert (kp[..., 1] >= dets.boxes[:, None, 1] - 1e-4).all() and (kp[..., 1] <= dets.boxes[:, None, 3] + 1).all()
    assert (kp[..., 2] == 1).all()
    torch.testing.assert_close(dets.extras["depth"], dets.extras["center3d"][:, 2])
    assert (dets.extras["depth"] > 0).all() and (dets.extras["size3d"] > 0).all()
    assert (dets.extras["yaw"] >= -math.pi).all() and (dets.extras["yaw"] < math.pi).all()
    assert dets.to_dict().keys() == {"boxes", "scores", "labels", "masks", *EXTRA_SHAPES}


def test_predict_batch_extras(tiny):
    tiny.eval()
    dets = tiny.predict(_images())
    assert len(dets) == 2
    for d in dets:
        assert isinstance(d, Detections)
        _check_detections(d, H, W)


def test_predict_list_of_sizes_crops_masks(tiny):
    tiny.eval()
    sizes = [(64, 96), (48, 70)]  # the second is padded to 64 x 96 in the batch
    images = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    dets = tiny.predict(images)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes):
        _check_detections(d, h, w)


def test_predict_without_detections(tiny):
    tiny.eval()
    thresh = tiny.box_branch.score_thresh
    tiny.box_branch.score_thresh = 1.0  # no class probability exceeds 1
    try:
        dets = tiny.predict(_images())
    finally:
        tiny.box_branch.score_thresh = thresh
    for d in dets:
        assert d.boxes.shape == (0, 4)
        assert d.extras["masks"].shape == (0, H, W)
        for k, shape in EXTRA_SHAPES.items():
            assert d.extras[k].shape == (0, *shape), k


# ---------------------------------------------------------------- codings: closed forms


class _Fixed(nn.Module):
    """A stand-in head returning given outputs (one row per pooled RoI), whatever the features."""

    def __init__(self, out, **attributes) -> None:
        super().__init__()
        self.out = out
        self.rows = next(iter(out.values() if isinstance(out, dict) else out)).shape[0]  # works for NamedTuples
        for k, v in attributes.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor):
        assert x.shape[0] == self.rows
        return self.out


def _features(b: int = 1, h: int = 128, w: int = 128) -> dict[int, torch.Tensor]:
    return {s: torch.randn(b, 4, h // s, w // s) for s in ROI_STRIDES}


def _rois(boxes: torch.Tensor) -> SampledRoIs:
    """One image; RoI j is a positive matched to ground truth j."""
    n = boxes.shape[0]
    keep = torch.ones(1, n, dtype=torch.bool)
    return SampledRoIs(boxes[None], keep, torch.arange(n)[None], keep, n)


ROI_BOXES = torch.tensor([[10.0, 20, 50, 80], [60, 30, 100, 50], [0, 0, 128, 128], [30, 40, 36, 70],
                          [5, 60, 45, 100], [70, 70, 120, 110]])


def test_attribute_codings_closed_form_and_round_trip():
    head = ObjectAttributeHead(4, {"price": (), "corners": (4, 2), "dims": (2,)}, fc_sizes=(8,))
    branch = AttributeBranch(head, MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES), codings={"corners": "box_points"},
                             scales={"price": 250.0})
    boxes = ROI_BOXES[None]  # (1, 6, 4)
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(1, 6, 4, 2, generator=g) * 128
    code = branch.encode("corners", corners, boxes)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    torch.testing.assert_close(code[..., 0], (corners[..., 0] - x1) / (x2 - x1))
    torch.testing.assert_close(code[..., 1], (corners[..., 1] - y1) / (y2 - y1))
    torch.testing.assert_close(branch.decode("corners", code, boxes), corners, rtol=0, atol=1e-4)
    price = torch.rand(1, 6, generator=g) * 1000
    torch.testing.assert_close(branch.encode("price", price, boxes), price / 250)
    torch.testing.assert_close(branch.decode("price", price / 250, boxes), price)
    dims = torch.randn(1, 6, 2, generator=g)  # "value" with the default scale 1: the identity
    torch.testing.assert_close(branch.encode("dims", dims, boxes), dims)

    # through the branch: ideal codes give zero loss, and predict decodes them to the values
    targets = TargetBatch(ROI_BOXES[None], torch.zeros(1, 6, dtype=torch.int64),
                          attributes={"price": price, "corners": corners, "dims": dims})
    ideal = {"price": price[0] / 250, "corners": code[0], "dims": dims[0]}
    branch.head = _Fixed(ideal, shapes=head.shapes)
    losses = branch.loss(_features(), _rois(ROI_BOXES), targets)
    assert set(losses) == {"attribute_price", "attribute_corners", "attribute_dims"}
    assert all(v.abs() < 1e-6 for v in losses.values()), losses
    branch.head = _Fixed({**ideal, "price": ideal["price"] + 1}, shapes=head.shapes)  # off by one code unit
    assert branch.loss(_features(), _rois(ROI_BOXES), targets)["attribute_price"] > 0.4  # smooth-L1: 1 - beta / 2
    branch.head = _Fixed(ideal, shapes=head.shapes)
    out = branch.predict(_features(), ROI_BOXES[None], torch.zeros(1, 6, dtype=torch.int64),
                         torch.ones(1, 6, dtype=torch.bool), torch.tensor([[128, 128]]))
    torch.testing.assert_close(out["corners"], corners, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["price"], price, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["dims"], dims)


# yaw angles and the bin each falls into (12 bins of 30 degrees from -pi): wrap-around at +-pi
YAWS = [0.3, math.pi - 0.01, -math.pi + 0.01, math.pi, 3.5, -4.0]
YAW_BINS = [6, 11, 0, 0, 0, 10]
YAW_WRAPPED = [0.3, math.pi - 0.01, -math.pi + 0.01, -math.pi, 3.5 - 2 * math.pi, -4.0 + 2 * math.pi]


def _box3d_case():
    fx, fy, cx, cy = CAMERA
    center = torch.tensor([[0.5, -0.2, 8.0], [-1.0, 0.3, 12.0], [0.0, 0.0, 30.0], [2.0, 1.0, 5.0],
                           [-0.5, 0.8, 15.0], [1.5, -1.2, 9.0]])
    size = torch.tensor([[1.6, 1.5, 4.0], [0.6, 1.7, 0.8], [2.0, 3.0, 10.0], [1.0, 1.0, 1.0], [1.8, 1.4, 4.5],
                         [0.5, 0.5, 0.5]])
    yaw = torch.tensor(YAWS)
    bins, width = 12, 2 * math.pi / 12
    # ideal head outputs from the closed forms, relative to each RoI box
    u = fx * center[:, 0] / center[:, 2] + cx
    v = fy * center[:, 1] / center[:, 2] + cy
    roi_ctr, roi_wh = (ROI_BOXES[:, :2] + ROI_BOXES[:, 2:]) / 2, ROI_BOXES[:, 2:] - ROI_BOXES[:, :2]
    offset = (torch.stack([u, v], dim=1) - roi_ctr) / roi_wh
    bin_idx = torch.tensor(YAW_BINS)
    residual = (torch.tensor(YAW_WRAPPED) + math.pi - (bin_idx + 0.5) * width) / (width / 2)
    assert (residual.abs() <= 1).all()  # the hard-coded bins are right
    depth_scale, reference = 20.0, torch.tensor([1.6, 1.5, 4.0])
    ideal = Box3DOutput(
        depth=torch.log(center[:, 2:] / depth_scale),
        size=torch.log(size / reference),
        yaw_logits=torch.nn.functional.one_hot(bin_idx, bins).float() * 50,
        yaw_residual=torch.zeros(6, bins).scatter(1, bin_idx[:, None], residual[:, None]),
        center_offset=offset,
    )
    targets = TargetBatch(torch.zeros(1, 6, 4), torch.zeros(1, 6, dtype=torch.int64),
                          attributes={"center3d": center[None], "size3d": size[None], "yaw": yaw[None]})
    return center, size, ideal, targets, depth_scale, tuple(reference.tolist())


def test_box3d_codes_closed_form_round_trip_and_yaw_wrap():
    center, size, ideal, targets, depth_scale, reference = _box3d_case()
    branch = Box3DBranch(Box3DHead(4, num_yaw_bins=12, fc_sizes=(8,)), MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES),
                         camera=CAMERA, depth_scale=depth_scale, reference_size=reference)
    branch.head = _Fixed(ideal, num_yaw_bins=12)
    # encoding: the ideal outputs cost (almost) nothing
    losses = branch.loss(_features(), _rois(ROI_BOXES), targets)
    assert set(losses) == {"box3d_depth", "box3d_size", "box3d_yaw_bin", "box3d_yaw_residual", "box3d_center"}
    assert all(v.abs() < 1e-5 for v in losses.values()), losses
    # one bin off (wrapping 11 -> 0): the bin loss sees it
    shifted = ideal._replace(yaw_logits=ideal.yaw_logits.roll(1, dims=1))
    branch.head = _Fixed(shifted, num_yaw_bins=12)
    assert branch.loss(_features(), _rois(ROI_BOXES), targets)["box3d_yaw_bin"] > 10
    # decoding the ideal outputs gives the 3D boxes back, yaw wrapped into [-pi, pi)
    branch.head = _Fixed(ideal, num_yaw_bins=12)
    out = branch.predict(_features(), ROI_BOXES[None], torch.zeros(1, 6, dtype=torch.int64),
                         torch.ones(1, 6, dtype=torch.bool), torch.tensor([[128, 128]]))
    torch.testing.assert_close(out["center3d"][0], center, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["depth"][0], center[:, 2], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["size3d"][0], size, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["yaw"][0], torch.tensor(YAW_WRAPPED), rtol=0, atol=1e-5)


def test_box3d_yaw_edge_of_last_bin_wraps_to_minus_pi():
    """Last bin, residual +1: the angle pi, reported as -pi."""
    branch = Box3DBranch(Box3DHead(4, num_yaw_bins=4, fc_sizes=(8,)), MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES),
                         camera=CAMERA)
    out = Box3DOutput(torch.zeros(2, 1), torch.zeros(2, 3), torch.tensor([[0.0, 0, 0, 9], [9.0, 0, 0, 0]]),
                      torch.tensor([[0.0, 0, 0, 1], [-1.0, 0, 0, 0]]), torch.zeros(2, 2))
    branch.head = _Fixed(out, num_yaw_bins=4)
    got = branch.predict(_features(), ROI_BOXES[None, :2], torch.zeros(1, 2, dtype=torch.int64),
                         torch.ones(1, 2, dtype=torch.bool), torch.tensor([[128, 128]]))
    torch.testing.assert_close(got["yaw"][0], torch.tensor([-math.pi, -math.pi]), rtol=0, atol=1e-6)
    # the zero codes: depth = depth_scale, size = reference size, centre projected to the box centre
    torch.testing.assert_close(got["depth"][0], torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(got["size3d"][0], torch.ones(2, 3))
    fx, fy, cx, cy = CAMERA
    ctr = (ROI_BOXES[:2, :2] + ROI_BOXES[:2, 2:]) / 2
    expected = torch.stack([(ctr[:, 0] - cx) * 10 / fx, (ctr[:, 1] - cy) * 10 / fy, torch.full((2,), 10.0)], dim=1)
    torch.testing.assert_close(got["center3d"][0], expected)


# ---------------------------------------------------------------- forward, compile, dense_predictions


def test_forward_shapes(tiny):
    tiny.eval()
    with torch.no_grad():
        out = tiny(_images())
    assert isinstance(out, TwoStageOutput)
    p = 50
    assert out.cls_logits.shape == (2, p, NUM_CLASSES + 1)
    assert out.box_deltas.shape == (2, p, NUM_CLASSES + 1, 4)
    assert out.proposals.shape == (2, p, 4) and out.objectness.shape == (2, p)
    assert (out.objectness[:, :-1] >= out.objectness[:, 1:]).all()  # best first
    assert set(out.branches) == {"mask", "keypoint", "box3d", "attr"}
    assert out.branches["mask"].shape == (2, p, NUM_CLASSES, 28, 28)
    assert out.branches["keypoint"].shape == (2, p, NUM_KEYPOINTS, 56, 56)
    assert isinstance(out.branches["box3d"], Box3DOutput) and out.branches["box3d"].yaw_logits.shape == (2, p, 12)
    assert out.branches["attr"]["corners"].shape == (2, p, 4, 2) and out.branches["attr"]["price"].shape == (2, p)


def test_compile_fullgraph_matches_eager(tiny):
    tiny.eval()
    images = _images()
    with torch.no_grad():
        eager = tiny(images)
        compiled = torch.compile(tiny, backend="eager", fullgraph=True)(images)
    flat_e = [eager.cls_logits, eager.box_deltas, eager.proposals, eager.objectness,
              eager.branches["mask"], eager.branches["keypoint"], *eager.branches["box3d"],
              *eager.branches["attr"].values()]
    flat_c = [compiled.cls_logits, compiled.box_deltas, compiled.proposals, compiled.objectness,
              compiled.branches["mask"], compiled.branches["keypoint"], *compiled.branches["box3d"],
              *compiled.branches["attr"].values()]
    for e, c in zip(flat_e, flat_c, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_dense_predictions_against_torchvision_decoding_and_gradients(tiny):
    tiny.eval()
    images = _images().requires_grad_(True)
    scores, boxes = tiny.dense_predictions(images)
    assert scores.shape == (2, 50, NUM_CLASSES) and boxes.shape == (2, 50, 4)
    assert (scores >= 0).all() and (scores.sum(-1) <= 1 + 1e-6).all()  # foreground probabilities
    scores[:, :5].max(dim=-1).values.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # reference: torchvision's softmax and BoxCoder decoding of the raw outputs
        out = tiny(images)
        probs = torch.softmax(out.cls_logits, -1)[..., 1:]
        best = probs.argmax(-1)
        coder = TVBoxCoder((10.0, 10.0, 5.0, 5.0))
        for i in range(2):
            deltas = out.box_deltas[i, torch.arange(50), best[i] + 1]  # (P, 4) of each proposal's best class
            ref = clip_boxes_to_image(coder.decode_single(deltas, out.proposals[i]), (H, W))
            torch.testing.assert_close(boxes[i].detach(), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores.detach(), probs, rtol=0, atol=1e-6)


def test_branches_sharing_an_output_or_target_name_raise(tiny):
    """A custom attribute named like a 3D output ("yaw") would overwrite it in predict's extras and in the
    targets: the constructor refuses the pair, naming both branches and the name."""
    pooler = MultiLevelRoIAlign(7, 2, strides=ROI_STRIDES)
    branches = {
        "box3d": Box3DBranch(Box3DHead(C), pooler, camera=CAMERA),
        "attr": AttributeBranch(ObjectAttributeHead(C, {"yaw": ()}), pooler),
    }
    with pytest.raises(ValueError, match=r"branches 'box3d' and 'attr' both use the name 'yaw'"):
        TwoStageDetector(tiny.backbone, tiny.neck, tiny.rpn, tiny.box_branch, branches=branches)


def test_predict_settings_override_the_box_branch_and_are_validated(tiny):
    tiny.eval()
    images = _images()
    default = tiny.predict(images)
    loose = tiny.predict(images, score_thresh=0.0, nms_thresh=None, max_detections=7)
    assert all(len(d.boxes) == 7 for d in loose)  # no threshold, no NMS: the cap binds
    strict = tiny.predict(images, score_thresh=0.999)
    assert all(len(s.boxes) <= len(d.boxes) for s, d in zip(strict, default))
    assert all(bool((s.scores > 0.999).all()) for s in strict)
    for kwargs, name in (({"score_thresh": 1.0}, "score_thresh"), ({"nms_thresh": 0.0}, "nms_thresh"),
                         ({"max_detections": 0}, "max_detections")):
        with pytest.raises(ValueError, match=name):
            tiny.predict(images, **kwargs)
