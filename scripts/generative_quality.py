"""Sample quality of the zoo's digits generators, measured by a separately trained digits classifier.

    python scripts/generative_quality.py [--models ddpm_digits cdcgan_digits ...] [--steps N] [--out DIR]

1. A judge: a small CNN (cvzoo's ConvEncoder + ClassificationHead) trained on the digits train split at
   16 px, reported with its test accuracy (the bar is >= 97%).
2. Each model is trained exactly as `cvzoo train -m MODEL -d digits` trains it (its zoo training defaults,
   seed 0), then measured:
   - Frechet distance (torchmetrics' FID with the judge's pooled features as the extractor) between the
     digits train images and 1,000 samples (500 for the slow Langevin sampler), next to the same
     architecture at random initialisation;
   - class-conditional models: the fraction of samples the judge assigns to the requested class (100 per
     class), with guidance scales 1 and 3 for diffusion (sampled with DDIM, 50 steps, eta 0);
   - autoencoders: test reconstruction MSE (pixels in [0, 1]) and the FID of test reconstructions;
     the VAE also its test ELBO in nats per image.
Results go to OUT/results.json and a Markdown table is printed (the README's model table).
It takes about 25 minutes on 2 CPU cores; the figures in the README come from this script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvzoo.classification import ImageClassifier
from cvzoo.data.digits import Digits
from cvzoo.experiment import TrainSettings, load_run, train
from cvzoo.generative import ClassifierFeatures, ConvEncoder, class_agreement, frechet_distance
from cvzoo.heads import ClassificationHead
from cvzoo.train import Trainer
from cvzoo.zoo import create_model

MODELS = ("noop_generator", "autoencoder_digits", "vae_digits", "vqvae_digits", "dcgan_digits", "cdcgan_digits",
          "ddpm_digits", "ddpm_unet2d_digits", "ncsn_digits")
IMAGE_SIZE = 16


def _images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = Digits(split, image_size=IMAGE_SIZE, channels=1)
    images, labels = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.stack(labels)


def train_judge(steps: int = 1500, seed: int = 0) -> tuple[ImageClassifier, float]:
    """A digits classifier at 16 px and its test accuracy. Random shifts of up to 1 pixel as augmentation."""
    torch.manual_seed(seed)
    encoder = ConvEncoder(in_channels=1, widths=(32, 64, 128), depth=2)
    judge = ImageClassifier(encoder, ClassificationHead(128, 10, dropout=0.2))
    train_set = Digits("train", image_size=IMAGE_SIZE, channels=1)

    def shift(images, labels):
        dx, dy = torch.randint(-1, 2, (2,)).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
        return judge.signature.normalize(images), labels

    trainer = Trainer(judge, max_steps=steps, lr=3e-3, weight_decay=0.05, warmup_steps=50, progress=False,
                      batch_transform=shift, device="cpu", log_every=100)
    trainer.fit(DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True))
    judge.eval()
    images, labels = _images("test")
    return judge, class_agreement(judge, images, labels)


def _sample(model, labels: torch.Tensor | None, guidance: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Samples in [0, 1]: DDIM 50 steps for diffusion, 30 Langevin steps a level for NCSN, in chunks."""
    g = torch.Generator().manual_seed(seed)
    kwargs: dict = {}
    name = type(model).__name__
    if name == "GaussianDiffusion":
        kwargs = {"sampler": "ddim", "num_steps": 50, "guidance_scale": guidance}
    elif name == "NCSN":
        kwargs = {"steps_per_level": 30}
    out = []
    count = len(labels)
    for start in range(0, count, 250):
        chunk = labels[start:start + 250]
        extra = {"labels": chunk} if getattr(model, "num_classes", None) else {}
        out.append(model.sample(len(chunk), generator=g, **extra, **kwargs))
    return torch.cat(out)


def measure(model, judge, real: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], num_samples: int) -> dict:
    """The figures of one (trained or random) model, as described in the module docstring."""
    model.eval()
    features = ClassifierFeatures(judge, IMAGE_SIZE)
    test_images, test_labels = test
    result: dict = {}
    with torch.no_grad():
        if not hasattr(model, "sample"):  # the plain autoencoder: reconstructions only
            rec = model.reconstruct(model.signature.normalize(test_images))
            result["reconstruction_mse"] = float((rec - test_images).square().mean())
            result["fid"] = frechet_distance(features, real, rec)
            return result
        labels = torch.arange(10).repeat_interleave(num_samples // 10)
        samples = _sample(model, labels)
        result["fid"] = frechet_distance(features, real, samples)
        if getattr(model, "num_classes", None):
            result["class_agreement"] = class_agreement(judge, samples, labels)
            if type(model).__name__ == "GaussianDiffusion":
                guided = _sample(model, labels, guidance=3.0)
                result["fid_guidance_3"] = frechet_distance(features, real, guided)
                result["class_agreement_guidance_3"] = class_agreement(judge, guided, labels)
        if hasattr(model, "reconstruct"):
            rec = model.reconstruct(model.signature.normalize(test_images))
            result["reconstruction_mse"] = float((rec - test_images).square().mean())
        if hasattr(model, "elbo"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                result["test_elbo_nats"] = float(model.elbo(model.signature.normalize(test_images)).mean())
    del test_labels
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="override every model's training steps")
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--out", default="runs/generative_quality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    judge, accuracy = train_judge(args.judge_steps)
    print(f"judge: test accuracy {accuracy:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    results: dict = {"judge_test_accuracy": accuracy, "models": {}}
    real, _ = _images("train")
    test = _images("test")
    for name in args.models:
        t0 = time.perf_counter()
        settings = TrainSettings(model=name, dataset="digits", steps=args.steps, out=str(out / name),
                                 progress=False, seed=0)
        run = train(settings, log=lambda msg: None)
        seconds = time.perf_counter() - t0
        model, run_json = load_run(run["run_dir"])
        trained = measure(model, judge, real, test, 500 if name == "ncsn_digits" else 1000)
        torch.manual_seed(1)
        random_init = measure(create_model(name, **run_json["model_kwargs"]), judge, real, test,
                              500 if name == "ncsn_digits" else 1000)
        results["models"][name] = {"trained": trained, "random_init": {"fid": random_init["fid"]},
                                   "steps": run["steps"], "train_seconds": seconds,
                                   "measure_seconds": time.perf_counter() - t0 - seconds}
        print(f"{name}: {json.dumps(results['models'][name])}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    rows = ["| model | steps | train time | FID (random init) | FID | class agreement | reconstruction MSE | "
            "test ELBO |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["models"].items():
        t = r["trained"]
        fid = f"{t['fid']:.1f}" + (f" ({t['fid_guidance_3']:.1f} at guidance 3)" if "fid_guidance_3" in t else "")
        agree = "" if "class_agreement" not in t else f"{t['class_agreement']:.1%}" + (
            f" ({t['class_agreement_guidance_3']:.1%} at guidance 3)" if "class_agreement_guidance_3" in t else "")
        rows.append(f"| `{name}` | {r['steps']} | {r['train_seconds'] / 60:.1f} min | {r['random_init']['fid']:.1f} | "
                    f"{fid} | {agree} | {t.get('reconstruction_mse', float('nan')):.4f} | "
                    f"{t.get('test_elbo_nats', float('nan')):.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
