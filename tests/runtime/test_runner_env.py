"""Environment switches the runner reads: a value it does not know is refused, not taken as a default."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from specsplit.runtime.runner import ModelRunner
from specsplit.testing import make_tiny_model


@pytest.mark.parametrize("value", ["yes", "2", "off", ""])
def test_an_unknown_skinny_linear_switch_is_refused(tmp_path, value: str) -> None:
    folder = make_tiny_model(tmp_path / "m")
    with mock.patch.dict(os.environ, {"SPECSPLIT_SKINNY_LINEAR": value}), \
            pytest.raises(ValueError, match="SPECSPLIT_SKINNY_LINEAR=.*use 1 .*0 .*auto"):
        ModelRunner.from_folder(folder, device="cpu", kv_cache_bytes=1 << 22, max_model_len=64)


@pytest.mark.parametrize("value", ["0", "1", "auto"])
def test_the_known_skinny_linear_switches_start_a_cpu_runner(tmp_path, value: str) -> None:
    folder = make_tiny_model(tmp_path / "m")
    with mock.patch.dict(os.environ, {"SPECSPLIT_SKINNY_LINEAR": value}):
        runner = ModelRunner.from_folder(folder, device="cpu", kv_cache_bytes=1 << 22, max_model_len=64)
    assert runner.linear_choice == {}  # the per-shape choice runs on CUDA only
