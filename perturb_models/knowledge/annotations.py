"""From dataset symbols to GO term sets: gene_info resolution + gene2go (or a GAF) + optional propagation."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence

from perturb_models.knowledge.files import knowledge_file
from perturb_models.knowledge.gene_info import CoverageReport, SymbolResolver, read_gene_info
from perturb_models.knowledge.go import gene_term_sets, read_gaf, read_gene2go, read_obo

log = logging.getLogger(__name__)


def resolve_symbols(
    symbols: Sequence[str],
    root: str | os.PathLike | None = None,
    allow_download: bool = True,
    title: str = "genes",
    ensembl_ids: Mapping[str, str] | None = None,
) -> CoverageReport:
    """Resolve dataset symbols to GeneIDs through gene_info (``SymbolResolver.resolve_many``: symbol,
    synonyms, the dataset's Ensembl ids, hyphen-less forms); log the coverage."""
    resolver = SymbolResolver(read_gene_info(knowledge_file("gene_info", root, allow_download)))
    report = resolver.resolve_many(symbols, ensembl_ids)
    log.info("gene_info coverage: %s", report.summary(title))
    return report


def symbol_go_terms(
    symbols: Sequence[str],
    root: str | os.PathLike | None = None,
    annotations: str = "gene2go",
    aspects: Iterable[str] | None = None,
    exclude_evidence: Iterable[str] = (),
    propagate: bool = False,
    relations: Iterable[str] = ("is_a", "part_of"),
    allow_download: bool = True,
    ensembl_ids: Mapping[str, str] | None = None,
) -> tuple[dict[str, frozenset[str]], CoverageReport]:
    """GO term set per dataset symbol (symbols without annotations are absent from the dict).

    ``annotations`` is ``gene2go`` (keyed by GeneID, joined through gene_info) or the path of a GAF file
    (keyed by symbol; symbols missing there are tried through gene_info synonyms). ``ensembl_ids``: the
    dataset's symbol -> Ensembl id map (``DataContext.ensembl_ids``), for symbols gene_info cannot settle.
    """
    ontology = read_obo(knowledge_file("go_obo", root, allow_download)) if propagate else None
    report = resolve_symbols(symbols, root, allow_download, "dataset genes in gene_info", ensembl_ids)
    if annotations == "gene2go":
        table = read_gene2go(knowledge_file("gene2go", root, allow_download))
        by_gene = gene_term_sets(table, aspects, exclude_evidence, ontology, propagate, relations)
        terms = {s: by_gene[g] for s, g in report.mapping.items() if g in by_gene}
    else:
        table = read_gaf(knowledge_file(annotations, root, allow_download))
        by_symbol = gene_term_sets(table, aspects, exclude_evidence, ontology, propagate, relations)
        resolver_symbols = {}
        # A GAF names genes by their current symbol: route renamed dataset symbols through gene_info.
        gene_info = read_gene_info(knowledge_file("gene_info", root, allow_download))
        current = dict(zip(gene_info["gene_id"], gene_info["symbol"]))
        for s in symbols:
            if s in by_symbol:
                resolver_symbols[s] = by_symbol[s]
            elif s in report.mapping and current.get(report.mapping[s]) in by_symbol:
                resolver_symbols[s] = by_symbol[current[report.mapping[s]]]
        terms = resolver_symbols
    log.info("GO annotations: %d of %d dataset genes have at least one term", len(terms), len(set(symbols)))
    return terms, report
