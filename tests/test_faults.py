"""Operator faults (issue 14): a damaged or missing checkpoint, a re-run into a folder that holds a run, changed
flags on --resume, SIGTERM to torchrun itself. In-process tests of common/checkpoint.prepare_run and
metrics.Logger (one process, no process group), then torchrun runs of gem_sft.py and grpo.py with 2 ranks that
go through every fault in one run folder. Nothing asserted depends on timing or on what a model samples."""
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from common import checkpoint
from common.config import RunArgs
from common.metrics import Logger
from tests.test_trainers import RL, ROOT, TASK, _cmd, _kill_job, _metrics


@dataclass
class Args(RunArgs):
    lr: float = 3e-4
    weight_decay: float = 0.01
    n_samples: int = 4
    steps: int = 6


def _save(run_dir, steps, wd=0.01):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd)
    for step in steps:
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        checkpoint.save(run_dir, step, model, opt, keep_last=0)
    return model, opt


def _cut(ckpt):
    """Cut a checkpoint's DCP shard in half (meta.json intact); returns the shard's name."""
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return shard.name


def _new_run(run_dir, rows=3, **kw):
    """A run folder as a 6-step run leaves it: args.json, metrics rows 1..rows, checkpoints 2 and 4."""
    args = Args(out_dir=str(run_dir), **kw)
    assert checkpoint.prepare_run(run_dir, args) is None
    log = Logger(run_dir, 6)
    for s in range(1, rows + 1):
        log.log(s, {"train/loss": float(s)})
    _save(run_dir, [2, 4])
    return args


def test_damaged_latest_is_named_and_skipped(tmp_path, capsys):
    _new_run(tmp_path, rows=5)
    name = _cut(tmp_path / "checkpoints" / "step_000004")
    ckpt = checkpoint.prepare_run(tmp_path, Args(resume=True))
    assert ckpt.name == "step_000002"
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {tmp_path / 'checkpoints' / 'step_000004'}: {name} is" in out
    assert "bytes, meta.json says" in out
    Logger(tmp_path, 6, start_step=2)  # rows 3..5 were written after checkpoint 2: moved aside, not lost
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.dropped.jsonl")] == [3, 4, 5]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "running"


def test_resume_without_usable_checkpoint_changes_nothing(tmp_path):
    _new_run(tmp_path)
    (tmp_path / "checkpoints" / "step_000002" / "meta.json").unlink()
    _cut(tmp_path / "checkpoints" / "step_000004")
    (tmp_path / "checkpoints" / "step_000006.tmp").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(FileNotFoundError, match=rf"no usable checkpoint in {tmp_path / 'checkpoints'} "
                       r"\(step_000002: no meta.json .*; step_000004: __0_0.distcp is \d+ bytes.*; "
                       r"step_000006.tmp: unfinished save"):
        checkpoint.prepare_run(tmp_path, Args(resume=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with pytest.raises(FileNotFoundError, match="no usable checkpoint .*no checkpoint folder"):
        checkpoint.prepare_run(tmp_path / "empty", Args(resume=True))


def test_new_run_refuses_a_folder_that_holds_one(tmp_path, capsys):
    _new_run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{tmp_path} already holds a run \(metrics.jsonl with 3 rows, "
                       r"step_000002, step_000004\): pass --resume .* --overwrite"):
        checkpoint.prepare_run(tmp_path, Args())
    with pytest.raises(FileExistsError, match="already has 3 rows"):
        Logger(tmp_path, 6)  # the logger refuses too: it never truncates
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="exclude each other"):
        checkpoint.prepare_run(tmp_path, Args(resume=True, overwrite=True))
    assert checkpoint.prepare_run(tmp_path, Args(overwrite=True, lr=1.0)) is None
    prev = list(tmp_path.glob("previous-*"))
    assert len(prev) == 1 and (prev[0] / "metrics.jsonl").read_bytes() == before
    assert json.loads((prev[0] / "args.json").read_text())["lr"] == 3e-4
    assert json.loads((tmp_path / "args.json").read_text())["lr"] == 1.0
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert f"moved its logs to {prev[0]}" in capsys.readouterr().out


def test_changed_flags_on_resume(tmp_path, capsys):
    _new_run(tmp_path)
    original = (tmp_path / "args.json").read_text()
    with pytest.raises(ValueError, match=r"--resume: --n-samples 4 -> 2 would change the math or the data order "
                       rf"of the run in {tmp_path} \(its flags: {tmp_path / 'args.json'}\).*--resume-override"):
        checkpoint.prepare_run(tmp_path, Args(resume=True, n_samples=2, lr=1e-3))
    assert not list(tmp_path.glob("args.resume*"))
    assert checkpoint.prepare_run(tmp_path, Args(resume=True, lr=1e-3, steps=8)).name == "step_000004"
    out = capsys.readouterr().out
    assert "flags changed since args.json: --lr 0.0003 -> 0.001 (applied); --steps 6 -> 8 (applied)" in out
    assert (tmp_path / "args.json").read_text() == original  # the run's first flags stay
    assert json.loads((tmp_path / "args.resume1.json").read_text())["lr"] == 1e-3
    checkpoint.prepare_run(tmp_path, Args(resume=True, lr=1e-3, steps=8, n_samples=2, resume_override=True))
    out = capsys.readouterr().out  # compared with the newest flags (args.resume1.json)
    assert "changed since args.resume1.json: --n-samples 4 -> 2 (applied: --resume-override)" in out
    assert json.loads((tmp_path / "args.resume2.json").read_text())["n_samples"] == 2
    checkpoint.prepare_run(tmp_path, Args(resume=True, lr=1e-3, steps=8, n_samples=2))
    assert "changed since args.resume2.json: none" in capsys.readouterr().out


def test_resume_applies_this_runs_optimizer_flags(tmp_path):
    """--weight-decay is in the optimizer's state dict: without care the checkpoint's value would silently win."""
    _save(tmp_path, [1], wd=0.01)
    model, opt = _save(tmp_path / "other", [], wd=0.5)
    checkpoint.resume(checkpoint.latest(tmp_path), model, opt)
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[0]["lr"] == 1e-2
    assert opt.state[next(iter(model.parameters()))]["step"] == 1  # the state is the checkpoint's


def test_stop_writes_status(tmp_path):
    model, opt = _save(tmp_path, [])
    stop, guard = checkpoint.StopFlag(), checkpoint.BadStepGuard(3, tmp_path)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoint.save_or_stop(3, 10, 0, tmp_path, model, opt, stop, guard)
    finally:
        stop.restore()
    st = json.loads((tmp_path / "status.json").read_text())
    assert st | {"time": 0} == {"state": "stopped", "step": 3, "signal": "SIGTERM", "time": 0,
                                "checkpoint": str(tmp_path / "checkpoints" / "step_000003")}
