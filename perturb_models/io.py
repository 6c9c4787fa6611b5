"""File helpers shared by the whole package: cache folders, atomic writes, downloads."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm


def cache_dir(*parts: str) -> Path:
    """The user cache folder of the project (``$PERTURB_MODELS_CACHE``, else ``$XDG_CACHE_HOME``/perturb_models)."""
    base = os.environ.get("PERTURB_MODELS_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "perturb_models")
    return Path(base, *parts)


def resolve_folder(root: str | os.PathLike | None, env_var: str, cache_name: str) -> Path:
    """A data folder: ``root`` if given, else ``$env_var``, else ``cache_dir(cache_name)`` (``~`` expanded)."""
    if root not in (None, ""):
        return Path(os.path.expanduser(str(root)))
    env = os.environ.get(env_var)
    if env:
        return Path(os.path.expanduser(env))
    return cache_dir(cache_name)


def _atomic_target(path: str | os.PathLike) -> tuple[Path, int, str]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return path, fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path, fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_dataframe(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write_text(path, frame.to_csv(index=False))


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says from where and what to do instead."""


def download(url: str, dest: str | os.PathLike, *, what: str, alternatives: Iterable[str] = (), timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` with a progress bar, through a temporary file renamed into place.

    ``what`` names the file for messages; ``alternatives`` are hints printed when the download fails
    (e.g. how to point the project at a local copy).
    """
    dest = Path(dest)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        hints = "".join(f"\n  - {hint}" for hint in alternatives)
        raise DownloadError(f"Could not download {what} from {url} ({exc}).{hints}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
        with os.fdopen(fd, "wb") as handle, response, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}", leave=False
        ) as bar:
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                handle.write(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
        if total is not None and os.path.getsize(tmp) != total:
            raise DownloadError(f"Download of {what} from {url} was cut short ({os.path.getsize(tmp)} of {total} bytes).")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
