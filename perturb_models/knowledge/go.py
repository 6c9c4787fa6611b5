"""Gene Ontology readers: NCBI ``gene2go``, GO GAF annotations and the GO OBO ontology, and propagation
of annotations up the GO DAG.

Annotation tables share one shape: columns ``gene`` (GeneID for gene2go, symbol for GAF), ``go_id``,
``evidence``, ``qualifier``, ``aspect`` (``P`` process, ``F`` function, ``C`` component).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

from perturb_models.knowledge.files import open_text

ASPECTS = {
    "biological_process": "P",
    "molecular_function": "F",
    "cellular_component": "C",
    "Process": "P",
    "Function": "F",
    "Component": "C",
    "P": "P",
    "F": "F",
    "C": "C",
}
GENE2GO_COLUMNS = ("#tax_id", "GeneID", "GO_ID", "Evidence", "Qualifier", "Category")


def normalise_aspects(aspects: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """``["biological_process", "F"]`` -> ``("P", "F")``; None keeps every aspect."""
    if aspects is None:
        return None
    if isinstance(aspects, str):
        aspects = [aspects]
    out = []
    for a in aspects:
        if a not in ASPECTS:
            raise ValueError(
                f"unknown GO aspect {a!r}: expected one of P, F, C or biological_process, molecular_function, "
                f"cellular_component"
            )
        out.append(ASPECTS[a])
    return tuple(sorted(set(out)))


def read_gene2go(path: str | os.PathLike, tax_id: int | None = 9606, chunksize: int = 1_000_000) -> pd.DataFrame:
    """Read NCBI ``gene2go`` (plain or gzip; the public file holds every species, so rows are filtered
    to ``tax_id`` while reading). Returns ``gene`` (GeneID, int), ``go_id``, ``evidence``, ``qualifier``,
    ``aspect``, ``go_term``."""
    with open_text(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        missing = [c for c in GENE2GO_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: not an NCBI gene2go file; header line lacks {', '.join(missing)} (got {header})")
        parts = []
        for chunk in pd.read_csv(
            handle, sep="\t", names=header, dtype=str, quoting=3, keep_default_na=False, chunksize=chunksize
        ):
            if tax_id is not None:
                chunk = chunk.loc[chunk["#tax_id"] == str(tax_id)]
            parts.append(chunk)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=header)
    unknown = ~frame["Category"].isin(list(ASPECTS))
    if unknown.any():
        row = frame.loc[unknown].iloc[0]
        raise ValueError(
            f"{path}: GeneID {row['GeneID']}, {row['GO_ID']}: Category {row['Category']!r} is not "
            f"Process/Function/Component"
        )
    return pd.DataFrame(
        {
            "gene": frame["GeneID"].astype("int64"),
            "go_id": frame["GO_ID"],
            "evidence": frame["Evidence"],
            "qualifier": frame["Qualifier"].replace("-", ""),
            "aspect": frame["Category"].map(ASPECTS),
            "go_term": frame["GO_term"] if "GO_term" in frame else "",
        }
    )


def read_gaf(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GO Annotation File (GAF 2.x, plain or gzip). ``gene`` is the DB_Object_Symbol column;
    also returns ``db_object_id``, ``synonyms`` (list) and ``taxon``."""
    rows = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.startswith("!") or not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 15:
                raise ValueError(
                    f"{path}: line {number}: a GAF row has at least 15 tab-separated columns, got {len(cols)}"
                )
            if cols[8] not in ("P", "F", "C"):
                raise ValueError(f"{path}: line {number}: aspect {cols[8]!r} is not P, F or C")
            if not cols[4].startswith("GO:"):
                raise ValueError(f"{path}: line {number}: GO id {cols[4]!r} does not start with 'GO:'")
            # GAF 2.x columns: 1 DB_Object_ID, 2 DB_Object_Symbol, 3 Qualifier, 4 GO ID, 6 Evidence Code,
            # 8 Aspect, 10 DB_Object_Synonym (|-separated), 12 Taxon
            rows.append(
                (cols[2], cols[1], cols[4], cols[6], cols[3], cols[8], [s for s in cols[10].split("|") if s], cols[12])
            )
    return pd.DataFrame(
        rows, columns=["gene", "db_object_id", "go_id", "evidence", "qualifier", "aspect", "synonyms", "taxon"]
    )


@dataclass
class GOTerm:
    """One ontology term with its parents; ``relationships`` maps a relation (part_of, regulates,
    positively_regulates, ...) to the target term ids."""

    id: str
    name: str = ""
    namespace: str = ""
    definition: str = ""
    is_a: list[str] = field(default_factory=list)
    relationships: dict[str, list[str]] = field(default_factory=dict)
    alt_ids: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    is_obsolete: bool = False

    @property
    def part_of(self) -> list[str]:
        return self.relationships.get("part_of", [])

    @property
    def regulates(self) -> list[str]:
        return self.relationships.get("regulates", [])

    @property
    def aspect(self) -> str | None:
        return ASPECTS.get(self.namespace)

    def parents(self, relations: Iterable[str] = ("is_a", "part_of")) -> list[str]:
        out = []
        for rel in relations:
            out.extend(self.is_a if rel == "is_a" else self.relationships.get(rel, []))
        return out


def _quoted(value: str) -> str:
    if value.startswith('"'):
        end = value.find('"', 1)
        while end > 0 and value[end - 1] == "\\":
            end = value.find('"', end + 1)
        return value[1:end] if end > 0 else value[1:]
    return value


def read_obo(path: str | os.PathLike) -> dict[str, GOTerm]:
    """Read an OBO 1.2 ontology (plain or gzip): ``[Term]`` stanzas to ``GOTerm`` by id.

    Alternative ids (``alt_id``) are also keys, pointing at their primary term, so annotations made
    with an old id still land on the right term.
    """
    terms: dict[str, GOTerm] = {}
    current: GOTerm | None = None
    in_term = False

    def close():
        if current is not None:
            if current.id in terms:
                raise ValueError(f"{path}: term {current.id} is defined twice")
            terms[current.id] = current

    with open_text(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if line.startswith("["):
                close()
                current = None
                in_term = line == "[Term]"
                continue
            if not in_term or not line or line.startswith("!"):
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"{path}: line {number}: expected 'tag: value', got {line[:60]!r}")
            value = value.strip()
            if " ! " in value and key in ("is_a", "relationship", "alt_id", "id"):
                value = value.split(" ! ", 1)[0].strip()
            if key == "id":
                current = GOTerm(id=value)
            elif current is None:
                raise ValueError(f"{path}: line {number}: tag {key!r} before the term's id")
            elif key == "name":
                current.name = value
            elif key == "namespace":
                current.namespace = value
            elif key == "def":
                current.definition = _quoted(value)
            elif key == "is_a":
                current.is_a.append(value.split()[0])
            elif key == "relationship":
                parts = value.split()
                if len(parts) < 2:
                    raise ValueError(f"{path}: line {number}: relationship needs a type and a term id, got {value!r}")
                current.relationships.setdefault(parts[0], []).append(parts[1])
            elif key == "alt_id":
                current.alt_ids.append(value)
            elif key == "synonym":
                current.synonyms.append(_quoted(value))
            elif key == "is_obsolete":
                current.is_obsolete = value == "true"
        close()
    for term in list(terms.values()):
        for alt in term.alt_ids:
            terms.setdefault(alt, term)
    return terms


class GODag:
    """Ancestor queries over a read ontology, memoised; ``relations`` are the edges followed upward."""

    def __init__(self, terms: Mapping[str, GOTerm], relations: Iterable[str] = ("is_a", "part_of")):
        self.terms = terms
        self.relations = tuple(relations)
        self._ancestors: dict[str, frozenset[str]] = {}

    def primary(self, term_id: str) -> str:
        term = self.terms.get(term_id)
        return term.id if term is not None else term_id

    def ancestors(self, term_id: str) -> frozenset[str]:
        """Every term reachable upward from ``term_id`` (excluding itself)."""
        term_id = self.primary(term_id)
        cached = self._ancestors.get(term_id)
        if cached is not None:
            return cached
        # Iterative DFS with an explicit stack: GO is deep enough to make recursion fragile.
        stack, order, seen = [term_id], [], {term_id}
        while stack:
            node = stack.pop()
            order.append(node)
            term = self.terms.get(node)
            if term is None:
                continue
            for parent in term.parents(self.relations):
                parent = self.primary(parent)
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        result = frozenset(seen - {term_id})
        self._ancestors[term_id] = result
        return result

    def propagate(self, annotations: Mapping[object, Iterable[str]]) -> dict[object, frozenset[str]]:
        """Each gene's terms plus all their ancestors (the true-path rule)."""
        out = {}
        for gene, terms in annotations.items():
            full = set()
            for t in terms:
                full.add(self.primary(t))
                full |= self.ancestors(t)
            out[gene] = frozenset(full)
        return out


ROOT_TERMS = frozenset({"GO:0008150", "GO:0003674", "GO:0005575"})
"""biological_process, molecular_function, cellular_component: annotated to everything, informative of nothing."""


def filter_annotations(
    annotations: pd.DataFrame,
    aspects: Iterable[str] | str | None = None,
    exclude_evidence: Iterable[str] = (),
    drop_root_terms: bool = False,
) -> pd.DataFrame:
    """The annotation rows every GO consumer keeps (graphs through ``gene_term_sets``, gene texts).

    ``NOT`` qualifiers are dropped (they state the gene does *not* have the function); ``aspects`` keeps
    some of P/F/C; ``exclude_evidence`` drops evidence codes (e.g. IEA, ND); ``drop_root_terms`` drops
    annotations to the three root terms.
    """
    frame = annotations
    keep = ~frame["qualifier"].astype(str).str.contains("NOT", na=False)
    aspects = normalise_aspects(aspects)
    if aspects is not None:
        keep &= frame["aspect"].isin(aspects)
    excluded = set(exclude_evidence or ())
    if excluded:
        keep &= ~frame["evidence"].isin(excluded)
    if drop_root_terms:
        keep &= ~frame["go_id"].isin(ROOT_TERMS)
    return frame.loc[keep]


def gene_term_sets(
    annotations: pd.DataFrame,
    aspects: Iterable[str] | str | None = None,
    exclude_evidence: Iterable[str] = (),
    ontology: Mapping[str, GOTerm] | None = None,
    propagate: bool = False,
    relations: Iterable[str] = ("is_a", "part_of"),
    drop_root_terms: bool = True,
) -> dict[object, frozenset[str]]:
    """Gene -> set of GO ids from an annotation table, after filters.

    Rows are filtered by :func:`filter_annotations`; ``propagate`` adds every ancestor (needs
    ``ontology``). The three root terms carry no information and are dropped (after propagation).
    """
    aspects = normalise_aspects(aspects)
    frame = filter_annotations(annotations, aspects, exclude_evidence)
    sets: dict[object, set[str]] = {}
    for gene, go_id in zip(frame["gene"], frame["go_id"]):
        sets.setdefault(gene, set()).add(go_id)
    if propagate:
        if ontology is None:
            raise ValueError("propagate=True needs the GO ontology (read_obo)")
        dag = GODag(ontology, relations)
        result = dag.propagate(sets)
        if aspects is not None:
            # Ancestors stay in their aspect for is_a/part_of; filter again in case a relation crosses aspects.
            result = {
                g: frozenset(t for t in ts if ontology.get(t) is None or ontology[t].aspect in aspects)
                for g, ts in result.items()
            }
    else:
        if ontology is not None:
            dag = GODag(ontology, relations)
            sets = {g: {dag.primary(t) for t in ts} for g, ts in sets.items()}
        result = {g: frozenset(ts) for g, ts in sets.items()}
    if drop_root_terms:
        result = {g: ts - ROOT_TERMS for g, ts in result.items()}
        result = {g: ts for g, ts in result.items() if ts}
    return result
