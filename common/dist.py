"""Distributed setup: process group (NCCL on GPU, gloo on CPU), device, seeding, FSDP2 wrapping,
rank-0 printing and all-reduce of metrics. Works under `torchrun` and as a plain `python` script
(a one-process group is created so the same code path runs everywhere)."""
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.vocab_parallel import shard_tied_embedding


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup(seed=0):
    """Init the process group and return Dist. On CPU each rank gets cores/local_world threads."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:  # plain `python trainer.py`: pick a free port
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    seed_all(seed + rank)
    return Dist(rank, world, local_rank, device)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_cleanly(code=0):
    """The last call of a script run by torchrun, after main() returned: leave the process group, run the atexit
    handlers (the reward pool, wandb, multiprocessing) while the interpreter is whole, flush, and end the process
    without interpreter finalization. Why: gloo keeps C++ worker threads whose destruction during finalization
    can abort a run that has finished ("terminate called without an active exception", SIGABRT, exit code 1 from
    torchrun; seen once here, after a gem_sft run had saved everything; cf. pytorch/pytorch#179291). Everything
    the run writes is closed by then, so skipping finalization loses nothing."""
    import atexit
    import sys
    cleanup()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*a, **kw):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **kw, flush=True)


RESHARD_CPU_PARAMS = 200_000_000  # on CPU, models from this many parameters reshard after forward (memory)


def wrap_fsdp(model, layers, device, dtype="auto", vocab_parallel=True):
    """FSDP2: `fully_shard` every decoder layer, then the root.
    dtype: "bfloat16" = mixed precision (bf16 parameters and matrix products in forward and backward; fp32 master
    weights, optimizer state and gradient reduction); "float32" = plain fp32; "auto" = bf16 on GPU, fp32 on CPU.
    On GPU parameters are resharded after forward (memory). On CPU a model below RESHARD_CPU_PARAMS keeps its
    parameters gathered from forward to backward, and across the micro-batches of one optimizer step (see
    `micro_batch`): gloo collectives are slow next to the arithmetic of a small model (SmolLM2-135M, 2 ranks, 2
    micro-batches: 4 all-gathers and 2 reduce-scatters per layer per step instead of 1 + 1 cost 17 s instead of 12 s
    for the update alone, 17.5 s instead of 15.9 s inside grpo.py), and the gathered copy is one more model-sized
    tensor per rank (0.54 GB fp32 at 135M).
    Above it they are resharded: kept gathered, a 0.5B model's layers held a whole second copy of the weights
    (2 GB per rank) through every forward and backward.
    vocab_parallel: on more than one rank, a tied embedding/head keeps only this rank's vocabulary rows and is
    never gathered (common/vocab_parallel.py; FSDP ignores it); False: FSDP gathers it whole like the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    model.to(device)
    reshard = device.type == "cuda" or sum(p.numel() for p in model.parameters()) >= RESHARD_CPU_PARAMS
    if reshard and device.type == "cpu":
        mmap_large_allocations()
    mesh = init_device_mesh(device.type, (dist.get_world_size() if dist.is_initialized() else 1,))
    lm = getattr(model, "lm", model)
    vocab = shard_tied_embedding(lm, mesh, mp.param_dtype) if vocab_parallel and mesh.size() > 1 else None
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard,
                ignored_params=None if vocab is None else {vocab})
    model.accumulate_gathered = not reshard  # read by micro_batch
    return model


def micro_batch(model, last):
    """Call before each micro-batch's forward; `last`: the optimizer step's last micro-batch. For a model that keeps
    its parameters gathered (wrap_fsdp: below RESHARD_CPU_PARAMS on CPU), the micro-batches before the last one
    neither reduce-scatter their gradients nor reshard after backward: the gradients accumulate unsharded on each
    rank (one full-size fp32 gradient) and are reduced once, after the last backward, which then reshards (so the
    optimizer step updates the shards and the next forward gathers the new weights). Same sums, same gradients;
    one all-gather and one reduce-scatter per layer per optimizer step instead of one each per micro-batch.
    Other models (resharded: large, or on GPU): a no-op, every micro-batch reduces its own gradients."""
    if getattr(model, "accumulate_gathered", False):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def mmap_large_allocations(threshold=2**20):
    """glibc malloc: serve every allocation from `threshold` bytes up with its own mmap, returned to the system when
    freed. By default the threshold rises with the largest block freed (up to 32 MiB), so gathered layers, their
    gradients and activations of a large model land in the heap, which keeps their pages after they are freed: a
    0.5B model's forward + backward peaked 1.2 GiB higher per rank. Costs page faults on those allocations; used
    for large models on CPU (wrap_fsdp). A no-op where libc is not glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD (also stops the dynamic rise)
    except (OSError, AttributeError):
        pass


def full_state_items(model, prefix="lm."):
    """Yield (name, full tensor) for every key of the sharded model's state dict, one at a time
    (`full_tensor()` all-gathers on every rank), so no second full copy of the model ever exists.
    A model that keeps its parameters gathered anyway (wrap_fsdp: small, on CPU) is gathered the way its forward
    does it, one all-gather per layer (FSDP's `unshard`) instead of one per tensor: SmolLM2-135M's 272 tensors took
    0.8-1.1 s of a 1.5 s weight sync on 2 CPU ranks. The state dict's keys are then yielded from the gathered
    parameters (a copy each) and the model resharded.
    A tied head needs nothing extra here: `rollout.Engine.sync` streams it from the embedding."""
    if getattr(model, "accumulate_gathered", False):
        from torch.distributed.fsdp import FSDPModule
        keys = list(model.state_dict())  # the per-tensor path's names and order (a shared weight under each name)
        groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in groups:
            m.unshard()
        try:
            live = {**dict(model.named_parameters(remove_duplicate=False)),
                    **dict(model.named_buffers(remove_duplicate=False))}
            for key in keys:
                t = live[key]
                # a copy: resharding frees the gathered storage, and a caller may keep what it got
                yield key[len(prefix):] if key.startswith(prefix) else key, \
                    (t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone())
        finally:
            for m in groups:
                m.reshard()
        return
    for name, t in model.state_dict().items():
        name = name[len(prefix):] if name.startswith(prefix) else name
        yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def all_reduce(x, op="sum"):
    """All-reduce a python number (-> float) or a list/tensor (-> CPU float64 tensor) across ranks, on CPU for
    gloo and on the device for NCCL. Without a process group (a unit test) it returns x itself, reduced
    over the one process there is."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.as_tensor(x, dtype=torch.float64, device=dev).clone()
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.item() if t.dim() == 0 else t.cpu()


def mean_metrics(sums, counts=None):
    """Global means of per-rank metric sums: {k: Σ_ranks sums[k] / Σ_ranks counts[k]} in one all-reduce.
    counts defaults to 1 per rank (a plain mean over ranks)."""
    keys = sorted(sums)
    counts = counts or {}
    vals = all_reduce([float(sums[k]) for k in keys] + [float(counts.get(k, 1.0)) for k in keys])
    n = len(keys)
    return {k: (vals[i] / vals[n + i]).item() if vals[n + i] else float("nan") for i, k in enumerate(keys)}


def reshard(model):
    """Free gathered parameters after no-grad forwards. Needed on CPU, where parameters stay gathered
    after forward until a backward reshards them: a no-grad forward has no backward, and the stale
    gathered copy would otherwise be reused by the next forward (after an optimizer step or a swap)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_shards(model):
    """A CPU copy of this rank's shard of every parameter (e.g. the initial weights, pi_ref)."""
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().to("cpu", copy=True) for p in model.parameters()]


@contextmanager
def swapped_weights(model, shards):
    """Run the model with other weights (as returned by `local_shards`) inside the block, then restore.
    Used for pi_ref: its shards live in CPU memory, and the current shards are parked in CPU memory while
    pi_ref's are in place, so the device never holds a second copy of this rank's weights."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    current = [p.detach().to("cpu", copy=True) for p in params]
    reshard(model)
    with torch.no_grad():
        for p, s in zip(params, shards):
            p.copy_(s)
    try:
        yield
    finally:
        reshard(model)
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(c)
