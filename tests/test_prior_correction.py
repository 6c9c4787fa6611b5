"""benchmarks/prior_correction.py: a prior=knn run's logits split into the kNN vote and the LLM's correction."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def analysis(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import prior_correction

    yield prior_correction
    sys.modules.pop("prior_correction", None)


@pytest.fixture
def prior_run(tmp_path, analysis):
    """A tiny lora_llama prior=knn run on synthetic data, trained a few steps at a large rate (so that its
    correction is far from zero)."""
    from quality import run_cell

    overrides = [
        "model.encoder.prior=knn",
        "data.test_genes=8",
        "data.val_genes=16",
        "data.max_train_perts=10",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.num_sanity_val_steps=0",
        "model.optimizer.lr=0.05",
        "model.scheduler.warmup_steps=1",
    ]
    run_cell("lora_llama_tiny", "synthetic", 0, "joint", overrides, tmp_path, "prior")
    return tmp_path / "prior"


def test_trained_mix_reproduces_the_run_and_alpha_is_chosen_on_validation(analysis, prior_run, tmp_path, monkeypatch):
    csv = tmp_path / "correction.csv"
    rows = pd.DataFrame(analysis.analyse(analysis.parse_args(["--csv", str(csv), "--run", str(prior_run)])))
    metrics = json.loads((prior_run / "metrics.json").read_text())
    steps = json.loads((prior_run / "run.json").read_text())["global_step"]
    assert steps > 0 and rows["steps"].eq(steps).all() and rows["model"].eq("lora_llama_tiny_prior").all()

    val = rows.loc[rows["split"] == "val"]
    grid = val.loc[val["mix"] == "grid"].set_index("alpha")
    assert sorted(grid.index) == sorted(analysis.ALPHAS)
    test = rows.loc[rows["split"] == "test"].set_index("mix")
    assert sorted(test.index) == ["chosen_on_val", "correction_only", "knn", "trained"]
    # alpha = 1 is the trained model: its figures are the run's own (one epoch: last.ckpt holds the weights
    # the run validated and tested).
    for task in ("de", "dir"):
        assert grid.loc[1.0, f"{task}_auroc_per_gene"] == pytest.approx(metrics[f"val/{task}_auroc_per_gene"], abs=1e-6)
        assert test.loc["trained", f"{task}_auroc_per_gene"] == pytest.approx(
            metrics[f"test/{task}_auroc_per_gene"], abs=1e-6
        )
    # The choice is the best validation mean of the grid, whatever the test figures say.
    mean = (grid["de_auroc_per_gene"] + grid["dir_auroc_per_gene"]) / 2
    assert test.loc["chosen_on_val", "alpha"] == mean.idxmax()
    assert (val["spread_correction"] > 0).all() and (val["spread_knn"] > 0).all()
    assert val["within_gene_corr"].between(-1, 1).all() and val["shift_correction"].notna().all()

    # The correction moves the figures: the grid is not flat (the run trained at a large rate).
    assert grid[["de_auroc_per_gene", "dir_auroc_per_gene"]].nunique().max() > 1

    # A rerun reads the logits kept in the run folder and supersedes its rows.
    assert sorted(p.name for p in (prior_run / "prior_correction").iterdir()) == [
        f"test_step{steps}.npz",
        f"val_step{steps}.npz",
    ]
    monkeypatch.setattr(analysis, "split_logits", lambda *a, **k: pytest.fail("logits recomputed"))
    analysis.main(["--csv", str(csv), "--run", str(prior_run)])
    assert len(pd.read_csv(csv)) == len(rows)

    # The docs block comes from the CSV: chosen alpha in bold, test figures only where the choice was made.
    doc = tmp_path / "llm.md"
    shutil.copy(REPO / "docs" / "llm.md", doc)
    analysis.main(["--csv", str(csv), "--table", "--doc", str(doc)])
    block = doc.read_text().split(analysis.BLOCK_BEGIN)[1].split(analysis.BLOCK_END)[0]
    assert f"**{test.loc['chosen_on_val', 'alpha']:g}** (chosen)" in block
    assert f"after {steps} steps" in block and "| correction alone |" in block and "On validation (mean" in block
    test_cells = [line for line in block.splitlines() if line.startswith("| ") and not line.endswith("| |")]
    assert len(test_cells) - 2 <= 4  # header, rule; then at most knn, trained, chosen and the correction alone

    # A validation-only analysis (--no-test) has a table too, its test cells empty.
    val_only = analysis.correction_table(pd.read_csv(csv).query("split == 'val'"))
    assert "not scored | not scored" in val_only and f"**{test.loc['chosen_on_val', 'alpha']:g}** (chosen)" in val_only


def test_a_run_without_the_prior_is_refused_in_one_line(analysis, tmp_path):
    from quality import run_cell

    overrides = ["data.test_genes=8", "data.val_genes=3", "data.max_train_perts=10", "trainer.max_epochs=1"]
    run_cell("lora_llama_tiny", "synthetic", 0, "joint", [*overrides, "trainer.limit_train_batches=1"], tmp_path, "p")
    with pytest.raises(SystemExit, match="not a model.encoder.prior=knn run"):
        analysis.main(["--csv", str(tmp_path / "c.csv"), "--run", str(tmp_path / "p")])


def test_within_gene_spread_is_zero_for_a_constant_shift_per_gene(analysis):
    genes = np.array([0, 0, 1, 1])
    same_within_gene = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert analysis.within_gene_spread(same_within_gene, genes) == pytest.approx(0.0)
    varied = same_within_gene.copy()
    varied[1] = [1.0, 0.0, 0.0]
    assert analysis.within_gene_spread(varied, genes) > 0


def test_llm_page_prior_correction_block_is_generated_from_its_csv(analysis):
    from quality import read_rows

    csv = REPO / "benchmarks" / "results" / "prior_correction.csv"
    text = (REPO / "docs" / "llm.md").read_text()
    expected = analysis.correction_table(read_rows(csv, analysis.COLUMNS))
    block = text.split(analysis.BLOCK_BEGIN)[1].split(analysis.BLOCK_END)[0]
    assert block.strip() == expected.strip(), (
        "docs/llm.md's prior-correction block differs from prior_correction.csv: run python "
        "benchmarks/prior_correction.py --csv benchmarks/results/prior_correction.csv --table"
    )


@pytest.mark.parametrize(
    "means, says",
    [
        ({0.0: 0.70, 0.5: 0.69, 1.0: 0.65}, "The vote alone is best"),
        ({0.0: 0.70, 0.5: 0.72, 1.0: 0.65}, "alpha 0.5 gives 0.720, above both"),
        ({0.0: 0.60, 0.5: 0.65, 1.0: 0.70}, "The trained scale or a larger one is best (alpha 1: 0.700)"),
    ],
)
def test_verdict_reads_the_validation_grid(analysis, means, says):
    mean = pd.Series(means)
    alone = pd.Series({"de_auroc_per_gene": 0.55, "dir_auroc_per_gene": 0.51})
    text = analysis.verdict(mean, float(mean.idxmax()), alone)
    assert says in text and f"knn {means[0.0]:.3f}" in text
    assert "correction alone 0.530" in text


def test_within_gene_correlation_ignores_what_genes_share(analysis):
    genes = np.array([0, 0, 0, 1, 1, 1])
    vote = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    gene_offsets = np.array([5.0, 5.0, 5.0, -5.0, -5.0, -5.0])
    assert analysis.within_gene_correlation(vote, -vote + gene_offsets, genes) == pytest.approx(-1.0)
    assert analysis.within_gene_correlation(vote, vote * 2 + gene_offsets, genes) == pytest.approx(1.0)
    assert np.isnan(analysis.within_gene_correlation(vote, gene_offsets, genes))  # no within-gene variation


def test_a_run_with_the_ranking_term_gets_its_own_rows(analysis):
    from omegaconf import OmegaConf

    plain = OmegaConf.create({"model": {"name": "lora_llama", "rank_weight": 0.0}})
    ranked = OmegaConf.create({"model": {"name": "lora_llama", "rank_weight": 1.0}})
    older = OmegaConf.create({"model": {"name": "lora_llama"}})  # a run recorded before the option existed
    assert analysis.variant_name(plain) == analysis.variant_name(older) == "lora_llama_prior"
    assert analysis.variant_name(ranked) == "lora_llama_prior_rank"
