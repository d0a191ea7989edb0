"""cvzoo's Trainer against a hand-written loop on the same model and data, in one process.

Measures the time of a training step (forward, loss, backward, clip, AdamW, schedule): each
configuration trains from the same initial weights for `warmup + steps` steps, the time from the start
of one step to the start of the next is recorded (in the batch transform, which every step calls
once), and the median over the last `steps` intervals is its step time, so set-up and the first-call
compile are left out. Repeated `--repeats` times, interleaved; medians are printed with the ratios:

    overhead     Trainer (eager fp32) / hand-written loop (target: within 3%)
    compile      Trainer eager / Trainer with compile=True
    bf16         Trainer fp32 / Trainer with amp="bf16"
    compile+bf16 Trainer fp32 / Trainer with both

    python benchmarks/trainer.py                       # CPU, fcos_micro at 128 px, batch 16
    python benchmarks/trainer.py --device cuda --model fcos_resnet18_fpn --size 320 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import torch

from cvzoo.detection.structures import TargetBatch
from cvzoo.train import Trainer
from cvzoo.zoo import create_model


def make_batches(kind: str, n: int, batch: int, size: int, num_classes: int, seed: int = 0) -> list:
    """`n` fixed (images in [0, 1], targets) batches on the CPU."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.rand(batch, 3, size, size, generator=g)
        if kind == "detection":
            xy = torch.rand(batch, 4, 2, generator=g) * size * 0.6
            wh = size * 0.1 + torch.rand(batch, 4, 2, generator=g) * size * 0.3
            boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
            labels = torch.randint(0, num_classes, (batch, 4), generator=g)
            out.append((images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]))
        else:
            out.append((images, torch.randint(0, num_classes, (batch,), generator=g)))
    return out


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def hand_loop(model, batches, steps: int, lr: float, device: str, stamps: list[float]) -> None:
    """The loop a user would write: AdamW, cosine schedule, clipping, `model.loss`."""
    normalize = model.signature.normalize
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for i in range(steps):
        images, targets = to_device(batches[i % len(batches)], device)
        stamps.append(_now(device))
        loss = model.loss(normalize(images), targets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    stamps.append(_now(device))


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def trainer_run(model, batches, steps: int, lr: float, device: str, stamps: list[float], **options) -> None:
    normalize = model.signature.normalize

    def transform(images, targets):
        stamps.append(_now(device))
        if options.get("compile") and isinstance(targets, list):  # validated outside the compiled loss
            targets = TargetBatch.from_list(targets, len(targets), model.num_classes, images.device)
        return normalize(images), targets

    if options.get("compile"):
        torch._dynamo.reset()  # a fresh model: compile it afresh rather than pile up recompilations
    trainer = Trainer(model, lr=lr, max_steps=steps, clip_grad_norm=10.0, schedule="cosine", device=device,
                      batch_transform=transform, progress=False, log_every=50, strategy="single", **options)
    trainer.fit(batches)
    stamps.append(_now(device))


def step_time(run, base, warmup: int, steps: int) -> float:
    """Median seconds from one step's start to the next over the last `steps` steps of a fresh run."""
    stamps: list[float] = []
    run(copy.deepcopy(base), warmup + steps, stamps)
    intervals = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return statistics.median(intervals[-steps:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcos_micro")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=4).to(args.device)
    kind = "detection" if hasattr(base, "compute_loss") or "noop_detector" in args.model else "classification"
    batches = make_batches(kind, 8, args.batch, args.size, 4)
    lr = 1e-3
    configs = {
        "hand-written loop": lambda m, n, st: hand_loop(m, batches, n, lr, args.device, st),
        "Trainer eager fp32": lambda m, n, st: trainer_run(m, batches, n, lr, args.device, st),
        "Trainer bf16": lambda m, n, st: trainer_run(m, batches, n, lr, args.device, st, amp="bf16"),
    }
    if not args.skip_compile:
        configs["Trainer compile"] = lambda m, n, st: trainer_run(m, batches, n, lr, args.device, st, compile=True)
        configs["Trainer compile+bf16"] = lambda m, n, st: trainer_run(m, batches, n, lr, args.device, st,
                                                                       compile=True, amp="bf16")
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every configuration alike
        for name, run in configs.items():
            times[name].append(step_time(run, base, args.warmup, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"device: {device_name}, torch {torch.__version__}, model {args.model}, batch {args.batch}, "
          f"{args.size} px, {args.steps} timed steps x {args.repeats} repeats, malloc env {malloc or 'default'}")
    for name, t in med.items():
        print(f"  {name:22s} {t * 1e3:9.2f} ms/step   (runs: {', '.join(f'{x * 1e3:.1f}' for x in times[name])})")
    ref = med["Trainer eager fp32"]
    print(f"overhead: Trainer / hand-written = {ref / med['hand-written loop']:.3f} (target <= 1.03)")
    for name in ("Trainer bf16", "Trainer compile", "Trainer compile+bf16"):
        if name in med:
            print(f"speedup {name.removeprefix('Trainer '):13s}: {ref / med[name]:.2f}x over eager fp32")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "malloc_env": malloc, "times": times,
                       "medians": med}, f, indent=2)


if __name__ == "__main__":
    main()
