"""Speed of an in-silico screen through predict.py: every GO-annotated human gene knocked down, scored
against 100 downstream genes, per model.

    python benchmarks/predict_speed.py --data k562 --models knn gears embedding_mlp
    python benchmarks/predict_speed.py --run knn=outputs/my_knn --run gears=outputs/my_gears

A model without ``--run NAME=RUN_DIR`` is trained first into a temporary folder with a few training
batches (``trainer.max_epochs=1 trainer.limit_train_batches=20``): the screen's speed does not depend on
how well the weights are fitted. Each screen runs twice in one process: the first call builds what the
new genes need (GO term sets, graph rows, text embeddings; text embeddings are then cached on disk),
the second shows a repeated screen. Targets: 100 measured downstream genes drawn with ``--seed``.
Needs $PERTURBQA_DATA and $PERTURB_KNOWLEDGE. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_quick(model: str, data: str, out: Path) -> Path:
    from perturb_models.config import compose_config
    from perturb_models.training import train

    overrides = [
        f"model={model}",
        f"data={data}",
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=20",
        "trainer.enable_progress_bar=false",
    ]
    train(compose_config("train", overrides, out))
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pandas as pd
    import torch

    from perturb_models.config import compose_config
    from perturb_models.prediction import predict
    from perturb_models.results import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="k562")
    parser.add_argument("--models", nargs="*", default=["knn", "gears", "embedding_mlp"])
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="MODEL=RUN_DIR",
        help="a trained run to screen with instead of a quick training",
    )
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="screens per model in one process")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    models = list(dict.fromkeys([*args.models, *runs]))
    print(
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for model in models:
            run = Path(runs[model]) if model in runs else train_quick(model, args.data, scratch / f"train_{model}")
            split = json.loads((run / "split.json").read_text())
            genes = sorted(pd.read_csv(run / "predictions" / "test.csv")["gene"].unique())
            targets = np.random.default_rng(args.seed).choice(genes, size=min(args.targets, len(genes)), replace=False)
            target_file = scratch / f"targets_{model}.txt"
            target_file.write_text("\n".join(sorted(targets)) + "\n")
            for repeat in range(args.repeats):
                out = scratch / f"screen_{model}_{repeat}"
                cfg = compose_config(
                    "predict",
                    [
                        f"ckpt_path={run}",
                        "perts=all_known",
                        f"genes={target_file}",
                        "evidence=false",
                        "summary_perts=0",
                    ],
                    out,
                )
                started = time.perf_counter()
                frame = predict(cfg)
                wall = time.perf_counter() - started
                query = json.loads((out / "query.json").read_text())
                rows.append(
                    {
                        "model": model,
                        "screen": "first" if repeat == 0 else "repeat",
                        "perturbations": frame["pert"].nunique(),
                        "new_to_model": query["new_perturbations"],
                        "targets": frame["gene"].nunique(),
                        "pairs": len(frame),
                        "scoring_pairs_per_s": round(len(frame) / query["scoring_seconds"]),
                        "wall_s": round(wall, 1),
                        "dataset": split["dataset"],
                    }
                )
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print()
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
