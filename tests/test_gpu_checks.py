"""benchmarks/gpu_checks.py: the GPU lease's one command, rehearsed end to end on this CPU so that it
cannot rot between leases (tiny shapes, synthetic data, a 2-minute budget)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _load_gpu_checks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_checks

    return gpu_checks


@pytest.mark.slow
@pytest.mark.llm
def test_gpu_checks_rehearsal_runs_every_check_and_fits_each_device_call(
    tmp_path, perturbqa_root, knowledge_root, smollm2_installed
):
    out = tmp_path / "rehearsal"
    # 4 minutes rather than the default 2: a loaded CI machine must not cut a check.
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_checks.py", "rehearse", "--out", str(out), "--budget-min", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The device calls are printed as they would be sent, each under the 64 MiB a call may carry.
    assert proc.stdout.count("--part 1") == 1 and proc.stdout.count("--part 2") == 1
    sizes = [line for line in proc.stdout.splitlines() if line.startswith("part ") and " MiB " in line]
    assert len(sizes) == 2 and all(line.endswith("(ok)") for line in sizes), sizes
    part1 = json.loads((out / "part1" / "gpu.json").read_text())
    part2 = json.loads((out / "part2" / "gpu.json").read_text())
    status1 = {c["name"]: c["status"] for c in part1["checks"]}
    assert status1 == {
        "environment": "ok",
        "lora_tiny": "ok",
        "framework_mlp": "ok",
        "framework_gears": "ok",
        "pytest_gpu": "ok",
    }, status1
    ratio = {c["name"]: c["figures"] for c in part1["checks"]}["framework_mlp"]
    assert ratio["plain_pairs_per_s"] > 0 and ratio["ratio"] > 0
    # Part 2 put the GGUF back together from the two halves, byte for byte.
    checks2 = {c["name"]: c for c in part2["checks"]}
    assert checks2["weights"]["status"] == "ok"
    assert checks2["weights"]["figures"]["sha256"] == checks2["weights"]["figures"]["expected"]
    # The LLM rows: at least the first run trained and was scored within the budget.
    assert checks2["llm_full_lora_llama"]["status"] == "ok", checks2["llm_full_lora_llama"]
    rows = part2["quality_rows"]
    assert {(r["model"], r["task"]) for r in rows} >= {("lora_llama", "de"), ("lora_llama", "dir")}
    assert all(r["ci_low"] <= r["auroc_per_gene"] <= r["ci_high"] and r["resolution"] for r in rows)


def test_a_lease_llm_row_carries_its_interval_and_symbol_resolution(tmp_path):
    import numpy as np
    import pandas as pd

    from perturb_models.knowledge.gene_info import RESOLUTION_VERSION
    from perturb_models.metrics import auroc_per_gene

    gpu_checks = _load_gpu_checks()
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = []
    for task in ("de", "dir"):
        label = rng.integers(0, 2, size=400)
        frames.append(
            pd.DataFrame(
                {
                    "pert": [f"P{i % 40}" for i in range(400)],
                    "gene": [f"G{i % 25}" for i in range(400)],
                    "task": task,
                    "label": label,
                    "score": label * 0.3 + rng.random(400),
                }
            )
        )
    predictions = pd.concat(frames)
    predictions.to_csv(run / "predictions" / "test.csv", index=False)
    figures = {
        f"test/{t}_auroc_per_gene": auroc_per_gene(f["label"], f["score"], f["gene"])[0]
        for t, f in predictions.groupby("task")
    }
    (run / "metrics.json").write_text(json.dumps(figures))
    (run / "run.json").write_text(json.dumps({"global_step": 7}))
    rows = gpu_checks.llm_rows(run, "lora_llama", ["model=lora_llama"], "abc1234", 12.0)
    for row in rows:
        # the interval is computed on the lease, where the predictions are: they do not travel back
        assert row["ci_low"] < row["auroc_per_gene"] < row["ci_high"]
        assert row["resolution"] == RESOLUTION_VERSION and row["global_step"] == 7
    # without its predictions the rows still come back, saying why they have no interval
    (run / "predictions" / "test.csv").unlink()
    bare = gpu_checks.llm_rows(run, "lora_llama", ["model=lora_llama"], "abc1234", 12.0)
    assert [r["auroc_per_gene"] for r in bare] == [r["auroc_per_gene"] for r in rows]
    assert all(r["ci_low"] is None and "test.csv" in r["interval_error"] for r in bare)


def test_gpu_doc_is_generated_from_the_results_file():
    gpu_checks = _load_gpu_checks()
    stored = json.loads(gpu_checks.RESULTS_JSON.read_text()) if gpu_checks.RESULTS_JSON.is_file() else {"leases": []}
    assert gpu_checks.GPU_DOC.read_text() == gpu_checks.doc_text(stored), (
        "docs/gpu.md differs from benchmarks/results/gpu.json: run python benchmarks/gpu_checks.py doc"
    )


def test_a_budget_cut_check_is_recorded_as_cut_and_earlier_figures_stay(tmp_path):
    gpu_checks = _load_gpu_checks()
    lease = gpu_checks.Lease(1, tmp_path / "out", tmp_path / "bundle", gpu_checks.Budget(0.05), rehearse=True)
    lease.record("first", "ok", 1.0, "true", {"figure": 1})
    entry = lease.command(
        "sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], estimate=0
    )
    assert entry["status"] == "cut" and entry["seconds"] < 10 and "started" in entry["error"]
    saved = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert [c["name"] for c in saved["checks"]] == ["first", "sleeper"] and saved["checks"][0]["figures"] == {
        "figure": 1
    }
    skipped = lease.command("late", [sys.executable, "-c", "pass"], estimate=60)
    assert skipped["status"] == "skipped"


@pytest.mark.llm
def test_the_lease_summer_check_scores_a_row_with_its_interval(tmp_path):
    # The check that runs when a lease has time left: rehearsed with the seeded random Llama on synthetic data.
    gpu_checks = _load_gpu_checks()
    lease = gpu_checks.Lease(2, tmp_path / "out", tmp_path / "bundle", gpu_checks.Budget(5), rehearse=True)
    rows: list[dict] = []
    gpu_checks.summer(lease, rows)
    check = {c["name"]: c for c in lease.result["checks"]}["llm_full_summer"]
    assert check["status"] == "ok", check.get("error")
    assert {(r["model"], r["task"]) for r in rows} == {("summer_logprob", "de"), ("summer_logprob", "dir")}
    assert all(r["ci_low"] <= r["auroc_per_gene"] <= r["ci_high"] for r in rows)
    assert lease.result["quality_rows"] == rows
    doc = gpu_checks.doc_text({"leases": [{"lease": "rehearsal", "parts": [lease.result]}]})
    assert "| summer_logprob | de |" in doc and "`summer_logprob` is `model=summer`" in doc
    # without the time it needs, the check is skipped and says so, and no row is made
    short = gpu_checks.Lease(2, tmp_path / "out2", tmp_path / "bundle", gpu_checks.Budget(0.1), rehearse=True)
    gpu_checks.summer(short, [])
    skipped = {c["name"]: c for c in short.result["checks"]}["llm_full_summer"]
    assert skipped["status"] == "skipped" and "needs" in skipped["error"]
