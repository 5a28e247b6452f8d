"""Run by tests/test_vocab_parallel.py under torchrun (gloo, 2 or 3 ranks): the vocabulary-parallel lookup, log-prob
and GEM kernels against float64 full-logit formulas over every rank's tokens in one process. Prints one JSON line
per check (rank 0) with the largest error relative to 1 + |reference|."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

from common import kernels as K, vocab_parallel as VP  # noqa: E402
from common.dist import exit_cleanly  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
K.CHUNK_ROWS, K.CHUNK_COLS = 5, 7  # several row and vocabulary tiles per rank
V, D, PAD = 31, 6, 0               # 31 rows: uneven blocks (16 + 15 on 2 ranks, 11 + 11 + 9 on 3)
g = torch.Generator().manual_seed(0)
E = torch.randn(V, D, generator=g)
# two micro-batches per rank with different token counts per rank; rank 1's second one has no scored token
N = [[13, 9, 4][r % 3] for r in range(world)], [[5, 8, 3][r % 3] for r in range(world)]
X = [[torch.randn(n, D, generator=g) for n in Nb] for Nb in N]
Y = [[torch.randint(0, V, (n,), generator=g) for n in Nb] for Nb in N]
for Yb in Y:
    Yb[0][2] = -100
Y[1][1][:] = -100
G = [[torch.randn(n, generator=g) for n in Nb] for Nb in N]
GE = [[torch.randn(n, generator=g) for n in Nb] for Nb in N]
IDS = [[torch.randint(0, V, (2, n), generator=g) for n in Nb] for Nb in N]
LG = [[torch.randn(2, n, D, generator=g) for n in Nb] for Nb in N]  # upstream gradient of the lookup
for Ib in IDS:
    Ib[0][0, 0] = PAD  # the padding row gets no gradient from the lookup


def vp_param():
    per = -(-V // world)
    v0 = rank * per
    rows = min(per, V - v0)
    p = torch.nn.Parameter(DTensor.from_local(E[v0:v0 + rows].clone(), mesh, [Shard(0)], run_check=False,
                                              shape=(V, D), stride=(D, 1)))
    p.vocab_shard = VP.VocabShard(rank, world, v0, rows, V, p, padding_idx=PAD)
    return p


def ref_logprobs(x, w, y, T):
    lp = ((x @ w.T) / T).log_softmax(-1)
    ok = y != -100
    return lp.gather(1, y.clamp(min=0)[:, None])[:, 0] * ok, -(lp.exp() * lp).sum(-1) * ok


def ref_gem(x, w, y, beta, h):
    ok = y != -100
    z = x @ w.T
    logp = z.log_softmax(-1)
    yc = y.clamp(min=0)[:, None]
    q = (z / beta).softmax(-1).detach()
    wt = torch.sigmoid((z - z.gather(1, yc)) / 100).detach() if h == "logsigmoid" else 1.0
    return (q * wt * (logp - logp.gather(1, yc))).sum(-1) * ok


def compare(name, vp_fn, ref_fn):
    """vp_fn(x, weight, b) -> scalar on this rank's micro-batch b; ref_fn(x, w, b, r) -> scalar on rank r's, float64.
    Two micro-batches accumulate into the gradients, as a trainer's do. FSDP averages gradients over ranks, so
    the reference weight gradient is the sum over ranks / world."""
    p = vp_param()
    out, gx = [], []
    for b in range(2):
        x = X[b][rank].clone().requires_grad_(True)
        o = vp_fn(x, p, b)
        o.backward()
        out.append(o.item())
        gx.append(x.grad)
    gw = p.grad.full_tensor()
    w = E.double().requires_grad_(True)
    err = 0.0
    for b in range(2):
        for r in range(world):
            x = X[b][r].double().requires_grad_(True)
            o = ref_fn(x, w, b, r)
            o.backward()
            if r == rank:
                err = max(err, abs(out[b] - o.item()) / (1 + abs(o.item())),
                          ((gx[b].double() - x.grad).abs() / (1 + x.grad.abs())).max().item())
    err = max(err, ((gw.double() - w.grad / world).abs() / (1 + w.grad.abs() / world)).max().item())
    err = torch.tensor(err)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"check": name, "err": err.item()}), flush=True)


for T in (1.0, 0.7):
    compare(f"logprobs T={T}",
            lambda x, w, b: sum((o * c[rank]).sum() for o, c in zip(K.token_logprobs(x, w, Y[b][rank], T), (G[b], GE[b]))),
            lambda x, w, b, r: sum((o * c[r]).sum() for o, c in zip(ref_logprobs(x, w, Y[b][r], T), (G[b], GE[b]))))
compare("logprobs no entropy",
        lambda x, w, b: (K.token_logprobs(x, w, Y[b][rank], 1.0, with_entropy=False)[0] * G[b][rank]).sum(),
        lambda x, w, b, r: (ref_logprobs(x, w, Y[b][r], 1.0)[0] * G[b][r]).sum())
for h in ("linear", "logsigmoid"):
    compare(f"gem {h}",
            lambda x, w, b: (K.token_gem(x, w, Y[b][rank], 0.7, h)[0] * G[b][rank]).sum(),
            lambda x, w, b, r: (ref_gem(x, w, Y[b][r], 0.7, h) * G[b][r]).sum())
# the lookup: x is unused (its gradient is 0 on both sides); the loss is a random projection of the embeddings
compare("lookup", lambda x, w, b: (VP.VocabParallelEmbedding(w)(IDS[b][rank]) * LG[b][rank]).sum() + 0 * x.sum(),
        lambda x, w, b, r: (torch.nn.functional.embedding(IDS[b][r], w, padding_idx=PAD) * LG[b][r]).sum() + 0 * x.sum())
exit_cleanly()  # barrier, leave the group, flush, no interpreter finalization (gloo's threads can abort it)
