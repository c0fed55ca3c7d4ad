"""Files DVC does not push, carried between hosts on a side path of the project's DVC remote.

Two kinds of files need it when stages run on different hosts (flows/stage_run.py):

- ``cache: false`` outs (``metrics/<m>.json``, ``reports/``, ``plots/train/<m>.csv``,
  ``eval/test_index.json``): on one host git carries them, but a stage run on another host must
  hand them to the stages downstream and to the orchestrating flow, which commits them;
- the resumable training checkpoint (``models/<m>/checkpoints/``, ``persist: true``) while
  ``train`` runs, so that a retry on another host resumes from the last epoch pushed.

Files are stored content-addressed (``<remote>/crossalign-side/blobs/<md5[:2]>/<md5[2:]>``), so two
hosts writing the same file write the same object and nothing is overwritten; a set of files is a
*manifest* ``{relative path: md5}``. Checkpoint manifests are named objects
(``crossalign-side/checkpoints/<key>.json``), written after their blobs and moved into place, so a
reader sees the previous complete manifest or the next one, never half of one. The remote's
filesystem (and its credentials) is DVC's own (``Repo.cloud.get_remote()``): a local directory,
S3, GCS, SSH — whatever ``dvc remote add -d`` configured.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

from crossalign.data.download import md5sum
from flows.trust import Refused, check_manifest

SIDE = "crossalign-side"


def files_under(root: Path, rel: str, hidden: bool = True) -> list[str]:
    """``rel`` (a file or a directory under ``root``) as the sorted relative paths of its files;
    ``hidden=False`` leaves out those under a dot-name (e.g. a half-written ``.seed-0.tmp-*``)."""
    path = root / rel
    if path.is_file():
        return [rel]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: declared out is missing after the stage ran")
    return sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file()
                  and (hidden or not any(part.startswith(".") for part in p.relative_to(path).parts)))


class SideStore:
    """The side path of the default DVC remote of the project at ``root``."""

    def __init__(self, root: str | Path):
        from dvc.repo import Repo

        self.root = Path(root).resolve()
        with Repo(str(self.root)) as repo:
            remote = repo.cloud.get_remote()  # raises naming `dvc remote add -d` when there is none
        self.fs = remote.fs
        self.base = self.fs.join(remote.path, SIDE)

    def _blob(self, md5: str) -> str:
        return self.fs.join(self.base, "blobs", md5[:2], md5[2:])

    def put(self, rels: list[str], root: Path | None = None) -> dict[str, str]:
        """Upload the files (relative paths under ``root``, default the project); return their manifest."""
        root = root or self.root
        manifest = {}
        for rel in rels:
            md5 = md5sum(root / rel)
            blob = self._blob(md5)
            if not self.fs.exists(blob):
                tmp = f"{blob}.tmp-{uuid.uuid4().hex}"
                self.fs.makedirs(self.fs.parent(blob), exist_ok=True)
                self.fs.put_file(str(root / rel), tmp)
                self.fs.mv(tmp, blob)
            manifest[rel] = md5
        return manifest

    def get(self, manifest: dict[str, str], root: Path | None = None, within: list[str] | None = None,
            what: str = "side-store manifest") -> None:
        """Write each file of ``manifest`` under ``root`` (default the project), replacing it atomically.

        Every path is checked first (flows/trust.py: relative, no ``..``, resolving inside ``root``
        through any symlink, and, with ``within``, inside one of those outs): one bad path refuses
        the whole manifest (:class:`flows.trust.Refused`, naming ``what``) before a file is written."""
        root = Path(root or self.root)
        check_manifest(manifest, what, within=within, root=root)
        for rel, md5 in manifest.items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            os.close(fd)
            try:
                self.fs.get_file(self._blob(md5), tmp)
                if md5sum(Path(tmp)) != md5:
                    raise OSError(f"{self._blob(md5)}: content does not match md5 {md5} ({rel})")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _checkpoint(self, key: str) -> str:
        return self.fs.join(self.base, "checkpoints", f"{key}.json")

    def put_checkpoint(self, key: str, manifest: dict[str, str]) -> None:
        """Publish ``manifest`` (its blobs already uploaded) as the latest checkpoint of ``key``."""
        path = self._checkpoint(key)
        self.fs.makedirs(self.fs.parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, json.dumps(manifest, sort_keys=True).encode())
        self.fs.mv(tmp, path)

    def get_checkpoint(self, key: str, within: list[str] | None = None) -> dict[str, str] | None:
        """The latest checkpoint manifest of ``key`` (``None``: none was pushed), checked as a
        manifest (``within``: the outs it may hold) before it is returned."""
        path = self._checkpoint(key)
        if not self.fs.exists(path):
            return None
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except ValueError as err:
            raise Refused(f"checkpoint manifest {path}: not JSON ({err})") from None
        return check_manifest(manifest, f"checkpoint manifest {path}", within=within, root=self.root)
