"""Encoders over fixed gene embeddings (text, user table or random control; see knowledge/embeddings.py).

- ``EmbeddingMLPEncoder``: [e(pert), e(gene)] -> residual pair MLP; embeddings frozen, optionally a
  trained shared projection first (``projection_dim``) or fine-tuned vectors (``finetune``).
- ``LogRegEncoder``: GenePT's baseline, a single Linear layer (logistic regression) over the
  concatenated frozen embeddings; weight decay of the optimiser is its L2 penalty.
The random-Gaussian control is ``EmbeddingMLPEncoder`` with ``embeddings.source=random``.

``embeddings.source=summer`` (:func:`embedding_spec`, :func:`summer_embedding_table`): the sentence encoder over
the SUMMER summaries that ``model=summer`` wrote (role ``summer_role``, default ``gene``), each gene without one
falling back to its knowledge text (counted in the log); the other keys as for ``source=text``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perturb_models.data.datamodule import DataContext
from perturb_models.errors import ConfigError
from perturb_models.io import atomic_write_bytes, cache_dir
from perturb_models.knowledge.embeddings import EmbeddingTable, full_spec, symbols_embedding_table
from perturb_models.models.base import Encoder
from perturb_models.models.layers import PairMLP

log = logging.getLogger(__name__)

MISSING_POLICIES = ("learned", "zero")
SUMMER_ROLES = ("gene", "pert")


def embedding_spec(embeddings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full embedding spec (:func:`perturb_models.knowledge.embeddings.full_spec`), plus ``source: summer``
    with its ``summer_role`` (``gene`` | ``pert``); every other key as for ``source: text``."""
    spec = dict(embeddings or {})
    if spec.get("source") != "summer":
        return full_spec(spec)
    role = spec.pop("summer_role", "gene")
    if role not in SUMMER_ROLES:
        raise ConfigError(f"model.encoder.embeddings.summer_role must be gene or pert, got {role!r}")
    return {**full_spec({**spec, "source": "text"}), "source": "summer", "summer_role": role}


def embedding_table(
    symbols: Sequence[str],
    spec: Mapping[str, Any],
    clusters: Mapping[str, Sequence[str]] | None = None,
    ensembl_ids: Mapping[str, str] | None = None,
) -> EmbeddingTable:
    """Vectors of ``symbols`` from a spec of :func:`embedding_spec`; ``ensembl_ids`` (``DataContext.ensembl_ids``)
    for the knowledge texts' symbol resolution."""
    if spec["source"] == "summer":
        return summer_embedding_table(symbols, spec, clusters, ensembl_ids)
    return symbols_embedding_table(symbols, spec, clusters, ensembl_ids=ensembl_ids)


def summer_embedding_table(
    symbols: Sequence[str],
    spec: Mapping[str, Any],
    clusters: Mapping[str, Sequence[str]] | None = None,
    ensembl_ids: Mapping[str, str] | None = None,
) -> EmbeddingTable:
    """Sentence embeddings of each gene's SUMMER summary (``stored_summaries(summer_role)``); a gene without
    one gets its knowledge text (:mod:`perturb_models.knowledge.text`, the ``text`` recipe of the spec), and a
    gene without either is missing (zero row). Cached on disk under a key of the encoder and the texts
    themselves, so new summaries give new vectors."""
    from perturb_models.knowledge.embeddings import encode_texts, encoder_id
    from perturb_models.knowledge.text import TextRecipe, build_gene_texts
    from perturb_models.models.summer import stored_summaries

    symbols, role = list(symbols), spec["summer_role"]
    summaries = stored_summaries(role)
    recipe = TextRecipe.from_mapping(spec["text"])
    knowledge = build_gene_texts(symbols, spec["knowledge_root"], recipe, clusters, spec["allow_download"], ensembl_ids)
    texts, origin = [], []
    for s in symbols:
        if summaries.get(s):
            texts.append(summaries[s])
            origin.append("summary")
        else:
            texts.append(knowledge.texts[s])
            origin.append("knowledge" if knowledge.has_knowledge[s] else "missing")
    found = np.array([o != "missing" for o in origin], dtype=bool)
    counts = {o: origin.count(o) for o in ("summary", "knowledge", "missing")}
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key_parts = {"encoder": encoder_id(spec["encoder"]), "source": "summer", "symbols": symbols, "texts": digest}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = (Path(spec["cache_dir"]) if spec["cache_dir"] else cache_dir("embeddings")) / f"summer-{key}.npz"
    matrix = None
    if spec["cache"] and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if list(data["symbols"]) == symbols:
                matrix = data["matrix"]
    if matrix is None:
        matrix = encode_texts(texts, spec["encoder"], spec["batch_size"])
        matrix = np.where(found[:, None], matrix, 0.0).astype(np.float32)
        if spec["cache"]:
            buffer = io.BytesIO()
            np.savez(buffer, symbols=np.array(symbols, dtype=str), matrix=matrix)
            atomic_write_bytes(path, buffer.getvalue())
    log.info(
        "embeddings summer:%s: of %d vocab symbols, %d from SUMMER summaries (role %s), %d from the knowledge text "
        "(no summary), %d missing (zero row + missing flag)",
        spec["encoder"],
        len(symbols),
        counts["summary"],
        role,
        counts["knowledge"],
        counts["missing"],
    )
    info = {"cache": str(path), "summer_role": role, "genes": len(symbols), "dim": int(matrix.shape[1])}
    info.update(summaries=counts["summary"], knowledge_fallback=counts["knowledge"], missing=counts["missing"])
    return EmbeddingTable(symbols, matrix, found, f"summer:{spec['encoder']}", info)


class GeneEmbeddings(nn.Module):
    """Vocab-indexed gene vectors plus a missing flag column.

    Vectors are standardised per dimension over the genes that have one (text encoders give unit-norm
    vectors whose entries are ~1/sqrt(d): too small for a linear model with weight decay). A gene
    without a vector gets zeros and flag 1, plus a shared learned vector when ``missing='learned'``.
    The table is a buffer saved in the checkpoint: a re-test uses the vectors the model was trained on.
    """

    def __init__(
        self,
        context: DataContext,
        spec: Mapping[str, Any] | None,
        missing: str = "learned",
        standardize: bool = True,
        finetune: bool = False,
    ):
        super().__init__()
        if missing not in MISSING_POLICIES:
            raise ValueError(f"model.encoder.missing={missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
        table = embedding_table(list(context.vocab.symbols), spec, context.clusters, context.ensembl_ids)
        matrix = torch.from_numpy(np.array(table.matrix, dtype=np.float32))
        found = torch.from_numpy(np.array(table.found, dtype=bool))
        # Kept (not saved) to extend the table with genes outside the vocabulary (extend_vocabulary).
        self.spec = dict(spec) if spec is not None else None
        self.standardization: tuple[torch.Tensor, torch.Tensor] | None = None
        if standardize and found.any():
            mean = matrix[found].mean(0)
            std = matrix[found].std(0, unbiased=False).clamp(min=1e-6)
            matrix = torch.where(found[:, None], (matrix - mean) / std, torch.zeros_like(matrix))
            self.standardization = (mean, std)
        self.source, self.info = table.source, dict(table.info)
        self.num_missing = int((~found).sum())
        if finetune:
            self.table = nn.Parameter(matrix)
        else:
            self.register_buffer("table", matrix)
        self.register_buffer("missing", (~found).float())
        self.missing_vector = nn.Parameter(torch.zeros(matrix.shape[1])) if missing == "learned" else None
        self.output_dim = matrix.shape[1] + 1

    def extend_vocabulary(self, context: DataContext) -> None:
        """Rows for the genes appended to the vocabulary (``context.vocab.symbols[len(table):]``): their vectors
        from the same source, standardised with the training vocabulary's mean and deviation (a known gene's
        row is left as the checkpoint holds it)."""
        known = self.table.shape[0]
        new_symbols = context.vocab.symbols[known:]
        if not new_symbols:
            return
        table = embedding_table(new_symbols, self.spec, context.clusters, context.ensembl_ids)
        matrix = torch.from_numpy(np.array(table.matrix, dtype=np.float32))
        found = torch.from_numpy(np.array(table.found, dtype=bool))
        if self.standardization is not None:
            mean, std = self.standardization
            matrix = torch.where(found[:, None], (matrix - mean) / std, torch.zeros_like(matrix))
        matrix = matrix.to(self.table.device, self.table.dtype)
        extended = torch.cat([self.table.detach(), matrix])
        if isinstance(self.table, nn.Parameter):
            self.table = nn.Parameter(extended, requires_grad=self.table.requires_grad)
        else:
            self.table = extended
        self.missing = torch.cat([self.missing, (~found).float().to(self.missing.device)])
        self.num_missing += int((~found).sum())

    def has_vector(self, idx: torch.Tensor) -> torch.Tensor:
        """Bool per index: the gene has a vector from the source (not the missing-gene treatment)."""
        return self.missing[idx] == 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flag = self.missing[idx][..., None]
        vectors = self.table[idx]
        if self.missing_vector is not None:
            vectors = vectors + flag * self.missing_vector
        return torch.cat([vectors, flag], dim=-1)


class EmbeddingMLPEncoder(Encoder):
    """Frozen gene embeddings of the perturbed and the downstream gene -> residual pair MLP.

    Args:
        embeddings: the embedding spec (source text|table|random|summer, encoder, path, ...).
        projection_dim: if set, a trained Linear+LayerNorm shared by both roles maps each vector to this
            size before the pair MLP (adapts the frozen space; fewer pair-MLP inputs).
        finetune: train the embedding vectors themselves (off by default: unseen perturbations keep the
            pretrained vector only when the table is frozen or the gene was seen in training).
    """

    def __init__(
        self,
        context: DataContext,
        embeddings: Mapping[str, Any] | None = None,
        hidden_dim: int = 256,
        num_blocks: int = 2,
        dropout: float = 0.1,
        projection_dim: int | None = None,
        finetune: bool = False,
        missing: str = "learned",
        standardize: bool = True,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        self.genes = GeneEmbeddings(context, embedding_spec(embeddings), missing, standardize, finetune)
        dim = self.genes.output_dim
        if projection_dim:
            self.projection = nn.Sequential(nn.Linear(dim, int(projection_dim)), nn.LayerNorm(int(projection_dim)))
            dim = int(projection_dim)
        else:
            self.projection = nn.Identity()
        self.input_dropout = nn.Dropout(input_dropout)
        self.pair = PairMLP(2 * dim, hidden_dim, num_blocks, dropout)
        self.output_dim = hidden_dim

    describes_new_perturbations = True

    def extend_vocabulary(self, context: DataContext) -> None:
        self.genes.extend_vocabulary(context)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pert = self.projection(self.genes(batch["pert"]))
        gene = self.projection(self.genes(batch["gene"]))
        return self.pair(self.input_dropout(torch.cat([pert, gene], dim=-1)))


class LogRegEncoder(Encoder):
    """GenePT's logistic-regression baseline: logits = W [e(pert), e(gene)] + b over frozen embeddings.

    ``produces_logits``: the classifier uses these logits directly (softmax / cross-entropy over the
    task's classes is multinomial logistic regression). The L2 penalty is the optimiser's weight decay
    (conf/model/logreg.yaml uses torch.optim.Adam, whose weight_decay adds lambda*w to the gradient).
    """

    produces_logits = True

    def __init__(
        self,
        context: DataContext,
        embeddings: Mapping[str, Any] | None = None,
        missing: str = "zero",
        standardize: bool = True,
    ):
        super().__init__()
        self.genes = GeneEmbeddings(context, embedding_spec(embeddings), missing, standardize, finetune=False)
        self.linear = nn.Linear(2 * self.genes.output_dim, context.num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.output_dim = context.num_classes

    describes_new_perturbations = True

    def extend_vocabulary(self, context: DataContext) -> None:
        self.genes.extend_vocabulary(context)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat([self.genes(batch["pert"]), self.genes(batch["gene"])], dim=-1))
