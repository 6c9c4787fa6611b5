"""model=ensemble: members trained through train(), weights fitted on validation only, checkpoint round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perturb_models.data.synthetic import make_synthetic_tables
from perturb_models.evaluation import evaluate_checkpoint, find_checkpoint
from perturb_models.models.ensemble import fit_convex_weights
from perturb_models.training import train
from tests.conftest import FAST_CPU, compose_config

# Two cheap members that need no knowledge files: the learned-embedding MLP and the random-vector control.
TWO_MEMBERS = [
    "model=ensemble",
    "model.encoder.members=[mlp,random_embedding]",
    "+model@model.encoder.catalog.random_embedding=random_embedding",
]


def ensemble_cfg(run_dir, *overrides):
    return compose_config(
        "train", [*TWO_MEMBERS, "data=synthetic", *FAST_CPU, "trainer.max_epochs=2", *overrides], run_dir
    )


def weights_of(run_dir) -> torch.Tensor:
    checkpoint = torch.load(find_checkpoint(run_dir), map_location="cpu", weights_only=False)
    return checkpoint["state_dict"]["encoder.weights"]


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ensemble") / "run"
    metrics = train(ensemble_cfg(run))
    return run, metrics


def test_convex_weights_favour_the_informative_member_and_one_member_gets_all():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=2000)
    informative = np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.05, size=2000)
    noise = rng.uniform(0.05, 0.95, size=2000)
    weights = fit_convex_weights(np.clip(np.stack([noise, informative], axis=1), 0.01, 0.99), labels)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[1] > 0.9
    assert fit_convex_weights(noise[:, None], labels).tolist() == [1.0]


def test_ensemble_trains_members_into_its_run_and_checkpoints_members_and_weights(ensemble_run):
    run, metrics = ensemble_run
    for member in ("mlp", "random_embedding"):
        assert (run / "members" / member / "checkpoints" / "best.ckpt").is_file()
        assert json.loads((run / "members" / member / "run.json").read_text())["model"] == member
    assert 0.0 <= metrics["test/de_auroc_per_gene"] <= 1.0 and 0.0 <= metrics["test/dir_auroc_per_gene"] <= 1.0
    state = torch.load(find_checkpoint(run), map_location="cpu", weights_only=False)["state_dict"]
    assert bool(state["encoder.fitted"])
    assert any(k.startswith("encoder.members.mlp.") for k in state)
    assert any(k.startswith("encoder.members.random_embedding.") for k in state)
    weights = state["encoder.weights"]
    assert weights.shape == (2, 2)  # (DE, direction) x members
    assert torch.allclose(weights.sum(1), torch.ones(2, dtype=weights.dtype)) and (weights >= 0).all()
    table = json.loads((run / "ensemble_weights.json").read_text())
    assert table["de"]["mlp"] == pytest.approx(float(weights[0, 0]))
    for name in ("metrics.json", "predictions/test.csv", "predictions/val.csv"):
        assert (run / name).is_file()


def test_a_resumed_ensemble_reuses_its_finished_members(tmp_path):
    run = tmp_path / "run"
    first = train(ensemble_cfg(run, "trainer.max_epochs=1"))
    member_ckpt = run / "members" / "mlp" / "checkpoints" / "best.ckpt"
    written = member_ckpt.stat().st_mtime_ns
    again = train(ensemble_cfg(run, "trainer.max_epochs=1", "ckpt_path=last"))
    assert member_ckpt.stat().st_mtime_ns == written, "a finished member was trained again"
    assert again["test/de_auroc_per_gene"] == first["test/de_auroc_per_gene"]


def test_members_are_not_trained_inside_a_multi_process_run(tmp_path):
    from perturb_models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot train member 'mlp' inside a multi-process run.*member_runs\.mlp"):
        train(ensemble_cfg(tmp_path / "run", "trainer=ddp_sim"))
    assert not (tmp_path / "run" / "members" / "mlp" / "checkpoints").exists()


def test_comparison_below_a_folder_counts_the_ensemble_once_not_its_members(ensemble_run):
    from perturb_models.results import find_run_dirs

    run, _ = ensemble_run
    assert find_run_dirs([run.parent]) == [run]


def test_evaluate_rebuilds_the_ensemble_from_its_checkpoint_with_identical_metrics(ensemble_run, tmp_path):
    run, metrics = ensemble_run
    cfg = compose_config("evaluate", [f"ckpt_path={run}", "trainer.enable_progress_bar=false"], tmp_path / "eval")
    again = evaluate_checkpoint(cfg.ckpt_path, tmp_path / "eval", cfg.trainer)
    for key, value in metrics.items():
        if key.startswith("test/"):
            assert again[key] == pytest.approx(value, abs=1e-9), key
    first = pd.read_csv(run / "predictions" / "test.csv")
    second = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv")
    np.testing.assert_allclose(first["score"], second["score"], atol=1e-7)


def test_ensemble_over_finished_member_runs_reuses_them_with_the_same_weights(ensemble_run, tmp_path):
    run, metrics = ensemble_run
    reused = tmp_path / "reused"
    again = train(
        ensemble_cfg(
            reused,
            f"+model.encoder.member_runs.mlp={run / 'members' / 'mlp'}",
            f"+model.encoder.member_runs.random_embedding={run / 'members' / 'random_embedding'}",
        )
    )
    assert not (reused / "members").exists()  # nothing retrained
    assert torch.equal(weights_of(reused), weights_of(run))
    assert again["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"], abs=1e-9)


def test_member_run_with_another_recipe_is_refused(ensemble_run, tmp_path):
    run, _ = ensemble_run
    with pytest.raises(ValueError, match="another encoder config than model.encoder.catalog.mlp"):
        train(
            ensemble_cfg(
                tmp_path / "r",
                "model.encoder.members=[mlp]",
                "model.encoder.catalog.mlp.encoder.hidden_dim=32",
                f"+model.encoder.member_runs.mlp={run / 'members' / 'mlp'}",
            )
        )


@pytest.mark.parametrize("combiner", ["loglik", "rank"])
def test_ensemble_of_one_member_reproduces_that_members_predictions(tmp_path, combiner):
    run = tmp_path / "one"
    train(ensemble_cfg(run, "model.encoder.members=[mlp]", f"model.encoder.combiner={combiner}"))
    assert weights_of(run).tolist() == [[1.0], [1.0]]
    ours = pd.read_csv(run / "predictions" / "test.csv")
    member = pd.read_csv(run / "members" / "mlp" / "predictions" / "test.csv")
    merged = ours.merge(member, on=["pert", "gene", "task", "label"], suffixes=("", "_member"), validate="one_to_one")
    assert len(merged) == len(ours) == len(member)
    np.testing.assert_allclose(merged["score"], merged["score_member"], atol=1e-5)


def test_unknown_member_is_a_clear_error(tmp_path):
    cfg = ensemble_cfg(tmp_path / "bad", "model.encoder.members=[mlp,nosuchmodel]")
    with pytest.raises(ValueError, match="lists 'nosuchmodel', which is not in model.encoder.catalog"):
        train(cfg)


def write_task_files(folder, name, de, dir_):
    folder.mkdir(parents=True, exist_ok=True)
    de.to_csv(folder / f"{name}-de.csv", index=False)
    dir_.to_csv(folder / f"{name}-dir.csv", index=False)


@pytest.mark.slow
def test_ensemble_weights_do_not_change_when_test_labels_change(tmp_path):
    de, dir_ = make_synthetic_tables(n_genes=120, n_perts=96, negatives_per_pert=20, seed=3)
    write_task_files(tmp_path / "clean", "toy", de, dir_)
    # Poison the test split only: half of its non-DE pairs become DE, every test direction flips.
    rng = np.random.default_rng(0)
    poisoned_de, poisoned_dir = de.copy(), dir_.copy()
    test_dir = poisoned_dir["split"] == "test"
    poisoned_dir.loc[test_dir, "label"] = 1 - poisoned_dir.loc[test_dir, "label"]
    flip = poisoned_de.index[(poisoned_de["split"] == "test") & (poisoned_de["label"] == 0)]
    flip = rng.choice(flip, size=len(flip) // 2, replace=False)
    poisoned_de.loc[flip, "label"] = 1
    # A DE pair needs a direction: the new ones get a random one.
    added = poisoned_de.loc[flip, ["pert", "gene", "split"]].assign(label=rng.integers(0, 2, size=len(flip)))
    poisoned_dir = pd.concat([poisoned_dir, added[["pert", "gene", "label", "split"]]], ignore_index=True)
    write_task_files(tmp_path / "poisoned", "toy", poisoned_de, poisoned_dir)

    results = {}
    for variant in ("clean", "poisoned"):
        run = tmp_path / f"run-{variant}"
        cfg = compose_config(
            "train",
            [
                *TWO_MEMBERS,
                "data=custom",
                "data.name=toy",
                f"data.root={tmp_path / variant}",
                *FAST_CPU,
                "trainer.max_epochs=2",
            ],
            run,
        )
        results[variant] = (train(cfg), weights_of(run))
    (clean, clean_weights), (poisoned, poisoned_weights) = results["clean"], results["poisoned"]
    assert torch.equal(clean_weights, poisoned_weights)
    assert clean["val/de_auroc_per_gene"] == poisoned["val/de_auroc_per_gene"]
    assert clean["test/dir_auroc_per_gene"] != poisoned["test/dir_auroc_per_gene"]  # the poison reached the test split


def ranking_versus_likelihood(seed: int = 0, genes: int = 40, perts: int = 60):
    """Two members that disagree: ``calibrated`` knows each gene's base rate (good log-likelihood) but ranks
    the perturbations within a gene at random; ``ranker`` ranks within each gene almost perfectly, but its
    probabilities carry a random per-gene offset and are overconfident (poor log-likelihood)."""
    rng = np.random.default_rng(seed)
    gene = np.repeat(np.arange(genes), perts)
    pert = np.tile(np.arange(perts), genes)
    rate = rng.uniform(0.05, 0.6, genes)[gene]
    label = (rng.random(len(gene)) < rate).astype(np.int64)
    calibrated = np.clip(rate + rng.normal(0, 0.02, len(gene)), 0.01, 0.99)
    offset = rng.normal(0, 4, genes)[gene]
    ranker = 1 / (1 + np.exp(-(offset + 3 * (label - 0.5) + rng.normal(0, 1.0, len(gene)))))
    return np.stack([calibrated, ranker], axis=1), label, gene, pert


def test_the_rank_combiner_chooses_the_per_gene_ranking_where_log_likelihood_would_not():
    from perturb_models.metrics import auroc_per_gene
    from perturb_models.models.ensemble import combine, fit_rank_weights

    scores, label, gene, _ = ranking_versus_likelihood()
    loglik = fit_convex_weights(scores, label)
    rank = fit_rank_weights(scores, label, gene)
    assert loglik[0] > 0.5  # the likelihood prefers the calibrated member...
    assert rank[1] > 0.8 and rank.sum() == pytest.approx(1.0) and (rank >= 0).all()  # ...the surrogate the ranker
    by_rank = auroc_per_gene(label, combine(scores, rank, "rank"), gene)[0]
    by_loglik = auroc_per_gene(label, combine(scores, loglik, "loglik"), gene)[0]
    assert by_rank > by_loglik + 0.05


def test_the_guard_falls_back_to_the_best_member_where_the_combination_ranks_worse():
    from perturb_models.models.ensemble import guarded_report

    scores, label, gene, pert = ranking_versus_likelihood(seed=1)
    report = guarded_report("de", scores, label, gene, pert, ["calibrated", "ranker"], "loglik")
    assert report["best_member"] == "ranker" and report["difference"][0] < 0
    assert report["fallback"] == "ranker"
    assert report["members"]["ranker"] > report["ensemble_crossfit"]
    assert (
        guarded_report("de", scores, label, gene, pert, ["calibrated", "ranker"], "loglik", guard=False)["fallback"]
        is None
    )
    # The rank combination all but keeps the ranker's ranking: within the noise of it, far above loglik's.
    ranked = guarded_report("de", scores, label, gene, pert, ["calibrated", "ranker"], "rank")
    low, high = ranked["difference"][1:3]
    assert low < 0 < high and ranked["ensemble_crossfit"] > report["ensemble_crossfit"] + 0.05


def test_the_guard_and_the_predictions_agree(ensemble_run):
    run, _ = ensemble_run
    table = json.loads((run / "ensemble_weights.json").read_text())
    assert table["combiner"] == "rank" and table["guard"] is True
    ours = pd.read_csv(run / "predictions" / "test.csv")
    for task in ("de", "dir"):
        report = table["validation"][task]
        assert set(report["members"]) == {"mlp", "random_embedding"}
        assert len(report["difference"]) == 4
        if report["fallback"] is not None:  # that member answers alone for the task
            member = pd.read_csv(run / "members" / report["fallback"] / "predictions" / "test.csv")
            merged = ours.loc[ours["task"] == task].merge(
                member, on=["pert", "gene", "task", "label"], suffixes=("", "_m")
            )
            np.testing.assert_allclose(merged["score"], merged["score_m"], atol=1e-5)
