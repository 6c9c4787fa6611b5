"""Missing PerturbQA files are downloaded (from a local HTTP server here) or fail with a clear message."""

import os

import pandas as pd
import pytest

from perturb_models.data.perturbqa import DataValidationError, ensure_task_files, load_task_tables
from perturb_models.io import DownloadError
from tests.test_perturbqa_files import GOOD_DE, GOOD_DIR, write


def test_missing_published_files_are_downloaded_into_the_data_root(http_folder, tmp_path):
    served, url = http_folder
    write(served, "jurkat-de.csv", GOOD_DE)
    write(served, "jurkat-dir.csv", GOOD_DIR)
    root = tmp_path / "data"
    tables = load_task_tables("jurkat", "joint", root=root, base_url=url)
    assert (root / "jurkat-de.csv").read_bytes() == (served / "jurkat-de.csv").read_bytes()
    assert len(tables.de) == len(GOOD_DE)
    assert not [p for p in os.listdir(root) if p.endswith(".part")]


def test_existing_files_are_not_downloaded_again(http_folder, tmp_path):
    served, url = http_folder
    write(tmp_path, "jurkat-de.csv", GOOD_DE)
    write(tmp_path, "jurkat-dir.csv", GOOD_DIR)
    # Nothing is served: a download attempt would fail.
    paths = ensure_task_files("jurkat", root=tmp_path, base_url=url)
    assert paths["de"].parent == tmp_path


def test_base_url_from_environment(http_folder, tmp_path, monkeypatch):
    served, url = http_folder
    write(served, "jurkat-de.csv", GOOD_DE)
    monkeypatch.setenv("PERTURBQA_URL", url)
    paths = ensure_task_files("jurkat", ("de",), root=tmp_path)
    assert pd.read_csv(paths["de"]).shape == (len(GOOD_DE), 4)


def test_offline_error_names_the_url_and_how_to_use_local_files(tmp_path):
    unreachable = "http://127.0.0.1:9"  # discard port: nothing listens there
    with pytest.raises(DownloadError) as info:
        ensure_task_files("jurkat", root=tmp_path, base_url=unreachable)
    message = str(info.value)
    assert f"{unreachable}/jurkat-de.csv" in message
    assert "data.root=" in message and "PERTURBQA_DATA" in message
    assert not list(tmp_path.iterdir()), "a failed download must leave nothing behind"


def test_missing_file_with_downloads_off_says_where_to_fetch_it(tmp_path):
    with pytest.raises(DataValidationError, match=r"downloads are off.*PerturbQA/main/perturbqa/datasets/k562-de.csv"):
        ensure_task_files("k562", root=tmp_path, allow_download=False)


def test_data_root_falls_back_to_environment_then_cache(tmp_path, monkeypatch):
    from perturb_models.data.perturbqa import resolve_data_root

    monkeypatch.setenv("PERTURBQA_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("PERTURBQA_DATA")
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    assert resolve_data_root(None) == tmp_path / "cache" / "perturbqa"
