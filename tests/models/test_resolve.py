"""resolve_model's four kinds of spec, the cache markers, list_cached and the lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from specsplit.models import cache_dir, list_cached, resolve, resolve_model
from specsplit.models.convert import MARKER, Marker


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def _cached(cache: Path, name: str) -> Path:
    folder = _hf_folder(cache / "models" / name)
    Marker(name, "pypi:test==1", "x.gguf", 1, "float32", "5", 1.0, "now").write(folder)
    return folder


def _no_fetch(*args: object, **kwargs: object) -> Path:
    raise AssertionError("nothing should be downloaded")


def _no_hub(*args: object, **kwargs: object) -> str:
    raise OSError("hub unreachable (test)")


def test_cache_dir_from_env(cache: Path) -> None:
    assert cache_dir() == cache


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPECSPLIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "specsplit"


def test_hf_folder_returned_as_is(tmp_path: Path, cache: Path) -> None:
    folder = _hf_folder(tmp_path / "my-model")
    assert resolve_model(str(folder)) == folder.resolve()
    assert not cache.exists()  # nothing was copied or converted


def test_cached_catalog_model_returned_without_fetch(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _cached(cache, "smollm2-135m")
    monkeypatch.setattr(resolve, "fetch_gguf", _no_fetch)
    assert resolve_model("smollm2-135m") == folder


def test_half_written_folder_is_pulled_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _hf_folder(cache / "models" / "smollm2-135m")  # no marker: an interrupted pull
    (cache / "models" / ".smollm2-135m.tmp-999").mkdir()  # and a killed conversion's leftovers

    def fetch_fails(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("fetch attempted")

    monkeypatch.setattr(resolve, "fetch_gguf", fetch_fails)
    with pytest.raises(RuntimeError, match="fetch attempted"):
        resolve_model("smollm2-135m", progress=False)
    assert not (cache / "models" / ".smollm2-135m.tmp-999").exists()
    assert folder.exists()  # the old folder stays until a new one is complete


def test_unknown_name_lists_catalogue(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    for expected in (
        "not a model folder",
        "not a .gguf file",
        "smollm2-135m",
        "qwen2.5-coder-1.5b",
    ):
        assert expected in message
    assert "hub unreachable (test)" in message


def test_path_like_spec_does_not_try_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_fetch)
    with pytest.raises(ValueError, match="not a hub id"):
        resolve_model(str(tmp_path / "missing" / "model.gguf"))


def test_folder_without_weights_is_explained(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="exists but holds no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_list_cached_skips_incomplete_folders(cache: Path) -> None:
    done = _cached(cache, "smollm2-135m")
    _hf_folder(cache / "models" / "qwen2.5-coder-0.5b")  # no marker
    (cache / "models" / ".smollm2-135m.tmp-1").mkdir()
    models = list_cached()
    assert [(m.name, m.path, m.source) for m in models] == [("smollm2-135m", done, "pypi:test==1")]
    assert models[0].size_bytes == sum(p.stat().st_size for p in done.iterdir())
    assert (done / MARKER).is_file()


def test_list_cached_of_missing_cache_is_empty(cache: Path) -> None:
    assert list_cached() == []


def test_lock_serializes_two_pullers(cache: Path) -> None:
    order: list[str] = []

    def hold(label: str) -> None:
        with resolve._locked("m", progress=False):
            order.append(f"{label} in")
            time.sleep(0.2)
            order.append(f"{label} out")

    first = threading.Thread(target=hold, args=("a",))
    first.start()
    time.sleep(0.05)
    hold("b")
    first.join()
    assert order == ["a in", "a out", "b in", "b out"]


def test_unknown_name_offline_is_one_short_line_with_a_suggestion(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError(
            "Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying to "
            "locate the files on the Hub, and we cannot find the appropriate snapshot folder for the "
            "specified revision on the local disk. Please check your internet connection and try again."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError) as info:
        resolve_model("smollm2-13m")
    message = str(info.value)
    assert "\n" not in message and "internet connection" not in message and len(message) < 400
    assert "did you mean 'smollm2-135m'?" in message and "not reachable" in message
