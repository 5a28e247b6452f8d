"""common/dist.py: the reductions every metric goes through, with and without a process group (a unit test has
none; the trainers have one per rank), and pi_ref's shard copy and swap."""
import math

import torch

from common import dist
from tests._launch import torchrun


def test_reductions_without_a_process_group_are_the_values_themselves():
    assert dist.all_reduce(2.5) == 2.5 and dist.all_reduce([1, 2]).tolist() == [1.0, 2.0]
    assert dist.all_reduce(torch.tensor(4.0), "max") == 4.0
    m = dist.mean_metrics({"loss": 6.0, "len": 10.0, "none": 1.0}, {"loss": 3.0, "len": 4.0, "none": 0.0})
    assert m["loss"] == 2.0 and m["len"] == 2.5 and math.isnan(m["none"])
    assert dist.mean_metrics({"x": 7.0}) == {"x": 7.0}


def test_swapped_weights_restore_on_error():
    model = torch.nn.Linear(2, 2)
    ref = [torch.zeros_like(p) for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    try:
        with dist.swapped_weights(model, ref):
            assert all((p == 0).all() for p in model.parameters())
            raise RuntimeError("a failed pi_ref pass")
    except RuntimeError:
        pass
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_two_ranks():
    """setup, all_reduce (sum, max, min; numbers and lists), mean_metrics (sums over counts, across ranks) and the
    pi_ref helpers, and gradient accumulation over micro-batches (micro_batch) on 2 gloo ranks (tests/_dist_worker.py)."""
    assert torchrun("_dist_worker.py", timeout=180).strip().endswith("ok 12")
