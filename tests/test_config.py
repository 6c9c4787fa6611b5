"""The Hydra configs compose: every model, dataset, experiment and sweep choice (found in conf/, so a new one is
covered the day it is added), the configs that extend another differ from it only where they say, and the run's
knowledge settings reach every reader of the knowledge files."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from perturb_models.config import compose_config
from tests.conftest import CONF


def choices(group: str) -> list[str]:
    """The options of a config group, as ``--help`` lists them, less the shared parts (``_base``, ``_files``)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def is_namer(model: str) -> bool:
    return "namer" in compose_config("train", [f"model={model}", "data=k562_gse"], "/unused").model


def resolved(overrides: list[str], config_name: str = "train") -> dict[str, Any]:
    return OmegaConf.to_container(compose_config(config_name, overrides, "/unused"), resolve=True)


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_config_composes_and_resolves(model):
    data = "k562_gse" if is_namer(model) else "k562"
    cfg = resolved([f"model={model}", f"data={data}"])
    assert cfg["model"]["name"] == model and cfg["data"]["task"] in ("joint", "gse")


@pytest.mark.parametrize("data", [d for d in choices("data") if d != "base"])
def test_every_data_config_composes_and_resolves(data):
    model = "go_enrichment" if data.endswith("_gse") else "mlp"
    cfg = resolved([f"data={data}", f"model={model}", *(["data.name=mine"] if data == "custom" else [])])
    assert cfg["data"]["name"] and cfg["data"]["root"] is None and cfg["data"]["download"] in (True, False)


@pytest.mark.parametrize("group", ["experiment", "sweep"])
def test_every_experiment_and_sweep_config_composes(group):
    for name in choices(group):
        assert resolved([f"{group}={name}"])["model"]["name"]


@pytest.mark.parametrize("config_name", ["evaluate", "predict", "design"])
def test_the_other_commands_configs_compose(config_name):
    assert resolved([], config_name)


def test_the_tiny_llama_is_the_llama_config_with_only_its_listed_differences():
    """conf/model/lora_llama_tiny.yaml extends lora_llama: a new lora_llama option reaches the tiny model
    (the one the tests train), and every difference between them is one of these."""
    big = flat(resolved(["model=lora_llama", "data=synthetic"])["model"])
    tiny = flat(resolved(["model=lora_llama_tiny", "data=synthetic"])["model"])
    differing = {key for key in big.keys() | tiny.keys() if big.get(key, "<absent>") != tiny.get(key, "<absent>")}
    tiny_graph = {k for k in tiny if k.startswith("encoder.graphs.coresponse.")}
    go_graph = {k for k in big if k.startswith("encoder.graphs.go.")}
    listed = {
        "name",
        "encoder.pretrained",
        "encoder.tokenizer",
        "encoder.llama_config",
        "encoder.lora.r",
        "encoder.lora.alpha",
        "encoder.lora.dropout",
        "encoder.lora.target_modules",
        "encoder.prompt.descriptions",
        "encoder.prompt.retrieval_k",
        "encoder.prompt.show",
        "encoder.prompt.max_description_chars",
        "encoder.prior_options.k",
        "encoder.prior_options.shrinkage",
        "encoder.max_length",
        "encoder.micro_batch_tokens",
        "optimizer.lr",
        "scheduler.warmup_steps",
        "scheduler.decay",
    }
    listed |= {k for k in tiny if k.startswith("encoder.llama_config.")}
    assert differing - tiny_graph - go_graph <= listed, differing - tiny_graph - go_graph - listed
    assert not go_graph & tiny.keys(), "the tiny model retrieves over the co-response graph only"
    assert tiny["encoder._target_"] == big["encoder._target_"]
    assert yaml.safe_load((CONF / "model" / "lora_llama_tiny.yaml").read_text())["defaults"][0] == "lora_llama"


@pytest.mark.parametrize("model", ["lora_llama_gse", "summer_gse"])
def test_the_tiny_gene_set_namer_extends_the_gene_set_namer(model):
    big = resolved([f"model={model}", "data=k562_gse"])["model"]["namer"]
    tiny = resolved([f"model={model}_tiny", "data=k562_gse"])["model"]["namer"]
    assert tiny.keys() == big.keys() and tiny["_target_"] == big["_target_"]


@pytest.mark.parametrize("model", choices("model"))
def test_knowledge_settings_reach_every_reader_of_the_knowledge_files(model):
    """Each reader's knowledge_root / allow_download is the run's knowledge.root / knowledge.allow_download."""
    data = "k562_gse" if is_namer(model) else "k562"
    cfg = resolved([f"model={model}", f"data={data}", "knowledge.root=/my/knowledge", "knowledge.allow_download=false"])
    values = flat(cfg["model"])
    roots = {k: v for k, v in values.items() if k.endswith(("knowledge_root", "knowledge.root"))}
    downloads = {k: v for k, v in values.items() if k.endswith("allow_download")}
    if model in (
        "knn",
        "gat",
        "gears",
        "embedding_mlp",
        "lora_llama",
        "summer",
        "go_enrichment",
        "lora_llama_gse",
        "summer_gse",
    ):
        assert roots and downloads.keys() <= {k.replace("knowledge_root", "allow_download") for k in roots} | {
            k.replace("knowledge.root", "knowledge.allow_download") for k in roots
        }
    assert all(v == "/my/knowledge" for v in roots.values()), roots
    assert all(v is False for v in downloads.values()), downloads
