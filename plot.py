"""Plot one or more runs: reward/accuracy, entropy, KL to pi_ref, response length and held-out pass@1
against step, runs overlaid with a legend.

    python plot.py runs/grpo runs/remax runs/raftpp runs/reinforce_rej --out runs/curves.png
"""
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.metrics import read

PANELS = [("train/accuracy", "train accuracy"), ("train/entropy", "entropy"), ("train/kl_ref", "KL to π_ref"),
          ("train/response_len", "response length"), ("eval/pass@1", "held-out pass@1")]


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]  # run folders (each with a metrics.jsonl)
    out: str = "runs/curves.png"         # the PNG to write
    labels: tuple[str, ...] = ()         # legend labels (default: folder names)


def plot(runs, out, labels=()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for i, run in enumerate(runs):
        rows = read(Path(run) / "metrics.jsonl")
        label = labels[i] if i < len(labels) else Path(run).name
        for ax, (key, title) in zip(axes, PANELS):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key.startswith("eval/") else None, ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    a = tyro.cli(Args)
    print(plot(a.runs, a.out, a.labels))
