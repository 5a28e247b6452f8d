"""GEM loss: its gradient identities, and a 2-rank FSDP2 step equal to a 1-rank step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gem_sft import gem_loss

ROOT = Path(__file__).resolve().parents[1]


def _logit_grad(fn, logits, y):
    z = logits.clone().requires_grad_(True)
    fn(z, y).sum().backward()
    return z.grad


def test_beta_one_linear_is_exactly_cross_entropy():
    torch.manual_seed(0)
    z, y = torch.randn(64, 50, dtype=torch.float64) * 3, torch.randint(0, 50, (64,))
    g_gem = _logit_grad(lambda z, y: gem_loss(z, y, beta=1.0)[0], z, y)
    g_ce = _logit_grad(lambda z, y: torch.nn.functional.cross_entropy(z, y, reduction="none"), z, y)
    assert torch.allclose(g_gem, g_ce, atol=1e-12, rtol=0)
    # the logged CE is the real CE
    assert torch.allclose(gem_loss(z, y, 0.7)[1], torch.nn.functional.cross_entropy(z, y, reduction="none"))


@pytest.mark.parametrize("beta", [0.3, 0.7, 1.5])
def test_gem_logit_gradient_is_q_minus_onehot(beta):
    torch.manual_seed(1)
    z, y = torch.randn(32, 40, dtype=torch.float64) * 2, torch.randint(0, 40, (32,))
    g = _logit_grad(lambda z, y: gem_loss(z, y, beta)[0], z, y)
    q = (z / beta).softmax(-1)
    assert torch.allclose(g, q - torch.nn.functional.one_hot(y, 40).double(), atol=1e-12)
    if beta != 1.0:  # and it is not CE's gradient
        assert not torch.allclose(g, z.softmax(-1) - torch.nn.functional.one_hot(y, 40).double(), atol=1e-3)


def test_logsigmoid_weights_as_specified():
    torch.manual_seed(2)
    z, y = torch.randn(16, 30, dtype=torch.float64) * 50, torch.randint(0, 30, (16,))
    beta = 0.7
    loss, _ = gem_loss(z, y, beta, h="logsigmoid")
    logp = z.log_softmax(-1)
    q = (z / beta).softmax(-1)
    w = 1 / (1 + torch.exp(-(z - z.gather(-1, y[:, None])) / 100))
    expected = (q * w * (logp - logp.gather(-1, y[:, None]))).sum(-1)
    assert torch.allclose(loss, expected, atol=1e-10)
    # weights carry no gradient: the logit gradient is sum_v q_v w_v (e_v - p) - (e_y - p) sum_v q_v w_v
    g = _logit_grad(lambda z, y: gem_loss(z, y, beta, "logsigmoid")[0], z, y)
    qw = q * w
    onehot = torch.nn.functional.one_hot(y, 30).double()
    p = z.softmax(-1)
    assert torch.allclose(g, qw - p * qw.sum(-1, keepdim=True) - (onehot - p) * qw.sum(-1, keepdim=True), atol=1e-10)
    assert not torch.allclose(loss, gem_loss(z, y, beta, h="linear")[0])


def _run_sft(tmp, nproc, extra=()):
    out = tmp / f"run{nproc}"
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", str(nproc), "--master-port", str(_free_port()),
           str(ROOT / "gem_sft.py"), "--out-dir", str(out), "--max-steps", "2", "--batch-size", "16",
           "--micro-batch-size", "4", "--train-size", "64", "--eval-size", "8", "--eval-k", "0",
           "--lr", "1e-2", "--warmup-frac", "0.5", "--adam-eps", "1e-3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, load_file(out / "hf" / "model.safetensors")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loss,vocab", [("gem", "--vocab-parallel"), ("ce", "--vocab-parallel"),
                                        ("gem", "--no-vocab-parallel")])
def test_two_rank_fsdp_step_equals_one_rank(tmp_path, loss, vocab):
    """Same global batch of 16 sequences: 1 rank x 4 micro-batches vs 2 ranks x 2 micro-batches. The
    global token-mean makes the update identical up to fp32 summation order (tolerance 1e-5). On 2 ranks the
    tied embedding is vocabulary-parallel (the default: each rank its 64 rows) or gathered by FSDP.

    Adam's eps is raised to 1e-3 here: one Adam step moves an element by about lr * g / (|g| + eps), which
    for |g| near eps turns fp32 summation noise on g into weight differences of up to lr * noise / eps. With
    the default 1e-8 that was ~1e-4 (seen: 7 of 1.0M elements with |g| ~ 1e-10, all with |update| < 0.4 lr);
    1e-6 passed here but leaves lr * 1e-9 / 1e-6 = 1e-5, the tolerance itself, on another CPU. With 1e-3 the
    bound is lr * 1e-7 / 1e-3 = 1e-6 for any noise below 1e-7, on any machine, and the weights still move."""
    rows1, w1 = _run_sft(tmp_path, 1, ["--loss", loss])
    rows2, w2 = _run_sft(tmp_path, 2, ["--loss", loss, vocab])
    for a, b in zip(rows1, rows2):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5 * max(1, abs(a["train/loss"]))
        assert abs(a["train/ce_loss"] - b["train/ce_loss"]) < 1e-5 * a["train/ce_loss"]
    init = load_file(Path(__import__("common.model", fromlist=["x"]).build_tiny()) / "model.safetensors")
    moved = 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
        moved += not torch.equal(w1[k], init[k])
    assert moved > len(w1) // 2  # the step really changed the weights
