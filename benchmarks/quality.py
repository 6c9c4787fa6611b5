"""Quality grid: models x datasets x seeds through ``perturb_models.training.train``, one ``joint`` run per
cell giving both the ``de`` and the ``dir`` row; rows appended to ``benchmarks/results/quality.csv``.

    python benchmarks/quality.py --models mlp gat gears knn --datasets k562 rpe1 hepg2 k562_set --seeds 0 1 2
    python benchmarks/quality.py --table          # only regenerate docs/results.md and README's table from the CSV

Resumable: a (model, dataset, task, seed) already in the CSV is skipped. Every run uses the model's
default config plus the grid's budget overrides (``--set``, and the CPU budget below), recorded per row
in the ``overrides`` column. Needs the PerturbQA files ($PERTURBQA_DATA) and, for graph models,
the knowledge files ($PERTURB_KNOWLEDGE).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perturb_models.io import atomic_write_dataframe  # noqa: E402
# The tables (docs/results.md, the README block) are made by the package, one code path for both.
from perturb_models.results import README, quality_table as results_table, write_doc  # noqa: E402

COLUMNS = ["model", "dataset", "task", "seed", "auroc_per_gene", "genes_scored", "commit", "wall_seconds", "overrides"]
DEFAULT_CSV = REPO / "benchmarks" / "results" / "quality.csv"
DEFAULT_DOC = REPO / "docs" / "results.md"

# Budget for a shared 2-core CPU: a few minutes a run. Larger batches cost graph models nothing extra per
# step (one full-graph pass per step), so gat gets the largest; gears needs more optimizer steps (at batch
# 8192 an epoch of K562 is 15 steps and it stopped near chance), so it trains at 1024 for longer.
CPU_BUDGET = {
    "*": ["trainer.max_epochs=8", "callbacks.early_stopping.patience=3", "data.batch_size=4096"],
    "gat": ["data.batch_size=8192", "trainer.max_epochs=6"],
    "gat_text": ["data.batch_size=8192", "trainer.max_epochs=6"],
    "gears": ["data.batch_size=1024", "trainer.max_epochs=12", "callbacks.early_stopping.patience=4"],
    "gears_text": ["data.batch_size=1024", "trainer.max_epochs=12", "callbacks.early_stopping.patience=4"],
}

def read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS[:-1] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a quality CSV (missing columns {', '.join(missing)})")
    return frame


def done(rows: pd.DataFrame, model: str, dataset: str, seed: int, tasks: tuple[str, ...]) -> bool:
    hit = rows.loc[(rows["model"] == model) & (rows["dataset"] == dataset) & (rows["seed"] == seed)]
    return set(tasks) <= set(hit["task"])


def run_cell(model: str, dataset: str, seed: int, task: str, extra: list[str], runs_dir: Path) -> tuple[list[dict], float]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    import perturb_models  # noqa: F401  (config resolvers)
    from perturb_models.training import git_commit, train

    overrides = [f"model={model}", f"data={dataset}", f"seed={seed}", f"data.task={task}", "logger=none",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(runs_dir / f"{model}-{dataset}-{task}-seed{seed}")
    started = time.time()
    metrics = train(cfg)
    wall = round(time.time() - started, 1)
    commit = git_commit()
    tasks = ("de", "dir") if task == "joint" else (task,)
    rows = []
    for t in tasks:
        rows.append({"model": model, "dataset": dataset, "task": t, "seed": seed,
                     "auroc_per_gene": metrics.get(f"test/{t}_auroc_per_gene", math.nan),
                     "genes_scored": metrics.get(f"test/{t}_genes_scored", math.nan),
                     "commit": commit, "wall_seconds": wall, "overrides": " ".join(extra)})
    return rows, wall


def budget_overrides(model: str, sets: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in CPU_BUDGET["*"] + CPU_BUDGET.get(model, []):
        key, value = item.split("=", 1)
        merged[key] = value
    for item in sets:
        scope, _, assignment = item.partition(":") if ":" in item.split("=", 1)[0] else ("*", "", item)
        if scope in ("*", model):
            key, value = assignment.split("=", 1)
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "gat", "gears", "knn"])
    parser.add_argument("--datasets", nargs="+", default=["k562", "rpe1", "hepg2", "k562_set"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--task", default="joint", choices=["joint", "de", "dir"])
    parser.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="extra Hydra override for every run, or for one model (gat:trainer.max_epochs=3)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: cache/quality_runs)")
    parser.add_argument("--table", action="store_true", help="only regenerate the markdown table")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.table:
        write_doc(read_rows(args.csv), args.doc, README)
        print(results_table(read_rows(args.csv)))
        return 0
    from perturb_models.io import cache_dir

    runs_dir = args.runs_dir or cache_dir("quality_runs")
    tasks = ("de", "dir") if args.task == "joint" else (args.task,)
    # Breadth first: every model and dataset on the first seed before the next seed.
    for seed in args.seeds:
        for dataset in args.datasets:
            for model in args.models:
                rows = read_rows(args.csv)
                if done(rows, model, dataset, seed, tasks):
                    print(f"skip {model} {dataset} seed {seed}: already in {args.csv}")
                    continue
                extra = budget_overrides(model, args.set)
                print(f"run {model} {dataset} seed {seed} ({' '.join(extra)})", flush=True)
                new, wall = run_cell(model, dataset, seed, args.task, extra, runs_dir)
                rows = pd.concat([read_rows(args.csv), pd.DataFrame(new, columns=COLUMNS)], ignore_index=True)
                atomic_write_dataframe(args.csv, rows)
                summary = ", ".join(f"{r['task']} {r['auroc_per_gene']:.4f} ({int(r['genes_scored'])} genes)" for r in new)
                print(f"done {model} {dataset} seed {seed} in {wall:.0f}s: {summary}", flush=True)
                write_doc(rows, args.doc)
    print(results_table(read_rows(args.csv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
