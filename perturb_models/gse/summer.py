"""``model=summer_gse``: SUMMER's gene-set setting. The LLM reads the member genes' summaries, writes an
overview of what they share, then a name of at most ``name_words`` words; nothing is trained.

- **Summaries**: the artifact of ``model=summer`` (:class:`~perturb_models.models.summer.GeneSummaries`:
  the same LLM, prompts, text recipe and cache file), in the role of the cluster kind (``gene`` clusters:
  the genes as downstream genes; ``pert`` clusters: as knocked-down genes), or the raw knowledge text, or
  none (symbols only).
- **Prompt**: the first ``max_genes`` members in ``gene_order`` (``listed``: the data file's order;
  ``sorted``: alphabetical; ``seeded``: a shuffle seeded by ``seed`` and the cluster's genes), each with its
  summary cut to ``max_summary_chars``; the number of members left out is stated.
- **Name**: :func:`parse_name`: the text after the last ``Name:`` of the answer (to the end of its line), or,
  when the answer has no ``Name:``, its last non-empty line; markdown and quotes stripped, then cut to
  ``name_words`` words. ``score`` is 1 for a name after ``Name:``, 0 for the fallback (or an empty answer).

Every answer goes through the response cache of :mod:`perturb_models.llm_backends` (greedy decoding), so a
rerun and ``evaluate.py`` send nothing.
"""

from __future__ import annotations

import logging
import random
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from perturb_models.errors import ConfigError
from perturb_models.gse.base import Namer
from perturb_models.llm_backends import build_backend

log = logging.getLogger(__name__)

GENE_ORDERS = ("listed", "sorted", "seeded")
SUMMARY_SOURCES = ("auto", "llm", "knowledge", "none")
HEADS = {
    "gene": "These human genes change expression together after CRISPRi knockdowns{cell}.",
    "pert": "CRISPRi knockdowns of these human genes have similar effects on gene expression{cell}.",
}
INSTRUCTION = (
    "Write a short overview of the biological process, pathway or complex these genes share. Then, on the last "
    "line, give the group a name of at most {words} words as 'Name: <name>'."
)
NAME_MARK = re.compile(r"(?i)[*_#]*\bname\s*[*_]*\s*:[*_]*")


def parse_name(text: str, max_words: int = 10) -> tuple[str, str, bool]:
    """``(name, overview, marked)`` of an answer: the name is the text after the last ``Name:`` (to the end of
    that line, or the next non-empty line when it ends there), else the last non-empty line; stripped of
    markdown, quotes and a final full stop, and cut to ``max_words`` words. ``marked``: a ``Name:`` was found."""
    marks = list(NAME_MARK.finditer(text))
    if marks:
        overview, rest = text[: marks[-1].start()], text[marks[-1].end() :]
        lines = [line for line in rest.splitlines() if line.strip(" *#\t")]
        raw = lines[0] if lines else ""
    else:
        lines = [line for line in text.splitlines() if line.strip(" *#\t")]
        raw = lines[-1] if lines else ""
        overview = "\n".join(lines[:-1])
    name = raw.strip().strip("*#_`\"'<>[]() \t").rstrip(".").strip("*_`\"' ")
    words = name.split()[: int(max_words)]
    return " ".join(words), " ".join(overview.split()), bool(marks)


class SummerNamer(Namer):
    """SUMMER's gene-set namer (see the module docstring). No training: the runner saves the record.

    Args:
        backend: ``kind: local | openai`` and its arguments (as ``model=summer``'s ``encoder.backend``).
        summaries: ``source`` (``auto`` | ``llm`` | ``knowledge`` | ``none``), ``max_new_tokens``.
        max_genes: members shown in the prompt (the rest are counted, not listed).
        gene_order: which members come first: ``listed`` | ``sorted`` | ``seeded``.
        max_summary_chars: each summary cut at a word boundary to this length.
        max_new_tokens: new tokens of the overview and name (greedy).
        name_words: the name's word limit (the prompt asks for it; the parser cuts to it).
        cell_line: named in the prompt when set.
    """

    def __init__(
        self,
        backend: Mapping[str, Any] | None = None,
        summaries: Mapping[str, Any] | None = None,
        max_genes: int = 20,
        gene_order: str = "listed",
        max_summary_chars: int = 400,
        max_new_tokens: int = 256,
        name_words: int = 10,
        cell_line: str | None = None,
        knowledge_root: str | None = None,
        allow_download: bool = False,
        seed: int = 0,
        price_per_input_token: float | None = None,
        price_per_output_token: float | None = None,
    ):
        self.backend_options = dict(backend or {})
        self.summary_options = dict(summaries or {})
        self.max_genes, self.gene_order = int(max_genes), gene_order
        self.max_summary_chars, self.max_new_tokens = int(max_summary_chars), int(max_new_tokens)
        self.name_words, self.cell_line = int(name_words), cell_line
        self.knowledge_root, self.allow_download, self.seed = knowledge_root, bool(allow_download), int(seed)
        self.prices = (price_per_input_token, price_per_output_token)
        self.backend = None
        self.fit_info: dict[str, Any] = {}

    def check(self) -> None:
        """Config errors as one line (here, not in ``__init__``: Hydra's ``instantiate`` would wrap them)."""
        if self.gene_order not in GENE_ORDERS:
            raise ConfigError(
                f"model.namer.gene_order must be one of {', '.join(GENE_ORDERS)}, got {self.gene_order!r}"
            )
        source = self.summary_options.get("source", "auto")
        if source not in SUMMARY_SOURCES:
            raise ConfigError(
                f"model.namer.summaries.source must be one of {', '.join(SUMMARY_SOURCES)}, got {source!r}"
            )
        for key in ("max_genes", "max_new_tokens", "name_words"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.namer.{key} must be >= 1, got {getattr(self, key)}")

    def setup(self, context) -> None:
        from perturb_models.models.summer import GeneSummaries

        self.check()

        self.kind = context.kind
        members = sorted({g for genes in context.clusters["genes"] for g in genes})
        # A word-level test tokenizer knows the genes of both cluster kinds: one model answers either kind.
        every = sorted({g for kind in context.all_clusters.values() for genes in kind for g in genes})
        words = [*HEADS.values(), INSTRUCTION, "Gene summaries: no summary and more genes not shown Overview: Name:"]
        self.backend = build_backend(self.backend_options, words=[*words, *every], option="model.namer.backend")
        self.summaries = GeneSummaries(
            self.summary_options.get("source", "auto"),
            members,
            self.backend,
            self.knowledge_root,
            self.allow_download,
            self.summary_options.get("max_new_tokens", 128),
            self.summary_options.get("recipe"),
            context.ensembl_ids,
        )
        self.role = "pert" if self.kind == "pert" else "gene"

    # ---- prompts ----------------------------------------------------------------------------------------
    def shown(self, genes: Sequence[str]) -> list[str]:
        """The members the prompt lists, in ``gene_order``, at most ``max_genes``."""
        genes = list(dict.fromkeys(genes))
        if self.gene_order == "sorted":
            genes = sorted(genes)
        elif self.gene_order == "seeded":
            # Seeded by the cluster's gene set: the same members whatever the listing order or the other clusters.
            genes = sorted(genes)
            random.Random(zlib.crc32(f"{self.seed}:{','.join(genes)}".encode())).shuffle(genes)
        return genes[: self.max_genes]

    def _summary(self, symbol: str) -> str | None:
        text = self.summaries(symbol, self.role)
        if not text:
            return None
        text = " ".join(text.split())
        if len(text) > self.max_summary_chars:
            text = text[: self.max_summary_chars].rsplit(" ", 1)[0] + " ..."
        return text

    def prompt(self, genes: Sequence[str]) -> str:
        shown = self.shown(genes)
        cell = f" in {self.cell_line} cells" if self.cell_line else ""
        lines = [HEADS[self.role].format(cell=cell), "Gene summaries:"]
        for symbol in shown:
            summary = self._summary(symbol)
            lines.append(f"- {symbol}: {summary}" if summary else f"- {symbol} (no summary)")
        left = len(dict.fromkeys(genes)) - len(shown)
        if left > 0:
            lines.append(f"- and {left} more genes not shown")
        lines.append(INSTRUCTION.format(words=self.name_words))
        prompt = "\n".join(lines)
        # A base model without a chat template continues the text: start its answer.
        return prompt if self.backend.chat else prompt + "\nOverview:"

    # ---- answers ----------------------------------------------------------------------------------------
    def predict(self, clusters: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """Per cluster: ``answer`` (the parsed name), ``score`` (1: after ``Name:``; 0: fallback), ``evidence``
        (the overview)."""
        if self.backend is None:
            raise RuntimeError("call setup(context) first")
        self.summaries.ensure({self.role: [g for genes in clusters for g in self.shown(genes)]})
        prompts = [self.prompt(genes) for genes in clusters]
        texts = self.backend.generate(
            prompts, samples=1, max_new_tokens=self.max_new_tokens, temperature=0.0, progress="summer_gse clusters"
        )
        out, stats = [], {"names_marked": 0, "names_unmarked": 0, "names_empty": 0, "names_cut": 0}
        for (text,) in texts:
            name, overview, marked = parse_name(text, self.name_words)
            stats["names_marked" if marked else "names_unmarked"] += 1
            stats["names_empty"] += not name
            stats["names_cut"] += len(parse_name(text, 10**6)[0].split()) > self.name_words
            out.append({"answer": name, "score": 1.0 if marked and name else 0.0, "evidence": overview[:1000]})
        shown = [g for genes in clusters for g in self.shown(genes)]
        with_summary = sum(1 for g in shown if self.summaries(g, self.role))
        usage = self.backend.usage.as_dict(*self.prices)
        tokens = sum(usage[k] for k in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens"))
        tokens += usage["cached_completion_tokens"]
        self.fit_info = {
            "llm_usage": {
                "backend": self.backend.identity,
                "summaries": self.summaries.source,
                **usage,
                "clusters": len(clusters),
                "genes_shown": len(shown),
                "genes_with_summary": with_summary,
                **stats,
                "tokens_per_cluster": round(tokens / max(1, len(clusters)), 1),
            }
        }
        report = self.fit_info["llm_usage"]
        from perturb_models.console import say

        say(
            f"[summer_gse] {len(clusters)} clusters named by {getattr(self.backend, 'name', 'the LLM')}: "
            f"{report['requests']:,} requests ({report['cached']:,} answers from the cache), "
            f"{report['tokens_per_cluster']} tokens per cluster, {report['seconds']} s; "
            f"{with_summary} of {len(shown)} genes shown with a {self.summaries.source} summary; "
            f"{stats['names_unmarked']} names without 'Name:' (last line taken), {stats['names_cut']} cut to "
            f"{self.name_words} words, {stats['names_empty']} empty"
        )
        return out

    def state(self) -> dict[str, Any]:
        return {"backend": self.backend.identity if self.backend is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = (state or {}).get("backend")
        if saved and self.backend is not None and saved != self.backend.identity:
            log.warning("summer_gse: this run's names came from %s; naming with %s now", saved, self.backend.identity)
