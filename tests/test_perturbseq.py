"""Building PerturbQA task files from a Perturb-seq AnnData: planted DE genes, validation, training, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import require_module as require

require("scanpy", "the screen builder needs the 'screen' extra (scanpy, anndata)")
import anndata  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from perturb_models.data.perturbqa import load_task_tables, read_task_file  # noqa: E402
from perturb_models.data.perturbseq import (  # noqa: E402
    PerturbseqError,
    build_task_files,
    detect_data_kind,
    main,
)
from perturb_models.training import train  # noqa: E402

N_GENES = 150
N_PERTS = 12
PLANTED_UP = 4
PLANTED_DOWN = 4


def make_screen(seed: int = 0, cells_per_pert: int = 50, control_cells: int = 200, tiny_pert_cells: int = 5):
    """Negative-binomial counts: each perturbation (named after a gene of the screen, which it knocks down)
    moves 4 genes up 4x and 4 genes down to 1/5; 'TINY' has too few cells. Returns (adata, planted)."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"GENE{i:03d}" for i in range(N_GENES)])
    base = np.exp(rng.normal(2.0, 0.6, size=N_GENES))  # mean counts per cell, ~2..30
    perts = genes[:N_PERTS]
    expressed = np.flatnonzero(base > 4.0)
    expressed = expressed[expressed >= N_PERTS]
    planted: dict[str, dict[str, int]] = {}
    blocks, labels = [], []
    dispersion = 10.0

    def cells(mean: np.ndarray, n: int) -> np.ndarray:
        size = rng.uniform(0.8, 1.2, size=(n, 1))  # library-size variation, removed by normalize_total
        mu = mean[None, :] * size
        return rng.negative_binomial(dispersion, dispersion / (dispersion + mu))

    blocks.append(cells(base, control_cells))
    labels += ["non-targeting"] * control_cells
    for i, pert in enumerate(perts):
        chosen = rng.choice(expressed, size=PLANTED_UP + PLANTED_DOWN, replace=False)
        mean = base.copy()
        mean[chosen[:PLANTED_UP]] *= 4.0
        mean[chosen[PLANTED_UP:]] *= 0.2
        mean[i] *= 0.1  # the CRISPRi target itself: excluded from the candidates
        planted[pert] = {**{genes[g]: 1 for g in chosen[:PLANTED_UP]}, **{genes[g]: 0 for g in chosen[PLANTED_UP:]}}
        blocks.append(cells(mean, cells_per_pert))
        labels += [pert] * cells_per_pert
    blocks.append(cells(base, tiny_pert_cells))
    labels += ["TINY"] * tiny_pert_cells
    counts = np.vstack(blocks).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels, "batch": "b1"}, index=[f"cell{i}" for i in range(len(labels))])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    return adata, planted


@pytest.fixture(scope="module")
def screen():
    return make_screen()


@pytest.fixture(scope="module")
def built(screen, tmp_path_factory):
    adata, planted = screen
    out = tmp_path_factory.mktemp("screen")
    path = out / "toy.h5ad"
    adata.write_h5ad(path)
    report = build_task_files(path, out / "tasks", name="toy", progress=False)
    return out / "tasks", report, planted


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_planted_up_and_down_genes_are_recovered_with_their_direction(screen, tmp_path, method):
    adata, planted = screen
    report = build_task_files(adata, tmp_path, name="toy", method=method, progress=False)
    de = pd.read_csv(report.de_path)
    direction = pd.read_csv(report.dir_path).set_index(["pert", "gene"])["label"]
    called = de.loc[de["label"] == 1].set_index(["pert", "gene"]).index
    truth = {(p, g): up for p, genes in planted.items() for g, up in genes.items()}
    missed = [pair for pair in truth if pair not in called]
    assert not missed, f"planted DE pairs not called: {missed[:5]}"
    wrong = [pair for pair, up in truth.items() if direction[pair] != up]
    assert not wrong, f"planted pairs with the wrong direction: {wrong[:5]}"
    false_calls = [pair for pair in called if pair not in truth]
    # 12 perturbations x ~140 unplanted genes tested; BH at 5% plus a fold-change floor keeps false calls
    # under 1% (some come from normalize_total: strong up genes shrink the rest).
    assert len(false_calls) <= 12, false_calls
    assert report.de_pairs == len(called) and report.up_pairs + report.down_pairs == report.de_pairs


def test_written_files_pass_the_framework_validation(built):
    folder, report, planted = built
    de = read_task_file(folder / "toy-de.csv", "de")
    tables = load_task_tables("toy", "joint", root=folder, allow_download=False)
    assert len(tables.de) == len(de) == report.pairs
    assert list(pd.read_csv(folder / "toy-de.csv").columns) == ["pert", "gene", "label", "split"]
    # Every DE pair has a direction row; negatives are sampled non-DE genes (at least as many as DE genes).
    assert len(tables.dir) == int(tables.de["label"].sum())
    per_pert = tables.de.groupby("pert")["label"].agg(["sum", "size"])
    assert (per_pert["size"] - per_pert["sum"] >= per_pert["sum"]).all()
    # The perturbed gene is never its own candidate, and splits are by perturbation.
    assert not (tables.de["pert"] == tables.de["gene"]).any()
    splits = tables.de.groupby("pert")["split"].nunique()
    assert (splits == 1).all()
    assert set(tables.de["split"]) == {"train", "test"}


def test_perturbation_with_too_few_cells_is_skipped_and_reported(built):
    folder, report, planted = built
    assert report.skipped_few_cells == {"TINY": 5}
    assert report.perturbations_tested == N_PERTS
    assert "TINY" not in set(pd.read_csv(folder / "toy-de.csv")["pert"])
    record = json.loads((folder / "toy-build.json").read_text())
    assert record["skipped_few_cells"] == {"TINY": 5}
    assert "TINY (5)" in report.summary()


def test_build_is_reproducible_for_a_seed_and_changes_with_another(screen, tmp_path):
    adata, _ = screen
    a = build_task_files(adata, tmp_path / "a", name="toy", progress=False, seed=3)
    b = build_task_files(adata, tmp_path / "b", name="toy", progress=False, seed=3)
    c = build_task_files(adata, tmp_path / "c", name="toy", progress=False, seed=4)
    text = lambda r: open(r.de_path).read()  # noqa: E731
    assert text(a) == text(b)
    assert text(a) != text(c)


def test_log_normalised_input_is_detected_and_gives_the_same_calls(screen, tmp_path):
    import scanpy as sc

    adata, _ = screen
    logged = adata.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    assert detect_data_kind(adata.X) == "counts"
    assert detect_data_kind(logged.X) == "log"
    from_counts = build_task_files(adata, tmp_path / "counts", name="toy", progress=False)
    from_log = build_task_files(logged, tmp_path / "log", name="toy", progress=False)
    assert from_log.data_kind == "log"
    assert open(from_counts.de_path).read() == open(from_log.de_path).read()


def test_missing_obs_column_names_the_columns_that_exist(screen, tmp_path):
    adata, _ = screen
    with pytest.raises(PerturbseqError, match=r"no column 'guide_target'.*perturbation, batch"):
        build_task_files(adata, tmp_path, name="toy", obs_key="guide_target", progress=False)


def test_no_control_cells_names_the_common_labels(screen, tmp_path):
    adata, _ = screen
    with pytest.raises(PerturbseqError, match=r"no control cells.*perturbation='ctrl'.*'non-targeting' \(200\)"):
        build_task_files(adata, tmp_path, name="toy", control="ctrl", progress=False)


def test_scaled_data_with_negative_values_is_refused(screen, tmp_path):
    adata, _ = screen
    scaled = adata.copy()
    scaled.X = scaled.X.toarray() - 1.0
    with pytest.raises(PerturbseqError, match="negative values"):
        build_task_files(scaled, tmp_path, name="toy", progress=False)


def test_cli_builds_files_and_reports_errors(built, tmp_path, capsys):
    folder, _, _ = built
    h5ad = folder.parent / "toy.h5ad"
    assert main(["build", str(h5ad), str(tmp_path), "--name", "cli", "--method", "t-test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data=custom data.name=cli" in out and "skipped (cells): TINY (5)" in out
    assert (tmp_path / "cli-de.csv").is_file() and (tmp_path / "cli-dir.csv").is_file()
    assert main(["build", str(h5ad), str(tmp_path), "--obs-key", "nope", "--no-progress"]) == 2
    assert "obs columns: perturbation, batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "--negatives-ratio" in capsys.readouterr().out


def test_custom_dataset_trains_on_the_built_files(built, synthetic_cfg, tmp_path):
    from tests.conftest import FAST_CPU, compose_config

    folder, report, _ = built
    cfg = compose_config(
        "train",
        [
            "data=custom",
            "data.name=toy",
            f"data.root={folder}",
            *FAST_CPU,
            "trainer.max_epochs=2",
            "data.batch_size=64",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert metrics["test/de_genes_scored"] > 0
    assert 0.0 <= metrics["test/de_auroc"] <= 1.0
    predictions = pd.read_csv(tmp_path / "run" / "predictions" / "test.csv")
    test_perts = set(pd.read_csv(report.de_path).query("split == 'test'")["pert"])
    assert set(predictions["pert"]) == test_perts
