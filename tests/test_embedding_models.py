"""embedding_mlp, logreg and random_embedding train through the shared classifier on synthetic data.

Synthetic genes (SYN0000..) have no public knowledge: the tests write a gene table whose vectors encode
the generator's planted modules (seed 0), or hand-written knowledge files for the text source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturb_models.evaluation import evaluate_checkpoint
from perturb_models.training import train
from tests.conftest import N_SYNTHETIC_GENES as N_GENES
from tests.conftest import module_word_knowledge


def test_embedding_mlp_learns_unseen_perturbations_from_a_planted_table(synthetic_cfg, planted_table, tmp_path, caplog):
    cfg = synthetic_cfg(
        "model=embedding_mlp",
        "trainer.max_epochs=4",
        "model.encoder.embeddings.source=table",
        f"model.encoder.embeddings.path={planted_table}",
    )
    with caplog.at_level("INFO"):
        metrics = train(cfg)
    assert "180 of 200 vocab symbols have a vector, 20 missing" in caplog.text
    assert metrics["test/de_auroc_per_gene"] > 0.6
    # The vectors are checkpoint buffers: the re-test scores with the trained model's vectors.
    again = evaluate_checkpoint(tmp_path / "run", tmp_path / "eval", cfg.trainer)
    assert again["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"])


def test_embedding_mlp_with_a_trained_projection_keeps_the_table_frozen(synthetic_cfg, planted_table):
    from perturb_models.builders import build_datamodule, build_model

    cfg = synthetic_cfg(
        "model=embedding_mlp",
        "model.encoder.embeddings.source=table",
        f"model.encoder.embeddings.path={planted_table}",
        "model.encoder.projection_dim=16",
    )
    dm = build_datamodule(cfg.data)
    dm.setup()
    model = build_model(cfg, dm)
    encoder = model.encoder
    names = {n for n, _ in encoder.named_parameters()}
    assert "genes.table" not in names and any(n.startswith("projection.0") for n in names)
    assert encoder.pair.input.in_features == 2 * 16
    metrics = train(cfg)
    assert np.isfinite(metrics["test/de_auroc_per_gene"])


def test_random_embedding_control_is_seeded_by_the_run_seed(synthetic_cfg):
    from perturb_models.builders import build_datamodule, build_model

    tables = []
    for seed in (0, 0, 1):
        cfg = synthetic_cfg("model=random_embedding", f"seed={seed}")
        dm = build_datamodule(cfg.data)
        dm.setup()
        tables.append(build_model(cfg, dm).encoder.genes.table.clone())
    assert tables[0].shape == (N_GENES, 384)
    assert torch.equal(tables[0], tables[1]) and not torch.equal(tables[0], tables[2])
    metrics = train(synthetic_cfg("model=random_embedding"))
    assert np.isfinite(metrics["test/de_auroc_per_gene"])


def test_logreg_is_one_linear_layer_producing_logits_and_learns(synthetic_cfg, planted_table):
    from perturb_models.builders import build_datamodule, build_model

    cfg = synthetic_cfg(
        "model=logreg",
        "trainer.max_epochs=3",
        "model.encoder.embeddings.source=table",
        f"model.encoder.embeddings.path={planted_table}",
    )
    dm = build_datamodule(cfg.data)
    dm.setup()
    model = build_model(cfg, dm)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert model.encoder.produces_logits and isinstance(model.head, torch.nn.Identity)
    assert sum(p.numel() for p in trainable) == (2 * 9 + 1) * dm.context.num_classes
    metrics = train(cfg)
    # Additive in (perturbation, gene), it cannot express the planted pert x gene modules (global AUROC
    # ~0.5 here): the check is that it trains (weights leave their zero start) and is scored.
    assert np.isfinite(metrics["test/de_auroc_per_gene"])
    state = torch.load(cfg.paths.output_dir + "/checkpoints/last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    weight = next(v for k, v in state.items() if k.endswith("linear.weight"))
    assert weight.shape == (dm.context.num_classes, 2 * 9) and weight.abs().sum() > 0


@pytest.mark.text
def test_embedding_mlp_trains_on_minilm_text_embeddings_of_hand_written_knowledge(
    synthetic_cfg, minilm_encoder, tmp_path, isolated_cache
):
    knowledge = module_word_knowledge(tmp_path / "k")
    cfg = synthetic_cfg(
        "model=embedding_mlp",
        "trainer.max_epochs=4",
        f"model.encoder.embeddings.knowledge_root={knowledge}",
        "model.encoder.embeddings.allow_download=false",
        "model.encoder.embeddings.batch_size=256",
    )
    metrics = train(cfg)
    assert metrics["test/de_auroc_per_gene"] > 0.6


def _write_summaries(cache, summaries: dict[str, str], name: str = "a") -> None:
    """A summaries artifact as model=summer writes it (``summer_summaries/<key>.json``)."""
    import json

    folder = cache / "summer_summaries"
    folder.mkdir(parents=True, exist_ok=True)
    table = {s: {"gene": text} for s, text in summaries.items()}
    (folder / f"{name}.json").write_text(json.dumps({"llm": "test", "version": "1", "summaries": table}))


@pytest.mark.text
def test_summer_source_embeds_summaries_and_falls_back_to_the_knowledge_text(minilm_encoder, tmp_path, isolated_cache):
    from perturb_models.errors import ConfigError
    from perturb_models.knowledge.embeddings import encode_texts
    from perturb_models.knowledge.text import TextRecipe, build_gene_texts
    from perturb_models.models.embedding import embedding_spec, summer_embedding_table

    knowledge = module_word_knowledge(tmp_path / "k")
    spec = embedding_spec({"source": "summer", "knowledge_root": str(knowledge), "allow_download": False})
    with pytest.raises(ConfigError, match="no SUMMER summaries"):
        summer_embedding_table(["SYN0000"], spec)
    _write_summaries(isolated_cache, {"SYN0000": "A ribosome gene that builds the small subunit."})
    symbols = ["SYN0000", "SYN0001", "NOTAGENE"]
    table = summer_embedding_table(symbols, spec)
    knowledge_text = build_gene_texts(["SYN0001"], str(knowledge), TextRecipe(), allow_download=False).texts["SYN0001"]
    expected = encode_texts(["A ribosome gene that builds the small subunit.", knowledge_text])
    np.testing.assert_allclose(table.matrix[:2], expected, atol=1e-6)
    assert table.found.tolist() == [True, True, False] and not table.matrix[2].any()
    assert (table.info["summaries"], table.info["knowledge_fallback"], table.info["missing"]) == (1, 1, 1)
    # the cache key holds the texts: a new summary gives new vectors, the same texts the cached ones
    assert summer_embedding_table(symbols, spec).info["cache"] == table.info["cache"]
    _write_summaries(isolated_cache, {"SYN0001": "A proteasome gene."}, name="b")
    again = summer_embedding_table(symbols, spec)
    assert again.info["cache"] != table.info["cache"] and again.info["summaries"] == 2
    np.testing.assert_allclose(again.matrix[1], encode_texts(["A proteasome gene."])[0], atol=1e-6)
    with pytest.raises(ConfigError, match="summer_role must be gene or pert"):
        embedding_spec({"source": "summer", "summer_role": "both"})


@pytest.mark.text
def test_embedding_mlp_trains_on_summer_summaries_as_gene_text(
    synthetic_cfg, minilm_encoder, tmp_path, isolated_cache, caplog
):
    knowledge = module_word_knowledge(tmp_path / "k")
    _write_summaries(isolated_cache, {f"SYN{i:04d}": f"Gene {i} summary: a ribosome protein." for i in range(20)})
    cfg = synthetic_cfg(
        "model=embedding_mlp",
        "trainer.max_epochs=1",
        "model.encoder.embeddings.source=summer",
        f"model.encoder.embeddings.knowledge_root={knowledge}",
        "model.encoder.embeddings.allow_download=false",
        "model.encoder.embeddings.batch_size=256",
    )
    with caplog.at_level("INFO"):
        metrics = train(cfg)
    assert metrics["test/de_genes_scored"] > 0
    assert f"of {N_GENES} vocab symbols, 20 from SUMMER summaries (role gene), {N_GENES - 20} from the knowledge" in (
        caplog.text
    )
    # evaluate.py rebuilds the table from the checkpoint's buffer: the same figures
    again = evaluate_checkpoint(tmp_path / "run", tmp_path / "eval", cfg.trainer)
    assert again["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"], abs=1e-6)
