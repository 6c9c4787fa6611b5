"""NCBI ``gene_info`` reader and the symbol -> GeneID resolver (official symbols, then synonyms)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from perturb_models.knowledge.files import open_text

log = logging.getLogger(__name__)

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
            raise ValueError(f"{path}: not an NCBI gene_info file; header line lacks {', '.join(missing)} (got {header[:6]}...)")
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

    out = pd.DataFrame({
        "gene_id": frame["GeneID"].astype("int64").to_numpy(),
        "symbol": frame["Symbol"].to_numpy(),
        "synonyms": [_split(s) for s in frame["Synonyms"]],
        "description": frame["description"].replace("-", "").to_numpy(),
        "type_of_gene": frame["type_of_gene"].to_numpy(),
        "ensembl": [ensembl(x) for x in frame["dbXrefs"]],
        "chromosome": frame["chromosome"].to_numpy() if "chromosome" in frame else None,
        "tax_id": frame["#tax_id"].astype("int64").to_numpy(),
    })
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
            f"{len(self.by_synonym)} through a synonym, {len(self.by_ensembl)} by Ensembl id; {len(self.missing)} missing",
        ]
        if self.by_synonym:
            shown = ", ".join(f"{k}->{v}" for k, v in list(sorted(self.by_synonym.items()))[:10])
            lines.append(f"  renamed (synonym -> GeneID), first ones: {shown}")
        if self.ambiguous:
            shown = ", ".join(f"{k}:{v}" for k, v in list(sorted(self.ambiguous.items()))[:10])
            lines.append(f"  ambiguous synonyms (left unresolved): {shown}")
        if self.missing:
            lines.append(f"  missing, first ones: {', '.join(sorted(self.missing)[:20])}")
        return "\n".join(lines)


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

    def resolve(self, symbol: str) -> int | None:
        """GeneID of ``symbol`` or None (missing or ambiguous)."""
        return self.resolve_many([symbol]).mapping.get(symbol)

    def resolve_many(self, symbols: Iterable[str]) -> CoverageReport:
        report = CoverageReport()
        for symbol in dict.fromkeys(str(s) for s in symbols):
            if symbol in self._symbol:
                report.by_symbol[symbol] = self._symbol[symbol]
                continue
            ids = self._synonym.get(symbol)
            if ids and len(ids) > 1:
                # HGNC renames often append a digit (GARS -> GARS1, MARS -> MARS1): when exactly one
                # candidate's current symbol extends the old one, that is the renamed gene.
                extended = [g for g in ids if (self._symbol_of.get(g) or "").startswith(symbol)]
                if len(extended) == 1:
                    ids = extended
            if ids and len(ids) == 1:
                report.by_synonym[symbol] = ids[0]
                continue
            if ids:
                report.ambiguous[symbol] = ids
            base = symbol.split(".")[0]
            if base in self._ensembl:
                report.by_ensembl[symbol] = self._ensembl[base]
            elif symbol.upper() in self._upper and not ids:
                # Case differences only (e.g. "C1orf112" written "C1ORF112" in some screens).
                report.by_symbol[symbol] = self._upper[symbol.upper()]
            else:
                report.missing.append(symbol)
        return report
