"""EAGLE heads by folder or Hugging Face hub id, as vLLM's `speculative_config["model"]` takes them.

A head is not a model of the catalogue: it is a small checkpoint (a config.json of a one-layer
Llama plus weights, `pytorch_model.bin` or safetensors) trained for one target. A local folder is
used as it is; a hub id (`yuhuili/EAGLE3-LLaMA3.1-Instruct-8B`) is downloaded once into
`<cache>/heads/<org>--<name>/`, where the next process (another tier, a pod's main container
after its pull init container) finds it without the hub.
"""

from __future__ import annotations

from pathlib import Path

from specsplit.models.resolve import cache_dir, hub_snapshot, is_hub_id

# a head's files on the hub: config and weights in either format, nothing else
HEAD_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json")


def is_head_folder(path: Path) -> bool:
    """config.json plus weights in a format the head loader reads."""
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors"))
                                                 or any(path.glob("pytorch_model*.bin")))


def head_cache_folder(spec: str) -> Path:
    """Where a hub id's head is kept: `<cache>/heads/<org>--<name>`."""
    return cache_dir() / "heads" / spec.replace("/", "--")


def resolve_head(spec: str | Path, *, config_only: bool = False) -> Path:
    """The folder of the EAGLE head `spec`: a local folder, else a hub id fetched once into the
    cache. A ValueError says why neither worked (the hub's own error shortened to one clause).

    `config_only`: the caller reads only config.json (the gateway, for the target layers the head
    reads), so a local folder without the weights is enough."""
    path = Path(spec).expanduser()
    if is_head_folder(path) or (config_only and (path / "config.json").is_file()):
        return path.resolve()
    text = str(spec)
    cached = head_cache_folder(text)
    if is_hub_id(text) and "/" in text and not path.exists():
        if is_head_folder(cached):
            return cached
        folder, reason = hub_snapshot(text, HEAD_PATTERNS, local_dir=cached)
        if folder is not None:
            if is_head_folder(cached):
                return cached
            reason = f"hub repo {text} has no config.json with *.safetensors or pytorch_model*.bin"
    elif path.exists():
        reason = f"{path} holds no config.json with *.safetensors or pytorch_model*.bin"
    else:
        reason = "no such folder, and not a hub id (org/name)"
    raise ValueError(f"EAGLE head {text!r}: {reason} (train one with `specsplit eagle train TARGET`)")
