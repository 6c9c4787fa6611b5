"""How long the bootstrap intervals of the per-gene AUROC take (perturb_models.metrics).

    python benchmarks/bootstrap_speed.py                         # K562's test shape, synthetic scores
    python benchmarks/bootstrap_speed.py --predictions RUN/predictions/test.csv [--other RUN2/predictions/test.csv]

Without ``--predictions`` it times a synthetic test split of K562's shape (23,212 DE pairs, 267 test
perturbations, 4,118 downstream genes, 12.9% positive). Prints seconds per interval and per paired test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from perturb_models.metrics import DEFAULT_RESAMPLES, bootstrap_auroc_per_gene, paired_bootstrap


def synthetic_frame(pairs: int, perts: int, genes: int, positive: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = (rng.random(pairs) < positive).astype(np.int64)
    cell = rng.choice(perts * genes, size=pairs, replace=False)  # distinct (pert, gene) pairs
    return pd.DataFrame(
        {
            "pert": (cell // genes).astype(str),
            "gene": (cell % genes).astype(str),
            "task": "de",
            "label": label,
            "score": rng.normal(size=pairs) + 0.4 * label,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", help="a run's predictions/test.csv (default: synthetic, K562's shape)")
    parser.add_argument("--other", help="a second predictions file on the same pairs, for the paired test")
    parser.add_argument("--task", default="de")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.predictions:
        first = pd.read_csv(args.predictions)
        second = (
            pd.read_csv(args.other)
            if args.other
            else first.assign(score=first["score"] + 0.05 * np.random.default_rng(1).normal(size=len(first)))
        )
        source = args.predictions
    else:
        first = synthetic_frame(23212, 267, 4118, 0.129, seed=0)
        second = first.assign(score=first["score"] + 0.3 * np.random.default_rng(1).normal(size=len(first)))
        source = "synthetic, K562 test shape"
    rows = first.loc[first["task"] == args.task]
    print(
        f"{source}: {len(rows):,} {args.task} pairs, {rows['pert'].nunique()} perturbations, "
        f"{rows['gene'].nunique():,} genes; {args.resamples} resamples; torch threads {torch.get_num_threads()}"
    )
    for name, call in (
        (
            "interval",
            lambda: bootstrap_auroc_per_gene(rows["label"], rows["score"], rows["gene"], rows["pert"], args.resamples),
        ),
        ("paired test", lambda: paired_bootstrap(first, second, args.task, args.resamples)),
    ):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - started)
        print(f"{name:12s} best of {args.repeats}: {min(times):.2f} s  ({result})")


if __name__ == "__main__":
    main()
