"""DDP: trainer=ddp_sim (2 CPU processes over gloo) gives the metrics and predictions of one process."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from perturb_models.data.datamodule import SplitBatchSampler
from perturb_models.evaluation import evaluate_checkpoint
from tests.conftest import FAST_CPU, compose_config
from tests.script_runner import run_script

KEYS = ["pert", "gene", "task"]


@pytest.mark.parametrize("num_rows,batch_size,world_size", [(2730, 97, 2), (11, 4, 3), (5, 8, 2), (1000, 1000, 4)])
def test_evaluation_shards_cover_every_pair_exactly_once(num_rows, batch_size, world_size):
    shards = [
        torch.cat(list(SplitBatchSampler(num_rows, batch_size, shuffle=False, rank=r, world_size=world_size)))
        for r in range(world_size)
    ]
    rows = torch.cat(shards)
    assert len(rows) == num_rows and torch.equal(rows.sort().values, torch.arange(num_rows))


def test_training_shards_are_equal_length_and_disjoint():
    samplers = [
        SplitBatchSampler(1001, 64, shuffle=True, seed=3, rank=r, world_size=2, equal_shards=True) for r in range(2)
    ]
    shards = [torch.cat(list(s)) for s in samplers]
    assert len(shards[0]) == len(shards[1]) == 500 and len(samplers[0]) == len(samplers[1])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


@pytest.mark.slow
def test_ddp_sim_run_matches_single_process_evaluation_and_writes_each_prediction_once(tmp_path):
    run = tmp_path / "ddp"
    # eval_batch_size=97: several uneven batches per rank, so the padded gather is exercised.
    run_script(
        [
            "train.py",
            "trainer=ddp_sim",
            "data=synthetic",
            *FAST_CPU,
            "trainer.max_epochs=1",
            "data.eval_batch_size=97",
            f"hydra.run.dir={run}",
        ]
    )
    assert (run / "train_ddp_process_1.log").is_file(), "the second DDP process did not run"
    ddp_metrics = json.loads((run / "metrics.json").read_text())
    ddp_predictions = pd.read_csv(run / "predictions" / "test.csv")
    assert sorted(p.name for p in (run / "predictions").iterdir()) == ["test.csv", "val.csv"]

    # Every test pair exactly once: all DE pairs for task de, the DE pairs again for dir.
    data_cfg = compose_config("train", ["data=synthetic"], tmp_path).data
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.setup()
    test = datamodule.frames["test"]
    assert not ddp_predictions.duplicated(KEYS).any()
    assert len(ddp_predictions) == len(test) + int((test["de"] == 1).sum())
    assert set(zip(test["pert"], test["gene"])) == set(zip(ddp_predictions["pert"], ddp_predictions["gene"]))

    # The same weights evaluated in one process.
    trainer_cfg = compose_config("evaluate", FAST_CPU[1:], tmp_path / "eval").trainer
    single = evaluate_checkpoint(run, tmp_path / "eval", trainer_cfg)
    for key in ("test/de_auroc_per_gene", "test/dir_auroc_per_gene", "test/de_auroc", "test/de_auprc", "test/loss"):
        assert ddp_metrics[key] == pytest.approx(single[key], abs=1e-6), key
    assert ddp_metrics["test/de_genes_scored"] == single["test/de_genes_scored"]
    single_predictions = pd.read_csv(tmp_path / "eval" / "predictions" / "test.csv")
    merged = ddp_predictions.merge(single_predictions, on=KEYS, suffixes=("_ddp", "_single"), validate="one_to_one")
    assert len(merged) == len(single_predictions)
    assert (merged["score_ddp"] - merged["score_single"]).abs().max() < 1e-6
    assert (merged["label_ddp"] == merged["label_single"]).all()
