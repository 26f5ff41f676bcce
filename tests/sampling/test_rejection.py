import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specsplit.sampling import rejection, rejection_sample

V = 8


def _greedy_target(b: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random target logits for b rows of k + 1 positions; probs one-hot, as for greedy rows."""
    logits = torch.randn(b, k + 1, V, generator=torch.Generator().manual_seed(seed))
    argmax = logits.argmax(-1)  # [b, k+1]
    probs = torch.nn.functional.one_hot(argmax, V).float()  # [b, k+1, V]
    return probs, argmax


def _run_greedy(drafts, num_draft, seed=0):
    b, k = drafts.shape
    probs, argmax = _greedy_target(b, k, seed)
    drafts = torch.where(drafts == -2, argmax[:, :k], drafts)  # -2: "copy the target"
    num_accepted, next_token = rejection_sample(
        probs, argmax, drafts, num_draft, None, None, torch.ones(b, dtype=torch.bool), [None] * b
    )
    return num_accepted, next_token, argmax


def _mismatch(argmax_row: int) -> int:
    return (argmax_row + 1) % V


def test_perfect_match():
    drafts = torch.full((3, 4), -2)
    num_accepted, next_token, argmax = _run_greedy(drafts, torch.tensor([4, 4, 4]))
    assert num_accepted.tolist() == [4, 4, 4]
    assert torch.equal(next_token, argmax[:, 4])  # bonus


def test_early_mismatch():
    _, _, argmax = _run_greedy(torch.full((1, 4), -2), torch.tensor([4]))
    drafts = argmax[:, :4].clone()
    drafts[0, 0] = _mismatch(argmax[0, 0].item())
    drafts[0, 2] = _mismatch(argmax[0, 2].item())  # after the first rejection: irrelevant
    num_accepted, next_token, _ = _run_greedy(drafts, torch.tensor([4]))
    assert num_accepted.tolist() == [0]
    assert next_token.tolist() == [argmax[0, 0].item()]  # recovered


def test_late_mismatch():
    _, _, argmax = _run_greedy(torch.full((1, 4), -2), torch.tensor([4]))
    drafts = argmax[:, :4].clone()
    drafts[0, 3] = _mismatch(argmax[0, 3].item())
    num_accepted, next_token, _ = _run_greedy(drafts, torch.tensor([4]))
    assert num_accepted.tolist() == [3]
    assert next_token.tolist() == [argmax[0, 3].item()]


def test_ragged_num_draft():
    num_draft = torch.tensor([3, 1, 0, 2])
    _, _, argmax = _run_greedy(torch.full((4, 3), -2), num_draft)
    drafts = argmax[:, :3].clone()
    drafts[num_draft.unsqueeze(1) <= torch.arange(3)] = -1  # padding
    drafts[3, 1] = _mismatch(argmax[3, 1].item())
    num_accepted, next_token, _ = _run_greedy(drafts, num_draft)
    assert num_accepted.tolist() == [3, 1, 0, 1]
    assert next_token.tolist() == [argmax[0, 3], argmax[1, 1], argmax[2, 0], argmax[3, 1]]


def test_padding_matching_target_not_accepted():
    _, _, argmax = _run_greedy(torch.full((1, 3), -2), torch.tensor([1]))
    num_accepted, next_token, _ = _run_greedy(argmax[:, :3].clone(), torch.tensor([1]))
    assert num_accepted.tolist() == [1]
    assert next_token.tolist() == [argmax[0, 1].item()]


def _one_hot(ids, v=V):
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


def test_zero_draft_tokens_gives_bonus():
    # row 0 greedy, row 1 sampled with p_0 one-hot at 6, row 2 sampled with k = 0 blocks
    probs = torch.stack([_one_hot([2, 4]), _one_hot([6, 1]), _one_hot([5, 5])])  # [3, 2, V]
    argmax = probs.argmax(-1)
    drafts = torch.full((3, 1), -1)
    q_ids = torch.zeros(3, 1, 2, dtype=torch.int64)
    q_probs = torch.full((3, 1, 2), 0.5)
    num_accepted, next_token = rejection_sample(
        probs, argmax, drafts, torch.zeros(3, dtype=torch.int64), q_ids, q_probs,
        torch.tensor([True, False, False]), [None] * 3,
    )  # fmt: skip
    assert num_accepted.tolist() == [0, 0, 0]
    assert next_token.tolist() == [2, 6, 5]
    # k = 0: nothing drafted at all
    num_accepted, next_token = rejection_sample(
        probs[:, :1], argmax[:, :1], drafts[:, :0], torch.zeros(3, dtype=torch.int64),
        q_ids[:, :0], q_probs[:, :0], torch.tensor([True, False, False]), [None] * 3,
    )  # fmt: skip
    assert num_accepted.tolist() == [0, 0, 0]
    assert next_token.tolist() == [2, 6, 5]


def test_mixed_greedy_and_sampled_rows():
    # row 0 greedy, matches twice then mismatches; row 1 sampled, target agrees with
    # certainty so all accepted, bonus 7; row 2 sampled, target gives the draft's token 5
    # zero probability, so it is rejected and the recovered token is the target's 3.
    probs = torch.stack([_one_hot([1, 2, 3, 4]), _one_hot([4, 4, 4, 7]), _one_hot([3, 0, 0, 0])])
    argmax = probs.argmax(-1)
    drafts = torch.tensor([[1, 2, 0], [4, 4, 4], [5, 0, 0]])
    q_ids = torch.tensor([[[0, 1]] * 3, [[4, 2]] * 3, [[5, 0]] * 3])  # [3, 3, 2]
    q_probs = torch.tensor([[[0.5, 0.5]] * 3, [[0.9, 0.1]] * 3, [[1.0, 0.0]] * 3])
    num_accepted, next_token = rejection_sample(
        probs, argmax, drafts, torch.tensor([3, 3, 3]), q_ids, q_probs,
        torch.tensor([True, False, False]), [None] * 3,
    )  # fmt: skip
    assert num_accepted.tolist() == [2, 3, 0]
    assert next_token.tolist() == [3, 7, 3]


def test_faulty_draft_token_outside_support_rejected():
    b = 2000
    probs = torch.full((b, 2, 4), 0.25)
    argmax = torch.zeros(b, 2, dtype=torch.int64)
    drafts = torch.full((b, 1), 2)  # the draft claims it sampled 2 from {0, 1}
    q_ids = torch.tensor([0, 1]).expand(b, 1, 2)
    q_probs = torch.full((b, 1, 2), 0.5)
    num_accepted, next_token = rejection_sample(
        probs, argmax, drafts, torch.ones(b, dtype=torch.int64), q_ids, q_probs,
        torch.zeros(b, dtype=torch.bool), [None] * b,
    )  # fmt: skip
    assert (num_accepted == 0).all()
    assert set(next_token.tolist()) == {2, 3}  # the residual max(0, p - q)


def test_zero_residual_falls_back_to_target():
    # q over-covers p everywhere (its mass sums past 1, as rounding can make it), so a
    # rejection leaves max(0, p - q) = 0; the recovered token then comes from p itself.
    b = 4000
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(b, 2, 4)
    q_ids = torch.tensor([0, 1]).expand(b, 1, 2)
    q_probs = torch.full((b, 1, 2), 0.6)
    num_accepted, next_token = rejection_sample(
        probs, probs.argmax(-1), torch.zeros(b, 1, dtype=torch.int64),
        torch.ones(b, dtype=torch.int64), q_ids, q_probs, torch.zeros(b, dtype=torch.bool),
        [None] * b,
    )  # fmt: skip
    rejected = next_token[num_accepted == 0]
    assert 0 < rejected.numel() < b
    assert set(rejected.tolist()) == {0, 1}


def test_all_greedy_needs_no_q_but_sampled_does():
    probs, argmax = _greedy_target(2, 2)
    with pytest.raises(ValueError, match="required"):
        rejection_sample(
            probs, argmax, argmax[:, :2], torch.tensor([2, 2]), None, None,
            torch.tensor([True, False]), [None] * 2,
        )  # fmt: skip


def test_shape_mismatch_rejected():
    probs, argmax = _greedy_target(2, 2)
    with pytest.raises(ValueError, match="draft_token_ids"):
        rejection_sample(
            probs, argmax, argmax[:, :1], torch.tensor([1, 1]), None, None,
            torch.ones(2, dtype=torch.bool), [None] * 2,
        )  # fmt: skip


def test_seeded_rows_reproducible():
    b, k, K = 6, 3, 4
    case = _random_case(b, k, K, seed=5)
    outs = []
    for _ in range(2):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
        outs.append(rejection_sample(*case, torch.zeros(b, dtype=torch.bool), gens))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --- the statistical proof ------------------------------------------------------------------

B, K_STAT, V_STAT, K_SUPPORT = 200_000, 2, 12, 6


def _random_case(b, k, support, seed, v=V_STAT, same_dist=False):
    """Random target p and sparse draft q per position, drafts sampled from q."""
    rng = np.random.default_rng(seed)
    rows = 1 if same_dist else b
    p = rng.dirichlet(np.ones(v), size=(rows, k + 1)) * 0.8 + 0.2 / v  # [rows, k+1, V]
    q_ids = np.stack(
        [[rng.choice(v, support, replace=False) for _ in range(k)] for _ in range(rows)]
    )  # [rows, k, K]
    q_probs = rng.dirichlet(np.ones(support) * 0.5, size=(rows, k))  # [rows, k, K]
    p_t = torch.tensor(p, dtype=torch.float32).expand(b, -1, -1)
    q_ids_t = torch.tensor(q_ids).expand(b, -1, -1)
    q_probs_t = torch.tensor(q_probs, dtype=torch.float32).expand(b, -1, -1)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(q_probs_t.reshape(-1, support), 1, generator=gen)  # [b*k, 1]
    drafts = q_ids_t.reshape(-1, support).gather(1, pick).view(b, k)  # [b, k]
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)  # ragged, 0..k
    return p_t, p_t.argmax(-1), drafts, num_draft, q_ids_t, q_probs_t


def _emitted(drafts, num_accepted, next_token, position):
    """Token emitted at `position` of the round, for rows that emit one there (else -1)."""
    tok = torch.where(
        num_accepted > position, drafts[:, min(position, drafts.shape[1] - 1)], next_token
    )
    return torch.where(num_accepted >= position, tok, -1)


def _pvalues():
    torch.manual_seed(1234)
    case = _random_case(B, K_STAT, K_SUPPORT, seed=42, same_dist=True)
    p, _, drafts, _, _, _ = case
    num_accepted, next_token = rejection_sample(*case, torch.zeros(B, dtype=torch.bool), [None] * B)
    pvalues = []
    for position in range(K_STAT + 1):
        tok = _emitted(drafts, num_accepted, next_token, position)
        tok = tok[tok >= 0]
        counts = torch.bincount(tok, minlength=V_STAT).double()
        expected = p[0, position].double()
        expected = expected / expected.sum() * counts.sum()
        pvalues.append(chisquare(counts.numpy(), expected.numpy()).pvalue)
    return pvalues, num_accepted


def test_emitted_tokens_follow_target_distribution():
    pvalues, num_accepted = _pvalues()
    # every path is exercised: rejections, partial and full acceptance
    assert set(num_accepted.unique().tolist()) == {0, 1, 2}
    assert min(pvalues) > 1e-3, pvalues


@pytest.mark.parametrize(
    "broken, fake",
    [
        ("_residual", lambda p, q: p),  # recovered token sampled from p, ignoring q
        ("_draft_prob", lambda ids, probs, tok: torch.ones_like(tok, dtype=torch.float32)),
    ],
    ids=["residual_ignores_q", "acceptance_ignores_q"],
)
def test_chi_square_detects_broken_sampler(monkeypatch, broken, fake):
    monkeypatch.setattr(rejection, broken, fake)
    pvalues, _ = _pvalues()
    assert pvalues[0] < 1e-10, pvalues
