"""experiment=table1: one multirun over model x dataset x task x seed, and the results table built from it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from perturb_models.evaluation import compare_runs
from perturb_models.results import find_run_dirs
from tests.conftest import CONF, compose_config
from tests.script_runner import run_script

TABLE1 = yaml.safe_load((CONF / "experiment" / "table1.yaml").read_text())["hydra"]["sweeper"]["params"]


def table1_models() -> list[str]:
    """The models the table1 multirun sweeps over, expanded by Hydra against conf/model/ as the sweeper does."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    override = OverridesParser.create(config_loader=loader).parse_overrides([f"model={TABLE1['model']}"])[0]
    return list(override.sweep_string_iterator())


def test_table1_covers_every_model_config_and_every_published_dataset_both_tasks(tmp_path):
    # *_tiny configs are test-sized models (random weights), not results to report; _* are shared bases;
    # the table's models are those whose kind of run (the runner registry) scores the pair tasks: the
    # gene-set namers belong to data=k562_gse. Hydra's glob filters by name, so this keeps its list true.
    from perturb_models.runners import RUNNERS, model_class

    def pair_model(name: str) -> bool:
        cfg = compose_config("train", [f"model={name}", "data=synthetic"], tmp_path / name)
        return "de" in RUNNERS[model_class(cfg.model).runner].tasks

    names = [p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.endswith("_tiny")]
    models = {name for name in names if not name.startswith("_") and pair_model(name)}
    assert set(table1_models()) == models and "mlp" in models and "lora_llama" in models
    assert set(TABLE1["data"].split(",")) == {"k562", "rpe1", "hepg2", "jurkat", "k562_set"}
    assert set(TABLE1["data.task"].split(",")) == {"de", "dir"}
    assert len(TABLE1["seed"].split(",")) >= 3


@pytest.mark.slow
def test_table1_multirun_on_synthetic_data_builds_the_seed_averaged_table(tmp_path):
    sweep = tmp_path / "table1"
    # Command-line values replace an axis of the grid: the MLP, synthetic data, the de task, two seeds.
    run_script(
        [
            "train.py",
            "experiment=table1",
            "model=mlp",
            "data=synthetic",
            "data.task=de",
            "seed=0,1",
            "logger=none",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    runs = find_run_dirs([sweep])
    assert sorted(str(r.relative_to(sweep)) for r in runs) == ["mlp/synthetic-de/seed0", "mlp/synthetic-de/seed1"]

    table = compare_runs([sweep], tmp_path / "eval")
    assert len(table) == 2 and set(table["seed"]) == {0, 1}
    summary = pd.read_csv(tmp_path / "eval" / "summary.csv")
    cell = summary.loc[(summary["model"] == "mlp") & (summary["dataset"] == "synthetic") & (summary["task"] == "de")]
    assert len(cell) == 1 and cell["runs"].item() == 2 and cell["seeds"].item() == "0,1"
    values = [json.loads((r / "metrics.json").read_text())["test/de_auroc_per_gene"] for r in runs]
    assert cell["mean"].item() == pytest.approx(sum(values) / 2, abs=1e-12)
    assert "mlp" in (tmp_path / "eval" / "summary.md").read_text()


def test_comparison_of_a_folder_without_runs_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run in or below"):
        find_run_dirs([tmp_path])
