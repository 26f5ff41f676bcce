"""`specsplit models list|pull` through argparse."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from specsplit.models import cli
from specsplit.models.convert import Marker


def test_list_shows_catalogue_entries_not_pulled(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "CACHED", "SIZE", "PATH"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["smollm2-135m", "no"], ["qwen2.5-coder-0.5b", "no"], ["qwen2.5-coder-1.5b", "no"]
    ]  # fmt: skip


def test_list_shows_cached_model_with_size_and_path(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = cache / "models" / "qwen2.5-coder-0.5b"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 3000)
    Marker("qwen2.5-coder-0.5b", "pypi:x==1", "x.gguf", 1, "float32", "5", 1.0, "now").write(folder)
    cli.main(["list"])
    row = next(
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("qwen2.5-coder-0.5b")
    )
    assert row.split()[1:] == ["yes", "3.2K", str(folder)]


def test_pull_prints_folder_only_on_stdout(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    calls = []
    monkeypatch.setattr(
        cli, "resolve_model", lambda name, **kw: calls.append((name, kw)) or tmp_path
    )
    assert cli.main(["pull", "smollm2-135m", "--force"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}\n"
    assert calls == [("smollm2-135m", {"progress": True, "force": True})]


def test_pull_unknown_name_fails_with_message(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub

    def no_hub(*args: object, **kwargs: object) -> str:
        raise OSError("hub unreachable (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    assert cli.main(["pull", "no-such-model"]) == 1
    assert "smollm2-135m" in capsys.readouterr().err


def test_registers_on_a_top_level_parser(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="specsplit")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_models_subparser(commands)
    args = parser.parse_args(["models", "list"])
    assert args.command == "models"
    assert cli.run_models(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "pull"])  # NAME is required
