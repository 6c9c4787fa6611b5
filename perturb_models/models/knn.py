"""The retrieval baseline ("Retrieval, no LLM" in PerturbQA): a similarity-weighted vote of training labels,
and the neighbour machinery the LLM prompts share with it.

For a pair (p, g): among the training perturbations p' that measured g, the ``k`` most similar to p in
the chosen graph vote with the label of (p', g), weighted by their similarity, and the vote is shrunk
toward g's training class rates:

    P(c | p, g) = (sum_p' w(p, p') [label(p', g) = c] + s * rate_g(c)) / (sum_p' w(p, p') + s)

Perturbations that did not measure g are dropped *before* the k nearest are taken, so every one of the
k neighbours has an outcome for g. Nothing is fitted by gradient: the encoder has no parameters,
``produces_logits`` is true and it returns the log of the numerator above (logits: their softmax is
P(c | p, g)), so the shared classifier's metrics, checkpoints and predictions apply as for any model. The
numerator, not P, because two pairs with the same votes for up and down then get equal direction scores
(``Task.decode_logits``); dividing by each pair's own total would round them apart. A perturbation never
votes for itself (training pairs are scored leave-self-out).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import sparse

from perturb_models.data.datamodule import DataContext
from perturb_models.knowledge.graphs import build_graphs
from perturb_models.models.base import Encoder
from perturb_models.tasks import DE_UNKNOWN_DIRECTION, DOWN, NOT_DE, UP, get_task, outcome_codes

log = logging.getLogger(__name__)


class TrainingNeighbours:
    """For a (perturbation, downstream gene) pair, the training perturbations most similar to the
    perturbation among those that measured the gene, with their similarity and observed outcome.

    Built from ``context.train_pairs`` only (validation and test perturbations are never candidates, and
    their labels are never read). Similarity comes from graph specs (an edge p' -> p with weight w makes
    the training perturbation p' a neighbour of p); use ``candidates: train_perts`` in the spec so that
    each gene's top neighbours are training perturbations.

    Args:
        context: the DataModule's ``DataContext``.
        graphs: named graph specs (``build_graphs``).
        power: similarities are raised to this power (sharper for > 1).
    """

    def __init__(self, context: DataContext, graphs: Mapping[str, Mapping[str, Any]], power: float = 1.0):
        n = context.num_genes
        self.num_genes = n
        self.graph_specs = {name: dict(spec) for name, spec in graphs.items()}
        self.power = float(power)
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
        similarity.sort_indices()
        self.similarity = similarity
        pairs = context.train_pairs
        codes = outcome_codes(pairs["de"].to_numpy(), pairs["dir"].to_numpy())
        # gene x pert, stored as code + 1 so that 0 means "not measured".
        outcome = sparse.csr_matrix(
            (codes + 1, (pairs["gene_idx"].to_numpy(), pairs["pert_idx"].to_numpy())), shape=(n, n), dtype=np.int8
        )
        outcome.sort_indices()
        self.outcome = outcome
        self.measured_count = np.diff(outcome.indptr)
        self.changed_count = np.bincount(pairs["gene_idx"].to_numpy()[codes != NOT_DE], minlength=n)
        has_neighbour = np.diff(similarity.indptr) > 0
        log.info(
            "retrieval: %d of %d genes have at least one training perturbation as graph neighbour",
            int(has_neighbour.sum()),
            n,
        )

    def extend_vocabulary(self, context: DataContext) -> None:
        """Similarity rows for the genes appended to the vocabulary, as perturbations: their graph
        neighbours among the training perturbations (``new_gene_edges``); known rows stay as they are."""
        from perturb_models.knowledge.graphs import new_gene_edges

        known, n = self.num_genes, context.num_genes
        if n == known:
            return
        graph = new_gene_edges(self.graph_specs, context, known)
        src, dst = graph.edge_index.numpy()
        weight = graph.edge_weight.numpy().astype(np.float64) ** self.power
        train = np.zeros(n, dtype=bool)
        train[context.vocab.encode(context.train_perts)] = True
        keep = train[src]
        rows = sparse.csr_matrix((weight[keep], (dst[keep] - known, src[keep])), shape=(n - known, n))
        rows.sum_duplicates()
        rows.sort_indices()
        old = sparse.csr_matrix(
            (self.similarity.data, self.similarity.indices, self.similarity.indptr), shape=(known, n)
        )
        self.similarity = sparse.vstack([old, rows], format="csr")
        indptr = np.concatenate([self.outcome.indptr, np.full(n - known, self.outcome.indptr[-1])])
        self.outcome = sparse.csr_matrix((self.outcome.data, self.outcome.indices, indptr), shape=(n, n))
        self.measured_count = np.concatenate([self.measured_count, np.zeros(n - known, self.measured_count.dtype)])
        self.changed_count = np.concatenate([self.changed_count, np.zeros(n - known, self.changed_count.dtype)])
        self.num_genes = n

    def nearest(self, pert: int, gene: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(perturbation indices, similarities, outcome codes)`` of the ``k`` training perturbations most
        similar to ``pert`` that measured ``gene``, most similar first (ties: lower index first)."""
        s, e = self.similarity.indptr[pert], self.similarity.indptr[pert + 1]
        cols, sims = self.similarity.indices[s:e], self.similarity.data[s:e]
        ls, le = self.outcome.indptr[gene], self.outcome.indptr[gene + 1]
        measured, codes = self.outcome.indices[ls:le], self.outcome.data[ls:le]
        if len(cols) == 0 or len(measured) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, np.zeros(0), empty
        at = np.minimum(np.searchsorted(measured, cols), len(measured) - 1)
        hit = measured[at] == cols
        cols, sims, found = cols[hit], sims[hit], codes[at[hit]].astype(np.int64) - 1
        order = np.lexsort((cols, -sims))[:k]
        return cols[order].astype(np.int64), sims[order], found[order]


class KNNEncoder(Encoder):
    """Similarity-weighted vote of the k nearest training perturbations' labels, shrunk toward the gene's rate.

    Args:
        graphs: named graph specs (see :class:`TrainingNeighbours`).
        k: neighbours voting per pair: the most similar training perturbations that measured the gene.
        shrinkage: weight ``s`` of the gene's training rate in the vote (pseudo-count).
        prior_strength: pseudo-count of the global class rates in each gene's rate.
        power: similarities are raised to this power before voting (sharper for > 1).
        neighbours: an already built :class:`TrainingNeighbours` (the LLM shares its own); ``graphs`` and
            ``power`` are then ignored.
    """

    produces_logits = True

    def __init__(
        self,
        context: DataContext,
        graphs: Mapping[str, Mapping[str, Any]] | None = None,
        k: int = 20,
        shrinkage: float = 1.0,
        prior_strength: float = 5.0,
        power: float = 1.0,
        neighbours: TrainingNeighbours | None = None,
    ):
        super().__init__()
        if neighbours is None:
            if graphs is None:
                raise ValueError("KNNEncoder needs graphs (model.encoder.graphs) or prebuilt neighbours")
            neighbours = TrainingNeighbours(context, graphs, power)
        self.neighbours = neighbours
        self.num_classes = context.num_classes
        self.k = int(k)
        self.classes = np.asarray(get_task(context.task).outcome_classes)
        n = context.num_genes
        pairs = context.train_pairs
        labels = self.classes[outcome_codes(pairs["de"].to_numpy(), pairs["dir"].to_numpy())]
        cols = pairs["gene_idx"].to_numpy()
        counts = np.stack([np.bincount(cols[labels == c], minlength=n) for c in range(self.num_classes)], axis=1)
        global_rate = (counts.sum(0) + 1.0) / (counts.sum() + self.num_classes)
        denominator = counts.sum(1, keepdims=True) + prior_strength
        self.global_rate = global_rate
        self.symbols = list(context.vocab.symbols)
        # A gene never scored in training gets the global class rates.
        self.gene_rate = np.where(
            denominator > 0,
            (counts + prior_strength * global_rate) / np.maximum(denominator, 1e-12),
            global_rate[None, :],
        )
        self.shrinkage = float(shrinkage)
        self.output_dim = self.num_classes

    describes_new_perturbations = True

    def extend_vocabulary(self, context: DataContext) -> None:
        known = len(self.symbols)
        self.neighbours.extend_vocabulary(context)
        extra = context.num_genes - known
        self.gene_rate = np.concatenate([self.gene_rate, np.repeat(self.global_rate[None, :], extra, axis=0)])
        self.symbols = list(context.vocab.symbols)

    def evidence(self, pert: np.ndarray, gene: np.ndarray, shown: int = 3) -> dict[str, list]:
        """What the vote read: how many training knockdowns measured the gene, how the ``k`` most similar of
        them (the voters) responded, and the ``shown`` closest by name (``SYMBOL:outcome:similarity``)."""
        names = {NOT_DE: "not_de", DOWN: "down", UP: "up", DE_UNKNOWN_DIRECTION: "de"}
        columns: dict[str, list] = {
            "measured_by": [],
            "voters_up": [],
            "voters_down": [],
            "voters_not_de": [],
            "closest_knockdowns": [],
        }
        for p, g in zip(np.asarray(pert).tolist(), np.asarray(gene).tolist()):
            perts, sims, codes = self.neighbours.nearest(p, g, self.k)
            columns["measured_by"].append(int(self.neighbours.measured_count[g]))
            columns["voters_up"].append(int((codes == UP).sum()))
            columns["voters_down"].append(int((codes == DOWN).sum()))
            columns["voters_not_de"].append(int((codes == NOT_DE).sum()))
            columns["closest_knockdowns"].append(
                "; ".join(
                    f"{self.symbols[q]}:{names[int(c)]}:{s:.3f}"
                    for q, s, c in zip(perts[:shown], sims[:shown], codes[:shown])
                )
            )
        return columns

    def vote_weights(self, pert: np.ndarray, gene: np.ndarray) -> np.ndarray:
        """The vote's numerator per class: similarity-weighted neighbour labels plus the shrunk gene rates."""
        votes = np.zeros((len(pert), self.num_classes))
        for i, (p, g) in enumerate(zip(np.asarray(pert).tolist(), np.asarray(gene).tolist())):
            _, sims, codes = self.neighbours.nearest(p, g, self.k)
            if len(sims):
                labels = self.classes[codes]
                usable = labels >= 0
                votes[i] = np.bincount(labels[usable], weights=sims[usable], minlength=self.num_classes)
        return votes + self.shrinkage * self.gene_rate[gene]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pert = batch["pert"].detach().cpu().numpy()
        gene = batch["gene"].detach().cpu().numpy()
        weights = self.vote_weights(pert, gene)
        # A class without weight gets 1e-9 of the pair's total (P floored at 1e-9), not -inf.
        floor = np.maximum(1e-9 * weights.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        logits = np.log(np.maximum(weights, floor))
        return torch.as_tensor(logits, dtype=torch.float32, device=batch["pert"].device)
