"""model=summer (PerturbQA's SUMMER) and the LLM backends.

- Local backend: a seeded 2-layer random Llama with a word-level tokenizer on ``data=synthetic``: logprob and
  sample scoring, the retrieval categories, the summaries artifact, the response cache, the evaluate round trip.
- Real OpenAI-compatible servers on SmolLM2 (the project's offline weights), started on 127.0.0.1 on a free
  port, answering ``model=summer backend.kind=openai`` end to end: ``transformers serve`` (sampled answers) and
  vLLM's CPU build (logprob scoring, its option probabilities checked against a local forward pass).
- Failure cases against a real stdlib HTTP server on 127.0.0.1 that returns errors, stalls or malformed replies.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from perturb_models.builders import build_datamodule
from perturb_models.evaluation import evaluate_checkpoint
from perturb_models.llm_backends import BackendError, LocalBackend, OpenAIBackend
from perturb_models.models.summer import CATEGORIES, SummerEncoder, SummerRetrieval, parse_answer
from perturb_models.training import train
from tests.conftest import FAST_CPU, compose_config, missing_input, module_word_knowledge, require_module

require_module("transformers", "model=summer runs a language model")

TINY = (
    "{hidden_size:64,intermediate_size:128,num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,"
    "max_position_embeddings:1024}"
)
SMALL_DATA = [
    "data=synthetic",
    "data.synthetic.n_genes=80",
    "data.synthetic.n_perts=60",
    "data.synthetic.negatives_per_pert=12",
    "data.eval_batch_size=1024",
]
# Retrieval over the co-response graph (from the training pairs: no knowledge files needed).
CORESPONSE = ["model.encoder.graphs.go.kind=coresponse", "model.encoder.gene_graphs.go.kind=coresponse"]
TINY_LOCAL = [
    "model=summer",
    *CORESPONSE,
    "model.encoder.backend.pretrained=null",
    "model.encoder.backend.tokenizer=words",
    f"model.encoder.backend.llama_config={TINY}",
    "model.encoder.summaries.source=none",
]


def summer_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    return compose_config(
        "train", [*SMALL_DATA, *FAST_CPU, "trainer.num_sanity_val_steps=0", *TINY_LOCAL, *overrides], tmp_path / name
    )


def encoder_of(cfg, datamodule=None) -> SummerEncoder:
    from hydra.utils import instantiate

    datamodule = datamodule or build_datamodule(cfg.data)
    datamodule.setup("fit")
    return instantiate(cfg.model.encoder, _partial_=True, _convert_="all")(context=datamodule.context), datamodule


# ---- answers and retrieval -----------------------------------------------------------------------------
def test_answers_parse_to_an_option_an_abstention_or_unparsed():
    assert parse_answer("Yes.", "de", cot=False) == 1
    assert parse_answer(" no, it is not", "de", cot=False) == 0
    assert parse_answer("Insufficient evidence", "de", cot=False) is None
    assert parse_answer("banana", "de", cot=False) == "unparsed"
    # chain of thought: the text after the last "Answer:" decides, whatever the reasoning mentions
    assert parse_answer("It could go up... or down.\nAnswer: down", "dir", cot=True) == 0
    assert parse_answer("Both are ribosomal; yes maybe.\nAnswer: insufficient evidence", "de", cot=True) is None
    assert parse_answer("Reasoning without a final line", "joint", cot=True) == "unparsed"
    assert parse_answer("Answer: unchanged", "joint", cot=True) == 0


def test_retrieval_takes_training_pairs_by_category_within_budgets(tmp_path, isolated_cache):
    cfg = summer_cfg(tmp_path)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    context = datamodule.context
    from omegaconf import OmegaConf

    graphs = OmegaConf.to_container(cfg.model.encoder.graphs, resolve=True)
    gene_graphs = OmegaConf.to_container(cfg.model.encoder.gene_graphs, resolve=True)
    budgets = {"same_pert": 2, "same_gene": 3, "both_similar": 2, "random": 2}
    retrieval = SummerRetrieval(context, graphs, gene_graphs, budgets)
    train_pairs = set(zip(context.train_pairs["pert_idx"], context.train_pairs["gene_idx"]))
    train_perts = set(context.vocab.encode(context.train_perts).tolist())
    test = datamodule.frames["test"]
    seen = {c: 0 for c in CATEGORIES}
    for p, g in zip(test["pert_idx"].tolist()[:40], test["gene_idx"].tolist()[:40]):
        examples = retrieval.examples(p, g)
        for q, h, _code, category in examples:
            assert (q, h) in train_pairs and q in train_perts and (q, h) != (p, g)
            seen[category] += 1
        for category in CATEGORIES:
            assert sum(1 for e in examples if e[3] == category) <= budgets[category]
        assert retrieval.examples(p, g) == examples  # the random fill is seeded per pair
        # test perturbations are never trained on: no "same perturbation" examples for them
        assert not any(e[3] == "same_pert" for e in examples)
    assert seen["same_gene"] and seen["random"] and seen["both_similar"]
    # a training perturbation does get same-perturbation examples (never the pair itself)
    p, g = int(context.train_pairs["pert_idx"].iloc[0]), int(context.train_pairs["gene_idx"].iloc[0])
    assert all((q, h) != (p, g) for q, h, _, _ in retrieval.examples(p, g))
    assert any(e[3] == "same_pert" for e in retrieval.examples(p, g))


# ---- local backend end to end ------------------------------------------------------------------------
def test_logprob_scoring_trains_writes_outputs_reloads_and_reruns_from_the_cache(tmp_path, isolated_cache):
    cfg = summer_cfg(tmp_path)
    metrics = train(cfg)
    run = tmp_path / "run"
    for name in ("checkpoints/best.ckpt", "metrics.json", "run.json", "predictions/test.csv"):
        assert (run / name).is_file()
    usage = json.loads((run / "run.json").read_text())["llm_usage"]
    assert usage["pairs"] > 0 and usage["requests"] == usage["pairs"] and usage["prompt_tokens"] > 0
    assert usage["examples_shown"] > 0 and usage["tokens_per_pair"] > 0
    assert 0 < metrics["test/de_auroc_per_gene"] < 1 and metrics["test/dir_genes_scored"] > 0
    scores = pd.read_csv(run / "predictions" / "test.csv")["score"]
    assert scores.nunique() > 10, "logprob scores must vary between pairs"

    # evaluate.py's path: the model rebuilt from the checkpoint answers from the cache, identically
    trainer_cfg = compose_config("evaluate", FAST_CPU[1:], tmp_path / "eval").trainer
    again = evaluate_checkpoint(run, tmp_path / "eval", trainer_cfg)
    for key in ("test/de_auroc_per_gene", "test/dir_auroc_per_gene", "test/loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)

    # a second run with the same settings sends nothing
    metrics2 = train(summer_cfg(tmp_path, name="run2"))
    usage2 = json.loads((tmp_path / "run2" / "run.json").read_text())["llm_usage"]
    assert usage2["requests"] == 0 and usage2["cached"] == usage["pairs"]
    assert metrics2["test/de_auroc_per_gene"] == metrics["test/de_auroc_per_gene"]


def test_sample_scoring_with_cot_and_without_retrieval_counts_every_answer(tmp_path, isolated_cache):
    cfg = summer_cfg(
        tmp_path,
        "model.encoder.scoring=sample",
        "model.encoder.cot=true",
        "model.encoder.samples=2",
        "model.encoder.max_new_tokens=6",
        "model.encoder.retrieval=false",
        "data.test_genes=4",
        "data.val_genes=2",
    )
    encoder, datamodule = encoder_of(cfg)
    assert "Outcomes measured" not in encoder.prompt(
        0, 1
    ) and "'Answer: <unchanged, down, up or insufficient>'" in encoder.prompt(0, 1)
    encoder.prepare_datamodule(datamodule)
    stats = encoder.stats
    pairs = len(datamodule.frames["val"]) + len(datamodule.frames["test"])
    assert stats["pairs"] == len(encoder.memo) and stats["answers"] == 2 * stats["pairs"] and stats["pairs"] <= pairs
    read = stats["answers"] - stats["unparsed_answers"] - stats["abstained_answers"]
    # a pair is scored from its readable answers, or counted as all-abstained with equal probabilities
    assert stats["abstained_pairs"] <= stats["pairs"] and read >= 0
    for probs in encoder.memo.values():
        assert probs.sum() == pytest.approx(1.0)
    assert encoder.backend.usage.completion_tokens > 0
    # the same settings read every sample from the cache
    again, _ = encoder_of(cfg, datamodule)
    again.prepare_datamodule(datamodule)
    assert again.backend.usage.requests == 0 and again.backend.usage.cached == 2 * stats["pairs"]
    assert all(np.array_equal(again.memo[k], v) for k, v in encoder.memo.items())


def test_sampled_answers_continue_one_read_of_the_prompt_and_match_samples_read_from_scratch(isolated_cache):
    words = "knockdown of gene alpha beta gamma delta changes expression up down unchanged answer".split()
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }

    def backend(share_prompt: bool, cache: bool = False) -> LocalBackend:
        return LocalBackend(
            pretrained=None,
            tokenizer="words",
            llama_config=config,
            words=words,
            chat=False,
            device="cpu",
            batch_size=2,
            share_prompt=share_prompt,
            cache=cache,
        )

    # lengths differ within a batch, so the shared read must keep generate's left-padded positions
    prompts = [
        "knockdown of alpha",
        "knockdown of gene beta changes expression of gamma up or down answer",
        "delta",
        "gene gamma answer",
    ]
    settings = {"samples": 3, "max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "seed": 5}
    read_tokens = {}
    answers = {}
    for share in (False, True):
        model = backend(share)
        read_tokens[share] = 0

        def count(module, args, kwargs, share=share):
            read_tokens[share] += int(kwargs["input_ids"].shape[0] * kwargs["input_ids"].shape[1])

        model.model.model.register_forward_pre_hook(count, with_kwargs=True)
        answers[share] = model.generate(prompts, **settings)
    assert answers[True] == answers[False]
    assert any(len(set(samples)) > 1 for samples in answers[True]), "the seeds should give different samples"
    assert read_tokens[True] < read_tokens[False]
    # a run resumed with some samples in the cache keeps them and asks only for the others
    partial = backend(True, cache=True).generate(prompts[:2], **{**settings, "samples": 2})
    resumed = backend(True, cache=True)
    again = resumed.generate(prompts, **settings)
    assert [samples[:2] for samples in again[:2]] == partial and [len(samples) for samples in again] == [3] * 4
    assert resumed.usage.cached == 4 and resumed.usage.requests == len(prompts) * 3 - 4


def test_logprob_scoring_with_cot_is_a_config_error(tmp_path, isolated_cache):
    from perturb_models.errors import ConfigError

    with pytest.raises(ConfigError, match="cot=true needs model.encoder.scoring=sample"):
        encoder_of(summer_cfg(tmp_path, "model.encoder.cot=true"))


def test_summaries_are_a_cached_artifact_other_models_read(tmp_path, isolated_cache):
    knowledge = module_word_knowledge(tmp_path / "knowledge", go_noise=True)
    cfg = summer_cfg(
        tmp_path,
        f"knowledge.root={knowledge}",
        "knowledge.allow_download=false",
        "model.encoder.summaries.source=llm",
        "model.encoder.summaries.max_new_tokens=4",
        "data.test_genes=2",
        "data.val_genes=1",
    )
    encoder, datamodule = encoder_of(cfg)
    encoder.prepare_datamodule(datamodule)
    path = encoder.summaries.path
    assert path is not None and path.is_file() and path.parent == isolated_cache / "summer_summaries"
    stored = json.loads(path.read_text())["summaries"]
    pert, gene = next(iter(encoder.memo))
    assert set(stored[encoder.symbols[pert]]) >= {"pert"} and set(stored[encoder.symbols[gene]]) >= {"gene"}
    assert f"Knocked-down gene {encoder.symbols[pert]}: " in encoder.prompt(pert, gene)
    written = encoder.backend.usage.requests
    assert written >= len(stored)
    # a second encoder reads the artifact: no summary is written again
    again, _ = encoder_of(cfg, datamodule)
    again.prepare_datamodule(datamodule)
    assert again.backend.usage.requests == 0
    # other models' gene text: prompt.descriptions=summer
    from perturb_models.models.llm.prompts import resolve_descriptions

    describe = resolve_descriptions("summer")
    assert describe(encoder.symbols[gene]) == stored[encoder.symbols[gene]]["gene"]


# ---- gene-set naming (model=summer_gse) ---------------------------------------------------------------
def test_names_are_read_after_the_last_name_mark_else_from_the_last_line_and_cut_to_ten_words():
    from perturb_models.gse.summer import parse_name

    text = "These genes build ribosomes. A name: not this one.\n**Name:** *Ribosome biogenesis.*\nThanks"
    assert parse_name(text) == ("Ribosome biogenesis", "These genes build ribosomes. A name: not this one.", True)
    assert parse_name("Overview first.\nName:\n'Proteasome assembly'") == (
        "Proteasome assembly",
        "Overview first.",
        True,
    )
    # no mark: the last non-empty line, and the fallback is flagged
    assert parse_name("They share a pathway.\n\nKinetochore assembly\n") == (
        "Kinetochore assembly",
        "They share a pathway.",
        False,
    )
    long = "Name: " + " ".join(f"w{i}" for i in range(14))
    assert parse_name(long)[0] == " ".join(f"w{i}" for i in range(10))
    assert parse_name(long, max_words=3)[0] == "w0 w1 w2"
    assert parse_name("") == ("", "", False)


def gse_summer_cfg(tmp_path, *overrides, name="run"):
    return compose_config(
        "train",
        ["data=k562_gse", "data.bertscore_model=null", "model=summer_gse_tiny", *FAST_CPU, *overrides],
        tmp_path / name,
    )


def test_summer_gse_names_clusters_from_summaries_reloads_and_reruns_from_the_cache(gse_world, tmp_path):
    from perturb_models.evaluation import evaluate

    metrics = train(gse_summer_cfg(tmp_path))
    run = tmp_path / "run"
    assert "test/rouge1_recall" in metrics and (run / "checkpoints" / "best.ckpt").is_file()
    predictions = pd.read_csv(run / "predictions" / "test.csv", keep_default_na=False)
    assert len(predictions) == 3 and metrics["test/clusters_scored"] == 2
    assert predictions["answer"].str.split().str.len().max() <= 10 and predictions["answer"].str.len().gt(0).all()
    scored = pd.read_csv(run / "predictions" / "test.csv")["rouge1_recall"].dropna()
    assert len(scored) == 2 and metrics["test/rouge1_recall"] == pytest.approx(scored.mean())
    usage = json.loads((run / "run.json").read_text())["llm_usage"]
    assert usage["clusters"] == 3 and usage["summaries"] == "llm" and usage["genes_with_summary"] > 0
    # one answer per cluster, plus one summary per member shown (the summaries artifact of model=summer)
    assert usage["requests"] == 3 + usage["genes_with_summary"] and usage["tokens_per_cluster"] > 0
    artifact = next((gse_world["knowledge"].parents[1] / "cache" / "summer_summaries").glob("*.json"))
    stored = json.loads(artifact.read_text())["summaries"]
    assert set(stored["G000"]) == {"gene"}  # gene clusters: the downstream-gene summaries
    # evaluate.py rebuilds the namer from the record: every answer from the cache, the same names
    again = evaluate(compose_config("evaluate", [f"ckpt_path={run}", *FAST_CPU[1:]], tmp_path / "eval"))
    assert again["test/rouge1_recall"] == pytest.approx(metrics["test/rouge1_recall"])
    reloaded = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv", keep_default_na=False)
    assert reloaded["answer"].tolist() == predictions["answer"].tolist()
    evaluated = json.loads((tmp_path / "eval" / "run.json").read_text())["llm_usage"]
    assert evaluated["requests"] == 0 and evaluated["cached"] == 3  # the names; summaries from the artifact
    # a second run sends nothing
    train(gse_summer_cfg(tmp_path, name="run2"))
    usage2 = json.loads((tmp_path / "run2" / "run.json").read_text())["llm_usage"]
    assert usage2["requests"] == 0 and usage2["cached"] == 3
    rerun = pd.read_csv(tmp_path / "run2" / "predictions" / "test.csv", keep_default_na=False)
    assert rerun["answer"].tolist() == predictions["answer"].tolist()


def test_summer_gse_prompt_lists_capped_members_in_a_fixed_order_with_their_texts(gse_world, tmp_path):
    from hydra.utils import instantiate

    from perturb_models.errors import ConfigError

    def namer_of(*overrides):
        cfg = gse_summer_cfg(tmp_path, "data.gse_kind=pert", *overrides)
        datamodule = build_datamodule(cfg.data)
        namer = instantiate(cfg.model.namer, _convert_="all")
        namer.setup(datamodule.context)
        return namer, [list(g) for g in datamodule.context.clusters["genes"]]

    namer, clusters = namer_of("model.namer.summaries.source=knowledge", "model.namer.max_genes=3")
    genes = clusters[0]  # the 8 genes of one GO term
    prompt = namer.prompt(genes)
    assert prompt.startswith("CRISPRi knockdowns of these human genes") and "in K562 cells" in prompt
    assert [line.split(":")[0] for line in prompt.splitlines() if line.startswith("- G")] == [
        f"- {g}" for g in genes[:3]
    ]
    assert "- and 5 more genes not shown" in prompt and "Name: <name>" in prompt
    assert f"- {genes[0]}: " in prompt and "protein" in prompt  # the knowledge text of the gene
    sorted_namer, _ = namer_of("model.namer.gene_order=sorted", "model.namer.summaries.source=none")
    assert sorted_namer.shown(genes[::-1]) == sorted(genes)[: sorted_namer.max_genes]
    assert f"- {sorted(genes)[0]} (no summary)" in sorted_namer.prompt(genes)
    seeded, _ = namer_of(
        "model.namer.gene_order=seeded", "model.namer.max_genes=4", "model.namer.summaries.source=none"
    )
    assert seeded.shown(genes) == seeded.shown(genes[::-1]) and len(seeded.shown(genes)) == 4
    with pytest.raises(ConfigError, match="model.namer.gene_order must be one of listed, sorted, seeded"):
        namer_of("model.namer.gene_order=random")
    with pytest.raises(ConfigError, match="model.namer.summaries.source must be one of"):
        namer_of("model.namer.summaries.source=wiki")


# ---- a real OpenAI-compatible server ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, name: str, env: dict, startup_s: float):
    """Run a server ``command`` until its ``/health`` answers 200 on ``port``; stop it on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + startup_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"{name} did not answer /health within {startup_s:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory, smollm2_installed):
    """``transformers serve`` on the SmolLM2 GGUF, on 127.0.0.1, stopped when the module's tests end."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        missing_input("transformers serve needs the serve extra: pip install -e '.[serve]'")
    from perturb_models.models.llm import smollm2_gguf

    folder, name = smollm2_gguf()
    model = f"{folder}:{name}"
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]
    with serving(command, port, log, "transformers serve", env, startup_s=180):
        yield f"http://127.0.0.1:{port}/v1", model


def smollm2_folder(dest: Path) -> Path:
    """The SmolLM2 GGUF as a Hugging Face folder (float32 safetensors + tokenizer): what vLLM loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perturb_models.models.llm import smollm2_gguf

    folder, name = smollm2_gguf()
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = dequantized.config
    if hasattr(config, "quantization_config"):  # the weights are plain float32 now
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, smollm2_installed):
    """vLLM (its CPU build, in its own environment: ``$PERTURB_VLLM_PYTHON``, made by
    ``bash .ci/install_vllm_cpu``) serving SmolLM2 on 127.0.0.1; yields (base URL, served name, weights folder)."""
    python = os.environ.get("PERTURB_VLLM_PYTHON", "")
    if not python or not Path(python).is_file():
        missing_input(
            "vLLM not found: set PERTURB_VLLM_PYTHON to the python of an environment with vllm-cpu "
            "(bash .ci/install_vllm_cpu prints it)"
        )
    folder = smollm2_folder(tmp_path_factory.mktemp("smollm2_hf"))
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # its own environment: none of this project's paths, offline, a 1 GiB KV cache
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
    ]
    with serving(command, port, log, "vLLM", env, startup_s=600):
        yield f"http://127.0.0.1:{port}/v1", "smollm2", folder


def test_summer_against_a_real_openai_compatible_server(smollm2_server, tmp_path, isolated_cache):
    base_url, model = smollm2_server
    served = [
        "model.encoder.backend.kind=openai",
        f"model.encoder.backend.base_url={base_url}",
        f"model.encoder.backend.model='{model}'",
        "model.encoder.backend.concurrency=2",
        "model.encoder.backend.timeout=120",
        "data.test_genes=2",
        "data.val_genes=1",
        "model.encoder.scoring=sample",
        "model.encoder.samples=2",
        "model.encoder.answer_tokens=4",
        "model.encoder.retrieval_budgets.random=2",
        "model.encoder.retrieval_budgets.both_similar=2",
    ]
    cfg = summer_cfg(tmp_path, *served)
    metrics = train(cfg)
    usage = json.loads((tmp_path / "run" / "run.json").read_text())["llm_usage"]
    assert usage["backend"]["backend"] == "openai" and usage["requests"] == 2 * usage["pairs"] > 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0  # the server's own counts
    assert usage["answers"] == 2 * usage["pairs"]
    assert metrics["test/de_genes_scored"] > 0
    # every answer is read as an option, an abstention or unreadable (SmolLM2-135M often restates the
    # question instead of answering: those are counted, and the pair falls back to equal probabilities)
    assert usage["abstained_pairs"] <= usage["pairs"]
    # rerun: every answer from the cache, the same metrics
    again = train(summer_cfg(tmp_path, *served, name="run2"))
    usage2 = json.loads((tmp_path / "run2" / "run.json").read_text())["llm_usage"]
    assert usage2["requests"] == 0 and again["test/de_auroc_per_gene"] == metrics["test/de_auroc_per_gene"]
    # transformers serve does not return logprobs: logprob scoring says so, in one line
    backend = OpenAIBackend(base_url, model, cache=False)
    with pytest.raises(BackendError, match="returned no logprobs.*scoring=sample"):
        backend.option_logprobs(["Is the sky blue? Answer yes or no."], ["no", "yes"])


def test_summer_logprob_scoring_against_vllm_reads_the_models_own_probabilities(vllm_server, tmp_path, isolated_cache):
    base_url, model, folder = vllm_server
    # The option probabilities read over HTTP are the model's: the served top tokens carry the log-probabilities
    # of a local forward pass of the same weights, and each option sums those of its surface forms among them
    # (a form outside the server's top_logprobs is not seen, so the HTTP figure is at most the local one).
    prompts = ["Is the sky blue? Answer yes or no.", "Does GATA1 knockdown change HBG1? Answer yes or no."]
    options = ["no", "yes"]
    for api, chat in (("chat", True), ("completions", False)):
        served = OpenAIBackend(base_url, model, api=api, cache=False)
        local = LocalBackend(pretrained=str(folder), chat=chat, device="cpu", cache=False)
        records = dict(served._option_logprobs([{"prompt": p} for p in prompts], options, None))
        for i, ids in enumerate(local._encode(prompts)):
            with torch.no_grad():
                logits = local.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            top_ids = {}
            for token, value in records[i]["top"].items():
                (token_id,) = local.tokenizer(token, add_special_tokens=False)["input_ids"]
                assert value == pytest.approx(float(logp[token_id]), abs=1e-3), (api, token)
                top_ids[token_id] = value
            for option, got in zip(options, records[i]["logprobs"]):
                (forms,) = local.option_token_ids([option])
                seen = [float(logp[t]) for t in forms if t in top_ids]
                assert got == pytest.approx(float(torch.logsumexp(torch.tensor(seen), 0)), abs=1e-3), (api, option)

    # model=summer scoring=logprob end to end over the served model, then a rerun from the response cache
    over_http = [
        "model.encoder.backend.kind=openai",
        f"model.encoder.backend.base_url={base_url}",
        f"model.encoder.backend.model={model}",
        "model.encoder.backend.concurrency=2",
        "model.encoder.backend.timeout=120",
        "data.test_genes=2",
        "data.val_genes=1",
        "model.encoder.scoring=logprob",
        "model.encoder.retrieval_budgets.random=2",
        "model.encoder.retrieval_budgets.both_similar=2",
    ]
    metrics = train(summer_cfg(tmp_path, *over_http))
    usage = json.loads((tmp_path / "run" / "run.json").read_text())["llm_usage"]
    assert usage["backend"]["backend"] == "openai" and usage["requests"] == usage["pairs"] > 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == usage["pairs"]  # one token each
    assert 0 < metrics["test/de_auroc_per_gene"] < 1 and metrics["test/de_genes_scored"] > 0
    scores = pd.read_csv(tmp_path / "run" / "predictions" / "test.csv")["score"]
    assert scores.nunique() > 1, "logprob scores over HTTP must vary between pairs"
    again = train(summer_cfg(tmp_path, *over_http, name="run2"))
    usage2 = json.loads((tmp_path / "run2" / "run.json").read_text())["llm_usage"]
    assert usage2["requests"] == 0 and again["test/de_auroc_per_gene"] == metrics["test/de_auroc_per_gene"]


# ---- failure cases against a real (stdlib) HTTP server ------------------------------------------------------
class Behaviour:
    def __init__(self):
        self.mode = "ok"
        self.calls = 0
        self.fail_first = 0


@pytest.fixture
def fake_server():
    """An OpenAI-shaped HTTP server on 127.0.0.1 whose behaviour the test sets: ok, 500, slow, not_json, banana."""
    behaviour = Behaviour()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour.calls += 1
            if behaviour.mode == "500" or behaviour.calls <= behaviour.fail_first:
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b'{"error": "boom"}')
                return
            if behaviour.mode == "slow":
                time.sleep(2)
            if behaviour.mode == "not_json":
                payload = b"<html>gateway error</html>"
            else:
                text = "banana" if behaviour.mode == "banana" else "Answer: yes"
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": "Yes",
                                "logprob": -0.2,
                                "top_logprobs": [{"token": "Yes", "logprob": -0.2}, {"token": " no", "logprob": -1.9}],
                            }
                        ]
                    }
                payload = json.dumps(
                    {"choices": [choice], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
                ).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()


def backend_for(url: str, **options) -> OpenAIBackend:
    return OpenAIBackend(url, "fake", **{"retries": 1, "backoff": 0.01, "timeout": 5, "concurrency": 2, **options})


def test_a_server_that_is_down_is_a_clear_error(isolated_cache):
    backend = backend_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendError, match=r"cannot connect .* after 2 attempt"):
        backend.generate(["hello"])


def test_500s_are_retried_then_a_clear_error(fake_server, isolated_cache):
    url, behaviour = fake_server
    behaviour.fail_first = 1
    backend = backend_for(url)
    assert backend.generate(["hello"]) == [["Answer: yes"]]
    assert backend.usage.retries == 1 and backend.usage.requests == 1 and backend.usage.prompt_tokens == 11
    behaviour.mode = "500"
    with pytest.raises(BackendError, match=r"HTTP 500 .*after 2 attempt"):
        backend_for(url).generate(["another prompt"])


def test_a_timeout_is_a_clear_error(fake_server, isolated_cache):
    url, behaviour = fake_server
    behaviour.mode = "slow"
    with pytest.raises(BackendError, match=r"timed out after 0.5 s, after 2 attempt"):
        backend_for(url, timeout=0.5).generate(["hello"])


def test_a_reply_that_is_not_json_is_a_clear_error(fake_server, isolated_cache):
    url, behaviour = fake_server
    behaviour.mode = "not_json"
    with pytest.raises(BackendError, match="not JSON"):
        backend_for(url).generate(["hello"])


def test_the_request_budget_stops_and_a_rerun_resumes_from_the_cache(fake_server, isolated_cache):
    url, _ = fake_server
    prompts = [f"prompt {i}" for i in range(5)]
    with pytest.raises(BackendError, match="request budget .*max_requests=2"):
        backend_for(url, max_requests=2, concurrency=1).generate(prompts)
    resumed = backend_for(url, concurrency=1)
    assert resumed.generate(prompts) == [["Answer: yes"]] * 5
    assert resumed.usage.cached == 2 and resumed.usage.requests == 3


def test_logprobs_from_a_chat_server_are_read(fake_server, isolated_cache):
    url, _ = fake_server
    logp = backend_for(url).option_logprobs(["q"], ["no", "yes", "insufficient"])
    assert logp[0, 0] == pytest.approx(-1.9) and logp[0, 1] == pytest.approx(-0.2) and logp[0, 2] == -np.inf


def test_malformed_answers_are_counted_abstentions_not_zeros(fake_server, tmp_path, isolated_cache):
    url, behaviour = fake_server
    behaviour.mode = "banana"
    cfg = summer_cfg(
        tmp_path,
        "model.encoder.backend.kind=openai",
        f"model.encoder.backend.base_url={url}",
        "model.encoder.backend.model=fake",
        "model.encoder.scoring=sample",
        "model.encoder.samples=3",
        "data.test_genes=2",
        "data.val_genes=1",
    )
    encoder, datamodule = encoder_of(cfg)
    encoder.prepare_datamodule(datamodule)
    stats = encoder.stats
    assert stats["pairs"] > 0 and stats["unparsed_answers"] == stats["answers"] == 3 * stats["pairs"]
    assert stats["abstained_pairs"] == stats["pairs"]
    for probs in encoder.memo.values():
        assert np.allclose(probs, 1 / len(probs))  # equal probabilities, counted; not a zero score
