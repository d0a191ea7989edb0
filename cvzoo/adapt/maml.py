"""MAML (Finn et al. 2017), first-order MAML and ANIL (Raghu et al. 2020), with `torch.func.functional_call`:
the inner loop adapts a dict of parameter tensors and runs the unchanged model on them -- no deep copies, no
monkey-patched modules -- so the outer (meta) gradient flows back to the model's own parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cvzoo.adapt._checks import check_positive_int
from cvzoo.adapt.episodes import episode_labels
from cvzoo.types import cast_like_parameters


def _logits(output: object) -> Tensor:
    """A classifier's output -> (B, K) logits (a tensor, or a NamedTuple/tuple whose first field is the logits)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"MAML needs a model returning (B, n_way) logits, got {type(output).__name__}")


def _loss_precision(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) in float32 for the cross entropy; float32/float64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class MAML(nn.Module):
    """Meta-learns the initialisation of `model`, an `n_way` classifier ((B, C, H, W) -> (B, n_way) logits).

    `loss(images, labels)` takes episodic batches (`cvzoo.adapt.episodes`; labels relabelled 0..n_way-1): for
    each of the batch's episodes, `inner_steps` gradient steps of size `inner_lr` on the support images, then
    the query cross entropy at the adapted parameters; returns {"loss": mean query loss, "accuracy": mean query
    accuracy, "support_loss": mean support loss before adaptation}. `first_order=True` drops the second-order
    terms (FOMAML); `adapt="head"` adapts only the parameters named under `head_prefix` (ANIL: the body is
    only meta-learned). BatchNorm layers run in whatever mode the model is in (train mode: the episode's own
    statistics, as in the original MAML); buffers are passed through functional_call, so running statistics
    update as in an ordinary forward. `forward(images)` is the unadapted model; `adapt` / `predict` adapt to a
    support set at test time.
    """

    def __init__(self, model: nn.Module, *, n_way: int = 5, k_shot: int = 1, query: int = 5, inner_lr: float = 0.4,
                 inner_steps: int = 1, first_order: bool = False, adapt: str = "all", head_prefix: str = "head",
                 eval_inner_steps: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module classifier, got {type(model).__name__}")
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query), ("inner_steps", inner_steps)):
            check_positive_int(name, value)
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not (
                inner_lr > 0 and math.isfinite(inner_lr)):
            raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r}")
        if adapt not in ("all", "head"):
            raise ValueError(f"adapt must be 'all' (MAML) or 'head' (ANIL), got {adapt!r}")
        self.model = model
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.adapted_names = tuple(n for n in names if adapt == "all" or n.startswith(head_prefix + "."))
        if not self.adapted_names:
            raise ValueError(f"adapt='head' found no trainable parameters under head_prefix={head_prefix!r}; the "
                             f"model's parameters start with {sorted({n.split('.')[0] for n in names})}")
        self.n_way, self.k_shot, self.query = n_way, k_shot, query
        self.inner_lr, self.inner_steps, self.first_order = float(inner_lr), inner_steps, bool(first_order)
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else check_positive_int(
            "eval_inner_steps", eval_inner_steps)
        self.signature = getattr(model, "signature", None)

    def forward(self, images: Tensor) -> Tensor:
        return _logits(self.model(images))

    def _run(self, params: dict[str, Tensor], images: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The model on `images` with `params` (and `buffers`, when given) in place of its own tensors."""
        return _logits(functional_call(self.model, params if buffers is None else {**params, **buffers}, (images,)))

    def adapt_parameters(self, support: Tensor, support_labels: Tensor, steps: int | None = None,
                         create_graph: bool | None = None, buffers: dict[str, Tensor] | None = None
                         ) -> tuple[dict[str, Tensor], Tensor]:
        """The inner loop: (adapted {name: tensor}, support loss before adaptation). The adapted tensors are
        functions of the model's parameters (differentiable unless first order)."""
        steps = self.inner_steps if steps is None else steps
        create_graph = (not self.first_order) if create_graph is None else create_graph
        params = dict(self.model.named_parameters())
        first_loss = None
        for _ in range(steps):
            loss = F.cross_entropy(_loss_precision(self._run(params, support, buffers)), support_labels)
            first_loss = loss if first_loss is None else first_loss
            grads = torch.autograd.grad(loss, [params[n] for n in self.adapted_names], create_graph=create_graph)
            for name, g in zip(self.adapted_names, grads):  # a loop over parameter tensors, not images
                params[name] = params[name] - self.inner_lr * g
        return params, first_loss

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        n, k, q = self.n_way, self.k_shot, self.query
        per_task = n * (k + q)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] % per_task:
            raise ValueError(f"images must be episodic batches of {n}-way {k}-shot episodes with {q} queries a "
                             f"class: (T * {per_task}, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if self.signature is not None:
            images = self.signature.validate(images)
        images = cast_like_parameters(images, self)
        tasks = images.shape[0] // per_task
        expected = episode_labels(n, k, q, device=images.device)
        if not isinstance(labels, Tensor) or labels.shape != (tasks * per_task,):
            raise ValueError(f"labels must have shape ({tasks * per_task},) (cvzoo.adapt.EpisodeCollate), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        if not torch.compiler.is_compiling() and not torch.equal(labels.to(expected.device), expected.repeat(tasks)):
            raise ValueError("labels do not follow the episode layout (support blocks then query blocks, classes "
                             "relabelled 0..n_way-1); collate episodes with cvzoo.adapt.EpisodeCollate")
        split = n * k
        query_loss = accuracy = support_loss = images.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():  # the inner loop needs gradients even when evaluated under no_grad
            for t in range(tasks):  # the meta-batch's tasks: a fixed count, each a batched episode
                x = images[t * per_task:(t + 1) * per_task]
                params, first = self.adapt_parameters(x[:split], expected[:split])
                logits = _loss_precision(self._run(params, x[split:]))
                query_loss = query_loss + F.cross_entropy(logits, expected[split:])
                accuracy = accuracy + (logits.argmax(-1) == expected[split:]).float().mean()
                support_loss = support_loss + first.detach()
        return {"loss": query_loss / tasks, "accuracy": accuracy.detach() / tasks,
                "support_loss": support_loss / tasks}

    def predict(self, support: Tensor, support_labels: Tensor, queries: Tensor) -> Tensor:
        """Adapts to support images (S, C, H, W) with labels (S,) in [0, n_way) for `eval_inner_steps` steps,
        then classifies query images (Q, C, H, W) -> (Q,) labels. The model itself is not changed.

        Normalisation layers use the statistics of the batch at hand (the support set while adapting, the
        queries when classifying), as MAML does at test time: the running averages collected over training
        episodes do not describe one episode of new classes. Running statistics go to copies, so the model's
        buffers stay as they are.
        """
        was_training = self.model.training
        self.model.train()
        try:
            buffers = {n: b.clone() for n, b in self.model.named_buffers()}
            with torch.enable_grad():
                params, _ = self.adapt_parameters(support, support_labels.long(), self.eval_inner_steps,
                                                  create_graph=False, buffers=buffers)
            with torch.no_grad():
                return self._run({n: p.detach() for n, p in params.items()}, queries, buffers).argmax(-1)
        finally:
            self.model.train(was_training)
