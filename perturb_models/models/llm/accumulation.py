"""Micro-batches by a token budget, and gradient accumulation over them.

A batch of prompts is sorted by length and cut into micro-batches of at most ``budget`` padded tokens,
each padded only to its own longest prompt. In training each micro-batch is backward-ed as soon as it is
computed (:func:`accumulate_micro_batches`), so memory holds one micro-batch's activations whatever the
batch size; the gradients sum to those of the batch's (class-weighted) mean loss, plus an optional term on
the whole batch's logits (the within-gene ranking term).
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
    batch_term: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward (``logits_of(chunk)``) and ``backward`` one micro-batch at a time; the gradients sum to those
    of the batch's mean loss. ``loss_fn``'s class weights are honoured (the mean is weighted, as in
    ``CrossEntropyLoss``). Returns the batch's loss (detached).

    ``batch_term`` (optional) is a further loss on the logits of the whole batch, in the batch's order (the
    within-gene ranking term, which compares rows that may fall in different micro-batches). With more than
    one micro-batch it costs one more forward pass without gradients: its gradient with respect to the
    logits is taken from that pass and backward-ed through each micro-batch's own forward, with the random
    state (dropout) replayed, so the gradients are those of ``CE + batch_term`` on the whole batch."""
    weight = loss_fn.weight
    total_weight = float(weight[labels].sum()) if weight is not None else float(len(labels))
    total = torch.zeros((), device=labels.device)
    term_grad: torch.Tensor | None = None
    if batch_term is not None and len(chunks) > 1:
        term_value, term_grad = _batch_term_gradient(chunks, logits_of, batch_term, labels.device)
        total += term_value
    for chunk in chunks:
        index = torch.tensor(chunk, device=labels.device)
        logits = logits_of(chunk)
        loss = nn.functional.cross_entropy(logits, labels[index], weight=weight, reduction="sum") / total_weight
        total += loss.detach()
        if batch_term is not None and term_grad is None:  # one micro-batch: the term on its own graph
            term = batch_term(in_batch_order(chunks, logits))
            total += term.detach()
            loss = loss + term
        elif term_grad is not None:
            loss = loss + (logits.float() * term_grad[index]).sum()
        backward(loss)
    return total


def _batch_term_gradient(
    chunks: Sequence[list[int]],
    logits_of: Callable[[list[int]], torch.Tensor],
    batch_term: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The term's value and its gradient with respect to every row's logits, from a forward pass without
    gradients; the random state is put back, so the forward passes that follow draw the same dropout."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    with torch.no_grad():
        outputs = torch.cat([logits_of(chunk).float() for chunk in chunks])
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    logits = in_batch_order(chunks, outputs).detach().requires_grad_(True)
    with torch.enable_grad():
        value = batch_term(logits)
        (grad,) = torch.autograd.grad(value, logits)
    return value.detach().to(device), grad.to(device)
