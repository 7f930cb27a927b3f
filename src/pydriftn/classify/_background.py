"""Sky level, sky noise and a fine background mesh, cheap enough for the 0.3 s budget.

The sky is modelled per amplifier as ``sky(y, x) = row(y) + col(x)`` from
medians of blocks of a sub-sampled image (every ``step``-th pixel); block
edges never straddle the amplifier boundary, and the column term is
interpolated within each amplifier only, so a gain step between amplifiers is
followed exactly. It is applied with one broadcast subtraction; a full 2-D
mesh interpolation at full resolution (sep, photutils ``Background2D``) costs
60-200 ms on a 2046x4094 CCD, more than the whole stage may take. What the
separable model misses (scattered light, faint wings of many stars) is taken
out later by :func:`residual_mesh` on the 2x2-binned, trail-subtracted
residual, where it is cheap. The noise is taken from the lower half of the
pixel distribution (median minus the 15.87th percentile), which sources
brighter than the sky cannot inflate.
"""

from __future__ import annotations

import numpy as np

__all__ = ["estimate_sky", "residual_mesh", "sky_noise"]


def _edges(n, nb, split=None):
    if split is None or not (0 < split < n):
        return np.linspace(0, n, nb + 1).astype(int)
    na = max(1, int(round(nb * split / n)))
    nb_b = max(1, nb - na)
    return np.unique(np.concatenate([np.linspace(0, split, na + 1), np.linspace(split, n, nb_b + 1)]).astype(int))


def _block_medians(sub, good, ey, ex, min_count=17):
    """``np.median`` of the good values of each block ``[ey[j]:ey[j+1], ex[i]:ex[i+1]]``; NaN below ``min_count``.

    Blocks of equal size (the usual case): one sort of all blocks with the bad
    values as NaN (sorted last), the median read at each block's own count of
    good values, as ``np.median`` computes it (mean of the two middle values in
    the array's dtype); ~2.5x faster than a median per block. Otherwise a loop.
    """
    med = np.full((len(ey) - 1, len(ex) - 1), np.nan)
    hy, hx = np.diff(ey), np.diff(ex)
    if len(hy) and len(hx) and np.all(hy == hy[0]) and np.all(hx == hx[0]) and sub.dtype.kind == "f":
        by, bx, h, w = len(hy), len(hx), int(hy[0]), int(hx[0])
        win = (slice(ey[0], ey[-1]), slice(ex[0], ex[-1]))
        S = np.where(good[win], sub[win], sub.dtype.type(np.nan))
        S = np.sort(S.reshape(by, h, bx, w).transpose(0, 2, 1, 3).reshape(by, bx, h * w), axis=2)
        n = h * w - np.count_nonzero(np.isnan(S), axis=2)
        lo = np.take_along_axis(S, np.maximum((n - 1) // 2, 0)[..., None], 2)[..., 0]
        hi = np.take_along_axis(S, np.maximum(n // 2, 0)[..., None], 2)[..., 0]
        m = (lo + hi) / sub.dtype.type(2)
        return np.where(n >= min_count, m, med)
    for j in range(len(ey) - 1):
        for i in range(len(ex) - 1):
            v = sub[ey[j]:ey[j + 1], ex[i]:ex[i + 1]][good[ey[j]:ey[j + 1], ex[i]:ex[i + 1]]]
            if v.size >= min_count:
                med[j, i] = np.median(v)
    return med


def _percentiles(v, q):
    """``np.percentile(v, q, overwrite_input=True)`` (linear method) of a 1-D array without NaN; same values.

    numpy also partitions at the first and last element (to detect NaN);
    partitioning at the needed order statistics only is ~20 % faster. The
    interpolation is numpy's (``_lerp``), to the last bit.
    """
    n = len(v)
    qs = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    vi = (n - 1) * qs
    prev = np.floor(vi).astype(np.intp)
    nxt = np.minimum(prev + 1, n - 1)
    v.partition(np.unique(np.concatenate([prev, nxt])))
    a, b = v[prev], v[nxt]
    t = vi - prev
    d = b - a
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t)


def estimate_sky(image, bad=None, *, block_px=512, step=4, amp_boundary=None):
    """Separable per-amplifier sky model and sky noise.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Image in ADU, sky included.
    bad : ndarray of bool, optional
        Pixels to ignore.
    block_px : int
        Block size (full-resolution pixels) of the median grid.
    step : int
        Sub-sampling step.
    amp_boundary : int, optional
        First column of the second amplifier (None: one amplifier).

    Returns
    -------
    row : ndarray (ny,)
        Row term, to be broadcast as ``row[:, None]``.
    col : ndarray (nx,)
        Column term, to be broadcast as ``col[None, :]``.
    sigma : float
        Robust sky noise per pixel (ADU): median minus the 15.87th percentile
        of the sky-subtracted values on every other row of the sub-sampled grid.
    level : float
        Median sky level (ADU).
    """
    ny, nx = image.shape
    sub = image[::step, ::step]
    good = np.isfinite(sub)
    if bad is not None:
        good &= ~bad[::step, ::step]
    nsy, nsx = sub.shape
    nb_y = max(1, int(round(ny / block_px)))
    nb_x = max(1, int(round(nx / block_px)))
    split = None if amp_boundary is None else int(np.ceil(amp_boundary / step))
    ey = _edges(nsy, nb_y)
    ex = _edges(nsx, max(nb_x, 2 if split else 1), split)
    med = _block_medians(sub, good, ey, ex)
    if not np.any(np.isfinite(med)):
        level = float(np.median(sub[good])) if good.any() else 0.0
        med = np.full(med.shape, level)
    level = float(np.nanmedian(med))
    med = np.where(np.isfinite(med), med, level)
    rowm = np.median(med, axis=1)
    colm = np.median(med - rowm[:, None], axis=0)
    cy = 0.5 * (ey[:-1] + ey[1:]) * step
    cx = 0.5 * (ex[:-1] + ex[1:]) * step
    rows = np.interp(np.arange(ny, dtype=float), cy, rowm)
    xs = np.arange(nx, dtype=float)
    if split:
        b = int(amp_boundary)
        left = cx < b
        cols = np.empty(nx)
        cols[:b] = np.interp(xs[:b], cx[left], colm[left])
        cols[b:] = np.interp(xs[b:], cx[~left], colm[~left])
    else:
        cols = np.interp(xs, cx, colm)
    # the noise from every other row of the sub-sampled grid (~2.5e5 values on a full CCD: its statistical
    # error, ~0.25 %, is still far below what matters for the thresholds, at half the cost)
    r = sub[::2] - rows[::step][:nsy:2, None]
    r -= cols[::step][None, :nsx]
    sigma = _noise(r[good[::2]])
    return rows, cols, (1.0 if sigma is None else sigma), level


def _noise(v):
    """Median minus the 15.87th percentile of the values ``v`` (a fresh 1-D copy, partitioned in place); None
    below 10 values."""
    if v.size < 10:
        return None
    p16, p50 = _percentiles(v, [15.865525, 50.0])
    return float(max(p50 - p16, 1e-6))


def sky_noise(resid, bad=None, *, step=4):
    """Sky noise per pixel (ADU) of an image whose sky is already subtracted, as :func:`estimate_sky` measures it.

    Median minus the 15.87th percentile of the finite, not-``bad`` values on
    every ``2 step``-th row and ``step``-th column; None with fewer than 10
    such values.
    """
    sub = resid[::2 * step, ::step]
    good = np.isfinite(sub)
    if bad is not None:
        good &= ~bad[::2 * step, ::step]
    return _noise(sub[good])


def _interp_matrix(n, m, block):
    """(n, m) linear-interpolation weights from m block centres to n pixels (flat beyond the ends)."""
    u = np.clip((np.arange(n) + 0.5) / block - 0.5, 0, m - 1)
    i = np.minimum(u.astype(int), max(m - 2, 0))
    f = u - i
    W = np.zeros((n, m), np.float32)
    W[np.arange(n), i] = 1 - f
    if m > 1:
        W[np.arange(n), i + 1] += f
    else:
        W[:, 0] = 1.0
    return W


def residual_mesh(binned, block=32, step=2):
    """Smooth background of a binned residual image from block medians, at the binned resolution.

    Parameters
    ----------
    binned : ndarray (nyb, nxb)
        Residual image binned 2x2 (sources subtracted, masked pixels 0).
    block : int
        Block size in binned pixels.
    step : int
        Sub-sampling inside the blocks.

    Returns
    -------
    mesh_up : ndarray float32 (nyb, nxb)
        Bilinear interpolation of the block medians.
    mesh : ndarray (my, mx)
        The block medians.
    """
    nyb, nxb = binned.shape
    my, mx = max(1, nyb // block), max(1, nxb // block)
    sub = binned[: my * block: step, : mx * block: step]
    bs = block // step
    # median of each block by one sort along the last axis (np.median's partition along an axis of 256 was
    # ~6x slower here); the mean of the two middle values as np.median, NaN where a block holds a NaN
    blk = np.sort(sub.reshape(my, bs, mx, bs).transpose(0, 2, 1, 3).reshape(my, mx, -1), axis=2)
    nb = blk.shape[2]
    mid = blk[:, :, (nb - 1) // 2] + blk[:, :, nb // 2]
    mid /= 2
    mesh = np.where(np.isnan(blk[:, :, -1]), np.nan, mid).astype(blk.dtype, copy=False)
    # bilinear (separable: two small matrix products), block centres at (k + 0.5) * block - 0.5
    mesh_up = _interp_matrix(nyb, my, block) @ mesh @ _interp_matrix(nxb, mx, block).T
    return mesh_up.astype(np.float32), mesh
