"""The `cvzoo` command.

    cvzoo train [-m MODEL] [-d DATASET] [...]   train (bare: the small detector on Shapes, on CPU, in minutes)
    cvzoo eval [--run DIR] [--split val]          evaluate a finished run
    cvzoo predict IMAGE... [--run DIR]           draw a run's predictions on image files
    cvzoo explain IMAGE... [--run DIR | -m MODEL --checkpoint PATH]   Grad-CAM overlays (PNG)
    cvzoo list [--task T] [--datasets]           the zoo's models (and datasets) with their tasks
    cvzoo info NAME                              build one zoo entry and show what it returns
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from cvzoo.zoo import MODELS, list_models, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    if not args.datasets:
        names = list_models(args.task)
        width = max(len(n) for n in names)
        for name in names:
            e = MODELS[name]
            needs = f"cvzoo[{e.extra}]" if e.extra else "core"
            print(f"{name:<{width}}  {e.task:<14}  {needs:<11}  {e.description}")
    if args.datasets or args.task is None or args.task in _DATA_TASKS:
        from cvzoo.data.registry import DATASETS
        from cvzoo.experiment import datasets_for_task

        if not args.datasets:
            print("\ndatasets (cvzoo train -d NAME):")
        names = datasets_for_task(args.task) if args.task in _DATA_TASKS else list(DATASETS)
        width = max((len(n) for n in names), default=0)
        for name in names:
            e = DATASETS[name]
            where = "needs --data-root" if e.needs_root else "embedded"
            needs = f"cvzoo[{e.extra}]" if e.extra else "core"
            print(f"{name:<{width}}  {e.task:<14}  {needs:<11}  {where:<17}  {e.description}")
    return 0


_DATA_TASKS = ("detection", "classification", "regression", "multitask", "segmentation", "generation",
               "self_supervised")


def _settings(args: argparse.Namespace):
    from cvzoo.experiment import TrainSettings

    return TrainSettings(
        model=args.model, dataset=args.dataset, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, device=args.device, strategy=args.strategy, amp=None if args.amp == "none" else args.amp,
        compile=args.compile,
        channels_last=args.channels_last, ema_decay=args.ema, grad_accum=args.grad_accum, augment=args.augment,
        num_workers=args.workers, data_root=args.data_root, train_images=args.train_images,
        val_images=args.val_images, out=args.out,
        resume=args.resume, seed=args.seed, progress=not args.no_progress, eval_every=args.eval_every,
    )


def _print_metrics(metrics: dict) -> None:
    main = {k: v for k, v in metrics.items() if "/" not in k}
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in main.items()))
    for prefix in ("AP", "IoU"):
        per_class = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{prefix}/")}
        if per_class:
            print(f"  {prefix} per class: " + "  ".join(f"{k} {v:.3f}" for k, v in per_class.items()))


def _cmd_train(args: argparse.Namespace) -> int:
    from cvzoo.experiment import train

    settings = _settings(args)
    print(f"cvzoo train: {settings.model} on {settings.dataset}")
    result = train(settings)
    run_dir = result["run_dir"]
    if result["interrupted"]:
        return 0
    print(f"done: {result['steps']} steps in {result['seconds']:.0f} s; validation metrics:")
    _print_metrics(result["metrics"])
    print(f"run directory: {run_dir}")
    for name in ("model.safetensors", "checkpoints/last.pt", "metrics.csv", "curves.png", "predictions.png",
                 "samples.png"):
        if (run_dir / name).exists():
            print(f"  {run_dir / name}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from cvzoo.experiment import (
        TrainSettings,
        build_dataset,
        collate_for,
        evaluate_task,
        held_out_split,
        latest_run,
        load_run,
        target_keys,
    )

    run_dir = args.run or latest_run()
    model, run = load_run(run_dir)
    dataset_name = args.dataset or run["dataset"]
    split = args.split or held_out_split(dataset_name)
    settings = TrainSettings(val_images=args.images, train_images=args.images) if args.images else None
    dataset = build_dataset(dataset_name, split, settings, model.signature.in_channels)
    loader = DataLoader(dataset, batch_size=32, collate_fn=collate_for(run["task"], target_keys(model)))
    print(f"cvzoo eval: {run['model']} from {run_dir} on {dataset_name} ({split}, {len(dataset)} images)")
    _print_metrics(evaluate_task(model, loader, run["task"], run["classes"], per_class=True))
    return 0


_CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM",
                "xgradcam": "XGradCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}


def _default_layer(model) -> str:
    """The deepest child of the backbone that has parameters (the last stage), else the model's last one."""
    root = "backbone" if hasattr(model, "backbone") else ""
    module = model.get_submodule(root)
    names = [n for n, m in module.named_children() if any(True for _ in m.parameters())]
    if not names:
        raise ValueError("cannot pick a layer to explain: pass --layer")
    return f"{root}.{names[-1]}" if root else names[-1]


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    import cvzoo.explain as explain
    from cvzoo.experiment import latest_run, load_model, load_run, read_image
    from cvzoo.visualize import save_image_png

    if args.checkpoint is not None:
        if args.model is None:
            raise ValueError("--checkpoint needs -m/--model, the zoo name of the model it holds")
        model, run = load_model(args.model, args.checkpoint, args.num_classes)
    else:
        model, run = load_run(args.run or latest_run())
    layer = args.layer or _default_layer(model)
    method = getattr(explain, _CAM_METHODS[args.method])
    if run["task"] == "detection":
        target = explain.DetectionTarget(label=args.target, score_thresh=args.score_thresh)
    elif run["task"] in ("classification", "multitask"):
        target = explain.ClassifierTarget(args.target, key="label" if run["task"] == "multitask" else None)
    else:
        target = explain.RegressionTarget()
    out_dir = Path(args.out)
    with method(model, target_layers=[layer]) as cam:
        for path in args.images:
            image = read_image(path)
            maps = cam(model.signature.normalize(image[None]), [target])
            target_png = out_dir / f"{Path(path).stem}_{args.method}.png"
            save_image_png(explain.overlay(image, maps[0], alpha=args.alpha), target_png)
            print(f"{path}: {args.method} at {layer} -> {target_png}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cvzoo.experiment import drawable_extras, latest_run, load_run, read_image
    from cvzoo.visualize import draw_detections, draw_segmentation, save_image_png

    run_dir = args.run or latest_run()
    model, run = load_run(run_dir)
    out_dir = Path(args.out)
    for path in args.images:
        image = read_image(path)
        if run["task"] == "detection":
            det = model.predict([model.signature.normalize(image[None])[0]])[0]
            drawn = draw_detections(image, det.boxes, det.labels, det.scores, classes=run["classes"],
                                    score_thresh=args.score_thresh, **drawable_extras(det))
            kept = int((det.scores > args.score_thresh).sum())
            summary = f"{kept} detections above {args.score_thresh}"
        elif run["task"] == "classification":
            pred = model.predict(model.signature.normalize(image[None]))
            label = run["classes"][int(pred.labels[0])] if run["classes"] else str(int(pred.labels[0]))
            drawn, summary = (image * 255).byte(), f"{label} ({float(pred.scores[0]):.3f})"
        elif run["task"] == "segmentation":
            pred = model.predict(model.signature.normalize(image[None]))
            drawn = draw_segmentation(image, pred.labels[0], model.num_classes)
            found = [run["classes"][c] if run["classes"] else str(c) for c in pred.labels[0].unique().tolist()]
            summary = f"classes {', '.join(found)}"
        else:
            raise ValueError(f"cvzoo predict draws detection, classification and segmentation runs; {run_dir} is "
                             f"a {run['task']} run")
        target = out_dir / f"{Path(path).stem}_pred.png"
        save_image_png(drawn, target)
        print(f"{path}: {summary} -> {target}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from cvzoo.zoo import create_model, get_entry

    entry = get_entry(args.name)
    model = create_model(args.name).eval()
    sig = model.signature
    h, w = args.size
    params = sum(p.numel() for p in model.parameters())
    print(f"{entry.name}: {entry.description}")
    print(f"  task {entry.task}, {params / 1e6:.2f}M parameters")
    print(f"  takes (B, {sig.in_channels}, H, W) {str(sig.dtype).replace('torch.', '')}, normalised with "
          f"mean {sig.mean} std {sig.std}; H, W >= {sig.min_size}, divisible by {sig.size_divisor}")
    images = torch.rand(1, sig.in_channels, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(sig.normalize(images))
    print(f"  on a {h}x{w} image returns:")
    if isinstance(out, list):
        for name, info, t in zip(sig.outputs, model.feature_info, out):
            print(f"    {name}: {tuple(t.shape)}  stride {info.stride}, {info.channels} channels")
    else:
        items = out.items() if isinstance(out, dict) else [(f, getattr(out, f)) for f in out._fields]
        for name, t in items:
            if isinstance(t, dict):  # e.g. a two-stage detector's per-branch outputs
                print(f"    {name}: {{{', '.join(t)}}}")
                continue
            t = t[0] if isinstance(t, tuple) else t
            print(f"    {name}: {tuple(t.shape) if t is not None else None}")
    return 0


def _cmd_index_build(args: argparse.Namespace) -> int:
    from cvzoo.image_index import build_index

    if (args.run is None) == (args.model is None):
        raise ValueError("pass exactly one of --run (a trained run directory) or -m/--model (a zoo model)")
    spec = {"run": args.run} if args.run else {"model": args.model, "checkpoint": args.checkpoint}
    count = build_index(args.folder, args.out, spec, size=args.size, backend=args.backend, metric=args.metric)
    print(f"indexed {count} images of {args.folder} ({args.backend}, {args.metric}) into {args.out}")
    return 0


def _cmd_index_search(args: argparse.Namespace) -> int:
    from cvzoo.image_index import search_index

    for query, hits in zip(args.images, search_index(args.index, args.images, k=args.k)):
        print(query)
        for rank, (path, score) in enumerate(hits, 1):
            print(f"  {rank}. {path}  {score:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvzoo", description="cvzoo: composable computer-vision parts for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print the zoo table")
    p.add_argument("--task", default=None, help="only entries of this task (backbone, features, classification, "
                                                "multitask)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--datasets", action="store_true", help="list the datasets only")
    p.set_defaults(func=_cmd_list)
    from cvzoo.experiment import DEFAULT_DATASET, DEFAULT_MODEL

    p = sub.add_parser("train", help="train a zoo model on a dataset (bare: the small detector on Shapes)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"zoo model name (default {DEFAULT_MODEL})")
    p.add_argument("-d", "--dataset", default=DEFAULT_DATASET, help=f"dataset name (default {DEFAULT_DATASET})")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the model's, else 1000, unless --epochs)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (training stops at steps or epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's, else 16")
    p.add_argument("--lr", type=float, default=None, help="default: the model's, else 2e-3")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--strategy", default="auto", choices=("auto", "single", "ddp", "fsdp"),
                   help="auto: DDP when launched by torchrun with several processes")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's loss")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an EMA of the weights (default: the model's, else none)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--augment", default=None, choices=("none", "flip", "light", "medium", "heavy"),
                   help="flip (the default): horizontal flips; light/medium/heavy: kornia presets (cvzoo[augment])")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--data-root", default=None, help="where a file-based dataset (voc, coco, ...) lives")
    p.add_argument("--train-images", type=int, default=None, help="Shapes: number of training images")
    p.add_argument("--val-images", type=int, default=None, help="Shapes: number of held-out images")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    p.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATASET-TIME)")
    p.add_argument("--resume", default=None, help="'auto' (the run directory's last checkpoint) or a path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="evaluate a finished run on a dataset split")
    p.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    p.add_argument("-d", "--dataset", default=None, help="dataset (default: the one it was trained on)")
    p.add_argument("--split", default=None, help="default: the held-out split (val, or test where none)")
    p.add_argument("--images", type=int, default=None, help="Shapes: number of images of the split")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("predict", help="draw a run's predictions on image files (PNG next to --out)")
    p.add_argument("images", nargs="+")
    p.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    p.add_argument("--out", default="predictions")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("explain", help="class activation maps (Grad-CAM, ...) of a model on image files, as PNG "
                                       "overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    p.add_argument("-m", "--model", default=None, help="zoo model name, with --checkpoint")
    p.add_argument("--checkpoint", default=None, help=".safetensors, trainer .pt or run directory")
    p.add_argument("--num-classes", type=int, default=None, help="with --checkpoint and no run.json next to it")
    p.add_argument("--method", choices=tuple(_CAM_METHODS), default="gradcam")
    p.add_argument("--layer", default=None, help="dotted module path (default: the backbone's last stage)")
    p.add_argument("--target", type=int, default=None, help="class index (default: the top class / detection)")
    p.add_argument("--score-thresh", type=float, default=None, help="detectors: lowest score of the explained "
                                                                    "detection")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the map in the overlay")
    p.add_argument("--out", default="explanations")
    p.set_defaults(func=_cmd_explain)
    from cvzoo.ssl.index import BACKENDS, METRICS

    p = sub.add_parser("index", help="nearest-neighbour index of an image folder: build, then search by image")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed every image under a folder and save the index")
    b.add_argument("folder")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--run", default=None, help="embed with a trained run (classifier or self-supervised)")
    b.add_argument("-m", "--model", default=None, help="or a zoo model (random init unless --checkpoint)")
    b.add_argument("--checkpoint", default=None, help="weights for -m: .safetensors, trainer .pt or run directory")
    b.add_argument("--size", type=int, default=64, help="images are resized to size x size (default 64)")
    b.add_argument("--backend", choices=BACKENDS, default="torch")
    b.add_argument("--metric", choices=METRICS, default="cosine")
    b.set_defaults(func=_cmd_index_build)
    s = actions.add_parser("search", help="the nearest indexed images of query images")
    s.add_argument("images", nargs="+")
    s.add_argument("--index", required=True, help="directory written by `cvzoo index build`")
    s.add_argument("-k", type=int, default=5)
    s.set_defaults(func=_cmd_index_search)
    from cvzoo.hyper.cli import add_parsers as add_tune_parser
    from cvzoo.implicit.cli import add_parsers as add_implicit_parser

    add_implicit_parser(sub)

    add_tune_parser(sub)
    p = sub.add_parser("info", help="build a zoo entry, run one image through it and print what it returns")
    p.add_argument("name")
    p.add_argument("--size", nargs=2, type=int, default=(320, 320), metavar=("H", "W"))
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"cvzoo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
