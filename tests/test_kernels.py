"""common.kernels.token_logprobs (chunked torch and Triton) vs a float64 log_softmax of the full logits.

On CPU the Triton kernels run under the interpreter, which needs TRITON_INTERPRET=1 before triton builds
them; another test module in the same pytest process (vLLM) may have imported triton already, and the
variable would also change how their kernels run. So on CPU the Triton cases run once, together, in a
fresh subprocess (this file run as a script) and the tests check the errors it reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import kernels as K  # noqa: E402

TOL = 1e-4
# (N, D, V, temperature): N not a multiple of any block, V odd / not a multiple of the tile
CASES = {"V1000-T0.7": (37, 16, 1000, 0.7), "V1001-T1": (37, 16, 1001, 1.0), "V50257-T0.7": (37, 16, 50257, 0.7)}
# small tiles so every case has several row blocks / vocab tiles / vocab splits (the interpreter is slow:
# the big vocabulary gets wide tiles)
CHUNKS = {"V1000-T0.7": (16, 128), "V1001-T1": (16, 128), "V50257-T0.7": (16, 1024)}
BLOCKS = {"V1000-T0.7": (16, 128), "V1001-T1": (16, 128), "V50257-T0.7": (64, 1024)}


def naive(h, w, y, temperature, ignore_index=-100):
    """Reference: full logits in float64."""
    lp = ((h.double() @ w.double().T) / temperature).log_softmax(-1)
    valid = y != ignore_index
    logp = lp.gather(1, y.clamp(min=0)[:, None])[:, 0] * valid
    return logp, -(lp.exp() * lp).sum(-1) * valid


def errors(impl, N, D, V, temperature, dtype=torch.float32, device="cpu", frozen=None):
    """max |x - ref| / (1 + |ref|) of logp, entropy, d hidden and d weight under a loss that uses both outputs.
    frozen="h" or "w": that input doesn't require grad (its error is reported as 0)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(frozen != "h")
    w = (torch.randn(V, D, generator=g) * 0.5).to(device, dtype).requires_grad_(frozen != "w")
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[::4] = -100  # ignored positions
    a, b = torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)
    out = []
    for fn in (lambda *x: K.token_logprobs(*x, impl=impl), naive):
        logp, ent = fn(h, w, y, temperature)
        ((logp * a).sum() + (ent * b).sum()).backward()
        out.append([logp, ent, h.grad, w.grad])
        h.grad = w.grad = None
    if frozen:  # no grad computed for it, in either
        assert out[0][2 + (frozen == "w")] is None
        out = [[torch.zeros(1) if x is None else x for x in o] for o in out]
    (logp, ent, dh, dw), ref = out
    assert logp.dtype == ent.dtype == torch.float32 and (frozen or dh.dtype == dw.dtype == dtype)
    assert (logp[::4] == 0).all() and (ent[::4] == 0).all() and (frozen == "h" or (dh[::4] == 0).all())
    names = ("logp", "ent", "dh", "dw")
    return {k: ((x.double() - r).abs() / (1 + r.abs())).max().item() for k, x, r in zip(names, out[0], ref)}


# ----------------------------------------------------------------------------- chunked (pure torch)

@pytest.mark.parametrize("cache", ["none", "some", "all"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_reference(case, cache, monkeypatch):
    """Every tile recomputed in the backward, the first 3 kept from the forward, or all kept."""
    monkeypatch.setattr(K, "CHUNK_ROWS", CHUNKS[case][0])
    monkeypatch.setattr(K, "CHUNK_COLS", CHUNKS[case][1])
    monkeypatch.setattr(K, "CHUNK_CACHE_BYTES", {"none": 0, "some": 3 * CHUNKS[case][0] * CHUNKS[case][1] * 4,
                                                 "all": 2**40}[cache])
    err = errors("chunked", *CASES[case])
    assert max(err.values()) < TOL, err


def test_chunked_cache_skips_the_recompute_matmuls(monkeypatch):
    """The kept tiles replace exactly their matmuls in the backward, and nothing is kept without grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.startswith(("mm", "addmm"))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(K, "CHUNK_ROWS", 16)
    monkeypatch.setattr(K, "CHUNK_COLS", 64)
    h, w, y = torch.randn(48, 8, requires_grad=True), torch.randn(300, 8, requires_grad=True), torch.randint(0, 300, (48,))
    counts = {}
    for kept in (0, 4, 15):  # 3 row blocks x 5 vocab tiles
        monkeypatch.setattr(K, "CHUNK_CACHE_BYTES", kept * 16 * 64 * 4)
        with CountMM() as c:
            c.n = 0
            logp, ent = K.token_logprobs(h, w, y)
            (logp.sum() + ent.sum()).backward()
        counts[kept] = c.n
    assert counts[0] - counts[4] == 4 and counts[0] - counts[15] == 15, counts
    budgets, stats = [], K._chunked_stats
    monkeypatch.setattr(K, "_chunked_stats", lambda *a: budgets.append(a[-1]) or stats(*a))
    K.token_logprobs(h, w, y)
    with torch.no_grad():  # an old-policy / reference pass keeps nothing
        K.token_logprobs(h, w, y)
    K.token_logprobs(h.detach(), w.detach(), y)
    assert budgets == [K.CHUNK_CACHE_BYTES, 0, 0] and budgets[0] > 0


@pytest.mark.parametrize("frozen", ["h", "w"])
def test_chunked_frozen_input(frozen):
    err = errors("chunked", 37, 16, 1001, 0.7, frozen=frozen)
    assert max(err.values()) < TOL, err


def test_chunked_bf16_inputs():
    err = errors("chunked", 37, 16, 1001, 0.7, dtype=torch.bfloat16)
    assert err["logp"] < TOL and err["ent"] < TOL, err  # fp32 math inside: only the outputs' rounding differs
    assert err["dh"] < 1e-2 and err["dw"] < 1e-2, err  # grads come back in bf16


def test_chunked_never_materialises_logits(monkeypatch):
    """Record every tensor that aten produces during forward + backward: none is as big as [N, V]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Biggest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Biggest.numel = max(Biggest.numel, t.numel())
            return out

    N, D, V = 300, 16, 1000
    h, w, y = torch.randn(N, D, requires_grad=True), torch.randn(V, D, requires_grad=True), torch.randint(0, V, (N,))
    ref = K.token_logprobs(h, w, y)  # default chunks: one tile covers everything here
    monkeypatch.setattr(K, "CHUNK_ROWS", 64)
    monkeypatch.setattr(K, "CHUNK_COLS", 128)
    with Biggest():
        logp, ent = K.token_logprobs(h, w, y)
        (logp.sum() + ent.sum()).backward()
    assert Biggest.numel <= V * D < N * V  # the largest tensor is the weight gradient itself
    torch.testing.assert_close((logp, ent), ref, atol=1e-5, rtol=1e-5)


def test_no_entropy_leading_dims_and_impl_override(monkeypatch):
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 5))
    logp, ent = K.token_logprobs(h, w, y, temperature=0.5, with_entropy=False)
    assert ent is None and logp.shape == (2, 5)
    logp.sum().backward()
    ref = naive(h.detach().reshape(10, 8), w.detach(), y.reshape(10), 0.5)[0]
    torch.testing.assert_close(logp.reshape(10).double(), ref, atol=1e-5, rtol=1e-5)
    assert h.grad.shape == h.shape and w.grad is not None
    y[:] = -100  # nothing scored: zeros and zero grads
    logp, ent = K.token_logprobs(h, w, y)
    (logp.sum() + ent.sum()).backward()
    assert not logp.any() and not ent.any()
    monkeypatch.setenv("RL_LOGPROB_IMPL", "nope")  # the env var overrides "auto"
    with pytest.raises(ValueError):
        K.token_logprobs(h, w, y)


# ----------------------------------------------------------------------------- triton

def gem_errors(impl, N, D, V, beta, h, dtype=torch.float32, device="cpu"):
    """token_gem's loss, CE, entropy and both gradients against GEM's formula on full float64 logits (written here:
    sum_v q_v w_v (log p_v - log p_y), q = softmax(z / beta) and w constant), as errors() does for log-probs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[::5] = -100
    up = torch.randn(N, generator=g).to(device)
    loss, ce, ent = K.token_gem(x, w, y, beta, h, impl=impl)
    (loss * up).sum().backward()
    ok = y != -100
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = xd[ok] @ wd.T
    logp, zy = z.log_softmax(-1), z.gather(1, y[ok][:, None])
    q = (z / beta).softmax(-1).detach()
    wt = torch.sigmoid((z - zy) / 100).detach() if h == "logsigmoid" else 1.0
    ref = (q * wt * (logp - logp.gather(1, y[ok][:, None]))).sum(-1)
    (ref * up[ok].double()).sum().backward()
    refs = (ref, -logp.gather(1, y[ok][:, None])[:, 0], -(logp.exp() * logp).sum(-1), xd.grad[ok], wd.grad)
    assert (loss[~ok] == 0).all() and (x.grad[~ok] == 0).all()
    names = ("loss", "ce", "ent", "dh", "dw")
    return {k: ((a.double() - r).abs() / (1 + r.abs())).max().item()
            for k, a, r in zip(names, (loss[ok], ce[ok], ent[ok], x.grad[ok], w.grad), refs)}


GEM_CASES = {"gem-linear-b0.7": (29, 16, 1001, 0.7, "linear"), "gem-logsigmoid-b0.5": (29, 16, 1001, 0.5, "logsigmoid")}


def _triton_errors(case):
    """Small tiles, and a dz buffer of one tile's width: several row blocks, vocabulary tiles, splits and dz chunks."""
    name, frozen = case.split("/") if "/" in case else (case, None)
    saved, dz = dict(K.TRITON_BLOCKS), K.TRITON_DZ_ELEMS
    rows, cols = BLOCKS.get(name, (16, 128))
    K.TRITON_BLOCKS.update(BN=rows, BV=cols, BD=16)
    K.TRITON_DZ_ELEMS = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if name in GEM_CASES:
            return gem_errors("triton", *GEM_CASES[name], device=device)
        return errors("triton", *CASES[name], device=device, frozen=frozen)
    finally:
        K.TRITON_BLOCKS.update(saved)
        K.TRITON_DZ_ELEMS = dz


TRITON_CASES = list(CASES) + ["V1001-T1/h", "V1001-T1/w"] + list(GEM_CASES)  # + each input frozen in turn, GEM


@pytest.fixture(scope="module")
def triton_errors():
    """{case: errors}: in-process on CUDA, else one interpreter subprocess for all cases."""
    if torch.cuda.is_available():
        return {case: _triton_errors(case) for case in TRITON_CASES}
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, triton_errors):
    err = triton_errors[case]
    assert max(err.values()) < TOL, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_gpu_bf16_vs_fp32_reference(impl):
    err = errors(impl, 300, 256, 50257, 0.7, dtype=torch.bfloat16, device="cuda")
    assert err["logp"] < 1e-3 and err["ent"] < 1e-3, err  # bf16 inputs, fp32 accumulation
    assert err["dh"] < 2e-2 and err["dw"] < 2e-2, err  # dz goes through bf16 into the grad matmuls


@pytest.mark.parametrize("case", GEM_CASES)
def test_gem_chunked_matches_reference(case, monkeypatch):
    monkeypatch.setattr(K, "CHUNK_ROWS", 8)
    monkeypatch.setattr(K, "CHUNK_COLS", 128)
    err = gem_errors("chunked", *GEM_CASES[case])
    assert max(err.values()) < TOL, err


def test_gem_reference_rejects_cross_entropy():
    """The GEM formula above is not cross-entropy's for beta < 1: the same check on CE's per-token loss fails."""
    orig = K.token_gem
    try:
        K.token_gem = lambda x, w, y, beta, h, impl: (-K.token_logprobs(x, w, y, impl="chunked")[0],) * 3
        err = gem_errors("chunked", *GEM_CASES["gem-linear-b0.7"])
    finally:
        K.token_gem = orig
    assert err["dh"] > 1e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_gpu_gem_bf16(h):
    """Triton's GEM on bf16 inputs (fp32 statistics, dz through bf16) against the float64 formula."""
    err = gem_errors("triton", 300, 256, 50257, 0.7, h, dtype=torch.bfloat16, device="cuda")
    assert err["loss"] < 1e-3 and err["ce"] < 1e-3 and err["ent"] < 1e-3, err
    assert err["dh"] < 2e-2 and err["dw"] < 2e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_hidden_fp32_weight():
    """A vocabulary-parallel head under bf16 mixed precision: bf16 hidden states, fp32 rows. Triton computes the tiles
    in bf16 (kernels._compute_pair) and returns dW in fp32 (the Triton interpreter mishandles bf16: GPU only)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 256, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    w = (torch.randn(50257, 256, generator=g) * 0.5).cuda().requires_grad_()
    y = torch.randint(0, 50257, (300,), generator=g).cuda()
    a, b = torch.randn(300, generator=g).cuda(), torch.randn(300, generator=g).cuda()
    got = []
    for fn in (lambda: K.token_logprobs(h, w, y, 0.7, impl="triton"),
               lambda: naive(h.detach().double().requires_grad_(), w.detach().bfloat16().double(), y, 0.7)):
        logp, ent = fn()
        ((logp * a).sum() + (ent * b).sum()).backward()
        got.append((logp.detach(), ent.detach()))
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    for x, r in zip(got[0], got[1]):
        assert ((x.double() - r).abs() / (1 + r.abs())).max() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_fp32_matches_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # tl.dot in full fp32 then
    err = errors("auto", 300, 256, 50257, 0.7, device="cuda")
    assert max(err.values()) < TOL, err


if __name__ == "__main__":  # the interpreter subprocess of triton_errors()
    print(json.dumps({case: _triton_errors(case) for case in TRITON_CASES}))
