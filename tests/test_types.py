"""cvzoo.types: Signature validation messages, normalisation, pyramid metadata helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cvzoo.types import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureInfo,
    Signature,
    check_feature_info,
    check_increasing_strides,
    level_names,
)


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 96)


# (bad input, fragments the message must contain: the argument name, the value received, the expectation)
BAD_IMAGES = {
    "not-a-tensor": (lambda: _images().numpy(), ["images", "ndarray", "torch.Tensor"]),
    "list": (lambda: [[0.0]], ["images", "list", "torch.Tensor"]),
    "3-d": (lambda: _images()[0], ["images", "4-D", "(3, 64, 96)"]),
    "5-d": (lambda: _images()[None], ["images", "4-D", "(1, 2, 3, 64, 96)"]),
    "empty-batch": (lambda: _images()[:0], ["images", "empty", "(0, 3, 64, 96)"]),
    "wrong-channels": (lambda: _images()[:, :1], ["images", "1 channels", "(2, 1, 64, 96)", "expected 3"]),
    "four-channels": (lambda: torch.rand(2, 4, 64, 96), ["images", "4 channels", "expected 3"]),
    "uint8": (lambda: (_images() * 255).to(torch.uint8), ["images", "torch.uint8", "floating"]),
    "int64": (lambda: _images().long(), ["images", "torch.int64", "floating"]),
    "bool": (lambda: _images() > 0.5, ["images", "torch.bool", "floating"]),
    "too-small": (lambda: torch.rand(2, 3, 16, 96), ["images", "16x96", "32"]),
    "too-narrow": (lambda: torch.rand(2, 3, 64, 8), ["images", "64x8", "32"]),
    "not-divisible": (lambda: torch.rand(2, 3, 64, 100), ["images", "64x100", "size_divisor=32"]),
    "nan": (lambda: _images().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))),
            ["images", "NaN", "finite"]),
    "inf": (lambda: _images().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
            ["images", "inf", "finite"]),
    "neg-inf": (lambda: _images().index_put_((torch.tensor([0]),), torch.tensor(float("-inf"))),
                ["images", "inf", "finite"]),
}

SIG = Signature(in_channels=3, size_divisor=32, min_size=32)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_validate_rejects_bad_images_with_informative_message(case):
    make, fragments = BAD_IMAGES[case]
    with pytest.raises(ValueError) as err:
        SIG.validate(make())
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_validate_uses_the_given_name():
    with pytest.raises(ValueError, match="^batch"):
        SIG.validate(torch.rand(2, 1, 64, 64), name="batch")


@pytest.mark.parametrize("images", [
    torch.rand(2, 3, 64, 96),
    torch.rand(1, 3, 32, 32),
    torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last),
])
def test_validate_accepts_good_images_and_returns_them(images):
    assert SIG.validate(images) is images


def test_validate_defaults_accept_any_size():
    sig = Signature()
    x = torch.rand(1, 3, 1, 7)
    assert sig.validate(x) is x
    with pytest.raises(ValueError, match="channels"):
        Signature(in_channels=1).validate(torch.rand(1, 3, 4, 4))


def test_mean_and_std_have_one_value_per_channel():
    grey = Signature(in_channels=1)  # the ImageNet default averaged over RGB
    assert grey.mean == pytest.approx((0.449,), abs=1e-3) and grey.std == pytest.approx((0.226,), abs=1e-3)
    assert grey.normalize(torch.rand(2, 1, 4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="one value per input channel"):
        Signature(in_channels=1, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_validate_skips_data_checks_only_while_compiling():
    torch._dynamo.reset()
    x = torch.rand(2, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")

    def f(images):
        return SIG.validate(images) * 2

    out = torch.compile(f, backend="eager", fullgraph=True)(x)  # no graph break, no host sync
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="NaN"):
        f(x)


def test_normalize_equals_closed_form():
    sig = Signature(mean=(0.1, 0.5, 0.9), std=(0.2, 0.25, 0.5))
    x = torch.rand(2, 3, 5, 7)
    out = sig.normalize(x)
    for c, (m, s) in enumerate(zip((0.1, 0.5, 0.9), (0.2, 0.25, 0.5))):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)


def test_normalize_defaults_to_imagenet_and_keeps_dtype():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    out = Signature().normalize(x)
    assert out.dtype == torch.float64
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std)


def test_signature_is_frozen_and_replace_returns_a_copy():
    sig = Signature()
    other = sig.replace(outputs=("logits",), size_divisor=32)
    assert other.outputs == ("logits",) and other.size_divisor == 32
    assert sig.outputs == () and sig.size_divisor == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        sig.in_channels = 1  # type: ignore[misc]


def test_check_feature_info_accepts_tuples_and_returns_feature_info():
    info = check_feature_info([(16, 8), (32, 16)])
    assert info == (FeatureInfo(16, 8), FeatureInfo(32, 16))
    assert all(isinstance(f, FeatureInfo) for f in info)
    assert isinstance(info, tuple)


def test_check_feature_info_accepts_repeated_strides_of_dilated_stages():
    info = [FeatureInfo(256, 4), FeatureInfo(512, 8), FeatureInfo(1024, 8), FeatureInfo(2048, 8)]
    assert check_feature_info(info) == tuple(info)


@pytest.mark.parametrize("info, fragment", [
    ([], "at least one"),
    ([FeatureInfo(8, 16), FeatureInfo(8, 8)], "[16, 8]"),
    ([FeatureInfo(8, 8), FeatureInfo(8, 8), FeatureInfo(8, 4)], "[8, 8, 4]"),
    ([FeatureInfo(0, 8)], "channels=0"),
    ([FeatureInfo(8, 0)], "stride=0"),
    ([FeatureInfo(8, -8)], "stride=-8"),
])
def test_check_feature_info_rejects_bad_pyramids(info, fragment):
    with pytest.raises(ValueError, match="^neck_input") as err:
        check_feature_info(info, "neck_input")
    assert fragment in str(err.value)


def test_level_names():
    info = [FeatureInfo(8, s) for s in (4, 8, 16, 32, 64, 128)]
    assert level_names(info, "p") == ("p2", "p3", "p4", "p5", "p6", "p7")
    assert level_names(info[:3], "c") == ("c2", "c3", "c4")
    assert level_names([FeatureInfo(3, 1)], "x") == ("x0",)


def test_level_names_are_unique_when_strides_repeat():
    info = [FeatureInfo(8, s) for s in (4, 8, 8, 8, 16)]
    assert level_names(info, "c") == ("c2", "c3", "c3_2", "c3_3", "c4")
    assert level_names([FeatureInfo(8, 16), FeatureInfo(8, 16)], "p") == ("p4", "p4_2")


def test_check_increasing_strides():
    check_increasing_strides([FeatureInfo(8, 8), FeatureInfo(8, 16)])
    with pytest.raises(ValueError, match=r"^PAN feature_info strides must strictly increase.*\[8, 8\]"):
        check_increasing_strides([FeatureInfo(8, 8), FeatureInfo(8, 8)], owner="PAN")
