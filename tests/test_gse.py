"""Gene set enrichment (data=k562_gse): file validation and download, the PerturbQA scorer, the GO
over-representation statistics, and a go_enrichment run that evaluate.py reproduces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import hypergeom

from perturb_models.data.gse import GSEDataModule, read_gse_file
from perturb_models.data.perturbqa import DataValidationError
from perturb_models.gse.enrichment import GOSets, enrich
from perturb_models.gse.scoring import rouge1_recall
from tests.conftest import FAST_CPU, compose_config


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            [{"genes": ["A", "B"], "label": "x"}, {"genes": [], "label": "y"}],
            r"entry 1: 'genes' must be a non-empty list",
        ),
        ([{"genes": ["A", 3], "label": None}], r"entry 0: 'genes' holds 3"),
        (
            [{"genes": ["A"], "label": "x"}, {"genes": ["B"], "label": ""}],
            r"entry 1: 'label' must be a non-empty string or null",
        ),
        ([{"genes": ["A"]}], r"entry 0: missing key\(s\) label"),
        ({"genes": ["A"]}, r"expected a non-empty JSON list"),
    ],
)
def test_bad_gse_file_error_names_the_file_and_the_entry(tmp_path, entries, message):
    path = tmp_path / "k562_gene-gse.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataValidationError, match=message) as info:
        read_gse_file(path)
    assert str(path) in str(info.value)


def test_gse_files_are_downloaded_like_every_perturbqa_file(http_folder, tmp_path, monkeypatch):
    from tests.conftest import write_gse_world

    served, url = http_folder
    world = write_gse_world(tmp_path / "world")
    for f in world["data"].iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    root = tmp_path / "data"
    dm = GSEDataModule(gse_kind="pert", root=str(root), base_url=url)
    dm.prepare_data()
    dm.setup()
    # hidden .NAME.download.json files are the download records
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "k562_gene-gse.json",
        "k562_gw_mapping_full.json",
        "k562_pert-gse.json",
    ]
    assert len(dm.context.clusters) == 2 and len(dm.context.scored) == 2
    assert set(dm.context.background) == {f"G{i:03d}" for i in range(96)}
    with pytest.raises(DataValidationError, match="downloads are off"):
        GSEDataModule(root=str(tmp_path / "empty"), download=False).prepare_data()


def test_rouge1_recall_matches_perturbqa_on_hand_made_examples():
    pairs = [  # (answer, label, share of the label's words found in the answer)
        ("mitochondrial oxidative phosphorylation", "oxidative phosphorylation", 1.0),
        ("cytoplasmic translation", "translation", 1.0),
        ("mTORC1 signaling", "unfolded protein response mTORC1 signaling", 2 / 5),
        ("Nonsense-Mediated decay", "nonsense-mediated decay", 1.0),  # lower-cased, split at punctuation
        ("RNA splicing", "spliceosome", 0.0),  # no stemming
        ("", "cell cycle", 0.0),
        ("cell cycle cell", "cell cycle", 1.0),
        ("histone", "histone genes", 0.5),
    ]
    got = rouge1_recall([a for a, _, _ in pairs], [t for _, t, _ in pairs])
    np.testing.assert_allclose(got, [r for _, _, r in pairs], atol=1e-6)


def test_bertscore_prefers_the_right_label(minilm_encoder):
    from perturb_models.gse.scoring import bert_score

    scores = bert_score(
        ["cytoplasmic translation", "cytoplasmic translation", ""],
        ["translation", "cholesterol homeostasis", "translation"],
    )
    assert scores["f1"][0] > scores["f1"][1] > 0 and scores["f1"][2] == 0.0


def test_a_pairs_bertscore_does_not_depend_on_the_other_pairs(minilm_encoder):
    """torchmetrics sorts answers and labels apart by token length (an unstable sort): scored together,
    pairs of equal lengths could be matched with each other's labels (torchmetrics issue #2728)."""
    from perturb_models.gse.scoring import bert_score

    answers = ["receptor antagonist activity", "chiasma assembly", "structural constituent of chromatin", "ribosome"]
    labels = ["mitochondrial respiratory chain", "targets of decay", "histone genes", "translation"]
    together = bert_score(answers, labels)["f1"]
    alone = [bert_score([a], [t])["f1"][0] for a, t in zip(answers, labels)]
    reversed_order = bert_score(answers[::-1], labels[::-1])["f1"][::-1]
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(reversed_order, alone, atol=1e-6)


def test_enrichment_statistics_match_scipy_hypergeometric():
    population = [f"g{i}" for i in range(40)]
    term_genes = {
        "T1": frozenset(population[:10]),
        "T2": frozenset(population[5:25]),
        "T3": frozenset(population[30:34]),
        "T4": frozenset(population[36:40]),
    }
    gene_terms = {g: frozenset(t for t, m in term_genes.items() if g in m) for g in population}
    sets = GOSets(term_genes, {t: f"term {t}" for t in term_genes}, gene_terms, frozenset(population), {})
    cluster = population[:6] + ["g30", "not_in_population"]
    table = enrich(cluster, sets).set_index("go_id")
    n, N = 7, 40  # the gene outside the population is not counted
    assert set(table.index) == {"T1", "T2", "T3"}  # T4 has no hit
    for term, k in {"T1": 6, "T2": 1, "T3": 1}.items():
        K = len(term_genes[term])
        expected = sum(hypergeom.pmf(x, N, K, n) for x in range(k, min(K, n) + 1))
        assert table.loc[term, "overlap"] == k and table.loc[term, "term_size"] == K
        assert table.loc[term, "p_value"] == pytest.approx(expected, rel=1e-9)
    # BH over all four terms (T4 tested with p = 1): q_i = min over j >= i of p_(j) * m / j.
    p = np.array([table.loc[t, "p_value"] for t in ("T1", "T2", "T3")] + [1.0])
    order = np.argsort(p)
    ranked = p[order] * 4 / np.arange(1, 5)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    expected_q = np.empty(4)
    expected_q[order] = np.minimum(q, 1)
    np.testing.assert_allclose([table.loc[t, "q_value"] for t in ("T1", "T2", "T3")], expected_q[:3], rtol=1e-9)
    assert enrich(cluster, sets)["go_id"].iloc[0] == "T1"


def gse_cfg(tmp_path, *overrides, output="run"):
    return compose_config("train", ["data=k562_gse", *FAST_CPU, *overrides], tmp_path / output)


@pytest.mark.parametrize("kind", ["gene", "pert"])
def test_go_enrichment_run_names_clusters_and_evaluate_reproduces(gse_world, tmp_path, kind):
    from perturb_models.evaluation import evaluate
    from perturb_models.training import train

    cfg = gse_cfg(tmp_path, "model=go_enrichment", f"data.gse_kind={kind}", "data.bertscore_model=null")
    metrics = train(cfg)
    run = tmp_path / "run"
    predictions = pd.read_csv(run / "predictions" / "test.csv")
    assert list(predictions.columns[:5]) == ["cluster", "genes", "label", "answer", "score"]
    # Cluster 0 of each file is exactly one term's gene set: its name is the answer.
    assert predictions["answer"].iloc[0] == {"gene": "ribosome assembly", "pert": "mitochondrial translation"}[kind]
    assert metrics["test/clusters_scored"] == predictions["label"].notna().sum()
    assert metrics["test/rouge1_recall"] == pytest.approx(predictions["rouge1_recall"].mean())
    assert json.loads((run / "run.json").read_text())["gse_kind"] == kind
    again = evaluate(compose_config("evaluate", [f"ckpt_path={run}"], tmp_path / "eval"))
    assert again == pytest.approx(metrics)
    assert (
        pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv")["answer"].tolist() == predictions["answer"].tolist()
    )
    # The comparison table of evaluate.py runs='[...]' carries the gene-set metric.
    table = evaluate(compose_config("evaluate", [f"runs=[{run},{tmp_path / 'eval'}]"], tmp_path / "cmp"))
    assert table["rouge1_recall"].tolist() == pytest.approx([metrics["test/rouge1_recall"]] * 2)


pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_tiny_llama_namer_trains_generates_and_evaluate_reloads_the_same_answers(gse_world, tmp_path):
    from perturb_models.evaluation import evaluate
    from perturb_models.training import train

    cfg = gse_cfg(tmp_path, "model=lora_llama_gse_tiny", "data.bertscore_model=null", "trainer.max_epochs=2")
    metrics = train(cfg)
    run = tmp_path / "run"
    assert "val/rouge1_recall" in metrics and "test/rouge1_recall" in metrics
    predictions = pd.read_csv(run / "predictions" / "test.csv", keep_default_na=False)
    assert len(predictions) == 3 and predictions["answer"].str.len().gt(0).any()
    info = json.loads((run / "run.json").read_text())
    assert info["train_examples"] > 0 and info["go_terms_excluded"] >= 2
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"]), "adapter-only checkpoint"
    again = evaluate(compose_config("evaluate", [f"ckpt_path={run}"], tmp_path / "eval"))
    assert again["test/rouge1_recall"] == pytest.approx(metrics["test/rouge1_recall"])
    reloaded = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv", keep_default_na=False)
    assert reloaded["answer"].tolist() == predictions["answer"].tolist()
    np.testing.assert_allclose(reloaded["score"], predictions["score"], rtol=1e-4)


def _assert_no_example_holds_a_cluster(examples, clusters, max_cover=0.5):
    for example in examples:
        genes = set(example["genes"])
        for cluster in clusters:
            cluster = set(cluster)
            assert not cluster <= genes, f"training example of {example['term']} contains a cluster's gene set"
            assert len(cluster & genes) <= max_cover * len(cluster)


def test_go_term_training_set_never_contains_a_scored_cluster(gse_world, tmp_path):
    from hydra.utils import instantiate

    from perturb_models.builders import build_datamodule

    cfg = gse_cfg(tmp_path, "model=lora_llama_gse_tiny", "model.namer.train_examples=200", "model.namer.val_examples=2")
    dm = build_datamodule(cfg.data)
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup_knowledge(dm.context)
    train, val = namer.build_examples(seed=0)
    clusters = [c for kind in ("gene", "pert") for c in dm.context.all_clusters[kind]]
    # The two clusters that are exactly a term's genes take their terms out of training and validation.
    used = {e["term"] for e in train + val}
    assert "GO:1000000" not in used and "GO:1000003" not in used
    assert used == {f"GO:10000{t:02d}" for t in range(5, 12)}  # terms 0-4 overlap some cluster (Jaccard > 0.2)
    assert {e["target"] for e in train} <= set(namer.sets.names.values())
    _assert_no_example_holds_a_cluster(train + val, clusters)
    assert not {e["term"] for e in train} & {e["term"] for e in val}, "validation terms are held out of training"


def test_real_go_training_set_never_contains_a_scored_cluster(perturbqa_root, knowledge_root):
    import random

    from perturb_models.data.gse import GSEDataModule
    from perturb_models.gse.enrichment import load_go_sets
    from perturb_models.gse.namer import eligible_terms, sample_examples

    dm = GSEDataModule(root=str(perturbqa_root))
    dm.setup()
    sets = load_go_sets(dm.context.background, str(knowledge_root))
    clusters = [c for kind in ("gene", "pert") for c in dm.context.all_clusters[kind]]
    terms, excluded = eligible_terms(sets, clusters, 5, 200, 0.2)
    assert excluded and len(terms) > 1000
    examples = sample_examples(sets, terms, 300, clusters, 4, 16, 0.2, 0.5, random.Random(0))
    assert len(examples) == 300
    _assert_no_example_holds_a_cluster(examples, clusters)


def test_namer_prompts_describe_genes_with_the_project_gene_texts(gse_world, tmp_path):
    """descriptions=gene_info reads the one gene-text source (knowledge/text.py), as the classifier prompts do."""
    from hydra.utils import instantiate

    from perturb_models.builders import build_datamodule

    cfg = gse_cfg(tmp_path, "model=lora_llama_gse_tiny", "model.namer.descriptions=gene_info")
    dm = build_datamodule(cfg.data)
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup_knowledge(dm.context)
    assert namer.describe, "no gene got a description from the knowledge files"
    gene, text = next(iter(namer.describe.items()))
    assert text[:20] in namer.prompt([gene])


def test_validation_evidence_hides_the_answer_and_its_near_duplicates(gse_world, tmp_path):
    """Validation examples (and the hide_answer_train share of training ones) are shown evidence without their
    own GO term or any term whose genes overlap it with Jaccard >= hide_jaccard; other prompts are unchanged."""
    from hydra.utils import instantiate

    from perturb_models.builders import build_datamodule
    from perturb_models.gse.namer import jaccard

    cfg = gse_cfg(
        tmp_path,
        "model=lora_llama_gse_tiny",
        "model.namer.train_examples=40",
        "model.namer.val_examples=3",
        "model.namer.hide_answer_train=1.0",
        "model.namer.evidence_k=20",
    )
    dm = build_datamodule(cfg.data)
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup_knowledge(dm.context)
    train, val = namer.build_examples(seed=0)
    assert all(e["hide"] == e["term"] for e in train + val)
    for example in train + val:
        source = namer.sets.term_genes[example["term"]]
        shown = namer.evidence(example["genes"])
        assert namer.sets.names[example["term"]] in shown, "unhidden, the source term is among the evidence"
        hidden = namer.evidence(example["genes"], example["hide"])
        kept = {t for t in namer.sets.term_genes if namer.sets.names[t] in hidden}
        assert all(jaccard(namer.sets.term_genes[t], source) < namer.hide_jaccard for t in kept)
        assert hidden == [n for n in shown if n in hidden], "hiding keeps the enrichment order of the rest"
        assert namer.sets.names[example["term"]] not in namer.prompt(example["genes"], example["hide"])
    off = instantiate(cfg.model.namer, hide_answer_train=0.0, hide_answer_val=False, _convert_="all")
    off.setup_knowledge(dm.context)
    train_off, val_off = off.build_examples(seed=0)
    assert all(e["hide"] is None for e in train_off + val_off)
    assert [e["genes"] for e in train_off] == [e["genes"] for e in train], (
        "the share hidden does not change the samples"
    )
    from perturb_models.gse.namer import LoRALlamaNamer

    with pytest.raises(ValueError, match="hide_answer_train must be a share"):
        LoRALlamaNamer(hide_answer_train=1.5)


@pytest.mark.llm
def test_smollm2_namer_loads_offline_learns_and_names(smollm2_installed, gse_world, tmp_path, monkeypatch):
    """The default namer's own path with the real SmolLM2 weights: the prompt carries gene texts and evidence,
    three LoRA steps lower the loss of a GO-term example, and generation returns text with a finite score."""
    from hydra.utils import instantiate

    from perturb_models.builders import build_datamodule

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The small world holds a dozen GO terms: the tiny config's example sizes, the default model and prompt.
    cfg = gse_cfg(
        tmp_path,
        "model=lora_llama_gse",
        "model.namer.max_new_tokens=4",
        "model.namer.train_examples=8",
        "model.namer.val_examples=2",
        "model.namer.min_genes=3",
        "model.namer.max_genes=6",
    )
    assert cfg.model.namer.descriptions == "gene_info" and cfg.model.namer.pretrained == "smollm2"
    dm = build_datamodule(cfg.data)
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup(dm.context)
    base = namer.model.get_base_model()
    assert base.config.num_hidden_layers == 30 and sum(p.numel() for p in base.parameters()) > 130e6
    train, _ = namer.build_examples(seed=0)
    example = train[0]
    prompt = namer.prompt(example["genes"])
    assert "Enriched GO terms:" in prompt and any(f"{g} (" in prompt for g in example["genes"][:6])
    batch = namer._collate_train([namer.encode(example["genes"], example["target"])])
    optimizer = torch.optim.AdamW([p for p in namer.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = namer.model(**batch).loss
        losses.append(float(loss))
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert losses[-1] < losses[0]
    answers = namer.predict([example["genes"], dm.context.all_clusters["gene"][0]])
    assert len(answers) == 2 and all(isinstance(a["answer"], str) and np.isfinite(a["score"]) for a in answers)
