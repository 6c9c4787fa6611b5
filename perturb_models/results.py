"""Results tables of finished runs, for ``evaluate.py runs=[...]``: find run folders under multirun roots,
each run's bootstrap interval and paired difference against a reference run, the seed-averaged grid, and
markdown. The tables of the repository's README and docs are made by ``benchmarks/docs_tables.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from perturb_models.console import say
from perturb_models.metrics import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_auroc_per_gene, paired_bootstrap
from perturb_models.tasks import BENCHMARK_TASKS, TASKS, headline_metrics


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
        # A run inside another run (an ensemble's members/<name>) is part of that run, not a row of its own.
        below = [r for r in below if not any(is_run_dir(a) for a in r.parents if a != path and a.is_relative_to(path))]
        if not below:
            raise FileNotFoundError(
                f"{path}: no finished run in or below it (no folder with both metrics.json and "
                "run.json); is it the folder of a finished train.py or evaluate.py run?"
            )
        found.extend(below)
    # The same run named twice (directly and through its multirun folder) is one row.
    return list(dict.fromkeys(found))


def prediction_file(run: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(run))) / "predictions" / "test.csv"


def with_uncertainty(
    table: pd.DataFrame,
    reference: str | os.PathLike | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """The comparison ``table`` (a ``run`` column and ``{task}_auroc_per_gene`` columns) with each run's
    bootstrap interval (``{task}_auroc_per_gene_low/_high``) and, against a reference run on the same
    test pairs, the paired difference (``{task}_difference``, ``_low``, ``_high``, ``{task}_p_value``).

    The reference is ``reference`` (one of the runs; default the first); a run of another dataset is
    compared with the first run of its own dataset (the ``reference`` column names it). Runs without
    ``predictions/test.csv``, or scored on other pairs than their reference, keep empty cells and are
    named on the console."""
    table = table.copy()
    runs = [str(r) for r in table["run"]]
    if reference is not None:
        wanted = Path(os.path.expanduser(str(reference))).resolve()
        matches = [r for r in runs if Path(r).resolve() == wanted]
        if not matches:
            raise ValueError(f"reference={reference} is not one of the compared runs ({', '.join(runs)})")
        reference = matches[0]
    frames: dict[str, pd.DataFrame | None] = {}
    for run in runs:
        path = prediction_file(run)
        frames[run] = pd.read_csv(path) if path.is_file() else None
        if frames[run] is None:
            say(
                f"{run}: no predictions/test.csv, so no interval for it (was it written before predictions were saved?)"
            )
        elif not {"pert", "gene", "task", "label", "score"} <= set(frames[run].columns):
            frames[run] = None  # not a pair classifier's predictions (a gene-set namer's answers)
    tasks = [t for t in BENCHMARK_TASKS if f"{t}_auroc_per_gene" in table.columns]
    references: list[str | None] = []
    datasets = table["dataset"].astype(str).tolist() if "dataset" in table.columns else [""] * len(runs)
    for run, dataset in zip(runs, datasets):
        own = (
            reference
            if reference is not None and datasets[runs.index(reference)] == dataset
            else next(r for r, d in zip(runs, datasets) if d == dataset)
        )
        references.append(None if own == run else own)
    table["reference"] = [r if r is not None else "" for r in references]
    for task in tasks:
        for column in (
            "auroc_per_gene_low",
            "auroc_per_gene_high",
            "difference",
            "difference_low",
            "difference_high",
            "p_value",
        ):
            table[f"{task}_{column}"] = math.nan
    for i, run in enumerate(runs):
        frame = frames[run]
        if frame is None:
            continue
        for task in tasks:
            rows = frame.loc[frame["task"] == task]
            if rows.empty:
                continue
            interval = bootstrap_auroc_per_gene(
                rows["label"], rows["score"], rows["gene"], rows["pert"], resamples, level
            )
            table.loc[table.index[i], [f"{task}_auroc_per_gene_low", f"{task}_auroc_per_gene_high"]] = [
                interval.low,
                interval.high,
            ]
            other = references[i]
            if other is None or frames[other] is None:
                continue
            try:
                paired = paired_bootstrap(frame, frames[other], task, resamples, level)
            except ValueError as error:
                say(f"{run}: no paired {task} comparison with {other}: {error}")
                continue
            table.loc[
                table.index[i],
                [f"{task}_difference", f"{task}_difference_low", f"{task}_difference_high", f"{task}_p_value"],
            ] = [paired.difference, paired.low, paired.high, paired.p_value]
    return table


def comparison_view(table: pd.DataFrame, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """The comparison for people: each headline figure with its interval, each difference with its
    interval and p-value, then the other metrics."""
    out = pd.DataFrame({c: table[c] for c in ("run", "model", "dataset", "task", "seed") if c in table.columns})
    percent = f"{100 * level:g}%"
    for task in BENCHMARK_TASKS:
        name = f"{task}_auroc_per_gene"
        if name not in table.columns:
            continue
        out[f"{task} per-gene AUROC [{percent}]"] = [
            _figure(v, lo, hi, ".4f") for v, lo, hi in zip(table[name], table[f"{name}_low"], table[f"{name}_high"])
        ]
        if f"{task}_difference" in table.columns:
            out[f"{task} − reference [{percent}], p"] = [
                "–" if _missing(d) else _figure(d, lo, hi, "+.4f") + f", p={p:.3g}"
                for d, lo, hi, p in zip(
                    table[f"{task}_difference"],
                    table[f"{task}_difference_low"],
                    table[f"{task}_difference_high"],
                    table[f"{task}_p_value"],
                )
            ]
    if "reference" in table.columns:
        out["reference"] = table["reference"].replace("", "–")
    rest = [
        c
        for c in table.columns
        if c not in out.columns
        and c != "reference"
        and not any(
            c.startswith(f"{t}_auroc_per_gene") or c.startswith(f"{t}_difference") or c == f"{t}_p_value"
            for t in BENCHMARK_TASKS
        )
    ]
    rest = [c for c in rest if c not in ("run", "model", "dataset", "task", "seed")]
    return pd.concat([out, table[rest]], axis=1)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _figure(value: Any, low: Any, high: Any, spec: str) -> str:
    if _missing(value):
        return "–"
    if _missing(low) or _missing(high):
        return format(value, spec)
    return f"{value:{spec}} [{low:.3f}, {high:.3f}]"


def summarize_runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model x dataset x task x metric: mean and sample std over seeds, the seeds used.

    ``table`` is the per-run comparison (columns model, dataset, task, seed and the test metrics).
    """
    rows = []
    for (model, dataset, task), group in table.groupby(["model", "dataset", "task"], sort=True, dropna=False):
        # A task unknown to this version (a run folder from elsewhere) reports every headline metric.
        for metric in headline_metrics(task if task in TASKS else "joint"):
            values = group[metric].astype(float).dropna()
            rows.append(
                {
                    "model": model,
                    "dataset": dataset,
                    "task": task,
                    "metric": metric,
                    "mean": float(values.mean()) if len(values) else math.nan,
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                    "runs": int(len(values)),
                    "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int).unique())),
                }
            )
    return pd.DataFrame(rows, columns=["model", "dataset", "task", "metric", "mean", "std", "runs", "seeds"])


def results_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table: a row per model, a column per dataset/metric, cells ``mean ± std``."""
    if summary.empty:
        return pd.DataFrame()

    def cell(row) -> str:
        if math.isnan(row["mean"]):
            return "–"
        return f"{row['mean']:.4f}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.4f}")

    labelled = summary.assign(
        column=summary["dataset"] + " " + summary["metric"].str.replace("_auroc_per_gene", ""),
        cell=summary.apply(cell, axis=1),
    )
    grid = labelled.pivot_table(index="model", columns="column", values="cell", aggfunc="first")
    return grid.reset_index().rename_axis(columns=None)


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "–"
            return f"{value:.0f}" if value.is_integer() and abs(value) >= 2 else f"{value:.4f}"
        return str(value)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])
