"""Missing PerturbQA files are downloaded (from a local HTTP server here) or fail with a clear message."""

import hashlib
import http.server
import os
import threading
import time
from contextlib import contextmanager

import pandas as pd
import pytest

from perturb_models.data import perturbqa
from perturb_models.data.perturbqa import DataValidationError, ensure_task_files, load_task_tables
from perturb_models.io import DownloadError, download, download_marker
from tests.test_perturbqa_files import GOOD_DE, GOOD_DIR, write


def test_missing_published_files_are_downloaded_into_the_data_root(http_folder, tmp_path):
    served, url = http_folder
    write(served, "jurkat-de.csv", GOOD_DE)
    write(served, "jurkat-dir.csv", GOOD_DIR)
    root = tmp_path / "data"
    tables = load_task_tables("jurkat", "joint", root=root, base_url=url)
    assert (root / "jurkat-de.csv").read_bytes() == (served / "jurkat-de.csv").read_bytes()
    assert len(tables.de) == len(GOOD_DE)
    assert not [p for p in os.listdir(root) if p.endswith(".part")]


def test_existing_files_are_not_downloaded_again(http_folder, tmp_path):
    served, url = http_folder
    write(tmp_path, "jurkat-de.csv", GOOD_DE)
    write(tmp_path, "jurkat-dir.csv", GOOD_DIR)
    # Nothing is served: a download attempt would fail.
    paths = ensure_task_files("jurkat", root=tmp_path, base_url=url)
    assert paths["de"].parent == tmp_path


def test_base_url_from_environment(http_folder, tmp_path, monkeypatch):
    served, url = http_folder
    write(served, "jurkat-de.csv", GOOD_DE)
    monkeypatch.setenv("PERTURBQA_URL", url)
    paths = ensure_task_files("jurkat", ("de",), root=tmp_path)
    assert pd.read_csv(paths["de"]).shape == (len(GOOD_DE), 4)


def test_offline_error_names_the_url_and_how_to_use_local_files(tmp_path):
    unreachable = "http://127.0.0.1:9"  # discard port: nothing listens there
    with pytest.raises(DownloadError) as info:
        ensure_task_files("jurkat", root=tmp_path, base_url=unreachable)
    message = str(info.value)
    assert f"{unreachable}/jurkat-de.csv" in message
    assert "data.root=" in message and "PERTURBQA_DATA" in message
    assert not list(tmp_path.iterdir()), "a failed download must leave nothing behind"


def test_missing_file_with_downloads_off_says_where_to_fetch_it(tmp_path):
    with pytest.raises(DataValidationError, match=r"downloads are off.*PerturbQA/main/perturbqa/datasets/k562-de.csv"):
        ensure_task_files("k562", root=tmp_path, allow_download=False)


def test_data_root_falls_back_to_environment_then_cache(tmp_path, monkeypatch, isolated_cache):
    from perturb_models.data.perturbqa import resolve_data_root

    monkeypatch.setenv("PERTURBQA_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("PERTURBQA_DATA")
    assert resolve_data_root(None) == isolated_cache / "perturbqa"


# ---- servers that misbehave, on 127.0.0.1; each handler stops by itself within a few seconds ----------


BODY = b"pert,gene,label,split\n" + b"".join(
    f"P{i},G{i},{i % 2},{'test' if i >= 150 else 'train'}\n".encode() for i in range(200)
)


class Misbehaving(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    body = BODY

    def log_message(self, *args):
        pass

    def do_GET(self):
        body, mode = self.body, self.mode
        try:
            if mode == "html":
                page = b"<!DOCTYPE html><html><body>Rate limited, try later</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")  # servers lie about it too
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            elif mode == "truncated":  # announces the whole file, sends half, closes
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
            elif mode == "no_length":  # no Content-Length, cut at a row boundary
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body[: body.rfind(b"\n", 0, len(body) // 2) + 1])
                self.close_connection = True
            elif mode == "drip":  # one byte every 0.2 s, never more than 5 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(25):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            elif mode == "stall":  # headers, then nothing for 3 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(3)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def serve(mode: str, body: bytes = BODY):
    handler = type("Handler", (Misbehaving,), {"mode": mode, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("html", "the server sent an HTML page, not the file"),
        ("truncated", r"cut short: \d+ of \d+ bytes"),
        (
            "drip",
            r"not finished after the 1 s allowed for one file \(\d+ bytes received\); set PERTURB_DOWNLOAD_DEADLINE "
            r"to allow more",
        ),
        ("stall", r"the server sent nothing for 1 s after 0 bytes"),
    ],
)
def test_bad_server_responses_are_refused_and_nothing_is_kept(tmp_path, mode, reason):
    dest = tmp_path / "jurkat-de.csv"
    started = time.monotonic()
    with serve(mode) as url:
        with pytest.raises(
            DownloadError, match=rf"Could not download the file from {url}/f.csv \({reason}\); nothing was written"
        ):
            download(f"{url}/f.csv", dest, what="the file", timeout=1.0, deadline=1.0)
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir()), "nothing may be left behind, not even a .part file"


def test_body_without_length_cut_at_a_row_boundary_fails_the_recorded_checksum(tmp_path, monkeypatch):
    monkeypatch.setitem(perturbqa.OFFICIAL_FILES, "k562-de.csv", (len(BODY), hashlib.sha256(BODY).hexdigest()))
    with serve("no_length") as url:
        with pytest.raises(DownloadError, match=rf"bytes, the official file has {len(BODY)}"):
            ensure_task_files("k562", ("de",), root=tmp_path, base_url=url)
    assert not list(tmp_path.iterdir())
    with serve("ok") as url:
        ensure_task_files("k562", ("de",), root=tmp_path, base_url=url)
    assert (tmp_path / "k562-de.csv").read_bytes() == BODY


def test_download_with_the_right_size_but_another_checksum_is_refused(tmp_path, monkeypatch):
    tampered = BODY.replace(b"P1,G1,1", b"P1,G1,0")
    monkeypatch.setitem(perturbqa.OFFICIAL_FILES, "k562-de.csv", (len(BODY), hashlib.sha256(BODY).hexdigest()))
    with serve("ok", tampered) as url:
        with pytest.raises(DownloadError, match=r"SHA-256 [0-9a-f]{64} differs from the official file's"):
            ensure_task_files("k562", ("de",), root=tmp_path, base_url=url)
    assert not list(tmp_path.iterdir())


def test_recorded_checksums_are_those_of_the_official_files(perturbqa_root):
    for name, (size, sha256) in perturbqa.OFFICIAL_FILES.items():
        path = perturbqa_root / name
        if path.is_file():
            assert path.stat().st_size == size and hashlib.sha256(path.read_bytes()).hexdigest() == sha256, name


def test_official_file_served_verbatim_is_verified_and_kept(perturbqa_root, tmp_path):
    with serve("ok", (perturbqa_root / "k562_set-dir.csv").read_bytes()) as url:
        paths = ensure_task_files("k562_set", ("dir",), root=tmp_path, base_url=url)
    assert paths["dir"].read_bytes() == (perturbqa_root / "k562_set-dir.csv").read_bytes()
    assert '"verified_sha256": true' in download_marker(paths["dir"]).read_text()


def test_invalid_file_we_downloaded_is_moved_aside_and_downloaded_again(http_folder, tmp_path, caplog):
    served, url = http_folder
    write(served, "jurkat-de.csv", GOOD_DE)
    root = tmp_path / "data"
    ensure_task_files("jurkat", ("de",), root=root, base_url=url)
    (root / "jurkat-de.csv").write_text("pert,gene,label,split\nP1,G1,7,train\n")  # damaged later
    tables = load_task_tables("jurkat", "de", root=root, base_url=url)
    assert len(tables.de) == len(GOOD_DE)
    [aside] = root.glob("jurkat-de.csv.invalid-*")
    assert "7,train" in aside.read_text()
    assert "moved to" in caplog.text and "downloading it again" in caplog.text


def test_invalid_published_file_that_we_did_not_download_is_reported_with_the_advice_to_delete_it(tmp_path):
    (tmp_path / "jurkat-de.csv").write_text("pert,gene,label,split\nP1,G1,7,train\n")
    with pytest.raises(
        DataValidationError, match=r"jurkat-de.csv line 2: label '?7'? .*delete it and it will be downloaded again"
    ):
        load_task_tables("jurkat", "de", root=tmp_path, base_url="http://127.0.0.1:9")
    assert (tmp_path / "jurkat-de.csv").is_file()


def test_invalid_csv_served_for_a_file_without_a_recorded_checksum_is_refused_before_it_is_kept(http_folder, tmp_path):
    served, url = http_folder
    (served / "jurkat-de.csv").write_text("pert,gene,label,split\nP1,G1,1,train\nP1,G1,0,train\n")
    with pytest.raises(DownloadError, match=r"the downloaded file is not valid: jurkat-de.csv line 3: duplicate pair"):
        ensure_task_files("jurkat", ("de",), root=tmp_path, base_url=url)
    assert not list(tmp_path.iterdir())


def test_published_file_of_another_size_than_the_official_one_is_flagged(tmp_path, caplog):
    # e.g. a copy truncated at a row boundary: valid as a task file, but not the published data
    write(tmp_path, "k562-de.csv", GOOD_DE)
    load_task_tables("k562", "de", root=tmp_path, allow_download=False)
    size = (tmp_path / "k562-de.csv").stat().st_size
    assert f"k562-de.csv has {size} bytes, the official PerturbQA k562-de.csv has 3203066" in caplog.text
    assert "delete it and it will be downloaded again" in caplog.text
