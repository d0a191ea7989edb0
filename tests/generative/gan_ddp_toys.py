"""The GAN and data of the DDP test, shared by the worker processes and the single-process reference."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from cvzoo.generative import GAN, DCGANDiscriminator, DCGANGenerator

STEPS = 3
BATCH = 4  # per rank


def make_gan() -> GAN:
    """No BatchNorm: samples do not interact, so per-rank losses average to the combined batch's."""
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, image_size=8, out_channels=1, base_channels=8, num_classes=2,
                               norm_layer=None)
    discriminator = DCGANDiscriminator(image_size=8, in_channels=1, base_channels=8, num_classes=2, norm_layer=None)
    return GAN(generator, discriminator)


def gan_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = 2 * BATCH * STEPS  # one epoch of STEPS steps on 2 ranks
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(n) % 2
    return TensorDataset(images, labels)


def gan_loader() -> DataLoader:
    return DataLoader(gan_data(), batch_size=BATCH, shuffle=False)
