"""File helpers shared by the whole package: cache folders, atomic writes, downloads."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from perturb_models.errors import UserError


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


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkstemp_with_umask(path: Path, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``path``, but with the permissions a plain ``open`` would give.

    mkstemp creates files with mode 0600, which the rename then carries into place: data, caches and
    outputs became unreadable to the rest of a lab group. The usual 0666 minus the umask is restored.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def _atomic_target(path: str | os.PathLike) -> tuple[Path, int, str]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_with_umask(path, ".tmp")
    return path, fd, tmp


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``path``, renamed into place only when the block ends
    without error (after an fsync); on any error, or a kill, ``path`` keeps its previous content."""
    path, fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    with atomic_writer(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def nan_to_none(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: metrics that could not be computed are written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def atomic_write_dataframe(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write_text(path, frame.to_csv(index=False))


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched; the message says from where and what to do instead."""


DOWNLOAD_DEADLINE_S = 900.0
"""Overall time allowed for one file (``$PERTURB_DOWNLOAD_DEADLINE`` overrides): a server that drips
bytes slowly enough to never trip the per-read timeout still ends the download."""

_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")


def looks_like_html(head: bytes) -> bool:
    return head.lstrip().lower().startswith(_HTML_STARTS)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_marker(dest: str | os.PathLike) -> Path:
    """The provenance file written beside a file this project downloaded (``.NAME.download.json``)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.download.json")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    what: str,
    alternatives: Iterable[str] = (),
    timeout: float = 60.0,
    deadline: float | None = None,
    size: int | None = None,
    sha256: str | None = None,
    check: Callable[[Path], Any] | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` through a temporary file that is verified, then renamed into place.

    Refused before the rename (nothing is left behind): an HTML page (an error or login page served with
    status 200), a body shorter or longer than its ``Content-Length``, a size or SHA-256 that differs
    from the recorded ``size`` / ``sha256``, a ``check(tmp_path)`` that raises. ``timeout`` bounds each
    read (a server that stalls after the headers), ``deadline`` (default ``DOWNLOAD_DEADLINE_S``) the
    whole file (a server that drips). ``what`` names the file in messages; ``alternatives`` are hints
    printed when the download fails (e.g. how to point the project at a local copy).
    """
    dest = Path(dest)
    if deadline is None:
        deadline = float(os.environ.get("PERTURB_DOWNLOAD_DEADLINE") or DOWNLOAD_DEADLINE_S)
    hints = "".join(f"\n  - {hint}" for hint in alternatives)

    def fail(reason: str) -> DownloadError:
        return DownloadError(f"Could not download {what} from {url} ({reason}); nothing was written to {dest}.{hints}")

    started = time.monotonic()
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise fail(str(reason)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_with_umask(dest, ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        content_type = (response.headers.get("Content-Type") or "").lower()
        if "text/html" in content_type:
            raise fail(f"the server sent an HTML page (Content-Type {content_type}), not the file")
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            os.fdopen(fd, "wb") as handle,
            response,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {dest.name}",
                leave=False,
                disable=None,
            ) as bar,
        ):
            while True:
                if time.monotonic() - started > deadline:
                    raise fail(
                        f"not finished after the {deadline:.0f} s allowed for one file ({received} bytes "
                        f"received); set PERTURB_DOWNLOAD_DEADLINE to allow more"
                    )
                try:
                    # read1 returns what has arrived instead of waiting for a full block, so the deadline
                    # is checked while a slow server drips.
                    chunk = response.read1(1 << 16)
                except TimeoutError:
                    raise fail(f"the server sent nothing for {timeout:.0f} s after {received} bytes") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise fail(f"the connection failed after {received} bytes: {exc}") from None
                if not chunk:
                    break
                if received == 0 and looks_like_html(chunk[:64]):
                    raise fail("the server sent an HTML page, not the file")
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
        if total is not None and received != total:
            raise fail(f"cut short: {received} of {total} bytes")
        if size is not None and received != size:
            raise fail(f"{received} bytes, the official file has {size}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise fail(f"SHA-256 {digest.hexdigest()} differs from the official file's {sha256}")
        if check is not None:
            try:
                check(Path(tmp))
            except UserError as exc:
                raise fail(f"the downloaded file is not valid: {str(exc).replace(str(tmp), dest.name)}") from None
        os.replace(tmp, dest)
        atomic_write_text(
            download_marker(dest),
            json.dumps(
                {"url": url, "bytes": received, "sha256": digest.hexdigest(), "verified_sha256": sha256 is not None},
                indent=2,
            )
            + "\n",
        )
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
