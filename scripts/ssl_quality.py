"""k-NN and linear-probe accuracy of self-supervised methods pre-trained on digits, against the same backbone
at random initialisation (issue 7's bar: >= 10 points of k-NN accuracy over random init).

    python scripts/ssl_quality.py [--models simclr_resnet_micro byol_resnet_micro ...] [--steps N] [--out DIR]

Each model is trained exactly as `cvzoo train -m MODEL -d digits` trains it (its zoo training defaults, seed 0,
labels unused), then its pooled backbone features of the digits train split (1,437 images) and test split
(360) are extracted: weighted 20-NN accuracy (cosine, temperature 0.07) and a linear probe (L-BFGS logistic
regression on standardised features) trained on the train split, scored on the test split. Prints a
Markdown table (the README's) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvzoo.data.digits import Digits
from cvzoo.experiment import TrainSettings, load_run, train
from cvzoo.ssl.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from cvzoo.zoo import create_model

MODELS = ("simclr_resnet_micro", "byol_resnet_micro")


def measure(model) -> dict[str, float]:
    channels = model.signature.in_channels
    train_loader = DataLoader(Digits("train", image_size=32, channels=channels), batch_size=256)
    test_loader = DataLoader(Digits("test", image_size=32, channels=channels), batch_size=256)
    xtr, ytr = extract_features(model, train_loader)
    xte, yte = extract_features(model, test_loader)
    return {"knn_accuracy": knn_accuracy(xtr, ytr, xte, yte, k=20),
            "linear_probe_accuracy": linear_probe_accuracy(xtr, ytr, xte, yte)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="runs/ssl_quality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        started = time.perf_counter()
        run = train(TrainSettings(model=name, dataset="digits", steps=args.steps, out=str(out / name),
                                  progress=False, seed=0), log=lambda msg: None)
        seconds = time.perf_counter() - started
        model, run_json = load_run(run["run_dir"])
        torch.manual_seed(0)
        random_init = create_model(name, **run_json["model_kwargs"])
        results[name] = {"trained": measure(model), "random_init": measure(random_init), "steps": run["steps"],
                         "train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = ["| model | steps | train time | 20-NN, random init | 20-NN | linear probe, random init | linear probe |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        t, b = r["trained"], r["random_init"]
        rows.append(f"| `{name}` | {r['steps']} | {r['train_seconds'] / 60:.1f} min | {b['knn_accuracy']:.1%} | "
                    f"**{t['knn_accuracy']:.1%}** | {b['linear_probe_accuracy']:.1%} | "
                    f"{t['linear_probe_accuracy']:.1%} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
