"""Choosing the next screen: the strategies on small arrays, the retrospective simulation end to end on the
synthetic data (its full-pool round equals train.py's knn), and design.py on a knn checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from perturb_models.design import (
    DesignError,
    GOSimilarity,
    binary_entropy,
    design,
    mean_entropy,
    pick_farthest_first,
    pick_representative,
    select_batch,
)
from tests.conftest import REPO, compose_config
from tests.test_predict import _train, query_world  # noqa: F401  (fixture: knowledge for the synthetic genes)


def _benchmark():
    """benchmarks/design.py (loaded by path: the repository root's design.py is the command)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("design_benchmark", REPO / "benchmarks" / "design.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- strategies ---------------------------------------------------------------------------------


def _similarity(*sets):
    return GOSimilarity([frozenset(s) if s is not None else None for s in sets])


def test_farthest_first_picks_the_least_covered_and_leaves_unannotated_for_last():
    # item 0 measured {a,b}; 1 = same terms (covered 1.0), 2 shares a (1/3), 3 shares nothing, 4 no GO
    sim = _similarity({"a", "b"}, {"a", "b"}, {"a", "c"}, {"x", "y"}, None)
    picks, coverage = pick_farthest_first(sim, np.array([1, 2, 3, 4]), np.array([0]), 4)
    assert [int(p) for p in picks] == [2, 1, 0, 3]  # positions in the pool: items 3, 2, 1, then 4 (no GO)
    np.testing.assert_allclose(coverage[:3], [0.0, 1 / 3, 1.0])


def test_farthest_first_updates_coverage_after_each_pick():
    # 1 and 2 are alike (2/3): once 1 is picked, 2 is covered and 3 (alike to nothing) comes before it
    sim = _similarity({"a"}, {"x", "y"}, {"x", "y", "z"}, {"p"})
    picks, _ = pick_farthest_first(sim, np.array([1, 2, 3]), np.array([0]), 3)
    assert [int(p) for p in picks] == [0, 2, 1]


def test_representative_picks_the_candidate_that_stands_for_most():
    # 1 is alike to 2 and 3 (2/3 each): measuring it covers three candidates; then 4 (alike to nothing)
    sim = _similarity({"a"}, {"x", "y"}, {"x", "y", "z"}, {"x", "y", "w"}, {"p"})
    picks, gains = pick_representative(sim, np.array([1, 2, 3, 4]), np.array([0]), 4)
    assert [int(p) for p in picks] == [0, 3, 1, 2]
    np.testing.assert_allclose(gains, [1 + 2 / 3 + 2 / 3, 1.0, 1 / 3, 1 / 3], rtol=1e-6)


def test_uncertainty_picks_the_highest_mean_entropy():
    # 3 candidates x 2 target genes, task de: the middle one is at p = 0.5 for both genes
    scores = {"de": np.array([0.05, 0.1, 0.5, 0.5, 0.9, 0.2])}
    u = mean_entropy(scores, 3, 2)
    assert u.argmax() == 1 and u[1] == pytest.approx(1.0)
    chosen = select_batch("uncertainty", 2, np.arange(3), np.array([], dtype=int), uncertainty=u)
    assert list(chosen) == [1, 2]


def test_joint_entropy_is_the_three_class_entropy():
    p_de, up = np.array([0.3, 0.8]), np.array([0.6, 0.1])
    from perturb_models.design import pair_entropy

    probs = np.stack([1 - p_de, p_de * (1 - up), p_de * up], axis=1)
    direct = -(probs * np.log2(probs)).sum(axis=1)
    np.testing.assert_allclose(pair_entropy({"de": p_de, "dir": up}), direct)
    assert binary_entropy(np.array([0.0, 1.0])).tolist() == [0.0, 0.0]


def test_random_is_seeded_distinct_and_never_measured():
    pool, measured = np.arange(50), np.arange(0, 50, 3)
    first = select_batch("random", 20, pool, measured, rng=np.random.default_rng(7))
    again = select_batch("random", 20, pool, measured, rng=np.random.default_rng(7))
    other = select_batch("random", 20, pool, measured, rng=np.random.default_rng(8))
    assert list(first) == list(again) and list(first) != list(other)
    for batch in (first, other):
        assert len(set(batch)) == 20 and not set(pool[batch]) & set(measured)


@pytest.mark.parametrize("strategy", ["uncertainty", "coverage", "mix", "representative"])
def test_every_strategy_gives_a_distinct_batch_outside_the_measured(strategy):
    rng = np.random.default_rng(0)
    sets = [frozenset(rng.choice(list("abcdefghij"), size=3, replace=False)) for _ in range(40)]
    sim = GOSimilarity(sets)
    measured = np.arange(10)
    chosen = select_batch(strategy, 12, np.arange(40), measured, uncertainty=rng.random(40), similarity=sim)
    assert len(chosen) == 12 and len(set(chosen)) == 12 and not set(chosen) & set(measured)


def test_mix_ends_are_coverage_and_uncertainty():
    rng = np.random.default_rng(1)
    sim = GOSimilarity([frozenset(rng.choice(list("abcdefgh"), size=2, replace=False)) for _ in range(30)])
    u, pool, measured = rng.random(30), np.arange(30), np.arange(5)
    kw = dict(uncertainty=u, similarity=sim)
    assert list(select_batch("mix", 8, pool, measured, weight=0.0, **kw)) == list(
        select_batch("coverage", 8, pool, measured, **kw)
    )
    assert list(select_batch("mix", 8, pool, measured, weight=1.0, **kw)) == list(
        select_batch("uncertainty", 8, pool, measured, **kw)
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: select_batch("greedy", 3, np.arange(5), np.array([0])), "strategy=greedy: unknown"),
        (lambda: select_batch("random", 0, np.arange(5), np.array([0])), "size=0"),
        (lambda: select_batch("random", 2, np.arange(3), np.arange(3)), "pool of candidates is empty"),
    ],
)
def test_bad_requests_are_one_line_errors(call, message):
    with pytest.raises(DesignError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


# ---- the retrospective simulation ------------------------------------------------------------------


def test_simulation_end_to_end_resumes_and_its_full_pool_round_is_train_py_knn(synthetic_cfg, query_world, tmp_path):  # noqa: F811
    sim = _benchmark()

    knowledge = f"knowledge.root={query_world['knowledge']}"
    csv = tmp_path / "design.csv"
    strategies = ["random", "uncertainty", "coverage", "mix:0.5", "representative"]
    fractions = (0.25, 0.5, 1.0)
    scored = sim.simulate("synthetic", 0, strategies, fractions, target_genes=20, csv=csv, overrides=[knowledge])
    assert scored == len(strategies) * len(fractions)
    rows = pd.read_csv(csv)
    assert len(rows) == scored * 2 and set(rows["task"]) == {"de", "dir"}
    assert not rows[["val_auroc_per_gene", "test_auroc_per_gene"]].isna().any().any()
    # Each strategy measures the same share of the pool each round, starting from the same seeded set.
    assert rows.groupby(["round"])["n_perts"].nunique().eq(1).all()
    start = rows.loc[rows["round"] == 0].groupby("task")["test_auroc_per_gene"].nunique()
    assert start.eq(1).all()
    # The full pool: every strategy has measured everything, and the refit is train.py's knn.
    full = rows.loc[rows["fraction"] == 1.0]
    assert full.groupby("task")["test_auroc_per_gene"].nunique().eq(1).all()
    from perturb_models.training import train

    run = tmp_path / "knn_run"
    train(synthetic_cfg("model=knn", knowledge, "trainer.max_epochs=1", output_dir=run))
    metrics = json.loads((run / "metrics.json").read_text())
    for task in ("de", "dir"):
        row = full.loc[full["task"] == task].iloc[0]
        assert row["test_auroc_per_gene"] == pytest.approx(metrics[f"test/{task}_auroc_per_gene"], abs=1e-12)
        assert row["val_auroc_per_gene"] == pytest.approx(metrics[f"val/{task}_auroc_per_gene"], abs=1e-12)
    # Rerun: nothing left to score. Remove a middle round of one strategy: only that trajectory is replayed,
    # and the replay scores the same figures.
    assert sim.simulate("synthetic", 0, strategies, fractions, target_genes=20, csv=csv, overrides=[knowledge]) == 0
    dropped = (rows["strategy"] == "uncertainty") & (rows["round"] == 1)
    rows.loc[~dropped].to_csv(csv, index=False)
    assert sim.simulate("synthetic", 0, strategies, fractions, target_genes=20, csv=csv, overrides=[knowledge]) == 1
    again = pd.read_csv(csv)
    redone = again.loc[(again["strategy"] == "uncertainty") & (again["round"] == 1)].sort_values("task")
    np.testing.assert_allclose(
        redone["test_auroc_per_gene"], rows.loc[dropped].sort_values("task")["test_auroc_per_gene"]
    )
    # The document and its plot come from the CSV.
    doc, plot = tmp_path / "design.md", tmp_path / "design.png"
    text = sim.write_doc(csv, doc, plot)
    assert "reaches random's 100% at" in text and "### synthetic, de" in text and plot.stat().st_size > 1000
    assert doc.read_text().count("design-results:start") == 1


# ---- the command -----------------------------------------------------------------------------------


def _design(run, out, *overrides):
    return design(compose_config("design", [f"ckpt_path={run}", *overrides], out))


def test_design_proposes_unmeasured_knockdowns_by_each_strategy(synthetic_cfg, query_world, tmp_path):  # noqa: F811
    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    split = json.loads((run / "split.json").read_text())
    dataset_perts = set(split["train_perts"]) | set(split["val_perts"]) | set(split["test_perts"])
    frames = {}
    for strategy in ("random", "uncertainty", "coverage", "mix", "representative"):
        out = tmp_path / strategy
        frame = _design(run, out, "perts=all_known", f"strategy={strategy}", "size=6", "measured=[SYN0199]")
        frames[strategy] = frame
        written = pd.read_csv(out / "proposal.csv")
        assert len(written) == 6 and written["pert"].is_unique and list(written["rank"]) == list(range(1, 7))
        assert not set(written["pert"]) & (dataset_perts | {"SYN0199"})
        summary = json.loads((out / "design.json").read_text())
        assert summary["strategy"] == strategy and summary["measured"] == len(dataset_perts | {"SYN0199"})
    u = frames["uncertainty"]["mean_entropy_bits"].to_numpy()
    assert (np.diff(u) <= 0).all() and u[0] == pytest.approx(frames["uncertainty"]["mean_entropy_bits"].max())
    assert frames["uncertainty"]["entropy_percentile"].iloc[0] == 1.0
    cover = frames["coverage"]
    at_pick = cover["go_similarity_at_pick"].dropna().to_numpy()
    assert (np.diff(at_pick) >= -1e-12).all()  # farthest first: each pick at most as covered as the next
    assert cover["go_annotated"].iloc[0]


def test_design_command_line_bad_requests_are_one_line(synthetic_cfg, query_world, tmp_path):  # noqa: F811
    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    measured = json.loads((run / "split.json").read_text())["train_perts"][0]
    for overrides, words in (
        (["perts=all_known", "strategy=greedy"], "strategy=greedy: unknown"),
        (["perts=all_known", "size=0"], "size=0"),
        ([f"perts=[{measured}]"], "pool of candidates is empty"),
    ):
        result = subprocess.run(
            [sys.executable, "design.py", f"ckpt_path={run}", *overrides, f"hydra.run.dir={tmp_path / 'cli'}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and words in errors[0], errors
    help_text = subprocess.run(
        [sys.executable, "design.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    ).stdout
    for words in ("strategy", "uncertainty | coverage | representative | mix", "proposal.csv", "docs/design.md"):
        assert words in help_text, words
