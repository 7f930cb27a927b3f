"""Compiled kernels (numba, :func:`pydriftn._jit.jit`) of the classification (mostly its trail model).

:func:`pydriftn.classify._trailmodel.fit_trails` works on per-pixel entry
lists of ~2000 trails x ~37 x ~15 px (~1e6 entries per full-size CCD). Written
as numpy expressions, each step built several million-entry temporaries
(boxes of candidate pixels, masks, index arrays, products); each kernel here
is one pass over the entries instead. The arithmetic is the numpy code's, in
the same float32/float64 precision and order, so per-entry values are
identical; per-trail sums accumulate in float64 sequentially in entry order
where ``np.add.reduceat`` summed pairwise: equal to ~1e-16 relative
(``tests/test_classify.py`` compares every kernel with the numpy expression
it replaced):

* :func:`stamp_aperture` / :func:`stamp_pixels`: :func:`._trailmodel.trail_pixels`,
  the data gather and the aperture fluxes of ``fit_trails``, and its
  narrower stamps of faint trails and wide stamps of bright ones (were (trails,
  H, W) boxes of s, c, masks and flat indices, boolean-mask copies, ``take`` s
  and concatenations): the stamps are counted with the aperture sums first,
  then written once at the half-width each trail gets, only the columns of
  each box row that can be inside the stamp tested;
* :func:`pixel_pairs`: :func:`._trailmodel._pixel_index` and
  :func:`._trailmodel._pairs` (an image-sized look-up, then a scan for the
  entries sharing a pixel; the same pairs in the same order);
* :func:`template_eval`: :meth:`._trailmodel.TrailTemplate.evaluate` (bilinear
  look-up in the 2-D table, ~15 temporaries per block), with the per-trail
  sub-pixel offsets applied on the fly (no shifted copies of s and c);
* :func:`fit_sums`: one iteration's nine per-trail sums of
  :func:`._trailmodel._fit` (template, robust weights, products);
* :func:`flux_sums`: ``v = T w`` and the per-trail sums ``sum v^2``,
  ``sum v d`` of :func:`._trailmodel._solve_fluxes`;
* :func:`render_model`: the model image of :func:`._trailmodel._final`
  (stamps scattered, pixels of two or more stamps summed in float64 in entry
  order as ``np.bincount`` did: identical values; the shared pixels from the
  pairs instead of an image-sized label array);
* :func:`template_bins`: the per-entry look-ups of the analytic template and
  the seven per-(trail, bin) sums of :func:`._trailmodel._empirical_template`
  (were three look-ups, ~10 products and seven ``np.bincount`` s; identical);
* :func:`minus_neighbours`: the bright entries' data minus the other trails'
  light on their pixels in ``fit_trails`` (two entry-sized ``np.bincount`` s
  and three gathers; identical);
* :func:`sky_subtract` and :func:`subtract_model_bin2`: the whole-image
  passes of :func:`.core.classify_exposure_ccd` (sky-subtracted image with the
  excluded pixels zeroed; residual, zeroed, and its 2x2 binning for the streak
  search), each one pass instead of three numpy passes per 64-row block.

Speed-up measured on full-size CCDs: see the commit messages.
"""

from __future__ import annotations

import numpy as np

from .._jit import jit

__all__ = ["stamp_aperture", "stamp_pixels", "pixel_pairs", "template_eval", "fit_sums", "flux_sums", "render_model",
           "template_bins", "minus_neighbours", "sky_subtract", "subtract_model_bin2"]


@jit
def _stamp_scan(x0, y0, ux, uy, length, bx0, by0, W, H, nx, ny, hw, climit, ids, fill, start, cnt, star, pix, s_out,
                c_out, d_out, w_out, flat, bad, c_core, ap_F, ap_n):
    """The entries of every trail's stamp: counted (``fill`` False) or written from ``start`` (``fill`` True).

    A trail's pixels are those of its box (``W x H`` from ``bx0``, ``by0``)
    with ``-hw <= s <= length + hw`` and ``|c| <= climit[t]`` (``hw`` if
    ``climit`` is empty; none if negative), tested in float32 as
    ``trail_pixels`` did, row by row. Per row only the columns that can pass
    (the two slabs' intersection, widened by 1 px) are tested. ``ids``: trail
    number written to ``star`` (``t`` if empty). Counting with ``ap_F`` not
    empty also sums the data (float64) and counts the unmasked entries with
    ``|c| <= c_core`` per trail (the aperture). Returns the number of entries.
    """
    n = len(x0)
    f32 = np.float32
    hw32 = f32(hw)
    mhw = -hw32
    k = start
    has_bad = len(bad) > 0
    has_data = len(flat) > 0
    has_lim = len(climit) > 0
    has_ids = len(ids) > 0
    ap = len(ap_F) > 0
    for t in range(n):
        cl = climit[t] if has_lim else hw32
        m = 0
        if cl >= 0:
            uxx = f32(ux[t])
            uyy = f32(uy[t])
            smax = f32(length[t] + hw)
            xs = x0[t]
            ys = y0[t]
            c0 = bx0[t]
            r0 = by0[t]
            tid = ids[t] if has_ids else t
            u_x = ux[t]
            u_y = uy[t]
            clf = float(cl)
            Lh = length[t] + hw
            for gy in range(H):
                Y = r0 + gy
                if Y < 0 or Y >= ny:
                    continue
                dyd = Y - ys
                dy = f32(dyd)
                # columns that can pass: |c| <= cl and -hw <= s <= L + hw (float64, widened by 1 px)
                lo = -1e300
                hi = 1e300
                if abs(u_y) > 1e-6:
                    a1 = (dyd * u_x - clf) / u_y
                    a2 = (dyd * u_x + clf) / u_y
                    lo = max(lo, min(a1, a2))
                    hi = min(hi, max(a1, a2))
                if abs(u_x) > 1e-6:
                    a1 = (-hw - dyd * u_y) / u_x
                    a2 = (Lh - dyd * u_y) / u_x
                    lo = max(lo, min(a1, a2))
                    hi = min(hi, max(a1, a2))
                g0 = 0
                g1 = W
                if lo > -1e299:
                    g0 = max(g0, int(np.floor(xs + lo)) - 1 - c0)
                if hi < 1e299:
                    g1 = min(g1, int(np.ceil(xs + hi)) + 2 - c0)
                g0 = max(g0, -c0)
                g1 = min(g1, nx - c0)
                for gx in range(g0, g1):
                    X = c0 + gx
                    dx = f32(X - xs)
                    s = dx * uxx + dy * uyy
                    c = dy * uxx - dx * uyy
                    ac = abs(c)
                    if ac <= hw32 and s >= mhw and s <= smax and ac <= cl:
                        p = Y * nx + X
                        if fill:
                            star[k] = tid
                            pix[k] = p
                            s_out[k] = s
                            c_out[k] = c
                            if has_data:
                                d_out[k] = flat[p]
                                w_out[k] = f32(0.0) if (has_bad and bad[p]) else f32(1.0)
                        elif ap and ac <= c_core and not (has_bad and bad[p]):
                            ap_F[t] += flat[p]
                            ap_n[t] += 1
                        k += 1
                        m += 1
        cnt[t] = m
    return k - start


def _boxes(x0, y0, ux, uy, length, hw):
    """The float64 trail arrays and each trail's box corner, and the common box size ``W x H``."""
    x0 = np.ascontiguousarray(x0, np.float64)
    y0 = np.ascontiguousarray(y0, np.float64)
    ux = np.ascontiguousarray(ux, np.float64)
    uy = np.ascontiguousarray(uy, np.float64)
    length = np.ascontiguousarray(length, np.float64)
    x1 = x0 + ux * length
    y1 = y0 + uy * length
    bx0 = np.floor(np.minimum(x0, x1) - hw).astype(np.int64)
    bx1 = np.ceil(np.maximum(x0, x1) + hw).astype(np.int64)
    by0 = np.floor(np.minimum(y0, y1) - hw).astype(np.int64)
    by1 = np.ceil(np.maximum(y0, y1) + hw).astype(np.int64)
    W = int((bx1 - bx0).max()) + 1 if len(x0) else 0
    H = int((by1 - by0).max()) + 1 if len(x0) else 0
    return (x0, y0, ux, uy, length, bx0, by0, W, H)


_I0 = np.zeros(0, np.int64)
_F0 = np.zeros(0, np.float32)
_D0 = np.zeros(0, np.float64)
_B0 = np.zeros(0, np.bool_)


def stamp_aperture(x0, y0, ux, uy, length, shape, half_width, flat, bad, c_core):
    """Entries per trail stamp, and the aperture sums: data and unmasked entries with ``|c| <= c_core``.

    The stamps of :func:`stamp_pixels` counted, not stored; the aperture
    (``fit_trails``' first flux estimate) summed on the way: ``(cnt, F, ncore)``,
    ``F`` the float64 sum of the float32 data.
    """
    ny, nx = shape
    hw = float(half_width)
    box = _boxes(x0, y0, ux, uy, length, hw)
    n = len(box[0])
    cnt = np.zeros(n, np.int64)
    F = np.zeros(n, np.float64)
    ncore = np.zeros(n, np.int64)
    if n:
        _stamp_scan(*box, nx, ny, hw, _F0, _I0, False, 0, cnt, _I0, _I0, _F0, _F0, _F0, _F0, flat,
                    _B0 if bad is None else bad, np.float32(c_core), F, ncore)
    return cnt, F, ncore


def stamp_pixels(x0, y0, ux, uy, length, shape, half_width, flat, bad=None, *, c_limit=None, ids=None, out=None,
                 start=0, counts=None):
    """Entries of the stamps of all trails and the data on them (:func:`._trailmodel.trail_pixels` + gather).

    The pixels within the rectangle ``-hw <= s <= length + hw``, ``|c| <= hw``
    of each trail, searched in a box of the common size ``W x H`` (largest
    trail box) from the trail's corner, row by row, as ``trail_pixels`` did
    (the same entries, in the same order, with the same float32 ``s``, ``c``).

    Parameters
    ----------
    x0, y0, ux, uy, length : ndarray float64
    shape : (ny, nx)
    half_width : float
    flat : ndarray float32
        Flattened image whose values are gathered (``d``); empty: no ``d``, ``w`` (returned empty).
    bad : ndarray bool or None
        Flattened mask of excluded pixels (``w`` = 0 there, 1 elsewhere).
    c_limit : ndarray float32, optional
        Per trail: only the entries with ``|c| <= c_limit`` (none if negative).
    ids : ndarray int64, optional
        Trail number of each trail in ``star`` (default: its index).
    out : tuple of 6 arrays, optional
        ``(star, pix, s, c, d, w)`` written from ``start`` (large enough);
        then the returned arrays are these, and ``counts`` (the number of
        entries of each stamp, for the size) is not needed.

    Returns
    -------
    star, pix : ndarray int64
    s, c, d, w : ndarray float32
    cnt : ndarray int64
        Entries per trail.
    """
    ny, nx = shape
    hw = float(half_width)
    box = _boxes(x0, y0, ux, uy, length, hw)
    n = len(box[0])
    cnt = np.zeros(n, np.int64)
    badv = _B0 if bad is None else bad
    lim = _F0 if c_limit is None else np.asarray(c_limit, np.float32)
    idv = _I0 if ids is None else np.asarray(ids, np.int64)
    if out is None:
        if n:
            _stamp_scan(*box, nx, ny, hw, lim, idv, False, 0, cnt, _I0, _I0, _F0, _F0, _F0, _F0, flat, badv,
                        np.float32(0), _D0, _I0)
        ne = int(cnt.sum())
        nd = ne if len(flat) else 0
        out = (np.empty(ne, np.int64), np.empty(ne, np.int64), np.empty(ne, np.float32), np.empty(ne, np.float32),
               np.empty(nd, flat.dtype), np.empty(nd, np.float32))
    if n:
        _stamp_scan(*box, nx, ny, hw, lim, idv, True, start, cnt, *out, flat, badv, np.float32(0), _D0, _I0)
    return (*out, cnt)


@jit
def pixel_pairs(pix, lookup):
    """``rep`` (the last entry on each entry's pixel, int32) and every pair of entries on one pixel.

    ``lookup``: int32 scratch of the image size (overwritten). The pairs come
    in the order of :func:`._trailmodel._pairs`: ``(e, rep[e])`` for every
    entry that is not the last on its pixel, ascending; then, for the pixels
    of three or more stamps (groups ordered by their last entry, members
    ascending), ``(g[i], g[i + k])`` for k = 1, 2, ... (each k over all groups).
    """
    ne = len(pix)
    for e in range(ne):
        lookup[pix[e]] = e
    rep = np.empty(ne, np.int32)
    ndup = 0
    for e in range(ne):
        r = lookup[pix[e]]
        rep[e] = r
        if r != e:
            ndup += 1
    p1 = np.empty(ndup, np.int64)
    p2 = np.empty(ndup, np.int64)
    nd = np.zeros(ne, np.int32)  # non-last entries per pixel (at its last entry)
    k = 0
    for e in range(ne):
        r = rep[e]
        if r != e:
            p1[k] = e
            p2[k] = r
            nd[r] += 1
            k += 1
    # pixels with two or more non-last entries: the groups, by last entry, members ascending
    nm = 0
    for i in range(ndup):
        if nd[p2[i]] > 1:
            nm += 1
    if nm == 0:
        return rep, p1, p2
    ml = np.empty(nm, np.int64)
    md = np.empty(nm, np.int64)
    k = 0
    for i in range(ndup):
        if nd[p2[i]] > 1:
            ml[k] = p2[i]
            md[k] = p1[i]
            k += 1
    o = np.argsort(ml, kind="mergesort")
    ml = ml[o]
    md = md[o]
    # group starts and sizes
    ng = 0
    for i in range(nm):
        if i == 0 or ml[i] != ml[i - 1]:
            ng += 1
    gs = np.empty(ng, np.int64)
    gn = np.zeros(ng, np.int64)
    g = -1
    kmax = 0
    for i in range(nm):
        if i == 0 or ml[i] != ml[i - 1]:
            g += 1
            gs[g] = i
        gn[g] += 1
        if gn[g] - 1 > kmax:
            kmax = gn[g] - 1
    extra = 0
    for g in range(ng):
        extra += gn[g] * (gn[g] - 1) // 2
    q1 = np.empty(ndup + extra, np.int64)
    q2 = np.empty(ndup + extra, np.int64)
    q1[:ndup] = p1
    q2[:ndup] = p2
    k = ndup
    for kk in range(1, kmax + 1):
        for g in range(ng):
            a = gs[g]
            for i in range(gn[g] - kk):
                q1[k] = md[a + i]
                q2[k] = md[a + i + kk]
                k += 1
    return rep, q1, q2


@jit
def template_eval(s, c, star, da, dc, tab, s0, inv_ds, u_max, c_lo, inv_dc, v_max, nc, T, Ts, Tc):
    """The 2-D table template at ``(s - da[star], c - dc[star])`` (float32; no offsets if ``da`` is empty).

    ``tab``: (ns * nc, 4) float32 bilinear coefficients of each cell (see
    :meth:`._trailmodel.TrailTemplate._table2d`); ``s0``, ``inv_ds``,
    ``u_max``, ``c_lo``, ``inv_dc``, ``v_max`` float32 as in ``_evaluate_block``.
    Writes ``T`` and, when ``Ts`` is not empty, ``Ts`` and ``Tc`` (d/ds, d/dc).
    """
    ne = len(s)
    shift = len(da) > 0
    deriv = len(Ts) > 0
    z = np.float32(0.0)
    for e in range(ne):
        if shift:
            t = star[e]
            se = s[e] - da[t]
            ce = c[e] - dc[t]
        else:
            se = s[e]
            ce = c[e]
        u = (se - s0) * inv_ds
        if u < z:
            u = z
        if u > u_max:
            u = u_max
        i = np.int32(u)
        u = u - np.float32(i)
        v = (ce - c_lo) * inv_dc
        if v < z:
            v = z
        if v > v_max:
            v = v_max
        j = np.int32(v)
        v = v - np.float32(j)
        q = i * np.int32(nc) + j
        c0 = tab[q, 0]
        c1 = tab[q, 1]
        c2 = tab[q, 2]
        c3 = tab[q, 3]
        b = c3 * v + c2
        T[e] = (b * u + c0) + c1 * v
        if deriv:
            Ts[e] = b * inv_ds
            Tc[e] = (c3 * u + c1) * inv_dc


@jit
def fit_sums(s, c, star, d, w, da, dc, F, tab, s0, inv_ds, u_max, c_lo, inv_dc, v_max, nc, first_T, first_Ts,
             first_Tc, robust, sky2, gain, S):
    """The nine per-trail sums of one iteration of :func:`._trailmodel._fit`, added into ``S`` (9, n) float64.

    ``da``, ``dc``, ``F``: float32 per trail. The template (and its
    derivatives) at the offsets from the table, or ``first_*`` when not empty.
    With ``robust``: entries more than 5 sigma (``sqrt(sky2 + m / gain +
    (0.03 m)^2)``, float32) from the model get no weight. Products in float32
    (float64 where ``d`` is), sums in float64.
    """
    ne = len(s)
    f32 = np.float32
    have = len(first_T) > 0
    k003 = f32(0.03)
    k5 = f32(5.0)
    z = f32(0.0)
    for e in range(ne):
        t = star[e]
        if have:
            T = first_T[e]
            Ts = first_Ts[e]
            Tc = first_Tc[e]
        else:
            se = s[e] - da[t]
            ce = c[e] - dc[t]
            u = (se - s0) * inv_ds
            if u < z:
                u = z
            if u > u_max:
                u = u_max
            i = np.int32(u)
            u = u - f32(i)
            v = (ce - c_lo) * inv_dc
            if v < z:
                v = z
            if v > v_max:
                v = v_max
            j = np.int32(v)
            v = v - f32(j)
            q = i * np.int32(nc) + j
            c0 = tab[q, 0]
            c1 = tab[q, 1]
            c2 = tab[q, 2]
            c3 = tab[q, 3]
            b = c3 * v + c2
            T = (b * u + c0) + c1 * v
            Ts = b * inv_ds
            Tc = (c3 * u + c1) * inv_dc
        Fi = F[t]
        FT = Fi * T
        r = d[e] - FT
        wb = w[e]
        if robust:
            m = abs(FT)
            qq = k003 * m
            qq = qq * qq
            sig = m / gain
            sig = sig + sky2
            sig = sig + qq
            sig = np.sqrt(sig)
            sig = sig * k5
            if not (f32(abs(r)) < sig):
                wb = z
        J1 = -Fi * Ts
        J2 = -Fi * Tc
        wT = wb * T
        wJ1 = wb * J1
        wJ2 = wb * J2
        S[0, t] += wT * T
        S[1, t] += wT * J1
        S[2, t] += wT * J2
        S[3, t] += wJ1 * J1
        S[4, t] += wJ1 * J2
        S[5, t] += wJ2 * J2
        S[6, t] += wT * r
        S[7, t] += wJ1 * r
        S[8, t] += wJ2 * r


@jit
def flux_sums(T, w, d, star, v, diag, b):
    """``v = T * w`` (float32) and ``diag[star] += v^2``, ``b[star] += v d`` (float64 sums)."""
    for e in range(len(T)):
        x = T[e] * w[e]
        v[e] = x
        t = star[e]
        diag[t] += x * x
        b[t] += x * d[e]


@jit
def render_model(F, T, star, pix, rep, p1, p2, model, acc):
    """``model[pix] = F[star] * T`` (float32), pixels of several stamps the float64 sum of theirs.

    ``rep``: representative (last) entry of each entry's pixel; ``(p1, p2)``:
    the pairs of :func:`pixel_pairs`, whose leading pairs ``(e, rep[e])``
    (every entry that is not the last on its pixel, ascending) give the
    shared pixels; ``acc``: float64 scratch of the number of entries (only
    the shared pixels' representatives are used). A shared pixel's sum is
    accumulated from 0.0 over its entries in entry order and cast to float32,
    as ``np.bincount`` over the shared entries did (identical values).
    """
    for e in range(len(T)):
        model[pix[e]] = F[star[e]] * T[e]
    nd = 0
    while nd < len(p1) and rep[p1[nd]] == p2[nd]:
        nd += 1
    for i in range(nd):
        acc[p2[i]] = 0.0
    for i in range(nd):
        e = p1[i]
        acc[p2[i]] += F[star[e]] * T[e]
    for i in range(nd):
        r = p2[i]
        model[pix[r]] = np.float32(acc[r] + F[star[r]] * T[r])


@jit
def _lerp(tab, x0, inv_dx, n, x):
    """``_trailmodel.TrailTemplate._lookup`` of one float64 value: (index, fraction) of the linear interpolation."""
    u = (x - x0) * inv_dx
    if u < 0.0:
        u = 0.0
    hi = n - 1.001
    if u > hi:
        u = hi
    i = np.intp(u)
    return i, u - np.float64(i)


@jit
def template_bins(s, c, st, Fi, dsel, f, g, gp, s0, inv_ds, c0, inv_dc, s_lo, dsb, nsb, out, fb_out):
    """The per-(bright trail, along-track bin) sums of :func:`._trailmodel._empirical_template` (float64).

    Per entry: the analytic template's ``fb = f(s)``, ``gb = g(c)``, ``gpb =
    g'(c)`` (linear look-ups as ``_lookup``), ``r = d - F fb gb``, ``h = gb + c
    gpb``, ``rF = r / F``; the bin ``st * nsb + clip(rint((s - s_lo) / dsb))``;
    ``out[k, bin] +=`` ``gb^2``, ``-fb gb h``, ``(fb h)^2``, ``gb rF``, ``-fb h
    rF``, ``rF gpb``, ``fb gpb^2`` in entry order (as ``np.bincount``: the same
    sums). ``fb_out``: ``fb`` of every entry.
    """
    nf = len(f)
    ng = len(g)
    for e in range(len(s)):
        se = s[e]
        ce = c[e]
        i, u = _lerp(f, s0, inv_ds, nf, se)
        fb = (f[i + 1] - f[i]) * u + f[i]
        j, v = _lerp(g, c0, inv_dc, ng, ce)
        gb = (g[j + 1] - g[j]) * v + g[j]
        gpb = (gp[j + 1] - gp[j]) * v + gp[j]
        Fe = Fi[e]
        r = dsel[e] - Fe * fb * gb
        h = gb + ce * gpb
        rF = r / Fe
        sb = np.int64(np.rint((se - s_lo) / dsb))
        if sb < 0:
            sb = 0
        if sb > nsb - 1:
            sb = nsb - 1
        k = st[e] * nsb + sb
        fh = fb * h
        out[0, k] += gb * gb
        out[1, k] += -fb * gb * h
        out[2, k] += fh * fh
        out[3, k] += gb * rF
        out[4, k] += -fb * h * rF
        out[5, k] += rF * gpb
        out[6, k] += fb * (gpb * gpb)
        fb_out[e] = fb


@jit
def minus_neighbours(d, eb, rep, own, en, other, acc_t, acc_o):
    """``d[eb]`` minus the other trails' light on each entry's pixel (float64), as ``fit_trails`` computed it.

    ``own``: each bright entry's own model (float64, per ``eb``); ``other``:
    the model of the neighbours' entries ``en``. Per pixel (``rep``) the sums
    ``tot`` of ``own`` and ``oth`` of ``other`` from 0.0 in entry order (as
    ``np.bincount``); returns ``d[eb] - (tot - own) - oth``. ``acc_t``,
    ``acc_o``: float64 scratch of the number of entries (only these pixels'
    representatives are used).
    """
    nb = len(eb)
    for k in range(nb):
        r = rep[eb[k]]
        acc_t[r] = 0.0
        acc_o[r] = 0.0
    for k in range(len(en)):
        acc_o[rep[en[k]]] = 0.0
    for k in range(len(en)):
        acc_o[rep[en[k]]] += other[k]
    for k in range(nb):
        acc_t[rep[eb[k]]] += own[k]
    out = np.empty(nb, np.float64)
    for k in range(nb):
        e = eb[k]
        r = rep[e]
        out[k] = d[e] - (acc_t[r] - own[k]) - acc_o[r]
    return out


@jit
def sky_subtract(data, rows, cols, excl, zero, out):
    """``out = (data - rows[:, None]) - cols[None, :]`` (float32; the first difference in ``data`` 's precision,
    cast, as ``np.subtract(data, rows, out=float32)``), 0 where ``excl`` if ``zero``: one pass."""
    ny, nx = data.shape
    z = np.float32(0.0)
    for y in range(ny):
        ry = rows[y]
        dr = data[y]
        er = excl[y]
        orow = out[y]
        for x in range(nx):
            v = np.float32(dr[x] - ry)
            v = v - cols[x]
            if zero and er[x]:
                v = z
            orow[x] = v


@jit
def subtract_model_bin2(resid, model, excl, binned):
    """``resid -= model``, 0 where ``excl`` (in place, float32), and (``binned`` not empty) its 2x2 block sums
    ``(r[2j, 2i] + r[2j+1, 2i]) + (r[2j, 2i+1] + r[2j+1, 2i+1])`` as ``_streaks.bin_image(resid, 2)``: one pass."""
    ny, nx = resid.shape
    z = np.float32(0.0)
    do_bin = binned.shape[0] > 0
    nyb = ny // 2
    nxb = nx // 2
    for y in range(ny):
        rr = resid[y]
        mr = model[y]
        er = excl[y]
        for x in range(nx):
            v = rr[x] - mr[x]
            if er[x]:
                v = z
            rr[x] = v
        if do_bin and (y & 1) == 1 and (y >> 1) < nyb:
            r0 = resid[y - 1]
            br = binned[y >> 1]
            for i in range(nxb):
                br[i] = (r0[2 * i] + rr[2 * i]) + (r0[2 * i + 1] + rr[2 * i + 1])
