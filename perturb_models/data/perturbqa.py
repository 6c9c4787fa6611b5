"""PerturbQA task files: where they are, how to fetch them, and what a valid file looks like.

A dataset NAME is a pair of CSV files, ``NAME-de.csv`` (is the gene differentially expressed after
the perturbation: 1/0) and ``NAME-dir.csv`` (for the DE-positive pairs: does it go up (1) or down
(0)), each with the columns ``pert,gene,label,split``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from perturb_models.errors import UserError
from perturb_models.io import DownloadError, download, download_marker, resolve_folder
from perturb_models.tasks import get_task

log = logging.getLogger(__name__)

PERTURBQA_BASE_URL = "https://raw.githubusercontent.com/Genentech/PerturbQA/main/perturbqa/datasets"
"""Public location of the PerturbQA task files (``<base>/<name>-de.csv``)."""

PUBLISHED_DATASETS = ("k562", "rpe1", "hepg2", "jurkat", "k562_set")
"""The five datasets of the PerturbQA benchmark, downloadable by name."""

OFFICIAL_FILES: dict[str, tuple[int, str]] = {
    "k562-de.csv": (3203066, "e6ab095f3f970bb29f48427414904136785e8cd4945496f8d9a8fa6eab35ee67"),
    "k562-dir.csv": (401361, "84a0bc9631b33b8720663ed69506a316dad0f686a51f702f277914cc722000f4"),
    "rpe1-de.csv": (3777332, "a66a86aac5db458e0703bccf7f2d638769400a7ccb9f2615cd9421c106b748ca"),
    "rpe1-dir.csv": (532606, "25fa0b37c7e86cd73e8135b83513ea9d96c55e5a6c3f222ffbb531b91ab0fb0c"),
    "hepg2-de.csv": (2567354, "f94045fb44dcca4af9c69bee5c87de624590061a1123d55d9ee42a9c1ca97932"),
    "hepg2-dir.csv": (356655, "8c642ab6e6996887dce6c774d5fc58546970ba9216a636c7547b5039062a2cc3"),
    "k562_set-de.csv": (1078975, "d51faff9a337d111ff2f0858890bbf3207669925f26c0ba75164bc7217872c54"),
    "k562_set-dir.csv": (587375, "3298d18708d82bd0852e9f6a91b9c5b56a000a2183375457143ccab7f218cb7f"),
}
"""Size and SHA-256 of the official release's files; a download must match before it is kept.

jurkat-de.csv and jurkat-dir.csv have no entry: no copy of the official files was at hand to compute
them. Their downloads are still refused when HTML, shorter than the Content-Length, or invalid as a
task file, but a body cut at a row boundary by a server that sends no Content-Length cannot be told
from the real file. Add their entries once a verified copy is available."""

REQUIRED_COLUMNS = ("pert", "gene", "label", "split")
SPLITS = ("train", "test")
TASK_FILES = ("de", "dir")


class DataValidationError(UserError, ValueError):
    """A task file breaks the PerturbQA format; the message names the file, the row and the value."""


@dataclass(frozen=True)
class TaskTables:
    """The validated tables of one dataset. ``dir`` is None when only the DE task was asked for."""

    name: str
    de: pd.DataFrame
    dir: pd.DataFrame | None
    source: str
    folder: Path | None = None  # the data folder the files were read from; None for tables built in memory


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
    for path in paths.values():
        if path.exists() and not path.is_file():
            raise DataValidationError(
                f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not a task CSV file; "
                "remove or rename it"
            )
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


def fetch_published_files(
    paths: dict[str, Path], folder: Path, base_url: str | None = None, allow_download: bool = True
) -> None:
    """Download each ``file name -> local path`` from the PerturbQA repository (``base_url``, else
    ``$PERTURBQA_URL``, else the public one); one mechanism for every published file."""
    base_url = (base_url or os.environ.get("PERTURBQA_URL") or PERTURBQA_BASE_URL).rstrip("/")
    hints = [
        "point the project at a folder that holds the files: data.root=/path/to/folder or "
        "PERTURBQA_DATA=/path/to/folder",
        f"or place {', '.join(paths)} in {folder}",
    ]
    for name, path in paths.items():
        url = f"{base_url}/{name}"
        if not allow_download:
            raise DataValidationError(
                f"{path} is missing and downloads are off (data.download=false). Fetch it from {url}, or " + hints[0]
            )
        kind = _task_kind(name)
        if kind is not None:
            download_task_file(name, kind, url, path, hints)
            continue
        # not a task table (a gene-set JSON): its own reader validates it; the checksum where one is recorded
        size, sha256 = OFFICIAL_FILES.get(name, (None, None))
        try:
            download(url, path, what=f"PerturbQA file {name}", alternatives=hints, size=size, sha256=sha256)
        except DownloadError as exc:
            raise DownloadError(f"{exc}\n(Looked for the file in {folder} first.)") from None


def _task_kind(file_name: str) -> str | None:
    """``de`` or ``dir`` for a task table's file name (``k562-de.csv``), else None."""
    match = re.search(r"-(de|dir)\.csv$", file_name)
    return match.group(1) if match else None


def download_task_file(file_name: str, kind: str, url: str, dest: Path, hints) -> Path:
    """Download one published task file, verified against ``OFFICIAL_FILES`` and validated, then kept."""
    size, sha256 = OFFICIAL_FILES.get(file_name, (None, None))
    try:
        return download(
            url,
            dest,
            what=f"PerturbQA file {file_name}",
            alternatives=hints,
            size=size,
            sha256=sha256,
            check=lambda tmp: read_task_file(tmp, kind),
        )
    except DownloadError as exc:
        raise DownloadError(f"{exc}\n(Looked for the file in {dest.parent} first.)") from None


def _read_published(name: str, kind: str, path: Path, base_url: str | None, allow_download: bool) -> pd.DataFrame:
    """Read a task file; a published file that fails validation is replaced when we downloaded it,
    else reported with the advice to delete it (it is then downloaded again)."""
    file_name = task_file_name(name, kind)
    official = OFFICIAL_FILES.get(file_name)
    if official is not None and path.stat().st_size != official[0]:
        log.warning(
            "%s has %d bytes, the official PerturbQA %s has %d: it is not the published file. If that is not "
            "intended, delete it and it will be downloaded again",
            path,
            path.stat().st_size,
            file_name,
            official[0],
        )
    try:
        return read_task_file(path, kind)
    except DataValidationError as exc:
        if name not in PUBLISHED_DATASETS:
            raise
        marker = download_marker(path)
        if marker.is_file() and allow_download:
            aside = path.with_name(f"{path.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            marker.unlink()
            log.warning(
                "%s (downloaded earlier) is not valid (%s); moved to %s and downloading it again", path, exc, aside
            )
            url = f"{(base_url or os.environ.get('PERTURBQA_URL') or PERTURBQA_BASE_URL).rstrip('/')}/{file_name}"
            download_task_file(file_name, kind, url, path, [])
            return read_task_file(path, kind)
        raise DataValidationError(
            f"{exc}. If {path.name} should be the published PerturbQA file, delete it and it will be downloaded again"
        ) from None


def _line(index) -> int:
    """Line number in the CSV of a 0-based data-row index (line 1 is the header)."""
    return int(index) + 2


def read_task_file(path: str | os.PathLike, kind: str = "de") -> pd.DataFrame:
    """Read one task file and check its own rows: columns, labels, splits, duplicate pairs, empty splits."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    for magic, kind_name, tool in _COMPRESSED:
        if head.startswith(magic):
            raise DataValidationError(
                f"{path}: the file is {kind_name}-compressed, not CSV text; decompress it "
                f"({tool} -c FILE > {path.name}) and try again"
            )
    try:
        frame = pd.read_csv(
            path, dtype={"pert": str, "gene": str, "split": str}, keep_default_na=False, encoding="utf-8"
        )
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(f"{path}: the file is empty; expected a header pert,gene,label,split") from exc
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path}: not UTF-8 text ({_bad_byte(path, exc)}); save it as UTF-8") from None
    except pd.errors.ParserError as exc:
        raise DataValidationError(f"{path}: not a valid CSV file ({str(exc).strip()})") from None
    return validate_task_frame(frame, source=str(path), kind=kind)


_COMPRESSED = (
    (b"\x1f\x8b", "gzip", "gunzip"),
    (b"PK\x03\x04", "zip", "unzip -p"),
    (b"BZh", "bzip2", "bunzip2"),
    (b"\xfd7zXZ", "xz", "unxz"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
)


def _bad_byte(path: Path, exc: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte is: its value and line (pandas reports offsets inside a chunk)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        line = data.count(b"\n", 0, whole.start) + 1
        return f"byte 0x{data[whole.start]:02x} on line {line}"
    return str(exc)


# Invisible and control characters (zero-width spaces and joiners, BOM, soft hyphen, NBSP, tabs) and
# quotes make a symbol a different gene without anyone seeing it. A perturbation is a gene symbol, so
# any whitespace inside it is refused too; downstream "genes" may be named clusters with single spaces
# ("12-oxidative phosphorylation" in k562_set), so the gene column refuses only the invisible ones,
# doubled spaces and quotes.
_INVISIBLE = (
    "\\x00-\\x1f\\x7f-\\x9f\\u00a0\\u00ad\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u2064\\u3000\\ufeff"
)
_BAD_SYMBOL = {
    "pert": re.compile(f"[\\s{_INVISIBLE}\"'`]"),
    "gene": re.compile(f"[{_INVISIBLE}\"'`]|\\s\\s"),
}


def _describe_bad(value: str, column: str) -> str:
    for char in value:
        if char in "\"'`":
            return f"a quote ({char})"
        if re.match(f"[{_INVISIBLE}]", char):
            return f"an invisible or control character (U+{ord(char):04X})"
    return "whitespace inside the name" if column == "pert" else "two spaces in a row"


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
        # Python's re on each value: pandas' Arrow-backed strings (pandas 3) would hand the pattern to RE2,
        # which reads \u escapes and \s differently.
        pattern = _BAD_SYMBOL[column]
        bad = np.fromiter((pattern.search(value) is not None for value in values), dtype=bool, count=len(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataValidationError(
                f"{source} line {_line(row)}: {column} {values.iloc[row]!r} contains "
                f"{_describe_bad(values.iloc[row], column)}; gene symbols are written without them "
                f"({int(bad.sum())} such value(s) in the column)"
            )
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
        first = int(
            np.flatnonzero(
                ((frame["pert"] == frame["pert"].iloc[row]) & (frame["gene"] == frame["gene"].iloc[row])).to_numpy()
            )[0]
        )
        raise DataValidationError(
            f"{source} line {_line(row)}: duplicate pair (pert={frame['pert'].iloc[row]}, "
            f"gene={frame['gene'].iloc[row]}), "
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
            f"{dir_source} line {_line(row)}: split {dir_.loc[row, 'split']!r} differs from the same pair's split in "
            f"{de_source}"
        )


def load_task_tables(
    name: str,
    task: str = "joint",
    root: str | os.PathLike | None = None,
    base_url: str | None = None,
    allow_download: bool = True,
) -> TaskTables:
    """Find (or download), read and validate the files of dataset ``name`` for ``task``."""
    paths = ensure_task_files(name, get_task(task).files, root=root, base_url=base_url, allow_download=allow_download)
    de = _read_published(name, "de", paths["de"], base_url, allow_download)
    dir_ = None
    if "dir" in paths:
        dir_ = _read_published(name, "dir", paths["dir"], base_url, allow_download)
        validate_dir_against_de(de, dir_, str(paths["de"]), str(paths["dir"]))
    return TaskTables(name=name, de=de, dir=dir_, source=str(paths["de"].parent), folder=paths["de"].parent)


def validate_tables(name: str, de: pd.DataFrame, dir_: pd.DataFrame | None, source: str) -> TaskTables:
    """Validate tables built in memory (synthetic data, converted screens) exactly like files."""
    de = validate_task_frame(de, f"{source}/{task_file_name(name, 'de')}", "de")
    if dir_ is not None:
        dir_ = validate_task_frame(dir_, f"{source}/{task_file_name(name, 'dir')}", "dir")
        validate_dir_against_de(de, dir_, task_file_name(name, "de"), task_file_name(name, "dir"))
    return TaskTables(name=name, de=de, dir=dir_, source=source)


def read_json_file(path: Path, expected: type, what: str):
    """A JSON file whose top level is a non-empty ``expected`` (list or dict); a one-line error naming the
    file and ``what`` was expected otherwise."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, expected) or not value:
        raise DataValidationError(f"{path}: expected {what}")
    return value


def read_cluster_mapping(folder: str | os.PathLike, name: str) -> dict[str, tuple[str, ...]]:
    """Cluster name -> member symbols for datasets whose downstream "genes" are gene clusters (k562_set).

    Read from ``<folder>/<name>-mapping.json``; empty for datasets without such a file.
    """
    path = Path(folder) / f"{name}-mapping.json"
    if not path.is_file():
        return {}
    mapping = read_json_file(path, dict, "a JSON object cluster name -> list of gene symbols")
    if not all(isinstance(v, list) for v in mapping.values()):
        raise DataValidationError(f"{path}: expected a JSON object cluster name -> list of gene symbols")
    return {str(k): tuple(str(s) for s in v) for k, v in mapping.items()}


# PerturbQA's symbol -> Ensembl id file (the K562 genome-wide screen's genes; it covers every published cell line).
PERTURBQA_ENSEMBL_MAP = "k562_gw_mapping_full.json"


def read_ensembl_map(
    folder: str | os.PathLike, file_name: str, base_url: str | None = None, allow_download: bool = True
) -> dict[str, str]:
    """Symbol -> Ensembl gene id of a dataset (PerturbQA's ``k562_gw_mapping_full.json``): what settles
    symbols that gene_info alone cannot (an old name shared by two genes, a retired locus name).

    ``file_name`` is a name in ``folder`` (a published file is downloaded when missing and allowed) or a
    path. Missing and not downloadable: empty, with a warning saying which symbols may stay unresolved.
    """
    path = Path(os.path.expanduser(file_name))
    if not path.is_absolute():
        path = Path(folder) / file_name
    if not path.is_file() and allow_download and path.parent == Path(folder):
        try:
            fetch_published_files({path.name: path}, Path(folder), base_url, allow_download)
        except DownloadError as error:
            log.warning("%s; gene symbols that gene_info finds ambiguous stay unresolved", str(error).splitlines()[0])
            return {}
    if not path.is_file():
        log.warning("no symbol -> Ensembl file %s: gene symbols that gene_info finds ambiguous stay unresolved", path)
        return {}
    mapping = read_json_file(path, dict, "a JSON object gene symbol -> Ensembl gene id")
    return {str(k): str(v) for k, v in mapping.items() if isinstance(v, str) and v.upper().startswith("ENSG")}


def dataset_symbols(name: str, data_root: str | os.PathLike | None = None, expand_sets: bool = True) -> list[str]:
    """Every gene symbol of a PerturbQA dataset (perturbations and downstream genes).

    For ``k562_set`` the downstream "genes" are clusters: with ``expand_sets`` their member genes from
    ``k562_set-mapping.json`` are listed instead of the cluster names.
    """
    paths = ensure_task_files(name, ("de",), root=data_root)
    frame = read_task_file(paths["de"], "de")
    symbols = set(frame["pert"].astype(str))
    genes = set(frame["gene"].astype(str))
    mapping = read_cluster_mapping(paths["de"].parent, name) if expand_sets else {}
    for gene in genes:
        symbols.update(mapping.get(gene, (gene,)))
    return sorted(symbols)
