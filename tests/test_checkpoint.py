"""common/checkpoint.py: exact 2-rank resume (weights, optimizer, scheduler, every RNG, extra), SIGKILL
and SIGTERM mid-run, incomplete checkpoints ignored, keep_last, world-size check, a NaN step on one rank (the guards
of common/guards.py across ranks). The 2-rank cases run tests/_ckpt_worker.py under torchrun (gloo, CPU)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import checkpoint  # noqa: E402

TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]


def launch(model_dir, out, *args):
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "torchrun.log", "ab")
    cmd = TORCHRUN + [str(ROOT / "tests" / "_ckpt_worker.py"), "--model", str(model_dir), "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, out, timeout=300, rc=0):
    try:
        got = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        got = proc.wait()
    if rc is not None:
        assert got == rc, f"torchrun rc {got}:\n" + (out / "torchrun.log").read_text()[-4000:]
    return got


def run(model_dir, out, *args):
    finish(launch(model_dir, out, *args), out)
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


def wait_progress(out, done, timeout=180):
    """{rank: pid} once every rank reported `done` finished steps."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            prog = [json.loads((out / f"progress_rank{r}.json").read_text()) for r in range(2)]
            if all(p["done"] >= done for p in prog):
                return [p["pid"] for p in prog]
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("workers did not report progress:\n" + (out / "torchrun.log").read_text()[-4000:])


def same_weights(a, b):
    wa, wb = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def steps_of(run_dir):
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from common import model as M
    return M.build_tiny(tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=2, heads=2, kv_heads=1,
                        intermediate=128)


@pytest.fixture(scope="module")
def ref_run(tiny, tmp_path_factory):
    """The uninterrupted run: 6 steps, saves after steps 3 and 6, NaN loss on rank 1 at step 4."""
    out = tmp_path_factory.mktemp("ref")
    return out, run(tiny, out, "--save-every", "3", "--keep-last", "0", "--nan-at", "4")


def test_resume_roundtrip_two_ranks(tiny, ref_run, tmp_path):
    ref_dir, ref = ref_run
    assert steps_of(ref_dir) == [3, 6]
    # NaN loss on rank 1 only: both ranks skip that step (the guard all-reduces) and count it
    for r in ref:
        assert list(r["took"].values()) == [True] * 4 + [False, True] and r["bad_total"] == 1
    res = run(tiny, tmp_path, "--resume", str(ref_dir / "checkpoints" / "step_000003"), "--nan-at", "4")
    for a, b in zip(ref, res):
        assert b["start"] == 3 and b["ref_ok"]  # pi_ref shards came back from `extra`, not from the weights
        for key in ("loss", "draws", "took"):  # json text: NaN == NaN
            assert json.dumps(b[key]) == json.dumps({k: v for k, v in a[key].items() if int(k) >= 3}), key
        assert b["lr"] == a["lr"]
    assert ref[0]["draws"] != ref[1]["draws"]  # per-rank RNG streams really differ
    assert same_weights(ref_dir, tmp_path)


def test_sigkill_then_resume(tiny, ref_run, tmp_path):
    proc = launch(tiny, tmp_path, "--save-every", "2", "--hang-after", "5", "--nan-at", "4")
    for pid in wait_progress(tmp_path, 5):
        os.kill(pid, signal.SIGKILL)
    finish(proc, tmp_path, rc=None)
    assert checkpoint.latest(tmp_path).name == "step_000004" and steps_of(tmp_path) == [2, 4]
    res = run(tiny, tmp_path, "--resume", "latest", "--save-every", "2", "--nan-at", "4")
    ref_dir, ref = ref_run
    assert [r["start"] for r in res] == [4, 4]
    for a, b in zip(ref, res):
        assert json.dumps(b["loss"]) == json.dumps({k: v for k, v in a["loss"].items() if int(k) >= 4})
    assert same_weights(ref_dir, tmp_path)
    assert steps_of(tmp_path) == [4, 6]  # keep_last=2


def test_sigterm_finishes_step_saves_and_exits(tiny, tmp_path):
    proc = launch(tiny, tmp_path, "--stop", "--steps", "1000", "--step-sleep", "0.05")
    pids = wait_progress(tmp_path, 2)
    os.kill(pids[1], signal.SIGTERM)  # one rank only: rank 0 learns it through should_stop()
    finish(proc, tmp_path, rc=0)  # both workers exited 0
    res = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in range(2)]
    assert all(r["stopped"] for r in res) and res[0]["done"] == res[1]["done"] < 1000
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and json.loads((ckpt / "meta.json").read_text())["step"] == res[0]["done"]


def test_latest_ignores_incomplete(ref_run, tmp_path):
    src = ref_run[0] / "checkpoints"
    ck = tmp_path / "checkpoints"
    shutil.copytree(src, ck)
    good = ck / "step_000006"
    assert checkpoint.latest(tmp_path) == good

    def copy_as(step, suffix=""):
        dst = ck / f"step_{step:06d}{suffix}"
        shutil.copytree(good, dst)
        meta = json.loads((dst / "meta.json").read_text())
        (dst / "meta.json").write_text(json.dumps(meta | {"step": step}))
        return dst

    intact = copy_as(7)  # positive control: a good copy is picked
    assert checkpoint.latest(tmp_path) == intact
    shard = intact / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated mid-write
    assert checkpoint.latest(tmp_path) == good
    (copy_as(8) / "meta.json").unlink()  # crashed before the marker
    (copy_as(9) / "rank_00001.pt").unlink()  # a file missing
    (copy_as(10) / "meta.json").write_text('{"step": 10, "wor')  # torn marker
    copy_as(11, ".tmp")  # unfinished save (rename never happened)
    assert checkpoint.latest(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resume(intact, None, None)
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_world_size_mismatch(ref_run):
    with pytest.raises(RuntimeError, match="written by 2 ranks but this run has 1.*nproc_per_node 2"):
        checkpoint.resume(ref_run[0] / "checkpoints" / "step_000003", None, None)


def _single_process_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    return model, opt, sched


def _train_step(model, opt, sched):
    x = torch.randn(4, 8) * random.random() + float(np.random.rand())
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step(); sched.step(); opt.zero_grad()
    return loss.item()


def test_single_process_resume_and_keep_last(tmp_path):
    """Without a process group (plain python) the same calls work; keep_last prunes; RNGs come back."""
    model, opt, sched = _single_process_model()
    for step in range(1, 5):
        _train_step(model, opt, sched)
        checkpoint.save(tmp_path, step, model, opt, sched, extra={"n": step, "t": torch.arange(step)}, keep_last=2)
    assert steps_of(tmp_path) == [3, 4]
    (tmp_path / "checkpoints" / "step_000005.tmp").mkdir()  # leftover of a crashed save: pruned
    checkpoint.save(tmp_path, 4, model, opt, sched, extra={"n": 4, "t": torch.arange(4)})  # same step again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    checkpoint.save(tmp_path / "all", 1, model, opt, keep_last=0)
    checkpoint.save(tmp_path / "all", 2, model, opt, keep_last=0)
    assert steps_of(tmp_path / "all") == [1, 2]
    expect = [_train_step(model, opt, sched) for _ in range(2)]
    weights = [p.detach().clone() for p in model.parameters()]
    model2, opt2, sched2 = _single_process_model()
    random.seed(123); np.random.seed(123); torch.manual_seed(123)
    st = checkpoint.resume(checkpoint.latest(tmp_path), model2, opt2, sched2)
    assert st["step"] == 4 and st["extra"]["n"] == 4 and torch.equal(st["extra"]["t"], torch.arange(4))
    assert [_train_step(model2, opt2, sched2) for _ in range(2)] == expect
    assert all(torch.equal(a, b) for a, b in zip(weights, model2.parameters()))
