"""The words every tier and the gateway share about a session: its errors, its token ids,
its block limits. One module, so the draft service, the target service, the gateway and the
in-process engine refuse the same input with the same message.

Kept free of torch and protobuf: the user-level config and the gateway import it too.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_BLOCK = 32  # longest draft block a target verifies in one step
MAX_PROPOSE = MAX_BLOCK + 1  # longest draft proposal: a block plus the pipelined guess of the bonus token
MAX_SPECULATIVE_TOKENS = 16  # largest k a user may configure; the protocol limit MAX_BLOCK leaves room above it


class SessionError(ValueError):
    """A request that does not fit the session's state (unknown id, wrong order, bad ids)."""


class UnknownSession(KeyError):
    """No such session (already closed or never opened): gRPC NOT_FOUND."""


def out_of_vocab(ids: Iterable[int], vocab_size: int) -> list[int]:
    """The ids not in [0, vocab_size), in order."""
    return [t for t in ids if not 0 <= t < vocab_size]


def check_token_ids(ids: Iterable[int], vocab_size: int, what: str) -> None:
    """SessionError (INVALID_ARGUMENT, HTTP 400) naming the first bad ids of `what`."""
    bad = out_of_vocab(ids, vocab_size)
    if bad:
        raise SessionError(f"{what} has token id(s) outside the vocabulary [0, {vocab_size}): {bad[:5]}")
