"""`cvzoo implicit`: fit a SIREN to a sample photo, or train a tiny NeRF on the synthetic sphere scene.

    cvzoo implicit fit-image [--photo astronaut] [--size 128] [--steps 100] [--out DIR]
    cvzoo implicit nerf [--views 24] [--size 32] [--steps 1500] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def cmd_fit_image(args: argparse.Namespace) -> int:
    """Fits `SIREN(2, hidden, layers, 3)` to the photo; writes fit.png (target | fit) and model.safetensors."""
    from cvzoo.data.photos import sample_photos
    from cvzoo.implicit.image_fit import fit_image
    from cvzoo.implicit.siren import SIREN
    from cvzoo.train import export_safetensors
    from cvzoo.visualize import make_grid_image, save_image_png

    for name in ("size", "steps", "hidden"):
        _check_positive(f"--{name}", getattr(args, name))
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    out = Path(args.out or f"runs/implicit-fit-{args.photo}-{args.size}")
    image = sample_photos(args.photo, size=args.size)[args.photo]
    torch.manual_seed(args.seed)
    network = SIREN(2, args.hidden, args.layers, 3)
    print(f"cvzoo implicit fit-image: SIREN {args.hidden} x {args.layers} on {args.photo} at {args.size} px, "
          f"{args.steps} steps")
    result = fit_image(image, network, steps=args.steps, lr=args.lr, device=args.device, progress=args.progress)
    save_image_png(make_grid_image([image, result.model.render().cpu()], nrow=2), out / "fit.png")
    export_safetensors(result.model, out / "model.safetensors")
    print(f"PSNR {result.psnr:.2f} dB after {result.steps} steps in {result.seconds:.1f} s")
    print(f"  {out / 'fit.png'}\n  {out / 'model.safetensors'}")
    return 0


def cmd_nerf(args: argparse.Namespace) -> int:
    """Trains `nerf_tiny` on the sphere scene; prints the held-out PSNR against the mean-colour baseline and
    writes held_out.png (renders over ground truth) and model.safetensors."""
    from cvzoo.implicit import nerf_tiny
    from cvzoo.implicit.nerf import evaluate_views, mean_colour_psnr, train_nerf
    from cvzoo.implicit.scene import sphere_scene_dataset
    from cvzoo.train import export_safetensors
    from cvzoo.visualize import make_grid_image, save_image_png

    for name in ("views", "size", "steps", "test_views", "batch_rays", "hidden"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.test_views >= args.views:
        raise ValueError(f"--test-views must be < --views={args.views}, got {args.test_views}")
    out = Path(args.out or f"runs/implicit-nerf-{args.views}x{args.size}")
    train, test = sphere_scene_dataset(args.views, args.size, args.size).split(args.test_views)
    torch.manual_seed(args.seed)
    model = nerf_tiny(hidden_features=args.hidden, near=train.near, far=train.far)
    print(f"cvzoo implicit nerf: {len(train.images)} training and {len(test.images)} held-out views of "
          f"{args.size} px, {args.steps} steps of {args.batch_rays} rays")
    start = time.perf_counter()
    train_nerf(model, train, steps=args.steps, batch_rays=args.batch_rays, lr=args.lr, device=args.device,
               progress=args.progress, seed=args.seed)
    seconds = time.perf_counter() - start
    metrics = evaluate_views(model, test)
    baseline = mean_colour_psnr(train, test)
    print(f"held-out PSNR {metrics['psnr']:.2f} dB (mean training colour: {baseline:.2f} dB) after {args.steps} "
          f"steps in {seconds:.1f} s")
    model.eval()
    renders = [model.render_image(pose, args.size, args.size, test.focal).rgb.cpu() for pose in test.poses]
    save_image_png(make_grid_image(renders + list(test.images), nrow=len(renders)), out / "held_out.png")
    export_safetensors(model, out / "model.safetensors")
    print(f"  {out / 'held_out.png'}\n  {out / 'model.safetensors'}")
    return 0


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `implicit` (actions fit-image and nerf) to an argparse subparsers object; returns its parser
    (handlers in `func`, each returning an exit code)."""
    from cvzoo.data.photos import PHOTO_NAMES

    p = subparsers.add_parser("implicit", help="neural implicit models: fit a SIREN to a photo, train a tiny NeRF")
    actions = p.add_subparsers(dest="action", required=True)
    f = actions.add_parser("fit-image", help="fit a SIREN to a scikit-image sample photo (cvzoo[data])")
    f.add_argument("--photo", choices=PHOTO_NAMES, default="astronaut")
    f.add_argument("--size", type=int, default=128, help="the photo is resized to size x size (default 128)")
    f.add_argument("--steps", type=int, default=100, help="full-batch Adam steps (default 100)")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--hidden", type=int, default=256, help="SIREN width (default 256)")
    f.add_argument("--layers", type=int, default=3, help="hidden sine layers (default 3)")
    _add_run_arguments(f, "runs/implicit-fit-PHOTO-SIZE")
    f.set_defaults(func=cmd_fit_image)
    n = actions.add_parser("nerf", help="train a tiny NeRF on the synthetic sphere scene; held-out PSNR")
    n.add_argument("--views", type=int, default=24, help="rendered views in all (default 24)")
    n.add_argument("--test-views", type=int, default=4, help="of which held out (default 4)")
    n.add_argument("--size", type=int, default=32, help="views are size x size (default 32)")
    n.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    n.add_argument("--batch-rays", type=int, default=512, help="random rays a step (default 512)")
    n.add_argument("--lr", type=float, default=1e-3)
    n.add_argument("--hidden", type=int, default=64, help="MLP width (default 64)")
    _add_run_arguments(n, "runs/implicit-nerf-VIEWSxSIZE")
    n.set_defaults(func=cmd_nerf)
    return p


def _add_run_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--seed, --device, --progress and --out, which both actions take."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--out", default=None, help=f"output folder (default {default_out})")
