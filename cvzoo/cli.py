"""The `cvzoo` command: `cvzoo list` prints the zoo table, `cvzoo info NAME` builds one entry and shows it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from cvzoo.zoo import MODELS, list_models, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    names = list_models(args.task)
    width = max(len(n) for n in names)
    for name in names:
        e = MODELS[name]
        needs = f"cvzoo[{e.extra}]" if e.extra else "core"
        print(f"{name:<{width}}  {e.task:<14}  {needs:<11}  {e.description}")
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
            t = t[0] if isinstance(t, tuple) else t
            print(f"    {name}: {tuple(t.shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvzoo", description="cvzoo: composable computer-vision parts for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print the zoo table")
    p.add_argument("--task", default=None, help="only entries of this task (backbone, features, classification, "
                                                "multitask)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="build a zoo entry, run one image through it and print what it returns")
    p.add_argument("name")
    p.add_argument("--size", nargs=2, type=int, default=(320, 320), metavar=("H", "W"))
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as err:
        print(f"cvzoo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
