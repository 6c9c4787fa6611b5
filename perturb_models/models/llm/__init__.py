"""LoRA-tuned Llama models: ``model=lora_llama`` (a classifier encoder) and the pieces the gene-set namer
(:mod:`perturb_models.gse.namer`) and the local LLM backend (:mod:`perturb_models.llm_backends`) share.

One module per job:

- :mod:`~perturb_models.models.llm.weights`: where weights and tokenizers come from (SmolLM2 GGUF, a
  folder, a hub id, a seeded random ``llama_config``) and the base model factory.
- :mod:`~perturb_models.models.llm.lora`: the one LoRA adapter builder.
- :mod:`~perturb_models.models.llm.adapters`: adapter-only checkpoints and the record (sha256) of the base.
- :mod:`~perturb_models.models.llm.prompts`: the classifier's prompts (printed from the command line by
  ``python -m perturb_models.cli.prompts``).
- :mod:`~perturb_models.models.llm.tokens`: tokenised prompts in memory and their on-disk cache.
- :mod:`~perturb_models.models.llm.accumulation`: micro-batches by a token budget, gradient accumulation.
- :mod:`~perturb_models.models.llm.timing`: the CPU-time estimate shown before a CPU fit.
- :mod:`~perturb_models.models.llm.optim`: AdamW and the warmup schedule (``model.optimizer``/``scheduler``).
- :mod:`~perturb_models.models.llm.encoder`: :class:`LoRALlamaClassifier`, the encoder.

Everything another module needs is imported from here; config ``_target_`` strings name these public
paths (``perturb_models.models.llm.LoRALlamaClassifier``, ``.adamw``, ``.warmup_decay``), which are also
the paths recorded in the checkpoints written before the package was split.
"""

from perturb_models.models.llm.adapters import (
    base_weights_record,
    check_same_base,
    keep_adapter_only,
)
from perturb_models.models.llm.encoder import LoRALlamaClassifier
from perturb_models.models.llm.lora import add_lora, lora_config
from perturb_models.models.llm.optim import adamw, warmup_decay
from perturb_models.models.llm.weights import (
    DTYPES,
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    MissingWeightsError,
    build_base_model,
    load_tokenizer,
    require_llm_extra,
    smollm2_gguf,
    tokenizer_fingerprint,
    weights_source,
    word_tokenizer,
)

__all__ = [
    "DTYPES",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "LoRALlamaClassifier",
    "MissingWeightsError",
    "adamw",
    "add_lora",
    "base_weights_record",
    "build_base_model",
    "check_same_base",
    "keep_adapter_only",
    "load_tokenizer",
    "lora_config",
    "require_llm_extra",
    "smollm2_gguf",
    "tokenizer_fingerprint",
    "warmup_decay",
    "weights_source",
    "word_tokenizer",
]
