"""Training: the `Trainer` loop, checkpoints, LR schedules, weight EMA, multi-process (DDP / FSDP2) helpers.

Anything with `loss(inputs, targets) -> {"loss": total, ...}` trains:

```python
trainer = Trainer(model, max_epochs=10, amp="bf16", ema_decay=0.999, out_dir="runs/a",
                  batch_transform=lambda x, y: (model.signature.normalize(x), y))
metrics = trainer.fit(train_loader, val_loader, resume="auto")
export_safetensors(trainer.eval_model, "runs/a/model.safetensors")
```
"""

from cvzoo.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    export_safetensors,
    find_resumable,
    load_checkpoint,
    load_model_state,
    load_safetensors,
    restore_rng_state,
    save_checkpoint,
    save_rotating,
    strip_wrapper_prefixes,
    unwrap_model,
)
from cvzoo.train.data import ResumableSampler
from cvzoo.train.distributed import DistInfo
from cvzoo.train.ema import ModelEMA
from cvzoo.train.plots import plot_curves
from cvzoo.train.roundtrip import StateRoundTripError, check_state_round_trip
from cvzoo.train.schedules import (
    build_scheduler,
    constant,
    linear_warmup,
    one_cycle,
    schedule_function,
    step_decay,
    warmup_cosine,
)
from cvzoo.train.tracking import (
    CSVTracker,
    JSONLTracker,
    MultiTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    create_tracker,
)
from cvzoo.train.trainer import LossModule, NonFiniteLossError, Trainer, default_optimizer

__all__ = [
    "CSVTracker",
    "CheckpointError",
    "JSONLTracker",
    "MultiTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "create_tracker",
    "plot_curves",
    "DistInfo",
    "LossModule",
    "ModelEMA",
    "NonFiniteLossError",
    "ResumableSampler",
    "StateRoundTripError",
    "Trainer",
    "build_scheduler",
    "capture_rng_state",
    "check_state_round_trip",
    "constant",
    "default_optimizer",
    "export_safetensors",
    "find_resumable",
    "linear_warmup",
    "load_checkpoint",
    "load_model_state",
    "load_safetensors",
    "one_cycle",
    "restore_rng_state",
    "save_checkpoint",
    "save_rotating",
    "schedule_function",
    "step_decay",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "warmup_cosine",
]
