"""Gene embedding sources: users' tables in each format, missing genes and clusters, the seeded random
control, the real offline MiniLM encoder and the on-disk text-embedding cache, GNN node features."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from perturb_models.data.vocab import GeneVocab
from perturb_models.knowledge import embeddings as emb
from perturb_models.knowledge.embeddings import (
    full_spec,
    gene_embedding_table,
    load_embedding_table,
    random_embedding_table,
    table_for_symbols,
    text_embedding_table,
)
from tests.knowledge_files import write_knowledge

GENES = ["AAA1", "BBB2", "CCC3"]
MATRIX = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def _context(symbols, dataset="toy"):
    return SimpleNamespace(vocab=GeneVocab(symbols), dataset=dataset, clusters={}, ensembl_ids={})


@pytest.mark.parametrize(
    "fmt", ["csv", "csv_header", "tsv", "npy", "npy_genes_arg", "pt", "pt_genes_embeddings", "pkl"]
)
def test_table_loader_reads_each_format(tmp_path, fmt):
    genes_arg = None
    if fmt.startswith("csv") or fmt == "tsv":
        sep = "," if fmt.startswith("csv") else "\t"
        path = tmp_path / f"table.{fmt[:3]}"
        lines = [sep.join(["gene"] + [f"d{i}" for i in range(4)])] if fmt == "csv_header" else []
        lines += [sep.join([g] + [repr(float(v)) for v in row]) for g, row in zip(GENES, MATRIX)]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "npy":
        path = tmp_path / "table.npy"
        np.save(path, MATRIX)
        (tmp_path / "table.genes.txt").write_text("\n".join(GENES) + "\n")
    elif fmt == "npy_genes_arg":
        path = tmp_path / "m.npy"
        np.save(path, MATRIX)
        genes_arg = tmp_path / "names.txt"
        genes_arg.write_text("\n".join(GENES))
    elif fmt == "pt":
        path = tmp_path / "table.pt"
        torch.save({g: torch.from_numpy(r.copy()) for g, r in zip(GENES, MATRIX)}, path)
    elif fmt == "pt_genes_embeddings":
        path = tmp_path / "table.pth"
        torch.save({"genes": GENES, "embeddings": torch.from_numpy(MATRIX.copy())}, path)
    else:
        path = tmp_path / "genept.pickle"
        path.write_bytes(pickle.dumps({g: list(map(float, r)) for g, r in zip(GENES, MATRIX)}))
    symbols, matrix = load_embedding_table(path, genes_arg)
    assert symbols == GENES
    np.testing.assert_allclose(matrix, MATRIX, rtol=1e-6)


def test_table_loader_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("AAA1,0.1,0.2\nBBB2,0.3,x\n")
    with pytest.raises(ValueError, match="BBB2"):
        load_embedding_table(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("AAA1,0.1\nAAA1,0.2\n")
    with pytest.raises(ValueError, match="'AAA1' appears more than once"):
        load_embedding_table(dup)
    np.save(tmp_path / "lonely.npy", MATRIX)
    with pytest.raises(FileNotFoundError, match="gene list"):
        load_embedding_table(tmp_path / "lonely.npy")
    ragged = tmp_path / "ragged.pkl"
    ragged.write_bytes(pickle.dumps({"AAA1": [1.0, 2.0], "BBB2": [1.0]}))
    with pytest.raises(ValueError, match="different sizes"):
        load_embedding_table(ragged)
    with pytest.raises(ValueError, match="unknown embedding table format"):
        (tmp_path / "t.h5").write_text("x")
        load_embedding_table(tmp_path / "t.h5")


def test_missing_genes_are_zero_flagged_and_counted_and_clusters_average_their_members(tmp_path, caplog):
    table = table_for_symbols(
        ["AAA1", "ZZZ9", "1-cluster", "bbb2"], GENES, MATRIX, clusters={"1-cluster": ["AAA1", "CCC3", "NOPE"]}
    )
    assert table.missing() == ["ZZZ9"]
    np.testing.assert_array_equal(table.matrix[1], 0)
    np.testing.assert_allclose(table.matrix[2], (MATRIX[0] + MATRIX[2]) / 2)
    np.testing.assert_allclose(table.matrix[3], MATRIX[1])  # case-insensitive match
    path = tmp_path / "t.csv"
    path.write_text("\n".join(",".join([g, *map(str, r)]) for g, r in zip(GENES, MATRIX)))
    with caplog.at_level("INFO"):
        out = gene_embedding_table(_context(["AAA1", "ZZZ9"]), {"source": "table", "path": str(path)})
    assert out.info["missing"] == 1 and "1 of 2 vocab symbols have a vector, 1 missing" in caplog.text


def test_random_control_is_seeded_per_gene_and_unit_norm():
    a = random_embedding_table(["AAA1", "BBB2"], dim=16, seed=3)
    b = random_embedding_table(["BBB2", "AAA1", "CCC3"], dim=16, seed=3)
    c = random_embedding_table(["AAA1"], dim=16, seed=4)
    np.testing.assert_array_equal(a.matrix[0], b.matrix[1])  # same gene, same vector, whatever the vocab
    assert not np.allclose(a.matrix[0], c.matrix[0])
    np.testing.assert_allclose(np.linalg.norm(a.matrix, axis=1), 1, rtol=1e-5)


def test_spec_rejects_unknown_keys_and_sources():
    with pytest.raises(ValueError, match="unknown key"):
        full_spec({"sorce": "text"})
    with pytest.raises(ValueError, match="expected one of text, table, random"):
        full_spec({"source": "genept"})
    with pytest.raises(ValueError, match="needs model.encoder.embeddings.path"):
        full_spec({"source": "table"})


def test_gene_embeddings_module_is_vocab_ordered_with_a_missing_flag(tmp_path):
    # The module embedding_mlp, logreg and the graph models' node_features read their vectors through.
    from perturb_models.models.embedding import GeneEmbeddings

    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(dict(zip(GENES, MATRIX))))
    genes = GeneEmbeddings(
        _context(["CCC3", "AAA1", "QQQ"]),
        full_spec({"source": "table", "path": str(path)}),
        missing="zero",
        standardize=False,
    )
    features = genes(torch.arange(3))
    assert features.dtype == torch.float32 and features.shape == (3, 5)
    np.testing.assert_allclose(features[0, :4].numpy(), MATRIX[2])
    assert features[:, 4].tolist() == [0.0, 0.0, 1.0] and genes.num_missing == 1


@pytest.mark.text
def test_minilm_loads_offline_and_gives_384_d_unit_vectors(minilm_encoder):
    vectors = emb.encode_texts(
        ["Gene KRAS: KRAS proto-oncogene, GTPase.", "Gene TP53: tumor protein p53."],
        progress=False,
        model=minilm_encoder,
    )
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-4)
    assert not np.allclose(vectors[0], vectors[1])


@pytest.mark.text
def test_text_embeddings_are_cached_on_disk_and_keyed_by_the_recipe(minilm_encoder, tmp_path, monkeypatch):
    knowledge = write_knowledge(
        tmp_path / "k",
        [(1, "AAA1", "", "alpha gene"), (2, "BBB2", "", "beta gene")],
        [(1, "GO:0000005", "IDA", "Function")],
    )
    spec = {"knowledge_root": str(knowledge), "allow_download": False, "cache_dir": str(tmp_path / "cache")}
    first = text_embedding_table(["AAA1", "BBB2", "NOPE"], spec, progress=False)
    assert first.matrix.shape == (3, 384) and first.found.tolist() == [True, True, False]
    assert not first.matrix[2].any()  # no knowledge: zero row, flagged
    assert len(list((tmp_path / "cache").glob("text-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(emb, "encode_texts", fail)
    again = text_embedding_table(["AAA1", "BBB2", "NOPE"], spec, progress=False)
    np.testing.assert_array_equal(again.matrix, first.matrix)
    monkeypatch.undo()
    text_embedding_table(["AAA1", "BBB2", "NOPE"], {**spec, "text": {"max_chars": 20}}, progress=False)
    assert len(list((tmp_path / "cache").glob("text-*.npz"))) == 2  # a new recipe, a new entry


def test_the_config_spec_and_the_code_defaults_agree():
    """conf/embeddings/text.yaml (what configs use) and DEFAULT_SPEC (specs given in code, node_features=text),
    with the run's defaults (knowledge/default.yaml, seed=0) filled in."""
    from omegaconf import OmegaConf

    from perturb_models.config import compose_config

    cfg = compose_config("train", ["model=embedding_mlp", "data=synthetic", "seed=0"], "/unused")
    assert OmegaConf.to_container(cfg.model.encoder.embeddings, resolve=True) == emb.DEFAULT_SPEC
