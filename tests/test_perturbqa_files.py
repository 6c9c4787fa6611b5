"""Task-file validation: each malformed input gets a clear error naming the file, the line and the value."""

from pathlib import Path

import pandas as pd
import pytest

from perturb_models.data.perturbqa import DataValidationError, load_task_tables, read_task_file

GOOD_DE = [
    ("P1", "G1", 1, "train"),
    ("P1", "G2", 0, "train"),
    ("P2", "G1", 0, "train"),
    ("P2", "G2", 1, "train"),
    ("P3", "G1", 1, "test"),
    ("P3", "G2", 0, "test"),
]
GOOD_DIR = [("P1", "G1", 1, "train"), ("P2", "G2", 0, "train"), ("P3", "G1", 1, "test")]


def write(folder: Path, name: str, rows, columns=("pert", "gene", "label", "split")) -> Path:
    path = folder / name
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def write_dataset(folder: Path, de=GOOD_DE, dir_=GOOD_DIR, name="toy") -> Path:
    write(folder, f"{name}-de.csv", de)
    write(folder, f"{name}-dir.csv", dir_)
    return folder


def test_valid_files_load(tmp_path):
    tables = load_task_tables("toy", "joint", root=write_dataset(tmp_path))
    assert len(tables.de) == 6 and len(tables.dir) == 3


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, "toy-de.csv", [r[:3] for r in GOOD_DE], columns=("pert", "gene", "label"))
    with pytest.raises(DataValidationError, match=r"toy-de.csv: missing column\(s\) split"):
        read_task_file(path)


def test_label_outside_zero_one_names_line_and_value(tmp_path):
    rows = list(GOOD_DE)
    rows[2] = ("P2", "G1", 2, "train")
    path = write(tmp_path, "toy-de.csv", rows)
    with pytest.raises(DataValidationError, match=r"toy-de.csv line 4: label '?2'? is not 0 or 1"):
        read_task_file(path)


def test_split_outside_train_test_is_rejected(tmp_path):
    rows = list(GOOD_DE)
    rows[5] = ("P3", "G2", 0, "valid")
    path = write(tmp_path, "toy-de.csv", rows)
    with pytest.raises(DataValidationError, match=r"line 7: split 'valid' is not one of train, test"):
        read_task_file(path)


def test_duplicate_pair_names_both_lines(tmp_path):
    path = write(tmp_path, "toy-de.csv", GOOD_DE + [("P1", "G2", 1, "train")])
    with pytest.raises(DataValidationError, match=r"line 8: duplicate pair \(pert=P1, gene=G2\), already on line 3"):
        read_task_file(path)


def test_perturbation_in_train_and_test_is_rejected(tmp_path):
    path = write(tmp_path, "toy-de.csv", GOOD_DE + [("P1", "G3", 0, "test")])
    with pytest.raises(DataValidationError, match=r"perturbation 'P1' is in both train and test"):
        read_task_file(path)


def test_dir_pair_that_is_not_de_positive_is_rejected(tmp_path):
    root = write_dataset(tmp_path, dir_=GOOD_DIR + [("P1", "G2", 1, "train")])
    with pytest.raises(DataValidationError, match=r"toy-dir.csv line 5: pair \(pert=P1, gene=G2\) is not DE-positive"):
        load_task_tables("toy", "joint", root=root)


def test_empty_split_is_rejected(tmp_path):
    path = write(tmp_path, "toy-de.csv", [r for r in GOOD_DE if r[3] == "train"])
    with pytest.raises(DataValidationError, match=r"the 'test' split is empty"):
        read_task_file(path)


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    with pytest.raises(DataValidationError, match=r"Unknown dataset 'k563'.*k562, rpe1, hepg2, jurkat, k562_set"):
        load_task_tables("k563", "joint", root=tmp_path)


def test_unknown_dataset_name_through_the_config_fails_before_training(tmp_path):
    from perturb_models.training import train
    from tests.conftest import compose_config

    cfg = compose_config("train", ["data.name=k563", f"data.root={tmp_path}", "logger=none"], tmp_path / "run")
    with pytest.raises(DataValidationError, match="Unknown dataset 'k563'"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_task_de_needs_only_the_de_file(tmp_path):
    write(tmp_path, "toy-de.csv", GOOD_DE)
    tables = load_task_tables("toy", "de", root=tmp_path)
    assert tables.dir is None


def test_the_dataset_ensembl_map_reaches_the_context_for_its_own_symbols(tmp_path, caplog):
    import json

    from perturb_models.data.datamodule import PerturbQADataModule

    folder = write_dataset(tmp_path)
    ids = {"P1": "ENSG00000000001", "G1": "ENSG00000000002", "ELSEWHERE": "ENSG00000000003", "G2": "non-targeting"}
    (folder / "ids.json").write_text(json.dumps(ids))
    dm = PerturbQADataModule(name="toy", task="joint", root=str(folder), download=False, ensembl_map="ids.json")
    dm.setup()
    # Only the dataset's symbols, and only Ensembl gene ids.
    assert dict(dm.context.ensembl_ids) == {"G1": "ENSG00000000002", "P1": "ENSG00000000001"}
    caplog.set_level("WARNING")
    missing = PerturbQADataModule(name="toy", task="joint", root=str(folder), download=False, ensembl_map="nope.json")
    missing.setup()
    assert dict(missing.context.ensembl_ids) == {} and "nope.json" in caplog.text
    off = PerturbQADataModule(name="toy", task="joint", root=str(folder), download=False, ensembl_map=None)
    off.setup()
    assert dict(off.context.ensembl_ids) == {}
