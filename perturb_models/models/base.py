"""The encoder contract: what a model is, as far as the rest of the framework is concerned.

A model is an ``Encoder`` subclass plus a ``conf/model/<name>.yaml`` (``encoder._target_`` names the
class; the YAML extends ``conf/model/_base.yaml`` for the optimizer). ``PerturbationClassifier`` owns
everything else: the head, the loss, optimisation, metrics, checkpoints and outputs.

The contract:

- ``__init__(self, context, **options)``: ``context`` is the DataModule's read-only
  :class:`~perturb_models.data.datamodule.DataContext` (vocab, task, training pairs, dataset facts);
  ``options`` are the keys of ``model.encoder`` in the config. Sizes come from ``context``, never from YAML.
- ``forward(batch) -> Tensor``: ``batch`` is a dict of equal-length tensors (``pert``, ``gene``: vocab
  indices; ``label``, ``de``, ``dir``); the output has one row per pair.
- ``output_dim``: the width of that output. The classifier puts a linear head of
  ``task.num_classes`` outputs on top, unless ``produces_logits`` is true: then the output already has
  one logit per class (``output_dim == context.num_classes``) and the head is the identity.
- ``prepare_datamodule(datamodule)`` (optional): called once from the classifier's ``setup`` with the
  DataModule, for per-split precomputation (the LLM tokenises every split's prompts here).
- ``describes_new_perturbations`` / ``extend_vocabulary(context)`` (optional, for ``predict.py``): an
  encoder that describes a perturbation through knowledge files (graphs, gene texts) sets the flag and
  implements ``extend_vocabulary``, which receives a context whose vocabulary is the training vocabulary
  (the first N symbols, indices unchanged) followed by new genes, and gives the new genes their inputs
  as perturbations without changing anything a known gene sees (its graph in-edges, its table row). An
  encoder that cannot (a perturbation vector learned from data only) leaves the flag false and says why
  in ``new_perturbation_refusal``; ``predict.py`` prints that reason when asked about such a gene.
- ``accumulates_gradients`` / ``accumulate(batch, loss_fn, backward, batch_term)`` (optional): an encoder
  that sets the flag trains under manual optimisation: per training batch the classifier calls
  ``accumulate``, which runs forward and backward itself (in pieces, e.g. micro-batches bounded by a token
  budget, calling ``backward(loss)`` for each piece) so that the summed gradients are those of the batch's
  mean ``loss_fn`` plus ``batch_term`` (None, or a loss on the whole batch's logits in the batch's order:
  the within-gene ranking term), and returns the batch's loss (detached); the classifier then takes one
  optimizer step.
- ``average_gradients(world_size)``: with manual optimisation under DDP, the classifier calls it once
  per step, after ``accumulate``, on every rank (ranks may cut their batches into different numbers of
  pieces, so DDP's own reducer is off). The default all-reduces the gradient of every trainable
  parameter and divides by ``world_size``; override it to reduce differently (buckets, compression).
- ``evidence(pert, gene)`` (optional): per-pair columns that explain an answer (the retrieval model's
  closest training knockdowns); ``predict.py`` writes them next to the probabilities.
- ``runner`` (class attribute, default ``"pairs"``): the kind of run that fits and evaluates the model
  (``perturb_models/runners``); the stacking ensemble names ``"stacking"``. Models only compute: fitting,
  checkpoint selection and outputs belong to the runner.
- Trainable parameters need an optimizer (``model.optimizer``); an encoder with none (retrieval) trains
  for one pass that writes the checkpoint, then is validated and tested like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of every model's encoder; see the module docstring for the contract.

    Subclasses call ``super().__init__()``, set ``self.output_dim`` and implement ``forward``.
    """

    runner: str = "pairs"
    """The kind of run that trains and evaluates this model (``perturb_models.runners.RUNNERS``)."""

    produces_logits: bool = False
    """True when ``forward`` returns one logit per class (no head is added)."""

    output_dim: int
    """Width of ``forward``'s output (the number of classes when ``produces_logits``)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch)")

    describes_new_perturbations: bool = False
    """True when ``extend_vocabulary`` can describe a perturbed gene outside the training vocabulary from
    knowledge files alone (see the module docstring)."""

    new_perturbation_refusal: str = "this model does not describe perturbations from knowledge files"
    """Why the model cannot answer for a perturbation outside its training vocabulary (when the flag is false)."""

    def prepare_datamodule(self, datamodule: Any) -> None:
        """Per-split precomputation, once per run; nothing by default."""

    def extend_vocabulary(self, context: Any) -> None:
        """Give the genes appended to the training vocabulary (``context.vocab.symbols[n:]``, ``n`` the
        training vocabulary's size) their perturbation inputs, leaving every known gene's inputs as they are."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot describe a perturbation outside its training "
            f"vocabulary: {self.new_perturbation_refusal}"
        )

    def evidence(self, pert: Any, gene: Any) -> dict[str, list]:
        """Columns explaining the answers for the pairs ``(pert[i], gene[i])`` (vocab indices); none by default."""
        return {}

    accumulates_gradients: bool = False
    """True when the classifier must train this encoder through :meth:`accumulate` (manual optimisation)
    instead of one forward and one backward per batch."""

    def accumulate(
        self,
        batch: dict[str, torch.Tensor],
        loss_fn: nn.CrossEntropyLoss,
        backward: Callable[[torch.Tensor], None],
        batch_term: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward and backward one training batch, calling ``backward(loss)`` on each piece, so the
        gradients sum to those of ``loss_fn``'s mean over the batch plus ``batch_term`` of the whole batch's
        logits (when given); returns the batch's loss (detached). Required when ``accumulates_gradients``
        is true."""
        raise NotImplementedError(f"{type(self).__name__} sets accumulates_gradients but does not implement accumulate")

    def average_gradients(self, world_size: int) -> None:
        """Average the trainable parameters' gradients over ``world_size`` processes (manual optimisation
        under DDP; called on every rank once per step). A parameter without a gradient contributes zeros."""
        all_reduce_mean(self.parameters(), world_size)


def all_reduce_mean(parameters: Iterable[nn.Parameter], world_size: int) -> None:
    """Replace each trainable parameter's gradient by its mean over the ``world_size`` processes."""
    for param in (p for p in parameters if p.requires_grad):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
        param.grad /= world_size


def check_encoder(encoder: nn.Module, num_classes: int) -> None:
    """Fail early, naming the class, when an encoder breaks the contract."""
    name = type(encoder).__name__
    if not isinstance(encoder, Encoder):
        raise TypeError(
            f"model.encoder: {name} is not a perturb_models.models.base.Encoder; subclass it "
            "(see docs/architecture.md, 'Add a model')"
        )
    dim = getattr(encoder, "output_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"model.encoder: {name}.output_dim must be a positive int (the width of forward's output), got {dim!r}"
        )
    if encoder.accumulates_gradients and type(encoder).accumulate is Encoder.accumulate:
        raise TypeError(f"model.encoder: {name} sets accumulates_gradients but does not implement accumulate")
    if encoder.produces_logits and dim != num_classes:
        raise ValueError(
            f"model.encoder: {name} produces logits of width {dim}, but the task has {num_classes} classes"
        )


def trainable_parameters(module: nn.Module) -> int:
    """Number of parameters an optimizer would update."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
