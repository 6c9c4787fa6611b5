"""Graph build time (cold vs cached) and training steps per second of gat and gears.

    python benchmarks/graph_speed.py --data k562 --steps 10 --batch-size 8192

Cold builds go to a fresh temporary cache folder; the second build of the same spec loads it. Steps
are full optimisation steps (one full-graph forward + backward each) on the dataset's training pairs.
Needs $PERTURBQA_DATA and $PERTURB_KNOWLEDGE. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides: list[str]):
    from perturb_models.config import compose_config

    return compose_config("train", overrides)


def main(argv: list[str] | None = None) -> int:
    import torch
    from omegaconf import OmegaConf

    from perturb_models.builders import build_datamodule, build_model
    from perturb_models.knowledge.graphs import build_graph

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="k562")
    parser.add_argument("--graphs", nargs="+", default=["go", "go_kg", "coresponse"])
    parser.add_argument("--models", nargs="*", default=["gat", "gears"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = compose([f"data={args.data}"])
    datamodule = build_datamodule(cfg.data)
    context = datamodule.context
    print(
        f"dataset {args.data}: {len(context.vocab)} genes, {len(context.train_pairs)} training pairs, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    )
    with tempfile.TemporaryDirectory() as cache:
        for name in args.graphs:
            spec = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "graph" / f"{name}.yaml"))
            spec.update(cache=True, cache_dir=cache)
            started = time.perf_counter()
            graph = build_graph(spec, context, name)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            build_graph(spec, context, name)
            cached = time.perf_counter() - started
            print(
                f"graph {name:<10} cold {cold:7.2f} s   cached {cached:6.3f} s   "
                f"{graph.num_nodes} nodes, {graph.num_edges} edges, {graph.num_isolated_genes} genes without edges"
            )
    for model_name in args.models:
        cfg = compose([f"data={args.data}", f"model={model_name}", f"data.batch_size={args.batch_size}"])
        datamodule = build_datamodule(cfg.data)
        model = build_model(cfg, datamodule)
        optimizer = model.optimizer_factory(params=model.parameters())
        batches = iter(datamodule.train_dataloader())
        model.train()

        def step(model=model, optimizer=optimizer, datamodule=datamodule):
            nonlocal batches
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(datamodule.train_dataloader())
                batch = next(batches)
            loss = model.loss_fn(model(batch), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step()  # warm-up (allocations, first-call overheads)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        elapsed = time.perf_counter() - started
        params = sum(p.numel() for p in model.parameters())
        print(
            f"model {model_name:<6} {args.steps / elapsed:6.2f} steps/s  "
            f"({args.batch_size * args.steps / elapsed:8.0f} pairs/s, "
            f"batch {args.batch_size}, {params} parameters)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
