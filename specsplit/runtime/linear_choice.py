"""Per projection shape, the faster of cuBLAS and our skinny kernel for decode and verify steps.

Which kernel reads a weight matrix fastest at a few rows depends on its shape and the GPU: on
an H100 our Triton kernel wins for the LM head and most tensor-parallel shards by 5-20%, and
cuBLAS for some small matrices (`benchmarks/skinny_bench.py`). So when a runner starts on a
GPU, each distinct shape is timed once on its real weights: a CUDA graph of one call per
layer with that shape (together they exceed the L2 cache, as in a step) for cuBLAS, our
kernel, and our kernel with K split across programs. The fastest serves every step of at
most `SKINNY_MAX_ROWS` rows of that runner, so its plain decode and its verify agree.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from specsplit.runtime.cuda_graphs import time_in_graph
from specsplit.runtime.parallel import _Linear

log = logging.getLogger(__name__)

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor] | None  # None: cuBLAS (F.linear)


def _candidates(n: int, k: int, device: torch.device) -> dict[str, Kernel]:
    from specsplit.runtime import triton_kernels as tk

    out: dict[str, Kernel] = {"cublas": None, "triton": functools.partial(tk.skinny_linear, SPLIT_K=1)}
    strips = -(-n // tk.SKINNY_CONFIG["BLOCK_N"])
    if tk.choose_split_k(strips, -(-k // tk.SKINNY_CONFIG["BLOCK_K"]), device) > 1:
        out["triton_split_k"] = tk.skinny_linear
    return out


def choose_linear_kernels(model: nn.Module, device: torch.device, rows: int = 1) -> dict[str, dict]:
    """Time each distinct projection shape of `model` and set every layer of that shape to the
    fastest kernel; returns {"NxK": {"kernel": name, "us": {name: µs per call}}}."""
    from specsplit.runtime import triton_kernels as tk

    groups: dict[tuple[int, int, bool], list[_Linear]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, _Linear) and m.weight.is_cuda and m.weight.numel():
            groups[(*m.weight.shape, getattr(m, "bias", None) is not None)].append(m)
    choices: dict[str, dict] = {}
    for (n, k, _bias), mods in groups.items():
        x = torch.randn(rows, k, device=device, dtype=mods[0].weight.dtype)
        times: dict[str, float] = {}
        candidates = _candidates(n, k, device)
        for name, kern in candidates.items():
            f = kern or nn.functional.linear
            try:
                times[name] = time_in_graph(lambda f=f, x=x, mods=mods: [f(x, m.weight, getattr(m, "bias", None))
                                                                         for m in mods], device) / len(mods)
            except Exception as e:  # noqa: BLE001 - e.g. a tile Triton cannot fit on this GPU: not a candidate
                log.warning("projection %dx%d: %s not usable (%s)", n, k, name, type(e).__name__)
        best = min(times, key=times.__getitem__)
        kern = candidates[best]
        for m in mods:
            m.skinny, m.skinny_rows = (kern, tk.SKINNY_MAX_ROWS) if kern is not None else (None, 0)
        choices[f"{n}x{k}"] = {"kernel": best, "us": times, "layers": len(mods)}
    log.info("projection kernels: %s", ", ".join(f"{s} {c['kernel']}" for s, c in choices.items()))
    return choices
