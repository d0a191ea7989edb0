"""cvzoo.segmentation.segmenter / losses / baselines: logits at the input size, the loss against
torch.nn.functional recomputed on the model's own outputs, target validation, Dice and Lovasz-softmax
against closed forms and the paper's algorithm, compile-cleanliness, predict, and the NoopSegmenter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvzoo.backbones import resnet_micro
from cvzoo.heads import FCNHead
from cvzoo.segmentation import (
    NoopSegmenter,
    SegmentationOutput,
    SegmentationPrediction,
    Segmenter,
    dice_loss,
    lovasz_softmax_loss,
)
from cvzoo.zoo import create_model, list_models

K = 4
H, W = 61, 83
MICRO = ["deeplabv3_resnet_tiny", "unet_resnet_micro", "fpnseg_resnet_micro", "noop_segmenter"]


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes=K, **kwargs).eval()


def _images(b: int = 2, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def _targets(b: int = 2, h: int = H, w: int = W, ignore: int = 255) -> torch.Tensor:
    y = torch.randint(0, K, (b, h, w), generator=torch.Generator().manual_seed(2))
    y[0, :10] = ignore
    y[-1, :, -9:] = ignore
    return y


def test_micro_list_is_the_zoo_minus_the_large_models():
    assert set(list_models("segmentation")) == {*MICRO, "fcn_resnet50", "deeplabv3_resnet50",
                                                 "lraspp_mobilenet_v3_large"}


# ---- forward --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MICRO)
@pytest.mark.parametrize("size", [(61, 83), (97, 75), (64, 64)])
def test_logits_at_input_resolution(name, size):
    model = _model(name)
    with torch.no_grad():
        out = model(_images(2, *size))
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, K, *size)
    assert torch.isfinite(out.logits).all()
    if name == "deeplabv3_resnet_tiny":
        assert out.aux_logits.shape == (2, K, *size)
    else:
        assert out.aux_logits is None


@pytest.mark.parametrize("name", ["deeplabv3_resnet_tiny", "unet_resnet_micro", "fpnseg_resnet_micro"])
def test_forward_is_the_head_output_upsampled_to_the_input(name):
    model = _model(name)
    x = _images()
    with torch.no_grad():
        feats = model.backbone(x)
        if model.neck is not None:
            feats = model.neck(feats)
        expected = F.interpolate(model.head(feats), size=(H, W), mode="bilinear", align_corners=False)
        out = model(x)
    torch.testing.assert_close(out.logits, expected)
    if model.aux_head is not None:
        torch.testing.assert_close(out.aux_logits, F.interpolate(model.aux_head(feats), size=(H, W),
                                                                 mode="bilinear", align_corners=False))


# ---- loss -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, aux_weight", [("deeplabv3_resnet_tiny", 0.5), ("deeplabv3_resnet_tiny", 0.3),
                                              ("unet_resnet_micro", 0.5), ("fpnseg_resnet_micro", 0.5),
                                              ("noop_segmenter", None)])
def test_loss_equals_cross_entropy_plus_weighted_aux(name, aux_weight):
    model = _model(name) if aux_weight is None else _model(name, aux_weight=aux_weight)
    x, y = _images(), _targets()
    with torch.no_grad():
        out = model(x)
        losses = model.loss(x, y)
    ce = F.cross_entropy(out.logits, y, ignore_index=255)  # mean over the non-ignored pixels
    torch.testing.assert_close(losses["ce"], ce)
    expected = ce
    if out.aux_logits is not None:
        aux = F.cross_entropy(out.aux_logits, y, ignore_index=255)
        torch.testing.assert_close(losses["aux"], aux)
        expected = ce + aux_weight * aux
        assert set(losses) == {"loss", "ce", "aux"}
    else:
        assert set(losses) == {"loss", "ce"}
    torch.testing.assert_close(losses["loss"], expected)


def test_loss_with_dice_and_lovasz_terms():
    model = _model("deeplabv3_resnet_tiny", aux_weight=0.4, dice_weight=0.2, lovasz_weight=0.7)
    x, y = _images(), _targets()
    with torch.no_grad():
        out = model(x)
        losses = model.loss(x, y)
    assert set(losses) == {"loss", "ce", "aux", "dice", "lovasz"}
    torch.testing.assert_close(losses["dice"], _dice_reference(out.logits, y, 255))
    torch.testing.assert_close(losses["lovasz"], _lovasz_reference(out.logits, y, 255))
    expected = (F.cross_entropy(out.logits, y, ignore_index=255)
                + 0.4 * F.cross_entropy(out.aux_logits, y, ignore_index=255)
                + 0.2 * losses["dice"] + 0.7 * losses["lovasz"])
    torch.testing.assert_close(losses["loss"], expected)


def test_loss_with_another_ignore_index_and_int32_targets():
    model = _model("unet_resnet_micro", ignore_index=-100)
    x, y = _images(), _targets(ignore=-100)
    with torch.no_grad():
        out = model(x)
        loss = model.loss(x, y.int())["loss"]
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, y, ignore_index=-100))
    with pytest.raises(ValueError, match=r"targets\[0\] holds label 255"):
        model.loss(x, _targets(ignore=255))  # 255 is a bad label once the ignore index is -100


@pytest.mark.parametrize("name", ["deeplabv3_resnet_tiny", "noop_segmenter"])
def test_all_pixels_ignored_gives_zero_loss_and_zero_gradients(name):
    model = _model(name, dice_weight=0.5, lovasz_weight=0.5) if name != "noop_segmenter" else _model(name)
    model.train()
    x = _images()
    y = torch.full((2, H, W), 255, dtype=torch.long)
    losses = model.loss(x, y)
    for key, value in losses.items():
        assert value.item() == 0.0, key
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


# ---- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deeplabv3_resnet_tiny", "noop_segmenter"])
def test_bad_targets_raise(name):
    model = _model(name)
    x = _images()
    with pytest.raises(ValueError, match=r"targets\[0\] has size \(61, 82\)"):
        model.loss(x, torch.zeros(2, H, W - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \(2, 61, 83\)"):
        model.loss(x, torch.zeros(3, H, W, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \(2, 61, 83\)"):
        model.loss(x, torch.zeros(2, 1, H, W, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        model.loss(x, torch.zeros(2, H, W))
    with pytest.raises(ValueError, match="dtype torch.bool"):
        model.loss(x, torch.zeros(2, H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets must be"):
        model.loss(x, [torch.zeros(H, W, dtype=torch.long)] * 2)
    y = _targets()
    y[1, 30, 40] = K  # one bad label in the second image
    with pytest.raises(ValueError, match=rf"targets\[1\] holds label {K}; expected 0 <= label < num_classes={K}"):
        model.loss(x, y)
    y = _targets()
    y[0, 20, 5] = -1
    with pytest.raises(ValueError, match=r"targets\[0\] holds label -1"):
        model.loss(x, y)


def test_constructor_errors():
    backbone = resnet_micro(out_indices=(2, 3))
    head = FCNHead(128, K)
    with pytest.raises(ValueError, match="ignore_index=2 is a class index"):
        Segmenter(backbone, head, ignore_index=2)
    with pytest.raises(ValueError, match="ignore_index=0 is a class index"):
        Segmenter(backbone, head, ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index=3 is a class index"):
        NoopSegmenter(K, ignore_index=3)
    with pytest.raises(ValueError, match="aux_head predicts 3 classes but head 4"):
        Segmenter(backbone, head, aux_head=FCNHead(64, 3, in_index=0))
    with pytest.raises(ValueError, match="aux_weight must be >= 0, got -0.1"):
        Segmenter(backbone, head, aux_weight=-0.1)
    with pytest.raises(ValueError, match="lovasz_weight must be >= 0, got nan"):
        Segmenter(backbone, head, lovasz_weight=float("nan"))
    with pytest.raises(ValueError, match="num_classes attribute"):
        Segmenter(backbone, torch.nn.Conv2d(128, K, 1))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        NoopSegmenter(0)
    for ok in (K, 255, -100):  # just outside [0, K) is fine
        assert Segmenter(backbone, head, ignore_index=ok).ignore_index == ok


# ---- Dice -----------------------------------------------------------------------------------------------

def _dice_reference(logits, labels, ignore_index, eps=1.0):
    """1 - mean over the classes present in the valid labels of (2 sum p*y + eps) / (sum p + sum y + eps),
    sums over the batch's valid pixels (the docstring's definition, segmentation_models.pytorch's DiceLoss)."""
    k = logits.shape[1]
    valid = labels != ignore_index
    p = torch.softmax(logits.double(), dim=1).permute(0, 2, 3, 1)[valid]  # (N, K)
    y = labels[valid]
    scores = []
    for c in range(k):
        if not (y == c).any():
            continue
        yc = (y == c).double()
        scores.append((2 * (p[:, c] * yc).sum() + eps) / (p[:, c].sum() + yc.sum() + eps))
    return (1 - torch.stack(scores).mean()).float()


def _logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp(min=1e-30).log()


def test_dice_perfect_predictions_are_near_zero():
    labels = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[1, 1, 255], [0, 2, 255]]])
    logits = 30.0 * F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    assert dice_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_known_probabilities():
    # three pixels, two classes: p = (0.8, 0.2) label 0; (0.4, 0.6) label 1; (0.5, 0.5) ignored
    probs = torch.tensor([[0.8, 0.4, 0.5], [0.2, 0.6, 0.5]])
    logits = _logits_from_probs(probs)[None, :, None, :]  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    # class 0: (2 * 0.8 + 1) / (1.2 + 1 + 1); class 1: (2 * 0.6 + 1) / (0.8 + 1 + 1)
    expected = 1 - (2.6 / 3.2 + 2.2 / 2.8) / 2
    torch.testing.assert_close(dice_loss(logits, labels), torch.tensor(expected))
    # eps = 0: the plain Dice coefficient
    torch.testing.assert_close(dice_loss(logits, labels, eps=0.0), torch.tensor(1 - (1.6 / 2.2 + 1.2 / 1.8) / 2))
    torch.testing.assert_close(dice_loss(logits, labels), _dice_reference(logits, labels, 255))


def test_dice_absent_class_does_not_count():
    # as test_dice_known_probabilities, plus a third class absent from labels and predictions (p ~ 0)
    probs = torch.tensor([[0.8, 0.4, 0.5], [0.2, 0.6, 0.5], [0.0, 0.0, 0.0]])
    logits = _logits_from_probs(probs)[None, :, None, :]
    labels = torch.tensor([[[0, 1, 255]]])
    torch.testing.assert_close(dice_loss(logits, labels), torch.tensor(1 - (2.6 / 3.2 + 2.2 / 2.8) / 2))
    torch.testing.assert_close(dice_loss(logits, labels, eps=0.0), torch.tensor(1 - (1.6 / 2.2 + 1.2 / 1.8) / 2))


def test_dice_matches_reference_on_random_inputs_with_every_class_present():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, K, 9, 11, generator=g) * 2
    labels = torch.randint(0, K, (2, 9, 11), generator=g)
    labels[0, :3] = 255
    torch.testing.assert_close(dice_loss(logits, labels), _dice_reference(logits, labels, 255))
    torch.testing.assert_close(dice_loss(logits, labels, eps=0.0), _dice_reference(logits, labels, 255, eps=0.0))


# ---- Lovasz-softmax -------------------------------------------------------------------------------------

def _lovasz_reference(logits, labels, ignore_index):
    """Berman et al. 2018, Algorithm 1 (and their lovasz_softmax_flat, classes="present"): per class c over
    the valid pixels, errors m_i = |[y_i = c] - p_i(c)| sorted in decreasing order, the Lovasz gradient
    g_i = J_i - J_{i-1} of the Jaccard loss J_i = 1 - |gt \\ first i| / |gt u first i| over the first i
    sorted pixels, loss_c = <m_sorted, g>; the mean over the classes present in the labels."""
    k = logits.shape[1]
    valid = labels != ignore_index
    p = torch.softmax(logits.double(), dim=1).permute(0, 2, 3, 1)[valid]  # (N, K)
    y = labels[valid]
    per_class = []
    for c in range(k):
        fg = (y == c).double()
        if fg.sum() == 0:
            continue
        errors = (fg - p[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        fg_sorted = fg[perm]
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        grad = jaccard.clone()
        grad[1:] = jaccard[1:] - jaccard[:-1]
        per_class.append(torch.dot(errors_sorted, grad))
    if not per_class:
        return torch.tensor(0.0)
    return torch.stack(per_class).mean().float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_the_papers_algorithm(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 7, 9, generator=g) * 3
    labels = torch.randint(0, 4, (2, 7, 9), generator=g)  # class 4 absent from the labels: not averaged in
    labels[torch.rand(2, 7, 9, generator=g) < 0.2] = 255
    got = lovasz_softmax_loss(logits, labels)
    torch.testing.assert_close(got, _lovasz_reference(logits, labels, 255), atol=1e-6, rtol=1e-5)
    assert got > 0.05


def test_lovasz_zero_for_perfect_predictions_and_for_all_ignored():
    labels = torch.tensor([[[0, 1, 2], [2, 1, 255]]])
    logits = 40.0 * F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    assert lovasz_softmax_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    all_ignored = torch.full_like(labels, 255)
    assert lovasz_softmax_loss(torch.randn(1, 3, 2, 3), all_ignored).item() == 0.0


def test_lovasz_gradient_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(1, 3, 5, 6, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, 3, (1, 5, 6), generator=g)
    labels[0, 0] = 255
    (grad,) = torch.autograd.grad(lovasz_softmax_loss(logits, labels), logits)
    (ref,) = torch.autograd.grad(_lovasz_reference(logits, labels, 255), logits)
    torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-5)


# ---- compile, predict -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MICRO)
def test_compiles_fullgraph_and_agrees_with_eager(name):
    kwargs = {} if name == "noop_segmenter" else {"dice_weight": 0.3, "lovasz_weight": 0.3}
    model = _model(name, **kwargs)
    x, y = _images(), _targets()
    with torch.no_grad():
        eager_out = model(x)
        eager_loss = model.loss(x, y)
        compiled_out = torch.compile(model, backend="eager", fullgraph=True)(x)
        compiled_loss = torch.compile(model.loss, backend="eager", fullgraph=True)(x, y)
    torch.testing.assert_close(compiled_out.logits, eager_out.logits)
    if eager_out.aux_logits is not None:
        torch.testing.assert_close(compiled_out.aux_logits, eager_out.aux_logits)
    assert set(compiled_loss) == set(eager_loss)
    for key in eager_loss:
        torch.testing.assert_close(compiled_loss[key], eager_loss[key])


@pytest.mark.parametrize("name", MICRO)
def test_predict_is_argmax_and_softmax(name):
    model = _model(name)
    if name == "noop_segmenter":
        with torch.no_grad():
            model.logits.copy_(torch.tensor([0.1, -0.5, 0.7, 0.2]))
    x = _images()
    pred = model.predict(x)
    assert isinstance(pred, SegmentationPrediction)
    with torch.no_grad():
        logits = model(x).logits
    assert pred.labels.shape == (2, H, W) and pred.labels.dtype == torch.int64
    assert pred.probs.shape == (2, K, H, W)
    torch.testing.assert_close(pred.probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(pred.probs.sum(dim=1), torch.ones(2, H, W))
    assert torch.equal(pred.labels, logits.argmax(dim=1))
    assert not pred.probs.requires_grad


# ---- NoopSegmenter --------------------------------------------------------------------------------------

def test_noop_segmenter_learns_the_class_prior_and_predicts_the_majority():
    model = NoopSegmenter(K)
    y = torch.zeros(4, 10, 10, dtype=torch.long)
    y[:, :6] = 2  # 60% of each image: the majority class
    y[:, 6:8] = 1
    y[:, 8, :5] = 3
    y[:, 9] = 255  # ignored: left out of the prior
    x = torch.randn(4, 3, 10, 10)
    counts = torch.bincount(y[y != 255], minlength=K).float()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(5):
        opt.zero_grad()
        model.loss(x, y)["loss"].backward()
        opt.step()
    pred = model.predict(torch.randn(2, 3, 7, 9))
    assert (pred.labels == 2).all()  # the majority class everywhere, whatever the image
    for _ in range(300):  # to convergence: the cross-entropy minimiser is the empirical pixel class prior
        opt.zero_grad()
        model.loss(x, y)["loss"].backward()
        opt.step()
    torch.testing.assert_close(torch.softmax(model.logits.detach(), 0), counts / counts.sum(), atol=1e-3, rtol=0)
    assert (model.predict(torch.randn(1, 3, 5, 5)).labels == 2).all()
