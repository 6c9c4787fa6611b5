"""``python train.py data=k562_gse model=go_enrichment|lora_llama_gse`` and ``evaluate.py`` on such a run.

A gene-set model ("namer") has ``setup(context)``, ``fit(context, cfg=..., loggers=..., output_dir=...)``
(returns validation metrics; a no-op for the enrichment baseline), ``predict(list of gene lists)``
(``answer``, ``score``, ``evidence`` per cluster), and ``state()``/``load_state()`` for the checkpoint.
The run folder follows the project's conventions: ``metrics.json`` (``test/rouge1_recall``,
``test/bertscore_f1``, ...), ``predictions/test.csv`` (``cluster,genes,label,answer,score`` plus the
per-cluster metrics and the evidence), ``run.json`` and ``checkpoints/best.ckpt`` (the run record and the
namer's trainable state), from which ``evaluate.py ckpt_path=RUN`` rebuilds everything.

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

from perturb_models.builders import build_datamodule, build_loggers, finish_wandb
from perturb_models.data.gse import GSEDataModule, describe_clusters, join_genes
from perturb_models.gse.scoring import score_answers
from perturb_models.io import atomic_write_bytes
from perturb_models.models.classifier import RECORD_KEY
from perturb_models.outputs import git_commit, print_metrics, publish_run, write_outputs

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


def train_gse(cfg: DictConfig) -> dict[str, float]:
    """Fit the namer (on knowledge only), answer every cluster, score the labelled ones, write the run."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
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
        val_metrics = (
            namer.fit(datamodule.context, cfg=cfg, loggers=loggers, output_dir=output_dir, run_record=run_record) or {}
        )
        test_metrics, predictions = predict_and_score(namer, datamodule)
        metrics = {**val_metrics, **test_metrics}
        best = output_dir / "checkpoints" / "best.ckpt"
        if not getattr(namer, "trainable", False):
            # Nothing learned: the checkpoint is the record that evaluate.py rebuilds the run from.
            save_gse_checkpoint(best, run_record, namer.state())
        record.update(getattr(namer, "fit_info", {}))
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
    write_outputs(output_dir, {"test": predictions}, run, metrics)
    print_metrics(metrics, output_dir)
    return metrics
