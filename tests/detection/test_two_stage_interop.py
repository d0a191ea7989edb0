"""FasterRCNN / MaskRCNN / KeypointRCNN.from_torchvision against torchvision's own models (the reference).

torchvision's models are built so that their GeneralizedRCNNTransform leaves the batch unchanged
(min_size = H, a large max_size, zero mean, unit std, H and W divisible by 32): both models then see the
same pixels, and detections, masks, keypoints and losses must agree. The RPN and RoI head weights are
perturbed so that scores vary. Each ResNet-50 pair is built once (module-scoped fixture).

To keep the file fast on CPU the keypoint head is narrower than torchvision's default (the same eight
convs, 64 channels instead of 512, swapped into torchvision's `roi_heads`) and the test-time counts are
reduced; the converter reads every width and count from the torchvision model, which the settings test
checks. Losses run with deterministic sampling: both samplers
take every candidate (batch_size_per_image >= candidates, positive_fraction 1.0).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

from cvzoo.detection import FasterRCNN, KeypointRCNN, MaskRCNN

H, W = 128, 192
TV_CLASSES = {"faster": 6, "mask": 6, "keypoint": 3}  # torchvision's count, background included
NUM_KEYPOINTS = 5
NARROW = 64
# torchvision loss name -> cvzoo loss name
KEY_MAP = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box_regression",
           "loss_classifier": "roi_classification", "loss_box_reg": "roi_box_regression", "loss_mask": "mask",
           "loss_keypoint": "keypoint"}
SETTINGS = dict(  # not torchvision's defaults, so that copying them is tested
    rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, rpn_nms_thresh=0.65, box_score_thresh=0.02,
    box_nms_thresh=0.45, box_detections_per_img=20,
    # training: every anchor and every RoI candidate sampled (deterministic losses), fewer proposals
    rpn_post_nms_top_n_train=300, rpn_batch_size_per_image=10_000, rpn_positive_fraction=1.0,
    box_batch_size_per_image=310, box_positive_fraction=1.0,
)


def _build(name: str):
    kw = dict(weights=None, weights_backbone=None, num_classes=TV_CLASSES[name], min_size=H, max_size=2000,
              image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], **SETTINGS)
    if name == "faster":
        return fasterrcnn_resnet50_fpn(**kw), FasterRCNN
    if name == "mask":
        return maskrcnn_resnet50_fpn(**kw), MaskRCNN
    tv = keypointrcnn_resnet50_fpn(num_keypoints=NUM_KEYPOINTS, **kw)
    tv.roi_heads.keypoint_head = KeypointRCNNHeads(256, [NARROW] * 8)
    tv.roi_heads.keypoint_predictor = KeypointRCNNPredictor(NARROW, NUM_KEYPOINTS)
    return tv, KeypointRCNN


@pytest.fixture(scope="module", params=list(TV_CLASSES))
def pair(request):
    torch.manual_seed(0)
    tv, cls = _build(request.param)
    with torch.no_grad():  # the default head inits give near-constant scores; perturb so they vary
        for mod in [*tv.rpn.modules(), *tv.roi_heads.modules()]:
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                mod.weight.normal_(0, 0.01 if isinstance(mod, torch.nn.Linear) else 0.02)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1)
    model = cls.from_torchvision(tv)
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    return request.param, tv, model, images


def test_converted_type_and_settings(pair):
    name, tv, model, _ = pair
    assert type(model) is {"faster": FasterRCNN, "mask": MaskRCNN, "keypoint": KeypointRCNN}[name]
    assert model.num_classes == TV_CLASSES[name] - 1
    assert set(model.branches) == {"faster": set(), "mask": {"mask"}, "keypoint": {"keypoint"}}[name]
    assert model.signature.mean == (0.0, 0.0, 0.0) and model.signature.std == (1.0, 1.0, 1.0)
    rpn, tv_rpn = model.rpn, tv.rpn
    assert (rpn.pre_nms_top_n_train, rpn.post_nms_top_n_train) == (2000, 300)
    assert (rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test) == (500, 300)
    assert (rpn.nms_thresh, rpn.score_thresh, rpn.min_size) == (0.65, tv_rpn.score_thresh, tv_rpn.min_size)
    assert (rpn.batch_size_per_image, rpn.positive_fraction) == (10_000, 1.0)
    m = tv_rpn.proposal_matcher
    assert (rpn.assigner.fg_iou_thresh, rpn.assigner.bg_iou_thresh) == (m.high_threshold, m.low_threshold) == (0.7, 0.3)
    assert rpn.assigner.allow_low_quality_matches
    assert rpn.box_coder.weights == tuple(tv_rpn.box_coder.weights)
    box, tv_roi = model.box_branch, tv.roi_heads
    assert (box.score_thresh, box.nms_thresh, box.max_detections) == (0.02, 0.45, 20)
    assert (box.batch_size_per_image, box.positive_fraction) == (310, 1.0)
    assert (box.assigner.fg_iou_thresh, box.assigner.bg_iou_thresh) == (0.5, 0.5)
    assert not box.assigner.allow_low_quality_matches
    assert box.box_coder.weights == tuple(tv_roi.box_coder.weights) == (10.0, 10.0, 5.0, 5.0)
    assert box.pooler.output_size == (7, 7) and box.pooler.sampling_ratio == 2
    assert box.pooler.strides == (4, 8, 16, 32)
    assert [fc.out_features for fc in box.head.fcs] == [1024, 1024]
    if name != "faster":
        branch = model.branches[name]
        assert branch.pooler.output_size == (14, 14) and branch.pooler.strides == (4, 8, 16, 32)
        assert [b[0].out_channels for b in branch.head.convs] == ([256] * 4 if name == "mask" else [NARROW] * 8)
    if name == "keypoint":
        assert model.branches["keypoint"].num_keypoints == NUM_KEYPOINTS


def _canonical(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Order by score desc, then label, then box (score ties may come out of NMS in either order)."""
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels.double(), -scores.double()]
    order = torch.arange(len(scores))
    for key in keys:  # stable sorts from the least to the most significant key
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _compare(ref: list[dict], got: list, sizes: list[tuple[int, int]]) -> None:
    assert len(got) == len(ref)
    for i, (r, g) in enumerate(zip(ref, got)):
        n = len(r["boxes"])
        assert len(g.boxes) == n, f"image {i}: {len(g.boxes)} detections, torchvision {n}"
        assert n > 0 and torch.unique(r["scores"]).numel() > 1  # the perturbed heads really give varying scores
        ro, go = _canonical(r["boxes"], r["scores"], r["labels"]), _canonical(g.boxes, g.scores, g.labels)
        torch.testing.assert_close(g.boxes[go], r["boxes"][ro], atol=1e-3, rtol=0.0)
        torch.testing.assert_close(g.scores[go], r["scores"][ro], atol=1e-4, rtol=0.0)
        assert torch.equal(g.labels[go], r["labels"][ro] - 1)  # torchvision's class 0 is the background
        extras = set(g.extras)
        if "masks" in r:
            assert extras == {"masks"}
            assert r["masks"].shape == (n, 1, *sizes[i]) and g.extras["masks"].shape == (n, *sizes[i])
            torch.testing.assert_close(g.extras["masks"][go], r["masks"][ro, 0], atol=1e-4, rtol=0.0)
            assert r["masks"].amax() > 0.1  # the masks are not all zero
        elif "keypoints" in r:
            assert extras == {"keypoints", "keypoint_scores"}
            assert g.extras["keypoints"].shape == (n, NUM_KEYPOINTS, 3)
            torch.testing.assert_close(g.extras["keypoints"][go], r["keypoints"][ro], atol=1e-3, rtol=0.0)
            torch.testing.assert_close(g.extras["keypoint_scores"][go], r["keypoints_scores"][ro], atol=1e-4,
                                       rtol=0.0)
        else:
            assert extras == set()


def test_detections_match_torchvision(pair):
    _, tv, model, images = pair
    tv.eval()
    model.eval()
    with torch.no_grad():
        ref = tv(list(images))
        got = model.predict(images)
    _compare(ref, got, [(H, W)] * 2)


def test_detections_of_differently_sized_images_match_torchvision(pair):
    """A list of images of different widths (shorter side H, so torchvision does not resize them): both pad
    to one batch, clip to each image and paste masks at each image's own size."""
    _, tv, model, images = pair
    tv.eval()
    model.eval()
    batch = [images[0], images[1, :, :, :W - 32]]
    with torch.no_grad():
        ref = tv(batch)
        got = model.predict(batch)
    _compare(ref, got, [(H, W), (H, W - 32)])
    assert (got[1].boxes[:, 2] <= W - 32).all()


def _targets(name: str) -> list[dict[str, torch.Tensor]]:
    """torchvision's format (labels 1-based); the second image has no boxes."""
    boxes = torch.tensor([[10.0, 20, 100, 120], [100, 10, 180, 90], [40, 40, 72, 80], [120, 60, 190, 126]])
    labels = torch.tensor([1, 1, 2, 1]) if name == "keypoint" else torch.tensor([1, 2, 5, 3])
    g = torch.Generator().manual_seed(3)
    out = []
    for b, lab in [(boxes, labels), (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))]:
        n = len(b)
        t = {"boxes": b, "labels": lab}
        if name == "mask":
            t["masks"] = (torch.rand(n, H, W, generator=g) > 0.5).to(torch.uint8)
        if name == "keypoint":  # inside their boxes, about a third invisible
            frac = torch.rand(n, NUM_KEYPOINTS, 2, generator=g)
            xy = b[:, None, :2] + frac * (b[:, None, 2:] - b[:, None, :2])
            vis = (torch.rand(n, NUM_KEYPOINTS, 1, generator=g) > 0.3).float() * 2  # COCO: 2 visible, 0 not
            t["keypoints"] = torch.cat([xy, vis], dim=-1)
        out.append(t)
    return out


def test_losses_match_torchvision(pair):
    name, tv, model, images = pair
    tv.train()
    model.train()
    targets = _targets(name)
    with torch.no_grad():
        ref = tv(list(images), targets)
        got = model.loss(images, [{**t, "labels": t["labels"] - 1} for t in targets])
    assert set(got) == {KEY_MAP[k] for k in ref} | {"loss"}
    for tv_key, value in ref.items():
        assert value > 0, tv_key  # every term has something to compare
        torch.testing.assert_close(got[KEY_MAP[tv_key]], value, rtol=1e-4, atol=0.0, msg=f"loss {tv_key}")
    torch.testing.assert_close(got["loss"], sum(ref.values()), rtol=1e-4, atol=0.0)


WRONG_CLASS = {"faster": MaskRCNN, "mask": KeypointRCNN, "keypoint": MaskRCNN}


def test_wrong_class_raises_naming_the_right_one(pair):
    name, tv, _, _ = pair
    right = {"faster": "FasterRCNN", "mask": "MaskRCNN", "keypoint": "KeypointRCNN"}[name]
    cls = WRONG_CLASS[name]
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.from_torchvision got a torchvision .* call {right}\."):
        cls.from_torchvision(tv)


def test_faster_rcnn_from_a_mask_rcnn_raises(pair):
    name, tv, _, _ = pair
    if name == "faster":
        pytest.skip("the Faster R-CNN converts to FasterRCNN")
    right = {"mask": "MaskRCNN", "keypoint": "KeypointRCNN"}[name]
    try:
        model = FasterRCNN.from_torchvision(tv)
    except ValueError as e:
        assert f"call {right}.from_torchvision" in str(e)
        return
    raise AssertionError(f"FasterRCNN.from_torchvision returned a {type(model).__name__}")
