"""One runner per kind of run, chosen by the model: ``pairs`` (a classifier over (perturbation, gene)
pairs: every model of conf/model/ with an ``encoder``), ``stacking`` (the ensemble: member runs first,
then the combination), ``gene_sets`` (the gene-set namers of ``data=k562_gse``).

``training.train`` and ``evaluation.evaluate_checkpoint`` dispatch here with no task-name branch: a model
class names its runner (``runner`` class attribute, see ``runners/base.py``), and the runner owns its
DataModule, model building, checkpoint selection and outputs. Add a kind of run by subclassing ``Runner``
and registering it in ``RUNNERS`` (docs/architecture.md, "Add a kind of run").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig

from perturb_models.errors import ConfigError
from perturb_models.runners.base import Runner
from perturb_models.runners.gene_sets import GeneSetRunner
from perturb_models.runners.pairs import PairsRunner
from perturb_models.runners.stacking import StackingRunner

RUNNERS: dict[str, Runner] = {runner.name: runner for runner in (PairsRunner(), StackingRunner(), GeneSetRunner())}
"""The registry: runner name -> runner."""

MODEL_KEYS = ("encoder", "namer")
"""Where a model config names its class: ``model.encoder._target_`` (pair models) or ``model.namer._target_``."""


def model_class(model_cfg: Mapping[str, Any]) -> type:
    """The class a model config instantiates (its ``encoder`` or ``namer`` target)."""
    for key in MODEL_KEYS:
        node = model_cfg.get(key) if model_cfg is not None else None
        if node is not None and node.get("_target_"):
            return get_class(node["_target_"])
    raise ConfigError(
        "the model config has neither model.encoder._target_ nor model.namer._target_: "
        "see docs/architecture.md, 'Add a model'"
    )


def runner_for(cfg: DictConfig | Mapping[str, Any]) -> Runner:
    """The runner of a (train or checkpoint-record) config: the one its model class names, checked against
    ``data.task``."""
    cls = model_class(cfg["model"])
    name = getattr(cls, "runner", None)
    if name not in RUNNERS:
        raise ConfigError(
            f"{cls.__module__}.{cls.__name__} names runner {name!r}, which is not one of {', '.join(RUNNERS)}"
        )
    runner = RUNNERS[name]
    task = (cfg.get("data") or {}).get("task")
    if task is not None and task not in runner.tasks:
        model = (cfg["model"] or {}).get("name", cls.__name__)
        raise ConfigError(
            f"model={model} is a {runner.name} model (data.task in {', '.join(runner.tasks)}), "
            f"but data.task={task}: choose a data config of that kind"
        )
    return runner


__all__ = ["RUNNERS", "Runner", "model_class", "runner_for"]
