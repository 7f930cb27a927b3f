"""Compiled kernels (numba, :func:`pydriftn._jit.jit`) of the astrometry stage.

Why compiled: what was left of the stage's cost after the numpy-level tuning
was loops that built several full-size (8 M pixels) or stars x samples
(2000 x 825) temporaries, one numpy pass each; every kernel here does such a
loop in one pass (or a cache-sized chunk at a time). ``sep`` (the background
meshes), scipy's ``ndtr`` and numpy's vectorised ``exp`` stay as they were.
``tests/test_astrometry.py`` compares every kernel with the numpy expression
it replaced (random inputs, edges, empty inputs, masked pixels).

Identical results (same operations, same order, same precision):

* :func:`bin2_mean`, :func:`bin2_any`, :func:`subtract_back2`
  (:func:`.detect.estimate_background`): the 2x2 means / ORs that ``sep``
  runs on, and ``data - background`` with the background estimated on every
  ``row_step``-th binned row plus the binned ``sub`` for the matched filter in
  one pass (were strided adds, a scaling pass, two repeats of the background
  maps, a broadcast subtraction and two passes over the binned image);
* :func:`gauss_rows`, :func:`bin_more`, :func:`divide_by_noise`
  (:func:`.detect.matched_filter_snr`): the Gaussian across rows with the
  reflection by index (was a padded copy and a temporary per tap), the
  ``fy x fx`` blocks, the division by the block noise;
* :func:`label_boxes` (:func:`.detect.find_streaks`): connected regions
  numbered as ``ndimage.label`` does, with ``find_objects``' boxes, so only
  the long regions reach Python;
* :func:`local_maxima` (:func:`.detect.find_candidates`): the window
  maximum test of the pixels above threshold (was a padded copy and one take
  per neighbour);
* :func:`sample_snapped`, :func:`sampled_template_sums`
  (:func:`.trailfit._sample`, :func:`.trailfit.solve_fluxes`): trail windows
  of whole pixels with validity and on-CCD flags (was a sliding-window
  gather, a masked copy and per-sample indices at the edges);
* :func:`cross_args`, :func:`mix_components`
  (:func:`.trailfit._model_on_grid`): the trail templates' cross-profile
  exponents and the weighted sum of the mixture components around numpy's
  float32 ``exp``;
* :func:`saturated_columns` (:func:`.trailfit._ndtr_along`);
* :func:`neighbour_sum` (:func:`.trailfit.neighbour_models`): the
  overlapping sources' models summed per target in ``np.add.reduceat``'s
  order (the first, plus numpy's pairwise sum of the others).

Equal to float64 rounding (float64 sums taken in order, where numpy's
einsum / matmul sum with SIMD lanes and FMA in a CPU-dependent order):
:func:`template_sums` / :func:`sampled_template_sums` (the flux solve's
``sum T^2``, ``sum T^3``, ``sum T d``: fluxes within 6e-11 relative, through
the sparse solve's conditioning), :func:`cross_exponent` / :func:`cross_sums`,
:func:`along_normal` and :func:`fit_inputs` (:func:`.trailfit.fit_trails`:
fitted positions within 2e-12 px, WCS terms within 3e-11 relative on the
pipeline's full-size CCDs).

Speed-up measured: ``solve_exposure_ccd`` inside the pipeline's units
(``run_unit``, full-size simulated CCDs with ~2000 trails, median of 5,
process CPU, the old and new code alternated on a shared, loaded machine):
N4 ~172-182 -> ~132-143 ms, S4 ~186-199 -> ~154-169 ms (about -22 %); per
function on the same CCD: background 60 -> 34 ms, flux solve 32 -> 20 ms,
trail fits -25 %, matched filter 7.8 -> 5.0 ms, candidates 3.8 -> 1.9 ms,
streak search 6.8 -> 4.4 ms.
"""

from __future__ import annotations

import numpy as np

from .._jit import jit

__all__ = ["bin2_mean", "bin2_any", "subtract_back2", "gauss_rows", "bin_more", "divide_by_noise", "label_boxes",
           "local_maxima", "saturated_columns", "sample_snapped", "sampled_template_sums", "fit_inputs",
           "neighbour_sum", "cross_args", "mix_components", "cross_exponent", "cross_sums", "along_normal",
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
def bin_more(a, fy, fx, out):
    """Blocks of ``fy x fx`` pixels from 2x2 block sums ``a`` (``fy, fx`` in {2, 4}): pairs of columns
    (``fx = 4``) then of rows (``fy = 4``) added, a missing last column / row counting as 0 (float32)."""
    ny, nx = a.shape
    cy = fy // 2
    cx = fx // 2
    zero = np.float32(0.0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = zero
            for r in range(cy):
                y = cy * i + r
                if cx == 2:
                    x = 2 * j
                    if y < ny:
                        w = a[y, x] + (a[y, x + 1] if x + 1 < nx else zero)
                    else:
                        w = zero + zero
                else:
                    w = a[y, j] if y < ny else zero
                v = w if r == 0 else v + w
            out[i, j] = v
    return out


@jit
def divide_by_noise(f, rms, sy, sx, c, g):
    """``f /= (c * rms_b) * g`` in place (float32), ``rms_b[i, j] = rms[min(i, n0 - 1) sy, min(j, n1 - 1) sx]``
    (``rms[::sy, ::sx]`` of shape ``(n0, n1)`` extended by its last row and column)."""
    n0 = (rms.shape[0] + sy - 1) // sy
    n1 = (rms.shape[1] + sx - 1) // sx
    for i in range(f.shape[0]):
        y = min(i, n0 - 1) * sy
        for j in range(f.shape[1]):
            x = min(j, n1 - 1) * sx
            f[i, j] /= (c * rms[y, x]) * g
    return f


@jit
def label_boxes(det):
    """Connected regions (4-connectivity) of ``det``, as ``scipy.ndimage.label`` numbers them (1, 2, ...
    in the raster order of their first pixel), and their bounding boxes.

    Two passes: provisional labels (from the left and upper neighbours, equivalences in a union-find
    table whose roots are the smallest, i.e. first-created, label of a region), then the final labels.

    Returns ``lab`` (int32), the number of regions and ``boxes`` (int64, ``(n, 4)``: first row, last row + 1,
    first column, last column + 1; ``ndimage.find_objects``' slices).
    """
    ny, nx = det.shape
    lab = np.zeros((ny, nx), np.int32)
    cap = 1024
    parent = np.empty(cap, np.int32)
    parent[0] = 0
    nprov = 0
    for y in range(ny):
        row = lab[y]
        up = lab[y - 1] if y > 0 else row
        d = det[y]
        for x in range(nx):
            if not d[x]:
                continue
            lw = row[x - 1] if x > 0 else 0
            u = up[x] if y > 0 else 0
            if lw == 0 and u == 0:
                nprov += 1
                if nprov >= cap:
                    cap *= 2
                    npar = np.empty(cap, np.int32)
                    npar[:nprov] = parent[:nprov]
                    parent = npar
                parent[nprov] = nprov
                row[x] = nprov
            elif u == 0:
                row[x] = lw
            elif lw == 0 or lw == u:
                row[x] = u
            else:
                row[x] = _union(parent, lw, u)
    # final labels: the roots in order of creation
    final = np.zeros(nprov + 1, np.int32)
    nlab = 0
    for k in range(1, nprov + 1):
        r = _find(parent, k)
        if r == k:
            nlab += 1
            final[k] = nlab
        else:
            final[k] = final[r]
    boxes = np.empty((nlab, 4), np.int64)
    boxes[:, 0] = ny
    boxes[:, 1] = 0
    boxes[:, 2] = nx
    boxes[:, 3] = 0
    for y in range(ny):
        row = lab[y]
        for x in range(nx):
            k = row[x]
            if k == 0:
                continue
            f = final[k]
            row[x] = f
            bx = boxes[f - 1]
            if y < bx[0]:
                bx[0] = y
            bx[1] = y + 1
            if x < bx[2]:
                bx[2] = x
            if x + 1 > bx[3]:
                bx[3] = x + 1
    return lab, nlab, boxes


@jit
def _find(parent, p):
    r = p
    while parent[r] != r:
        r = parent[r]
    while parent[p] != r:  # path compression
        q = parent[p]
        parent[p] = r
        p = q
    return r


@jit
def _union(parent, a, b):
    """Merge the sets of ``a`` and ``b`` (the smaller root becomes the root); returns the root."""
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


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
def saturated_columns(z, one_at, zero_at):
    """``(c0, c1)``: the number of columns of ``z`` whose every row is ``<= zero_at`` and ``m`` minus the number
    of columns whose every row is ``>= one_at`` (NaN fails both), in one pass without temporaries."""
    n, m = z.shape
    n_one = 0
    n_zero = 0
    for j in range(m):
        all_one = True
        all_zero = True
        for i in range(n):
            v = z[i, j]
            if not v >= one_at:
                all_one = False
            if not v <= zero_at:
                all_zero = False
            if not (all_one or all_zero):
                break
        n_one += all_one
        n_zero += all_zero
    return n_zero, m - n_one


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
def sampled_template_sums(image, bad, xi0, yi0, ox, oy, T, valid, Aii, S3, bsum):
    """:func:`sample_snapped` and :func:`template_sums` in one pass, without storing the samples.

    ``valid[k, j]`` = pixel ``(xi0[k] + ox[j], yi0[k] + oy[j])`` on the CCD and not ``bad``; ``T`` zeroed
    where not valid; ``Aii = sum T^2``, ``S3 = sum T^3``, ``bsum = sum T * pixel`` (float64, in order).
    """
    ny, nx = image.shape
    n, m = T.shape
    use_bad = bad.shape[0] > 0
    img = image.ravel()
    bd = bad.ravel()
    oxf = ox.ravel()
    oyf = oy.ravel()
    off = oyf * nx + oxf
    xlo, xhi, ylo, yhi = oxf.min(), oxf.max(), oyf.min(), oyf.max()
    for k in range(n):
        x0 = xi0[k]
        y0 = yi0[k]
        tk = T[k]
        vk = valid[k]
        inner = x0 + xlo >= 0 and x0 + xhi < nx and y0 + ylo >= 0 and y0 + yhi < ny
        base = y0 * nx + x0
        a = 0.0
        s3 = 0.0
        bb = 0.0
        for j in range(m):
            if inner:
                idx = base + off[j]
                g = True
            else:
                x = x0 + oxf[j]
                y = y0 + oyf[j]
                g = x >= 0 and x < nx and y >= 0 and y < ny
                idx = y * nx + x
            if g and use_bad:
                g = not bd[idx]
            vk[j] = g
            if g:
                t = np.float64(tk[j])
                t2 = t * t
                a += t2
                s3 += t2 * t
                bb += t * np.float64(img[idx])
            else:
                tk[j] = 0
        Aii[k] = a
        S3[k] = s3
        bsum[k] = bb
    return T


@jit
def fit_inputs(vals, valid, neighbours, rms, gain, var, vf, nval, prof_u, pvar_u):
    """The inputs of the profile fits, in one pass over the ``(n, p, q)`` samples.

    ``vals`` (float64): minus ``neighbours`` (same shape; shape (0, 0, 0): none) where valid, 0 elsewhere
    (in place); ``var = (rms[i] ** 2 + max(vals, 0) / gain) * valid``; ``vf`` = validity as 0/1;
    per ``(i, p)`` the sums across of ``vf``, ``vals`` and ``var`` (float64, in order).
    """
    n, n_p, n_q = vals.shape
    use_nb = neighbours.shape[0] > 0
    for i in range(n):
        r2 = rms[i] ** 2
        for a in range(n_p):
            s_n = 0.0
            s_v = 0.0
            s_w = 0.0
            for b in range(n_q):
                ok = valid[i, a, b]
                v = vals[i, a, b]
                if use_nb:
                    v = v - neighbours[i, a, b] if ok else 0.0
                    vals[i, a, b] = v
                f = 1.0 if ok else 0.0
                pos = v if (v >= 0.0 or v != v) else 0.0
                w = (r2 + pos / gain) * f
                var[i, a, b] = w
                vf[i, a, b] = f
                s_n += f
                s_v += v
                s_w += w
            nval[i, a] = s_n
            prof_u[i, a] = s_v
            pvar_u[i, a] = s_w


@jit
def _pair_value(src, rows, dp, dq, scale, use_scale, k, a, b):
    """Source ``rows[k]``'s sample ``(a + dp[k], b + dq[k])`` (0 beyond its grid), times ``scale[k]``."""
    n_p, n_q = src.shape[1], src.shape[2]
    sa = a + dp[k]
    sb = b + dq[k]
    ok = sa >= 0 and sa < n_p and sb >= 0 and sb < n_q
    sa = min(max(sa, 0), n_p - 1)
    sb = min(max(sb, 0), n_q - 1)
    if use_scale:
        g = np.float32(np.float64(src[rows[k], sa, sb]) * scale[k])
    else:
        g = np.float32(src[rows[k], sa, sb])
    return g * np.float32(ok)


@jit
def neighbour_sum(src, rows, ti, dp, dq, scale, use_scale, starts, out):
    """Sum of the overlapping sources' models on each target's grid (:func:`.trailfit.neighbour_models`).

    Pair ``k`` (sorted by target): target ``ti[k]``'s sample ``(a, b)`` takes source row ``rows[k]``'s sample
    ``(a + dp[k], b + dq[k])`` (0 beyond its grid), times ``scale[k]`` (product in float64, rounded to
    float32) when ``use_scale``. The pairs of a target (``starts[t]`` to the next start) are added in float32
    in the order of ``np.add.reduceat`` along the pairs: the first, plus numpy's pairwise sum of the others
    (sequential from -0.0 below 8 terms; 8 accumulators up to 128; the caller uses numpy beyond).
    """
    n_p, n_q = src.shape[1], src.shape[2]
    nstart = starts.shape[0]
    npair = ti.shape[0]
    r = np.empty(8, np.float32)
    for t in range(nstart):
        k0 = starts[t]
        k1 = starts[t + 1] if t + 1 < nstart else npair
        o = out[ti[k0]]
        m = k1 - k0 - 1  # the terms of the pairwise sum
        for a in range(n_p):
            for b in range(n_q):
                first = _pair_value(src, rows, dp, dq, scale, use_scale, k0, a, b)
                if m == 0:
                    o[a, b] = first
                    continue
                if m < 8:
                    res = np.float32(-0.0)
                    for i in range(m):
                        res += _pair_value(src, rows, dp, dq, scale, use_scale, k0 + 1 + i, a, b)
                else:
                    for j in range(8):
                        r[j] = _pair_value(src, rows, dp, dq, scale, use_scale, k0 + 1 + j, a, b)
                    i = 8
                    while i < m - (m % 8):
                        for j in range(8):
                            r[j] += _pair_value(src, rows, dp, dq, scale, use_scale, k0 + 1 + i + j, a, b)
                        i += 8
                    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
                    while i < m:
                        res += _pair_value(src, rows, dp, dq, scale, use_scale, k0 + 1 + i, a, b)
                        i += 1
                o[a, b] = first + res
    return out


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
def cross_exponent(Q, qc, s, out):
    """``out[i, a, b] = (((Q[b] - qc[i, a]) / s[i]) ** 2) * -0.5``: the exponent of the PSF cross profile."""
    n, n_p, n_q = out.shape
    for i in range(n):
        si = s[i]
        for a in range(n_p):
            c = qc[i, a]
            o = out[i, a]
            for b in range(n_q):
                u = (Q[b] - c) / si
                o[b] = (u * u) * -0.5
    return out


@jit
def cross_sums(e, c, valid, vals, var, cov_q, nq, prof, pvar):
    """Per ``(i, a)``, with ``g = e[i, a, :] * c[i]`` (the cross profile) and ``w = g * valid``:
    ``cov_q = sum w g``, ``nq = sum w``, ``prof = sum vals w``, ``pvar = sum var w w`` (float64, in order)."""
    n, n_p, n_q = e.shape
    for i in range(n):
        ci = c[i]
        for a in range(n_p):
            s_c = 0.0
            s_n = 0.0
            s_p = 0.0
            s_v = 0.0
            for b in range(n_q):
                g = e[i, a, b] * ci
                w = g * valid[i, a, b]
                s_c += w * g
                s_n += w
                s_p += vals[i, a, b] * w
                s_v += (var[i, a, b] * w) * w
            cov_q[i, a] = s_c
            nq[i, a] = s_n
            prof[i, a] = s_p
            pvar[i, a] = s_v


@jit
def along_normal(cov_q, shape, pdf_a, pdf_b, nq, wt, prof, h, b, model, JtWJ, JtWr, do_r):
    """One Gauss-Newton step of the along-track profile fit: the model ``h cov_q shape + b nq``, and per trail
    the normal matrix ``J^T W J`` and (with ``do_r``) ``J^T W (prof - model)`` of the Jacobian columns
    ``cov_q shape, -h cov_q pdf_a, h cov_q pdf_b, nq`` (float64, summed in order)."""
    n, m = cov_q.shape
    J = np.empty(4)
    for i in range(n):
        acc = np.zeros((4, 4))
        accr = np.zeros(4)
        hi = h[i]
        bi = b[i]
        for a in range(m):
            hc = hi * cov_q[i, a]
            md = hc * shape[i, a] + bi * nq[i, a]
            model[i, a] = md
            J[0] = cov_q[i, a] * shape[i, a]
            J[1] = -hc * pdf_a[i, a]
            J[2] = hc * pdf_b[i, a]
            J[3] = nq[i, a]
            w = wt[i, a]
            r = prof[i, a] - md
            for k in range(4):
                jw = J[k] * w
                for l in range(4):
                    acc[k, l] += jw * J[l]
                accr[k] += jw * r
        for k in range(4):
            for l in range(4):
                JtWJ[i, k, l] = acc[k, l]
            if do_r:
                JtWr[i, k] = accr[k]


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
