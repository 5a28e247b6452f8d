"""The demo: the whole pipeline on the built-in task, on a CPU, in minutes.

    python demo.py            # GEM and CE cold starts (evaluated at T = beta, 1 and greedy), GRPO/ReMax/RAFT++/
                              # Reinforce-rej from GEM, GRPO and ReMax from CE; held-out pass@1 every 5 RL steps
    python demo.py --quick    # a smoke test of the same pipeline (tiny runs)

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


def run(script, out, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script, *args,
           *(["--out", str(out)] if script == "eval.py" else
             ["--out-dir", str(out), "--overwrite"])]  # a re-run of the demo replaces its runs (a trainer refuses a used folder)
    print(f"\n$ {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.time() - t0


def last(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else float("nan")


def first(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[0] if vals else float("nan")


def main(a: Args):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.sft_steps, a.rl_steps, a.rl_eval_every = 20, 2, 2
    small = ["--eval-size", "16"] if a.quick else []
    secs = {}
    temps = [BETA, 1.0, 0.0]  # T = beta recovers the data distribution for GEM (p ~ d^beta); 0 = greedy
    for loss in ["gem", "ce"]:
        steps = ["--max-steps", str(a.sft_steps)] if a.sft_steps else []
        secs[f"sft-{loss}"] = run("gem_sft.py", out / f"sft-{loss}", "--loss", loss, "--gem-beta", str(BETA),
                                  "--eval-k", "0", *steps, *small, nproc=a.nproc)
        secs[f"eval-{loss}"] = run("eval.py", out / f"sft-{loss}" / "eval.json", "--model", str(out / f"sft-{loss}" / "hf"),
                                   "--k", "8", "--temperature", *map(str, temps), "--samples", "0", *small, nproc=a.nproc)
    rl = [("grpo", "gem"), ("remax", "gem"), ("raftpp", "gem"), ("reinforce_rej", "gem"), ("grpo", "ce"), ("remax", "ce")]
    for algo, start in rl:
        secs[f"{algo}-from-{start}"] = run(f"{algo}.py", out / f"{algo}-from-{start}", "--model",
                                           str(out / f"sft-{start}" / "hf"), "--steps", str(a.rl_steps),
                                           "--eval-every", str(a.rl_eval_every), "--log-kl-ref", *small,
                                           nproc=a.nproc)  # --log-kl-ref: the table's KL to pi_ref (KL coef 0)
    # figures
    from plot import plot
    runs = [out / f"{algo}-from-{start}" for algo, start in rl]
    plot([str(r) for r in runs], str(out / "curves.png"))
    # tables
    lines = ["## Cold start (held-out split, 8 samples per prompt; greedy: one)", "",
             "| start | T | pass@1 | pass@8 | maj@8 | distinct answers / 8 | train CE | seconds (train + eval) |",
             "|---|---|---|---|---|---|---|---|"]
    for loss in ["gem", "ce"]:
        ce = last(read(out / f"sft-{loss}" / "metrics.jsonl"), "train/ce_loss")
        for r in json.loads((out / f"sft-{loss}" / "eval.json").read_text())["by_temperature"]:
            t = "greedy" if r["temperature"] == 0 else f"{r['temperature']:g}"
            at8 = " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in ("pass@8", "maj@8"))  # greedy: one sample
            lines.append(f"| {loss.upper()} | {t} | {r['pass@1']:.3f} | {at8} | {r['distinct_answers']:.2f} | {ce:.3f} | "
                         f"{secs[f'sft-{loss}']:.0f} + {secs[f'eval-{loss}']:.0f} |")
    lines += ["", f"## RL ({a.rl_steps} steps; held-out pass@1 with 4 samples per prompt at T=1)", "",
              "| run | pass@1 at each evaluation (every " + str(a.rl_eval_every) + " steps) | pass@4 end | "
              "train accuracy first → last | entropy end | KL to π_ref end | seconds |", "|---|---|---|---|---|---|---|"]
    for (algo, start), r in zip(rl, runs):
        rows = read(r / "metrics.jsonl")
        curve = " → ".join(f"{x['eval/pass@1']:.3f}" for x in rows if "eval/pass@1" in x)
        lines.append(f"| {algo} from {start.upper()} | {curve} | "
                     f"{last(rows, 'eval/pass@4'):.3f} | {first(rows, 'train/accuracy'):.3f} → "
                     f"{last(rows, 'train/accuracy'):.3f} | {last(rows, 'train/entropy'):.3f} | "
                     f"{last(rows, 'train/kl_ref'):.4f} | {secs[f'{algo}-from-{start}']:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "seconds.json").write_text(json.dumps(secs, indent=1))
    print("\n" + table + f"\n\nfigures: {out / 'curves.png'}\ntotal: {sum(secs.values()):.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
