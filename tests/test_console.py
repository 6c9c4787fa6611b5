"""What a user sees: the project's --help, one line per epoch in redirected output, everything in
train.log (test metrics and errors included), none of the known noise."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from perturb_models.training import train
from tests.conftest import REPO

EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+)  train/loss \d\.\d{4}  val/de_auroc_per_gene \d\.\d{4}  "
    r"val/dir_auroc_per_gene \d\.\d{4}  elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d"
)


def run_cli(args, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WANDB_SILENT")}
    environment.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", **env)
    # stdout is a pipe, as under nohup, SLURM or CI
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


def test_help_is_the_projects_own(tmp_path):
    proc = run_cli(["train.py", "--help"])
    assert proc.returncode == 0
    for text in (
        "perturb_models: train and compare models for the PerturbQA benchmark",
        "python train.py data=synthetic",
        "ckpt_path=last",
        "python evaluate.py",
        "outputs/<task>/<data>-<task>-<model>/<time>/",
        "gat, gat_text, gears",
        "data: _files, base, custom, hepg2, jurkat, k562",
    ):
        assert text in proc.stdout, text
    assert "Powered by Hydra" not in proc.stdout


def test_epoch_line_has_loss_validation_metrics_elapsed_and_eta(synthetic_cfg, caplog, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="perturb_models.progress"):
        train(synthetic_cfg("trainer.max_epochs=2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "perturb_models.progress"]
    assert [EPOCH_LINE.match(line).group(1, 2) for line in lines] == [("1", "2"), ("2", "2")], lines


@pytest.mark.slow
def test_redirected_run_prints_epoch_lines_and_train_log_holds_everything_including_errors(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["train.py", "data=synthetic", "logger=wandb", "trainer.max_epochs=2", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert len(EPOCH_LINE.findall(console)) == 2
    for noise in ("_pytree", "LeafSpec", "litlogger", "litmodels", "anonymous setting", "Tip:"):
        assert noise not in console, noise
    assert console.count(f"wandb sync {run}") == 1, "the sync command once (W&B prints it), not twice"
    log = (run / "train.log").read_text()
    assert len(EPOCH_LINE.findall(log)) == 2
    assert "Test metrics:" in log and re.search(r"test/de_auroc_per_gene\s+\d\.\d{4}", log)
    assert "`Trainer.fit` stopped" in log, "Lightning's own lines reach train.log too"

    # An error after the run started is in train.log as well (here: resuming it with another seed).
    proc = run_cli(["train.py", "data=synthetic", "logger=none", "ckpt_path=last", "seed=1", f"hydra.run.dir={run}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "belongs to a different run: seed: 0 -> 1" in (run / "train.log").read_text()


def test_load_report_is_dropped_only_when_the_new_classification_head_is_all_that_is_missing():
    from perturb_models.console import _DropNewHeadReport

    def record(rows):
        table = "Key          | Status  | \n-------------+---------+-\n" + "".join(f"{k} | {s} | \n" for k, s in rows)
        message = f"\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: smollm2\n{table}\nNotes: ..."
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, None, None)

    keep = _DropNewHeadReport().filter
    assert not keep(record([("score.weight", "MISSING")]))
    assert keep(record([("score.weight", "MISSING"), ("model.layers.0.mlp.up_proj.weight", "MISSING")]))
    assert keep(record([("score.weight", "UNEXPECTED")]))
    assert keep(logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, "other warning", None, None))
