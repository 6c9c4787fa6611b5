"""Prompts for the LLM classifiers: one template per task, gene descriptions, and retrieved evidence.

A prompt names the cell line, the perturbed gene and the downstream gene (each with a short description
from the project's gene text, :mod:`perturb_models.knowledge.text`, when the knowledge files exist), then
gives numbers a small model can read, from the same neighbour machinery as ``model=knn``
(:class:`~perturb_models.models.knn.TrainingNeighbours`): how often the downstream gene changed in
training, how many of the k knockdowns most similar to the perturbed gene (among those that measured the
downstream gene) changed it and which way, and the closest of them with their similarity.

Leakage guard: the neighbours are built from ``context.train_pairs`` only (training perturbations,
validation and test removed), and a perturbation is never its own neighbour, so a training prompt does
not contain its own label either.

Print the prompts of pairs from the command line (any Hydra override of ``train.py`` applies)::

    python -m perturb_models.cli.prompts data=k562 data.task=joint --pair AARS2 AAK1 --pair ...
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from perturb_models.tasks import OUTCOME_WORDS, QUESTIONS, outcome_codes

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "2"
"""Bump when the text of a template changes: token caches are keyed by it."""


# Shorter than the embedding models' text: a small model reads the name and a few GO processes.
PROMPT_TEXT_RECIPE = {"synonyms": False, "go": True, "aspects": ["P", "F"], "max_terms_per_aspect": 2, "max_chars": 130}

DescriptionSource = Mapping[str, str] | Callable[[str], "str | None"] | str | None


def outcome_word(de: int, direction: int, task: str) -> str:
    """The observed outcome of a training pair, as the prompts write it."""
    return OUTCOME_WORDS[int(outcome_codes(np.array([de]), np.array([direction]))[0])]


class KnowledgeDescriptions:
    """``symbol -> description`` from the gene text of :mod:`perturb_models.knowledge.text` (the embedding
    models' source), without its leading ``Gene SYMBOL:``. Symbols not in gene_info get none.

    Built lazily and picklable (spawned DDP workers rebuild nothing: the table travels with it).
    """

    def __init__(
        self,
        symbols: Sequence[str],
        root: str | None = None,
        recipe: Mapping[str, Any] | None = None,
        allow_download: bool = False,
        ensembl_ids: Mapping[str, str] | None = None,
    ):
        from perturb_models.knowledge.text import TextRecipe

        self.recipe = TextRecipe.from_mapping(recipe or PROMPT_TEXT_RECIPE)
        self.root, self.allow_download = root, allow_download
        self.ensembl_ids = dict(ensembl_ids or {})
        self.table: dict[str, str] = {}
        self.add(symbols)

    def add(self, symbols: Sequence[str]) -> None:
        """Describe more genes (``predict.py``'s genes outside the vocabulary); known ones keep their text."""
        from perturb_models.knowledge.text import build_gene_texts

        new = [s for s in symbols if s not in self.table]
        if not new:
            return
        texts = build_gene_texts(
            new, self.root, self.recipe, allow_download=self.allow_download, ensembl_ids=self.ensembl_ids
        )
        for symbol, text in texts.texts.items():
            if texts.has_knowledge[symbol]:
                text = re.sub(r"^Gene [^:.]*[:.]\s*", "", text)
                # The gene type is "protein coding" for almost every gene: tokens with nothing to tell.
                self.table[symbol] = re.sub(r"\s*Type: [^.]*\.", "", text).strip()

    def __call__(self, symbol: str) -> str | None:
        return self.table.get(symbol)


def knowledge_available(root: str | None = None) -> bool:
    """Whether the gene_info file is already on disk (``root``, ``$PERTURB_KNOWLEDGE`` or the cache)."""
    from perturb_models.knowledge.files import KnowledgeFileError, knowledge_file

    try:
        knowledge_file("gene_info", root, allow_download=False)
        return True
    except KnowledgeFileError:
        return False


def resolve_descriptions(
    source: DescriptionSource,
    symbols: Sequence[str] = (),
    knowledge_root: str | None = None,
    ensembl_ids: Mapping[str, str] | None = None,
) -> Callable[[str], str | None] | None:
    """Any description source as a ``symbol -> text or None`` callable.

    ``source`` may be None / ``none`` (no descriptions); ``summer`` (the gene summaries ``model=summer``
    wrote, from the user cache); ``auto`` (the gene text of
    :mod:`perturb_models.knowledge.text` when the knowledge files are on disk, else none); ``knowledge``
    (the same, an error when the files are missing; ``ensembl_ids`` as ``DataContext.ensembl_ids``); a
    mapping; a callable; or
    ``"package.module:attribute"`` naming a mapping, a callable, or a zero-argument factory of either.
    """
    if source is None or source == "" or source == "none":
        return None
    if isinstance(source, str):
        if source == "summer":
            from perturb_models.models.summer import stored_summaries

            return stored_summaries("gene").get
        if source in ("auto", "knowledge"):
            if source == "auto" and not knowledge_available(knowledge_root):
                log.warning(
                    "prompt descriptions: no gene_info file in the knowledge folder ($PERTURB_KNOWLEDGE); "
                    "prompts carry gene symbols only"
                )
                return None
            return KnowledgeDescriptions(
                symbols, knowledge_root, allow_download=source == "knowledge", ensembl_ids=ensembl_ids
            )
        if ":" in source:
            module_name, _, attribute = source.partition(":")
            try:
                target = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as error:
                raise ValueError(
                    f"descriptions={source!r}: cannot import {attribute} from {module_name} ({error})"
                ) from error
            if callable(target) and not isinstance(target, Mapping):
                try:
                    produced = target()
                except TypeError:
                    produced = None  # a symbol -> text callable, not a factory
                if produced is not None:
                    target = produced
            source = target
        else:
            raise ValueError(
                f"descriptions={source!r}: expected null, auto, knowledge, summer or 'package.module:attribute'"
            )
    if isinstance(source, Mapping):
        table = dict(source)
        return table.get
    if callable(source):
        return source
    raise TypeError(f"descriptions must be a mapping, a callable or a string, got {type(source).__name__}")


class PromptBuilder:
    """Text prompt of a (perturbation, downstream gene) pair for one task.

    Args:
        cell_line: named in every prompt (``context.cell_line``).
        task: ``de``, ``dir`` or ``joint``.
        vocab: the DataModule's vocabulary (symbols <-> indices of the neighbours).
        neighbours: a :class:`~perturb_models.models.knn.TrainingNeighbours` (None: no evidence lines).
        descriptions: a description source (see :func:`resolve_descriptions`).
        retrieval_k: the evidence counts outcomes over this many nearest knockdowns (0: no evidence).
        show: this many of the closest are named, with similarity and outcome.
        max_description_chars: descriptions are cut to this many characters.
        ensembl_ids: the dataset's symbol -> Ensembl id map (``DataContext.ensembl_ids``) for the
            knowledge descriptions' symbol resolution.
    """

    def __init__(
        self,
        cell_line: str,
        task: str,
        vocab=None,
        neighbours=None,
        descriptions: DescriptionSource = None,
        retrieval_k: int = 20,
        show: int = 3,
        max_description_chars: int = 160,
        knowledge_root: str | None = None,
        description_setting: str | None = None,
        ensembl_ids: Mapping[str, str] | None = None,
    ):
        if task not in QUESTIONS:
            raise ValueError(f"task must be one of {', '.join(QUESTIONS)}, got {task!r}")
        self.cell_line, self.task = cell_line, task
        self.vocab = vocab
        symbols = list(vocab.symbols) if vocab is not None else []
        self.describe = resolve_descriptions(descriptions, symbols, knowledge_root, ensembl_ids)
        self.description_setting = description_setting or (
            descriptions if isinstance(descriptions, str) else type(descriptions).__name__
        )
        self.retrieval_k, self.show = int(retrieval_k), int(show)
        self.max_description_chars = int(max_description_chars)
        self.neighbours = neighbours if self.retrieval_k > 0 else None
        if self.neighbours is not None and vocab is None:
            raise ValueError("retrieval needs the vocabulary (vocab=context.vocab)")

    def settings(self) -> dict:
        """What changes the text besides the pair (part of the token cache key)."""
        return {
            "template": TEMPLATE_VERSION,
            "task": self.task,
            "cell_line": self.cell_line,
            "descriptions": self.description_setting if self.describe is not None else None,
            "recipe": getattr(getattr(self.describe, "recipe", None), "version", None),
            "retrieval_k": self.retrieval_k if self.neighbours is not None else 0,
            "show": self.show,
            "max_description_chars": self.max_description_chars,
        }

    def _named(self, symbol: str) -> str:
        text = self.describe(symbol) if self.describe is not None else None
        if not text:
            return symbol
        text = str(text).strip().rstrip(".")
        if len(text) > self.max_description_chars:
            text = text[: self.max_description_chars].rsplit(" ", 1)[0] + "..."
        return f"{symbol} ({text})"

    def nearest(self, pert: str, gene: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(training perturbations, similarities, outcome codes)`` behind the evidence of a pair."""
        if self.neighbours is None or pert not in self.vocab or gene not in self.vocab:
            return [], np.zeros(0), np.zeros(0, dtype=np.int64)
        idx, sims, codes = self.neighbours.nearest(self.vocab.index(pert), self.vocab.index(gene), self.retrieval_k)
        return self.vocab.decode(idx.tolist()), sims, codes

    def retrieved(self, pert: str, gene: str) -> list[tuple[str, str]]:
        """``(training perturbation, outcome word)`` of the k nearest knockdowns that measured ``gene``."""
        names, _, codes = self.nearest(pert, gene)
        return [(name, OUTCOME_WORDS[int(code)]) for name, code in zip(names, codes)]

    def evidence(self, pert: str, gene: str) -> list[str]:
        """The lines of numbers: the gene's training rate, the k nearest knockdowns' outcomes, the closest."""
        if self.neighbours is None or gene not in self.vocab:
            return []
        g = self.vocab.index(gene)
        measured = int(self.neighbours.measured_count[g])
        lines = []
        if measured:
            if self.task == "dir":
                up = int(self.neighbours.outcome[g].data.tolist().count(3))
                lines.append(f"In training, {gene} went up after {up} of the {measured} knockdowns that changed it.")
            else:
                lines.append(
                    f"In training, {gene} changed after {int(self.neighbours.changed_count[g])} of the "
                    f"{measured} knockdowns that measured it."
                )
        names, sims, codes = self.nearest(pert, gene)
        if len(names):
            down, up = int((codes == 1).sum()), int((codes == 2).sum())
            changed = int((codes != 0).sum())
            if self.task == "dir":
                counts = f"{down} down, {up} up"
            elif changed == down + up:
                counts = f"{changed} changed it ({down} down, {up} up), {len(names) - changed} did not"
            else:
                counts = f"{changed} changed it, {len(names) - changed} did not"
            lines.append(f"Of the {len(names)} knockdowns most similar to {pert} that measured {gene}: {counts}.")
            closest = ", ".join(
                f"{n} {s:.2f} {OUTCOME_WORDS[int(c)]}"
                for n, s, c in zip(names[: self.show], sims[: self.show], codes[: self.show])
            )
            if closest:
                lines.append(f"Closest (similarity, outcome): {closest}.")
        elif measured:
            lines.append(f"No knockdown similar to {pert} measured {gene}.")
        return lines

    def extend_vocabulary(self, context) -> None:
        """Prompts for the genes appended to the vocabulary (``predict.py``): their descriptions and, through
        the neighbours (extended by the caller), their retrieved knockdowns; known genes' prompts unchanged."""
        new = list(context.vocab.symbols[len(self.vocab) :]) if self.vocab is not None else []
        self.vocab = context.vocab
        if new and isinstance(self.describe, KnowledgeDescriptions):
            self.describe.add(new)

    def __call__(self, pert: str, gene: str) -> str:
        lines = [
            f"Cell line: {self.cell_line}.",
            f"CRISPRi knockdown of {self._named(pert)}.",
            f"Downstream gene: {self._named(gene)}.",
            *self.evidence(pert, gene),
            QUESTIONS[self.task].format(pert=pert, gene=gene),
        ]
        return "\n".join(lines)


def builder_from_context(
    context, graphs: Mapping[str, Mapping[str, Any]] | None = None, neighbours=None, power: float = 1.0, **options
) -> PromptBuilder:
    """A :class:`PromptBuilder` over a DataModule's ``DataContext`` (training pairs only).

    The neighbours are ``neighbours`` when given, else built from ``graphs`` (the ``model=knn`` machinery).
    """
    if neighbours is None and graphs and int(options.get("retrieval_k", 20)) > 0:
        from perturb_models.models.knn import TrainingNeighbours

        neighbours = TrainingNeighbours(context, graphs, power)
    return PromptBuilder(
        cell_line=context.cell_line or context.dataset,
        task=context.task,
        vocab=context.vocab,
        neighbours=neighbours,
        ensembl_ids=context.ensembl_ids,
        **options,
    )
