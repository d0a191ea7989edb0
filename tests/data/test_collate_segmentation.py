"""cvzoo.data.collate.segmentation_collate: images zero-padded and masks padded with ignore_index at the
bottom/right to the largest size in the batch; equal sizes stack unchanged; mismatched pairs raise."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from cvzoo.data.collate import segmentation_collate


def _sample(h: int, w: int, seed: int, c: int = 3, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, h, w, generator=g) + 0.5, torch.randint(0, 4, (h, w), generator=g).to(dtype)


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_pads_to_the_largest_height_and_width(ignore_index):
    batch = [_sample(5, 7, 0), _sample(8, 4, 1), _sample(6, 6, 2)]  # max H from one sample, max W from another
    images, masks = segmentation_collate(batch, ignore_index=ignore_index)
    assert images.shape == (3, 3, 8, 7) and masks.shape == (3, 8, 7)
    assert masks.dtype == torch.int64 and images.dtype == torch.float32
    for i, (im, m) in enumerate(batch):
        h, w = m.shape
        assert torch.equal(images[i, :, :h, :w], im)  # the content stays at the top left
        assert torch.equal(masks[i, :h, :w], m)
        pad_img = torch.ones(8, 7, dtype=torch.bool)
        pad_img[:h, :w] = False
        assert (images[i][:, pad_img] == 0).all()  # zero padding (the images themselves are >= 0.5)
        assert (masks[i][pad_img] == ignore_index).all()
        assert int(pad_img.sum()) == 8 * 7 - h * w


def test_default_ignore_index_is_255_and_uint8_masks_become_int64():
    batch = [_sample(3, 4, 0, dtype=torch.uint8), _sample(4, 3, 1, dtype=torch.uint8)]
    _, masks = segmentation_collate(batch)
    assert masks.dtype == torch.int64
    assert masks[0, 3].tolist() == [255] * 4 and masks[1, :, 3].tolist() == [255] * 4
    assert torch.equal(masks[0, :3, :4], batch[0][1].long())


def test_equal_sizes_stack_unchanged():
    batch = [_sample(6, 9, s, c=1) for s in range(3)]
    images, masks = segmentation_collate(batch)
    assert torch.equal(images, torch.stack([im for im, _ in batch]))
    assert torch.equal(masks, torch.stack([m for _, m in batch]))
    assert (masks != 255).all()


def test_in_a_dataloader():
    data = [_sample(5, 5, 0), _sample(7, 3, 1)]
    loader = DataLoader(data, batch_size=2, collate_fn=functools.partial(segmentation_collate, ignore_index=-100))
    images, masks = next(iter(loader))
    assert images.shape == (2, 3, 7, 5) and masks.shape == (2, 7, 5)
    assert (masks[1, :, 3:] == -100).all() and (masks[0, 5:] == -100).all()


def test_bad_batches_raise():
    image, mask = _sample(5, 6, 0)
    with pytest.raises(ValueError, match=r"batch\[1\] must be an \(image \(C, H, W\), mask \(H, W\)\) pair"):
        segmentation_collate([(image, mask), (image, mask[:, :5])])  # mask narrower than its image
    with pytest.raises(ValueError, match=r"batch\[0\]"):
        segmentation_collate([(image, mask.T)])  # (6, 5) mask for a 5 x 6 image
    with pytest.raises(ValueError, match=r"batch\[0\]"):
        segmentation_collate([(image, mask[None])])  # (1, H, W) mask
    with pytest.raises(ValueError, match=r"batch\[0\]"):
        segmentation_collate([(image, mask.tolist())])
    with pytest.raises(ValueError, match="empty batch"):
        segmentation_collate([])
