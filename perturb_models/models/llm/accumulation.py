"""Micro-batches by a token budget, and gradient accumulation over them.

A batch of prompts is sorted by length and cut into micro-batches of at most ``budget`` padded tokens,
each padded only to its own longest prompt. In training each micro-batch is backward-ed as soon as it is
computed (:func:`accumulate_micro_batches`), so memory holds one micro-batch's activations whatever the
batch size; the gradients sum to those of the batch's (class-weighted) mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def micro_batches(rows: Sequence[torch.Tensor], budget: int) -> list[list[int]]:
    """Positions of the rows per micro-batch: longest first, each at most ``budget`` padded tokens."""
    lengths = torch.tensor([len(r) for r in rows])
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    chunks: list[list[int]] = []
    for position in order:
        # Rows come longest first: the chunk's width is its first row's length.
        if chunks and (len(chunks[-1]) + 1) * int(lengths[chunks[-1][0]]) <= budget:
            chunks[-1].append(position)
        else:
            chunks.append([position])
    return chunks


def in_batch_order(chunks: Sequence[Sequence[int]], outputs: torch.Tensor) -> torch.Tensor:
    """The rows of ``outputs`` (micro-batch after micro-batch) back in the batch's order."""
    order = torch.tensor([r for chunk in chunks for r in chunk])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[order] = torch.arange(len(order))
    return outputs[inverse.to(outputs.device)]


def accumulate_micro_batches(
    chunks: Sequence[list[int]],
    labels: torch.Tensor,
    loss_fn: nn.CrossEntropyLoss,
    logits_of: Callable[[list[int]], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """Forward (``logits_of(chunk)``) and ``backward`` one micro-batch at a time; the gradients sum to those
    of the batch's mean loss. ``loss_fn``'s class weights are honoured (the mean is weighted, as in
    ``CrossEntropyLoss``). Returns the batch's loss (detached)."""
    weight = loss_fn.weight
    total_weight = float(weight[labels].sum()) if weight is not None else float(len(labels))
    total = torch.zeros((), device=labels.device)
    for chunk in chunks:
        index = torch.tensor(chunk, device=labels.device)
        logits = logits_of(chunk)
        loss = nn.functional.cross_entropy(logits, labels[index], weight=weight, reduction="sum") / total_weight
        backward(loss)
        total += loss.detach()
    return total
