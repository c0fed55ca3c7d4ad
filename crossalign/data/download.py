"""Resumable, checksummed downloads and safe zip extraction for the official COCO archives.

* :func:`download` streams into ``<name>.part`` with a tqdm progress bar; after a dropped connection
  it retries with ``Range: bytes=<have>-`` and appends (a server that ignores Range restarts the
  file). The finished file is checked against :data:`CHECKSUMS` (size, then MD5) before it is
  renamed to its final name; a mismatch deletes the bytes and raises :class:`ChecksumError`
  naming the file, the expected and the actual value.
* :func:`safe_extract` refuses any entry that would land outside the target: absolute paths,
  drive letters, ``..`` components, symlinks that are absolute or climb with ``..``, and writes
  through links.

The checksum registry is module-level so tests (and mirrors of other files) can override entries.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from crossalign.io import atomic_dir

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Checksum:
    """What a finished download must match; ``md5`` None means size-only verification."""

    md5: str | None
    size: int | None
    source: str = ""  # where the published value comes from


# Published MD5s of the official archives (cocodataset.org lists no hashes itself; these are the
# values the community checks, e.g. NVIDIA/DeepLearningExamples MaskRCNN hashes.md5 and
# intel/neural-compressor for 2017, salesforce/LAVIS builders for 2014, mlverse/torchvision's
# coco_caption_dataset for the Karpathy zip). Sizes are the servers' Content-Length.
CHECKSUMS: dict[str, Checksum] = {
    "train2017.zip": Checksum("cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798, "NVIDIA DLE / intel INC"),
    "val2017.zip": Checksum("442b8da7639aecaf257c1dceb8ba8c80", 815_585_330, "NVIDIA DLE / intel INC"),
    "annotations_trainval2017.zip": Checksum("f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541,
                                             "NVIDIA DLE / intel INC"),
    "train2014.zip": Checksum("0da8c0bd3d6becc4dcb32757491aca88", 13_510_573_713, "salesforce/LAVIS"),
    "val2014.zip": Checksum("a3d79f5ed8d289b7a7554ce06a5782b3", 6_645_013_297, "salesforce/LAVIS"),
    # size not published alongside the MD5: MD5 only
    "caption_datasets.zip": Checksum("4fa8c08369d22fe16e41dc124bd1adc2", None, "mlverse/torchvision"),
}


class DownloadError(ValueError):
    """A download that could not complete (bad URL, HTTP error, retries exhausted)."""


class ChecksumError(ValueError):
    """A downloaded file whose size or MD5 is not the recorded one."""


class UnsafeArchiveError(ValueError):
    """An archive entry that would be written outside the extraction folder."""


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def checksum_for(name: str) -> Checksum:
    """The recorded checksum of archive ``name``; a file without one is refused."""
    if name not in CHECKSUMS:
        raise ValueError(f"no checksum recorded for {name!r} in crossalign.data.download.CHECKSUMS "
                         f"(known: {sorted(CHECKSUMS)})")
    return CHECKSUMS[name]


def verify(path: Path, expected: Checksum, url: str = "") -> None:
    """Raise :class:`ChecksumError` (naming file, expected and actual) unless ``path`` matches."""
    where = f"{path.name}{f' from {url}' if url else ''}"
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise ChecksumError(f"{where}: size {size} bytes, expected {expected.size}")
    if expected.md5 is not None:
        actual = md5sum(path)
        if actual != expected.md5.lower():
            raise ChecksumError(f"{where}: md5 {actual}, expected {expected.md5}")


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _already_verified(dest: Path, expected: Checksum) -> bool:
    """True when ``dest`` was verified earlier and has not changed since (skips re-hashing GBs)."""
    side = _sidecar(dest)
    if not (dest.exists() and side.exists()):
        return False
    try:
        rec = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = dest.stat()
    return rec == {"md5": expected.md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One HTTP attempt, resuming from ``part``'s size; raises on a short body."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is already whole
            return
        raise
    with resp:
        content_range = resp.headers.get("Content-Range", "")
        if have and (resp.status != 206 or not content_range.startswith(f"bytes {have}-")):
            log.warning("%s: server did not resume at byte %d (HTTP %s, %r); restarting", url, have,
                        resp.status, content_range)  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as fh, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress, leave=False) as bar:
            got = 0
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                fh.write(block)
                got += len(block)
                bar.update(len(block))
        if length is not None and got != int(length):
            raise http.client.IncompleteRead(b"", int(length) - got)


def download(url: str, dest: Path, expected: Checksum, *, retries: int = 5, timeout: float = 60.0,
             retry_wait: float = 2.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, return ``dest``.

    Transient failures (connection reset or cut, timeout, HTTP 5xx) are retried ``retries`` times,
    each resuming where the last stopped; waits grow from ``retry_wait`` seconds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _already_verified(dest, expected):
        return dest
    if dest.exists():  # whole but unverified (e.g. copied in by hand): check it, keep it if good
        try:
            verify(dest, expected, url)
        except ChecksumError as err:
            log.warning("%s; downloading again", err)
            dest.unlink()
        else:
            _record_verified(dest, expected)
            return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == retries:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if attempt == retries:
                raise DownloadError(f"{url}: failed after {retries + 1} attempts ({err!r}); "
                                    f"{part} is kept, run again to resume") from None
            reason = repr(err)
        have = part.stat().st_size if part.exists() else 0
        log.warning("%s: attempt %d failed (%s); resuming from byte %d", url, attempt + 1, reason, have)
        time.sleep(retry_wait * (2 ** attempt))
    try:
        verify(part, expected, url)
    except ChecksumError as err:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{err} (the file was deleted; run again to download it afresh)") from None
    os.replace(part, dest)
    _record_verified(dest, expected)
    return dest


def _record_verified(dest: Path, expected: Checksum) -> None:
    st = dest.stat()
    _sidecar(dest).write_text(json.dumps({"md5": expected.md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _inside(path: str | Path, root: Path) -> bool:
    return os.path.commonpath([os.path.abspath(path), str(root)]) == str(root)


def safe_extract(archive: Path, target: Path, progress: bool = True) -> int:
    """Extract a zip into ``target`` (which must exist); returns the number of files written.

    Raises :class:`UnsafeArchiveError` naming the archive and entry for an absolute path, a drive
    letter, a ``..`` component, a symlink whose target leaves ``target``, or a path that would be
    written through a link. Entries are checked one by one before anything of theirs is written."""
    root = Path(target).resolve()
    written = 0
    with zipfile.ZipFile(archive) as zf:
        for info in tqdm(zf.infolist(), desc=f"extract {Path(archive).name}", unit="file",
                         disable=not progress, leave=False):
            name = info.filename
            rel = PurePosixPath(name.replace("\\", "/"))
            if (rel.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in rel.parts):
                raise UnsafeArchiveError(f"{archive}: entry {name!r} would be written outside {target} "
                                         "(absolute path or '..'); refusing the archive")
            parts = [p for p in rel.parts if p not in ("", ".")]
            if not parts:
                continue
            dest = root.joinpath(*parts)
            if not _inside(dest.parent.resolve(), root):
                raise UnsafeArchiveError(f"{archive}: entry {name!r} would be written through a link "
                                         f"out of {target}")
            if stat.S_ISLNK(info.external_attr >> 16):
                # only links that go down from their own folder: with no '..' and no absolute
                # target, no chain of links can climb out, whatever order entries come in
                link = zf.read(info).decode("utf-8", "replace")
                link_parts = PurePosixPath(link.replace("\\", "/")).parts
                if not link or os.path.isabs(link) or re.match(r"^[A-Za-z]:", link) or ".." in link_parts:
                    raise UnsafeArchiveError(f"{archive}: symlink entry {name!r} -> {link!r} may point "
                                             f"outside {target} (absolute or '..'); refusing the archive")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, dest)
                continue
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                raise UnsafeArchiveError(f"{archive}: entry {name!r} would overwrite a symlink")
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            written += 1
    return written


def extract_cached(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Extract ``archive`` once into ``dest`` (atomically); reuse it while the archive is unchanged."""
    marker = {"archive": Path(archive).name, "size": Path(archive).stat().st_size,
              "mtime_ns": Path(archive).stat().st_mtime_ns}
    stamp = dest / ".extracted.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == marker:
                return dest
        except json.JSONDecodeError:
            pass
    with atomic_dir(dest) as tmp:
        safe_extract(archive, tmp, progress)
        (tmp / ".extracted.json").write_text(json.dumps(marker))
    return dest
