"""Gaussian diffusion (DDPM training, DDPM/DDIM sampling, classifier-free guidance) around any denoiser.

The denoiser is any module with `forward(x (B, C, H, W), t (B,), condition) -> (B, C, H, W)` (`UNet`,
`DiffusersUNet`, or your own); `GaussianDiffusion` reads only its public attributes `in_channels`,
`num_classes`, `condition_dim`, `null_class` and `size_divisor` (missing ones mean unconditional / 1), and
calls an unconditional denoiser as `denoiser(x, t)`.

Notation: abar_t = alphas_cumprod[t] = prod_{s <= t} (1 - beta_s); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Images live in [-1, 1] (`signature` mean = std = 0.5); `sample` returns them in [0, 1].
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvzoo.generative.schedules import cosine_beta_schedule, linear_beta_schedule
from cvzoo.types import Signature, cast_like_parameters

# our prediction names -> diffusers' `prediction_type`
PREDICTION_TYPES = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def _reads_data() -> bool:
    # range checks read values (a host-device sync and a graph break); skipped while torch.compile traces
    return not torch.compiler.is_compiling()


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (int, float, str)) or value is None else type(value).__name__


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn on the generator's device (a CPU generator with a CUDA model works), as
    diffusers' `randn_tensor` does, so the same generator gives the same numbers in both."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class GaussianDiffusion(nn.Module):
    """DDPM (Ho et al. 2020) with DDIM sampling (Song et al. 2021) and classifier-free guidance (Ho & Salimans).

    `loss(images (B, C, S, S) in [-1, 1], targets)` -> {"loss"}: the denoiser, given x_t at uniform random
    t in [0, T), regresses `prediction` ("epsilon": the noise; "x0": the clean image; "v": sqrt(abar) eps -
    sqrt(1 - abar) x0, Salimans & Ho 2022) with `loss_type` "mse" or "l1". `sample(n, ...)` -> (n, C, S, S) in
    [0, 1] by DDPM ancestral sampling, DDIM, or any diffusers scheduler.

    `schedule` is "linear" (DDPM's 1e-4..2e-2, unscaled: see `linear_beta_schedule` for short chains),
    "cosine", or a (T,) tensor of betas in (0, 1). The schedule constants are float32 buffers, derived in
    float64, not saved in the state dict (they follow from the constructor arguments).

    Conditioning (read from the denoiser): `targets` / `labels` are (B,) class labels for a `num_classes`
    denoiser, `targets` / `condition` (B, condition_dim) floats for a `condition_dim` denoiser. During training
    each sample's condition is replaced by the null condition (null class / zero vector) with probability
    `cond_drop_prob`, which teaches the unconditional model that guidance needs. `targets=None` trains a
    conditional denoiser unconditionally (every condition null); targets given to an unconditional denoiser
    are ignored (the digits dataset always yields labels, and an unconditional DDPM trains on it).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        image_size: int,
        in_channels: int | None = None,
        num_timesteps: int = 1000,
        schedule: str | Tensor = "linear",
        prediction: str = "epsilon",
        loss_type: str = "mse",
        cond_drop_prob: float = 0.1,
        clip_denoised: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise ValueError(f"denoiser must be an nn.Module with forward(x, t, condition), "
                             f"got {type(denoiser).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        own = getattr(denoiser, "in_channels", None)
        if in_channels is None:
            if own is None:
                raise ValueError("in_channels is None and the denoiser has no in_channels attribute; pass it")
            in_channels = int(own)
        elif isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        elif own is not None and own != in_channels:
            raise ValueError(f"in_channels={in_channels} differs from the denoiser's in_channels={own}")
        out = getattr(denoiser, "out_channels", None)
        if out is not None and out != in_channels:
            raise ValueError(f"the denoiser must output as many channels as it takes ({in_channels}), "
                             f"got out_channels={out}")
        divisor = int(getattr(denoiser, "size_divisor", 1))
        if image_size % divisor:
            raise ValueError(f"image_size={image_size} must be divisible by the denoiser's size_divisor={divisor}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {tuple(PREDICTION_TYPES)}, got {prediction!r}")
        if loss_type not in ("mse", "l1"):
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob!r}")

        self.denoiser = denoiser
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.loss_type = loss_type
        self.cond_drop_prob = float(cond_drop_prob)
        self.clip_denoised = bool(clip_denoised)
        self.num_classes: int | None = getattr(denoiser, "num_classes", None)
        self.condition_dim: int | None = getattr(denoiser, "condition_dim", None)
        self.null_class: int | None = getattr(denoiser, "null_class", None)
        if self.num_classes is not None and self.condition_dim is not None:
            raise ValueError("the denoiser declares both num_classes and condition_dim; expected at most one")
        if self.num_classes is not None and self.null_class is None:
            raise ValueError("a class-conditional denoiser (num_classes set) must declare null_class, the index of "
                             "its learned null class (usually num_classes)")
        self.signature = Signature(in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.5,) * in_channels,
                                   size_divisor=divisor, outputs=(prediction,))
        self._register_schedule(self._betas(schedule, num_timesteps))

    @staticmethod
    def _betas(schedule: str | Tensor, num_timesteps: int) -> Tensor:
        if isinstance(schedule, Tensor):
            betas = schedule.detach().to("cpu", torch.float64)
            if betas.shape != (num_timesteps,):
                raise ValueError(f"schedule as a tensor must hold num_timesteps={num_timesteps} betas, "
                                 f"got shape {tuple(betas.shape)}")
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("schedule betas must lie in (0, 1)")
            return betas
        if schedule == "linear":
            return linear_beta_schedule(num_timesteps)
        if schedule == "cosine":
            return cosine_beta_schedule(num_timesteps)
        raise ValueError(f"schedule must be 'linear', 'cosine' or a tensor of betas, got {schedule!r}")

    def _register_schedule(self, betas: Tensor) -> None:
        """(T,) float64 betas -> the float32 buffers of the forward process and its posterior."""
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, posterior_variance); eq. (6)-(7) of DDPM
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the variance is 0 at t = 0: its log is clipped to the t = 1 value (it is never used to add noise)
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(betas) > 1 else betas
        buffers = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped.log(),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ----------------------------------------------------------------------------------------------- helpers

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None or self.condition_dim is not None

    def _extract(self, buffer: Tensor, t: Tensor) -> Tensor:
        """(T,) buffer, (B,) timesteps -> (B, 1, 1, 1) to broadcast over images."""
        return buffer[t][:, None, None, None]

    def _check_t(self, t: object, batch: int) -> Tensor:
        """An int or a () / (B,) integer tensor of timesteps in [0, T) -> (B,) int64."""
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((batch,), t, dtype=torch.long, device=self.betas.device)
        if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must be an int or an integer tensor of timesteps of shape ({batch},), "
                             f"got {_describe(t)}")
        if t.ndim == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
        if _reads_data() and batch and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got values from {int(t.min())} "
                             f"to {int(t.max())}")
        return t.long().to(self.betas.device)

    def _check_images(self, images: object, name: str = "images") -> Tensor:
        images = self.signature.validate(images, name)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{name} must be {self.image_size}x{self.image_size} (image_size), got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        return images

    def null_condition(self, batch: int, device: torch.device | None = None) -> Tensor | None:
        """The "no condition" input for a batch: (B,) null-class labels, (B, condition_dim) zeros, or None."""
        device = self.betas.device if device is None else device
        if self.num_classes is not None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if self.condition_dim is not None:
            return torch.zeros(batch, self.condition_dim, dtype=self.betas.dtype, device=device)
        return None

    def _check_condition(self, condition: object, batch: int, name: str, allow_null_class: bool = False) -> Tensor:
        """Validates a (B,) label tensor or a (B, condition_dim) embedding for this denoiser."""
        if self.num_classes is not None:
            if not isinstance(condition, Tensor) or condition.is_floating_point() or condition.dtype == torch.bool \
                    or condition.is_complex() or tuple(condition.shape) != (batch,):
                raise ValueError(f"{name} must be a ({batch},) integer tensor of class labels in "
                                 f"[0, {self.num_classes}), got {_describe(condition)}")
            top = self.num_classes + 1 if allow_null_class else self.num_classes
            if _reads_data() and batch and (int(condition.min()) < 0 or int(condition.max()) >= top):
                raise ValueError(f"{name} must lie in [0, {top}), got values from {int(condition.min())} to "
                                 f"{int(condition.max())}")
            return condition.long().to(self.betas.device)
        if not isinstance(condition, Tensor) or not condition.is_floating_point() \
                or tuple(condition.shape) != (batch, self.condition_dim):
            raise ValueError(f"{name} must be a ({batch}, {self.condition_dim}) floating tensor of condition "
                             f"embeddings (this denoiser has condition_dim={self.condition_dim}, not class labels), "
                             f"got {_describe(condition)}")
        if _reads_data() and not bool(torch.isfinite(condition).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        return condition.to(self.betas.device, self.betas.dtype)

    def _denoise(self, x: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        x = cast_like_parameters(x, self.denoiser)
        out = self.denoiser(x, t) if condition is None else self.denoiser(x, t, condition)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def forward(self, x_t: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        """Raw denoiser output. x_t (B, C, S, S), t (B,), condition -> (B, C, S, S) (eps, x0 or v)."""
        return self._denoise(x_t, t, condition)

    # ------------------------------------------------------------------------------------ forward process

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """x0 (B, C, H, W), t (B,) in [0, T), noise like x0 -> x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        The same as diffusers' `DDPMScheduler.add_noise(x0, noise, t)` for the same betas.
        """
        t = self._check_t(t, x0.shape[0])
        noise = torch.randn_like(x0) if noise is None else noise
        return self._q_sample(x0, t, noise)

    def _q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._extract(self.sqrt_alphas_cumprod, t) * x0 + self._extract(self.sqrt_one_minus_alphas_cumprod,
                                                                               t) * noise

    def velocity(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """The v target: sqrt(abar_t) noise - sqrt(1 - abar_t) x0. (B, C, H, W) -> (B, C, H, W).

        The same as diffusers' `DDPMScheduler.get_velocity(x0, noise, t)`.
        """
        t = self._check_t(t, x0.shape[0])
        return self._velocity(x0, t, noise)

    def _velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._extract(self.sqrt_alphas_cumprod, t) * noise - self._extract(self.sqrt_one_minus_alphas_cumprod,
                                                                                  t) * x0

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0): mean (B, C, H, W), variance and clipped log-variance (B, 1, 1, 1)."""
        t = self._check_t(t, x_t.shape[0])
        mean = self._extract(self.posterior_mean_coef1, t) * x0 + self._extract(self.posterior_mean_coef2, t) * x_t
        return mean, self._extract(self.posterior_variance, t), self._extract(self.posterior_log_variance_clipped, t)

    # --------------------------------------------------------------------------------------------- model

    def output_to_start_and_noise(self, output: Tensor, x_t: Tensor, t: Tensor | int, *,
                                  clip_denoised: bool = False) -> tuple[Tensor, Tensor]:
        """A model output of this `prediction` type at x_t -> (x0, eps), each (B, C, H, W).

        "epsilon": x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); "x0": eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar);
        "v": x0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(abar) v + sqrt(1 - abar) x_t.
        With `clip_denoised`, x0 is clamped to [-1, 1] and eps re-derived from the clamped x0 (GLIDE, and
        diffusers' `use_clipped_model_output=True`), so that x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds.
        """
        return self._to_start_and_noise(output, x_t, self._check_t(t, x_t.shape[0]), clip_denoised)

    def _to_start_and_noise(self, output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool) -> tuple[Tensor, Tensor]:
        a = self._extract(self.sqrt_alphas_cumprod, t)
        s = self._extract(self.sqrt_one_minus_alphas_cumprod, t)
        if self.prediction == "epsilon":
            eps, x0 = output, (x_t - s * output) / a
        elif self.prediction == "x0":
            x0, eps = output, (x_t - a * output) / s
        else:
            x0, eps = a * x_t - s * output, a * output + s * x_t
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - a * x0) / s
        return x0, eps

    def _check_guidance(self, guidance_scale: object) -> float:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if guidance_scale != 1.0 and not self.is_conditional:
            raise ValueError(f"guidance_scale={guidance_scale} needs a conditional denoiser (num_classes or "
                             "condition_dim); this one is unconditional, use guidance_scale=1.0")
        return float(guidance_scale)

    def predict_output(self, x_t: Tensor, t: Tensor, condition: Tensor | None = None,
                       guidance_scale: float = 1.0) -> Tensor:
        """The denoiser's output with classifier-free guidance. x_t (B, C, H, W), t (B,) -> (B, C, H, W).

        For guidance_scale s != 1 the batch is doubled (condition, null condition) and run in one call, and the
        outputs combine as uncond + s * (cond - uncond) (on eps, x0 or v alike: the conversions are affine in
        the output, so this is the same as guiding eps). `condition=None` means the null condition.
        """
        guidance_scale = self._check_guidance(guidance_scale)
        b = x_t.shape[0]
        if not self.is_conditional:
            return self._denoise(x_t, t, None)
        null = self.null_condition(b, x_t.device)
        condition = null if condition is None else condition
        if guidance_scale == 1.0:
            return self._denoise(x_t, t, condition)
        out = self._denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([condition, null]))
        cond, uncond = out[:b], out[b:]
        return uncond + guidance_scale * (cond - uncond)

    def predict_start_and_noise(self, x_t: Tensor, t: Tensor | int, condition: Tensor | None = None,
                                guidance_scale: float = 1.0, *,
                                clip_denoised: bool | None = None) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted at x_t (B, C, H, W), t (B,), with guidance; see `predict_output` and
        `output_to_start_and_noise`. `clip_denoised=None` uses the constructor's setting."""
        t = self._check_t(t, x_t.shape[0])
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        return self._to_start_and_noise(self.predict_output(x_t, t, condition, guidance_scale), x_t, t, clip)

    # -------------------------------------------------------------------------------------------- training

    def _training_condition(self, targets: object, batch: int) -> Tensor | None:
        if not self.is_conditional:
            return None  # an unconditional denoiser ignores targets (documented in the class)
        if targets is None:
            return self.null_condition(batch)
        return self._check_condition(targets, batch, "targets")

    def p_losses(self, x0: Tensor, t: Tensor | int, *, noise: Tensor | None = None,
                 condition: Tensor | None = None) -> Tensor:
        """Scalar regression loss at given timesteps, no condition dropout. x0 (B, C, H, W) in [-1, 1], t (B,)."""
        t = self._check_t(t, x0.shape[0])
        if condition is not None and not self.is_conditional:
            raise ValueError(f"condition given to an unconditional denoiser: {_describe(condition)}")
        if condition is not None:
            condition = self._check_condition(condition, x0.shape[0], "condition", allow_null_class=True)
        noise = torch.randn_like(x0) if noise is None else noise
        if condition is None and self.is_conditional:
            condition = self.null_condition(x0.shape[0], x0.device)
        return self._p_losses(x0, t, noise, condition)

    def _p_losses(self, x0: Tensor, t: Tensor, noise: Tensor, condition: Tensor | None) -> Tensor:
        out = self._denoise(self._q_sample(x0, t, noise), t, condition).float()
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            target = self._velocity(x0, t, noise)
        target = target.float()
        return F.mse_loss(out, target) if self.loss_type == "mse" else F.l1_loss(out, target)

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """images (B, C, S, S) normalised to [-1, 1], targets (B,) labels / (B, condition_dim) / None -> {"loss"}.

        Timesteps are uniform in [0, T) per sample; each condition is replaced by the null condition with
        probability `cond_drop_prob` (torch.where: no data-dependent shapes).
        """
        images = cast_like_parameters(self._check_images(images), self.denoiser)
        b = images.shape[0]
        condition = self._training_condition(targets, b)
        t = torch.randint(0, self.num_timesteps, (b,), device=images.device)
        noise = torch.randn_like(images)
        if condition is not None and self.cond_drop_prob > 0:
            keep = torch.rand(b, device=images.device) >= self.cond_drop_prob  # (B,) True: keep the condition
            if self.num_classes is not None:
                condition = torch.where(keep, condition, torch.full_like(condition, self.null_class))
            else:
                condition = torch.where(keep[:, None], condition, torch.zeros_like(condition))
        return {"loss": self._p_losses(images, t, noise, condition)}

    # -------------------------------------------------------------------------------------------- sampling

    def _step_alphas(self, t: int, prev_t: int) -> tuple[Tensor, Tensor]:
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else abar_t.new_ones(())  # alpha_bar before t=0 is 1
        return abar_t, abar_prev

    def _check_step(self, x_t: Tensor, t: object, prev_t: object) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_timesteps:
            raise ValueError(f"t must be an int in [0, {self.num_timesteps}), got {t!r}")
        if isinstance(prev_t, bool) or not isinstance(prev_t, int) or not prev_t < t:
            raise ValueError(f"prev_t must be an int < t={t} (negative: the step to x0), got {prev_t!r}")
        if not isinstance(x_t, Tensor) or x_t.ndim != 4:
            raise ValueError(f"x_t must be a (B, C, H, W) tensor, got {_describe(x_t)}")

    @torch.no_grad()
    def ddpm_step(self, x_t: Tensor, t: int, *, prev_t: int | None = None, condition: Tensor | None = None,
                  guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step x_t -> x_{prev_t} ~ N(posterior mean, posterior variance). (B, C, H, W) -> same.

        `prev_t` defaults to t - 1 (the posterior buffers); a larger jump (respaced sampling) uses
        q(x_prev | x_t, x0) of the two-step chain with beta = 1 - abar_t / abar_prev, as diffusers'
        `DDPMScheduler.step` (variance_type="fixed_small", clip_sample=clip_denoised) does. No noise at t = 0.
        """
        prev_t = t - 1 if prev_t is None else prev_t
        self._check_step(x_t, t, prev_t)
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0, _ = self._to_start_and_noise(self.predict_output(x_t, tb, condition, guidance_scale), x_t, tb,
                                         self.clip_denoised)
        if prev_t == t - 1:
            mean = self._extract(self.posterior_mean_coef1, tb) * x0 + self._extract(self.posterior_mean_coef2,
                                                                                      tb) * x_t
            variance = self._extract(self.posterior_variance, tb)
        else:
            abar_t, abar_prev = self._step_alphas(t, prev_t)
            beta = 1.0 - abar_t / abar_prev
            mean = (abar_prev.sqrt() * beta * x0 + (1.0 - beta).sqrt() * (1.0 - abar_prev) * x_t) / (1.0 - abar_t)
            variance = (1.0 - abar_prev) / (1.0 - abar_t) * beta
        if t == 0:
            return mean
        return mean + variance.sqrt() * _randn(tuple(x_t.shape), generator, x_t.device, x_t.dtype)

    @torch.no_grad()
    def ddim_step(self, x_t: Tensor, t: int, prev_t: int, *, condition: Tensor | None = None,
                  guidance_scale: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """One DDIM step x_t -> x_{prev_t} (eq. 12 of Song et al.). (B, C, H, W) -> same.

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)); abar_prev = 1 for prev_t = -1
        (the last step returns x0). eta = 0 is deterministic, eta = 1 is DDPM-like. Equals diffusers'
        `DDIMScheduler.step(..., eta, use_clipped_model_output=True)` with `set_alpha_to_one=True`.
        """
        self._check_step(x_t, t, prev_t)
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0, eps = self._to_start_and_noise(self.predict_output(x_t, tb, condition, guidance_scale), x_t, tb,
                                           self.clip_denoised)
        abar_t, abar_prev = self._step_alphas(t, prev_t)
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * x0 + (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        if eta > 0:  # drawn at every step, even the last (sigma = 0), to consume the generator as diffusers does
            x_prev = x_prev + sigma * _randn(tuple(x_t.shape), generator, x_t.device, x_t.dtype)
        return x_prev

    def _sampling_condition(self, labels: object, condition: object, n: int) -> Tensor | None:
        if labels is not None and self.num_classes is None:
            raise ValueError(f"labels given but the denoiser is not class-conditional (num_classes is None); "
                             f"got {_describe(labels)}" + (", pass condition= instead" if self.condition_dim else ""))
        if condition is not None and self.condition_dim is None:
            raise ValueError(f"condition given but the denoiser takes no condition embedding (condition_dim is "
                             f"None); got {_describe(condition)}" + (", pass labels= instead" if self.num_classes
                                                                     else ""))
        if labels is not None:
            return self._check_condition(labels, n, "labels")
        if condition is not None:
            return self._check_condition(condition, n, "condition")
        return None

    def _check_scheduler(self, scheduler: object) -> None:
        config = getattr(scheduler, "config", None)
        if config is None or not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise ValueError(f"scheduler must be a diffusers scheduler instance, got {type(scheduler).__name__}")
        expected = PREDICTION_TYPES[self.prediction]
        got = config.get("prediction_type", "epsilon")
        if got != expected:
            raise ValueError(f"scheduler.config.prediction_type={got!r} does not match prediction="
                             f"{self.prediction!r}; build the scheduler with prediction_type={expected!r}")
        if config.get("num_train_timesteps") != self.num_timesteps:
            raise ValueError(f"scheduler.config.num_train_timesteps={config.get('num_train_timesteps')} differs "
                             f"from num_timesteps={self.num_timesteps}")
        betas = getattr(scheduler, "betas", None)
        if isinstance(betas, Tensor) and not torch.allclose(betas.float().cpu(), self.betas.cpu(), rtol=1e-4,
                                                            atol=1e-7):
            raise ValueError("scheduler's betas differ from this model's schedule; build it with the same "
                             "beta_schedule (linear / squaredcos_cap_v2) or trained_betas=diffusion.betas")

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        labels: Tensor | None = None,
        condition: Tensor | None = None,
        guidance_scale: float = 1.0,
        sampler: str = "ddpm",
        num_steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        scheduler: object | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """-> (num_samples, C, S, S) images in [0, 1], on the model's device.

        `labels` (n,) in [0, num_classes) for a class-conditional denoiser, `condition` (n, condition_dim) for an
        embedding-conditional one; neither gives unconditional samples (null condition). `guidance_scale` s
        applies classifier-free guidance (s = 1: plain conditional; needs labels/condition when != 1).

        `sampler`: "ddpm" (ancestral, `num_steps` default T; fewer steps respace the chain) or "ddim"
        (`num_steps` default 50, stochasticity `eta` in [0, 1]). Timesteps use diffusers' "leading" spacing,
        (S-1, ..., 1, 0) * (T // num_steps). `scheduler`: any diffusers scheduler instance (DDPMScheduler,
        DDIMScheduler, DPMSolverMultistepScheduler, ...) replaces `sampler`: its `set_timesteps(num_steps)`
        (default 50) and `step(model_output, t, x, generator=...)` drive the loop, fed the guided model output
        (its `config.prediction_type` must match `prediction`; `eta` goes to its `step` if it takes one). The
        scheduler's own config then governs clipping (`clip_sample`), not `clip_denoised`; note that diffusers'
        DDIMScheduler keeps the unclipped eps unless stepped with `use_clipped_model_output=True`, while the own
        "ddim" sampler re-derives eps from the clipped x0.

        `return_trajectory=True` returns `(images, trajectory)` with trajectory (num_steps + 1, n, C, S, S): the
        states from x_T to x_0 mapped by (x + 1) / 2, not clamped (noisy states leave [0, 1]).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        cond = self._sampling_condition(labels, condition, num_samples)
        guidance_scale = self._check_guidance(guidance_scale)
        if guidance_scale != 1.0 and cond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs labels or a condition to guide towards")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if eta != 0.0 and sampler == "ddpm" and scheduler is None:
            raise ValueError(f"eta={eta} applies to sampler='ddim' (or a scheduler taking eta), not to 'ddpm'")
        if scheduler is not None and sampler != "ddpm":
            raise ValueError(f"pass either sampler={sampler!r} or a scheduler, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        default = self.num_timesteps if sampler == "ddpm" and scheduler is None else min(50, self.num_timesteps)
        num_steps = default if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be an int in [1, {self.num_timesteps}] (num_timesteps), "
                             f"got {num_steps!r}")
        if cond is None and self.is_conditional:
            cond = self.null_condition(num_samples)
        if scheduler is not None:
            self._check_scheduler(scheduler)

        device, dtype = self.betas.device, self.betas.dtype
        shape = (num_samples, self.in_channels, self.image_size, self.image_size)
        x = _randn(shape, generator, device, dtype)
        trajectory = [x]
        if scheduler is None:
            ratio = self.num_timesteps // num_steps
            for t in range(ratio * (num_steps - 1), -1, -ratio):  # "leading": (S-1, ..., 0) * ratio
                if sampler == "ddpm":
                    x = self.ddpm_step(x, t, prev_t=t - ratio, condition=cond, guidance_scale=guidance_scale,
                                       generator=generator)
                else:
                    x = self.ddim_step(x, t, t - ratio, condition=cond, guidance_scale=guidance_scale, eta=eta,
                                       generator=generator)
                trajectory.append(x)
        else:
            x = x * scheduler.init_noise_sigma
            trajectory[0] = x
            params = inspect.signature(scheduler.step).parameters
            kwargs = {"generator": generator} if "generator" in params else {}
            if eta != 0.0:
                if "eta" not in params:
                    raise ValueError(f"eta={eta} given but {type(scheduler).__name__}.step takes no eta")
                kwargs["eta"] = eta
            scheduler.set_timesteps(num_steps, device=device)
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(x, t)
                tb = t.to(device).expand(num_samples)
                out = self.predict_output(model_input, tb, cond, guidance_scale)
                x = scheduler.step(out, t, x, **kwargs).prev_sample
                trajectory.append(x)
        images = ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)
        if return_trajectory:
            return images, (torch.stack(trajectory) + 1.0) / 2.0
        return images
