"""``train(cfg)``: the one orchestration of a run. Fit on train, select on validation, test the selected
checkpoint, publish the outputs. What it calls lives by job: ``builders.py`` (data, model, loggers,
callbacks, Trainer), ``runs.py`` (run-folder lock, resume, checkpoint files), ``outputs.py`` (the files
and summaries a finished run leaves)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
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
from perturb_models.calibration import fit_validation_calibrators, save_calibrators
from perturb_models.config_checks import validate_config
from perturb_models.errors import RunInterrupted
from perturb_models.io import atomic_write_json
from perturb_models.models.classifier import RECORD_KEY
from perturb_models.outputs import publish_run, run_record
from perturb_models.runs import check_resume_compatible, load_checkpoint, lock_run_folder, resolve_resume_checkpoint
from perturb_models.tasks import GSE_TASK

log = logging.getLogger(__name__)


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
            # Lightning saved checkpoints/last.ckpt (save_on_exception) before re-raising; a scheduler must
            # not count the run as a success, so the record says so and the exit status is non-zero.
            record.update(
                status="interrupted",
                signal="SIGTERM",
                epochs=trainer.current_epoch,
                global_step=trainer.global_step,
                wall_seconds=round(time.time() - started, 2),
            )
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
        return metrics
    finally:
        finish_wandb(loggers)
