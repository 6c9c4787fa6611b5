"""Gene networks over the DataModule's vocabulary, built from knowledge files or training labels.

Every builder returns a :class:`GeneGraph`: nodes ``0..num_genes-1`` are the vocab's genes in vocab
order (extra nodes, e.g. GO terms of ``go_kg``, come after them), edges go ``source -> target`` with an
integer relation type and a weight. Graphs are cached on disk under a key hashed from the builder,
its parameters and its inputs (vocab, file fingerprints, or the training labels), and written atomically.

Builders (``kind`` of a ``conf/graph/*.yaml``):

- ``go``: GEARS recipe, Jaccard similarity of GO term sets, each gene keeps its top-k neighbours above a threshold.
- ``go_kg``: bipartite gene-GO term graph plus GO's term-term edges; hub terms above a degree cap dropped.
- ``coresponse``: genes linked when their DE responses over the *training* perturbations are similar.
- ``embedding``: genes linked when their embeddings (MiniLM over gene texts, or a user table; see
  knowledge/embeddings.py) are close (cosine, top-k). Not cached as a graph: the vectors are cached, and
  the top-k search over them takes about a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from tqdm.auto import tqdm

from perturb_models.io import atomic_write_bytes, cache_dir
from perturb_models.knowledge.gene_info import RESOLUTION_VERSION

log = logging.getLogger(__name__)

GRAPH_FORMAT_VERSION = 1


@dataclass
class GeneGraph:
    """A (multi-relational) graph whose first ``num_genes`` nodes are the vocab's genes."""

    num_genes: int
    edge_index: torch.Tensor  # (2, E) long: source, target
    edge_type: torch.Tensor  # (E,) long, index into relations
    edge_weight: torch.Tensor  # (E,) float
    relations: list[str] = field(default_factory=lambda: ["edge"])
    extra_nodes: list[str] = field(default_factory=list)  # names of nodes after the genes (e.g. GO ids)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.num_genes + len(self.extra_nodes)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def touched_nodes(self) -> torch.Tensor:
        """Bool (num_nodes,): the node touches at least one edge."""
        touched = torch.zeros(self.num_nodes, dtype=torch.bool)
        if self.num_edges:
            touched[self.edge_index.reshape(-1)] = True
        return touched

    def gene_has_edge(self) -> torch.Tensor:
        """Bool (num_genes,): the gene touches at least one edge."""
        return self.touched_nodes()[: self.num_genes]

    @property
    def num_isolated_genes(self) -> int:
        return int((~self.gene_has_edge()).sum())

    def summary(self, name: str = "graph") -> str:
        return (
            f"{name}: {self.num_genes} genes + {len(self.extra_nodes)} other nodes, {self.num_edges} edges, "
            f"relations {self.relations}, {self.num_isolated_genes} genes without any edge"
        )

    def validate(self) -> GeneGraph:
        ei = self.edge_index
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must be (2, E), got {tuple(ei.shape)}")
        if self.num_edges and (int(ei.min()) < 0 or int(ei.max()) >= self.num_nodes):
            raise ValueError(f"edge_index has node ids outside 0..{self.num_nodes - 1}")
        if len(self.edge_type) != self.num_edges or len(self.edge_weight) != self.num_edges:
            raise ValueError("edge_type and edge_weight need one entry per edge")
        if self.num_edges and int(self.edge_type.max()) >= self.num_relations:
            raise ValueError(f"edge_type {int(self.edge_type.max())} has no name in relations {self.relations}")
        return self

    def relation(self, name: str) -> GeneGraph:
        """The sub-graph of one relation type (same nodes)."""
        rel = self.relations.index(name)
        keep = self.edge_type == rel
        return GeneGraph(
            self.num_genes,
            self.edge_index[:, keep],
            torch.zeros(int(keep.sum()), dtype=torch.long),
            self.edge_weight[keep],
            [name],
            list(self.extra_nodes),
            dict(self.info),
        )

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "version": GRAPH_FORMAT_VERSION,
                "num_genes": self.num_genes,
                "edge_index": self.edge_index,
                "edge_type": self.edge_type,
                "edge_weight": self.edge_weight,
                "relations": self.relations,
                "extra_nodes": self.extra_nodes,
                "info": self.info,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneGraph:
        data = torch.load(path, map_location="cpu", weights_only=False)
        if data.get("version") != GRAPH_FORMAT_VERSION:
            raise ValueError(f"{path}: graph cache of format {data.get('version')}, expected {GRAPH_FORMAT_VERSION}")
        return cls(
            data["num_genes"],
            data["edge_index"],
            data["edge_type"],
            data["edge_weight"],
            data["relations"],
            data["extra_nodes"],
            data["info"],
        ).validate()


def combine_graphs(graphs: Mapping[str, GeneGraph]) -> GeneGraph:
    """One multi-relational graph: gene nodes shared, each graph's extra nodes appended, and one edge
    type per (source graph, relation), named ``source:relation``."""
    graphs = dict(graphs)
    if not graphs:
        raise ValueError("combine_graphs needs at least one graph")
    num_genes = {g.num_genes for g in graphs.values()}
    if len(num_genes) != 1:
        raise ValueError(f"graphs over different vocabularies cannot be combined (num_genes {sorted(num_genes)})")
    n = num_genes.pop()
    extra: list[str] = []
    relations: list[str] = []
    parts_index, parts_type, parts_weight = [], [], []
    for source, graph in graphs.items():
        offset = n + len(extra)
        ei = graph.edge_index.clone()
        ei[ei >= n] += offset - n  # shift this graph's extra nodes after those already placed
        parts_index.append(ei)
        parts_type.append(graph.edge_type + len(relations))
        parts_weight.append(graph.edge_weight)
        relations.extend(f"{source}:{r}" for r in graph.relations)
        extra.extend(f"{source}:{x}" for x in graph.extra_nodes)
    return GeneGraph(
        n,
        torch.cat(parts_index, 1),
        torch.cat(parts_type),
        torch.cat(parts_weight).float(),
        relations,
        extra,
        {"sources": list(graphs)},
    ).validate()


# ---- similarity top-k -----------------------------------------------------------------------------


def topk_similarity_edges(
    features: sparse.csr_matrix,
    top_k: int,
    threshold: float,
    metric: str = "jaccard",
    rows: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    chunk: int = 512,
    desc: str = "similarity",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row ``i`` of ``rows``, its ``top_k`` most similar rows among ``candidates`` (not itself)
    with similarity strictly above ``threshold``. Returns ``(neighbour, row, similarity)`` arrays, so
    edges point from a neighbour to the row it describes.

    ``metric``: ``jaccard`` on binary features (set similarity) or ``cosine``.
    """
    n = features.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    candidates = np.arange(n) if candidates is None else np.asarray(candidates)
    features = features.tocsr().astype(np.float32)
    if metric == "jaccard":
        features.data[:] = 1.0
        sizes = np.asarray(features.sum(axis=1)).ravel()
    elif metric == "cosine":
        norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        features = sparse.diags(1.0 / norms) @ features
    else:
        raise ValueError(f"unknown similarity metric {metric!r} (jaccard or cosine)")
    cand = features[candidates].T.tocsc()
    src, dst, sim = [], [], []
    for start in tqdm(range(0, len(rows), chunk), desc=desc, leave=False, disable=len(rows) <= chunk):
        block_rows = rows[start : start + chunk]
        inter = np.asarray((features[block_rows] @ cand).todense())
        if metric == "jaccard":
            union = sizes[block_rows][:, None] + sizes[candidates][None, :] - inter
            scores = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        else:
            scores = inter
        scores[block_rows[:, None] == candidates[None, :]] = -np.inf  # no self loops
        k = min(top_k, scores.shape[1])
        if k <= 0:
            continue
        # Stable order on ties (lower index first) so the graph does not depend on the platform.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(scores, order, axis=1)
        keep = best > threshold
        r_idx, c_idx = np.nonzero(keep)
        src.append(candidates[order[r_idx, c_idx]])
        dst.append(block_rows[r_idx])
        sim.append(best[r_idx, c_idx])
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (
        np.concatenate(src).astype(np.int64),
        np.concatenate(dst).astype(np.int64),
        np.concatenate(sim).astype(np.float32),
    )


def _graph_from_edges(num_genes: int, src, dst, weight, relation: str, info: dict) -> GeneGraph:
    return GeneGraph(
        num_genes,
        torch.as_tensor(np.stack([src, dst]), dtype=torch.long).reshape(2, -1),
        torch.zeros(len(src), dtype=torch.long),
        torch.as_tensor(weight, dtype=torch.float32),
        [relation],
        [],
        info,
    ).validate()


# ---- GO term sets for the vocab ------------------------------------------------------------------


def vocab_term_sets(
    context,
    knowledge_root: str | None,
    annotations: str,
    aspects,
    exclude_evidence,
    propagate: bool,
    relations: Sequence[str],
    cluster_min_share: float,
    allow_download: bool,
) -> tuple[list[frozenset[str] | None], dict[str, Any]]:
    """One GO term set per vocab symbol (None when unannotated).

    A symbol that names a gene cluster (``context.clusters``, e.g. k562_set) gets
    the terms annotated to at least ``cluster_min_share`` of its annotated members: the cluster's shared
    function, not the union of everything its members do.
    """
    from perturb_models.knowledge.annotations import symbol_go_terms

    symbols = context.vocab.symbols
    clusters = context.clusters
    wanted = [s for s in symbols if s not in clusters] + sorted({m for ms in clusters.values() for m in ms})
    terms, report = symbol_go_terms(
        wanted,
        knowledge_root,
        annotations,
        aspects,
        exclude_evidence,
        propagate,
        relations,
        allow_download,
        context.ensembl_ids,
    )
    sets: list[frozenset[str] | None] = []
    for s in symbols:
        if s in clusters:
            member_sets = [terms[m] for m in clusters[s] if m in terms]
            counts: dict[str, int] = {}
            for ts in member_sets:
                for t in ts:
                    counts[t] = counts.get(t, 0) + 1
            need = max(1.0, cluster_min_share * len(member_sets))
            shared = frozenset(t for t, c in counts.items() if c >= need)
            sets.append(shared or None)
        else:
            sets.append(terms.get(s))
    info = {
        "genes_in_gene_info": report.found,
        "genes_total": report.total,
        "missing_in_gene_info": len(report.missing),
        "clusters_mapped": len(clusters),
        "genes_with_go": sum(s is not None for s in sets),
    }
    return sets, info


def _incidence(sets: Sequence[frozenset[str] | None]) -> tuple[sparse.csr_matrix, list[str]]:
    vocab_terms = sorted({t for s in sets if s for t in s})
    index = {t: i for i, t in enumerate(vocab_terms)}
    rows, cols = [], []
    for r, s in enumerate(sets):
        for t in s or ():
            rows.append(r)
            cols.append(index[t])
    matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(sets), len(vocab_terms)))
    return matrix, vocab_terms


def _candidate_rows(context, candidates: str, usable: np.ndarray) -> np.ndarray:
    """Which nodes may be chosen as neighbours: every usable gene, or only training perturbations
    (what a retrieval model needs: neighbours whose responses are known)."""
    if candidates == "all":
        return usable
    if candidates == "train_perts":
        train = context.vocab.encode(context.train_perts)
        return np.intersect1d(usable, train)
    raise ValueError(f"graph candidates={candidates!r}: expected 'all' or 'train_perts'")


def go_similarity_graph(
    sets: Sequence[frozenset[str] | None], top_k: int = 20, threshold: float = 0.1, candidates: np.ndarray | None = None
) -> GeneGraph:
    """GEARS' GO graph from term sets: Jaccard similarity, each gene's top-k neighbours above threshold
    (neighbours drawn from ``candidates`` when given, else from every annotated gene)."""
    matrix, _ = _incidence(sets)
    annotated = np.flatnonzero(np.asarray(matrix.sum(axis=1)).ravel() > 0)
    pool = annotated if candidates is None else np.intersect1d(annotated, candidates)
    src, dst, sim = topk_similarity_edges(
        matrix, top_k, threshold, "jaccard", rows=annotated, candidates=pool, desc="GO Jaccard"
    )
    return _graph_from_edges(len(sets), src, dst, sim, "go_similarity", {"annotated_genes": int(len(annotated))})


def build_go(
    context,
    top_k: int = 20,
    threshold: float = 0.1,
    aspects=None,
    exclude_evidence=(),
    propagate: bool = False,
    relations=("is_a", "part_of"),
    annotations: str = "gene2go",
    cluster_min_share: float = 0.1,
    knowledge_root: str | None = None,
    allow_download: bool = True,
    candidates: str = "all",
    **_,
) -> GeneGraph:
    sets, info = vocab_term_sets(
        context,
        knowledge_root,
        annotations,
        aspects,
        exclude_evidence,
        propagate,
        relations,
        cluster_min_share,
        allow_download,
    )
    pool = None if candidates == "all" else _candidate_rows(context, candidates, np.arange(len(sets)))
    graph = go_similarity_graph(sets, top_k, threshold, pool)
    graph.info.update(info)
    return graph


def build_go_kg(
    context,
    max_term_degree: int = 300,
    min_term_degree: int = 2,
    term_relations=("is_a", "part_of"),
    aspects=None,
    exclude_evidence=(),
    propagate: bool = False,
    annotations: str = "gene2go",
    cluster_min_share: float = 0.1,
    knowledge_root: str | None = None,
    allow_download: bool = True,
    **_,
) -> GeneGraph:
    """Genes linked to their GO terms (both directions) plus term-term ontology edges among kept terms.

    Terms annotated to more than ``max_term_degree`` vocab genes are hubs that connect everything to
    everything and are dropped, as are terms with fewer than ``min_term_degree`` genes (no message passes).
    """
    from perturb_models.knowledge.files import knowledge_file
    from perturb_models.knowledge.go import read_obo

    sets, info = vocab_term_sets(
        context,
        knowledge_root,
        annotations,
        aspects,
        exclude_evidence,
        propagate,
        term_relations,
        cluster_min_share,
        allow_download,
    )
    matrix, terms = _incidence(sets)
    degree = np.asarray(matrix.sum(axis=0)).ravel()
    kept = np.flatnonzero((degree <= max_term_degree) & (degree >= min_term_degree))
    n = len(sets)
    term_node = {terms[t]: n + i for i, t in enumerate(kept)}
    sub = matrix[:, kept].tocoo()
    genes, term_nodes = sub.row.astype(np.int64), sub.col.astype(np.int64) + n
    ontology = read_obo(knowledge_file("go_obo", knowledge_root, allow_download))
    rel_names = ["gene_to_term", "term_to_gene"]
    src = [genes, term_nodes]
    dst = [term_nodes, genes]
    types = [np.zeros(len(genes), np.int64), np.ones(len(genes), np.int64)]
    for rel in term_relations:
        s_list, d_list = [], []
        for term_id, node in term_node.items():
            term = ontology.get(term_id)
            if term is None:
                continue
            for parent in term.parents([rel]):
                parent = ontology[parent].id if parent in ontology else parent
                if parent in term_node:
                    s_list.append(node)
                    d_list.append(term_node[parent])
        r = len(rel_names)
        rel_names += [f"{rel}", f"{rel}_inverse"]
        s_arr, d_arr = np.asarray(s_list, np.int64), np.asarray(d_list, np.int64)
        src += [s_arr, d_arr]
        dst += [d_arr, s_arr]
        types += [np.full(len(s_arr), r, np.int64), np.full(len(s_arr), r + 1, np.int64)]
    src_a, dst_a, types_a = np.concatenate(src), np.concatenate(dst), np.concatenate(types)
    graph = GeneGraph(
        n,
        torch.as_tensor(np.stack([src_a, dst_a]), dtype=torch.long),
        torch.as_tensor(types_a),
        torch.ones(len(src_a), dtype=torch.float32),
        rel_names,
        [terms[t] for t in kept],
        dict(info, hub_terms_dropped=int((degree > max_term_degree).sum()), terms_kept=int(len(kept))),
    )
    return graph.validate()


def response_matrix(train_pairs: pd.DataFrame, num_genes: int, signed: bool = True) -> sparse.csr_matrix:
    """Downstream gene x training perturbation matrix: +1 up, -1 down (1 DE if unsigned), 0 not DE / unmeasured.

    Built from ``context.train_pairs`` only, which holds no validation or test perturbation.
    """
    perts = np.sort(train_pairs["pert_idx"].unique())
    col = np.searchsorted(perts, train_pairs["pert_idx"].to_numpy())
    de = train_pairs["de"].to_numpy()
    direction = train_pairs["dir"].to_numpy()
    if signed:
        value = np.where(de == 1, np.where(direction == 1, 1.0, np.where(direction == 0, -1.0, 1.0)), 0.0)
    else:
        value = de.astype(np.float64)
    keep = value != 0
    return sparse.csr_matrix(
        (value[keep].astype(np.float32), (train_pairs["gene_idx"].to_numpy()[keep], col[keep])),
        shape=(num_genes, len(perts)),
    )


def build_coresponse(
    context, top_k: int = 20, threshold: float = 0.2, signed: bool = True, candidates: str = "all", **_
) -> GeneGraph:
    """Genes linked when their DE responses across the training perturbations are similar (cosine, top-k)."""
    matrix = response_matrix(context.train_pairs, context.num_genes, signed)
    responsive = np.flatnonzero(np.asarray(abs(matrix).sum(axis=1)).ravel() > 0)
    pool = _candidate_rows(context, candidates, responsive)
    src, dst, sim = topk_similarity_edges(
        matrix, top_k, threshold, "cosine", rows=responsive, candidates=pool, desc="co-response"
    )
    return _graph_from_edges(
        context.num_genes,
        src,
        dst,
        sim,
        "coresponse",
        {"responsive_genes": int(len(responsive)), "train_perts": int(matrix.shape[1])},
    )


def build_embedding(
    context,
    embeddings: Mapping[str, Any] | None = None,
    top_k: int = 20,
    threshold: float = 0.5,
    candidates: str = "all",
    **_,
) -> GeneGraph:
    """Genes linked when their embedding vectors are similar: each gene's top-k cosine neighbours above
    ``threshold``. Genes without a vector (zero rows) get no edge."""
    from perturb_models.knowledge.embeddings import full_spec, gene_embedding_table

    table = gene_embedding_table(context, full_spec(embeddings))
    found = np.flatnonzero(table.found)
    pool = _candidate_rows(context, candidates, found)
    src, dst, sim = topk_similarity_edges(
        sparse.csr_matrix(table.matrix.astype(np.float32)),
        top_k,
        threshold,
        "cosine",
        rows=found,
        candidates=pool,
        desc="embedding cosine",
    )
    return _graph_from_edges(
        context.num_genes,
        src,
        dst,
        sim,
        "embedding_similarity",
        {"source": table.source, "genes_with_vector": int(len(found))},
    )


BUILDERS = {"go": build_go, "go_kg": build_go_kg, "coresponse": build_coresponse, "embedding": build_embedding}
# Kinds whose inputs are cached elsewhere and whose build is cheap: never written as a graph file.
UNCACHED_KINDS = {"embedding"}
NON_KEY_PARAMS = {"cache", "cache_dir", "allow_download", "kind"}


# ---- caching ----------------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def graph_cache_key(kind: str, params: Mapping[str, Any], context) -> str:
    """Hash of the builder, its parameters and its inputs: vocab symbols, and either the knowledge files'
    fingerprints (knowledge graphs) or the training labels (label graphs)."""
    from perturb_models.knowledge.files import knowledge_file

    digest = hashlib.sha256()
    clean = {k: v for k, v in sorted(params.items()) if k not in NON_KEY_PARAMS}
    digest.update(
        json.dumps(
            {"kind": kind, "params": clean, "version": GRAPH_FORMAT_VERSION}, sort_keys=True, default=str
        ).encode()
    )
    digest.update("\n".join(context.vocab.symbols).encode())
    if params.get("candidates", "all") != "all":
        digest.update("\n".join(context.train_perts).encode())
    if kind == "coresponse":
        frame = context.train_pairs.loc[:, ["pert_idx", "gene_idx", "de", "dir"]].sort_values(["pert_idx", "gene_idx"])
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    else:
        root = params.get("knowledge_root")
        allow = params.get("allow_download", True)
        kinds = ["gene_info", "gene2go" if params.get("annotations", "gene2go") == "gene2go" else params["annotations"]]
        if params.get("propagate") or kind == "go_kg":
            kinds.append("go_obo")
        for k in kinds:
            digest.update(json.dumps(_file_fingerprint(knowledge_file(k, root, allow))).encode())
        mapping = {k: list(v) for k, v in context.clusters.items()}
        digest.update(json.dumps(mapping, sort_keys=True).encode())
        ensembl = dict(context.ensembl_ids)
        digest.update(json.dumps({"resolution": RESOLUTION_VERSION, "ensembl": ensembl}, sort_keys=True).encode())
    return digest.hexdigest()


def build_graph(spec: Mapping[str, Any], context, name: str | None = None) -> GeneGraph:
    """Build (or load from cache) the graph described by ``spec`` (a ``conf/graph/*.yaml``: ``kind`` + params)."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"graph {name or ''}: kind {kind!r} is not one of {', '.join(BUILDERS)}")
    params = {k: v for k, v in spec.items() if k != "kind"}
    for key in ("aspects", "exclude_evidence", "relations", "term_relations"):
        if isinstance(params.get(key), (list, tuple)):
            params[key] = tuple(params[key])
    use_cache = params.get("cache", True) and kind not in UNCACHED_KINDS
    path = None
    if use_cache:
        folder = Path(params.get("cache_dir") or cache_dir("graphs"))
        path = folder / f"{context.dataset}-{kind}-{graph_cache_key(kind, params, context)[:20]}.pt"
        if path.is_file():
            try:
                graph = GeneGraph.from_file(path)
            except Exception as exc:  # truncated, foreign or old-format file: it is only a cache, rebuild it
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("graph cache %s is unreadable (%s); rebuilding it", path, reason[:200])
            else:
                log.info("graph %s loaded from cache %s", name or kind, path)
                _log_graph(graph, name or kind)
                return graph
    builder_params = {k: v for k, v in params.items() if k not in ("cache", "cache_dir", "kind")}
    graph = BUILDERS[kind](context, **builder_params)
    graph.info.update(kind=kind)
    if path is not None:
        atomic_write_bytes(path, graph.to_bytes())
        log.info("graph %s cached at %s", name or kind, path)
    _log_graph(graph, name or kind)
    return graph


def _log_graph(graph: GeneGraph, name: str) -> None:
    log.info("%s (%s)", graph.summary(name), {k: v for k, v in graph.info.items() if isinstance(v, (int, float, str))})


def build_graphs(specs: Mapping[str, Mapping[str, Any]], context) -> GeneGraph:
    """Build each named graph and combine them into one multi-relational graph (edge type per source)."""
    if not specs:
        raise ValueError("no graph given: set model.encoder.graphs (see conf/graph/)")
    graphs = {name: build_graph(spec, context, name) for name, spec in specs.items()}
    combined = combine_graphs(graphs)
    log.info("combined %s", combined.summary("graph"))
    return combined


# ---- genes appended after training (predict.py) -----------------------------------------------------

# Graph kinds that can give a gene appended to a trained vocabulary its in-edges, and the relation name
# each kind's graph carries (one relation per kind, as ``combine_graphs`` names it ``source:relation``).
EXTENSIBLE_KINDS = {"go": "go_similarity", "embedding": "embedding_similarity", "coresponse": "coresponse"}


def _new_gene_go_edges(
    context,
    num_known: int,
    top_k: int = 20,
    threshold: float = 0.1,
    aspects=None,
    exclude_evidence=(),
    propagate: bool = False,
    relations=("is_a", "part_of"),
    annotations: str = "gene2go",
    cluster_min_share: float = 0.1,
    knowledge_root=None,
    allow_download: bool = True,
    candidates: str = "all",
    **_,
):
    sets, _info = vocab_term_sets(
        context,
        knowledge_root,
        annotations,
        aspects,
        exclude_evidence,
        propagate,
        relations,
        cluster_min_share,
        allow_download,
    )
    matrix, _terms = _incidence(sets)
    annotated = np.flatnonzero(np.asarray(matrix.sum(axis=1)).ravel() > 0)
    known = annotated[annotated < num_known]
    pool = known if candidates == "all" else _candidate_rows(context, candidates, known)
    rows = annotated[annotated >= num_known]
    if len(rows) == 0 or len(pool) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return topk_similarity_edges(
        matrix, top_k, threshold, "jaccard", rows=rows, candidates=pool, desc="GO Jaccard (new genes)"
    )


def _new_gene_embedding_edges(
    context, num_known: int, embeddings=None, top_k: int = 20, threshold: float = 0.5, candidates: str = "all", **_
):
    from perturb_models.knowledge.embeddings import full_spec, symbols_embedding_table

    spec = full_spec(embeddings)
    symbols = context.vocab.symbols
    ensembl = context.ensembl_ids
    known = symbols_embedding_table(symbols[:num_known], spec, context.clusters, ensembl_ids=ensembl)  # cached
    new = symbols_embedding_table(symbols[num_known:], spec, context.clusters, ensembl_ids=ensembl)
    matrix = np.concatenate([known.matrix, new.matrix]).astype(np.float32)
    found = np.concatenate([known.found, new.found])
    known_found = np.flatnonzero(found[:num_known])
    pool = _candidate_rows(context, candidates, known_found)
    rows = np.flatnonzero(found[num_known:]) + num_known
    if len(rows) == 0 or len(pool) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return topk_similarity_edges(
        sparse.csr_matrix(matrix),
        top_k,
        threshold,
        "cosine",
        rows=rows,
        candidates=pool,
        desc="embedding cosine (new genes)",
    )


def _new_gene_coresponse_edges(context, num_known: int, **_):
    # A gene appended after training has no training response, hence no co-response neighbour.
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


_NEW_GENE_EDGES = {
    "go": _new_gene_go_edges,
    "embedding": _new_gene_embedding_edges,
    "coresponse": _new_gene_coresponse_edges,
}


def _new_gene_go_kg_edges(context, num_known: int, terms: Sequence[str], **params):
    """``go_kg``'s rule for appended genes: an edge from each of the training graph's GO-term nodes
    (``terms``, in node order) annotated to the new gene, into it (``term_to_gene``); returned as (term
    position, gene vocab index, weight)."""
    keys = ("aspects", "exclude_evidence", "propagate", "cluster_min_share", "knowledge_root", "allow_download")
    options = {k: params[k] for k in keys if k in params}
    sets, _info = vocab_term_sets(
        context,
        options.get("knowledge_root"),
        params.get("annotations", "gene2go"),
        options.get("aspects"),
        tuple(options.get("exclude_evidence") or ()),
        bool(options.get("propagate", False)),
        tuple(params.get("term_relations") or ("is_a", "part_of")),
        float(options.get("cluster_min_share", 0.1)),
        bool(options.get("allow_download", True)),
    )
    position = {term: i for i, term in enumerate(terms)}
    src, dst = [], []
    for gene in range(num_known, len(sets)):
        for term in sorted(sets[gene] or ()):
            if term in position:
                src.append(position[term])
                dst.append(gene)
    return np.asarray(src, np.int64), np.asarray(dst, np.int64), np.ones(len(src), np.float32)


def new_gene_edges(specs: Mapping[str, Mapping[str, Any]], context, num_known: int) -> GeneGraph:
    """The edges that genes appended to a trained vocabulary get in the graph ``build_graphs(specs, ...)``
    built over the first ``num_known`` genes: each builder's rule applied to the new genes only, from the
    known genes (the pool the training graph drew from) or, for ``go_kg``, from its GO-term nodes. Every edge
    points into a new gene, so no known node gains an in-edge, a neighbour or a degree: what message
    passing, normalisation and retrieval compute for known nodes is unchanged.

    Node layout (what the returned graph's ids mean): the known genes, then the training graph's other nodes
    (``go_kg``'s terms, in ``combine_graphs`` order), then the new genes in vocabulary order; without other
    nodes a new gene's node id is its vocabulary index. Edge types are those of the combined training graph."""
    from dataclasses import replace

    n = context.num_genes
    known_context = None
    layout = []  # per source: (name, spec, relation names, its other nodes)
    for name, spec in specs.items():
        kind = spec.get("kind")
        if kind == "go_kg":
            if known_context is None:
                vocab = type(context.vocab)(list(context.vocab.symbols[:num_known]))
                known_context = replace(context, vocab=vocab)
            trained = build_graph(spec, known_context, name)  # the training run's graph (from the cache)
            layout.append((name, spec, list(trained.relations), list(trained.extra_nodes)))
        elif kind in EXTENSIBLE_KINDS:
            layout.append((name, spec, [EXTENSIBLE_KINDS[kind]], []))
        else:
            raise ValueError(
                f"graph {name} (kind {kind}) cannot give genes outside the training vocabulary their "
                f"edges; kinds that can: {', '.join([*EXTENSIBLE_KINDS, 'go_kg'])}"
            )
    num_other = sum(len(other) for *_, other in layout)
    src_all, dst_all, weight_all, type_all = [], [], [], []
    relation_offset = other_offset = 0
    for name, spec, relations, other in layout:
        params = {k: v for k, v in spec.items() if k not in NON_KEY_PARAMS or k == "allow_download"}
        for key in ("aspects", "exclude_evidence", "relations", "term_relations"):
            if isinstance(params.get(key), (list, tuple)):
                params[key] = tuple(params[key])
        if spec["kind"] == "go_kg":
            src, dst, weight = _new_gene_go_kg_edges(context, num_known, other, **params)
            src = src + num_known + other_offset
            edge_type = relation_offset + relations.index("term_to_gene")
        else:
            src, dst, weight = _NEW_GENE_EDGES[spec["kind"]](context, num_known, **params)
            edge_type = relation_offset
        src_all.append(src)
        dst_all.append(dst + num_other)
        weight_all.append(weight)
        type_all.append(np.full(len(src), edge_type, np.int64))
        log.info("graph %s: %d edges into %d new genes", name, len(src), n - num_known)
        relation_offset += len(relations)
        other_offset += len(other)
    src, dst = np.concatenate(src_all), np.concatenate(dst_all)
    graph = GeneGraph(
        num_known,
        torch.as_tensor(np.stack([src, dst]), dtype=torch.long).reshape(2, -1),
        torch.as_tensor(np.concatenate(type_all)),
        torch.as_tensor(np.concatenate(weight_all), dtype=torch.float32),
        [f"{name}:{r}" for name, _spec, relations, _other in layout for r in relations],
        [f"{name}:{t}" for name, _spec, _rel, other in layout for t in other] + list(context.vocab.symbols[num_known:]),
        {"new_genes": n - num_known, "other_nodes": num_other},
    ).validate()
    if graph.num_edges and int(graph.edge_index[1].min()) < num_known + num_other:
        raise AssertionError("new-gene edges must point into a new gene")
    return graph


def new_gene_touched(graph: GeneGraph) -> torch.Tensor:
    """Bool per new gene of a ``new_gene_edges`` graph (the last nodes): it has at least one edge."""
    return graph.touched_nodes()[graph.num_nodes - int(graph.info["new_genes"]) :]
