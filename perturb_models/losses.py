"""A loss aimed at the benchmark's metric: a pairwise ranking term between pairs of the same downstream gene.

The per-gene AUROC ranks the perturbations measured for one gene against each other, so a shift shared by
all of a gene's pairs (or by every pair) cannot change it, while the cross-entropy of pooled pairs rewards
such shifts. :func:`within_gene_rank_loss` scores only what the metric sees: for two pairs of the same gene
with different outcomes, the logistic loss of the order of their scores. Batches must hold several pairs of
one gene for it to have anything to compare (``data.gene_group_size``); ``model.rank_weight`` adds it to
the cross-entropy.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from perturb_models.tasks import get_task


def _ordered_pairs(
    genes: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (i, j) of every pair of rows with the same gene, i positive and j negative."""
    same_gene = genes[:, None] == genes[None, :]
    return torch.nonzero(same_gene & positive[:, None] & negative[None, :], as_tuple=True)


def _pairwise_logistic(scores: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    i, j = pairs
    if len(i) == 0:
        return None
    return F.softplus(scores[j] - scores[i]).mean()


def within_gene_rank_loss(logits: torch.Tensor, labels: torch.Tensor, genes: torch.Tensor, task: str) -> torch.Tensor:
    """Mean pairwise logistic loss over same-gene pairs of different outcome, per benchmark task.

    The scores are the log-odds the metric ranks by: for ``joint``, DE = logsumexp(down, up) - not DE over
    (DE, not DE) pairs, direction = up - down over (up, down) pairs; for ``de`` / ``dir`` the second logit
    minus the first. With both benchmark tasks, the loss is the mean of the two tasks' means (a task with no
    such pair in the batch is left out). A batch with no such pair gives 0, still attached to ``logits``
    so that a backward pass is valid.
    """
    logits = logits.float()
    terms: list[torch.Tensor] = []
    name = get_task(task).name
    if name == "joint":
        de_scores = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
        terms.append(_pairwise_logistic(de_scores, _ordered_pairs(genes, labels > 0, labels == 0)))
        dir_scores = logits[:, 2] - logits[:, 1]
        terms.append(_pairwise_logistic(dir_scores, _ordered_pairs(genes, labels == 2, labels == 1)))
    else:
        scores = logits[:, 1] - logits[:, 0]
        terms.append(_pairwise_logistic(scores, _ordered_pairs(genes, labels == 1, labels == 0)))
    present = [t for t in terms if t is not None]
    if not present:
        return logits.sum() * 0.0
    return torch.stack(present).mean()
