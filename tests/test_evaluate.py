"""pass@k / maj@k estimators, eval.py end to end on real GSM8K rows, plot.py."""
import itertools
import json
import subprocess
from math import comb
from pathlib import Path

import pytest

from common.evaluate import maj_at_k, pass_at_k

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def test_pass_at_k_by_hand_n5_c2():
    # 1 - C(3, k) / C(5, k): k=1: 1-3/5, k=2: 1-3/10, k=3: 1-1/10, k=4, 5: 1
    expected = {1: 0.4, 2: 0.7, 3: 0.9, 4: 1.0, 5: 1.0}
    for k, v in expected.items():
        assert pass_at_k(5, 2, k) == pytest.approx(v)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


@pytest.mark.parametrize("n,c", [(5, 2), (6, 1), (8, 3), (7, 0), (4, 4)])
def test_pass_at_k_equals_brute_force_enumeration(n, c):
    samples = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
        assert len(subsets) == comb(n, k)


def test_maj_at_k_ties_and_missing_answers():
    assert maj_at_k(["3", "4", "4", "3"], [1, 0, 0, 1]) == 1.0  # 2-2 tie: the answer seen first wins
    assert maj_at_k(["4", "3", "4", "3"], [0, 1, 0, 1]) == 0.0
    assert maj_at_k([None, None, "5"], [0, 0, 1]) == 1.0          # no answer is never voted for
    assert maj_at_k([None, None], [0, 0]) == 0.0
    assert maj_at_k(["7", "8", "8"], [1, 0, 0]) == 0.0


@pytest.mark.slow
def test_eval_py_on_gsm8k_slice(tmp_path):
    """The built-in (untrained) model on 5 real GSM8K rows: scores ~0, the pipeline is what is tested."""
    out = tmp_path / "eval.json"
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "eval.py", "--data", str(SHARED / "gsm8k_test.jsonl"),
                        "--limit", "5", "--k", "4", "--ks", "1", "2", "4", "--max-new-tokens", "16", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 5 and res["k"] == 4
    for key in ["pass@1", "pass@2", "pass@4", "maj@4", "distinct_answers", "response_len", "truncated"]:
        assert key in res and 0 <= res[key] <= 16, key
    assert res["pass@1"] <= res["pass@2"] <= res["pass@4"]
    assert "pass@1" in r.stdout and len(res["samples"]) == 3


def test_plot_writes_png_from_two_runs(tmp_path):
    from plot import plot
    for name, slope in [("a", 0.01), ("b", 0.02)]:
        (tmp_path / name).mkdir()
        rows = [{"step": s, "train/accuracy": 0.1 + slope * s, "train/entropy": 0.5 - slope * s,
                 "train/kl_ref": slope * s, "train/response_len": 20 + s} for s in range(1, 11)]
        rows += [{"step": s, "eval/pass@1": 0.1 + slope * s} for s in (0, 5, 10)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    png = Path(plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "curves.png")))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
