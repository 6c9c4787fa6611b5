"""benchmarks/llm_quality.py: LLM runs with and without the prior and a baseline, all on one test-gene subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


def test_llm_quality_rows_are_paired_on_one_test_gene_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import llm_quality
    from docs_tables import subset_table

    csv = tmp_path / "q.csv"
    llm_quality.main(
        [
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
            "--baselines",
            "knn",
            "--test-genes",
            "8",
            "--val-genes",
            "3",
            "--max-train-perts",
            "10",
            "--max-steps",
            "2",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--set",
            "model.scheduler.warmup_steps=1",
            # knn on synthetic genes: the co-response graph (no GO annotations for SYN genes)
        ]
    )
    rows = pd.read_csv(csv)
    assert set(rows["model"]) == {"lora_llama_tiny", "lora_llama_tiny_prior", "knn"}
    assert set(rows["task"]) == {"de", "dir"}
    assert rows["overrides"].str.contains("data.test_genes=8 ").all()
    assert (rows.loc[rows["task"] == "de", "genes_scored"] == 8).all()
    # Every row has its interval; the LLM rows their paired difference with knn on the same pairs.
    assert ((rows["ci_low"] <= rows["auroc_per_gene"]) & (rows["auroc_per_gene"] <= rows["ci_high"])).all()
    for paired, figure, task in rows.loc[rows["model"] != "knn", ["paired", "auroc_per_gene", "task"]].itertuples(
        index=False
    ):
        knn = rows.loc[(rows["model"] == "knn") & (rows["task"] == task), "auroc_per_gene"].item()
        assert json.loads(paired)["knn"][0] == pytest.approx(figure - knn, abs=1e-6)
    assert rows.loc[rows["model"] == "knn", "paired"].isna().all()
    table = subset_table(rows, "synthetic", 8)
    assert "| lora_llama_tiny_prior | de |" in table and "| knn | dir |" in table
    assert ", p=" in table  # the paired column is shown
    assert subset_table(rows, "synthetic", 9).startswith("_no synthetic rows")
    # A rerun of one model and seed on the same subset replaces its rows instead of adding a second copy.
    llm_quality.main(
        [
            "--csv",
            str(csv),
            "--data",
            "synthetic",
            "--model",
            "lora_llama_tiny",
            "--seeds",
            "--prior-seeds",
            "0",
            "--baselines",
            "--test-genes",
            "8",
            "--val-genes",
            "3",
            "--max-train-perts",
            "10",
            "--max-steps",
            "2",
            "--runs-dir",
            str(tmp_path / "runs2"),
            "--set",
            "model.scheduler.warmup_steps=1",
        ]
    )
    again = pd.read_csv(csv)
    assert len(again) == len(rows) and again["model"].value_counts()["lora_llama_tiny_prior"] == 2
    with pytest.raises(SystemExit):
        llm_quality.main(["--data", "synthetic"])  # --csv is required: the tracked file is never a default
    sys.modules.pop("llm_quality", None)


# SUMMER on the tiny random Llama: retrieval over the co-response graph (synthetic genes have no GO terms).
SUMMER_TINY = [
    "model.encoder.graphs.go.kind=coresponse",
    "model.encoder.gene_graphs.go.kind=coresponse",
    "model.encoder.backend.pretrained=null",
    "model.encoder.backend.tokenizer=words",
    "model.encoder.backend.llama_config={hidden_size:64,intermediate_size:128,num_hidden_layers:2,"
    "num_attention_heads:4,num_key_value_heads:2,max_position_embeddings:1024}",
    "model.encoder.summaries.source=none",
]


def test_summer_rows_are_named_by_their_mode_and_paired_with_knn(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import llm_quality
    from docs_tables import subset_table, summer_table

    csv = tmp_path / "q.csv"
    common = ["--csv", str(csv), "--data", "synthetic", "--model", "summer", "--test-genes", "8", "--val-genes", "3"]
    runs = ["--runs-dir", str(tmp_path / "runs")]
    llm_quality.main([*common, *runs, "--baselines", "knn", "--set", *SUMMER_TINY])
    # the no-retrieval ablation, paired with the knn run of the first invocation (same runs folder)
    llm_quality.main([*common, *runs, "--baselines", "--set", *SUMMER_TINY, "model.encoder.retrieval=false"])
    rows = pd.read_csv(csv)
    names = {"summer_logprob_nosummaries@randomllama", "summer_logprob_noretrieval_nosummaries@randomllama"}
    assert set(rows["model"]) == names | {"knn"} and len(rows) == 6
    summer = rows.loc[rows["model"] != "knn"]
    # no training options for a model without gradient training: the whole training split, one pass
    assert not summer["overrides"].str.contains("max_train_perts|limit_train_batches|optimizer").any()
    assert summer["overrides"].str.contains("data.test_genes=8 ").all() and summer["paired"].notna().all()
    for paired, figure, task in summer[["paired", "auroc_per_gene", "task"]].itertuples(index=False):
        knn = rows.loc[(rows["model"] == "knn") & (rows["task"] == task), "auroc_per_gene"].item()
        assert json.loads(paired)["knn"][0] == pytest.approx(figure - knn, abs=1e-6)
    printed = capsys.readouterr().out
    assert "summer_logprob_nosummaries@randomllama de seed 0: per-gene AUROC" in printed
    assert "tokens per pair" in printed and "requests" in printed
    table = subset_table(rows, "synthetic", 8)
    assert all(f"| {name} | dir |" in table for name in names)
    # what each LLM run cost, beside the rows (knn has no LLM), and the SUMMER table of docs/summer.md from both
    usage = pd.read_csv(tmp_path / "llm_usage.csv")
    assert set(usage["model"]) == names and (usage["tokens_per_pair"] > 0).all()
    assert (usage["requests"] + usage["cached"] >= usage["pairs"]).all()
    summer = summer_table(rows, usage, "synthetic", 8)
    for name in names:
        cost = usage.loc[usage["model"] == name].iloc[0]
        answers = f"{cost['unparsed_answers']:,} / {cost['abstained_answers']:,} of {cost['answers']:,}"
        assert f"| {name} | 0 | " in summer and cost["answers"] == cost["pairs"]  # logprob: one answer a pair
        assert f"| {int(cost['pairs']):,} | {answers} | {cost['tokens_per_pair']:,.0f} |" in summer
    with pytest.raises(SystemExit):
        llm_quality.main([*common, *runs, "--prior-seeds", "0", "--set", *SUMMER_TINY])  # summer has no prior
    sys.modules.pop("llm_quality", None)
