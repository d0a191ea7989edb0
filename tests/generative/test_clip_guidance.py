"""CLIP guidance with a fixed random tiny scorer: latent optimisation raises the similarity, the guidance
function is the similarity's gradient (finite differences), guided DDIM reduces to GaussianDiffusion's DDIM at
scale 0 and raises the similarity above it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvzoo.generative.clip_guidance import (
    _cutouts,
    clip_guidance_fn,
    clip_guided_ddim_sample,
    clip_guided_sample,
    clip_similarity,
)
from cvzoo.generative.diffusion import GaussianDiffusion
from cvzoo.generative.gan import DCGANGenerator
from cvzoo.types import Signature

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyScorer(nn.Module):
    """A fixed random image encoder with the CLIP scorer's duck type (encode_image, signature). Smooth (tanh)
    so finite differences are accurate; BatchNorm so that eval mode matters."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        # no biases: an odd function of the normalised image, so embeddings point anywhere (not one shared bias)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Tanh(),
                                 nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(16, dim, bias=False))
        self.signature = Signature(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), min_size=8)

    def encode_image(self, images):
        return self.net(images)


def _text(dim: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def test_clip_similarity_is_the_cosine_of_embeddings():
    scorer = TinyScorer().eval()
    images = torch.rand(3, 3, 8, 8)
    text = _text()
    with torch.no_grad():
        want = F.cosine_similarity(scorer.net((images - 0.5) / 0.25), text[None], dim=1)
    torch.testing.assert_close(clip_similarity(scorer, images, text), want)
    torch.testing.assert_close(clip_similarity(scorer, images * 2 - 1, text[None], value_range=(-1, 1)), want)
    with pytest.raises(ValueError, match="text_embedding"):
        clip_similarity(scorer, images, torch.randn(2, 8))
    with pytest.raises(ValueError, match="scorer"):
        clip_similarity(nn.Linear(2, 2), images, text)


def test_full_cutouts_are_the_image_or_its_mirror():
    images = torch.rand(2, 3, 8, 8)
    crops = _cutouts(images, 4, 8, (1.0, 1.0), torch.Generator().manual_seed(0))  # (4 * 2, 3, 8, 8)
    assert crops.shape == (8, 3, 8, 8)
    for k in range(4):
        for i in range(2):
            c = crops[k * 2 + i]
            assert torch.allclose(c, images[i], atol=1e-5) or torch.allclose(c, images[i].flip(-1), atol=1e-5)


def test_guided_latent_raises_the_similarity():
    scorer = TinyScorer().train()  # switched to eval inside, restored after
    torch.manual_seed(2)
    gen = DCGANGenerator(latent_dim=8, image_size=16, out_channels=3, base_channels=4, norm_layer=None).eval()
    for m in gen.modules():  # wider than DCGAN's N(0, 0.02): an untrained generator whose images vary with z
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.3)
    z0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    text = _text()
    start = clip_similarity(scorer, gen(z0).detach(), text, value_range=(-1, 1))

    def run():
        return clip_guided_sample(gen, z0, scorer, text, steps=40, lr=0.1, num_cutouts=4,
                                  generator=torch.Generator().manual_seed(0), return_latent=True)

    images, z = run()
    assert images.shape == (3, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    end = clip_similarity(scorer, images, text)
    assert (end > start + 0.1).all(), (start, end)
    images2, z2 = run()
    assert torch.equal(images, images2) and torch.equal(z, z2)  # deterministic given the generator
    torch.testing.assert_close(images, (gen(z).detach() + 1) / 2)
    assert not torch.equal(z, z0)
    assert z0.grad is None and all(p.grad is None for p in [*scorer.parameters(), *gen.parameters()])
    assert scorer.training and not gen.training  # modes restored
    with pytest.raises(ValueError, match="num_cutouts"):
        clip_guided_sample(gen, z0, scorer, text, num_cutouts=0)


def test_guidance_fn_is_the_scaled_similarity_gradient():
    scorer = TinyScorer().eval()
    text = _text()
    x = torch.rand(2, 3, 8, 8) * 1.6 - 0.8  # inside (-1, 1): no clamping
    fn = clip_guidance_fn(scorer, text, 3.0)
    grad = fn(x)
    assert grad.shape == x.shape
    d = torch.randn_like(x)
    h = 1e-2

    def sim(y):
        return clip_similarity(scorer, y, text, value_range=(-1, 1)).double()

    for i in range(2):  # each image's gradient is its own: a directional derivative per image
        di = torch.zeros_like(x)
        di[i] = d[i]
        fd = (sim(x + h * di) - sim(x - h * di)) / (2 * h)
        assert float((grad[i] * d[i]).sum()) / 3.0 == pytest.approx(float(fd[i]), rel=2e-2, abs=1e-5)


class TinyDenoiser(nn.Module):
    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.Tanh(), nn.Conv2d(8, 3, 3, 1, 1))

    def forward(self, x, t):
        return self.net(x) * (1 + 0.01 * t.float()[:, None, None, None])


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_ddim_at_scale_zero_is_ddim(eta):
    diffusion = GaussianDiffusion(TinyDenoiser(), image_size=8, num_timesteps=40)
    ours = clip_guided_ddim_sample(diffusion, TinyScorer().eval(), _text(), num_samples=2, num_steps=8, clip_scale=0,
                                   eta=eta, generator=torch.Generator().manual_seed(5))
    want = diffusion.sample(2, sampler="ddim", num_steps=8, eta=eta, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, want)


def test_guided_ddim_raises_the_similarity():
    diffusion = GaussianDiffusion(TinyDenoiser(), image_size=8, num_timesteps=40)
    scorer, text = TinyScorer().eval(), _text()

    def sims(scale):
        images = clip_guided_ddim_sample(diffusion, scorer, text, num_samples=4, num_steps=8, clip_scale=scale,
                                         generator=torch.Generator().manual_seed(6))
        return clip_similarity(scorer, images, text)

    plain, guided = sims(0.0), sims(20.0)
    assert (guided > plain + 0.1).all(), (plain, guided)
    with pytest.raises(ValueError, match="num_steps"):
        clip_guided_ddim_sample(diffusion, scorer, text, num_steps=41)
