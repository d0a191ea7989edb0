"""Vector quantisation (VQ-VAE's codebook): nearest-code lookup, straight-through gradients, EMA updates
all-reduced under DDP, and dead-code restarts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _all_reduce_sum(x: Tensor) -> Tensor:
    # functional collectives return a new tensor and trace under torch.compile(fullgraph=True), where the
    # in-place torch.distributed.all_reduce breaks the graph
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", torch.distributed.group.WORLD))


def _broadcast_from_rank0(x: Tensor) -> Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.broadcast(x, 0, torch.distributed.group.WORLD))


class VQOutput(NamedTuple):
    quantized: Tensor  # (B, D, ...) straight-through: the codes' values, gradients flow to the input
    indices: Tensor  # (B, ...) int64 nearest-code indices
    commitment_loss: Tensor  # scalar, commitment * ||z - sg(e)||^2 (mean over elements)
    codebook_loss: Tensor  # scalar, ||sg(z) - e||^2 (mean over elements); 0 with ema=True
    perplexity: Tensor  # scalar, exp(entropy of the batch's code usage), in [1, num_codes]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantisation (van den Oord et al. 2017). (B, code_dim, ...) -> VQOutput.

    Channels are the code dimension (conv layout); any number of trailing spatial dims. The straight-through
    estimator `quantized = z + sg(q - z)` passes gradients of `quantized` to `z` unchanged.

    Codebook: with `ema=False` a Parameter learned by `codebook_loss`; with `ema=True` (the default) a buffer
    updated, in training mode, by exponential moving averages of the assigned vectors' counts (`cluster_size`)
    and sums (`embed_sum`) with Laplace smoothing, as in Sonnet's VectorQuantizerEMA and VQ-VAE-2
    (`codebook_loss` is then 0). The statistics start as if every code had been used once at its initial
    position (count 1, sum = the code), so the first updates are proper weighted means without zero-debiasing.

    Dead codes: a usage count EMA (`cluster_size`, kept in both modes) is compared with
    `dead_code_threshold` after each training step; codes below it are moved to randomly chosen encoder
    outputs of the current batch and their statistics reset as at initialisation (count 1). Counts are in
    vectors per batch, so the threshold scales with the batch; 0 disables restarts. The update is branch-free
    (`torch.where`), so `torch.compile(fullgraph=True)` traces it.

    Under DDP (`torch.distributed` initialised) the batch counts and sums are all-reduced before the EMA
    update and the restart candidates are broadcast from rank 0, so every replica keeps the same codebook
    (functional collectives, so this also traces under torch.compile). Every rank must therefore run the
    training-mode forward together, as DDP training does; evaluation (eval mode) communicates nothing.
    """

    def __init__(
        self,
        *,
        num_codes: int,
        code_dim: int,
        commitment: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_int(num_codes, "num_codes", 2)
        _check_int(code_dim, "code_dim", 1)
        if isinstance(commitment, bool) or not isinstance(commitment, int | float) or not 0 <= commitment < math.inf:
            raise ValueError(f"commitment must be a finite float >= 0, got {commitment!r}")
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        if (isinstance(dead_code_threshold, bool) or not isinstance(dead_code_threshold, int | float)
                or not 0 <= dead_code_threshold < math.inf):
            raise ValueError(f"dead_code_threshold must be a finite float >= 0, got {dead_code_threshold!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.commitment = float(commitment)
        self.ema = bool(ema)
        self.decay = float(decay)
        self.dead_code_threshold = float(dead_code_threshold)
        self.eps = float(eps)
        init = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)  # as in VQ-VAE's Sonnet code
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(num_codes))

    def _flatten(self, z: Tensor) -> Tensor:
        return z.movedim(1, -1).reshape(-1, self.code_dim)  # (N, D), N = B * prod(spatial)

    def _check_input(self, z: object) -> Tensor:
        if not isinstance(z, Tensor) or z.ndim < 2 or z.shape[1] != self.code_dim or z.shape[0] == 0:
            raise ValueError(f"z must be a (B, {self.code_dim}, ...) tensor with B >= 1, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return z

    def nearest_codes(self, z: Tensor) -> Tensor:
        """(B, D, ...) -> indices (B, ...) of the nearest codes (squared Euclidean). Updates nothing."""
        z = self._check_input(z)
        with torch.no_grad():
            flat = self._flatten(z).float()  # (N, D)
            book = self.codebook.detach().float()  # (K, D)
            # ||z||^2 is the same for every code, so argmin over -2 z.e + ||e||^2 suffices
            dist = book.pow(2).sum(1) - 2.0 * flat @ book.t()  # (N, K)
            idx = dist.argmin(1)
        return idx.view(z.shape[0], *z.shape[2:])

    def embed(self, indices: Tensor) -> Tensor:
        """Code indices (B, ...) int64 -> code vectors (B, D, ...)."""
        return F.embedding(indices, self.codebook).movedim(-1, 1)

    def forward(self, z: Tensor) -> VQOutput:
        z = self._check_input(z)
        indices = self.nearest_codes(z)  # (B, ...)
        q = self.embed(indices).to(z.dtype)  # (B, D, ...) from the codebook before this step's update
        commitment = self.commitment * F.mse_loss(z.float(), q.detach().float())
        # with ema=True the codebook follows the moving averages, not a loss
        zero = z.new_zeros((), dtype=torch.float32)
        codebook_loss = zero if self.ema else F.mse_loss(z.detach().float(), q.float())
        flat_idx = indices.reshape(-1)  # (N,)
        counts = torch.zeros(self.num_codes, device=z.device, dtype=torch.float32).index_add_(
            0, flat_idx, torch.ones_like(flat_idx, dtype=torch.float32))  # (K,)
        probs = counts / flat_idx.numel()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        if self.training:
            self._update(self._flatten(z.detach()).float(), flat_idx, counts)
        quantized = z + (q - z).detach()  # straight-through estimator
        return VQOutput(quantized, indices, commitment, codebook_loss, perplexity)

    @torch.no_grad()
    def _update(self, flat: Tensor, flat_idx: Tensor, counts: Tensor) -> None:
        """EMA statistics, EMA codebook (ema=True) and dead-code restarts. flat (N, D), flat_idx (N,), counts (K,)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        stats = counts[:, None]  # (K, 1)
        if self.ema:
            sums = torch.zeros(self.num_codes, self.code_dim, device=flat.device, dtype=flat.dtype)
            stats = torch.cat([stats, sums.index_add_(0, flat_idx, flat)], dim=1)  # (K, 1 + D)
        if distributed:  # every replica must see the global batch, or the codebooks drift apart
            stats = _all_reduce_sum(stats)
        d = self.decay
        self.cluster_size.mul_(d).add_(stats[:, 0].to(self.cluster_size.dtype), alpha=1 - d)
        if self.ema:
            self.embed_sum.mul_(d).add_(stats[:, 1:].to(self.embed_sum.dtype), alpha=1 - d)
            n = self.cluster_size.sum()
            # Laplace smoothing: no code's count reaches 0, so no division by zero for unused codes
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # (K,)
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold  # (K,)
            pick = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
            candidates = flat[pick].to(self.codebook.dtype)  # (K, D) random encoder outputs of this batch
            if distributed:
                candidates = _broadcast_from_rank0(candidates)
            self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
            if self.ema:
                self.embed_sum.copy_(torch.where(dead[:, None], candidates, self.embed_sum))
