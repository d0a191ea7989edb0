"""cvzoo/generative/autoencoders.py: encoder/decoder, AutoEncoder, VAE, VectorQuantizer, VQVAE.

Likelihoods and KL are checked against torch.distributions, the quantizer against brute-force
`torch.cdist` and hand-computed EMA updates, perplexity against its closed form.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from cvzoo.backbones import resnet_micro
from cvzoo.classification import ImageClassifier
from cvzoo.generative.autoencoders import (
    VAE,
    VQVAE,
    AutoEncoder,
    ConvDecoder,
    ConvEncoder,
    VAEOutput,
    VQVAEOutput,
)
from cvzoo.generative.quantizer import VectorQuantizer, VQOutput
from cvzoo.heads import ClassificationHead


def _unit_images(n: int = 4, size: int = 16, channels: int = 1, seed: int = 1) -> torch.Tensor:
    """Digit-like images in [0, 1]: random 4x4 binary stroke patterns, smoothly upsampled. (n, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, channels, 4, 4, generator=g) > 0.6).float()
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _normalised(n: int = 4, size: int = 16, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return _unit_images(n, size, channels, seed) * 2 - 1  # mean 0.5, std 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- encoder/decoder


@pytest.mark.parametrize(("widths", "norm_layer"), [((8,), nn.BatchNorm2d), ((8, 16, 24), None)])
def test_conv_encoder_declared_feature_info_matches_outputs(widths, norm_layer):
    enc = ConvEncoder(in_channels=2, widths=widths, norm_layer=norm_layer)
    feats = enc(torch.randn(2, 2, 16, 16))
    assert [tuple(f.shape) for f in feats] == [(2, w, 16 // 2 ** (i + 1), 16 // 2 ** (i + 1))
                                               for i, w in enumerate(widths)]
    assert [(f.channels, f.stride) for f in enc.feature_info] == [(w, 2 ** (i + 1)) for i, w in enumerate(widths)]
    assert enc.signature.mean == (0.5, 0.5) and enc.signature.std == (0.5, 0.5)
    assert enc.signature.size_divisor == 2 ** len(widths)
    assert any(isinstance(m, nn.BatchNorm2d) for m in enc.modules()) is (norm_layer is not None)


def test_conv_encoder_freeze_stages():
    enc = ConvEncoder(in_channels=1, widths=(4, 8, 8), frozen_stages=1)
    for name, p in enc.named_parameters():
        assert p.requires_grad is (not name.startswith(("stages.0.", "stages.1."))), name
    enc.train()
    assert not enc.stages[0].training and not enc.stages[1].training and enc.stages[2].training
    with pytest.raises(ValueError, match="frozen_stages"):
        enc.freeze_stages(3)


def test_conv_encoder_as_classifier_backbone_trains():
    enc = ConvEncoder(in_channels=1, widths=(8, 16))
    model = ImageClassifier(backbone=enc, head=ClassificationHead(enc.feature_info[-1].channels, 3))
    assert model.signature.mean == (0.5,)
    images = _normalised(8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(images, labels)["loss"]
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    opt.step()
    for _ in range(9):
        opt.zero_grad()
        model.loss(images, labels)["loss"].backward()
        opt.step()
    assert model.loss(images, labels)["loss"] < 0.8 * first.detach()


@pytest.mark.parametrize("widths", [(8,), (16, 8, 4)])
def test_conv_decoder_upsamples_by_two_per_stage(widths):
    dec = ConvDecoder(latent_channels=5, out_channels=3, widths=widths)
    out = dec(torch.randn(2, 5, 3, 2))
    assert out.shape == (2, 3, 3 * 2 ** len(widths), 2 * 2 ** len(widths))
    assert dec.scale == 2 ** len(widths)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("image_size", "widths"), [(8, (8,)), (16, (4, 8)), (32, (4, 8, 8))])
def test_model_shapes(image_size, widths):
    x = _normalised(2, image_size)
    h = image_size // 2 ** len(widths)

    ae = AutoEncoder(image_size=image_size, latent_dim=5, widths=widths)
    assert ae.encode(x).shape == (2, 5)
    assert ae(x).shape == x.shape and ae.decode(torch.randn(3, 5)).shape == (3, 1, image_size, image_size)
    rec = ae.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    assert not hasattr(ae, "sample")  # a plain autoencoder has no prior to sample from

    vae = VAE(image_size=image_size, latent_dim=3, widths=widths)
    out = vae(x)
    assert isinstance(out, VAEOutput)
    assert out.reconstruction.shape == x.shape and out.mean.shape == out.log_var.shape == (2, 3)
    assert vae.elbo(x).shape == (2,)
    s = vae.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, image_size, image_size) and s.min() >= 0 and s.max() <= 1

    vq = VQVAE(image_size=image_size, num_codes=6, code_dim=3, widths=widths)
    out = vq(x)
    assert isinstance(out, VQVAEOutput) and out.reconstruction.shape == x.shape
    idx = vq.encode(x)
    assert idx.shape == (2, h, h) and idx.dtype == torch.long
    assert vq.decode_indices(idx).shape == x.shape
    assert vq.reconstruct(x).shape == x.shape
    s = vq.sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 1, image_size, image_size) and s.min() >= 0 and s.max() <= 1
    for model in (ae, vae, vq):
        assert model.image_size == image_size and model.in_channels == 1 and model.num_classes is None
        assert model.signature.mean == (0.5,) and model.signature.std == (0.5,)


def test_sampling_reproducible_with_generator():
    for model in (VAE(image_size=8, widths=(4,)), VQVAE(image_size=8, widths=(4,), num_codes=4, code_dim=2)):
        model.eval()
        a = model.sample(2, generator=torch.Generator().manual_seed(3))
        b = model.sample(2, generator=torch.Generator().manual_seed(3))
        c = model.sample(2, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_custom_backbone_encoder():
    enc = resnet_micro(in_channels=1, out_indices=(0,))  # stride 4, 16 channels
    ae = AutoEncoder(image_size=16, in_channels=1, latent_dim=6, widths=(4, 8), encoder=enc)
    assert ae.signature.mean == enc.signature.mean and ae.signature.std == enc.signature.std
    assert ae(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    vq = VQVAE(image_size=16, in_channels=1, num_codes=4, code_dim=2, widths=(4, 8), encoder=enc)
    assert vq.encode(torch.randn(2, 1, 16, 16)).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="widths"):
        AutoEncoder(image_size=16, widths=(4,), encoder=resnet_micro(in_channels=1, out_indices=(0,)))
    with pytest.raises(ValueError, match="in_channels"):
        AutoEncoder(image_size=16, in_channels=3, widths=(4, 8), encoder=resnet_micro(in_channels=1, out_indices=(0,)))
    with pytest.raises(ValueError, match="encoder"):
        AutoEncoder(image_size=16, encoder=nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------------- VAE


def _vae_reference(model: VAE, x: torch.Tensor, seed: int):
    """Per-image -log p(x|z) and KL from torch.distributions, for the z that `forward` draws under `seed`."""
    torch.manual_seed(seed)
    out = model(x)
    kl = kl_divergence(Normal(out.mean, torch.exp(0.5 * out.log_var)), Normal(0.0, 1.0)).sum(1)
    if model.likelihood == "bernoulli":
        logp = Bernoulli(logits=out.reconstruction, validate_args=False).log_prob(x)
    else:
        # the density of pixels in [0, 1] units: mean and scale mapped back through x = 0.5 * x_norm + 0.5
        sigma = float(model.log_sigma.detach().exp())
        logp = Normal(out.reconstruction * 0.5 + 0.5, sigma * 0.5).log_prob(x * 0.5 + 0.5)
    return -logp.flatten(1).sum(1), kl


@pytest.mark.parametrize(("likelihood", "sigma"), [("gaussian", None), ("gaussian", 0.2), ("bernoulli", None)])
def test_vae_loss_and_elbo_match_torch_distributions(likelihood, sigma):
    model = VAE(image_size=8, latent_dim=4, widths=(4,), beta=2.5, likelihood=likelihood, sigma=sigma)
    model.eval()
    if likelihood == "gaussian" and sigma is None:
        with torch.no_grad():
            model.log_sigma.fill_(0.3)
        x = _normalised(3, 8)
    else:
        x = _unit_images(3, 8) if likelihood == "bernoulli" else _normalised(3, 8)
    if likelihood == "bernoulli":
        assert model.signature.mean == (0.0,) and model.signature.std == (1.0,)
    nll, kl = _vae_reference(model, x, seed=7)
    torch.manual_seed(7)
    losses = model.loss(x)
    torch.testing.assert_close(losses["loss"], (nll + 2.5 * kl).mean())
    torch.testing.assert_close(losses["reconstruction"], nll.mean())
    torch.testing.assert_close(losses["kl"], kl.mean())
    torch.manual_seed(7)
    torch.testing.assert_close(model.elbo(x), -(nll + kl))  # beta = 1 in the ELBO


def test_vae_reparameterisation_gradient_reaches_encoder():
    model = VAE(image_size=8, latent_dim=4, widths=(4,), beta=0.0)  # no KL: log_var gets gradient only through z
    model.loss(_normalised(4, 8))["loss"].backward()
    log_var_rows = model.to_posterior.weight.grad[4:]  # second half of the Linear produces log_var
    assert log_var_rows.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert model.log_sigma.grad is not None


def test_vae_learns_sigma_and_fixed_sigma_is_constant():
    learned = VAE(image_size=8, widths=(4,))
    assert isinstance(learned.log_sigma, nn.Parameter)
    fixed = VAE(image_size=8, widths=(4,), sigma=0.1)
    assert not any(p is fixed.log_sigma for p in fixed.parameters())
    assert math.isclose(float(fixed.log_sigma), math.log(0.1), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------- training


def _train(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = last = None
    for _ in range(steps):
        loss = model.loss(x)["loss"]
        last = float(loss.detach())
        first = last if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, last


def test_autoencoder_overfits_small_set():
    model = AutoEncoder(image_size=8, latent_dim=16, widths=(8,))
    first, last = _train(model, _normalised(32, 8), steps=40)
    assert last < 0.1 * first, (first, last)


def test_vae_overfits_small_set():
    model = VAE(image_size=8, latent_dim=8, widths=(8,))
    first, last = _train(model, _normalised(32, 8), steps=40)
    assert last < 0.5 * first, (first, last)  # nats per image, from about 35


# ---------------------------------------------------------------------------------------------- quantizer


def test_vq_indices_match_cdist_argmin():
    vq = VectorQuantizer(num_codes=16, code_dim=3).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(16, 3))
    z = torch.randn(2, 3, 5, 4)
    out = vq(z)
    assert isinstance(out, VQOutput) and out.indices.shape == (2, 5, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    ref = torch.cdist(flat.double(), vq.codebook.double()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), ref)
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 3), vq.codebook[ref])
    assert torch.equal(vq.nearest_codes(z), out.indices)


@pytest.mark.parametrize("ema", [True, False])
def test_vq_straight_through_gradient(ema):
    vq = VectorQuantizer(num_codes=8, code_dim=3, ema=ema)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(8, 3))
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, 4)
    out = vq(z)
    (out.quantized**3 * w).sum().backward()
    q = out.quantized.detach().clone().requires_grad_(True)  # the same values as a leaf
    (q**3 * w).sum().backward()
    torch.testing.assert_close(z.grad, q.grad)


def test_vq_losses_against_hand_computation():
    vq = VectorQuantizer(num_codes=5, code_dim=2, ema=False, commitment=0.4).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(5, 2))
    z = torch.randn(3, 2, 2, 2)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    book = vq.codebook.detach().clone()
    sq = ((flat[:, None] - book[None]) ** 2).sum(-1)  # (N, K)
    mse = sq.min(1).values.sum() / flat.numel()
    out = vq(z)
    torch.testing.assert_close(out.commitment_loss, 0.4 * mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    out.codebook_loss.backward()
    used = torch.zeros(5, dtype=torch.bool)
    used[sq.argmin(1)] = True
    assert (vq.codebook.grad[used].abs().sum(1) > 0).all() and (vq.codebook.grad[~used] == 0).all()


def test_vq_ema_update_matches_hand_computed_step():
    vq = VectorQuantizer(num_codes=3, code_dim=2, decay=0.9, eps=0.1).train()  # eps large enough to matter
    book = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 2.0]])
    with torch.no_grad():
        vq.codebook.copy_(book)
        vq.embed_sum.copy_(book)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.2], [1.1, 0.8], [0.2, -0.1]])  # (B=4, D=2): codes 0, 1, 1, 0
    out = vq(z)
    assert out.indices.tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(out.quantized, book[[0, 1, 1, 0]])  # quantised with the codebook before the update
    assert out.codebook_loss == 0
    # by hand: counts (2, 2, 0), sums ((0.3, -0.1), (2.0, 2.0), (0, 0))
    size = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 0]
    sums = [[0.9 * 0.0 + 0.1 * 0.3, 0.9 * 0.0 + 0.1 * -0.1], [0.9 + 0.1 * 2.0, 0.9 + 0.1 * 2.0],
            [0.9 * -2.0, 0.9 * 2.0]]
    n = sum(size)
    smoothed = [(s + 0.1) / (n + 3 * 0.1) * n for s in size]  # Laplace smoothing
    expected = torch.tensor([[v / smoothed[k] for v in sums[k]] for k in range(3)])
    torch.testing.assert_close(vq.cluster_size, torch.tensor(size))
    torch.testing.assert_close(vq.embed_sum, torch.tensor(sums))
    torch.testing.assert_close(vq.codebook, expected)


@pytest.mark.parametrize("ema", [True, False])
def test_vq_dead_code_is_restarted_in_training_only(ema):
    vq = VectorQuantizer(num_codes=4, code_dim=2, ema=ema, decay=0.9, dead_code_threshold=0.5)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))  # code 3 unused
        if ema:
            vq.embed_sum.copy_(vq.codebook)
        vq.cluster_size.copy_(torch.tensor([1.0, 1.0, 1.0, 0.3]))
    z = torch.rand(6, 2)
    vq.eval()
    vq(z)
    assert vq.codebook[3].tolist() == [100.0, 100.0] and math.isclose(float(vq.cluster_size[3]), 0.3, rel_tol=1e-6)
    vq.train()
    z.requires_grad_(True)
    out = vq(z)
    (out.quantized.sum() + out.codebook_loss).backward()  # the in-place restart leaves autograd intact
    assert z.grad is not None
    z = z.detach()
    assert (out.indices != 3).all()
    assert torch.cdist(vq.codebook[3:4].detach(), z).min() == 0  # moved onto one of this batch's vectors
    assert float(vq.cluster_size[3]) == 1.0
    if ema:
        assert torch.equal(vq.embed_sum[3], vq.codebook[3])
    assert (vq.cluster_size[:3] > 0.5).all()  # codes in use keep their statistics (not reset to 1)
    assert (vq.cluster_size[:3] != 1.0).all()


def test_vq_perplexity_closed_form():
    vq = VectorQuantizer(num_codes=4, code_dim=1).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    out = vq(torch.tensor([[0.1], [-0.2], [9.0], [21.0]]))  # usage (1/2, 1/4, 1/4, 0)
    expected = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))  # 2 ** 1.5
    torch.testing.assert_close(out.perplexity, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------- VQVAE


def test_vqvae_loss_keys_and_encode_updates_nothing():
    model = VQVAE(image_size=8, widths=(4,), num_codes=4, code_dim=2).train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(_normalised(2, 8))
    assert all(torch.equal(v, model.quantizer.state_dict()[k]) for k, v in before.items())
    losses = model.loss(_normalised(2, 8))
    assert set(losses) == {"loss", "reconstruction", "commitment", "codebook", "perplexity"}
    torch.testing.assert_close(losses["loss"], losses["reconstruction"] + losses["commitment"] + losses["codebook"])
    assert not losses["perplexity"].requires_grad and 1 <= float(losses["perplexity"]) <= 4
    assert not torch.equal(before["cluster_size"], model.quantizer.cluster_size)  # training mode updates the EMA


def test_vqvae_state_dict_round_trip():
    model = VQVAE(image_size=8, widths=(4,), num_codes=6, code_dim=2, dead_code_threshold=0.5, decay=0.5)
    _train(model, _normalised(4, 8), steps=3)
    assert {"quantizer.codebook", "quantizer.embed_sum", "quantizer.cluster_size"} <= set(model.state_dict())
    torch.manual_seed(123)
    clone = VQVAE(image_size=8, widths=(4,), num_codes=6, code_dim=2, dead_code_threshold=0.5, decay=0.5)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    x = _normalised(3, 8, seed=5)
    a, b = model(x), clone(x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.indices, b.indices)
    assert torch.equal(model.sample(2, generator=torch.Generator().manual_seed(0)),
                       clone.sample(2, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------- compile


def test_vae_loss_compiles_fullgraph():
    model = VAE(image_size=8, latent_dim=4, widths=(4,))
    x = _normalised(2, 8)
    torch.manual_seed(3)
    eager = model.loss(x)
    torch.manual_seed(3)
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)(x)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])


def test_vqvae_ema_loss_compiles_fullgraph_in_train_mode():
    torch.manual_seed(0)
    model = VQVAE(image_size=8, widths=(4,), num_codes=8, code_dim=2, ema=True, decay=0.5,
                  dead_code_threshold=0.9).train()
    twin = copy.deepcopy(model)
    x = _normalised(2, 8)
    torch.manual_seed(4)
    eager = model.loss(x)
    torch.manual_seed(4)
    compiled = torch.compile(twin.loss, backend="eager", fullgraph=True)(x)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])
    for (k, v), w in zip(model.quantizer.state_dict().items(), twin.quantizer.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, msg=k)
    assert not torch.equal(model.quantizer.cluster_size, torch.ones(8))  # the EMA step ran in the graph


# ---------------------------------------------------------------------------------------------- validation


def test_validation_errors():
    ae, vae, vq = (AutoEncoder(image_size=8, widths=(4,)), VAE(image_size=8, widths=(4,)),
                   VQVAE(image_size=8, widths=(4,), num_codes=4, code_dim=2))
    for model in (ae, vae, vq):
        with pytest.raises(ValueError, match="16x16"):
            model.loss(torch.randn(2, 1, 16, 16))
        with pytest.raises(ValueError, match="channels"):
            model.loss(torch.randn(2, 3, 8, 8))
    for model in (vae, vq):
        with pytest.raises(ValueError, match="num_samples"):
            model.sample(0)
        with pytest.raises(ValueError, match="labels"):
            model.sample(2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        AutoEncoder(image_size=12, widths=(4, 8, 8))
    with pytest.raises(ValueError, match="beta"):
        VAE(beta=-0.1)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="laplace")
    with pytest.raises(ValueError, match="sigma"):
        VAE(sigma=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        VAE(image_size=8, widths=(4,), likelihood="bernoulli").loss(_normalised(2, 8))
    with pytest.raises(ValueError, match="num_codes"):
        VQVAE(num_codes=1)
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            VectorQuantizer(num_codes=4, code_dim=2, decay=decay)
    with pytest.raises(ValueError, match="dead_code_threshold"):
        VectorQuantizer(num_codes=4, code_dim=2, dead_code_threshold=-1.0)
    with pytest.raises(ValueError, match="latent_dim"):
        AutoEncoder(latent_dim=0)
    with pytest.raises(ValueError, match="widths"):
        ConvEncoder(widths=())
    with pytest.raises(ValueError, match="num_codes"):
        vq.decode_indices(torch.full((1, 4, 4), 4))
    with pytest.raises(ValueError, match="indices"):
        vq.decode_indices(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="z"):
        vae.decode(torch.randn(2, 5))
