"""End-to-end runs of the trainers under torchrun with 2 ranks on CPU (real FSDP2, vLLM, rewards): short runs of
every RL trainer (found by its fences, tests/_forks.py) change the weights and log finite metrics; a run killed
with SIGKILL and resumed ends bit-identical to an uninterrupted one; SIGTERM saves and exits 0; NaN steps are
skipped, then abort.

The cold-start model is a quick GEM SFT on an easy version of the built-in task (one operation on
1..3), so that sampled groups usually have mixed rewards. Usually is not always: floating point differs
between CPUs, so what a weakly trained model samples differs too. No assertion here depends on it: each
checks what the trainer must do *given* the batch it drew (from its logged metrics), on any machine."""
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import checkpoint
from tests import _forks

ROOT = Path(__file__).resolve().parents[1]
TASK = ["--difficulty", "1", "--max-num", "3", "--eval-size", "8"]  # 27 problems: 8 held out
RL = [*TASK, "--prompts-per-step", "8", "--n-samples", "4", "--eval-k", "2",
      "--micro-batch-size", "8", "--max-new-tokens", "24", "--lr", "3e-4"]
VOLATILE = ("time", "seconds", "tokens_per_s")  # wall-clock metrics differ between runs


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(script, out, *args, nproc=2):
    return [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", str(nproc), "--master-port", str(_free_port()),
            str(ROOT / script), "--out-dir", str(out), *args]


def _run(script, out, *args, ok=True, timeout=400):
    """Run to completion; on a timeout kill the whole process group (torchrun, its workers, their pools)."""
    p = subprocess.Popen(_cmd(script, out, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(p)
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    if ok:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def _metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def _stable(row):
    return {k: v for k, v in row.items() if not any(w in k for w in VOLATILE)}


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold") / "gem"
    # 150 steps (train CE ~0.2 on this machine): the RL tests' groups then usually mix right and wrong answers
    _run("gem_sft.py", out, *TASK, "--max-steps", "150", "--train-size", "2000", "--lr", "1e-2",
         "--eval-k", "0", "--log-every", "50")
    return out / "hf"


# Per trainer, from one step's logged metrics: (the fraction of responses with a non-zero advantage, as the
# algorithm prescribes it for the rewards drawn, computed independently from other logged quantities, or None;
# whether any response has a non-zero advantage). With 0/1 rewards: GRPO's, GSPO's, RLOO's and Reinforce-rej's
# advantages are non-zero exactly in the groups with mixed rewards; DAPO trains only on such groups (dynamic
# sampling), so on every response; RAFT++ gives A = 1 exactly to the correct responses (in a group with a success
# every correct response has the best reward); ReMax wherever a sample's reward differs from its greedy response's.
# A trainer found without an entry here (a new fork) is held to the generic rule below.
MIXED = lambda r: (1 - r["train/zero_var_groups"], r["train/zero_var_groups"] < 1)
EXPECT = {
    "grpo.py": MIXED, "gspo.py": MIXED, "rloo.py": MIXED, "reinforce_rej.py": MIXED,
    "dapo.py": lambda r: (1.0, True),
    "remax.py": lambda r: (None, r["train/nonzero_adv"] > 0),
    "raftpp.py": lambda r: (r["train/accuracy"], r["train/accuracy"] > 0),
}
GENERIC = lambda r: (None, r["train/nonzero_adv"] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", _forks.rl_trainers())
def test_two_steps_update_exactly_when_there_is_signal(cold_start, tmp_path, trainer):
    """Two RL steps of every RL trainer (found by its fences). Whatever the model sampled: the share of responses with
    a non-zero advantage is what the algorithm prescribes for the rewards drawn, and the weights change if and only if
    there was one. Weight decay is off, so a step whose advantages are all zero has exactly zero gradient and must
    leave every weight bit-identical (and any non-zero advantage must move them). The rollout-mismatch ratio is
    logged (fp32 engine and trainer: ~1). DAPO: every trained group has mixed scores, however many rounds that took,
    or the run stops with one error line naming --max-gen-rounds."""
    out = tmp_path / trainer
    # 0 = "only at the end" for both: the run still evaluates and checkpoints after its last step
    r = _run(trainer, out, "--model", str(cold_start), *RL, "--steps", "2", "--eval-every", "0", "--save-every", "0",
             "--weight-decay", "0", "--log-kl-ref", ok=False)
    if trainer == "dapo.py" and r.returncode:  # the model drew no mixed group in 10 rounds: said, not hidden
        assert r.returncode == 1 and "--max-gen-rounds 10" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
        return
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert checkpoint.latest(out).name == "step_000002"
    rows = _metrics(out)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert any("eval/pass@1" in r for r in rows)
    for r in rows:
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    signal_seen = False
    for r in train:
        nonzero, has_signal = EXPECT.get(trainer, GENERIC)(r)
        if nonzero is not None:
            assert r["train/nonzero_adv"] == pytest.approx(nonzero, abs=1e-9), r
        assert (r["train/adv_std"] > 0 or r["train/adv_mean"] != 0) == has_signal == (r["train/nonzero_adv"] > 0), r
        assert r["train/in_loss"] == 1.0  # rejected responses stay in the loss (A = 0) unless --drop-rejected
        assert abs(r["train/tis_ratio_mean"] - 1) < 1e-3 and r["train/tis_capped"] == 0, r  # fp32 engine and trainer
        if trainer == "dapo.py":  # dynamic sampling: only groups with a signal; rounds and the dropped share logged
            assert r["train/zero_var_groups"] == 0 and r["train/gen_rounds"] >= 1, r
            assert (r["train/dropped_groups"] > 0) == (r["train/gen_rounds"] > 1), r  # a round drops, or it is the last
            assert -1 <= r["train/overlong_penalty"] <= 0, r
        else:
            assert r["train/gen_rounds"] == 1 and r["train/dropped_groups"] == 0, r
        signal_seen |= has_signal
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]  # a few completions per step
    assert [x["step"] for x in samples] == [1] * 4 + [2] * 4
    assert all(x["reward"] in (0.0, 1.0) and x["prompt"].endswith("=\n") and isinstance(x["response"], str) for x in samples)
    # KL coefficient 0 with --log-kl-ref: no pi_ref forward in training, only on the evaluation step (here the last)
    assert "train/kl_ref" not in train[0] and train[1]["train/kl_ref"] >= 0
    before, after = load_file(cold_start / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    if signal_seen:
        assert changed > len(before) // 2, (changed, train)
    else:
        assert changed == 0, (changed, train)


@pytest.mark.slow
def test_dapo_stops_at_the_round_cap_with_one_line_naming_the_flag(tmp_path):
    """Dynamic sampling with --max-gen-rounds 1 from the untrained built-in model (its answers are all but never
    right: its groups are all-equal, all 0). Whatever it drew: either a rank lacked groups with a signal after its one
    round and the run stopped with one `error:` line that names the flag, or every trained group had one."""
    out = tmp_path / "dapo"
    r = _run("dapo.py", out, "--model", "tiny", *RL, "--steps", "1", "--eval-k", "0", "--save-every", "0",
             "--max-gen-rounds", "1", ok=False)
    if r.returncode == 0:
        assert all(row["train/zero_var_groups"] == 0 for row in _metrics(out) if "train/loss" in row)
        return
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("in --max-gen-rounds 1 rounds (0: no limit)" in e for e in errors), r.stderr[-3000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_grpo_step_with_a_real_vocabulary(tmp_path):
    """One GRPO step through vLLM on 2 ranks of a model with Qwen2.5's vocabulary (V = 151,936; hidden 64, 2 layers,
    random weights): the big-vocabulary paths (the fused log-prob head over 151,936 columns, the tied head's sync into
    the engine, sampling and decoding ids the built-in tokenizer never produces, the KV cache sized from --max-len).
    Asserted by construction, whatever a random model samples: every logged number is finite, the trainer's
    log-probs of the sampled tokens match the engine's (same weights, fp32), the weights change if and only if a
    response had a non-zero advantage, the exported head has V rows. And without --log-kl-ref (KL coefficient 0)
    the run keeps no pi_ref: no train/kl_ref on the evaluation step, no pi_ref shards in the checkpoint."""
    from common.model import build_tiny
    V = 151_936
    model = build_tiny(tmp_path / "vocab151936", seed=0, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128,
                       vocab=V)
    out = tmp_path / "grpo"
    _run("grpo.py", out, "--model", str(model), *TASK, "--prompts-per-step", "2", "--n-samples", "2", "--eval-k", "2",
         "--max-new-tokens", "8", "--max-len", "64", "--mini-batches", "1", "--steps", "1", "--eval-every", "0",
         "--weight-decay", "0", "--lr", "1e-3")
    rows = _metrics(out)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 1 and any("eval/pass@1" in r for r in rows)
    for r in rows:
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    r = train[0]
    assert r["train/response_len"] > 0 and r["train/logprob_gap"] < 1e-3, r
    assert "train/kl_ref" not in r  # the last step evaluates, but pi_ref is neither kept nor logged
    extra = torch.load(out / "checkpoints" / "step_000001" / "rank_00000.pt", weights_only=True)["extra"]
    assert "ref" not in extra
    before, after = load_file(model / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert after["model.embed_tokens.weight"].shape == (V, 64)
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert (changed > 0) == (r["train/nonzero_adv"] > 0), (changed, r)


def _kill_job(p):
    """SIGKILL every process of a torchrun job. Killing torchrun's process group is not enough: torchrun
    starts each worker in a session (and process group) of its own, so the workers would survive, finish
    their steps and race whatever runs next in the same folder. Returns the processes that were killed."""
    import psutil
    procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    p.wait()
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"
    return procs


def _kill_after(cmd, out, step):
    """Start a run and SIGKILL all its processes once metrics.jsonl shows `step`."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        f = Path(out) / "metrics.jsonl"
        if f.exists() and any(r.get("step", 0) >= step and "train/loss" in r for r in _metrics(out)):
            killed = _kill_job(p)
            assert len(killed) >= 3, killed  # torchrun and its two workers
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode != 0, "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("grpo.py", [*RL, "--steps", "5", "--save-every", "2", "--eval-every", "100"]),
    ("gem_sft.py", [*TASK, "--max-steps", "7", "--save-every", "2", "--train-size", "400", "--batch-size", "32",
                    "--eval-k", "0", "--log-every", "1"]),
])
def test_sigkill_and_resume_is_exact(cold_start, tmp_path, script, args):
    if script == "grpo.py":
        args = ["--model", str(cold_start), *args]
    ref = tmp_path / "uninterrupted"
    _run(script, ref, *args)
    run = tmp_path / "killed"
    _kill_after(_cmd(script, run, *args), run, 3)  # step 3: between the checkpoints of steps 2 and 4
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    _run(script, run, *args, "--resume")
    ref_rows, rows = _metrics(ref), _metrics(run)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # no step lost or repeated
    for a, b in zip(ref_rows, rows):
        assert _stable(a) == _stable(b), (ckpts, a, b)  # every logged quantity after the resume point
    w_ref, w = load_file(ref / "hf" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    for k in w_ref:
        assert torch.equal(w_ref[k], w[k]), k  # bit-identical final weights


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    import psutil
    out = tmp_path / "term"
    args = [*TASK, "--max-steps", "400", "--save-every", "1000", "--train-size", "2000", "--batch-size", "16",
            "--eval-k", "0", "--log-every", "1"]
    p = subprocess.Popen(_cmd("gem_sft.py", out, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(_metrics(out)) >= 3):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail("the run ended or stalled before step 3: " + p.stdout.read()[-3000:])
        time.sleep(0.1)
    for child in psutil.Process(p.pid).children():  # what a scheduler's preemption does: SIGTERM to the workers
        child.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0, log[-3000:]
    assert "stopped by signal" in log
    from common.checkpoint import latest
    ckpt = latest(out)
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert 3 <= step < 400 and step == _metrics(out)[-1]["step"]
    _run("gem_sft.py", out, *[str(step + 2) if a == "400" else a for a in args], "--resume")
    assert _metrics(out)[-1]["step"] == step + 2


@pytest.mark.slow
def test_nan_steps_are_skipped_then_abort(tmp_path):
    base = [*TASK, "--max-steps", "6", "--train-size", "400", "--batch-size", "32", "--eval-k", "0",
            "--log-every", "1", "--save-every", "2"]
    out = tmp_path / "one_nan"
    _run("gem_sft.py", out, *base, "--inject-nan", "3")
    rows = _metrics(out)
    assert [r["train/bad_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(r["train/ce_loss"]) for r in rows if r["step"] != 3)
    out = tmp_path / "many_nan"
    r = _run("gem_sft.py", out, *base, "--inject-nan", "3", "4", "5", "--max-bad-steps", "3", ok=False)
    assert r.returncode != 0 and "3 consecutive non-finite steps" in r.stdout + r.stderr
    from common.checkpoint import latest
    assert latest(out).name == "step_000002"  # the last good checkpoint is intact
