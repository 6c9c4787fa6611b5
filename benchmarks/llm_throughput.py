"""Training throughput of LoRA Llama classifiers: tokens/s, and MFU against the GPU's bf16 peak.

Models (random weights of the real shapes: speed does not depend on the values):
  tiny       the 2-layer model of conf/model/lora_llama_tiny.yaml
  smollm2    SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49,152)
  llama3-8b  Llama-3-8B (32 layers, hidden 4096, 32 heads / 8 KV heads, MLP 14336, vocab 128,256); GPU only

Each step is a full LoRA training step (forward, backward, AdamW on the adapter + score head) on a batch
of ``--batch-size`` sequences of ``--seq-len`` tokens, as ``LoRALlamaClassifier`` runs it. On CUDA the base
weights are bf16 and the step runs under bf16 autocast (``trainer=gpu``); on CPU everything is float32.

Model FLOPs per token (the PaLM convention, adapted to frozen weights): a frozen weight matrix costs
2 FLOPs per parameter forward and 2 backward (input gradient only, no weight gradient): 4 * N_frozen;
trainable LoRA/score weights cost 6 * N_trainable; attention scores and values 12 * layers * hidden * seq
(forward + backward). Embedding lookups are not matmuls and are not counted. Recomputation under
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

    python benchmarks/llm_throughput.py                      # GPU: all three; CPU: tiny + smollm2
    python benchmarks/llm_throughput.py --models llama3-8b --batch-size 16 --gradient-checkpointing
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

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
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


def build(shape: str, lora_r: int, targets: list[str], device: torch.device, gradient_checkpointing: bool):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[shape], num_labels=3, pad_token_id=0, max_position_embeddings=4096)
    with torch.device(device):
        base = LlamaForSequenceClassification(config).to(dtype)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=2 * lora_r,
                                            lora_dropout=0.0, target_modules=targets))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, config


def flops_per_token(model, config, seq_len: int) -> float:
    embed = model.get_base_model().get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) - embed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * frozen + 6.0 * trainable + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def measure(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, config = build(shape, args.lora_r, args.targets, device, args.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch, seq = args.batch_size, args.seq_len
    ids = torch.randint(1, config.vocab_size, (batch, seq), device=device)  # no pad id inside: full length
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 3, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = batch * seq * args.steps / seconds
    result = {
        "model": shape, "device": device_name(device), "batch_size": batch, "seq_len": seq, "steps": args.steps,
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
        "tokens_per_s": round(tokens_per_s, 1), "step_seconds": round(seconds / args.steps, 4),
    }
    if device.type == "cuda":
        achieved = tokens_per_s * flops_per_token(model, config, seq)
        peak = gpu_peak_tflops(torch.cuda.get_device_name(device))
        result["model_tflops"] = round(achieved / 1e12, 1)
        result["mfu"] = round(achieved / (peak * 1e12), 4) if peak else None
        result["bf16_peak_tflops"] = peak
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    del model, optimizer
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
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES),
                        help="default: all on GPU, tiny and smollm2 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on GPU, 2 on CPU")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.models = args.models or (["tiny", "smollm2", "llama3-8b"] if gpu else ["tiny", "smollm2"])
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if not gpu and "llama3-8b" in args.models:
        parser.error("llama3-8b needs a GPU (32 GB of float32 weights; too slow to be meaningful on CPU)")
    rows = []
    for shape in args.models:
        row = measure(shape, args, device)
        rows.append(row)
        mfu = f"  MFU {100 * row['mfu']:.1f}% of {row['bf16_peak_tflops']:.0f} TFLOP/s bf16" if row.get("mfu") else ""
        print(f"{shape:10s} {row['device']}: {row['tokens_per_s']:,.0f} training tokens/s "
              f"(batch {row['batch_size']} x {row['seq_len']}, LoRA r={row['lora_r']}){mfu}", flush=True)
    if os.environ.get("PERTURB_MODELS_BENCH_LOAD") != "0" and hasattr(os, "getloadavg"):
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps(rows, indent=1))
    if args.json:
        from perturb_models.io import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
