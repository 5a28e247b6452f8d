"""common.vocab_parallel and the kernels' vocabulary-parallel paths, and kernels.token_gem, against full-logit
formulas written here (float64)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _launch import torchrun  # noqa: E402
from common import kernels as K  # noqa: E402


def gem_reference(z, y, beta, h):
    """sum_v q_v w_v (log p_v - log p_y), q = softmax(z / beta) and w held constant (GEM, gem_sft.py's docstring)."""
    logp = z.log_softmax(-1)
    q = (z / beta).softmax(-1).detach()
    w = torch.sigmoid((z - z.gather(1, y[:, None])) / 100).detach() if h == "logsigmoid" else 1.0
    return (q * w * (logp - logp.gather(1, y[:, None]))).sum(-1)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [0.5, 0.7, 1.0])
def test_token_gem_equals_full_logits(monkeypatch, beta, h):
    """Loss, CE, entropy and both gradients of the fused GEM kernel (several row and vocabulary tiles, ignored rows)
    against the formula on full float64 logits; and the fused loss is not cross-entropy's (for beta < 1)."""
    monkeypatch.setattr(K, "CHUNK_ROWS", 5)
    monkeypatch.setattr(K, "CHUNK_COLS", 7)
    g = torch.Generator().manual_seed(int(beta * 10))
    N, D, V = 23, 8, 40
    x = (torch.randn(N, D, generator=g) * 2).requires_grad_(True)
    w = torch.randn(V, D, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 11]] = -100
    up = torch.randn(N, generator=g)
    loss, ce, ent = K.token_gem(x, w, y, beta, h)
    (loss * up).sum().backward()
    ok = y != -100
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    z = xd[ok] @ wd.T
    ref = gem_reference(z, y[ok], beta, h)
    (ref * up[ok].double()).sum().backward()
    assert torch.allclose(loss[ok].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(loss[~ok], torch.zeros(2)) and torch.equal(x.grad[~ok], torch.zeros(2, D))
    assert torch.allclose(ce[ok].double(), -z.log_softmax(-1).gather(1, y[ok][:, None])[:, 0], atol=1e-5)
    assert torch.allclose(ent[ok].double(), -(z.softmax(-1) * z.log_softmax(-1)).sum(-1), atol=1e-5)
    assert torch.allclose(x.grad.double(), xd.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(w.grad.double(), wd.grad, atol=1e-5, rtol=1e-4)
    if beta < 1:  # a plausible wrong variant: q = p (plain CE's gradient) is far off
        xc = x.detach().double().requires_grad_(True)
        (torch.nn.functional.cross_entropy(xc[ok] @ wd.detach().T, y[ok], reduction="none") * up[ok].double()).sum().backward()
        assert not torch.allclose(x.grad.double(), xc.grad, atol=1e-3)


@pytest.mark.parametrize("world,impl", [(2, "chunked"), (3, "chunked"), (2, "triton")])
def test_vocab_parallel_equals_full_logits(world, impl):
    """On 2 ranks (16 + 15 rows) and 3 (11 + 11 + 9): token_logprobs (T = 1, 0.7, with and without entropy),
    token_gem (both h) and the embedding lookup (with a padding row) give each rank its tokens' values and
    hidden-state gradients, and the parameter the FSDP-averaged weight gradient, over two accumulated micro-batches
    with different token counts per rank (one with no scored token): tests/_vocab_worker.py against float64
    full-logit formulas over every rank's tokens. A plausible wrong variant (the lookup's gradient not divided by
    the world size) gives an error of 0.7 here. impl: token_logprobs' kernels (triton: in the CPU interpreter)."""
    env = {"OMP_NUM_THREADS": "1", "RL_LOGPROB_IMPL": impl}
    if impl == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = torchrun("_vocab_worker.py", nproc=world, env=env, timeout=300)
    checks = {c["check"]: c["err"] for c in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert set(checks) == {"logprobs T=1.0", "logprobs T=0.7", "logprobs no entropy", "gem linear", "gem logsigmoid",
                           "lookup"}
    assert max(checks.values()) < 1e-4, checks
