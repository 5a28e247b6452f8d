"""The trainers, found by looking rather than from a list: every top-level script with an exact fence line
`# --- algorithm ---` is a fork. One that defines `rl_update` is an RL trainer, a fork of grpo.py; any other is a
fork of gem_sft.py. A new `mything.py` with its fences is therefore checked against grpo.py (tests/test_algorithms.py)
and run under torchrun (tests/test_trainers.py) without any test being edited."""
import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "# --- algorithm ---", "# --- end algorithm ---"
BASES = {"rl": "grpo.py", "sft": "gem_sft.py"}
# `diff grpo.py X | grep -c '^[<>]'` at most: the papers' difference (issue 24); any other fork: FORK_LIMIT
DIFF_LIMITS = {"remax.py": 30, "raftpp.py": 30, "reinforce_rej.py": 30, "rloo.py": 30, "gspo.py": 30, "dapo.py": 45}
FORK_LIMIT = 45


def fenced(root=ROOT):
    """The names of the top-level scripts with at least one exact fence line, sorted."""
    return sorted(p.name for p in Path(root).glob("*.py")
                  if any(line.strip() == BEGIN for line in p.read_text().splitlines()))


def family(name, root=ROOT):
    """'rl' for a script that defines rl_update (an RL trainer), else 'sft'."""
    return "rl" if "\ndef rl_update(" in (Path(root) / name).read_text() else "sft"


def rl_trainers(root=ROOT):
    return [name for name in fenced(root) if family(name, root) == "rl"]


def outside_fences(path):
    """The lines of `path` outside its fenced regions, each region replaced by its opening fence line. Fences must be
    whole lines, closed and not nested."""
    lines, out, inside = Path(path).read_text().splitlines(), [], False
    for line in lines:
        if line.strip() == BEGIN:
            assert not inside, f"{Path(path).name}: nested fence"
            inside = True
            out.append(BEGIN)
        elif line.strip() == END:
            assert inside, f"{Path(path).name}: an end fence without a start"
            inside = False
        elif not inside:
            out.append(line)
    assert not inside, f"{Path(path).name}: unclosed fence"
    return out


def changed_lines(a, b):
    """Lines removed plus lines added from file a to file b, as `diff a b | grep -c '^[<>]'` counts them."""
    return sum(1 for line in difflib.ndiff(Path(a).read_text().splitlines(), Path(b).read_text().splitlines())
               if line[:2] in ("- ", "+ "))


def check_fork(name, root=ROOT):
    """Assert that fork `name` equals its base outside the fences and stays within its diff limit."""
    root = Path(root)
    base = BASES[family(name, root)]
    want, got = outside_fences(root / base), outside_fences(root / name)
    if len(got) != len(want):
        raise AssertionError(f"{name}: {len(got)} lines outside the fences, {base} has {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"{name} differs from {base} outside the fences (shared line {i}): {a!r} vs {b!r}"
    limit = DIFF_LIMITS.get(name, FORK_LIMIT)
    assert (n := changed_lines(root / base, root / name)) <= limit, f"diff {base} {name}: {n} changed lines > {limit}"
