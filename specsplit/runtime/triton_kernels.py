"""Fused GPU kernels (Triton) for the decode and verify steps.

A batch-1 decode step of an 8B model reads 16 GB of weights in ~5 ms; with plain PyTorch
ops each layer also launches ~30 tiny elementwise kernels (norms, rotary, cache writes, KV
gathers for SDPA) that cost ~2 µs each even inside a CUDA graph — a third of the step.
These kernels fold them into four per layer:

- `add_rms_norm`: residual add + RMSNorm (float32 statistics), one pass.
- `silu_and_mul`: the SwiGLU activation on the fused gate/up output.
- `rope_write_kv`: rotary on q and k (rotate-half convention), k and v stored straight into
  the paged cache; returns q.
- `paged_attention`: causal attention of each new token over its sequence's paged cache
  (online softmax), no gathered copy of K/V and no mask tensor.
- `skinny_linear`: x @ W.T for a few rows of x (decode and verify steps), each program
  streaming a strip of W once; for the small projections cuBLAS's kernels at M <= 16 reach
  well under the memory bandwidth.

Used when the attention backend is "triton" (CUDA with Triton, no flash-attn). The tests
compare each kernel with the PyTorch path, on GPU and in Triton's CPU interpreter.
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + row * n_cols + cols, x.to(res_out_ptr.dtype.element_ty), mask=m)
    # statistics of the value as stored (the unfused path normalises the rounded sum)
    xr = x.to(res_out_ptr.dtype.element_ty).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    y = (xr * inv).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=m)

@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(x_ptr + row * 2 * n_cols + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (s * u).to(out_ptr.dtype.element_ty), mask=m)

@triton.jit
def _rope_write_kv_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)  # 0..HQ+HKV-1 rotate (q then k heads); HQ+HKV.. copy v
    half = tl.arange(0, D // 2)
    base = qkv_ptr + (t * (HQ + 2 * HKV) + h) * D
    slot = tl.load(slot_ptr + t)
    if h < HQ + HKV:
        pos = tl.load(pos_ptr + t).to(tl.float32)
        ang = pos * tl.load(inv_freq_ptr + half)
        # cos/sin rounded to the model dtype, as in the unfused path
        c = tl.cos(ang).to(q_ptr.dtype.element_ty).to(tl.float32)
        s = tl.sin(ang).to(q_ptr.dtype.element_ty).to(tl.float32)
        x1 = tl.load(base + half).to(tl.float32)
        x2 = tl.load(base + D // 2 + half).to(tl.float32)
        y1 = (x1 * c).to(q_ptr.dtype.element_ty).to(tl.float32) - (x2 * s).to(q_ptr.dtype.element_ty).to(tl.float32)
        y2 = (x2 * c).to(q_ptr.dtype.element_ty).to(tl.float32) + (x1 * s).to(q_ptr.dtype.element_ty).to(tl.float32)
        if h < HQ:
            dst = q_ptr + (t * HQ + h) * D
        else:
            dst = k_cache_ptr + (slot * HKV + (h - HQ)) * D
        tl.store(dst + half, y1.to(dst.dtype.element_ty))
        tl.store(dst + D // 2 + half, y2.to(dst.dtype.element_ty))
    else:
        dst = v_cache_ptr + (slot * HKV + (h - HQ - HKV)) * D
        tl.store(dst + half, tl.load(base + half))
        tl.store(dst + D // 2 + half, tl.load(base + D // 2 + half))

@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, pos_ptr, seq_ptr, bt_ptr,
                            bt_stride, scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (HQ // HKV)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (t * HQ + h) * D + d).to(tl.float32) * scale
    ctx_len = tl.load(pos_ptr + t) + 1  # causal: up to and including the token itself
    seq = tl.load(seq_ptr + t)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for start in range(0, ctx_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx_len
        blk = tl.load(bt_ptr + seq * bt_stride + n // BLOCK_SIZE, mask=valid, other=0)
        slot = blk * BLOCK_SIZE + n % BLOCK_SIZE
        off = (slot[:, None] * HKV + kvh) * D + d[None, :]
        k = tl.load(k_cache_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + (t * HQ + h) * D + d, (acc / l_i).to(out_ptr.dtype.element_ty))


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); x: [T, H] contiguous."""
    t, h = x.shape
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, h, eps,
                               HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h))
    return out, res_out


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """[T, 2I] -> silu(gate) * up, [T, I]."""
    t, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out


def rope_write_kv(qkv: Tensor, positions: Tensor, inv_freq: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slot_mapping: Tensor, hq: int, hkv: int) -> Tensor:
    """qkv: [T, (hq + 2 hkv) * D]; rotates q and k, stores k and v at their cache slots; returns q [T, hq, D]."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty((t, hq, d), dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(t, hq + 2 * hkv)](qkv, positions, inv_freq, slot_mapping, q, k_cache, v_cache,
                                             HQ=hq, HKV=hkv, D=d)
    return q


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, token_seq: Tensor,
                    block_tables: Tensor, scale: float) -> Tensor:
    """q: [T, Hq, D]; caches [blocks, block_size, Hkv, D] -> [T, Hq, D], causal by absolute position."""
    t, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    _paged_attention_kernel[(t, hq)](q, k_cache, v_cache, out, positions, token_seq, block_tables,
                                     block_tables.stride(0), scale, HQ=hq, HKV=hkv, D=d,
                                     BLOCK_SIZE=block_size, BLOCK_N=64)
    return out


@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


SKINNY_MAX_ROWS = 16  # rows of x up to which `skinny_linear` is used (one 16-row tensor-core tile)
SKINNY_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}  # tuned on an H200
SKINNY_CONFIG.update(json.loads(os.environ.get("SPECSPLIT_SKINNY_CONFIG", "{}")))  # for tuning runs


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, **config: int) -> Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) for M <= SKINNY_MAX_ROWS; float32 accumulation."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    cfg = {**SKINNY_CONFIG, **config}
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _skinny_matmul_kernel[grid](x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0),
                                weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                EVEN_K=k % cfg["BLOCK_K"] == 0,
                                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
