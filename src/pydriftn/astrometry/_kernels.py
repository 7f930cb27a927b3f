"""Compiled kernels (numba, :func:`pydriftn._jit.jit`) of the astrometry stage.

Each replaces a numpy expression that built several full-size (or
stars x samples) temporaries, with one pass over the data; the arithmetic is
the same, in the same order and precision, so the results are identical
(``tests/test_astrometry.py`` compares every kernel with the numpy expression
it replaced):

* :func:`bin2_mean` / :func:`bin2_any`: the 2x2 block means of the image and
  the 2x2 OR of the bad-pixel mask on which :func:`.detect.estimate_background`
  runs ``sep`` (were ``_bin2`` by strided adds, then a scaling pass);
* :func:`subtract_back2`: ``data - background`` with the background on the
  2x2 grid (estimated on every ``row_step``-th binned row), and the binned
  ``sub`` for the matched filter, in one pass (were a repeat of the background
  along y, another along x, a broadcast subtraction and two passes over the
  binned image);
* :func:`sample_snapped`: a trail's window of whole pixels with its validity
  and on-CCD flags (:func:`.trailfit._sample` on snapped grids: was a
  sliding-window gather, a masked copy, and per-sample flat indices for the
  windows reaching beyond the CCD);
* :func:`template_sums`: the sums of a trail's unit template over its valid
  samples, ``sum T^2``, ``sum T^3`` and ``sum T d`` (:func:`.trailfit.solve_fluxes`:
  were a product with the validity and three einsums); float64 accumulation
  like the einsums, which sum in a different order: equal to ~1e-16 relative.

Measured on a full-size simulated CCD (N4 unit, process CPU, machine shared):
see the module's commit messages.
"""

from __future__ import annotations

import numpy as np

from .._jit import jit

__all__ = ["bin2_mean", "bin2_any", "subtract_back2", "sample_snapped", "cross_args", "mix_components",
           "template_sums"]


@jit
def bin2_mean(d, out):
    """``out[j, i] = (((d[2j, 2i] + d[2j+1, 2i]) + d[2j, 2i+1]) + d[2j+1, 2i+1]) * 0.25`` (float32)."""
    ny2, nx2 = out.shape
    q = np.float32(0.25)
    for j in range(ny2):
        r0 = d[2 * j]
        r1 = d[2 * j + 1]
        o = out[j]
        for i in range(nx2):
            s = r0[2 * i] + r1[2 * i]
            s += r0[2 * i + 1]
            s += r1[2 * i + 1]
            o[i] = s * q
    return out


@jit
def bin2_any(m, out):
    """``out[j, i]``: any of the 2x2 block ``m[2j:2j+2, 2i:2i+2]``."""
    ny2, nx2 = out.shape
    mu = m.view(np.uint8)  # (bitwise OR of bytes: no branches)
    for j in range(ny2):
        r0 = mu[2 * j]
        r1 = mu[2 * j + 1]
        o = out[j]
        for i in range(nx2):
            o[i] = (r0[2 * i] | r1[2 * i] | r0[2 * i + 1] | r1[2 * i + 1]) != 0
    return out


@jit
def subtract_back2(d, back, rs, sub, b2, do_b2):
    """``sub = d - back2`` (float32), ``back2`` the background on the 2x2 grid, 2x2 repeated.

    ``back2[j] = back[j // rs]`` (the background estimated on every ``rs``-th
    binned row). With ``do_b2``, also ``b2 = (b2 - back2) * 4`` in place.
    """
    ny2 = d.shape[0] // 2
    nx2 = back.shape[1]
    four = np.float32(4.0)
    for j in range(ny2):
        bk = back[j // rs]
        for r in range(2):
            dr = d[2 * j + r]
            sr = sub[2 * j + r]
            for i in range(nx2):
                v = bk[i]
                sr[2 * i] = dr[2 * i] - v
                sr[2 * i + 1] = dr[2 * i + 1] - v
        if do_b2:
            br = b2[j]
            for i in range(nx2):
                br[i] = (br[i] - bk[i]) * four
    return sub


@jit
def gauss_rows(a, w, out):
    """Weighted sum of shifted rows, ``a`` reflected at its ends (``np.pad`` mode 'symmetric'), float32.

    ``out[i] = a[i] * w[r] + sum_k (a[i - k] + a[i + k]) * w[r + k]``, ``k = 1..r`` added in order,
    ``r = (len(w) - 1) / 2`` (needs ``a.shape[0] > r``).
    """
    n, m = a.shape
    r = (w.shape[0] - 1) // 2
    for i in range(n):
        o = out[i]
        c = a[i]
        wr = w[r]
        for j in range(m):
            o[j] = c[j] * wr
        for k in range(1, r + 1):
            lo = i - k
            if lo < 0:
                lo = -lo - 1
            hi = i + k
            if hi >= n:
                hi = 2 * n - 1 - hi
            al = a[lo]
            ah = a[hi]
            wk = w[r + k]
            for j in range(m):
                o[j] += (al[j] + ah[j]) * wk
    return out


@jit
def local_maxima(snr, threshold, exclude, hy, hx):
    """Flat indices (row-major order) of the pixels of ``snr`` above ``threshold`` (and not ``exclude``)
    that are ``>=`` every other pixel of the ``(2 hy + 1) x (2 hx + 1)`` window about them.

    Pixels beyond the image count as ``-inf``; a NaN neighbour fails the test.
    ``exclude`` of shape (0, 0): nothing excluded.
    """
    ny, nx = snr.shape
    use_ex = exclude.shape[0] > 0
    out = np.empty(ny * nx, np.int64)
    cnt = 0
    for y in range(ny):
        for x in range(nx):
            v = snr[y, x]
            if not v > threshold:
                continue
            if use_ex and exclude[y, x]:
                continue
            ok = True
            # the 3x3 neighbours first (most pixels fail there), then the whole window
            for st in range(2):
                ry = 1 if st == 0 else hy
                rx = 1 if st == 0 else hx
                for yy in range(max(y - ry, 0), min(y + ry + 1, ny)):
                    for xx in range(max(x - rx, 0), min(x + rx + 1, nx)):
                        if yy == y and xx == x:
                            continue
                        if not v >= snr[yy, xx]:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                out[cnt] = y * nx + x
                cnt += 1
    return out[:cnt].copy()


@jit
def sample_snapped(image, bad, xi0, yi0, ox, oy, vals, valid, inside):
    """Whole-pixel trail windows: sample ``(k, a, b)`` at pixel ``(xi0[k] + ox[a, b], yi0[k] + oy[a, b])``.

    ``valid`` = on the CCD and not ``bad`` (``bad`` of shape (0, 0): none bad),
    ``vals`` = the pixel where valid, else 0; ``inside`` (on the CCD) is filled
    when it has the shape of ``vals`` (shape (0, 0, 0): not wanted).
    """
    ny, nx = image.shape
    n, n_p, n_q = vals.shape
    m = n_p * n_q
    use_bad = bad.shape[0] > 0
    want_in = inside.shape[0] > 0
    img = image.ravel()
    bd = bad.ravel()
    oxf = ox.ravel()
    oyf = oy.ravel()
    off = oyf * nx + oxf  # flat offsets
    vf = vals.reshape(n, m)
    ok_f = valid.reshape(n, m)
    in_f = inside.reshape(inside.shape[0], m)
    xlo, xhi, ylo, yhi = oxf.min(), oxf.max(), oyf.min(), oyf.max()
    for k in range(n):
        x0 = xi0[k]
        y0 = yi0[k]
        vk = vf[k]
        okk = ok_f[k]
        if x0 + xlo >= 0 and x0 + xhi < nx and y0 + ylo >= 0 and y0 + yhi < ny:
            base = y0 * nx + x0
            if want_in:
                in_f[k, :] = True
            if use_bad:
                for j in range(m):
                    idx = base + off[j]
                    g = not bd[idx]
                    okk[j] = g
                    vk[j] = img[idx] if g else 0
            else:
                for j in range(m):
                    okk[j] = True
                    vk[j] = img[base + off[j]]
            continue
        for j in range(m):  # window reaching beyond the CCD: bounds per sample
            x = x0 + oxf[j]
            y = y0 + oyf[j]
            ins = x >= 0 and x < nx and y >= 0 and y < ny
            g = ins
            if ins and use_bad:
                g = not bd[y * nx + x]
            if want_in:
                in_f[k, j] = ins
            okk[j] = g
            vk[j] = img[y * nx + x] if g else 0
    return vals


@jit
def cross_args(Q, qc, coef, out):
    """``out[k, i, a, b] = ((Q[b] - qc[i, a]) ** 2) * coef[k]`` (float32): the exponents of the PSF cross profiles."""
    nk, n, n_p, n_q = out.shape
    for k in range(nk):
        ck = coef[k]
        ok = out[k]
        for i in range(n):
            for a in range(n_p):
                c = qc[i, a]
                o = ok[i, a]
                for b in range(n_q):
                    u = Q[b] - c
                    o[b] = (u * u) * ck
    return out


@jit
def mix_components(ex, along, out):
    """``out = ex[0] * along[0] + ex[1] * along[1] + ...`` (float32, ``along`` per ``(i, a)``, added in order)."""
    nk, n, n_p, n_q = ex.shape
    for i in range(n):
        for a in range(n_p):
            w0 = along[0, i, a]
            for b in range(n_q):
                out[i, a, b] = ex[0, i, a, b] * w0
            for k in range(1, nk):
                w = along[k, i, a]
                for b in range(n_q):
                    out[i, a, b] += ex[k, i, a, b] * w
    return out


@jit
def template_sums(T, valid, vals, Aii, S3, bsum):
    """``T *= valid`` in place; per trail ``Aii = sum T^2``, ``S3 = sum T^3``, ``bsum = sum T vals`` (float64)."""
    n, m = T.shape
    for k in range(n):
        a = 0.0
        s3 = 0.0
        bb = 0.0
        for j in range(m):
            if valid[k, j]:
                t = T[k, j]
                t2 = np.float64(t) * np.float64(t)
                a += t2
                s3 += t2 * np.float64(t)
                bb += np.float64(t) * np.float64(vals[k, j])
            else:
                T[k, j] = 0
        Aii[k] = a
        S3[k] = s3
        bsum[k] = bb
    return T
