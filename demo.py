"""The demo: the whole pipeline on the built-in task, on a CPU, in minutes.

    python demo.py            # GEM and CE cold starts (evaluated at T = beta, 1 and greedy), GRPO/ReMax/RAFT++/
                              # Reinforce-rej from GEM, GRPO and ReMax from CE; held-out pass@1 every 5 RL steps
    python demo.py --quick    # a smoke test of the same pipeline (tiny runs)
    python demo.py --model smollm2-135m-instruct   # a real pretrained model (27 min measured on 2 cores): GEM and CE
                              # cold starts, GRPO/ReMax/RAFT++/Reinforce-rej from GEM, 10 RL steps each

The real-model demo runs the built-in task at one operation per problem ("3+4=", operands 1..5) through the model's
chat template: SmolLM2-135M-Instruct answers 10% of it greedily and 0.3% at T = 1 zero-shot (it rarely ends with
\boxed{}), 20 GEM steps bring it to about 40% at T = 1, and RL improves that within minutes; GSM8K is out of reach
for 135M parameters (docs/real-model.md). RL starts from GEM only, and 10 steps each: a step of the 135M model takes
about 20 s on 2 cores (plus its evaluations), and the hour the demo may take does not hold both starts' RL.

Each stage is one of the trainers, run with torchrun exactly as a user would; this script only
chains them, then draws the curves (plot.py) and writes a markdown results table.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.metrics import read

ROOT = Path(__file__).resolve().parent
BETA = 0.7  # GEM's beta (gem_sft.py's default)


@dataclass
class Args:
    out: str = "runs/demo"               # folder of all the demo's runs, results.md and curves.png
    nproc: int = 2                       # ranks per run (torchrun --nproc_per_node)
    sft_steps: int = 0                   # GEM / CE cold-start steps (0 = gem_sft.py default)
    rl_steps: int = 15                   # steps of each RL run
    rl_eval_every: int = 5               # held-out evaluation every N RL steps (the curves in curves.png)
    quick: bool = False                  # smoke test: a few steps of everything
    model: str = "tiny"                  # "tiny" (the built-in model), or a real one, e.g. smollm2-135m-instruct (see above)


class Progress:
    """One line per stage: stage i of n, elapsed time, and an ETA from the stages' expected shares of the total."""

    def __init__(self, weights):
        self.weights, self.done, self.t0 = weights, 0.0, time.time()

    def start(self, name):
        el, total = time.time() - self.t0, sum(self.weights.values())
        eta = f"{el / self.done * (total - self.done):.0f} s" if self.done else "?"
        print(f"\n[demo] {list(self.weights).index(name) + 1}/{len(self.weights)} {name} | elapsed {el:.0f} s | "
              f"ETA {eta}", flush=True)

    def end(self, name):
        self.done += self.weights[name]


def run(script, out, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script, *args,
           *(["--out", str(out)] if script == "eval.py" else
             ["--out-dir", str(out), "--overwrite"])]  # a re-run of the demo replaces its runs (a trainer refuses a used folder)
    print(f"\n$ {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.time() - t0


# The real-model demo's settings (see the docstring): the task, and each stage's flags
REAL_TASK = ["--difficulty", "1", "--max-num", "5"]
REAL_SFT = ["--batch-size", "32", "--micro-batch-size", "16", "--max-steps", "20", "--lr", "5e-5", "--eval-size", "100"]
REAL_EVAL = ["--eval-size", "100", "--k", "4", "--max-new-tokens", "64"]
REAL_RL = ["--eval-size", "50", "--eval-k", "2", "--prompts-per-step", "8", "--n-samples", "4", "--max-new-tokens",
           "64", "--lr", "1e-5", "--save-every", "0"]


def last(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else float("nan")


def first(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[0] if vals else float("nan")


def main(a: Args):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    real = a.model != "tiny"
    if real:  # fewer, costlier steps (see the docstring)
        a.rl_steps = 10 if a.rl_steps == Args.rl_steps else a.rl_steps
    if a.quick:
        a.sft_steps, a.rl_steps, a.rl_eval_every = (2, 1, 1) if real else (20, 2, 2)
    small = ["--eval-size", "4" if real else "16"] if a.quick else []
    sft_args = ["--model", a.model, *REAL_TASK, *REAL_SFT] if real else []
    eval_args = [*REAL_TASK, *REAL_EVAL] if real else ["--k", "8"]
    k = 4 if real else 8
    rl_args = [*REAL_TASK, *REAL_RL] if real else []
    secs = {}
    temps = [BETA, 1.0, 0.0]  # T = beta recovers the data distribution for GEM (p ~ d^beta); 0 = greedy
    rl = [("grpo", "gem"), ("remax", "gem"), ("raftpp", "gem"), ("reinforce_rej", "gem")] + \
        ([] if real else [("grpo", "ce"), ("remax", "ce")])
    # expected shares of the time (seconds measured on 2 cores), for the ETA
    per = dict(sft=330, eval=150, rl=450) if real else dict(sft=60, eval=20, rl=40)
    progress = Progress({**{f"{s}-{loss}": per[s] for loss in ("gem", "ce") for s in ("sft", "eval")},
                         **{f"{algo}-from-{start}": per["rl"] for algo, start in rl}})
    for loss in ["gem", "ce"]:
        steps = ["--max-steps", str(a.sft_steps)] if a.sft_steps else []
        progress.start(f"sft-{loss}")
        secs[f"sft-{loss}"] = run("gem_sft.py", out / f"sft-{loss}", *sft_args, "--loss", loss, "--gem-beta", str(BETA),
                                  "--eval-k", "0", *steps, *small, nproc=a.nproc)
        progress.end(f"sft-{loss}")
        progress.start(f"eval-{loss}")
        secs[f"eval-{loss}"] = run("eval.py", out / f"sft-{loss}" / "eval.json", "--model", str(out / f"sft-{loss}" / "hf"),
                                   *eval_args, "--temperature", *map(str, temps), "--samples", "0", *small, nproc=a.nproc)
        progress.end(f"eval-{loss}")
    for algo, start in rl:
        progress.start(f"{algo}-from-{start}")
        secs[f"{algo}-from-{start}"] = run(f"{algo}.py", out / f"{algo}-from-{start}", "--model",
                                           str(out / f"sft-{start}" / "hf"), "--steps", str(a.rl_steps),
                                           "--eval-every", str(a.rl_eval_every), "--log-kl-ref", *rl_args, *small,
                                           nproc=a.nproc)  # --log-kl-ref: the table's KL to pi_ref (KL coef 0)
        progress.end(f"{algo}-from-{start}")
    # figures
    from plot import plot
    runs = [out / f"{algo}-from-{start}" for algo, start in rl]
    plot([str(r) for r in runs], str(out / "curves.png"))
    # tables
    title = f"{a.model}, built-in task at difficulty 1" if real else "the built-in model and task"
    lines = [f"# Demo: {title}", "", f"## Cold start (held-out split, {k} samples per prompt; greedy: one)", "",
             f"| start | T | pass@1 | pass@{k} | maj@{k} | distinct answers / {k} | train CE | seconds (train + eval) |",
             "|---|---|---|---|---|---|---|---|"]
    for loss in ["gem", "ce"]:
        ce = last(read(out / f"sft-{loss}" / "metrics.jsonl"), "train/ce_loss")
        for r in json.loads((out / f"sft-{loss}" / "eval.json").read_text())["by_temperature"]:
            t = "greedy" if r["temperature"] == 0 else f"{r['temperature']:g}"
            at8 = " | ".join(f"{r[c]:.3f}" if c in r else "–" for c in (f"pass@{k}", f"maj@{k}"))  # greedy: one sample
            lines.append(f"| {loss.upper()} | {t} | {r['pass@1']:.3f} | {at8} | {r['distinct_answers']:.2f} | {ce:.3f} | "
                         f"{secs[f'sft-{loss}']:.0f} + {secs[f'eval-{loss}']:.0f} |")
    rk = 2 if real else 4
    lines += ["", f"## RL ({a.rl_steps} steps; held-out pass@1 with {rk} samples per prompt at T=1)", "",
              "| run | pass@1 at each evaluation (every " + str(a.rl_eval_every) + f" steps) | pass@{rk} end | "
              "train accuracy first → last | entropy end | KL to π_ref end | seconds |", "|---|---|---|---|---|---|---|"]
    for (algo, start), r in zip(rl, runs):
        rows = read(r / "metrics.jsonl")
        curve = " → ".join(f"{x['eval/pass@1']:.3f}" for x in rows if "eval/pass@1" in x)
        lines.append(f"| {algo} from {start.upper()} | {curve} | "
                     f"{last(rows, f'eval/pass@{rk}'):.3f} | {first(rows, 'train/accuracy'):.3f} → "
                     f"{last(rows, 'train/accuracy'):.3f} | {last(rows, 'train/entropy'):.3f} | "
                     f"{last(rows, 'train/kl_ref'):.4f} | {secs[f'{algo}-from-{start}']:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "seconds.json").write_text(json.dumps(secs, indent=1))
    print("\n" + table + f"\n\nfigures: {out / 'curves.png'}\ntotal: {sum(secs.values()):.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
