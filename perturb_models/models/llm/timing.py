"""The CPU-time estimate shown before an LLM fit on the CPU: one timed training step and one timed
inference pass over a few real training prompts, scaled to every split's token count."""

from __future__ import annotations

import math
import time

import torch
from torch import nn


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


def fits_on_cpu(trainer, module: nn.Module) -> bool:
    """A CPU fit, where the time estimate helps. Under a Trainer its device decides (the model is still on the
    CPU at setup, whatever the accelerator), and only when fitting, not again for validate and test."""
    strategy, state = getattr(trainer, "strategy", None), getattr(trainer, "state", None)
    if strategy is None or state is None:
        return next(module.parameters()).device.type == "cpu"
    from lightning.pytorch.trainer.states import TrainerFn

    return strategy.root_device.type == "cpu" and state.fn == TrainerFn.FITTING


def estimate_cpu_times(encoder, datamodule, pairs: int = 8) -> str:
    """Estimated CPU time of one training epoch, one validation and the test of ``encoder`` (a
    :class:`~perturb_models.models.llm.LoRALlamaClassifier`), from one timed training step and one timed
    inference pass over ``pairs`` real training prompts. Gradients and the RNG are left as they were."""
    frame = datamodule.frames["train"].head(pairs)
    batch = {
        "pert": torch.as_tensor(frame["pert_idx"].to_numpy()),
        "gene": torch.as_tensor(frame["gene_idx"].to_numpy()),
    }
    tokens = encoder.split_tokens(frame)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in trainable]
    with torch.random.fork_rng(devices=[]):
        started = time.perf_counter()
        encoder(batch).float().logsumexp(-1).sum().backward()
        train_rate = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            encoder(batch)
        eval_rate = tokens / (time.perf_counter() - started)
    for p, grad in zip(trainable, saved):
        p.grad = grad
    split = {stage: encoder.split_tokens(f) for stage, f in datamodule.frames.items()}
    minutes = {stage: split[stage] / (train_rate if stage == "train" else eval_rate) / 60 for stage in split}
    sizes = ", ".join(f"{stage} {len(f):,} pairs / {split[stage]:,} tokens" for stage, f in datamodule.frames.items())
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
