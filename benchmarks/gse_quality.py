"""Gene set enrichment quality: go_enrichment and lora_llama_gse on both cluster kinds -> gse_quality.csv.

Each method runs through ``train.py``'s ``train(cfg)`` on ``data=k562_gse data.gse_kind=gene``. The LLM's
training excludes GO terms near the clusters of *both* kinds, so one training per seed also answers the
``pert`` clusters: its checkpoint is evaluated there through ``evaluate_gse`` (no second training).

    python benchmarks/gse_quality.py --methods go_enrichment lora_llama_gse --seeds 0 1 2
    python benchmarks/gse_quality.py --table      # docs/gene_sets.md tables and examples from the CSV

Appends ``method,kind,seed,rouge1_recall,bertscore_f1,clusters_scored,bertscore_model,commit,wall_seconds,run``
rows to ``benchmarks/results/gse_quality.csv``; run folders stay under ``outputs/gse_quality/``, their
``predictions/test.csv`` copied to ``benchmarks/results/gse_predictions/`` (the ``run`` column).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perturb_models.config import compose_config  # noqa: E402
from perturb_models.evaluation import find_checkpoint, load_run_record  # noqa: E402
from perturb_models.gse.runner import evaluate_gse  # noqa: E402
from perturb_models.io import atomic_write_dataframe, atomic_write_text  # noqa: E402
from perturb_models.results import replace_block  # noqa: E402
from perturb_models.outputs import git_commit  # noqa: E402
from perturb_models.training import train  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gse_quality.csv"
# Predictions of each run, kept next to the CSV (small) so that the docs' examples are regenerated from them.
PREDICTIONS = REPO / "benchmarks" / "results" / "gse_predictions"
DOC = REPO / "docs" / "gene_sets.md"
COLUMNS = ["method", "kind", "seed", "rouge1_recall", "bertscore_f1", "clusters_scored", "bertscore_model", "commit",
           "wall_seconds", "run", "overrides"]
TABLE_START, TABLE_END = "<!-- gse_quality table: start -->", "<!-- gse_quality table: end -->"
EXAMPLES_START, EXAMPLES_END = "<!-- gse_quality examples: start -->", "<!-- gse_quality examples: end -->"


def append_rows(rows: list[dict]) -> None:
    old = pd.read_csv(RESULTS) if RESULTS.is_file() else pd.DataFrame(columns=COLUMNS)
    new = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_dataframe(RESULTS, pd.concat([old, new], ignore_index=True) if len(old) else new)


def run_method(method: str, seed: int, extra: list[str], out_root: Path) -> list[dict]:
    run = out_root / f"{method}-gene-seed{seed}"
    overrides = ["data=k562_gse", "data.gse_kind=gene", f"model={method}", f"seed={seed}", "logger=csv",
                 "trainer.enable_progress_bar=false", *extra]
    cfg = compose_config("train", overrides, run)
    started = time.time()
    metrics = train(cfg)
    rows = [row(method, "gene", seed, metrics, cfg, time.time() - started, run, extra)]
    # The same model (trained once, on knowledge only) answers the other cluster kind.
    started = time.time()
    checkpoint, record = load_run_record(find_checkpoint(run))
    record["config"]["data"].update(gse_kind="pert", name="k562_pert")
    record["run"].update(gse_kind="pert", dataset="k562_pert")
    other = out_root / f"{method}-pert-seed{seed}"
    metrics = evaluate_gse(checkpoint, record, find_checkpoint(run), other, cfg.trainer)
    rows.append(row(method, "pert", seed, metrics, cfg, time.time() - started, other, extra))
    return rows


def row(method, kind, seed, metrics, cfg, seconds, run, extra) -> dict:
    return {"method": method, "kind": kind, "seed": seed, "rouge1_recall": metrics["test/rouge1_recall"],
            "bertscore_f1": metrics.get("test/bertscore_f1"), "clusters_scored": metrics["test/clusters_scored"],
            "bertscore_model": cfg.data.bertscore_model, "commit": git_commit(), "wall_seconds": round(seconds, 1),
            "run": save_predictions(run, method, kind, seed),
            "overrides": " ".join(extra)}


def save_predictions(run: Path, method: str, kind: str, seed: int) -> str:
    target = PREDICTIONS / f"{method}-{kind}-seed{seed}.csv"
    atomic_write_text(target, (Path(run) / "predictions" / "test.csv").read_text())
    return str(target.relative_to(REPO))


def verbatim_counts() -> dict[str, tuple[int, int]]:
    """Per kind: (labels that are verbatim GO term names, case-insensitive; labelled clusters)."""
    from perturb_models.data.gse import GSEDataModule
    from perturb_models.knowledge.files import knowledge_file
    from perturb_models.knowledge.go import read_obo

    names = {t.name.lower() for t in read_obo(knowledge_file("go_obo")).values() if t.name}
    out = {}
    for kind in ("gene", "pert"):
        dm = GSEDataModule(gse_kind=kind)
        dm.setup()
        labels = list(dm.context.scored["label"])
        out[kind] = (sum(label.lower() in names for label in labels), len(labels))
    return out


def table(results: pd.DataFrame) -> str:
    lines = ["| method | kind | ROUGE-1 recall | BERTScore F1 (MiniLM) | clusters | seeds | wall time (min, mean) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    grouped = results.groupby(["method", "kind"], sort=False)
    for (method, kind), g in grouped:
        r, b = g["rouge1_recall"], g["bertscore_f1"]
        spread = f" ± {r.std(ddof=0):.3f}" if len(g) > 1 else ""
        lines.append(f"| `{method}` | {kind} | {r.mean():.3f}{spread} | {b.mean():.3f} | {int(g['clusters_scored'].iloc[0])} | "
                     f"{', '.join(str(s) for s in g['seed'])} | {g['wall_seconds'].mean() / 60:.1f} |")
    return "\n".join(lines)


def examples(results: pd.DataFrame, per_kind: int = 8) -> str:
    """Labels next to both methods' answers (seed 0 runs), the first ``per_kind`` labelled clusters."""
    out = []
    for kind in ("gene", "pert"):
        runs = {m: results.loc[(results["method"] == m) & (results["kind"] == kind)].sort_values("seed")
                for m in results["method"].unique()}
        frames = {m: pd.read_csv(REPO / r["run"].iloc[0], keep_default_na=False)
                  for m, r in runs.items() if len(r)}
        if not frames:
            continue
        methods = list(frames)
        out += [f"**{kind} clusters**", "", "| cluster | genes (first 6) | label | " + " | ".join(f"`{m}`" for m in methods) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
        base = frames[methods[0]]
        shown = base.loc[base["label"] != ""].head(per_kind)
        for i in shown.index:
            genes = base.loc[i, "genes"].split()
            cells = [f"{frames[m].loc[i, 'answer']} ({float(frames[m].loc[i, 'rouge1_recall']):.2f})" for m in methods]
            out.append(f"| {base.loc[i, 'cluster']} | {' '.join(genes[:6])}{' …' if len(genes) > 6 else ''} | "
                       f"{base.loc[i, 'label']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def write_doc() -> None:
    results = pd.read_csv(RESULTS)
    counts = verbatim_counts()
    verbatim = ", ".join(f"{kind} clusters {n} of {total}" for kind, (n, total) in counts.items())
    text = DOC.read_text()
    text = replace_block(text, table(results) + f"\n\nTest labels that are verbatim GO term names (case-insensitive): {verbatim}.",
                         TABLE_START, TABLE_END, DOC)
    text = replace_block(text, examples(results), EXAMPLES_START, EXAMPLES_END, DOC)
    atomic_write_text(DOC, text)
    print(table(results))
    print(f"{DOC} updated")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["go_enrichment", "lora_llama_gse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gse_quality"))
    parser.add_argument("--table", action="store_true", help="only rewrite docs/gene_sets.md from the CSV")
    args = parser.parse_args(argv)
    if args.table:
        write_doc()
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for method in args.methods:
        # The baseline has no randomness: one run stands for every seed.
        for seed in (args.seeds[:1] if method == "go_enrichment" else args.seeds):
            rows = run_method(method, seed, list(args.override), Path(args.out))
            append_rows(rows)
            print(json.dumps(rows, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
