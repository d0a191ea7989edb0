import pytest
import torch
from torch import nn

from cvzoo.generative.gan import GAN, DCGANDiscriminator, DCGANGenerator, dcgan_init_


def _nets(image_size=8, num_classes=None, latent_dim=6, base=4, d_norm=nn.BatchNorm2d, channels=1, **d_kwargs):
    g = DCGANGenerator(latent_dim=latent_dim, image_size=image_size, out_channels=channels, base_channels=base,
                       num_classes=num_classes)
    d = DCGANDiscriminator(image_size=image_size, in_channels=channels, base_channels=base,
                           num_classes=num_classes, norm_layer=d_norm, **d_kwargs)
    return g, d


def _gan(image_size=8, num_classes=None, d_norm=nn.BatchNorm2d, spectral_norm=False, **kwargs):
    return GAN(*_nets(image_size, num_classes, d_norm=d_norm, spectral_norm=spectral_norm), **kwargs)


def _batch(b=4, size=8, channels=1, num_classes=None):
    images = torch.rand(b, channels, size, size) * 2 - 1
    labels = torch.arange(b) % num_classes if num_classes else None
    return images, labels


@pytest.mark.parametrize("image_size", [8, 16, 32])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_shapes(image_size, num_classes):
    g, d = _nets(image_size, num_classes, channels=3)
    n = {8: 1, 16: 2, 32: 3}[image_size]
    assert len(g.stages) == n and len(d.stages) == n
    z = torch.randn(5, 6)
    labels = torch.tensor([0, 1, 2, 0, 1]) if num_classes else None
    x = g(z, labels)
    assert x.shape == (5, 3, image_size, image_size)
    assert x.abs().max() <= 1.0
    assert g.project(torch.cat([z, g.embed(labels)], 1)[:, :, None, None] if num_classes else z[:, :, None, None]
                     ).shape == (5, 4 * 2 ** (n - 1), 4, 4)
    assert d(x, labels).shape == (5,)
    assert d.stages(x).shape == (5, 4 * 2 ** (n - 1), 4, 4) and d.feature_dim == 16 * 4 * 2 ** (n - 1)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_projection_logit_is_linear_plus_embedding_inner_product(spectral_norm):
    d = DCGANDiscriminator(image_size=16, in_channels=2, base_channels=4, num_classes=5, norm_layer=None,
                           spectral_norm=spectral_norm).eval()
    images, labels = torch.randn(6, 2, 16, 16), torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad():
        h = images
        for stage in d.stages:  # conv -> LeakyReLU(0.2), no norm
            conv = stage[0]
            h = torch.nn.functional.conv2d(h, conv.weight, conv.bias, stride=2, padding=1)
            h = torch.where(h > 0, h, 0.2 * h)
        phi = h.reshape(6, -1)
        w, b, emb = d.linear.weight[0], d.linear.bias[0], d.embed.weight
        want = torch.stack([phi[i] @ w + b + emb[labels[i]] @ phi[i] for i in range(6)])
        torch.testing.assert_close(d(images, labels), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.features(images), phi)
        if spectral_norm:  # the parametrised weights are normalised to spectral norm ~1
            sigma = torch.linalg.matrix_norm(d.stages[0][0].weight.flatten(1), ord=2)
            assert sigma.item() == pytest.approx(1.0, abs=0.1)


def test_unconditional_logit_is_the_linear_layer():
    d = DCGANDiscriminator(image_size=8, base_channels=4).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(d(x), d.features(x) @ d.linear.weight[0] + d.linear.bias[0])
    assert d.embed is None


def test_dcgan_init_statistics():
    g = DCGANGenerator(latent_dim=64, image_size=16, base_channels=64)
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(norms) == 3
    for m in convs:
        assert m.weight.mean().abs() < 0.002 and m.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert m.bias is None or not m.bias.any()
    scales = torch.cat([m.weight for m in norms])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.005) and scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert not torch.cat([m.bias for m in norms]).any()
    lin = nn.Sequential(nn.Linear(200, 300), nn.GroupNorm(4, 300))
    dcgan_init_(lin)
    assert lin[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert lin[1].weight.mean().item() == pytest.approx(1.0, abs=0.01)


def test_generator_conditioning_changes_the_output():
    g = DCGANGenerator(latent_dim=6, image_size=8, base_channels=4, num_classes=3).eval()
    z = torch.randn(1, 6).expand(3, 6)
    x = g(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[1], x[2])
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        DCGANGenerator(latent_dim=6, image_size=8, base_channels=4)(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="z"):
        g(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_gan_reads_its_parts_and_normalises_to_minus_one_one():
    gan = _gan(16, 3, loss="hinge")
    assert (gan.latent_dim, gan.image_size, gan.in_channels, gan.num_classes) == (6, 16, 1, 3)
    assert gan.signature.mean == (0.5,) and gan.signature.std == (0.5,) and gan.signature.in_channels == 1
    z, labels = torch.randn(2, 6), torch.tensor([0, 2])
    gan.eval()
    torch.testing.assert_close(gan(z, labels), gan.generator(z, labels))


def test_discriminator_phase_leaves_the_generator_without_gradients():
    gan = _gan(8, 2)
    images, labels = _batch(num_classes=2)
    out = gan.loss(images, labels, phase="discriminator")
    assert set(out) == {"loss", "loss_discriminator", "d_real", "d_fake"}
    out["loss"].backward()
    assert all(p.grad is None for p in gan.generator.parameters())
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    assert not out["d_real"].requires_grad and not out["d_fake"].requires_grad


def test_generator_phase_gives_generator_gradients():
    gan = _gan(8, 2)
    images, labels = _batch(num_classes=2)
    out = gan.loss(images, labels, phase="generator")
    assert set(out) == {"loss", "loss_generator"}
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator.parameters())


def test_phase_none_sums_both_and_routes_the_discriminator_term_away_from_the_generator():
    gan = _gan(8, 2)
    images, labels = _batch(num_classes=2)
    out = gan.loss(images, labels)
    assert set(out) == {"loss", "loss_discriminator", "loss_generator", "d_real", "d_fake"}
    torch.testing.assert_close(out["loss"], out["loss_discriminator"] + out["loss_generator"])
    out["loss_discriminator"].backward(retain_graph=True)
    assert all(p.grad is None for p in gan.generator.parameters())
    out["loss_generator"].backward()
    assert all(p.grad is not None for p in gan.generator.parameters())


def test_discriminator_terms_against_a_manual_computation():
    gan = _gan(8, 2, loss="non_saturating").eval()  # eval: BatchNorm with running stats, calls independent
    images, labels = _batch(num_classes=2)
    torch.manual_seed(5)
    out = gan.loss(images, labels, phase="discriminator")
    torch.manual_seed(5)
    z = torch.randn(4, 6)
    with torch.no_grad():
        real = gan.discriminator(images, labels)
        fake = gan.discriminator(gan.generator(z, labels), labels)
    assert out["d_real"].item() == pytest.approx(real.mean().item(), rel=1e-5)
    assert out["d_fake"].item() == pytest.approx(fake.mean().item(), rel=1e-5)
    want = torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()
    assert out["loss_discriminator"].item() == pytest.approx(want.item(), rel=1e-5)


def test_penalties_enter_the_discriminator_loss():
    gan = _gan(8, 2, d_norm=None, loss="wasserstein", gradient_penalty=10.0, r1_gamma=3.0)
    images, labels = _batch(num_classes=2)
    out = gan.loss(images, labels, phase="discriminator")
    assert set(out) == {"loss", "loss_discriminator", "d_real", "d_fake", "gradient_penalty", "r1"}
    want = out["loss_discriminator"] + 10.0 * out["gradient_penalty"] + 3.0 * out["r1"]
    torch.testing.assert_close(out["loss"], want)
    x = images.clone().requires_grad_(True)  # R1 by hand: 0.5 * E ||grad_x D(x)||^2 on the real batch
    (grad,) = torch.autograd.grad(gan.discriminator(x, labels).sum(), x)
    torch.testing.assert_close(out["r1"], 0.5 * grad.pow(2).sum((1, 2, 3)).mean())
    out["loss"].backward()
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    assert all(p.grad is None for p in gan.generator.parameters())
    # under no_grad (e.g. a phase-"discriminator" evaluation) the penalties still compute
    with torch.no_grad():
        assert torch.isfinite(gan.loss(images, labels, phase="discriminator")["loss"])


def test_gradient_penalty_with_spectral_norm_backward():
    gan = _gan(16, None, d_norm=None, loss="wasserstein", gradient_penalty=10.0, spectral_norm=True)
    images, _ = _batch(size=16)
    out = gan.loss(images, phase="discriminator")
    out["loss"].backward()
    grads = [p.grad for p in gan.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_configure_optimizers():
    gan = _gan(8, 2, betas=(0.0, 0.99), lr_discriminator=4e-4)
    opts = gan.configure_optimizers(1e-4, 0.01)
    assert list(opts) == list(gan.phases) == ["discriminator", "generator"]
    for phase, net in (("discriminator", gan.discriminator), ("generator", gan.generator)):
        opt = opts[phase]
        assert isinstance(opt, torch.optim.Adam)
        params = [p for group in opt.param_groups for p in group["params"]]
        assert len(params) == len(list(net.parameters()))
        assert {id(p) for p in params} == {id(p) for p in net.parameters()}
        for group in opt.param_groups:
            assert group["betas"] == (0.0, 0.99)
            assert group["lr"] == (4e-4 if phase == "discriminator" else 1e-4)
            assert group["weight_decay"] == (0.01 if group["params"][0].ndim >= 2 else 0.0)
    with pytest.raises(ValueError, match="lr"):
        gan.configure_optimizers(0.0, 0.0)


@pytest.mark.parametrize("phase", ["discriminator", "generator", None])
def test_loss_compiles_fullgraph(phase):
    gan = _gan(8, 2, loss="hinge")
    images, labels = _batch(num_classes=2)
    torch.manual_seed(1)
    eager = gan.loss(images, labels, phase=phase)
    compiled = torch.compile(gan.loss, backend="eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(images, labels, phase=phase)
    assert set(out) == set(eager)
    for k in eager:
        torch.testing.assert_close(out[k], eager[k])


def _two_halves(n, gen):
    """8x8 images in [-1, 1]: class 0 has its left half bright, class 1 its right half (+ noise)."""
    labels = torch.randint(0, 2, (n,), generator=gen)
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, :, :4] = 1.0
    x[labels == 1, :, :, 4:] = 1.0
    return (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1), labels


def test_conditional_gan_learns_two_classes(one_thread):
    gen = torch.Generator().manual_seed(0)
    g = DCGANGenerator(latent_dim=8, image_size=8, base_channels=8, num_classes=2)
    d = DCGANDiscriminator(image_size=8, base_channels=8, num_classes=2, norm_layer=None)
    gan = GAN(g, d, loss="non_saturating")
    opts = gan.configure_optimizers(2e-3, 0.0)
    for _ in range(400):  # the trainer's phase loop, by hand
        images, labels = _two_halves(32, gen)
        for phase in gan.phases:
            losses = gan.loss(images, labels, phase=phase)
            opts[phase].zero_grad(set_to_none=True)
            losses["loss"].backward()
            opts[phase].step()
    real, real_labels = _two_halves(512, gen)
    means = torch.stack([real[real_labels == k].flatten(1).mean(0) for k in range(2)])  # (2, 64)
    want = torch.arange(2).repeat(100)
    samples = gan.eval().sample(200, labels=want, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (200, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    dist = torch.cdist(samples.flatten(1) * 2 - 1, means)  # (200, 2), in the normalised space
    assert (dist.argmin(1) == want).float().mean() >= 0.8
    # and they look like the class: on average far nearer their class mean than the class means are apart
    assert dist.gather(1, want[:, None]).mean() < 0.35 * torch.dist(means[0], means[1])


def test_sample():
    gan = _gan(8, 3).eval()
    labels = torch.tensor([0, 1, 2, 2])
    a = gan.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    b = gan.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 1, 8, 8) and a.min() >= 0 and a.max() <= 1 and not a.requires_grad
    torch.testing.assert_close(a, b)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, (gan(z, labels) + 1) / 2)
    assert _gan(8, None).sample(2).shape == (2, 1, 8, 8)


def test_unconditional_gan_ignores_targets():
    gan = _gan(8, None)
    images, _ = _batch()
    assert set(gan.loss(images, torch.tensor([0, 1, 0, 1]), phase="discriminator")) >= {"loss", "d_real"}


def test_value_errors():
    with pytest.raises(ValueError, match="loss"):
        _gan(8, None, loss="lsgan")
    for size in (12, 4, 6, 8.0):
        with pytest.raises(ValueError, match="image_size"):
            DCGANGenerator(image_size=size)
        with pytest.raises(ValueError, match="image_size"):
            DCGANDiscriminator(image_size=size)
    g, _ = _nets(8)
    _, d16 = _nets(16)
    with pytest.raises(ValueError, match="image_size"):
        GAN(g, d16)
    with pytest.raises(ValueError, match="in_channels"):
        GAN(g, _nets(8, channels=3)[1])
    with pytest.raises(ValueError, match="num_classes"):
        GAN(g, _nets(8, num_classes=2)[1])
    with pytest.raises(ValueError, match="gradient_penalty"):  # 16x16: the second stage has a BatchNorm
        _gan(16, None, d_norm=nn.BatchNorm2d, loss="wasserstein", gradient_penalty=10.0)
    _gan(16, None, d_norm=None, loss="wasserstein", gradient_penalty=10.0)  # fine without BatchNorm
    with pytest.raises(ValueError, match="gradient_penalty"):
        _gan(8, None, gradient_penalty=-1.0)
    with pytest.raises(ValueError, match="betas"):
        _gan(8, None, betas=(0.5, 1.0))
    with pytest.raises(ValueError, match="lr_generator"):
        _gan(8, None, lr_generator=0.0)

    gan = _gan(8, 2)
    images, labels = _batch(num_classes=2)
    with pytest.raises(ValueError, match="phase"):
        gan.loss(images, labels, phase="critic")
    with pytest.raises(ValueError, match="targets"):
        gan.loss(images)
    with pytest.raises(ValueError, match="targets"):
        gan.loss(images, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="targets"):
        gan.loss(images, labels[:3])
    with pytest.raises(ValueError, match="image_size"):
        gan.loss(torch.zeros(4, 1, 16, 16), labels)
    with pytest.raises(ValueError, match="channels"):
        gan.loss(torch.zeros(4, 3, 8, 8), labels)
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_samples"):
            gan.sample(n, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        gan.sample(2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        gan.sample(2, labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels"):
        gan.sample(2, labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="labels"):
        gan.sample(2, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        _gan(8, None).sample(2, labels=torch.tensor([0, 1]))
