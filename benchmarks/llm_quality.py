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

A model without gradient training (``--model summer``: SUMMER, no optimizer) gets none of the training
options: it reads the whole training split (as ``knn``), one pass writes its checkpoint, and ``--set``
chooses its mode. Its rows are named by that mode (:func:`variant_name`), so the modes are distinct models of
the table: ``summer_logprob``, ``summer_sample_cot``, ``summer_logprob_noretrieval``, ... (``_knowledgetext``
or ``_nosummaries`` for those summary sources; ``@<weights>`` for an LLM other than SmolLM2). Its tokens per
pair and LLM seconds (``run.json``'s ``llm_usage``) are printed with the row and stored, for every run with an
LLM, in ``llm_usage.csv`` beside ``--csv`` (``--usage-csv``); ``--table`` also rewrites docs/summer.md's table.

    python benchmarks/llm_quality.py --csv benchmarks/results/quality.csv --model summer --val-genes 4 \
        --baselines knn
    python benchmarks/llm_quality.py --csv benchmarks/results/quality.csv --model summer --val-genes 4 \
        --baselines --set model.encoder.retrieval=false     # paired with the knn run of the first invocation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from docs_tables import (  # noqa: E402
    LLM_DOC,
    SUMMER_DOC,
    read_quality_rows,
    read_usage_rows,
    subset_table,
    with_llm_block,
    with_summer_block,
)
from quality import COLUMNS, budget_overrides, paired_with_members, run_cell, store_row  # noqa: E402

from perturb_models.errors import cli_errors  # noqa: E402
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


# A model without gradient training: nothing to fit, so one pass over the training data writes its checkpoint.
NO_GRADIENT = ["trainer.max_epochs=1", "data.batch_size=4096"]


def no_gradient_overrides(args: argparse.Namespace) -> list[str]:
    return [*NO_GRADIENT, f"data.val_genes={args.val_genes}", f"data.eval_batch_size={args.eval_batch_size}", *args.set]


def variant_name(model: str, encoder) -> str:
    """A SUMMER row's model name from its resolved settings: scoring, chain of thought, retrieval, summary
    source and, when not SmolLM2, the LLM (``summer_sample_cot_noretrieval@Meta-Llama-3-70B``)."""
    parts = [model, str(encoder.scoring)]
    if encoder.get("cot"):
        parts.append("cot")
    if not encoder.get("retrieval", True):
        parts.append("noretrieval")
    source = str((encoder.get("summaries") or {}).get("source", "auto"))
    if source in ("knowledge", "none"):
        parts.append({"knowledge": "knowledgetext", "none": "nosummaries"}[source])
    backend = encoder.get("backend") or {}
    if backend.get("kind") == "openai":
        llm = str(backend.get("model"))
    elif backend.get("llama_config") is not None:
        llm = "randomllama"
    else:
        llm = str(backend.get("pretrained"))
    llm = Path(llm).name.removesuffix(".gguf")
    return "_".join(parts) + ("" if llm == "smollm2" else f"@{llm}")


def llm_usage_text(run: Path) -> str:
    """Tokens per pair, LLM seconds and requests from a run's ``run.json`` (``llm_usage``), or ``""``."""
    record = run / "run.json"
    usage = json.loads(record.read_text()).get("llm_usage") if record.is_file() else None
    if not usage:
        return ""
    return (
        f"; LLM: {usage['tokens_per_pair']} tokens per pair, {usage['seconds']} s, {usage['requests']:,} requests "
        f"({usage['cached']:,} from the cache), {usage['abstained_pairs']:,} pairs all-abstained"
    )


USAGE_COLUMNS = [
    "model",
    "dataset",
    "seed",
    "pairs",
    "requests",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "tokens_per_pair",
    "llm_seconds",
    "abstained_pairs",
    "answers",
    "abstained_answers",
    "unparsed_answers",
    "commit",
    "overrides",
]


def usage_row(run: Path, row: dict) -> dict | None:
    """What the LLM of a run cost (``run.json``'s ``llm_usage``), under the row's model, dataset, seed and
    overrides; None for a run without an LLM usage record."""
    record = run / "run.json"
    usage = json.loads(record.read_text()).get("llm_usage") if record.is_file() else None
    if not usage:
        return None
    return {
        **{k: row.get(k) for k in ("model", "dataset", "seed", "commit", "overrides")},
        **{k: usage.get(k) for k in ("pairs", "requests", "cached", "prompt_tokens", "completion_tokens")},
        "tokens_per_pair": usage.get("tokens_per_pair"),
        "llm_seconds": usage.get("seconds"),
        **{k: usage.get(k) for k in ("abstained_pairs", "answers", "abstained_answers", "unparsed_answers")},
    }


def usage_path(args: argparse.Namespace) -> Path:
    """Where the LLM runs' costs go: ``--usage-csv``, else ``llm_usage.csv`` beside ``--csv``."""
    return Path(args.usage_csv) if args.usage_csv else Path(args.csv).with_name("llm_usage.csv")


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
    parser.add_argument(
        "--model", default="lora_llama", help="the LLM config (lora_llama_tiny for a quick check; summer: SUMMER)"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="LLM seeds (lora_llama: without the prior)")
    parser.add_argument(
        "--prior-seeds",
        nargs="*",
        type=int,
        default=None,
        help="lora_llama seeds with prior=knn (default 0; none for a model without gradient training)",
    )
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
    parser.add_argument(
        "--usage-csv", default=None, help="what each LLM run cost (tokens, time); default llm_usage.csv beside --csv"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra Hydra overrides for the LLM runs (summer: its mode, its backend)"
    )
    args = parser.parse_args(argv)
    if args.table:
        rows = read_quality_rows(Path(args.csv))
        print(subset_table(rows, args.data, args.test_genes))
        if (args.data, args.test_genes) == ("k562", 100):
            atomic_write_text(LLM_DOC, with_llm_block(LLM_DOC.read_text(), rows))
            usage = read_usage_rows(usage_path(args))
            atomic_write_text(SUMMER_DOC, with_summer_block(SUMMER_DOC.read_text(), rows, usage))
            print(f"{LLM_DOC} and {SUMMER_DOC} updated")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from perturb_models.config import compose_config

    # What the LLM config is once --set applies: whether it trains (an optimizer) and, if not, its mode's name.
    probe = compose_config("train", [f"model={args.model}", f"data={args.data}", *args.set]).model
    trains = probe.get("optimizer") is not None
    if args.prior_seeds is None:
        args.prior_seeds = [0] if trains else []
    elif args.prior_seeds and not trains:
        parser.error(f"--prior-seeds: model={args.model} has no gradient training and no prior")
    name = args.model if trains else variant_name(args.model, probe.encoder)
    csv, runs = Path(args.csv), Path(args.runs_dir)
    usage_csv = usage_path(args)
    shared = [f"data.test_genes={args.test_genes}", "data.subset_seed=0"]
    # The (cheap) baselines first, then the first LLM seed, so that the first LLM rows written are already
    # a paired comparison; then the prior, then the other seeds.
    plain = [(args.model, s, False) for s in args.seeds]
    cells = [(b, args.baseline_seed, False) for b in args.baselines] + plain[:1]
    cells += [(args.model, s, True) for s in args.prior_seeds] + plain[1:]
    knn_run = runs / "plain" / f"knn-{args.data}-joint-seed{args.baseline_seed}"
    for model, seed, prior in cells:
        if model != args.model:
            extra = budget_overrides(model, [])
        else:
            extra = llm_overrides(args, prior) if trains else no_gradient_overrides(args)
        extra = shared + extra
        run_dir = runs / ("prior" if prior else "plain")
        row_model = name if model == args.model else model
        run_name = f"{row_model}-{args.data}-joint-seed{seed}"
        rows, wall = run_cell(model, args.data, seed, "joint", extra, run_dir, run_name)
        # Paired with knn on the same test pairs when this or an earlier invocation with the same --runs-dir
        # scored knn (the table's "- knn" column).
        paired = (
            paired_with_members(run_dir / run_name, {"knn": knn_run}, ("de", "dir"))
            if model != "knn" and (knn_run / "predictions" / "test.csv").is_file()
            else {}
        )
        usage = llm_usage_text(run_dir / run_name)
        for row in rows:
            row["paired"] = paired.get(row["task"])
            row["overrides"] = "data.task=joint " + row["overrides"]
            row["model"] = f"{row_model}_prior" if prior else row_model
            print(
                f"{row['model']} {row['task']} seed {seed}: per-gene AUROC {row['auroc_per_gene']:.4f} over "
                f"{row['genes_scored']:.0f} genes ({wall:.0f} s){usage}",
                flush=True,
            )
        append(csv, rows)
        cost = usage_row(run_dir / run_name, rows[0])
        if cost is not None:
            store_row(usage_csv, [cost], USAGE_COLUMNS, ["model", "dataset", "seed", "overrides"])


if __name__ == "__main__":
    with cli_errors():  # a SIGTERM or a bad option: one line, the exit status of train.py
        main()
