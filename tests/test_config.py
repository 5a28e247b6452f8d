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
