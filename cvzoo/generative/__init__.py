"""Generative models: autoencoders (AE, VAE, VQ-VAE), DCGAN and conditional GANs, Gaussian diffusion (DDPM /
DDIM, classifier-free guidance, diffusers interop), noise-conditional score networks, sample grids and sample
quality metrics. Every task model follows the contract of ../shared/DESIGN.md: `loss(images, targets)` for the
trainer (a GAN trains through the trainer's optimisation phases), `sample(n, ...)` returning images in [0, 1].
"""

from cvzoo.generative.autoencoders import VAE, VQVAE, AutoEncoder, ConvDecoder, ConvEncoder, VAEOutput, VQVAEOutput
from cvzoo.generative.baselines import PixelGaussian
from cvzoo.generative.diffusion import GaussianDiffusion
from cvzoo.generative.evaluate import ClassifierFeatures, class_agreement, frechet_distance
from cvzoo.generative.gan import GAN, DCGANDiscriminator, DCGANGenerator, dcgan_init_
from cvzoo.generative.gan_losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from cvzoo.generative.grid import make_grid, save_grid
from cvzoo.generative.quantizer import VectorQuantizer, VQOutput
from cvzoo.generative.schedules import cosine_beta_schedule, linear_beta_schedule
from cvzoo.generative.score import NCSN, ScoreNetwork, geometric_sigmas
from cvzoo.generative.unet import DiffusersUNet, UNet, diffusers_unet2d, sinusoidal_embedding

__all__ = [
    "GAN",
    "NCSN",
    "VAE",
    "VQVAE",
    "AutoEncoder",
    "ClassifierFeatures",
    "ConvDecoder",
    "ConvEncoder",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DiffusersUNet",
    "GaussianDiffusion",
    "PixelGaussian",
    "ScoreNetwork",
    "UNet",
    "VAEOutput",
    "VQOutput",
    "VQVAEOutput",
    "VectorQuantizer",
    "class_agreement",
    "cosine_beta_schedule",
    "dcgan_init_",
    "diffusers_unet2d",
    "discriminator_loss",
    "frechet_distance",
    "generator_loss",
    "geometric_sigmas",
    "gradient_penalty",
    "linear_beta_schedule",
    "make_grid",
    "r1_penalty",
    "save_grid",
    "sinusoidal_embedding",
]
