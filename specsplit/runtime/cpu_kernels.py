"""oneDNN (mkldnn) linear kernels with pre-packed weights for fp32 on CPU.

On the 2-core AVX-512 machines we measured, PyTorch's default fp32 `linear` (MKL) reads
weights at ~15 GB/s for one token and gets slower per byte for 2-8 tokens, exactly the
shapes of decode and verify steps. oneDNN with weights packed once into its blocked layout
runs the same products at 30-47 GB/s (benchmarks/README numbers), which is what makes
verifying a block of k+1 tokens cheap on CPU. Packing happens once after loading; the dense
copy is dropped so memory does not double. Set SPECSPLIT_CPU_PACKED=0 to turn it off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def packing_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and os.environ.get("SPECSPLIT_CPU_PACKED", "1") != "0"
    )


def pack(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Dense [out, in] weight (and [out] bias) -> oneDNN tensors for `packed_linear`."""
    return weight.detach().contiguous().to_mkldnn(), None if bias is None else bias.detach().contiguous().to_mkldnn()


def packed_linear(x: Tensor, packed: tuple[Tensor, Tensor | None]) -> Tensor:
    """x: [..., in] -> [..., out], dense in and out."""
    w, b = packed
    lead = x.shape[:-1]
    y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn(), w, b).to_dense()
    return y.reshape(*lead, y.shape[-1])
