"""GGUF -> Hugging Face folder, on a tiny Llama GGUF written by the test itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from specsplit.models import list_cached, resolve, resolve_model
from specsplit.models.convert import MARKER, convert_gguf, read_marker

TinyGguf = tuple[Path, dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def converted(tiny_gguf: TinyGguf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("converted") / "tiny"
    return convert_gguf(tiny_gguf[0], dest, name="tiny", source="test", progress=False)


def test_folder_has_weights_config_tokenizer_and_marker(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", MARKER} <= names
    assert read_marker(converted)["name"] == "tiny"
    assert not list(converted.parent.glob(".tiny.tmp-*"))


def test_weights_are_float32_and_match_the_gguf(converted: Path, tiny_gguf: TinyGguf) -> None:
    tensors = load_file(str(converted / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    gguf = tiny_gguf[1]
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], gguf["token_embd.weight"])
    np.testing.assert_array_equal(
        tensors["model.layers.1.mlp.down_proj.weight"], gguf["blk.1.ffn_down.weight"]
    )
    assert "lm_head.weight" not in tensors  # no output.weight in the GGUF: tied embeddings


def test_config_has_no_quantization_left(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 1


def test_tokenizer_loads_with_chat_template(converted: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.convert_ids_to_tokens(tok("hi there").input_ids) == ["hi", "Ġthere"]
    assert tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == 128  # from the GGUF context length, not 1e30
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] != "TokenizersBackend"  # a 5.x-only name 4.x cannot load


def test_local_gguf_converted_once_into_cache(
    tiny_gguf: TinyGguf, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf[0], path)
    folder = resolve_model(str(path), progress=False)
    assert folder.parent == cache / "models" and folder.name.startswith("gguf-tiny-")
    assert [m.path for m in list_cached()] == [folder]

    def no_convert(*args: object, **kwargs: object) -> Path:
        raise AssertionError("converted twice")

    monkeypatch.setattr(resolve, "convert_gguf", no_convert)
    assert resolve_model(str(path), progress=False) == folder


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        convert_gguf(bad, tmp_path / "out", name="bad", source="test", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_bos_follows_the_gguf(add_bos: bool, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.models.tiny_gguf import write_tiny_llama_gguf

    gguf = tmp_path / "bos.gguf"
    write_tiny_llama_gguf(gguf, add_bos=add_bos)
    folder = convert_gguf(gguf, tmp_path / "out", name="bos", source="test", progress=False)
    ids = AutoTokenizer.from_pretrained(folder)("hi").input_ids
    assert ids == ([1, 259] if add_bos else [259])


def test_every_end_token_survives_conversion(converted: Path) -> None:
    """The tiny GGUF names <|im_end|> (2) as eos, as Qwen2.5-Coder's does; <|endoftext|> (0) ends
    generation too (llama.cpp, and Qwen's upstream generation config)."""
    from gateway.server import _tokenizer_and_limits

    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert json.loads((converted / "config.json").read_text())["eos_token_id"] == 2
    assert _tokenizer_and_limits(str(converted))[2] == (2, 0)


def test_a_cache_converted_before_end_tokens_were_kept_is_upgraded(converted: Path, cache: Path) -> None:
    folder = cache / "models" / "smollm2-135m"
    shutil.copytree(converted, folder)
    old = {**read_marker(folder), "format": 1}
    (folder / MARKER).write_text(json.dumps(old))
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 2}))
    assert resolve_model("smollm2-135m", progress=False) == folder
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert read_marker(folder)["format"] == 2
