"""Load Hugging Face checkpoint tensors into the runtime, one tensor at a time.

Names follow the Hugging Face Llama/Qwen2/Mistral layout. q/k/v and gate/up are fused in
the runtime, so their parts are buffered per layer until all have arrived, then each rank
copies only its shard. A rank never holds more than one layer's full projections at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from specsplit.runtime.model import Transformer


def iter_safetensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of a model folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, f.get_tensor(key)


def load_weights(model: Transformer, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Copy checkpoint tensors into `model` (sharded by its ParallelContext); check completeness."""
    cfg = model.cfg
    pending: dict[tuple[int, str], dict[str, Tensor]] = {}
    loaded: set[str] = set()
    head_loaded = False
    embed: Tensor | None = None
    dtype = model.embed_tokens.weight.dtype

    def fused(layer: int, group: str, part: str, t: Tensor) -> None:
        parts = pending.setdefault((layer, group), {})
        parts[part] = t
        lay = model.layers[layer]
        if group == "qkv_w" and len(parts) == 3:
            lay.self_attn.qkv_proj.load_shards([parts["q"], parts["k"], parts["v"]])
            loaded.add(f"{layer}.qkv")
        elif group == "qkv_b" and len(parts) == 3:
            lay.self_attn.qkv_proj.load_shards([parts["q"], parts["k"], parts["v"]], bias=True)
        elif group == "gate_up" and len(parts) == 2:
            lay.mlp.gate_up_proj.load_shards([parts["gate"], parts["up"]])
            loaded.add(f"{layer}.gate_up")
        else:
            return
        del pending[(layer, group)]

    for name, t in tensors:
        t = t.to(dtype)
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            model.embed_tokens.weight.data.copy_(t)
            embed = t
            loaded.add("embed")
            continue
        if name == "norm.weight":
            model.norm.weight.data.copy_(t)
            loaded.add("norm")
            continue
        if name == "lm_head.weight":
            model.lm_head.load_full(t)
            head_loaded = True
            continue
        if not name.startswith("layers."):
            continue  # rotary caches and other non-parameters
        _, idx, rest = name.split(".", 2)
        i = int(idx)
        if i >= cfg.num_layers:
            raise ValueError(f"checkpoint has layer {i} but the config has {cfg.num_layers}")
        lay = model.layers[i]
        match rest:
            case "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight":
                fused(i, "qkv_w", rest.split(".")[1][0], t)
            case "self_attn.q_proj.bias" | "self_attn.k_proj.bias" | "self_attn.v_proj.bias":
                fused(i, "qkv_b", rest.split(".")[1][0], t)
            case "self_attn.o_proj.weight":
                lay.self_attn.o_proj.load_full(t)
                loaded.add(f"{i}.o")
            case "mlp.gate_proj.weight":
                fused(i, "gate_up", "gate", t)
            case "mlp.up_proj.weight":
                fused(i, "gate_up", "up", t)
            case "mlp.down_proj.weight":
                lay.mlp.down_proj.load_full(t)
                loaded.add(f"{i}.down")
            case "input_layernorm.weight":
                lay.input_layernorm.weight.data.copy_(t)
                loaded.add(f"{i}.ln1")
            case "post_attention_layernorm.weight":
                lay.post_attention_layernorm.weight.data.copy_(t)
                loaded.add(f"{i}.ln2")
            case _:
                raise ValueError(f"unexpected checkpoint tensor {name!r}")
    if not head_loaded:
        if embed is None:
            raise ValueError("checkpoint has neither lm_head.weight nor embed_tokens.weight")
        model.lm_head.load_full(embed)  # tied embeddings
    expected = {"embed", "norm"} | {
        f"{i}.{p}" for i in range(cfg.num_layers) for p in ("qkv", "o", "gate_up", "down", "ln1", "ln2")
    }
    missing = sorted(expected - loaded)
    if missing or pending:
        raise ValueError(f"checkpoint incomplete: missing {missing[:8]} pending {list(pending)[:4]}")

