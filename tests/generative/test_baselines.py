import pytest
import torch

from cvzoo.generative.baselines import PixelGaussian


def test_loss_is_the_gaussian_negative_log_likelihood_per_pixel():
    model = PixelGaussian(image_size=4, in_channels=1, num_classes=3)
    with torch.no_grad():
        model.mean.normal_()
        model.log_std.uniform_(-1, 0.5)
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    expected = -torch.distributions.Normal(model.mean[labels], model.log_std[labels].exp()).log_prob(images).mean()
    torch.testing.assert_close(model.loss(images, labels)["loss"], expected)


def test_the_sample_mean_and_std_minimise_the_loss_and_samples_follow_them():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(400, 1, 3, 3, generator=g) * 0.2 + torch.linspace(-0.5, 0.5, 9).view(1, 1, 3, 3))
    model = PixelGaussian(image_size=3)
    with torch.no_grad():
        model.mean.copy_(data.mean(0, keepdim=True))
        model.log_std.copy_(data.std(0, unbiased=False, keepdim=True).log())
    best = model.loss(data)["loss"]
    for param in (model.mean, model.log_std):
        with torch.no_grad():
            param.add_(0.05)
        assert model.loss(data)["loss"] > best
        with torch.no_grad():
            param.sub_(0.05)
    samples = model.sample(4000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(samples.mean(0), data.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(0), data.std(0), atol=0.02, rtol=0)


def test_validation():
    cond = PixelGaussian(image_size=4, num_classes=2)
    with pytest.raises(ValueError, match="do not match the model's image_size=4"):
        cond.loss(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets \\(class labels\\) are required"):
        cond.loss(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="labels are required"):
        cond.sample(2)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\)"):
        cond.sample(2, labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels must be a \\(3,\\) integer tensor"):
        cond.sample(3, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        cond.sample(0, labels=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="labels were given to an unconditional model"):
        PixelGaussian(image_size=4).sample(1, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 0"):
        PixelGaussian(image_size=0)
