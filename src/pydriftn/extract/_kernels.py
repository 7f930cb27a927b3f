"""Compiled kernels of the local sky and the trail extraction (numba, :func:`pydriftn._jit.jit`).

Which loops they replace, and why compiled
------------------------------------------
:func:`annulus_values` (used by :func:`pydriftn.sky.local_sky`)
    The gather of every trail's annulus pixels: the ``(n_trails, n_offsets)``
    flat-index array, ``np.take`` of the image and of the "unusable" image
    (other trails' footprints | flagged pixels, which needed a full-image
    copy), the gain and the NaN marking — five passes over ~1.7 million
    entries and two index temporaries become one pass reading each pixel once.
:func:`clip_rows` (used by :func:`pydriftn.sky.clipped_stats_rows`)
    The sigma clipping of the sorted rows: the float32 cumulative sums (one
    vector add per column in numpy, ~800 of them) and the per-iteration
    vectorised binary searches become one loop per row, which also stops
    at that row's own convergence. The same float32 sums, in the same order,
    and the same float64 statistics: the results are bit-identical.
:func:`cut_cells` (used by :func:`pydriftn.extract.stamps.cut_strips`)
    The gathers of the two pixel columns (rows) of every strip, their
    validity tests (non-finite, saturated, masked, outside), the gains, the
    combination into sky-subtracted electrons and the read-noise + sky
    variance, and the pixel flags of the strips with a bad pixel: ~15 numpy
    passes over ``(S, K, C)`` arrays (S ~ 2000 trails, K ~ 37 samples,
    C ~ 19 cells) become one loop over the strips, which reads each pixel
    once. Same float32 operations in the same order: bit-identical.
:func:`profile_design` (used by :func:`pydriftn.extract.profile.measure_profile`)
    The basis interpolated at every reference cell and its two sample-major
    copies (a gather of a complex table, a transposed copy, a product):
    bit-identical.
:func:`table_cells` (used by :meth:`pydriftn.extract.profile.CrossProfile.strip_profile`)
    The profile of every cell of every strip (the star's, the neighbours'):
    a strided gather of a complex table into a (strips, cells) complex
    temporary, then a multiply-add; one loop instead: bit-identical, ~2.5x
    faster.
:func:`fwhm_rows` (used by :func:`pydriftn.extract.profile._fwhm_of_table`)
    The FWHM of every profile row, a Python loop of ~10 numpy calls per
    sample: bit-identical.
:func:`optimal_strips` (used by :func:`pydriftn.extract.core._optimal_single`)
    and :func:`joint_strips` (used by :func:`pydriftn.extract.core._deblend`)
    The Horne iterations of every strip, and the joint fit of a star and up
    to two neighbours per strip: ~10 passes over ``(S, K, C)`` arrays per
    iteration (model, variance, outlier test, weights, einsum sums) become
    one loop per strip. The elementwise float32 operations are the numpy
    ones; the sums over a strip's cells are accumulated in float64 and
    rounded to float32, where numpy's einsum sums float32 in SIMD lanes (an
    order that cannot be reproduced portably), so these agree with the numpy
    code to float32 rounding: on an N4 unit of the benchmark data (2001
    stars x 37 samples) the fluxes differ by at most 3e-7 relative (above
    10 sigma) and 5e-4 of their errors, the same cells are rejected and the
    flags are identical.

The numpy expressions they replace are kept in ``tests/test_sky.py`` and
``tests/test_extract.py``, which compare them with the kernels on random
inputs (edges, masked pixels, empty inputs).

Speed-ups measured (process CPU on the loaded 2-core machine, old and new code
run back to back): line profile of 3 pipeline units (``/tmp/s5/lp.py``),
``extract_trails`` N4 180 -> 113 ms and S4 122 -> 88 ms per unit,
``local_sky`` N4 60 -> 32 ms and S4 40 -> 28 ms; ``benchmarks/bench_extract.py``
sky 0.065 -> 0.026 s and extraction 0.127 -> 0.081 s per CCD with unchanged
accuracy figures. Per kernel, on one N4 unit: the strip cutting 42 -> 23 ms,
the profile evaluation ~2.5x, the profile design matrices ~8x.
"""

from __future__ import annotations

import math

import numpy as np

from pydriftn._jit import jit

__all__ = ["annulus_values", "clip_rows", "cut_cells"]


# --------------------------------------------------------------------------- sky
@jit
def annulus_values(img, covered, cov_nx, cov_bx, cov_by, mask, use_mask, bits, cx, cy, ox, oy, g_col, use_gain):
    """Annulus pixel values of every trail, NaN where unusable.

    Parameters
    ----------
    img : 1-d float32 or float64 array
        The image (ny, nx) flattened (C order); ``nx`` is the length of ``g_col``.
    covered : 1-d bool array
        Pixels within ``mask_radius`` of a trail, in a buffer of rows of
        ``cov_nx`` pixels where image pixel ``(x, y)`` is at
        ``(y + cov_by) * cov_nx + x + cov_bx``.
    mask : 1-d integer array (ny * nx)
        Pixel bitmask (ignored unless ``use_mask``).
    bits : int
        A pixel is unusable if ``mask & bits`` (``bits < 0``: if ``mask != 0``).
    cx, cy : int64 (n,)
        Rounded trail centres (any value: positions off the image are clipped
        as :func:`pydriftn.sky.local_sky` did, and their pixels are outside).
    ox, oy : intp (m,)
        Annulus offsets.
    g_col : float32 (nx,)
        Gain per column (used if ``use_gain``, else all ones): the trail's
        centre column's, or each pixel's own where the annulus straddles two gains.

    Returns
    -------
    vals : (n, m) array of the image's dtype
        Values (times the gain), NaN where outside, covered, masked or not finite.
    n_good : int64 (n,)
        Usable pixels per trail.
    n_inside : int64 (n,)
        Pixels inside the image per trail.
    """
    nx = g_col.shape[0]
    ny = img.shape[0] // nx
    n = cx.shape[0]
    m = ox.shape[0]
    vals = np.empty((n, m), dtype=img.dtype)
    n_good = np.zeros(n, dtype=np.int64)
    n_inside = np.zeros(n, dtype=np.int64)
    if m == 0:
        return vals, n_good, n_inside
    oxmin, oxmax = ox.min(), ox.max()
    oymin, oymax = oy.min(), oy.max()
    off_i = oy * nx + ox
    off_c = oy * cov_nx + ox
    # runs of consecutive offsets along x (the stadium's rows): contiguous reads in the common case
    run_start = np.empty(m + 1, dtype=np.int64)
    n_runs = 0
    for j in range(m):
        if j == 0 or oy[j] != oy[j - 1] or ox[j] != ox[j - 1] + 1:
            run_start[n_runs] = j
            n_runs += 1
    run_start[n_runs] = m
    nan = np.nan
    # trails in order of their rows: neighbours in the loop share image rows (memory pages), which
    # makes the reads ~30 % faster than in the table's order
    order = np.argsort(cy, kind="mergesort")
    for r in order:
        cxr = min(max(cx[r], -(10 * nx)), 11 * nx)
        cyr = min(max(cy[r], -(10 * ny)), 11 * ny)
        gc = g_col[min(max(cx[r], 0), nx - 1)]
        straddle = False
        if use_gain:
            xlo = min(max(cx[r] + oxmin, 0), nx - 1)
            xhi = min(max(cx[r] + oxmax, 0), nx - 1)
            straddle = g_col[xlo] != g_col[xhi]
        row = vals[r]
        ng = 0
        if cxr + oxmin >= 0 and cxr + oxmax < nx and cyr + oymin >= 0 and cyr + oymax < ny and not straddle:
            # the whole annulus on the image, one gain: the common case
            bi = cyr * nx + cxr
            bc = (cyr + cov_by) * cov_nx + cxr + cov_bx
            for q in range(n_runs):
                j0 = run_start[q]
                L = run_start[q + 1] - j0
                pi = bi + off_i[j0]
                pc = bc + off_c[j0]
                for t in range(L):
                    v = img[pi + t]
                    if use_gain:
                        v = v * gc
                    ok = (not covered[pc + t]) & np.isfinite(v)
                    if use_mask:
                        mv = np.int64(mask[pi + t])
                        ok &= ((mv == 0) if bits < 0 else ((mv & bits) == 0))
                    row[j0 + t] = v if ok else nan
                    ng += ok
            n_good[r] = ng
            n_inside[r] = m
            continue
        ni = 0
        for j in range(m):
            X = cxr + ox[j]
            Y = cyr + oy[j]
            inside = X >= 0 and X < nx and Y >= 0 and Y < ny
            Xc = min(max(X, 0), nx - 1)
            Yc = min(max(Y, 0), ny - 1)
            v = img[Yc * nx + Xc]
            if use_gain:
                if straddle:
                    v = v * g_col[Xc]
                else:
                    v = v * gc
            ok = inside and not covered[(Yc + cov_by) * cov_nx + Xc + cov_bx] and np.isfinite(v)
            if ok and use_mask:
                mv = np.int64(mask[Yc * nx + Xc])
                ok = (mv == 0) if bits < 0 else ((mv & bits) == 0)
            if inside:
                ni += 1
            if ok:
                ng += 1
                row[j] = v
            else:
                row[j] = np.nan
        n_good[r] = ng
        n_inside[r] = ni
    return vals, n_good, n_inside


@jit
def clip_rows(v, sigma, maxiters):
    """Sigma-clipped median, std and count of each row of ``v`` (float32, each row sorted, NaN last).

    The arithmetic of :func:`pydriftn.sky.clipped_stats_rows` row by row
    (see there). Returns ``med, std, cnt, has_inf``; ``has_inf`` is True if
    a row holds an infinity (the caller then treats infinities as missing and
    calls again).
    """
    n, m = v.shape
    med = np.empty(n, dtype=np.float64)
    std = np.empty(n, dtype=np.float64)
    cnt = np.zeros(n, dtype=np.intp)
    c1 = np.empty(m, dtype=np.float32)
    c2 = np.empty(m, dtype=np.float32)
    for r in range(n):
        row = v[r]
        # values <= inf (NaN sort last)
        a, b = 0, m
        while a < b:
            mid_i = (a + b) >> 1
            if row[mid_i] <= np.inf:
                a = mid_i + 1
            else:
                b = mid_i
        nfin = a
        if nfin > 0 and (np.isinf(row[0]) or np.isinf(row[nfin - 1])):
            return med, std, cnt, True
        if nfin > 0:
            mid = row[(nfin - 1) // 2]
        else:
            mid = np.float32(0.0)
        acc1 = np.float32(0.0)
        acc2 = np.float32(0.0)
        for j in range(nfin):
            d = row[j] - mid
            if j == 0:
                acc1 = d
                acc2 = d * d
            else:
                acc1 = acc1 + d
                acc2 = acc2 + d * d
            c1[j] = acc1
            c2[j] = acc2
        lo = 0
        hi = nfin
        md, sd, ct = _row_stats(row, c1, c2, lo, hi, m)
        for _ in range(maxiters):
            lo_thr = np.float32(md - sigma * sd)
            hi_thr = np.float32(md + sigma * sd)
            # number of values < lo_thr and <= hi_thr among the first nfin
            a, b = 0, nfin
            while a < b:
                mid_i = (a + b) >> 1
                if row[mid_i] < lo_thr:
                    a = mid_i + 1
                else:
                    b = mid_i
            new_lo = a
            a, b = 0, nfin
            while a < b:
                mid_i = (a + b) >> 1
                if row[mid_i] <= hi_thr:
                    a = mid_i + 1
                else:
                    b = mid_i
            new_hi = a
            if not np.isfinite(md) or new_hi <= new_lo:
                new_lo, new_hi = lo, hi
            if new_lo == lo and new_hi == hi:
                break
            lo, hi = new_lo, new_hi
            md, sd, ct = _row_stats(row, c1, c2, lo, hi, m)
        med[r] = md
        std[r] = sd
        cnt[r] = ct
    return med, std, cnt, False


@jit
def _row_stats(row, c1, c2, lo, hi, m):
    """Median, std and count of the sorted values ``row[lo:hi]`` (cumulative sums ``c1``, ``c2``)."""
    ct = hi - lo
    if ct <= 0:
        return np.nan, np.nan, ct
    i1 = min(max(lo + (ct - 1) // 2, 0), m - 1)
    i2 = min(max(lo + ct // 2, 0), m - 1)
    md = 0.5 * (np.float64(row[i1]) + np.float64(row[i2]))
    s1 = (np.float64(c1[hi - 1]) if hi > 0 else 0.0) - (np.float64(c1[lo - 1]) if lo > 0 else 0.0)
    s2 = (np.float64(c2[hi - 1]) if hi > 0 else 0.0) - (np.float64(c2[lo - 1]) if lo > 0 else 0.0)
    a = s1 / ct
    var = max(s2 / ct - a * a, 0.0)
    return md, math.sqrt(var), ct


# --------------------------------------------------------------------------- strips
@jit
def cut_cells(img, mask, use_mask, bits, g_col, rn2_col, sat_col, use_sat, major_x, lead, other, jc,
              w_lead, w_other, w1, w2, sky, W, pix_cr, pix_sat, pix_streak, f_off, f_sat, f_cr, f_sat_streak):
    """Strips of sky-subtracted electrons of every (trail, sample) (see :func:`pydriftn.extract.stamps.cut_strips`).

    Parameters
    ----------
    img : 2-d float array (ny, nx), ADU
    mask : 2-d integer array (ny, nx); used if ``use_mask`` (``bits < 0``: any nonzero bit is bad)
    g_col, rn2_col, sat_col : float32 (nx,)
        Gain, read noise squared and saturation level per column (``sat_col`` used if ``use_sat``).
    major_x : bool
        Drift along x (strips cut across y) or along y.
    lead, other : int64 (S, K)
        Along-axis index of the two columns (rows) of each strip.
    jc : int64 (S, K)
        Cross-axis index of the strip's central cell.
    w_lead, w_other, w1, w2 : float64 (S, K)
        Weights of the two columns (``w1 + w2``: the strip's length).
    sky : float32 (S,)
        Sky per pixel (electrons).
    W : int
        Half-width; a strip has ``2 W + 1`` cells.
    pix_cr, pix_sat, pix_streak : int
        Mask bits of cosmic rays, saturated and streak pixels (0: none).
    f_off, f_sat, f_cr, f_sat_streak : int
        Sample flags OFF_IMAGE, SATURATED, COSMIC_RAY, SATELLITE.

    Returns
    -------
    data : float32 (S, K, C)
    var0 : float32 (S, K, 1) with the drift along x (one value per strip), else (S, K, C)
    bad : bool (S, K, C)
    flags : int32 (S, K)
    """
    ny, nx = img.shape
    S, K = lead.shape
    C = 2 * W + 1
    if major_x:
        n_along, n_cross = nx, ny
        Cv = 1
    else:
        n_along, n_cross = ny, nx
        Cv = C
    data = np.empty((S, K, C), dtype=np.float32)
    var0 = np.empty((S, K, Cv), dtype=np.float32)
    bad = np.empty((S, K, C), dtype=np.bool_)
    flags = np.zeros((S, K), dtype=np.int32)
    zero = np.float32(0.0)
    # pixels of one trail: the lead column of every sample and the other column of the last one (where
    # the trail moves by one column per sample the other column of sample k is the lead column of k + 1,
    # so each pixel is read and tested once), and a spare row; value x gain (0 if bad) and bad. (The
    # loops are written out: a helper taking row views costs twice the time.)
    hv = np.empty((K + 2, C), dtype=np.float32)
    hb = np.empty((K + 2, C), dtype=np.bool_)
    for s in range(S):
        skp = max(sky[s], zero)
        for k in range(K + 1):
            if k < K:
                col = min(max(lead[s, k], 0), n_along - 1)
                jj0 = jc[s, k] - W
            else:
                col = min(max(other[s, K - 1], 0), n_along - 1)
                jj0 = jc[s, K - 1] - W
            gx = g_col[col]
            sx = sat_col[col]
            for c in range(C):
                jj = jj0 + c
                jjc = min(max(jj, 0), n_cross - 1)
                if major_x:
                    yy, xx = jjc, col
                else:
                    yy, xx = col, jjc
                    gx = g_col[xx]
                    sx = sat_col[xx]
                val = np.float32(img[yy, xx])
                b = jj < 0 or jj >= n_cross or not np.isfinite(val)
                if use_sat and val >= sx:
                    b = True
                if use_mask:
                    mv = np.int64(mask[yy, xx])
                    if bits < 0:
                        if mv != 0:
                            b = True
                    elif (mv & bits) != 0:
                        b = True
                hv[k, c] = zero if b else val * gx
                hb[k, c] = b
        for k in range(K):
            j0 = jc[s, k]
            cl = lead[s, k]
            co = other[s, k]
            col_l = min(max(cl, 0), n_along - 1)
            col_o = min(max(co, 0), n_along - 1)
            # the other column: the next sample's lead column, or (the chain breaks) on its own in row K + 1
            ko = k + 1
            if k + 1 < K and (col_o != min(max(lead[s, k + 1], 0), n_along - 1) or j0 != jc[s, k + 1]):
                ko = K + 1
                gx = g_col[col_o]
                sx = sat_col[col_o]
                for c in range(C):
                    jj = j0 - W + c
                    jjc = min(max(jj, 0), n_cross - 1)
                    if major_x:
                        yy, xx = jjc, col_o
                    else:
                        yy, xx = col_o, jjc
                        gx = g_col[xx]
                        sx = sat_col[xx]
                    val = np.float32(img[yy, xx])
                    b = jj < 0 or jj >= n_cross or not np.isfinite(val)
                    if use_sat and val >= sx:
                        b = True
                    if use_mask:
                        mv = np.int64(mask[yy, xx])
                        if bits < 0:
                            if mv != 0:
                                b = True
                        elif (mv & bits) != 0:
                            b = True
                    hv[ko, c] = zero if b else val * gx
                    hb[ko, c] = b
            wl = np.float32(w_lead[s, k])
            wo = np.float32(w_other[s, k])
            sk = np.float32(w1[s, k] + w2[s, k]) * sky[s]
            ul = w_lead[s, k] > 1e-9
            uo = w_other[s, k] > 1e-9
            oa = (ul and (cl < 0 or cl >= n_along)) or (uo and (co < 0 or co >= n_along))
            any_bad = False
            for c in range(C):
                d = wl * hv[k, c]
                d = d + wo * hv[ko, c]
                d = d - sk
                bc = oa or (hb[k, c] and ul) or (hb[ko, c] and uo)
                data[s, k, c] = zero if bc else d
                bad[s, k, c] = bc
                any_bad = any_bad or bc
            for c in range(Cv):
                if major_x:
                    xl = col_l
                    xo = col_o
                else:
                    xl = min(max(j0 - W + c, 0), n_cross - 1)
                    xo = xl
                var0[s, k, c] = wl * wl * (rn2_col[xl] + skp) + wo * wo * (rn2_col[xo] + skp)
            fl = np.int32(0)
            if oa or j0 - W < 0 or j0 + W >= n_cross:
                fl |= f_off
            if any_bad:
                # pixel flags of the strips with a bad cell (every cell of a used column, as gathered)
                sat_any = False
                cr_any = False
                streak_any = False
                for h in range(2):
                    if not (ul if h == 0 else uo):
                        continue
                    colc = col_l if h == 0 else col_o
                    for c in range(C):
                        jjc = min(max(j0 - W + c, 0), n_cross - 1)
                        if major_x:
                            yy, xx = jjc, colc
                        else:
                            yy, xx = colc, jjc
                        if use_sat and np.float32(img[yy, xx]) >= sat_col[xx]:
                            sat_any = True
                        if use_mask:
                            mv = np.int64(mask[yy, xx])
                            if (mv & pix_cr) != 0:
                                cr_any = True
                            if (mv & pix_sat) != 0:
                                sat_any = True
                            if (mv & pix_streak) != 0:
                                streak_any = True
                if sat_any:
                    fl |= f_sat
                if cr_any:
                    fl |= f_cr
                if streak_any:
                    fl |= f_sat_streak
            flags[s, k] = fl
    return data, var0, bad, flags


# --------------------------------------------------------------------------- profile
@jit
def profile_design(off, shift, delta_r, u0, bin_px, nb, b_val, b_diff, wy):
    """Design matrix of the profile fit of :func:`pydriftn.extract.profile.measure_profile`.

    The basis (``b_val``, tabulated on ``u0 + bin_px * arange(nb)``, and ``b_diff``, its difference to the
    next node) interpolated linearly at ``u = offset - shift[k] - delta[r]`` of every cell of the reference
    strips. Returns ``X`` (R, K, C, nbas), the same in sample-major order ``Xk`` (K, R * C, nbas) and
    ``Xk`` times the cell weights ``wy`` (R, K, C) in that order — what the numpy code built with a
    gather of the complex table, a transposed copy and a product (same float64 operations).
    """
    R, K, C = off.shape
    nbas = b_val.shape[1]
    X = np.empty((R, K, C, nbas), dtype=np.float64)
    Xk = np.empty((K, R * C, nbas), dtype=np.float64)
    Xkw = np.empty((K, R * C, nbas), dtype=np.float64)
    fmax = nb - 1 - 1e-6
    for r in range(R):
        dr = delta_r[r]
        for k in range(K):
            sk = shift[k]
            for c in range(C):
                u = (off[r, k, c] - sk) - dr
                f = (np.float64(u) - u0) / bin_px
                f = min(max(f, 0.0), fmax)
                i0 = np.int64(np.floor(f))
                fr = f - np.float64(i0)
                w = wy[r, k, c]
                q = r * C + c
                for i in range(nbas):
                    x = b_val[i0, i] + b_diff[i0, i] * fr
                    X[r, k, c, i] = x
                    Xk[k, q, i] = x
                    Xkw[k, q, i] = x * w
    return X, Xk, Xkw


# --------------------------------------------------------------------------- optimal extraction
@jit
def optimal_strips(d, var0, q, bad, P, n_iter, outlier_sigma, sys_frac):
    """Horne optimal extraction of independent strips (:func:`pydriftn.extract.core._optimal_single`).

    The same float32 operations as the numpy code, strip by strip, except that the sums over the
    cells of a strip (``sum P``, ``sum d``, ``sum w P``, ``sum w d``) are accumulated in float64 and
    rounded to float32 (numpy's einsum sums float32 in SIMD lanes): the results agree to float32
    rounding. Per iteration: ``V = max(F, 0) q P + var0``; from the second on, the most deviant
    positive outlier above ``outlier_sigma`` (signed square of the normalised residual, with the
    ``sys_frac`` model term) is masked; ``w = P / V`` (0 at masked cells), ``F = sum w d / sum w P``.

    Returns F (float64, NaN where ``sum w P <= 0``), var_F (float64, inf there), bad (a new array, with
    the rejected cells), w (float32) and ``sum w P`` (float32).
    """
    S, K, C = d.shape
    F_out = np.empty((S, K), dtype=np.float64)
    varF = np.empty((S, K), dtype=np.float64)
    bad_out = np.empty((S, K, C), dtype=np.bool_)
    w = np.empty((S, K, C), dtype=np.float32)
    swp_out = np.empty((S, K), dtype=np.float32)
    zero = np.float32(0.0)
    f005 = np.float32(0.05)
    s2 = np.float32(sys_frac * sys_frac)
    thr = np.float32(outlier_sigma) * np.float32(outlier_sigma)
    n_it = max(n_iter, 1)
    V = np.empty(C, dtype=np.float32)
    z2 = np.empty(C, dtype=np.float32)
    for s in range(S):
        for k in range(K):
            qk = q[s, k]
            sP = 0.0
            sd = 0.0
            for c in range(C):
                b = bad[s, k, c]
                bad_out[s, k, c] = b
                if not b:
                    sP += np.float64(P[s, k, c])
                sd += np.float64(d[s, k, c])
            sP32 = np.float32(sP)
            F = np.float32(np.float32(sd) / max(sP32, f005)) if sP32 > f005 else zero
            swp = zero
            ok = False
            for it in range(n_it):
                Fq = max(F, zero) * qk
                for c in range(C):
                    V[c] = Fq * P[s, k, c] + var0[s, k, c]
                if outlier_sigma != 0 and it >= 1:
                    any_c = False
                    for c in range(C):
                        M = F * P[s, k, c]
                        z = M * M
                        z = z * s2
                        z = z + V[c]
                        r = d[s, k, c] - M
                        z = r / z
                        z = z * abs(r)
                        if bad_out[s, k, c]:
                            z = -np.inf
                        z2[c] = z
                        if z > thr:
                            any_c = True
                    if any_c:
                        # np.argmax: the first NaN, else the first maximum
                        j = 0
                        best = z2[0]
                        if not np.isnan(best):
                            for c in range(1, C):
                                if np.isnan(z2[c]):
                                    j = c
                                    break
                                if z2[c] > best:
                                    best = z2[c]
                                    j = c
                        bad_out[s, k, j] = True
                a = 0.0
                bsum = 0.0
                for c in range(C):
                    wc = (zero if bad_out[s, k, c] else P[s, k, c]) / V[c]
                    w[s, k, c] = wc
                    a += np.float64(wc * P[s, k, c])
                    bsum += np.float64(wc * d[s, k, c])
                swp = np.float32(a)
                ok = swp > zero
                F = np.float32(np.float32(bsum) / swp) if ok else zero
            swp_out[s, k] = swp
            if ok:
                varF[s, k] = 1.0 / np.float64(swp)
                F_out[s, k] = np.float64(F)
            else:
                varF[s, k] = np.inf
                F_out[s, k] = np.nan
    return F_out, varF, bad_out, w, swp_out


# --------------------------------------------------------------------------- de-blending
@jit
def _nan_max(a, b):
    """``np.maximum`` of two floats (NaN if either is NaN)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@jit
def joint_strips(data, var0, q, bad, s_idx, k_idx, P, Ab, rows, cols, n_iter, outlier_sigma, sys_frac):
    """Joint weighted least squares of a star's and its neighbours' amplitudes per strip
    (:func:`pydriftn.extract.core._joint_solve` with every column active, for up to 3 columns).

    Parameters
    ----------
    data, var0 : float32 (S, K, C)
        The strips (``var0`` may be a broadcast view).
    q : float32 (S, K)
    bad : bool (S, K, C)
    s_idx, k_idx : int64 (Q,)
        The strips to fit.
    P : float32 (S, K, C)
        The stars' unit-flux profiles (column 0 of the fit).
    Ab : float32 (n, M, C)
        Neighbour profiles; strip ``i`` uses rows ``rows[i]`` and columns ``cols[i, :]`` (at most 2).

    The same float32 operations as the numpy code, strip by strip (model, variance, the rejection of
    the worst positive outlier from the second pass on, weights), except that the sums over the cells
    (normal equations, right-hand sides, ``sum P``, ``sum d``) are accumulated in float64 and rounded to
    float32 (numpy's einsum sums float32 in SIMD lanes): the results agree to float32 rounding. Empty
    columns are decoupled, a 1e-6 ridge added, and the system solved in closed form (adjugate).

    Returns F (float64: the star's amplitude), its variance (inf if its column is empty), bad (new array).
    """
    Q = s_idx.shape[0]
    C = data.shape[2]
    M1 = cols.shape[1] + 1
    F = np.empty(Q, dtype=np.float64)
    cov = np.empty(Q, dtype=np.float64)
    bad_out = np.empty((Q, C), dtype=np.bool_)
    A = np.empty((M1, C), dtype=np.float32)
    d = np.empty(C, dtype=np.float32)
    v0 = np.empty(C, dtype=np.float32)
    zero = np.float32(0.0)
    f005 = np.float32(0.05)
    s2 = np.float32(sys_frac * sys_frac)
    thr = np.float32(outlier_sigma) * np.float32(outlier_sigma)
    M = np.empty(C, dtype=np.float32)
    V = np.empty(C, dtype=np.float32)
    w = np.empty(C, dtype=np.float32)
    z2 = np.empty(C, dtype=np.float32)
    amps = np.zeros(3, dtype=np.float64)
    N = np.zeros((3, 3), dtype=np.float64)
    rhs = np.zeros(3, dtype=np.float64)
    diag = np.zeros(3, dtype=np.float64)
    empty = np.zeros(3, dtype=np.bool_)
    for i in range(Q):
        si = s_idx[i]
        ki = k_idx[i]
        qi = q[si, ki]
        for c in range(C):
            d[c] = data[si, ki, c]
            v0[c] = var0[si, ki, c]
            bad_out[i, c] = bad[si, ki, c]
            A[0, c] = P[si, ki, c]
        for m in range(1, M1):
            for c in range(C):
                A[m, c] = Ab[rows[i], cols[i, m - 1], c]
        sP = 0.0
        sd = 0.0
        for c in range(C):
            if not bad_out[i, c]:
                sP += np.float64(A[0, c])
            sd += np.float64(d[c])
        sP32 = np.float32(sP)
        amps[0] = np.float64(np.float32(sd) / max(sP32, f005)) if sP32 > f005 else 0.0
        for m in range(1, M1):
            amps[m] = 0.0
        c00 = 0.0
        for it in range(n_iter + 1):
            for c in range(C):
                mc = A[0, c] * np.float32(amps[0])
                for m in range(1, M1):
                    mc = mc + A[m, c] * np.float32(amps[m])
                M[c] = mc
                V[c] = qi * max(mc, zero) + v0[c]
            if outlier_sigma != 0 and it >= 1:
                any_c = False
                for c in range(C):
                    z = M[c] * M[c]
                    z = z * s2
                    z = z + V[c]
                    r = d[c] - M[c]
                    z = r / z
                    z = z * abs(r)
                    if bad_out[i, c]:
                        z = -np.inf
                    z2[c] = z
                    if z > thr:
                        any_c = True
                if any_c:
                    j = 0
                    best = z2[0]
                    if not np.isnan(best):
                        for c in range(1, C):
                            if np.isnan(z2[c]):
                                j = c
                                break
                            if z2[c] > best:
                                best = z2[c]
                                j = c
                    bad_out[i, j] = True
            for c in range(C):
                w[c] = zero if bad_out[i, c] else np.float32(1.0) / V[c]
            for m in range(M1):
                acc_r = 0.0
                for c in range(C):
                    acc_r += np.float64((w[c] * A[m, c]) * d[c])
                rhs[m] = np.float64(np.float32(acc_r))
                for l in range(m, M1):
                    acc = 0.0
                    for c in range(C):
                        acc += np.float64((w[c] * A[m, c]) * A[l, c])
                    N[m, l] = np.float64(np.float32(acc))
                    N[l, m] = N[m, l]
            any_empty = False
            for m in range(M1):
                diag[m] = N[m, m]
                empty[m] = not (diag[m] > 0)
                any_empty = any_empty or empty[m]
            if any_empty:
                for m in range(M1):
                    for l in range(M1):
                        N[m, l] = N[m, l] * (0.0 if (empty[m] or empty[l]) else 1.0) + (1.0 if (empty[m] and m == l) else 0.0)
            dmax = diag[0]
            for m in range(1, M1):
                dmax = _nan_max(dmax, diag[m])
            ridge = 1e-6 * _nan_max(dmax, 1e-30)
            for m in range(M1):
                N[m, m] += ridge
                if empty[m]:
                    rhs[m] = 0.0
            if M1 == 1:
                a = N[0, 0]
                amps[0] = rhs[0] / a
                c00 = 1.0 / a
            elif M1 == 2:
                a, b, dd = N[0, 0], N[0, 1], N[1, 1]
                det = a * dd - b * b
                r0, r1 = rhs[0], rhs[1]
                amps[0] = (dd * r0 - b * r1) / det
                amps[1] = (a * r1 - b * r0) / det
                c00 = dd / det
            else:
                a, b, cc = N[0, 0], N[0, 1], N[0, 2]
                e, f, ii = N[1, 1], N[1, 2], N[2, 2]
                A00 = e * ii - f * f
                A01 = cc * f - b * ii
                A02 = b * f - cc * e
                A11 = a * ii - cc * cc
                A12 = b * cc - a * f
                A22 = a * e - b * b
                det = a * A00 + b * A01 + cc * A02
                r0, r1, r2 = rhs[0], rhs[1], rhs[2]
                amps[0] = (A00 * r0 + A01 * r1 + A02 * r2) / det
                amps[1] = (A01 * r0 + A11 * r1 + A12 * r2) / det
                amps[2] = (A02 * r0 + A12 * r1 + A22 * r2) / det
                c00 = A00 / det
        F[i] = amps[0]
        cov[i] = np.inf if empty[0] else c00
    return F, cov, bad_out


# --------------------------------------------------------------------------- profile evaluation
@jit
def table_cells(tc, psi, k_rows, u0, h, pad, step, W, reach, n_start):
    """Profile of the cells of every strip: :meth:`pydriftn.extract.profile.CrossProfile.strip_profile`
    without a per-strip normalisation (``normalise='total'`` or None).

    ``tc`` is the complex table ``value + 1j * (next - value)`` (K, nbp) complex64; ``psi``, ``k_rows``
    (n,) the strips' offsets and table rows. Cell ``c`` of a strip is ``tc[k, start + step * c]``
    interpolated at the fraction of ``psi`` between nodes: ``imag * fr + real`` in float32 (0 where
    ``|psi| > reach``), as the numpy strided gather computed it. Returns (n, 2 W + 1) float32.
    """
    n = psi.shape[0]
    C = 2 * W + 1
    out = np.empty((n, C), dtype=np.float32)
    for i in range(n):
        ps = psi[i]
        far = not (abs(ps) <= reach)
        g = ((0.0 if far else ps) - u0) / h + pad
        i0 = np.floor(g)
        fr = np.float32(g - i0)
        start = min(max(np.int64(i0) - step * W, 0), n_start - 1)
        k = k_rows[i]
        for c in range(C):
            if far:
                out[i, c] = np.float32(0.0)
            else:
                v = tc[k, start + step * c]
                out[i, c] = v.imag * fr + v.real
    return out


@jit
def fwhm_rows(table, u):
    """FWHM of each row of ``table`` (float32, on the grid ``u``): the half-maximum crossings either side
    of the first maximum, linearly interpolated (NaN without both) — the per-row numpy loop of
    :func:`pydriftn.extract.profile._fwhm_of_table`, with its float32/float64 arithmetic."""
    n, m = table.shape
    out = np.empty(n, dtype=np.float64)
    for r in range(n):
        t = table[r]
        i = 0  # np.argmax: the first NaN, else the first maximum
        if not np.isnan(t[0]):
            for j in range(1, m):
                if np.isnan(t[j]):
                    i = j
                    break
                if t[j] > t[i]:
                    i = j
        half = np.float32(0.5) * t[i]
        if half <= 0:
            out[r] = np.nan
            continue
        a = -1
        for j in range(i - 1, -1, -1):
            if t[j] < half:
                a = j
                break
        b = -1
        for j in range(i, m):
            if t[j] < half:
                b = j
                break
        if a < 0 or b < 0:
            out[r] = np.nan
            continue
        xl = u[a] + (half - t[a]) / (t[a + 1] - t[a]) * (u[a + 1] - u[a])
        xr = u[b - 1] + (t[b - 1] - half) / (t[b - 1] - t[b]) * (u[b] - u[b - 1])
        out[r] = xr - xl
    return out
