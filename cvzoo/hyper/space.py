"""The image-classifier search space: plain Python over cvzoo constructors, define-by-run as Optuna's.

`classifier_space(trial, num_classes, in_channels)` asks the trial for

    backbone            "resnet" | "convnext"            (ResNet basic blocks / ConvNeXt blocks)
    num_stages          3 | 4                            (output stride 16 or 32)
    width               8 ... 32, step 8                 (stage widths width * (1, 2, 4, 8))
    depth               1 | 2                            (blocks a stage)
      zero_init_residual  False | True                   (resnet only)
      drop_path_rate      [0, 0.2]                       (convnext only)
    neck                "none" | "fpn" | "pan"           (the head reads the last stage, or the neck's fused map)
      neck_channels       16 ... 64, step 16             (with a neck)
    pool                "avg" | "max" | "avgmax"         (ClassificationHead)
    dropout             [0, 0.5]
    label_smoothing     [0, 0.2]                         (ImageClassifier)
    optimizer           "adamw" | "sgd"
    lr                  [1e-4, 3e-2], log
    weight_decay        [1e-6, 0.1], log
    augment             "none" | "flip" | "light"        (`cvzoo train`'s augmentation; light needs kornia)

and returns a `Candidate`: the ImageClassifier, its `TrainChoice`, and the constructor code that rebuilds
it. Conditional parameters are only asked for on their branch, so `trial.params` holds exactly what the
configuration used and `optuna.trial.FixedTrial(trial.params)` replays it. `hyper_classifier(**params)`
builds one configuration without Optuna; with no parameters it is `resnet_micro_classifier`'s architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cvzoo.backbones import ConvNeXt, ResNet
from cvzoo.classification import ImageClassifier
from cvzoo.heads import ClassificationHead
from cvzoo.hyper.candidate import OPTIMIZERS, BuilderCall, Candidate, TrainChoice
from cvzoo.hyper.params import FixedParams
from cvzoo.necks import FPN, PAN

BACKBONES = ("resnet", "convnext")
NECKS = ("none", "fpn", "pan")
POOLS = ("avg", "max", "avgmax")
AUGMENTS = ("none", "flip", "light")

# the configuration `hyper_classifier()` builds (resnet_micro_classifier's architecture, `cvzoo train`'s settings)
CLASSIFIER_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet", "num_stages": 4, "width": 16, "depth": 1, "zero_init_residual": False,
    "drop_path_rate": 0.0, "neck": "none", "neck_channels": 32, "pool": "avg", "dropout": 0.0,
    "label_smoothing": 0.0, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "augment": "flip",
}
MODEL_PARAMS = ("backbone", "num_stages", "width", "depth", "zero_init_residual", "drop_path_rate", "neck",
                "neck_channels", "pool", "dropout", "label_smoothing")
TRAIN_PARAMS = ("optimizer", "lr", "weight_decay", "augment")


def _choices(name: str, value: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not value or any(v not in allowed for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of {allowed}, got {value!r}")
    return tuple(value)


def classifier_model_space(trial: Any, num_classes: int = 10, in_channels: int = 3, *,
                           backbones: Sequence[str] = BACKBONES, necks: Sequence[str] = NECKS) -> BuilderCall:
    """The architecture part of `classifier_space`: the ImageClassifier constructor call the trial chose."""
    backbones = _choices("backbones", backbones, BACKBONES)
    necks = _choices("necks", necks, NECKS)
    backbone = trial.suggest_categorical("backbone", backbones)
    num_stages = trial.suggest_int("num_stages", 3, 4)
    width = trial.suggest_int("width", 8, 32, step=8)
    depth = trial.suggest_int("depth", 1, 2)
    neck = trial.suggest_categorical("neck", necks)
    widths = tuple(width * 2**i for i in range(num_stages))
    # alone, the head reads the last stage; a neck fuses stages 1.. (strides 8 up) into the map the head reads
    out_indices = (num_stages - 1,) if neck == "none" else tuple(range(1, num_stages))
    common = {"in_channels": in_channels, "out_indices": out_indices}
    if backbone == "resnet":
        zero_init = trial.suggest_categorical("zero_init_residual", (False, True))
        backbone_call = BuilderCall(ResNet, layers=(depth,) * num_stages, widths=widths, stem_width=width, **common,
                                    **({"zero_init_residual": True} if zero_init else {}))
    else:
        drop_path = trial.suggest_float("drop_path_rate", 0.0, 0.2)
        backbone_call = BuilderCall(ConvNeXt, depths=(depth,) * num_stages, dims=widths, **common,
                                    **({"drop_path_rate": drop_path} if drop_path > 0 else {}))
    neck_call = None
    if neck != "none":
        channels = trial.suggest_int("neck_channels", 16, 64, step=16)
        with torch.random.fork_rng(devices=[]):  # read the declared pyramid without using the caller's RNG
            feature_info = list(backbone_call.build().feature_info)
        neck_call = (BuilderCall(FPN, feature_info, channels, num_outputs=1) if neck == "fpn"  # the finest fused map
                     else BuilderCall(PAN, feature_info, channels))  # the coarsest bottom-up map (the head's -1)
        head_channels = channels
    else:
        head_channels = widths[-1]
    pool = trial.suggest_categorical("pool", POOLS)
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    label_smoothing = trial.suggest_float("label_smoothing", 0.0, 0.2)
    head_call = BuilderCall(ClassificationHead, head_channels, num_classes,
                            **({"pool": pool} if pool != "avg" else {}), **({"dropout": dropout} if dropout else {}))
    return BuilderCall(ImageClassifier, backbone_call, head_call,
                       **({"neck": neck_call} if neck_call is not None else {}),
                       **({"label_smoothing": label_smoothing} if label_smoothing else {}))


def training_space(trial: Any, *, augments: Sequence[str] = AUGMENTS,
                   optimizers: Sequence[str] = OPTIMIZERS) -> TrainChoice:
    """The training part of `classifier_space`: optimizer, learning rate, weight decay, augmentation."""
    augments = _choices("augments", augments, ("none", "flip", "light", "medium", "heavy"))
    optimizers = _choices("optimizers", optimizers, OPTIMIZERS)
    return TrainChoice(optimizer=trial.suggest_categorical("optimizer", optimizers),
                       lr=trial.suggest_float("lr", 1e-4, 3e-2, log=True),
                       weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
                       augment=trial.suggest_categorical("augment", augments))


def classifier_space(trial: Any, num_classes: int = 10, in_channels: int = 3, *,
                     backbones: Sequence[str] = BACKBONES, necks: Sequence[str] = NECKS,
                     augments: Sequence[str] = AUGMENTS, optimizers: Sequence[str] = OPTIMIZERS) -> Candidate:
    """An image classifier and its training settings for `trial` (see the module docstring for the space).

    `trial` is an `optuna.trial.Trial`, a `FixedTrial`, or a `FixedParams`. The keyword arguments narrow
    the categorical choices (e.g. `backbones=("convnext",)`). Bind the sizes for the tuner with
    `functools.partial(classifier_space, num_classes=10, in_channels=1)`.
    """
    call = classifier_model_space(trial, num_classes, in_channels, backbones=backbones, necks=necks)
    used = {k: trial.params[k] for k in MODEL_PARAMS if k in trial.params}
    zoo = BuilderCall(hyper_classifier, num_classes=num_classes, in_channels=in_channels, **used)
    training = training_space(trial, augments=augments, optimizers=optimizers)
    return Candidate.from_call(call, training, zoo)


def hyper_classifier(num_classes: int = 10, in_channels: int = 3, **params: Any) -> ImageClassifier:
    """Tunable ResNet/ConvNeXt-micro classifier (`cvzoo tune`'s space); default: resnet_micro_classifier's layout.

    `params` are the architecture parameters of `classifier_space` (`backbone`, `num_stages`, `width`,
    `depth`, `zero_init_residual`, `drop_path_rate`, `neck`, `neck_channels`, `pool`, `dropout`,
    `label_smoothing`); the ones not given take `CLASSIFIER_DEFAULTS`. A tuning result's `zoo_call` is
    this builder with the best trial's architecture.
    """
    training = [k for k in params if k in TRAIN_PARAMS]
    if training:
        raise ValueError(f"{training} are training settings, not model arguments: hyper_classifier takes "
                         f"{MODEL_PARAMS} (a tuning result's model_params)")
    unknown = [k for k in params if k not in MODEL_PARAMS]
    if unknown:
        raise ValueError(f"unknown hyper_classifier parameter(s) {unknown}; known: {MODEL_PARAMS}")
    trial = FixedParams(params, CLASSIFIER_DEFAULTS)
    call = classifier_model_space(trial, num_classes, in_channels)
    unused = trial.unused()
    if unused:
        raise ValueError(f"parameter(s) {unused} do not apply to this configuration "
                         f"(backbone={trial.params['backbone']!r}, neck={trial.params['neck']!r})")
    return call.build()
