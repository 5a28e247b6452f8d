"""2-rank training worker for tests/test_checkpoint.py (run under torchrun). Trains the tiny model on
random tokens whose draws come from python `random`, numpy and torch, so an exact resume needs every
RNG, the optimizer, the scheduler and the weights back. Writes into --out:
  progress_rank{r}.json  {"pid", "done"} after every step (atomically)
  result_rank{r}.json    losses, RNG draws, taken steps, ... (at the end)
  final.pt               rank 0: the full final weights
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import checkpoint, dist, guards, model as M  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--keep-last", type=int, default=2)
p.add_argument("--resume", default="", help="a checkpoint folder, or 'latest' (of --out)")
p.add_argument("--nan-at", type=int, default=-1, help="step whose loss is NaN on rank 1 only")
p.add_argument("--hang-after", type=int, default=-1, help="sleep forever after this many steps")
p.add_argument("--stop", action="store_true", help="install the SIGTERM/SIGINT StopFlag")
p.add_argument("--step-sleep", type=float, default=0.0)
args = p.parse_args()

d = dist.setup(seed=0)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
lm, tok = M.load(args.model)
vocab = lm.config.vocab_size
policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device)
ref = dist.local_shards(policy)  # pi_ref: the initial weights, this rank's shard
initial = [t.clone() for t in ref]
opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # step-dependent: must be restored
guard = guards.BadStepGuard(3, out)
stop = guards.StopFlag() if args.stop else None

start, res = 0, {"loss": {}, "draws": {}, "took": {}, "ref_ok": True}
ckpt = checkpoint.latest(out) if args.resume == "latest" else (args.resume or None)
if ckpt:
    st = checkpoint.resume(ckpt, policy, opt, sched)
    start, ref = st["step"], st["extra"]["ref"]
    res["ref_ok"] = all(torch.equal(a, b) for a, b in zip(ref, initial))
res["start"] = start


def head(h, w):  # the fused kernel: w may be this rank's vocabulary rows (vocabulary-parallel, the default)
    from common.kernels import token_logprobs
    return -token_logprobs(h.flatten(0, 1), w, head.targets.flatten())[0].mean()


def progress(done):
    f = out / f"progress_rank{d.rank}.json"
    f.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "done": done}))
    os.replace(f.with_suffix(".tmp"), f)


progress(start)
stopped, done = False, start
for step in range(start, args.steps):
    draws = [torch.randn(()).item(), random.random(), float(np.random.rand())]
    g = torch.Generator().manual_seed(int(sum(abs(x) for x in draws) * 1e9))  # every RNG feeds the data
    ids = torch.randint(2, vocab, (2, 8 + int(draws[1] * 8)), generator=g)
    head.targets = ids.roll(-1, 1)
    loss = policy(ids, torch.ones_like(ids), head)
    if step == args.nan_at and d.rank == 1:
        loss = loss * float("nan")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    took = guard.check(torch.isfinite(loss))  # rank-local flag: the guard must make the ranks agree
    if took:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    res["loss"][step], res["draws"][step], res["took"][step] = loss.item(), draws, took
    done = step + 1
    stopped = stop is not None and stop.should_stop()
    if (args.save_every and done % args.save_every == 0) or stopped:
        checkpoint.save(out, done, policy, opt, sched, extra={"ref": ref}, keep_last=args.keep_last)
    progress(done)
    if stopped:
        break
    if done == args.hang_after:
        time.sleep(3600)
    time.sleep(args.step_sleep)

res |= {"done": done, "stopped": stopped, "bad_total": guard.total,
        "lr": sched.get_last_lr()[0]}
(out / f"result_rank{d.rank}.json").write_text(json.dumps(res))
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if d.main:
    torch.save(sd, out / "final.pt")
dist.cleanup()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip the slow interpreter teardown (torch + transformers): seconds per test launch
