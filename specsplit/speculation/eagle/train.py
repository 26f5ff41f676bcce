"""Train an EAGLE-3 (or EAGLE-1) head for a target on CPU: `specsplit eagle train TARGET`.

1. Text: standard-library Python for code models, the target's own answers otherwise, or both
   (`--data mix`: its answers to coding requests, then standard-library source; data.py).
2. The target runs once over it; its states (three layers + the final one) are kept in bf16.
3. The draft vocabulary (EAGLE-3) is the most frequent tokens of that text.
4. The head starts from the target's last decoder layer (q/k/v read only the state half,
   fc picks the highest of the three layers, the LM head is the target's rows of the draft
   vocabulary) and learns to predict the target's next-token distribution one position
   further, unrolled over several drafted steps as EAGLE-3 trains ("training-time test"):
   step s continues from the head's own state of step s-1, loss weight 0.8^s.
5. The head is written in the published layout, so the same loader reads it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from specsplit.runtime.config import ModelConfig
from specsplit.speculation.eagle.build import read_target_tensors
from specsplit.speculation.eagle.checkpoint import head_config_dict, save_head
from specsplit.speculation.eagle.data import (
    CODE_PROMPTS,
    SELF_PROMPTS,
    Features,
    pack,
    self_sequences,
    stdlib_sequences,
    target_features,
)
from specsplit.speculation.eagle.head import EagleHead, HeadConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults sized for a 2-core CPU and Qwen2.5-Coder-1.5B: a few minutes."""

    method: str = "eagle3"  # "eagle3" or "eagle" (EAGLE-1)
    data: str = "auto"  # "stdlib" (Python source), "self" (own answers), "mix" (both), auto: stdlib for code models
    sequences: int = 12  # training sequences
    seq_len: int = 192  # tokens per sequence
    answer_tokens: int | None = None  # most new tokens per own answer ("self", "mix"); None: seq_len
    epochs: int = 3  # passes over the data
    batch: int = 2  # sequences per optimiser step
    unroll: int = 2  # drafted steps trained per position (EAGLE-3's training-time test)
    lr: float = 5e-4  # AdamW peak, cosine to 10% after a short warm-up
    draft_vocab: int = 8192  # EAGLE-3 draft vocabulary (and EAGLE-1's training-loss vocabulary)
    intermediate_size: int | None = 4096  # head MLP width (None: the target's); smaller is cheaper
    seed: int = 0
    fmt: str = "safetensors"  # or "bin" (pytorch_model.bin)

    def __post_init__(self) -> None:
        if self.method not in ("eagle", "eagle3"):
            raise ValueError(f"--method must be eagle or eagle3, not {self.method!r}")
        if self.data not in ("auto", "stdlib", "self", "mix"):
            raise ValueError(f"--data must be auto, stdlib, self or mix, not {self.data!r}")
        if self.answer_tokens is not None and self.answer_tokens < 1:
            raise ValueError("answer_tokens must be >= 1")
        if min(self.sequences, self.seq_len - 2 - self.unroll, self.epochs, self.batch, self.unroll) < 1:
            raise ValueError("sequences, epochs, batch, unroll must be >= 1 and seq_len > unroll + 2")


def default_out(target: str, method: str) -> Path:
    """Where trained heads are cached (never inside the repository)."""
    from specsplit.models.resolve import cache_dir

    return cache_dir() / "eagle" / f"{Path(target).name}-{method}"


def draft_vocabulary(feats: list[Features], size: int, vocab_size: int, always: list[int]) -> Tensor:
    """The `size` most frequent tokens of the training text (ties: lower id), plus `always`."""
    counts = Counter(int(t) for f in feats for t in f.tokens.tolist())
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    chosen = list(dict.fromkeys([t for t in always if 0 <= t < vocab_size] + ranked))[:size]
    rest = (t for t in range(vocab_size) if t not in set(chosen))
    while len(chosen) < min(size, vocab_size):  # a small text: fill up with low ids
        chosen.append(next(rest))
    return torch.tensor(sorted(chosen))


def init_head(target_cfg: ModelConfig, folder: Path, method: str, draft_ids: Tensor, inter: int | None) -> EagleHead:
    """A head shaped like the target's layers, started from its last decoder layer."""
    import dataclasses

    mcfg = dataclasses.replace(target_cfg, num_layers=1, model_type="llama", qkv_bias=False,
                               intermediate_size=inter or target_cfg.intermediate_size)
    hc = HeadConfig(method, mcfg, target_cfg.hidden_size, len(draft_ids) if method == "eagle3" else target_cfg.vocab_size,
                    fc_bias=method == "eagle")
    head = EagleHead(hc)
    last = f"model.layers.{target_cfg.num_layers - 1}."
    names = tuple(last + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                     "mlp.down_proj.weight", "post_attention_layernorm.weight")) + \
        ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight")
    t = read_target_tensors(folder, names)
    h, m = target_cfg.hidden_size, mcfg.intermediate_size
    with torch.no_grad():
        qkv = torch.cat([t[last + f"self_attn.{p}_proj.weight"] for p in "qkv"]).float()
        w = head.self_attn.qkv_proj.weight
        w.zero_()
        w[:, -h:] = qkv  # EAGLE-3: [embedding | state] -> the state half; EAGLE-1: the whole input
        head.self_attn.o_proj.weight.copy_(t[last + "self_attn.o_proj.weight"])
        gate, up = t[last + "mlp.gate_proj.weight"][:m], t[last + "mlp.up_proj.weight"][:m]
        head.mlp.gate_up_proj.weight.copy_(torch.cat([gate, up]))
        head.mlp.down_proj.weight.copy_(t[last + "mlp.down_proj.weight"][:, :m])
        head.post_attention_layernorm.weight.copy_(t[last + "post_attention_layernorm.weight"])
        fc = head.fc.weight
        fc.zero_()
        fc[:, -h:] = torch.eye(h)  # EAGLE-3: the highest layer read; EAGLE-1: the final state
        if head.fc.bias is not None:
            head.fc.bias.zero_()
        if method == "eagle3":
            lm = t.get("lm_head.weight", t["model.embed_tokens.weight"])
            head.lm_head.weight.copy_(lm[draft_ids])
            head.norm.weight.copy_(t["model.norm.weight"])
            head.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
    return head


class _Teacher:
    """The target's LM head over a vocabulary subset: soft labels from its final states."""

    def __init__(self, folder: Path, ids: Tensor) -> None:
        t = read_target_tensors(folder, ("lm_head.weight", "model.embed_tokens.weight"))
        self.w = t.get("lm_head.weight", t["model.embed_tokens.weight"])[ids].float()  # [Vs, H]

    def probs(self, final: Tensor) -> Tensor:
        return torch.softmax(final @ self.w.T, dim=-1)


def _batch_loss(head: EagleHead, feats: list[Features], embed: Tensor, teacher: _Teacher, cfg: TrainConfig,
                method: str) -> tuple[Tensor, float]:
    """Unrolled loss of one batch; returns (loss, accuracy of step 0 vs the teacher's argmax)."""
    toks = torch.stack([f.tokens for f in feats])  # [B, T]
    final = torch.stack([f.final for f in feats]).float()  # [B, T, H]
    t = toks.shape[1] - 1  # entries 0..T-2: (state i, token i+1) -> token i+2
    idx = torch.arange(t)
    if method == "eagle3":
        state = head.fc(torch.stack([f.aux for f in feats]).float()[:, :t])
    else:
        state = final[:, :t]
    earlier: list[tuple[Tensor, Tensor]] = []
    total, acc = torch.zeros(()), 0.0
    for s in range(cfg.unroll):
        nxt = torch.clamp(idx + 1 + s, max=toks.shape[1] - 1)
        valid = (idx + 1 + s <= toks.shape[1] - 1).float()  # [t]
        emb = nn.functional.embedding(toks[:, nxt], embed)
        out, kv = head.forward_train(emb, state, idx + s, earlier)
        earlier.append(kv)
        target_final = final[:, nxt]  # [B, t, H]: the state that predicts token i+2+s
        p = teacher.probs(target_final)
        if method == "eagle3":
            logp = torch.log_softmax(head.lm_head(head.norm(out)), dim=-1)
        else:
            logp = torch.log_softmax(out @ teacher.w.T, dim=-1)
        ploss = -(p * logp).sum(-1)  # [B, t]
        step = (ploss * valid).sum() / valid.sum() / toks.shape[0]
        if method == "eagle":
            v = nn.functional.smooth_l1_loss(out, target_final, reduction="none").mean(-1)
            step = (v * valid).sum() / valid.sum() / toks.shape[0] + 0.1 * step
        total = total + 0.8**s * step
        if s == 0:
            acc = float(((logp.argmax(-1) == p.argmax(-1)).float() * valid).sum() / (valid.sum() * toks.shape[0]))
        state = out
    return total, acc


def train_head(target: str, out: Path | None = None, cfg: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
    """Train a head for `target` (catalogue name or folder) and write it to `out`."""
    from tqdm.auto import tqdm

    from specsplit.factory import load_runner, model_folder
    from specsplit.speculation.engine import SpecEngine
    from specsplit.speculation.target import TargetVerifier

    torch.manual_seed(cfg.seed)
    out = Path(out) if out else default_out(target, cfg.method)
    folder = model_folder(target)
    t0 = time.perf_counter()
    answer = cfg.answer_tokens or cfg.seq_len
    runner, tok = load_runner(target, device=torch.device("cpu"), max_model_len=max(cfg.seq_len, answer) + 256)
    n = runner.cfg.num_layers
    code = "coder" in str(target).lower()
    data = cfg.data if cfg.data != "auto" else ("stdlib" if code else "self")
    seqs: list[list[int]] = []
    if data in ("self", "mix"):
        asks = CODE_PROMPTS if data == "mix" and code else SELF_PROMPTS
        count = cfg.sequences if data == "self" else len(asks)
        engine = SpecEngine(TargetVerifier(runner), None, tok, num_speculative_tokens=0, adaptive=False)
        bar = tqdm(total=answer, desc=f"{count} own answers", unit="round", disable=not progress)
        seqs = pack(self_sequences(engine, tok, answer, count, asks, bar), cfg.seq_len)
        bar.close()
        seqs = seqs[: cfg.sequences]
    own = len(seqs)
    if data in ("stdlib", "mix") and len(seqs) < cfg.sequences:
        seqs += stdlib_sequences(tok, cfg.seq_len, cfg.sequences - len(seqs))
    seqs = [s for s in seqs if len(s) > cfg.unroll + 2]
    aux = (2, n // 2, n - 3) if cfg.method == "eagle3" else None
    bar = tqdm(total=sum(map(len, seqs)), desc="target states", unit="tok", disable=not progress)
    feats = list(target_features(runner, seqs, aux, bar))
    bar.close()
    ids = draft_vocabulary(feats, min(cfg.draft_vocab, runner.cfg.vocab_size), runner.cfg.vocab_size,
                           list(getattr(tok, "all_special_ids", [])))
    head = init_head(runner.cfg, folder, cfg.method, ids, cfg.intermediate_size)
    embed = read_target_tensors(folder, ("model.embed_tokens.weight",))["model.embed_tokens.weight"].float()
    teacher = _Teacher(folder, ids)
    runner.shutdown()
    del runner
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * -(-len(feats) // cfg.batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc=f"train {cfg.method}", unit="step", disable=not progress)
    accs: list[float] = []
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        for b in range(0, len(order), cfg.batch):
            loss, acc = _batch_loss(head, [feats[i] for i in order[b : b + cfg.batch]], embed, teacher, cfg, cfg.method)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            accs.append(acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(accs[-8:]) / len(accs[-8:]):.2f}")
            bar.update(1)
    bar.close()
    head.eval()
    shape = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
             if k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                      "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id", "head_dim",
                      "rope_scaling")}
    shape |= {"intermediate_size": head.hc.model.intermediate_size, "hidden_act": "silu", "torch_dtype": "float32",
              "tie_word_embeddings": False}
    t2d = torch.zeros(head.hc.model.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    save_head(out, head, head_config_dict(shape, cfg.method, len(ids) if cfg.method == "eagle3" else None),
              t2d=t2d if cfg.method == "eagle3" else None, fmt=cfg.fmt)
    (out / "training.json").write_text(json.dumps({
        "target": str(target), "data": data, "tokens": sum(map(len, seqs)), "sequences": len(seqs),
        "own_answer_sequences": own,
        "config": asdict(cfg),
        "final_step0_accuracy": sum(accs[-8:]) / max(1, len(accs[-8:])), "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2) + "\n")
    print(f"EAGLE head written to {out}", flush=True)
    return out
