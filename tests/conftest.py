"""Session-wide tiny models for the core tests, built once into a temporary folder.

The target is a random 2-layer Llama with a real (trained) byte-level BPE tokenizer. Its
weights are drawn with std 0.5 so that its next-token distributions are peaked (entropy
~1.5-2 nats over 384 tokens): greedy paths do not hinge on near-ties, and the statistical
tests see a handful of likely tokens rather than a near-uniform spread. The draft is the
target plus 2% weight noise: it agrees on roughly half of the greedy tokens and ~85% of the
sampled probability mass, so blocks are accepted in full, in part and not at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers

from specsplit.testing import make_tiny_model

transformers.logging.set_verbosity_error()  # "Loading weights" bars on every HF load

KV_BYTES = 1 << 24  # 16 MiB of KV per model: ~2,000 tokens of the tiny model, never the limit
TARGET_STD = 0.5  # see the module docstring
DRAFT_NOISE = 0.02


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_target(model_root: Path) -> Path:
    """The target of every engine test (Llama architecture)."""
    return make_tiny_model(model_root / "target", seed=0, init_std=TARGET_STD)


@pytest.fixture(scope="session")
def tiny_draft(model_root: Path, tiny_target: Path) -> Path:
    """A draft correlated with the target: same shapes and tokenizer, noisy weights."""
    return make_tiny_model(model_root / "draft", seed=1, init_std=TARGET_STD, base=tiny_target, noise=DRAFT_NOISE)


@pytest.fixture(scope="session")
def tiny_qwen2(model_root: Path) -> Path:
    """A Qwen2 model (q/k/v biases), for the logits comparison with transformers."""
    return make_tiny_model(model_root / "qwen2", "qwen2", seed=2, init_std=0.3)


@pytest.fixture(scope="session")
def other_vocab_model(model_root: Path) -> Path:
    """Same architecture, but a tokenizer with a different vocabulary (320 entries)."""
    return make_tiny_model(model_root / "other-vocab", seed=3, vocab_size=320)


def with_eos(src: Path, dest: Path, eos_id: int) -> Path:
    """A copy of the model folder `src` whose config names `eos_id` as its EOS token."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["eos_token_id"] = eos_id
    (dest / "config.json").write_text(json.dumps(cfg))
    gen = dest / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        g["eos_token_id"] = eos_id
        gen.write_text(json.dumps(g))
    return dest


@pytest.fixture(scope="session")
def make_llm() -> Callable[..., Any]:
    """LLM(model, speculative_config, **kw), built once per distinct argument set.

    Engines are reusable across generate() calls, and reusing them keeps the suite fast.
    """
    from specsplit import LLM

    cache: dict[str, Any] = {}

    def build(model: Path | str, spec: dict[str, Any] | None = None, **kw: Any) -> Any:
        kw.setdefault("kv_cache_memory_bytes", KV_BYTES)
        key = json.dumps([str(model), spec, kw], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = LLM(str(model), speculative_config=spec, **kw)
        return cache[key]

    return build
