"""The results table of many runs: find run folders under multirun roots, average seeds per cell."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

# Which test metric a cell of the table reports, per task (joint runs give both).
TASK_METRICS = {"de": ("de_auroc_per_gene",), "dir": ("dir_auroc_per_gene",),
                "joint": ("de_auroc_per_gene", "dir_auroc_per_gene"), "gse": ("rouge1_recall", "bertscore_f1")}


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() and (path / "run.json").is_file()


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders named directly, or found below a folder (a multirun root such as multirun/table1/DATE)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(os.path.expanduser(str(raw)))
        if is_run_dir(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder or multirun folder")
        below = sorted(p.parent for p in path.rglob("run.json") if is_run_dir(p.parent))
        if not below:
            raise FileNotFoundError(f"{path}: no finished run in or below it (no folder with both metrics.json and "
                                    "run.json); is it the folder of a finished train.py or evaluate.py run?")
        found.extend(below)
    # The same run named twice (directly and through its multirun folder) is one row.
    return list(dict.fromkeys(found))


def summarize_runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model x dataset x task x metric: mean and sample std over seeds, the seeds used.

    ``table`` is the per-run comparison (columns model, dataset, task, seed and the test metrics).
    """
    rows = []
    for (model, dataset, task), group in table.groupby(["model", "dataset", "task"], sort=True, dropna=False):
        for metric in TASK_METRICS.get(task, ("de_auroc_per_gene", "dir_auroc_per_gene")):
            values = group[metric].astype(float).dropna()
            rows.append({
                "model": model, "dataset": dataset, "task": task, "metric": metric,
                "mean": float(values.mean()) if len(values) else math.nan,
                "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "runs": int(len(values)),
                "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int).unique())),
            })
    return pd.DataFrame(rows, columns=["model", "dataset", "task", "metric", "mean", "std", "runs", "seeds"])


def results_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table: a row per model, a column per dataset/metric, cells ``mean ± std``."""
    if summary.empty:
        return pd.DataFrame()

    def cell(row) -> str:
        if math.isnan(row["mean"]):
            return "–"
        return f"{row['mean']:.4f}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.4f}")

    labelled = summary.assign(column=summary["dataset"] + " " + summary["metric"].str.replace("_auroc_per_gene", ""),
                              cell=summary.apply(cell, axis=1))
    grid = labelled.pivot_table(index="model", columns="column", values="cell", aggfunc="first")
    return grid.reset_index().rename_axis(columns=None)
