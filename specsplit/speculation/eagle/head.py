"""The EAGLE / EAGLE-3 head: one Llama decoder layer fed with the target's hidden states.

Entry i of a head's sequence pairs the target's state at position i (the one that predicted
token i+1) with the embedding of token i+1, and predicts token i+2. Drafting further, the
head continues from its own output state instead of the target's.

- EAGLE-1: `fc` fuses [embedding, state] (2H -> H) at every step; layer 0 has no input norm;
  the target's LM head reads the layer's output directly (no final norm).
- EAGLE-3: `fc` maps three target layers (3H -> H) once; the layer normalises the embedding
  (`input_layernorm`) and the state (`hidden_norm`) and attends over their concatenation
  (2H); its own `norm` and `lm_head` score a reduced draft vocabulary, mapped back to target
  ids by `d2t` (target id = draft id + d2t[draft id]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specsplit.runtime.attention import AttentionMetadata
from specsplit.runtime.config import ModelConfig
from specsplit.runtime.model import MLP, Attention, RMSNorm, rope_inv_freq, rotate_half
from specsplit.runtime.parallel import SINGLE, ColumnParallelLinear

METHODS = ("eagle", "eagle3")


@dataclass(frozen=True)
class HeadConfig:
    """What a head checkpoint says about itself, plus what it reads from its target."""

    method: str  # "eagle" (EAGLE-1) or "eagle3"
    model: ModelConfig  # the head's one-layer Llama shape (width, heads, MLP, rotary, eps)
    target_hidden_size: int  # width of each target state read (EAGLE-3's fc input is 3x this)
    draft_vocab_size: int  # rows of the head's own LM head (EAGLE-3); the target's vocab for EAGLE-1
    fc_bias: bool  # EAGLE-1 checkpoints usually carry fc.bias; EAGLE-3 never does
    aux_layers: tuple[int, ...] | None = None  # EAGLE-3 target layers; None: (2, N/2, N-3) as vLLM

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown EAGLE method {self.method!r}; choose one of {METHODS}")
        if self.model.num_layers != 1:
            raise ValueError(f"an EAGLE head has one decoder layer, this config has {self.model.num_layers}")
        if self.method == "eagle" and self.target_hidden_size != self.model.hidden_size:
            raise ValueError("an EAGLE-1 head must be as wide as its target")

    def target_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """Which target states the head reads, numbered as Hugging Face's hidden_states
        (i < N: the residual stream entering layer i; N: the final normed output)."""
        n = num_target_layers
        if self.method == "eagle":
            return (n,)
        layers = self.aux_layers or (2, n // 2, n - 3)
        if len(layers) != 3 or not all(0 <= i <= n for i in layers):
            raise ValueError(f"EAGLE-3 reads three target layers within 0..{n}, got {layers}; the target is "
                             f"too shallow for the default (2, N/2, N-3): set eagle_aux_hidden_state_layer_ids")
        return tuple(layers)

    @property
    def state_size(self) -> int:
        """Width of one position's target state as sent to the head (before fc)."""
        return (3 if self.method == "eagle3" else 1) * self.target_hidden_size


class EagleHead(nn.Module):
    """The head's own weights; embeddings (and EAGLE-1's LM head) belong to the target."""

    def __init__(self, hc: HeadConfig) -> None:
        super().__init__()
        self.hc = hc
        cfg = hc.model
        h = cfg.hidden_size
        eagle3 = hc.method == "eagle3"
        self.fc = ColumnParallelLinear(3 * hc.target_hidden_size if eagle3 else 2 * h, [h], hc.fc_bias, SINGLE)
        self.self_attn = Attention(cfg, SINGLE)
        if eagle3:  # attends over [normed embedding, normed state]
            qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            self.self_attn.qkv_proj = ColumnParallelLinear(2 * h, [qd, kvd, kvd], cfg.qkv_bias, SINGLE)
            self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
            self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.norm = RMSNorm(h, cfg.rms_norm_eps)
            self.lm_head = ColumnParallelLinear(h, [hc.draft_vocab_size], False, SINGLE)
            self.register_buffer("d2t", torch.zeros(hc.draft_vocab_size, dtype=torch.int64))
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, SINGLE)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    # ---- inference (paged KV cache) ----------------------------------------------------------
    def project(self, target_states: Tensor) -> Tensor:
        """Target states [T, state_size] -> the head's state [T, H] (EAGLE-3: fc; EAGLE-1: as is)."""
        return self.fc(target_states) if self.hc.method == "eagle3" else target_states

    def layer_input(self, embeds: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(attention input, residual) for one step from embeddings and states, both [T, H]."""
        if self.hc.method == "eagle3":
            return torch.cat((self.input_layernorm(embeds), self.hidden_norm(state)), dim=-1), state
        x = self.fc(torch.cat((embeds, state), dim=-1))
        return x, x  # EAGLE-1 layer 0: no input norm

    def forward(self, embeds: Tensor, state: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor],
                meta: AttentionMetadata, backend: str) -> Tensor:
        """embeds, state: [T, H]; positions: [T] -> the head's output state [T, H] (before any norm)."""
        x, residual = self.layer_input(embeds, state)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        x = residual + self.self_attn(x, emb.cos().to(x.dtype), emb.sin().to(x.dtype), kv, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def draft_logits(self, out: Tensor, target_head: nn.Module, vocab_size: int) -> Tensor:
        """Output states [N, H] -> logits over the target vocabulary [N, V] float32 (EAGLE-3:
        tokens outside the draft vocabulary get -inf, so they are never proposed)."""
        if self.hc.method == "eagle":
            return target_head(out).float()
        small = self.lm_head(self.norm(out)).float()  # [N, Vd]
        full = small.new_full((out.shape[0], vocab_size), float("-inf"))
        full[:, self.draft_to_target()] = small
        return full

    def draft_to_target(self) -> Tensor:
        """[Vd] target id of each draft-vocabulary id."""
        return torch.arange(self.hc.draft_vocab_size, device=self.d2t.device) + self.d2t

    # ---- training (dense, several unrolled steps) -----------------------------------------------
    def forward_train(self, embeds: Tensor, state: Tensor, positions: Tensor,
                      earlier: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One unrolled step over whole sequences, as EAGLE-3 trains ("training-time test").

        embeds, state: [B, T, H]; positions: [T]. Step 0 (`earlier` empty) attends causally to
        itself. Step s > 0 stands for the s-th drafted token: index i attends to step 0's keys
        at positions <= i (what the target committed) and to steps 1..s at i itself (what the
        head drafted before). Returns the output state [B, T, H] and this step's (k, v).
        """
        b, t, _ = embeds.shape
        att = self.self_attn
        hq, hkv, d = att.num_heads, att.num_kv_heads, att.head_dim
        x, residual = self.layer_input(embeds, state)
        qkv = att.qkv_proj(x).view(b, t, hq + 2 * hkv, d)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        qk = qkv[:, :, : hq + hkv]
        qk = qk * emb.cos() + rotate_half(qk) * emb.sin()
        q, k = qk.split([hq, hkv], dim=2)
        v = qkv[:, :, hq + hkv :]
        rep = hq // hkv
        keys = [(k, v)] if not earlier else [*earlier, (k, v)]
        k0, v0 = (t_.repeat_interleave(rep, dim=2) for t_ in keys[0])
        scores = torch.einsum("bthd,bshd->bhts", q, k0) * att.scale  # [B, Hq, T, T]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        diag = [(q * kj.repeat_interleave(rep, dim=2)).sum(-1).transpose(1, 2)[..., None] * att.scale
                for kj, _ in keys[1:]]  # each [B, Hq, T, 1]
        p = torch.softmax(torch.cat([scores, *diag], dim=-1), dim=-1)
        out = torch.einsum("bhts,bshd->bthd", p[..., :t], v0)
        for j, (_, vj) in enumerate(keys[1:]):
            out = out + p[..., t + j].transpose(1, 2)[..., None] * vj.repeat_interleave(rep, dim=2)
        x = residual + att.o_proj(out.reshape(b, t, hq * d))
        return x + self.mlp(self.post_attention_layernorm(x)), (k, v)
