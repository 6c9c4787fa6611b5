"""Retrospective simulation of screen design: which knockdowns to measure next, compared by strategy.

    python benchmarks/design.py                       # K562 and RPE1, seeds 0 1 2, every strategy (resumable)
    python benchmarks/design.py --data k562 --seeds 0 # a part of the grid
    python benchmarks/design.py --doc                 # docs/design.md and docs/design.png from the CSV

For each dataset and seed: the pool is the training perturbations (the validation perturbations carved
by ``seed`` stay out, as in ``train.py``); a seeded 10% of the pool is "measured"; each round the knn
(``model=knn``, task joint: DE and direction from one model) is refitted in-process on the measured
knockdowns only (``perturb_models.design.restrict_context`` + ``refit_encoder``: the retrieval graph and
the votes see nothing else), scored on the full validation and test splits (per-gene AUROC, DE and
direction), and the strategy picks the next 10% of the pool, until the whole pool is measured.
Strategies: ``random``, ``uncertainty``, ``coverage``, ``representative``, ``mix`` at weights 0.25 /
0.5 / 0.75 (the weight is chosen on validation by ``--doc``). Uncertainty is the mean entropy over a seeded subset of
``--target-genes`` downstream genes of the training pairs (never validation or test genes by choice).

Rows go to ``benchmarks/results/design.csv`` as each round finishes (atomically); rerunning skips the
rounds already there (a trajectory is replayed without scoring up to its first missing round).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSV = REPO / "benchmarks" / "results" / "design.csv"
DOC = REPO / "docs" / "design.md"
PLOT = REPO / "docs" / "design.png"
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
STRATEGY_GRID = ("uncertainty", "mix:0.5", "random", "coverage", "mix:0.25", "mix:0.75", "representative")
COLUMNS = [
    "dataset",
    "task",
    "strategy",
    "weight",
    "seed",
    "round",
    "fraction",
    "n_perts",
    "pool",
    "val_auroc_per_gene",
    "test_auroc_per_gene",
    "val_genes_scored",
    "test_genes_scored",
    "target_genes",
    "model",
    "commit",
    "wall_seconds",
]


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_strategy(text: str) -> tuple[str, float]:
    """``mix:0.5`` -> ("mix", 0.5); other names have no weight (NaN)."""
    name, _, weight = text.partition(":")
    return name, float(weight) if weight else (0.5 if name == "mix" else math.nan)


def append_rows(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    from perturb_models.io import atomic_write_dataframe

    new = pd.DataFrame(rows, columns=COLUMNS)
    frame = pd.concat([pd.read_csv(path), new], ignore_index=True) if path.is_file() else new
    atomic_write_dataframe(path, frame)


def done_rounds(path: Path, dataset: str, seed: int, strategy: str, weight: float, model: str) -> set[int]:
    import pandas as pd

    if not path.is_file():
        return set()
    frame = pd.read_csv(path)
    same = (
        (frame["dataset"] == dataset)
        & (frame["seed"] == seed)
        & (frame["strategy"] == strategy)
        & (frame["model"] == model)
    )
    same &= frame["weight"].isna() if math.isnan(weight) else (frame["weight"] - weight).abs() < 1e-9
    rows = frame.loc[same]
    # A round is done when both tasks' rows are there.
    counts = rows.groupby("round")["task"].nunique()
    return set(int(r) for r in counts.index[counts >= 2])


def simulate(
    dataset: str,
    seed: int,
    strategies: list[str],
    fractions=FRACTIONS,
    target_genes: int = 128,
    csv: Path = CSV,
    overrides: list[str] | None = None,
    progress=None,
) -> int:
    """Run the rounds of every strategy for one dataset and seed that ``csv`` does not hold yet; returns the
    number of rounds scored."""
    import numpy as np

    from perturb_models.builders import build_datamodule
    from perturb_models.config import compose_config
    from perturb_models.console import say
    from perturb_models.design import (
        GOSimilarity,
        encoder_scores,
        go_term_sets,
        pool_uncertainty,
        refit_encoder,
        restrict_context,
        score_stage,
        select_batch,
    )

    cfg = compose_config("train", ["model=knn", f"data={dataset}", f"seed={seed}", "logger=none", *(overrides or [])])
    model_name = str(cfg.model.name)
    todo = []
    for text in strategies:
        name, weight = parse_strategy(text)
        done = done_rounds(csv, dataset, seed, name, weight, model_name)
        if len(done) < len(fractions):
            todo.append((name, weight, done))
    if not todo:
        return 0
    datamodule = build_datamodule(cfg.data)
    context = datamodule.context
    pool = np.array(context.train_perts, dtype=object)
    n = len(pool)
    sizes = [max(1, int(round(f * n))) for f in fractions]
    initial = np.sort(np.random.default_rng([seed, 0]).choice(n, size=sizes[0], replace=False))
    from omegaconf import OmegaConf

    graphs = OmegaConf.to_container(cfg.model.encoder.get("graphs"), resolve=True)
    similarity = GOSimilarity(
        go_term_sets(list(pool), graphs, None, bool(cfg.knowledge.allow_download), context=context)
    )
    genes = np.array(sorted(context.train_pairs["gene"].unique()), dtype=object)
    targets = np.sort(np.random.default_rng([seed, 1]).choice(genes, size=min(target_genes, len(genes)), replace=False))
    target_idx = context.vocab.encode(list(targets))
    pool_idx = context.vocab.encode(list(pool))
    scored = 0
    for name, weight, done in todo:
        measured = initial.copy()
        rng = np.random.default_rng([seed, 2])
        for round_, size in enumerate(sizes):
            began = time.perf_counter()
            last = round_ == len(sizes) - 1
            if all(r in done for r in range(round_, len(sizes))):
                break
            encoder = refit_encoder(
                cfg.model.encoder, restrict_context(context, pool[measured]), cache_graphs=size == n
            )
            if round_ not in done:
                val, test = score_stage(encoder, datamodule, "val"), score_stage(encoder, datamodule, "test")
                wall = time.perf_counter() - began
                rows = [
                    {
                        "dataset": dataset,
                        "task": task,
                        "strategy": name,
                        "weight": weight,
                        "seed": seed,
                        "round": round_,
                        "fraction": fractions[round_],
                        "n_perts": len(measured),
                        "pool": n,
                        "val_auroc_per_gene": val[f"{task}_auroc_per_gene"],
                        "test_auroc_per_gene": test[f"{task}_auroc_per_gene"],
                        "val_genes_scored": val[f"{task}_genes_scored"],
                        "test_genes_scored": test[f"{task}_genes_scored"],
                        "target_genes": len(targets),
                        "model": model_name,
                        "commit": commit(),
                        "wall_seconds": round(wall, 2),
                    }
                    for task in ("de", "dir")
                ]
                scored += 1
                label = name if math.isnan(weight) else f"{name}:{weight:g}"
                say(
                    f"[{dataset} seed {seed} {label} {fractions[round_]:.0%} ({len(measured)} perts)] "
                    f"val de {val['de_auroc_per_gene']:.4f} dir {val['dir_auroc_per_gene']:.4f} | "
                    f"test de {test['de_auroc_per_gene']:.4f} dir {test['dir_auroc_per_gene']:.4f} ({wall:.1f} s)"
                )
                if progress is not None:
                    progress.update(1)
            if last:
                if round_ not in done:
                    append_rows(csv, rows)
                break
            open_ = np.setdiff1d(np.arange(n), measured)
            uncertainty = None
            if name in ("uncertainty", "mix"):
                uncertainty = np.zeros(n)
                uncertainty[open_] = pool_uncertainty(
                    lambda p, g, encoder=encoder: encoder_scores(encoder, context.task, p, g),
                    pool_idx[open_],
                    target_idx,
                )
            picks = select_batch(
                name,
                sizes[round_ + 1] - len(measured),
                np.arange(n),
                measured,
                rng=rng,
                uncertainty=uncertainty,
                similarity=similarity,
                weight=0.5 if math.isnan(weight) else weight,
            )
            if round_ not in done:
                rows[0]["wall_seconds"] = rows[1]["wall_seconds"] = round(time.perf_counter() - began, 2)
                append_rows(csv, rows)
            measured = np.sort(np.concatenate([measured, picks]))
    return scored


# ---- the document -----------------------------------------------------------------------------------


def label_of(strategy: str, weight: float) -> str:
    return (
        strategy if (weight is None or (isinstance(weight, float) and math.isnan(weight))) else f"{strategy}:{weight:g}"
    )


def choose_mix_weight(frame):
    """The mix weight of highest mean validation per-gene AUROC over datasets, tasks, seeds and the rounds
    where strategies differ (neither the seeded start nor the full pool). Returns (weight, table)."""
    mix = frame.loc[(frame["strategy"] == "mix") & (frame["round"] > 0) & (frame["fraction"] < 1.0)]
    table = mix.groupby("weight")["val_auroc_per_gene"].mean()
    return float(table.idxmax()), table


def reach_fraction(means, target: float):
    """The smallest fraction whose mean test figure is at least ``target`` (None if none)."""
    hits = means.loc[means >= target - 1e-12]
    return float(hits.index.min()) if len(hits) else None


def write_doc(csv: Path = CSV, doc: Path = DOC, plot: Path = PLOT) -> str:
    import pandas as pd

    from perturb_models.io import atomic_write_text

    frame = pd.read_csv(csv)
    weight, weight_table = choose_mix_weight(frame)
    frame["label"] = [label_of(s, w) for s, w in zip(frame["strategy"], frame["weight"])]
    shown = ["random", "uncertainty", "coverage", label_of("mix", weight), "representative"]
    frame = frame.loc[frame["label"].isin(shown)]
    seeds = sorted(frame["seed"].unique())
    lines = [
        "<!-- generated by python benchmarks/design.py --doc from benchmarks/results/design.csv; do not edit -->",
        "",
        f"Test per-gene AUROC of a knn refitted on the measured knockdowns, by strategy and share of the pool measured "
        f"(mean ± sd over seeds {', '.join(str(s) for s in seeds)}; rows per cell may differ while the grid runs). "
        f"`mix` is `{label_of('mix', weight)}`: its weight was chosen on validation, the highest mean validation "
        "per-gene AUROC over datasets, tasks, seeds and rounds 20-90%:",
        "",
        "| mix weight | mean validation per-gene AUROC |",
        "| --- | --- |",
        *[f"| {w:g} | {v:.4f} |" for w, v in weight_table.items()],
        "",
    ]
    middle = frame.loc[(frame["round"] > 0) & (frame["fraction"] < 1.0)]
    by_val = middle.groupby(["label", "dataset", "task"])["val_auroc_per_gene"].mean().unstack(["dataset", "task"])
    by_val["mean"] = by_val.mean(axis=1)
    by_val = by_val.sort_values("mean", ascending=False)
    lines += [
        "Validation per-gene AUROC by strategy, mean over seeds and rounds 20-90% (what the choice of a "
        "default strategy reads; never the test figures):",
        "",
        "| strategy | " + " | ".join(f"{d} {t}" for d, t in by_val.columns[:-1]) + " | mean |",
        "| --- | " + " | ".join("---" for _ in by_val.columns) + " |",
        *[f"| {label} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for label, row in by_val.iterrows()],
        "",
    ]
    fractions = sorted(frame["fraction"].unique())
    goal = [
        "The goal: a strategy that reaches random's full-pool test figure with at most half of the pool "
        "measured. Per dataset and task, the earliest share at which a strategy's mean test figure reaches it:",
        "",
    ]
    for (dataset, task), rows in frame.groupby(["dataset", "task"], sort=True):
        stats = rows.groupby(["label", "fraction"])["test_auroc_per_gene"].agg(["mean", "std", "count"])
        if ("random", 1.0) not in stats.index:
            continue
        target = stats.loc[("random", 1.0), "mean"]
        pool = int(rows["pool"].iloc[0])
        lines += [
            f"### {dataset}, {task} (pool {pool:,} knockdowns; random at 100%: {target:.4f})",
            "",
            "| strategy | " + " | ".join(f"{f:.0%}" for f in fractions) + " | reaches random's 100% at |",
            "| --- | " + " | ".join("---" for _ in fractions) + " | --- |",
        ]
        reached: list[tuple[float, str]] = []
        for label in shown:
            if label not in stats.index.get_level_values(0):
                continue
            cells = []
            for f in fractions:
                if (label, f) in stats.index:
                    row = stats.loc[(label, f)]
                    sd = "" if pd.isna(row["std"]) else f" ± {row['std']:.4f}"
                    cells.append(f"{row['mean']:.4f}{sd}")
                else:
                    cells.append("")
            reach = reach_fraction(stats.loc[label]["mean"], target)
            reached.append((reach if reach is not None else 2.0, label))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {'never' if reach is None else f'{reach:.0%}'} |")
        lines.append("")
        best = min(reached)
        others = sorted(label for f, label in reached if f == best[0])
        goal.append(
            f"- {dataset}, {task}: {', '.join(others)} at {best[0]:.0%}"
            + (" (goal met)" if best[0] <= 0.5 else " (goal not met)")
        )
    lines += [*goal, ""]
    write_plot(frame, shown, plot)
    text = "\n".join(lines)
    page = doc.read_text() if doc.is_file() else ""
    start, end = "<!-- design-results:start -->", "<!-- design-results:end -->"
    if start in page and end in page:
        head, rest = page.split(start, 1)
        _, tail = rest.split(end, 1)
        page = f"{head}{start}\n{text}\n{end}{tail}"
    else:
        page = f"# Choose the next screen\n\n{start}\n{text}\n{end}\n"
    atomic_write_text(doc, page)
    return text


def write_plot(frame, shown: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # the notebook extra
        raise SystemExit(f"--doc draws docs/design.png with matplotlib: pip install -e '.[notebook]' ({exc})") from exc
    groups = sorted(frame.groupby(["dataset", "task"]).groups)
    cols = 2
    rows_n = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (dataset, task) in zip(axes.ravel(), groups):
        rows = frame.loc[(frame["dataset"] == dataset) & (frame["task"] == task)]
        for label in shown:
            stats = rows.loc[rows["label"] == label].groupby("fraction")["test_auroc_per_gene"].agg(["mean", "std"])
            if stats.empty:
                continue
            x = stats.index.to_numpy() * 100
            ax.plot(x, stats["mean"], marker="o", markersize=3, label=label)
            ax.fill_between(
                x, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0), alpha=0.15
            )
        full = rows.loc[(rows["label"] == "random") & (rows["fraction"] == 1.0), "test_auroc_per_gene"]
        if len(full):
            ax.axhline(full.mean(), color="grey", linestyle="--", linewidth=1, label="random, 100%")
        ax.axvline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{dataset}, {task}")
        ax.set_xlabel("% of the training pool measured")
        ax.set_ylabel("test per-gene AUROC")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(groups) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=["k562", "rpe1"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--strategies", nargs="*", default=list(STRATEGY_GRID), help="random uncertainty coverage mix:WEIGHT ..."
    )
    parser.add_argument("--target-genes", type=int, default=128, help="downstream genes the uncertainty averages over")
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--override", action="append", default=[], help="a train.py override (e.g. model.encoder.k=50)")
    parser.add_argument("--doc", action="store_true", help="write docs/design.md and docs/design.png from the CSV")
    parser.add_argument("--doc-path", type=Path, default=DOC)
    parser.add_argument("--plot-path", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    if args.doc:
        print(write_doc(args.csv, args.doc_path, args.plot_path))
        return 0
    from tqdm.auto import tqdm

    from perturb_models.console import stdout_is_terminal

    for text in args.strategies:
        from perturb_models.design import check_request

        check_request(
            parse_strategy(text)[0], 1, 0.5 if math.isnan(parse_strategy(text)[1]) else parse_strategy(text)[1]
        )
    total = len(args.data) * len(args.seeds) * len(args.strategies) * len(FRACTIONS)
    with tqdm(total=total, desc="rounds", disable=not stdout_is_terminal()) as progress:
        for seed in args.seeds:  # seed-major: every dataset's seed 0 first
            for dataset in args.data:
                simulate(
                    dataset,
                    seed,
                    args.strategies,
                    target_genes=args.target_genes,
                    csv=args.csv,
                    overrides=args.override,
                    progress=progress,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
