"""cvzoo's Faster / Mask R-CNN side by side with torchvision's, carrying identical weights, in one process.

Measures, on a ResNet-50 (or -18) FPN at batch 2 and 8:
  step   a training step: forward, RPN + RoI sampling, losses, backward (random sampling in both)
  infer  inference including proposal selection, RoI heads, NMS and (Mask R-CNN) mask pasting
Prints medians and torchvision/cvzoo time ratios (> 1: cvzoo faster, as in BENCHMARKS.md), and peak memory
on CUDA.
torchvision's GeneralizedRCNNTransform is made a no-op (min_size = image size, zero mean, unit std), so
both models see the same pixels; cvzoo's copy comes from `from_torchvision`, so detections agree.

    python benchmarks/two_stage.py                                   # CPU, 320 px, batch 2 and 8
    python benchmarks/two_stage.py --device cuda --size 800 --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from cvzoo.detection import FasterRCNN, MaskRCNN
from cvzoo.profiling import median_seconds


def timeit(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    return median_seconds(fn, device, repeats, warmup)


def build_pair(kind: str, depth: int, num_classes: int, size: int, device: str):
    """torchvision's model (transform a no-op) with perturbed RPN/RoI weights so scores vary, and its cvzoo copy."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5)
    common = dict(min_size=size, max_size=10 * size, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    tv = (TVMaskRCNN if kind == "mask" else TVFasterRCNN)(backbone, num_classes + 1, **common)
    with torch.no_grad():
        for m in [*tv.rpn.modules(), *tv.roi_heads.modules()]:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0, 0.01)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
        # class logits spread so a realistic number of (proposal, class) pairs pass the 0.05 threshold
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.1)
        tv.roi_heads.box_predictor.cls_score.bias.normal_(0, 2.0)
    ours = (MaskRCNN if kind == "mask" else FasterRCNN).from_torchvision(tv)
    return tv.to(device), ours.to(device)


def make_targets(batch: int, boxes: int, size: int, num_classes: int, device: str, masks: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, boxes, 2, generator=g) * size * 0.8
    wh = 8 + torch.rand(batch, boxes, 2, generator=g) * size * 0.4
    b = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    labels = torch.randint(0, num_classes, (batch, boxes), generator=g)
    targets = []
    for i in range(batch):
        t = {"boxes": b[i].to(device), "labels": labels[i].to(device)}
        if masks:
            yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            bi = b[i]
            t["masks"] = ((xx >= bi[:, 0, None, None]) & (xx < bi[:, 2, None, None])
                          & (yy >= bi[:, 1, None, None]) & (yy < bi[:, 3, None, None])).to(device)
        targets.append(t)
    return targets


def bench(kind: str, batch: int, args, device: str, results: list) -> None:
    num_classes = 80
    tv, ours = build_pair(kind, args.depth, num_classes, args.size, device)
    images = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)
    targets = make_targets(batch, args.boxes, args.size, num_classes, device, kind == "mask")
    tv_targets = [{**t, "labels": t["labels"] + 1} for t in targets]  # torchvision's class 0 is the background
    row = {"model": f"{kind}_rcnn_r{args.depth}", "batch": batch, "size": args.size, "device": device}

    def tv_step():
        tv.zero_grad(set_to_none=True)
        sum(tv(list(images), tv_targets).values()).backward()

    def our_step():
        ours.zero_grad(set_to_none=True)
        ours.loss(images, targets)["loss"].backward()

    def tv_infer():
        with torch.no_grad():
            return tv(list(images))

    def our_infer():
        return ours.predict(images)

    for name, tv_fn, our_fn, mode in (("step", tv_step, our_step, "train"), ("infer", tv_infer, our_infer, "eval")):
        tv.train(mode == "train")
        ours.train(mode == "train")
        for label, fn in (("torchvision", tv_fn), ("cvzoo", our_fn)):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row[f"{name}_{label}_s"] = timeit(fn, device, args.repeats)
            if device == "cuda":
                row[f"{name}_{label}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row[f"{name}_speedup"] = row[f"{name}_torchvision_s"] / row[f"{name}_cvzoo_s"]
    if kind == "mask" or args.check:  # same weights, same detections
        tv.eval()
        ours.eval()
        ref, got = tv_infer(), our_infer()
        row["same_detections"] = all(
            r["boxes"].shape == g.boxes.shape and torch.allclose(r["boxes"], g.boxes, atol=1e-3)
            for r, g in zip(ref, got))
    results.append(row)
    mem = (f"  peak MiB step {row['step_torchvision_peak_mib']:.0f} / {row['step_cvzoo_peak_mib']:.0f}"
           if device == "cuda" else "")
    print(f"{row['model']:>16} batch {batch:>2} {args.size} px | step tv {row['step_torchvision_s'] * 1e3:8.1f} ms "
          f"cvzoo {row['step_cvzoo_s'] * 1e3:8.1f} ms speedup {row['step_speedup']:.2f} | infer tv "
          f"{row['infer_torchvision_s'] * 1e3:8.1f} ms cvzoo {row['infer_cvzoo_s'] * 1e3:8.1f} ms speedup "
          f"{row['infer_speedup']:.2f}{mem}" + (f" | same detections {row['same_detections']}"
                                              if "same_detections" in row else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=["faster", "mask"], choices=["faster", "mask"])
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50])
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--size", type=int, default=320, help="square image side")
    p.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true", help="also compare Faster R-CNN detections")
    p.add_argument("--json", default=None, help="write all results to this path")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads"))
    results: list = []
    for kind in args.models:
        for batch in args.batches:
            bench(kind, batch, args, args.device, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
