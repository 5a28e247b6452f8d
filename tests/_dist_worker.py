"""Run by tests/test_dist.py under torchrun (gloo, 2 ranks): common/dist's setup and reductions, each against the
numbers every rank contributes, written out here. Prints one line, "ok <checks>", on rank 0."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import dist  # noqa: E402

d = dist.setup(seed=5)
assert (d.world, d.rank == 0) == (2, d.main) and d.device.type == "cpu", d
assert torch.initial_seed() == 5 + d.rank  # seeded per rank: seed + rank
mine = [1.0 + d.rank, 10.0 * (d.rank + 1), -float(d.rank)]  # rank 0: 1, 10, 0; rank 1: 2, 20, -1
assert dist.all_reduce(mine[0]) == 3.0 and isinstance(dist.all_reduce(mine[0]), float)
assert dist.all_reduce(mine).tolist() == [3.0, 30.0, -1.0]
assert dist.all_reduce(mine[1], "max") == 20.0 and dist.all_reduce(mine[2], "min") == -1.0
# a global mean is the sum of every rank's sums over the sum of every rank's counts, not a mean of rank means
m = dist.mean_metrics({"a": 3.0 * (d.rank + 1), "b": 1.0}, {"a": 1.0 + 2 * d.rank, "b": 0.0})
assert m["a"] == (3.0 + 6.0) / (1.0 + 3.0) and math.isnan(m["b"]), m
assert dist.mean_metrics({"x": float(d.rank)}) == {"x": 0.5}  # counts default to 1 per rank
# pi_ref's mechanics on a plain module: a shard copy in CPU memory, swapped in and restored
model = torch.nn.Linear(3, 2)
ref = dist.local_shards(model)
with torch.no_grad():
    model.weight += 1.0
now = [p.detach().clone() for p in model.parameters()]
with dist.swapped_weights(model, ref):
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))
assert all(torch.equal(p, q) for p, q in zip(model.parameters(), now))
assert [n for n, _ in dist.full_state_items(torch.nn.ModuleDict({"lm": model}))] == ["weight", "bias"]
dist.print0("ok 10")
dist.exit_cleanly()
