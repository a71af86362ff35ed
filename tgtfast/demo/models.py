"""The demo's networks: flat ``nn.Sequential`` MLPs (labeler and students) and the teacher's small VAE."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from tgtfast.demo.config import NUM_PIXELS


def mlp(sizes: Sequence[int], out_activation: Optional[nn.Module] = None) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` (plus ``out_activation``) as a flat ``nn.Sequential``."""
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class TeacherVAE(nn.Module):
    """A small VAE on 64-pixel images in ``[0, 1]``.

    ``encoder`` (``64 -> hidden -> latent``) gives the posterior mean, ``decoder`` (``latent -> hidden -> 64``,
    sigmoid) the image; both are flat ``nn.Sequential`` MLPs. ``logvar`` reads the encoder's hidden layer.
    """

    def __init__(self, hidden: int = 128, latent: int = 10) -> None:
        super().__init__()
        self.encoder = mlp([NUM_PIXELS, hidden, latent])
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = mlp([latent, hidden, NUM_PIXELS], nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder[1](self.encoder[0](x))
        return self.encoder[2](h), self.logvar(h)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per image (Bernoulli likelihood on pixel intensities)."""
        recon, mu, logvar = self(x)
        rec = nn.functional.binary_cross_entropy(recon, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) / x.shape[0]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())
