"""Guided, error-compensating codebook fits (the per-row lookup-table format, a better objective).

The Fisher-weighted k-means of :mod:`sqc.quant.kmeans` scores every weight on
its own. The guided fit scores a layer by the error of its *output*, weighted
by how much the end loss cares about that output (GuidedQuant, one group of
output channels): with ``X`` the layer's calibration inputs and ``g`` the
gradient of the loss at the layer's outputs,

    H = sum_t  s_t * x_t x_t^T,     s_t = mean_j g_{t j}^2          (in x in)

and every output row ``r`` is fitted to minimise the layer objective

    J_r(c, q) = e_r^T H e_r,        e_{r k} = a_{r k} * (w_{r k} - c_r[q_{r k}])

where ``a`` is 0 at the sparse positions (kept exactly, so they never carry
error) and 1 elsewhere. Before anything else ``H`` is shrunk toward its
diagonal, ``(1 - shrink) H + shrink diag(H)``: the off-diagonal terms are
what 32 windows of one kind of text estimate worst, and a fit that trusts
them fully trades away error that other text needs (SmolLM2 at w3-s0.45,
shrink 0.5 against none: 17.80 against 17.93 on the tutorial text, 22.95
against 23.52 on the held-out Debian Reference). Then it is damped by
``damp * mean(diag H)`` on its diagonal, so dead inputs and few tokens give a
positive definite matrix; that matrix (:func:`objective_matrix`) *is* the
objective everywhere below.

The fit keeps the format (2**bits entries per row, any code per weight) and
improves the k-means start in stages, each of which can only lower ``J``:

1. **Assignment with error feedback** (GPTQ-style): columns are taken in
   order of decreasing ``H_kk``; each weight is rounded to the nearest entry
   of its row's table and the rounding error is pushed onto the columns not
   yet rounded through the Cholesky factor of ``H^-1``. A row keeps the new
   codes only where they score lower than its current ones.
2. **Least-squares tables**: for fixed codes the best table of row ``r`` solves
   ``(P^T H P) c = P^T H w`` (``P`` the active one-hot assignment), an exact
   minimiser; rounding to the table dtype could raise ``J``, so a row keeps
   its new table only where it scores lower.
3. **Coordinate descent over columns**: each weight in turn takes the table
   entry that lowers ``J`` the most given all the others (the current entry
   is a candidate, so a step never raises ``J``).

Stages 2-3 repeat ``iters`` times. Everything is deterministic (no random
start; ties go to the lower code index).

Rows are processed in blocks of columns (``block``), with the update of the
columns outside a block done as one matrix product, as GPTQ does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .kmeans import _jax

__all__ = ["GuidedFit", "accumulate_guided_hessian", "damped", "shrunk", "objective_matrix", "row_objectives",
           "layer_objective", "guided_fit"]


def accumulate_guided_hessian(h: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """``h += X^T diag(mean_j g_j^2) X`` in place, for one batch of tokens.

    ``x`` is ``[..., in]`` (the layer's input), ``grad_out`` ``[..., out]`` (the
    loss gradient at its output); leading dims are tokens. The product is one
    plain fp32 GEMM. (A bf16-arithmetic GEMM through oneDNN's precision flag is
    faster, but on a CPU with AMX/AVX512-BF16 it really rounds: 1e-3 relative
    error in H; and the flag is process-global, so toggling it from the layer
    threads leaked it into every later fp32 matmul.)
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    g2 = grad_out.detach().reshape(-1, grad_out.shape[-1]).float()
    xs = x2 * g2.pow(2).mean(dim=1).sqrt_().unsqueeze(1)
    h.addmm_(xs.T, xs)


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64; the identity when ``H`` is all zero (no signal)."""
    h = h.to(torch.float64)
    d = torch.diagonal(h)
    if not torch.isfinite(h).all():
        raise ValueError("the guided Hessian has NaN/Inf entries: the calibration gradients overflowed")
    mean = float(d.mean()) if d.numel() else 0.0
    if mean <= 0.0:
        return torch.eye(h.shape[0], dtype=torch.float64)
    out = h.clone()
    torch.diagonal(out).add_(damp * mean)
    # a dead input (zero row and column) still gets the damping term: positive definite
    return out


def shrunk(h: torch.Tensor, shrink: float) -> torch.Tensor:
    """``(1 - shrink) H + shrink diag(H)`` (a new tensor; ``H`` itself when ``shrink`` is 0)."""
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must lie in [0, 1] (0 keeps H, 1 keeps only its diagonal), got {shrink!r}")
    if shrink == 0.0:
        return h
    out = h * (1.0 - shrink)
    torch.diagonal(out).add_(torch.diagonal(h), alpha=shrink)
    return out


def objective_matrix(h: torch.Tensor, damp: float, shrink: float = 0.0) -> torch.Tensor:
    """The matrix of the guided objective (float64): ``H`` shrunk toward its diagonal, then damped."""
    return damped(shrunk(h, shrink), damp)


def row_objectives(e: torch.Tensor, h: torch.Tensor, damp: float, shrink: float = 0.0) -> torch.Tensor:
    """Per-row ``e^T M e`` (float64 ``[R]``) for ``M = objective_matrix(h, damp, shrink)``, from the
    undamped ``h`` without forming ``M``: ``(1 - shrink) e^T H e + (shrink diag(H) + damp mean(diag H)) . e^2``."""
    e = e.float()
    h = h.float()
    d = torch.diagonal(h)
    mean = float(d.mean()) if d.numel() else 0.0
    if mean <= 0.0:  # no signal: damped() makes the objective the identity
        return (e * e).sum(dim=1, dtype=torch.float64)
    quad = ((e @ h) * e).sum(dim=1, dtype=torch.float64)
    diag = (e * e * (shrink * d + damp * mean)).sum(dim=1, dtype=torch.float64)
    return (1.0 - shrink) * quad + diag


def layer_objective(w: torch.Tensor, lut: torch.Tensor, codes: torch.Tensor, active: torch.Tensor,
                    h: torch.Tensor) -> torch.Tensor:
    """Per-row ``e^T H e`` (float64 ``[R]``) of a table and codes; sparse positions carry no error."""
    e = _error(w.to(torch.float64), lut.to(torch.float64), codes, active)
    return ((e @ h.to(torch.float64)) * e).sum(dim=1)


def _error(w, lut, codes, active):
    return (w - torch.gather(lut, 1, codes.long())) * active


@dataclass
class GuidedFit:
    """Result of :func:`guided_fit`: table (in the table dtype), codes, and the objective along the way."""

    lut: torch.Tensor  # [R, C], table dtype
    codes: torch.Tensor  # [R, K] uint8
    objective_start: float  # sum over rows of J at the k-means start
    objective: float  # sum over rows of J at the end
    trace: list[tuple[str, float]] = field(default_factory=list)  # (stage, total J after it)


def _distinct_tables(w: torch.Tensor, active: torch.Tensor, lut: torch.Tensor, codes: torch.Tensor):
    """Rows whose active weights take at most 2**bits distinct values get those values as their table
    (exact, zero error); other rows keep ``lut`` / ``codes``. None when no row qualifies."""
    C = lut.shape[1]
    x = torch.where(active > 0, w, torch.inf)
    # cheap screen: a row with more than C distinct active values among its first 4 (C + 1) entries
    # cannot qualify (sparse entries read as +inf and do not count)
    head = torch.sort(x[:, : 4 * (C + 1)], dim=1).values
    fresh = torch.ones_like(head, dtype=torch.bool)
    fresh[:, 1:] = head[:, 1:] != head[:, :-1]
    maybe = (fresh & torch.isfinite(head)).sum(dim=1) <= C
    if not bool(maybe.any()):
        return None
    rows = torch.nonzero(maybe).squeeze(1)
    srt = torch.sort(x[rows], dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    new &= torch.isfinite(srt)
    count = new.sum(dim=1)
    sel = (count >= 1) & (count <= C)
    if not bool(sel.any()):
        return None
    ok = torch.zeros(w.shape[0], dtype=torch.bool)
    ok[rows[sel]] = True
    srt, new = srt[sel], new[sel]
    rank = (torch.cumsum(new, dim=1) - 1).clamp_(0, C - 1)
    table = srt[:, :1].expand(-1, C).clone()  # unused entries repeat the smallest value
    fin = torch.isfinite(srt)
    table.scatter_(1, torch.where(fin, rank, 0), torch.where(fin, srt, srt[:, :1]))
    table = torch.cummax(table, dim=1).values  # ascending; later unused entries repeat the largest value
    sub = torch.searchsorted(table.contiguous(), w[ok].contiguous()).clamp_(max=C - 1)
    lut, codes = lut.clone(), codes.clone()
    lut[ok], codes[ok] = table.to(lut.dtype), sub
    return lut, codes


def _nearest(lut: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index of the entry of each row's table nearest to ``v[r]`` (first one on ties)."""
    return (lut - v.unsqueeze(1)).abs().argmin(dim=1)


def _pad_cols(a: np.ndarray, kp: int, value: float = 0.0) -> np.ndarray:
    return a if a.shape[1] == kp else np.pad(a, ((0, 0), (0, kp - a.shape[1])), constant_values=value)


def _pad_square(m: np.ndarray, kp: int) -> np.ndarray:
    """Pad a K x K matrix to kp x kp with an identity block (padded columns are inert)."""
    k = m.shape[0]
    if k == kp:
        return m
    out = np.zeros((kp, kp), dtype=m.dtype)
    out[:k, :k] = m
    out[np.arange(k, kp), np.arange(k, kp)] = 1.0
    return out


@functools.lru_cache(maxsize=None)
def _ef_solver(block: int):
    """Jitted error-feedback rounding: columns in blocks; one fused loop body per column."""
    jax, jnp = _jax()
    lax = jax.lax

    def run(wp, w0, lut, ap, u):
        R, K = wp.shape
        cols = jnp.arange(K)

        def block_body(bi, state):
            wp, codes = state
            b0 = bi * block
            wb = lax.dynamic_slice(wp, (0, b0), (R, block))
            ub = lax.dynamic_slice(u, (b0, b0), (block, block))
            w0b = lax.dynamic_slice(w0, (0, b0), (R, block))
            apb = lax.dynamic_slice(ap, (0, b0), (R, block))

            def col_body(j, st):
                wb, errs, cb = st
                col = lax.dynamic_index_in_dim(wb, j, axis=1, keepdims=False)
                code = jnp.argmin(jnp.abs(lut - col[:, None]), axis=1)
                q = jnp.take_along_axis(lut, code[:, None], axis=1)[:, 0]
                q = jnp.where(lax.dynamic_index_in_dim(apb, j, axis=1, keepdims=False) > 0, q,
                              lax.dynamic_index_in_dim(w0b, j, axis=1, keepdims=False))
                urow = lax.dynamic_index_in_dim(ub, j, axis=0, keepdims=False)
                err = (col - q) / urow[j]
                # u is upper triangular: the row is zero left of j, so the whole block can be updated
                wb = wb - err[:, None] * urow[None, :]
                errs = lax.dynamic_update_index_in_dim(errs, err, j, axis=1)
                cb = lax.dynamic_update_index_in_dim(cb, code.astype(jnp.int32), j, axis=1)
                return wb, errs, cb

            init = (wb, jnp.zeros((R, block), wp.dtype), jnp.zeros((R, block), jnp.int32))
            wb, errs, cb = lax.fori_loop(0, block, col_body, init)
            urows = lax.dynamic_slice(u, (b0, 0), (block, K)) * (cols >= b0 + block)[None, :]
            wp = wp - errs @ urows
            codes = lax.dynamic_update_slice(codes, cb, (0, b0))
            return wp, codes

        _, codes = lax.fori_loop(0, K // block, block_body, (wp, jnp.zeros((R, K), jnp.int32)))
        return codes

    return jax.jit(run)


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (fp32; float64 where fp32 breaks down).

    A matrix that is still not positive definite after the objective's damping
    (rounding in an ill-conditioned ``H``) gets 10x more diagonal damping per
    try for this factor only: it steers the error feedback, while the scores
    that decide what is kept use the objective's own ``H``.
    """
    mean = float(torch.diagonal(h).mean())
    extra = 0.0
    # with J the reversal, J H J = L L^T gives H^-1 = U^T U for the upper triangular U = J L^-1 J:
    # one factorisation and one triangular inverse
    rev = h.flip(0).flip(1)
    for _ in range(12):
        hx = rev if extra == 0.0 else rev + extra * torch.eye(h.shape[0], dtype=h.dtype)
        for dt in (torch.float32, torch.float64):
            low, info = torch.linalg.cholesky_ex(hx.to(dt))
            if int(info) == 0:
                eye = torch.eye(h.shape[0], dtype=dt)
                u = torch.linalg.solve_triangular(low, eye, upper=False).flip(0).flip(1)
                if torch.isfinite(u).all():
                    return u
        extra = max(extra * 10.0, 1e-3 * abs(mean) or 1e-3)
    raise ValueError("guided fit: the Hessian is not positive definite even with 1e8x damping; "
                     "it has NaN/Inf or huge entries: check the calibration data")


def _assign_error_feedback(w, lut, active, h, block):
    """GPTQ-style rounding of every row onto its own table; returns codes [R, K] int64."""
    R, K = w.shape
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    hp = h[perm][:, perm]
    # upper Cholesky factor of H^-1: row k gives how column k's error moves the later columns
    u = _inverse_cholesky_upper(hp)
    kp = -(-K // block) * block
    f32 = lambda t: t.float().numpy()  # noqa: E731
    # sparse positions enter as 0: their "rounding error" is just the feedback they received, and their
    # own values (kept exactly) must not touch the arithmetic
    w0 = _pad_cols(f32((w * active)[:, perm]), kp)
    codes = _ef_solver(block)(w0, w0, f32(lut), _pad_cols(f32(active[:, perm]), kp), _pad_square(f32(u), kp))
    codes = torch.from_numpy(np.asarray(codes)[:, :K].astype(np.int64))
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


@functools.lru_cache(maxsize=None)
def _normal_equations(n_centroids: int, rows_per_chunk: int):
    """Jitted ``P^T H P`` and ``P^T H w_a`` for every row, in chunks of rows (XLA's f32 GEMM ran twice
    as fast as torch's here)."""
    jax, jnp = _jax()

    def chunk(args, h):
        w, codes, act = args
        n, K = w.shape
        onehot = jax.nn.one_hot(codes, n_centroids, dtype=w.dtype) * act[:, :, None]  # [n, K, C]
        hp = (h @ onehot.transpose(1, 0, 2).reshape(K, n * n_centroids)).reshape(K, n, n_centroids)
        m = jnp.einsum("nkc,knd->ncd", onehot, hp)
        b = jnp.einsum("nkc,nk->nc", onehot, (w * act) @ h)
        return m, b

    def run(w, codes, act, h):
        R, K = w.shape
        sh = lambda a: a.reshape(R // rows_per_chunk, rows_per_chunk, *a.shape[1:])  # noqa: E731
        m, b = jax.lax.map(lambda a: chunk(a, h), (sh(w), sh(codes), sh(act)))
        return m.reshape(R, n_centroids, n_centroids), b.reshape(R, n_centroids)

    return jax.jit(run)


def _least_squares_tables(w, lut, codes, active, h, rows_per_chunk=128):
    """Per-row exact minimiser of J over the table for fixed codes, empty entries unchanged."""
    R, K = w.shape
    C = lut.shape[1]
    n = min(rows_per_chunk, R)
    rp = -(-R // n) * n
    pad = lambda a: a if rp == R else np.pad(a, ((0, rp - R), (0, 0)))  # noqa: E731
    m, b = _normal_equations(C, n)(pad(w.float().numpy()), pad(codes.int().numpy()), pad(active.float().numpy()),
                                   h.float().numpy())
    m = torch.from_numpy(np.array(m[:R], dtype=np.float64))
    b = torch.from_numpy(np.array(b[:R], dtype=np.float64))
    old = lut.double()
    empty = torch.diagonal(m, dim1=1, dim2=2) <= 0  # entries no active weight uses: keep them as they are
    eye = torch.eye(C, dtype=torch.float64).expand(R, C, C)
    m = torch.where(empty.unsqueeze(1) | empty.unsqueeze(2), 0.0, m) + eye * empty.unsqueeze(2)
    b = torch.where(empty, old, b)
    # a tiny ridge keeps entries used by linearly dependent columns solvable
    scale = torch.diagonal(m, dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1e-300)
    m = m + eye * (1e-10 * scale).view(R, 1, 1)
    sol = torch.linalg.solve(m, b.unsqueeze(2)).squeeze(2)
    return torch.where(torch.isfinite(sol), sol, old).to(lut.dtype)


@functools.lru_cache(maxsize=None)
def _cd_solver(block: int):
    """Jitted cyclic coordinate descent over the columns (one sweep)."""
    jax, jnp = _jax()
    lax = jax.lax

    def run(w, lut, codes, act, h):
        R, K = w.shape
        e = act * (w - jnp.take_along_axis(lut, codes, axis=1))
        g = e @ h  # g[r, k] = (H e_r)_k ; J changes by -2 d g_k + d^2 H_kk when w_hat_k moves by d
        diag = jnp.diagonal(h)

        def block_body(bi, state):
            g, codes = state
            b0 = bi * block
            gb = lax.dynamic_slice(g, (0, b0), (R, block))
            hb = lax.dynamic_slice(h, (b0, b0), (block, block))
            cb = lax.dynamic_slice(codes, (0, b0), (R, block))
            ab = lax.dynamic_slice(act, (0, b0), (R, block))
            db = lax.dynamic_slice(diag, (b0,), (block,))

            def col_body(j, st):
                gb, cb, delta = st
                ck = lax.dynamic_index_in_dim(cb, j, axis=1, keepdims=False)
                cur = jnp.take_along_axis(lut, ck[:, None], axis=1)
                d = lut - cur  # [R, C]: the move to each entry
                gj = lax.dynamic_index_in_dim(gb, j, axis=1, keepdims=True)
                change = d * (d * db[j] - 2.0 * gj)
                best = jnp.argmin(change, axis=1)
                gain = jnp.take_along_axis(change, best[:, None], axis=1)[:, 0]
                # only a strict improvement moves; sparse positions never move (their error is 0)
                move = (gain < 0) & (lax.dynamic_index_in_dim(ab, j, axis=1, keepdims=False) > 0)
                best = jnp.where(move, best.astype(ck.dtype), ck)
                dk = jnp.where(move, jnp.take_along_axis(d, best[:, None], axis=1)[:, 0], 0.0)
                # e_k -= dk, so g -= dk * H[k, :]
                gb = gb - dk[:, None] * lax.dynamic_index_in_dim(hb, j, axis=0, keepdims=False)[None, :]
                cb = lax.dynamic_update_index_in_dim(cb, best, j, axis=1)
                delta = lax.dynamic_update_index_in_dim(delta, dk, j, axis=1)
                return gb, cb, delta

            gb, cb, delta = lax.fori_loop(0, block, col_body, (gb, cb, jnp.zeros((R, block), w.dtype)))
            g = g - delta @ lax.dynamic_slice(h, (b0, 0), (block, K))
            codes = lax.dynamic_update_slice(codes, cb, (0, b0))
            return g, codes

        _, codes = lax.fori_loop(0, K // block, block_body, (g, codes))
        return codes

    return jax.jit(run)


def _coordinate_descent(w, lut, codes, active, h, block):
    """One cyclic sweep over the columns; each weight takes the entry that lowers J most. Returns codes."""
    R, K = w.shape
    kp = -(-K // block) * block
    f32 = lambda t: t.float().numpy()  # noqa: E731
    out = _cd_solver(block)(
        _pad_cols(f32(w), kp), f32(lut), _pad_cols(codes.int().numpy(), kp), _pad_cols(f32(active), kp),
        _pad_square(f32(h), kp),
    )
    return torch.from_numpy(np.asarray(out)[:, :K].astype(np.int64))


def guided_fit(
    w: torch.Tensor,
    h: torch.Tensor,
    active: torch.Tensor,
    lut0: torch.Tensor,
    codes0: torch.Tensor,
    *,
    iters: int = 1,
    damp: float = 0.01,
    shrink: float = 0.0,
    block: int = 64,
    table_dtype: torch.dtype | None = None,
) -> GuidedFit:
    """Improve a layer's codebook fit under the guided objective (module docstring).

    Parameters
    ----------
    w : ``[R, K]`` weights. h : ``[K, K]`` guided Hessian (undamped).
    active : ``[R, K]`` bool, False at the sparse positions.
    lut0, codes0 : the start (k-means table in the table dtype, ``[R, K]`` codes).
    iters : rounds of least-squares tables + coordinate descent after the error-feedback assignment.
    damp : diagonal damping relative to ``mean(diag H)``.
    shrink : weight of ``diag(H)`` against ``H`` (module docstring), applied before the damping.
    table_dtype : dtype the tables are stored in (default ``lut0``'s); every
        score is taken with the stored (rounded) table.

    Examples
    --------
    >>> import torch
    >>> w = torch.randn(4, 16); x = torch.randn(64, 16); h = x.T @ x
    >>> lut0 = torch.quantile(w, torch.linspace(0, 1, 4), dim=1).T.contiguous()
    >>> codes0 = (w.unsqueeze(-1) - lut0.unsqueeze(1)).abs().argmin(-1).to(torch.uint8)
    >>> fit = guided_fit(w, h, torch.ones(4, 16, dtype=torch.bool), lut0, codes0)
    >>> fit.objective <= fit.objective_start
    True
    """
    R, K = w.shape
    if h.shape != (K, K):
        raise ValueError(f"guided_fit: H must be [{K}, {K}] for a weight with {K} inputs, got {tuple(h.shape)}")
    if lut0.shape[0] != R or codes0.shape != (R, K) or active.shape != (R, K):
        raise ValueError("guided_fit: lut0 [R, C], codes0 [R, K] and active [R, K] must match w [R, K]")
    if iters < 0:
        raise ValueError(f"guided_fit: iters must be >= 0, got {iters}")
    tdt = table_dtype or lut0.dtype
    hd = objective_matrix(h, damp, shrink)
    wd = w.detach().to(torch.float64)
    act = active.to(torch.float64)
    lut = lut0.to(tdt).to(torch.float64)
    codes = codes0.long()
    # the stages and the scores work in fp32 (row sums of the scores in float64): an fp64 product per
    # score cost a sixth of the whole fit on SmolLM2
    w32, act32, h32 = wd.float(), act.float(), hd.float()

    def score(l, c):
        e = _error(w32, l.float(), c, act32)
        eh = e @ h32
        return (eh * e).sum(dim=1, dtype=torch.float64)

    cur = score(lut, codes)
    start = float(cur.sum())
    trace = [("start", start)]

    def keep_better(l_new, c_new, stage):
        nonlocal lut, codes, cur
        new = score(l_new, c_new)
        better = new < cur
        lut = torch.where(better.unsqueeze(1), l_new, lut)
        codes = torch.where(better.unsqueeze(1), c_new, codes)
        cur = torch.where(better, new, cur)
        trace.append((stage, float(cur.sum())))

    exact = _distinct_tables(w32, act32, lut, codes)
    if exact is not None:
        keep_better(exact[0].to(tdt).to(torch.float64), exact[1], "distinct values")
    keep_better(lut, _assign_error_feedback(w32, lut.float(), act32, hd, block), "error feedback")
    for i in range(iters):
        tables = _least_squares_tables(w32, lut.float(), codes, act32, h32).to(tdt).to(torch.float64)
        keep_better(tables, codes, f"tables {i + 1}")
        keep_better(lut, _coordinate_descent(w32, lut.float(), codes, act32, h32, block), f"descent {i + 1}")
    return GuidedFit(lut.to(tdt), codes.to(torch.uint8), start, float(cur.sum()), trace)
