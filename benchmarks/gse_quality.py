"""Gene set enrichment quality: go_enrichment and lora_llama_gse on both cluster kinds -> gse_quality.csv.

Each method runs through ``train.py``'s ``train(cfg)`` on ``data=k562_gse data.gse_kind=gene``. The LLM's
training excludes GO terms near the clusters of *both* kinds, so one training per seed also answers the
``pert`` clusters: its checkpoint is evaluated there through ``evaluate_gse`` (no second training).

    python benchmarks/gse_quality.py --methods go_enrichment lora_llama_gse --seeds 0 1 2
    python benchmarks/gse_quality.py --methods summer_gse      # SUMMER's gene-set setting (no training)
    python benchmarks/gse_quality.py --search     # the namer's recipe search (seed 0), chosen on validation
    python benchmarks/gse_quality.py --table      # docs/gene_sets.md tables and examples from the CSV

Stores ``method,recipe,kind,seed,val_rouge1_recall,rouge1_recall,bertscore_f1,...`` rows in
``benchmarks/results/gse_quality.csv`` (a rerun of the same method, recipe, kind and seed replaces its row);
run folders stay under ``outputs/gse_quality/``, their ``predictions/test.csv`` copied to
``benchmarks/results/gse_predictions/`` (the ``run`` column).

Recipe search (``--search``, seed 0): stage 1 runs each share of training examples shown evidence without
their answer (``SEARCH_STAGE1``); stage 2 runs the stage-1 choice, and any stage-1 recipe within ``NEAR`` of
its validation figure, with four times the training examples; stage 3 runs the stage-2 choice with each
change of ``SEARCH_STAGE3`` (longer answers; gene descriptions). Each choice is the recipe with the best
``val_rouge1_recall`` so far (GO-term validation examples whose evidence hides the answer; ties: first by
name, so the smaller recipe), through ``perturb_models.selection``, which never reads a test figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from docs_tables import replace_block  # noqa: E402

from perturb_models.config import compose_config  # noqa: E402
from perturb_models.io import atomic_write_dataframe, atomic_write_text  # noqa: E402
from perturb_models.outputs import git_commit  # noqa: E402
from perturb_models.runners.gene_sets import evaluate_gse  # noqa: E402
from perturb_models.runs import find_checkpoint, load_run_record  # noqa: E402
from perturb_models.training import train  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gse_quality.csv"
COPY_BASELINE = REPO / "benchmarks" / "results" / "gse_copy_baseline.json"
# Predictions of each run, kept next to the CSV (small) so that the docs' examples are regenerated from them.
PREDICTIONS = REPO / "benchmarks" / "results" / "gse_predictions"
DOC = REPO / "docs" / "gene_sets.md"
COLUMNS = [
    "method",
    "recipe",
    "kind",
    "seed",
    "val_rouge1_recall",
    "rouge1_recall",
    "bertscore_f1",
    "clusters_scored",
    "bertscore_model",
    "commit",
    "wall_seconds",
    "run",
    "overrides",
]
ROW_KEYS = ["method", "recipe", "kind", "seed"]
# The namer's search space: the share of training examples shown evidence without their answer (stage 1),
# then the stage-1 recipes near the best with SCALE times the base training examples (stage 2), then the
# stage-2 choice with each stage-3 change (recipe names: hide0, hide0_x4, hide0_x4_tok24, ...).
SEARCH_STAGE1 = {
    "hide0": {"hide_answer_train": 0.0},
    "hide50": {"hide_answer_train": 0.5},
    "hide100": {"hide_answer_train": 1.0},
}
SCALE = 4
# Stage 2 scales every stage-1 recipe within NEAR of the best validation figure (one of 64 examples is 0.016).
NEAR = 0.01
SEARCH_STAGE3 = {
    # 12 tokens cut 17% of GO names (the training targets) mid-word; 24 cut 2%.
    "tok24": {"max_new_tokens": 24},
    # The project's gene texts (knowledge/text.py, cut to max_description_chars) for the first 6 genes.
    "desc": {"descriptions": "gene_info"},
}
# What a recipe runs with where it says nothing (the stage-1 runs' settings).
SEARCH_BASE = {"train_examples": 200, "max_new_tokens": 12, "descriptions": "null"}
TABLE_START, TABLE_END = "<!-- gse_quality table: start -->", "<!-- gse_quality table: end -->"
EXAMPLES_START, EXAMPLES_END = "<!-- gse_quality examples: start -->", "<!-- gse_quality examples: end -->"
SEARCH_START, SEARCH_END = "<!-- gse_quality search: start -->", "<!-- gse_quality search: end -->"
COPY_START, COPY_END = "<!-- gse_quality copy baseline: start -->", "<!-- gse_quality copy baseline: end -->"


def read_results() -> pd.DataFrame:
    return pd.read_csv(RESULTS) if RESULTS.is_file() else pd.DataFrame(columns=COLUMNS)


def store_rows(rows: list[dict]) -> None:
    """Add ``rows``; a row with the same method, recipe, kind and seed is replaced (a rerun supersedes)."""
    old = read_results()
    new = pd.DataFrame(rows, columns=COLUMNS)
    if len(old):
        index = pd.MultiIndex.from_frame(old[ROW_KEYS].astype(str))
        old = old.loc[~index.isin(pd.MultiIndex.from_frame(new[ROW_KEYS].astype(str)))]
    atomic_write_dataframe(RESULTS, pd.concat([old, new], ignore_index=True) if len(old) else new)


def recipe_options(recipe: str) -> dict | None:
    """The namer options of a searched recipe (``hide50``, ``hide50_x4``, ``hide50_x4_tok24``), every searched
    option written out (``SEARCH_BASE`` where the recipe leaves it); None for a name outside the search."""
    base, *changes = recipe.split("_")
    if base not in SEARCH_STAGE1:
        return None
    options = {**SEARCH_STAGE1[base], **SEARCH_BASE}
    for change in changes:
        if change[:1] == "x" and change[1:].isdigit():
            options["train_examples"] = int(change[1:]) * SEARCH_BASE["train_examples"]
        elif change in SEARCH_STAGE3:
            options.update(SEARCH_STAGE3[change])
        else:
            return None
    return options


def namer_overrides(recipe: str) -> list[str]:
    """The overrides of a searched recipe, so that it stays the same runs whatever the config's defaults become."""
    options = recipe_options(recipe)
    if options is None:
        known = f"{', '.join(SEARCH_STAGE1)}, then optionally _x{SCALE}, then optionally _{' or _'.join(SEARCH_STAGE3)}"
        raise SystemExit(f"unknown recipe {recipe!r} (known: {known})")
    return [f"model.namer.{key}={value}" for key, value in options.items()]


def search_stages(recipes) -> list[list[str]]:
    """``recipes`` (searched ones) grouped by stage, each in search order."""
    searched = [r for r in dict.fromkeys(recipes) if recipe_options(r) is not None]
    stage1 = [r for r in SEARCH_STAGE1 if r in searched]
    stage2 = sorted(r for r in searched if r.count("_") == 1 and "_x" in r)
    stage3 = sorted(r for r in searched if r not in stage1 and r not in stage2)
    return [stage1, stage2, stage3]


@functools.cache
def default_recipe(method: str) -> str:
    """The searched recipe that ``conf/model/<method>.yaml`` holds now ("default" for a method without search)."""
    if method != "lora_llama_gse":
        return "default"
    from omegaconf import OmegaConf

    def namer(extra: list[str]) -> dict:
        cfg = compose_config("train", ["data=k562_gse", f"model={method}", *extra])
        return OmegaConf.to_container(cfg.model, resolve=True)

    current = namer([])
    scaled = [f"{r}_x{SCALE}" for r in SEARCH_STAGE1]
    changed = [f"{r}_{c}" for r in [*SEARCH_STAGE1, *scaled] for c in SEARCH_STAGE3]
    for recipe in [*SEARCH_STAGE1, *scaled, *changed]:
        if namer(namer_overrides(recipe)) == current:
            return recipe
    return "default"


def search_rows(rows: pd.DataFrame, recipes: list[str], seed: int) -> pd.DataFrame:
    """The namer's gene-kind rows (one per recipe and seed, the validation figure on it) of ``recipes`` at ``seed``."""
    return rows.loc[
        (rows["method"] == "lora_llama_gse")
        & (rows["kind"] == "gene")
        & (rows["seed"] == seed)
        & rows["recipe"].isin(recipes)
    ]


def choose(rows: pd.DataFrame, recipes: list[str], seed: int = 0) -> str:
    """The recipe of ``recipes`` with the best validation ROUGE-1 recall at ``seed`` (selection sees no test
    figure). One seed only: each seed draws its own validation examples, so figures of different seeds
    (the default's extra seeds) are not comparable."""
    from perturb_models.selection import choose_recipe

    view = search_rows(rows, recipes, seed).rename(columns={"method": "model"}).assign(dataset="k562_gse", task="gse")
    return choose_recipe(view, "lora_llama_gse", ["k562_gse"], metric="val_rouge1_recall")


def near_best(rows: pd.DataFrame, recipes: list[str], seed: int = 0) -> list[str]:
    """The recipes of ``recipes`` within NEAR of the best validation figure (stage 1's choice first): 64
    validation examples do not tell those apart, and more training examples may."""
    figures = search_rows(rows, recipes, seed).set_index("recipe")["val_rouge1_recall"]
    best = choose(rows, recipes, seed)
    return [best, *(r for r in recipes if r != best and r in figures.index and figures[r] >= figures[best] - NEAR)]


def run_method(method: str, seed: int, extra: list[str], out_root: Path, recipe: str = "default") -> list[dict]:
    run = out_root / f"{method}-{recipe}-gene-seed{seed}"
    overrides = [
        "data=k562_gse",
        "data.gse_kind=gene",
        f"model={method}",
        f"seed={seed}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    cfg = compose_config("train", overrides, run)
    started = time.time()
    metrics = train(cfg)
    rows = [row(method, recipe, "gene", seed, metrics, cfg, time.time() - started, run, extra)]
    # The same model (trained once, on knowledge only) answers the other cluster kind.
    started = time.time()
    checkpoint, record = load_run_record(find_checkpoint(run))
    record["config"]["data"].update(gse_kind="pert", name="k562_pert")
    record["run"].update(gse_kind="pert", dataset="k562_pert")
    other = out_root / f"{method}-{recipe}-pert-seed{seed}"
    val = rows[0]["val_rouge1_recall"]
    metrics = evaluate_gse(checkpoint, record, find_checkpoint(run), other, cfg.trainer)
    rows.append(
        row(
            method,
            recipe,
            "pert",
            seed,
            {**metrics, "val/rouge1_recall": val},
            cfg,
            time.time() - started,
            other,
            extra,
        )
    )
    return rows


def row(method, recipe, kind, seed, metrics, cfg, seconds, run, extra) -> dict:
    return {
        "method": method,
        "recipe": recipe,
        "kind": kind,
        "seed": seed,
        "val_rouge1_recall": metrics.get("val/rouge1_recall"),
        "rouge1_recall": metrics["test/rouge1_recall"],
        "bertscore_f1": metrics.get("test/bertscore_f1"),
        "clusters_scored": metrics["test/clusters_scored"],
        "bertscore_model": cfg.data.bertscore_model,
        "commit": git_commit(),
        "wall_seconds": round(seconds, 1),
        "run": save_predictions(run, method, recipe, kind, seed),
        "overrides": " ".join(extra),
    }


def save_predictions(run: Path, method: str, recipe: str, kind: str, seed: int) -> str:
    target = PREDICTIONS / f"{method}-{recipe}-{kind}-seed{seed}.csv"
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
    """Every method and recipe on both kinds: mean over seeds (± population std when several)."""
    lines = [
        "| method | recipe | kind | val ROUGE-1 recall | ROUGE-1 recall | BERTScore F1 (MiniLM) | clusters | seeds | "
        "wall time (min, mean) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    defaults = {m: default_recipe(m) for m in results["method"].unique()}
    for (method, recipe, kind), g in results.groupby(["method", "recipe", "kind"], sort=False):
        r, b, v = g["rouge1_recall"], g["bertscore_f1"], g["val_rouge1_recall"].astype(float)
        spread = f" ± {r.std(ddof=0):.3f}" if len(g) > 1 else ""
        name = f"{recipe} (default)" if recipe == defaults[method] and recipe != "default" else recipe
        lines.append(
            f"| `{method}` | {name} | {kind} | {'–' if v.isna().all() else f'{v.mean():.3f}'} | "
            f"{r.mean():.3f}{spread} | "
            f"{b.mean():.3f} | {int(g['clusters_scored'].iloc[0])} | {', '.join(str(s) for s in g['seed'])} | "
            f"{g['wall_seconds'].mean() / 60:.1f} |"
        )
    return "\n".join(lines)


def copy_baseline(examples: int = 200, seed: int = 0) -> dict:
    """How much of a GO-term validation example's answer the top evidence term already holds, with the
    evidence shown as is and with the answer hidden (the default namer's GO sets and sampling, no model)."""
    import numpy as np
    from hydra.utils import instantiate

    from perturb_models.builders import build_datamodule
    from perturb_models.gse.scoring import rouge1_recall

    cfg = compose_config(
        "train", ["data=k562_gse", "model=lora_llama_gse", f"seed={seed}", f"model.namer.val_examples={examples}"]
    )
    namer = instantiate(cfg.model.namer, _convert_="all")
    namer.setup_knowledge(build_datamodule(cfg.data).context)
    _, val = namer.build_examples(seed)
    targets = [e["target"] for e in val]
    out = {"val_examples": len(val), "seed": seed, "hide_jaccard": namer.hide_jaccard}
    for label, hide in (("shown", False), ("hidden", True)):
        top = [(namer.evidence(e["genes"], e["term"] if hide else None) or [""])[0] for e in val]
        out[f"top_term_recall_answer_{label}"] = round(float(np.mean(rouge1_recall(top, targets))), 4)
    atomic_write_text(COPY_BASELINE, json.dumps(out, indent=1) + "\n")
    return out


def default_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Each method's rows of the recipe its config holds now."""
    keep = pd.concat(
        [
            results.loc[(results["method"] == m) & (results["recipe"] == default_recipe(m))]
            for m in results["method"].unique()
        ]
    )
    return keep.sort_index()


def search_table(results: pd.DataFrame) -> str:
    """The recipe search (seed 0): validation ROUGE-1 recall (what chooses) beside the test figures (reported)."""
    rows = results.loc[(results["method"] == "lora_llama_gse") & (results["seed"] == 0)]
    stages = search_stages(rows["recipe"])
    if not stages[0]:
        return "_no recipe-search rows yet (`python benchmarks/gse_quality.py --search`)_"
    # The choice after each stage: the best validation figure among that stage's recipes and all before.
    choices = [choose(results, sum(stages[: i + 1], [])) for i, stage in enumerate(stages) if stage]
    final = choices[-1]
    lines = [
        "| stage | recipe | overrides | val ROUGE-1 recall | test gene | test pert | wall time (min, gene) | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for number, stage in enumerate(stages, 1):
        for recipe in stage:
            part = rows.loc[rows["recipe"] == recipe].set_index("kind")
            marks = [f"stage-{i} choice" for i, choice in enumerate(choices[:-1], 1) if choice == recipe]
            marks += ["chosen"] if recipe == final else []
            pert = part.loc["pert", "rouge1_recall"] if "pert" in part.index else float("nan")
            lines.append(
                f"| {number} | {recipe} | `{' '.join(namer_overrides(recipe))}` | "
                f"{part.loc['gene', 'val_rouge1_recall']:.3f} | {part.loc['gene', 'rouge1_recall']:.3f} | "
                f"{pert:.3f} | {part.loc['gene', 'wall_seconds'] / 60:.1f} | {', '.join(marks)} |"
            )
    return "\n".join(lines)


def examples(results: pd.DataFrame, per_kind: int = 8) -> str:
    """Labels next to both methods' answers (seed 0 runs), the first ``per_kind`` labelled clusters."""
    out = []
    for kind in ("gene", "pert"):
        runs = {
            m: results.loc[(results["method"] == m) & (results["kind"] == kind)].sort_values("seed")
            for m in results["method"].unique()
        }
        frames = {m: pd.read_csv(REPO / r["run"].iloc[0], keep_default_na=False) for m, r in runs.items() if len(r)}
        if not frames:
            continue
        methods = list(frames)
        out += [
            f"**{kind} clusters**",
            "",
            "| cluster | genes (first 6) | label | " + " | ".join(f"`{m}`" for m in methods) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
        ]
        base = frames[methods[0]]
        shown = base.loc[base["label"] != ""].head(per_kind)
        for i in shown.index:
            genes = base.loc[i, "genes"].split()
            cells = [f"{frames[m].loc[i, 'answer']} ({float(frames[m].loc[i, 'rouge1_recall']):.2f})" for m in methods]
            out.append(
                f"| {base.loc[i, 'cluster']} | {' '.join(genes[:6])}{' …' if len(genes) > 6 else ''} | "
                f"{base.loc[i, 'label']} | " + " | ".join(cells) + " |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def write_doc() -> None:
    results = read_results()
    counts = verbatim_counts()
    verbatim = ", ".join(f"{kind} clusters {n} of {total}" for kind, (n, total) in counts.items())
    text = DOC.read_text()
    defaults = default_rows(results)
    results_table, searched = table(results), search_table(results)
    text = replace_block(
        text,
        results_table + f"\n\nTest labels that are verbatim GO term names (case-insensitive): {verbatim}.",
        TABLE_START,
        TABLE_END,
        DOC,
    )
    text = replace_block(text, searched, SEARCH_START, SEARCH_END, DOC)
    if COPY_BASELINE.is_file():
        copy = json.loads(COPY_BASELINE.read_text())
        text = replace_block(
            text,
            (
                f"Answering with the top evidence term recalls {copy['top_term_recall_answer_shown']:.2f} "
                f"of a GO-term validation example's answer when the evidence is shown as is, "
                f"{copy['top_term_recall_answer_hidden']:.2f} when the answer and its near-duplicates "
                f"are hidden ({copy['val_examples']} examples, seed {copy['seed']}; "
                f"`python benchmarks/gse_quality.py --copy-baseline`)."
            ),
            COPY_START,
            COPY_END,
            DOC,
        )
    text = replace_block(text, examples(defaults), EXAMPLES_START, EXAMPLES_END, DOC)
    atomic_write_text(DOC, text)
    print(results_table)
    print(searched)
    print(f"{DOC} updated")


def has_row(method: str, recipe: str, seed: int) -> bool:
    rows = read_results()
    return bool(len(rows.loc[(rows["method"] == method) & (rows["recipe"] == recipe) & (rows["seed"] == seed)]))


def run_recipe(method: str, recipe: str, seed: int, extra: list[str], out: Path, rerun: bool = False) -> None:
    """One training (gene clusters) and its answers on both kinds, unless its rows are stored already (or
    ``rerun``: after a change that moves them; the new rows replace the old)."""
    if has_row(method, recipe, seed) and not rerun:
        print(f"skip {method}/{recipe} seed {seed}: already in {RESULTS.name}", flush=True)
        return
    rows = run_method(method, seed, extra, out, recipe)
    store_rows(rows)
    print(json.dumps(rows, indent=1, default=str), flush=True)


def rescore_bertscore() -> None:
    """Recompute the BERTScore of every stored row from its kept predictions file (answers and labels, no
    rerun of the namer), after a change of the scorer; the rows and the files are rewritten."""
    from perturb_models.gse.scoring import bert_score

    rows = read_results()
    for index, row in rows.iterrows():
        path = REPO / str(row["run"])
        if not isinstance(row["run"], str) or not path.is_file():
            print(f"no predictions file for {row['method']}/{row['recipe']}/{row['kind']} seed {row['seed']}: kept")
            continue
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        scored = frame["label"].notna()
        answers = frame.loc[scored, "answer"].fillna("").astype(str).tolist()
        values = bert_score(answers, frame.loc[scored, "label"].astype(str).tolist(), row["bertscore_model"])
        for key, per in values.items():
            frame.loc[scored, f"bertscore_{key}"] = per
        atomic_write_dataframe(path, frame)
        before, rows.loc[index, "bertscore_f1"] = row["bertscore_f1"], float(np.mean(values["f1"]))
        print(
            f"{row['method']}/{row['recipe']}/{row['kind']} seed {row['seed']}: BERTScore F1 {before:.4f} -> "
            f"{rows.loc[index, 'bertscore_f1']:.4f}",
            flush=True,
        )
    atomic_write_dataframe(RESULTS, rows)


def searched_choice(seed: int = 0) -> str:
    """The recipe the search chose on validation (every searched recipe with a row at ``seed``)."""
    rows = read_results()
    searched = sum(search_stages(rows.loc[(rows["method"] == "lora_llama_gse") & (rows["seed"] == seed), "recipe"]), [])
    if not searched:
        raise SystemExit("no recipe-search rows yet: run python benchmarks/gse_quality.py --search first")
    return choose(rows, searched, seed)


def search(seed: int, out: Path) -> str:
    """Stage 1 (share of hidden-answer training examples), stage 2 (the stage-1 recipes near the best, at
    SCALE x the examples), stage 3 (the stage-2 choice with each SEARCH_STAGE3 change); each choice is the
    best validation figure so far. Returns the final choice."""
    for recipe in SEARCH_STAGE1:
        run_recipe("lora_llama_gse", recipe, seed, namer_overrides(recipe), out)
    tried = list(SEARCH_STAGE1)
    for recipe in near_best(read_results(), tried, seed):
        scaled = f"{recipe}_x{SCALE}"
        run_recipe("lora_llama_gse", scaled, seed, namer_overrides(scaled), out)
        tried.append(scaled)
    choice = choose(read_results(), tried, seed)
    for change in SEARCH_STAGE3:
        recipe = f"{choice}_{change}"
        run_recipe("lora_llama_gse", recipe, seed, namer_overrides(recipe), out)
        tried.append(recipe)
    final = choose(read_results(), tried, seed)
    current = default_recipe("lora_llama_gse")
    print(
        f"recipe chosen on validation: {final} ({' '.join(namer_overrides(final))}); conf/model/lora_llama_gse.yaml "
        + ("holds it" if final == current else f"holds {current}: set it there"),
        flush=True,
    )
    return final


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["go_enrichment", "lora_llama_gse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gse_quality"))
    parser.add_argument("--table", action="store_true", help="only rewrite docs/gene_sets.md from the CSV")
    parser.add_argument(
        "--copy-baseline",
        action="store_true",
        help=f"measure how much the top evidence term recalls on validation examples -> {COPY_BASELINE.name}",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="lora_llama_gse: run this searched recipe (hide50, hide50_x4, hide0_x4_tok24, ...; 'chosen': the search's "
        "validation choice) instead of the config's own",
    )
    parser.add_argument("--rerun", action="store_true", help="run again rows already stored (they are replaced)")
    parser.add_argument(
        "--rescore", action="store_true", help="recompute every row's BERTScore from its kept predictions file"
    )
    parser.add_argument(
        "--search", action="store_true", help="the namer's recipe search on the first of --seeds (chosen on validation)"
    )
    args = parser.parse_args(argv)
    if args.table:
        write_doc()
        return
    if args.rescore:
        rescore_bertscore()
        write_doc()
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    if args.copy_baseline:
        print(json.dumps(copy_baseline(), indent=1))
        return
    if args.search:
        search(args.seeds[0], out)
        return
    for method in args.methods:
        recipe, extra = default_recipe(method), list(args.override)
        if args.recipe and method == "lora_llama_gse":
            recipe = args.recipe if args.recipe != "chosen" else searched_choice()
            extra = namer_overrides(recipe) + extra
        if args.override:  # not a searched recipe: the row says what it ran
            recipe = "+".join([recipe, *args.override])
        # The baseline and summer_gse (greedy decoding) have no randomness: one run stands for every seed.
        for seed in args.seeds[:1] if method in ("go_enrichment", "summer_gse") else args.seeds:
            run_recipe(method, recipe, seed, extra, out, args.rerun)


if __name__ == "__main__":
    main()
