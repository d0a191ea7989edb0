"""Few-shot accuracy on held-out digit classes, and debiasing on coloured digits, against their baselines
(issue 9's figures).

    python scripts/adapt_quality.py [--few-shot protonet_resnet_micro maml_resnet_micro ...] [--debias]
                                    [--episodes 300] [--out DIR]

Few-shot: each model trains as `cvzoo train -m MODEL -d digits` does (its zoo defaults, seed 0): episodes of
the base classes 0-4 of the digits train split, each class multiplied by the 8 rotations and flips of the
square. It is then scored on 5-way episodes of the novel classes 5-9 of the test split (1-shot and 5-shot, 15
queries a class, `--episodes` episodes, mean and 95% interval). Baselines on the same episodes: nearest
neighbour (cosine) on random-initialisation features (ResNet-micro's pooled last map; its stride-8 map pooled,
and flattened, which is ProtoNet's embedding at initialisation) and on raw pixels.

Debiasing: `dann_resnet_micro` and the plain `erm_resnet_micro` train on coloured digits (colour = the class's
colour for 95% of the training images; random at test). Reported: test accuracy, and how well fresh probes
(linear, and a 256-unit MLP) read the colour from each model's pooled test features (chance 10%).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvzoo.adapt import attribute_probe_accuracy, few_shot_accuracy, nearest_neighbour_predictor, split_classes
from cvzoo.backbones import resnet_micro
from cvzoo.data import Digits
from cvzoo.data.coloured_digits import ColouredDigits
from cvzoo.experiment import TrainSettings, load_run, train
from cvzoo.zoo import create_model

FEW_SHOT = ("protonet_resnet_micro", "maml_resnet_micro", "anil_resnet_micro")


def few_shot_row(predict, dataset, novel, episodes, transform=None) -> dict[str, list[float]]:
    return {f"{k}shot": list(few_shot_accuracy(predict, dataset, n_way=5, k_shot=k, query=15, episodes=episodes,
                                               classes=novel, transform=transform)) for k in (1, 5)}


def run_few_shot(models, episodes: int, out: Path) -> dict:
    test = Digits("test", image_size=32, channels=1)
    _, novel = split_classes(10)
    results = {}
    for name in models:
        started = time.perf_counter()
        run = train(TrainSettings(model=name, dataset="digits", out=str(out / name), progress=False, seed=0),
                    log=lambda msg: None)
        seconds = time.perf_counter() - started
        model, _ = load_run(run["run_dir"])
        model.eval()
        results[name] = {**few_shot_row(model.predict, test, novel, episodes, model.signature.normalize),
                         "steps": run["steps"], "train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
    torch.manual_seed(0)
    own = create_model("protonet_resnet_micro", in_channels=1).eval()  # its embedding at initialisation
    torch.manual_seed(0)
    pooled = create_model("protonet_resnet_micro", in_channels=1, pool="avg").eval()
    torch.manual_seed(0)
    deep = resnet_micro(in_channels=1, out_indices=(3,)).eval()  # the whole trunk, pooled
    baselines = {
        "nearest_neighbour_random_resnet_micro_pooled": (lambda x: deep(x)[-1].mean((2, 3)), deep.signature.normalize),
        "nearest_neighbour_random_stride8_pooled": (pooled, pooled.signature.normalize),
        "nearest_neighbour_random_stride8_flattened": (own, own.signature.normalize),
        "nearest_neighbour_pixels": (lambda x: x, None),
    }
    for name, (encoder, transform) in baselines.items():
        results[name] = few_shot_row(nearest_neighbour_predictor(encoder), test, novel, episodes, transform)
        print(name, json.dumps(results[name]), flush=True)
    return results


@torch.no_grad()
def pooled_test_features(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    test = ColouredDigits("test")
    feats, labels, colours = [], [], []
    for images, targets in DataLoader(test, batch_size=256):
        feats.append(model.features(model.signature.normalize(images)))
        labels.append(targets["label"])
        colours.append(targets["colour"])
    return torch.cat(feats), torch.cat(labels), torch.cat(colours)


def run_debias(out: Path) -> dict:
    results = {}
    for name in ("erm_resnet_micro", "dann_resnet_micro"):
        started = time.perf_counter()
        run = train(TrainSettings(model=name, dataset="coloured-digits", out=str(out / name), progress=False,
                                  seed=0), log=lambda msg: None)
        seconds = time.perf_counter() - started
        model, _ = load_run(run["run_dir"])
        model.eval()
        feats, labels, colours = pooled_test_features(model)
        results[name] = {
            "test_accuracy": run["metrics"]["accuracy"],
            "own_adversary_colour_accuracy": run["metrics"]["adversary_accuracy"],
            "linear_probe_colour_accuracy": attribute_probe_accuracy(feats, colours),
            "mlp_probe_colour_accuracy": attribute_probe_accuracy(feats, colours, hidden_dim=256),
            "linear_probe_digit_accuracy": attribute_probe_accuracy(feats, labels),
            "steps": run["steps"], "train_seconds": seconds,
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--few-shot", nargs="*", default=list(FEW_SHOT))
    parser.add_argument("--debias", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--out", default="runs/adapt_quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.few_shot:
        results["few_shot"] = run_few_shot(args.few_shot, args.episodes, out)
    if args.debias:
        results["debiasing"] = run_debias(out)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
