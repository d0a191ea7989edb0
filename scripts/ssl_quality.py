"""k-NN and linear-probe accuracy of self-supervised methods pre-trained on digits, against the same backbone
at random initialisation (issue 7's bar: >= 10 points of k-NN accuracy over random init).

    python scripts/ssl_quality.py [--models simclr_resnet_micro byol_resnet_micro ...] [--steps N] [--out DIR]

Each model is trained exactly as `cvzoo train -m MODEL -d digits` trains it (its zoo training defaults, seed 0,
labels unused; `--digit-views`: with `digit_views` instead of its default augmentation), then its pooled
backbone features of the digits train split (1,437 images) and test split (360) are extracted: weighted
20-NN accuracy (cosine, temperature 0.07) and a linear probe (L-BFGS logistic regression on standardised
features) trained on the train split, scored on the test split; and, with few labels, the accuracy of the
nearest labelled neighbour when only 1 or 5 test images a class are labelled (10-way episodes, 200 of them). Prints a
Markdown table (the README's) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from cvzoo.adapt import few_shot_accuracy, nearest_neighbour_predictor
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
    out = {"knn_accuracy": knn_accuracy(xtr, ytr, xte, yte, k=20),
           "linear_probe_accuracy": linear_probe_accuracy(xtr, ytr, xte, yte)}
    # few labels: nearest labelled neighbour among 1 or 5 labelled test images a class (10-way episodes)
    features = TensorDataset(xte, yte)
    for shots in (1, 5):
        out[f"nn_{shots}_label_accuracy"] = few_shot_accuracy(nearest_neighbour_predictor(lambda f: f), features,
                                                              n_way=10, k_shot=shots, query=10, episodes=200)[0]
    return out


def digit_views(image_size: int = 32):
    """Views for digits: crops of 40-100% (small crops cut digits into other digits' strokes), no flips (a
    mirrored 3 is not a 3); the same pair for every method."""
    from cvzoo.ssl.views import TwoViews, ssl_augmentation

    return TwoViews(ssl_augmentation(image_size, scale=(0.4, 1.0), hflip=False))


def train_with_views(name: str, steps: int | None, views) -> tuple[object, int, float]:
    """Trains zoo model `name` on the digits train split with its zoo training settings (as `cvzoo train` does)
    but with `views` in place of its default augmentation; -> (model, steps, seconds)."""
    from cvzoo.train import Trainer
    from cvzoo.zoo import get_entry

    defaults = get_entry(name).train_defaults
    steps = steps or defaults["steps"]
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, views=views)
    loader = DataLoader(Digits("train", image_size=32, channels=1), batch_size=defaults["batch_size"], shuffle=True,
                        drop_last=True)
    trainer = Trainer(model, lr=defaults["lr"], weight_decay=defaults["weight_decay"], max_steps=steps,
                      warmup_steps=steps // 10, batch_transform=lambda x, y: (model.signature.normalize(x), y),
                      progress=False, seed=0)
    started = time.perf_counter()
    trainer.fit(loader)
    return trainer.eval_model, steps, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="runs/ssl_quality")
    parser.add_argument("--digit-views", action="store_true", help="train with `digit_views` instead of each "
                                                                   "method's default augmentation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        if args.digit_views:
            model, steps, seconds = train_with_views(name, args.steps, digit_views())
        else:
            started = time.perf_counter()
            run = train(TrainSettings(model=name, dataset="digits", steps=args.steps, out=str(out / name),
                                      progress=False, seed=0), log=lambda msg: None)
            seconds = time.perf_counter() - started
            model, _ = load_run(run["run_dir"])
            steps = run["steps"]
        torch.manual_seed(0)
        random_init = create_model(name, in_channels=1)
        results[name] = {"trained": measure(model), "random_init": measure(random_init), "steps": steps,
                         "train_seconds": seconds, "views": "digit_views" if args.digit_views else "default"}
        print(name, json.dumps(results[name]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = ["| model | views | steps | 20-NN | linear probe | NN, 1 label a class | NN, 5 labels a class |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        t, b = r["trained"], r["random_init"]
        cells = [f"{b[key]:.1%} -> **{t[key]:.1%}**" for key in ("knn_accuracy", "linear_probe_accuracy",
                                                                 "nn_1_label_accuracy", "nn_5_label_accuracy")]
        rows.append(f"| `{name}` | {r['views']} | {r['steps']} | " + " | ".join(cells) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
