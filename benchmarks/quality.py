"""Quality grid: models x datasets x seeds through ``perturb_models.training.train``, one ``joint`` run per
cell giving both the ``de`` and the ``dir`` row; rows appended to ``benchmarks/results/quality.csv``.

    python benchmarks/quality.py --models mlp gat gears knn --datasets k562 rpe1 hepg2 k562_set --seeds 0 1 2
    python benchmarks/quality.py --table          # only regenerate docs/results.md from the CSV

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

from perturb_models.io import atomic_write_dataframe, atomic_write_text  # noqa: E402

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

# PerturbQA paper, Table 1 (test split, per-gene AUROC), as listed in the data README.
PUBLISHED = {
    ("de", "k562"): {"best": (0.62, "SUMMER"), "GAT": 0.53, "MLP": 0.48, "GEARS": 0.55, "GenePT-Gene": 0.57},
    ("de", "rpe1"): {"best": (0.59, "SUMMER, Retrieval"), "GAT": 0.55, "MLP": 0.51, "GEARS": 0.49, "GenePT-Gene": 0.55},
    ("de", "hepg2"): {"best": (0.62, "SUMMER"), "GAT": 0.58, "MLP": 0.51, "GEARS": 0.48, "GenePT-Gene": 0.56},
    ("de", "jurkat"): {"best": (0.59, "SUMMER"), "GAT": 0.51, "MLP": 0.49, "GEARS": 0.51},
    ("de", "k562_set"): {"best": (0.66, "Retrieval"), "GAT": 0.55, "MLP": 0.49, "GEARS": 0.50, "GenePT-Gene": 0.58},
    ("dir", "k562"): {"best": (0.69, "Retrieval"), "GAT": 0.59, "MLP": 0.53, "GEARS": 0.67, "GenePT-Gene": 0.49},
    ("dir", "rpe1"): {"best": (0.64, "SUMMER"), "GAT": 0.60, "MLP": 0.51, "GEARS": 0.61, "GenePT-Gene": 0.61},
    ("dir", "hepg2"): {"best": (0.66, "SUMMER"), "GAT": 0.63, "MLP": 0.49, "GEARS": 0.52, "GenePT-Gene": 0.61},
    ("dir", "jurkat"): {"best": (0.67, "SUMMER"), "GAT": 0.58, "MLP": 0.45, "GEARS": 0.52},
    ("dir", "k562_set"): {"best": (0.70, "SUMMER, GEARS"), "GAT": 0.51, "MLP": 0.48, "GEARS": 0.70, "GenePT-Gene": 0.54},
}


def read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS[:-1] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a quality CSV (missing columns {', '.join(missing)})")
    return frame


def full_test(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows scored on the whole test split: subset rows (``data.test_genes=``, from llm_quality.py) are
    reported in docs/llm.md, never averaged with full-test figures nor taken as a grid cell done."""
    return rows.loc[~rows["overrides"].fillna("").str.contains("data.test_genes=")]


def done(rows: pd.DataFrame, model: str, dataset: str, seed: int, tasks: tuple[str, ...]) -> bool:
    rows = full_test(rows)
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


def results_table(rows: pd.DataFrame) -> str:
    """Markdown: mean (sd, n seeds) per model x column, with the published numbers beside them."""
    rows = full_test(rows)
    if rows.empty:
        return "_no rows in quality.csv yet_\n"
    datasets = [d for d in ["k562", "rpe1", "hepg2", "jurkat", "k562_set"] if d in set(rows["dataset"])]
    datasets += sorted(set(rows["dataset"]) - set(datasets))
    lines = []
    for task, title in (("de", "DE"), ("dir", "direction")):
        lines += [f"### {title} (test per-gene AUROC; mean ± sd over seeds, n seeds)", "",
                  "| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        for model in sorted(set(rows["model"])):
            cells = []
            for d in datasets:
                vals = rows.loc[(rows["model"] == model) & (rows["dataset"] == d) & (rows["task"] == task), "auroc_per_gene"]
                vals = vals.dropna().astype(float)
                if vals.empty:
                    cells.append("–")
                else:
                    sd = f" ± {vals.std():.3f}" if len(vals) > 1 else ""
                    cells.append(f"{vals.mean():.3f}{sd} ({len(vals)})")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        for name in ("GAT", "GEARS", "MLP", "GenePT-Gene"):
            cells = [f"{PUBLISHED[(task, d)][name]:.2f}" if name in PUBLISHED.get((task, d), {}) else "–" for d in datasets]
            lines.append(f"| published {name} | " + " | ".join(cells) + " |")
        cells = [f"{PUBLISHED[(task, d)]['best'][0]:.2f} ({PUBLISHED[(task, d)]['best'][1]})" if (task, d) in PUBLISHED
                 else "–" for d in datasets]
        lines.append("| published best | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_doc(rows: pd.DataFrame, path: Path) -> None:
    text = ("# Results on PerturbQA\n\nGenerated by `python benchmarks/quality.py --table` from "
            "`benchmarks/results/quality.csv` (each row: one test run; settings in its `overrides` column). "
            "Published numbers: PerturbQA paper, Table 1.\n\n" + results_table(rows))
    atomic_write_text(path, text)


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
        write_doc(read_rows(args.csv), args.doc)
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
