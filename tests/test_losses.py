"""Clipped policy loss, every aggregation mode and the KL estimators against hand computations."""
import math

import pytest
import torch

from common import losses

# a fixed batch: 2 sequences x 4 positions; sequence 0 has 3 response tokens, sequence 1 has 2
LOGP = torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-0.2, -3.0, 0.0, 0.0]])
OLD = torch.tensor([[-1.2, -0.5, -1.0, 0.0], [-0.2, -2.5, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
ADV = torch.tensor([[2.0], [-1.0]])


def _hand_policy_loss(eps_low=0.2, eps_high=0.2, dual=0.0):
    out = []
    for i in range(2):
        row = []
        for t in range(4):
            s, a = math.exp(LOGP[i, t] - OLD[i, t]), ADV[i, 0].item()
            l = max(-a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high))
            if dual and a < 0:
                l = min(l, -dual * a)
            row.append(l)
        out.append(row)
    return torch.tensor(out)


def test_clipped_policy_loss_by_hand():
    loss, clipped = losses.policy_loss(LOGP, OLD, ADV)
    assert torch.allclose(loss, _hand_policy_loss(), atol=1e-6)
    # seq 0, t 0: s = e^0.2 = 1.22 > 1.2 with A > 0 -> clipped; t 2: s = e^-1 with A > 0 -> not clipped
    assert clipped[0, 0] == 1 and clipped[0, 2] == 0
    # seq 1, t 1: s = e^-0.5 = 0.61 < 0.8 with A < 0 -> clipped at 0.8 (loss 0.8 instead of 0.61)
    assert clipped[1, 1] == 1 and abs(loss[1, 1] - 0.8) < 1e-6
    hi, _ = losses.policy_loss(LOGP, OLD, ADV, eps_high=0.28)  # clip-higher lets s reach 1.28
    assert abs(hi[0, 0] + 2 * math.exp(0.2)) < 1e-6


def test_dual_clip_bounds_negative_advantages():
    logp = torch.tensor([[2.0]])  # s = e^2 = 7.4 with A = -1: loss 7.4 -> bounded by 3
    loss, clipped = losses.policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), dual_clip=3.0)
    assert abs(loss.item() - 3.0) < 1e-6 and clipped.item() == 1
    loss, _ = losses.policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]))
    assert abs(loss.item() - math.exp(2)) < 1e-5
    loss, _ = losses.policy_loss(LOGP, OLD, ADV, dual_clip=3.0)
    assert torch.allclose(loss, _hand_policy_loss(dual=3.0), atol=1e-6)


def test_no_clip_is_the_vanilla_policy_gradient():
    loss, clipped = losses.policy_loss(LOGP, OLD, ADV, clip=False)  # RAFT / Minimal-RL's vanilla: -A log pi
    assert torch.allclose(loss, -ADV * LOGP) and clipped.sum() == 0


def test_aggregation_modes_by_hand():
    l = _hand_policy_loss()
    per_seq = [(l[0] * MASK[0]).sum().item(), (l[1] * MASK[1]).sum().item()]
    agg = lambda mode: losses.aggregate(l, MASK, mode, n_tokens=5, n_seqs=2, max_len=4).item()
    assert agg("token-mean") == pytest.approx((per_seq[0] + per_seq[1]) / 5)
    assert agg("seq-mean-token-mean") == pytest.approx((per_seq[0] / 3 + per_seq[1] / 2) / 2)
    assert agg("seq-mean-token-sum") == pytest.approx((per_seq[0] + per_seq[1]) / 2)
    assert agg("seq-mean-token-sum-norm") == pytest.approx((per_seq[0] + per_seq[1]) / (2 * 4))
    with pytest.raises(ValueError, match="--loss-agg"):
        agg("mean")


def test_micro_batches_sum_to_the_global_mean():
    """Denominators are global: splitting the batch into micro-batches (or ranks) and summing the
    pieces gives exactly the full-batch value, for every mode."""
    torch.manual_seed(0)
    l, m = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    m[:, 0] = 1
    for mode in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        full = losses.aggregate(l, m, mode, m.sum().item(), 6, 5)
        parts = sum(losses.aggregate(l[i:i + 2], m[i:i + 2], mode, m.sum().item(), 6, 5) for i in (0, 2, 4))
        assert torch.allclose(full, parts, atol=1e-6), mode


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logp
    assert torch.allclose(losses.kl(logp, ref, "k1"), -d)
    assert torch.allclose(losses.kl(logp, ref, "k2"), 0.5 * d ** 2)
    assert torch.allclose(losses.kl(logp, ref, "k3"), torch.exp(d) - d - 1)
    assert (losses.kl(logp, ref, "k3") >= 0).all() and losses.kl(logp, ref, "k3")[2] == 0
    big = losses.kl(torch.tensor([0.0]), torch.tensor([100.0]), "k3")  # k3 clamped at 10, as verl
    assert big.item() == 10.0
    with pytest.raises(ValueError, match="--kl-estimator"):
        losses.kl(logp, ref, "k4")
