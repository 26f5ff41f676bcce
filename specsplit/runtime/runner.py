"""ModelRunner: a model, its paged KV cache, and one batched forward for ragged inputs.

The runner is the only thing that touches the model. Callers (target verifier, draft
proposer) hand it, per sequence, the new tokens to append and how many trailing positions
need logits; it returns those logits in one [N, V] tensor. Everything about sessions,
sampling and speculation lives above it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from specsplit.runtime.attention import StepBatch, select_backend
from specsplit.runtime.config import ModelConfig, with_generation_eos
from specsplit.runtime.cpu_kernels import packing_enabled
from specsplit.runtime.kv_cache import OutOfKVMemory, PagedKVCache
from specsplit.runtime.model import Transformer
from specsplit.runtime.parallel import SINGLE, ParallelContext
from specsplit.runtime.weights import iter_safetensors, load_weights

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)  # uniform steps pad the batch up to one of these
UNIFORM_MAX_QUERY = 16  # longest step (tokens per sequence) run as a uniform, graph-captured step

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """"auto" = float32 on CPU (fast kernels, exact reference), the checkpoint's 16-bit type on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(checkpoint_dtype), torch.bfloat16) if checkpoint_dtype in ("float16", "bfloat16") else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class StepInput:
    """One sequence's share of a forward pass."""

    seq_id: int
    token_ids: list[int]  # tokens appended to the sequence's cache this step
    num_logits: int = 1  # trailing positions whose logits are returned (k+1 when verifying)
    num_hidden: int = 0  # trailing positions whose hidden states `forward_hidden` returns (EAGLE)


class ModelRunner:
    def __init__(
        self, cfg: ModelConfig, model: Transformer, *, device: torch.device, max_model_len: int,
        num_kv_blocks: int, block_size: int = 16, backend: str = "auto", enforce_eager: bool = False,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        self.max_model_len = max_model_len
        self.backend = select_backend(device, backend)
        if self.backend == "triton" and cfg.head_dim & (cfg.head_dim - 1):
            if backend == "triton":
                raise ValueError(f"the Triton backend needs a power-of-two head_dim, not {cfg.head_dim}")
            self.backend = "sdpa"  # our kernels tile the head dimension in powers of two
        log.info("attention backend: %s", self.backend)
        self.linear_choice: dict[str, dict] = {}  # per projection shape: cuBLAS or ours, as timed here
        skinny = os.environ.get("SPECSPLIT_SKINNY_LINEAR", "auto")  # 1: ours everywhere, 0: cuBLAS everywhere
        if skinny not in ("auto", "0", "1"):
            raise ValueError(f"SPECSPLIT_SKINNY_LINEAR={skinny!r}: use 1 (our projection kernel everywhere), "
                             "0 (cuBLAS everywhere) or auto (the faster per shape, the default)")
        if self.backend == "triton" and skinny == "1":
            use_skinny_linear(model)
        elif self.backend == "triton" and skinny == "auto" and device.type == "cuda":
            from specsplit.runtime.linear_choice import choose_linear_kernels

            self.linear_choice = choose_linear_kernels(model, device)
        if self.backend == "flash":
            block_size = max(block_size, 256)  # flash-attn's paged kernel wants 256-token blocks
        ctx = model.ctx
        # Triton on CPU is its interpreter, testing the GPU path: keep the GPU's linear layers
        self.packed = packing_enabled(device, self.dtype) and self.backend != "triton"
        if self.packed:
            model.prepack_cpu()
        use_graphs = device.type == "cuda" and not enforce_eager
        self.cache = PagedKVCache(
            cfg.num_layers, num_kv_blocks + (1 if use_graphs else 0), block_size,
            cfg.num_kv_heads // ctx.world_size, cfg.head_dim, self.dtype, device,
        )
        self.dense = self.backend == "sdpa"  # SDPA needs the gathered [B, L] view; paged kernels do not
        # uniform steps: short steps padded to one query length and a batch bucket, so that a
        # few CUDA graphs serve every decode/verify/draft step whatever its mix of block lengths
        self.scratch_slot: int | None = None
        self.graphs = None
        if use_graphs:
            from specsplit.runtime.cuda_graphs import CudaGraphs

            self.enable_uniform_steps()
            compile_ = os.environ.get("SPECSPLIT_COMPILE", "0") == "1"
            self.graphs = CudaGraphs(model, self.cache.layers, self.backend, device, compile=compile_,
                                     context_bucket=256 if self.dense else 2048, geometric=not self.dense)
        log.info("runner: %s on %s, dtype %s, attention %s, linear %s, KV %d blocks x %d tokens",
                 cfg.model_type, device, self.dtype, self.backend, "oneDNN packed" if self.packed else "torch",
                 num_kv_blocks, block_size)

    def enable_uniform_steps(self) -> None:
        """Pad short steps to uniform shapes (on CUDA with graphs; tests turn it on on CPU)."""
        if self.scratch_slot is None:
            self.scratch_slot = self.cache.reserve_scratch() * self.cache.block_size

    def capture_graphs(self, max_query: int = 8, max_batch: int = 32) -> int:
        """Capture the CUDA graphs of uniform steps up front (Q in 1..max_query, batch buckets up
        to max_batch), so no capture stalls a live request; returns how many were captured."""
        if self.graphs is None:
            return 0
        t0, n = time.perf_counter(), 0
        for b in BATCH_BUCKETS:
            if b > max_batch:
                break
            for q in range(1, min(max_query, UNIFORM_MAX_QUERY) + 1):
                batch = self._uniform_batch([], b, q)[0]  # padding only: writes go to the scratch slot
                if batch.key not in self.graphs.graphs:
                    self.graphs.run(batch)
                    n += 1
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs in %.1fs", n, time.perf_counter() - t0)
        return n

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls, folder: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
        ctx: ParallelContext = SINGLE, max_model_len: int | None = None,
        kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
        block_size: int = 16, backend: str = "auto", enforce_eager: bool = False,
    ) -> ModelRunner:
        """Load a Hugging Face folder (config.json + safetensors) and plan the KV pool."""
        from transformers import AutoConfig

        folder = Path(folder)
        device = torch.device(device)
        hf = AutoConfig.from_pretrained(folder)
        cfg = with_generation_eos(ModelConfig.from_hf(hf), folder)
        ckpt_dtype = str(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", "")).replace("torch.", "")
        tdtype = resolve_dtype(dtype, device, ckpt_dtype)
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = Transformer(cfg, ctx)
        model = model.to_empty(device=device).to(tdtype)
        model.inv_freq.copy_(_inv_freq(cfg, device))
        load_weights(model, iter_safetensors(folder))
        model.eval()
        log.info("loaded %s (%s) in %.1fs", folder, cfg.model_type, time.perf_counter() - t0)
        return cls.from_model(
            cfg, model, device=device, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization, block_size=block_size, backend=backend,
            enforce_eager=enforce_eager,
        )

    @classmethod
    def from_model(
        cls, cfg: ModelConfig, model: Transformer, *, device: torch.device,
        max_model_len: int | None = None, kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9, block_size: int = 16, backend: str = "auto",
        enforce_eager: bool = False,
    ) -> ModelRunner:
        max_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if max_model_len and max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's context of {cfg.max_position_embeddings}"
            )
        dtype = model.embed_tokens.weight.dtype
        per_block = PagedKVCache.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads // model.ctx.world_size, cfg.head_dim, dtype)
        if kv_cache_bytes is None:
            kv_cache_bytes = plan_kv_bytes(device, gpu_memory_utilization, per_block, max_len, block_size)
        num_blocks = max(kv_cache_bytes // per_block, -(-max_len // block_size))
        log.info("KV cache: %.2f GiB for %d blocks (%d tokens)", num_blocks * per_block / 2**30,
                 num_blocks, num_blocks * block_size)
        runner = cls(cfg, model, device=device, max_model_len=max_len, num_kv_blocks=int(num_blocks),
                     block_size=block_size, backend=backend, enforce_eager=enforce_eager)
        runner.capture_graphs()  # on CUDA without enforce_eager; every rank of a TP group in step
        return runner

    # ---- sequences ---------------------------------------------------------------------
    def add(self, seq_id: int) -> None:
        self.cache.add(seq_id)

    def free(self, seq_id: int) -> None:
        self.cache.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.cache.seqs[seq_id].length

    def truncate(self, seq_id: int, length: int) -> None:
        self.cache.truncate(seq_id, length)

    def fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        """Children sharing their parents' first tokens, (parent, child, length) each; the
        children that fit (see PagedKVCache.fork)."""
        return self.cache.fork(forks)

    def rename(self, old: int, new: int) -> None:
        self.cache.rename(old, new)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Nothing to stop for one device (TensorParallelRunner stops its workers here, within
        `timeout_s`); True = stopped cleanly."""
        return True

    # ---- forward -----------------------------------------------------------------------
    def check(self, inputs: list[StepInput]) -> dict[int, int]:
        """Validate a step and check KV room; returns seq_id -> new length. Changes nothing.

        Raises ValueError for bad inputs and OutOfKVMemory when the pool cannot hold them.
        """
        cache = self.cache
        needs: dict[int, int] = {}
        for inp in inputs:
            if inp.seq_id not in cache.seqs:
                raise ValueError(f"sequence {inp.seq_id} has no cache")
            if not inp.token_ids or not 1 <= inp.num_logits <= len(inp.token_ids) \
                    or not 0 <= inp.num_hidden <= len(inp.token_ids):
                raise ValueError(f"bad step input for sequence {inp.seq_id}")
            new_len = cache.seqs[inp.seq_id].length + len(inp.token_ids)
            if new_len > self.max_model_len:
                raise ValueError(f"sequence {inp.seq_id} would reach {new_len} tokens > max_model_len {self.max_model_len}")
            needs[inp.seq_id] = new_len
        if len(needs) != len(inputs):
            raise ValueError("a sequence appears twice in one step")
        if not cache.can_fit(needs):
            raise OutOfKVMemory(f"KV cache full ({cache.num_free_blocks} of {cache.num_blocks} blocks free)")
        return needs

    def forward(self, inputs: list[StepInput], device_ids: Tensor | None = None) -> Tensor:
        """Append each input's tokens and return logits [sum(num_logits), vocab] float32.

        `device_ids` # [len(inputs)] int64 on the device: the token of each one-token input,
        taken from the device instead of `token_ids` (placeholders then). A drafter feeds its
        own argmax or sample back this way, so drafting a block needs no host round trip.
        Raises OutOfKVMemory (nothing changed) when the pool cannot hold the new tokens.
        """
        if device_ids is not None and (device_ids.shape != (len(inputs),)
                                       or any(len(i.token_ids) != 1 for i in inputs)):
            raise ValueError("device_ids needs exactly one token per input")
        return self._step(inputs, (), device_ids)[0]

    @torch.inference_mode()
    def forward_chain(self, seq_ids: list[int], first_ids: Tensor, n: int, plan: Tensor | None = None,
                      top: int = 0) -> Tensor | tuple[Tensor, Tensor, Tensor] | None:
        """`n` greedy one-token steps of each sequence in one CUDA graph replay (a draft block).

        Step 0 feeds `first_ids` # [m] (on the device), each later step the argmax of the one
        before (or `plan` # [m, n] where >= 0, see `CudaGraphs.run_chain`); every step's inputs are built here beforehand, so the host does one round of work
        per block, not per token. Returns the argmax ids # [m, n] (with `top` > 0 also each step's
        `top` likeliest tokens and their probabilities # [m, n, top]), or None when this runner
        has no graphs or the shapes do not fit them (the caller then steps one token at a time).
        Raises OutOfKVMemory (nothing changed) when the pool cannot hold the new tokens.
        """
        if self.graphs is None or self.scratch_slot is None or n < 1:
            return None
        m = len(seq_ids)
        b = next((x for x in BATCH_BUCKETS if x >= m), None)
        if b is None:
            return None
        needs = self.check([StepInput(s, [0] * n) for s in seq_ids])
        cache = self.cache
        for seq_id, new_len in needs.items():
            cache.reserve(seq_id, new_len)
        seqs = [cache.seqs[s] for s in seq_ids]
        pad = self.graphs.bucket(max(needs.values()))
        tables = [s.blocks for s in seqs] + [[] for _ in range(b - m)]
        first = StepBatch.build([0] * b, [1] * b, [s.length + 1 for s in seqs] + [1] * (b - m), tables,
                                cache.block_size, pad, dense=self.dense, write_lens=[1] * m + [0] * (b - m),
                                scratch_slot=self.scratch_slot)
        batches = [first, *(first.advanced(j, m) for j in range(1, n))]
        out = self.graphs.run_chain(batches, first_ids, plan, top)
        if out is None:
            return None
        for s in seqs:
            s.length += n
        if isinstance(out, tuple):
            toks, ids, probs = out
            return toks[:, :m].T.clone(), ids[:, :m].transpose(0, 1).clone(), probs[:, :m].transpose(0, 1).clone()
        return out[:, :m].T.clone()  # [m, n]

    def forward_hidden(self, inputs: list[StepInput], layers: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """`forward`, plus the hidden states an EAGLE head reads: [sum(num_hidden), len(layers) * hidden],
        the residual stream entering each of `layers` (num_layers = the final normed output),
        concatenated in the order given."""
        if not layers or not all(0 <= i <= self.cfg.num_layers for i in layers):
            raise ValueError(f"hidden layers {layers} outside 0..{self.cfg.num_layers}")
        logits, hidden = self._step(inputs, layers)
        assert hidden is not None
        return logits, hidden

    @torch.inference_mode()
    def _step(self, inputs: list[StepInput], layers: tuple[int, ...],
              device_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        cache = self.cache
        needs = self.check(inputs)
        for seq_id, n in needs.items():
            cache.reserve(seq_id, n)
        shape = self._uniform_shape(inputs)
        batch, logit_rows = self._uniform_batch(inputs, *shape) if shape else self._ragged_batch(inputs)
        rows = None if len(logit_rows) == batch.num_tokens else \
            torch.tensor(logit_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        # one-token inputs sit at rows 0..n-1 of the ids in both layouts (uniform: q = 1);
        logits = states = None
        if shape and self.graphs is not None:
            if not layers:
                logits = self.graphs.run(batch, device_ids)
            elif device_ids is None and (out := self.graphs.run_hidden(batch, layers)) is not None:
                logits, states = out  # hidden states too (an EAGLE draft's target): their own graphs
        aux: list[Tensor] = []
        if logits is not None:  # a copy: the graph's output buffer is reused by the next replay
            logits = logits.clone() if rows is None else logits[rows]
        else:
            buf = batch.to_device(self.device)
            if device_ids is not None:
                buf[: len(inputs)].copy_(device_ids)
            input_ids, positions, meta = batch.unpack(buf)
            hidden = self.model(input_ids, positions, cache.layers, meta, self.backend, layers, aux)  # [T, H]
            logits = self.model.compute_logits(hidden if rows is None else hidden[rows])  # [N, V]
        for inp in inputs:
            cache.seqs[inp.seq_id].length += len(inp.token_ids)
        if not layers:
            return logits, None
        # from pageable memory without blocking: staged at once, no wait for the step just launched
        hrows = torch.tensor(_hidden_rows(inputs, shape[1] if shape else None), dtype=torch.int64).to(
            self.device, non_blocking=True)
        if states is not None:  # from a graph: every token row's states, already in `layers` order
            return logits, states[hrows]  # [sum(num_hidden), len(layers)*H]
        by_layer = dict(zip(sorted(set(layers)), aux, strict=True))
        return logits, torch.cat([by_layer[i][hrows] for i in layers], dim=-1)  # [sum(num_hidden), len(layers)*H]

    def _ragged_batch(self, inputs: list[StepInput]) -> tuple[StepBatch, list[int]]:
        """The step as it is (prefill chunks, or uniform steps turned off); returns the batch
        and the rows of its tokens that want logits."""
        cache = self.cache
        query_lens, seq_lens, tables, ids, logit_rows = [], [], [], [], []
        offset = 0
        for inp in inputs:
            seq = cache.seqs[inp.seq_id]
            n = len(inp.token_ids)
            query_lens.append(n)
            seq_lens.append(seq.length + n)
            tables.append(seq.blocks)
            ids.extend(inp.token_ids)
            logit_rows.extend(range(offset + n - inp.num_logits, offset + n))
            offset += n
        return StepBatch.build(ids, query_lens, seq_lens, tables, cache.block_size, dense=self.dense), logit_rows

    def _uniform_shape(self, inputs: list[StepInput]) -> tuple[int, int] | None:
        """(batch bucket, query length) if this step runs padded to uniform shapes, else None.

        Decode, verify and draft steps are short; prefill chunks are not and run as they are.
        """
        if self.scratch_slot is None:
            return None
        q = max(len(i.token_ids) for i in inputs)
        if q > UNIFORM_MAX_QUERY:
            return None
        b = next((x for x in BATCH_BUCKETS if x >= len(inputs)), None)
        return None if b is None else (b, q)

    def _uniform_batch(self, inputs: list[StepInput], b: int, q: int) -> tuple[StepBatch, list[int]]:
        """Every sequence padded to q tokens, the batch to b sequences with padding-only rows.

        Padding tokens sit after a sequence's real ones, so causal attention keeps them out
        of the real tokens' results; their keys/values go to the scratch slot, so the cache
        is untouched past each sequence's real end. Returns the batch and the logit rows.
        """
        cache, scratch = self.cache, self.scratch_slot
        assert scratch is not None, "enable_uniform_steps() first"
        ids: list[int] = []
        seq_lens, tables, write_lens, rows = [], [], [], []
        for i, inp in enumerate(inputs):
            seq = cache.seqs[inp.seq_id]
            n = len(inp.token_ids)
            ids.extend(inp.token_ids)
            ids.extend([0] * (q - n))
            seq_lens.append(seq.length + q)
            tables.append(seq.blocks)
            write_lens.append(n)
            rows.extend(range(i * q + n - inp.num_logits, i * q + n))
        for _ in range(b - len(inputs)):
            ids.extend([0] * q)
            seq_lens.append(q)
            tables.append([])
            write_lens.append(0)
        pad = self.graphs.bucket(max(seq_lens)) if self.graphs is not None else None
        batch = StepBatch.build(ids, [q] * b, seq_lens, tables, cache.block_size, pad, dense=self.dense,
                                write_lens=write_lens, scratch_slot=scratch)
        return batch, rows


def _hidden_rows(inputs: list[StepInput], q: int | None) -> list[int]:
    """Flat token rows of each input's trailing `num_hidden` tokens (q: uniform step's query length)."""
    rows, offset = [], 0
    for inp in inputs:
        n = len(inp.token_ids)
        rows.extend(range(offset + n - inp.num_hidden, offset + n))
        offset += q if q is not None else n
    return rows


def use_skinny_linear(model: Transformer) -> None:
    """Our Triton kernel for the projections of decode/verify steps (few rows, weight-bound)."""
    from specsplit.runtime import triton_kernels as tk
    from specsplit.runtime.parallel import _Linear

    for m in model.modules():
        if isinstance(m, _Linear):
            m.skinny, m.skinny_rows = tk.skinny_linear, tk.SKINNY_MAX_ROWS


def _inv_freq(cfg: ModelConfig, device: torch.device) -> Tensor:
    from specsplit.runtime.model import rope_inv_freq

    return rope_inv_freq(cfg).to(device)


def plan_kv_bytes(device: torch.device, utilization: float, per_block: int, max_len: int, block_size: int) -> int:
    """KV budget: on CUDA the free share of `utilization` after weights; on CPU a fixed 2 GiB."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * utilization) - used - 512 * 2**20  # headroom for activations
        if budget < per_block * -(-max_len // block_size):
            raise ValueError(
                f"gpu_memory_utilization={utilization} leaves {budget / 2**30:.2f} GiB for the KV cache, "
                f"too little for one sequence of {max_len} tokens"
            )
        log.info("GPU memory: %.1f GiB total, %.1f GiB used by weights, %.1f GiB for KV",
                 total / 2**30, used / 2**30, budget / 2**30)
        return budget
    return 2 * 2**30
