"""Self-distillation without negatives: BYOL (Grill et al. 2020), SimSiam (Chen & He 2021) and DINO (Caron et al.
2021). An online (student) network learns to predict a target (teacher) network's output for another view of
the same image; the target is a momentum (EMA) copy (BYOL, DINO) or the online network itself behind a
stop-gradient (SimSiam). Collapse is avoided by the predictor and the stop-gradient (BYOL, SimSiam) or by
centring and sharpening the teacher's output (DINO).

Every task model here takes (B, C, H, W) batches normalised with the backbone's signature, builds its views on
the device from them (`views`, cvzoo.ssl.views), and embeds with the backbone's pooled last feature map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.backbones.base import last_map_channels
from cvzoo.ssl.gather import rank_and_world
from cvzoo.ssl.heads import MLPHead
from cvzoo.ssl.method import (
    _check_max_steps,
    _check_positive_int,
    _check_size,
    _check_temperature,
    _check_unit,
    _MomentumMixin,
    _pool,
    _ViewsMixin,
)
from cvzoo.ssl.momentum import momentum_copy
from cvzoo.ssl.views import MultiCrop, TwoViews, byol_views, ssl_augmentation
from cvzoo.types import Signature

# ---------------------------------------------------------------------------------------------------------------
# losses


def _check_pair(p: object, z: object, fn: str) -> None:
    if not isinstance(p, Tensor) or not isinstance(z, Tensor) or p.ndim != 2 or p.shape != z.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (p, z)]
        raise ValueError(f"{fn} needs two tensors of the same shape (B, D), got {shapes[0]} and {shapes[1]}")


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised MSE: mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z). (B, D), (B, D) -> ().

    `z` is not detached here: in BYOL it comes from the target network, which has no gradients. Computed in
    float32.
    """
    _check_pair(p, z, "byol_loss")
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch. (B, D), (B, D) -> () in [-1, 1].

    The stop-gradient is applied here: no gradient reaches `z`. Computed in float32.
    """
    _check_pair(p, z, "simsiam_loss")
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def dino_loss(student_logits_list: Sequence[Tensor], teacher_logits_list: Sequence[Tensor], center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """DINO's cross-entropy between teacher and student over all pairs of different views. -> ().

    `student_logits_list`: S tensors (B, K), one per view, global views first; `teacher_logits_list`: T <= S
    tensors (B, K), the teacher on the T global views (view t of the teacher is view t of the student);
    `center`: (K,) or (1, K). Teacher targets are centred and sharpened, softmax((t - center) / teacher_temp),
    and detached; the student gives log_softmax(s / student_temp). The loss averages
    -sum_k q_t[b, k] log p_s[b, k] over the batch and over the T * S - T pairs with s != t, as in the official
    code. Computed in float32, batched (one einsum over all pairs).
    """
    student_temp = _check_temperature("student_temp", student_temp)
    teacher_temp = _check_temperature("teacher_temp", teacher_temp)
    s_n, t_n = len(student_logits_list), len(teacher_logits_list)
    if t_n < 1 or s_n < t_n:
        raise ValueError(f"dino_loss needs at least one teacher view and at least as many student views (the "
                         f"teacher sees the global views, the student all of them), got {s_n} student and "
                         f"{t_n} teacher views")
    n_terms = t_n * s_n - t_n  # pairs (t, s) with s != t; the teacher's views are the student's first t_n
    if n_terms == 0:
        raise ValueError("dino_loss needs at least two views in all: with one view there is no pair of "
                         "different views")
    shape = tuple(student_logits_list[0].shape)
    for name, seq in (("student_logits_list", student_logits_list), ("teacher_logits_list", teacher_logits_list)):
        for t in seq:
            if not isinstance(t, Tensor) or t.ndim != 2 or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must hold tensors of one shape (B, K) = {shape}, got {got}")
    if not isinstance(center, Tensor) or center.shape[-1] != shape[1] or center.numel() != shape[1]:
        got = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(f"center must have shape ({shape[1]},) or (1, {shape[1]}), got {got}")
    student = torch.stack([s.float() for s in student_logits_list])  # (S, B, K)
    teacher = torch.stack([t.float() for t in teacher_logits_list]).detach()  # (T, B, K)
    q = F.softmax((teacher - center.detach().float().reshape(1, 1, -1)) / teacher_temp, dim=-1)
    log_p = F.log_softmax(student / student_temp, dim=-1)
    ce = -torch.einsum("tbk,sbk->ts", q, log_p) / shape[0]  # (T, S) batch-mean cross-entropy of each pair
    different = 1.0 - torch.eye(t_n, s_n, device=ce.device, dtype=ce.dtype)  # drop the pairs of a view with itself
    return (ce * different).sum() / n_terms


# ---------------------------------------------------------------------------------------------------------------
# heads


class DINOHead(nn.Module):
    """DINO's projection head. (B, in_dim) -> (B, out_dim) logits over `out_dim` prototypes.

    An MLP of `num_layers` Linear layers (GELU between them, no norm: the official default) down to
    `bottleneck_dim`, an L2 normalisation, then a weight-normalised Linear layer without bias:
    logits_k = g_k <x / |x|, v_k / |v_k|>. With `norm_last_layer=True` (the paper's choice, needed for stability
    with small ViTs) g is fixed at 1, so every prototype is a unit vector and logits are cosines; otherwise g is
    learned, initialised at 1. MLP weights ~ trunc_normal(std 0.02), zero biases, as in the official code.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 512, bottleneck_dim: int = 64,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("num_layers", num_layers)):
            _check_positive_int(name, value)
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # v: the direction of each prototype (Linear's default init); g: its norm, fixed at 1 or learned
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))
        self.scale = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))
        self.in_dim, self.out_dim, self.norm_last_layer = in_dim, out_dim, norm_last_layer

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        w = F.normalize(self.prototypes, dim=1)  # (out_dim, bottleneck), weight norm with g = 1
        if self.scale is not None:
            w = w * self.scale
        return F.linear(x, w)  # (B, out_dim)


# ---------------------------------------------------------------------------------------------------------------
# task models


class BYOL(_ViewsMixin, _MomentumMixin, nn.Module):
    """Bootstrap Your Own Latent (Grill et al. 2020). (B, C, H, W) normalised images -> pooled features (B, D).

    Online network: backbone -> projector (MLPHead D -> hidden_dim -> projection_dim, BatchNorm) -> predictor
    (MLPHead projection_dim -> hidden_dim -> projection_dim). Target network: a momentum copy of backbone and
    projector. `loss(images)` returns {"loss": byol(p1, z2') + byol(p2, z1') (the paper's symmetrised sum,
    each term 2 - 2 cos in [0, 4]), "momentum": the momentum used}; each view goes through the networks as its
    own batch (BatchNorm statistics per view, as in the paper).

    The target is updated at the start of every training-mode `loss` call (before the forward, so it follows the
    optimizer step of the previous call): target <- m * target + (1 - m) * online, with m = `momentum`
    constant when `max_steps` is None, else the cosine schedule from `momentum` to `final_momentum` over
    `max_steps` calls, read from the `step` buffer (saved in the state_dict; no host sync). Eval mode never
    updates the target. Under DDP, call `loss` exactly once per optimizer step on every rank; all ranks then
    hold the same target.

    Views: `views` (a module (B, C, H, W) in [0, 1] -> [view1, view2]) or BYOL's asymmetric pair at
    `image_size` (None: the input's size): random resized crop (scale 0.08-1), flip, colour jitter, grayscale,
    Gaussian blur with p 1.0 / 0.1 and solarisation with p 0 / 0.2. Needs batches of at least 2 images
    (BatchNorm in the heads).
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 256, hidden_dim: int = 1024,
                 momentum: float = 0.99, final_momentum: float = 1.0, max_steps: int | None = None,
                 views: nn.Module | None = None, image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        dim = last_map_channels(backbone, "BYOL")
        _check_positive_int("projection_dim", projection_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.base_momentum = _check_unit("momentum", momentum)
        self.final_momentum = _check_unit("final_momentum", final_momentum)
        self.max_steps = _check_max_steps(max_steps)
        self.backbone = backbone
        self.projector = MLPHead(dim, hidden_dim, projection_dim)
        self.predictor = MLPHead(projection_dim, hidden_dim, projection_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._init_views(backbone, views, image_size)

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        return byol_views(size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised -> (B, D) pooled features of the online backbone."""
        return _pool(self.backbone, images)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images (B >= 2); `targets` ignored -> {"loss", "momentum"}."""
        v1, v2 = self._make_views(images, min_batch=2, num_views=2)
        if self.training:
            m = self._step_momentum([(self.backbone, self.target_backbone), (self.projector, self.target_projector)])
        else:
            m = self.current_momentum()
        p1, p2 = (self.predictor(self.projector(_pool(self.backbone, v))) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = (self.target_projector(_pool(self.target_backbone, v)) for v in (v1, v2))
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return {"loss": loss, "momentum": m.detach().float()}


class SimSiam(_ViewsMixin, nn.Module):
    """Simple Siamese networks (Chen & He 2021). (B, C, H, W) normalised images -> pooled features (B, D).

    backbone -> projector (3 Linear layers D -> hidden_dim -> hidden_dim -> projection_dim, BatchNorm after
    each, the last affine-free) -> predictor (MLPHead projection_dim -> prediction_hidden_dim ->
    projection_dim, the paper's bottleneck). `loss(images)` returns {"loss": (D(p1, z2) + D(p2, z1)) / 2 with
    D = simsiam_loss (negative cosine, stop-gradient on z), in [-1, 1]; "z_std": the standard deviation of the
    L2-normalised z over the batch, averaged over channels (the paper's collapse monitor: ~1/sqrt(d) healthy,
    0 collapsed), detached}.

    Views: `views` or two draws of SimSiam's augmentation at `image_size` (None: the input's size): crop scale
    0.2-1, flip, colour jitter, grayscale, blur p 0.5. Needs batches of at least 2 images (BatchNorm).
    """

    def __init__(self, backbone: nn.Module, *, projection_dim: int = 256, hidden_dim: int = 1024,
                 prediction_hidden_dim: int = 64, views: nn.Module | None = None,
                 image_size: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        dim = last_map_channels(backbone, "SimSiam")
        _check_positive_int("projection_dim", projection_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        _check_positive_int("prediction_hidden_dim", prediction_hidden_dim)
        self.backbone = backbone
        self.projector = MLPHead(dim, hidden_dim, projection_dim, num_layers=3, last_norm=True)
        self.predictor = MLPHead(projection_dim, prediction_hidden_dim, projection_dim)
        self._init_views(backbone, views, image_size)

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        return TwoViews(ssl_augmentation(size, scale=(0.2, 1.0), blur=0.5))

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised -> (B, D) pooled backbone features."""
        return _pool(self.backbone, images)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images (B >= 2); `targets` ignored -> {"loss", "z_std"}."""
        v1, v2 = self._make_views(images, min_batch=2, num_views=2)
        z1, z2 = (self.projector(_pool(self.backbone, v)) for v in (v1, v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1))
        z_std = F.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}


class DINO(_ViewsMixin, _MomentumMixin, nn.Module):
    """Self-distillation with no labels (Caron et al. 2021). (B, C, H, W) normalised images -> pooled features.

    Student: backbone -> DINOHead(D, out_dim, hidden_dim, bottleneck_dim). Teacher: a momentum copy of both,
    seeing only the `num_global` global views; the student sees all `num_global + num_local` views (each
    resolution in one batched forward, as in the official code). `loss(images)` returns {"loss": dino_loss
    over all pairs of different views, "momentum"}.

    In training mode `loss` (1) updates the teacher first, like BYOL (constant `momentum` or the cosine schedule
    to 1 over `max_steps` calls of the `step` buffer), and (2) after the loss, updates the `center` buffer
    (1, out_dim): center <- center_momentum * center + (1 - center_momentum) * mean of the teacher's logits
    over the global views and the batch. Under DDP (torch.distributed initialised, world size > 1) that mean is
    over the global batch: the sum is all-reduced and divided by (num_global * B * world size), as in the
    official code -- so every rank must call `loss` at each step. Eval mode updates neither.

    Views: `views` (a module (B, C, H, W) in [0, 1] -> [global views..., local views...], num_global +
    num_local of them) or `MultiCrop(global_size, local_size, num_global, num_local)`; `global_size` None is
    the input's size, `local_size` None is 96/224 of the global size (the paper's ratio). Not included: the
    teacher-temperature warm-up and the freezing of the last layer during the first epoch (trainer matters).
    """

    def __init__(self, backbone: nn.Module, *, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 64,
                 num_global: int = 2, num_local: int = 4, global_size: int | tuple[int, int] | None = None,
                 local_size: int | tuple[int, int] | None = None, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9, momentum: float = 0.996,
                 max_steps: int | None = None, views: nn.Module | None = None) -> None:
        super().__init__()
        dim = last_map_channels(backbone, "DINO")
        for name, value in (("out_dim", out_dim), ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim),
                            ("num_global", num_global)):
            _check_positive_int(name, value)
        if isinstance(num_local, bool) or not isinstance(num_local, int) or num_local < 0:
            raise ValueError(f"num_local must be an int >= 0, got {num_local!r}")
        if num_global + num_local < 2:
            raise ValueError(f"DINO needs at least two views (num_global + num_local >= 2), got num_global="
                             f"{num_global} and num_local={num_local}")
        self.student_temp = _check_temperature("student_temp", student_temp)
        self.teacher_temp = _check_temperature("teacher_temp", teacher_temp)
        self.center_momentum = _check_unit("center_momentum", center_momentum)
        self.base_momentum = _check_unit("momentum", momentum)
        self.final_momentum = 1.0
        self.max_steps = _check_max_steps(max_steps)
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        self.num_global, self.num_local, self.out_dim = num_global, num_local, out_dim
        self.backbone = backbone
        self.head = DINOHead(dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.signature: Signature = backbone.signature
        self._auto_views = None
        fixed = views is not None or self.global_size is None
        self.views = views if fixed else self._default_views(self.global_size)

    def _default_views(self, size: tuple[int, int]) -> nn.Module:
        local = self.local_size or tuple(max(1, round(s * 96 / 224)) for s in size)
        return MultiCrop(size, local, num_global=self.num_global, num_local=self.num_local)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised -> (B, D) pooled features of the student backbone."""
        return _pool(self.backbone, images)

    @staticmethod
    def _embed(backbone: nn.Module, head: nn.Module, views: Sequence[Tensor]) -> list[Tensor]:
        """Runs consecutive views of the same size as one batch: [(B, C, h_i, w_i)] -> [(B, out_dim)]."""
        out: list[Tensor] = []
        i = 0
        while i < len(views):  # a loop over view groups (static structure), never over images
            j = i + 1
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            logits = head(_pool(backbone, torch.cat(list(views[i:j]))))  # ((j - i) * B, out_dim)
            out.extend(logits.chunk(j - i))
            i = j
        return out

    @torch.no_grad()
    def _update_center(self, teacher_logits: Sequence[Tensor]) -> None:
        """center <- m * center + (1 - m) * the teacher's mean logit (over views, batch and, under DDP, ranks)."""
        batch_sum = torch.stack(list(teacher_logits)).float().sum((0, 1))  # (K,)
        _, world = rank_and_world()
        if world > 1:  # the official code's all-reduce: the center is the global batch's mean
            dist.all_reduce(batch_sum)
        count = len(teacher_logits) * teacher_logits[0].shape[0] * world
        self.center.lerp_((batch_sum / count).to(self.center.dtype).unsqueeze(0), 1.0 - self.center_momentum)

    def loss(self, images: Tensor, targets: object = None) -> dict[str, Tensor]:
        """(B, C, H, W) normalised images; `targets` ignored -> {"loss", "momentum"}."""
        views = self._make_views(images, min_batch=1, num_views=self.num_global + self.num_local)
        if self.training:
            m = self._step_momentum([(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)])
        else:
            m = self.current_momentum()
        with torch.no_grad():
            teacher = self._embed(self.teacher_backbone, self.teacher_head, views[: self.num_global])
        student = self._embed(self.backbone, self.head, views)
        loss = dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temp)
        if self.training:
            self._update_center(teacher)
        return {"loss": loss, "momentum": m.detach().float()}

