"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM) written for serving.

Knows nothing of gRPC, processes or compilation. Takes a flat ragged batch of tokens, writes
their keys/values into a paged cache and returns hidden states; the runner decides which
rows need logits.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor, nn

from specsplit.runtime.attention import AttentionMetadata, attention, write_kv
from specsplit.runtime.config import ModelConfig
from specsplit.runtime.parallel import (
    SINGLE,
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    VocabParallelHead,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # one fused kernel instead of seven (statistics still in float32)
            return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # float32 statistics as in the reference implementation, whatever the storage dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies, with Llama 3.1's long-context rescaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s.get("rope_type", s.get("type")) == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = ctx.shard(cfg.num_heads, "num_attention_heads")[1]
        self.num_kv_heads = ctx.shard(cfg.num_kv_heads, "num_key_value_heads")[1]
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [qd, kvd, kvd], cfg.qkv_bias, ctx)
        self.o_proj = RowParallelLinear(qd, cfg.hidden_size, ctx)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor],
        meta: AttentionMetadata, backend: str,
    ) -> Tensor:  # x: [T, hidden]; cos/sin: [T, 1, D]
        t = x.shape[0]
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, hq + 2 * hkv, self.head_dim)
        qk = qkv[:, : hq + hkv]  # rotary on q and k heads together: one set of kernels
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk.split([hq, hkv], dim=1)
        v = qkv[:, hq + hkv :]
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = attention(backend, q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))

    def forward_fused(self, x: Tensor, positions: Tensor, inv_freq: Tensor, kv: tuple[Tensor, Tensor],
                      meta: AttentionMetadata, tk: ModuleType) -> Tensor:
        """The same with the Triton kernels: rotary + cache write, then paged attention."""
        k_cache, v_cache = kv
        q = tk.rope_write_kv(self.qkv_proj(x), positions, inv_freq, k_cache, v_cache, meta.slot_mapping,
                             self.num_heads, self.num_kv_heads)
        out = tk.paged_attention(q, k_cache, v_cache, positions, meta.token_seq, meta.block_tables, self.scale)
        return self.o_proj(out.view(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], False, ctx)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, ctx)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ctx)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor],
                meta: AttentionMetadata, backend: str) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, h: Tensor, residual: Tensor | None, positions: Tensor, inv_freq: Tensor,
                      kv: tuple[Tensor, Tensor], meta: AttentionMetadata, tk: ModuleType) -> tuple[Tensor, Tensor]:
        """Triton path, residual stream kept apart so each add fuses into the next norm.

        Takes and returns (this block's output, the residual before it): x = h + residual.
        """
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        normed, residual = tk.add_rms_norm(h, residual, ln1.weight, ln1.eps)
        h = self.self_attn.forward_fused(normed, positions, inv_freq, kv, meta, tk)
        normed, residual = tk.add_rms_norm(h, residual, ln2.weight, ln2.eps)
        mlp = self.mlp
        return mlp.down_proj(tk.silu_and_mul(mlp.gate_up_proj(normed))), residual


def top_candidates(logits: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m likeliest tokens of each row and their probabilities under the full softmax
    (ids, probs # [rows, m]): what the tree of guesses branches on, in a chained draft block's
    graph and in a stepped one alike."""
    logits = logits.float()
    vals, ids = logits.topk(m, dim=-1)
    return ids, (vals - logits.logsumexp(-1, keepdim=True)).exp()


class Transformer(nn.Module):
    """The decoder stack plus embedding and LM head."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size, ctx)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(
        self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata, backend: str = "sdpa", aux_layers: tuple[int, ...] = (),
        aux_out: list[Tensor] | None = None,
    ) -> Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (after the norm).

        For EAGLE heads: appends to `aux_out` the residual stream entering each layer named in
        `aux_layers` ([T, hidden] each; index num_layers = the final normed output), as
        Hugging Face's `hidden_states[i]` numbers them.
        """
        x = self.embed_tokens(input_ids)
        n = len(self.layers)
        if backend == "triton":  # imported here: Triton is only loaded where it runs
            from specsplit.runtime import triton_kernels as tk

            residual = None
            for i, (layer, kv) in enumerate(zip(self.layers, kv_caches, strict=True)):
                if i in aux_layers and aux_out is not None:
                    aux_out.append(x if residual is None else x + residual)
                x, residual = layer.forward_fused(x, residual, positions, self.inv_freq, kv, meta, tk)
            x = tk.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            for i, (layer, kv) in enumerate(zip(self.layers, kv_caches, strict=True)):
                if i in aux_layers and aux_out is not None:
                    aux_out.append(x)
                x = layer(x, cos, sin, kv, meta, backend)
            x = self.norm(x)
        if n in aux_layers and aux_out is not None:
            aux_out.append(x)
        return x

    def prepack_cpu(self) -> None:
        """Switch every linear layer to oneDNN packed weights (fp32 on CPU)."""
        for m in self.modules():
            if hasattr(m, "prepack") and m is not self:
                m.prepack()

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32 (sampling wants full precision)."""
        return self.lm_head(hidden).float()
