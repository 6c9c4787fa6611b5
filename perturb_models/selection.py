"""Recipe selection on validation figures only, and the leave-one-cell-line-out (LOCO) protocol.

Result rows (``benchmarks/results/*.csv``) carry both the validation metric (``val_*`` columns) and the test
metric (``auroc_per_gene``). Selection must never see the second: :func:`validation_view` keeps the
identifying columns and the ``val_*`` columns only, and every chooser here works on that view, so a test
figure cannot reach a choice even by mistake.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

KEYS = ("model", "recipe", "dataset", "task", "seed")
VAL_METRIC = "val_auroc_per_gene"


def validation_view(rows: pd.DataFrame, metric: str = VAL_METRIC) -> pd.DataFrame:
    """The identifying columns and the ``val_*`` columns of ``rows``; every test figure dropped."""
    if not metric.startswith("val_"):
        raise ValueError(f"selection metric {metric!r} is not a validation column (val_*)")
    missing = [k for k in KEYS if k not in rows.columns]
    if missing:
        raise ValueError(f"result rows lack the column(s) {', '.join(missing)} needed to select a recipe")
    if metric not in rows.columns:
        raise ValueError(f"result rows have no {metric} column: selection needs validation figures")
    return rows.loc[:, [*KEYS, *[c for c in rows.columns if c.startswith("val_")]]].copy()


def recipe_scores(rows: pd.DataFrame, model: str, datasets: Iterable[str], metric: str = VAL_METRIC) -> pd.Series:
    """Mean validation figure (``metric``, per-gene AUROC by default) of each recipe of ``model`` over
    ``datasets`` (all tasks and seeds).

    A recipe missing a validation figure on any of ``datasets`` scores NaN: it cannot be compared fairly.
    """
    view = validation_view(rows, metric)
    datasets = list(datasets)
    view = view.loc[(view["model"] == model) & view["dataset"].isin(datasets)]
    scores = {}
    for recipe, part in view.groupby("recipe", sort=True):
        values = part[metric].astype(float)
        covered = set(part.loc[values.notna(), "dataset"])
        # Each line counts once (its tasks and seeds averaged first), so a line with more seeds weighs no more.
        per_line = part.assign(v=values).groupby("dataset")["v"].mean()
        scores[recipe] = float(per_line.mean()) if covered >= set(datasets) else math.nan
    return pd.Series(scores, dtype=float)


def choose_recipe(rows: pd.DataFrame, model: str, datasets: Iterable[str], metric: str = VAL_METRIC) -> str:
    """The recipe of ``model`` with the best mean validation figure on ``datasets`` (ties: first by name)."""
    scores = recipe_scores(rows, model, datasets, metric).dropna()
    if scores.empty:
        raise ValueError(f"no recipe of {model} has validation figures on all of {', '.join(datasets)}")
    best = scores.max()
    return sorted(r for r, s in scores.items() if s == best)[0]


def loco_choices(rows: pd.DataFrame, model: str, lines: list[str]) -> dict[str, str]:
    """For each held-out line: the recipe of ``model`` chosen on the validation figures of the other lines."""
    return {held_out: choose_recipe(rows, model, [d for d in lines if d != held_out]) for held_out in lines}
