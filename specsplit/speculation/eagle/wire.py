"""Hidden states on the wire: packed little-endian bfloat16 bytes, row-major.

The target tier returns, per round, the states of the positions it accepted
(`VerifyResult.hidden_states`, [n, D]); the draft tier hands them to the head as
`DraftRequest.hidden_states`. D = len(layers) * hidden_size: 4096 for EAGLE-1 on a
Llama-3.1-8B target, 3 * 4096 for EAGLE-3, i.e. 8 KiB and 24 KiB per token.

One message carries at most MAX_STATES_BYTES of states (gRPC messages are capped at 16 MiB):
the newest rows are kept, so after a long prompt (over ~500 positions for EAGLE-3 on 8B) the
head starts its cache at the first position it got; it drafts from less context, never wrongly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bytes_per_token(hidden_size: int, num_layers_read: int) -> int:
    """Wire size of one position's state: bf16 = 2 bytes per value."""
    return 2 * hidden_size * num_layers_read


MAX_STATES_BYTES = 12 * 2**20  # per message, under the tiers' 16 MiB gRPC limit


def max_rows(row_bytes: int) -> int:
    """How many rows of `row_bytes` one message carries (MAX_STATES_BYTES read at call time)."""
    return max(1, MAX_STATES_BYTES // max(1, row_bytes))


def tail_rows(data: bytes, row_bytes: int) -> bytes:
    """The newest whole rows of `data` that fit one message."""
    keep = max_rows(row_bytes) * row_bytes
    return data if len(data) <= keep else data[len(data) - keep :]


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
