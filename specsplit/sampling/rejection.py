"""Verification of a drafted block: the target keeps the longest prefix it agrees with.

Words (as vLLM's rejection sampler):
- accepted: a draft token the target keeps. Greedy rows accept while the draft equals the
  target's argmax; sampled rows accept draft x_j with probability min(1, p_j(x_j) / q_j(x_j))
  (Leviathan et al., arXiv 2211.17192), which keeps the output distributed exactly as p.
- recovered: the token emitted in place of the first rejected draft token, sampled from
  norm(max(0, p_j - q_j)) (greedy rows: the target's argmax at that position).
- bonus: the extra token emitted when every draft token was accepted, sampled from p_n at
  the position after the last draft token (greedy rows: its argmax).

Each round emits num_accepted + 1 tokens: the accepted drafts, then one recovered or bonus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specsplit.sampling.logits import exponential_race


def rejection_sample(
    target_probs: Tensor,
    target_argmax: Tensor,
    draft_token_ids: Tensor,
    num_draft_tokens: Tensor,
    draft_q_ids: Tensor | None,
    draft_q_probs: Tensor | None,
    is_greedy: Tensor,
    generators: Sequence[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """Verify B drafted blocks at once; greedy and sampled rows share the batch.

    target_probs: # [B, k+1, V] processed target distribution; row j predicts the token
        after draft j-1 (row 0: after the committed context).
    target_argmax: # [B, k+1] int64 argmax of the processed target logits.
    draft_token_ids: # [B, k] int64; entries at or past num_draft_tokens are ignored.
    num_draft_tokens: # [B] int64 in 0..k (blocks may be ragged).
    draft_q_ids: # [B, k, K] int64 the draft's sparse support per position; None when all
        rows are greedy.
    draft_q_probs: # [B, k, K] float32 the probabilities the draft sampled from.
    is_greedy: # [B] bool.
    generators: B entries; a row's uniforms and its recovered/bonus sample come from its
        generator when seeded, else from the global RNG.

    Returns num_accepted # [B] int64 in 0..num_draft_tokens and next_token # [B] int64
    (the recovered token after a rejection, else the bonus token).
    """
    b, k1, v = target_probs.shape
    k = k1 - 1
    device = target_probs.device
    _check_shapes(
        target_argmax,
        draft_token_ids,
        num_draft_tokens,
        draft_q_ids,
        draft_q_probs,
        is_greedy,
        generators,
        b,
        k,
    )
    # Out-of-range counts are clamped; the services validate them at the boundary.
    num_draft_tokens = num_draft_tokens.clamp(0, k)  # [B]
    positions = torch.arange(k, device=device)  # [k]
    in_block = positions.unsqueeze(0) < num_draft_tokens.unsqueeze(1)  # [B, k]
    in_vocab = (draft_token_ids >= 0) & (draft_token_ids < v)  # [B, k]
    drafts = torch.where(in_block & in_vocab, draft_token_ids, 0)  # [B, k] safe to gather

    accepted = draft_token_ids == target_argmax[:, :k]  # [B, k] greedy rule
    all_greedy = draft_q_ids is None
    if not all_greedy:
        assert draft_q_probs is not None
        p_x = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # [B, k]
        q_x = _draft_prob(draft_q_ids, draft_q_probs.float(), drafts)  # [B, k]
        u = _uniforms(b, k, num_draft_tokens, generators, device)  # [B, k]
        # u < p/q with u ~ U[0, 1) happens with probability min(1, p/q); q = 0 (a token
        # outside the draft's own support: a faulty draft) is always rejected.
        sampled_accepted = (q_x > 0) & (u * q_x < p_x)  # [B, k]
        accepted = torch.where(is_greedy.unsqueeze(1), accepted, sampled_accepted)
    accepted = accepted & in_block & in_vocab  # [B, k]
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]

    rows = torch.arange(b, device=device)  # [B]
    next_token = target_argmax[rows, num_accepted]  # [B] greedy rule
    if all_greedy:
        return num_accepted, next_token

    p_n = target_probs[rows, num_accepted].float()  # [B, V]
    dist = p_n
    if k > 0:
        assert draft_q_ids is not None and draft_q_probs is not None
        rejected = num_accepted < num_draft_tokens  # [B]
        at = num_accepted.clamp(max=k - 1)  # [B] position of the first rejection
        q_n = _densify(draft_q_ids[rows, at], draft_q_probs[rows, at].float(), v)  # [B, V]
        q_n = q_n * rejected.unsqueeze(1)  # bonus rows: no draft at position n
        residual = _residual(p_n, q_n)  # [B, V]
        # p == q leaves no residual mass (and then no rejection can happen in exact
        # arithmetic); fall back to p so a rounding-error rejection still emits a token.
        has_mass = residual.sum(dim=1, keepdim=True) > 0  # [B, 1]
        dist = torch.where(has_mass, residual, p_n)
    # The race needs no normalisation: argmax(c * w / E) = argmax(w / E).
    sampled_next = exponential_race(dist, generators)  # [B]
    next_token = torch.where(is_greedy, next_token, sampled_next)
    return num_accepted, next_token


def _uniforms(
    b: int, k: int, num_draft_tokens: Tensor, generators: Sequence[torch.Generator | None], device: torch.device
) -> Tensor:
    """U[0, 1) # [B, k] for the acceptance tests.

    A seeded row draws only its own num_draft_tokens values, so what its generator yields
    next does not depend on how long the other blocks of the batch are: a seeded request
    gives the same output alone or batched with any traffic.
    """
    u = torch.zeros(b, k, dtype=torch.float32, device=device)  # [B, k]
    if any(g is None for g in generators):
        u.uniform_()  # unseeded rows: one draw from the global RNG (seeded rows are overwritten)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        counts = num_draft_tokens.tolist()
        for i in seeded:
            if counts[i] > 0:
                u[i, : counts[i]].uniform_(generator=generators[i])
    return u


def _draft_prob(q_ids: Tensor, q_probs: Tensor, tokens: Tensor) -> Tensor:
    """q_j(x_j) from the sparse pair: # [B, k, K], # [B, k, K], # [B, k] -> # [B, k]."""
    return (q_probs * (q_ids == tokens.unsqueeze(2))).sum(dim=2)


def _densify(q_ids: Tensor, q_probs: Tensor, vocab_size: int) -> Tensor:
    """Sparse (ids # [B, K], probs # [B, K]) -> dense # [B, V]; repeated ids add up."""
    dense = torch.zeros(q_ids.shape[0], vocab_size, dtype=torch.float32, device=q_ids.device)
    ids = q_ids.clamp(0, vocab_size - 1)  # [B, K]
    probs = torch.where((q_ids >= 0) & (q_ids < vocab_size), q_probs, 0.0)  # [B, K]
    return dense.scatter_add_(1, ids, probs)


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """max(0, p - q), unnormalised: # [B, V]."""
    return (p - q).clamp_(min=0.0)


def _check_shapes(
    target_argmax: Tensor,
    draft_token_ids: Tensor,
    num_draft_tokens: Tensor,
    draft_q_ids: Tensor | None,
    draft_q_probs: Tensor | None,
    is_greedy: Tensor,
    generators: Sequence[torch.Generator | None],
    b: int,
    k: int,
) -> None:
    expected = {
        "target_argmax": (target_argmax, (b, k + 1)),
        "draft_token_ids": (draft_token_ids, (b, k)),
        "num_draft_tokens": (num_draft_tokens, (b,)),
        "is_greedy": (is_greedy, (b,)),
    }
    if (draft_q_ids is None) != (draft_q_probs is None):
        raise ValueError("draft_q_ids and draft_q_probs must be given together")
    if draft_q_ids is not None and draft_q_probs is not None:
        kk = draft_q_ids.shape[-1] if draft_q_ids.dim() == 3 else -1
        expected["draft_q_ids"] = (draft_q_ids, (b, k, kk))
        expected["draft_q_probs"] = (draft_q_probs, (b, k, kk))
    elif not bool(is_greedy.all()):
        raise ValueError("draft_q_ids/draft_q_probs are required when a row is sampled")
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if len(generators) != b:
        raise ValueError(f"generators must have {b} entries, got {len(generators)}")
