"""The runner contract: what one kind of run does, from a config to a finished run folder.

A *runner* owns everything a kind of run needs beyond the model's own computation: the DataModule type it
builds, how the model is built around the config, how it is fitted and which checkpoint is selected, and
the outputs it leaves (``metrics.json``, ``predictions/``, ``run.json``, ``checkpoints/best.ckpt``), and
how ``evaluate.py ckpt_path=RUN`` rebuilds and re-tests such a run from its checkpoint alone.

Models say which runner they need through a class attribute, ``runner`` (``Encoder.runner`` is
``"pairs"``; a gene-set namer's is ``"gene_sets"``; the stacking ensemble's is ``"stacking"``), so a
config needs no extra key and a checkpoint written before runners existed still finds its runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class Runner:
    """One kind of run. Subclasses set ``name`` and ``tasks`` and implement ``train`` and ``evaluate``."""

    name: str = ""
    """The registry key (``perturb_models.runners.RUNNERS``) and the value of a model class's ``runner``."""

    tasks: tuple[str, ...] = ()
    """The ``data.task`` values this kind of run accepts (a model of another kind refuses the others)."""

    predicts_pairs: bool = False
    """True when its models score (perturbation, gene) pairs and ``restore(checkpoint, record)`` (a
    ``PairsRunner``'s) rebuilds one from its checkpoint for ``predict.py`` and ``design.py``."""

    def train(self, cfg: DictConfig, output_dir: Path) -> dict[str, float]:
        """Fit, select on validation, test, publish the run folder; return the val/ and test/ metrics.

        Called with the config checked and the run folder locked (``perturb_models.training.train``)."""
        raise NotImplementedError(f"runner {self.name!r} does not train")

    def evaluate(
        self,
        checkpoint: dict[str, Any],
        record: dict[str, Any],
        ckpt_file: Path,
        output_dir: Path,
        trainer_cfg: DictConfig | None = None,
        data_root: str | None = None,
        evaluate_cfg: DictConfig | None = None,
    ) -> dict[str, float]:
        """Rebuild data and model from a checkpoint and its record alone, test, write the outputs."""
        raise NotImplementedError(f"runner {self.name!r} does not evaluate")
