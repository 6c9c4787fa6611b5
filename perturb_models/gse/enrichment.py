"""GO over-representation analysis: the classic way to name a gene cluster (what PerturbQA's authors ran
with gseapy), with scipy's hypergeometric test and Benjamini-Hochberg correction.

Population: the background genes (the dataset's genes, see :mod:`perturb_models.data.gse`) that have at
least one GO annotation in the chosen aspects, as in goatools/GOstats. Term sets are propagated up the
GO DAG (``is_a`` and ``part_of``), kept when their size within the population is in
``[min_size, max_size]``. For a cluster of ``n`` annotated genes, ``k`` of them in a term of ``K`` genes,
out of ``N``: ``p = P(X >= k)``, ``X ~ Hypergeom(N, K, n)`` (``scipy.stats.hypergeom.sf(k - 1, N, K, n)``);
q-values by BH over every term tested (terms without a hit count, with p = 1).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from perturb_models.gse.base import Namer

log = logging.getLogger(__name__)


@dataclass
class GOSets:
    """GO term -> member symbols within the population, and term names."""

    term_genes: dict[str, frozenset[str]]
    names: dict[str, str]
    gene_terms: dict[str, frozenset[str]]
    population: frozenset[str]
    info: dict[str, Any]

    @property
    def N(self) -> int:
        return len(self.population)


_CACHE: dict[tuple, GOSets] = {}


def load_go_sets(
    background: Sequence[str],
    root: str | os.PathLike | None = None,
    aspects: Sequence[str] = ("P", "F", "C"),
    exclude_evidence: Sequence[str] = (),
    min_size: int = 3,
    max_size: int = 500,
    allow_download: bool = True,
    ensembl_ids: Mapping[str, str] | None = None,
) -> GOSets:
    """Propagated GO term sets over ``background`` symbols from gene_info + gene2go + GO OBO (memoised);
    ``ensembl_ids`` settle the symbols gene_info alone cannot (``GSEContext.ensembl_ids``)."""
    from perturb_models.knowledge.files import knowledge_root

    key = (
        tuple(background),
        str(knowledge_root(root)),
        tuple(aspects),
        tuple(exclude_evidence),
        int(min_size),
        int(max_size),
        tuple(sorted((ensembl_ids or {}).items())),
    )
    if key in _CACHE:
        return _CACHE[key]
    from perturb_models.knowledge.files import knowledge_file
    from perturb_models.knowledge.gene_info import SymbolResolver, read_gene_info
    from perturb_models.knowledge.go import gene_term_sets, read_gene2go, read_obo

    resolver = SymbolResolver(read_gene_info(knowledge_file("gene_info", root, allow_download)))
    report = resolver.resolve_many(background, ensembl_ids)
    log.info("GO enrichment background: %s", report.summary("background genes in gene_info"))
    ids = report.mapping
    annotations = read_gene2go(knowledge_file("gene2go", root, allow_download))
    annotations = annotations.loc[annotations["gene"].isin(set(ids.values()))]
    ontology = read_obo(knowledge_file("go_obo", root, allow_download))
    by_id = gene_term_sets(
        annotations, aspects=aspects, exclude_evidence=exclude_evidence, ontology=ontology, propagate=True
    )
    gene_terms_all = {symbol: by_id[gid] for symbol, gid in ids.items() if gid in by_id}
    members: dict[str, set[str]] = {}
    for symbol, terms in gene_terms_all.items():
        for term in terms:
            members.setdefault(term, set()).add(symbol)
    term_genes = {
        t: frozenset(g)
        for t, g in members.items()
        if min_size <= len(g) <= max_size and t in ontology and not ontology[t].is_obsolete
    }
    gene_terms = {s: frozenset(t for t in ts if t in term_genes) for s, ts in gene_terms_all.items()}
    names = {t: ontology[t].name for t in term_genes}
    info = {
        "background": len(background),
        "resolved": len(ids),
        "population": len(gene_terms_all),
        "terms": len(term_genes),
        "aspects": list(aspects),
        "min_size": min_size,
        "max_size": max_size,
    }
    log.info("GO sets: %s", info)
    sets = GOSets(term_genes, names, gene_terms, frozenset(gene_terms_all), info)
    _CACHE[key] = sets
    return sets


def enrich(genes: Iterable[str], sets: GOSets) -> pd.DataFrame:
    """Every term with at least one hit, by p-value (then smaller terms first, then id): ``go_id, name,
    overlap, term_size, cluster_size, population, p_value, q_value``."""
    from scipy.stats import false_discovery_control, hypergeom

    cluster = [g for g in dict.fromkeys(genes) if g in sets.population]
    n, N = len(cluster), sets.N
    hits = Counter(t for g in cluster for t in sets.gene_terms.get(g, ()))
    columns = ["go_id", "name", "overlap", "term_size", "cluster_size", "population", "p_value", "q_value"]
    if not hits:
        return pd.DataFrame(columns=columns)
    terms = sorted(hits)
    k = np.array([hits[t] for t in terms])
    K = np.array([len(sets.term_genes[t]) for t in terms])
    p = hypergeom.sf(k - 1, N, K, n)
    # BH over every term in the size range: the ones without a hit are tests with p = 1.
    untested = len(sets.term_genes) - len(terms)
    q = false_discovery_control(np.concatenate([p, np.ones(untested)]), method="bh")[: len(terms)]
    table = pd.DataFrame(
        {
            "go_id": terms,
            "name": [sets.names[t] for t in terms],
            "overlap": k,
            "term_size": K,
            "cluster_size": n,
            "population": N,
            "p_value": p,
            "q_value": q,
        }
    )
    return table.sort_values(["p_value", "term_size", "go_id"], kind="mergesort").reset_index(drop=True)


class GOEnrichmentNamer(Namer):
    """``model=go_enrichment``: the answer is the name of the most significant GO term of the cluster;
    the top-k terms are kept as evidence. No training."""

    def __init__(
        self,
        aspects: Sequence[str] = ("P", "F", "C"),
        exclude_evidence: Sequence[str] = (),
        min_size: int = 3,
        max_size: int = 500,
        top_k: int = 5,
        knowledge_root: str | None = None,
    ):
        self.aspects, self.exclude_evidence = list(aspects), list(exclude_evidence)
        self.min_size, self.max_size, self.top_k = int(min_size), int(max_size), int(top_k)
        self.knowledge_root = knowledge_root
        self.sets: GOSets | None = None

    def setup(self, context) -> None:
        self.sets = load_go_sets(
            context.background,
            self.knowledge_root,
            self.aspects,
            self.exclude_evidence,
            self.min_size,
            self.max_size,
            ensembl_ids=context.ensembl_ids,
        )

    def predict(self, clusters: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """Per cluster: ``answer`` (top term name, '' when no term is hit), ``score`` (-log10 q of the top
        term) and ``evidence`` (top-k term names, '; '-joined)."""
        if self.sets is None:
            raise RuntimeError("call setup(context) first")
        out = []
        for genes in clusters:
            table = enrich(genes, self.sets)
            if table.empty:
                out.append({"answer": "", "score": 0.0, "evidence": ""})
                continue
            top = table.head(self.top_k)
            q = float(top["q_value"].iloc[0])
            out.append(
                {
                    "answer": str(top["name"].iloc[0]),
                    "score": max(0.0, -math.log10(max(q, 1e-300))),
                    "evidence": "; ".join(top["name"]),
                }
            )
        return out
