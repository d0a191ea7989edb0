import pytest
import torch
import torch.nn.functional as F

from cvzoo.generative.gan_losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty


def _logits():
    return torch.randn(7) * 3, torch.randn(5) * 3


def test_non_saturating_is_bce_with_logits():
    real, fake = _logits()
    want_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
              + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    want_g = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    torch.testing.assert_close(discriminator_loss(real, fake, "non_saturating"), want_d)
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), want_g)


def test_hinge_matches_an_elementwise_loop():
    real, fake = _logits()
    want_d = (sum(max(0.0, 1.0 - r) for r in real.tolist()) / len(real)
              + sum(max(0.0, 1.0 + f) for f in fake.tolist()) / len(fake))
    want_g = -sum(fake.tolist()) / len(fake)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(want_d, rel=1e-5)
    assert generator_loss(fake, "hinge").item() == pytest.approx(want_g, rel=1e-5)


def test_wasserstein_closed_form():
    real, fake = _logits()
    want_d = sum(fake.tolist()) / len(fake) - sum(real.tolist()) / len(real)
    assert discriminator_loss(real, fake, "wasserstein").item() == pytest.approx(want_d, rel=1e-5, abs=1e-6)
    assert generator_loss(fake, "wasserstein").item() == pytest.approx(-sum(fake.tolist()) / len(fake), rel=1e-5)


@pytest.mark.parametrize("kind", ["non_saturating", "hinge", "wasserstein"])
def test_losses_run_in_float32_under_autocast(kind):
    real, fake = (t.bfloat16() for t in _logits())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = discriminator_loss(real, fake, kind)
        g = generator_loss(fake, kind)
    assert d.dtype == g.dtype == torch.float32
    torch.testing.assert_close(d, discriminator_loss(real.float(), fake.float(), kind))
    torch.testing.assert_close(g, generator_loss(fake.float(), kind))


def test_unknown_kind_raises():
    real, fake = _logits()
    with pytest.raises(ValueError, match="kind"):
        discriminator_loss(real, fake, "lsgan")
    with pytest.raises(ValueError, match="kind"):
        generator_loss(fake, "minimax")


def _linear_critic(w):
    return lambda x: x.flatten(1) @ w  # (B, D) @ (D,) -> (B,); grad_x = w for every x


@pytest.mark.parametrize(("norm", "want"), [(1.0, 0.0), (3.0, 4.0), (0.5, 0.25)])
def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm_minus_one_squared(norm, want):
    w = torch.randn(2 * 4 * 4, dtype=torch.float64)
    w = w / w.norm() * norm
    real, fake = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(_linear_critic(w), real, fake)
    assert gp.item() == pytest.approx(want, abs=1e-10)


def test_gradient_penalty_of_a_quadratic_critic():
    # D(x) = 0.5 ||x||^2 has grad x, so the penalty is mean_b (||x_hat_b|| - 1)^2
    def critic(x):
        return 0.5 * x.flatten(1).pow(2).sum(1)

    x = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    gp = gradient_penalty(critic, x, x.clone())  # real == fake: the interpolate is x whatever the mix
    want = sum((row.norm().item() - 1.0) ** 2 for row in x.flatten(1)) / 5
    assert gp.item() == pytest.approx(want, rel=1e-10)

    # on a line through 0: real = a u, fake = b u, ||x_hat|| = alpha a + (1 - alpha) b lies between b and a
    u = torch.randn(64, 1, 3, 3, dtype=torch.float64)
    u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    a, b = 5.0, 2.0
    gp = gradient_penalty(critic, a * u, b * u, generator=torch.Generator().manual_seed(3))
    assert (b - 1) ** 2 < gp.item() < (a - 1) ** 2
    # uniform alpha per sample: E[(alpha a + (1 - alpha) b - 1)^2] = E[(1 + 3 alpha)^2] = 1 + 3 + 3 = 7
    assert gp.item() == pytest.approx(7.0, abs=1.5)
    again = gradient_penalty(critic, a * u, b * u, generator=torch.Generator().manual_seed(3))
    other = gradient_penalty(critic, a * u, b * u, generator=torch.Generator().manual_seed(4))
    assert again.item() == gp.item() and other.item() != gp.item()


def test_gradient_penalty_trains_the_critic_through_create_graph():
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(4, 2, 2, 2, dtype=torch.float64), torch.randn(4, 2, 2, 2, dtype=torch.float64)
    gp = gradient_penalty(_linear_critic(w), real, fake)  # (||w|| - 1)^2
    gp.backward()
    with torch.no_grad():
        want = 2 * (w.norm() - 1) * w / w.norm()
    torch.testing.assert_close(w.grad, want)


def test_gradient_penalty_under_no_grad_and_shape_check():
    w = torch.randn(4)
    w = 2 * w / w.norm()
    with torch.no_grad():
        gp = gradient_penalty(_linear_critic(w), torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2))
    assert gp.item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(_linear_critic(w), torch.randn(3, 1, 2, 2), torch.randn(2, 1, 2, 2))


def test_r1_of_a_quadratic_discriminator():
    # D(x) = sum_i c_i x_i^2: grad = 2 c x, R1 = 0.5 mean_b ||2 c x_b||^2 = 2 mean_b sum_i c_i^2 x_bi^2,
    # and dR1/dc_i = 4 c_i mean_b x_bi^2 (create_graph lets the penalty train the discriminator)
    c = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    logits = (c * x.pow(2)).flatten(1).sum(1)
    r1 = r1_penalty(logits, x)
    with torch.no_grad():
        flat, cs = x.flatten(1).tolist(), c.flatten().tolist()
        want = 0.5 * sum(sum((2 * ci * xi) ** 2 for ci, xi in zip(cs, row)) for row in flat) / len(flat)
        want_grad = 4 * c * x.pow(2).mean(0, keepdim=True)
    assert r1.item() == pytest.approx(want, rel=1e-10)
    r1.backward()
    torch.testing.assert_close(c.grad, want_grad)


def test_r1_needs_images_that_require_grad():
    with pytest.raises(ValueError, match="requires_grad|require grad"):
        r1_penalty(torch.randn(3), torch.randn(3, 1, 4, 4))
