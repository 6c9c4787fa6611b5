"""Quality of model=lora_llama on a CPU-sized subsample of a PerturbQA dataset; rows for quality.csv.

Fine-tuning a 135M-parameter LM on all 134k K562 training pairs and scoring 23k test pairs takes hours on
CPU, so this script trains on a seeded subsample of training pairs (half DE, half not, for the DE task)
and scores a seeded subsample of test genes (all their test pairs, genes with both classes only, so the
official per-gene AUROC is defined for each). Retrieval context still uses every training pair. The
sizes are printed and written next to the rows; the figure is a noisy small-sample estimate.

    nice python benchmarks/llm_quality.py --data k562 --tasks de dir --train-pairs 384 --test-pairs 600

Appends ``model,dataset,task,seed,auroc_per_gene,genes_scored,commit,wall_seconds`` rows to
``benchmarks/results/quality.csv`` and the same rows with the subsample sizes to ``llm_quality_runs.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import perturb_models  # noqa: E402,F401
from perturb_models.data.datamodule import PairTensors  # noqa: E402
from perturb_models.io import atomic_write_dataframe  # noqa: E402
from perturb_models.training import build_datamodule, build_model, git_commit  # noqa: E402

COLUMNS = ["model", "dataset", "task", "seed", "auroc_per_gene", "genes_scored", "commit", "wall_seconds", "overrides"]


def subsample(datamodule, stage: str, rows: np.ndarray) -> None:
    frame = datamodule.frames[stage].iloc[np.sort(rows)].reset_index(drop=True)
    datamodule.frames[stage] = frame
    datamodule.splits[stage] = PairTensors({
        key: torch.as_tensor(frame[col].to_numpy(), dtype=torch.long)
        for key, col in (("pert", "pert_idx"), ("gene", "gene_idx"), ("label", "label"), ("de", "de"), ("dir", "dir"))
    })


def train_rows(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced classes (the DE task has ~12% positives: a tiny random sample would hold a handful)."""
    per_class = n // frame["label"].nunique()
    picks = [rng.choice(np.flatnonzero(frame["label"].to_numpy() == c), size=min(per_class, int((frame["label"] == c).sum())),
                        replace=False) for c in sorted(frame["label"].unique())]
    return np.concatenate(picks)


def test_rows(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> np.ndarray:
    """All test pairs of randomly drawn genes that have both classes, until about ``n`` pairs."""
    both = frame.groupby("gene")["label"].nunique()
    genes = rng.permutation(both.index[both == 2].to_numpy())
    chosen, total = [], 0
    sizes = frame.groupby("gene").size()
    for gene in genes:
        if total >= n:
            break
        chosen.append(gene)
        total += int(sizes[gene])
    return np.flatnonzero(frame["gene"].isin(set(chosen)).to_numpy())


def run(task: str, args: argparse.Namespace) -> dict:
    started = time.time()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", [f"data={args.data}", f"data.task={task}", f"model={args.model}", f"seed={args.seed}",
                                f"model.encoder.max_length={args.max_length}", f"data.batch_size={args.batch_size}",
                                f"data.eval_batch_size={args.batch_size * 4}", *args.overrides])
    L.seed_everything(args.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    rng = np.random.default_rng(args.seed)
    subsample(datamodule, "train", train_rows(datamodule.frames["train"], args.train_pairs, rng))
    subsample(datamodule, "test", test_rows(datamodule.frames["test"], args.test_pairs, rng))
    # Validation is not run (no model selection on a run this short): skip tokenising its prompts.
    subsample(datamodule, "val", np.arange(min(16, len(datamodule.frames["val"]))))
    n_train, n_test = len(datamodule.frames["train"]), len(datamodule.frames["test"])
    print(f"[{task}] training pairs {n_train} (balanced subsample), test pairs {n_test} "
          f"over {datamodule.frames['test']['gene'].nunique()} genes", flush=True)
    model = build_model(cfg, datamodule)
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = model.stage_metrics["test"]
    score_task = "de" if task == "de" else "dir"
    row = {"model": cfg.model.name, "dataset": args.data, "task": task, "seed": args.seed,
           "auroc_per_gene": metrics[f"test/{score_task}_auroc_per_gene"],
           "genes_scored": int(metrics[f"test/{score_task}_genes_scored"]), "commit": git_commit(),
           "wall_seconds": round(time.time() - started, 1),
           "overrides": f"llm_quality.py CPU subsample: {n_train} train pairs, {n_test} test pairs, {args.epochs} epoch(s)",
           "train_pairs": n_train, "test_pairs": n_test, "epochs": args.epochs}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="k562")
    parser.add_argument("--tasks", nargs="+", default=["de", "dir"])
    parser.add_argument("--model", default="lora_llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-pairs", type=int, default=384)
    parser.add_argument("--test-pairs", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.csv"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.encoder.prompt.retrieval_k=3")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for task in args.tasks:
        row = run(task, args)
        # quality.csv keeps the columns every model shares; the subsample sizes go to a sidecar file.
        for out, columns in ((Path(args.out), COLUMNS), (Path(args.out).with_name("llm_quality_runs.csv"), list(row))):
            new = pd.DataFrame([row])[columns]
            table = pd.concat([pd.read_csv(out), new], ignore_index=True) if out.is_file() else new
            atomic_write_dataframe(out, table)
            print(f"appended to {out}", flush=True)


if __name__ == "__main__":
    main()
