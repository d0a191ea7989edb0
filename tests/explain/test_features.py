"""cvzoo.explain.features and .param: lucid-style feature visualisation.

References: numpy's FFT and hand-written cosines for the Fourier image, lucid's published colour matrix (and the
normalised transpose MACO/Horama publish) for decorrelation, kornia's total variation, the closed-form optimum
of a linear logit under an L2 penalty, and exact integer shifts for the jitter.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.explain.features import (
    Objective,
    RandomTransforms,
    capture,
    channel,
    class_logit,
    l2_penalty,
    neuron,
    resolve_layer,
    save_png,
    total_variation,
    visualize,
)
from cvzoo.explain.param import (
    FourierImage,
    PixelImage,
    color_correlation_normalized,
    decorrelate_colors,
    fft_scale,
)
from cvzoo.types import Signature

REPO = Path(__file__).resolve().parents[2]
LUCID_SVD_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])  # lucid color.py


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ parameterisations


@pytest.mark.parametrize(("h", "w", "decay"), [(6, 8, 1.0), (5, 7, 1.0), (9, 4, 2.0), (8, 8, 0.0)])
def test_fft_scale_matches_the_formula(h, w, decay):
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    expected = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / max(h, w)) ** decay
    got = fft_scale(h, w, decay)
    assert got.shape == (h, w // 2 + 1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(("h", "w"), [(6, 8), (5, 7)])
def test_fourier_image_is_numpy_irfft2_of_the_scaled_spectrum(h, w):
    image = FourierImage((h, w), batch=2, decay_power=1.5, decorrelate=False, sd=1.0)
    spec = image.spectrum.detach().double().numpy()
    spec = spec[..., 0] + 1j * spec[..., 1]
    scale = 1.0 / np.maximum(np.hypot(np.fft.rfftfreq(w)[None], np.fft.fftfreq(h)[:, None]), 1 / max(h, w)) ** 1.5
    expected = np.fft.irfft2(spec * scale, s=(h, w), norm="ortho") / 4
    np.testing.assert_allclose(image.spatial().detach().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(image().detach().numpy(), 1 / (1 + np.exp(-expected)), atol=1e-6)


def test_one_fourier_coefficient_gives_a_cosine_of_the_scaled_amplitude():
    h, w, ky, kx = 8, 12, 1, 2
    image = FourierImage((h, w), decorrelate=False)
    with torch.no_grad():
        image.spectrum.zero_()
        image.spectrum[0, 0, ky, kx, 0] = 1.0
    amplitude = 1.0 / math.hypot(ky / h, kx / w)  # decay_power 1
    y, x = np.mgrid[0:h, 0:w]
    # a half-spectrum bin stands for itself and its conjugate twin: 2 cos(...) / sqrt(HW) with norm="ortho"
    expected = 2 * amplitude * np.cos(2 * np.pi * (ky * y / h + kx * x / w)) / math.sqrt(h * w) / 4
    got = image.spatial().detach()
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-6)
    assert got[0, 1:].abs().max() == 0


@pytest.mark.parametrize("decorrelate", [True, False])
def test_zero_spectrum_gives_a_constant_grey_image(decorrelate):
    image = FourierImage(10, batch=2, decorrelate=decorrelate)
    with torch.no_grad():
        image.spectrum.zero_()
    assert torch.equal(image(), torch.full((2, 3, 10, 10), 0.5))


def test_dc_coefficient_gives_a_constant_colour():
    h, w = 6, 10
    image = FourierImage((h, w))
    c = torch.tensor([0.3, -0.2, 0.1])
    with torch.no_grad():
        image.spectrum.zero_()
        image.spectrum[0, :, 0, 0, 0] = c
    raw = c.double().numpy() * max(h, w) / math.sqrt(h * w) / 4  # scale at f = 0 is max(H, W)
    colour = 1 / (1 + np.exp(-(LUCID_SVD_SQRT / np.linalg.norm(LUCID_SVD_SQRT, axis=0).max()) @ raw))
    got = image().detach()
    np.testing.assert_allclose(got[0].numpy(), np.broadcast_to(colour[:, None, None], (3, h, w)), atol=1e-6)


def test_pixel_image_maps_every_colour_through_the_matrix_and_a_sigmoid():
    image = PixelImage((4, 5), batch=2, sd=1.0)
    d = LUCID_SVD_SQRT / np.linalg.norm(LUCID_SVD_SQRT, axis=0).max()
    pixels = image.pixels.detach().double().numpy()
    expected = 1 / (1 + np.exp(-np.einsum("ij,bjhw->bihw", d, pixels)))
    np.testing.assert_allclose(image().detach().numpy(), expected, atol=1e-6)
    plain = PixelImage(4, channels=1, decorrelate=False)
    assert torch.equal(plain(), torch.sigmoid(plain.pixels))


def test_decorrelation_matrix_is_lucids_colour_covariance_square_root():
    d = color_correlation_normalized(torch.float64).numpy()
    max_norm = np.linalg.norm(LUCID_SVD_SQRT, axis=0).max()
    covariance = LUCID_SVD_SQRT @ LUCID_SVD_SQRT.T  # lucid's ImageNet colour correlation (it ships the root)
    np.testing.assert_allclose(d @ d.T, covariance / max_norm**2, atol=1e-12)
    # MACO / Horama publish the same normalised matrix, transposed
    horama = np.array([[0.56282854, 0.58447580, 0.58447580], [0.19482528, 0.0, -0.19482528],
                       [0.04329450, -0.10823626, 0.06494176]])
    np.testing.assert_allclose(d.T, horama, atol=1e-7)
    # an SVD square root U sqrt(S): orthogonal columns (to lucid's two decimals), eigenvalues = column norms^2
    gram = LUCID_SVD_SQRT.T @ LUCID_SVD_SQRT
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-3
    np.testing.assert_allclose(np.linalg.eigvalsh(covariance), np.sort(np.diag(gram)), atol=1e-3)
    assert np.linalg.norm(d, axis=0).max() == pytest.approx(1.0)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = np.einsum("ij,bjhw->bihw", d, t.numpy())
    np.testing.assert_allclose(decorrelate_colors(t).numpy(), expected, atol=1e-12)


def test_parameterisations_reject_bad_arguments():
    for kwargs, name in [({"size": 0}, "size"), ({"size": (4, 0)}, "size"), ({"size": 4, "batch": 0}, "batch"),
                         ({"size": 4, "decay_power": -1.0}, "decay_power"), ({"size": 4, "sd": 0.0}, "sd"),
                         ({"size": 4, "channels": 1}, "decorrelate")]:
        with pytest.raises(ValueError, match=name):
            FourierImage(**kwargs)
    with pytest.raises(ValueError, match="channels"):
        PixelImage(4, channels=0, decorrelate=False)
    with pytest.raises(ValueError, match="3, H, W"):
        decorrelate_colors(torch.zeros(1, 4, 2, 2))


# ------------------------------------------------------------------------------------------------------ objectives


def test_objectives_compose_like_lucids():
    acts = {"a": torch.randn(2, 4, 5, 6), "b": torch.randn(2, 3, 7, 8)}
    ch = channel("a", 1)
    nn_ = neuron("b", 2)
    ch_ref = acts["a"][:, 1].mean(dim=(1, 2))
    nn_ref = acts["b"][:, 2, 3, 4]  # the centre: y = 7 // 2, x = 8 // 2
    torch.testing.assert_close(ch(acts), ch_ref)
    torch.testing.assert_close(nn_(acts), nn_ref)
    torch.testing.assert_close((ch + 2 * nn_)(acts), ch_ref + 2 * nn_ref)
    torch.testing.assert_close((0.5 * ch - nn_ / 4)(acts), 0.5 * ch_ref - nn_ref / 4)
    torch.testing.assert_close((-ch + 1)(acts), 1 - ch_ref)
    torch.testing.assert_close((3 - ch)(acts), 3 - ch_ref)
    torch.testing.assert_close((ch * nn_)(acts), ch_ref * nn_ref)
    torch.testing.assert_close(sum([ch, nn_, ch])(acts), 2 * ch_ref + nn_ref)
    assert (ch + nn_ + ch).layers == ("a", "b")
    total = Objective(lambda a: a["a"].sum(dim=(1, 2, 3)), ["a"], "sum of a")  # a hand-made objective
    torch.testing.assert_close((total - ch)(acts), acts["a"].sum(dim=(1, 2, 3)) - ch_ref)
    with pytest.raises(TypeError):
        ch + "b"


def test_neuron_position_channel_of_a_linear_layer_and_logits_outputs():
    acts = {"a": torch.randn(2, 4, 5, 6), "fc": torch.randn(2, 7)}
    torch.testing.assert_close(neuron("a", 3, x=5, y=0)(acts), acts["a"][:, 3, 0, 5])
    torch.testing.assert_close(channel("fc", 6)(acts), acts["fc"][:, 6])

    class Out(NamedTuple):
        logits: torch.Tensor

    logits = torch.randn(2, 5)
    for out in (logits, Out(logits), {"logits": logits}):
        torch.testing.assert_close(class_logit(4)({"": out}), logits[:, 4])
    with pytest.raises(ValueError, match="logits"):
        class_logit(0)({"": (logits,)})
    with pytest.raises(ValueError, match="index 9"):
        channel("a", 9)(acts)
    with pytest.raises(ValueError, match="x=6"):
        neuron("a", 0, x=6)(acts)
    with pytest.raises(ValueError, match="index 5"):
        class_logit(5)({"": logits})


def test_objectives_reject_bad_arguments():
    for make, name in [(lambda: channel("a", -1), "index"), (lambda: channel(3, 0), "layer"),
                       (lambda: neuron("a", 0, x=-1), "x"), (lambda: neuron("a", 0, y=1.5), "y"),
                       (lambda: class_logit(True), "index")]:
        with pytest.raises(ValueError, match=name):
            make()


def test_layers_resolve_by_path_or_module_and_unknown_paths_list_close_names():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.add_module("classifier", nn.Linear(4, 2))
    assert resolve_layer(model, "features.0") is model.features[0]
    assert resolve_layer(model, "") is model
    assert resolve_layer(model, model.classifier) is model.classifier
    with pytest.raises(ValueError, match=r"'featurs\.0'.*did you mean \['features\.0'"):
        resolve_layer(model, "featurs.0")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="layer"):
        resolve_layer(model, 0)


def test_capture_and_evaluate_remove_their_hooks_also_on_error():
    model = tiny_convnet()
    x = torch.rand(2, 3, 8, 8)
    with capture(model, ["0", model[2]]) as acts:
        model(x)
    torch.testing.assert_close(acts["0"], model[0](x))
    assert acts[model[2]].shape == (2, 8, 8, 8)
    assert no_hooks(model)
    value = channel("1", 3).evaluate(model, x)
    torch.testing.assert_close(value, F.relu(model[0](x))[:, 3].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="index 8"):
        channel("1", 8).evaluate(model, x)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="did you mean"), capture(model, ["0", "11"]):
        pass
    assert no_hooks(model)  # "0" was not hooked: every layer is resolved first


# ---------------------------------------------------------------------------------------------------- regularisers


def test_total_variation_closed_forms_and_kornia():
    assert torch.equal(total_variation(torch.full((2, 3, 5, 7), 0.3)), torch.zeros(2))
    c, h, w, a, b = 3, 6, 9, 0.2, 0.9
    step = torch.full((1, c, h, w), a)
    step[..., 4:] = b  # one vertical edge: H |a - b| per channel among C H (W - 1) horizontal differences
    assert total_variation(step).item() == pytest.approx(abs(a - b) / (w - 1))
    step_t = step.transpose(-1, -2)  # the same edge, horizontal
    assert total_variation(step_t).item() == pytest.approx(abs(a - b) / (w - 1))
    kornia = pytest.importorskip("kornia")
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)  # square: both difference counts are C H (H - 1)
    expected = kornia.losses.total_variation(x, reduction="sum").sum(1) / (3 * 8 * 7)  # (B, C) sums
    torch.testing.assert_close(total_variation(x), expected)
    assert torch.isfinite(total_variation(torch.rand(2, 3, 1, 5))).all()


def test_l2_penalty_is_mean_squared_distance_from_grey():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25]).view(1, 1, 2, 2)
    assert l2_penalty(x).item() == pytest.approx((0.25 + 0.25 + 0 + 0.0625) / 4)


# ------------------------------------------------------------------------------------------------------ transforms


def test_transforms_without_randomness_are_the_identity():
    x = torch.rand(3, 3, 10, 12)
    t = RandomTransforms(jitter=0, scale=(1.0, 1.0), degrees=0.0, jitter_after=0)
    torch.testing.assert_close(t(x), x, atol=1e-5, rtol=0)


def test_jitter_is_an_exact_integer_shift_per_image():
    pytest.importorskip("kornia")
    b, h, w, p, j = 6, 9, 11, 5, 3
    x = torch.rand(b, 3, h, w)
    t = RandomTransforms(pad=p, pad_value=0.5, jitter=j, scale=(1.0, 1.0), degrees=0.0, jitter_after=0)
    out = t(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (p, p, p, p), value=0.5)
    shifts = set()
    for i in range(b):
        found = [(dy, dx) for dy in range(-j, j + 1) for dx in range(-j, j + 1)
                 if torch.allclose(out[i], padded[i, :, p - dy : p - dy + h, p - dx : p - dx + w], atol=1e-5)]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 1  # each image of the batch gets its own shift


def test_sampled_maps_are_a_bounded_rotation_and_scale_about_the_centre():
    t = RandomTransforms(jitter=0, scale=(0.8, 1.2), degrees=15.0, jitter_after=0)
    m = t.sample_matrices(64, 20, 30, torch.Generator().manual_seed(0))  # (B, 2, 3)
    centre = torch.tensor([14.5, 9.5], dtype=m.dtype)
    torch.testing.assert_close(m[:, :, :2] @ centre + m[:, :, 2], centre.expand(64, 2))  # the centre stays
    a = m[:, :, :2]
    s = torch.sqrt(torch.det(a))
    torch.testing.assert_close(a @ a.transpose(1, 2), (s**2)[:, None, None] * torch.eye(2, dtype=m.dtype))
    assert s.min() >= 0.8 and s.max() <= 1.2 and s.max() - s.min() > 0.2
    angle = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0])).abs()
    assert angle.max() <= 15.0 + 1e-9 and angle.max() > 10.0
    grey = torch.full((4, 3, 16, 16), 0.5)  # a grey image padded with grey stays grey under any map
    torch.testing.assert_close(RandomTransforms()(grey), grey)


def test_transforms_reject_bad_arguments():
    for kwargs, name in [({"pad": -1}, "pad"), ({"jitter": 1.5}, "jitter"), ({"scale": (1.2, 0.9)}, "scale"),
                         ({"scale": (0.0, 1.0)}, "scale"), ({"degrees": -5.0}, "degrees")]:
        with pytest.raises(ValueError, match=name):
            RandomTransforms(**kwargs)


# ---------------------------------------------------------------------------------------------------- visualize


def test_optimisation_raises_the_channel_far_above_noise_and_the_start():
    torch.manual_seed(0)  # random channels differ in how far they can be driven; this one reaches ~0.43
    model = tiny_convnet()
    model.signature = Signature(mean=(0.5,) * 3, std=(0.25,) * 3)
    objective = channel("2", 2)  # the second conv, before its ReLU
    start = visualize(model, objective, size=32, steps=0)
    images = visualize(model, objective, size=32, steps=128)
    value = lambda x: objective.evaluate(model, model.signature.normalize(x))  # noqa: E731
    noise = value(torch.rand(16, 3, 32, 32)).mean()
    assert images.shape == (1, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert noise > 0
    assert value(images) > 2 * noise
    assert value(images) > value(start) + 0.2


@pytest.mark.parametrize(("param", "decorrelate", "atol"), [("pixel", False, 2e-3), ("pixel", True, 0.12),
                                                        ("fourier", True, 0.12)])
def test_linear_logit_with_l2_penalty_converges_to_the_weight_pattern(param, decorrelate, atol):
    # logit = w . x + b minus l2 * mean((x - 0.5)^2) is maximised at x = 0.5 + N w / (2 l2): the weight pattern
    n = 3 * 12 * 12
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, 3))
    w = model[1].weight.detach()[1]
    l2 = n * w.abs().max().item() / 0.6  # the optimum stays within [0.2, 0.8], reachable through the sigmoid
    images = visualize(model, class_logit(1), size=12, steps=300, param=param, decorrelate=decorrelate,
                       transforms=False, l2_weight=l2)
    direction = (images - 0.5).flatten()
    assert F.cosine_similarity(direction, w, dim=0) > 0.95
    # decorrelated colours converge last along the weakest colour direction (singular value 0.13 of 1)
    torch.testing.assert_close(images.flatten(), 0.5 + n * w / (2 * l2), atol=atol, rtol=0)


def test_model_state_is_restored_and_no_hooks_or_grads_are_left():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    model[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    visualize(model, channel("1", 0), size=16, steps=3, normalize=lambda x: x)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: BatchNorm statistics untouched too
    assert no_hooks(model)
    with pytest.raises(ValueError, match="index 4"):  # an objective failing mid-run restores everything too
        visualize(model, channel("1", 4), size=16, steps=3)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert model[0].weight.requires_grad and no_hooks(model)


def test_images_are_normalised_with_the_signature_or_the_argument():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.conv(x)

    model = Recorder()
    model.signature = Signature(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    start = visualize(model, channel("conv", 0), size=8, steps=0)
    visualize(model, channel("conv", 0), size=8, steps=1, transforms=False)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(seen[-1], (start - mean) / std)
    visualize(model, channel("conv", 0), size=8, steps=1, transforms=False, normalize=lambda x: 2 * x)
    torch.testing.assert_close(seen[-1], 2 * start)  # an explicit argument wins over the signature


def test_determinism_under_a_seed_and_custom_transforms():
    model = tiny_convnet()
    run = lambda seed, **kw: visualize(model, neuron("2", 1), size=16, steps=8, batch=2, seed=seed, **kw)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # a batch is several different images
    calls = []
    visualize(model, neuron("2", 1), size=16, steps=2, transforms=lambda x: calls.append(x.shape) or x.flip(-1))
    assert calls == [(1, 3, 16, 16)] * 2


def test_a_grayscale_model_gets_grayscale_images_without_colour_decorrelation():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    model.signature = Signature(in_channels=1)
    images = visualize(model, channel("1", 0), size=(12, 10), steps=3)
    assert images.shape == (1, 1, 12, 10)


@pytest.mark.cuda
def test_visualize_on_cuda_matches_the_cpu():
    model = tiny_convnet()
    cpu = visualize(model, channel("2", 2), size=16, steps=10)
    gpu = visualize(model.cuda(), channel("2", 2), size=16, steps=10)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)


def test_visualize_rejects_bad_arguments():
    model = tiny_convnet()
    obj = channel("0", 0)
    for kwargs, name in [({"size": 0}, "size"), ({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"),
                         ({"param": "wavelet"}, "param"), ({"tv_weight": -1.0}, "tv_weight"),
                         ({"l2_weight": float("nan")}, "l2_weight"), ({"transforms": "yes"}, "transforms"),
                         ({"batch": 0}, "batch"), ({"normalize": 3}, "normalize"), ({"seed": 0.5}, "seed")]:
        with pytest.raises(ValueError, match=name):
            visualize(model, obj, **{"steps": 1, **kwargs})
    with pytest.raises(ValueError, match="objective"):
        visualize(model, lambda acts: acts["0"].mean())
    with pytest.raises(ValueError, match="model"):
        visualize(lambda x: x, obj)
    with pytest.raises(ValueError, match=r"'4' is not a submodule.*known layers include \['0', '1', '2', '3'\]"):
        visualize(model, channel("4", 0), steps=1)
    assert no_hooks(model)


def test_tv_weight_smooths_and_a_given_parameterisation_is_optimised_in_place():
    model = tiny_convnet()
    obj = channel("2", 2)
    rough = visualize(model, obj, size=16, steps=40, param="pixel", transforms=False)
    smooth = visualize(model, obj, size=16, steps=40, param="pixel", transforms=False, tv_weight=50.0)
    assert total_variation(smooth) < 0.5 * total_variation(rough)
    image = PixelImage(16)
    start = image().detach()
    out = visualize(model, obj, param=image, steps=5, transforms=False)
    assert not torch.equal(image().detach(), start)
    torch.testing.assert_close(out, image().detach())


# ---------------------------------------------------------------------------------------------------- PNG, imports


def test_save_png_writes_a_readable_image(tmp_path):
    from PIL import Image

    x = torch.rand(1, 3, 10, 14)
    path = save_png(x, tmp_path / "sub" / "one.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (14, 10) and img.mode == "RGB"
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert torch.equal(pixels, (x[0] * 255).round().to(torch.uint8))
    path = save_png(torch.rand(3, 3, 10, 14), tmp_path / "grid.png", nrow=2)
    with Image.open(path) as img:  # torchvision's grid: 2 per row, 2-pixel padding
        assert img.size == (2 * (14 + 2) + 2, 2 * (10 + 2) + 2)
    with pytest.raises(ValueError, match="images"):
        save_png(torch.rand(10, 14), tmp_path / "bad.png")


def test_importing_feature_visualisation_does_not_import_kornia():
    probe = "import sys, cvzoo.explain.features, cvzoo.explain.param; print('kornia' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
