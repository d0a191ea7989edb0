"""Box/mask/keypoint-aware geometry (cvzoo/augment/geometry.py) and Mosaic / DetectionMixUp (detection.py),
checked against closed forms."""

import pytest
import torch

K = pytest.importorskip("kornia.augmentation")

from cvzoo.augment import DetectionMixUp, DetectionTransform, Mosaic, mosaic  # noqa: E402


def box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 4) integer xyxy -> (N, H, W) bool rectangles covering exactly the box."""
    m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        m[i, y1:y2, x1:x2] = True
    return m


def make_target(boxes, h, w, masks=True, keypoints=None, **extra):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    t = {"boxes": boxes, "labels": torch.arange(1, n + 1), "price": 10.0 * torch.arange(1, n + 1), **extra}
    if masks:
        t["masks"] = box_masks(boxes, h, w)
    if keypoints is not None:
        t["keypoints"] = torch.tensor(keypoints, dtype=torch.float32)
    return t


# ---------------------------------------------------------------- closed-form geometry


@pytest.mark.parametrize("with_masks", [False, True])
def test_hflip_boxes_keypoints_masks_closed_form(with_masks):
    h, w = 20, 30
    boxes = [[2.0, 3.0, 12.0, 9.0], [20.0, 0.0, 30.0, 20.0]]
    kps = [[[2.0, 3.0, 2.0], [11.0, 8.0, 1.0]], [[25.0, 10.0, 2.0], [29.0, 19.0, 2.0]]]
    t = make_target(boxes, h, w, masks=with_masks, keypoints=kps)
    aug = DetectionTransform([K.RandomHorizontalFlip(p=1.0)])
    out, (res,) = aug(torch.rand(1, 3, h, w), [t])
    b = t["boxes"]
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)  # x1, x2 -> W - x2, W - x1
    assert torch.equal(res["boxes"], expected)
    kp = t["keypoints"]
    # keypoints are pixel-index coordinates (kornia's convention): x -> W - 1 - x, y and visibility unchanged
    assert torch.allclose(res["keypoints"][..., 0], w - 1 - kp[..., 0], atol=1e-5)
    assert torch.equal(res["keypoints"][..., 1:], kp[..., 1:])
    assert torch.equal(res["labels"], t["labels"]) and torch.equal(res["price"], t["price"])
    if with_masks:
        assert torch.equal(res["masks"], t["masks"].flip(-1))


@pytest.mark.parametrize("with_masks", [False, True])
def test_rotation_90_square_closed_form(with_masks):
    s = 24
    boxes = [[2.0, 3.0, 12.0, 9.0], [14.0, 6.0, 24.0, 20.0]]
    kps = [[[2.0, 3.0, 2.0]], [[20.0, 7.0, 2.0]]]
    t = make_target(boxes, s, s, masks=with_masks, keypoints=kps)
    aug = DetectionTransform([K.RandomRotation((90.0, 90.0), p=1.0)])
    _, (res,) = aug(torch.rand(1, 3, s, s), [t])
    x1, y1, x2, y2 = t["boxes"].unbind(1)
    # kornia's +90 deg turns the picture counter-clockwise: (x, y) -> (y, S - x) in continuous coordinates
    expected = torch.stack([y1, s - x2, y2, s - x1], 1)
    assert torch.allclose(res["boxes"], expected, atol=1e-4)
    kp = t["keypoints"]  # pixel-index coordinates: (x, y) -> (y, S - 1 - x)
    assert torch.allclose(res["keypoints"][..., 0], kp[..., 1], atol=1e-4)
    assert torch.allclose(res["keypoints"][..., 1], s - 1 - kp[..., 0], atol=1e-4)
    if with_masks:
        assert torch.equal(res["masks"], torch.rot90(t["masks"], 1, (-2, -1)))


def test_resize_scales_boxes_exactly():
    h, w, h2, w2 = 20, 30, 50, 45  # non-uniform up-scaling
    t = make_target([[2.0, 3.0, 12.0, 9.0], [20.0, 0.0, 30.0, 20.0]], h, w, masks=False)
    aug = DetectionTransform([K.Resize((h2, w2), align_corners=False)], output_size=(h2, w2))
    out, (res,) = aug(torch.rand(1, 3, h, w), [t])
    assert out.shape[-2:] == (h2, w2)
    scale = torch.tensor([w2 / w, h2 / h, w2 / w, h2 / h])
    assert torch.allclose(res["boxes"], t["boxes"] * scale, atol=1e-4)


@pytest.mark.parametrize(
    "make_op",
    [
        lambda: K.RandomHorizontalFlip(p=1.0),
        lambda: K.RandomVerticalFlip(p=1.0),
        lambda: K.Resize((37, 53), align_corners=False),
        lambda: K.Resize((13, 17), align_corners=False),
        lambda: K.RandomResizedCrop((48, 40), scale=(0.6, 1.0), align_corners=False),
        lambda: K.RandomAffine(0.0, translate=(0.1, 0.1), scale=(0.7, 1.6), p=1.0),
    ],
    ids=["hflip", "vflip", "resize-up", "resize-down", "resized-crop", "scale-translate"],
)
def test_axis_aligned_ops_mask_box_equals_transformed_box(make_op):
    h, w, b = 30, 40, 4
    boxes = [[4.0, 5.0, 20.0, 18.0], [15.0, 10.0, 33.0, 26.0], [8.0, 14.0, 14.0, 28.0]]
    aug = DetectionTransform([make_op()], min_visibility=0.0, min_box_size=0.0)
    images = torch.rand(b, 3, h, w)
    torch.manual_seed(1)
    _, with_masks = aug(images, [make_target(boxes, h, w, masks=True) for _ in range(b)])
    torch.manual_seed(1)  # the same draw: the mask path consumes no randomness
    _, no_masks = aug(images, [make_target(boxes, h, w, masks=False) for _ in range(b)])
    for m, n in zip(with_masks, no_masks):
        common = sorted(set(m["labels"].tolist()) & set(n["labels"].tolist()))
        assert len(common) >= 1
        bm = m["boxes"][[m["labels"].tolist().index(i) for i in common]]
        bn = n["boxes"][[n["labels"].tolist().index(i) for i in common]]
        assert (bm - bn).abs().max() <= 1.0


@pytest.mark.parametrize("with_masks", [False, True])
def test_cut_objects_dropped_with_all_fields(with_masks):
    # a 40x40 image centre-cropped to 20x20 shifts everything by -10 and keeps [10, 30)^2
    boxes = [
        [0.0, 0.0, 8.0, 8.0],  # entirely outside -> dropped
        [5.0, 5.0, 15.0, 15.0],  # 25% visible < 30% -> dropped
        [8.0, 8.0, 18.0, 18.0],  # 64% visible -> kept, clipped to [0, 0, 8, 8]
        [12.0, 12.0, 28.0, 28.0],  # inside -> [2, 2, 18, 18]
        [25.0, 0.0, 40.0, 40.0],  # 5 of 15 columns, 20 of 40 rows -> 1/6 visible -> dropped
    ]
    kps = [
        [[1.0, 1.0, 2.0]] * 3,
        [[12.0, 12.0, 2.0]] * 3,
        [[9.0, 9.0, 2.0], [9.6, 29.4, 2.0], [8.0, 15.0, 2.0]],  # -> (-1, -1) out; (-0.4, 19.4) in; (-2, 5) out
        [[20.0, 20.0, 1.0], [30.0, 20.0, 2.0], [20.0, 5.0, 2.0]],  # -> (10, 10) in; (20, 10) out; (10, -5) out
        [[30.0, 30.0, 2.0]] * 3,
    ]
    t = make_target(boxes, 40, 40, masks=with_masks, keypoints=kps, image_id=7, orig_size=torch.tensor([40, 40]))
    aug = DetectionTransform([K.CenterCrop(20)], output_size=20, min_visibility=0.3)
    _, (res,) = aug(torch.rand(1, 3, 40, 40), [t])
    assert res["labels"].tolist() == [3, 4]
    assert res["price"].tolist() == [30.0, 40.0]
    assert torch.allclose(res["boxes"], torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 18.0, 18.0]]))
    # keypoints are shifted by -10; those moved out of the pixel span [-0.5, 19.5]^2 lose their visibility
    assert res["keypoints"][..., 2].tolist() == [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]
    assert torch.allclose(res["keypoints"][..., :2], t["keypoints"][2:4, :, :2] - 10)
    assert res["image_id"] == 7 and res["orig_size"].tolist() == [40, 40]  # image-level entries untouched
    assert list(res) == list(t)  # same keys, same order
    if with_masks:
        assert res["masks"].shape == (2, 20, 20)
        assert torch.equal(res["masks"], t["masks"][2:4, 10:30, 10:30])


def test_keypoint_flip_index_swaps_left_right_on_mirrored_images():
    t = make_target([[2.0, 2.0, 20.0, 20.0]], 24, 24, masks=False, keypoints=[[[3.0, 5.0, 2.0], [15.0, 5.0, 1.0]]])
    aug = DetectionTransform([K.RandomHorizontalFlip(p=1.0)], keypoint_flip_index=[1, 0])
    _, (res,) = aug(torch.rand(1, 3, 24, 24), [t])
    # the left point (x=3) flips to x=20 and becomes keypoint 1; the right one (x=15) to x=8 and keypoint 0
    assert torch.allclose(res["keypoints"][0], torch.tensor([[8.0, 5.0, 1.0], [20.0, 5.0, 2.0]]))


def test_empty_and_mixed_batch():
    t0 = make_target([[2.0, 2.0, 20.0, 20.0]], 24, 24)
    t1 = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "price": torch.zeros(0),
        "masks": torch.zeros(0, 24, 24, dtype=torch.bool),
    }
    aug = DetectionTransform([K.Resize((12, 12), align_corners=False)], output_size=12)
    out, res = aug(torch.rand(2, 3, 24, 24), [t0, t1])
    assert out.shape == (2, 3, 12, 12)
    assert res[0]["masks"].shape == (1, 12, 12) and res[1]["masks"].shape == (0, 12, 12)
    assert res[1]["boxes"].shape == (0, 4) and res[1]["labels"].dtype == torch.long
    _, res = aug(torch.rand(1, 3, 24, 24), [t1])  # nothing at all to warp
    assert res[0]["masks"].shape == (0, 12, 12)


def test_detection_transform_bad_arguments():
    with pytest.raises(ValueError, match="min_visibility"):
        DetectionTransform([K.RandomHorizontalFlip()], min_visibility=1.5)
    with pytest.raises(ValueError, match="transforms"):
        DetectionTransform([K.RandomElasticTransform()])
    with pytest.raises(ValueError, match="keypoint_flip_index"):
        DetectionTransform([K.RandomHorizontalFlip()], keypoint_flip_index=[0, 0])
    aug = DetectionTransform([K.RandomHorizontalFlip()])
    t = make_target([[2.0, 2.0, 20.0, 20.0]], 24, 24)
    with pytest.raises(ValueError, match="targets"):
        aug(torch.rand(2, 3, 24, 24), [t])
    with pytest.raises(ValueError, match="masks"):
        aug(torch.rand(1, 3, 24, 30), [t])
    with pytest.raises(ValueError, match="images"):
        aug(torch.rand(3, 24, 24), [t])
    with pytest.raises(ValueError, match="boxes"):
        aug(torch.rand(1, 3, 24, 24), [{"boxes": torch.zeros(4), "labels": torch.zeros(1)}])


# ---------------------------------------------------------------- Mosaic


def four_images(h=16, w=16):
    images = torch.stack([torch.full((3, h, w), (i + 1) / 5) for i in range(4)])
    targets = [
        make_target(
            [[2.0, 3.0, 10.0, 12.0], [12.0, 10.0, 16.0, 16.0]],
            h,
            w,
            keypoints=[[[4.0, 5.0, 2.0]], [[14.0, 14.0, 2.0]]],
            image_id=i,
        )
        for i in range(4)
    ]
    for i, t in enumerate(targets):
        t["labels"] = t["labels"] + 10 * i  # labels 1, 2 / 11, 12 / 21, 22 / 31, 32
    return images, targets


@pytest.mark.parametrize("with_masks", [False, True])
def test_mosaic_centre_tiles_all_four_whole(with_masks):
    images, targets = four_images()
    if not with_masks:
        for t in targets:
            del t["masks"]
    out, res = mosaic(
        images,
        targets,
        sources=torch.tensor([[0, 1, 2, 3]] * 4),
        centers=torch.tensor([[16, 16]] * 4),
        output_size=(32, 32),
    )
    assert out.shape == (4, 3, 32, 32)
    offsets = [(0, 0), (16, 0), (0, 16), (16, 16)]  # (ox, oy) of quadrants tl, tr, bl, br
    for q, (ox, oy) in enumerate(offsets):
        assert torch.equal(out[0, :, oy : oy + 16, ox : ox + 16], images[q])
    r = res[0]
    assert r["labels"].tolist() == [1, 2, 11, 12, 21, 22, 31, 32]
    assert r["image_id"] == 0
    shifts = torch.tensor([[ox, oy, ox, oy] for ox, oy in offsets], dtype=torch.float32).repeat_interleave(2, 0)
    src_boxes = torch.cat([t["boxes"] for t in targets])
    assert torch.equal(r["boxes"], src_boxes + shifts)
    src_kps = torch.cat([t["keypoints"] for t in targets])
    assert torch.equal(r["keypoints"][..., :2], src_kps[..., :2] + shifts[:, None, :2])
    assert torch.equal(r["price"], torch.cat([t["price"] for t in targets]))
    if with_masks:
        assert r["masks"].shape == (8, 32, 32)
        for j, (x1, y1, x2, y2) in enumerate(r["boxes"].long().tolist()):
            assert r["masks"][j].sum() == (x2 - x1) * (y2 - y1) and r["masks"][j, y1:y2, x1:x2].all()


@pytest.mark.parametrize("with_masks", [False, True])
def test_mosaic_off_centre_clips_and_drops(with_masks):
    images, targets = four_images()
    if not with_masks:
        for t in targets:
            del t["masks"]
    cx, cy = 6, 22
    out, (r, *_) = mosaic(
        images,
        targets,
        sources=torch.tensor([[0, 1, 2, 3]] * 4),
        centers=torch.tensor([[cx, cy]] * 4),
        output_size=(32, 32),
        fill=0.0,
    )
    # tl: offset (-10, 6), region [0, 6) x [0, 22): box 1 -> [-8, 9, 0, 18] gone; box 2 -> [2, 16, 6, 22] 100% kept
    # tr: offset (6, 6), region [6, 32) x [0, 22): box 1 -> [8, 9, 16, 18] kept; box 2 -> [18, 16, 22, 22] kept
    # bl: offset (-10, 22), region [0, 6) x [22, 32): box 1 -> [-8, 25, 0, 32] gone; box 2 -> [2, 32, 6, 38] gone
    # br: offset (6, 22), region [6, 32) x [22, 32): box 1 -> [8, 25, 16, 32] 7/9 kept; box 2 -> [18, 32, ..] gone
    assert r["labels"].tolist() == [2, 11, 12, 31]
    expected = torch.tensor([[2.0, 16, 6, 22], [8, 9, 16, 18], [18, 16, 22, 22], [8, 25, 16, 32]])
    assert torch.equal(r["boxes"], expected)
    assert r["price"].tolist() == [20.0, 10.0, 20.0, 10.0]
    # keypoint of label 31: (4, 5) + (6, 22) = (10, 27) inside; of label 2: (14, 14) + (-10, 6) = (4, 20) inside
    assert torch.equal(r["keypoints"][:, 0], torch.tensor([[4.0, 20, 2], [10, 11, 2], [20, 20, 2], [10, 27, 2]]))
    assert torch.equal(out[0, :, 6:22, :6], images[0, :, :, 10:])  # tl: the right 6 columns of image 0
    assert (out[0, :, :6, :6] == 0).all()  # above image 0: no image covers it, so `fill`
    assert torch.equal(out[0, :, 22:, 6:22], images[3, :, :10, :])  # br: the top 10 rows of image 3
    assert (out[0, :, 22:, 22:] == 0).all()
    if with_masks:
        assert torch.equal(r["masks"].sum((1, 2)), torch.tensor([24, 72, 24, 56]))


def test_mosaic_keypoint_outside_quadrant_gets_visibility_zero():
    images, targets = four_images()
    targets[0]["keypoints"][0, 0] = torch.tensor([15.0, 15.0, 2.0])
    targets[0]["boxes"][0] = torch.tensor([0.0, 0.0, 16.0, 16.0])
    targets[0]["masks"][0] = True
    _, (r, *_) = mosaic(
        images,
        targets,
        sources=torch.tensor([[0, 1, 2, 3]] * 4),
        centers=torch.tensor([[12, 12]] * 4),
        output_size=(32, 32),
        min_visibility=0.5,
    )
    # image 0 in tl with offset (-4, -4): the whole-image object keeps 12x12 of 16x16 (56%); its keypoint moves
    # to (11, 11), inside the quadrant's pixel span [-0.5, 11.5]^2
    assert r["labels"][0] == 1 and r["keypoints"][0, 0, 2] == 2
    targets[0]["keypoints"][0, 0] = torch.tensor([15.6, 2.0, 2.0])  # -> (11.6, -2): outside
    _, (r, *_) = mosaic(
        images,
        targets,
        sources=torch.tensor([[0, 1, 2, 3]] * 4),
        centers=torch.tensor([[12, 12]] * 4),
        output_size=(32, 32),
        min_visibility=0.5,
    )
    assert r["labels"][0] == 1 and r["keypoints"][0, 0, 2] == 0


def test_mosaic_module_shapes_determinism_and_arguments():
    images, targets = four_images()
    aug = Mosaic((24, 28))
    torch.manual_seed(5)
    out, res = aug(images, targets)
    torch.manual_seed(5)
    out2, res2 = aug(images, targets)
    assert out.shape == (4, 3, 24, 28) and aug.output_size == (24, 28)
    assert torch.equal(out, out2)
    for r, r2, t in zip(res, res2, targets):
        assert torch.equal(r["boxes"], r2["boxes"])
        n = len(r["boxes"])
        assert all(len(r[k]) == n for k in ("labels", "masks", "keypoints", "price"))
        assert r["image_id"] == t["image_id"]
        b = r["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 28).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 24).all()
    with pytest.raises(ValueError, match="output_size"):
        Mosaic(0)
    with pytest.raises(ValueError, match="min_visibility"):
        Mosaic(32, min_visibility=-0.1)
    with pytest.raises(ValueError, match="center_range"):
        Mosaic(32, center_range=(0.8, 0.2))


# ---------------------------------------------------------------- DetectionMixUp


def test_detection_mixup_weights_match_pixel_lambda():
    images, targets = four_images()
    out, res = DetectionMixUp(alpha=1.5)(images, targets)
    for i, r in enumerate(res):
        a, b = images[i], images[i - 1]  # image i is mixed with image i - 1
        lam = ((out[i] - b) / (a - b)).mean()
        assert torch.allclose((out[i] - b) / (a - b), lam.expand_as(a), atol=1e-4)
        assert r["labels"].tolist() == targets[i]["labels"].tolist() + targets[i - 1]["labels"].tolist()
        assert torch.allclose(r["weight"], torch.tensor([lam, lam, 1 - lam, 1 - lam]), atol=1e-4)
        assert torch.equal(r["masks"], torch.cat([targets[i]["masks"], targets[i - 1]["masks"]]))
        assert torch.equal(r["price"], torch.cat([targets[i]["price"], targets[i - 1]["price"]]))
        assert r["image_id"] == i


def test_detection_mixup_p0_keeps_images_and_targets():
    images, targets = four_images()
    targets[0]["weight"] = torch.tensor([0.5, 2.0])
    for t in targets[1:]:
        t["weight"] = torch.ones(2)
    out, res = DetectionMixUp(p=0.0)(images, targets)
    assert torch.equal(out, images)
    assert res[0]["weight"].tolist() == [0.5, 2.0]
    assert all(torch.equal(r["labels"], t["labels"]) for r, t in zip(res, targets))
    with pytest.raises(ValueError, match="alpha"):
        DetectionMixUp(alpha=0.0)
