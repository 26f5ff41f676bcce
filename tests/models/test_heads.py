"""EAGLE heads named as vLLM takes them: a local folder, or a hub id fetched once into the cache
(`<cache>/heads/<org>--<name>`), which is where a pod's pull init container leaves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from specsplit.models.cli import main as models_main
from specsplit.models.heads import HEAD_PATTERNS, head_cache_folder, resolve_head

HUB_ID = "yuhuili/EAGLE-LLaMA3-Instruct-8B"


def _write_head(folder: Path, weights: str = "pytorch_model.bin") -> Path:
    """A head's files as EAGLE publishes them (contents do not matter to resolving)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    torch.save({"fc.weight": torch.zeros(2, 4)}, folder / weights)
    (folder / "README.md").write_text("not wanted")
    return folder


class FakeHub:
    """`huggingface_hub.snapshot_download` for one repo: writes it into local_dir, honouring the patterns."""

    def __init__(self, weights: str | None = "pytorch_model.bin") -> None:
        self.weights = weights
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, *, allow_patterns: list[str], local_dir: Path, **_: Any) -> str:
        self.calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "local_dir": Path(local_dir)})
        if repo_id != HUB_ID:
            raise RuntimeError("RepositoryNotFoundError-like failure")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        if self.weights:
            torch.save({}, Path(local_dir) / self.weights)
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_a_local_head_folder_is_used_as_it_is(tmp_path: Path, cache: Path, hub: FakeHub) -> None:
    for weights in ("pytorch_model.bin", "model.safetensors"):
        folder = _write_head(tmp_path / weights, weights)
        assert resolve_head(str(folder)) == folder.resolve()
    assert not hub.calls


def test_a_reader_of_the_config_alone_takes_a_folder_without_weights(tmp_path: Path, cache: Path, hub: FakeHub
                                                                    ) -> None:
    """The gateway reads only the head's config (which target layers to ask for); a head tier needs weights."""
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_head(str(folder), config_only=True) == folder.resolve()
    with pytest.raises(ValueError, match="no config.json with"):
        resolve_head(str(folder))
    assert not hub.calls


def test_a_hub_id_is_fetched_once_into_the_cache(cache: Path, hub: FakeHub) -> None:
    folder = resolve_head(HUB_ID)
    assert folder == head_cache_folder(HUB_ID) == cache / "heads" / "yuhuili--EAGLE-LLaMA3-Instruct-8B"
    assert (folder / "config.json").is_file() and (folder / "pytorch_model.bin").is_file()
    assert hub.calls[0]["allow_patterns"] == list(HEAD_PATTERNS) and "pytorch_model*.bin" in HEAD_PATTERNS
    assert resolve_head(HUB_ID) == folder  # the second process finds it without the hub
    assert len(hub.calls) == 1


def test_a_hub_repo_without_weights_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(weights=None))
    with pytest.raises(ValueError, match="has no config.json with"):
        resolve_head(HUB_ID)


def test_an_unreachable_hub_and_a_missing_folder_say_why(cache: Path, tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(ValueError, match="could not provide it"):
        resolve_head("no-such-org/no-such-head")
    with pytest.raises(ValueError, match="no such folder, and not a hub id"):
        resolve_head(str(tmp_path / "missing-head"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_head(str(tmp_path / "empty"))
    assert [c["repo_id"] for c in hub.calls] == ["no-such-org/no-such-head"]  # paths never reach the hub


def test_models_pull_head_prints_the_cached_folder(cache: Path, hub: FakeHub, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    assert models_main(["pull", "--head", HUB_ID]) == 0
    assert capsys.readouterr().out.strip() == str(head_cache_folder(HUB_ID))
    assert models_main(["pull", "--head", "no-such-org/no-such-head"]) == 1
    assert "EAGLE head 'no-such-org/no-such-head'" in capsys.readouterr().err
