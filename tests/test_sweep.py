"""Hyperparameter sweeps: Hydra multirun + Optuna on synthetic data, and the W&B sweep files that mirror them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_config
from tests.script_runner import run_script

SWEEP_CONFIGS = sorted((REPO / "conf" / "sweep").glob("optuna_*.yaml"))
WANDB_SWEEPS = sorted((REPO / "sweeps").glob("wandb_*.yaml"))


def sweep_params(sweep_file: Path) -> dict[str, str]:
    return dict(yaml.safe_load(sweep_file.read_text())["hydra"]["sweeper"]["params"])


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_reports_best_validation_value_with_separate_wandb_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_script(
        [
            "train.py",
            "-m",
            "sweep=optuna_mlp",
            "data=synthetic",
            "logger=wandb",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        ]
    )
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [t.name for t in trials] == ["0", "1"]

    # The objective is the validation metric of each trial, never a test metric.
    values = [json.loads((t / "metrics.json").read_text())["val/de_auroc_per_gene"] for t in trials]
    assert 0.0 <= result["best_value"] <= 1.0
    assert math.isclose(result["best_value"], max(values), rel_tol=0, abs_tol=1e-12)
    # The study persisted in SQLite (optuna 2.x needs SQLAlchemy < 2 for this) can be reloaded to resume.
    import optuna

    study = optuna.load_study(study_name="optuna_mlp-synthetic-joint", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.best_value == result["best_value"]
    best = trials[values.index(max(values))]
    overrides = yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text())
    for key, value in result["best_params"].items():
        assert f"{key}={value}" in overrides, (key, value, overrides)

    # One W&B run per trial, each holding only its own trial's output.
    run_ids = []
    for trial in trials:
        runs = list((trial / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{trial}: expected one W&B run, found {runs}"
        run_ids.append(runs[0].name.rsplit("-", 1)[-1])
        output = (runs[0] / "files" / "output.log").read_text()
        assert f"Outputs written to {trial}" in output
        for other in trials:
            if other != trial:
                assert f"Outputs written to {other}\n" not in output
    assert len(set(run_ids)) == 2


@pytest.mark.parametrize("sweep_file", SWEEP_CONFIGS, ids=lambda p: p.stem)
def test_optuna_sweep_config_composes_and_each_searched_key_exists(sweep_file):
    cfg = compose_config("train", [f"sweep={sweep_file.stem}"])
    assert cfg.model.name == sweep_file.stem.removeprefix("optuna_")
    absent = object()  # a key may exist with the value null (e.g. node_features)
    for key in sweep_params(sweep_file):
        assert OmegaConf.select(cfg, key, default=absent) is not absent, (
            f"{sweep_file.name} searches {key}, which model={cfg.model.name} lacks"
        )
    assert OmegaConf.select(cfg, "model.encoder.no_such_key", default=absent) is absent
    assert cfg.optimized_metric.startswith("val/")


@pytest.mark.parametrize("wandb_file", WANDB_SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_mirrors_optuna_search_and_its_agent_command_composes(wandb_file):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(wandb_file.read_text())
    model = wandb_file.stem.removeprefix("wandb_")
    optuna_file = REPO / "conf" / "sweep" / f"optuna_{model}.yaml"
    assert set(spec["parameters"]) == set(sweep_params(optuna_file)), "the W&B and Optuna searches differ"
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    for key, grammar in sweep_params(optuna_file).items():
        if grammar.startswith("choice("):
            choices = yaml.safe_load("[" + grammar[len("choice(") : -1] + "]")
            assert spec["parameters"][key]["values"] == choices, key

    # What `wandb agent` runs: one sampled value per parameter, as key=value Hydra overrides.
    picked = {}
    for key, space in spec["parameters"].items():
        picked[key] = space["values"][-1] if "values" in space else space["max"]
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in picked.items()}})["args_no_hyphens"]
    fixed = [c for c in spec["command"] if not str(c).startswith("${") and c != "python"]
    cfg = compose_config("train", fixed + flags)
    for key, value in picked.items():
        assert OmegaConf.select(cfg, key) == value
    assert spec["metric"]["name"] == f"final/{cfg.optimized_metric}" and spec["metric"]["goal"] == "maximize"
