"""RetinaNet.from_torchvision / FCOS.from_torchvision against torchvision's own models (the reference).

torchvision's models are built so that their GeneralizedRCNNTransform leaves the batch unchanged
(min_size = H, zero mean, unit std, H and W divisible by 128): both models then see the same pixels,
and losses and detections must agree. Each ResNet-50 pair is built once (module-scoped fixture).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from cvzoo.detection import FCOS, RetinaNet
from cvzoo.types import IMAGENET_MEAN, IMAGENET_STD

H, W = 256, 384
NUM_CLASSES = 5
# torchvision loss name -> cvzoo loss name
KEY_MAP = {"classification": "classification", "bbox_regression": "box_regression", "bbox_ctrness": "centerness"}
BUILDERS = {
    "retinanet_v1": (retinanet_resnet50_fpn, RetinaNet),
    "retinanet_v2": (retinanet_resnet50_fpn_v2, RetinaNet),
    "fcos": (fcos_resnet50_fpn, FCOS),
}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 20, 100, 120], [150, 30, 300, 200], [40, 40, 72, 80], [200, 100, 380, 250]]),
         "labels": torch.tensor([0, 2, 4, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without boxes
    ]


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request):
    builder, cls = BUILDERS[request.param]
    torch.manual_seed(0)
    tv = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=H, max_size=2000,
                 image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    with torch.no_grad():  # the default head init gives near-constant scores; perturb so they vary
        for mod in tv.head.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, 0.01)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1)
    model = cls.from_torchvision(tv)
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    return request.param, tv, model, images


def test_converted_model_type_and_signature(pair):
    name, tv, model, _ = pair
    assert type(model) is BUILDERS[name][1]
    assert model.num_classes == NUM_CLASSES
    # mean/std come from torchvision's transform, not cvzoo's ImageNet default
    assert model.signature.mean == (0.0, 0.0, 0.0) == tuple(tv.transform.image_mean)
    assert model.signature.std == (1.0, 1.0, 1.0) == tuple(tv.transform.image_std)
    assert model.signature.mean != IMAGENET_MEAN and model.signature.std != IMAGENET_STD
    assert model.score_thresh == tv.score_thresh
    assert model.nms_thresh == tv.nms_thresh
    assert model.max_detections == tv.detections_per_img


def test_losses_match_torchvision(pair):
    _, tv, model, images = pair
    tv.train()
    model.train()
    targets = _targets()
    with torch.no_grad():
        ref = tv(list(images), targets)
        got = model.loss(images, targets)
    assert set(got) == {KEY_MAP[k] for k in ref} | {"loss"}
    for tv_key, value in ref.items():
        torch.testing.assert_close(got[KEY_MAP[tv_key]], value, rtol=1e-4, atol=0.0, msg=f"loss {tv_key}")
    torch.testing.assert_close(got["loss"], sum(ref.values()), rtol=1e-4, atol=0.0)
    assert all(v > 0 for v in ref.values())  # the image with boxes gives every term something to compare


def _canonical(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Order by score desc, then label, then box (score ties may come out of NMS in either order)."""
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels.double(), -scores.double()]
    order = torch.arange(len(scores))
    for key in keys:  # stable sorts from the least to the most significant key
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def test_detections_match_torchvision(pair):
    _, tv, model, images = pair
    tv.eval()
    model.eval()
    with torch.no_grad():
        ref = tv(list(images))
        got = model.predict(images)
    assert len(got) == len(ref) == images.shape[0]
    for i, (r, g) in enumerate(zip(ref, got)):
        assert len(g.boxes) == len(r["boxes"]), f"image {i}: {len(g.boxes)} detections, torchvision {len(r['boxes'])}"
        assert len(r["boxes"]) > 0
        assert torch.unique(r["scores"]).numel() > 1  # the perturbed head really gives varying scores
        ro = _canonical(r["boxes"], r["scores"], r["labels"])
        go = _canonical(g.boxes, g.scores, g.labels)
        torch.testing.assert_close(g.boxes[go], r["boxes"][ro], atol=1e-3, rtol=0.0)
        torch.testing.assert_close(g.scores[go], r["scores"][ro], atol=1e-4, rtol=0.0)
        assert torch.equal(g.labels[go], r["labels"][ro])
        assert g.labels.dtype == torch.int64
