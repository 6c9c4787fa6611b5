"""``pairs``: a classifier over (perturbation, downstream gene) pairs, the kind of run of every model with
an ``encoder`` (``Encoder.runner``). ``PerturbQADataModule`` batches the pairs, ``PerturbationClassifier``
wraps the encoder, Lightning fits it, the checkpoint with the best ``optimized_metric`` is selected on
validation, calibrated on its validation predictions and tested."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from perturb_models.builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
    finish_wandb,
)
from perturb_models.calibration import CALIBRATION_KEY, fit_validation_calibrators, save_calibrators
from perturb_models.console import say
from perturb_models.errors import CheckpointError, RunInterrupted
from perturb_models.io import atomic_write_json
from perturb_models.outputs import git_commit, publish_run, run_record
from perturb_models.runners.base import Runner
from perturb_models.runs import (
    RECORD_KEY,
    check_resume_compatible,
    checkpoint_step,
    load_checkpoint,
    resolve_resume_checkpoint,
)
from perturb_models.tasks import TASK_NAMES

log = logging.getLogger(__name__)


def readable_step(checkpoint: Path) -> int | None:
    """The step ``checkpoint`` holds; None when it is missing or unreadable (a save cut short by the signal)."""
    try:
        return checkpoint_step(checkpoint)
    except CheckpointError:
        return None


def interrupted_message(output_dir: Path, last: Path, kept: int | None, epoch: int, step: int) -> str:
    """What a run stopped by SIGTERM at ``step`` tells its user: the step ``last`` holds and how to resume."""
    stopped = f"run stopped by SIGTERM at epoch {epoch}, step {step}; "
    if kept is None:
        return stopped + f"{last} is missing or unreadable, so there is nothing to resume: rerun to start over"
    return (
        stopped + f"{last} holds step {kept}. Resume from there with the same options plus "
        f"hydra.run.dir={output_dir} ckpt_path=last"
    )


class PairsRunner(Runner):
    name = "pairs"
    tasks = TASK_NAMES
    predicts_pairs = True

    def build_model(self, cfg: DictConfig, datamodule: Any) -> L.LightningModule:
        """The shared classifier around ``cfg.model``'s encoder."""
        return build_model(cfg, datamodule)

    def restore(
        self, checkpoint: dict[str, Any], record: dict[str, Any], data_root: str | None = None
    ) -> tuple[DictConfig, Any, L.LightningModule]:
        """The run's config, its DataModule (the checkpoint's vocabulary and validation perturbations) and its
        classifier with the checkpoint's weights and calibrators, in eval mode: a trained run rebuilt from its
        checkpoint alone (``evaluate.py``, ``predict.py``, ``design.py``, the benchmarks that read a run)."""
        cfg = OmegaConf.create(record["config"])
        overrides: dict[str, Any] = {"vocab": record["vocab"], "val_perts": record["val_perts"]}
        if data_root:
            overrides["root"] = data_root
        datamodule = build_datamodule(cfg.data, **overrides)
        model = self.build_model(cfg, datamodule)
        model.load_state_dict(checkpoint["state_dict"])
        model.calibrators = checkpoint.get(CALIBRATION_KEY)
        model.eval()
        return cfg, datamodule, model

    def extra_outputs(self, model: L.LightningModule) -> dict[str, Any]:
        """JSON files this kind of run adds to a finished run folder (name -> content); none for pairs."""
        return {}

    def train(self, cfg: DictConfig, output_dir: Path) -> dict[str, float]:
        started = time.time()
        output_dir.mkdir(parents=True, exist_ok=True)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = build_datamodule(cfg.data)
        datamodule.save_split(output_dir / "split.json")
        model = self.build_model(cfg, datamodule)
        record = run_record(cfg, datamodule)
        model.run_record = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "val_perts": list(datamodule.context.val_perts),
            "run": record,
        }
        resume_from = resolve_resume_checkpoint(cfg.get("ckpt_path"), output_dir)
        if resume_from is not None:
            check_resume_compatible(
                resume_from,
                load_checkpoint(resume_from),
                model.run_record,
                RECORD_KEY,
                allow_mismatch=bool(cfg.get("resume_mismatch_ok", False)),
            )
        loggers = build_loggers(cfg)
        try:
            trainer = build_trainer(cfg, build_callbacks(cfg), loggers)
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
            except SIGTERMException as exc:
                # A scheduler must not count the run as a success: the record says so, the exit status is
                # non-zero, and the message names the step last.ckpt holds (with save_on_exception off, or a
                # failed save, that is the last periodic save, not the step the signal came at).
                last = output_dir / "checkpoints" / "last.ckpt"
                kept = readable_step(last)
                record.update(
                    status="interrupted",
                    signal="SIGTERM",
                    epochs=trainer.current_epoch,
                    global_step=trainer.global_step,
                    checkpoint_step=kept,
                    wall_seconds=round(time.time() - started, 2),
                )
                if trainer.is_global_zero:
                    atomic_write_json(output_dir / "run.json", record)
                raise RunInterrupted(
                    interrupted_message(output_dir, last, kept, trainer.current_epoch, trainer.global_step)
                ) from exc
            selectors = [c for c in trainer.checkpoint_callbacks if c.monitor == cfg.get("optimized_metric")]
            best = selectors[0].best_model_path if selectors else ""
            select_from = best if best and Path(best).is_file() else None
            if select_from is None:
                log.warning("No best checkpoint was saved (fast_dev_run or no validation): testing the final weights")
            trainer.validate(model, datamodule=datamodule, ckpt_path=select_from, verbose=False)
            # Calibrators from the selected checkpoint's validation predictions only (never a test label).
            model.calibrators = fit_validation_calibrators(model.stage_predictions.get("val"))
            trainer.test(model, datamodule=datamodule, ckpt_path=select_from, verbose=False)
            if model.calibrators and select_from is not None and trainer.is_global_zero:
                save_calibrators(select_from, model.calibrators)
            metrics = {**model.stage_metrics.get("val", {}), **model.stage_metrics.get("test", {})}
            record.update(
                status="completed",
                best_checkpoint=select_from,
                wall_seconds=round(time.time() - started, 2),
                epochs=trainer.current_epoch,
                global_step=trainer.global_step,
            )
            if trainer.is_global_zero:
                publish_run(output_dir, model.stage_predictions, record, metrics, loggers, cfg)
                for name, content in self.extra_outputs(model).items():
                    atomic_write_json(output_dir / name, content)
            return metrics
        finally:
            finish_wandb(loggers)

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
        cfg, datamodule, model = self.restore(checkpoint, record, data_root)
        if not model.calibrators:
            say(
                f"{ckpt_file} holds no calibrator (written before calibration existed, or not the run's selected "
                "checkpoint): scores are uncalibrated, metrics.json has no Brier/ECE"
            )
        logged_cfg = cfg
        if evaluate_cfg is not None:
            own = {key: evaluate_cfg.get(key) for key in ("logger", "paths", "task_name", "run_name")}
            logged_cfg = OmegaConf.merge(
                {k: v for k, v in record["config"].items() if k not in own},
                OmegaConf.create(OmegaConf.to_container(OmegaConf.create(own), resolve=False)),
            )
            # paths.output_dir of evaluate.py is an interpolation of the Hydra run folder: resolve it there.
            OmegaConf.update(logged_cfg, "paths.output_dir", str(output_dir))
        loggers = build_loggers(logged_cfg)
        try:
            trainer = instantiate(trainer_cfg, logger=loggers or False, _convert_="all")
            trainer.test(model, datamodule=datamodule, verbose=False)
            metrics = dict(model.stage_metrics["test"])
            run = dict(record.get("run", {}), checkpoint=str(ckpt_file), evaluated_with_commit=git_commit())
            if trainer.is_global_zero:
                publish_run(output_dir, model.stage_predictions, run, metrics, loggers, logged_cfg)
            return metrics
        finally:
            finish_wandb(loggers)
