"""cvzoo's dense detectors side by side with torchvision's, carrying identical weights, in one process.

Measures, for RetinaNet and FCOS on a ResNet-18 (or -50) FPN:
  loss      target encoding + loss, forward and backward, from fixed head outputs
  post      post-processing of fixed head outputs into per-image detections
  step      a full training step: forward, loss, backward
and for loss/post the number of dispatched ATen operations and of host-device synchronisations (ops
that wait for the device on CUDA: .item(), nonzero, boolean indexing, ...), counted with a
TorchDispatchMode on any device. Prints medians and cvzoo/torchvision ratios (time ratio < 1: cvzoo
faster).

    python benchmarks/detection.py                          # CPU grid, eager
    python benchmarks/detection.py --compile --json out.json
    python benchmarks/detection.py --device cuda --compile --amp bf16 --channels-last --step-only
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from cvzoo.detection import FCOS, RetinaNet, TargetBatch
from cvzoo.heads import DenseOutput, FCOSOutput
from cvzoo.profiling import count_ops, paired_median_seconds


def paired(ours: Callable[[], object], tv: Callable[[], object], device: str, repeats: int,
           warmup: int = 2) -> list[float]:
    """Medians of both, called alternately: each side runs in the process state the other leaves (timed one
    after the other, a CPU loss changed 2x depending on which ran first; see BENCHMARKS.md)."""
    return paired_median_seconds([ours, tv], device, repeats, warmup)


def build_pair(kind: str, depth: int, num_classes: int, size: int, device: str):
    """A torchvision detector (normalisation and resizing turned into no-ops) and its cvzoo copy.

    Seeded, so every configuration sees the same kind of score distribution: class biases around
    sigmoid^-1(0.01) with spread 0.6, which puts a few hundred to a few thousand (prior, class) pairs
    per image above RetinaNet's 0.05 threshold, as an early-training detector has.
    """
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    common = dict(min_size=size, max_size=10 * size, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    if kind == "retinanet":
        tv = TVRetinaNet(backbone, num_classes, **common)
    else:
        anchors = TVAnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
        tv = TVFCOS(backbone, num_classes, anchor_generator=anchors, **common)
    with torch.no_grad():  # realistic, varied scores instead of the uniform prior of a fresh head
        for m in tv.head.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.01)
                if m.bias is not None:
                    m.bias.normal_(-4.6 if m.out_channels % num_classes == 0 else 0.0, 0.6)
    ours = (RetinaNet if kind == "retinanet" else FCOS).from_torchvision(tv)
    return tv.to(device), ours.to(device)


def make_targets(batch: int, boxes: int, size: int, num_classes: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, boxes, 2, generator=g) * size * 0.8
    wh = 8 + torch.rand(batch, boxes, 2, generator=g) * size * 0.4
    b = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    labels = torch.randint(0, num_classes, (batch, boxes), generator=g)
    targets = [{"boxes": b[i].to(device), "labels": labels[i].to(device)} for i in range(batch)]
    return targets, TargetBatch.from_list(targets, batch, num_classes, device)


def head_outputs(tv, images):
    """Fixed backbone+head outputs of the torchvision model: the inputs to both loss/post paths."""
    with torch.no_grad():
        image_list, _ = tv.transform(list(images))
        feats = list(tv.backbone(image_list.tensors).values())
        out = tv.head(feats)
        anchors = tv.anchor_generator(image_list, feats)
    return image_list, feats, out, anchors


def bench_config(kind, depth, batch, boxes, size, args, device, results):
    num_classes = 80
    tv, ours = build_pair(kind, depth, num_classes, size, device)
    images = torch.randn(batch, 3, size, size, device=device)
    targets, tb = make_targets(batch, boxes, size, num_classes, device)
    image_list, feats, out, anchors = head_outputs(tv, images)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    image_sizes = torch.tensor(image_list.image_sizes, device=device)
    names = {"cls_logits": 0, "bbox_regression": 1, "bbox_ctrness": 2}
    fields = [out[k] for k in names if k in out]

    def leaf():
        return [f.detach().clone().requires_grad_(True) for f in fields]

    # ---- encoding + loss, forward and backward ---------------------------------------------------
    ours_out_type = DenseOutput if kind == "retinanet" else FCOSOutput

    def ours_loss():
        o = ours_out_type(*leaf())
        ours.compute_loss(o, sizes, tb, image_sizes)["loss"].backward()

    def tv_loss():
        ts = leaf()
        o = {k: t for k, t in zip(names, ts)}
        if kind == "retinanet":
            losses = tv.compute_loss(targets, o, anchors)
        else:
            losses = tv.compute_loss(targets, o, anchors, [h * w for h, w in sizes])
        sum(losses.values()).backward()

    ours_loss_fn = ours_loss
    graph_breaks = None
    if args.compile:
        compiled = torch.compile(ours.compute_loss, fullgraph=True)

        def ours_loss_compiled():
            o = ours_out_type(*leaf())
            compiled(o, sizes, tb, image_sizes)["loss"].backward()

        ours_loss_fn = ours_loss_compiled
        graph_breaks = 0  # fullgraph=True: a break would have raised
    r = {"model": kind, "depth": depth, "batch": batch, "boxes": boxes, "size": size}
    r["loss_ops_cvzoo"], r["loss_syncs_cvzoo"] = count_ops(ours_loss)
    r["loss_ops_tv"], r["loss_syncs_tv"] = count_ops(tv_loss)
    r["loss_ms_cvzoo"], r["loss_ms_tv"] = (1e3 * t for t in paired(ours_loss_fn, tv_loss, device, args.repeats))
    r["loss_graph_breaks_cvzoo"] = graph_breaks

    # ---- post-processing -------------------------------------------------------------------------
    def ours_post():
        with torch.no_grad():
            o = ours_out_type(*fields)
            return ours.postprocess(o, sizes, image_sizes, ours.score_thresh, ours.nms_thresh, ours.max_detections,
                                    ours.topk_candidates)

    def tv_post():
        with torch.no_grad():
            per_level = [h * w * (9 if kind == "retinanet" else 1) for h, w in sizes]
            split = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
            split_anchors = [list(a.split(per_level)) for a in anchors]
            return tv.postprocess_detections(split, split_anchors, image_list.image_sizes)

    r["post_ops_cvzoo"], r["post_syncs_cvzoo"] = count_ops(ours_post)
    r["post_ops_tv"], r["post_syncs_tv"] = count_ops(tv_post)
    r["post_ms_cvzoo"], r["post_ms_tv"] = (1e3 * t for t in paired(ours_post, tv_post, device, args.repeats))
    n_ours = sum(len(d.boxes) for d in ours_post())
    n_tv = sum(len(d["boxes"]) for d in tv_post())
    r["detections_cvzoo"], r["detections_tv"] = n_ours, n_tv
    results.append(r)
    print(f"{kind:9s} r{depth} b{batch:<3d} boxes{boxes:<3d} {size}px | loss {r['loss_ms_cvzoo']:8.2f} ms vs "
          f"{r['loss_ms_tv']:8.2f} ms (x{r['loss_ms_tv'] / r['loss_ms_cvzoo']:.2f} faster), ops "
          f"{r['loss_ops_cvzoo']} vs {r['loss_ops_tv']}, syncs {r['loss_syncs_cvzoo']} vs {r['loss_syncs_tv']} | "
          f"post {r['post_ms_cvzoo']:8.2f} ms vs {r['post_ms_tv']:8.2f} ms "
          f"(x{r['post_ms_tv'] / r['post_ms_cvzoo']:.2f}), ops {r['post_ops_cvzoo']} vs {r['post_ops_tv']}, "
          f"syncs {r['post_syncs_cvzoo']} vs {r['post_syncs_tv']}, dets {n_ours}/{n_tv}", flush=True)


def bench_step(kind, depth, batch, size, args, device, results):
    """Full training step. torchvision: eager fp32 (its default path); cvzoo: with the requested options."""
    num_classes = 80
    height = args.step_height or size
    tv, ours = build_pair(kind, depth, num_classes, min(height, size), device)
    tv.train()
    ours.train()
    images = torch.randn(batch, 3, height, size, device=device)
    targets, tb = make_targets(batch, 8, size, num_classes, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    x = images
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.compile(ours.loss) if args.compile else ours.loss

    def ours_step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(x, tb)["loss"]
        loss.backward()

    def tv_step():
        sum(tv(list(images), targets).values()).backward()

    r = {"model": kind, "depth": depth, "batch": batch, "size": size, "step": True, "compile": args.compile,
         "amp": args.amp, "channels_last": args.channels_last}
    if args.compile and not args.skip_explain:  # graph breaks of a whole step, backward included
        def ours_eager_step(x, tb):
            loss = ours.loss(x, tb)["loss"]
            loss.backward()

        def tv_eager_step(images, targets):
            sum(tv(images, targets).values()).backward()

        r["step_graph_breaks_cvzoo"] = len(torch._dynamo.explain(ours_eager_step)(x, tb).break_reasons)
        r["step_graph_breaks_tv"] = len(torch._dynamo.explain(tv_eager_step)(list(images), targets).break_reasons)
        torch._dynamo.reset()
        loss_fn = torch.compile(ours.loss)
    r["step_ms_cvzoo"], r["step_ms_tv"] = (1e3 * t for t in paired(ours_step, tv_step, device, args.step_repeats))
    if device == "cuda":  # peak memory of one more step each, after the timing (compilation done)
        for name, step in (("cvzoo", ours_step), ("tv", tv_step)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            r[f"peak_mem_mb_{name}"] = torch.cuda.max_memory_allocated() / 2**20
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = ours.loss(x, tb)["loss"]
            loss.backward()
        flops = fc.get_total_flops()
        peak = args.peak_tflops * 1e12
        r["model_tflops_per_step"] = flops / 1e12
        r["mfu_cvzoo"] = flops / (r["step_ms_cvzoo"] / 1e3) / peak
        r["mfu_tv"] = flops / (r["step_ms_tv"] / 1e3) / peak
    results.append(r)
    extra = f", peak mem {r.get('peak_mem_mb_cvzoo', 0):.0f} vs {r.get('peak_mem_mb_tv', 0):.0f} MB, " \
            f"MFU {r.get('mfu_cvzoo', 0):.1%} vs {r.get('mfu_tv', 0):.1%}" if device == "cuda" else ""
    print(f"STEP {kind:9s} r{depth} b{batch} {height}x{size}px: {r['step_ms_cvzoo']:.1f} ms vs "
          f"{r['step_ms_tv']:.1f} ms (x{r['step_ms_tv'] / r['step_ms_cvzoo']:.2f} faster), graph breaks "
          f"{r.get('step_graph_breaks_cvzoo', 'n/a')} vs {r.get('step_graph_breaks_tv', 'n/a')}{extra}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile cvzoo's loss (fullgraph) and step")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype for cvzoo's step")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None, help="write all results to this path")
    p.add_argument("--models", nargs="+", default=["retinanet", "fcos"])
    p.add_argument("--depth", type=int, default=18, choices=[18, 34, 50])
    p.add_argument("--batches", nargs="+", type=int, default=[4, 16])
    p.add_argument("--boxes", nargs="+", type=int, default=[8, 64])
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    p.add_argument("--step-sizes", nargs="+", type=int, default=[320], help="image sides for the full step")
    p.add_argument("--step-batches", nargs="+", type=int, default=[4])
    p.add_argument("--step-height", type=int, default=None, help="non-square step images: H (W = size)")
    p.add_argument("--step-only", action="store_true")
    p.add_argument("--skip-explain", action="store_true", help="do not count graph breaks (saves a trace)")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak, for MFU")
    args = p.parse_args()
    torch.manual_seed(0)
    device = args.device
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, compile={args.compile}, amp={args.amp}, "
          f"channels_last={args.channels_last}")
    results: list[dict] = []
    for kind in args.models:
        if not args.step_only:
            for size in args.sizes:
                for batch in args.batches:
                    for boxes in args.boxes:
                        bench_config(kind, args.depth, batch, boxes, size, args, device, results)
        if not args.no_step:
            for size in args.step_sizes:
                for batch in args.step_batches:
                    bench_step(kind, args.depth, batch, size, args, device, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
