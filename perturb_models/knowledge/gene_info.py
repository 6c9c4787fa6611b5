"""NCBI ``gene_info`` reader and the symbol -> GeneID resolver (official symbols, then synonyms)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

from perturb_models.knowledge.files import open_text

log = logging.getLogger(__name__)

# Part of every cache key over resolved symbols: a change of the rules of ``resolve_many`` changes which
# gene a symbol names, hence graphs, texts and embeddings.
RESOLUTION_VERSION = 2

GENE_INFO_COLUMNS = ("#tax_id", "GeneID", "Symbol", "Synonyms", "dbXrefs", "description", "type_of_gene")


def _split(value: str, sep: str = "|") -> list[str]:
    return [] if value in ("-", "", None) else [v for v in str(value).split(sep) if v]


def read_gene_info(path: str | os.PathLike, tax_id: int | None = None) -> pd.DataFrame:
    """Read an NCBI ``gene_info`` file (plain or gzip) into one row per gene.

    Columns: ``gene_id`` (int), ``symbol``, ``synonyms`` (list of str), ``description``, ``type_of_gene``,
    ``ensembl`` (first Ensembl gene id of dbXrefs, or None), ``chromosome``, ``tax_id``.
    ``tax_id`` keeps one species (the human file holds only 9606 anyway).
    """
    with open_text(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        missing = [c for c in GENE_INFO_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: not an NCBI gene_info file; header line lacks {', '.join(missing)} (got {header[:6]}...)"
            )
        frame = pd.read_csv(handle, sep="\t", names=header, dtype=str, quoting=3, keep_default_na=False)
    if tax_id is not None:
        frame = frame.loc[frame["#tax_id"] == str(tax_id)]
    bad = ~frame["GeneID"].str.fullmatch(r"\d+")
    if bad.any():
        row = frame.index[bad][0]
        raise ValueError(f"{path}: line {row + 2}: GeneID {frame.loc[row, 'GeneID']!r} is not an integer")

    def ensembl(xrefs: str) -> str | None:
        for ref in _split(xrefs):
            if ref.startswith("Ensembl:"):
                return ref.split(":", 1)[1]
        return None

    out = pd.DataFrame(
        {
            "gene_id": frame["GeneID"].astype("int64").to_numpy(),
            "symbol": frame["Symbol"].to_numpy(),
            "synonyms": [_split(s) for s in frame["Synonyms"]],
            "description": frame["description"].replace("-", "").to_numpy(),
            "type_of_gene": frame["type_of_gene"].to_numpy(),
            "ensembl": [ensembl(x) for x in frame["dbXrefs"]],
            "chromosome": frame["chromosome"].to_numpy() if "chromosome" in frame else None,
            "tax_id": frame["#tax_id"].astype("int64").to_numpy(),
        }
    )
    return out.reset_index(drop=True)


@dataclass
class CoverageReport:
    """How a list of dataset symbols resolved: by official symbol, through a synonym, or not at all."""

    by_symbol: dict[str, int] = field(default_factory=dict)
    by_synonym: dict[str, int] = field(default_factory=dict)
    by_ensembl: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[int]] = field(default_factory=dict)

    @property
    def mapping(self) -> dict[str, int]:
        return {**self.by_ensembl, **self.by_synonym, **self.by_symbol}

    @property
    def total(self) -> int:
        return len(self.by_symbol) + len(self.by_synonym) + len(self.by_ensembl) + len(self.missing)

    @property
    def found(self) -> int:
        return self.total - len(self.missing)

    def summary(self, title: str = "genes") -> str:
        share = self.found / self.total if self.total else float("nan")
        lines = [
            f"{title}: {self.found}/{self.total} found ({share:.1%}): {len(self.by_symbol)} by symbol, "
            f"{len(self.by_synonym)} through a synonym, {len(self.by_ensembl)} by Ensembl id; {len(self.missing)} "
            f"missing",
        ]
        if self.by_synonym:
            shown = ", ".join(f"{k}->{v}" for k, v in list(sorted(self.by_synonym.items()))[:10])
            lines.append(f"  renamed (synonym -> GeneID), first ones: {shown}")
        if self.ambiguous:
            items = list(sorted(self.ambiguous.items()))[:10]
            shown = ", ".join(f"{k} (GeneIDs {', '.join(map(str, v))})" for k, v in items)
            lines.append(f"  ambiguous synonyms, left unresolved (give the dataset an Ensembl map): {shown}")
        if self.missing:
            lines.append(f"  missing, first ones: {', '.join(sorted(self.missing)[:20])}")
        return "\n".join(lines)


@dataclass(frozen=True)
class QueryAnswer:
    """How one symbol typed by a person resolved: the gene (``gene_id``, its ``official`` symbol) and
    ``how`` (``symbol``, ``ensembl``, ``synonym``, ``hyphen-less synonym``, ``case``), or ``refused`` with
    the reason (ambiguous: the candidates with their Ensembl ids; unknown: the closest known symbols)."""

    asked: str
    gene_id: int | None = None
    official: str | None = None
    how: str | None = None
    refused: str | None = None


class SymbolResolver:
    """Maps gene symbols to NCBI GeneIDs: the official ``Symbol`` first, then ``Synonyms`` (older names).

    A synonym shared by several genes is ambiguous and left unresolved (reported, never guessed).
    Ensembl gene ids (``ENSG...``) resolve through dbXrefs.
    """

    def __init__(self, gene_info: pd.DataFrame):
        self.gene_info = gene_info
        self._symbol: dict[str, int] = {}
        for gid, sym in zip(gene_info["gene_id"], gene_info["symbol"]):
            self._symbol.setdefault(sym, int(gid))
        self._upper = {}
        for sym, gid in self._symbol.items():
            self._upper.setdefault(sym.upper(), gid)
        synonyms: dict[str, set[int]] = defaultdict(set)
        for gid, syns in zip(gene_info["gene_id"], gene_info["synonyms"]):
            for s in syns:
                synonyms[s].add(int(gid))
        self._synonym = {s: sorted(g) for s, g in synonyms.items()}
        self._ensembl = {e: int(g) for g, e in zip(gene_info["gene_id"], gene_info["ensembl"]) if e}
        self._symbol_of = {int(g): s for g, s in zip(gene_info["gene_id"], gene_info["symbol"])}

    def _unique_synonym(self, symbol: str) -> tuple[int | None, list[int]]:
        """(GeneID, []) for a synonym of one gene (with the renamed-gene rule of ``resolve_many``), else
        (None, the candidate GeneIDs: several when ambiguous, none when no gene has it)."""
        ids = self._synonym.get(symbol) or []
        if len(ids) > 1:
            extended = [g for g in ids if (self._symbol_of.get(g) or "").startswith(symbol)]
            if len(extended) == 1:
                return extended[0], []
        if len(ids) == 1:
            return ids[0], []
        return None, list(ids)

    def resolve_query(self, asked: str) -> QueryAnswer:
        """Resolve a symbol as a biologist types it: the official symbol, an Ensembl gene id (dbXrefs), a
        synonym, the hyphen-less form of either (``MT-CO1`` -> synonym ``MTCO1`` of ``COX1``), any of
        these in another case. An ambiguous synonym is refused naming every candidate and its Ensembl id;
        an unknown one naming the closest known symbols. (Training-time knowledge uses ``resolve_many``.)"""
        text = str(asked).strip()
        if text in self._symbol:
            return QueryAnswer(asked, self._symbol[text], text, "symbol")
        base = text.split(".")[0]
        if base.upper().startswith("ENSG"):
            gid = self._ensembl.get(base.upper())
            if gid is not None:
                return QueryAnswer(asked, gid, self._symbol_of[gid], "ensembl")
            return QueryAnswer(asked, refused=f"{text}: no gene of gene_info carries this Ensembl id")
        candidates: list[int] = []
        for form, how in ((text, "synonym"), (text.replace("-", ""), "hyphen-less synonym")):
            if form != text and form in self._symbol:
                return QueryAnswer(asked, self._symbol[form], form, "hyphen-less symbol")
            gid, ambiguous = self._unique_synonym(form)
            if gid is not None:
                return QueryAnswer(asked, gid, self._symbol_of[gid], how)
            candidates = candidates or ambiguous
        if candidates:
            named = ", ".join(f"{self._symbol_of[g]} ({self._ensembl_of(g) or f'GeneID {g}'})" for g in candidates)
            return QueryAnswer(
                asked,
                refused=f"{text} is a synonym of {len(candidates)} genes: {named}; ask for "
                "one by its symbol or Ensembl id",
            )
        upper = text.upper()
        if not hasattr(self, "_synonym_upper"):
            merged: dict[str, set[int]] = defaultdict(set)
            for synonym, ids in self._synonym.items():
                merged[synonym.upper()].update(ids)
            self._synonym_upper = {k: sorted(v) for k, v in merged.items()}
        for form in (upper, upper.replace("-", "")):
            if form in self._upper:
                gid = self._upper[form]
                return QueryAnswer(asked, gid, self._symbol_of[gid], "case")
            ids = self._synonym_upper.get(form, [])
            if len(ids) == 1:
                return QueryAnswer(asked, ids[0], self._symbol_of[ids[0]], "case")
        return QueryAnswer(
            asked, refused=f"{text} is not a gene symbol, synonym or Ensembl id of gene_info" + self._closest(text)
        )

    def _ensembl_of(self, gene_id: int) -> str | None:
        if not hasattr(self, "_ensembl_by_gene"):
            self._ensembl_by_gene = {g: e for e, g in self._ensembl.items()}
        return self._ensembl_by_gene.get(gene_id)

    def _closest(self, text: str, n: int = 3) -> str:
        import difflib

        if not hasattr(self, "_upper_symbols"):
            self._upper_symbols = sorted(self._upper)
        close = difflib.get_close_matches(text.upper(), self._upper_symbols, n=n, cutoff=0.6)
        return f"; closest known symbols: {', '.join(self._symbol_of[self._upper[c]] for c in close)}" if close else ""

    def resolve(self, symbol: str, ensembl_ids: Mapping[str, str] | None = None) -> int | None:
        """GeneID of ``symbol`` or None (missing or ambiguous)."""
        return self.resolve_many([symbol], ensembl_ids).mapping.get(symbol)

    def resolve_many(self, symbols: Iterable[str], ensembl_ids: Mapping[str, str] | None = None) -> CoverageReport:
        """Resolve dataset symbols, each by the first rule that names one gene: the official symbol; a synonym
        of one gene (or of several, when exactly one candidate's current symbol extends it: GARS -> GARS1);
        an Ensembl id written as the symbol; another case; the dataset's own Ensembl id of the symbol
        (``ensembl_ids``, e.g. PerturbQA's ``k562_gw_mapping_full.json``), which settles ambiguous synonyms
        (SARS -> SARS1, TAZ -> TAFAZZIN) and retired loci; the hyphen-less symbol or synonym (``MT-CO1`` ->
        ``MTCO1``, a synonym of ``COX1``). An ambiguous synonym that no rule settles is reported with its
        candidates and left missing, never guessed."""
        hints = ensembl_ids or {}
        report = CoverageReport()
        for symbol in dict.fromkeys(str(s) for s in symbols):
            if symbol in self._symbol:
                report.by_symbol[symbol] = self._symbol[symbol]
                continue
            gid, candidates = self._unique_synonym(symbol)
            if gid is not None:
                report.by_synonym[symbol] = gid
                continue
            base, bare = symbol.split(".")[0], symbol.replace("-", "")
            hinted = self._ensembl.get(str(hints.get(symbol) or "").split(".")[0])
            if base in self._ensembl:
                report.by_ensembl[symbol] = self._ensembl[base]
            elif not candidates and symbol.upper() in self._upper:
                # Case differences only (e.g. "C1orf112" written "C1ORF112" in some screens).
                report.by_symbol[symbol] = self._upper[symbol.upper()]
            elif hinted is not None and (not candidates or hinted in candidates):
                report.by_ensembl[symbol] = hinted
            elif candidates:
                report.ambiguous[symbol] = candidates
                report.missing.append(symbol)
            elif bare != symbol and bare in self._symbol:
                report.by_symbol[symbol] = self._symbol[bare]
            elif bare != symbol and self._unique_synonym(bare)[0] is not None:
                report.by_synonym[symbol] = self._unique_synonym(bare)[0]
            else:
                report.missing.append(symbol)
        return report
