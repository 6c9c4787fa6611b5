"""The code paths that only a GPU takes: bf16-mixed training and the evaluate round trip, fused AdamW,
an adapter checkpoint saved on the GPU and reloaded on the CPU, and ``trainer=ddp`` on one device.

Run with ``pytest -m gpu`` on a machine with CUDA (``benchmarks/gpu_checks.py`` runs them in a GPU lease).
They skip where no CUDA device exists: the hardware is really absent there.
"""

from __future__ import annotations

import json

import pytest
import torch

from perturb_models.builders import build_datamodule, build_model
from perturb_models.evaluation import evaluate
from perturb_models.training import train
from tests.conftest import compose_config
from tests.script_runner import run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)"),
]

GPU = ["logger=none", "trainer=gpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SMALL = [
    "data=synthetic",
    "data.synthetic.n_genes=80",
    "data.synthetic.n_perts=60",
    "data.synthetic.negatives_per_pert=12",
    "data.batch_size=64",
    "data.eval_batch_size=256",
]
TINY_LLM = ["model=lora_llama_tiny", "data.task=joint", "trainer.max_epochs=2", *SMALL]


@pytest.fixture
def cache(isolated_cache):
    return isolated_cache


def _evaluate(run, out, accelerator: str) -> dict:
    hardware = ["trainer=gpu"] if accelerator == "gpu" else ["trainer.accelerator=cpu"]
    return evaluate(
        compose_config("evaluate", [f"ckpt_path={run}", *hardware, "trainer.enable_progress_bar=false"], out)
    )


def test_bf16_mixed_training_and_evaluate_round_trip(tmp_path, cache):
    run = tmp_path / "run"
    cfg = compose_config("train", [*GPU, "model=mlp", "trainer.max_epochs=3", *SMALL], run)
    assert cfg.trainer.precision == "bf16-mixed"
    metrics = train(cfg)
    assert 0.5 < metrics["test/de_auroc_per_gene"] <= 1.0  # synthetic data has planted structure
    again = _evaluate(run, tmp_path / "eval", "gpu")
    for key in ("test/de_auroc_per_gene", "test/dir_auroc_per_gene"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)


def test_fused_adamw_on_cuda_parameters_steps_like_the_unfused_one():
    from perturb_models.models.llm import adamw

    torch.manual_seed(0)
    start = torch.randn(1000, device="cuda")
    results = []
    for fused in (None, False):
        param = torch.nn.Parameter(start.clone())
        optimizer = adamw([param], lr=1e-2, fused=fused)
        assert optimizer.defaults["fused"] is (fused is None)  # CUDA parameters: fused by default
        for _ in range(5):
            optimizer.zero_grad()
            (param**2).sum().backward()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_adapter_checkpoint_saved_on_gpu_reloads_on_cpu(tmp_path, cache):
    run = tmp_path / "run"
    metrics = train(compose_config("train", [*GPU, *TINY_LLM, "model.encoder.dtype=bfloat16"], run))
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    tensors = {k: v for k, v in ckpt["state_dict"].items() if torch.is_tensor(v)}
    assert tensors and all("lora_" in k or "score" in k for k in tensors)  # adapter only
    assert all(v.dtype == torch.float32 for v in tensors.values())  # trainable weights stay float32 over a bf16 base
    on_gpu = _evaluate(run, tmp_path / "eval_gpu", "gpu")
    on_cpu = _evaluate(run, tmp_path / "eval_cpu", "cpu")
    assert on_gpu["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"], abs=1e-6)
    # The CPU rebuilds the bf16 base in float32 arithmetic: the same ranking up to rounding.
    for key in ("test/de_auroc_per_gene", "test/dir_auroc_per_gene"):
        assert on_cpu[key] == pytest.approx(on_gpu[key], abs=0.03)


def test_knn_prior_step_zero_is_knn_on_gpu(cache):
    from perturb_models.models.knn import KNNEncoder

    cfg = compose_config("train", [*GPU, *TINY_LLM, "model.encoder.prior=knn"])
    dm = build_datamodule(cfg.data)
    model = build_model(cfg, dm).cuda().eval()
    knn = KNNEncoder(dm.context, graphs=dict(cfg.model.encoder.graphs), **cfg.model.encoder.prior_options)
    batch = {k: v.cuda() for k, v in dm.splits["test"][torch.arange(64)].items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(model(batch), knn(batch).to(torch.float32))


def test_ddp_strategy_on_one_gpu(tmp_path):
    run = tmp_path / "ddp"
    run_script(
        [
            "train.py",
            "trainer=ddp",
            "trainer.devices=1",
            "model=mlp",
            "trainer.max_epochs=1",
            "logger=none",
            "trainer.enable_progress_bar=false",
            *SMALL,
            f"hydra.run.dir={run}",
        ]
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/de_auroc_per_gene"] <= 1.0
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
