"""Vocabulary parallelism for a tied embedding + head under FSDP2: each rank keeps its V/W rows, never gathered.

Why: FSDP shards a tied V x D embedding by rows like any parameter, but gathers it whole for every forward (the
input lookup and the head both run in the root unit), and the head's gradient is dense in every row (softmax -
onehot): a step holds the whole matrix, its whole gradient and the reduce-scatter's copy of that gradient, 1.5 GiB
per rank for Qwen2.5-0.5B in fp32. Here rank r keeps rows [v0, v0 + V_r) (torch.chunk's split) as a DTensor
Shard(0) that FSDP ignores. The rows stay put; the tokens travel ([tokens x D] per micro-batch):

  lookup   e(x) = sum_r E_r[x - v0_r] 1{v0_r <= x < v0_r + V_r}: each rank looks up every rank's ids in its rows
           (zero for ids it does not own); a reduce-scatter sums the W partial lookups and hands each rank its own.
  head     each rank scores every rank's hidden states against its rows, and the per-token statistics over its
           rows (max, sum of exponentials, entropy terms; the target's logit where it owns the target) are
           all-gathered and merged exactly as the fused kernel merges vocabulary tiles (kernels.py).
  grads    dL/dE_r needs r's rows and every rank's tokens, which every rank has after the gathers: it is computed
           locally and added in place into the parameter's .grad (grad_buffer), divided by W because FSDP averages
           the other gradients over ranks. dL/dhidden sums over the W row blocks: a reduce-scatter.

The parameter stays a DTensor, so the optimizer, clip_grad_norm_, checkpoints (DCP), the HF export and the engine's
weight sync (`full_tensor()`) handle it as they handle FSDP's own shards. Collectives run on the default group in
the order every rank's autograd graph gives them (the same graph on every rank), like FSDP's own.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn); older torch has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class VocabShard:
    """This rank's block of vocabulary rows: [v0, v0 + rows) of a [vocab, dim] matrix split over `world` ranks."""
    rank: int
    world: int
    v0: int
    rows: int
    vocab: int
    param: torch.nn.Parameter          # the DTensor Shard(0) parameter (its .grad is accumulated in place)
    compute_dtype: torch.dtype = None  # dtype of the lookup's output (the layers' compute dtype; None: the weight's)
    padding_idx: int = None            # an nn.Embedding padding row: the lookup gives it no gradient

    def gather(self, x, pad):
        """All ranks' rows of x [n_r, ...] -> ([world * m, ...], m): each rank's block padded with `pad` to m = max n_r
        (ranks hold different numbers of tokens; one all-gather of the counts first)."""
        n = torch.tensor([len(x)], device=x.device)
        counts = torch.empty(self.world, dtype=n.dtype, device=x.device)
        _all_gather(counts, n)
        m = int(counts.max())
        padded = torch.cat([x, x.new_full((m - len(x), *x.shape[1:]), pad)]) if m > len(x) else x.contiguous()
        out = x.new_empty((self.world * m, *x.shape[1:]))
        _all_gather(out, padded)
        return out, m

    def mine(self, x, m, n):
        """This rank's n rows of a gathered [world * m, ...] tensor."""
        return x[self.rank * m:self.rank * m + n]

    def reduce_scatter(self, x, m, n):
        """sum over ranks of a [world * m, ...] tensor, this rank's n rows of it."""
        out = x.new_empty((m, *x.shape[1:]))
        _reduce_scatter(out, x.contiguous())
        return out[:n]

    def all_reduce(self, x):
        dist.all_reduce(x)
        return x

    def all_gather(self, x):
        """[...] -> [world, ...] (same shape on every rank)."""
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))  # gloo wants the gather along dim 0
        _all_gather(out, x.contiguous())
        return out.view(self.world, *x.shape)

    def owned(self, ids):
        """(mask of ids in this rank's rows, their row numbers in the local block)."""
        local = ids - self.v0
        return (local >= 0) & (local < self.rows), local

    def grad_buffer(self):
        """This rank's block of the parameter's gradient, fp32, for in-place accumulation (allocated at the first
        backward of a step: zero_grad(set_to_none=True) drops it)."""
        from torch.distributed.tensor import DTensor
        p = self.param
        if p.grad is None:
            local = torch.zeros_like(p.to_local())
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
        with torch.no_grad():
            return p.grad.to_local()


def shard_of(weight):
    """The VocabShard of a vocabulary-parallel parameter, else None (a plain or FSDP-gathered weight)."""
    return getattr(weight, "vocab_shard", None)


def local_rows(weight):
    """The tensor a kernel computes with: this rank's rows (still differentiable, so autograd calls the kernel's
    backward; the kernel returns no gradient for them and accumulates it in place instead)."""
    return weight.to_local() if shard_of(weight) is not None else weight


class _Lookup(torch.autograd.Function):
    """Embedding lookup of this rank's ids [n] with the rows spread over the ranks (see the module docstring)."""

    @staticmethod
    def forward(ctx, ids, w, shard):
        all_ids, m = shard.gather(ids, -1)
        mask, local = shard.owned(all_ids)
        part = w.new_zeros(len(all_ids), w.shape[1])
        part[mask] = w[local[mask]]
        ctx.shard, ctx.m, ctx.n = shard, m, len(ids)
        keep = mask if shard.padding_idx is None else mask & (all_ids != shard.padding_idx)
        ctx.save_for_backward(keep.nonzero().squeeze(1), local)
        return shard.reduce_scatter(part, m, len(ids))

    @staticmethod
    def backward(ctx, g):
        shard, (rows, local) = ctx.shard, ctx.saved_tensors
        all_g, _ = shard.gather(g.contiguous(), 0.0)  # every rank's upstream gradient, [world * m, D]
        shard.grad_buffer().index_add_(0, local[rows], all_g[rows].float() / shard.world)
        return None, None, None


class VocabParallelEmbedding(torch.nn.Module):
    """Drop-in for the model's input embedding: same call, ids [...] -> [..., D]."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, input_ids):
        shard = shard_of(self.weight)
        out = _Lookup.apply(input_ids.reshape(-1), local_rows(self.weight), shard)
        return out.view(*input_ids.shape, -1).to(shard.compute_dtype or out.dtype)


def shard_tied_embedding(lm, mesh, compute_dtype=None):
    """Make lm's tied embedding/head vocabulary-parallel over `mesh` (1-D, all ranks): the shared parameter becomes
    a DTensor Shard(0) holding this rank's rows, the input embedding a VocabParallelEmbedding. Returns the new
    parameter (for FSDP's ignored_params), or None where it does not apply: one rank; an untied head (two
    matrices, the embedding's gradient sparse: FSDP shards both as usual); or so few rows that a rank gets none.
    compute_dtype: what the lookup returns (FSDP's mixed-precision param_dtype: the layers' input dtype)."""
    from torch.distributed.tensor import DTensor, Shard
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    world, rank = mesh.size(), mesh.get_local_rank()
    if world == 1 or head is None or emb.weight is not head.weight or not isinstance(emb, torch.nn.Embedding):
        return None
    V, D = emb.weight.shape
    per = -(-V // world)
    if per * (world - 1) >= V:
        return None
    v0 = rank * per
    rows = min(per, V - v0)
    local = emb.weight.detach()[v0:v0 + rows].clone()
    param = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(V, D),
                                                  stride=(D, 1)))
    param.vocab_shard = VocabShard(rank, world, v0, rows, V, param, compute_dtype, emb.padding_idx)
    lm.set_input_embeddings(VocabParallelEmbedding(param))
    head.weight = param
    return param
