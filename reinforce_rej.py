"""Reinforce-rej (Xiong et al. 2025): REINFORCE on the ±1 reward, with the prompts whose responses are
all correct or all wrong rejected.

    torchrun --nproc_per_node 2 reinforce_rej.py --model runs/gem_sft-gem/hf    # built-in task, CPU
    torchrun --nproc_per_node 8 reinforce_rej.py --model Qwen/Qwen2.5-Math-1.5B --data gsm8k_train.jsonl ...

For each prompt, n responses. Every prompt whose group has zero reward variance is dropped; for the
others A_i = r_i on the ±1 scale (correct +1, wrong -1; `--reward-scale 01` is the authors' release,
where wrong responses get A = 0). No mean subtraction, no std normalisation. Clipped loss, token-mean
over the kept tokens, dual-clip c = 3 for A < 0.
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

from common import checkpoint, data, dist, losses, model as M, rewards
from common.evaluate import evaluate
from common.metrics import Logger
from common.rollout import Engine


@dataclass
class Args:
    model: str = "runs/gem_sft-gem/hf"   # cold-start checkpoint (printed by gem_sft.py), HF folder or hub id
    data: str = "builtin"                # "builtin", a .jsonl/.parquet file, or a hub id (name[:split])
    out_dir: str = ""                    # default runs/reinforce_rej
    steps: int = 100                     # RL steps (one rollout batch each)
    prompts_per_step: int = 32           # P, global
    n_samples: int = 8                   # n, responses per prompt (the group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    mini_batches: int = 4                # optimizer steps per rollout batch (the authors used 4)
    ppo_epochs: int = 2                  # passes over the rollout batch
    micro_batch_size: int = 64           # sequences per forward/backward on one rank
    lr: float = 1e-4                     # built-in model; real models: 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2           # clip-higher: 0.28
    dual_clip: float = 3.0               # c > 1 bounds the loss of A < 0 tokens by -c A (e.g. 3)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0                 # beta; 0 = no KL term (KL to pi_ref is still logged)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    entropy_coef: float = 0.0
    reward_scale: Literal["pm1", "01"] = "pm1"  # correct +1 / wrong -1, or the release's 1 / 0
    seed: int = 0
    # data
    prompt_key: str = "question"
    answer_key: str = "answer"
    skip_bad_rows: bool = False
    eval_data: str = ""
    max_len: int = 512
    train_size: int = 8000               # built-in task
    eval_size: int = 200
    difficulty: int = 2
    max_num: int = 5
    # evaluation, logging
    eval_every: int = 20                 # held-out evaluation every N steps (0: only at the end)
    eval_k: int = 4
    eval_temperature: float = 1.0
    rollout: Literal["vllm", "hf"] = "vllm"
    gpu_memory_utilization: float = 0.3
    track: Literal["none", "wandb", "tensorboard"] = "none"
    trust_remote_code: bool = False
    # checkpoints and faults
    save_every: int = 50                 # sharded checkpoint every N steps (0: none) and at the end / on SIGTERM
    keep_last: int = 2                   # complete checkpoints kept (0 = all)
    export_every_save: bool = False      # also write an HF folder (safetensors) at every checkpoint
    resume: bool = False                 # continue from the latest complete checkpoint in out_dir
    max_bad_steps: int = 5               # abort after this many consecutive non-finite steps
    inject_nan: tuple[int, ...] = ()     # fault injection for tests: steps whose loss is made NaN


def reject_advantages(r, scale="pm1"):
    """r [P, n] 0/1 -> (A [P, n], keep [P, n]): A = r on the ±1 (or 0/1) scale, only for mixed groups."""
    keep = (r.std(1, keepdim=True) > 0).expand_as(r)
    return (2 * r - 1 if scale == "pm1" else r), keep


def main(args: Args):
    d = dist.setup(args.seed)
    out = Path(args.out_dir or "runs/reinforce_rej")
    out.mkdir(parents=True, exist_ok=True)
    lm, tok = M.load(args.model, trust_remote_code=args.trust_remote_code)
    train_rows, eval_rows = data.load_split(args, tok)
    if d.main:
        (out / "args.json").write_text(json.dumps(asdict(args), indent=1))
    policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device)
    ref_shards = dist.local_shards(policy)  # pi_ref = initial weights, this rank's shard, in CPU memory
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)) * (
        0.5 * (1 + math.cos(math.pi * s / args.steps)) if args.schedule == "cosine" else 1.0))
    engine = Engine(M.resolve(args.model), args.rollout, seed=args.seed, max_model_len=args.max_len,
                    gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
    stop, guard = checkpoint.StopFlag(), checkpoint.BadStepGuard(args.max_bad_steps, out)
    start = 0
    if args.resume and (ckpt := checkpoint.latest(out)):
        st = checkpoint.resume(ckpt, policy, opt, sched)
        start, ref_shards = st["step"], st["extra"]["ref"]
        engine.sync(dist.full_state_items(policy))  # the engine started from the initial weights
        dist.print0(f"[reinforce_rej] resumed from {ckpt} at step {start}")
    log = Logger(out, args.steps, d.main, None if args.track == "none" else args.track, out.name, asdict(args), start)
    P = args.prompts_per_step // d.world  # prompts per rank
    per_epoch = len(train_rows) // args.prompts_per_step

    def run_eval(step):
        ev = evaluate(engine, eval_rows, tok, k=args.eval_k, temperature=args.eval_temperature,
                      max_new_tokens=args.max_new_tokens, seed=10_000 + step, rank=d.rank, world=d.world)
        log.log(step, {f"eval/{k}": v for k, v in ev.items()}, ["eval/pass@1", f"eval/pass@{args.eval_k}"])

    if start == 0:
        run_eval(0)
    for step in range(start, args.steps):
        t = {"start": time.time()}
        # 1. sample prompts (same permutation on every rank; each rank takes its slice) and generate
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng(args.seed + epoch).permutation(len(train_rows))
        idx = perm[pos * args.prompts_per_step:(pos + 1) * args.prompts_per_step][d.rank * P:(d.rank + 1) * P]
        batch = [train_rows[i] for i in idx]
        groups = engine.generate([data.format_prompt(tok, r["question"]) for r in batch], n=args.n_samples,
                                 temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed * 100_003 + step * d.world + d.rank)
        engine.sleep()
        t["generate"] = time.time()
        # 2. rewards
        samples = [s for g in groups for s in g]
        scores, rstats = rewards.score_batch([s.text for s in samples], [r["answer"] for r in batch for _ in range(args.n_samples)])
        r = torch.tensor(scores, dtype=torch.float32).view(P, args.n_samples)
        t["score"] = time.time()
        # 3. old (pi_old, recomputed by the trainer) and reference log-probs of every response token
        ids, attn, targets = data.collate([(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                          tok.pad_token_id)
        mask = (targets != -100).float()
        n_micro = int(dist.all_reduce(math.ceil(len(ids) / args.micro_batch_size), "max"))
        old_logp, _ = M.batched_logprobs(policy, ids, attn, targets, args.temperature, args.micro_batch_size, n_micro)
        with dist.swapped_weights(policy, ref_shards):
            ref_logp, _ = M.batched_logprobs(policy, ids, attn, targets, args.temperature, args.micro_batch_size, n_micro)
        kl_tok = losses.kl(old_logp, ref_logp, args.kl_estimator) * mask
        if args.kl_coef > 0 and args.kl_in == "reward":  # r <- r - beta * sum_t k1_t, with pi_old
            r = r - args.kl_coef * (losses.kl(old_logp, ref_logp, "k1") * mask).sum(-1).view(P, args.n_samples)
        t["logprob"] = time.time()
        # 4. advantages: THE ALGORITHM
        adv, keep = reject_advantages(r, args.reward_scale)
        adv, keep = adv.flatten(), keep.flatten()
        # 5. clipped policy-gradient update over mini-batches (global token counts as denominators)
        rows_all = torch.nonzero(keep)[:, 0]
        stats = {"loss": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}  # means over the updates
        n_updates = args.mini_batches * args.ppo_epochs
        for _ in range(args.ppo_epochs):
            for mb in torch.tensor_split(rows_all[torch.randperm(len(rows_all))], args.mini_batches):
                n_tok = dist.all_reduce(mask[mb].sum().item())
                n_seq = dist.all_reduce(len(mb))
                if n_seq == 0:  # nothing kept anywhere (same decision on every rank)
                    continue
                n_mb_micro = int(dist.all_reduce(math.ceil(len(mb) / args.micro_batch_size), "max"))
                for k in range(n_mb_micro):
                    rows = mb[k * args.micro_batch_size:(k + 1) * args.micro_batch_size]
                    weight = 1.0 if len(rows) else 0.0  # a rank without rows still joins the collectives
                    rows = rows if len(rows) else torch.arange(1)
                    logp, ent = policy(ids[rows].to(d.device), attn[rows].to(d.device),
                                       M.logprob_head(targets[rows].to(d.device), args.temperature))
                    logp, ent, m = logp.float().cpu(), ent.float().cpu(), mask[rows]
                    pl, clipped = losses.policy_loss(logp, old_logp[rows], adv[rows, None], args.clip_eps_low,
                                                     args.clip_eps_high, args.dual_clip)
                    loss_t = pl - args.entropy_coef * ent
                    if args.kl_coef > 0 and args.kl_in == "loss":
                        loss_t = loss_t + args.kl_coef * losses.kl(logp, ref_logp[rows], args.kl_estimator)
                    agg = lambda x: losses.aggregate(x, m, args.loss_agg, n_tok, n_seq, args.max_new_tokens)
                    loss = agg(loss_t) * weight * (float("nan") if step + 1 in args.inject_nan else 1.0)
                    (loss * d.world).backward()  # FSDP averages over ranks; the denominators are global
                    stats["loss"] += loss.item() / n_updates
                    stats["clip_frac"] += (clipped * m).sum().item() * weight / n_tok / n_updates
                    stats["entropy"] += (ent.detach() * m).sum().item() * weight / n_tok / n_updates
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
                gn = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()
                if guard.check(math.isfinite(gn)):  # a non-finite step is skipped and counted
                    opt.step()
                opt.zero_grad(set_to_none=True)
                stats["grad_norm"] += gn / n_updates
        sched.step()
        t["update"] = time.time()
        # 6. push the new weights into the engine (streamed shard by shard; wakes a sleeping engine)
        engine.sync(dist.full_state_items(policy))
        t["sync"] = time.time()
        # 7. metrics (global means over ranks)
        gap = (torch.tensor([lp for s in samples for lp in s.logprobs]) - old_logp[mask.bool()]).abs().sum().item()
        lengths = mask.sum(-1)
        sums = {"reward": r.sum().item(), "accuracy": sum(scores), "adv_mean": adv.sum().item(),
                "adv_sq": (adv ** 2).sum().item(), "response_len": lengths.sum().item(),
                "truncated": sum(s.finish == "length" for s in samples), "kept": keep.sum().item()}
        counts = {k: len(samples) for k in sums}
        sums |= {"zero_var_groups": (r.std(1) == 0).sum().item(), "kl_ref": kl_tok.sum().item(),
                 "logprob_gap": gap, "reward_failures": rstats["timeouts"] + rstats["errors"]}
        counts |= {"zero_var_groups": P, "kl_ref": mask.sum().item(), "logprob_gap": mask.sum().item(),
                   "reward_failures": 1.0 / d.world}
        m = dist.mean_metrics(sums, counts) | {k: v for k, v in stats.items() if k == "grad_norm"}
        m["bad_steps"] = guard.total
        m |= dict(zip(["loss", "clip_frac", "entropy"], dist.all_reduce([stats[k] for k in ("loss", "clip_frac", "entropy")]).tolist()))
        m["adv_std"] = max(m.pop("adv_sq") - m["adv_mean"] ** 2, 0.0) ** 0.5
        m["gen_tokens_per_s"] = dist.all_reduce(engine.last_gen_tokens) / (t["generate"] - t["start"])
        m |= {f"time_{k}": t[k] - t[prev] for prev, k in zip(list(t)[:-1], list(t)[1:])}
        log.log(step + 1, {f"train/{k}": v for k, v in m.items()},
                ["train/reward", "train/accuracy", "train/entropy", "train/kl_ref", "train/clip_frac"])
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.steps:
            run_eval(step + 1)
        stopping = stop.should_stop()
        if ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps or stopping) and not guard.consecutive:
            path = checkpoint.save(out, step + 1, policy, opt, sched, extra={"ref": ref_shards}, keep_last=args.keep_last)
            if args.export_every_save:
                checkpoint.export_hf(policy, tok, path / "hf", d.main)
        if stopping:
            dist.print0(f"[reinforce_rej] stopped by signal after step {step + 1}; resume with --resume")
            break
    else:
        checkpoint.export_hf(policy, tok, out / "hf", d.main)
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
