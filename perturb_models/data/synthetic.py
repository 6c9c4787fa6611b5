"""A generated PerturbQA-style dataset with planted structure, for tests and for trying the framework offline.

Genes fall into modules. Perturbing a gene makes most members of its own module differentially
expressed (plus a little noise elsewhere). Each module is split in two halves: a member goes up when
the perturbed gene is in its own half and down otherwise. Perturbed genes also appear as downstream
genes of other perturbations, so a model that shares gene embeddings between the two roles can place
an unseen perturbation in its module, and must beat chance on both tasks if it learns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_synthetic_tables(
    n_genes: int = 200,
    n_modules: int = 8,
    n_perts: int = 160,
    negatives_per_pert: int = 40,
    test_fraction: float = 0.2,
    p_de_in_module: float = 0.85,
    p_de_background: float = 0.04,
    p_direction_flip: float = 0.05,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(de, dir)`` tables in the PerturbQA format (columns pert, gene, label, split)."""
    if n_modules < 2 or n_genes < 4 * n_modules:
        raise ValueError("synthetic data needs at least 2 modules of at least 4 genes each")
    if not 0 < n_perts <= n_genes:
        raise ValueError(f"n_perts must be in 1..n_genes ({n_genes}), got {n_perts}")
    rng = np.random.default_rng(seed)
    genes = np.array([f"SYN{i:04d}" for i in range(n_genes)])
    module = rng.permutation(np.arange(n_genes) % n_modules)
    half = rng.integers(0, 2, size=n_genes)
    pert_ids = np.sort(rng.choice(n_genes, size=n_perts, replace=False))
    n_test = max(1, int(round(test_fraction * n_perts)))
    test_perts = set(rng.choice(pert_ids, size=n_test, replace=False).tolist())

    de_rows, dir_rows = [], []
    for p in pert_ids:
        same = np.flatnonzero((module == module[p]) & (np.arange(n_genes) != p))
        others = np.flatnonzero(module != module[p])
        sampled = rng.choice(others, size=min(negatives_per_pert, len(others)), replace=False)
        split = "test" if p in test_perts else "train"
        for g in np.concatenate([same, sampled]):
            in_module = module[g] == module[p]
            is_de = rng.random() < (p_de_in_module if in_module else p_de_background)
            de_rows.append((genes[p], genes[g], int(is_de), split))
            if is_de:
                up = (half[g] == half[p]) if in_module else bool(rng.integers(0, 2))
                if rng.random() < p_direction_flip:
                    up = not up
                dir_rows.append((genes[p], genes[g], int(up), split))
    columns = ["pert", "gene", "label", "split"]
    return pd.DataFrame(de_rows, columns=columns), pd.DataFrame(dir_rows, columns=columns)
