"""The four RL algorithms against formulas written independently here, on hand-made and random inputs:
the advantages (GRPO, ReMax with verl's reward-to-go, RAFT++, Reinforce-rej), the token-level rewards, the
policy loss (clipped, dual clip, vanilla = RAFT), the clamped k3, and `rl_update` on a toy policy (rejected
responses masked, not dropped; mini-batches in order; the on-policy shortcut). Last: the four trainers are
identical outside their fenced algorithm regions."""
import math
import re
from pathlib import Path

import pytest
import torch

import grpo
import raftpp
import reinforce_rej
import remax
from common import checkpoint, losses, model as M
from common.batch import Batch
from grpo import group_advantages
from raftpp import raft_advantages
from reinforce_rej import reject_advantages
from remax import remax_advantages

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"grpo": grpo, "remax": remax, "raftpp": raftpp, "reinforce_rej": reinforce_rej}


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
    pg(s, A) - c_H H + beta k3 (clamped at 10), s = pi / pi_old."""
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
    l_t = pg - args.entropy_coef * ent + args.kl_coef * k3
    return (l_t * m).sum() / m.sum()


def _args(module, **kw):
    base = dict(temperature=0.9, entropy_coef=0.05, kl_coef=0.2, kl_in="loss", kl_estimator="k3", grad_clip=1e9,
                micro_batch_size=2, mini_batches=1, ppo_epochs=1, dual_clip=0.0)
    return module.Args(**(base | kw))


def _run_update(module, args, b, policy, lr=0.1):
    """module.rl_update on a copy of batch b with plain SGD; returns the pi_old it used."""
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    batch = Batch(**{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
    return module.rl_update(policy, opt, checkpoint.BadStepGuard(5), batch, args)[1]


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


# ---------------------------------------------------------------------------------------------- the forks
BEGIN, END = "# --- algorithm ---", "# --- end algorithm ---"


def _outside_fences(path):
    lines, out, inside = path.read_text().splitlines(), [], False
    for line in lines:
        if line.strip() == BEGIN:
            assert not inside, f"{path.name}: nested fence"
            inside = True
            out.append(BEGIN)
        elif line.strip() == END:
            assert inside, f"{path.name}: an end fence without a start"
            inside = False
        elif not inside:
            out.append(line)
    assert not inside, f"{path.name}: unclosed fence"
    return out


@pytest.mark.parametrize("fork", ["remax.py", "raftpp.py", "reinforce_rej.py"])
def test_forks_identical_to_grpo_outside_the_algorithm_fences(fork):
    base, other = _outside_fences(ROOT / "grpo.py"), _outside_fences(ROOT / fork)
    assert other == base, next(f"{fork} line differs from grpo.py: {a!r} vs {b!r}" for a, b in zip(other, base) if a != b) \
        if len(other) == len(base) else f"{fork}: {len(other)} shared lines vs {len(base)}"
    assert base.count(BEGIN) >= 5
    changed = sum(1 for line in __import__("difflib").ndiff((ROOT / "grpo.py").read_text().splitlines(),
                                                               (ROOT / fork).read_text().splitlines()) if line[:2] in ("- ", "+ "))
    assert changed <= 30, f"diff grpo.py {fork}: {changed} changed lines"


def test_trainer_names_come_from_the_file():
    for name, module in TRAINERS.items():
        assert module.NAME == name
        assert not re.search(r'"runs/(grpo|remax|raftpp|reinforce_rej)"|\[(grpo|remax|raftpp|reinforce_rej)\]',
                             (ROOT / f"{name}.py").read_text())
