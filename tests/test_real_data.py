"""The loader against the real PerturbQA files (PERTURBQA_DATA; required under CI=true)."""

import pytest

from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.data.perturbqa import load_task_tables
from perturb_models.training import train
from tests.conftest import FAST_CPU, compose_config

pytestmark = pytest.mark.real_data


def test_k562_de_file_has_the_published_split_sizes(perturbqa_root):
    tables = load_task_tables("k562", "joint", root=perturbqa_root)
    de = tables.de
    assert (de["split"] == "train").sum() == 134_467
    assert (de["split"] == "test").sum() == 23_212
    assert de.loc[de["split"] == "train", "pert"].nunique() == 1_564
    assert de.loc[de["split"] == "test", "pert"].nunique() == 267
    assert len(tables.dir) == int(de["label"].sum())


@pytest.mark.parametrize("name", ["rpe1", "hepg2", "k562_set"])
def test_other_published_datasets_validate(perturbqa_root, name):
    tables = load_task_tables(name, "joint", root=perturbqa_root)
    assert set(tables.de["split"]) == {"train", "test"}


def test_k562_datamodule_splits_and_labels(perturbqa_root):
    dm = PerturbQADataModule(name="k562", task="joint", root=str(perturbqa_root), seed=0)
    dm.setup()
    ctx = dm.context
    assert len(ctx.train_perts) + len(ctx.val_perts) == 1_564
    assert len(ctx.val_perts) == round(0.1 * 1_564)
    assert len(ctx.test_perts) == 267
    assert len(dm.splits["test"]) == 23_212
    assert sum(len(dm.splits[s]) for s in ("train", "val")) == 134_467
    # Direction classes only on DE pairs: up + down == DE positives.
    test = dm.frames["test"]
    assert ((test["label"] > 0) == (test["de"] == 1)).all()


def test_mlp_trains_on_real_k562_for_a_few_batches(perturbqa_root, tmp_path):
    cfg = compose_config(
        "train",
        [
            "data=k562",
            f"data.root={perturbqa_root}",
            *FAST_CPU,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=5",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert metrics["test/de_pairs"] == 23_212
    assert metrics["test/de_genes_scored"] > 300
    assert (tmp_path / "run" / "predictions" / "test.csv").is_file()


@pytest.mark.parametrize("name", ["k562", "rpe1", "hepg2", "jurkat", "k562_set", "synthetic", "custom"])
def test_every_dataset_config_composes(name):
    cfg = compose_config("train", [f"data={name}"] + (["data.name=mine"] if name == "custom" else []))
    assert cfg.data.task == "joint" and cfg.optimized_metric == "val/de_auroc_per_gene"
    assert (
        compose_config("train", [f"data={name}", "data.task=dir", "data.name=x"]).optimized_metric
        == "val/dir_auroc_per_gene"
    )
