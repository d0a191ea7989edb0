"""cvzoo's own diffusion UNet against diffusers' UNet2DModel of similar size, inside the same GaussianDiffusion.

For each denoiser and mode, measures:
  step    a training step: `GaussianDiffusion.loss` (random timesteps, noise, class-conditional with the
          null-class dropout) and backward
  sample  sampling throughput: one denoiser call on a batch, i.e. one DDIM / DDPM step (images per second =
          batch / time; a 50-step DDIM sample of the batch takes 50 of these)
Modes: eager fp32; bf16 autocast; torch.compile (inductor) of the denoiser, the same for both.
Prints parameter counts, medians and diffusers/cvzoo time ratios (> 1: cvzoo faster), and peak memory on CUDA.

    python benchmarks/generative.py                                           # CPU, 16 px digits-sized
    python benchmarks/generative.py --device cuda --size 64 --batch 128 --modes eager bf16 compile --json out.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch

from cvzoo.generative import GaussianDiffusion, UNet, diffusers_unet2d
from cvzoo.profiling import median_seconds


def build(kind: str, size: int, channels: int, classes: int, device: str) -> GaussianDiffusion:
    torch.manual_seed(0)
    if kind == "cvzoo":
        denoiser = UNet(in_channels=channels, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                        num_classes=classes)
    else:  # the same widths, one ResNet block a level, the class embedding of diffusers
        denoiser = diffusers_unet2d(size, channels, num_classes=classes, block_out_channels=(32, 64))
    return GaussianDiffusion(denoiser, image_size=size, num_timesteps=500, schedule="cosine").to(device)


def bench(kind: str, mode: str, args, results: list) -> None:
    device = args.device
    model = build(kind, args.size, args.channels, args.classes, device)
    params = sum(p.numel() for p in model.parameters())
    if mode == "compile":
        model.denoiser = torch.compile(model.denoiser)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if mode == "bf16" else nullcontext()
    images = torch.rand(args.batch, args.channels, args.size, args.size, device=device) * 2 - 1
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    t = torch.full((args.batch,), 250, device=device, dtype=torch.long)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(images, labels)["loss"]
        loss.backward()

    def sample_step():
        with torch.no_grad(), autocast:
            return model(images, t, labels)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = median_seconds(step, device, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    sample_s = median_seconds(sample_step, device, args.repeats)
    row = {"denoiser": kind, "mode": mode, "device": device, "batch": args.batch, "size": args.size,
           "params": params, "step_ms": step_s * 1e3, "sample_step_ms": sample_s * 1e3,
           "sample_images_per_s": args.batch / sample_s, "peak_step_mb": peak}
    results.append(row)
    print(f"{kind:9s} {mode:8s} params {params / 1e6:.2f}M  step {row['step_ms']:8.2f} ms  "
          f"denoiser call {row['sample_step_ms']:8.2f} ms ({row['sample_images_per_s']:.0f} img/s)"
          + (f"  peak {peak:.0f} MB" if peak is not None else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["eager", "bf16"], choices=("eager", "bf16", "compile"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results: list = []
    for mode in args.modes:
        for kind in ("cvzoo", "diffusers"):
            bench(kind, mode, args, results)
        ours, theirs = results[-2], results[-1]
        print(f"  {mode}: diffusers / cvzoo: training step {theirs['step_ms'] / ours['step_ms']:.2f}x, "
              f"denoiser call {theirs['sample_step_ms'] / ours['sample_step_ms']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
