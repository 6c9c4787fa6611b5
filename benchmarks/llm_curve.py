"""Learning curve of model=lora_llama, without and with ``model.encoder.prior=knn``, on llm_quality.py's
K562 test-gene subset: validation and test per-gene AUROC (``de`` and ``dir`` from one ``joint`` run) after
30, 100 and 300 training steps, and after 1,000 when validation is still rising; ``knn`` on the same genes
is the flat reference (it has no training steps).

    mkdir -p outputs
    nohup python benchmarks/llm_curve.py --csv benchmarks/results/llm_curve.csv > outputs/llm_curve.log 2>&1 &
    python benchmarks/llm_curve.py --csv benchmarks/results/llm_curve.csv --table   # docs/llm.md block + figure

One training run per (variant, seed), extended point by point: train to 30 steps, score validation and
test, then resume the same run folder from its ``checkpoints/last.ckpt`` (``ckpt_path=last``: weights,
AdamW moments, the scheduler's step, the loop counters and the RNG states, ``perturb_models/runs.py``) to
100 steps, score, and so on. A point is therefore exactly what a straight run to that many steps gives
(``tests/test_llm_curve.py`` checks it).

How the steps are laid out. Lightning cannot resume exactly from the middle of an epoch (the DataModule's
sampler restarts its epoch), so an epoch here is a *block* of ``--block`` batches (``trainer.limit_train_batches``,
each epoch a fresh seeded shuffle of the training pairs, of which the block takes the first batches) and a
point of N steps is ``trainer.max_epochs=N/block``: every point ends on an epoch boundary, the only place a
resume is exact. Validation does not run inside the fit (``trainer.check_val_every_n_epoch`` beyond any
point; ``last.ckpt`` is saved at every block's end instead), so a point scores the final weights of its
steps once: no checkpoint is selected, and early stopping never fires.

Learning-rate schedule: linear warmup over ``--warmup-steps`` (5), then *constant* (``model.scheduler.decay=
constant``). A schedule that decays over a planned total would differ between a run planned for 100 and one
planned for 1,000 steps, so a point would not be "the model after N steps"; inverse-sqrt decay needs no
total either, but would leave 7% of the rate at step 1,000 and mix "more steps" with "smaller steps".

Defaults: the test subset of ``benchmarks/llm_quality.py`` (``data.test_genes=100``, ``data.subset_seed=0``:
the same 100 genes and 1,372 pairs, so rows compare with quality.csv's subset rows), 64 validation genes
(683 pairs; the ``data.val_genes`` of ``experiment=lora_llama_cpu`` and llm_quality.py's default, the size
chosen there), batches of 16 pairs drawn from 300 training perturbations (25,902 pairs: 1,000 steps draw
16,000, about 12,000 of them distinct, so the curve measures more steps rather than repeats of the 40
perturbations of the 30-step rows), lr 1e-3 (as those rows). 1,000 steps is run for a (variant, seed) when
the mean of its validation ``de`` and ``dir`` figures rose from the previous point to the last planned one
(validation only, never test).

``--rank-weight W`` trains the variants with the within-gene ranking term added to the cross-entropy
(``model.rank_weight=W``, batches of runs of ``--gene-group-size`` pairs of one gene: ``data.gene_group_size``);
their rows and run folders are named with ``_rank`` (``lora_llama_prior_rank``), apart from the others.

A script of its own rather than a mode of llm_quality.py: its rows carry a step count and live in their own
CSV (quality.csv holds one row per model, seed and task), and its runs are laid out differently (blocks,
no validation inside the fit, resumed folders).

Resumable: a point already in ``--csv`` with the same settings is skipped; a killed run resumes from the last
block it finished (``last.ckpt`` is only ever saved at a block's end, a SIGTERM included), so a long point
can be trained in parts, across sessions. Each run folder logs its attempts (``curve_attempts.json``: from
which step, to which point, how long until its last checkpoint). Rows (``CURVE_COLUMNS``): one per model,
task, seed and steps (empty for knn), with the test figure's 95% bootstrap interval over test perturbations
(``perturb_models.metrics``), the validation figure, the genes scored, the point's wall seconds (the training
every attempt at it kept, plus the set-up and scoring of the one that finished it: a block cut short by a
kill is not counted, its retraining is), the step its training started from (0: from scratch, when the run
folder was gone), the commit and the overrides. The CPU-time estimate
each point prints before training is for one block, not for the point. Each point's ``metrics.json``,
``run.json`` and predictions are kept in ``<run folder>/curve/step<N>/``.
"""

from __future__ import annotations

import argparse
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

from docs_tables import LLM_DOC, interval_text, replace_block, subset_rows  # noqa: E402
from quality import budget_overrides, read_rows, run_cell, store_row  # noqa: E402

from perturb_models.errors import cli_errors  # noqa: E402
from perturb_models.io import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_writer  # noqa: E402

CURVE_COLUMNS = [
    "model",
    "dataset",
    "task",
    "seed",
    "steps",
    "val_auroc_per_gene",
    "auroc_per_gene",
    "ci_low",
    "ci_high",
    "genes_scored",
    "val_genes_scored",
    "wall_seconds",
    "from_step",
    "commit",
    "overrides",
]
KEYS = ["model", "dataset", "task", "seed", "steps"]
CURVE_BEGIN = (
    "<!-- llm_curve table: generated by `python benchmarks/llm_curve.py --csv benchmarks/results/llm_curve.csv "
    "--table` from benchmarks/results/llm_curve.csv; do not edit -->"
)
CURVE_END = "<!-- end of llm_curve table -->"
FIGURE_NAME = "llm_curve.png"
# Beyond any point: validation never runs inside the fit, each point validates its final weights once.
NO_VALIDATION_IN_FIT = 1_000_000
ATTEMPTS = "curve_attempts.json"
"""A run folder's ledger of training attempts: what each one trained and how long (``point_cost``)."""
ON_BLOCK_BOUNDARIES_ONLY = ["callbacks.last_checkpoint.save_on_exception=false"]
"""How the curve runs, not what a point is (left out of its recorded settings): a SIGTERM must not leave a
``last.ckpt`` in the middle of a block, which no resume continues exactly; the last block's end stays."""
TASKS = ("de", "dir")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, type=Path, help="results file (benchmarks/results/llm_curve.csv)")
    parser.add_argument("--table", action="store_true", help="only rewrite --doc's curve block and figure from --csv")
    parser.add_argument("--doc", type=Path, default=LLM_DOC, help="the page with the curve block (docs/llm.md)")
    parser.add_argument("--data", default="k562")
    parser.add_argument("--model", default="lora_llama", help="the LLM config (lora_llama_tiny for a quick check)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds of the variant without the prior")
    parser.add_argument("--prior-seeds", nargs="*", type=int, default=[0], help="seeds of the variant with prior=knn")
    parser.add_argument("--steps", nargs="+", type=int, default=[30, 100, 300], help="the points, increasing")
    parser.add_argument("--extend-to", type=int, default=1000, help="one more point while validation rises (0: none)")
    parser.add_argument("--block", type=int, default=10, help="batches an epoch; every point is a multiple of it")
    parser.add_argument("--reference", default="knn", help="the step-independent reference model ('' for none)")
    parser.add_argument("--reference-seed", type=int, default=0)
    parser.add_argument("--test-genes", type=int, default=100)
    parser.add_argument("--val-genes", type=int, default=64, help="as experiment=lora_llama_cpu and llm_quality.py")
    parser.add_argument("--max-train-perts", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "outputs" / "llm_curve")
    parser.add_argument(
        "--rank-weight",
        type=float,
        default=0.0,
        help="train with the within-gene ranking term of this weight (model.rank_weight); variants get '_rank'",
    )
    parser.add_argument(
        "--gene-group-size", type=int, default=4, help="data.gene_group_size of the runs with --rank-weight"
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for the LLM runs")
    args = parser.parse_args(argv)
    if not args.table:
        check_plan(parser, args)
    return args


def check_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for a plan whose points cannot all end on a block boundary."""
    if args.block < 1:
        parser.error(f"--block must be at least 1, got {args.block}")
    points = [*args.steps, *([args.extend_to] if args.extend_to else [])]
    if any(b <= a for a, b in zip(points, points[1:])) or points[0] < 1:
        parser.error(f"--steps (then --extend-to) must be positive and increasing, got {points}")
    if args.rank_weight < 0 or (args.rank_weight and args.gene_group_size < 2):
        parser.error("--rank-weight must be >= 0, and a ranking term needs --gene-group-size of at least 2")
    if args.extend_to and len(args.steps) < 2:
        parser.error("--extend-to needs two --steps to tell whether validation still rises (or --extend-to 0)")
    off = [s for s in points if s % args.block]
    if off:
        parser.error(f"every point must be a multiple of --block {args.block} (a resume is exact only there): {off}")


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """What every run of the curve, the reference included, is scored on: llm_quality.py's test subset."""
    return [f"data.test_genes={args.test_genes}", "data.subset_seed=0", f"data.val_genes={args.val_genes}"]


def run_overrides(args: argparse.Namespace, prior: bool) -> list[str]:
    """The settings every point of one LLM run shares (a resume with others is refused)."""
    out = [
        *shared_overrides(args),
        f"data.max_train_perts={args.max_train_perts}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.eval_batch_size}",
        f"trainer.limit_train_batches={args.block}",
        f"trainer.check_val_every_n_epoch={NO_VALIDATION_IN_FIT}",
        "trainer.num_sanity_val_steps=0",
        # Without validation in the fit Lightning would save last.ckpt only after a validation: save it at
        # every block's end, the points a resume (or a killed run) continues from.
        "+callbacks.last_checkpoint.save_on_train_epoch_end=true",
        f"model.encoder.max_length={args.max_length}",
        f"model.optimizer.lr={args.lr}",
        f"model.scheduler.warmup_steps={args.warmup_steps}",
        "model.scheduler.decay=constant",
    ]
    if prior:
        out.append("model.encoder.prior=knn")
    if args.rank_weight:
        out += [f"model.rank_weight={args.rank_weight}", f"data.gene_group_size={args.gene_group_size}"]
    return out + list(args.set)


def point_overrides(args: argparse.Namespace, prior: bool, steps: int) -> list[str]:
    return [*run_overrides(args, prior), f"trainer.max_epochs={steps // args.block}"]


def variant_name(args: argparse.Namespace, prior: bool) -> str:
    """The rows' model name: the LLM config, ``_prior`` with the retrieval prior, ``_rank`` with the ranking term."""
    return f"{args.model}{'_prior' if prior else ''}{'_rank' if args.rank_weight else ''}"


def stored_point(rows: pd.DataFrame, model: str, dataset: str, seed: int, steps: float, overrides: str) -> pd.DataFrame:
    """The rows of one point (both tasks) made with exactly these settings, or an empty frame."""
    step_match = rows["steps"].isna() if math.isnan(steps) else rows["steps"] == steps
    hit = rows.loc[
        (rows["model"] == model)
        & (rows["dataset"] == dataset)
        & (rows["seed"] == seed)
        & step_match
        & (rows["overrides"] == overrides)
    ]
    return hit if set(TASKS) <= set(hit["task"]) else hit.iloc[0:0]


def claim_run_folder(run_dir: Path, settings: list[str]) -> None:
    """Record the curve's settings in ``curve.json``; refuse a folder made with other ones (its checkpoint
    would continue a different curve: the trainer options, such as the block, are not checked on resume)."""
    record = run_dir / "curve.json"
    if record.is_file():
        saved = json.loads(record.read_text())["overrides"]
        if saved != settings:
            differ = sorted(set(saved) ^ set(settings))
            raise SystemExit(
                f"{run_dir} holds a curve made with other settings ({' '.join(differ)}): pass another --runs-dir "
                f"or delete that folder"
            )
        return
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise SystemExit(f"{run_dir} holds a run that llm_curve.py did not start: pass another --runs-dir")
    atomic_write_json(record, {"overrides": settings})


def read_attempts(run_dir: Path) -> list[dict]:
    path = run_dir / ATTEMPTS
    return json.loads(path.read_text()) if path.is_file() else []


def trained_until_checkpoint(run_dir: Path, started: float) -> float:
    """Seconds from an attempt's start to its last save of ``last.ckpt`` (0 when it saved none): the training
    it kept. A block cut short by a kill is not in it; the attempt that trains that block again counts it."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return max(0.0, path.stat().st_mtime - started) if path.is_file() else 0.0


def open_attempt(run_dir: Path, target: int, start: int, now: float) -> None:
    """Log an attempt to train ``run_dir`` from step ``start`` to ``target`` and score it. An earlier attempt
    left unfinished (killed) is closed first, with the training it kept (read before this one saves)."""
    attempts = read_attempts(run_dir)
    if attempts and "seconds" not in attempts[-1]:
        attempts[-1].update(killed=True, trained_seconds=trained_until_checkpoint(run_dir, attempts[-1]["started"]))
    attempts.append({"target": target, "from_step": start, "started": now})
    atomic_write_json(run_dir / ATTEMPTS, attempts)


def close_attempt(run_dir: Path, now: float) -> None:
    """The open attempt finished (trained and scored): its whole time and the part that was training."""
    attempts = read_attempts(run_dir)
    last = attempts[-1]
    last.update(seconds=now - last["started"], trained_seconds=trained_until_checkpoint(run_dir, last["started"]))
    atomic_write_json(run_dir / ATTEMPTS, attempts)


def point_cost(run_dir: Path) -> tuple[float, int]:
    """Wall seconds of the point the last attempt finished, and the step its training started from: the
    training each attempt since the previous finished one kept (a point trained in parts, across kills or
    sessions, counts every part once) plus the set-up and scoring of the attempt that finished it."""
    attempts = read_attempts(run_dir)
    earlier = [i for i, a in enumerate(attempts[:-1]) if not a.get("killed")]
    mine = attempts[(earlier[-1] + 1 if earlier else 0) :]
    final = mine[-1]
    seconds = sum(a["trained_seconds"] for a in mine) + final["seconds"] - final["trained_seconds"]
    return round(seconds, 1), mine[0]["from_step"]


def keep_point_outputs(run_dir: Path, steps: int) -> None:
    """Copy the point's metrics, run record and predictions to ``curve/step<N>/`` (the next point overwrites
    the run folder's own), so points can be compared pair by pair later."""
    target = run_dir / "curve" / f"step{steps}"
    for name in ("metrics.json", "run.json", "predictions/val.csv", "predictions/test.csv"):
        if (run_dir / name).is_file():
            atomic_write_bytes(target / name, (run_dir / name).read_bytes())


def score_point(args: argparse.Namespace, seed: int, prior: bool, steps: int) -> None:
    """Train (or resume) one run to ``steps`` and store its validation and test rows, unless stored already."""
    name = variant_name(args, prior)
    overrides = point_overrides(args, prior, steps)
    recorded = "data.task=joint " + " ".join(overrides)
    if not stored_point(read_rows(args.csv, CURVE_COLUMNS), name, args.data, seed, steps, recorded).empty:
        print(f"{name} seed {seed}, {steps} steps: in {args.csv} already, skipped", flush=True)
        return
    run_name = f"{name}-{args.data}-joint-seed{seed}"
    run_dir = args.runs_dir / run_name
    claim_run_folder(run_dir, run_overrides(args, prior))
    from perturb_models.runs import checkpoint_step  # torch and Lightning: only when a run is trained

    at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    if at is not None and at > steps:
        raise SystemExit(
            f"{run_dir} has trained {at} steps, past the {steps}-step point that {args.csv} lacks: delete that "
            f"folder to redo the curve of {name} seed {seed}"
        )
    if at is not None and at % args.block:
        raise SystemExit(
            f"{run_dir}/checkpoints/last.ckpt is at step {at}, inside a block of {args.block} (saved by a crash "
            f"before llm_curve.py kept checkpoints to block ends): no resume from it is exact; delete that folder "
            f"to redo the curve of {name} seed {seed}"
        )
    print(f"{name} seed {seed}: {'from step ' + str(at) if at else 'from scratch'} to {steps} steps", flush=True)
    resume = ["ckpt_path=last"] if at is not None else []
    open_attempt(run_dir, steps, at or 0, time.time())
    rows, _ = run_cell(
        args.model, args.data, seed, "joint", overrides + resume + ON_BLOCK_BOUNDARIES_ONLY, args.runs_dir, run_name
    )
    close_attempt(run_dir, time.time())
    reached = json.loads((run_dir / "run.json").read_text())["global_step"]
    if reached != steps:
        raise SystemExit(
            f"{run_dir} stopped at step {reached}, not {steps}: the training split has fewer than --block "
            f"{args.block} batches an epoch; lower --block or raise --max-train-perts"
        )
    keep_point_outputs(run_dir, steps)
    wall, from_step = point_cost(run_dir)
    for row in rows:
        row["wall_seconds"] = wall
    store(args, rows, name, steps, recorded, run_dir, from_step=from_step)


def store(
    args: argparse.Namespace,
    rows: list[dict],
    name: str,
    steps: float,
    recorded: str,
    run_dir: Path,
    from_step: float = math.nan,
) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in rows:
        row.update(
            model=name,
            steps=steps,
            overrides=recorded,
            val_genes_scored=metrics.get(f"val/{row['task']}_genes_scored", math.nan),
            from_step=from_step,
        )
        print(
            f"{name} {row['task']} seed {row['seed']}, steps {steps}: val {row['val_auroc_per_gene']:.4f}, test "
            f"{row['auroc_per_gene']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] over "
            f"{row['genes_scored']:.0f} genes ({row['wall_seconds']:.0f} s)",
            flush=True,
        )
    store_row(args.csv, [{k: row.get(k) for k in CURVE_COLUMNS} for row in rows], CURVE_COLUMNS, KEYS)


def score_reference(args: argparse.Namespace) -> None:
    """The reference model (knn) on the same test and validation genes: one row per task, no steps."""
    overrides = shared_overrides(args) + budget_overrides(args.reference, [])
    recorded = "data.task=joint " + " ".join(overrides)
    rows = read_rows(args.csv, CURVE_COLUMNS)
    if not stored_point(rows, args.reference, args.data, args.reference_seed, math.nan, recorded).empty:
        print(f"{args.reference}: in {args.csv} already, skipped", flush=True)
        return
    run_name = f"{args.reference}-{args.data}-joint-seed{args.reference_seed}"
    rows, _ = run_cell(args.reference, args.data, args.reference_seed, "joint", overrides, args.runs_dir, run_name)
    store(args, rows, args.reference, math.nan, recorded, args.runs_dir / run_name)


def still_rising(rows: pd.DataFrame, model: str, dataset: str, seed: int, before: int, last: int) -> bool:
    """Whether the mean of the validation de and dir figures rose from ``before`` to ``last`` steps."""
    mine = rows.loc[(rows["model"] == model) & (rows["dataset"] == dataset) & (rows["seed"] == seed)]

    def val(steps: int) -> float:
        return float(mine.loc[mine["steps"] == steps, "val_auroc_per_gene"].astype(float).mean())

    return val(last) > val(before)


def run_curve(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.reference:
        score_reference(args)
    runs = [(seed, False) for seed in args.seeds] + [(seed, True) for seed in args.prior_seeds]
    # Point by point across the runs, so that a curve stopped early already compares both variants.
    for steps in args.steps:
        for seed, prior in runs:
            score_point(args, seed, prior, steps)
    if not args.extend_to:
        return
    before, last = args.steps[-2:]
    for seed, prior in runs:
        name = variant_name(args, prior)
        if still_rising(read_rows(args.csv, CURVE_COLUMNS), name, args.data, seed, before, last):
            score_point(args, seed, prior, args.extend_to)
        else:
            print(f"{name} seed {seed}: validation did not rise from {before} to {last} steps, no {args.extend_to}")


# ---- the docs block ----------------------------------------------------------------------------------


def curve_table(rows: pd.DataFrame, dataset: str = "k562", test_genes: int = 100) -> str:
    """Markdown: per model and point, the seeds' mean validation and test figures (test with its interval),
    the genes scored and the cumulative wall time of the run up to that point."""
    rows = subset_rows(rows, dataset, test_genes)
    if rows.empty:
        return f"_no {dataset} rows scored on {test_genes} test genes in llm_curve.csv yet_"
    lines = [
        "| model | steps | seeds | val de | test de [95% interval] | val dir | test dir [95% interval] "
        "| genes scored (val / test) | wall to this point (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = rows.assign(steps_key=rows["steps"].fillna(-1))
    for (model, steps), point in rows.groupby(["model", "steps_key"], sort=True):
        cells = []
        for task in TASKS:
            part = point.loc[point["task"] == task]
            cells.append(f"{part['val_auroc_per_gene'].astype(float).mean():.3f}")
            cells.append(f"{part['auroc_per_gene'].astype(float).mean():.3f}{interval_text(part)}")
        mine = rows.loc[(rows["model"] == model) & (rows["task"] == "de")]
        walls = pd.Series({seed: wall_to(run, steps) for seed, run in mine.groupby("seed")})
        de = point.loc[point["task"] == "de"]
        genes = f"{de['val_genes_scored'].max():.0f} / {de['genes_scored'].max():.0f}"
        seeds = ", ".join(str(int(s)) for s in sorted(set(point["seed"])))
        label = "– (no steps)" if steps < 0 else f"{steps:.0f}"
        lines.append(
            f"| {model} | {label} | {seeds} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {genes} "
            f"| {walls.mean() / 60:.0f} |"
        )
    return "\n".join(lines)


def validation_means(rows: pd.DataFrame) -> pd.Series:
    """Per (model, steps_key): the mean over seeds of each seed's mean validation de and dir figure."""
    per_seed = rows.groupby(["model", "steps_key", "seed"])["val_auroc_per_gene"].apply(
        lambda v: v.astype(float).mean()
    )
    return per_seed.groupby(level=["model", "steps_key"]).mean()


def curve_verdict(rows: pd.DataFrame, dataset: str = "k562", test_genes: int = 100) -> str:
    """Sentences on validation only, one per LLM variant: its mean validation figure (de and dir) at each
    point against the reference's, where it peaks and whether it still rose at the last point."""
    rows = subset_rows(rows, dataset, test_genes)
    if rows.empty or rows["steps"].notna().sum() == 0:
        return ""
    means = validation_means(rows.assign(steps_key=rows["steps"].fillna(-1)))
    reference = means[means.index.get_level_values("steps_key") < 0]
    ref_name, ref_val = (reference.index[0][0], float(reference.iloc[0])) if len(reference) else (None, None)
    sentences = [
        "On validation (mean of de and dir)" + (f", {ref_name} scores {ref_val:.3f}" if ref_name else "") + "."
    ]
    for model in sorted({m for m, steps in means.index if steps >= 0}):
        points = means.loc[model]
        points = points[points.index >= 0].sort_index()
        listed = ", ".join(f"{value:.3f} after {steps:.0f}" for steps, value in points.items())
        text = f"{model}: {listed} steps"
        if len(points) > 1:
            text += f"; best after {points.idxmax():.0f}"
        if ref_name is not None:
            gaps = points - ref_val
            every = " at every point" if len(points) > 1 else ""
            if (gaps < 0).all():
                text += f", below {ref_name}{every} (by {-gaps.max():.3f}{' at the closest' if every else ''})"
            elif (gaps > 0).all():
                text += f", above {ref_name}{every} (by {gaps.min():.3f}{' at the least' if every else ''})"
            else:
                text += f", above {ref_name} at {int((gaps > 0).sum())} of {len(gaps)} points"
        if len(points) > 1:
            change = float(points.iloc[-1] - points.iloc[-2])
            text += (
                f"; from {points.index[-2]:.0f} to {points.index[-1]:.0f} steps it "
                f"{'rose' if change > 0 else 'fell' if change < 0 else 'stayed'}"
                + (f" by {abs(change):.3f}" if change else "")
            )
        sentences.append(text + ".")
    return " ".join(sentences)


def wall_to(run: pd.DataFrame, steps: float) -> float:
    """Seconds one run (one task's rows of a model and seed) took to reach ``steps``: the point's own wall time
    plus that of the point its training resumed from (``from_step``; rows without it resumed from the previous
    point; 0 or no earlier point: from scratch). A point rescored after a kill (``from_step == steps``) ends
    the chain: its training was timed in the lost attempt."""
    if steps < 0:  # the reference: no steps
        return float(run["wall_seconds"].sum())
    points = run.loc[run["steps_key"] >= 0].set_index("steps_key").sort_index()
    total, at = 0.0, float(steps)
    while at in points.index:
        total += float(points.loc[at, "wall_seconds"])
        start = points.loc[at, "from_step"]
        if pd.isna(start):
            earlier = points.index[points.index < at]
            start = earlier.max() if len(earlier) else 0.0
        if start >= at:  # rescored after a kill: the training it scores was timed in a lost attempt
            break
        at = float(start)
    return total


def curve_figure(rows: pd.DataFrame, path: Path, dataset: str = "k562", test_genes: int = 100) -> bool:
    """A PNG of validation (dashed) and test (solid, 95% interval bars) per-gene AUROC against training steps,
    seeds' mean, per LLM variant, with the reference as horizontal lines. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the 'notebook' extra): no curve figure written")
        return False
    rows = subset_rows(rows, dataset, test_genes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, task in zip(axes, TASKS):
        part = rows.loc[rows["task"] == task]
        for model, group in part.loc[part["steps"].notna()].groupby("model", sort=True):
            means = group.groupby("steps")[["val_auroc_per_gene", "auroc_per_gene", "ci_low", "ci_high"]].mean()
            steps = means.index.to_numpy(dtype=float)
            test, val = means["auroc_per_gene"].to_numpy(float), means["val_auroc_per_gene"].to_numpy(float)
            below = (test - means["ci_low"].to_numpy(float)).clip(min=0)
            above = (means["ci_high"].to_numpy(float) - test).clip(min=0)
            bars = ax.errorbar(steps, test, yerr=[below, above], fmt="o-", capsize=3, label=model)
            ax.plot(steps, val, "s--", color=bars[0].get_color(), alpha=0.7)
        for model, group in part.loc[part["steps"].isna()].groupby("model", sort=True):
            ax.axhline(group["auroc_per_gene"].astype(float).mean(), color="grey", lw=1.2, label=f"{model} (test)")
            ax.axhline(group["val_auroc_per_gene"].astype(float).mean(), color="grey", lw=1, ls="--")
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training steps (batches of 16 pairs)")
        ax.set_title(f"{task}: per-gene AUROC (solid: test; dashed: validation)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-gene AUROC")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return True


def with_curve_block(doc_text: str, rows: pd.DataFrame, figure: bool, path: Path = LLM_DOC, **subset) -> str:
    """The page's text with its curve block (figure link and table) rewritten from ``rows``."""
    body = (f"![per-gene AUROC against training steps]({FIGURE_NAME})\n\n" if figure else "") + curve_table(
        rows, **subset
    )
    verdict = curve_verdict(rows, **subset)
    body += f"\n\n{verdict}" if verdict else ""
    return replace_block(doc_text, body, CURVE_BEGIN, CURVE_END, path)


def write_docs(args: argparse.Namespace) -> None:
    rows = read_rows(args.csv, CURVE_COLUMNS)
    subset = {"dataset": args.data, "test_genes": args.test_genes}
    print(curve_table(rows, **subset))
    figure = curve_figure(rows, args.doc.parent / FIGURE_NAME, **subset)
    atomic_write_text(args.doc, with_curve_block(args.doc.read_text(), rows, figure, args.doc, **subset))
    print(f"{args.doc} updated" + (f" and {args.doc.parent / FIGURE_NAME} drawn" if figure else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        write_docs(args)
        return
    run_curve(args)
    print(f"done; rewrite the docs with: python benchmarks/llm_curve.py --csv {args.csv} --table", flush=True)


if __name__ == "__main__":
    with cli_errors():  # a SIGTERM or a bad option: one line, the exit status of train.py
        main()
