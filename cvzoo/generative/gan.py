"""GANs: a DCGAN generator and discriminator (optionally class-conditional) and the GAN task model.

Images live in the normalised space [-1, 1] (mean 0.5, std 0.5 on [0, 1] pixels): the generator ends in
tanh and the discriminator takes normalised images. Class-conditional models follow Mirza & Osindero
(2014) in the generator (a class embedding concatenated to z) and Miyato & Koyama (2018) in the
discriminator (the projection discriminator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cvzoo.generative.gan_losses import (
    LOSS_KINDS,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from cvzoo.generative.gan_losses import gradient_penalty as wgan_gradient_penalty
from cvzoo.layers import NormLayer
from cvzoo.types import Signature, cast_like_parameters


def _num_stages(image_size: object) -> int:
    """Stride-2 stages between 4x4 and image_size: log2(image_size / 4)."""
    ok = isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 8
    if not ok or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of 2 >= 8 (the DCGAN stages halve it down to 4x4), "
                         f"got {image_size!r}")
    return int(math.log2(image_size // 4))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_num_classes(num_classes: object) -> None:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2 or None (unconditional), got {num_classes!r}")


def _check_label_tensor(labels: object, batch: int, num_classes: int | None, name: str, owner: str) -> None:
    """Static checks (compile-clean): labels (batch,) of an integer dtype for a conditional model, None otherwise."""
    if num_classes is None:
        if labels is not None:
            raise ValueError(f"{name} must be None for an unconditional {owner} (num_classes=None), "
                             f"got {type(labels).__name__}")
        return
    if labels is None:
        raise ValueError(f"{name} are required: this {owner} is class-conditional (num_classes={num_classes}); "
                         f"pass int64 class labels of shape ({batch},)")
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of class labels with shape ({batch},), "
                         f"got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {labels.dtype}; expected an integer dtype (class indices)")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")


def _check_label_range(labels: Tensor, num_classes: int, name: str) -> None:
    # reads the values (a host-device sync): done at the task model's boundary, skipped while compiling
    if not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values from {int(labels.min())} "
                         f"to {int(labels.max())}")


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016) of every layer under `module`: Conv2d, ConvTranspose2d and
    Linear weights ~ N(0, 0.02) with zero bias; normalisation scales ~ N(1, 0.02) with zero shift.

    Embeddings are left to their owners. Apply before spectral norm (which reparametrises the weights).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _stage(conv: nn.Module, out_channels: int, norm_layer: NormLayer | None, act: nn.Module) -> nn.Sequential:
    layers = [conv] + ([norm_layer(out_channels)] if norm_layer is not None else []) + [act]
    return nn.Sequential(*layers)


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) [+ labels (B,)] -> images (B, out_channels, image_size, image_size) in [-1, 1].

    A transposed conv projects z (as a 1x1 map) to (base_channels * 2^(n-1), 4, 4); then
    n = log2(image_size / 4) stages of ConvTranspose2d(4, stride 2, padding 1) + norm + ReLU double the
    resolution and halve the channels down to `base_channels`; a 3x3 conv maps to `out_channels`, then tanh.
    Convolutions followed by a norm have no bias. Initialised with `dcgan_init_`.

    Class-conditional (`num_classes` set): a learned class embedding of size `latent_dim`, N(0, 1)-initialised
    like z itself, is concatenated to z (Mirza & Osindero 2014), so the projection sees 2 * latent_dim inputs.
    """

    def __init__(self, *, latent_dim: int = 64, image_size: int = 16, out_channels: int = 1,
                 base_channels: int = 64, num_classes: int | None = None,
                 norm_layer: NormLayer | None = nn.BatchNorm2d) -> None:
        super().__init__()
        n = _num_stages(image_size)
        _check_positive_int("latent_dim", latent_dim)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("base_channels", base_channels)
        _check_num_classes(num_classes)
        self.latent_dim, self.image_size, self.out_channels = latent_dim, image_size, out_channels
        self.num_classes = num_classes
        widths = [base_channels * 2 ** max(n - 1 - k, 0) for k in range(n + 1)]  # channels at 4 * 2^k pixels
        bias = norm_layer is None  # a norm's shift makes a conv bias redundant
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes is not None else None
        in_dim = latent_dim * (2 if num_classes is not None else 1)
        self.project = _stage(nn.ConvTranspose2d(in_dim, widths[0], 4, 1, 0, bias=bias), widths[0], norm_layer,
                              nn.ReLU(inplace=True))
        self.stages = nn.Sequential(*(
            _stage(nn.ConvTranspose2d(widths[k], widths[k + 1], 4, 2, 1, bias=bias), widths[k + 1], norm_layer,
                   nn.ReLU(inplace=True))
            for k in range(n)
        ))
        self.to_image = nn.Conv2d(widths[-1], out_channels, 3, 1, 1)
        dcgan_init_(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, latent_dim), labels (B,) int64 or None -> (B, out_channels, image_size, image_size) in [-1, 1]."""
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (B, {self.latent_dim}), got {got}")
        _check_label_tensor(labels, z.shape[0], self.num_classes, "labels", "generator")
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)  # (B, 2 * latent_dim)
        x = self.project(z[:, :, None, None])  # (B, C0, 4, 4)
        return torch.tanh(self.to_image(self.stages(x)))


class DCGANDiscriminator(nn.Module):
    """images (B, in_channels, image_size, image_size) in [-1, 1] [+ labels (B,)] -> logits (B,).

    n = log2(image_size / 4) stages of Conv2d(4, stride 2, padding 1) + norm + LeakyReLU(0.2) halve the
    resolution down to 4x4 and double the channels from `base_channels` (the first stage has no norm, as
    in DCGAN). phi(x) is the final (C, 4, 4) map flattened, (B, feature_dim = 16 * base_channels * 2^(n-1)),
    so linear(phi(x)) is exactly DCGAN's last layer (a 4x4 valid conv to one logit). Flattening rather than
    the global pooling of the ResNet projection discriminators keeps where features are: with one or two
    stages (8x8, 16x16 images) a pooled discriminator sees a bag of local patches and lets a generator pass
    rearranged patches as real. Unconditional: logit = linear(phi(x)). Class-conditional: the projection
    discriminator (Miyato & Koyama 2018), logit = linear(phi(x)) + <embed(y), phi(x)>, the embedding
    initialised N(0, 0.02) like the linear layer so both terms start small.

    `spectral_norm=True` wraps every conv, the linear layer and the embedding in
    `torch.nn.utils.parametrizations.spectral_norm` (SNGAN; usually with `norm_layer=None`). With a
    gradient penalty (WGAN-GP) the norm must not be BatchNorm: the penalty constrains each sample's
    gradient, which batch statistics couple across the batch (Gulrajani et al. 2017 use LayerNorm or none);
    use `norm_layer=None`, `nn.InstanceNorm2d(c, affine=True)` or `lambda c: nn.GroupNorm(1, c)`.
    Initialised with `dcgan_init_`.
    """

    def __init__(self, *, image_size: int = 16, in_channels: int = 1, base_channels: int = 64,
                 num_classes: int | None = None, norm_layer: NormLayer | None = nn.BatchNorm2d,
                 spectral_norm: bool = False) -> None:
        super().__init__()
        n = _num_stages(image_size)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("base_channels", base_channels)
        _check_num_classes(num_classes)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        widths = [in_channels] + [base_channels * 2 ** k for k in range(n)]
        self.stages = nn.Sequential(*(
            _stage(nn.Conv2d(widths[k], widths[k + 1], 4, 2, 1, bias=norm_layer is None or k == 0), widths[k + 1],
                   norm_layer if k > 0 else None, nn.LeakyReLU(0.2, inplace=True))
            for k in range(n)
        ))
        self.feature_dim = widths[-1] * 16
        self.linear = nn.Linear(self.feature_dim, 1)
        self.embed = nn.Embedding(num_classes, self.feature_dim) if num_classes is not None else None
        dcgan_init_(self)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def _check_images(self, images: object) -> Tensor:
        s = self.image_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (self.in_channels, s, s):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape (B, {self.in_channels}, {s}, {s}), got {got}")
        return images

    def features(self, images: Tensor) -> Tensor:
        """phi(x): (B, in_channels, S, S) -> (B, feature_dim), the last (C, 4, 4) map flattened."""
        return self.stages(self._check_images(images)).flatten(1)  # (B, C * 16)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, in_channels, S, S), labels (B,) int64 or None -> logits (B,)."""
        _check_label_tensor(labels, self._check_images(images).shape[0], self.num_classes, "labels",
                            "discriminator")
        phi = self.features(images)  # (B, F)
        logits = self.linear(phi).squeeze(1)  # (B,)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * phi).sum(dim=1)  # the projection term <embed(y), phi(x)>
        return logits


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_lr(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
    return float(value)


class GAN(nn.Module):
    """A generative adversarial network trained by alternating discriminator and generator updates.

    `GAN(generator, discriminator, loss="non_saturating" | "hinge" | "wasserstein", gradient_penalty=w,
    r1_gamma=gamma, betas=(0.5, 0.999), lr_generator=None, lr_discriminator=None)`. The generator must
    expose `latent_dim`, `image_size`, `out_channels` and `num_classes` and take `(z (B, latent_dim),
    labels)`; the discriminator `image_size`, `in_channels`, `num_classes` and take `(images, labels)`
    returning logits (B,); both must agree (ValueError otherwise). Images are normalised to [-1, 1]
    (`signature` mean = std = 0.5).

    Training (the trainer's phase hook): `phases = ("discriminator", "generator")`. Every step the trainer
    runs, for each phase in order on the same batch, `losses = model.loss(images, targets, phase=name)`,
    the backward of `losses["loss"]`, that phase's optimizer step and zero_grad. `configure_optimizers(lr,
    weight_decay)` returns `{"discriminator": ..., "generator": ...}`.

    - phase "discriminator": fakes from fresh z ~ N(0, I) are generated under `torch.no_grad()` (the
      generator gets no gradient); the discriminator runs separately on the real and on the fake batch (so
      BatchNorm sees unmixed batches). Returns {"loss", "loss_discriminator", "d_real", "d_fake"}
      ("d_real"/"d_fake": mean logits, detached), plus "gradient_penalty" when `gradient_penalty > 0`
      (WGAN-GP on real/fake interpolates) and "r1" when `r1_gamma > 0` (0.5 * E||grad_x D(x)||^2 on real
      images). "loss" = loss_discriminator + gradient_penalty * penalty + r1_gamma * r1, i.e. R1 enters as
      StyleGAN2's gamma / 2 * E||grad||^2.
    - phase "generator": fakes with gradients, discriminator on the fakes: {"loss", "loss_generator"}. The
      discriminator's parameters get gradients too; its optimizer is not stepped in this phase.
    - phase None (evaluation, the trainer's save/load check): both losses, {"loss": d + g,
      "loss_discriminator", "loss_generator", "d_real", "d_fake"}, without the penalties. The discriminator
      term sees `fake.detach()`, so it sends no gradient to the generator; but one optimizer over all
      parameters stepping this sum is NOT the alternating game (the generator term also pushes the
      discriminator towards calling fakes real, and both players move from the same point): it is there
      for evaluation.

    Class-conditional GANs (`num_classes` set on both networks) need `targets` (B,) int64 labels: the
    discriminator sees the real images with them, and the fakes are conditioned on the same labels, so the
    class balance of the fakes follows the data. Unconditional GANs ignore `targets`.

    `loss` is compile-clean (`torch.compile(gan.loss, fullgraph=True)`) for every phase without penalties;
    the penalties call `torch.autograd.grad(create_graph=True)`, which fullgraph compilation cannot trace
    (compile without fullgraph to let it break the graph there).

    With `gradient_penalty > 0` the discriminator must not contain BatchNorm (ValueError): the penalty is per
    sample, see `DCGANDiscriminator`.
    """

    phases = ("discriminator", "generator")

    def __init__(self, generator: nn.Module, discriminator: nn.Module, *, loss: str = "non_saturating",
                 gradient_penalty: float = 0.0, r1_gamma: float = 0.0, betas: tuple[float, float] = (0.5, 0.999),
                 lr_generator: float | None = None, lr_discriminator: float | None = None) -> None:
        super().__init__()
        for name, module, attrs in (("generator", generator, ("latent_dim", "image_size", "out_channels",
                                                              "num_classes")),
                                    ("discriminator", discriminator, ("image_size", "in_channels", "num_classes"))):
            missing = [a for a in attrs if not hasattr(module, a)]
            if not isinstance(module, nn.Module) or missing:
                raise ValueError(f"{name} must be an nn.Module with attributes {attrs}, got "
                                 f"{type(module).__name__} (missing {missing})")
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
        gp_weight = _check_weight("gradient_penalty", gradient_penalty)
        self.r1_gamma = _check_weight("r1_gamma", r1_gamma)
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.lr_generator = _check_lr("lr_generator", lr_generator)
        self.lr_discriminator = _check_lr("lr_discriminator", lr_discriminator)
        for attr, g_attr in (("image_size", "image_size"), ("in_channels", "out_channels"),
                             ("num_classes", "num_classes")):
            if getattr(discriminator, attr) != getattr(generator, g_attr):
                raise ValueError(f"discriminator.{attr}={getattr(discriminator, attr)!r} does not match "
                                 f"generator.{g_attr}={getattr(generator, g_attr)!r}")
        if gp_weight > 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in discriminator.modules()):
            raise ValueError(f"gradient_penalty={gradient_penalty} needs a discriminator without BatchNorm (the "
                             f"penalty is per sample and batch statistics couple the samples, WGAN-GP sec. 4); "
                             f"build it with norm_layer=None, InstanceNorm2d(affine=True) or GroupNorm(1, c)")
        self.generator = generator
        self.discriminator = discriminator
        self.loss_kind = loss
        self.gradient_penalty_weight = gp_weight
        self.betas = (float(betas[0]), float(betas[1]))
        self.latent_dim: int = generator.latent_dim
        self.image_size: int = generator.image_size
        self.in_channels: int = generator.out_channels
        self.num_classes: int | None = generator.num_classes
        c = self.in_channels
        self.signature = Signature(in_channels=c, mean=(0.5,) * c, std=(0.5,) * c, outputs=("images",))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, latent_dim), labels (B,) or None -> generated images (B, C, S, S) in the normalised space [-1, 1]."""
        return self.generator(z, labels)

    def configure_optimizers(self, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
        """{"discriminator": Adam over D's parameters, "generator": Adam over G's}, in `phases` order.

        Adam with `betas`; `lr_discriminator` / `lr_generator` override `lr` when set (TTUR, Heusel et al.
        2017). `weight_decay` is decoupled (AdamW, identical to Adam when 0) and applies to weights of 2 or
        more dimensions only, the trainer's `default_optimizer` rule; GANs are usually trained with 0.
        """
        _check_lr("lr", lr)
        _check_weight("weight_decay", weight_decay)
        rates = {"discriminator": self.lr_discriminator or lr, "generator": self.lr_generator or lr}
        nets = {"discriminator": self.discriminator, "generator": self.generator}
        optimizers = {}
        for phase in self.phases:
            params = [p for p in nets[phase].parameters() if p.requires_grad]
            groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": float(weight_decay)},
                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
            optimizers[phase] = torch.optim.AdamW([g for g in groups if g["params"]], lr=float(rates[phase]),
                                                  betas=self.betas)
        return optimizers

    def _check_labels(self, labels: object, batch: int, name: str) -> Tensor | None:
        _check_label_tensor(labels, batch, self.num_classes, name, "GAN")
        if labels is None:
            return None
        _check_label_range(labels, self.num_classes, name)
        return labels.long()

    def _discriminator_terms(self, images: Tensor, fake: Tensor, labels: Tensor | None,
                             penalties: bool) -> dict[str, Tensor]:
        disc = self.discriminator
        use_r1 = penalties and self.r1_gamma > 0
        if use_r1:  # R1 differentiates the real logits w.r.t. the real images
            real = images.detach().requires_grad_(True)
            with torch.enable_grad():
                real_logits = disc(real, labels)
        else:
            real_logits = disc(images, labels)
        fake_logits = disc(fake, labels)  # a separate call: BatchNorm never mixes real and fake statistics
        d_loss = discriminator_loss(real_logits, fake_logits, self.loss_kind)
        total = d_loss
        terms = {"loss_discriminator": d_loss, "d_real": real_logits.detach().float().mean(),
                 "d_fake": fake_logits.detach().float().mean()}
        if penalties and self.gradient_penalty_weight > 0:
            gp = wgan_gradient_penalty(lambda x: disc(x, labels), images, fake)
            terms["gradient_penalty"] = gp
            total = total + self.gradient_penalty_weight * gp
        if use_r1:
            r1 = r1_penalty(real_logits, real)
            terms["r1"] = r1
            total = total + self.r1_gamma * r1
        return {"loss": total, **terms}

    def loss(self, images: Tensor, targets: Tensor | None = None, phase: str | None = None) -> dict[str, Tensor]:
        """(B, C, S, S) normalised images, targets (B,) int64 labels (conditional) or None -> dict of scalars.

        See the class docstring for what each `phase` computes and returns.
        """
        if phase is not None and phase not in self.phases:
            raise ValueError(f"phase must be one of {self.phases} or None, got {phase!r}")
        images = cast_like_parameters(self.signature.validate(images), self)
        s = self.image_size
        if images.shape[-2:] != (s, s):
            raise ValueError(f"images of size {images.shape[-2]}x{images.shape[-1]} do not match the GAN's "
                             f"image_size {s}x{s}")
        labels = self._check_labels(targets, images.shape[0], "targets") if self.num_classes is not None else None
        z = torch.randn(images.shape[0], self.latent_dim, device=images.device, dtype=images.dtype)
        if phase == "discriminator":
            with torch.no_grad():
                fake = self.generator(z, labels)
            return self._discriminator_terms(images, fake, labels, penalties=True)
        fake = self.generator(z, labels)
        g_loss = generator_loss(self.discriminator(fake, labels), self.loss_kind)
        if phase == "generator":
            return {"loss": g_loss, "loss_generator": g_loss}
        terms = self._discriminator_terms(images, fake.detach(), labels, penalties=False)
        return {**terms, "loss": terms["loss"] + g_loss, "loss_generator": g_loss}

    @torch.no_grad()
    def sample(self, num_samples: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """-> (num_samples, C, S, S) images in [0, 1] on the model's device, from z ~ N(0, I).

        Conditional GANs need `labels` (num_samples,) int64 in [0, num_classes); unconditional ones take none.
        `generator` (a torch.Generator, on any device) makes the draw of z reproducible. The networks run in
        their current train/eval mode (BatchNorm uses batch statistics in train mode).
        """
        _check_positive_int("num_samples", num_samples)
        param = next(self.generator.parameters())
        if isinstance(labels, Tensor):
            labels = labels.to(param.device)
        labels = self._check_labels(labels, num_samples, "labels")
        z = torch.randn(num_samples, self.latent_dim, generator=generator,
                        device=generator.device if generator is not None else param.device)
        images = self.generator(z.to(device=param.device, dtype=param.dtype), labels)
        mean = torch.tensor(self.signature.mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
        std = torch.tensor(self.signature.std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)
