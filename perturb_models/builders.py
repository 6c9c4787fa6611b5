"""Builders: the DataModule, the classifier, the loggers, the callbacks and the Trainer of a Hydra config.

The runners (``perturb_models/runners``), ``predict.py``, the benchmarks and the tests all build through
these functions, so a run built anywhere is the run ``train.py`` would build.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from perturb_models.console import EpochLines, say, trainer_console_overrides
from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.models.classifier import PerturbationClassifier
from perturb_models.runs import AtomicCheckpointIO, ExactResume

log = logging.getLogger(__name__)


def build_datamodule(data_cfg: DictConfig, **overrides: Any) -> PerturbQADataModule:
    """Instantiate the DataModule of ``cfg.data`` (the pair tasks' ``PerturbQADataModule``, or the gene-set
    task's ``GSEDataModule``) and run its setup: files are fetched and validated."""
    datamodule = instantiate(data_cfg, _convert_="all", **overrides)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, datamodule: PerturbQADataModule, **encoder_inputs: Any) -> PerturbationClassifier:
    """The shared classifier around the encoder of ``cfg.model``; dimensions come from the DataModule.

    ``encoder_inputs`` are extra constructor arguments a runner hands the encoder (the stacking runner's
    ``build_member``). Code that may meet any model builds it through its runner
    (``runners.runner_for(cfg).build_model``)."""
    context = datamodule.context
    encoder_factory = instantiate(cfg.model.encoder, _partial_=True, _convert_="all")
    encoder = encoder_factory(context=context, **encoder_inputs)
    optimizer = instantiate(cfg.model.optimizer) if cfg.model.get("optimizer") else None
    scheduler = instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None
    return PerturbationClassifier(
        encoder=encoder,
        vocab=context.vocab,
        task=context.task,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval=cfg.model.get("scheduler_interval", "epoch"),
        monitor=cfg.get("optimized_metric"),
        class_weights=cfg.model.get("class_weights"),
        rank_weight=float(cfg.model.get("rank_weight") or 0.0),
    )


def wandb_mode() -> str:
    """``online`` when W&B credentials exist, else ``offline``; ``$WANDB_MODE`` wins when set."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"online", "offline", "disabled", "dryrun"}:
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if "Wandb" in logger_cfg._target_:
            mode = wandb_mode()
            if mode == "disabled":
                log.info("WANDB_MODE=disabled: W&B logging is off for this run")
                continue
            logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
            if logger_cfg.get("offline") is None:
                logger_cfg["offline"] = mode == "offline"
            Path(logger_cfg["save_dir"]).mkdir(parents=True, exist_ok=True)
        logger = instantiate(logger_cfg, _convert_="all")
        # Lightning's WandbLogger always passes `anonymous`, which current wandb warns about on every run.
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    configured = [
        instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c
    ]
    return [*configured, ExactResume(), EpochLines()]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides: Any) -> L.Trainer:
    overrides = {**trainer_console_overrides(cfg.trainer), **overrides}
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        _convert_="all",
        **overrides,
    )


def finish_wandb(loggers: list) -> None:
    """Close the W&B run (always, so multirun jobs do not bleed into each other) and say where it went."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        run = logger.experiment if logger._experiment is not None else wandb.run
        run_dir = Path(run.dir).parent if run is not None and getattr(run, "dir", None) else None
        offline = run is not None and getattr(run.settings, "mode", None) in ("offline", "dryrun")
        wandb.finish()
        if offline and run_dir is not None:
            if os.environ.get("WANDB_SILENT", "").lower() in ("1", "true", "yes"):
                say(
                    f"W&B ran offline (no credentials, or WANDB_MODE=offline). The run is in {run_dir}\n"
                    f"Upload it later with: wandb sync {run_dir}"
                )
            else:  # W&B has just printed the `wandb sync` command itself; say only why it ran offline
                say(
                    "W&B ran offline (no credentials, or WANDB_MODE=offline): upload the run with the wandb sync "
                    "command above"
                )
