"""Tiny CLIP trained from scratch on captioned shapes, scored zero-shot on colour/shape combinations it never saw
(issue 7's figure).

    python scripts/clip_quality.py [--steps 6000] [--images 4096] [--out DIR]

A `TinyCLIP` (ResNet-micro image side, a 2-layer word-level text transformer with mean pooling and no causal
mask) trains with the symmetric CLIP loss on `ShapesCaptions("train", combinations="seen")` ("a red circle",
...; 16 of the 20 colour/shape pairs, 32 px), batch 64, AdamW lr 2e-3 with cosine decay, through cvzoo's
`Trainer`. Zero-shot accuracy is then measured on the 4 held-out pairs ("red square", "blue star", "green
triangle", "yellow circle") of the test split, choosing among all 20 class names (chance 5%), and on the
seen pairs of the test split for comparison, against the same model at initialisation. Writes
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvzoo.backbones import resnet_micro
from cvzoo.data.shape_captions import ShapesCaptions
from cvzoo.ssl.clip import TinyCLIP, TinyTextEncoder, WordTokenizer, zero_shot_accuracy
from cvzoo.train import Trainer

TEMPLATES = ("a {}",)


# captions that name both words, or one of them: the partial ones tie each word to its own visual attribute, which
# is what lets unseen pairs be composed
CAPTIONS = ("a {colour} {shape}", "a {colour} shape", "a {shape}")


def build(seed: int = 0, text_layers: int = 2, templates=CAPTIONS) -> TinyCLIP:
    torch.manual_seed(seed)
    tokenizer = WordTokenizer(ShapesCaptions.vocabulary_of(templates=templates), context_length=8)
    text = TinyTextEncoder(tokenizer.vocab_size, width=64, layers=text_layers, heads=4, context_length=8,
                           pool="mean", causal=False)
    return TinyCLIP(resnet_micro(out_indices=(3,)), text, embed_dim=64, tokenizer=tokenizer)


def scores(model: TinyCLIP) -> dict[str, float]:
    held_out = ShapesCaptions("test", num_images=400, combinations="held_out", target="label")
    seen = ShapesCaptions("test", num_images=400, combinations="seen", target="label")
    names = held_out.classnames  # all 20 pairs, whatever the split draws
    return {"held_out_pairs": zero_shot_accuracy(model, model.tokenizer, held_out, names, TEMPLATES),
            "seen_pairs": zero_shot_accuracy(model, model.tokenizer, seen, names, TEMPLATES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--full-captions-only", action="store_true",
                        help="train on 'a {colour} {shape}' captions only (no partial captions)")
    parser.add_argument("--out", default="runs/clip_quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    templates = ("a {colour} {shape}",) if args.full_captions_only else CAPTIONS
    model = build(text_layers=args.text_layers, templates=templates)
    at_init = scores(model)
    print("at initialisation", json.dumps(at_init), flush=True)
    data = ShapesCaptions("train", num_images=args.images, combinations="seen", templates=templates,
                          tokenizer=model.tokenizer)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
    trainer = Trainer(model, lr=2e-3, weight_decay=args.weight_decay, max_steps=args.steps, warmup_steps=200,
                      batch_transform=lambda x, y: (model.signature.normalize(x), y), progress=False, seed=0)
    started = time.perf_counter()
    trainer.fit(loader)
    seconds = time.perf_counter() - started
    trained = scores(model)
    result = {"trained": trained, "at_initialisation": at_init, "chance": 1 / 20, "steps": args.steps,
              "train_images": args.images, "train_seconds": seconds}
    print(json.dumps(result), flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
