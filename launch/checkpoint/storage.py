"""Where checkpoints are stored: a local directory (a `pathlib.Path`) or an fsspec URL (`s3://`,
`gs://`, `file://`, `memory://`) as an `FsspecPath`, which has the pathlib methods the checkpoint
code uses (`/`, `name`, `parent`, `exists`, `is_file`, `is_dir`, `iterdir`, `open`, `read_*`,
`write_*`, `stat().st_size`, `mkdir`, `unlink`), so one code path reads and writes both. What
pathlib lacks (a recursive file list, removing a tree, flushing, copying a local file in or out,
DCP's writer) are the functions below, each taking either kind.

A local path can rename a finished directory into place; an object store cannot, so a checkpoint
behind a URL is written where it will stay and committed by a marker written last
(`launch.checkpoint.atomic`). `file://` URLs take the object-store path (how it is tested);
`memory://` is per process (tests of one process)."""

from __future__ import annotations

import atexit
import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from launch.runtime.errors import UserError

# Extras that bring the filesystems fsspec itself does not ship.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(location: Any) -> bool:
    """An fsspec URL (`scheme://...`) or an FsspecPath, as opposed to a local path."""
    return isinstance(location, FsspecPath) or (isinstance(location, str) and "://" in location)


def _why_not(url: str, e: Exception) -> str:
    scheme = url.split("://", 1)[0].split("::")[-1]
    if isinstance(e, ImportError):
        return f"{e}" + (f" (pip install 'memscale[{_EXTRAS[scheme]}]')" if scheme in _EXTRAS else "")
    return f"{e} (fsspec has no filesystem for '{scheme}://')"


def check_url(url: str, key: str) -> None:
    """One line naming `key` if fsspec cannot open `url`'s scheme here (unknown, or its package missing),
    checked without touching the store."""
    import fsspec

    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0].split("::")[-1])
    except (ImportError, ValueError) as e:
        raise UserError(f"{key}={url}: {_why_not(url, e)}") from None


class FsspecPath:
    """A file or directory on an fsspec filesystem, with the subset of pathlib's API listed above."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.path = path.rstrip("/") or "/"

    @classmethod
    def from_url(cls, url: str) -> FsspecPath:
        from fsspec.core import url_to_fs

        try:
            fs, path = url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise UserError(f"cannot open {url}: {_why_not(url, e)}") from None
        return cls(fs, path)

    # -- naming --
    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"FsspecPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsspecPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str | os.PathLike) -> FsspecPath:
        return FsspecPath(self.fs, posixpath.join(self.path, os.fspath(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> FsspecPath:
        return FsspecPath(self.fs, posixpath.dirname(self.path))

    @property
    def local(self) -> Path | None:
        """The same place as a local Path (file:// URLs), None on a remote store."""
        from fsspec.implementations.local import LocalFileSystem

        return Path(self.path) if isinstance(self.fs, LocalFileSystem) else None

    # -- queries (listings bypass fsspec's cache: another process, another rank, writes there) --
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return self.fs.isdir(self.path)

    def iterdir(self) -> list[FsspecPath]:
        self.fs.invalidate_cache(self.path)
        found = (FsspecPath(self.fs, p) for p in self.fs.ls(self.path, detail=False))
        return sorted((p for p in found if p.path != self.path), key=lambda p: p.path)

    def files(self) -> list[str]:
        """Every file under this directory, as sorted paths relative to it."""
        self.fs.invalidate_cache(self.path)
        prefix = self.path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in self.fs.find(self.path) if p.startswith(prefix))

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=self.fs.size(self.path))

    # -- reading and writing --
    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)


CheckpointPath = Path | FsspecPath


def as_path(location: str | os.PathLike | FsspecPath) -> CheckpointPath:
    """A URL as an FsspecPath, anything else as a Path."""
    if isinstance(location, FsspecPath | Path):
        return location
    text = os.fspath(location)
    return FsspecPath.from_url(text) if "://" in text else Path(text)


def local_path(location: str | os.PathLike | FsspecPath) -> Path | None:
    """`location` on this machine's filesystem (a path, or a file:// URL), None for a remote store."""
    if isinstance(location, FsspecPath):
        return location.local
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    return as_path(text).local if text.startswith("file://") else None


def renames(location: CheckpointPath) -> bool:
    """Whether a finished directory can be renamed into place here (a local path) rather than committed
    by a marker (an fsspec store)."""
    return isinstance(location, Path)


def files(root: CheckpointPath) -> list[str]:
    """Every file under `root`, as sorted relative paths."""
    if isinstance(root, FsspecPath):
        return root.files()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def rmtree(location: CheckpointPath) -> None:
    """Remove a directory and everything under it; nothing there is not an error."""
    if isinstance(location, FsspecPath):
        location.rmtree()
    else:
        shutil.rmtree(location, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """Flush every file under a local `path` to disk."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def sync_tree(location: CheckpointPath) -> None:
    """Make every file under `location` durable: fsync on a local disk (a path or file://); on an object
    store an upload is durable once its close() has returned, so nothing is left to do."""
    local = location if isinstance(location, Path) else location.local
    if local is not None:
        fsync_tree(local)


def put_file(source: Path, dest: CheckpointPath) -> None:
    """Copy the local file `source` to `dest`."""
    if isinstance(dest, FsspecPath):
        dest.fs.put_file(str(source), dest.path)
    else:
        shutil.copyfile(source, dest)


_DOWNLOADS: list[str] = []


def local_copy(location: CheckpointPath) -> Path:
    """A local file with the content of `location` (itself when local): for readers that need a file
    name (sentencepiece, OmegaConf, safetensors). Downloads live in a temporary directory removed at exit."""
    local = location if isinstance(location, Path) else location.local
    if local is not None:
        return local
    if not location.is_file():
        raise UserError(f"{location} is missing: not a complete checkpoint")
    if not _DOWNLOADS:
        _DOWNLOADS.append(tempfile.mkdtemp(prefix="memscale_fsspec_"))
        atexit.register(shutil.rmtree, _DOWNLOADS[0], True)
    dest = Path(tempfile.mkdtemp(dir=_DOWNLOADS[0])) / location.name
    location.fs.get_file(location.path, str(dest))
    return dest


def dcp_writer(directory: CheckpointPath) -> Any:
    """torch.distributed.checkpoint's writer for `directory`: the file-system one for a path, the fsspec
    one for a URL (files flushed with fsync only where there is a local disk to flush)."""
    import torch.distributed.checkpoint as dcp

    if isinstance(directory, Path):
        return dcp.FileSystemWriter(directory, sync_files=True)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(str(directory), sync_files=directory.local is not None)
