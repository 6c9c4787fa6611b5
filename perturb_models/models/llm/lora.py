"""The LoRA adapter of both LLM models (``model.encoder.lora``, ``model.namer.lora``): built here only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_config(options: Mapping[str, Any] | None, task_type: str):
    """peft ``LoraConfig`` from the config's ``lora`` block (``r`` 8, ``alpha`` 16, ``dropout`` 0.05,
    ``target_modules`` the attention projections, unless given); ``task_type``: ``SEQ_CLS`` (the classifier:
    the score head is trained and saved with the adapter) or ``CAUSAL_LM`` (the namer)."""
    from peft import LoraConfig, TaskType

    options = dict(options or {})
    return LoraConfig(
        task_type=TaskType[task_type],
        r=int(options.get("r", 8)),
        lora_alpha=int(options.get("alpha", 16)),
        lora_dropout=float(options.get("dropout", 0.05)),
        target_modules=list(options.get("target_modules", list(DEFAULT_TARGET_MODULES))),
    )


def add_lora(base, options: Mapping[str, Any] | None, task_type: str, seed: int | None = None):
    """``base`` wrapped in a fresh LoRA adapter (:func:`lora_config`). With ``seed``, the adapter's random
    init is drawn under it (the global RNG untouched); without, from the global RNG."""
    from peft import get_peft_model

    config = lora_config(options, task_type)
    if seed is None:
        return get_peft_model(base, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, config)
