import math

import pytest
import torch

from cvzoo.generative.schedules import cosine_beta_schedule, linear_beta_schedule

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("num_timesteps", [1, 10, 100, 1000])
def test_linear_matches_diffusers(num_timesteps):
    betas = linear_beta_schedule(num_timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (num_timesteps,)
    ref = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear").betas
    torch.testing.assert_close(betas.float(), ref, rtol=1e-6, atol=1e-9)


def test_linear_custom_end_points_match_diffusers():
    betas = linear_beta_schedule(50, beta_start=1e-3, beta_end=0.2)
    ref = diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=1e-3, beta_end=0.2).betas
    torch.testing.assert_close(betas.float(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("num_timesteps", [1, 10, 100, 1000])
def test_cosine_matches_diffusers_squaredcos_cap_v2(num_timesteps):
    betas = cosine_beta_schedule(num_timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (num_timesteps,)
    ref = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(betas.float(), ref, rtol=1e-6, atol=1e-9)
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    torch.testing.assert_close(betas.float(), betas_for_alpha_bar(num_timesteps, max_beta=0.999))


def test_cosine_alphas_cumprod_follow_the_closed_form():
    # below the cap, prod(1 - beta) telescopes to f(t) / f(0) with f(t) = cos((t/T + s) / (1 + s) * pi / 2)^2
    T, s = 200, 0.008
    abar = torch.cumprod(1 - cosine_beta_schedule(T, s=s), dim=0)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    capped = (cosine_beta_schedule(T, s=s) >= 0.999).nonzero()
    assert capped.numel() == 1 and capped.item() == T - 1  # only the last beta (1 - f(T)/f(T-1) -> 1) is capped
    torch.testing.assert_close(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-12)


def test_cosine_cap():
    assert cosine_beta_schedule(1000, max_beta=0.5).max().item() == 0.5
    assert cosine_beta_schedule(1000).max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_timesteps_validated(bad):
    with pytest.raises(ValueError, match="num_timesteps"):
        linear_beta_schedule(bad)
    with pytest.raises(ValueError, match="num_timesteps"):
        cosine_beta_schedule(bad)


def test_beta_ranges_validated():
    with pytest.raises(ValueError, match="beta_start"):
        linear_beta_schedule(10, beta_start=0.0)
    with pytest.raises(ValueError, match="beta_end"):
        linear_beta_schedule(10, beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="beta_end"):
        linear_beta_schedule(10, beta_end=1.0)
    with pytest.raises(ValueError, match="max_beta"):
        cosine_beta_schedule(10, max_beta=0.0)
    with pytest.raises(ValueError, match="s must"):
        cosine_beta_schedule(10, s=-0.1)
