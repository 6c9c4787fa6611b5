"""One integer index per gene symbol, shared by the perturbation and the downstream-gene roles."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class GeneVocab:
    """An ordered, immutable symbol <-> index map.

    Built from every symbol of a dataset (perturbed genes and downstream genes), sorted, so the same
    files always give the same indices. Saved in checkpoints as its symbol list.
    """

    def __init__(self, symbols: Sequence[str]):
        symbols = list(symbols)
        if len(set(symbols)) != len(symbols):
            raise ValueError("GeneVocab symbols must be unique")
        self._symbols = symbols
        self._index = {symbol: i for i, symbol in enumerate(symbols)}

    @classmethod
    def from_symbols(cls, *groups: Iterable[str]) -> GeneVocab:
        merged: set[str] = set()
        for group in groups:
            merged.update(str(s) for s in group)
        return cls(sorted(merged))

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and other._symbols == self._symbols

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} symbols)"

    def index(self, symbol: str) -> int:
        try:
            return self._index[symbol]
        except KeyError:
            raise KeyError(f"gene symbol {symbol!r} is not in the vocabulary ({len(self)} symbols)") from None

    def encode(self, symbols: Iterable[str]) -> np.ndarray:
        """Indices of many symbols; raises naming the first unknown symbol."""
        symbols = list(symbols)
        try:
            return np.fromiter((self._index[s] for s in symbols), dtype=np.int64, count=len(symbols))
        except KeyError as exc:
            raise KeyError(f"gene symbol {exc.args[0]!r} is not in the vocabulary ({len(self)} symbols)") from None

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self._symbols[int(i)] for i in indices]
