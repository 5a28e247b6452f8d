"""bench/gpu_check.py: its CPU dry run (tiny sizes, the Triton interpreter, gloo) runs every section and reports
what it measured, so the GPU check cannot rot between GPU runs; and one section's failure is reported with its
traceback without hiding the others."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_reports_every_section(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    s = rep["sections"]
    assert list(s) == ["env", "tests", "trainers", "kernels", "tune"] and all(v["status"] == "ok" for v in s.values())
    assert "test_gpu_bf16_vs_fp32_reference" in json.dumps(s["tests"]["cases"])  # the gpu-marked tests, skipped here
    rows = {(r["work"], r["impl"]): r for r in s["kernels"]["rows"]}
    for work, impls in {"logp+entropy": ("triton", "chunked", "naive"), "logp": ("triton", "chunked", "naive"),
                        "gem": ("triton", "chunked")}.items():
        for impl in impls:
            r = rows[work, impl]
            assert r["ms"] > 0 and max(r[k] for k in ("err_value", "err_dh", "err_dw")) < 1e-4, r
    assert len(s["tune"]["rows"]) == 3 and all("ms" in r for r in s["tune"]["rows"])
    runs = {r["name"]: r for r in s["trainers"]["runs"]}
    assert set(runs) == {"gem_sft", "grpo", "grpo, engine fp32"} and all(r["rc"] == 0 for r in runs.values())
    assert runs["gem_sft"]["steps"] == 2 and runs["grpo"]["steps"] == 1
    assert set(runs["grpo"]["phases"]) == {"generate", "logprob", "update", "sync"}
    assert runs["grpo"]["logprob_gap"] < 1e-4  # fp32 hf engine and fp32 trainer on CPU
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Fused kernels" in md and "## Trainers" in md and "## Failures" not in md


def test_a_failing_section_is_reported_and_the_next_still_runs(tmp_path):
    rep = gpu_check.Report(tmp_path, dry=True)

    def broken(_):
        raise RuntimeError("planted failure")
    rep.section("first", broken, None)
    rep.section("second", lambda _: {"value": 1}, None)
    s = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert s["first"]["status"] == "failed" and "planted failure" in s["first"]["traceback"]
    assert s["second"] == {"status": "ok", "value": 1, "seconds": s["second"]["seconds"]}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "### first" in md and "RuntimeError: planted failure" in md
