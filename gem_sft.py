# --- algorithm ---
"""GEM: diversity-preserving supervised fine-tuning (cold start for RL), with plain CE as `--loss ce`.

    torchrun --nproc_per_node 2 gem_sft.py                    # built-in task and model, CPU
    torchrun --nproc_per_node 8 gem_sft.py --model Qwen/Qwen2.5-Math-1.5B --data data.jsonl \
        --response-key answer --lr 2e-5 --epochs 3 --batch-size 128 --max-len 2048

For each supervised position with logits z and target y: p = softmax(z), q = softmax(z / beta) with
no gradient, weights w (no gradient), loss = sum_v q_v w_v (log p_v - log p_y). With linear weights
the logit gradient is q - e_y (CE's is p - e_y): beta = 1 is exactly cross-entropy, beta < 1 keeps
the model's distribution flatter than the data's (reverse KL + entropy bonus of weight 1/beta - 1).
"""
# --- end algorithm ---
# A variant of this SFT is a copy edited inside the fenced "algorithm" regions, as the RL trainers' forks are of grpo.py
# (tests/test_algorithms.py compares a fenced file that is not an RL trainer with this one outside the fences).
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from common import checkpoint, config, data, dist, guards, model as M
from common.config import RunArgs
from common.evaluate import evaluate
from common.kernels import token_gem, token_logprobs
from common.metrics import Logger
from common.rollout import Engine, context_limit

NAME = Path(__file__).stem


@dataclass
class Args(RunArgs):  # + the run, data, evaluation and checkpoint flags of common/config.py
    # --- algorithm ---
    loss: Literal["gem", "ce"] = "gem"   # GEM or plain cross-entropy SFT
    gem_beta: float = 0.7                # q = softmax(z / beta); beta = 1 is CE
    gem_h: Literal["linear", "logsigmoid"] = "linear"  # weights w_v: 1, or sigmoid((z_v - z_y) / 100)
    # --- end algorithm ---
    epochs: int = 2                      # passes over the training rows
    max_steps: int = 0                   # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 64                 # global sequences per optimizer step
    lr: float = 3e-3                     # tuned for the built-in model; the authors used 2e-5 on 8B models
    weight_decay: float = 0.01           # AdamW
    adam_beta2: float = 0.95             # AdamW's second-moment decay (the authors: 0.95)
    adam_eps: float = 1e-8               # Adam's denominator floor; updates of gradients below it are damped
    warmup_frac: float = 0.03            # linear warmup over this fraction of the steps
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine to 0 at the last step, or constant
    grad_clip: float = 1.0               # global grad-norm clip
    response_key: str = "response"       # data file field with the demonstration (GSM8K/MATH files: "answer")
    flawed_frac: float = 0.1             # built-in task: fraction of demonstrations with an arithmetic slip
    wording_variety: bool = False        # built-in task: demonstrations vary answer-neutral wording (separators, spaces, closing phrase)
    max_new_tokens: int = 64             # held-out evaluation: response length limit
    log_every: int = 10                  # metrics line every N steps (0: only the last)
    model: str = "tiny"                  # start model: "tiny" (the built-in one), an HF folder or a hub id
    train_size: int = 12000              # built-in task: training problems
    micro_batch_size: int = 32           # sequences per forward/backward on one rank (memory, not math)
    eval_k: int = 8                      # samples per held-out prompt at the end (0 = no evaluation)
    save_every: int = 100                # sharded checkpoint every N steps, at the end and on SIGTERM (0: only those)


# --- algorithm ---
def gem_loss(logits, targets, beta, h="linear"):
    """Per-token GEM loss sum_v q_v w_v (log p_v - log p_y); logits [n, V] fp32, targets [n]. The definition: the
    trainer computes the same loss and gradient without the [n, V] logits (kernels.token_gem; tests hold them equal)."""
    logp = logits.log_softmax(-1)
    logp_y = logp.gather(-1, targets[:, None])
    with torch.no_grad():  # q and w are weights, not functions of the parameters
        q = (logits / beta).softmax(-1)
        w = torch.sigmoid((logits - logits.gather(-1, targets[:, None])) / 100) if h == "logsigmoid" else 1.0
    return (q * w * (logp - logp_y)).sum(-1), -logp_y[:, 0]
# --- end algorithm ---


def get_lr(step, total, args):
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warmup over --warmup-frac of the
    steps, then cosine decay to 0 at the last step, or constant."""
    warm = min(1.0, (step + 1) / max(1, int(args.warmup_frac * total)))
    return args.lr * warm * (0.5 * (1 + math.cos(math.pi * min(1.0, step / total))) if args.schedule == "cosine" else 1.0)


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
    (out := Path(args.out_dir or f"runs/{NAME}-{args.loss}")).mkdir(parents=True, exist_ok=True)
    lm, tok = M.load(args.model, trust_remote_code=args.trust_remote_code)
    train_rows, eval_rows = data.load_split(args, tok, context_limit(M.resolve(args.model), args.max_len, args.trust_remote_code))
    train = encode(train_rows, tok)
    dist.print0(f"[{NAME}] {M.count_params(lm) / 1e6:.2f}M params, {len(train)} train / {len(eval_rows)} "
                f"held-out rows, world {d.world}, device {d.device}, loss {args.loss}")
    ckpt = checkpoint.prepare_run(out, args, NAME)  # refuses a run folder/flags that would lose or mix up a run

    policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device, dtype=args.train_dtype,
                            vocab_parallel=args.vocab_parallel)
    # fused: one in-place kernel, no temporaries the size of a parameter (0.5 GiB for a 0.5B model's embedding)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, args.adam_beta2), eps=args.adam_eps,
                            weight_decay=args.weight_decay, fused=True)
    steps_per_epoch = len(train) // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    stop, guard = guards.StopFlag(), guards.BadStepGuard(args.max_bad_steps, out)
    start = 0
    if ckpt:
        start = checkpoint.resume(ckpt, policy, opt)["step"]
        dist.print0(f"[{NAME}] resumed from {ckpt} at step {start}")
    log = Logger(out, total, main=d.main, track=args.track, run_name=out.name, config=asdict(args), start_step=start)

    for step in range(start, total):
        t0, epoch = time.time(), step // steps_per_epoch
        for g in opt.param_groups:
            g["lr"] = get_lr(step, total, args)
        mine = [train[i] for i in data.batch_indices(len(train), step, args.batch_size, args.seed, d.rank, d.world)]
        # global token-mean: every rank divides by the token count of the whole global batch
        n_tokens = dist.all_reduce(sum(len(s) - p for s, p in mine))
        sums = {"loss": 0.0, "ce_loss": 0.0, "entropy": 0.0}
        for i in range(0, len(mine), args.micro_batch_size):
            dist.micro_batch(policy, last=i + args.micro_batch_size >= len(mine))  # small models: one reduction per step
            ids, mask, targets = data.collate(mine[i:i + args.micro_batch_size], tok.pad_token_id, d.device)

            def head(hidden, weight):  # fused kernels: never build the [tokens x vocab] logits
                sel = targets != -100
                if args.loss == "ce":
                    logp, ent = token_logprobs(hidden[sel], weight, targets[sel])
                    return -logp.sum(), -logp.detach().sum(), ent.detach().sum()
                # gem_loss (above) on the [tokens x vocab] logits, computed vocabulary tile by tile
                # --- algorithm ---
                loss, ce, ent = token_gem(hidden[sel], weight, targets[sel], args.gem_beta, args.gem_h)
                # --- end algorithm ---
                return loss.sum(), ce.sum(), ent.sum()

            with guards.nan_outputs(policy, step + 1 in args.inject_nan):  # fault injection (tests): a NaN loss
                loss_sum, ce_sum, ent_sum = policy(ids, mask, head)
            # FSDP averages gradients over ranks; scale by world so the result is the global token-mean
            (loss_sum / n_tokens * d.world).backward()
            sums["loss"] += loss_sum.item(); sums["ce_loss"] += ce_sum.item(); sums["entropy"] += ent_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if guard.check(math.isfinite(grad_norm.item())):  # a non-finite step is skipped and counted
            opt.step()
        opt.zero_grad(set_to_none=True)
        m = {f"train/{k}": v * d.world for k, v in dist.mean_metrics(sums, {k: n_tokens for k in sums}).items()}
        m |= {"train/grad_norm": grad_norm.item(), "train/lr": get_lr(step, total, args), "train/epoch": epoch,
              "train/tokens_per_s": n_tokens / (time.time() - t0), "train/time_step": time.time() - t0,
              "train/bad_steps": guard.total}
        if (args.log_every and step % args.log_every == 0) or step == total - 1 or not math.isfinite(grad_norm.item()):
            log.log(step + 1, m, ["train/loss", "train/ce_loss", "train/entropy", "train/grad_norm"])
        if checkpoint.save_or_stop(step + 1, total=total, save_every=args.save_every, run_dir=out, model=policy,
                                   optimizer=opt, stop=stop, guard=guard, keep_last=args.keep_last, name=NAME,
                                   tokenizer=tok if args.export_every_save else None):
            return dist.cleanup()

    hf_dir = checkpoint.export_hf(policy, tok, out / "hf", d.main)
    dist.print0(f"[{NAME}] saved {hf_dir}")
    if args.eval_k == 0:
        return dist.cleanup()
    engine = Engine(hf_dir, args.rollout, seed=args.seed, max_model_len=args.max_len,
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    max_seqs=-(-len(eval_rows) // d.world) * args.eval_k, dtype=args.engine_dtype)
    t0 = time.time()
    ev = evaluate(engine, eval_rows, tok, k=args.eval_k, temperature=args.eval_temperature,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, rank=d.rank, world=d.world)
    log.log(total, {f"eval/{k}": v for k, v in ev.items()} | {"eval/seconds": time.time() - t0},
            ["eval/pass@1", f"eval/pass@{args.eval_k}", "eval/distinct_answers"])
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    with config.one_line_errors():  # a known bad input found while running: one `error:` line, exit code 2
        main(config.cli(Args))  # tyro, plus --config RUN/args.json to replay a run
    dist.exit_cleanly()  # no interpreter finalization after a finished run (see there why)
