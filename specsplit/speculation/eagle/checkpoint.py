"""Read and write EAGLE heads in the layouts the EAGLE authors publish.

EAGLE-1 (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): config.json of a one-layer Llama;
`fc.weight` [H, 2H] (+ `fc.bias`) over [embedding, final state]; `layers.0.self_attn.*`,
`layers.0.mlp.*`, `layers.0.post_attention_layernorm.weight`, and no input norm on layer 0.
Embeddings and LM head come from the target unless the checkpoint carries them.

EAGLE-3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): `fc.weight` [H, 3H] over three target
layers; `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm,self_attn,mlp}.*`
(q/k/v read 2H); its own `norm.weight` and `lm_head.weight` [draft_vocab, H]; `d2t` [draft_vocab]
(target id - draft id) and `t2d` [vocab] (bool: in the draft vocabulary). Config keys
`draft_vocab_size`, optionally `target_hidden_size` and `eagle_aux_hidden_state_layer_ids`.

Both as `pytorch_model.bin` or safetensors (one file or sharded with an index).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from specsplit.runtime.config import ModelConfig
from specsplit.speculation.eagle.head import EagleHead, HeadConfig

log = logging.getLogger(__name__)

_LAYER = {  # checkpoint name inside the layer -> (our module path, fused group, part)
    "self_attn.q_proj.weight": ("self_attn.qkv_proj", "w", 0), "self_attn.k_proj.weight": ("self_attn.qkv_proj", "w", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj", "w", 2), "self_attn.q_proj.bias": ("self_attn.qkv_proj", "b", 0),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj", "b", 1), "self_attn.v_proj.bias": ("self_attn.qkv_proj", "b", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj", "w", 0), "mlp.up_proj.weight": ("mlp.gate_up_proj", "w", 1),
    "self_attn.o_proj.weight": ("self_attn.o_proj.weight", "", 0), "mlp.down_proj.weight": ("mlp.down_proj.weight", "", 0),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", "", 0),
    "input_layernorm.weight": ("input_layernorm.weight", "", 0), "hidden_norm.weight": ("hidden_norm.weight", "", 0),
}


@dataclass
class LoadedHead:
    head: EagleHead
    embed: Tensor | None  # [V, H] the checkpoint's own embeddings, if it has them (else the target's)
    lm_head: Tensor | None  # [V, H] EAGLE-1 only: its own LM head, if it has one (else the target's)
    t2d: Tensor | None  # [V] bool, EAGLE-3: which target ids the draft vocabulary holds


def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder: safetensors (preferred) or pytorch_model*.bin."""
    out: dict[str, Tensor] = {}
    st = sorted(folder.glob("*.safetensors"))
    if st:
        for f in st:
            with safe_open(str(f), framework="pt") as g:
                for k in g.keys():  # noqa: SIM118 - safe_open is not a dict
                    out[k] = g.get_tensor(k)
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"no EAGLE head weights in {folder} (want *.safetensors or pytorch_model.bin)")
    for f in bins:
        state = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{f} is not a state dict")
        out.update(state)
    return out


def detect_method(names: set[str]) -> str:
    """"eagle3" for midlayer.* / d2t, "eagle" for layers.0.* + fc."""
    if any(n.startswith("midlayer.") for n in names) or "d2t" in names:
        return "eagle3"
    if "fc.weight" in names and any(n.startswith("layers.0.") for n in names):
        return "eagle"
    raise ValueError("not an EAGLE head: expected fc.weight with layers.0.* (EAGLE) or midlayer.* (EAGLE-3)")


def read_config(folder: Path, method: str, tensors: dict[str, Tensor]) -> HeadConfig:
    return read_head_config(folder, method, fc_bias="fc.bias" in tensors)


def read_head_config(folder: Path, method: str, fc_bias: bool = False) -> HeadConfig:
    """The head's config.json alone (no weights): enough to know which target states it reads."""
    path = folder / "config.json"
    if not path.exists():
        raise ValueError(f"EAGLE head {str(folder)!r} is not a folder with config.json and weights "
                         "(train one with `specsplit eagle train TARGET`)")
    raw: dict[str, Any] = json.loads(path.read_text())
    from transformers import LlamaConfig

    shape = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "auto_map")}
    mcfg = ModelConfig.from_hf(LlamaConfig(**shape))
    eagle_cfg = raw.get("eagle_config") or {}
    aux = raw.get("eagle_aux_hidden_state_layer_ids") or eagle_cfg.get("eagle_aux_hidden_state_layer_ids")
    return HeadConfig(
        method=method, model=mcfg,
        target_hidden_size=int(raw.get("target_hidden_size") or mcfg.hidden_size),
        draft_vocab_size=int(raw.get("draft_vocab_size") or mcfg.vocab_size) if method == "eagle3" else mcfg.vocab_size,
        fc_bias=fc_bias,
        aux_layers=tuple(int(i) for i in aux) if aux else None,
    )


def load_head(folder: str | Path, method: str | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> LoadedHead:
    """Load a published (or our trained) head; `method` given must match the layout found."""
    folder = Path(folder)
    tensors = read_tensors(folder)
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    found = detect_method(set(tensors))
    if method is not None and method != found:
        raise ValueError(f"{folder} holds an {found!r} head, not {method!r}")
    hc = read_config(folder, found, tensors)
    head = EagleHead(hc)
    prefix = "midlayer." if found == "eagle3" else "layers.0."
    loaded: set[str] = set()
    fused: dict[tuple[str, str], dict[int, Tensor]] = {}
    params = dict(head.named_parameters()) | dict(head.named_buffers())
    embed = lm_head = t2d = None
    for name, t in tensors.items():
        if found == "eagle3" and name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")  # vLLM's spelling of the same layer
        if name.startswith(prefix):
            rest = name.removeprefix(prefix)
            if rest not in _LAYER:
                raise ValueError(f"unexpected tensor {name!r} in {folder}")
            target, group, part = _LAYER[rest]
            if rest == "input_layernorm.weight" and found == "eagle":
                log.info("ignoring layers.0.input_layernorm: EAGLE-1 layer 0 has no input norm")
                continue
            if group:
                fused.setdefault((target, group), {})[part] = t
            else:
                _copy(params, target, t, name)
                loaded.add(target)
        elif name in ("fc.weight", "fc.bias", "norm.weight", "lm_head.weight", "d2t") and (found == "eagle3" or name.startswith("fc.")):
            _copy(params, name, t, name)
            loaded.add(name)
        elif name == "embed_tokens.weight":
            embed = t
        elif name == "lm_head.weight":
            lm_head = t
        elif name == "t2d":
            t2d = t.bool()
        else:
            raise ValueError(f"unexpected tensor {name!r} in {folder}")
    for (target, group), parts in fused.items():
        want = 3 if "qkv" in target else 2
        if len(parts) != want:
            raise ValueError(f"{folder}: {target} needs {want} parts, found {sorted(parts)}")
        mod = head.get_submodule(target)
        mod.load_shards([parts[i].to(dtype) for i in range(want)], bias=group == "b")
        loaded.add(f"{target}.{group}")
    expected = {"fc.weight", "self_attn.qkv_proj.w", "self_attn.o_proj.weight", "mlp.gate_up_proj.w",
                "mlp.down_proj.weight", "post_attention_layernorm.weight"}
    if found == "eagle3":
        expected |= {"input_layernorm.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight"}
        if "d2t" not in loaded and hc.draft_vocab_size != hc.model.vocab_size:
            raise ValueError(f"{folder}: a reduced draft vocabulary needs d2t")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{folder}: EAGLE head checkpoint incomplete, missing {missing}")
    if t2d is not None and int(t2d.sum()) != hc.draft_vocab_size:
        raise ValueError(f"{folder}: t2d marks {int(t2d.sum())} ids, draft_vocab_size is {hc.draft_vocab_size}")
    head = head.to(device=device, dtype=dtype)  # floating tensors only: d2t stays int64
    head.inv_freq = _inv_freq(hc, device)
    return LoadedHead(head.eval(), embed, lm_head, t2d)


def _inv_freq(hc: HeadConfig, device: torch.device | str) -> Tensor:
    from specsplit.runtime.model import rope_inv_freq

    return rope_inv_freq(hc.model).to(device)


def _copy(params: dict[str, Tensor], target: str, t: Tensor, name: str) -> None:
    p = params[target]
    if p.shape != t.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(p.shape)}")
    p.data.copy_(t.to(p.dtype))


def head_state_dict(head: EagleHead, t2d: Tensor | None = None) -> dict[str, Tensor]:
    """Our head's weights under the published names (q/k/v and gate/up unfused)."""
    hc, cfg = head.hc, head.hc.model
    prefix = "midlayer." if hc.method == "eagle3" else "layers.0."
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    att, mlp = head.self_attn, head.mlp
    out: dict[str, Tensor] = {"fc.weight": head.fc.weight}
    if head.fc.bias is not None:
        out["fc.bias"] = head.fc.bias
    q, k, v = att.qkv_proj.weight.split([qd, kvd, kvd])
    out |= {f"{prefix}self_attn.q_proj.weight": q, f"{prefix}self_attn.k_proj.weight": k,
            f"{prefix}self_attn.v_proj.weight": v, f"{prefix}self_attn.o_proj.weight": att.o_proj.weight}
    if att.qkv_proj.bias is not None:
        qb, kb, vb = att.qkv_proj.bias.split([qd, kvd, kvd])
        out |= {f"{prefix}self_attn.q_proj.bias": qb, f"{prefix}self_attn.k_proj.bias": kb,
                f"{prefix}self_attn.v_proj.bias": vb}
    gate, up = mlp.gate_up_proj.weight.chunk(2)
    out |= {f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up,
            f"{prefix}mlp.down_proj.weight": mlp.down_proj.weight,
            f"{prefix}post_attention_layernorm.weight": head.post_attention_layernorm.weight}
    if hc.method == "eagle3":
        out |= {f"{prefix}input_layernorm.weight": head.input_layernorm.weight,
                f"{prefix}hidden_norm.weight": head.hidden_norm.weight,
                "norm.weight": head.norm.weight, "lm_head.weight": head.lm_head.weight, "d2t": head.d2t}
        if t2d is not None:
            out["t2d"] = t2d
    return {k: t.detach().contiguous().cpu() for k, t in out.items()}


def save_head(folder: str | Path, head: EagleHead, config: dict[str, Any], *, t2d: Tensor | None = None,
              fmt: str = "safetensors") -> Path:
    """Write config.json and the weights in the published layout (`fmt`: safetensors or bin)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = head_state_dict(head, t2d)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r} (safetensors, bin)")
    return folder


def head_config_dict(hc_model: dict[str, Any], method: str, draft_vocab_size: int | None = None,
                     aux_layers: tuple[int, ...] | None = None) -> dict[str, Any]:
    """config.json of a head: a one-layer Llama, plus the EAGLE-3 keys."""
    cfg = {"architectures": ["LlamaForCausalLMEagle3" if method == "eagle3" else "LlamaForCausalLM"],
           "model_type": "llama", **hc_model, "num_hidden_layers": 1}
    if method == "eagle3":
        cfg["draft_vocab_size"] = draft_vocab_size
        if aux_layers is not None:
            cfg["eagle_aux_hidden_state_layer_ids"] = list(aux_layers)
    return cfg
