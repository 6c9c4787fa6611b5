"""Recipe selection reads validation figures only; the LOCO choice per held-out line; quality.py's CSV columns."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest

from perturb_models.selection import choose_recipe, loco_choices, recipe_scores, validation_view
from tests.conftest import REPO

LINES = ["k562", "rpe1", "hepg2", "k562_set"]


def load_quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result_rows() -> pd.DataFrame:
    """Two recipes on four lines: 'a' wins validation on k562/rpe1/hepg2, 'b' on k562_set and overall elsewhere."""
    val = {
        ("a", "k562"): 0.70,
        ("a", "rpe1"): 0.68,
        ("a", "hepg2"): 0.66,
        ("a", "k562_set"): 0.50,
        ("b", "k562"): 0.60,
        ("b", "rpe1"): 0.61,
        ("b", "hepg2"): 0.62,
        ("b", "k562_set"): 0.90,
    }
    rows = []
    for (recipe, line), v in val.items():
        for task in ("de", "dir"):
            rows.append(
                {
                    "model": "knn",
                    "recipe": recipe,
                    "dataset": line,
                    "task": task,
                    "seed": 0,
                    "val_auroc_per_gene": v,
                    "auroc_per_gene": 1.0 - v,
                    "genes_scored": 100,
                }
            )
    return pd.DataFrame(rows)


def test_validation_view_drops_every_test_figure():
    view = validation_view(result_rows())
    assert "auroc_per_gene" not in view.columns and "genes_scored" not in view.columns
    assert "val_auroc_per_gene" in view.columns


def test_loco_choice_uses_the_other_lines_validation():
    choices = loco_choices(result_rows(), "knn", LINES)
    # Held out k562: mean val over rpe1, hepg2, k562_set is a 0.613, b 0.710 -> b; held out k562_set: a.
    assert choices == {"k562": "b", "rpe1": "b", "hepg2": "b", "k562_set": "a"}


def test_poisoned_test_metrics_leave_every_choice_unchanged():
    rows = result_rows()
    clean = loco_choices(rows, "knn", LINES), choose_recipe(rows, "knn", LINES)
    for poison in (np.nan, 0.0, 1.0):
        poisoned = rows.copy()
        poisoned["auroc_per_gene"] = poison
        poisoned["genes_scored"] = -1
        assert (loco_choices(poisoned, "knn", LINES), choose_recipe(poisoned, "knn", LINES)) == clean
    # Test figures that would pick the other recipe everywhere change nothing either.
    inverted = rows.assign(auroc_per_gene=np.where(rows["recipe"] == "a", 0.99, 0.01))
    assert loco_choices(inverted, "knn", LINES) == clean[0]


def test_a_recipe_without_validation_on_every_line_is_not_chosen():
    rows = result_rows()
    rows.loc[(rows["recipe"] == "b") & (rows["dataset"] == "rpe1"), "val_auroc_per_gene"] = np.nan
    assert math.isnan(recipe_scores(rows, "knn", LINES)["b"])
    assert choose_recipe(rows, "knn", LINES) == "a"


def test_rows_without_validation_figures_cannot_be_selected_from():
    with pytest.raises(ValueError, match="no val_auroc_per_gene column"):
        choose_recipe(result_rows().drop(columns=["val_auroc_per_gene"]), "knn", LINES)


def test_old_quality_csv_reads_with_an_empty_validation_column(tmp_path):
    quality = load_quality()
    old = tmp_path / "quality.csv"
    old.write_text(
        "model,dataset,task,seed,auroc_per_gene,genes_scored,commit,wall_seconds,overrides\n"
        "knn,k562,de,0,0.65,665.0,abc1234,10.0,trainer.max_epochs=8\n"
    )
    rows = quality.read_rows(old)
    assert list(rows.columns) == quality.COLUMNS
    assert math.isnan(rows.loc[0, "val_auroc_per_gene"])
    new = {c: None for c in quality.COLUMNS} | {
        "model": "knn",
        "dataset": "k562",
        "task": "de",
        "seed": 0,
        "auroc_per_gene": 0.7,
        "val_auroc_per_gene": 0.6,
    }
    stored = quality.store_row(old, [new], quality.COLUMNS, ["model", "dataset", "task", "seed"])
    assert len(stored) == 1 and stored.loc[0, "val_auroc_per_gene"] == 0.6  # a rerun replaces the old row


def test_a_full_test_rerun_never_replaces_a_test_gene_subset_row(tmp_path):
    quality = load_quality()
    csv = tmp_path / "quality.csv"
    row = {c: None for c in quality.COLUMNS} | {"model": "knn", "dataset": "k562", "task": "de", "seed": 0}
    keys = ["model", "dataset", "task", "seed"]
    quality.store_row(
        csv,
        [row | {"auroc_per_gene": 0.68, "overrides": "data.task=joint data.test_genes=100 x=1"}],
        quality.COLUMNS,
        keys,
    )
    stored = quality.store_row(
        csv, [row | {"auroc_per_gene": 0.65, "overrides": "trainer.max_epochs=8"}], quality.COLUMNS, keys
    )
    assert sorted(stored["auroc_per_gene"]) == [0.65, 0.68]
    stored = quality.store_row(
        csv, [row | {"auroc_per_gene": 0.64, "overrides": "trainer.max_epochs=8"}], quality.COLUMNS, keys
    )
    assert sorted(stored["auroc_per_gene"]) == [0.64, 0.68]  # the full-test row is replaced, the subset row kept


def test_loco_table_reports_the_held_out_test_figure_of_the_validation_choice():
    quality = load_quality()
    rows = result_rows()
    table = quality.loco_table(rows)
    de = table.split("### LOCO, direction")[0]
    knn_row = next(line for line in de.splitlines() if line.startswith("| knn |"))
    # k562 held out: recipe b chosen, its k562 test figure is 1 - 0.60.
    assert "0.400 (1; b)" in knn_row and "0.500 (1; a)" in knn_row


def test_gene_set_namer_recipe_is_chosen_on_validation_rouge_only():
    spec = importlib.util.spec_from_file_location("gse_bench", REPO / "benchmarks" / "gse_quality.py")
    gse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gse)
    rows = pd.DataFrame(
        [
            {
                "method": "lora_llama_gse",
                "recipe": recipe,
                "kind": kind,
                "seed": 0,
                "val_rouge1_recall": val,
                "rouge1_recall": 1.0 - val,
            }
            for recipe, val in (("hide0", 0.40), ("hide50", 0.55), ("hide100", 0.50))
            for kind in ("gene", "pert")
        ]
    )
    assert gse.choose(rows, list(gse.SEARCH_STAGE1)) == "hide50"
    poisoned = rows.assign(rouge1_recall=np.where(rows["recipe"] == "hide0", 1.0, 0.0))
    assert gse.choose(poisoned, list(gse.SEARCH_STAGE1)) == "hide50"
    # A recipe writes out every searched option, so it names the same runs whatever the config's defaults.
    assert gse.namer_overrides("hide50_x4") == [
        "model.namer.hide_answer_train=0.5",
        "model.namer.train_examples=800",
        "model.namer.max_new_tokens=12",
        "model.namer.descriptions=null",
    ]
    assert gse.namer_overrides("hide0_x4_tok24")[1:3] == [
        "model.namer.train_examples=800",
        "model.namer.max_new_tokens=24",
    ]
    assert gse.search_stages(["v1", "hide0_x4_tok24", "hide50", "hide0", "hide0_x4"]) == [
        ["hide0", "hide50"],
        ["hide0_x4"],
        ["hide0_x4_tok24"],
    ]
    # Each seed draws its own validation examples: another seed's figure (here a high one) never sways the choice.
    other_seed = pd.concat([rows, rows.loc[rows["recipe"] == "hide0"].assign(seed=1, val_rouge1_recall=0.99)])
    assert gse.choose(other_seed, list(gse.SEARCH_STAGE1)) == "hide50"
    # Stage 2 scales the stage-1 recipes that 64 validation examples cannot tell from the best.
    close = rows.assign(val_rouge1_recall=rows["recipe"].map({"hide0": 0.395, "hide50": 0.40, "hide100": 0.30}))
    assert gse.near_best(close, list(gse.SEARCH_STAGE1)) == ["hide50", "hide0"]
    assert gse.near_best(rows, list(gse.SEARCH_STAGE1)) == ["hide50"]
    with pytest.raises(SystemExit, match="unknown recipe 'hide0_x4_tok99'"):
        gse.namer_overrides("hide0_x4_tok99")
    with pytest.raises(ValueError, match="not a validation column"):
        choose_recipe(
            rows.rename(columns={"method": "model"}).assign(dataset="k562_gse", task="gse"),
            "lora_llama_gse",
            ["k562_gse"],
            metric="rouge1_recall",
        )


def loco_rows_with_intervals(paired_knn: list[float], ensemble_ci: tuple[float, float]) -> pd.DataFrame:
    """knn, gears, embedding_mlp (one recipe each) and their ensemble on the four lines, DE only; knn is the
    best single model; the ensemble row carries its interval and its paired difference with each member."""
    figures = {"knn": 0.70, "gears": 0.65, "embedding_mlp": 0.60, "ensemble": 0.705}
    rows = []
    for line in LINES:
        for model, figure in figures.items():
            recipe = "knn:r+gears:r+embedding_mlp:r" if model == "ensemble" else "r"
            row = {
                "model": model,
                "recipe": recipe,
                "dataset": line,
                "task": "de",
                "seed": 0,
                "val_auroc_per_gene": 0.6,
                "auroc_per_gene": figure,
                "genes_scored": 100,
                "ci_low": figure - 0.02,
                "ci_high": figure + 0.02,
            }
            if model == "ensemble":
                row.update(
                    ci_low=ensemble_ci[0],
                    ci_high=ensemble_ci[1],
                    paired=json.dumps({"knn": paired_knn, "gears": [0.055, 0.03, 0.08, 0.001]}),
                )
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "paired_knn, verdict",
    [
        ([0.005, -0.004, 0.014, 0.3], "holds"),
        ([0.005, -0.02, 0.03, 0.6], "unsure"),
        ([-0.03, -0.045, -0.015, 0.001], "fails"),
    ],
)
def test_loco_goal_is_read_with_the_paired_interval_of_the_best_single_model(paired_knn, verdict):
    quality = load_quality()
    table = quality.loco_table(loco_rows_with_intervals(paired_knn, (0.68, 0.73)))
    row = next(
        line for line in table.split("### LOCO, direction")[0].splitlines() if line.startswith("| the same with")
    )
    cells = row.split(" | ")[1:]
    assert len(cells) == 4
    for cell in cells:
        # published best is fixed: the ensemble's own interval against +.03 above it; knn is the best single model
        assert f"vs knn [{paired_knn[1]:+.3f}, {paired_knn[2]:+.3f}]" in cell and cell.rstrip(" |").endswith(
            f"{verdict} (1/1)"
        )
    k562 = cells[0]  # published best .62: [.68 - .62, .73 - .62] = [+.060, +.110] lies above +.03
    assert k562.startswith("[+0.060, +0.110] holds")


def test_fill_intervals_reruns_only_rows_without_their_interval():
    quality = load_quality()
    rows = pd.DataFrame(
        {
            "task": ["de", "dir"],
            "ci_low": [0.6, math.nan],
            "ci_high": [0.7, math.nan],
            "paired": [json.dumps({"knn": [0, 0, 0, 1]}), math.nan],
        }
    )
    fill = type("Args", (), {"fill_intervals": True})()
    assert list(quality.complete(rows, fill)["task"]) == ["de"]
    assert list(quality.complete(rows, None)["task"]) == ["de", "dir"]  # without the flag nothing reruns
    assert list(quality.complete(rows.assign(paired=math.nan), fill, paired=True)["task"]) == []


def test_rerun_stale_reruns_only_knowledge_rows_made_with_an_older_symbol_resolution():
    quality = load_quality()
    rows = pd.DataFrame(
        {
            "model": ["knn", "knn", "mlp", "gears"],
            "task": ["de", "dir", "de", "de"],
            "resolution": [math.nan, quality.RESOLUTION_VERSION, math.nan, quality.RESOLUTION_VERSION - 1],
        }
    )
    stale = type("Args", (), {"rerun_stale": True})()
    # knn de: before the column (version 1); mlp reads no gene knowledge; gears: an older version
    assert list(quality.complete(rows, stale)["model"]) == ["knn", "mlp"]
    assert list(quality.complete(rows, stale)["task"]) == ["dir", "de"]
    assert len(quality.complete(rows, None)) == 4


def test_rerun_replaces_the_stored_rows_of_the_chosen_cells_with_their_own_overrides(tmp_path, monkeypatch):
    quality = load_quality()
    csv = tmp_path / "quality.csv"
    stored = [
        {
            "model": m,
            "dataset": "k562",
            "task": t,
            "seed": 0,
            "auroc_per_gene": 0.6,
            "overrides": f"x={m}",
            "resolution": quality.RESOLUTION_VERSION,
            "commit": "old",
        }
        for m in ("knn", "mlp")
        for t in ("de", "dir")
    ]
    quality.store_row(csv, stored, quality.COLUMNS, ["model", "dataset", "task", "seed"])
    calls = []

    def rerun(model, dataset, seed, task, extra, runs_dir, run_name=None):
        calls.append((model, task, extra))
        return [dict(stored[0], model=model, task=t, auroc_per_gene=0.7, commit="new") for t in ("de", "dir")], 1.0

    monkeypatch.setattr(quality, "run_cell", rerun)
    docs = [
        "--doc",
        str(tmp_path / "r.md"),
        "--loco-csv",
        str(tmp_path / "l.csv"),
        "--loco-doc",
        str(tmp_path / "l.md"),
    ]
    quality.main(["--models", "knn", "--datasets", "k562", "--seeds", "0", "--csv", str(csv), "--rerun", *docs])
    assert calls == [("knn", "joint", ["x=knn"])]  # up to date (--rerun-stale would skip it), rerun as stored
    rows = pd.read_csv(csv).set_index(["model", "task"])
    assert rows.loc[("knn", "de"), "commit"] == rows.loc[("knn", "dir"), "commit"] == "new" and len(rows) == 4
    assert (rows.loc["mlp", "commit"] == "old").all()


def test_the_ensemble_combiner_is_chosen_on_the_other_lines_cross_fitted_validation():
    quality = load_quality()
    rows = loco_rows_with_intervals([0.0, -0.01, 0.01, 0.5], (0.68, 0.73))
    rows = rows.loc[rows["model"] != "ensemble"]
    # rank wins validation on k562, rpe1 and hepg2; loglik only on k562_set (by far)
    val = {"k562": (0.60, 0.70), "rpe1": (0.60, 0.70), "hepg2": (0.60, 0.70), "k562_set": (0.95, 0.50)}
    ensembles = [
        {
            "model": "ensemble",
            "recipe": f"knn:r+gears:r+embedding_mlp:r@{combiner}",
            "dataset": line,
            "task": "de",
            "seed": 0,
            "val_auroc_per_gene": v[i],
            "auroc_per_gene": 1.0 - v[i],
            "genes_scored": 100,
        }
        for line, v in val.items()
        for i, combiner in enumerate(("loglik", "rank"))
    ]
    rows = pd.concat([rows, pd.DataFrame(ensembles)], ignore_index=True)
    # k562_set held out: rank has the better mean on the other three; k562 held out: loglik's k562_set lead wins
    assert quality.combiner_choice(rows, "k562_set") == "rank"
    assert quality.combiner_choice(rows, "k562") == "loglik"
    table = quality.loco_table(rows)
    ensemble_row = next(line for line in table.splitlines() if line.startswith("| ensemble |"))
    assert "@loglik" in ensemble_row.split(" | ")[1] and "@rank" in ensemble_row.split(" | ")[4]


def test_stale_loco_rows_are_counted_apart_from_superseded_ensembles_no_table_reads():
    quality = load_quality()
    rows = loco_rows_with_intervals([0.0, -0.01, 0.01, 0.5], (0.68, 0.73))
    rows = rows.loc[rows["model"] != "ensemble"].assign(resolution=quality.RESOLUTION_VERSION)
    members = quality.ensemble_recipe(quality.ensemble_choices(rows, "k562"))
    current = [
        {
            "model": "ensemble",
            "recipe": f"{members}@rank",
            "dataset": line,
            "task": task,
            "seed": 0,
            "val_auroc_per_gene": 0.7,
            "auroc_per_gene": 0.7,
            "genes_scored": 100,
            "resolution": quality.RESOLUTION_VERSION,
        }
        for line in ("k562", "rpe1", "hepg2", "k562_set")
        for task in ("de", "dir")
    ]
    # an ensemble over a knn recipe no choice names any more, made with the older resolution
    superseded = [
        {**row, "recipe": "knn:other+gears:r+embedding_mlp:r@rank", "resolution": float("nan")} for row in current
    ]
    rows = pd.concat([rows, pd.DataFrame(current + superseded)], ignore_index=True)
    text = quality.stale_loco_text(rows)
    assert text.startswith(f"{len(superseded)} older ensemble rows") and "no table here reads them" in text
    assert quality.loco_table(rows) == quality.loco_table(rows.iloc[: len(rows) - len(superseded)])
    # a stale search row is one the tables read: its rerun is pending
    rows.loc[rows.index[0], "resolution"] = float("nan")
    assert quality.stale_loco_text(rows).startswith(f"1 of {len(rows)} rows below were made with an older")
    assert quality.stale_loco_text(rows.iloc[: len(rows) - len(superseded)].assign(resolution=2)) == ""
