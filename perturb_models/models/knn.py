"""The retrieval baseline ("Retrieval, no LLM" in PerturbQA): a similarity-weighted vote of training labels.

For a pair (p, g): the training perturbations p' most similar to p in the chosen graph vote with the
label of (p', g), weighted by their similarity, and the vote is shrunk toward g's training class rates:

    P(c | p, g) = (sum_p' w(p, p') [label(p', g) = c] + s * rate_g(c)) / (sum_p' w(p, p') [(p', g) measured] + s)

Nothing is fitted by gradient: the encoder has no parameters, ``produces_logits`` is true and it
returns log-probabilities, so the shared classifier's metrics, checkpoints and predictions apply as for
any model. A perturbation never votes for itself (training pairs are scored leave-self-out).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch
from scipy import sparse

from perturb_models.data.datamodule import DataContext
from perturb_models.knowledge.graphs import build_graphs
from perturb_models.models.base import Encoder
from perturb_models.tasks import encode_labels

log = logging.getLogger(__name__)


class KNNEncoder(Encoder):
    """Similarity-weighted vote of the k nearest training perturbations' labels, shrunk toward the gene's rate.

    Args:
        graphs: named graph specs; an edge p' -> p with weight w makes p' a neighbour of p
            (use ``candidates: train_perts`` in the spec so that every neighbour has labels).
        k: neighbours kept per perturbation (the most similar ones).
        shrinkage: weight ``s`` of the gene's training rate in the vote (pseudo-count).
        prior_strength: pseudo-count of the global class rates in each gene's rate.
        power: similarities are raised to this power before voting (sharper for > 1).
    """

    produces_logits = True

    def __init__(self, context: DataContext, graphs: Mapping[str, Mapping[str, Any]], k: int = 20,
                 shrinkage: float = 1.0, prior_strength: float = 5.0, power: float = 1.0):
        super().__init__()
        self.num_classes = context.num_classes
        n = context.num_genes
        graph = build_graphs(graphs, context)
        ei = graph.edge_index.numpy()
        genes_only = (ei[0] < n) & (ei[1] < n)
        src, dst = ei[0][genes_only], ei[1][genes_only]
        weight = graph.edge_weight.numpy()[genes_only].astype(np.float64) ** power
        train = np.zeros(n, dtype=bool)
        train[context.vocab.encode(context.train_perts)] = True
        keep = train[src] & (src != dst)
        # Several relations may link the same pair: their weights add up.
        similarity = sparse.csr_matrix((weight[keep], (dst[keep], src[keep])), shape=(n, n))
        similarity.sum_duplicates()
        self.similarity = _top_k_rows(similarity, k)
        pairs = context.train_pairs
        labels = encode_labels(pairs["de"].to_numpy(), pairs["dir"].to_numpy(), context.task)
        rows, cols = pairs["pert_idx"].to_numpy(), pairs["gene_idx"].to_numpy()
        # One pert x gene indicator matrix per class.
        self.votes = [sparse.csr_matrix((np.ones(int((labels == c).sum())), (rows[labels == c], cols[labels == c])),
                                        shape=(n, n)).T.tocsr() for c in range(self.num_classes)]
        counts = np.stack([np.bincount(cols[labels == c], minlength=n) for c in range(self.num_classes)], axis=1)
        global_rate = (counts.sum(0) + 1.0) / (counts.sum() + self.num_classes)
        denominator = counts.sum(1, keepdims=True) + prior_strength
        # A gene never scored in training gets the global class rates.
        self.gene_rate = np.where(denominator > 0, (counts + prior_strength * global_rate) / np.maximum(denominator, 1e-12),
                                  global_rate[None, :])
        self.shrinkage = float(shrinkage)
        has_neighbour = np.diff(self.similarity.indptr) > 0
        log.info("knn: %d of %d genes have at least one training perturbation as neighbour (k=%d); the others "
                 "get their downstream gene's training rate", int(has_neighbour.sum()), n, k)
        self.output_dim = self.num_classes

    def probabilities(self, pert: np.ndarray, gene: np.ndarray) -> np.ndarray:
        weights = self.similarity[pert]  # (B, n): similarity of each pair's perturbation to training perts
        votes = np.stack([np.asarray(weights.multiply(v[gene]).sum(axis=1)).ravel() for v in self.votes], axis=1)
        prior = self.gene_rate[gene]
        return (votes + self.shrinkage * prior) / (votes.sum(axis=1, keepdims=True) + self.shrinkage)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pert = batch["pert"].detach().cpu().numpy()
        gene = batch["gene"].detach().cpu().numpy()
        probs = self.probabilities(pert, gene)
        return torch.as_tensor(np.log(np.clip(probs, 1e-9, 1.0)), dtype=torch.float32, device=batch["pert"].device)


def _top_k_rows(matrix: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Keep the ``k`` largest entries of each row (ties: lower column first)."""
    matrix = matrix.tocsr()
    rows, cols, vals = [], [], []
    for r in range(matrix.shape[0]):
        start, end = matrix.indptr[r], matrix.indptr[r + 1]
        if start == end:
            continue
        c, v = matrix.indices[start:end], matrix.data[start:end]
        order = np.lexsort((c, -v))[:k]
        rows.extend([r] * len(order))
        cols.extend(c[order])
        vals.extend(v[order])
    return sparse.csr_matrix((vals, (rows, cols)), shape=matrix.shape)
