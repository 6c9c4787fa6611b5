"""``gene_sets``: ``python train.py data=k562_gse model=go_enrichment|lora_llama_gse`` and ``evaluate.py``
on such a run (the kind of run of every gene-set namer: ``runner = "gene_sets"``).

A gene-set model is a ``Namer`` (``perturb_models/gse/base.py``): the runner sets it up on the data's
context, fits it when it is ``trainable`` (the Trainer, the fit and the best-checkpoint selection are here,
``fit_namer``), asks it for every cluster and scores the answers. The run folder follows the project's
conventions: ``metrics.json`` (``test/rouge1_recall``, ``test/bertscore_f1``, ...), ``predictions/test.csv``
(``cluster,genes,label,answer,score`` plus the per-cluster metrics and the evidence), ``run.json`` and
``checkpoints/best.ckpt`` (the run record and the namer's trainable state), from which
``evaluate.py ckpt_path=RUN`` rebuilds everything.

``score`` is the namer's confidence in its answer (higher is surer): -log10 q of the top term for
``go_enrichment``, the mean log-probability per answer token for ``lora_llama_gse``.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from perturb_models.builders import build_callbacks, build_datamodule, build_loggers, build_trainer, finish_wandb
from perturb_models.data.gse import GSEDataModule, describe_clusters, join_genes
from perturb_models.gse.base import Namer
from perturb_models.gse.scoring import score_answers
from perturb_models.io import atomic_write_bytes
from perturb_models.outputs import git_commit, print_metrics, publish_run, write_outputs
from perturb_models.runners.base import Runner
from perturb_models.runs import RECORD_KEY
from perturb_models.tasks import GSE_TASK

log = logging.getLogger(__name__)


def predict_and_score(namer, datamodule: GSEDataModule) -> tuple[dict[str, float], pd.DataFrame]:
    """Answers for every cluster; ``test/`` metrics over the labelled ones (the official scoring)."""
    clusters = datamodule.context.clusters
    outputs = namer.predict([list(g) for g in clusters["genes"]])
    frame = pd.DataFrame(
        {
            "cluster": clusters["cluster"].to_numpy(),
            "genes": [join_genes(g) for g in clusters["genes"]],
            "label": clusters["label"].to_numpy(),
            "answer": [o["answer"] for o in outputs],
            "score": [float(o["score"]) for o in outputs],
        }
    )
    scored = frame["label"].notna().to_numpy()
    means, per = score_answers(
        list(frame.loc[scored, "answer"]),
        list(frame.loc[scored, "label"]),
        datamodule.bertscore_model,
        datamodule.bertscore_num_layers,
    )
    for key, values in per.items():
        column = np.full(len(frame), np.nan)
        column[scored] = values
        frame[key] = column
    frame["evidence"] = [o.get("evidence", "") for o in outputs]
    log.info("%s: %s", datamodule.name, describe_clusters(clusters))
    return {f"test/{k}": v for k, v in means.items()}, frame


def save_gse_checkpoint(path: Path, run_record: dict[str, Any], state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({RECORD_KEY: run_record, "state_dict": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def fit_namer(namer: Namer, cfg: DictConfig, loggers: list, run_record: dict[str, Any]) -> dict[str, float]:
    """Fit a trainable namer with the project's Trainer, load the checkpoint with the best
    ``optimized_metric``; its validation metrics."""
    namer.prepare_fit(run_record)
    trainer = build_trainer(cfg, build_callbacks(cfg), list(loggers), **namer.trainer_overrides())
    started = time.time()
    trainer.fit(namer)
    tokens = namer.fit_info.get("train_tokens_per_epoch", 0)
    namer.fit_info.update(
        fit_seconds=round(time.time() - started, 1),
        train_tokens_per_second=round(tokens * trainer.current_epoch / max(time.time() - started, 1e-9), 1),
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    selectors = [c for c in trainer.checkpoint_callbacks if c.monitor == cfg.get("optimized_metric")]
    best = selectors[0].best_model_path if selectors else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        namer.load_state_dict(state)
        metrics[selectors[0].monitor] = float(selectors[0].best_model_score)
    namer.fit_info.update(best_checkpoint=best or None, epochs=trainer.current_epoch, global_step=trainer.global_step)
    return metrics


def train_gse(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Fit the namer (on knowledge only), answer every cluster, score the labelled ones, write the run."""
    started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    namer = instantiate(cfg.model.namer, _convert_="all")
    record = {
        "model": cfg.model.get("name", "model"),
        "dataset": datamodule.name,
        "task": "gse",
        "gse_kind": datamodule.kind,
        "seed": int(cfg.seed),
        "commit": git_commit(),
        "optimized_metric": cfg.get("optimized_metric"),
    }
    run_record = {"config": OmegaConf.to_container(cfg, resolve=True), "run": record}
    loggers = build_loggers(cfg)
    try:
        namer.setup(datamodule.context)
        val_metrics = fit_namer(namer, cfg, loggers, run_record) if namer.trainable else {}
        test_metrics, predictions = predict_and_score(namer, datamodule)
        metrics = {**val_metrics, **test_metrics}
        best = output_dir / "checkpoints" / "best.ckpt"
        if not namer.trainable:
            # Nothing learned: the checkpoint is the record that evaluate.py rebuilds the run from.
            save_gse_checkpoint(best, run_record, namer.state())
        record.update(getattr(namer, "fit_info", None) or {})
        record.update(best_checkpoint=str(best), wall_seconds=round(time.time() - started, 2))
        publish_run(output_dir, {"test": predictions}, record, metrics, loggers, cfg)
        return metrics
    finally:
        finish_wandb(loggers)


def evaluate_gse(
    checkpoint: dict[str, Any],
    record: dict[str, Any],
    ckpt_file: Path,
    output_dir: Path,
    trainer_cfg: DictConfig | None = None,
    data_root: str | None = None,
) -> dict[str, float]:
    """Rebuild data and namer from a GSE checkpoint's record, answer, score and write the outputs."""
    cfg = OmegaConf.create(record["config"])
    datamodule = build_datamodule(cfg.data, **({"root": data_root} if data_root else {}))
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup(datamodule.context)
    namer.load_state(checkpoint.get("state_dict") or {})
    accelerator = str((trainer_cfg or {}).get("accelerator", "auto"))
    if hasattr(namer, "to") and torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        namer.to("cuda")
    metrics, predictions = predict_and_score(namer, datamodule)
    run = dict(record.get("run", {}), checkpoint=str(ckpt_file), evaluated_with_commit=git_commit())
    usage = (getattr(namer, "fit_info", None) or {}).get("llm_usage")
    if usage is not None:  # what this evaluation's answers cost (a prompting namer answers here again)
        run["llm_usage"] = usage
    write_outputs(output_dir, {"test": predictions}, run, metrics)
    print_metrics(metrics, output_dir)
    return metrics


class GeneSetRunner(Runner):
    name = "gene_sets"
    tasks = (GSE_TASK,)

    def train(self, cfg: DictConfig, output_dir: Path) -> dict[str, float]:
        return train_gse(cfg, output_dir)

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
        return evaluate_gse(checkpoint, record, ckpt_file, output_dir, trainer_cfg, data_root)
