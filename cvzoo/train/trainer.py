"""The training loop: any model with `loss(inputs, targets) -> {"loss": total, ...}`, one process or torchrun.

A minimal, honest loop in the spirit of nanoGPT's, with what Lightning users expect: gradient accumulation,
AMP, torch.compile, channels_last, EMA, LR schedules, gradient clipping, a NaN guard, DDP / FSDP2, atomic
checkpoints with bit-identical resume, SIGTERM handling, tracking and a progress bar. One optimizer step:

    for each of grad_accum micro-batches (inputs, targets):
        move to device -> batch_transform (augment + normalise) -> LossModule(model)(inputs, targets)
        backward(losses["loss"] / n_micro)          # DDP no_sync() on all but the last micro-batch
    skip the update if any micro-batch loss is non-finite, else (unscale, clip,) optimizer.step()
    zero_grad; scheduler.step(); ema.update(model)

Models trained by several optimizers in turn (GANs) declare their phases; see `Trainer`'s docstring.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cvzoo.train import distributed as D
from cvzoo.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_resumable,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    save_rotating,
    strip_wrapper_prefixes,
)
from cvzoo.train.data import batch_size_of, batches_per_epoch, is_sharded, make_resumable, start_epoch, to_device
from cvzoo.train.ema import ModelEMA
from cvzoo.train.roundtrip import check_state_round_trip
from cvzoo.train.schedules import SCHEDULES, build_scheduler

logger = logging.getLogger("cvzoo.train")

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_END = object()

BatchTransform = Callable[[Any, Any], tuple[Any, Any]]
Evaluate = Callable[[nn.Module, Iterable], Mapping[str, float]]
OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None


class NonFiniteLossError(RuntimeError):
    """Training stopped after `max_nonfinite` non-finite losses in a row."""


def _model_phases(model: nn.Module) -> tuple[str, ...]:
    """The model's optimisation phases (the `phases` attribute), validated; () for a plain model."""
    phases = getattr(model, "phases", ())
    if not phases:
        return ()
    if isinstance(phases, str) or not all(isinstance(p, str) for p in phases) or len(set(phases)) != len(phases):
        raise ValueError(f"model.phases must be a tuple of distinct phase names, got {phases!r}")
    if not callable(getattr(model, "configure_optimizers", None)):
        raise ValueError(f"a model with phases {tuple(phases)} needs a configure_optimizers(lr, weight_decay) "
                         f"method returning {{phase: optimizer}}")
    return tuple(phases)


class LossModule(nn.Module):
    """`forward(inputs, targets) = model.loss(inputs, targets)`: the loss through a forward, so that DDP's
    gradient-sync hooks, FSDP's and torch.compile see the whole training computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any, targets: Any, phase: str | None = None) -> dict[str, Tensor]:
        if phase is None:
            return self.model.loss(inputs, targets)
        return self.model.loss(inputs, targets, phase=phase)


def default_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weights of 2 or more dimensions (convolutions, linear, embeddings) and
    none on 1-D parameters (biases, norm scales and shifts), nanoGPT's rule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _channels_last(inputs: Any) -> Any:
    if isinstance(inputs, Tensor) and inputs.ndim == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    if isinstance(inputs, list):
        return [_channels_last(x) for x in inputs]
    return inputs


class Trainer:
    """Trains `model` (anything with `loss(inputs, targets) -> {"loss": total, term: value, ...}`).

    Arguments (all keyword-only after `model`):

    - `optimizer`: an optimizer over `model`'s parameters, a callable `model -> optimizer` (needed for FSDP,
      which replaces the parameters), or None for `default_optimizer(model, lr, weight_decay)` (AdamW).
      `lr` and `weight_decay` configure only the default; the schedule multiplies every group's own lr.
    - `max_steps` / `max_epochs`: training stops at whichever comes first (at least one is required). A step
      is one optimizer update, i.e. `grad_accum` batches.
    - `grad_accum`: batches per optimizer step; the loss of each is divided by the number of batches in the
      step (the last step of an epoch may hold fewer), so the gradient is that of the mean loss.
    - `clip_grad_norm`: max global gradient norm (logged as `grad_norm`), None for no clipping.
    - `amp`: None, "bf16" (autocast) or "fp16" (autocast + `torch.amp.GradScaler`, checkpointed).
    - `compile`: True for `torch.compile(LossModule(model))`, or a dict of `torch.compile` keyword arguments.
    - `channels_last`: model and 4-D inputs in channels-last memory format.
    - `ema_decay`: keep a `ModelEMA` of the weights (evaluated instead of the model); None for none.
    - `schedule`: "cosine", "onecycle", "step", "constant" (see `cvzoo.train.schedules.schedule_function`) or
      a callable `step -> lr multiplier`; `warmup_steps` of linear warmup.
    - `out_dir`: where checkpoints go (`last.pt` and `previous.pt`); None writes none.
    - `checkpoint_every`: also save every that many steps (checkpoints are always saved at the end of each
      epoch and of training, and on SIGTERM, when `out_dir` is set).
    - `tracker`: an object with `log(metrics: dict[str, float], step: int)` and `close()` (called at the end
      of `fit`); its exceptions are reported once and never stop training.
    - `device`: "auto" (cuda:LOCAL_RANK if CUDA is available, else cpu) or a torch device.
    - `strategy`: "auto" (DDP under torchrun with several processes, else single), "single", "ddp", "fsdp"
      (FSDP2 `fully_shard` on each block and the root; no EMA). `ddp_kwargs` go to DistributedDataParallel.
    - `batch_transform(inputs, targets) -> (inputs, targets)`: runs on the device after the move
      (augmentation, `model.signature.normalize`).
    - `rebuild`: a zero-argument callable building a fresh model of the same architecture; before training the
      model's state_dict is loaded into it and both must give the same losses on the first batch
      (`StateRoundTripError` otherwise): state that a checkpoint would lose is caught before hours of training.
    - `max_nonfinite`: abort with `NonFiniteLossError` after that many non-finite losses in a row (each one
      skips its optimizer step).
    - `log_every`: log every that many steps (loss terms, lr, samples/s, grad norm) to `history`, the tracker
      and the progress bar; `eval_every`: evaluate every that many steps instead of at each epoch end.
    - `progress`: a tqdm bar on rank 0. `seed`: seeds Python, NumPy and torch (seed + rank) at the start of a
      fresh run, and the data order (see `cvzoo.train.data`).

    Optimisation phases (the hook for GANs and other models trained by alternating optimizers): a model
    with a `phases` attribute, a tuple of names such as `("discriminator", "generator")`, and a
    `configure_optimizers(lr, weight_decay) -> {phase: optimizer}` method is trained phase by phase. Every
    step runs, for each phase in order, `model.loss(inputs, targets, phase=name)` on the same batch, its
    backward (after clearing every gradient, so one phase's backward never leaks into another's update),
    and that phase's optimizer update, then advances each phase's schedule once. The returned terms are
    logged together, "loss" being the sum of the phases' losses (name the other terms distinctly). A phase
    with a non-finite loss skips its own update. `optimizer` may then be a callable `model -> {phase:
    optimizer}`; `grad_accum` must be 1, and `strategy="fsdp"` is refused. Under DDP,
    `find_unused_parameters` defaults to True (a phase may leave the other phases' parameters unused).
    Evaluation and the save/load check call `model.loss(inputs, targets)` without a phase.

    After `fit`, `history` holds every logged record (`{"step": ..., "train/loss": ..., "lr": ...}` and
    `{"step": ..., "val/...": ...}`), `step` / `epoch` the position, `interrupted` whether SIGTERM stopped it.
    """

    def __init__(self, model: nn.Module, *, optimizer: OptimizerArg = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, max_steps: int | None = None, max_epochs: int | None = None,
                 grad_accum: int = 1, clip_grad_norm: float | None = None, amp: str | None = None,
                 compile: bool | Mapping[str, Any] = False, channels_last: bool = False,
                 ema_decay: float | None = None, schedule: str | Callable[[int], float] = "cosine",
                 warmup_steps: int = 0, out_dir: str | os.PathLike | None = None, tracker: Any = None,
                 device: str | torch.device = "auto", strategy: str = "auto",
                 batch_transform: BatchTransform | None = None, rebuild: Callable[[], nn.Module] | None = None,
                 max_nonfinite: int = 5, checkpoint_every: int | None = None, log_every: int = 10,
                 eval_every: int | None = None, progress: bool = True, seed: int = 0,
                 ddp_kwargs: Mapping[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
            raise ValueError(f"model must be an nn.Module with a loss(inputs, targets) method, "
                             f"got {type(model).__name__}")
        if optimizer is not None and not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
            raise ValueError(f"optimizer must be an Optimizer, a callable model -> Optimizer, or None, "
                             f"got {type(optimizer).__name__}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        _check_int("max_steps", max_steps, 1, allow_none=True)
        _check_int("max_epochs", max_epochs, 1, allow_none=True)
        if max_steps is None and max_epochs is None:
            raise ValueError("max_steps and max_epochs are both None: pass at least one of them")
        _check_int("grad_accum", grad_accum, 1)
        if clip_grad_norm is not None and (not isinstance(clip_grad_norm, (int, float)) or not clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        if not isinstance(compile, (bool, Mapping)):
            raise ValueError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
        if ema_decay is not None and (not isinstance(ema_decay, (int, float)) or not 0 < ema_decay < 1):
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {ema_decay!r}")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable step -> multiplier, "
                             f"got {schedule!r}")
        _check_int("warmup_steps", warmup_steps, 0)
        if tracker is not None and not callable(getattr(tracker, "log", None)):
            raise ValueError(f"tracker must have a log(metrics, step) method, got {type(tracker).__name__}")
        self.strategy = D.resolve_strategy(strategy)
        if self.strategy == "fsdp" and ema_decay is not None:
            raise ValueError(f"ema_decay={ema_decay} is not supported with strategy='fsdp' (the EMA would need the "
                             f"full weights on every rank)")
        if self.strategy == "fsdp" and isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("strategy='fsdp' replaces the parameters: pass optimizer as a callable model -> "
                             "Optimizer (or None), not an optimizer instance")
        self.info = D.DistInfo.from_env()
        self.device = D.resolve_device(device, self.info.local_rank)
        if amp == "fp16" and self.device.type not in ("cuda", "cpu", "xpu", "mps"):
            raise ValueError(f"amp='fp16' needs a GradScaler, which device {self.device} lacks")
        for name, fn in (("batch_transform", batch_transform), ("rebuild", rebuild)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
        _check_int("max_nonfinite", max_nonfinite, 1)
        _check_int("checkpoint_every", checkpoint_every, 1, allow_none=True)
        _check_int("log_every", log_every, 1)
        _check_int("eval_every", eval_every, 1, allow_none=True)
        _check_int("seed", seed, 0)
        if checkpoint_every is not None and out_dir is None:
            raise ValueError(f"checkpoint_every={checkpoint_every} needs out_dir to write checkpoints into")

        self.model = model
        self.optimizer_arg = optimizer
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.grad_accum = grad_accum
        self.clip_grad_norm = clip_grad_norm
        self.amp = amp
        self.compile = compile
        self.channels_last = channels_last
        self.ema_decay = ema_decay
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tracker = tracker
        self.batch_transform = batch_transform
        self.rebuild = rebuild
        self.max_nonfinite = max_nonfinite
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.eval_every = eval_every
        self.progress = progress
        self.seed = seed
        self.ddp_kwargs = dict(ddp_kwargs or {})

        self.optimizer: torch.optim.Optimizer | None = None  # the first phase's, when the model has phases
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.phases: tuple[str, ...] = _model_phases(model)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # phase -> optimizer (phased models only)
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        if self.phases:
            if grad_accum != 1:
                raise ValueError(f"grad_accum={grad_accum} is not supported for a model trained in phases "
                                 f"{self.phases}; use grad_accum=1 (and a larger batch)")
            if self.strategy == "fsdp":
                raise ValueError(f"strategy='fsdp' is not supported for a model trained in phases {self.phases}")
            if isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(f"a model trained in phases {self.phases} needs one optimizer per phase: pass "
                                 f"optimizer as a callable model -> {{phase: optimizer}} or None (the model's "
                                 f"configure_optimizers), not one optimizer")
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: ModelEMA | None = None
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.interrupted = False
        self._nonfinite_in_row = 0
        self._signal: int | None = None
        self._tracker_failed = False
        self._owns_process_group = False
        self._wrapped: nn.Module | None = None  # DDP(LossModule) / LossModule
        self._forward: Callable[..., dict[str, Tensor]] | None = None  # the compiled one, if compiling
        self._batches_per_epoch: int | None = None
        self._last_eval: dict[str, float] = {}
        self._last_train: dict[str, float] = {}

    # ---- public --------------------------------------------------------------------------------------

    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None, evaluate: Evaluate | None = None,
            resume: str | os.PathLike | None = None) -> dict[str, float]:
        """Trains until `max_steps` / `max_epochs` (or SIGTERM) and returns the final metrics.

        `train_loader` yields `(inputs, targets)` batches and is iterated once per epoch (a DataLoader's
        sampler is taken over for a resumable order, see `cvzoo.train.data`; pass a `shuffle=True` DataLoader,
        the trainer shards it over ranks itself). `evaluate(model, val_loader) -> {name: float}` runs on every
        rank at each epoch end (or every `eval_every` steps) and at the end, on the EMA model when there is
        one; without it, a `val_loader` is evaluated by the mean of `model.loss` terms. `resume`: None (fresh
        start), "auto" (the newest good checkpoint in `out_dir`, falling back to `previous.pt` with a warning,
        or a fresh start when there is none) or a checkpoint path.
        """
        if resume is not None and resume != "auto" and not isinstance(resume, (str, os.PathLike)):
            raise ValueError(f"resume must be None, 'auto' or a checkpoint path, got {resume!r}")
        if resume == "auto" and self.out_dir is None:
            raise ValueError("resume='auto' needs out_dir, where the checkpoints are")
        if evaluate is not None and not callable(evaluate):
            raise ValueError(f"evaluate must be callable, got {type(evaluate).__name__}")
        self.info, self._owns_process_group = D.init_distributed(self.device) if self.strategy != "single" \
            else (D.DistInfo(), False)
        old_handler = self._install_signal_handler()
        bar = None
        try:
            loader = make_resumable(train_loader, seed=self.seed, num_replicas=self.info.world_size,
                                    rank=self.info.rank)
            if self.info.distributed and not is_sharded(loader):
                warnings.warn("train_loader is not sharded over ranks (not a DataLoader whose sampler the trainer "
                              "can take over, and no DistributedSampler): every rank reads the same batches",
                              RuntimeWarning, stacklevel=2)
            self._batches_per_epoch = per_epoch = batches_per_epoch(loader)
            if per_epoch == 0:
                raise ValueError("train_loader yields no batches (for this rank)")
            total = self._total_steps(per_epoch)
            self._setup(loader, total)
            checkpoint = self._read_resume(resume)
            pending_rng = self._restore(checkpoint) if checkpoint is not None else None
            if checkpoint is None and self.step == 0:  # a fresh run (not a second fit continuing this one)
                self._seed_everything()
            self._wrap()
            if self.info.is_main and self.out_dir is not None:
                remove_stale_temp_files(self.out_dir)
            if self.tracker is not None and self.info.is_main and callable(getattr(self.tracker, "log_config", None)):
                self._call_tracker(self.tracker.log_config, self.config())
            bar = self._make_progress(total)
            self._run(loader, val_loader, evaluate, pending_rng, bar, resumed=checkpoint is not None)
            return self._final_metrics()
        finally:
            if bar is not None:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            if self.tracker is not None and self.info.is_main and callable(getattr(self.tracker, "close", None)):
                self._call_tracker(self.tracker.close)
            if self._owns_process_group:
                D.destroy_distributed()
                self._owns_process_group = False

    def config(self) -> dict[str, Any]:
        """The run's settings as plain values (for a tracker's `log_config` and the checkpoint)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "max_steps": self.max_steps,
                "max_epochs": self.max_epochs, "grad_accum": self.grad_accum, "clip_grad_norm": self.clip_grad_norm,
                "amp": self.amp, "compile": bool(self.compile), "channels_last": self.channels_last,
                "ema_decay": self.ema_decay, "schedule": self.schedule if isinstance(self.schedule, str) else "custom",
                "warmup_steps": self.warmup_steps, "strategy": self.strategy, "world_size": self.info.world_size,
                "seed": self.seed, "optimizer": type(self.optimizer).__name__ if self.optimizer else None}

    @property
    def eval_model(self) -> nn.Module:
        """The model evaluation sees: the EMA copy when there is one, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    # ---- setup ---------------------------------------------------------------------------------------

    def _total_steps(self, per_epoch: int | None) -> int | None:
        by_epochs = None
        if self.max_epochs is not None and per_epoch is not None:
            by_epochs = self.max_epochs * math.ceil(per_epoch / self.grad_accum)
        candidates = [n for n in (self.max_steps, by_epochs) if n is not None]
        return min(candidates) if candidates else None

    def _setup(self, loader: Iterable, total: int | None) -> None:
        """Model to device, the save/load check, sharding, optimizer, scheduler, scaler (once per Trainer)."""
        if self.optimizer is not None:
            return
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.rebuild is not None:
            self._check_round_trip(loader)
        if self.strategy == "fsdp":
            D.shard_fsdp(self.model)
        if self.phases:
            self._setup_phases(total)
        elif isinstance(self.optimizer_arg, torch.optim.Optimizer):
            self.optimizer = self.optimizer_arg
        elif self.optimizer_arg is not None:
            self.optimizer = self.optimizer_arg(self.model)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise ValueError(f"optimizer(model) must return a torch.optim.Optimizer, "
                                 f"got {type(self.optimizer).__name__}")
        else:
            self.optimizer = default_optimizer(self.model, self.lr, self.weight_decay)
        if not self.phases:
            self.scheduler = build_scheduler(self.optimizer, self.schedule, total_steps=total,
                                             warmup_steps=self.warmup_steps)
        if self.amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    def _setup_phases(self, total: int | None) -> None:
        """One optimizer and one schedule per phase, from the `optimizer` callable or the model's
        `configure_optimizers(lr, weight_decay)`."""
        made = self.optimizer_arg(self.model) if self.optimizer_arg is not None \
            else self.model.configure_optimizers(self.lr, self.weight_decay)
        if not isinstance(made, Mapping) or list(made) != list(self.phases) \
                or not all(isinstance(o, torch.optim.Optimizer) for o in made.values()):
            got = {k: type(v).__name__ for k, v in made.items()} if isinstance(made, Mapping) else made
            raise ValueError(f"the optimizers of a model trained in phases must be a dict {{phase: optimizer}} "
                             f"with keys {list(self.phases)} in that order, got {got!r}")
        self.optimizers = dict(made)
        self.schedulers = {p: build_scheduler(o, self.schedule, total_steps=total, warmup_steps=self.warmup_steps)
                           for p, o in self.optimizers.items()}
        self.optimizer = self.optimizers[self.phases[0]]
        self.scheduler = self.schedulers[self.phases[0]]

    def _wrap(self) -> None:
        wrapped: nn.Module = LossModule(self.model)
        if self.strategy == "ddp":
            kwargs = dict(self.ddp_kwargs)
            if self.phases:  # a phase may leave parameters unused (a GAN's generator in the discriminator phase)
                kwargs.setdefault("find_unused_parameters", True)
            wrapped = D.wrap_ddp(wrapped, self.device, **kwargs)
        self._wrapped = wrapped
        if self.compile:
            kwargs = dict(self.compile) if isinstance(self.compile, Mapping) else {}
            self._forward = torch.compile(wrapped, **kwargs)
        else:
            self._forward = wrapped

    def _seed_everything(self) -> None:
        s = self.seed + self.info.rank
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def _make_progress(self, total: int | None):
        if not (self.progress and self.info.is_main):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            warnings.warn("progress=True needs tqdm (pip install tqdm); training without a progress bar",
                          RuntimeWarning, stacklevel=3)
            return None
        return tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _install_signal_handler(self):
        """SIGTERM sets a flag; the loop finishes the current step, saves a checkpoint and returns."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._signal = signum

        return signal.signal(signal.SIGTERM, handler)

    # ---- the save/load check ---------------------------------------------------------------------------

    def _check_round_trip(self, loader: Iterable) -> None:
        """`check_state_round_trip` on the first batch, leaving the random streams as they were."""
        rng = capture_rng_state()
        try:
            batch = next(start_epoch(loader, self.epoch, self.seed), _END)
            if batch is not _END:
                check_state_round_trip(self.model, self.rebuild, *self._prepare(batch))
        finally:
            restore_rng_state(rng)

    # ---- resume --------------------------------------------------------------------------------------

    def _read_resume(self, resume: str | os.PathLike | None) -> dict[str, Any] | None:
        if resume is None:
            return None
        if resume != "auto":
            return load_checkpoint(resume)
        found, error = None, None
        if self.info.is_main:
            try:
                found = find_resumable(self.out_dir)
            except CheckpointError as err:
                error = str(err)
        path, error = D.broadcast_object((str(found[0]) if found else None, error))
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            logger.info("resume='auto': no checkpoint in %s, starting from scratch", self.out_dir)
            return None
        logger.info("resuming from %s", path)
        return found[1] if found is not None else load_checkpoint(path)

    def _restore(self, ckpt: dict[str, Any]) -> dict[str, Any] | None:
        """Loads a checkpoint's states; returns this rank's RNG state, restored once the epoch's data
        iterator is in place (creating it may draw random numbers the interrupted run drew before)."""
        if self.phases:
            self._restore_phases(ckpt)
        else:
            D.load_full_state(self.model, self.optimizer, self.strategy, strip_wrapper_prefixes(ckpt["model"]),
                              ckpt.get("optimizer"))
            if ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema_decay is not None:
            self.ema = ModelEMA(self.model, self.ema_decay)
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                logger.warning("checkpoint holds no EMA state; the EMA restarts from the loaded weights")
        self.step = int(ckpt.get("step", 0))
        self.epoch = int(ckpt.get("epoch", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.history = list(ckpt.get("history", []))
        self._nonfinite_in_row = int(ckpt.get("nonfinite_in_row", 0))
        data = ckpt.get("data", {})
        if data and (data.get("seed") != self.seed or data.get("world_size") != self.info.world_size
                     or data.get("batches_per_epoch") != self._batches_per_epoch):
            logger.warning("resuming with a different data setup (seed, world size or batches per epoch: %s now "
                           "%s); the data order will not continue the interrupted run exactly", data,
                           {"seed": self.seed, "world_size": self.info.world_size,
                            "batches_per_epoch": self._batches_per_epoch})
        rngs = ckpt.get("rng")
        if not rngs:
            return None
        if len(rngs) != self.info.world_size:
            logger.warning("checkpoint holds RNG states of %d ranks, running %d; using rank 0's", len(rngs),
                           self.info.world_size)
            return rngs[0]
        return rngs[self.info.rank]

    def _restore_phases(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
        optimizers, schedulers = ckpt.get("optimizer") or {}, ckpt.get("scheduler") or {}
        if not isinstance(optimizers, Mapping) or set(optimizers) - set(self.phases):
            raise CheckpointError(f"the checkpoint's optimizer state is not one per phase {list(self.phases)}: "
                                  f"was it written for another model?")
        for phase in self.phases:
            if phase in optimizers:
                self.optimizers[phase].load_state_dict(optimizers[phase])
            if phase in schedulers:
                self.schedulers[phase].load_state_dict(schedulers[phase])

    # ---- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (collective under DDP/FSDP: call on every rank; complete on rank 0)."""
        model_state = D.full_model_state(self.model, self.strategy)
        if self.phases:
            optimizer_state = {p: o.state_dict() for p, o in self.optimizers.items()}
            scheduler_state = {p: sch.state_dict() for p, sch in self.schedulers.items()}
        else:
            optimizer_state = D.full_optimizer_state(self.model, self.optimizer, self.strategy)
            scheduler_state = self.scheduler.state_dict()
        rngs = D.gather_objects(capture_rng_state())
        return {
            "model": strip_wrapper_prefixes(model_state),
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rngs,
            "data": {"seed": self.seed, "world_size": self.info.world_size,
                     "batches_per_epoch": self._batches_per_epoch, "epoch": self.epoch,
                     "batch_in_epoch": self.batch_in_epoch},
            "nonfinite_in_row": self._nonfinite_in_row,
            "history": self.history,
            "config": self.config(),
        }

    def save_checkpoint(self) -> Path | None:
        """Writes `out_dir/last.pt` (the old one becomes `previous.pt`) on rank 0; collective."""
        if self.out_dir is None:
            return None
        state = self.state_dict()
        path = None
        if self.info.is_main:
            path = save_rotating(state, self.out_dir)
        D.barrier()
        return path

    # ---- the loop ------------------------------------------------------------------------------------

    def _prepare(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            what = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (list, tuple)) \
                else type(batch).__name__
            raise ValueError(f"train_loader must yield (inputs, targets) pairs, got a {what}")
        non_blocking = self.device.type == "cuda"
        inputs = to_device(batch[0], self.device, non_blocking)
        targets = to_device(batch[1], self.device, non_blocking)
        if self.batch_transform is not None:
            out = self.batch_transform(inputs, targets)
            if not isinstance(out, (list, tuple)) or len(out) != 2:
                raise ValueError(f"batch_transform must return an (inputs, targets) pair, got {type(out).__name__}")
            inputs, targets = out
        if self.channels_last:
            inputs = _channels_last(inputs)
        return inputs, targets

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def _micro_step(self, batch: Any, scale: float, sync: bool, phase: str | None = None,
                    prepared: tuple[Any, Any] | None = None) -> tuple[dict[str, Tensor], int]:
        inputs, targets = prepared if prepared is not None else self._prepare(batch)
        with D.set_gradient_sync(self._wrapped if self.strategy == "ddp" else self.model, self.strategy, sync):
            with self._autocast():
                losses = self._forward(inputs, targets) if phase is None else self._forward(inputs, targets, phase)
            if not isinstance(losses, Mapping) or not isinstance(losses.get("loss"), Tensor):
                raise ValueError(f"model.loss must return a dict of scalar tensors with the total under 'loss', "
                                 f"got {type(losses).__name__}"
                                 + (f" with keys {list(losses)}" if isinstance(losses, Mapping) else ""))
            loss = losses["loss"].float() * scale
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return {k: v.detach().float() for k, v in losses.items()}, batch_size_of(inputs)

    def _count_nonfinite(self, nonfinite: bool, terms: Mapping[str, Tensor], what: str = "optimizer step") -> None:
        """Counts non-finite steps in a row (warning for each) and raises after `max_nonfinite`."""
        if not nonfinite:
            self._nonfinite_in_row = 0
            return
        self._nonfinite_in_row += 1
        values = {k: float(v) for k, v in terms.items()}
        logger.warning("non-finite loss at step %d (%d in a row, limit %d): %s; %s skipped", self.step,
                       self._nonfinite_in_row, self.max_nonfinite, values, what)
        if self._nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_row} non-finite losses in a row (max_nonfinite={self.max_nonfinite}), "
                f"the last at step {self.step}: {values}. Lower the learning rate, add warmup or clipping, "
                f"or check the data and the loss")

    def _update(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """(Unscale, clip,) step `optimizer`; returns the clipped gradient norm (None without clipping)."""
        grad_norm = None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.scaler.step(optimizer)
        else:
            if self.clip_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            optimizer.step()
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def _advance_schedules(self) -> None:
        with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn about the call order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for scheduler in (self.schedulers.values() if self.phases else (self.scheduler,)):
                scheduler.step()

    def _optimizer_step(self, nonfinite: bool, terms: Mapping[str, Tensor]) -> Tensor | None:
        """Updates (or skips, for a non-finite loss) and advances the schedule; returns the gradient norm."""
        grad_norm = None
        if nonfinite and self.scaler is not None:  # most likely an fp16 overflow: back off as the scaler would
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self._count_nonfinite(nonfinite, terms)
        if not nonfinite:
            grad_norm = self._update(self.optimizer)
            if self.scaler is not None:
                self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedules()
        return grad_norm

    def _phased_step(self, batch: Any) -> tuple[dict[str, Tensor], int, bool, bool, Tensor | None]:
        """One step of a model trained in phases: for each phase, clear all gradients, loss + backward, and
        that phase's update (skipped when its loss is non-finite). Returns (terms, batch size, any phase
        non-finite, stop requested, the phases' combined gradient norm)."""
        prepared = self._prepare(batch)
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        norms: list[Tensor] = []
        any_bad = stop = False
        updated = n = 0
        for i, phase in enumerate(self.phases):
            self.model.zero_grad(set_to_none=True)
            phase_terms, n = self._micro_step(batch, 1.0, sync=True, phase=phase, prepared=prepared)
            last = i == len(self.phases) - 1
            flags = torch.stack([(~torch.isfinite(phase_terms["loss"])).to(torch.int32),
                                 torch.tensor(int(last and self._signal is not None), dtype=torch.int32,
                                              device=self.device)])
            bad, stop = (bool(f) for f in D.any_across_ranks(flags).tolist())  # one sync per phase
            if bad:
                any_bad = True
                logger.warning("non-finite loss in phase %r at step %d: %s; its update skipped", phase, self.step,
                               {k: float(v) for k, v in phase_terms.items()})
                if self.scaler is not None:
                    self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
            else:
                norm = self._update(self.optimizers[phase])
                if norm is not None:
                    norms.append(norm.float())
                updated += 1
            total = total + phase_terms["loss"]
            terms.update({k: v for k, v in phase_terms.items() if k != "loss"})
        terms["loss"] = total
        self.model.zero_grad(set_to_none=True)
        if updated and self.scaler is not None:
            self.scaler.update()
        if updated and self.ema is not None:
            self.ema.update(self.model)
        self._count_nonfinite(any_bad, terms, "phase update")
        self._advance_schedules()
        grad_norm = torch.stack(norms).square().sum().sqrt() if norms else None
        return terms, n, any_bad, stop, grad_norm

    def _run(self, loader: Iterable, val_loader: Iterable | None, evaluate: Evaluate | None,
             pending_rng: dict[str, Any] | None, bar, resumed: bool) -> None:
        if self.ema_decay is not None and self.ema is None:
            self.ema = ModelEMA(self.model, self.ema_decay)
        can_eval = val_loader is not None or evaluate is not None
        per_epoch = self._batches_per_epoch
        window = _Window(self.device)
        evaluated_at = None
        saved_at = (self.step, self.epoch, self.batch_in_epoch) if resumed else None
        self.model.train()
        while self.max_epochs is None or self.epoch < self.max_epochs:
            if self.max_steps is not None and self.step >= self.max_steps:
                break
            consumed = self.batch_in_epoch
            it = start_epoch(loader, self.epoch, self.seed, skip_batches=consumed)
            if pending_rng is not None:
                restore_rng_state(pending_rng)
                pending_rng = None
            epoch_done = False
            while True:
                if per_epoch is not None and consumed >= per_epoch:
                    epoch_done = True
                    break
                if self.max_steps is not None and self.step >= self.max_steps:
                    break
                group = self.grad_accum if per_epoch is None else min(self.grad_accum, per_epoch - consumed)
                batch = next(it, _END)
                if batch is _END:
                    epoch_done = True
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                if self.phases:  # grad_accum is 1: one batch, each phase in turn
                    terms, n, nonfinite, stop, grad_norm = self._phased_step(batch)
                    window.samples += n * self.info.world_size
                    consumed += 1
                else:
                    terms: dict[str, Tensor] = {}
                    bad = torch.zeros((), dtype=torch.bool, device=self.device)
                    for i in range(group):  # micro-batches; the next is fetched only within the step
                        nxt = next(it, _END) if i < group - 1 else _END
                        micro_terms, n = self._micro_step(batch, 1.0 / group, sync=nxt is _END)
                        bad |= ~torch.isfinite(micro_terms["loss"])
                        for k, v in micro_terms.items():
                            terms[k] = terms[k] + v / group if k in terms else v / group
                        window.samples += n * self.info.world_size
                        consumed += 1
                        if nxt is _END:
                            epoch_done = epoch_done or i < group - 1
                            break
                        batch = nxt
                    flags = torch.stack([bad.to(torch.int32), torch.tensor(int(self._signal is not None),
                                                                           dtype=torch.int32, device=self.device)])
                    nonfinite, stop = (bool(f) for f in D.any_across_ranks(flags).tolist())  # the step's one sync
                    grad_norm = self._optimizer_step(nonfinite, terms)
                self.step += 1
                self.batch_in_epoch = consumed
                if not nonfinite:
                    window.add(terms, grad_norm)
                if bar is not None:
                    bar.update(1)
                last = (self.max_steps is not None and self.step >= self.max_steps) or (
                    self.max_epochs is not None and self.epoch == self.max_epochs - 1 and per_epoch is not None
                    and consumed >= per_epoch)
                if self.step % self.log_every == 0 or last or stop:
                    self._log_train(window, lr, bar)
                if can_eval and self.eval_every is not None and self.step % self.eval_every == 0:
                    with window.paused():
                        self._evaluate(val_loader, evaluate)
                    evaluated_at = self.step
                if stop:
                    self.interrupted = True
                    signame = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
                    if self.out_dir is not None:
                        self.save_checkpoint()
                        logger.warning("%s: stopped after step %d, checkpoint saved in %s", signame, self.step,
                                       self.out_dir)
                    else:
                        logger.warning("%s: stopped after step %d; no out_dir, so no checkpoint", signame,
                                       self.step)
                    return
                if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
                    with window.paused():
                        self.save_checkpoint()
                    saved_at = (self.step, self.epoch, self.batch_in_epoch)
                if epoch_done:
                    break
            if not epoch_done:
                break  # max_steps within the epoch
            with window.paused():
                if can_eval and self.eval_every is None:
                    self._evaluate(val_loader, evaluate)
                    evaluated_at = self.step
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.out_dir is not None:
                    self.save_checkpoint()
                    saved_at = (self.step, self.epoch, self.batch_in_epoch)
        if window.steps:
            self._log_train(window, self.optimizer.param_groups[0]["lr"], bar)
        if can_eval and evaluated_at != self.step:
            self._evaluate(val_loader, evaluate)
        if self.out_dir is not None and saved_at != (self.step, self.epoch, self.batch_in_epoch):
            self.save_checkpoint()

    # ---- logging and evaluation ----------------------------------------------------------------------

    def _log_train(self, window: _Window, lr: float, bar) -> None:
        metrics = window.flush()
        metrics["lr"] = lr
        metrics["epoch"] = float(self.epoch)
        self._last_train = metrics
        self._record(metrics)
        if bar is not None:
            post = {"loss": f"{metrics['train/loss']:.4g}"} if "train/loss" in metrics else {}
            post.update(lr=f"{lr:.3g}", **({"img/s": f"{metrics['samples_per_sec']:.1f}"}
                                           if "samples_per_sec" in metrics else {}))
            bar.set_postfix(post, refresh=False)

    def _record(self, metrics: dict[str, float]) -> None:
        self.history.append({"step": self.step, **metrics})
        if self.tracker is not None and self.info.is_main:
            self._call_tracker(self.tracker.log, dict(metrics), self.step)

    def _call_tracker(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # a tracker (network, disk) must never stop training
            if not self._tracker_failed:
                self._tracker_failed = True
                msg = (f"tracker {type(self.tracker).__name__}.{getattr(fn, '__name__', 'call')} raised "
                       f"{type(err).__name__}: {err}; training goes on, further tracker errors are not reported")
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _evaluate(self, val_loader: Iterable | None, evaluate: Evaluate | None) -> dict[str, float]:
        model = self.eval_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                evaluate = evaluate if evaluate is not None else self._mean_losses
                result = evaluate(model, val_loader)
        finally:
            model.train(was_training)
        if not isinstance(result, Mapping):
            raise ValueError(f"evaluate must return a dict of metric name -> float, got {type(result).__name__}")
        metrics = {(k if "/" in k else f"val/{k}"): float(v) for k, v in result.items()}
        self._last_eval = metrics
        self._record(metrics)
        return metrics

    def _mean_losses(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        sums: dict[str, Tensor] = {}
        count = 0
        for batch in loader:
            inputs, targets = self._prepare(batch)
            with self._autocast():
                losses = model.loss(inputs, targets)
            n = batch_size_of(inputs)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * n
            count += n
        return {k: (v / max(count, 1)).item() for k, v in sums.items()}

    def _final_metrics(self) -> dict[str, float]:
        return {"step": float(self.step), "epoch": float(self.epoch), **self._last_train, **self._last_eval}


class _Window:
    """On-device sums of the logged quantities since the last log (no host sync until `flush`), and the
    samples and wall time since then for the throughput."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, Tensor] = {}
        self.grad_norm: Tensor | None = None
        self.steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) does not count against the throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start

    def add(self, terms: Mapping[str, Tensor], grad_norm: Tensor | None) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms[k] + v if k in self.terms else v.clone()
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float() + (self.grad_norm if self.grad_norm is not None else 0.0)
        self.steps += 1

    def flush(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        out: dict[str, float] = {}
        if self.steps:
            keys = list(self.terms)
            values = torch.stack([self.terms[k] for k in keys]).div(self.steps).tolist()
            out = {f"train/{k}": v for k, v in zip(keys, values)}
            if self.grad_norm is not None:
                out["grad_norm"] = float(self.grad_norm) / self.steps
        if elapsed > 0 and self.samples:
            out["samples_per_sec"] = self.samples / elapsed
        self.reset()
        return out
