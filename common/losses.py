"""Losses shared by the RL trainers: the clipped policy loss, the rollout-mismatch weights, loss aggregation over
the global batch and the KL estimators. All per-token tensors are [B, T] with a 0/1 response mask."""
from typing import Literal

import torch

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]  # see aggregate


def policy_loss(logp, old_logp, adv, eps_low=0.2, eps_high=0.2, dual_clip=0.0, clip=True):
    """PPO-style clipped surrogate per token: max(-A s, -A clip(s, 1-eps_low, 1+eps_high)), s = e^(logp-old).
    dual_clip = c > 1 additionally bounds the loss of negative-advantage tokens by -c A (Ye et al. 2020),
    so one huge ratio on a bad sample cannot dominate. clip=False is the vanilla policy gradient -A log pi
    (Minimal-RL's "vanilla" loss, i.e. RAFT: SFT on the selected responses); it has the gradient of -A s
    only at s = 1. Returns (loss per token, 1.0 where the clip was active)."""
    if not clip:
        return -adv * logp, torch.zeros_like(logp)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).float()
    if dual_clip > 1.0:
        bounded = torch.minimum(loss, -adv * dual_clip)
        loss = torch.where(adv < 0, bounded, loss)
        was_clipped = torch.where((adv < 0) & (loss < torch.maximum(unclipped, clipped)), 1.0, was_clipped)
    return loss, was_clipped


def tis_weights(old_logp, engine_logp, cap):
    """Truncated importance sampling for the rollout mismatch (Yao et al. 2025; verl's token-level rollout correction,
    TRL's vllm_importance_sampling_correction). The engine samples from its own copy of the weights (another dtype,
    other kernels), pi_engine != pi_old, so the clipped loss, written for samples of pi_old, is reweighted per token by
        w_t = min(pi_old(a_t) / pi_engine(a_t), cap) = min(exp(log pi_old - log pi_engine), cap),   no gradient,
    with the log-ratio clamped to +-20 (verl's safety bound) first. [B, T] -> [B, T]; 1 where both log-probs are 0
    (off the response). Multiplies the policy loss only: the KL and entropy terms are not samples of pi_old."""
    return torch.exp((old_logp - engine_logp).clamp(-20, 20)).clamp(max=cap).detach()


def aggregate(loss, mask, mode, n_tokens, n_seqs, max_len=None):
    """Sum of this micro-batch's share of the GLOBAL batch loss, so that summing over micro-batches and
    ranks gives the mean over the whole batch. n_tokens / n_seqs are global counts (all ranks, all
    micro-batches of the optimizer step), never per micro-batch.
      token-mean               sum_{i,t} l m / n_tokens                       (default)
      seq-mean-token-mean      1/n_seqs sum_i (sum_t l m / sum_t m)           (original GRPO)
      seq-mean-token-sum       1/n_seqs sum_i sum_t l m                       (ReMax paper)
      seq-mean-token-sum-norm  1/n_seqs sum_i sum_t l m / max_len             (Dr. GRPO: constant length)"""
    per_seq = (loss * mask).sum(-1)
    if mode == "token-mean":
        return per_seq.sum() / max(n_tokens, 1)
    if mode == "seq-mean-token-mean":
        return (per_seq / mask.sum(-1).clamp(min=1)).sum() / max(n_seqs, 1)
    if mode == "seq-mean-token-sum":
        return per_seq.sum() / max(n_seqs, 1)
    if mode == "seq-mean-token-sum-norm":
        return per_seq.sum() / (max(n_seqs, 1) * max_len)
    raise ValueError(f"--loss-agg {mode!r}: expected token-mean, seq-mean-token-mean, seq-mean-token-sum "
                     f"or seq-mean-token-sum-norm")


def kl(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1/k2/k3),
    with delta = log pi_ref - log pi_theta clamped to +-20 so that one outlier cannot overflow.
      k1 = -delta  (unbiased, can be negative)   k2 = delta^2 / 2   k3 = min(e^delta - delta - 1, 10)
    k3 (unbiased, >= 0) is clamped at 10 in value and gradient, as verl's and Minimal-RL's low_var_kl: a token
    whose reference log-prob is far above the policy's (delta > ~2.5) then adds a constant and no gradient."""
    delta = (ref_logp - logp).clamp(-20, 20)
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta ** 2
    if estimator == "k3":
        return (torch.exp(delta) - delta - 1).clamp(max=10.0)
    raise ValueError(f"--kl-estimator {estimator!r}: expected k1, k2 or k3")


def token_rewards(r, mask, kl_penalty=None):
    """Token-level rewards [B, T] as verl builds them: the outcome reward r [B] on each response's last token
    (mask [B, T], 1 on response tokens), minus kl_penalty [B, T] (beta k1_t with --kl-in reward) on every
    response token. Summed over t it is r - beta sum_t k1_t; summed from t on, the reward-to-go."""
    last = mask.cumsum(-1).argmax(-1, keepdim=True)  # the first index of the maximum = the last response token
    out = torch.zeros_like(mask).scatter(1, last, r.reshape(-1, 1).to(mask.dtype))
    return out if kl_penalty is None else out - kl_penalty * mask
