"""Fused lm_head -> per-token log-prob and entropy, never materialising the [N, V] logits (at most
CHUNK_CACHE_BYTES of them are kept from the forward for the backward).

With z = hidden @ weight.T / T, p = softmax(z) and lse = logsumexp(z):
    logp_i = z_i[y_i] - lse_i        H_i = -sum_v p_v log p_v = lse_i - sum_v p_v z_v
Both implementations walk the vocabulary in tiles and keep per-row statistics of each tile,
    m = max z,   s = sum e^(z-m),   u = sum e^(z-m) (z-m)
which combine exactly across tiles (see _merge) into lse = m + log s and H = log s - u/s. The backward
recomputes each tile's logits instead of storing them. Gradients w.r.t. the logits:
    d logp/dz = e_y - p
    dH/dz_k   = -sum_v p_v (d_vk - p_k)(log p_v + 1) = -p_k (log p_k + H)
so with upstream grads a = dL/dlogp, b = dL/dH (per row):
    dz = a e_y - p * (a + b (log p + H))
The sparse a e_y term is applied once outside the tile loops (a gather of W[y], an index_add into dW);
the tiles only handle the dense -p * (...) part. Then dhidden = dz @ W / T and dW = dz^T @ hidden / T.

Implementations: "chunked" (pure torch, CPU or GPU: [rows x cols] logit tiles, fp32 math) and "triton"
(CUDA, or the interpreter with TRITON_INTERPRET=1). impl="auto" picks triton for CUDA tensors, chunked
otherwise; the env var RL_LOGPROB_IMPL=chunked|triton overrides "auto". Triton's forward is one kernel (logit
tiles in registers, online statistics); its backward goes through the vocabulary in chunks: a kernel recomputes
the chunk's logits and writes dz [N, chunk] in the inputs' dtype (the sparse a e_y term included), then two cuBLAS
products give dh += dz @ W_c (fp32) and dW_c = dz^T @ h (each chunk of dW written once, never accumulated).

A vocabulary-parallel weight (common/vocab_parallel.py: this rank's rows of a tied embedding) works the same way:
every rank's rows of hidden are gathered, the statistics above are computed over this rank's vocabulary rows and
merged across ranks exactly as across tiles (a rank's (lse_r, H_r) is the tile m = lse_r, s = 1, u = -H_r), and
the backward reduce-scatters dhidden and adds dW into the parameter's .grad in place.

`token_gem` is GEM's loss (gem_sft.py) fused the same way.
"""
import functools
import os

import torch

from common.vocab_parallel import local_rows, shard_of

# chunked tile: 8 MB of fp32 logits, so the elementwise work on it stays in L3 (two reused tile buffers). On
# the 2-core dev box (bench/logprob.py) the run is ~95% matmul time, and 1024..8192 columns time the same.
CHUNK_ROWS, CHUNK_COLS = 2048, 1024
# The backward's only extra cost over the full-logits path is recomputing each tile's logits (a 4th matmul).
# The forward keeps its first tiles, up to this many bytes, so the backward skips their matmul: a bounded
# trade of memory for time (all of a small vocabulary's logits fit, so e.g. the built-in model never
# recomputes). Only when a gradient will be taken; 0 turns it off.
CHUNK_CACHE_BYTES = 128 * 2**20
# Triton: rows x vocab tile per program, the step over the hidden dim (halved for fp32 inputs), warps and pipeline
# stages per program (the interpreter ignores the last two). Sized for Hopper with 16-bit inputs (bench/gpu_check.py
# times the alternatives).
TRITON_BLOCKS = dict(BN=128, BV=128, BD=64, num_warps=8, num_stages=3)
# Triton's backward writes dz for a chunk of the vocabulary at a time: [N, chunk] with chunk = this many elements / N
# (at least N x D elements, Liger Kernel's budget for its logit chunks): fewer, larger cuBLAS products for more memory.
TRITON_DZ_ELEMS = 2**24


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=True, ignore_index=-100, impl="auto"):
    """log softmax(hidden @ weight.T / temperature)[targets] and the entropy of that (tempered) softmax.

    hidden [..., D], weight [V, D], targets [...] (long) -> (logp [...], entropy [...] or None), fp32.
    Differentiable w.r.t. hidden and weight through both outputs. Positions with targets == ignore_index
    give 0 for both and get no gradient (they are skipped, so they cost nothing either)."""
    impl = _impl(impl, hidden)
    # tiles are kept for a backward only if there will be one (not under no_grad: old policy, reference)
    keep = CHUNK_CACHE_BYTES if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) else 0
    logp, ent = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), local_rows(weight), targets.reshape(-1),
                                     float(temperature), with_entropy, ignore_index, impl, keep, shard_of(weight))
    return logp.view(targets.shape), ent.view(targets.shape) if with_entropy else None


def _impl(impl, hidden):
    if impl == "auto":
        impl = os.environ.get("RL_LOGPROB_IMPL", "auto")
        impl = impl if impl != "auto" else "triton" if hidden.is_cuda else "chunked"
    if impl not in ("triton", "chunked"):
        raise ValueError(f"impl must be auto, triton or chunked, got {impl!r}")
    return impl


class _TokenLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, w, y, temperature, with_entropy, ignore_index, impl, cache_bytes, shard):
        n, m = len(y), None
        if shard is not None:  # every rank's tokens, scored against this rank's vocabulary rows
            (h, m), (y, _) = shard.gather(h, 0.0), shard.gather(y, ignore_index)
        idx = (y != ignore_index).nonzero().squeeze(1)  # only the scored rows are computed
        hv, yv, inv_t = _rows(h, idx), _rows(y, idx), 1.0 / temperature
        logp, ent = h.new_zeros(len(y), dtype=torch.float32), h.new_zeros(len(y), dtype=torch.float32)
        lse = entv = None
        if len(idx):
            if impl == "triton":
                stats = _triton_stats(hv, w, inv_t, with_entropy)
            else:
                stats, ctx.tiles = _chunked_stats(hv, w, inv_t, with_entropy, cache_bytes)
            lse, entv = _merge(*stats)
            own, rows = _owned(yv, shard)
            zy = hv.new_zeros(len(idx), dtype=torch.float32)  # target logits (the owner's; the others add 0)
            zy[own] = torch.linalg.vecdot(hv[own].float(), w.index_select(0, rows[own]).float()) * inv_t
            if shard is not None:  # each rank's (lse_r, H_r) is one tile of the whole vocabulary
                shard.all_reduce(zy)
                lse, entv = _merge(shard.all_gather(lse), torch.ones_like(lse),
                                   -shard.all_gather(entv) if with_entropy else None)
            logp[idx] = zy - lse
            if with_entropy:
                ent[idx] = entv
        ctx.save_for_backward(h, w, idx, yv, lse, entv)
        ctx.inv_t, ctx.impl, ctx.shard, ctx.m, ctx.n, ctx.with_entropy = inv_t, impl, shard, m, n, with_entropy
        ctx.set_materialize_grads(False)
        if shard is not None:
            logp, ent = shard.mine(logp, m, n).clone(), shard.mine(ent, m, n).clone()
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, idx, yv, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        shard, none = ctx.shard, [None] * 7
        if not len(idx) or (shard is None and g_logp is None and g_ent is None):  # nothing to back-propagate
            return *_zero_grads(ctx, h, w, need_dh, need_dw), *none
        if shard is not None:
            g_logp = _every_ranks(g_logp, ctx, h)
            g_ent = _every_ranks(g_ent, ctx, h) if ctx.with_entropy else None
        inv_t, hv = ctx.inv_t, _rows(h, idx)
        a = _rows(g_logp, idx).float() if g_logp is not None else lse.new_zeros(len(idx))
        b = _rows(g_ent, idx).float() if g_ent is not None and ent is not None else None
        # dE_r sums every rank's tokens; FSDP averages the other gradients over ranks: a/W, b/W (dh is scaled back)
        scale = 1.0 / shard.world if shard is not None else 1.0
        a, b = a * scale, (b * scale if b is not None else None)
        dw_out = shard.grad_buffer() if shard is not None and need_dw else None
        own, rows = _owned(yv, shard)
        if ctx.impl == "triton":  # dz = a e_y - p (a + b (log p + H)), the sparse term inside the kernel
            dhv, dw = _triton_grads(hv, w, _target_rows(yv, shard), need_dh, need_dw, dw_out, inv_t=inv_t, lse=lse,
                                    a=a, b=b, ent=ent)
        else:  # dense part dz = -p (a + b (log p + H)), then the sparse part a e_y
            dhv, dw = _chunked_grads(hv, w, inv_t, lse, ent, a, b, need_dh, need_dw, ctx.tiles, dw_out)  # empties ctx.tiles
            if need_dh:  # dh += a W[y] / T
                dhv[own] += a[own, None] * w.index_select(0, rows[own]).float() * inv_t
            if need_dw:  # dW[y] += a h / T
                dw.index_add_(0, rows[own], (a[own, None] * hv[own].float() * inv_t).to(dw.dtype))
        dh = _my_dh(ctx, dhv, h, idx, scale) if need_dh else None
        if need_dw:
            dw = dw.to(w.dtype) if shard is None else None  # vocabulary-parallel: already in the parameter's .grad
        return dh, dw, *none


def _zero_grads(ctx, h, w, need_dh, need_dw):
    """(dh, dw) when no row is scored: zeros for this rank's ctx.n rows of hidden; zeros for w, or None for a
    vocabulary-parallel w (its gradient goes into the parameter's .grad, and there is nothing to add)."""
    dh = torch.zeros(ctx.n, h.shape[1], dtype=h.dtype, device=h.device) if need_dh else None
    return dh, torch.zeros_like(w) if need_dw and ctx.shard is None else None


def _every_ranks(g, ctx, h):
    """Vocabulary-parallel backward: every rank's upstream gradient [world * m] (a rank's None is zeros, so every
    rank runs the same collectives)."""
    return ctx.shard.gather(g if g is not None else h.new_zeros(ctx.n), 0.0)[0]


def _my_dh(ctx, dhv, h, idx, scale):
    """fp32 dh of the scored rows idx of h -> dh of this rank's rows of hidden, in h's dtype. Vocabulary-parallel:
    undo the upstream gradients' 1/W (`scale`), and sum over the ranks' vocabulary rows (a reduce-scatter)."""
    dhv = dhv / scale if ctx.shard is not None else dhv
    dh = dhv.to(h.dtype) if len(idx) == len(h) else torch.zeros_like(h).index_copy_(0, idx, dhv.to(h.dtype))
    return dh if ctx.shard is None else ctx.shard.reduce_scatter(dh, ctx.m, ctx.n)


def _owned(y, shard):
    """(index of the targets whose row this rank holds, their row numbers in w): all of them (a slice, no copy)
    without a shard."""
    return (slice(None), y) if shard is None else shard.owned(y)


def _target_rows(y, shard):
    """Each scored row's target as a row number of this rank's w, -1 where another rank holds it (Triton's dz)."""
    if shard is None:
        return y
    own, local = shard.owned(y)
    return torch.where(own, local, -1)


def _rows(x, idx):
    return x if len(idx) == len(x) else x.index_select(0, idx)  # idx is sorted: all rows means x itself


def _merge(m, s, u):
    """Per-tile stats [tiles, N] -> per-row (lse, entropy). Rescale each tile to the global max M:
    s_k e^(m_k-M) and sum e^(z-M)(z-M) = e^(m_k-M) (u_k + (m_k-M) s_k); then lse = M + log S, H = log S - U/S."""
    M = m.amax(0)
    r = torch.exp(m - M)
    S = (r * s).sum(0)
    ent = S.log() - (r * (u + (m - M) * s)).sum(0) / S if u is not None else None
    return M + S.log(), ent


# ----------------------------------------------------------------------------- chunked (pure torch)

def _chunked_stats(h, w, inv_t, with_entropy, cache_bytes=0):
    """(m, s, u) of every [CHUNK_ROWS x CHUNK_COLS] logit tile, vocab tiles outer so a W tile stays in cache;
    and {(v0, r0): (z - m) tile} for the first tiles that fit in cache_bytes."""
    hs, rows, cols = h.float() * inv_t, CHUNK_ROWS, CHUNK_COLS
    N, V = len(h), len(w)
    out = torch.empty(3, -(-V // cols), N, device=h.device)
    zbuf, ebuf = (torch.empty(min(rows, N) * min(cols, V), device=h.device) for _ in "ze")  # reused tiles
    tiles = {}
    for k, v0 in enumerate(range(0, V, cols)):
        wv = w[v0:v0 + cols].float()
        for r0 in range(0, N, rows):
            hr = hs[r0:r0 + rows]
            keep = len(hr) * len(wv) * 4 <= cache_bytes
            z = torch.matmul(hr, wv.T, out=None if keep else _tile(zbuf, len(hr), len(wv)))
            m = z.amax(1, keepdim=True)
            e = torch.exp(z.sub_(m), out=_tile(ebuf, len(hr), len(wv)))  # z now holds z - m
            out[0, k, r0:r0 + rows], out[1, k, r0:r0 + rows] = m.squeeze(1), e.sum(1)
            if with_entropy:
                out[2, k, r0:r0 + rows] = e.mul_(z).sum(1)
            if keep:
                tiles[v0, r0], cache_bytes = (z, m.squeeze(1)), cache_bytes - z.numel() * 4
    return (out[0], out[1], out[2] if with_entropy else None), tiles


def _chunked_grads(h, w, inv_t, lse, ent, a, b, need_dh, need_dw, tiles, dw_out=None):
    """Dense part of dz tile by tile; dh = dz @ W / T into an fp32 buffer, dW = dz^T @ h / T. Rows are the
    inner loop, so each dW tile is complete (and cast to w's dtype) before moving on to the next. A tile the
    forward kept (z - m, m) is used in place of the matmul, with lse and c shifted by m, and popped from
    `tiles` (freed after use; a second backward with retain_graph recomputes). dw_out (fp32, w's shape): add dW
    into it instead of returning a new tensor."""
    hs, rows, cols = h.float() * inv_t, CHUNK_ROWS, CHUNK_COLS
    N, (V, D) = len(h), w.shape
    dh = torch.zeros(N, D, device=h.device) if need_dh else None
    dw = dw_out if dw_out is not None else torch.empty_like(w, memory_format=torch.contiguous_format) if need_dw else None
    zbuf, pbuf = (torch.empty(min(rows, N) * min(cols, V), device=h.device) for _ in "zp")
    accbuf = torch.empty(min(cols, V), D, device=w.device) if need_dw and dw.dtype != torch.float32 else None
    # dz = -p (a + b (log p + H)) = p (c - b z) with c = b lse - a - b H, since log p = z - lse
    c = b * (lse - ent) - a if b is not None else -a
    for v0 in range(0, V, cols):
        wv = w[v0:v0 + cols].float()
        acc = accbuf[:len(wv)] if accbuf is not None else dw[v0:v0 + cols] if need_dw else None  # fp32 dW tile
        for i, r0 in enumerate(range(0, N, rows)):
            r = slice(r0, r0 + rows)
            lse_r, c_r = lse[r], c[r]
            if (v0, r0) in tiles:  # z - m from the forward: log p = (z - m) - (lse - m), c - b z = (c - b m) - b (z - m)
                z, m = tiles.pop((v0, r0))
                lse_r, c_r = lse_r - m, c_r - b[r] * m if b is not None else c_r
            else:
                z = torch.matmul(hs[r], wv.T, out=_tile(zbuf, len(hs[r]), len(wv)))
            dz = torch.sub(z, lse_r[:, None], out=_tile(pbuf, *z.shape)).exp_()  # p
            dz.mul_(torch.addcmul(c_r[:, None], z, b[r, None], value=-1, out=z) if b is not None else c_r[:, None])
            if need_dh:
                dh[r].addmm_(dz, wv)
            if need_dw:
                acc.addmm_(dz.T, hs[r], beta=float(i > 0 or dw_out is not None))  # first row chunk: acc is uninitialised
        if accbuf is not None:
            dw[v0:v0 + cols] = acc
    if need_dh:
        dh *= inv_t
    return dh, dw


def _tile(buf, n, m):
    return buf[:n * m].view(n, m)  # a contiguous [n, m] view of a flat buffer


# ----------------------------------------------------------------------------- GEM

def token_gem(hidden, weight, targets, beta, h="linear", ignore_index=-100, impl="auto"):
    """GEM's per-token loss (gem_sft.py), fused with the lm_head like token_logprobs: no [N, V] logits.

    hidden [N, D], weight [V, D] (plain or vocabulary-parallel), targets [N] -> (loss, ce, entropy), each [N] fp32,
    0 where targets == ignore_index; only loss is differentiable. With z = hidden @ weight.T, p = softmax(z),
    q = softmax(z / beta) and weights w_v (no gradient; linear: 1, logsigmoid: sigmoid((z_v - z_y) / 100)):
        loss = sum_v q_v w_v (log p_v - log p_y) = sum_v q_v w_v (z_v - z_y)        (log-sum-exp cancels)
        dloss/dz = q w - e_y sum_v q_v w_v                                         (q, w held constant)
        ce = lse - z_y,   entropy = H(p)   (token_logprobs' statistics of the same tiles)
    Per row and vocabulary tile the forward keeps m = max z (so max z/beta = m/beta), s, u as token_logprobs,
    and s' = sum e^(z/beta - m/beta), A = sum e^(z/beta - m/beta) w z, B = sum e^(z/beta - m/beta) w; tiles (and
    ranks) merge by rescaling to the common max, and sum_v q w z = A/S', sum_v q w = B/S'. The backward recomputes
    each tile's z for q w. impl: as token_logprobs ("auto": Triton on CUDA, else chunked)."""
    return _TokenGem.apply(hidden, local_rows(weight), targets, float(beta), h == "logsigmoid", ignore_index,
                           shard_of(weight), _impl(impl, hidden))


class _TokenGem(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, w, y, beta, logsigmoid, ignore_index, shard, impl):
        n, m = len(y), None
        if shard is not None:  # every rank's tokens, scored against this rank's vocabulary rows
            (h, m), (y, _) = shard.gather(h, 0.0), shard.gather(y, ignore_index)
        idx = (y != ignore_index).nonzero().squeeze(1)
        hv, yv = _rows(h, idx), _rows(y, idx)
        out = h.new_zeros(3, len(y), dtype=torch.float32)  # loss, ce, entropy
        zy = lse_b = qw = None
        if len(idx):
            own, rows = _owned(yv, shard)
            zy = hv.new_zeros(len(idx), dtype=torch.float32)
            zy[own] = torch.linalg.vecdot(hv[own].float(), w.index_select(0, rows[own]).float())
            if shard is not None:
                shard.all_reduce(zy)
            m_, s, u, sb, A, B = _triton_stats(hv, w, 1.0, True, (beta, logsigmoid, zy)) if impl == "triton" else \
                _gem_stats(hv, w, zy, beta, logsigmoid)
            lse, ent = _merge(m_, s, u)
            lse_b, qwz, qw = _merge_q(m_ / beta, sb, A, B)
            if shard is not None:  # a rank's merged statistics are one tile of the whole vocabulary
                g = shard.all_gather(torch.stack([lse, ent, lse_b, qwz, qw]))
                lse, ent = _merge(g[:, 0], torch.ones_like(g[:, 0]), -g[:, 1])
                lse_b, qwz, qw = _merge_q(g[:, 2], torch.ones_like(g[:, 2]), g[:, 3], g[:, 4])
            out[:, idx] = torch.stack([qwz - qw * zy, lse - zy, ent])
        ctx.save_for_backward(h, w, idx, yv, zy, lse_b, qw)
        ctx.beta, ctx.logsigmoid, ctx.shard, ctx.m, ctx.n, ctx.impl = beta, logsigmoid, shard, m, n, impl
        if shard is not None:
            out = shard.mine(out.T, m, n).T
        loss, ce, ent = (x.clone() for x in out)
        ctx.mark_non_differentiable(ce, ent)
        return loss, ce, ent

    @staticmethod
    def backward(ctx, g, _g_ce, _g_ent):
        h, w, idx, yv, zy, lse_b, qw = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        shard, none = ctx.shard, [None] * 6
        if not len(idx) or (shard is None and g is None):  # nothing to back-propagate
            return *_zero_grads(ctx, h, w, need_dh, need_dw), *none
        if shard is not None:
            g = _every_ranks(g, ctx, h)
        scale = 1.0 / shard.world if shard is not None else 1.0  # as in _TokenLogprobs.backward
        hv, a = _rows(h, idx), _rows(g, idx).float() * scale
        dw_out = shard.grad_buffer() if shard is not None and need_dw else None
        if ctx.impl == "triton":  # dz = a q w - e_y a sum_v q w, the sparse term inside the kernel
            dhv, dw = _triton_grads(hv, w, _target_rows(yv, shard), need_dh, need_dw, dw_out, lse=lse_b, a=a,
                                    gem=(ctx.beta, ctx.logsigmoid, zy, qw))
        else:
            dhv, dw = _gem_grads(hv, w, yv, a, zy, lse_b, qw, ctx.beta, ctx.logsigmoid, shard, need_dh, need_dw, dw_out)
        dh = _my_dh(ctx, dhv, h, idx, scale) if need_dh else None
        if need_dw:
            dw = dw.to(w.dtype) if shard is None else None
        return dh, dw, *none


def _gem_stats(h, w, zy, beta, logsigmoid):
    """Per-tile [tiles, N] statistics of z = h @ w.T for token_gem: m, s, u (as _chunked_stats) and s', A, B."""
    hs, rows, cols = h.float(), CHUNK_ROWS, CHUNK_COLS
    N, V = len(h), len(w)
    out = torch.empty(6, -(-V // cols), N, device=h.device)
    for k, v0 in enumerate(range(0, V, cols)):
        wv = w[v0:v0 + cols].float()
        for r0 in range(0, N, rows):
            r = slice(r0, r0 + rows)
            z = hs[r] @ wv.T
            m = z.amax(1, keepdim=True)
            e = torch.exp(z - m)
            eb = torch.exp((z - m) / beta)
            ebw = eb * torch.sigmoid((z - zy[r, None]) / 100) if logsigmoid else eb
            out[:, k, r] = torch.stack([m[:, 0], e.sum(1), (e * (z - m)).sum(1), eb.sum(1), (ebw * z).sum(1),
                                        ebw.sum(1)])
    return out


def _gem_grads(hv, w, yv, a, zy, lse_b, qw, beta, logsigmoid, shard, need_dh, need_dw, dw_out):
    """token_gem's chunked backward: (fp32 dh of the scored rows, fp32 dW or dw_out with dW added)."""
    hs, (V, D), rows_, cols = hv.float(), w.shape, CHUNK_ROWS, CHUNK_COLS
    dhv = torch.zeros(len(hv), D, device=hv.device) if need_dh else None
    dw = (dw_out if dw_out is not None else torch.zeros(V, D, device=w.device)) if need_dw else None
    for v0 in range(0, V, cols):  # dense part dz = a q w, tile by tile
        wv = w[v0:v0 + cols].float()
        for r0 in range(0, len(hv), rows_):
            r = slice(r0, r0 + rows_)
            z = hs[r] @ wv.T
            dz = torch.exp(z / beta - lse_b[r, None])
            if logsigmoid:
                dz *= torch.sigmoid((z - zy[r, None]) / 100)
            dz *= a[r, None]
            if need_dh:
                dhv[r].addmm_(dz, wv)
            if need_dw:
                dw[v0:v0 + cols].addmm_(dz.T, hs[r])
    own, rows = _owned(yv, shard)
    c = a * qw  # sparse part -e_y sum_v q w
    if need_dh:
        dhv[own] -= c[own, None] * w.index_select(0, rows[own]).float()
    if need_dw:
        dw.index_add_(0, rows[own], -c[own, None] * hs[own])
    return dhv, dw


def _merge_q(mb, sb, A, B):
    """Per-tile [tiles, N] (max z/beta, s', A, B) -> per-row (log-sum-exp of z/beta, sum_v q w z, sum_v q w)."""
    M = mb.amax(0)
    r = torch.exp(mb - M)
    S = (r * sb).sum(0)
    return M + S.log(), (r * A).sum(0) / S, (r * B).sum(0) / S


# ----------------------------------------------------------------------------- triton

@functools.cache
def _triton():
    """Define the kernels on first use: triton is only imported here, so a CPU test can set TRITON_INTERPRET=1
    first. Names are module globals because the interpreter resolves helpers through the module's globals."""
    global triton, tl, _load, _logit_tile, _stats_kernel, _dz_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _load(P, r, ds, n, D):  # block P[r, ds] of a row-major [n, D] matrix, zeros outside
        return tl.load(P + r[:, None] * D + ds[None, :], mask=(r[:, None] < n) & (ds[None, :] < D), other=0.0)

    @triton.jit
    def _logit_tile(H, W, rows, cols, N, V, D, inv_t, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                    PREC: tl.constexpr):
        # z[BN, BV] = H[rows] @ W[cols].T / T, fp32 accumulation over the hidden dim in steps of BD
        acc = tl.zeros([BN, BV], dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            acc = tl.dot(_load(H, rows, ds, N, D), tl.trans(_load(W, cols, ds, V, D)), acc, input_precision=PREC)
        return acc * inv_t

    @triton.jit
    def _stats_kernel(H, W, ZY, OUT, N, V, D, inv_t, inv_beta, tiles_per_split, n_tiles, n_splits,
                      BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                      ENTROPY: tl.constexpr, GEM: tl.constexpr, LOGSIG: tl.constexpr):
        # program (i, j): row block i over the j-th run of vocab tiles -> OUT[k, j, rows] for the online statistics
        # k = 0..2: m, s, u (as _chunked_stats); GEM, k = 3..5: s', A, B (as _gem_stats, relative to m / beta)
        i, j = tl.program_id(0), tl.program_id(1)
        rows = (i * BN + tl.arange(0, BN)).to(tl.int64)
        m = tl.full([BN], -1e30, tl.float32)  # finite "-inf": keeps 0 * (m - m_new) = 0
        s = tl.zeros([BN], dtype=tl.float32)
        u = tl.zeros([BN], dtype=tl.float32)
        sb = tl.zeros([BN], dtype=tl.float32)
        A = tl.zeros([BN], dtype=tl.float32)
        B = tl.zeros([BN], dtype=tl.float32)
        if LOGSIG:
            zy = tl.load(ZY + rows, mask=rows < N, other=0.0)
        for t in range(j * tiles_per_split, tl.minimum((j + 1) * tiles_per_split, n_tiles)):
            cols = (t * BV + tl.arange(0, BV)).to(tl.int64)
            z = _logit_tile(H, W, rows, cols, N, V, D, inv_t, BN, BV, BD, PREC)
            z = tl.where(cols[None, :] < V, z, -1e30)  # padded columns: e = 0, e * (z - m) = 0
            m_new = tl.maximum(m, tl.max(z, 1))
            r = tl.exp(m - m_new)  # rescales the old sums to the new max
            e = tl.exp(z - m_new[:, None])
            if ENTROPY:
                u = r * (u + (m - m_new) * s) + tl.sum(e * (z - m_new[:, None]), 1)
            s = r * s + tl.sum(e, 1)
            if GEM:  # q = softmax(z / beta) with weights w (linear: 1; logsigmoid: sigmoid((z - z_y) / 100))
                rb = tl.exp((m - m_new) * inv_beta)
                eb = tl.exp((z - m_new[:, None]) * inv_beta)
                if LOGSIG:
                    eb_w = eb * tl.sigmoid((z - zy[:, None]) / 100)
                else:
                    eb_w = eb
                sb = rb * sb + tl.sum(eb, 1)
                A = rb * A + tl.sum(eb_w * tl.where(cols[None, :] < V, z, 0.0), 1)
                B = rb * B + tl.sum(eb_w, 1)
            m = m_new
        out = OUT + j * N + rows
        stride = n_splits * N
        tl.store(out, m, mask=rows < N)
        tl.store(out + stride, s, mask=rows < N)
        tl.store(out + 2 * stride, u, mask=rows < N)
        if GEM:
            tl.store(out + 3 * stride, sb, mask=rows < N)
            tl.store(out + 4 * stride, A, mask=rows < N)
            tl.store(out + 5 * stride, B, mask=rows < N)

    @triton.jit
    def _dz_kernel(H, W, Y, LSE, A, B, E, ZY, DZ, N, V, D, inv_t, inv_beta,
                   BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                   HAS_B: tl.constexpr, GEM: tl.constexpr, LOGSIG: tl.constexpr):
        # program (i, j): one [BN, BV] tile of dz (dL/dlogits, times 1/T) over the V columns of W -> DZ [N, V]:
        #   log-prob: dz = (a e_y - p (a + b (log p + H))) / T      (E = H, the entropy; LSE = lse)
        #   GEM:      dz = a q w - e_y a sum_v q w                   (E = sum_v q w; LSE = log-sum-exp of z / beta)
        # Y: each row's target column in W, or -1 (another rank's row, or another chunk's)
        i, j = tl.program_id(0), tl.program_id(1)
        rows = (i * BN + tl.arange(0, BN)).to(tl.int64)
        cols = (j * BV + tl.arange(0, BV)).to(tl.int64)
        rmask = rows < N
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        a = tl.load(A + rows, mask=rmask, other=0.0)
        e = tl.load(E + rows, mask=rmask, other=0.0)
        y = tl.load(Y + rows, mask=rmask, other=-1)
        z = _logit_tile(H, W, rows, cols, N, V, D, inv_t, BN, BV, BD, PREC)
        is_y = cols[None, :] == y[:, None]
        if GEM:
            q = tl.exp(z * inv_beta - lse[:, None])
            if LOGSIG:
                zy = tl.load(ZY + rows, mask=rmask, other=0.0)
                q = q * tl.sigmoid((z - zy[:, None]) / 100)
            dz = a[:, None] * q - tl.where(is_y, (a * e)[:, None], 0.0)
        else:
            logp = z - lse[:, None]
            p = tl.exp(logp)
            if HAS_B:
                b = tl.load(B + rows, mask=rmask, other=0.0)
                dz = -p * (a[:, None] + b[:, None] * (logp + e[:, None]))
            else:
                dz = -p * a[:, None]
            dz = (dz + tl.where(is_y, a[:, None], 0.0)) * inv_t
        mask = rmask[:, None] & (cols[None, :] < V)
        tl.store(DZ + rows[:, None] * V + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)

    return _stats_kernel, _dz_kernel


def _launch(h):
    """Tiles and launch settings for inputs of h's dtype: TRITON_BLOCKS, with half the hidden-dim step for fp32 (its
    tiles take twice the shared memory)."""
    bl = dict(TRITON_BLOCKS)
    if h.dtype == torch.float32:
        bl["BD"] = max(16, bl["BD"] // 2)
    return bl


def _triton_stats(h, w, inv_t, with_entropy, gem=None):
    """Per-split statistics of z = h @ w.T / T: (m, s, u) as _chunked_stats ([splits, N] each; u None without
    entropy), and with gem = (beta, logsigmoid, z_y) also (s', A, B) as _gem_stats."""
    stats_kernel, _ = _triton()
    h, w, (N, D), V = *_compute_pair(h, w), h.shape, len(w)
    bl = _launch(h)
    n_tiles, row_blocks = -(-V // bl["BV"]), -(-N // bl["BN"])
    # split the vocab over enough programs to fill the GPU; the splits' stats are merged like tiles
    want = 4 * torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    per = -(-n_tiles // min(n_tiles, max(1, -(-want // row_blocks))))
    splits = -(-n_tiles // per)
    out = torch.empty(6 if gem else 3, splits, N, device=h.device)
    beta, logsigmoid, zy = gem or (1.0, False, None)
    stats_kernel[(row_blocks, splits)](h, w, zy if logsigmoid else out, out, N, V, D, inv_t, 1.0 / beta, per, n_tiles,
                                       splits, **bl, PREC=_prec(h), ENTROPY=with_entropy or gem is not None,
                                       GEM=gem is not None, LOGSIG=logsigmoid)
    if gem:
        return tuple(out)
    return out[0], out[1], out[2] if with_entropy else None


def _triton_grads(h, w, y, need_dh, need_dw, dw_out=None, *, lse, a, inv_t=1.0, b=None, ent=None, gem=None):
    """(fp32 dh, dW in w's dtype, or dw_out with dW added) through the vocabulary in chunks of TRITON_DZ_ELEMS / N
    columns: _dz_kernel writes dz [N, chunk] in the inputs' dtype, then dh += dz @ W_c and dW_c = dz^T @ h (cuBLAS,
    fp32 accumulation). Logits are recomputed from h and w, never stored. y: target rows in w, -1 = none here.
    gem = (beta, logsigmoid, z_y, sum_v q w): token_gem's dz; else token_logprobs' with (inv_t, lse, a, b, ent)."""
    _, dz_kernel = _triton()
    w_dtype = w.dtype
    h, w, (N, D), V = *_compute_pair(h, w), h.shape, len(w)
    bl = _launch(h)
    cols = min(V, max(bl["BV"], max(TRITON_DZ_ELEMS, N * D) // max(N, 1) // bl["BV"] * bl["BV"]))
    buf = torch.empty(N * cols, dtype=h.dtype, device=h.device)
    dh = torch.zeros(N, D, device=h.device) if need_dh else None
    write = dw_out is None and w_dtype == w.dtype  # each chunk of dW written once, in w's dtype; else added in fp32
    dw = dw_out if dw_out is not None else torch.empty(w.shape, dtype=w_dtype, device=w.device) if write else \
        torch.zeros(w.shape, dtype=w_dtype, device=w.device) if need_dw else None
    beta, logsigmoid, zy, qw = gem or (1.0, False, None, None)
    e = qw if gem else ent if b is not None else a  # a placeholder where unused
    for v0 in range(0, V, cols):
        wc = w[v0:v0 + cols]
        dz = buf[:N * len(wc)].view(N, len(wc))
        dz_kernel[(-(-N // bl["BN"]), -(-len(wc) // bl["BV"]))](
            h, wc, y - v0 if v0 else y, lse, a, b if b is not None else a, e, zy if logsigmoid else a, dz, N, len(wc), D,
            inv_t, 1.0 / beta, **bl, PREC=_prec(h), HAS_B=b is not None, GEM=gem is not None, LOGSIG=logsigmoid)
        if need_dh:
            _addmm32(dh, dz, wc)
        if need_dw:
            if write:
                torch.mm(dz.T, h, out=dw[v0:v0 + len(wc)])
            else:
                _addmm32(dw[v0:v0 + len(wc)], dz.T, h)
    return dh, dw


def _compute_pair(h, w):
    """(h, w) in the dtype the tiles are computed in, contiguous. Both in w's dtype, except fp32 rows with 16-bit
    hidden states (a vocabulary-parallel head under bf16 mixed precision: FSDP casts only the parameters it manages):
    both 16-bit, as the layers compute. On an H200 the fp32 tiles took 11-17x the bf16 ones (bench/gpu_check.py)."""
    dt = h.dtype if w.dtype == torch.float32 and h.dtype in (torch.bfloat16, torch.float16) else w.dtype
    return h.to(dt).contiguous(), w.to(dt).contiguous()


def _addmm32(out, x, y):
    """out (fp32) += x @ y with fp32 accumulation; 16-bit x, y on CUDA stay 16-bit (cuBLAS out_dtype, torch >= 2.8)."""
    if out.is_cuda and x.dtype != torch.float32:
        torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
    else:
        out.addmm_(x.float(), y.float())


def _prec(h):
    """fp32 tl.dot precision as torch would do the matmul: full fp32 unless torch allows tf32 (for bf16/fp16
    inputs this is just triton's default)."""
    return "ieee" if h.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
