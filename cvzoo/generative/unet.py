"""Noise-prediction UNets: a small DDPM-style UNet of our own, and an adapter giving diffusers' UNets the same API.

Every denoiser here has `forward(x (B, C, H, W), t (B,), condition=None) -> (B, out_channels, H, W)` and the
attributes `GaussianDiffusion` reads: `in_channels`, `out_channels`, `size_divisor`, `num_classes`,
`condition_dim` and `null_class`.

Conditioning and classifier-free guidance: a class-conditional denoiser has `num_classes` real classes plus
one learned *null* class with index `null_class == num_classes`, the "no label" input that guidance needs; an
embedding-conditional denoiser (`condition_dim`, e.g. a text embedding) takes (B, condition_dim) vectors whose
null condition is the zero vector. `condition=None` means the null condition for the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo._optional import require


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps, integer or fractional -> (B, dim) float32 features [sin | cos] (the transformer embedding).

    Frequencies are max_period^(-i / (dim // 2)) for i < dim // 2: diffusers'
    `get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=0)`. An odd `dim` gets a zero
    last column.
    """
    if dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """(B, in_channels, H, W), embedding (B, embed_dim) -> (B, out_channels, H, W).

    GroupNorm -> SiLU -> conv3x3, then the embedding (time + condition) enters after the second GroupNorm,
    either as a FiLM scale and shift (`scale_shift=True`, improved DDPM) or added (`False`, the original DDPM),
    -> SiLU -> dropout -> conv3x3, plus a (1x1-projected) residual.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, *, dropout: float = 0.0,
                 norm_groups: int = 8, scale_shift: bool = True) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels * (2 if scale_shift else 1)))
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.embed(emb)[:, :, None, None]  # (B, out or 2 * out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): multi-head self-attention over the H*W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, *, num_heads: int = 4, norm_groups: int = 8) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention needs channels ({channels}) divisible by num_heads, got {num_heads!r}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)  # (B, 3, n, d, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, n, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, n, HW, d)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _ResAttn(nn.Module):
    """A ResBlock, then self-attention where the level asks for it. (B, C_in, H, W), (B, E) -> (B, C_out, H, W)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class _Level(nn.Module):
    """One resolution of the UNet: its blocks, then an optional resampling layer."""

    def __init__(self, blocks: list[_ResAttn], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class _Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest upsampling then conv3x3 (no checkerboard of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _broadcast_timesteps(t: object, batch: int, device: torch.device) -> Tensor:
    """An int/float or a () / (B,) tensor of timesteps -> (B,) tensor."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((batch,), t, device=device)
    if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_complex() or t.ndim > 1:
        raise ValueError(f"t must be a number or a (B,) tensor of timesteps with B={batch}, got "
                         f"{t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape[0] != batch:
        raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    return t


class UNet(nn.Module):
    """DDPM-style denoiser. x (B, in_channels, H, W), t (B,), condition -> (B, out_channels, H, W).

    Levels i = 0..L-1 with `base_channels * channel_mults[i]` channels, each `num_res_blocks` ResBlocks (plus
    self-attention at the levels listed in `attention_levels`), a stride-2 conv between levels, a middle
    ResBlock-attention-ResBlock at the lowest resolution, and the mirrored up path with `num_res_blocks + 1`
    blocks per level consuming the skip connections (the layout of DDPM and diffusers' UNet2DModel).
    H and W must be divisible by `size_divisor = 2 ** (L - 1)`.

    The timestep enters as a sinusoidal embedding -> MLP (`time_embed_dim`, default 4 * base_channels), to which
    the condition embedding is added:
    - `num_classes=K`: `nn.Embedding(K + 1, time_embed_dim)`, labels in [0, K]; the last row (`null_class == K`)
      is the learned "no label" class used when the condition is dropped (classifier-free guidance).
    - `condition_dim=D`: a Linear projection of (B, D) float embeddings; the null condition is the zero vector
      (its embedding is the projection's bias).
    At most one of the two. `condition=None` in `forward` means the null condition for the whole batch.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (),
        time_embed_dim: int | None = None,
        num_classes: int | None = None,
        condition_dim: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 8,
        scale_shift: bool = True,
        attention_heads: int = 4,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        _positive_int(in_channels, "in_channels")
        out_channels = in_channels if out_channels is None else _positive_int(out_channels, "out_channels")
        if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 2:
            raise ValueError(f"base_channels must be an int >= 2, got {base_channels!r}")
        mults = tuple(channel_mults)
        if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1, got {channel_mults!r}")
        _positive_int(num_res_blocks, "num_res_blocks")
        levels = tuple(attention_levels)
        if any(not isinstance(i, int) or not 0 <= i < len(mults) for i in levels):
            raise ValueError(f"attention_levels must be level indices in [0, {len(mults)}), got {attention_levels!r}")
        time_embed_dim = 4 * base_channels if time_embed_dim is None else _positive_int(time_embed_dim,
                                                                                        "time_embed_dim")
        if num_classes is not None:
            _positive_int(num_classes, "num_classes")
        if condition_dim is not None:
            _positive_int(condition_dim, "condition_dim")
        if num_classes is not None and condition_dim is not None:
            raise ValueError(f"give at most one of num_classes and condition_dim, got num_classes={num_classes} "
                             f"and condition_dim={condition_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        channels = [base_channels * m for m in mults]
        _positive_int(norm_groups, "norm_groups")
        if any(c % norm_groups for c in (base_channels, *channels)):
            raise ValueError(f"norm_groups={norm_groups} must divide every level's channels "
                             f"{[base_channels, *channels]}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.condition_dim = condition_dim
        self.null_class = num_classes  # index of the learned null row; None when not class-conditional
        self.size_divisor = 2 ** (len(mults) - 1)
        self.base_channels = base_channels

        self.time_embed = nn.Sequential(nn.Linear(base_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.class_embed = nn.Embedding(num_classes + 1, time_embed_dim) if num_classes is not None else None
        self.condition_proj = nn.Linear(condition_dim, time_embed_dim) if condition_dim is not None else None

        def res_attn(c_in: int, c_out: int, attention: bool) -> _ResAttn:
            res = ResBlock(c_in, c_out, time_embed_dim, dropout=dropout, norm_groups=norm_groups,
                           scale_shift=scale_shift)
            attn = AttentionBlock(c_out, num_heads=attention_heads, norm_groups=norm_groups) if attention else None
            return _ResAttn(res, attn)

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skip_channels, c = [base_channels], base_channels
        down = []
        for i, c_out in enumerate(channels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(res_attn(c, c_out, i in levels))
                c = c_out
                skip_channels.append(c)
            last = i == len(channels) - 1
            down.append(_Level(blocks, None if last else nn.Conv2d(c, c, 3, stride=2, padding=1)))
            if not last:
                skip_channels.append(c)
        self.down = nn.ModuleList(down)
        self.mid = nn.ModuleList([res_attn(c, c, mid_attention), res_attn(c, c, False)])
        up = []
        for i in reversed(range(len(channels))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res_attn(c + skip_channels.pop(), channels[i], i in levels))
                c = channels[i]
            up.append(_Level(blocks, _Upsample(c) if i > 0 else None))
        self.up = nn.ModuleList(up)
        self.head = nn.Sequential(nn.GroupNorm(norm_groups, c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1))

    def embed(self, t: Tensor, condition: Tensor | None) -> Tensor:
        """t (B,), condition (B,) labels / (B, condition_dim) / None -> (B, time_embed_dim) block embedding."""
        emb = self.time_embed(sinusoidal_embedding(t, self.base_channels))
        if self.class_embed is not None:
            labels = torch.full_like(t, self.null_class, dtype=torch.long) if condition is None else condition
            emb = emb + self.class_embed(labels)
        elif self.condition_proj is not None:
            cond = emb.new_zeros(t.shape[0], self.condition_dim) if condition is None else condition.to(emb.dtype)
            emb = emb + self.condition_proj(cond)
        return emb

    def _check(self, x: Tensor, condition: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be a (B, {self.in_channels}, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-2] % self.size_divisor or x.shape[-1] % self.size_divisor:
            raise ValueError(f"x of size {x.shape[-2]}x{x.shape[-1]} must have H and W divisible by "
                             f"size_divisor={self.size_divisor} (2 ** (len(channel_mults) - 1))")
        if condition is None:
            return
        b = x.shape[0]
        if self.class_embed is not None:
            if not isinstance(condition, Tensor) or condition.is_floating_point() or tuple(condition.shape) != (b,):
                raise ValueError(f"condition must be a ({b},) integer tensor of class labels in [0, "
                                 f"{self.num_classes}] ({self.null_class} = null), got {_describe(condition)}")
        elif self.condition_proj is not None:
            if (not isinstance(condition, Tensor) or not condition.is_floating_point()
                    or tuple(condition.shape) != (b, self.condition_dim)):
                raise ValueError(f"condition must be a ({b}, {self.condition_dim}) floating tensor, "
                                 f"got {_describe(condition)}")
        else:
            raise ValueError(f"this UNet is unconditional (num_classes and condition_dim are None) but got a "
                             f"condition {_describe(condition)}")

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), t (B,) int or float, condition (B,) / (B, condition_dim) / None
        -> (B, out_channels, H, W)."""
        self._check(x, condition)
        emb = self.embed(_broadcast_timesteps(t, x.shape[0], x.device), condition)
        h = self.stem(x)
        skips = [h]
        for level in self.down:  # static structure: loops over levels and blocks, never over images
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)
        return self.head(h)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class DiffusersUNet(nn.Module):
    """Adapter giving a diffusers UNet the `forward(x, t, condition=None)` interface and attributes of `UNet`.

    - `UNet2DModel` without class embeddings: unconditional.
    - `UNet2DModel(num_class_embeds=K + 1)`: class-conditional with `num_classes = K` and `null_class = K`:
      build it with one more embedding than real classes, the last being the learned null class of
      classifier-free guidance (`diffusers_unet2d(num_classes=K)` does this). `condition` (B,) -> `class_labels`.
    - `UNet2DConditionModel`: a (B, D) condition embedding is passed as a one-token sequence,
      `encoder_hidden_states=condition[:, None, :]`; `condition_dim = D` is the model's `encoder_hid_dim` if set,
      else its `cross_attention_dim`. The null condition is the zero vector.
    x (B, C, H, W), t (B,) -> (B, out_channels, H, W), the model's `.sample`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        diffusers = require("diffusers", "diffusion", "wrapping a diffusers UNet")
        cfg = getattr(model, "config", None)
        if isinstance(model, diffusers.UNet2DConditionModel):
            if cfg.class_embed_type is not None or cfg.num_class_embeds is not None or cfg.addition_embed_type:
                raise ValueError("model: a UNet2DConditionModel with class or addition embeddings is not supported; "
                                 "condition it through cross-attention only")
            dim = cfg.encoder_hid_dim if cfg.encoder_hid_dim is not None else cfg.cross_attention_dim
            if isinstance(dim, (tuple, list)):
                if len(set(dim)) != 1:
                    raise ValueError(f"model: per-block cross_attention_dim {dim} is not supported; expected one "
                                     "value shared by all blocks")
                dim = dim[0]
            self.kind = "cross_attention"
            self.num_classes, self.null_class, self.condition_dim = None, None, int(dim)
        elif isinstance(model, diffusers.UNet2DModel):
            if cfg.class_embed_type is not None:
                raise ValueError(f"model: class_embed_type={cfg.class_embed_type!r} is not supported; expected None "
                                 "(a learned nn.Embedding of num_class_embeds classes)")
            if cfg.num_class_embeds is not None and cfg.num_class_embeds < 2:
                raise ValueError(f"model: num_class_embeds must be >= 2 (the classes plus the null class), got "
                                 f"{cfg.num_class_embeds}")
            self.kind = "class" if cfg.num_class_embeds is not None else "none"
            k = cfg.num_class_embeds - 1 if cfg.num_class_embeds is not None else None
            self.num_classes, self.null_class, self.condition_dim = k, k, None
        else:
            raise ValueError(f"model must be a diffusers UNet2DModel or UNet2DConditionModel, got "
                             f"{type(model).__name__}")
        if cfg.out_channels != cfg.in_channels:
            raise ValueError(f"model must predict as many channels as it takes (no learned variance), got "
                             f"in_channels={cfg.in_channels} and out_channels={cfg.out_channels}")
        self.model = model
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.size_divisor = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_size = cfg.sample_size if isinstance(cfg.sample_size, int) else None

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), condition (B,) labels / (B, condition_dim) / None -> (B, out_channels, H, W)."""
        b = x.shape[0]
        t = _broadcast_timesteps(t, b, x.device)
        if self.kind == "cross_attention":
            if condition is None:
                condition = x.new_zeros(b, self.condition_dim)
            elif not condition.is_floating_point() or tuple(condition.shape) != (b, self.condition_dim):
                raise ValueError(f"condition must be a ({b}, {self.condition_dim}) floating tensor, "
                                 f"got {_describe(condition)}")
            out = self.model(x, t, encoder_hidden_states=condition[:, None, :].to(x.dtype), return_dict=False)
        elif self.kind == "class":
            if condition is None:
                condition = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
            elif condition.is_floating_point() or tuple(condition.shape) != (b,):
                raise ValueError(f"condition must be a ({b},) integer tensor of class labels in [0, "
                                 f"{self.num_classes}], got {_describe(condition)}")
            out = self.model(x, t, class_labels=condition, return_dict=False)
        else:
            if condition is not None:
                raise ValueError(f"this UNet is unconditional but got a condition {_describe(condition)}")
            out = self.model(x, t, return_dict=False)
        return out[0]


def diffusers_unet2d(
    image_size: int,
    in_channels: int = 1,
    *,
    num_classes: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_levels: Sequence[int] = (),
    attention_head_dim: int = 8,
    **kwargs,
) -> DiffusersUNet:
    """A small diffusers `UNet2DModel` wrapped in `DiffusersUNet`. (B, C, S, S), t (B,) -> (B, C, S, S).

    `num_classes=K` builds `num_class_embeds=K + 1` (the last is the null class). Levels listed in
    `attention_levels` use diffusers' Attn{Down,Up}Block2D. Other keyword arguments go to `UNet2DModel`
    (e.g. `add_attention=False` drops the middle attention, `resnet_time_scale_shift="scale_shift"`).
    """
    diffusers = require("diffusers", "diffusion", "building a diffusers UNet2DModel")
    _positive_int(image_size, "image_size")
    _positive_int(in_channels, "in_channels")
    if num_classes is not None:
        _positive_int(num_classes, "num_classes")
    blocks = tuple(block_out_channels)
    if not blocks or any(c < 1 or c % norm_num_groups for c in blocks):
        raise ValueError(f"block_out_channels must be positive multiples of norm_num_groups={norm_num_groups}, "
                         f"got {block_out_channels!r}")
    levels = set(attention_levels)
    if any(not isinstance(i, int) or not 0 <= i < len(blocks) for i in levels):
        raise ValueError(f"attention_levels must be level indices in [0, {len(blocks)}), got {attention_levels!r}")
    if image_size % 2 ** (len(blocks) - 1):
        raise ValueError(f"image_size={image_size} must be divisible by 2 ** (len(block_out_channels) - 1) = "
                         f"{2 ** (len(blocks) - 1)}")
    down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(blocks)))
    up = tuple("AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(blocks))))
    model = diffusers.UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=blocks,
        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, down_block_types=down,
        up_block_types=up, attention_head_dim=attention_head_dim,
        num_class_embeds=None if num_classes is None else num_classes + 1, **kwargs,
    )
    return DiffusersUNet(model)
