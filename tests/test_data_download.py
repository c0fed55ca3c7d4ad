"""Downloads against a real HTTP server on 127.0.0.1 (Range, cuts, bad checksums) and safe
extraction of malicious zips."""
from __future__ import annotations

import hashlib
import io
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from crossalign.data import download
from crossalign.data.download import Checksum, ChecksumError, DownloadError, UnsafeArchiveError


class ArchiveServer:
    """Serves ``files`` {url path: bytes} with HTTP Range support; records (path, Range header) of
    every request; ``cut_once[path] = n`` makes the next response for ``path`` stop after n bytes
    of its body and drop the connection."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: dict[str, int] = {}
        self.ignore_range = False  # behave like a server without Range support
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                rng = None if server.ignore_range else rng
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                cut = server.cut_once.pop(self.path, None)
                self.wfile.write(payload if cut is None else payload[:cut])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        return Handler

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def checksum_of(body: bytes) -> Checksum:
    return Checksum(hashlib.md5(body).hexdigest(), len(body), "test")


def make_zip(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in entries.items():
            zf.writestr(name, body)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


BODY = bytes(range(256)) * 4000  # ~1 MB, more than one read chunk


@pytest.fixture
def server():
    with ArchiveServer({"/zips/blob.zip": BODY}) as srv:
        yield srv


def test_download_verifies_and_reuses(server: ArchiveServer, tmp_path: Path) -> None:
    dest = tmp_path / "blob.zip"
    assert download.download(f"{server.url}/zips/blob.zip", dest, checksum_of(BODY), retry_wait=0) == dest
    assert dest.read_bytes() == BODY and not dest.with_name("blob.zip.part").exists()
    download.download(f"{server.url}/zips/blob.zip", dest, checksum_of(BODY), retry_wait=0)
    assert server.requests == [("/zips/blob.zip", None)]  # the verified file is not fetched again


def test_wrong_checksum_names_file_and_hashes_and_keeps_nothing(server: ArchiveServer, tmp_path: Path) -> None:
    dest = tmp_path / "blob.zip"
    wrong = Checksum("0" * 32, len(BODY))
    with pytest.raises(ChecksumError) as err:
        download.download(f"{server.url}/zips/blob.zip", dest, wrong, retry_wait=0)
    msg = str(err.value)
    assert "blob.zip" in msg and "0" * 32 in msg and hashlib.md5(BODY).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a .part that looks resumable
    with pytest.raises(ChecksumError, match=f"size {len(BODY)} bytes, expected {len(BODY) + 1}"):
        download.download(f"{server.url}/zips/blob.zip", dest, Checksum(None, len(BODY) + 1), retry_wait=0)


def test_connection_cut_mid_file_resumes_with_range(server: ArchiveServer, tmp_path: Path) -> None:
    server.cut_once["/zips/blob.zip"] = 300_000
    dest = tmp_path / "blob.zip"
    download.download(f"{server.url}/zips/blob.zip", dest, checksum_of(BODY), retry_wait=0)
    assert dest.read_bytes() == BODY
    assert server.requests == [("/zips/blob.zip", None), ("/zips/blob.zip", "bytes=300000-")]


def test_interrupted_part_is_resumed_by_a_later_run(server: ArchiveServer, tmp_path: Path) -> None:
    (tmp_path / "blob.zip.part").write_bytes(BODY[:123_456])  # left by a killed run
    download.download(f"{server.url}/zips/blob.zip", tmp_path / "blob.zip", checksum_of(BODY), retry_wait=0)
    assert (tmp_path / "blob.zip").read_bytes() == BODY
    assert server.requests == [("/zips/blob.zip", "bytes=123456-")]


def test_server_without_range_support_restarts_the_file(server: ArchiveServer, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / "blob.zip.part").write_bytes(b"stale bytes that must not stay in front")
    download.download(f"{server.url}/zips/blob.zip", tmp_path / "blob.zip", checksum_of(BODY), retry_wait=0)
    assert (tmp_path / "blob.zip").read_bytes() == BODY


def test_http_errors_and_unknown_archives(server: ArchiveServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="nothing.zip: HTTP 404"):
        download.download(f"{server.url}/zips/nothing.zip", tmp_path / "x.zip", checksum_of(b""), retry_wait=0)
    with pytest.raises(ValueError, match="no checksum recorded for 'mystery.zip'"):
        download.checksum_for("mystery.zip")


def test_real_checksums_are_recorded() -> None:
    for name in ("train2017.zip", "val2017.zip", "annotations_trainval2017.zip", "train2014.zip",
                 "val2014.zip", "caption_datasets.zip"):
        c = download.CHECKSUMS[name]
        assert c.md5 is not None and len(c.md5) == 32 and c.source


@pytest.mark.parametrize("entries, links", [
    ({"../evil.txt": b"x"}, {}),
    ({"/abs/evil.txt": b"x"}, {}),
    ({"ok/../../evil.txt": b"x"}, {}),
    ({"C:/evil.txt": b"x"}, {}),
    ({}, {"link": "../../"}),
    ({}, {"link": "/etc"}),
    ({"a.txt": b"fine"}, {"sub/up": "x/../.."}),
])
def test_malicious_zip_is_refused(tmp_path: Path, entries: dict, links: dict) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip(entries, links))
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError, match="evil.zip"):
        download.safe_extract(archive, target, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not any(p.is_symlink() for p in target.rglob("*"))


def test_write_through_an_existing_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "escape").symlink_to(outside)
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"escape/file.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError, match="through a link"):
        download.safe_extract(archive, target, progress=False)
    assert list(outside.iterdir()) == []


def test_good_zip_extracts_once(tmp_path: Path, monkeypatch) -> None:
    archive = tmp_path / "good.zip"
    archive.write_bytes(make_zip({"train2017/a.jpg": b"A", "train2017/sub/b.jpg": b"B", "notes/": b""},
                                 {"train2017/alias.jpg": "a.jpg"}))
    out = download.extract_cached(archive, tmp_path / "extracted" / "good", progress=False)
    assert (out / "train2017" / "a.jpg").read_bytes() == b"A"
    assert (out / "train2017" / "sub" / "b.jpg").read_bytes() == b"B"
    assert (out / "train2017" / "alias.jpg").is_symlink() and (out / "train2017" / "alias.jpg").read_bytes() == b"A"

    def fail(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(download, "safe_extract", fail)
    assert download.extract_cached(archive, tmp_path / "extracted" / "good", progress=False) == out
