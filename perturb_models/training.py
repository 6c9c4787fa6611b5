"""``train(cfg)``: build data, model, loggers and Trainer from a Hydra config; fit, test, write outputs."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lightning.pytorch.utilities.exceptions import SIGTERMException

from perturb_models.config_checks import validate_config
from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.errors import CheckpointError, RunInterrupted
from perturb_models.io import atomic_write_dataframe, atomic_write_json
from perturb_models.tasks import GSE_TASK
from perturb_models.models.classifier import RECORD_KEY, PerturbationClassifier, nan_to_none
from perturb_models.runs import ExactResume, check_resume_compatible, load_checkpoint, lock_run_folder
from perturb_models.console import EpochLines, say, trainer_console_overrides

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file beside the target and are renamed into place.

    A crash or a kill while saving leaves the previous ``last.ckpt`` intact instead of a torn file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def git_commit() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def build_datamodule(data_cfg: DictConfig, **overrides: Any) -> PerturbQADataModule:
    """Instantiate the DataModule of ``cfg.data`` and run its setup (files are fetched and validated)."""
    datamodule = instantiate(data_cfg, _convert_="all", **overrides)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, datamodule: PerturbQADataModule) -> PerturbationClassifier:
    """The shared classifier around the encoder of ``cfg.model``; dimensions come from the DataModule."""
    context = datamodule.context
    encoder_factory = instantiate(cfg.model.encoder, _partial_=True, _convert_="all")
    encoder = encoder_factory(context=context)
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
    for name, logger_cfg in (cfg.get("logger") or {}).items():
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
    configured = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    return [*configured, ExactResume(), EpochLines()]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, **overrides: Any) -> L.Trainer:
    overrides = {**trainer_console_overrides(cfg.trainer), **overrides}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       plugins=[AtomicCheckpointIO()], _convert_="all", **overrides)


def resolve_resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` means the ``checkpoints/last.ckpt`` of this run folder; anything else is a path."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last, but there is no {path}. To resume, run in the folder of the interrupted run: "
                f"python train.py <same overrides> hydra.run.dir=<that run folder> ckpt_path=last"
            )
        return str(path)
    path = Path(os.path.expanduser(ckpt_path))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(path)


def write_outputs(output_dir: Path, model: PerturbationClassifier, record: dict[str, Any],
                  metrics: dict[str, float]) -> None:
    """``metrics.json``, ``predictions/<stage>.csv`` and ``run.json``, each written atomically."""
    for stage, frame in model.stage_predictions.items():
        atomic_write_dataframe(output_dir / "predictions" / f"{stage}.csv", frame)
    atomic_write_json(output_dir / "metrics.json", nan_to_none(metrics))
    atomic_write_json(output_dir / "run.json", record)


def publish_run(output_dir: Path, model: PerturbationClassifier, record: dict[str, Any], metrics: dict[str, float],
                loggers: list, cfg: DictConfig) -> None:
    """The end of every classifier run (train and evaluate): outputs, the loggers' summary, the console table."""
    write_outputs(output_dir, model, record, metrics)
    log_run_summary(loggers, cfg, metrics)
    print_metrics(metrics, output_dir)


def run_record(cfg: DictConfig, datamodule: PerturbQADataModule) -> dict[str, Any]:
    return {
        "model": cfg.model.get("name", "model"),
        "dataset": datamodule.name,
        "task": datamodule.task,
        "seed": int(cfg.seed),
        "commit": git_commit(),
        "optimized_metric": cfg.get("optimized_metric"),
    }


def log_run_summary(loggers: list, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Resolved config, the selected checkpoint's validation metrics as ``final/val/...`` (what W&B sweeps
    optimise) and a metrics table to every logger. Test metrics were logged once already as ``test/...``."""
    rows = [[k, v] for k, v in sorted(metrics.items())]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if k.startswith("val/")})
        if hasattr(logger, "log_table"):
            logger.log_table(key="test/metrics_table", columns=["metric", "value"], data=rows)
        logger.save()


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
                say(f"W&B ran offline (no credentials, or WANDB_MODE=offline). The run is in {run_dir}\n"
                    f"Upload it later with: wandb sync {run_dir}")
            else:  # W&B has just printed the `wandb sync` command itself; say only why it ran offline
                say("W&B ran offline (no credentials, or WANDB_MODE=offline): upload the run with the wandb sync command above")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit on train, select on validation, test the best checkpoint; return val/ and test/ metrics.

    The config is checked first, and the run folder is locked for the whole run (see ``runs.py``).
    """
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    with lock_run_folder(output_dir):
        if cfg.data.get("task") == GSE_TASK:  # gene set enrichment generates text: its own runner
            from perturb_models.gse.runner import train_gse

            return train_gse(cfg)
        return _train(cfg, output_dir)


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    datamodule.save_split(output_dir / "split.json")
    model = build_model(cfg, datamodule)
    record = run_record(cfg, datamodule)
    model.run_record = {"config": OmegaConf.to_container(cfg, resolve=True), "val_perts": list(datamodule.context.val_perts),
                        "run": record}
    resume_from = resolve_resume_checkpoint(cfg.get("ckpt_path"), output_dir)
    if resume_from is not None:
        check_resume_compatible(resume_from, load_checkpoint(resume_from), model.run_record, RECORD_KEY,
                                allow_mismatch=bool(cfg.get("resume_mismatch_ok", False)))
    loggers = build_loggers(cfg)
    try:
        trainer = build_trainer(cfg, build_callbacks(cfg), loggers)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
        except SIGTERMException as exc:
            # Lightning saved checkpoints/last.ckpt (save_on_exception) before re-raising; a scheduler must
            # not count the run as a success, so the record says so and the exit status is non-zero.
            record.update(status="interrupted", signal="SIGTERM", epochs=trainer.current_epoch,
                          global_step=trainer.global_step, wall_seconds=round(time.time() - started, 2))
            if trainer.is_global_zero:
                atomic_write_json(output_dir / "run.json", record)
            raise RunInterrupted(
                f"run stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                f"{output_dir / 'checkpoints' / 'last.ckpt'} was saved. Resume with the same options plus "
                f"hydra.run.dir={output_dir} ckpt_path=last"
            ) from exc
        selectors = [c for c in trainer.checkpoint_callbacks if c.monitor == cfg.get("optimized_metric")]
        best = selectors[0].best_model_path if selectors else ""
        select_from = best if best and Path(best).is_file() else None
        if select_from is None:
            log.warning("No best checkpoint was saved (fast_dev_run or no validation): testing the final weights")
        trainer.validate(model, datamodule=datamodule, ckpt_path=select_from, verbose=False)
        trainer.test(model, datamodule=datamodule, ckpt_path=select_from, verbose=False)
        metrics = {**model.stage_metrics.get("val", {}), **model.stage_metrics.get("test", {})}
        record.update(status="completed", best_checkpoint=select_from, wall_seconds=round(time.time() - started, 2),
                      epochs=trainer.current_epoch, global_step=trainer.global_step)
        if trainer.is_global_zero:
            publish_run(output_dir, model, record, metrics, loggers, cfg)
        return metrics
    finally:
        finish_wandb(loggers)


def print_metrics(metrics: dict[str, float], output_dir: Path | None = None) -> None:
    keys = [k for k in sorted(metrics) if k.startswith("test/")]
    width = max((len(k) for k in keys), default=10)
    lines = [f"{k:<{width}}  {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k:<{width}}  {metrics[k]}" for k in keys]
    say("\n".join(["Test metrics:"] + lines))
    if output_dir is not None:
        say(f"Outputs written to {output_dir}")
