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
  (online softmax), no gathered copy of K/V and no mask tensor; the query heads that share a
  KV head are one program (tensor-core dots), and a context is read in up to 4 parts at once.
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
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_o_ptr, part_ml_ptr, count_ptr,
                            pos_ptr, seq_ptr, bt_ptr, bt_stride, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            BLOCK_N: tl.constexpr, MAX_PARTS: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)  # one KV head and every query head that shares it: K and V read once
    part = tl.program_id(2)
    ctx_len = tl.load(pos_ptr + t) + 1  # causal: up to and including the token itself
    # (a + b - 1) // b, not tl.cdiv / tl.minimum: older interpreters give those one-element arrays
    blocks = (ctx_len + BLOCK_N - 1) // BLOCK_N
    per = (blocks + MAX_PARTS - 1) // MAX_PARTS  # BLOCK_N-token blocks per part: this token's alone
    n_parts = (blocks + per - 1) // per
    if part < n_parts:
        seq = tl.load(seq_ptr + t)
        g = tl.arange(0, GP)
        g_ok = g < G
        d = tl.arange(0, D)
        rows = (t * HQ + kvh * G + g)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + rows, mask=g_ok[:, None], other=0.0)  # model dtype: tensor-core dots
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        begin = part * per * BLOCK_N
        end = begin + per * BLOCK_N  # the last part ends at the context's end
        end += (part == n_parts - 1).to(tl.int32) * (ctx_len - end)
        for start in range(begin, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < ctx_len
            blk = tl.load(bt_ptr + seq * bt_stride + n // BLOCK_SIZE, mask=valid, other=0)
            off = ((blk * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * HKV + kvh) * D + d[None, :]
            k = tl.load(k_cache_ptr + off, mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + off, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BLOCK_N], float32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if n_parts == 1:
            tl.store(out_ptr + rows, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:
            # each part leaves its unnormalised sums; the last part to finish merges them in part
            # order (the same for this token in any batch) and re-arms the counter
            slot = (t * HKV + kvh) * MAX_PARTS
            po = part_o_ptr + (slot * GP + g)[:, None] * D + d[None, :]
            tl.store(po + part * GP * D, acc)
            pml = part_ml_ptr + (slot * GP + g) * 2
            tl.store(pml + part * GP * 2, m_i)
            tl.store(pml + part * GP * 2 + 1, l_i)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + t * HKV + kvh, 1, sem="acq_rel")
            if done == n_parts - 1:
                m_all = tl.full((GP,), float("-inf"), tl.float32)
                for i in range(0, n_parts):
                    m_all = tl.maximum(m_all, tl.load(pml + i * GP * 2, cache_modifier=".cg"))
                total = tl.zeros((GP, D), tl.float32)
                norm = tl.zeros((GP,), tl.float32)
                for i in range(0, n_parts):
                    w = tl.exp(tl.load(pml + i * GP * 2, cache_modifier=".cg") - m_all)
                    norm += w * tl.load(pml + i * GP * 2 + 1, cache_modifier=".cg")
                    total += w[:, None] * tl.load(po + i * GP * D, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + t * HKV + kvh, 0)
                tl.store(out_ptr + rows, (total / norm[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


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


ATTENTION_PARTS = 4  # a token's context is read by up to this many programs at once, then merged
ATTENTION_BLOCK_N = 64  # context tokens per iteration of a program (the interpreter's tests use less)
ATTENTION_WARPS = 4


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, token_seq: Tensor,
                    block_tables: Tensor, scale: float) -> Tensor:
    """q: [T, Hq, D]; caches [blocks, block_size, Hkv, D] -> [T, Hq, D], causal by absolute position.

    One program per (token, KV head, part of the context): a batch-1 decode step has few
    heads per GPU (8 at TP 4), and one program walking a whole context block by block was
    most of the step's attention time. How a token's context is cut into parts depends on
    its own length only, so a token gets the same result in any batch.
    """
    t, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))  # tl.dot wants 16 rows at least
    out = torch.empty_like(q)
    part_o = torch.empty((t * hkv * ATTENTION_PARTS * gp * d,), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((t * hkv * ATTENTION_PARTS * gp * 2,), dtype=torch.float32, device=q.device)
    # no token's context is longer than its block table: programs for parts past that would idle
    parts = min(ATTENTION_PARTS, triton.cdiv(block_tables.shape[1] * block_size, ATTENTION_BLOCK_N))
    _paged_attention_kernel[(t, hkv, parts)](
        q, k_cache, v_cache, out, part_o, part_ml, _counters(t * hkv, q.device), positions, token_seq,
        block_tables, block_tables.stride(0), scale, HQ=hq, HKV=hkv, G=g, GP=gp, D=d, BLOCK_SIZE=block_size,
        BLOCK_N=ATTENTION_BLOCK_N, MAX_PARTS=ATTENTION_PARTS, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=ATTENTION_WARPS)
    return out


@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_PER, stride_xm, stride_wn,
                          stride_ym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)  # this program's share of K (SPLIT_K > 1: too few output strips for the SMs)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * K_PER
    for k0 in range(k_begin, k_begin + K_PER, BLOCK_K):
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
    if SPLIT_K > 1:
        # every split stores its partial sums; the last to finish adds them up in split order
        # (deterministic, no float atomics) and re-arms the strip's counter for the next call
        part = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + split * BLOCK_M * N, acc, mask=n_ok[None, :])
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part + s * BLOCK_M * N, mask=n_ok[None, :], other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid, 0)
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


SKINNY_MAX_ROWS = 16  # rows of x up to which `skinny_linear` is used (one 16-row tensor-core tile)
# the best single configuration over an 8B step's projections on an H100 (benchmarks/skinny_bench.py)
SKINNY_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4}
SKINNY_CONFIG.update(json.loads(os.environ.get("SPECSPLIT_SKINNY_CONFIG", "{}")))  # for tuning runs
_COUNTERS: dict[torch.device, list[Tensor]] = {}  # per device: arrival counters, each kept at 0 between calls


def choose_split_k(n_strips: int, k_blocks: int, device: torch.device) -> int:
    """Splits of K so that strips x splits fill the SMs about twice (1 when the strips already do)."""
    if device.type != "cuda":
        return 1 if n_strips >= 4 else min(2, k_blocks)  # the interpreter: exercise the split path a little
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while n_strips * split < 2 * sms and split * 2 <= k_blocks // 2:
        split *= 2
    return split


def _counters(n: int, device: torch.device) -> Tensor:
    """At least n arrival counters (int32, at 0) for the kernels that merge parts on `device`.

    Kernels on one device run one after another (one stream), and each leaves its counters at
    0, so every call shares them. A larger set never replaces a smaller one that captured
    CUDA graphs may still use: those stay alive.
    """
    have = _COUNTERS.setdefault(device, [])
    if not have or have[-1].numel() < n:
        have.append(torch.zeros(max(n, 1 << 18), dtype=torch.int32, device=device))
    return have[-1]


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, **config: int) -> Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) for M <= SKINNY_MAX_ROWS; float32 accumulation.

    Weight-bound: one program per strip of BLOCK_N output features streams that strip of W
    once. A matrix with few strips for its depth (TP shards, small models' o and down
    projections) also splits K (`SPLIT_K`, chosen per shape, or given), so every SM streams.
    Steps run on one stream per device, so the strips' counters are shared by every call.
    """
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    cfg = {**SKINNY_CONFIG, **config}
    if x.dtype == torch.float32 and "BLOCK_K" not in config:  # twice the bytes per element
        cfg["BLOCK_K"] = cfg["BLOCK_K"] // 2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    strips = triton.cdiv(n, cfg["BLOCK_N"])
    k_blocks = triton.cdiv(k, cfg["BLOCK_K"])
    split = cfg.get("SPLIT_K") or choose_split_k(strips, k_blocks, x.device)
    k_per = triton.cdiv(k_blocks, split) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per)
    part = torch.empty((split, 16, n), dtype=torch.float32, device=x.device) if split > 1 else y
    count = _counters(strips, x.device) if split > 1 else y
    _skinny_matmul_kernel[(strips, split)](
        x, weight, bias if bias is not None else weight, y, part, count, m, n, k, k_per, x.stride(0),
        weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, EVEN_K=split * k_per == k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT_K=split,
        BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
