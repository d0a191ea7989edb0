"""cvzoo's CAMs against pytorch-grad-cam (test-only reference) on the same model, layers and targets.

What is compared: the final (B, H, W) maps. Both pipelines apply ReLU, per-image min-max scaling
(`scale_cam_image`), a bilinear resize to the input size, the mean over layers and a second scaling;
pytorch-grad-cam resizes with cv2.resize (INTER_LINEAR), cvzoo with F.interpolate(align_corners=False),
which agree to ~1e-6 on float32 maps (checked below), so the maps are compared after resizing, within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.explain import ClassifierTarget, EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM

pgc = pytest.importorskip("pytorch_grad_cam")
cv2 = pytest.importorskip("cv2")
torchvision = pytest.importorskip("torchvision")

from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction  # noqa: E402

TOL = 1e-4
METHODS = {  # cvzoo class -> pytorch-grad-cam class
    GradCAM: pgc.GradCAM,
    GradCAMPlusPlus: pgc.GradCAMPlusPlus,
    LayerCAM: pgc.LayerCAM,
    XGradCAM: pgc.XGradCAM,
}


class SmallNet(nn.Module):
    """conv stack -> global average pool -> linear; returns plain (B, 5) logits, as pytorch-grad-cam expects."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _small():
    torch.manual_seed(0)
    model = SmallNet().eval()
    return model, {"single": ["features.5"], "multi": ["features.3", "features.5"]}


def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # random weights
    return model, {"single": ["layer4"], "multi": ["layer3", "layer4"]}


MODELS = {"small": _small, "resnet18": _resnet18}


@pytest.fixture(scope="module")
def built():
    return {name: make() for name, make in MODELS.items()}


def _images(h: int = 64, w: int = 80) -> torch.Tensor:
    return torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_cv2_bilinear_resize_matches_interpolate():
    """The premise of comparing after resizing: cv2's INTER_LINEAR == F.interpolate(align_corners=False)."""
    g = torch.Generator().manual_seed(0)
    for h, w, out_h, out_w in [(4, 5, 64, 80), (7, 7, 30, 31), (16, 16, 12, 20)]:
        m = torch.rand(h, w, generator=g)
        ours = F.interpolate(m[None, None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0, 0]
        ref = cv2.resize(m.numpy(), (out_w, out_h))
        assert np.abs(ours.numpy() - ref).max() < 1e-5


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("layers", ["single", "multi"])
@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m.__name__)
def test_gradient_methods_match_pytorch_grad_cam(built, model_name, layers, method):
    model, layer_sets = built[model_name]
    names = layer_sets[layers]
    images = _images()
    classes = [3, 0, 4]
    ours = method(model, target_layers=names)(images, [ClassifierTarget(c) for c in classes])
    ref_cam = METHODS[method](model, target_layers=[model.get_submodule(n) for n in names])
    ref = ref_cam(images, [ClassifierOutputTarget(c) for c in classes])
    ref_cam.activations_and_grads.release()
    model.zero_grad(set_to_none=True)  # the reference backpropagates into the parameters
    assert ours.shape == (3, 64, 80) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).max() < TOL
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    assert (ours.amax(dim=(1, 2)) > 0.99).all()  # non-degenerate maps: the comparison is not of zeros


@pytest.mark.parametrize("model_name", list(MODELS))
def test_default_target_is_the_top_class_as_in_pytorch_grad_cam(built, model_name):
    model, layer_sets = built[model_name]
    images = _images()
    ours = GradCAM(model, target_layers=layer_sets["single"])(images)
    ref_cam = pgc.GradCAM(model, target_layers=[model.get_submodule(n) for n in layer_sets["single"]])
    ref = ref_cam(images, None)  # None: argmax of the output per image
    ref_cam.activations_and_grads.release()
    model.zero_grad(set_to_none=True)
    assert np.abs(ours.numpy() - ref).max() < TOL


def test_score_cam_matches_pytorch_grad_cam(built):
    model, layer_sets = built["small"]
    images = _images(32, 40)
    classes = [1, 2, 4]
    ours = ScoreCAM(model, target_layers=layer_sets["single"], batch_size=10)(images, [ClassifierTarget(c)
                                                                                     for c in classes])
    ref_cam = pgc.ScoreCAM(model, target_layers=[model.get_submodule(layer_sets["single"][0])])
    ref_cam.batch_size = 7  # chunking must not matter (batch norm in eval mode)
    ref = ref_cam(images, [ClassifierOutputTarget(c) for c in classes])
    ref_cam.activations_and_grads.release()
    assert np.abs(ours.numpy() - ref).max() < TOL


@pytest.mark.parametrize("model_name", list(MODELS))
def test_eigen_cam_matches_the_sign_corrected_projection(built, model_name):
    """pytorch-grad-cam's own EigenCAM keeps LAPACK's arbitrary sign; cvzoo fixes it as its
    get_2d_projection_with_sign_correction does, so the reference is that projection run through
    pytorch-grad-cam's own pipeline (ReLU, scale_cam_image with the cv2 resize, second scale)."""
    model, layer_sets = built[model_name]
    layer = model.get_submodule(layer_sets["single"][0])
    images = _images()
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    proj = get_2d_projection_with_sign_correction(acts[0].numpy())
    ref = scale_cam_image(scale_cam_image(np.maximum(proj, 0), (images.shape[-1], images.shape[-2])))
    ours = EigenCAM(model, target_layers=layer_sets["single"])(images)
    assert np.abs(ours.numpy() - ref).max() < TOL
