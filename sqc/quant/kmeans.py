"""Sensitivity-weighted 1-D k-means per row, in JAX.

Every output row of a weight matrix gets its own codebook of ``C = 2**bits``
centroids that minimises

    sum_j f_j * (w_j - c[code_j])**2

over the row's *active* entries (entries moved to the sparse part carry zero
weight). In one dimension the clusters of an optimal assignment are intervals
of the sorted values, so after one sort per row each Lloyd step is

* assignment: the boundaries between consecutive centroids are found with a
  binary search in the sorted row (``C - 1`` searches, not ``K * C`` distances);
* update: each interval's weighted mean comes from prefix sums of ``f`` and
  ``f * w`` (two subtractions per centroid).

A step therefore costs O(C log K) per row instead of O(K C). Lloyd's algorithm
never increases the objective. Lloyd starts from weighted quantiles (the
centre of each equal-weight slice of the row); the uniform min-max grid (the
round-to-nearest codebook) is kept instead wherever it scores better, so the
result is never worse than round-to-nearest.

Edge cases: rows with fewer distinct values than centroids (duplicate
centroids, zero error), rows whose active weights are all zero (fall back to
unweighted k-means over the active entries), rows with no active entry
(every centroid is the row's mean), constant rows.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["KMeansResult", "fit_rows", "lloyd_trace"]

SEARCH_METHOD = "scan"


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [R, C] float32, ascending per row
    objective: np.ndarray  # [R] float32, weighted SSE over active entries


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


@functools.lru_cache(maxsize=None)
def _row_solver(n_centroids: int, iters: int, trace: bool):
    """Build the jitted, row-vmapped solver for a centroid count and iteration count."""
    jax, jnp = _jax()
    C = n_centroids

    def prepare(xs, ws, act):
        # xs: [K] sorted values, ws: [K] weights, act: [K] bool active (sorted order)
        ws = jnp.where(act, ws, 0.0)
        wsum = ws.sum()
        fallback = act.astype(xs.dtype)
        ws = jnp.where(wsum > 0, ws, fallback)
        # normalise weights: conditioning only, the argmin is unchanged
        ws = ws / jnp.maximum(ws.max(), 1e-30)
        zero = jnp.zeros((1,), xs.dtype)
        p0 = jnp.concatenate([zero, jnp.cumsum(ws)])
        p1 = jnp.concatenate([zero, jnp.cumsum(ws * xs)])
        return ws, p0, p1

    def assign_bounds(xs, c):
        mid = 0.5 * (c[:-1] + c[1:])
        hi = jnp.searchsorted(xs, mid, side="left", method=SEARCH_METHOD)
        K = xs.shape[0]
        lo = jnp.concatenate([jnp.zeros((1,), hi.dtype), hi])
        hi = jnp.concatenate([hi, jnp.full((1,), K, hi.dtype)])
        return lo, hi

    def objective(xs, ws, c):
        # nearest centroid by counting boundaries below each value: K*(C-1)
        # compares vectorise far better on CPU than K binary searches
        mid = 0.5 * (c[:-1] + c[1:])
        code = jnp.sum(xs[:, None] > mid[None, :], axis=1)
        return jnp.sum(ws * (xs - c[code]) ** 2)

    def step(xs, p0, p1, c):
        lo, hi = assign_bounds(xs, c)
        s0 = p0[hi] - p0[lo]
        s1 = p1[hi] - p1[lo]
        c_new = jnp.where(s0 > 0, s1 / jnp.where(s0 > 0, s0, 1.0), c)
        # Interval means stay ordered (each lies inside its own interval); cummax
        # only guards against rounding.
        return jax.lax.cummax(c_new, axis=0)

    def run(xs, ws, p0, p1, c0):
        if trace:
            def body(c, _):
                c2 = step(xs, p0, p1, c)
                return c2, objective(xs, ws, c2)

            c, objs = jax.lax.scan(body, c0, None, length=iters)
            return c, jnp.concatenate([objective(xs, ws, c0)[None], objs])
        c = jax.lax.fori_loop(0, iters, lambda _, c: step(xs, p0, p1, c), c0)
        return c, objective(xs, ws, c)

    def solve_row(xs, ws_raw):
        # inactive (split-off) entries arrive with weight -1
        act = ws_raw >= 0
        ws, p0, p1 = prepare(xs, ws_raw, act)
        any_active = act.any()
        big = jnp.finfo(xs.dtype).max
        lo_v = jnp.min(jnp.where(act, xs, big))
        hi_v = jnp.max(jnp.where(act, xs, -big))
        mean_all = xs.mean()
        lo_v = jnp.where(any_active, lo_v, mean_all)
        hi_v = jnp.where(any_active, hi_v, mean_all)
        # init 1: uniform min-max grid == the round-to-nearest codebook
        c_grid = lo_v + (hi_v - lo_v) * jnp.arange(C, dtype=xs.dtype) / (C - 1)
        # init 2: weighted quantiles (centre of each equal-weight slice)
        total = p0[-1]
        q = (jnp.arange(C, dtype=xs.dtype) + 0.5) / C * total
        qi = jnp.clip(jnp.searchsorted(p0[1:], q, side="left"), 0, xs.shape[0] - 1)
        c_quant = jnp.sort(jnp.where(any_active, xs[qi], mean_all))
        if trace:
            return run(xs, ws, p0, p1, c_grid)
        # Lloyd from the quantile start; the RTN grid is kept where it is
        # better, so the result is never worse than round-to-nearest
        c1, o1 = run(xs, ws, p0, p1, c_quant)
        o_grid = objective(xs, ws, c_grid)
        better = o_grid < o1
        return jnp.where(better, c_grid, c1), jnp.where(better, o_grid, o1)

    return jax.jit(jax.vmap(solve_row))


def _sort_rows(w: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of ``w`` ascending and carry ``f`` along (ties by column).

    The float bits are mapped to an order-preserving integer, shifted into the
    high half of an int64 whose low half is the column, and sorted as plain
    integers: NumPy's SIMD sort of keys is several times faster than argsort
    followed by gathers.
    """
    R, K = w.shape
    b = np.ascontiguousarray(w, dtype=np.float32).view(np.int32)
    key = (b ^ ((b >> 31) & 0x7FFFFFFF)).astype(np.int64)
    key <<= 32
    key |= np.arange(K, dtype=np.int64)
    key.sort(axis=1)
    col = key & 0xFFFFFFFF
    hi = (key >> 32).astype(np.int32)
    hi ^= (hi >> 31) & 0x7FFFFFFF
    return hi.view(np.float32), np.take_along_axis(f, col, axis=1)


def _workers() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def fit_rows(
    w: np.ndarray,
    f: np.ndarray | None,
    active: np.ndarray | None,
    bits: int,
    iters: int = 32,
    chunk_rows: int = 2048,
) -> KMeansResult:
    """Fit one weighted k-means codebook per row.

    Parameters
    ----------
    w : [R, K] float array of weights (any float dtype; fitted in float32).
    f : [R, K] non-negative sample weights (Fisher diagonal) or None (unweighted).
    active : [R, K] bool, False for entries excluded from fitting, or None.
    bits : centroids per row is ``2**bits``.
    iters : Lloyd iterations per start.
    chunk_rows : rows per JAX call; the last chunk is padded so each shape
        compiles once.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"fit_rows expects a 2-D matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("fit_rows got NaN/Inf weights")
    R, K = w.shape
    f = np.ones_like(w) if f is None else np.asarray(f, dtype=np.float32)
    active = np.ones(w.shape, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    if f.shape != w.shape or active.shape != w.shape:
        raise ValueError(f"shape mismatch: w {w.shape}, f {f.shape}, active {active.shape}")
    if (f < 0).any() or not np.isfinite(f).all():
        raise ValueError("sample weights must be finite and non-negative")

    _, jnp = _jax()
    solver = _row_solver(1 << bits, int(iters), False)
    # scale each row to unit max-abs for conditioning; undone on the centroids
    scale = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    f = np.where(active, f, np.float32(-1.0))

    chunk = max(1, min(chunk_rows, R))
    cents = np.empty((R, 1 << bits), dtype=np.float32)
    objs = np.empty((R,), dtype=np.float32)

    def run_chunk(start: int) -> None:
        stop = min(start + chunk, R)
        n = stop - start
        sl = slice(start, stop)
        bx, bw = _sort_rows(w[sl] / scale[sl], f[sl])
        if n < chunk:  # pad to the compiled shape
            pad = chunk - n
            bx = np.concatenate([bx, np.zeros((pad, K), np.float32)])
            bw = np.concatenate([bw, np.ones((pad, K), np.float32)])
        c, o = solver(jnp.asarray(bx), jnp.asarray(bw))
        cents[sl] = np.asarray(c)[:n]
        objs[sl] = np.asarray(o)[:n]

    starts = list(range(0, R, chunk))
    # one chunk (sort + vmapped solve) per core at a time; NumPy's sort and a
    # compiled XLA computation both release the GIL
    n_workers = min(_workers(), len(starts))
    if n_workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(run_chunk, starts))
    else:
        for start in starts:
            run_chunk(start)
    cents *= scale
    return KMeansResult(centroids=cents, objective=objs)


def lloyd_trace(w: np.ndarray, f: np.ndarray, bits: int, iters: int) -> np.ndarray:
    """Objective (in normalised units) after each Lloyd step from the grid start.

    Returns ``[R, iters + 1]``; entry 0 is the round-to-nearest grid's
    objective. Used to test monotonicity.
    """
    _, jnp = _jax()
    w = np.asarray(w, np.float32)
    f = np.asarray(f, np.float32)
    xs, ws = _sort_rows(w, f)
    solver = _row_solver(1 << bits, int(iters), True)
    _, objs = solver(jnp.asarray(xs), jnp.asarray(ws))
    return np.asarray(objs)
