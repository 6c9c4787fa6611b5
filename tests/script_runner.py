"""Run a repository script (train.py, evaluate.py) in a fresh process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def run_script(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository; fails with the tail of its output when it exits non-zero.

    One thread per process: the test machines have few shared cores, and torch's default of one thread
    per core makes two DDP ranks (or a sweep beside other tests) fight over them.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"python {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
