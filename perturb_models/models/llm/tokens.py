"""Tokenised prompts of (perturbation, gene) pairs: in memory, and cached on disk once per split.

A split's token file lives in ``$PERTURB_MODELS_CACHE/llm_tokens/<key>.pt``; the key (:func:`token_cache_key`)
hashes everything that changes the tokens: the tokenizer, the prompt settings (template version included),
the retrieval graph, ``max_length``, the training data and the split's pairs.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perturb_models.io import atomic_write_bytes

TOKENISE_CHUNK = 2048
"""Prompts handed to the tokenizer at once."""


class PairTokens:
    """Token ids of tokenised pairs, looked up by ``pert_idx * num_genes + gene_idx``."""

    def __init__(self, num_genes: int):
        self.num_genes = num_genes
        self.row_of: dict[int, int] = {}
        self.rows: list[torch.Tensor] = []

    def keys(self, pert: torch.Tensor, gene: torch.Tensor) -> list[int]:
        return (pert.cpu() * self.num_genes + gene.cpu()).tolist()

    def add(self, keys: Sequence[int], ids: Sequence[Sequence[int]]) -> None:
        for key, row in zip(keys, ids):
            if key not in self.row_of:
                self.row_of[key] = len(self.rows)
                self.rows.append(torch.as_tensor(row, dtype=torch.int32))

    def add_packed(self, keys: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.add(keys.tolist(), [flat[offsets[i] : offsets[i + 1]] for i in range(len(keys))])

    @staticmethod
    def pack(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((t for r in ids for t in r), dtype=np.int32, count=int(offsets[-1]))
        return flat, offsets


def tokenise_prompts(
    tokenizer,
    prompt: Callable[[str, str], str],
    perts: Sequence[str],
    genes: Sequence[str],
    max_length: int,
    pad_token_id: int,
    desc: str | None = None,
) -> list[list[int]]:
    """Token ids of ``prompt(pert, gene)`` for each pair, cut to ``max_length`` (the tokenizer's side).

    A progress bar is shown when ``desc`` is given and there is more than one chunk to tokenise.
    """
    ids: list[list[int]] = []
    chunk = TOKENISE_CHUNK
    for start in tqdm(
        range(0, len(perts), chunk),
        desc=desc or "tokenising prompts",
        disable=desc is None or len(perts) <= chunk,
        leave=False,
    ):
        texts = [prompt(p, g) for p, g in zip(perts[start : start + chunk], genes[start : start + chunk])]
        out = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        ids.extend(out)
    bad = [i for i, row in enumerate(ids) if pad_token_id in row]
    if bad:
        # Last-token pooling looks for the last non-pad token: a pad id inside a prompt would cut it short.
        raise ValueError(f"the prompt of ({perts[bad[0]]}, {genes[bad[0]]}) contains the pad token id {pad_token_id}")
    return ids


def data_fingerprint(context, symbols: Sequence[str]) -> str:
    """Identity of the training data a prompt may quote (dataset, source, training pairs, vocabulary)."""
    return hashlib.sha1(
        "|".join(
            [
                context.dataset,
                str(context.source),
                str(len(context.train_pairs)),
                hashlib.sha1(
                    context.train_pairs.loc[:, ["pert", "gene", "de", "dir"]].to_csv(index=False).encode()
                ).hexdigest(),
                hashlib.sha1("\n".join(symbols).encode()).hexdigest(),
            ]
        ).encode()
    ).hexdigest()[:16]


def token_cache_key(**parts: Any) -> str:
    """File name (without ``.pt``) of a split's token file: a hash of ``parts`` (JSON, sorted keys)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def read_token_file(path: Path, tokens: PairTokens) -> int:
    """Add the pairs stored in ``path`` to ``tokens``; returns how many the file holds."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    tokens.add_packed(stored["keys"].numpy(), stored["flat"].numpy(), stored["offsets"].numpy())
    return len(stored["keys"])


def write_token_file(path: Path, keys: np.ndarray, ids: Sequence[Sequence[int]]) -> None:
    """Store the token ids of the pairs ``keys`` (packed) in ``path``, atomically."""
    flat, offsets = PairTokens.pack(ids)
    buffer = io.BytesIO()
    torch.save(
        {"keys": torch.from_numpy(keys), "flat": torch.from_numpy(flat), "offsets": torch.from_numpy(offsets)},
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())
