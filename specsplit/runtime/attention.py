"""Paged attention over a ragged batch: one place that picks and runs the backend.

A batch is flattened into T tokens from B sequences with different query lengths (prefill
chunks, verify blocks of k+1, single decode tokens). The new keys/values are written into
the paged cache first; attention then reads each sequence's whole context from the cache.

Backends: flash-attn's `flash_attn_with_kvcache` (reads the block table directly) on CUDA
when installed; else on CUDA our Triton kernels (`triton_kernels`: paged attention fused with
norms, rotary and cache writes); PyTorch SDPA otherwise, which gathers each sequence's blocks into a padded
[B, L] view with a causal+length mask. The choice is made once by `select_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def select_backend(device: torch.device, requested: str = "auto") -> str:
    """"flash", "triton" or "sdpa". On CUDA: flash-attn if installed, else our Triton kernels
    (fused norms/rotary/paged attention), else SDPA; SDPA on CPU. SPECSPLIT_ATTENTION overrides auto."""
    if requested == "auto":
        requested = os.environ.get("SPECSPLIT_ATTENTION", "auto")
    if requested not in ("auto", "flash", "triton", "sdpa"):
        raise ValueError(f"unknown attention backend {requested!r} (auto, flash, triton, sdpa)")
    cuda = device.type == "cuda"
    has = {"flash": cuda and importlib.util.find_spec("flash_attn") is not None,
           # on CPU only in Triton's interpreter (TRITON_INTERPRET=1), which the tests use
           "triton": importlib.util.find_spec("triton") is not None and (cuda or os.environ.get("TRITON_INTERPRET") == "1"),
           "sdpa": True}
    if requested != "auto":
        if not has[requested]:
            raise ValueError(f"attention backend {requested!r} requested but it is not usable on {device}")
        return requested
    return next(b for b in ("flash", "triton", "sdpa") if has[b] and (cuda or b == "sdpa"))


@dataclass
class AttentionMetadata:
    """Index tensors shared by every layer of one forward pass (all on the model's device)."""

    slot_mapping: Tensor  # [T] int64 cache slot (block * block_size + offset) of each new token
    query_lens: Tensor  # [B] int64 new tokens per sequence
    seq_lens: Tensor  # [B] int64 context length per sequence after this step (cached + new)
    block_tables: Tensor  # [B, max_blocks] int64 physical block ids, padded with 0
    # SDPA view: padded query positions and gathered cache slots.
    query_index: Tensor  # [B, Qmax] int64 flat token index of each padded query (pad -> 0)
    kv_slots: Tensor  # [B, Lmax] int64 cache slot of each context position (pad -> 0)
    mask: Tensor  # [B, 1, Qmax, Lmax] bool, True = may attend
    token_seq: Tensor  # [T] int64 sequence of each flat token
    token_pos_in_seq: Tensor  # [T] int64 position of each flat token within its padded query row
    # flash view: queries right-aligned so causal masking lines up with each context's end
    query_index_right: Tensor  # [B, Qmax] int64
    token_pos_right: Tensor  # [T] int64
    max_query_len: int


@dataclass
class StepBatch:
    """A step's integer inputs, built on the host and packed into one array.

    One host-to-device copy moves everything (token ids, positions, slots, block tables,
    query layout); the context-wide tensors (gathered slots, causal mask) are derived on
    the device by `unpack`, which is what a CUDA graph captures.
    """

    packed: np.ndarray  # [N] int64, the concatenation of the fields below
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # field name -> shape, in packing order
    num_tokens: int  # T
    num_seqs: int  # B
    max_query_len: int  # Qmax
    context_len: int  # Lmax (padded for graphs)
    block_size: int
    dense: bool = True  # derive the SDPA view (gathered slots, mask); paged kernels do without

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Everything that fixes the shapes of a step (the CUDA graph key)."""
        return (self.num_seqs, self.max_query_len, self.context_len, self.packed.shape[0])

    @classmethod
    def build(cls, token_ids: list[int], query_lens: list[int], seq_lens: list[int],
              block_tables: list[list[int]], block_size: int, pad_context_to: int | None = None,
              dense: bool = True, write_lens: list[int] | None = None, scratch_slot: int = 0) -> StepBatch:
        """`write_lens[i]`: how many of sequence i's new tokens are real; the rest are padding
        (uniform shapes for CUDA graphs) whose keys/values go to `scratch_slot`, read by no one.

        Built in plain Python for the few tokens of a decode, verify or draft step (on the
        round's path: tens of µs instead of ~100 for the array operations), with numpy for more."""
        b = len(query_lens)
        qmax = max(query_lens)
        lmax = max(max(seq_lens), pad_context_to or 0)
        nb = max(max(len(t) for t in block_tables), -(-lmax // block_size))
        t = sum(query_lens)
        build = _build_small if b <= SMALL_STEP_SEQS and t <= SMALL_STEP_TOKENS else _build_arrays
        packed = build(list(token_ids), list(query_lens), list(seq_lens), block_tables, block_size, nb, qmax,
                       write_lens, scratch_slot)
        shapes = (("input_ids", (t,)), ("positions", (t,)), ("slot_mapping", (t,)), ("query_lens", (b,)),
                  ("seq_lens", (b,)), ("block_tables", (b, nb)), ("query_index", (b, qmax)), ("token_seq", (t,)),
                  ("token_pos_in_seq", (t,)), ("query_index_right", (b, qmax)), ("token_pos_right", (t,)))
        return cls(packed, shapes, t, b, qmax, lmax, block_size, dense)

    def field(self, name: str) -> np.ndarray:
        """A view of one packed field (writes go into `packed`)."""
        start, n, shape = _offsets(self.shapes)[name]
        return self.packed[start : start + n].reshape(shape)

    def advanced(self, d: int, rows: int) -> StepBatch:
        """This one-token-per-sequence step, `d` tokens later for its first `rows` sequences
        (the others are padding and stay as they are): positions, context lengths and cache
        slots move on, the rest is shared. A chained block's later steps are built this way,
        a few array operations each instead of a whole `build`."""
        if self.max_query_len != 1:
            raise ValueError("only a step of one token per sequence can be advanced")
        out = dataclasses.replace(self, packed=self.packed.copy())
        out.field("positions")[:rows] += d
        seq_lens = out.field("seq_lens")
        seq_lens[:rows] += d
        pos = seq_lens[:rows] - 1  # cache position of each sequence's one new token
        tables = out.field("block_tables")
        out.field("slot_mapping")[:rows] = tables[np.arange(rows), pos // self.block_size] * self.block_size \
            + pos % self.block_size
        return out

    def to_device(self, device: torch.device, out: Tensor | None = None) -> Tensor:
        """Copy to `device` (into `out` if given) through a reused pinned staging buffer."""
        return packed_to_device(self.packed, device, out)


    def unpack(self, buf: Tensor) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Views into the device buffer plus the derived tensors: (input_ids, positions, metadata)."""
        parts = {name: buf[start : start + n].view(shape) for name, (start, n, shape) in _offsets(self.shapes).items()}
        dev = buf.device
        b, qmax, lmax, bs = self.num_seqs, self.max_query_len, self.context_len, self.block_size
        q, s, bt = parts["query_lens"], parts["seq_lens"], parts["block_tables"]
        if self.dense:
            ctx_pos = torch.arange(lmax, device=dev)
            ctx_valid = ctx_pos[None, :] < s[:, None]  # [B, Lmax]
            kv_block = bt.gather(1, torch.clamp(ctx_pos // bs, max=bt.shape[1] - 1).expand(b, -1))
            kv_slots = torch.where(ctx_valid, kv_block * bs + ctx_pos % bs, 0)
            j = torch.arange(qmax, device=dev)
            query_valid = j[None, :] < q[:, None]  # [B, Qmax]
            qpos = (s - q)[:, None] + j[None, :]
            mask = (ctx_pos[None, None, :] <= qpos[:, :, None]) & ctx_valid[:, None, :] & query_valid[:, :, None]
            # padded query rows attend to position 0 so softmax never sees an all-masked row
            mask[:, :, 0] |= ~query_valid
            mask = mask[:, None]
        else:  # flash-attn and our Triton kernel read the block table themselves
            kv_slots = mask = torch.empty(0, device=dev)
        meta = AttentionMetadata(
            slot_mapping=parts["slot_mapping"], query_lens=q, seq_lens=s, block_tables=bt,
            query_index=parts["query_index"], kv_slots=kv_slots, mask=mask,
            token_seq=parts["token_seq"], token_pos_in_seq=parts["token_pos_in_seq"],
            query_index_right=parts["query_index_right"], token_pos_right=parts["token_pos_right"],
            max_query_len=qmax,
        )
        return parts["input_ids"], parts["positions"], meta


# steps this small are built without numpy (faster below these sizes, measured on a CPU)
SMALL_STEP_SEQS = 8
SMALL_STEP_TOKENS = 48


@functools.lru_cache(maxsize=1024)
def _offsets(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """Each packed field's (start, size, shape): the same few layouts come back step after step."""
    out, start = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = (start, n, shape)
        start += n
    return out


def _build_small(token_ids: list[int], q: list[int], s: list[int], tables: list[list[int]], bs: int, nb: int,
                 qmax: int, write_lens: list[int] | None, scratch_slot: int) -> np.ndarray:
    """`StepBatch.build`'s packed array, in plain Python (few tokens)."""
    positions: list[int] = []
    slots: list[int] = []
    token_seq: list[int] = []
    token_pos: list[int] = []
    pos_right: list[int] = []
    qi: list[int] = []
    qi_right: list[int] = []
    flat_tables: list[int] = []
    cu = 0
    for i, (qi_len, s_len, table) in enumerate(zip(q, s, tables, strict=True)):
        start, shift = s_len - qi_len, qmax - qi_len
        real = qi_len if write_lens is None else write_lens[i]
        n_table = len(table)
        for j in range(qi_len):
            p = start + j
            blk = p // bs
            positions.append(p)
            slots.append(((table[blk] if blk < n_table else 0) * bs + p % bs) if j < real else scratch_slot)
        token_seq += [i] * qi_len
        token_pos += range(qi_len)
        pos_right += range(shift, shift + qi_len)
        qi += [cu + j if j < qi_len else 0 for j in range(qmax)]
        qi_right += [cu + j - shift if j >= shift else 0 for j in range(qmax)]
        flat_tables += table
        flat_tables += [0] * (nb - n_table)
        cu += qi_len
    return np.array(token_ids + positions + slots + q + s + flat_tables + qi + token_seq + token_pos + qi_right
                    + pos_right, dtype=np.int64)


def _build_arrays(token_ids: list[int], query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                  block_size: int, nb: int, qmax: int, write_lens: list[int] | None, scratch_slot: int) -> np.ndarray:
    """`StepBatch.build`'s packed array, with numpy (many tokens: prefill chunks, large batches)."""
    b = len(query_lens)
    q = np.asarray(query_lens, dtype=np.int64)
    s = np.asarray(seq_lens, dtype=np.int64)
    bt = np.zeros((b, nb), dtype=np.int64)
    for i, t in enumerate(block_tables):
        bt[i, : len(t)] = t
    starts = s - q
    cu = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(q, out=cu[1:])
    t = int(cu[-1])
    token_seq = np.repeat(np.arange(b), q)
    token_pos = np.arange(t) - cu[:-1][token_seq]
    abs_pos = starts[token_seq] + token_pos
    slots = bt[token_seq, abs_pos // block_size] * block_size + abs_pos % block_size
    if write_lens is not None:
        slots = np.where(token_pos < np.asarray(write_lens, dtype=np.int64)[token_seq], slots, scratch_slot)
    j = np.arange(qmax)
    query_index = np.where(j[None, :] < q[:, None], cu[:-1, None] + j[None, :], 0)
    shift = qmax - q
    jr = j[None, :] - shift[:, None]
    query_index_right = np.where(jr >= 0, cu[:-1, None] + jr, 0)
    fields_ = [np.asarray(token_ids, dtype=np.int64), abs_pos, slots, q, s, bt, query_index, token_seq, token_pos,
               query_index_right, token_pos + shift[token_seq]]
    return np.concatenate([a.reshape(-1) for a in fields_])


_STAGING: list[Tensor] = []
_COPIED = torch.cuda.Event() if torch.cuda.is_available() else None  # last copy out of the buffer


def packed_to_device(packed: np.ndarray, device: torch.device, out: Tensor | None = None) -> Tensor:
    """Packed step inputs # [N] int64 to `device` (into `out` if given), through the pinned staging buffer."""
    host = torch.from_numpy(packed)
    if device.type != "cuda":
        return host if out is None else out.copy_(host)
    staged = _staging(host.shape[0])
    staged.copy_(host)
    dev = staged.to(device, non_blocking=True) if out is None else out.copy_(staged, non_blocking=True)
    _COPIED.record()  # type: ignore[union-attr]
    return dev


def _staging(n: int) -> Tensor:
    """A pinned host buffer of at least n int64, reused across steps (pinning is slow).

    Before reuse we wait for the previous copy out of it (an event), not for the step.
    """
    if _COPIED is not None:
        _COPIED.synchronize()  # the previous step's copy has left the buffer
    if not _STAGING or _STAGING[0].shape[0] < n:
        with torch.inference_mode(False):  # a normal tensor: copies into it work in and out of inference mode
            _STAGING[:] = [torch.empty(max(n, 1 << 16), dtype=torch.int64).pin_memory()]
    return _STAGING[0][:n]


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store new keys/values. caches: [num_blocks, block_size, Hkv, D]; k, v: [T, Hkv, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def sdpa_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], reading context from the paged cache."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    qp = q[meta.query_index]  # [B, Qmax, Hq, D]
    kp = k_cache.view(-1, hkv, d)[meta.kv_slots]  # [B, Lmax, Hkv, D]
    vp = v_cache.view(-1, hkv, d)[meta.kv_slots]
    gqa = {}
    if hkv != hq:
        if qp.is_cuda:
            gqa = {"enable_gqa": True}  # no copies of K/V per query head
        else:
            kp = kp.repeat_interleave(hq // hkv, dim=2)
            vp = vp.repeat_interleave(hq // hkv, dim=2)
    with _sdpa_backends(qp.device):
        out = torch.nn.functional.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=meta.mask, scale=scale, **gqa
        )  # [B, Hq, Qmax, D]
    out = out.transpose(1, 2)  # [B, Qmax, Hq, D]
    return out[meta.token_seq, meta.token_pos_in_seq]  # [T, Hq, D]


def _sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Every SDPA backend but cuDNN's on CUDA. cuDNN's builds a plan for each new shape the first
    time it meets it: measured on an H100, an EAGLE head's eager steps (whose contexts grow a few
    tokens a round) spent 50-100 ms in a third of their calls, nearly all of it in SDPA
    (benchmarks/results/gpu_services_bench_20261127T215812Z.json and its py-spy profile). The
    others run any shape at once."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def flash_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """flash-attn over the paged cache (block_size must be a multiple of 256 for flash-attn 2)."""
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

    qp = q[meta.query_index_right]  # [B, Qmax, Hq, D] right-aligned
    out = flash_attn_with_kvcache(
        qp,
        k_cache,
        v_cache,
        cache_seqlens=meta.seq_lens.to(torch.int32),
        block_table=meta.block_tables.to(torch.int32),
        softmax_scale=scale,
        causal=True,
    )  # [B, Qmax, Hq, D]; causal aligns queries to the end of each context
    return out[meta.token_seq, meta.token_pos_right]


def attention(
    backend: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    if backend == "flash":
        return flash_attention(q, k_cache, v_cache, meta, scale)
    return sdpa_attention(q, k_cache, v_cache, meta, scale)
