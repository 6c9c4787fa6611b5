"""End-to-end runs of the default model on synthetic data: outputs, learning, evaluate round-trip."""

import json

import pandas as pd

from perturb_models.training import train


def test_mlp_beats_chance_on_planted_synthetic_modules(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg("trainer.max_epochs=25")
    metrics = train(cfg)
    assert metrics["test/de_auroc_per_gene"] > 0.62
    assert metrics["test/dir_auroc_per_gene"] > 0.7
    assert metrics["test/de_genes_scored"] > 50


def test_training_run_writes_checkpoints_metrics_and_predictions(synthetic_cfg, tmp_path):
    run = tmp_path / "run"
    train(synthetic_cfg())
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("val", "test"):
        for key in (
            "de_auroc_per_gene",
            "de_genes_scored",
            "dir_auroc_per_gene",
            "dir_genes_scored",
            "de_auroc",
            "de_auprc",
        ):
            assert f"{stage}/{key}" in metrics
    predictions = pd.read_csv(run / "predictions" / "test.csv")
    assert list(predictions.columns) == ["pert", "gene", "task", "label", "score"]
    assert set(predictions["task"]) == {"de", "dir"}
    assert predictions["score"].between(0, 1).all()
    split = json.loads((run / "split.json").read_text())
    assert split["val_perts"] and not set(split["val_perts"]) & set(split["test_perts"])
