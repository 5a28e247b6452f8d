"""Each trainer's advantage function on hand-computed groups."""
import math

import torch

from grpo import group_advantages
from raftpp import raft_advantages
from reinforce_rej import reject_advantages
from remax import remax_advantages


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


def test_remax_greedy_baseline():
    r = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    greedy = torch.tensor([[1.0], [0.0], [0.0]])
    assert torch.equal(remax_advantages(r, greedy), torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))


def test_raft_selection():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.5, 0.1], [1.1, 1.0, 0.0, 0.0]])
    a = raft_advantages(r)
    assert torch.equal(a, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]))
    # a failed best (reward <= 0) is never kept, even when it is the maximum
    assert raft_advantages(torch.tensor([[-1.0, -1.0, -2.0]])).sum() == 0


def test_reinforce_rej_filtering_pm1_and_01():
    r = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a, keep = reject_advantages(r, "pm1")
    assert torch.equal(keep, torch.tensor([[True] * 3, [False] * 3, [False] * 3, [True] * 3]))
    assert torch.equal(a[keep].view(2, 3), torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]))
    a01, keep01 = reject_advantages(r, "01")
    assert torch.equal(keep01, keep) and torch.equal(a01[keep01].view(2, 3), torch.tensor([[1.0, 0, 1], [0, 0, 1]]))
