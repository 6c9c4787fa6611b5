"""notebooks/results.ipynb runs top to bottom on real outputs of train() and compare_runs()."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require_module as require

nbformat = require("nbformat", "the notebook test needs the 'notebook' extra")
nbclient = require("nbclient", "the notebook test needs the 'notebook' extra")
require("matplotlib", "the notebook test needs the 'notebook' extra")

from perturb_models.evaluation import compare_runs  # noqa: E402
from perturb_models.training import train  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"


@pytest.fixture(scope="module")
def two_runs_and_comparison(tmp_path_factory):
    """Two tiny synthetic runs (different seeds and widths) and their comparison table."""
    from tests.conftest import FAST_CPU, compose_config

    base = tmp_path_factory.mktemp("results")
    runs = []
    for seed, hidden in ((0, 64), (1, 32)):
        out = base / f"mlp-seed{seed}"
        cfg = compose_config(
            "train",
            [
                "data=synthetic",
                *FAST_CPU,
                "trainer.max_epochs=2",
                f"seed={seed}",
                f"model.encoder.hidden_dim={hidden}",
                "data.synthetic.n_genes=120",
                "data.synthetic.n_perts=100",
            ],
            out,
        )
        train(cfg)
        runs.append(out)
    compare_runs(runs, base / "eval")
    return base, runs


def execute(parameters: dict[str, str], tmp_path: Path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    previous = {k: os.environ.get(k) for k in parameters}
    os.environ.update(parameters)  # the kernel inherits the environment: the notebook's env-var parameters
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        )
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs_of(notebook, kind: str) -> list:
    return [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if kind in o.get("data", {})
    ]


def test_results_notebook_runs_on_a_comparison_and_draws_every_figure(two_runs_and_comparison, tmp_path):
    base, runs = two_runs_and_comparison
    figures = tmp_path / "figures"
    notebook = execute(
        {"RESULTS_COMPARISON_DIR": str(base / "eval"), "RESULTS_RUN_DIRS": "", "RESULTS_FIGURES_DIR": str(figures)},
        tmp_path,
    )
    # Figures: per-gene AUROC boxes, their intervals, ROC curves, model-vs-model scatter (two runs).
    assert len(outputs_of(notebook, "image/png")) == 4
    assert sorted(p.name for p in figures.iterdir()) == [
        "per_gene_auroc.png",
        "per_gene_auroc_intervals.png",
        "per_gene_scatter.png",
        "roc_curves.png",
    ]
    html = "".join(o["data"]["text/html"] for o in outputs_of(notebook, "text/html"))
    for seed in (0, 1):  # runs are named by run.json (model · data-task · seed), not by their timestamp folder
        assert f"mlp · synthetic-joint · seed {seed}" in html
    assert "genes scored" in html


def test_documented_command_paths_are_relative_to_where_the_notebook_runs(two_runs_and_comparison, tmp_path):
    import subprocess

    # cd notebooks && RESULTS_COMPARISON_DIR=../<comparison> RESULTS_FIGURES_DIR=../<figures> jupyter-execute ...
    base, runs = two_runs_and_comparison
    figures = tmp_path / "figures"
    notebook = execute(
        {
            "RESULTS_COMPARISON_DIR": os.path.relpath(base / "eval", NOTEBOOK.parent),
            "RESULTS_RUN_DIRS": "",
            "RESULTS_FIGURES_DIR": os.path.relpath(figures, NOTEBOOK.parent),
        },
        tmp_path,
    )
    assert len(outputs_of(notebook, "image/png")) == 4 and len(list(figures.glob("*.png"))) == 4
    # The executed copy the docs write next to the notebook is ignored by git.
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/results_executed.ipynb"], cwd=NOTEBOOK.parents[1])
    assert ignored.returncode == 0


def test_results_notebook_reads_run_folders_without_a_comparison(two_runs_and_comparison, tmp_path):
    base, runs = two_runs_and_comparison
    notebook = execute(
        {"RESULTS_COMPARISON_DIR": "", "RESULTS_RUN_DIRS": str(runs[0]), "RESULTS_FIGURES_DIR": ""}, tmp_path
    )
    assert len(outputs_of(notebook, "image/png")) == 3  # boxes, intervals (bootstrapped here), ROC
    assert "One run only" in "".join(o["data"].get("text/markdown", "") for o in outputs_of(notebook, "text/markdown"))


def test_results_notebook_fails_loudly_when_predictions_do_not_match_metrics(two_runs_and_comparison, tmp_path):
    import json
    import shutil

    base, runs = two_runs_and_comparison
    tampered = tmp_path / "tampered"
    shutil.copytree(runs[0], tampered, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((tampered / "metrics.json").read_text())
    metrics["test/de_auroc_per_gene"] = 0.99
    (tampered / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="differs from metrics.json"):
        execute({"RESULTS_COMPARISON_DIR": "", "RESULTS_RUN_DIRS": str(tampered), "RESULTS_FIGURES_DIR": ""}, tmp_path)
