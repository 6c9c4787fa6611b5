"""evaluate.py: rebuild from a checkpoint alone with identical numbers; compare runs."""

import json
import math
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from perturb_models.evaluation import compare_runs, evaluate
from perturb_models.training import train
from tests.conftest import REPO, compose_config


def test_evaluate_rebuilds_from_checkpoint_with_identical_metrics_and_predictions(synthetic_cfg, tmp_path):
    trained = train(synthetic_cfg("trainer.max_epochs=3"))
    run = tmp_path / "run"
    cfg = compose_config(
        "evaluate", [f"ckpt_path={run}/checkpoints/best.ckpt", "trainer.enable_progress_bar=false"], tmp_path / "eval"
    )
    evaluated = evaluate(cfg)
    for key, value in trained.items():
        if key.startswith("test/"):
            assert evaluated[key] == pytest.approx(value, abs=0, nan_ok=True), key
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {
        k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k.startswith("test/")
    }
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv"), pd.read_csv(run / "predictions" / "test.csv")
    )


def test_evaluate_accepts_a_run_folder_and_rejects_a_foreign_file(synthetic_cfg, tmp_path):
    train(synthetic_cfg("trainer.max_epochs=1"))
    cfg = compose_config(
        "evaluate", [f"ckpt_path={tmp_path / 'run'}", "trainer.enable_progress_bar=false"], tmp_path / "eval"
    )
    assert "test/de_auroc_per_gene" in evaluate(cfg)
    import torch

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'foreign.ckpt'}"], tmp_path / "eval2")
    with pytest.raises(ValueError, match="was not written by perturb_models"):
        evaluate(cfg)


def test_evaluate_logs_the_test_metrics_to_the_chosen_logger(synthetic_cfg, tmp_path):
    train(synthetic_cfg("trainer.max_epochs=1"))
    cfg = compose_config(
        "evaluate",
        [f"ckpt_path={tmp_path / 'run'}", "logger=csv", "trainer.enable_progress_bar=false"],
        tmp_path / "eval",
    )
    evaluated = evaluate(cfg)
    logged = pd.read_csv(tmp_path / "eval" / "csv" / "metrics.csv")
    # test metrics are logged once, by the test loop, as test/... (final/ holds the validation metrics)
    assert logged["test/de_auroc_per_gene"].dropna().item() == pytest.approx(evaluated["test/de_auroc_per_gene"])
    hparams = (tmp_path / "eval" / "csv" / "hparams.yaml").read_text()
    assert "name: mlp" in hparams and "task_name: evaluate" in hparams


def two_seeds(synthetic_cfg, tmp_path) -> list:
    """Run folders of two one-epoch synthetic runs, seeds 0 and 1."""
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        train(synthetic_cfg(f"seed={seed}", "trainer.max_epochs=1", output_dir=out))
        runs.append(out)
    return runs


def test_comparison_table_has_one_row_per_run(synthetic_cfg, tmp_path):
    runs = two_seeds(synthetic_cfg, tmp_path)
    table = compare_runs(runs, tmp_path / "cmp")
    assert list(table["seed"]) == [0, 1]
    assert {"model", "dataset", "task", "de_auroc_per_gene", "de_genes_scored", "dir_auroc_per_gene"} <= set(
        table.columns
    )
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith("| run | model | dataset |")
    assert len(pd.read_csv(tmp_path / "cmp" / "comparison.csv")) == 2


def test_comparison_gives_intervals_and_paired_differences_against_the_reference(synthetic_cfg, tmp_path):
    runs = two_seeds(synthetic_cfg, tmp_path)
    table = compare_runs(runs, tmp_path / "cmp", reference=str(runs[1]), resamples=200)
    for task in ("de", "dir"):
        assert (table[f"{task}_auroc_per_gene_low"] <= table[f"{task}_auroc_per_gene"]).all()
        assert (table[f"{task}_auroc_per_gene"] <= table[f"{task}_auroc_per_gene_high"]).all()
        first, reference = table.iloc[0], table.iloc[1]
        # the reference run is compared with nobody; the other run's difference is its own minus the reference's
        assert math.isnan(reference[f"{task}_difference"]) and reference["reference"] == ""
        assert first["reference"] == str(runs[1])
        assert first[f"{task}_difference"] == pytest.approx(
            first[f"{task}_auroc_per_gene"] - reference[f"{task}_auroc_per_gene"]
        )
        assert first[f"{task}_difference_low"] <= first[f"{task}_difference"] <= first[f"{task}_difference_high"]
        assert 0 < first[f"{task}_p_value"] <= 1
    shown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "de per-gene AUROC [95%]" in shown and "de − reference [95%], p" in shown
    with pytest.raises(ValueError, match="reference=.* is not one of the compared runs"):
        compare_runs(runs, tmp_path / "cmp2", reference=str(tmp_path / "elsewhere"))


def test_a_run_compared_with_itself_differs_by_zero(synthetic_cfg, tmp_path):
    out = tmp_path / "run"
    train(synthetic_cfg("trainer.max_epochs=1", output_dir=out))
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    table = compare_runs([out, twin], tmp_path / "cmp", resamples=100)
    assert table.loc[1, "de_difference"] == 0.0 and table.loc[1, "de_p_value"] == 1.0


@pytest.mark.slow
def test_command_line_train_then_evaluate(tmp_path):
    """The README's commands, as a newcomer runs them; both scripts take the same logger= option."""
    run, out = tmp_path / "cli_run", tmp_path / "cli_eval"
    common = ["logger=none", "trainer.enable_progress_bar=false"]
    train_cmd = [sys.executable, "train.py", "data=synthetic", "trainer.max_epochs=2", f"hydra.run.dir={run}", *common]
    result = subprocess.run(train_cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/de_auroc_per_gene" in result.stdout
    eval_cmd = [
        sys.executable,
        "evaluate.py",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"hydra.run.dir={out}",
        *common,
    ]
    result = subprocess.run(eval_cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        json.loads((out / "metrics.json").read_text())["test/de_auroc_per_gene"]
        == json.loads((run / "metrics.json").read_text())["test/de_auroc_per_gene"]
    )
