"""cvzoo's Segmenter side by side with torchvision's DeepLabV3 / FCN / LR-ASPP, identical weights, one process.

For each model (cvzoo's copy made by `Segmenter.from_torchvision`) and mode, measures:
  step   a training step: forward, cross-entropy (+ 0.5 x auxiliary), backward
  infer  inference: forward, logits at input size
Modes: eager fp32; bf16 autocast; torch.compile (inductor) of each model's forward, the same for both.
Prints medians and torchvision/cvzoo time ratios (> 1: cvzoo faster), and peak memory on CUDA.

    python benchmarks/segmentation.py                                    # CPU, eager and bf16
    python benchmarks/segmentation.py --device cuda --modes eager bf16 compile --size 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50, lraspp_mobilenet_v3_large

from cvzoo.profiling import median_seconds
from cvzoo.segmentation import Segmenter

BUILDERS = {"deeplabv3": deeplabv3_resnet50, "fcn": fcn_resnet50, "lraspp": lraspp_mobilenet_v3_large}


def timeit(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    return median_seconds(fn, device, repeats, warmup)


def build_pair(name: str, num_classes: int, device: str):
    torch.manual_seed(0)
    kwargs = {} if name == "lraspp" else {"aux_loss": True}
    tv = BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    return tv.to(device), Segmenter.from_torchvision(tv).to(device)


def bench(name: str, batch: int, mode: str, args, results: list) -> None:
    device = args.device
    tv, ours = build_pair(name, args.classes, device)
    images = torch.randn(batch, 3, args.size, args.size, device=device)
    targets = torch.randint(0, args.classes, (batch, args.size, args.size), device=device)
    tv_forward, our_forward = tv, ours
    if mode == "compile":
        tv_forward, our_forward = torch.compile(tv), torch.compile(ours)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if mode == "bf16" else nullcontext()

    def tv_step():
        tv.zero_grad(set_to_none=True)
        with autocast:
            out = tv_forward(images)
            loss = F.cross_entropy(out["out"].float(), targets, ignore_index=255)
            if "aux" in out:
                loss = loss + 0.5 * F.cross_entropy(out["aux"].float(), targets, ignore_index=255)
        loss.backward()

    def our_step():
        ours.zero_grad(set_to_none=True)
        with autocast:
            out = our_forward(images)
            loss = F.cross_entropy(out.logits.float(), targets, ignore_index=255)
            if out.aux_logits is not None:
                loss = loss + 0.5 * F.cross_entropy(out.aux_logits.float(), targets, ignore_index=255)
        loss.backward()

    def tv_infer():
        with torch.no_grad(), autocast:
            return tv_forward(images)["out"]

    def our_infer():
        with torch.no_grad(), autocast:
            return our_forward(images).logits

    row = {"model": name, "batch": batch, "size": args.size, "mode": mode, "device": device}
    # same weights, same logits: checked before timing (training steps update batch-norm statistics through
    # different dropout masks, after which eval-mode logits differ)
    tv.eval()
    ours.eval()
    row["max_abs_logit_diff"] = float((tv_infer().float() - our_infer().float()).abs().max())
    for kind, tv_fn, our_fn, train in (("step", tv_step, our_step, True), ("infer", tv_infer, our_infer, False)):
        tv.train(train)
        ours.train(train)
        for label, fn in (("torchvision", tv_fn), ("cvzoo", our_fn)):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row[f"{kind}_{label}_s"] = timeit(fn, device, args.repeats)
            if device == "cuda":
                row[f"{kind}_{label}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row[f"{kind}_speedup"] = row[f"{kind}_torchvision_s"] / row[f"{kind}_cvzoo_s"]
    results.append(row)
    print(f"{name:>9} {mode:>7} batch {batch:>2} {args.size} px | step tv {row['step_torchvision_s'] * 1e3:8.1f} ms "
          f"cvzoo {row['step_cvzoo_s'] * 1e3:8.1f} ms speedup {row['step_speedup']:.2f} | infer tv "
          f"{row['infer_torchvision_s'] * 1e3:8.1f} ms cvzoo {row['infer_cvzoo_s'] * 1e3:8.1f} ms speedup "
          f"{row['infer_speedup']:.2f} | max |logit diff| {row['max_abs_logit_diff']:.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=["deeplabv3", "fcn"], choices=list(BUILDERS))
    p.add_argument("--modes", nargs="+", default=["eager", "bf16"], choices=["eager", "bf16", "compile"])
    p.add_argument("--batches", nargs="+", type=int, default=[2])
    p.add_argument("--size", type=int, default=256, help="square image side")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write all results to this path")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads"))
    results: list = []
    for name in args.models:
        for mode in args.modes:
            for batch in args.batches:
                bench(name, batch, mode, args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
