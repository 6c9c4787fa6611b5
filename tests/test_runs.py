"""A run folder has one owner; SIGTERM saves, says so in run.json and exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from perturb_models.errors import RunFolderBusy
from perturb_models.runners.pairs import interrupted_message, readable_step
from perturb_models.runs import is_launching_process, lock_run_folder
from perturb_models.training import train
from tests.conftest import REPO, start_script, wait_for

FAST = ["data=synthetic", "logger=none", "trainer.accelerator=cpu"]


def hold_lock(run) -> subprocess.Popen:
    """Another process that holds the run folder's lock until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time\nfrom perturb_models.runs import lock_run_folder\n"
                f"with lock_run_folder({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n"
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_into_a_locked_folder_stops_naming_the_folder_and_the_holder(synthetic_cfg, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(RunFolderBusy, match=rf"run folder {run} is in use by another run \(process {holder.pid},"):
            train(synthetic_cfg(output_dir=run))
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "checkpoints").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid}"):
            with lock_run_folder(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    with lock_run_folder(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_ddp_ranks_and_slurm_tasks_beyond_the_first_do_not_take_the_lock(monkeypatch, tmp_path):
    assert is_launching_process()
    for variable in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.setenv(variable, "1")
        assert not is_launching_process()
        with lock_run_folder(tmp_path / "run") as held:
            assert held is None
        monkeypatch.setenv(variable, "0")
    assert is_launching_process()


@pytest.mark.slow
def test_second_train_command_into_a_running_folder_refuses_in_one_line_and_sigterm_ends_the_first(tmp_path):
    run = tmp_path / "run"
    first = start_script(
        ["train.py", *FAST, "trainer.max_epochs=200", "callbacks.early_stopping.patience=1000", f"hydra.run.dir={run}"]
    )
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), 180, first)
        config_before = (run / ".hydra" / "config.yaml").read_text()
        second = start_script(["train.py", *FAST, "seed=1", f"hydra.run.dir={run}"])
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"run folder {run} is in use by another run (process {first.pid}" in out + err
        assert "Traceback" not in out + err
        assert (run / ".hydra" / "config.yaml").read_text() == config_before, "the second run must write nothing"

        # SIGTERM (what schedulers send): last.ckpt saved, run.json says interrupted, exit status non-zero.
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM" and record["seed"] == 0
    assert not (run / "metrics.json").exists(), "an interrupted run has no final metrics"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == record["global_step"] == record["checkpoint_step"]
    assert "run stopped by SIGTERM" in out + err and "ckpt_path=last" in out + err
    assert f"last.ckpt holds step {checkpoint['global_step']}" in out + err
    assert "Traceback" not in out + err
    log = (run / "train.log").read_text()
    assert log.count("run stopped by SIGTERM") == 1 and "is in use by another run" not in log


def test_sigterm_message_names_the_step_last_ckpt_holds_not_the_step_the_signal_came_at(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert readable_step(last) is None
    message = interrupted_message(tmp_path, last, None, 3, 38)
    assert "at epoch 3, step 38" in message and "nothing to resume" in message and "ckpt_path=last" not in message

    # A periodic save at step 380, then the signal at step 382 (save_on_exception off): the file is what counts.
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 380}, last)
    assert readable_step(last) == 380
    message = interrupted_message(tmp_path, last, readable_step(last), 38, 382)
    assert message.startswith("run stopped by SIGTERM at epoch 38, step 382; ")
    assert f"{last} holds step 380" in message and f"hydra.run.dir={tmp_path} ckpt_path=last" in message

    last.write_bytes(b"PK\x03\x04 cut short")  # a save the signal interrupted
    assert readable_step(last) is None
