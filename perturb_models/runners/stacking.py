"""``stacking``: the ensemble's kind of run (``EnsembleEncoder.runner``). Each member without a finished
run (``model.encoder.member_runs.NAME``) is first trained as an ordinary ``pairs`` run into
``<run>/members/<name>``, under the ensemble's data, seed, trainer and callbacks plus
``model.encoder.member_overrides.<name>``; then the ensemble is an ordinary pairs run whose model loads
the members from those runs, and fits its combination on validation (``EnsembleEncoder``)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from perturb_models.builders import build_model
from perturb_models.config import plain
from perturb_models.errors import ConfigError
from perturb_models.runners.pairs import PairsRunner

log = logging.getLogger(__name__)


def finished(run: Path) -> bool:
    """Whether ``run`` holds a completed run (its ``run.json`` says so and its best checkpoint exists)."""
    try:
        record = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("status") == "completed" and (run / "checkpoints" / "best.ckpt").is_file()


class StackingRunner(PairsRunner):
    name = "stacking"

    def build_model(self, cfg: DictConfig, datamodule: Any) -> L.LightningModule:
        """The ensemble's classifier; its encoder builds each member from the catalog through
        ``build_member`` (the same classifier a member's own run builds, on this run's data)."""
        metric = cfg.get("optimized_metric")

        def build_member(model_cfg: Any) -> L.LightningModule:
            return build_model(OmegaConf.create({"model": plain(model_cfg), "optimized_metric": metric}), datamodule)

        return build_model(cfg, datamodule, build_member=build_member)

    def extra_outputs(self, model: L.LightningModule) -> dict[str, Any]:
        """``ensemble_weights.json``: the combination weights, the guard's validation figures, the fallback."""
        return {"ensemble_weights.json": model.encoder.weight_report()}

    def train(self, cfg: DictConfig, output_dir: Path) -> dict[str, float]:
        encoder = cfg.model.encoder
        runs = dict(plain(encoder.get("member_runs")) or {})
        for name in list(plain(encoder.get("members")) or []):
            if runs.get(name):
                continue
            out = output_dir / "members" / name
            if finished(out):  # a resumed ensemble run: the member's own run is done, and checked when loaded
                log.info("ensemble: member %s already trained in %s", name, out)
                runs[name] = str(out)
            else:
                runs[name] = str(self.train_member(cfg, name, out))
        cfg = copy.deepcopy(cfg)
        OmegaConf.update(cfg, "model.encoder.member_runs", runs, force_add=True)
        return super().train(cfg, output_dir)

    def train_member(self, cfg: DictConfig, name: str, out: Path) -> Path:
        """Train member ``name`` as its own run in ``out`` (``perturb_models.training.train``); its folder."""
        import torch.distributed as dist

        from perturb_models.training import train

        strategy = plain(cfg.trainer.get("strategy")) or ""
        multi_process = "DDP" in str(strategy.get("_target_", "") if isinstance(strategy, dict) else strategy).upper()
        if multi_process or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise ConfigError(
                f"model=ensemble cannot train member {name!r} inside a multi-process run; train it "
                f"first and pass +model.encoder.member_runs.{name}=<its run folder>"
            )
        catalog = plain(cfg.model.encoder.get("catalog")) or {}
        if name not in catalog:
            raise ConfigError(
                f"model.encoder.members lists {name!r}, which is not in model.encoder.catalog "
                f"(has {', '.join(catalog)}); add it with +model@model.encoder.catalog.{name}={name}"
            )
        member = OmegaConf.create(
            {
                "model": catalog[name],
                "data": plain(cfg.data),
                "trainer": plain(cfg.trainer),
                "callbacks": plain(cfg.callbacks),
                "logger": {},
                "paths": {"output_dir": str(out)},
                "seed": cfg.seed,
                "optimized_metric": cfg.get("optimized_metric"),
                "ckpt_path": None,
            }
        )
        overrides = (plain(cfg.model.encoder.get("member_overrides")) or {}).get(name) or {}
        member = OmegaConf.merge(member, OmegaConf.create(overrides))
        # The ensemble's own callbacks point at its checkpoints/ folder; a member writes into its own.
        member.trainer.default_root_dir = str(out)
        for callback in member.callbacks.values():
            if callback is not None and "dirpath" in callback:
                callback.dirpath = str(out / "checkpoints")
        log.info("ensemble: training member %s into %s", name, out)
        train(member)
        return out
