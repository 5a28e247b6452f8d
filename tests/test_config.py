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
    assert "--prompts-per-step 1" in _usage_error(lambda: remax.Args(prompts_per_step=1), capsys)
    assert "--batch-size 33" in _usage_error(lambda: gem_sft.Args(batch_size=33), capsys)
    grpo.Args(prompts_per_step=4), gem_sft.Args(batch_size=32)
