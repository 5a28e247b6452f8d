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

from common import checkpoint, guards
from common.config import InputError, RunArgs
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
    with pytest.raises(InputError, match=rf"no usable checkpoint in {tmp_path / 'checkpoints'} "
                       r"\(step_000002: no meta.json .*; step_000004: __0_0.distcp is \d+ bytes.*; "
                       r"step_000006.tmp: unfinished save"):
        checkpoint.prepare_run(tmp_path, Args(resume=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with pytest.raises(InputError, match="no usable checkpoint .*no checkpoint folder"):
        checkpoint.prepare_run(tmp_path / "empty", Args(resume=True))


def test_new_run_refuses_a_folder_that_holds_one(tmp_path, capsys):
    _new_run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(InputError, match=rf"{tmp_path} already holds a run \(metrics.jsonl with 3 rows, "
                       r"step_000002, step_000004\): pass --resume .* --overwrite"):
        checkpoint.prepare_run(tmp_path, Args())
    with pytest.raises(FileExistsError, match="already has 3 rows"):
        Logger(tmp_path, 6)  # the logger refuses too: it never truncates
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    with pytest.raises(InputError, match="exclude each other"):
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
    with pytest.raises(InputError, match=r"--resume: --n-samples 4 -> 2 would change the math or the data order "
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
    stop, guard = guards.StopFlag(), guards.BadStepGuard(3, tmp_path)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoint.save_or_stop(3, 10, 0, tmp_path, model, opt, stop, guard)
    finally:
        stop.restore()
    st = json.loads((tmp_path / "status.json").read_text())
    assert st | {"time": 0} == {"state": "stopped", "step": 3, "signal": "SIGTERM", "time": 0,
                                "checkpoint": str(tmp_path / "checkpoints" / "step_000003")}


# --- torchrun, 2 ranks: every fault in one run folder, as an operator meets them ---
SFT = [*TASK, "--train-size", "400", "--batch-size", "32", "--eval-k", "0", "--log-every", "1", "--save-every", "2",
       "--lr", "3e-3", "--max-steps", "400"]
RL_RUN = ["--model", "tiny", *RL, "--save-every", "2", "--eval-every", "100", "--steps", "40"]
TRAINERS = {"gem_sft.py": (SFT, "--max-steps", ["--batch-size", "16"], "--batch-size 32 -> 16"),
            "grpo.py": (RL_RUN, "--steps", ["--n-samples", "2"], "--n-samples 4 -> 2")}
# the fault paths are shared (common/checkpoint.py): FAULTS_ALL_TRAINERS=1 also runs the other three RL trainers
if os.environ.get("FAULTS_ALL_TRAINERS"):
    TRAINERS |= {t: TRAINERS["grpo.py"] for t in ("remax.py", "raftpp.py", "reinforce_rej.py")}


def _set(args, flag, value):
    """args with `flag value` (replaced where present)."""
    i = args.index(flag) if flag in args else None
    return [*args[:i], flag, str(value), *args[i + 2:]] if i is not None else [*args, flag, str(value)]


def _launch(script, out, args, log):
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}  # load-proof: the step + save may take long
    return subprocess.Popen(_cmd(script, out, *args), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)


def _until_step(p, out, step, log):
    deadline = time.time() + 400
    while not ((out / "metrics.jsonl").exists() and any(r["step"] >= step for r in _metrics(out) if "train/loss" in r)):
        if p.poll() is not None or time.time() > deadline:
            _kill_job(p)
            pytest.fail(f"the run ended or stalled before step {step}:\n" + Path(log).read_text()[-4000:])
        time.sleep(0.1)


def _finish(p, log):
    try:
        p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        _kill_job(p)
        raise
    return p.returncode, Path(log).read_text()


def _refused(script, out, args, log):
    """A launch that must stop before any work and leave the run folder as it was."""
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    rc, text = _finish(_launch(script, out, args, log), log)
    _one_error_line(text, "")  # one `error:` line, exit code 2, no rank's traceback
    assert rc != 0 and {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before, text[-3000:]
    return text


def _train_steps(out):
    steps = [r["step"] for r in _metrics(out) if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps  # no step lost or repeated
    return steps[-1]


@pytest.mark.slow
@pytest.mark.parametrize("script", list(TRAINERS))
def test_operator_faults(tmp_path, script):
    base, total_flag, math_change, math_msg = TRAINERS[script]
    out, ck, log = tmp_path / "run", tmp_path / "run" / "checkpoints", lambda n: tmp_path / f"launch{n}.log"
    status = lambda: json.loads((out / "status.json").read_text())  # noqa: E731
    # 1. SIGTERM to torchrun (a scheduler, `kill <pid>`, Ctrl-C): the workers save and exit 0, torchrun exits 1
    p = _launch(script, out, base, log(1))
    _until_step(p, out, 2, log(1))
    p.send_signal(signal.SIGTERM)
    rc, text = _finish(p, log(1))
    assert rc == 1 and "SignalException" in text and "stopped by signal (SIGTERM) after step" in text, text[-3000:]
    k = status()["step"]
    assert status()["state"] == "stopped" and checkpoint.latest(out) == ck / f"step_{k:06d}"
    assert Path(status()["checkpoint"]) == ck / f"step_{k:06d}"
    assert _train_steps(out) == k >= 2
    # 2. the same command again, without --resume: refused, the run's history untouched
    assert f"{out} already holds a run (metrics.jsonl with" in _refused(script, out, base, log(2))
    # 3. --resume with a flag that changes the math or the data order: refused, named
    text = _refused(script, out, [*_set(base, *math_change), "--resume"], log(3))
    assert f"--resume: {math_msg} would change the math or the data order" in text and "--resume-override" in text
    # 4. --resume with a new --lr: applied and logged, args.json kept; then SIGTERM to the workers: exit 0
    p = _launch(script, out, [*_set(base, "--lr", "1e-3"), "--resume"], log(4))
    _until_step(p, out, k + 2, log(4))
    for worker in psutil.Process(p.pid).children():
        worker.send_signal(signal.SIGTERM)
    rc, text = _finish(p, log(4))
    lr = float(base[base.index("--lr") + 1])
    assert rc == 0 and f"--lr {lr} -> 0.001 (applied)" in text and "stopped by signal (SIGTERM)" in text, text[-3000:]
    assert json.loads((out / "args.json").read_text())["lr"] == lr
    assert json.loads((out / "args.resume1.json").read_text())["lr"] == 1e-3
    k2 = status()["step"]
    assert status()["state"] == "stopped" and checkpoint.latest(out) == ck / f"step_{k2:06d}"
    assert _train_steps(out) == k2
    # 5. the newest checkpoint damaged: named with what is wrong, the one before it resumed; a new total is applied
    *_, prev, newest = [c for _, c, problem in checkpoint.scan(out) if problem is None]
    shard = _cut(newest)
    total = int(prev.name[5:]) + 1
    p = _launch(script, out, [*_set(_set(base, "--lr", "1e-3"), total_flag, total), "--resume"], log(5))
    rc, text = _finish(p, log(5))
    assert rc == 0, text[-3000:]
    assert f"skipping damaged checkpoint {newest}: {shard} is " in text and "bytes, meta.json says" in text
    assert f"resumed from {prev} at step {total - 1}" in text
    assert f"{total_flag} {base[base.index(total_flag) + 1]} -> {total} (applied)" in text
    assert _train_steps(out) == total and status()["state"] == "trained"
    dropped = [json.loads(x)["step"] for x in open(out / "metrics.dropped.jsonl")]
    assert set(range(total, k2 + 1)) <= set(dropped)  # the rows after the resumed checkpoint: kept aside
    # 6. every checkpoint damaged: --resume is an error naming the folder and what it found; nothing changes
    for _, c, problem in checkpoint.scan(out):
        if problem is None:
            _cut(c)
    text = _refused(script, out, [*_set(_set(base, "--lr", "1e-3"), total_flag, total), "--resume"], log(6))
    assert f"--resume: no usable checkpoint in {ck} (step_" in text and f"{shard} is " in text, text[-3000:]


def test_reward_workers_survive_a_signal_to_their_trainers_group(tmp_path):
    """torchrun passes a SIGTERM/SIGINT it receives to each rank's whole process group (os.killpg). The rank
    finishes its step (StopFlag), so its reward workers must not die with it: the step's answers would score 0."""
    child = tmp_path / "child.py"
    child.write_text(f"""import json, os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from common import rewards as R
if __name__ == "__main__":  # the pool's forkserver imports this file too
    flag = []
    signal.signal(signal.SIGTERM, lambda s, f: flag.append(s))
    resps, golds = [r"\\boxed{{\\sqrt{{2}}}}"] * 4, [r"\\frac{{2}}{{\\sqrt{{2}}}}"] * 4  # undecided by the fast path
    before = R.score_batch(resps, golds, timeout_s=60)
    os.killpg(0, signal.SIGTERM)  # what torchrun does to a rank's group
    after = R.score_batch(resps, golds, timeout_s=60)
    print(json.dumps([flag, before, after, [os.getpgid(p.pid) != os.getpgid(0) for p in R._pool.procs]]))
""")
    r = subprocess.run([str(ROOT / ".venv/bin/python"), str(child)], capture_output=True, text=True, timeout=300,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    flag, before, after, own_group = json.loads(r.stdout.splitlines()[-1])
    assert flag == [signal.SIGTERM] and own_group == [True, True]
    assert before == after == [[1.0] * 4, {"timeouts": 0, "errors": 0, "format_ok": 1.0}]


def _one_error_line(text, message):
    """A run stopped by a known bad input: one `error:` line naming it, no rank's traceback, worker exit code 2."""
    lines = [x for x in text.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], text[-4000:]
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-4000:]
    assert "exitcode  : 2" in text, text[-4000:]  # torchrun's report of the workers' exit code


SMALL_RL = ["--model", "tiny", *TASK, "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens", "8",
            "--eval-k", "1", "--train-size", "40", "--mini-batches", "1"]


@pytest.mark.slow
def test_bad_inputs_are_one_error_line_before_and_after_the_engine_starts(tmp_path):
    """Known bad inputs are one `error:` line and exit code 2, wherever they are found: a built-in prompt longer than
    --max-len (found with the data, before the engine starts), and a resume whose flags need pi_ref from a run that
    kept none (found once the engine runs: the trainers resume after starting it). The built-in prompts here are
    5 tokens ("2+3=" and a newline)."""
    out = tmp_path / "short"
    rc, text = _finish(_launch("grpo.py", out, [*SMALL_RL, "--max-len", "4"], tmp_path / "short.log"), tmp_path / "short.log")
    _one_error_line(text, "built-in task: train row")
    out = tmp_path / "noref"
    rc, text = _finish(_launch("grpo.py", out, [*SMALL_RL, "--steps", "1"], tmp_path / "a.log"), tmp_path / "a.log")
    assert rc == 0, text[-3000:]
    args = [*SMALL_RL, "--steps", "2", "--resume", "--log-kl-ref", "--resume-override"]
    rc, text = _finish(_launch("grpo.py", out, args, tmp_path / "b.log"), tmp_path / "b.log")
    _one_error_line(text, "--resume: this run needs pi_ref (--kl-coef > 0 or --log-kl-ref) but its checkpoints were "
                          "saved without it")
    assert _train_steps(out) == 1  # nothing was trained or logged after the error
