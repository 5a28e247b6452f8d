# --- algorithm ---
"""DAPO (Yu et al. 2025, ByteDance Seed; as verl's DAPO recipe, the authors' code): GRPO's advantages with
clip-higher (eps_low 0.2, eps_high 0.28), the token-mean loss, no KL term, and two changes to the samples.
Overlong shaping: a response of L tokens (EOS counted) gets min(-(L - (L_max - L_buf)) / L_buf, 0) x factor added to
its score, L_max = --max-new-tokens (a truncated one: -factor). Dynamic sampling: groups whose scores (before the
shaping) are all equal carry no gradient and are dropped; P more prompts are drawn, round after round, until this
rank holds P groups (an error after --max-gen-rounds rounds, as verl). As the authors' script: dual clip c = 10.
Left out: overlong filtering (the authors' runs do without it); verl's draw of 3P prompts per round (here P).
"""
# --- end algorithm ---
# Every RL trainer here (the files with these fences: grpo.py, rloo.py, ...) is identical to the others outside its
# fenced "algorithm" regions (tests/test_algorithms.py checks it), so `diff grpo.py rloo.py` is the papers' difference;
# a new algorithm is a copy edited inside the fences (docs/forks.md). Run: torchrun --nproc_per_node 2 <trainer>.py
# (built-in task, CPU); real models: --model Qwen/Qwen2.5-Math-1.5B --data gsm8k_train.jsonl --lr 1e-6 (README).
# Left out on purpose: a critic (none of these algorithms has one), reward models (answers are verified), packing
# unrelated rows together (rows that share a prompt do share its forward: common/model.py hidden_states).
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from common import checkpoint, config, data, dist, guards, losses, model as M, rewards
from common.batch import Batch, engine_logprobs
from common.config import RunArgs
from common.evaluate import evaluate
from common.metrics import Logger, log_samples, rl_step_metrics
from common.rollout import Engine, context_limit

NAME = Path(__file__).stem


@dataclass
class Args(RunArgs):  # + the run, data, evaluation and checkpoint flags of common/config.py
    # --- algorithm ---
    no_std_norm: bool = False            # Dr. GRPO: A = r - mean(r), no division by the group's std
    dual_clip: float = 10.0              # c > 1: the loss of an A < 0 token is at most -c A (dual clip); 0 = off
    min_samples = 2                      # not a flag (no type): --n-samples 1 is refused, one response has no variance
    overlong_buffer: int = 16            # L_buf: the last tokens before --max-new-tokens that cost reward (0 = off)
    overlong_factor: float = 1.0         # the penalty at --max-new-tokens
    max_gen_rounds: int = 10             # dynamic sampling: generation rounds per step before it stops (0 = no limit)

    def __post_init__(self):  # parse-time checks of DAPO's flags, after the shared ones: one `error:` line
        super().__post_init__()
        if not 0 <= self.overlong_buffer <= self.max_new_tokens or self.max_gen_rounds < 0:
            self.flag_error(f"--overlong-buffer {self.overlong_buffer} must be in [0, --max-new-tokens "
                            f"{self.max_new_tokens}], --max-gen-rounds {self.max_gen_rounds} >= 0")
    # --- end algorithm ---
    n_samples: int = 8                   # n: responses per prompt (a group)
    prompts_per_step: int = 32           # P: prompts per RL step, all ranks together (divisible by the world size)
    temperature: float = 1.0             # sampling temperature (the trainer's log-probs use the same one)
    top_p: float = 1.0                   # nucleus sampling
    max_new_tokens: int = 64             # response length limit
    clip_eps_low: float = 0.2            # ratio clip: s in [1 - eps_low, 1 + eps_high]
    clip_eps_high: float = 0.2           # clip-higher (DAPO): 0.28
    loss_agg: losses.Agg = "token-mean"  # token-mean | seq-mean-token-mean | -token-sum | -token-sum-norm (losses.py)
    kl_coef: float = 0.0                 # beta of KL(pi_theta || pi_ref); 0 = no KL term, no pi_ref copy or forward
    log_kl_ref: bool = False             # with --kl-coef 0: keep pi_ref anyway (a copy of the weights) to log train/kl_ref on eval steps
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # Schulman's estimators (k3 clamped at 10, as verl)
    kl_in: Literal["loss", "reward"] = "loss"  # KL as a loss term, or -beta k1 per token in the reward (with pi_old)
    entropy_coef: float = 0.0            # adds -coef * H_t to the loss (entropy bonus)
    tis_cap: float = 0.0                 # C > 0: each token's policy loss x min(pi_old / pi_engine, C) (TIS); 0 = off
    mini_batches: int = 4                # optimizer steps per epoch over the rollout batch (Minimal-RL 4, verl 1)
    ppo_epochs: int = 1                  # passes over the rollout batch (verl and Minimal-RL: 1)
    shuffle: bool = False                # mini-batches from a seeded permutation instead of in order (verl: in order)
    steps: int = 100                     # RL steps (one rollout batch each)
    eval_every: int = 20                 # held-out evaluation every N steps, and at step 0 and the end (0: only those)
    lr: float = 1e-4                     # built-in model; real models: 1e-6
    warmup_steps: int = 0                # linear warmup (RL steps)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or cosine to 0 at --steps
    weight_decay: float = 0.01           # AdamW
    grad_clip: float = 1.0               # global grad-norm clip
    extra_samples = 0                    # not a flag (no type): responses per prompt that generate() adds to the n
    # the shared defaults this algorithm changes, declared again (a field keeps its place and its help text):
    # --- algorithm ---
    clip_eps_high: float = 0.28          # clip-higher
    # --- end algorithm ---


# --- algorithm ---
def group_advantages(r, std_norm=True):
    """r [P, n] -> A [P, n] = (r - mean) / (std + 1e-6) per group (unbiased std); A = 0 where all r are equal."""
    a = r - r.mean(1, keepdim=True)
    a = a / (r.std(1, keepdim=True) + 1e-6) if std_norm else a
    return torch.where(r.std(1, keepdim=True) > 0, a, 0.0)


def overlong_penalty(lengths, max_new_tokens, buffer, factor=1.0):
    """lengths [B] (EOS counted) -> [B]: min(-(L - (max_new_tokens - buffer)) / buffer * factor, 0) (0: no buffer)."""
    return (-(lengths - (max_new_tokens - buffer)) / buffer * factor).clamp(max=0.0) if buffer else 0.0 * lengths


def keep_groups(r):
    """r [P, n] verifier scores -> [P] bool: the groups whose scores are not all equal (or of one response, as verl)."""
    return (r != r[:, :1]).any(1) | (r.shape[1] == 1)
# --- end algorithm ---


def get_lr(step, args):
    """Learning rate of RL step `step` (0-based): linear warmup, then constant or cosine decay to 0 at --steps."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    return args.lr * warm * (0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.schedule == "cosine" else 1.0)


def rl_update(policy, opt, guard, b: Batch, args, world=1):
    """One rollout batch -> --ppo-epochs x --mini-batches optimizer steps, mini-batches in order (--shuffle: a
    seeded permutation). Each minimises, over the tokens of its rows with b.in_loss (the algorithm's choice),
        l_t = w_t pg_t - c_H H_t (+ beta k(pi_theta, pi_ref)_t with --kl-in loss),   pg_t = max(-A s, -A clip(s))
    aggregated with the mini-batch's GLOBAL token/sequence counts as denominators (all ranks, all micro-batches);
    w_t = 1, or with --tis-cap C the rollout-mismatch weight min(pi_old / pi_engine, C) (losses.tis_weights).
    Every rank holds the same number of rows, so every rank makes the same calls. b.old_logp None (on-policy: one
    mini-batch, one epoch): pi_old is the current policy, so the update's own forward, detached, serves as pi_old,
    in s (= 1) and in w_t alike. Returns (sums for the log, pi_old [B, T])."""
    on_policy, lm = b.old_logp is None, b.mask * b.in_loss[:, None]
    old_logp = torch.zeros_like(b.mask) if on_policy else b.old_logp
    st = dict(loss=0.0, clip_frac=0.0, entropy=0.0, grad_norm=0.0, updates=0)
    rows = torch.arange(len(b.ids), device=b.ids.device)
    for epoch in range(args.ppo_epochs):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = rows[torch.randperm(len(rows), generator=gen).to(rows.device)] if args.shuffle else rows
        for mb in order.tensor_split(args.mini_batches):
            n_tok, n_seq = dist.all_reduce([lm[mb].sum().item(), b.in_loss[mb].sum().item()]).tolist()
            for k, r in enumerate(micro := mb.split(args.micro_batch_size)):
                dist.micro_batch(policy, last=k == len(micro) - 1)  # small models: one gradient reduction per step
                logp, ent = policy(b.ids[r], b.attn[r], M.logprob_head(b.targets[r], args.temperature))
                if on_policy:
                    old_logp[r] = logp.detach()
                # --- algorithm ---
                pg, clipped = losses.policy_loss(logp, old_logp[r], b.adv[r], eps_low=args.clip_eps_low,
                                                 eps_high=args.clip_eps_high, dual_clip=args.dual_clip)
                # --- end algorithm ---
                if args.tis_cap > 0:  # the engine sampled from pi_engine, not from pi_old: reweight the samples
                    pg = pg * losses.tis_weights(old_logp[r], b.engine_logp[r], args.tis_cap)
                loss_t = pg - args.entropy_coef * ent
                if args.kl_coef > 0 and args.kl_in == "loss":
                    loss_t = loss_t + args.kl_coef * losses.kl(logp, b.ref_logp[r], args.kl_estimator)
                loss = losses.aggregate(loss_t, lm[r], mode=args.loss_agg, n_tokens=n_tok, n_seqs=n_seq,
                                        max_len=args.max_new_tokens)
                (loss * world).backward()  # FSDP averages over ranks: x world
                st["loss"] += loss.item()
                st["clip_frac"] += (clipped * lm[r]).sum().item() / max(n_tok, 1)
                st["entropy"] += (ent.detach() * b.mask[r]).sum().item() / args.ppo_epochs
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            gn = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()
            if guard.check(math.isfinite(gn)):  # a non-finite step is skipped (every rank agrees) and counted
                opt.step()
            opt.zero_grad(set_to_none=True)
            st["grad_norm"] += gn
            st["updates"] += 1
    return st, old_logp


def main(args: Args):
    d = dist.setup(args.seed)
    (out := Path(args.out_dir or f"runs/{NAME}")).mkdir(parents=True, exist_ok=True)
    lm, tok = M.load(args.model, trust_remote_code=args.trust_remote_code)
    limit = context_limit(M.resolve(args.model), args.max_len, args.trust_remote_code)  # what the engine accepts
    train_rows, eval_rows = data.load_split(args, tok, limit)
    ckpt = checkpoint.prepare_run(out, args, NAME)  # refuses a run folder/flags that would lose or mix up a run
    policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device, dtype=args.train_dtype,
                            vocab_parallel=args.vocab_parallel)
    # pi_ref = the initial weights, this rank's shard in CPU memory: only when the run uses it (KL) or logs it
    ref = dist.local_shards(policy) if args.kl_coef > 0 or args.log_kl_ref else None
    # fused: one in-place kernel, no temporaries the size of a parameter (0.5 GiB for a 0.5B model's embedding)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    P, n = args.prompts_per_step // d.world, args.n_samples  # this rank's prompts per step, responses per prompt
    engine = Engine(M.resolve(args.model), args.rollout, seed=args.seed, max_model_len=args.max_len,
                    gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code,
                    max_seqs=max(P * (n + args.extra_samples), -(-args.eval_size // d.world) * args.eval_k),
                    dtype=args.engine_dtype)
    stop, guard, start = guards.StopFlag(), guards.BadStepGuard(args.max_bad_steps, out), 0
    if ckpt:
        st = checkpoint.resume(ckpt, policy, opt)
        start, ref = st["step"], checkpoint.resumed_ref(st, ref)
        engine.sync(dist.full_state_items(policy))  # the engine started from the initial weights
        dist.print0(f"[{NAME}] resumed from {ckpt} at step {start}")
    log = Logger(out, args.steps, main=d.main, track=args.track, run_name=out.name, config=asdict(args),
                 start_step=start)
    is_eval = lambda s: (args.eval_every and s % args.eval_every == 0) or s == args.steps

    def run_eval(step):
        if not args.eval_k:  # --eval-k 0: no held-out evaluation
            return
        ev = evaluate(engine, eval_rows, tok, k=args.eval_k, temperature=args.eval_temperature,
                      max_new_tokens=args.max_new_tokens, seed=10_000 + step, rank=d.rank, world=d.world)
        log.log(step, {f"eval/{k}": v for k, v in ev.items()}, ["eval/pass@1", f"eval/pass@{args.eval_k}"])

    if start == 0:
        run_eval(0)
    stopped = False
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(step, args)
        t = {"start": time.time()}
        # 1. generate n responses per prompt and score them, in rounds of P prompts (this rank's), until P groups are
        #    kept: one round, unless the algorithm drops groups (DAPO's dynamic sampling); then each further round
        #    draws its prompts from another seeded permutation of the data
        collected, rounds, gen_tokens, reward_failures = [], 0, 0, 0
        while len(collected) < P:
            batch = [train_rows[i] for i in data.batch_indices(len(train_rows), step, per_step=args.prompts_per_step,
                                                               seed=args.seed + 1_000_003 * rounds, rank=d.rank,
                                                               world=d.world)]
            prompts, answers = [data.format_prompt(tok, x["question"]) for x in batch], [x["answer"] for x in batch]
            seed = args.seed * 100_003 + step * d.world + d.rank + 1_000_000_007 * rounds  # per sample in the engine
            # --- algorithm ---
            groups = engine.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, seed=seed,
                                     every_rank=rounds == 0)  # later rounds: only the ranks still short of P groups
            # --- end algorithm ---
            scores, rstats = rewards.score_batch([s.text for g in groups for s in g],
                                                 [a for a in answers for _ in range(n)])
            r = torch.tensor(scores, device=d.device).view(P, n)
            rounds, gen_tokens = rounds + 1, gen_tokens + engine.last_gen_tokens
            reward_failures += rstats["timeouts"] + rstats["errors"]
            # --- algorithm ---
            keep = keep_groups(r).tolist()
            if rounds == args.max_gen_rounds and len(collected) + sum(keep) < P:
                raise config.InputError(f"dynamic sampling: {len(collected) + sum(keep)} of {P} groups with differing "
                                        f"scores in --max-gen-rounds {rounds} rounds (0: no limit)", every_rank=False)
            # --- end algorithm ---
            collected += [(p, a, g, x) for p, a, g, x, k in zip(prompts, answers, groups, r, keep) if k]
        prompts, answers, groups, r = zip(*collected[:P])  # the first P groups kept
        engine.sleep()
        samples, r = [s for g in groups for s in g], torch.stack(r)  # P x n, prompt-major
        t["generate"] = time.time()
        # 2. the batch, on the device once: token ids, response-token mask, pi_old and pi_ref log-probs as needed
        ids, attn, targets = data.collate([(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                          tok.pad_token_id, d.device)
        mask, old_logp, ref_logp = (targets != -100).float(), None, None
        kl_reward = args.kl_coef > 0 and args.kl_in == "reward"
        if args.mini_batches > 1 or args.ppo_epochs > 1 or kl_reward:  # else on-policy: rl_update's own forward
            old_logp = M.batched_logprobs(policy, ids, attn, targets, temperature=args.temperature,
                                          micro_batch=args.micro_batch_size)
        if args.kl_coef > 0 or (args.log_kl_ref and is_eval(step + 1)):  # KL to pi_ref: loss/reward, or the log
            with dist.swapped_weights(policy, ref):
                ref_logp = M.batched_logprobs(policy, ids, attn, targets, temperature=args.temperature,
                                              micro_batch=args.micro_batch_size)
        kl_pen = args.kl_coef * losses.kl(old_logp, ref_logp, "k1") if kl_reward else None  # beta k1_t, pi_old
        r_tok = losses.token_rewards(r, mask, kl_pen)  # the outcome on the last token, - beta k1_t (as verl)
        t["logprob"] = time.time()
        # 3. ALGO LOGIC: advantages A [P, n] or [B, T] and the rows whose tokens count in the loss
        # --- algorithm ---
        pen = overlong_penalty(mask.sum(-1), args.max_new_tokens, args.overlong_buffer, args.overlong_factor)
        adv = group_advantages((r_tok.sum(-1) + pen).view(P, n), not args.no_std_norm)
        in_loss = torch.ones(len(ids), dtype=torch.bool, device=d.device)
        # --- end algorithm ---
        b = Batch(ids, attn, targets, mask, adv=adv.reshape(len(ids), -1).expand_as(mask) * mask, in_loss=in_loss,
                  engine_logp=engine_logprobs(samples, mask), old_logp=old_logp, ref_logp=ref_logp)
        # 4. policy update, then push the new weights into the engine (streamed shard by shard)
        with guards.nan_outputs(policy, step + 1 in args.inject_nan):  # fault injection (tests): a NaN loss
            upd, old_logp = rl_update(policy, opt, guard, b, args, d.world)
        t["update"] = time.time()
        engine.sync(dist.full_state_items(policy))
        t["sync"] = time.time()
        m = rl_step_metrics(b, old_logp, rewards=r, samples=samples, update=upd, times=t, args=args, world=d.world,
                            gen_tokens=gen_tokens, rounds=rounds, kept=len(collected), reward_failures=reward_failures)
        m |= {"bad_steps": guard.total, "lr": get_lr(step, args)}
        # the algorithm's own quantities, into the log (its paper's; every algorithm here logs the shared ones above)
        # --- algorithm ---
        m["overlong_penalty"] = dist.all_reduce(pen.mean().item()) / d.world  # every rank holds P x n responses
        # --- end algorithm ---
        log.log(step + 1, {f"train/{k}": v for k, v in m.items()},
                ["train/reward", "train/entropy", "train/kl_ref", "train/clip_frac", "train/time_update"])
        log_samples(log, step + 1, prompts, samples, r.flatten().tolist())  # -> samples.jsonl
        if is_eval(step + 1):
            run_eval(step + 1)
        stopped = checkpoint.save_or_stop(step + 1, total=args.steps, save_every=args.save_every, run_dir=out,
                                          model=policy, optimizer=opt, stop=stop, guard=guard, name=NAME,
                                          extra={} if ref is None else {"ref": ref}, keep_last=args.keep_last,
                                          tokenizer=tok if args.export_every_save else None)
        if stopped:  # a signal: the checkpoint is written, status.json says "stopped"; no export
            break
    if not stopped:
        engine.sleep()  # its weights are not needed for the export, which gathers the whole model on rank 0
        checkpoint.export_hf(policy, tok, out / "hf", d.main)
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    with config.one_line_errors():  # a known bad input found while running: one `error:` line, exit code 2
        main(config.cli(Args))  # tyro, plus --config RUN/args.json to replay a run
    dist.exit_cleanly()  # no interpreter finalization after a finished run (see there why)
