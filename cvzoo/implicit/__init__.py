"""Neural implicit models: SIREN, Fourier-feature / positional encodings, single-image fitting, a tiny NeRF.

```python
from cvzoo.data.photos import sample_photos
from cvzoo.implicit import SIREN, fit_image, sphere_scene_dataset, nerf_tiny, train_nerf, evaluate_views

result = fit_image(sample_photos("astronaut", size=128)["astronaut"], SIREN(), steps=300)  # result.psnr in dB
train, test = sphere_scene_dataset(num_views=24, height=32, width=32).split(4)
model = nerf_tiny(near=train.near, far=train.far)
train_nerf(model, train, steps=1000)
evaluate_views(model, test)["psnr"]
```
"""

from __future__ import annotations

from cvzoo.implicit.encodings import CoordinateMLP, FourierFeatures, PositionalEncoding
from cvzoo.implicit.image_fit import FitResult, ImplicitImage, coordinate_grid, fit_image, psnr
from cvzoo.implicit.nerf import (
    NeRFMLP,
    NeRFOutput,
    RayBatches,
    RenderedImage,
    TinyNeRF,
    evaluate_views,
    mean_colour_psnr,
    train_nerf,
)
from cvzoo.implicit.rendering import (
    RenderOutput,
    get_rays,
    sample_hierarchical,
    sample_pdf,
    sample_stratified,
    volume_render,
)
from cvzoo.implicit.scene import (
    DEFAULT_SPHERES,
    SceneViews,
    hemisphere_poses,
    look_at,
    render_spheres,
    sphere_scene_dataset,
)
from cvzoo.implicit.siren import SIREN, SineLayer, siren_weight_bound


def siren_image(height: int = 128, width: int = 128, **kwargs) -> ImplicitImage:
    """SIREN image fit (coordinates -> RGB): 256 wide, 3 hidden sine layers, omega_0 30 (the paper's)."""
    return ImplicitImage(SIREN(2, **{"hidden_features": 256, "hidden_layers": 3, "out_features": 3, **kwargs}),
                         height, width)


def nerf_tiny(**kwargs) -> TinyNeRF:
    """Tiny NeRF: coarse + fine 4-layer 64-wide ReLU MLPs, 32 + 32 samples per ray, view-independent colour."""
    mlp = {"pos_frequencies": 4, "dir_frequencies": None, "hidden_features": 64, "hidden_layers": 3, "skip": None}
    mlp.update({k: kwargs.pop(k) for k in list(mlp) if k in kwargs})
    return TinyNeRF(NeRFMLP(**mlp), NeRFMLP(**mlp), **{"num_coarse": 32, "num_fine": 32, **kwargs})


__all__ = [
    "DEFAULT_SPHERES",
    "SIREN",
    "CoordinateMLP",
    "FitResult",
    "FourierFeatures",
    "ImplicitImage",
    "NeRFMLP",
    "NeRFOutput",
    "PositionalEncoding",
    "RayBatches",
    "RenderOutput",
    "RenderedImage",
    "SceneViews",
    "SineLayer",
    "TinyNeRF",
    "coordinate_grid",
    "evaluate_views",
    "fit_image",
    "get_rays",
    "hemisphere_poses",
    "look_at",
    "mean_colour_psnr",
    "nerf_tiny",
    "psnr",
    "render_spheres",
    "sample_hierarchical",
    "sample_pdf",
    "sample_stratified",
    "siren_image",
    "siren_weight_bound",
    "sphere_scene_dataset",
    "train_nerf",
    "volume_render",
]
