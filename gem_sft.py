"""GEM: diversity-preserving supervised fine-tuning (cold start for RL), with plain CE as `--loss ce`.

    torchrun --nproc_per_node 2 gem_sft.py                    # built-in task and model, CPU
    torchrun --nproc_per_node 8 gem_sft.py --model Qwen/Qwen2.5-Math-1.5B --data data.jsonl \
        --response-key answer --lr 2e-5 --epochs 3 --batch-size 128 --max-len 2048

For each supervised position with logits z and target y: p = softmax(z), q = softmax(z / beta) with
no gradient, weights w (no gradient), loss = sum_v q_v w_v (log p_v - log p_y). With linear weights
the logit gradient is q - e_y (CE's is p - e_y): beta = 1 is exactly cross-entropy, beta < 1 keeps
the model's distribution flatter than the data's (reverse KL + entropy bonus of weight 1/beta - 1).
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

from common import checkpoint, data, dist, model as M
from common.evaluate import evaluate
from common.kernels import token_logprobs
from common.metrics import Logger
from common.rollout import Engine


@dataclass
class Args:
    model: str = "tiny"                  # HF folder or hub id; "tiny" = the built-in model
    data: str = "builtin"                # "builtin", a .jsonl/.parquet file, or a hub id (name[:split])
    out_dir: str = ""                    # default runs/gem_sft-<loss>
    loss: Literal["gem", "ce"] = "gem"   # GEM or plain cross-entropy SFT
    gem_beta: float = 0.7                # q = softmax(z / beta); beta = 1 is CE
    gem_h: Literal["linear", "logsigmoid"] = "linear"  # weights w_v: 1, or sigmoid((z_v - z_y) / 100)
    epochs: int = 2
    max_steps: int = 0                   # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 64                 # global sequences per optimizer step
    micro_batch_size: int = 32           # sequences per forward/backward on one rank
    lr: float = 3e-3                     # tuned for the built-in model; the authors used 2e-5 on 8B models
    weight_decay: float = 0.01
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8               # Adam's denominator floor; updates of gradients below it are damped
    warmup_frac: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    max_len: int = 512                   # longer rows are an error (or skipped with --skip-bad-rows)
    seed: int = 0
    # data
    prompt_key: str = "question"
    answer_key: str = "answer"
    response_key: str = "response"       # the demonstration; GSM8K/MATH files: "answer"
    skip_bad_rows: bool = False
    eval_data: str = ""                  # held-out file (default: last rows of --data, or the task's split)
    # built-in task
    train_size: int = 12000
    eval_size: int = 200
    difficulty: int = 2                  # operations per problem
    max_num: int = 5                     # operands are 1..max_num
    flawed_frac: float = 0.1             # fraction of demonstrations with an arithmetic slip
    # evaluation (k samples per held-out prompt at eval_temperature)
    eval_k: int = 8                      # 0 = no evaluation
    eval_temperature: float = 1.0
    max_new_tokens: int = 64
    rollout: Literal["vllm", "hf"] = "vllm"
    track: Literal["none", "wandb", "tensorboard"] = "none"
    log_every: int = 10                  # metrics line every N steps (0: only the last)
    trust_remote_code: bool = False
    # checkpoints and faults
    save_every: int = 100                # sharded checkpoint every N steps (0: none) and at the end / on SIGTERM
    keep_last: int = 2                   # complete checkpoints kept (0 = all)
    resume: bool = False                 # continue from the latest complete checkpoint in out_dir
    max_bad_steps: int = 5               # abort after this many consecutive non-finite steps
    inject_nan: tuple[int, ...] = ()     # fault injection for tests: steps whose loss is made NaN


def gem_loss(logits, targets, beta, h="linear"):
    """Per-token GEM loss sum_v q_v w_v (log p_v - log p_y); logits [n, V] fp32, targets [n]."""
    logp = logits.log_softmax(-1)
    logp_y = logp.gather(-1, targets[:, None])
    with torch.no_grad():  # q and w are weights, not functions of the parameters
        q = (logits / beta).softmax(-1)
        w = torch.sigmoid((logits - logits.gather(-1, targets[:, None])) / 100) if h == "logsigmoid" else 1.0
    return (q * w * (logp - logp_y)).sum(-1), -logp_y[:, 0]


def encode(rows, tok):
    """(input ids, number of prompt tokens) per row; the response ends with EOS."""
    out = []
    for r in rows:
        p = tok(data.format_prompt(tok, r["question"]), add_special_tokens=False).input_ids
        a = tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((p + a, len(p)))
    return out


def main(args: Args):
    d = dist.setup(args.seed)
    out = Path(args.out_dir or f"runs/gem_sft-{args.loss}")
    out.mkdir(parents=True, exist_ok=True)
    lm, tok = M.load(args.model, trust_remote_code=args.trust_remote_code)
    train_rows, eval_rows = data.load_split(args, tok)
    train = encode(train_rows, tok)
    dist.print0(f"[gem_sft] {M.count_params(lm) / 1e6:.2f}M params, {len(train)} train / {len(eval_rows)} "
                f"held-out rows, world {d.world}, device {d.device}, loss {args.loss}")
    if d.main:
        (out / "args.json").write_text(json.dumps(asdict(args), indent=1))

    policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, args.adam_beta2), eps=args.adam_eps,
                            weight_decay=args.weight_decay)
    steps_per_epoch = len(train) // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.5 * (1 + math.cos(math.pi * min(1.0, s / total))) if args.schedule == "cosine" else 1.0))
    stop, guard = checkpoint.StopFlag(), checkpoint.BadStepGuard(args.max_bad_steps, out)
    start = 0
    if args.resume and (ckpt := checkpoint.latest(out)):
        start = checkpoint.resume(ckpt, policy, opt, sched)["step"]
        dist.print0(f"[gem_sft] resumed from {ckpt} at step {start}")
    log = Logger(out, total, d.main, None if args.track == "none" else args.track, out.name, asdict(args), start)

    for step in range(start, total):
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        perm = np.random.default_rng(args.seed + epoch).permutation(len(train))  # same order on every rank
        mine = [train[i] for i in perm[pos * args.batch_size:(pos + 1) * args.batch_size][d.rank::d.world]]
        # global token-mean: every rank divides by the token count of the whole global batch
        n_tokens = dist.all_reduce(sum(len(s) - p for s, p in mine))
        sums = {"loss": 0.0, "ce_loss": 0.0, "entropy": 0.0}
        for i in range(0, len(mine), args.micro_batch_size):
            ids, mask, targets = data.collate(mine[i:i + args.micro_batch_size], tok.pad_token_id, d.device)

            def head(hidden, weight):
                sel = targets != -100
                if args.loss == "ce":  # fused kernel: never builds the [tokens x vocab] logits
                    logp, ent = token_logprobs(hidden[sel], weight, targets[sel])
                    return -logp.sum(), -logp.detach().sum(), ent.detach().sum()
                logits = hidden[sel].float() @ weight.float().T
                loss, ce = gem_loss(logits, targets[sel], args.gem_beta, args.gem_h)
                ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
                return loss.sum(), ce.detach().sum(), ent.detach().sum()

            loss_sum, ce_sum, ent_sum = policy(ids, mask, head)
            if step + 1 in args.inject_nan:
                loss_sum = loss_sum * float("nan")
            # FSDP averages gradients over ranks; scale by world so the result is the global token-mean
            (loss_sum / n_tokens * d.world).backward()
            sums["loss"] += loss_sum.item(); sums["ce_loss"] += ce_sum.item(); sums["entropy"] += ent_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if guard.check(math.isfinite(grad_norm.item())):  # a non-finite step is skipped and counted
            opt.step()
        sched.step(); opt.zero_grad(set_to_none=True)
        m = {f"train/{k}": v * d.world for k, v in dist.mean_metrics(sums, {k: n_tokens for k in sums}).items()}
        m |= {"train/grad_norm": grad_norm.item(), "train/lr": sched.get_last_lr()[0], "train/epoch": epoch,
              "train/tokens_per_s": n_tokens / (time.time() - t0), "train/bad_steps": guard.total}
        if (args.log_every and step % args.log_every == 0) or step == total - 1 or not math.isfinite(grad_norm.item()):
            log.log(step + 1, m, ["train/loss", "train/ce_loss", "train/entropy", "train/grad_norm"])
        stopping = stop.should_stop()
        if ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total or stopping) and not guard.consecutive:
            checkpoint.save(out, step + 1, policy, opt, sched, keep_last=args.keep_last)
        if stopping:
            dist.print0(f"[gem_sft] stopped by signal after step {step + 1}; resume with --resume")
            return dist.cleanup()

    hf_dir = checkpoint.export_hf(policy, tok, out / "hf", d.main)
    dist.print0(f"[gem_sft] saved {hf_dir}")
    if args.eval_k == 0:
        return dist.cleanup()
    engine = Engine(hf_dir, args.rollout, seed=args.seed, max_model_len=args.max_len)
    t0 = time.time()
    ev = evaluate(engine, eval_rows, tok, k=args.eval_k, temperature=args.eval_temperature,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, rank=d.rank, world=d.world)
    log.log(total, {f"eval/{k}": v for k, v in ev.items()} | {"eval/seconds": time.time() - t0},
            ["eval/pass@1", f"eval/pass@{args.eval_k}", "eval/distinct_answers"])
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
