"""The RL algorithms against formulas written independently here, on hand-made and random inputs: the advantages
(GRPO, ReMax with verl's reward-to-go, RAFT++, Reinforce-rej, RLOO's leave-one-out), GSPO's sequence-level ratio,
DAPO's overlong penalty and dynamic-sampling filter (each with a test that its check fails on the plausible wrong
variant), the token-level rewards, the policy loss (clipped, dual clip, vanilla = RAFT), the clamped k3, the
rollout-mismatch weights, and `rl_update` on a toy policy (rejected responses masked, not dropped; mini-batches in
order; the on-policy shortcut; TIS; GSPO's aggregation as verl's). Last: every fork (found by its fences) is identical
to its base outside its fenced algorithm regions and within its diff limit."""
import importlib
import math
import re
from pathlib import Path

import pytest
import torch

import dapo
import grpo
import gspo
import raftpp
import rloo
from common import guards, losses, model as M
from common.batch import Batch
from grpo import group_advantages
from raftpp import raft_advantages
from reinforce_rej import reject_advantages
from remax import remax_advantages
from tests import _forks

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {Path(f).stem: importlib.import_module(Path(f).stem) for f in _forks.rl_trainers()}  # found, not listed


# ---------------------------------------------------------------------------------------------- advantages
def test_grpo_mean_std_and_equal_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    std0 = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # all equal -> A = 0
    std2 = math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3)
    assert torch.allclose(a[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (std2 + 1e-6))
    # Dr. GRPO: no std normalisation
    assert torch.allclose(group_advantages(r, std_norm=False)[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert torch.equal(group_advantages(torch.zeros(1, 4), std_norm=False), torch.zeros(1, 4))


def test_remax_reward_to_go_minus_greedy_baseline():
    """A_t = r - beta sum_{t' >= t} k1_t' - b (verl's compute_remax_outcome_advantage), by explicit loops; without
    KL in the reward it is r - b on every response token (the old code's one sequence sum everywhere fails)."""
    torch.manual_seed(0)
    B, T, beta = 5, 7, 0.3
    mask = torch.zeros(B, T)
    for i, (a, e) in enumerate([(1, 7), (2, 5), (0, 3), (3, 4), (2, 7)]):
        mask[i, a:e] = 1
    r, greedy, k1 = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]]), torch.randn(B, T)
    adv = remax_advantages(losses.token_rewards(r, mask, beta * k1), greedy) * mask
    want = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                want[i, t] = r[i] - beta * sum(k1[i, u] * mask[i, u] for u in range(t, T)) - greedy[i, 0]
    assert torch.allclose(adv, want, atol=1e-6)
    assert not torch.allclose(adv, (r - beta * (k1 * mask).sum(-1) - greedy[:, 0])[:, None] * mask, atol=1e-3)
    no_kl = remax_advantages(losses.token_rewards(r, mask), greedy) * mask
    assert torch.equal(no_kl, (r - greedy[:, 0])[:, None] * mask)


def test_token_rewards_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    r = torch.tensor([2.0, -1.0])
    assert torch.equal(losses.token_rewards(r, mask), torch.tensor([[0, 0, 0, 2.0, 0], [0, -1.0, 0, 0, 0]]))
    pen = torch.full((2, 5), 0.5)
    assert torch.equal(losses.token_rewards(r, mask, pen), torch.tensor([[0, -.5, -.5, 1.5, 0], [-.5, -1.5, 0, 0, 0]]))


def test_raft_selection():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.5, 0.1], [1.1, 1.0, 0.0, 0.0]])
    a = raft_advantages(r)
    assert torch.equal(a, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]))
    # a failed best (reward <= 0) is never kept, even when it is the maximum
    assert raft_advantages(torch.tensor([[-1.0, -1.0, -2.0]])).sum() == 0


def test_reinforce_rej_rejected_groups_get_zero_advantage():
    r = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a, kept = reject_advantages(r, "pm1")
    assert torch.equal(kept, torch.tensor([[True] * 3, [False] * 3, [False] * 3, [True] * 3]))
    # rejected groups stay, with A = 0 (the old code returned +-1 there and dropped the rows instead)
    assert torch.equal(a, torch.tensor([[1.0, -1, 1], [0, 0, 0], [0, 0, 0], [-1, -1, 1]]))
    a01, kept01 = reject_advantages(r, "01")
    assert torch.equal(kept01, kept) and torch.equal(a01, torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 1]]))


# ---------------------------------------------------------------------------------------------- RLOO, GSPO, DAPO
# Each check takes the function under test, so that a test can show it fails on the plausible wrong variant.
def _check_rloo(fn):
    """A_i = r_i - mean of the OTHER n - 1 rewards, written as a loop; by hand for (1, 0, 0, 1): 1 - 1/3 = 2/3."""
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.5, 0.2, 0.9, 0.0]])
    assert torch.allclose(fn(r)[0], torch.tensor([2, -2, -2, 2]) / 3, atol=1e-6)
    assert torch.allclose(fn(r)[2], torch.tensor([-1 / 3, -1 / 3, -1 / 3, 1.0]), atol=1e-6)
    assert torch.equal(fn(r)[1], torch.zeros(4))  # all equal: A = 0 by the formula
    torch.manual_seed(3)
    for r in (r, torch.rand(6, 5), torch.randn(3, 2), torch.randint(0, 2, (8, 8)).float()):
        n = r.shape[1]
        want = torch.tensor([[r[p, i].item() - sum(r[p, j].item() for j in range(n) if j != i) / (n - 1)
                              for i in range(n)] for p in range(len(r))])
        assert torch.allclose(fn(r), want, atol=1e-5), (r, fn(r), want)


def test_rloo_leave_one_out():
    _check_rloo(rloo.rloo_advantages)


def test_rloo_check_fails_on_the_mean_including_i():
    with pytest.raises(AssertionError):
        _check_rloo(lambda r: r - r.mean(1, keepdim=True))


def _gspo_batch(seed=4):
    """3 responses of 5, 3 and 4 tokens (padded to 6), log-ratios from +-0.4, A per response; sequence 1's tokens
    move in opposite directions, so its per-token ratios differ from its sequence ratio."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(3, 6)
    for i, length in enumerate((5, 3, 4)):
        mask[i, :length] = 1
    old = -torch.rand(3, 6, generator=g) * 3
    logp = (old + (torch.rand(3, 6, generator=g) - 0.5) * 0.8) * mask
    logp[1, :3] = old[1, :3] + torch.tensor([0.3, -0.25, 0.02])
    adv = torch.tensor([[1.5], [-0.7], [0.4]]).expand(3, 6) * mask
    return logp, old * mask, adv, mask


def _check_gspo(fn, lo=0.05, hi=0.1):
    """The sequence ratio s_i = exp(mean_t log(pi / pi_old)) in max(-A s_i, -A clip(s_i)) on every token of response
    i (python floats), and the gradient of seq-mean-token-mean over the tokens equal to the gradient of the paper's
    sequence objective 1/G sum_i max(-A_i s_i, -A_i clip(s_i)) with s_i as a function of the log-probs."""
    logp, old, adv, mask = _gspo_batch()
    loss, clipped = fn(logp, old, adv, mask, lo, hi)
    for i in range(3):
        toks = [t for t in range(6) if mask[i, t]]
        s = math.exp(sum(logp[i, t].item() - old[i, t].item() for t in toks) / len(toks))
        a = adv[i, toks[0]].item()
        want = max(-a * s, -a * min(max(s, 1 - lo), 1 + hi))
        for t in toks:
            assert abs(loss[i, t].item() - want) < 1e-5, (i, t, loss[i, t].item(), want)
            assert clipped[i, t].item() == float(-a * min(max(s, 1 - lo), 1 + hi) > -a * s)
    x = logp.clone().requires_grad_(True)
    per_seq = (fn(x, old, adv, mask, lo, hi)[0] * mask).sum(-1) / mask.sum(-1)
    per_seq.mean().backward()
    y = logp.clone().requires_grad_(True)
    s = torch.exp(((y - old) * mask).sum(-1) / mask.sum(-1))
    a = adv[:, 0]
    torch.maximum(-a * s, -a * s.clamp(1 - lo, 1 + hi)).mean().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6), (x.grad, y.grad)
    assert clipped.sum() > 0 and (clipped * mask).sum() < mask.sum()  # the batch has clipped and unclipped responses


def test_gspo_sequence_ratio_token_form():
    _check_gspo(gspo.gspo_policy_loss)
    logp, old, adv, mask = _gspo_batch()
    loss, _ = gspo.gspo_policy_loss(logp + 50 * mask, old, adv, mask, 0.2, 1e9)  # log s = 50: clamped at 10 (verl)
    assert torch.allclose(loss[0, 0], -adv[0, 0] * math.exp(10.0))


def test_gspo_check_fails_on_the_ratio_per_token():
    with pytest.raises(AssertionError):
        _check_gspo(lambda logp, old, adv, mask, lo, hi: losses.policy_loss(logp, old, adv, lo, hi))


def _check_overlong(fn):
    """DAPO's R_len (paper eq. 13, verl's DAPO reward manager) x factor: 0 up to L_max - L_buf tokens, then
    linear down to -factor at L_max. L_max 64, buffer 16: 48 tokens cost nothing, 49 cost 1/16, 64 cost 1."""
    L = torch.tensor([1.0, 30.0, 47.0, 48.0, 49.0, 56.0, 63.0, 64.0])
    assert torch.allclose(fn(L, 64, 16, 1.0), torch.tensor([0, 0, 0, 0, -1 / 16, -0.5, -15 / 16, -1.0]))
    assert torch.allclose(fn(L, 64, 16, 0.5), 0.5 * fn(L, 64, 16, 1.0))
    torch.manual_seed(5)
    for lmax, buf, factor in ((64, 16, 1.0), (3072, 512, 0.7), (20, 20, 2.0), (10, 1, 1.0)):
        L = torch.randint(1, lmax + 1, (40,)).float()
        want = [0.0 if x <= lmax - buf else ((lmax - buf) - x) / buf * factor for x in L.tolist()]
        assert torch.allclose(fn(L, lmax, buf, factor), torch.tensor(want), atol=1e-6)
    assert torch.equal(fn(L, 64, 0, 1.0), torch.zeros_like(L))  # no buffer, no shaping


def test_dapo_overlong_penalty():
    _check_overlong(dapo.overlong_penalty)


@pytest.mark.parametrize("wrong", ["sign", "edge"])
def test_dapo_overlong_check_fails_on_a_wrong_sign_or_buffer_edge(wrong):
    right = dapo.overlong_penalty
    variant = {"sign": lambda L, m, b, f: -right(L, m, b, f),  # a bonus instead of a penalty
               "edge": lambda L, m, b, f: right(L + 1, m, b, f)}[wrong]  # the buffer starts one token early
    with pytest.raises(AssertionError):
        _check_overlong(variant)


def _check_keep(fn):
    """Dynamic sampling keeps exactly the groups whose verifier scores are not all equal (verl: std > 0), and a
    group of one response (verl keeps it)."""
    r = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1], [0.5, 0.5, 0.5, 0.5], [0.2, 0.5, 0.5, 0.5]])
    assert fn(r).tolist() == [True, False, False, True, False, True]
    torch.manual_seed(6)
    r = torch.randint(0, 2, (64, 3)).float()
    assert fn(r).tolist() == [len(set(row)) > 1 for row in r.tolist()]
    assert fn(torch.tensor([[1.0], [0.0]])).tolist() == [True, True]


def test_dapo_keep_groups():
    _check_keep(dapo.keep_groups)


def test_dapo_keep_check_fails_when_an_all_equal_group_is_kept():
    with pytest.raises(AssertionError):
        _check_keep(lambda r: torch.ones(len(r), dtype=torch.bool))
    with pytest.raises(AssertionError):  # "all correct" is not "all equal": all-wrong groups carry no gradient either
        _check_keep(lambda r: (r < 1).any(1))


def test_fork_defaults_change_without_editing_shared_lines():
    """A fork declares a shared field again in its fenced block of defaults: the field keeps its place and its help,
    with the algorithm's default (DAPO's clip-higher, GSPO's clip range and aggregation); the other trainers keep
    the shared defaults."""
    import dataclasses
    assert (dapo.Args().clip_eps_low, dapo.Args().clip_eps_high, dapo.Args().kl_coef) == (0.2, 0.28, 0.0)
    assert (gspo.Args().clip_eps_low, gspo.Args().clip_eps_high, gspo.Args().loss_agg) == (3e-4, 4e-4,
                                                                                           "seq-mean-token-mean")
    assert (rloo.Args().clip_eps_high, grpo.Args().clip_eps_high, grpo.Args().loss_agg) == (0.2, 0.2, "token-mean")
    ours, theirs = [f.name for f in dataclasses.fields(grpo.Args)], [f.name for f in dataclasses.fields(gspo.Args)]
    assert [f for f in theirs if f in ours] == [f for f in ours if f in theirs]  # same places


# ---------------------------------------------------------------------------------------------- losses
def _clipped(logp, old, adv, lo, hi, c):  # written out per element, independently of losses.policy_loss
    out = torch.empty_like(logp)
    for idx in range(logp.numel()):
        s, a = math.exp(logp.view(-1)[idx] - old.view(-1)[idx]), float(adv.view(-1)[idx])
        v = max(-a * s, -a * min(max(s, 1 - lo), 1 + hi))
        out.view(-1)[idx] = min(v, -c * a) if (c > 1 and a < 0) else v
    return out


@pytest.mark.parametrize("lo,hi,c", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.2, 0.2, 3.0)])
def test_policy_loss_clipped_and_dual_clip(lo, hi, c):
    torch.manual_seed(1)
    logp, old, adv = torch.randn(4, 6) * 0.5 - 1, torch.randn(4, 6) * 0.5 - 1, torch.randn(4, 6) * 2
    loss, _ = losses.policy_loss(logp, old, adv, lo, hi, c)
    assert torch.allclose(loss, _clipped(logp, old, adv, lo, hi, c), atol=1e-6)


def test_vanilla_loss_is_minus_a_log_pi():
    """--no-clip (RAFT as released): -A log pi, whose gradient is -A at every ratio; -A s (the old no-clip) has
    the gradient -A s and differs as soon as s != 1."""
    torch.manual_seed(2)
    logp = (torch.randn(3, 5) - 1).requires_grad_(True)
    old, adv = logp.detach() + torch.randn(3, 5) * 0.3, torch.rand(3, 5)
    loss, clipped = losses.policy_loss(logp, old, adv, clip=False)
    assert torch.allclose(loss, -adv * logp) and not clipped.any()
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)
    assert not torch.allclose(loss, -adv * torch.exp(logp - old), atol=1e-3)


def test_k3_clamped_at_10_in_value_and_gradient():
    logp = torch.tensor([-1.0, -5.0, -0.1, -12.0, -3.0]).requires_grad_(True)
    ref = torch.tensor([-1.5, -0.5, -0.1, -1.0, -30.0])
    k3 = losses.kl(logp, ref, "k3")
    d = (ref - logp.detach()).clamp(-20, 20)
    want = [min(math.exp(x) - x - 1, 10.0) for x in d.tolist()]
    assert torch.allclose(k3, torch.tensor(want), atol=1e-5)
    assert k3[1] == 10.0 and k3[3] == 10.0  # e^4.5 - 5.5 and e^11 - 12 are far above 10: clamped
    k3.sum().backward()
    g = [0.0 if w == 10.0 else 1 - math.exp(x) for w, x in zip(want, d.tolist())]  # d k3 / d logp = 1 - e^delta
    assert torch.allclose(logp.grad, torch.tensor(g), atol=1e-5)
    assert torch.allclose(losses.kl(logp, ref, "k1"), -d) and torch.allclose(losses.kl(logp, ref, "k2"), 0.5 * d ** 2)


# ---------------------------------------------------------------------------------------------- rl_update
class Toy(torch.nn.Module):
    """The trainers' policy interface, policy(ids, attn, head_fn) = head_fn(hidden, lm_head weight), on an
    embedding table as the 'decoder body'."""

    def __init__(self, V=11, D=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, D, generator=g))
        self.w = torch.nn.Parameter(torch.randn(V, D, generator=g) * 0.5)

    def forward(self, ids, attn, head):
        return head(self.emb[ids], self.w)


def _batch(B=6, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.full((B, T), -100)
    for i in range(B):
        start = 1 + i % 3
        targets[i, start - 1:T - 1 - i % 2] = ids[i, start:T - i % 2]
    mask = (targets != -100).float()
    adv = torch.where(torch.arange(B)[:, None] % 3 == 0, 0.0, torch.randn(B, 1, generator=g)).expand(B, T) * mask
    return dict(ids=ids, attn=torch.ones_like(ids), targets=targets, mask=mask, adv=adv,
                in_loss=torch.ones(B, dtype=torch.bool), engine_logp=torch.zeros_like(mask), old_logp=None,
                ref_logp=None)


def _reference_loss(policy, b, rows, args, loss_rows, old_logp):
    """The spec, from full logits: token-mean over the loss rows' response tokens of
    w pg(s, A) - c_H H + beta k3 (clamped at 10), s = pi / pi_old, w = min(pi_old / pi_engine, C) with --tis-cap C
    (only the policy term), else 1."""
    logits = (policy.emb[b["ids"][rows]] @ policy.w.T) / args.temperature
    logp_all = logits.log_softmax(-1)
    tgt = b["targets"][rows]
    logp = logp_all.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = b["mask"][rows] * loss_rows[rows, None]
    s = torch.exp(logp - old_logp[rows])
    adv = b["adv"][rows]
    pg = torch.maximum(-adv * s, -adv * s.clamp(1 - args.clip_eps_low, 1 + args.clip_eps_high))
    delta = b["ref_logp"][rows] - logp
    k3 = (torch.exp(delta) - delta - 1).clamp(max=10)
    if args.tis_cap > 0:
        pg = pg * torch.minimum(torch.exp(old_logp[rows] - b["engine_logp"][rows]), torch.tensor(args.tis_cap))
    l_t = pg - args.entropy_coef * ent + args.kl_coef * k3
    return (l_t * m).sum() / m.sum()


def _args(module, **kw):
    base = dict(temperature=0.9, entropy_coef=0.05, kl_coef=0.2, kl_in="loss", kl_estimator="k3", grad_clip=1e9,
                micro_batch_size=2, mini_batches=1, ppo_epochs=1, dual_clip=0.0)
    fields = {f.name for f in __import__("dataclasses").fields(module.Args)}  # GSPO has no dual clip
    return module.Args(**{k: v for k, v in (base | kw).items() if k in fields})


def _run_update(module, args, b, policy, lr=0.1):
    """module.rl_update on a copy of batch b with plain SGD; returns the pi_old it used."""
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    batch = Batch(**{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
    return module.rl_update(policy, opt, guards.BadStepGuard(5), batch, args)[1]


def _sgd_reference(b, args, loss_rows, chunks, old_logp, lr=0.1, seed=0):
    policy = Toy(seed=seed)
    for rows in chunks:
        policy.zero_grad()
        _reference_loss(policy, b, rows, args, loss_rows, old_logp).backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= lr * p.grad
    return policy


def _logp(policy, b, temperature):
    with torch.no_grad():
        return policy(b["ids"], b["attn"], M.logprob_head(b["targets"], temperature, with_entropy=False))[0]


@pytest.mark.parametrize("drop", [False, True])
def test_rejected_responses_are_masked_not_dropped(drop):
    """RAFT++ / Reinforce-rej as released: rejected responses (A = 0) stay in the token-mean denominator and
    keep their entropy and KL terms; --drop-rejected removes them from the loss and its denominator."""
    b = _batch()
    b["ref_logp"] = _logp(Toy(seed=7), b, 0.9)
    kept = (b["adv"] != 0).any(-1)
    b["in_loss"] = kept if drop else torch.ones_like(kept)
    args = _args(raftpp, drop_rejected=drop)
    policy = Toy()
    old = _logp(policy, b, args.temperature)
    _run_update(raftpp, args, b, policy)
    ref = _sgd_reference(b, args, b["in_loss"], [torch.arange(6)], old)
    other = _sgd_reference(b, args, kept if not drop else torch.ones_like(kept), [torch.arange(6)], old)
    for p, q, o in zip(policy.parameters(), ref.parameters(), other.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
        assert not torch.allclose(p, o, atol=1e-4)  # the other convention gives a different update


def test_mini_batches_in_order_one_epoch_and_off_policy_ratios():
    """--mini-batches 3: three optimizer steps on rows [0, 2), [2, 4), [4, 6) in order, pi_old fixed from the
    rollout (so the 2nd and 3rd see ratios s != 1 and the clip); one epoch by default in every trainer."""
    b = _batch()
    b["ref_logp"] = _logp(Toy(seed=7), b, 0.9)
    args = _args(grpo, mini_batches=3)
    policy = Toy()
    b["old_logp"] = _logp(policy, b, args.temperature)
    old = _run_update(grpo, args, b, policy, lr=0.5)
    ref = _sgd_reference(b, args, b["in_loss"], torch.arange(6).split(2), b["old_logp"], lr=0.5)
    for p, q in zip(policy.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    shuffled = _sgd_reference(b, args, b["in_loss"], [torch.tensor([4, 1]), torch.tensor([0, 5]), torch.tensor([3, 2])],
                              b["old_logp"], lr=0.5)
    assert not all(torch.allclose(p, q, atol=1e-5) for p, q in zip(policy.parameters(), shuffled.parameters()))
    assert torch.equal(old, b["old_logp"])  # off-policy, pi_old is the rollout's
    for module in TRAINERS.values():
        a = module.Args()
        assert a.ppo_epochs == 1 and not a.shuffle and a.mini_batches >= 1


def test_on_policy_shortcut_equals_a_separate_old_logprob_pass():
    """One mini-batch, one epoch: pi_old is the current policy, so the update's own (detached) forward gives the
    same update as a separate no-grad pass, one forward fewer; rl_update returns it (for the log)."""
    b = _batch()
    b["ref_logp"] = _logp(Toy(seed=7), b, 0.9)
    args = _args(grpo)
    p1, p2 = Toy(), Toy()
    separate = dict(b, old_logp=_logp(p2, b, args.temperature))
    old = _run_update(grpo, args, b, p1)  # old_logp None
    _run_update(grpo, args, separate, p2)
    for p, q in zip(p1.parameters(), p2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert torch.allclose(old, separate["old_logp"], atol=1e-6)


def test_raft_no_clip_update_is_sft_on_the_selected():
    """raftpp --no-clip: the gradient of token-mean(-A log pi) (+ the shared entropy/KL terms), at any ratio."""
    b = _batch()
    b["ref_logp"] = _logp(Toy(seed=7), b, 0.9)
    b["adv"] = (b["adv"] != 0).float() * b["mask"]  # RAFT: A = 1 on the selected
    args = _args(raftpp, no_clip=True, entropy_coef=0.0, kl_coef=0.0)
    policy = Toy()
    b["old_logp"] = _logp(policy, b, args.temperature) + 0.7  # far from 1: a ratio would matter
    _run_update(raftpp, args, b, policy)
    ref = Toy()
    logits = (ref.emb[b["ids"]] @ ref.w.T) / args.temperature
    logp = logits.log_softmax(-1).gather(-1, b["targets"].clamp(min=0)[..., None])[..., 0]
    ((-b["adv"] * logp * b["mask"]).sum() / b["mask"].sum()).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(policy.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_tis_weights_by_hand():
    """w = min(exp(log pi_old - log pi_engine), C), no gradient, the log-ratio clamped at +-20 first (verl)."""
    gap = torch.tensor([0.0, math.log(1.5), math.log(3.0), -1.0, 30.0, -30.0])
    old = torch.full((6,), -2.0, requires_grad=True)
    w = losses.tis_weights(old, old.detach() - gap, 2.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.5, 2.0, math.exp(-1), 2.0, math.exp(-20)]), atol=1e-6)
    assert not w.requires_grad


@pytest.mark.parametrize("on_policy", [True, False])
def test_tis_reweights_the_policy_loss_only(on_policy):
    """--tis-cap C: each token's policy loss times min(pi_old / pi_engine, C), the entropy and KL terms unweighted.
    On-policy (one mini-batch, one epoch) pi_old is the update's own detached forward, so the weights are
    min(pi_theta / pi_engine, C) at the current weights: the same update as with a separate pi_old pass. Without
    the cap (0) the update differs: the engine's log-probs here are off by up to +-0.9."""
    b = _batch()
    b["ref_logp"] = _logp(Toy(seed=7), b, 0.9)
    args = _args(grpo, tis_cap=1.3, mini_batches=1 if on_policy else 3)
    old = _logp(Toy(), b, args.temperature)
    g = torch.Generator().manual_seed(8)
    b["engine_logp"] = (old + (torch.rand(old.shape, generator=g) - 0.5) * 1.8) * b["mask"]
    b["old_logp"] = None if on_policy else old
    policy = Toy()
    _run_update(grpo, args, b, policy, lr=0.5)
    chunks = [torch.arange(6)] if on_policy else torch.arange(6).split(2)
    ref = _sgd_reference(b, args, b["in_loss"], chunks, old, lr=0.5)
    plain = _sgd_reference(b, _args(grpo, tis_cap=0.0, mini_batches=args.mini_batches), b["in_loss"], chunks, old, lr=0.5)
    for p, q, o in zip(policy.parameters(), ref.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
        assert not torch.allclose(p, o, atol=1e-4)


def test_gspo_update_is_the_sequence_objective_aggregated_like_verl():
    """gspo.rl_update with its defaults (seq-mean-token-mean) over 3 mini-batches equals SGD on the paper's and
    verl's GSPO loss written per sequence: each mini-batch's mean over its G sequences of max(-A_i s_i, -A_i clip(s_i))
    (verl's agg_loss seq-mean-token-mean divides by the global number of sequences), s_i = exp(mean_t log(pi/pi_old)),
    pi_old fixed from the rollout, so the later mini-batches see s != 1 and the clip. The token-mean of the same
    losses (GRPO's default aggregation) is another update."""
    b = _batch()
    args = _args(gspo, mini_batches=3, entropy_coef=0.0, kl_coef=0.0, clip_eps_low=0.02, clip_eps_high=0.03)
    assert args.loss_agg == "seq-mean-token-mean"
    policy = Toy()
    b["old_logp"] = _logp(policy, b, args.temperature)
    _run_update(gspo, args, b, policy, lr=0.5)

    def sgd(per_seq_mean):
        ref = Toy()
        for rows in torch.arange(6).split(2):
            ref.zero_grad()
            logits = (ref.emb[b["ids"][rows]] @ ref.w.T) / args.temperature
            logp = logits.log_softmax(-1).gather(-1, b["targets"][rows].clamp(min=0)[..., None])[..., 0]
            m, a = b["mask"][rows], b["adv"][rows].sum(-1) / b["mask"][rows].sum(-1)  # A_i: constant per response
            s = torch.exp(((logp - b["old_logp"][rows]) * m).sum(-1) / m.sum(-1))
            loss_i = torch.maximum(-a * s, -a * s.clamp(1 - 0.02, 1 + 0.03))
            (loss_i.mean() if per_seq_mean else (loss_i * m.sum(-1)).sum() / m.sum()).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= 0.5 * p.grad
        return ref

    for p, q, o in zip(policy.parameters(), sgd(True).parameters(), sgd(False).parameters()):
        assert torch.allclose(p, q, atol=1e-6)
        assert not torch.allclose(p, o, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the forks
@pytest.mark.parametrize("fork", [f for f in _forks.fenced() if f not in _forks.BASES.values()])
def test_forks_identical_to_their_base_outside_the_algorithm_fences(fork):
    """Every fenced script equals grpo.py (an RL trainer) or gem_sft.py outside its fences, and `diff grpo.py X`
    stays the papers' difference: at most 30 changed lines (DAPO, with dynamic sampling and overlong shaping: 45)."""
    _forks.check_fork(fork)
    assert _outside("grpo.py").count(_forks.BEGIN) >= 8  # the hooks a fork fills (docstring, flags, defaults, ...)


def _outside(name):
    return _forks.outside_fences(ROOT / name)


def test_a_new_fork_is_found_and_held_to_the_rule(tmp_path):
    """Discovery, not a list: a copy of grpo.py under a new name is an RL trainer the tests check and run; edited
    inside a fence it still passes, edited outside one it fails, and so does a fence with text after it."""
    text = (ROOT / "grpo.py").read_text()
    (tmp_path / "grpo.py").write_text(text)
    (tmp_path / "gem_sft.py").write_text((ROOT / "gem_sft.py").read_text())
    (tmp_path / "helper.py").write_text("x = 1\n")  # no fences: not a trainer
    (tmp_path / "mything.py").write_text(text.replace('"""GRPO (Shao', '"""MyThing, after GRPO (Shao', 1))
    assert _forks.fenced(tmp_path) == ["gem_sft.py", "grpo.py", "mything.py"]
    assert _forks.rl_trainers(tmp_path) == ["grpo.py", "mything.py"]
    _forks.check_fork("mything.py", tmp_path)
    (tmp_path / "mything.py").write_text(text.replace("    lr: float = 1e-4", "    lr: float = 3e-4", 1))
    with pytest.raises(AssertionError, match="outside the fences"):
        _forks.check_fork("mything.py", tmp_path)
    (tmp_path / "mything.py").write_text(text.replace("    # --- end algorithm ---", "    # --- end algorithm --- x", 1))
    with pytest.raises(AssertionError, match="fence"):
        _forks.check_fork("mything.py", tmp_path)


def test_trainer_names_come_from_the_file():
    for name, module in TRAINERS.items():
        assert module.NAME == name
        assert not re.search(r'"runs/(%s)"|\[(%s)\]' % ("|".join(TRAINERS), "|".join(TRAINERS)),
                             (ROOT / f"{name}.py").read_text())
