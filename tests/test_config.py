"""common/config.py: the checks made while the command line is parsed (before anything starts)."""
import importlib.util

import pytest

import gem_sft
import grpo


@pytest.mark.parametrize("module", [grpo, gem_sft])
@pytest.mark.parametrize("track", ["wandb", "tensorboard"])
def test_track_without_its_package_is_one_line_exit_2(module, track, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == track else real(name, *a))
    with pytest.raises(SystemExit) as e:
        module.Args(track=track)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --track {track} needs the optional {track} package: pip install {track}\n"
    module.Args(track="none")  # the default needs nothing


def _usage_error(make, capsys):
    with pytest.raises(SystemExit) as e:
        make()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_flags_fail_at_parse_time_in_one_line(monkeypatch, capsys):
    import raftpp
    import reinforce_rej
    import remax
    for module in (grpo, reinforce_rej):  # one response per group: zero variance, every advantage 0
        assert "--n-samples 1" in _usage_error(lambda: module.Args(n_samples=1), capsys)
    remax.Args(n_samples=1), raftpp.Args(n_samples=1)  # a greedy baseline / a kept success need no group
    assert "--max-new-tokens 0" in _usage_error(lambda: grpo.Args(max_new_tokens=0), capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc_per_node 2
    assert "--prompts-per-step 3 is not divisible by the 2 ranks" in _usage_error(lambda: grpo.Args(prompts_per_step=3), capsys)
    assert "--mini-batches 4: each rank has only 2 responses per step" in _usage_error(
        lambda: grpo.Args(prompts_per_step=2, n_samples=2, mini_batches=4), capsys)
    assert "--prompts-per-step 1" in _usage_error(lambda: remax.Args(prompts_per_step=1), capsys)
    assert "--batch-size 33" in _usage_error(lambda: gem_sft.Args(batch_size=33), capsys)
    grpo.Args(prompts_per_step=4), gem_sft.Args(batch_size=32)


def test_config_replays_a_run_and_the_command_line_overrides(tmp_path, capsys):
    import dataclasses
    import json

    from common import config
    saved = dataclasses.asdict(grpo.Args(seed=3, n_samples=4, lr=2e-4, inject_nan=(2,)))
    (tmp_path / "args.json").write_text(json.dumps(saved | {"_run": {"world": 2, "git": "abc"}}))
    a = config.cli(grpo.Args, ["--config", str(tmp_path / "args.json"), "--seed", "5"])
    assert (a.seed, a.n_samples, a.lr, a.inject_nan) == (5, 4, 2e-4, (2,))  # tuples come back as tuples
    assert dataclasses.asdict(config.cli(grpo.Args, [f"--config={tmp_path / 'args.json'}"])) == saved
    (tmp_path / "old.json").write_text(json.dumps(saved | {"ppo_epochz": 2}))
    assert "ppo_epochz are not arguments of grpo.py" in _usage_error(
        lambda: config.cli(grpo.Args, ["--config", str(tmp_path / "old.json")]), capsys)
    assert "--config 'missing.json'" in _usage_error(lambda: config.cli(grpo.Args, ["--config", "missing.json"]), capsys)


def test_args_json_records_provenance_and_replays(tmp_path):
    import json

    from common import checkpoint, config
    args = grpo.Args(seed=7, out_dir=str(tmp_path))
    checkpoint.prepare_run(tmp_path, args, "grpo")
    saved = json.loads((tmp_path / "args.json").read_text())
    run = saved["_run"]
    assert run["world"] == 1 and run["torch"].startswith("2.") and "transformers" in run
    assert run["git_commit"] == "unknown" or len(run["git_commit"].split("+")[0]) == 40
    assert config.cli(grpo.Args, ["--config", str(tmp_path / "args.json")]) == args  # "_run" is not an argument


def test_input_error_is_one_line_exit_2(capsys):
    """config.one_line_errors (around every trainer's main): a known bad input found while running is one `error:`
    line (on rank 0 when every rank meets it; here the one process is rank 0) and exit code 2; anything else passes."""
    from common import config
    for every_rank in (True, False):
        with pytest.raises(SystemExit) as e, config.one_line_errors():
            raise config.InputError("data.jsonl: row 3: too long", every_rank=every_rank)
        assert e.value.code == 2 and capsys.readouterr().err == "error: data.jsonl: row 3: too long\n"
    with pytest.raises(KeyError), config.one_line_errors():
        raise KeyError("a bug keeps its traceback")


def test_fork_flag_checks_are_one_line(capsys):
    """A fork's own parse-time checks (DAPO's __post_init__, through RunArgs.flag_error) fail like the shared ones."""
    import dapo
    assert "--overlong-buffer 65 must be in [0, --max-new-tokens 64]" in _usage_error(
        lambda: dapo.Args(overlong_buffer=65), capsys)
    assert "--max-gen-rounds -1 >= 0" in _usage_error(lambda: dapo.Args(max_gen_rounds=-1), capsys)
    assert "--tis-cap -1.0" in _usage_error(lambda: grpo.Args(tis_cap=-1.0), capsys)
    dapo.Args(overlong_buffer=0), dapo.Args(overlong_buffer=64, max_gen_rounds=0)
