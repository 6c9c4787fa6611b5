"""Optimizer and learning-rate schedule of ``model=lora_llama`` (``model.optimizer``, ``model.scheduler``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
