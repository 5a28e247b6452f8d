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


def test_eval_defaults_equal_the_trainers():
    """eval.py on the built-in task must score the trainers' held-out split the way their logged eval does."""
    import dataclasses

    import eval as eval_cli
    import grpo
    ev = {f.name: f.default for f in dataclasses.fields(eval_cli.Args)}
    tr = {f.name: f.default for f in dataclasses.fields(grpo.Args)}
    # model: eval scores any model (default the built-in one); max_len: an upper bound for long generations,
    # capped by the model's positions (rollout.context_limit); temperature: eval's list = the trainers' eval_temperature
    shared = (ev.keys() & tr.keys()) - {"model", "max_len", "temperature"}
    assert {"difficulty", "max_num", "eval_size", "max_new_tokens"} <= shared
    assert {k: ev[k] for k in shared} == {k: tr[k] for k in shared}
    assert ev["temperature"] == (tr["eval_temperature"],)


def test_eval_py_checks_rows_against_the_model_positions_before_the_engine(tmp_path):
    """The built-in model has 512 positions, --max-len defaults to 4096: the first too-long GSM8K prompt among
    the first 200 rows stops eval.py with one message, before the engine starts (Engine is replaced by a stub)."""
    from common.model import build_tokenizer
    tok = build_tokenizer()
    lines = (SHARED / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()
    lens = [len(tok(json.loads(x)["question"] + "\n").input_ids) for x in lines[:200]]
    row = next(i for i, n in enumerate(lens, 1) if n >= 512)  # first prompt with no room for a response
    code = ("import sys, eval\n"
            "def stub(*a, **k): sys.exit('engine started')\n"
            "eval.Engine = stub\n"
            f"eval.main(eval.Args(data={str(SHARED / 'gsm8k_test.jsonl')!r}, limit=200))\n")
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "engine started" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"InputError: {SHARED / 'gsm8k_test.jsonl'}: row {row}: field 'question' is {lens[row - 1]} prompt tokens, "
        "leaving no room for a response in the context limit 512 (--max-len 4096, the model's "
        "max_position_embeddings 512)"), r.stderr[-2000:]
    # rows past --limit are not checked: the first 5 rows load and the (stub) engine starts
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code.replace("limit=200", "limit=5")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "engine started" in r.stderr, r.stderr[-2000:]
