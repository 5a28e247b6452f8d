"""The RL step's batch: what every RL trainer's step 2 builds from the kept groups, what `rl_update` trains on and
what `metrics.rl_step_metrics` logs. Built once per step, on the training device, and never changed afterwards.

Rows are this rank's responses, prompt-major (the n responses of prompt i are rows i*n .. i*n + n-1); per-token
tensors are [B, T], T = the longest prompt + response of the batch, and hold 0 off the response tokens."""
from dataclasses import dataclass

import torch

from common.rollout import Sample


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor                # [B, T] prompt + response token ids, right-padded
    attn: torch.Tensor               # [B, T] 1 on real tokens, 0 on padding
    targets: torch.Tensor            # [B, T] the next token where it is a response token, -100 elsewhere
    mask: torch.Tensor               # [B, T] float: 1 where a response token is predicted (targets != -100)
    adv: torch.Tensor                # [B, T] the algorithm's advantages
    in_loss: torch.Tensor            # [B] bool: rows whose tokens count in the loss and its denominator
    engine_logp: torch.Tensor        # [B, T] log pi_engine: the engine's sampling log-prob of each response token
    old_logp: torch.Tensor | None    # [B, T] log pi_old, from a no-grad pass; None on-policy (rl_update's forward)
    ref_logp: torch.Tensor | None    # [B, T] log pi_ref; None on steps that neither use nor log the KL to pi_ref


def engine_logprobs(samples: list[Sample], mask):
    """[B, T] the engine's sampling log-probs of `samples` (one row each), placed on their response tokens (mask 1),
    0 elsewhere. Sample.logprobs has one entry per response token, as the mask has one 1 per response token."""
    out = torch.zeros_like(mask)
    out[mask.bool()] = torch.tensor([x for s in samples for x in s.logprobs], dtype=mask.dtype, device=mask.device)
    return out
