"""Calibration: Platt scaling per task, fitted on validation only (poisoned test labels change nothing of
it), strictly increasing (rankings unchanged), saved in the selected checkpoint, applied by evaluate.py
and predict.py; old checkpoints still evaluate, uncalibrated."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perturb_models.calibration import (
    CALIBRATION_KEY,
    apply_calibrator,
    brier_score,
    expected_calibration_error,
    fit_platt,
)
from perturb_models.data.synthetic import make_synthetic_tables
from perturb_models.evaluation import evaluate, find_checkpoint
from perturb_models.metrics import auroc_per_gene
from perturb_models.prediction import predict
from perturb_models.training import train
from tests.conftest import FAST_CPU, compose_config


def test_platt_scaling_fixes_overconfident_scores_and_keeps_their_order():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.6, size=5000)
    labels = (rng.uniform(size=5000) < truth).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth)) - 1.0))
    slope, intercept = fit_platt(overconfident, labels)
    calibrated = apply_calibrator(overconfident, {"slope": slope, "intercept": intercept})
    assert slope == pytest.approx(1 / 3, rel=0.15)
    assert expected_calibration_error(calibrated, labels) < 0.3 * expected_calibration_error(overconfident, labels)
    assert brier_score(calibrated, labels) < brier_score(overconfident, labels)
    order = np.argsort(overconfident, kind="stable")
    assert (np.diff(calibrated[order]) >= 0).all()
    genes = rng.integers(0, 20, size=5000)
    assert auroc_per_gene(labels, calibrated, genes) == auroc_per_gene(labels, overconfident, genes)


def test_a_model_no_better_than_chance_still_gets_an_increasing_map():
    rng = np.random.default_rng(1)
    scores, labels = rng.uniform(size=400), rng.integers(0, 2, size=400)
    labels[np.argsort(scores)[:200]] = 1  # anti-correlated: the unconstrained slope would be negative
    labels[np.argsort(scores)[200:]] = 0
    slope, _ = fit_platt(scores, labels)
    assert slope > 0


def write_dataset(folder, poison_test: bool) -> None:
    """The synthetic tables as a custom dataset; with ``poison_test`` the test pairs' outcomes are shuffled
    among themselves (valid files, different test labels)."""
    de, direction = make_synthetic_tables()
    if poison_test:
        outcome = de.merge(direction.rename(columns={"label": "dir"}), on=["pert", "gene", "split"], how="left")
        test = outcome["split"] == "test"
        rng = np.random.default_rng(7)
        shuffled = outcome.loc[test, ["label", "dir"]].to_numpy()[rng.permutation(int(test.sum()))]
        outcome.loc[test, ["label", "dir"]] = shuffled
        de = outcome[["pert", "gene", "label", "split"]]
        moving = outcome.loc[outcome["label"] == 1]
        direction = moving.assign(label=moving["dir"].astype(int))[["pert", "gene", "label", "split"]]
    folder.mkdir(parents=True)
    de.to_csv(folder / "toy-de.csv", index=False)
    direction.to_csv(folder / "toy-dir.csv", index=False)


def run_on(tmp_path, name: str, poison_test: bool):
    data = tmp_path / f"data_{name}"
    write_dataset(data, poison_test)
    out = tmp_path / name
    cfg = compose_config(
        "train", ["data=custom", "data.name=toy", f"data.root={data}", *FAST_CPU, "trainer.max_epochs=2"], out
    )
    return train(cfg), out


def test_calibrators_never_see_test_labels_and_travel_in_the_checkpoint(tmp_path):
    clean_metrics, clean = run_on(tmp_path, "clean", poison_test=False)
    poisoned_metrics, poisoned = run_on(tmp_path, "poisoned", poison_test=True)
    clean_cal = torch.load(find_checkpoint(clean), map_location="cpu", weights_only=False)[CALIBRATION_KEY]
    poisoned_cal = torch.load(find_checkpoint(poisoned), map_location="cpu", weights_only=False)[CALIBRATION_KEY]
    assert set(clean_cal) == {"de", "dir"} and clean_cal["de"]["method"] == "platt"
    assert clean_cal == poisoned_cal  # fitted on validation: the test labels changed, the calibrators did not
    assert clean_metrics["test/de_brier"] != poisoned_metrics["test/de_brier"]  # the poison did reach the test split
    for task in ("de", "dir"):
        for metric in ("brier", "ece", "brier_calibrated", "ece_calibrated"):
            assert 0 <= clean_metrics[f"test/{task}_{metric}"] <= 1
    # evaluate.py applies the saved calibrators: the same figures as the training run.
    cfg = compose_config("evaluate", [f"ckpt_path={clean}", "trainer.enable_progress_bar=false"], tmp_path / "eval")
    evaluated = evaluate(cfg)
    for key in ("test/de_brier_calibrated", "test/dir_ece_calibrated", "test/de_auroc_per_gene"):
        assert evaluated[key] == clean_metrics[key]
    # predict.py applies them too; the model's own scores are kept beside them.
    test_perts = json.loads((clean / "split.json").read_text())["test_perts"]
    frame = predict(
        compose_config("predict", [f"ckpt_path={clean}", f"perts=[{','.join(test_perts[:3])}]"], tmp_path / "predict")
    )
    expected = apply_calibrator(frame["p_de_uncalibrated"].to_numpy(), clean_cal["de"])
    np.testing.assert_array_equal(frame["p_de"].to_numpy(), expected)
    assert json.loads((tmp_path / "predict" / "query.json").read_text())["calibration"]["dir"] == clean_cal["dir"]


def test_a_checkpoint_without_calibrator_still_evaluates_uncalibrated(synthetic_cfg, tmp_path, capsys):
    metrics = train(synthetic_cfg("trainer.max_epochs=1"))
    ckpt = find_checkpoint(tmp_path / "run")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    del checkpoint[CALIBRATION_KEY]  # what a checkpoint written before calibration existed holds
    torch.save(checkpoint, ckpt)
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false"], tmp_path / "eval")
    evaluated = evaluate(cfg)
    assert "holds no calibrator" in capsys.readouterr().out
    assert "test/de_brier" not in evaluated
    assert evaluated["test/de_auroc_per_gene"] == metrics["test/de_auroc_per_gene"]
    predictions = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv")
    assert list(predictions.columns) == ["pert", "gene", "task", "label", "score"]


def test_reliability_table_counts_every_pair_before_and_after():
    from perturb_models.calibration import reliability_table

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"task": ["de"] * 500, "label": rng.integers(0, 2, 500), "score": rng.uniform(size=500)})
    table = reliability_table(frame, {"de": {"slope": 0.5, "intercept": 0.0}}, bins=5)
    for version in ("model", "calibrated"):
        part = table.loc[table["scores"] == version]
        assert part["pairs"].sum() == 500 and part["mean_probability"].is_monotonic_increasing
    # slope 0.5 pulls scores toward 0.5: more of them fall in the middle bin
    middle = table.loc[table["bin"] == "0.4-0.6"].set_index("scores")["pairs"]
    assert middle["calibrated"] > 1.5 * middle["model"]


def test_calibration_doc_block_and_reliability_diagram_come_from_the_run(tmp_path):
    from tests.script_runner import run_script

    metrics, run = run_on(tmp_path, "clean", poison_test=False)
    doc = tmp_path / "predict.md"
    begin = "<!-- calibration block: generated by `python benchmarks/calibration_doc.py RUN`; do not edit -->"
    doc.write_text(f"intro\n\n{begin}\nstale\n<!-- end of calibration block -->\n\nafter\n")
    figure = tmp_path / "reliability.png"
    run_script(["benchmarks/calibration_doc.py", str(run), "--doc", str(doc), "--figure", str(figure)])
    text = doc.read_text()
    assert "stale" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert f"DE ECE {metrics['test/de_ece']:.4f} → {metrics['test/de_ece_calibrated']:.4f}" in text
    assert "| DE, bin of p |" in text and figure.read_bytes()[:4] == b"\x89PNG"
