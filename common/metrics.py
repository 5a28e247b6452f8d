"""Metrics: one JSON object per line in <out_dir>/metrics.jsonl (flat names such as `train/loss`,
`eval/pass@1`), a readable console line with a progress bar, optional wandb/tensorboard (--track).
Only rank 0 writes; values are expected to be already reduced across ranks."""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from common import losses
from common.batch import Batch
from common.dist import all_reduce, mean_metrics


class Logger:
    def __init__(self, out_dir, total_steps, main=True, track=None, run_name=None, config=None, start_step=0):
        """Appends to <out_dir>/metrics.jsonl and never truncates it. A new run (start_step 0) needs a file
        without rows (checkpoint.prepare_run refuses such a folder first); a run resumed at start_step moves the
        rows a killed run wrote after its last checkpoint (and any torn line) to metrics.dropped.jsonl, so that
        its log equals an uninterrupted run's and nothing it wrote is lost."""
        self.main, self.total, self.t0 = main, total_steps, time.time()
        self.path = Path(out_dir) / "metrics.jsonl"
        if main and self.path.exists():
            lines = [line.rstrip("\n") + "\n" for line in self.path.read_text().splitlines() if line.strip()]
            if lines and not start_step:
                raise FileExistsError(f"{self.path} already has {len(lines)} rows: a new run does not overwrite "
                                      f"them (--resume, --overwrite or another --out-dir)")
            keep = [_step(line) is not None and _step(line) <= start_step for line in lines]
            if not all(keep):
                with open(self.path.with_name("metrics.dropped.jsonl"), "a") as f:
                    f.write("".join(x for x, k in zip(lines, keep) if not k))
                    f.flush()
                    os.fsync(f.fileno())
                tmp = self.path.with_name("metrics.jsonl.tmp")
                tmp.write_text("".join(x for x, k in zip(lines, keep) if k))
                os.replace(tmp, self.path)  # atomic: the old file or the new one, never a partial one
        self.sinks = []
        if main and track == "wandb":
            import wandb
            self.sinks.append(wandb.init(project="rl-posttrain", name=run_name, config=config).log)
        elif main and track == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(Path(out_dir) / "tb"))
            self.sinks.append(lambda d, step: [tb.add_scalar(k, v, step) for k, v in d.items()])

    def log(self, step, metrics, console_keys=None):
        if not self.main:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink({k: v for k, v in row.items() if isinstance(v, float)}, step=step)
        keys = console_keys or [k for k in metrics if isinstance(metrics[k], (int, float))][:6]
        done = min(step / max(self.total, 1), 1.0)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        el = time.time() - self.t0
        eta = el / done - el if done > 0 else float("nan")
        vals = " ".join(f"{k.split('/')[-1]}={_fmt(metrics[k])}" for k in keys if k in metrics)
        print(f"[{bar}] {step}/{self.total} {el:5.0f}s eta {eta:4.0f}s | {vals}", file=sys.stdout, flush=True)


def rl_step_metrics(b: Batch, old_logp, *, rewards, samples, update, times, args, world, gen_tokens, rounds, kept,
                    reward_failures):
    """One RL step's log: global means over ranks, each a named sum divided by a named count, in one all-reduce.
    b the step's batch; old_logp pi_old as rl_update used it; rewards [P, n] the trained groups' verifier scores;
    samples their responses; update rl_update's sums; times the phases' end times; gen_tokens, rounds, kept: the
    tokens generated, the generation rounds (P prompts each) and the groups they kept before the cut to P (DAPO's
    dynamic sampling; one round and every group otherwise); reward_failures: answers whose verifier timed out or
    failed (scored 0). kl_ref (steps that run pi_ref): the --kl-estimator's mean over response tokens, with pi_old.
    The rollout mismatch, logged whether --tis-cap corrects it or not: logprob_gap, the mean |log pi_engine -
    log pi_old| per response token, and the ratio pi_old / pi_engine of losses.tis_weights before its cap: its mean
    and max over response tokens, and tis_capped, the share of tokens above the cap (above 2, the paper's C, when
    --tis-cap is 0: what the correction would cap)."""
    B, n_tok, on, P = len(samples), b.mask.sum().item(), b.mask.bool(), len(rewards)
    ratio = torch.exp((old_logp - b.engine_logp).clamp(-20, 20))[on]
    sums = {"reward": (rewards.sum().item(), B), "accuracy": ((rewards > 0).sum().item(), B),
            "adv_mean": ((b.adv * b.mask).sum().item(), n_tok), "adv_sq": ((b.adv ** 2 * b.mask).sum().item(), n_tok),
            "nonzero_adv": (((b.adv * b.mask).abs().sum(-1) > 0).sum().item(), B),  # responses with a gradient
            "in_loss": (b.in_loss.sum().item(), B), "response_len": (n_tok, B),
            "seq_len": (b.attn.sum().item(), B),  # prompt + response tokens per row (what the update computes)
            "truncated": (sum(s.finish == "length" for s in samples), B),
            "zero_var_groups": ((rewards == rewards[:, :1]).all(1).sum().item(), P), "entropy": (update["entropy"], n_tok),
            "logprob_gap": ((b.engine_logp - old_logp).abs()[on].sum().item(), n_tok),  # engine vs trainer
            "tis_ratio_mean": (ratio.sum().item(), n_tok),
            "tis_capped": ((ratio > (args.tis_cap or 2.0)).sum().item(), n_tok),
            "gen_rounds": (rounds, 1), "dropped_groups": (rounds * P - kept, rounds * P),
            "reward_failures": (reward_failures, 1.0 / world)}  # a count, not a mean
    if b.ref_logp is not None:
        sums["kl_ref"] = ((losses.kl(old_logp, b.ref_logp, args.kl_estimator) * b.mask).sum().item(), n_tok)
    m = mean_metrics({k: v for k, (v, _) in sums.items()}, {k: c for k, (_, c) in sums.items()})
    m["adv_std"] = max(m.pop("adv_sq") - m["adv_mean"] ** 2, 0.0) ** 0.5
    m["tis_ratio_max"] = all_reduce(ratio.max().item() if len(ratio) else 0.0, "max")
    loss, clip_frac = all_reduce([update["loss"], update["clip_frac"]]).tolist()  # per-rank shares of global means
    m |= {"loss": loss / update["updates"], "clip_frac": clip_frac / update["updates"],
          "grad_norm": update["grad_norm"] / update["updates"],
          "gen_tokens_per_s": all_reduce(gen_tokens) / (times["generate"] - times["start"])}
    return m | {f"time_{k}": times[k] - times[prev] for prev, k in zip(list(times)[:-1], list(times)[1:])}


def log_samples(logger, step, prompts, samples, rewards, k=4):
    """Append the first k sampled responses of this step (rank 0's) to <out_dir>/samples.jsonl, one JSON object
    per response: step, prompt, response, reward. What the model actually writes, next to the numbers."""
    if not logger.main:
        return
    n = max(1, len(samples) // max(1, len(prompts)))
    with open(logger.path.with_name("samples.jsonl"), "a") as f:
        for i, s in enumerate(samples[:k]):
            f.write(json.dumps({"step": step, "prompt": prompts[i // n], "response": s.text,
                                "reward": float(rewards[i])}) + "\n")


def read(path):
    """All rows of a metrics.jsonl (for plots, tests and tables)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _step(line):
    """The step of a metrics.jsonl line, None for a torn or foreign line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _fmt(v):
    if not isinstance(v, (int, float)) or math.isnan(v):
        return str(v)
    return f"{v:.4g}"
