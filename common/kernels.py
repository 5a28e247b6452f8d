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
otherwise; the env var RL_LOGPROB_IMPL=chunked|triton overrides "auto".

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
TRITON_BLOCKS = dict(BN=64, BV=128, BD=64)  # rows x vocab tile, and the step over the hidden dim


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=True, ignore_index=-100, impl="auto"):
    """log softmax(hidden @ weight.T / temperature)[targets] and the entropy of that (tempered) softmax.

    hidden [..., D], weight [V, D], targets [...] (long) -> (logp [...], entropy [...] or None), fp32.
    Differentiable w.r.t. hidden and weight through both outputs. Positions with targets == ignore_index
    give 0 for both and get no gradient (they are skipped, so they cost nothing either)."""
    if impl == "auto":
        impl = os.environ.get("RL_LOGPROB_IMPL", "auto")
        impl = impl if impl != "auto" else "triton" if hidden.is_cuda else "chunked"
    if impl not in ("triton", "chunked"):
        raise ValueError(f"impl must be auto, triton or chunked, got {impl!r}")
    # tiles are kept for a backward only if there will be one (not under no_grad: old policy, reference)
    keep = CHUNK_CACHE_BYTES if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) else 0
    logp, ent = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), local_rows(weight), targets.reshape(-1),
                                     float(temperature), with_entropy, ignore_index, impl, keep, shard_of(weight))
    return logp.view(targets.shape), ent.view(targets.shape) if with_entropy else None


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
        # dense part: dz = -p (a + b (log p + H))
        if ctx.impl == "triton":
            dhv, dw = _triton_grads(hv, w, inv_t, lse, ent, a, b, need_dh, need_dw, dw_out)
        else:
            dhv, dw = _chunked_grads(hv, w, inv_t, lse, ent, a, b, need_dh, need_dw, ctx.tiles, dw_out)  # empties ctx.tiles
        own, rows = _owned(yv, shard)
        dh = None
        if need_dh:  # + sparse part a e_y:  dh += a W[y] / T
            dhv[own] += a[own, None] * w.index_select(0, rows[own]).float() * inv_t
            dh = _my_dh(ctx, dhv, h, idx, scale)
        if need_dw:  # dW[y] += a h / T
            dw.index_add_(0, rows[own], (a[own, None] * hv[own].float() * inv_t).to(dw.dtype))
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

def token_gem(hidden, weight, targets, beta, h="linear", ignore_index=-100):
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
    each tile's z for q w."""
    return _TokenGem.apply(hidden, local_rows(weight), targets, float(beta), h == "logsigmoid", ignore_index,
                           shard_of(weight))


class _TokenGem(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, w, y, beta, logsigmoid, ignore_index, shard):
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
            m_, s, u, sb, A, B = _gem_stats(hv, w, zy, beta, logsigmoid)
            lse, ent = _merge(m_, s, u)
            lse_b, qwz, qw = _merge_q(m_ / beta, sb, A, B)
            if shard is not None:  # a rank's merged statistics are one tile of the whole vocabulary
                g = shard.all_gather(torch.stack([lse, ent, lse_b, qwz, qw]))
                lse, ent = _merge(g[:, 0], torch.ones_like(g[:, 0]), -g[:, 1])
                lse_b, qwz, qw = _merge_q(g[:, 2], torch.ones_like(g[:, 2]), g[:, 3], g[:, 4])
            out[:, idx] = torch.stack([qwz - qw * zy, lse - zy, ent])
        ctx.save_for_backward(h, w, idx, yv, zy, lse_b, qw)
        ctx.beta, ctx.logsigmoid, ctx.shard, ctx.m, ctx.n = beta, logsigmoid, shard, m, n
        if shard is not None:
            out = shard.mine(out.T, m, n).T
        loss, ce, ent = (x.clone() for x in out)
        ctx.mark_non_differentiable(ce, ent)
        return loss, ce, ent

    @staticmethod
    def backward(ctx, g, _g_ce, _g_ent):
        h, w, idx, yv, zy, lse_b, qw = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        shard, none = ctx.shard, [None] * 5
        if not len(idx) or (shard is None and g is None):  # nothing to back-propagate
            return *_zero_grads(ctx, h, w, need_dh, need_dw), *none
        if shard is not None:
            g = _every_ranks(g, ctx, h)
        scale = 1.0 / shard.world if shard is not None else 1.0  # as in _TokenLogprobs.backward
        hv, a = _rows(h, idx), _rows(g, idx).float() * scale
        hs, (V, D), rows_, cols = hv.float(), w.shape, CHUNK_ROWS, CHUNK_COLS
        dhv = torch.zeros(len(idx), D, device=h.device) if need_dh else None
        dw = (shard.grad_buffer() if shard is not None else torch.zeros(V, D, device=w.device)) if need_dw else None
        for v0 in range(0, V, cols):  # dense part dz = a q w, tile by tile
            wv = w[v0:v0 + cols].float()
            for r0 in range(0, len(idx), rows_):
                r = slice(r0, r0 + rows_)
                z = hs[r] @ wv.T
                dz = torch.exp(z / ctx.beta - lse_b[r, None])
                if ctx.logsigmoid:
                    dz *= torch.sigmoid((z - zy[r, None]) / 100)
                dz *= a[r, None]
                if need_dh:
                    dhv[r].addmm_(dz, wv)
                if need_dw:
                    dw[v0:v0 + cols].addmm_(dz.T, hs[r])
        own, rows = _owned(yv, shard)
        c = a * qw  # sparse part -e_y sum_v q w
        dh = None
        if need_dh:
            dhv[own] -= c[own, None] * w.index_select(0, rows[own]).float()
            dh = _my_dh(ctx, dhv, h, idx, scale)
        if need_dw:
            dw.index_add_(0, rows[own], -c[own, None] * hs[own])
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
    global triton, tl, _load, _atomic_add, _logit_tile, _fwd_kernel, _bwd_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _load(P, r, ds, n, D):  # block P[r, ds] of a row-major [n, D] matrix, zeros outside
        return tl.load(P + r[:, None] * D + ds[None, :], mask=(r[:, None] < n) & (ds[None, :] < D), other=0.0)

    @triton.jit
    def _atomic_add(P, r, ds, n, D, x):  # P[r, ds] += x
        tl.atomic_add(P + r[:, None] * D + ds[None, :], x, mask=(r[:, None] < n) & (ds[None, :] < D))

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
    def _fwd_kernel(H, W, M, S, U, N, V, D, inv_t, tiles_per_split, n_tiles,
                    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
        # program (i, j): row block i over the j-th run of vocab tiles -> online (m, s, u) into M/S/U[j, rows]
        i, j = tl.program_id(0), tl.program_id(1)
        rows = (i * BN + tl.arange(0, BN)).to(tl.int64)
        m = tl.full([BN], -1e30, tl.float32)  # finite "-inf": keeps 0 * (m - m_new) = 0
        s = tl.zeros([BN], dtype=tl.float32)
        u = tl.zeros([BN], dtype=tl.float32)
        for t in range(j * tiles_per_split, tl.minimum((j + 1) * tiles_per_split, n_tiles)):
            cols = (t * BV + tl.arange(0, BV)).to(tl.int64)
            z = _logit_tile(H, W, rows, cols, N, V, D, inv_t, BN, BV, BD, PREC)
            z = tl.where(cols[None, :] < V, z, -1e30)  # padded columns: e = 0, e * (z - m) = 0
            m_new = tl.maximum(m, tl.max(z, 1))
            r = tl.exp(m - m_new)  # rescales the old sums to the new max
            e = tl.exp(z - m_new[:, None])
            u = r * (u + (m - m_new) * s) + tl.sum(e * (z - m_new[:, None]), 1)
            s = r * s + tl.sum(e, 1)
            m = m_new
        tl.store(M + j * N + rows, m, mask=rows < N)
        tl.store(S + j * N + rows, s, mask=rows < N)
        tl.store(U + j * N + rows, u, mask=rows < N)

    @triton.jit
    def _bwd_kernel(H, W, LSE, ENT, A, B, DH, DW, N, V, D, inv_t, BN: tl.constexpr, BV: tl.constexpr,
                    BD: tl.constexpr, PREC: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr):
        # program (i, j): one [BN, BV] tile of dz = -p (a + b (log p + H)) / T, then for each BD slice of the
        # hidden dim: DH[rows] += dz @ W[cols], DW[cols] += dz^T @ H[rows] (fp32 atomics: tiles share rows/cols)
        i, j = tl.program_id(0), tl.program_id(1)
        rows = (i * BN + tl.arange(0, BN)).to(tl.int64)
        cols = (j * BV + tl.arange(0, BV)).to(tl.int64)
        lse = tl.load(LSE + rows, mask=rows < N, other=0.0)
        a = tl.load(A + rows, mask=rows < N, other=0.0)  # 0 on padded rows -> dz = 0 there
        b = tl.load(B + rows, mask=rows < N, other=0.0)
        ent = tl.load(ENT + rows, mask=rows < N, other=0.0)
        logp = _logit_tile(H, W, rows, cols, N, V, D, inv_t, BN, BV, BD, PREC) - lse[:, None]
        p = tl.where(cols[None, :] < V, tl.exp(logp), 0.0)
        dz = (-p * (a[:, None] + b[:, None] * (logp + ent[:, None])) * inv_t).to(H.dtype.element_ty)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            if NEED_DH:
                _atomic_add(DH, rows, ds, N, D, tl.dot(dz, _load(W, cols, ds, V, D), input_precision=PREC))
            if NEED_DW:
                _atomic_add(DW, cols, ds, V, D, tl.dot(tl.trans(dz), _load(H, rows, ds, N, D), input_precision=PREC))

    return _fwd_kernel, _bwd_kernel


def _triton_stats(h, w, inv_t, with_entropy):
    fwd, _ = _triton()
    h, w, (N, D), V, bl = h.to(w.dtype).contiguous(), w.contiguous(), h.shape, len(w), TRITON_BLOCKS
    n_tiles, row_blocks = -(-V // bl["BV"]), -(-N // bl["BN"])
    # split the vocab over enough programs to fill the GPU; the splits' stats are merged like tiles
    want = 4 * torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    per = -(-n_tiles // min(n_tiles, max(1, -(-want // row_blocks))))
    splits = -(-n_tiles // per)
    m, s, u = torch.empty(3, splits, N, device=h.device)
    fwd[(row_blocks, splits)](h, w, m, s, u, N, V, D, inv_t, per, n_tiles, **bl, PREC=_prec(h))
    return m, s, u if with_entropy else None


def _triton_grads(h, w, inv_t, lse, ent, a, b, need_dh, need_dw, dw_out=None):
    _, bwd = _triton()
    h, w, (N, D), V, bl = h.to(w.dtype).contiguous(), w.contiguous(), h.shape, len(w), TRITON_BLOCKS
    dh = torch.zeros(N, D, device=h.device) if need_dh else None
    dw = dw_out if dw_out is not None else torch.zeros(V, D, device=w.device) if need_dw else None  # fp32 atomics
    b, ent = (b, ent) if b is not None else (torch.zeros_like(a), torch.zeros_like(a))
    grid = (-(-N // bl["BN"]), -(-V // bl["BV"]))  # row blocks vary fastest: concurrent programs share a W tile
    bwd[grid](h, w, lse, ent, a, b, dh if need_dh else a, dw if need_dw else a, N, V, D, inv_t, **bl,
              PREC=_prec(h), NEED_DH=need_dh, NEED_DW=need_dw)
    return dh, dw


def _prec(h):
    """fp32 tl.dot precision as torch would do the matmul: full fp32 unless torch allows tf32 (for bf16/fp16
    inputs this is just triton's default)."""
    return "ieee" if h.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
