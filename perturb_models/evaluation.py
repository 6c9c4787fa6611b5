"""``evaluate(cfg)``: re-test a checkpoint from its own record, or compare finished runs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from perturb_models.io import atomic_write_dataframe, atomic_write_text
from perturb_models.metrics import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from perturb_models.results import (
    comparison_view,
    find_run_dirs,
    markdown_table,
    results_grid,
    summarize_runs,
    with_uncertainty,
)
from perturb_models.runners import runner_for
from perturb_models.runs import find_checkpoint, load_run_record
from perturb_models.tasks import COMPARISON_METRICS

__all__ = ["compare_runs", "evaluate", "evaluate_checkpoint", "find_checkpoint", "load_run_record", "read_run"]


def evaluate_checkpoint(
    ckpt_path: str | os.PathLike,
    output_dir: Path,
    trainer_cfg: DictConfig,
    data_root: str | None = None,
    evaluate_cfg: DictConfig | None = None,
) -> dict[str, float]:
    """Rebuild data and model from the checkpoint alone (through the run's runner), test, and write metrics
    and predictions.

    ``evaluate_cfg`` (evaluate.py's config) brings its ``logger`` choice; the loggers see the run's own
    config (model, data, seed) with this evaluation's ``logger``, ``paths``, ``task_name`` and ``run_name``.
    """
    ckpt_file = find_checkpoint(ckpt_path)
    checkpoint, record = load_run_record(ckpt_file)
    runner = runner_for(record["config"])
    return runner.evaluate(checkpoint, record, ckpt_file, output_dir, trainer_cfg, data_root, evaluate_cfg)


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One comparison row from a run folder's ``run.json`` and ``metrics.json``."""
    run_dir = Path(os.path.expanduser(str(run_dir)))
    missing = [name for name in ("metrics.json", "run.json") if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: missing {', '.join(missing)}; is it the folder of a finished train.py or evaluate.py run?"
        )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    row: dict[str, Any] = {
        "run": str(run_dir),
        "model": info.get("model"),
        "dataset": info.get("dataset"),
        "task": info.get("task"),
        "seed": info.get("seed"),
    }
    for name in COMPARISON_METRICS:
        value = metrics.get(f"test/{name}")
        row[name] = math.nan if value is None else value
    return row


def compare_runs(
    run_dirs: Sequence[str | os.PathLike],
    output_dir: Path,
    reference: str | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """``comparison.csv`` and ``comparison.md``: one row per run, the test metrics side by side, each
    per-gene AUROC with its bootstrap interval over test perturbations and, against ``reference`` (default
    the first run), the paired difference with its interval and p-value (``results.with_uncertainty``)."""
    if not run_dirs:
        raise ValueError("runs is empty: pass runs='[RUN_DIR1,RUN_DIR2,...]'")
    # A multirun folder (e.g. of experiment=table1) stands for every finished run below it.
    table = pd.DataFrame([read_run(d) for d in find_run_dirs(run_dirs)])
    table = with_uncertainty(table, reference, resamples, level)
    atomic_write_dataframe(output_dir / "comparison.csv", table)
    view = markdown_table(comparison_view(table, level))
    atomic_write_text(output_dir / "comparison.md", view + "\n")
    print(view)
    print(
        f"Comparison written to {output_dir / 'comparison.md'} and comparison.csv ({100 * level:g}% intervals: "
        f"{resamples} bootstrap resamples of the test perturbations)"
    )
    # Seeds averaged per model x dataset x task: summary.csv (long) and summary.md (one row per model).
    summary = summarize_runs(table)
    atomic_write_dataframe(output_dir / "summary.csv", summary)
    atomic_write_text(output_dir / "summary.md", markdown_table(results_grid(summary)) + "\n")
    print(markdown_table(results_grid(summary)))
    print(f"Summary over seeds written to {output_dir / 'summary.md'} and summary.csv")
    return table


def evaluate(cfg: DictConfig) -> Any:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt_path") and cfg.get("runs"):
        raise ValueError("give either ckpt_path=... (evaluate one checkpoint) or runs=[...] (compare runs), not both")
    if cfg.get("ckpt_path"):
        return evaluate_checkpoint(cfg.ckpt_path, output_dir, cfg.trainer, cfg.get("data_root"), evaluate_cfg=cfg)
    if cfg.get("runs"):
        runs = cfg.runs if not isinstance(cfg.runs, str) else [cfg.runs]
        return compare_runs(
            list(runs),
            output_dir,
            cfg.get("reference"),
            int(cfg.get("resamples", DEFAULT_RESAMPLES)),
            float(cfg.get("level", DEFAULT_LEVEL)),
        )
    raise ValueError("nothing to evaluate: pass ckpt_path=PATH (checkpoint or run folder) or runs='[DIR1,DIR2]'")
