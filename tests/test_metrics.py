"""The official per-gene AUROC against an independent sklearn computation."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from perturb_models.metrics import auroc_per_gene, metrics_from_predictions


def sklearn_auroc_per_gene(labels, scores, genes):
    frame = pd.DataFrame({"y": labels, "s": scores, "g": genes})
    aucs = [roc_auc_score(rows["y"], rows["s"]) for _, rows in frame.groupby("g") if rows["y"].nunique() == 2]
    return (float(np.mean(aucs)) if aucs else math.nan), len(aucs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_gene_auroc_matches_sklearn_grouped_by_gene(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    genes = rng.choice([f"G{i}" for i in range(150)], size=n)
    labels = rng.integers(0, 2, size=n) * (rng.random(n) < 0.6)
    # Rounded scores create many ties, which is where rank-based implementations usually differ.
    scores = np.round(rng.random(n) + 0.3 * labels, 1)
    ours, scored = auroc_per_gene(labels, scores, genes)
    reference, reference_scored = sklearn_auroc_per_gene(labels, scores, genes)
    assert scored == reference_scored
    assert ours == pytest.approx(reference, abs=1e-12)


def test_genes_with_one_class_are_skipped_and_counted():
    labels = [1, 0, 1, 1, 0, 0]
    scores = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]
    genes = ["A", "A", "B", "B", "C", "C"]
    mean, scored = auroc_per_gene(labels, scores, genes)
    assert (mean, scored) == (1.0, 1)
    assert math.isnan(auroc_per_gene([1, 1], [0.1, 0.2], ["A", "A"])[0])


def test_metrics_are_keyed_per_task_with_genes_scored():
    frame = pd.DataFrame(
        {
            "pert": ["P1", "P2", "P1", "P2"],
            "gene": ["A", "A", "A", "A"],
            "task": ["de", "de", "dir", "dir"],
            "label": [1, 0, 0, 1],
            "score": [0.9, 0.2, 0.4, 0.6],
        }
    )
    metrics = metrics_from_predictions(frame, "test")
    assert metrics["test/de_auroc_per_gene"] == 1.0 and metrics["test/de_genes_scored"] == 1
    assert metrics["test/dir_auroc_per_gene"] == 1.0
    assert metrics["test/de_auprc"] == pytest.approx(1.0)
