"""Hidden states on the wire: packed little-endian bfloat16 bytes, row-major.

The target tier returns, per round, the states of the positions it accepted
(`VerifyResult.hidden_states`, [n, D]); the draft tier hands them to the head as
`DraftRequest.hidden_states`. D = len(layers) * hidden_size: 4096 for EAGLE-1 on a
Llama-3.1-8B target, 3 * 4096 for EAGLE-3, i.e. 8 KiB and 24 KiB per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bytes_per_token(hidden_size: int, num_layers_read: int) -> int:
    """Wire size of one position's state: bf16 = 2 bytes per value."""
    return 2 * hidden_size * num_layers_read


def pack_states(states: Tensor) -> bytes:
    """[n, D] any float dtype/device -> n * D * 2 bytes of bfloat16."""
    if states.dim() != 2:
        raise ValueError(f"hidden states must be [n, D], got {tuple(states.shape)}")
    return states.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def unpack_states(data: bytes, width: int) -> Tensor:
    """Bytes from `pack_states` -> [n, width] bfloat16; a length that is not whole rows is refused."""
    if width < 1 or len(data) % (2 * width):
        raise ValueError(f"{len(data)} bytes are not whole rows of {width} bfloat16 values")
    if not data:
        return torch.empty(0, width, dtype=torch.bfloat16)
    return torch.frombuffer(bytearray(data), dtype=torch.bfloat16).view(-1, width)
