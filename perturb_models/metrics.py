"""PerturbQA metrics: the official per-gene AUROC plus global AUROC / AUPRC.

The official metric (``auc_per_gene`` in the PerturbQA code) computes, for each downstream gene, the
AUROC over the test perturbations in which that gene is scored, and averages over the genes that have
both classes. Direction is scored on DE-positive pairs only.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

def auroc_per_gene(labels, scores, genes) -> tuple[float, int]:
    """Mean over genes of the AUROC of ``scores`` against binary ``labels``; genes with one class are skipped.

    Returns ``(mean_auroc, genes_scored)``; ``mean_auroc`` is NaN when no gene has both classes.
    Ties get the average rank (the Mann-Whitney form of AUROC, as sklearn computes it).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    genes = np.asarray(genes)
    if not (len(labels) == len(scores) == len(genes)):
        raise ValueError("labels, scores and genes must have the same length")
    if len(labels) == 0:
        return math.nan, 0
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    _, gene_ids = np.unique(genes, return_inverse=True)
    order = np.lexsort((scores, gene_ids))
    g, s, y = gene_ids[order], scores[order], labels[order]
    n = len(g)
    position = np.arange(n, dtype=np.float64)
    # A tie run is a maximal stretch of equal (gene, score); its members share the mean position.
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_mean = np.bincount(run_id, weights=position) / np.bincount(run_id)
    mean_position = run_mean[run_id]
    n_genes = gene_ids.max() + 1
    gene_start = np.full(n_genes, n, dtype=np.int64)
    np.minimum.at(gene_start, g, np.arange(n))
    rank_in_gene = mean_position - gene_start[g] + 1.0  # 1-based rank within the gene
    n_pos = np.bincount(g, weights=y, minlength=n_genes)
    n_all = np.bincount(g, minlength=n_genes).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum_pos = np.bincount(g, weights=rank_in_gene * y, minlength=n_genes)
    scored = (n_pos > 0) & (n_neg > 0)
    if not scored.any():
        return math.nan, 0
    auc = (rank_sum_pos[scored] - n_pos[scored] * (n_pos[scored] + 1) / 2) / (n_pos[scored] * n_neg[scored])
    return float(auc.mean()), int(scored.sum())


def prediction_frame(pert: list[str], gene: list[str], de: np.ndarray, direction: np.ndarray,
                     scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows ``pert,gene,task,label,score``: every pair for ``de``, DE-positive pairs for ``dir``."""
    pert, gene = np.asarray(pert, dtype=object), np.asarray(gene, dtype=object)
    parts = []
    if "de" in scores:
        parts.append(pd.DataFrame({"pert": pert, "gene": gene, "task": "de", "label": de.astype(np.int64),
                                   "score": scores["de"]}))
    if "dir" in scores:
        keep = direction >= 0
        parts.append(pd.DataFrame({"pert": pert[keep], "gene": gene[keep], "task": "dir",
                                   "label": direction[keep].astype(np.int64), "score": scores["dir"][keep]}))
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["task", "pert", "gene"], kind="stable").reset_index(drop=True)


def metrics_from_predictions(frame: pd.DataFrame, prefix: str) -> dict[str, float]:
    """All metrics of a prediction frame, keyed ``{prefix}/{task}_{metric}``."""
    metrics: dict[str, float] = {}
    for task, rows in frame.groupby("task", sort=True):
        labels = rows["label"].to_numpy()
        scores = rows["score"].to_numpy()
        mean_auc, scored = auroc_per_gene(labels, scores, rows["gene"].to_numpy())
        metrics[f"{prefix}/{task}_auroc_per_gene"] = mean_auc
        metrics[f"{prefix}/{task}_genes_scored"] = float(scored)
        metrics[f"{prefix}/{task}_pairs"] = float(len(rows))
        if 0 < labels.sum() < len(labels):
            y = torch.as_tensor(labels)
            p = torch.as_tensor(scores, dtype=torch.float64)
            metrics[f"{prefix}/{task}_auroc"] = float(binary_auroc(p, y))
            metrics[f"{prefix}/{task}_auprc"] = float(binary_average_precision(p, y))
        else:
            metrics[f"{prefix}/{task}_auroc"] = math.nan
            metrics[f"{prefix}/{task}_auprc"] = math.nan
    return metrics
