"""benchmarks/llm_curve.py: one LLM run per variant extended point by point, each point exactly a straight run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("peft")

from tests.conftest import REPO, start_script, wait_for


def curve_args(csv: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--csv",
        str(csv),
        "--data",
        "synthetic",
        "--model",
        "lora_llama_tiny",
        "--seeds",
        "0",
        "--prior-seeds",
        "0",
        "--block",
        "2",
        "--test-genes",
        "8",
        "--val-genes",
        "3",
        "--max-train-perts",
        "10",
        "--warmup-steps",
        "1",
        "--runs-dir",
        str(runs),
        *extra,
    ]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():  # tensors, and the encoder's record of its base
        assert torch.equal(value, b["state_dict"][name]) if torch.is_tensor(value) else value == b["state_dict"][name]
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][field])), (key, field)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture
def curve(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import llm_curve

    yield llm_curve
    for name in ("llm_curve", "llm_quality"):
        sys.modules.pop(name, None)


def test_curve_extends_one_run_exactly_resumes_skips_and_writes_the_docs(curve, tmp_path, capsys):
    from quality import run_cell

    csv, runs = tmp_path / "curve.csv", tmp_path / "runs"
    no_extension = ("--extend-to", "0")
    plain = runs / "lora_llama_tiny-synthetic-joint-seed0"

    # A curve stopped after its first point ...
    curve.main(curve_args(csv, runs, "--steps", "2", *no_extension))
    assert checkpoint(plain)["global_step"] == 2
    # ... goes on from that run's checkpoint: the 2-step point is skipped, the run resumed at step 2.
    capsys.readouterr()
    curve.main(curve_args(csv, runs, "--steps", "2", "4", *no_extension))
    out = capsys.readouterr().out
    assert "lora_llama_tiny seed 0, 2 steps: in" in out and "lora_llama_tiny seed 0: from step 2 to 4 steps" in out
    assert "knn: in" in out  # the reference is scored once

    rows = pd.read_csv(csv)
    llm = rows.loc[rows["steps"].notna()]
    assert sorted(set(llm["model"])) == ["lora_llama_tiny", "lora_llama_tiny_prior"]
    assert llm.groupby(["model", "steps"]).size().to_dict() == {(m, s): 2 for m in set(llm["model"]) for s in (2, 4)}
    assert rows.loc[rows["model"] == "knn", "steps"].isna().all() and (rows["model"] == "knn").sum() == 2
    assert ((rows["ci_low"] <= rows["auroc_per_gene"]) & (rows["auroc_per_gene"] <= rows["ci_high"])).all()
    assert (rows["genes_scored"] == 8).all() and (rows["val_genes_scored"] == 3).all()
    assert rows["overrides"].str.contains("data.test_genes=8 data.subset_seed=0 ").all()
    assert (plain / "curve" / "step2" / "predictions" / "test.csv").is_file()
    assert llm.groupby("steps")["from_step"].unique().map(list).to_dict() == {2: [0], 4: [2]}
    attempts = json.loads((plain / "curve_attempts.json").read_text())
    assert [(a["from_step"], a["target"]) for a in attempts] == [(0, 2), (2, 4)]
    assert all(0 < a["trained_seconds"] < a["seconds"] for a in attempts)  # training, then scoring
    for steps, attempt in zip((2, 4), attempts):
        walls = llm.loc[(llm["model"] == "lora_llama_tiny") & (llm["steps"] == steps), "wall_seconds"]
        assert (walls == round(attempt["seconds"], 1)).all()
    # The runs keep last.ckpt to block ends: no SIGTERM saves one in the middle of a block.
    from perturb_models.runs import load_run_record

    _, record = load_run_record(plain / "checkpoints" / "last.ckpt")
    assert record["config"]["callbacks"]["last_checkpoint"]["save_on_exception"] is False

    # The resumed 4-step point is a straight 4-step run: same weights, AdamW state, schedule and figures.
    args = curve.parse_args(curve_args(csv, runs, "--steps", "2", "4", *no_extension))
    straight_rows, _ = run_cell(
        "lora_llama_tiny", "synthetic", 0, "joint", curve.point_overrides(args, False, 4), tmp_path, "straight"
    )
    assert_same_training_state(checkpoint(plain), checkpoint(tmp_path / "straight"))
    four = llm.loc[(llm["model"] == "lora_llama_tiny") & (llm["steps"] == 4)].set_index("task")
    kept = json.loads((plain / "curve" / "step4" / "metrics.json").read_text())
    assert kept == json.loads((tmp_path / "straight" / "metrics.json").read_text())  # every metric, exactly
    for row in straight_rows:  # the CSV holds them (its text round trip may move the last digit)
        assert four.loc[row["task"], "auroc_per_gene"] == pytest.approx(row["auroc_per_gene"], abs=1e-12)
        assert four.loc[row["task"], "val_auroc_per_gene"] == pytest.approx(row["val_auroc_per_gene"], abs=1e-12)
    two = llm.loc[(llm["model"] == "lora_llama_tiny") & (llm["steps"] == 2)].set_index("task")
    assert four.loc["de", "auroc_per_gene"] != two.loc["de", "auroc_per_gene"]  # the two more steps did train

    # A rerun trains nothing; a curve killed after training a point but before storing it scores it again
    # from that checkpoint without a step more.
    before, stamp = csv.read_bytes(), (plain / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    curve.main(curve_args(csv, runs, "--steps", "2", "4", *no_extension))
    assert csv.read_bytes() == before and (plain / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    rows.loc[~((rows["model"] == "lora_llama_tiny") & (rows["steps"] == 4))].to_csv(csv, index=False)
    capsys.readouterr()
    curve.main(curve_args(csv, runs, "--steps", "2", "4", *no_extension))
    assert "lora_llama_tiny seed 0: from step 4 to 4 steps" in capsys.readouterr().out
    again = pd.read_csv(csv).set_index(["model", "steps", "task"]).sort_index()
    pd.testing.assert_frame_equal(
        again.drop(columns=["wall_seconds", "from_step"]),
        rows.set_index(["model", "steps", "task"]).sort_index().drop(columns=["wall_seconds", "from_step"]),
    )
    assert (again.loc[("lora_llama_tiny", 4.0), "from_step"] == 4).all()  # scored again, nothing trained
    assert checkpoint(plain)["global_step"] == 4

    # Another block size would continue a different curve: refused in one line.
    with pytest.raises(SystemExit, match="other settings .*trainer.limit_train_batches"):
        curve.main(curve_args(csv, runs, "--steps", "2", "4", "6", "--block", "1", *no_extension))

    # The test subset is llm_quality.py's: its knn run scores the very same test pairs.
    import llm_quality

    llm_quality.main(
        ["--csv", str(tmp_path / "q.csv"), "--data", "synthetic", "--seeds", "--prior-seeds", "--baselines", "knn"]
        + ["--test-genes", "8", "--val-genes", "3", "--runs-dir", str(tmp_path / "quality")]
    )

    def test_pairs(run: Path) -> set:
        return set(map(tuple, pd.read_csv(run / "predictions" / "test.csv")[["pert", "gene"]].to_numpy().tolist()))

    assert test_pairs(tmp_path / "quality" / "plain" / "knn-synthetic-joint-seed0") == test_pairs(plain)

    # The docs block and the figure come from the CSV; the rest of the page stays as it was.
    doc = tmp_path / "docs" / "llm.md"
    doc.parent.mkdir()
    shutil.copy(REPO / "docs" / "llm.md", doc)
    curve.main(["--csv", str(csv), "--table", "--doc", str(doc), "--data", "synthetic", "--test-genes", "8"])
    text = doc.read_text()
    block = text[text.index(curve.CURVE_BEGIN) : text.index(curve.CURVE_END)]
    assert "| lora_llama_tiny | 2 | 0 |" in block and "| lora_llama_tiny_prior | 4 | 0 |" in block
    assert "| knn | – (no steps) | 0 |" in block and "](llm_curve.png)" in block
    assert (doc.parent / "llm_curve.png").read_bytes()[:4] == b"\x89PNG"
    original = (REPO / "docs" / "llm.md").read_text()
    assert text[: text.index(curve.CURVE_BEGIN)] == original[: original.index(curve.CURVE_BEGIN)]


@pytest.mark.parametrize(
    "plan, message",
    [
        (["--steps", "3", "4", "--extend-to", "0"], "multiple of --block 2"),
        (["--steps", "4", "2", "--extend-to", "0"], "increasing"),
        (["--steps", "2", "--extend-to", "4"], "needs two --steps"),
        (["--steps", "2", "--extend-to", "0", "--rank-weight", "1", "--gene-group-size", "1"], "--gene-group-size"),
    ],
)
def test_plans_that_cannot_resume_exactly_are_refused(curve, tmp_path, capsys, plan, message):
    with pytest.raises(SystemExit):
        curve.main(curve_args(tmp_path / "c.csv", tmp_path / "runs", *plan))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()


def test_a_rank_term_curve_is_its_own_variant_trained_with_gene_grouped_batches(curve, tmp_path):
    csv, runs = tmp_path / "c.csv", tmp_path / "runs"
    curve.main(
        curve_args(csv, runs, "--steps", "2", "--extend-to", "0", "--reference", "", "--seeds")
        + ["--rank-weight", "0.5", "--gene-group-size", "4"]
    )
    rows = pd.read_csv(csv)
    assert set(rows["model"]) == {"lora_llama_tiny_prior_rank"} and sorted(rows["task"]) == ["de", "dir"]
    assert all("model.rank_weight=0.5 data.gene_group_size=4" in o for o in rows["overrides"])
    config = checkpoint(runs / "lora_llama_tiny_prior_rank-synthetic-joint-seed0")["perturb_models"]["config"]
    assert config["model"]["rank_weight"] == 0.5 and config["data"]["gene_group_size"] == 4


def test_a_point_trained_in_parts_counts_the_training_each_part_kept(curve, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"checkpoint")

    def saved_at(seconds: float) -> None:
        os.utime(ckpt, (seconds, seconds))

    saved_at(900.0)
    curve.open_attempt(run, target=100, start=30, now=1000.0)
    saved_at(1600.0)  # its last block ended at 1600; then a kill
    curve.open_attempt(run, target=100, start=70, now=2000.0)
    saved_at(2300.0)  # the last block; scoring until 2500
    curve.close_attempt(run, now=2500.0)
    # 600 s kept by the killed part, 300 s of training and 200 s of scoring by the one that finished.
    assert curve.point_cost(run) == (1100.0, 30)
    killed, finished = curve.read_attempts(run)
    assert killed["killed"] and killed["trained_seconds"] == 600.0 and "seconds" not in killed
    assert finished["seconds"] == 500.0 and finished["trained_seconds"] == 300.0

    # The next point starts after the finished attempt; a part killed before its first save kept nothing.
    curve.open_attempt(run, target=300, start=100, now=3000.0)
    curve.open_attempt(run, target=300, start=100, now=3100.0)
    saved_at(3900.0)
    curve.close_attempt(run, now=4000.0)
    assert curve.point_cost(run) == (900.0, 100)
    assert curve.read_attempts(run)[2]["trained_seconds"] == 0.0


def test_a_checkpoint_inside_a_block_is_refused(curve, tmp_path, capsys):
    csv, runs = tmp_path / "curve.csv", tmp_path / "runs"
    argv = curve_args(csv, runs, "--steps", "4", "6", "--extend-to", "0", "--reference", "", "--prior-seeds")
    args = curve.parse_args(argv)
    run = runs / "lora_llama_tiny-synthetic-joint-seed0"
    curve.claim_run_folder(run, curve.run_overrides(args, False))
    (run / "checkpoints").mkdir()
    torch.save({"global_step": 3, "state_dict": {}}, run / "checkpoints" / "last.ckpt")  # as an older crash left it
    with pytest.raises(SystemExit, match="at step 3, inside a block of 2 .*no resume from it is exact"):
        curve.main(argv)
    assert not csv.exists()


def test_extension_follows_validation_only(curve):
    rows = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "dataset": ["d"] * 4,
            "seed": [0] * 4,
            "steps": [100, 100, 300, 300],
            "task": ["de", "dir"] * 2,
            "val_auroc_per_gene": [0.60, 0.70, 0.66, 0.66],
            "auroc_per_gene": [0.9, 0.9, 0.1, 0.1],
        }
    )
    assert curve.still_rising(rows, "m", "d", 0, 100, 300)  # mean .65 -> .66, whatever test says
    assert not curve.still_rising(rows.assign(val_auroc_per_gene=[0.6, 0.7, 0.6, 0.7]), "m", "d", 0, 100, 300)


def test_curve_verdict_compares_validation_figures_with_the_reference(curve):
    def rows(model, steps, de, dr, test):
        return [
            {
                "model": model,
                "dataset": "k562",
                "task": task,
                "seed": 0,
                "steps": steps,
                "val_auroc_per_gene": val,
                "auroc_per_gene": test,
                "overrides": "data.task=joint data.test_genes=100",
            }
            for task, val in (("de", de), ("dir", dr))
        ]

    table = pd.DataFrame(
        rows("knn", None, 0.66, 0.70, 0.5)
        + rows("plain", 30, 0.50, 0.52, 0.9)
        + rows("plain", 100, 0.60, 0.64, 0.9)
        + rows("prior", 30, 0.70, 0.70, 0.1)
        + rows("prior", 100, 0.64, 0.66, 0.1)
    )
    verdict = curve.curve_verdict(table)
    # Validation decides: the test column (0.9 for plain, 0.1 for prior) is not what the sentences read.
    assert verdict.startswith("On validation (mean of de and dir), knn scores 0.680.")
    assert (
        "plain: 0.510 after 30, 0.620 after 100 steps; best after 100, below knn at every point (by 0.060 " in verdict
    )
    assert "from 30 to 100 steps it rose by 0.110" in verdict
    assert "prior: 0.700 after 30, 0.650 after 100 steps; best after 30, above knn at 1 of 2 points" in verdict
    assert "it fell by 0.050" in verdict
    assert curve.curve_verdict(table.loc[table["model"] == "knn"]) == ""


def test_llm_page_curve_block_is_generated_from_the_curve_csv(curve):
    from quality import read_rows

    text = (REPO / "docs" / "llm.md").read_text()
    rows = read_rows(REPO / "benchmarks" / "results" / "llm_curve.csv", curve.CURVE_COLUMNS)
    figure = (REPO / "docs" / curve.FIGURE_NAME).is_file()
    assert text == curve.with_curve_block(text, rows, figure), (
        "docs/llm.md's learning-curve block differs from llm_curve.csv: run python benchmarks/llm_curve.py "
        "--csv benchmarks/results/llm_curve.csv --table"
    )


def test_wall_to_a_point_follows_the_step_each_point_trained_from(curve):
    def rows(from_steps):
        return pd.DataFrame(
            {
                "steps": [30, 100, 300],
                "steps_key": [30.0, 100.0, 300.0],
                "wall_seconds": [600.0, 1500.0, 3000.0],
                "from_step": from_steps,
            }
        )

    # Resumed point by point: the run's wall to 300 steps is the three points' together.
    assert curve.wall_to(rows([0, 30, 100]), 300) == 5100.0
    # The 100-step point trained from scratch (its run folder was gone): the 30-step point is not on its way.
    assert curve.wall_to(rows([0, 0, 100]), 300) == 4500.0 and curve.wall_to(rows([0, 0, 100]), 100) == 1500.0
    # Rows from before the column resumed from the previous point.
    assert curve.wall_to(rows([float("nan")] * 3), 300) == 5100.0
    # A point scored again after a kill timed no training: the chain ends there.
    assert curve.wall_to(rows([0, 30, 300]), 300) == 3000.0


@pytest.mark.slow
def test_sigterm_stops_the_curve_in_one_line_naming_the_block_end_step_that_last_ckpt_holds(tmp_path):
    csv, runs = tmp_path / "curve.csv", tmp_path / "runs"
    last = runs / "lora_llama_tiny-synthetic-joint-seed0" / "checkpoints" / "last.ckpt"
    plan = curve_args(csv, runs, "--steps", "400", "--extend-to", "0", "--prior-seeds", "--reference", "")
    process = start_script(["benchmarks/llm_curve.py", *plan], PERTURB_MODELS_CACHE=str(tmp_path / "cache"))
    try:
        wait_for(last.is_file, 300, process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in out + err
    kept = checkpoint(last.parents[1])["global_step"]
    assert kept > 0 and kept % 2 == 0, "the curve keeps last.ckpt to block ends"
    (line,) = [text for text in (out + err).splitlines() if "run stopped by SIGTERM" in text]
    assert f"{last} holds step {kept}." in line
    record = json.loads((last.parents[1] / "run.json").read_text())
    assert record["status"] == "interrupted" and record["checkpoint_step"] == kept <= record["global_step"]
