"""One deterministic description per gene (GenePT-style), for sentence-encoder gene embeddings.

A gene's text is built from NCBI ``gene_info`` (symbol, full name, synonyms, gene type) and the names of
its GO terms from ``gene2go`` (optionally their definitions from the GO OBO), within a character budget.
Gene clusters (k562_set's downstream "genes", e.g. ``12-oxidative phosphorylation``) get the cluster
name and their member symbols. ``TextRecipe.version`` names the recipe and its parameters: embedding
caches are keyed by it, so changing the recipe (or ``TEXT_VERSION``) invalidates them.

    python -m perturb_models.knowledge.text KRAS TP53 --definitions
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from perturb_models.knowledge.files import knowledge_file
from perturb_models.knowledge.gene_info import RESOLUTION_VERSION

log = logging.getLogger(__name__)

# Bump when the wording or ordering below changes: it is part of every embedding cache key.
TEXT_VERSION = "gene-text-v1"

ASPECT_TITLES = (("P", "Biological processes"), ("F", "Molecular functions"), ("C", "Cellular components"))
CLUSTER_NAME = re.compile(r"^(\d+)-(.+)$")


@dataclass(frozen=True)
class TextRecipe:
    """Parameters of the gene text. ``max_chars`` bounds the whole text (cut at a term boundary);
    ``max_terms_per_aspect`` keeps one GO aspect from crowding out the others."""

    synonyms: bool = True
    go: bool = True
    definitions: bool = False
    aspects: tuple[str, ...] = ("P", "F", "C")
    max_terms_per_aspect: int = 12
    max_synonyms: int = 8
    max_members: int = 40
    max_chars: int = 500

    @property
    def version(self) -> str:
        params = json.dumps(asdict(self), sort_keys=True)
        return f"{TEXT_VERSION}-r{RESOLUTION_VERSION}-{hashlib.sha256(params.encode()).hexdigest()[:10]}"

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> TextRecipe:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown gene-text option(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}"
            )
        if "aspects" in values:
            values["aspects"] = tuple(values["aspects"])
        return cls(**values)


@dataclass
class GeneTexts:
    """Texts per symbol plus which symbols had knowledge (found in gene_info, or a mapped cluster)."""

    texts: dict[str, str]
    has_knowledge: dict[str, bool]
    recipe: TextRecipe
    info: dict = field(default_factory=dict)

    def missing(self) -> list[str]:
        return sorted(s for s, ok in self.has_knowledge.items() if not ok)


def _clip(parts: list[str], budget: int) -> str:
    """Join sentences/terms, dropping whole trailing items that would pass the budget."""
    out = ""
    for part in parts:
        candidate = f"{out} {part}".strip() if out else part
        if len(candidate) > budget:
            break
        out = candidate
    return out


def _term_items(term_ids: Sequence[str], names: Mapping[str, str], definitions: Mapping[str, str] | None) -> list[str]:
    items = []
    for term in term_ids:
        name = names.get(term, term)
        if definitions and definitions.get(term):
            items.append(f"{name} ({definitions[term].rstrip('.')})")
        else:
            items.append(name)
    return items


def gene_text(
    symbol: str,
    name: str | None,
    synonyms: Sequence[str],
    gene_type: str | None,
    terms_by_aspect: Mapping[str, Sequence[str]],
    recipe: TextRecipe,
) -> str:
    """The text of one gene from its gene_info fields and its GO term labels (already ordered)."""
    head = [f"Gene {symbol}" + (f": {name}." if name else ".")]
    if recipe.synonyms and synonyms:
        head.append("Also known as " + ", ".join(list(synonyms)[: recipe.max_synonyms]) + ".")
    if gene_type and gene_type not in ("-", "unknown"):
        head.append(f"Type: {gene_type.replace('-', ' ')}.")
    text = _clip(head, recipe.max_chars)
    present = [(a, t) for a, t in ASPECT_TITLES if terms_by_aspect.get(a)]
    for rank, (aspect, title) in enumerate(present):
        labels = list(terms_by_aspect[aspect])[: recipe.max_terms_per_aspect]
        # Share the remaining budget between the aspects still to come, so processes cannot crowd out
        # functions and components.
        room = (recipe.max_chars - len(text)) // (len(present) - rank) - len(title) - 4
        if room <= 0:
            break
        joined = _clip([label + "," for label in labels], room + 1).rstrip(",")  # +1: the last comma goes
        if joined:
            text += f" {title}: {joined}."
    return text


def cluster_text(cluster: str, members: Sequence[str], recipe: TextRecipe) -> str:
    """A k562_set cluster: its name (without the numeric prefix) and its member symbols."""
    match = CLUSTER_NAME.match(cluster)
    label = match.group(2) if match else cluster
    head = f"Gene cluster {label}."
    shown = sorted(members)[: recipe.max_members]
    return _clip([head, f"Member genes: {', '.join(shown)}."], recipe.max_chars) or head[: recipe.max_chars]


def build_gene_texts(
    symbols: Sequence[str],
    root: str | os.PathLike | None = None,
    recipe: TextRecipe | None = None,
    clusters: Mapping[str, Sequence[str]] | None = None,
    allow_download: bool = True,
    ensembl_ids: Mapping[str, str] | None = None,
) -> GeneTexts:
    """Texts for ``symbols`` from the knowledge files in ``root`` (see ``knowledge_file``).

    Symbols resolve through gene_info (``SymbolResolver.resolve_many``: official symbol, synonyms, the
    dataset's Ensembl ids ``ensembl_ids``, hyphen-less forms). A symbol not found
    gets the text ``Gene SYMBOL.`` and ``has_knowledge=False``; callers decide what to do with it.
    ``clusters`` maps cluster names to member symbols (k562_set).
    """
    from perturb_models.knowledge.gene_info import SymbolResolver, read_gene_info
    from perturb_models.knowledge.go import filter_annotations, read_gene2go, read_obo

    recipe = recipe or TextRecipe()
    clusters = {k: list(v) for k, v in (clusters or {}).items() if k in set(symbols)}
    genes = [s for s in dict.fromkeys(symbols) if s not in clusters]
    gene_info = read_gene_info(knowledge_file("gene_info", root, allow_download))
    resolver = SymbolResolver(gene_info)
    report = resolver.resolve_many(genes, ensembl_ids)
    log.info("gene text: %s", report.summary("genes in gene_info"))
    rows = gene_info.set_index("gene_id")
    terms: dict[int, dict[str, list[str]]] = {}
    names: dict[str, str] = {}
    definitions: dict[str, str] | None = None
    if recipe.go:
        table = read_gene2go(knowledge_file("gene2go", root, allow_download))
        wanted = set(report.mapping.values())
        # The graphs' filter (NOT qualifiers out, aspects). Unlike the GO graph, texts keep ND evidence and
        # the root terms: dropping them would change every text, hence every text embedding and its results.
        table = filter_annotations(table.loc[table["gene"].isin(wanted)], recipe.aspects)
        names.update(dict(zip(table["go_id"], table["go_term"])))
        if recipe.definitions:
            ontology = read_obo(knowledge_file("go_obo", root, allow_download))
            definitions = {t: term.definition for t, term in ontology.items()}
            names.update({t: term.name for t, term in ontology.items() if term.name})
        # Deterministic order: alphabetical term label inside each aspect.
        table = table.drop_duplicates(["gene", "go_id"]).assign(label=lambda f: f["go_id"].map(names))
        for (gene, aspect), group in table.sort_values(["gene", "aspect", "label", "go_id"]).groupby(
            ["gene", "aspect"], sort=False
        ):
            terms.setdefault(int(gene), {})[aspect] = list(group["go_id"])
    texts: dict[str, str] = {}
    has: dict[str, bool] = {}
    for symbol in genes:
        gid = report.mapping.get(symbol)
        if gid is None:
            texts[symbol] = f"Gene {symbol}."
            has[symbol] = False
            continue
        row = rows.loc[gid]
        if isinstance(row, type(gene_info)):  # duplicated GeneID rows: keep the first
            row = row.iloc[0]
        official = str(row["symbol"])
        # gene_info synonyms hold stray quotes and repeats ('C-K-RAS|C-K-RAS): clean, keep first order.
        syns = [official] if official != symbol else []
        syns += [s.strip("'\"") for s in row["synonyms"]]
        syns = [s for s in dict.fromkeys(syns) if s and s != symbol]
        by_aspect = {a: _term_items(ids, names, definitions) for a, ids in terms.get(gid, {}).items()}
        texts[symbol] = gene_text(
            symbol, str(row["description"]) or None, syns, str(row["type_of_gene"]), by_aspect, recipe
        )
        has[symbol] = True
    for cluster, members in clusters.items():
        texts[cluster] = cluster_text(cluster, members, recipe)
        has[cluster] = True
    info = {
        "genes": len(genes),
        "genes_in_gene_info": report.found,
        "genes_missing": len(report.missing),
        "genes_with_go": sum(1 for s in genes if report.mapping.get(s) in terms),
        "clusters": len(clusters),
    }
    log.info("gene text (%s): %s", recipe.version, info)
    return GeneTexts({s: texts[s] for s in symbols}, {s: has[s] for s in symbols}, recipe, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the description text of genes.")
    parser.add_argument("symbols", nargs="+")
    parser.add_argument("--root", default=None, help="knowledge folder (default $PERTURB_KNOWLEDGE or the user cache)")
    parser.add_argument("--definitions", action="store_true", help="append GO term definitions")
    parser.add_argument("--max-chars", type=int, default=TextRecipe.max_chars)
    parser.add_argument("--no-download", action="store_true")
    args = parser.parse_args(argv)
    recipe = TextRecipe(definitions=args.definitions, max_chars=args.max_chars)
    result = build_gene_texts(args.symbols, args.root, recipe, allow_download=not args.no_download)
    print(f"# recipe {recipe.version}")
    for symbol in args.symbols:
        flag = "" if result.has_knowledge[symbol] else "  [not in gene_info]"
        print(f"{symbol}{flag}\n{result.texts[symbol]}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
