"""PerturbQA's gene set enrichment task: name what a cluster of genes (or of perturbations) shares.

``k562_gene-gse.json`` (clusters of downstream genes that respond together) and ``k562_pert-gse.json``
(clusters of perturbations with similar effects) are lists of ``{"genes": [...], "label": str | null}``;
only labelled clusters are scored. Files are found and downloaded like every PerturbQA file
(``data.root`` -> ``$PERTURBQA_DATA`` -> user cache -> the public repository).

The task has no training split: every labelled cluster is a test cluster. Models learn from knowledge
(GO), never from these labels. The enrichment background is the genome-wide K562 screen's gene list
(``k562_gw_mapping_full.json``, 8,455 genes) plus every gene of both cluster files, so that each
cluster is a subset of its background.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perturb_models.data.perturbqa import (
    DataValidationError,
    fetch_published_files,
    read_ensembl_map,
    read_json_file,
    resolve_data_root,
)

GSE_KINDS = ("gene", "pert")


def gse_file_name(kind: str) -> str:
    if kind not in GSE_KINDS:
        raise ValueError(f"data.gse_kind={kind!r}: expected one of {', '.join(GSE_KINDS)}")
    return f"k562_{kind}-gse.json"


def ensure_published_file(
    name: str, root: str | os.PathLike | None = None, base_url: str | None = None, allow_download: bool = True
) -> Path:
    """The local path of one published PerturbQA file, downloaded when missing."""
    folder = resolve_data_root(root)
    path = folder / name
    if not path.is_file():
        fetch_published_files({name: path}, folder, base_url, allow_download)
    return path


def read_gse_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a ``*-gse.json`` file: columns ``cluster`` (entry index), ``genes`` (tuple of
    symbols), ``label`` (str or None). Errors name the file and the entry index."""
    path = Path(path)
    entries = read_json_file(path, list, 'a non-empty JSON list of {"genes": [...], "label": str or null}')
    rows = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict):
            raise DataValidationError(
                f"{where}: expected an object with 'genes' and 'label', got {type(entry).__name__}"
            )
        missing = [key for key in ("genes", "label") if key not in entry]
        if missing:
            raise DataValidationError(f"{where}: missing key(s) {', '.join(missing)}")
        genes, label = entry["genes"], entry["label"]
        if not isinstance(genes, list) or not genes:
            raise DataValidationError(f"{where}: 'genes' must be a non-empty list of gene symbols")
        bad = [g for g in genes if not isinstance(g, str) or not g.strip()]
        if bad:
            raise DataValidationError(f"{where}: 'genes' holds {bad[0]!r}, not a gene symbol")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise DataValidationError(f"{where}: 'label' must be a non-empty string or null, got {label!r}")
        # A symbol listed twice (the file has e.g. CCNK twice) is one member.
        rows.append((index, tuple(dict.fromkeys(g.strip() for g in genes)), label.strip() if label else None))
    return pd.DataFrame(rows, columns=["cluster", "genes", "label"])


def read_background(path: str | os.PathLike) -> list[str]:
    """Gene symbols of the genome-wide screen's ``symbol -> Ensembl id`` mapping."""
    mapping = read_json_file(Path(path), dict, "a non-empty JSON object gene symbol -> Ensembl id")
    return [str(k) for k in mapping]


@dataclass
class GSEContext:
    """What a gene-set model may know: the clusters to name (labels only for scoring), every cluster of
    both kinds (to keep them out of training data), and the enrichment background."""

    dataset: str
    kind: str
    clusters: pd.DataFrame
    all_clusters: dict[str, list[tuple[str, ...]]]
    background: tuple[str, ...]
    source: str
    # symbol -> Ensembl id of the background file: settles symbols gene_info cannot (SymbolResolver)
    ensembl_ids: Mapping[str, str] = field(default_factory=dict)

    @property
    def scored(self) -> pd.DataFrame:
        return self.clusters.loc[self.clusters["label"].notna()]


class GSEDataModule:
    """``data=k562_gse data.gse_kind=gene|pert``: the clusters of one kind, validated.

    The ``gene_sets`` runner's DataModule (not a Lightning one: there is nothing to batch for a classifier);
    namers take the :class:`GSEContext` and build what they train on themselves (see ``perturb_models.gse``).
    """

    task = "gse"

    def __init__(
        self,
        name: str = "k562_gene",
        gse_kind: str = "gene",
        task: str = "gse",
        root: str | None = None,
        download: bool = True,
        base_url: str | None = None,
        background_file: str | None = "k562_gw_mapping_full.json",
        cell_line: str = "K562",
        bertscore_model: str | None = "minilm",
        bertscore_num_layers: int | None = None,
    ):
        gse_file_name(gse_kind)  # validates the kind
        if task != "gse":
            raise ValueError(f"data.task={task!r}: the gene set enrichment data has one task, gse")
        self.name, self.kind, self.root = name, gse_kind, root
        self.download, self.base_url = bool(download), base_url
        self.background_file, self.cell_line = background_file, cell_line
        # The task's scorer: BERTScore's model is part of the dataset's definition of the metric.
        self.bertscore_model, self.bertscore_num_layers = bertscore_model, bertscore_num_layers
        self.context: GSEContext | None = None

    def prepare_data(self) -> None:
        for name in self._file_names():
            ensure_published_file(name, self.root, self.base_url, self.download)

    def _file_names(self) -> list[str]:
        names = [gse_file_name(kind) for kind in GSE_KINDS]
        return names + ([self.background_file] if self.background_file else [])

    def setup(self, stage: str | None = None) -> None:
        if self.context is not None:
            return
        folder = resolve_data_root(self.root)
        tables = {
            kind: read_gse_file(ensure_published_file(gse_file_name(kind), self.root, self.base_url, self.download))
            for kind in GSE_KINDS
        }
        background: dict[str, None] = {}
        ensembl_ids: dict[str, str] = {}
        if self.background_file:
            path = ensure_published_file(self.background_file, self.root, self.base_url, self.download)
            background.update(dict.fromkeys(read_background(path)))
            ensembl_ids = read_ensembl_map(path.parent, path.name, allow_download=False)
        for table in tables.values():
            for genes in table["genes"]:
                background.update(dict.fromkeys(genes))
        self.context = GSEContext(
            dataset=self.name,
            kind=self.kind,
            clusters=tables[self.kind],
            all_clusters={kind: list(t["genes"]) for kind, t in tables.items()},
            background=tuple(background),
            source=str(folder),
            ensembl_ids=ensembl_ids,
        )


def describe_clusters(clusters: pd.DataFrame) -> str:
    scored = clusters["label"].notna()
    return f"{len(clusters)} clusters, {int(scored.sum())} labelled (scored)"


def join_genes(genes: Sequence[str]) -> str:
    """Genes of a cluster in one CSV cell."""
    return " ".join(genes)
