"""SUMMER (SUMMarize, retrievE, and answeR), PerturbQA's LLM method, over this framework's data, knowledge
and neighbours. Nothing is fitted: like ``model=knn`` one pass over the training data writes the checkpoint,
and the answers are computed for the validation and test pairs.

- **Summarize**: for each gene, the backend LLM turns its knowledge text (gene_info description and
  synonyms, GO terms of the three aspects; :mod:`perturb_models.knowledge.text`) into a short summary, one
  for the gene as the perturbation and one as the downstream gene. Summaries are a cached artifact
  (``$PERTURB_MODELS_CACHE/summer_summaries/<key>.json``, keyed by the LLM, :data:`SUMMARY_VERSION`, the
  text recipe and the knowledge files) that other models read as gene text (``descriptions: summer``).
- **Retrieve**: labelled training pairs, in priority order, each category with a budget: the same
  perturbation with a similar downstream gene (only when the perturbation was trained on; PerturbQA's test
  perturbations never are), the same gene after a similar perturbation (:class:`TrainingNeighbours`, as
  ``model=knn``), both similar, then random training pairs.
- **Answer**: a prompt with the two summaries, the cell line and the retrieved examples. ``scoring=sample``
  (the paper's): ``samples`` completions (chain of thought when ``cot``), each parsed to an option or an
  abstention ("insufficient evidence", or nothing readable), averaged over the answers that are not
  abstentions. ``scoring=logprob``: one forward pass per pair, the options' probabilities read from the
  next-token distribution (deterministic, cheap). A pair whose answers are all abstentions gets equal class
  probabilities, and is counted.

Leakage guard: every example comes from ``context.train_pairs`` (training perturbations only), and a pair
is never its own example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from perturb_models.data.datamodule import DataContext
from perturb_models.errors import ConfigError
from perturb_models.io import atomic_write_text, cache_dir
from perturb_models.llm_backends import Backend, build_backend
from perturb_models.models.base import Encoder
from perturb_models.models.knn import TrainingNeighbours
from perturb_models.tasks import OUTCOME_WORDS

log = logging.getLogger(__name__)

SUMMARY_VERSION = "1"
"""Bump when the summary prompts change: the summaries artifact is keyed by it."""
PROMPT_VERSION = "1"
"""Bump when the answer prompts change (the response cache is keyed by the prompt text anyway)."""

# About 50 knowledge entries per gene, as the paper's summaries read: synonyms and up to 16 GO terms per aspect.
SUMMARY_TEXT_RECIPE = {
    "synonyms": True,
    "go": True,
    "aspects": ["P", "F", "C"],
    "max_terms_per_aspect": 16,
    "max_synonyms": 6,
    "max_chars": 1600,
}

ROLES = {
    "pert": (
        "Summarize what is known about the human gene {symbol} that matters when it is knocked down with "
        "CRISPRi: its function, the pathways and complexes it belongs to, and which genes or processes "
        "lose its activity.\nFacts about {symbol}:\n{facts}\nSummary in two or three sentences:"
    ),
    "gene": (
        "Summarize what is known about the human gene {symbol} as a gene whose expression may change "
        "after another gene is knocked down: its function, the pathways and complexes it belongs to, "
        "and what regulates its expression.\nFacts about {symbol}:\n{facts}\nSummary in two or three sentences:"
    ),
}

# Per task: the answer options in class order, and the abstention option.
OPTIONS = {"de": ("no", "yes"), "dir": ("down", "up"), "joint": ("unchanged", "down", "up")}
ABSTAIN = "insufficient"
QUESTIONS = {
    "de": "Question: is {gene} differentially expressed after the CRISPRi knockdown of {pert}?",
    "dir": (
        "Question: {gene} is differentially expressed after the CRISPRi knockdown of {pert}. Does its "
        "expression go up or down?"
    ),
    "joint": "Question: after the CRISPRi knockdown of {pert}, is the expression of {gene} unchanged, down or up?",
}
CATEGORIES = ("same_pert", "same_gene", "both_similar", "random")
CATEGORY_TITLES = {
    "same_pert": "same knockdown, similar gene",
    "same_gene": "same gene, similar knockdown",
    "both_similar": "similar knockdown, similar gene",
    "random": "other experiments",
}
COT = (
    "Think step by step about the two genes and the experiments above, then give your final answer on the "
    "last line as 'Answer: {options}'."
)
DIRECT = "Answer with exactly one word: {options}."


def option_list(task: str, cot: bool) -> str:
    """The options as the prompt's last line names them (``yes, no or insufficient``)."""
    words = [*sorted(OPTIONS[task], key=lambda w: ("yes", "no", "unchanged", "down", "up").index(w)), ABSTAIN]
    joined = ", ".join(words[:-1]) + f" or {words[-1]}"
    return f"<{joined}>" if cot else joined


def template_words() -> list[str]:
    """Every fixed text of the prompts (the word-level test tokenizer learns these words)."""
    return [
        *ROLES.values(),
        *QUESTIONS.values(),
        *OPTIONS["joint"],
        *OPTIONS["de"],
        ABSTAIN,
        COT,
        DIRECT,
        "Cell line: CRISPRi screen in cells. Knocked-down gene Downstream gene Outcomes measured in training "
        "experiments knockdown of -> evidence Answer: changed",
        *CATEGORY_TITLES.values(),
    ]


# ---- answers -------------------------------------------------------------------------------------------
def parse_answer(text: str, task: str, cot: bool) -> int | None | str:
    """The class an answer names (an index into ``OPTIONS[task]``), ``None`` for an abstention ("insufficient
    evidence"), or ``"unparsed"`` when no option can be read. With chain of thought the text after the last
    ``Answer:`` is read (else the last line); without, the first option word of the text."""
    text = text.strip()
    if cot:
        marks = list(re.finditer(r"answer\s*[:\-]", text, flags=re.IGNORECASE))
        segment = text[marks[-1].end() :] if marks else (text.splitlines()[-1] if text else "")
    else:
        segment = text
    words = re.findall(r"[a-z]+", segment.lower())
    options = OPTIONS[task]
    aliases = {
        "increase": "up",
        "increased": "up",
        "upregulated": "up",
        "decrease": "down",
        "decreased": "down",
        "downregulated": "down",
        "not": "no" if task == "de" else "unchanged",
        "unaffected": "unchanged",
    }
    for word in words:
        if word == ABSTAIN:
            return None
        word = aliases.get(word, word)
        if word in options:
            return options.index(word)
    return "unparsed"


# ---- retrieval -----------------------------------------------------------------------------------------
class SummerRetrieval:
    """Training pairs to show for a query pair, by category in priority order, each within its budget.

    Args:
        context: the DataModule's ``DataContext`` (training pairs only are read).
        graphs: perturbation similarity (graph specs with ``candidates: train_perts``, as ``model=knn``).
        gene_graphs: gene-gene similarity (``candidates: all``), for "similar gene".
        budgets: examples per category (``same_pert``, ``same_gene``, ``both_similar``, ``random``); 0 turns
            a category off.
        seed: seed of the random fill (drawn per pair, so a pair always sees the same examples).
    """

    def __init__(
        self,
        context: DataContext,
        graphs: Mapping[str, Any],
        gene_graphs: Mapping[str, Any] | None,
        budgets: Mapping[str, int],
        power: float = 1.0,
        seed: int = 0,
        neighbours: TrainingNeighbours | None = None,
    ):
        from perturb_models.knowledge.graphs import build_graphs

        unknown = sorted(set(budgets) - set(CATEGORIES))
        if unknown:
            raise ConfigError(
                f"model.encoder.retrieval_budgets: unknown categories {unknown}; expected {list(CATEGORIES)}"
            )
        self.budgets = {c: int(budgets.get(c, 0)) for c in CATEGORIES}
        self.neighbours = neighbours or TrainingNeighbours(context, graphs, power)
        n = context.num_genes
        self.gene_similarity = sparse.csr_matrix((n, n))
        if gene_graphs and (self.budgets["same_pert"] or self.budgets["both_similar"]):
            graph = build_graphs(gene_graphs, context)
            src, dst = graph.edge_index.numpy()
            keep = (src < n) & (dst < n) & (src != dst)
            similarity = sparse.csr_matrix(
                (graph.edge_weight.numpy()[keep].astype(np.float64), (dst[keep], src[keep])), shape=(n, n)
            )
            similarity.sum_duplicates()
            self.gene_similarity = similarity
        pairs = context.train_pairs
        self.train_gene = pairs["gene_idx"].to_numpy()
        self.train_pert = pairs["pert_idx"].to_numpy()
        self.train_perts = set(self.train_pert.tolist())
        self.seed = int(seed)

    def _similar_genes(self, gene: int, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.gene_similarity.indptr[gene], self.gene_similarity.indptr[gene + 1]
        cols, sims = self.gene_similarity.indices[s:e], self.gene_similarity.data[s:e]
        order = np.lexsort((cols, -sims))[:k]
        return cols[order], sims[order]

    def _outcome(self, pert: int, gene: int) -> int | None:
        outcome = self.neighbours.outcome
        s, e = outcome.indptr[gene], outcome.indptr[gene + 1]
        at = np.searchsorted(outcome.indices[s:e], pert)
        if at < e - s and outcome.indices[s + at] == pert:
            return int(outcome.data[s + at]) - 1
        return None

    def examples(self, pert: int, gene: int) -> list[tuple[int, int, int, str]]:
        """``(training perturbation, gene, outcome code, category)`` for the prompt of ``(pert, gene)``."""
        chosen: list[tuple[int, int, int, str]] = []
        seen = {(pert, gene)}

        def take(p: int, g: int, code: int, category: str) -> None:
            if (p, g) not in seen:
                seen.add((p, g))
                chosen.append((int(p), int(g), int(code), category))

        budget = self.budgets
        if budget["same_pert"] and pert in self.train_perts:
            genes, _ = self._similar_genes(gene, 4 * budget["same_pert"] + 20)
            found = 0
            for g in genes.tolist():
                code = self._outcome(pert, g)
                if code is not None and found < budget["same_pert"]:
                    take(pert, g, code, "same_pert")
                    found += 1
        if budget["same_gene"]:
            perts, _, codes = self.neighbours.nearest(pert, gene, budget["same_gene"] + 1)
            for p, code in list(zip(perts.tolist(), codes.tolist()))[: budget["same_gene"]]:
                take(p, gene, code, "same_gene")
        if budget["both_similar"]:
            s, e = self.neighbours.similarity.indptr[pert], self.neighbours.similarity.indptr[pert + 1]
            cols, sims = self.neighbours.similarity.indices[s:e], self.neighbours.similarity.data[s:e]
            top = np.lexsort((cols, -sims))[:20]
            genes, gene_sims = self._similar_genes(gene, 20)
            candidates = []
            for p, ps in zip(cols[top].tolist(), sims[top].tolist()):
                for g, gs in zip(genes.tolist(), gene_sims.tolist()):
                    code = self._outcome(p, g)
                    if code is not None:
                        candidates.append((-ps * gs, p, g, code))
            for _, p, g, code in sorted(candidates)[: budget["both_similar"]]:
                take(p, g, code, "both_similar")
        if budget["random"] and len(self.train_gene):
            rng = np.random.default_rng([self.seed, pert, gene])
            draws = rng.choice(
                len(self.train_gene), size=min(len(self.train_gene), 3 * budget["random"]), replace=False
            )
            found = 0
            for row in draws.tolist():
                p, g = int(self.train_pert[row]), int(self.train_gene[row])
                code = self._outcome(p, g)
                if code is not None and found < budget["random"] and (p, g) not in seen:
                    take(p, g, code, "random")
                    found += 1
        return chosen


# ---- summaries -----------------------------------------------------------------------------------------
def knowledge_identity(root: str | None) -> dict[str, Any]:
    """Which knowledge files the texts come from (name, size, modification time), for cache keys."""
    from perturb_models.knowledge.files import KnowledgeFileError, knowledge_file

    out = {}
    for kind in ("gene_info", "gene2go"):
        try:
            path = knowledge_file(kind, root, allow_download=False)
            stat = path.stat()
            out[kind] = [path.name, stat.st_size, stat.st_mtime_ns]
        except (KnowledgeFileError, OSError):
            out[kind] = None
    return out


class GeneSummaries:
    """Per gene and role (``pert``, ``gene``) summaries: LLM-written (``source: llm``), the knowledge text
    itself (``knowledge``), or none. LLM summaries are written by greedy decoding and kept in an artifact
    file shared by every run with the same LLM, summary prompts, text recipe and knowledge files."""

    def __init__(
        self,
        source: str,
        symbols: Sequence[str],
        backend: Backend | None,
        knowledge_root: str | None,
        allow_download: bool,
        max_new_tokens: int = 128,
        recipe: Mapping[str, Any] | None = None,
        ensembl_ids: Mapping[str, str] | None = None,
    ):
        if source not in ("llm", "knowledge", "none", "auto"):
            raise ConfigError(f"model.encoder.summaries.source must be llm, knowledge, auto or none, got {source!r}")
        from perturb_models.models.llm.prompts import knowledge_available

        self.facts: dict[str, str] = {}
        if source == "auto":
            source = "llm" if knowledge_available(knowledge_root) else "none"
            if source == "none":
                log.warning(
                    "summer: no gene_info file in the knowledge folder ($PERTURB_KNOWLEDGE); prompts name genes only"
                )
        self.source = source
        self.backend, self.max_new_tokens = backend, int(max_new_tokens)
        self.recipe = dict(recipe or SUMMARY_TEXT_RECIPE)
        self.table: dict[str, dict[str, str]] = {}
        self.path: Path | None = None
        if source == "none":
            return
        from perturb_models.knowledge.text import TextRecipe, build_gene_texts

        recipe_obj = TextRecipe.from_mapping(self.recipe)
        texts = build_gene_texts(
            list(symbols), knowledge_root, recipe_obj, allow_download=allow_download, ensembl_ids=ensembl_ids
        )
        self.facts = {s: re.sub(r"\.\s+", ".\n", t) for s, t in texts.texts.items() if texts.has_knowledge[s]}
        if source == "llm":
            key = hashlib.sha1(
                json.dumps(
                    {
                        "llm": backend.fingerprint,
                        "v": SUMMARY_VERSION,
                        "recipe": recipe_obj.version,
                        "tokens": self.max_new_tokens,
                        "knowledge": knowledge_identity(knowledge_root),
                    },
                    sort_keys=True,
                ).encode()
            ).hexdigest()[:16]
            self.path = cache_dir("summer_summaries", f"{key}.json")
            if self.path.is_file():
                self.table = json.loads(self.path.read_text()).get("summaries", {})

    def ensure(self, wanted: Mapping[str, Sequence[str]]) -> None:
        """Write the missing summaries of ``{role: symbols}`` (LLM source) and save the artifact."""
        if self.source != "llm":
            return
        jobs = [
            (role, s)
            for role, symbols in wanted.items()
            for s in dict.fromkeys(symbols)
            if s in self.facts and role not in self.table.get(s, {})
        ]
        if not jobs:
            return
        log.info("summer: writing %d gene summaries with %s", len(jobs), getattr(self.backend, "name", "the LLM"))
        prompts = [ROLES[role].format(symbol=s, facts=self.facts[s]) for role, s in jobs]
        texts = self.backend.generate(
            prompts, samples=1, max_new_tokens=self.max_new_tokens, temperature=0.0, progress="summarising genes"
        )
        for (role, s), (text,) in zip(jobs, texts):
            self.table.setdefault(s, {})[role] = " ".join(text.split())
        if self.path is not None:
            stored = json.loads(self.path.read_text()).get("summaries", {}) if self.path.is_file() else {}
            for s, roles in self.table.items():  # another run may have added genes meanwhile
                stored.setdefault(s, {}).update(roles)
            self.table = stored
            atomic_write_text(
                self.path,
                json.dumps(
                    {
                        "llm": self.backend.describe(),
                        "version": SUMMARY_VERSION,
                        "recipe": self.recipe,
                        "summaries": stored,
                    },
                    indent=1,
                    sort_keys=True,
                ),
            )

    def __call__(self, symbol: str, role: str) -> str | None:
        if self.source == "knowledge":
            return self.facts.get(symbol)
        if self.source == "llm":
            return self.table.get(symbol, {}).get(role) or None
        return None


def stored_summaries(role: str = "gene") -> dict[str, str]:
    """Every SUMMER summary in the user cache, ``symbol -> text`` for ``role`` (newest artifact wins): the gene
    text of other models (``model.encoder.prompt.descriptions=summer`` for lora_llama, embedding source ``summer``
    for embedding_mlp / logreg / node features: :func:`perturb_models.models.embedding.summer_embedding_table`)."""
    folder = cache_dir("summer_summaries")
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"no SUMMER summaries in {folder}: run model=summer first (it writes them)")
    table: dict[str, str] = {}
    for path in files:
        for symbol, roles in json.loads(path.read_text()).get("summaries", {}).items():
            if roles.get(role):
                table[symbol] = roles[role]
    return table


# ---- the encoder ---------------------------------------------------------------------------------------
class SummerEncoder(Encoder):
    """SUMMER as a parameter-free ``produces_logits`` encoder (see the module docstring).

    Args:
        context: the DataModule's ``DataContext``.
        backend: ``kind: local | openai`` and its arguments (:func:`perturb_models.llm_backends.build_backend`).
        scoring: ``logprob`` (one forward, the options' next-token probabilities) or ``sample`` (the paper's).
        cot: chain of thought before the answer (``scoring=sample`` only).
        samples, temperature, top_p, max_new_tokens: sampling of ``scoring=sample`` (the paper: 3, 0.6, 0.9,
            1024); without ``cot`` the answer gets ``answer_tokens`` new tokens.
        retrieval: show retrieved training examples; ``retrieval_budgets`` per category.
        graphs / gene_graphs: perturbation and gene similarity of the retrieval.
        summaries: ``source`` (``auto`` | ``llm`` | ``knowledge`` | ``none``), ``max_new_tokens``.
        price_per_input_token / price_per_output_token: for the cost estimate of the usage report.
    """

    produces_logits = True

    def __init__(
        self,
        context: DataContext,
        backend: Mapping[str, Any] | None = None,
        scoring: str = "logprob",
        cot: bool = False,
        samples: int = 3,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 1024,
        answer_tokens: int = 8,
        retrieval: bool = True,
        retrieval_budgets: Mapping[str, int] | None = None,
        graphs: Mapping[str, Any] | None = None,
        gene_graphs: Mapping[str, Any] | None = None,
        power: float = 1.0,
        summaries: Mapping[str, Any] | None = None,
        knowledge_root: str | None = None,
        allow_download: bool = False,
        seed: int = 0,
        price_per_input_token: float | None = None,
        price_per_output_token: float | None = None,
    ):
        super().__init__()
        if scoring not in ("logprob", "sample"):
            raise ConfigError(f"model.encoder.scoring must be logprob or sample, got {scoring!r}")
        if scoring == "logprob" and cot:
            raise ConfigError(
                "model.encoder.cot=true needs model.encoder.scoring=sample (a chain of thought is "
                "generated; logprob scoring reads one next-token distribution)"
            )
        if int(samples) < 1:
            raise ConfigError(f"model.encoder.samples must be >= 1, got {samples}")
        self.task = context.task
        self.options = OPTIONS[self.task]
        self.num_classes = context.num_classes
        self.output_dim = self.num_classes
        self.cell_line = context.cell_line or context.dataset
        self.symbols = list(context.vocab.symbols)
        self.scoring, self.cot = scoring, bool(cot)
        self.samples, self.temperature, self.top_p = int(samples), float(temperature), float(top_p)
        self.max_new_tokens, self.answer_tokens = int(max_new_tokens), int(answer_tokens)
        self.seed = int(seed)
        self.prices = (price_per_input_token, price_per_output_token)
        words = [*template_words(), *self.symbols]
        self.backend = build_backend(backend or {}, words=words)
        self.retrieval = None
        if retrieval:
            if not graphs:
                raise ConfigError(
                    "model.encoder.retrieval=true needs model.encoder.graphs (see conf/model/summer.yaml)"
                )
            budgets = dict(retrieval_budgets or {"same_pert": 5, "same_gene": 10, "both_similar": 5, "random": 5})
            self.retrieval = SummerRetrieval(context, graphs, gene_graphs, budgets, power, seed)
        summaries = dict(summaries or {})
        self.summaries = GeneSummaries(
            summaries.get("source", "auto"),
            self.symbols,
            self.backend,
            knowledge_root,
            allow_download,
            summaries.get("max_new_tokens", 128),
            summaries.get("recipe"),
            context.ensembl_ids,
        )
        self.memo: dict[tuple[int, int], np.ndarray] = {}
        self.stats = {
            "pairs": 0,
            "abstained_pairs": 0,
            "abstained_answers": 0,
            "unparsed_answers": 0,
            "answers": 0,
            "examples_shown": 0,
        }
        self.stats.update({f"examples_{c}": 0 for c in CATEGORIES})

    # ---- prompts ----------------------------------------------------------------------------------------
    def prompt(self, pert: int, gene: int) -> str:
        p, g = self.symbols[pert], self.symbols[gene]
        lines = [f"Cell line: {self.cell_line} (CRISPRi screen)."]
        for symbol, role, title in ((p, "pert", "Knocked-down gene"), (g, "gene", "Downstream gene")):
            summary = self.summaries(symbol, role)
            lines.append(f"{title} {symbol}: {summary}" if summary else f"{title}: {symbol}.")
        if self.retrieval is not None:
            examples = self.retrieval.examples(pert, gene)
            if examples:
                lines.append(f"Outcomes measured in training experiments in {self.cell_line} cells:")
                for q, h, code, category in examples:
                    lines.append(
                        f"- knockdown of {self.symbols[q]} -> {self.symbols[h]}: {OUTCOME_WORDS[code]} "
                        f"({CATEGORY_TITLES[category]})"
                    )
        lines.append(QUESTIONS[self.task].format(pert=p, gene=g))
        lines.append((COT if self.cot else DIRECT).format(options=option_list(self.task, self.cot)))
        prompt = "\n".join(lines)
        if not self.backend.chat and not self.cot:
            prompt += "\nAnswer:"
        return prompt

    # ---- scoring ----------------------------------------------------------------------------------------
    def score_pairs(self, pert: Sequence[int], gene: Sequence[int], what: str = "pairs") -> None:
        """Answer every pair not answered yet (batched through the backend), into ``self.memo``."""
        todo = list(dict.fromkeys((int(p), int(g)) for p, g in zip(pert, gene) if (int(p), int(g)) not in self.memo))
        if not todo:
            return
        self.summaries.ensure({"pert": [self.symbols[p] for p, _ in todo], "gene": [self.symbols[g] for _, g in todo]})
        prompts = [self.prompt(p, g) for p, g in todo]
        if self.retrieval is not None:
            for p, g in todo:
                for *_, category in self.retrieval.examples(p, g):
                    self.stats[f"examples_{category}"] += 1
                    self.stats["examples_shown"] += 1
        uniform = np.full(self.num_classes, 1.0 / self.num_classes)
        if self.scoring == "logprob":
            logp = self.backend.option_logprobs(prompts, [*self.options, ABSTAIN], progress=f"summer {what}")
            for (p, g), row in zip(todo, logp):
                classes = row[: self.num_classes]
                self.stats["answers"] += 1
                if not np.isfinite(classes).any():
                    self.memo[(p, g)] = uniform
                    self.stats["abstained_pairs"] += 1
                    self.stats["unparsed_answers"] += 1
                    continue
                probs = np.exp(classes - np.max(classes))
                self.memo[(p, g)] = probs / probs.sum()
        else:
            tokens = self.max_new_tokens if self.cot else self.answer_tokens
            texts = self.backend.generate(
                prompts,
                samples=self.samples,
                max_new_tokens=tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                progress=f"summer {what}",
            )
            for (p, g), answers in zip(todo, texts):
                votes = np.zeros(self.num_classes)
                for text in answers:
                    parsed = parse_answer(text, self.task, self.cot)
                    self.stats["answers"] += 1
                    if parsed is None:
                        self.stats["abstained_answers"] += 1
                    elif parsed == "unparsed":
                        self.stats["unparsed_answers"] += 1
                    else:
                        votes[parsed] += 1
                if votes.sum() == 0:
                    self.memo[(p, g)] = uniform
                    self.stats["abstained_pairs"] += 1
                else:
                    self.memo[(p, g)] = votes / votes.sum()
        self.stats["pairs"] += len(todo)

    def report(self) -> dict[str, Any]:
        """Usage and answer counts of this process: requests, tokens in/out (and per pair), cache hits, abstentions."""
        usage = self.backend.usage.as_dict(*self.prices)
        pairs = max(1, self.stats["pairs"])
        return {
            "backend": self.backend.identity,
            "scoring": self.scoring,
            "cot": self.cot,
            **usage,
            **self.stats,
            "tokens_per_pair": round(
                (
                    usage["prompt_tokens"]
                    + usage["completion_tokens"]
                    + usage["cached_prompt_tokens"]
                    + usage["cached_completion_tokens"]
                )
                / pairs,
                1,
            ),
        }

    def prepare_datamodule(self, datamodule) -> None:
        """Answer the validation and test pairs once, batched (training pairs are never sent to the LLM)."""
        frames = getattr(datamodule, "frames", {})
        before = self.stats["pairs"]
        for stage in ("val", "test", "predict"):
            frame = frames.get(stage)
            if frame is not None and len(frame):
                self.score_pairs(frame["pert_idx"].to_numpy(), frame["gene_idx"].to_numpy(), f"{stage} pairs")
        if self.stats["pairs"] > before:
            from perturb_models.console import say

            report = self.report()
            say(
                f"[summer] {report['pairs']:,} pairs answered by {getattr(self.backend, 'name', 'the LLM')}: "
                f"{report['requests']:,} requests ({report['cached']:,} answers from the cache), "
                f"{report['prompt_tokens']:,} tokens in, {report['completion_tokens']:,} out, "
                f"{report['tokens_per_pair']} tokens per pair, {report['seconds']} s; "
                f"{report['abstained_pairs']:,} pairs all-abstained, {report['abstained_answers']:,} abstentions and "
                f"{report['unparsed_answers']:,} unreadable answers counted"
                + (f"; estimated cost {report['cost']}" if "cost" in report else "")
            )
            module = getattr(getattr(datamodule, "trainer", None), "lightning_module", None)
            record = getattr(module, "run_record", {}).get("run") if module is not None else None
            if isinstance(record, dict):
                record["llm_usage"] = report  # written to run.json with the rest of the record

    def get_extra_state(self) -> dict:
        return {"backend": self.backend.identity, "report": self.report()}

    def set_extra_state(self, state: dict) -> None:
        saved = (state or {}).get("backend")
        if saved and saved != self.backend.identity:
            log.warning(
                "summer: this checkpoint's answers came from %s; answering with %s now", saved, self.backend.identity
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["pert"].device
        if self.training:
            # Nothing to fit: the training pass only writes the checkpoint, without asking the LLM.
            return torch.zeros((len(batch["pert"]), self.num_classes), device=device)
        pert = batch["pert"].detach().cpu().tolist()
        gene = batch["gene"].detach().cpu().tolist()
        self.score_pairs(pert, gene)
        probs = np.stack([self.memo[(p, g)] for p, g in zip(pert, gene)])
        return torch.as_tensor(np.log(np.clip(probs, 1e-9, 1.0)), dtype=torch.float32, device=device)
