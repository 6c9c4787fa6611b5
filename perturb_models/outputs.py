"""What a finished run leaves behind: ``metrics.json``, ``predictions/``, ``run.json`` (all atomic), the
loggers' summary and the console table; plus the provenance a record carries (the git commit)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from perturb_models.config import running_from_checkout
from perturb_models.console import say
from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.io import atomic_write_dataframe, atomic_write_json, nan_to_none


def git_commit() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout (an installed copy has none: the git
    repository around its site-packages, if any, is not this code's)."""
    if not running_from_checkout():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_outputs(
    output_dir: Path, predictions: Mapping[str, pd.DataFrame], record: dict[str, Any], metrics: dict[str, float]
) -> None:
    """``metrics.json``, ``predictions/<stage>.csv`` and ``run.json``, each written atomically."""
    for stage, frame in predictions.items():
        atomic_write_dataframe(output_dir / "predictions" / f"{stage}.csv", frame)
    atomic_write_json(output_dir / "metrics.json", nan_to_none(metrics))
    atomic_write_json(output_dir / "run.json", record)


def publish_run(
    output_dir: Path,
    predictions: Mapping[str, pd.DataFrame],
    record: dict[str, Any],
    metrics: dict[str, float],
    loggers: list,
    cfg: DictConfig,
) -> None:
    """The end of every run (train and evaluate, classifiers and gene-set namers): the run's files, the
    loggers' summary, the console table. ``predictions`` maps a stage (``val``, ``test``) to its table."""
    write_outputs(output_dir, predictions, record, metrics)
    log_run_summary(loggers, cfg, metrics)
    print_metrics(metrics, output_dir)


def run_record(cfg: DictConfig, datamodule: PerturbQADataModule) -> dict[str, Any]:
    """``run.json``'s identity of a classifier run: model, dataset, task, seed, commit, selection metric."""
    return {
        "model": cfg.model.get("name", "model"),
        "dataset": datamodule.name,
        "task": datamodule.task,
        "seed": int(cfg.seed),
        "commit": git_commit(),
        "optimized_metric": cfg.get("optimized_metric"),
    }


def log_run_summary(loggers: list, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Resolved config, the selected checkpoint's validation metrics as ``final/val/...`` (what W&B sweeps
    optimise) and a metrics table to every logger. Test metrics were logged once already as ``test/...``."""
    rows = [[k, v] for k, v in sorted(metrics.items())]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if k.startswith("val/")})
        if hasattr(logger, "log_table"):
            logger.log_table(key="test/metrics_table", columns=["metric", "value"], data=rows)
        logger.save()


def print_metrics(metrics: dict[str, float], output_dir: Path | None = None) -> None:
    """The test metrics as an aligned console table (and train.log), then where the outputs are."""
    keys = [k for k in sorted(metrics) if k.startswith("test/")]
    width = max((len(k) for k in keys), default=10)
    lines = [
        f"{k:<{width}}  {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k:<{width}}  {metrics[k]}"
        for k in keys
    ]
    say("\n".join(["Test metrics:"] + lines))
    if output_dir is not None:
        say(f"Outputs written to {output_dir}")
