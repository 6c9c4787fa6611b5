"""Prompts for the LLM classifiers: one template per task, optional gene descriptions, optional retrieval.

A prompt names the cell line, the perturbed gene and the downstream gene (with a short description when a
description source is given), and optionally, in the style of SUMMER, lists observed *training* outcomes
for the same downstream gene under the training perturbations most similar to the perturbed gene.

Leakage guard: a :class:`PromptBuilder` only ever sees ``context.train_pairs`` (training perturbations,
validation and test removed), and never lists the pair's own perturbation, so a training prompt does not
contain its own label either.

Inspect any pair from the command line::

    python -m perturb_models.models.prompts --data k562 --task de --pert AARS --gene ACTB
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturb_models.tasks import QUESTIONS

TEMPLATE_VERSION = "1"
"""Bump when the text of a template changes: token caches are keyed by it."""


DescriptionSource = Mapping[str, str] | Callable[[str], "str | None"] | str | None


def count_words(text: str) -> int:
    """Token count stand-in when no tokenizer is given: words and commas."""
    return len(text.replace(",", " ,").split())


class MemoisedCount:
    """A token counter with a memo: retrieval asks for the cost of the same short strings over and over.

    A class rather than ``functools.lru_cache`` so that the encoder stays picklable (DDP spawn).
    """

    def __init__(self, count: Callable[[str], int], max_items: int = 200_000):
        self.count, self.max_items, self.memo = count, max_items, {}

    def __call__(self, text: str) -> int:
        value = self.memo.get(text)
        if value is None:
            value = int(self.count(text))
            if len(self.memo) < self.max_items:
                self.memo[text] = value
        return value


def outcome_word(de: int, direction: int, task: str) -> str:
    """The observed outcome of a training pair in the words of the task's question."""
    if task == "de":
        return "DE" if de == 1 else "not DE"
    if de != 1:
        return "unchanged"
    return "up" if direction == 1 else "down"


def resolve_descriptions(source: DescriptionSource) -> Callable[[str], str | None] | None:
    """Any description source as a ``symbol -> text or None`` callable.

    ``source`` may be None (no descriptions), a mapping, a callable, ``"gene_info"`` (full gene names from
    the NCBI gene_info file, see :func:`gene_info_descriptions`), or ``"package.module:attribute"``
    naming a mapping, a callable, or a zero-argument factory returning either (how another gene-text
    provider plugs in without changing this module).
    """
    if source is None or source == "" or source == "none":
        return None
    if isinstance(source, str):
        if source == "gene_info":
            source = gene_info_descriptions()
        elif ":" in source:
            module_name, _, attribute = source.partition(":")
            try:
                target = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"descriptions={source!r}: cannot import {attribute} from {module_name} ({error})") from error
            if callable(target) and not isinstance(target, Mapping):
                try:
                    produced = target()
                except TypeError:
                    produced = None  # a symbol -> text callable, not a factory
                if produced is not None:
                    target = produced
            source = target
        else:
            raise ValueError(f"descriptions={source!r}: expected null, 'gene_info' or 'package.module:attribute'")
    if isinstance(source, Mapping):
        table = dict(source)
        return table.get
    if callable(source):
        return source
    raise TypeError(f"descriptions must be a mapping, a callable or a string, got {type(source).__name__}")


# ---- optional, separate path: full gene names from NCBI gene_info -------------------------------------
def gene_info_descriptions(root: str | os.PathLike | None = None) -> dict[str, str]:
    """``symbol -> full gene name`` from NCBI ``gene_info`` (found like every knowledge file: ``root``,
    else ``$PERTURB_KNOWLEDGE``, else the cache, downloaded when missing). Official symbols win over synonyms.

    A minimal description source until richer gene text (GO terms, summaries) is wired in.
    """
    from perturb_models.knowledge.files import knowledge_file
    from perturb_models.knowledge.gene_info import read_gene_info

    genes = read_gene_info(knowledge_file("gene_info", root))
    names: dict[str, str] = {}
    for synonyms, description in zip(genes["synonyms"], genes["description"]):
        if description:
            for synonym in synonyms:
                names.setdefault(synonym, description)
    for symbol, description in zip(genes["symbol"], genes["description"]):
        if description:
            names[symbol] = description
    return names


# ---- retrieval: co-response similarity over training perturbations ------------------------------------
class CoResponseNeighbours:
    """Training perturbations most similar to a gene, by co-response in the training pairs.

    Each gene X gets a profile over the training perturbations: 1 where X is DE after that knockdown.
    Similarity of a (possibly unseen) perturbed gene P to a training perturbation Q is the cosine of their
    profiles, so P needs to have been measured as a downstream gene in training. Built from
    ``train_pairs`` only.
    """

    def __init__(self, train_pairs: pd.DataFrame, max_neighbours: int = 50):
        self.max_neighbours = max_neighbours
        perts = sorted(train_pairs["pert"].unique())
        genes = sorted(set(train_pairs["gene"]) | set(perts))
        self.pert_index = {p: i for i, p in enumerate(perts)}
        self.gene_index = {g: i for i, g in enumerate(genes)}
        self.perts = perts
        de = train_pairs.loc[train_pairs["de"] == 1]
        rows = de["gene"].map(self.gene_index).to_numpy()
        cols = de["pert"].map(self.pert_index).to_numpy()
        profiles = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(genes), len(perts)))
        norms = np.sqrt(np.asarray(profiles.multiply(profiles).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        self.profiles = sp.csr_matrix(sp.diags(1.0 / norms) @ profiles)
        # Profiles of the training perturbations in their downstream-gene role, for the cosine.
        self.pert_rows = np.array([self.gene_index[p] for p in perts])
        self._cache: dict[str, list[tuple[str, float]]] = {}

    def __call__(self, pert: str) -> list[tuple[str, float]]:
        """Up to ``max_neighbours`` training perturbations (not ``pert`` itself), most similar first."""
        if pert in self._cache:
            return self._cache[pert]
        row = self.gene_index.get(pert)
        result: list[tuple[str, float]] = []
        if row is not None and self.profiles[row].nnz:
            sims = np.asarray((self.profiles[self.pert_rows] @ self.profiles[row].T).todense()).ravel()
            own = self.pert_index.get(pert)
            if own is not None:
                sims[own] = 0.0
            top = np.argsort(-sims, kind="stable")[: self.max_neighbours]
            result = [(self.perts[i], float(sims[i])) for i in top if sims[i] > 0]
        self._cache[pert] = result
        return result


class PromptBuilder:
    """Text prompt of a (perturbation, downstream gene) pair for one task.

    Args:
        cell_line: named in every prompt (``context.cell_line``).
        task: ``de``, ``dir`` or ``joint``.
        train_pairs: ``context.train_pairs`` (training perturbations only); used for retrieval.
        descriptions: a description source (see :func:`resolve_descriptions`).
        retrieval_k: at most this many similar training perturbations listed (0: no retrieval).
        retrieval_tokens: token budget of the retrieval sentence.
        count_tokens: ``text -> number of tokens`` (the model's tokenizer); default: words + punctuation.
        max_description_chars: descriptions are cut to this many characters.
    """

    def __init__(self, cell_line: str, task: str, train_pairs: pd.DataFrame | None = None,
                 descriptions: DescriptionSource = None, retrieval_k: int = 0, retrieval_tokens: int = 64,
                 count_tokens: Callable[[str], int] | None = None, max_description_chars: int = 120):
        if task not in QUESTIONS:
            raise ValueError(f"task must be one of {', '.join(QUESTIONS)}, got {task!r}")
        self.cell_line, self.task = cell_line, task
        self.describe = resolve_descriptions(descriptions)
        self.retrieval_k, self.retrieval_tokens = int(retrieval_k), int(retrieval_tokens)
        self.count_tokens = MemoisedCount(count_tokens or count_words)
        self.max_description_chars = int(max_description_chars)
        self.neighbours: CoResponseNeighbours | None = None
        self.outcomes: dict[tuple[str, str], tuple[int, int]] = {}
        if self.retrieval_k > 0:
            if train_pairs is None:
                raise ValueError("retrieval_k > 0 needs train_pairs")
            self.neighbours = CoResponseNeighbours(train_pairs)
            self.outcomes = {(p, g): (int(d), int(r)) for p, g, d, r in
                             train_pairs.loc[:, ["pert", "gene", "de", "dir"]].itertuples(index=False)}

    def settings(self) -> dict:
        """What changes the text besides the pair (part of the token cache key)."""
        return {"template": TEMPLATE_VERSION, "task": self.task, "cell_line": self.cell_line,
                "descriptions": self.describe is not None, "retrieval_k": self.retrieval_k,
                "retrieval_tokens": self.retrieval_tokens, "max_description_chars": self.max_description_chars}

    def _named(self, symbol: str) -> str:
        text = self.describe(symbol) if self.describe is not None else None
        if not text:
            return symbol
        text = str(text).strip()
        if len(text) > self.max_description_chars:
            text = text[: self.max_description_chars].rsplit(" ", 1)[0] + "..."
        return f"{symbol} ({text})"

    def retrieved(self, pert: str, gene: str) -> list[tuple[str, str]]:
        """``(training perturbation, outcome)`` for ``gene``, most similar perturbations first, within budget."""
        if self.neighbours is None:
            return []
        found: list[tuple[str, str]] = []
        used = self.count_tokens(self._retrieval_sentence(gene, []))
        for neighbour, _ in self.neighbours(pert):
            if neighbour == pert:
                continue
            outcome = self.outcomes.get((neighbour, gene))
            if outcome is None:
                continue
            item = (neighbour, outcome_word(outcome[0], outcome[1], self.task))
            cost = self.count_tokens(f" {item[0]} {item[1]},")
            if used + cost > self.retrieval_tokens:
                break
            found.append(item)
            used += cost
            if len(found) >= self.retrieval_k:
                break
        return found

    @staticmethod
    def _retrieval_sentence(gene: str, items: Iterable[tuple[str, str]]) -> str:
        listed = ", ".join(f"{p} {o}" for p, o in items)
        return f"Observed for {gene} after knockdown of similar genes: {listed}."

    def __call__(self, pert: str, gene: str) -> str:
        lines = [
            f"Cell line: {self.cell_line}.",
            f"CRISPRi knockdown of {self._named(pert)}.",
            f"Downstream gene: {self._named(gene)}.",
        ]
        items = self.retrieved(pert, gene)
        if items:
            lines.append(self._retrieval_sentence(gene, items))
        lines.append(QUESTIONS[self.task].format(pert=pert, gene=gene))
        return "\n".join(lines)


def builder_from_context(context, **options) -> PromptBuilder:
    """A :class:`PromptBuilder` over a DataModule's ``DataContext`` (training pairs only)."""
    return PromptBuilder(cell_line=context.cell_line or context.dataset, task=context.task,
                         train_pairs=context.train_pairs, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the LLM prompt of one (perturbation, gene) pair.")
    parser.add_argument("--data", default="k562", help="dataset name (k562, rpe1, hepg2, jurkat, k562_set, synthetic)")
    parser.add_argument("--task", default="de", choices=sorted(QUESTIONS))
    parser.add_argument("--pert", required=True)
    parser.add_argument("--gene", required=True)
    parser.add_argument("--root", default=None, help="folder of the PerturbQA CSVs (default: $PERTURBQA_DATA)")
    parser.add_argument("--cell-line", default=None)
    parser.add_argument("--descriptions", default=None, help="null, gene_info, or package.module:attribute")
    parser.add_argument("--retrieval-k", type=int, default=5)
    parser.add_argument("--retrieval-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    args = parser.parse_args(argv)

    from perturb_models.data.datamodule import PerturbQADataModule

    cell_lines = {"k562": "K562", "rpe1": "RPE1", "hepg2": "HepG2", "jurkat": "Jurkat", "k562_set": "K562"}
    datamodule = PerturbQADataModule(name=args.data, task=args.task, root=args.root, seed=args.seed,
                                     cell_line=args.cell_line or cell_lines.get(args.data, args.data))
    datamodule.prepare_data()
    datamodule.setup()
    builder = builder_from_context(datamodule.context, descriptions=args.descriptions,
                                   retrieval_k=args.retrieval_k, retrieval_tokens=args.retrieval_tokens)
    stage = next((s for s, f in datamodule.frames.items()
                  if ((f["pert"] == args.pert) & (f["gene"] == args.gene)).any()), None)
    print(builder(args.pert, args.gene))
    print(f"\n[pair is in the {stage} split]" if stage else "\n[pair is not in any split of this dataset]")


if __name__ == "__main__":
    main()
