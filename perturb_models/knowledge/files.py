"""Where the gene knowledge files live, and fetching them from their public URLs when missing.

Resolution order: an explicit ``root`` (config) -> ``$PERTURB_KNOWLEDGE`` -> the user cache folder
``perturb_models.io.cache_dir("knowledge")``. A file missing from the chosen folder is downloaded from
its public URL (the base of every URL can be replaced with ``$PERTURB_KNOWLEDGE_URL``, e.g. a mirror or
a local test server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from perturb_models.errors import UserError
from perturb_models.io import DownloadError, download, resolve_folder


@dataclass(frozen=True)
class KnowledgeFile:
    """One standard public file: the names it may have on disk and where it is published."""

    kind: str
    names: tuple[str, ...]  # accepted local names, first one preferred
    url: str  # public URL; its last path part is the downloaded file's name

    @property
    def download_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


KNOWLEDGE_FILES: dict[str, KnowledgeFile] = {
    "gene_info": KnowledgeFile(
        "gene_info",
        ("Homo_sapiens.gene_info.gz", "Homo_sapiens.gene_info"),
        "https://ftp.ncbi.nlm.nih.gov/gene/DATA/GENE_INFO/Mammalia/Homo_sapiens.gene_info.gz",
    ),
    "gene2go": KnowledgeFile(
        "gene2go",
        ("gene2go.gz", "gene2go"),
        "https://ftp.ncbi.nlm.nih.gov/gene/DATA/gene2go.gz",
    ),
    "go_obo": KnowledgeFile(
        "go_obo",
        ("go-basic.obo.gz", "go-basic.obo"),
        "https://purl.obolibrary.org/obo/go/go-basic.obo",
    ),
}


class KnowledgeFileError(UserError, FileNotFoundError):
    """A knowledge file is missing and could not be fetched; the message says where it was looked for."""


def knowledge_root(root: str | os.PathLike | None = None) -> Path:
    """The knowledge folder: ``root`` if given, else ``$PERTURB_KNOWLEDGE``, else the user cache."""
    return resolve_folder(root, "PERTURB_KNOWLEDGE", "knowledge")


def knowledge_file(
    kind: str, root: str | os.PathLike | None = None, allow_download: bool = True, base_url: str | None = None
) -> Path:
    """Path of the ``kind`` file (``gene_info``, ``gene2go``, ``go_obo``), downloading it when missing.

    ``kind`` may also be a path to an existing file (e.g. a GO GAF): it is returned as is.
    ``base_url`` (else ``$PERTURB_KNOWLEDGE_URL``) replaces the folder of the public URL.
    """
    if kind not in KNOWLEDGE_FILES:
        path = Path(os.path.expanduser(str(kind)))
        if path.is_file():
            return path
        raise KnowledgeFileError(
            f"unknown knowledge file {kind!r}: expected one of {', '.join(KNOWLEDGE_FILES)} or the path of an "
            f"existing file"
        )
    spec = KNOWLEDGE_FILES[kind]
    folder = knowledge_root(root)
    for name in spec.names:
        if (folder / name).is_file():
            return folder / name
    base = base_url or os.environ.get("PERTURB_KNOWLEDGE_URL")
    url = f"{base.rstrip('/')}/{spec.download_name}" if base else spec.url
    looked = ", ".join(str(folder / n) for n in spec.names)
    hints = [
        "point the project at a folder holding the files: knowledge.root=/path or PERTURB_KNOWLEDGE=/path",
        f"or download {spec.url} yourself into {folder}",
    ]
    if not allow_download:
        raise KnowledgeFileError(
            f"{kind} file not found (looked for {looked}) and downloads are off. " + "; ".join(hints)
        )
    try:
        return download(url, folder / spec.download_name, what=f"{kind} file {spec.download_name}", alternatives=hints)
    except DownloadError as exc:
        raise KnowledgeFileError(f"{kind} file not found (looked for {looked}) and the download failed: {exc}") from exc


def open_text(path: str | os.PathLike):
    """Open a text file, gzip-compressed or not (decided by its first bytes, not its name)."""
    import gzip

    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")
