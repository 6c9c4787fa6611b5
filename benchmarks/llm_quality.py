"""Quality of model=lora_llama on the documented CPU path, paired with knn and gears on the same test genes.

Every run of one invocation uses the same seeded subset of test genes (``data.test_genes``, all their
test pairs, genes whose per-gene AUROC is defined; ``data.subset_seed`` fixed), so the rows compare
models gene for gene. The LLM fits on a subsample of training perturbations (``data.max_train_perts``)
for ``--max-steps`` steps and selects on a small validation gene subset (``data.val_genes``); knn and
gears train as in the quality grid (``benchmarks/quality.py``'s CPU budget) and are scored on the same
test genes. One ``joint`` run per model and seed gives both the ``de`` and the ``dir`` row.

    python benchmarks/llm_quality.py --csv benchmarks/results/quality.csv --data k562 \\
        --seeds 0 1 2 --prior-seeds 0 --test-genes 100 --baselines knn gears
    python benchmarks/llm_quality.py --csv benchmarks/results/quality.csv --table   # rewrites docs/llm.md's table

Rows (``model,dataset,task,seed,auroc_per_gene,genes_scored,commit,wall_seconds,overrides``) are stored in
``--csv`` (required: the tracked results file is only written when named; a rerun of the same model, seed
and test-gene subset replaces its row); ``lora_llama`` with
``model.encoder.prior=knn`` is written as model ``lora_llama_prior``. The ``overrides`` column records
every setting, the test-gene subset included, so a row is never mistaken for a full-test figure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from docs_tables import LLM_DOC, read_quality_rows, subset_table, with_llm_block  # noqa: E402
from quality import COLUMNS, budget_overrides, paired_with_members, run_cell, store_row  # noqa: E402

from perturb_models.io import atomic_write_text  # noqa: E402


def llm_overrides(args: argparse.Namespace, prior: bool) -> list[str]:
    out = [
        f"data.max_train_perts={args.max_train_perts}",
        f"data.val_genes={args.val_genes}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.eval_batch_size}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.max_steps}",
        "trainer.num_sanity_val_steps=0",
        f"model.encoder.max_length={args.max_length}",
        f"model.optimizer.lr={args.lr}",
    ]
    if prior:
        out.append("model.encoder.prior=knn")
    return out + list(args.set)


def append(path: Path, rows: list[dict]) -> None:
    """Store the rows; a rerun of the same model, dataset, task, seed and test-gene subset replaces its row."""
    store_row(path, [{k: row.get(k) for k in COLUMNS} for row in rows], COLUMNS, ["model", "dataset", "task", "seed"])
    print(f"stored {len(rows)} rows in {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, help="results file to append to (e.g. benchmarks/results/quality.csv)")
    parser.add_argument(
        "--table",
        action="store_true",
        help="only print the markdown table of the paired rows in --csv (with --data k562 and "
        "--test-genes 100 also rewrite the table of docs/llm.md)",
    )
    parser.add_argument("--data", default="k562")
    parser.add_argument("--model", default="lora_llama", help="the LLM config (lora_llama_tiny for a quick check)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="lora_llama seeds without the prior")
    parser.add_argument("--prior-seeds", nargs="*", type=int, default=[0], help="lora_llama seeds with prior=knn")
    parser.add_argument("--baselines", nargs="*", default=["knn", "gears"], help="scored on the same test genes")
    parser.add_argument("--baseline-seed", type=int, default=0)
    parser.add_argument("--test-genes", type=int, default=100)
    parser.add_argument("--val-genes", type=int, default=64, help="as experiment=lora_llama_cpu")
    parser.add_argument("--max-train-perts", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=40, help="training steps (batches) of the one epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--runs-dir", default=str(REPO / "outputs" / "llm_quality"))
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for the LLM runs")
    args = parser.parse_args(argv)
    if args.table:
        rows = read_quality_rows(Path(args.csv))
        print(subset_table(rows, args.data, args.test_genes))
        if (args.data, args.test_genes) == ("k562", 100):
            atomic_write_text(LLM_DOC, with_llm_block(LLM_DOC.read_text(), rows))
            print(f"{LLM_DOC} updated")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    csv, runs = Path(args.csv), Path(args.runs_dir)
    shared = [f"data.test_genes={args.test_genes}", "data.subset_seed=0"]
    # The (cheap) baselines first, then the first LLM seed, so that the first LLM rows written are already
    # a paired comparison; then the prior, then the other seeds.
    plain = [(args.model, s, False) for s in args.seeds]
    cells = [(b, args.baseline_seed, False) for b in args.baselines] + plain[:1]
    cells += [(args.model, s, True) for s in args.prior_seeds] + plain[1:]
    knn_run = runs / "plain" / f"knn-{args.data}-joint-seed{args.baseline_seed}"
    for model, seed, prior in cells:
        extra = shared + (llm_overrides(args, prior) if model == args.model else budget_overrides(model, []))
        run_dir = runs / ("prior" if prior else "plain")
        rows, wall = run_cell(model, args.data, seed, "joint", extra, run_dir)
        # Paired with knn on the same test pairs when this invocation scored knn (the table's "- knn" column).
        paired = (
            paired_with_members(run_dir / f"{model}-{args.data}-joint-seed{seed}", {"knn": knn_run}, ("de", "dir"))
            if model != "knn" and (knn_run / "predictions" / "test.csv").is_file()
            else {}
        )
        for row in rows:
            row["paired"] = paired.get(row["task"])
            row["overrides"] = "data.task=joint " + row["overrides"]
            if prior:
                row["model"] = f"{model}_prior"
            print(
                f"{row['model']} {row['task']} seed {seed}: per-gene AUROC {row['auroc_per_gene']:.4f} over "
                f"{row['genes_scored']:.0f} genes ({wall:.0f} s)",
                flush=True,
            )
        append(csv, rows)


if __name__ == "__main__":
    main()
