"""The README's commands cannot drift from the code: every command in the ```bash blocks of README.md and docs/*.md
that runs one of the project's scripts must parse with that script's own argument parser (tyro), flags and values as
written. Every trainer (found by its fences) and every tool has a command there."""
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import tyro

from tests import _forks

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {Path(f).stem for f in _forks.fenced()} | {"eval", "plot", "demo", "study"}
TORCHRUN_FLAGS = {"--nproc_per_node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--standalone"}


def readme_commands():
    """(script, argv) for every script invocation in the bash blocks of README.md and docs/*.md (continuations
    joined, `;`-separated commands split, shell variables such as $T expanded from the block's assignments)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = ("" if line.lstrip().startswith("#") else line).split(" #")[0].strip()
            if m := re.fullmatch(r'(\w+)="([^"]*)"', line):
                env[m[1]] = m[2]
                continue
            for cmd in filter(None, (c.strip() for c in line.split(";"))):
                words = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), cmd))
                for i, w in enumerate(words):
                    if w.endswith(".py") and Path(w).stem in SCRIPTS:
                        out.append((Path(w).stem, [a for a in words[i + 1:] if a != "..."]))
                        break
    return out


def test_readme_has_commands_for_every_trainer():
    scripts = {s for s, _ in readme_commands()}
    assert SCRIPTS <= scripts, SCRIPTS - scripts


@pytest.mark.parametrize("script,argv", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_readme_command_parses(script, argv, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", [script + ".py"])
    module = importlib.import_module(script)
    tyro.cli(module.Args, args=argv)  # an unknown flag or a bad value exits with SystemExit: the test fails
