"""hydra/launcher=slurm: the submitit launcher config composes, instantiates and asks SLURM for the DDP layout."""

from __future__ import annotations

import os

import pytest
import submitit
from hydra.utils import instantiate

from tests.conftest import compose_config

SLURM_DDP = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]


def compose_with_hydra(overrides: list[str]):
    return compose_config("train", overrides, return_hydra_config=True)


class Submitted(Exception):
    """Raised in place of the sbatch submission: there is no SLURM cluster here."""


def test_slurm_launcher_composes_instantiates_and_requests_nodes_and_tasks_of_the_trainer(tmp_path, monkeypatch):
    # submitit refuses to build a SLURM executor unless `srun` is on PATH; a stand-in that is never run.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_with_hydra([*SLURM_DDP, f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.launcher.partition=gpu"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (
        launcher.params["nodes"] == 2
        and launcher.params["tasks_per_node"] == 4
        and launcher.params["gpus_per_node"] == 4
    )

    captured = {}

    def capture(executor, fn, *job_args):
        captured["executor"], captured["jobs"] = executor, job_args
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    script = captured["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit", "0")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --job-name=train-k562-joint-mlp",
        "#SBATCH --signal=USR1@90",
    ):
        assert line in script, f"{line!r} missing from the sbatch script:\n{script}"
    assert f"{tmp_path / 'multirun'}/.submitit/" in script
    assert [list(o) for o in captured["jobs"][0]] == [["seed=0"], ["seed=1"]]


def test_ddp_trainer_takes_ranks_from_slurm_environment(tmp_path, monkeypatch):
    # What srun sets for task 5 of 2 nodes x 4 tasks; Lightning must not spawn processes of its own.
    for key, value in {
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NAME": "train-k562-joint-mlp",
        "SLURM_JOB_ID": "1234",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    # The strategy sets the process-global rank to 5; put it back after the test, or every later test in this
    # process runs as a non-zero rank (loggers and rank-zero prints silently off).
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    monkeypatch.setattr(utils_rank_zero_only, "rank", getattr(utils_rank_zero_only, "rank", 0))
    # The GPU-free stand-in of trainer=ddp: same strategy and layout on CPU, gloo instead of NCCL.
    cfg = compose_config(
        "train",
        [
            *SLURM_DDP[1:],
            "logger=none",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "trainer.strategy.process_group_backend=gloo",
        ],
        tmp_path,
    )
    trainer = instantiate(cfg.trainer)
    environment = trainer.strategy.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert environment.main_address == "gpu07"


def test_under_slurm_the_trainer_saves_and_requeues_on_the_signal_the_launcher_asks_for(tmp_path, monkeypatch):
    import signal

    from perturb_models.builders import build_callbacks, build_trainer

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "cpu01",
        "SLURM_JOB_NAME": "train-synthetic-joint-mlp",
        "SLURM_JOB_ID": "77",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("train", ["data=synthetic", "logger=none", "trainer.accelerator=cpu"], tmp_path)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment"
    # The handler Lightning installs for this signal saves hpc_ckpt_N.ckpt in default_root_dir (the run
    # folder, where a requeued job looks for it) and runs `scontrol requeue $SLURM_JOB_ID`.
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    assert trainer.default_root_dir == str(tmp_path)
    launcher = compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher.additional_parameters.signal == f"{signal.SIGUSR1.name[3:]}@90"
