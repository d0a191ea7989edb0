import math

import pytest
import torch
from torch import Tensor, nn

from cvzoo.generative.score import NCSN, ScoreNetwork, geometric_sigmas


class LinearScore(nn.Module):
    """s(x, sigma) = A flatten(x) / sigma**sigma_power: a score function with a known Jacobian."""

    def __init__(self, matrix: Tensor, in_channels: int = 1, sigma_power: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.in_channels = in_channels
        self.sigma_power = sigma_power

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = (x.flatten(1) @ self.matrix.T).view_as(x)
        return out / sigma.view(-1, 1, 1, 1) ** self.sigma_power


class GaussianScore(nn.Module):
    """Exact score of N(mu, s^2) data perturbed by N(0, sigma^2): -(x - mu) / (s^2 + sigma^2), per pixel."""

    in_channels = 1

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -(x - self.mu) / (self.s**2 + sigma.view(-1, 1, 1, 1) ** 2)


class PerLevelLinear(nn.Module):
    """A learnable linear score per noise level: s(x, sigma_i) = a_i x + b_i."""

    in_channels = 1

    def __init__(self, sigmas: Tensor) -> None:
        super().__init__()
        self.register_buffer("sigmas", sigmas)
        self.a = nn.Parameter(torch.zeros(len(sigmas), dtype=sigmas.dtype))
        self.b = nn.Parameter(torch.zeros(len(sigmas), dtype=sigmas.dtype))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        idx = (sigma[:, None] - self.sigmas[None]).abs().argmin(dim=1)
        return self.a[idx].view(-1, 1, 1, 1) * x + self.b[idx].view(-1, 1, 1, 1)


def tiny_network() -> ScoreNetwork:
    return ScoreNetwork(in_channels=1, base_channels=4, channel_mults=(1, 2), norm_groups=2)


def test_geometric_sigmas_closed_form():
    sigmas = geometric_sigmas(2.0, 0.02, 5)
    expected = [2.0 * 0.01 ** (i / 4) for i in range(5)]
    assert sigmas.dtype == torch.get_default_dtype()
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=1e-6, atol=0)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full((4,), 0.01 ** 0.25), rtol=1e-6, atol=0)
    default = geometric_sigmas()
    assert default.shape == (10,) and default[0] == pytest.approx(1.0) and default[-1] == pytest.approx(0.01)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sigma_min=0.0), "sigma_min"), (dict(sigma_min=-1.0), "sigma_min"),
    (dict(sigma_max=0.01, sigma_min=0.01), "sigma_max"), (dict(sigma_max=0.005), "sigma_max"),
    (dict(num_levels=1), "num_levels"), (dict(num_levels=2.0), "num_levels"),
])
def test_geometric_sigmas_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        geometric_sigmas(**kwargs)


def test_score_network_shapes_scaling_and_gradients():
    net = tiny_network()
    x, sigma = torch.randn(3, 1, 7, 7), torch.tensor([1.0, 0.1, 0.01])  # odd size: interpolate(size=...)
    captured = []
    handle = net.head.register_forward_hook(lambda mod, inp, out: captured.append(out))  # append returns None
    score = net(x, sigma)
    handle.remove()
    assert score.shape == x.shape
    torch.testing.assert_close(score, captured[0] / sigma.view(-1, 1, 1, 1))  # NCSNv2: net(x, sigma) / sigma
    # the noise level conditions the output beyond the 1/sigma scaling
    assert not torch.allclose(net(x, torch.full((3,), 0.5)) * 0.5, net(x, torch.full((3,), 0.05)) * 0.05)
    score.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="norm_groups"):
        ScoreNetwork(base_channels=6, norm_groups=4)
    with pytest.raises(ValueError, match="channel_mults"):
        ScoreNetwork(channel_mults=())


def test_denoising_loss_matches_hand_computation():
    gen = torch.Generator().manual_seed(1)
    d = 4  # 1 x 2 x 2 images
    matrix = torch.randn(d, d, generator=gen)
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    model = NCSN(LinearScore(matrix, sigma_power=1.0), image_size=2, sigmas=sigmas, anneal_power=1.5)
    images = torch.rand(3, 1, 2, 2, generator=gen) * 2 - 1
    noise = torch.randn(3, 1, 2, 2, generator=gen)
    level_idx = torch.tensor([2, 0, 1])
    got = model._loss_terms(images, noise, level_idx)["loss"]
    total = 0.0
    for b in range(3):
        sigma = sigmas[level_idx[b]].item()
        x, z = images[b].flatten().double(), noise[b].flatten().double()
        x_tilde = x + sigma * z
        score = matrix.double() @ x_tilde / sigma
        target = -(x_tilde - x) / sigma**2
        total += sigma**1.5 * 0.5 * ((score - target) ** 2).sum().item()
    assert got.item() == pytest.approx(total / 3, rel=1e-5)


def test_sliced_loss_matches_hand_computation_with_injected_projections():
    gen = torch.Generator().manual_seed(2)
    d = 4
    matrix = torch.randn(d, d, generator=gen)
    sigmas = torch.tensor([0.8, 0.2])
    model = NCSN(LinearScore(matrix), image_size=2, sigmas=sigmas, objective="sliced", num_projections=3)
    images = torch.rand(2, 1, 2, 2, generator=gen) * 2 - 1
    noise = torch.randn(2, 1, 2, 2, generator=gen)
    level_idx = torch.tensor([1, 0])
    v = torch.randn(3, 2, 1, 2, 2, generator=gen)
    got = model._loss_terms(images, noise, level_idx, v)["loss"]
    a = matrix.double()
    values = []
    for m in range(3):
        for b in range(2):
            sigma = sigmas[level_idx[b]].item()
            x_tilde = (images[b] + sigma * noise[b]).flatten().double()
            vb = v[m, b].flatten().double()
            # d(Ax)/dx = A: v^T A v + 0.5 (v^T A x~)^2
            values.append(sigma**2 * (vb @ a @ vb + 0.5 * (vb @ (a @ x_tilde)) ** 2).item())
    assert got.item() == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_sliced_loss_expectation_is_trace_plus_half_squared_norm():
    gen = torch.Generator().manual_seed(3)
    d, num_projections = 4, 4000
    matrix = 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    sigmas = torch.tensor([0.5, 0.25], dtype=torch.float64)
    model = NCSN(LinearScore(matrix), image_size=2, sigmas=sigmas, objective="sliced",
                 num_projections=num_projections, projection="gaussian")
    images = torch.rand(2, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 1, 2, 2, generator=gen, dtype=torch.float64)
    level_idx = torch.tensor([0, 1])
    torch.manual_seed(4)
    terms = model._loss_terms(images, noise, level_idx)  # projections drawn inside: Gaussian
    expected, variance = 0.0, 0.0
    sym = 0.5 * (matrix + matrix.T)
    for b in range(2):
        sigma = sigmas[level_idx[b]].item()
        ax = matrix @ (images[b] + sigma * noise[b]).flatten()
        expected += sigma**2 * (torch.trace(matrix) + 0.5 * ax @ ax).item() / 2
        # v^T M v with M = sym(A) + 0.5 (Ax)(Ax)^T, v ~ N(0, I): mean tr(M), variance 2 ||M||_F^2
        quad = sym + 0.5 * torch.outer(ax, ax)
        variance += sigma**4 * 2 * (quad**2).sum().item() / 4
    std_error = math.sqrt(variance / num_projections)
    assert abs(terms["loss"].item() - expected) < 5 * std_error


@pytest.mark.parametrize("objective", ["denoising", "sliced"])
def test_minimiser_is_the_score_of_the_perturbed_gaussian(objective):
    gen = torch.Generator().manual_seed(5)
    mu, s, n = 0.4, 0.5, 60000
    # DSM's target -z / sigma is noisy at small sigma (estimator variance ~ 1 / sigma^2): moderate levels
    sigmas = torch.tensor([1.0, 0.4, 0.2], dtype=torch.float64)
    net = PerLevelLinear(sigmas)
    model = NCSN(net, image_size=1, sigmas=sigmas, objective=objective)
    images = mu + s * torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    level_idx = torch.arange(n) % 3
    v = (torch.randint(0, 2, (1, n, 1, 1, 1), generator=gen) * 2 - 1).double()
    opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = model._loss_terms(images, noise, level_idx, v)["loss"]
        loss.backward()
        return loss

    opt.step(closure)
    var = s**2 + sigmas**2  # the perturbed data is N(mu, s^2 + sigma^2): score -(x - mu) / var
    a, b = -1 / var, mu / var
    n_level = n / 3
    # tolerances: 5 standard errors of each estimator around the population minimiser
    if objective == "denoising":
        # least squares of the target -z / sigma on x~; residual variance Var(z / sigma | x~) = s^2 / (sigma^2 var)
        resid = s**2 / (sigmas**2 * var)
        se_a = (resid / (n_level * var)).sqrt()
        se_b = (resid * (1 + mu**2 / var) / n_level).sqrt()
    else:
        # score matching in 1-D: a = -1 / empirical variance, b = -a * empirical mean
        se_a = a.abs() * math.sqrt(2 / n_level)
        se_b = (mu**2 * se_a**2 + a**2 * var / n_level).sqrt()
    assert ((net.a.detach() - a).abs() < 5 * se_a).all(), (net.a, a, se_a)
    assert ((net.b.detach() - b).abs() < 5 * se_b).all(), (net.b, b, se_b)
    # and the tolerances are tight enough to tell the levels' scores apart
    assert (5 * se_a < 0.15 * a.abs()).all()


def langevin_moments(mu, s, sigmas, steps, step_lr, denoise, mean=0.0, var=1.0 / 3.0):
    """Exact mean and variance of Algorithm 1 for Gaussian data: each step is a linear-Gaussian map.
    The default start is uniform in [-1, 1]."""
    for sigma in sigmas:
        alpha = step_lr * sigma**2 / sigmas[-1] ** 2
        c = 1 - alpha / (2 * (s**2 + sigma**2))
        for _ in range(steps):
            mean, var = c * mean + (1 - c) * mu, c**2 * var + alpha
    if denoise:  # x + sigma_L^2 * score: x -> mu + (x - mu) * (1 - sigma_L^2 / var_L)
        k = 1 - sigmas[-1] ** 2 / (s**2 + sigmas[-1] ** 2)
        mean, var = mu + k * (mean - mu), k**2 * var
    return mean, var


@pytest.mark.parametrize("denoise", [False, True])
def test_annealed_langevin_on_gaussian_matches_moments(denoise):
    mu, s = 0.2, 0.1
    sigmas = geometric_sigmas(1.0, 0.1, 5)
    model = NCSN(GaussianScore(mu, s), image_size=2, sigmas=sigmas)
    gen = torch.Generator().manual_seed(6)
    steps, step_lr = 100, 2e-3
    images = model.sample(2000, generator=gen, steps_per_level=steps, step_lr=step_lr, denoise=denoise)
    assert images.shape == (2000, 1, 2, 2) and images.min() >= 0 and images.max() <= 1
    x = images.double() * 2 - 1  # back to the normalised space
    n = x.numel()
    mean, var = langevin_moments(mu, s, sigmas.tolist(), steps, step_lr, denoise)
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert x.std().item() == pytest.approx(math.sqrt(var), rel=5 * math.sqrt(1 / (2 * n)))
    # and close to the ideal: N(mu, s^2 + sigma_L^2), or after Tweedie's step, std s^2 / sqrt(s^2 + sigma_L^2)
    ideal_var = s**2 + 0.1**2
    ideal_std = s**2 / math.sqrt(ideal_var) if denoise else math.sqrt(ideal_var)
    # (the chain's stationary variance is var / (1 - alpha_L / (4 var)): ~1.3% above the ideal std here)
    assert x.mean().item() == pytest.approx(mu, abs=5 * math.sqrt(var / n))
    assert x.std().item() == pytest.approx(ideal_std, rel=0.02 + 5 * math.sqrt(1 / (2 * n)))


def test_annealed_langevin_before_mixing_follows_the_step_size_schedule():
    # few steps per level: the final moments depend on every level's alpha_i = step_lr * sigma_i^2 / sigma_L^2
    mu, s, steps, step_lr = 0.2, 0.1, 3, 1e-3
    sigmas = geometric_sigmas(0.5, 0.05, 4)
    model = NCSN(GaussianScore(mu, s), image_size=2, sigmas=sigmas)
    init = torch.zeros(2000, 1, 2, 2)
    x = model.sample(2000, generator=torch.Generator().manual_seed(8), steps_per_level=steps, step_lr=step_lr,
                     denoise=False, init=init).double() * 2 - 1
    n = x.numel()
    mean, var = langevin_moments(mu, s, sigmas.tolist(), steps, step_lr, False, mean=0.0, var=0.0)
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert x.std().item() == pytest.approx(math.sqrt(var), rel=5 * math.sqrt(1 / (2 * n)))


def test_sample_reproducible_init_and_trajectory():
    model = NCSN(GaussianScore(0.0, 0.5), image_size=2, sigmas=torch.tensor([1.0, 0.5]))
    a = model.sample(4, generator=torch.Generator().manual_seed(0), steps_per_level=3)
    b = model.sample(4, generator=torch.Generator().manual_seed(0), steps_per_level=3)
    torch.testing.assert_close(a, b)
    init = torch.full((4, 1, 2, 2), 0.8)
    out, traj = model.sample(4, steps_per_level=1, step_lr=1e-12, denoise=False, init=init, return_trajectory=True)
    assert traj.shape == (2, 4, 1, 2, 2)
    torch.testing.assert_close(out, torch.full_like(out, 0.9))  # (0.8 + 1) / 2, tiny steps leave init in place
    torch.testing.assert_close(traj[-1], out)


def test_loss_compiles_fullgraph():
    model = NCSN(tiny_network(), image_size=8, sigmas=geometric_sigmas(1.0, 0.01, 4))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    loss = torch.compile(model.loss, backend="eager", fullgraph=True)(images)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("objective", ["denoising", "sliced"])
def test_both_objectives_give_finite_loss_and_gradients(objective):
    net = tiny_network()
    model = NCSN(net, image_size=8, objective=objective, num_projections=2)
    loss = model.loss(torch.rand(3, 1, 8, 8) * 2 - 1, torch.zeros(3, dtype=torch.long))["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0


def test_tiny_ncsn_training_reduces_denoising_loss():
    gen = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centres = torch.randint(2, 6, (16, 2), generator=gen).float()
    blobs = torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / 3)
    images = (blobs * 2 - 1).unsqueeze(1)  # (16, 1, 8, 8) in [-1, 1]
    model = NCSN(tiny_network(), image_size=8, sigmas=geometric_sigmas(1.0, 0.05, 4))
    noise = torch.randn(images.shape, generator=gen)
    level_idx = torch.arange(16) % 4
    with torch.no_grad():
        before = model._loss_terms(images, noise, level_idx)["loss"].item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        model.loss(images)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = model._loss_terms(images, noise, level_idx)["loss"].item()
    assert after < 0.8 * before


def test_validation_errors():
    net = tiny_network()
    model = NCSN(net, image_size=8)
    assert model.num_classes is None and model.in_channels == 1 and model.image_size == 8
    assert model.signature.mean == (0.5,) and model.signature.std == (0.5,)
    torch.testing.assert_close(model.sigmas, geometric_sigmas(1.0, 0.01, 10))
    with pytest.raises(ValueError, match="image_size"):
        model.loss(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        model.loss(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(0)
    with pytest.raises(ValueError, match="steps_per_level"):
        model.sample(1, steps_per_level=0)
    with pytest.raises(ValueError, match="step_lr"):
        model.sample(1, step_lr=0.0)
    with pytest.raises(ValueError, match="labels"):
        model.sample(1, labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="init"):
        model.sample(2, init=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="sigmas"):
        NCSN(net, image_size=8, sigmas=torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        NCSN(net, image_size=8, sigmas=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="objective"):
        NCSN(net, image_size=8, objective="ism")
    with pytest.raises(ValueError, match="num_projections"):
        NCSN(net, image_size=8, num_projections=0)
    with pytest.raises(ValueError, match="image_size"):
        NCSN(net, image_size=0)
    with pytest.raises(ValueError, match="score_network"):
        NCSN(nn.Identity(), image_size=8)
