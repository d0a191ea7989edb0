import numpy as np
import pytest
import torch
from PIL import Image

import cvzoo.visualize as vis
from cvzoo.visualize import PALETTE, draw_detections, make_grid_image, save_image_png

H, W = 64, 80


def _gray():
    return torch.full((3, H, W), 128, dtype=torch.uint8)


def _changed(a, b):
    return (a != b).any(dim=0)  # (H, W)


def test_box_edges_change_and_nothing_else():
    img = _gray()
    box = torch.tensor([[10.0, 12.0, 50.0, 40.0]])
    out = draw_detections(img, box, width=1)  # no labels, no scores: no caption
    assert out.dtype == torch.uint8 and out.shape == (3, H, W)
    assert torch.equal(img, _gray())  # the input is not drawn on
    edges = torch.zeros(H, W, dtype=torch.bool)
    edges[12, 10:51] = edges[40, 10:51] = edges[12:41, 10] = edges[12:41, 50] = True
    changed = _changed(out, img)
    assert torch.equal(changed, edges)
    assert tuple(out[:, 12, 30].tolist()) == PALETTE[0]
    captioned = _changed(draw_detections(img, box, torch.tensor([3]), torch.tensor([0.5]), width=1), img)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[12:41, 10:51] = True
    assert captioned[edges].all() and not captioned[~inside].any()  # the caption is written inside the box
    assert captioned[13:40, 11:50].any()


def test_float_and_uint8_inputs_agree():
    img = torch.rand(3, H, W)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [20.0, 10.0, 70.0, 60.0]])
    as_u8 = (img * 255).round().to(torch.uint8)
    assert torch.equal(draw_detections(img, boxes), draw_detections(as_u8, boxes))
    gray = draw_detections(as_u8[:1], boxes)  # (1, H, W) is drawn in colour
    assert gray.shape == (3, H, W)


def test_masks_tint_only_masked_pixels():
    img = _gray()
    boxes = torch.tensor([[2.0, 2.0, 70.0, 60.0]])
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 20:30, 15:45] = True
    plain = draw_detections(img, boxes, width=1)
    tinted = draw_detections(img, boxes, masks=mask, width=1)
    assert torch.equal(_changed(tinted, plain), mask[0])
    soft = draw_detections(img, boxes, masks=mask.float() * 0.9, width=1)  # float masks are thresholded at 0.5
    assert torch.equal(soft, tinted)


def test_invisible_keypoints_are_not_drawn():
    img = _gray()
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    kpts = torch.tensor([[[20.0, 20.0, 2.0], [50.0, 40.0, 0.0], [60.0, 20.0, 1.0]]])
    plain = draw_detections(img, boxes)
    drawn = _changed(draw_detections(img, boxes, keypoints=kpts, keypoint_radius=2), plain)
    assert drawn[20, 20] and drawn[20, 60]
    assert not drawn[35:46, 45:56].any()
    assert drawn.sum() <= 2 * 25  # two dots of radius 2, nothing else
    all_visible = _changed(draw_detections(img, boxes, keypoints=kpts[..., :2]), plain)
    assert all_visible[40, 50]


def test_captions_and_score_threshold(monkeypatch):
    seen = {}
    real = vis.draw_bounding_boxes

    def spy(image, boxes, labels=None, **kw):
        seen.update(boxes=boxes, labels=labels, colors=kw["colors"])
        return real(image, boxes, labels=labels, **kw)

    monkeypatch.setattr(vis, "draw_bounding_boxes", spy)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [20.0, 10.0, 70.0, 60.0], [1.0, 1.0, 9.0, 9.0]])
    labels, scores = torch.tensor([1, 2, 7]), torch.tensor([0.9, 0.2, 0.555])
    draw_detections(_gray(), boxes, labels, scores, classes=["bg", "cat", "dog"], score_thresh=0.3)
    assert seen["labels"] == ["cat 0.90", "7 0.56"]  # a label outside `classes` shows its id
    assert torch.equal(seen["boxes"], boxes[[0, 2]])
    assert seen["colors"] == [PALETTE[1], PALETTE[7]]
    draw_detections(_gray(), boxes, scores=scores, colors=["red", "#00ff00", (0, 0, 255)])
    assert seen["labels"] == ["0.90", "0.20", "0.56"] and seen["colors"] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    draw_detections(_gray(), boxes, colors="white")
    assert seen["labels"] is None and seen["colors"] == [(255, 255, 255)] * 3


def test_nothing_to_draw_returns_the_image():
    img = torch.rand(3, H, W)
    expected = (img * 255).round().to(torch.uint8)
    assert torch.equal(draw_detections(img, torch.zeros(0, 4)), expected)
    kept_none = draw_detections(img, torch.tensor([[1.0, 1.0, 9.0, 9.0]]), scores=torch.tensor([0.1]), score_thresh=0.5)
    assert torch.equal(kept_none, expected)


BOX = torch.tensor([[1.0, 1.0, 9.0, 9.0]])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"image": torch.zeros(H, W, 3, dtype=torch.uint8)}, "image"),
        ({"image": torch.full((3, H, W), 2.0)}, "image"),
        ({"image": torch.zeros(3, H, W, dtype=torch.int32)}, "image"),
        ({"boxes": torch.zeros(1, 5)}, "boxes"),
        ({"boxes": torch.tensor([[9.0, 1.0, 1.0, 9.0]])}, "boxes"),
        ({"labels": torch.tensor([1, 2])}, "labels"),
        ({"labels": torch.tensor([1.0])}, "labels"),
        ({"scores": torch.tensor([[0.5]])}, "scores"),
        ({"masks": torch.zeros(1, H, W + 1, dtype=torch.bool)}, "masks"),
        ({"keypoints": torch.zeros(1, 17)}, "keypoints"),
        ({"keypoints": torch.zeros(2, 17, 3)}, "keypoints"),
        ({"colors": ["red", "blue"]}, "colors"),
        ({"colors": "not-a-colour"}, "colors"),
        ({"classes": "cat"}, "classes"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, name):
    args = {"image": _gray(), "boxes": BOX} | kwargs
    with pytest.raises(ValueError, match=name):
        draw_detections(**args)


def test_make_grid_image_pads_mixed_sizes():
    a = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    b = torch.ones(1, 10, 10)  # float, one channel, smaller
    grid = make_grid_image([a, b, a], nrow=2, padding=2)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * (20 + 2) + 2, 2 * (30 + 2) + 2)
    assert torch.equal(grid[:, 2:22, 2:32], a)
    assert (grid[:, 2:12, 34:44] == 255).all() and (grid[:, 12:22, 34:64] == 0).all()  # b, then its padding
    assert make_grid_image(torch.rand(5, 3, 8, 8), nrow=8, padding=0).shape == (3, 8, 40)
    with pytest.raises(ValueError, match="images"):
        make_grid_image([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        make_grid_image([a, torch.zeros(4, 8, 8)])


def test_save_image_png_round_trip(tmp_path):
    img = torch.randint(0, 256, (3, 12, 17), dtype=torch.uint8)
    path = save_image_png(img, tmp_path / "pics" / "x.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (17, 12)
        assert np.array_equal(np.asarray(im), img.permute(1, 2, 0).numpy())
