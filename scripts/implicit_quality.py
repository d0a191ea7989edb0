"""Quality figures of cvzoo.implicit on one CPU thread.

1. SIREN (256 x 3 hidden, omega_0 30) fitting the 128 px scikit-image astronaut, full-batch Adam lr 1e-3 with a
   cosine schedule through cvzoo.train.Trainer, for several step budgets (steps, seconds, PSNR), against
   ReLU MLPs of the same size with NeRF positional encoding, Gaussian Fourier features, and raw coordinates.
2. A tiny NeRF trained on the synthetic sphere scene (24 views of 32 px, 4 held out): held-out PSNR against
   the mean-training-colour baseline and the same NeRF at initialisation.

    .venv/bin/python scripts/implicit_quality.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from cvzoo.data.photos import sample_photos
from cvzoo.implicit import (
    SIREN,
    CoordinateMLP,
    FourierFeatures,
    ImplicitImage,
    PositionalEncoding,
    evaluate_views,
    fit_image,
    mean_colour_psnr,
    nerf_tiny,
    psnr,
    sphere_scene_dataset,
    train_nerf,
)


def image_fits(size: int, budgets: list[int], compare_steps: int) -> None:
    image = sample_photos("astronaut", size=size)["astronaut"]
    mean = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    print(f"astronaut {size} px: mean-colour baseline {float(psnr(mean, image)):.2f} dB")
    torch.manual_seed(0)
    print(f"  SIREN at init: {float(psnr(ImplicitImage(SIREN(), size, size).render(), image)):.2f} dB")
    for steps in budgets:
        torch.manual_seed(0)
        r = fit_image(image, SIREN(), steps=steps, lr=1e-3)
        print(f"  SIREN 256x3            {r.steps:4d} steps {r.seconds:6.1f} s  {r.psnr:6.2f} dB", flush=True)
    others = {
        "ReLU + PosEnc(10)": lambda: CoordinateMLP(2, 256, 3, 3, encoding=PositionalEncoding(10, in_features=2)),
        "ReLU + Fourier(256, 5)": lambda: CoordinateMLP(2, 256, 3, 3, encoding=FourierFeatures(2, 256, 5.0)),
        "ReLU, raw (x, y)": lambda: CoordinateMLP(2, 256, 3, 3),
    }
    for name, build in others.items():
        torch.manual_seed(0)
        r = fit_image(image, build(), steps=compare_steps, lr=1e-3)
        print(f"  {name:<22} {r.steps:4d} steps {r.seconds:6.1f} s  {r.psnr:6.2f} dB", flush=True)


def nerf(views: int, size: int, test_views: int, steps: int) -> None:
    train, test = sphere_scene_dataset(views, size, size).split(test_views)
    print(f"sphere scene: {len(train.images)} training / {len(test.images)} held-out views of {size} px")
    torch.manual_seed(0)
    model = nerf_tiny(near=train.near, far=train.far)
    print(f"  mean training colour baseline: {mean_colour_psnr(train, test):.2f} dB")
    print(f"  tiny NeRF at init:             {evaluate_views(model, test)['psnr']:.2f} dB")
    start = time.perf_counter()
    train_nerf(model, train, steps=steps, batch_rays=512, lr=1e-3)
    seconds = time.perf_counter() - start
    held_out, seen = evaluate_views(model, test)["psnr"], evaluate_views(model, train)["psnr"]
    print(f"  tiny NeRF, {steps} steps of 512 rays, {seconds:.1f} s: held-out {held_out:.2f} dB "
          f"(training views {seen:.2f} dB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    if args.quick:
        image_fits(64, [50], 50)
        nerf(12, 16, 2, 100)
    else:
        image_fits(128, [25, 50, 100], 100)
        nerf(24, 32, 4, 1500)


if __name__ == "__main__":
    main()
