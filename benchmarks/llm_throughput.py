"""Training throughput of LoRA Llama classifiers: tokens/s, and MFU against the GPU's bf16 peak.

Models (random weights of the real shapes: speed does not depend on the values):
  tiny       the 2-layer model of conf/model/lora_llama_tiny.yaml
  smollm2    SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49,152)
  llama3-8b  Llama-3-8B (32 layers, hidden 4096, 32 heads / 8 KV heads, MLP 14336, vocab 128,256); GPU only

Each step is the project's own training step: ``LoRALlamaClassifier.accumulate`` (token-budget
micro-batches, each forward + backward as it goes, the classifier's loss) then AdamW on the adapter + score
head, on ``--batch-size`` pairs whose prompt lengths are drawn from 256 real ``model=lora_llama`` training
prompts of ``--lengths-from`` (default K562, descriptions and evidence included; token ids random). Tokens
counted are prompt tokens (padding excluded). On CUDA the base weights are bf16 (LoRA + head float32) under
bf16 autocast (``trainer=gpu``); on CPU everything is float32 and MFU is not computed.

Model FLOPs per token (the PaLM convention, adapted to frozen weights): a frozen weight matrix costs
2 FLOPs per parameter forward and 2 backward (input gradient only, no weight gradient): 4 * N_frozen;
trainable LoRA/score weights cost 6 * N_trainable; attention scores and values 12 * layers * hidden * seq
(forward + backward). Embedding lookups are not matmuls and are not counted. Recomputation under
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

    python benchmarks/llm_throughput.py                      # GPU: all three; CPU: tiny + smollm2
    python benchmarks/llm_throughput.py --models smollm2 --batch-size 8 --steps 2
    python benchmarks/llm_throughput.py --models llama3-8b --batch-size 64 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
}


def gpu_peak_tflops(name: str) -> float | None:
    """bf16 peak of a CUDA device by name; None when the GPU is not in the table."""
    if "H100" in name and "PCIe" in name:
        return BF16_PEAK_TFLOPS["H100 PCIe"]
    if "H100" in name and "NVL" in name:
        return BF16_PEAK_TFLOPS["H100 NVL"]
    for key in ("H200", "H100 80GB HBM3", "H100 SXM", "A100"):
        if key.split()[0] in name:
            return BF16_PEAK_TFLOPS[key]
    return None


def real_prompt_lengths(data: str, count: int, seed: int = 0) -> list[int]:
    """Token lengths of ``count`` random training prompts of ``model=lora_llama`` on ``data`` (its default
    prompt settings, descriptions and evidence included), counted with the SmolLM2 tokenizer."""
    from perturb_models.builders import build_datamodule
    from perturb_models.config import compose_config
    from perturb_models.models.llm import load_tokenizer
    from perturb_models.models.llm.prompts import builder_from_context

    cfg = compose_config("train", ["model=lora_llama", f"data={data}", "data.task=joint"])
    datamodule = build_datamodule(cfg.data)
    builder = builder_from_context(datamodule.context, graphs=cfg.model.encoder.graphs, **cfg.model.encoder.prompt)
    tokenizer = load_tokenizer("smollm2")
    frame = datamodule.frames["train"].sample(count, random_state=seed)
    return [len(tokenizer(builder(p, g))["input_ids"]) for p, g in zip(frame["pert"], frame["gene"])]


def build(shape: str, args: argparse.Namespace, device: torch.device):
    """The project's ``LoRALlamaClassifier`` with random weights of ``shape`` (on the synthetic data's vocab)."""
    from perturb_models.data.datamodule import PerturbQADataModule
    from perturb_models.models.llm import LoRALlamaClassifier

    datamodule = PerturbQADataModule(name="synthetic", task="joint", synthetic={"n_genes": 400, "n_perts": 300})
    datamodule.setup()
    config = dict(SHAPES[shape], max_position_embeddings=4096)
    with torch.device(device):
        encoder = LoRALlamaClassifier(
            datamodule.context,
            pretrained=None,
            tokenizer="words",
            llama_config=config,
            lora={"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": args.targets},
            prompt={"descriptions": None, "retrieval_k": 0},
            max_length=max(args.lengths),
            micro_batch_tokens=args.micro_batch_tokens,
            gradient_checkpointing=args.gradient_checkpointing,
            dtype="bfloat16" if device.type == "cuda" else "float32",
            token_cache=False,
        )
    encoder.to(device).train()
    return encoder, datamodule


def flops_per_token(model, config, seq_len: float) -> float:
    embed = model.get_base_model().get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) - embed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * frozen + 6.0 * trainable + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def measure(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    import random

    torch.manual_seed(0)
    encoder, datamodule = build(shape, args, device)
    loss_fn = torch.nn.CrossEntropyLoss()
    params = [p for p in encoder.parameters() if p.requires_grad]
    from perturb_models.models.llm import adamw

    optimizer = adamw(params, lr=1e-4)
    config = encoder.model.get_base_model().config
    rng = random.Random(0)
    train = datamodule.splits["train"]
    batches = []
    for step in range(args.warmup + args.steps):
        batch = train[torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(train)]
        keys = encoder.tokens.keys(batch["pert"], batch["gene"])
        # Token ids of the real prompt lengths (the values do not change the speed); never the pad id.
        rows = [[rng.randrange(1, config.vocab_size) for _ in range(rng.choice(args.lengths))] for _ in keys]
        encoder.tokens.row_of = {k: i for i, k in enumerate(keys)}
        encoder.tokens.rows = [torch.tensor(r, dtype=torch.int32) for r in rows]
        batches.append(
            ({k: v.to(device) for k, v in batch.items()}, dict(encoder.tokens.row_of), list(encoder.tokens.rows))
        )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step(batch, row_of, rows) -> int:
        encoder.tokens.row_of, encoder.tokens.rows = row_of, rows
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            encoder.accumulate(batch, loss_fn, lambda loss: loss.backward())  # the classifier's training step
        optimizer.step()
        return sum(len(r) for r in rows)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for item in batches[: args.warmup]:
        step(*item)
    sync()
    started = time.perf_counter()
    tokens = sum(step(*item) for item in batches[args.warmup :])
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = tokens / seconds
    mean_len = sum(args.lengths) / len(args.lengths)
    result = {
        "model": shape,
        "device": device_name(device),
        "batch_size": args.batch_size,
        "prompt_tokens_mean": round(mean_len, 1),
        "prompt_tokens_max": max(args.lengths),
        "lengths_from": args.lengths_from,
        "micro_batch_tokens": args.micro_batch_tokens,
        "steps": args.steps,
        "lora_r": args.lora_r,
        "gradient_checkpointing": args.gradient_checkpointing,
        "params": sum(p.numel() for p in encoder.parameters()),
        "trainable": sum(p.numel() for p in params),
        "tokens_per_s": round(tokens_per_s, 1),
        "pairs_per_s": round(args.batch_size * args.steps / seconds, 2),
        "step_seconds": round(seconds / args.steps, 4),
    }
    if device.type == "cuda":
        achieved = tokens_per_s * flops_per_token(encoder.model, config, mean_len)
        peak = args.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name(device))
        result["model_tflops"] = round(achieved / 1e12, 1)
        result["mfu"] = round(achieved / (peak * 1e12), 4) if peak else None
        result["bf16_peak_tflops"] = peak
        result["peak_source"] = args.peak_source if args.peak_tflops else "data sheet (dense bf16)"
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    encoder = optimizer = None  # free this shape's weights before the next one
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, choices=sorted(SHAPES), help="default: all on GPU, tiny and smollm2 on CPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on GPU, 2 on CPU")
    parser.add_argument(
        "--lengths-from",
        default="k562",
        help="dataset whose real lora_llama prompts give the lengths (needs $PERTURBQA_DATA and "
        "$PERTURB_KNOWLEDGE), a JSON file {dataset, lengths} of lengths measured ahead, or "
        "'fixed' to use --seq-len for every prompt",
    )
    parser.add_argument("--seq-len", type=int, default=256, help="prompt length with --lengths-from fixed")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 peak to divide by for MFU (default: the GPU's data-sheet dense bf16 peak)",
    )
    parser.add_argument("--peak-source", default="measured", help="what --peak-tflops is, for the record")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--record",
        action="store_true",
        help="merge the results into benchmarks/results/llm_throughput.json (a row per model shape "
        "and device replaces the older one) and rewrite docs/llm.md's speed table",
    )
    parser.add_argument("--table", action="store_true", help="only rewrite docs/llm.md's speed table from the JSON")
    args = parser.parse_args()
    if args.table:
        write_speed_table()
        return
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.models = args.models or (["tiny", "smollm2", "llama3-8b"] if gpu else ["tiny", "smollm2"])
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    if args.lengths_from == "fixed":
        args.lengths = [args.seq_len]
    elif args.lengths_from.endswith(".json"):  # lengths measured ahead (benchmarks/gpu_checks.py prepare)
        with open(args.lengths_from) as handle:
            stored = json.load(handle)
        args.lengths, args.lengths_from = stored["lengths"], stored["dataset"]
    else:
        args.lengths = real_prompt_lengths(args.lengths_from, 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if not gpu and "llama3-8b" in args.models:
        parser.error("llama3-8b needs a GPU (32 GB of float32 weights; too slow to be meaningful on CPU)")
    rows = []
    for shape in args.models:
        row = measure(shape, args, device)
        rows.append(row)
        mfu = (
            f"  MFU {100 * row['mfu']:.1f}% of {row['bf16_peak_tflops']:.0f} TFLOP/s bf16"
            if row.get("mfu")
            else "  (MFU: GPU only)"
        )
        print(
            f"{shape:10s} {row['device']}: {row['tokens_per_s']:,.0f} training tokens/s, {row['pairs_per_s']} pairs/s "
            f"(batch {row['batch_size']}, prompts of {row['prompt_tokens_mean']:.0f} tokens on average from "
            f"{row['lengths_from']}, LoRA r={row['lora_r']}){mfu}",
            flush=True,
        )
    if hasattr(os, "getloadavg"):
        # Other jobs on the machine slow a CPU figure down: the row says how busy the machine was.
        load = round(os.getloadavg()[0], 1)
        print(f"load average during the run: {load} on {os.cpu_count()} CPUs")
        for row in rows:
            row["load_average"] = load
    print(json.dumps(rows, indent=1))
    from perturb_models.io import atomic_write_json

    if args.json:
        atomic_write_json(args.json, rows)
    if args.record:
        from docs_tables import LLM_SPEED_JSON, read_throughput_rows

        key = lambda r: (r["model"], r["device"], r["batch_size"])  # noqa: E731
        fresh = {key(r) for r in rows}
        atomic_write_json(LLM_SPEED_JSON, [r for r in read_throughput_rows() if key(r) not in fresh] + rows)
        write_speed_table()


def write_speed_table() -> None:
    from docs_tables import LLM_DOC, read_throughput_rows, throughput_table, with_llm_speed_block

    from perturb_models.io import atomic_write_text

    rows = read_throughput_rows()
    atomic_write_text(LLM_DOC, with_llm_speed_block(LLM_DOC.read_text(), rows))
    print(throughput_table(rows))
    print(f"{LLM_DOC} updated")


if __name__ == "__main__":
    main()
