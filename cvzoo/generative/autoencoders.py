"""Autoencoders: a convolutional encoder/decoder pair, a plain autoencoder, a VAE, and a VQ-VAE.

Images at the public boundary are normalised with the model's `signature` (mean 0.5, std 0.5 per channel,
i.e. in [-1, 1]; a Bernoulli VAE uses mean 0, std 1 so its inputs stay in [0, 1]). `decode*` returns images
in that normalised space; `reconstruct` and `sample` return images in [0, 1] (clamped) for display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cvzoo.backbones.base import Backbone
from cvzoo.generative.quantizer import VectorQuantizer
from cvzoo.layers import ActLayer, ConvNormAct, NormLayer
from cvzoo.types import FeatureInfo, Signature, cast_like_parameters

LIKELIHOODS = ("gaussian", "bernoulli")
_LOG_2PI = math.log(2 * math.pi)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_widths(widths: Sequence[int], name: str = "widths") -> tuple[int, ...]:
    try:
        out = tuple(widths)
    except TypeError:
        out = ()
    if not out or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {widths!r}")
    return out


class ConvEncoder(Backbone):
    """A stack of stride-2 conv stages. (B, in_channels, H, W) -> [(B, widths[i], H / 2^(i+1), W / 2^(i+1))].

    Stage i is a stride-2 3x3 `ConvNormAct` followed by `depth - 1` stride-1 ones, so it returns one map per
    stage at strides 2, 4, 8, ... H and W must be divisible by 2^len(widths) (`signature.size_divisor`).
    It is an ordinary cvzoo backbone (declared `feature_info`, stage freezing, gradient checkpointing), so it
    also feeds an `ImageClassifier` or a neck. It has no separate stem: stage 0 plays that part in
    `frozen_stage_modules` (`freeze_stages(0)` freezes stage 0, `freeze_stages(1)` stages 0 and 1, ...).
    Normalisation: mean 0.5, std 0.5 per channel (images in [-1, 1]), as the generative models expect.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer = nn.SiLU,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_int(in_channels, "in_channels", 1)
        widths = _check_widths(widths)
        _check_int(depth, "depth", 1)
        self.in_channels = in_channels
        self.widths = widths
        stages, info, channels = [], [], in_channels
        for i, width in enumerate(widths):
            blocks = [ConvNormAct(channels, width, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)]
            blocks += [ConvNormAct(width, width, 3, norm_layer=norm_layer, act_layer=act_layer)
                       for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            info.append(FeatureInfo(width, 2 ** (i + 1)))
            channels = width
        self.stages = nn.ModuleList(stages)
        self._declare(info, in_channels, size_divisor=2 ** len(widths), mean=(0.5,) * in_channels,
                      std=(0.5,) * in_channels)
        self.grad_checkpointing = grad_checkpointing
        self.freeze_stages(frozen_stages)

    def frozen_stage_modules(self) -> list[nn.Module]:
        return list(self.stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:  # static number of stages
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            feats.append(x)  # (B, width_i, H / 2^(i+1), W / 2^(i+1))
        return feats


class ConvDecoder(nn.Module):
    """The mirror of `ConvEncoder`. (B, latent_channels, h, w) -> (B, out_channels, h * 2^L, w * 2^L), L = len(widths).

    `widths` are listed in the order the stages run (deepest first, e.g. `(128, 64, 32)` mirrors an encoder with
    widths `(32, 64, 128)`). A 3x3 `ConvNormAct` maps the latent to `widths[0]`; stage i upsamples 2x (nearest,
    then a 3x3 `ConvNormAct`, which avoids the checkerboard artefacts of transposed convolutions) to
    `widths[i + 1]` (the last stage keeps `widths[-1]`), and a final 3x3 conv gives `out_channels`. The output
    is raw (no activation): the model applies what its likelihood needs.
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        out_channels: int,
        widths: Sequence[int] = (128, 64, 32),
        depth: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__()
        _check_int(latent_channels, "latent_channels", 1)
        _check_int(out_channels, "out_channels", 1)
        widths = _check_widths(widths)
        _check_int(depth, "depth", 1)
        self.latent_channels = latent_channels
        self.out_channels = out_channels
        self.scale = 2 ** len(widths)  # total upsampling factor
        self.stem = ConvNormAct(latent_channels, widths[0], 3, norm_layer=norm_layer, act_layer=act_layer)
        stages = []
        for i, width in enumerate(widths):
            out = widths[min(i + 1, len(widths) - 1)]
            blocks: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest"),
                                       ConvNormAct(width, out, 3, norm_layer=norm_layer, act_layer=act_layer)]
            blocks += [ConvNormAct(out, out, 3, norm_layer=norm_layer, act_layer=act_layer) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(z)))


def _check_num_samples(num_samples: object) -> int:
    return _check_int(num_samples, "num_samples", 1)


def _check_no_labels(labels: object, owner: str) -> None:
    if labels is not None:
        raise ValueError(f"{owner} is unconditional; labels must be None, got {type(labels).__name__}")


def _sample_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Random numbers are drawn on the generator's device (a CPU generator works for a CUDA model)."""
    return generator.device if generator is not None else device


class _ConvAutoEncoderBase(nn.Module):
    """Shared plumbing: an encoder (ConvEncoder by default, or any backbone) whose last map is (B, C_L, h, h),
    a mirrored `ConvDecoder`, image validation against `signature` and `image_size`, and de-normalisation."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        widths: Sequence[int],
        encoder: nn.Module | None,
        norm_layer: NormLayer | None,
        decoder_in_channels: int | None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        _check_int(image_size, "image_size", 1)
        _check_int(in_channels, "in_channels", 1)
        widths = _check_widths(widths)
        if encoder is None:
            encoder = ConvEncoder(in_channels=in_channels, widths=widths, norm_layer=norm_layer)
        elif not isinstance(getattr(encoder, "feature_info", None), tuple | list) or not isinstance(
                getattr(encoder, "signature", None), Signature):
            raise ValueError(f"encoder must be a backbone with feature_info and signature, "
                             f"got {type(encoder).__name__}")
        enc_sig: Signature = encoder.signature
        if enc_sig.in_channels != in_channels:
            raise ValueError(f"encoder takes {enc_sig.in_channels} channels (encoder.signature.in_channels) but "
                             f"in_channels={in_channels}; expected them to match")
        last: FeatureInfo = encoder.feature_info[-1]
        levels = round(math.log2(last.stride))
        if 2 ** levels != last.stride:
            raise ValueError(f"the encoder's last stride must be a power of 2 (the decoder upsamples 2x per stage), "
                             f"got {last.stride}")
        divisor = max(last.stride, enc_sig.size_divisor)
        if image_size % divisor or image_size < max(divisor, enc_sig.min_size):
            raise ValueError(f"image_size must be a positive multiple of {divisor} (the encoder's stride/size "
                             f"divisor) and >= {max(divisor, enc_sig.min_size)}, got {image_size!r}")
        if len(widths) != levels:
            raise ValueError(f"widths must list one decoder width per 2x upsampling: the encoder's last stride "
                             f"{last.stride} needs {levels} widths, got {widths!r}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes: int | None = None
        self.encoder = encoder
        self.latent_size = image_size // last.stride  # side of the encoder's last map
        self.encoder_channels = last.channels
        dec_widths = widths[::-1]
        self.decoder = ConvDecoder(latent_channels=decoder_in_channels or dec_widths[0], out_channels=in_channels,
                                   widths=dec_widths, norm_layer=norm_layer)
        self._dec_widths = dec_widths
        self._norm_stats = (tuple(enc_sig.mean if mean is None else mean), tuple(enc_sig.std if std is None else std))
        self._size_divisor = divisor
        # de-normalisation constants for sample/reconstruct, derived from the signature
        self.register_buffer("_mean", torch.tensor(self._norm_stats[0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self._norm_stats[1]).view(1, -1, 1, 1), persistent=False)

    def _signature(self, outputs: tuple[str, ...]) -> Signature:
        # the architecture's constraints; `_check_images` also requires exactly image_size x image_size
        return Signature(in_channels=self.in_channels, mean=self._norm_stats[0], std=self._norm_stats[1],
                         size_divisor=self._size_divisor, min_size=self._size_divisor, outputs=outputs)

    def _check_images(self, images: object) -> Tensor:
        images = self.signature.validate(images)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images of size {images.shape[-2]}x{images.shape[-1]}; expected "
                             f"{self.image_size}x{self.image_size} (image_size)")
        return cast_like_parameters(images, self)

    def _features(self, images: Tensor) -> Tensor:
        return self.encoder(images)[-1]  # (B, C_L, h, h)

    def _to_unit(self, images: Tensor) -> Tensor:
        """Normalised images -> [0, 1], clamped. (B, C, S, S) -> same."""
        return (images * self._std + self._mean).clamp(0, 1)


class _VectorLatentMixin:
    """Decoding of a latent vector (AutoEncoder, VAE): `from_latent` to the deepest map, then the decoder."""

    latent_dim: int
    latent_size: int
    from_latent: nn.Module
    decoder: nn.Module

    def _decode_raw(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> the decoder's raw output (B, C, S, S)."""
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be a (B, {self.latent_dim}) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        h = self.from_latent(z).view(z.shape[0], -1, self.latent_size, self.latent_size)  # (B, W_L, h, h)
        return self.decoder(h)


class AutoEncoder(_VectorLatentMixin, _ConvAutoEncoderBase):
    """Deterministic autoencoder. (B, C, S, S) normalised images -> latent (B, latent_dim) -> (B, C, S, S).

    The encoder's last map (B, C_L, S / s, S / s) is flattened and mapped by a Linear to `latent_dim`; a Linear
    maps back to (B, widths[-1], S / s, S / s), which a mirrored `ConvDecoder` upsamples. `encoder` may be any
    cvzoo backbone (its last map is used and its signature's mean/std become the model's); `widths` then needs
    one entry per 2x step of its last stride. `loss` is the pixel MSE in the normalised space.
    A plain autoencoder has no prior over its latents, so it defines no `sample` (there is nothing meaningful
    to draw from); use `VAE` or `VQVAE` to sample.
    """

    def __init__(
        self,
        *,
        image_size: int = 16,
        in_channels: int = 1,
        latent_dim: int = 32,
        widths: Sequence[int] = (32, 64),
        encoder: nn.Module | None = None,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, widths=widths, encoder=encoder,
                         norm_layer=norm_layer, decoder_in_channels=None)
        _check_int(latent_dim, "latent_dim", 1)
        self.latent_dim = latent_dim
        flat = self.encoder_channels * self.latent_size**2
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, self._dec_widths[0] * self.latent_size**2)
        self.signature = self._signature(("reconstruction",))

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> latent codes (B, latent_dim)."""
        images = self._check_images(images)
        return self.to_latent(self._features(images).flatten(1))  # (B, C_L * h * h) -> (B, latent_dim)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> images (B, C, S, S) in the normalised space."""
        return self._decode_raw(z)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> reconstruction (B, C, S, S) normalised."""
        return self.decode(self.encode(images))

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """Mean squared error over pixels in the normalised space; `targets` (labels) are ignored."""
        images = self._check_images(images)
        mse = F.mse_loss(self(images).float(), images.float())
        return {"loss": mse, "reconstruction": mse.detach()}

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> reconstructions (B, C, S, S) in [0, 1]."""
        return self._to_unit(self(images))


class VAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, C, S, S): Gaussian mean (normalised space) or Bernoulli logits, from a sampled z
    mean: Tensor  # (B, latent_dim) posterior mean
    log_var: Tensor  # (B, latent_dim) posterior log-variance


class VAE(_VectorLatentMixin, _ConvAutoEncoderBase):
    """Variational autoencoder (Kingma & Welling 2014) with a beta-weighted KL (Higgins et al. 2017).

    (B, C, S, S) -> q(z|x) = N(mean, diag(exp(log_var))), z (B, latent_dim) by reparameterisation -> p(x|z).
    Architecture as `AutoEncoder`, with a Linear to 2 * latent_dim for (mean, log_var); prior N(0, I).

    Likelihoods, both in nats per image for pixels in [0, 1] units, so the ELBO is a real bound:
    - "gaussian": p(x|z) = N(decoder(z), sigma^2) per pixel in the normalised space, with the full NLL
      (log(2 pi) included) and the change of variables to [0, 1] units (+ log std per pixel: a density in the
      normalised space is std times the density in pixel units). `sigma=None` learns one scalar sigma (the
      "sigma-VAE", Rybkin et al. 2021, which balances reconstruction against KL by itself); a float fixes it.
    - "bernoulli": BCE with logits against pixel intensities in [0, 1] (the signature has mean 0, std 1, so
      inputs stay in [0, 1]); `decode`, `sample` and `reconstruct` give the pixel probabilities.

    `loss` = mean over the batch of (reconstruction NLL summed over pixels + beta * KL), i.e. -ELBO per image
    when beta = 1. `elbo(images)` gives the single-sample per-image ELBO (beta = 1) in nats.
    """

    def __init__(
        self,
        *,
        image_size: int = 16,
        in_channels: int = 1,
        latent_dim: int = 32,
        widths: Sequence[int] = (32, 64),
        encoder: nn.Module | None = None,
        beta: float = 1.0,
        likelihood: str = "gaussian",
        sigma: float | None = None,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
    ) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0 or math.isinf(beta):
            raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float)
                                  or not 0 < sigma < math.inf):
            raise ValueError(f"sigma must be None (learned) or a finite float > 0, got {sigma!r}")
        bernoulli = likelihood == "bernoulli"
        if bernoulli and sigma is not None:
            raise ValueError(f"sigma applies to the gaussian likelihood only, got sigma={sigma!r} with bernoulli")
        super().__init__(image_size=image_size, in_channels=in_channels, widths=widths, encoder=encoder,
                         norm_layer=norm_layer, decoder_in_channels=None,
                         mean=(0.0,) * in_channels if bernoulli else None,
                         std=(1.0,) * in_channels if bernoulli else None)
        _check_int(latent_dim, "latent_dim", 1)
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.likelihood = likelihood
        flat = self.encoder_channels * self.latent_size**2
        self.to_posterior = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, self._dec_widths[0] * self.latent_size**2)
        if not bernoulli:
            if sigma is None:
                self.log_sigma = nn.Parameter(torch.zeros(()))
            else:
                self.register_buffer("log_sigma", torch.tensor(math.log(sigma)), persistent=False)
        self.signature = self._signature(("reconstruction", "mean", "log_var"))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) normalised -> posterior (mean, log_var), each (B, latent_dim)."""
        images = self._check_images(images)
        stats = self.to_posterior(self._features(images).flatten(1))  # (B, 2 * latent_dim)
        mean, log_var = stats.chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)  # keeps exp(log_var) finite early in training

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> the mean of p(x|z), (B, C, S, S) in the normalised space (Bernoulli: probabilities)."""
        raw = self._decode_raw(z)
        return raw.sigmoid() if self.likelihood == "bernoulli" else raw

    def forward(self, images: Tensor) -> VAEOutput:
        """(B, C, S, S) -> VAEOutput; z = mean + exp(log_var / 2) * eps, eps ~ N(0, I) (train and eval alike)."""
        mean, log_var = self.encode(images)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)  # reparameterisation: gradients reach encoder
        return VAEOutput(self._decode_raw(z), mean, log_var)

    def _nll(self, raw: Tensor, images: Tensor) -> Tensor:
        """-log p(x|z) in nats for pixels in [0, 1] units, summed over pixels. (B, C, S, S) x2 -> (B,)."""
        raw, images = raw.float(), images.float()
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(raw, images, reduction="none")
        else:
            log_sigma = self.log_sigma.float()
            nll = (0.5 * ((images - raw) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * _LOG_2PI
                   + torch.log(self._std.float()))  # change of variables: normalised space -> [0, 1] units
        return nll.flatten(1).sum(1)

    @staticmethod
    def _kl(mean: Tensor, log_var: Tensor) -> Tensor:
        """KL(N(mean, exp(log_var)) || N(0, I)) in nats. (B, D) x2 -> (B,)."""
        mean, log_var = mean.float(), log_var.float()
        return 0.5 * (log_var.exp() + mean**2 - 1.0 - log_var).sum(1)

    def _terms(self, images: Tensor) -> tuple[Tensor, Tensor]:
        images = self._check_images(images)
        if self.likelihood == "bernoulli" and not torch.compiler.is_compiling() and not bool(
                ((images >= 0) & (images <= 1)).all()):
            raise ValueError("images must lie in [0, 1] for a Bernoulli VAE (its signature has mean 0, std 1)")
        out = self(images)
        return self._nll(out.reconstruction, images), self._kl(out.mean, out.log_var)

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": mean(NLL + beta * KL), "reconstruction": mean NLL, "kl": mean KL}; nats per image."""
        nll, kl = self._terms(images)
        nll, kl = nll.mean(), kl.mean()
        return {"loss": nll + self.beta * kl, "reconstruction": nll.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def elbo(self, images: Tensor) -> Tensor:
        """(B, C, S, S) -> per-image ELBO (B,) in nats, beta = 1, one posterior sample (a bound on log p(x))."""
        nll, kl = self._terms(images)
        return -(nll + kl)

    @torch.no_grad()
    def sample(self, num_samples: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I) -> the mean of p(x|z): (num_samples, C, S, S) in [0, 1]."""
        _check_num_samples(num_samples)
        _check_no_labels(labels, "VAE")
        device = self._mean.device
        z = torch.randn(num_samples, self.latent_dim, generator=generator,
                        device=_sample_device(generator, device)).to(device)
        param = next(self.parameters())
        return self._to_unit(self.decode(z.to(param.dtype)))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> decode(posterior mean), (B, C, S, S) in [0, 1]."""
        mean, _ = self.encode(images)
        return self._to_unit(self.decode(mean))


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, C, S, S) normalised space
    indices: Tensor  # (B, h, h) int64 code indices
    commitment_loss: Tensor  # scalar
    codebook_loss: Tensor  # scalar (0 with ema=True)
    perplexity: Tensor  # scalar


class VQVAE(_ConvAutoEncoderBase):
    """VQ-VAE (van den Oord et al. 2017). (B, C, S, S) -> codes (B, h, h) in [0, num_codes) -> (B, C, S, S).

    encoder (ConvEncoder by default, or any backbone; its last map, stride s = S / h) -> 1x1 conv to
    `code_dim` -> `VectorQuantizer` -> `ConvDecoder` (widths mirrored). `loss` = pixel MSE (normalised
    space) + commitment loss + codebook loss. `sample` decodes uniformly random code grids: a learned prior
    over codes (e.g. a PixelCNN) is out of scope, so samples are only illustrative.
    """

    def __init__(
        self,
        *,
        image_size: int = 16,
        in_channels: int = 1,
        num_codes: int = 64,
        code_dim: int = 16,
        widths: Sequence[int] = (32, 64),
        encoder: nn.Module | None = None,
        commitment: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
    ) -> None:
        _check_int(code_dim, "code_dim", 1)
        super().__init__(image_size=image_size, in_channels=in_channels, widths=widths, encoder=encoder,
                         norm_layer=norm_layer, decoder_in_channels=code_dim)
        self.quantizer = VectorQuantizer(num_codes=num_codes, code_dim=code_dim, commitment=commitment, ema=ema,
                                         decay=decay, dead_code_threshold=dead_code_threshold)
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.pre_quant = nn.Conv2d(self.encoder_channels, code_dim, 1)
        self.signature = self._signature(("reconstruction", "indices"))

    def _latents(self, images: Tensor) -> Tensor:
        return self.pre_quant(self._features(self._check_images(images)))  # (B, code_dim, h, h)

    def forward(self, images: Tensor) -> VQVAEOutput:
        """(B, C, S, S) normalised -> VQVAEOutput. In training mode this updates the quantizer's statistics."""
        vq = self.quantizer(self._latents(images))
        return VQVAEOutput(self.decoder(vq.quantized), vq.indices, vq.commitment_loss, vq.codebook_loss,
                           vq.perplexity)

    def loss(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss", "reconstruction" (MSE), "commitment", "codebook", "perplexity" (detached, for logging)}."""
        images = self._check_images(images)
        out = self(images)
        rec = F.mse_loss(out.reconstruction.float(), images.float())
        total = rec + out.commitment_loss + out.codebook_loss
        return {"loss": total, "reconstruction": rec.detach(), "commitment": out.commitment_loss.detach(),
                "codebook": out.codebook_loss.detach(), "perplexity": out.perplexity.detach()}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> code indices (B, h, h) int64. Updates no statistics."""
        return self.quantizer.nearest_codes(self._latents(images))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, h) int64 in [0, num_codes) -> images (B, C, S, S) in the normalised space."""
        h = self.latent_size
        if not isinstance(indices, Tensor) or indices.ndim != 3 or indices.shape[1:] != (h, h) or \
                indices.dtype != torch.long:
            raise ValueError(f"indices must be an int64 tensor of shape (B, {h}, {h}), got "
                             f"{(tuple(indices.shape), indices.dtype) if isinstance(indices, Tensor) else indices!r}")
        if not torch.compiler.is_compiling() and indices.numel() and not bool(
                ((indices >= 0) & (indices < self.num_codes)).all()):
            raise ValueError(f"indices must lie in [0, {self.num_codes}) (num_codes)")
        return self.decoder(self.quantizer.embed(indices))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """(B, C, S, S) normalised -> reconstructions through the nearest codes, (B, C, S, S) in [0, 1]."""
        return self._to_unit(self.decode_indices(self.encode(images)))

    @torch.no_grad()
    def sample(self, num_samples: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Uniformly random code grids -> (num_samples, C, S, S) in [0, 1]. Illustrative only (no learned prior)."""
        _check_num_samples(num_samples)
        _check_no_labels(labels, "VQVAE")
        device = self._mean.device
        h = self.latent_size
        idx = torch.randint(0, self.num_codes, (num_samples, h, h), generator=generator,
                            device=_sample_device(generator, device))
        return self._to_unit(self.decode_indices(idx.to(device)))
