"""A draft replica's answers are checked before the target sees them: a faulty replica is the
draft's failure (INTERNAL, the session moves on or decodes plainly), never the request's."""

from __future__ import annotations

import grpc
import pytest

from specsplit.proto.v1 import common_pb2, draft_pb2
from specsplit.serving.completion_loop import check_branches, check_proposal
from specsplit.serving.replicas import TierFailure

VOCAB = 100


def _q(*rows: tuple[list[int], list[float]]) -> list[common_pb2.SparseDistribution]:
    return [common_pb2.SparseDistribution(ids=i, probs=p) for i, p in rows]


def test_a_well_formed_greedy_proposal_keeps_its_ids_and_timings():
    p = check_proposal(draft_pb2.DraftProposal(token_ids=[1, 2, 99], draft_ns=7, queue_ns=3, handled_ns=11), 3,
                       VOCAB, "d:1")
    assert (p.token_ids, p.q_ids, p.draft_ns, p.queue_ns, p.handled_ns) == ([1, 2, 99], None, 7, 3, 11)
    assert check_proposal(draft_pb2.DraftProposal(), 3, VOCAB, "d:1").token_ids == []


def test_a_sampled_proposal_brings_its_distributions_as_tensors():
    p = check_proposal(draft_pb2.DraftProposal(token_ids=[4, 5], q=_q(([4, 6], [0.75, 0.25]), ([5], [1.0]))), 2,
                       VOCAB, "d:1")
    assert p.q_ids is not None and p.q_ids.shape[0] == 2 and p.q_probs.shape == p.q_ids.shape
    assert p.q_probs[0].tolist()[:2] == [0.75, 0.25]


@pytest.mark.parametrize(("prop", "k"), [
    (draft_pb2.DraftProposal(token_ids=[1, 2, 3, 4]), 3),  # longer than asked
    (draft_pb2.DraftProposal(token_ids=[1, VOCAB]), 3),  # outside the vocabulary
    (draft_pb2.DraftProposal(token_ids=[1, 2], q=_q(([1], [1.0]))), 3),  # one q for two ids
    (draft_pb2.DraftProposal(token_ids=[1], q=_q(([1, 2], [0.9, 0.9]))), 3),  # not a distribution
])
def test_a_malformed_proposal_is_the_draft_replicas_failure(prop: draft_pb2.DraftProposal, k: int):
    with pytest.raises(TierFailure) as e:
        check_proposal(prop, k, VOCAB, "d:1")
    assert (e.value.tier, e.value.code) == ("draft", grpc.StatusCode.INTERNAL)
    assert "the draft replica is faulty" in str(e.value)


def test_branches_are_checked_each_and_kept_in_order():
    prop = draft_pb2.DraftProposal(branches=[draft_pb2.DraftBranch(id=1, accepted=3, token=7, token_ids=[8, 9]),
                                             draft_pb2.DraftBranch(id=2, accepted=0, token=5, token_ids=[6])])
    got = check_branches(prop, 3, 2, VOCAB, "d:1")
    assert [(b.id, b.accepted, b.token, b.block.token_ids) for b in got] == [(1, 3, 7, [8, 9]), (2, 0, 5, [6])]


@pytest.mark.parametrize("branch", [
    draft_pb2.DraftBranch(id=1, accepted=4, token=7, token_ids=[8]),  # more accepted than the block has
    draft_pb2.DraftBranch(id=1, accepted=1, token=VOCAB, token_ids=[8]),  # the assumed token outside the vocabulary
    draft_pb2.DraftBranch(id=1, accepted=1, token=7, token_ids=[8, 9, 10]),  # a block longer than k
    draft_pb2.DraftBranch(id=1, accepted=1, token=7, token_ids=[VOCAB + 5]),
])
def test_a_malformed_branch_is_the_draft_replicas_failure(branch: draft_pb2.DraftBranch):
    with pytest.raises(TierFailure) as e:
        check_branches(draft_pb2.DraftProposal(branches=[branch]), 3, 2, VOCAB, "d:1")
    assert e.value.code == grpc.StatusCode.INTERNAL
