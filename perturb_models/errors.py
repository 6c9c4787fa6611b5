"""User errors: what the person running a command got wrong, reported as one line, not a traceback.

A ``UserError`` (bad data file, bad config value, unreadable checkpoint, failed download, busy run
folder) carries a message that already names the file, line, option or value. ``cli_errors`` turns it
into ``error: <message>`` on stderr (and in the run's ``train.log``) and a non-zero exit status;
``HYDRA_FULL_ERROR=1`` re-raises it with its traceback for debugging.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("perturb_models")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + 15  # what a shell reports for a process ended by SIGTERM


class UserError(Exception):
    """An error caused by input (files, config, command line); the message says what and where."""

    exit_code = EXIT_USER_ERROR
    # Whether cli_errors must leave the run folder alone (it belongs to a run that may continue).
    keeps_folder = False


class ConfigError(UserError, ValueError):
    """A config option has an impossible value; the message names the option and the value."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read or does not belong to this run; the message names the file."""


class RunInterrupted(UserError):
    """The run was stopped by a signal; the message names the step ``last.ckpt`` holds (resume: ``ckpt_path=last``)."""

    exit_code = EXIT_INTERRUPTED
    keeps_folder = True


class RunFolderBusy(UserError):
    """Another process holds the run folder's lock; the folder is theirs, so it is never cleaned up."""

    keeps_folder = True


def full_error_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "").strip() not in ("", "0")


# Files a run folder holds before any of our outputs: Hydra's config copy, its log file and our lock.
_SCAFFOLD = {".hydra", "train.log", "evaluate.log", ".lock"}


def remove_if_scaffold_only(folder: str | os.PathLike | None) -> bool:
    """Delete a run folder that holds nothing but what Hydra and the lock put there before the run started.

    A run refused at the start (bad config, failed download) should not leave an empty-looking run
    folder behind; a folder with anything else in it (checkpoints, a split, outputs) is kept.
    """
    if not folder:
        return False
    folder = Path(folder)
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    if not names <= _SCAFFOLD:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@contextmanager
def cli_errors(run_folder_of=None) -> Iterator[None]:
    """Report a ``UserError`` as one line and exit non-zero (a traceback only with ``HYDRA_FULL_ERROR=1``).

    ``run_folder_of`` is a callable returning the run folder (or None); a folder left holding only
    Hydra's scaffold by an error at the start of a run is removed.
    """
    try:
        yield
    except UserError as exc:
        if full_error_wanted():
            raise
        # Logged errors reach the console only when logging is configured (Hydra does it); say it once. With
        # no handler at all, logging's last resort would print it too, so it is only logged where a file takes it.
        if _console_logging() or log.hasHandlers():
            log.error("%s", exc)
        if not _console_logging():
            print(f"error: {exc}", file=sys.stderr)
        if not exc.keeps_folder and run_folder_of is not None:
            try:
                folder = run_folder_of()
            except Exception:  # the config itself may be what is broken
                folder = None
            _close_file_handlers()
            remove_if_scaffold_only(folder)
        sys.exit(exc.exit_code)


def _console_logging() -> bool:
    root = logging.getLogger()
    return any(
        isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        for h in root.handlers
    )


def _close_file_handlers() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            root.removeHandler(handler)
