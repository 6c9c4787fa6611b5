"""Calibrated probabilities: Platt scaling per benchmark task, fitted on validation predictions only.

A model's DE score ranks pairs well (per-gene AUROC) but need not be a probability a person can act on:
class weights, shrinkage and ensembling all move it. At the end of training (``train``), one calibrator
per scored task (``de``; ``dir`` on DE pairs) is fitted on the selected checkpoint's *validation*
predictions and saved in that checkpoint (key ``CALIBRATION_KEY``); ``evaluate.py`` and ``predict.py``
apply it.

Platt scaling, not isotonic regression: ``p' = sigmoid(a * logit(p) + b)`` with ``a > 0`` is strictly
increasing, so no two scores that differ are tied and every ranking metric (per-gene AUROC, global
AUROC/AUPRC) is unchanged; isotonic regression is piecewise constant and would tie scores, moving the
AUROC. Two parameters also fit reliably on a validation split of a few hundred perturbations. The slope
is kept at or above ``MIN_SLOPE`` so the map stays increasing even for a model that ranks no better
than chance on validation.

Reported on the test split, before and after: the Brier score (mean squared error of the probability)
and the expected calibration error (``ECE_BINS`` equal-width bins, the pair-weighted mean gap between
the mean probability and the observed rate).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

log = logging.getLogger(__name__)

CALIBRATION_KEY = "perturb_models_calibration"
"""Checkpoint key: ``{task: {"method": "platt", "slope", "intercept", "pairs"}}`` fitted on validation."""

METHOD = "platt"
MIN_SLOPE = 1e-3
ECE_BINS = 15
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(scores: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """``(slope, intercept)`` maximising the log-likelihood of ``labels`` under ``sigmoid(a logit(s) + b)``
    (Newton's method with a tiny ridge, deterministic); the slope is kept >= ``MIN_SLOPE``."""
    x = _logit(scores)
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("calibration needs validation pairs of both classes")
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.array([1.0, 0.0])
    for _ in range(iterations):
        p = expit(design @ theta)
        gradient = design.T @ (p - y) + 1e-6 * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-6 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    slope, intercept = float(theta[0]), float(theta[1])
    if slope < MIN_SLOPE:  # keep the map increasing: refit the intercept alone at the floor slope
        slope = MIN_SLOPE
        shifted = slope * x
        intercept = 0.0
        for _ in range(iterations):
            p = expit(shifted + intercept)
            step = (p - y).sum() / max((p * (1 - p)).sum(), 1e-12)
            intercept -= step
            if abs(step) < 1e-10:
                break
    return slope, float(intercept)


def apply_calibrator(scores: np.ndarray, calibrator: Mapping[str, Any]) -> np.ndarray:
    """Calibrated probabilities (float64) of ``scores`` under one task's calibrator."""
    return expit(calibrator["slope"] * _logit(scores) + calibrator["intercept"])


def fit_calibrators(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """One calibrator per task of a prediction frame (``task, label, score``: the validation predictions)."""
    calibrators = {}
    for task, rows in frame.groupby("task", sort=True):
        labels = rows["label"].to_numpy()
        if len(np.unique(labels)) < 2:
            continue
        slope, intercept = fit_platt(rows["score"].to_numpy(), labels)
        calibrators[str(task)] = {"method": METHOD, "slope": slope, "intercept": intercept, "pairs": int(len(rows))}
    return calibrators


def brier_score(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((np.asarray(scores, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    which = np.minimum((scores * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(scores[inside].mean() - labels[inside].mean())
    return float(total / max(len(scores), 1))


def calibration_metrics(
    frame: pd.DataFrame, calibrators: Mapping[str, Mapping[str, Any]], prefix: str
) -> dict[str, float]:
    """``{prefix}/{task}_brier``, ``_ece`` (the model's scores) and ``_brier_calibrated``, ``_ece_calibrated``."""
    metrics: dict[str, float] = {}
    for task, rows in frame.groupby("task", sort=True):
        if task not in calibrators:
            continue
        labels, scores = rows["label"].to_numpy(), rows["score"].to_numpy()
        calibrated = apply_calibrator(scores, calibrators[task])
        metrics[f"{prefix}/{task}_brier"] = brier_score(scores, labels)
        metrics[f"{prefix}/{task}_ece"] = expected_calibration_error(scores, labels)
        metrics[f"{prefix}/{task}_brier_calibrated"] = brier_score(calibrated, labels)
        metrics[f"{prefix}/{task}_ece_calibrated"] = expected_calibration_error(calibrated, labels)
    return metrics


def fit_validation_calibrators(validation: pd.DataFrame | None) -> dict[str, dict[str, Any]] | None:
    """The calibrators of a run from its validation prediction frame; None (uncalibrated, with a warning)
    when there is none or a task has a single class there."""
    if validation is None or validation.empty:
        log.warning("no validation predictions: the run's scores stay uncalibrated")
        return None
    calibrators = fit_calibrators(validation)
    for task, calibrator in calibrators.items():
        log.info(
            "calibration (%s, %s): slope %.4f, intercept %.4f, fitted on %d validation pairs",
            task,
            calibrator["method"],
            calibrator["slope"],
            calibrator["intercept"],
            calibrator["pairs"],
        )
    return calibrators or None


def save_calibrators(ckpt_path: str | os.PathLike, calibrators: Mapping[str, Mapping[str, Any]]) -> None:
    """Add the calibrators to a checkpoint file (rewritten atomically; everything else kept)."""
    import torch

    from perturb_models.io import atomic_writer
    from perturb_models.runs import load_checkpoint

    checkpoint = load_checkpoint(ckpt_path)
    checkpoint[CALIBRATION_KEY] = {task: dict(c) for task, c in calibrators.items()}
    with atomic_writer(ckpt_path) as handle:
        torch.save(checkpoint, handle)


def reliability_table(
    frame: pd.DataFrame, calibrators: Mapping[str, Mapping[str, Any]] | None, bins: int = 10
) -> pd.DataFrame:
    """Per task and equal-width probability bin: pairs, mean probability and observed rate, for the model's
    scores and (with calibrators) the calibrated ones: the numbers of a reliability diagram."""
    rows = []
    for task, group in frame.groupby("task", sort=True):
        labels = group["label"].to_numpy(dtype=np.float64)
        versions = {"model": group["score"].to_numpy()}
        if calibrators and task in calibrators:
            versions["calibrated"] = apply_calibrator(versions["model"], calibrators[task])
        for version, scores in versions.items():
            which = np.minimum((np.asarray(scores) * bins).astype(np.int64), bins - 1)
            for b in range(bins):
                inside = which == b
                if inside.any():
                    rows.append(
                        {
                            "task": task,
                            "scores": version,
                            "bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}",
                            "pairs": int(inside.sum()),
                            "mean_probability": float(np.mean(scores[inside])),
                            "observed_rate": float(labels[inside].mean()),
                        }
                    )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m perturb_models.calibration RUN_DIR``: the reliability table of a run's test predictions."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(
        description="Reliability table (before / after calibration) of a run's test "
        "predictions, from its predictions/test.csv and its checkpoint."
    )
    parser.add_argument("run", help="a train.py or evaluate.py run folder (predictions/test.csv)")
    parser.add_argument("--checkpoint", default=None, help="default: RUN/checkpoints/best.ckpt")
    parser.add_argument("--bins", type=int, default=10)
    args = parser.parse_args(argv)
    from perturb_models.results import markdown_table
    from perturb_models.runs import load_checkpoint

    run = Path(args.run)
    checkpoint = load_checkpoint(args.checkpoint or run / "checkpoints" / "best.ckpt")
    calibrators = checkpoint.get(CALIBRATION_KEY)
    table = reliability_table(pd.read_csv(run / "predictions" / "test.csv"), calibrators, args.bins)
    print(f"calibrators: {calibrators or 'none (uncalibrated checkpoint)'}")
    for (task, version), part in table.groupby(["task", "scores"], sort=True):
        print(f"\n{task}, {version} scores")
        print(markdown_table(part.drop(columns=["task", "scores"]).round(4)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
