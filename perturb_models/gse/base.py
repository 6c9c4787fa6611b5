"""The gene-set model ("namer") contract, for the ``gene_sets`` runner (``perturb_models/runners/gene_sets.py``).

A namer answers a list of gene clusters with a short name each. The runner gives it the data's
:class:`~perturb_models.data.gse.GSEContext` (``setup``), fits it when it learns (``trainable``), asks it
for every cluster (``predict``) and keeps its state in the run's checkpoint (``state``/``load_state``).
A trainable namer is also a ``LightningModule`` (its own ``train_dataloader``, ``val_dataloader`` and
steps, validating on ``val/`` metrics): the runner builds the Trainer, fits, selects the checkpoint with the
best ``optimized_metric`` and loads it. Namers only compute: fitting, selection and outputs are the runner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Namer:
    """Base class of the gene-set models; see the module docstring."""

    runner: str = "gene_sets"
    """The kind of run (``perturb_models.runners.RUNNERS``)."""

    trainable: bool = False
    """True for a ``LightningModule`` the runner fits; False for a namer that needs no training."""

    fit_info: dict[str, Any]
    """Facts of the fit the runner adds to ``run.json`` (examples, tokens, seconds)."""

    def setup(self, context: Any) -> None:
        """Read what the namer needs from the data's context (background genes, knowledge)."""

    def prepare_fit(self, run_record: dict[str, Any]) -> None:
        """Build the training and validation examples before the runner fits (trainable namers);
        ``run_record`` goes into every checkpoint the fit writes."""

    def trainer_overrides(self) -> dict[str, Any]:
        """Trainer options the namer needs (e.g. its own ``max_epochs``); none by default."""
        return {}

    def predict(self, clusters: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """Per cluster: ``answer`` (the name), ``score`` (confidence, higher is surer), ``evidence``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(clusters)")

    def state(self) -> dict[str, Any]:
        """What the checkpoint keeps to rebuild the namer's answers (nothing for a namer without training)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``state()``."""
