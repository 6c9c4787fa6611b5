"""Graph models on synthetic data: gat, gears and knn train (or fit-free run) through the shared
classifier, learn the planted modules, count isolated genes, and round-trip through evaluate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from perturb_models.data.vocab import GeneVocab
from perturb_models.evaluation import evaluate_checkpoint
from perturb_models.knowledge.graphs import GeneGraph
from perturb_models.models.gnn import SGBranch, node_feature_spec
from perturb_models.models.knn import KNNEncoder
from perturb_models.tasks import decode_logits, get_task
from perturb_models.training import train
from tests.conftest import module_word_knowledge, synthetic_modules
from tests.knowledge_files import write_knowledge


@pytest.fixture
def planted_knowledge(tmp_path, isolated_cache):
    """gene_info + gene2go for the synthetic genes: each gene annotated with its module's term (the
    generator's planted modules, seed 0) plus two noise terms."""
    module = synthetic_modules()
    rng = np.random.default_rng(1)
    genes = [(i + 1, f"SYN{i:04d}", "", "") for i in range(200)]
    annotations = []
    for i in range(200):
        annotations.append((i + 1, f"GO:10000{module[i]:02d}", "IDA", "Process"))
        for noise in rng.choice(40, size=2, replace=False):
            annotations.append((i + 1, f"GO:20000{noise:02d}", "IDA", "Function"))
    return write_knowledge(tmp_path / "knowledge", genes, annotations)


def test_gat_learns_unseen_perturbations_from_the_go_graph_alone(synthetic_cfg, planted_knowledge, caplog):
    cfg = synthetic_cfg(
        "model=gat",
        "~model.encoder.graphs.coresponse",
        "trainer.max_epochs=6",
        f"model.encoder.graphs.go.knowledge_root={planted_knowledge}",
    )
    with caplog.at_level("INFO"):
        metrics = train(cfg)
    assert "gat: 0 of 200 genes have no edge" in caplog.text
    assert metrics["test/de_auroc_per_gene"] > 0.6
    assert metrics["test/dir_genes_scored"] > 50


def test_gat_counts_genes_missing_from_every_graph_as_isolated(synthetic_cfg, planted_knowledge, tmp_path, caplog):
    # Knowledge for the first 150 genes only: the other 50 have no GO edge and (threshold 1.1) no co-response edge.
    from tests.knowledge_files import write_knowledge as write

    partial = tmp_path / "partial"
    write(
        partial,
        [(i + 1, f"SYN{i:04d}", "", "") for i in range(150)],
        [(i + 1, f"GO:10000{i % 8:02d}", "IDA", "Process") for i in range(150)],
    )
    cfg = synthetic_cfg(
        "model=gat",
        "trainer.max_epochs=1",
        f"model.encoder.graphs.go.knowledge_root={partial}",
        "model.encoder.graphs.coresponse.threshold=1.1",
    )
    with caplog.at_level("INFO"):
        metrics = train(cfg)
    assert "gat: 50 of 200 genes have no edge in any graph" in caplog.text
    assert np.isfinite(metrics["test/de_auroc_per_gene"])


def test_gears_trains_with_go_for_perturbations_and_coresponse_for_genes(synthetic_cfg, planted_knowledge, tmp_path):
    cfg = synthetic_cfg(
        "model=gears", "trainer.max_epochs=6", f"model.encoder.pert_graphs.go.knowledge_root={planted_knowledge}"
    )
    metrics = train(cfg)
    assert metrics["test/de_auroc_per_gene"] > 0.6
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


@pytest.fixture
def noise_knowledge(tmp_path):
    """gene_info + gene2go for the synthetic genes with noise GO terms only: a graph that knows nothing
    of the planted modules."""
    rng = np.random.default_rng(2)
    annotations = [
        (i + 1, f"GO:20000{noise:02d}", "IDA", "Function")
        for i in range(200)
        for noise in rng.choice(40, size=2, replace=False)
    ]
    return write_knowledge(
        tmp_path / "noise_knowledge", [(i + 1, f"SYN{i:04d}", "", "") for i in range(200)], annotations
    )


def test_gat_node_features_carry_what_an_uninformative_graph_lacks(
    synthetic_cfg, noise_knowledge, planted_table, tmp_path, caplog
):
    base = [
        "model=gat",
        "~model.encoder.graphs.coresponse",
        "trainer.max_epochs=6",
        f"model.encoder.graphs.go.knowledge_root={noise_knowledge}",
    ]
    without = train(synthetic_cfg(*base, output_dir=tmp_path / "without"))
    with caplog.at_level("INFO"):
        featured = train(
            synthetic_cfg(
                *base,
                f"model.encoder.node_features={{source:table,path:{planted_table}}}",
                output_dir=tmp_path / "with",
            )
        )
    assert "graph node features: table:" in caplog.text and "20 of 200 genes without a vector" in caplog.text
    assert featured["test/de_auroc_per_gene"] > 0.8
    assert featured["test/de_auroc_per_gene"] > without["test/de_auroc_per_gene"] + 0.2
    state = torch.load(tmp_path / "with" / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    assert state["encoder.node_features.table"].shape == (200, 8)
    again = evaluate_checkpoint(tmp_path / "with", tmp_path / "eval", synthetic_cfg().trainer)
    assert again["test/de_auroc_per_gene"] == pytest.approx(featured["test/de_auroc_per_gene"])


@pytest.mark.text
def test_gears_trains_with_minilm_text_node_features_shared_by_both_branches(
    synthetic_cfg, minilm_encoder, tmp_path, isolated_cache
):
    knowledge = module_word_knowledge(tmp_path / "k", go_noise=True)
    cfg = synthetic_cfg(
        "model=gears",
        "trainer.max_epochs=4",
        f"model.encoder.pert_graphs.go.knowledge_root={knowledge}",
        "model.encoder.pert_graphs.go.allow_download=false",
        f"model.encoder.node_features={{source:text,knowledge_root:{knowledge},allow_download:false}}",
    )
    metrics = train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    assert [k for k in state if k.endswith("node_features.table")] == ["encoder.node_features.table"]
    assert state["encoder.node_features.table"].shape == (200, 384)
    assert metrics["test/de_auroc_per_gene"] > 0.6


def test_gears_perturbation_branch_without_self_leaves_out_its_own_learned_vector_not_its_features():
    # A path 0 - 1 - 2 plus an isolated gene 3: with include_self=False and one hop, node 1's state is
    # made of nodes 0 and 2's vectors (and its own fixed features), so its own learned vector changes nothing.
    graph = GeneGraph(
        4, torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), torch.zeros(4, dtype=torch.long), torch.ones(4), ["toy"]
    )
    torch.manual_seed(0)
    branch = SGBranch(graph, dim=8, hops=1, name="toy", include_self=False)
    before = branch()
    with torch.no_grad():
        branch.nodes.table.weight[1] += 5.0
    after = branch()
    assert torch.allclose(before[1], after[1], atol=1e-6)
    assert not torch.allclose(before[0], after[0])  # its neighbours see it
    with_self = SGBranch(graph, dim=8, hops=1, name="toy", include_self=True)
    with_self.load_state_dict(branch.state_dict())
    assert not torch.allclose(with_self()[1], after[1])
    # Fixed node features are known for an unseen perturbation too: its own features are kept.
    featured = SGBranch(graph, dim=8, hops=1, name="toy", feature_dim=3, include_self=False)
    features = torch.randn(4, 3)
    state = featured(features)
    with torch.no_grad():
        featured.nodes.table.weight[1] += 5.0
    assert torch.allclose(featured(features)[1], state[1], atol=1e-6)
    moved = features.clone()
    moved[1] += 1.0
    assert not torch.allclose(featured(moved)[1], state[1])


def test_node_feature_spec_accepts_a_source_name_or_a_mapping_and_names_bad_keys():
    assert node_feature_spec(None) is None and node_feature_spec("null") is None
    assert node_feature_spec("random")["source"] == "random"
    assert node_feature_spec("summer")["summer_role"] == "gene"  # SUMMER summaries as the gene text
    assert node_feature_spec({"source": "table", "path": "x.csv"})["path"] == "x.csv"
    with pytest.raises(ValueError, match=r"model\.encoder\.node_features: unknown key\(s\) \['sorce'\]"):
        node_feature_spec({"sorce": "text"})
    with pytest.raises(ValueError, match="node_features=3"):
        node_feature_spec(3)
    with pytest.raises(ValueError, match=r"node_features.source='words'"):
        node_feature_spec("words")


def test_knn_needs_no_training_and_round_trips_through_evaluate(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg(
        "model=knn",
        "~model.encoder.graphs.go",
        "+graph@model.encoder.graphs.coresponse=coresponse",
        "model.encoder.graphs.coresponse.candidates=train_perts",
        "trainer.max_epochs=5",
    )
    metrics = train(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["epochs"] == 1  # one pass writes the checkpoint; nothing to fit
    assert metrics["test/de_auroc_per_gene"] > 0.7 and metrics["test/dir_auroc_per_gene"] > 0.7
    again = evaluate_checkpoint(tmp_path / "run", tmp_path / "eval", cfg.trainer)
    assert again["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"])


def tiny_knn(monkeypatch, symbols, rows, similarities, k, edges=((0, 2), (1, 2)), task="de"):
    """A KNNEncoder over ``symbols`` whose only graph edges are ``edges`` (training perturbation -> scored
    perturbation, by index; A -> C and B -> C unless given) with ``similarities``; ``rows`` are the training pairs
    (pert, gene, de, dir)."""
    from perturb_models.knowledge.graphs import GeneGraph

    vocab = GeneVocab(symbols)
    pairs = pd.DataFrame(rows, columns=["pert", "gene", "de", "dir"])
    pairs["pert_idx"], pairs["gene_idx"] = vocab.encode(pairs["pert"]), vocab.encode(pairs["gene"])
    context = SimpleNamespace(
        num_classes=get_task(task).num_classes,
        num_genes=len(symbols),
        vocab=vocab,
        train_perts=tuple(sorted(set(pairs["pert"]))),
        train_pairs=pairs,
        task=task,
        dataset="tiny",
        clusters={},
    )
    edge_index = torch.tensor(list(zip(*edges)))
    graph = GeneGraph(len(symbols), edge_index, torch.zeros(len(edges), dtype=torch.long), torch.tensor(similarities))
    monkeypatch.setattr("perturb_models.models.knn.build_graphs", lambda specs, ctx: graph)
    return KNNEncoder(context, graphs={"x": {}}, k=k, shrinkage=1.0, prior_strength=0.0)


def vote(knn, pert, gene) -> np.ndarray:
    """The kNN vote P(c | p, g): the softmax of the encoder's logits."""
    logits = knn({"pert": torch.tensor(pert), "gene": torch.tensor(gene)})
    return torch.softmax(logits.double(), dim=-1).numpy()


def test_knn_vote_is_similarity_weighted_and_shrunk_toward_the_gene_rate(monkeypatch):
    rows = [("A", "G1", 1, 1), ("B", "G1", 0, -1), ("A", "G2", 0, -1), ("B", "G2", 0, -1)]
    # C's neighbours: A (0.75) and B (0.25).
    knn = tiny_knn(monkeypatch, ["A", "B", "C", "G1", "G2"], rows, [0.75, 0.25], k=5)
    probs = vote(knn, [2, 2], [3, 4])
    # G1: votes DE 0.75, not DE 0.25; G1's training rate 1/2 each -> (0.75 + 0.5) / (1 + 1).
    assert probs[0] == pytest.approx([0.75 / 2, 1.25 / 2])
    # G2: both neighbours say not DE (weight 1); rate 1.0 not DE (DE floored at 1e-9 of the total).
    assert probs[1] == pytest.approx([1.0, 0.0], abs=1e-8)


def test_knn_direction_ties_exactly_where_no_voter_moved(monkeypatch):
    """Scored perturbations whose voters all left G1 unchanged get G1's own direction rate, exactly the same
    score whatever their vote totals: a tie the per-gene AUROC must see as one (rounding must not rank them)."""
    train = ["A", "B", "E", "F", "H"]
    scored = [f"Q{i}" for i in range(12)]
    rows = [("A", "G1", 0, -1), ("B", "G1", 0, -1), ("E", "G1", 1, 1), ("F", "G1", 1, 1), ("H", "G1", 1, 0)]
    symbols = [*train, *scored, "G1"]
    # Each Q is a neighbour of A and B only (not of the movers), with its own similarities.
    rng = np.random.default_rng(0)
    edges = [(t, len(train) + q) for q in range(len(scored)) for t in (0, 1)]
    similarities = rng.uniform(0.05, 1.0, len(edges)).tolist()
    knn = tiny_knn(monkeypatch, symbols, rows, similarities, k=2, edges=edges, task="joint")
    pert = np.arange(len(train), len(train) + len(scored))
    gene = np.full(len(scored), symbols.index("G1"))
    logits = knn({"pert": torch.tensor(pert), "gene": torch.tensor(gene)})
    scores = decode_logits(logits, "joint")
    assert scores["dir"].unique().tolist() == [pytest.approx(2 / 3)]  # G1 rates: up 2/5, down 1/5
    assert scores["de"].unique().numel() == len(scored)  # the not-DE votes differ, so the DE scores do


def test_knn_drops_perturbations_that_did_not_measure_the_gene_before_taking_the_k_nearest(monkeypatch):
    # A is C's closest neighbour but never measured G1; B did (DE).
    knn = tiny_knn(monkeypatch, ["A", "B", "C", "G1"], [("B", "G1", 1, 1), ("A", "C", 0, -1)], [0.9, 0.2], k=1)
    # k=1: B votes (A is skipped, not counted): (0.2 * [0, 1] + 1 * [0, 1]) / 1.2.
    assert vote(knn, [2], [3])[0] == pytest.approx([0.0, 1.0], abs=1e-8)
    names, sims, codes = knn.neighbours.nearest(2, 3, 5)
    assert names.tolist() == [1] and sims.tolist() == pytest.approx([0.2]) and codes.tolist() == [2]
