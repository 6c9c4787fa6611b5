"""Bad input of every kind stops with one message naming the file, line, option or value; created files
follow the umask; a corrupt cache is rebuilt."""

from __future__ import annotations

import gzip
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from perturb_models.config_checks import validate_config
from perturb_models.data.perturbqa import DataValidationError, ensure_task_files, read_task_file
from perturb_models.errors import CheckpointError, ConfigError
from perturb_models.io import atomic_write_text
from perturb_models.runs import load_checkpoint
from perturb_models.training import train
from tests.conftest import REPO
from tests.test_perturbqa_files import GOOD_DE, write

# ---- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.encoder.hidden_dim=0", "model.encoder.hidden_dim=0: must be an integer >= 1"),
        ("model.encoder.embedding_dim=0", "model.encoder.embedding_dim=0: must be an integer >= 1"),
        ("model.encoder.num_blocks=-1", "model.encoder.num_blocks=-1: must be an integer >= 0"),
        ("model.encoder.dropout=1.0", "model.encoder.dropout=1.0: a dropout rate must be a number in [0, 1)"),
        ("model.optimizer.lr=0", "model.optimizer.lr=0: the learning rate must be a number > 0"),
        ("seed=abc", "seed=abc: must be an integer"),
        ("seed=1.5", "seed=1.5: must be an integer"),
        ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5: must be a number in (0, 1)"),
        ("data.task=both", "data.task=both: must be one of de, dir, joint"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1"),
        ("optimized_metric=test/de_auroc", "optimized_metric=test/de_auroc: must be a validation metric"),
        ("model.rank_weight=1", "model.rank_weight=1 needs batches with several pairs of one gene"),
        ("model.rank_weight=-1", "model.rank_weight=-1: must be a number >= 0"),
        ("data.gene_group_size=1", "data.gene_group_size=1: must be 0 (off) or an integer >= 2"),
    ],
)
def test_impossible_config_values_are_named_with_their_value(synthetic_cfg, override, message):
    with pytest.raises(ConfigError) as info:
        validate_config(synthetic_cfg(override))
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("model", ["gat", "gears", "knn", "embedding_mlp", "lora_llama_tiny"])
def test_every_default_model_config_passes_the_checks(synthetic_cfg, model):
    validate_config(synthetic_cfg(f"model={model}"))


def test_counts_may_be_zero(synthetic_cfg):
    validate_config(synthetic_cfg("model=lora_llama_tiny", "model.encoder.prompt.retrieval_k=0"))
    validate_config(synthetic_cfg("model.encoder.num_blocks=0"))


def test_a_zero_size_stops_the_run_before_anything_is_written(synthetic_cfg, tmp_path):
    with pytest.raises(ConfigError, match="model.encoder.hidden_dim=0"):
        train(synthetic_cfg("model.encoder.hidden_dim=0"))
    assert not (tmp_path / "run").exists()


# ---- data files --------------------------------------------------------------------------------------


def test_non_utf8_file_is_named_with_the_byte_and_line(tmp_path):
    path = tmp_path / "toy-de.csv"
    path.write_bytes("pert,gene,label,split\nP1,G1,1,train\nP2,G\xe9NE,0,train\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=rf"{path}: not UTF-8 text \(byte 0xe9 on line 3\)"):
        read_task_file(path)


def test_gzip_file_named_csv_is_named_with_how_to_decompress_it(tmp_path):
    path = tmp_path / "toy-de.csv"
    path.write_bytes(gzip.compress(b"pert,gene,label,split\nP1,G1,1,train\n"))
    with pytest.raises(
        DataValidationError, match=rf"{path}: the file is gzip-compressed, not CSV text; decompress it \(gunzip"
    ):
        read_task_file(path)


def test_task_file_that_is_a_folder_is_named_not_downloaded(tmp_path):
    (tmp_path / "k562-de.csv").mkdir()
    with pytest.raises(DataValidationError, match=rf"{tmp_path / 'k562-de.csv'} is a folder, not a task CSV file"):
        ensure_task_files("k562", ("de",), root=tmp_path, base_url="http://127.0.0.1:9")


@pytest.mark.parametrize(
    "column, value, named",
    [
        ("pert", "P 1", "whitespace inside the name"),
        ("pert", "P1\u200b", "an invisible or control character (U+200B)"),
        ("gene", "G\u00a01", "an invisible or control character (U+00A0)"),
        ("gene", "G\ufeff1", "an invisible or control character (U+FEFF)"),
        ("gene", "G1'", "a quote (')"),
        ("gene", "G  1", "two spaces in a row"),
    ],
)
def test_gene_symbols_with_inner_whitespace_or_invisible_characters_are_refused_with_the_line(
    tmp_path, column, value, named
):
    rows = [list(r) for r in GOOD_DE]
    rows[3][0 if column == "pert" else 1] = value
    path = write(tmp_path, "toy-de.csv", [tuple(r) for r in rows])
    with pytest.raises(DataValidationError) as info:
        read_task_file(path)
    assert str(info.value).startswith(f"{path} line 5: {column} {value!r} contains {named}")


def test_cluster_names_with_single_spaces_stay_valid_downstream_genes(tmp_path):
    rows = [(p, g.replace("G", "12-oxidative phosphorylation "), label, split) for p, g, label, split in GOOD_DE]
    frame = read_task_file(write(tmp_path, "toy-de.csv", rows))
    assert frame["gene"].iloc[0] == "12-oxidative phosphorylation 1"


# ---- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, named",
    [
        (b"", "the checkpoint is empty (0 bytes)"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not a readable PyTorch checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_checkpoint_is_named(tmp_path, content, named):
    path = tmp_path / "last.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {named}") and "\n" not in message and "weights_only" not in message


def test_truncated_last_checkpoint_stops_the_resume_naming_it(synthetic_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(
        CheckpointError, match=rf"{run / 'checkpoints' / 'last.ckpt'}: not a readable PyTorch checkpoint"
    ):
        train(synthetic_cfg("ckpt_path=last", output_dir=run))


def test_evaluate_names_a_corrupt_checkpoint(tmp_path):
    from perturb_models.evaluation import load_run_record

    path = tmp_path / "best.ckpt"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable PyTorch checkpoint"):
        load_run_record(path)


# ---- caches ------------------------------------------------------------------------------------------


def test_corrupt_graph_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    from perturb_models.knowledge.graphs import build_graph
    from tests.test_graphs import _write_dataset

    dm = _write_dataset(tmp_path / "data", flip_test=False)
    spec = {"kind": "coresponse", "top_k": 10, "threshold": 0.1, "cache": True, "cache_dir": str(tmp_path / "cache")}
    good = build_graph(spec, dm.context)
    [cache_file] = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        rebuilt = build_graph(spec, dm.context)
    assert f"graph cache {cache_file} is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(rebuilt.edge_index, good.edge_index)
    assert build_graph(spec, dm.context).num_edges == good.num_edges  # the rewritten cache reads back


# ---- permissions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_created_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "out" / "metrics.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_checkpoints_follow_the_umask_too(tmp_path):
    from perturb_models.runs import AtomicCheckpointIO

    previous = os.umask(0o002)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "checkpoints" / "last.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "checkpoints" / "last.ckpt").stat().st_mode) == 0o664


# ---- the command line --------------------------------------------------------------------------------


def run_cli(args, **env):
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **env)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_user_errors_are_one_line_without_traceback_and_leave_no_empty_run_folder(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["train.py", "data=synthetic", "logger=none", "model.encoder.hidden_dim=0", f"hydra.run.dir={run}"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "model.encoder.hidden_dim=0: must be an integer >= 1" in output and "Traceback" not in output
    assert output.count("hidden_dim=0") == 1
    assert not run.exists(), "a run refused at the start leaves no folder behind"

    # Offline: the download failure is one message (the URL and how to use local files), no folder left.
    proc = run_cli(
        [
            "train.py",
            "data=jurkat",
            f"data.root={tmp_path / 'empty'}",
            "data.base_url=http://127.0.0.1:9",
            "logger=none",
            f"hydra.run.dir={run}",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output
    assert output.count("Could not download PerturbQA file jurkat-de.csv from http://127.0.0.1:9/jurkat-de.csv") == 1
    assert "PERTURBQA_DATA" in output
    assert not run.exists() and not list((tmp_path / "empty").glob("*"))

    # HYDRA_FULL_ERROR=1 still shows the traceback, for debugging.
    proc = run_cli(
        ["train.py", "data=synthetic", "logger=none", "seed=abc", f"hydra.run.dir={run}"], HYDRA_FULL_ERROR="1"
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "seed=abc: must be an integer" in proc.stderr
