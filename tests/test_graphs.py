"""Gene networks: GEARS Jaccard top-k on a tiny ontology, go_kg hub pruning, no label leakage into
coresponse, multi-relational combination, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.data.synthetic import make_synthetic_tables
from perturb_models.knowledge.graphs import (
    GeneGraph,
    build_graph,
    build_graphs,
    combine_graphs,
    go_similarity_graph,
    topk_similarity_edges,
)
from tests.knowledge_files import write_knowledge


def edges(graph: GeneGraph) -> dict[tuple[int, int], float]:
    return {(int(s), int(d)): round(float(w), 4) for (s, d), w in zip(graph.edge_index.T.tolist(), graph.edge_weight)}


def test_jaccard_topk_keeps_each_genes_best_neighbours_above_threshold():
    a, b, c, d = "GO:1", "GO:2", "GO:3", "GO:4"
    sets = [frozenset({a, b}), frozenset({a, b, c}), frozenset({c, d}), frozenset({d}), None]
    # Jaccard: g0-g1 2/3, g0-g2 0, g0-g3 0, g1-g2 1/4, g1-g3 0, g2-g3 1/2.
    graph = go_similarity_graph(sets, top_k=1, threshold=0.1)
    assert edges(graph) == {(1, 0): 0.6667, (0, 1): 0.6667, (3, 2): 0.5, (2, 3): 0.5}
    graph = go_similarity_graph(sets, top_k=2, threshold=0.1)
    assert edges(graph) == {(1, 0): 0.6667, (0, 1): 0.6667, (2, 1): 0.25, (3, 2): 0.5, (1, 2): 0.25, (2, 3): 0.5}
    graph = go_similarity_graph(sets, top_k=2, threshold=0.3)
    assert edges(graph) == {(1, 0): 0.6667, (0, 1): 0.6667, (3, 2): 0.5, (2, 3): 0.5}
    assert graph.num_isolated_genes == 1  # g4 has no annotation
    assert graph.num_genes == 5 and graph.relations == ["go_similarity"]


def test_cosine_topk_never_links_a_row_to_itself():
    features = sparse.csr_matrix(np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32))
    src, dst, sim = topk_similarity_edges(features, top_k=5, threshold=0.0, metric="cosine")
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 0)]
    assert np.allclose(sim, 1.0)


GENES = [(1, "GA", "OLDA", ""), (2, "GB", "", ""), (3, "GC", "", ""), (4, "GD", "", ""), (5, "GE", "", "")]
# Hand-written annotations on the tiny ontology of knowledge_files.OBO_TEXT.
ANNOTATIONS = [
    (1, "GO:0000002", "IDA", "Process"),
    (1, "GO:0000005", "IDA", "Function"),
    (2, "GO:0000002", "IEA", "Process"),
    (2, "GO:0000005", "IDA", "Function"),
    (3, "GO:0000001", "IDA", "Process"),
    (3, "GO:0000007", "IDA", "Component"),
    (4, "GO:0000007", "IDA", "Component"),
    (4, "GO:0000006", "IDA", "Function"),
]


class Ctx:
    """A minimal DataContext stand-in for builders that read knowledge only."""

    def __init__(self, symbols, dataset="tiny"):
        from perturb_models.data.vocab import GeneVocab

        self.vocab = GeneVocab(symbols)
        self.dataset = dataset
        self.clusters = {}
        self.ensembl_ids = {}

    @property
    def num_genes(self):
        return len(self.vocab)


def test_go_graph_from_files_resolves_synonyms_filters_aspects_and_evidence(tmp_path):
    root = write_knowledge(tmp_path / "kn", GENES, ANNOTATIONS)
    ctx = Ctx(["GB", "GC", "GD", "NOPE", "OLDA"])  # OLDA is GA's old name
    base = {
        "kind": "go",
        "top_k": 5,
        "threshold": 0.1,
        "knowledge_root": str(root),
        "cache": False,
        "exclude_evidence": [],
    }
    graph = build_graph(base, ctx)
    # OLDA(=GA) and GB share both terms (J=1); GC-GD share GO:0000007 (J=1/3).
    assert edges(graph) == {(4, 0): 1.0, (0, 4): 1.0, (2, 1): 0.3333, (1, 2): 0.3333}
    assert graph.num_isolated_genes == 1  # NOPE
    assert graph.info["genes_with_go"] == 4
    # Only molecular function: GB-OLDA (GO:0000005) remain; GC has no MF term.
    graph = build_graph(dict(base, aspects=["F"]), ctx)
    assert edges(graph) == {(4, 0): 1.0, (0, 4): 1.0}
    # Excluding IEA removes GB's process annotation: J(GB, OLDA) = 1/2.
    graph = build_graph(dict(base, exclude_evidence=["IEA"]), ctx)
    assert edges(graph)[(4, 0)] == 0.5
    # Propagation: GA/GB gain GO:0000001 and GO:0000003; GC (GO:0000001) now overlaps with them.
    graph = build_graph(dict(base, propagate=True, aspects=["P"]), ctx)
    assert edges(graph)[(1, 0)] == round(1 / 3, 4)


def test_go_kg_links_genes_to_terms_and_drops_hub_terms(tmp_path):
    root = write_knowledge(tmp_path / "kn", GENES, ANNOTATIONS)
    ctx = Ctx(["GA", "GB", "GC", "GD"])
    spec = {
        "kind": "go_kg",
        "max_term_degree": 2,
        "min_term_degree": 1,
        "knowledge_root": str(root),
        "cache": False,
        "exclude_evidence": [],
    }
    graph = build_graph(spec, ctx)
    assert set(graph.extra_nodes) == {"GO:0000001", "GO:0000002", "GO:0000005", "GO:0000006", "GO:0000007"}
    node = {t: 4 + i for i, t in enumerate(graph.extra_nodes)}
    gene_term = graph.relation("gene_to_term")
    assert (0, node["GO:0000002"]) in edges(gene_term) and (2, node["GO:0000007"]) in edges(gene_term)
    # GO:0000002 is_a GO:0000001, both kept: a term-term edge and its inverse.
    assert (node["GO:0000002"], node["GO:0000001"]) in edges(graph.relation("is_a"))
    assert (node["GO:0000001"], node["GO:0000002"]) in edges(graph.relation("is_a_inverse"))
    hub = build_graph(dict(spec, max_term_degree=1), ctx)
    assert "GO:0000002" not in hub.extra_nodes and hub.info["hub_terms_dropped"] == 3


def _write_dataset(folder, flip_test: bool):
    de, dir_ = make_synthetic_tables(n_genes=80, n_modules=4, n_perts=60, seed=3)
    if flip_test:
        test = de["split"] == "test"
        de.loc[test, "label"] = 1 - de.loc[test, "label"]
        de_pos = de.loc[de["label"] == 1, ["pert", "gene", "split"]]
        dir_ = de_pos.merge(dir_, on=["pert", "gene", "split"], how="left")
        dir_["label"] = dir_["label"].fillna(1).astype(int)
        dir_ = dir_.loc[:, ["pert", "gene", "label", "split"]]
    folder.mkdir(parents=True)
    de.to_csv(folder / "toy-de.csv", index=False)
    dir_.to_csv(folder / "toy-dir.csv", index=False)
    dm = PerturbQADataModule(name="toy", task="joint", root=str(folder), download=False, seed=0)
    dm.setup()
    return dm


def test_coresponse_graph_ignores_test_labels(tmp_path):
    original = _write_dataset(tmp_path / "a", flip_test=False)
    flipped = _write_dataset(tmp_path / "b", flip_test=True)
    assert not original.frames["test"]["de"].equals(flipped.frames["test"]["de"])
    spec = {"kind": "coresponse", "top_k": 10, "threshold": 0.1, "cache": True, "cache_dir": str(tmp_path / "cache")}
    g1 = build_graph(spec, original.context)
    g2 = build_graph(spec, flipped.context)
    assert g1.num_edges > 50
    assert torch.equal(g1.edge_index, g2.edge_index) and torch.equal(g1.edge_weight, g2.edge_weight)
    # The same cache entry serves both: the key only reads training labels.
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_coresponse_graph_changes_when_training_labels_change(tmp_path):
    dm = _write_dataset(tmp_path / "a", flip_test=False)
    spec = {"kind": "coresponse", "top_k": 10, "threshold": 0.1, "cache": False}
    g1 = build_graph(spec, dm.context)
    pairs = dm.context.train_pairs.copy()
    pairs["de"] = 1 - pairs["de"]
    pairs["dir"] = np.where(pairs["de"] == 1, 1, -1)
    from dataclasses import replace

    g2 = build_graph(spec, replace(dm.context, train_pairs=pairs))
    assert not (g1.num_edges == g2.num_edges and torch.equal(g1.edge_index, g2.edge_index))


def test_graphs_are_cached_by_their_parameters_and_combined_with_one_edge_type_per_source(tmp_path, caplog):
    dm = _write_dataset(tmp_path / "a", flip_test=False)
    root = tmp_path / "kn"
    genes = [(i + 1, s, "", "") for i, s in enumerate(dm.context.vocab.symbols)]
    annotations = [(i + 1, f"GO:000000{1 + i % 7}", "IDA", "Process") for i in range(len(genes))]
    write_knowledge(root, genes, annotations)
    cache = tmp_path / "cache"
    specs = {
        "go": {"kind": "go", "knowledge_root": str(root), "cache_dir": str(cache), "exclude_evidence": []},
        "coresponse": {"kind": "coresponse", "cache_dir": str(cache)},
    }
    combined = build_graphs(specs, dm.context)
    assert len(list(cache.glob("*.pt"))) == 2
    assert combined.relations == ["go:go_similarity", "coresponse:coresponse"]
    assert set(combined.edge_type.tolist()) == {0, 1}
    with caplog.at_level("INFO", logger="perturb_models.knowledge.graphs"):
        again = build_graphs(specs, dm.context)
    assert "loaded from cache" in caplog.text
    assert torch.equal(again.edge_index, combined.edge_index)
    build_graph(dict(specs["go"], top_k=3), dm.context)
    assert len(list(cache.glob("*.pt"))) == 3


def test_combining_graphs_over_different_vocabularies_is_refused():
    g = GeneGraph(3, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    h = GeneGraph(4, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    with pytest.raises(ValueError, match="different vocabularies"):
        combine_graphs({"a": g, "b": h})


def test_embedding_graph_links_each_gene_to_its_nearest_vectors_and_is_not_cached(tmp_path):
    table = tmp_path / "vectors.csv"
    # GA~GB and GC~GD (cosine ~0.99); the two pairs orthogonal; GE has no vector.
    table.write_text("GA,1,0.1,0\nGB,1,0,0.1\nGC,0,0,1\nGD,0.1,0,1\n")
    spec = {
        "kind": "embedding",
        "embeddings": {"source": "table", "path": str(table)},
        "top_k": 1,
        "threshold": 0.5,
        "cache_dir": str(tmp_path / "cache"),
    }
    graph = build_graph(spec, Ctx(["GA", "GB", "GC", "GD", "GE"]))
    assert set(edges(graph)) == {(1, 0), (0, 1), (3, 2), (2, 3)}
    assert all(w > 0.98 for w in edges(graph).values())
    assert graph.num_isolated_genes == 1 and graph.relations == ["embedding_similarity"]
    assert not (tmp_path / "cache").exists()  # the vectors are cached; the graph is rebuilt in ~1 s
    wider = build_graph(dict(spec, top_k=3, threshold=0.0), Ctx(["GA", "GB", "GC", "GD", "GE"]))
    assert edges(wider)[(3, 0)] == pytest.approx(0.099, abs=1e-3) and (2, 0) not in edges(
        wider
    )  # cosine 0: not above 0
