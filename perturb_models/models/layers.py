"""Building blocks shared by the encoders."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Pre-norm residual feed-forward block: ``x + Dropout(W2 GELU(W1 LayerNorm(x)))``."""

    def __init__(self, dim: int, dropout: float = 0.1, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, expansion * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * dim, dim),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.ff(self.norm(x)))


class PairMLP(nn.Module):
    """Maps the concatenated (perturbation, gene) features to a pair representation of ``hidden_dim``."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, num_blocks: int = 2, dropout: float = 0.1):
        super().__init__()
        self.input = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_dim, dropout) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.output_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.input(x)))
