"""PerturbQA task files: where they are, how to fetch them, and what a valid file looks like.

A dataset NAME is a pair of CSV files, ``NAME-de.csv`` (is the gene differentially expressed after
the perturbation: 1/0) and ``NAME-dir.csv`` (for the DE-positive pairs: does it go up (1) or down
(0)), each with the columns ``pert,gene,label,split``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from perturb_models.io import DownloadError, download, resolve_folder

PERTURBQA_BASE_URL = "https://raw.githubusercontent.com/Genentech/PerturbQA/main/perturbqa/datasets"
"""Public location of the PerturbQA task files (``<base>/<name>-de.csv``)."""

PUBLISHED_DATASETS = ("k562", "rpe1", "hepg2", "jurkat", "k562_set")
"""The five datasets of the PerturbQA benchmark, downloadable by name."""

REQUIRED_COLUMNS = ("pert", "gene", "label", "split")
SPLITS = ("train", "test")
TASK_FILES = ("de", "dir")


class DataValidationError(ValueError):
    """A task file breaks the PerturbQA format; the message names the file, the row and the value."""


@dataclass(frozen=True)
class TaskTables:
    """The validated tables of one dataset. ``dir`` is None when only the DE task was asked for."""

    name: str
    de: pd.DataFrame
    dir: pd.DataFrame | None
    source: str


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """Where PerturbQA files live: the given ``root``, else ``$PERTURBQA_DATA``, else the user cache."""
    return resolve_folder(root, "PERTURBQA_DATA", "perturbqa")


def task_file_name(name: str, kind: str) -> str:
    return f"{name}-{kind}.csv"


def ensure_task_files(
    name: str,
    kinds: tuple[str, ...] = TASK_FILES,
    root: str | os.PathLike | None = None,
    base_url: str | None = None,
    allow_download: bool = True,
) -> dict[str, Path]:
    """Return the paths of ``NAME-<kind>.csv`` for each kind, downloading missing published files.

    ``base_url`` defaults to ``$PERTURBQA_URL`` and then to the public PerturbQA repository.
    """
    folder = resolve_data_root(root)
    paths = {kind: folder / task_file_name(name, kind) for kind in kinds}
    missing = [kind for kind, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    if name not in PUBLISHED_DATASETS:
        names = ", ".join(task_file_name(name, kind) for kind in missing)
        raise DataValidationError(
            f"Unknown dataset '{name}': {names} not found in {folder}, and '{name}' is not one of the "
            f"published PerturbQA datasets ({', '.join(PUBLISHED_DATASETS)}). For your own screen, write "
            f"NAME-de.csv and NAME-dir.csv (python -m perturb_models.data.perturbseq build INPUT.h5ad DIR) "
            f"and train with data=custom data.name=NAME data.root=DIR."
        )
    fetch_published_files({paths[kind].name: paths[kind] for kind in missing}, folder, base_url, allow_download)
    return paths


def fetch_published_files(paths: dict[str, Path], folder: Path, base_url: str | None = None,
                          allow_download: bool = True) -> None:
    """Download each ``file name -> local path`` from the PerturbQA repository (``base_url``, else
    ``$PERTURBQA_URL``, else the public one); one mechanism for every published file."""
    base_url = (base_url or os.environ.get("PERTURBQA_URL") or PERTURBQA_BASE_URL).rstrip("/")
    hints = [
        "point the project at a folder that holds the files: data.root=/path/to/folder or PERTURBQA_DATA=/path/to/folder",
        f"or place {', '.join(paths)} in {folder}",
    ]
    for name, path in paths.items():
        url = f"{base_url}/{name}"
        if not allow_download:
            raise DataValidationError(
                f"{path} is missing and downloads are off (data.download=false). "
                f"Fetch it from {url}, or " + hints[0]
            )
        try:
            download(url, path, what=f"PerturbQA file {name}", alternatives=hints)
        except DownloadError as exc:
            raise DownloadError(f"{exc}\n(Looked for the file in {folder} first.)") from exc


def _line(index) -> int:
    """Line number in the CSV of a 0-based data-row index (line 1 is the header)."""
    return int(index) + 2


def read_task_file(path: str | os.PathLike, kind: str = "de") -> pd.DataFrame:
    """Read one task file and check its own rows: columns, labels, splits, duplicate pairs, empty splits."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"pert": str, "gene": str, "split": str}, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(f"{path}: the file is empty; expected a header pert,gene,label,split") from exc
    return validate_task_frame(frame, source=str(path), kind=kind)


def validate_task_frame(frame: pd.DataFrame, source: str, kind: str = "de") -> pd.DataFrame:
    """Check one task table (already in memory) and return it with normalised dtypes."""
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {', '.join(missing)}; expected the columns {','.join(REQUIRED_COLUMNS)}, "
            f"found {','.join(map(str, frame.columns))}"
        )
    frame = frame.loc[:, list(REQUIRED_COLUMNS)].reset_index(drop=True)
    for column in ("pert", "gene"):
        values = frame[column].astype(str).str.strip()
        empty = values.eq("") | frame[column].isna()
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataValidationError(f"{source} line {_line(row)}: empty '{column}' value")
        frame[column] = values
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataValidationError(
            f"{source} line {_line(row)}: label '{frame['label'].iloc[row]}' is not 0 or 1 "
            f"({int(bad.sum())} bad label(s) in the file)"
        )
    frame["label"] = labels.astype(np.int64)
    splits = frame["split"].astype(str).str.strip()
    bad = ~splits.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataValidationError(
            f"{source} line {_line(row)}: split '{frame['split'].iloc[row]}' is not one of {', '.join(SPLITS)}"
        )
    frame["split"] = splits
    duplicated = frame.duplicated(subset=["pert", "gene"], keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        first = int(np.flatnonzero(
            ((frame["pert"] == frame["pert"].iloc[row]) & (frame["gene"] == frame["gene"].iloc[row])).to_numpy()
        )[0])
        raise DataValidationError(
            f"{source} line {_line(row)}: duplicate pair (pert={frame['pert'].iloc[row]}, gene={frame['gene'].iloc[row]}), "
            f"already on line {_line(first)}; each (pert, gene) pair must appear once"
        )
    for split in SPLITS:
        if not (frame["split"] == split).any():
            raise DataValidationError(f"{source}: the '{split}' split is empty; each file needs train and test rows")
    perts_by_split = frame.groupby("split")["pert"].unique()
    both = sorted(set(perts_by_split["train"]) & set(perts_by_split["test"]))
    if both:
        row = int(np.flatnonzero(((frame["pert"] == both[0]) & (frame["split"] == "test")).to_numpy())[0])
        raise DataValidationError(
            f"{source} line {_line(row)}: perturbation {both[0]!r} is in both train and test "
            f"({len(both)} such perturbation(s)); PerturbQA splits are by perturbation"
        )
    return frame


def validate_dir_against_de(de: pd.DataFrame, dir_: pd.DataFrame, de_source: str, dir_source: str) -> None:
    """Every ``-dir`` row must be a DE-positive pair of the ``-de`` file, in the same split."""
    positives = de.loc[de["label"] == 1, ["pert", "gene", "split"]]
    merged = dir_.reset_index().merge(positives, on=["pert", "gene"], how="left", suffixes=("", "_de"))
    unmatched = merged["split_de"].isna()
    if unmatched.any():
        row = merged.loc[unmatched, "index"].iloc[0]
        pert, gene = dir_.loc[row, "pert"], dir_.loc[row, "gene"]
        raise DataValidationError(
            f"{dir_source} line {_line(row)}: pair (pert={pert}, gene={gene}) is not DE-positive (label 1) in "
            f"{de_source}; direction labels exist only for DE pairs ({int(unmatched.sum())} such row(s))"
        )
    moved = merged["split"] != merged["split_de"]
    if moved.any():
        row = merged.loc[moved, "index"].iloc[0]
        raise DataValidationError(
            f"{dir_source} line {_line(row)}: split {dir_.loc[row, 'split']!r} differs from the same pair's split in {de_source}"
        )


def load_task_tables(
    name: str,
    task: str = "joint",
    root: str | os.PathLike | None = None,
    base_url: str | None = None,
    allow_download: bool = True,
) -> TaskTables:
    """Find (or download), read and validate the files of dataset ``name`` for ``task``."""
    kinds = ("de",) if task == "de" else TASK_FILES
    paths = ensure_task_files(name, kinds, root=root, base_url=base_url, allow_download=allow_download)
    de = read_task_file(paths["de"], "de")
    dir_ = None
    if "dir" in paths:
        dir_ = read_task_file(paths["dir"], "dir")
        validate_dir_against_de(de, dir_, str(paths["de"]), str(paths["dir"]))
    return TaskTables(name=name, de=de, dir=dir_, source=str(paths["de"].parent))


def validate_tables(name: str, de: pd.DataFrame, dir_: pd.DataFrame | None, source: str) -> TaskTables:
    """Validate tables built in memory (synthetic data, converted screens) exactly like files."""
    de = validate_task_frame(de, f"{source}/{task_file_name(name, 'de')}", "de")
    if dir_ is not None:
        dir_ = validate_task_frame(dir_, f"{source}/{task_file_name(name, 'dir')}", "dir")
        validate_dir_against_de(de, dir_, task_file_name(name, "de"), task_file_name(name, "dir"))
    return TaskTables(name=name, de=de, dir=dir_, source=source)


def cluster_members(context) -> dict[str, list[str]]:
    """Cluster name -> member symbols for datasets whose downstream "genes" are gene clusters (k562_set).

    Read from ``<data folder>/<dataset>-mapping.json`` and kept to the clusters in ``context.vocab``;
    empty for datasets without such a file (and for generated data).
    """
    source = (getattr(context, "extras", None) or {}).get("source")
    if not source or str(source).startswith("<"):
        return {}
    path = Path(str(source)) / f"{context.dataset}-mapping.json"
    if not path.is_file():
        return {}
    mapping = json.loads(path.read_text())
    if not isinstance(mapping, dict):
        raise DataValidationError(f"{path}: expected a JSON object cluster name -> list of gene symbols")
    return {str(k): [str(s) for s in v] for k, v in mapping.items() if str(k) in context.vocab}
