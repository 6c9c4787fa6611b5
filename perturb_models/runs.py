"""What makes a run folder trustworthy: one owner at a time, exact resume, refused mismatched resumes.

- ``lock_run_folder``: an exclusive ``flock`` on ``<run>/.lock`` held by the launching process for the
  whole run. The kernel drops it when the process dies (even by ``kill -9``), so a stale lock file never
  blocks; the file keeps the last holder's PID for the message. DDP ranks other than the launcher and
  the extra SLURM tasks do not lock (they are the same run).
- ``ExactResume``: a callback that stores the Python, NumPy, torch and CUDA RNG states in every
  checkpoint and restores them just before training continues, so a run resumed from an end-of-epoch
  ``last.ckpt`` draws the same dropout masks as the uninterrupted run; runs that are not resumed draw
  exactly what they drew before. (Batch order needs nothing: the DataModule's sampler is a pure
  function of ``seed`` and the epoch.)
- ``AtomicCheckpointIO``: Lightning writes checkpoints through ``io.atomic_writer`` (never a torn file).
- ``resolve_resume_checkpoint``: ``ckpt_path=last`` or a path, checked, with a one-line error.
- ``load_checkpoint`` / ``check_resume_compatible``: read a checkpoint with a one-line error when it is
  not one, and refuse to resume a run whose data, task, seed, validation split or model differ.
- ``find_checkpoint`` / ``load_run_record``: a run folder or checkpoint file given by a user, and the
  record (config, vocabulary, validation split) that every run stores under ``RECORD_KEY``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins import TorchCheckpointIO

from perturb_models.errors import CheckpointError, RunFolderBusy
from perturb_models.io import atomic_writer

RECORD_KEY = "perturb_models"
"""The checkpoint key of a run's record: its resolved config, vocabulary, validation split and run facts."""

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RNG_KEY = "perturb_models_rng"

# ---- checkpoint files ----------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO through ``io.atomic_writer``: a crash or a kill while saving leaves the
    previous ``last.ckpt`` intact instead of a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_writer(path) as handle:
            torch.save(checkpoint, handle)


def resolve_resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` means the ``checkpoints/last.ckpt`` of this run folder; anything else is a path."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last, but there is no {path}. To resume, run in the folder of the interrupted run: "
                f"python train.py <same overrides> hydra.run.dir=<that run folder> ckpt_path=last"
            )
        return str(path)
    path = Path(os.path.expanduser(ckpt_path))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(path)


# ---- ranks -------------------------------------------------------------------------------------------

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "GROUP_RANK")


def is_launching_process() -> bool:
    """False in the extra processes of one run: DDP ranks Lightning spawned, torchrun ranks, SLURM tasks > 0."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return False
    return True


# ---- lock --------------------------------------------------------------------------------------------


_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth (Hydra callback, then train())


@contextmanager
def lock_run_folder(folder: str | os.PathLike) -> Iterator[Path | None]:
    """Hold ``<folder>/.lock`` for the duration; a second run into the folder gets ``RunFolderBusy``.

    Re-entrant within one process: ``train()`` locks the folder that the Hydra callback already holds.
    """
    folder = Path(folder)
    if not is_launching_process():
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunFolderBusy(
                f"run folder {folder} is in use by another run (process {holder}, lock {path}); "
                f"wait for it to finish or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the flock


class LockRunFolder(HydraCallback):
    """Hydra callback: take the run folder's lock before Hydra writes ``.hydra/`` and ``train.log`` into it,
    so a refused second run leaves the first run's files untouched. (Multirun jobs are locked by
    ``train()`` itself, each in its own folder.)"""

    def __init__(self) -> None:
        self._held: ExitStack | None = None

    def on_run_start(self, config, **kwargs: Any) -> None:
        from perturb_models.errors import cli_errors

        self._held = ExitStack()
        with cli_errors():
            self._held.enter_context(lock_run_folder(str(config.hydra.run.dir)))

    def on_run_end(self, config, **kwargs: Any) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


# ---- RNG states --------------------------------------------------------------------------------------


def capture_rng_states() -> dict[str, Any]:
    """The RNG states as tensors, ints and tuples only: Lightning loads checkpoints with ``weights_only``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds CUDA RNG states of %d devices, this machine has %d: "
                "CUDA random draws will differ from the interrupted run",
                len(cuda),
                torch.cuda.device_count(),
            )


class ExactResume(L.Callback):
    """RNG states into every checkpoint; restored at the start of training when resuming.

    Restoring happens in ``on_train_start`` (after the sanity check, which Lightning runs with an
    isolated RNG, and after the dataloader set-up, right before the first resumed step), so the first
    random draw after the restore is the one the uninterrupted run made after the checkpoint was written.
    A multi-process (DDP) checkpoint holds rank 0's states only, so ranks do not restore them there:
    a DDP resume is approximate.
    """

    def __init__(self) -> None:
        self._pending: Mapping[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = capture_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_KEY)
        if self._pending is None:
            log.warning(
                "the checkpoint holds no RNG state (written by an older version): the resumed run "
                "will not draw the same dropout masks as an uninterrupted one"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            if trainer.world_size == 1:
                restore_rng_states(self._pending)
                # The uninterrupted run draws once more before its next step: creating the next epoch's
                # train DataLoader iterator takes a base seed from the global torch RNG. The resumed run
                # created that iterator before this hook, so the draw is replayed here.
                # tests/test_resume.py checks the result is bit-identical.
                torch.empty((), dtype=torch.int64).random_()
            self._pending = None


# ---- checkpoints -------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of a checkpoint, with a one-line ``CheckpointError`` naming the file when it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from exc
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint is empty (0 bytes); delete it, or point ckpt_path at another")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # zip reader errors, EOFError, UnpicklingError, ...: all mean "not a checkpoint"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file: {reason[:160]}); "
            f"delete it, or point ckpt_path at another"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The optimizer step a checkpoint holds, or None when the file does not exist (``CheckpointError`` when
    it exists but is not a readable checkpoint)."""
    path = Path(path)
    return int(load_checkpoint(path)["global_step"]) if path.is_file() else None


# Data options that say where the same data lives or how it is evaluated, not what it is.
_DATA_KEYS_IGNORED = {"root", "download", "base_url", "eval_batch_size", "_target_", "split_file"}
OPTIONS_ADDED_LATER = {"data.gene_group_size": 0, "model.rank_weight": 0.0}
"""Options newer than some checkpoints, with the value that reproduces how runs behaved before them: a
checkpoint that lacks one resumes under that value, and is refused under any other."""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the record in a checkpoint and this run's: ``option: saved -> now`` lines."""
    saved_cfg, current_cfg = saved.get("config") or {}, current.get("config") or {}
    diffs: list[str] = []
    if saved_cfg.get("seed") != current_cfg.get("seed"):
        diffs.append(f"seed: {saved_cfg.get('seed')} -> {current_cfg.get('seed')}")
    for section in ("data", "model"):
        a = _flatten(section, saved_cfg.get(section) or {}, {})
        b = _flatten(section, current_cfg.get(section) or {}, {})
        for key in sorted(set(a) | set(b)):
            if section == "data" and key.split(".", 1)[1].split(".")[0] in _DATA_KEYS_IGNORED:
                continue
            before = a.get(key, OPTIONS_ADDED_LATER.get(key, "<unset>"))
            now = b.get(key, OPTIONS_ADDED_LATER.get(key, "<unset>"))
            if before != now:
                diffs.append(f"{key}: {before} -> {now}")
    saved_val, current_val = list(saved.get("val_perts") or []), list(current.get("val_perts") or [])
    if saved_val != current_val:
        changed = len(set(saved_val) ^ set(current_val))
        diffs.append(f"validation perturbations: {changed} differ ({len(saved_val)} saved, {len(current_val)} now)")
    return diffs


def check_resume_compatible(
    path: str | os.PathLike,
    checkpoint: Mapping[str, Any],
    current: Mapping[str, Any],
    record_key: str,
    allow_mismatch: bool = False,
) -> None:
    """Refuse to resume from a checkpoint of a different run (``resume_mismatch_ok=true`` overrides)."""
    saved = checkpoint.get(record_key)
    if not saved or "config" not in saved:
        raise CheckpointError(f"{path} was not written by perturb_models' train.py (no '{record_key}' record)")
    diffs = resume_differences(saved, current)
    if not diffs:
        return
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    if allow_mismatch:
        log.warning(
            "resuming %s although the run differs from the checkpoint's (resume_mismatch_ok=true): %s", path, shown
        )
        return
    raise CheckpointError(
        f"{path} belongs to a different run: {shown}. Resume with the same options, start a new run folder, "
        f"or pass resume_mismatch_ok=true if you mean it"
    )


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoints/best.ckpt``, else ``last.ckpt``)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CheckpointError(f"{path} is a folder without checkpoints/best.ckpt or checkpoints/last.ckpt")
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: no such checkpoint file or run folder")
    return path


def load_run_record(ckpt_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint and the record that ``train`` stored in it (config, vocab, validation split)."""
    checkpoint = load_checkpoint(ckpt_file)
    record = checkpoint.get(RECORD_KEY)
    if not record or "config" not in record:
        raise CheckpointError(f"{ckpt_file} was not written by perturb_models' train.py (no '{RECORD_KEY}' record)")
    return checkpoint, record
