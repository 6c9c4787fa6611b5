"""Training throughput of a model (mlp, gears) on K562: the framework's Trainer vs a plain PyTorch loop.

Both train the same model (same initial weights) on the same whole-split tensors with the same
batches and optimizer; validation, logging and checkpointing are off on both sides, so the figure is
the cost of the Lightning/Hydra machinery per training step. Rounds alternate between the two to
share any background load fairly; the median round of each is reported.

    PERTURBQA_DATA=/path/to/perturbqa python benchmarks/throughput.py [--dataset k562] [--epochs 2] [--rounds 3]
    python benchmarks/throughput.py --model gears --accelerator gpu --json ratio.json   # needs $PERTURB_KNOWLEDGE

On a GPU (``--accelerator gpu``) both sides train under bf16 autocast as ``trainer=gpu`` does, each batch
sliced on the CPU and copied to the device, as the DataModule's batches are.

Last line: ``framework/plain throughput ratio: X.XX``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perturb_models.builders import build_datamodule, build_model, build_trainer  # noqa: E402
from perturb_models.config import compose_config  # noqa: E402
from perturb_models.data.datamodule import SplitBatchSampler  # noqa: E402


class PairCounter(L.Callback):
    """Times training batches after a warm-up, as the plain loop does."""

    def __init__(self, warmup: int):
        self.warmup, self.pairs, self.started, self.elapsed = warmup, 0, None, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.started is None:
            self.started = time.perf_counter()
        if self.started is not None:
            self.pairs += len(batch["label"])

    def on_train_end(self, trainer, module):
        if torch.cuda.is_available() and module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.elapsed = time.perf_counter() - self.started


def plain_loop(
    model, dataset, batch_size: int, epochs: int, seed: int, warmup: int, device: torch.device | None = None
) -> float:
    device = device or torch.device("cpu")
    model.to(device)
    encoder, head = model.encoder, model.head
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = model.optimizer_factory(params=params)
    loss_fn = torch.nn.CrossEntropyLoss()
    encoder.train(), head.train()
    sampler = SplitBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    step, pairs, started = 0, 0, None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for rows in sampler:
            if step == warmup:
                started = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in dataset[rows].items()}
            with autocast:
                loss = loss_fn(head(encoder(batch)).float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if started is not None:
                pairs += len(rows)
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return pairs / (time.perf_counter() - started)


def framework_run(cfg, model, datamodule, epochs: int, warmup: int) -> float:
    counter = PairCounter(warmup)
    trainer = build_trainer(
        cfg,
        callbacks=[counter],
        loggers=[],
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return counter.pairs / counter.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="k562")
    parser.add_argument("--model", default="mlp", help="a model config: mlp, gears, ...")
    parser.add_argument(
        "--accelerator",
        default="cpu",
        choices=["cpu", "gpu"],
        help="gpu: trainer=gpu (bf16 mixed precision) against a plain loop under bf16 autocast",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides (e.g. data=synthetic graph swaps)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from timing")
    args = parser.parse_args()

    hardware = ["trainer=gpu"] if args.accelerator == "gpu" else ["trainer.accelerator=cpu"]
    cfg = compose_config(
        "train",
        [
            f"data={args.dataset}",
            f"model={args.model}",
            "logger=none",
            *hardware,
            *args.set,
            "paths.output_dir=/tmp/perturb_models_throughput",
        ],
    )
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    L.seed_everything(0)
    datamodule = build_datamodule(cfg.data)
    template = build_model(cfg, datamodule)
    train_split = datamodule.splits["train"]
    print(
        f"model={args.model} accelerator={args.accelerator} dataset={args.dataset} train pairs={len(train_split)} "
        f"batch={cfg.data.batch_size} "
        f"epochs/round={args.epochs} threads={torch.get_num_threads()}"
    )

    plain, framework = [], []
    for round_ in range(args.rounds):
        plain.append(
            plain_loop(
                copy.deepcopy(template), train_split, cfg.data.batch_size, args.epochs, cfg.seed, args.warmup, device
            )
        )
        framework.append(framework_run(cfg, copy.deepcopy(template), datamodule, args.epochs, args.warmup))
        print(f"round {round_ + 1}: plain {plain[-1]:,.0f} pairs/s, framework {framework[-1]:,.0f} pairs/s")
    plain_median, framework_median = statistics.median(plain), statistics.median(framework)
    print(f"plain PyTorch loop: {plain_median:,.0f} pairs/s (median of {args.rounds})")
    print(f"framework Trainer:  {framework_median:,.0f} pairs/s (median of {args.rounds})")
    print(f"framework/plain throughput ratio: {framework_median / plain_median:.2f}")
    if args.json:
        from perturb_models.io import atomic_write_json

        atomic_write_json(
            args.json,
            {
                "model": args.model,
                "dataset": args.dataset,
                "accelerator": args.accelerator,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "batch_size": int(cfg.data.batch_size),
                "epochs_per_round": args.epochs,
                "rounds": args.rounds,
                "plain_pairs_per_s": round(plain_median, 1),
                "framework_pairs_per_s": round(framework_median, 1),
                "ratio": round(framework_median / plain_median, 3),
            },
        )


if __name__ == "__main__":
    main()
