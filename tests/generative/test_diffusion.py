import pytest
import torch
from torch import nn

from cvzoo.generative.diffusion import GaussianDiffusion
from cvzoo.generative.schedules import cosine_beta_schedule
from cvzoo.generative.unet import UNet, diffusers_unet2d

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


class Smooth(nn.Module):
    """A fixed, deterministic, nonlinear function of (x, t): a stand-in for a trained denoiser."""

    in_channels = 1

    def forward(self, x, t):
        return torch.tanh(0.8 * x + 0.01 * t.float()[:, None, None, None] - 0.2)


class Fixed(nn.Module):
    """Returns a preset output whatever the input."""

    in_channels = 1

    def __init__(self, output):
        super().__init__()
        self.register_buffer("output", output)

    def forward(self, x, t):
        return self.output.expand_as(x)


class ClassDenoiser(nn.Module):
    """Class-conditional with an output we can compute by hand; records every call."""

    in_channels, num_classes, null_class, condition_dim = 1, 3, 3, None

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, condition):
        self.calls.append((x.shape[0], condition.clone()))
        return self.expected(x, t, condition)

    @staticmethod
    def expected(x, t, labels):
        return 0.3 * x * (1 + labels.float())[:, None, None, None] + 0.002 * t.float()[:, None, None, None]


class EmbeddingDenoiser(nn.Module):
    in_channels, num_classes, null_class, condition_dim = 1, None, None, 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, condition):
        self.calls.append(condition.clone())
        return 0.1 * x + condition.sum(1)[:, None, None, None]


def ddpm_scheduler(T, schedule="linear", prediction="epsilon", **kw):
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                   prediction_type=DIFFUSERS_PREDICTION[prediction], variance_type="fixed_small",
                                   clip_sample=True, **kw)


def ddim_scheduler(T, schedule="linear", prediction="epsilon"):
    # set_alpha_to_one=True: the step after t = 0 uses alpha_bar = 1, i.e. returns the predicted x0 (DDIM's alpha_0)
    return diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                   prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=True,
                                   set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


# ------------------------------------------------------------------------------------------- forward process

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [50, 1000])
def test_q_sample_matches_diffusers_add_noise(schedule, T):
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule=schedule)
    x0, noise = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randn(6, 1, 8, 8)
    t = torch.tensor([0, 1, T // 3, T // 2, T - 2, T - 1])
    ref = ddpm_scheduler(T, schedule).add_noise(x0, noise, t)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.velocity(x0, t, noise), ddpm_scheduler(T, schedule).get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)


def test_schedule_buffers_are_float32_non_persistent_and_match_diffusers():
    T = 100
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule="cosine")
    assert d.state_dict() == {}  # derived from the constructor arguments, never saved
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod"):
        assert getattr(d, name).dtype == torch.float32 and getattr(d, name).shape == (T,)
    ref = ddpm_scheduler(T, "cosine")
    torch.testing.assert_close(d.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    variance = torch.stack([ref._get_variance(t) for t in range(1, T)])
    torch.testing.assert_close(d.posterior_variance[1:], variance, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(d.posterior_log_variance_clipped[1:], variance.log(), rtol=1e-4, atol=1e-5)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]  # log 0 clipped
    custom = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule=cosine_beta_schedule(T))
    torch.testing.assert_close(custom.betas, d.betas)


# ------------------------------------------------------------------------------------------ reverse process

@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("t", [0, 1, 23, 49])
def test_one_ddpm_step_matches_diffusers(prediction, t):
    T = 50
    output = torch.randn(2, 1, 8, 8)
    d = GaussianDiffusion(Fixed(output), image_size=8, num_timesteps=T, schedule="cosine", prediction=prediction)
    x_t = torch.randn(2, 1, 8, 8) * 1.5
    ours = d.ddpm_step(x_t, t, generator=torch.Generator().manual_seed(7))
    ref = ddpm_scheduler(T, "cosine", prediction).step(output, t, x_t, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-5, atol=1e-5)
    x0, _ = d.predict_start_and_noise(x_t, t)
    torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)


def _diffusers_loop(scheduler, denoiser, num_steps, generator, **step_kw):
    x = torch.randn(3, 1, 8, 8, generator=generator)
    states = [x]
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        out = denoiser(x, t.expand(3))
        x = scheduler.step(out, t, x, generator=generator, **step_kw).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("num_steps", [None, 7])
def test_ddpm_sampling_loop_matches_diffusers(num_steps):
    T = 50
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule="linear")
    images, traj = d.sample(3, num_steps=num_steps, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    ref = _diffusers_loop(ddpm_scheduler(T), Smooth(), num_steps or T, torch.Generator().manual_seed(3))
    assert traj.shape == ((num_steps or T) + 1, 3, 1, 8, 8)
    torch.testing.assert_close(traj * 2 - 1, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images, ((ref[-1] + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sampling_matches_diffusers(prediction, eta):
    # correspondence: DDIMScheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    # clip_sample=True) stepped with use_clipped_model_output=True (eps re-derived from the clipped x0)
    T, steps = 100, 10
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule="cosine", prediction=prediction)
    _, traj = d.sample(3, sampler="ddim", num_steps=steps, eta=eta, generator=torch.Generator().manual_seed(5),
                       return_trajectory=True)
    ref = _diffusers_loop(ddim_scheduler(T, "cosine", prediction), Smooth(), steps,
                          torch.Generator().manual_seed(5), eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(traj * 2 - 1, ref, rtol=1e-5, atol=1e-5)


def test_sampling_through_a_diffusers_scheduler_equals_the_own_loop():
    T = 50
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule="cosine")
    own = d.sample(3, num_steps=10, generator=torch.Generator().manual_seed(1))
    via = d.sample(3, num_steps=10, generator=torch.Generator().manual_seed(1), scheduler=ddpm_scheduler(T, "cosine"))
    torch.testing.assert_close(via, own, rtol=1e-4, atol=1e-4)
    dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    images = d.sample(3, num_steps=5, scheduler=dpm)
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


# ------------------------------------------------------------------------------ predictions and guidance

@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_output_conversion_closed_form(prediction):
    T = 100
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=T, schedule="cosine", prediction=prediction)
    x0, eps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 60, 90])  # near T, abar -> 0 and x0 from eps is ill-conditioned in float32
    x_t = d.q_sample(x0, t, eps)
    abar = d.alphas_cumprod[t].double()[:, None, None, None]
    v = abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()  # Salimans & Ho's v, by hand
    output = {"epsilon": eps, "x0": x0, "v": v.float()}[prediction]
    got_x0, got_eps = d.output_to_start_and_noise(output, x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=2e-4)


def test_clipping_rederives_noise():
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=50)
    t = torch.tensor([30, 30])
    x_t, out = torch.randn(2, 1, 8, 8) * 3, torch.randn(2, 1, 8, 8)
    x0, eps = d.output_to_start_and_noise(out, x_t, t, clip_denoised=True)
    assert x0.abs().max() <= 1
    a, s = d.sqrt_alphas_cumprod[30], d.sqrt_one_minus_alphas_cumprod[30]
    torch.testing.assert_close(a * x0 + s * eps, x_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.0, 3.5])
def test_classifier_free_guidance_by_hand(scale):
    den = ClassDenoiser()
    d = GaussianDiffusion(den, image_size=8, num_timesteps=50, schedule="cosine", clip_denoised=False)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([5, 40]), torch.tensor([0, 2])
    cond = ClassDenoiser.expected(x, t, labels)
    uncond = ClassDenoiser.expected(x, t, torch.tensor([3, 3]))
    expected = cond if scale == 1.0 else uncond + scale * (cond - uncond)
    x0, eps = d.predict_start_and_noise(x, t, labels, guidance_scale=scale)
    torch.testing.assert_close(eps, expected)
    abar = d.alphas_cumprod[t][:, None, None, None]
    torch.testing.assert_close(x0, (x - (1 - abar).sqrt() * expected) / abar.sqrt(), rtol=1e-5, atol=1e-5)
    # guidance runs the doubled batch (cond, null) in one denoiser call
    assert [n for n, _ in den.calls] == ([2] if scale == 1.0 else [4])
    if scale != 1.0:
        assert den.calls[0][1].tolist() == [0, 2, 3, 3]


def test_guided_sampling_with_labels_and_embeddings():
    den = ClassDenoiser()
    d = GaussianDiffusion(den, image_size=8, num_timesteps=20)
    images = d.sample(2, labels=torch.tensor([1, 2]), guidance_scale=2.0, sampler="ddim", num_steps=4)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert all(n == 4 and c.tolist() == [1, 2, 3, 3] for n, c in den.calls)
    emb = EmbeddingDenoiser()
    d = GaussianDiffusion(emb, image_size=8, num_timesteps=20)
    cond = torch.randn(2, 4)
    d.sample(2, condition=cond, guidance_scale=2.0, num_steps=3)
    assert all(torch.equal(c, torch.cat([cond, torch.zeros(2, 4)])) for c in emb.calls)
    emb.calls.clear()
    d.sample(2, num_steps=2)  # no condition: the null (zero) condition, no doubling
    assert all(torch.equal(c, torch.zeros(2, 4)) for c in emb.calls)


# -------------------------------------------------------------------------------------------------- training

def test_condition_dropout_fraction():
    den = ClassDenoiser()
    d = GaussianDiffusion(den, image_size=8, num_timesteps=50, cond_drop_prob=0.3)
    n = 4000
    labels = torch.randint(0, 3, (n,))
    d.loss(torch.zeros(n, 1, 8, 8), labels)
    seen = den.calls[-1][1]
    dropped = seen == 3
    frac = dropped.float().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert torch.equal(seen[~dropped], labels[~dropped])  # the rest are kept as given
    d.loss(torch.zeros(8, 1, 8, 8))  # no targets: train unconditionally, all null
    assert den.calls[-1][1].tolist() == [3] * 8
    d.cond_drop_prob = 0.0
    d.loss(torch.zeros(8, 1, 8, 8), labels[:8])
    assert torch.equal(den.calls[-1][1], labels[:8])

    emb = EmbeddingDenoiser()
    d = GaussianDiffusion(emb, image_size=8, num_timesteps=50, cond_drop_prob=0.25)
    cond = torch.randn(n, 4) + 5
    d.loss(torch.zeros(n, 1, 8, 8), cond)
    zero = (emb.calls[-1] == 0).all(1)
    assert abs(zero.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    assert torch.equal(emb.calls[-1][~zero], cond[~zero])


@pytest.mark.parametrize(("prediction", "loss_type"), [("epsilon", "mse"), ("x0", "l1"), ("v", "mse")])
def test_loss_target_closed_form(prediction, loss_type):
    output = torch.randn(1, 1, 8, 8)
    d = GaussianDiffusion(Fixed(output), image_size=8, num_timesteps=50, prediction=prediction, loss_type=loss_type)
    x0, noise, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8), torch.tensor([0, 20, 49])
    target = {"epsilon": noise, "x0": x0,
              "v": ddpm_scheduler(50, prediction="v").get_velocity(x0, noise, t)}[prediction]
    diff = output - target
    expected = diff.square().mean() if loss_type == "mse" else diff.abs().mean()
    torch.testing.assert_close(d.p_losses(x0, t, noise=noise), expected, rtol=1e-5, atol=1e-6)


def test_unconditional_loss_ignores_targets():
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=50)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    a = d.loss(x)["loss"]
    torch.manual_seed(3)
    b = d.loss(x, torch.tensor([0, 1, 2, 3]))["loss"]
    assert a.ndim == 0 and torch.equal(a, b)


def test_loss_compiles_fullgraph_for_a_class_conditional_unet():
    unet = UNet(base_channels=8, channel_mults=(1, 2), norm_groups=4, num_classes=3)
    d = GaussianDiffusion(unet, image_size=8, num_timesteps=50, schedule="cosine", cond_drop_prob=0.5)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 1])
    compiled = torch.compile(d.loss, backend="eager", fullgraph=True)
    torch.manual_seed(11)
    got = compiled(x, y)["loss"]
    torch.manual_seed(11)
    expected = d.loss(x, y)["loss"]
    torch.testing.assert_close(got, expected)
    got.backward()


def test_diffusers_unet_trains_and_samples_with_a_scheduler():
    den = diffusers_unet2d(8, 1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    d = GaussianDiffusion(den, image_size=8, num_timesteps=50, schedule="cosine", prediction="v")
    assert d.num_classes == 3 and d.null_class == 3
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in d.parameters()]
    loss = d.loss(torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0]))["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, d.parameters()))
    sched = diffusers.DDIMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction")
    d.eval()
    images = d.sample(2, labels=torch.tensor([0, 2]), guidance_scale=2.0, scheduler=sched, num_steps=3,
                      generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_tiny_unet_training_reduces_the_loss():
    torch.manual_seed(0)
    unet = UNet(base_channels=8, channel_mults=(1, 2), norm_groups=4)
    d = GaussianDiffusion(unet, image_size=8, num_timesteps=100, schedule="cosine")
    # a small data set of bars: a structure the denoiser can learn quickly
    data = -torch.ones(16, 1, 8, 8)
    for i in range(8):
        data[i, 0, :, i] = 1.0  # vertical bars
        data[8 + i, 0, i, :] = 1.0  # horizontal bars
    t_eval, noise_eval = torch.randint(0, 100, (16,)), torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = d.p_losses(data, t_eval, noise=noise_eval).item()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(30):
        loss = d.loss(data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = d.p_losses(data, t_eval, noise=noise_eval).item()
    assert after < 0.7 * before


# ------------------------------------------------------------------------------------------------ validation

def test_validation_errors():
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=50)
    with pytest.raises(ValueError, match="guidance_scale"):
        d.sample(1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(1, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(1, num_steps=51)
    with pytest.raises(ValueError, match="num_samples"):
        d.sample(0)
    with pytest.raises(ValueError, match="labels given"):
        d.sample(1, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="eta"):
        d.sample(1, eta=0.5)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(1, sampler="euler")
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 50\)"):
        d.q_sample(x, torch.tensor([0, 50]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 50\)"):
        d.p_losses(x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        d.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="image_size"):
        d.loss(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        d.loss(torch.zeros(2, 3, 8, 8))

    c = GaussianDiffusion(ClassDenoiser(), image_size=8, num_timesteps=50)
    with pytest.raises(ValueError, match=r"labels must be a \(2,\) integer"):
        c.sample(2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        c.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="guidance_scale"):
        c.sample(2, guidance_scale=3.0)  # nothing to guide towards
    with pytest.raises(ValueError, match="condition given"):
        c.sample(2, condition=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        c.loss(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]))
    e = GaussianDiffusion(EmbeddingDenoiser(), image_size=8, num_timesteps=50)
    with pytest.raises(ValueError, match="condition_dim=4, not class labels"):
        e.loss(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))


def test_scheduler_validation():
    d = GaussianDiffusion(Smooth(), image_size=8, num_timesteps=50, schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        d.sample(1, scheduler=ddim_scheduler(50, "cosine", "v"))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        d.sample(1, scheduler=ddim_scheduler(100, "cosine"))
    with pytest.raises(ValueError, match="betas differ"):
        d.sample(1, scheduler=ddim_scheduler(50, "linear"))
    with pytest.raises(ValueError, match="takes no eta"):
        d.sample(1, scheduler=ddpm_scheduler(50, "cosine"), eta=0.5)


def test_constructor_validation():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(Smooth(), image_size=8, schedule="quadratic")
    with pytest.raises(ValueError, match="num_timesteps=10 betas"):
        GaussianDiffusion(Smooth(), image_size=8, num_timesteps=10, schedule=torch.full((9,), 0.1))
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(Smooth(), image_size=8, prediction="score")
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(Smooth(), image_size=8, loss_type="huber")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        GaussianDiffusion(Smooth(), image_size=8, cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="size_divisor=4"):
        GaussianDiffusion(UNet(base_channels=8, channel_mults=(1, 1, 1), norm_groups=4), image_size=6)
    with pytest.raises(ValueError, match="in_channels"):
        GaussianDiffusion(nn.Identity(), image_size=8)


def test_contract_attributes_and_signature():
    unet = UNet(in_channels=3, base_channels=8, channel_mults=(1, 2), norm_groups=4, num_classes=10)
    d = GaussianDiffusion(unet, image_size=8, num_timesteps=20)
    assert (d.image_size, d.in_channels, d.num_classes, d.null_class) == (8, 3, 10, 10)
    assert d.signature.mean == (0.5,) * 3 and d.signature.std == (0.5,) * 3
    torch.testing.assert_close(d.signature.normalize(torch.ones(1, 3, 1, 1)), torch.ones(1, 3, 1, 1))
    out = d.sample(2, labels=torch.tensor([3, 9]), num_steps=2, generator=torch.Generator().manual_seed(0))
    again = d.sample(2, labels=torch.tensor([3, 9]), num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and torch.equal(out, again)
