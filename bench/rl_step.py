"""Seconds per RL step on a real model (SmolLM2-135M-Instruct), by phase, on 2 ranks: this checkout, and optionally
another commit measured in the same run, alternating run by run so that machine load hits both alike.

    python bench/rl_step.py                            # both settings, this checkout
    python bench/rl_step.py --vs 819848c --pairs 2     # and commit 819848c: base, new, base, new per setting
    python bench/rl_step.py --setting builtin -- --train-dtype bfloat16   # extra trainer flags after --

Settings (grpo.py, 8 prompts x 4 samples, T = 1, one optimizer step per rollout batch (--mini-batches 1), no KL, as
issue 25's side-by-side with TRL): `builtin`, the built-in task through the chat template, at most 64 new tokens;
`gsm8k`, prompts from ../shared/data/gsm8k_train.jsonl, at most 256 new tokens. Each run trains --steps steps; the
first --warmup are left out. Per run: the median over its steps of the step's seconds (the trainer's time_* phases:
generate, logprob, update, sync) and each phase's share; generated tokens/s (the engine's, both ranks); trained
tokens/s (prompt + response tokens of the step's rows / the update's seconds). Across runs: the median.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COMMON = ["--model", "smollm2-135m-instruct", "--prompts-per-step", "8", "--n-samples", "4", "--temperature", "1.0",
          "--mini-batches", "1", "--micro-batch-size", "8", "--kl-coef", "0", "--eval-every", "0", "--eval-size", "8",
          "--eval-k", "1", "--save-every", "0"]
SETTINGS = {"builtin": ["--max-new-tokens", "64"],
            "gsm8k": ["--data", str(DATA / "gsm8k_train.jsonl"), "--max-new-tokens", "256", "--max-len", "1024"]}
PHASES = ("generate", "logprob", "update", "sync")


def checkout(rev):
    """A worktree of `rev` under runs/ (made once), sharing this checkout's .venv and converted model."""
    path = ROOT / "runs" / f"bench-rev-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
        (path / ".venv").symlink_to(ROOT / ".venv")
    model = path / "runs" / "smollm2-135m-instruct"  # the model setup.sh converted, shared rather than converted again
    if not model.exists():
        model.parent.mkdir(exist_ok=True)
        model.symlink_to(ROOT / "runs" / model.name)
    return path


def one_run(code, setting, steps, extra, out):
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master-port", str(_free_port()),
           str(code / "grpo.py"), *COMMON, *SETTINGS[setting], "--steps", str(steps), "--out-dir", str(out), *extra]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"error: run failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train/loss"' in x]
    return rows, time.time() - t0


def summarize(rows, warmup):
    rows = rows[warmup:]
    step = [sum(r.get(f"train/time_{p}", 0) for p in PHASES) for r in rows]
    rows_per_step = 32
    trained = [r["train/seq_len"] * rows_per_step / r["train/time_update"] for r in rows if "train/seq_len" in r]
    return {"step_s": statistics.median(step),
            "phases": {p: statistics.median(r.get(f"train/time_{p}", 0) for r in rows) for p in PHASES},
            "gen_tok_s": statistics.median(r["train/gen_tokens_per_s"] for r in rows),
            "trained_tok_s": statistics.median(trained) if trained else float("nan"),
            "response_len": statistics.median(r["train/response_len"] for r in rows),
            "gap": statistics.median(r.get("train/logprob_gap", float("nan")) for r in rows)}


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--vs", default=None, help="a commit to measure in the same run, alternating with this checkout")
    ap.add_argument("--pairs", type=int, default=2, help="runs of each (alternating)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--base-flags", default="", help="trainer flags for the --vs runs only (space-separated)")
    ap.add_argument("extra", nargs="*", help="trainer flags for this checkout's runs, after --")
    args = ap.parse_args()
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")),
               platform.processor())
    flags = open("/proc/cpuinfo").read()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; avx512_bf16: {'avx512_bf16' in flags}, amx_bf16: {'amx_bf16' in flags}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    codes = ([("base " + args.vs, checkout(args.vs), args.base_flags.split())] if args.vs else []) + \
        [("this checkout", ROOT, args.extra)]
    results = {}
    for setting in args.setting:
        for i in range(args.pairs):
            for name, code, extra in codes:
                rows, wall = one_run(code, setting, args.steps, extra, ROOT / "runs" / "bench-rl-step" / setting)
                s = summarize(rows, args.warmup)
                results.setdefault((setting, name), []).append(s)
                print(f"[{setting}] {name} run {i + 1}: {s['step_s']:.1f} s/step "
                      + ", ".join(f"{p} {v:.1f}" for p, v in s["phases"].items())
                      + f"; gen {s['gen_tok_s']:.0f} tok/s, trained {s['trained_tok_s']:.0f} tok/s, gap {s['gap']:.1e} "
                        f"(run {wall:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| setting | code | s / step | generate | log-prob | update | sync | generated tok/s | trained tok/s | "
          "log-prob gap | x base |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in args.setting:
        base = None
        for name, _, _ in codes:
            runs = results[(setting, name)]
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            step = med("step_s")
            base = base or step
            ph = {p: statistics.median(r["phases"][p] for r in runs) for p in PHASES}
            print(f"| {setting} | {name} | {step:.1f} | " + " | ".join(f"{ph[p]:.1f} ({ph[p] / step:.0%})" for p in PHASES)
                  + f" | {med('gen_tok_s'):.0f} | {med('trained_tok_s'):.0f} | {med('gap'):.1e} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
