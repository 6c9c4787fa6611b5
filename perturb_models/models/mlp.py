"""PerturbQA's MLP baseline: one learned embedding per gene, shared by both roles, and a residual MLP."""

from __future__ import annotations

import torch
from torch import nn

from perturb_models.data.datamodule import DataContext
from perturb_models.models.base import Encoder
from perturb_models.models.layers import PairMLP


class MLPEncoder(Encoder):
    """``[E[pert], E[gene]]`` -> residual LayerNorm/GELU blocks -> pair representation.

    The embedding table is shared by the perturbation and the downstream-gene roles, so an unseen
    perturbation still has an embedding when its gene was trained in the downstream role.
    """

    new_perturbation_refusal = (
        "its gene vectors are embeddings learned from the training pairs only; a gene "
        "outside the training vocabulary has no vector, and no knowledge file can give it one"
    )

    def __init__(
        self,
        context: DataContext,
        embedding_dim: int = 128,
        hidden_dim: int = 256,
        num_blocks: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embedding = nn.Embedding(context.num_genes, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.pair = PairMLP(2 * embedding_dim, hidden_dim, num_blocks, dropout)
        self.output_dim = hidden_dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = torch.cat([self.embedding(batch["pert"]), self.embedding(batch["gene"])], dim=-1)
        return self.pair(features)
