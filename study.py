"""The claims study: do the seeds' claims hold on the built-in task? Every setting with several seeds, mean ± std.

    python study.py                                  # every stage, seeds 0 1 2 (hours on 2 cores: see docs/results.md)
    python study.py --stages coldstart rl remax      # some stages; re-running skips what is done (resumable)
    python study.py --report                         # only rewrite runs/study/results.md and the figures
    python study.py --quick                          # a smoke test of the pipeline (tiny runs, one seed)

Stages (in the order they run; each job is one trainer or eval.py run, exactly as a user would type it):
  coldstart  CE vs GEM (ours: beta 0.7, linear h, wd 0.01) vs GEM as the authors ran it (logsigmoid h, no wd);
             each model evaluated on the held-out split at T in {beta, 0.7, 1.0} and greedy, pass@k for k = 1..K
  rl         ReMax and GRPO from the CE and the GEM cold start of the same seed, held-out pass@1 every 5 steps
  rleval     their final models evaluated at T = 0.7, 1.0 and greedy (8 samples per prompt)
  remax      why ReMax stalls: the same ReMax from GEM with top-p 0.9, training temperature 0.7, k1 KL in the
             reward (verl's example), the paper's REINFORCE loss (seq-mean-token-sum, one mini-batch), lr x2;
             and GRPO --no-std-norm (baseline = the group's mean reward instead of the greedy one)
  beta       GEM beta in {0.5, 0.85} x h in {linear, logsigmoid} and beta 0.7 with logsigmoid h (wd 0.01): the grid
             around ours (beta 1.0 with linear h has CE's gradient: the coldstart stage's `ce`)
  beta-rl    ReMax and GRPO from the beta = 0.5 cold start (the beta stage's best pass@k), as in rl and rleval
  epochs     CE and GEM at 1 and 4 epochs (the paper: CE loses diversity as epochs grow)
  long       GRPO vs RAFT++ vs Reinforce-rej from GEM over --long-steps (early lead, entropy, accuracy vs KL)
  forks      RLOO, GSPO and DAPO from GEM, exactly as the long stage runs GRPO (same steps, evaluations, seeds)
  realism    CE and GEM with --wording-variety (answer-neutral variety in the demonstrations)
  realism-rl GRPO and ReMax from those
A job is done when its folder holds `.study_done` (written after the run exits 0); a half-finished job is
re-run from scratch (--overwrite). Logs: <run>/log.txt. The report reads whatever runs exist, so a partial
study still reports, with n (the number of seeds) beside every mean.
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.metrics import read

ROOT = Path(__file__).resolve().parent
STAGES = ("coldstart", "rl", "rleval", "remax", "realism", "beta", "realism-rl", "beta-rl", "epochs", "long", "forks")

# cold starts: name -> gem_sft.py flags (gem_sft's defaults otherwise: beta 0.7, linear h, wd 0.01, 2 epochs)
COLD = {
    "ce": ["--loss", "ce"],
    "gem": ["--loss", "gem"],
    "gem-authors": ["--loss", "gem", "--gem-h", "logsigmoid", "--weight-decay", "0"],
    "gem-b0.5": ["--loss", "gem", "--gem-beta", "0.5"],
    "gem-b0.85": ["--loss", "gem", "--gem-beta", "0.85"],
    "gem-logsig": ["--loss", "gem", "--gem-h", "logsigmoid"],
    "gem-b0.5-logsig": ["--loss", "gem", "--gem-beta", "0.5", "--gem-h", "logsigmoid"],
    "gem-b0.85-logsig": ["--loss", "gem", "--gem-beta", "0.85", "--gem-h", "logsigmoid"],
    "ce-e1": ["--loss", "ce", "--epochs", "1"], "gem-e1": ["--loss", "gem", "--epochs", "1"],
    "ce-e4": ["--loss", "ce", "--epochs", "4"], "gem-e4": ["--loss", "gem", "--epochs", "4"],
    "ce-var": ["--loss", "ce", "--wording-variety"], "gem-var": ["--loss", "gem", "--wording-variety"],
}
REMAX_VARIANTS = {  # name -> remax.py flags; what each tests is in the module docstring
    "topp0.9": ["--top-p", "0.9"], "temp0.7": ["--temperature", "0.7"],
    "klreward": ["--kl-coef", "0.001", "--kl-in", "reward", "--kl-estimator", "k1"],
    "reinforce": ["--loss-agg", "seq-mean-token-sum", "--mini-batches", "1"],
    "lr2e-4": ["--lr", "2e-4"],  # the signal-scale hypothesis: ReMax's A = r - b has ~0.6x GRPO's spread per token
}


@dataclass
class Args:
    out: str = "runs/study"              # folder of every run, results.md and the figures
    stages: tuple[str, ...] = STAGES     # which stages to run (see the module docstring), in this order
    seeds: tuple[int, ...] = (0, 1, 2)   # every setting runs once per seed (cold start seed s -> RL seed s)
    nproc: int = 2                       # ranks per run (torchrun --nproc_per_node)
    eval_k: int = 32                     # cold starts: samples per held-out prompt (pass@k for k = 1, 2, 4, .., eval_k)
    rl_steps: int = 30                   # steps of the rl / remax / realism RL runs
    rl_eval_every: int = 5               # their held-out evaluation period
    long_steps: int = 100                # steps of the long runs
    report: bool = False                 # only rewrite results.md and the figures from the runs on disk
    quick: bool = False                  # smoke test: tiny runs, seed 0 only


def beta_of(name):
    """The GEM beta of a cold start (CE: 1.0): the temperature at which linear-h GEM recovers the data."""
    flags = COLD[name]
    return float(flags[flags.index("--gem-beta") + 1]) if "--gem-beta" in flags else 1.0 if "ce" in flags else 0.7


def jobs(a):
    """Every job of the chosen stages, in run order: (stage, run folder name, argv after `torchrun ... script`).
    Seed-major inside a stage, so a stage cut short has every setting at the first seeds."""
    small = ["--eval-size", "16"] if a.quick else []
    sft_small = ["--max-steps", "10"] if a.quick else []
    out = []

    def cold(stage, names):
        for s in a.seeds:
            for c in names:
                out.append((stage, f"sft-{c}-s{s}", ["gem_sft.py", *COLD[c], "--seed", str(s), "--eval-k", "0",
                                                     *sft_small, *small]))
                evaluate(stage, f"sft-{c}-s{s}", s, c, a.eval_k,
                         ["--ks", *[str(2 ** i) for i in range(int(math.log2(a.eval_k)) + 1)]])

    def evaluate(stage, run, s, c, k, extra=()):  # eval.py on <run>/hf at T = 0.7, 1, cold start c's beta and greedy
        temps = sorted({beta_of(c), 0.7, 1.0}) + [0.0]
        out.append((stage, f"{run}/eval", ["eval.py", "--model", f"{a.out}/{run}/hf", "--seed", str(s), "--k", str(k),
                                           *extra, "--temperature", *map(str, temps), "--samples", "0", *small]))

    def rl(stage, algos, starts, steps, every, extra=(), tag=""):
        for s in a.seeds:
            for algo in algos:
                for c in starts:
                    out.append((stage, f"{algo}{tag}-from-{c}-s{s}", [
                        f"{algo}.py", "--model", f"{a.out}/sft-{c}-s{s}/hf", "--seed", str(s), "--steps", str(steps),
                        "--eval-every", str(every), "--save-every", "0", "--log-kl-ref", *extra, *small]))

    def final_evals(stage, algos, starts):  # RL final models, 8 samples per prompt
        for s in a.seeds:
            for algo in algos:
                for c in starts:
                    evaluate(stage, f"{algo}-from-{c}-s{s}", s, c, 8)

    steps, every = (2, 1) if a.quick else (a.rl_steps, a.rl_eval_every)
    for stage in a.stages:
        if stage == "coldstart":
            cold(stage, ["ce", "gem", "gem-authors"])
        elif stage == "rl":
            rl(stage, ["remax", "grpo"], ["gem", "ce"], steps, every)
        elif stage == "rleval":  # the rl stage's final models, like with like: T = 0.7, 1 and greedy
            final_evals(stage, ["remax", "grpo"], ["gem", "ce"])
        elif stage == "remax":
            for v, flags in REMAX_VARIANTS.items():
                rl(stage, ["remax"], ["gem"], steps, every, flags, tag=f"-{v}")
            # the baseline-gap test: the same REINFORCE-style update with the group mean as the baseline
            # (Dr. GRPO: A = r - mean(r), no std) instead of ReMax's greedy reward
            rl(stage, ["grpo"], ["gem"], steps, every, ["--no-std-norm"], tag="-nostd")
        elif stage == "beta":
            cold(stage, ["gem-b0.5", "gem-b0.85", "gem-logsig", "gem-b0.5-logsig", "gem-b0.85-logsig"])
        elif stage == "beta-rl":
            rl(stage, ["remax", "grpo"], ["gem-b0.5"], steps, every)
            final_evals(stage, ["remax", "grpo"], ["gem-b0.5"])
        elif stage == "epochs":
            cold(stage, ["ce-e1", "gem-e1", "ce-e4", "gem-e4"])
        elif stage in ("long", "forks"):  # the forks' runs sit beside GRPO's in the long runs' table and figure
            long_steps, long_every = (2, 1) if a.quick else (a.long_steps, 10)
            rl(stage, ["grpo", "raftpp", "reinforce_rej"] if stage == "long" else ["rloo", "gspo", "dapo"], ["gem"],
               long_steps, long_every, tag="-long")
        elif stage == "realism":
            cold(stage, ["ce-var", "gem-var"])
        elif stage == "realism-rl":
            rl(stage, ["grpo", "remax"], ["gem-var", "ce-var"], steps, every)
        else:
            raise SystemExit(f"error: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return out


def run_all(a):
    out, todo = Path(a.out), jobs(a)
    secs_path = out / "seconds.json"
    secs = json.loads(secs_path.read_text()) if secs_path.exists() else {}
    t_start = time.time()
    for i, (stage, name, argv) in enumerate(todo):
        run = out / name
        if (run / ".study_done").exists():
            continue
        is_eval = argv[0] == "eval.py"
        if "--model" in argv and not Path(argv[argv.index("--model") + 1]).is_dir():
            raise SystemExit(f"error: {name} starts from {argv[argv.index('--model') + 1]}, which does not exist: "
                             f"run the stage that trains it first (python study.py --stages coldstart ...)")
        run.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), *argv]
        if is_eval:
            cmd += ["--out", str(run / "eval.json")]
        else:
            cmd += ["--out-dir", str(run), "--overwrite"]  # a half-finished run starts again
        left = [n for _, n, _ in todo[i:] if not (out / n / ".study_done").exists()]
        eta = sum(_expected(secs, n) for n in left)
        print(f"[study {i + 1}/{len(todo)} | {stage} | {name} | elapsed {(time.time() - t_start) / 60:.0f} min, "
              f"~{eta / 60:.0f} min left] {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(run / "log.txt" if is_eval else out / f"{name}.log.txt", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode
        if rc:
            raise SystemExit(f"error: {name} exited {rc}; its log: {log.name}")
        secs[name] = round(time.time() - t0, 1)
        secs_path.write_text(json.dumps(secs, indent=1))
        (run / ".study_done").write_text(f"{secs[name]}\n")
        if is_eval or (i + 1 < len(todo) and todo[i + 1][0] != stage):
            report(a)  # results so far: a long study is readable while it runs (main() reports at the end)


def _kind(name):
    """A job's kind: its name without the seed and the cold start (e.g. "grpo-nostd", "sft-ce/eval")."""
    return name.rsplit("-s", 1)[0].split("-from-")[0] + ("/eval" if name.endswith("/eval") else "")


def _expected(secs, name):
    """Seconds a job should take: the mean of finished jobs of its kind."""
    same = [v for k, v in secs.items() if _kind(k) == _kind(name)]
    return sum(same) / len(same) if same else 120.0


# ----------------------------------------------------------------------------- report
def mean_std(xs):
    """(mean, sample std, n) of the finite values; std is 0 for one value, nan for none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0, len(xs)


def fmt(xs, digits=3):
    m, s, n = mean_std(xs)
    return "–" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f} ({n})"


def seeds_of(out, prefix):
    """Run folders <out>/<prefix>-s<seed> that finished, by seed."""
    found = {}
    for p in sorted(Path(out).glob(f"{prefix}-s*")):
        tail = p.name[len(prefix) + 2:]
        if tail.isdigit() and (p / ".study_done").exists():
            found[int(tail)] = p
    return found


def eval_rows(out, prefix):
    """{temperature: [eval.py's result dict per seed]} of the finished evaluations (<run>/eval) of a setting's runs
    (prefix: e.g. "sft-gem" for a cold start, "grpo-from-gem" for an RL setting's final models)."""
    by_t = {}
    for p in seeds_of(out, prefix).values():
        if (p / "eval" / ".study_done").exists():
            for r in json.loads((p / "eval" / "eval.json").read_text())["by_temperature"]:
                by_t.setdefault(r["temperature"], []).append(r)
    return by_t


def curve(out, prefix, key):
    """{step: [value per seed]} of metric `key` over the finished seeds of an RL setting."""
    pts = {}
    for p in seeds_of(out, prefix).values():
        for r in read(p / "metrics.jsonl"):
            if key in r:
                pts.setdefault(r["step"], []).append(r[key])
    return dict(sorted(pts.items()))


def train_mean(out, prefix, key):
    """Per seed, the mean of train metric `key` over the run's steps."""
    return [sum(xs) / len(xs) if xs else None for xs in _per_seed(out, prefix, key)]


def report(a):
    out = Path(a.out)
    lines = [f"# Claims study: results ({time.strftime('%Y-%m-%d %H:%M')})", "",
             "Every cell: mean ± sample std (n seeds). Built-in task, held-out split (200 problems).", ""]
    colds = [c for c in COLD if seeds_of(out, f"sft-{c}")]
    if colds:
        ks = sorted({int(k.split("@")[1]) for c in colds for rs in eval_rows(out, f"sft-{c}").values() for r in rs
                     for k in r if k.startswith("pass@")})
        lines += ["## Cold starts: held-out pass@k, maj@k, distinct answers per prompt", "",
                  "Flags beyond gem_sft.py's defaults: " + ", ".join(f"`{c}` = `{' '.join(COLD[c])}`" for c in colds) + ".", "",
                  "| cold start | T | " + " | ".join(f"pass@{k}" for k in ks) + " | maj@k | distinct answers |",
                  "|---|---|" + "---|" * (len(ks) + 2)]
        for c in colds:
            for temp, rs in sorted(eval_rows(out, f"sft-{c}").items(), key=lambda kv: (kv[0] == 0, kv[0])):
                maj = next((k for k in rs[0] if k.startswith("maj@")), None)
                lines.append(f"| {c} | {'greedy' if temp == 0 else temp} | " +
                             " | ".join(fmt([r.get(f"pass@{k}") for r in rs]) if f"pass@{k}" in rs[0] else "–" for k in ks)
                             + f" | {fmt([r[maj] for r in rs]) if maj else '–'} | {fmt([r['distinct_answers'] for r in rs], 2)} |")
        lines.append("")
    rl = sorted({p.name.rsplit("-s", 1)[0] for p in out.glob("*-from-*-s*") if (p / ".study_done").exists()})
    if rl:
        steps = sorted({s for name in rl for s in curve(out, name, "eval/pass@1")})
        lines += ["## RL: held-out pass@1 (4 samples per prompt, T = 1) by step", "",
                  "| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for name in rl:
            c = curve(out, name, "eval/pass@1")
            lines.append(f"| {name} | " + " | ".join(fmt(c.get(s, [])) for s in steps) + " |")
        ends = {n: by_t for n in rl if (by_t := eval_rows(out, n))}
        if ends:
            lines += ["", "## RL: final models at several temperatures (eval.py, 8 samples per prompt; greedy: one)", "",
                      "| run | T | pass@1 | pass@8 | maj@8 | distinct answers |", "|---|---|---|---|---|---|"]
            for name, by_t in ends.items():
                for temp, rs in sorted(by_t.items(), key=lambda kv: (kv[0] == 0, kv[0])):
                    lines.append(f"| {name} | {'greedy' if temp == 0 else temp} | {fmt([r['pass@1'] for r in rs])} | "
                                 f"{fmt([r.get('pass@8') for r in rs])} | {fmt([r.get('maj@8') for r in rs])} | "
                                 f"{fmt([r['distinct_answers'] for r in rs], 2)} |")
        lines += ["", "## RL: per-step training signals (mean over the run's steps)", "",
                  "adv_mean < 0 means the baseline is above the sampled rewards (ReMax: greedy reward − sample reward "
                  "= −adv_mean); nonzero_adv: the share of responses with a gradient.", "",
                  "| run | train accuracy | adv_mean | adv_std | nonzero_adv | grad_norm | entropy | KL to π_ref (last eval step) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in rl:
            kl = [v[-1] for v in _per_seed(out, name, "train/kl_ref") if v]
            lines.append(f"| {name} | " + " | ".join(fmt(train_mean(out, name, f"train/{k}")) for k in
                                                     ["accuracy", "adv_mean", "adv_std", "nonzero_adv", "grad_norm",
                                                      "entropy"]) + f" | {fmt(kl, 4)} |")
        lines.append("")
        lines += long_table(out, [n for n in rl if "-long-" in n])
    (out / "results.md").write_text("\n".join(lines) + "\n")
    figures(out, colds, rl)
    print(f"[study] wrote {out / 'results.md'}", flush=True)


def long_table(out, names, every=20):
    """The long runs (stages long and forks) as the README's longer-runs table: held-out pass@1 every `every` steps,
    entropy and KL to pi_ref at the last step, training seconds (the sum of the trainers' time_* metrics: no start-up,
    no evaluation) and the job's wall seconds, each mean ± std over the finished seeds."""
    if not names:
        return []
    secs_path = Path(out) / "seconds.json"
    secs = json.loads(secs_path.read_text()) if secs_path.exists() else {}
    steps = sorted({s for name in names for s in curve(out, name, "eval/pass@1") if s % every == 0})
    lines = ["## Long runs: held-out pass@1 (4 samples per prompt, T = 1), entropy and KL to π_ref at the end, seconds",
             "", f"| run | pass@1 at step {' → '.join(map(str, steps))} | entropy end | KL to π_ref end | training s | "
             "wall s |", "|---|---|---|---|---|---|"]
    for name in names:
        c, runs = curve(out, name, "eval/pass@1"), seeds_of(out, name).values()
        train_s = [sum(v for r in read(p / "metrics.jsonl") for k, v in r.items() if k.startswith("train/time_"))
                   for p in runs]
        lines.append(f"| {name} | {' → '.join(fmt(c.get(s, [])) for s in steps)} | "
                     f"{fmt([v[-1] for v in _per_seed(out, name, 'train/entropy') if v])} | "
                     f"{fmt([v[-1] for v in _per_seed(out, name, 'train/kl_ref') if v], 4)} | {fmt(train_s, 0)} | "
                     f"{fmt([secs.get(p.name) for p in runs], 0)} |")
    return lines + [""]


def _per_seed(out, prefix, key):
    """Per finished seed, the list of values of `key` in step order."""
    return [[r[key] for r in read(p / "metrics.jsonl") if key in r] for p in seeds_of(out, prefix).values()]


def figures(out, colds, rl):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if colds:  # pass@k curves per cold start, one panel per temperature
        temps = [1.0, 0.7, 0.5, 0.85]
        fig, axes = plt.subplots(1, len(temps), figsize=(4.2 * len(temps), 3.4), sharey=True)
        for ax, temp in zip(axes, temps):
            for c in colds:
                rs = eval_rows(out, f"sft-{c}").get(temp)
                if not rs:
                    continue
                ks = sorted(int(k.split("@")[1]) for k in rs[0] if k.startswith("pass@"))
                ms = [mean_std([r[f"pass@{k}"] for r in rs]) for k in ks]
                _band(ax, ks, ms, f"{c} (n={ms[0][2]})")
            ax.set_xscale("log", base=2)
            ax.set(title=f"held-out pass@k, T = {temp}", xlabel="k")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "passk.png", dpi=110)
        plt.close(fig)
    long = [n for n in rl if "-long-" in n]  # the long stage gets a figure of its own (other steps, other question)
    for names, path in ((sorted(set(rl) - set(long)), "rl_curves.png"), (long, "long_curves.png")):
        if names:
            _rl_figure(plt, out, names, path)


def _rl_figure(plt, out, rl, path):
    """RL curves with ± std bands, entropy, and accuracy against KL to pi_ref, for the settings `rl`."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name in rl:
        c = curve(out, name, "eval/pass@1")
        _band(axes[0], list(c), [mean_std(v) for v in c.values()], name)
        e = curve(out, name, "train/entropy")
        _band(axes[1], list(e), [mean_std(v) for v in e.values()], name)
        kl = curve(out, name, "train/kl_ref")
        common_steps = [s for s in c if s in kl]
        if common_steps:
            axes[2].plot([mean_std(kl[s])[0] for s in common_steps], [mean_std(c[s])[0] for s in common_steps],
                         marker="o", ms=3, label=name)
    axes[0].set(title="held-out pass@1 (mean ± std over seeds)", xlabel="step")
    axes[1].set(title="entropy", xlabel="step")
    axes[2].set(title="pass@1 against KL to π_ref (eval steps)", xlabel="KL(π‖π_ref) per token")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / path, dpi=110)
    plt.close(fig)


def _band(ax, xs, ms, label):
    m = [x[0] for x in ms]
    s = [x[1] for x in ms]
    line, = ax.plot(xs, m, marker="o", ms=3, label=label)
    ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2, color=line.get_color())


def main(a: Args):
    if a.quick:
        a.out, a.seeds, a.eval_k = a.out + "-quick" if a.out == "runs/study" else a.out, a.seeds[:1], 4
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if not a.report:
        run_all(a)
    report(a)


if __name__ == "__main__":
    main(tyro.cli(Args))
