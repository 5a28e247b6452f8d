"""Run by tests/test_dist.py under torchrun (gloo, 2 ranks): common/dist's setup and reductions, each against the
numbers every rank contributes, written out here. Prints one line, "ok <checks>", on rank 0."""
import copy
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

# micro_batch: a small model accumulates its micro-batches' gradients unsharded and reduces them once, after the last
# backward; the optimizer step then updates the shards and the next forward sees the new weights. Against a plain
# (unwrapped) copy trained on both ranks' rows in one batch by hand-written SGD.
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


torch.manual_seed(0)
plain = Net()
net = copy.deepcopy(plain)
net = dist.wrap_fsdp(net, net.layers, d.device, vocab_parallel=False)
assert net.accumulate_gathered  # small, on CPU
xs = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))  # [rank, rows, features]
opt = torch.optim.SGD(net.parameters(), lr=0.5)
for k, rows in enumerate(xs[d.rank].split(2)):  # 3 micro-batches of 2 rows
    dist.micro_batch(net, last=k == 2)
    ((net(rows) ** 2).sum() / 12 * 2).backward()  # global mean over 12 rows; x 2: FSDP averages over ranks
opt.step()
(plain(xs.flatten(0, 1)) ** 2).sum().div(12).backward()
with torch.no_grad():
    for q in plain.parameters():
        q -= 0.5 * q.grad
    assert all(torch.allclose(p.full_tensor(), q, atol=1e-6) for p, q in zip(net.parameters(), plain.parameters()))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(net(x), plain(x), atol=1e-6)  # the forward after the step gathers the new weights
# full_state_items of a small model (one all-gather per layer) gives every tensor of the state dict, equal to the
# plain copy's, and leaves the model sharded, as the per-tensor path does
dist.reshard(net)
items = dict(dist.full_state_items(net, prefix=""))
assert list(items) == list(plain.state_dict()), list(items)
assert all(torch.allclose(items[k], v, atol=1e-6) for k, v in plain.state_dict().items())
assert all(hasattr(p, "full_tensor") for p in net.parameters())  # resharded: DTensor shards again
net.accumulate_gathered = False  # the per-tensor path (large models) gives the same names and tensors, bit for bit
per_tensor = list(dist.full_state_items(net, prefix=""))
assert [k for k, _ in per_tensor] == list(items) and all(torch.equal(items[k], v) for k, v in per_tensor)
net.accumulate_gathered = True
dist.print0("ok 12")
dist.exit_cleanly()
