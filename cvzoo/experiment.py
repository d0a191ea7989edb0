"""An experiment: a zoo model trained on a registered dataset, with the artefacts a run leaves behind.

This is what `cvzoo train / eval / predict` run. It composes the parts (zoo, data, augment, train) and
owns the experiment-level decisions: which models fit which datasets, the per-task evaluation, the
tracker, and the run directory:

    runs/<name>/
        run.json            what was trained on what, with which settings (read back by eval/predict)
        checkpoints/        trainer checkpoints (last.pt, previous.pt), resumable with --resume
        model.safetensors   the final weights (the EMA weights when EMA is on)
        metrics.csv/.jsonl  every logged record; metrics.json the final evaluation
        curves.png          losses, learning rate and validation metrics against the step
        predictions.png     the model's predictions on validation images
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# model task (zoo) for each dataset task (data registry): the pairs that train together
TRAINABLE_TASKS = ("detection", "classification", "regression", "multitask", "segmentation", "generation",
                   "self_supervised", "few_shot", "debiasing", "zero_shot")
# model tasks that train on another task's datasets: generative models learn the images of a labelled set
# (class-conditional ones use its labels)
DATA_TASK = {"generation": "classification", "self_supervised": "classification", "few_shot": "classification",
             "zero_shot": "captions"}
# tasks whose baseline is not an image-blind `noop_*` model: a self-supervised method's floor is its own
# backbone at random initialisation (`cvzoo.ssl.evaluate`), a few-shot learner's is nearest neighbour on random
# features, a debiasing model's is the plain model (`erm_resnet_micro`)
NO_NOOP_TASKS = ("self_supervised", "few_shot", "debiasing", "zero_shot")
ZERO_SHOT_TEMPLATES = ("a {}",)  # the prompt a class name is put in for zero-shot classification
# few-shot evaluation: episodes of each shot count on the held-out classes of the held-out split
FEW_SHOT_EVAL_WAYS = 5
FEW_SHOT_EVAL_SHOTS = (1, 5)
FEW_SHOT_EVAL_EPISODES = 100
# `-m noop`: the image-blind baseline of the dataset's task
NOOP_MODELS = {"detection": "noop_detector", "classification": "noop_classifier", "regression": "noop_regressor",
               "multitask": "noop_multitask", "segmentation": "noop_segmenter", "generation": "noop_generator"}
DEFAULT_MODEL = "fcos_micro"
DEFAULT_DATASET = "shapes"
# the split validated on, where there is no "val"
HELD_OUT_SPLIT = {"digits": "test", "coloured-digits": "test", "cifar10": "test"}


def held_out_split(dataset_name: str) -> str:
    return HELD_OUT_SPLIT.get(dataset_name, "val")


@dataclasses.dataclass
class TrainSettings:
    """The settings of `cvzoo train` (defaults: the main job, the small detector on Shapes on CPU)."""

    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    # None below: the model's zoo entry's `train_defaults`, else the value in GENERAL_DEFAULTS
    steps: int | None = None  # default: 1,000, unless epochs is given
    epochs: int | None = None
    batch_size: int | None = None  # 16
    lr: float | None = None  # 2e-3
    weight_decay: float | None = None  # 0.05
    warmup_steps: int | None = None  # 100
    clip_grad_norm: float | None = 10.0
    augment: str | None = None  # "flip": "none", "flip" (horizontal flips, no extra needed), or a kornia preset
    device: str = "auto"
    strategy: str = "auto"  # "auto" (DDP under torchrun), "single", "ddp", "fsdp"
    amp: str | None = None
    compile: bool = False
    channels_last: bool = False
    ema_decay: float | None = None
    grad_accum: int = 1
    num_workers: int = 0
    data_root: str | None = None
    train_images: int | None = None  # Shapes: number of generated training images
    val_images: int | None = None  # Shapes: number of held-out images evaluated on
    out: str | None = None
    resume: str | None = None
    seed: int = 0
    progress: bool = True
    eval_every: int | None = None  # default: 5 evaluations over the run (with --steps), else each epoch

    def __post_init__(self) -> None:
        self.dataset = resolve_dataset_name(self.dataset)
        self.model = resolve_model_name(self.model, self.dataset)
        defaults = {**GENERAL_DEFAULTS, **model_train_defaults(self.model)}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("steps", "epochs", "train_images", "val_images", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")


GENERAL_DEFAULTS = {"batch_size": 16, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 100, "augment": "flip",
                    "steps": None, "ema_decay": None}


def model_train_defaults(name: str) -> dict[str, Any]:
    """The training settings a zoo model asks for (its entry's `train_defaults`); {} for unknown names."""
    from cvzoo.zoo import MODELS

    return dict(MODELS[name].train_defaults) if name in MODELS else {}


def resolve_dataset_name(name: str) -> str:
    """A registered dataset name; underscores stand for dashes (`shapes_segmentation` = `shapes-segmentation`)."""
    from cvzoo.data.registry import DATASETS

    return name if name in DATASETS or name.replace("_", "-") not in DATASETS else name.replace("_", "-")


def resolve_model_name(name: str, dataset: str) -> str:
    """A zoo name; "noop" picks the image-blind baseline of `dataset`'s task (`-m noop -d voc_segmentation`)."""
    from cvzoo.data.registry import DATASETS

    if name == "noop" and dataset in DATASETS and DATASETS[dataset].task in NOOP_MODELS:
        return NOOP_MODELS[DATASETS[dataset].task]
    return name


# ---- which models fit which datasets -----------------------------------------------------------------

def models_for_task(task: str) -> list[str]:
    """The zoo models that train on datasets of `task` (generative models train on classification sets)."""
    from cvzoo.zoo import list_models

    if task not in TRAINABLE_TASKS:
        return []
    return list_models(task) + [n for t, d in DATA_TASK.items() if d == task for n in list_models(t)]


def datasets_for_task(task: str) -> list[str]:
    """The registered datasets a model of `task` trains on."""
    from cvzoo.data.registry import list_datasets

    return list_datasets(DATA_TASK.get(task, task)) if task in TRAINABLE_TASKS else []


def check_pair(model_name: str, dataset_name: str) -> tuple[str, str]:
    """(model task, dataset task) when the pair trains together; otherwise a ValueError listing what fits."""
    from cvzoo.data.registry import DATASETS
    from cvzoo.zoo import get_entry

    model_task = get_entry(model_name).task
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}; known datasets: {', '.join(DATASETS)}")
    data_task = DATASETS[dataset_name].task
    if DATA_TASK.get(model_task, model_task) != data_task:
        fits = models_for_task(data_task)
        fit_data = datasets_for_task(model_task)
        raise ValueError(
            f"model {model_name!r} ({model_task}) does not train on dataset {dataset_name!r} ({data_task}). "
            f"Models for {dataset_name!r}: {', '.join(fits) or 'none'}. "
            f"Datasets for {model_name!r}: {', '.join(fit_data) or f'none ({model_task} models are parts, not tasks)'}."
        )
    return model_task, data_task


def model_kwargs(model_name: str, info: Any) -> dict[str, Any]:
    """Builder arguments that fit a model to a dataset (its number of classes, outputs, channels)."""
    from cvzoo.zoo import get_entry

    params = inspect.signature(get_entry(model_name).builder).parameters
    kwargs: dict[str, Any] = {}
    if "num_classes" in params and info.classes:
        kwargs["num_classes"] = len(info.classes)
    if "num_outputs" in params:
        kwargs["num_outputs"] = 1
    if "num_keypoints" in params:
        kwargs["num_keypoints"] = 4
    if "in_channels" in params:
        kwargs["in_channels"] = info.in_channels
    return kwargs


def build_dataset(name: str, split: str, settings: TrainSettings | None = None, in_channels: int | None = None,
                  image_size: int | None = None):
    """A registered dataset for `split`, with the settings that apply to it (root, size, channels); digits are
    resized to `image_size` when given (a generative model's fixed size)."""
    from cvzoo.data.registry import DATASETS, create_dataset

    entry = DATASETS[name]
    kwargs: dict[str, Any] = {}
    if settings is not None and settings.data_root is not None:
        kwargs["root"] = settings.data_root
    if entry.needs_root and "root" not in kwargs:
        raise ValueError(f"dataset {name!r} reads files from disk: pass its location with --data-root")
    if settings is not None and name.startswith("shapes"):
        count = settings.train_images if split == "train" else settings.val_images
        if count is not None:
            kwargs["num_images"] = count
    if in_channels is not None and name == "digits":  # grey digits, replicated for RGB models
        kwargs["channels"] = in_channels
    if image_size is not None and name == "digits":
        kwargs["image_size"] = image_size
    return create_dataset(name, split=split, **kwargs)


# ---- batches, augmentation, evaluation ---------------------------------------------------------------

def target_keys(model: nn.Module) -> tuple[str, ...]:
    """The keys of a detection target dict that `model` reads: boxes and labels, plus what its per-object
    branches need (masks, keypoints, attributes)."""
    fields = model.target_fields() if hasattr(model, "target_fields") else {}
    keys = ["boxes", "labels"]
    if fields.get("masks"):
        keys.append("masks")
    if fields.get("num_keypoints") is not None:
        keys.append("keypoints")
    keys += list(fields.get("attributes", {}))
    return tuple(keys)


def collate_for(task: str, keys: Sequence[str] = ("boxes", "labels")) -> Callable[[list], Any]:
    """The batch collation of a task; detection targets keep `keys` only (what the model reads: other
    fields would only be copied to the device)."""
    from torch.utils.data import default_collate

    from cvzoo.data.collate import detection_collate

    if task == "segmentation":
        from cvzoo.data.collate import segmentation_collate

        return segmentation_collate
    if task != "detection":
        return default_collate

    def collate(batch: list) -> tuple[Any, list[dict[str, Tensor]]]:
        images, targets = detection_collate(batch)
        return images, [{k: t[k] for k in keys} for t in targets]

    return collate


def check_target_fields(model: nn.Module, info: Any) -> None:
    """A ValueError when the dataset lacks a target field the model trains on (e.g. masks for Mask R-CNN)."""
    missing = [k for k in target_keys(model) if k not in info.target_fields]
    if missing:
        raise ValueError(f"the model trains on target fields {missing} that dataset {info.name!r} does not provide "
                         f"(it has {list(info.target_fields)})")


def _device_of(images: Any) -> torch.device:
    return images.device if isinstance(images, Tensor) else images[0].device


def _flip_detection(images: Tensor, targets: list[dict[str, Tensor]], flip: Tensor,
                    keypoint_flip: Sequence[int] | None = None) -> list[dict[str, Tensor]]:
    """Horizontal flip of the flagged images' targets: boxes, masks, and keypoints (x mirrored, then
    reordered by `keypoint_flip` so left and right points swap)."""
    w = images.shape[-1]
    out = []
    for t, f in zip(targets, flip.tolist()):  # per image: the targets are a list of variable-size dicts
        if not f:
            out.append(t)
            continue
        t = dict(t)
        boxes = t["boxes"]
        t["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        if "masks" in t:
            t["masks"] = t["masks"].flip(-1)
        if "keypoints" in t:
            if keypoint_flip is None:
                raise ValueError("augment='flip' with keypoint targets needs the dataset's keypoint_flip order "
                                 "(DatasetInfo.keypoint_flip); use augment='none'")
            kp = t["keypoints"].clone()
            kp[..., 0] = w - kp[..., 0]
            t["keypoints"] = kp[:, list(keypoint_flip)]
        out.append(t)
    return out


def make_batch_transform(model: nn.Module, task: str, augment: str, image_size: tuple[int, int] | None,
                         keypoint_flip: Sequence[int] | None = None) -> Callable[[Any, Any], tuple[Any, Any]]:
    """(images in [0, 1], targets) on the device -> (augmented, normalised images, targets), for training.

    Random draws come from torch's global generator, which the trainer's checkpoints save and restore,
    so a resumed run flips the same images as an uninterrupted one.
    """
    normalize = model.signature.normalize
    if augment not in ("none", "flip", "light", "medium", "heavy"):
        raise ValueError(f"augment must be 'none', 'flip', 'light', 'medium' or 'heavy', got {augment!r}")
    kornia_aug = None
    if augment in ("light", "medium", "heavy"):
        from cvzoo import augment as aug

        if image_size is None:
            raise ValueError(f"augment={augment!r} needs a dataset with a fixed image size")
        if task == "detection":
            kornia_aug = aug.DetectionAugment(preset=augment, size=image_size)
        elif task == "segmentation":
            kornia_aug = aug.SegmentationAugment(preset=augment, size=image_size)
        elif task == "classification":
            kornia_aug = aug.ClassificationAugment(preset=augment, size=image_size)
        else:
            raise ValueError(f"augment={augment!r} has no preset for {task} targets; use 'none' or 'flip'")
    def transform(images: Any, targets: Any) -> tuple[Any, Any]:
        if kornia_aug is not None:
            kornia_aug.to(images.device)
            images, targets = kornia_aug(images, targets)
        elif augment == "flip" and task in ("detection", "classification", "segmentation") \
                and isinstance(images, Tensor):
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
            if task == "detection":
                targets = _flip_detection(images, targets, flip, keypoint_flip)
            elif task == "segmentation":
                targets = torch.where(flip.to(targets.device)[:, None, None], targets.flip(-1), targets)
        if task == "generation":
            images = resize_for_generator(images, model)
        if task == "detection":
            # one padded batch, validated here: the (compiled) loss then has no data-dependent checks
            from cvzoo.detection.structures import TargetBatch

            fields = model.target_fields() if hasattr(model, "target_fields") else {}
            targets = TargetBatch.from_list(targets, len(targets), model.num_classes, _device_of(images), **fields)
        if isinstance(images, Tensor):
            return normalize(images), targets
        return [normalize(im[None])[0] for im in images], targets

    return transform


def resize_for_generator(images: Tensor, model: nn.Module) -> Tensor:
    """(B, C, H, W) -> (B, C, S, S) at a fixed-size generative model's `image_size` S (antialiased bilinear),
    so that it learns any classification set; unchanged when already at that size."""
    size = getattr(model, "image_size", None)
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def normalized(loader: Iterable, model: nn.Module, device: torch.device) -> Iterable:
    """`loader`'s batches with images moved to `device` and normalised for `model` (for evaluation)."""
    normalize = model.signature.normalize

    class _Normalized:
        def __iter__(self):
            for images, targets in loader:
                if isinstance(images, Tensor):
                    yield normalize(images.to(device)), targets
                else:
                    yield [normalize(im.to(device)[None])[0] for im in images], targets

        def __len__(self) -> int:
            return len(loader)

    return _Normalized()


@torch.no_grad()
def evaluate_task(model: nn.Module, loader: Iterable, task: str, classes: Sequence[str] = (),
                  per_class: bool = False) -> dict[str, float]:
    """Validation metrics of `model` on (images in [0, 1], targets) batches:

    generation: the mean of each `model.loss` term (a VAE's negative ELBO, a diffusion model's denoising
    error; sample quality is measured by `cvzoo.generative.evaluate`);
    self_supervised: the mean loss terms and the leave-one-out weighted 20-NN accuracy of the held-out images'
    features (labels used for evaluation only);
    few_shot: N-way 1- and 5-shot accuracy on episodes of the held-out classes (`few_shot_metrics`);
    debiasing: label accuracy and the model's adversary's accuracy on the nuisance (e.g. colour);
    zero_shot: the mean loss terms and zero-shot accuracy among all class names, on the images of class pairs
    never seen in training and on the seen ones (`dataset.zero_shot_splits()`);
    detection: COCO mAP, mAP50, mAP75, mAR100 (torchmetrics), with `per_class` also "AP/<class>" (COCO AP,
    -1 for a class without ground truth); classification: top-1 accuracy;
    regression: mean absolute and root-mean-square error; multitask: label accuracy, value MAE, keypoint MAE;
    segmentation: mean IoU and pixel accuracy (torchmetrics), with `per_class` also "IoU/<class>".
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches = normalized(loader, model, device)
        if task == "detection":
            from cvzoo.detection.evaluate import evaluate

            keys = target_keys(model)
            iou_types = ("bbox",) + (("segm",) if "masks" in keys else ()) + (("keypoints",) if "keypoints" in keys
                                                                               else ())
            r = evaluate(model, batches, device=device, class_names=list(classes) or None, iou_types=iou_types)
            out = {"mAP": r["map"], "mAP50": r["map_50"], "mAP75": r["map_75"], "mAR100": r["mar_100"]}
            if "segm" in iou_types:
                out.update({"mask_mAP": r["segm_map"], "mask_mAP50": r["segm_map_50"]})
            if "keypoints" in iou_types:
                out.update({"keypoint_AP": r["keypoints_map"], "keypoint_AP50": r["keypoints_map_50"]})
            if per_class:
                out.update({f"AP/{name}": ap for name, ap in r["per_class"].items()})
            return out
        if task == "generation":
            return mean_losses(model, ((resize_for_generator(im, model), t) for im, t in batches))
        if task == "self_supervised":
            from cvzoo.ssl.evaluate import knn_accuracy

            out = mean_losses(model, batches)
            feats, labels = [], []
            for images, targets in normalized(loader, model, device):  # the features of the held-out images
                feats.append(model(images).float().cpu())
                labels.append(torch.as_tensor(targets).cpu())
            feats_all, labels_all = torch.cat(feats), torch.cat(labels).long()
            k = min(20, feats_all.shape[0] - 1)
            if k >= 1:
                out["knn_accuracy"] = knn_accuracy(feats_all, labels_all, feats_all, labels_all, k=k)
            return out
        if task == "few_shot":
            return few_shot_metrics(model, loader.dataset, device)  # type: ignore[attr-defined]
        if task == "zero_shot":  # the contrastive loss, and zero-shot accuracy on unseen and seen class pairs
            from cvzoo.ssl.clip import zero_shot_accuracy

            dataset = loader.dataset  # type: ignore[attr-defined]
            out = mean_losses(model, batches)
            for name, subset in dataset.zero_shot_splits().items():
                out[f"zero_shot_accuracy_{name}"] = zero_shot_accuracy(model, model.tokenizer, subset,
                                                                       dataset.classnames, ZERO_SHOT_TEMPLATES)
            return out
        if task == "debiasing":  # label accuracy, and how well the model's own adversary still reads the nuisance
            correct = adversary_correct = total = 0
            for images, targets in batches:
                out = model(images)
                correct += int((out.logits.argmax(-1).cpu() == targets["label"]).sum())
                adversary_correct += int((out.adversary_logits.argmax(-1).cpu() == targets[model.adversary_target])
                                         .sum())
                total += len(targets["label"])
            return {"accuracy": correct / max(total, 1), "adversary_accuracy": adversary_correct / max(total, 1)}
        if task == "segmentation":
            from cvzoo.segmentation.metrics import evaluate_segmentation

            r = evaluate_segmentation(model, batches, device=device, class_names=list(classes) or None)
            out = {"mIoU": r["mIoU"], "pixel_accuracy": r["pixel_accuracy"]}
            if per_class:
                out.update({k: v for k, v in r.items() if k.startswith("IoU/")})
            return out
        correct = total = 0
        abs_err = sq_err = kp_err = 0.0
        n_values = n_kp = 0
        for images, targets in batches:
            pred = model.predict(images)
            if task == "classification":
                correct += int((pred.labels.cpu() == targets.cpu()).sum())
                total += len(targets)
            elif task == "regression":
                err = pred.float().cpu() - targets.float().reshape(pred.shape)
                abs_err += float(err.abs().sum())
                sq_err += float(err.square().sum())
                n_values += err.numel()
            else:
                correct += int((pred["label"].labels.cpu() == targets["label"]).sum())
                total += len(targets["label"])
                err = pred["value"].float().cpu() - targets["value"].float().reshape(pred["value"].shape)
                abs_err += float(err.abs().sum())
                n_values += err.numel()
                kp = pred["keypoints"].float().cpu() - targets["keypoints"].float()
                kp_err += float(kp.abs().sum())
                n_kp += kp.numel()
        if task == "classification":
            return {"accuracy": correct / max(total, 1)}
        if task == "regression":
            return {"MAE": abs_err / max(n_values, 1), "RMSE": math.sqrt(sq_err / max(n_values, 1))}
        return {"accuracy": correct / max(total, 1), "value_MAE": abs_err / max(n_values, 1),
                "keypoint_MAE": kp_err / max(n_kp, 1)}
    finally:
        model.train(was_training)


def mean_losses(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """The mean over images of each `model.loss(images, targets)` term, on normalised batches. Random parts of
    a loss (noise levels, latent draws) come from a fixed seed, so two evaluations of one model agree."""
    sums: dict[str, float] = {}
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for images, targets in batches:
            targets = targets.to(images.device) if isinstance(targets, Tensor) else targets
            losses = model.loss(images, targets)
            n = images.shape[0]
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
    return {k: v / max(count, 1) for k, v in sums.items()}


def generation_grid(model: nn.Module, dataset: Any, count: int = 64, seed: int = 0) -> tuple[Tensor, int]:
    """(images in [0, 1], images a row) to show for a generative model: samples (ten a row of each class for
    a class-conditional model), or reconstructions of `dataset` images next to them for an autoencoder."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        if callable(getattr(model, "sample", None)):
            num_classes = getattr(model, "num_classes", None)
            if num_classes:
                per_class = max(1, count // num_classes)
                labels = torch.arange(num_classes).repeat_interleave(per_class).to(g.device)
                return model.sample(len(labels), labels=labels, generator=g), per_class
            return model.sample(count, generator=g), math.ceil(math.sqrt(count))
        images = torch.stack([dataset[i][0] for i in range(min(count // 2, len(dataset)))]).to(g.device)
        images = resize_for_generator(images, model)
        with torch.no_grad():
            rec = model.reconstruct(model.signature.normalize(images))  # in [0, 1]
        pairs = torch.stack([images, rec], dim=1).flatten(0, 1)  # original, reconstruction, ...
        return pairs, 8
    finally:
        model.train(was_training)


def save_samples_picture(model: nn.Module, dataset: Any, path: Path) -> Path:
    """`generation_grid` written as a PNG (pixels scaled up 4x: digits are 16 px)."""
    from cvzoo.generative.grid import save_grid

    images, per_row = generation_grid(model, dataset)
    return save_grid(images, path, nrow=per_row, scale=4)


# ---- the run --------------------------------------------------------------------------------------------

def default_run_dir(model_name: str, dataset_name: str) -> Path:
    return Path("runs") / f"{model_name}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(settings: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains `settings.model` on `settings.dataset`; returns {"metrics", "run_dir", "seconds"} and writes
    the run directory described in this module's docstring."""
    from torch.utils.data import DataLoader

    from cvzoo.train import Trainer
    from cvzoo.train.checkpoint import export_safetensors
    from cvzoo.train.plots import plot_curves
    from cvzoo.train.tracking import create_tracker
    from cvzoo.zoo import create_model

    task, _ = check_pair(settings.model, settings.dataset)
    torch.manual_seed(settings.seed)
    train_set = build_dataset(settings.dataset, "train", settings)
    kwargs = model_kwargs(settings.model, train_set.info)
    model = create_model(settings.model, **kwargs)
    in_channels = model.signature.in_channels
    image_size = getattr(model, "image_size", None) if task == "generation" else None  # fixed-size generators
    if in_channels != train_set.info.in_channels or image_size is not None:  # e.g. grey digits for an RGB backbone
        train_set = build_dataset(settings.dataset, "train", settings, in_channels, image_size)
    val_set = build_dataset(settings.dataset, held_out_split(settings.dataset), settings, in_channels, image_size)
    info = train_set.info
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the run's files
    run_dir = Path(settings.out) if settings.out else default_run_dir(settings.model, settings.dataset)
    if settings.out is None and "RANK" in os.environ:
        raise ValueError("under torchrun pass --out: each process would otherwise pick its own time-stamped "
                         "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {"model": settings.model, "model_kwargs": kwargs, "dataset": settings.dataset, "task": task,
           "classes": list(info.classes), "settings": dataclasses.asdict(settings)}
    if main_process:
        (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    steps = settings.steps
    if steps is None and settings.epochs is None:
        steps = 1000
    if task == "detection":
        check_target_fields(model, info)
    collate = collate_for(task, target_keys(model))
    if task == "few_shot":  # episodes of the base classes; the held-out classes are for evaluation
        train_loader = episodic_loader(model, train_set, episodes=steps or 1000, num_workers=settings.num_workers,
                                       seed=settings.seed)
    else:
        train_loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                  collate_fn=collate, num_workers=settings.num_workers)
    val_loader = DataLoader(val_set, batch_size=32, shuffle=False, collate_fn=collate,
                            num_workers=settings.num_workers)
    tracker = create_tracker(run_dir, config=run, resume=settings.resume is not None) if main_process else None
    trainer = Trainer(
        model, lr=settings.lr, weight_decay=settings.weight_decay, max_steps=steps, max_epochs=settings.epochs,
        grad_accum=settings.grad_accum, clip_grad_norm=settings.clip_grad_norm, amp=settings.amp,
        compile=settings.compile, channels_last=settings.channels_last, ema_decay=settings.ema_decay,
        warmup_steps=min(settings.warmup_steps, (steps or 10**9) // 10), out_dir=run_dir / "checkpoints",
        tracker=tracker, device=settings.device, strategy=settings.strategy,
        batch_transform=make_batch_transform(model, task, settings.augment, info.image_size, info.keypoint_flip),
        rebuild=lambda: create_model(settings.model, **kwargs), progress=settings.progress, seed=settings.seed,
        eval_every=settings.eval_every or (max(1, steps // 5) if steps else None),  # else: at each epoch end
        checkpoint_every=max(1, steps // 10) if steps else None,  # and at each epoch end, and on SIGTERM
    )
    started = time.perf_counter()
    trainer.fit(train_loader, val_loader,
                evaluate=lambda m, loader: evaluate_task(m, loader, task, info.classes),
                resume=settings.resume)
    seconds = time.perf_counter() - started
    if trainer.interrupted:  # SIGTERM: the trainer saved a checkpoint after the step in progress
        log(f"stopped by SIGTERM after step {trainer.step}; the checkpoint is in {run_dir / 'checkpoints'}; "
            f"continue with: cvzoo train -m {settings.model} -d {settings.dataset} --out {run_dir} --resume auto")
        return {"metrics": {}, "run_dir": run_dir, "seconds": seconds, "steps": trainer.step, "interrupted": True}
    final_model = trainer.eval_model
    if trainer.info.rank == 0:
        metrics = evaluate_task(final_model, val_loader, task, info.classes, per_class=True)
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "seconds": seconds,
                                                          "steps": trainer.step}, indent=2))
        export_safetensors(final_model, run_dir / "model.safetensors")
        try:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png",
                        title=f"{settings.model} on {settings.dataset}")
        except (ImportError, ValueError) as err:
            log(f"no curves plot: {err}")
        if task in ("detection", "segmentation"):
            save_prediction_picture(final_model, val_set, run_dir / "predictions.png", info.classes)
        if task == "generation":
            save_samples_picture(final_model, val_set, run_dir / "samples.png")
    else:
        metrics = {}
    return {"metrics": metrics, "run_dir": run_dir, "seconds": seconds, "steps": trainer.step, "interrupted": False}


def episodic_loader(model: nn.Module, dataset: Any, episodes: int, num_workers: int = 0, seed: int = 0):
    """A DataLoader of the model's N-way K-shot episodes (`model.n_way`, `k_shot`, `query`) over the base
    classes of `dataset` (`cvzoo.adapt.split_classes`: the first half), each multiplied by the 8 rotations and
    flips of the square (`DihedralClasses`: 5 digit classes become 40)."""
    from torch.utils.data import DataLoader

    from cvzoo.adapt import DihedralClasses, EpisodeCollate, EpisodicBatchSampler, split_classes

    base, _ = split_classes(len(dataset.classes))
    expanded = DihedralClasses(dataset, len(dataset.classes), transforms=8)
    sampler = EpisodicBatchSampler(expanded.labels, model.n_way, model.k_shot, model.query, episodes,
                                   classes=expanded.classes_of(base), seed=seed)
    return DataLoader(expanded, batch_sampler=sampler, collate_fn=EpisodeCollate(model.n_way, model.k_shot,
                                                                                 model.query),
                      num_workers=num_workers)


def few_shot_metrics(model: nn.Module, dataset: Any, device: torch.device, shots: Sequence[int] = FEW_SHOT_EVAL_SHOTS,
                     episodes: int = FEW_SHOT_EVAL_EPISODES, query: int = 15) -> dict[str, float]:
    """5-way accuracy on episodes of the held-out (novel) classes of `dataset`, one figure per shot count
    ("5way_1shot_accuracy", ...), with the 95% interval half-widths ("..._ci95")."""
    from cvzoo.adapt import few_shot_accuracy, split_classes

    _, novel = split_classes(len(dataset.classes))
    n_way = FEW_SHOT_EVAL_WAYS
    out = {}
    for k in shots:
        acc, ci = few_shot_accuracy(model.predict, dataset, n_way=n_way, k_shot=k, query=query, episodes=episodes,
                                    classes=novel, transform=model.signature.normalize, device=device)
        out[f"{n_way}way_{k}shot_accuracy"] = acc
        out[f"{n_way}way_{k}shot_ci95"] = ci
    return out


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a finished run (its final weights) and its run.json."""
    from cvzoo.train.checkpoint import load_safetensors
    from cvzoo.zoo import create_model

    run_dir = Path(run_dir)
    meta_path, weights = run_dir / "run.json", run_dir / "model.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {run_dir} is not a finished cvzoo run directory")
    run = json.loads(meta_path.read_text())
    model = create_model(run["model"], **run["model_kwargs"])
    load_safetensors(model, weights)
    return model.eval(), run


def load_model(model_name: str, checkpoint: str | Path, num_classes: int | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo model with the weights of `checkpoint`: a run directory, a `.safetensors` file or a trainer
    checkpoint (`.pt`). The model's size arguments come from the run.json next to it when there is one,
    else from `num_classes`. Returns the model (eval mode) and what is known of its run."""
    from cvzoo.train.checkpoint import load_checkpoint, load_model_state, load_safetensors
    from cvzoo.zoo import create_model, get_entry

    path = Path(checkpoint)
    if path.is_dir():
        return load_run(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    run_json = next((p / "run.json" for p in (path.parent, path.parent.parent) if (p / "run.json").is_file()), None)
    run = json.loads(run_json.read_text()) if run_json is not None else {
        "model": model_name, "model_kwargs": {}, "task": get_entry(model_name).task, "classes": []}
    if run["model"] != model_name:
        raise ValueError(f"checkpoint {path} belongs to a {run['model']!r} run ({run_json}), not {model_name!r}")
    kwargs = dict(run["model_kwargs"])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = create_model(model_name, **kwargs)
    if path.suffix == ".safetensors":
        load_safetensors(model, path)
    else:
        load_model_state(model, load_checkpoint(path)["model"])
    return model.eval(), run


def latest_run(root: str | Path = "runs") -> Path:
    runs = sorted((p for p in Path(root).glob("*") if (p / "model.safetensors").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no finished run under {root}/; train one with `cvzoo train` or pass --run")
    return runs[-1]


def drawable_extras(det: Any, zoom: int = 1) -> dict[str, Tensor]:
    """The masks (> 0.5) and keypoints of a detection's extras, for `draw_detections`, on an image shown
    `zoom` times larger."""
    extras = getattr(det, "extras", {})
    out: dict[str, Tensor] = {}
    if "masks" in extras:
        out["masks"] = (extras["masks"].cpu() > 0.5).repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    if "keypoints" in extras:
        kp = extras["keypoints"].cpu().clone()
        kp[..., :2] *= zoom
        out["keypoints"] = kp
    return out


@torch.no_grad()
def save_prediction_picture(model: nn.Module, dataset: Any, path: Path, classes: Sequence[str],
                            num_images: int = 8, score_thresh: float = 0.3) -> Path:
    """A grid of the first `num_images` images of `dataset` with the model's detections drawn (a segmenter:
    each pixel coloured by its predicted class)."""
    from cvzoo.visualize import make_grid_image, save_image_png

    device = next(model.parameters()).device
    images = [dataset[i][0] for i in range(min(num_images, len(dataset)))]
    drawn = []
    was_training = model.training
    model.eval()  # one image at a time: batch statistics (BatchNorm in training mode) would not work
    try:
        _draw_predictions(model, images, device, classes, score_thresh, drawn)
    finally:
        model.train(was_training)
    return save_image_png(make_grid_image(drawn, nrow=4), path)


def _draw_predictions(model: nn.Module, images: list[Tensor], device: torch.device, classes: Sequence[str],
                      score_thresh: float, drawn: list[Tensor]) -> None:
    from cvzoo.visualize import draw_detections

    for image in images:
        pred = model.predict(model.signature.normalize(image[None].to(device)))
        if not isinstance(pred, list):  # a segmenter: its labels coloured over the image
            from cvzoo.visualize import draw_segmentation

            drawn.append(draw_segmentation(image, pred.labels[0].cpu(), model.num_classes))
            continue
        det = pred[0]
        zoom = max(1, 256 // max(image.shape[-2:]))  # small images drawn larger, so captions stay legible
        big = image.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
        drawn.append(draw_detections(big, det.boxes.cpu() * zoom, det.labels.cpu(), det.scores.cpu(),
                                     classes=list(classes), score_thresh=score_thresh, **drawable_extras(det, zoom)))


def read_image(path: str | Path) -> Tensor:
    """An image file -> (3, H, W) float in [0, 1]."""
    from cvzoo.data.adapters import read_rgb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    return read_rgb(path)
