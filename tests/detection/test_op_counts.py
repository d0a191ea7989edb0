"""Dispatch budgets of the dense detectors' hot paths: loss (forward + backward) and post-processing.

Counted with a TorchDispatchMode on CPU; the counts predict GPU launch overhead. They must not grow
with the batch size or the number of boxes, and the loss must never synchronise with the device.
"""

from __future__ import annotations

import pytest
import torch

from cvzoo.detection import TargetBatch
from cvzoo.profiling import count_ops
from cvzoo.zoo import create_model


def _targets(batch: int, boxes: int, size: int, num_classes: int) -> TargetBatch:
    g = torch.Generator().manual_seed(batch * 100 + boxes)
    xy = torch.rand(batch, boxes, 2, generator=g) * size * 0.7
    wh = 8 + torch.rand(batch, boxes, 2, generator=g) * size * 0.3
    labels = torch.randint(0, num_classes, (batch, boxes), generator=g)
    labels[0] = -1  # first image without boxes: padding only
    return TargetBatch(torch.cat([xy, xy + wh], -1), labels)


def _loss_counts(model, batch: int, boxes: int, size: int = 128) -> tuple[int, int]:
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        feats = model.features(images)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    out = type(model.head(feats))(*(t.detach().requires_grad_(True) for t in model.head(feats)))
    image_sizes = torch.tensor([[size, size]]).expand(batch, 2)
    tb = _targets(batch, boxes, size, model.num_classes)
    return count_ops(lambda: model.compute_loss(out, sizes, tb, image_sizes)["loss"].backward())


@pytest.mark.parametrize("name", ["retinanet_micro", "fcos_micro", "atss_micro", "centernet_micro"])
def test_loss_ops_do_not_grow_with_batch_or_boxes_and_never_sync(name):
    model = create_model(name)
    counts = {(b, m): _loss_counts(model, b, m) for b in (2, 6) for m in (1, 9)}
    assert len({ops for ops, _ in counts.values()}) == 1, counts
    assert all(syncs == 0 for _, syncs in counts.values()), counts


@pytest.mark.parametrize("name", ["retinanet_micro", "fcos_micro"])
def test_loss_within_250_ops(name):
    ops, _ = _loss_counts(create_model(name), 4, 8)
    assert ops <= 250


@pytest.mark.parametrize("name", ["retinanet_micro", "fcos_micro"])
def test_postprocess_ops_do_not_grow_with_batch(name):
    # 20 candidates a level keep the batch under 1,000 boxes, where CPU NMS is one call as on CUDA
    # (past that, torchvision's CPU batched_nms loops over image x class groups, see batched_nms_once)
    model = create_model(name).eval()
    with torch.no_grad():  # scores well above the threshold, so every path does work
        for m in model.head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 1.0)

    def post_counts(batch: int) -> int:
        with torch.no_grad():
            feats = model.features(torch.randn(batch, 3, 128, 128))
            out = model.head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        image_sizes = torch.tensor([[128, 128]]).expand(batch, 2)
        ops, _ = count_ops(lambda: model.postprocess(out, sizes, image_sizes, 0.05, 0.5, 100, 20))
        dets = model.postprocess(out, sizes, image_sizes, 0.05, 0.5, 100, 20)
        assert len(dets) == batch and all(len(d.boxes) > 0 for d in dets)
        return ops

    small, large = post_counts(2), post_counts(8)
    assert small == large
    assert large <= 300
