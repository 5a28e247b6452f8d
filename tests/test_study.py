"""study.py: the plan (which runs, in which order, from which cold start), the statistics and the report,
on hand-made run folders (the runs themselves are the trainers', tested elsewhere)."""
import collections
import json
import re
import statistics

import pytest

import study


def _args(tmp_path, **kw):
    return study.Args(out=str(tmp_path), **kw)


def test_plan_every_rl_run_starts_from_a_cold_start_of_its_seed_trained_earlier():
    a = study.Args(stages=study.STAGES, seeds=(0, 1, 2))
    plan = study.jobs(a)
    names = [n for _, n, _ in plan]
    assert len(names) == len(set(names))
    for i, (_, name, argv) in enumerate(plan):
        if "--model" in argv:
            model = argv[argv.index("--model") + 1]
            cold = model.split("/")[-2]  # runs/study/sft-<c>-s<seed>/hf
            seed = argv[argv.index("--seed") + 1]
            assert cold.endswith(f"-s{seed}") and cold in names[:i], (name, model)
    per_setting = collections.Counter(re.sub(r"-s\d+", "", name) for name in names)
    assert set(per_setting.values()) == {3}  # every setting once per seed
    evals = [argv for _, _, argv in plan if argv[0] == "eval.py"]
    assert all("0.0" in e and "1.0" in e and "0.7" in e for e in evals)  # greedy, T = 1, T = 0.7 for every start
    b05 = next(e for _, n, e in plan if n == "sft-gem-b0.5-s0/eval")
    assert "0.5" in b05[b05.index("--temperature"):]  # and T = beta


def test_beta_of():
    assert study.beta_of("ce") == 1.0 and study.beta_of("gem") == 0.7 and study.beta_of("gem-b0.85") == 0.85


def test_mean_std_is_the_sample_std():
    xs = [0.31, 0.42, 0.29, 0.55]
    m, s, n = study.mean_std(xs + [float("nan"), None])
    assert n == 4 and m == pytest.approx(statistics.fmean(xs)) and s == pytest.approx(statistics.stdev(xs))
    assert study.mean_std([0.5])[1:] == (0.0, 1) and study.mean_std([])[2] == 0


def test_rl_job_without_its_cold_start_is_one_clear_error(tmp_path):
    a = _args(tmp_path, stages=("rl",), seeds=(0,))
    with pytest.raises(SystemExit, match="sft-gem-s0/hf, which does not exist"):
        study.run_all(a)


def test_report_aggregates_finished_seeds_only(tmp_path):
    """Three finished seeds and one unfinished: the table shows the three seeds' mean ± std."""
    vals = {0: 0.30, 1: 0.36, 2: 0.27, 3: 0.99}
    for s, v in vals.items():
        run = tmp_path / f"grpo-from-gem-s{s}"
        run.mkdir()
        rows = [{"step": 0, "eval/pass@1": 0.2}, {"step": 1, "train/accuracy": v, "train/adv_mean": -v,
                                                  "train/entropy": 0.3}, {"step": 5, "eval/pass@1": v}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        if s != 3:
            (run / ".study_done").write_text("1\n")
        cold = tmp_path / f"sft-ce-s{s}"
        (cold / "eval").mkdir(parents=True)
        (cold / ".study_done").write_text("1\n")
        (cold / "eval" / ".study_done").write_text("1\n")
        (cold / "eval" / "eval.json").write_text(json.dumps({"by_temperature": [
            {"temperature": 1.0, "k": 4, "pass@1": v, "pass@4": 2 * v, "maj@4": v, "distinct_answers": 3.0},
            {"temperature": 0.0, "k": 1, "pass@1": v / 2, "maj@1": v / 2, "distinct_answers": 1.0}]}))
    (tmp_path / "sft-ce-s3" / ".study_done").unlink()
    study.report(_args(tmp_path))
    md = (tmp_path / "results.md").read_text()
    three = [vals[0], vals[1], vals[2]]
    want = f"{statistics.fmean(three):.3f} ± {statistics.stdev(three):.3f} (3)"
    assert f"| grpo-from-gem | 0.200 ± 0.000 (3) | {want} |" in md
    assert f"| ce | 1.0 | {want} |" in md
    assert f"| ce | greedy | {statistics.fmean(three) / 2:.3f}" in md
    assert "0.990" not in md and "(4)" not in md
    assert (tmp_path / "passk.png").stat().st_size > 0 and (tmp_path / "rl_curves.png").stat().st_size > 0


def test_forks_stage_runs_the_new_trainers_exactly_as_the_long_stage_runs_grpo():
    plan = {name: argv for _, name, argv in study.jobs(study.Args(stages=("long", "forks"), seeds=(0, 1, 2)))}
    for fork in ("rloo", "gspo", "dapo"):
        for s in range(3):
            assert plan[f"{fork}-long-from-gem-s{s}"] == [f"{fork}.py", *plan[f"grpo-long-from-gem-s{s}"][1:]]


def test_long_table_means_over_seeds(tmp_path):
    """The README's longer-runs row from 2 finished seeds: pass@1 every 20 steps, entropy and KL at the end, the sum of
    the time_* metrics and the job's wall seconds (seconds.json)."""
    for s, (acc, ent) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        run = tmp_path / f"rloo-long-from-gem-s{s}"
        run.mkdir()
        rows = [{"step": 0, "eval/pass@1": 0.3}, {"step": 10, "eval/pass@1": 0.4},
                {"step": 20, "train/entropy": ent, "train/kl_ref": 0.01 * (s + 1), "train/time_update": 1.5,
                 "train/time_sync": 0.5}, {"step": 20, "eval/pass@1": acc}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (run / ".study_done").write_text("1\n")
    (tmp_path / "seconds.json").write_text(json.dumps({"rloo-long-from-gem-s0": 100.0, "rloo-long-from-gem-s1": 120.0}))
    lines = study.long_table(tmp_path, ["rloo-long-from-gem"])
    assert "| pass@1 at step 0 → 20 |" in lines[2]
    assert lines[4] == (f"| rloo-long-from-gem | 0.300 ± 0.000 (2) → 0.600 ± {statistics.stdev([0.5, 0.7]):.3f} (2) | "
                        f"0.200 ± {statistics.stdev([0.1, 0.3]):.3f} (2) | 0.0150 ± {statistics.stdev([0.01, 0.02]):.4f} (2) | "
                        f"2 ± 0 (2) | 110 ± {statistics.stdev([100, 120]):.0f} (2) |")
