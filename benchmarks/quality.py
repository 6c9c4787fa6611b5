"""Quality grid: models x datasets x seeds through ``perturb_models.training.train``, one ``joint`` run per
cell giving both the ``de`` and the ``dir`` row; rows appended to ``benchmarks/results/quality.csv``.

    python benchmarks/quality.py --models mlp gat gears knn --datasets k562 rpe1 hepg2 k562_set --seeds 0 1 2
    python benchmarks/quality.py --table          # only regenerate docs/results.md and README's table from the CSV

Resumable: a (model, dataset, task, seed) already in the CSV is skipped (with ``--fill-intervals``, only
if the row has its bootstrap interval: rows made before intervals existed are rerun and replaced). ``--rerun``
reruns the stored rows of the chosen models, datasets and seeds, each with its own overrides, and replaces them.
Every run uses the model's default config plus the grid's budget overrides (``--set``, and the CPU budget
below), recorded per row in the ``overrides`` column. Needs the PerturbQA files ($PERTURBQA_DATA) and, for graph models,
the knowledge files ($PERTURB_KNOWLEDGE).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The tables (docs/results.md, the README block) are made by docs_tables.py, one code path for both.
from docs_tables import (  # noqa: E402
    PUBLISHED,
    README,
    awaits_rerun,
    full_test,
    interval_text,
    seed_interval,
    write_doc,
)
from docs_tables import quality_table as results_table  # noqa: E402

from perturb_models.errors import cli_errors  # noqa: E402
from perturb_models.io import atomic_write_dataframe, atomic_write_text  # noqa: E402
from perturb_models.knowledge.gene_info import RESOLUTION_VERSION  # noqa: E402

# auroc_per_gene is the test figure (reported, never used to choose anything); val_auroc_per_gene is the
# validation figure of the same run (the selected checkpoint), the only one selection code reads.
# ci_low/ci_high: the 95% bootstrap interval of the test figure over test perturbations (1,000 resamples,
# perturb_models.metrics), computed when the row is made, from the run's predictions.
COLUMNS = [
    "model",
    "dataset",
    "task",
    "seed",
    "auroc_per_gene",
    "genes_scored",
    "commit",
    "wall_seconds",
    "overrides",
    "val_auroc_per_gene",
    "ci_low",
    "ci_high",
    "paired",
    "resolution",
]
# paired: the row's paired difference with other runs on the same test pairs and resamples, JSON
# {"run": [difference, low, high, p_value]}: an ensemble's members (loco.csv), knn for llm_quality.py's rows.
OPTIONAL = (
    "overrides",
    "val_auroc_per_gene",
    "recipe",
    "weights",
    "ci_low",
    "ci_high",
    "paired",
    "resolution",
    "from_step",
)
# resolution: the symbol-resolution version (perturb_models.knowledge.gene_info.RESOLUTION_VERSION) the row's
# knowledge was read with; empty for rows from before the column (version 1).
# weights: the ensemble's combination weights per member (fitted on validation), for the docs.
# from_step (llm_curve.csv): the step a point's training started from; empty in rows from before the column.
LOCO_COLUMNS = ["model", "recipe", *COLUMNS[1:], "weights"]
DEFAULT_CSV = REPO / "benchmarks" / "results" / "quality.csv"
DEFAULT_LOCO_CSV = REPO / "benchmarks" / "results" / "loco.csv"
LINES = ["k562", "rpe1", "hepg2", "k562_set"]

# The leave-one-cell-line-out search space: a few cheap recipes per family (model.* overrides only, so an
# ensemble can rebuild a member from its recipe), run on every line; each held-out line gets the recipe with
# the best mean validation figure on the other three.
LOCO_SEARCH: dict[str, dict[str, list[str]]] = {
    "knn": {
        "k50_s1": ["model.encoder.k=50", "model.encoder.shrinkage=1.0"],
        "k50_s5": ["model.encoder.k=50", "model.encoder.shrinkage=5.0"],
        "k100_s1": ["model.encoder.k=100", "model.encoder.shrinkage=1.0"],
        "k100_s5": ["model.encoder.k=100", "model.encoder.shrinkage=5.0"],
        "k100_s20": ["model.encoder.k=100", "model.encoder.shrinkage=20.0"],
    },
    "gears": {
        "neighbours": ["model.encoder.pert_include_self=false"],
        "self": ["model.encoder.pert_include_self=true"],
    },
    "embedding_mlp": {
        "default": [],
    },
}
ENSEMBLE_MEMBERS = ("knn", "gears", "embedding_mlp")
# The ensemble's search space: its combiners (model.encoder.combiner), each with the guard on; the held-out
# line's combiner is the one with the best mean cross-fitted validation figure on the other lines.
ENSEMBLE_COMBINERS = ("loglik", "rank")
DEFAULT_DOC = REPO / "docs" / "results.md"
DEFAULT_LOCO_DOC = REPO / "docs" / "loco.md"

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


def read_rows(path: Path, columns: list[str] = COLUMNS) -> pd.DataFrame:
    """The rows of a results CSV; columns added since it was written (``val_auroc_per_gene``) come back empty."""
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    # commit hashes such as 484e152 must stay text, not become floats
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"commit": str})
    missing = [c for c in columns if c not in frame.columns and c not in OPTIONAL]
    if missing:
        raise ValueError(f"{path}: not a quality CSV (missing columns {', '.join(missing)})")
    for column in columns:
        if column not in frame.columns:
            frame[column] = math.nan
    return frame[columns + [c for c in frame.columns if c not in columns]]


def done(rows: pd.DataFrame, model: str, dataset: str, seed: int, tasks: tuple[str, ...], args=None) -> bool:
    rows = full_test(rows)
    hit = rows.loc[(rows["model"] == model) & (rows["dataset"] == dataset) & (rows["seed"] == seed)]
    return set(tasks) <= set(complete(hit, args)["task"])


def complete(rows: pd.DataFrame, args=None, paired: bool = False) -> pd.DataFrame:
    """The rows that need no rerun: all of them; with ``--fill-intervals`` those that have their interval (and,
    for ``paired`` ensemble rows, their paired differences with the members); with ``--rerun-stale`` those made
    with the code's symbol resolution."""
    keep = pd.Series(True, index=rows.index)
    if args is not None and getattr(args, "fill_intervals", False):
        keep &= rows["ci_low"].notna() if "ci_low" in rows.columns else False
        if paired:
            keep &= rows["paired"].notna() if "paired" in rows.columns else False
    if args is not None and getattr(args, "rerun_stale", False):
        keep &= ~awaits_rerun(rows)
    return rows.loc[keep]


def run_cell(
    model: str, dataset: str, seed: int, task: str, extra: list[str], runs_dir: Path, run_name: str | None = None
) -> tuple[list[dict], float]:
    from perturb_models.config import compose_config
    from perturb_models.outputs import git_commit
    from perturb_models.training import train

    overrides = [
        f"model={model}",
        f"data={dataset}",
        f"seed={seed}",
        f"data.task={task}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *extra,
    ]
    cfg = compose_config("train", overrides, runs_dir / (run_name or f"{model}-{dataset}-{task}-seed{seed}"))
    started = time.time()
    metrics = train(cfg)
    wall = round(time.time() - started, 1)
    commit = git_commit()
    tasks = ("de", "dir") if task == "joint" else (task,)
    intervals = test_intervals(Path(cfg.paths.output_dir))
    rows = []
    for t in tasks:
        interval = intervals.get(t)
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "task": t,
                "seed": seed,
                "auroc_per_gene": metrics.get(f"test/{t}_auroc_per_gene", math.nan),
                "genes_scored": metrics.get(f"test/{t}_genes_scored", math.nan),
                "commit": commit,
                "wall_seconds": wall,
                "overrides": " ".join(extra),
                "val_auroc_per_gene": metrics.get(f"val/{t}_auroc_per_gene", math.nan),
                "ci_low": interval.low if interval else math.nan,
                "ci_high": interval.high if interval else math.nan,
                "resolution": RESOLUTION_VERSION,
            }
        )
    return rows, wall


def test_intervals(run_dir: Path) -> dict:
    """The 95% bootstrap interval of each task's test figure, from the run's ``predictions/test.csv``."""
    from perturb_models.metrics import intervals_from_predictions

    path = run_dir / "predictions" / "test.csv"
    return intervals_from_predictions(pd.read_csv(path)) if path.is_file() else {}


def attach_intervals(
    csv: Path, run_dir: Path, columns: list[str] = COLUMNS, paired_with: dict[str, Path] | None = None
) -> pd.DataFrame:
    """Fill ``ci_low``/``ci_high`` of the rows that ``run_dir`` made (same dataset and seed, and the very
    test figure of its ``metrics.json``), from its ``predictions/test.csv``: a row whose run folder is still
    at hand gets its interval without a rerun. ``paired_with`` (name -> run folder on the same test pairs)
    also fills the rows' ``paired`` differences."""
    info = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    intervals = test_intervals(run_dir)
    if not intervals:
        raise SystemExit(f"{run_dir}: no predictions/test.csv to compute an interval from")
    rows = read_rows(csv, columns)
    paired = paired_with_members(run_dir, paired_with, tuple(intervals)) if paired_with else {}
    for task, interval in intervals.items():
        figure = metrics.get(f"test/{task}_auroc_per_gene")
        hit = (
            (rows["dataset"] == info["dataset"])
            & (rows["seed"] == info["seed"])
            & (rows["task"] == task)
            & (rows["auroc_per_gene"].astype(float) == figure)
        )
        if hit.sum() != 1:
            raise SystemExit(
                f"{run_dir}: {hit.sum()} rows of {csv} report its {task} figure {figure} "
                f"({info['dataset']}, seed {info['seed']}); expected exactly one"
            )
        rows.loc[hit, ["ci_low", "ci_high"]] = [interval.low, interval.high]
        if task in paired:
            rows.loc[hit, "paired"] = paired[task]
        print(
            f"{csv}: {rows.loc[hit, 'model'].item()} {info['dataset']} {task} seed {info['seed']} "
            f"{figure:.4f} [{interval.low:.4f}, {interval.high:.4f}] from {run_dir}"
        )
    atomic_write_dataframe(csv, rows)
    return rows


def paired_with_members(run_dir: Path, members: dict[str, Path], tasks: tuple[str, ...]) -> dict[str, str]:
    """Per task, JSON ``{member: [difference, low, high, p_value]}``: the ensemble's test figure minus each
    member run's, paired on the same test pairs and resamples."""
    from perturb_models.metrics import paired_bootstrap

    ours = pd.read_csv(run_dir / "predictions" / "test.csv")
    out = {}
    for task in tasks:
        table = {}
        for name, member_dir in members.items():
            theirs = pd.read_csv(member_dir / "predictions" / "test.csv")
            d = paired_bootstrap(ours, theirs, task)
            table[name] = [round(v, 6) for v in (d.difference, d.low, d.high, d.p_value)]
        out[task] = json.dumps(table, sort_keys=True)
    return out


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


def loco_table(rows: pd.DataFrame) -> str:
    """Markdown: per family, the held-out line's test figure of the recipe chosen on the other lines' validation."""
    from perturb_models.selection import loco_choices

    if rows.empty:
        return "_no rows in loco.csv yet_\n"
    lines_present = [d for d in LINES if d in set(rows["dataset"])]
    families = [m for m in [*LOCO_SEARCH, "ensemble"] if m in set(rows["model"])]
    held = {}  # (family, line) -> (recipe, {task: list of test figures})
    for family in families:
        part = rows.loc[rows["model"] == family]
        if family == "ensemble":
            # The run whose members are the current LOCO choices for that line, with the combiner chosen on
            # the other lines' validation (rows from before combiners existed: their linear pool).
            choices = {}
            for d in lines_present:
                try:
                    members = ensemble_choices(rows, d)
                except ValueError:
                    continue
                try:
                    choices[d] = ensemble_recipe(members, combiner_choice(rows, d))
                except ValueError:
                    choices[d] = ensemble_recipe(members)
        else:
            try:
                choices = loco_choices(rows, family, lines_present)
            except ValueError:
                continue
        for d, recipe in choices.items():
            hit = part.loc[(part["dataset"] == d) & (part["recipe"] == recipe)]
            held[(family, d)] = (
                recipe,
                {t: hit.loc[(hit["task"] == t) & hit["auroc_per_gene"].notna()] for t in ("de", "dir")},
            )
    out = []
    for task, title in (("de", "DE"), ("dir", "direction")):
        out += [
            f"### LOCO, {title} (held-out line's test per-gene AUROC; recipe chosen on the other lines' "
            "validation; mean over seeds, n seeds)",
            "",
            "| model | " + " | ".join(lines_present) + " |",
            "|---|" + "---|" * len(lines_present),
        ]
        best_single = {}  # line -> (mean, family)
        for family in families:
            cells = []
            for d in lines_present:
                if (family, d) not in held or held[(family, d)][1][task].empty:
                    cells.append("–")
                    continue
                recipe, figures = held[(family, d)]
                mean = float(figures[task]["auroc_per_gene"].astype(float).mean())
                if family != "ensemble" and mean > best_single.get(d, (-1.0, None))[0]:
                    best_single[d] = (mean, family)
                cells.append(f"{mean:.3f} ({len(figures[task])}; {recipe}){interval_text(figures[task])}")
            out.append(f"| {family} | " + " | ".join(cells) + " |")
        cells = [
            f"{PUBLISHED[(task, d)]['best'][0]:.2f} ({PUBLISHED[(task, d)]['best'][1]})"
            if (task, d) in PUBLISHED
            else "–"
            for d in lines_present
        ]
        out.append("| published best | " + " | ".join(cells) + " |")
        goal, sure = [], []
        for d in lines_present:
            figures = held.get(("ensemble", d), (None, {}))[1].get(task)
            if figures is None or figures.empty or (task, d) not in PUBLISHED or d not in best_single:
                goal.append("–")
                sure.append("–")
                continue
            mean = float(figures["auroc_per_gene"].astype(float).mean())
            published = PUBLISHED[(task, d)]["best"][0]
            above_published = mean - published
            single_mean, single = best_single[d]
            vs_single = mean - single_mean
            met = above_published >= GOAL_ABOVE_PUBLISHED and vs_single >= -GOAL_BELOW_SINGLE
            goal.append(f"{above_published:+.3f} / {vs_single:+.3f} ({'met' if met else 'not met'})")
            sure.append(goal_with_intervals(figures, published, single))
        out.append("| ensemble − published best / − best single LOCO model | " + " | ".join(goal) + " |")
        out.append("| the same with 95% intervals (ensemble's; paired with that member) | " + " | ".join(sure) + " |")
        out.append("")
    out.append(GOAL_NOTE)
    return "\n".join(out)


GOAL_ABOVE_PUBLISHED, GOAL_BELOW_SINGLE = 0.03, 0.01
GOAL_NOTE = (
    "Goal: at least +.03 over the published best and at most .01 below the best single LOCO model. With "
    "intervals: *holds* when the whole 95% interval meets the goal (ensemble's interval for the published "
    "figure, which is a fixed number; the paired interval of the difference with the best single model, same "
    "test pairs and resamples), *fails* when the whole interval misses it, *unsure* when it straddles. "
    "Intervals are the mean of the seeds' bounds; `n/m` says how many seeds have one.\n"
)


def verdict(low: float, high: float, threshold: float) -> str:
    return "holds" if low >= threshold else "fails" if high < threshold else "unsure"


def goal_with_intervals(rows: pd.DataFrame, published: float, single: str) -> str:
    """The LOCO goal cell read with intervals: the ensemble's own interval against published + .03, its
    paired difference with the best single model against -.01 (seeds' mean of the bounds)."""
    low, high, n = seed_interval(rows)
    if n == 0:
        return "no interval yet"
    parts = [
        f"[{low - published:+.3f}, {high - published:+.3f}] "
        f"{verdict(low - published, high - published, GOAL_ABOVE_PUBLISHED)}"
    ]
    paired = (
        [json.loads(p)[single] for p in rows["paired"].dropna() if single in json.loads(p)]
        if "paired" in rows.columns
        else []
    )
    if paired:
        diff_low = sum(p[1] for p in paired) / len(paired)
        diff_high = sum(p[2] for p in paired) / len(paired)
        p_values = ", ".join(f"{p[3]:.2g}" for p in paired)
        parts.append(
            f"vs {single} [{diff_low:+.3f}, {diff_high:+.3f}] (p {p_values}) "
            f"{verdict(diff_low, diff_high, -GOAL_BELOW_SINGLE)}"
        )
    else:
        parts.append(f"vs {single}: no paired interval yet")
    return " / ".join(parts) + f" ({n}/{len(rows)})"


def loco_recipes_text(rows: pd.DataFrame) -> str:
    """Markdown: each family's recipes with their mean validation figure per line (what the choices read)."""
    from perturb_models.selection import recipe_scores

    lines_present = [d for d in LINES if d in set(rows["dataset"])]
    out = [
        "| model | recipe | overrides | " + " | ".join(f"val {d}" for d in lines_present) + " |",
        "|---|---|---|" + "---|" * len(lines_present),
    ]
    for family, recipes in LOCO_SEARCH.items():
        for recipe, overrides in recipes.items():
            cells = []
            for d in lines_present:
                score = recipe_scores(rows, family, [d]).get(recipe, math.nan)
                cells.append("–" if math.isnan(score) else f"{score:.4f}")
            out.append(
                f"| {family} | {recipe} | `{' '.join(overrides) or '(config default)'}` | " + " | ".join(cells) + " |"
            )
    return "\n".join(out) + "\n"


def defaults_text(rows: pd.DataFrame) -> str:
    """Markdown: per family, the recipe with the best mean validation figure over every line, and the config default."""
    from perturb_models.selection import choose_recipe, recipe_scores

    lines_present = [d for d in LINES if d in set(rows["dataset"])]
    out = [
        "| model | best recipe on all lines' validation (mean) | `conf/model/` default recipe (mean) |",
        "|---|---|---|",
    ]
    for family, recipes in LOCO_SEARCH.items():
        if family not in set(rows["model"]):
            continue
        scores = recipe_scores(rows, family, lines_present)
        try:
            best = choose_recipe(rows, family, lines_present)
        except ValueError:
            continue
        default = next((r for r, o in recipes.items() if is_default_recipe(family, o)), None)
        shown = (
            "none of the searched recipes" if default is None else f"{default} ({scores.get(default, math.nan):.4f})"
        )
        out.append(f"| {family} | {best} ({scores[best]:.4f}) | {shown} |")
    ensembles = combiner_rows(rows)
    if not ensembles.empty:
        scores = recipe_scores(ensembles, "ensemble", lines_present)
        try:
            best = choose_recipe(ensembles, "ensemble", lines_present)
        except ValueError:
            best = None
        if best is not None:
            default = default_combiner()
            out.append(
                f"| ensemble (combiner; cross-fitted validation) | {best} ({scores[best]:.4f}) | "
                f"{default} ({scores.get(default, math.nan):.4f}) |"
            )
    return "\n".join(out) + "\n"


CHOICES_TEXT = """## How choices are made

Only validation figures choose anything; test figures are written and reported, never read by selection code.

- Checkpoint and early stopping: `optimized_metric` (validation per-gene AUROC, `conf/train.yaml`).
- Sweeps (`conf/sweep/optuna_*.yaml`, `sweeps/wandb_*.yaml`): the objective is that validation metric
  (`tests/test_sweep.py` checks the best value is the best trial's validation figure).
- Recipes across cell lines: `benchmarks/quality.py --protocol loco` writes the validation figure beside the
  test one (`val_auroc_per_gene`); `perturb_models/selection.py` keeps only the `val_*` columns before choosing
  (`tests/test_selection.py` poisons the test figures and gets the same choices).
- Ensemble weights: fitted on the validation perturbations of the run (`tests/test_ensemble.py` changes the
  test labels and gets the same weights).
- Defaults in `conf/model/`: the searched recipe with the best mean validation figure over the four lines
  (table above). Earlier choices made with test figures in view: `gears`' `pert_include_self: false` and its
  batch 1024 / 12-epoch budget (commit 8f22f06). The LOCO search space holds `pert_include_self` (true/false) so
  that it is re-decided on validation only; where the recipe table shows `–`, that part of the search has not
  been run and the default stands unchecked by this protocol. The batch/epoch budget is not searched (it is the
  CPU budget of this grid, the same for every recipe). The ensemble guard's rule (fall back only when the 95%
  paired interval lies below 0, as its issue asks) replaced a rule that fell back whenever the point difference
  was below 0, with these LOCO test figures in view (commit c331f65).
"""

ENSEMBLE_TEXT = """## The ensemble

`model=ensemble` (`perturb_models/models/ensemble.py`): members `knn`, `gears`, `embedding_mlp` by default,
each trained by the project's own `train` into `<run>/members/<name>` (or loaded from a finished run of the
same line, seed and split), frozen, then combined per task score (DE; direction on DE pairs) with simplex
weights (non-negative, summing to one) fitted on the validation perturbations, by one of two combiners
(`model.encoder.combiner`): `loglik`, a linear pool maximising the validation log-likelihood (EM), or `rank`,
a logarithmic pool minimising a pairwise logistic loss between positive and negative validation pairs of the
same downstream gene (each gene weighing the same: the smooth surrogate of the per-gene AUROC). The guard
(`model.encoder.guard`) scores the combination on validation pairs its weights never saw (2-fold cross-fitting
over validation perturbations) and, per task, lets the best member answer alone where the combination ranks
worse by more than the noise (the 95% paired interval of the difference below 0); `ensemble_weights.json` says so,
with the paired difference and its interval. A one-member ensemble is
that member. In the LOCO rows above the members are the recipes chosen for the held-out line, loaded from their
runs of that line and seed, and the combiner is chosen on the other lines' cross-fitted validation figures
(ensemble rows with `@combiner` in their recipe; their `val_auroc_per_gene` is that cross-fitted figure).
Ensemble rows without `@` come from before combiners and the guard existed (linear pool, no guard). `weights`
in `loco.csv` are the fitted weights per task, and `fallback=` where the guard chose a member.
"""


def stale_loco_text(loco_rows: pd.DataFrame) -> str:
    """A paragraph naming how many loco.csv rows were made with an older symbol resolution, or nothing."""
    stale = awaits_rerun(loco_rows)
    if not stale.any():
        return ""
    # Ensemble rows over member recipes no longer chosen (or from before combiners existed) feed no table.
    current = (loco_rows["model"] != "ensemble").to_numpy() | loco_rows.index.isin(combiner_rows(loco_rows).index)
    shown, superseded = int((stale & current).sum()), int((stale & ~current).sum())
    text = ""
    if shown:
        text += (
            f"{shown} of {len(loco_rows)} rows below were made with an older symbol resolution than the code's "
            f"(version {RESOLUTION_VERSION} resolves the dataset symbols that gene_info alone cannot: the MT- genes, "
            "SARS, TAZ, ...): in them those genes had no knowledge, and their rerun is pending. "
        )
    if superseded:
        text += (
            f"{superseded} older ensemble rows of loco.csv (over member recipes no longer chosen, or from before "
            "combiners existed) were made with an older symbol resolution; no table here reads them."
        )
    return text + "\n\n"


def write_loco_doc(loco_rows: pd.DataFrame, path: Path) -> None:
    """docs/loco.md: the leave-one-cell-line-out tables from loco.csv, and how every choice is made."""
    text = "# Leave one cell line out\n\n"
    if loco_rows is not None and not loco_rows.empty:
        text += (
            "Generated by `python benchmarks/quality.py --table` from `benchmarks/results/loco.csv` "
            "(`python benchmarks/quality.py --protocol loco`). For each held-out line, each family's recipe is "
            "the one with the best mean validation per-gene AUROC (DE and direction, averaged per line) on the "
            "other three lines (`perturb_models.selection`, which reads only `val_*` columns); the cell is that "
            "recipe's test figure on the held-out line. The ensemble's members are the recipes chosen for that "
            "line; its weights are fitted on the held-out line's own validation perturbations, as a user's "
            "would be on their screen. This is the estimate of what a default gives on a new line.\n\n"
            + stale_loco_text(loco_rows)
            + loco_table(loco_rows)
            + "\nValidation figures of every recipe (mean of DE and direction per-gene AUROC, over seeds):\n\n"
            + loco_recipes_text(loco_rows)
            + "\nDefaults: the recipe with the best mean validation figure over all four lines, next to the "
            "recipe that `conf/model/` holds now:\n\n" + defaults_text(loco_rows) + "\n" + ENSEMBLE_TEXT
        )
    else:
        text += "_no rows in loco.csv yet_\n"
    text += "\n" + CHOICES_TEXT
    atomic_write_text(path, text)


def is_default_recipe(model: str, overrides: list[str]) -> bool:
    """Whether ``overrides`` leave ``conf/model/<model>.yaml`` as it is (then a recipe's run is a default run)."""
    from omegaconf import OmegaConf

    from perturb_models.config import compose_config

    models = []
    for extra in ([], overrides):
        cfg = compose_config("train", [f"model={model}", "data=synthetic", *extra])
        models.append(OmegaConf.to_container(cfg.model, resolve=True))
    return models[0] == models[1]


def row_scope(rows: pd.DataFrame) -> pd.Series:
    """What a row's test figure covers: ``""`` for the full test split, else its ``data.test_genes=N`` subset."""
    overrides = rows["overrides"] if "overrides" in rows.columns else pd.Series("", index=rows.index)
    return overrides.fillna("").astype(str).str.extract(r"(data\.test_genes=\S+)", expand=False).fillna("")


def store_row(path: Path, new: list[dict], columns: list[str], keys: list[str]) -> pd.DataFrame:
    """Append ``new`` to the CSV at ``path``, replacing rows with the same ``keys`` and the same test scope
    (a rerun supersedes; a full-test row never replaces a test-gene-subset row of llm_quality.py, nor back)."""
    rows = read_rows(path, columns)
    fresh = pd.DataFrame(new, columns=columns)
    if not rows.empty:
        index = pd.MultiIndex.from_frame(rows[keys].assign(_scope=row_scope(rows)))
        rows = rows.loc[~index.isin(pd.MultiIndex.from_frame(fresh[keys].assign(_scope=row_scope(fresh))))]
    rows = pd.concat([rows, fresh], ignore_index=True) if not rows.empty else fresh
    atomic_write_dataframe(path, rows)
    return rows


def promote(csv: Path, loco_rows: pd.DataFrame) -> None:
    """LOCO runs of what is now the default config become the default's rows in quality.csv (after a default
    changed, rerunning ``--protocol loco`` brings quality.csv up to date without training anything)."""
    store_row(csv, loco_rows[COLUMNS].to_dict("records"), COLUMNS, ["model", "dataset", "task", "seed"])


def ensemble_overrides(dataset: str, seed: int, task: str, choices: dict[str, str], runs_dir: Path) -> list[str]:
    """The ensemble over the chosen recipes' finished runs of this line and seed (no member retrained)."""
    extra = []
    for family, recipe in choices.items():
        run = runs_dir / loco_run_name(family, recipe, dataset, task, seed)
        extra.append(f"+model.encoder.member_runs.{family}={run}")
        # The recipe's architecture, so that the ensemble's own config rebuilds the member without its folder.
        extra += [f"model.encoder.catalog.{family}.{o[len('model.') :]}" for o in LOCO_SEARCH[family][recipe]]
    return extra


@functools.cache
def default_combiner() -> str:
    """``model.encoder.combiner`` of conf/model/ensemble.yaml."""
    from perturb_models.config import compose_config

    return str(compose_config("train", ["model=ensemble", "data=synthetic"]).model.encoder.combiner)


def loco_run_name(model: str, recipe: str, dataset: str, task: str, seed: int) -> str:
    return f"loco-{model}-{recipe}-{dataset}-{task}-seed{seed}"


def ensemble_choices(rows: pd.DataFrame, dataset: str) -> dict[str, str]:
    """The members' recipes for the ensemble on ``dataset``: each family's LOCO choice for that held-out line."""
    from perturb_models.selection import loco_choices

    return {f: loco_choices(rows, f, LINES)[dataset] for f in ENSEMBLE_MEMBERS}


def ensemble_recipe(choices: dict[str, str], combiner: str | None = None) -> str:
    """``knn:k100_s20+gears:neighbours+...``, and ``@combiner`` for runs with a combiner and the guard (rows
    without it are the earlier linear pool without guard)."""
    members = "+".join(f"{f}:{r}" for f, r in choices.items())
    return members if combiner is None else f"{members}@{combiner}"


def combiner_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Ensemble rows over each line's current LOCO member choices, with the combiner as their recipe."""
    ens = rows.loc[(rows["model"] == "ensemble") & rows["recipe"].astype(str).str.contains("@")]
    keep = pd.Series(False, index=ens.index)
    for line in LINES:
        try:
            members = ensemble_recipe(ensemble_choices(rows, line))
        except ValueError:
            continue
        keep |= (ens["dataset"] == line) & ens["recipe"].str.startswith(members + "@")
    ens = ens.loc[keep]
    return ens.assign(recipe=ens["recipe"].str.rsplit("@", n=1).str[1])


def combiner_choice(rows: pd.DataFrame, held_out: str) -> str:
    """The combiner for the ensemble on ``held_out``: the best mean cross-fitted validation figure on the
    other lines (``perturb_models.selection``: validation columns only)."""
    from perturb_models.selection import choose_recipe

    return choose_recipe(combiner_rows(rows), "ensemble", [d for d in LINES if d != held_out])


def run_loco(args, runs_dir: Path) -> None:
    """Every recipe of the search space on every line and seed, and the ensemble of the LOCO choices.

    Order, so that a budget cut short still leaves the useful rows: line by line, each family's default recipe
    and the ensemble of them (the default ``model=ensemble``); then the other recipes; then, per line, the
    ensemble of the LOCO choices where they are not the defaults.
    """
    tasks = ("de", "dir") if args.task == "joint" else (args.task,)
    keys = ["model", "recipe", "dataset", "task", "seed"]
    families = [m for m in args.models if m in LOCO_SEARCH]
    unknown = [m for m in args.models if m not in LOCO_SEARCH and m != "ensemble"]
    if unknown:
        raise SystemExit(
            f"--protocol loco: no search space for {', '.join(unknown)} (known: {', '.join(LOCO_SEARCH)}, ensemble)"
        )
    defaults = {(m, r): is_default_recipe(m, o) for m in families for r, o in LOCO_SEARCH[m].items()}
    default_recipes = [(f, r) for f in families for r in LOCO_SEARCH[f] if defaults[(f, r)]]
    other_recipes = [(f, r) for f in families for r in LOCO_SEARCH[f] if not defaults[(f, r)]]

    def run_recipes(seed: int, recipes: list[tuple[str, str]], datasets: list[str]) -> None:
        for family, recipe in recipes:
            for dataset in datasets:
                rows = read_rows(args.loco_csv, LOCO_COLUMNS)
                hit = rows.loc[
                    (rows["model"] == family)
                    & (rows["recipe"] == recipe)
                    & (rows["dataset"] == dataset)
                    & (rows["seed"] == seed)
                ]
                if set(tasks) <= set(complete(hit, args)["task"]):
                    print(f"skip {family}/{recipe} {dataset} seed {seed}: already in {args.loco_csv}")
                    if defaults[(family, recipe)]:
                        promote(args.csv, hit)
                    continue
                train_recipe(seed, family, recipe, dataset)

    def train_recipe(seed: int, family: str, recipe: str, dataset: str) -> None:
        extra = budget_overrides(family, args.set) + LOCO_SEARCH[family][recipe]
        print(f"run {family}/{recipe} {dataset} seed {seed} ({' '.join(extra)})", flush=True)
        new, wall = run_cell(
            family, dataset, seed, args.task, extra, runs_dir, loco_run_name(family, recipe, dataset, args.task, seed)
        )
        store_row(args.loco_csv, [dict(r, recipe=recipe) for r in new], LOCO_COLUMNS, keys)
        if is_default_recipe(family, LOCO_SEARCH[family][recipe]):
            # The recipe is the model's default config: the run is also the default's row.
            store_row(args.csv, new, COLUMNS, ["model", "dataset", "task", "seed"])
        print(
            f"done {family}/{recipe} {dataset} seed {seed} in {wall:.0f}s: "
            + ", ".join(f"{r['task']} val {r['val_auroc_per_gene']:.4f} test {r['auroc_per_gene']:.4f}" for r in new),
            flush=True,
        )

    def run_ensemble(seed: int, dataset: str, choices: dict[str, str], combiner: str) -> None:
        rows = read_rows(args.loco_csv, LOCO_COLUMNS)
        recipe = ensemble_recipe(choices, combiner)
        missing = [
            f"{f}/{r}"
            for f, r in choices.items()
            if rows.loc[
                (rows["model"] == f) & (rows["recipe"] == r) & (rows["dataset"] == dataset) & (rows["seed"] == seed)
            ].empty
        ]
        if missing:
            print(f"skip ensemble {dataset} seed {seed}: no run of {', '.join(missing)} yet")
            return
        hit = rows.loc[
            (rows["model"] == "ensemble")
            & (rows["recipe"] == recipe)
            & (rows["dataset"] == dataset)
            & (rows["seed"] == seed)
        ]
        # The default model=ensemble: default members and the config's combiner.
        members_default = (
            all(is_default_recipe(f, LOCO_SEARCH[f][r]) for f, r in choices.items()) and combiner == default_combiner()
        )
        if set(tasks) <= set(complete(hit, args, paired=True)["task"]):
            print(f"skip ensemble {dataset} seed {seed}: already in {args.loco_csv}")
            if members_default:
                promote(args.csv, hit)
            return
        for family, member in choices.items():
            if not (runs_dir / loco_run_name(family, member, dataset, args.task, seed) / "checkpoints").is_dir():
                # The row is stored but the run folder is gone (another machine, a cleaned cache): retrain it, so
                # the ensemble combines the very runs its members' rows report.
                train_recipe(seed, family, member, dataset)
        extra = budget_overrides("ensemble", args.set) + ensemble_overrides(dataset, seed, args.task, choices, runs_dir)
        extra.append(f"model.encoder.combiner={combiner}")
        print(f"run ensemble {dataset} seed {seed} ({recipe})", flush=True)
        run_name = loco_run_name(
            "ensemble", recipe.replace(":", "_").replace("+", "-").replace("@", "-"), dataset, args.task, seed
        )
        new, wall = run_cell("ensemble", dataset, seed, args.task, extra, runs_dir, run_name)
        table = json.loads((runs_dir / run_name / "ensemble_weights.json").read_text())
        paired = paired_with_members(
            runs_dir / run_name,
            {f: runs_dir / loco_run_name(f, r, dataset, args.task, seed) for f, r in choices.items()},
            tasks,
        )
        for row in new:
            # The ensemble's validation figure is the cross-fitted one of what it deploys (its weights were
            # fitted on validation, so the run's own validation figure flatters it).
            report = table["validation"][row["task"]]
            row["val_auroc_per_gene"] = (
                report["members"][report["fallback"]] if report["fallback"] else report["ensemble_crossfit"]
            )
            row["weights"] = " ".join(f"{m}={w:.3f}" for m, w in table[row["task"]].items()) + (
                f" fallback={report['fallback']}" if report["fallback"] else ""
            )
        store_row(args.loco_csv, [dict(r, recipe=recipe, paired=paired[r["task"]]) for r in new], LOCO_COLUMNS, keys)
        if members_default:
            # Members are the default recipes: this is the default ensemble's row for the line.
            store_row(args.csv, new, COLUMNS, ["model", "dataset", "task", "seed"])
        print(
            f"done ensemble {dataset} seed {seed} in {wall:.0f}s: "
            + ", ".join(f"{r['task']} val {r['val_auroc_per_gene']:.4f} test {r['auroc_per_gene']:.4f}" for r in new),
            flush=True,
        )

    default_members = {
        f: next((r for r, o in LOCO_SEARCH[f].items() if is_default_recipe(f, o)), None) for f in ENSEMBLE_MEMBERS
    }
    for seed in args.seeds:
        # Line by line: the default recipes, then the ensemble of them (the default model=ensemble).
        for dataset in args.datasets:
            run_recipes(seed, default_recipes, [dataset])
            if "ensemble" in args.models and None not in default_members.values():
                for combiner in ENSEMBLE_COMBINERS:
                    run_ensemble(seed, dataset, default_members, combiner)
        if args.only_defaults:
            continue
        run_recipes(seed, other_recipes, args.datasets)
        if "ensemble" in args.models:
            # Where the LOCO choices are not the defaults, the ensemble of the choices.
            for dataset in args.datasets:
                try:
                    choices = ensemble_choices(read_rows(args.loco_csv, LOCO_COLUMNS), dataset)
                except ValueError as err:
                    print(f"skip LOCO ensemble {dataset} seed {seed}: {err}")
                    continue
                for combiner in ENSEMBLE_COMBINERS:
                    run_ensemble(seed, dataset, choices, combiner)


def write_docs(args) -> None:
    """docs/results.md and the README block (from quality.csv), and docs/loco.md (from loco.csv)."""
    readme = README if args.doc == DEFAULT_DOC else None  # a scratch --doc leaves the README alone
    write_doc(read_rows(args.csv), args.doc, readme)
    write_loco_doc(read_rows(args.loco_csv, LOCO_COLUMNS), args.loco_doc)


def rerun_stale(args, runs_dir: Path) -> None:
    """Rerun the full-test rows of ``--models`` x ``--datasets`` x ``--seeds`` made with an older symbol
    resolution than the code's (``docs_tables.awaits_rerun``; with ``--rerun``, every stored row), each with its own
    stored overrides, one model at a time (so that a model's seeds and lines share one code version as soon as
    possible)."""
    for model in args.models:
        for dataset in args.datasets:
            for seed in args.seeds:
                rows = full_test(read_rows(args.csv))
                hit = rows.loc[(rows["model"] == model) & (rows["dataset"] == dataset) & (rows["seed"] == seed)]
                if hit.empty or not (args.rerun or awaits_rerun(hit).any()):
                    continue
                task = "joint" if set(hit["task"]) >= {"de", "dir"} else hit["task"].iloc[0]
                extra = str(hit["overrides"].iloc[0]).split()
                print(f"rerun {model} {dataset} seed {seed} (made at {hit['commit'].iloc[0]}): {' '.join(extra)}")
                new, wall = run_cell(model, dataset, seed, task, extra, runs_dir)
                old = dict(zip(hit["task"], hit["auroc_per_gene"]))
                store_row(args.csv, new, COLUMNS, ["model", "dataset", "task", "seed"])
                moved = ", ".join(f"{r['task']} {old.get(r['task']):.4f} -> {r['auroc_per_gene']:.4f}" for r in new)
                print(f"done {model} {dataset} seed {seed} in {wall:.0f}s: {moved}", flush=True)
                write_docs(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "gat", "gears", "knn"])
    parser.add_argument("--datasets", nargs="+", default=["k562", "rpe1", "hepg2", "k562_set"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--task", default="joint", choices=["joint", "de", "dir"])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[MODEL:]KEY=VALUE",
        help="extra Hydra override for every run, or for one model (gat:trainer.max_epochs=3)",
    )
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: cache/quality_runs)")
    parser.add_argument("--table", action="store_true", help="only regenerate the markdown table")
    parser.add_argument(
        "--protocol",
        choices=["grid", "loco"],
        default="grid",
        help="grid: default configs (quality.csv); loco: the LOCO search space and the ensemble of its "
        "choices (loco.csv; runs of default recipes also go to quality.csv)",
    )
    parser.add_argument("--loco-csv", type=Path, default=DEFAULT_LOCO_CSV)
    parser.add_argument("--loco-doc", type=Path, default=DEFAULT_LOCO_DOC)
    parser.add_argument(
        "--attach-intervals",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="fill the interval of the --csv rows these kept run folders made (no rerun)",
    )
    parser.add_argument(
        "--paired-with",
        nargs="+",
        default=[],
        metavar="NAME=RUN_DIR",
        help="with --attach-intervals: also the paired difference with these runs on the same pairs",
    )
    parser.add_argument(
        "--fill-intervals",
        action="store_true",
        help="rerun the rows that lack their bootstrap interval (rows made before intervals existed)",
    )
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="rerun the rows (of --models/--datasets/--seeds) made with an older symbol resolution than the code's: "
        "grid rows each with its own overrides; with --protocol loco, the search's rows and their ensembles",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="rerun the stored full-test rows of --models/--datasets/--seeds, each with its own overrides, and "
        "replace them (after a code change that moves them)",
    )
    parser.add_argument(
        "--only-defaults",
        action="store_true",
        help="loco: only the default recipes and their ensemble (a budget too small for the search)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.attach_intervals:
        others = {name: Path(path) for name, _, path in (item.partition("=") for item in args.paired_with)}
        for run_dir in args.attach_intervals:
            attach_intervals(args.csv, run_dir, paired_with=others)
        return 0
    if args.table:
        write_docs(args)
        print(results_table(read_rows(args.csv)))
        print(loco_table(read_rows(args.loco_csv, LOCO_COLUMNS)))
        return 0
    from perturb_models.io import cache_dir

    runs_dir = args.runs_dir or cache_dir("quality_runs")
    if args.rerun and args.protocol != "grid":
        parser.error("--rerun reruns grid rows (quality.csv); --protocol loco has --rerun-stale")
    if (args.rerun_stale or args.rerun) and args.protocol == "grid":
        rerun_stale(args, runs_dir)
        print(results_table(read_rows(args.csv)))
        return 0
    if args.protocol == "loco":
        run_loco(args, runs_dir)
        write_docs(args)
        print(loco_table(read_rows(args.loco_csv, LOCO_COLUMNS)))
        return 0
    tasks = ("de", "dir") if args.task == "joint" else (args.task,)
    # Breadth first: every model and dataset on the first seed before the next seed.
    for seed in args.seeds:
        for dataset in args.datasets:
            for model in args.models:
                rows = read_rows(args.csv)
                if done(rows, model, dataset, seed, tasks, args):
                    print(f"skip {model} {dataset} seed {seed}: already in {args.csv}")
                    continue
                extra = budget_overrides(model, args.set)
                print(f"run {model} {dataset} seed {seed} ({' '.join(extra)})", flush=True)
                new, wall = run_cell(model, dataset, seed, args.task, extra, runs_dir)
                rows = store_row(args.csv, new, COLUMNS, ["model", "dataset", "task", "seed"])
                summary = ", ".join(
                    f"{r['task']} {r['auroc_per_gene']:.4f} ({int(r['genes_scored'])} genes)" for r in new
                )
                print(f"done {model} {dataset} seed {seed} in {wall:.0f}s: {summary}", flush=True)
                write_docs(args)
    print(results_table(read_rows(args.csv)))
    return 0


if __name__ == "__main__":
    with cli_errors():  # a SIGTERM or a bad option: one line, the exit status of train.py
        sys.exit(main())
